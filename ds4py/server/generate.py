"""The generation loop as an event generator: sample, decode, stop strings, parse, finish.

Runs on the worker thread against a synced session. Turns sampled tokens into protocol-neutral
events (reasoning / content deltas, tool call start / argument deltas / end, then `Done` with
usage and finish reason) using ds4py.sample for sampling and DSML greedy forcing and
ds4py.chat.StreamParser for the reasoning / content / tool-call split. No HTTP here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .. import chat
from ..sample import DsmlTracker, Sampler, SamplingParams
from .common import (
    ContentDelta,
    Done,
    Job,
    ReasoningDelta,
    ToolArgs,
    ToolCall,
    ToolEnd,
    ToolStart,
    Usage,
    tool_id,
)


def sampling_params(job: Job) -> SamplingParams:
    """Client knobs, sanitized; thinking turns always sample at T=1, min-p 0.05 (§2.4)."""
    s = job.sampling
    seed = s.seed & (2**64 - 1) if s.seed and s.seed > 0 else None
    if job.mode.thinking:
        return SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.05, seed=seed)
    top_p = s.top_p if 0 < s.top_p <= 1 else 1.0
    return SamplingParams(temperature=s.temperature, top_p=top_p,
                          top_k=min(max(s.top_k, 0), 1024), min_p=min(max(s.min_p, 0.0), 1.0),
                          seed=seed)  # fmt: skip


class StopScanner:
    """Cuts the text at the earliest client stop string; holds back a possible partial match."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit, the stop string that matched or None)."""
        self.buf += text
        hits = [(i, s) for s in self.stops if (i := self.buf.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            out, self.buf = self.buf[:i], ""
            return out, s
        cut = max(len(self.buf) - self.hold, 0)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, None

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Projection:
    """chat.StreamParser events -> server events; accumulates the final message.

    With tools off, a DSML block the model writes anyway stays visible text. For completions
    the raw text is the content (no reasoning split).
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self.raw = job.kind == "completion"
        self.parser = None if self.raw else chat.StreamParser(job.mode.thinking)
        self.in_reasoning = job.mode.thinking and not self.raw
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[ToolCall] = []
        self.raw_dsml = ""
        self.error: str | None = None

    @property
    def done(self) -> bool:
        return self.parser is not None and self.parser.done

    def feed(self, text: str) -> Iterator:
        if self.raw:
            yield from self._content(text)
        elif text:
            yield from self._map(self.parser.feed(text))

    def finish(self) -> Iterator:
        if self.parser is not None:
            yield from self._map(self.parser.finish())

    def _content(self, text: str) -> Iterator:
        if text:
            self.content.append(text)
            yield ContentDelta(text)

    def _map(self, events: list) -> Iterator:
        live = self.job.tools_active
        for ev in events:
            if isinstance(ev, chat.ReasoningDelta):
                self.reasoning.append(ev.text)
                yield ReasoningDelta(ev.text)
            elif isinstance(ev, chat.ReasoningEnd):
                self.in_reasoning = False
            elif isinstance(ev, chat.ContentDelta):
                yield from self._content(ev.text)
            elif isinstance(ev, chat.MalformedDsml):
                self.calls, self.error = [], f"invalid tool call: {ev.error}"
                yield from self._content(ev.text)
            elif isinstance(ev, chat.ToolCallsDone):
                self.raw_dsml = ev.raw_dsml
                if not live:
                    yield from self._content(ev.raw_dsml)
            elif not live:
                continue  # tool events without tools on offer: the block is kept as text
            elif isinstance(ev, chat.ToolCallStart):
                self.calls.append(ToolCall(tool_id(self.job.tool_id_prefix), ev.name, {}))
                yield ToolStart(ev.index, self.calls[-1].id, ev.name)
            elif isinstance(ev, chat.ToolCallDelta):
                yield ToolArgs(ev.index, ev.text)
            elif isinstance(ev, chat.ToolCallEnd):
                self.calls[ev.index].arguments = ev.arguments
                yield ToolEnd(ev.index)

    def result(self, finish: str, usage: Usage, stop: str | None, error: str | None) -> Done:
        calls = self.calls if self.raw_dsml and self.job.tools_active else []
        if calls and finish != "error":
            finish = "tool_calls"
        thinking = self.job.mode.thinking and not self.raw
        reasoning = "".join(self.reasoning) if thinking else None
        return Done(finish, usage, reasoning, "".join(self.content), calls,
                    raw_dsml=self.raw_dsml if calls else "", stop_sequence=stop,
                    think_closed=thinking and not self.in_reasoning,
                    error=error or self.error)  # fmt: skip


def generate(session, tok, job: Job, usage: Usage,
             before_token: Callable[[], None]) -> Iterator:  # fmt: skip
    """Sample up to job.max_tokens tokens after the synced prompt; yields events, then Done."""
    sampler = Sampler(sampling_params(job))
    forcing = DsmlTracker(job.mode.thinking) if job.tools_active else None
    decoder = tok.stream_decoder()
    stops = StopScanner(job.stop)
    proj = Projection(job)
    logits = session.logits
    finish, stop, error = "length", None, None
    for _ in range(max(0, min(job.max_tokens, session.ctx - 1 - session.pos))):
        if job.cancel.is_set():
            finish, error = "error", "generation cancelled"
            break
        before_token()
        token = sampler.sample(logits, greedy=forcing is not None and forcing.greedy)
        if token == tok.eos_id:
            finish = "stop"
            break  # EOS is never evaluated: the next prompt's suffix brings it
        usage.completion_tokens += 1
        usage.reasoning_tokens += proj.in_reasoning
        piece = decoder.push(token)
        if forcing is not None:
            forcing.feed(piece)
        text, stop = stops.feed(piece)
        yield from proj.feed(text)
        logits = session.eval(token)
        if stop is not None:
            finish = "stop"
            break
        if proj.done:
            finish = "stop"  # the tool-call block closed; Done reports tool_calls
            break
    if stop is None:
        text, stop = stops.feed(decoder.flush())
        if stop is None:
            text += stops.flush()
        else:
            finish = "stop"
        yield from proj.feed(text)
    yield from proj.finish()
    yield proj.result(finish, usage, stop, error)
