"""Chat messages -> DeepSeek V4 prompt, byte-identical to DeepSeek's official `encoding_dsv4.py`.

Owns: message validation, the official preprocessing (tool results merged into user turns and
sorted by call order, consecutive user messages merged, old reasoning dropped without tools),
thinking / non-thinking / Think Max layout, and the trusted/untrusted segmentation of the text.
Serving convention (sglang/vLLM): an empty system message is inserted when the conversation
lacks one, and the tools go on messages[0]. DSML and tool schemas live in `dsml.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ds4py.chat.dsml import Segment, tool_calls_segments, tools_segments
from ds4py.tokenizer import ASSISTANT, BOS, END_THINK, EOS, THINK, USER, Tokenizer

LATEST_REMINDER = "<｜latest_reminder｜>"

THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)
# Think Max needs a long context to be useful; below this ctx it renders as plain thinking (ds4).
THINK_MAX_MIN_CTX = 393216
EFFORTS = (None, "none", "minimal", "low", "medium", "high", "max")
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "latest_reminder")


class ChatFormatError(ValueError):
    """A message list or tool list that cannot be rendered."""


@dataclass
class _Block:
    """One part of a (merged) user turn: plain text or a tool result."""

    text: str
    tool_call_id: str | None = None
    is_result: bool = False


@dataclass
class _Msg:
    role: str
    content: str = ""
    reasoning: str = ""
    calls: list[tuple[str, dict]] = field(default_factory=list)
    call_ids: list[str] = field(default_factory=list)
    blocks: list[_Block] | None = None  # user turns only


# ---- Public API ----


def render(
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    thinking: bool = True,
    effort: str | None = None,
    ctx: int | None = None,
) -> str:
    """The full prompt text: BOS first, ending with the assistant prefix when a turn is due.

    effort="max" adds the Think Max prefix in thinking mode, unless `ctx` is given and smaller
    than THINK_MAX_MIN_CTX; other efforts render like None.
    """
    return "".join(text for text, _ in render_segments(messages, tools, thinking, effort, ctx))


def render_ids(
    messages: Sequence[dict],
    tokenizer: Tokenizer,
    tools: Sequence[dict] | None = None,
    thinking: bool = True,
    effort: str | None = None,
    ctx: int | None = None,
) -> list[int]:
    """Prompt token ids; special-token literals inside client text stay plain text."""
    return tokenizer.encode_segments(render_segments(messages, tools, thinking, effort, ctx))


def render_segments(
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    thinking: bool = True,
    effort: str | None = None,
    ctx: int | None = None,
) -> list[Segment]:
    """The prompt as (text, trusted) segments: template text is trusted, client text is not."""
    if effort not in EFFORTS:
        raise ChatFormatError(f"effort must be one of {EFFORTS}, got {effort!r}")
    msgs = [_normalize(i, m) for i, m in enumerate(_as_list(messages, "messages"))]
    functions = _functions(tools)
    if not msgs or msgs[0].role != "system":
        msgs.insert(0, _Msg("system"))
    msgs = _sort_tool_results(_merge_user_turns(msgs))
    # The official encoder keeps every turn's reasoning as soon as tools are present.
    drop = not functions
    if thinking and drop:
        msgs = _drop_old_reasoning(msgs)
    think_max = thinking and effort == "max" and (ctx is None or ctx >= THINK_MAX_MIN_CTX)
    out: list[Segment] = [(BOS, True)]
    if think_max:
        out.append((THINK_MAX_PREFIX, True))
    last_user = _last_user_index(msgs)
    for i, msg in enumerate(msgs):
        out += _render_message(
            msg, functions if i == 0 else [], thinking, not drop or i > last_user
        )
        nxt = msgs[i + 1].role if i + 1 < len(msgs) else None
        if nxt in (None, "assistant", "latest_reminder") and msg.role in ("user", "developer"):
            opener = THINK if thinking and (not drop or i >= last_user) else END_THINK
            out.append((ASSISTANT + opener, True))
    return out


# ---- Rendering one message ----


def _render_message(
    msg: _Msg, functions: list[dict], thinking: bool, keep_reasoning: bool
) -> list[Segment]:
    if msg.role == "system":
        tools = [("\n\n", True), *tools_segments(functions)] if functions else []
        return [(msg.content, False), *tools]
    if msg.role == "developer":
        return [(USER, True), (msg.content, False)]
    if msg.role == "latest_reminder":
        return [(LATEST_REMINDER, True), (msg.content, False)]
    if msg.role == "user":
        out: list[Segment] = [(USER, True)]
        for n, block in enumerate(msg.blocks or []):
            if n:
                out.append(("\n\n", True))
            if block.is_result:
                out += [("<tool_result>", True), (block.text, False), ("</tool_result>", True)]
            else:
                out.append((block.text, False))
        return out
    out = [(msg.reasoning, False), (END_THINK, True)] if thinking and keep_reasoning else []
    out.append((msg.content, False))
    if msg.calls:
        out += tool_calls_segments(msg.calls)
    return [*out, (EOS, True)]


# ---- Official preprocessing ----


def _merge_user_turns(msgs: list[_Msg]) -> list[_Msg]:
    """Tool results become user turns; a user or tool message right after a user turn joins it."""
    merged: list[_Msg] = []
    for msg in msgs:
        if msg.role in ("user", "tool") and merged and merged[-1].role == "user":
            merged[-1].blocks = [*(merged[-1].blocks or []), *(msg.blocks or [])]
        elif msg.role == "tool":
            merged.append(_Msg("user", blocks=msg.blocks))
        else:
            merged.append(msg)
    return merged


def _sort_tool_results(msgs: list[_Msg]) -> list[_Msg]:
    """Put a turn's tool results in the order of the preceding assistant's tool calls."""
    order: dict[str, int] = {}
    for msg in msgs:
        if msg.role == "assistant" and msg.calls:
            order = {cid: n for n, cid in enumerate(msg.call_ids) if cid}
        elif msg.role == "user" and msg.blocks and order:
            results = [b for b in msg.blocks if b.is_result]
            if len(results) > 1:
                ranked = iter(sorted(results, key=lambda b: order.get(b.tool_call_id or "", 0)))
                msg.blocks = [next(ranked) if b.is_result else b for b in msg.blocks]
    return msgs


def _drop_old_reasoning(msgs: list[_Msg]) -> list[_Msg]:
    """Before the last user turn: assistants lose reasoning, developer messages disappear."""
    last_user = _last_user_index(msgs)
    kept = []
    for i, msg in enumerate(msgs):
        if i >= last_user or msg.role in ("user", "system", "latest_reminder"):
            kept.append(msg)
        elif msg.role == "assistant":
            kept.append(replace(msg, reasoning=""))
    return kept


def _last_user_index(msgs: list[_Msg]) -> int:
    return max((i for i, m in enumerate(msgs) if m.role in ("user", "developer")), default=-1)


# ---- Input validation / normalization ----


def _normalize(index: int, message: Any) -> _Msg:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ChatFormatError(f"{where} must be an object, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ChatFormatError(f"{where}.role must be one of {ROLES}, got {role!r}")
    content = message.get("content")
    if role in ("tool", "function"):
        text = _text(content, f"{where}.content", "\n\n")
        cid = message.get("tool_call_id")
        return _Msg("tool", blocks=[_Block(text, cid if isinstance(cid, str) else None, True)])
    if role == "user":
        return _Msg("user", blocks=_user_blocks(content, f"{where}.content"))
    msg = _Msg(role, content=_text(content, f"{where}.content", "\n\n"))
    if role == "assistant":
        reasoning = message.get("reasoning_content", message.get("reasoning"))
        msg.reasoning = _text(reasoning, f"{where}.reasoning_content", "")
        calls = _as_list(message.get("tool_calls") or [], f"{where}.tool_calls")
        for n, call in enumerate(calls):
            name, args, cid = _tool_call(call, f"{where}.tool_calls[{n}]")
            msg.calls.append((name, args))
            msg.call_ids.append(cid)
    return msg


def _user_blocks(content: Any, where: str) -> list[_Block]:
    """User content: a string, or parts where Anthropic-style `tool_result` parts are results."""
    if not isinstance(content, list):
        return [_Block(_text(content, where, ""))]
    blocks = []
    for n, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "tool_result":
            text = _text(part.get("content", ""), f"{where}[{n}].content", "\n\n")
            blocks.append(_Block(text, part.get("tool_use_id"), True))
        else:
            blocks.append(_Block(_part_text(part, f"{where}[{n}]")))
    return blocks


def _text(content: Any, where: str, sep: str) -> str:
    """String content, or a list of parts joined by `sep` (the official tool-content rule)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return sep.join(_part_text(p, f"{where}[{n}]") for n, p in enumerate(content))
    raise ChatFormatError(f"{where} must be a string or a list of parts")


