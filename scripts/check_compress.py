"""GPU check of the fused compressor decode kernel (ds4py/quant/triton/compress.py).

Usage: python scripts/check_compress.py OUT   (CUDA; writes OUT/compress.json)
(a) kernel vs reference at the Flash sizes (attention compressor w=512 at ratios 4 and 128,
indexer compressor w=128 at ratio 4; compact and float stores) for contexts 4K..1M: consecutive
positions up to the context's end from an empty frontier, the whole state and every stored row
compared after each step; the store stage alone on rounding ties, exact. (b) time per call in a
CUDA graph of 100 calls (median of replays): the kernel, and the reference through torch.compile
as the engine runs it, and eagerly. Asserts after writing the JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from ds4py.kv.state import CompressorState, FloatRows, FP4Rows, FP8Rows
from ds4py.model.model import fp8_row, hadamard_matrix
from ds4py.quant.triton.compress import (
    _store_fp4,
    _store_fp8,
    compress_decode,
    compress_decode_ref,
    fp4_ref,
)

DEVICE = "cuda"
N_ROT = 64
EPS = 1e-6
# name: (ratio, width, store kind)
CONFIGS = {
    "attn4_fp8": (4, 512, "fp8"),
    "attn128_fp8": (128, 512, "fp8"),
    "index4_fp4": (4, 128, "fp4"),
    "attn4_float": (4, 512, "float"),
    "attn128_float": (128, 512, "float"),
    "index4_float": (4, 128, "float"),
}
CONTEXTS = (4096, 32768, 131072, 1048576)


def freqs() -> torch.Tensor:
    i = torch.arange(N_ROT // 2, dtype=torch.float64)
    return 160000.0 ** (-i / (N_ROT // 2))


def angles(p: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.tensor([p // r * r], dtype=torch.float64)[:, None] * freqs()[None, :]
    return ang.cos().float()[0].to(DEVICE), ang.sin().float()[0].to(DEVICE)


def make_store(kind: str, cap: int, w: int):
    if kind == "fp8":
        return FP8Rows(cap, w, N_ROT, DEVICE)
    if kind == "fp4":
        return FP4Rows(cap, w, DEVICE)
    return FloatRows(cap, w, DEVICE)


class Case:
    """One compressor's inputs and two copies of its state (kernel, reference)."""

    def __init__(self, r: int, w: int, kind: str, ctx: int, seed: int = 0):
        self.r, self.w, self.kind = r, w, kind
        self.cw = (2 if r == 4 else 1) * w
        self.g = torch.Generator().manual_seed(seed)
        self.ape = torch.randn(self.r, self.cw, generator=self.g).to(DEVICE)
        self.norm = (1 + 0.1 * torch.randn(w, generator=self.g)).to(DEVICE)
        self.had = (
            hadamard_matrix(w, torch.device(DEVICE), torch.float32) if kind == "fp4" else None
        )
        cap = ctx // r + 1
        self.frs = [CompressorState.empty(r, self.cw, DEVICE) for _ in range(2)]
        self.stores = [make_store(kind, cap, w) for _ in range(2)]

    def token(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(1, self.cw, generator=self.g)
        b = torch.randn(1, self.cw, generator=self.g) * (8.0 if p % 3 == 0 else 1.0)
        return a.to(DEVICE), b.to(DEVICE)

    def args(self, which: int, a, b, pos, cos, sin) -> tuple:
        fr, rows = self.frs[which], self.stores[which]
        return (a, b, self.ape, pos, fr, self.norm, EPS, cos, sin, rows, self.had)


def row_errors(kind: str, got: torch.Tensor, want: torch.Tensor) -> dict:
    """The test's tolerance (tests/test_compress_kernel.py assert_rows_close) as numbers."""
    scale = want.abs().amax(1, keepdim=True).clamp_min(1e-30)
    diff = (got - want).abs()
    out = {"max_abs_over_row_max": float((diff / scale).max())}
    if kind == "float":
        out["ok"] = bool((diff <= 1e-6 * scale + 1e-6 * want.abs()).all())
        return out
    big = torch.maximum(got.abs(), want.abs())
    step = big / 8 + scale * 2.0**-15 if kind == "fp8" else big / 2 + scale / 6
    out["elements_differing"] = int((diff > 0).sum())
    out["ok"] = bool((diff <= step).all()) and float((diff > 0).float().mean()) <= 0.02
    return out


def check_case(name: str, ctx: int) -> dict:
    r, w, kind = CONFIGS[name]
    case = Case(r, w, kind, ctx)
    n = 2 * r + 3
    res = {"name": name, "ctx": ctx, "steps": n, "state_mismatch_steps": 0}  # counters
    res |= {"max_abs_over_row_max": 0.0, "elements_differing": 0, "part_bytes_differing": 0}
    res["ok"] = True
    for p in range(ctx - n, ctx):
        a, b = case.token(p)
        pos = torch.tensor([p], device=DEVICE)
        cos, sin = angles(p, r)
        compress_decode(*case.args(0, a, b, pos, cos, sin))
        compress_decode_ref(*case.args(1, a, b, pos, cos, sin))
        same = all(
            torch.equal(x, y)
            for x, y in zip(case.frs[0].tensors(), case.frs[1].tensors(), strict=True)
        )
        res["state_mismatch_steps"] += not same
        k = p // r
        got, want = (s.get(s.cap)[k : k + 1] for s in case.stores)
        err = row_errors(kind, got, want)
        res["max_abs_over_row_max"] = max(res["max_abs_over_row_max"], err["max_abs_over_row_max"])
        res["elements_differing"] += err.get("elements_differing", 0)
        res["ok"] &= err["ok"] and same
        for x, y in zip(case.stores[0].parts, case.stores[1].parts, strict=True):
            res["part_bytes_differing"] += int(
                (x[k].view(torch.uint8) != y[k].view(torch.uint8)).sum()
            )
    whole = row_errors(kind, *(s.get(s.cap) for s in case.stores))  # no stray writes
    res["ok"] &= whole["ok"]
    return res


# ---- The store stage alone on rounding ties (exact) ----


@triton.jit
def _store_rows_kernel(
    X, OUT0, OUT1, OUT2, W: tl.constexpr, N_ROT: tl.constexpr, FP8: tl.constexpr
):
    k = tl.program_id(0)
    if FP8:
        ev = 64 * tl.arange(0, W // 64)[:, None] + 2 * tl.arange(0, 32)[None, :]
        _store_fp8(
            tl.load(X + k * W + ev), tl.load(X + k * W + ev + 1), OUT0, OUT1, OUT2, k, W, N_ROT
        )
    else:
        ev = 32 * tl.arange(0, W // 32)[:, None] + 2 * tl.arange(0, 16)[None, :]
        _store_fp4(tl.load(X + k * W + ev), tl.load(X + k * W + ev + 1), OUT0, OUT1, k, W)


def tie_rows(grid: torch.Tensor, top: float, n: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Blocks of ties between grid values at scales 2**-60 .. 2**100, the block max on the grid
    top or just over half of it (the store's exponent then drops by one), zeros, -0.0."""
    v = torch.unique(grid.abs())
    mids = (v[1:] + v[:-1]) / 2
    size = 64 if top == 448.0 else 32
    x = mids[torch.randint(len(mids), (n, w), generator=g)].view(n, -1, size)
    x[:, :, 0] = torch.where(torch.rand(n, w // size, generator=g) < 0.5, top, 0.51 * top)
    x[:, :, 1], x[:, :, 2] = 0.0, -0.0
    e = torch.randint(-60, 100, (n, w // size, 1), generator=g).float()
    sign = torch.where(torch.rand(n, w // size, size, generator=g) < 0.5, -1.0, 1.0)
    return (x * sign * torch.exp2(e)).flatten(1)


def check_store_ties() -> dict:
    g = torch.Generator().manual_seed(5)
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[e4m3.isfinite()]
    x8 = tie_rows(e4m3, 448.0, 64, 512, g)
    x8[:, -N_ROT:] = torch.randn(64, N_ROT, generator=g)
    x8 = x8.to(DEVICE)
    got, want = make_store("fp8", 64, 512), make_store("fp8", 64, 512)
    _store_rows_kernel[(64,)](x8, *got.parts, W=512, N_ROT=N_ROT, FP8=True)
    want.write(torch.arange(64, device=DEVICE), fp8_row(x8, 512 - N_ROT, N_ROT))
    fp8_ok = all(torch.equal(a, b) for a, b in zip(got.parts, want.parts, strict=True))
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    x4 = tie_rows(e2m1, 6.0, 64, 128, g).to(DEVICE)
    x4[0, :32] = 6 * 2.0**-130  # below the smallest scale: subnormal values
    got, want = make_store("fp4", 64, 128), make_store("fp4", 64, 128)
    _store_rows_kernel[(64,)](x4, *got.parts, got.parts[0], W=128, N_ROT=N_ROT, FP8=False)
    want.write(torch.arange(64, device=DEVICE), fp4_ref(x4, torch.eye(128, device=DEVICE)))
    fp4_ok = all(torch.equal(a, b) for a, b in zip(got.parts, want.parts, strict=True))
    return {"fp8_exact": fp8_ok, "fp4_exact": fp4_ok}


# ---- Timing ----


def graph_time_us(fn, calls: int = 100, replays: int = 9) -> float:
    """Median per-call time of `calls` calls of fn captured in one CUDA graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def time_case(name: str, ctx: int) -> dict:
    r, w, kind = CONFIGS[name]
    case = Case(r, w, kind, ctx, seed=1)
    p = ctx - 1  # the window closes: the most work (the closing copy)
    a, b = case.token(p)
    pos = torch.tensor([p], device=DEVICE)
    cos, sin = angles(p, r)
    out = {"name": name, "ctx": ctx, "pos": p}
    out["kernel_us"] = graph_time_us(lambda: compress_decode(*case.args(0, a, b, pos, cos, sin)))
    ref_args = case.args(1, a, b, pos, cos, sin)
    out["ref_eager_us"] = graph_time_us(lambda: compress_decode_ref(*ref_args))
    try:
        compiled = torch.compile(compress_decode_ref)
        out["ref_compiled_us"] = graph_time_us(lambda: compiled(*ref_args))
    except Exception as e:  # report, keep the other numbers
        out["ref_compiled_error"] = f"{type(e).__name__}: {e}"[:500]
    return out


def main() -> None:
    if len(sys.argv) != 2 or not torch.cuda.is_available():
        sys.exit("usage: python scripts/check_compress.py OUT  (needs CUDA)")
    outdir = Path(sys.argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # the FP4 reference's Hadamard in float32
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "checks": [],
        "timing": [],
    }
    t0 = time.time()
    report["store_ties"] = check_store_ties()
    print("store stage on ties:", report["store_ties"], flush=True)
    for name in CONFIGS:
        for ctx in CONTEXTS:
            res = check_case(name, ctx)
            report["checks"].append(res)
            print(json.dumps(res), flush=True)
            torch.cuda.empty_cache()
    for name in CONFIGS:
        for ctx in (4096, 1048576):
            res = time_case(name, ctx)
            report["timing"].append(res)
            print(json.dumps(res), flush=True)
            torch.cuda.empty_cache()
    report["seconds"] = round(time.time() - t0, 1)
    (outdir / "compress.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {outdir / 'compress.json'}")
    assert all(report["store_ties"].values()), report["store_ties"]
    bad = [c for c in report["checks"] if not c["ok"] or c["state_mismatch_steps"]]
    assert not bad, bad


if __name__ == "__main__":
    main()
