"""Decode lightning indexer: score the compressed indexer rows and select the top-k, no sort.

Owns `indexer_topk` (Triton) and `indexer_topk_ref` (torch: decode.py indexer_step's scoring
and stable sort, then ids ascending), their scratch buffers and launch plan. Scoring decodes
FP4 rows (or splits float32 rows) into bfloat16 parts that are exact and multiplies them with
exact bfloat16 parts of the queries on tensor cores, so scores are float32-accurate. Selection
maps scores to order-preserving int32 keys, walks 11/11/10-bit digit histograms to the k-th
key, then compacts ids in id order. Static grids, no host sync, integer atomics only.
Does not own: the row stores (kv/state.py) or the indexer projections and RoPE (decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ds4py.kv.state import FloatRows, FP4Rows
from ds4py.quant.triton.tiles import interpreting

Tensor = torch.Tensor
HIST_WORDS = 2048 + 2048 + 1024  # the three digit histograms, one after the other


@dataclass(frozen=True)
class TopkConfig:
    block: int = 128  # rows per scoring program (the tensor-core M)
    score_warps: int = 8
    chunk: int = 2048  # keys per program in the histogram / count / emit passes
    pass_warps: int = 4
    small_cap: int = 4096  # up to this capacity one program selects, keys in registers
    select_warps: int = 8


DEFAULT = TopkConfig()


@dataclass
class IndexerScratch:
    """Work buffers sized by capacity. `hist` is zero between calls (the last pass clears it),
    so one scratch may serve every layer of a decode step, call after call."""

    keys: Tensor  # int32 [cap]: order-preserving key of each visible row's score
    hist: Tensor  # int32 [HIST_WORDS]
    work: Tensor  # int32 [2 * programs + 2]: per-program counts (> T, == T), then T and need

    @classmethod
    def new(cls, cap: int, device, cfg: TopkConfig = DEFAULT) -> IndexerScratch:
        programs = triton.cdiv(max(cap, 1), cfg.chunk)
        return cls(
            torch.empty(max(cap, 1), dtype=torch.int32, device=device),
            torch.zeros(HIST_WORDS, dtype=torch.int32, device=device),
            torch.empty(2 * programs + 2, dtype=torch.int32, device=device),
        )

    def fits(self, cap: int, device, cfg: TopkConfig) -> bool:
        programs = triton.cdiv(max(cap, 1), cfg.chunk)
        return (
            self.keys.numel() >= cap
            and self.hist.numel() == HIST_WORDS
            and self.work.numel() >= 2 * programs + 2
            and all(t.device == torch.device(device) for t in (self.keys, self.hist, self.work))
        )


# ---- Scoring ------------------------------------------------------------------------------


@triton.jit
def _visible(POS, ratio, cap):
    return tl.minimum((tl.load(POS) + 1) // ratio, cap).to(tl.int32)


@triton.jit
def _split3(x):
    """x (float32) = hi + mid + lo exactly, each bfloat16 (8 significant bits apiece)."""
    hi = x.to(tl.bfloat16)
    r = x - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    return hi, mid, (r - mid.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _e2m1(c):
    """Signed E2M1 value of 4-bit codes (int32), as float32."""
    m = c & 7
    twice = tl.where(m < 2, m, (2 + (m & 1)) << tl.maximum((m >> 1) - 1, 0))  # 0 .. 12
    v = twice.to(tl.float32) * 0.5
    return tl.where((c & 8) != 0, -v, v)


@triton.jit
def _fp4_halves(CODES, EXPS, rows, live, BN: tl.constexpr, DI: tl.constexpr):
    """Rows as bfloat16 [BN, DI/2] twice: even elements (low nibbles), odd ones (high); exact,
    since grid * 2**exp has at most 2 significant bits."""
    g = tl.arange(0, DI // 32)
    t = tl.arange(0, 16)
    r = rows.to(tl.int64)
    at = CODES + r[:, None, None] * (DI // 2) + (g[:, None] * 16 + t[None, :])[None]
    c = tl.load(at, mask=live[:, None, None], other=0).to(tl.int32)  # [BN, G, 16] bytes
    e = tl.load(EXPS + r[:, None] * (DI // 32) + g[None, :], mask=live[:, None], other=0)
    scale = ((e.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)[:, :, None]  # 2**e
    even = tl.reshape(_e2m1(c & 15) * scale, (BN, DI // 2))
    odd = tl.reshape(_e2m1(c >> 4) * scale, (BN, DI // 2))
    return even.to(tl.bfloat16), odd.to(tl.bfloat16)


@triton.jit
def _mm(a, b, acc, INTERP: tl.constexpr):
    if INTERP:  # the interpreter multiplies bfloat16 as raw integers; the parts are exact in f32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _dot_q(acc, r, qT, INTERP: tl.constexpr):
    """acc += r @ qT, r exact bfloat16 [BN, K], qT float32 [K, HI] split into exact parts."""
    qh, qm, ql = _split3(qT)
    acc = _mm(r, qh, acc, INTERP)
    if tl.max(tl.abs(qm.to(tl.float32))) != 0:  # FP4-simulated queries are exact in bfloat16
        acc = _mm(r, qm, acc, INTERP)
        acc = _mm(r, ql, acc, INTERP)
    return acc


@triton.jit
def _head_dots(Q, R0, R1, rows, live, HI: tl.constexpr, DI: tl.constexpr, BN: tl.constexpr,
               FP4: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
    """[BN, HI] float32: qi_h . row for each row and head."""
    h = tl.arange(0, HI)
    acc = tl.zeros((BN, HI), dtype=tl.float32)
    if FP4:
        j = tl.arange(0, DI // 2)
        even, odd = _fp4_halves(R0, R1, rows, live, BN, DI)
        acc = _dot_q(acc, even, tl.load(Q + h[None, :] * DI + 2 * j[:, None]), INTERP)
        acc = _dot_q(acc, odd, tl.load(Q + h[None, :] * DI + 2 * j[:, None] + 1), INTERP)
    else:
        d = tl.arange(0, DI)
        x = tl.load(
            R0 + rows.to(tl.int64)[:, None] * DI + d[None, :], mask=live[:, None], other=0.0
        )
        rh, rm, rl = _split3(x)
        qh, qm, ql = _split3(tl.load(Q + h[None, :] * DI + d[:, None]))
        # the products of parts whose bits reach below 2**-24 relative are left out
        acc = _mm(rh, qh, acc, INTERP)
        acc = _mm(rh, qm, acc, INTERP)
        acc = _mm(rm, qh, acc, INTERP)
        acc = _mm(rh, ql, acc, INTERP)
        acc = _mm(rm, qm, acc, INTERP)
        acc = _mm(rl, qh, acc, INTERP)
    return acc


@triton.jit
def _order_key(s):
    """int32 key whose signed order is the float order of s. (A zero score has the same sign
    for every row: terms are w_h * relu >= +0 and the weights are shared.)"""
    b = s.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _hist_add(HIST, digit, mask, NB: tl.constexpr):
    # integer atomics: the sums do not depend on the order programs finish in
    h = tl.histogram(digit, NB, mask=mask)
    tl.atomic_add(HIST + tl.arange(0, NB), h, mask=h > 0, sem="relaxed")


@triton.jit
def _score_kernel(Q, W, R0, R1, POS, KEYS, HIST, cap, ratio, K, HI: tl.constexpr,
                  DI: tl.constexpr, BN: tl.constexpr, FP4: tl.constexpr, HIST1: tl.constexpr,
                  INTERP: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    n = _visible(POS, ratio, cap)
    if (n > K) & (pid * BN < n):  # with n <= K the answer is ids 0..K-1: nothing to score
        rows = pid * BN + tl.arange(0, BN)
        live = rows < n
        acc = _head_dots(Q, R0, R1, rows, live, HI, DI, BN, FP4, INTERP)
        w = tl.load(W + tl.arange(0, HI))
        key = _order_key(tl.sum(tl.maximum(acc, 0.0) * w[None, :], axis=1))
        tl.store(KEYS + rows, key, mask=live)
        if HIST1:
            _hist_add(HIST, (key >> 21) + 1024, live, 2048)


# ---- Selection ----------------------------------------------------------------------------


@triton.jit
def _pick_bin(HIST, NB: tl.constexpr, rank):
    """The bin holding the rank-th largest (1-based) counted key, and the count above it."""
    b = tl.arange(0, NB)
    h = tl.load(HIST + b)
    at_or_above = tl.cumsum(h, 0, reverse=True)
    top = tl.max(tl.where(at_or_above >= rank, b, -1), 0)
    return top, tl.sum(tl.where(b > top, h, 0), 0)


@triton.jit
def _descend(HIST, K, LEVELS: tl.constexpr):
    """Key prefix (top 11, 22 or 32 bits, signed) of the K-th largest key, and its rank among
    the keys sharing that prefix; digits: bits 31..21 (offset to 0..2047), 20..10, 9..0."""
    b, above = _pick_bin(HIST, 2048, K)
    prefix = b - 1024
    rank = K - above
    if LEVELS >= 2:
        b, above = _pick_bin(HIST + 2048, 2048, rank)
        prefix = (prefix << 11) | b
        rank = rank - above
    if LEVELS >= 3:
        b, above = _pick_bin(HIST + 4096, 1024, rank)
        prefix = (prefix << 10) | b
        rank = rank - above
    return prefix, rank


@triton.jit
def _count(x):
    return tl.sum(x.to(tl.int32), 0)


@triton.jit
def _write_first(OUT, K, B: tl.constexpr):
    """Ids 0..K-1: the answer when at most K rows are visible (invisible rows score -inf)."""
    for i0 in range(0, K, B):
        i = i0 + tl.arange(0, B)
        tl.store(OUT + i, i.to(tl.int64), mask=i < K)


@triton.jit
def _emit(OUT, s, idx, live, T, need, gt_before, eq_before):
    """Store the ids of keys > T and of the first `need` keys == T (in id order, counting
    eq_before earlier ones) at their rank among the selected ids."""
    gt = live & (s > T)
    eq = (live & (s == T)).to(tl.int32)
    eq_rank = eq_before + tl.cumsum(eq, 0) - eq
    take = gt | ((eq != 0) & (eq_rank < need))
    t = take.to(tl.int32)
    at = gt_before + tl.minimum(eq_before, need) + tl.cumsum(t, 0) - t
    tl.store(OUT + at, idx.to(tl.int64), mask=take)


@triton.jit
def _kth_largest(s, live, K):
    """Largest t with at least K live keys >= t, i.e. the K-th largest key, bit by bit."""
    t = tl.where(_count(live & (s >= 0)) >= K, 0, -2147483648)
    for i in range(31):
        c = t | (1 << (30 - i))
        t = tl.where(_count(live & (s >= c)) >= K, c, t)
    return t


@triton.jit
def _select_small_kernel(KEYS, POS, OUT, cap, ratio, K, CP: tl.constexpr):
    n = _visible(POS, ratio, cap)
    if n <= K:
        _write_first(OUT, K, CP)
    else:
        idx = tl.arange(0, CP)
        live = idx < n
        s = tl.load(KEYS + idx, mask=live, other=0)
        T = _kth_largest(s, live, K)
        _emit(OUT, s, idx, live, T, K - _count(live & (s > T)), 0, 0)


@triton.jit
def _chunk(KEYS, n, CH: tl.constexpr):
    idx = tl.program_id(0) * CH + tl.arange(0, CH)
    live = idx < n
    return tl.load(KEYS + idx, mask=live, other=0), idx, live


@triton.jit
def _level_kernel(KEYS, HIST, POS, cap, ratio, K, LEVEL: tl.constexpr, CH: tl.constexpr):
    """Histogram of digit LEVEL over the keys that share the K-th largest key's prefix."""
    n = _visible(POS, ratio, cap)
    if (n > K) & (tl.program_id(0) * CH < n):
        s, idx, live = _chunk(KEYS, n, CH)
        prefix, rank = _descend(HIST, K, LEVEL - 1)
        if LEVEL == 2:
            match = live & ((s >> 21) == prefix)
            if _count(match) > 0:
                _hist_add(HIST + 2048, (s >> 10) & 0x7FF, match, 2048)
        else:
            match = live & ((s >> 10) == prefix)
            if _count(match) > 0:
                _hist_add(HIST + 4096, s & 0x3FF, match, 1024)


