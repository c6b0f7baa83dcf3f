#!/usr/bin/env python
"""Prefill routed-MoE kernels at the real expert shapes on CUDA: Triton tilings vs Gluon.

Owns: the expert-GEMM TFLOP/s rows of docs/PERFORMANCE.md. Cases: q2 experts (IQ2_XXS gate/up,
Q2_K down) and q4 (Q4_K) with 2048 / 8192 tokens routed top-6 of 256 at random, and 6 experts
with 2048 tokens each. For each: moe_prefill.py's Triton float16 tiles over a tiling sweep and
moe_hopper.py's Gluon kernels, each checked against the f32 reference. Times: the whole call
(sorting included) and the two grouped launches alone, median of CUDA events.
TFLOP/s = 2 * tokens * 6 * 3 * 2048 * 4096 / time.
Usage: python scripts/bench_moe_prefill.py [--out DIR] [--quick] [--cases q4_2048,...] [--once]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import DEV, rel_err, time_eager, weight  # noqa: E402
from gguf import GGMLQuantizationType as GQ  # noqa: E402

from ds4py.quant import ref  # noqa: E402
from ds4py.quant.triton import moe_hopper as hopper  # noqa: E402
from ds4py.quant.triton import moe_prefill as new  # noqa: E402
from ds4py.quant.triton.tiles import prepared, tables  # noqa: E402

N_EXP, N_FF, DIM, K, CLAMP = 256, 2048, 4096, 6, 10.0
REPS = 20  # median of 20: single runs of these kernels vary by a few percent on the H200


def sweep(quick: bool) -> list[dict]:
    small = dict(BM=64, BN_GU=128, BN_DOWN=128, BK=64, num_warps=4, num_stages=3)
    big = dict(small, BM=128, BN_GU=64)
    cands = [small, big]
    if not quick:
        for base in (small, big):
            cands += [dict(base, BK=32), dict(base, num_stages=4), dict(base, num_warps=8),
                      dict(base, BN_GU=64, BN_DOWN=64)]  # fmt: skip
    return cands


def hopper_variants(q4: bool) -> list[dict]:
    """Gluon kernel settings to time (cfg keys of moe_hopper.grouped): the first is the
    engine's at 2048 routed tokens; PF an L2 prefetch distance in blocks, maxnreg a register
    cap for both kernels."""
    out = [dict(BM=64), dict(BM=128), dict(BM=64, NW=8)]
    if q4:  # PF 0, maxnreg none: the q4 kernels as launched before the L2 prefetch and cap
        out += [dict(BM=64, PF=0), dict(BM=64, PF=0, maxnreg=0), dict(BM=64, PF=2)]
    return out


def _label(v: dict) -> str:
    parts = [f"BM {v['BM']}"]
    parts += [f"{v['NW']} warps"] if "NW" in v else []
    parts += [f"L2 prefetch {v['PF']} blocks ahead"] if "PF" in v else []
    parts += [f"maxnreg {v['maxnreg'] or 'none'}"] if "maxnreg" in v else []
    return "hopper (gluon) " + ", ".join(parts)


def case(name, gate_t, down_t, n_tok, same6, tabs, quick, out, once=False):
    gate, up = (prepared(weight(gate_t, (N_EXP, N_FF, DIM), s)) for s in (1, 2))
    down = prepared(weight(down_t, (N_EXP, DIM, N_FF), 3))
    g = torch.Generator(device=DEV).manual_seed(0)
    if same6:
        ids = torch.arange(K, device=DEV).repeat(n_tok, 1)
    else:
        ids = torch.rand(n_tok, N_EXP, device=DEV, generator=g).topk(K, dim=-1).indices
    x = torch.randn(n_tok, DIM, device=DEV, generator=g)
    wts = torch.rand(n_tok, K, device=DEV, generator=g)
    want = ref.moe(x, ids, wts, gate, up, down, CLAMP)
    flops = 2 * n_tok * K * 3 * N_FF * DIM
    rows = []

    def record(label, call, inner=None):
        try:
            err = rel_err(call(), want)
            t = time_eager(call, reps=REPS)
            ti = time_eager(inner, reps=REPS) if inner else float("nan")
        except Exception as exc:  # a tiling that does not compile or fit is reported, not fatal
            print(f"  {name} {label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            return
        row = dict(case=name, variant=label, ms=t * 1e3, tflops=flops / t / 1e12,
                   kernels_ms=ti * 1e3, kernels_tflops=flops / ti / 1e12, rel_err=err)  # fmt: skip
        rows.append(row)
        print(f"  {name:28s} {label:70s} {t * 1e3:8.3f} ms {flops / t / 1e12:6.1f} TF/s"
              f"  kernels {ti * 1e3:8.3f} ms {flops / ti / 1e12:6.1f} TF/s  err {err:.2e}",
              flush=True)  # fmt: skip

    xh, w1 = x.half(), wts.reshape(-1).contiguous()
    if once:  # each Gluon variant's two kernels once, for a profiler
        for v in hopper_variants(gate_t == GQ.Q4_K):
            cfg = dict(new.moe_prefill_config(n_tok * K, N_EXP, N_FF, DIM), **v)
            order, tiles = new.expert_tiles(ids, N_EXP, v["BM"])
            hopper.grouped(xh, order, w1, tiles, gate, up, down, K, CLAMP, tabs, cfg)
        torch.cuda.synchronize()
        return
    for cfg in sweep(quick):
        order, tiles = new.expert_tiles(ids, N_EXP, cfg["BM"])
        record(f"triton f16 tiles {cfg}",
               lambda c=cfg: new.moe_prefill(x, ids, wts, gate, up, down, CLAMP, tabs, c, False),
               lambda c=cfg, o=order, t=tiles: new.grouped(xh, o, w1, t, gate, up, down, K, CLAMP,
                                                           tabs, c))  # fmt: skip
    if hopper.supported(gate, up, down):
        for v in hopper_variants(gate_t == GQ.Q4_K):
            cfg = dict(new.moe_prefill_config(n_tok * K, N_EXP, N_FF, DIM), **v)
            order, tiles = new.expert_tiles(ids, N_EXP, v["BM"])
            record(_label(v),
                   lambda c=cfg: new.moe_prefill(x, ids, wts, gate, up, down, CLAMP, tabs, c),
                   lambda c=cfg, o=order, t=tiles: hopper.grouped(xh, o, w1, t, gate, up, down, K,
                                                                  CLAMP, tabs, c))  # fmt: skip
    parts = {
        "expert_tiles": lambda: new.expert_tiles(ids, N_EXP, 64),
        "x to f16 in kappa order": lambda: hopper.x_kappa(x, gate_t),
        "sum of k slots": lambda: want.new_empty(n_tok * K, DIM).view(n_tok, K, DIM).sum(dim=1),
    }
    print("  overheads (ms): " + ", ".join(f"{k} {time_eager(f, reps=5) * 1e3:.3f}"
                                          for k, f in parts.items()), flush=True)  # fmt: skip
    best = min(rows, key=lambda r: r["ms"], default=None)
    print(f"  BEST {name}: {best}", flush=True)
    out.extend(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", default="q2_2048,q2_8192,q2_same6,q4_2048")
    ap.add_argument("--once", action="store_true", help="each Gluon variant once (for ncu)")
    args = ap.parse_args()
    tabs = tables(DEV)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    cases = {
        "q2_2048": ("q2 2048 tok top-6 of 256", GQ.IQ2_XXS, GQ.Q2_K, 2048, False),
        "q2_8192": ("q2 8192 tok top-6 of 256", GQ.IQ2_XXS, GQ.Q2_K, 8192, False),
        "q2_same6": ("q2 6 experts x 2048 tok", GQ.IQ2_XXS, GQ.Q2_K, 2048, True),
        "q4_2048": ("q4 2048 tok top-6 of 256", GQ.Q4_K, GQ.Q4_K, 2048, False),
    }
    rows: list[dict] = []
    for key in args.cases.split(","):
        name, gt, dt, n, same6 = cases[key]
        case(name, gt, dt, n, same6, tabs, args.quick, rows, args.once)
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "moe_prefill.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
