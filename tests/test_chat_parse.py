"""Parser tests: whole-text `parse` against the official parser's results, the streaming parser
split at every byte, and malformed / unterminated DSML.

The `generations` in tests/data/chat_golden.json are assistant turns rendered by DeepSeek's
official encoder (plus four hand-written texts) and the results of its official
`parse_message_from_completion_text` on them; see tests/test_chat.py for provenance.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ds4py.chat import (
    ContentDelta,
    MalformedDsml,
    ReasoningDelta,
    ReasoningEnd,
    StreamParser,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallsDone,
    ToolCallStart,
    collect,
    encode_tool_calls,
    iter_events,
    parse,
)

GOLDEN = json.loads((Path(__file__).parent / "data" / "chat_golden.json").read_text("utf-8"))
GENERATIONS = GOLDEN["generations"]

D = "｜DSML｜"
CALL = (
    f'\n\n<{D}tool_calls>\n<{D}invoke name="f">\n'
    f'<{D}parameter name="a" string="true">v</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>'
)
OPEN = f'\n\n<{D}tool_calls>\n<{D}invoke name="f">\n'
MALFORMED = [
    # (text, thinking, error fragment)
    (f'r</think>ok{OPEN}<{D}parameter name="a" string="true">cut', True, "unterminated"),
    (f'x\n\n<{D}tool_calls>\n<{D}invoke nam="f">\n</{D}invoke>\n</{D}tool_calls>', False, "invoke"),
    (
        f'x{OPEN}<{D}parameter name="a">1</{D}parameter>\n<{D}parameter name="a">2</{D}parameter>',
        False,
        "duplicate",
    ),
    (f"x\n\n<{D}tool_calls>\ngarbage\n</{D}tool_calls>", False, "expected"),
    (f"x\n\n<{D}tool_calls>\n<{D}invoke", False, "unterminated"),
    (f'x{OPEN}<{D}parameter name="a" string="maybe">1</{D}parameter>', False, "parameter"),
]
EDGE = [
    ("reasoning cut off by length", True),
    ("<think>r</think>c", True),
    ("<thi", True),
    ("a\n\n<｜DSML｜tool_call", False),
    ("a\n\n\n", False),
    ("a\n\n" + CALL, False),
    ("a\n\n<｜end▁of▁sent", False),
    ("r</think>" + CALL + "\n\ntrailing text<｜end▁of▁sentence｜>junk", True),
    ("😀中文 emoji</think>é" + CALL, True),
    ("a" + CALL.replace("\n", "  \n\t"), False),
    ("", True),
    ("", False),
]
STREAM_TEXTS = [(g["text"], g["thinking"]) for g in GENERATIONS]
STREAM_TEXTS += [(t, th) for t, th, _ in MALFORMED] + EDGE


def _calls(msg) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in msg.tool_calls]


# ---- whole-text parser vs the official parser ----


@pytest.mark.parametrize("gen", GENERATIONS, ids=range(len(GENERATIONS)))
def test_parse_matches_official(gen: dict) -> None:
    msg = parse(gen["text"], thinking=gen["thinking"])
    assert msg.reasoning == (gen["reasoning"] if gen["thinking"] else None)
    assert msg.content == gen["content"]
    assert _calls(msg) == [(t["name"], t["arguments"]) for t in gen["tool_calls"]]
    assert not msg.malformed and not msg.reasoning_unterminated
    assert parse(gen["text"]) == msg  # auto-detected mode agrees
    if msg.tool_calls:
        body = gen["text"].split("</think>", 1)[-1]
        assert msg.raw_dsml == body[len(msg.content) :].split("<｜end▁of▁sentence｜>")[0]


@pytest.mark.parametrize(("text", "thinking", "error"), MALFORMED)
def test_malformed_dsml_becomes_content(text: str, thinking: bool, error: str) -> None:
    msg = parse(text, thinking=thinking)
    assert msg.malformed and error in msg.error
    assert msg.tool_calls == [] and msg.raw_dsml is None
    assert msg.content == (text.split("</think>", 1)[1] if thinking else text)


def test_parser_rules() -> None:
    # Entities are data, never decoded (CHAT.md P1).
    ent = parse(CALL.replace(">v<", ">&lt;div&gt; &amp;&amp; &quot;q&quot;<"), thinking=False)
    assert ent.tool_calls[0].arguments == {"a": "&lt;div&gt; &amp;&amp; &quot;q&quot;"}
    # DSML inside reasoning is reasoning, not a call (P5).
    inner = parse("plan:" + CALL + "</think>done", thinking=True)
    assert inner.tool_calls == [] and inner.content == "done" and CALL in inner.reasoning
    # Unterminated reasoning keeps its text as reasoning and is flagged (P6).
    cut = parse("still thinking", thinking=True)
    assert cut.reasoning == "still thinking" and cut.content == "" and cut.reasoning_unterminated
    # Non-JSON in a string="false" value is kept as text; JSON is parsed.
    raw = CALL.replace('string="true">v', 'string="false">not json')
    assert parse(raw, thinking=False).tool_calls[0].arguments == {"a": "not json"}
    typed = CALL.replace('string="true">v', 'string="false">{"k": [1, null]}')
    assert parse(typed, thinking=False).tool_calls[0].arguments == {"a": {"k": [1, None]}}
    # Only the newlines before the block are consumed; text after it and after EOS is dropped.
    msg = parse("Ok.  " + CALL + " tail<｜end▁of▁sentence｜>x", thinking=False)
    assert msg.content == "Ok.  " and _calls(msg) == [("f", {"a": "v"})]
    assert parse("line\n" + CALL, thinking=False).content == "line\n"  # only the blank line goes
    assert parse("hi<｜end▁of▁sentence｜>more", thinking=False).content == "hi"
    assert parse("no thinking here").reasoning is None


def test_render_parse_round_trip() -> None:
    rng = random.Random(3)
    alphabet = list("ab <>&\"'\\\n\t{}[]:,😀中é") + [
        "</tool_result>",
        "<think>",
        "｜DSML｜",
        "&amp;",
    ]
    for _ in range(100):
        text = lambda: "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        calls = [
            (f"tool_{n}", {f"k{j}": rng.choice([text(), rng.random(), [text(), None], {"x": True}])
                           for j in range(rng.randint(0, 3))})
            for n in range(rng.randint(1, 3))
        ]  # fmt: skip
        msg = parse("answer" + encode_tool_calls(calls), thinking=False)
        assert msg.content == "answer" and not msg.malformed
        assert _calls(msg) == calls


# ---- streaming parser ----


@pytest.mark.parametrize(("text", "thinking"), STREAM_TEXTS, ids=range(len(STREAM_TEXTS)))
def test_stream_matches_whole_at_every_byte_split(text: str, thinking: bool) -> None:
    whole = parse(text, thinking=thinking)
    data = text.encode()
    for k in range(len(data) + 1):
        assert collect(iter_events([data[:k], data[k:]], thinking), thinking) == whole, k
    events = list(iter_events([bytes([b]) for b in data], thinking))
    assert collect(events, thinking) == whole
    for n, call in enumerate(whole.tool_calls):
        deltas = [e.text for e in events if isinstance(e, ToolCallDelta) and e.index == n]
        assert "".join(deltas) == call.arguments_json
    # Never a broken character nor a piece of a marker in text deltas of valid output.
    texts = [e.text for e in events if isinstance(e, (ContentDelta, ReasoningDelta))]
    assert not any("\ufffd" in t for t in texts)
    if not whole.malformed:
        assert not any(m in t for t in texts for m in ("</think>", "<｜DSML｜tool_calls"))


def test_stream_event_sequence() -> None:
    p = StreamParser(thinking=True)
    assert p.feed("<think>plan </thi") == [ReasoningDelta("plan ")]
    assert p.feed("nk>Sure.\n") == [ReasoningEnd(), ContentDelta("Sure.")]
    assert p.feed('\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">') == [ToolCallStart(0, "f")]
    events = p.feed('\n<｜DSML｜parameter name="a" string="true">he"llo</｜DSML｜para')
    assert events == [ToolCallDelta(0, '{"a": "he\\"llo')]
    events = p.feed("meter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    assert events[:2] == [ToolCallDelta(0, '"}'), ToolCallEnd(0, "f", {"a": 'he"llo'})]
    assert isinstance(events[2], ToolCallsDone) and p.done
    assert p.feed("ignored") == [] and p.finish() == []
    assert p.result().tool_calls[0].arguments == {"a": 'he"llo'}


def test_stream_malformed_and_unterminated() -> None:
    p = StreamParser(thinking=False)
    p.feed('x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n')
    events = p.feed("oops")
    assert isinstance(events[-1], MalformedDsml) and "oops" in events[-1].text
    assert p.feed(" more") == [ContentDelta(" more")]
    p = StreamParser(thinking=False)
    p.feed('x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n')
    last = p.finish()[-1]
    assert isinstance(last, MalformedDsml) and "unterminated" in last.error
    assert p.result().content.startswith("x\n\n<｜DSML｜tool_calls>") and p.result().malformed


def test_stream_long_argument_is_fast() -> None:
    body = "print('<tag> & </｜DSML｜paramete')\n" * 2000
    text = f'\n\n<{D}tool_calls>\n<{D}invoke name="w">\n<{D}parameter name="c" string="true">'
    text += body + f"</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>"
    p = StreamParser(thinking=False)
    for i in range(0, len(text), 3):
        p.feed(text[i : i + 3])
    p.finish()
    assert p.result().tool_calls[0].arguments == {"c": body}
