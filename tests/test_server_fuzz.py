"""Property-based fuzzing of the server's OpenAPI schema (schemathesis): valid and invalid
bodies for every operation must never produce a 5xx, and errors keep the protocol's shape.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from server_support import FakeEngine

from ds4py.server.app import create_app
from ds4py.server.options import ServerOptions

EXAMPLES = 20  # per operation and mode: the whole file runs in well under a minute
GENERATING = ("/v1/chat/completions", "/v1/completions", "/v1/messages")


@pytest.fixture
def api_schema():
    # A one-token reply keeps each generated example cheap; the fuzz is about the inputs. One
    # app per test: schemathesis' pytest plugin ends the app's lifespan (our worker) after each.
    app = create_app(FakeEngine(lambda prompt: "ok"), ServerOptions(ctx=2048, max_tokens=64))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def fuzz(op, mode: GenerationMode) -> set[int]:
    """Run EXAMPLES generated cases of one operation; return the status codes seen."""
    codes: set[int] = set()

    @given(op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def check(case):
        r = case.call()
        codes.add(r.status_code)
        assert r.status_code < 500, (op.label, case.body, r.text[:300])
        if r.status_code >= 400 and op.method.upper() == "POST":
            err = r.json()["error"]  # both error shapes carry an "error" object
            assert isinstance(err["message"], str) and err["message"]

    check()
    return codes


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api_schema, mode):
    operations = [op.ok() for op in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/messages",
                                              "POST /v1/responses", "POST /v1/completions"}  # fmt: skip
    if mode is GenerationMode.NEGATIVE:  # operations without inputs have no invalid form
        operations = [op for op in operations if op.method.upper() == "POST"]
    for op in operations:
        codes = fuzz(op, mode)
        if mode is GenerationMode.POSITIVE and op.path in GENERATING:
            assert 200 in codes, op.label  # the fuzz reaches generation, not only validation


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
ITEM_TYPES = ["message", "reasoning", "function_call", "custom_tool_call", "local_shell_call",
              "function_call_output", "custom_tool_call_output", "tool_search_output",
              "compaction"]  # fmt: skip
BLOCK = st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "output_text", "summary_text", "input_image"]) | JSON},
    optional={"text": JSON | st.text(max_size=8)},
)
VALUE = JSON | st.lists(BLOCK | JSON, max_size=3) | st.sampled_from(["user", "assistant", "c1"])
ITEM = st.fixed_dictionaries(
    {"type": st.sampled_from(ITEM_TYPES) | JSON},
    optional={k: VALUE for k in ("role", "content", "call_id", "name", "namespace", "arguments",
                                 "input", "output", "summary", "tools", "action")},
)  # fmt: skip


@given(items=st.lists(ITEM, min_size=1, max_size=4))
@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))  # fmt: skip
def test_responses_items_never_crash(items, responses_client):
    """Item-shaped junk (right keys, any JSON values) for the hand-written item parser."""
    r = responses_client.post("/v1/responses", json={"input": items, "max_output_tokens": 1})
    assert r.status_code in (200, 400), r.text


@pytest.fixture(scope="module")
def responses_client():
    app = create_app(FakeEngine(lambda prompt: "ok"), ServerOptions(ctx=2048))
    with TestClient(app) as client:
        yield client
