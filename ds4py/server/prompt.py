"""Requests -> `Job`s: render with ds4py.chat, replay sampled DSML by tool id, tokenize, check.

Owns the protocol-neutral half of every generation request: think mode, tools on/off, the
rendered prompt as trusted/untrusted segments (so client text never forges control tokens),
exact DSML replay from tool memory, the context check, and the two descriptions of the
live turn the worker may reuse (tool-output tail, reasoning-free visible transcript).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..chat import ChatFormatError, render_segments
from ..chat.dsml import TC_CLOSE, TC_OPEN
from ..tokenizer import EOS, TokenizerError
from . import anthropic, openai, responses
from .common import (
    APIError,
    Done,
    Job,
    Sampling,
    ThinkMode,
    ToolTail,
    context_error,
    resolve_think_mode,
)
from .options import ServerOptions
from .schemas import (
    ChatRequest,
    CompletionRequest,
    CountTokensRequest,
    MessagesRequest,
    ResponsesRequest,
)
from .toolmem import ToolMemory

Segments = list[tuple[str, bool]]
COMPLETION_SYSTEM = "You are a helpful assistant"
_SENTINEL = "\ue000"  # a private-use char marking "the next user turn" in a probe render
_BLOCK_HEAD = (f"\n\n{TC_OPEN}\n", True)
_BLOCK_TAIL = (f"\n{TC_CLOSE}", True)


def segments_from(segs: Segments, offset: int) -> Segments:
    """The segments of the rendered text from character `offset` on."""
    out, pos = [], 0
    for text, trusted in segs:
        end = pos + len(text)
        if end > offset:
            out.append((text[max(0, offset - pos) :], trusted))
        pos = end
    return out


class Prompter:
    """Builds jobs for the handlers (runs in the thread pool, never on the worker)."""

    def __init__(self, tokenizer, opts: ServerOptions, toolmem: ToolMemory) -> None:
        self.tok = tokenizer
        self.opts = opts
        self.toolmem = toolmem

    # ---- rendering ---------------------------------------------------------------------------

    def segments(self, messages: list[dict], tools: list[dict] | None, mode: ThinkMode) -> Segments:
        effort = "max" if mode is ThinkMode.MAX else None
        try:
            segs = render_segments(messages, tools or None, mode.thinking, effort)
        except ChatFormatError as e:
            raise APIError(400, str(e)) from None
        return self._replay(segs, messages)

    def _replay(self, segs: Segments, messages: list[dict]) -> Segments:
        """Swap each canonical tool-call block for the bytes the model sampled, when known.

        The renderer writes one block per assistant message with calls, in order; a block the
        tool memory knows (all of the message's ids -> one block) is replaced verbatim, so the
        re-rendered history equals the live KV text and its prefix is reused.
        """
        blocks = [
            self.toolmem.block_for([c.get("id", "") for c in m["tool_calls"]])
            for m in messages
            if m.get("role") == "assistant" and m.get("tool_calls")
        ]
        if not any(blocks):
            return segs
        out: Segments = []
        n, i = 0, 0
        while i < len(segs):
            if segs[i] == _BLOCK_HEAD:
                end = segs.index(_BLOCK_TAIL, i) + 1
                raw = blocks[n] if n < len(blocks) else None
                out += [(raw, True)] if raw else segs[i:end]
                n, i = n + 1, end
            else:
                out.append(segs[i])
                i += 1
        return out

    def encode(self, segs: Segments) -> list[int]:
        try:
            return self.tok.encode_segments(segs)
        except TokenizerError as e:  # e.g. a lone surrogate: JSON allows "\ud800"
            raise APIError(400, f"invalid text in the request: {e}") from None

    def _ids(self, segs: Segments, param: str) -> tuple[str, list[int]]:
        text = "".join(t for t, _ in segs)
        ids = self.encode(segs)
        if len(ids) >= self.opts.ctx:
            raise context_error(len(ids), self.opts.ctx, param)
        return text, ids

    # ---- jobs --------------------------------------------------------------------------------

    def _chat_job(self, kind: str, messages: list[dict], tools: list[dict], tools_off: bool,
                  mode: ThinkMode, param: str, tool_prefix: str) -> Job:  # fmt: skip
        # Tools stay in the prompt even with tool_choice "none" (the official serving
        # convention, CHAT.md §1), which also keeps the cached prefix; only parsing is off.
        segs = self.segments(messages, tools, mode)
        text, ids = self._ids(segs, param)
        job = Job(kind, text, ids, mode, self.opts.max_tokens, segments=segs,
                  tools_active=bool(tools) and not tools_off, tool_id_prefix=tool_prefix,
                  param=param)  # fmt: skip
        job.tool_tail = self._tool_tail(messages, tools, mode, text)
        if mode.thinking:
            job.render_visible = lambda done: self._visible(messages, tools, mode, done)
        return job

    def _tool_tail(self, messages: list[dict], tools: list[dict], mode: ThinkMode,
                   text: str) -> ToolTail | None:  # fmt: skip
        """The request ends with results for the calls of its last assistant message."""
        k = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        after = messages[k + 1 :]
        if k < 0 or not messages[k].get("tool_calls") or not after or after[0]["role"] != "tool":
            return None
        if any(m["role"] not in ("tool", "user") for m in after):
            return None
        head = "".join(t for t, _ in self.segments(messages[: k + 1], tools, mode))
        if not head.endswith(EOS) or not text.startswith(head):
            return None
        ids = frozenset(c.get("id", "") for c in messages[k]["tool_calls"])
        return ToolTail(ids, head)

    def _visible(self, messages: list[dict], tools: list[dict], mode: ThinkMode,
                 done: Done) -> str | None:  # fmt: skip
        """How this turn re-renders when the client sends it back without its reasoning."""
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in done.tool_calls]
        turn = {"role": "assistant", "content": done.content, "tool_calls": calls}
        probe = [*messages, turn, {"role": "user", "content": _SENTINEL}]
        text = "".join(t for t, _ in self.segments(probe, tools, mode))
        end = text.rfind(EOS, 0, text.rfind(_SENTINEL))
        return text[: end + len(EOS)] if end >= 0 else None

    def chat_job(self, req: ChatRequest) -> Job:
        mode = self._mode(req.model, *openai.think_controls(req))
        job = self._chat_job(
            "chat",
            openai.chat_messages(req),
            openai.chat_tools(req),
            openai.tool_choice_none(req.tool_choice),
            mode,
            "messages",
            "call_",
        )
        limit = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens  # fmt: skip
        return self._knobs(job, limit, openai.sampling(req), openai.stop_list(req.stop))

    def completion_job(self, req: CompletionRequest) -> Job:
        mode = self._mode(req.model, *openai.think_controls(req))
        messages = [
            {"role": "system", "content": COMPLETION_SYSTEM},
            {"role": "user", "content": openai.completion_prompt(req)},
        ]
        segs = self.segments(messages, None, mode)
        text, ids = self._ids(segs, "prompt")
        job = Job(
            "completion", text, ids, mode, self.opts.max_tokens, segments=segs, param="prompt"
        )
        return self._knobs(job, req.max_tokens, openai.sampling(req), openai.stop_list(req.stop))

    def messages_job(self, req: MessagesRequest) -> Job:
        mode = self._mode(req.model, *anthropic.think_controls(req))
        msgs = anthropic.messages(req)
        _check_results_have_calls(msgs, "Anthropic", "tool_use_id", "messages")
        job = self._chat_job(
            "messages",
            msgs,
            anthropic.tools(req),
            anthropic.tool_choice_none(req),
            mode,
            "messages",
            "toolu_",
        )
        s = Sampling()
        for name in ("temperature", "top_p", "top_k"):
            if getattr(req, name) is not None:
                setattr(s, name, getattr(req, name))
        return self._knobs(job, req.max_tokens, s, openai.stop_list(req.stop_sequences))

    def count_messages(self, req: CountTokensRequest) -> int:
        mode = self._mode(req.model, *anthropic.think_controls(req))
        segs = self.segments(anthropic.messages(req), anthropic.tools(req), mode)
        return len(self.encode(segs))

    def responses_job(self, req: ResponsesRequest) -> tuple[Job, dict]:
        responses.check_stateless(req)
        tools_off = responses.tool_choice_none(req)
        mode = self._mode(req.model, *responses.think_controls(req))
        inp = responses.input_messages(req)
        tools = responses.tools(req, inp.extra_tools)
        job = self._chat_job(
            "responses", inp.messages, tools.schemas, tools_off, mode, "input", "call_"
        )
        limit = req.max_output_tokens if req.max_output_tokens is not None else req.max_tokens
        s = Sampling()
        for name in ("temperature", "top_p"):
            if getattr(req, name) is not None:
                setattr(s, name, getattr(req, name))
        return self._knobs(job, limit, s, []), tools.wire

    # ---- helpers -----------------------------------------------------------------------------

    def _mode(self, model: str | None, enabled: bool | None, effort: str | None) -> ThinkMode:
        return resolve_think_mode(model, enabled, effort, self.opts.ctx)

    @staticmethod
    def _knobs(job: Job, limit: int | None, sampling: Sampling, stop: Sequence[str]) -> Job:
        if limit is not None:
            job.max_tokens = max(0, limit)
        job.sampling = sampling
        job.stop = list(stop)
        return job


def _check_results_have_calls(msgs: list[dict], api: str, key: str, param: str) -> None:
    """Every tool result must answer a call in the same request (no server-side history)."""
    seen: set[str] = set()
    for m in msgs:
        seen.update(c.get("id", "") for c in m.get("tool_calls") or [])
        if m["role"] == "tool" and m.get("tool_call_id", "") not in seen:
            raise APIError(400, f"{api} continuation state is not available for {key} "
                                f"{m.get('tool_call_id')}; retry by replaying the full "
                                "messages history", param=param)  # fmt: skip
