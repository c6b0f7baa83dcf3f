"""The decode indexer top-k kernel against its torch reference (TRITON_INTERPRET=1 on the CPU).

Checks: the selected set equals the reference's where scores are well separated, and is a valid
top-k within 1e-5 of the score scale everywhere; the scores behind the ranking are float32-exact
(against float64); exact ties and crowded near-ties pick the lower ids; fewer visible rows than
k (invisible ids fill up), none, all; capacities that are not multiples of the block; both row
stores, both selection paths (one program, histogram passes); scratch reuse; bad input. The GPU
test runs the Flash sizes (64 heads x 128 dims, k = 512, up to 262 145 rows) and a graph replay.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
CUDA = torch.cuda.is_available()

from ds4py.kv.state import FloatRows, FP4Rows, FP8Rows  # noqa: E402
from ds4py.model.model import fp4_sim  # noqa: E402
from ds4py.quant.triton.indexer import (  # noqa: E402
    IndexerScratch,
    TopkConfig,
    indexer_scores_ref,
    indexer_topk,
    indexer_topk_ref,
)

DEV = "cuda" if CUDA else "cpu"
SMALL = TopkConfig()  # caps here are below small_cap: one-program selection
PASSES = TopkConfig(block=32, chunk=64, small_cap=0)  # histogram passes over several programs
BITS3 = TopkConfig(select_bits=3)  # one-program selection deciding 3 key bits a step


def _inputs(store, cap, di=64, hi=16, seed=0, fp4_q=True, data=None):
    """Rows as the model writes them (FP4 round trip for the compact store), queries, weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cap, di, generator=g) if data is None else data
    rows = store(cap, di, DEV)
    rows.write(torch.arange(cap, device=DEV), (fp4_sim(x) if store is FP4Rows else x).to(DEV))
    qi = torch.randn(hi, di, generator=g)
    qi = fp4_sim(qi) if fp4_q else qi
    w = torch.randn(hi, generator=g) / (hi * di) ** 0.5
    return qi.to(DEV), w.to(DEV), rows


def _pos(n, ratio=4):
    """The first position that sees n rows: (pos + 1) // ratio == n, pos // ratio == n - 1."""
    return torch.tensor([max(n * ratio - 1, 0)], device=DEV)


def _check_topk(got, scores, n, k, tol=1e-5):
    """got is a valid top-k of `scores` (ascending unique ids; ids 0..k-1 when n <= k)."""
    assert got.dtype == torch.int64 and got.shape == (k,)
    got = got.cpu()
    assert bool((got[1:] > got[:-1]).all()), "ids not ascending and unique"
    if n <= k:
        assert torch.equal(got, torch.arange(k))
        return
    assert int(got.max()) < n, "an invisible row was selected"
    s = scores[:n].double().cpu()
    picked = torch.zeros(n, dtype=torch.bool)
    picked[got] = True
    scale = float(s.abs().max()) or 1.0
    assert float(s[picked].min()) >= float(s[~picked].max()) - tol * scale


def _separated(scores, n, k) -> bool:
    """The k-th and (k+1)-th scores are far apart (no float summation order can swap them)."""
    s = scores[:n].sort(descending=True).values
    return n <= k or float(s[k - 1] - s[k]) > 1e-4 * float(s.abs().max())


CASES = [(300, 250, 40), (300, 300, 40), (300, 41, 40), (300, 40, 40), (300, 7, 40),
         (300, 0, 40), (37, 37, 37), (37, 36, 1)]  # fmt: skip


@pytest.mark.parametrize("cfg", [SMALL, PASSES, BITS3], ids=["one-program", "passes", "3-bit"])
@pytest.mark.parametrize("store,fp4_q", [(FP4Rows, True), (FP4Rows, False), (FloatRows, False)])
@pytest.mark.parametrize("cap,n,k", CASES)
def test_matches_reference(cap, n, k, store, fp4_q, cfg):
    pos = _pos(n)
    for seed in range(cap + n + k, cap + n + k + 50):  # the first draw whose boundary is clear
        qi, w, rows = _inputs(store, cap, seed=seed, fp4_q=fp4_q)
        scores = indexer_scores_ref(qi, w, rows, pos, 4)
        if _separated(scores, n, k):
            break
    else:
        pytest.fail("no draw with a clear boundary")
    got = indexer_topk(qi, w, rows, pos, 4, k, cfg=cfg)
    _check_topk(got, scores, n, k)
    assert torch.equal(got, indexer_topk_ref(qi, w, rows, pos, 4, k))


