"""Activation quantization for the int8 decode path: x -> int8 per 32 values, like ggml's Q8.

Owns: `quantize_act(x)` -> (q int8 [R, K], scale f32 [R, K/32], sum16 f32 [R, K/16]) with
q = round(x / scale), scale = max|x| / 127 per 32 values, and sum16 = scale * (sum of q) per 16
values, so a kernel using them computes exactly W @ x' with x' = q * scale (the min terms of the
K-quants included); q optionally interleaved for kernels whose lanes each own a run of
8 * n values (`interleaved`); its kernel and a torch reference. ds4 quantizes activations the
same way on its decode path. Also the per-16 rounding of the one-token Q8_0 GEMV (`quantize16`:
packed int8 words, -128 * sum(q) and scale per 16 values, the operands gemv.py's `_rows_kernel`
reads) and its reference (`quantize16_ref`, `round16`). Does not own the dot products (rowdot.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4py.quant.triton.rowdot import quant16
from ds4py.quant.triton.tiles import interpreting


@triton.jit
def _quant_act_kernel(x, xq, xs, xsum, K, BK: tl.constexpr, IL: tl.constexpr,
                      PDL: tl.constexpr):  # fmt: skip
    if PDL:  # the next kernel may start (and fetch its weights) right away
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * (BK // 32) + tl.arange(0, BK // 32)  # global 32-group index
    idx = g[:, None, None] * 32 + tl.arange(0, 2)[None, :, None] * 16 + tl.arange(0, 16)
    v = tl.load(x + r * K + idx)  # [G, 2, 16]
    amax = tl.max(tl.max(tl.abs(v), axis=2), axis=1)
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    q = tl.floor(v * inv[:, None, None] + 0.5)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    scale = amax / 127.0
    if IL:  # piece j of owner o at (j * owners + o) * IL
        idx = ((idx // IL) % 8 * (K // (8 * IL)) + idx // (8 * IL)) * IL + idx % IL
    tl.store(xq + r * K + idx, q.to(tl.int8))
    tl.store(xs + r * (K // 32) + g, scale)
    sums = tl.sum(q, axis=2) * scale[:, None]
    tl.store(xsum + r * (K // 16) + 2 * g[:, None] + tl.arange(0, 2)[None, :], sums)


def quantize_act(
    x: torch.Tensor, interleave: int = 0, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 [R, K] (K % 32 == 0) -> (q int8 [R, K], scale [R, K/32], sum16 [R, K/16]);
    `interleave` n > 0 stores q as `interleaved(q, n)` does; `pdl` launches it as a
    programmatic dependent of the previous kernel (Hopper and later)."""
    _check_act(x, interleave)
    rows, k = x.shape
    bk = 256 if k % 256 == 0 else 32
    xq = torch.empty(rows, k, dtype=torch.int8, device=x.device)
    xs = torch.empty(rows, k // 32, dtype=torch.float32, device=x.device)
    xsum = torch.empty(rows, k // 16, dtype=torch.float32, device=x.device)
    _quant_act_kernel[(rows, k // bk)](
        x, xq, xs, xsum, k, BK=bk, IL=interleave, PDL=pdl, num_warps=2, launch_pdl=pdl
    )
    return xq, xs, xsum


def _check_act(x: torch.Tensor, interleave: int) -> None:
    if x.dtype != torch.float32 or x.ndim != 2 or x.shape[1] % 32 or not x.is_contiguous():
        raise ValueError(f"quantize_act: need contiguous float32 [R, K%32==0], got {x.shape}")
    if interleave not in (0, 4, 16) or interleave and x.shape[1] % (8 * interleave):
        raise ValueError(f"quantize_act: interleave {interleave} (0, 4 or 16) for K {x.shape[1]}")


def interleaved(q: torch.Tensor, n: int) -> torch.Tensor:
    """q [R, K] with each run of 8 * n values (one lane's: an IQ2_XXS group for n = 4, a K-quant
    unit of 128 for n = 16) cut in 8 pieces of n and piece j of every run stored together, so
    a warp loading piece j of 32 runs reads one contiguous span instead of 32 strided ones."""
    r, k = q.shape
    return q.view(r, k // (8 * n), 8, n).transpose(1, 2).reshape(r, k)


def quantize_act_ref(
    x: torch.Tensor, interleave: int = 0, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference with quantize_act's signature (`pdl`, a launch option, does nothing)."""
    _check_act(x, interleave)
    groups = x.view(x.shape[0], -1, 32)
    amax = groups.abs().amax(dim=2)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.floor(groups * inv[..., None] + 0.5).clamp(-127, 127)
    scale = amax / 127.0
    sums = q.view(x.shape[0], -1, 2, 16).sum(dim=3) * scale[..., None]
    q = q.to(torch.int8).view_as(x)
    return (interleaved(q, interleave) if interleave else q), scale, sums.flatten(1)


@triton.jit
def _quant16_kernel(x, xq, xb, xd, K, NV: tl.constexpr, PDL: tl.constexpr,
                    EMULATE: tl.constexpr):  # fmt: skip
    if PDL:  # the GEMV after this one may start (and fetch its weights) right away
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    r = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1) * (16 * NV)
    w0, w1, w2, w3, bias, dq = quant16(x + r * K, k0, NV, EMULATE)
    run = k0 // 16 + tl.arange(0, NV)
    words = xq + r * (K // 4) + 4 * run
    tl.store(words, w0)
    tl.store(words + 1, w1)
    tl.store(words + 2, w2)
    tl.store(words + 3, w3)
    tl.store(xb + r * (K // 16) + run, bias)
    tl.store(xd + r * (K // 16) + run, dq)


def quantize16(x: torch.Tensor, pdl: bool = False) -> tuple[torch.Tensor, ...]:
    """x float32 [R, K] (K % 256 == 0) -> (int8 words int32 [R, K/4], -128 * sum(q) int32
    [R, K/16], scale [R, K/16]), `quantize16_ref`'s rounding; `pdl` launches it as a
    programmatic dependent of the previous kernel (Hopper and later)."""
    if x.dtype != torch.float32 or x.ndim != 2 or x.shape[1] % 256 or not x.is_contiguous():
        raise ValueError(f"quantize16: need contiguous float32 [R, K%256==0], got {x.shape}")
    rows, k = x.shape
    nv = 16 if k % 1024 else 64
    xq = torch.empty(rows, k // 4, dtype=torch.int32, device=x.device)
    xb = torch.empty(rows, k // 16, dtype=torch.int32, device=x.device)
    xd = torch.empty(rows, k // 16, dtype=torch.float32, device=x.device)
    _quant16_kernel[(rows, k // (16 * nv))](
        x, xq, xb, xd, k, NV=nv, PDL=pdl, EMULATE=interpreting(), num_warps=max(1, nv // 32),
        launch_pdl=pdl,
    )  # fmt: skip
    return xq, xb, xd


def quantize16_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [..., K] (K % 16 == 0) -> (q int8 [..., K], scale [..., K/16]): per 16 values
    q = round_half_even(x * (127 / amax)), scale = amax * float32(1 / 127), as rowdot.py
    `quant16` computes them (each thread owns 16 values, so no cross-thread max)."""
    if x.dtype != torch.float32 or x.shape[-1] % 16:
        raise ValueError(f"quantize16_ref: need float32 [..., K%16==0], got {x.dtype} {x.shape}")
    runs = x.reshape(*x.shape[:-1], -1, 16)
    amax = runs.abs().amax(dim=-1)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    inv = torch.where(amax > 0, 127.0 / safe, torch.zeros_like(amax))
    q = torch.round(runs * inv[..., None])
    scale = amax * torch.tensor(1.0 / 127.0, dtype=torch.float32, device=x.device)
    return q.to(torch.int8).view_as(x), scale


def round16(x: torch.Tensor) -> torch.Tensor:
    """x as the Q8_0 GEMV sees it: int8 per 16 values times the scale (float32)."""
    q, scale = quantize16_ref(x)
    return (q.float().view(*scale.shape, 16) * scale[..., None]).view_as(x)
