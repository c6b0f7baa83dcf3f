#!/usr/bin/env python
"""What bounds the IQ2_XXS decode gate/up kernel (moe.py `_moe_gate_up_iq2_kernel`) on CUDA.

Owns: timings of that kernel's loop with parts of its work removed, at the q2 shapes (gate and
up [256, 2048, 4096], 6 of 256 experts, one token), weights rotated past L2 as in
bench_moe_decode.py. The variants copy the engine kernel (group pairs, one warp, unchained);
only "lookups as default" computes the right values (checked against the default launch), the
others are timing experiments:
  default                the engine's launch (gate_up_launch, no programmatic dependent launch)
  lookups as default     this script's copy: grid word | sign word from the shared table
  sign by OR             the sign word's lookup replaced by OR-ing its index in
  no lookups             both lookups replaced by ALU work on their indices
  conflict-free ...      every lane reads its own bank (its index's low bits replaced by the
                         lane): what per-bank table copies would cost, without filling them
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
    _iq2_load,
    _lds,
    _pair,
    _smem_tables,
    _table_base,
    _x_words,
)
from ds4py.quant.triton.tiles import clamped_swiglu, dp4a_add, signed_mags, tables  # noqa: E402

N_EXP, N_FF, DIM, K, CLAMP = 256, 2048, 4096, 6, 10.0
# name, variant, rows per program (one warp)
VARIANTS = [
    ("lookups as default", 0, 2),
    ("sign by OR", 1, 2),
    ("no lookups", 2, 2),
    ("conflict-free lookups", 4, 2),
    ("conflict-free lookups", 4, 1),
    ("conflict-free lookups", 4, 4),
    ("conflict-free grid only", 5, 2),
    ("conflict-free signs only", 6, 2),
]


@triton.jit
def _lane(like):
    return tl.inline_asm_elementwise(
        "mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _octet(a, bu, S: tl.constexpr, xlo, xhi, acc, tab, lane4, V: tl.constexpr):
    gi = ((a >> (8 * S)) & 255) * 4
    si = ((bu >> (7 * S)) & 127).to(tl.int32) * 4
    if V == 0:
        sel = _lds(tab + gi) | _lds(tab + 1024 + si)
    elif V == 1:
        sel = _lds(tab + gi) | si
    elif V == 2:
        sel = gi | (si << 3)
    elif V == 4:  # every lane in its own bank: the cost of per-bank table copies, unfilled
        sel = _lds(tab + ((gi & 0x380) | lane4)) | _lds(tab + 1024 + ((si & 0x180) | lane4))
    elif V == 5:
        sel = _lds(tab + ((gi & 0x380) | lane4)) | _lds(tab + 1024 + si)
    else:
        sel = _lds(tab + gi) | _lds(tab + 1024 + ((si & 0x180) | lane4))
    acc = dp4a_add(signed_mags(sel, False), xlo, acc, False)
    return dp4a_add(signed_mags(sel >> 16, False), xhi, acc, False)


@triton.jit
def _group(a, bu, tab, lane4, x, V: tl.constexpr):
    s = _octet(a, bu, 0, x[0], x[1], tl.zeros_like(a), tab, lane4, V)
    s = _octet(a, bu, 1, x[2], x[3], s, tab, lane4, V)
    s = _octet(a, bu, 2, x[4], x[5], s, tab, lane4, V)
    s = _octet(a, bu, 3, x[6], x[7], s, tab, lane4, V)
    return s * (((bu >> 27) | 1).to(tl.int32))


@triton.jit
def _rows(w, tab, lane4, xe, xo, xse, xso, V: tl.constexpr):
    a0, b0, a1, b1, d = w
    s0 = _group(a0, b0, tab, lane4, xe, V)
    s1 = _group(a1, b1, tab, lane4, xo, V)
    return tl.sum((s0.to(tl.float32) * xse + s1.to(tl.float32) * xso) * d, axis=1) * 0.125


@triton.jit
def _ablated_kernel(
    xq, xs, ids, wts, gate, up, tabs, h, F, D, RB, clamp,
    KTOP: tl.constexpr, G: tl.constexpr, R: tl.constexpr, V: tl.constexpr,
):  # fmt: skip
    """The default kernel's body (moe.py, unchained) with variant V of the per-octet work."""
    slot = tl.program_id(0)
    r0 = tl.program_id(1) * R
    e = tl.load(ids + slot).to(tl.int64)
    t = (slot // KTOP).to(tl.int64)
    gm = tl.arange(0, G // 2)[None, :]
    _smem_tables(tabs)
    tab = _table_base(gm)
    lane4 = _lane(gm) * 4
    rr = tl.arange(0, R)
    row_off = ((e * F + r0 + rr) * RB)[:, None]
    wg, wu = _iq2_load(gate, row_off, D, gm, True), _iq2_load(up, row_off, D, gm, True)
    xe, xo = _x_words(xq + t * (D // 4) + _pair(gm), G)
    xse, xso = tl.split(tl.load(xs + t * (D // 32) + _pair(gm)))
    g = _rows(wg, tab, lane4, xe, xo, xse, xso, V)
    u = _rows(wu, tab, lane4, xe, xo, xse, xso, V)
    hv = clamped_swiglu(g, u, clamp) * tl.load(wts + slot)
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
    for name, v, r in VARIANTS:

        def go(s, v=v, r=r):
            _ablated_kernel[(K, N_FF // r)](
                xo[0], xo[1], s, wts, gate.data, up.data, tabs, h, N_FF, DIM,
                gate.data.shape[-1], CLAMP, KTOP=K, G=DIM // 32, R=r, V=v, num_warps=1,
            )  # fmt: skip

        go(sets[0])
        if once:
            continue
        note = f"  err vs default {rel_err(h, want):.1e}" if v == 0 else ""
        line(f"{name} (R {r})", time_graph([lambda s=s: go(s) for s in sets]), note)
        if r == 2 and v in (0, 4):  # the same experts every call: weights in L2
            line("  same experts (in L2)", time_graph([lambda: go(sets[0])] * len(sets)))


if __name__ == "__main__":
    main()