@pytest.mark.parametrize("cfg", [SMALL, PASSES, BITS3], ids=["one-program", "passes", "3-bit"])
@pytest.mark.parametrize("store", [FP4Rows, FloatRows])
@pytest.mark.parametrize("groups", [1, 5])
def test_exact_ties_pick_lower_ids(groups, store, cfg):
    """Rows repeat with period `groups`: equal rows score equal, so the boundary group gives
    its lowest ids (the reference's stable sort)."""
    cap, n, k = 200, 190, 50
    g = torch.Generator().manual_seed(groups)
    base = torch.randn(groups, 64, generator=g)
    qi, w, rows = _inputs(store, cap, data=base[torch.arange(cap) % groups], seed=groups)
    pos = _pos(n)
    got = indexer_topk(qi, w, rows, pos, 4, k, cfg=cfg).cpu()
    scores = indexer_scores_ref(qi, w, rows, pos, 4)[:groups].double().cpu()
    want, ids = [], torch.arange(n)
    for grp in scores.argsort(descending=True, stable=True).tolist():  # well apart: random rows
        want += ids[ids % groups == grp][: k - len(want)].tolist()
    assert torch.equal(got, torch.tensor(sorted(want)))


@pytest.mark.parametrize("cfg", [SMALL, PASSES, BITS3], ids=["one-program", "passes", "3-bit"])
def test_crowded_near_equal_scores(cfg):
    """Rows (1 + m 2**-10) v, m = id % 7: scores a hair apart, each value on ~27 rows, so the
    digit histograms see crowded neighbouring bins; the top groups by m, lowest ids last."""
    cap, n, k, groups = 200, 190, 50, 7
    g = torch.Generator().manual_seed(9)
    v = torch.randn(64, generator=g)
    m = torch.arange(cap) % groups
    rows = FloatRows(cap, 64, DEV)
    rows.write(torch.arange(cap, device=DEV), ((1 + m[:, None] * 2.0**-10) * v).to(DEV))
    qi = (v + 0.1 * torch.randn(16, 64, generator=g)).to(DEV)  # qi_h . v > 0 for every head
    w = torch.rand(16, generator=g).to(DEV)
    got = indexer_topk(qi, w, rows, _pos(n), 4, k, cfg=cfg).cpu()
    want, ids = [], torch.arange(n)
    for grp in range(groups - 1, -1, -1):
        want += ids[ids % groups == grp][: k - len(want)].tolist()
    assert torch.equal(got, torch.tensor(sorted(want)))


@pytest.mark.parametrize("cfg", [SMALL, PASSES, BITS3], ids=["one-program", "passes", "3-bit"])
def test_zero_scores_tie_whatever_their_sign(cfg):
    """Zero rows score 0 (summed as +0 or -0); they outrank negative scores and tie among
    themselves, so the lowest zero ids fill the top-k after the positive rows."""
    cap, n, k = 160, 150, 60
    g = torch.Generator().manual_seed(3)
    x = torch.randn(cap, 64, generator=g)
    x[torch.arange(cap) % 3 != 0] = 0.0
    qi, w, rows = _inputs(FP4Rows, cap, data=x)
    w = -w.abs()  # nonzero rows score below zero
    w[0] = 1.0
    pos = _pos(n)
    got = indexer_topk(qi, w, rows, pos, 4, k, cfg=cfg)
    scores = indexer_scores_ref(qi, w, rows, pos, 4)
    assert torch.equal(got, indexer_topk_ref(qi, w, rows, pos, 4, k))
    _check_topk(got, scores, n, k)


def _score_error(qi, w, rows, n, scratch) -> float:
    """Largest error of the scores behind scratch.keys (the kernel's order-preserving int32
    keys) against float64, relative to sum_h |w_h| sum_d |qi_hd row_d| (the sums' scale)."""
    k = scratch.keys[:n].cpu()
    got = torch.where(k >= 0, k, k ^ 0x7FFFFFFF).view(torch.float32).double()
    q, x, wd = qi.double().cpu(), rows.get(n).double().cpu(), w.double().cpu()
    exact = (wd[:, None] * torch.relu(q @ x.T)).sum(0)
    bound = (wd.abs()[:, None] * (q.abs() @ x.abs().T)).sum(0)
    return float(((got - exact).abs() / bound).max())


