"""Routed-expert FFN for prefill: grouped GEMMs whose weight tiles are decoded to float16.

Owns: the many-token routed MoE (same math and signature as moe.py's `moe_ref`): slots sorted
by expert, one program per (token tile of one expert, block of weight rows), and the float16
weight tiles it multiplies. The weight is the MMA's M side ("swap AB": out^T = W @ x^T), so an
expert with ~48 tokens fills a 64-wide N side instead of wasting a 128-row token tile.
Tiles are built two values per 32-bit word: a byte permute turns 2-4 bit codes into float16
integers (exact), then one f16x2 multiply-add applies the block scale and min, so a weight
costs ~2-3 instructions instead of ~20 for the float32 decode in tiles.py. Each weight is the
GGUF value rounded once or twice to float16 (11-bit mantissa; tiles.py's bf16 tiles keep 8).
Does not own: routing (the model), decode-time experts (moe.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4py.quant.formats import QTensor
from ds4py.quant.triton import moe_hopper
from ds4py.quant.triton.moe import _check, moe_ref
from ds4py.quant.triton.tiles import (
    clamped_swiglu,
    dequant_tile,
    f16_at,
    interpreting,
    prepared,
    signed_mags,
)

__all__ = ["moe_prefill", "moe_prefill_config", "moe_ref", "dequant_f16"]


# ---- Half-pair arithmetic (PTX on the GPU, the same integer/float math in the interpreter) ----


@triton.jit
def _f16_bits(v):
    """float32 -> its float16 bit pattern in the low half of an int32 (round to nearest)."""
    return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def half2(v):
    """float32 -> int32 word holding float16(v) in both halves (an f16x2 operand)."""
    b = _f16_bits(v)
    return b | (b << 16)


@triton.jit
def _emu_pair(b0, b1, bias, a2, c2):
    # float16((b - bias) * a + c) per half, with a, c the halves of a2, c2 (interpreter path)
    a = (a2 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    c = (c2 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    lo = _f16_bits((b0 - bias).to(tl.float32) * a + c)
    hi = _f16_bits((b1 - bias).to(tl.float32) * a + c)
    return lo | (hi << 16)


@triton.jit
def byte_pairs(w, a2, c2, BIAS: tl.constexpr, EMULATE: tl.constexpr):
    """Bytes 0-3 of int32 `w` (values BIAS + v) -> two f16x2 words (v0, v1), (v2, v3), each
    value v * a + c with a, c from the f16x2 words a2, c2: a byte permute makes the float16
    1024 + byte exactly, one f16x2 subtract leaves v, one f16x2 fma scales it."""
    if EMULATE:
        p0 = _emu_pair(w & 255, (w >> 8) & 255, BIAS, a2, c2)
        p1 = _emu_pair((w >> 16) & 255, (w >> 24) & 255, BIAS, a2, c2)
    else:
        m = tl.zeros_like(w) + (0x64006400 + BIAS * 0x10001)  # f16x2 (1024 + BIAS, same)
        p0, p1 = tl.inline_asm_elementwise(
            """{
            prmt.b32 $0, $2, 0x64646464, 0x4140;
            prmt.b32 $1, $2, 0x64646464, 0x4342;
            sub.f16x2 $0, $0, $5;
            sub.f16x2 $1, $1, $5;
            fma.rn.f16x2 $0, $0, $3, $4;
            fma.rn.f16x2 $1, $1, $3, $4;
            }""",
            "=r,=r,r,r,r,r", [w, a2, c2, m], dtype=(tl.int32, tl.int32), is_pure=True, pack=1,
        )  # fmt: skip
    return p0, p1


@triton.jit
def _halves(p0, p1, p2, p3):
    """Four f16x2 words (values 2i, 2i+1 in word i) -> float16 [..., 8] in value order."""
    j = tl.join(tl.join(p0, p2), tl.join(p1, p3))  # [..., h, q] = word 2h + q
    lo = (j & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (j >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.join(lo, hi)  # [..., 2, 2, 2]: value 4h + 2q + e


# ---- float16 weight tiles [BN, BK] (split layout rows at byte offsets row_off) ----------------


@triton.jit
def _tile16_iq2_xxs(w, tabs, row_off, K, k0, BK: tl.constexpr, EMULATE: tl.constexpr):
    G: tl.constexpr = BK // 32
    gg = k0 // 32 + tl.arange(0, G)  # 32-weight groups: words A (grid), B (signs, scale)
    wp = (w + row_off[:, None] + 8 * gg[None, :]).to(tl.pointer_type(tl.int32))
    a, bu = tl.load(wp), tl.load(wp + 1).to(tl.uint32, bitcast=True)
    d = f16_at(w + row_off[:, None] + K // 4 + 2 * (gg // 8)[None, :])
    a2 = half2(d * ((bu >> 27) | 1).to(tl.float32) * 0.125)  # d * (2 * scale + 1) / 8
    sub = tl.arange(0, 4)[None, None, :]  # octet of the group
    tab32 = (tabs + 256).to(tl.pointer_type(tl.int32))
    sel = tl.load(tab32 + ((a[:, :, None] >> (8 * sub)) & 255))
    sel |= tl.load(tab32 + 256 + ((bu[:, :, None] >> (7 * sub).to(tl.uint32)) & 127).to(tl.int32))
    flip = -0x7F7F7F80  # int32 0x80808080: signed bytes v -> 128 + v
    lo = signed_mags(sel, EMULATE) ^ flip  # weights 0-3
    hi = signed_mags(sel >> 16, EMULATE) ^ flip
    a2, z = a2[:, :, None], tl.zeros_like(sel)
    p0, p1 = byte_pairs(lo, a2, z, 128, EMULATE)
    p2, p3 = byte_pairs(hi, a2, z, 128, EMULATE)
    return tl.reshape(_halves(p0, p1, p2, p3), (row_off.shape[0], BK))


@triton.jit
def _tile16_q2_k(w, row_off, K, k0, BK: tl.constexpr, EMULATE: tl.constexpr):
    S: tl.constexpr = BK // 16
    gs = k0 // 16 + tl.arange(0, S)  # 16-weight sub-blocks
    b, s = gs // 16, gs % 16
    sc = tl.load(w + row_off[:, None] + K // 4 + 16 * b[None, :] + s[None, :]).to(tl.int32)
    dm = w + row_off[:, None] + K // 4 + 16 * (K // 256) + 4 * b[None, :]
    a2 = half2(f16_at(dm) * (sc & 15).to(tl.float32))[:, :, None]
    c2 = half2(-f16_at(dm + 2) * (sc >> 4).to(tl.float32))[:, :, None]
    # value 16s + l: byte 32 (s // 8) + 16 (s % 2) + l of the block's quants, bit plane (s % 8) // 2
    qoff = 64 * b + 32 * (s // 8) + 16 * (s % 2)
    wp = (w + row_off[:, None, None] + qoff[None, :, None]).to(tl.pointer_type(tl.int32))
    q = tl.load(wp + tl.arange(0, 4)[None, None, :])  # [BN, S, 4] words of 4 values
    q = (q >> (2 * ((s % 8) // 2))[None, :, None]) & 0x03030303
    p0, p1 = byte_pairs(q, a2, c2, 0, EMULATE)
    j = tl.join(p0, p1)  # [BN, S, 4, 2]
    t = tl.join((j & 0xFFFF).to(tl.int16), (j >> 16).to(tl.int16)).to(tl.float16, bitcast=True)
    return tl.reshape(t, (row_off.shape[0], BK))


@triton.jit
def _tile16_q4_k(w, row_off, K, k0, BK: tl.constexpr, EMULATE: tl.constexpr):
    J: tl.constexpr = BK // 32
    sj = k0 // 32 + tl.arange(0, J)  # 32-weight sub-blocks
    b, j = sj // 8, sj % 8
    scb = w + row_off[:, None] + K // 2 + 12 * b[None, :]
    j4 = (j % 4)[None, :]
    lo6, mid, hi4 = tl.load(scb + j4), tl.load(scb + 4 + j4), tl.load(scb + 8 + j4)
    lo6, mid, hi4 = lo6.to(tl.int32), mid.to(tl.int32), hi4.to(tl.int32)
    low = j[None, :] < 4
    sc = tl.where(low, lo6 & 63, (hi4 & 15) | ((lo6 >> 6) << 4))
    mn = tl.where(low, mid & 63, (hi4 >> 4) | ((mid >> 6) << 4))
    dm = w + row_off[:, None] + K // 2 + 12 * (K // 256) + 4 * b[None, :]
    a2 = half2(f16_at(dm) * sc.to(tl.float32))[:, :, None]
    c2 = half2(-f16_at(dm + 2) * mn.to(tl.float32))[:, :, None]
    # value 32j + l: byte 32 (j // 2) + l of the block's quants, nibble j % 2
    qoff = 128 * b + 32 * (j // 2)
    wp = (w + row_off[:, None, None] + qoff[None, :, None]).to(tl.pointer_type(tl.int32))
    q = tl.load(wp + tl.arange(0, 8)[None, None, :])  # [BN, J, 8]
    q = (q >> (4 * (j % 2))[None, :, None]) & 0x0F0F0F0F
    p0, p1 = byte_pairs(q, a2, c2, 0, EMULATE)
    t = tl.join(p0, p1)
    t = tl.join((t & 0xFFFF).to(tl.int16), (t >> 16).to(tl.int16)).to(tl.float16, bitcast=True)
    return tl.reshape(t, (row_off.shape[0], BK))


@triton.jit
def tile16(w, tabs, row_off, K, k0, FMT: tl.constexpr, BK: tl.constexpr, EMULATE: tl.constexpr):
    """float16 [BN, BK]: rows at byte offsets `row_off`, columns k0 .. k0 + BK."""
    if FMT == 16:
        t = _tile16_iq2_xxs(w, tabs, row_off, K, k0, BK, EMULATE)
    elif FMT == 10:
        t = _tile16_q2_k(w, row_off, K, k0, BK, EMULATE)
    elif FMT == 12:
        t = _tile16_q4_k(w, row_off, K, k0, BK, EMULATE)
    else:
        t = dequant_tile(w, tabs, row_off, K, k0, FMT, BK).to(tl.float16)
    return t


@triton.jit
def _dot(a, b, acc, EMULATE: tl.constexpr):
    if EMULATE:  # the interpreter's float16 dot is not float32-accumulated
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# ---- Kernels ---------------------------------------------------------------------------------


@triton.jit
def _tile(tiles, BM: tl.constexpr):
    """This program's tile: (expert, sorted rows [BM], valid [BM], any row valid)."""
    r = tl.program_id(0)
    e = tl.load(tiles + 3 * r).to(tl.int64)
    start, end = tl.load(tiles + 3 * r + 1), tl.load(tiles + 3 * r + 2)
    rows = start + tl.arange(0, BM)
    return e, rows, rows < end, start < end


