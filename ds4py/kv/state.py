"""The KV state of one timeline: per-layer tensors the model reads and appends (MODEL.md §3.5).

Per layer: the raw sliding window (a ring of `window` K=V rows), the compressed rows (ratio 4 or
128) and, on ratio-4 layers, the indexer rows, plus each compressor's frontier (the tokens of the
open window, and for ratio 4 the last closed window whose A halves the next row pools).
Owns sizes, copies for checkpoints and the byte layout of these tensors; it does not know the
session payload header (`engine.py`) or files (`kv/store.py`).
"""

from __future__ import annotations

import hashlib
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
        if n_full:
            self.prev_kv = A[(n_full - 1) * r : n_full * r].clone()
            self.prev_score = B[(n_full - 1) * r : n_full * r].clone()
        rest = A.shape[0] - n_full * r
        self.cur_kv = self.cur_kv.clone()
        self.cur_score = self.cur_score.clone()
        self.cur_kv[:rest] = A[n_full * r :]
        self.cur_score[:rest] = B[n_full * r :]

    def tensors(self) -> list[Tensor]:
        return [self.cur_kv, self.cur_score, self.prev_kv, self.prev_score]

    def copy(self) -> CompressorState:
        return CompressorState(self.ratio, *(t.clone() for t in self.tensors()))


class LayerState:
    def __init__(self, shape: Shape, layer: int, ctx: int, device):
        self.ratio = r = shape.ratio(layer)
        self.window = shape.window
        self.raw = torch.zeros(shape.window, shape.head_dim, device=device)  # ring: pos % window
        self.n_comp = 0
        cap = ctx // r + 1 if r else 0
        self.comp = torch.zeros(cap, shape.head_dim, device=device)
        self.index = torch.zeros(cap if r == 4 else 0, shape.indexer_head_dim, device=device)
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
        if self.n_comp + n > self.comp.shape[0]:
            raise ValueError("context exceeded: compressed cache is full")
        self.comp[self.n_comp : self.n_comp + n] = rows
        self.n_comp += n

    def append_index(self, rows: Tensor) -> None:
        # called right after append_comp for the same windows: rows land at the same indices
        n = rows.shape[0]
        self.index[self.n_comp - n : self.n_comp] = rows


