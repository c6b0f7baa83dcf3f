"""Synthetic DeepSeek V4 Flash weights: random valid blocks of the real types, any shape.

Used for the demo model (tiny, real tokenizer), for tests, and for full-size speed runs where the
real 81 GB file is not at hand (written as a GGUF, or generated straight into device memory).
Routing over random weights is roughly uniform, unlike a trained model. Owns the per-tensor type
table of the published q2/q4 layouts (MODEL.md §5.4); it does not compute anything.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import torch

from .config import Shape
from .gguf import GGMLType, PendingTensor, write_gguf
from .model.load import TensorSpec, tensor_specs
from .quant.formats import QTensor, quantize, random_qtensor, row_bytes

T = GGMLType
EXPERT_TYPES = {"q2": (T.IQ2_XXS, T.IQ2_XXS, T.Q2_K), "q4": (T.Q4_K, T.Q4_K, T.Q4_K)}
F16_MATRICES = (
    "hc_attn_fn",
    "hc_ffn_fn",
    "output_hc_fn",
    "attn_compressor_kv",
    "attn_compressor_gate",
    "indexer",
    "ffn_gate_inp",
    "token_embd",
)


def demo_shape() -> Shape:
    """Tiny but complete: raw, ratio-4 (indexer) and ratio-128 layers, hash and learned MoE."""
    return Shape(
        n_vocab=129280,
        n_embd=256,
        n_layer=4,
        n_head=4,
        head_dim=128,
        q_lora_rank=64,
        o_lora_rank=32,
        o_groups=2,
        n_expert=16,
        n_expert_used=6,
        n_ff_exp=256,
        n_hash_layer=3,
        n_indexer_head=4,
        indexer_top_k=16,
    )


def layout_type(spec: TensorSpec, quant: str, dense: GGMLType = T.Q8_0) -> GGMLType:
    """The GGUF type a tensor has in ds4's published files (`dense`: the Q8_0 ones)."""
    if spec.kind == "table":
        return T.I32
    if spec.kind == "vector":
        return T.F16 if "_ape" in spec.name else T.F32
    for i, part in enumerate(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
        if part in spec.name:
            return EXPERT_TYPES[quant][i]
    if any(p in spec.name for p in F16_MATRICES):
        return T.F16
    return dense


def synthetic_tensor(spec: TensorSpec, qtype: GGMLType, gen: torch.Generator) -> QTensor:
    """One random tensor on the generator's device: ~unit norms, 1/sqrt(fan-in) weights."""
    name, shape, dev = spec.name, spec.shape, gen.device
    if spec.kind == "vector":
        if name.endswith("norm.weight"):
            v = 1 + 0.1 * torch.randn(shape, generator=gen, device=dev)
        elif "scale" in name:
            v = 0.5 + 0.5 * torch.rand(shape, generator=gen, device=dev)
        else:
            v = 0.3 * torch.randn(shape, generator=gen, device=dev)
        return quantize(v, qtype)
    return random_qtensor(qtype, shape, gen, scale=1 / math.sqrt(shape[-1]))


def synthetic_tensors(
    shape: Shape, quant: str = "q2", seed: int = 0, dense: GGMLType = T.Q8_0, device="cpu"
) -> Iterator[tuple[TensorSpec, GGMLType, Callable[[], QTensor]]]:
    """(spec, type, maker) for every tensor; makers are deterministic per tensor and seed and
    create the tensor on `device` (on a GPU, 80 GB of weights are made in seconds)."""
    for i, spec in enumerate(tensor_specs(shape)):
        if spec.optional and spec.name.endswith("exp_probs_b.bias"):
            spec = TensorSpec(spec.name, spec.shape, spec.kind)
        qtype = layout_type(spec, quant, dense)

        def make(spec=spec, qtype=qtype, i=i) -> QTensor:
            gen = torch.Generator(device).manual_seed(seed * 100003 + i)
            if spec.kind == "table":
                r = torch.rand(spec.shape[0], shape.n_expert, generator=gen, device=gen.device)
                ids = r.argsort(-1)[:, : spec.shape[1]].to(torch.int32).contiguous()
                return QTensor(ids.view(torch.uint8).reshape(spec.shape[0], -1), T.I32, spec.shape)
            return synthetic_tensor(spec, qtype, gen)

        yield spec, qtype, make


def tokenizer_metadata(tokenizer_json: str | os.PathLike | None = None) -> dict:
    """A tokenizer.json (default: the official DeepSeek V4 one) as GGUF tokenizer keys."""
    from .tokenizer import vocab_from_tokenizer_json

    tokens, merges, types = vocab_from_tokenizer_json(tokenizer_json)
    return {
        "tokenizer.ggml.model": ("string", "gpt2"),
        "tokenizer.ggml.pre": ("string", "joyai-llm"),
        "tokenizer.ggml.tokens": ("array_string", tokens),
        "tokenizer.ggml.merges": ("array_string", merges),
        "tokenizer.ggml.token_type": ("array_int32", types),
    }


def write_synthetic(
    path: str | os.PathLike,
    shape: Shape,
    quant: str = "q2",
    seed: int = 0,
    dense: GGMLType = T.Q8_0,
    sparse: bool = False,
) -> None:
    """A GGUF of `shape` with random weights of the published types and the real tokenizer.

    sparse=True leaves the weights as zero-filled holes (the layout without the bytes).
    """
    md = shape.to_metadata()
    if shape.n_vocab == 129280:
        md.update(tokenizer_metadata())
    pending = [
        PendingTensor(
            spec.name,
            qtype,
            spec.shape,
            _nbytes(qtype, spec.shape),
            lambda m=make: m().data.cpu().numpy(),
        )
        for spec, qtype, make in synthetic_tensors(shape, quant, seed, dense)
    ]
    write_gguf(path, md, pending, sparse=sparse)


def _nbytes(qtype: GGMLType, shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) * row_bytes(qtype, shape[-1])


def main(argv: list[str] | None = None) -> int:
    """`ds4py synth OUT.gguf --quant q2|q4 [--layers N]`: a full-size file of random weights."""
    import argparse

    from .config import FLASH

    p = argparse.ArgumentParser(prog="ds4py synth", description=main.__doc__)
    p.add_argument("out", help="output GGUF path")
    p.add_argument("--quant", choices=sorted(EXPERT_TYPES), default="q2")
    p.add_argument("--layers", type=int, default=FLASH["n_layer"], help="first N layers only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparse", action="store_true", help="header only, weights left as zero holes")
    a = p.parse_args(argv)
    shape = Shape(**{**FLASH, "n_layer": a.layers})
    write_synthetic(a.out, shape, quant=a.quant, seed=a.seed, sparse=a.sparse)
    print(f"wrote {a.out}: {a.layers} layers, {a.quant}, {os.path.getsize(a.out) / 2**30:.2f} GiB")
    return 0
