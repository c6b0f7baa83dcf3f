"""The KV state of one timeline: per-layer tensors the model reads and appends (MODEL.md §3.5).

Per layer: the raw sliding window (a ring of `window` K=V rows), the compressed rows (ratio 4 or
128) and, on ratio-4 layers, the indexer rows, plus each compressor's frontier (the tokens of the
open window, and for ratio 4 the last closed window whose A halves the next row pools).
Owns sizes, copies for checkpoints and the byte layout of these tensors; it does not know the
session payload header (`engine.py`) or files (`kv/store.py`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Shape

Tensor = torch.Tensor


@dataclass
class CompressorState:
    """Frontier of one compressor: rows of the open window (+ the last closed one for ratio 4)."""

    ratio: int
    cur_kv: Tensor  # [ratio, coff*w]; row i = token at window offset i
    cur_score: Tensor
    prev_kv: Tensor  # [ratio, coff*w]; last closed window (score -inf before the first)
    prev_score: Tensor

    @classmethod
    def empty(cls, ratio: int, width: int, device) -> CompressorState:
        z = torch.zeros(ratio, width, device=device)
        ninf = torch.full((ratio, width), float("-inf"), device=device)
        return cls(ratio, z, ninf.clone(), z.clone(), ninf)

    def advance(self, A: Tensor, B: Tensor, n_full: int) -> None:
        """A, B: projections of the tokens from the open window's start; n_full windows closed."""
        r = self.ratio
        if n_full:  # in place: a captured decode graph holds these tensors
            self.prev_kv.copy_(A[(n_full - 1) * r : n_full * r])
            self.prev_score.copy_(B[(n_full - 1) * r : n_full * r])
        rest = A.shape[0] - n_full * r
        self.cur_kv[:rest] = A[n_full * r :]
        self.cur_score[:rest] = B[n_full * r :]

    def tensors(self) -> list[Tensor]:
        return [self.cur_kv, self.cur_score, self.prev_kv, self.prev_score]

    def copy(self) -> CompressorState:
        return CompressorState(self.ratio, *(t.clone() for t in self.tensors()))

    def load(self, other: CompressorState) -> None:
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine.copy_(theirs)


# ---- Row stores: how compressed rows are kept ----


class FloatRows:
    """Rows kept as float32 (quant_sim off: the cache is exactly what the model computed)."""

    def __init__(self, cap: int, width: int, device):
        self.width = width
        self.parts = [torch.zeros(cap, width, device=device)]

    def encode(self, rows: Tensor) -> list[Tensor]:
        return [rows]

    def decode(self, parts: list[Tensor]) -> Tensor:
        return parts[0]

    def put(self, at: int, rows: Tensor) -> None:
        self.write(torch.arange(at, at + rows.shape[0], device=rows.device), rows)

    def write(self, idx: Tensor, rows: Tensor) -> None:
        """Store rows at row indices idx (a device tensor, so it works inside a CUDA graph)."""
        for part, value in zip(self.parts, self.encode(rows), strict=True):
            part[idx] = value

    def get(self, n: int) -> Tensor:
        return self.decode([p[:n] for p in self.parts])

    def gather(self, idx: Tensor) -> Tensor:
        return self.decode([p[idx] for p in self.parts])

    @property
    def cap(self) -> int:
        return self.parts[0].shape[0]

    def grow(self, cap: int) -> None:
        self.parts = [
            torch.cat((p, p.new_zeros(cap - p.shape[0], *p.shape[1:]))) for p in self.parts
        ]

    @property
    def row_bytes(self) -> int:
        return sum(p[0].numel() * p.element_size() for p in self.parts)


