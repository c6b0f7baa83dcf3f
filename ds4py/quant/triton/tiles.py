"""Shared Triton pieces: tables, bit tricks, and the k-order dequantized tile used by GEMMs.

Owns: the IQ2_XXS grid / sign tables as device tensors, int->float, dp4a and SwiGLU helpers, and
`dequant_tile`, which decodes rows of a *split-layout* weight (ds4py/quant/formats.py
`split_rows`) for columns k0..k0+BK into float32 [BN, BK] in column order (MODEL.md §5.5).
Does not own: decode-time dot products (rowdot.py) or any launch logic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as GQ

from ds4py.quant.formats import IQ2XXS_GRID, QTensor

SUPPORTED = (GQ.F32, GQ.F16, GQ.BF16, GQ.Q8_0, GQ.Q2_K, GQ.Q4_K, GQ.IQ2_XXS)
INT8_PATH = (GQ.Q2_K, GQ.Q4_K, GQ.IQ2_XXS)  # decode dots use int8 activations and dp4a


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def tables(device: torch.device | str) -> torch.Tensor:
    """int16 [1028]: IQ2_XXS tables. [0, 256): the grid as 2-bit codes (0, 1, 2 for magnitudes
    8, 25, 43; code k at bits 2k..2k+1), 512 bytes, so a warp's random lookups touch at most 4
    cache lines. Then, as int32 words (`tab32`): [0, 256) the grid as 4-bit codes (code k at
    bits 4k..4k+1, a `prmt` selector), [256, 384) per 7 sign bits the 8 signs (the eighth makes
    the count even) at bits 4k+2 of the selector, [384] the bytes 128 + (8, 25, 43) that the
    prefill selectors pick (a kernel reads it from memory so that ptxas keeps it in a register
    instead of rebuilding the constant before every permute)."""
    codes, nib = [], []
    for entry in IQ2XXS_GRID:
        c = [{8: 0, 25: 1, 43: 2}[(entry >> (8 * k)) & 0xFF] for k in range(8)]
        codes.append(sum(m << (2 * k) for k, m in enumerate(c)))
        nib.append(sum(m << (4 * k) for k, m in enumerate(c)))
    signs = []
    for f in range(128):
        s8 = f | ((bin(f).count("1") & 1) << 7)
        signs.append(sum(((s8 >> k) & 1) << (4 * k + 2) for k in range(8)))
    words = torch.tensor(nib + signs + [0x00AB9988], dtype=torch.int64).to(torch.int32)
    head = torch.tensor(codes, dtype=torch.int32).to(torch.int16)
    return torch.cat([head, words.view(torch.int16)]).to(device)


def kernel_ok(w: QTensor) -> bool:
    """Whether the kernels can read `w`: a supported type whose rows keep the 4-byte alignment
    of the word loads (IQ2_XXS rows of 256 values are 66 bytes: those go to the reference)."""
    return w.qtype in SUPPORTED and w.data.shape[-1] % 4 == 0


def prepared(w: QTensor) -> QTensor:
    """The layout the kernels read: split for block formats, contiguous."""
    return w.split().contiguous()


@triton.jit
def u2f(q):
    # int32 in [0, 2**23) -> float32 exactly; avoids the slow int->float convert
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def f16_at(ptr):
    return tl.load(ptr.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def clamped_swiglu(g, u, clamp):
    """ref.swiglu: silu(min(g, c)) * clamp(u, -c, c) (the decode and prefill expert kernels)."""
    g = tl.minimum(g, clamp)
    u = tl.minimum(tl.maximum(u, -clamp), clamp)
    return g * tl.sigmoid(g) * u


@triton.jit
def dp4a(a, b, EMULATE: tl.constexpr):
    """Sum of the four signed-byte products of int32 words a and b (broadcast together)."""
    a, b = tl.broadcast(a, b)
    if EMULATE:  # the interpreter runs no PTX; same integer result
        s = tl.zeros(a.shape, dtype=tl.int32)
        for j in tl.static_range(4):
            s += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)
    else:
        s = tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, 0;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1
        )
    return s


@triton.jit
def _codes_to_bytes(t):
    """Four 2-bit grid codes (bits 0..7 of t) -> four magnitude bytes 8 / 25 / 43."""
    y = (t & 0x0F) | ((t & 0xF0) << 12)
    z = (y & 0x00030003) | ((y & 0x000C000C) << 6)  # code k now at bits 8k..8k+1
    return 0x08080808 + 17 * z + ((z >> 1) & 0x01010101)  # no carries: every byte <= 43


@triton.jit
def _sign_bytes(nib):
    """Four sign bits -> (bytes 0x00 / 0x01, bytes 0x00 / 0xFF)."""
    ones = (nib * 0x00204081) & 0x01010101  # bit k -> bit 8k (the shifted copies never overlap)
    return ones, ones * 255


@triton.jit
def dp4a_add(a, b, c, EMULATE: tl.constexpr):
    """c + the four signed-byte products of int32 words a and b."""
    if EMULATE:
        s = c + dp4a(a, b, EMULATE)
    else:
        s = tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True,
            pack=1,
        )  # fmt: skip
    return s


@triton.jit
def dp4a_us(a, b, c, EMULATE: tl.constexpr):
    """c + the four products of the unsigned bytes of a with the signed bytes of b."""
    if EMULATE:
        s = c
        for j in tl.static_range(4):
            s += ((a >> (8 * j)) & 255) * ((b << (24 - 8 * j)) >> 24)
    else:
        s = tl.inline_asm_elementwise(
            "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True,
            pack=1,
        )  # fmt: skip
    return s


@triton.jit
def signed_mags(sel, EMULATE: tl.constexpr):
    """Four signed weight bytes from selector nibbles (code | sign << 2), code 0/1/2 for
    magnitudes 8/25/43: one byte permute of the constant pair (8, 25, 43 | -8, -25, -43)."""
    if EMULATE:
        out = tl.zeros(sel.shape, dtype=tl.int32)
        for k in tl.static_range(4):
            nib = (sel >> (4 * k)) & 7
            mag = tl.where((nib & 3) == 0, 8, tl.where((nib & 3) == 1, 25, 43))
            out |= (tl.where(nib >= 4, 256 - mag, mag) & 255) << (8 * k)
    else:
        out = tl.inline_asm_elementwise(
            "prmt.b32 $0, 0x002B1908, 0x00D5E7F8, $1;", "=r,r", [sel], dtype=tl.int32,
            is_pure=True, pack=1,
        )  # fmt: skip
    return out


@triton.jit
def iq2_octet_dot(a, bu, SUB: tl.constexpr, xlo, xhi, acc, tabs, EMULATE: tl.constexpr):
    """acc + dot of IQ2_XXS octet SUB (0..3) of groups with words A, B (bu: uint32) with the
    int8 activation words xlo, xhi: two table words OR into one `prmt` selector (code | sign
    << 2 per weight), which picks the signed magnitude bytes; no per-bit sign arithmetic."""
    tab32 = (tabs + 256).to(tl.pointer_type(tl.int32))
    sel = tl.load(tab32 + ((a >> (8 * SUB)) & 255))
    sel |= tl.load(tab32 + 256 + ((bu >> (7 * SUB)) & 127).to(tl.int32))
    acc = dp4a_add(signed_mags(sel, EMULATE), xlo, acc, EMULATE)
    return dp4a_add(signed_mags(sel >> 16, EMULATE), xhi, acc, EMULATE)


@triton.jit
def iq2_octet(a, bu, sub, tabs):
    """IQ2_XXS octet `sub` (0..3) of a 32-weight group with words A (grid indices) and B
    (signs, scale): two int32 words of four signed bytes each (weights 0-3 and 4-7 of the
    octet, before the group scale). Arithmetic instead of big lookup tables keeps the warp's
    loads on few cache lines."""
    code = tl.load(tabs + ((a >> (8 * sub)) & 255)).to(tl.int32) & 0xFFFF
    sidx = ((bu >> (7 * sub).to(tl.uint32)) & 127).to(tl.int32)
    par = sidx ^ (sidx >> 4)
    par = par ^ (par >> 2)
    par = par ^ (par >> 1)
    signs = sidx | ((par & 1) << 7)  # bit 7 makes the count of minus signs even
    one_lo, neg_lo = _sign_bytes(signs & 15)
    one_hi, neg_hi = _sign_bytes(signs >> 4)
    # byte-wise negate where the sign byte is 0xFF: (m ^ 0xFF) + 1, no carry since m <= 43
    lo = (_codes_to_bytes(code & 0xFF) ^ neg_lo) + one_lo
    hi = (_codes_to_bytes(code >> 8) ^ neg_hi) + one_hi
    return lo, hi


# ---- k-order tiles (GEMM) --------------------------------------------------------------------


@triton.jit
def _tile_float(w, row_off, k0, BK: tl.constexpr, DT: tl.constexpr):
    ptr = (w + row_off[:, None]).to(tl.pointer_type(DT)) + k0 + tl.arange(0, BK)[None, :]
    return tl.load(ptr).to(tl.float32)


@triton.jit
def _tile_q8_0(w, row_off, K, k0, BK: tl.constexpr):
    q = tl.load(w + row_off[:, None, None] + k0 + tl.arange(0, BK // 32)[None, :, None] * 32
                + tl.arange(0, 32)[None, None, :]).to(tl.int32)  # fmt: skip
    blk = k0 // 32 + tl.arange(0, BK // 32)
    d = f16_at(w + row_off[:, None] + K + 2 * blk[None, :])
    qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # stored q ^ 0x80 = q + 128
    t = qf * d[:, :, None]
    return tl.reshape(t, (row_off.shape[0], BK))


@triton.jit
def _tile_q4_k(w, row_off, K, k0, BK: tl.constexpr):
    sj = k0 // 32 + tl.arange(0, BK // 32)  # global 32-element sub-block
    b, j = sj // 8, sj % 8
    sc_base = w + row_off[:, None] + K // 2 + 12 * b[None, :]  # [BN, G]
    j4 = (j % 4)[None, :]
    a = tl.load(sc_base + j4).to(tl.int32)
    c = tl.load(sc_base + 4 + j4).to(tl.int32)
    e = tl.load(sc_base + 4 + j[None, :]).to(tl.int32)
    low = j[None, :] < 4
    sc = tl.where(low, a & 63, (e & 15) | ((a >> 6) << 4))
    mn = tl.where(low, c & 63, (e >> 4) | ((c >> 6) << 4))
    dm = w + row_off[:, None] + K // 2 + 12 * (K // 256) + 4 * b[None, :]
    scale = f16_at(dm) * sc.to(tl.float32)
    mins = f16_at(dm + 2) * mn.to(tl.float32)
    qoff = 128 * b + 32 * (j // 2)
    qb = tl.load(w + row_off[:, None, None] + qoff[None, :, None] + tl.arange(0, 32)[None, None, :])
    q = (qb.to(tl.int32) >> (4 * (j % 2))[None, :, None]) & 15
    t = scale[:, :, None] * u2f(q) - mins[:, :, None]
    return tl.reshape(t, (row_off.shape[0], BK))


@triton.jit
def _tile_q2_k(w, row_off, K, k0, BK: tl.constexpr):
    gs = k0 // 16 + tl.arange(0, BK // 16)  # global 16-element sub-block
    b, s = gs // 16, gs % 16
    sc = tl.load(w + row_off[:, None] + K // 4 + 16 * b[None, :] + s[None, :]).to(tl.int32)
    dm = w + row_off[:, None] + K // 4 + 16 * (K // 256) + 4 * b[None, :]
    scale = f16_at(dm) * (sc & 15).to(tl.float32)
    mins = f16_at(dm + 2) * (sc >> 4).to(tl.float32)
    # element 16s+l: byte 32*(s//8) + 16*(s%2) + l of the block's quants, bit plane (s%8)//2
    qoff = 64 * b + 32 * (s // 8) + 16 * (s % 2)
    qb = tl.load(w + row_off[:, None, None] + qoff[None, :, None] + tl.arange(0, 16)[None, None, :])
    q = (qb.to(tl.int32) >> (2 * ((s % 8) // 2))[None, :, None]) & 3
    t = scale[:, :, None] * u2f(q) - mins[:, :, None]
    return tl.reshape(t, (row_off.shape[0], BK))


@triton.jit
def _tile_iq2_xxs(w, tabs, row_off, K, k0, BK: tl.constexpr):
    go = k0 // 8 + tl.arange(0, BK // 8)  # global octet (8 weights share a grid entry)
    gg = go // 4  # global 32-weight group: words A, B at byte 8*gg of the row
    wbase = (w + row_off[:, None] + 8 * gg[None, :]).to(tl.pointer_type(tl.int32))
    a = tl.load(wbase)
    bu = tl.load(wbase + 1).to(tl.uint32, bitcast=True)
    db = f16_at(w + row_off[:, None] + K // 4 + 2 * (gg // 8)[None, :])
    db = db * (0.5 + (bu >> 28).to(tl.float32)) * 0.25
    lo, hi = iq2_octet(a, bu, (go % 4)[None, :], tabs)  # [BN, G] words of 4 signed bytes
    k4 = (8 * tl.arange(0, 4))[None, None, :]
    v_lo = ((lo[:, :, None] << (24 - k4)) >> 24).to(tl.float32)  # sign-extended bytes
    v_hi = ((hi[:, :, None] << (24 - k4)) >> 24).to(tl.float32)
    t = tl.join(v_lo, v_hi)  # [BN, G, 4, 2]: weight 4*h + k at [.., k, h]
    t = tl.permute(t, (0, 1, 3, 2)) * db[:, :, None, None]
    return tl.reshape(t, (row_off.shape[0], BK))


@triton.jit
def dequant_tile(w, tabs, row_off, K, k0, FMT: tl.constexpr, BK: tl.constexpr):
    """float32 [BN, BK]: rows at byte offsets `row_off`, columns k0 .. k0+BK (split layout)."""
    if FMT == 8:
        t = _tile_q8_0(w, row_off, K, k0, BK)
    elif FMT == 12:
        t = _tile_q4_k(w, row_off, K, k0, BK)
    elif FMT == 10:
        t = _tile_q2_k(w, row_off, K, k0, BK)
    elif FMT == 16:
        t = _tile_iq2_xxs(w, tabs, row_off, K, k0, BK)
    elif FMT == 1:
        t = _tile_float(w, row_off, k0, BK, tl.float16)
    elif FMT == 30:
        t = _tile_float(w, row_off, k0, BK, tl.bfloat16)
    else:
        t = _tile_float(w, row_off, k0, BK, tl.float32)
    return t


@triton.jit
def _dequant_kernel(w, tabs, out, K, RB, FMT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    t = dequant_tile(w, tabs, rows.to(tl.int64) * RB, K, k0, FMT, BK)
    dst = out + rows.to(tl.int64)[:, None] * K + k0 + tl.arange(0, BK)[None, :]
    tl.store(dst, t.to(out.dtype.element_ty))


def dequantize(w: QTensor, tabs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[*shape] in `dtype` through `dequant_tile` (rows of all leading dims at once): tests, and
    the long-chunk expert path, which multiplies bf16 copies of the experts."""
    if w.qtype not in SUPPORTED or len(w.shape) < 2:
        raise ValueError(f"dequantize: need a supported weight of >= 2 dims, got {w.qtype.name}")
    w = prepared(w)
    cols = w.shape[-1]
    data = w.data.reshape(-1, w.data.shape[-1])
    rows = data.shape[0]
    bn = 1
    while bn < 16 and rows % (bn * 2) == 0:
        bn *= 2
    bk = 256 if cols % 256 == 0 else 32
    out = torch.empty(rows, cols, dtype=dtype, device=w.device)
    _dequant_kernel[(rows // bn, cols // bk)](
        data, tabs, out, cols, data.shape[-1], FMT=int(w.qtype), BN=bn, BK=bk
    )
    return out.view(w.shape)
