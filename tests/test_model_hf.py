"""The reference forward pass against HF transformers' DeepseekV4ForCausalLM (the oracle).

Tiny random configs keep every feature: raw-only, ratio-4 (+ indexer, top-k smaller than the
visible rows) and ratio-128 layers, hash and learned routing, sinks, YaRN. Sequences cross the
128-token window and produce several ratio-128 rows. quant_sim=False, because transformers has no
FP8/FP4 round trips; tolerance: max |diff| / max |logit| per position <= 1e-4 (float32).
"""

from __future__ import annotations

import pytest
import torch
from hf_oracle import hf_logits, make_hf_model, save_gguf

from ds4py import Engine, EngineOptions
from ds4py.gguf import GGUFFile
from ds4py.quant.formats import quantize

pytest.importorskip("transformers")

CONFIGS = {
    "small": dict(seed=0),
    "wider": dict(seed=1, n_layer=6, heads=8, head_dim=192, experts=16, topk=12, width=128,
                  o_groups=4, num_experts_per_tok=4),
}  # fmt: skip
N = 420


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().amax(-1) / b.abs().amax(-1)).max())


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    kw = dict(CONFIGS[request.param])
    model = make_hf_model(**kw)
    path = save_gguf(model, tmp_path_factory.mktemp(request.param))
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (N,), generator=g).tolist()
    return model, path, ids, hf_logits(model, ids)


def test_score_matches_transformers(case):
    model, path, ids, ref = case
    eng = Engine.open(path, quant_sim=False)
    out = eng.score(ids)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4


def test_session_paths_equal_score(case):
    """Chunked prefill, a rewind and token-by-token decode give the rows of one full prefill."""
    _, path, ids, _ = case
    eng = Engine.open(path, quant_sim=False, options=EngineOptions(prefill_chunk=64))
    full = eng.score(ids)
    sess = eng.new_session(ctx=1024)
    assert rel_err(sess.sync(ids[:150])[None], full[149][None]) <= 1e-5
    for i in range(150, 200):
        logits = sess.eval(ids[i])
        assert rel_err(logits[None], full[i][None]) <= 1e-5
    logits = sess.sync(ids[:N])
    assert rel_err(logits[None], full[N - 1][None]) <= 1e-5
    # a prompt that diverges mid-window (inside ratio-4 and ratio-128 windows) rewinds
    other = ids[:301] + [(ids[301] + 1) % eng.shape.n_vocab]
    sess.sync(other)
    logits = sess.sync(ids[:330])
    assert rel_err(logits[None], full[329][None]) <= 1e-5


def test_quant_sim_is_a_small_change(case):
    """While the indexer selects nothing (few rows), only the FP8 KV round trip acts: a small move."""
    model, path, ids, ref = case
    n = 4 * model.config.index_topk
    sim = Engine.open(path, quant_sim=True).score(ids[:n])
    assert rel_err(sim, ref[:n]) > 1e-6
    # E4M3 keeps 3 mantissa bits (up to 6% per value); random tiny models amplify it somewhat
    cos = torch.nn.functional.cosine_similarity(sim, ref[:n], dim=-1)
    assert float(cos.min()) > 0.9 and float(cos.mean()) > 0.98


def test_gguf_round_trip_is_exact(case):
    """Every GGUF tensor equals the checkpoint tensor it came from (f32 conversion)."""
    model, path, _, _ = case
    f = GGUFFile(path)
    sd = model.state_dict()
    L = model.config.num_hidden_layers - 1
    pairs = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        f"blk.{L}.attn_output_a.weight": sd[f"model.layers.{L}.self_attn.o_a_proj.weight"],
        "blk.2.indexer.proj.weight": sd["model.layers.2.self_attn.compressor.indexer.scorer.weights_proj.weight"],
        "blk.2.ffn_up_exps.weight": sd["model.layers.2.mlp.experts.gate_up_proj"][:, model.config.moe_intermediate_size :],
        "blk.0.ffn_gate_tid2eid.weight": sd["model.layers.0.mlp.gate.tid2eid"].float(),
        f"blk.{L}.exp_probs_b.bias": sd[f"model.layers.{L}.mlp.gate.e_score_correction_bias"],
    }  # fmt: skip
    for name, want in pairs.items():
        info = f.tensors[name]
        from ds4py.quant.formats import QTensor

        got = QTensor.from_raw(f.tensor_bytes(name), info.qtype, info.shape).dequantize()
        assert torch.equal(got, want.float()), name


def test_q8_0_conversion(case, tmp_path):
    model, _, ids, ref = case
    path = save_gguf(model, tmp_path, "q8_0")
    f = GGUFFile(path)
    w = model.state_dict()["model.layers.1.self_attn.q_b_proj.weight"]
    raw = f.tensor_bytes("blk.1.attn_q_b.weight").reshape(w.shape[0], -1)
    assert torch.equal(raw, quantize(w, 8).data)
    out = Engine.open(path, quant_sim=False).score(ids[:64])
    # ~0.6% error per Q8_0 weight, compounded over ~20 matmuls in sequence
    cos = torch.nn.functional.cosine_similarity(out, ref[:64], dim=-1)
    assert float(cos.min()) > 0.9 and float(cos.mean()) > 0.98
