"""Queueing and liveness against a live uvicorn on 127.0.0.1: 50 concurrent clients all get
their own complete answers, a client that drops its stream frees the worker, and a long
prefill sends SSE keepalive comments.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from server_support import FakeEngine, LiveServer, default_script

from ds4py.server.app import create_app
from ds4py.server.options import ServerOptions

CHAT = "/v1/chat/completions"
LONG_REPLY = "word " * 400


def script(prompt: str) -> str:
    if "pad pad" in prompt:
        return "ok"
    if "short story" in prompt:
        return "word " * 30
    return LONG_REPLY if "long story" in prompt else default_script(prompt)


async def _one(client: httpx.AsyncClient, i: int) -> str:
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": f"client {i}"}]}
    if i % 2:
        r = await client.post(CHAT, json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]
    text = ""
    async with client.stream("POST", CHAT, json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["delta"].get("content") or ""
    return text


def test_fifty_concurrent_clients():
    engine = FakeEngine()
    with LiveServer(create_app(engine, ServerOptions(ctx=4096))) as srv:

        async def main() -> list[str]:
            limits = httpx.Limits(max_connections=50)
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
                return await asyncio.wait_for(asyncio.gather(*(_one(c, i) for i in range(50))), 90)

        answers = asyncio.run(main())
    assert answers == [f"You said: client {i}" for i in range(50)]


def test_disconnected_stream_frees_the_worker():
    engine = FakeEngine(script, delay=0.01)  # 400-token reply: ~4 s if nobody stops it
    with LiveServer(create_app(engine, ServerOptions(ctx=4096))) as srv:
        body = {"model": "deepseek-chat", "stream": True,
                "messages": [{"role": "user", "content": "tell me a long story"}]}  # fmt: skip
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", CHAT, json=body) as r:
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data: {")
                    if seen == 5:
                        break  # leaving the block closes the connection mid-stream
            start = time.monotonic()
            quick = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
            r = c.post(CHAT, json=quick)
            elapsed = time.monotonic() - start
        assert r.json()["choices"][0]["message"]["content"] == "You said: hi"
        assert elapsed < 2.0
        assert engine.evaluated < 200  # the long reply was cut off, not generated to the end


def test_prefill_keepalive_comments():
    engine = FakeEngine(script, delay=0.004, chunk=16)  # ~300-token prompt: ~1.2 s of prefill
    opts = ServerOptions(ctx=4096, keepalive_s=0.1)
    with LiveServer(create_app(engine, opts)) as srv:
        body = {"model": "deepseek-chat", "stream": True,
                "messages": [{"role": "user", "content": "pad " * 300}]}  # fmt: skip
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", CHAT, json=body) as r:
                lines = [line for line in r.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert first_data >= 2 and all(line.startswith(":") for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]"


def test_queued_stream_gets_keepalives():
    engine = FakeEngine(script, delay=0.03)  # the first request keeps the worker ~1 s
    opts = ServerOptions(ctx=4096, keepalive_s=0.2)
    with LiveServer(create_app(engine, opts)) as srv:
        busy = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "short story"}]}
        queued = {"model": "deepseek-chat", "stream": True,
                  "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip

        async def main() -> list[str]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                first = asyncio.create_task(c.post(CHAT, json=busy))
                await asyncio.sleep(0.1)
                async with c.stream("POST", CHAT, json=queued) as r:
                    lines = [line async for line in r.aiter_lines() if line]
                assert (await first).status_code == 200
                return lines

        lines = asyncio.run(main())
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert first_data >= 2 and all(line.startswith(":") for line in lines[:first_data])
    chunks = [json.loads(line[6:]) for line in lines[first_data:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "You said: hi" and lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("stream", [False, True])
def test_queued_request_of_gone_client_is_skipped(stream):
    engine = FakeEngine(script, delay=0.03)  # the busy request takes ~1 s
    with LiveServer(create_app(engine, ServerOptions(ctx=4096))) as srv:

        def story(kind: str) -> dict:
            return {"model": "deepseek-chat",
                    "messages": [{"role": "user", "content": f"a {kind} story"}]}  # fmt: skip

        async def main() -> None:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                busy = asyncio.create_task(c.post(CHAT, json=story("short")))
                await asyncio.sleep(0.2)
                doomed = asyncio.create_task(c.post(CHAT, json={**story("long"), "stream": stream}))
                await asyncio.sleep(0.2)
                doomed.cancel()  # gives up while still queued behind `busy`
                assert (await busy).status_code == 200

        asyncio.run(main())
        time.sleep(1.5)  # a worker running the dropped job would still be busy for ~10 s
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/health").json()["queued"] == 0
    assert engine.evaluated < 120  # the short story and at most a few tokens of the long one
