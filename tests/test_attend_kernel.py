"""The fused decode-attention kernel against its torch reference (decode.py's parts + attend).

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py) on small shapes: both row stores and window-only layers, idx with invisible entries,
pos 0 / inside / past the window, no visible compressed row yet, capacities and windows that are
not multiples of the row block, several head blocks. Tolerance: 1e-5 norm-wise relative error.
The E4M3 decode and the TF32 split are checked bit-exactly on their own.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
CUDA = torch.cuda.is_available()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ds4py.kv.state import FloatRows, FP8Rows  # noqa: E402
from ds4py.quant.triton import attend as A  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def _case(H, d, W, cap, store, seed, n_rot=64):
    """Random query, ring, sinks and a full row store (rows of several magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, d, generator=g) * 2
    raw = torch.randn(W, d, generator=g)
    sinks = torch.randn(H, generator=g)
    rows = None
    if store:
        rows = FP8Rows(cap, d, n_rot, DEV) if store == "fp8" else FloatRows(cap, d, DEV)
        vals = torch.randn(cap, d, generator=g) * torch.exp2(
            torch.randint(-6, 6, (cap, 1), generator=g)
        )
        rows.write(torch.arange(cap, device=DEV), vals.to(DEV))
    return q.to(DEV), raw.to(DEV), sinks.to(DEV), rows


def _run(q, raw, pos, rows, idx, ratio, sinks, config=None):
    p = torch.tensor([pos], device=DEV)
    got = A.attend_decode(q, raw, p, rows, idx, ratio, sinks, config=config)
    want = A.attend_decode_ref(q, raw, p, rows, idx, ratio, sinks)
    return got, want


# ---- exact pieces ----


