"""The fused compressor decode kernel (ds4py/quant/triton/compress.py) against its reference, and
the reference against decode.py's compress_step (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
triton = pytest.importorskip("triton")
tl = triton.language

from ds4py.kv.state import CompressorState, FloatRows, FP4Rows, FP8Rows  # noqa: E402
from ds4py.model import decode  # noqa: E402
from ds4py.model.model import fp4_sim, fp8_row, hadamard_matrix, rope_table  # noqa: E402
from ds4py.quant.triton.compress import (  # noqa: E402
    _store_fp4,
    _store_fp8,
    compress_decode,
    compress_decode_ref,
    fp4_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_ROT = 64
FREQS = 10000.0 ** (-torch.arange(N_ROT // 2, dtype=torch.float64) / (N_ROT // 2))


def angles(p: int, r: int, device=DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of row p // r's position, as model.rope computes them."""
    ang = torch.tensor([p // r * r], dtype=torch.float64)[:, None] * FREQS[None, :]
    return ang.cos().float()[0].to(device), ang.sin().float()[0].to(device)


def make_store(kind: str, cap: int, w: int, device=DEVICE):
    if kind == "fp8":
        return FP8Rows(cap, w, N_ROT, device)
    if kind == "fp4":
        return FP4Rows(cap, w, device)
    return FloatRows(cap, w, device)


def token(g: torch.Generator, r: int, cw: int, p: int):
    """Projections of one token; every third token has sharp scores (a peaked softmax)."""
    a = torch.randn(1, cw, generator=g)
    b = torch.randn(1, cw, generator=g) * (8.0 if p % 3 == 0 else 1.0)
    return a, b


def assert_rows_close(kind: str, got_store, want_store) -> None:
    """Float rows: 1e-6 of the row's scale (the pooling, norm and Hadamard sums are ordered
    differently). Quantized rows: equal but for a few elements one rounding step apart."""
    got, want = got_store.get(got_store.cap), want_store.get(want_store.cap)
    scale = want.abs().amax(1, keepdim=True)
    if kind == "float":
        assert ((got - want).abs() <= 1e-6 * scale + 1e-6 * want.abs()).all()
        return
    diff = (got - want).abs()
    big = torch.maximum(got.abs(), want.abs())
    if kind == "fp8":  # E4M3: a step is <= 1/8 of the value above 2**-6 of the block scale
        step = big / 8 + scale * 2.0**-15
    else:  # E2M1: <= 1/2 of the value, 0.5 of the block scale near zero
        step = big / 2 + scale / 6
    assert (diff <= step).all()
    assert (diff > 0).float().mean() <= 0.02


# ---- The reference is decode.py's ----


def stub_block(r: int, quant_sim: bool, g: torch.Generator, device) -> SimpleNamespace:
    """What decode.compress_step reads of a Block (attention width 256, indexer 128)."""
    blk = SimpleNamespace(
        ratio=r,
        quant_sim=quant_sim,
        freqs=FREQS.to(device),
        shape=SimpleNamespace(norm_eps=1e-6, indexer_head_dim=128),
    )
    coff = 2 if r == 4 else 1
    for name, w in (("attn", 256), ("indexer", 128)):
        ape = torch.randn(r, coff * w, generator=g)
        setattr(blk, f"{name}_compressor_ape", ape.to(device))
        setattr(blk, f"{name}_compressor_norm", (1 + 0.1 * torch.randn(w, generator=g)).to(device))
    return blk


def stub_state(r: int, quant_sim: bool, cap: int, device=DEVICE) -> SimpleNamespace:
    coff = 2 if r == 4 else 1
    return SimpleNamespace(
        comp=make_store("fp8" if quant_sim else "float", cap, 256, device),
        index=make_store("fp4" if quant_sim else "float", cap, 128, device),
        attn_frontier=CompressorState.empty(r, coff * 256, device),
        index_frontier=CompressorState.empty(r, coff * 128, device),
    )


def run_compress_steps(r: int, quant_sim: bool, n: int, compress, device=DEVICE):
    """decode.compress_step over positions 0..n-1 from empty frontiers, with `compress` as the
    decode kernel; yields the state after every step."""
    g = torch.Generator().manual_seed(r + quant_sim)
    blk = stub_block(r, quant_sim, g, device)
    st = stub_state(r, quant_sim, n // r + 1, device)
    coff = 2 if r == 4 else 1
    for p in range(n):
        proj = [t.to(device) for t in (*token(g, r, coff * 256, p), *token(g, r, coff * 128, p))]
        pos = torch.tensor([p], device=device)
        row_cs = rope_table((pos // r) * r, blk.freqs)
        decode.compress_step(blk, tuple(proj), pos, st, {"compress": compress}, row_cs)
        yield st


@pytest.mark.parametrize("r", [4, 8])
@pytest.mark.parametrize("quant_sim", [True, False])
def test_reference_is_decode_compress_row(r, quant_sim):
    """Bit for bit: compress_decode_ref in decode.compress_step's place (both compressors)."""
    n = 3 * r + 2
    steps = zip(
        run_compress_steps(r, quant_sim, n, decode.compress_row, "cpu"),
        run_compress_steps(r, quant_sim, n, compress_decode_ref, "cpu"),
        strict=True,
    )
    for want, got in steps:
        for key in ("attn_frontier", "index_frontier"):
            for x, y in zip(getattr(want, key).tensors(), getattr(got, key).tensors(), strict=True):
                assert torch.equal(x, y)
        for key in ("comp", "index") if r == 4 else ("comp",):
            for x, y in zip(getattr(want, key).parts, getattr(got, key).parts, strict=True):
                assert torch.equal(x, y)


def test_kernel_in_decode_compress_step():
    """The launcher is a drop-in for decode.REFERENCE["compress"] (quant_sim flag included)."""
    steps = zip(
        run_compress_steps(4, True, 10, decode.compress_row),
        run_compress_steps(4, True, 10, compress_decode),
        strict=True,
    )
    for want, got in steps:
        for key in ("attn_frontier", "index_frontier"):
            for x, y in zip(getattr(want, key).tensors(), getattr(got, key).tensors(), strict=True):
                assert torch.equal(x, y)
        assert_rows_close("fp8", got.comp, want.comp)
        assert_rows_close("fp4", got.index, want.index)


def test_fp4_ref_is_fp4_sim():
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1)) * 3
    H = hadamard_matrix(128, torch.device("cpu"), torch.float32)
    assert torch.equal(fp4_ref(x, H), fp4_sim(x))


# ---- Kernel against reference ----


@pytest.mark.parametrize("r", [4, 8])
@pytest.mark.parametrize("kind", ["float", "fp8", "fp4"])
def test_kernel_matches_reference(r, kind):
    g = torch.Generator().manual_seed(10 * r + len(kind))
    coff = 2 if r == 4 else 1
    w = 128 if kind == "fp4" else 256
    n = 2 * r + 2  # from an empty frontier across two window boundaries
    ape = torch.randn(r, coff * w, generator=g).to(DEVICE)
    norm = (1 + 0.1 * torch.randn(w, generator=g)).to(DEVICE)
    H = hadamard_matrix(w, torch.device(DEVICE), torch.float32) if kind == "fp4" else None
    frs = [CompressorState.empty(r, coff * w, DEVICE) for _ in range(2)]
    stores = [make_store(kind, n // r + 1, w) for _ in range(2)]
    for p in range(n):
        a, b = (t.to(DEVICE) for t in token(g, r, coff * w, p))
        pos = torch.tensor([p], device=DEVICE)
        cos, sin = angles(p, r)
        for fr, rows, fn in zip(frs, stores, (compress_decode, compress_decode_ref), strict=True):
            fn(a, b, ape, pos, fr, norm, 1e-6, cos, sin, rows, H)
        for x, y in zip(frs[0].tensors(), frs[1].tensors(), strict=True):
            assert torch.equal(x, y), p
        assert_rows_close(kind, *stores)


def test_ratio_128_real_width_across_a_boundary():
    """The attention compressor's real shape (ratio 128, w 512) around a window's close."""
    g = torch.Generator().manual_seed(128)
    r, w = 128, 512
    ape = torch.randn(r, w, generator=g).to(DEVICE)
    norm = (1 + 0.1 * torch.randn(w, generator=g)).to(DEVICE)
    frs = [CompressorState.empty(r, w, DEVICE) for _ in range(2)]
    stores = [make_store("fp8", 3, w) for _ in range(2)]
    for p in range(126, 130):
        a, b = (t.to(DEVICE) for t in token(g, r, w, p))
        pos = torch.tensor([p], device=DEVICE)
        for fr, rows, fn in zip(frs, stores, (compress_decode, compress_decode_ref), strict=True):
            fn(a, b, ape, pos, fr, norm, 1e-6, *angles(p, r), rows, None)
        for x, y in zip(frs[0].tensors(), frs[1].tensors(), strict=True):
            assert torch.equal(x, y), p
        assert_rows_close("fp8", *stores)


def test_position_past_capacity_writes_no_row():
    w, r = 128, 4
    fr, rows = CompressorState.empty(r, 2 * w, DEVICE), make_store("fp8", 2, w)
    a = torch.ones(1, 2 * w, device=DEVICE)
    pos = torch.tensor([8], device=DEVICE)  # row 2 of a 2-row store
    norm = torch.ones(w, device=DEVICE)
    compress_decode(
        a, a, a.expand(r, -1).contiguous(), pos, fr, norm, 1e-6, *angles(8, r), rows, None
    )
    assert all(not p.any() for p in rows.parts)
    assert torch.equal(fr.cur_kv[0], a[0])


def test_bad_inputs_raise():
    w, r = 128, 4
    fr = CompressorState.empty(r, 2 * w, DEVICE)
    a = torch.zeros(1, 2 * w, device=DEVICE)
    ape = torch.zeros(r, 2 * w, device=DEVICE)
    pos = torch.tensor([0], device=DEVICE)
    norm = torch.ones(w, device=DEVICE)
    cos, sin = angles(0, r)
    args = (a, a, ape, pos, fr, norm, 1e-6, cos, sin)
    with pytest.raises(ValueError, match="Hadamard"):
        compress_decode(*args, make_store("fp4", 2, w), None)
    with pytest.raises(ValueError, match="width"):
        compress_decode(*args, make_store("fp8", 2, 2 * w), None)
    with pytest.raises(ValueError, match="pos"):
        compress_decode(
            a, a, ape, pos.int(), fr, norm, 1e-6, cos, sin, make_store("fp8", 2, w), None
        )
    with pytest.raises(ValueError, match="ape"):
        compress_decode(a, a, ape[:2], pos, fr, norm, 1e-6, cos, sin, make_store("fp8", 2, w), None)


# ---- The store stage alone: exact, ties and extreme scales included ----


@triton.jit
def _store_rows_kernel(
    X, OUT0, OUT1, OUT2, W: tl.constexpr, N_ROT: tl.constexpr, FP8: tl.constexpr
):
    k = tl.program_id(0)
    if FP8:
        ev = 64 * tl.arange(0, W // 64)[:, None] + 2 * tl.arange(0, 32)[None, :]
        ye, yo = tl.load(X + k * W + ev), tl.load(X + k * W + ev + 1)
        _store_fp8(ye, yo, OUT0, OUT1, OUT2, k, W, N_ROT)
    else:
        ev = 32 * tl.arange(0, W // 32)[:, None] + 2 * tl.arange(0, 16)[None, :]
        ye, yo = tl.load(X + k * W + ev), tl.load(X + k * W + ev + 1)
        _store_fp4(ye, yo, OUT0, OUT1, k, W)


def midpoints(grid: torch.Tensor) -> torch.Tensor:
    v = torch.unique(grid.abs())
    return (v[1:] + v[:-1]) / 2


def tricky_blocks(g: torch.Generator, grid: torch.Tensor, top: float, n: int, size: int, j0: int):
    """Rows of blocks: ties between grid values at exact block scales, blocks whose first round
    trip lowers the max (so the store's exponent drops), zeros and -0.0, tiny and huge scales."""
    mids = midpoints(grid)
    blocks = []
    for j in range(j0, j0 + n):
        e = [3, -9, 0, 20, -30, 100, -60, 5][j % 8]
        kind = j % 4
        if kind == 0:  # ties, with the block max at the top of the grid
            v = mids[torch.randint(len(mids), (size,), generator=g)]
            v[0] = top
        elif kind == 1:  # grid values and ties near zero, and negatives that round to zero
            half = size // 2
            v = torch.cat(
                (
                    grid[torch.randint(len(grid), (half,), generator=g)],
                    mids[torch.randint(len(mids), (size - half,), generator=g)],
                )
            )
            v[1], v[2], v[3] = 0.0, -0.0, -mids[0] / 2
            v[4:8] = mids[:4]  # the smallest ties
            v[0] = top * 0.51  # the first trip rounds the max to top/2: one less in the exponent
        elif kind == 2:
            v = torch.randn(size, generator=g) * top / 3
        else:
            v = torch.randn(size, generator=g) * 1e-30  # below the clamp
        sign = torch.where(torch.rand(size, generator=g) < 0.5, -1.0, 1.0)
        blocks.append((v * sign * 2.0**e)[torch.randperm(size, generator=g)])
    return torch.cat(blocks)


@pytest.mark.filterwarnings("ignore:overflow")  # the F16 cast of blocks the store drops
def test_store_fp8_exact():
    g = torch.Generator().manual_seed(3)
    w, n = 256, 6
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()]
    nope = torch.stack([tricky_blocks(g, grid, 448.0, 3, 64, 3 * i) for i in range(n)])
    f16 = torch.tensor([1 + 2.0**-11, 1 + 3 * 2.0**-11, 2.0**-25, 65504.0, -3.0, 1e-3])
    rope_dims = (
        f16[torch.randint(len(f16), (n, N_ROT), generator=g)]
        * torch.randn(n, N_ROT, generator=g).sign()
    )
    x = torch.cat((nope, rope_dims), 1).to(DEVICE)
    got, want = make_store("fp8", n, w), make_store("fp8", n, w)
    _store_rows_kernel[(n,)](x, *got.parts, W=w, N_ROT=N_ROT, FP8=True)
    want.write(torch.arange(n, device=DEVICE), fp8_row(x, w - N_ROT, N_ROT))
    for a, b in zip(got.parts, want.parts, strict=True):
        assert torch.equal(a, b)


def test_store_fp4_exact():
    g = torch.Generator().manual_seed(4)
    w, n = 128, 8
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    x = torch.stack([tricky_blocks(g, grid, 6.0, 4, 32, 5 * i) for i in range(n)]).to(DEVICE)
    x[0, :32] = 6 * 2.0**-130  # a block below the smallest scale (subnormal values)
    eye = torch.eye(w, device=DEVICE)
    got, want = make_store("fp4", n, w), make_store("fp4", n, w)
    _store_rows_kernel[(n,)](x, *got.parts, got.parts[0], W=w, N_ROT=N_ROT, FP8=False)
    want.write(torch.arange(n, device=DEVICE), fp4_ref(x, eye))
    for a, b in zip(got.parts, want.parts, strict=True):
        assert torch.equal(a, b)


# ---- GPU, real sizes, inside a CUDA graph ----


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "r,w,kind", [(4, 512, "fp8"), (128, 512, "fp8"), (4, 128, "fp4"), (4, 512, "float")]
)
def test_kernel_real_sizes_in_graph(r, w, kind):
    g = torch.Generator().manual_seed(r + w)
    coff = 2 if r == 4 else 1
    p0, n = 4096 - r - 1, 2 * r + 3
    cap = 4096 // r + 1
    ape = torch.randn(r, coff * w, generator=g).cuda()
    norm = (1 + 0.1 * torch.randn(w, generator=g)).cuda()
    H = hadamard_matrix(w, torch.device("cuda"), torch.float32) if kind == "fp4" else None
    frs = [CompressorState.empty(r, coff * w, "cuda") for _ in range(2)]
    stores = [make_store(kind, cap, w, "cuda") for _ in range(2)]
    a, b = torch.zeros(1, coff * w, device="cuda"), torch.zeros(1, coff * w, device="cuda")
    pos = torch.tensor([p0], device="cuda")
    cos, sin = torch.zeros(N_ROT // 2, device="cuda"), torch.zeros(N_ROT // 2, device="cuda")
    args = (a, b, ape, pos, frs[0], norm, 1e-6, cos, sin, stores[0], H)
    warm = [CompressorState.empty(r, coff * w, "cuda"), make_store(kind, cap, w, "cuda")]
    compress_decode(*args[:4], warm[0], *args[5:9], warm[1], H)  # outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        compress_decode(*args)
    for p in range(p0, p0 + n):
        ta, tb = token(g, r, coff * w, p)
        a.copy_(ta)
        b.copy_(tb)
        pos.fill_(p)
        c, s = angles(p, r, "cuda")
        cos.copy_(c)
        sin.copy_(s)
        graph.replay()
        compress_decode_ref(a, b, ape, pos, frs[1], norm, 1e-6, cos, sin, stores[1], H)
        for x, y in zip(frs[0].tensors(), frs[1].tensors(), strict=True):
            assert torch.equal(x, y), p
        assert_rows_close(kind, *stores)
