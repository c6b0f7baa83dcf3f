"""Sessions: compact KV storage, snapshots, restore (also in a new process), rewinds, limits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ds4py import ContextError, Engine, EngineOptions
from ds4py.config import FLASH, Shape
from ds4py.kv.state import FP4Rows, FP8Rows, KVState, SnapshotError
from ds4py.kv.store import KVStore
from ds4py.model.model import fp4_sim, fp8_sim, round_rope_f16
from ds4py.synth import write_synthetic

SHAPE = Shape(n_vocab=300, n_embd=256, n_layer=4, n_head=2, head_dim=128, q_lora_rank=64,
              o_lora_rank=32, o_groups=2, n_expert=4, n_expert_used=2, n_ff_exp=256,
              n_hash_layer=3, n_indexer_head=4, indexer_top_k=8)  # fmt: skip


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.gguf"
    write_synthetic(path, SHAPE, seed=3)
    return path


def tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(
        0, SHAPE.n_vocab, (n,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def test_compact_rows_are_lossless():
    g = torch.Generator().manual_seed(0)
    rows = round_rope_f16(fp8_sim(torch.randn(9, 512, generator=g) * 3, 448), 64)
    rows[0, :64] = 0
    store = FP8Rows(16, 512, 64, "cpu")
    store.put(2, rows)
    assert torch.equal(store.get(11)[2:], rows)
    idx = fp4_sim(torch.randn(9, 128, generator=g) * torch.logspace(-3, 3, 9)[:, None])
    store = FP4Rows(16, 128, "cpu")
    store.put(0, idx)
    assert torch.equal(store.get(9), idx)


def test_compact_cache_gives_the_float_logits(model_path):
    eng = Engine.open(model_path)
    ids = eng.check_tokens(tokens(300))
    a = eng.model.forward(ids, KVState(SHAPE, 400, "cpu", compact=True), all_logits=True)
    b = eng.model.forward(ids, KVState(SHAPE, 400, "cpu", compact=False), all_logits=True)
    assert torch.equal(a, b)


def test_flash_bytes_per_token():
    st = KVState(Shape(**FLASH), 1024, "cpu")
    assert st.growing_bytes_per_token() <= 3600  # vs ds4's 13 760 B (float32)
    assert KVState(Shape(**FLASH), 1024, "cpu", compact=False).growing_bytes_per_token() == 13760


def test_snapshot_restore_continues_identically(model_path):
    eng = Engine.open(model_path)
    ids = tokens(400)
    a = eng.new_session(ctx=512)
    a.sync(ids[:261])
    payload = a.snapshot()
    want = [a.eval(t) for t in ids[261:300]]
    b = eng.new_session(ctx=512)
    b.restore(payload)
    assert b.tokens == ids[:261]
    got = [b.eval(t) for t in ids[261:300]]
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))


def test_restore_in_a_new_process_from_disk(model_path, tmp_path):
    eng = Engine.open(model_path)
    ids = tokens(700, seed=1)
    sess = eng.new_session(ctx=1024)
    sess.sync(ids[:600])
    store = KVStore(tmp_path / "kv", fingerprint=eng.fingerprint)
    text = " ".join(map(str, ids[:600])).encode()  # any text keyed to these tokens
    store.save(text, 600, sess.snapshot, "cold")
    want = sess.eval(ids[600])
    script = (
        "import sys, torch\n"
        "from ds4py import Engine\nfrom ds4py.kv.store import KVStore\n"
        f"eng = Engine.open({str(model_path)!r})\n"
        f"store = KVStore({str(tmp_path / 'kv')!r}, fingerprint=eng.fingerprint)\n"
        f"hit = store.lookup({text!r} + b'more', ctx=1024)\n"
        "s = eng.new_session(ctx=1024)\ns.restore(hit.payload)\n"
        f"torch.save(s.eval({ids[600]}), {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)


@pytest.mark.parametrize("cut", [258, 386, 301])  # inside ratio-4 and ratio-128 windows
def test_rewind_mid_window_equals_fresh_prefill(model_path, cut):
    eng = Engine.open(model_path, quant_sim=False, options=EngineOptions(prefill_chunk=64))
    ids, other = tokens(420, seed=2), tokens(420, seed=3)
    sess = eng.new_session(ctx=512)
    sess.sync(ids)
    target = ids[:cut] + other[cut:]
    logits = sess.sync(target)
    assert sess.tokens == target
    want = eng.score(target)[-1]
    assert float((logits - want).abs().max() / want.abs().max()) < 1e-5
    sess.rewind(cut - 3)
    for t in target[cut - 3 :]:
        logits = sess.eval(t)
    assert float((logits - want).abs().max() / want.abs().max()) < 1e-5


def test_bad_payloads_are_refused(model_path, tmp_path):
    eng = Engine.open(model_path)
    sess = eng.new_session(ctx=256)
    sess.sync(tokens(100))
    payload = sess.snapshot()
    fresh = eng.new_session(ctx=256)
    for bad in (
        payload[:-1],
        payload[:200],
        payload[:500] + bytes([payload[500] ^ 1]) + payload[501:],
    ):
        with pytest.raises(SnapshotError):
            fresh.restore(bad)
    other_path = tmp_path / "other.gguf"
    write_synthetic(other_path, Shape(**{**SHAPE.__dict__, "n_layer": 5, "compress_ratios": ()}))
    with pytest.raises(SnapshotError, match="different model"):
        Engine.open(other_path).new_session(256).restore(payload)
    with pytest.raises(SnapshotError, match="different model"):
        Engine.open(model_path, quant_sim=False).new_session(256).restore(payload)
    small = eng.new_session(ctx=64)
    with pytest.raises(ContextError):
        small.restore(payload)
    assert fresh.tokens == [] and small.tokens == []  # nothing half-restored


def test_limits_and_bad_tokens(model_path):
    eng = Engine.open(model_path)
    sess = eng.new_session(ctx=16)
    with pytest.raises(ContextError, match="exceeds the context of 16"):
        sess.sync(tokens(16))
    sess.sync(tokens(14))
    sess.eval(1)
    with pytest.raises(ContextError):
        sess.eval(2)
    with pytest.raises(ValueError, match="out of range"):
        eng.new_session(16).sync([1, 2, 300])
    assert sess.pos == 15


def test_sample_draws_from_the_session_logits(model_path):
    from ds4py.sample import Sampler, SamplingParams

    eng = Engine.open(model_path)
    sess = eng.new_session(ctx=64)
    with pytest.raises(ValueError, match="empty"):
        sess.sample(Sampler(SamplingParams(seed=1)))
    logits = sess.sync(tokens(10))
    assert sess.sample(Sampler(SamplingParams(seed=1)), greedy=True) == int(logits.argmax())
    draws = [sess.sample(Sampler(SamplingParams(seed=s, temperature=1.0))) for s in range(5)]
    assert draws == [
        sess.sample(Sampler(SamplingParams(seed=s, temperature=1.0))) for s in range(5)
    ]
