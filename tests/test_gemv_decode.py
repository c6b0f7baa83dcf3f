"""The one-token GEMV (gemv.py `_rows_kernel`, Q8_0 / F16 / BF16) against its references.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py). Tolerances (norm-wise relative error): F16/BF16 1e-5 against the float32
reference; Q8_0 (activations rounded to int8 per 16 values by act.py `quantize16`) 1e-5 against
the reference fed the same rounded activations (`round16`, exact up to float32 sums), 2e-2
against plain float32. The rounding itself is checked bit for bit through an identity weight.
The kernel also takes 2-8 tokens (a `cfg` override; by default those run the tiled kernel).
"""

import importlib.util

import pytest
import torch
from gguf import GGMLQuantizationType as GQ

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
CUDA = torch.cuda.is_available()

from ds4py.quant import ref  # noqa: E402
from ds4py.quant.formats import QTensor, random_qtensor  # noqa: E402
from ds4py.quant.triton import gemv as gemv_mod  # noqa: E402
from ds4py.quant.triton import tiles  # noqa: E402
from ds4py.quant.triton.act import quantize16, quantize16_ref, round16  # noqa: E402
from ds4py.quant.triton.gemv import (  # noqa: E402
    decode_config,
    gemv,
    gemv_pair,
    gemv_pair_ref,
    gemv_ref,
)

