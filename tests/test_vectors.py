"""Official-vector comparison (ds4's --logprob-vectors criteria) and the --dump-logprobs format.

The comparison is fed fabricated dumps built from the bundled official JSON: one that matches
and several that break exactly one criterion. No model is needed here.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ds4py import vectors

CASES = {c.id: c for c in vectors.load_cases()}


def _tok(raw: bytes, tid: int = 7) -> dict:
    return vectors.token_json(tid, raw)


def matching_dump(official: dict, shift: float = 0.5, fillers: int = 19) -> dict:
    """A dump that agrees with the official vector: same argmax, ranked alternatives at the
    official logprob + `shift`, followed by unrelated filler tokens."""
    steps = []
    for s in official["steps"]:
        sel = bytes(s["token"]["bytes"])
        tops = [
            {
                "token": _tok(bytes(t["token"]["bytes"])),
                "logit": 0.0,
                "logprob": t["logprob"] + shift,
            }
            for t in s["top_logprobs"]
            if t["logprob"] > vectors.ALT_FLOOR
        ]
        tops += [
            {"token": _tok(f"filler{j}".encode()), "logit": 0.0, "logprob": -20.0 - j}
            for j in range(fillers)
        ]
        steps.append({"step": s["step"], "selected": _tok(sel), "top_logprobs": tops})
    return {"source": "ds4", "steps": steps}


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_matching_dump_passes(case_id):
    official = CASES[case_id].official
    res = vectors.compare(official, matching_dump(official, shift=0.5))
    assert res.ok, [p for s in res.steps for p in s.problems]
    assert len(res.steps) == len(official["steps"])
    assert res.worst_delta == pytest.approx(0.5)


def test_wrong_selected_token_fails_that_step():
    official = CASES["short_italian_fact"].official
    dump = matching_dump(official)
    dump["steps"][2]["selected"] = _tok(b"xyz")
    res = vectors.compare(official, dump)
    assert not res.ok
    assert [s.ok for s in res.steps] == [True, True, False, True]
    assert "selected" in res.steps[2].problems[0]


def test_logprob_tolerance_is_four():
    official = CASES["short_code_completion"].official
    assert vectors.compare(official, matching_dump(official, shift=3.99)).ok
    res = vectors.compare(official, matching_dump(official, shift=-4.01))
    assert not res.ok and all("logprob" in s.problems[0] for s in res.steps)


def test_official_alternative_must_be_in_our_top_20():
    official = CASES["short_reasoning_plain"].official
    dump = matching_dump(official, fillers=20)
    step = dump["steps"][0]
    ranked = step["top_logprobs"].pop(0)
    step["top_logprobs"].insert(20, ranked)  # 21st place: outside the compared top 20
    res = vectors.compare(official, dump)
    assert not res.ok and "not in our top 20" in res.steps[0].problems[0]
    assert vectors.compare(official, dump, top_k=21).ok


def test_unranked_api_alternatives_are_ignored():
    official = CASES["short_reasoning_plain"].official
    unranked = [t for t in official["steps"][0]["top_logprobs"] if t["logprob"] <= -1000]
    assert unranked, "the API reports -9999 for alternatives it did not rank"
    res = vectors.compare(official, matching_dump(official, fillers=0))
    assert res.ok


def test_missing_step_and_nan_fail():
    official = CASES["long_code_audit"].official
    dump = matching_dump(official)
    del dump["steps"][3]
    res = vectors.compare(official, dump)
    assert [s.ok for s in res.steps] == [True, True, True, False]
    dump = matching_dump(official)
    dump["steps"][0]["top_logprobs"][0]["logprob"] = float("nan")
    assert not vectors.compare(official, dump).ok


def test_compare_reads_a_ds4_json_file(tmp_path):
    official = CASES["short_italian_fact"].official
    steps = matching_dump(official)["steps"]
    text = vectors.dump_text(21, 16384, 20, steps)
    assert vectors.compare(official, json.loads(text)).ok
    bad = copy.deepcopy(steps)
    bad[0]["top_logprobs"][0]["logprob"] = -5.0
    assert not vectors.compare(official, json.loads(vectors.dump_text(21, 16384, 20, bad))).ok


def test_cases_bundled_with_prompts():
    assert list(CASES) == vectors.case_ids()
    for case in CASES.values():
        assert case.prompt == case.official["prompt"] and case.prompt
        assert case.ctx in (4096, 16384)
        assert case.api_prompt_tokens == case.official["usage"]["prompt_tokens"]
    assert CASES["long_memory_archive"].skipped
    with pytest.raises(vectors.VectorError, match="unknown vector case"):
        vectors.load_cases(["nope"])


# ---- dump format ------------------------------------------------------------------------------


def test_dump_text_layout_matches_ds4():
    step = {
        "step": 0,
        "selected": vectors.token_json(5, b"Hi"),
        "top_logprobs": [{"token": vectors.token_json(5, b"Hi"), "logit": 1.5, "logprob": -0.1}],
    }
    second = dict(step, step=1)
    text = vectors.dump_text(3, 4096, 20, [step, second])
    tok = '{"id":5,"text":"Hi","bytes":[72,105]}'
    line = '    {"step":%d,"selected":' + tok + ',"top_logprobs":[{"token":' + tok
    line += ',"logit":1.5,"logprob":-0.100000001}]}'
    expected = (
        '{\n  "source":"ds4",\n  "prompt_tokens":3,\n  "ctx":4096,\n  "top_k":20,\n  "steps":[\n'
        + (line % 0) + ",\n" + (line % 1) + "\n  ]\n}\n"
    )  # fmt: skip
    assert text == expected
    assert json.loads(text)["steps"][1]["step"] == 1
    assert vectors.dump_text(3, 4096, 20, []).endswith('"steps":[\n\n  ]\n}\n')


@pytest.mark.parametrize(
    "raw, text",
    [
        (b'a"b\\c', 'a"b\\c'),
        (b"\n\t\r\x01", "\n\t\r\x01"),
        ("è｜".encode(), "è｜"),
        (b"\xe2\x96", "\u00e2\u0096"),  # a UTF-8 fragment: each byte escaped (lossy)
    ],
)
def test_json_bytes_string(raw, text):
    s = vectors.json_bytes_string(raw)
    assert json.loads(s) == text
    assert s.isascii() or raw.decode("utf-8", "ignore") in s


def test_json_fragment_escapes_every_high_byte():
    assert vectors.json_bytes_string(b"a\xe2\x96") == '"a\\u00e2\\u0096"'


# ---- step collection ---------------------------------------------------------------------------


class _Tok:
    eos_id = 1

    def token_bytes(self, i: int) -> bytes:
        return f"<{i}>".encode()


class _ScriptSession:
    """Logits whose argmax follows a script; records what was evaluated."""

    def __init__(self, script: list[int], vocab: int = 16) -> None:
        self.script, self.vocab, self.evaluated = script, vocab, []
        self.logits = self._logits(0)

    def _logits(self, i: int) -> torch.Tensor:
        x = torch.linspace(-3, 0, self.vocab)
        x[self.script[min(i, len(self.script) - 1)]] = 5.0
        return x

    def eval(self, token: int) -> torch.Tensor:
        self.evaluated.append(token)
        return self._logits(len(self.evaluated))


def test_collect_steps_stops_after_eos_without_evaluating_it():
    sess = _ScriptSession([4, 6, 1, 9])
    steps = vectors.collect_steps(sess, _Tok(), 10, 3)
    assert [s["selected"]["id"] for s in steps] == [4, 6, 1]
    assert sess.evaluated == [4, 6]
    top = steps[0]["top_logprobs"]
    assert [t["token"]["id"] for t in top] == [4, 15, 14]
    ref = torch.log_softmax(sess._logits(0).double(), -1)
    assert top[0]["logprob"] == pytest.approx(float(ref[4]))
    assert top[0]["logit"] == 5.0


def test_collect_steps_teacher_forcing_and_limit():
    sess = _ScriptSession([4, 6, 7, 8])
    steps = vectors.collect_steps(sess, _Tok(), 3, 2, force=[9, None])
    assert [s["selected"]["id"] for s in steps] == [4, 6, 7]
    assert sess.evaluated == [9, 6]  # the last step is not evaluated


# ---- tokenization (real vocabulary) ------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from ds4py.tokenizer import Tokenizer

    return Tokenizer.default()


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_vector_prompt_has_the_api_token_count(tok, case_id):
    case = CASES[case_id]
    ids = vectors.vector_prompt_ids(tok, case.prompt)
    assert ids[:2] == [tok.bos_id, tok.user_id]
    assert ids[-2:] == [tok.assistant_id, tok.end_think_id]
    assert tok.decode(ids[2:-2]) == case.prompt
    check = vectors.check_tokenization(case, ids, vectors.vocab_by_bytes(tok))
    assert check.ok, check
    assert check.prompt_tokens == case.official["usage"]["prompt_tokens"]


def test_official_tokens_map_to_single_vocab_entries(tok):
    by_bytes = vectors.vocab_by_bytes(tok)
    for case in CASES.values():
        for raw in vectors.official_tokens(case.official):
            assert tok.token_bytes(by_bytes[raw]) == raw


def test_vector_prompt_keeps_special_literals_as_text(tok):
    ids = vectors.vector_prompt_ids(tok, "say </think> please")
    assert ids.count(tok.end_think_id) == 1 and ids[-1] == tok.end_think_id


def test_tokenization_check_reports_unknown_tokens_and_count(tok):
    case = CASES["short_reasoning_plain"]
    official = copy.deepcopy(case.official)
    official["steps"][0]["top_logprobs"][1]["logprob"] = -2.0  # now a ranked alternative
    official["steps"][0]["top_logprobs"][1]["token"]["bytes"] = list(b"\xff\xfeno such token")
    bad = vectors.OfficialCase(case.id, case.kind, case.ctx, case.prompt, 99, official)
    ids = vectors.vector_prompt_ids(tok, case.prompt)
    check = vectors.check_tokenization(bad, ids, vectors.vocab_by_bytes(tok))
    assert not check.ok
    assert check.prompt_tokens == case.api_prompt_tokens != 99
    assert len(check.unknown) == 1 and "no such token" in check.unknown[0]
