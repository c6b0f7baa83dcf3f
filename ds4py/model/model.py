"""DeepSeek V4 Flash, the reference forward pass (MODEL.md §2–§3), any torch device.

Reads like the spec: mHC around every sublayer, q low-rank + per-head norm, one shared K=V row per
token with partial interleaved RoPE, sliding window + compressed rows (ratio 4 with the lightning
indexer, ratio 128), sinks, grouped low-rank output, hash/learned MoE. Weights are attributes
named after their GGUF tensors (`blk.3.attn_q_a.weight` -> `model.blk[3].attn_q_a`); every weight
product goes through `quant.ops`. No I/O here: `model/load.py` binds tensors, `kv/state.py` owns
the cache tensors, `engine.py` drives chunks.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..config import Shape
from ..kv.state import CompressorState, KVState, LayerState, e2m1_grid
from ..quant.formats import QTensor
from ..quant.ops import Ops

Tensor = torch.Tensor
QUERY_BLOCK = 1024  # prefill queries per attention pass: bounds the gathered rows' memory

# ---- Small math: norms, RoPE, quantization round trips ----


def rms_norm(x: Tensor, w: Tensor | None, eps: float) -> Tensor:
    return F.rms_norm(x, x.shape[-1:], w, eps)


def rope_freqs(shape: Shape, compress: bool) -> Tensor:
    """Per-pair angular frequencies [n_rot/2] (float64); YaRN only on compressed layers."""
    half = shape.n_rot // 2
    i = torch.arange(half, dtype=torch.float64)
    if not compress:
        return shape.rope_freq_base ** (-i / half)
    base = shape.compress_rope_freq_base
    g = base ** (-i / half)

    def corr(beta: float) -> float:
        return (
            shape.n_rot
            * math.log(shape.rope_orig_ctx / (2 * math.pi * beta))
            / (2 * math.log(base))
        )

    lo = max(math.floor(corr(shape.yarn_beta_fast)), 0)
    hi = min(math.ceil(corr(shape.yarn_beta_slow)), shape.n_rot - 1)
    keep = 1 - ((i - lo) / max(hi - lo, 1e-3)).clamp(0, 1)  # 1: original, 0: slowed by the factor
    return g * keep + g / shape.rope_scaling_factor * (1 - keep)


def rope_table(pos: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin) [T, n/2] float32 at positions pos [T]; angles in float64, so they are exact.
    Computed once per chunk and layer kind: recomputing them per head cost prefill ~10 %."""
    ang = pos.to(torch.float64)[:, None] * freqs[None, :]
    return ang.cos().float(), ang.sin().float()


