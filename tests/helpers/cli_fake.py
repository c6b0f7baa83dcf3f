"""A scripted stand-in for `ds4py.Engine` (the COMMON.md surface) used by the CLI tests.

The "model" answers every user turn with a fixed, predictable reply computed from the tokens in
the session, so the tests can check exact output, prefix reuse and interruption. Tokenizer and
template are the real ones. Optional hooks send SIGINT at a given decode step or prefill chunk,
which drives the CLI's real Ctrl-C path in-process.
"""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import torch

from ds4py.engine import ContextError
from ds4py.tokenizer import Tokenizer

CHUNK = 64  # prefill chunk of the fake session: longer suffixes report progress


def reply_ids(tok: Tokenizer, tokens: list[int]) -> list[int] | None:
    """The scripted answer to the last user turn (None: loop "la" forever)."""
    a = len(tokens) - 1 - tokens[::-1].index(tok.assistant_id)
    u = len(tokens) - 1 - tokens[::-1].index(tok.user_id)
    user_text = tok.decode(tokens[u + 1 : a])
    if "forever" in user_text:
        return None
    n = tokens.count(tok.user_id)
    reasoning = tok.encode(f"Thinking about turn {n}.", specials=False) + [tok.end_think_id]
    answer = tok.encode(f"Answer {n}.", specials=False)
    opener = tokens[a + 1]
    return (reasoning if opener == tok.think_id else []) + answer + [tok.eos_id]


class ScriptSession:
    def __init__(self, engine: ScriptEngine, ctx: int) -> None:
        self.engine, self.ctx = engine, ctx
        self.tokens: list[int] = []
        self.logits: torch.Tensor | None = None
        self.syncs: list[tuple[int, int]] = []  # (tokens reused, tokens prefilled) per sync
        self.evals = 0

    def sync(self, ids: list[int], progress=None) -> torch.Tensor:
        ids = list(ids)
        if len(ids) >= self.ctx:
            raise ContextError(f"prompt of {len(ids)} tokens exceeds the context of {self.ctx}")
        common = 0
        for a, b in zip(self.tokens, ids, strict=False):
            if a != b:
                break
            common += 1
        self.tokens = self.tokens[:common]
        new = ids[common:]
        self.syncs.append((common, len(new)))
        report = progress is not None and len(new) > CHUNK
        if report:
            progress(0, len(new))
        for i in range(0, len(new), CHUNK):
            self.tokens += new[i : i + CHUNK]
            if self.engine.sigint_at_chunk == i // CHUNK:
                for _ in range(self.engine.sigints):
                    os.kill(os.getpid(), signal.SIGINT)
            if report:
                progress(min(i + CHUNK, len(new)), len(new))
        self.logits = self._next()
        return self.logits

    def eval(self, token: int) -> torch.Tensor:
        if len(self.tokens) + 1 >= self.ctx:
            raise ContextError(f"context of {self.ctx} tokens is full")
        self.tokens.append(int(token))
        self.evals += 1
        if self.engine.sigint_at_eval == self.evals:
            os.kill(os.getpid(), signal.SIGINT)
        self.logits = self._next()
        return self.logits

    def rewind(self, n: int) -> None:
        self.tokens = self.tokens[:n]
        self.logits = self._next() if self.tokens else None

    def snapshot(self) -> bytes:
        return json.dumps({"fake": True, "tokens": self.tokens}).encode()

    def restore(self, payload: bytes) -> None:
        data = json.loads(payload)
        if not data.get("fake"):
            raise ValueError("not a fake-session snapshot")
        self.tokens = data["tokens"]
        self.logits = self._next()

    def _next(self) -> torch.Tensor:
        return self.engine.next_logits(self.tokens)


class ScriptEngine:
    def __init__(self, tok: Tokenizer | None = None) -> None:
        self.tokenizer = tok or Tokenizer.default()
        self.shape = SimpleNamespace(n_vocab=self.tokenizer.vocab_size)
        self.la = self.tokenizer.encode("la", specials=False)[0]
        self.runner_up = self.tokenizer.encode("zz", specials=False)[0]
        self.sessions: list[ScriptSession] = []
        self.sigint_at_eval: int | None = None
        self.sigint_at_chunk: int | None = None
        self.sigints = 1  # how many SIGINTs to send at that chunk

    def next_logits(self, tokens: list[int]) -> torch.Tensor:
        """The scripted reply's next token wins by a wide margin; "zz" is a distant second (logit 16)."""
        tok = self.tokenizer
        target = tok.eos_id
        if tok.assistant_id in tokens:
            a = len(tokens) - 1 - tokens[::-1].index(tok.assistant_id)
            script = reply_ids(tok, tokens)
            done = len(tokens) - a - 2  # tokens generated after the opener
            if script is None:
                target = self.la
            elif 0 <= done < len(script):
                target = script[done]
        x = torch.full((tok.vocab_size,), -20.0)
        x[target] = 20.0
        x[self.runner_up] = 16.0  # below min-p 0.05: never sampled
        return x

    def new_session(self, ctx: int | None = None) -> ScriptSession:
        sess = ScriptSession(self, ctx or 32768)
        self.sessions.append(sess)
        return sess


def main() -> int:
    """Run the real CLI with the scripted engine: `python cli_fake.py chat ...` (pty tests)."""
    import sys

    from ds4py import cli

    engine = ScriptEngine()
    cli.open_engine = lambda args: engine
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