def _part_text(part: Any, where: str) -> str:
    if not isinstance(part, dict):
        raise ChatFormatError(f"{where} must be an object with a 'type'")
    if part.get("type") == "text":
        text = part.get("text", "")
        if not isinstance(text, str):
            raise ChatFormatError(f"{where}.text must be a string")
        return text
    return f"[Unsupported {part.get('type')}]"


def _tool_call(call: Any, where: str) -> tuple[str, dict, str]:
    if not isinstance(call, dict):
        raise ChatFormatError(f"{where} must be an object")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatFormatError(f"{where}.function.name must be a string")
    cid = call.get("id") or fn.get("id") or ""
    return fn["name"], call_arguments(fn.get("arguments")), cid if isinstance(cid, str) else ""


def call_arguments(raw: Any) -> dict:
    """Arguments of a history tool call as the official encoder reads them.

    A JSON-object string is parsed (key order kept); any other string is wrapped as
    {"arguments": raw} like the official encoder. A dict is used as is; None means no arguments.
    """
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise ChatFormatError(
            f"tool call arguments must be a JSON string, got {type(raw).__name__}"
        )
    try:
        value = json.loads(raw)
    except ValueError:
        return {"arguments": raw}
    return value if isinstance(value, dict) else {"arguments": raw}


def _functions(tools: Sequence[dict] | None) -> list[dict]:
    """OpenAI function tools -> their `function` objects (a bare function object is accepted)."""
    out = []
    for n, tool in enumerate(_as_list(tools or [], "tools")):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"tools[{n}] must be {{'type': 'function', 'function': {{...}}}}")
        out.append(fn)
    return out


def _as_list(value: Any, where: str) -> list:
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Sequence):
        raise ChatFormatError(f"{where} must be a list")
    return list(value)
