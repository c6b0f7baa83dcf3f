"""The weight-math backend the model calls: `Ops.for_device(device)` picks it once.

Owns: backend selection (Triton kernels on CUDA when triton imports, the torch reference in
ds4py/quant/ref.py elsewhere) and load-time weight preparation. Does not own: the kernels
(ds4py/quant/triton/) or model logic. Every backend computes the same float32 function; see
ref.py for the exact semantics of `linear` and `moe`.
"""

from __future__ import annotations

import importlib.util

import torch
from gguf import GGMLQuantizationType as GQ

from ds4py.quant import ref
from ds4py.quant.formats import QTensor, quantize


class Ops:
    """Torch reference backend; `for_device` returns a faster subclass where one applies."""

    name = "torch"
    attn_dtype = torch.float32  # what attention / indexer rows are handed to `matmul` as

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    @staticmethod
    def for_device(device: torch.device | str) -> Ops:
        device = torch.device(device)
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            from ds4py.quant.triton.backend import TritonOps

            return TritonOps(device)
        return Ops(device)

    def prepare(self, w: QTensor) -> QTensor:
        """Once at load: move to the device; float weights become F32 so matmuls use them as-is."""
        w = w.to(self.device)
        if w.format.float_dtype is not None and w.qtype != GQ.F32:
            return quantize(w.dequantize(torch.float32), GQ.F32)
        return w

    def linear(self, x: torch.Tensor, w: QTensor) -> torch.Tensor:
        """x [T, in] (or grouped [T, G, in], MODEL.md §2.8) f32, w (out, in) -> [T, out] f32."""
        return ref.linear(x, w)

    def linears(self, x: torch.Tensor, ws: tuple[QTensor, ...]) -> tuple[torch.Tensor, ...]:
        """`linear(x, w)` for each w: products of one input (one launch where `merge` joined
        them)."""
        return tuple(self.linear(x, w) for w in ws)

    def merge(self, ws: list[QTensor]) -> list[QTensor]:
        """At load: weights that `linears` multiplies together; a backend may return them as
        views of one joined matrix (same values, same memory)."""
        return ws

    def moe(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        gate: QTensor,
        up: QTensor,
        down: QTensor,
        clamp: float,
    ) -> torch.Tensor:
        """Routed experts: x [T, D], ids/weights [T, k]; gate/up (E, F, D), down (E, D, F)."""
        return ref.moe(x, ids, weights, gate, up, down, clamp)

    def moe_shared(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: QTensor,
                   up: QTensor, down: QTensor, clamp: float, h: torch.Tensor,
                   w: QTensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(`moe(...)`, `linear(h, w)`): the routed experts and the shared expert's down
        projection, which a backend may run in the routed down launch."""
        return self.moe(x, ids, weights, gate, up, down, clamp), self.linear(h, w)

    def hc_pre(self, X, fn: QTensor, scale, base, norm_eps: float, hc_eps: float, iters: int):
        """mHC pre of streams X [T, hc, D] with mixing weight fn ((2+hc)*hc, hc*D): (u, post,
        comb). The projection runs on the raw streams; their RMS scales its outputs."""
        v = self.linear(X.flatten(1), fn)
        return ref.hc_pre(X, v, scale, base, norm_eps, hc_eps, iters)

    def route(self, logits, bias, k: int, scale: float):
        """Learned routing (MODEL.md §2.9): expert ids [T, k] and weights [T, k] (ref.route)."""
        return ref.route(logits, bias, k, scale)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b (broadcast batch dims) with a float32 result: attention and indexer products."""
        return torch.matmul(a.float(), b.float())

    def decode_kernels(self, reference: dict) -> dict:
        """The decode step's fused regions (model/decode.py `REFERENCE`: name -> function); a
        backend replaces those it has kernels for, keeping the signatures."""
        return dict(reference)

    def fuse(self, fn):
        """A pointwise region the model may run as fused kernels; the reference runs it as is."""
        return fn
