"""Routed-expert FFN on GGUF-encoded expert tensors for decode (few tokens).

Owns: out[t] = sum_i down[e] @ (w[t,i] * silu(min(gate[e] x, c)) * clamp(up[e] x, -c, c)),
e = ids[t,i]: two launches (gate+up+SwiGLU per slot; down per token, its k experts summed in a
fixed order, no float atomics), their tilings and a torch reference. IQ2_XXS gate/up and Q2_K /
Q4_K experts get their own inner loops (lanes own whole groups; int8 activations interleaved
to match, dp4a/dp2a; IQ2_XXS tables in shared memory; on Hopper the launches and their
activation roundings chained by programmatic dependent launch; on sm_90 the IQ2_XXS gate/up
launch is moe_decode_hopper.py's Gluon kernel), other types rowdot.py's.
Expert tensors are in split layout.
Does not own: routing (the model), prefill (moe_prefill.py, moe_hopper.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as GQ

from ds4py.quant import ref
from ds4py.quant.formats import QTensor
from ds4py.quant.triton import moe_decode_hopper
from ds4py.quant.triton.act import quantize16
from ds4py.quant.triton.gemv import (
    act_operands,
    decode_config,
    gemv,
    gemv_config,
    pdl_ok,
    rows_block,
)
from ds4py.quant.triton.rowdot import acc_groups, accumulate
from ds4py.quant.triton.tiles import (
    INT8_PATH,
    clamped_swiglu,
    dp4a_add,
    dp4a_us,
    f16_at,
    interpreting,
    iq2_octet_dot,
    kernel_ok,
    prepared,
    signed_mags,
)

# ---- Decode ----------------------------------------------------------------------------------


@triton.jit
def _moe_gate_up_kernel(
    x, xq, xs, xsum, ids, wts, gate, up, tabs, h, F, D, RB, clamp,
    KTOP: tl.constexpr, FMT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    AG: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    slot = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    e = tl.load(ids + slot).to(tl.int64)
    row_off = (e * F + tl.minimum(rows, F - 1)) * RB
    t = (slot // KTOP).to(tl.int64)
    x, xq, xs, xsum = x + t * D, xq + t * (D // 4), xs + t * (D // 32), xsum + t * (D // 16)
    acc_g = tl.zeros([BN, AG], dtype=tl.float32)
    acc_u = tl.zeros([BN, AG], dtype=tl.float32)
    for k0 in range(0, D, BK):
        acc_g = accumulate(acc_g, gate, tabs, row_off, D, k0, x, xq, xs, xsum, FMT, BK, EMULATE)
        acc_u = accumulate(acc_u, up, tabs, row_off, D, k0, x, xq, xs, xsum, FMT, BK, EMULATE)
    g, u = tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1)
    hv = clamped_swiglu(g, u, clamp) * tl.load(wts + slot)
    tl.store(h + slot.to(tl.int64) * F + rows, hv, mask=rows < F)


@triton.jit
def _smem_tables(tabs):
    """Copy the IQ2_XXS selector tables (tiles.tables: 256 grid words, then 128 sign words)
    into shared memory, declared in inline PTX (Triton has no shared-array gather): a warp's
    random lookups there cost ~3 bank cycles against ~6-8 L1 wavefronts from global memory,
    which bounded the global-table kernel (24.0 vs 18.6 us at the q2 shapes on the H200)."""
    tid = tl.arange(0, 32)  # one element per thread of a warp: the declaration is emitted once
    base = tl.inline_asm_elementwise(
        ".shared .align 16 .b32 iq2tab[388];\n\tmov.u32 $0, iq2tab;", "=r,r", [tid],
        dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip
    tab32 = (tabs + 256).to(tl.pointer_type(tl.int32))
    for q in tl.static_range(12):  # more warps store the same words again: harmless
        i = tid + 32 * q
        word = tl.load(tab32 + i)
        tl.inline_asm_elementwise(
            "st.shared.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r", [base + 4 * i, word],
            dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    tl.debug_barrier()


@triton.jit
def _table_base(like):
    """The shared table's address for every element of `like`; not pure, so the lookups that
    depend on it stay after the fill and its barrier."""
    return tl.inline_asm_elementwise(
        "mov.u32 $0, iq2tab;", "=r,r", [like], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _lds(addr):
    return tl.inline_asm_elementwise(
        "ld.shared.b32 $0, [$1];", "=r,r", [addr], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _iq2_octet(a, bu, S: tl.constexpr, xlo, xhi, acc, tab, tabs, EMULATE: tl.constexpr):
    """acc + dot of octet S of IQ2_XXS groups (words a, bu) with int8 words xlo, xhi: two
    selector words (grid codes, signs) from the shared table at `tab` OR into one `prmt`
    selector; the interpreter reads the same tables from global memory (tiles.py)."""
    if EMULATE:
        acc = iq2_octet_dot(a, bu, S, xlo, xhi, acc, tabs, EMULATE)
    else:
        gi = ((a >> (8 * S)) & 255) * 4
        si = ((bu >> (7 * S)) & 127).to(tl.int32) * 4
        sel = _lds(tab + gi) | _lds(tab + 1024 + si)
        acc = dp4a_add(signed_mags(sel, False), xlo, acc, EMULATE)
        acc = dp4a_add(signed_mags(sel >> 16, False), xhi, acc, EMULATE)
    return acc


@triton.jit
def _pair(gm):
    """[.., G / 2, 2] element offsets 2m, 2m + 1: a pair loaded as one vector, then split, so
    its halves keep the layout of [.., G / 2] tensors."""
    return 2 * gm[:, :, None] + tl.arange(0, 2)[None, None, :]


@triton.jit
def _lo_hi(v):
    """The two 32-bit halves of uint64 words v, as int32."""
    return (v & 0xFFFFFFFF).to(tl.int32), (v >> 32).to(tl.int32)


@triton.jit
def _iq2_load(w, row_off, D, gm, W64: tl.constexpr):
    """Words A, B of groups 2m and 2m + 1 and the d of their block, [R, G / 2] each, of the
    IQ2_XXS rows at byte offsets row_off [R, 1] (split layout): a lane's 16-byte load holds
    both groups, so weights, activations (loaded in the same pairs) and scales share one
    layout and no load is redistributed across lanes."""
    if W64:  # rows 8-byte aligned: one group's words A and B in one 8-byte word
        p = (w + row_off).to(tl.pointer_type(tl.uint64)) + tl.arange(0, 2 * gm.shape[1])
        v0, v1 = tl.split(tl.reshape(tl.load(p), [row_off.shape[0], gm.shape[1], 2]))
        a0, b0 = _lo_hi(v0)
        a1, b1 = _lo_hi(v1)
    else:
        p = (w + row_off).to(tl.pointer_type(tl.int32)) + 4 * gm
        a0, b0, a1, b1 = tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3)
    b0, b1 = b0.to(tl.uint32, bitcast=True), b1.to(tl.uint32, bitcast=True)
    return a0, b0, a1, b1, f16_at(w + row_off + D // 4 + 2 * (gm // 4))


@triton.jit
def _iq2_group(a, bu, tabs, tab, x, EMULATE: tl.constexpr):
    """Integer dots of 32-groups (words a, bu) with their 8 int8 activation words x, times
    the group scale 2 * s + 1 (|dot| < 2**23: exact as float)."""
    s = _iq2_octet(a, bu, 0, x[0], x[1], tl.zeros_like(a), tab, tabs, EMULATE)
    s = _iq2_octet(a, bu, 1, x[2], x[3], s, tab, tabs, EMULATE)
    s = _iq2_octet(a, bu, 2, x[4], x[5], s, tab, tabs, EMULATE)
    s = _iq2_octet(a, bu, 3, x[6], x[7], s, tab, tabs, EMULATE)
    return s * (((bu >> 27) | 1).to(tl.int32))


@triton.jit
def _x_words(xw, G: tl.constexpr):
    """The token's 8 int8 activation words of the even and of the odd groups of each pair
    (word j of group g at j * G + g, interleaved by 4 bytes: a pair's words in one load)."""
    e0, o0 = tl.split(tl.load(xw))
    e1, o1 = tl.split(tl.load(xw + G))
    e2, o2 = tl.split(tl.load(xw + 2 * G))
    e3, o3 = tl.split(tl.load(xw + 3 * G))
    e4, o4 = tl.split(tl.load(xw + 4 * G))
    e5, o5 = tl.split(tl.load(xw + 5 * G))
    e6, o6 = tl.split(tl.load(xw + 6 * G))
    e7, o7 = tl.split(tl.load(xw + 7 * G))
    return (e0, e1, e2, e3, e4, e5, e6, e7), (o0, o1, o2, o3, o4, o5, o6, o7)


@triton.jit
def _iq2_rows(w, tabs, tab, xe, xo, xse, xso, EMULATE: tl.constexpr):
    """Dots [R] of the rows _iq2_load read (w) with the token's int8 activations: xe / xo the
    8 words of the even / odd groups of each pair ([1, G / 2]), xse / xso their scales."""
    a0, b0, a1, b1, d = w
    s0 = _iq2_group(a0, b0, tabs, tab, xe, EMULATE)
    s1 = _iq2_group(a1, b1, tabs, tab, xo, EMULATE)
    return tl.sum((s0.to(tl.float32) * xse + s1.to(tl.float32) * xso) * d, axis=1) * 0.125


@triton.jit
def _moe_gate_up_iq2_kernel(
    xq, xs, ids, wts, gate, up, tabs, h, F, D, RB, clamp,
    KTOP: tl.constexpr, G: tl.constexpr, R: tl.constexpr, W64: tl.constexpr,
    PDL: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """IQ2_XXS gate/up: R rows of one slot per program ([R, G / 2] tensors of group pairs),
    selector tables in shared memory, prmt-built weight bytes and chained dp4a. PDL: the
    tables and the weights (their addresses need the ids, written before x's producer ran)
    are fetched before waiting for the kernel that wrote x."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    slot = tl.program_id(0)
    r0 = tl.program_id(1) * R
    e = tl.load(ids + slot).to(tl.int64)
    t = (slot // KTOP).to(tl.int64)
    gm = tl.arange(0, G // 2)[None, :]  # group pair m: groups 2m, 2m + 1
    if EMULATE:
        tab = gm
    else:
        _smem_tables(tabs)
        tab = _table_base(gm)
    rr = tl.arange(0, R)
    row_off = ((e * F + r0 + rr) * RB)[:, None]
    wg, wu = _iq2_load(gate, row_off, D, gm, W64), _iq2_load(up, row_off, D, gm, W64)
    if PDL:
        tl.extra.cuda.gdc_wait()
    xe, xo = _x_words(xq + t * (D // 4) + _pair(gm), G)
    xse, xso = tl.split(tl.load(xs + t * (D // 32) + _pair(gm)))
    g = _iq2_rows(wg, tabs, tab, xe, xo, xse, xso, EMULATE)
    u = _iq2_rows(wu, tabs, tab, xe, xo, xse, xso, EMULATE)
    hv = clamped_swiglu(g, u, clamp) * tl.load(wts + slot)
    tl.store(h + slot.to(tl.int64) * F + r0 + rr, hv)


@triton.jit
def _moe_down_kernel(
    h, hq, hs, hsum, ids, down, tabs, out, D, F, RB,
    KTOP: tl.constexpr, FMT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    AG: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rows_c = tl.minimum(rows, D - 1)
    acc = tl.zeros([BN, AG], dtype=tl.float32)
    for i in range(KTOP):  # slot order: the sum is deterministic
        slot = (t * KTOP + i).to(tl.int64)
        row_off = (tl.load(ids + slot).to(tl.int64) * D + rows_c) * RB
        hp, hqp, hsp = h + slot * F, hq + slot * (F // 4), hs + slot * (F // 32)
        hsump = hsum + slot * (F // 16)
        for k0 in range(0, F, BK):
            acc = accumulate(acc, down, tabs, row_off, F, k0, hp, hqp, hsp, hsump, FMT, BK,
                             EMULATE)  # fmt: skip
    tl.store(out + t.to(tl.int64) * D + rows, tl.sum(acc, axis=1), mask=rows < D)


@triton.jit
def _dp2a(a, b, c, HI: tl.constexpr, EMULATE: tl.constexpr):
    """c + the two signed 16-bit halves of a times bytes 2*HI, 2*HI+1 of b (signed)."""
    if EMULATE:
        b0 = (b << (24 - 16 * HI)) >> 24
        b1 = (b << (16 - 16 * HI)) >> 24
        s = c + ((a << 16) >> 16) * b0 + (a >> 16) * b1
    elif HI:
        s = tl.inline_asm_elementwise(
            "dp2a.hi.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
            is_pure=True, pack=1,
        )  # fmt: skip
    else:
        s = tl.inline_asm_elementwise(
            "dp2a.lo.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
            is_pure=True, pack=1,
        )  # fmt: skip
    return s


@triton.jit
def _pack16(lo, hi):
    """The low 16 bits of lo and of hi as one word (halves for dp2a)."""
    return (lo & 0xFFFF) | (hi << 16)


@triton.jit
def _split4(v):
    """[..., 4] words (one 16-byte load) -> the four [...] words."""
    a, b = tl.split(tl.reshape(v, v.shape[:-1] + [2, 2]))
    w0, w2 = tl.split(a)
    w1, w3 = tl.split(b)
    return w0, w1, w2, w3


@triton.jit
def _load(p, mask, MASKED: tl.constexpr):
    if MASKED:
        v = tl.load(p, mask=mask, other=0)
    else:
        v = tl.load(p)
    return v


@triton.jit
def _words(ptr, mask, MASKED: tl.constexpr):
    """The four int32 words [..., 4] at ptr [..., 1] (one 16-byte load where aligned)."""
    p = ptr.to(tl.pointer_type(tl.int32)) + tl.arange(0, 4)
    return _split4(_load(p, mask, MASKED))


@triton.jit
def _word(ptr, mask, MASKED: tl.constexpr):
    v = _load(ptr.to(tl.pointer_type(tl.int32)), mask, MASKED)
    return tl.reshape(v, v.shape[:-1])  # drop the unit last dim, as split does


@triton.jit
def _sums4(x0, x1, x2, x3, EMULATE: tl.constexpr):
    """Sum of the 16 int8 activations in four words."""
    ones = tl.full(x0.shape, 0x01010101, tl.int32)
    s = dp4a_add(x0, ones, tl.zeros_like(x0), EMULATE)
    s = dp4a_add(x1, ones, s, EMULATE)
    s = dp4a_add(x2, ones, s, EMULATE)
    return dp4a_add(x3, ones, s, EMULATE)


@triton.jit
def _x_pieces(xw, xsp, K: tl.constexpr):
    """A unit's int8 activations (8 pieces of 4 words, interleaved: piece j at xw + j * K / 32)
    and its 4 scales, as [..., 4] tensors."""
    i4 = tl.arange(0, 4)
    xs = tl.load(xsp + i4)
    x0, x1 = tl.load(xw + i4), tl.load(xw + K // 32 + i4)
    x2, x3 = tl.load(xw + 2 * (K // 32) + i4), tl.load(xw + 3 * (K // 32) + i4)
    x4, x5 = tl.load(xw + 4 * (K // 32) + i4), tl.load(xw + 5 * (K // 32) + i4)
    x6, x7 = tl.load(xw + 6 * (K // 32) + i4), tl.load(xw + 7 * (K // 32) + i4)
    return xs, x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _q2k_load(row, c, mask, K: tl.constexpr, MASKED: tl.constexpr):
    """The weight words _q2k_math reads for the Q2_K units (128 weights: block c // 2, half
    c % 2) of the rows at `row` [..., 1]: loads only, so a caller can issue them early."""
    a0, a1, a2, a3 = _words(row + 32 * c, mask, MASKED)  # u = 0: bytes 0-15 of the unit
    b0, b1, b2, b3 = _words(row + 32 * c + 16, mask, MASKED)  # u = 1
    # scale bytes of (p, u): word p // 2, byte 2 (p % 2) + u; then d, dmin of block c // 2
    sc_lo = _word(row + K // 4 + 8 * c, mask, MASKED)
    sc_hi = _word(row + K // 4 + 8 * c + 4, mask, MASKED)
    dmw = _word(row + K // 4 + K // 16 + 4 * (c // 2), mask, MASKED)
    return a0, a1, a2, a3, b0, b1, b2, b3, sc_lo, sc_hi, dmw


@triton.jit
def _q2k_math(v, EMULATE: tl.constexpr):
    """Float dots of the units _q2k_load read: bit planes masked in place and chained in dp4a
    (exact: a multiple of 4**p), the 4-bit scales and mins of each 16-group pair applied by one
    dp2a each, floats once per 32."""
    a0, a1, a2, a3, b0, b1, b2, b3 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
    sc_lo, sc_hi, dmw = v[8], v[9], v[10]
    d = (dmw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = (dmw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    xs0, xs1, xs2, xs3 = _split4(v[11])
    acc_d = tl.zeros_like(d)
    acc_m = tl.zeros_like(d)
    for p in tl.static_range(4):
        # plane p: element 128h + 32p + 16u + 4m + k of the unit, activation piece 2p + u
        xa0, xa1, xa2, xa3 = _split4(v[12 + 2 * p])
        xb0, xb1, xb2, xb3 = _split4(v[13 + 2 * p])
        msk = tl.full(a0.shape, 0x03030303, tl.int32) << (2 * p)  # int32: plane 3 sets bit 31
        s0 = dp4a_us(a0 & msk, xa0, tl.zeros_like(a0), EMULATE)
        s0 = dp4a_us(a1 & msk, xa1, s0, EMULATE)
        s0 = dp4a_us(a2 & msk, xa2, s0, EMULATE)
        s0 = dp4a_us(a3 & msk, xa3, s0, EMULATE) >> (2 * p)
        s1 = dp4a_us(b0 & msk, xb0, tl.zeros_like(a0), EMULATE)
        s1 = dp4a_us(b1 & msk, xb1, s1, EMULATE)
        s1 = dp4a_us(b2 & msk, xb2, s1, EMULATE)
        s1 = dp4a_us(b3 & msk, xb3, s1, EMULATE) >> (2 * p)
        q16 = _pack16(_sums4(xa0, xa1, xa2, xa3, EMULATE), _sums4(xb0, xb1, xb2, xb3, EMULATE))
        scw = sc_lo if p < 2 else sc_hi
        ia = _dp2a(_pack16(s0, s1), scw & 0x0F0F0F0F, tl.zeros_like(s0), p % 2, EMULATE)
        ib = _dp2a(q16, (scw >> 4) & 0x0F0F0F0F, tl.zeros_like(s0), p % 2, EMULATE)
        xsv = xs0 if p == 0 else (xs1 if p == 1 else (xs2 if p == 2 else xs3))
        acc_d += ia.to(tl.float32) * xsv
        acc_m += ib.to(tl.float32) * xsv
    return d * acc_d - dmin * acc_m


@triton.jit
def _byte(w, J: tl.constexpr):
    return (w >> (8 * J)) & 0xFF


@triton.jit
def _q4k_load(row, c, mask, K: tl.constexpr, MASKED: tl.constexpr):
    """As _q2k_load for Q4_K units (128 weights: block c // 2, half c % 2)."""
    # the quant loads first: the layout of `row` follows its first (16-byte) use
    q0, q1, q2, q3 = _words(row + 64 * c, mask, MASKED)  # pair 0: sub-blocks 0 (lo), 1 (hi)
    q4, q5, q6, q7 = _words(row + 64 * c + 16, mask, MASKED)
    r0, r1, r2, r3 = _words(row + 64 * c + 32, mask, MASKED)  # pair 1: sub-blocks 2, 3
    r4, r5, r6, r7 = _words(row + 64 * c + 48, mask, MASKED)
    scb = row + K // 2 + 12 * (c // 2)
    w0, w1, w2 = (
        _word(scb, mask, MASKED),
        _word(scb + 4, mask, MASKED),
        _word(scb + 8, mask, MASKED),
    )
    dmw = _word(row + K // 2 + 12 * (K // 256) + 4 * (c // 2), mask, MASKED)
    hi = tl.reshape((c % 2) == 1, c.shape[:-1]).to(tl.int32)
    return (q0, q1, q2, q3, q4, q5, q6, q7, r0, r1, r2, r3, r4, r5, r6, r7, w0, w1, w2, dmw,
            hi)  # fmt: skip


@triton.jit
def _q4k_math(v, EMULATE: tl.constexpr):
    """As _q2k_math for Q4_K (sub-blocks 4h .. 4h + 3 of the half h): nibbles chained in dp4a
    per 32-sub-block, 6-bit scales and mins unpacked four at a time as bytes (the half picks
    its set)."""
    w0, w1, w2, dmw, hi = v[16], v[17], v[18], v[19], v[20] != 0
    sc4 = tl.where(hi, (w2 & 0x0F0F0F0F) | ((w0 >> 2) & 0x30303030), w0 & 0x3F3F3F3F)
    mn4 = tl.where(hi, ((w2 >> 4) & 0x0F0F0F0F) | ((w1 >> 2) & 0x30303030), w1 & 0x3F3F3F3F)
    d = (dmw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = (dmw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    xs0, xs1, xs2, xs3 = _split4(v[21])
    acc_d = tl.zeros_like(d)
    acc_m = tl.zeros_like(d)
    for pp in tl.static_range(2):  # 64-weight pair: 32 bytes, low nibbles then high nibbles
        if pp == 0:
            q0, q1, q2, q3, q4, q5, q6, q7 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
        else:
            q0, q1, q2, q3, q4, q5, q6, q7 = v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]
        for nib in tl.static_range(2):
            j = 2 * pp + nib  # sub-block of the unit: activation pieces 2j, 2j + 1
            x0, x1, x2, x3 = _split4(v[22 + 4 * pp + 2 * nib])  # (a constexpr index)
            x4, x5, x6, x7 = _split4(v[23 + 4 * pp + 2 * nib])
            s = dp4a_add((q0 >> (4 * nib)) & 0x0F0F0F0F, x0, tl.zeros_like(q0), EMULATE)
            s = dp4a_add((q1 >> (4 * nib)) & 0x0F0F0F0F, x1, s, EMULATE)
            s = dp4a_add((q2 >> (4 * nib)) & 0x0F0F0F0F, x2, s, EMULATE)
            s = dp4a_add((q3 >> (4 * nib)) & 0x0F0F0F0F, x3, s, EMULATE)
            s = dp4a_add((q4 >> (4 * nib)) & 0x0F0F0F0F, x4, s, EMULATE)
            s = dp4a_add((q5 >> (4 * nib)) & 0x0F0F0F0F, x5, s, EMULATE)
            s = dp4a_add((q6 >> (4 * nib)) & 0x0F0F0F0F, x6, s, EMULATE)
            s = dp4a_add((q7 >> (4 * nib)) & 0x0F0F0F0F, x7, s, EMULATE)
            q32 = _sums4(x0, x1, x2, x3, EMULATE) + _sums4(x4, x5, x6, x7, EMULATE)
            xsv = xs0 if j == 0 else (xs1 if j == 1 else (xs2 if j == 2 else xs3))
            acc_d += (s * _byte(sc4, j)).to(tl.float32) * xsv  # |.| < 2**22: exact
            acc_m += (q32 * _byte(mn4, j)).to(tl.float32) * xsv
    return d * acc_d - dmin * acc_m


@triton.jit
def _kq_load(row, c, mask, K: tl.constexpr, FMT: tl.constexpr, MASKED: tl.constexpr):
    if FMT == 10:
        v = _q2k_load(row, c, mask, K, MASKED)
    else:
        v = _q4k_load(row, c, mask, K, MASKED)
    return v


@triton.jit
def _kq_math(v, FMT: tl.constexpr, EMULATE: tl.constexpr):
    """Dots of the units whose weights (_kq_load) and activations (_x_pieces) are in v."""
    if FMT == 10:
        part = _q2k_math(v, EMULATE)
    else:
        part = _q4k_math(v, EMULATE)
    return part


@triton.jit
def _down_weights(ids, down, t, rows, c, D, RB, C0: tl.constexpr, F: tl.constexpr,
                  KTOP: tl.constexpr, KC: tl.constexpr, FMT: tl.constexpr):  # fmt: skip
    """_kq_load of the slots C0 .. C0 + KC - 1 of token t (past KTOP masked)."""
    kk = C0 + tl.arange(0, KC)[None, :, None, None]
    e = tl.load(ids + t * KTOP + tl.minimum(kk, KTOP - 1)).to(tl.int64)
    row = down + (e * D + rows) * RB  # [R / G, KC, 32, 1]
    return _kq_load(row, c, kk < KTOP, F, FMT, C0 + KC > KTOP)


@triton.jit
def _down_acts(hq, hs, t, c, C0: tl.constexpr, F: tl.constexpr, KTOP: tl.constexpr,
               KC: tl.constexpr):  # fmt: skip
    """_x_pieces of the same slots ([1, KC, 32, .])."""
    slot = t * KTOP + tl.minimum(C0 + tl.arange(0, KC)[None, :, None, None], KTOP - 1)
    slot = slot.to(tl.int64)
    return _x_pieces(hq + slot * (F // 4) + 4 * c, hs + slot * (F // 32) + 4 * c, F)


@triton.jit
def _moe_down_kq_kernel(
    hq, hs, ids, down, out, D, RB, sq, sb, sd, sw, sout, SN, SRB,
    F: tl.constexpr, KTOP: tl.constexpr, KC: tl.constexpr, R: tl.constexpr, U: tl.constexpr,
    FMT: tl.constexpr, PDL: tl.constexpr, EMULATE: tl.constexpr, SR: tl.constexpr,
    SK: tl.constexpr, SBK: tl.constexpr, SPIPE: tl.constexpr,
):  # fmt: skip
    """Q2_K / Q4_K down rows for one token: the slots in chunks of KC (a power of two; past
    KTOP masked), tensors [R / G, KC, 32, .] with a chunk's slots along dim 1 (in registers or
    across warps), the next chunk's loads issued before this chunk's math (ptxas keeps them
    there only with registers to spare: maxnreg 128 measured 14 % faster than its own choice of
    ~70); lane l holds 128-weight unit l % U of row G * i + l // U (G = 32 / U), so activations
    ([1, KC, 32, .]) and weights share a layout. Chunks add in order, each summed by a
    reduction of fixed order (deterministic). PDL: the first chunk's weights are fetched
    before waiting for the kernel that wrote h. With SR > 0 the programs past D / R are
    gemv's `rows_block` over the Q8_0 matrix sw [SN, SK] (the shared expert's down
    projection, its input rounded in sq, sb, sd) into sout: one launch for both."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if SR == 0:
        _down_kq_rows(hq, hs, ids, down, out, D, RB, F, KTOP, KC, R, U, FMT, PDL, EMULATE)
    elif tl.program_id(1) < D // R:
        _down_kq_rows(hq, hs, ids, down, out, D, RB, F, KTOP, KC, R, U, FMT, PDL, EMULATE)
    else:
        rows_block(tl.program_id(1) - D // R, sq, sq, sb, sd, sw, sout, SN, SK, SRB, SN, SK, 1,
                   8, SR, SBK, SPIPE, PDL, EMULATE)  # fmt: skip


@triton.jit
def _down_kq_rows(
    hq, hs, ids, down, out, D, RB,
    F: tl.constexpr, KTOP: tl.constexpr, KC: tl.constexpr, R: tl.constexpr, U: tl.constexpr,
    FMT: tl.constexpr, PDL: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    G: tl.constexpr = 32 // U
    t = tl.program_id(0)
    lane = tl.arange(0, 32)[None, None, :, None]
    c = lane % U
    rows = tl.program_id(1) * R + G * tl.arange(0, R // G)[:, None, None, None] + lane // U
    acc = tl.zeros([R // G, 32], dtype=tl.float32)
    nxt = _down_weights(ids, down, t, rows, c, D, RB, 0, F, KTOP, KC, FMT)
    if PDL:
        tl.extra.cuda.gdc_wait()
    nxt = nxt + _down_acts(hq, hs, t, c, 0, F, KTOP, KC)
    for c0 in tl.static_range(0, KTOP, KC):
        cur = nxt
        if c0 + KC < KTOP:  # the next chunk's loads go out before this chunk's math
            nxt = _down_weights(ids, down, t, rows, c, D, RB, c0 + KC, F, KTOP, KC, FMT)
            nxt = nxt + _down_acts(hq, hs, t, c, c0 + KC, F, KTOP, KC)
        acc += tl.sum(_kq_math(cur, FMT, EMULATE), axis=1)  # [R / G, 32]
    per_row = tl.sum(tl.reshape(acc, [R // G, G, U]), axis=2)  # lanes of a row are adjacent
    orow = tl.program_id(1) * R + tl.arange(0, R // G)[:, None] * G + tl.arange(0, G)[None, :]
    tl.store(out + t.to(tl.int64) * D + orow, per_row)


@triton.jit
def _moe_gate_up_kq_kernel(
    xq, xs, ids, wts, gate, up_off, h, F, RB, clamp,
    D: tl.constexpr, KTOP: tl.constexpr, R: tl.constexpr, U: tl.constexpr,
    FMT: tl.constexpr, PDL: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """Q2_K / Q4_K gate and up rows of one slot: tensors [R / G, 2, 32, .], gate and up along
    dim 1 (separate warps with num_warps=2), lanes as in _moe_down_kq_kernel. up_off: bytes
    from gate to up (a product keeps the loads' alignment known; a select loses it). PDL as
    in the IQ2_XXS kernel."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    G: tl.constexpr = 32 // U
    slot = tl.program_id(0)
    t = (slot // KTOP).to(tl.int64)
    e = tl.load(ids + slot).to(tl.int64)
    lane = tl.arange(0, 32)[None, None, :, None]
    c = lane % U
    rows = tl.program_id(1) * R + G * tl.arange(0, R // G)[:, None, None, None] + lane // U
    mm = tl.arange(0, 2)[None, :, None, None]
    row = gate + mm.to(tl.int64) * up_off + (e * F + rows) * RB  # [R / G, 2, 32, 1]
    w = _kq_load(row, c, mm < 2, D, FMT, False)
    if PDL:
        tl.extra.cuda.gdc_wait()
    xw = xq + t * (D // 4) + 4 * c + 0 * mm  # each matrix (warp) its own copy: [1, 2, 32, 1]
    xsp = xs + t * (D // 32) + 4 * c + 0 * mm
    part = _kq_math(w + _x_pieces(xw, xsp, D), FMT, EMULATE)
    dots = tl.sum(tl.reshape(part, [R // G, 2, G, U]), axis=3)
    m3 = tl.arange(0, 2)[None, :, None]
    g = tl.sum(tl.where(m3 == 0, dots, 0.0), axis=1)
    u = tl.sum(tl.where(m3 == 1, dots, 0.0), axis=1)
    hv = clamped_swiglu(g, u, clamp) * tl.load(wts + slot)
    orow = tl.program_id(1) * R + tl.arange(0, R // G)[:, None] * G + tl.arange(0, G)[None, :]
    tl.store(h + slot.to(tl.int64) * F + orow, hv)


def _check(x, ids, weights, gate, up, down) -> None:
    ref.check_moe(x, ids, weights, gate, up, down)
    for w in (gate, up, down):
        if not kernel_ok(w) or w.device != x.device:
            raise ValueError(f"moe: no kernel for expert tensor {w.qtype.name} {w.shape} here")
    if gate.qtype != up.qtype:
        raise ValueError(f"moe: gate {gate.qtype.name} and up {up.qtype.name} types differ")


def moe_decode(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: QTensor,
    up: QTensor,
    down: QTensor,
    clamp: float,
    tabs: torch.Tensor,
    cfg: dict | None = None,
) -> torch.Tensor:
    """Two launches (plus activation quantization for int8 formats); suited to a few tokens.

    `cfg` {"gate_up": gemv-style tile, "down": ...} overrides the tiling (benchmarks)."""
    return _moe_decode(x, ids, weights, gate, up, down, clamp, tabs, cfg)[0]


def moe_decode_shared(x, ids, weights, gate, up, down, clamp, tabs, h: torch.Tensor, w: QTensor,
                      cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(moe_decode(...), gemv(h, w)): the routed experts and the shared expert's down
    projection (h [1, K] float32, w Q8_0 [N, K]); for one token with the Q2_K / Q4_K down
    kernel, w's row blocks run as extra programs of the routed down launch (one launch fewer,
    its bytes read while the routed down waits on its own), otherwise as gemv does."""
    return _moe_decode(x, ids, weights, gate, up, down, clamp, tabs, cfg, (h, w))


def _moe_decode(x, ids, weights, gate, up, down, clamp, tabs, cfg, shared=None):
    _check(x, ids, weights, gate, up, down)
    gate, up, down = prepared(gate), prepared(up), prepared(down)
    n_tok, k = ids.shape
    _, n_ff, dim = gate.shape
    # int32 or int64 ids as given: the kernels widen them (a cast was one more launch)
    x, ids, wts = x.contiguous(), ids.contiguous(), weights.contiguous()
    cfg = cfg or moe_decode_config(n_tok, k, n_ff, dim, int8=gate.qtype in INT8_PATH,
                                   qtype=gate.qtype, down_qtype=down.qtype,
                                   pdl=pdl_ok(x.device),
                                   gluon=moe_decode_hopper.supported(x.device))  # fmt: skip
    gu, dn = cfg["gate_up"], cfg["down"]
    fused_ok = not gu.get("HQ") or "R" in dn  # h rounded for the K-quant down kernel only
    if not (_tiles_fit(gate.qtype, gu, n_ff, dim) and _tiles_fit(down.qtype, dn, dim, n_ff, False)
            and fused_ok):  # fmt: skip
        raise ValueError(f"moe_decode: tiles {cfg} do not fit experts {gate.shape}")
    h = torch.empty(n_tok * k, n_ff, dtype=torch.float32, device=x.device)
    ho = None
    if gu.get("HQ"):  # the gate/up kernel rounds h itself: no rounding launch between them
        hq = torch.empty(n_tok * k, n_ff, dtype=torch.int8, device=x.device)
        hs = torch.empty(n_tok * k, n_ff // 32, dtype=torch.float32, device=x.device)
        ho = (hq, hs)
    so = _shared_operands(shared, n_tok, dn)  # rounded before x: the chain stays whole
    gate_up_launch(x, operands(x, gate.qtype, gu), ids, wts, gate, up, tabs, h, clamp, gu, ho)
    out = torch.empty(n_tok, dim, dtype=torch.float32, device=x.device)
    ho = (ho[0].view(torch.int32), ho[1]) if ho else operands(h, down.qtype, dn, False)
    down_launch(h, ho, ids, down, tabs, out, dn, so)
    if so is not None:
        return out, so["out"]
    return out, (None if shared is None else gemv(shared[0], shared[1], tabs))


def _shared_operands(shared, n_tok: int, dn: dict) -> dict | None:
    """The shared down projection's part of the routed down launch (its input rounded as gemv
    rounds it, gemv's `rows_block` tiling), or None where it runs as its own gemv: several
    tokens, the generic down kernel, another format, or more warps than the down programs."""
    if shared is None or n_tok != 1 or "R" not in dn:
        return None
    h, w = shared[0].contiguous(), prepared(shared[1])
    (n, k), pdl = w.shape, bool(dn.get("PDL"))
    if w.qtype != GQ.Q8_0 or h.shape != (1, k) or h.dtype != torch.float32:
        return None
    c = decode_config(w.qtype, n, k, n, 1, pdl=pdl)
    if "R" not in c or c["num_warps"] != dn["num_warps"] or k % c["BK"] or n % c["R"]:
        return None
    xq, xb, xd = quantize16(h, pdl=pdl)
    out = torch.empty(1, n, dtype=torch.float32, device=h.device)
    return dict(
        args=(xq, xb, xd, w.data, out, n, w.data.shape[-1]),
        out=out,
        opts=dict(SR=c["R"], SK=k, SBK=c["BK"], SPIPE=c.get("PIPE", 0)),
        blocks=n // c["R"],
    )


def operands(x: torch.Tensor, qtype: GQ, cfg: dict, gate_up: bool = True) -> tuple:
    """x's int8 operands (act_operands) as the kernel that `cfg` picks for `qtype` reads them:
    the dedicated kernels' lanes own whole runs of activations (IQ2_XXS: a 32-group, read in
    4-byte pieces; Q2_K / Q4_K: a 128-unit, 16-byte pieces), interleaved so that a warp's load
    of one piece of every run is a contiguous span (Nsight: the strided loads had made the
    L1 data pipe these kernels' bound)."""
    own = "R" in cfg or "NB" in cfg
    interleave = 0 if not own else (4 if gate_up and qtype == GQ.IQ2_XXS else 16)
    return act_operands(x, qtype in INT8_PATH, interleave, bool(cfg.get("PDL")))


def gate_up_launch(x, xo, ids, wts, gate, up, tabs, h, clamp, gu, ho=None) -> None:
    """Launch 1 of moe_decode into h [slots, n_ff] (prepared experts; benchmarks time it).

    gu: (R, num_warps) the expert type's own kernel (IQ2_XXS, or Q2_K/Q4_K), (NB, PF,
    num_warps[, HQ]) the IQ2_XXS Gluon kernel on sm_90 (moe_decode_hopper.py; with HQ it also
    writes h's int8 rounding for the Q2_K / Q4_K down kernel into `ho`), else (BN, BK,
    num_warps) the generic one."""
    k, (_, n_ff, dim) = ids.shape[1], gate.shape
    slots, emulate = ids.numel(), interpreting()
    common = (xo[0], xo[1], ids, wts, gate.data, up.data, tabs, h, n_ff, dim,
              gate.data.shape[-1], float(clamp))  # fmt: skip
    own = {"PDL": 0, **gu}
    if "NB" in gu:
        moe_decode_hopper.gate_up_launch(xo, ids, wts, gate, up, tabs, h, clamp, gu, ho)
    elif "R" in gu and gate.qtype != GQ.IQ2_XXS:
        up_off = up.data.data_ptr() - gate.data.data_ptr()
        _moe_gate_up_kq_kernel[(slots, n_ff // gu["R"])](
            xo[0], xo[1], ids, wts, gate.data, up_off, h, n_ff, gate.data.shape[-1],
            float(clamp), D=dim, KTOP=k, U=dim // 128, FMT=int(gate.qtype), EMULATE=emulate,
            launch_pdl=bool(own["PDL"]), **own,
        )  # fmt: skip
    elif "R" in gu:
        _moe_gate_up_iq2_kernel[(slots, n_ff // gu["R"])](
            *common, KTOP=k, G=dim // 32, W64=gate.data.shape[-1] % 8 == 0, EMULATE=emulate,
            launch_pdl=bool(own["PDL"]), **own,
        )  # fmt: skip
    else:
        _moe_gate_up_kernel[(slots, n_ff // gu["BN"])](
            x, *xo, ids, wts, gate.data, up.data, tabs, h, n_ff, dim, gate.data.shape[-1],
            float(clamp), KTOP=k, FMT=int(gate.qtype), AG=acc_groups(gate.qtype, gu["BK"]),
            EMULATE=emulate, **gu,
        )  # fmt: skip


def down_launch(h, ho, ids, down, tabs, out, dn, so=None) -> None:
    """Launch 2 of moe_decode: out [T, dim] from h and its int8 operands ho.

    dn: (R, num_warps, KC slots per chunk) the Q2_K/Q4_K kernel, else (BN, BK, num_warps) the
    generic one. so: `_shared_operands`, the shared down projection's programs (Q2_K/Q4_K
    kernel, one token)."""
    (n_tok, k), (_, dim, n_ff) = ids.shape, down.shape
    if "R" in dn:
        sargs = so["args"] if so else (out,) * 5 + (0, 0)
        sopts = so["opts"] if so else dict(SR=0, SK=0, SBK=0, SPIPE=0)
        _moe_down_kq_kernel[(n_tok, dim // dn["R"] + (so["blocks"] if so else 0))](
            ho[0], ho[1], ids, down.data, out, dim, down.data.shape[-1], *sargs, F=n_ff,
            KTOP=k, U=n_ff // 128, FMT=int(down.qtype), EMULATE=interpreting(),
            launch_pdl=bool(dn.get("PDL")), **sopts,
            **{"KC": triton.next_power_of_2(k), "PDL": 0, **dn},
        )  # fmt: skip
        return
    _moe_down_kernel[(n_tok, dim // dn["BN"])](
        h, *ho, ids, down.data, tabs, out, dim, n_ff, down.data.shape[-1], KTOP=k,
        FMT=int(down.qtype), AG=acc_groups(down.qtype, dn["BK"]), EMULATE=interpreting(), **dn,
    )  # fmt: skip


def _tiles_fit(qtype: GQ, c: dict, rows: int, cols: int, gate_up: bool = True) -> bool:
    if "NB" in c:
        return gate_up and qtype == GQ.IQ2_XXS and moe_decode_hopper.fits(rows, cols, c)
    if "R" in c and gate_up and qtype == GQ.IQ2_XXS:  # whole rows, one group per lane
        g = cols // 32
        return cols % 256 == 0 and g & (g - 1) == 0 and rows % c["R"] == 0
    if "R" in c:  # the Q2_K / Q4_K kernels: 128-weight units, 32 / U rows per lane row
        u = cols // 128
        ok = qtype in (GQ.Q2_K, GQ.Q4_K) and cols % 256 == 0 and u & (u - 1) == 0 and u <= 32
        return ok and c["R"] % (32 // u) == 0 and rows % c["R"] == 0
    int8_ok = qtype not in INT8_PATH or c["BK"] % 256 == 0
    return cols % c["BK"] == 0 and int8_ok and rows % c["BN"] == 0


def moe_decode_config(n_tok: int, k: int, n_ff: int, dim: int, tile: int | None = None,
                      num_warps: int | None = None, int8: bool = True,
                      qtype: GQ | None = None, down_qtype: GQ | None = None,
                      pdl: bool = False, gluon: bool = False) -> dict:  # fmt: skip
    """gemv's heuristic with the slot/token grid dimension counted; IQ2_XXS gate/up and
    Q2_K/Q4_K experts that fit get their own kernels (the interpreter takes up to 256 / 512 rows
    per program: its cost is per operation, not per element), launched as programmatic
    dependents with their activation roundings if `pdl` (gemv.pdl_ok); IQ2_XXS gate/up the
    Gluon kernel if `gluon` (moe_decode_hopper.supported)."""
    gate_up = gemv_config(n_ff * n_tok * k, dim, n_ff, 1, tile, num_warps, int8)
    down = gemv_config(dim * n_tok, n_ff, dim, 1, tile, num_warps, int8)
    if tile is None and num_warps is None:
        own = {"PDL": 1} if pdl else {}
        g_own, d_own = (
            _own_config(qtype, n_ff, dim, True, gluon),
            _own_config(down_qtype, dim, n_ff, False),
        )
        gate_up, down = (g_own | own if g_own else gate_up), (d_own | own if d_own else down)
        if "NB" in gate_up and "R" in down and gate_up["NB"] * gate_up["num_warps"] == 32:
            gate_up = gate_up | {"HQ": 1}  # its CTAs' rows are 32-groups of h: rounded there
    return dict(gate_up=gate_up, down=down)


def _own_config(qtype: GQ | None, rows: int, cols: int, gate_up: bool,
                gluon: bool = False) -> dict | None:  # fmt: skip
    """The dedicated kernel's tiling for experts of `qtype` [rows, cols], None if none fits.
    H200 sweep (scripts/bench_moe_decode.py): one-warp programs; IQ2_XXS 2 rows (Gluon: CTAs
    of 8 warps over 4 blocks, one block's weights ahead, 80 registers: 3 CTAs per SM), Q2_K /
    Q4_K one lane row (gate and up: 2 row-units per lane; down: the slots one at a time, a lane
    row the two rows of 16 units, 128 registers: more rows per lane measured slower, as did
    slots in parallel)."""
    hopper = dict(NB=4, PF=1, num_warps=8, maxnreg=80)  # with HQ ptxas took 107 (no spills)
    if qtype == GQ.IQ2_XXS and gate_up and gluon and moe_decode_hopper.fits(rows, cols, hopper):
        return hopper
    if qtype == GQ.IQ2_XXS and gate_up:
        c = dict(R=2, num_warps=1)
    elif qtype in (GQ.Q2_K, GQ.Q4_K):
        per_lane_row = 32 // max(1, cols // 128)  # rows sharing a warp's lanes
        c = dict(R=per_lane_row, num_warps=1) | ({} if gate_up else dict(KC=1, maxnreg=128))
    else:
        return None
    if interpreting():
        c = {k: v for k, v in c.items() if k != "maxnreg"} | dict(
            R=min(rows, 256 if gate_up else 512)
        )
    return c if _tiles_fit(qtype, c, rows, cols, gate_up) else None


def moe_ref(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: QTensor,
    up: QTensor,
    down: QTensor,
    clamp: float,
    tabs: torch.Tensor | None = None,
    cfg: dict | None = None,
    hopper: bool = True,
) -> torch.Tensor:
    """Torch reference with the signature of moe_decode and moe_prefill (float32 throughout)."""
    return ref.moe(x, ids, weights, gate, up, down, clamp)