@triton.jit
def _count_kernel(KEYS, HIST, WORK, POS, cap, ratio, K, NPROG, CH: tl.constexpr):
    """Per program: how many keys are > T and == T (T: the K-th largest key)."""
    n = _visible(POS, ratio, cap)
    pid = tl.program_id(0)
    if (n > K) & (pid * CH < n):
        T, need = _descend(HIST, K, 3)
        if pid == 0:
            tl.store(WORK + 2 * NPROG, T)
            tl.store(WORK + 2 * NPROG + 1, need)
        s, idx, live = _chunk(KEYS, n, CH)
        tl.store(WORK + pid, _count(live & (s > T)))
        tl.store(WORK + NPROG + pid, _count(live & (s == T)))


@triton.jit
def _emit_kernel(KEYS, HIST, WORK, POS, OUT, cap, ratio, K, NPROG, CH: tl.constexpr,
                 GP: tl.constexpr):  # fmt: skip
    n = _visible(POS, ratio, cap)
    pid = tl.program_id(0)
    if pid == 0:  # nothing reads the histograms any more: leave them zero for the next call
        for i0 in range(0, 5120, 1024):
            tl.store(HIST + i0 + tl.arange(0, 1024), tl.zeros((1024,), dtype=tl.int32))
        if n <= K:
            _write_first(OUT, K, 1024)
    if (n > K) & (pid * CH < n):
        T = tl.load(WORK + 2 * NPROG)
        need = tl.load(WORK + 2 * NPROG + 1)
        g = tl.arange(0, GP)
        earlier = g < pid
        gt_before = tl.sum(tl.load(WORK + g, mask=earlier, other=0), 0)
        eq_before = tl.sum(tl.load(WORK + NPROG + g, mask=earlier, other=0), 0)
        s, idx, live = _chunk(KEYS, n, CH)
        _emit(OUT, s, idx, live, T, need, gt_before, eq_before)


