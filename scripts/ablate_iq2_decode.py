#!/usr/bin/env python
"""What bounds the IQ2_XXS decode gate/up kernel (moe.py `_moe_gate_up_iq2_kernel`) on CUDA.

Owns: timings of that kernel's loop with parts of its work removed, at the q2 shapes (gate and
up [256, 2048, 4096], 6 of 256 experts, one token), weights rotated past L2 as in
bench_moe_decode.py. The variants keep the default tiling (4 rows, one warp) and everything
else of the kernel; only "lookups as the default" computes the right values (checked against the
default launch), the others are timing experiments:
  default             the engine's launch (gate_up_launch)
  lookups as default  this script's copy of the loop: grid word | sign word from shared memory
  sign by OR          the sign word's lookup replaced by OR-ing its index in (one lookup/octet)
  no lookups          both lookups replaced by ALU work on their indices
  one 32 KB lookup    one lookup per octet into an 8192-word table (the instruction stream a
                      15-bit grid+sign code would give; the table is left unfilled)
Does not own: the kernel (ds4py/quant/triton/moe.py).
Usage: python scripts/ablate_iq2_decode.py [--once]   (--once: each launch once, for ncu)
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import DEV, copy_bandwidth, rel_err, time_graph, weight  # noqa: E402
from gguf import GGMLQuantizationType as GQ  # noqa: E402

from ds4py.quant.triton import moe  # noqa: E402
from ds4py.quant.triton.moe import (  # noqa: E402
    _clamped_swiglu,
    _lds,
    _smem_tables,
    _table_base,
)
from ds4py.quant.triton.tiles import dp4a_add, f16_at, signed_mags, tables  # noqa: E402

N_EXP, N_FF, DIM, K, CLAMP = 256, 2048, 4096, 6, 10.0
# name, variant, rows per program, warps
VARIANTS = [
    ("lookups as default", 0, 4, 1),
    ("sign by OR", 1, 4, 1),
    ("no lookups", 2, 4, 1),
    ("one 32 KB lookup", 3, 4, 1),
    ("one 32 KB lookup", 3, 8, 2),
    ("one 32 KB lookup", 3, 16, 4),
]


@triton.jit
def _iq2_load(w, row_off, D, gg):
    """Words A, B and scales [R, G] of the rows at row_off [R, 1], one group per element (the
    engine kernel's loads up to session 8; it now loads group pairs)."""
    ab = tl.load((w + row_off).to(tl.pointer_type(tl.uint64)) + gg)
    a, bu = (ab & 0xFFFFFFFF).to(tl.int32), (ab >> 32).to(tl.uint32)
    return a, bu, f16_at(w + row_off + D // 4 + 2 * (gg // 8))


@triton.jit
def _big_table(like):
    """Declares the 32 KB table (one element per thread: the declaration is emitted once)."""
    return tl.inline_asm_elementwise(
        ".shared .align 16 .b32 ablbig[8192];\n\tmov.u32 $0, ablbig;", "=r,r", [like],
        dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _big_base(like):
    return tl.inline_asm_elementwise(
        "mov.u32 $0, ablbig;", "=r,r", [like], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _octet(a, bu, S: tl.constexpr, xlo, xhi, acc, tab, V: tl.constexpr):
    gi = ((a >> (8 * S)) & 255) * 4
    si = ((bu >> (7 * S)) & 127).to(tl.int32) * 4
    if V == 0:
        sel = _lds(tab + gi) | _lds(tab + 1024 + si)
    elif V == 1:
        sel = _lds(tab + gi) | si
    else:
        sel = gi | (si << 3)
    acc = dp4a_add(signed_mags(sel, False), xlo, acc, False)
    return dp4a_add(signed_mags(sel >> 16, False), xhi, acc, False)


@triton.jit
def _code(w, HI: tl.constexpr, big, xlo, xhi, acc):
    """One octet of the 15-bit-code layout: its word's half indexes the table directly."""
    if HI:
        sel = _lds(big + ((w >> 14) & 0x7FFC))
    else:
        sel = _lds(big + ((w << 2) & 0x7FFC))
    acc = dp4a_add(signed_mags(sel, False), xlo, acc, False)
    return dp4a_add(signed_mags(sel >> 16, False), xhi, acc, False)


@triton.jit
def _rows(a, bu, d, tab, big, xsv, x0, x1, x2, x3, x4, x5, x6, x7, V: tl.constexpr):
    if V == 3:
        b = bu.to(tl.int32, bitcast=True)
        s = _code(a, False, big, x0, x1, tl.zeros_like(a))
        s = _code(a, True, big, x2, x3, s)
        s = _code(b, False, big, x4, x5, s)
        s = _code(b, True, big, x6, x7, s)
        sc = ((a >> 15) & 1) | ((a >> 30) & 2) | ((b >> 13) & 4) | ((bu >> 28).to(tl.int32) & 8)
        s = s * (2 * sc + 1)
    else:
        s = _octet(a, bu, 0, x0, x1, tl.zeros_like(a), tab, V)
        s = _octet(a, bu, 1, x2, x3, s, tab, V)
        s = _octet(a, bu, 2, x4, x5, s, tab, V)
        s = _octet(a, bu, 3, x6, x7, s, tab, V)
        s = s * (((bu >> 27) | 1).to(tl.int32))
    return tl.sum(s.to(tl.float32) * (d * xsv), axis=1) * 0.125


@triton.jit
def _ablated_kernel(
    xq, xs, ids, wts, gate, up, tabs, h, F, D, RB, clamp,
    KTOP: tl.constexpr, G: tl.constexpr, R: tl.constexpr, V: tl.constexpr,
):  # fmt: skip
    """The default kernel's body (unchained) with variant V of the per-octet work."""
    slot = tl.program_id(0)
    r0 = tl.program_id(1) * R
    e = tl.load(ids + slot).to(tl.int64)
    t = (slot // KTOP).to(tl.int64)
    gg = tl.arange(0, G)[None, :]
    _smem_tables(tabs)
    tab = _table_base(gg)
    if V == 3:
        _big_table(tl.arange(0, 32))
        big = _big_base(gg)
    else:
        big = tab
    rr = tl.arange(0, R)
    row_off = ((e * F + r0 + rr) * RB)[:, None]
    xw = xq + t * (D // 4) + gg
    x0, x1, x2, x3 = tl.load(xw), tl.load(xw + G), tl.load(xw + 2 * G), tl.load(xw + 3 * G)
    x4, x5 = tl.load(xw + 4 * G), tl.load(xw + 5 * G)
    x6, x7 = tl.load(xw + 6 * G), tl.load(xw + 7 * G)
    xsv = tl.load(xs + t * (D // 32) + gg)
    ga, gb, gd = _iq2_load(gate, row_off, D, gg)
    g = _rows(ga, gb, gd, tab, big, xsv, x0, x1, x2, x3, x4, x5, x6, x7, V)
    ua, ub, ud = _iq2_load(up, row_off, D, gg)
    u = _rows(ua, ub, ud, tab, big, xsv, x0, x1, x2, x3, x4, x5, x6, x7, V)
    hv = _clamped_swiglu(g, u, clamp) * tl.load(wts + slot)
    tl.store(h + slot.to(tl.int64) * F + r0 + rr, hv)


def main() -> None:
    now = datetime.datetime.now(datetime.UTC)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, {now:%Y-%m-%d %H:%M} UTC")  # fmt: skip
    once = "--once" in sys.argv  # each launch once, untimed (for a profiler)
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    gate = weight(GQ.IQ2_XXS, (N_EXP, N_FF, DIM), 1)
    up = weight(GQ.IQ2_XXS, (N_EXP, N_FF, DIM), 2)
    tabs = tables(DEV)
    perm = torch.randperm(N_EXP, generator=torch.Generator().manual_seed(0))
    sets = [perm[i * K : (i + 1) * K].reshape(1, K).to(DEV).to(torch.int32)
            for i in range(N_EXP // K)]  # fmt: skip
    x, wts = torch.randn(1, DIM, device=DEV), torch.rand(1, K, device=DEV)
    nbytes = 2 * K * gate[0].nbytes
    gu = moe.moe_decode_config(1, K, N_FF, DIM, qtype=GQ.IQ2_XXS, down_qtype=GQ.Q2_K)["gate_up"]
    xo = moe.operands(x, GQ.IQ2_XXS, gu)
    want, h = torch.empty(K, N_FF, device=DEV), torch.empty(K, N_FF, device=DEV)
    moe.gate_up_launch(x, xo, sets[0], wts, gate, up, tabs, want, CLAMP, gu)

    def line(name: str, t: float, note: str = "") -> None:
        print(f"  {name:34s} {t * 1e6:7.2f} us {100 * nbytes / t / copy_bw:5.1f} % of copy{note}",
              flush=True)  # fmt: skip

    if not once:
        t = time_graph([lambda s=s: moe.gate_up_launch(x, xo, s, wts, gate, up, tabs, h, CLAMP,
                                                       gu) for s in sets])  # fmt: skip
        line(f"default {gu}", t)
    for name, v, r, nw in VARIANTS:

        def go(s, v=v, r=r, nw=nw):
            _ablated_kernel[(K, N_FF // r)](
                xo[0], xo[1], s, wts, gate.data, up.data, tabs, h, N_FF, DIM,
                gate.data.shape[-1], CLAMP, KTOP=K, G=DIM // 32, R=r, V=v, num_warps=nw,
            )  # fmt: skip

        go(sets[0])
        if once:
            continue
        note = f"  err vs default {rel_err(h, want):.1e}" if v == 0 else ""
        line(f"{name} (R {r}, {nw} warps)", time_graph([lambda s=s: go(s) for s in sets]), note)


if __name__ == "__main__":
    main()