DEV = "cuda" if CUDA else "cpu"
GRID = tiles.tables(DEV)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def _weight(qtype, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return random_qtensor(qtype, (n, k), gen, scale=0.1).to(DEV)


def _x(n_tok, groups, k, seed):
    x = torch.randn(n_tok, groups, k, generator=torch.Generator().manual_seed(seed))
    return x.squeeze(1).contiguous().to(DEV)


# (tokens, groups, rows, K, tiling): defaults, a K loop (prefetching the next step or not),
# R = 1, two tokens x two groups
CASES = [
    (1, 1, 64, 512, None),
    (2, 1, 32, 1024, dict(R=4, BK=256, num_warps=1, PIPE=1)),
    (1, 1, 16, 512, dict(R=1, BK=512, num_warps=1)),
    (2, 2, 32, 512, dict(R=8, BK=256, num_warps=1)),
]


@pytest.mark.parametrize("n_tok,groups,n,k,cfg", CASES)
def test_q8_int8_path_matches_rounded_reference(n_tok, groups, n, k, cfg):
    w = _weight(GQ.Q8_0, n, k, seed=k + n)
    x = _x(n_tok, groups, k, seed=n_tok)
    got = gemv(x, w, GRID, cfg)
    assert _rel(got, ref.linear(round16(x), w)) < 1e-5
    assert _rel(got, gemv_ref(x, w, GRID, cfg)) < 1e-5
    assert _rel(got, ref.linear(x, w)) < 2e-2
    assert torch.equal(gemv(x, w, GRID, cfg), got)  # deterministic


@pytest.mark.parametrize("qtype", [GQ.F16, GQ.BF16])
@pytest.mark.parametrize("n_tok,groups,n,k,cfg", CASES)
def test_half_rows_match_reference(qtype, n_tok, groups, n, k, cfg):
    # float32 activations, exact up to float32 sums
    w = _weight(qtype, n, k, seed=int(qtype))
    x = _x(n_tok, groups, k, seed=3)
    got = gemv(x, w, GRID, cfg)
    assert _rel(got, ref.linear(x, w)) < 1e-5
    assert _rel(got, gemv_ref(x, w, GRID, cfg)) < 1e-5


def _q8_identity(k: int) -> QTensor:
    """Q8_0 identity matrix with block scale 1.0: y = W x' returns x' itself."""
    blocks = torch.zeros(k, k // 32, 34, dtype=torch.uint8)
    blocks[..., :2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    i = torch.arange(k)
    blocks[i, i // 32, 2 + i % 32] = 1
    return QTensor(blocks.reshape(k, -1), GQ.Q8_0, (k, k)).to(DEV)


def test_q8_rounding_is_bit_exact():
    k = 256
    x = torch.randn(k, generator=torch.Generator().manual_seed(7))
    x[:16] = 0.0  # an all-zero run: scale 0
    x[16:32] = torch.linspace(-127, 127, 16)  # amax 127: inv 1, values at .5 ties
    x[16:20] = torch.tensor([2.5, 3.5, -2.5, -0.5])
    x[32:48] *= 1e-30  # tiny and huge runs
    x[48:64] *= 1e30
    x = x[None].to(DEV)
    got = gemv(x, _q8_identity(k), GRID)
    want = round16(x)
    assert torch.equal(got, want)
    q, scale = quantize16_ref(x)
    assert q[0, 16:20].tolist() == [2, 4, -2, 0]  # ties to even
    words, bias, dq = quantize16(x)  # the XQ path's operands: the same rounding
    assert torch.equal(words.view(torch.int8), q) and torch.equal(dq, scale)
    assert torch.equal(bias, -128 * q.view(1, -1, 16).sum(dim=2).int())


def test_defaults_route_one_token_to_rows_kernel():
    # one token: int8 activations (the rounded reference is exact, float32 is not); two
    # tokens: the tiled kernel with float32 activations, as before
    w = _weight(GQ.Q8_0, 32, 512, seed=2)
    x = _x(2, 1, 512, seed=2)
    one, two = gemv(x[:1], w, GRID), gemv(x, w, GRID)
    assert _rel(one, ref.linear(round16(x[:1]), w)) < 1e-5 < _rel(one, ref.linear(x[:1], w))
    assert _rel(two, ref.linear(x, w)) < 1e-5
    assert _rel(one, gemv_ref(x[:1], w)) < 1e-5 and _rel(two, gemv_ref(x, w)) < 1e-5
    assert "R" in decode_config(GQ.F16, 32, 512, 32) and "BN" in decode_config(
        GQ.F16, 32, 512, 32, 2
    )


def test_launcher_rejects_bad_tiles():
    w = _weight(GQ.Q8_0, 32, 512, seed=1)
    x = _x(1, 1, 512, seed=1)
    with pytest.raises(ValueError, match="does not fit"):
        gemv(x, w, GRID, dict(R=3, BK=512, num_warps=1))
    with pytest.raises(ValueError, match="does not fit"):
        gemv(x, w, GRID, dict(R=4, BK=384, num_warps=1))
    q2 = _weight(GQ.Q2_K, 32, 512, seed=1)
    with pytest.raises(ValueError, match="does not fit"):
        gemv(x, q2, GRID, dict(R=4, BK=512, num_warps=1))


# (A type, A rows, B type, B rows, tokens, tiling): defaults, a K loop on both sides
PAIRS = [
    (GQ.Q8_0, 48, GQ.F16, 16, 1, None),
    (GQ.F16, 16, GQ.Q8_0, 32, 2, dict(R_A=4, BK_A=256, R_B=2, BK_B=256, num_warps=1)),
    (GQ.BF16, 8, GQ.F16, 24, 1, dict(R_A=1, BK_A=512, R_B=8, BK_B=256, num_warps=2)),
]


@pytest.mark.parametrize("qa,na,qb,nb,n_tok,cfg", PAIRS)
def test_pair_matches_the_two_gemvs(qa, na, qb, nb, n_tok, cfg):
    # one launch, each side as its own one-token GEMV computes it (Q8_0: rounded x)
    k = 512
    wa, wb = _weight(qa, na, k, seed=na), _weight(qb, nb, k, seed=nb + 1)
    x = _x(n_tok, 1, k, seed=5)
    ya, yb = gemv_pair(x, wa, wb, GRID, cfg)
    ra, rb = gemv_pair_ref(x, wa, wb, GRID, cfg)
    assert ya.shape == (n_tok, na) and yb.shape == (n_tok, nb)
    assert _rel(ya, ra) < 1e-5 and _rel(yb, rb) < 1e-5
    for got, w in ((ya, wa), (yb, wb)):
        xin = round16(x) if w.qtype == GQ.Q8_0 else x
        assert _rel(got, ref.linear(xin, w)) < 1e-5


def test_pair_rejects_bad_input():
    q8, f16 = _weight(GQ.Q8_0, 32, 512, seed=1), _weight(GQ.F16, 16, 512, seed=2)
    x = _x(1, 1, 512, seed=1)
    with pytest.raises(ValueError, match="same formats"):
        gemv_pair(x, q8, q8, GRID)
    with pytest.raises(ValueError, match="do not fit"):
        gemv_pair(x, q8, f16, GRID, dict(R_A=3, BK_A=512, R_B=1, BK_B=512, num_warps=1))
    with pytest.raises(ValueError, match="gemv_pair"):
        gemv_pair(x, _weight(GQ.Q2_K, 32, 512, seed=3), f16, GRID)
    with pytest.raises(ValueError, match="does not fit"):
        gemv_pair(_x(1, 1, 256, seed=1), q8, f16, GRID)


ENGINE = [  # rows, K, groups: the decode GEMVs of DeepSeek V4 Flash (joined) and the head
    (1536, 4096, 1), (32768, 1024, 1), (8192, 4096, 8), (4096, 8192, 1), (4096, 4096, 1),
    (4096, 2048, 1), (2624, 4096, 1), (1024, 4096, 1), (8192, 1024, 1), (256, 4096, 1),
    (24, 16384, 1), (129280, 4096, 1),
]  # fmt: skip


@pytest.mark.parametrize("qtype", [GQ.Q8_0, GQ.F16])
def test_gpu_tilings_fit_engine_shapes(monkeypatch, qtype):
    monkeypatch.setattr(gemv_mod, "interpreting", lambda: False)
    for n, k, groups in ENGINE:
        cfg = decode_config(qtype, n, k, n // groups)
        assert (n // groups) % cfg["R"] == 0 and k % cfg["BK"] == 0 and cfg["BK"] % 256 == 0
        assert 1 <= cfg["num_warps"] <= 8 and n // cfg["R"] * cfg["num_warps"] >= min(2048, n)


ENGINE_PAIRS = [  # (A type, rows), (B type, rows), K: the engine's two-format decode launches
    ((GQ.Q8_0, 1536), (GQ.F16, 2624), 4096),  # attention input, ratio-4 layers
    ((GQ.Q8_0, 1536), (GQ.F16, 1024), 4096),  # attention input, ratio-128 layers
    ((GQ.F16, 256), (GQ.Q8_0, 4096), 4096),  # ffn input: router, shared gate + up
    ((GQ.F16, 8192), (GQ.Q8_0, 32768), 1024),  # attn_q_b with indexer q_b
]


def test_gpu_pair_tilings_fit_engine_pairs(monkeypatch):
    # 4-warp programs (4x the K step) exactly where both sides take one row per program
    monkeypatch.setattr(gemv_mod, "interpreting", lambda: False)
    for (qa, na), (qb, nb), k in ENGINE_PAIRS:
        cfg = gemv_mod.pair_config(qa, na, qb, nb, k, pdl=True)
        for n, r, b in ((na, "R_A", "BK_A"), (nb, "R_B", "BK_B")):
            assert n % cfg[r] == 0 and k % cfg[b] == 0 and cfg[b] % 256 == 0
        one_row = cfg["R_A"] == cfg["R_B"] == 1
        assert cfg["num_warps"] == (4 if one_row else 1) and cfg["PDL"] == 1
    warps = [gemv_mod.pair_config(*a, *b, k)["num_warps"] for a, b, k in ENGINE_PAIRS]
    assert warps == [4, 4, 4, 1]
