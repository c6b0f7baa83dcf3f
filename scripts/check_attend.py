#!/usr/bin/env python
"""GPU check and timing of the fused decode-attention kernel (ds4py/quant/triton/attend.py).

Owns: its numbers at DeepSeek V4 Flash sizes (64 heads, head dim 512, window 128). (a) Error of
`attend_decode` against `attend_decode_ref` (float32), and of both against float64, for ratio-4
layers (512 selected rows), ratio-128 layers (all rows) and window-only layers at contexts 4K,
32K, 128K and 1M, both row stores, several positions; fails if any error exceeds 1e-5. (b) Time
per call from a CUDA graph of 100 calls (median of replays), with L2 warm and flushed before each
call, for the default tile and a sweep of tiles, and for the reference through torch.compile (as
the engine compiles it), also in a graph. Writes OUT/attend.json.
Usage: PYTHONPATH=. python scripts/check_attend.py OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import traceback
import types
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_kernels_only() -> None:
    """Import ds4py submodules without ds4py/__init__.py (the engine's imports need packages,
    e.g. the tokenizer's, that a bare GPU box may lack)."""
    if "ds4py" not in sys.modules:
        pkg = types.ModuleType("ds4py")
        pkg.__path__ = [str(ROOT / "ds4py")]
        sys.modules["ds4py"] = pkg


_import_kernels_only()
import triton  # noqa: E402

from ds4py.kv.state import FloatRows, FP8Rows  # noqa: E402
from ds4py.quant.triton.attend import attend_config, attend_decode, attend_decode_ref  # noqa: E402

DEV = torch.device("cuda")
H, D, N_ROT, W, TOP_K = 64, 512, 64, 128, 512
CONTEXTS = (4096, 32768, 131072, 1048576)
TOL = 1e-5
FLUSH_BYTES = 96 << 20
SWEEP = [
    dict(BH=64, R=64, num_warps=8),
    dict(BH=64, R=32, num_warps=8),
    dict(BH=64, R=16, num_warps=4),
    dict(BH=32, R=32, num_warps=4),
    dict(BH=32, R=16, num_warps=2),
    dict(BH=16, R=32, num_warps=4),
    dict(BH=16, R=16, num_warps=4),
]
# the brief's targets, microseconds per call
TARGETS = {"window": 5.0, "ratio4": 8.0, "ratio128@4096": 6.0, "ratio128@1048576": 40.0}

# ---- Data ------------------------------------------------------------------------------------


def make_rows(store: str, cap: int, seed: int) -> FloatRows:
    """A full store of random rows, element scale varying by row (so FP8 exponents vary)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    rows = FP8Rows(cap, D, N_ROT, DEV) if store == "fp8" else FloatRows(cap, D, DEV)
    for r0 in range(0, cap, 65536):
        n = min(65536, cap - r0)
        v = torch.randn(n, D, device=DEV, generator=g)
        v *= torch.exp2(torch.randint(-2, 3, (n, 1), device=DEV, generator=g).float())
        rows.write(torch.arange(r0, r0 + n, device=DEV), v)
    return rows


class F64Rows:
    """A row store's rows as float64: the float64 truth runs the same reference code."""

    def __init__(self, rows: FloatRows):
        self.rows, self.cap = rows, rows.cap

    def get(self, n: int) -> torch.Tensor:
        return self.rows.get(n).double()

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        return self.rows.gather(idx).double()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


# ---- Timing ----------------------------------------------------------------------------------


def time_graph(call: Callable[[], object], n: int = 100, replays: int = 9, flush=None) -> float:
    """Median seconds per call over replays of one CUDA graph of n calls (each after a flush of
    L2 when `flush` is given; the flushes alone are timed and subtracted)."""

    def graph_time(body: Callable[[], None]) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                body()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                body()
        g.replay()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / n)
        return statistics.median(times)

    if flush is None:
        return graph_time(call)

    def both() -> None:
        flush()
        call()

    return max(graph_time(both) - graph_time(flush), 0.0)


# ---- Cases -----------------------------------------------------------------------------------


def case_inputs(ratio: int, ctx: int, store: str, seed: int) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)
    inp = dict(
        q=torch.randn(H, D, device=DEV, generator=g),
        raw=torch.randn(W, D, device=DEV, generator=g),
        sinks=torch.randn(H, device=DEV, generator=g),
        rows=None,
        idx=None,
        ratio=ratio,
    )
    if ratio:
        cap = ctx // ratio + 1
        inp["rows"] = make_rows(store, cap, seed)
        if ratio == 4:
            inp["idx"] = torch.randperm(cap, device=DEV, generator=g)[:TOP_K]
    return inp


def call_args(inp: dict, pos: torch.Tensor) -> tuple:
    return (inp["q"], inp["raw"], pos, inp["rows"], inp["idx"], inp["ratio"], inp["sinks"])


def check_errors(inp: dict, ctx: int, positions: list[int]) -> list[dict]:
    out = []
    for p in positions:
        pos = torch.tensor([p], device=DEV)
        args = call_args(inp, pos)
        got = attend_decode(*args)
        want = attend_decode_ref(*args)
        rows = inp["rows"] and F64Rows(inp["rows"])
        q, raw, sinks = inp["q"].double(), inp["raw"].double(), inp["sinks"].double()
        truth = attend_decode_ref(q, raw, pos, rows, inp["idx"], inp["ratio"], sinks)
        again = attend_decode(*args)
        out.append(
            dict(
                pos=p,
                err_vs_ref=rel_err(got, want),
                err_kernel_vs_f64=rel_err(got, truth),
                err_ref_vs_f64=rel_err(want, truth),
                deterministic=bool(torch.equal(got, again)),
            )
        )
    return out


