"""Routed-expert prefill on Hopper (sm_90) in Gluon: the weight tile decoded straight into the
wgmma A-operand registers.

Owns: the gate/up and down launches of `moe_prefill` for IQ2_XXS / Q2_K / Q4_K experts on sm_90
(moe_prefill.py picks them; same inputs and outputs as its Triton kernels, which stay the
reference path and the one the interpreter tests). Why Gluon: in Triton the decoded tile goes
through shared memory (four store/barrier/load rounds per 64x64 tile) to reach the wgmma
register layout; Gluon lets each lane decode exactly the values its A fragment holds.
How: lane t of an m64k16 A fragment holds k = 2t, 2t+1, 2t+8, 2t+9 of each 16 columns. Columns
are permuted (`kappa`) so that, within each 64, lane t holds the original columns 16t..16t+15:
two whole 8-value groups (an IQ2_XXS grid octet, half a Q2_K/Q4_K sub-block). The activations
are permuted the same way (x before the launch, h by the gate/up store), so the sums are
unchanged. Per 8 values: one 8-byte load, two byte permutes (IQ2_XXS: via the grid tables),
then per value pair one permute + one f16x2 subtract + one f16x2 fma (scale, min).
Pipelining: each matrix's MMA runs asynchronously while the other's next tile is decoded; a
tile's weight bytes are loaded a step before its decode and activation tiles arrive by cp.async
three steps ahead (H200 measurements of each step: docs/PERFORMANCE.md).
Does not own: routing, tile lists (moe_prefill.py), decode-time experts (moe.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as GQ
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

FORMATS = (GQ.IQ2_XXS, GQ.Q2_K, GQ.Q4_K)
# Gluon is experimental: Triton 3.9 renamed 3.6's cp.async entry point
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


def fits(gate, up, down) -> bool:
    """Whether the kernels can read these experts: the 2-4 bit formats, whole 256-value blocks,
    and rows 8-byte aligned (each 8 values come in one 8-byte load; real IQ2_XXS rows of 4096
    are 1056 bytes, Q2_K rows of 2048 are 672)."""
    n_ff, dim = gate.shape[1], gate.shape[2]
    formats_ok = gate.qtype in FORMATS and up.qtype == gate.qtype and down.qtype in FORMATS
    aligned = all(w.data.shape[-1] % 8 == 0 for w in (gate, up, down))
    return formats_ok and aligned and n_ff % 256 == 0 and dim % 256 == 0


def supported(gate, up, down) -> bool:
    """Whether these experts take the Hopper kernels here: an sm_90 GPU and `fits`."""
    on_sm90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    return on_sm90 and fits(gate, up, down)


@triton.jit
def _kappa_source(c):
    """Original column read by MMA column c (within every 64)."""
    k = c % 64
    e, o1, o2 = k & 1, (k >> 1) & 1, (k >> 2) & 1
    q0, q1, o0 = (k >> 3) & 1, (k >> 4) & 1, (k >> 5) & 1
    return c - k + 8 * (o0 + 2 * o1 + 4 * o2) + 2 * (q0 + 2 * q1) + e


@triton.jit
def _x_kappa_kernel(x, xp, D, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x + t * D + _kappa_source(c))
    tl.store(xp + t * D + c, v.to(tl.float16))


def x_kappa(x: torch.Tensor) -> torch.Tensor:
    """float16 x with columns in MMA (kappa) order: what the gate/up kernel reads."""
    x = x.contiguous()
    xp = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    _x_kappa_kernel[(x.shape[0], x.shape[1] // 64)](x, xp, x.shape[1], BLOCK=64)
    return xp


@gluon.jit
def _kappa(c):
    """MMA column of original column c (the inverse of `_kappa_source`)."""
    k = c % 64
    e, q0, q1 = k & 1, (k >> 1) & 1, (k >> 2) & 1
    o0, o1, o2 = (k >> 3) & 1, (k >> 4) & 1, (k >> 5) & 1
    return c - k + e + 2 * o1 + 4 * o2 + 8 * q0 + 16 * q1 + 32 * o0


@gluon.constexpr_function
def _pair_layout(nw):
    # [rows, octet, pair]: lane 4r + t owns rows 16w + r (+8) and octets 2t, 2t+1, as the
    # wgmma A fragment does after the kappa permutation
    warps = [[16 << i, 0, 0] for i in range(nw.bit_length() - 1)]
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 1, 0], [8, 0, 0]],
        lane_bases=[[0, 2, 0], [0, 4, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=warps, block_bases=[], shape=[16 * nw, 8, 4],
    )  # fmt: skip


@gluon.constexpr_function
def _quad_layout(nw):
    # [rows, octet pair]: the same lanes as _pair_layout, one element per pair of octets (both
    # octets of a lane share their scales), so scales are loaded and computed once
    warps = [[16 << i, 0] for i in range(nw.bit_length() - 1)]
    return gl.DistributedLinearLayout(
        reg_bases=[[8, 0]], lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
        warp_bases=warps, block_bases=[], shape=[16 * nw, 4],
    )  # fmt: skip


@gluon.jit
def _octets(t, pair_l: gl.constexpr):
    """[BN, 4] per octet pair -> [BN, 8] per octet (each value twice, in the same registers)."""
    t = gl.reshape(gl.join(t, t), [t.shape[0], 8])
    return gl.convert_layout(t, gl.SliceLayout(2, pair_l))


@gluon.constexpr_function
def _mma_layout(nw, bm):
    return gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[nw, 1], instr_shape=[16, bm, 16]
    )


@gluon.constexpr_function
def _x_layout(nw):
    return gl.BlockedLayout([1, 8], [4, 8], [nw, 1], [1, 0])  # 16-byte cp.async per thread


@gluon.jit
def _f16x2(v):
    b = v.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return b | (b << 16)


@gluon.jit
def _permute_bytes(a: gl.constexpr, b: gl.constexpr, sel):
    z = gl.zeros_like(sel)
    return gl.inline_asm_elementwise(
        "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a + z, b + z, sel], dtype=gl.int32, is_pure=True,
        pack=1,
    )  # fmt: skip


@gluon.jit
def _smem_tables(tabs, NW: gl.constexpr):
    """Copy the IQ2_XXS selector words (tiles.tables: 256 grid words, 128 sign words) into a
    shared array declared in inline PTX (Gluon has no shared-memory gather): a lookup is then
    one 32-bit-addressed ld.shared instead of a 64-bit address and a global load. The array
    is 2 KB so the compiler's own buffers after it keep the 1 KB alignment of their 128-byte
    swizzle (wgmma applies it to the absolute address), and it only fits beside 24 KB of
    activation tiles (BM 64): the launch has no opt-in for more than 48 KB in all."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    i = gl.arange(0, 32 * NW, layout=lay)  # one element per thread: declared once
    base = gl.inline_asm_elementwise(
        ".shared .align 1024 .b32 iq2tab[512];\n\tmov.u32 $0, iq2tab;", "=r,r", [i],
        dtype=gl.int32, is_pure=False, pack=1,
    )  # fmt: skip
    tab32 = (tabs + 256).to(gl.pointer_type(gl.int32))
    for r in gl.static_range(384 // (32 * NW)):
        j = i + 32 * NW * r
        word = gl.load(tab32 + j)
        gl.inline_asm_elementwise(
            "st.shared.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r", [base + 4 * j, word],
            dtype=gl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    # in PTX like the stores it orders (Gluon renamed its barrier between Triton 3.6 and 3.9)
    gl.inline_asm_elementwise("bar.sync 0; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _table_base(like):
    """The shared table's address for every element of `like`; not pure, so the lookups that
    depend on it stay after the fill and its barrier."""
    return gl.inline_asm_elementwise(
        "mov.u32 $0, iq2tab;", "=r,r", [like], dtype=gl.int32, is_pure=False, pack=1
    )


@gluon.jit
def _lds(addr):
    return gl.inline_asm_elementwise(
        "ld.shared.b32 $0, [$1];", "=r,r", [addr], dtype=gl.int32, is_pure=True, pack=1
    )


@gluon.jit
def _to_a(lo, hi, bias, a2, c2, a_l: gl.constexpr, pair_l: gl.constexpr, BN: gl.constexpr):
    """Words lo, hi [BN, 8] of four bytes (bias + value) per octet, f16x2 scale a2 and offset
    c2 -> the float16 A operand [BN, 64] in kappa column order."""
    q = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, pair_l)))[None, None, :]
    word = gl.where(q < 2, gl.expand_dims(lo, 2), gl.expand_dims(hi, 2))
    sel = gl.where(q % 2 == 0, 0x4140, 0x4342)  # bytes (0, 1) or (2, 3) under exponent 0x64
    p = gl.inline_asm_elementwise(
        """{
        prmt.b32 $0, $1, 0x64646464, $2;
        sub.f16x2 $0, $0, $3;
        fma.rn.f16x2 $0, $0, $4, $5;
        }""",
        "=r,r,r,r,r,r",
        [word, sel, bias + gl.zeros_like(word), gl.expand_dims(a2, 2), gl.expand_dims(c2, 2)],
        dtype=gl.int32, is_pure=True, pack=1,
    )  # fmt: skip
    lo16 = (p & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True)
    hi16 = (p >> 16).to(gl.int16).to(gl.float16, bitcast=True)
    t = gl.reshape(gl.join(lo16, hi16), [BN, 2, 2, 2, 2, 2, 2])  # column bits o2 o1 o0 q1 q0 e
    t = gl.reshape(gl.permute(t, [0, 3, 4, 5, 1, 2, 6]), [BN, 64])  # kappa: o0 q1 q0 o2 o1 e
    return gl.convert_layout(t, a_l)  # the same registers: no data moves


