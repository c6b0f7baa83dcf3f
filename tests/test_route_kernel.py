"""The fused MoE router kernel against its torch reference (TRITON_INTERPRET=1 on the CPU).

Checks: ids equal the reference's (descending score + bias, lower id first on exact ties) and
weights within 1e-6 relative, over E in {16, 256}, k in {1, 6}, T in {1, 5}; exact ties; logits
around the softplus threshold and far below it (tiny scores); a bias that reorders the experts;
the weight-sum clamp; a strided logits view; the reference's ties against torch.topk's set; bad
input. The GPU test runs E = 256, k = 6 at T = 1..8 and a CUDA-graph replay.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
CUDA = torch.cuda.is_available()

from ds4py.quant.triton.route import route, route_ref  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
SCALE = 1.5


def _inputs(T, E, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * spread
    bias = torch.randn(E, generator=g) * 0.1
    return logits.to(DEV), bias.to(DEV)


def _assert_same(logits, bias, k, scale=SCALE):
    ids, w = route(logits, bias, k, scale)
    rid, rw = route_ref(logits, bias, k, scale)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert ids.shape == w.shape == (logits.shape[0], k)
    assert torch.equal(ids, rid), (ids, rid)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-12)
    return ids, w


@pytest.mark.parametrize("E", [16, 256])
@pytest.mark.parametrize("k", [1, 6])
@pytest.mark.parametrize("T", [1, 5])
def test_matches_reference(E, k, T):
    logits, bias = _inputs(T, E, seed=E * 10 + k + T)
    _, w = _assert_same(logits, bias, k)
    torch.testing.assert_close(w.sum(-1), torch.full((T,), SCALE, device=DEV))


def test_exact_ties_pick_lower_ids():
    logits = torch.zeros(3, 16, device=DEV)
    logits[1, [2, 5, 9, 13]] = 1.0  # four tied winners, then twelve tied losers
    logits[2, ::2] = -30.0
    bias = torch.zeros(16, device=DEV)
    ids, _ = _assert_same(logits, bias, 6)
    assert ids[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert ids[1].tolist() == [2, 5, 9, 13, 0, 1]
    assert ids[2].tolist() == [1, 3, 5, 7, 9, 11]


def test_reference_ties_are_a_topk_set():
    """torch.topk (Block.moe's call) picks the same multiset of keys; only the tie order differs."""
    logits, bias = _inputs(4, 256, seed=3)
    logits[:, 10:40] = 0.5  # a crowd of equal scores
    ids, _ = route_ref(logits, bias * 0, 6, SCALE)
    key = torch.sqrt(F.softplus(logits))
    top = torch.topk(key, 6, dim=-1)
    torch.testing.assert_close(key.gather(1, ids), top.values, rtol=0, atol=0)


def test_softplus_threshold_and_tiny_scores():
    E = 16
    around = torch.tensor([19.9, 20.0, 20.1, 25.0, 19.999, 20.001, -5.0, 0.0])
    tiny = torch.tensor([-20.0, -30.0, -50.0, -80.0, -87.0, -95.0, -103.0, -120.0])
    logits = torch.stack([torch.cat([around, tiny]), torch.cat([tiny, tiny])]).to(DEV)
    bias = torch.zeros(E, device=DEV)
    for k in (1, 6):
        _assert_same(logits, bias, k)
    # the tiny scores alone: softplus ~ exp(x) survives in float32 (no log(1 + u) cancellation)
    ids, w = _assert_same(logits[1:], bias, 6)
    s = torch.sqrt(F.softplus(logits[1:].double())).gather(1, ids)
    torch.testing.assert_close(w.double(), SCALE * s / s.sum(), rtol=1e-6, atol=0)


def test_bias_reorders():
    E = 16
    logits = torch.linspace(2.0, 0.0, E, device=DEV)[None]  # expert 0 has the largest score
    bias = torch.zeros(E, device=DEV)
    bias[E - 1] = 10.0  # the smallest score wins through its bias
    ids, w = _assert_same(logits, bias, 6)
    assert ids[0, 0].item() == E - 1 and ids[0, 1].item() == 0
    scores = torch.sqrt(F.softplus(logits[0]))
    assert w[0, 0] < w[0, 1]  # weights use the unbiased scores
    torch.testing.assert_close(w[0, 0] / w[0, 1], scores[E - 1] / scores[0])


def test_weight_sum_clamp():
    logits = torch.full((1, 16), -100.0, device=DEV)  # scores ~ 2e-22: the sum is clamped
    _, w = _assert_same(logits, torch.zeros(16, device=DEV), 6)
    assert w.sum() < 1e-15


def test_strided_logits_and_odd_expert_count():
    big = _inputs(3, 40, seed=7)[0]
    bias = _inputs(1, 24, seed=8)[1]
    _assert_same(big[:, 5:29], bias, 6)  # row stride 40, 24 experts (not a power of two)
    _assert_same(big[:, 5:29].t().contiguous().t()[:, :24], bias, 6)  # column-major


def test_deterministic():
    logits, bias = _inputs(5, 256, seed=11)
    a, b = route(logits, bias, 6, SCALE), route(logits, bias, 6, SCALE)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "args, msg",
    [
        ((torch.zeros(16), torch.zeros(16), 6), "logits"),
        ((torch.zeros(1, 16, dtype=torch.float16), torch.zeros(16), 6), "logits"),
        ((torch.zeros(1, 16), torch.zeros(8), 6), "bias"),
        ((torch.zeros(1, 16), torch.zeros(16, dtype=torch.float64), 6), "bias"),
        ((torch.zeros(1, 16), torch.zeros(16), 0), "k"),
        ((torch.zeros(1, 16), torch.zeros(16), 17), "k"),
        ((torch.zeros(1, 16), torch.zeros(16), 2.0), "k"),
    ],
)
def test_bad_input(args, msg):
    for fn in (route, route_ref):
        with pytest.raises(ValueError, match=msg):
            fn(*args, SCALE)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_flash_sizes_and_graph():
    for T in range(1, 9):
        logits, bias = _inputs(T, 256, seed=T, spread=2.0)
        _assert_same(logits, bias, 6)
    logits, bias = _inputs(1, 256, seed=99)
    ids, w = route(logits, bias, 6, SCALE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gids, gw = route(logits, bias, 6, SCALE)
    new_logits, _ = _inputs(1, 256, seed=100)
    logits.copy_(new_logits)
    graph.replay()
    rid, rw = route_ref(logits, bias, 6, SCALE)
    assert torch.equal(gids, rid)
    torch.testing.assert_close(gw, rw, rtol=1e-6, atol=1e-12)
