"""`ds4py run / logprobs / chat --demo` against the real engine (tiny random weights, real
tokenizer): the CLI's session use must agree with the engine's own scoring. One demo engine is
shared by the module (opening and warming it up is the slow part)."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from ds4py import Engine, cli
from ds4py.chat import render_ids

pytestmark = pytest.mark.slow  # ~30-50 s on 2 busy cores, mostly the demo engine's first steps
FLAGS = ["--demo", "--nothink", "-sys", "", "--ctx", "128"]  # + "--temp 0" where sampling


@pytest.fixture(scope="module")
def demo():
    return Engine.demo(device="cpu", seed=0)


@pytest.fixture
def sessions(demo, monkeypatch):
    made = []

    def new_session(ctx=None):
        made.append(Engine.new_session(demo, ctx))
        return made[-1]

    def open_engine(args):
        assert args.demo
        return demo

    monkeypatch.setattr(demo, "new_session", new_session, raising=False)
    monkeypatch.setattr(cli, "open_engine", open_engine)
    return made


def prompt(tok, text: str) -> list[int]:
    return render_ids([{"role": "user", "content": text}], tok, thinking=False)


def test_run_greedy_matches_engine_scores(demo, sessions, capsys):
    assert cli.main(["run", *FLAGS, "--temp", "0", "-p", "Hi", "-n", "3"]) == 0
    out = capsys.readouterr().out
    tok, sess = demo.tokenizer, sessions[0]
    ids = prompt(tok, "Hi")
    gen = sess.tokens[len(ids) :]
    assert sess.tokens[: len(ids)] == ids and 1 <= len(gen) <= 3
    assert out == tok.decode(gen) + "\n"
    # greedy: every generated token is the argmax of a fresh full prefill of what precedes it
    scores = demo.score(sess.tokens)
    for i, t in enumerate(gen):
        assert int(scores[len(ids) - 1 + i].argmax()) == t


def test_logprobs_dump_matches_engine_scores(demo, sessions, capsys, tmp_path):
    f = tmp_path / "lp.json"
    assert cli.main(["logprobs", *FLAGS, "-p", "Hi", "-n", "2", "--out", str(f)]) == 0
    dump = json.loads(f.read_text(encoding="utf-8"))
    ids = prompt(demo.tokenizer, "Hi")
    assert dump["prompt_tokens"] == len(ids) and dump["ctx"] == 128 and dump["top_k"] == 20
    ref = torch.log_softmax(demo.score(ids)[-1].double(), -1)
    top = dump["steps"][0]["top_logprobs"]
    assert dump["steps"][0]["selected"]["id"] == int(ref.argmax()) == top[0]["token"]["id"]
    for t in top:
        assert t["logprob"] == pytest.approx(float(ref[t["token"]["id"]]), abs=2e-3)
    assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)


def test_chat_second_turn_reuses_the_session(demo, sessions, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n"))
    assert cli.main(["chat", *FLAGS, "--temp", "0", "-n", "2"]) == 0
    err = capsys.readouterr().err
    tok, sess = demo.tokenizer, sessions[0]
    first = prompt(tok, "Hi")
    turn2 = [tok.user_id, *tok.encode("Again", specials=False), tok.assistant_id, tok.end_think_id]
    gen1 = sess.tokens[len(first) : len(first) + 2]
    if tok.eos_id in sess.tokens[len(first) :]:  # a random model may end its answer early
        gen1 = sess.tokens[len(first) : sess.tokens.index(tok.eos_id, len(first))]
    assert sess.tokens[: len(first) + len(gen1) + 1 + len(turn2)] == (
        first + gen1 + [tok.eos_id] + turn2
    )
    assert f"prefill {1 + len(turn2)} tokens" in err.splitlines()[1]


def test_tokens_from_a_gguf_reads_only_its_vocabulary(demo, capsys, monkeypatch):
    monkeypatch.setattr(cli, "open_engine", lambda args: pytest.fail("no weights needed"))
    text = "<｜begin▁of▁sentence｜><｜User｜>Hello  world</think>"
    assert cli.main(["tokens", "-m", str(demo.path), text]) == 0
    from_gguf = capsys.readouterr().out
    assert cli.main(["tokens", "--demo", text]) == 0
    assert from_gguf == capsys.readouterr().out
    assert from_gguf.splitlines()[0] == str(demo.tokenizer.encode(text)).replace("'", "")