def time_case(inp: dict, pos_value: int, ref_c, flush, sweep: bool) -> dict:
    pos = torch.tensor([pos_value], device=DEV)
    args = call_args(inp, pos)
    n_rows = (
        inp["idx"].numel() if inp["idx"] is not None else (inp["rows"].cap if inp["rows"] else 0)
    )
    default = attend_config(n_rows, W, H, DEV)
    res = dict(
        pos=pos_value,
        default_config=default,
        kernel_warm_us=1e6 * time_graph(lambda: attend_decode(*args)),
        kernel_cold_us=1e6 * time_graph(lambda: attend_decode(*args), flush=flush),
    )
    if ref_c is not None:
        for _ in range(2):  # compile outside the graph
            ref_c(*args)
        res["ref_compiled_warm_us"] = 1e6 * time_graph(lambda: ref_c(*args))
        res["ref_compiled_cold_us"] = 1e6 * time_graph(lambda: ref_c(*args), flush=flush)
    if sweep:
        res["sweep_warm_us"] = [dict(config=c, us=_sweep_point(args, c)) for c in SWEEP]
    return res


def _sweep_point(args: tuple, config: dict) -> float | str:
    """Warm time of one tile, or why it failed (a failing tile must not end the run)."""
    try:
        if rel_err(attend_decode(*args, config=config), attend_decode_ref(*args)) > TOL:
            return "wrong result"
        return 1e6 * time_graph(lambda: attend_decode(*args, config=config))
    except Exception as e:  # noqa: BLE001  (recorded in the JSON)
        return f"failed: {type(e).__name__}: {e}"[:300]


def run_case(rec: dict, ref_c, flush, sweep: bool) -> None:
    """Errors at several positions; timings for FP8 rows (and float rows at 128K)."""
    kind, ratio, ctx, store = rec["kind"], rec["ratio"], rec["ctx"], rec["store"]
    inp = case_inputs(ratio, ctx, store, seed=ctx + ratio)
    rec["errors"] = check_errors(inp, ctx, sorted({0, 5, W + 3, 4095, ctx - 1}))
    if store == "fp8" or ctx == 131072:
        rec["target_us"] = target(kind, ctx)
        rec["timing"] = [time_case(inp, ctx - 1, ref_c, flush, sweep)]
        if ratio == 128 and ctx == CONTEXTS[-1]:  # a young session in a 1M-token cache
            rec["timing"].append(time_case(inp, 4095, ref_c, flush, False))


def target(kind: str, ctx: int) -> float | None:
    return TARGETS.get(kind) or TARGETS.get(f"{kind}@{ctx}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--no-sweep", action="store_true", help="time the default tile only")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="FP8 rows at 4K, 128K and 1M only; the compiled reference is not timed (minutes)",
    )
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is float32 math
    torch.backends.cudnn.allow_tf32 = False
    for knob in ("recompile_limit", "cache_size_limit"):  # one compile per case shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    ref_c = None if a.quick else torch.compile(attend_decode_ref, dynamic=None)
    scratch = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=DEV)
    flush = lambda: scratch.bitwise_not_()  # noqa: E731  (reads and writes 96 MiB: L2 cold)
    records, failures = [], []
    plan = [("window", 0, 4096)]
    contexts = (CONTEXTS[0], CONTEXTS[2], CONTEXTS[-1]) if a.quick else CONTEXTS
    plan += [(f"ratio{r}", r, ctx) for ctx in contexts for r in (4, 128)]
    for kind, ratio, ctx in plan:
        for store in ("fp8", "float") if ratio and not a.quick else ("fp8",):
            rec = dict(kind=kind, ratio=ratio, ctx=ctx, store=store)
            try:
                run_case(rec, ref_c, flush, not a.no_sweep)
            except Exception as e:  # noqa: BLE001  (recorded; the other cases still run)
                traceback.print_exc()
                rec["exception"] = f"{type(e).__name__}: {e}"[:2000]
            bad = [
                e for e in rec.get("errors", []) if e["err_vs_ref"] > TOL or not e["deterministic"]
            ]
            failures += [(kind, ctx, store, e) for e in bad]
            if "exception" in rec:
                failures.append((kind, ctx, store, rec["exception"]))
            records.append(rec)
            _print(rec)
            torch.cuda.empty_cache()
    a.out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        heads=H,
        head_dim=D,
        window=W,
        top_k=TOP_K,
        tolerance=TOL,
        failures=len(failures),
    )
    (a.out / "attend.json").write_text(json.dumps(dict(meta=meta, cases=records), indent=1))
    for f in failures:
        print("FAIL", f)
    print(f"wrote {a.out / 'attend.json'}; {len(failures)} failures")
    return 1 if failures else 0


def _print(rec: dict) -> None:
    worst = max((e["err_vs_ref"] for e in rec.get("errors", [])), default=float("nan"))
    head = f"{rec['kind']:>8} ctx {rec['ctx']:>8} {rec['store']:>5}: max err vs ref {worst:.2e}"
    for t in rec.get("timing", []):
        points = [p for p in t.get("sweep_warm_us", []) if isinstance(p["us"], float)]
        best = min(points or [dict(us=t["kernel_warm_us"])], key=lambda p: p["us"])
        print(
            f"{head} | pos {t['pos']:>8}: kernel {t['kernel_warm_us']:7.1f} us warm "
            f"{t['kernel_cold_us']:7.1f} cold (best tile {best['us']:.1f} "
            f"{best.get('config', 'default')}) | compiled ref "
            f"{t.get('ref_compiled_warm_us', float('nan')):7.1f} warm "
            f"{t.get('ref_compiled_cold_us', float('nan')):7.1f} cold | "
            f"target {rec.get('target_us')}"
        )
    if not rec.get("timing"):
        print(head)


if __name__ == "__main__":
    sys.exit(main())
