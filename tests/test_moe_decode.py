"""Decode MoE kernels with their own inner loops (ds4py/quant/triton/moe.py) vs torch references.

IQ2_XXS gate/up (shared-memory tables), Q2_K / Q4_K gate/up and down (128-weight units per lane,
slots in chunks), at small shapes: one and several rows per lane row, masked slots, 1-2 tokens.
Without CUDA they run in Triton's interpreter (dp4a / dp2a / prmt emulated, tables in global
memory). The kernels compute W @ x' exactly up to float32 sums (x' = the int8-rounded
activations), so the reference gets x' and the tolerance is 1e-5 (relative Frobenius); the
whole call is also checked against plain f32 activations at 3e-2, as in test_quant_triton.py.
"""

import importlib.util

import pytest
import torch
from gguf import GGMLQuantizationType as GQ

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
CUDA = torch.cuda.is_available()

from ds4py.quant import ref  # noqa: E402
from ds4py.quant.formats import random_qtensor  # noqa: E402
from ds4py.quant.triton import moe as moe_mod  # noqa: E402
from ds4py.quant.triton import moe_decode_hopper, tiles  # noqa: E402
from ds4py.quant.triton.act import quantize_act  # noqa: E402
from ds4py.quant.triton.gemv import gemv  # noqa: E402
from ds4py.quant.triton.moe import (  # noqa: E402
    down_launch,
    gate_up_launch,
    moe_decode,
    moe_decode_config,
    moe_decode_shared,
    moe_ref,
    operands,
)

