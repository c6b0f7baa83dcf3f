"""The public boundary: `Engine` (a loaded model, immutable) and `Session` (one mutable timeline).

Engine opens a GGUF (or builds the tiny demo model), owns the tokenizer and the model, and scores
token sequences. Session owns one KV state: `sync` reuses the longest common prefix and extends
in chunks aligned to absolute multiples of the chunk size, `rewind` restores the nearest frontier
checkpoint and replays the short tail, `snapshot`/`restore` move the state through bytes
(format in kv/state.py + the header here). Sampling, chat rendering and files live elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from .config import EngineOptions, ModelFileError, Shape
from .gguf import GGUFFile
from .kv.state import KVState
from .model.decode import Decoder
from .model.load import bind, file_tensors
from .model.model import Transformer
from .quant.ops import Ops

Tensor = torch.Tensor
Progress = Callable[[int, int], None]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ContextError(ValueError):
    """A prompt or generation that does not fit the session's context."""


class Engine:
    """A loaded model: shape, tokenizer, weights. Thread-compatible: sessions hold the state."""

    def __init__(
        self,
        shape: Shape,
        model: Transformer,
        options: EngineOptions,
        metadata: dict,
        path: Path | None = None,
        file: GGUFFile | None = None,
    ):
        self.shape, self.model, self.options = shape, model, options
        self.metadata, self.path, self._file = metadata, path, file
        self.device = torch.device(options.device)
        # long chunks on the GPU: each decoded expert weight tile then serves ~4x more tokens
        self.chunk = options.prefill_chunk or (8192 if self.device.type == "cuda" else 2048)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        device: str = "cpu",
        quant_sim: bool = True,
        options: EngineOptions | None = None,
        progress: Progress | None = None,
    ) -> Engine:
        opts = replace(options or EngineOptions(), device=device, quant_sim=quant_sim)
        f = GGUFFile(path)
        shape = Shape.from_metadata(f.metadata)
        ops = Ops.for_device(opts.device)
        model = Transformer(shape, ops, quant_sim=opts.quant_sim)
        bind(model, file_tensors(f), ops, torch.device(opts.device), progress)
        return cls(shape, model, opts, f.metadata, Path(path), f)

    @classmethod
    def demo(cls, device: str = "cpu", seed: int = 0, quant_sim: bool = True) -> Engine:
        """A tiny random-weight model of the V4 Flash architecture with the real tokenizer."""
        from .gguf import GGMLType
        from .synth import demo_shape, write_synthetic

        # Cached in the temp dir: building it takes seconds. Dense weights are F16 so the CPU
        # reference runs them as float32 matmuls; experts keep the real q2 types.
        path = Path(tempfile.gettempdir()) / f"ds4py-demo-v1-{seed}.gguf"
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            write_synthetic(tmp, demo_shape(), quant="q2", seed=seed, dense=GGMLType.F16)
            os.replace(tmp, path)
        return cls.open(path, device=device, quant_sim=quant_sim)

    @classmethod
    def synthetic(
        cls,
        shape: Shape,
        quant: str = "q2",
        device: str = "cpu",
        seed: int = 0,
        quant_sim: bool = True,
        generate_on: str | None = None,
    ) -> Engine:
        """Random weights of the published types made directly on `device` (no file): full-size
        speed runs without the 81 GB download. The real tokenizer when the vocab is real.
        generate_on="cpu" draws them with the CPU generator (the same weights as a CPU engine)."""
        from .synth import synthetic_tensors, tokenizer_metadata

        opts = EngineOptions(device=device, quant_sim=quant_sim)
        ops = Ops.for_device(device)
        model = Transformer(shape, ops, quant_sim=quant_sim)
        tensors = synthetic_tensors(shape, quant, seed, device=generate_on or device)
        makers = {spec.name: make for spec, _, make in tensors}
        bind(model, makers, ops, torch.device(device))
        md = {k: v for k, (_, v) in tokenizer_metadata().items()} if shape.n_vocab == 129280 else {}
        return cls(shape, model, opts, md)

    @cached_property
    def tokenizer(self):
        from .tokenizer import Tokenizer

        tokens = self.metadata.get("tokenizer.ggml.tokens")
        merges = self.metadata.get("tokenizer.ggml.merges")
        if not tokens:
            raise ModelFileError("the model file has no tokenizer (tokenizer.ggml.tokens)")
        types = self.metadata.get("tokenizer.ggml.token_type")
        return Tokenizer.from_vocab(
            list(tokens), list(merges or []), list(types) if types else None
        )

    @cached_property
    def fingerprint(self) -> bytes:
        """Identifies the model shape + options whose KV states are interchangeable."""
        key = json.dumps([asdict(self.shape), self.options.quant_sim], sort_keys=True)
        return hashlib.sha256(key.encode()).digest()

    def new_session(self, ctx: int | None = None) -> Session:
        return Session(self, ctx or min(self.shape.context_length, 32768))

    def new_state(self, ctx: int) -> KVState:
        # quant_sim rows are exactly FP8/FP4 values: store them compactly, losslessly
        return KVState(self.shape, ctx, self.device, compact=self.options.quant_sim)

    def check_tokens(self, ids: Sequence[int]) -> Tensor:
        t = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.shape.n_vocab):
            raise ValueError(f"token id out of range [0, {self.shape.n_vocab})")
        return t

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int]) -> Tensor:
        """Logits [n, vocab] at every position of one fresh prefill."""
        ids = self.check_tokens(token_ids)
        state = self.new_state(ids.numel() + 1)
        chunk = self.chunk
        out = [
            self.model.forward(ids[i : i + chunk], state, all_logits=True)
            for i in range(0, ids.numel(), chunk)
        ]
        return torch.cat(out).float() if out else torch.zeros(0, self.shape.n_vocab)


