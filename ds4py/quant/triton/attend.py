"""Decode attention for one token: all heads over the raw window ring and the compressed rows.

Owns: `attend_decode` (two launches: a split kernel, then a combine kernel), its tiling
heuristic `attend_config`, and `attend_decode_ref`, the torch reference with the same signature
(decode.py's row groups and masks, then `model.attend`). The split kernel gives each program one
block of R rows (window slots or compressed rows) x BH heads: logits, block max, block sum and the
unnormalised block output; the combine kernel merges the live blocks and the sink in a fixed
order, so results are bit-identical run to run. Does not own the row stores (kv/state.py).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ds4py.kv.state import FloatRows, FP8Rows
from ds4py.model.decode import attend_step
from ds4py.quant.triton.tiles import interpreting

Tensor = torch.Tensor

# ---- Float32 products on tensor cores ----
# TF32 keeps 11 significant bits, so x = hi + lo + O(2^-22 x) with hi, lo exact in TF32; products
# of TF32-exact values are exact in float32 and the tensor cores sum them in float32. Decoded
# FP8 rows (E4M3 * 2^e) and F16 RoPE dims are TF32-exact, so they need no lo part.


@triton.jit
def _tf32(x):
    """x with the 13 low mantissa bits cleared: exactly representable in TF32."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


# Products go to two accumulators, hi*hi and the corrections: independent chains of mma
# instructions, so one chain's latency does not serialise the other.


@triton.jit
def _dot_exact(q, k, hi, lo):
    """(hi, lo) += q @ k.T for a TF32-exact k (q split in two)."""
    qh = _tf32(q)
    kt = tl.trans(k)
    hi = tl.dot(qh, kt, hi, input_precision="tf32")
    return hi, tl.dot(_tf32(q - qh), kt, lo, input_precision="tf32")


@triton.jit
def _dot_f32(q, k, hi, lo):
    """(hi, lo) += q @ k.T for float32 q and k (both split; the lo*lo term is below float32)."""
    qh, kh = _tf32(q), _tf32(k)
    kht = tl.trans(kh)
    hi = tl.dot(qh, kht, hi, input_precision="tf32")
    lo = tl.dot(_tf32(q - qh), kht, lo, input_precision="tf32")
    return hi, tl.dot(qh, tl.trans(_tf32(k - kh)), lo, input_precision="tf32")


