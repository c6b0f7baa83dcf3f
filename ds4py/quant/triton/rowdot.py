"""Decode dot products: one K-chunk of <= 8 tokens against a block of weight rows.

Owns: `accumulate`, the per-format inner step of the tiled decode GEMV and decode MoE kernels:
it adds float32 partial sums [BN, AG] (AG = `acc_groups`) for one token; the steps of the
one-token GEMV (`q8_load`/`q8_dot`, `half_load`/`half_dot`: each lane reads whole 16-byte runs of
R rows); and `quant16`, the per-16 int8 rounding of activations. F16/BF16/F32 use float32 FMA;
Q2_K, Q4_K, IQ2_XXS and the one-token Q8_0 step use int8 activations and dp4a on packed weight
words, as ds4 and llama.cpp do: decoding codes to floats costs more instructions per weight than
the memory system leaves time for. Weights are in split layout (formats.py `split_rows`).
"""

from __future__ import annotations

import triton
import triton.language as tl
from gguf import GGMLQuantizationType as GQ
from triton.language.extra.cuda import libdevice

from ds4py.quant.triton.tiles import dp4a, dp4a_us, f16_at, iq2_octet

# 1.5 * 2**23: v + MAGIC_RNE rounds v (|v| < 2**22) to an integer, ties to even
MAGIC_RNE = tl.constexpr(12582912.0)


