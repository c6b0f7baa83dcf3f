"""OpenAI Responses (Codex): input items -> render input, events -> response object / SSE.

Owns the Responses wire shapes (RUNTIME.md §5.4, §5.6, §5.7): the item table (messages,
reasoning, function/custom/tool-search calls and their outputs), tool flattening (namespaces,
custom tools, hosted tool search), and the response.* event lifecycle with sequence numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from .common import (
    APIError,
    ContentDelta,
    Done,
    IdMaker,
    ReasoningDelta,
    Started,
    ToolCall,
    Usage,
)
from .openai import compact
from .schemas import ResponsesRequest
from .sse import sse_data

_TEXT_BLOCKS = {"input_text", "output_text", "text", "summary_text", "reasoning_text"}
_DROPPED_BLOCKS = {"input_image", "input_file", "input_audio", "refusal"}
_HOSTED_CALLS = {
    "local_shell_call": "local_shell",
    "web_search_call": "web_search_call",
    "tool_search_call": "tool_search",
    "image_generation_call": "image_generation",
}
_EMPTY_SCHEMA = {"type": "object", "properties": {}}
_SUMMARY_OPT_IN = {"auto", "concise", "detailed"}


# ---- Tools -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WireTool:
    """How a rendered tool name goes back on the wire."""

    name: str
    namespace: str | None = None
    kind: str = "function"  # "function" | "custom" | "tool_search"


@dataclass
class Tools:
    schemas: list[dict] = field(default_factory=list)
    wire: dict[str, WireTool] = field(default_factory=dict)

    def add(self, name: str, description: str, parameters: dict | None, wire: WireTool) -> None:
        self.schemas.append(
            {
                "name": name,
                "description": description or "",
                "parameters": parameters or _EMPTY_SCHEMA,
            }
        )
        self.wire[name] = wire


def _tool_name(t: dict, where: str) -> str:
    name = t.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, f"{where}: a tool needs a non-empty string name", param="tools")
    return name


def _add_tool(out: Tools, t: dict, where: str) -> None:
    kind = t.get("type", "function")
    if kind == "function":
        name = _tool_name(t, where)
        out.add(
            name, t.get("description"), t.get("parameters") or t.get("input_schema"), WireTool(name)
        )
    elif kind == "namespace":
        ns = _tool_name(t, where)
        for inner in t.get("tools") or []:
            if isinstance(inner, dict) and inner.get("type", "function") == "function":
                name = _tool_name(inner, where)
                out.add(
                    ns + name,
                    inner.get("description"),
                    inner.get("parameters") or inner.get("input_schema"),
                    WireTool(name, ns),
                )
    elif kind == "custom":
        # Free-form tools take one raw string; the model writes it as an "input" parameter.
        name = _tool_name(t, where)
        schema = {
            "type": "object",
            "properties": {"input": {"type": "string"}},
            "required": ["input"],
        }
        out.add(name, t.get("description"), schema, WireTool(name, kind="custom"))
    elif kind == "tool_search":
        out.add(
            "tool_search",
            t.get("description") or "Search available tools.",
            t.get("parameters"),
            WireTool("tool_search", kind="tool_search"),
        )
    # other hosted tools (web_search, file_search, ...) run on OpenAI's side: nothing to offer


def tools(req: ResponsesRequest, extra: list[dict]) -> Tools:
    out = Tools()
    for t in list(req.tools or []) + extra:
        if not isinstance(t, dict):
            raise APIError(400, "tools: every tool must be an object", param="tools")
        _add_tool(out, t, "tools")
    return out


def tool_choice_none(req: ResponsesRequest) -> bool:
    choice = req.tool_choice
    if isinstance(choice, dict):
        raise APIError(400, "forced tool_choice not supported", param="tool_choice")
    if choice not in (None, "none", "auto", "required"):
        raise APIError(400, f"tool_choice={choice} not supported", param="tool_choice")
    return choice == "none"


def check_stateless(req: ResponsesRequest) -> None:
    for key in ("previous_response_id", "conversation"):
        if getattr(req, key) is not None:
            raise APIError(400, f"{key} is not supported; replay full input instead", param=key)


# ---- Input items -----------------------------------------------------------------------------


def _blocks_text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or an array", param="input")
    out = []
    for b in content:
        if isinstance(b, str):
            out.append(b)
            continue
        kind = b.get("type") if isinstance(b, dict) else None
        if not isinstance(kind, str) or kind not in _TEXT_BLOCKS | _DROPPED_BLOCKS:
            raise APIError(400, f"{where}: unsupported content block {kind!r}", param="input")
        if kind in _TEXT_BLOCKS:
            out.append(_field(b, "text", where))
    return "".join(out)


def _output_text(item: dict, where: str) -> str:
    out = item.get("output")
    if out is None:
        out = item.get("result")
    if out is None and "tools" in item:
        return json.dumps(item["tools"], ensure_ascii=False)
    if isinstance(out, str) or out is None:
        return out or ""
    if isinstance(out, list):
        return _blocks_text(out, where)
    return json.dumps(out, ensure_ascii=False)


def _call_args(item: dict) -> dict:
    raw = item.get("arguments", item.get("action"))
    if raw is None and "input" in item:
        return {"input": item["input"]} if isinstance(item["input"], str) else item["input"]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return {"arguments": raw}
    if raw is None:
        return {}
    return raw if isinstance(raw, dict) else {"arguments": raw}


@dataclass
class Input:
    messages: list[dict]
    extra_tools: list[dict]


class _Builder:
    def __init__(self) -> None:
        self.msgs: list[dict] = []
        self.reasoning: list[str] = []
        self.extra_tools: list[dict] = []
        self.call_ids: set[str] = set()

    def flush_reasoning(self) -> None:
        if self.reasoning:
            self.msgs.append(
                {"role": "assistant", "content": "", "reasoning_content": "\n".join(self.reasoning)}
            )
            self.reasoning = []

    def assistant(self, text: str) -> dict:
        msg = {"role": "assistant", "content": text}
        if self.reasoning:
            msg["reasoning_content"] = "\n".join(self.reasoning)
            self.reasoning = []
        self.msgs.append(msg)
        return msg

    def call(self, call_id: str, name: str, args: dict) -> None:
        last = self.msgs[-1] if self.msgs else None
        if last is None or last["role"] != "assistant" or self.reasoning:
            last = self.assistant("")
        last.setdefault("tool_calls", []).append({"id": call_id, "name": name, "arguments": args})
        self.call_ids.add(call_id)


def input_messages(req: ResponsesRequest) -> Input:
    """Items -> chat messages (RUNTIME.md §5.4 table); unknown item types are a 400."""
    b = _Builder()
    if req.instructions:
        b.msgs.append({"role": "system", "content": req.instructions})
    items = req.input
    if items is None:
        raise APIError(400, "missing input", param="input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    for n, item in enumerate(items):
        _add_item(b, item, f"input[{n}]")
    b.flush_reasoning()
    return Input(b.msgs, b.extra_tools)


def _field(item: dict, key: str, where: str, default: str = "") -> str:
    value = item.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise APIError(400, f"{where}.{key} must be a string", param="input")
    return value


def _list(item: dict, key: str, where: str) -> list:
    value = item.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise APIError(400, f"{where}.{key} must be an array", param="input")
    return value


def _add_item(b: _Builder, item: dict, where: str) -> None:
    kind = _field(item, "type", where) or "message"
    if kind == "message":
        role = _field(item, "role", where, "user")
        text = _blocks_text(item.get("content"), where)
        if role == "assistant":
            b.assistant(text)
        elif role in ("user", "system", "developer"):
            b.flush_reasoning()
            b.msgs.append({"role": role, "content": text})
        else:
            raise APIError(400, f"{where}: unsupported role {role!r}", param="input")
    elif kind == "reasoning":
        parts = [_field(p, "text", where) for key in ("summary", "content")
                 for p in _list(item, key, where) if isinstance(p, dict)]  # fmt: skip
        if parts:
            b.reasoning.append("\n".join(parts))
    elif kind in ("function_call", "custom_tool_call") or kind in _HOSTED_CALLS:
        call_id = _field(item, "call_id", where) or _field(item, "id", where)
        name = _HOSTED_CALLS.get(kind) or _field(item, "name", where)
        if not call_id or not name:
            raise APIError(400, f"{where}: {kind} needs a call_id and a name", param="input")
        b.call(call_id, _field(item, "namespace", where) + name, _call_args(item))
    elif kind.endswith("_output"):
        call_id = _field(item, "call_id", where)
        if call_id not in b.call_ids:
            raise APIError(400, f"Responses continuation state is not available for call_id "
                                f"{call_id}; retry by replaying the full input history",
                           param="input")  # fmt: skip
        if kind == "tool_search_output":
            b.extra_tools += [t for t in _list(item, "tools", where) if isinstance(t, dict)]
        b.flush_reasoning()
        b.msgs.append({"role": "tool", "tool_call_id": call_id,
                       "content": _output_text(item, where)})  # fmt: skip
    elif kind not in ("compaction", "context_compaction", "item_reference"):
        raise APIError(400, f"{where}: unsupported input item type {kind!r}", param="input")


def summary_opted_in(req: ResponsesRequest) -> bool:
    return bool(req.reasoning and req.reasoning.summary in _SUMMARY_OPT_IN)


def think_controls(req: ResponsesRequest) -> tuple[bool | None, str | None]:
    effort = req.reasoning.effort if req.reasoning else None
    return (None if effort is None else effort != "none"), effort


# ---- Response side ---------------------------------------------------------------------------


@dataclass
class RMeta:
    id: str
    created: int
    model: str
    summary: bool  # reasoning items are part of the output
    wire: dict[str, WireTool]
    ids: dict[str, str] = field(default_factory=dict)  # item kind or call id -> item id

    def item_id(self, key: str, prefix: str) -> str:
        if key not in self.ids:
            self.ids[key] = IdMaker.hex(prefix)
        return self.ids[key]


def usage(u: Usage) -> dict:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": u.cached_tokens,
            "cache_write_tokens": u.write_tokens,
        },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def _status(done: Done) -> tuple[str, str]:
    if done.finish == "length":
        return "incomplete", "incomplete"
    if done.finish == "error":
        return "failed", "incomplete"
    return "completed", "completed"


def _reasoning_item(meta: RMeta, text: str, status: str) -> dict:
    return {
        "id": meta.item_id("reasoning", "rs_"),
        "type": "reasoning",
        "status": status,
        "summary": [{"type": "summary_text", "text": text}] if text else [],
    }


def _message_item(meta: RMeta, text: str, status: str) -> dict:
    return {
        "id": meta.item_id("message", "msg_"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}] if text else [],
    }


def _call_item(meta: RMeta, call: ToolCall, status: str) -> dict:
    wire = meta.wire.get(call.name, WireTool(call.name))
    if wire.kind == "tool_search":
        return {
            "id": meta.item_id(call.id, "fc_"),
            "type": "tool_search_call",
            "status": status,
            "call_id": call.id,
            "execution": "client",
            "arguments": call.arguments,
        }
    if wire.kind == "custom":
        value = call.arguments.get("input", "")
        return {
            "id": meta.item_id(call.id, "ctc_"),
            "type": "custom_tool_call",
            "status": status,
            "call_id": call.id,
            "name": wire.name,
            "input": value if isinstance(value, str) else compact(value),
        }
    item = {
        "id": meta.item_id(call.id, "fc_"),
        "type": "function_call",
        "status": status,
        "name": wire.name,
        "call_id": call.id,
        "arguments": compact(call.arguments),
    }
    if wire.namespace:
        item["namespace"] = wire.namespace
    return item


def response_object(done: Done, meta: RMeta, reasoning_streamed: bool = False) -> dict:
    status, item_status = _status(done)
    output = []
    if meta.summary and (done.reasoning or reasoning_streamed):
        closed = "completed" if done.think_closed else "incomplete"
        output.append(_reasoning_item(meta, done.reasoning or "", closed))
    if done.content:
        output.append(_message_item(meta, done.content, item_status))
    output += [_call_item(meta, c, item_status) for c in done.tool_calls]
    obj = _shell(meta, status)
    obj["output"] = output
    obj["usage"] = usage(done.usage)
    if status == "failed":
        obj["error"] = {"code": "server_error", "message": done.error or "generation failed"}
    if status == "incomplete":
        obj["incomplete_details"] = {"reason": "max_output_tokens"}
    return obj


def _shell(meta: RMeta, status: str) -> dict:
    return {
        "id": meta.id,
        "object": "response",
        "created_at": meta.created,
        "status": status,
        "model": meta.model,
        "output": [],
        "error": None,
        "incomplete_details": None,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }


class ResponseStream:
    """Events -> response.* SSE events, each with a sequence number."""

    def __init__(self, meta: RMeta) -> None:
        self.meta = meta
        self.seq = 0
        self.next_index = 0
        self.reasoning: tuple[int, list[str]] | None = None  # output index, text so far
        self.reasoning_closed = False
        self.message: tuple[int, list[str]] | None = None

    def _event(self, kind: str, **body) -> str:
        ev = {"type": kind, "sequence_number": self.seq, **body}
        self.seq += 1
        return sse_data(ev)

    def _index(self) -> int:
        self.next_index += 1
        return self.next_index - 1

    def feed(self, ev) -> Iterator[str]:
        if isinstance(ev, Started):
            shell = _shell(self.meta, "in_progress")
            yield self._event("response.created", response=shell)
            yield self._event("response.in_progress", response=shell)
        elif isinstance(ev, ReasoningDelta) and self.meta.summary and not self.reasoning_closed:
            yield from self._reasoning_delta(ev.text)
        elif isinstance(ev, ContentDelta) and ev.text:
            yield from self._text_delta(ev.text)
        elif isinstance(ev, Done):
            yield from self._finish(ev)

    def _reasoning_delta(self, text: str) -> Iterator[str]:
        rid = self.meta.item_id("reasoning", "rs_")
        if self.reasoning is None:
            self.reasoning = (self._index(), [])
            item = {"id": rid, "type": "reasoning", "status": "in_progress", "summary": []}
            yield self._event(
                "response.output_item.added", output_index=self.reasoning[0], item=item
            )
            yield self._event(
                "response.reasoning_summary_part.added",
                item_id=rid,
                output_index=self.reasoning[0],
                summary_index=0,
                part={"type": "summary_text", "text": ""},
            )
        self.reasoning[1].append(text)
        yield self._event(
            "response.reasoning_summary_text.delta",
            item_id=rid,
            output_index=self.reasoning[0],
            summary_index=0,
            delta=text,
        )

    def _close_reasoning(self, closed: bool) -> Iterator[str]:
        if self.reasoning is None or self.reasoning_closed:
            return
        self.reasoning_closed = True
        index, parts = self.reasoning
        rid, text = self.meta.item_id("reasoning", "rs_"), "".join(parts)
        yield self._event(
            "response.reasoning_summary_text.done",
            item_id=rid,
            output_index=index,
            summary_index=0,
            text=text,
        )
        yield self._event(
            "response.reasoning_summary_part.done",
            item_id=rid,
            output_index=index,
            summary_index=0,
            part={"type": "summary_text", "text": text},
        )
        item = _reasoning_item(self.meta, text, "completed" if closed else "incomplete")
        yield self._event("response.output_item.done", output_index=index, item=item)

    def _text_delta(self, text: str) -> Iterator[str]:
        yield from self._close_reasoning(True)
        mid = self.meta.item_id("message", "msg_")
        if self.message is None:
            self.message = (self._index(), [])
            item = {
                "id": mid,
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            yield self._event("response.output_item.added", output_index=self.message[0], item=item)
            yield self._event(
                "response.content_part.added",
                item_id=mid,
                output_index=self.message[0],
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            )
        self.message[1].append(text)
        yield self._event(
            "response.output_text.delta",
            item_id=mid,
            output_index=self.message[0],
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def _finish(self, done: Done) -> Iterator[str]:
        _, item_status = _status(done)
        yield from self._close_reasoning(done.think_closed)
        if self.message is not None:
            index, mid = self.message[0], self.meta.item_id("message", "msg_")
            text = "".join(self.message[1])
            part = {"type": "output_text", "text": text, "annotations": []}
            yield self._event(
                "response.output_text.done",
                item_id=mid,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            )
            yield self._event(
                "response.content_part.done",
                item_id=mid,
                output_index=index,
                content_index=0,
                part=part,
            )
            yield self._event(
                "response.output_item.done",
                output_index=index,
                item=_message_item(self.meta, text, item_status),
            )
        for call in done.tool_calls:
            yield from self._call(call, item_status)
        obj = response_object(done, self.meta, reasoning_streamed=self.reasoning is not None)
        kind = {
            "completed": "response.completed",
            "incomplete": "response.incomplete",
            "failed": "response.failed",
        }[obj["status"]]
        yield self._event(kind, response=obj)

    def _call(self, call: ToolCall, status: str) -> Iterator[str]:
        index = self._index()
        item = _call_item(self.meta, call, status)
        yield self._event(
            "response.output_item.added",
            output_index=index,
            item={
                **item,
                "status": "in_progress",
                **(
                    {"arguments": ""}
                    if "arguments" in item and item["type"] == "function_call"
                    else {}
                ),
                **({"input": ""} if item["type"] == "custom_tool_call" else {}),
            },
        )
        if item["type"] == "function_call":
            extra = {"namespace": item["namespace"]} if "namespace" in item else {}
            yield self._event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=index,
                delta=item["arguments"],
            )
            yield self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
                **extra,
            )
        elif item["type"] == "custom_tool_call":
            yield self._event(
                "response.custom_tool_call_input.delta",
                item_id=item["id"],
                output_index=index,
                delta=item["input"],
            )
            yield self._event(
                "response.custom_tool_call_input.done",
                item_id=item["id"],
                output_index=index,
                input=item["input"],
            )
        yield self._event("response.output_item.done", output_index=index, item=item)

    def error(self, message: str) -> str:
        return sse_data({"error": {"message": message, "type": "server_error"}}, "error")
