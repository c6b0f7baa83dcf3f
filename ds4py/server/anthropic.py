"""Anthropic Messages (Claude Code): request -> render input, events -> message / SSE events.

Owns the Messages wire shapes (RUNTIME.md §5.6/§5.7): blocks -> chat messages, system parts,
tools (`input_schema` -> `parameters`), the `message` object and the
message_start / content_block_* / message_delta / message_stop sequence.
"""

from __future__ import annotations

from collections.abc import Iterator

from .common import (
    APIError,
    ContentDelta,
    Done,
    ReasoningDelta,
    Started,
    ToolArgs,
    ToolEnd,
    ToolStart,
    Usage,
    thinking_flag,
)
from .openai import Meta, compact
from .schemas import AnthropicBlock, AnthropicMessage, CountTokensRequest, SystemBlock
from .sse import sse_data

# ---- Request side ----------------------------------------------------------------------------


def system_text(system: str | list[SystemBlock | str] | None) -> str:
    """Parts joined by newlines; Claude Code's volatile `x-anthropic-*` header parts dropped."""
    if system is None:
        return ""
    parts = (
        [system]
        if isinstance(system, str)
        else [p if isinstance(p, str) else p.text for p in system]
    )
    out = ""
    for p in parts:
        if p.startswith("x-anthropic-"):
            continue  # per-request billing header: would defeat every prefix cache
        if out and not out.endswith("\n"):
            out += "\n"
        out += p
    return out


def _result_text(content: str | list[AnthropicBlock | str] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        b if isinstance(b, str) else (b.text or "")
        for b in content
        if isinstance(b, str) or b.type == "text"
    )


def _convert(m: AnthropicMessage) -> list[dict]:
    """One Anthropic message -> chat messages; tool_result blocks become tool messages."""
    if m.role not in ("user", "assistant"):
        raise APIError(400, f"messages: unsupported role {m.role!r}", param="messages")
    if m.content is None or isinstance(m.content, str):
        return [{"role": m.role, "content": m.content or ""}]
    out: list[dict] = []
    text, reasoning, calls = "", "", []

    def flush_user() -> None:
        nonlocal text
        if text:
            out.append({"role": "user", "content": text})
            text = ""

    for b in m.content:
        if b.type == "text":
            text += b.text or ""
        elif b.type == "thinking":
            reasoning += b.thinking or ""
        elif b.type == "tool_use" and m.role == "assistant":
            if not b.name:
                raise APIError(400, "tool_use block without a name", param="messages")
            calls.append({"id": b.id or "", "name": b.name, "arguments": b.input or {}})
        elif b.type == "tool_result" and m.role == "user":
            flush_user()
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": b.tool_use_id or "",
                    "content": _result_text(b.content),
                }
            )
        # images, documents, redacted thinking: a text-only model has nothing to render
    if m.role == "user":
        flush_user()
        return out or [{"role": "user", "content": ""}]
    msg: dict = {"role": "assistant", "content": text}
    if reasoning:
        msg["reasoning_content"] = reasoning
    if calls:
        msg["tool_calls"] = calls
    return [msg]


def messages(req: CountTokensRequest) -> list[dict]:
    out = []
    system = system_text(req.system)
    if system:
        out.append({"role": "system", "content": system})
    for m in req.messages:
        out += _convert(m)
    return out


def tools(req: CountTokensRequest) -> list[dict]:
    return [
        {
            "name": t.name,
            "description": t.description or "",
            "parameters": t.input_schema or {"type": "object", "properties": {}},
        }
        for t in req.tools or []
    ]


def tool_choice_none(req: CountTokensRequest) -> bool:
    return req.tool_choice is not None and req.tool_choice.type == "none"


def think_controls(req) -> tuple[bool | None, str | None]:
    effort = req.output_config.effort if req.output_config else None
    return thinking_flag(req.thinking), effort or getattr(req, "reasoning_effort", None)


# ---- Response side ---------------------------------------------------------------------------

_STOP = {"tool_calls": "tool_use", "length": "max_tokens"}


