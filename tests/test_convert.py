"""The converter on official-style checkpoints: FP8 (128x128 block scales) and packed FP4 experts
(a scale per 32 inputs, two E2M1 codes per byte, low nibble first) are dequantized exactly."""

from __future__ import annotations

import json

import pytest
import torch
from hf_oracle import make_hf_model
from safetensors.torch import load_file, save_file

from ds4py.convert import convert
from ds4py.gguf import GGUFFile
from ds4py.quant.formats import QTensor

pytest.importorskip("transformers")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fp8_blocks(w: torch.Tensor):
    """(fp8 tensor, scale [ceil(o/128), ceil(i/128)], its exact dequantized value)."""
    o, i = w.shape
    s = torch.zeros((o + 127) // 128, (i + 127) // 128)
    for a in range(s.shape[0]):
        for b in range(s.shape[1]):
            s[a, b] = w[a * 128 : a * 128 + 128, b * 128 : b * 128 + 128].abs().max() / 448
    full = s.repeat_interleave(128, 0)[:o].repeat_interleave(128, 1)[:, :i]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, s, q.float() * full


def fp4_blocks(w: torch.Tensor):
    """(packed uint8 [o, i/2], scale [o, i/32], exact dequantized value)."""
    s = w.unflatten(-1, (-1, 32)).abs().amax(-1) / 6
    v = w / s.repeat_interleave(32, 1)
    code = (v.abs()[..., None] - E2M1).abs().argmin(-1) | ((v < 0).long() << 3)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8)
    value = E2M1[code & 7] * (1 - 2 * (code >> 3)).float() * s.repeat_interleave(32, 1)
    return packed, s, value


def gguf_tensor(f: GGUFFile, name: str) -> torch.Tensor:
    info = f.tensors[name]
    return QTensor.from_raw(f.tensor_bytes(name), info.qtype, info.shape).dequantize()


def test_fp8_and_fp4_checkpoint_tensors(tmp_path):
    model = make_hf_model(seed=4, width=128)
    ck = tmp_path / "ckpt"
    model.save_pretrained(ck)
    path = next(ck.glob("*.safetensors"))
    sd = load_file(path)
    fp8_name = "model.layers.1.attn.wq_b.weight"
    fp4_name = "model.layers.2.ffn.experts.3.w1.weight"
    assert fp8_name in sd and fp4_name in sd, sorted(sd)[:20]
    sd[fp8_name], sd[fp8_name.removesuffix(".weight") + ".scale"], want8 = fp8_blocks(sd[fp8_name])
    sd[fp4_name], sd[fp4_name.removesuffix(".weight") + ".scale"], want4 = fp4_blocks(sd[fp4_name])
    save_file(sd, path)
    json.loads((ck / "config.json").read_text())  # still the transformers config
    out = tmp_path / "m.gguf"
    convert(ck, out, "f32")
    f = GGUFFile(out)
    assert torch.equal(gguf_tensor(f, "blk.1.attn_q_b.weight"), want8)
    assert torch.equal(gguf_tensor(f, "blk.2.ffn_gate_exps.weight")[3], want4)
