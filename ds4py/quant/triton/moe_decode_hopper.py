"""IQ2_XXS routed-expert gate/up for decode on Hopper (sm_90) in Gluon, the grid table copied
once per shared-memory bank.

Owns: launch 1 of `moe.moe_decode` for IQ2_XXS experts on sm_90 (moe.py picks it; same inputs,
interleaved int8 activations and output as its Triton kernel `_moe_gate_up_iq2_kernel`, which
stays the reference path, the interpreter's and other GPUs'). Why: a warp's 32 random grid
lookups in one shared table collide in its banks (~3.5 cycles a lookup); with the 256 grid
words stored 32 times, entry-major (word g for lane l at 128 g + 4 l), lane l always reads
bank l. The 33 KB table is filled once per CTA, so a CTA is NW warps (one row each, a layout
Triton would not give: it splits a row across warps) looping over NB blocks of NW rows, the
next block's weights loaded before this block's math. Per octet as in moe.py: grid word |
sign word -> one `prmt` selector -> signed weight bytes -> two dp4a. With 32-row CTAs the
kernel also rounds its 32-group of h for the down kernel (saving the chain a launch).
Does not own: the activation rounding's definition (act.py), the down launch and the chain
(moe.py).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ds4py.quant.triton.moe_hopper import _lds, _table_base
from ds4py.quant.triton.tiles import clamped_swiglu, dp4a_add, interpreting

SIGNS = gl.constexpr(32768)  # byte offset of the sign words, after the 32 grid copies


def supported(device: torch.device) -> bool:
    """An sm_90 GPU outside the interpreter (where the kernel was built and measured)."""
    return (device.type == "cuda" and not interpreting()
            and torch.cuda.get_device_capability(device) == (9, 0))  # fmt: skip


def fits(n_ff: int, dim: int, cfg: dict) -> bool:
    """Whether `cfg` (NB, PF, num_warps) tiles IQ2_XXS experts [n_ff, dim]: rows of 64-group
    halves (dim a power of two from 2048; their 66 * dim / 256 bytes are then 16-byte
    aligned), whole blocks of NB * num_warps rows."""
    g = dim // 32
    return dim >= 2048 and g & (g - 1) == 0 and n_ff % (cfg["NB"] * cfg["num_warps"]) == 0


@gluon.jit
def _fill_tables(tabs, NW: gl.constexpr):
    """Store tiles.tables' 256 grid words 32 times each and its 128 sign words once into a
    shared array declared in inline PTX (Gluon has no shared-memory gather; the name
    moe_hopper._table_base reads), then sync."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    i = gl.arange(0, 32 * NW, layout=lay)  # one element per thread: declared once
    base = gl.inline_asm_elementwise(
        ".shared .align 16 .b32 iq2tab[8324];\n\tmov.u32 $0, iq2tab;", "=r,r", [i],
        dtype=gl.int32, is_pure=False, pack=1,
    )  # fmt: skip
    tab32 = (tabs + 256).to(gl.pointer_type(gl.int32))
    rot = i % 8  # lanes start at different 16-byte chunks of their entry: no bank conflicts
    for q in gl.static_range((256 + 32 * NW - 1) // (32 * NW)):
        g = (i + 32 * NW * q) % 256  # with more threads than words some store a word twice
        word, a = gl.load(tab32 + g), base + 128 * g
        gl.inline_asm_elementwise(
            "st.shared.v4.b32 [$1], {$9, $9, $9, $9};\n\t"
            "st.shared.v4.b32 [$2], {$9, $9, $9, $9};\n\t"
            "st.shared.v4.b32 [$3], {$9, $9, $9, $9};\n\t"
            "st.shared.v4.b32 [$4], {$9, $9, $9, $9};\n\t"
            "st.shared.v4.b32 [$5], {$9, $9, $9, $9};\n\t"
            "st.shared.v4.b32 [$6], {$9, $9, $9, $9};\n\t"
            "st.shared.v4.b32 [$7], {$9, $9, $9, $9};\n\t"
            "st.shared.v4.b32 [$8], {$9, $9, $9, $9};\n\tmov.u32 $0, 0;",
            "=r,r,r,r,r,r,r,r,r,r",
            [a + 16 * rot, a + 16 * ((rot + 1) % 8), a + 16 * ((rot + 2) % 8),
             a + 16 * ((rot + 3) % 8), a + 16 * ((rot + 4) % 8), a + 16 * ((rot + 5) % 8),
             a + 16 * ((rot + 6) % 8), a + 16 * ((rot + 7) % 8), word],
            dtype=gl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    for q in gl.static_range((128 + 32 * NW - 1) // (32 * NW)):
        s = (i + 32 * NW * q) % 128
        gl.inline_asm_elementwise(
            "st.shared.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r",
            [base + SIGNS + 4 * s, gl.load(tab32 + 256 + s)], dtype=gl.int32, is_pure=False,
            pack=1,
        )  # fmt: skip
    # 4 copies of the permute's positive magnitudes, read back by `_magnitudes`
    gl.inline_asm_elementwise(
        "{\n\t.reg .b32 m;\n\tmov.b32 m, 0x002B1908;\n\tst.shared.b32 [$1], m;\n\t}\n\t"
        "mov.u32 $0, 0;", "=r,r", [base + SIGNS + 512 + 4 * (i % 4)], dtype=gl.int32,
        is_pure=False, pack=1,
    )  # fmt: skip
    # in PTX like the stores it orders (Gluon renamed its barrier between Triton 3.6 and 3.9)
    gl.inline_asm_elementwise("bar.sync 0; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _signed_mags(sel, mag):
    """tiles.signed_mags: four signed weight bytes from selector nibbles (code | sign << 2),
    the positive magnitudes `mag` from a register (`_magnitudes`)."""
    return gl.inline_asm_elementwise(
        "prmt.b32 $0, $1, 0x00D5E7F8, $2;", "=r,r,r", [mag, sel], dtype=gl.int32, is_pure=True,
        pack=1,
    )  # fmt: skip


@gluon.jit
def _magnitudes(tab, lane4):
    """The permute's magnitude word 0x002B1908, each lane reading one of four copies: ptxas
    keeps a value it cannot prove uniform in a register, where it rebuilt the immediate before
    permutes (and the kernel took 98 registers against 80; H200: the chained q2 call 20.4-20.7
    against 19.5-19.8 us)."""
    return _lds(tab + SIGNS + 512 + (lane4 % 16))


@gluon.jit
def _or(x, y):
    """x | y where LLVM cannot see it: as a disjoint `or` it became an add, reassociated into
    (tab + lane4) + grid, and ptxas then spent an add per lookup on half the octets."""
    return gl.inline_asm_elementwise(
        "or.b32 $0, $1, $2;", "=r,r,r", [x, y], dtype=gl.int32, is_pure=True, pack=1
    )


@gluon.jit
def _octet(a, bu, S: gl.constexpr, xlo, xhi, acc, tab, lane4, mag):
    """acc + dot of octet S of groups (words a, bu) with int8 words xlo, xhi: the grid word
    from this lane's copy (byte S of a times 128, plus 4 * lane), the sign word from the
    single copy."""
    if S == 0:
        grid = (a << 7) & 0x7F80
    else:
        grid = (a >> (8 * S - 7)) & 0x7F80
    si = ((bu >> (7 * S)) & 127).to(gl.int32) * 4
    sel = _lds(tab + _or(grid, lane4)) | _lds(tab + SIGNS + si)
    acc = dp4a_add(_signed_mags(sel, mag), xlo, acc, False)
    return dp4a_add(_signed_mags(sel >> 16, mag), xhi, acc, False)


@gluon.jit
def _group(a, bu, tab, lane4, mag, x):
    """Integer dots of 32-groups with their 8 activation words x, times 2 * scale + 1."""
    s = _octet(a, bu, 0, x[0], x[1], gl.zeros_like(a), tab, lane4, mag)
    s = _octet(a, bu, 1, x[2], x[3], s, tab, lane4, mag)
    s = _octet(a, bu, 2, x[4], x[5], s, tab, lane4, mag)
    s = _octet(a, bu, 3, x[6], x[7], s, tab, lane4, mag)
    return s * (((bu >> 27) | 1).to(gl.int32))


@gluon.jit
def _load_rows(w, r4, r3, g, d_off, L3: gl.constexpr):
    """Words A, B of groups 2m, 2m + 1 (one 16-byte load per lane and half row) and the d of
    their block, [NW, H, 32] each, of the rows at byte offsets r4 / r3."""
    v0, v1 = gl.split(gl.load((w + r4).to(gl.pointer_type(gl.uint64)) + g))
    v0, v1 = gl.convert_layout(v0, L3), gl.convert_layout(v1, L3)  # the same registers
    d = gl.load((w + r3 + d_off).to(gl.pointer_type(gl.float16))).to(gl.float32)
    a0, b0 = (v0 & 0xFFFFFFFF).to(gl.int32), (v0 >> 32).to(gl.uint32)
    a1, b1 = (v1 & 0xFFFFFFFF).to(gl.int32), (v1 >> 32).to(gl.uint32)
    return a0, b0, a1, b1, d


@gluon.jit
def _block(gate, up, r4, r3, g, d_off, L3: gl.constexpr):
    return _load_rows(gate, r4, r3, g, d_off, L3), _load_rows(up, r4, r3, g, d_off, L3)


@gluon.jit
def _dots(w, tab, lane4, mag, xe, xo, xse, xso):
    """Dots [NW] of the rows `_load_rows` read with the token's activations (xe / xo: the 8
    words of the even / odd groups of each pair, xse / xso their scales)."""
    a0, b0, a1, b1, d = w
    s0 = _group(a0, b0, tab, lane4, mag, xe)
    s1 = _group(a1, b1, tab, lane4, mag, xo)
    v = (s0.to(gl.float32) * xse + s1.to(gl.float32) * xso) * d
    return gl.sum(gl.sum(v, axis=2), axis=1) * 0.125


@gluon.jit
def _x_pair(p, L3: gl.constexpr):
    even, odd = gl.split(gl.load(p))
    return gl.convert_layout(even, L3), gl.convert_layout(odd, L3)


@gluon.jit
def _round_h(hbuf, hq, hs, slot, r0, F, NW: gl.constexpr):
    """act.quantize_act of the CTA's 32 h values (one 32-group, row i of the CTA at hbuf[i])
    into the down kernel's operands: int8 interleaved by 16, and the scale."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])  # every warp: all 32 values
    v = hbuf.load(lay)
    amax = gl.max(gl.abs(v), axis=0)
    inv = gl.where(amax > 0, 127.0 / gl.maximum(amax, 1e-30), 0.0)
    q = gl.minimum(gl.maximum(gl.floor(v * inv + 0.5), -127.0), 127.0)
    i = r0 + gl.arange(0, 32, layout=lay)
    pos = ((i // 16) % 8 * (F // 128) + i // 128) * 16 + i % 16  # piece j of unit o: act.py
    row = slot.to(gl.int64)
    gl.store(hq + row * F + pos, q.to(gl.int8))
    gl.store(hs + row * (F // 32) + r0 // 32, amax / 127.0)


@gluon.jit
def _gate_up_kernel(
    xq, xs, ids, wts, gate, up, tabs, h, hq, hs, F, D, RB, clamp,
    KTOP: gl.constexpr, G: gl.constexpr, NB: gl.constexpr, PF: gl.constexpr, NW: gl.constexpr,
    HQ: gl.constexpr, PDL: gl.constexpr,
):  # fmt: skip
    """One slot's NB blocks of NW rows per CTA (warp w: row w of each block); PF blocks'
    weights loaded before the first math, block b + PF's before block b's. PDL: the weights
    and tables are fetched before waiting for the kernel that wrote x. HQ (NB * NW = 32): the
    CTA's rows are one 32-group of h, rounded here for the Q2_K / Q4_K down kernel (no
    separate rounding launch)."""
    H: gl.constexpr = G // 64
    # [row, half, lane, group of the pair]: group 64 h + 2 l + j, 16 bytes per lane and half
    L4: gl.constexpr = gl.BlockedLayout([1, H, 1, 2], [1, 1, 32, 1], [NW, 1, 1, 1], [3, 2, 1, 0])
    L3: gl.constexpr = gl.SliceLayout(3, L4)
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip
    slot = gl.program_id(0)
    r0 = gl.program_id(1) * (NB * NW)
    e = gl.load(ids + slot).to(gl.int64)
    t = (slot // KTOP).to(gl.int64)
    rr = gl.arange(0, NW, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    hh = gl.arange(0, H, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
    ll = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    jj = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    g = gl.expand_dims(64 * hh[None, :, None] + 2 * ll[None, None, :], 3) + jj[None, None, None, :]
    row_off = (e * F + r0 + rr) * RB
    r4, r3 = row_off[:, None, None, None], row_off[:, None, None]
    m = 32 * hh[None, :, None] + ll[None, None, :]  # group pair
    d_off = D // 4 + 2 * (m // 4)
    step = NW * RB
    ws = ()
    for b in gl.static_range(PF):
        ws = ws + (_block(gate, up, r4 + b * step, r3 + b * step, g, d_off, L3),)
    _fill_tables(tabs, NW)
    tab = _table_base(m)
    lane4 = 4 * ll[None, None, :]
    mag = _magnitudes(tab, lane4)
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)  # fmt: skip
    xw = xq + t * (D // 4) + g  # word j of group g at j * G + g
    e0, o0 = _x_pair(xw, L3)
    e1, o1 = _x_pair(xw + G, L3)
    e2, o2 = _x_pair(xw + 2 * G, L3)
    e3, o3 = _x_pair(xw + 3 * G, L3)
    e4, o4 = _x_pair(xw + 4 * G, L3)
    e5, o5 = _x_pair(xw + 5 * G, L3)
    e6, o6 = _x_pair(xw + 6 * G, L3)
    e7, o7 = _x_pair(xw + 7 * G, L3)
    xe, xo = (e0, e1, e2, e3, e4, e5, e6, e7), (o0, o1, o2, o3, o4, o5, o6, o7)
    xse, xso = _x_pair(xs + t * (D // 32) + g, L3)
    wt = gl.load(wts + slot)
    out = h + slot.to(gl.int64) * F + r0 + rr
    if HQ:
        hbuf = gl.allocate_shared_memory(
            gl.float32, [NB * NW], gl.SwizzledSharedLayout(1, 1, 1, [0])
        )
    for b in gl.static_range(NB):
        if b + PF < NB:
            nxt = (b + PF) * step
            ws = ws + (_block(gate, up, r4 + nxt, r3 + nxt, g, d_off, L3),)
        wg, wu = ws[b]
        gv = _dots(wg, tab, lane4, mag, xe, xo, xse, xso)
        uv = _dots(wu, tab, lane4, mag, xe, xo, xse, xso)
        hv = clamped_swiglu(gv, uv, clamp) * wt
        gl.store(out + b * NW, hv)
        if HQ:
            hbuf.slice(b * NW, NW).store(hv)
    if HQ:
        gl.inline_asm_elementwise("bar.sync 0; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)  # fmt: skip
        _round_h(hbuf, hq, hs, slot, r0, F, NW)


def gate_up_launch(xo, ids, wts, gate, up, tabs, h, clamp, cfg: dict, ho=None) -> None:
    """h [slots, n_ff] as moe.gate_up_launch computes it; `cfg` (NB, PF, num_warps[, maxnreg,
    PDL]) must `fit` the experts, xo the 4-byte-interleaved operands moe.operands makes. With
    `ho` (int8 [slots, n_ff], scales [slots, n_ff / 32]; NB * num_warps = 32) also h's rounding
    as `act.quantize_act(h, 16)` makes it."""
    (_, n_ff, dim), nb, nw = gate.shape, cfg["NB"], cfg["num_warps"]
    pdl = int(cfg.get("PDL", 0))
    if ho is not None and nb * nw != 32:
        raise ValueError(f"gate/up kernel: rounding h needs 32-row CTAs, got {cfg}")
    hq, hs = ho if ho is not None else (h, h)
    _gate_up_kernel[(ids.numel(), n_ff // (nb * nw))](
        xo[0], xo[1], ids, wts, gate.data, up.data, tabs, h, hq, hs, n_ff, dim,
        gate.data.shape[-1], float(clamp), KTOP=ids.shape[1], G=dim // 32, NB=nb,
        PF=cfg.get("PF", 1), NW=nw,
        HQ=int(ho is not None), PDL=pdl, num_warps=nw, maxnreg=cfg.get("maxnreg"),
        launch_pdl=bool(pdl),
    )  # fmt: skip
