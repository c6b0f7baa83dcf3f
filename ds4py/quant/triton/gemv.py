"""Decode GEMV: y[T, N] = x[T, (G,) K] @ W(N, K).T for 1..8 tokens, dequantizing on the fly.

Owns: the memory-bound small-batch matmul on split-layout weights (rowdot.py does the inner
step per format): two kernels, their tiling heuristics, the launcher and a torch reference of
the same signature. Grouped input (x [T, G, K]) feeds row block g of W with x[:, g] (§2.8).
One token of Q8_0/F16/BF16 (decode) runs `_rows_kernel` (R whole rows per program, 16-byte
weight loads issued before anything waits, programmatic dependent launch on Hopper), or for two
matrices of different formats that read one input `_rows_pair_kernel` (`gemv_pair`: one
launch); 2-8 tokens and F32/Q2_K/Q4_K/IQ2_XXS the tiled `_gemv_kernel`.
Numerics: F16/BF16/F32 in float32 FMA; one-token Q8_0 rounds x to int8 per 16 values first
(act.py `quantize16`, reference `round16`) and sums in dp4a, 2-8 tokens in float32; Q2_K/Q4_K/
IQ2_XXS use int8 activations per 32 (act.py). Does not own: prefill (gemm.py) or backend choice
(backend.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as GQ

from ds4py.quant import ref
from ds4py.quant.formats import QTensor
from ds4py.quant.triton.act import quantize16, quantize_act, round16
from ds4py.quant.triton.rowdot import (
    acc_groups,
    accumulate,
    half_dot,
    half_load,
    q8_dot,
    q8_load,
    quarters,
)
from ds4py.quant.triton.tiles import INT8_PATH, interpreting, kernel_ok, prepared

MAX_TOKENS = 8
WIDE = (GQ.Q8_0, GQ.F16, GQ.BF16)  # formats `_rows_kernel` reads


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


@triton.jit
def _q8_block(qt, bt, dt, w, row_off, K, R: tl.constexpr, BK: tl.constexpr,
              PIPE: tl.constexpr, PDL: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """[R] dots of Q8_0 rows with one token's rounded activations (act.py `quantize16`: words
    qt, -128 * sums bt, scales dt); PIPE loads the next step's weights before this one's dots."""
    NV: tl.constexpr = BK // 16
    acc = tl.zeros([R, NV], dtype=tl.float32)
    wt, d = q8_load(w, row_off, K, 0, NV)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the weights are constant: only x waits for its producer
    for k0 in range(0, K, BK):
        if PIPE:
            wn, dn = q8_load(w, row_off, K, k0 + BK, NV)
        run = k0 // 16 + tl.arange(0, NV)
        x0, x1, x2, x3 = quarters(tl.load(qt + 4 * run[:, None] + tl.arange(0, 4)[None, :]))
        acc += q8_dot(wt, d, x0, x1, x2, x3, tl.load(bt + run), tl.load(dt + run), EMULATE)
        if PIPE:
            wt, d = wn, dn
        else:
            wt, d = q8_load(w, row_off, K, k0 + BK, NV)
    return tl.sum(acc, axis=1)


@triton.jit
def _half_block(xt, w, row_off, K, DT: tl.constexpr, R: tl.constexpr, BK: tl.constexpr,
                PIPE: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """[R] dots of F16 / BF16 rows with one token (float32 FMA), loads as in `_q8_block`."""
    NV: tl.constexpr = BK // 8
    acc = tl.zeros([R, NV, 4], dtype=tl.float32)
    wt = half_load(w, row_off, K, 0, DT, NV)
    if PDL:
        tl.extra.cuda.gdc_wait()
    for k0 in range(0, K, BK):
        if PIPE:
            wn = half_load(w, row_off, K, k0 + BK, DT, NV)
        xp = xt + k0 + 8 * tl.arange(0, NV)[:, None] + tl.arange(0, 4)[None, :]
        acc = half_dot(acc, wt, tl.load(xp), tl.load(xp + 4))
        if PIPE:
            wt = wn
        else:
            wt = half_load(w, row_off, K, k0 + BK, DT, NV)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def rows_block(pid, x, xq, xb, xd, w, out, N, K, RB, RPG, XR, T, FMT: tl.constexpr,
               R: tl.constexpr, BK: tl.constexpr, PIPE: tl.constexpr, PDL: tl.constexpr,
               EMULATE: tl.constexpr):  # fmt: skip
    """Row block `pid` of `_rows_kernel` (also run by the routed-MoE down kernel)."""
    rows = pid * R + tl.arange(0, R)
    row_off = rows.to(tl.int64) * RB
    grp = (pid * R) // RPG  # input group of this row block
    for t in range(T):  # tokens after the first find the rows in L1/L2
        if FMT == 8:
            xr = t * (XR // K) + grp  # row of the rounded operands
            qt, bt, dt = xq + xr * (K // 4), xb + xr * (K // 16), xd + xr * (K // 16)
            dot = _q8_block(qt, bt, dt, w, row_off, K, R, BK, PIPE, PDL, EMULATE)
        elif FMT == 1:
            dot = _half_block(x + t * XR + grp * K, w, row_off, K, tl.float16, R, BK, PIPE, PDL)
        else:
            dot = _half_block(x + t * XR + grp * K, w, row_off, K, tl.bfloat16, R, BK, PIPE,
                              PDL)  # fmt: skip
        tl.store(out + t * N + rows, dot)


@triton.jit
def _rows_kernel(
    x, xq, xb, xd, w, out, N, K, RB, RPG, XR, T,
    FMT: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, PIPE: tl.constexpr,
    PDL: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    # R whole rows per program, 16-byte weight loads (one run of 16 quants / 8 halves per lane
    # and row per step), issued before anything waits on them. PDL (programmatic dependent
    # launch): the next kernel may start once every program has begun, and this one fetches
    # its (constant) weights before waiting for the kernel that wrote x.
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rows_block(tl.program_id(0), x, xq, xb, xd, w, out, N, K, RB, RPG, XR, T, FMT, R, BK, PIPE,
               PDL, EMULATE)  # fmt: skip


@triton.jit
def _rows_pair_kernel(
    x, xq, xb, xd, wa, outa, NA, RBA, wb, outb, NB, RBB, K, T, PA,
    FMT_A: tl.constexpr, R_A: tl.constexpr, BK_A: tl.constexpr, PIPE_A: tl.constexpr,
    FMT_B: tl.constexpr, R_B: tl.constexpr, BK_B: tl.constexpr, PIPE_B: tl.constexpr,
    PDL: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """`_rows_kernel` over two matrices of different formats and one input: programs below PA
    take A's row blocks, the rest B's (one launch instead of two small ones)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if pid < PA:
        rows_block(pid, x, xq, xb, xd, wa, outa, NA, K, RBA, NA, K, T, FMT_A, R_A, BK_A, PIPE_A,
                   PDL, EMULATE)  # fmt: skip
    else:
        rows_block(pid - PA, x, xq, xb, xd, wb, outb, NB, K, RBB, NB, K, T, FMT_B, R_B, BK_B,
                   PIPE_B, PDL, EMULATE)  # fmt: skip


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


