"""Decode attention for one token: all heads over the raw window ring and the compressed rows.

Owns: `attend_decode` (two launches: a split kernel, then a combine kernel), its tiling
heuristic `attend_config`, and `attend_decode_ref`, the torch reference with the same signature
(decode.py's row groups and masks, then `model.attend`). The split kernel gives each program
BH heads and either one window block of R ring slots or NB blocks of R compressed rows; each
block is loaded once at full width and folded in with an online softmax, and the program writes
its max, sum and unnormalised output; the combine kernel merges the live slots and the sink in
a fixed order, so results are bit-identical run to run. Does not own the row stores (kv/state.py).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ds4py.kv.state import FloatRows, FP8Rows
from ds4py.model.model import attend
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


@triton.jit
def _e4m3(b, e):
    """E4M3 bytes b [R, 64] times 2**e [R, 1], exactly. The byte's magnitude bits placed in an
    F16 give the value * 2**-8 (subnormals included); the scale is built from its exponent."""
    x = b.to(tl.int32)
    h = (((x & 0x7F) << 7) | ((x & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True)
    return h.to(tl.float32) * ((e.to(tl.int32) + 135) << 23).to(tl.float32, bitcast=True)


# ---- Split kernel: blocks of rows x one block of heads ----
# Each row block is loaded once, at full width ([R, d] in one go, so one memory latency per
# block rather than one per 64-dim chunk), decoded exactly, and used for both the logits and the
# output product straight from registers.


@triton.jit
def _rows_f32(ROWS, rid, cols, D: tl.constexpr):
    return tl.load(ROWS + rid[:, None] * D + cols[None, :], mask=(cols < D)[None, :], other=0.0)


@triton.jit
def _rows_fp8(CODES, EXPS, ROPE, rid, cols, NOPE: tl.constexpr, NROT: tl.constexpr):
    """FP8Rows at ids rid as exact float32 [R, DP]: E4M3 dims with their exponents, then the
    F16 RoPE dims, zero past d."""
    nope = (cols < NOPE)[None, :]
    rot = ((cols >= NOPE) & (cols < NOPE + NROT))[None, :]
    b = tl.load(CODES + rid[:, None] * NOPE + cols[None, :], mask=nope, other=0)
    e = tl.load(EXPS + rid[:, None] * (NOPE // 64) + (cols // 64)[None, :], mask=nope, other=0)
    r = tl.load(ROPE + rid[:, None] * NROT + (cols - NOPE)[None, :], mask=rot, other=0.0)
    return tl.where(nope, _e4m3(b, e), r.to(tl.float32))


@triton.jit
def _block(qh, ql, v, valid, scale, m, l, o, EXACT: tl.constexpr):
    """One row block v [R, DP] folded into the running (max m, sum l, output o) of BH heads
    (online softmax). EXACT: v is TF32-exact (decoded FP8 rows), so only q and p are split."""
    vh = _tf32(v)
    vt = tl.trans(vh)
    s = tl.dot(qh, vt, input_precision="tf32")
    s2 = tl.dot(ql, vt, input_precision="tf32")
    if not EXACT:
        vl = _tf32(v - vh)
        s2 = tl.dot(qh, tl.trans(vl), s2, input_precision="tf32")
    s = tl.where(valid[None, :], (s + s2) * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid row yet: p = 0
    alpha = tl.exp(m - m_ref)
    p = tl.exp(s - m_ref[:, None])
    ph = _tf32(p)
    pl = _tf32(p - ph)
    pv = tl.dot(ph, vh, input_precision="tf32")
    pv2 = tl.dot(pl, vh, input_precision="tf32")
    if not EXACT:
        pv2 = tl.dot(ph, vl, pv2, input_precision="tf32")
    return m_new, l * alpha + tl.sum(p, 1), o * alpha[:, None] + (pv + pv2)


@triton.jit
def _split_kernel(
    Q, RAW, POS, C0, C1, C2, IDX, PO, PM, PL, H, W, CAP, K, ratio, scale, NWB, NB,
    D: tl.constexpr, DP: tl.constexpr, NOPE: tl.constexpr, NROT: tl.constexpr,
    STORE: tl.constexpr, HAS_IDX: tl.constexpr, BH: tl.constexpr, R: tl.constexpr,
):  # fmt: skip
    """Program (b, hb), heads hb*BH..: slot b < NWB is window block b (R ring slots); slot
    NWB + c covers compressed blocks c*NB .. c*NB+NB-1 (R rows each). Writes the slot's max, sum
    and unnormalised output; slots without a live row write nothing (the combine skips them)."""
    b = tl.program_id(0)
    hh = tl.program_id(1) * BH + tl.arange(0, BH)
    pos = tl.load(POS).to(tl.int32)
    r = tl.arange(0, R)
    cols = tl.arange(0, DP)
    hmask = hh < H
    qmask = hmask[:, None] & (cols < D)[None, :]
    m = tl.full([BH], float("-inf"), tl.float32)
    l = tl.zeros([BH], tl.float32)
    o = tl.zeros([BH, DP], tl.float32)
    live = False
    if b < NWB:
        j = b * R + r  # ring slot j holds position pos - (pos - j) % W: valid iff j <= pos
        if b * R <= pos:
            live = True
            q = tl.load(Q + hh[:, None] * D + cols[None, :], mask=qmask, other=0.0)
            qh = _tf32(q)
            v = _rows_f32(RAW, tl.minimum(j, W - 1), cols, D)
            m, l, o = _block(qh, _tf32(q - qh), v, (j <= pos) & (j < W), scale, m, l, o, False)
    elif STORE > 0:
        n = tl.minimum((pos + 1) // ratio, CAP)  # visible compressed rows
        count = K if HAS_IDX else n
        i0 = (b - NWB) * NB * R
        if i0 < count:
            live = True
            q = tl.load(Q + hh[:, None] * D + cols[None, :], mask=qmask, other=0.0)
            qh = _tf32(q)
            ql = _tf32(q - qh)
            for t in range(0, tl.minimum(NB, tl.cdiv(count - i0, R))):
                i = i0 + t * R + r
                if HAS_IDX:
                    ids = tl.load(IDX + i, mask=i < K, other=0).to(tl.int32)
                    valid = (i < K) & (ids >= 0) & (ids < n)
                else:
                    ids = i
                    valid = i < n
                rid = tl.minimum(tl.maximum(ids, 0), CAP - 1)  # every load in bounds
                if STORE == 1:
                    v = _rows_f32(C0, rid, cols, D)
                    m, l, o = _block(qh, ql, v, valid, scale, m, l, o, False)
                else:
                    v = _rows_fp8(C0, C1, C2, rid, cols, NOPE, NROT)
                    m, l, o = _block(qh, ql, v, valid, scale, m, l, o, True)
    if live:
        tl.store(PM + b * H + hh, m, mask=hmask)
        tl.store(PL + b * H + hh, l, mask=hmask)
        tl.store(PO + (b * H + hh[:, None]) * D + cols[None, :], o, mask=qmask)


# ---- Combine kernel: live blocks + sink, in block order ----


@triton.jit
def _combine_kernel(
    PO, PM, PL, SINKS, POS, OUT, H, CAP, K, ratio, NWB, RC,
    D: tl.constexpr, R: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_IDX: tl.constexpr,
    SB: tl.constexpr, DC: tl.constexpr,
):  # fmt: skip
    """Program (h, c): head h, dims c*DC.. . Recomputes which slots the split kernel wrote
    (the same rules; live window slots of R rows, then live compressed slots of RC rows) and
    merges them:
    o = sum_b e^(m_b - M) o_b / (e^(sink - M) + sum_b e^(m_b - M) l_b)."""
    h = tl.program_id(0)
    cols = tl.program_id(1) * DC + tl.arange(0, DC)
    pos = tl.load(POS).to(tl.int32)
    n_win = tl.minimum(pos // R + 1, NWB)
    n_comp = 0
    if HAS_ROWS:
        if HAS_IDX:
            n_comp = tl.cdiv(K, RC)
        else:
            n_comp = tl.cdiv(tl.minimum((pos + 1) // ratio, CAP), RC)
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

# (BH heads, R rows, warps) per program; a program folds NB row blocks of a long row set, so that
# about PER_SM programs per SM run and few partial outputs are written. Picked by the H200 sweep
# in scripts/check_attend.py.
TILE = (16, 16, 4)
PER_SM = 2


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def attend_config(n_rows: int, window: int, n_head: int, device: torch.device) -> dict:
    """Tile for `n_rows` compressed rows read (capacity or len(idx)) plus the window ring."""
    bh, r, nw = TILE
    if device.type != "cuda" or interpreting():
        return dict(BH=bh, R=r, NB=1, num_warps=nw)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    programs = triton.cdiv(n_rows, r) * triton.cdiv(n_head, bh)
    return dict(BH=bh, R=r, NB=max(1, programs // (PER_SM * sms)), num_warps=nw)


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
    BH, R, NB = cfg["BH"], cfg["R"], cfg.get("NB", 1)
    nwb, ncs = triton.cdiv(W, R), triton.cdiv(K, R * NB)
    q, raw, sinks = q.contiguous(), raw.contiguous(), sinks.float().contiguous()
    parts = [p.contiguous() for p in parts] + [raw] * (3 - len(parts))
    po = torch.empty(nwb + ncs, H, d, device=q.device, dtype=torch.float32)
    pm = torch.empty(nwb + ncs, H, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    has_idx = kind > 0 and idx is not None
    _split_kernel[(nwb + ncs, triton.cdiv(H, BH))](
        q, raw, pos, *parts, idx if has_idx else pos, po, pm, pl,
        H, W, max(cap, 1), K, max(ratio, 1), 1 / math.sqrt(d), nwb, NB,
        D=d, DP=triton.next_power_of_2(d), NOPE=nope, NROT=d - nope, STORE=kind,
        HAS_IDX=has_idx, BH=BH, R=R, num_warps=cfg["num_warps"], num_stages=1,
    )  # fmt: skip
    out = torch.empty(H, d, device=q.device, dtype=torch.float32)
    dc = 128 if d % 128 == 0 else 64
    _combine_kernel[(H, d // dc)](
        po, pm, pl, sinks, pos, out, H, max(cap, 1), K, max(ratio, 1), nwb, R * NB,
        D=d, R=R, HAS_ROWS=kind > 0, HAS_IDX=has_idx,
        SB=min(32, triton.next_power_of_2(nwb + ncs)), DC=dc, num_warps=4,
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
    """The decode step's attention as model/decode.py writes it: the ring with its validity mask,
    then the compressed rows (gathered by idx, or all) with the visibility mask, then attend."""
    W = raw.shape[0]
    slot = torch.arange(W, device=q.device)
    parts = [(raw, ((pos - (pos - slot) % W) >= 0)[None])]
    if rows is not None:
        cap = rows.cap
        visible = torch.arange(cap, device=q.device) < (pos + 1) // ratio
        if idx is None:
            parts.append((rows.get(cap), visible[None]))
        else:
            parts.append((rows.gather(idx), visible[idx][None]))
    return attend(q[None], parts, sinks)[0]
