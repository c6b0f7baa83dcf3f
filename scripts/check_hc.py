#!/usr/bin/env python
"""GPU check of the decode mHC-pre kernel with its projection fused in (ds4py/quant/triton/hc.py).

Usage: python scripts/check_hc.py OUT   (CUDA; writes OUT/hc.json)
(a) `hc_pre_fused` vs its reference (the F16 projection in float32, then `ref.hc_pre`) at the
Flash size D = 4096 for T = 1 and 4, several seeds and Sinkhorn depths, the sweep's tilings too:
norm-relative and max-abs errors of u, post, comb; bit-identical reruns. (b) time per call in a
CUDA graph of 100 calls (median of replays), each call on its own copy of fn and X (96 copies,
more than L2 holds): the fused path (two launches: default tiling and each launch alone; one
launch with an integer ticket; a tiling sweep of both), today's path (gemv + the one-program-
per-token hc_pre kernel) and the reference through torch.compile.
Asserts after writing the JSON. Needs only torch, triton and gguf.
"""

from __future__ import annotations

import json
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from graph_timing import graph_us  # scripts/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
if "ds4py" not in sys.modules:  # ds4py.quant without ds4py/__init__ (its imports need more)
    _pkg = types.ModuleType("ds4py")
    _pkg.__path__ = [str(ROOT / "ds4py")]
    sys.modules["ds4py"] = _pkg

from gguf import GGMLQuantizationType as GQ  # noqa: E402

from ds4py.quant import ref  # noqa: E402
from ds4py.quant.formats import QTensor  # noqa: E402
from ds4py.quant.triton.gemv import gemv  # noqa: E402
from ds4py.quant.triton.hc import (  # noqa: E402
    _hc_finish_kernel,
    _hc_partials_kernel,
    hc_fused_config,
    hc_pre,
    hc_pre_fused,
    hc_pre_fused_ref,
)
from ds4py.quant.triton.tiles import prepared, tables  # noqa: E402

DEV = "cuda"
D = 4096
EPS, HC_EPS, ITERS = 1e-6, 1e-6, 20  # Flash: rms eps, hc eps, Sinkhorn iterations
COPIES = 96  # x 0.8 MB of fn (+ X) per copy: well past a 50-60 MB L2
TOL = 1e-5
SWEEP = [
    {"BK": bk, "BD": bd, "warps1": w1, "warps2": w2}
    for bk in (64, 128, 256)
    for bd in (128, 256, 512)
    for w1, w2 in ((2, 2), (4, 4), (2, 1), (4, 1))
]


def inputs(T: int, seed: int):
    """Streams at a spread of scales; F16 projection rows whose logits reach tens."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, 4, D, generator=g) * torch.exp(torch.randn(T, 4, 1, generator=g))
    w = (torch.randn(24, 4 * D, generator=g) * 4 / D**0.5).half()
    fn = prepared(QTensor(w.view(torch.uint8).to(DEV), GQ.F16, (24, 4 * D)))
    scale = 0.5 + torch.rand(3, generator=g)
    base = torch.randn(24, generator=g)
    return X.to(DEV), fn, scale.to(DEV), base.to(DEV)


def errors(got, want) -> dict:
    out = {}
    for name, a, b in zip(("u", "post", "comb"), got, want, strict=True):
        d = (a.double() - b.double()).abs()
        out[f"{name}_rel"] = float(d.norm() / b.double().norm())
        out[f"{name}_max_abs"] = float(d.max())
    out["ok"] = (
        all(torch.isfinite(a).all() for a in got)
        and max(out[f"{n}_rel"] for n in ("u", "post", "comb")) <= TOL
    )
    return out


def check(T: int, seed: int, iters: int, cfg: dict | None = None, one: bool = False) -> dict:
    """Errors of one configuration; `one`: the single-launch (ticket) form."""
    X, fn, scale, base = inputs(T, seed)
    args = (X, fn, scale, base, EPS, HC_EPS, iters)
    ticket = torch.zeros(1, dtype=torch.int32, device=DEV) if one else None
    got = hc_pre_fused(*args, cfg=cfg, ticket=ticket)
    res = {"T": T, "seed": seed, "iters": iters, "cfg": cfg or hc_fused_config(D), "one": one}
    res |= errors(got, hc_pre_fused_ref(*args))
    again = hc_pre_fused(*args, cfg=cfg, ticket=ticket)
    res["deterministic"] = all(torch.equal(a, b) for a, b in zip(got, again, strict=True))
    res["ticket_reset"] = ticket is None or int(ticket.item()) == 0
    return res


# ---- Timing ----------------------------------------------------------------------------------


def dense_ref(X, w16, scale, base):
    """The reference on a plain half tensor (what torch.compile sees)."""
    v = X.flatten(1) @ w16.float().T
    return ref.hc_pre(X, v, scale, base, EPS, HC_EPS, ITERS)


def launches(T: int, cfg: dict, c) -> tuple[Callable, Callable]:
    """The fused path's two launches alone, on copy c (for the per-launch times)."""
    X, fn, scale, base = c
    K, n = 4 * D, triton.cdiv(4 * D, cfg["BK"])
    part = torch.zeros(T, n, 32, device=DEV)
    u, post = torch.empty(T, D, device=DEV), torch.empty(T, 4, device=DEV)
    comb = torch.empty(T, 4, 4, device=DEV)
    w = fn.data.view(torch.float16)

    def first():
        _hc_partials_kernel[(n,)](
            X, w, part, K, T=T, BK=cfg["BK"], P=n, SLOTS=32, num_warps=cfg["warps1"]
        )

    def second():
        _hc_finish_kernel[(triton.cdiv(D, cfg["BD"]), T)](
            X, part, scale, base, u, post, comb, D, EPS, HC_EPS,
            P=n, PB=triton.next_power_of_2(n), SLOTS=32, ITERS=ITERS, BD=cfg["BD"],
            num_warps=cfg["warps2"],
        )  # fmt: skip

    return first, second