DEV = "cuda" if CUDA else "cpu"
GRID = tiles.tables(DEV)
CLAMP = 1.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def _weight(qtype, shape, seed):
    w = random_qtensor(qtype, shape, torch.Generator().manual_seed(seed), scale=0.1)
    return tiles.prepared(w.to(DEV))


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 path sees it: int8 per 32 values times the scale."""
    q, scale, _ = quantize_act(x.contiguous())
    return (q.float().view(q.shape[0], -1, 32) * scale[..., None]).view_as(x)


def _routing(n_tok, n_exp, k, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(n_tok)])
    return ids.to(DEV).to(torch.int32), torch.rand(n_tok, k, generator=gen).to(DEV)


def _gate_up_ref(x, ids, wts, gate, up):
    """h [slots, n_ff] = w * swiglu(gate[e] x', up[e] x') per (token, slot), x' int8-rounded."""
    xr, k = _rounded(x), ids.shape[1]
    rows = []
    for s, e in enumerate(ids.reshape(-1).tolist()):
        xe = xr[s // k]
        g, u = ref.dense_weight(gate[e]) @ xe, ref.dense_weight(up[e]) @ xe
        rows.append(ref.swiglu(g, u, CLAMP) * wts.reshape(-1)[s])
    return torch.stack(rows)


def _down_ref(h, ids, down):
    """out [T, dim] = sum over the token's slots of down[e] @ h', h' int8-rounded."""
    hr, k = _rounded(h), ids.shape[1]
    out = torch.zeros(ids.shape[0], down.shape[1], device=h.device)
    for s, e in enumerate(ids.reshape(-1).tolist()):
        out[s // k] += ref.dense_weight(down[e]) @ hr[s]
    return out


@pytest.mark.parametrize("qtype", [GQ.Q2_K, GQ.Q4_K])
@pytest.mark.parametrize(
    "n_ff,dim,k,n_tok,rows,chunk",  # rows per program (32 / (n_ff / 128) per lane row), slots
    [(256, 64, 3, 1, 64, 4), (512, 32, 2, 2, 32, 1), (1024, 16, 3, 1, 16, 2)],  # per chunk
)
def test_down_kernel_matches_reference(qtype, n_ff, dim, k, n_tok, rows, chunk):
    down = _weight(qtype, (5, dim, n_ff), 3)
    ids, _ = _routing(n_tok, 5, k, seed=n_ff)
    h = torch.randn(n_tok * k, n_ff, generator=torch.Generator().manual_seed(1)).to(DEV)
    got, cfg = torch.empty(n_tok, dim, device=DEV), dict(R=rows, KC=chunk)
    down_launch(h, operands(h, qtype, cfg, False), ids, down, GRID, got, cfg)
    assert _rel(got, _down_ref(h, ids, down)) < 1e-5


@pytest.mark.parametrize("qtype", [GQ.Q2_K, GQ.Q4_K])
@pytest.mark.parametrize("n_ff,dim,rows", [(32, 512, 32), (16, 1024, 16), (8, 4096, 8)])
def test_gate_up_kq_kernel_matches_reference(qtype, n_ff, dim, rows):
    gate, up = _weight(qtype, (3, n_ff, dim), 1), _weight(qtype, (3, n_ff, dim), 2)
    x = torch.randn(2, dim, generator=torch.Generator().manual_seed(2)).to(DEV)
    ids, wts = _routing(2, 3, 2, seed=dim)
    got, cfg = torch.empty(4, n_ff, device=DEV), dict(R=rows, num_warps=2)
    gate_up_launch(x, operands(x, qtype, cfg), ids, wts, gate, up, GRID, got, CLAMP, cfg)
    assert _rel(got, _gate_up_ref(x, ids, wts, gate, up)) < 1e-5


@pytest.mark.parametrize("dim", [512, 1024])  # rows 4- and 8-byte aligned (word / pair loads)
def test_gate_up_iq2_kernel_matches_reference(dim):
    gate, up = (_weight(GQ.IQ2_XXS, (3, 32, dim), s) for s in (1, 2))
    x = torch.randn(1, dim, generator=torch.Generator().manual_seed(3)).to(DEV)
    ids, wts = _routing(1, 3, 2, seed=4)
    got, cfg = torch.empty(2, 32, device=DEV), dict(R=4, num_warps=1)
    gate_up_launch(x, operands(x, GQ.IQ2_XXS, cfg), ids, wts, gate, up, GRID, got, CLAMP, cfg)
    assert _rel(got, _gate_up_ref(x, ids, wts, gate, up)) < 1e-5


HOPPER = CUDA and moe_decode_hopper.supported(torch.device("cuda"))


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on sm_90 only")
@pytest.mark.parametrize(
    "dim,n_ff,nb,pf,nw",  # rows = NB blocks of NW; 1-4 64-group halves per lane
    [(2048, 64, 1, 1, 4), (4096, 128, 4, 1, 8), (4096, 96, 3, 2, 2), (8192, 32, 2, 2, 8)],
)
def test_gate_up_gluon_kernel_matches_reference(dim, n_ff, nb, pf, nw):
    gate, up = (_weight(GQ.IQ2_XXS, (3, n_ff, dim), s) for s in (1, 2))
    x = torch.randn(2, dim, generator=torch.Generator().manual_seed(3)).to(DEV)
    ids, wts = _routing(2, 3, 2, seed=dim)
    cfg = dict(NB=nb, PF=pf, num_warps=nw)
    got = torch.full((4, n_ff), float("nan"), device=DEV)
    gate_up_launch(x, operands(x, GQ.IQ2_XXS, cfg), ids, wts, gate, up, GRID, got, CLAMP, cfg)
    assert _rel(got, _gate_up_ref(x, ids, wts, gate, up)) < 1e-5
    tri, tcfg = torch.empty_like(got), dict(R=2, num_warps=1)
    gate_up_launch(x, operands(x, GQ.IQ2_XXS, tcfg), ids, wts, gate, up, GRID, tri, CLAMP, tcfg)
    assert _rel(got, tri) < 1e-6  # the Triton kernel: the same integer dots, other float order


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on sm_90 only")
def test_gate_up_gluon_kernel_rounds_h_as_quantize_act():
    n_ff, dim = 256, 2048
    gate, up = (_weight(GQ.IQ2_XXS, (3, n_ff, dim), s) for s in (1, 2))
    x = torch.randn(2, dim, generator=torch.Generator().manual_seed(7)).to(DEV)
    ids, wts = _routing(2, 3, 2, seed=8)
    cfg = dict(NB=4, PF=1, num_warps=8, HQ=1)
    h = torch.empty(4, n_ff, device=DEV)
    ho = torch.empty(4, n_ff, dtype=torch.int8, device=DEV), torch.empty(4, n_ff // 32, device=DEV)
    gate_up_launch(x, operands(x, GQ.IQ2_XXS, cfg), ids, wts, gate, up, GRID, h, CLAMP, cfg, ho)
    assert _rel(h, _gate_up_ref(x, ids, wts, gate, up)) < 1e-5
    want_q, want_s, _ = quantize_act(h, 16)  # what the down kernel reads otherwise
    assert torch.equal(ho[0], want_q) and torch.equal(ho[1], want_s)
    with pytest.raises(ValueError, match="32-row"):
        gate_up_launch(x, operands(x, GQ.IQ2_XXS, cfg), ids, wts, gate, up, GRID, h, CLAMP,
                       dict(NB=2, PF=1, num_warps=8), ho)  # fmt: skip


def test_gluon_config_only_where_it_fits():
    real = moe_decode_config(1, 6, 2048, 4096, qtype=GQ.IQ2_XXS, down_qtype=GQ.Q2_K, gluon=True)
    assert "NB" in real["gate_up"] and "R" in real["down"]
    assert real["gate_up"]["HQ"] == 1  # 32-row CTAs before the Q2_K down kernel: h rounded there
    generic_down = moe_decode_config(1, 6, 2048, 4096, qtype=GQ.IQ2_XXS, gluon=True)
    assert "NB" in generic_down["gate_up"] and "HQ" not in generic_down["gate_up"]
    assert moe_decode_hopper.fits(2048, 4096, real["gate_up"])
    small = moe_decode_config(1, 6, 256, 512, qtype=GQ.IQ2_XXS, down_qtype=GQ.Q2_K, gluon=True)
    assert "R" in small["gate_up"]  # 16 groups a row: the Triton kernel
    assert not moe_decode_hopper.fits(2048, 6144, real["gate_up"])  # 192 groups: not 2^n
    assert not moe_decode_hopper.fits(40, 4096, dict(NB=4, PF=1, num_warps=8))  # 32-row blocks
    q4 = moe_decode_config(1, 6, 2048, 4096, qtype=GQ.Q4_K, down_qtype=GQ.Q4_K, gluon=True)
    assert "NB" not in q4["gate_up"]


@pytest.mark.parametrize("gate_t,down_t", [(GQ.IQ2_XXS, GQ.Q2_K), (GQ.Q4_K, GQ.Q4_K)])
def test_moe_decode_default_kernels_match_reference(gate_t, down_t):
    n_ff, dim = 256, 512
    cfg = moe_decode_config(2, 2, n_ff, dim, qtype=gate_t, down_qtype=down_t)
    assert "R" in cfg["gate_up"] and "R" in cfg["down"]  # the dedicated kernels
    gate, up = _weight(gate_t, (4, n_ff, dim), 1), _weight(gate_t, (4, n_ff, dim), 2)
    down = _weight(down_t, (4, dim, n_ff), 3)
    x = torch.randn(2, dim, generator=torch.Generator().manual_seed(5)).to(DEV)
    ids, wts = _routing(2, 4, 2, seed=6)
    got = moe_decode(x, ids, wts, gate, up, down, CLAMP, GRID)
    h = _gate_up_ref(x, ids, wts, gate, up)
    assert _rel(got, _down_ref(h, ids, down)) < 1e-4  # h' may round differently at ties
    assert _rel(got, moe_ref(x, ids, wts, gate, up, down, CLAMP)) < 3e-2
    assert torch.equal(moe_decode(x, ids, wts, gate, up, down, CLAMP, GRID), got)


@pytest.mark.parametrize("gate_t,down_t", [(GQ.IQ2_XXS, GQ.Q2_K), (GQ.Q4_K, GQ.Q4_K)])
def test_moe_decode_shared_adds_the_shared_down_to_the_down_launch(gate_t, down_t, monkeypatch):
    # one token: the shared expert's Q8_0 down projection runs as extra programs of the routed
    # down launch, with gemv's rows and rounding: both results as the two separate calls give
    n_ff, dim, n_sh = 256, 512, 256
    gate, up = _weight(gate_t, (4, n_ff, dim), 1), _weight(gate_t, (4, n_ff, dim), 2)
    down = _weight(down_t, (4, dim, n_ff), 3)
    w = _weight(GQ.Q8_0, (dim, n_sh), 4)
    gen = torch.Generator().manual_seed(5)
    x, h = torch.randn(1, dim, generator=gen).to(DEV), torch.randn(1, n_sh, generator=gen).to(DEV)
    ids, wts = _routing(1, 4, 2, seed=6)
    launches = []
    monkeypatch.setattr(moe_mod, "gemv", lambda *a, **kw: launches.append(a) or gemv(*a, **kw))
    routed, shared = moe_decode_shared(x, ids, wts, gate, up, down, CLAMP, GRID, h, w)
    assert not launches  # no launch of its own
    assert torch.equal(routed, moe_decode(x, ids, wts, gate, up, down, CLAMP, GRID))
    assert torch.equal(shared, gemv(h, w, GRID))
    assert _rel(shared, ref.linear(h, w)) < 3e-2
    # two tokens: the shared projection as its own gemv, the same results
    x2, h2 = torch.cat([x, x.flip(1)]), torch.cat([h, -h])
    ids2, wts2 = _routing(2, 4, 2, seed=7)
    routed2, shared2 = moe_decode_shared(x2, ids2, wts2, gate, up, down, CLAMP, GRID, h2, w)
    assert len(launches) == 1 and torch.equal(shared2, gemv(h2, w, GRID))
    assert torch.equal(routed2, moe_decode(x2, ids2, wts2, gate, up, down, CLAMP, GRID))


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on sm_90 only")
def test_moe_decode_chains_the_gluon_kernel():
    n_ff, dim = 256, 2048
    gate, up = _weight(GQ.IQ2_XXS, (4, n_ff, dim), 1), _weight(GQ.IQ2_XXS, (4, n_ff, dim), 2)
    down = _weight(GQ.Q2_K, (4, dim, n_ff), 3)
    x = torch.randn(2, dim, generator=torch.Generator().manual_seed(5)).to(DEV)
    ids, wts = _routing(2, 4, 2, seed=6)
    cfg = moe_decode_config(2, 2, n_ff, dim, qtype=GQ.IQ2_XXS, down_qtype=GQ.Q2_K, pdl=True,
                            gluon=True)  # fmt: skip
    assert "NB" in cfg["gate_up"] and cfg["gate_up"]["PDL"] == 1
    got = moe_decode(x, ids, wts, gate, up, down, CLAMP, GRID)  # picks cfg on its own
    h = _gate_up_ref(x, ids, wts, gate, up)
    assert _rel(got, _down_ref(h, ids, down)) < 1e-4
    assert torch.equal(moe_decode(x, ids, wts, gate, up, down, CLAMP, GRID, cfg), got)


def test_moe_decode_rejects_tiles_that_do_not_fit():
    down = _weight(GQ.Q4_K, (2, 512, 256), 3)
    gate, up = _weight(GQ.Q4_K, (2, 256, 512), 1), _weight(GQ.Q4_K, (2, 256, 512), 2)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(0)).to(DEV)
    ids, wts = _routing(1, 2, 2, seed=0)
    bad = dict(gate_up=dict(R=3, num_warps=2), down=dict(R=8, num_warps=8))  # 3 rows: no fit
    with pytest.raises(ValueError, match="do not fit"):
        moe_decode(x, ids, wts, gate, up, down, CLAMP, GRID, bad)
    gate, up = _weight(GQ.IQ2_XXS, (2, 256, 2048), 1), _weight(GQ.IQ2_XXS, (2, 256, 2048), 2)
    down = _weight(GQ.Q2_K, (2, 2048, 256), 3)
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(0)).to(DEV)
    fused = dict(NB=4, PF=1, num_warps=8, HQ=1)  # h rounded for the K-quant down kernel only
    bad = dict(gate_up=fused, down=dict(BN=4, BK=256, num_warps=2))
    with pytest.raises(ValueError, match="do not fit"):
        moe_decode(x, ids, wts, gate, up, down, CLAMP, GRID, bad)
