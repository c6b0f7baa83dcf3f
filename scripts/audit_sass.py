#!/usr/bin/env python
"""Offline sm_90 compile of the decode kernels: registers, SASS opcodes, layout conversions.

Owns: compiling the engine's decode kernels (the tilings the engine picks on Hopper, with
programmatic dependent launch) and its Gluon prefill expert kernels for sm_90 without a GPU,
and printing per kernel its registers (and stack, where it spills), its static SASS instruction
count, the most frequent opcodes and the number of layout conversions in its Triton IR
(`ttg.convert_layout`; SEL / SHFL / shared-memory round trips in the SASS are what the costly
ones become); iq2g is the Gluon IQ2_XXS decode kernel of sm_90. The method behind
docs/PERFORMANCE.md's "loads in group pairs" section; static counts, not timings.
Does not own: the kernels (ds4py/quant/triton), timings (bench_*.py on the device).
Usage: python scripts/audit_sass.py [iq2 iq2g q2down q4down q4gu q8rows p2gu p4down ...]
[--dump DIR] [--bm 64|128 --pf N --cap N]
(needs only torch, triton and gguf; --dump writes each kernel's TTGIR and SASS to DIR). The
counts depend on the Triton version: the device's is 3.6 (docs/PERFORMANCE.md); conversions
that only reorder a thread's registers count in the IR and cost nothing.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

import triton
from gguf import GGMLQuantizationType as GQ
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ds4py.quant.triton import gemv, moe, moe_decode_hopper, moe_hopper  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
N_FF, DIM, KTOP = 2048, 4096, 6
# the pointer and size arguments the kernels' launches pass 16-byte aligned / multiples of 16
ALIGNED = {"x", "xq", "xs", "xb", "xd", "hq", "hs", "ids", "wts", "gate", "up", "down", "tabs",
           "h", "w", "out", "F", "D", "RB", "N", "K", "RPG", "XR", "up_off", "xp", "hp", "order",
           "tiles", "y"}  # fmt: skip


def _moe_cfg(gate_t: GQ, down_t: GQ) -> dict:
    return moe.moe_decode_config(1, KTOP, N_FF, DIM, qtype=gate_t, down_qtype=down_t, pdl=True)


def _kernels(bm: int, pf: int | None, cap: int | None) -> dict:
    """name -> (jit function, signature, constexprs, options) at the engine's q2/q4 shapes."""
    iq2 = _moe_cfg(GQ.IQ2_XXS, GQ.Q2_K)
    iq2g = moe.moe_decode_config(1, KTOP, N_FF, DIM, qtype=GQ.IQ2_XXS, down_qtype=GQ.Q2_K,
                                 pdl=True, gluon=True)["gate_up"]  # fmt: skip
    q4 = _moe_cfg(GQ.Q4_K, GQ.Q4_K)
    gu_sig = dict(xq="*i32", xs="*fp32", ids="*i32", wts="*fp32", gate="*u8", up="*u8",
                  tabs="*u8", h="*fp32", F="i32", D="i32", RB="i32", clamp="fp32")  # fmt: skip
    down_sig = dict(hq="*i32", hs="*fp32", ids="*i32", down="*u8", out="*fp32", D="i32",
                    RB="i32")  # fmt: skip
    kq_sig = dict(xq="*i32", xs="*fp32", ids="*i32", wts="*fp32", gate="*u8", up_off="i64",
                  h="*fp32", F="i32", RB="i32", clamp="fp32")  # fmt: skip
    rows_sig = dict(x="*fp32", xq="*i32", xb="*i32", xd="*fp32", w="*u8", out="*fp32", N="i32",
                    K="i32", RB="i32", RPG="i32", XR="i32", T="i32")  # fmt: skip

    def own(cfg: dict) -> tuple[dict, dict]:
        opts = {k: v for k, v in cfg.items() if k in ("num_warps", "maxnreg")}
        return {k: v for k, v in cfg.items() if k not in opts}, opts

    gu, gu_opt = own(iq2["gate_up"])
    gg, gg_opt = own(iq2g)
    d2, d2_opt = own(iq2["down"])
    d4, d4_opt = own(q4["down"])
    g4, g4_opt = own(q4["gate_up"])
    rows = gemv.decode_config(GQ.Q8_0, DIM, 8192, DIM, pdl=True)  # attn_output_b
    rows_c, rows_opt = own(rows)
    return {
        "iq2": (moe._moe_gate_up_iq2_kernel, gu_sig,
                dict(KTOP=KTOP, G=DIM // 32, W64=True, EMULATE=False, **gu), gu_opt),
        "iq2g": (moe_decode_hopper._gate_up_kernel, _gluon_sig(gu_sig),
                 dict(KTOP=KTOP, G=DIM // 32, NW=gg.pop("num_warps", 8), **gg), gg_opt),
        "q2down": (moe._moe_down_kq_kernel, down_sig,
                   dict(F=N_FF, KTOP=KTOP, U=N_FF // 128, FMT=int(GQ.Q2_K), EMULATE=False,
                        **{"KC": 1, **d2}), d2_opt),
        "q4down": (moe._moe_down_kq_kernel, down_sig,
                   dict(F=N_FF, KTOP=KTOP, U=N_FF // 128, FMT=int(GQ.Q4_K), EMULATE=False,
                        **{"KC": 1, **d4}), d4_opt),
        "q4gu": (moe._moe_gate_up_kq_kernel, kq_sig,
                 dict(D=DIM, KTOP=KTOP, U=DIM // 128, FMT=int(GQ.Q4_K), EMULATE=False, **g4),
                 g4_opt),
        "q8rows": (gemv._rows_kernel, rows_sig,
                   dict(FMT=int(GQ.Q8_0), EMULATE=False, **{"PIPE": 0, **rows_c}), rows_opt),
        **_prefill_kernels(bm, pf, cap),
    }  # fmt: skip


def _prefill_kernels(bm: int, pf: int | None, cap: int | None) -> dict:
    """The Gluon prefill expert kernels (moe_hopper.grouped): p2gu / p2down (IQ2_XXS gate/up,
    Q2_K down), p4gu / p4down (Q4_K); w8 after the name: 8-warp programs. L2 prefetch
    distance and register cap (0: none) as the engine launches them unless given."""
    gu_sig = dict(xp="*fp16", order="*i32", wts="*fp32", tiles="*i32", gate="*u8", up="*u8",
                  tabs="*i16", h="*fp16", RB="i32", clamp="fp32")  # fmt: skip
    down_sig = dict(hp="*fp16", order="*i32", tiles="*i32", down="*u8", tabs="*i16", y="*fp32",
                    RB="i32")  # fmt: skip
    out = {}
    for nw in (4, 8):
        for tag, g, d in (("p2", GQ.IQ2_XXS, GQ.Q2_K), ("p4", GQ.Q4_K, GQ.Q4_K)):
            suffix = "" if nw == 4 else "w8"
            n_reg = (168 if bm == 64 else 0) if cap is None else cap
            gu_opt = {"num_warps": nw, **({"maxnreg": n_reg} if n_reg else {})}
            d_opt = dict(gu_opt)
            dist = (1 if bm == 64 else 0) if pf is None else pf
            out[f"{tag}gu{suffix}"] = (
                moe_hopper._gate_up_kernel, gu_sig,
                dict(F=N_FF, D=DIM, KTOP=KTOP, FMT=int(g), DFMT=int(d), BM=bm, NW=nw, A16=True,
                     PF=dist),
                gu_opt)  # fmt: skip
            out[f"{tag}down{suffix}"] = (
                moe_hopper._down_kernel, down_sig,
                dict(F=N_FF, D=DIM, FMT=int(d), BM=bm, NW=nw, A16=True, PF=dist),
                d_opt)  # fmt: skip
    return out


def _gluon_sig(gu_sig: dict) -> dict:
    """The Gluon kernel's arguments: the Triton kernel's, with h's int8 rounding after h."""
    items = [(k, "*i16" if k == "tabs" else v) for k, v in gu_sig.items()]
    at = [k for k, _ in items].index("h") + 1
    return dict(items[:at] + [("hq", "*i8"), ("hs", "*fp32")] + items[at:])


def audit(name: str, fn, sig: dict, consts: dict, opts: dict, dump: Path | None) -> None:
    sig = dict(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig) if k in ALIGNED}
    sig.update({k: "constexpr" for k in consts})
    src = (GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource)(
        fn, sig, consts, attrs=attrs
    )
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=opts)  # fmt: skip
    cubin = Path(dump or "/tmp") / f"{name}.cubin"
    cubin.write_bytes(k.asm["cubin"])
    res = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    if dump:
        (dump / f"{name}.ttgir").write_text(k.asm["ttgir"])
        (dump / f"{name}.sass").write_text(sass)
    else:
        cubin.unlink()
    ops = collections.Counter(
        m.group(2)
        for line in sass.splitlines()
        if (m := re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", line))
    )
    regs = re.search(r"REG:(\d+)", res).group(1)
    stack = re.search(r"STACK:(\d+)", res)
    if stack and int(stack.group(1)):
        regs += f" (+{stack.group(1)} B stack)"
    conv = k.asm["ttgir"].count("ttg.convert_layout")
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(12))
    tile = f"{consts['R']} rows" if "R" in consts else f"{consts.get('NB', '')} blocks"
    print(f"{name:8s} {tile:>9s}  {regs:>3} registers  "
          f"{sum(ops.values()):5d} SASS  {conv:2d} layout conversions\n         {top}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", help="kernels (default: all)")
    ap.add_argument("--dump", type=Path, help="write each kernel's TTGIR and SASS here")
    ap.add_argument("--bm", type=int, default=64, help="prefill kernels: token tile (64, 128)")
    ap.add_argument("--pf", type=int, help="prefill kernels: L2 prefetch distance in blocks")
    ap.add_argument("--cap", type=int, help="prefill kernels: register cap (0: none)")
    args = ap.parse_args()
    kernels = _kernels(args.bm, args.pf, args.cap)
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
    print(f"triton {triton.__version__}, sm_90, engine tilings (PDL on)")
    for name in args.names or kernels:
        audit(name, *kernels[name], args.dump)


if __name__ == "__main__":
    main()
