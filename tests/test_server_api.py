"""The official openai and anthropic SDKs against a live server on a scripted fake engine.

Every endpoint, streaming and not, with thinking and tools; tool-call round trips must reuse
the live KV (cached-token usage); thinking controls, stop strings and length limits.
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from server_support import REASONING, WEATHER_ANSWER, FakeEngine, LiveServer

from ds4py.server.app import create_app
from ds4py.server.options import ServerOptions

CHAT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
ANTHROPIC_TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "input_schema": CHAT_TOOLS[0]["function"]["parameters"],
    }
]
RESPONSES_TOOLS = [{"type": "function", **CHAT_TOOLS[0]["function"]}]
WEATHER_ARGS = {"city": "Paris", "days": 3}


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine()
    with LiveServer(create_app(engine, ServerOptions(ctx=4096))) as live:
        live.engine = engine
        yield live


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


# ---- OpenAI chat completions -----------------------------------------------------------------


def test_chat_thinking_non_streaming(oai):
    r = oai.chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "hi there"}]
    )
    msg = r.choices[0].message
    assert msg.content == "You said: hi there"
    assert msg.reasoning_content == REASONING
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    details = r.usage.prompt_tokens_details
    assert details.cached_tokens + details.cache_write_tokens == r.usage.prompt_tokens


def test_chat_streaming_matches_non_streaming(oai):
    messages = [{"role": "user", "content": "stream me"}]
    chunks = list(
        oai.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks if c.choices)  # fmt: skip
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == REASONING and content == "You said: stream me"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_chat_thinking_controls(oai):
    user = [{"role": "user", "content": "no thoughts"}]
    for kwargs in (
        {"model": "deepseek-chat"},
        {"model": "m", "extra_body": {"thinking": {"type": "disabled"}}},
        {"model": "m", "extra_body": {"think": False}},
        {"model": "m", "reasoning_effort": "none"},
    ):
        r = oai.chat.completions.create(messages=user, **kwargs)
        assert r.choices[0].message.content == "You said: no thoughts", kwargs
        assert getattr(r.choices[0].message, "reasoning_content", None) is None, kwargs
    r = oai.chat.completions.create(model="deepseek-chat", messages=user, reasoning_effort="max")
    assert r.choices[0].message.reasoning_content == REASONING  # explicit effort beats alias
    with pytest.raises(openai.BadRequestError, match="reasoning effort"):
        oai.chat.completions.create(model="m", messages=user, reasoning_effort="extreme")


def test_chat_stop_sequence_and_length(oai):
    user = [{"role": "user", "content": "cut here please"}]
    r = oai.chat.completions.create(model="deepseek-chat", messages=user, stop=["here"])
    assert r.choices[0].message.content == "You said: cut "
    assert r.choices[0].finish_reason == "stop"
    chunks = oai.chat.completions.create(
        model="deepseek-chat", messages=user, stop=["here"], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "You said: cut "
    r = oai.chat.completions.create(model="deepseek-chat", messages=user, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = oai.chat.completions.create(model="m", messages=user, max_completion_tokens=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 0


def test_chat_tool_round_trip_reuses_live_kv(server, oai):
    messages = [{"role": "user", "content": "what is the weather in Paris?"}]
    r = oai.chat.completions.create(model="m", messages=messages, tools=CHAT_TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Let me check." and msg.reasoning_content == REASONING
    (call,) = msg.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == WEATHER_ARGS
    first_total = r.usage.total_tokens
    # A stateless client sends everything back, here without the hidden reasoning.
    messages.append({"role": "assistant", "content": msg.content,
                     "tool_calls": [call.model_dump()]})  # fmt: skip
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"})
    before = server.engine.evaluated
    r2 = oai.chat.completions.create(model="m", messages=messages, tools=CHAT_TOOLS)
    assert r2.choices[0].message.content == WEATHER_ANSWER
    assert r2.usage.prompt_tokens_details.cached_tokens >= first_total
    new_prompt = r2.usage.prompt_tokens - r2.usage.prompt_tokens_details.cached_tokens
    assert server.engine.evaluated - before == new_prompt + r2.usage.completion_tokens


def test_chat_tool_round_trip_with_reasoning_replayed(oai):
    messages = [{"role": "user", "content": "weather for tomorrow?"}]
    r = oai.chat.completions.create(model="m", messages=messages, tools=CHAT_TOOLS)
    msg = r.choices[0].message
    messages.append({"role": "assistant", "content": msg.content,
                     "reasoning_content": msg.reasoning_content,
                     "tool_calls": [c.model_dump() for c in msg.tool_calls]})  # fmt: skip
    messages.append({"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "rain"})
    r2 = oai.chat.completions.create(model="m", messages=messages, tools=CHAT_TOOLS)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.total_tokens


def test_chat_streamed_tool_call(oai):
    messages = [{"role": "user", "content": "weather please"}]
    stream = oai.chat.completions.create(model="m", messages=messages, tools=CHAT_TOOLS,
                                         stream=True)  # fmt: skip
    calls, finish = {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
            if tc.id:
                assert entry["id"] is None and tc.function.name  # header first, once
                entry["id"], entry["name"] = tc.id, tc.function.name
            entry["args"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["args"]) == WEATHER_ARGS


def test_chat_tool_choice_none_keeps_dsml_as_text(oai):
    messages = [{"role": "user", "content": "weather please"}]
    r = oai.chat.completions.create(model="deepseek-chat", messages=messages, tools=CHAT_TOOLS,
                                    tool_choice="none")  # fmt: skip
    # The schemas stay in the prompt (so the script still writes a call), but with tool calls
    # switched off the block is returned as text and generation ends there.
    msg = r.choices[0].message
    assert msg.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert msg.content.startswith("Let me check.\n\n<｜DSML｜tool_calls>")
    assert msg.content.endswith("</｜DSML｜tool_calls>")


# ---- OpenAI legacy completions and models ----------------------------------------------------


def test_completions_raw_text(oai):
    r = oai.completions.create(model="m", prompt="ping", max_tokens=100)
    assert r.choices[0].text == REASONING + "</think>You said: ping"
    assert r.choices[0].finish_reason == "stop"
    parts = [c.choices[0].text for c in oai.completions.create(model="m", prompt="ping",
                                                                stream=True) if c.choices]  # fmt: skip
    assert "".join(parts) == r.choices[0].text


def test_models(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids[0] == "deepseek-v4-flash" and "deepseek-chat" in ids
    assert oai.models.retrieve("deepseek-v4-flash").id == "deepseek-v4-flash"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-17")


# ---- Anthropic Messages ----------------------------------------------------------------------


def test_messages_non_streaming(claude):
    r = claude.messages.create(model="claude-opus-x", max_tokens=200,
                               messages=[{"role": "user", "content": "hello"}])  # fmt: skip
    assert r.model == "claude-opus-x"
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking == REASONING and r.content[1].text == "You said: hello"
    assert r.stop_reason == "end_turn"
    u = r.usage
    assert u.output_tokens > 0 and u.cache_read_input_tokens + u.cache_creation_input_tokens > 0


def test_messages_stream_and_tool_round_trip(claude):
    messages = [{"role": "user", "content": "what's the weather?"}]
    with claude.messages.stream(model="c", max_tokens=400, messages=messages,
                                tools=ANTHROPIC_TOOLS, system="Be brief.") as s:  # fmt: skip
        kinds = [ev.type for ev in s]
        first = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [b.type for b in first.content] == ["thinking", "text", "tool_use"]
    use = first.content[2]
    assert use.name == "get_weather" and use.input == WEATHER_ARGS
    assert use.id.startswith("toolu_") and first.stop_reason == "tool_use"
    # Claude Code replays the thinking block and the tool_use, then sends the result.
    messages.append(
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]}
    )
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]})  # fmt: skip
    r = claude.messages.create(model="c", max_tokens=400, messages=messages,
                               tools=ANTHROPIC_TOOLS, system="Be brief.")  # fmt: skip
    assert r.content[-1].text == WEATHER_ANSWER
    seen = first.usage.cache_read_input_tokens + first.usage.cache_creation_input_tokens
    assert r.usage.cache_read_input_tokens >= seen + first.usage.output_tokens


def test_messages_thinking_disabled_and_stop_sequence(claude):
    r = claude.messages.create(model="c", max_tokens=100, thinking={"type": "disabled"},
                               stop_sequences=["said"],
                               messages=[{"role": "user", "content": "x"}])  # fmt: skip
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == "You "
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "said"
    r = claude.messages.create(model="c", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 2


def test_messages_unknown_tool_result_is_rejected(claude):
    bad = [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "?"}]}]  # fmt: skip
    with pytest.raises(anthropic.BadRequestError, match="toolu_nope"):
        claude.messages.create(model="c", max_tokens=10, messages=bad)


def test_count_tokens(claude):
    short = claude.messages.count_tokens(model="c", messages=[{"role": "user", "content": "a"}])
    tooled = claude.messages.count_tokens(model="c", tools=ANTHROPIC_TOOLS,
                                          messages=[{"role": "user", "content": "a"}])  # fmt: skip
    assert 0 < short.input_tokens < tooled.input_tokens


# ---- OpenAI Responses ------------------------------------------------------------------------


def test_responses_round_trip(oai):
    reasoning = {"effort": "high", "summary": "auto"}
    r = oai.responses.create(model="gpt-5-codex", input="what is the weather?",
                             tools=RESPONSES_TOOLS, reasoning=reasoning)  # fmt: skip
    assert [o.type for o in r.output] == ["reasoning", "message", "function_call"]
    assert r.output[0].summary[0].text == REASONING
    call = r.output[2]
    assert call.name == "get_weather" and json.loads(call.arguments) == WEATHER_ARGS
    inputs = [{"role": "user", "content": "what is the weather?"}]
    inputs += [o.model_dump(exclude_none=True) for o in r.output]
    inputs.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny"})
    with oai.responses.stream(model="gpt-5-codex", input=inputs, tools=RESPONSES_TOOLS,
                              reasoning=reasoning) as s:  # fmt: skip
        events = list(s)
        final = s.get_final_response()
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == WEATHER_ANSWER
    assert final.usage.input_tokens_details.cached_tokens >= r.usage.total_tokens


def test_responses_without_summary_and_limits(oai):
    r = oai.responses.create(model="m", input="plain", max_output_tokens=200)
    assert [o.type for o in r.output] == ["message"] and r.output_text == "You said: plain"
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    r = oai.responses.create(model="m", input="plain", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oai.responses.create(model="m", input="x", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="call_missing"):
        oai.responses.create(model="m", input=[
            {"type": "function_call_output", "call_id": "call_missing", "output": "x"}])  # fmt: skip
