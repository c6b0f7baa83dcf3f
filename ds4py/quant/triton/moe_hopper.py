"""Routed-expert prefill on Hopper (sm_90) in Gluon: the weight tile decoded straight into the
wgmma A-operand registers.

Owns: the gate/up and down launches of `moe_prefill` for IQ2_XXS / Q2_K / Q4_K experts on sm_90
(moe_prefill.py picks them; same inputs and outputs as its Triton kernels, which stay the
reference path and the one the interpreter tests). Why Gluon: in Triton the decoded tile goes
through shared memory (four store/barrier/load rounds per 64x64 tile) to reach the wgmma
register layout; Gluon lets each lane decode exactly the values its A fragment holds.
How: lane t of an m64k16 A fragment holds k = 2t, 2t+1, 2t+8, 2t+9 of each 16 columns (t, the
lane's quarter). Columns are permuted (`kappa`, per weight format) so that over the four MMA
steps of a 256-column block, lane t decodes exactly the values in one 16-byte run of the
block's quants (Q4_K: 32 bytes), loaded once per block and row; each step it takes 16 of them
(two octets: IQ2_XXS grid octets, or a Q2_K 2-bit plane / Q4_K nibble of 16 bytes), so every
shift is a constant. The activations are permuted the same way (x before the launch, h by the
gate/up store, in the down format's order), so the sums are unchanged. Per 8 values: two byte
permutes (IQ2_XXS: via the grid tables) or shifts, then per value pair one permute + one f16x2
subtract + one f16x2 fma (scale, min).
Pipelining: each matrix's MMA runs asynchronously while the other's next tile is decoded; a
block's weight bytes are loaded one to two steps before its first decode (Q4_K: each half of
them, to fit three programs per SM), at BM 64 after an L2 prefetch a block earlier, and
activation tiles arrive by cp.async three steps ahead (H200 measurements: docs/PERFORMANCE.md).
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
def _kappa_source(c, FMT: tl.constexpr):
    """Original column read by MMA column c. MMA step s (64 columns) of 256-column block b,
    A-fragment lane quarter t, octet o0 of the lane, value w of the octet:"""
    k = c % 64
    t, o0 = (k >> 1) & 3, (k >> 5) & 1
    w = 2 * (((k >> 3) & 1) + 2 * ((k >> 4) & 1)) + (k & 1)
    s = (c // 64) % 4
    if FMT == 16:  # IQ2_XXS: lane t's bytes are groups 2t, 2t + 1; step s reads octet s of each
        src = 64 * t + 32 * o0 + 8 * s + w
    elif FMT == 10:  # Q2_K: lane t's bytes 16t .. 16t + 15 hold 4 planes; step s reads plane s
        src = 128 * (t // 2) + 16 * (t % 2) + 32 * s + 8 * o0 + w
    else:  # Q4_K: lane t's bytes 32t .. 32t + 31; step s reads half s // 2, nibble s % 2
        src = 64 * t + 32 * (s % 2) + 16 * (s // 2) + 8 * o0 + w
    return c - c % 256 + src


@triton.jit
def _x_kappa_kernel(x, xp, D, FMT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x + t * D + _kappa_source(c, FMT))
    tl.store(xp + t * D + c, v.to(tl.float16))


def x_kappa(x: torch.Tensor, qtype: GQ) -> torch.Tensor:
    """float16 x with columns in the MMA (kappa) order of `qtype` weights: what the gate/up
    kernel reads."""
    x = x.contiguous()
    xp = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    _x_kappa_kernel[(x.shape[0], x.shape[1] // 64)](x, xp, x.shape[1], FMT=int(qtype), BLOCK=64)
    return xp


@gluon.jit
def _kappa(c, FMT: gl.constexpr):
    """MMA column of original column c (the inverse of `_kappa_source`)."""
    r = c % 256
    w = r % 8
    if FMT == 16:
        t, o0, s = r // 64, (r // 32) % 2, (r // 8) % 4
    elif FMT == 10:
        t, o0, s = 2 * (r // 128) + (r // 16) % 2, (r // 8) % 2, (r // 32) % 4
    else:
        t, o0, s = r // 64, (r // 8) % 2, 2 * ((r // 16) % 2) + (r // 32) % 2
    k = (w & 1) + 2 * t + 8 * ((w >> 1) & 1) + 16 * (w >> 2) + 32 * o0
    return c - r + 64 * s + k


@gluon.constexpr_function
def _pair_layout(nw):
    # [rows, octet, pair]: lane 4r + t owns rows 16w + r (+8) and octets 2t, 2t+1 of each MMA
    # step, as the wgmma A fragment does after the kappa permutation
    warps = [[16 << i, 0, 0] for i in range(nw.bit_length() - 1)]
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 1, 0], [8, 0, 0]],
        lane_bases=[[0, 2, 0], [0, 4, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=warps, block_bases=[], shape=[16 * nw, 8, 4],
    )  # fmt: skip


@gluon.constexpr_function
def _quad_layout(nw):
    # [rows, lane quarter]: the same lanes as _pair_layout, one element per lane and row (its
    # quant bytes of a block, its scales), so those are loaded and computed once
    warps = [[16 << i, 0] for i in range(nw.bit_length() - 1)]
    return gl.DistributedLinearLayout(
        reg_bases=[[8, 0]], lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
        warp_bases=warps, block_bases=[], shape=[16 * nw, 4],
    )  # fmt: skip


@gluon.jit
def _pair(t0, t1, pair_l: gl.constexpr):
    """[BN, 4] per lane quarter, for octets 0 and 1 of the lane -> [BN, 8] per octet."""
    t = gl.reshape(gl.join(t0, t1), [t0.shape[0], 8])
    return gl.convert_layout(t, gl.SliceLayout(2, pair_l))


@gluon.jit
def _octets(t, pair_l: gl.constexpr):
    """[BN, 4] per lane quarter -> [BN, 8] per octet (each value twice, in the same registers)."""
    return _pair(t, t, pair_l)


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
def _permute_bytes(a, b: gl.constexpr, sel):
    return gl.inline_asm_elementwise(
        "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b + gl.zeros_like(sel), sel], dtype=gl.int32,
        is_pure=True, pack=1,
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
    for r in gl.static_range((384 + 32 * NW - 1) // (32 * NW)):
        j = gl.minimum(i + 32 * NW * r, 383)  # 8 warps: the last word again, the same value
        word = gl.load(tab32 + j)
        gl.inline_asm_elementwise(
            "st.shared.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r", [base + 4 * j, word],
            dtype=gl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    # words 384-387: the permute's magnitude word (tiles.tables), read back by `_magnitudes`
    word = gl.load(tab32 + 384 + 0 * i)
    gl.inline_asm_elementwise(
        "st.shared.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r", [base + 1536 + 4 * (i % 4), word],
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
def _magnitudes(tab, pair_l: gl.constexpr):
    """The permute's magnitude word for every element of `tab` ([BN, 8]), each lane reading one
    of four copies: ptxas keeps a value it cannot prove uniform in a register, where it would
    rebuild a constant (or a uniform register's copy) before each of the 16 permutes per step."""
    o = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, pair_l)))
    return _lds(tab + 1536 + 4 * ((o // 2) % 4)[None, :])


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
def _load4(p, A16: gl.constexpr):
    """The four words at byte addresses p (8-byte aligned): one 16-byte load if A16."""
    if A16:
        v = gl.inline_asm_elementwise(
            "ld.global.v4.u32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [p],
            dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1,
        )  # fmt: skip
    else:
        v = gl.inline_asm_elementwise(
            "ld.global.v2.u32 {$0, $1}, [$4];\n\tld.global.v2.u32 {$2, $3}, [$4+8];",
            "=r,=r,=r,=r,l", [p], dtype=(gl.int32, gl.int32, gl.int32, gl.int32),
            is_pure=True, pack=1,
        )  # fmt: skip
    return v


@gluon.jit
def _lane_run(w, row_off, b, FMT: gl.constexpr, quad_l: gl.constexpr):
    """[rows, lane quarter t]: each row's address, the address of the lane's quant bytes of
    block b (16 at 64b + 16t; Q4_K 32 at 128b + 32t), and t."""
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, quad_l))[None, :]
    base = w + gl.convert_layout(row_off, gl.SliceLayout(1, quad_l))[:, None]
    return base, base + (128 * b + 32 * t if FMT == 12 else 64 * b + 16 * t), t


@gluon.jit
def _a_raw(w, row_off, K, b, FMT: gl.constexpr, quad_l: gl.constexpr, A16: gl.constexpr,
           LATE: gl.constexpr):  # fmt: skip
    """The bytes behind the A operands of the four MMA steps of 256-column block b (rows at
    byte offsets row_off [BN]), as loaded: each lane's 16 (Q4_K: 32) quant bytes of a row in
    one load (the old per-step 8-byte loads of 8 rows a warp kept the L1 data pipe 70-84 %
    busy), then the block's scales. Loaded a block or more ahead of `_a_tile`."""
    base, run, t = _lane_run(w, row_off, b, FMT, quad_l)
    if FMT == 16:  # IQ2_XXS: words A (grid indices), B (signs, scale) of groups 2t, 2t + 1
        q = _load4(run, A16)
        d = gl.load((base + K // 4 + 2 * b).to(gl.pointer_type(gl.float16)))
        raw = (q, d, d)
    elif FMT == 10:  # Q2_K: 2-bit planes; scale bytes 8h .. 8h + 7 (h = t // 2); d, dmin
        q = _load4(run, A16)
        sc = gl.load((base + K // 4 + 16 * b + 8 * (t // 2)).to(gl.pointer_type(gl.int64)))
        dm = gl.load((base + K // 4 + 16 * (K // 256) + 4 * b).to(gl.pointer_type(gl.int32)))
        raw = (q, sc, dm)
    else:  # Q4_K: the first 16 nibble bytes; the 12 bytes of 6-bit scales and mins; d, dmin;
        # the other 16 nibble bytes unless LATE (then `_q4_second_half` loads them)
        q = _load4(run, A16)
        q2 = q if LATE else _load4(run + 16, A16)
        sc = (base + K // 2 + 12 * b).to(gl.pointer_type(gl.int32))
        dm = gl.load((base + K // 2 + 12 * (K // 256) + 4 * b).to(gl.pointer_type(gl.int32)))
        raw = (q, (gl.load(sc), gl.load(sc + 1), gl.load(sc + 2)), dm, q2)
    return raw


@gluon.jit
def _q4_second_half(w, row_off, b, first, quad_l: gl.constexpr, A16: gl.constexpr,
                    LATE: gl.constexpr):  # fmt: skip
    """Q4_K: `first` (`_a_raw` of block b) for steps 2 and 3: the lane's other 16 nibble bytes,
    loaded now if LATE (a block's two halves are then never live at once: at BM 64 the
    kernels fit 168 registers, three programs per SM)."""
    q2 = first[3]
    if LATE:
        q2 = _load4(_lane_run(w, row_off, b, 12, quad_l)[1] + 16, A16)
    return (q2, first[1], first[2], q2)


@gluon.jit
def _prefetch_l2(w, row_off, b, FMT: gl.constexpr, quad_l: gl.constexpr):
    """Ask L2 for the quant bytes of block b (each lane its own 16 / 32 of a row's block), so
    that `_a_raw`'s loads of that block later find them there."""
    run = _lane_run(w, row_off, b, FMT, quad_l)[1]
    gl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [run], dtype=gl.int32,
        is_pure=False, pack=1,
    )  # fmt: skip


@gluon.jit
def _f16_lo(v):
    return (v & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)


@gluon.jit
def _a_tile(raw, tab, mag, tabs, s: gl.constexpr, FMT: gl.constexpr, SMEM_TAB: gl.constexpr,
            a_l: gl.constexpr, pair_l: gl.constexpr, quad_l: gl.constexpr,
            BN: gl.constexpr):  # fmt: skip
    """The float16 A operand [BN, 64] (kappa column order) of MMA step s of `_a_raw`'s block:
    four bytes (bias + value) per word for the 8 values of each octet, then `_to_a` with the
    f16x2 scale and offset. IQ2_XXS selector words come from the shared copy at `tab`
    ([BN, 8], `_table_base`) if SMEM_TAB, else from `tabs` in global memory."""
    q, sc, dm = raw[0], raw[1], raw[2]
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, quad_l))[None, :]
    if FMT == 16:
        a = _pair(q[0], q[2], pair_l)
        bu = _pair(q[1], q[3], pair_l)
        d = sc.to(gl.float32) * 0.125
        a2 = _pair(_f16x2(d * ((q[1] >> 27) & 31 | 1).to(gl.float32)),
                   _f16x2(d * ((q[3] >> 27) & 31 | 1).to(gl.float32)), pair_l)  # fmt: skip
        if s == 0:  # byte s of A, 7 bits s of B, as word offsets (x 4)
            gi, si = (a << 2) & 0x3FC, (bu << 2) & 0x1FC
        else:
            gi, si = (a >> (8 * s - 2)) & 0x3FC, (bu >> (7 * s - 2)) & 0x1FC
        if SMEM_TAB:
            sel = _lds(tab + gi) | _lds(tab + 1024 + si)
        else:
            tab32 = (tabs + 256).to(gl.pointer_type(gl.int32))
            sel = gl.load(tab32 + gi // 4) | gl.load(tab32 + 256 + si // 4)
        # bytes 128 + v for v in (8, 25, 43 | -8, -25, -43), picked by code | sign << 2
        lo = _permute_bytes(mag, 0x00556778, sel)
        hi = _permute_bytes(mag, 0x00556778, sel >> 16)
        b2 = gl.zeros([BN, 8], gl.int32, layout=gl.SliceLayout(2, pair_l))
    elif FMT == 10:
        lo = (_pair(q[0], q[2], pair_l) >> (2 * s)) & 0x03030303
        hi = (_pair(q[1], q[3], pair_l) >> (2 * s)) & 0x03030303
        # sub-block 8h + 2s + t % 2: byte t % 2 + 2s of the lane's eight scale bytes
        word = (sc >> (32 * (s // 2))).to(gl.int32)
        c = (word >> (8 * (t % 2) + 16 * (s % 2))) & 255
        a2 = _octets(_f16x2(_f16_lo(dm) * (c & 15).to(gl.float32)), pair_l)
        b2 = _octets(_f16x2(-_f16_lo(dm >> 16) * (c >> 4).to(gl.float32)), pair_l)
    else:  # q: the 16 bytes of half s // 2 (`_a_raw` or `_q4_second_half`)
        lo = (_pair(q[0], q[2], pair_l) >> (4 * (s % 2))) & 0x0F0F0F0F
        hi = (_pair(q[1], q[3], pair_l) >> (4 * (s % 2))) & 0x0F0F0F0F
        # 6-bit scale and min of sub-block j = 2t + s % 2: low bits in bytes j, j + 4 (j < 4),
        # else in the nibbles of byte j + 4 with the top bits from bytes j - 4, j
        sh = 8 * (2 * (t % 2) + s % 2)
        x0, x1, x2 = (sc[0] >> sh) & 255, (sc[1] >> sh) & 255, (sc[2] >> sh) & 255
        low = t < 2
        c = gl.where(low, x0 & 63, (x2 & 15) | ((x0 >> 6) << 4))
        m = gl.where(low, x1 & 63, (x2 >> 4) | ((x1 >> 6) << 4))
        a2 = _octets(_f16x2(_f16_lo(dm) * c.to(gl.float32)), pair_l)
        b2 = _octets(_f16x2(-_f16_lo(dm >> 16) * m.to(gl.float32)), pair_l)
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
                 BM: gl.constexpr, NW: gl.constexpr, A16: gl.constexpr,
                 PF: gl.constexpr):  # fmt: skip
    """Two weight blocks (rows at byte offsets off0 / off1 of w0 / w1) times the same
    activation tiles: each block's MMA runs while the other block's next tile is decoded.
    A 256-column block's weight bytes are loaded during its predecessor's last steps. The
    activation tile of step i + 3 is requested at the end of step i, into the buffer step i
    read: the compiler then places two CTA barriers per step (before the copy, after the
    wait); with the request mid-step and a barrier of our own it placed five. PF > 0: each
    block's decode also asks L2 for the quant bytes of block b + PF."""
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
    last: gl.constexpr = K // 256 - 1
    tab = gl.zeros([BN, 8], gl.int32, layout=gl.SliceLayout(2, pair_l))
    mag = gl.full([BN, 8], 0x00AB9988, gl.int32, layout=gl.SliceLayout(2, pair_l))
    SMEM_TAB: gl.constexpr = FMT == 16 and BM == 64
    if SMEM_TAB:
        _smem_tables(tabs, NW)
        tab = _table_base(tab)
        mag = _magnitudes(tab, pair_l)
    # Q4_K halves apart only at BM 64 (for 168 registers): at BM 128 the kernels spill either
    # way and loading both halves at once measured 4 % faster
    LATE: gl.constexpr = BM == 64
    r0 = _a_raw(w0, off0, K, 0, FMT, quad_l, A16, LATE)
    r1 = _a_raw(w1, off1, K, 0, FMT, quad_l, A16, LATE)
    _x_prefetch(x_smem, xrow, xvalid, 0, n_steps)
    _x_prefetch(x_smem, xrow, xvalid, 1, n_steps)
    _x_prefetch(x_smem, xrow, xvalid, 2, n_steps)
    a0 = _a_tile(r0, tab, mag, tabs, 0, FMT, SMEM_TAB, a_l, pair_l, quad_l, BN)
    _x_ready()
    for b in range(K // 256):
        for s in gl.static_range(4):
            xb = x_smem.index((4 * b + s) % 3).permute((1, 0))
            acc0 = warpgroup_mma(a0, xb, acc0, is_async=True)
            a1 = _a_tile(r1, tab, mag, tabs, s, FMT, SMEM_TAB, a_l, pair_l, quad_l, BN)
            # the next block's bytes (past the end: the last again, decoded, never read), one
            # and two steps before their first decode: three blocks' bytes live at most; Q4_K
            # loads the second half of a block's bytes after the first half's last decode
            if FMT == 12 and s == 0:
                p0 = _q4_second_half(w0, off0, b, r0, quad_l, A16, LATE)
            if FMT == 12 and s == 1:
                r1 = _q4_second_half(w1, off1, b, r1, quad_l, A16, LATE)
            if PF > 0 and s == 0:
                _prefetch_l2(w0, off0, gl.minimum(b + PF, last), FMT, quad_l)
            if PF > 0 and s == 1:
                _prefetch_l2(w1, off1, gl.minimum(b + PF, last), FMT, quad_l)
            if s == 2:
                n0 = _a_raw(w0, off0, K, gl.minimum(b + 1, last), FMT, quad_l, A16, LATE)
            if s == 3:
                n1 = _a_raw(w1, off1, K, gl.minimum(b + 1, last), FMT, quad_l, A16, LATE)
            acc0, a0 = warpgroup_mma_wait(0, deps=[acc0, a0])  # A registers live until read
            acc1 = warpgroup_mma(a1, xb, acc1, is_async=True)
            if FMT == 12 and s == 1:
                r0 = p0
            if s < 3:
                a0 = _a_tile(r0, tab, mag, tabs, s + 1, FMT, SMEM_TAB, a_l, pair_l, quad_l, BN)
            else:
                a0 = _a_tile(n0, tab, mag, tabs, 0, FMT, SMEM_TAB, a_l, pair_l, quad_l, BN)
            acc1, a1 = warpgroup_mma_wait(0, deps=[acc1, a1])
            _x_prefetch(x_smem, xrow, xvalid, 4 * b + s + 3, n_steps)  # into the buffer just read
            _x_ready()
        r0, r1 = n0, n1
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
    DFMT: gl.constexpr, BM: gl.constexpr, NW: gl.constexpr, A16: gl.constexpr, PF: gl.constexpr,
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
    acc_g, acc_u = _two_streams(gate, row_off, up, row_off, tabs, xrow, xvalid, D, FMT, BM, NW,
                                A16, PF)  # fmt: skip
    g = gl.minimum(acc_g, clamp)
    u = gl.minimum(gl.maximum(acc_u, -clamp), clamp)
    cols = start + gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    cvalid = cols < end
    w = gl.load(wts + gl.load(order + cols, mask=cvalid, other=0), mask=cvalid, other=0.0)
    hv = g / (1.0 + gl.exp(-g)) * u * w[None, :]
    # h in the down kernel's kappa order
    hc = _kappa(gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma)), DFMT)
    gl.store(
        h + cols.to(gl.int64)[None, :] * F + hc[:, None], hv.to(gl.float16), mask=cvalid[None, :]
    )


@gluon.jit
def _down_kernel(
    hp, order, tiles, down, tabs, y, RB,
    F: gl.constexpr, D: gl.constexpr, FMT: gl.constexpr, BM: gl.constexpr, NW: gl.constexpr,
    A16: gl.constexpr, PF: gl.constexpr,
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
    acc0, acc1 = _two_streams(down, off0, down, off1, tabs, xrow, xvalid, F, FMT, BM, NW, A16,
                              PF)  # fmt: skip
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
    # one warpgroup per program (q2: 8 warps measured slower; cfg "NW" for the benchmark)
    # L2 prefetch a block ahead at BM 64 (H200 cycles, 2048 tokens: q4 -6 %, q2 -3 %)
    bm, nw, pf = cfg["BM"], cfg.get("NW", 4), cfg.get("PF", 1 if cfg["BM"] == 64 else 0)
    xp = x_kappa(x, gate.qtype)
    h = torch.empty(n_slots, n_ff, dtype=torch.float16, device=x.device)
    y = torch.empty(n_slots, dim, dtype=torch.float32, device=x.device)
    # 168 registers: three programs per SM at BM 64, for a few bytes of stack (L1) at most
    # (H200, 2048 routed tokens: q2 2.31 -> 2.17 ms with both capped; q4 -6 % of cycles)
    cap = {q: {"maxnreg": 168} for q in FORMATS} if bm == 64 else {}
    if "maxnreg" in cfg:  # the benchmark's override (0: none)
        cap = {q: {"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] else {} for q in FORMATS}
    _gate_up_kernel[(n_ff // (16 * nw), n_tiles)](
        xp, order, wts, tiles, gate.data, up.data, tabs, h, gate.data.shape[-1], float(clamp),
        F=n_ff, D=dim, KTOP=k, FMT=int(gate.qtype), DFMT=int(down.qtype), BM=bm, NW=nw,
        A16=gate.data.shape[-1] % 16 == 0, PF=pf, num_warps=nw, **cap.get(gate.qtype, {}),
    )  # fmt: skip
    _down_kernel[(dim // (32 * nw), n_tiles)](
        h, order, tiles, down.data, tabs, y, down.data.shape[-1], F=n_ff, D=dim,
        FMT=int(down.qtype), BM=bm, NW=nw, A16=down.data.shape[-1] % 16 == 0, PF=pf, num_warps=nw,
        **cap.get(down.qtype, {}),
    )  # fmt: skip
    return y
