"""Fused routed-MoE router for the learned-routing layers (MODEL.md §2.9, steps 1-3): one launch.

From the router logits [T, E] a program per token computes scores sqrt(softplus(logits)), picks
the k largest of scores + bias (descending; exact ties: lower expert id first) and the
normalised, scaled unbiased weights. `route_ref` is the torch reference with the same signature,
written after Block.moe's lines (with a stable sort so that ties are defined). The router GEMV
before and the expert GEMVs after are not here; hash-routed layers do not use this.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ds4py.quant import ref

WEIGHT_SUM_MIN = 6.1035e-5  # Block.moe's clamp of the weight sum (smallest normal float16)


# ---- Reference ----


def route_ref(logits: Tensor, bias: Tensor, k: int, scale: float) -> tuple[Tensor, Tensor]:
    """Block.moe's learned routing (`ds4py.quant.ref.route`), with the launcher's checks."""
    _check(logits, bias, k)
    return ref.route(logits, bias, k, scale)


def _check(logits: Tensor, bias: Tensor, k: int) -> None:
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"route: logits must be float32 [T, E], got {logits.dtype} {logits.shape}")
    E = logits.shape[1]
    if bias.shape != (E,) or bias.dtype != torch.float32:
        raise ValueError(f"route: bias must be float32 [{E}], got {bias.dtype} {tuple(bias.shape)}")
    if bias.device != logits.device:
        raise ValueError(f"route: bias on {bias.device}, logits on {logits.device}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"route: k must be an int in 1..{E} (the expert count), got {k!r}")


# ---- Kernel ----


@triton.jit
def _route_kernel(
    L,
    B,
    IDS,
    W,
    E,
    stride_l,
    scale,
    sum_min,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK)
    live = e < E
    x = tl.load(L + t.to(tl.int64) * stride_l + e, mask=live, other=0.0)
    # torch's softplus (beta 1, threshold 20); libdevice expf/log1pf are what torch's CUDA op calls
    if LIBDEVICE:
        sp = libdevice.log1p(libdevice.exp(x))
    else:  # the interpreter has no libdevice: log1p(u) = log(1 + u) * u / ((1 + u) - 1), exact-ish
        u = tl.exp(x)
        v = 1.0 + u
        sp = tl.where(v == 1.0, u, tl.log(v) * tl.div_rn(u, tl.where(v == 1.0, 1.0, v - 1.0)))
    s = tl.sqrt_rn(tl.where(x > 20.0, x, sp))  # [BLOCK] scores
    key = s + tl.load(B + e, mask=live, other=0.0)
    taken = e >= E  # padding lanes never win
    j = tl.arange(0, KP)
    ids = tl.zeros((KP,), tl.int32)
    w = tl.zeros((KP,), tl.float32)
    for i in tl.static_range(K):
        m = tl.max(tl.where(taken, -float("inf"), key), 0)
        # lowest id among equal keys; a NaN maximum falls back to the lowest free id (in range)
        free = ~taken
        pick = tl.min(tl.where(tl.where(m == m, key == m, free) & free, e, BLOCK), 0)
        hit = e == pick
        taken = taken | hit
        ids = tl.where(j == i, pick, ids)
        w = tl.where(j == i, tl.sum(tl.where(hit, s, 0.0), 0), w)
    total = tl.maximum(tl.sum(w, 0), sum_min)
    out = t * K + j
    tl.store(IDS + out, ids.to(tl.int64), mask=j < K)
    tl.store(W + out, tl.div_rn(scale * w, total), mask=j < K)


def route(logits: Tensor, bias: Tensor, k: int, scale: float) -> tuple[Tensor, Tensor]:
    """Launcher with route_ref's signature: one program per token, no host sync (graph-safe)."""
    _check(logits, bias, k)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    T, E = logits.shape
    ids = torch.empty(T, k, device=logits.device, dtype=torch.int64)
    w = torch.empty(T, k, device=logits.device, dtype=torch.float32)
    if T == 0:
        return ids, w
    block = triton.next_power_of_2(E)
    _route_kernel[(T,)](
        logits,
        bias.contiguous(),
        ids,
        w,
        E,
        logits.stride(0),
        float(scale),
        WEIGHT_SUM_MIN,
        K=k,
        KP=triton.next_power_of_2(k),
        BLOCK=block,
        LIBDEVICE=logits.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1",
        num_warps=max(1, min(8, block // 256)),
    )
    return ids, w