def usage(u: Usage, output_tokens: int | None = None) -> dict:
    # Every new prompt token stays in the live KV, so it is reported as a cache write.
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens - u.write_tokens,
        "output_tokens": u.completion_tokens if output_tokens is None else output_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": u.write_tokens,
    }


def stop_reason(done: Done) -> tuple[str, str | None]:
    if done.stop_sequence is not None:
        return "stop_sequence", done.stop_sequence
    return _STOP.get(done.finish, "end_turn"), None


def message_response(done: Done, meta: Meta) -> dict:
    content: list[dict] = []
    if done.reasoning:
        content.append({"type": "thinking", "thinking": done.reasoning, "signature": meta.id})
    if done.content:
        content.append({"type": "text", "text": done.content})
    for c in done.tool_calls:
        content.append({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments})
    if not done.content and not done.tool_calls:
        content.append({"type": "text", "text": ""})
    reason, seq = stop_reason(done)
    return {
        "id": meta.id,
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": seq,
        "usage": usage(done.usage),
    }


class MessageStream:
    """Events -> Anthropic SSE: one content block open at a time, indices counted up."""

    def __init__(self, meta: Meta) -> None:
        self.meta = meta
        self.index = 0
        self.open: str | None = None  # "thinking" | "text" | "tool_use"
        self.sent_thinking = self.sent_text = False
        self.streamed_calls = 0

    @staticmethod
    def _event(kind: str, **body) -> str:
        return sse_data({"type": kind, **body}, kind)

    def _start(self, block: dict) -> str:
        self.open = block["type"]
        return self._event("content_block_start", index=self.index, content_block=block)

    def _delta(self, delta: dict) -> str:
        return self._event("content_block_delta", index=self.index, delta=delta)

    def _close(self) -> Iterator[str]:
        if self.open == "thinking":
            yield self._delta({"type": "signature_delta", "signature": self.meta.id})
        if self.open is not None:
            yield self._event("content_block_stop", index=self.index)
            self.index += 1
            self.open = None

    def feed(self, ev) -> Iterator[str]:
        if isinstance(ev, Started):
            msg = {
                "id": self.meta.id,
                "type": "message",
                "role": "assistant",
                "model": self.meta.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": usage(ev.usage, 0),
            }
            yield self._event("message_start", message=msg)
        elif isinstance(ev, ReasoningDelta):
            if self.open != "thinking":
                yield from self._close()
                yield self._start({"type": "thinking", "thinking": "", "signature": ""})
                self.sent_thinking = True
            yield self._delta({"type": "thinking_delta", "thinking": ev.text})
        elif isinstance(ev, ContentDelta):
            if self.open != "text":
                yield from self._close()
                yield self._start({"type": "text", "text": ""})
                self.sent_text = True
            yield self._delta({"type": "text_delta", "text": ev.text})
        elif isinstance(ev, ToolStart):
            yield from self._close()
            self.streamed_calls += 1
            yield self._start({"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}})
        elif isinstance(ev, ToolArgs):
            yield self._delta({"type": "input_json_delta", "partial_json": ev.text})
        elif isinstance(ev, ToolEnd):
            yield from self._close()
        elif isinstance(ev, Done):
            yield from self._finish(ev)

    def _finish(self, done: Done) -> Iterator[str]:
        yield from self._close()
        if not self.sent_text and not done.tool_calls:
            yield self._start({"type": "text", "text": ""})
            yield from self._close()
        if not self.streamed_calls:
            for c in done.tool_calls:
                yield self._start({"type": "tool_use", "id": c.id, "name": c.name, "input": {}})
                yield self._delta(
                    {"type": "input_json_delta", "partial_json": compact(c.arguments)}
                )
                yield from self._close()
        reason, seq = stop_reason(done)
        yield self._event(
            "message_delta",
            delta={"stop_reason": reason, "stop_sequence": seq},
            usage=usage(done.usage),
        )
        yield self._event("message_stop")

    def error(self, message: str) -> str:
        return sse_data(
            {"type": "error", "error": {"type": "api_error", "message": message}}, "error"
        )


def count_response(n_tokens: int) -> dict:
    return {"input_tokens": n_tokens}