@triton.jit
def _e4m3_kernel(B, E, OUT, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(OUT + o, A._e4m3(tl.load(B + o), tl.load(E + o)))


@triton.jit
def _tf32_kernel(X, HI, LO, N: tl.constexpr):
    o = tl.arange(0, N)
    x = tl.load(X + o)
    hi = A._tf32(x)
    tl.store(HI + o, hi)
    tl.store(LO + o, A._tf32(x - hi))


def test_e4m3_decode_is_exact():
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    exps = torch.tensor([-20, -9, -1, 0, 3, 7], dtype=torch.int8)
    b = codes.repeat(len(exps))
    e = exps.repeat_interleave(len(codes))
    n = triton.next_power_of_2(b.numel())
    pad = n - b.numel()
    b = torch.cat((b, b[:pad])).to(DEV)
    e = torch.cat((e, e[:pad])).to(DEV)
    out = torch.empty(n, device=DEV)
    _e4m3_kernel[(1,)](b, e, out, N=n)
    want = torch.ldexp(b.view(torch.float8_e4m3fn).float(), e.int())
    assert torch.equal(out, want)


def test_tf32_split_is_exact_and_close():
    x = torch.randn(1024, generator=torch.Generator().manual_seed(1)) * 1e3
    x = x.to(DEV)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _tf32_kernel[(1,)](x, hi, lo, N=1024)
    for part in (hi, lo):  # the 13 low mantissa bits are clear: TF32 holds them exactly
        assert not (part.view(torch.int32) & 8191).any()
    assert ((x - hi - lo).abs() <= x.abs() * 2.0**-21).all()


# ---- kernel vs reference ----


@pytest.mark.parametrize("W,pos", [(24, 0), (24, 5), (24, 23), (24, 24), (24, 61), (16, 40)])
def test_window_only(W, pos):
    q, raw, sinks, _ = _case(4, 128, W, 0, None, seed=W + pos)
    got, want = _run(q, raw, pos, None, None, 0, sinks)
    assert _rel(got, want) < TOL


@pytest.mark.parametrize("store", ["fp8", "float"])
@pytest.mark.parametrize("pos", [0, 2, 9, 100, 400])
def test_all_rows(store, pos):
    """ratio-128-like layers: every row below (pos+1)//ratio, capacity 37 (not a block multiple);
    pos 0..2 has no visible row yet, 400 sees them all."""
    q, raw, sinks, rows = _case(16, 128, 16, 37, store, seed=pos)
    got, want = _run(q, raw, pos, rows, None, 4, sinks)
    assert _rel(got, want) < TOL


@pytest.mark.parametrize("store", ["fp8", "float"])
@pytest.mark.parametrize("pos", [1, 3, 40, 200])
def test_selected_rows(store, pos):
    """ratio-4-like layers: distinct random row ids, some at or past the visible count (all of
    them at pos 1: no compressed row is visible yet)."""
    g = torch.Generator().manual_seed(pos)
    q, raw, sinks, rows = _case(16, 192, 16, 60, store, seed=pos + 7)
    idx = torch.randperm(60, generator=g)[:23].to(DEV)
    got, want = _run(q, raw, pos, rows, idx, 4, sinks)
    assert _rel(got, want) < TOL


@pytest.mark.parametrize(
    "config",
    [
        dict(BH=16, R=32, num_warps=4),
        dict(BH=32, R=16, num_warps=2),
        dict(BH=64, R=64, num_warps=8),
    ],
)
def test_tilings_and_head_blocks(config):
    """Other tiles: 32 and 64 rows per block; 40 heads over blocks of 16, 32 (last one partial)
    or one block of 64 (24 padded heads)."""
    q, raw, sinks, rows = _case(40, 128, 20, 45, "fp8", seed=3)
    idx = torch.randperm(45, generator=torch.Generator().manual_seed(3))[:33].to(DEV)
    for r, i in ((rows, idx), (rows, None)):
        got, want = _run(q, raw, 90, r, i, 4, sinks, config=config)
        assert _rel(got, want) < TOL


def test_sink_dominates_and_deterministic():
    q, raw, sinks, rows = _case(4, 128, 16, 20, "fp8", seed=5)
    sinks = sinks + 30.0  # nearly all mass on the sink: o is tiny, relative error still holds
    got, want = _run(q, raw, 50, rows, None, 4, sinks)
    assert _rel(got, want) < TOL
    again, _ = _run(q, raw, 50, rows, None, 4, sinks)
    assert torch.equal(got, again)


def test_bad_inputs_raise():
    q, raw, sinks, rows = _case(4, 128, 16, 20, "fp8", seed=6)
    p = torch.tensor([3], device=DEV)
    with pytest.raises(ValueError, match="q must be"):
        A.attend_decode(q.double(), raw, p, rows, None, 4, sinks)
    with pytest.raises(ValueError, match="raw must be"):
        A.attend_decode(q, raw[:, :64], p, rows, None, 4, sinks)
    with pytest.raises(ValueError, match="positive ratio"):
        A.attend_decode(q, raw, p, rows, None, 0, sinks)
    with pytest.raises(ValueError, match="sinks"):
        A.attend_decode(q, raw, p, rows, None, 4, sinks[:2])
    with pytest.raises(ValueError, match="width"):
        A.attend_decode(q, raw, p, FloatRows(8, 64, DEV), None, 4, sinks)


# ---- real sizes (GPU) ----


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("store", ["fp8", "float"])
@pytest.mark.parametrize("ctx", [4096, 65536])
def test_flash_sizes(store, ctx):
    H, d, W = 64, 512, 128
    for ratio in (4, 128):
        cap = ctx // ratio + 1
        q, raw, sinks, rows = _case(H, d, W, cap, store, seed=ctx + ratio)
        idx = None
        if ratio == 4:
            idx = torch.randperm(cap, generator=torch.Generator().manual_seed(ctx))[:512].to(DEV)
        for pos in (5, W + 3, ctx - 1):
            got, want = _run(q, raw, pos, rows, idx, ratio, sinks)
            assert _rel(got, want) < TOL, (ratio, pos)
    got, want = _run(q, raw, ctx - 1, None, None, 0, sinks)
    assert _rel(got, want) < TOL