def acc_groups(qtype: GQ, bk: int) -> int:
    """Last dim of the accumulator for a BK-wide chunk."""
    return {GQ.Q4_K: bk // 64, GQ.Q2_K: bk // 64, GQ.IQ2_XXS: bk // 32}.get(qtype, bk // 4)


@triton.jit
def _float_chunk(w, row_off, K, k0, x, FMT: tl.constexpr, BK: tl.constexpr):
    kk = tl.arange(0, BK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]  # [G4, 4]
    xv = tl.load(x + k0 + kk)[None]
    if FMT == 8:  # stored q ^ 0x80 = q + 128; scale per 32
        q = tl.load(w + row_off[:, None, None] + k0 + kk[None]).to(tl.int32)
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        d = f16_at(w + row_off[:, None] + K + 2 * ((k0 + 4 * tl.arange(0, BK // 4)) // 32)[None, :])
        part = tl.sum(qf * xv, axis=2) * d
    else:
        rows = w + row_off[:, None, None]
        if FMT == 1:
            wv = tl.load(rows.to(tl.pointer_type(tl.float16)) + k0 + kk[None]).to(tl.float32)
        elif FMT == 30:
            wv = tl.load(rows.to(tl.pointer_type(tl.bfloat16)) + k0 + kk[None]).to(tl.float32)
        else:
            wv = tl.load(rows.to(tl.pointer_type(tl.float32)) + k0 + kk[None])
        part = tl.sum(wv * xv, axis=2)
    return part  # [BN, BK // 4]


@triton.jit
def _q4k_scale_min(scb, j):
    """6-bit scale and min of sub-block j (int tensor) from the 12 packed bytes at scb."""
    j4 = j % 4
    a = tl.load(scb + j4).to(tl.int32)
    c = tl.load(scb + 4 + j4).to(tl.int32)
    e = tl.load(scb + 4 + j).to(tl.int32)
    low = j < 4
    sc = tl.where(low, a & 63, (e & 15) | ((a >> 6) << 4))
    mn = tl.where(low, c & 63, (e >> 4) | ((c >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _q4_k_chunk(w, row_off, K, k0, xq, xs, xsum, BK: tl.constexpr, EMULATE: tl.constexpr):
    pp = k0 // 64 + tl.arange(0, BK // 64)  # global 64-element pair (sub-blocks 2p', 2p'+1)
    b, j = pp // 4, 2 * (pp % 4)
    l4 = tl.arange(0, 8)
    wp = w + row_off[:, None, None] + 32 * pp[None, :, None] + 4 * l4[None, None, :]
    wq = tl.load(wp.to(tl.pointer_type(tl.int32)))  # [BN, P, 8] words of 8 nibbles
    xw = xq + 16 * pp[:, None] + l4[None, :]
    s_lo = tl.sum(dp4a(wq & 0x0F0F0F0F, tl.load(xw)[None], EMULATE), 2)
    s_hi = tl.sum(dp4a((wq >> 4) & 0x0F0F0F0F, tl.load(xw + 8)[None], EMULATE), 2)
    scb = w + row_off[:, None] + K // 2 + 12 * b[None, :]
    sc_lo, m_lo = _q4k_scale_min(scb, j[None, :])
    sc_hi, m_hi = _q4k_scale_min(scb, j[None, :] + 1)
    dm = w + row_off[:, None] + K // 2 + 12 * (K // 256) + 4 * b[None, :]
    d, dmin = f16_at(dm), f16_at(dm + 2)
    xs_lo = tl.load(xs + 2 * pp)[None]
    xs_hi = tl.load(xs + 2 * pp + 1)[None]
    sum_lo = (tl.load(xsum + 4 * pp) + tl.load(xsum + 4 * pp + 1))[None]
    sum_hi = (tl.load(xsum + 4 * pp + 2) + tl.load(xsum + 4 * pp + 3))[None]
    part = d * sc_lo * xs_lo * s_lo.to(tl.float32) - dmin * m_lo * sum_lo
    part += d * sc_hi * xs_hi * s_hi.to(tl.float32) - dmin * m_hi * sum_hi
    return part  # [BN, BK // 64]


@triton.jit
def _q2_k_chunk(w, row_off, K, k0, xq, xs, xsum, BK: tl.constexpr, EMULATE: tl.constexpr):
    mm = k0 // 64 + tl.arange(0, BK // 64)  # global 16-byte run: block b, half h, sub-half u
    b, h, u = mm // 4, (mm % 4) // 2, mm % 2
    l4 = tl.arange(0, 4)
    wp = w + row_off[:, None, None] + 16 * mm[None, :, None] + 4 * l4[None, None, :]
    wq = tl.load(wp.to(tl.pointer_type(tl.int32)))  # [BN, M, 4]: 4 planes of 2 bits
    dm = w + row_off[:, None] + K // 4 + 16 * (K // 256) + 4 * b[None, :]
    d, dmin = f16_at(dm), f16_at(dm + 2)
    scb = w + row_off[:, None] + K // 4 + 16 * b[None, :] + (8 * h + u)[None, :]
    part = tl.zeros([row_off.shape[0], BK // 64], dtype=tl.float32)
    for p in tl.static_range(4):
        # plane p of run (b, h, u) holds elements 256b + 128h + 32p + 16u + [0, 16)
        xv = tl.load(xq + (64 * b + 32 * h + 8 * p + 4 * u)[:, None] + l4[None, :])[None]
        s = tl.sum(dp4a((wq >> (2 * p)) & 0x03030303, xv, EMULATE), 2).to(tl.float32)
        sc = tl.load(scb + 2 * p).to(tl.int32)
        xsv = tl.load(xs + 8 * b + 4 * h + p)[None]
        xsu = tl.load(xsum + 16 * b + 8 * h + 2 * p + u)[None]
        part += d * (sc & 15).to(tl.float32) * xsv * s - dmin * (sc >> 4).to(tl.float32) * xsu
    return part  # [BN, BK // 64]


@triton.jit
def _iq2_xxs_chunk(w, tabs, row_off, K, k0, xq, xs, BK: tl.constexpr, EMULATE: tl.constexpr):
    gg = k0 // 32 + tl.arange(0, BK // 32)  # global 32-element group: words A (grid), B (signs)
    wp = w + row_off[:, None, None] + 8 * gg[None, :, None] + 4 * tl.arange(0, 2)[None, None, :]
    a, bw = tl.split(tl.load(wp.to(tl.pointer_type(tl.int32))))  # [BN, G] each
    bu = bw.to(tl.uint32, bitcast=True)
    d = f16_at(w + row_off[:, None] + K // 4 + 2 * (gg // 8)[None, :])
    db = d * (0.5 + (bu >> 28).to(tl.float32)) * 0.25
    sub = tl.arange(0, 4)[None, None, :]
    v_lo, v_hi = iq2_octet(a[:, :, None], bu[:, :, None], sub, tabs)  # [BN, G, 4]
    xw = xq + 8 * gg[None, :, None] + 2 * sub
    dot = dp4a(v_lo, tl.load(xw), EMULATE) + dp4a(v_hi, tl.load(xw + 1), EMULATE)
    return db * tl.load(xs + gg)[None] * tl.sum(dot, 2).to(tl.float32)  # [BN, BK // 32]


@triton.jit
def accumulate(acc, w, tabs, row_off, K, k0, x, xq, xs, xsum, FMT: tl.constexpr,
               BK: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """acc [BN, AG] += partial dots of rows `row_off` with one token, columns k0..k0+BK.

    x: float32 activations; xq/xs/xsum: their int8 words, scales and 16-sums (act.py), used by
    the int8 formats. All pointers point at the token's row."""
    if FMT == 12:
        acc += _q4_k_chunk(w, row_off, K, k0, xq, xs, xsum, BK, EMULATE)
    elif FMT == 10:
        acc += _q2_k_chunk(w, row_off, K, k0, xq, xs, xsum, BK, EMULATE)
    elif FMT == 16:
        acc += _iq2_xxs_chunk(w, tabs, row_off, K, k0, xq, xs, BK, EMULATE)
    else:
        acc += _float_chunk(w, row_off, K, k0, x, FMT, BK)
    return acc


# ---- wide-load GEMV steps (gemv.py `_rows_kernel`) -------------------------------------------


@triton.jit
def quarters(t):
    """[A, (B,) 4] -> its four [A, (B)] slices (the last axis is in one thread's registers)."""
    if len(t.shape) == 2:
        t = tl.reshape(t, [t.shape[0], 2, 2])
    else:
        t = tl.reshape(t, [t.shape[0], t.shape[1], 2, 2])
    t01, t23 = tl.split(t)
    t0, t2 = tl.split(t01)
    t1, t3 = tl.split(t23)
    return t0, t1, t2, t3


@triton.jit
def _pack4(b0, b1, b2, b3, EMULATE: tl.constexpr):
    """One int32 word of the low bytes of b0..b3 (byte j from bj)."""
    if EMULATE:
        w = (b0 & 255) | ((b1 & 255) << 8) | ((b2 & 255) << 16) | (b3 << 24)
    else:
        w = tl.inline_asm_elementwise(
            "{ .reg .b32 t0, t1; prmt.b32 t0, $1, $2, 0x0040; prmt.b32 t1, $3, $4, 0x0040;"
            " prmt.b32 $0, t0, t1, 0x5410; }",
            "=r,r,r,r,r", [b0, b1, b2, b3], dtype=tl.int32, is_pure=True, pack=1,
        )  # fmt: skip
    return w


@triton.jit
def _word_of(xw, inv, EMULATE: tl.constexpr):
    """xw float32 [NV, 4] times inv [NV], rounded to int8 (ties even) -> packed words [NV]."""
    if EMULATE:  # numpy rounds the product and the sum separately, like mul.rn + add
        v = xw * inv[:, None] + MAGIC_RNE
    else:  # mul.rn is never fused with the add: the product is rounded first, as in torch
        v = libdevice.mul_rn(xw, inv[:, None]) + MAGIC_RNE
    bits = v.to(tl.int32, bitcast=True)  # low byte = the int8 value (MAGIC's low bytes are 0)
    b0, b1, b2, b3 = quarters(bits)
    return _pack4(b0, b1, b2, b3, EMULATE)


@triton.jit
def quant16(x, k0, NV: tl.constexpr, EMULATE: tl.constexpr):
    """Round x[k0 : k0 + 16 NV] to int8 per 16 values (act.py `quantize16_ref`): four packed
    words [NV] per 16 values, -128 * sum(q) [NV] for the biased weights, scale [NV]. Each
    thread owns whole 16-value runs, so the max needs no cross-thread step."""
    xp = x + k0 + 16 * tl.arange(0, NV)[:, None] + tl.arange(0, 4)[None, :]
    x0, x1, x2, x3 = tl.load(xp), tl.load(xp + 4), tl.load(xp + 8), tl.load(xp + 12)
    m01 = tl.maximum(tl.max(tl.abs(x0), axis=1), tl.max(tl.abs(x1), axis=1))
    amax = tl.maximum(m01, tl.maximum(tl.max(tl.abs(x2), axis=1), tl.max(tl.abs(x3), axis=1)))
    if EMULATE:
        inv = 127.0 / tl.where(amax > 0, amax, 1.0)
    else:
        inv = tl.math.div_rn(tl.full(amax.shape, 127.0, tl.float32), tl.where(amax > 0, amax, 1.0))
    inv = tl.where(amax > 0, inv, 0.0)
    w0, w1 = _word_of(x0, inv, EMULATE), _word_of(x1, inv, EMULATE)
    w2, w3 = _word_of(x2, inv, EMULATE), _word_of(x3, inv, EMULATE)
    ones = tl.full(w0.shape, 0x01010101, tl.int32)  # dp4a with ones: the sum of the bytes
    qsum = dp4a(w0, ones, EMULATE) + dp4a(w1, ones, EMULATE)
    qsum += dp4a(w2, ones, EMULATE) + dp4a(w3, ones, EMULATE)
    return w0, w1, w2, w3, -128 * qsum, amax * (1.0 / 127.0)


@triton.jit
def _stream_load(ptr, mask):
    # weights are read once per token: first out of L2, so activations and caches stay
    return tl.load(ptr, mask=mask, other=0, eviction_policy="evict_first")


@triton.jit
def q8_load(w, row_off, K, k0, NV: tl.constexpr):
    """Q8_0 rows at `row_off` (split layout: biased quants q + 128, then f16 scales), columns
    k0 .. k0 + 16 NV (zeros past K): (words [R, NV, 4], one 16-byte load per 16 quants;
    scales [R, NV])."""
    run = k0 // 16 + tl.arange(0, NV)
    ok = (run < K // 16)[None, :]
    wp = (w + row_off[:, None, None]).to(tl.pointer_type(tl.int32))
    wt = _stream_load(wp + 4 * run[None, :, None] + tl.arange(0, 4)[None, None, :], ok[:, :, None])
    dp = (w + row_off[:, None] + K).to(tl.pointer_type(tl.float16)) + run[None, :] // 2
    return wt, _stream_load(dp, ok).to(tl.float32)


@triton.jit
def q8_dot(wt, d, x0, x1, x2, x3, bias, dq, EMULATE: tl.constexpr):
    """[R, NV] float32: `q8_load`'s rows dotted with 16-value runs of int8 activations from
    `quant16`; u * x summed in dp4a minus 128 * sum(x) is the signed dot, exactly."""
    a0, a1, a2, a3 = quarters(wt)
    s = dp4a_us(a0, x0[None, :], bias[None, :], EMULATE)
    s = dp4a_us(a1, x1[None, :], s, EMULATE)
    s = dp4a_us(a2, x2[None, :], s, EMULATE)
    s = dp4a_us(a3, x3[None, :], s, EMULATE)  # |s| <= 16 * 128 * 127: exact as float
    return s.to(tl.float32) * (d * dq[None, :])


@triton.jit
def half_load(w, row_off, K, k0, DT: tl.constexpr, NV: tl.constexpr):
    """16-bit float rows (F16 / BF16 as DT) at `row_off`, columns k0 .. k0 + 8 NV (zeros past
    K): [R, NV, 8], one 16-byte load per 8 values."""
    run = k0 // 8 + tl.arange(0, NV)
    ok = (run < K // 8)[None, :, None]
    wp = (w + row_off[:, None, None]).to(tl.pointer_type(DT))
    return _stream_load(wp + 8 * run[None, :, None] + tl.arange(0, 8)[None, None, :], ok)


@triton.jit
def half_dot(acc, wt, x_lo, x_hi):
    """acc [R, NV, 4] + partial dots of `half_load`'s rows with 8-value runs of float32
    activations (x_lo, x_hi [NV, 4]: values 0-3 and 4-7 of each run), in two FMAs."""
    wt = tl.permute(tl.reshape(wt, [wt.shape[0], wt.shape[1], 2, 4]), (0, 1, 3, 2))
    w_lo, w_hi = tl.split(wt)
    return acc + w_lo.to(tl.float32) * x_lo[None] + w_hi.to(tl.float32) * x_hi[None]
