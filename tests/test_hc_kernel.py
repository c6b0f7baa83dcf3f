"""The fused mHC-pre kernels against their torch references (TRITON_INTERPRET=1 on the CPU).

Checks: `hc_pre` (logits given) and `hc_pre_fused` (the 24-row F16 projection fused in) match
the reference within 1e-5 (norm-relative) over small D, 1 and 3 tokens, 1 and 20 Sinkhorn
iterations, tilings whose slices do not divide X_flat; the fused path is bit-identical run to
run; bad inputs raise ValueError naming the problem; on CUDA, the real size D = 4096.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as GQ

triton = pytest.importorskip("triton")

from ds4py.quant.formats import QTensor  # noqa: E402
from ds4py.quant.ref import hc_pre as hc_pre_ref  # noqa: E402
from ds4py.quant.triton.hc import hc_pre, hc_pre_fused, hc_pre_fused_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def inputs(T: int, D: int, seed: int, device: str = DEVICE):
    """Streams with a spread of scales, an F16 projection whose logits reach tens."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, 4, D, generator=g) * torch.exp(torch.randn(T, 4, 1, generator=g))
    w = (torch.randn(24, 4 * D, generator=g) * 4 / D**0.5).half()
    fn = QTensor(w.view(torch.uint8).to(device), GQ.F16, (24, 4 * D))
    scale = 0.5 + torch.rand(3, generator=g)
    base = torch.randn(24, generator=g)
    return X.to(device), fn, scale.to(device), base.to(device)


@pytest.mark.parametrize("T,D", [(1, 64), (3, 256), (5, 1000)])
def test_hc_pre_matches_reference(T, D):
    g = torch.Generator().manual_seed(T * D)
    X = torch.randn(T, 4, D, generator=g).to(DEVICE) * 3
    v = torch.randn(T, 24, generator=g).to(DEVICE) * 20
    scale = (0.5 + torch.rand(3, generator=g)).to(DEVICE)
    base = torch.randn(24, generator=g).to(DEVICE)
    got = hc_pre(X, v, scale, base, 1e-6, 1e-6, 20)
    want = hc_pre_ref(X, v, scale, base, 1e-6, 1e-6, 20)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("D", [64, 256])
@pytest.mark.parametrize("iters", [1, 20])
def test_hc_pre_fused_matches_reference(T, D, iters):
    args = (*inputs(T, D, seed=T * D + iters), 1e-6, 1e-6, iters)
    got = hc_pre_fused(*args)
    want = hc_pre_fused_ref(*args)
    for name, a, b in zip(("u", "post", "comb"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert rel(a, b) <= 1e-5, (name, rel(a, b))
    # the Sinkhorn converged enough for columns to sum to ~1 (a broken mix would not)
    if iters == 20:
        assert torch.allclose(got[2].sum(-2), torch.ones(T, 4, device=DEVICE), atol=1e-3)


@pytest.mark.parametrize("cfg", [{"BK": 96, "BD": 48}, {"BK": 512, "BD": 1024}])
def test_hc_pre_fused_odd_tilings(cfg):
    """Slices that do not divide X_flat (a ragged last slice, P not a power of two) and a u
    chunk larger than D; rejected non-power-of-two sizes are ValueErrors."""
    args = (*inputs(2, 200, seed=7), 1e-6, 1e-6, 3)
    pow2 = {k: triton.next_power_of_2(v) for k, v in cfg.items()}
    if pow2 != cfg:
        with pytest.raises(ValueError, match="power of two"):
            hc_pre_fused(*args, cfg={**cfg, "warps1": 4, "warps2": 4})
        cfg = pow2
    got = hc_pre_fused(*args, cfg={**cfg, "warps1": 4, "warps2": 4})
    for a, b in zip(got, hc_pre_fused_ref(*args), strict=True):
        assert rel(a, b) <= 1e-5


def test_hc_pre_fused_deterministic():
    args = (*inputs(3, 256, seed=11), 1e-6, 1e-6, 20)
    first = hc_pre_fused(*args)
    for a, b in zip(first, hc_pre_fused(*args), strict=True):
        assert torch.equal(a, b)


def test_hc_pre_fused_bad_inputs():
    X, fn, scale, base = inputs(1, 64, seed=3)
    good = dict(X=X, fn=fn, scale=scale, base=base, norm_eps=1e-6, hc_eps=1e-6, iters=20)
    bad = {
        "X must be \\[T, 4, D\\]": dict(X=X.view(1, 2, 128)),
        "1..8 tokens": dict(X=X.expand(9, 4, 64)),
        "X must be float32": dict(X=X.double()),
        "F16 QTensor": dict(
            fn=QTensor(torch.zeros(24, 1024, dtype=torch.uint8), GQ.F32, (24, 256))
        ),
        "shape \\(24, 256\\)": dict(fn=fn[:12]),
        "scale \\[3\\] and base \\[24\\]": dict(base=base[:8]),
        "iters": dict(iters=0),
    }
    for msg, change in bad.items():
        with pytest.raises(ValueError, match=msg):
            hc_pre_fused(**{**good, **change})
        with pytest.raises(ValueError, match=msg):
            hc_pre_fused_ref(**{**good, **change})
    with pytest.raises(ValueError, match="F16 QTensor"):
        hc_pre_fused(**{**good, "fn": fn.dequantize()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 4])
def test_hc_pre_fused_flash_size(T):
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference projection in float32
    args = (*inputs(T, 4096, seed=T, device="cuda"), 1e-6, 1e-6, 20)
    ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
    want = hc_pre_fused_ref(*args)
    for got in (hc_pre_fused(*args), hc_pre_fused(*args, ticket=ticket)):
        for a, b in zip(got, want, strict=True):
            assert rel(a, b) <= 1e-5


@pytest.mark.parametrize("T,D,iters", [(1, 64, 20), (3, 256, 1)])
def test_hc_pre_fused_single_launch(T, D, iters):
    """The one-launch form (integer ticket, last program finishes) matches the reference, is
    bit-identical run to run and leaves its ticket at zero for the next call."""
    args = (*inputs(T, D, seed=D + iters), 1e-6, 1e-6, iters)
    ticket = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    want = hc_pre_fused_ref(*args)
    first = hc_pre_fused(*args, ticket=ticket)
    for _ in range(2):
        one = hc_pre_fused(*args, ticket=ticket)
        assert int(ticket.item()) == 0
        for a, b, c in zip(one, first, want, strict=True):
            assert torch.equal(a, b) and rel(a, c) <= 1e-5
    with pytest.raises(ValueError, match="ticket must be int32"):
        hc_pre_fused(*args, ticket=ticket.long())
