"""Fused mHC pre (MODEL.md §2.4) for decode and prefill.

`hc_pre` (prefill): given the 24 mixing logits `v = fn . X_flat` (one GEMM before it), a program
per token computes the RMS of its 4 streams, the pre/post weights, the Sinkhorn of the 4x4
combine matrix and the collapsed sublayer input u = sum_h pre_h X_h.
`hc_pre_fused` (decode, T <= 8): the projection too, in two launches with many programs: a
split-K pass writes per-slice partial products and sums of squares, a second pass reduces them
in a fixed order (deterministic), redoes the tiny mixing math in every program and writes its
D-chunk of u. Torch references (`hc_pre_ref`, `hc_pre_fused_ref`) share the signatures.
Owns no weights and no scratch that outlives a call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as GQ

from ds4py.quant import ref
from ds4py.quant.formats import QTensor
from ds4py.quant.ref import hc_pre as hc_pre_ref  # noqa: F401  (the reference, same signature)

MAX_TOKENS = 8  # the decode path's batch bound (the weight tile is read once for all tokens)
SLOTS = 32  # scratch row per (token, slice): 24 products, the sum of squares at 24, zeros


@triton.jit
def _mix(vpre, vpost, vcomb, r, SCALE, BASE, hc_eps, ITERS: tl.constexpr):
    """pre [4], post [4], comb [4, 4] from the unnormalised logits and the inverse RMS r."""
    h = tl.arange(0, 4)
    idx = h[:, None] * 4 + h[None, :]
    pre = tl.sigmoid(vpre * r * tl.load(SCALE) + tl.load(BASE + h)) + hc_eps
    post = 2.0 * tl.sigmoid(vpost * r * tl.load(SCALE + 1) + tl.load(BASE + 4 + h))
    c = vcomb * r * tl.load(SCALE + 2) + tl.load(BASE + 8 + idx)
    c = tl.exp(c - tl.max(c, 1)[:, None])
    c = c / tl.sum(c, 1)[:, None] + hc_eps
    c = c / (tl.sum(c, 0)[None, :] + hc_eps)
    for _ in range(ITERS - 1):
        c = c / (tl.sum(c, 1)[:, None] + hc_eps)
        c = c / (tl.sum(c, 0)[None, :] + hc_eps)
    return pre, post, c


@triton.jit
def _collapse(x, u, pre, start, D, BLOCK: tl.constexpr):
    """u[start : start + BLOCK] = sum_h pre_h x[h], the streams summed in order."""
    h = tl.arange(0, 4)
    o = start + tl.arange(0, BLOCK)
    m = o < D
    s = tl.sum(tl.where(h == 0, pre, 0.0), 0) * tl.load(x + o, mask=m, other=0.0)
    s += tl.sum(tl.where(h == 1, pre, 0.0), 0) * tl.load(x + D + o, mask=m, other=0.0)
    s += tl.sum(tl.where(h == 2, pre, 0.0), 0) * tl.load(x + 2 * D + o, mask=m, other=0.0)
    s += tl.sum(tl.where(h == 3, pre, 0.0), 0) * tl.load(x + 3 * D + o, mask=m, other=0.0)
    tl.store(u + o, s, mask=m)


@triton.jit
def _hc_pre_kernel(
    X, V, SCALE, BASE, U, POST, COMB, D, norm_eps, hc_eps, ITERS: tl.constexpr, BLOCK: tl.constexpr
):
    t = tl.program_id(0)
    x = X + t.to(tl.int64) * 4 * D
    acc = tl.zeros((BLOCK,), tl.float32)
    for d0 in range(0, 4 * D, BLOCK):
        o = d0 + tl.arange(0, BLOCK)
        xv = tl.load(x + o, mask=o < 4 * D, other=0.0)
        acc += xv * xv
    r = 1.0 / tl.sqrt(tl.sum(acc, 0) / (4 * D) + norm_eps)
    h = tl.arange(0, 4)
    idx = h[:, None] * 4 + h[None, :]
    v = V + t * 24
    pre, post, c = _mix(
        tl.load(v + h), tl.load(v + 4 + h), tl.load(v + 8 + idx), r, SCALE, BASE, hc_eps, ITERS
    )
    tl.store(POST + t * 4 + h, post)
    tl.store(COMB + t * 16 + idx, c)
    for d0 in range(0, D, BLOCK):
        _collapse(x, U + t.to(tl.int64) * D, pre, d0, D, BLOCK)


def hc_pre(X, v, scale, base, norm_eps: float, hc_eps: float, iters: int):
    """Launcher with the signature of hc_pre_ref (4 streams, float32, contiguous)."""
    T, hc, D = X.shape
    if hc != 4 or tuple(v.shape) != (T, 24):
        raise ValueError(f"hc_pre: X [T, 4, D] and v [T, 24], got {tuple(X.shape)}, {v.shape}")
    _check_mix_params(X, scale, base, iters)
    if v.dtype != torch.float32:
        raise ValueError(f"hc_pre: v must be float32, got {v.dtype}")
    X, v = X.contiguous(), v.contiguous()
    u, post, comb = _outputs(X)
    _hc_pre_kernel[(T,)](
        X, v, scale.contiguous(), base.contiguous(), u, post, comb, D, norm_eps, hc_eps,
        ITERS=iters, BLOCK=1024, num_warps=4,
    )  # fmt: skip
    return u, post, comb


# ---- Decode: projection fused in -----------------------------------------------------------


@triton.jit
def _partials(
    X, W, S, K, k, T: tl.constexpr, BK: tl.constexpr, P: tl.constexpr, SLOTS: tl.constexpr
):
    """Slice k of X_flat: the 24 weight rows' halves once, then every token's 24 partial
    products and partial sum of squares -> S[t, k]."""
    rows = tl.arange(0, SLOTS)
    cols = k * BK + tl.arange(0, BK)
    cm = cols < K
    w = tl.load(
        W + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < 24) & cm[None, :], other=0.0
    ).to(tl.float32)
    for t in tl.static_range(T):
        x = tl.load(X + t * K + cols, mask=cm, other=0.0)
        dots = tl.sum(w * x[None, :], 1)
        part = tl.where(rows == 24, tl.sum(x * x, 0), dots)
        tl.store(S + (t * P + k) * SLOTS + rows, part)


@triton.jit
def _token_mix(
    S,
    t,
    SCALE,
    BASE,
    D,
    norm_eps,
    hc_eps,
    P: tl.constexpr,
    PB: tl.constexpr,
    SLOTS: tl.constexpr,
    ITERS: tl.constexpr,
):
    """Token t's pre/post/comb from its P partial rows, summed in one fixed order (the same
    reduction tree in every program, so every program gets the same bits)."""
    p = tl.arange(0, PB)
    pm = p < P
    h = tl.arange(0, 4)
    idx = h[:, None] * 4 + h[None, :]
    s = S + t * P * SLOTS + p * SLOTS
    # .cg: another SM wrote these; read them from L2
    vpre = tl.sum(
        tl.load(s[:, None] + h[None, :], mask=pm[:, None], other=0.0, cache_modifier=".cg"), 0
    )
    vpost = tl.sum(
        tl.load(s[:, None] + 4 + h[None, :], mask=pm[:, None], other=0.0, cache_modifier=".cg"), 0
    )
    pc = s[:, None, None] + 8 + idx[None, :, :]
    vcomb = tl.sum(tl.load(pc, mask=pm[:, None, None], other=0.0, cache_modifier=".cg"), 0)
    ssq = tl.sum(tl.load(s + 24, mask=pm, other=0.0, cache_modifier=".cg"), 0)
    r = 1.0 / tl.sqrt(ssq / (4 * D) + norm_eps)
    return _mix(vpre, vpost, vcomb, r, SCALE, BASE, hc_eps, ITERS)


@triton.jit
def _hc_partials_kernel(
    X, W, S, K, T: tl.constexpr, BK: tl.constexpr, P: tl.constexpr, SLOTS: tl.constexpr
):
    _partials(X, W, S, K, tl.program_id(0), T, BK, P, SLOTS)


@triton.jit
def _hc_finish_kernel(
    X, S, SCALE, BASE, U, POST, COMB, D, norm_eps, hc_eps,
    P: tl.constexpr, PB: tl.constexpr, SLOTS: tl.constexpr, ITERS: tl.constexpr,
    BD: tl.constexpr,
):  # fmt: skip
    c0 = tl.program_id(0)
    t = tl.program_id(1)
    pre, post, c = _token_mix(S, t, SCALE, BASE, D, norm_eps, hc_eps, P, PB, SLOTS, ITERS)
    if c0 == 0:
        h = tl.arange(0, 4)
        tl.store(POST + t * 4 + h, post)
        tl.store(COMB + t * 16 + h[:, None] * 4 + h[None, :], c)
    _collapse(X + t.to(tl.int64) * 4 * D, U + t.to(tl.int64) * D, pre, c0 * BD, D, BD)


@triton.jit
def _hc_ticket_kernel(
    X, W, S, TICKET, SCALE, BASE, U, POST, COMB, D, norm_eps, hc_eps,
    T: tl.constexpr, BK: tl.constexpr, P: tl.constexpr, PB: tl.constexpr, SLOTS: tl.constexpr,
    ITERS: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    # one launch: the program that draws the last ticket finishes every token alone
    _partials(X, W, S, 4 * D, tl.program_id(0), T, BK, P, SLOTS)
    tl.debug_barrier()  # every thread's partial stores precede the release below
    if tl.atomic_add(TICKET, 1, sem="acq_rel") == P - 1:
        tl.store(TICKET, 0)  # ready for the next call (graph replays)
        h = tl.arange(0, 4)
        for t in tl.static_range(T):
            pre, post, c = _token_mix(S, t, SCALE, BASE, D, norm_eps, hc_eps, P, PB, SLOTS, ITERS)
            tl.store(POST + t * 4 + h, post)
            tl.store(COMB + t * 16 + h[:, None] * 4 + h[None, :], c)
            for d0 in range(0, D, BD):
                _collapse(X + t * 4 * D, U + t * D, pre, d0, D, BD)


def hc_fused_config(D: int) -> dict:
    """Tiling: ~64 split-K slices of X_flat, u chunks of 256 (many programs for one token),
    one-warp finishing programs (H200 sweep, scripts/check_hc.py: 6.8 us a call against 8.2
    with 128 slices and four-warp finishing programs)."""
    bk = max(32, min(256, triton.next_power_of_2(triton.cdiv(4 * D, 64))))
    return {"BK": bk, "BD": 256, "warps1": 4, "warps2": 1}


def hc_pre_fused(
    X: torch.Tensor,
    fn: QTensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    norm_eps: float,
    hc_eps: float,
    iters: int,
    cfg: dict | None = None,
    ticket: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre of T <= 8 tokens with the projection `fn . X_flat` fused in (two launches,
    capturable, deterministic). X [T, 4, D] float32, fn F16 (24, 4*D); `cfg` overrides the
    tiling (benchmarks). With `ticket` (int32 [1], zero, kept by the caller and used by one
    stream at a time) it is one launch: the last split-K program to finish does the rest.
    Returns u [T, D], post [T, 4], comb [T, 4, 4] float32."""
    _check_fused(X, fn, scale, base, iters)
    if ticket is not None and (ticket.dtype != torch.int32 or ticket.device != X.device):
        raise ValueError(f"hc_pre_fused: ticket must be int32 on {X.device}, got {ticket.dtype}")
    T, _, D = X.shape
    K = 4 * D
    cfg = cfg or hc_fused_config(D)
    bk, bd = cfg["BK"], cfg["BD"]
    if bk != triton.next_power_of_2(bk) or bd != triton.next_power_of_2(bd):
        raise ValueError(f"hc_pre_fused: BK {bk} and BD {bd} must each be a power of two")
    n_slices = triton.cdiv(K, bk)
    X = X.contiguous()
    w = fn.data.contiguous().view(torch.float16)  # F16 rows: plain little-endian halves
    part = torch.empty(T, n_slices, SLOTS, device=X.device, dtype=torch.float32)
    u, post, comb = _outputs(X)
    pb = triton.next_power_of_2(n_slices)
    if ticket is not None:
        _hc_ticket_kernel[(n_slices,)](
            X, w, part, ticket, scale.contiguous(), base.contiguous(), u, post, comb, D,
            norm_eps, hc_eps, T=T, BK=bk, P=n_slices, PB=pb, SLOTS=SLOTS, ITERS=iters, BD=bd,
            num_warps=cfg["warps1"],
        )  # fmt: skip
        return u, post, comb
    _hc_partials_kernel[(n_slices,)](
        X, w, part, K, T=T, BK=bk, P=n_slices, SLOTS=SLOTS, num_warps=cfg["warps1"]
    )
    _hc_finish_kernel[(triton.cdiv(D, bd), T)](
        X, part, scale.contiguous(), base.contiguous(), u, post, comb, D, norm_eps, hc_eps,
        P=n_slices, PB=pb, SLOTS=SLOTS, ITERS=iters, BD=bd,
        num_warps=cfg["warps2"],
    )  # fmt: skip
    return u, post, comb


