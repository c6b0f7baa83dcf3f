#!/usr/bin/env python
"""Microbenchmark of the quantized-weight Triton kernels at DeepSeek V4 Flash shapes (CUDA).

Owns: the numbers in docs/PERFORMANCE.md "Kernels": device-to-device copy bandwidth, decode GEMV
and decode MoE time / GB/s / % of copy bandwidth, dense prefill GEMM TFLOP/s (the expert GEMMs
are scripts/bench_moe_prefill.py's), plus a correctness check of every kernel against its torch
reference on the GPU. Each tiling candidate is timed and the best and the default are reported.
Does not own the kernels.
Usage: python scripts/bench_kernels.py [--out DIR] [--tests] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from graph_timing import graph_us  # scripts/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def _import_quant_only() -> None:
    """Make `ds4py.quant` importable without ds4py/__init__.py (the engine's imports need
    packages, e.g. the tokenizer's, that a bare GPU box may lack)."""
    if "ds4py" not in sys.modules:
        pkg = types.ModuleType("ds4py")
        pkg.__path__ = [str(ROOT / "ds4py")]
        sys.modules["ds4py"] = pkg


_import_quant_only()
from gguf import GGMLQuantizationType as GQ  # noqa: E402

from ds4py.quant import ref  # noqa: E402
from ds4py.quant.formats import FORMATS, QTensor, random_blocks, row_bytes  # noqa: E402
from ds4py.quant.triton import moe_decode_hopper  # noqa: E402
from ds4py.quant.triton.act import quantize_act  # noqa: E402
from ds4py.quant.triton.gemm import gemm, gemm_config  # noqa: E402
from ds4py.quant.triton.gemv import (  # noqa: E402
    decode_config,
    gemv,
    gemv_config,
    gemv_ref,
    pdl_ok,
)
from ds4py.quant.triton.moe import (  # noqa: E402
    moe_decode,
    moe_decode_config,
)
from ds4py.quant.triton.tiles import INT8_PATH, prepared, tables  # noqa: E402

DEV = torch.device("cuda")
L2_DEFEAT_BYTES = 512 << 20  # rotate buffers so a timed call never finds its weight in L2
# relative Frobenius error vs the f32 torch reference; int8-activation GEMVs are compared with
# the reference fed the same int8-rounded activations (exact up to f32 sums)
TOL = {"gemv": 1e-4, "moe_decode": 1e-4, "moe_decode_int8": 3e-2, "gemm": 1e-2}

# ---- Timing ----------------------------------------------------------------------------------


def time_graph(calls: list[Callable[[], object]], replays: int = 12) -> float:
    """Median seconds per call: all calls captured in one CUDA graph, replayed."""
    return graph_us(calls, replays) / 1e6


def time_eager(call: Callable[[], object], reps: int = 10) -> float:
    call()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy."""
    a = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    t = time_eager(lambda: b.copy_(a), reps=20)
    return 2 * a.numel() / t


def bf16_matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    return 2 * n**3 / time_eager(lambda: a @ b) / 1e12


# ---- Data ------------------------------------------------------------------------------------


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    q, scale, _ = quantize_act(x.reshape(-1, x.shape[-1]))
    return (q.float().view(q.shape[0], -1, 32) * scale[..., None]).view_as(x)


def weight(qtype: GQ, shape: tuple[int, ...], seed: int, pool_rows: int = 4096) -> QTensor:
    """Random valid blocks made on the CPU for up to `pool_rows` rows, tiled on the GPU."""
    rows = 1
    for s in shape[:-1]:
        rows *= s
    rb = row_bytes(qtype, shape[-1])
    fmt_bytes = FORMATS[qtype].block_bytes
    made = min(rows, pool_rows)
    gen = torch.Generator().manual_seed(seed)
    pool = random_blocks(qtype, made * rb // fmt_bytes, gen, scale=0.02).reshape(made, rb).to(DEV)
    data = pool.repeat((rows + made - 1) // made, 1)[:rows].contiguous()
    return prepared(QTensor(data.reshape(*shape[:-1], rb), qtype, shape))  # as TritonOps.prepare


def copies(w: QTensor) -> list[QTensor]:
    n = max(2, min(64, L2_DEFEAT_BYTES // w.nbytes))
    return [w] + [QTensor(w.data.clone(), w.qtype, w.shape, w.layout) for _ in range(n - 1)]


# ---- Benchmarks ------------------------------------------------------------------------------


def gemv_candidates(n: int, k: int, rpg: int, n_tok: int) -> list[dict]:
    seen, out = set(), []
    for te in (2048, 4096, 8192):
        for nw in (2, 4, 8):
            cfg = gemv_config(n, k, rpg, n_tok, te, nw)
            key = tuple(sorted(cfg.items()))
            if key not in seen:
                seen.add(key)
                out.append(cfg)
    return out


def bench_gemv(name, qtype, n, k, groups, n_tok, copy_bw, grid, rows):
    w = weight(qtype, (n, k), seed=n + k)
    ws = copies(w)
    x = torch.randn(n_tok, groups, k, device=DEV).squeeze(1).contiguous()
    x_ref = int8_rounded(x) if qtype in INT8_PATH else x
    default = decode_config(qtype, n, k, n // groups, n_tok, pdl=pdl_ok(x.device))
    results = []
    cands = gemv_candidates(n, k, n // groups, n_tok)
    for cfg in cands + ([default] if default not in cands else []):
        # the reference rounds x where this tiling's kernel does (the one-token Q8_0 path)
        err = rel_err(gemv(x, w, grid, cfg), gemv_ref(x_ref, w, cfg=cfg))
        t = time_graph([lambda w_=w_, c=cfg: gemv(x, w_, grid, c) for w_ in ws])
        results.append((t, cfg, err))
    _report(rows, "gemv", name, qtype, n_tok, w.nbytes, results, default, copy_bw, "gemv")


def bench_moe_decode(name, gate_t, down_t, n_tok, copy_bw, grid, rows, k=6, n_exp=256,
                     n_ff=2048, dim=4096):  # fmt: skip
    gate = weight(gate_t, (n_exp, n_ff, dim), 1)
    up = weight(gate_t, (n_exp, n_ff, dim), 2)
    down = weight(down_t, (n_exp, dim, n_ff), 3)
    gen = torch.Generator().manual_seed(0)
    perm, per_call = torch.randperm(n_exp, generator=gen), n_tok * k
    # consecutive calls use disjoint experts, as consecutive layers would
    sets = [perm[i * per_call : (i + 1) * per_call].reshape(n_tok, k).to(DEV)
            for i in range(n_exp // per_call)]  # fmt: skip
    x = torch.randn(n_tok, dim, device=DEV)
    wts = torch.rand(n_tok, k, device=DEV)
    per_expert = gate[0].nbytes + up[0].nbytes + down[0].nbytes
    nbytes = len(torch.unique(sets[0])) * per_expert
    want = ref.moe(x, sets[0], wts, gate, up, down, 10.0)
    # the engine's: cfg=None in moe_decode (PDL chain, the Gluon gate/up kernel on sm_90)
    default = moe_decode_config(
        n_tok,
        k,
        n_ff,
        dim,
        int8=gate_t in INT8_PATH,
        qtype=gate_t,
        down_qtype=down_t,
        pdl=pdl_ok(x.device),
        gluon=moe_decode_hopper.supported(x.device),
    )
    results = []
    cands = [moe_decode_config(n_tok, k, n_ff, dim, te, nw) for te in (2048, 4096, 8192)
             for nw in (2, 4, 8)]  # fmt: skip
    for cfg in cands + ([default] if default not in cands else []):
        err = rel_err(moe_decode(x, sets[0], wts, gate, up, down, 10.0, grid, cfg), want)
        calls = [lambda s=s, c=cfg: moe_decode(x, s, wts, gate, up, down, 10.0, grid, c)
                     for s in sets]  # fmt: skip
        results.append((time_graph(calls), cfg, err))
    tol = "moe_decode_int8" if gate_t in INT8_PATH else "moe_decode"
    _report(rows, "moe_decode", name, gate_t, n_tok, nbytes, results, default, copy_bw, tol)


def _report(rows, kernel, name, qtype, n_tok, nbytes, results, default, copy_bw, tol):
    best = min(results, key=lambda r: r[0])
    t_def = next(r[0] for r in results if r[1] == default)
    row = dict(kernel=kernel, shape=name, qtype=qtype.name, tokens=n_tok, bytes=nbytes,
               us=best[0] * 1e6, gbps=nbytes / best[0] / 1e9,
               pct_copy=100 * nbytes / best[0] / copy_bw, best_cfg=best[1],
               default_us=t_def * 1e6, default_pct=100 * nbytes / t_def / copy_bw,
               max_rel_err=max(r[2] for r in results), tol=TOL[tol])  # fmt: skip
    rows.append(row)
    print(f"{kernel:11s} {name:28s} {qtype.name:8s} T={n_tok} {row['us']:8.1f} us "
          f"{row['gbps']:7.0f} GB/s {row['pct_copy']:5.1f}% (default {row['default_pct']:5.1f}%) "
          f"err {row['max_rel_err']:.1e} best {best[1]}", flush=True)  # fmt: skip


def bench_gemm(name, qtype, n, k, m, rows, grid):
    w = weight(qtype, (n, k), seed=7)
    x = torch.randn(m, k, device=DEV)
    want = ref.linear(x, w)
    cands = [
        gemm_config(m, k, n),
        dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=2),
        dict(BM=256, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=2),
        dict(BM=128, BN=64, BK=64, GROUP_M=8, num_warps=4, num_stages=4),
    ]
    results = []
    for cfg in cands:
        try:
            err = rel_err(gemm(x, w, grid, cfg), want)
            results.append((time_eager(lambda c=cfg: gemm(x, w, grid, c)), cfg, err))
        except Exception as exc:  # a tile that does not fit shared memory or registers
            print(f"  gemm cfg {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
    flops = 2 * m * n * k
    _report_flops(rows, "gemm", name, qtype, m, flops, results)


def _report_flops(rows, kernel, name, qtype, n_tok, flops, results):
    best = min(results, key=lambda r: r[0])
    row = dict(kernel=kernel, shape=name, qtype=qtype.name, tokens=n_tok, ms=best[0] * 1e3,
               tflops=flops / best[0] / 1e12, best_cfg=best[1],
               default_tflops=flops / results[0][0] / 1e12,
               max_rel_err=max(r[2] for r in results), tol=TOL[kernel])  # fmt: skip
    rows.append(row)
    print(f"{kernel:11s} {name:28s} {qtype.name:8s} T={n_tok} {row['ms']:8.3f} ms "
          f"{row['tflops']:6.1f} TFLOP/s (default {row['default_tflops']:6.1f}) "
          f"err {row['max_rel_err']:.1e} best {best[1]}", flush=True)  # fmt: skip


def kernel_resources() -> list[dict]:
    """Registers / spills / shared memory of every compiled kernel variant (best effort)."""
    from ds4py.quant.triton import gemm as gemm_mod
    from ds4py.quant.triton import gemv as gemv_mod
    from ds4py.quant.triton import moe as moe_mod

    kernels = [gemv_mod._gemv_kernel, gemm_mod._gemm_kernel, moe_mod._moe_gate_up_kernel,
               moe_mod._moe_down_kernel]  # fmt: skip
    out = []
    for kern in kernels:
        for cache in getattr(kern, "device_caches", {}).values():
            for key, ck in cache[0].items():
                out.append(dict(kernel=kern.fn.__name__, key=str(key)[-160:],
                                regs=getattr(ck, "n_regs", None),
                                spills=getattr(ck, "n_spills", None),
                                shared=getattr(ck.metadata, "shared", None)))  # fmt: skip
    return out


# ---- Driver ----------------------------------------------------------------------------------

GEMV_SHAPES = [  # name, type, out, in, groups
    ("attn_q_a 4096->1024", GQ.Q8_0, 1024, 4096, 1),
    ("attn_q_b 1024->32768", GQ.Q8_0, 32768, 1024, 1),
    ("attn_output_b 8192->4096", GQ.Q8_0, 4096, 8192, 1),
    ("attn_output_a 4096->8192 g8", GQ.Q8_0, 8192, 4096, 8),
    ("compressor_kv 4096->1024", GQ.F16, 1024, 4096, 1),
] + [(f"sweep 4096->16384 {q.name}", q, 16384, 4096, 1)
     for q in (GQ.F16, GQ.BF16, GQ.Q8_0, GQ.Q2_K, GQ.Q4_K, GQ.IQ2_XXS)]  # fmt: skip


# the engine's decode GEMVs per layer (joined groups as `TritonOps.merge` builds them) + the head
ENGINE_GEMVS = [  # name, type, out, in, groups
    ("attn_q_a+attn_kv", GQ.Q8_0, 1536, 4096, 1),
    ("attn_q_b", GQ.Q8_0, 32768, 1024, 1),
    ("attn_output_a g8", GQ.Q8_0, 8192, 4096, 8),
    ("attn_output_b", GQ.Q8_0, 4096, 8192, 1),
    ("ffn gate+up shexp", GQ.Q8_0, 4096, 4096, 1),
    ("ffn_down_shexp", GQ.Q8_0, 4096, 2048, 1),
    ("compressors+indexer_proj (ratio 4)", GQ.F16, 2624, 4096, 1),
    ("compressors (ratio 128)", GQ.F16, 1024, 4096, 1),
    ("indexer_attn_q_b", GQ.F16, 8192, 1024, 1),
    ("ffn_gate_inp", GQ.F16, 256, 4096, 1),
    ("hc_attn_fn", GQ.F16, 24, 16384, 1),
    ("output", GQ.Q8_0, 129280, 4096, 1),
]


def sweep_engine_gemvs(copy_bw, grid) -> list[dict]:
    """Every (BN, BK, warps) tiling of the tiled kernel for the engine's decode GEMVs at T = 1,
    against gemv's default (the one-token kernel for Q8_0 / F16: its own sweep is
    scripts/bench_gemv_decode.py --sweep)."""
    out = []
    for name, q, n, k, g in ENGINE_GEMVS:
        w = weight(q, (n, k), seed=n + k)
        ws = copies(w)
        x = torch.randn(1, g, k, device=DEV).squeeze(1).contiguous()
        default = decode_config(q, n, k, n // g, 1, pdl=pdl_ok(x.device))
        t_def = time_graph([lambda w_=w_, x=x, c=default: gemv(x, w_, grid, c) for w_ in ws])
        best = (t_def, default)
        for bk in (512, 1024, 2048, 4096):
            for bn in (1, 2, 4, 8, 16, 32):
                for nw in (1, 2, 4, 8):
                    if k % bk or (n // g) % bn or bn * bk > 32768 or bn * bk < 1024:
                        continue
                    cfg = dict(BN=bn, BK=bk, num_warps=nw)
                    t = time_graph([lambda w_=w_, x=x, c=cfg: gemv(x, w_, grid, c) for w_ in ws])
                    best = min(best, (t, cfg), key=lambda r: r[0])
        row = dict(name=name, qtype=q.name, n=n, k=k, mb=w.nbytes / 1e6,
                   default=default, default_us=t_def * 1e6,
                   default_pct=100 * w.nbytes / t_def / copy_bw,
                   best=best[1], best_us=best[0] * 1e6,
                   best_pct=100 * w.nbytes / best[0] / copy_bw)  # fmt: skip
        print(row, flush=True)
        out.append(row)
    return out


def run_tests() -> int:
    import pytest

    files = [str(ROOT / f"tests/test_quant_{n}.py") for n in ("triton", "formats", "ref")]
    return int(pytest.main(["-q", *files, "-p", "no:cacheprovider"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for bench.json and bench.log")
    ap.add_argument("--tests", action="store_true", help="run the quant pytest files first")
    ap.add_argument("--quick", action="store_true", help="decode shapes at T=1 only, no prefill")
    ap.add_argument("--sweep", action="store_true", help="only: tile sweep of the engine GEMVs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA device")
    test_rc = run_tests() if args.tests else None
    grid = tables(DEV)
    t0 = time.time()
    props = torch.cuda.get_device_properties(DEV)
    copy_bw = copy_bandwidth()
    mm = bf16_matmul_tflops()
    print(f"{props.name}: copy {copy_bw / 1e9:.0f} GB/s (read+write), bf16 matmul {mm:.0f} TFLOP/s")
    if args.sweep:
        sweep = sweep_engine_gemvs(copy_bw, grid)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            summary = dict(device=props.name, copy_gbps=copy_bw / 1e9, sweep=sweep)
            (args.out / "sweep.json").write_text(json.dumps(summary, indent=1, default=str))
        return
    rows: list[dict] = []
    for name, q, n, k, g in GEMV_SHAPES:
        bench_gemv(name, q, n, k, g, 1, copy_bw, grid, rows)
    if not args.quick:
        bench_gemv("attn_q_a 4096->1024", GQ.Q8_0, 1024, 4096, 1, 8, copy_bw, grid, rows)
        bench_gemv("attn_q_b 1024->32768", GQ.Q8_0, 32768, 1024, 1, 8, copy_bw, grid, rows)
    for name, gt, dt in (("experts q2 4096<->2048 6/256", GQ.IQ2_XXS, GQ.Q2_K),
                         ("experts q4 4096<->2048 6/256", GQ.Q4_K, GQ.Q4_K)):  # fmt: skip
        bench_moe_decode(name, gt, dt, 1, copy_bw, grid, rows)
        if not args.quick:
            bench_moe_decode(name, gt, dt, 4, copy_bw, grid, rows)
    if not args.quick:
        bench_gemm("attn_q_b 1024->32768", GQ.Q8_0, 32768, 1024, 2048, rows, grid)
        bench_gemm("attn_output_b 8192->4096", GQ.Q8_0, 4096, 8192, 2048, rows, grid)
        bench_gemm("shexp 4096->2048", GQ.Q8_0, 2048, 4096, 2048, rows, grid)
    try:
        resources = kernel_resources()
    except Exception as exc:  # introspection differs between Triton versions
        resources = [dict(error=repr(exc))]
    for r in resources:
        if r.get("spills"):
            print(f"spills: {r}")
    bad = [r for r in rows if not r["max_rel_err"] <= r["tol"]]
    summary = dict(
        device=props.name, date=datetime.date.today().isoformat(), torch=torch.__version__,
        triton=__import__("triton").__version__, copy_gbps=copy_bw / 1e9, bf16_tflops=mm,
        commit=subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip(),
        tests_rc=test_rc, failed_checks=len(bad), seconds=time.time() - t0, rows=rows,
        kernels=resources,
    )  # fmt: skip
    print(f"correctness: {len(rows) - len(bad)}/{len(rows)} within tolerance; tests rc={test_rc}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(summary, indent=1, default=str))
    if bad or test_rc:
        sys.exit(1)


if __name__ == "__main__":
    main()
