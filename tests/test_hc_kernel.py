"""The fused mHC-pre kernel against its torch reference (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # interpreter mode on CPU: see conftest.py

from ds4py.quant.ref import hc_pre as hc_pre_ref  # noqa: E402
from ds4py.quant.triton.hc import hc_pre  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
