"""Sampling tests with mock logits: determinism per seed, the ds4 filter order
(top-k -> temperature -> min-p -> top-p), and greedy forcing inside DSML syntax."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ds4py.chat import encode_tool_calls
from ds4py.sample import DsmlTracker, Sampler, SamplingParams
from ds4py.tokenizer import Tokenizer


def _logits(weights: list[float], vocab: int = 64) -> torch.Tensor:
    """Mock logits with the given relative weights on ids 0.., the rest impossible."""
    x = torch.full((vocab,), -math.inf)
    x[: len(weights)] = torch.log(torch.tensor(weights))
    return x


def _draws(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    sampler = Sampler(params)
    return [sampler.sample(logits) for _ in range(n)]


# ---- determinism and greedy ----


def test_same_seed_same_sequence() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.5, min_p=0.0, seed=42)
    first = _draws(params, logits, 64)
    assert first == _draws(params, logits, 64)
    assert first != _draws(SamplingParams(temperature=1.5, min_p=0.0, seed=43), logits, 64)
    assert len(set(first)) > 10  # really sampling, not argmax
    unseeded = Sampler(SamplingParams(temperature=1.5, min_p=0.0))
    replay = Sampler(SamplingParams(temperature=1.5, min_p=0.0, seed=unseeded.seed))
    assert [unseeded.sample(logits) for _ in range(16)] == [
        replay.sample(logits) for _ in range(16)
    ]


def test_greedy_and_zero_temperature() -> None:
    logits = torch.tensor([0.0, 3.0, 3.0, 1.0, float("nan")])
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits) == 1  # first maximum
    assert Sampler(SamplingParams(temperature=-1.0)).sample(logits) == 1
    assert all(Sampler(SamplingParams(seed=s)).sample(logits, greedy=True) == 1 for s in range(20))
    assert Sampler(SamplingParams(temperature=0)).probs(logits).tolist() == [0, 1, 0, 0, 0]


def test_frequencies_follow_softmax() -> None:
    draws = Counter(_draws(SamplingParams(min_p=0.0, seed=1), _logits([0.5, 0.3, 0.2]), 6000))
    for tid, p in enumerate([0.5, 0.3, 0.2]):
        assert abs(draws[tid] / 6000 - p) < 0.03
    assert set(draws) == {0, 1, 2}


# ---- filter order ----


def test_temperature_applies_before_min_p() -> None:
    logits = _logits([1.0, 0.01])  # ratio 0.01 < min_p 0.05 at T=1, 0.1 at T=2
    assert Sampler(SamplingParams(temperature=1.0)).probs(logits)[1] == 0
    hot = Sampler(SamplingParams(temperature=2.0)).probs(logits)
    assert hot[1] == pytest.approx(0.1 / 1.1, rel=1e-5)


def test_top_k_applies_before_top_p() -> None:
    # 100 near-ties after the two best. Within the top-2 set the best holds 53% >= top_p, so
    # only it survives; measured against the full vocabulary it would hold 1% and keep more.
    logits = _logits([1.0, 0.9] + [0.9] * 100, vocab=128)
    probs = Sampler(SamplingParams(top_k=2, top_p=0.5, min_p=0.0)).probs(logits)
    assert probs.nonzero().flatten().tolist() == [0]
    wide = Sampler(SamplingParams(top_k=0, top_p=0.5, min_p=0.0)).probs(logits)
    assert int((wide > 0).sum()) > 2


def test_top_p_mass_is_measured_before_min_p() -> None:
    # 1000 tiny tokens (ratio 0.01, dropped by min-p) still count in the top-p mass: A holds
    # 1/11.5 of it, so A and B are both needed to approach top_p=0.2. Renormalizing after
    # min-p would give A 2/3 of the mass and keep A alone.
    logits = _logits([1.0, 0.5] + [0.01] * 1000, vocab=1100)
    probs = Sampler(SamplingParams(top_p=0.2, min_p=0.05)).probs(logits)
    assert probs.nonzero().flatten().tolist() == [0, 1]
    assert probs[:2].tolist() == pytest.approx([2 / 3, 1 / 3], rel=1e-5)
    draws = Counter(_draws(SamplingParams(top_p=0.2, seed=3), logits, 3000))
    assert set(draws) == {0, 1} and abs(draws[1] / 3000 - 1 / 3) < 0.04


def test_top_p_includes_the_crossing_token() -> None:
    logits = _logits([0.4, 0.35, 0.25])
    assert Sampler(SamplingParams(top_p=0.5, min_p=0)).probs(logits).nonzero().numel() == 2
    assert Sampler(SamplingParams(top_p=0.41, min_p=0)).probs(logits).nonzero().numel() == 2
    assert Sampler(SamplingParams(top_p=0.39, min_p=0)).probs(logits).nonzero().numel() == 1
    assert Sampler(SamplingParams(top_p=0.76, min_p=0)).probs(logits).nonzero().numel() == 3


def test_sanitized_knobs_and_errors() -> None:
    logits = _logits([0.5, 0.3, 0.2])
    full = Sampler(SamplingParams(min_p=0)).probs(logits)
    assert torch.equal(Sampler(SamplingParams(top_p=0.0, min_p=-1)).probs(logits), full)
    assert torch.equal(Sampler(SamplingParams(top_p=1.5, min_p=0, top_k=-3)).probs(logits), full)
    with pytest.raises(ValueError, match="finite"):
        Sampler().sample(torch.full((4,), -math.inf))
    with pytest.raises(ValueError, match="non-empty"):
        Sampler().sample(torch.tensor([]))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))


# ---- greedy forcing inside DSML ----


def _greedy_trace(tracker: DsmlTracker, pieces: list[str]) -> list[bool]:
    out = []
    for piece in pieces:
        tracker.feed(piece)
        out.append(tracker.greedy)
    return out


def test_dsml_tracker_states() -> None:
    t = DsmlTracker()
    steps = [
        ("Sure.", False),
        ("\n\n<｜DSML｜tool_calls>", True),
        ('\n<｜DSML｜invoke name="bash">\n', True),
        ('<｜DSML｜parameter name="cmd" string="true">', False),
        ("ls -la > out && echo", False),
        ("</", True),  # a closing tag has begun: finish it greedily
        ("｜DSML｜parameter>\n", True),
        ('<｜DSML｜parameter name="opts" string="false">', True),
        ('{"depth": ', True),
        ('"deep', False),
        ('\\" value', False),
        ('"}', True),
        ("</｜DSML｜parameter>\n</｜DSML｜invoke>\n", True),
        ("</｜DSML｜tool_calls>", False),
        ('<｜DSML｜parameter name="x" string="true">', False),  # block closed: never again
    ]
    for piece, greedy in steps:
        t.feed(piece)
        assert t.greedy is greedy, (piece, t.state)


def test_dsml_tracker_ignores_reasoning() -> None:
    t = DsmlTracker(thinking=True)
    assert _greedy_trace(t, ["plan: <｜DSML｜tool_calls>\n", "<｜DSML｜invoke "]) == [False, False]
    t.feed("</think>done\n\n<｜DSML｜tool_calls>")
    assert t.greedy


def test_dsml_tracker_on_real_tokens() -> None:
    """Token by token over a rendered call: string payload tokens are sampled, syntax is forced."""
    tok = Tokenizer.default()
    value = "echo 'a < b' && cat </tmp/x"
    text = "Running it." + encode_tool_calls([("bash", {"command": value, "n": [1, {"k": "v"}]})])
    t = DsmlTracker()
    emitted, free = "", []
    for tid in tok.encode(text):
        if not t.greedy:
            free.append(len(emitted))
        piece = tok.decode([tid])
        t.feed(piece)
        emitted += piece
    assert t.state == "done"
    start = text.index(value)
    payload = [p for p in free if start <= p < start + len(value)]
    assert payload and payload[0] == start  # the value's first token is sampled
    opened = text.index("<｜DSML｜tool_calls>") + len("<｜DSML｜tool_calls>")
    inside_tags = [p for p in free if opened <= p < start]
    assert not inside_tags
    assert any(text[p] == "v" for p in free if p > start + len(value))  # JSON string literal
