"""Bind the tensors of a GGUF file to a `Transformer`, checking each one's type and shape.

The tensor table (`tensor_specs`) is derived from `Shape` and is the single statement of which
tensors a V4 Flash file holds; the converter, the demo model and synthetic weights write from it.
Attribute names are the GGUF names (`blk.3.indexer.proj.weight` -> `blk[3].indexer_proj`), so no
mapping table exists. Nothing here computes; weights stay in their GGUF encodings (see quant/).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..config import ModelFileError, Shape
from ..gguf import GGMLType, GGUFFile
from ..quant.formats import FORMATS, QTensor
from ..quant.ops import Ops
from .model import Transformer

# Types the engine runs; checked per tensor because ds4 files mix them.
SUPPORTED = {
    GGMLType.F32,
    GGMLType.F16,
    GGMLType.BF16,
    GGMLType.Q8_0,
    GGMLType.Q2_K,
    GGMLType.Q4_K,
    GGMLType.IQ2_XXS,
    GGMLType.I32,
}
FLOATS = {GGMLType.F32, GGMLType.F16, GGMLType.BF16}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # torch order
    kind: str  # "matrix" (QTensor), "vector" (f32 tensor), "table" (int)
    optional: bool = False


def tensor_specs(s: Shape) -> list[TensorSpec]:
    """Every tensor of a V4 Flash GGUF of shape `s` (MODEL.md §5.4), in file order."""
    M, V = "matrix", "vector"
    D, hd, E = s.n_embd, s.head_dim, s.n_expert
    hc = (2 + s.hc_mult) * s.hc_mult
    out = [
        TensorSpec("token_embd.weight", (s.n_vocab, D), M),
        TensorSpec("output.weight", (s.n_vocab, D), M),
        TensorSpec("output_norm.weight", (D,), V),
        TensorSpec("output_hc_fn.weight", (s.hc_mult, s.hc_dim), M),
        TensorSpec("output_hc_base.weight", (s.hc_mult,), V),
        TensorSpec("output_hc_scale.weight", (1,), V),
    ]
    for i in range(s.n_layer):
        r = s.ratio(i)
        coff = 2 if r == 4 else 1

        def t(suffix: str, shape: tuple[int, ...], kind: str = M, optional: bool = False, i=i):
            out.append(TensorSpec(f"blk.{i}.{suffix}", shape, kind, optional))

        t("hc_attn_fn.weight", (hc, s.hc_dim))
        t("hc_attn_scale.weight", (3,), V)
        t("hc_attn_base.weight", (hc,), V)
        t("attn_norm.weight", (D,), V)
        t("attn_q_a.weight", (s.q_lora_rank, D))
        t("attn_q_a_norm.weight", (s.q_lora_rank,), V)
        t("attn_q_b.weight", (s.n_head * hd, s.q_lora_rank))
        t("attn_kv.weight", (hd, D))
        t("attn_kv_a_norm.weight", (hd,), V)
        t("attn_sinks.weight", (s.n_head,), V)
        t("attn_output_a.weight", (s.o_groups * s.o_lora_rank, s.n_head * hd // s.o_groups))
        t("attn_output_b.weight", (D, s.o_groups * s.o_lora_rank))
        if r:
            t("attn_compressor_ape.weight", (r, coff * hd), V)
            t("attn_compressor_kv.weight", (coff * hd, D))
            t("attn_compressor_gate.weight", (coff * hd, D))
            t("attn_compressor_norm.weight", (hd,), V)
        if r == 4:
            ihd = s.indexer_head_dim
            t("indexer.attn_q_b.weight", (s.n_indexer_head * ihd, s.q_lora_rank))
            t("indexer.proj.weight", (s.n_indexer_head, D))
            t("indexer_compressor_ape.weight", (r, 2 * ihd), V)
            t("indexer_compressor_kv.weight", (2 * ihd, D))
            t("indexer_compressor_gate.weight", (2 * ihd, D))
            t("indexer_compressor_norm.weight", (ihd,), V)
        t("hc_ffn_fn.weight", (hc, s.hc_dim))
        t("hc_ffn_scale.weight", (3,), V)
        t("hc_ffn_base.weight", (hc,), V)
        t("ffn_norm.weight", (D,), V)
        t("ffn_gate_inp.weight", (E, D))
        if i < s.n_hash_layer:
            t("ffn_gate_tid2eid.weight", (s.n_vocab, s.n_expert_used), "table")
        else:
            t("exp_probs_b.bias", (E,), V, optional=True)
        t("ffn_gate_exps.weight", (E, s.n_ff_exp, D))
        t("ffn_up_exps.weight", (E, s.n_ff_exp, D))
        t("ffn_down_exps.weight", (E, D, s.n_ff_exp))
        t("ffn_gate_shexp.weight", (s.n_ff_exp, D))
        t("ffn_up_shexp.weight", (s.n_ff_exp, D))
        t("ffn_down_shexp.weight", (D, s.n_ff_exp))
    return out


def attr_name(name: str) -> tuple[int | None, str]:
    """'blk.3.indexer.proj.weight' -> (3, 'indexer_proj'); 'output.weight' -> (None, 'output')."""
    parts = name.split(".")
    layer = None
    if parts[0] == "blk":
        layer, parts = int(parts[1]), parts[2:]
    return layer, "_".join(parts[:-1])


def check_tensor(spec: TensorSpec, qtype: GGMLType, shape: tuple[int, ...]) -> None:
    if qtype not in SUPPORTED:
        raise ModelFileError(f"{spec.name}: unsupported tensor type {qtype.name}")
    if shape != spec.shape:
        raise ModelFileError(
            f"{spec.name}: expected shape {list(spec.shape)} (torch order), found {list(shape)}"
        )
    if spec.kind == "table" and qtype != GGMLType.I32:
        raise ModelFileError(f"{spec.name}: expected I32, found {qtype.name}")
    if spec.kind == "vector" and qtype not in FLOATS:
        raise ModelFileError(f"{spec.name}: expected F32/F16/BF16, found {qtype.name}")
    if spec.kind == "matrix" and qtype == GGMLType.I32:
        raise ModelFileError(f"{spec.name}: a weight matrix cannot be I32")
    block = FORMATS[qtype].block_elems
    if spec.shape[-1] % block:
        raise ModelFileError(
            f"{spec.name}: row of {spec.shape[-1]} is not a whole number of "
            f"{qtype.name} blocks ({block})"
        )


def file_tensors(f: GGUFFile) -> dict[str, Callable[[], QTensor]]:
    """Lazy QTensor views of a file's tensors, checked before they are wrapped."""

    def view(name: str) -> QTensor:
        info = f.tensors[name]
        if info.qtype not in SUPPORTED:
            raise ModelFileError(f"{name}: unsupported tensor type {info.qtype.name}")
        return QTensor.from_raw(f.tensor_bytes(name), info.qtype, info.shape)

    return {name: (lambda n=name: view(n)) for name in f.tensors}


