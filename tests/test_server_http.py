"""HTTP surface: malformed requests get 4xx in the protocol's error shape, and the server keeps
serving; context overflow numbers; API key; CORS; body limit; health.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_support import FakeEngine

from ds4py.server.app import create_app
from ds4py.server.options import ServerOptions

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine():
    return FakeEngine()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, ServerOptions(ctx=256))) as c:
        yield c


def assert_openai_error(r, status: int, needle: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and needle in err["message"]
    return err


def assert_anthropic_error(r, status: int, needle: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and needle in body["error"]["message"]
    return body["error"]


def still_serving(client) -> None:
    r = client.post(CHAT, json={"model": "deepseek-chat", "messages": USER})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "You said: hi"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"messages": "hello"}',
        b'{"messages": []}',
        b'{"messages": [{"role": "user", "content": 5}]}',
        b'{"messages": [{"role": "wizard", "content": "x"}]}',
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}',
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
        b'{"messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}',
        b'{"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "sometimes"}}',
        b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
        b"[" * 5000 + b"]" * 5000,
        b'{"messages": [{"role": "user", "content": "lone \\ud800 surrogate"}]}',
    ],
)
def test_bad_chat_requests_are_400(client, body):
    r = client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    still_serving(client)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/messages", b"{oops"),
        ("/v1/messages", b'{"messages": [{"role": "user"}], "max_tokens": "x"}'),
        ("/v1/messages", b'{"messages": [{"role": "system", "content": "x"}]}'),
        ("/v1/messages/count_tokens", b'{"messages": 3}'),
        (
            "/v1/messages",
            b'{"max_tokens": 5, "messages": [{"role": "user", "content": "\\udfff"}]}',
        ),
    ],
)
def test_bad_anthropic_requests_use_anthropic_shape(client, path, body):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert_anthropic_error(r, 400)
    still_serving(client)


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"input": [{"type": "mystery"}]}, "mystery"),
        ({"input": "x", "tool_choice": {"type": "function", "name": "f"}}, "tool_choice"),
        ({"input": "x", "tool_choice": "sometimes"}, "tool_choice"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": [{"role": "user", "content": [{"type": "input_video"}]}]}, "input_video"),
        ({}, "missing input"),
        (b'{"input": "\\udc00"}', "invalid text"),
    ],
)
def test_bad_responses_requests(client, body, needle):
    if isinstance(body, bytes):
        r = client.post("/v1/responses", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/responses", json=body)
    assert_openai_error(r, 400, needle)


def test_completions_need_a_prompt(client):
    assert_openai_error(client.post("/v1/completions", json={"model": "m"}), 400, "prompt")
    assert_openai_error(client.post("/v1/completions", json={"prompt": [1, 2]}), 400, "prompt")
    assert_openai_error(client.post("/v1/completions", json={"prompt": []}), 400, "prompt")


def test_unknown_endpoint_and_method(client):
    err = assert_openai_error(client.get("/v1/nothing"), 404, "unknown endpoint")
    assert err["type"] == "not_found_error"
    r = client.get(CHAT)
    assert r.status_code == 405 and "error" in r.json()


def test_context_overflow_reports_the_numbers(client):
    long = [{"role": "user", "content": "word " * 400}]
    err = assert_openai_error(client.post(CHAT, json={"messages": long}), 400, "context size")
    assert err["code"] == "context_length_exceeded" and err["n_ctx"] == 256
    assert err["n_prompt_tokens"] > 256 and err["param"] == "messages"
    r = client.post("/v1/messages", json={"messages": long, "max_tokens": 5})
    err = assert_anthropic_error(r, 400, "256")
    assert err["n_prompt_tokens"] > 256
    r = client.post("/v1/responses", json={"input": "word " * 400})
    assert assert_openai_error(r, 400)["param"] == "input"
    still_serving(client)


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["ctx"] == 256


def test_api_key(engine):
    app = create_app(engine, ServerOptions(ctx=256, api_key="sekret"))
    with TestClient(app) as c:
        err = assert_openai_error(c.post(CHAT, json={"messages": USER}), 401, "API key")
        assert err["type"] == "authentication_error"
        r = c.post("/v1/messages", json={"messages": USER, "max_tokens": 5},
                   headers={"x-api-key": "wrong"})  # fmt: skip
        assert_anthropic_error(r, 401)
        ok = c.post(CHAT, json={"messages": USER}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        r = c.post("/v1/messages", json={"messages": USER, "max_tokens": 50},
                   headers={"x-api-key": "sekret"})  # fmt: skip
        assert r.status_code == 200 and r.json()["content"][-1]["text"] == "You said: hi"
        both = {"x-api-key": "stale", "Authorization": "Bearer sekret"}
        assert c.post(CHAT, json={"messages": USER}, headers=both).status_code == 200
        assert c.get("/health").status_code == 200


def test_cors_and_options(engine, client):
    r = client.options(CHAT)
    assert r.status_code == 204 and r.content == b""
    assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(engine, ServerOptions(ctx=256, cors=True))) as c:
        r = c.options(CHAT, headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
        r = c.get("/v1/models")
        assert r.headers["access-control-allow-origin"] == "*"
        assert "POST" in r.headers["access-control-allow-methods"]
        r = c.post(CHAT, json={"messages": USER, "stream": True})
        assert r.headers["access-control-allow-origin"] == "*"
        assert r.headers["content-type"].startswith("text/event-stream")


def test_body_limit(engine):
    with TestClient(create_app(engine, ServerOptions(ctx=256, max_body_mb=1))) as c:
        big = b'{"messages": [{"role": "user", "content": "' + b"a" * (2 << 20) + b'"}]}'
        r = c.post(CHAT, content=big, headers={"content-type": "application/json"})
        assert_openai_error(r, 413, "exceeds")
        assert c.post(CHAT, json={"messages": USER}).status_code == 200


def test_serve_without_a_model_says_how_to_get_one(tmp_path):
    from ds4py.cli import CliError
    from ds4py.server.app import serve

    with pytest.raises(CliError, match="huggingface|hf download|Hugging Face") as e:
        serve(ServerOptions(model=str(tmp_path / "missing.gguf")))
    assert "--demo" in str(e.value)
