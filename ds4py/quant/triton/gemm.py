"""Prefill GEMM: y[M, N] = x[M, (G,) K] @ W(N, K).T with W dequantized tile by tile to bf16.

Owns: the compute-bound many-token matmul on GGUF-encoded weights: each [BN, BK] weight tile
is decoded in registers, cast to bf16 and fed to the tensor cores with x (bf16) and float32
accumulation; its launcher and a torch reference of the same signature. Grouped input as in
gemv.py. Does not own: decode (gemv.py) or expert routing (moe.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4py.quant import ref
from ds4py.quant.formats import QTensor
from ds4py.quant.triton.gemv import _check
from ds4py.quant.triton.tiles import dequant_tile, interpreting, prepared


@triton.jit
def bf16_dot(a, b, acc, EMULATE: tl.constexpr):
    # Triton's interpreter multiplies bf16 bit patterns as integers; same math in f32 there
    if EMULATE:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _gemm_kernel(
    x, w, tabs, out, M, N, K, RB, RPG, stride_xm, stride_xg,
    FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    # grouped launch order: GROUP_M row tiles share each weight tile while it is in L2
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    row_off = tl.minimum(rn, N - 1).to(tl.int64) * RB
    xrow = x + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_xm
    xrow += ((pid_n * BN) // RPG) * stride_xg
    kk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(xrow + k0 + kk[None, :])  # bf16 [BM, BK]
        wt = dequant_tile(w, tabs, row_off, K, k0, FMT, BK).to(tl.bfloat16)
        acc = bf16_dot(a, tl.trans(wt), acc, EMULATE)
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=omask)


def gemm_config(m: int, k: int, rows_per_group: int) -> dict:
    """Tiles from the H100 sweep (docs/PERFORMANCE.md): 256-token tiles amortize each decoded
    weight tile over more tokens, unless that leaves fewer than ~1.5 programs per SM."""
    bk = 64 if k % 64 == 0 else 32
    if rows_per_group % 128 == 0 and triton.cdiv(m, 256) * (rows_per_group // 128) >= 192:
        return dict(BM=256, BN=128, BK=bk, GROUP_M=8, num_warps=8, num_stages=3)
    bn = 64 if rows_per_group % 64 == 0 else 32
    return dict(BM=128, BN=bn, BK=bk, GROUP_M=8, num_warps=4, num_stages=4)


def gemm(x: torch.Tensor, w: QTensor, tabs: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """x [M, K] or [M, G, K] float32, w (N, K) -> [M, N] float32 (bf16 products, f32 sums).

    `cfg` (BM, BN, BK, GROUP_M, num_warps, num_stages) overrides the default tiling."""
    groups = _check(x, w)
    w = prepared(w)
    n, k = w.shape
    rpg = n // groups
    cfg = cfg or gemm_config(x.shape[0], k, rpg)
    if k % cfg["BK"] or rpg % cfg["BN"]:
        raise ValueError(f"gemm: weight {w.shape} with {groups} groups has no tiling")
    m = x.shape[0]
    xb = x.to(torch.bfloat16)
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    launch = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    _gemm_kernel[launch](
        xb, w.data, tabs, out, m, n, k, w.data.shape[-1], rpg, groups * k, k,
        FMT=int(w.qtype), EMULATE=interpreting(), **cfg,
    )  # fmt: skip
    return out


def gemm_ref(
    x: torch.Tensor, w: QTensor, tabs: torch.Tensor | None = None, cfg: dict | None = None
) -> torch.Tensor:
    """Torch reference with gemm's signature (float32 throughout)."""
    return ref.linear(x, w)
