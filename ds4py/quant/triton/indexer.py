"""Decode lightning indexer: score the compressed indexer rows and select the top-k, no sort.

Owns `indexer_topk` (Triton) and `indexer_topk_ref` (torch: decode.py indexer_step's scoring
and stable sort, then ids ascending), their scratch buffers and launch plan. Scoring decodes
FP4 rows (or splits float32 rows) into bfloat16 parts that are exact and multiplies them with
exact bfloat16 parts of the queries on tensor cores, so scores are float32-accurate. Selection
maps scores to order-preserving int32 keys, walks 9/12/11-bit digit histograms to the k-th
key, then compacts ids in id order. Static grids, no host sync, integer atomics only.
Does not own: the row stores (kv/state.py) or the indexer projections and RoPE (decode.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ds4py.kv.state import FloatRows, FP4Rows
from ds4py.model import decode
from ds4py.quant.triton.gemv import pdl_ok
from ds4py.quant.triton.tiles import interpreting

Tensor = torch.Tensor
# the three digit histograms (9, 12 and 11 bits of the key), one after the other
H2: tl.constexpr = tl.constexpr(512)
H3: tl.constexpr = tl.constexpr(512 + 4096)
HIST_WORDS: tl.constexpr = tl.constexpr(512 + 4096 + 2048)


@dataclass(frozen=True)
class TopkConfig:
    block: int = 128  # rows per scoring step (the tensor-core M)
    score_warps: int = 8
    score_programs: int = 0  # scoring programs, each looping over blocks; 0: 2 per SM
    score_maxnreg: int = 128  # FP4 rows: two 8-warp programs fit an SM (no spills at 128)
    chunk: int = 2048  # keys per program in the histogram / count / emit passes
    pass_warps: int = 4
    small_cap: int = 4096  # up to this capacity one program selects, keys in registers
    select_warps: int = 8  # at least; more for capacities over 4096
    select_bits: int = 2  # key bits per counting step of the one-program selection (H200:
    # 2 bits 10.4 us at 1K keys, 1 bit 12.9, 3 bits 11.1, 4 bits 13.8; scripts/check_indexer.py)


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
            torch.zeros(HIST_WORDS.value, dtype=torch.int32, device=device),
            torch.empty(2 * programs + 2, dtype=torch.int32, device=device),
        )

    def fits(self, cap: int, device, cfg: TopkConfig) -> bool:
        programs = triton.cdiv(max(cap, 1), cfg.chunk)
        return (
            self.keys.numel() >= cap
            and self.hist.numel() == HIST_WORDS.value
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
def _fp4_halves(CODES, EXPS, rows, live, BN: tl.constexpr, DI: tl.constexpr):
    """Rows as bfloat16 [BN, DI/2] twice: even elements (low nibbles), odd ones (high); exact,
    since grid * 2**exp has at most 2 significant bits."""
    g = tl.arange(0, DI // 32)
    r = rows.to(tl.int64)
    # 4-byte words (16-byte loads per thread), split into bytes: [BN, group, word, byte]
    at = r[:, None, None] * (DI // 8) + (g[:, None] * 4 + tl.arange(0, 4)[None, :])[None]
    words = tl.load(CODES + at, mask=live[:, None, None], other=0)  # CODES: int32 words
    c = (words[:, :, :, None] >> (tl.arange(0, 4) * 8)[None, None, None, :]) & 0xFF
    e = tl.load(EXPS + r[:, None] * (DI // 32) + g[None, :], mask=live[:, None], other=0)
    scale = ((e.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)[:, :, None, None]
    # a code's sign and 3 magnitude bits placed at float16 bits 15 and 11..9 make the float16
    # of grid * 2**-14 (0.5 lands on a subnormal, the rest on normals)
    even = ((c << 12) & 0x8000) | ((c << 9) & 0x0E00)
    odd = ((c << 8) & 0x8000) | ((c << 5) & 0x0E00)
    even = tl.reshape(_f16_bits(even) * 16384.0 * scale, (BN, DI // 2))  # scale = 2**e
    odd = tl.reshape(_f16_bits(odd) * 16384.0 * scale, (BN, DI // 2))
    return even.to(tl.bfloat16), odd.to(tl.bfloat16)


@triton.jit
def _f16_bits(b):
    return b.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _mm(a, b, acc, INTERP: tl.constexpr):
    if INTERP:  # the interpreter multiplies bfloat16 as raw integers; the parts are exact in f32
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
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
def _finish(acc, w, rows, live, KEYS, HIST, HIST1: tl.constexpr):
    """Scores sum_h w_h relu(acc_h) as keys; the top-digit histogram for the passes."""
    key = _order_key(tl.sum(tl.maximum(acc, 0.0) * w[None, :], axis=1))
    tl.store(KEYS + rows, key, mask=live)
    if HIST1:
        _hist_add(HIST, (key >> 23) + 256, live, 512)


@triton.jit
def _fp4_block(R0, R1, KEYS, HIST, rows, n, w, eh, em, el, oh, om, ol, split,
               HI: tl.constexpr, DI: tl.constexpr, BN: tl.constexpr, HIST1: tl.constexpr,
               INTERP: tl.constexpr):  # fmt: skip
    live = rows < n
    even, odd = _fp4_halves(R0, R1, rows, live, BN, DI)
    acc = _mm(even, eh, tl.zeros((BN, HI), dtype=tl.float32), INTERP)
    acc = _mm(odd, oh, acc, INTERP)
    if split:
        acc = _mm(even, em, acc, INTERP)
        acc = _mm(odd, om, acc, INTERP)
        acc = _mm(even, el, acc, INTERP)
        acc = _mm(odd, ol, acc, INTERP)
    _finish(acc, w, rows, live, KEYS, HIST, HIST1)


@triton.jit
def _float_block(R0, KEYS, HIST, rows, n, w, qh, qm, ql, HI: tl.constexpr, DI: tl.constexpr,
                 BN: tl.constexpr, HIST1: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
    live = rows < n
    at = R0 + rows.to(tl.int64)[:, None] * DI + tl.arange(0, DI)[None, :]
    rh, rm, rl = _split3(tl.load(at, mask=live[:, None], other=0.0))
    # products of parts whose bits all lie below 2**-24 relative are left out
    acc = _mm(rh, qh, tl.zeros((BN, HI), dtype=tl.float32), INTERP)
    acc = _mm(rh, qm, acc, INTERP)
    acc = _mm(rm, qh, acc, INTERP)
    acc = _mm(rh, ql, acc, INTERP)
    acc = _mm(rm, qm, acc, INTERP)
    acc = _mm(rl, qh, acc, INTERP)
    _finish(acc, w, rows, live, KEYS, HIST, HIST1)


@triton.jit
def _score_kernel(Q, W, R0, R1, POS, KEYS, HIST, cap, ratio, K, HI: tl.constexpr,
                  DI: tl.constexpr, BN: tl.constexpr, FP4: tl.constexpr, HIST1: tl.constexpr,
                  INTERP: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Program p scores the visible row blocks p, p + programs, ...; the queries are split
    once per program. PDL: the one-program selection may start (and wait) meanwhile."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    n = _visible(POS, ratio, cap)
    if n > K:  # with n <= K the answer is ids 0..K-1: nothing to score
        h = tl.arange(0, HI)
        w = tl.load(W + h)
        if FP4:
            j = tl.arange(0, DI // 2)
            eh, em, el = _split3(tl.load(Q + h[None, :] * DI + 2 * j[:, None]))  # [DI/2, HI]
            oh, om, ol = _split3(tl.load(Q + h[None, :] * DI + 2 * j[:, None] + 1))
            # FP4-simulated queries are exact in bfloat16: one product per half then
            split = tl.max(tl.abs(em.to(tl.float32)) + tl.abs(om.to(tl.float32))) != 0
        else:
            qh, qm, ql = _split3(tl.load(Q + h[None, :] * DI + tl.arange(0, DI)[:, None]))
        # a loop bound read from the device (not a branch per block) lets Triton prefetch the
        # next block's codes while this one is multiplied
        for b in range(tl.program_id(0), tl.cdiv(n, BN), tl.num_programs(0)):
            rows = b * BN + tl.arange(0, BN)
            if FP4:
                _fp4_block(R0, R1, KEYS, HIST, rows, n, w, eh, em, el, oh, om, ol, split,
                           HI, DI, BN, HIST1, INTERP)  # fmt: skip
            else:
                _float_block(R0, KEYS, HIST, rows, n, w, qh, qm, ql, HI, DI, BN, HIST1,
                             INTERP)  # fmt: skip


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
    """Key prefix (top 9, 21 or 32 bits, signed) of the K-th largest key, and its rank among
    the keys sharing that prefix. Digits: bits 31..23 (sign and exponent, offset to 0..511),
    22..11 and 10..0 (mantissa)."""
    b, above = _pick_bin(HIST, 512, K)
    prefix = b - 256
    rank = K - above
    if LEVELS >= 2:
        b, above = _pick_bin(HIST + H2, 4096, rank)
        prefix = (prefix << 12) | b
        rank = rank - above
    if LEVELS >= 3:
        b, above = _pick_bin(HIST + H3, 2048, rank)
        prefix = (prefix << 11) | b
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
def _emit(OUT, s, idx, live, T, need, gt_before, eq_before, K):
    """Store the ids of keys > T and of the first `need` keys == T (in id order, counting
    eq_before earlier ones) at their rank among the selected ids."""
    gt = live & (s > T)
    eq = (live & (s == T)).to(tl.int32)
    eq_rank = eq_before + tl.cumsum(eq, 0) - eq
    take = gt | ((eq != 0) & (eq_rank < need))
    t = take.to(tl.int32)
    at = gt_before + tl.minimum(eq_before, need) + tl.cumsum(t, 0) - t
    tl.store(OUT + at, idx.to(tl.int64), mask=take & (at < K))  # at < K holds; never write past


@triton.jit
def _kth_largest(s, live, K, BITS: tl.constexpr):
    """Largest t with at least K live keys >= t, i.e. the K-th largest key: the sign, then
    BITS bits a step (the 2**BITS - 1 candidate extensions of t counted in one reduction)."""
    t = tl.where(_count(live & (s >= 0)) >= K, 0, -2147483648)
    j = tl.arange(0, 1 << BITS)
    for i in tl.static_range(0, 31, BITS):
        b = min(BITS, 31 - i)  # the last step may decide fewer bits
        c = t | ((j % (1 << b)) << (31 - i - b))  # candidates >= t, increasing in j (< 2**b)
        n = tl.sum((live[:, None] & (s[:, None] >= c[None, :])).to(tl.int32), 0)
        t = tl.max(tl.where(n >= K, c, t), 0)
    return t


@triton.jit
def _select_small_kernel(KEYS, POS, OUT, cap, ratio, K, CP: tl.constexpr, BITS: tl.constexpr,
                         PDL: tl.constexpr):  # fmt: skip
    if PDL:  # launched early by the scoring kernel: wait for its keys
        tl.extra.cuda.gdc_wait()
    n = _visible(POS, ratio, cap)
    if n <= K:
        _write_first(OUT, K, CP)
    else:
        idx = tl.arange(0, CP)
        live = idx < n
        s = tl.load(KEYS + idx, mask=live, other=0)
        T = _kth_largest(s, live, K, BITS)
        _emit(OUT, s, idx, live, T, K - _count(live & (s > T)), 0, 0, K)


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
            _hist_scatter(HIST + H2, (s >> 11) & 0xFFF, live & ((s >> 23) == prefix), CH)
        else:
            _hist_scatter(HIST + H3, s & 0x7FF, live & ((s >> 11) == prefix), CH)


@triton.jit
def _hist_scatter(HIST, digit, mask, CH: tl.constexpr):
    """Count masked digits, one integer atomic each: mantissa digits spread over the bins.
    Keys crowded into a few bins (equal scores) are counted here first, 64 bins wide."""
    m = _count(mask)
    if m > 0:
        lo = tl.min(tl.where(mask, digit, 1 << 30), 0)
        hi = tl.max(tl.where(mask, digit, -1), 0)
        if (m > CH // 8) & (hi - lo < 64):
            h = tl.histogram(digit - lo, 64, mask=mask)
            tl.atomic_add(HIST + lo + tl.arange(0, 64), h, mask=h > 0, sem="relaxed")
        else:
            tl.atomic_add(HIST + digit, mask.to(tl.int32), mask=mask, sem="relaxed")


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
        for i0 in range(0, HIST_WORDS, 512):
            tl.store(HIST + i0 + tl.arange(0, 512), tl.zeros((512,), dtype=tl.int32))
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
        _emit(OUT, s, idx, live, T, need, gt_before, eq_before, K)


# ---- Launcher -----------------------------------------------------------------------------


@functools.cache
def _score_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


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
    _launch_score(qi.contiguous(), w.contiguous(), rows, pos, ratio, k, scratch, cfg)
    _launch_select(cap, pos, ratio, k, scratch, out, cfg)
    return out


def _launch_score(qi, w, rows, pos, ratio, k, scratch: IndexerScratch, cfg: TopkConfig) -> None:
    """Keys of the visible rows (and the top-digit histogram when the passes select)."""
    hi, di = qi.shape
    cap, fp4 = rows.cap, isinstance(rows, FP4Rows)
    # FP4 codes as int32 words: the kernel reads them 16 bytes a thread
    r0, r1 = (rows.parts[0].view(torch.int32), rows.parts[1]) if fp4 else rows.parts * 2
    blocks = triton.cdiv(cap, cfg.block)
    programs = min(blocks, cfg.score_programs or _score_programs(qi.device))
    _score_kernel[(programs,)](
        qi, w, r0, r1, pos, scratch.keys, scratch.hist, cap, ratio, k,
        HI=hi, DI=di, BN=cfg.block, FP4=fp4, HIST1=cap > cfg.small_cap, INTERP=interpreting(),
        PDL=pdl_ok(qi.device) and cap <= cfg.small_cap,  # a dependent follows: the one program
        # float rows: no software pipelining (its buffers would overflow shared memory)
        num_warps=cfg.score_warps, maxnreg=cfg.score_maxnreg if fp4 else None,
        num_stages=3 if fp4 else 1,
    )  # fmt: skip


def _launch_select(cap, pos, ratio, k, scratch: IndexerScratch, out, cfg: TopkConfig) -> None:
    """out [k] from the keys: one program for small capacities, else the histogram passes.
    On Hopper the one program starts while the scoring finishes (programmatic dependent
    launch; H200 at 4K: 9.8 us against 10.4; the passes measured slower chained)."""
    keys, hist, work = scratch.keys, scratch.hist, scratch.work
    if cap <= cfg.small_cap:
        pdl = pdl_ok(out.device)
        cp = triton.next_power_of_2(cap)
        nw = max(cfg.select_warps, min(32, cp // 512))  # <= 16 keys a thread
        _select_small_kernel[(1,)](
            keys, pos, out, cap, ratio, k, CP=cp, BITS=cfg.select_bits, PDL=pdl, num_warps=nw,
            launch_pdl=pdl,
        )  # fmt: skip
        return
    nprog = triton.cdiv(cap, cfg.chunk)
    grid, ch, nw = (nprog,), cfg.chunk, cfg.pass_warps
    for level in (2, 3):
        _level_kernel[grid](keys, hist, pos, cap, ratio, k, LEVEL=level, CH=ch, num_warps=nw)
    _count_kernel[grid](keys, hist, work, pos, cap, ratio, k, nprog, CH=ch, num_warps=nw)
    gp = max(16, triton.next_power_of_2(nprog))
    _emit_kernel[grid](keys, hist, work, pos, out, cap, ratio, k, nprog, CH=ch, GP=gp, num_warps=nw)


# ---- Reference ----------------------------------------------------------------------------


def indexer_scores_ref(qi: Tensor, w: Tensor, rows, pos: Tensor, ratio: int) -> Tensor:
    """[cap] float32 scores as decode.py computes them; invisible rows -inf."""
    return decode.indexer_scores(qi, w, rows, pos, ratio)


def indexer_topk_ref(qi: Tensor, w: Tensor, rows, pos: Tensor, ratio: int, k: int) -> Tensor:
    """decode.py's selection (stable descending sort: ties to the lower id), ids ascending."""
    return decode.indexer_topk(qi, w, rows, pos, ratio, k).sort().values
