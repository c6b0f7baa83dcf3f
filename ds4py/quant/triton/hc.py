"""Fused mHC pre (MODEL.md §2.4) for decode and prefill: one launch per sublayer.

Given the 24 mixing logits `v = fn . X_flat` (the unnormalised projection, one GEMV/GEMM
before this), a program per token computes the RMS of its 4x4096 streams, the pre/post
weights, the 20-iteration Sinkhorn of the 4x4 combine matrix, and the collapsed sublayer
input u = sum_h pre_h X_h. The torch reference (`ds4py.quant.ref.hc_pre`) has the same
signature and is what the CPU runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4py.quant.ref import hc_pre as hc_pre_ref  # noqa: F401  (the reference, same signature)


@triton.jit
def _hc_pre_kernel(
    X, V, SCALE, BASE, U, POST, COMB, D, norm_eps, hc_eps, ITERS: tl.constexpr, BLOCK: tl.constexpr
):
    t = tl.program_id(0)
    x = X + t.to(tl.int64) * 4 * D
    # mean of squares over the 4 streams
    acc = tl.zeros((BLOCK,), tl.float32)
    for d0 in range(0, 4 * D, BLOCK):
        o = d0 + tl.arange(0, BLOCK)
        xv = tl.load(x + o, mask=o < 4 * D, other=0.0)
        acc += xv * xv
    r = 1.0 / tl.sqrt(tl.sum(acc, 0) / (4 * D) + norm_eps)
    h = tl.arange(0, 4)
    v = V + t * 24
    pre = tl.sigmoid(tl.load(v + h) * r * tl.load(SCALE) + tl.load(BASE + h)) + hc_eps
    post = 2.0 * tl.sigmoid(tl.load(v + 4 + h) * r * tl.load(SCALE + 1) + tl.load(BASE + 4 + h))
    idx = h[:, None] * 4 + h[None, :]
    c = tl.load(v + 8 + idx) * r * tl.load(SCALE + 2) + tl.load(BASE + 8 + idx)
    c = tl.exp(c - tl.max(c, 1)[:, None])
    c = c / tl.sum(c, 1)[:, None] + hc_eps
    c = c / (tl.sum(c, 0)[None, :] + hc_eps)
    for _ in range(ITERS - 1):
        c = c / (tl.sum(c, 1)[:, None] + hc_eps)
        c = c / (tl.sum(c, 0)[None, :] + hc_eps)
    tl.store(POST + t * 4 + h, post)
    tl.store(COMB + t * 16 + idx, c)
    u = U + t.to(tl.int64) * D
    p0 = tl.sum(tl.where(h == 0, pre, 0.0), 0)
    p1 = tl.sum(tl.where(h == 1, pre, 0.0), 0)
    p2 = tl.sum(tl.where(h == 2, pre, 0.0), 0)
    p3 = tl.sum(tl.where(h == 3, pre, 0.0), 0)
    for d0 in range(0, D, BLOCK):
        o = d0 + tl.arange(0, BLOCK)
        m = o < D
        s = p0 * tl.load(x + o, mask=m, other=0.0)
        s += p1 * tl.load(x + D + o, mask=m, other=0.0)
        s += p2 * tl.load(x + 2 * D + o, mask=m, other=0.0)
        s += p3 * tl.load(x + 3 * D + o, mask=m, other=0.0)
        tl.store(u + o, s, mask=m)


def hc_pre(X, v, scale, base, norm_eps: float, hc_eps: float, iters: int):
    """Launcher with the signature of hc_pre_ref (4 streams, float32, contiguous)."""
    T, hc, D = X.shape
    assert hc == 4 and v.shape == (T, 24), "the kernel is written for 4 streams"
    assert X.dtype == v.dtype == torch.float32 and scale.numel() == 3 and base.numel() == 24
    X, v = X.contiguous(), v.contiguous()
    u = torch.empty(T, D, device=X.device, dtype=torch.float32)
    post = torch.empty(T, 4, device=X.device, dtype=torch.float32)
    comb = torch.empty(T, 4, 4, device=X.device, dtype=torch.float32)
    _hc_pre_kernel[(T,)](
        X,
        v,
        scale.contiguous(),
        base.contiguous(),
        u,
        post,
        comb,
        D,
        norm_eps,
        hc_eps,
        ITERS=iters,
        BLOCK=1024,
        num_warps=4,
    )
    return u, post, comb
