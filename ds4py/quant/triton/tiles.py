"""Dequantize a [rows, BK] tile of a GGUF-encoded weight inside a Triton kernel.

Owns: per-format decoding of raw block bytes to float32 registers, shaped [BN, BK // GS, GS]
where GS is the format's scale-group size (`group_size`), so callers can reduce per group.
Does not own: any matmul or launch logic. Decoding follows MODEL.md §5.5 and gives exactly the
values of ds4py/quant/formats.py (up to FMA contraction in the final scale/min step).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as GQ

from ds4py.quant.formats import IQ2XXS_GRID

# ggml type ids used as the FMT constexpr of every kernel
F32, F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS = 0, 1, 30, 8, 10, 12, 16
SUPPORTED = (GQ.F32, GQ.F16, GQ.BF16, GQ.Q8_0, GQ.Q2_K, GQ.Q4_K, GQ.IQ2_XXS)
# elements that share one scale (the innermost tile dim); float formats use the whole tile
_GROUP = {GQ.Q8_0: 32, GQ.Q4_K: 32, GQ.Q2_K: 16, GQ.IQ2_XXS: 8}


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def group_size(qtype: GQ, bk: int) -> int:
    return _GROUP.get(qtype, bk)


def grid_table(device: torch.device | str) -> torch.Tensor:
    """IQ2_XXS magnitudes as int64 [256] (byte k = element k), passed to every kernel."""
    return torch.tensor(IQ2XXS_GRID, dtype=torch.int64, device=device)


@triton.jit
def _u2f(q):
    # int32 in [0, 2**23) -> float32 exactly; avoids the quarter-rate int->float convert
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _f16_at(ptr):
    return tl.load(ptr.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def _tile_float(w, row_off, k0, BK: tl.constexpr, DT: tl.constexpr):
    k = k0 + tl.arange(0, BK)
    ptr = (w + row_off[:, None]).to(tl.pointer_type(DT)) + k[None, :]
    return tl.load(ptr).to(tl.float32)[:, None, :]  # [BN, 1, BK]


@triton.jit
def _tile_q8_0(w, row_off, k0, BK: tl.constexpr):
    blk = k0 // 32 + tl.arange(0, BK // 32)
    boff = row_off[:, None] + blk.to(tl.int64)[None, :] * 34  # [BN, G]
    d = _f16_at(w + boff)
    q = tl.load(w + boff[:, :, None] + 2 + tl.arange(0, 32)[None, None, :]).to(tl.int32)
    # signed byte q: (q ^ 0x80) = q + 128 in [0, 256)
    qf = ((q ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    return qf * d[:, :, None]


@triton.jit
def _tile_q4_k(w, row_off, k0, BK: tl.constexpr):
    sj = k0 // 32 + tl.arange(0, BK // 32)  # global sub-block index
    j = sj % 8
    boff = row_off[:, None] + (sj // 8).to(tl.int64)[None, :] * 144  # [BN, G]
    d = _f16_at(w + boff)
    dmin = _f16_at(w + boff + 2)
    j4 = (j % 4)[None, :]
    a = tl.load(w + boff + 4 + j4).to(tl.int32)  # b[j % 4]
    c = tl.load(w + boff + 8 + j4).to(tl.int32)  # b[4 + j % 4]
    e = tl.load(w + boff + 8 + j[None, :]).to(tl.int32)  # b[j + 4]
    low = j[None, :] < 4
    sc = tl.where(low, a & 63, (e & 15) | ((a >> 6) << 4))
    mn = tl.where(low, c & 63, (e >> 4) | ((c >> 6) << 4))
    qoff = 16 + 32 * (j // 2)
    qb = tl.load(w + boff[:, :, None] + qoff[None, :, None] + tl.arange(0, 32)[None, None, :])
    q = (qb.to(tl.int32) >> (4 * (j % 2))[None, :, None]) & 15
    scale = d * sc.to(tl.float32)
    mins = dmin * mn.to(tl.float32)
    return scale[:, :, None] * _u2f(q) - mins[:, :, None]


@triton.jit
def _tile_q2_k(w, row_off, k0, BK: tl.constexpr):
    gs = k0 // 16 + tl.arange(0, BK // 16)  # global 16-element sub-block index
    s = gs % 16
    boff = row_off[:, None] + (gs // 16).to(tl.int64)[None, :] * 84  # [BN, G]
    d = _f16_at(w + boff + 80)
    dmin = _f16_at(w + boff + 82)
    sc = tl.load(w + boff + s[None, :]).to(tl.int32)
    # element 16s+l sits in byte 32*(s//8) + 16*(s%2) + l at bit plane (s%8)//2
    qoff = 16 + 32 * (s // 8) + 16 * (s % 2)
    qb = tl.load(w + boff[:, :, None] + qoff[None, :, None] + tl.arange(0, 16)[None, None, :])
    q = (qb.to(tl.int32) >> (2 * ((s % 8) // 2))[None, :, None]) & 3
    scale = d * (sc & 15).to(tl.float32)
    mins = dmin * (sc >> 4).to(tl.float32)
    return scale[:, :, None] * _u2f(q) - mins[:, :, None]


@triton.jit
def _tile_iq2_xxs(w, grid, row_off, k0, BK: tl.constexpr):
    go = k0 // 8 + tl.arange(0, BK // 8)  # global octet index (8 weights share a grid entry)
    o = go % 32
    g = o // 4
    sub = (o % 4)[None, :]
    boff = row_off[:, None] + (go // 32).to(tl.int64)[None, :] * 66  # [BN, G]
    d = _f16_at(w + boff)
    gidx = tl.load(w + boff + 2 + (8 * g + o % 4)[None, :])
    wptr = (w + boff + 6 + 8 * g[None, :]).to(tl.pointer_type(tl.uint16))
    bw = tl.load(wptr).to(tl.uint32) | (tl.load(wptr + 1).to(tl.uint32) << 16)
    db = d * (0.5 + (bw >> 28).to(tl.float32)) * 0.25
    sidx = ((bw >> (7 * sub).to(tl.uint32)) & 127).to(tl.int32)
    par = sidx ^ (sidx >> 4)
    par = par ^ (par >> 2)
    par = par ^ (par >> 1)
    mask = sidx | ((par & 1) << 7)  # 8th sign makes the count of minus signs even
    g64 = tl.load(grid + gidx.to(tl.int32))  # int64 [BN, G]
    k = tl.arange(0, 8)
    mag = ((g64[:, :, None] >> (8 * k).to(tl.int64)[None, None, :]) & 255).to(tl.int32)
    v = db[:, :, None] * _u2f(mag)
    neg = ((mask[:, :, None] >> k[None, None, :]) & 1) != 0
    return tl.where(neg, -v, v)


@triton.jit
def dequant_tile(w, grid, row_off, k0, FMT: tl.constexpr, BK: tl.constexpr):
    """float32 [BN, BK // GS, GS] of rows `row_off` (byte offsets), columns k0 .. k0+BK."""
    if FMT == 8:
        t = _tile_q8_0(w, row_off, k0, BK)
    elif FMT == 12:
        t = _tile_q4_k(w, row_off, k0, BK)
    elif FMT == 10:
        t = _tile_q2_k(w, row_off, k0, BK)
    elif FMT == 16:
        t = _tile_iq2_xxs(w, grid, row_off, k0, BK)
    elif FMT == 1:
        t = _tile_float(w, row_off, k0, BK, tl.float16)
    elif FMT == 30:
        t = _tile_float(w, row_off, k0, BK, tl.bfloat16)
    else:
        t = _tile_float(w, row_off, k0, BK, tl.float32)
    return t


@triton.jit
def _dequant_kernel(w, grid, out, K, RB, FMT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    t = tl.reshape(dequant_tile(w, grid, rows.to(tl.int64) * RB, k0, FMT, BK), (BN, BK))
    tl.store(out + rows.to(tl.int64)[:, None] * K + k0 + tl.arange(0, BK)[None, :], t)


def dequantize(data: torch.Tensor, qtype: GQ, ncols: int, grid: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, row_bytes] -> float32 [rows, ncols] through `dequant_tile` (tests, tools)."""
    qtype = GQ(qtype)
    if qtype not in SUPPORTED or data.dtype != torch.uint8 or data.ndim != 2:
        raise ValueError(
            f"dequantize: need uint8 [rows, row_bytes] of a supported type, got {qtype}"
        )
    rows = data.shape[0]
    bn = 1
    while bn < 16 and rows % (bn * 2) == 0:
        bn *= 2
    bk = 256 if ncols % 256 == 0 else 32
    out = torch.empty(rows, ncols, dtype=torch.float32, device=data.device)
    _dequant_kernel[(rows // bn, ncols // bk)](
        data.contiguous(), grid, out, ncols, data.shape[1], FMT=int(qtype), BN=bn, BK=bk
    )
    return out
