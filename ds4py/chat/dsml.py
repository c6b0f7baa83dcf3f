"""DSML (DeepSeek V4 tool-call markup): tools prompt, history encoder, whole and stream parsers.

Owns: the tools block of the system prompt, DSML rendering of assistant tool calls in history,
parsing generated text into reasoning / content / tool calls (`parse`), and the incremental
`StreamParser` that yields the same result as events. Rendering follows DeepSeek's official
`encoding_dsv4.py` byte for byte (see CHAT.md); the parser accepts exactly that grammar, with
whitespace between tags tolerated, never decodes entities, and turns anything malformed or
unterminated into plain content with `malformed=True`. Message layout lives in `template.py`.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ds4py.tokenizer import DSML, END_THINK, EOS, THINK

TC_OPEN = f"<{DSML}tool_calls>"
TC_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_OPEN = f"<{DSML}parameter"
PARAM_CLOSE = f"</{DSML}parameter>"

# (text, trusted): trusted text comes from the template and may contain special-token literals;
# untrusted text comes from the client and is tokenized as plain text (see ds4py.chat docs).
Segment = tuple[str, bool]

TOOLS_HEAD = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by \
writing a "{TC_OPEN}" block like the following:

{TC_OPEN}
{INVOKE_OPEN} name="$TOOL_NAME">
{PARAM_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAM_CLOSE}
...
{INVOKE_CLOSE}
{INVOKE_OPEN} name="$TOOL_NAME2">
...
{INVOKE_CLOSE}
{TC_CLOSE}

String parameters should be specified as is and set `string="true"`. For all other types \
(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete reasoning \
inside {THINK}...{END_THINK} BEFORE any tool calls or final response.

Otherwise, output directly after {END_THINK} with tool calls or final response.

### Available Tool Schemas

"""
TOOLS_TAIL = """

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


class DsmlError(ValueError):
    """A tool-call block that does not follow the DSML grammar."""


def to_json(value: Any) -> str:
    """JSON exactly as the official encoder writes it: default separators, non-ASCII raw."""
    return json.dumps(value, ensure_ascii=False)


# ---- Rendering ----


def tools_segments(functions: list[dict]) -> list[Segment]:
    """The tools block: one JSON schema per line between the fixed instruction texts."""
    schemas = "\n".join(to_json(f) for f in functions)
    return [(TOOLS_HEAD, True), (schemas, False), (TOOLS_TAIL, True)]


def render_tools(functions: list[dict]) -> str:
    return "".join(text for text, _ in tools_segments(functions))


def tool_calls_segments(calls: list[tuple[str, dict]]) -> list[Segment]:
    """DSML block for an assistant turn's (name, arguments) calls, with its leading blank line."""
    out: list[Segment] = [(f"\n\n{TC_OPEN}\n", True)]
    for n, (name, args) in enumerate(calls):
        out += [
            (("\n" if n else "") + f'{INVOKE_OPEN} name="', True),
            (name, False),
            ('">\n', True),
        ]
        for j, (key, value) in enumerate(args.items()):
            is_str = isinstance(value, str)
            out += [
                (("\n" if j else "") + f'{PARAM_OPEN} name="', True),
                (key, False),
                (f'" string="{"true" if is_str else "false"}">', True),
                (value if is_str else to_json(value), False),
                (PARAM_CLOSE, True),
            ]
        out.append((f"\n{INVOKE_CLOSE}", True))
    out.append((f"\n{TC_CLOSE}", True))
    return out


def encode_tool_calls(calls: list[tuple[str, dict]]) -> str:
    return "".join(text for text, _ in tool_calls_segments(calls))


# ---- Parse results and stream events ----


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None

    @property
    def arguments_json(self) -> str:
        """Arguments as JSON text; equals the concatenated `ToolCallDelta`s of the stream."""
        return to_json(self.arguments)


@dataclass
class ParsedMessage:
    """One generated assistant turn. `reasoning` is None when the turn had no thinking section.

    malformed: a tool-call block was started but is invalid or unterminated; its raw text is
    kept in `content` and `error` says why. reasoning_unterminated: thinking never reached
    `</think>` (e.g. cut by the length limit); the text stays in `reasoning`.
    raw_dsml: exact text of a valid block (leading newlines included), for replay.
    """

    reasoning: str | None
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: bool = False
    error: str | None = None
    reasoning_unterminated: bool = False
    raw_dsml: str | None = None


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ReasoningEnd:
    """`</think>` was generated: reasoning is complete."""


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of the call's arguments JSON text (fragments concatenate to valid JSON)."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCallsDone:
    """The tool-call block closed: generation can stop; `raw_dsml` is its exact text."""

    raw_dsml: str


