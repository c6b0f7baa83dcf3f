"""Tiny random DeepSeek V4 models in HF transformers (the independent oracle) and their GGUFs.

The Flash layer schedule and YaRN are passed explicitly: transformers' defaults are not Flash.
Weights are re-drawn so every feature is exercised (transformers initialises sinks, biases and the
hash table to zero).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ds4py.config import flash_ratio


def hf_config(n_layer=4, vocab=512, width=64, heads=4, head_dim=128, experts=8, topk=8, **kw):
    from transformers import DeepseekV4Config

    args = dict(
        vocab_size=vocab, hidden_size=width, moe_intermediate_size=32, num_hidden_layers=n_layer,
        num_attention_heads=heads, head_dim=head_dim, qk_rope_head_dim=64, q_lora_rank=32,
        num_experts_per_tok=3, n_routed_experts=experts, o_groups=2, o_lora_rank=16,
        index_n_heads=32, index_head_dim=128, index_topk=topk, sliding_window=128,
        compress_ratios=[flash_ratio(i) for i in range(n_layer)], num_hash_layers=3,
        rope_theta=10000.0, compress_rope_theta=160000.0,
        rope_parameters={"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=1048576, torch_dtype="float32",
    )  # fmt: skip
    args.update(kw)
    return DeepseekV4Config(**args)


def randomize(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("tid2eid"):
                continue
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                ids = torch.rand(b.shape[0], cfg.n_routed_experts, generator=g).argsort(-1)
                b.copy_(ids[:, : b.shape[1]])
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def make_hf_model(seed: int = 0, **kw):
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(hf_config(**kw)).float().eval()
    randomize(model, seed)
    return model


def save_gguf(model, directory: Path, qtype: str = "f32") -> Path:
    from ds4py.convert import convert

    ckpt = directory / "ckpt"
    model.save_pretrained(ckpt)
    out = directory / f"model-{qtype}.gguf"
    convert(ckpt, out, qtype)
    return out


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float()