def bind(
    model: Transformer,
    tensors: Mapping[str, Callable[[], QTensor]],
    ops: Ops,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Check every tensor against the spec and attach it to the model (name -> QTensor maker).

    Tensors go to the device one at a time straight from their source (the file's mapping), so
    the host never holds a copy of the weights; progress(done, total) counts tensors."""
    s = model.shape
    specs = tensor_specs(s)
    for i, spec in enumerate(specs):
        if progress:
            progress(i, len(specs))
        if spec.name not in tensors:
            if spec.optional:
                continue
            raise ModelFileError(f"missing tensor {spec.name}")
        q = tensors[spec.name]()
        check_tensor(spec, q.qtype, q.shape)
        layer, attr = attr_name(spec.name)
        target = model if layer is None else model.blk[layer]
        if spec.kind == "vector":
            value = q.to(device).dequantize()
        elif spec.kind == "table":
            value = q.to(device).dequantize().long()
        elif attr == "token_embd":
            value = q.to(device)  # rows are gathered, never multiplied
        else:
            value = ops.prepare(q)
        setattr(target, attr, value)
    for blk in model.blk:
        for names in blk.SHARED_INPUT:
            present = [n for n in names if getattr(blk, n, None) is not None]
            for n, w in zip(present, ops.merge([getattr(blk, n) for n in present]), strict=True):
                setattr(blk, n, w)
    if progress:
        progress(len(specs), len(specs))
