#!/usr/bin/env python
"""Decode routed-MoE kernels at the real q2 expert shapes on CUDA: tiling / variant sweep.

Owns: timing of moe_decode's two launches (gate/up: IQ2_XXS [256, 2048, 4096] x 2; down: Q2_K
[256, 4096, 2048]) for one token and 6 experts, each launch alone and the whole call, every
variant checked against `moe_ref` (f32) and against the gemv-style kernel. Method as
bench_kernels.py: a CUDA graph of calls rotating over disjoint expert sets (no L2 reuse).
Does not own the kernels (ds4py/quant/triton/moe.py). Usage: python scripts/bench_moe_decode.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import DEV, int8_rounded, rel_err, time_graph, weight  # noqa: E402
from gguf import GGMLQuantizationType as GQ  # noqa: E402

from ds4py.quant import ref  # noqa: E402
from ds4py.quant.triton.gemv import act_operands  # noqa: E402
from ds4py.quant.triton.moe import (  # noqa: E402
    down_launch,
    gate_up_launch,
    moe_decode,
    moe_decode_config,
)
from ds4py.quant.triton.tiles import tables  # noqa: E402

N_EXP, N_FF, DIM, K, CLAMP = 256, 2048, 4096, 6, 10.0
GATE_UP = [dict(R=r, num_warps=nw) for r, nw in ((2, 1), (4, 1), (8, 1), (16, 1), (8, 2))]
DOWN = [dict(BN=bn, BK=bk, num_warps=nw) for bn, bk, nw in
        ((1, 2048, 1), (1, 2048, 2), (1, 2048, 4), (1, 1024, 1), (1, 1024, 2), (2, 2048, 1),
         (2, 2048, 2), (2, 1024, 2), (4, 1024, 2))]  # fmt: skip


def main() -> None:
    tabs = tables(DEV)
    gate = weight(GQ.IQ2_XXS, (N_EXP, N_FF, DIM), 1)
    up = weight(GQ.IQ2_XXS, (N_EXP, N_FF, DIM), 2)
    down = weight(GQ.Q2_K, (N_EXP, DIM, N_FF), 3)
    perm = torch.randperm(N_EXP, generator=torch.Generator().manual_seed(0))
    sets = [perm[i * K : (i + 1) * K].reshape(1, K).to(DEV).to(torch.int32)
            for i in range(N_EXP // K)]  # fmt: skip
    x = torch.randn(1, DIM, device=DEV)
    wts = torch.rand(1, K, device=DEV)
    old = moe_decode_config(1, K, N_FF, DIM, int8=True)
    new = moe_decode_config(1, K, N_FF, DIM, int8=True, qtype=GQ.IQ2_XXS)
    print(f"old cfg {old}\nnew default {new}", flush=True)
    xo = act_operands(x, True)
    h_old = torch.empty(K, N_FF, device=DEV)
    gate_up_launch(x, xo, sets[0], wts, gate, up, tabs, h_old, CLAMP, old["gate_up"])
    gu_mb = 2 * K * gate[0].nbytes / 1e6
    dn_mb = K * down[0].nbytes / 1e6
    print(f"\ngate/up ({gu_mb:.1f} MB per call)\n{'variant':44s} {'us':>7s} {'TB/s':>6s} "
          f"{'err vs old':>10s}", flush=True)  # fmt: skip
    for gu in [old["gate_up"]] + GATE_UP:
        h = torch.empty(K, N_FF, device=DEV)
        try:
            gate_up_launch(x, xo, sets[0], wts, gate, up, tabs, h, CLAMP, gu)
            h2 = torch.empty_like(h)
            gate_up_launch(x, xo, sets[0], wts, gate, up, tabs, h2, CLAMP, gu)
            det = "" if torch.equal(h, h2) else " NONDETERMINISTIC"
            calls = [lambda s=s, g=gu, hh=h2: gate_up_launch(x, xo, s, wts, gate, up, tabs, hh,
                                                             CLAMP, g) for s in sets]  # fmt: skip
            t = time_graph(calls)
        except Exception as exc:  # a variant that fails to compile or run
            print(f"{str(gu):44s} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        print(f"{str(gu):44s} {t * 1e6:7.2f} {gu_mb / t / 1e6:6.2f} {rel_err(h, h_old):10.1e}"
              f"{det}", flush=True)  # fmt: skip

    ho = act_operands(h_old, True)
    out_old = torch.empty(1, DIM, device=DEV)
    down_launch(h_old, ho, sets[0], down, tabs, out_old, old["down"])
    print(f"\ndown ({dn_mb:.1f} MB per call)", flush=True)
    for dn in [old["down"]] + DOWN:
        out = torch.empty(1, DIM, device=DEV)
        try:
            down_launch(h_old, ho, sets[0], down, tabs, out, dn)
            calls = [lambda s=s, d=dn, o=out: down_launch(h_old, ho, s, down, tabs, o, d)
                     for s in sets]  # fmt: skip
            t = time_graph(calls)
        except Exception as exc:
            print(f"{str(dn):44s} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        print(f"{str(dn):44s} {t * 1e6:7.2f} {dn_mb / t / 1e6:6.2f} "
              f"{rel_err(out, out_old):10.1e}", flush=True)  # fmt: skip

    want = ref.moe(x, sets[0].long(), wts, gate, up, down, CLAMP)
    want8 = ref.moe(int8_rounded(x), sets[0].long(), wts, gate, up, down, CLAMP)
    print("\nwhole moe_decode (incl. activation quantization)", flush=True)
    for name, cfg in (("old", old), ("new default", new)):
        got = moe_decode(x, sets[0], wts, gate, up, down, CLAMP, tabs, cfg)
        calls = [lambda s=s, c=cfg: moe_decode(x, s, wts, gate, up, down, CLAMP, tabs, c)
                 for s in sets]  # fmt: skip
        t = time_graph(calls)
        print(f"{name:12s} {t * 1e6:7.2f} us  err vs f32 ref {rel_err(got, want):.2e}  "
              f"vs ref(int8 x) {rel_err(got, want8):.2e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
