"""Small pieces of the server: stop strings, tool memory, think-mode resolution, prompt-prefix
matching, and the Responses tool flattening (namespaces, custom tools) end to end.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_support import FakeEngine

from ds4py.server.app import create_app
from ds4py.server.common import APIError, ThinkMode, resolve_think_mode
from ds4py.server.generate import StopScanner
from ds4py.server.options import ServerOptions
from ds4py.server.prompt import segments_from
from ds4py.server.toolmem import ToolMemory
from ds4py.server.worker import text_prefix
from ds4py.tokenizer import Tokenizer


def scan(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    s, out = StopScanner(stops), ""
    for p in pieces:
        text, hit = s.feed(p)
        out += text
        if hit is not None:
            return out, hit
    return out + s.flush(), None


def test_stop_scanner():
    assert scan(["END"], ["abc", "E", "N", "Dzzz"]) == ("abc", "END")
    assert scan(["xy", "b"], ["axyb"]) == ("a", "xy")  # earliest match wins
    assert scan(["END"], ["abc", "EN"]) == ("abcEN", None)  # held-back tail flushed
    s = StopScanner(["ENDX"])
    assert s.feed("hello E") == ("hell", None)  # may still become the stop string
    assert scan([], ["a", "b"]) == ("ab", None)


def test_tool_memory_lru_and_blocks():
    mem = ToolMemory(max_ids=3)
    mem.put(["a", "b"], "BLOCK1")
    mem.put(["c"], "BLOCK2")
    assert mem.block_for(["a", "b"]) == "BLOCK1"
    assert mem.block_for(["a", "c"]) is None  # two different blocks: no exact replay
    mem.put(["d"], "BLOCK3")  # evicts the least recently used id
    assert len(mem) == 3 and mem.get("d") == "BLOCK3"
    assert sum(mem.get(i) is None for i in "abc") == 1
    small = ToolMemory(max_ids=10, max_bytes=8)
    small.put(["x"], "12345")
    small.put(["y"], "67890")
    assert small.get("x") is None and small.get("y") == "67890"
    assert len(ToolMemory(max_ids=0)) == 0


@pytest.mark.parametrize(
    "model, enabled, effort, ctx, mode",
    [
        (None, None, None, 4096, ThinkMode.HIGH),
        ("deepseek-chat", None, None, 4096, ThinkMode.NONE),
        ("deepseek-chat", True, None, 4096, ThinkMode.HIGH),
        ("deepseek-reasoner", False, None, 4096, ThinkMode.NONE),
        (None, None, "none", 4096, ThinkMode.NONE),
        (None, None, "low", 4096, ThinkMode.HIGH),
        (None, None, "max", 4096, ThinkMode.HIGH),  # Think Max needs a 384K context
        (None, None, "max", 393216, ThinkMode.MAX),
        (None, False, "max", 393216, ThinkMode.NONE),
    ],
)
def test_think_mode(model, enabled, effort, ctx, mode):
    assert resolve_think_mode(model, enabled, effort, ctx) is mode


def test_think_mode_rejects_unknown_effort():
    with pytest.raises(APIError, match="effort"):
        resolve_think_mode(None, None, "turbo", 4096)


def test_text_prefix_and_segments():
    tok = Tokenizer.default()
    ids = tok.encode("héllo wörld")
    data = "héllo wörld, again".encode()
    assert text_prefix(tok, ids, data) == (len(ids), len("héllo wörld".encode()))
    assert text_prefix(tok, ids, b"hx") == (0, 0)
    segs = [("<｜User｜>", True), ("hi <think>", False), ("<｜Assistant｜>", True)]
    assert segments_from(segs, 10) == [(" <think>", False), ("<｜Assistant｜>", True)]
    assert tok.encode_segments(segments_from(segs, 0)) == tok.encode_segments(segs)


NS_CALL = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="mcp__fs__read">\n'
    '<｜DSML｜parameter name="path" string="true">a.txt</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="apply_patch">\n'
    '<｜DSML｜parameter name="input" string="true">*** Begin Patch</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)


def test_responses_namespaced_and_custom_tools():
    engine = FakeEngine(lambda prompt: NS_CALL if "mcp__fs__read" in prompt else "done")
    tools = [
        {"type": "namespace", "name": "mcp__fs__", "tools": [
            {"type": "function", "name": "read", "parameters": {
                "type": "object", "properties": {"path": {"type": "string"}}}}]},
        {"type": "custom", "name": "apply_patch", "description": "Apply a patch"},
        {"type": "web_search"},
    ]  # fmt: skip
    with TestClient(create_app(engine, ServerOptions(ctx=4096))) as client:
        body = {"input": "read it", "tools": tools, "reasoning": {"effort": "none"}}
        out = client.post("/v1/responses", json=body).json()["output"]
        assert [o["type"] for o in out] == ["function_call", "custom_tool_call"]
        assert out[0]["name"] == "read" and out[0]["namespace"] == "mcp__fs__"
        assert out[0]["arguments"] == '{"path":"a.txt"}'
        assert out[1]["name"] == "apply_patch" and out[1]["input"] == "*** Begin Patch"
        events = client.post("/v1/responses", json={**body, "stream": True}).text
        assert '"type":"response.custom_tool_call_input.done"' in events
        assert '"namespace":"mcp__fs__"' in events
        # The client echoes both calls and their outputs; the history must render and continue.
        history = [{"role": "user", "content": "read it"}, *out,
                   {"type": "function_call_output", "call_id": out[0]["call_id"], "output": "x"},
                   {"type": "custom_tool_call_output", "call_id": out[1]["call_id"],
                    "output": "ok"}]  # fmt: skip
        r = client.post("/v1/responses", json={"input": history, "tools": tools[:2]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["input_tokens_details"]["cached_tokens"] > 0
