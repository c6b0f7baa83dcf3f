"""GGML block formats used by ds4 GGUF files, decoded with plain torch ops.

Owns: one small class per ggml type (F32, F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS, I32) with block
sizes and a torch dequantizer that matches gguf-py's numpy dequantizers bit for bit; `QTensor`, a
weight kept in its GGUF encoding; a Q8_0 quantizer; random valid blocks for synthetic weights.
Does not own: reading GGUF files (ds4py/gguf.py) or any matmul (ds4py/quant/ops.py).
Byte layouts follow MODEL.md §5.5; all multi-byte fields are little-endian.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as GQ

QK_K = 256

# ggml's iq2xxs_grid: 256 little-endian u64, byte k = magnitude of element k (0x08, 0x19 or 0x2b).
IQ2XXS_GRID = (
    0x0808080808080808, 0x080808080808082B, 0x0808080808081919, 0x0808080808082B08,
    0x0808080808082B2B, 0x0808080808190819, 0x0808080808191908, 0x08080808082B0808,
    0x08080808082B082B, 0x08080808082B2B08, 0x08080808082B2B2B, 0x0808080819080819,
    0x0808080819081908, 0x0808080819190808, 0x0808080819192B08, 0x08080808192B0819,
    0x08080808192B1908, 0x080808082B080808, 0x080808082B08082B, 0x080808082B082B2B,
    0x080808082B2B082B, 0x0808081908080819, 0x0808081908081908, 0x0808081908190808,
    0x0808081908191919, 0x0808081919080808, 0x080808192B081908, 0x080808192B192B08,
    0x0808082B08080808, 0x0808082B0808082B, 0x0808082B082B082B, 0x0808082B2B08082B,
    0x0808190808080819, 0x0808190808081908, 0x0808190808190808, 0x08081908082B0819,
    0x08081908082B1908, 0x0808190819080808, 0x080819081908082B, 0x0808190819082B08,
    0x08081908192B0808, 0x080819082B080819, 0x080819082B081908, 0x080819082B190808,
    0x080819082B2B1908, 0x0808191908080808, 0x080819190808082B, 0x0808191908082B08,
    0x08081919082B0808, 0x080819191908192B, 0x08081919192B2B19, 0x080819192B080808,
    0x080819192B190819, 0x0808192B08082B19, 0x0808192B08190808, 0x0808192B19080808,
    0x0808192B2B081908, 0x0808192B2B2B1908, 0x08082B0808080808, 0x08082B0808081919,
    0x08082B0808082B08, 0x08082B0808191908, 0x08082B08082B2B08, 0x08082B0819080819,
    0x08082B0819081908, 0x08082B0819190808, 0x08082B081919082B, 0x08082B082B082B08,
    0x08082B1908081908, 0x08082B1919080808, 0x08082B2B0808082B, 0x08082B2B08191908,
    0x0819080808080819, 0x0819080808081908, 0x0819080808190808, 0x08190808082B0819,
    0x0819080819080808, 0x08190808192B0808, 0x081908082B081908, 0x081908082B190808,
    0x081908082B191919, 0x0819081908080808, 0x0819081908082B08, 0x08190819082B0808,
    0x0819081919190808, 0x0819081919192B2B, 0x081908192B080808, 0x0819082B082B1908,
    0x0819082B19081919, 0x0819190808080808, 0x0819190808082B08, 0x08191908082B0808,
    0x08191908082B1919, 0x0819190819082B19, 0x081919082B080808, 0x0819191908192B08,
    0x08191919192B082B, 0x0819192B08080808, 0x0819192B0819192B, 0x08192B0808080819,
    0x08192B0808081908, 0x08192B0808190808, 0x08192B0819080808, 0x08192B082B080819,
    0x08192B1908080808, 0x08192B1908081919, 0x08192B192B2B0808, 0x08192B2B19190819,
    0x082B080808080808, 0x082B08080808082B, 0x082B080808082B2B, 0x082B080819081908,
    0x082B0808192B0819, 0x082B08082B080808, 0x082B08082B08082B, 0x082B0819082B2B19,
    0x082B081919082B08, 0x082B082B08080808, 0x082B082B0808082B, 0x082B190808080819,
    0x082B190808081908, 0x082B190808190808, 0x082B190819080808, 0x082B19081919192B,
    0x082B191908080808, 0x082B191919080819, 0x082B1919192B1908, 0x082B192B2B190808,
    0x082B2B0808082B08, 0x082B2B08082B0808, 0x082B2B082B191908, 0x082B2B2B19081908,
    0x1908080808080819, 0x1908080808081908, 0x1908080808190808, 0x1908080808192B08,
    0x19080808082B0819, 0x19080808082B1908, 0x1908080819080808, 0x1908080819082B08,
    0x190808081919192B, 0x19080808192B0808, 0x190808082B080819, 0x190808082B081908,
    0x190808082B190808, 0x1908081908080808, 0x19080819082B0808, 0x19080819192B0819,
    0x190808192B080808, 0x190808192B081919, 0x1908082B08080819, 0x1908082B08190808,
    0x1908082B19082B08, 0x1908082B1919192B, 0x1908082B192B2B08, 0x1908190808080808,
    0x1908190808082B08, 0x19081908082B0808, 0x190819082B080808, 0x190819082B192B19,
    0x190819190819082B, 0x19081919082B1908, 0x1908192B08080808, 0x19082B0808080819,
    0x19082B0808081908, 0x19082B0808190808, 0x19082B0819080808, 0x19082B0819081919,
    0x19082B1908080808, 0x19082B1919192B08, 0x19082B19192B0819, 0x19082B192B08082B,
    0x19082B2B19081919, 0x19082B2B2B190808, 0x1919080808080808, 0x1919080808082B08,
    0x1919080808190819, 0x1919080808192B19, 0x19190808082B0808, 0x191908082B080808,
    0x191908082B082B08, 0x1919081908081908, 0x191908191908082B, 0x191908192B2B1908,
    0x1919082B2B190819, 0x191919082B190808, 0x191919082B19082B, 0x1919191908082B2B,
    0x1919192B08080819, 0x1919192B19191908, 0x19192B0808080808, 0x19192B0808190819,
    0x19192B0808192B19, 0x19192B08192B1908, 0x19192B1919080808, 0x19192B2B08082B08,
    0x192B080808081908, 0x192B080808190808, 0x192B080819080808, 0x192B0808192B2B08,
    0x192B081908080808, 0x192B081919191919, 0x192B082B08192B08, 0x192B082B192B0808,
    0x192B190808080808, 0x192B190808081919, 0x192B191908190808, 0x192B19190819082B,
    0x192B19192B081908, 0x192B2B081908082B, 0x2B08080808080808, 0x2B0808080808082B,
    0x2B08080808082B2B, 0x2B08080819080819, 0x2B0808082B08082B, 0x2B08081908081908,
    0x2B08081908192B08, 0x2B08081919080808, 0x2B08082B08190819, 0x2B08190808080819,
    0x2B08190808081908, 0x2B08190808190808, 0x2B08190808191919, 0x2B08190819080808,
    0x2B081908192B0808, 0x2B08191908080808, 0x2B0819191908192B, 0x2B0819192B191908,
    0x2B08192B08082B19, 0x2B08192B19080808, 0x2B08192B192B0808, 0x2B082B080808082B,
    0x2B082B1908081908, 0x2B082B2B08190819, 0x2B19080808081908, 0x2B19080808190808,
    0x2B190808082B1908, 0x2B19080819080808, 0x2B1908082B2B0819, 0x2B1908190819192B,
    0x2B1908192B080808, 0x2B19082B19081919, 0x2B19190808080808, 0x2B191908082B082B,
    0x2B19190819081908, 0x2B19191919190819, 0x2B192B082B080819, 0x2B192B19082B0808,
    0x2B2B08080808082B, 0x2B2B080819190808, 0x2B2B08082B081919, 0x2B2B081908082B19,
    0x2B2B082B08080808, 0x2B2B190808192B08, 0x2B2B2B0819190808, 0x2B2B2B1908081908,
)  # fmt: skip


# ---- Byte helpers ----------------------------------------------------------------------------


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two little-endian bytes [..., 2] -> float32 [..., 1] (exact: every f16 is an f32)."""
    return b.contiguous().view(torch.float16).float()