@dataclass
class Checkpoint:
    n: int
    state: KVState  # fixed-size parts only (see KVState.checkpoint)
    logits: Tensor | None


class Session:
    """One mutable timeline of tokens and its KV state; owned by one thread at a time."""

    def __init__(self, engine: Engine, ctx: int):
        if ctx < 2:
            raise ValueError("ctx must be at least 2")
        self.engine, self.ctx = engine, ctx
        self.state = engine.new_state(ctx)
        self.tokens: list[int] = []
        self.logits: Tensor | None = None
        self._checkpoints: list[Checkpoint] = []
        self._decoder: Decoder | None = None

    @property
    def pos(self) -> int:
        return len(self.tokens)

    # ---- timeline ----
    @torch.inference_mode()
    def sync(self, token_ids: Sequence[int], progress: Progress | None = None) -> Tensor:
        """Make the session hold exactly token_ids; return the logits after the last one."""
        ids = list(token_ids)
        if not ids:
            raise ValueError("sync needs at least one token")
        if len(ids) >= self.ctx:
            raise ContextError(f"prompt of {len(ids)} tokens exceeds the context of {self.ctx}")
        self.engine.check_tokens(ids)
        common = common_prefix(self.tokens, ids)
        if common == len(ids) and common == len(self.tokens):
            return self.logits
        if common < len(self.tokens):
            self.rewind(common if common < len(ids) else len(ids))
        self._extend(ids[self.pos :], progress)
        self._checkpoint()
        return self.logits

    @torch.inference_mode()
    def eval(self, token_id: int) -> Tensor:
        """Decode one token (static-shape step; a replayed CUDA graph on the GPU)."""
        if self.pos + 1 >= self.ctx:
            raise ContextError(f"context of {self.ctx} tokens is full")
        self.engine.check_tokens([token_id])
        if self._decoder is None or self._decoder.state is not self.state:
            self._decoder = Decoder(self.engine.model, self.state)
        self.logits = self._decoder.step(int(token_id), self.pos).clone()
        self.tokens.append(int(token_id))
        if self.pos % self.engine.chunk == 0:
            self._checkpoint()
        return self.logits

    def sample(self, sampler, greedy: bool = False) -> int:
        """Draw the next token from the logits after the last one (a `ds4py.sample.Sampler`)."""
        if self.logits is None:
            raise ValueError("the session is empty: sync a prompt first")
        return sampler.sample(self.logits, greedy=greedy)

    @torch.inference_mode()
    def rewind(self, n: int) -> None:
        """Keep the first n tokens: restore the nearest checkpoint <= n, replay the rest."""
        if not 0 <= n <= self.pos:
            raise ValueError(f"cannot rewind to {n}: the session holds {self.pos} tokens")
        if n == self.pos:
            return
        self._checkpoints = [c for c in self._checkpoints if c.n <= n]
        tail = self.tokens[:n]
        if self._checkpoints:
            cp = self._checkpoints[-1]
            self.state.restore_checkpoint(cp.state, cp.n)
            self.tokens, self.logits = tail[: cp.n], cp.logits
        else:
            self.state = self.engine.new_state(self.ctx)
            self.tokens, self.logits = [], None
        self._extend(tail[self.pos :], None)

    def _extend(self, ids: list[int], progress: Progress | None) -> None:
        chunk = self.engine.chunk
        done, total = 0, len(ids)
        if progress and total > chunk:
            progress(0, total)
        while done < total:
            # Chunks end at absolute multiples of the chunk size, as a cold prefill would.
            step = min(total - done, chunk - self.pos % chunk)
            part = ids[done : done + step]
            t = self.engine.check_tokens(part)
            self.logits = self.engine.model.forward(t, self.state)[-1].float()
            self.tokens.extend(part)
            done += step
            if self.pos % chunk == 0:
                self._checkpoint()
            if progress and total > chunk:
                progress(done, total)

    def _checkpoint(self) -> None:
        if self._checkpoints and self._checkpoints[-1].n == self.pos:
            return
        cp = Checkpoint(self.pos, self.state.checkpoint(), self.logits)
        self._checkpoints = (self._checkpoints + [cp])[-self.engine.options.checkpoints :]

    # ---- persistence ----
    def snapshot(self) -> bytes:
        """The whole timeline as bytes (tokens, last logits, KV tensors); see kv/state.py."""
        return self.state.to_bytes(self.engine.fingerprint, self.tokens, self.logits)

    def restore(self, payload: bytes) -> None:
        state, tokens, logits = KVState.from_bytes(
            payload, self.engine.fingerprint, self.engine.shape, self.engine.device
        )
        if len(tokens) >= self.ctx:
            raise ContextError(f"snapshot of {len(tokens)} tokens exceeds the context {self.ctx}")
        state.grow(self.ctx)
        self.state, self.tokens, self.logits = state, tokens, logits
        self._checkpoints = []
        self._checkpoint()
