#!/usr/bin/env python
"""One-token decode GEMVs (Q8_0 / F16 weights) at the engine's real shapes (CUDA).

Owns: the before/after numbers of `gemv.py`'s `_rows_kernel` for issue 3: per shape the old
default (tiled kernel, float32 x), the new default with and without programmatic dependent
launch, a plain streaming read of the same bytes (the floor), optionally a sweep of (R rows, BK,
warps, prefetch); µs and % of the copy bandwidth measured in the same run, and the relative
error against the kernel's torch reference and against float32 activations. Weights are
rotated past L2 inside one CUDA graph (bench_kernels.py's timing).
With --pairs: the launches that join two formats of one input (`gemv_pair`: Q8_0 projections
with the F16 compressors, the F16 router with the Q8_0 shared expert) against the same
matrices as two back-to-back GEMVs.
Usage: python scripts/bench_gemv_decode.py [--out DIR] [--sweep [--budget SECONDS]]
                                             [--only NAME ...] [--pairs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from bench_kernels import (
    DEV,
    ENGINE_GEMVS,
    copies,
    copy_bandwidth,
    rel_err,
    time_graph,
    weight,
)
from gguf import GGMLQuantizationType as GQ

from ds4py.quant import ref
from ds4py.quant.triton.act import round16
from ds4py.quant.triton.gemv import (
    decode_config,
    gemv,
    gemv_config,
    gemv_pair,
    gemv_pair_ref,
    pair_config,
)
from ds4py.quant.triton.tiles import tables

# the engine's Q8_0 / F16 decode GEMVs and the head (the 24-row mHC projection runs inside
# hc_pre_fused, not through gemv)
SHAPES = [spec for spec in ENGINE_GEMVS if spec[0] != "hc_attn_fn"]


def candidates(qtype: GQ, k: int, rpg: int) -> list[dict]:
    """(R, BK, warps, PIPE): one or two 16-byte runs per lane and row per step."""
    per_warp = 512 if qtype == GQ.Q8_0 else 256  # one run of 16 quants / 8 halves per lane
    out = []
    for nw in (1, 2, 4, 8):
        for bk in (per_warp * nw, 2 * per_warp * nw):
            for r in (1, 2, 4, 8):
                if k % bk == 0 and rpg % r == 0:
                    out.extend(dict(R=r, BK=bk, num_warps=nw, PIPE=p)
                               for p in ((0, 1) if bk < k else (0,)))  # fmt: skip
    return out


@triton.jit
def _read_probe(src, out, CH: tl.constexpr, BLK: tl.constexpr, PDL: tl.constexpr):
    """Streams CH bytes per program with 16-byte loads, BLK per step: the floor of a GEMV."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    base = (src + tl.program_id(0).to(tl.int64) * CH).to(tl.pointer_type(tl.int32))
    acc = tl.zeros([BLK // 4], dtype=tl.int32)
    for off in range(0, CH // 4, BLK // 4):
        acc ^= tl.load(base + off + tl.arange(0, BLK // 4))
    if PDL:
        tl.extra.cuda.gdc_wait()
    tl.store(out + tl.program_id(0), tl.sum(acc))


PROBES = [(4096, 4096, 1), (16384, 4096, 1)]


def read_floor(sh: Shape) -> list[tuple[float, float, tuple]]:
    """(µs, % copy, (CH, BLK, warps, PDL)) of the read probe over the same bytes, best first."""
    nbytes = sh.w.nbytes
    out = torch.empty(nbytes // 4096 + 1, dtype=torch.int32, device=DEV)
    res = []
    for ch, blk, nw in PROBES:
        for pdl in (0, 1):
            grid = (nbytes // ch,)

            def call(src, ch=ch, blk=blk, nw=nw, pdl=pdl, grid=grid):
                _read_probe[grid](src, out, CH=ch, BLK=blk, PDL=pdl, num_warps=nw,
                                  launch_pdl=bool(pdl))  # fmt: skip

            us = time_graph([lambda s=w_.data: call(s) for w_ in sh.ws]) * 1e6
            us *= nbytes / (grid[0] * ch)  # the few tail bytes the grid leaves out
            res.append((us, sh.pct(us), (ch, blk, nw, pdl)))
    return sorted(res, key=lambda r: r[0])


def empty_us() -> float:
    """One tiny program per launch: the per-kernel cost of the graph itself."""
    out = torch.empty(64, dtype=torch.int32, device=DEV)
    src = torch.zeros(1 << 16, dtype=torch.uint8, device=DEV)
    calls = [lambda: _read_probe[(1,)](src, out, CH=4096, BLK=4096, PDL=0, num_warps=1)] * 64
    return time_graph(calls) * 1e6


def activations(n_tok: int, groups: int, k: int, outliers: bool) -> torch.Tensor:
    x = torch.randn(n_tok, groups, k, device=DEV)
    if outliers:  # a few large channels, as trained models' residual streams have
        x[..., ::97] *= 30.0
    return x.squeeze(1).contiguous()


class Shape:
    """One GEMV shape: weights (rotated copies), activations, and its timing / error helpers."""

    def __init__(self, spec, n_tok: int, copy_bw: float, grid) -> None:
        self.name, self.q, self.n, self.k, self.g = spec
        self.n_tok, self.copy_bw, self.grid = n_tok, copy_bw, grid
        self.w = weight(self.q, (self.n, self.k), seed=self.n + self.k)
        self.ws = copies(self.w)
        self.x = activations(n_tok, self.g, self.k, outliers=False)
        self.x_out = activations(n_tok, self.g, self.k, outliers=True)
        self.rpg = self.n // self.g
        self.refs: dict[tuple[int, bool], torch.Tensor] = {}

    def us(self, cfg: dict) -> float:
        x, grid = self.x, self.grid
        return time_graph([lambda w_=w_, c=cfg: gemv(x, w_, grid, c) for w_ in self.ws]) * 1e6

    def pct(self, us: float) -> float:
        return 100 * self.w.nbytes / (us * 1e-6) / self.copy_bw

    def errors(self, cfg: dict, outliers: bool = False) -> tuple[float, float]:
        """(vs the kernel's own reference, vs float32 activations)."""
        x = self.x_out if outliers else self.x
        got = gemv(x, self.w, self.grid, cfg)
        int8 = self.q == GQ.Q8_0 and "R" in cfg
        own = self._ref(x, int8)
        return rel_err(got, own), rel_err(got, self._ref(x, False))

    def _ref(self, x: torch.Tensor, int8: bool) -> torch.Tensor:
        key = (x.data_ptr(), int8)
        if key not in self.refs:  # the head's reference takes a while: once per input
            self.refs[key] = ref.linear(round16(x) if int8 else x, self.w)
        return self.refs[key]


def defaults(sh: Shape) -> dict:
    """Old default (tiled kernel) against the new one, with and without programmatic
    dependent launch (gemv uses it on Hopper), time and error; the read floor."""
    old = gemv_config(sh.n, sh.k, sh.rpg, sh.n_tok)
    new = decode_config(sh.q, sh.n, sh.k, sh.rpg, sh.n_tok, pdl=True)
    plain = dict(new, PDL=0)
    row = dict(name=sh.name, qtype=sh.q.name, n=sh.n, k=sh.k, groups=sh.g, tokens=sh.n_tok,
               mb=sh.w.nbytes / 1e6, old_cfg=old, new_cfg=new)  # fmt: skip
    row["old_us"], row["old_err_f32"] = sh.us(old), sh.errors(old)[1]
    row["new_us"], row["new_plain_us"] = sh.us(new), sh.us(plain)
    row["new_err_ref"], row["new_err_f32"] = sh.errors(new)
    row["new_err_f32_outliers"] = sh.errors(new, outliers=True)[1]
    for key in ("old", "new", "new_plain"):
        row[f"{key}_pct"] = sh.pct(row[f"{key}_us"])
    row["read_floor"] = read_floor(sh)
    floor = min(f for f in row["read_floor"] if not f[2][3])
    print(f"{sh.name:28s} {sh.q.name:5s} {row['mb']:6.1f} MB | old {row['old_us']:6.1f} us "
          f"{row['old_pct']:5.1f}% | new {row['new_us']:6.1f} us {row['new_pct']:5.1f}% (no PDL "
          f"{row['new_plain_us']:6.1f} us {row['new_plain_pct']:5.1f}%) | read floor "
          f"{floor[0]:5.1f} us {floor[1]:5.1f}% | err ref {row['new_err_ref']:.1e} f32 "
          f"{row['new_err_f32']:.1e} (outliers {row['new_err_f32_outliers']:.1e}) {new}",
          flush=True)  # fmt: skip
    return row


def sweep(sh: Shape, row: dict, deadline: float) -> None:
    """Every candidate tiling without PDL, then the best with PDL; into `row`."""
    results = [(row["new_plain_us"], dict(row["new_cfg"], PDL=0))]
    for cfg in candidates(sh.q, sh.k, sh.rpg):
        if time.time() > deadline:
            row["sweep_cut"] = True
            break
        if cfg != results[0][1]:
            err = sh.errors(cfg)[0]
            if not err < 1e-4:
                print(f"  {sh.name} {cfg}: error {err:.1e}", flush=True)
            results.append((sh.us(cfg), cfg))
    results.sort(key=lambda r: r[0])
    best_pdl = dict(results[0][1], PDL=1)
    results.append((sh.us(best_pdl), best_pdl))
    row["sweep"] = [(us, sh.pct(us), cfg) for us, cfg in results]
    top = "; ".join(f"{us:.1f} us {sh.pct(us):.0f}% {cfg}" for us, cfg in results[:3])
    print(f"  sweep {sh.name} ({len(results)}): {top}; with PDL {results[-1][0]:.1f} us "
          f"{sh.pct(results[-1][0]):.0f}%", flush=True)  # fmt: skip


PAIRS = [  # name, (type, rows) A, (type, rows) B, K: the engine's two-format launches
    ("attn input, ratio 4", (GQ.Q8_0, 1536), (GQ.F16, 2624), 4096),
    ("attn input, ratio 128", (GQ.Q8_0, 1536), (GQ.F16, 1024), 4096),
    ("ffn input", (GQ.F16, 256), (GQ.Q8_0, 4096), 4096),
    ("q_b + indexer q_b", (GQ.Q8_0, 32768), (GQ.F16, 8192), 1024),
]


def bench_pairs(copy_bw: float, grid) -> list[dict]:
    """Per PAIRS entry: the two default GEMVs back to back, then gemv_pair with its default
    tiling and a few others; µs, % of copy for both matrices' bytes, error vs gemv_pair_ref."""
    rows = []
    for name, (qa, na), (qb, nb), k in PAIRS:
        wa, wb = weight(qa, (na, k), seed=na + 1), weight(qb, (nb, k), seed=nb + 2)
        was, wbs = copies(wa), copies(wb)
        n = min(len(was), len(wbs))
        x = activations(1, 1, k, outliers=False)
        nbytes = wa.nbytes + wb.nbytes

        def pct(us, nbytes=nbytes):
            return 100 * nbytes / (us * 1e-6) / copy_bw

        ca = decode_config(qa, na, k, na, 1, pdl=True)
        cb = decode_config(qb, nb, k, nb, 1, pdl=True)
        two = time_graph([lambda a=a, b=b, x=x, ca=ca, cb=cb: (gemv(x, a, grid, ca),
                                                           gemv(x, b, grid, cb))
                          for a, b in zip(was[:n], wbs[:n], strict=True)]) * 1e6  # fmt: skip
        row = dict(name=name, mb=nbytes / 1e6, two_us=two, two_pct=pct(two), pair=[])
        print(f"{name:24s} {nbytes / 1e6:5.1f} MB | two GEMVs {two:5.1f} us {pct(two):5.1f}%",
              flush=True)  # fmt: skip
        base = pair_config(qa, na, qb, nb, k, pdl=True)
        nw = base["num_warps"]
        step_a, step_b = base["BK_A"] // nw, base["BK_B"] // nw  # K per warp
        variants = [base, dict(base, PDL=0)] + [
            dict(base, num_warps=w, BK_A=min(k, step_a * w), BK_B=min(k, step_b * w))
            for w in (1, 2, 4) if w != nw
        ] + [dict(base, R_A=2 * base["R_A"], R_B=2 * base["R_B"])]  # fmt: skip
        swapped = dict(base, R_A=base["R_B"], BK_A=base["BK_B"], R_B=base["R_A"], BK_B=base["BK_A"])
        variants = [(cfg, False) for cfg in variants] + [(swapped, True)]
        want = gemv_pair_ref(x, wa, wb, grid)
        for cfg, swap in variants:  # swap: B's row blocks first
            got = gemv_pair(x, wb, wa, grid, cfg)[::-1] if swap else gemv_pair(x, wa, wb, grid, cfg)
            err = max(rel_err(g, w) for g, w in zip(got, want, strict=True))
            pairs = [(b, a) if swap else (a, b) for a, b in zip(was[:n], wbs[:n], strict=True)]
            us = time_graph([lambda a=a, b=b, c=cfg, x=x: gemv_pair(x, a, b, grid, c)
                             for a, b in pairs]) * 1e6  # fmt: skip
            row["pair"].append(dict(cfg=cfg, swapped=swap, us=us, pct=pct(us), err=err))
            print(f"  pair {us:5.1f} us {pct(us):5.1f}%  err {err:.1e}  {cfg}"
                  f"{' B first' if swap else ''}", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for gemv_decode.json")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds before sweeps stop")
    ap.add_argument("--sweep", action="store_true", help="also time every candidate tiling")
    ap.add_argument("--only", nargs="*", help="just these GEMVs (names as printed)")
    ap.add_argument("--pairs", action="store_true", help="only the two-format launches")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemv_decode.py needs a CUDA device")
    t0 = time.time()
    grid = tables(DEV)
    props = torch.cuda.get_device_properties(DEV)
    copy_bw = copy_bandwidth()
    empty = empty_us()
    print(f"{props.name}: copy {copy_bw / 1e9:.0f} GB/s (read+write), empty kernel {empty:.2f} us",
          flush=True)  # fmt: skip
    if args.pairs:
        pairs = bench_pairs(copy_bw, grid)
        bad = [r["name"] for r in pairs if not all(p["err"] < 1e-4 for p in r["pair"])]
        print(f"pair kernel vs its reference: {len(pairs) - len(bad)}/{len(pairs)} within 1e-4")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gemv_pairs.json").write_text(json.dumps(pairs, indent=1, default=str))
        sys.exit(1 if bad else 0)
    shapes = [Shape(spec, 1, copy_bw, grid) for spec in SHAPES
              if not args.only or spec[0] in args.only]  # fmt: skip
    rows = [defaults(sh) for sh in shapes]
    for sh, row in zip(shapes, rows, strict=True):
        if args.sweep:
            sweep(sh, row, t0 + args.budget)
    summary = dict(device=props.name, date=datetime.date.today().isoformat(),
                   torch=torch.__version__, triton=__import__("triton").__version__,
                   copy_gbps=copy_bw / 1e9, empty_kernel_us=empty, seconds=time.time() - t0,
                   rows=rows)  # fmt: skip
    bad = [r["name"] for r in rows if not r["new_err_ref"] < 1e-4]
    print(f"kernel vs its reference: {len(rows) - len(bad)}/{len(rows)} within 1e-4 {bad}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gemv_decode.json").write_text(json.dumps(summary, indent=1, default=str))
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