def _u32(b: torch.Tensor) -> torch.Tensor:
    """Little-endian bytes [..., 4n] -> int64 [..., n] holding the unsigned 32-bit words."""
    # int64 because uint32 shifts are not implemented on every torch device.
    return b.contiguous().view(torch.int32).long() & 0xFFFFFFFF


def _shifts(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def iq2xxs_grid(device: torch.device | str = "cpu") -> torch.Tensor:
    """The IQ2_XXS magnitude grid as float32 [256, 8]."""
    words = torch.tensor(IQ2XXS_GRID, dtype=torch.int64, device=device)
    byte_shift = torch.arange(0, 64, 8, dtype=torch.int64, device=device)
    return ((words[:, None] >> byte_shift) & 0xFF).float()


def iq2xxs_signs(device: torch.device | str = "cpu") -> torch.Tensor:
    """ksigns: 7 stored sign bits -> 8 sign bits (bit 7 makes the count of minus signs even)."""
    idx = torch.arange(128, dtype=torch.int32, device=device)
    parity = torch.zeros_like(idx)
    for bit in range(7):
        parity ^= (idx >> bit) & 1
    return idx | (parity << 7)


# ---- Formats ---------------------------------------------------------------------------------


class Format:
    """One ggml type: `block_elems` values stored in `block_bytes` bytes."""

    qtype: GQ
    block_elems: int
    block_bytes: int
    float_dtype: torch.dtype | None = None  # plain float arrays (F32/F16/BF16) only

    @property
    def name(self) -> str:
        return self.qtype.name

    def dequantize(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 [..., nblocks*block_bytes] -> float32 [..., nblocks*block_elems]."""
        if raw.dtype != torch.uint8:
            raise ValueError(f"{self.name}: raw data must be uint8, got {raw.dtype}")
        if raw.ndim == 0 or raw.shape[-1] % self.block_bytes:
            raise ValueError(
                f"{self.name}: last dim {tuple(raw.shape)[-1:]} is not a multiple of "
                f"{self.block_bytes} bytes"
            )
        lead = raw.shape[:-1]
        blocks = raw.reshape(-1, self.block_bytes)
        return self._decode(blocks).reshape(*lead, -1)

    def _decode(self, blocks: torch.Tensor) -> torch.Tensor:
        """uint8 [N, block_bytes] -> float32 [N, block_elems]."""
        raise NotImplementedError


class _PlainFloat(Format):
    block_elems = 1

    def _decode(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(self.float_dtype).float()


class F32(_PlainFloat):
    qtype, block_bytes, float_dtype = GQ.F32, 4, torch.float32


class F16(_PlainFloat):
    qtype, block_bytes, float_dtype = GQ.F16, 2, torch.float16


class BF16(_PlainFloat):
    qtype, block_bytes, float_dtype = GQ.BF16, 2, torch.bfloat16


class I32(Format):
    """A plain int32 table (e.g. tid2eid); `dequantize` returns int32, not float."""

    qtype, block_elems, block_bytes = GQ.I32, 1, 4

    def _decode(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.int32)


class Q8_0(Format):
    """34 bytes: d (f16), 32 int8 q; w = d*q."""

    qtype, block_elems, block_bytes = GQ.Q8_0, 32, 34

    def _decode(self, blocks: torch.Tensor) -> torch.Tensor:
        d = _f16(blocks[:, 0:2])
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return q * d


class Q2_K(Format):
    """84 bytes: 16 scale bytes (lo nibble scale, hi nibble min), 64 bytes of 2-bit q, d, dmin."""

    qtype, block_elems, block_bytes = GQ.Q2_K, QK_K, 84

    def _decode(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        sc = blocks[:, 0:16].int()
        qs = blocks[:, 16:80].int()
        d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
        dl = (d * (sc & 0xF).float())[:, :, None]  # [N, 16, 1]
        ml = (dmin * (sc >> 4).float())[:, :, None]
        shift = _shifts([0, 2, 4, 6], blocks.device).view(1, 1, 4, 1)
        q = ((qs.view(n, 2, 1, 32) >> shift) & 3).reshape(n, 16, 16).float()
        return (dl * q - ml).reshape(n, QK_K)


class Q4_K(Format):
    """144 bytes: d, dmin, 12 bytes of packed 6-bit scales/mins, 128 bytes of 4-bit q."""

    qtype, block_elems, block_bytes = GQ.Q4_K, QK_K, 144

    @staticmethod
    def scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int [N, 12] -> (scales, mins), each int [N, 8]."""
        lo, mid, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
        sc = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], dim=1)
        mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
        return sc, mn

    def _decode(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = self.scales_mins(blocks[:, 4:16].int())
        dd = (d * sc.float())[:, :, None]  # [N, 8, 1]
        dm = (dmin * mn.float())[:, :, None]
        shift = _shifts([0, 4], blocks.device).view(1, 1, 2, 1)
        q = ((blocks[:, 16:144].int().view(n, 4, 1, 32) >> shift) & 0xF).reshape(n, 8, 32)
        return (dd * q.float() - dm).reshape(n, QK_K)


class IQ2_XXS(Format):
    """66 bytes: d (f16), then 8 groups of two u32 (grid indices; 4x7 sign bits + 4-bit scale)."""

    qtype, block_elems, block_bytes = GQ.IQ2_XXS, QK_K, 66

    def _decode(self, blocks: torch.Tensor) -> torch.Tensor:
        n, dev = blocks.shape[0], blocks.device
        d = _f16(blocks[:, 0:2])  # [N, 1]
        w = _u32(blocks[:, 2:66]).view(n, 8, 2)
        a, b = w[..., 0], w[..., 1]  # [N, 8]
        db = d * (0.5 + (b >> 28).float()) * 0.25
        sub = torch.arange(4, device=dev)
        grid_idx = (a[..., None] >> (8 * sub)) & 0xFF  # [N, 8, 4]
        sign_idx = (b[..., None] >> (7 * sub)) & 0x7F
        mask = iq2xxs_signs(dev)[sign_idx].long()  # [N, 8, 4]
        bits = (mask[..., None] >> torch.arange(8, device=dev)) & 1  # [N, 8, 4, 8]
        signs = torch.where(bits == 0, 1.0, -1.0)
        grid = iq2xxs_grid(dev)[grid_idx]  # [N, 8, 4, 8]
        return (db[..., None, None] * grid * signs).reshape(n, QK_K)


# a plain dict (read-only by convention): torch.compile traces lookups in it, not in a proxy
FORMATS: Mapping[GQ, Format] = dict(
    {f.qtype: f() for f in (F32, F16, BF16, I32, Q8_0, Q2_K, Q4_K, IQ2_XXS)}
)


def get_format(qtype: GQ | int) -> Format:
    try:
        return FORMATS[GQ(qtype)]
    except (KeyError, ValueError):
        raise ValueError(f"unsupported ggml type {qtype!r}") from None


def row_bytes(qtype: GQ | int, ncols: int) -> int:
    """Bytes of one row of `ncols` values."""
    fmt = get_format(qtype)
    if ncols % fmt.block_elems:
        raise ValueError(f"{fmt.name}: row length {ncols} is not a multiple of {fmt.block_elems}")
    return ncols // fmt.block_elems * fmt.block_bytes


# ---- QTensor ---------------------------------------------------------------------------------


# ---- Row-split layout -------------------------------------------------------------------------

# A GPU backend may regroup each row's bytes field by field ("split" layout: same bytes per row,
# so expert/row slicing still works): byte ranges of a block, in the order they are laid out.
# Wide aligned loads of the packed quants then need no per-block address arithmetic.
SPLIT_FIELDS: Mapping[GQ, tuple[tuple[int, int], ...]] = dict(
    {
        GQ.Q8_0: ((2, 34), (0, 2)),  # q (stored as q ^ 0x80: biased unsigned), d
        GQ.Q2_K: ((16, 80), (0, 16), (80, 84)),  # qs, scales, (d, dmin)
        GQ.Q4_K: ((16, 144), (4, 16), (0, 4)),  # qs, packed scales, (d, dmin)
        GQ.IQ2_XXS: ((2, 66), (0, 2)),  # 16 u32 words, d
    }
)


def split_rows(data: torch.Tensor, qtype: GQ) -> torch.Tensor:
    """GGUF block layout -> split layout (see SPLIT_FIELDS); same shape and byte count."""
    blocks = data.reshape(*data.shape[:-1], -1, FORMATS[qtype].block_bytes)
    parts = [blocks[..., a:b].flatten(-2) for a, b in SPLIT_FIELDS[qtype]]
    if qtype == GQ.Q8_0:
        parts[0] = parts[0] ^ 0x80
    return torch.cat(parts, dim=-1)


def join_rows(data: torch.Tensor, qtype: GQ) -> torch.Tensor:
    """Split layout -> GGUF block layout (inverse of `split_rows`)."""
    nb = data.shape[-1] // FORMATS[qtype].block_bytes
    blocks = torch.empty(*data.shape[:-1], nb, FORMATS[qtype].block_bytes, dtype=torch.uint8,
                         device=data.device)  # fmt: skip
    at = 0
    for i, (a, b) in enumerate(SPLIT_FIELDS[qtype]):
        part = data[..., at : at + nb * (b - a)].reshape(*data.shape[:-1], nb, b - a)
        blocks[..., a:b] = part ^ 0x80 if (qtype == GQ.Q8_0 and i == 0) else part
        at += nb * (b - a)
    return blocks.flatten(-2)


# ---- QTensor ---------------------------------------------------------------------------------


@dataclass
class QTensor:
    """A tensor kept in its GGUF encoding: `data` is uint8 [*shape[:-1], row_bytes].

    `layout` is "gguf" (blocks as in the file) or "split" (rows regrouped by a GPU backend at
    load, see `split_rows`); `dequantize` understands both.
    """

    data: torch.Tensor
    qtype: GQ
    shape: tuple[int, ...]
    layout: str = "gguf"

    def __post_init__(self) -> None:
        self.qtype = GQ(self.qtype)
        self.shape = tuple(int(s) for s in self.shape)
        if self.layout not in ("gguf", "split"):
            raise ValueError(f"unknown QTensor layout {self.layout!r}")
        if self.layout == "split" and self.qtype not in SPLIT_FIELDS:
            raise ValueError(f"{self.qtype.name} has no split layout")
        if self.data.dtype != torch.uint8:
            raise ValueError(f"QTensor data must be uint8, got {self.data.dtype}")
        if not self.shape:
            raise ValueError("QTensor needs at least one dimension")
        want = (*self.shape[:-1], row_bytes(self.qtype, self.shape[-1]))
        if tuple(self.data.shape) != want:
            raise ValueError(
                f"{self.qtype.name} tensor of shape {self.shape} needs data of shape {want}, "
                f"got {tuple(self.data.shape)}"
            )

    @classmethod
    def from_raw(cls, raw: torch.Tensor, qtype: GQ | int, shape: tuple[int, ...]) -> QTensor:
        """Wrap a flat (or any-shaped contiguous) byte buffer, e.g. a GGUF mmap view."""
        shape = tuple(int(s) for s in shape)
        rb = row_bytes(qtype, shape[-1])
        if raw.numel() != math.prod(shape[:-1]) * rb:
            raise ValueError(
                f"{GQ(qtype).name} {shape}: expected {math.prod(shape[:-1]) * rb} bytes, "
                f"got {raw.numel()}"
            )
        return cls(raw.reshape(*shape[:-1], rb), qtype, shape)

    @property
    def format(self) -> Format:
        return FORMATS[self.qtype]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values as a dense tensor of shape `shape`."""
        return self.format.dequantize(self.gguf_data()).reshape(self.shape).to(dtype)

    def gguf_data(self) -> torch.Tensor:
        """`data` in GGUF block layout (a copy when the tensor is split)."""
        return join_rows(self.data, self.qtype) if self.layout == "split" else self.data

    def split(self) -> QTensor:
        """This tensor in split layout (itself for formats without one)."""
        if self.layout == "split" or self.qtype not in SPLIT_FIELDS:
            return self
        return QTensor(split_rows(self.data, self.qtype), self.qtype, self.shape, "split")

    def __getitem__(self, idx) -> QTensor:
        """Index the leading dims (experts, rows); the last (packed) dim is never indexed."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis or i is None for i in idx) or len(idx) > len(self.shape) - 1:
            raise ValueError(f"QTensor {self.shape}: index {idx} must address leading dims only")
        data = self.data[idx]
        return QTensor(data, self.qtype, (*data.shape[:-1], self.shape[-1]), self.layout)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QTensor:
        data = self.data.to(device, non_blocking=non_blocking)
        return QTensor(data, self.qtype, self.shape, self.layout)

    def contiguous(self) -> QTensor:
        return QTensor(self.data.contiguous(), self.qtype, self.shape, self.layout)


# ---- Quantizers ------------------------------------------------------------------------------


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, computed the way gguf-py (and ggml's roundf) does."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """float [..., n] (n % 32 == 0) -> uint8 [..., n/32*34], bit-identical to gguf-py."""
    if x.shape[-1] % 32:
        raise ValueError(f"Q8_0: row length {x.shape[-1]} is not a multiple of 32")
    lead = x.shape[:-1]
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_away(blocks * inv).to(torch.int8)
    out = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=1)
    return out.reshape(*lead, -1)


def quantize(x: torch.Tensor, qtype: GQ | int) -> QTensor:
    """Encode a float tensor as F32, F16, BF16 or Q8_0 (the formats with a simple encoder)."""
    qtype = GQ(qtype)
    fmt = get_format(qtype)
    if fmt.float_dtype is not None:
        raw = x.to(fmt.float_dtype).contiguous().view(torch.uint8)
    elif qtype == GQ.Q8_0:
        raw = quantize_q8_0(x)
    else:
        raise ValueError(f"no encoder for {qtype.name}; use random_blocks for synthetic data")
    return QTensor(raw.reshape(*x.shape[:-1], -1), qtype, tuple(x.shape))


# ---- Random valid blocks ---------------------------------------------------------------------

# Rough std of a weight per unit of the block scale d for uniformly random payload bytes, so
# that random_blocks(scale=s) gives weights of std ~s.
_STD_PER_D = {GQ.Q8_0: 74.0, GQ.Q2_K: 13.0, GQ.Q4_K: 258.0, GQ.IQ2_XXS: 60.0}


def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def random_blocks(
    qtype: GQ | int,
    n_blocks: int,
    generator: torch.Generator | None = None,
    scale: float = 0.02,
) -> torch.Tensor:
    """uint8 [n_blocks, block_bytes] of valid blocks whose values have std roughly `scale`.

    Payload bytes are uniform; the f16 scales are positive, finite and vary by ~2x per block.
    The blocks are made on the generator's device (a CUDA generator fills GPU memory directly).
    """
    qtype = GQ(qtype)
    fmt = get_format(qtype)
    dev = generator.device if generator is not None else None
    if fmt.float_dtype is not None:
        vals = torch.randn(n_blocks, generator=generator, device=dev) * scale
        return vals.to(fmt.float_dtype).reshape(-1, 1).view(torch.uint8)
    if qtype not in _STD_PER_D:
        raise ValueError(f"random_blocks does not support {qtype.name}")
    raw = torch.randint(
        0, 256, (n_blocks, fmt.block_bytes), dtype=torch.uint8, generator=generator, device=dev
    )
    jitter = 0.7 + 0.6 * torch.rand(n_blocks, generator=generator, device=dev)
    d = jitter * (scale / _STD_PER_D[qtype])
    if qtype in (GQ.Q8_0, GQ.IQ2_XXS):
        raw[:, 0:2] = _f16_bytes(d)
    elif qtype == GQ.Q2_K:
        raw[:, 80:82], raw[:, 82:84] = _f16_bytes(d), _f16_bytes(d * 1.5)
    else:  # Q4_K: mins ~7.5x d centre the 0..15 codes times 0..63 scales
        raw[:, 0:2], raw[:, 2:4] = _f16_bytes(d), _f16_bytes(d * 7.5)
    return raw


def random_qtensor(
    qtype: GQ | int,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    scale: float = 0.02,
) -> QTensor:
    """A synthetic weight of `shape` (torch order) made of random valid blocks."""
    fmt = get_format(qtype)
    rb = row_bytes(qtype, shape[-1])
    n_blocks = math.prod(shape[:-1]) * rb // fmt.block_bytes
    return QTensor.from_raw(random_blocks(qtype, n_blocks, generator, scale), qtype, shape)