# ---- Launcher -----------------------------------------------------------------------------


def _check(qi: Tensor, w: Tensor, rows, pos: Tensor, ratio: int, k: int) -> None:
    if type(rows) not in (FloatRows, FP4Rows):
        raise ValueError(f"indexer rows must be FloatRows or FP4Rows, not {type(rows).__name__}")
    if qi.dim() != 2 or qi.dtype != torch.float32:
        raise ValueError(f"qi must be float32 [heads, dim], got {qi.dtype} {tuple(qi.shape)}")
    hi, di = qi.shape
    if w.shape != (hi,) or w.dtype != torch.float32:
        raise ValueError(f"w must be float32 [{hi}], got {w.dtype} {tuple(w.shape)}")
    if rows.width != di:
        raise ValueError(f"rows are {rows.width} wide but qi has {di} dims")
    if hi < 16 or di < 32 or hi & (hi - 1) or di & (di - 1):
        raise ValueError(f"heads ({hi}) and dims ({di}) must be powers of two, >= 16 and >= 32")
    if pos.shape != (1,) or pos.dtype != torch.int64:
        raise ValueError(f"pos must be an int64 tensor [1], got {pos.dtype} {tuple(pos.shape)}")
    devices = {qi.device, w.device, pos.device, rows.parts[0].device}
    if len(devices) != 1:
        raise ValueError(
            f"qi, w, pos and rows must share a device, got {sorted(map(str, devices))}"
        )
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if not 0 <= k <= rows.cap:
        raise ValueError(f"k must be in 0..{rows.cap} (the capacity), got {k}")


