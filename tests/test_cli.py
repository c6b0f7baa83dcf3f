"""CLI tests on a scripted engine (tests/helpers/cli_fake.py): exact output of `run`, the chat
REPL over piped stdin (prefix reuse, commands, /save + /load, Ctrl-C during decode and during
prefill), `tokens`, `logprobs` and `test-vectors` end to end, and the missing-model error."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from ds4py import cli, vectors
from ds4py.chat import ContentDelta, ReasoningDelta, ReasoningEnd, render_ids
from ds4py.tokenizer import BOS, Tokenizer

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from cli_fake import ScriptEngine, reply_ids  # noqa: E402

SYSTEM = cli.DEFAULT_SYSTEM


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


@pytest.fixture
def engine(tok, monkeypatch):
    eng = ScriptEngine(tok)
    monkeypatch.setattr(cli, "open_engine", lambda args: eng)
    return eng


def run_cli(capsys, *argv: str, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def answer(n: int, thinking: bool = True) -> str:
    return (f"<think>Thinking about turn {n}.</think>" if thinking else "") + f"Answer {n}."


# ---- run --------------------------------------------------------------------------------------


def test_run_streams_thinking_then_answer(engine, tok, capsys):
    rc, out, err = run_cli(capsys, "run", "-p", "hello")
    assert rc == 0
    assert out == answer(1) + "\n"
    sess = engine.sessions[0]
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    prompt = render_ids(msgs, tok, thinking=True)
    assert sess.syncs == [(0, len(prompt))]
    generated = reply_ids(tok, prompt)[:-1]  # EOS is sampled but never evaluated
    assert sess.tokens == prompt + generated
    assert f"generation {len(generated)} tokens" in err and "t/s" in err


def test_run_nothink_empty_system_and_token_limit(engine, tok, capsys):
    rc, out, _ = run_cli(capsys, "run", "-p", "hi", "--nothink", "-sys", "", "-n", "2")
    assert rc == 0
    prompt = render_ids([{"role": "user", "content": "hi"}], tok, thinking=False)
    assert prompt[-1] == tok.end_think_id
    sess = engine.sessions[0]
    assert sess.tokens[: len(prompt)] == prompt and len(sess.tokens) == len(prompt) + 2
    assert out == tok.decode(sess.tokens[len(prompt) :]) + "\n"


def test_run_prompt_sources(engine, tok, capsys, monkeypatch, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("from a file", encoding="utf-8")
    assert (
        run_cli(capsys, "run", "--prompt-file", str(f), "--nothink")[1] == answer(1, False) + "\n"
    )
    rc, out, _ = run_cli(capsys, "run", "--nothink", stdin="piped text", monkeypatch=monkeypatch)
    assert rc == 0 and out == answer(1, False) + "\n"
    assert tok.decode(engine.sessions[1].tokens).count("piped text") == 1


def test_run_rendered_prompt_is_used_verbatim(engine, tok, capsys):
    text = f"{BOS}<｜User｜>raw<｜Assistant｜></think>"
    rc, out, _ = run_cli(capsys, "run", "-p", text)
    assert rc == 0 and out == answer(1, False) + "\n"
    assert engine.sessions[0].syncs == [(0, len(tok.encode(text)))]
    assert engine.sessions[0].tokens[:5] == tok.encode(text)


def test_run_prompt_longer_than_context_is_a_clean_error(engine, capsys):
    rc, out, err = run_cli(capsys, "run", "-p", "word " * 50, "--ctx", "16")
    assert rc == 1 and "exceeds the context" in err and "Traceback" not in err


def test_missing_model_explains_how_to_get_one(capsys, tmp_path):
    missing = str(tmp_path / "nope.gguf")
    for argv in (["run", "-p", "x", "-m", missing], ["tokens", "x", "-m", missing]):
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2 and out == ""
        assert missing in err and cli.HF_REPO in err and "--demo" in err
        assert cli.HF_FILES[0][1] in err and "Traceback" not in err


def test_terminal_printer_dims_reasoning_and_separates_it():
    buf = io.StringIO()
    p = cli.Printer(buf, color=True)
    for ev in (ReasoningDelta("hmm"), ReasoningEnd(), ContentDelta("Yes."), ContentDelta("")):
        p.event(ev)
    p.finish()
    assert buf.getvalue() == f"{cli.DIM}hmm{cli.RESET}\n\nYes.\n"
    buf = io.StringIO()
    p = cli.Printer(buf, color=False)
    for ev in (ReasoningDelta("a\n"), ReasoningEnd(), ContentDelta("b")):
        p.event(ev)
    p.finish()
    assert buf.getvalue() == "<think>a\n</think>b\n"


# ---- chat (piped stdin) -----------------------------------------------------------------------


def chat(capsys, monkeypatch, lines: list[str], *flags: str):
    return run_cli(capsys, "chat", *flags, stdin="\n".join(lines) + "\n", monkeypatch=monkeypatch)


def test_chat_turns_only_prefill_the_new_text(engine, tok, capsys, monkeypatch):
    rc, out, err = chat(capsys, monkeypatch, ["hello", "", "again", "/quit", "ignored"])
    assert rc == 0
    assert out == answer(1) + "\n" + answer(2) + "\n"
    sess = engine.sessions[0]
    first = render_ids(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}], tok
    )
    gen1 = reply_ids(tok, first)[:-1]
    turn2 = [tok.user_id, *tok.encode("again", specials=False), tok.assistant_id, tok.think_id]
    # turn 2 reuses everything evaluated so far and prefills only EOS + the new user turn
    assert sess.syncs == [(0, len(first)), (len(first) + len(gen1), 1 + len(turn2))]
    assert sess.tokens[: len(first) + len(gen1) + 1 + len(turn2)] == (
        first + gen1 + [tok.eos_id] + turn2
    )
    assert err.count("generation ") == 2


def test_chat_commands(engine, tok, capsys, monkeypatch, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("read me", encoding="utf-8")
    lines = ["/help", "/nothink", "one", "/think-max", "/think", "two", "/read " + str(note),
             "/ctx 4096", "three", "/bogus", "/read " + str(tmp_path / "missing"), "/exit"]  # fmt: skip
    rc, out, err = chat(capsys, monkeypatch, lines)
    assert rc == 0
    assert "/save FILE" in out and "unknown command /bogus" in out
    assert "ctx below 393216" in out and "context: 4096 tokens" in out
    assert answer(1, False) in out and answer(2) in out and answer(3) in out and answer(4) in out
    assert "No such file" in err or "missing" in err
    first, second = engine.sessions
    assert second.ctx == 4096
    assert tok.decode(first.tokens).count("read me") == 1
    # the new session re-prefills the kept transcript: all 4 turns are in it
    assert second.syncs[0][0] == 0 and tok.decode(second.tokens).count("<｜User｜>") == 4


def test_chat_save_and_load(engine, tok, capsys, monkeypatch, tmp_path):
    snap = tmp_path / "chat.snap"
    rc, out, _ = chat(capsys, monkeypatch, ["hello", f"/save {snap}"], "-sys", "Be brief.")
    assert rc == 0 and f"to {snap}" in out
    saved = engine.sessions[0].tokens
    rc, out, _ = chat(capsys, monkeypatch, [f"/load {snap}", "again"])
    assert rc == 0 and answer(2) in out
    restored = engine.sessions[-1]
    # the restored session continues: only EOS + the new turn are prefilled
    assert restored.syncs[0][0] == len(saved)
    assert tok.decode(restored.tokens).startswith(BOS + "Be brief.")
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"junk")
    rc, out, err = chat(capsys, monkeypatch, [f"/load {bad}", "/quit"])
    assert rc == 0 and "not a ds4py chat snapshot" in err


def test_chat_ctrl_c_during_decode_keeps_the_session_consistent(engine, tok, capsys, monkeypatch):
    engine.sigint_at_eval = 5  # SIGINT arrives while the 5th token is evaluated
    rc, out, err = chat(capsys, monkeypatch, ["go on forever", "hello"])
    assert rc == 0 and "(interrupted)" in err
    la = tok.decode([engine.la])
    assert out.startswith("<think>" + la * 5 + "\n") and out.endswith(answer(2) + "\n")
    sess = engine.sessions[0]
    first_len, second = sess.syncs[0][1], sess.syncs[1]
    # the 5 evaluated tokens stay; EOS closes the partial answer and is prefilled next turn
    assert second[0] == first_len + 5
    assert sess.tokens[first_len + 5] == tok.eos_id


def test_chat_ctrl_c_during_prefill_drops_the_message(engine, tok, capsys, monkeypatch, tmp_path):
    long_text = "many words " * 100  # > 1 prefill chunk of the fake session
    engine.sigint_at_chunk = 1
    snap = tmp_path / "s"
    rc, out, err = chat(capsys, monkeypatch, [long_text, f"/save {snap}", f"/load {snap}", "hi"])
    assert rc == 0 and "(interrupted)" in err
    # the message is dropped from the transcript and from the session (/load checks they agree)
    assert "loaded" in out and out.endswith(answer(1) + "\n")
    assert "many words" not in tok.decode(engine.sessions[-1].tokens)


def test_chat_second_ctrl_c_aborts_the_prefill_with_a_fresh_session(
    engine, tok, capsys, monkeypatch
):
    engine.sigint_at_chunk, engine.sigints = 1, 2
    rc, out, err = chat(capsys, monkeypatch, ["many words " * 100, "hello"])
    assert rc == 0 and "aborted" in err
    assert out == answer(1) + "\n"
    aborted, fresh = engine.sessions
    assert len(aborted.syncs) == 1 and fresh.syncs[0][0] == 0
    assert "many words" not in tok.decode(fresh.tokens)


# ---- tokens / logprobs ------------------------------------------------------------------------


def test_tokens_prints_ids_and_vocab_pieces(tok, capsys):
    text = f"{BOS}Hello  world</｜DSML｜x"
    rc, out, _ = run_cli(capsys, "tokens", "--demo", text)
    lines = out.splitlines()
    ids = tok.encode(text)
    assert rc == 0 and lines[0] == "[" + ", ".join(map(str, ids)) + "]"
    assert ids[0] == tok.bos_id and tok.token_to_id("</") in ids and tok.dsml_id in ids
    assert lines[1:] == [f"{i:6d}  {tok.id_to_token(i)}" for i in ids]
    assert any(line.endswith("  Ġworld") for line in lines)


def test_logprobs_writes_a_ds4_dump(engine, tok, capsys, tmp_path):
    out_file = tmp_path / "lp.json"
    argv = ["logprobs", "-p", "hi", "--nothink", "-sys", "", "-n", "50", "--top-k", "3"]
    rc, out, _ = run_cli(capsys, *argv, "--out", str(out_file))
    assert rc == 0 and out == ""
    text = out_file.read_text(encoding="utf-8")
    dump = json.loads(text)
    prompt = render_ids([{"role": "user", "content": "hi"}], tok, thinking=False)
    script = reply_ids(tok, prompt)
    assert list(dump) == ["source", "prompt_tokens", "ctx", "top_k", "steps"]
    assert (dump["source"], dump["prompt_tokens"], dump["top_k"]) == ("ds4", len(prompt), 3)
    assert [s["selected"]["id"] for s in dump["steps"]] == script  # ends with the EOS step
    assert len(text.splitlines()) == 6 + len(script) + 2  # one line per step
    x = torch.full((tok.vocab_size,), -20.0)
    x[script[0]], x[engine.runner_up] = 20.0, 16.0
    ref = torch.log_softmax(x.double(), -1)
    top = dump["steps"][0]["top_logprobs"]
    assert [t["token"]["id"] for t in top][:2] == [script[0], engine.runner_up]
    assert top[1]["logprob"] == pytest.approx(float(ref[engine.runner_up]), rel=1e-6)
    assert top[0]["token"]["bytes"] == list(tok.token_bytes(script[0]))
    assert engine.sessions[0].evals == len(script) - 1  # EOS is never evaluated


def test_logprobs_rejects_bad_top_k(engine, capsys, tmp_path):
    rc, _, err = run_cli(
        capsys, "logprobs", "-p", "x", "--top-k", "0", "--out", str(tmp_path / "f")
    )
    assert rc == 2 and "--top-k" in err


# ---- test-vectors -----------------------------------------------------------------------------


class OracleEngine(ScriptEngine):
    """Continues every vector prompt with the official tokens (optionally one wrong step)."""

    def __init__(self, tok, wrong_step: int | None = None) -> None:
        super().__init__(tok)
        self.by_bytes = vectors.vocab_by_bytes(tok)
        self.prompts = {
            tuple(vectors.vector_prompt_ids(tok, c.prompt)): c for c in vectors.load_cases()
        }
        self.wrong_step = wrong_step

    def next_logits(self, tokens):
        a = len(tokens) - 1 - tokens[::-1].index(self.tokenizer.assistant_id)
        case, step = self.prompts[tuple(tokens[: a + 2])], len(tokens) - a - 2
        want = self.by_bytes[bytes(case.official["steps"][step]["token"]["bytes"])]
        x = torch.full((self.tokenizer.vocab_size,), -30.0)
        x[self.runner_up if step == self.wrong_step else want] = 10.0
        return x


def test_vectors_pass_with_an_oracle_model(tok, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "open_engine", lambda args: OracleEngine(tok))
    rc, out, err = run_cli(capsys, "test-vectors", "--dump-dir", str(tmp_path))
    assert rc == 0, out
    assert out.count("PASS") == 4 and "FAIL" not in out and "long_memory_archive" in err
    dump = json.loads((tmp_path / "short_italian_fact.ds4py.json").read_text("utf-8"))
    assert dump["ctx"] == 16384 and len(dump["steps"]) == 4
    assert vectors.compare(vectors.load_cases(["short_italian_fact"])[0].official, dump).ok


def test_vectors_fail_when_one_step_differs(tok, capsys, monkeypatch):
    monkeypatch.setattr(cli, "open_engine", lambda args: OracleEngine(tok, wrong_step=2))
    rc, out, _ = run_cli(capsys, "test-vectors", "--case", "short_code_completion")
    assert rc == 1 and "FAIL" in out and "step 2: selected" in out
    assert "│ 3/4 " in out  # teacher forcing: step 3 is still scored in the official context


def test_vectors_tokenize_only_needs_no_weights(capsys, monkeypatch):
    monkeypatch.setattr(cli, "open_engine", lambda args: pytest.fail("no engine needed"))
    rc, out, _ = run_cli(capsys, "test-vectors", "--tokenize-only", "--demo", "--all")
    assert rc == 0 and out.count("PASS") == 5
    for case in vectors.load_cases():
        assert f"{case.api_prompt_tokens}/{case.api_prompt_tokens}" in out


# ---- dispatch to other modules ----------------------------------------------------------------


def test_serve_gets_the_server_flags(monkeypatch):
    from ds4py.server import app
    from ds4py.server.options import ServerOptions

    got = []
    monkeypatch.setattr(app, "serve", lambda args: got.append(args) or 0)
    assert cli.main(["serve", "--demo", "--port", "8123", "--ctx", "4096"]) == 0
    opts = ServerOptions.from_namespace(got[0])
    assert (opts.demo, opts.port, opts.ctx) == (True, 8123, 4096)


def test_convert_and_synth_get_their_argv(monkeypatch):
    import types

    got = {}
    for name in ("convert", "synth"):
        mod = types.ModuleType(f"ds4py.{name}")
        mod.main = lambda argv, name=name: got.setdefault(name, argv) and 3
        monkeypatch.setitem(sys.modules, f"ds4py.{name}", mod)
    assert cli.main(["convert", "src", "out.gguf", "--type", "q8_0"]) == 3
    assert cli.main(["synth", "--help"]) == 3
    assert got == {"convert": ["src", "out.gguf", "--type", "q8_0"], "synth": ["--help"]}


def test_bench_gets_ds4_bench_flags(monkeypatch, capsys):
    import types

    mod = types.ModuleType("ds4py.bench")
    mod.main = lambda args: 0 if args.prompt_file == "p.txt" and args.ctx_max == 4096 else 5
    monkeypatch.setitem(sys.modules, "ds4py.bench", mod)
    assert cli.main(["bench", "--demo", "--prompt-file", "p.txt", "--ctx-max", "4096"]) == 0
    monkeypatch.setitem(sys.modules, "ds4py.bench", None)  # a build without the module
    assert cli.main(["bench", "--plot", "run.csv"]) == 1
    assert "ds4py.bench.main is not available" in capsys.readouterr().err


def test_prefill_bar_lives_from_first_to_last_chunk(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    bar = cli.PrefillBar()
    bar(0, 300)
    assert bar.progress is not None
    bar(200, 300)
    assert bar.progress.tasks[0].completed == 200
    bar(300, 300)
    assert bar.progress is None  # closed before the answer streams
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar
    bar(0, 300)
    assert bar.progress is None
