"""Prefill routed-MoE kernels (ds4py/quant/triton/moe_prefill.py) against the torch reference.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py), which runs the same integer and float16 math as the PTX blocks. Tolerances: each
float16 weight is the exact GGUF value after float16 roundings of its scale, min and result;
the whole FFN (float16 x and h, float32 sums) within 3e-3 of the float32 reference.
"""

import importlib.util

import pytest
import torch
from gguf import GGMLQuantizationType as GQ

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
CUDA = torch.cuda.is_available()

from ds4py.quant.formats import random_qtensor  # noqa: E402
from ds4py.quant.triton import moe_prefill as mp  # noqa: E402
from ds4py.quant.triton import tiles  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TABS = tiles.tables(DEV)
SMALL = dict(BM=16, BN_GU=64, BN_DOWN=64, BK=64, num_warps=4, num_stages=2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


@pytest.mark.parametrize("qtype", [GQ.IQ2_XXS, GQ.Q2_K, GQ.Q4_K, GQ.Q8_0, GQ.F16])
def test_f16_tiles_are_the_values_rounded_to_f16(qtype):
    w = random_qtensor(qtype, (2, 16, 512), _gen(1))
    want = w.dequantize().float()
    got = mp.dequant_f16(w, TABS).float()
    # float16 roundings of the scale, the min and the result: relative to the value, or to the
    # row's range where a min cancels most of a value (Q2_K / Q4_K)
    bound = (want.abs() + want.abs().amax(-1, keepdim=True)) * 2.0**-9
    assert ((got - want).abs() <= bound).all()
    if qtype in (GQ.Q8_0, GQ.F16):  # one rounding of an exact product
        assert torch.equal(got, want.half().float())


@pytest.mark.parametrize("gate_t,down_t", [(GQ.IQ2_XXS, GQ.Q2_K), (GQ.Q4_K, GQ.Q4_K),
                                           (GQ.Q8_0, GQ.F16)])  # fmt: skip
def test_moe_prefill_matches_reference(gate_t, down_t):
    g = _gen(2)
    n_ff = 64 if down_t == GQ.F16 else 256  # Q2_K / Q4_K rows hold whole 256-blocks
    gate, up = (random_qtensor(gate_t, (3, n_ff, 512), g) for _ in range(2))
    down = random_qtensor(down_t, (3, 512, n_ff), g)
    x = torch.randn(6, 512, device=DEV, generator=g)
    ids = torch.stack([torch.randperm(3, device=DEV, generator=g)[:2] for _ in range(6)])
    wts = torch.rand(6, 2, device=DEV, generator=g)
    got = mp.moe_prefill(x, ids, wts, gate, up, down, 1.0, TABS, SMALL)
    assert _rel(got, mp.moe_ref(x, ids, wts, gate, up, down, 1.0)) < 3e-3
    assert torch.equal(mp.moe_prefill(x, ids, wts, gate, up, down, 1.0, TABS, SMALL), got)


def test_expert_tiles_cover_each_experts_rows_in_order():
    g = _gen(3)
    n_exp, bm = 8, 4
    ids = torch.stack([torch.randperm(n_exp, device=DEV, generator=g)[:3] for _ in range(9)])
    ids[:, 0] = 5  # one expert gets 9 rows: three tiles; some experts get none
    order, tiles_ = mp.expert_tiles(ids, n_exp, bm)
    flat = ids.reshape(-1)
    assert torch.equal(flat[order.long()], flat.sort(stable=True).values)
    assert tiles_.shape[0] == flat.numel() // bm + n_exp  # static: no host sync sizes it
    live = tiles_[tiles_[:, 1] < tiles_[:, 2]].tolist()
    covered = []
    for e, r0, r1 in live:
        assert r1 - r0 <= bm or r0 + bm < r1  # a tile holds up to bm rows of one expert
        rows = list(range(r0, min(r0 + bm, r1)))
        assert all(flat[order[r]].item() == e for r in rows)
        covered += rows
    assert sorted(covered) == list(range(flat.numel()))
    dead = tiles_[len(live) :]
    assert (dead[:, 1] == dead[:, 2]).all()


def test_hopper_kernels_take_only_8_byte_aligned_2_to_4_bit_rows():
    from ds4py.quant.triton import moe_hopper

    g = _gen(6)
    # IQ2_XXS rows of 512 are 132 bytes, Q2_K rows of 256 are 84: 8-byte loads would misalign
    gate = random_qtensor(GQ.IQ2_XXS, (2, 256, 512), g)
    down = random_qtensor(GQ.Q2_K, (2, 512, 256), g)
    assert not moe_hopper.fits(gate, gate, down)
    gate = random_qtensor(GQ.IQ2_XXS, (2, 512, 1024), g)  # 264-byte rows
    down = random_qtensor(GQ.Q2_K, (2, 1024, 512), g)  # 168-byte rows
    assert moe_hopper.fits(gate, gate, down)
    assert not moe_hopper.fits(gate, down, down)  # gate and up must share a format
    f16 = random_qtensor(GQ.F16, (2, 512, 1024), g)
    assert not moe_hopper.fits(f16, f16, down)


def test_config_fits_small_experts_and_rejects_misfits():
    cfg = mp.moe_prefill_config(66, 4, 64, 512)
    assert 64 % cfg["BN_GU"] == 0 and 512 % cfg["BN_DOWN"] == 0
    assert mp.moe_prefill_config(2048 * 6, 256, 2048, 4096)["BM"] == 64
    assert mp.moe_prefill_config(8192 * 6, 256, 2048, 4096)["BM"] == 128
    g = _gen(4)
    gate = random_qtensor(GQ.F16, (2, 64, 96), g)
    down = random_qtensor(GQ.F16, (2, 96, 64), g)
    x, ids = torch.randn(3, 96, device=DEV), torch.zeros(3, 1, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="do not fit"):
        mp.moe_prefill(x, ids, torch.ones(3, 1, device=DEV), gate, gate, down, 1.0, TABS)


def _byte_lane_step(qtype, j):
    """For column j of a 256-block: the A-fragment lane quarter whose 16-byte (Q4_K: 32-byte)
    run of the block's quants holds it, and the MMA step (of four) that must decode it."""
    if qtype == GQ.IQ2_XXS:  # 8 bytes per 32-group; step = octet of the group
        return (j // 32) // 2, (j % 32) // 8
    if qtype == GQ.Q2_K:  # byte 32 (j // 128) + j % 32, 2-bit plane (j % 128) // 32
        return (32 * (j // 128) + j % 32) // 16, (j % 128) // 32
    # Q4_K: byte 32 (j // 64) + j % 32, nibble (j % 64) // 32; step = 2 half + nibble
    return j // 64, 2 * ((j % 32) // 16) + (j % 64) // 32


@pytest.mark.parametrize("qtype", [GQ.IQ2_XXS, GQ.Q2_K, GQ.Q4_K])
def test_kappa_order_hands_each_lane_its_own_bytes(qtype):
    # wgmma A fragment: lane quarter t holds MMA columns 16b + 8hi + 2t + e of each 64; the
    # permuted x must hand it, at step s of each 256-column block, columns whose quants are in
    # the bytes that lane loads for the block and that step s decodes, each column once
    from ds4py.quant.triton import moe_hopper

    x = torch.arange(2 * 512, dtype=torch.float32, device=DEV).view(2, 512)
    xp = moe_hopper.x_kappa(x, qtype).float()
    assert xp.dtype == torch.float32 and torch.equal(xp.sort(dim=1).values, x)
    for c in range(512):
        orig = int(xp[0, c].item())
        assert orig // 256 == c // 256, (c, orig)
        lane, step = _byte_lane_step(qtype, orig % 256)
        assert (lane, step) == ((c % 8) // 2, (c // 64) % 4), (c, orig)
        if c % 2:  # value pairs stay adjacent: one f16x2 per two neighbouring bytes
            assert orig == int(xp[0, c - 1].item()) + 1, (c, orig)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("gate_t,down_t", [(GQ.IQ2_XXS, GQ.Q2_K), (GQ.Q4_K, GQ.Q4_K)])
@pytest.mark.parametrize("n_exp,n_ff,dim,n_tok", [(4, 512, 1024, 37), (16, 2048, 4096, 300)])
def test_hopper_kernels_match_triton_kernels(gate_t, down_t, n_exp, n_ff, dim, n_tok):
    from ds4py.quant.triton import moe_hopper

    g = _gen(5)
    gate, up = (random_qtensor(gate_t, (n_exp, n_ff, dim), g) for _ in range(2))
    down = random_qtensor(down_t, (n_exp, dim, n_ff), g)
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("not an sm_90 GPU")
    assert moe_hopper.supported(gate, up, down)  # rows of these sizes are 8-byte aligned
    x = torch.randn(n_tok, dim, device=DEV, generator=g)
    ids = torch.rand(n_tok, n_exp, device=DEV, generator=g).topk(3, dim=-1).indices
    wts = torch.rand(n_tok, 3, device=DEV, generator=g)
    # the benchmark's settings too (8 warps, prefetch distance, register cap): same sums
    extra = [dict(NW=8), dict(PF=0, maxnreg=0), dict(PF=2)]
    for bm, v in [(64, {}), (128, {})] + [(64, e) for e in extra]:
        cfg = dict(mp.moe_prefill_config(n_tok * 3, n_exp, n_ff, dim), BM=bm, **v)
        fast = mp.moe_prefill(x, ids, wts, gate, up, down, 1.0, TABS, cfg)
        slow = mp.moe_prefill(x, ids, wts, gate, up, down, 1.0, TABS, cfg, hopper=False)
        assert _rel(fast, slow) < 1e-4, v  # same float16 values, float32 sums in another order
        assert torch.equal(mp.moe_prefill(x, ids, wts, gate, up, down, 1.0, TABS, cfg), fast)