def hc_pre_fused_ref(
    X: torch.Tensor,
    fn: QTensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    norm_eps: float,
    hc_eps: float,
    iters: int,
    cfg: dict | None = None,
    ticket: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference with hc_pre_fused's signature: the projection, then `ref.hc_pre`."""
    _check_fused(X, fn, scale, base, iters)
    v = ref.linear(X.flatten(1), fn)
    return ref.hc_pre(X, v, scale, base, norm_eps, hc_eps, iters)


def _check_mix_params(X: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters) -> None:
    if X.dtype != torch.float32:
        raise ValueError(f"hc_pre: X must be float32, got {X.dtype}")
    if scale.numel() != 3 or base.numel() != 24:
        raise ValueError(f"hc_pre: scale [3] and base [24], got {scale.shape}, {base.shape}")
    if scale.dtype != torch.float32 or base.dtype != torch.float32:
        raise ValueError(f"hc_pre: scale and base must be float32, got {scale.dtype}, {base.dtype}")
    if scale.device != X.device or base.device != X.device:
        raise ValueError("hc_pre: X, scale and base must be on one device")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"hc_pre: iters must be an int >= 1, got {iters!r}")


def _check_fused(X, fn, scale, base, iters) -> None:
    if X.ndim != 3 or X.shape[1] != 4:
        raise ValueError(f"hc_pre_fused: X must be [T, 4, D], got {tuple(X.shape)}")
    T, _, D = X.shape
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"hc_pre_fused: 1..{MAX_TOKENS} tokens, got {T}")
    _check_mix_params(X, scale, base, iters)
    if not isinstance(fn, QTensor) or fn.qtype != GQ.F16:
        raise ValueError(f"hc_pre_fused: fn must be an F16 QTensor, got {_describe(fn)}")
    if fn.shape != (24, 4 * D):
        raise ValueError(f"hc_pre_fused: fn must have shape (24, {4 * D}), got {fn.shape}")
    if fn.device != X.device:
        raise ValueError(f"hc_pre_fused: fn on {fn.device}, X on {X.device}")


def _describe(fn) -> str:
    return fn.qtype.name if isinstance(fn, QTensor) else type(fn).__name__


def _outputs(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, _, D = X.shape
    u = torch.empty(T, D, device=X.device, dtype=torch.float32)
    post = torch.empty(T, 4, device=X.device, dtype=torch.float32)
    comb = torch.empty(T, 4, 4, device=X.device, dtype=torch.float32)
    return u, post, comb
