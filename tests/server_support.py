"""Server test support: a scripted stand-in for `ds4py.Engine`, and a live uvicorn runner.

FakeEngine implements the Engine/Session interface of COMMON.md with the real tokenizer. Its
logits spell out a reply chosen by a script from the rendered prompt (reasoning, text, DSML tool
calls), so tool-call and thinking paths are deterministic; it counts evaluated tokens so tests
can check prefix reuse, can sleep per token (keepalive, queueing, disconnects) and can fail on
demand. LiveServer runs an app on 127.0.0.1 and an OS-chosen port.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from ds4py.tokenizer import Tokenizer

TOOL_BLOCK = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)
REASONING = "The user wants an answer. I will think briefly."
WEATHER_ANSWER = "It is sunny in Paris."


def default_script(prompt: str) -> str:
    """Reasoning (when the prompt opened <think>), then a tool call or an echo of the user."""
    last_turn = prompt.rsplit("<｜User｜>", 1)[-1]
    head = REASONING + "</think>" if prompt.endswith("<think>") else ""
    if "<tool_result>" in last_turn:
        return head + WEATHER_ANSWER
    if "get_weather" in prompt and "weather" in last_turn:
        return head + "Let me check." + TOOL_BLOCK
    user = last_turn.split("<｜Assistant｜>", 1)[0]
    return head + "You said: " + user.strip()


class FakeEngine:
    def __init__(self, script: Callable[[str], str] = default_script,
                 tokenizer: Tokenizer | None = None, delay: float = 0.0, chunk: int = 64,
                 fail_marker: str | None = None):  # fmt: skip
        self.tokenizer = tokenizer or Tokenizer.default()
        self.shape = SimpleNamespace(n_vocab=self.tokenizer.vocab_size, context_length=1 << 20)
        self.fingerprint = b"fake-engine-v1"
        self.script = script
        self.delay = delay  # seconds per evaluated token
        self.chunk = chunk  # prefill chunk size (progress callbacks above it)
        self.evaluated = 0  # tokens pushed through the "model", prefill and decode
        self.fail_marker = fail_marker  # a prompt containing it fails after its first chunk
        self._replies: dict[tuple[int, ...], list[int]] = {}

    def new_session(self, ctx: int | None = None) -> FakeSession:
        return FakeSession(self, ctx or 32768)

    def reply_ids(self, prompt: list[int]) -> list[int]:
        key = tuple(prompt)
        if key not in self._replies:
            text = self.script(self.tokenizer.decode(prompt))
            self._replies[key] = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        return self._replies[key]


class FakeSession:
    def __init__(self, engine: FakeEngine, ctx: int):
        self.engine, self.ctx = engine, ctx
        self.tokens: list[int] = []
        self.logits: torch.Tensor | None = None

    @property
    def pos(self) -> int:
        return len(self.tokens)

    def sync(self, ids, progress=None) -> torch.Tensor:
        ids = list(ids)
        if not ids or len(ids) >= self.ctx:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the context {self.ctx}")
        common = 0
        for a, b in zip(self.tokens, ids, strict=False):
            if a != b:
                break
            common += 1
        if common == len(ids) == len(self.tokens):
            return self.logits
        self.rewind(min(common, len(ids) - 1))
        rest, done, chunk = ids[self.pos :], 0, self.engine.chunk
        marker = self.engine.fail_marker
        doomed = marker is not None and marker in self.engine.tokenizer.decode(ids)
        if progress and len(rest) > chunk:
            progress(0, len(rest))
        while done < len(rest):
            if doomed and done:
                raise RuntimeError("simulated engine failure")
            part = rest[done : done + chunk]
            self._push(part)
            done += len(part)
            if progress and len(rest) > chunk:
                progress(done, len(rest))
        return self.logits

    def eval(self, token_id: int) -> torch.Tensor:
        if self.pos + 1 >= self.ctx:
            raise ValueError("context full")
        self._push([int(token_id)])
        return self.logits

    def rewind(self, n: int) -> None:
        del self.tokens[n:]
        self.logits = self._logits() if self.tokens else None

    def snapshot(self) -> bytes:
        return json.dumps(self.tokens).encode()

    def restore(self, payload: bytes) -> None:
        self.tokens = json.loads(payload)
        self.logits = self._logits()

    def _push(self, ids: list[int]) -> None:
        if self.engine.delay:
            time.sleep(self.engine.delay * len(ids))
        self.engine.evaluated += len(ids)
        self.tokens.extend(ids)
        self.logits = self._logits()

    def _logits(self) -> torch.Tensor:
        tok = self.engine.tokenizer
        out = torch.full((tok.vocab_size,), -torch.inf)
        starts = [i for i, t in enumerate(self.tokens) if t == tok.assistant_id]
        target = tok.eos_id
        if starts and starts[-1] + 1 < len(self.tokens):
            cut = starts[-1] + 2  # prompt ends with <｜Assistant｜> and <think> or </think>
            reply, made = self.engine.reply_ids(self.tokens[:cut]), self.tokens[cut:]
            if reply[: len(made)] == made and len(made) < len(reply):
                target = reply[len(made)]
        out[target] = 0.0  # the only finite logit: any sampling settings pick it
        return out


class LiveServer:
    """uvicorn on 127.0.0.1 and an OS-chosen port, in a thread; a context manager."""

    def __init__(self, app) -> None:
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)  # fmt: skip

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
