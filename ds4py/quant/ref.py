"""Torch reference for the weight math: dense linear and routed MoE on `QTensor` weights,
and the fused-kernel regions (mHC pre).

Owns: the float32 semantics every backend must reproduce (the CPU backend *is* this file; the
Triton kernels are tested against it). Does not own: backend choice (ds4py/quant/ops.py) or
block decoding (ds4py/quant/formats.py). Float weights are used at their exact f32 values and
all sums accumulate in f32; quantized weights are dequantized per call, a bounded slab at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as GQ

from ds4py.quant.formats import QTensor

# Bytes of f32 weights materialised at once when dequantizing a large matrix on the fly.
SLAB_BYTES = 64 << 20


def dense_weight(w: QTensor) -> torch.Tensor:
    """float32 values of `w` (a zero-copy view when it is already F32)."""
    if w.qtype == GQ.F32 and w.data.is_contiguous():
        return w.data.view(torch.float32)
    return w.dequantize(torch.float32)


def check_linear(x: torch.Tensor, w: QTensor) -> None:
    if len(w.shape) != 2:
        raise ValueError(f"linear weight must be 2-D (out, in), got shape {w.shape}")
    groups = x.shape[1] if x.ndim == 3 else 1
    if x.ndim not in (2, 3) or x.shape[-1] != w.shape[1] or w.shape[0] % groups:
        raise ValueError(
            f"linear input must be [T, {w.shape[1]}] or [T, G, {w.shape[1]}] with G dividing "
            f"{w.shape[0]}, got {tuple(x.shape)}"
        )
    if x.dtype != torch.float32:
        raise ValueError(f"linear input must be float32, got {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"linear input on {x.device} but weight on {w.device}")


def linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x [T, in] f32 @ w(out, in).T -> [T, out] f32.

    Grouped form (MODEL.md §2.8): x [T, G, in] -> [T, out], where output rows
    g*out/G .. (g+1)*out/G use x[:, g].
    """
    check_linear(x, w)
    if x.ndim == 3:
        rows = w.shape[0] // x.shape[1]
        parts = [_linear(x[:, g], w[g * rows : (g + 1) * rows]) for g in range(x.shape[1])]
        return torch.cat(parts, dim=1)
    return _linear(x, w)


def _linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    if w.format.float_dtype is not None:
        return x @ dense_weight(w).T
    rows = max(1, SLAB_BYTES // (4 * w.shape[1]))
    parts = [x @ w[r : r + rows].dequantize().T for r in range(0, w.shape[0], rows)]
    return torch.cat(parts, dim=1)


def swiglu(g: torch.Tensor, u: torch.Tensor, clamp: float) -> torch.Tensor:
    """silu(min(g, clamp)) * clamp(u, -clamp, clamp), ds4's clamped SwiGLU."""
    return F.silu(torch.clamp(g, max=clamp)) * torch.clamp(u, -clamp, clamp)


def check_moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: QTensor,
    up: QTensor,
    down: QTensor,
) -> None:
    if len(gate.shape) != 3 or gate.shape != up.shape:
        raise ValueError(f"gate/up must both be (E, F, D), got {gate.shape} and {up.shape}")
    n_exp, n_ff, dim = gate.shape
    if down.shape != (n_exp, dim, n_ff):
        raise ValueError(f"down must be {(n_exp, dim, n_ff)}, got {down.shape}")
    if x.ndim != 2 or x.shape[1] != dim or x.dtype != torch.float32:
        raise ValueError(f"moe input must be float32 [T, {dim}], got {x.dtype} {tuple(x.shape)}")
    if ids.ndim != 2 or ids.shape[0] != x.shape[0] or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be int [T, k] with T={x.shape[0]}, got {ids.dtype} {ids.shape}")
    if weights.shape != ids.shape or weights.dtype != torch.float32:
        raise ValueError(f"weights must be float32 {tuple(ids.shape)}, got {weights.dtype}")


def moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: QTensor,
    up: QTensor,
    down: QTensor,
    clamp: float,
) -> torch.Tensor:
    """out[t] = sum_i down[e] @ (w[t,i] * swiglu(gate[e] x[t], up[e] x[t])), e = ids[t,i].

    Only the selected experts are dequantized. Each (token, slot) product lands in its own row
    and the k slots are summed in slot order, so the result is deterministic.
    """
    check_moe(x, ids, weights, gate, up, down)
    n_tok, k = ids.shape
    flat_ids = ids.reshape(-1)
    if flat_ids.numel() and (flat_ids.min() < 0 or flat_ids.max() >= gate.shape[0]):
        raise ValueError(f"expert ids must lie in [0, {gate.shape[0]})")
    slots = x.new_zeros(n_tok * k, x.shape[1])  # [T*k, D]
    flat_w = weights.reshape(-1)
    for e in torch.unique(flat_ids).tolist():
        sel = (flat_ids == e).nonzero().squeeze(1)  # slot indices using expert e
        xe = x[sel // k]  # [n, D]
        h = swiglu(xe @ dense_weight(gate[e]).T, xe @ dense_weight(up[e]).T, clamp)
        slots[sel] = (h * flat_w[sel, None]) @ dense_weight(down[e]).T
    return slots.view(n_tok, k, -1).sum(dim=1)


# ---- Learned routing (MODEL.md §2.9) ----


def route(logits, bias, k: int, scale: float):
    """scores = sqrt(softplus(logits)) [T, E]; ids [T, k] of the k largest scores + bias,
    descending (a stable sort: equal keys give the lower expert first, where torch.topk leaves
    the order open); weights = scale * those scores / their sum (clamped as Block.moe)."""
    scores = torch.sqrt(torch.nn.functional.softplus(logits))
    ids = torch.sort(scores + bias, dim=-1, descending=True, stable=True).indices[:, :k]
    w = scores.gather(1, ids)
    return ids, scale * w / w.sum(-1, keepdim=True).clamp_min(6.1035e-5)


# ---- mHC pre (MODEL.md §2.4): the small control math around the 24-row projection ----


def hc_pre(X, v, scale, base, norm_eps: float, hc_eps: float, iters: int):
    """X [T, hc, D], v [T, (2+hc)*hc] = fn . X_flat (unnormalised) -> u [T, D], post [T, hc],
    comb [T, hc, hc]."""
    hc = X.shape[1]
    r = torch.rsqrt(X.flatten(1).pow(2).mean(-1, keepdim=True) + norm_eps)  # the mHC input norm
    scales = torch.cat((scale[0:1].expand(hc), scale[1:2].expand(hc), scale[2:3].expand(hc * hc)))
    v = v * r * scales + base
    pre = torch.sigmoid(v[:, :hc]) + hc_eps
    post = 2 * torch.sigmoid(v[:, hc : 2 * hc])
    comb = torch.softmax(v[:, 2 * hc :].unflatten(-1, (hc, hc)), dim=-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    return (pre[:, :, None] * X).sum(1), post, comb
