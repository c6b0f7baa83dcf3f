"""Fused decode step of one KV compressor (MODEL.md §2.6): one launch per compressor per token.

Owns the kernel, its launcher `compress_decode` and the torch reference `compress_decode_ref`
(decode.py's `compress_row`, after the two projections): window update, softmax pooling, RMS
norm, RoPE of the last dims and the store's round trip (FP8 / Hadamard + FP4 / float) into row
pos // ratio. Programs pool slices of columns (a ratio-128 window is 512 KB: one SM would take
microseconds to read it); the last one to arrive finishes the row. Does not own the
projections, the RoPE angles (cos/sin come in) or the store layouts (ds4py/kv/state.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ds4py.kv.state import CompressorState, FloatRows, FP4Rows, FP8Rows
from ds4py.model.decode import pool_step
from ds4py.model.model import _pow2_ceil, e2m1_round, fp8_row, rms_norm, rotate

Tensor = torch.Tensor

BC = 32  # pooled columns per program: <= 32 KB of a ratio-128 window each, in one round trip
FLOAT, FP8, FP4 = 0, 1, 2  # store kinds (the kernel's MODE)

# ---- Number formats, exact with integer ops (the interpreter has no fp8) ----


@triton.jit
def _pow2(n):
    """2**n as float32 for int32 n in [-126, 127]."""
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _ceil_log2(t):
    """ceil(log2(t)) for positive normal float32 t (model._pow2_ceil's exponent)."""
    bits = t.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def _e4m3(v):
    """E4M3 byte (round to nearest even, sign kept on zeros) of |v| <= 448, and its value."""
    bits = v.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    k = tl.maximum(((mag >> 23) & 0xFF) - 127, -6)  # binade; below 2**-6 the step is 2**-9
    f = mag.to(tl.float32, bitcast=True) * _pow2(3 - k)  # in steps of the binade: [0, 16]
    n = (f + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000  # the add rounds half to even
    code = ((k + 7) << 3) + n - 8  # n = 16 carries into the next binade, n < 8 is subnormal
    val = n.to(tl.float32) * _pow2(k - 3)
    neg = bits < 0
    return tl.where(neg, code | 0x80, code), tl.where(neg, -val, val)


@triton.jit
def _e2m1(v):
    """E2M1 nibble (ties to the even code, as model.e2m1_round) of |v| <= 6, and its value."""
    m = tl.abs(v)
    # grid 0 .5 1 1.5 2 3 4 6: a midpoint goes up only when the upper code is the even one
    code = (m > 0.25).to(tl.int32) + (m >= 0.75).to(tl.int32) + (m > 1.25).to(tl.int32)
    code += (m >= 1.75).to(tl.int32) + (m > 2.5).to(tl.int32) + (m >= 3.5).to(tl.int32)
    code += (m > 5.0).to(tl.int32)
    g = tl.where(code < 4, code.to(tl.float32) * 0.5, (code - 2).to(tl.float32))
    g = tl.where(code == 7, 6.0, g)
    neg = v < 0
    return tl.where(neg, code | 8, code), tl.where(neg, -g, g)


@triton.jit
def _fp8_blocks(ye, yo):
    """fp8_sim on rows of 64 held as even/odd halves [NB, 32]: codes, exponents [NB], values."""
    amax = tl.maximum(tl.max(tl.abs(ye), 1), tl.max(tl.abs(yo), 1))
    e = _ceil_log2(tl.div_rn(tl.maximum(amax, 1e-4), 448.0))
    # fp8_sim's clamp to +-448 never binds on finite rows: the scale covers the block max
    down, up = _pow2(-e)[:, None], _pow2(e)[:, None]
    ce, ve = _e4m3(ye * down)
    co, vo = _e4m3(yo * down)
    return ce, co, e, ve * up, vo * up


@triton.jit
def _fp4_blocks(ye, yo):
    """The E2M1 round trip on rows of 32 held as even/odd halves [NB, 16] (fp4_sim after the
    Hadamard): nibbles, exponents [NB], values."""
    amax = tl.maximum(tl.max(tl.abs(ye), 1), tl.max(tl.abs(yo), 1))
    e = _ceil_log2(tl.div_rn(tl.maximum(amax, 6 * 2.0**-126), 6.0))
    down, up = _pow2(-e)[:, None], _pow2(e)[:, None]  # (the clamp to +-6 never binds either)
    ce, ve = _e2m1(ye * down)
    co, vo = _e2m1(yo * down)
    return ce, co, e, ve * up, vo * up


# ---- The step ----


@triton.jit
def _pool(
    A, B, APE, CKV, CSC, PKV, PSC, cols, slot, closed,
    R: tl.constexpr, W: tl.constexpr, COFF: tl.constexpr,
):  # fmt: skip
    """pool_step for the pooled columns `cols` [BC/2, 2]: writes the token into the window (and,
    as it closes, the window into the previous one); returns the softmax-pooled values."""
    CW: tl.constexpr = COFF * W
    i = tl.arange(0, R)[:, None, None]
    c = cols[None]
    here = i == slot
    hi = cols + (COFF - 1) * W  # the open window's column (at ratio 4, in its second half)
    kv_new = tl.load(A + hi)
    sc_new = tl.load(B + hi) + tl.load(APE + slot * CW + hi)
    kv = tl.where(here, kv_new[None], tl.load(CKV + i * CW + hi[None]))
    sc = tl.where(here, sc_new[None], tl.load(CSC + i * CW + hi[None]))
    if COFF == 2:  # the previous window's first halves pool with this window's second halves
        pkv = tl.load(PKV + i * CW + c)
        psc = tl.load(PSC + i * CW + c)
        lo_kv_new = tl.load(A + cols)
        lo_sc_new = tl.load(B + cols) + tl.load(APE + slot * CW + cols)
        lo_kv = tl.where(here, lo_kv_new[None], tl.load(CKV + i * CW + c))
        lo_sc = tl.where(here, lo_sc_new[None], tl.load(CSC + i * CW + c))
        m = tl.maximum(tl.max(psc, 0), tl.max(sc, 0))
        pe = tl.exp(psc - m[None])
        e = tl.exp(sc - m[None])
        num = tl.sum(pe * pkv, 0) + tl.sum(e * kv, 0)
        den = tl.sum(pe, 0) + tl.sum(e, 0)
    else:
        e = tl.exp(sc - tl.max(sc, 0)[None])
        num = tl.sum(e * kv, 0)
        den = tl.sum(e, 0)
    tl.debug_barrier()  # every read of the old window is done before it is overwritten
    tl.store(CKV + slot * CW + hi, kv_new)
    tl.store(CSC + slot * CW + hi, sc_new)
    if COFF == 2:
        tl.store(CKV + slot * CW + cols, lo_kv_new)
        tl.store(CSC + slot * CW + cols, lo_sc_new)
        shut = tl.where(closed, (i < R) & (c >= 0), False)  # the window closes with this token
        tl.store(PKV + i * CW + c, lo_kv, mask=shut)
        tl.store(PSC + i * CW + c, lo_sc, mask=shut)
        tl.store(PKV + i * CW + hi[None], kv, mask=shut)
        tl.store(PSC + i * CW + hi[None], sc, mask=shut)
    return tl.div_rn(num, den)


@triton.jit
def _rope(xe, xo, ev, COS, SIN, W: tl.constexpr, N_ROT: tl.constexpr):
    """Rotate the pairs (xe, xo) whose even column ev lies in the last N_ROT dims."""
    rot = ev >= W - N_ROT
    t = tl.where(rot, (ev - (W - N_ROT)) // 2, 0)
    c = tl.load(COS + t, mask=rot, other=1.0)
    s = tl.load(SIN + t, mask=rot, other=0.0)
    return tl.where(rot, xe * c - xo * s, xe), tl.where(rot, xe * s + xo * c, xo)


@triton.jit
def _inv_rms(ss, eps, W: tl.constexpr):
    return tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(ss, W * 1.0) + eps))


@triton.jit
def _store_fp8(ye, yo, OUT0, OUT1, OUT2, k, W: tl.constexpr, N_ROT: tl.constexpr):
    """FP8Rows.write(k, fp8_row(y)) for y held as even/odd halves [W/64, 32] of rows of 64."""
    N_NOPE: tl.constexpr = W - N_ROT
    ev = 64 * tl.arange(0, W // 64)[:, None] + 2 * tl.arange(0, 32)[None, :]
    nope = ev < N_NOPE
    _, _, _, ve, vo = _fp8_blocks(ye, yo)
    ce, co, e, _, _ = _fp8_blocks(ve, vo)  # the store re-encodes the round-tripped row
    tl.store(OUT0 + k * N_NOPE + ev, ce.to(tl.uint8), mask=nope)
    tl.store(OUT0 + k * N_NOPE + ev + 1, co.to(tl.uint8), mask=nope)
    nb = tl.arange(0, W // 64)
    tl.store(OUT1 + k * (N_NOPE // 64) + nb, e.to(tl.int8), mask=nb < N_NOPE // 64)
    r = ev - N_NOPE
    tl.store(OUT2 + k * N_ROT + r, ye.to(tl.float16), mask=r >= 0)
    tl.store(OUT2 + k * N_ROT + r + 1, yo.to(tl.float16), mask=r >= 0)


@triton.jit
def _store_fp4(ye, yo, OUT0, OUT1, k, W: tl.constexpr):
    """FP4Rows.write(k, y's E2M1 round trip) for the Hadamard-transformed row y held as
    even/odd halves [W/32, 16] of rows of 32."""
    _, _, _, ve, vo = _fp4_blocks(ye, yo)
    ce, co, e, _, _ = _fp4_blocks(ve, vo)  # the store re-encodes the round-tripped row
    byte = 16 * tl.arange(0, W // 32)[:, None] + tl.arange(0, 16)[None, :]
    tl.store(OUT0 + k * (W // 2) + byte, (ce | (co << 4)).to(tl.uint8))
    tl.store(OUT1 + k * (W // 32) + tl.arange(0, W // 32), e.to(tl.int8))


@triton.jit
def _finish_row(
    WORK, NORM, COS, SIN, OUT0, OUT1, OUT2, k, eps,
    W: tl.constexpr, N_ROT: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    """Norm, RoPE and the float or FP8 store of the pooled row (in WORK) at row k."""
    ev = 64 * tl.arange(0, W // 64)[:, None] + 2 * tl.arange(0, 32)[None, :]
    xe = tl.load(WORK + ev, cache_modifier=".cg")  # .cg: other programs wrote these
    xo = tl.load(WORK + ev + 1, cache_modifier=".cg")
    rs = _inv_rms(tl.sum(tl.sum(xe * xe, 1) + tl.sum(xo * xo, 1), 0), eps, W)
    ye = xe * rs * tl.load(NORM + ev)
    yo = xo * rs * tl.load(NORM + ev + 1)
    ye, yo = _rope(ye, yo, ev, COS, SIN, W, N_ROT)
    if MODE == 0:
        tl.store(OUT0 + k * W + ev, ye)
        tl.store(OUT0 + k * W + ev + 1, yo)
    else:
        _store_fp8(ye, yo, OUT0, OUT1, OUT2, k, W, N_ROT)


@triton.jit
def _hadamard_part(
    pooled, cols, WORK, NORM, COS, SIN, HAD, pid, W: tl.constexpr, N_ROT: tl.constexpr
):  # fmt: skip
    """This program's rows of the Hadamard product, rope(x * norm)[cols] @ H[cols, :]; the
    1/rms factor is one scalar for the whole row, applied to the sum of the parts."""
    xe, xo = tl.split(pooled)
    ce, co = tl.split(cols)
    ue, uo = _rope(xe * tl.load(NORM + ce), xo * tl.load(NORM + co), ce, COS, SIN, W, N_ROT)
    oc = tl.arange(0, W)[None, :]
    z = tl.sum(ue[:, None] * tl.load(HAD + ce[:, None] * W + oc), 0)
    z += tl.sum(uo[:, None] * tl.load(HAD + co[:, None] * W + oc), 0)
    tl.store(WORK + W + pid * W + tl.arange(0, W), z)


@triton.jit
def _finish_fp4(WORK, OUT0, OUT1, k, eps, W: tl.constexpr, NPROG: tl.constexpr):
    """Sum the programs' Hadamard parts, scale by 1/rms, E2M1 round trip, packed store."""
    ev = 32 * tl.arange(0, W // 32)[:, None] + 2 * tl.arange(0, 16)[None, :]
    z = WORK + W + tl.arange(0, NPROG)[:, None, None] * W + ev[None]
    ze = tl.sum(tl.load(z, cache_modifier=".cg"), 0)  # .cg: other programs wrote these
    zo = tl.sum(tl.load(z + 1, cache_modifier=".cg"), 0)
    x = tl.load(WORK + tl.arange(0, W), cache_modifier=".cg")
    rs = _inv_rms(tl.sum(x * x, 0), eps, W)
    _store_fp4(ze * rs, zo * rs, OUT0, OUT1, k, W)


@triton.jit
def _compress_kernel(
    A, B, APE, POS, CKV, CSC, PKV, PSC, NORM, COS, SIN, HAD, OUT0, OUT1, OUT2, WORK, COUNT,
    cap, eps,
    R: tl.constexpr, W: tl.constexpr, COFF: tl.constexpr, N_ROT: tl.constexpr,
    NPROG: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pos = tl.load(POS)
    slot = (pos % R).to(tl.int32)
    closed = (pos + 1) % R == 0
    BC: tl.constexpr = W // NPROG
    cols = pid * BC + 2 * tl.arange(0, BC // 2)[:, None] + tl.arange(0, 2)[None, :]  # pairs
    pooled = _pool(A, B, APE, CKV, CSC, PKV, PSC, cols, slot, closed, R, W, COFF)
    tl.store(WORK + cols, pooled)
    if MODE == 2:
        _hadamard_part(pooled, cols, WORK, NORM, COS, SIN, HAD, pid, W, N_ROT)
    last = True
    if NPROG > 1:  # the last program to arrive (a ticket, not an order) finishes the row
        tl.debug_barrier()
        last = tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu") == NPROG - 1
    if last:
        k = pos // R
        if k < cap:  # a position past the store's capacity writes nothing
            if MODE == 2:
                _finish_fp4(WORK, OUT0, OUT1, k, eps, W, NPROG)
            else:
                _finish_row(WORK, NORM, COS, SIN, OUT0, OUT1, OUT2, k, eps, W, N_ROT, MODE)
        if NPROG > 1:
            tl.store(COUNT, 0)  # every program has taken its ticket: ready for the next call


# ---- Launcher ----


@torch.compiler.disable  # launched as written, also inside compiled regions
def compress_decode(
    a: Tensor,
    b: Tensor,
    ape: Tensor,
    pos: Tensor,
    fr: CompressorState,
    norm: Tensor,
    eps: float,
    cos: Tensor,
    sin: Tensor,
    rows: FloatRows,
    hadamard: Tensor | None,
    sim: bool | None = None,
) -> None:
    """Feed one token to one compressor and (re)write row pos // ratio of `rows`; in place.

    a, b [1, coff*w]: the token's kv and gate projections (b without ape); ape [ratio, coff*w];
    pos [1] int64 (device); fr: the compressor's frontier; norm [w]; cos, sin [n_rot/2]: the
    RoPE of position (pos // ratio) * ratio; rows: FP8Rows, FP4Rows (hadamard [w, w]) or
    FloatRows; sim (decode.compress_row's quant_sim flag), if given, must match the store's
    kind: compact stores are the quant_sim ones. No host sync, so CUDA-graph safe; but the
    first call on a device allocates the programs' arrival counter: it must not be captured.
    """
    r, cw = fr.cur_kv.shape
    w = cw // (2 if r == 4 else 1)
    n_rot = 2 * cos.numel()
    mode = _store_mode(rows, sim)
    parts = _store_parts(rows, mode, w, n_rot, hadamard)
    _check(a, b, ape, pos, fr, norm, cos, sin, parts[0], r, w, n_rot)
    nprog = w // BC
    work = torch.empty(w * (1 + nprog * (mode == FP4)), dtype=torch.float32, device=a.device)
    parts = parts + [parts[0]] * (3 - len(parts))  # unused outputs: any pointer
    _compress_kernel[(nprog,)](
        a,
        b,
        ape,
        pos,
        *fr.tensors(),
        norm,
        cos,
        sin,
        norm if hadamard is None else hadamard,
        *parts,
        work,
        _counter(a.device),
        rows.cap,
        eps,
        R=r,
        W=w,
        COFF=2 if r == 4 else 1,
        N_ROT=n_rot,
        NPROG=nprog,
        MODE=mode,
        num_warps=4,
    )


def _store_mode(rows: FloatRows, sim: bool | None) -> int:
    mode = FP8 if isinstance(rows, FP8Rows) else FP4 if isinstance(rows, FP4Rows) else FLOAT
    if mode == FLOAT and type(rows) is not FloatRows:
        raise ValueError(f"unknown row store {type(rows).__name__}")
    if sim is not None and sim != (mode != FLOAT):
        raise ValueError(f"quant_sim={sim} does not match a {type(rows).__name__} store")
    return mode


def _store_parts(rows: FloatRows, mode: int, w: int, n_rot: int, hadamard) -> list[Tensor]:
    if rows.width != w:
        raise ValueError(f"row store width {rows.width} != compressor width {w}")
    if mode == FP8 and rows.width - rows.n_nope != n_rot:
        raise ValueError(f"FP8 store keeps {rows.width - rows.n_nope} RoPE dims, not {n_rot}")
    if mode == FP4:
        if hadamard is None or hadamard.shape != (w, w) or hadamard.dtype != torch.float32:
            raise ValueError(f"an FP4 store needs the float32 [{w}, {w}] Hadamard matrix")
        if not hadamard.is_contiguous() or hadamard.device != rows.parts[0].device:
            raise ValueError("the Hadamard matrix must be contiguous, on the store's device")
    if any(p.device != rows.parts[0].device or not p.is_contiguous() for p in rows.parts):
        raise ValueError("row store parts must be contiguous, on one device")
    return list(rows.parts)


def _check(a, b, ape, pos, fr, norm, cos, sin, out, r: int, w: int, n_rot: int) -> None:
    cw = fr.cur_kv.shape[1]
    if r & (r - 1) or w & (w - 1) or w < 2 * BC:
        raise ValueError(f"ratio {r} and width {w} must be powers of two (width >= {2 * BC})")
    if n_rot % 64 or not 0 < n_rot <= w:
        raise ValueError(f"n_rot {n_rot} must be a positive multiple of 64 up to the width {w}")
    want = {"a": (1, cw), "b": (1, cw), "ape": (r, cw), "norm": (w,), "cos": (n_rot // 2,)}
    want |= {"sin": (n_rot // 2,)}
    given = {"a": a, "b": b, "ape": ape, "norm": norm, "cos": cos, "sin": sin}
    for t in fr.tensors():
        if t.shape != (r, cw) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"compressor state tensors must be float32 contiguous [{r}, {cw}]")
    for name, t in given.items():
        if tuple(t.shape) != want[name] or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name}: expected float32 contiguous {list(want[name])}")
    if pos.shape != (1,) or pos.dtype != torch.int64:
        raise ValueError("pos: expected an int64 tensor [1]")
    if any(t.device != a.device for t in (b, ape, pos, norm, cos, sin, fr.cur_kv, out)):
        raise ValueError("all tensors must be on one device")


@functools.cache
def _counter(device: torch.device) -> Tensor:
    """int32 [1]: how many programs of the running call have pooled their columns. The last
    one resets it, so one counter serves every call issued in order on the device's stream."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("compress_decode: run it once outside CUDA-graph capture first")
    return torch.zeros(1, dtype=torch.int32, device=device)


# ---- Reference: decode.py's compress_row ----


def compress_decode_ref(
    a: Tensor,
    b: Tensor,
    ape: Tensor,
    pos: Tensor,
    fr: CompressorState,
    norm: Tensor,
    eps: float,
    cos: Tensor,
    sin: Tensor,
    rows: FloatRows,
    hadamard: Tensor | None,
    sim: bool | None = None,
) -> None:
    """compress_decode in torch, as decode.compress_row: pool_step, rms_norm, rotate, the
    store's round trip (FP8 row, or Hadamard + FP4 with the matrix given), write."""
    mode = _store_mode(rows, sim)
    row = rotate(rms_norm(pool_step(a, b, ape, pos, fr), norm, eps), cos[None], sin[None])
    if mode == FP8:
        row = fp8_row(row, rows.n_nope, rows.width - rows.n_nope)
    elif mode == FP4:
        row = fp4_ref(row, hadamard)
    rows.write(pos // fr.ratio, row)


def fp4_ref(x: Tensor, hadamard: Tensor) -> Tensor:
    """model.fp4_sim with the Hadamard matrix given (the model's is hadamard_matrix(w))."""
    y = (x @ hadamard).unflatten(-1, (x.shape[-1] // 32, 32))
    s = _pow2_ceil(y.abs().amax(-1, keepdim=True).clamp_min(6 * 2.0**-126) / 6)
    return (e2m1_round((y / s).clamp(-6, 6)) * s).flatten(-2)