def time_all(T: int) -> dict:
    copies = [inputs(T, 100 + i) for i in range(COPIES)]
    tabs = tables(DEV)
    res = {"T": T, "copies": COPIES}

    pick = [copies[i % COPIES] for i in range(100)]
    res["fused_us"] = graph_us([lambda c=c: hc_pre_fused(*c, EPS, HC_EPS, ITERS) for c in pick])
    ticket = torch.zeros(1, dtype=torch.int32, device=DEV)
    res["fused_one_launch_us"] = graph_us(
        [lambda c=c: hc_pre_fused(*c, EPS, HC_EPS, ITERS, ticket=ticket) for c in pick]
    )
    cfg = hc_fused_config(D)
    pairs = [launches(T, cfg, c) for c in pick]
    res["fused_launch1_us"] = graph_us([p[0] for p in pairs])
    res["fused_launch2_us"] = graph_us([p[1] for p in pairs])

    def today(c):
        X, fn, scale, base = c
        return hc_pre(X, gemv(X.view(T, 4 * D), fn, tabs), scale, base, EPS, HC_EPS, ITERS)

    res["today_gemv_plus_hc_us"] = graph_us([lambda c=c: today(c) for c in pick])
    try:
        compiled = torch.compile(dense_ref)
        res["ref_compiled_us"] = graph_us(
            [lambda c=c: compiled(c[0], c[1].data.view(torch.float16), c[2], c[3]) for c in pick]
        )
    except Exception as e:  # report, keep the other numbers
        res["ref_compiled_error"] = f"{type(e).__name__}: {e}"[:500]
    res["sweep"] = []
    for cfg in SWEEP:
        for tk in (None, ticket):
            calls = [
                lambda c=c, cfg=cfg, tk=tk: hc_pre_fused(*c, EPS, HC_EPS, ITERS, cfg=cfg, ticket=tk)
                for c in pick
            ]
            res["sweep"].append({**cfg, "one": tk is not None, "us": round(graph_us(calls), 3)})
    res["best"] = min(res["sweep"], key=lambda r: r["us"])
    res["best_two_launch"] = min((r for r in res["sweep"] if not r["one"]), key=lambda r: r["us"])
    return res


def main() -> None:
    if len(sys.argv) != 2 or not torch.cuda.is_available():
        sys.exit("usage: python scripts/check_hc.py OUT  (needs CUDA)")
    outdir = Path(sys.argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference projection in float32
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "D": D,
        "checks": [],
        "timing": [],
    }
    t0 = time.time()
    for T in (1, 4):
        for seed in range(3):
            for iters in (1, ITERS):
                for one in (False, True):
                    report["checks"].append(check(T, seed, iters, one=one))
                    print(json.dumps(report["checks"][-1]), flush=True)
        for cfg in SWEEP:
            for one in (False, True):
                report["checks"].append(check(T, 9, ITERS, cfg, one))
    for T in (1, 4):
        report["timing"].append(time_all(T))
        print(json.dumps({k: v for k, v in report["timing"][-1].items() if k != "sweep"}))
    report["seconds"] = round(time.time() - t0, 1)
    (outdir / "hc.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {outdir / 'hc.json'}")
    bad = [
        c for c in report["checks"] if not (c["ok"] and c["deterministic"] and c["ticket_reset"])
    ]
    assert not bad, bad


if __name__ == "__main__":
    main()
