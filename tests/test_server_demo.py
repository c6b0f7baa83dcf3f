"""End to end on the real engine: `Engine.demo()` (tiny random weights, real tokenizer) behind
the server, driven by both SDKs with a few tokens per request.

A random model writes arbitrary tokens, so these tests check plumbing (the engine session,
prefix reuse, usage, every response parses), not text; the scripted fake covers content.
"""

from __future__ import annotations

import anthropic
import openai
import pytest
from server_support import LiveServer

from ds4py import Engine
from ds4py.server.app import create_app
from ds4py.server.options import ServerOptions

N = 3  # tokens per request: the demo model decodes a few tokens per second on a CI core


@pytest.fixture(scope="module")
def server():
    with LiveServer(create_app(Engine.demo(), ServerOptions(ctx=1024))) as live:
        yield live


def test_demo_chat_and_prefix_reuse(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]  # fmt: skip
    r = oai.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=N)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert 0 < r.usage.completion_tokens <= N
    text = r.choices[0].message.content
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Another."}]
    chunks = list(oai.chat.completions.create(model="deepseek-chat", messages=messages,
                                              max_tokens=N, stream=True,
                                              stream_options={"include_usage": True}))  # fmt: skip
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens
    assert 0 < usage.completion_tokens <= N


def test_demo_every_endpoint_parses(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    r = oai.completions.create(model="m", prompt="Once upon", max_tokens=N)
    assert r.usage.completion_tokens <= N
    m = claude.messages.create(
        model="c", max_tokens=N, messages=[{"role": "user", "content": "hi"}]
    )
    assert m.stop_reason in ("max_tokens", "end_turn") and m.usage.output_tokens <= N
    with claude.messages.stream(model="c", max_tokens=N, thinking={"type": "disabled"},
                                messages=[{"role": "user", "content": "hi"}]) as s:  # fmt: skip
        final = s.get_final_message()
    assert final.usage.output_tokens <= N and final.content
    resp = oai.responses.create(model="m", input="hi", max_output_tokens=N,
                                reasoning={"effort": "high", "summary": "auto"})  # fmt: skip
    assert resp.status in ("incomplete", "completed") and resp.usage.output_tokens <= N
