"""Activation quantization for the int8 decode path: x -> int8 per 32 values, like ggml's Q8.

Owns: `quantize_act(x)` -> (q int8 [R, K], scale f32 [R, K/32], sum16 f32 [R, K/16]) with
q = round(x / scale), scale = max|x| / 127 per 32 values, and sum16 = scale * (sum of q) per 16
values, so a kernel using them computes exactly W @ x' with x' = q * scale (the min terms of the
K-quants included); its kernel and a torch reference. ds4 quantizes activations the same way on
its decode path. Does not own the dot products (rowdot.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quant_act_kernel(x, xq, xs, xsum, K, BK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * (BK // 32) + tl.arange(0, BK // 32)  # global 32-group index
    idx = g[:, None, None] * 32 + tl.arange(0, 2)[None, :, None] * 16 + tl.arange(0, 16)
    v = tl.load(x + r * K + idx)  # [G, 2, 16]
    amax = tl.max(tl.max(tl.abs(v), axis=2), axis=1)
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    q = tl.floor(v * inv[:, None, None] + 0.5)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    scale = amax / 127.0
    tl.store(xq + r * K + idx, q.to(tl.int8))
    tl.store(xs + r * (K // 32) + g, scale)
    sums = tl.sum(q, axis=2) * scale[:, None]
    tl.store(xsum + r * (K // 16) + 2 * g[:, None] + tl.arange(0, 2)[None, :], sums)


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 [R, K] (K % 32 == 0) -> (q int8 [R, K], scale [R, K/32], sum16 [R, K/16])."""
    if x.dtype != torch.float32 or x.ndim != 2 or x.shape[1] % 32 or not x.is_contiguous():
        raise ValueError(f"quantize_act: need contiguous float32 [R, K%32==0], got {x.shape}")
    rows, k = x.shape
    bk = 256 if k % 256 == 0 else 32
    xq = torch.empty(rows, k, dtype=torch.int8, device=x.device)
    xs = torch.empty(rows, k // 32, dtype=torch.float32, device=x.device)
    xsum = torch.empty(rows, k // 16, dtype=torch.float32, device=x.device)
    _quant_act_kernel[(rows, k // bk)](x, xq, xs, xsum, k, BK=bk, num_warps=2)
    return xq, xs, xsum


def quantize_act_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference with quantize_act's signature."""
    groups = x.view(x.shape[0], -1, 32)
    amax = groups.abs().amax(dim=2)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.floor(groups * inv[..., None] + 0.5).clamp(-127, 127)
    scale = amax / 127.0
    sums = q.view(x.shape[0], -1, 2, 16).sum(dim=3) * scale[..., None]
    return q.to(torch.int8).view_as(x), scale, sums.flatten(1)