class FP8Rows(FloatRows):
    """K=V rows after the FP8 round trip, stored as what they are: E4M3 bytes and a power-of-two
    exponent per 64 no-RoPE dims, plus the RoPE dims in F16. Lossless for quant_sim rows."""

    def __init__(self, cap: int, width: int, n_rot: int, device):
        self.width, self.n_nope = width, width - n_rot
        self.parts = [
            torch.zeros(cap, self.n_nope, dtype=torch.uint8, device=device),
            torch.zeros(cap, self.n_nope // 64, dtype=torch.int8, device=device),
            torch.zeros(cap, n_rot, dtype=torch.float16, device=device),
        ]

    def encode(self, rows: Tensor) -> list[Tensor]:
        nope = rows[:, : self.n_nope].unflatten(-1, (-1, 64))
        e = _pow2_exp(nope.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448)
        q = torch.ldexp(nope, -e).to(torch.float8_e4m3fn).flatten(1).view(torch.uint8)
        return [q, e.squeeze(-1).to(torch.int8), rows[:, self.n_nope :].half()]

    def decode(self, parts: list[Tensor]) -> Tensor:
        q = parts[0].view(torch.float8_e4m3fn).float().unflatten(-1, (-1, 64))
        nope = torch.ldexp(q, parts[1].int()[..., None]).flatten(1)
        return torch.cat((nope, parts[2].float()), dim=1)


class FP4Rows(FloatRows):
    """Indexer rows after the FP4 round trip: two E2M1 codes per byte, an exponent per 32."""

    def __init__(self, cap: int, width: int, device):
        self.width = width
        self.parts = [
            torch.zeros(cap, width // 2, dtype=torch.uint8, device=device),
            torch.zeros(cap, width // 32, dtype=torch.int8, device=device),
        ]

    def encode(self, rows: Tensor) -> list[Tensor]:
        blk = rows.unflatten(-1, (-1, 32))
        e = _pow2_exp(blk.abs().amax(-1, keepdim=True).clamp_min(6 * 2.0**-126) / 6)
        v = torch.ldexp(blk, -e).flatten(1)
        code = (v.abs()[..., None] == e2m1_grid(rows.device)).int().argmax(-1)
        code = code | ((v < 0).int() << 3)
        return [
            (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8),
            e.squeeze(-1).to(torch.int8),
        ]

    def decode(self, parts: list[Tensor]) -> Tensor:
        b = parts[0].int()
        code = torch.stack((b & 15, b >> 4), dim=-1).flatten(1)
        v = e2m1_grid(b.device)[code & 7] * (1 - 2 * (code >> 3)).float()
        return torch.ldexp(v.unflatten(-1, (-1, 32)), parts[1].int()[..., None]).flatten(1)


@functools.cache
def e2m1_grid(device: torch.device) -> Tensor:
    return torch.tensor((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), device=device)


def _pow2_exp(v: Tensor) -> Tensor:
    """ceil(log2(v)) for v > 0, exactly (the scale exponent of the FP8/FP4 round trips)."""
    m, e = torch.frexp(v)
    return torch.where(m == 0.5, e - 1, e)


class LayerState:
    def __init__(self, shape: Shape, layer: int, ctx: int, device, compact: bool):
        self.ratio = r = shape.ratio(layer)
        self.window = shape.window
        self.raw = torch.zeros(shape.window, shape.head_dim, device=device)  # ring: pos % window
        self.n_comp = 0
        cap = ctx // r + 1 if r else 0
        hd, ihd = shape.head_dim, shape.indexer_head_dim
        icap = cap if r == 4 else 0
        if compact:
            self.comp = FP8Rows(cap, hd, shape.n_rot, device)
            self.index = FP4Rows(icap, ihd, device)
        else:
            self.comp, self.index = FloatRows(cap, hd, device), FloatRows(icap, ihd, device)
        coff = 2 if r == 4 else 1
        self.attn_frontier = CompressorState.empty(r, coff * shape.head_dim, device) if r else None
        self.index_frontier = (
            CompressorState.empty(r, coff * shape.indexer_head_dim, device) if r == 4 else None
        )

    # ---- raw window ----
    def window_with(self, kv: Tensor, p0: int) -> tuple[Tensor, Tensor]:
        """Rows of positions max(0, p0-window+1)..p0-1 from the ring, then the new rows [T]."""
        first = max(0, p0 - self.window + 1)
        old = torch.arange(first, p0, device=kv.device)
        keys = torch.cat((self.raw[old % self.window], kv))
        return keys, torch.arange(first, p0 + kv.shape[0], device=kv.device)

    def push_window(self, kv: Tensor, p0: int) -> None:
        T = kv.shape[0]
        keep = min(T, self.window)
        pos = torch.arange(p0 + T - keep, p0 + T, device=kv.device)
        self.raw[pos % self.window] = kv[T - keep :]

    # ---- compressed rows ----
    def append_comp(self, rows: Tensor) -> None:
        n = rows.shape[0]
        if self.n_comp + n > self.comp.cap:
            raise ValueError("context exceeded: compressed cache is full")
        self.comp.put(self.n_comp, rows)
        self.n_comp += n

    def append_index(self, rows: Tensor) -> None:
        # called right after append_comp for the same windows: rows land at the same indices
        self.index.put(self.n_comp - rows.shape[0], rows)

    def comp_rows(self) -> Tensor:
        return self.comp.get(self.n_comp)

    def index_rows(self) -> Tensor:
        return self.index.get(self.n_comp)


class KVState:
    """All layers of one timeline plus the number of tokens in it."""

    def __init__(self, shape: Shape, ctx: int, device, compact: bool = True):
        self.shape, self.ctx, self.compact = shape, ctx, compact
        self.pos = 0
        self.layers = [LayerState(shape, i, ctx, device, compact) for i in range(shape.n_layer)]

    def nbytes(self) -> int:
        """Bytes of cache this timeline holds now: live raw rows, compressed rows, frontiers."""
        n, total = self.pos, 0
        for L in self.layers:
            total += min(n, L.window) * L.raw[0].numel() * L.raw.element_size()
            if L.ratio:
                total += L.n_comp * L.comp.row_bytes
                if L.ratio == 4:
                    total += L.n_comp * L.index.row_bytes
                for fr in (L.attn_frontier, L.index_frontier):
                    if fr is not None:
                        total += sum(t.numel() * t.element_size() for t in fr.tensors())
        return total

    def growing_bytes_per_token(self) -> float:
        """Bytes the cache grows by per token of context (compressed + indexer rows)."""
        return sum(
            (L.comp.row_bytes + (L.index.row_bytes if L.ratio == 4 else 0)) / L.ratio
            for L in self.layers
            if L.ratio
        )

    # ---- checkpoints: the fixed-size parts, for rewinds ----
    def checkpoint(self) -> list[tuple]:
        return [
            (
                L.raw.clone(),
                L.attn_frontier and L.attn_frontier.copy(),
                L.index_frontier and L.index_frontier.copy(),
            )
            for L in self.layers
        ]

    def restore_checkpoint(self, cp: list[tuple], n: int) -> None:
        """Back to n tokens: compressed rows are append-only, so truncating their count is exact."""
        for L, (raw, af, xf) in zip(self.layers, cp, strict=True):
            L.raw.copy_(raw)  # in place: a captured decode graph holds these tensors
            if af is not None:
                L.attn_frontier.load(af)
            if xf is not None:
                L.index_frontier.load(xf)
            L.n_comp = n // L.ratio if L.ratio else 0
        self.pos = n

    def grow(self, ctx: int) -> None:
        """Enlarge the compressed caches to hold `ctx` tokens (after a restore)."""
        self.ctx = ctx
        for L in self.layers:
            if L.ratio and L.comp.cap < ctx // L.ratio + 1:
                L.comp.grow(ctx // L.ratio + 1)
                if L.ratio == 4:
                    L.index.grow(ctx // L.ratio + 1)

    # ---- bytes (the session payload) ----
    def to_bytes(self, fingerprint: bytes, tokens: list[int], logits: Tensor | None) -> bytes:
        """Little-endian payload: header, tokens, logits, per-layer tensors, SHA-256 trailer.

        Header: magic, u32 version, 32-byte model fingerprint, u64 ctx, u64 n_tokens,
        u32 n_logits, u32 n_layer, u32 compact; then u32 (ratio, n_raw, n_comp) per layer.
        Body per layer: raw rows oldest first (f32); compressed rows (compact: E4M3 bytes,
        i8 exponents, f16 RoPE dims; else f32) and indexer rows (compact: packed E2M1, i8
        exponents); each compressor's open-window rows and, ratio 4, its last closed window.
        """
        n, s = self.pos, self.shape
        n_logits = 0 if logits is None else logits.numel()
        counts = struct.pack("<QQIII", self.ctx, n, n_logits, s.n_layer, int(self.compact))
        head = [MAGIC, struct.pack("<I", VERSION), fingerprint, counts]
        body = []
        for L in self.layers:
            n_raw = min(n, L.window)
            head.append(struct.pack("<III", L.ratio, n_raw, L.n_comp))
            order = torch.arange(n - n_raw, n) % L.window
            body.append(L.raw[order.to(L.raw.device)])
            if L.ratio:
                body += [p[: L.n_comp] for p in L.comp.parts]
                if L.ratio == 4:
                    body += [p[: L.n_comp] for p in L.index.parts]
                for fr in (L.attn_frontier, L.index_frontier):
                    if fr is not None:
                        body += [fr.cur_kv[: n % L.ratio], fr.cur_score[: n % L.ratio]]
                        if L.ratio == 4:
                            body += [fr.prev_kv, fr.prev_score]
        parts = head + [np.asarray(tokens, dtype="<i4").tobytes()]
        if logits is not None:
            parts.append(_raw(logits.float()))
        parts += [_raw(t) for t in body]
        blob = b"".join(parts)
        return blob + hashlib.sha256(blob).digest()

    @classmethod
    def from_bytes(cls, payload: bytes, fingerprint: bytes, shape: Shape, device):
        """Inverse of to_bytes; refuses another model, another version or damaged bytes."""
        if len(payload) < 8 + 4 + 32 + 28 + 32 or payload[:8] != MAGIC:
            raise SnapshotError("not a ds4py session payload")
        blob, digest = payload[:-32], payload[-32:]
        if hashlib.sha256(blob).digest() != digest:
            raise SnapshotError("session payload checksum mismatch (damaged or truncated)")
        (version,) = struct.unpack_from("<I", blob, 8)
        if version != VERSION:
            raise SnapshotError(f"session payload version {version}, this build reads {VERSION}")
        if blob[12:44] != fingerprint:
            raise SnapshotError("session payload was made by a different model shape or options")
        ctx, n, n_logits, n_layer, compact = struct.unpack_from("<QQIII", blob, 44)
        if n_layer != shape.n_layer:
            raise SnapshotError(f"payload has {n_layer} layers, the model {shape.n_layer}")
        off = 72
        counts = []
        for _ in range(n_layer):
            counts.append(struct.unpack_from("<III", blob, off))
            off += 12
        reader = _Reader(blob, off, device)
        tokens = reader.array("<i4", n).tolist()
        logits = reader.like(torch.zeros(1, n_logits), 1)[0] if n_logits else None
        st = cls(shape, max(ctx, n + 1), device, bool(compact))
        st.pos = n
        for L, (ratio, n_raw, n_comp) in zip(st.layers, counts, strict=True):
            if ratio != L.ratio or n_raw != min(n, L.window) or (ratio and n_comp != n // ratio):
                raise SnapshotError("session payload row counts do not match its token count")
            order = torch.arange(n - n_raw, n) % L.window
            L.raw[order.to(L.raw.device)] = reader.like(L.raw, n_raw)
            if ratio:
                stores = (L.comp, L.index) if ratio == 4 else (L.comp,)
                for store in stores:
                    for p in store.parts:
                        p[:n_comp] = reader.like(p, n_comp)
                L.n_comp = n_comp
                for fr in (L.attn_frontier, L.index_frontier):
                    if fr is not None:
                        fr.cur_kv[: n % ratio] = reader.like(fr.cur_kv, n % ratio)
                        fr.cur_score[: n % ratio] = reader.like(fr.cur_score, n % ratio)
                        if ratio == 4:
                            fr.prev_kv[:] = reader.like(fr.prev_kv, ratio)
                            fr.prev_score[:] = reader.like(fr.prev_score, ratio)
        if reader.off != len(blob):
            raise SnapshotError("session payload has trailing bytes")
        return st, tokens, logits


MAGIC = b"DS4PYKV1"
VERSION = 1


class SnapshotError(ValueError):
    """A session payload that cannot be restored into this engine."""


def _raw(t: Tensor) -> bytes:
    """A tensor's bytes in its own dtype (little-endian, as every supported host is)."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


class _Reader:
    def __init__(self, blob: bytes, off: int, device):
        self.blob, self.off, self.device = blob, off, device

    def array(self, dtype: str, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if self.off + size > len(self.blob):
            raise SnapshotError("session payload is truncated")
        a = np.frombuffer(self.blob, dtype=dtype, count=count, offset=self.off)
        self.off += size
        return a

    def like(self, template: Tensor, n: int) -> Tensor:
        """n rows shaped and typed like the rows of template."""
        shape = (n, *template.shape[1:])
        count = n * math.prod(template.shape[1:]) * template.element_size()
        if count == 0:
            return template.new_zeros(shape)
        raw = torch.from_numpy(self.array("u1", count).copy())
        return raw.view(template.dtype).view(shape).to(self.device)
