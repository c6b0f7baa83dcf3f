"""OpenAI chat completions and legacy completions: request -> render input, events -> output.

Owns the OpenAI wire shapes (RUNTIME.md §5.6/§5.7): message normalisation for the chat
renderer, the non-streaming objects and the `chat.completion.chunk` / `text_completion` SSE
sequences. Prompt rendering, queueing and generation are shared and live elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from .common import (
    APIError,
    ContentDelta,
    Done,
    ReasoningDelta,
    Sampling,
    Started,
    ToolArgs,
    ToolStart,
    thinking_flag,
)
from .schemas import ChatRequest, CompletionRequest, Content, SamplingFields
from .sse import sse_data

# ---- Request side ----------------------------------------------------------------------------


def content_text(content: Content) -> str:
    """String, null or parts: text of string parts and of objects' `text` fields, joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p if isinstance(p, str) else (p.text or "") for p in content)


def chat_messages(req: ChatRequest) -> list[dict]:
    """Normalised messages for ds4py.chat.render (calls lacking a name are dropped; call
    arguments stay as sent: ds4py.chat reads JSON strings the way the official encoder does)."""
    out = []
    for m in req.messages:
        msg: dict = {"role": m.role, "content": content_text(m.content)}
        reasoning = content_text(m.reasoning_content)
        if reasoning:
            msg["reasoning_content"] = reasoning
        if m.role in ("tool", "function"):
            msg["role"] = "tool"
            msg["tool_call_id"] = m.tool_call_id or ""
        calls = []
        for c in m.tool_calls or []:
            if c.function is None or not c.function.name:
                continue
            calls.append({"id": c.id or "", "name": c.function.name,
                          "arguments": c.function.arguments})  # fmt: skip
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def chat_tools(req: ChatRequest) -> list[dict]:
    return [
        {
            "name": t.function.name,
            "description": t.function.description or "",
            "parameters": t.function.parameters or {"type": "object", "properties": {}},
        }
        for t in req.tools or []
        if t.type == "function"
    ]


def tool_choice_none(choice: str | dict | None) -> bool:
    return choice == "none"


def think_controls(req: SamplingFields) -> tuple[bool | None, str | None]:
    enabled = thinking_flag(req.thinking)
    if enabled is None and req.think is not None:
        enabled = req.think
    return enabled, req.reasoning_effort


def sampling(req: SamplingFields) -> Sampling:
    s = Sampling()
    if req.temperature is not None:
        s.temperature = req.temperature
    if req.top_p is not None:
        s.top_p = req.top_p
    if req.min_p is not None:
        s.min_p = req.min_p
    if req.top_k is not None:
        s.top_k = req.top_k
    s.seed = req.seed
    return s


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > 16:
        raise APIError(400, "stop accepts at most 16 sequences")
    return [s for s in stops if s]


def completion_prompt(req: CompletionRequest) -> str:
    """A string, or the first string of an array (one completion per request)."""
    if isinstance(req.prompt, str):
        return req.prompt
    if not req.prompt:
        raise APIError(400, "prompt must not be an empty array", param="prompt")
    return req.prompt[0]


# ---- Response side ---------------------------------------------------------------------------


@dataclass
class Meta:
    id: str
    created: int
    model: str


def _tool_call_json(index: int, call) -> dict:
    return {
        "index": index,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": compact(call.arguments)},
    }


def compact(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def chat_response(done: Done, meta: Meta) -> dict:
    message: dict = {"role": "assistant", "content": done.content}
    if done.reasoning:
        message["reasoning_content"] = done.reasoning
    if done.tool_calls:
        message["tool_calls"] = [
            {k: v for k, v in _tool_call_json(i, c).items() if k != "index"}
            for i, c in enumerate(done.tool_calls)
        ]
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": 0, "message": message, "finish_reason": done.finish}],
        "usage": done.usage.openai(),
    }


def completion_response(done: Done, meta: Meta) -> dict:
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {"text": done.content, "index": 0, "finish_reason": done.finish, "logprobs": None}
        ],
        "usage": done.usage.openai(),
    }


class ChatStream:
    """Events -> `chat.completion.chunk` SSE lines."""

    def __init__(self, meta: Meta, include_usage: bool) -> None:
        self.meta = meta
        self.include_usage = include_usage
        self.streamed_calls = 0

    def _chunk(self, delta: dict, finish: str | None = None, **extra) -> str:
        return sse_data(
            {
                "id": self.meta.id,
                "object": "chat.completion.chunk",
                "created": self.meta.created,
                "model": self.meta.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
        )

    def feed(self, ev) -> Iterator[str]:
        if isinstance(ev, Started):
            yield self._chunk({"role": "assistant", "content": ""})
        elif isinstance(ev, ReasoningDelta):
            yield self._chunk({"reasoning_content": ev.text})
        elif isinstance(ev, ContentDelta):
            yield self._chunk({"content": ev.text})
        elif isinstance(ev, ToolStart):
            self.streamed_calls += 1
            head = {
                "index": ev.index,
                "id": ev.id,
                "type": "function",
                "function": {"name": ev.name, "arguments": ""},
            }
            yield self._chunk({"tool_calls": [head]})
        elif isinstance(ev, ToolArgs):
            yield self._chunk(
                {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]}
            )
        elif isinstance(ev, Done):
            yield from self._finish(ev)

    def _finish(self, done: Done) -> Iterator[str]:
        if done.tool_calls and not self.streamed_calls:
            calls = [_tool_call_json(i, c) for i, c in enumerate(done.tool_calls)]
            yield self._chunk({"tool_calls": calls})
        yield self._chunk({}, done.finish)
        if self.include_usage:
            yield sse_data(
                {
                    "id": self.meta.id,
                    "object": "chat.completion.chunk",
                    "created": self.meta.created,
                    "model": self.meta.model,
                    "choices": [],
                    "usage": done.usage.openai(),
                }
            )
        yield "data: [DONE]\n\n"

    def error(self, message: str) -> str:
        return sse_data({"error": {"message": message, "type": "server_error"}}, "error")


class CompletionStream:
    """Events -> `text_completion` SSE lines (raw text, reasoning included)."""

    def __init__(self, meta: Meta, include_usage: bool) -> None:
        self.meta = meta
        self.include_usage = include_usage

    def _chunk(self, text: str, finish: str | None = None) -> str:
        return sse_data(
            {
                "id": self.meta.id,
                "object": "text_completion",
                "created": self.meta.created,
                "model": self.meta.model,
                "choices": [{"text": text, "index": 0, "finish_reason": finish, "logprobs": None}],
            }
        )

    def feed(self, ev) -> Iterator[str]:
        if isinstance(ev, ContentDelta | ReasoningDelta) and ev.text:
            yield self._chunk(ev.text)
        elif isinstance(ev, Done):
            yield self._chunk("", ev.finish)
            if self.include_usage:
                yield sse_data(
                    {
                        "id": self.meta.id,
                        "object": "text_completion",
                        "created": self.meta.created,
                        "model": self.meta.model,
                        "choices": [],
                        "usage": ev.usage.openai(),
                    }
                )
            yield "data: [DONE]\n\n"

    def error(self, message: str) -> str:
        return sse_data({"error": {"message": message, "type": "server_error"}}, "error")
