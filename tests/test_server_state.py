"""What the worker keeps between requests: live-KV reuse for clients that drop reasoning, exact
DSML replay by tool id, the disk KV store across restarts, engine failures, shutdown.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_support import REASONING, FakeEngine, default_script

from ds4py.server.app import create_app
from ds4py.server.options import ServerOptions

CHAT = "/v1/chat/completions"
STORE_TOOLS = [{"type": "function", "function": {
    "name": "store", "description": "Store numbers",
    "parameters": {"type": "object", "properties": {"values": {"type": "array"}}}}}]  # fmt: skip
# Not the canonical rendering: the official encoder would write `[1, 2]`.
STORE_BLOCK = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="store">\n'
    '<｜DSML｜parameter name="values" string="false">[1,2]</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)
SYSTEM = "You are a careful assistant. " * 20


def script(prompt: str) -> str:
    last = prompt.rsplit("<｜User｜>", 1)[-1]
    if "numbers" in last:
        return STORE_BLOCK
    if "<tool_result>" in last:
        return "stored"
    return default_script(prompt)


def chat(client, messages, **kw) -> dict:
    r = client.post(CHAT, json={"model": "deepseek-chat", "messages": messages, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def cached(reply: dict) -> int:
    return reply["usage"]["prompt_tokens_details"]["cached_tokens"]


def three_turns(client) -> tuple[list[dict], dict]:
    """numbers -> store([1,2]) call -> result -> "stored"; returns history and turn-2 reply."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "numbers"}]
    r1 = chat(client, msgs, tools=STORE_TOOLS)
    (call,) = r1["choices"][0]["message"]["tool_calls"]
    msgs += [{"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "tool_call_id": call["id"], "content": "ok"}]  # fmt: skip
    r2 = chat(client, msgs, tools=STORE_TOOLS)
    assert r2["choices"][0]["message"]["content"] == "stored"
    assert cached(r2) >= r1["usage"]["total_tokens"]  # tool-output continuation
    msgs += [{"role": "assistant", "content": "stored"}, {"role": "user", "content": "thanks"}]
    return msgs, r2


@pytest.mark.parametrize("replay", [True, False])
def test_exact_dsml_replay_by_tool_id(replay):
    app = create_app(FakeEngine(script), ServerOptions(ctx=4096, exact_dsml_replay=replay))
    with TestClient(app) as client:
        msgs, r2 = three_turns(client)
        r3 = chat(client, msgs, tools=STORE_TOOLS)
    assert r3["choices"][0]["message"]["content"] == "You said: thanks"
    if replay:  # the history re-renders the sampled `[1,2]`: everything is reused
        assert cached(r3) >= r2["usage"]["total_tokens"]
    else:  # canonical `[1, 2]` differs from the KV inside the first turn's block
        assert cached(r3) < r2["usage"]["prompt_tokens"]


def test_thinking_turn_reused_when_client_drops_reasoning():
    with TestClient(create_app(FakeEngine(), ServerOptions(ctx=4096))) as client:
        msgs = [{"role": "user", "content": "first"}]
        r1 = chat(client, msgs, model="deepseek-reasoner")
        reply = r1["choices"][0]["message"]
        assert reply["reasoning_content"] == REASONING
        msgs += [{"role": "assistant", "content": reply["content"]},
                 {"role": "user", "content": "second"}]  # fmt: skip
        r2 = chat(client, msgs, model="deepseek-reasoner")
    assert r2["choices"][0]["message"]["content"] == "You said: second"
    assert cached(r2) >= r1["usage"]["total_tokens"]  # the hidden reasoning stayed in the KV


def test_disk_cache_across_restarts(tmp_path):
    opts = ServerOptions(ctx=4096, kv_disk_dir=str(tmp_path), kv_cache_min_tokens=64)
    with TestClient(create_app(FakeEngine(script), opts)) as client:
        msgs, r2 = three_turns(client)
    assert len(list(tmp_path.iterdir())) >= 2  # the cold save of the system prompt, shutdown
    engine = FakeEngine(script)
    with TestClient(create_app(engine, opts)) as client:
        r3 = chat(client, msgs, tools=STORE_TOOLS)
        # The shutdown checkpoint covers turns 1-2 and its tool-id map lets the history replay
        # the sampled block, so only the new turn is evaluated.
        assert cached(r3) >= r2["usage"]["total_tokens"]
        new = r3["usage"]["prompt_tokens"] - cached(r3)
        assert engine.evaluated == new + r3["usage"]["completion_tokens"]
        fresh = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "other"}]
        r4 = chat(client, fresh)  # misses the live KV: the cold save of the system prompt hits
        assert cached(r4) > 64


def test_engine_failure_is_reported_and_serving_continues():
    engine = FakeEngine(chunk=16, fail_marker="explode")
    with TestClient(create_app(engine, ServerOptions(ctx=4096))) as client:
        long = [{"role": "user", "content": "explode " * 40}]
        r = client.post(CHAT, json={"messages": long})
        assert r.status_code == 500 and "simulated engine failure" in r.json()["error"]["message"]
        r = client.post("/v1/messages", json={"messages": long, "max_tokens": 9, "stream": True})
        assert r.status_code == 200  # headers went out with the first prefill chunk
        assert "event: error" in r.text and '"api_error"' in r.text
        assert chat(client, [{"role": "user", "content": "hi"}])["choices"][0]["message"][
            "content"] == "You said: hi"  # fmt: skip


def test_requests_after_shutdown_get_503():
    app = create_app(FakeEngine(), ServerOptions(ctx=4096))
    with TestClient(app) as client:
        app.state.server.worker.stop()
        r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["message"] == "server shutting down"