@triton.jit
def _gate_up_kernel(
    xh, order, wts, tiles, gate, up, tabs, h, F, D, RB, clamp,
    KTOP: tl.constexpr, FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    e, rows, valid, live = _tile(tiles, BM)
    if not live:  # the grid is sized for the most tiles any routing can make
        return
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    row_off = (e * F + rn) * RB
    slot = tl.load(order + rows, mask=valid, other=0)
    xcol = xh + (slot // KTOP).to(tl.int64)[None, :] * D  # token rows as columns
    kk = tl.arange(0, BK)[:, None]
    acc_g = tl.zeros([BN, BM], dtype=tl.float32)
    acc_u = tl.zeros([BN, BM], dtype=tl.float32)
    for k0 in range(0, D, BK):
        xt = tl.load(xcol + k0 + kk)  # [BK, BM] float16
        acc_g = _dot(tile16(gate, tabs, row_off, D, k0, FMT, BK, EMULATE), xt, acc_g, EMULATE)
        acc_u = _dot(tile16(up, tabs, row_off, D, k0, FMT, BK, EMULATE), xt, acc_u, EMULATE)
    hv = clamped_swiglu(acc_g, acc_u, clamp) * tl.load(wts + slot, mask=valid, other=0)[None, :]
    dst = h + rows.to(tl.int64)[None, :] * F + rn[:, None]
    tl.store(dst, hv.to(tl.float16), mask=valid[None, :])


@triton.jit
def _down_kernel(
    h, order, tiles, down, tabs, y, D, F, RB,
    FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EMULATE: tl.constexpr,
):  # fmt: skip
    e, rows, valid, live = _tile(tiles, BM)
    if not live:
        return
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    row_off = (e * D + rn) * RB
    hcol = h + tl.where(valid, rows, 0).to(tl.int64)[None, :] * F
    kk = tl.arange(0, BK)[:, None]
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k0 in range(0, F, BK):
        acc = _dot(tile16(down, tabs, row_off, F, k0, FMT, BK, EMULATE), tl.load(hcol + k0 + kk),
                   acc, EMULATE)  # fmt: skip
    slot = tl.load(order + rows, mask=valid, other=0)  # results go straight to (token, slot) rows
    tl.store(y + slot.to(tl.int64)[None, :] * D + rn[:, None], acc, mask=valid[None, :])


@triton.jit
def _dequant16_kernel(w, tabs, out, K, RB, FMT: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    t = tile16(w, tabs, rows.to(tl.int64) * RB, K, k0, FMT, BK, EMULATE)
    tl.store(out + rows.to(tl.int64)[:, None] * K + k0 + tl.arange(0, BK)[None, :], t)


# ---- Launchers -------------------------------------------------------------------------------


def dequant_f16(w: QTensor, tabs: torch.Tensor) -> torch.Tensor:
    """float16 [*shape]: the tiles the prefill kernels multiply (tests compare them to the
    reference dequantizer)."""
    w = prepared(w)
    data = w.data.reshape(-1, w.data.shape[-1])
    rows, cols = data.shape[0], w.shape[-1]
    if rows % 16 or cols % 64:
        raise ValueError(f"dequant_f16: need rows % 16 == 0 and cols % 64 == 0, got {w.shape}")
    out = torch.empty(rows, cols, dtype=torch.float16, device=w.device)
    _dequant16_kernel[(rows // 16, cols // 64)](
        data, tabs, out, cols, data.shape[-1], FMT=int(w.qtype), BN=16, BK=64,
        EMULATE=interpreting(),
    )  # fmt: skip
    return out.view(w.shape)


def expert_tiles(ids: torch.Tensor, n_exp: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots sorted by expert, without a host sync: (order int32 [S], sorted row -> slot;
    tiles int32 [S // bm + n_exp, 3] of (expert, first row, end row), BM rows per tile of
    each used expert, then empty tiles (first == end) up to the bound the grid is sized for)."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    bounds = torch.searchsorted(flat[order], torch.arange(n_exp + 1, device=ids.device))
    starts, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    n_tiles = (counts + bm - 1) // bm
    last = torch.cumsum(n_tiles, 0)  # one past each expert's last tile
    r = torch.arange(flat.numel() // bm + n_exp, device=ids.device)
    e = torch.searchsorted(last, r, right=True).clamp_(max=n_exp - 1)
    row0 = starts[e] + (r - last[e] + n_tiles[e]) * bm
    end = torch.where(r < last[-1], starts[e] + counts[e], row0)
    return order.to(torch.int32), torch.stack([e, row0, end], dim=1).to(torch.int32).contiguous()


def moe_prefill_config(n_slots: int, n_exp: int, n_ff: int, dim: int) -> dict:
    """Token tiles sized to the rows an expert gets on average (balanced routing); from the
    H200 sweep in scripts/bench_moe_prefill.py (2048 / 8192 tokens, top-6 of 256). Row
    blocks shrink to divide small test experts."""
    few = n_slots / n_exp <= 96
    bn_gu, bn_down = 128 if few else 64, 128
    while n_ff % bn_gu and bn_gu > 16:
        bn_gu //= 2
    while dim % bn_down and bn_down > 16:
        bn_down //= 2
    return dict(BM=64 if few else 128, BN_GU=bn_gu, BN_DOWN=bn_down, BK=64, num_warps=4,
                num_stages=3)  # fmt: skip


def moe_prefill(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: QTensor,
    up: QTensor,
    down: QTensor,
    clamp: float,
    tabs: torch.Tensor,
    cfg: dict | None = None,
    hopper: bool = True,
) -> torch.Tensor:
    """out[t] = sum_i w[t, i] * down[e] @ swiglu(gate[e] x[t], up[e] x[t]), e = ids[t, i];
    x and h (the SwiGLU output) enter the tensor cores as float16, sums are float32. On sm_90
    the 2-4 bit formats run moe_hopper.py's kernels (same math) unless `hopper` is False.

    `cfg` (BM, BN_GU, BN_DOWN, BK, num_warps, num_stages) overrides the Triton tiling; the
    Hopper kernels take only its BM."""
    _check(x, ids, weights, gate, up, down)
    gate, up, down = prepared(gate), prepared(up), prepared(down)
    n_tok, k = ids.shape
    n_exp, n_ff, dim = gate.shape
    cfg = cfg or moe_prefill_config(n_tok * k, n_exp, n_ff, dim)
    bk = cfg["BK"]
    if dim % bk or n_ff % bk or n_ff % cfg["BN_GU"] or dim % cfg["BN_DOWN"] or bk % 32:
        raise ValueError(f"moe_prefill: expert dims {n_ff}, {dim} do not fit the tiles {cfg}")
    order, tiles = expert_tiles(ids, n_exp, cfg["BM"])
    wts = weights.reshape(-1).contiguous()
    if hopper and not interpreting() and moe_hopper.supported(gate, up, down):
        y = moe_hopper.grouped(x, order, wts, tiles, gate, up, down, k, clamp, tabs, cfg)
    else:
        y = grouped(x.to(torch.float16).contiguous(), order, wts, tiles, gate, up, down, k, clamp,
                    tabs, cfg)  # fmt: skip
    return y.view(n_tok, k, dim).sum(dim=1)  # slots in order: deterministic


def grouped(xh, order, wts, tiles, gate, up, down, k, clamp, tabs, cfg) -> torch.Tensor:
    """Both launches over slots sorted by expert: y [slots, dim] float32, row t * k + i for
    token t's slot i (benchmarks time this part alone)."""
    n_exp, n_ff, dim = gate.shape
    n_slots, n_tiles, bk = order.numel(), tiles.shape[0], cfg["BK"]
    h = torch.empty(n_slots, n_ff, dtype=torch.float16, device=xh.device)
    y = torch.empty(n_slots, dim, dtype=torch.float32, device=xh.device)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], EMULATE=interpreting())
    _gate_up_kernel[(n_tiles, n_ff // cfg["BN_GU"])](
        xh, order, wts, tiles, gate.data, up.data, tabs, h, n_ff, dim, gate.data.shape[-1],
        float(clamp), KTOP=k, FMT=int(gate.qtype), BM=cfg["BM"], BN=cfg["BN_GU"], BK=bk, **launch,
    )  # fmt: skip
    _down_kernel[(n_tiles, dim // cfg["BN_DOWN"])](
        h, order, tiles, down.data, tabs, y, dim, n_ff, down.data.shape[-1], FMT=int(down.qtype),
        BM=cfg["BM"], BN=cfg["BN_DOWN"], BK=bk, **launch,
    )  # fmt: skip
    return y
