"""Model shape and runtime options.

`Shape` is every dimension of a DeepSeek V4 Flash file, read from GGUF metadata and validated
against the family rules of MODEL.md §1 and §5.3 (any size may be scaled down; the layer schedule,
window, ratios and RoPE layout may not). `EngineOptions` gathers every runtime switch in one place.
This module reads metadata values only; tensor shapes are checked by `model/load.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

ARCH = "deepseek4"


class ModelFileError(ValueError):
    """A model file that cannot be used, with the key or tensor that is wrong."""


# The published DeepSeek V4 Flash numbers; `Shape.is_flash` compares against them.
FLASH = dict(
    n_vocab=129280,
    n_embd=4096,
    n_layer=43,
    n_head=64,
    head_dim=512,
    q_lora_rank=1024,
    o_lora_rank=1024,
    o_groups=8,
    n_expert=256,
    n_expert_used=6,
    n_ff_exp=2048,
    n_hash_layer=3,
    n_indexer_head=64,
    indexer_top_k=512,
)


def flash_ratio(layer: int) -> int:
    """Compression ratio of a layer in the Flash schedule (MODEL.md §1.2)."""
    return 0 if layer < 2 else (4 if layer % 2 == 0 else 128)


@dataclass(frozen=True)
class Shape:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    head_dim: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_hash_layer: int
    n_indexer_head: int
    indexer_top_k: int
    n_rot: int = 64
    indexer_head_dim: int = 128
    window: int = 128
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    n_expert_shared: int = 1
    swiglu_clamp: float = 10.0
    rope_freq_base: float = 10000.0
    compress_rope_freq_base: float = 160000.0
    rope_scaling_factor: float = 16.0
    rope_orig_ctx: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    expert_weights_scale: float = 1.5
    norm_eps: float = 1e-6
    hc_eps: float = 1e-6
    context_length: int = 1048576
    compress_ratios: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.compress_ratios:
            object.__setattr__(
                self, "compress_ratios", tuple(flash_ratio(i) for i in range(self.n_layer))
            )
        self.validate()

    # ---- derived sizes ----
    @property
    def n_nope(self) -> int:
        return self.head_dim - self.n_rot

    @property
    def hc_dim(self) -> int:
        return self.hc_mult * self.n_embd

    @property
    def is_flash(self) -> bool:
        """Strict check: exactly the published V4 Flash shape."""
        return all(getattr(self, k) == v for k, v in FLASH.items())

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    # ---- validation ----
    def validate(self) -> None:
        def need(ok: bool, key: str, expected: Any, found: Any) -> None:
            if not ok:
                raise ModelFileError(f"{key}: expected {expected}, found {found}")

        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and f.name != "n_hash_layer":
                need(v > 0, f.name, "a positive value", v)
        need(
            len(self.compress_ratios) >= self.n_layer,
            "compress_ratios",
            f">= {self.n_layer} entries",
            len(self.compress_ratios),
        )
        for i in range(self.n_layer):
            need(
                self.compress_ratios[i] == flash_ratio(i),
                f"compress_ratios[{i}]",
                flash_ratio(i),
                self.compress_ratios[i],
            )
        need(self.n_rot == 64, "rope.dimension_count", 64, self.n_rot)
        need(self.n_nope % 64 == 0, "attention.key_length", "64 + a multiple of 64", self.head_dim)
        need(
            self.indexer_head_dim == 128, "attention.indexer.key_length", 128, self.indexer_head_dim
        )
        need(self.window == 128, "attention.sliding_window", 128, self.window)
        need(self.hc_mult == 4, "hyper_connection.count", 4, self.hc_mult)
        need(
            self.n_head % self.o_groups == 0,
            "attention.output_group_count",
            f"a divisor of head_count {self.n_head}",
            self.o_groups,
        )
        need(
            self.n_expert_used <= self.n_expert,
            "expert_used_count",
            f"<= {self.n_expert}",
            self.n_expert_used,
        )
        need(
            self.n_hash_layer <= self.n_layer,
            "hash_layer_count",
            f"<= {self.n_layer}",
            self.n_hash_layer,
        )
        need(self.n_expert_shared == 1, "expert_shared_count", 1, self.n_expert_shared)

    # ---- GGUF metadata ----
    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> Shape:
        """Build from a {key: value} metadata dict (values already decoded)."""

        def get(key: str, default: Any = None) -> Any:
            full = f"{ARCH}.{key}"
            if full not in md:
                if default is None:
                    raise ModelFileError(f"missing metadata key {full}")
                return default
            return md[full]

        def f32(key: str) -> float:
            # GGUF stores f32: take the shortest decimal that rounds to it (1e-6, not 9.99e-7)
            return float(f"{float(get(key)):.7g}")

        def floats(key: str, value: float) -> float:
            v = float(f"{float(get(key, value)):.7g}")
            if not math.isclose(v, value, rel_tol=1e-6, abs_tol=1e-12):
                raise ModelFileError(f"{ARCH}.{key}: expected {value}, found {v}")
            return v

        arch = md.get("general.architecture", ARCH)
        if arch != ARCH:
            raise ModelFileError(f"general.architecture: expected {ARCH!r}, found {arch!r}")
        if int(get("attention.head_count_kv")) != 1:
            raise ModelFileError(f"{ARCH}.attention.head_count_kv: expected 1")
        if int(get("attention.key_length")) != int(get("attention.value_length")):
            raise ModelFileError(f"{ARCH}.attention.value_length: expected key_length")
        for k in ("expert_group_count", "expert_group_used_count"):
            if int(get(k, 0)) != 0:
                raise ModelFileError(f"{ARCH}.{k}: expected 0, found {get(k)}")
        if not bool(get("expert_weights_norm", True)):
            raise ModelFileError(f"{ARCH}.expert_weights_norm: expected true")
        n_layer = int(get("block_count"))
        clamps = [float(f"{float(c):.7g}") for c in get("swiglu_clamp_exp")]
        if len(clamps) < n_layer or any(c != clamps[0] for c in clamps[:n_layer]):
            raise ModelFileError(f"{ARCH}.swiglu_clamp_exp: expected one value for all layers")
        return cls(
            n_vocab=int(get("vocab_size")),
            n_embd=int(get("embedding_length")),
            n_layer=n_layer,
            n_head=int(get("attention.head_count")),
            head_dim=int(get("attention.key_length")),
            n_rot=int(get("rope.dimension_count")),
            q_lora_rank=int(get("attention.q_lora_rank")),
            o_lora_rank=int(get("attention.output_lora_rank")),
            o_groups=int(get("attention.output_group_count")),
            n_expert=int(get("expert_count")),
            n_expert_used=int(get("expert_used_count")),
            n_ff_exp=int(get("expert_feed_forward_length")),
            n_expert_shared=int(get("expert_shared_count")),
            n_hash_layer=int(get("hash_layer_count")),
            window=int(get("attention.sliding_window")),
            n_indexer_head=int(get("attention.indexer.head_count")),
            indexer_head_dim=int(get("attention.indexer.key_length")),
            indexer_top_k=int(get("attention.indexer.top_k")),
            hc_mult=int(get("hyper_connection.count")),
            hc_sinkhorn_iters=int(get("hyper_connection.sinkhorn_iterations")),
            compress_ratios=tuple(int(r) for r in get("attention.compress_ratios")),
            swiglu_clamp=clamps[0],
            rope_orig_ctx=int(get("rope.scaling.original_context_length")),
            rope_freq_base=floats("rope.freq_base", 10000.0),
            rope_scaling_factor=floats("rope.scaling.factor", 16.0),
            yarn_beta_fast=floats("rope.scaling.yarn_beta_fast", 32.0),
            yarn_beta_slow=floats("rope.scaling.yarn_beta_slow", 1.0),
            compress_rope_freq_base=floats("attention.compress_rope_freq_base", 160000.0),
            expert_weights_scale=f32("expert_weights_scale"),
            norm_eps=f32("attention.layer_norm_rms_epsilon"),
            hc_eps=f32("hyper_connection.epsilon"),
            context_length=int(get("context_length", 1048576)),
        )

    def to_metadata(self) -> dict[str, tuple[str, Any]]:
        """Metadata keys -> (gguf type name, value), as ds4 expects them (MODEL.md §5.3)."""
        u32 = "uint32"
        f32 = "float32"
        a = f"{ARCH}."
        return {
            a + "block_count": (u32, self.n_layer),
            a + "context_length": ("uint64", self.context_length),
            a + "embedding_length": (u32, self.n_embd),
            a + "vocab_size": (u32, self.n_vocab),
            a + "attention.head_count": (u32, self.n_head),
            a + "attention.head_count_kv": (u32, 1),
            a + "attention.key_length": (u32, self.head_dim),
            a + "attention.value_length": (u32, self.head_dim),
            a + "rope.dimension_count": (u32, self.n_rot),
            a + "attention.q_lora_rank": (u32, self.q_lora_rank),
            a + "attention.output_lora_rank": (u32, self.o_lora_rank),
            a + "attention.output_group_count": (u32, self.o_groups),
            a + "expert_count": (u32, self.n_expert),
            a + "expert_used_count": (u32, self.n_expert_used),
            a + "expert_feed_forward_length": (u32, self.n_ff_exp),
            a + "expert_shared_count": (u32, 1),
            a + "hash_layer_count": (u32, self.n_hash_layer),
            a + "expert_group_count": (u32, 0),
            a + "expert_group_used_count": (u32, 0),
            a + "attention.sliding_window": (u32, self.window),
            a + "attention.indexer.head_count": (u32, self.n_indexer_head),
            a + "attention.indexer.key_length": (u32, self.indexer_head_dim),
            a + "attention.indexer.top_k": (u32, self.indexer_top_k),
            a + "hyper_connection.count": (u32, self.hc_mult),
            a + "hyper_connection.sinkhorn_iterations": (u32, self.hc_sinkhorn_iters),
            a + "attention.compress_ratios": ("array_uint32", list(self.compress_ratios)),
            a + "swiglu_clamp_exp": ("array_float32", [self.swiglu_clamp] * self.n_layer),
            a + "rope.scaling.original_context_length": (u32, self.rope_orig_ctx),
            a + "rope.freq_base": (f32, self.rope_freq_base),
            a + "rope.scaling.factor": (f32, self.rope_scaling_factor),
            a + "rope.scaling.yarn_beta_fast": (f32, self.yarn_beta_fast),
            a + "rope.scaling.yarn_beta_slow": (f32, self.yarn_beta_slow),
            a + "attention.compress_rope_freq_base": (f32, self.compress_rope_freq_base),
            a + "expert_weights_scale": (f32, self.expert_weights_scale),
            a + "attention.layer_norm_rms_epsilon": (f32, self.norm_eps),
            a + "hyper_connection.epsilon": (f32, self.hc_eps),
            a + "expert_weights_norm": ("bool", True),
        }


@dataclass(frozen=True)
class EngineOptions:
    """Every runtime option of the engine, one place."""

    device: str = "cpu"
    quant_sim: bool = True  # FP8 KV / FP4 indexer round trips and 16-bit cache rounding
    prefill_chunk: int = 0  # tokens per prefill chunk (ds4's ubatch); 0: 8192 on CUDA, else 2048
    checkpoints: int = 8  # frontier checkpoints kept per session for cheap rewinds
