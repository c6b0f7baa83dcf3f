"""Decode dot products: one K-chunk of <= 8 tokens against a block of weight rows.

Owns: `accumulate`, the per-format inner step of the decode GEMV and decode MoE kernels: it
adds float32 partial sums [BN, AG] (AG = `acc_groups`) for one token, so little is reduced
across threads inside the K loop. F16/BF16/F32/Q8_0 use float32 activations and FMA; Q2_K,
Q4_K and IQ2_XXS use int8 activations (act.py) and dp4a on packed weight words, as ds4 and
llama.cpp do: decoding 2-4 bit codes to floats costs more instructions per weight than the
memory system leaves time for. Weights are in split layout (formats.py `split_rows`).
"""

from __future__ import annotations

import triton
import triton.language as tl
from gguf import GGMLQuantizationType as GQ

from ds4py.quant.triton.tiles import dp4a, f16_at, iq2_octet


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
