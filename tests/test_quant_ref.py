"""Torch reference ops (the CPU backend): linear and routed MoE against float64 math."""

import pytest
import torch
from gguf import GGMLQuantizationType as GQ

from ds4py.quant import ref
from ds4py.quant.formats import quantize, random_qtensor
from ds4py.quant.ops import Ops

ALL = [GQ.F32, GQ.F16, GQ.BF16, GQ.Q8_0, GQ.Q2_K, GQ.Q4_K, GQ.IQ2_XXS]


def _moe_f64(x, ids, weights, gate, up, down, clamp):
    g, u, dn = (w.dequantize().double() for w in (gate, up, down))
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for i, e in enumerate(ids[t].tolist()):
            xt = x[t].double()
            a = torch.clamp(g[e] @ xt, max=clamp)
            h = torch.nn.functional.silu(a) * torch.clamp(u[e] @ xt, -clamp, clamp)
            out[t] += dn[e] @ (weights[t, i].double() * h)
    return out


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def test_for_device_cpu_is_reference():
    ops = Ops.for_device("cpu")
    assert type(ops) is Ops and ops.name == "torch" and ops.device.type == "cpu"


@pytest.mark.parametrize("qtype", ALL)
def test_linear_matches_f64(qtype):
    gen = torch.Generator().manual_seed(int(qtype))
    ops = Ops.for_device("cpu")
    w = random_qtensor(qtype, (96, 512), gen, scale=0.1)
    x = torch.randn(5, 512, generator=gen)
    want = x.double() @ w.dequantize().double().T
    got = ops.linear(x, ops.prepare(w))
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    assert _rel(got, want) < 1e-6


def test_prepare_upcasts_float_weights_exactly():
    ops = Ops.for_device("cpu")
    w = quantize(torch.randn(8, 16), GQ.F16)
    p = ops.prepare(w)
    assert p.qtype == GQ.F32 and torch.equal(p.dequantize(), w.dequantize())
    q = random_qtensor(GQ.Q8_0, (8, 32))
    assert ops.prepare(q).qtype == GQ.Q8_0


def test_linear_slabs(monkeypatch):
    # force several slabs so the row-chunked path is exercised
    monkeypatch.setattr(ref, "SLAB_BYTES", 4 * 64 * 7)
    w = random_qtensor(GQ.Q4_K, (30, 256), torch.Generator().manual_seed(0))
    x = torch.randn(3, 256)
    torch.testing.assert_close(ref.linear(x, w), x @ w.dequantize().T, rtol=0, atol=1e-5)


def test_linear_errors():
    w = random_qtensor(GQ.Q8_0, (8, 64))
    with pytest.raises(ValueError, match=r"\[T, 64\]"):
        ref.linear(torch.zeros(2, 32), w)
    with pytest.raises(ValueError, match="float32"):
        ref.linear(torch.zeros(2, 64, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="2-D"):
        ref.linear(torch.zeros(2, 64), random_qtensor(GQ.Q8_0, (2, 8, 64)))


@pytest.mark.parametrize(
    "gate_t,down_t", [(GQ.IQ2_XXS, GQ.Q2_K), (GQ.Q4_K, GQ.Q4_K), (GQ.F16, GQ.Q8_0)]
)
def test_moe_matches_f64(gate_t, down_t):
    gen = torch.Generator().manual_seed(11)
    n_exp, n_ff, dim, n_tok, k = 8, 256, 512, 5, 3
    gate = random_qtensor(gate_t, (n_exp, n_ff, dim), gen, scale=0.1)
    up = random_qtensor(gate_t, (n_exp, n_ff, dim), gen, scale=0.1)
    down = random_qtensor(down_t, (n_exp, dim, n_ff), gen, scale=0.1)
    x = torch.randn(n_tok, dim, generator=gen)
    ids = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(n_tok)])
    weights = torch.rand(n_tok, k, generator=gen)
    clamp = 1.0  # small so both clamps bite on these activations
    ops = Ops.for_device("cpu")
    g, u, d = (ops.prepare(w) for w in (gate, up, down))
    got = ops.moe(x, ids, weights, g, u, d, clamp)
    want = _moe_f64(x, ids, weights, gate, up, down, clamp)
    assert got.shape == (n_tok, dim) and got.dtype == torch.float32
    assert _rel(got, want) < 1e-6
    assert torch.equal(ops.moe(x, ids, weights, g, u, d, clamp), got)  # deterministic


def test_moe_errors():
    g = random_qtensor(GQ.Q8_0, (4, 32, 64))
    d = random_qtensor(GQ.Q8_0, (4, 64, 32))
    x, ids, w = torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="down must be"):
        ref.moe(x, ids, w, g, g, g, 10.0)
    with pytest.raises(ValueError, match="expert ids"):
        ref.moe(x, ids + 4, w, g, g, d, 10.0)
    with pytest.raises(ValueError, match="weights must be"):
        ref.moe(x, ids, w[:, :1], g, g, d, 10.0)