@dataclass(frozen=True)
class MalformedDsml:
    """The tool-call block is invalid: discard the block's tool-call events; `text` is content."""

    text: str
    error: str


Event = (
    ReasoningDelta
    | ReasoningEnd
    | ContentDelta
    | ToolCallStart
    | ToolCallDelta
    | ToolCallEnd
    | ToolCallsDone
    | MalformedDsml
)


def collect(events: Iterable[Event], thinking: bool) -> ParsedMessage:
    """Fold stream events into the message they describe (what `parse` returns)."""
    msg = ParsedMessage(reasoning="" if thinking else None, content="")
    ended = False
    for ev in events:
        if isinstance(ev, ReasoningDelta):
            msg.reasoning = (msg.reasoning or "") + ev.text
        elif isinstance(ev, ReasoningEnd):
            ended = True
        elif isinstance(ev, ContentDelta):
            msg.content += ev.text
        elif isinstance(ev, ToolCallStart):
            msg.tool_calls.append(ToolCall(ev.name, {}))
        elif isinstance(ev, ToolCallEnd):
            msg.tool_calls[ev.index].arguments = ev.arguments
        elif isinstance(ev, ToolCallsDone):
            msg.raw_dsml = ev.raw_dsml
        elif isinstance(ev, MalformedDsml):
            msg.content += ev.text
            msg.tool_calls, msg.malformed, msg.error = [], True, ev.error
    msg.reasoning_unterminated = thinking and not ended
    return msg


# ---- Block grammar (shared by both parsers) ----

_WS = " \t\r\n"
_INVOKE_ATTRS = re.compile(r'[ \t\r\n]+name="([^"]*)"[ \t\r\n]*>')
_PARAM_ATTRS = re.compile(
    r'[ \t\r\n]+name="([^"]*)"(?:[ \t\r\n]+string="(true|false)")?[ \t\r\n]*>'
)


class _Incomplete(Exception):
    """The text ends before the construct being read is complete."""


@dataclass
class _Call:
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    json: str = ""  # arguments JSON text readable so far
    closed: bool = False
    open_value: bool | None = None  # the text ends inside a value: True string, False JSON


@dataclass
class _Scan:
    calls: list[_Call]
    end: int | None = None  # index just after the closing tag
    error: str | None = None


def _scan_block(text: str, pos: int, final: bool) -> _Scan:
    """Read the block whose opening tag starts at text[pos]; `final` = no more text will come."""
    calls: list[_Call] = []
    i = pos + len(TC_OPEN)
    try:
        while True:
            i = _expect(text, i, (TC_CLOSE, INVOKE_OPEN))
            if text.startswith(TC_CLOSE, i):
                return _Scan(calls, end=i + len(TC_CLOSE))
            i = _scan_invoke(text, i, calls)
    except _Incomplete:
        return _Scan(calls, error="unterminated tool call block" if final else None)
    except DsmlError as e:
        return _Scan(calls, error=str(e))


def _scan_invoke(text: str, i: int, calls: list[_Call]) -> int:
    end = _tag_end(text, i)
    m = _INVOKE_ATTRS.fullmatch(text, i + len(INVOKE_OPEN), end)
    if not m:
        raise DsmlError(f"bad invoke tag {text[i:end]!r}")
    call = _Call(m[1])
    calls.append(call)
    i = end
    while True:
        i = _expect(text, i, (INVOKE_CLOSE, PARAM_OPEN))
        if text.startswith(INVOKE_CLOSE, i):
            call.json = call.json + "}" if call.args else "{}"
            call.closed = True
            return i + len(INVOKE_CLOSE)
        i = _scan_param(text, i, call)


def _scan_param(text: str, i: int, call: _Call) -> int:
    end = _tag_end(text, i)
    m = _PARAM_ATTRS.fullmatch(text, i + len(PARAM_OPEN), end)
    if not m:
        raise DsmlError(f"bad parameter tag {text[i:end]!r}")
    key, is_str = m[1], m[2] != "false"
    if key in call.args:
        raise DsmlError(f"duplicate parameter {key!r} in call {call.name!r}")
    head = call.json + ("{" if not call.args else ", ") + to_json(key) + ": "
    close = text.find(PARAM_CLOSE, end)
    if close < 0:
        # Stream string values as they come, minus a possible partial closing tag.
        partial = text[end : len(text) - _partial_suffix(text, PARAM_CLOSE, end)]
        call.json = head + ('"' + to_json(partial)[1:-1] if is_str else "")
        call.open_value = is_str
        raise _Incomplete
    value = text[end:close]
    call.args[key] = value if is_str else _json_value(value)
    call.json = head + to_json(call.args[key])
    return close + len(PARAM_CLOSE)


