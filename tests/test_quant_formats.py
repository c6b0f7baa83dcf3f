"""ggml block formats: torch dequantizers bit-exact vs gguf-py, Q8_0 quantizer, QTensor."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQ

from ds4py.quant.formats import (
    FORMATS,
    QTensor,
    quantize,
    quantize_q8_0,
    random_blocks,
    random_qtensor,
    row_bytes,
)

# byte offsets of the f16 scale fields in each block
SCALE_FIELDS = {GQ.Q8_0: [0], GQ.Q2_K: [80, 82], GQ.Q4_K: [0, 2], GQ.IQ2_XXS: [0]}
# f16 bit patterns: zeros, smallest/largest subnormal, smallest normal, one, max, negative max
EDGE_F16 = [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF, 0x8001]


def _random_raw(qtype: GQ, n_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform random bytes with finite f16 scales, the first blocks using edge scales."""
    fmt = FORMATS[qtype]
    raw = torch.randint(0, 256, (n_blocks, fmt.block_bytes), dtype=torch.uint8, generator=gen)
    for off in SCALE_FIELDS[qtype]:
        bits = torch.randint(0, 0x7C00, (n_blocks,), generator=gen)  # finite, positive
        bits |= torch.randint(0, 2, (n_blocks,), generator=gen) << 15
        bits[: len(EDGE_F16)] = torch.tensor(EDGE_F16)
        raw[:, off] = (bits & 0xFF).to(torch.uint8)
        raw[:, off + 1] = (bits >> 8).to(torch.uint8)
    return raw


def _assert_bits_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    ref_t = torch.from_numpy(np.ascontiguousarray(ref))
    assert ours.shape == ref_t.shape and ours.dtype == ref_t.dtype
    nan = torch.isnan(ref_t)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(ours[~nan].view(torch.int32), ref_t[~nan].view(torch.int32))


@pytest.mark.parametrize("qtype", [GQ.Q8_0, GQ.Q2_K, GQ.Q4_K, GQ.IQ2_XXS])
def test_block_dequant_bit_exact(qtype):
    gen = torch.Generator().manual_seed(int(qtype))
    fmt = FORMATS[qtype]
    rows, blocks_per_row = 24, 3
    raw = _random_raw(qtype, rows * blocks_per_row, gen).reshape(rows, -1)
    ref = gguf.quants.dequantize(raw.numpy(), qtype)
    ours = fmt.dequantize(raw)
    assert ours.shape == (rows, blocks_per_row * fmt.block_elems)
    _assert_bits_equal(ours, ref)


@pytest.mark.parametrize("qtype", [GQ.F32, GQ.F16, GQ.BF16])
def test_float_dequant_bit_exact(qtype):
    gen = torch.Generator().manual_seed(7)
    fmt = FORMATS[qtype]
    raw = torch.randint(0, 256, (16, 64 * fmt.block_bytes), dtype=torch.uint8, generator=gen)
    if qtype == GQ.F32:  # F32 "dequantization" is a view; any bits round-trip
        assert torch.equal(fmt.dequantize(raw).view(torch.uint8), raw)
        return
    ref = (
        gguf.quants.dequantize(raw.numpy(), qtype)
        if qtype == GQ.F16
        else gguf.quants.BF16.dequantize(raw.numpy())
    )
    _assert_bits_equal(fmt.dequantize(raw), ref)


def test_i32_table():
    vals = torch.tensor([[0, 5, -1, 2**31 - 1]], dtype=torch.int32)
    q = QTensor(vals.view(torch.uint8), GQ.I32, (1, 4))
    assert torch.equal(q.format.dequantize(q.data), vals)


def test_q8_0_quantize_bit_exact():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 256, generator=gen) * torch.logspace(-6, 4, 8)[:, None]
    x[0, :32] = 0  # zero block: d = 0, all q = 0
    x[1, :32] = torch.arange(32) - 15.5  # many exact halves after scaling
    x[2, :32] = 127 * torch.tensor([0.5, -0.5, 1.5, -2.5] * 8)  # d = 2.5*127/127
    ours = quantize_q8_0(x)
    ref = gguf.quants.quantize(x.numpy(), GQ.Q8_0)
    assert torch.equal(ours, torch.from_numpy(ref))