def rotate(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Rotate adjacent pairs of the last cos.shape[-1]*2 dims of x [T, ..., W] by the angles."""
    n = cos.shape[-1] * 2
    if inverse:
        sin = -sin
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (n // 2,)
    cos, sin = cos.view(shape), sin.view(shape)
    a, b = x[..., -n::2], x[..., -n + 1 :: 2]
    rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., :-n], rot), dim=-1)


def rope(x: Tensor, pos: Tensor, freqs: Tensor, inverse: bool = False) -> Tensor:
    """Rotate adjacent pairs of the last len(freqs)*2 dims of x [T, ..., W] at positions pos [T]."""
    return rotate(x, *rope_table(pos, freqs), inverse=inverse)


def _pow2_ceil(v: Tensor) -> Tensor:
    """2^ceil(log2(v)) for v > 0, exact (no log rounding)."""
    m, e = torch.frexp(v)  # v = m * 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(v), torch.where(m == 0.5, e - 1, e))


def fp8_sim(x: Tensor, n_nope: int) -> Tensor:
    """E4M3 round trip with a power-of-two scale per 64 on the no-RoPE dims (MODEL.md §2.3)."""
    nope = x[..., :n_nope].unflatten(-1, (n_nope // 64, 64))
    s = _pow2_ceil(nope.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448)
    q = (nope / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    return torch.cat((q.flatten(-2), x[..., n_nope:]), dim=-1)


@functools.cache
def hadamard_matrix(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """H[i, j] = (-1)^popcount(i & j) / sqrt(n); a constant, built once per device and dtype."""
    idx = torch.arange(n)
    parity = torch.zeros(n, n, dtype=torch.long)
    for bit in range(max(n - 1, 1).bit_length()):
        parity ^= ((idx[:, None] & idx[None, :]) >> bit) & 1
    return ((1 - 2 * parity).to(torch.float64) / math.sqrt(n)).to(device=device, dtype=dtype)


def hadamard(x: Tensor) -> Tensor:
    """Orthonormal Walsh-Hadamard transform (Sylvester order) over the last dim."""
    return x @ hadamard_matrix(x.shape[-1], x.device, x.dtype)


def e2m1_round(v: Tensor) -> Tensor:
    """Nearest E2M1 value of v in [-6, 6], ties to the even code."""
    grid = e2m1_grid(v.device)
    bounds = (grid[1:] + grid[:-1]) / 2
    m = v.abs()
    code = torch.searchsorted(bounds, m.contiguous())
    tie = (code < 7) & (m == bounds[code.clamp(max=6)])
    code = code + (tie & (code % 2 == 1)).long()
    return grid[code] * v.sign()


def fp4_sim(x: Tensor) -> Tensor:
    """Hadamard + E2M1 round trip with a power-of-two scale per 32 (indexer vectors)."""
    y = hadamard(x).unflatten(-1, (x.shape[-1] // 32, 32))
    s = _pow2_ceil(y.abs().amax(-1, keepdim=True).clamp_min(6 * 2.0**-126) / 6)
    return (e2m1_round((y / s).clamp(-6, 6)) * s).flatten(-2)


def round_rope_f16(x: Tensor, n_rot: int) -> Tensor:
    """Cached rows keep their RoPE dims at 16-bit precision (ds4 stores F16)."""
    return torch.cat((x[..., :-n_rot], x[..., -n_rot:].half().float()), dim=-1)


def fp8_row(x: Tensor, n_nope: int, n_rot: int) -> Tensor:
    """A cached K=V row: FP8 round trip on the no-RoPE dims, 16-bit RoPE dims."""
    return round_rope_f16(fp8_sim(x, n_nope), n_rot)


def attend(q: Tensor, parts: list[tuple[Tensor, Tensor]], sinks: Tensor, mm=torch.matmul) -> Tensor:
    """Softmax attention with a per-head sink logit over groups of rows that are both keys and
    values. q [T, H, d]; each part is (rows [K, d] shared by all queries, or [T, K, d] per query,
    mask [T, K]). Returns [T, H, d]. `mm` is the backend's float32-result matmul."""
    scale = 1 / math.sqrt(q.shape[-1])
    logits = []
    for rows, mask in parts:
        lg = mm(q, rows.transpose(-1, -2)) * scale
        logits.append(lg.masked_fill(~mask[:, None, :], float("-inf")))
    sink = sinks.view(1, -1, 1).expand(q.shape[0], -1, 1)
    p = torch.softmax(torch.cat((*logits, sink), dim=-1), dim=-1)
    out, k0 = 0, 0
    for (rows, _), lg in zip(parts, logits, strict=True):
        out = out + mm(p[..., k0 : k0 + lg.shape[-1]], rows)
        k0 += lg.shape[-1]
    return out


# ---- One transformer block ----


class Block:
    """Layer `blk.{layer}`: attention half and MoE half, each wrapped in mHC."""

    # Weights multiplied by the same input (`Ops.linears`); a backend may store each group as
    # one matrix at load (`Ops.merge`) and run it as one product.
    SHARED_INPUT = (
        ("attn_q_a", "attn_kv", "attn_compressor_kv", "attn_compressor_gate")
        + ("indexer_compressor_kv", "indexer_compressor_gate", "indexer_proj"),
        ("attn_q_b", "indexer_attn_q_b"),
        ("ffn_gate_inp", "ffn_gate_shexp", "ffn_up_shexp"),
    )

    # Weight attributes (bound by load.py, named after the GGUF tensors; absent ones stay None).
    hc_attn_fn: QTensor
    hc_attn_base: Tensor
    hc_attn_scale: Tensor
    attn_norm: Tensor
    attn_q_a: QTensor
    attn_q_a_norm: Tensor
    attn_q_b: QTensor
    attn_kv: QTensor
    attn_kv_a_norm: Tensor
    attn_sinks: Tensor
    attn_output_a: QTensor  # row block g (o_lora_rank rows) reads head group g
    attn_output_b: QTensor
    attn_compressor_ape: Tensor | None = None
    attn_compressor_kv: QTensor | None = None
    attn_compressor_gate: QTensor | None = None
    attn_compressor_norm: Tensor | None = None
    indexer_attn_q_b: QTensor | None = None
    indexer_proj: QTensor | None = None
    indexer_compressor_ape: Tensor | None = None
    indexer_compressor_kv: QTensor | None = None
    indexer_compressor_gate: QTensor | None = None
    indexer_compressor_norm: Tensor | None = None
    hc_ffn_fn: QTensor
    hc_ffn_base: Tensor
    hc_ffn_scale: Tensor
    ffn_norm: Tensor
    ffn_gate_inp: QTensor
    exp_probs_b: Tensor | None = None
    ffn_gate_tid2eid: Tensor | None = None
    ffn_gate_exps: QTensor
    ffn_up_exps: QTensor
    ffn_down_exps: QTensor
    ffn_gate_shexp: QTensor
    ffn_up_shexp: QTensor
    ffn_down_shexp: QTensor

    def __init__(self, shape: Shape, layer: int, ops: Ops, quant_sim: bool):
        self.shape, self.layer, self.ops, self.quant_sim = shape, layer, ops, quant_sim
        self.hash_routed = layer < shape.n_hash_layer
        self.ratio = shape.ratio(layer)
        self.freqs = rope_freqs(shape, compress=self.ratio != 0).to(ops.device)
        # small pointwise regions the backend may fuse into single kernels (decode is launch-bound)
        self.rotate, self.attend = ops.fuse(rotate), ops.fuse(attend)
        self.fp4, self.fp8_row = ops.fuse(fp4_sim), ops.fuse(fp8_row)

    def forward(self, X: Tensor, tokens: Tensor, pos: Tensor, st: LayerState) -> Tensor:
        """X [T, hc, D] at positions pos [T] (consecutive) -> X' [T, hc, D]; updates st."""
        u, post, comb = self.hc_pre(X, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        y = self.attention(rms_norm(u, self.attn_norm, self.shape.norm_eps), pos, st)
        X = self.hc_post(X, y, post, comb)
        u, post, comb = self.hc_pre(X, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base)
        y = self.moe(rms_norm(u, self.ffn_norm, self.shape.norm_eps), tokens)
        return self.hc_post(X, y, post, comb)

    # ---- mHC (MODEL.md §2.4) ----
    def hc_pre(self, X: Tensor, fn: QTensor, scale: Tensor, base: Tensor):
        """Collapse the streams: (u [T, D], post [T, hc], comb [T, hc, hc]), Sinkhorn included.

        The projection runs on the raw streams and the mHC input norm scales its 24 outputs
        (the same product; one fused kernel then does the rest)."""
        s = self.shape
        return self.ops.hc_pre(X, fn, scale, base, s.norm_eps, s.hc_eps, s.hc_sinkhorn_iters)

    @staticmethod
    def hc_post(X: Tensor, y: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        # X'_b = post_b * y + sum_a comb[a, b] X_a  (the combine matrix applied transposed)
        return post[:, :, None] * y[:, None, :] + torch.einsum("tab,tad->tbd", comb, X)

    # ---- Attention (MODEL.md §3.2 steps 2–8) ----
    def attention(self, x: Tensor, pos: Tensor, st: LayerState) -> Tensor:
        s, T = self.shape, x.shape[0]
        cs = rope_table(pos, self.freqs)
        # the compressors read the same input (`SHARED_INPUT`)
        qa, kv, *proj = self.ops.linears(
            x, (self.attn_q_a, self.attn_kv) + (self.compressor_weights() if self.ratio else ())
        )
        qr = rms_norm(qa, self.attn_q_a_norm, s.norm_eps)
        q = self.ops.linear(qr, self.attn_q_b).view(T, s.n_head, s.head_dim)
        q = self.rotate(rms_norm(q, None, s.norm_eps), *cs)
        kv = rms_norm(kv, self.attn_kv_a_norm, s.norm_eps)
        kv = self.cache_row(self.rotate(kv, *cs))  # [T, head_dim]

        dt = self.ops.attn_dtype  # rows are exact in float16 (FP8 / F16 parts)
        win_rows, win_mask = self.window_part(kv.to(dt), pos, st)
        if self.ratio:
            self.compress(proj, int(pos[0]), st)
            comp = st.comp_rows().to(dt)
            if self.ratio == 4:  # indexer rows, once for all query blocks; FP4: exact in float16
                keys = st.index_rows().to(dt).T
            ks = torch.arange(st.n_comp, device=x.device)
            visible = ks[None, :] < (pos[:, None] + 1) // self.ratio  # [T, n_comp]
        st.push_window(kv, int(pos[0]))

        outs = []  # queries in blocks: per-query gathered rows would not fit for long chunks
        for i in range(0, T, QUERY_BLOCK):
            b = slice(i, i + QUERY_BLOCK)
            parts = [(win_rows[b], win_mask[b])]
            if self.ratio:
                sel = None
                if self.ratio == 4:
                    cs_b = (cs[0][b], cs[1][b])
                    sel = self.indexer_select(proj[4][b], qr[b], cs_b, keys, visible[b])
                if sel is None:
                    parts.append((comp, visible[b]))
                else:  # each query reads only its top-k rows
                    parts.append((comp[sel], visible[b].gather(1, sel)))
            outs.append(self.attend(q[b], parts, self.attn_sinks, self.ops.matmul))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        o = self.rotate(o, *cs, inverse=True).view(T, s.o_groups, -1)  # [T, G, group_in]
        low = self.ops.linear(o, self.attn_output_a)  # group g's rows read o[:, g]
        return self.ops.linear(low, self.attn_output_b)

    def window_part(self, kv: Tensor, pos: Tensor, st: LayerState) -> tuple[Tensor, Tensor]:
        """Each query's own 128 raw rows (positions t-127..t) as a [T, 128, d] view, and mask."""
        W, T = self.shape.window, kv.shape[0]
        keys, _ = st.window_with(kv, int(pos[0]))  # positions p0-P .. p0+T-1
        keys = keys.to(kv.dtype)
        pad = kv.new_zeros(W - 1 - (keys.shape[0] - T), kv.shape[1])
        rows = torch.cat((pad, keys)).unfold(0, W, 1).transpose(1, 2)  # [T, W, d], a view
        mask = (pos[:, None] - (W - 1) + torch.arange(W, device=kv.device)[None, :]) >= 0
        return rows, mask

    def cache_row(self, kv: Tensor) -> Tensor:
        """What the cache keeps of a K=V row: FP8 no-RoPE dims, 16-bit RoPE dims (quant_sim)."""
        if not self.quant_sim:
            return kv
        return self.fp8_row(kv, self.shape.n_nope, self.shape.n_rot)

    # ---- Compressors (MODEL.md §2.6) ----
    def compressor_weights(self) -> tuple[QTensor, ...]:
        """The projections of the attention input the compressors (and the indexer) read:
        kv, gate (attention compressor), then on ratio-4 layers kv, gate, proj (indexer)."""
        ws = (self.attn_compressor_kv, self.attn_compressor_gate)
        if self.ratio == 4:
            ws += (self.indexer_compressor_kv, self.indexer_compressor_gate, self.indexer_proj)
        return ws

    def compress(self, proj: tuple[Tensor, ...], p0: int, st: LayerState) -> None:
        """proj: the `compressor_weights` products of the chunk's tokens."""
        rows = self.pool(proj[0], proj[1], p0, st.attn_frontier, self.attn_compressor_ape)
        k0 = st.n_comp
        if rows.shape[0]:
            rows = rms_norm(rows, self.attn_compressor_norm, self.shape.norm_eps)
            rpos = (k0 + torch.arange(rows.shape[0], device=rows.device)) * self.ratio
            st.append_comp(self.cache_row(self.rotate(rows, *rope_table(rpos, self.freqs))))
        if self.ratio == 4:
            rows = self.pool(proj[2], proj[3], p0, st.index_frontier, self.indexer_compressor_ape)
            if rows.shape[0]:
                rows = rms_norm(rows, self.indexer_compressor_norm, self.shape.norm_eps)
                rpos = (k0 + torch.arange(rows.shape[0], device=rows.device)) * self.ratio
                rows = self.rotate(rows, *rope_table(rpos, self.freqs))
                st.append_index(self.fp4(rows) if self.quant_sim else rows)

    def pool(self, a: Tensor, b: Tensor, p0: int, fr: CompressorState, ape: Tensor) -> Tensor:
        """Feed tokens at p0.. (their kv and gate projections a, b [T, coff*w]) to a compressor;
        return the pooled rows of the windows they close."""
        r, T = self.ratio, a.shape[0]
        b = b + ape[(p0 + torch.arange(T, device=a.device)) % r]
        n_pend = p0 % r
        A = torch.cat((fr.cur_kv[:n_pend], a))  # tokens from the window start p0 - n_pend
        B = torch.cat((fr.cur_score[:n_pend], b))
        n_full = A.shape[0] // r
        full_a = A[: n_full * r].unflatten(0, (n_full, r))
        full_b = B[: n_full * r].unflatten(0, (n_full, r))
        if n_full == 0:
            fr.advance(A, B, 0)
            return a.new_zeros(0, a.shape[1] // (2 if r == 4 else 1))
        if r == 4:
            # Overlap: a row pools the A halves of the previous window and the B halves of its own.
            w = a.shape[1] // 2
            prev_a = torch.cat((fr.prev_kv[None], full_a[:-1]))
            prev_b = torch.cat((fr.prev_score[None], full_b[:-1]))
            cand_a = torch.cat((prev_a[..., :w], full_a[..., w:]), dim=1)
            cand_b = torch.cat((prev_b[..., :w], full_b[..., w:]), dim=1)
        else:
            cand_a, cand_b = full_a, full_b
        pooled = (torch.softmax(cand_b, dim=1) * cand_a).sum(1)  # [n_full, w]
        fr.advance(A, B, n_full)
        return pooled

    # ---- Lightning indexer (MODEL.md §2.7) ----
    def indexer_select(
        self, wp: Tensor, qr: Tensor, cs: tuple[Tensor, Tensor], keys: Tensor, visible: Tensor
    ) -> Tensor | None:
        """Rows [T, top_k] each query attends (its top-k visible by indexer score), or None
        when no query has more than top_k rows to choose from (then all visible rows count).
        wp: the queries' indexer_proj products (head weights); keys: the indexer rows [d, n]."""
        s, T = self.shape, qr.shape[0]
        if keys.shape[1] <= s.indexer_top_k:
            return None  # every visible row is selected; scoring cannot change that
        qi = self.ops.linear(qr, self.indexer_attn_q_b).view(
            T, s.n_indexer_head, s.indexer_head_dim
        )
        qi = self.rotate(qi, *cs)
        if self.quant_sim:
            qi = self.fp4(qi)
        w = wp / math.sqrt(s.indexer_head_dim * s.n_indexer_head)
        # [t, h, k] products in query slices of <= 2^28 values (long contexts)
        step = max(1, (1 << 28) // (s.n_indexer_head * keys.shape[1]))
        score = torch.cat(
            [
                torch.einsum(
                    "th,thk->tk", w[i : i + step], self.ops.matmul(qi[i : i + step], keys).relu()
                )
                for i in range(0, T, step)
            ]
        )
        score = score.masked_fill(~visible, float("-inf"))
        # stable sort: among equal scores the lower row index wins, as in ds4; a query with
        # fewer visible rows than top_k also gets invisible ones, which the mask then drops
        return torch.sort(score, dim=-1, descending=True, stable=True).indices[:, : s.indexer_top_k]

    # ---- MoE (MODEL.md §2.9) ----
    def moe(self, x: Tensor, tokens: Tensor) -> Tensor:
        s = self.shape
        logits, g, v = self.ops.linears(x, (self.ffn_gate_inp, self.ffn_gate_shexp,
                                            self.ffn_up_shexp))  # fmt: skip
        if self.hash_routed:  # the experts come from the token id; the weights as learned ones
            ids = self.ffn_gate_tid2eid[tokens].long()
            w = torch.sqrt(F.softplus(logits)).gather(1, ids)
            w = s.expert_weights_scale * w / w.sum(-1, keepdim=True).clamp_min(6.1035e-5)
        else:
            ids, w = self.ops.route(
                logits, self.exp_probs_b, s.n_expert_used, s.expert_weights_scale
            )
        # the shared expert's down projection with the routed experts (one launch on CUDA)
        routed, shared = self.ops.moe_shared(
            x, ids, w, self.ffn_gate_exps, self.ffn_up_exps, self.ffn_down_exps, s.swiglu_clamp,
            self.shared_hidden(g, v), self.ffn_down_shexp,
        )  # fmt: skip
        return routed + shared

    def shared_hidden(self, g: Tensor, v: Tensor) -> Tensor:
        """The shared expert's SwiGLU from its gate and up products (computed with the
        router's); its down projection is ffn_down_shexp."""
        c = self.shape.swiglu_clamp
        return F.silu(g.clamp(max=c)) * v.clamp(-c, c)


# ---- The whole model ----


class Transformer:
    """Embedding, 43 (or fewer) blocks, HC head, output norm and LM head."""

    token_embd: QTensor
    output: QTensor
    output_norm: Tensor
    output_hc_fn: QTensor
    output_hc_base: Tensor
    output_hc_scale: Tensor

    def __init__(self, shape: Shape, ops: Ops, quant_sim: bool = True):
        self.shape, self.ops, self.quant_sim = shape, ops, quant_sim
        self.blk = [Block(shape, i, ops, quant_sim) for i in range(shape.n_layer)]

    def forward(self, tokens: Tensor, state: KVState, all_logits: bool = False) -> Tensor:
        """Run tokens [T] at positions state.pos.. ; logits [T, vocab] or [1, vocab] (last only)."""
        pos = state.pos + torch.arange(tokens.shape[0], device=tokens.device)
        X = self.embed(tokens)[:, None, :].expand(-1, self.shape.hc_mult, -1)  # [T, hc, D]
        for blk, st in zip(self.blk, state.layers, strict=True):
            X = blk.forward(X, tokens, pos, st)
        state.pos += tokens.shape[0]
        if not all_logits:
            X = X[-1:]
        return self.ops.linear(self.head(X), self.output)

    def embed(self, tokens: Tensor) -> Tensor:
        return self.token_embd[tokens].dequantize()

    def head(self, X: Tensor) -> Tensor:
        """HC head collapse, then the output norm (MODEL.md §2.4, §3.1)."""
        s = self.shape
        z = rms_norm(X.flatten(1), None, s.norm_eps)
        pre = (
            torch.sigmoid(
                self.ops.linear(z, self.output_hc_fn) * self.output_hc_scale + self.output_hc_base
            )
            + s.hc_eps
        )
        return rms_norm((pre[:, :, None] * X).sum(1), self.output_norm, s.norm_eps)