@triton.jit
def _e4m3(b, e):
    """E4M3 bytes b [R, 64] times 2**e [R, 1], exactly. The byte's magnitude bits placed in an
    F16 give the value * 2**-8 (subnormals included); the scale is built from its exponent."""
    x = b.to(tl.int32)
    h = (((x & 0x7F) << 7) | ((x & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True)
    return h.to(tl.float32) * ((e.to(tl.int32) + 135) << 23).to(tl.float32, bitcast=True)


# ---- Split kernel: one block of rows x one block of heads ----


@triton.jit
def _q_chunk(Q, hh, H, c, D: tl.constexpr):
    t = tl.arange(0, 64)
    return tl.load(Q + hh[:, None] * D + c + t[None, :], mask=(hh < H)[:, None], other=0.0)


@triton.jit
def _logits_f32(Q, hh, H, ROWS, rid, D: tl.constexpr, BH: tl.constexpr, R: tl.constexpr):
    """q . row for float32 rows [*, D] at ids rid, 64 dims at a time; the next chunk's loads
    are issued before this chunk's products so their latency overlaps them."""
    t = tl.arange(0, 64)
    rp = ROWS + rid[:, None] * D + t[None, :]
    q_nx = _q_chunk(Q, hh, H, 0, D)
    k_nx = tl.load(rp)
    hi = tl.zeros([BH, R], tl.float32)
    lo = tl.zeros([BH, R], tl.float32)
    for c in range(0, D, 64):
        q, k = q_nx, k_nx
        cn = tl.minimum(c + 64, D - 64)
        q_nx = _q_chunk(Q, hh, H, cn, D)
        k_nx = tl.load(rp + cn)
        hi, lo = _dot_f32(q, k, hi, lo)
    return hi + lo


@triton.jit
def _logits_fp8(Q, hh, H, CODES, EXPS, ROPE, rid, D: tl.constexpr, NOPE: tl.constexpr,
                NROT: tl.constexpr, BH: tl.constexpr, R: tl.constexpr):  # fmt: skip
    """q . row for FP8Rows: RoPE dims (F16) first, then the E4M3 dims with their exponents."""
    t = tl.arange(0, 64)
    bp = CODES + rid[:, None] * NOPE + t[None, :]
    ep = EXPS + rid * (NOPE // 64)
    q_nx = _q_chunk(Q, hh, H, 0, D)
    b_nx = tl.load(bp)
    e_nx = tl.load(ep)
    hi = tl.zeros([BH, R], tl.float32)
    lo = tl.zeros([BH, R], tl.float32)
    for c in range(0, NROT, 64):
        k = tl.load(ROPE + rid[:, None] * NROT + c + t[None, :]).to(tl.float32)
        hi, lo = _dot_exact(_q_chunk(Q, hh, H, NOPE + c, D), k, hi, lo)
    for c in range(0, NOPE, 64):
        q, b, e = q_nx, b_nx, e_nx
        cn = tl.minimum(c + 64, NOPE - 64)
        q_nx = _q_chunk(Q, hh, H, cn, D)
        b_nx = tl.load(bp + cn)
        e_nx = tl.load(ep + cn // 64)
        hi, lo = _dot_exact(q, _e4m3(b, e[:, None]), hi, lo)
    return hi + lo


@triton.jit
def _block_softmax(s, valid, scale, PM, PL, b, hh, H):
    """Masked, scaled logits -> exp(s - block max); stores the block max and sum per head."""
    s = tl.where(valid[None, :], s * scale, float("-inf"))
    m = tl.max(s, 1)
    p = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])  # no valid row: p = 0
    tl.store(PM + b * H + hh, m, mask=hh < H)
    tl.store(PL + b * H + hh, tl.sum(p, 1), mask=hh < H)
    return p


@triton.jit
def _out_f32(p, hh, H, ROWS, rid, OUT, D: tl.constexpr):
    """OUT[h, :] = p @ rows for float32 rows, 64 dims at a time (p and rows both split).
    Unrolled: the split p is then converted to the mma operand layout once, not per chunk."""
    t = tl.arange(0, 64)
    ph = _tf32(p)
    pl = _tf32(p - ph)
    rp = ROWS + rid[:, None] * D + t[None, :]
    op = OUT + hh[:, None] * D + t[None, :]
    v_nx = tl.load(rp)
    for c in tl.static_range(0, D, 64):
        v = v_nx
        if c + 64 < D:
            v_nx = tl.load(rp + c + 64)
        vh = _tf32(v)
        o = tl.dot(ph, vh, input_precision="tf32")
        o = tl.dot(pl, vh, o, input_precision="tf32")
        o = tl.dot(ph, _tf32(v - vh), o, input_precision="tf32")
        tl.store(op + c, o, mask=(hh < H)[:, None])


@triton.jit
def _out_fp8(p, hh, H, CODES, EXPS, ROPE, rid, OUT, D: tl.constexpr, NOPE: tl.constexpr,
             NROT: tl.constexpr):  # fmt: skip
    """OUT[h, :] = p @ rows for FP8Rows (rows are TF32-exact: p split in two); RoPE dims
    first, as in _logits_fp8."""
    t = tl.arange(0, 64)
    ph = _tf32(p)
    pl = _tf32(p - ph)
    bp = CODES + rid[:, None] * NOPE + t[None, :]
    ep = EXPS + rid * (NOPE // 64)
    rp = ROPE + rid[:, None] * NROT + t[None, :]
    op = OUT + hh[:, None] * D + t[None, :]
    b_nx = tl.load(bp)
    e_nx = tl.load(ep)
    for c in tl.static_range(0, NROT, 64):
        v = tl.load(rp + c).to(tl.float32)
        o = tl.dot(ph, v, input_precision="tf32")
        o = tl.dot(pl, v, o, input_precision="tf32")
        tl.store(op + NOPE + c, o, mask=(hh < H)[:, None])
    for c in tl.static_range(0, NOPE, 64):
        b, e = b_nx, e_nx
        if c + 64 < NOPE:
            b_nx = tl.load(bp + c + 64)
            e_nx = tl.load(ep + (c + 64) // 64)
        v = _e4m3(b, e[:, None])
        o = tl.dot(ph, v, input_precision="tf32")
        o = tl.dot(pl, v, o, input_precision="tf32")
        tl.store(op + c, o, mask=(hh < H)[:, None])


@triton.jit
def _split_kernel(
    Q, RAW, POS, C0, C1, C2, IDX, PO, PM, PL, H, W, CAP, K, ratio, scale, NWB,
    D: tl.constexpr, NOPE: tl.constexpr, NROT: tl.constexpr, STORE: tl.constexpr,
    HAS_IDX: tl.constexpr, BH: tl.constexpr, R: tl.constexpr,
):  # fmt: skip
    """Program (b, hb): row block b (window blocks first, then compressed blocks) for heads
    hb*BH.. Blocks without a live row write nothing; the combine kernel skips them."""
    b = tl.program_id(0)
    hh = tl.program_id(1) * BH + tl.arange(0, BH)
    pos = tl.load(POS).to(tl.int32)
    r = tl.arange(0, R)
    out = PO + b * H * D
    if b < NWB:
        j = b * R + r  # ring slot j holds position pos - (pos - j) % W: valid iff j <= pos
        if b * R <= pos:
            rid = tl.minimum(j, W - 1)
            s = _logits_f32(Q, hh, H, RAW, rid, D, BH, R)
            p = _block_softmax(s, (j <= pos) & (j < W), scale, PM, PL, b, hh, H)
            _out_f32(p, hh, H, RAW, rid, out, D)
    elif STORE > 0:
        i = (b - NWB) * R + r
        n = tl.minimum((pos + 1) // ratio, CAP)  # visible compressed rows
        if HAS_IDX:
            ids = tl.load(IDX + i, mask=i < K, other=0).to(tl.int32)
            valid = (i < K) & (ids >= 0) & (ids < n)
            live = (b - NWB) * R < K
        else:
            ids = i
            valid = i < n
            live = (b - NWB) * R < n
        rid = tl.minimum(tl.maximum(ids, 0), CAP - 1)  # every load in bounds; masks decide
        if live:
            if STORE == 1:
                s = _logits_f32(Q, hh, H, C0, rid, D, BH, R)
            else:
                s = _logits_fp8(Q, hh, H, C0, C1, C2, rid, D, NOPE, NROT, BH, R)
            p = _block_softmax(s, valid, scale, PM, PL, b, hh, H)
            if STORE == 1:
                _out_f32(p, hh, H, C0, rid, out, D)
            else:
                _out_fp8(p, hh, H, C0, C1, C2, rid, out, D, NOPE, NROT)


# ---- Combine kernel: live blocks + sink, in block order ----


@triton.jit
def _combine_kernel(
    PO, PM, PL, SINKS, POS, OUT, H, CAP, K, ratio, NWB,
    D: tl.constexpr, R: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_IDX: tl.constexpr,
    SB: tl.constexpr, DC: tl.constexpr,
):  # fmt: skip
    """Program (h, c): head h, dims c*DC.. . Recomputes which blocks the split kernel wrote
    (the same rules; live window blocks, then live compressed blocks) and merges them:
    o = sum_b e^(m_b - M) o_b / (e^(sink - M) + sum_b e^(m_b - M) l_b)."""
    h = tl.program_id(0)
    cols = tl.program_id(1) * DC + tl.arange(0, DC)
    pos = tl.load(POS).to(tl.int32)
    n_win = tl.minimum(pos // R + 1, NWB)
    n_comp = 0
    if HAS_ROWS:
        if HAS_IDX:
            n_comp = tl.cdiv(K, R)
        else:
            n_comp = tl.cdiv(tl.minimum((pos + 1) // ratio, CAP), R)
    total = n_win + n_comp
    sink = tl.load(SINKS + h)
    mx = sink
    for t0 in range(0, total, SB):
        t = t0 + tl.arange(0, SB)
        slot = tl.where(t < n_win, t, t - n_win + NWB)
        m = tl.load(PM + slot * H + h, mask=t < total, other=float("-inf"))
        mx = tl.maximum(mx, tl.max(m, 0))
    den = tl.exp(sink - mx)
    acc = tl.zeros([DC], tl.float32)
    for t0 in range(0, total, SB):
        t = t0 + tl.arange(0, SB)
        slot = tl.where(t < n_win, t, t - n_win + NWB)
        live = t < total
        w = tl.exp(tl.load(PM + slot * H + h, mask=live, other=float("-inf")) - mx)
        den += tl.sum(w * tl.load(PL + slot * H + h, mask=live, other=0.0), 0)
        o = tl.load(PO + (slot[:, None] * H + h) * D + cols[None, :], mask=live[:, None], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    tl.store(OUT + h * D + cols, acc / den)


# ---- Launcher ----

# (BH heads, R rows, warps) per program, largest first: the heuristic takes the largest that
# still gives half the SMs a program. H200 sweep (scripts/check_attend.py): a 64x64 program
# takes ~45 us, a 16x16 one ~8 us, so big tiles only pay when every SM has one (ratio-128 at
# 1M); 16x32 wins for ratio-4 layers (15.4 vs 18.9 us) and ratio-128 at 128K; 32x32 never won.
TILES = ((64, 64, 8), (64, 32, 8), (16, 32, 4), (16, 16, 4))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def attend_config(n_rows: int, window: int, n_head: int, device: torch.device) -> dict:
    """Tile for `n_rows` compressed rows read (capacity or len(idx)) plus the window ring."""
    if device.type != "cuda" or interpreting():
        return dict(BH=16, R=16, num_warps=4)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    for bh, r, nw in TILES:
        programs = (triton.cdiv(window, r) + triton.cdiv(n_rows, r)) * triton.cdiv(n_head, bh)
        if programs >= 0.5 * sms:
            return dict(BH=bh, R=r, num_warps=nw)
    return dict(BH=bh, R=r, num_warps=nw)  # the smallest tile


def _store_parts(rows, d: int) -> tuple[int, list[Tensor], int]:
    """(kind, pointer tensors, n_nope): 0 no rows, 1 float32 rows, 2 FP8 rows."""
    if rows is None:
        return 0, [], d
    if rows.width != d:
        raise ValueError(f"row store width {rows.width} != head dim {d}")
    if isinstance(rows, FP8Rows):
        if rows.n_nope % 64 or (d - rows.n_nope) % 64 or rows.n_nope == 0:
            raise ValueError(f"FP8 rows need n_nope and n_rot multiples of 64, got {rows.n_nope}")
        return 2, rows.parts, rows.n_nope
    if type(rows) is FloatRows:
        return 1, rows.parts, d
    raise ValueError(f"no attention kernel for row store {type(rows).__name__}")


def _check(q: Tensor, raw: Tensor, pos: Tensor, sinks: Tensor, idx: Tensor | None) -> None:
    if q.dtype != torch.float32 or q.dim() != 2 or q.shape[1] % 64:
        raise ValueError(
            f"q must be float32 [H, d] with d a multiple of 64, got {q.dtype} {q.shape}"
        )
    if raw.dtype != torch.float32 or raw.dim() != 2 or raw.shape[1] != q.shape[1]:
        raise ValueError(f"raw must be float32 [W, {q.shape[1]}], got {raw.dtype} {raw.shape}")
    if pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"pos must be an integer tensor [1], got {pos.dtype} {tuple(pos.shape)}")
    if sinks.shape != (q.shape[0],):
        raise ValueError(f"sinks must be [{q.shape[0]}], got {tuple(sinks.shape)}")
    if idx is not None and (idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"idx must be integer [k], got {idx.dtype} {tuple(idx.shape)}")
    for name, t in (("raw", raw), ("pos", pos), ("sinks", sinks), ("idx", idx)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def attend_decode(
    q: Tensor,
    raw: Tensor,
    pos: Tensor,
    rows: FloatRows | None,
    idx: Tensor | None,
    ratio: int,
    sinks: Tensor,
    config: dict | None = None,
) -> Tensor:
    """o [H, d] float32 for one query q [H, d] (after RoPE) at position pos (device [1]): softmax
    of q.row / sqrt(d) over the valid ring slots of raw [W, d], the visible compressed rows
    (rows `idx`, or all of them, below (pos+1)//ratio) and the per-head sink, times the rows.
    Sizes come from capacities only (no host sync): usable inside a CUDA graph."""
    _check(q, raw, pos, sinks, idx)
    H, d = q.shape
    W = raw.shape[0]
    kind, parts, nope = _store_parts(rows, d)
    if kind and ratio <= 0:
        raise ValueError(f"compressed rows need a positive ratio, got {ratio}")
    cap = rows.cap if kind else 0
    K = (idx.numel() if idx is not None else cap) if kind else 0
    if max(cap, W) * d >= 2**31:
        raise ValueError(f"{max(cap, W)} rows of {d} overflow the kernel's int32 offsets")
    cfg = config or attend_config(K, W, H, q.device)
    BH, R = cfg["BH"], cfg["R"]
    nwb, ncb = triton.cdiv(W, R), triton.cdiv(K, R)
    q, raw, sinks = q.contiguous(), raw.contiguous(), sinks.float().contiguous()
    parts = [p.contiguous() for p in parts] + [raw] * (3 - len(parts))
    po = torch.empty(nwb + ncb, H, d, device=q.device, dtype=torch.float32)
    pm = torch.empty(nwb + ncb, H, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    has_idx = kind > 0 and idx is not None
    _split_kernel[(nwb + ncb, triton.cdiv(H, BH))](
        q, raw, pos, *parts, idx if has_idx else pos, po, pm, pl,
        H, W, max(cap, 1), K, max(ratio, 1), 1 / math.sqrt(d), nwb,
        D=d, NOPE=nope, NROT=d - nope, STORE=kind, HAS_IDX=has_idx, BH=BH, R=R,
        num_warps=cfg["num_warps"], num_stages=1,
    )  # fmt: skip
    out = torch.empty(H, d, device=q.device, dtype=torch.float32)
    dc = 128 if d % 128 == 0 else 64
    _combine_kernel[(H, d // dc)](
        po, pm, pl, sinks, pos, out, H, max(cap, 1), K, max(ratio, 1), nwb,
        D=d, R=R, HAS_ROWS=kind > 0, HAS_IDX=has_idx,
        SB=min(32, triton.next_power_of_2(nwb + ncb)), DC=dc, num_warps=4,
    )  # fmt: skip
    return out


def attend_decode_ref(
    q: Tensor,
    raw: Tensor,
    pos: Tensor,
    rows: FloatRows | None,
    idx: Tensor | None,
    ratio: int,
    sinks: Tensor,
) -> Tensor:
    """The decode step's attention as model/decode.py defines it (`attend_step`)."""
    return attend_step(q, raw, pos, rows, idx, ratio, sinks)
