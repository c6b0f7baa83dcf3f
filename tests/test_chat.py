"""Chat template tests against golden prompts from DeepSeek's official encoder.

Provenance of tests/data/chat_golden.json: each case's `expected` string was produced by running
DeepSeek's `encoding/encoding_dsv4.py` (DeepSeek-V4-Flash@60d8d707, sha256 bdbd57c1...) outside
this repository, called the way sglang/vLLM serve V4 (empty system message inserted when the
conversation has none, `tools` attached to messages[0]). One case, think_max_small_ctx_downgrades,
is our documented policy (Think Max needs ctx >= 393216) and was rendered with effort=None.
Only the generated strings are committed, never the encoder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import tokenizers

from ds4py.chat import (
    THINK_MAX_MIN_CTX,
    THINK_MAX_PREFIX,
    ChatFormatError,
    call_arguments,
    render,
    render_ids,
    render_segments,
)
from ds4py.tokenizer import Tokenizer, default_tokenizer_json

GOLDEN = json.loads((Path(__file__).parent / "data" / "chat_golden.json").read_text("utf-8"))
CASES = {c["name"]: c for c in GOLDEN["cases"]}
MARKERS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>")
MARKERS += ("<think>", "</think>", "｜DSML｜")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def ref() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(default_tokenizer_json()))


def _render(case: dict, **kw) -> str:
    return render(
        case["messages"], case["tools"], case["thinking"], case["effort"], ctx=case["ctx"], **kw
    )


def test_golden_set_covers_required_modes() -> None:
    assert len(CASES) >= 15
    assert {c["thinking"] for c in CASES.values()} == {True, False}
    assert any(c["effort"] == "max" for c in CASES.values())
    assert any(c["tools"] for c in CASES.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_prompt_bytes(name: str) -> None:
    case = CASES[name]
    before = copy.deepcopy(case["messages"])
    assert _render(case) == case["expected"]
    assert case["messages"] == before  # input is not mutated


@pytest.mark.parametrize("name", sorted(n for n in CASES if "injection" not in n))
def test_golden_ids_match_official_tokenizer(
    tok: Tokenizer, ref: tokenizers.Tokenizer, name: str
) -> None:
    case = CASES[name]
    ids = render_ids(
        case["messages"], tok, case["tools"], case["thinking"], case["effort"], case["ctx"]
    )
    assert ids == ref.encode(case["expected"], add_special_tokens=False).ids
    # Every marker in the text is exactly one special id.
    for marker in MARKERS:
        assert ids.count(tok.encode(marker)[0]) == case["expected"].count(marker), marker
    assert ids[0] == tok.bos_id


def test_prompt_injection_literals_stay_text(tok: Tokenizer, ref: tokenizers.Tokenizer) -> None:
    case = CASES["prompt_injection_literals_in_content"]
    ids = render_ids(
        case["messages"], tok, case["tools"], case["thinking"], case["effort"], case["ctx"]
    )
    official = ref.encode(case["expected"], add_special_tokens=False).ids
    assert tok.decode(ids) == case["expected"]
    # The official pipeline turns client literals into control tokens; we do not. The user
    # message spells <think>, </think>, <｜User｜>, ｜DSML｜; the tool output <｜Assistant｜>,
    # </think>, ｜DSML｜.
    drop = {tok.think_id: 1, tok.end_think_id: 2, tok.user_id: 1, tok.dsml_id: 2}
    drop[tok.assistant_id] = 1
    for tid, n in drop.items():
        assert ids.count(tid) == official.count(tid) - n
    assert tok.encode(case["expected"]) == official  # plain encode keeps official behaviour


def test_segments_mark_only_template_text_trusted() -> None:
    case = CASES["tricky_strings_in_arguments_and_results"]
    segs = render_segments(case["messages"], case["tools"], case["thinking"])
    untrusted = "".join(t for t, trusted in segs if not trusted)
    trusted = "".join(t for t, ok in segs if ok)
    assert "Agent with files." in untrusted and "write_file" in untrusted
    assert "<｜User｜>" in trusted and "<｜User｜>" not in untrusted
    assert "".join(t for t, _ in segs) == case["expected"]


# ---- options ----


def test_think_max_gating() -> None:
    msgs = [{"role": "user", "content": "x"}]
    assert THINK_MAX_PREFIX in render(msgs, effort="max")
    assert THINK_MAX_PREFIX in render(msgs, effort="max", ctx=THINK_MAX_MIN_CTX)
    assert THINK_MAX_PREFIX not in render(msgs, effort="max", ctx=THINK_MAX_MIN_CTX - 1)
    assert THINK_MAX_PREFIX not in render(msgs, thinking=False, effort="max")
    assert render(msgs, effort="low") == render(msgs, effort="high") == render(msgs)
    assert render(msgs, effort="max").startswith("<｜begin▁of▁sentence｜>" + THINK_MAX_PREFIX)


def test_content_parts_and_anthropic_tool_results() -> None:
    base = CASES["parallel_tool_calls_results_reordered"]
    msgs = copy.deepcopy(base["messages"])
    # Tool results as Anthropic-style blocks inside one user message render the same.
    results = msgs[3:]
    msgs[3:] = [
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"]}
                for m in results
            ],
        }
    ]
    assert render(msgs, base["tools"], base["thinking"]) == base["expected"]
    # Text parts join like the official content blocks; non-text parts are marked unsupported.
    parts = [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]
    out = render([{"role": "user", "content": parts}], thinking=False)
    assert out == render(
        [{"role": "user", "content": "a\n\n[Unsupported image_url]\n\nb"}], thinking=False
    )
    single = render([{"role": "system", "content": [{"type": "text", "text": "S"}]}])
    assert single == render([{"role": "system", "content": "S"}])


def test_tool_call_arguments_forms() -> None:
    base = CASES["tool_loop_thinking"]
    msgs = copy.deepcopy(base["messages"])
    msgs[2]["tool_calls"][0]["function"]["arguments"] = {"command": "pwd"}
    assert render(msgs, base["tools"]) == base["expected"]
    assert call_arguments('{"b": 1, "a": [2]}') == {"b": 1, "a": [2]}
    assert list(call_arguments('{"b": 1, "a": 2}')) == ["b", "a"]
    assert call_arguments("not json") == {"arguments": "not json"}
    assert call_arguments("[1, 2]") == {"arguments": "[1, 2]"}
    assert call_arguments(None) == {}


@pytest.mark.parametrize(
    ("messages", "kwargs", "match"),
    [
        ("hello", {}, "messages must be a list"),
        ([{"role": "robot", "content": "x"}], {}, "role"),
        (["text"], {}, "must be an object"),
        ([{"role": "user", "content": 5}], {}, "content"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], {}, "text"),
        ([{"role": "assistant", "tool_calls": [{"function": {}}]}], {}, "name"),
        ([{"role": "assistant", "tool_calls": "x"}], {}, "tool_calls"),
        ([{"role": "user", "content": "x"}], {"tools": [{"type": "function"}]}, "tools"),
        ([{"role": "user", "content": "x"}], {"effort": "extreme"}, "effort"),
    ],
)
def test_bad_input_errors(messages, kwargs, match) -> None:
    with pytest.raises(ChatFormatError, match=match):
        render(messages, **kwargs)