def test_quantize_roundtrip_and_errors():
    x = torch.randn(4, 64)
    for qtype in (GQ.F32, GQ.F16, GQ.BF16):
        q = quantize(x, qtype)
        ft = FORMATS[qtype].float_dtype
        assert torch.equal(q.dequantize(), x.to(ft).float())
    q8 = quantize(x, GQ.Q8_0)
    assert q8.shape == (4, 64) and q8.data.shape == (4, 68)
    assert (q8.dequantize() - x).abs().max() <= x.abs().max() / 127
    with pytest.raises(ValueError, match="no encoder"):
        quantize(x, GQ.Q4_K)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(torch.zeros(3, 40))


def test_row_bytes():
    assert row_bytes(GQ.Q8_0, 4096) == 128 * 34
    assert row_bytes(GQ.IQ2_XXS, 4096) == 16 * 66
    assert row_bytes(GQ.Q2_K, 2048) == 8 * 84
    assert row_bytes(GQ.Q4_K, 256) == 144
    assert row_bytes(GQ.F16, 10) == 20
    with pytest.raises(ValueError, match="multiple of 256"):
        row_bytes(GQ.Q4_K, 100)
    with pytest.raises(ValueError, match="unsupported"):
        row_bytes(GQ.Q5_K, 256)


def test_qtensor_views_and_validation():
    gen = torch.Generator().manual_seed(0)
    w = random_qtensor(GQ.IQ2_XXS, (4, 3, 512), gen)
    assert w.data.shape == (4, 3, 2 * 66) and w.nbytes == 4 * 3 * 132
    dense = w.dequantize()
    assert dense.shape == (4, 3, 512)
    assert torch.equal(w[2].dequantize(), dense[2])
    assert torch.equal(w[1:3].dequantize(), dense[1:3])
    ids = torch.tensor([3, 0, 3])
    assert torch.equal(w[ids].dequantize(), dense[ids])
    assert torch.equal(w[1, 2].dequantize(), dense[1, 2])
    assert w.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(w.to("cpu").contiguous().dequantize(), dense)
    with pytest.raises(ValueError, match="leading dims"):
        w[0, 0, 0]
    with pytest.raises(ValueError, match="needs data of shape"):
        QTensor(w.data[:, :, :66], GQ.IQ2_XXS, (4, 3, 512))
    with pytest.raises(ValueError, match="uint8"):
        QTensor(w.data.float(), GQ.IQ2_XXS, (4, 3, 512))
    with pytest.raises(ValueError, match="expected"):
        QTensor.from_raw(w.data.reshape(-1)[:-1], GQ.IQ2_XXS, (4, 3, 512))
    flat = QTensor.from_raw(w.data.reshape(-1), GQ.IQ2_XXS, (4, 3, 512))
    assert torch.equal(flat.dequantize(), dense)


@pytest.mark.parametrize("qtype", [GQ.Q8_0, GQ.Q2_K, GQ.Q4_K, GQ.IQ2_XXS, GQ.F16])
def test_split_layout_roundtrip(qtype):
    w = random_qtensor(qtype, (3, 4, 512), torch.Generator().manual_seed(2))
    s = w.split()
    assert s.data.shape == w.data.shape and s.nbytes == w.nbytes
    assert s.layout == ("gguf" if qtype == GQ.F16 else "split")
    assert torch.equal(s.dequantize(), w.dequantize())
    assert torch.equal(s[1, 2:].dequantize(), w[1, 2:].dequantize())  # rows stay whole
    assert torch.equal(s.gguf_data(), w.data) and s.split() is s
    if qtype == GQ.Q8_0:  # first 32 bytes of a row: the biased q of block 0
        assert torch.equal(s.data[0, 0, :32], w.data[0, 0, 2:34] ^ 0x80)
    with pytest.raises(ValueError, match="layout"):
        QTensor(w.data, qtype, w.shape, "tiled")


@pytest.mark.parametrize("qtype", [GQ.Q8_0, GQ.Q2_K, GQ.Q4_K, GQ.IQ2_XXS, GQ.F16, GQ.BF16])
def test_random_blocks_are_sane(qtype):
    gen = torch.Generator().manual_seed(1)
    scale = 0.05
    w = random_qtensor(qtype, (64, 512), gen, scale=scale).dequantize()
    assert torch.isfinite(w).all()
    assert scale / 2.5 < w.std().item() < scale * 2.5
    raw = random_blocks(qtype, 5, gen)
    assert raw.dtype == torch.uint8 and raw.shape == (5, FORMATS[qtype].block_bytes)