@pytest.mark.parametrize("store,fp4_q", [(FP4Rows, True), (FP4Rows, False), (FloatRows, False)])
def test_scores_are_float32_accurate(store, fp4_q):
    """bfloat16 parts that add up exactly: as accurate as a float32 dot (the reference's own
    error is ~3e-8 of the scale); a missing part costs 1e-6 or more."""
    cap = 200
    qi, w, rows = _inputs(store, cap, seed=5, fp4_q=fp4_q)
    scratch = IndexerScratch.new(cap, DEV)
    indexer_topk(qi, w, rows, _pos(cap), 4, 16, scratch=scratch)
    assert _score_error(qi, w, rows, cap, scratch) < 3e-7


@pytest.mark.parametrize("cfg", [SMALL, PASSES, BITS3], ids=["one-program", "passes", "3-bit"])
def test_scratch_is_reusable(cfg):
    cap = 300
    qi, w, rows = _inputs(FP4Rows, cap, seed=7)
    scratch = IndexerScratch.new(cap, DEV, cfg)
    for n, k in [(250, 40), (20, 40), (300, 64), (250, 40)]:
        got = indexer_topk(qi, w, rows, _pos(n), 4, k, scratch=scratch, cfg=cfg)
        assert torch.equal(got, indexer_topk(qi, w, rows, _pos(n), 4, k, cfg=cfg))
        assert int(scratch.hist.abs().sum()) == 0, "the histograms must be clear after a call"


def test_other_ratio_and_block_remainders():
    cap, k = 131, 24
    qi, w, rows = _inputs(FloatRows, cap, seed=11)
    pos = torch.tensor([128 * 100 + 5], device=DEV)  # ratio 128: 100 rows visible
    for cfg in (TopkConfig(block=16), TopkConfig(block=64, chunk=32, small_cap=0)):
        got = indexer_topk(qi, w, rows, pos, 128, k, cfg=cfg)
        assert torch.equal(got, indexer_topk_ref(qi, w, rows, pos, 128, k))


def test_bad_input_is_rejected():
    qi, w, rows = _inputs(FP4Rows, 40)
    pos = _pos(30)
    with pytest.raises(ValueError, match="FloatRows or FP4Rows"):
        indexer_topk(qi, w, FP8Rows(40, 128, 64, DEV), pos, 4, 8)
    with pytest.raises(ValueError, match="qi must be float32"):
        indexer_topk(qi.half(), w, rows, pos, 4, 8)
    with pytest.raises(ValueError, match="w must be"):
        indexer_topk(qi, w[:3], rows, pos, 4, 8)
    with pytest.raises(ValueError, match="wide"):
        indexer_topk(qi[:, :32].contiguous(), w, rows, pos, 4, 8)
    with pytest.raises(ValueError, match="pos must be"):
        indexer_topk(qi, w, rows, pos.int(), 4, 8)
    with pytest.raises(ValueError, match="k must be"):
        indexer_topk(qi, w, rows, pos, 4, 41)
    with pytest.raises(ValueError, match="scratch does not fit"):
        indexer_topk(qi, w, rows, pos, 4, 8, scratch=IndexerScratch.new(10, DEV))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("store", [FP4Rows, FloatRows])
def test_flash_sizes_on_gpu(store):
    hi, di, k = 64, 128, 512
    for cap, ns in [(1025, [1, 512, 513, 1024]), (262145, [1, 511, 513, 32768, 262145])]:
        qi, w, rows = _inputs(store, cap, di=di, hi=hi, seed=cap)
        scratch = IndexerScratch.new(cap, DEV)
        for n in ns:
            pos = _pos(n)
            got = indexer_topk(qi, w, rows, pos, 4, k, scratch=scratch)
            _check_topk(got, indexer_scores_ref(qi, w, rows, pos, 4), n, k)
            again = indexer_topk(qi, w, rows, pos, 4, k, scratch=scratch)
            assert torch.equal(got, again), "not deterministic"
            if n > k:
                assert _score_error(qi, w, rows, n, scratch) < 1e-5
        graph, pos = torch.cuda.CUDAGraph(), _pos(ns[-1])
        indexer_topk(qi, w, rows, pos, 4, k, scratch=scratch)  # compiled before capture
        with torch.cuda.graph(graph):
            out = indexer_topk(qi, w, rows, pos, 4, k, scratch=scratch)
        for n in ns:
            pos.copy_(_pos(n))
            graph.replay()
            assert torch.equal(out, indexer_topk(qi, w, rows, pos, 4, k, scratch=scratch))
