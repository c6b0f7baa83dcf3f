"""Decode GEMV: y[T, N] = x[T, (G,) K] @ W(N, K).T for 1..8 tokens, dequantizing on the fly.

Owns: the memory-bound small-batch matmul on split-layout weights (rowdot.py does the inner
step per format), its tiling heuristic, launcher and a torch reference of the same signature.
Grouped input (x [T, G, K]) feeds row block g of W with x[:, g] (MODEL.md §2.8).
Numerics: F16/BF16/F32/Q8_0 in float32 FMA; Q2_K/Q4_K/IQ2_XXS with int8 activations (act.py).
Does not own: prefill (gemm.py) or backend choice (backend.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4py.quant import ref
from ds4py.quant.formats import QTensor
from ds4py.quant.triton.act import quantize_act
from ds4py.quant.triton.rowdot import acc_groups, accumulate
from ds4py.quant.triton.tiles import INT8_PATH, interpreting, kernel_ok, prepared

MAX_TOKENS = 8


@triton.jit
def _tok(acc, t: tl.constexpr, w, tabs, row_off, K, k0, x, xq, xs, xsum, XR,
         FMT: tl.constexpr, BK: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    return accumulate(acc, w, tabs, row_off, K, k0, x + t * XR, xq + t * (XR // 4),
                      xs + t * (XR // 32), xsum + t * (XR // 16), FMT, BK, EMULATE)  # fmt: skip


@triton.jit
def _store(out, acc, t: tl.constexpr, rows, N):
    tl.store(out + t * N + rows, tl.sum(acc, axis=1), mask=rows < N)


@triton.jit
def _gemv_kernel(
    x, xq, xs, xsum, w, tabs, out, N, K, RB, RPG, XR,
    T: tl.constexpr, FMT: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, AG: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    row_off = tl.minimum(rows, N - 1).to(tl.int64) * RB  # clamped rows are computed, not stored
    grp = (pid * BN) // RPG  # input group of this row block
    x += grp * K
    xq += grp * (K // 4)
    xs += grp * (K // 32)
    xsum += grp * (K // 16)
    # one accumulator per token (a token axis in the tiles costs layout shuffles); tokens
    # after the first re-decode the weights from L1, so T > 1 is ALU-heavier, not more bytes
    a0 = tl.zeros([BN, AG], dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    for k0 in range(0, K, BK):
        a0 = _tok(a0, 0, w, tabs, row_off, K, k0, x, xq, xs, xsum, XR, FMT, BK, EMULATE)
        if T > 1:
            a1 = _tok(a1, 1, w, tabs, row_off, K, k0, x, xq, xs, xsum, XR, FMT, BK, EMULATE)
        if T > 2:
            a2 = _tok(a2, 2, w, tabs, row_off, K, k0, x, xq, xs, xsum, XR, FMT, BK, EMULATE)
        if T > 3:
            a3 = _tok(a3, 3, w, tabs, row_off, K, k0, x, xq, xs, xsum, XR, FMT, BK, EMULATE)
        if T > 4:
            a4 = _tok(a4, 4, w, tabs, row_off, K, k0, x, xq, xs, xsum, XR, FMT, BK, EMULATE)
        if T > 5:
            a5 = _tok(a5, 5, w, tabs, row_off, K, k0, x, xq, xs, xsum, XR, FMT, BK, EMULATE)
        if T > 6:
            a6 = _tok(a6, 6, w, tabs, row_off, K, k0, x, xq, xs, xsum, XR, FMT, BK, EMULATE)
        if T > 7:
            a7 = _tok(a7, 7, w, tabs, row_off, K, k0, x, xq, xs, xsum, XR, FMT, BK, EMULATE)
    _store(out, a0, 0, rows, N)
    if T > 1:
        _store(out, a1, 1, rows, N)
    if T > 2:
        _store(out, a2, 2, rows, N)
    if T > 3:
        _store(out, a3, 3, rows, N)
    if T > 4:
        _store(out, a4, 4, rows, N)
    if T > 5:
        _store(out, a5, 5, rows, N)
    if T > 6:
        _store(out, a6, 6, rows, N)
    if T > 7:
        _store(out, a7, 7, rows, N)


def _pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def gemv_config(n: int, k: int, rows_per_group: int, n_tok: int = 1, tile: int | None = None,
                num_warps: int | None = None, int8: bool = False) -> dict:  # fmt: skip
    """BN, BK: a whole-K tile where it fits, few rows per program so the grid fills the GPU
    (~4 programs per SM keep enough loads in flight); the interpreter wants few, big programs.
    Defaults from the H100 sweep in docs/PERFORMANCE.md; more tokens, smaller tiles (spills)."""
    if tile is None and num_warps is None and n_tok == 1 and not int8 and not interpreting():
        return _one_token_config(n, k, rows_per_group)
    if tile is None:
        tile = (8192 if int8 else 4096) // (2 if n_tok > 4 else 1)
    if num_warps is None:
        num_warps = 4 if n_tok > 4 else 2
    min_programs, max_bn = (1, 64) if interpreting() else (512, 16)
    tile = tile * 8 if interpreting() else tile
    bk = _pow2_divisor(k, min(4096, tile))
    bn = max(1, min(max_bn, tile // bk))
    while bn > 1 and (n // bn < min_programs or rows_per_group % bn):
        bn //= 2
    return dict(BN=bn, BK=bk, num_warps=num_warps)


def _one_token_config(n: int, k: int, rows_per_group: int) -> dict:
    """One-token float/Q8_0 tilings from the H200 sweep (`bench_kernels.py --sweep`,
    docs/PERFORMANCE.md): one row and a 1024-wide K step per single-warp program keeps the
    most loads in flight; K <= 1024 rows are too short for that, tiny outputs too few."""
    if n < 512:
        return dict(BN=1, BK=_pow2_divisor(k, 4096), num_warps=8)
    if k <= 1024:
        return dict(BN=_pow2_divisor(rows_per_group, 4), BK=_pow2_divisor(k, 512), num_warps=4)
    return dict(BN=1, BK=_pow2_divisor(k, 1024), num_warps=1)


def _check(x: torch.Tensor, w: QTensor) -> int:
    """Validate and return the number of input groups."""
    if not kernel_ok(w) or len(w.shape) != 2:
        raise ValueError(f"no kernel for weight {w.qtype.name} {w.shape} (row alignment/type)")
    if x.dtype != torch.float32 or not x.is_contiguous() or x.ndim not in (2, 3):
        raise ValueError(f"x must be contiguous float32 [T, (G,) K], got {x.dtype} {x.shape}")
    groups = x.shape[1] if x.ndim == 3 else 1
    if x.shape[-1] != w.shape[1] or w.shape[0] % groups:
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {w.shape}")
    if x.device != w.device:
        raise ValueError("weight must be on x's device")
    return groups


def act_operands(x2: torch.Tensor, int8: bool) -> tuple[torch.Tensor, ...]:
    """(xq as int32 words, scales, 16-sums) for the int8 path; x itself as dummies otherwise."""
    if not int8:
        return x2, x2, x2
    xq, xs, xsum = quantize_act(x2)
    return xq.view(torch.int32), xs, xsum


def gemv(x: torch.Tensor, w: QTensor, tabs: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """x [T, K] or [T, G, K] float32 (T <= 8), w (N, K) -> [T, N] float32.

    `w` should come from `prepared` (split layout; converted here otherwise, slowly).
    `cfg` (BN, BK, num_warps) overrides the tiling heuristic (benchmarks)."""
    groups = _check(x, w)
    n_tok = x.shape[0]
    if not 1 <= n_tok <= MAX_TOKENS:
        raise ValueError(f"gemv: 1..{MAX_TOKENS} tokens, got {n_tok}")
    w = prepared(w)
    n, k = w.shape
    rpg = n // groups
    int8 = w.qtype in INT8_PATH
    cfg = cfg or gemv_config(n, k, rpg, n_tok, int8=int8)
    bn, bk = cfg["BN"], cfg["BK"]
    if k % bk or rpg % bn or (int8 and bk % 256):
        raise ValueError(f"gemv: tile {bn}x{bk} does not fit weight {w.shape}")
    xq, xs, xsum = act_operands(x.view(n_tok * groups, k), int8)
    out = torch.empty(n_tok, n, dtype=torch.float32, device=x.device)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, xq, xs, xsum, w.data, tabs, out, n, k, w.data.shape[-1], rpg, groups * k,
        T=n_tok, FMT=int(w.qtype), AG=acc_groups(w.qtype, bk), EMULATE=interpreting(), **cfg,
    )  # fmt: skip
    return out


def gemv_ref(
    x: torch.Tensor, w: QTensor, tabs: torch.Tensor | None = None, cfg: dict | None = None
) -> torch.Tensor:
    """Torch reference with gemv's signature (float32 activations throughout)."""
    return ref.linear(x, w)
