"""`TritonOps`: the CUDA backend, binding the Triton kernels into the `Ops` interface.

Owns: dispatch by token count (GEMV / decode MoE for <= 8 tokens, tensor-core GEMM / grouped
MoE above) and the device-resident IQ2_XXS tables. Does not own: kernels (gemv.py, gemm.py,
moe.py) or semantics (ds4py/quant/ref.py, which the CPU backend runs).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as GQ

from ds4py.quant import ref
from ds4py.quant.formats import QTensor
from ds4py.quant.ops import Ops
from ds4py.quant.triton.gemm import gemm
from ds4py.quant.triton.gemv import MAX_TOKENS, gemv
from ds4py.quant.triton.hc import hc_pre
from ds4py.quant.triton.moe import moe_decode, moe_prefill
from ds4py.quant.triton.tiles import kernel_ok, prepared, tables


class TritonOps(Ops):
    name = "triton"

    def __init__(self, device: torch.device | str) -> None:
        super().__init__(device)
        self.tabs = tables(self.device)
        self._fused: dict = {}

    def prepare(self, w: QTensor) -> QTensor:
        """Move to the device and regroup block bytes per row (split layout, same size);
        float weights keep their encoding (F16 stays F16: half the bytes of F32)."""
        return prepared(w.to(self.device))

    @torch.compiler.disable  # launched as written, also inside fused regions
    def linear(self, x: torch.Tensor, w: QTensor) -> torch.Tensor:
        ref.check_linear(x, w)
        if not kernel_ok(w) or w.qtype == GQ.F32:
            return ref.linear(x, w)
        x = x.contiguous()
        if x.shape[0] <= MAX_TOKENS:
            return gemv(x, w, self.tabs)
        if w.shape[0] % 32:  # no tensor-core tiling for e.g. the 24-row mHC projections
            return ref.linear(x, w)
        return gemm(x, w, self.tabs)

    @torch.compiler.disable  # launched as written, also inside fused regions
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
        if not all(kernel_ok(w) for w in (gate, up, down)):
            return ref.moe(x, ids, weights, gate, up, down, clamp)
        if x.shape[0] <= MAX_TOKENS:
            return moe_decode(x, ids, weights, gate, up, down, clamp, self.tabs)
        return moe_prefill(x, ids, weights, gate, up, down, clamp, self.tabs)

    def fuse(self, fn):
        # torch.compile turns each small region into one or two Triton kernels: decode is
        # launch-bound, and the compiled kernels are captured in the CUDA graph like any other.
        if fn not in self._fused:
            self._fused[fn] = torch.compile(fn, dynamic=None)
        return self._fused[fn]

    @torch.compiler.disable  # launched as written, also inside fused regions
    def hc_pre(self, X, v, scale, base, norm_eps: float, hc_eps: float, iters: int):
        if X.shape[1] != 4:
            return ref.hc_pre(X, v, scale, base, norm_eps, hc_eps, iters)
        return hc_pre(X, v, scale, base, norm_eps, hc_eps, iters)