class KVState:
    """All layers of one timeline plus the number of tokens in it."""

    def __init__(self, shape: Shape, ctx: int, device):
        self.shape, self.ctx = shape, ctx
        self.pos = 0
        self.layers = [LayerState(shape, i, ctx, device) for i in range(shape.n_layer)]

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
            L.raw = raw.clone()
            L.attn_frontier = af and af.copy()
            L.index_frontier = xf and xf.copy()
            L.n_comp = n // L.ratio if L.ratio else 0
        self.pos = n

    def grow(self, ctx: int) -> None:
        """Enlarge the compressed caches to hold `ctx` tokens (after a restore)."""
        self.ctx = ctx
        for L in self.layers:
            if L.ratio and L.comp.shape[0] < ctx // L.ratio + 1:
                extra = ctx // L.ratio + 1 - L.comp.shape[0]
                L.comp = torch.cat((L.comp, L.comp.new_zeros(extra, L.comp.shape[1])))
                if L.ratio == 4:
                    L.index = torch.cat((L.index, L.index.new_zeros(extra, L.index.shape[1])))

    # ---- bytes (the session payload) ----
    def to_bytes(self, fingerprint: bytes, tokens: list[int], logits: Tensor | None) -> bytes:
        """Little-endian payload: header, tokens, logits, per-layer tensors, SHA-256 trailer."""
        n, s = self.pos, self.shape
        head = [
            MAGIC,
            struct.pack("<I", VERSION),
            fingerprint,
            struct.pack("<QQII", self.ctx, n, 0 if logits is None else logits.numel(), s.n_layer),
        ]
        body = []
        for L in self.layers:
            n_raw = min(n, L.window)
            head.append(struct.pack("<III", L.ratio, n_raw, L.n_comp))
            order = torch.arange(n - n_raw, n) % L.window
            body.append(L.raw[order.to(L.raw.device)])
            if L.ratio:
                body.append(L.comp[: L.n_comp])
                if L.ratio == 4:
                    body.append(L.index[: L.n_comp])
                for fr in (L.attn_frontier, L.index_frontier):
                    if fr is not None:
                        body += [fr.cur_kv[: n % L.ratio], fr.cur_score[: n % L.ratio]]
                        if L.ratio == 4:
                            body += [fr.prev_kv, fr.prev_score]
        parts = head + [np.asarray(tokens, dtype="<i4").tobytes()]
        if logits is not None:
            parts.append(_f32(logits))
        parts += [_f32(t) for t in body]
        blob = b"".join(parts)
        return blob + hashlib.sha256(blob).digest()

    @classmethod
    def from_bytes(cls, payload: bytes, fingerprint: bytes, shape: Shape, device):
        """Inverse of to_bytes; refuses another model, another version or damaged bytes."""
        if len(payload) < 8 + 4 + 32 + 24 + 32 or payload[:8] != MAGIC:
            raise SnapshotError("not a ds4py session payload")
        blob, digest = payload[:-32], payload[-32:]
        if hashlib.sha256(blob).digest() != digest:
            raise SnapshotError("session payload checksum mismatch (damaged or truncated)")
        (version,) = struct.unpack_from("<I", blob, 8)
        if version != VERSION:
            raise SnapshotError(f"session payload version {version}, this build reads {VERSION}")
        if blob[12:44] != fingerprint:
            raise SnapshotError("session payload was made by a different model shape or options")
        ctx, n, n_logits, n_layer = struct.unpack_from("<QQII", blob, 44)
        if n_layer != shape.n_layer:
            raise SnapshotError(f"payload has {n_layer} layers, the model {shape.n_layer}")
        off = 68
        counts = []
        for _ in range(n_layer):
            counts.append(struct.unpack_from("<III", blob, off))
            off += 12
        reader = _Reader(blob, off, device)
        tokens = reader.array("<i4", n).tolist()
        logits = (
            torch.from_numpy(reader.array("<f4", n_logits).copy()).to(device) if n_logits else None
        )
        st = cls(shape, max(ctx, n + 1), device)
        st.pos = n
        for L, (ratio, n_raw, n_comp) in zip(st.layers, counts, strict=True):
            if ratio != L.ratio or n_raw != min(n, L.window) or (ratio and n_comp != n // ratio):
                raise SnapshotError("session payload row counts do not match its token count")
            order = torch.arange(n - n_raw, n) % L.window
            L.raw[order.to(L.raw.device)] = reader.rows(n_raw, L.raw.shape[1])
            if ratio:
                L.comp[:n_comp] = reader.rows(n_comp, L.comp.shape[1])
                L.n_comp = n_comp
                if ratio == 4:
                    L.index[:n_comp] = reader.rows(n_comp, L.index.shape[1])
                for fr in (L.attn_frontier, L.index_frontier):
                    if fr is not None:
                        w = fr.cur_kv.shape[1]
                        fr.cur_kv[: n % ratio] = reader.rows(n % ratio, w)
                        fr.cur_score[: n % ratio] = reader.rows(n % ratio, w)
                        if ratio == 4:
                            fr.prev_kv[:] = reader.rows(ratio, w)
                            fr.prev_score[:] = reader.rows(ratio, w)
        if reader.off != len(blob):
            raise SnapshotError("session payload has trailing bytes")
        return st, tokens, logits


MAGIC = b"DS4PYKV1"
VERSION = 1


class SnapshotError(ValueError):
    """A session payload that cannot be restored into this engine."""


def _f32(t: Tensor) -> bytes:
    return t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()


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

    def rows(self, n: int, width: int) -> Tensor:
        return torch.from_numpy(self.array("<f4", n * width).copy()).view(n, width).to(self.device)
