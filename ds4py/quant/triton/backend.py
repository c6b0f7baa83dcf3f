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
from ds4py.quant.triton.gemv import MAX_TOKENS, WIDE, gemv, gemv_pair
from ds4py.quant.triton.hc import MAX_TOKENS as HC_MAX_TOKENS
from ds4py.quant.triton.hc import hc_pre, hc_pre_fused
from ds4py.quant.triton.moe import moe_decode, moe_decode_shared
from ds4py.quant.triton.moe_prefill import moe_prefill
from ds4py.quant.triton.route import route
from ds4py.quant.triton.tiles import kernel_ok, prepared, tables


class TritonOps(Ops):
    name = "triton"
    attn_dtype = torch.float16

    def __init__(self, device: torch.device | str) -> None:
        super().__init__(device)
        self.tabs = tables(self.device)
        self._fused: dict = {}
        # merged groups: views' data pointers -> (one matrix per format, the members of each,
        # whether one launch takes both formats)
        self._groups: dict[tuple[int, ...], tuple] = {}
        self._dense_cache: dict[tuple, torch.Tensor] = {}

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
        if w.shape[0] % 32 and x.dim() == 2 and w.qtype == GQ.F16:
            # no tile fits the 24-row mHC projections: cuBLAS on float16 operands (the weight
            # is F16; the streams round like tf32), float32 sums and result
            return torch.mm(x.half(), self._dense(w).half().T, out_dtype=torch.float32)
        if w.shape[0] % 32:
            return ref.linear(x, w)
        return gemm(x, w, self.tabs)

    def _dense(self, w: QTensor) -> torch.Tensor:
        """float32 values of a small weight no kernel reads, decoded once (a decode step that
        dequantizes would copy host tables to the device: not capturable)."""
        key = (w.data.data_ptr(), w.shape)
        if key not in self._dense_cache:
            self._dense_cache[key] = w.dequantize()
        return self._dense_cache[key]

    def merge(self, ws: list[QTensor]) -> list[QTensor]:
        # one matrix per format of all its rows: decode runs one GEMV instead of 2-5 small
        # ones (each small GEMV pays ~3 us of ramp-up and tail for 1-9 MB of weights), and
        # one launch for two formats (Q8_0 projections with F16 compressors / router)
        kinds = list(dict.fromkeys(w.qtype for w in ws))
        if (
            len(ws) < 2
            or len({(w.qtype, w.layout) for w in ws}) != len(kinds)  # one layout per format
            or any(
                len(w.shape) != 2 or w.shape[1] != ws[0].shape[1] or not kernel_ok(w) for w in ws
            )
        ):
            return ws
        parts = [[i for i, w in enumerate(ws) if w.qtype == q] for q in kinds]
        # longer rows (F16 before Q8_0) first: their programs take longest (H200, with
        # gemv.pair_config's tilings: 0.3-1.2 us faster in all four two-format groups)
        parts.sort(key=lambda idx: -ws[idx[0]].data.shape[-1])
        out: list = [None] * len(ws)
        wholes = []
        for idx in parts:
            whole, views = _joined([ws[i] for i in idx])
            wholes.append(whole)
            for i, v in zip(idx, views, strict=True):
                out[i] = v
        paired = (
            len(kinds) == 2
            and all(q in WIDE for q in kinds)
            and ws[0].shape[1] % 256 == 0  # gemv_pair's rows kernel reads 256-value steps
        )
        self._groups[tuple(v.data.data_ptr() for v in out)] = (wholes, parts, paired)
        return out

    @torch.compiler.disable  # launched as written, also inside fused regions
    def linears(self, x: torch.Tensor, ws: tuple[QTensor, ...]) -> tuple[torch.Tensor, ...]:
        group = self._groups.get(tuple(w.data.data_ptr() for w in ws))
        if group is None:
            return tuple(self.linear(x, w) for w in ws)
        wholes, parts, paired = group
        x = x.contiguous()
        if paired and x.dim() == 2 and x.shape[0] == 1:  # decode: both formats, one launch
            ys = gemv_pair(x, *wholes, self.tabs)
        else:
            ys = [self.linear(x, w) for w in wholes]
        out: list = [None] * len(ws)
        for y, idx in zip(ys, parts, strict=True):
            for i, yi in zip(idx, y.split([ws[i].shape[0] for i in idx], dim=-1), strict=True):
                out[i] = yi
        return tuple(out)

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
            dense = tuple(self._dense(w) for w in (gate, up, down))
            return _moe_all_experts(x, ids, weights, *dense, clamp)
        if x.shape[0] <= MAX_TOKENS:
            return moe_decode(x, ids, weights, gate, up, down, clamp, self.tabs)
        return moe_prefill(x, ids, weights, gate, up, down, clamp, self.tabs)

    @torch.compiler.disable  # launched as written, also inside fused regions
    def moe_shared(self, x, ids, weights, gate, up, down, clamp, h, w):
        if x.shape[0] != 1 or not all(kernel_ok(v) for v in (gate, up, down, w)):
            return super().moe_shared(x, ids, weights, gate, up, down, clamp, h, w)
        return moe_decode_shared(x, ids, weights, gate, up, down, clamp, self.tabs, h, w)

    @torch.compiler.disable  # launched as written, also inside fused regions
    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # float16 tensor cores with float32 sums and result: cached K=V rows and indexer rows are
        # exact in float16; queries and probabilities round as they would in tf32
        a, b = a.half(), b.half()
        if b.dim() == 2:  # flatten, not reshape(-1, K): K is 0 for a part with no rows yet
            out = torch.mm(a.flatten(0, -2), b, out_dtype=torch.float32)
            return out.view(*a.shape[:-1], b.shape[-1])
        return torch.bmm(a, b, out_dtype=torch.float32)

    def decode_kernels(self, reference: dict) -> dict:
        # imported here: these kernels read the KV stores, which import the model package
        from ds4py.kv.state import FloatRows
        from ds4py.quant.triton.attend import attend_decode
        from ds4py.quant.triton.compress import compress_decode
        from ds4py.quant.triton.indexer import IndexerScratch, indexer_topk

        kernels = dict(reference)
        kernels["attend"] = torch.compiler.disable(attend_decode)
        scratch: dict[int, IndexerScratch] = {}  # by capacity: shared by the layers

        @torch.compiler.disable
        def topk(qi, w, rows, p, ratio, k):
            # the kernel's tensor-core tiles need >= 16 heads and >= 32 dims, powers of two
            hi, di = qi.shape
            if hi < 16 or di < 32 or hi & (hi - 1) or di & (di - 1):
                return reference["indexer_topk"](qi, w, rows, p, ratio, k)
            if rows.cap not in scratch:
                scratch[rows.cap] = IndexerScratch.new(rows.cap, qi.device)
            return indexer_topk(qi, w, rows, p, ratio, k, scratch=scratch[rows.cap])

        kernels["indexer_topk"] = topk

        def compress(a, b, ape, p, fr, norm, eps, cos, sin, rows, had, sim):
            if sim and type(rows) is FloatRows:  # rounded rows in a float store: tests only
                return reference["compress"](a, b, ape, p, fr, norm, eps, cos, sin, rows, had, sim)
            return compress_decode(a, b, ape, p, fr, norm, eps, cos, sin, rows, had, sim)

        kernels["compress"] = torch.compiler.disable(compress)
        return kernels

    def fuse(self, fn):
        # torch.compile turns each small region into one or two Triton kernels: decode is
        # launch-bound, and the compiled kernels are captured in the CUDA graph like any other.
        if fn not in self._fused:
            self._fused[fn] = torch.compile(fn, dynamic=None)
        return self._fused[fn]

    @torch.compiler.disable  # launched as written, also inside fused regions
    def route(self, logits, bias, k: int, scale: float):
        if logits.shape[0] > MAX_TOKENS:  # prefill: torch's top-k is fine at many tokens
            return super().route(logits, bias, k, scale)
        return route(logits, bias, k, scale)

    @torch.compiler.disable  # launched as written, also inside fused regions
    def hc_pre(self, X, fn: QTensor, scale, base, norm_eps: float, hc_eps: float, iters: int):
        if X.shape[1] == 4 and X.shape[0] <= HC_MAX_TOKENS and fn.qtype == GQ.F16:
            # decode: projection, norm and Sinkhorn in two launches of many programs
            return hc_pre_fused(X.contiguous(), fn, scale, base, norm_eps, hc_eps, iters)
        v = self.linear(X.flatten(1), fn)
        if X.shape[1] != 4:
            return ref.hc_pre(X, v, scale, base, norm_eps, hc_eps, iters)
        return hc_pre(X, v, scale, base, norm_eps, hc_eps, iters)


def _joined(ws: list[QTensor]) -> tuple[QTensor, list[QTensor]]:
    """(one matrix of all rows, each weight as a view of it) for weights of one format."""
    if len(ws) == 1:
        return ws[0], ws
    data = torch.cat([w.data for w in ws])
    whole = QTensor(data, ws[0].qtype, (data.shape[0], ws[0].shape[1]), ws[0].layout)
    views, r0 = [], 0
    for w in ws:
        views.append(QTensor(data[r0 : r0 + w.shape[0]], w.qtype, w.shape, w.layout))
        r0 += w.shape[0]
    return whole, views


def _moe_all_experts(x, ids, weights, g, u, d, clamp) -> torch.Tensor:
    """`ref.moe` without its host-side loop over the used experts (so a decode step stays
    capturable), on dense experts g, u [E, F, D], d [E, D, F], gathered per slot. Only for the
    small weights no kernel reads (e.g. IQ2_XXS rows of 256 values)."""
    xs = x[:, None, :, None]  # [T, 1, D, 1]
    h = ref.swiglu((g[ids] @ xs)[..., 0], (u[ids] @ xs)[..., 0], clamp) * weights[..., None]
    return (d[ids] @ h[..., None])[..., 0].sum(1)
