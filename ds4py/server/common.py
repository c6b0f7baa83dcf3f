"""Protocol-neutral pieces shared by the three APIs: errors, think mode, ids, usage, events.

The HTTP handlers turn a request into a `Job` (rendered prompt + sampling knobs) and turn the
worker's `Event`s back into their protocol. Nothing here touches the engine, FastAPI or sockets.
"""

from __future__ import annotations

import enum
import itertools
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..chat import THINK_MAX_MIN_CTX

# ---- Errors ----------------------------------------------------------------------------------


class APIError(Exception):
    """A request the server refuses; rendered in the caller's protocol error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.extra = extra


def openai_error_body(message: str, kind: str = "invalid_request_error", **extra) -> dict:
    return {"error": {"message": message, "type": kind, **extra}}


def anthropic_error_body(message: str, kind: str = "invalid_request_error", **extra) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message, **extra}}


def context_error(n_prompt: int, n_ctx: int, param: str) -> APIError:
    msg = f"Prompt has {n_prompt} tokens, but the configured context size is {n_ctx} tokens"
    return APIError(
        400, msg, param=param, code="context_length_exceeded", n_prompt_tokens=n_prompt, n_ctx=n_ctx
    )


# ---- Think mode ------------------------------------------------------------------------------


class ThinkMode(enum.Enum):
    NONE = "none"
    HIGH = "high"
    MAX = "max"

    @property
    def thinking(self) -> bool:
        return self is not ThinkMode.NONE


_EFFORTS = {
    "max": ThinkMode.MAX,
    "xhigh": ThinkMode.HIGH,
    "high": ThinkMode.HIGH,
    "medium": ThinkMode.HIGH,
    "low": ThinkMode.HIGH,
    "minimal": ThinkMode.HIGH,
    "none": ThinkMode.NONE,
}
# Model-name aliases that pick a mode when the request carries no explicit control.
MODEL_ALIASES = {"deepseek-chat": ThinkMode.NONE, "deepseek-reasoner": ThinkMode.HIGH}


def thinking_flag(value: Any) -> bool | None:
    """`thinking`/`think` as bool or {"type": "enabled"|"disabled"|"adaptive"}; None if absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is not None:
        if kind in ("enabled", "adaptive"):
            return True
        if kind == "disabled":
            return False
        raise APIError(400, f"thinking.type must be enabled or disabled, got {kind!r}")
    raise APIError(400, "thinking must be a boolean or an object with a type")


def resolve_think_mode(
    model: str | None, enabled: bool | None, effort: str | None, ctx: int
) -> ThinkMode:
    """RUNTIME.md §5.3: explicit switch, then effort, then model alias; Max needs a big ctx."""
    if effort is not None and effort not in _EFFORTS:
        raise APIError(
            400, f"unsupported reasoning effort {effort!r} (expected one of {', '.join(_EFFORTS)})"
        )
    if enabled is None and effort is None:
        mode = MODEL_ALIASES.get(model or "", ThinkMode.HIGH)
    elif enabled is False or effort == "none":
        mode = ThinkMode.NONE
    else:
        mode = _EFFORTS.get(effort or "high", ThinkMode.HIGH)
    if mode is ThinkMode.MAX and ctx < THINK_MAX_MIN_CTX:
        mode = ThinkMode.HIGH
    return mode


# ---- Ids -------------------------------------------------------------------------------------


class IdMaker:
    """Process-wide sequence for chatcmpl-N / cmpl-N plus random item and tool ids."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def seq(self) -> int:
        with self._lock:
            return next(self._seq)

    @staticmethod
    def hex(prefix: str, nbytes: int = 12) -> str:
        return prefix + secrets.token_hex(nbytes)


def tool_id(prefix: str) -> str:
    return IdMaker.hex(prefix, 16)


# ---- Jobs and events -------------------------------------------------------------------------


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.05
    seed: int | None = None


@dataclass
class ToolTail:
    """A request that ends with results for the calls of the live turn (tool-output reuse)."""

    call_ids: frozenset[str]
    head_text: str  # rendered text up to and including the EOS closing the calling turn


@dataclass
class Job:
    """Everything the worker needs for one request; built by a protocol handler."""

    kind: str  # "chat" | "completion" | "messages" | "responses"
    prompt_text: str
    prompt_ids: list[int]
    mode: ThinkMode
    max_tokens: int
    segments: list[tuple[str, bool]] = field(default_factory=list)  # prompt_text, tokenizable
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    tools_active: bool = False
    tool_id_prefix: str = "call_"
    tool_tail: ToolTail | None = None
    param: str = "messages"  # request field named by a context-length error
    # How a client that drops hidden reasoning re-renders this turn (set for chat kinds).
    render_visible: Callable[[Any], str | None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    sink: Callable[[Any], None] | None = None  # receives events, from the worker thread


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # generated before </think>

    @property
    def write_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def openai(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {
                "cached_tokens": self.cached_tokens,
                "cache_write_tokens": self.write_tokens,
            },
        }


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict  # parsed JSON object


@dataclass
class Progress:
    done: int
    total: int


@dataclass
class Started:
    usage: Usage  # prompt and cached counts known once the prompt is in the KV


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolStart:
    index: int
    id: str
    name: str


@dataclass
class ToolArgs:
    index: int
    text: str


@dataclass
class ToolEnd:
    index: int


@dataclass
class Done:
    finish: str  # "stop" | "length" | "tool_calls" | "error"
    usage: Usage
    reasoning: str | None  # None when the turn had no thinking section
    content: str  # completions: the raw text, reasoning included
    tool_calls: list[ToolCall]
    raw_dsml: str = ""  # the sampled tool-call block, byte for byte, for replay
    think_closed: bool = False  # the model wrote </think>
    stop_sequence: str | None = None  # the client stop string that ended generation
    error: str | None = None


@dataclass
class Failed:
    """The job ended before generation started (or the engine failed)."""

    error: APIError
