"""Convert a DeepSeek V4 checkpoint directory (config.json + safetensors) to a ds4-layout GGUF.

Accepts the official checkpoint naming (`layers.3.attn.wq_a.weight`, FP8 tensors with block
scales) and transformers naming (`model.layers.3.self_attn.q_a_proj.weight`), maps every tensor to
its GGUF name (MODEL.md §6), and writes matrices as f32, f16 or q8_0 with the tokenizer embedded.
Tensors are read and encoded one at a time. 2/4-bit expert quantization is not done here.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelFileError, Shape
from .gguf import GGMLType, PendingTensor, write_gguf
from .model.load import tensor_specs
from .quant.formats import quantize, row_bytes

TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0}

# checkpoint-name regex -> GGUF name template; both namings, per MODEL.md §6.
_GLOBAL = {
    "embed.weight": "token_embd.weight",
    "model.embed_tokens.weight": "token_embd.weight",
    "head.weight": "output.weight",
    "lm_head.weight": "output.weight",
    "norm.weight": "output_norm.weight",
    "model.norm.weight": "output_norm.weight",
    "hc_head_fn": "output_hc_fn.weight",
    "model.hc_head.hc_fn": "output_hc_fn.weight",
    "hc_head_base": "output_hc_base.weight",
    "model.hc_head.hc_base": "output_hc_base.weight",
    "hc_head_scale": "output_hc_scale.weight",
    "model.hc_head.hc_scale": "output_hc_scale.weight",
}
_LAYER = {
    "hc_attn_fn": "hc_attn_fn.weight", "attn_hc.fn": "hc_attn_fn.weight",
    "hc_attn_base": "hc_attn_base.weight", "attn_hc.base": "hc_attn_base.weight",
    "hc_attn_scale": "hc_attn_scale.weight", "attn_hc.scale": "hc_attn_scale.weight",
    "hc_ffn_fn": "hc_ffn_fn.weight", "ffn_hc.fn": "hc_ffn_fn.weight",
    "hc_ffn_base": "hc_ffn_base.weight", "ffn_hc.base": "hc_ffn_base.weight",
    "hc_ffn_scale": "hc_ffn_scale.weight", "ffn_hc.scale": "hc_ffn_scale.weight",
    "attn_norm.weight": "attn_norm.weight", "input_layernorm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn.wq_a.weight": "attn_q_a.weight", "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "attn.q_norm.weight": "attn_q_a_norm.weight", "self_attn.q_a_norm.weight": "attn_q_a_norm.weight",
    "attn.wq_b.weight": "attn_q_b.weight", "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "attn.wkv.weight": "attn_kv.weight", "self_attn.kv_proj.weight": "attn_kv.weight",
    "attn.kv_norm.weight": "attn_kv_a_norm.weight", "self_attn.kv_norm.weight": "attn_kv_a_norm.weight",
    "attn.norm.weight": "attn_kv_a_norm.weight",  # transformers save_pretrained spelling
    "attn.attn_sink": "attn_sinks.weight", "self_attn.sinks": "attn_sinks.weight",
    "attn.wo_a.weight": "attn_output_a.weight", "self_attn.o_a_proj.weight": "attn_output_a.weight",
    "attn.wo_b.weight": "attn_output_b.weight", "self_attn.o_b_proj.weight": "attn_output_b.weight",
    "attn.compressor.ape": "attn_compressor_ape.weight",
    "self_attn.compressor.position_bias": "attn_compressor_ape.weight",
    "attn.compressor.wkv.weight": "attn_compressor_kv.weight",
    "self_attn.compressor.kv_proj.weight": "attn_compressor_kv.weight",
    "attn.compressor.wgate.weight": "attn_compressor_gate.weight",
    "self_attn.compressor.gate_proj.weight": "attn_compressor_gate.weight",
    "attn.compressor.norm.weight": "attn_compressor_norm.weight",
    "self_attn.compressor.kv_norm.weight": "attn_compressor_norm.weight",
    "attn.indexer.wq_b.weight": "indexer.attn_q_b.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "indexer.attn_q_b.weight",
    "attn.indexer.weights_proj.weight": "indexer.proj.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "indexer.proj.weight",
    "attn.indexer.compressor.ape": "indexer_compressor_ape.weight",
    "self_attn.compressor.indexer.position_bias": "indexer_compressor_ape.weight",
    "attn.indexer.compressor.wkv.weight": "indexer_compressor_kv.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "indexer_compressor_kv.weight",
    "attn.indexer.compressor.wgate.weight": "indexer_compressor_gate.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "indexer_compressor_gate.weight",
    "attn.indexer.compressor.norm.weight": "indexer_compressor_norm.weight",
    "self_attn.compressor.indexer.kv_norm.weight": "indexer_compressor_norm.weight",
    "ffn.gate.weight": "ffn_gate_inp.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
    "ffn.gate.bias": "exp_probs_b.bias", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "ffn.gate.tid2eid": "ffn_gate_tid2eid.weight", "mlp.gate.tid2eid": "ffn_gate_tid2eid.weight",
    "ffn.shared_experts.w1.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "ffn.shared_experts.w3.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "ffn.shared_experts.w2.weight": "ffn_down_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}  # fmt: skip
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")
_EXPERT_GGUF = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight",
                "w2": "ffn_down_exps.weight"}  # fmt: skip


def shape_from_config(cfg: dict) -> Shape:
    """Shape from an official or transformers config.json."""
    n = cfg["num_hidden_layers"]
    if "compress_ratios" in cfg:
        ratios = cfg["compress_ratios"][:n]
    else:
        rate = {"sliding_attention": 0, "compressed_sparse_attention": 4,
                "heavily_compressed_attention": 128}  # fmt: skip
        ratios = [rate[t] for t in cfg.get("layer_types") or []]
    if "num_hash_layers" in cfg:
        n_hash = cfg["num_hash_layers"]
    else:
        n_hash = sum(t == "hash_moe" for t in cfg.get("mlp_layer_types") or ["hash_moe"] * 3)
    rp = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rp = rp.get("compress", rp)
    head_dim = cfg.get("head_dim", 512)
    n_rot = cfg.get("qk_rope_head_dim") or int(head_dim * cfg.get("partial_rotary_factor", 0.125))
    return Shape(
        n_vocab=cfg["vocab_size"], n_embd=cfg["hidden_size"], n_layer=n,
        n_head=cfg["num_attention_heads"], head_dim=head_dim, n_rot=n_rot,
        q_lora_rank=cfg["q_lora_rank"], o_lora_rank=cfg["o_lora_rank"], o_groups=cfg["o_groups"],
        n_expert=cfg["n_routed_experts"], n_expert_used=cfg["num_experts_per_tok"],
        n_ff_exp=cfg["moe_intermediate_size"], n_hash_layer=n_hash,
        n_indexer_head=cfg["index_n_heads"], indexer_head_dim=cfg.get("index_head_dim", 128),
        indexer_top_k=cfg["index_topk"], window=cfg.get("sliding_window", 128),
        hc_mult=cfg.get("hc_mult", 4), hc_sinkhorn_iters=cfg.get("hc_sinkhorn_iters", 20),
        compress_ratios=tuple(ratios), swiglu_clamp=float(cfg.get("swiglu_limit", 10.0)),
        rope_freq_base=float(cfg.get("rope_theta", 10000.0)),
        compress_rope_freq_base=float(cfg.get("compress_rope_theta", 160000.0)),
        rope_scaling_factor=float(rp.get("factor", 16.0)),
        rope_orig_ctx=int(rp.get("original_max_position_embeddings", 65536)),
        yarn_beta_fast=float(rp.get("beta_fast", 32.0)), yarn_beta_slow=float(rp.get("beta_slow", 1.0)),
        expert_weights_scale=float(cfg.get("routed_scaling_factor", 1.5)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), hc_eps=float(cfg.get("hc_eps", 1e-6)),
        context_length=int(cfg.get("max_position_embeddings", 1048576)),
    )  # fmt: skip


class Checkpoint:
    """Lazy access to the tensors of a safetensors directory, by checkpoint name."""

    def __init__(self, directory: Path):
        self.files = sorted(directory.glob("*.safetensors"))
        if not self.files:
            raise ModelFileError(f"{directory}: no *.safetensors files")
        self.where: dict[str, Path] = {}
        for f in self.files:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    self.where[k] = f

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.where[name], framework="pt") as h:
            return h.get_tensor(name)

    def float(self, name: str) -> torch.Tensor:
        """A tensor as float32, applying FP8 (128x128) or FP4 (1x32) block scales if present."""
        t = self.get(name)
        base = name.removesuffix(".weight")
        scale = next((s for s in (base + ".scale", name + "_scale_inv", base + ".weight_scale_inv")
                      if s in self.where), None)  # fmt: skip
        if t.dtype in (torch.int8, torch.uint8) or str(t.dtype).startswith("torch.float4"):
            t = _unpack_fp4(t)
        t = t.float()
        if scale is not None:
            s = self.get(scale).float()
            bh, bw = math.ceil(t.shape[0] / s.shape[0]), math.ceil(t.shape[1] / s.shape[1])
            t = (
                t
                * s.repeat_interleave(bh, 0)[: t.shape[0]].repeat_interleave(bw, 1)[:, : t.shape[1]]
            )
        return t


def _unpack_fp4(t: torch.Tensor) -> torch.Tensor:
    """Two E2M1 codes per byte, low nibble first (the DeepSeek reference packing)."""
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    b = t.view(torch.uint8).long()
    return torch.stack((grid[b & 15], grid[b >> 4]), dim=-1).flatten(-2)


def gguf_sources(ck: Checkpoint, shape: Shape) -> dict[str, Callable[[], torch.Tensor]]:
    """GGUF name -> function producing its float32 (or int) tensor in torch order."""
    out: dict[str, Callable[[], torch.Tensor]] = {}
    experts: dict[tuple[int, str], dict[int, str]] = {}
    for name in ck.where:
        if (
            name.endswith(("_scale_inv", ".scale"))
            and name.removesuffix(".scale") + ".weight" in ck.where
        ):
            continue
        if name in _GLOBAL:
            out[_GLOBAL[name]] = lambda n=name: ck.float(n)
            continue
        m = _LAYER_RE.match(name)
        if not m:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= shape.n_layer:
            continue  # MTP layers and anything beyond the main stack
        if rest in _LAYER:
            getter = (
                (lambda n=name: ck.get(n)) if "tid2eid" in rest else (lambda n=name: ck.float(n))
            )
            out[f"blk.{layer}.{_LAYER[rest]}"] = getter
        elif rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            f = shape.n_ff_exp
            if rest.endswith("gate_up_proj"):
                out[f"blk.{layer}.ffn_gate_exps.weight"] = lambda n=name, f=f: ck.float(n)[:, :f]
                out[f"blk.{layer}.ffn_up_exps.weight"] = lambda n=name, f=f: ck.float(n)[:, f:]
            else:
                out[f"blk.{layer}.ffn_down_exps.weight"] = lambda n=name: ck.float(n)
        elif em := _EXPERT_RE.match(rest):
            experts.setdefault((layer, em.group(2)), {})[int(em.group(1))] = name
    for (layer, w), names in experts.items():
        out[f"blk.{layer}.{_EXPERT_GGUF[w]}"] = lambda names=names: torch.stack(
            [ck.float(names[e]) for e in sorted(names)]
        )
    return out


def convert(src: str | Path, dst: str | Path, qtype: str = "q8_0") -> Shape:
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ModelFileError(f"{src}: no config.json")
    shape = shape_from_config(json.loads(cfg_path.read_text()))
    ck = Checkpoint(src)
    sources = gguf_sources(ck, shape)
    md = shape.to_metadata()
    md.update(_tokenizer_metadata(src, shape))
    pending = []
    for spec in tensor_specs(shape):
        if spec.name not in sources:
            if spec.optional:
                continue
            raise ModelFileError(f"{src}: no checkpoint tensor for {spec.name}")
        t = _target_type(spec.kind, spec.shape, TYPES[qtype])
        nbytes = math.prod(spec.shape[:-1]) * row_bytes(t, spec.shape[-1])
        pending.append(PendingTensor(spec.name, t, spec.shape, nbytes,
                                     lambda s=spec, t=t: _encode(sources[s.name](), s.shape, t)))  # fmt: skip
    write_gguf(dst, md, pending)
    return shape


def _target_type(kind: str, shape: tuple[int, ...], want: GGMLType) -> GGMLType:
    if kind == "table":
        return GGMLType.I32
    if kind == "vector" or (want == GGMLType.Q8_0 and shape[-1] % 32):
        return GGMLType.F32
    return want


def _encode(t: torch.Tensor, shape: tuple[int, ...], qtype: GGMLType):
    if tuple(t.shape) != shape:
        raise ModelFileError(f"checkpoint tensor has shape {list(t.shape)}, expected {list(shape)}")
    if qtype == GGMLType.I32:
        return t.to(torch.int32).contiguous().numpy()
    return quantize(t.float().contiguous(), qtype).data.numpy()


def _tokenizer_metadata(src: Path, shape: Shape) -> dict:
    from .synth import tokenizer_metadata

    path = src / "tokenizer.json"
    md = tokenizer_metadata(path if path.is_file() else None)
    if len(md["tokenizer.ggml.tokens"][1]) != shape.n_vocab:
        return {}  # a scaled-down vocabulary cannot carry the real tokenizer
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds4py convert", description=__doc__)
    p.add_argument("src", help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("out", help="output GGUF path")
    p.add_argument("--type", choices=sorted(TYPES), default="q8_0", help="matrix encoding")
    a = p.parse_args(argv)
    shape = convert(a.src, a.out, a.type)
    print(f"wrote {a.out}: {shape.n_layer} layers, width {shape.n_embd}, vocab {shape.n_vocab}")
    return 0
