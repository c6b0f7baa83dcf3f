"""Triton kernels vs their torch references over a grid of small shapes.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py), so CI checks them on CPU; with CUDA they run natively. Tolerances (norm-
wise relative error): float32 decode paths (F16/BF16/Q8_0 GEMV and MoE) 1e-5 against the f32
reference; int8-activation decode paths (Q2_K/Q4_K/IQ2_XXS) 1e-5 against the reference fed the
same int8-rounded activations, and 3e-2 against plain f32; bf16 tensor-core GEMM 1e-2
(prefill MoE: test_moe_prefill.py).
"""

import importlib.util

import pytest
import torch
from gguf import GGMLQuantizationType as GQ

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
CUDA = torch.cuda.is_available()

from ds4py.quant.formats import random_qtensor  # noqa: E402
from ds4py.quant.ops import Ops  # noqa: E402
from ds4py.quant.triton import backend, tiles  # noqa: E402
from ds4py.quant.triton.act import interleaved, quantize_act, quantize_act_ref  # noqa: E402
from ds4py.quant.triton.backend import TritonOps  # noqa: E402
from ds4py.quant.triton.gemm import gemm, gemm_ref  # noqa: E402
from ds4py.quant.triton.gemv import gemv, gemv_pair, gemv_ref  # noqa: E402
from ds4py.quant.triton.moe import gate_up_launch, moe_decode, moe_ref, operands  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
GRID = tiles.tables(DEV)
FORMATS = [GQ.F16, GQ.BF16, GQ.Q8_0, GQ.Q2_K, GQ.Q4_K, GQ.IQ2_XXS]
EXPERTS = [(GQ.IQ2_XXS, GQ.Q2_K), (GQ.Q4_K, GQ.Q4_K), (GQ.Q8_0, GQ.F16)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def _weight(qtype, shape, seed):
    return random_qtensor(qtype, shape, torch.Generator().manual_seed(seed), scale=0.1).to(DEV)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


def _int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 decode path sees it: rounded to int8 per 32 values, times the scale."""
    q, scale, _ = quantize_act(x.reshape(-1, x.shape[-1]).contiguous())
    return (q.float().view(q.shape[0], -1, 32) * scale[..., None]).view_as(x)


def _decode_ref_input(x: torch.Tensor, qtype) -> torch.Tensor:
    return _int8_rounded(x) if qtype in tiles.INT8_PATH else x


@pytest.mark.parametrize("interleave", [0, 4, 16])
def test_quantize_act_matches_reference(interleave):
    x = _randn(3, 512, seed=4) * torch.logspace(-3, 3, 512, device=DEV)
    x[1, :32] = 0  # all-zero group: scale 0
    (q, scale, sums), (q_ref, scale_ref, sums_ref) = (
        quantize_act(x, interleave),
        quantize_act_ref(x, interleave),
    )
    if interleave:  # the same values as the plain layout, moved
        assert torch.equal(q, interleaved(quantize_act(x)[0], interleave))
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    dq = (q.int() - q_ref.int()).abs()  # exact .5 ties may round either way (FMA, order)
    assert dq.max() <= 1 and (dq > 0).float().mean() < 1e-2
    steps = scale_ref.repeat_interleave(2, dim=1)  # one rounding step per differing value
    assert ((sums - sums_ref).abs() <= 1e-5 * sums_ref.abs() + 2 * steps).all()
    assert _rel(_int8_rounded(x), x) < 1e-2


@pytest.mark.parametrize("qtype", FORMATS)
def test_dequant_tile_matches_formats(qtype):
    w = _weight(qtype, (16, 512), 1)
    got = tiles.dequantize(w, GRID)
    want = w.dequantize()
    tol = 0 if not CUDA else 1e-6 * want.abs().max().item()  # GPUs may fuse scale*q - min
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("n_tok,groups", [(1, 1), (3, 2), (8, 1)])
def test_gemv(qtype, n_tok, groups):
    w = _weight(qtype, (64, 512), int(qtype))
    x = _randn(n_tok, groups, 512, seed=n_tok).squeeze(1)
    got = gemv(x.contiguous(), w, GRID)
    assert _rel(got, gemv_ref(_decode_ref_input(x, qtype), w)) < 1e-5
    assert _rel(got, gemv_ref(x, w)) < 3e-2


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("m,groups", [(9, 1), (130, 2)])
def test_gemm(qtype, m, groups):
    w = _weight(qtype, (256, 512), int(qtype))
    x = _randn(m, groups, 512, seed=m).squeeze(1).contiguous()
    assert _rel(gemm(x, w, GRID), gemm_ref(x, w)) < 1e-2


def _experts(gate_t, down_t, n_exp=6, n_ff=256, dim=512):
    gate = _weight(gate_t, (n_exp, n_ff, dim), 1)
    up = _weight(gate_t, (n_exp, n_ff, dim), 2)
    down = _weight(down_t, (n_exp, dim, n_ff), 3)
    return gate, up, down


def _routing(n_tok, n_exp, k, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(n_tok)])
    return ids.to(DEV), torch.rand(n_tok, k, generator=gen).to(DEV)


@pytest.mark.parametrize("gate_t,down_t", EXPERTS)
@pytest.mark.parametrize("n_tok", [1, 2])
def test_moe_decode(gate_t, down_t, n_tok):
    gate, up, down = _experts(gate_t, down_t)
    x = _randn(n_tok, 512, seed=5)
    ids, wts = _routing(n_tok, 6, 2, seed=n_tok)
    got = moe_decode(x, ids, wts, gate, up, down, 1.0, GRID)
    want = moe_ref(x, ids, wts, gate, up, down, 1.0)
    assert _rel(got, want) < (3e-2 if gate_t in tiles.INT8_PATH else 1e-5)
    assert torch.equal(moe_decode(x, ids, wts, gate, up, down, 1.0, GRID), got)


@pytest.mark.parametrize("dim", [512, 1024])  # rows 4- and 8-byte aligned (word / pair loads)
def test_moe_gate_up_iq2_kernel_matches_generic(dim):
    # the IQ2_XXS gate/up kernel (prmt selectors, whole rows) against the generic one, which
    # test_moe_decode checks against the reference; same int8 activations, float32 sums
    gate, up = (tiles.prepared(_weight(GQ.IQ2_XXS, (3, 8, dim), s)) for s in (1, 2))
    x = _randn(1, dim, seed=3)
    ids, wts = _routing(1, 3, 2, seed=4)
    ids32, own, generic = (
        ids.to(torch.int32),
        dict(R=4, num_warps=1),
        dict(BN=8, BK=256, num_warps=2),
    )
    got, want = (torch.empty(2, 8, device=DEV) for _ in range(2))
    gate_up_launch(x, operands(x, GQ.IQ2_XXS, own), ids32, wts, gate, up, GRID, got, 1.0, own)
    gate_up_launch(x, operands(x, GQ.IQ2_XXS, generic), ids32, wts, gate, up, GRID, want, 1.0,
                   generic)  # fmt: skip
    assert _rel(got, want) < 1e-5


def test_dequantize_bf16_experts_equal_reference():
    gate, _, down = _experts(GQ.IQ2_XXS, GQ.Q2_K, n_exp=3)
    for w in (gate, down):
        got = tiles.dequantize(w, GRID, torch.bfloat16)
        assert got.dtype == torch.bfloat16 and got.shape == w.shape
        want = w.dequantize()
        if CUDA:  # round to nearest even, as torch does
            assert torch.equal(got, want.to(torch.bfloat16))
        else:  # the interpreter's bf16 cast truncates: within one bf16 step of the value
            assert ((got.float() - want).abs() <= want.abs() * 2.0**-7).all()


def test_backend_dispatch_matches_reference():
    fast, slow = TritonOps(DEV), Ops(DEV)
    w = fast.prepare(_weight(GQ.Q8_0, (128, 256), 9))
    assert w.qtype == GQ.Q8_0 and w.layout == "split"  # regrouped, not upcast
    for n_tok, tol in ((2, 1e-5), (12, 1e-2)):
        x = _randn(n_tok, 256, seed=n_tok)
        assert _rel(fast.linear(x, w), slow.linear(x, slow.prepare(w))) < tol
    gate, up, down = _experts(GQ.IQ2_XXS, GQ.Q2_K, n_exp=4)
    gate, up, down = (fast.prepare(t) for t in (gate, up, down))
    for n_tok, tol in ((2, 3e-2), (10, 2e-2)):
        x = _randn(n_tok, 512, seed=3)
        ids, wts = _routing(n_tok, 4, 2, seed=4)
        got = fast.moe(x, ids, wts, gate, up, down, 10.0)
        assert _rel(got, slow.moe(x, ids, wts, gate, up, down, 10.0)) < tol


def test_backend_falls_back_where_no_kernel_fits():
    # IQ2_XXS rows of 256 values are 66 bytes: no aligned word loads, so the reference runs
    fast, slow = TritonOps(DEV), Ops(DEV)
    w = fast.prepare(_weight(GQ.IQ2_XXS, (32, 256), 5))
    assert not tiles.kernel_ok(w)
    x = _randn(3, 256, seed=1)
    assert torch.equal(fast.linear(x, w), slow.linear(x, w))
    with pytest.raises(ValueError, match="no kernel"):
        gemv(x, w, GRID)


def test_launcher_errors():
    w = _weight(GQ.Q8_0, (64, 256), 0)
    with pytest.raises(ValueError, match="does not fit"):
        gemv(_randn(1, 128, seed=0), w, GRID)
    with pytest.raises(ValueError, match="tokens"):
        gemv(_randn(9, 256, seed=0), w, GRID)
    with pytest.raises(ValueError, match="float32"):
        gemm(_randn(16, 256, seed=0).half(), w, GRID)
    gate, up, down = _experts(GQ.Q8_0, GQ.Q8_0, n_exp=2)
    ids, wts = _routing(1, 2, 2, seed=0)
    with pytest.raises(ValueError, match="types differ"):
        moe_decode(_randn(1, 512, seed=0), ids, wts, gate, _experts(GQ.Q4_K, GQ.Q4_K, 2)[1],
                   down, 1.0, GRID)  # fmt: skip


def test_backend_moe_fallback_for_unaligned_experts_matches_reference():
    # unaligned IQ2_XXS experts: the all-experts path (capturable) equals the reference
    gate, up, down = _experts(GQ.IQ2_XXS, GQ.Q2_K, n_exp=4, n_ff=256, dim=256)
    fast, slow = TritonOps(DEV), Ops(DEV)
    x = _randn(3, 256, seed=2)
    ids, wts = _routing(3, 4, 2, seed=5)
    assert not tiles.kernel_ok(gate)
    got = fast.moe(x, ids, wts, gate, up, down, 10.0)
    assert _rel(got, slow.moe(x, ids, wts, gate, up, down, 10.0)) < 1e-5


def test_merge_joins_weights_and_linears_matches_separate_products():
    fast = TritonOps(DEV)
    ws = [fast.prepare(_weight(GQ.Q8_0, (n, 256), 20 + n)) for n in (32, 64, 96)]
    want = [fast.linear(_randn(2, 256, seed=4), w) for w in ws]
    views = fast.merge(ws)
    # same values, now rows of one matrix: one product where the views are passed together
    assert all(torch.equal(v.data, w.data) for v, w in zip(views, ws, strict=True))
    assert views[1].data.data_ptr() == views[0].data.data_ptr() + views[0].data.numel()
    got = fast.linears(_randn(2, 256, seed=4), tuple(views))
    assert all(_rel(g, w) < 1e-6 for g, w in zip(got, want, strict=True))
    # a kernel-less format among them: left alone
    mixed = [ws[0], fast.prepare(_weight(GQ.Q2_K, (32, 256), 9))]
    assert fast.merge(mixed) == mixed


def test_merge_pairs_two_formats_and_linears_matches_separate_products(monkeypatch):
    # Q8_0 projections and F16 compressors of one input: one matrix per format, one launch
    # for one token (gemv_pair), two products for more; results in the callers' order
    pairs = []

    def counted(*args, **kw):
        pairs.append((args[0].shape[0], args[1].qtype))
        return gemv_pair(*args, **kw)

    monkeypatch.setattr(backend, "gemv_pair", counted)
    fast = TritonOps(DEV)
    ws = [fast.prepare(_weight(q, (n, 256), 30 + n)) for q, n in
          ((GQ.Q8_0, 32), (GQ.F16, 16), (GQ.Q8_0, 64), (GQ.F16, 48), (GQ.F16, 8))]  # fmt: skip
    views = fast.merge(ws)
    assert all(torch.equal(v.data, w.data) for v, w in zip(views, ws, strict=True))
    assert views[2].data.data_ptr() == views[0].data.data_ptr() + views[0].data.numel()
    assert views[3].data.data_ptr() == views[1].data.data_ptr() + views[1].data.numel()
    for n_tok in (1, 3):
        x = _randn(n_tok, 256, seed=6)
        got = fast.linears(x, tuple(views))
        want = [fast.linear(x, w) for w in ws]
        assert [g.shape for g in got] == [w.shape for w in want]
        assert all(_rel(g, w) < 1e-6 for g, w in zip(got, want, strict=True))
    # the one-token call was the single launch (three tokens were not), the format with the
    # longer rows first (F16: 512 bytes, Q8_0: 272)
    assert pairs == [(1, GQ.F16)]
    # rows too short for the one-launch kernel: still one matrix per format, two products
    short = [fast.prepare(_weight(q, (n, 64), 40 + n)) for q, n in
             ((GQ.Q8_0, 32), (GQ.F16, 16), (GQ.Q8_0, 64))]  # fmt: skip
    sv = fast.merge(short)
    assert sv[2].data.data_ptr() == sv[0].data.data_ptr() + sv[0].data.numel()
    x = _randn(1, 64, seed=8)
    got = fast.linears(x, tuple(sv))
    assert all(_rel(g, fast.linear(x, w)) < 1e-6 for g, w in zip(got, short, strict=True))
    assert len(pairs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="float16 products with float32 results need CUDA")
def test_backend_matmul_matches_reference_also_with_no_rows():
    # a ratio-128 layer has no compressed rows before 128 tokens: its attention part is empty
    fast, slow = TritonOps(DEV), Ops(DEV)
    q, rows = _randn(6, 64, seed=1).view(3, 2, 64), _randn(5, 64, seed=2)
    assert _rel(fast.matmul(q, rows.T), slow.matmul(q, rows.T)) < 1e-3
    p, empty = _randn(6, 0, seed=3).view(3, 2, 0), _randn(0, 64, seed=4)
    assert torch.equal(fast.matmul(p, empty), slow.matmul(p, empty))
    assert fast.matmul(p, empty).shape == (3, 2, 64)
