#!/usr/bin/env python
"""Decode routed-MoE kernels at the real expert shapes on CUDA: correctness, variants, timing.

Owns: the batch-1 numbers of moe_decode's launches at the q2 shapes (gate/up IQ2_XXS
[256, 2048, 4096] x 2, down Q2_K [256, 4096, 2048]) and the q4 shapes (Q4_K for all three),
6 of 256 experts: each launch alone per variant and the whole moe_decode call, in µs, GB/s and
% of the device-to-device copy bandwidth measured in the same run, each checked against a torch
reference fed the same int8-rounded activations (and the whole call against plain f32); the
default launches also with their weights in L2 (the same experts every call): the floor their
instructions set, whatever the memory.
Method as bench_kernels.py: a CUDA graph of calls rotating over disjoint expert sets (> 1 GB,
so no call finds its weights in L2). Does not own the kernels (ds4py/quant/triton/moe.py).
Usage: python scripts/bench_moe_decode.py [--quick] [--no-q4]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import (  # noqa: E402
    DEV,
    copy_bandwidth,
    int8_rounded,
    rel_err,
    time_graph,
    weight,
)
from gguf import GGMLQuantizationType as GQ  # noqa: E402

from ds4py.quant import ref  # noqa: E402
from ds4py.quant.formats import QTensor  # noqa: E402
from ds4py.quant.triton import moe_decode_hopper  # noqa: E402
from ds4py.quant.triton.gemv import gemv  # noqa: E402
from ds4py.quant.triton.moe import (  # noqa: E402
    down_launch,
    gate_up_launch,
    moe_decode,
    moe_decode_config,
    moe_decode_shared,
    operands,
)
from ds4py.quant.triton.tiles import tables  # noqa: E402

N_EXP, N_FF, DIM, K, CLAMP = 256, 2048, 4096, 6, 10.0
# tilings swept besides the defaults (H200 results: docs/PERFORMANCE.md)
IQ2_GATE_UP = [dict(R=r, num_warps=w) for r, w in ((1, 1), (4, 1), (2, 2), (4, 2), (8, 1), (8, 2))]
# the Gluon kernel on sm_90 (moe_decode_hopper.py): NB blocks of num_warps rows per CTA, PF
# blocks' weights loaded ahead
IQ2_GLUON = [
    dict(NB=nb, PF=pf, num_warps=w) | (dict(maxnreg=m) if m else {})
    for nb, pf, w, m in ((2, 1, 8, 0), (4, 1, 8, 0), (4, 2, 8, 0), (4, 1, 8, 80), (4, 2, 8, 80),
                         (4, 1, 8, 72), (2, 1, 8, 80), (8, 2, 4, 80), (4, 1, 4, 80))
]  # fmt: skip
KQ_GATE_UP = [dict(R=r, num_warps=w) for r, w in ((1, 1), (2, 1), (1, 2), (2, 2))]
# down: R rows per program, the slots in chunks of KC (in registers, or across the warps), the
# next chunk's loads issued before this one's math when the register cap allows (maxnreg)
KQ_DOWN = [
    dict(R=r, num_warps=w, KC=kc) | (dict(maxnreg=m) if m else {})
    for r, w, kc, m in ((2, 1, 1, 0), (2, 1, 2, 0), (2, 1, 2, 128), (2, 1, 1, 168),
                        (2, 1, 2, 168), (2, 2, 2, 128), (4, 1, 1, 168))
]  # fmt: skip


def _experts(gate_t: GQ, down_t: GQ) -> tuple[QTensor, QTensor, QTensor]:
    return (weight(gate_t, (N_EXP, N_FF, DIM), 1), weight(gate_t, (N_EXP, N_FF, DIM), 2),
            weight(down_t, (N_EXP, DIM, N_FF), 3))  # fmt: skip


def _dense(w: QTensor, ids: torch.Tensor) -> list[torch.Tensor]:
    return [ref.dense_weight(w[int(e)]) for e in ids.reshape(-1)]


def _line(name: str, t: float, nbytes: float, copy_bw: float, err: float, note: str = "") -> None:
    print(f"  {name:44s} {t * 1e6:8.2f} us {nbytes / t / 1e9:7.0f} GB/s "
          f"{100 * nbytes / t / copy_bw:5.1f} %  err {err:.1e}{note}", flush=True)  # fmt: skip


def _timed(name, run, check, calls, nbytes, copy_bw) -> float | None:
    """Run once (error vs reference, determinism), then time the graph of `calls`."""
    try:
        a, b = run(), run()
        note = "" if torch.equal(a, b) else "  NONDETERMINISTIC"
        t = time_graph(calls)
    except Exception as exc:  # a variant that fails to compile or run
        print(f"  {name:44s} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return None
    _line(name, t, nbytes, copy_bw, check(a), note)
    return t


def bench_format(label, gate_t, down_t, gate_up_cfgs, down_cfgs, copy_bw, tabs):
    print(f"\n== {label}: gate/up {gate_t.name}, down {down_t.name}, 1 token, {K} of {N_EXP}",
          flush=True)  # fmt: skip
    gate, up, down = _experts(gate_t, down_t)
    perm = torch.randperm(N_EXP, generator=torch.Generator().manual_seed(0))
    sets = [perm[i * K : (i + 1) * K].reshape(1, K).to(DEV).to(torch.int32)
            for i in range(N_EXP // K)]  # fmt: skip
    ids = sets[0]
    x = torch.randn(1, DIM, device=DEV)
    wts = torch.rand(1, K, device=DEV)
    gu_mb, dn_mb = 2 * K * gate[0].nbytes, K * down[0].nbytes

    # references: float32 products of the dequantized experts with int8-rounded activations
    x8 = int8_rounded(x)[0]
    g_w, u_w, d_w = _dense(gate, ids), _dense(up, ids), _dense(down, ids)
    h_ref = torch.stack([ref.swiglu(g @ x8, u @ x8, CLAMP) for g, u in zip(g_w, u_w, strict=True)])
    h_ref = h_ref * wts[0, :, None]
    h8 = int8_rounded(h_ref)
    out_ref = sum(d @ h8[i] for i, d in enumerate(d_w))[None]

    generic = moe_decode_config(1, K, N_FF, DIM, int8=True)
    new = moe_decode_config(1, K, N_FF, DIM, int8=True, qtype=gate_t, down_qtype=down_t)
    engine = moe_decode_config(1, K, N_FF, DIM, int8=True, qtype=gate_t, down_qtype=down_t,
                               pdl=True, gluon=moe_decode_hopper.supported(DEV))  # fmt: skip
    unchained = {k: {n: v for n, v in c.items() if n != "PDL"} for k, c in engine.items()}
    print(f"  generic cfg {generic}\n  new default {new}\n  engine's {engine}", flush=True)
    print(f"gate/up launch ({gu_mb / 1e6:.1f} MB; err vs reference h, tolerance 1e-5)",
          flush=True)  # fmt: skip
    h_buf = torch.empty(K, N_FF, device=DEV)
    gu_times = {}
    for gu in _unique([generic["gate_up"], new["gate_up"], unchained["gate_up"]] + gate_up_cfgs):
        xo = operands(x, gate_t, gu)

        def run(gu=gu, xo=xo):
            h = torch.empty(K, N_FF, device=DEV)
            gate_up_launch(x, xo, ids, wts, gate, up, tabs, h, CLAMP, gu)
            return h

        calls = [lambda s=s, g=gu, xo=xo: gate_up_launch(x, xo, s, wts, gate, up, tabs, h_buf,
                                                         CLAMP, g)
                 for s in sets]  # fmt: skip
        gu_times[str(gu)] = _timed(str(gu), run, lambda h: rel_err(h, h_ref), calls, gu_mb,
                                   copy_bw), gu  # fmt: skip

    # the same launch with its weights in L2 (every call reads the same experts): how far the
    # kernel is from its own instruction-bound floor, not from the memory system's
    one = ids[:, :1].repeat(1, K)  # one expert in all six slots: 1/6 of the bytes
    for gu in _unique([new["gate_up"], unchained["gate_up"]]):
        xo = operands(x, gate_t, gu)
        for name, hot in (("same 6 experts every call", ids), ("one expert in all 6 slots", one)):
            t = time_graph([lambda h=hot, g=gu, xo=xo: gate_up_launch(
                x, xo, h, wts, gate, up, tabs, h_buf, CLAMP, g)] * len(sets))  # fmt: skip
            print(f"  {name:44s} {t * 1e6:8.2f} us  (weights in L2; {gu})", flush=True)

    print(f"down launch ({dn_mb / 1e6:.1f} MB; err vs reference, tolerance 1e-5)", flush=True)
    o_buf = torch.empty(1, DIM, device=DEV)
    dn_times = {}
    for dn in _unique([generic["down"], new["down"]] + down_cfgs):
        ho = operands(h_ref, down_t, dn, False)

        def run(dn=dn, ho=ho):
            out = torch.empty(1, DIM, device=DEV)
            down_launch(h_ref, ho, ids, down, tabs, out, dn)
            return out

        calls = [lambda s=s, d=dn, ho=ho: down_launch(h_ref, ho, s, down, tabs, o_buf, d)
                 for s in sets]  # fmt: skip
        dn_times[str(dn)] = _timed(str(dn), run, lambda o: rel_err(o, out_ref), calls, dn_mb,
                                   copy_bw), dn  # fmt: skip

    dn = new["down"]
    ho = operands(h_ref, down_t, dn, False)
    for name, hot in (("same 6 experts every call", ids), ("one expert in all 6 slots", one)):
        t = time_graph([lambda h=hot: down_launch(h_ref, ho, h, down, tabs, o_buf, dn)]
                       * len(sets))  # fmt: skip
        print(f"  {name:44s} {t * 1e6:8.2f} us  (weights in L2; default tiling)", flush=True)

    print("activation rounding launch (act.py; moe_decode runs it for x and for h)", flush=True)
    t_act = time_graph([lambda: operands(x, gate_t, new["gate_up"]) for _ in sets])
    print(f"  quantize_act 1 x {DIM}: {t_act * 1e6:.2f} us", flush=True)

    want = ref.moe(x, ids.long(), wts, gate, up, down, CLAMP)
    print(f"whole moe_decode ({(gu_mb + dn_mb) / 1e6:.1f} MB, 4 launches; err vs f32 "
          "reference, tolerance 3e-2)", flush=True)  # fmt: skip
    pdl = moe_decode_config(1, K, N_FF, DIM, int8=True, qtype=gate_t, down_qtype=down_t, pdl=True)
    variants = [
        ("generic", generic),
        ("new default", new),
        ("Triton kernels, PDL", pdl),
        ("the engine's (PDL; Gluon gate/up on sm_90)", engine),
    ]
    if engine["gate_up"].get("HQ"):  # the same without h rounded by the gate/up kernel
        no_hq = {k: v for k, v in engine["gate_up"].items() if k != "HQ"}
        variants.append(("the engine's, h rounded by its own launch", engine | {"gate_up": no_hq}))
    best = dict(gate_up=_fastest(gu_times), down=_fastest(dn_times))
    if None not in best.values() and best != new:
        variants.append((f"fastest pair {best}", best))
        if all("R" in c or "NB" in c for c in best.values()):  # dedicated kernels: chainable
            variants.append(("fastest pair, PDL", {k: v | {"PDL": 1} for k, v in best.items()}))
    for name, cfg in variants:

        def run(cfg=cfg):
            return moe_decode(x, ids, wts, gate, up, down, CLAMP, tabs, cfg)

        calls = [lambda s=s, c=cfg: moe_decode(x, s, wts, gate, up, down, CLAMP, tabs, c)
                 for s in sets]  # fmt: skip
        _timed(name, run, lambda o: rel_err(o, want), calls, gu_mb + dn_mb, copy_bw)
    _bench_shared(x, sets, wts, gate, up, down, tabs, gu_mb + dn_mb, copy_bw)


def _bench_shared(x, sets, wts, gate, up, down, tabs, routed_bytes, copy_bw):
    """The engine's call plus the shared expert's Q8_0 down projection [4096, 2048]: as its own
    GEMV after the routed call, and as extra programs of the routed down launch."""
    ws = [weight(GQ.Q8_0, (DIM, N_FF), 40 + i) for i in range(8)]  # 71 MB: past L2 in turn
    h = torch.randn(1, N_FF, device=DEV)
    nbytes = routed_bytes + ws[0].nbytes
    print(f"with the shared expert's down projection ({nbytes / 1e6:.1f} MB; err: the shared "
          "part vs its own gemv)", flush=True)  # fmt: skip
    want = gemv(h, ws[0], tabs)

    def apart(s, w):
        return moe_decode(x, s, wts, gate, up, down, CLAMP, tabs), gemv(h, w, tabs)

    def joined(s, w):
        return moe_decode_shared(x, s, wts, gate, up, down, CLAMP, tabs, h, w)

    pairs = [(s, ws[i % len(ws)]) for i, s in enumerate(sets)]
    for name, fn in (("routed call, then its own GEMV", apart), ("in the down launch", joined)):
        calls = [lambda s=s, w=w, fn=fn: fn(s, w) for s, w in pairs]
        _timed(name, lambda fn=fn: fn(sets[0], ws[0])[1], lambda o: rel_err(o, want), calls,
               nbytes, copy_bw)  # fmt: skip


def _unique(cfgs: list[dict]) -> list[dict]:
    out = []
    for c in cfgs:
        if c not in out:
            out.append(c)
    return out


def _fastest(times: dict) -> dict | None:
    ok = [(t, cfg) for t, cfg in times.values() if t is not None]
    return min(ok, key=lambda r: r[0])[1] if ok else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the generic and default tilings")
    ap.add_argument("--no-q4", action="store_true", help="skip the Q4_K experts")
    args = ap.parse_args()
    print(
        f"{torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        flush=True,
    )
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    tabs = tables(DEV)
    sweep = not args.quick
    iq2 = IQ2_GATE_UP + (IQ2_GLUON if moe_decode_hopper.supported(DEV) else [])
    bench_format("q2", GQ.IQ2_XXS, GQ.Q2_K, iq2 if sweep else [],
                 KQ_DOWN if sweep else [], copy_bw, tabs)  # fmt: skip
    if not args.no_q4:
        bench_format("q4", GQ.Q4_K, GQ.Q4_K, KQ_GATE_UP if sweep else [],
                     KQ_DOWN if sweep else [], copy_bw, tabs)  # fmt: skip


if __name__ == "__main__":
    main()