def indexer_topk(
    qi: Tensor,
    w: Tensor,
    rows,
    pos: Tensor,
    ratio: int,
    k: int,
    scratch: IndexerScratch | None = None,
    cfg: TopkConfig = DEFAULT,
) -> Tensor:
    """Ids [k] (int64, ascending) of the k highest-scoring visible rows, score_j =
    sum_h w_h relu(qi_h . row_j) for j < (pos + 1) // ratio, ties to the lower id; ids n, n+1, ...
    fill up when fewer than k rows are visible. `scratch`: reusable buffers (else allocated)."""
    _check(qi, w, rows, pos, ratio, k)
    out = torch.empty(k, dtype=torch.int64, device=qi.device)
    cap = rows.cap
    if k == 0:
        return out
    if scratch is None:
        scratch = IndexerScratch.new(cap, qi.device, cfg)
    elif not scratch.fits(cap, qi.device, cfg):
        raise ValueError(f"scratch does not fit capacity {cap} on {qi.device}")
    hi, di = qi.shape
    fp4 = isinstance(rows, FP4Rows)
    r0, r1 = (rows.parts[0], rows.parts[1]) if fp4 else (rows.parts[0], rows.parts[0])
    small = cap <= cfg.small_cap
    qi, w = qi.contiguous(), w.contiguous()
    _score_kernel[(triton.cdiv(cap, cfg.block),)](
        qi, w, r0, r1, pos, scratch.keys, scratch.hist, cap, ratio, k,
        HI=hi, DI=di, BN=cfg.block, FP4=fp4, HIST1=not small, INTERP=interpreting(),
        num_warps=cfg.score_warps,
    )  # fmt: skip
    if small:
        cp = triton.next_power_of_2(cap)
        _select_small_kernel[(1,)](
            scratch.keys, pos, out, cap, ratio, k, CP=cp, num_warps=cfg.select_warps
        )
        return out
    nprog = triton.cdiv(cap, cfg.chunk)
    grid, ch, nw = (nprog,), cfg.chunk, cfg.pass_warps
    keys, hist, work = scratch.keys, scratch.hist, scratch.work
    for level in (2, 3):
        _level_kernel[grid](keys, hist, pos, cap, ratio, k, LEVEL=level, CH=ch, num_warps=nw)
    _count_kernel[grid](keys, hist, work, pos, cap, ratio, k, nprog, CH=ch, num_warps=nw)
    gp = max(16, triton.next_power_of_2(nprog))
    _emit_kernel[grid](keys, hist, work, pos, out, cap, ratio, k, nprog, CH=ch, GP=gp, num_warps=nw)
    return out


# ---- Reference ----------------------------------------------------------------------------


def indexer_scores_ref(qi: Tensor, w: Tensor, rows, pos: Tensor, ratio: int) -> Tensor:
    """[cap] float32 scores as decode.py computes them; invisible rows -inf."""
    keys = rows.get(rows.cap)
    score = torch.einsum("th,thk->tk", w[None], torch.relu(qi[None] @ keys.T))[0]
    visible = torch.arange(rows.cap, device=qi.device) < (pos + 1) // ratio
    return score.masked_fill(~visible, float("-inf"))


def indexer_topk_ref(qi: Tensor, w: Tensor, rows, pos: Tensor, ratio: int, k: int) -> Tensor:
    """decode.py's selection (stable descending sort: ties to the lower id), ids ascending."""
    score = indexer_scores_ref(qi, w, rows, pos, ratio)
    return torch.sort(score, descending=True, stable=True).indices[:k].sort().values