def _rows_config(qtype: GQ, n: int, k: int, rows_per_group: int, pdl: bool) -> dict:
    """R, BK, warps, PIPE, PDL for `_rows_kernel` from the H200 sweeps (docs/PERFORMANCE.md).
    Q8_0: K <= 2048, 4096 / K rows per program and two runs of 16 quants per lane and step;
    longer K, one row, more warps until ~16K warps are in the grid, >= 1024 quants a step.
    F16: one row (four for K <= 1024), one run of 8 per lane, 8 warps below 2048 programs.
    The next step is prefetched when there is one. PDL only up to 16K programs: the head
    (126K programs) ran 13-25 % slower with it."""
    if interpreting():
        return dict(R=_pow2_divisor(rows_per_group, 64), BK=_pow2_divisor(k, 4096), num_warps=1)
    if qtype == GQ.Q8_0:
        if k <= 2048:
            r, nw, bk = _pow2_divisor(rows_per_group, 4096 // k), 1, _pow2_divisor(k, 1024)
        else:
            r, nw = 1, 1
            while nw < 4 and n * nw < 16384 and k % (1024 * nw) == 0:
                nw *= 2
            bk = _pow2_divisor(k, max(1024, 512 * nw))
    else:
        r = _pow2_divisor(rows_per_group, 4 if k <= 1024 else 1)
        nw = 1 if n // r >= 2048 else 8
        bk = _pow2_divisor(k, 256 * nw)
    return dict(R=r, BK=bk, num_warps=nw, PIPE=int(bk < k), PDL=int(pdl and n // r <= 16384))


def _wide(qtype: GQ, n_tok: int, k: int, cfg: dict | None) -> bool:
    """Whether `gemv` runs `_rows_kernel`: by default for one token (decode) of Q8_0 / F16 /
    BF16 rows of 256k values; 2-8 tokens keep the tiled kernel (weights decoded once for all
    tokens)."""
    return "R" in cfg if cfg else qtype in WIDE and n_tok == 1 and k % 256 == 0


def pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper and later, not in the interpreter."""
    return device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(
        device)[0] >= 9  # fmt: skip


def decode_config(qtype: GQ, n: int, k: int, rows_per_group: int, n_tok: int = 1,
                  pdl: bool = False) -> dict:  # fmt: skip
    """The tiling `gemv` uses for this weight type, shape and token count (`pdl`: with
    programmatic dependent launch, as gemv does on Hopper)."""
    if _wide(qtype, n_tok, k, None):
        return _rows_config(qtype, n, k, rows_per_group, pdl)
    return gemv_config(n, k, rows_per_group, n_tok, int8=qtype in INT8_PATH)


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


def act_operands(x2: torch.Tensor, int8: bool, interleave: int = 0,
                 pdl: bool = False) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(xq as int32 words, scales, 16-sums) for the int8 path, xq interleaved and the launch
    as quantize_act's options say; x itself as dummies otherwise."""
    if not int8:
        return x2, x2, x2
    xq, xs, xsum = quantize_act(x2, interleave, pdl)
    return xq.view(torch.int32), xs, xsum


def gemv(x: torch.Tensor, w: QTensor, tabs: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """x [T, K] or [T, G, K] float32 (T <= 8), w (N, K) -> [T, N] float32.

    `w` should come from `prepared` (split layout; converted here otherwise, slowly).
    `cfg` overrides the tiling heuristic (benchmarks): (R, BK, num_warps[, PIPE, PDL]) runs
    `_rows_kernel` (Q8_0 / F16 / BF16; Q8_0 with x rounded to int8 per 16 values first), and
    (BN, BK, num_warps) the tiled kernel (any format; float32 x for Q8_0)."""
    groups = _check(x, w)
    n_tok = x.shape[0]
    if not 1 <= n_tok <= MAX_TOKENS:
        raise ValueError(f"gemv: 1..{MAX_TOKENS} tokens, got {n_tok}")
    w = prepared(w)
    n, k = w.shape
    rpg = n // groups
    cfg = cfg or decode_config(w.qtype, n, k, rpg, n_tok, pdl=pdl_ok(x.device))
    out = torch.empty(n_tok, n, dtype=torch.float32, device=x.device)
    if "R" in cfg:
        r, bk = cfg["R"], cfg["BK"]
        if w.qtype not in WIDE or k % bk or rpg % r or bk % 256:
            raise ValueError(f"gemv: rows tile {r}x{bk} does not fit {w.qtype.name} {w.shape}")
        opts = {"PIPE": 0, "PDL": 0, **cfg}
        pdl = bool(opts["PDL"])
        xq = xb = xd = x
        if w.qtype == GQ.Q8_0:
            xq, xb, xd = quantize16(x.view(-1, k), pdl=pdl)
        _rows_kernel[(n // r,)](
            x, xq, xb, xd, w.data, out, n, k, w.data.shape[-1], rpg, groups * k, n_tok,
            FMT=int(w.qtype), EMULATE=interpreting(), launch_pdl=pdl, **opts,
        )  # fmt: skip
        return out
    int8 = w.qtype in INT8_PATH
    bn, bk = cfg["BN"], cfg["BK"]
    if k % bk or rpg % bn or (int8 and bk % 256):
        raise ValueError(f"gemv: tile {bn}x{bk} does not fit weight {w.shape}")
    xq, xs, xsum = act_operands(x.view(n_tok * groups, k), int8)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, xq, xs, xsum, w.data, tabs, out, n, k, w.data.shape[-1], rpg, groups * k,
        T=n_tok, FMT=int(w.qtype), AG=acc_groups(w.qtype, bk), EMULATE=interpreting(), **cfg,
    )  # fmt: skip
    return out


def pair_config(qa: GQ, na: int, qb: GQ, nb: int, k: int, pdl: bool = False) -> dict:
    """`gemv_pair`'s tiling: each side's rows per program as `_rows_config` picks them
    (several for short rows), K steps of 1024 Q8_0 / 256 F16-BF16 values per warp; 4-warp
    programs where both sides take one row (scripts/bench_gemv_decode.py --pairs: the ffn
    input 9.70 -> 9.02 us on an H100, the H200 within 0.3 us either way), else one warp (4
    warps lost 2.6-3.2 us on attn_q_b + indexer q_b, 4 rows per program)."""
    if interpreting():
        return dict(R_A=1, BK_A=_pow2_divisor(k, 4096), R_B=1, BK_B=_pow2_divisor(k, 4096),
                    num_warps=1, PDL=0)  # fmt: skip
    step = {GQ.Q8_0: 1024, GQ.F16: 256, GQ.BF16: 256}
    ra, rb = (_rows_config(q, n, k, n, False)["R"] for q, n in ((qa, na), (qb, nb)))
    nw = 4 if ra == rb == 1 else 1
    return dict(R_A=ra, BK_A=_pow2_divisor(k, step[qa] * nw), R_B=rb,
                BK_B=_pow2_divisor(k, step[qb] * nw), num_warps=nw, PDL=int(pdl))  # fmt: skip


def gemv_pair(x: torch.Tensor, wa: QTensor, wb: QTensor, tabs: torch.Tensor | None = None,
              cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(x @ wa.T, x @ wb.T) in one launch for x [T, K] float32 (T <= 8) and two matrices of
    different `_rows_kernel` formats (Q8_0 / F16 / BF16; a Q8_0 one rounds x to int8 per 16
    values first). `cfg` (R_A, BK_A, R_B, BK_B, num_warps, PDL) overrides pair_config."""
    for w in (wa, wb):
        _check(x, w)
        if w.qtype not in WIDE or x.ndim != 2:
            raise ValueError(f"gemv_pair: {w.qtype.name} {w.shape} with x {tuple(x.shape)}")
    if wa.qtype == wb.qtype:
        raise ValueError("gemv_pair: same formats: join the matrices instead")
    n_tok, k = x.shape
    if not 1 <= n_tok <= MAX_TOKENS:
        raise ValueError(f"gemv_pair: 1..{MAX_TOKENS} tokens, got {n_tok}")
    wa, wb = prepared(wa), prepared(wb)
    (na, _), (nb, _) = wa.shape, wb.shape
    cfg = cfg or pair_config(wa.qtype, na, wb.qtype, nb, k, pdl_ok(x.device))
    if any(n % cfg[r] or k % cfg[b] or cfg[b] % 256
           for n, r, b in ((na, "R_A", "BK_A"), (nb, "R_B", "BK_B"))):  # fmt: skip
        raise ValueError(f"gemv_pair: tiles {cfg} do not fit {wa.shape}, {wb.shape}")
    pdl = bool(cfg.get("PDL"))
    xq = xb = xd = x
    if GQ.Q8_0 in (wa.qtype, wb.qtype):
        xq, xb, xd = quantize16(x, pdl=pdl)
    ya = torch.empty(n_tok, na, dtype=torch.float32, device=x.device)
    yb = torch.empty(n_tok, nb, dtype=torch.float32, device=x.device)
    pa = na // cfg["R_A"]
    _rows_pair_kernel[(pa + nb // cfg["R_B"],)](
        x, xq, xb, xd, wa.data, ya, na, wa.data.shape[-1], wb.data, yb, nb, wb.data.shape[-1],
        k, n_tok, pa, FMT_A=int(wa.qtype), R_A=cfg["R_A"], BK_A=cfg["BK_A"],
        PIPE_A=int(cfg["BK_A"] < k), FMT_B=int(wb.qtype), R_B=cfg["R_B"], BK_B=cfg["BK_B"],
        PIPE_B=int(cfg["BK_B"] < k), PDL=int(pdl), EMULATE=interpreting(),
        num_warps=cfg["num_warps"], launch_pdl=pdl,
    )  # fmt: skip
    return ya, yb


def gemv_pair_ref(x: torch.Tensor, wa: QTensor, wb: QTensor, tabs: torch.Tensor | None = None,
                  cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Torch reference with gemv_pair's signature (x rounded per 16 values for Q8_0)."""
    return tuple(ref.linear(round16(x) if w.qtype == GQ.Q8_0 else x, w) for w in (wa, wb))


def gemv_ref(
    x: torch.Tensor, w: QTensor, tabs: torch.Tensor | None = None, cfg: dict | None = None
) -> torch.Tensor:
    """Torch reference with gemv's signature: float32 activations, rounded per 16 values where
    gemv's Q8_0 path does (`round16`: one token, or a rows tiling in `cfg`); the 2-4 bit
    formats' int8 rounding is the caller's."""
    int8 = w.qtype == GQ.Q8_0 and _wide(w.qtype, x.shape[0], w.shape[1], cfg)
    return ref.linear(round16(x) if int8 else x, w)
