"""Routed-expert FFN on GGUF-encoded expert tensors: decode (few tokens) and prefill (grouped).

Owns: out[t] = sum_i down[e] @ (w[t,i] * silu(min(gate[e] x, c)) * clamp(up[e] x, -c, c)),
e = ids[t,i]; launchers, kernels and a torch reference of the same signature. Decode: one launch
does every selected expert's gate+up+SwiGLU, a second one down row block per token summing its
k experts in slot order (per-format dots from rowdot.py; int8 activations for 2-4 bit experts).
Prefill: slots sorted by expert, grouped bf16 GEMMs. No float atomics anywhere, so results are
deterministic. Expert tensors are read in split layout. Does not own: routing (the model).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as GQ

from ds4py.quant import ref
from ds4py.quant.formats import QTensor, quantize
from ds4py.quant.triton.gemm import bf16_dot
from ds4py.quant.triton.gemv import act_operands, gemv_config
from ds4py.quant.triton.rowdot import acc_groups, accumulate
from ds4py.quant.triton.tiles import (
    INT8_PATH,
    dequant_tile,
    dequantize,
    f16_at,
    interpreting,
    iq2_octet_dot,
    kernel_ok,
    prepared,
)

# ---- Decode ----------------------------------------------------------------------------------


@triton.jit
def _clamped_swiglu(g, u, clamp):
    g = tl.minimum(g, clamp)
    u = tl.minimum(tl.maximum(u, -clamp), clamp)
    return g * tl.sigmoid(g) * u


@triton.jit
def _moe_gate_up_kernel(
    x, xq, xs, xsum, ids, wts, gate, up, tabs, h, F, D, RB, clamp,
    KTOP: tl.constexpr, FMT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    AG: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    slot = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    e = tl.load(ids + slot).to(tl.int64)
    row_off = (e * F + tl.minimum(rows, F - 1)) * RB
    t = (slot // KTOP).to(tl.int64)
    x, xq, xs, xsum = x + t * D, xq + t * (D // 4), xs + t * (D // 32), xsum + t * (D // 16)
    acc_g = tl.zeros([BN, AG], dtype=tl.float32)
    acc_u = tl.zeros([BN, AG], dtype=tl.float32)
    for k0 in range(0, D, BK):
        acc_g = accumulate(acc_g, gate, tabs, row_off, D, k0, x, xq, xs, xsum, FMT, BK, EMULATE)
        acc_u = accumulate(acc_u, up, tabs, row_off, D, k0, x, xq, xs, xsum, FMT, BK, EMULATE)
    g, u = tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1)
    hv = _clamped_swiglu(g, u, clamp) * tl.load(wts + slot)
    tl.store(h + slot.to(tl.int64) * F + rows, hv, mask=rows < F)


@triton.jit
def _iq2_row(w, tabs, row_off, D, gg, xsv, x0, x1, x2, x3, x4, x5, x6, x7,
             W64: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """Dot of one IQ2_XXS row (split layout) with the token's int8 activations; each thread
    takes whole 32-weight groups, so shifts are constants and the int sums chain in dp4a."""
    if W64:  # rows 8-byte aligned: words A and B in one load
        ab = tl.load((w + row_off).to(tl.pointer_type(tl.uint64)) + gg)
        a, bu = (ab & 0xFFFFFFFF).to(tl.int32), (ab >> 32).to(tl.uint32)
    else:
        wp = (w + row_off).to(tl.pointer_type(tl.int32)) + 2 * gg
        a, bu = tl.load(wp), tl.load(wp + 1).to(tl.uint32, bitcast=True)
    s = iq2_octet_dot(a, bu, 0, x0, x1, tl.zeros_like(a), tabs, EMULATE)
    s = iq2_octet_dot(a, bu, 1, x2, x3, s, tabs, EMULATE)
    s = iq2_octet_dot(a, bu, 2, x4, x5, s, tabs, EMULATE)
    s = iq2_octet_dot(a, bu, 3, x6, x7, s, tabs, EMULATE)
    s = s * (((bu >> 27) | 1).to(tl.int32))  # 2 * scale + 1; |s| < 2**23, exact as float
    d = f16_at(w + row_off + D // 4 + 2 * (gg // 8))
    return tl.sum(s.to(tl.float32) * d * xsv, axis=0) * 0.125


@triton.jit
def _moe_gate_up_iq2_kernel(
    xq, xs, ids, wts, gate, up, tabs, h, F, D, RB, clamp,
    KTOP: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
    W64: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    slot = tl.program_id(0)
    r0 = tl.program_id(1) * R
    e = tl.load(ids + slot).to(tl.int64)
    t = (slot // KTOP).to(tl.int64)
    gg = tl.arange(0, G)
    xw = xq + t * (D // 4) + 8 * gg
    x0, x1, x2, x3 = tl.load(xw), tl.load(xw + 1), tl.load(xw + 2), tl.load(xw + 3)
    x4, x5, x6, x7 = tl.load(xw + 4), tl.load(xw + 5), tl.load(xw + 6), tl.load(xw + 7)
    xsv = tl.load(xs + t * (D // 32) + gg)
    rr = tl.arange(0, R)
    out = tl.zeros([R], dtype=tl.float32)
    for r in tl.static_range(R):
        row_off = (e * F + r0 + r) * RB
        g = _iq2_row(gate, tabs, row_off, D, gg, xsv, x0, x1, x2, x3, x4, x5, x6, x7, W64,
                     EMULATE)  # fmt: skip
        u = _iq2_row(up, tabs, row_off, D, gg, xsv, x0, x1, x2, x3, x4, x5, x6, x7, W64,
                     EMULATE)  # fmt: skip
        out = tl.where(rr == r, _clamped_swiglu(g, u, clamp), out)
    tl.store(h + slot.to(tl.int64) * F + r0 + rr, out * tl.load(wts + slot))


@triton.jit
def _moe_down_kernel(
    h, hq, hs, hsum, ids, down, tabs, out, D, F, RB,
    KTOP: tl.constexpr, FMT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    AG: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rows_c = tl.minimum(rows, D - 1)
    acc = tl.zeros([BN, AG], dtype=tl.float32)
    for i in range(KTOP):  # slot order: the sum is deterministic
        slot = (t * KTOP + i).to(tl.int64)
        row_off = (tl.load(ids + slot).to(tl.int64) * D + rows_c) * RB
        hp, hqp, hsp = h + slot * F, hq + slot * (F // 4), hs + slot * (F // 32)
        hsump = hsum + slot * (F // 16)
        for k0 in range(0, F, BK):
            acc = accumulate(acc, down, tabs, row_off, F, k0, hp, hqp, hsp, hsump, FMT, BK,
                             EMULATE)  # fmt: skip
    tl.store(out + t.to(tl.int64) * D + rows, tl.sum(acc, axis=1), mask=rows < D)


def _check(x, ids, weights, gate, up, down) -> None:
    ref.check_moe(x, ids, weights, gate, up, down)
    for w in (gate, up, down):
        if not kernel_ok(w) or w.device != x.device:
            raise ValueError(f"moe: no kernel for expert tensor {w.qtype.name} {w.shape} here")
    if gate.qtype != up.qtype:
        raise ValueError(f"moe: gate {gate.qtype.name} and up {up.qtype.name} types differ")


def moe_decode(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: QTensor,
    up: QTensor,
    down: QTensor,
    clamp: float,
    tabs: torch.Tensor,
    cfg: dict | None = None,
) -> torch.Tensor:
    """Two launches (plus activation quantization for int8 formats); suited to a few tokens.

    `cfg` {"gate_up": gemv-style tile, "down": ...} overrides the tiling (benchmarks)."""
    _check(x, ids, weights, gate, up, down)
    gate, up, down = prepared(gate), prepared(up), prepared(down)
    n_tok, k = ids.shape
    _, n_ff, dim = gate.shape
    x, ids32, wts = x.contiguous(), ids.to(torch.int32).contiguous(), weights.contiguous()
    cfg = cfg or moe_decode_config(n_tok, k, n_ff, dim, int8=gate.qtype in INT8_PATH,
                                   qtype=gate.qtype)  # fmt: skip
    gu, dn = cfg["gate_up"], cfg["down"]
    if not _tiles_fit(gate.qtype, gu, n_ff, dim) or not _tiles_fit(down.qtype, dn, dim, n_ff):
        raise ValueError(f"moe_decode: tiles {cfg} do not fit experts {gate.shape}")
    h = torch.empty(n_tok * k, n_ff, dtype=torch.float32, device=x.device)
    xo = act_operands(x, gate.qtype in INT8_PATH)
    gate_up_launch(x, xo, ids32, wts, gate, up, tabs, h, clamp, gu)
    out = torch.empty(n_tok, dim, dtype=torch.float32, device=x.device)
    down_launch(h, act_operands(h, down.qtype in INT8_PATH), ids32, down, tabs, out, dn)
    return out


def gate_up_launch(x, xo, ids32, wts, gate, up, tabs, h, clamp, gu) -> None:
    """Launch 1 of moe_decode into h [slots, n_ff] (prepared experts; benchmarks time it)."""
    k, (_, n_ff, dim) = ids32.shape[1], gate.shape
    slots, emulate = ids32.numel(), interpreting()
    if "R" in gu:
        _moe_gate_up_iq2_kernel[(slots, n_ff // gu["R"])](
            xo[0], xo[1], ids32, wts, gate.data, up.data, tabs, h, n_ff, dim,
            gate.data.shape[-1], float(clamp), KTOP=k, G=dim // 32,
            W64=gate.data.shape[-1] % 8 == 0, EMULATE=emulate, **gu,
        )  # fmt: skip
    else:
        _moe_gate_up_kernel[(slots, n_ff // gu["BN"])](
            x, *xo, ids32, wts, gate.data, up.data, tabs, h, n_ff, dim, gate.data.shape[-1],
            float(clamp), KTOP=k, FMT=int(gate.qtype), AG=acc_groups(gate.qtype, gu["BK"]),
            EMULATE=emulate, **gu,
        )  # fmt: skip


def down_launch(h, ho, ids32, down, tabs, out, dn) -> None:
    """Launch 2 of moe_decode: out [T, dim] from h and its int8 operands ho."""
    (n_tok, k), (_, dim, n_ff) = ids32.shape, down.shape
    _moe_down_kernel[(n_tok, dim // dn["BN"])](
        h, *ho, ids32, down.data, tabs, out, dim, n_ff, down.data.shape[-1], KTOP=k,
        FMT=int(down.qtype), AG=acc_groups(down.qtype, dn["BK"]), EMULATE=interpreting(), **dn,
    )  # fmt: skip


def _tiles_fit(qtype: GQ, c: dict, rows: int, cols: int) -> bool:
    if "R" in c:  # the IQ2_XXS gate/up kernel: whole rows, one 32-weight group per lane
        g = cols // 32
        return qtype == GQ.IQ2_XXS and cols % 256 == 0 and g & (g - 1) == 0 and rows % c["R"] == 0
    int8_ok = qtype not in INT8_PATH or c["BK"] % 256 == 0
    return cols % c["BK"] == 0 and int8_ok and rows % c["BN"] == 0


def moe_decode_config(n_tok: int, k: int, n_ff: int, dim: int, tile: int | None = None,
                      num_warps: int | None = None, int8: bool = True,
                      qtype: GQ | None = None) -> dict:  # fmt: skip
    """gemv's heuristic with the slot/token grid dimension counted; IQ2_XXS gate/up experts of
    a power-of-two width get their own kernel (R rows per program)."""
    gate_up = gemv_config(n_ff * n_tok * k, dim, n_ff, 1, tile, num_warps, int8)
    iq2 = dict(R=4, num_warps=1)  # H200 sweep: scripts/bench_moe_decode.py
    # not in the interpreter: its cost grows with the unrolled rows (tests launch it directly)
    if (
        qtype == GQ.IQ2_XXS
        and tile is None
        and not interpreting()
        and _tiles_fit(qtype, iq2, n_ff, dim)
    ):
        gate_up = iq2
    down = gemv_config(dim * n_tok, n_ff, dim, 1, tile, num_warps, int8)
    return dict(gate_up=gate_up, down=down)


# ---- Prefill ---------------------------------------------------------------------------------


@triton.jit
def _tile_rows(tiles, r, BM: tl.constexpr):
    """Sorted-slot rows of tile r: (expert, rows [BM], valid mask [BM])."""
    e = tl.load(tiles + 3 * r).to(tl.int64)
    start = tl.load(tiles + 3 * r + 1)
    rows = start + tl.arange(0, BM)
    return e, rows, rows < tl.load(tiles + 3 * r + 2)


@triton.jit
def _grouped_gate_up_kernel(
    xb, order, wts, tiles, gate, up, tabs, h, F, D, RB, clamp,
    KTOP: tl.constexpr, FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    e, rows, valid = _tile_rows(tiles, tl.program_id(0), BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    row_off = (e * F + tl.minimum(rn, F - 1)) * RB
    slot = tl.load(order + rows, mask=valid, other=0)
    xrow = xb + (slot // KTOP).to(tl.int64)[:, None] * D
    kk = tl.arange(0, BK)
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        a = tl.load(xrow + k0 + kk[None, :])
        wg = dequant_tile(gate, tabs, row_off, D, k0, FMT, BK).to(tl.bfloat16)
        acc_g = bf16_dot(a, tl.trans(wg), acc_g, EMULATE)
        wu = dequant_tile(up, tabs, row_off, D, k0, FMT, BK).to(tl.bfloat16)
        acc_u = bf16_dot(a, tl.trans(wu), acc_u, EMULATE)
    hv = _clamped_swiglu(acc_g, acc_u, clamp) * tl.load(wts + slot, mask=valid, other=0)[:, None]
    hmask = valid[:, None] & (rn[None, :] < F)
    tl.store(h + rows.to(tl.int64)[:, None] * F + rn[None, :], hv.to(tl.bfloat16), mask=hmask)


@triton.jit
def _grouped_down_kernel(
    h, tiles, down, tabs, y, D, F, RB,
    FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EMULATE: tl.constexpr,
):  # fmt: skip
    e, rows, valid = _tile_rows(tiles, tl.program_id(0), BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    row_off = (e * D + tl.minimum(rn, D - 1)) * RB
    hrow = h + tl.where(valid, rows, 0).to(tl.int64)[:, None] * F
    kk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, F, BK):
        a = tl.load(hrow + k0 + kk[None, :])
        wt = dequant_tile(down, tabs, row_off, F, k0, FMT, BK).to(tl.bfloat16)
        acc = bf16_dot(a, tl.trans(wt), acc, EMULATE)
    ymask = valid[:, None] & (rn[None, :] < D)
    tl.store(y + rows.to(tl.int64)[:, None] * D + rn[None, :], acc, mask=ymask)


def expert_tiles(ids: torch.Tensor, n_exp: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort slots by expert: (order [S] slot per sorted row, tiles int32 [n, 3] of
    (expert, first sorted row, end row)), one tile per BM rows of each used expert."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_exp)
    starts = torch.cumsum(counts, 0) - counts
    n_tiles = (counts + bm - 1) // bm
    tile_exp = torch.repeat_interleave(torch.arange(n_exp, device=ids.device), n_tiles)
    first_tile = torch.cumsum(n_tiles, 0) - n_tiles
    local = torch.arange(tile_exp.numel(), device=ids.device) - first_tile[tile_exp]
    row0 = starts[tile_exp] + local * bm
    tiles = torch.stack([tile_exp, row0, starts[tile_exp] + counts[tile_exp]], dim=1)
    return order.to(torch.int32), tiles.to(torch.int32).contiguous()


def moe_prefill_config(n_slots: int, n_exp: int) -> dict:
    """Tiles from the H100 sweep; token tiles sized to the rows an expert gets on average."""
    big = n_slots > 48 * n_exp  # ~rows per expert under balanced routing
    return dict(BM=256 if big else 64, BN_GU=64, BN_DOWN=128, BK=64,
                num_warps=8 if big else 4, num_stages=3)  # fmt: skip


def moe_prefill(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: QTensor,
    up: QTensor,
    down: QTensor,
    clamp: float,
    tabs: torch.Tensor,
    cfg: dict | None = None,
    dense_group: int = 0,
) -> torch.Tensor:
    """Grouped bf16 GEMMs over slots sorted by expert (h kept in bf16 between the two).

    `dense_group` > 0: dequantize that many experts at a time to bf16 copies and multiply
    those (for long chunks: decoding 2-bit tiles once per token tile costs more than the
    copies). `cfg` (BM, BN_GU, BN_DOWN, BK, num_warps, num_stages) overrides the tiling."""
    _check(x, ids, weights, gate, up, down)
    gate, up, down = prepared(gate), prepared(up), prepared(down)
    n_tok, k = ids.shape
    n_exp, n_ff, dim = gate.shape
    if dim % 64 or n_ff % 64:
        raise ValueError(f"moe_prefill: expert dims {n_ff}, {dim} must be multiples of 64")
    cfg = cfg or moe_prefill_config(n_tok * k, n_exp)
    order, tiles = expert_tiles(ids, n_exp, cfg["BM"])  # one host sync: the grid size
    n_slots = n_tok * k
    xb, wts = x.to(torch.bfloat16), weights.reshape(-1).contiguous()
    h = torch.empty(n_slots, n_ff, dtype=torch.bfloat16, device=x.device)
    y = torch.empty(n_slots, dim, dtype=torch.float32, device=x.device)
    if dense_group <= 0:
        _grouped(xb, order, wts, tiles, (gate, up, down), h, y, k, clamp, tabs, cfg)
    else:
        tile_exp = tiles[:, 0].cpu()
        for e0 in range(0, n_exp, dense_group):
            e1 = min(e0 + dense_group, n_exp)
            pick = ((tile_exp >= e0) & (tile_exp < e1)).nonzero().view(-1)
            if pick.numel() == 0:
                continue
            sub = tiles[pick.to(tiles.device)]
            sub[:, 0] -= e0
            mats = tuple(_bf16_experts(w, e0, e1, tabs) for w in (gate, up, down))
            _grouped(xb, order, wts, sub, mats, h, y, k, clamp, tabs, cfg)
    per_slot = torch.empty_like(y)
    per_slot[order.long()] = y  # back to (token, slot) order; a permutation, so deterministic
    return per_slot.view(n_tok, k, dim).sum(dim=1)


def _bf16_experts(w: QTensor, e0: int, e1: int, tabs: torch.Tensor) -> QTensor:
    part = QTensor(w.data[e0:e1], w.qtype, (e1 - e0, *w.shape[1:]), w.layout)
    return quantize(dequantize(part, tabs, torch.bfloat16), GQ.BF16)


def _grouped(xb, order, wts, tiles, mats, h, y, k, clamp, tabs, cfg) -> None:
    """Both grouped launches over `tiles` (expert ids relative to the `mats` given)."""
    gate, up, down = mats
    n_ff, dim = gate.shape[1], gate.shape[2]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], EMULATE=interpreting())
    n_tiles, bm, bk = tiles.shape[0], cfg["BM"], cfg["BK"]
    _grouped_gate_up_kernel[(n_tiles, triton.cdiv(n_ff, cfg["BN_GU"]))](
        xb, order, wts, tiles, gate.data, up.data, tabs, h, n_ff, dim, gate.data.shape[-1],
        float(clamp), KTOP=k, FMT=int(gate.qtype), BM=bm, BN=cfg["BN_GU"], BK=bk, **launch,
    )  # fmt: skip
    _grouped_down_kernel[(n_tiles, triton.cdiv(dim, cfg["BN_DOWN"]))](
        h, tiles, down.data, tabs, y, dim, n_ff, down.data.shape[-1],
        FMT=int(down.qtype), BM=bm, BN=cfg["BN_DOWN"], BK=bk, **launch,
    )  # fmt: skip


def moe_ref(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: QTensor,
    up: QTensor,
    down: QTensor,
    clamp: float,
    tabs: torch.Tensor | None = None,
    cfg: dict | None = None,
    dense_group: int = 0,
) -> torch.Tensor:
    """Torch reference with the launchers' signature (float32 throughout)."""
    return ref.moe(x, ids, weights, gate, up, down, clamp)