def _json_value(raw: str) -> Any:
    """A `string="false"` value; text that is not JSON is kept as the raw string."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw


def _expect(text: str, i: int, literals: tuple[str, ...]) -> int:
    """Skip whitespace, then require one of `literals` (or a prefix of one at the text end)."""
    while i < len(text) and text[i] in _WS:
        i += 1
    rest = text[i : i + max(map(len, literals))]
    if any(rest.startswith(lit) for lit in literals):
        return i
    if any(lit.startswith(rest) for lit in literals):
        raise _Incomplete
    raise DsmlError(f"expected {' or '.join(literals)}, got {text[i]!r}")


def _tag_end(text: str, i: int) -> int:
    end = text.find(">", i)
    if end < 0:
        raise _Incomplete
    return end + 1


def _partial_suffix(text: str, literal: str, start: int = 0) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of `literal`."""
    for n in range(min(len(literal) - 1, len(text) - start), 0, -1):
        if text.endswith(literal[:n]):
            return n
    return 0


# ---- Whole-text parser ----


def parse(text: str, thinking: bool | None = None) -> ParsedMessage:
    """Parse one generated assistant turn (the text after the prompt's assistant prefix).

    thinking=True: the text starts inside the reasoning (prefix ended with `<think>`);
    False: it is all content; None: thinking iff the text contains `</think>` or starts with
    `<think>`. Text from an end-of-sentence literal on is ignored.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    text = text.partition(EOS)[0]
    if thinking is None:
        thinking = END_THINK in text or text.startswith(THINK)
    if not thinking:
        return _parse_body(text, ParsedMessage(reasoning=None, content=""))
    body = text[len(THINK) :] if text.startswith(THINK) else text
    reasoning, sep, body = body.partition(END_THINK)
    msg = ParsedMessage(reasoning=reasoning, content="", reasoning_unterminated=not sep)
    return _parse_body(body, msg)


def _parse_body(body: str, msg: ParsedMessage) -> ParsedMessage:
    pos = body.find(TC_OPEN)
    if pos < 0:
        msg.content = body
        return msg
    scan = _scan_block(body, pos, final=True)
    if scan.error is not None:
        msg.content, msg.malformed, msg.error = body, True, scan.error
        return msg
    msg.content = _before_block(body[:pos])
    msg.tool_calls = [ToolCall(c.name, c.args) for c in scan.calls]
    msg.raw_dsml = body[len(msg.content) : scan.end]
    return msg


def _before_block(text: str) -> str:
    """Content before a tool-call block: the blank line that introduces the block is not content.

    The official format puts exactly "\n\n" there; a lone "\n" is tolerated the same way.
    """
    return text[:-2] if text.endswith("\n\n") else text.removesuffix("\n")


# ---- Streaming parser ----


class StreamParser:
    """Incremental `parse`: feed generated text (str, or bytes split anywhere) and get events.

    Never emits part of a tag, of `</think>` or of a UTF-8 character: such suffixes are held
    back until they resolve. `collect(all events, thinking)` equals `parse(whole text, thinking)`.
    `done` turns true once the tool-call block has closed (the caller may stop generating).
    """

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._eos_hold = ""  # a possible partial end-of-sentence literal
        self._eos_seen = False
        self._state = "start" if thinking else "content"
        self._buf = ""  # text not yet resolved in the current state
        self._block = ""  # raw block text (leading newlines included) while in "block"
        self._tc_pos = 0
        self._sent: list[tuple[int, bool]] = []  # per call: JSON chars sent, end sent
        self._open_value: tuple[int, bool] | None = None  # (block offset read, is string)
        self._events: list[Event] = []

    @property
    def done(self) -> bool:
        return self._state == "after"

    def feed(self, data: str | bytes) -> list[Event]:
        text = self._utf8.decode(data) if isinstance(data, bytes) else data
        return self._run(self._cut_eos(text), final=False)

    def finish(self) -> list[Event]:
        tail = self._cut_eos(self._utf8.decode(b"", final=True))
        if not self._eos_seen:
            tail, self._eos_hold = tail + self._eos_hold, ""
        return self._run(tail, final=True)

    def result(self) -> ParsedMessage:
        """The message so far (complete after `finish`)."""
        return collect(self._events, self.thinking)

    def _cut_eos(self, text: str) -> str:
        """Forward text before the first end-of-sentence literal; drop everything after it."""
        if self._eos_seen:
            return ""
        text = self._eos_hold + text
        head, sep, _ = text.partition(EOS)
        if sep:
            self._eos_seen, self._eos_hold = True, ""
            return head
        hold = _partial_suffix(text, EOS)
        self._eos_hold = text[len(text) - hold :]
        return text[: len(text) - hold]

    def _run(self, text: str, final: bool) -> list[Event]:
        out: list[Event] = []
        self._buf += text
        step = {"start": self._start, "reasoning": self._reasoning, "content": self._content}
        while self._state in step and step[self._state](out, final):
            pass
        if self._state == "block":
            self._block += self._buf
            self._buf = ""
            self._scan(out, final)
        elif self._state == "raw" and self._buf:
            out.append(ContentDelta(self._buf))
            self._buf = ""
        elif self._state == "after":
            self._buf = ""
        self._events += out
        return out

    # Each state step returns True when it moved to another state and the loop should go on.

    def _start(self, out: list[Event], final: bool) -> bool:
        if self._buf.startswith(THINK):
            self._buf = self._buf[len(THINK) :]
        elif THINK.startswith(self._buf) and not final:
            return False
        self._state = "reasoning"
        return True

    def _reasoning(self, out: list[Event], final: bool) -> bool:
        head, sep, tail = self._buf.partition(END_THINK)
        if sep:
            _emit(out, ReasoningDelta, head)
            out.append(ReasoningEnd())
            self._buf, self._state = tail, "content"
            return True
        keep = 0 if final else _partial_suffix(self._buf, END_THINK)
        self._buf = _emit_head(out, ReasoningDelta, self._buf, keep)
        return False

    def _content(self, out: list[Event], final: bool) -> bool:
        pos = self._buf.find(TC_OPEN)
        if pos >= 0:
            before = _before_block(self._buf[:pos])
            _emit(out, ContentDelta, before)
            self._block, self._tc_pos = "", pos - len(before)
            self._buf, self._state = self._buf[len(before) :], "block"
            return False
        keep = 0 if final else _block_hold(self._buf)
        self._buf = _emit_head(out, ContentDelta, self._buf, keep)
        return False

    def _scan(self, out: list[Event], final: bool) -> None:
        if self._open_value is not None and not final and self._extend_value(out):
            return
        scan = _scan_block(self._block, self._tc_pos, final)
        for n, call in enumerate(scan.calls):
            if n == len(self._sent):
                self._sent.append((0, False))
                out.append(ToolCallStart(n, call.name))
            sent, ended = self._sent[n]
            if len(call.json) > sent:
                out.append(ToolCallDelta(n, call.json[sent:]))
            if call.closed and not ended:
                out.append(ToolCallEnd(n, call.name, call.args))
            self._sent[n] = (len(call.json), call.closed)
        last = scan.calls[-1] if scan.calls else None
        self._open_value = None
        if scan.error is not None:
            out.append(MalformedDsml(self._block, scan.error))
            self._state = "raw"
        elif scan.end is not None:
            out.append(ToolCallsDone(self._block[: scan.end]))
            self._state = "after"
        elif last is not None and last.open_value is not None:
            read = len(self._block) - _partial_suffix(self._block, PARAM_CLOSE)
            self._open_value = (read, last.open_value)

    def _extend_value(self, out: list[Event]) -> bool:
        """Fast path while a long value streams in: read only the new text, no full rescan.

        A closing tag cannot start before the offset already read (a possible partial tag was
        held back), so if none starts after it the value just grew. False: rescan needed.
        """
        read, is_str = self._open_value
        if self._block.find(PARAM_CLOSE, read) >= 0:
            return False
        end = len(self._block) - _partial_suffix(self._block, PARAM_CLOSE, read)
        delta = to_json(self._block[read:end])[1:-1] if is_str else ""
        if delta:
            n = len(self._sent) - 1
            out.append(ToolCallDelta(n, delta))
            self._sent[n] = (self._sent[n][0] + len(delta), False)
        self._open_value = (end, is_str)
        return True


def _emit(out: list[Event], kind: type, text: str) -> None:
    if text:
        out.append(kind(text))


def _emit_head(out: list[Event], kind: type, buf: str, keep: int) -> str:
    """Emit all of `buf` but its last `keep` chars (they may still become a marker); return them."""
    _emit(out, kind, buf[: len(buf) - keep])
    return buf[len(buf) - keep :]


def _block_hold(buf: str) -> int:
    """Hold a partial block opener and the newlines before it (they belong to the block)."""
    n = _partial_suffix(buf, TC_OPEN)
    while n < len(buf) and buf[len(buf) - n - 1] == "\n":
        n += 1
    return n


def iter_events(chunks: Iterable[str | bytes], thinking: bool) -> Iterator[Event]:
    """Run a StreamParser over `chunks` and yield its events, finishing at the end."""
    parser = StreamParser(thinking)
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.finish()
