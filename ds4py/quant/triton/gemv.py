"""Decode GEMV: y[T, N] = x[T, (G,) K] @ W(N, K).T for 1..8 tokens, dequantizing on the fly.

Owns: the memory-bound small-batch matmul on GGUF-encoded weights (F16, BF16, F32, Q8_0, Q2_K,
Q4_K, IQ2_XXS) with float32 FMA accumulation, its launcher and a torch reference of the same
signature. Grouped input (x [T, G, K]) feeds row block g of W with x[:, g] (MODEL.md §2.8).
Does not own: prefill (gemm.py) or backend choice (backend.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4py.quant import ref
from ds4py.quant.formats import QTensor
from ds4py.quant.triton.tiles import SUPPORTED, dequant_tile, group_size, interpreting

MAX_TOKENS = 8
# elements of W one program decodes per K step; enough loads in flight, bounded registers
TILE_ELEMS = 4096


@triton.jit
def _gemv_kernel(
    x, w, grid, out, N, K, RB, RPG, stride_xt, stride_xg,
    FMT: tl.constexpr, T: tl.constexpr, BT: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    row_off = tl.minimum(rows, N - 1).to(tl.int64) * RB  # clamped rows are computed, not stored
    xb = x + ((pid * BN) // RPG) * stride_xg
    kk = tl.arange(0, BK // GS)[:, None] * GS + tl.arange(0, GS)[None, :]  # [G, GS]
    tt = tl.arange(0, BT)
    acc = tl.zeros([BT, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        wt = dequant_tile(w, grid, row_off, k0, FMT, BK)  # [BN, G, GS]
        for t in tl.static_range(T):
            xt = tl.load(xb + t * stride_xt + k0 + kk)
            part = tl.sum(tl.sum(wt * xt[None, :, :], axis=2), axis=1)  # [BN]
            acc = tl.where(tt[:, None] == t, acc + part[None, :], acc)
    omask = (tt[:, None] < T) & (rows[None, :] < N)
    tl.store(out + tt[:, None] * N + rows[None, :], acc, mask=omask)


def _pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def min_programs() -> int:
    # ~4 programs per SM keep enough loads in flight; the interpreter wants the fewest programs
    return 1 if interpreting() else 512


def gemv_config(
    n: int, k: int, rows_per_group: int, tile_elems: int = TILE_ELEMS, num_warps: int = 4
) -> dict:
    """BN, BK: a whole-K tile where it fits, few rows per program so the grid fills the GPU."""
    bk = _pow2_divisor(k, min(4096, tile_elems))
    bn = max(1, min(16, tile_elems // bk))
    while bn > 1 and (n // bn < min_programs() or rows_per_group % bn):
        bn //= 2
    return dict(BN=bn, BK=bk, num_warps=num_warps)


def _check(x: torch.Tensor, w: QTensor) -> int:
    """Validate and return the number of input groups."""
    if w.qtype not in SUPPORTED or len(w.shape) != 2:
        raise ValueError(f"gemv: unsupported weight {w.qtype.name} {w.shape}")
    if x.dtype != torch.float32 or not x.is_contiguous() or x.ndim not in (2, 3):
        raise ValueError(f"gemv: x must be contiguous float32 [T, (G,) K], got {x.dtype} {x.shape}")
    groups = x.shape[1] if x.ndim == 3 else 1
    if x.shape[-1] != w.shape[1] or w.shape[0] % groups:
        raise ValueError(f"gemv: x {tuple(x.shape)} does not fit weight {w.shape}")
    if not w.data.is_contiguous() or x.device != w.device:
        raise ValueError("gemv: weight must be contiguous and on x's device")
    return groups


def gemv(x: torch.Tensor, w: QTensor, grid: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """x [T, K] or [T, G, K] float32 (T <= 8), w (N, K) -> [T, N] float32.

    `cfg` (BN, BK, num_warps) overrides the tiling heuristic (benchmarks)."""
    groups = _check(x, w)
    n_tok = x.shape[0]
    if not 1 <= n_tok <= MAX_TOKENS:
        raise ValueError(f"gemv: 1..{MAX_TOKENS} tokens, got {n_tok}")
    n, k = w.shape
    rpg = n // groups
    cfg = cfg or gemv_config(n, k, rpg)
    bn, bk = cfg["BN"], cfg["BK"]
    if k % bk or rpg % bn:
        raise ValueError(f"gemv: tile {bn}x{bk} does not divide weight {w.shape}")
    out = torch.empty(n_tok, n, dtype=torch.float32, device=x.device)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, w.data, grid, out, n, k, w.data.shape[-1], rpg, groups * k, k,
        FMT=int(w.qtype), T=n_tok, BT=triton.next_power_of_2(n_tok),
        GS=group_size(w.qtype, bk), **cfg,
    )  # fmt: skip
    return out


def gemv_ref(
    x: torch.Tensor, w: QTensor, grid: torch.Tensor | None = None, cfg: dict | None = None
) -> torch.Tensor:
    """Torch reference with gemv's signature."""
    return ref.linear(x, w)