@gluon.jit
def _a_raw(w, row_off, K, k0, FMT: gl.constexpr, pair_l: gl.constexpr, quad_l: gl.constexpr,
           BN: gl.constexpr):  # fmt: skip
    """The bytes behind the A operand of original columns k0 .. k0 + 64 (rows at byte offsets
    row_off [BN]), as loaded: (quants, scale, min, scale bytes; unused ones zero), scales per
    octet pair. Loaded a step before `_a_tile` decodes them, so the weight reads overlap the
    MMAs."""
    o = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, pair_l)))  # 8-value group
    p = gl.arange(0, 4, layout=gl.SliceLayout(0, quad_l))  # octets 2p, 2p + 1
    base = w + row_off[:, None]
    base4 = w + gl.convert_layout(row_off, gl.SliceLayout(1, quad_l))[:, None]
    zero = gl.zeros([BN, 4], gl.uint8, layout=quad_l)
    if FMT == 16:  # IQ2_XXS: 32-value groups of words A (grid indices), B (signs, scale)
        g = k0 // 32 + p // 2
        q = gl.load((base4 + 8 * g[None, :]).to(gl.pointer_type(gl.int64)))
        d = gl.load((base4 + K // 4 + 2 * (g // 8)[None, :]).to(gl.pointer_type(gl.float16)))
        raw = (q, d, d, zero, zero, zero)
    elif FMT == 10:  # Q2_K: 16-value sub-blocks, 2-bit planes of 32-byte runs
        gs = k0 // 16 + o // 2
        b, s = gs // 16, gs % 16
        qoff = 64 * b + 32 * (s // 8) + 16 * (s % 2) + 8 * (o % 2)
        q = gl.load((base + qoff[None, :]).to(gl.pointer_type(gl.int64)))
        gs4 = k0 // 16 + p
        b4 = gs4 // 16
        sc = gl.load(base4 + K // 4 + 16 * b4[None, :] + (gs4 % 16)[None, :])
        dm = (base4 + K // 4 + 16 * (K // 256) + 4 * b4[None, :]).to(gl.pointer_type(gl.float16))
        raw = (q, gl.load(dm), gl.load(dm + 1), sc, zero, zero)
    else:  # Q4_K: 32-value sub-blocks, nibbles of 32-byte runs, 6-bit scales and mins
        gj = k0 // 32 + o // 4
        b, j = gj // 8, gj % 8
        qoff = 128 * b + 32 * (j // 2) + 8 * (o % 4)
        q = gl.load((base + qoff[None, :]).to(gl.pointer_type(gl.int64)))
        gj4 = k0 // 32 + p // 2
        b4, j4 = gj4 // 8, gj4 % 8
        scb = base4 + K // 2 + 12 * b4[None, :] + (j4 % 4)[None, :]
        dm = (base4 + K // 2 + 12 * (K // 256) + 4 * b4[None, :]).to(gl.pointer_type(gl.float16))
        # bytes j, j + 4, j + 8 hold the 6-bit scale and min of sub-block j (see _a_tile);
        # kept as loaded: arithmetic on them here would wait for the load a step early
        raw = (q, gl.load(dm), gl.load(dm + 1), gl.load(scb), gl.load(scb + 4), gl.load(scb + 8))
    return raw


@gluon.jit
def _a_tile(raw, tab, tabs, k0, FMT: gl.constexpr, SMEM_TAB: gl.constexpr, a_l: gl.constexpr,
            pair_l: gl.constexpr, BN: gl.constexpr):  # fmt: skip
    """The float16 A operand [BN, 64] (kappa column order) from `_a_raw`'s bytes: four bytes
    (bias + value) per word for the 8 values of each octet, then `_to_a` with the f16x2 scale
    and offset. IQ2_XXS selector words come from the shared copy at `tab` ([BN, 8],
    `_table_base`) if SMEM_TAB, else from `tabs` in global memory."""
    q, d, dmin, c0, c1, c2 = raw
    o = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, pair_l)))
    if FMT == 16:
        q = _octets(q, pair_l)
        bu4 = (raw[0] >> 32).to(gl.uint32)
        a2 = _octets(_f16x2(d.to(gl.float32) * ((bu4 >> 27) | 1).to(gl.float32) * 0.125), pair_l)
        sub = o % 4
        a = (q & 0xFFFFFFFF).to(gl.int32)
        bu = (q >> 32).to(gl.uint32)
        gi = (a >> (8 * sub)[None, :]) & 255
        si = ((bu >> (7 * sub)[None, :].to(gl.uint32)) & 127).to(gl.int32)
        if SMEM_TAB:
            sel = _lds(tab + 4 * gi) | _lds(tab + 1024 + 4 * si)
        else:
            tab32 = (tabs + 256).to(gl.pointer_type(gl.int32))
            sel = gl.load(tab32 + gi) | gl.load(tab32 + 256 + si)
        # bytes 128 + v for v in (8, 25, 43 | -8, -25, -43), picked by code | sign << 2
        lo = _permute_bytes(0x00AB9988, 0x00556778, sel)
        hi = _permute_bytes(0x00AB9988, 0x00556778, sel >> 16)
        b2 = gl.zeros([BN, 8], gl.int32, layout=gl.SliceLayout(2, pair_l))
    elif FMT == 10:
        s = (k0 // 16 + o // 2) % 16
        sc = c0.to(gl.int32)
        a2 = _octets(_f16x2(d.to(gl.float32) * (sc & 15).to(gl.float32)), pair_l)
        b2 = _octets(_f16x2(-dmin.to(gl.float32) * (sc >> 4).to(gl.float32)), pair_l)
        shift = (2 * ((s % 8) // 2))[None, :]
        lo = ((q & 0xFFFFFFFF).to(gl.int32) >> shift) & 0x03030303
        hi = ((q >> 32).to(gl.int32) >> shift) & 0x03030303
    else:
        j = (k0 // 32 + o // 4) % 8
        # 6-bit scale and min of sub-block j: low bits in bytes j, j + 4 (j < 4), else in the
        # nibbles of byte j + 8 with the top bits from bytes j - 4, j
        lo6, mid, hi4 = c0.to(gl.int32), c1.to(gl.int32), c2.to(gl.int32)
        low = (gl.arange(0, 4, layout=gl.SliceLayout(0, lo6.type.layout)) // 2 + k0 // 32) % 8 < 4
        sc = gl.where(low[None, :], lo6 & 63, (hi4 & 15) | ((lo6 >> 6) << 4))
        mn = gl.where(low[None, :], mid & 63, (hi4 >> 4) | ((mid >> 6) << 4))
        a2 = _octets(_f16x2(d.to(gl.float32) * sc.to(gl.float32)), pair_l)
        b2 = _octets(_f16x2(-dmin.to(gl.float32) * mn.to(gl.float32)), pair_l)
        shift = (4 * (j % 2))[None, :]
        lo = ((q & 0xFFFFFFFF).to(gl.int32) >> shift) & 0x0F0F0F0F
        hi = ((q >> 32).to(gl.int32) >> shift) & 0x0F0F0F0F
    bias: gl.constexpr = 0x64806480 if FMT == 16 else 0x64006400
    return _to_a(lo, hi, bias, a2, b2, a_l, pair_l, BN)


@gluon.jit
def _x_prefetch(x_smem, xrow, xvalid, i, n_steps: gl.constexpr):
    """cp.async the activation tile of step i into buffer i % 3 (zeros past the last step)."""
    _async_load(x_smem.index(i % 3), xrow + 64 * i, mask=xvalid & (i < n_steps))
    async_copy.commit_group()


@gluon.jit
def _x_ready():
    """This thread's copies of the next step's tile have landed (the two after it stay in
    flight) and are visible to wgmma; the compiler's barrier before the wgmma that reads the
    buffer (a read after asynchronous writes) makes everyone's visible."""
    async_copy.wait_group(2)
    fence_async_shared()


@gluon.jit
def _two_streams(w0, off0, w1, off1, tabs, xrow, xvalid, K: gl.constexpr, FMT: gl.constexpr,
                 BM: gl.constexpr, NW: gl.constexpr):  # fmt: skip
    """Two weight blocks (rows at byte offsets off0 / off1 of w0 / w1) times the same
    activation tiles: each block's MMA runs while the other block's next tile is decoded;
    weight bytes are loaded a step (block 1) or 1.5 steps (block 0) before their decode.
    The activation tile of step i + 3 is requested at the end of step i, into the buffer step
    i read: the compiler then places two CTA barriers per step (before the copy, after the
    wait); with the request mid-step and a barrier of our own it placed five."""
    BN: gl.constexpr = 16 * NW
    mma: gl.constexpr = _mma_layout(NW, BM)
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    pair_l: gl.constexpr = _pair_layout(NW)
    quad_l: gl.constexpr = _quad_layout(NW)
    x_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    x_smem = gl.allocate_shared_memory(gl.float16, [3, BM, 64], x_sl)
    acc0 = gl.zeros([BN, BM], gl.float32, layout=mma)
    acc1 = gl.zeros([BN, BM], gl.float32, layout=mma)
    n_steps: gl.constexpr = K // 64
    last: gl.constexpr = K - 64
    tab = gl.zeros([BN, 8], gl.int32, layout=gl.SliceLayout(2, pair_l))
    SMEM_TAB: gl.constexpr = FMT == 16 and BM == 64
    if SMEM_TAB:
        _smem_tables(tabs, NW)
        tab = _table_base(tab)
    r1 = _a_raw(w1, off1, K, 0, FMT, pair_l, quad_l, BN)
    r0 = _a_raw(w0, off0, K, 0, FMT, pair_l, quad_l, BN)
    _x_prefetch(x_smem, xrow, xvalid, 0, n_steps)
    _x_prefetch(x_smem, xrow, xvalid, 1, n_steps)
    _x_prefetch(x_smem, xrow, xvalid, 2, n_steps)
    a0 = _a_tile(r0, tab, tabs, 0, FMT, SMEM_TAB, a_l, pair_l, BN)
    r0 = _a_raw(w0, off0, K, 64, FMT, pair_l, quad_l, BN)
    _x_ready()
    for i in range(n_steps):
        k0 = i * 64
        k1 = gl.minimum(k0 + 64, last)  # past the end: a decode that no MMA reads
        xb = x_smem.index(i % 3).permute((1, 0))
        acc0 = warpgroup_mma(a0, xb, acc0, is_async=True)
        a1 = _a_tile(r1, tab, tabs, k0, FMT, SMEM_TAB, a_l, pair_l, BN)
        r1 = _a_raw(w1, off1, K, k1, FMT, pair_l, quad_l, BN)
        acc0, a0 = warpgroup_mma_wait(0, deps=[acc0, a0])  # A registers live until read
        acc1 = warpgroup_mma(a1, xb, acc1, is_async=True)
        a0 = _a_tile(r0, tab, tabs, k1, FMT, SMEM_TAB, a_l, pair_l, BN)
        r0 = _a_raw(w0, off0, K, gl.minimum(k0 + 128, last), FMT, pair_l, quad_l, BN)
        acc1, a1 = warpgroup_mma_wait(0, deps=[acc1, a1])
        _x_prefetch(x_smem, xrow, xvalid, i + 3, n_steps)  # into the buffer step i read
        _x_ready()
    return acc0, acc1


@gluon.jit
def _tile_info(tiles):
    r = gl.program_id(1)  # row blocks vary fastest: a tile's CTAs run together
    return (
        gl.load(tiles + 3 * r).to(gl.int64),
        gl.load(tiles + 3 * r + 1),
        gl.load(tiles + 3 * r + 2),
    )


@gluon.jit
def _gate_up_kernel(
    xp, order, wts, tiles, gate, up, tabs, h, RB, clamp,
    F: gl.constexpr, D: gl.constexpr, KTOP: gl.constexpr, FMT: gl.constexpr,
    BM: gl.constexpr, NW: gl.constexpr,
):  # fmt: skip
    BN: gl.constexpr = 16 * NW
    mma: gl.constexpr = _mma_layout(NW, BM)
    pair_l: gl.constexpr = _pair_layout(NW)
    x_l: gl.constexpr = _x_layout(NW)
    e, start, end = _tile_info(tiles)
    if start >= end:  # the grid is sized for the most tiles any routing can make
        return
    rn = gl.program_id(0) * BN + gl.arange(
        0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, pair_l))
    )
    row_off = (e * F + rn) * RB
    xr = start + gl.arange(0, BM, layout=gl.SliceLayout(1, x_l))
    xvalid = (xr < end)[:, None]
    slot = gl.load(order + xr, mask=xr < end, other=0)
    xrow = (
        xp
        + (slot // KTOP).to(gl.int64)[:, None] * D
        + gl.arange(0, 64, layout=gl.SliceLayout(0, x_l))[None, :]
    )
    acc_g, acc_u = _two_streams(gate, row_off, up, row_off, tabs, xrow, xvalid, D, FMT, BM, NW)
    g = gl.minimum(acc_g, clamp)
    u = gl.minimum(gl.maximum(acc_u, -clamp), clamp)
    cols = start + gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    cvalid = cols < end
    w = gl.load(wts + gl.load(order + cols, mask=cvalid, other=0), mask=cvalid, other=0.0)
    hv = g / (1.0 + gl.exp(-g)) * u * w[None, :]
    hc = _kappa(gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma)))
    gl.store(
        h + cols.to(gl.int64)[None, :] * F + hc[:, None], hv.to(gl.float16), mask=cvalid[None, :]
    )


@gluon.jit
def _down_kernel(
    hp, order, tiles, down, tabs, y, RB,
    F: gl.constexpr, D: gl.constexpr, FMT: gl.constexpr, BM: gl.constexpr, NW: gl.constexpr,
):  # fmt: skip
    # two row blocks per program, pipelined like gate/up: each MMA overlaps the next decode
    BN: gl.constexpr = 16 * NW
    mma: gl.constexpr = _mma_layout(NW, BM)
    pair_l: gl.constexpr = _pair_layout(NW)
    x_l: gl.constexpr = _x_layout(NW)
    e, start, end = _tile_info(tiles)
    if start >= end:
        return
    r0 = gl.program_id(0) * 2 * BN
    rn = r0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, pair_l)))
    off0 = (e * D + rn) * RB
    off1 = off0 + BN * RB
    xr = start + gl.arange(0, BM, layout=gl.SliceLayout(1, x_l))
    xvalid = (xr < end)[:, None]
    xrow = (
        hp + xr.to(gl.int64)[:, None] * F + gl.arange(0, 64, layout=gl.SliceLayout(0, x_l))[None, :]
    )
    acc0, acc1 = _two_streams(down, off0, down, off1, tabs, xrow, xvalid, F, FMT, BM, NW)
    cols = start + gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    slot = gl.load(order + cols, mask=cols < end, other=0)  # straight to (token, slot) rows
    rr = r0 + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    dst = y + slot.to(gl.int64)[None, :] * D + rr[:, None]
    mask = (cols < end)[None, :]
    gl.store(dst, acc0, mask=mask)
    gl.store(dst + BN, acc1, mask=mask)


def grouped(x, order, wts, tiles, gate, up, down, k, clamp, tabs, cfg) -> torch.Tensor:
    """moe_prefill.grouped on sm_90 (x float32 or float16): y [slots, dim] float32 in
    (token, slot) order."""
    n_exp, n_ff, dim = gate.shape
    n_slots, n_tiles = order.numel(), tiles.shape[0]
    bm, nw = cfg["BM"], 4  # one warpgroup per program (8 warps measured slower)
    xp = x_kappa(x)
    h = torch.empty(n_slots, n_ff, dtype=torch.float16, device=x.device)
    y = torch.empty(n_slots, dim, dtype=torch.float32, device=x.device)
    # IQ2_XXS gate/up at BM 64 fits 128 registers without spilling: four programs per SM
    # instead of three (H200: 2.59 -> 2.49 ms at 2048 routed tokens); the others spill there
    regs = {"maxnreg": 128} if gate.qtype == GQ.IQ2_XXS and bm == 64 else {}
    _gate_up_kernel[(n_ff // (16 * nw), n_tiles)](
        xp, order, wts, tiles, gate.data, up.data, tabs, h, gate.data.shape[-1], float(clamp),
        F=n_ff, D=dim, KTOP=k, FMT=int(gate.qtype), BM=bm, NW=nw, num_warps=nw, **regs,
    )  # fmt: skip
    _down_kernel[(dim // (32 * nw), n_tiles)](
        h, order, tiles, down.data, tabs, y, down.data.shape[-1], F=n_ff, D=dim,
        FMT=int(down.qtype), BM=bm, NW=nw, num_warps=nw,
    )  # fmt: skip
    return y
