"""One-token decode with static shapes, so the whole step can be captured in a CUDA graph.

The same function as `Transformer.forward` on one token (tests hold the two equal), written so no
value leaves the device: the position is a tensor, every cache write is an indexed store at a
computed row, attention runs over the whole raw ring and the whole compressed capacity with
masks, and the compressor pools its open window every step (a row only becomes visible, by the
count rule, once its window has closed; until then it is rewritten). Weights and helpers are the
model's; this file owns only the cache-side shape discipline and the graph.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..kv.state import CompressorState, KVState, LayerState
from .model import (
    Block,
    Transformer,
    attend,
    fp4_sim,
    fp8_row,
    hadamard_matrix,
    rms_norm,
    rope_table,
    rotate,
)

Tensor = torch.Tensor


def block_step(blk: Block, X: Tensor, token: Tensor, p: Tensor, st: LayerState, kernels, ropes):
    """One block on one token: X [1, hc, D] at position p [1]; ropes: `rope_tables`."""
    u, post, comb = blk.hc_pre(X, blk.hc_attn_fn, blk.hc_attn_scale, blk.hc_attn_base)
    x = rms_norm(u, blk.attn_norm, blk.shape.norm_eps)
    y = attention_step(blk, x, p, st, kernels, ropes[blk.ratio])
    X = hc_post_step(X, y, post, comb)
    u, post, comb = blk.hc_pre(X, blk.hc_ffn_fn, blk.hc_ffn_scale, blk.hc_ffn_base)
    y = blk.moe(rms_norm(u, blk.ffn_norm, blk.shape.norm_eps), token)
    return hc_post_step(X, y, post, comb)


def hc_post_step(X: Tensor, y: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """Block.hc_post for one token as a broadcast sum: a fused region compiles it to one
    pointwise kernel, where the einsum became a 4x4 batched GEMM launch."""
    mixed = (comb[:, :, :, None] * X[:, :, None, :]).sum(1)  # [1, hc, D]: sum_a comb[a, b] X_a
    return post[:, :, None] * y[:, None, :] + mixed


def attention_step(blk: Block, x: Tensor, p: Tensor, st: LayerState, kernels, ropes) -> Tensor:
    s, ops = blk.shape, blk.ops
    cs = ropes[0]
    # the compressors read the same input: one launch for all (two formats: Ops.merge)
    qa, kv, *proj = ops.linears(
        x, (blk.attn_q_a, blk.attn_kv) + (blk.compressor_weights() if blk.ratio else ())
    )
    qr = rms_norm(qa, blk.attn_q_a_norm, s.norm_eps)
    # the indexer's query reads qr too (ratio-4 layers): one launch for both
    q, *qi = ops.linears(qr, (blk.attn_q_b,) + ((blk.indexer_attn_q_b,) if blk.ratio == 4 else ()))
    q = q.view(1, s.n_head, s.head_dim)
    q = blk.rotate(rms_norm(q, None, s.norm_eps), *cs)
    kv = blk.cache_row(blk.rotate(rms_norm(kv, blk.attn_kv_a_norm, s.norm_eps), *cs))
    st.raw[p % s.window] = kv
    rows = idx = None
    if blk.ratio:
        compress_step(blk, proj, p, st, kernels, ropes[1])
        rows = st.comp
        if blk.ratio == 4:
            idx = indexer_step(blk, proj[4], qi[0], cs, p, st, kernels)
    o = kernels["attend"](q[0], st.raw, p, rows, idx, blk.ratio, blk.attn_sinks)
    o = blk.rotate(o[None], *cs, inverse=True).view(1, s.o_groups, -1)
    low = ops.linear(o, blk.attn_output_a)
    return ops.linear(low, blk.attn_output_b)


def attend_step(q: Tensor, raw: Tensor, p: Tensor, rows, idx, ratio: int, sinks: Tensor) -> Tensor:
    """o [H, d] for one query q [H, d]: the raw ring (slot j holds position p - (p-j) % W,
    valid when >= 0), then compressed rows idx (or all) of `rows`, visible below (p+1)//ratio."""
    W = raw.shape[0]
    slot = torch.arange(W, device=q.device)
    parts = [(raw, ((p - (p - slot) % W) >= 0)[None])]
    if rows is not None:
        cap = rows.cap
        visible = torch.arange(cap, device=q.device) < (p + 1) // ratio
        if idx is None:
            parts.append((rows.get(cap), visible[None]))
        else:
            parts.append((rows.gather(idx), visible[idx][None]))
    return attend(q[None], parts, sinks)[0]


def compress_step(blk: Block, proj: tuple, p: Tensor, st: LayerState, kernels, row_cs) -> None:
    """Feed the token (its compressor projections) to the compressors; (re)write row
    p // ratio from the open window."""
    s, r = blk.shape, blk.ratio
    cos, sin = row_cs
    compress, sim = kernels["compress"], blk.quant_sim
    cos, sin, eps = cos[0], sin[0], s.norm_eps
    ape, norm = blk.attn_compressor_ape, blk.attn_compressor_norm
    compress(proj[0], proj[1], ape, p, st.attn_frontier, norm, eps, cos, sin, st.comp, None, sim)
    if r == 4:
        had = hadamard_matrix(s.indexer_head_dim, p.device, torch.float32) if sim else None
        ape, norm, fr = blk.indexer_compressor_ape, blk.indexer_compressor_norm, st.index_frontier
        compress(proj[2], proj[3], ape, p, fr, norm, eps, cos, sin, st.index, had, sim)


def compress_row(a, b, ape, p, fr: CompressorState, norm, eps, cos, sin, rows, had, sim) -> None:
    """One compressor, one token: pool the open window (a, b: the token's kv and gate
    projections [1, coff*w]), norm, RoPE at the row's position (cos, sin [n_rot/2]), then with
    `sim` the cache's round trip (indexer, `had` given: Hadamard + FP4; else the FP8 row)
    into row p // ratio of `rows`."""
    row = rotate(rms_norm(pool_step(a, b, ape, p, fr), norm, eps), cos[None], sin[None])
    if sim and had is not None:
        row = fp4_sim(row)
    elif sim:
        n_rot = cos.shape[0] * 2
        row = fp8_row(row, row.shape[1] - n_rot, n_rot)
    rows.write(p // fr.ratio, row)


def pool_step(a: Tensor, b: Tensor, ape: Tensor, p: Tensor, fr: CompressorState) -> Tensor:
    r = fr.ratio
    slot = p % r
    fr.cur_kv[slot] = a
    fr.cur_score[slot] = b + ape[slot]
    if r == 4:
        w = fr.cur_kv.shape[1] // 2
        cand_a = torch.cat((fr.prev_kv[:, :w], fr.cur_kv[:, w:]))
        cand_b = torch.cat((fr.prev_score[:, :w], fr.cur_score[:, w:]))
        # the window closes with this token: it becomes the previous window of the next row
        closed = ((p + 1) % r == 0).view(1, 1)
        fr.prev_kv.copy_(torch.where(closed, fr.cur_kv, fr.prev_kv))
        fr.prev_score.copy_(torch.where(closed, fr.cur_score, fr.prev_score))
    else:
        cand_a, cand_b = fr.cur_kv, fr.cur_score
    # slots past the token's offset still hold the last window: garbage, but never visible.
    # softmax over dim 0 written out: torch's non-last-dim softmax kernel is 20x slower here
    e = torch.exp(cand_b - cand_b.amax(0, keepdim=True))
    return (e * cand_a).sum(0, keepdim=True) / e.sum(0, keepdim=True)


def indexer_step(blk: Block, wp, qi, cs, p: Tensor, st: LayerState, kernels: dict) -> Tensor:
    """Rows [k] the token attends on a ratio-4 layer (wp, qi: its indexer_proj and
    indexer_attn_q_b products)."""
    s = blk.shape
    qi = qi.view(s.n_indexer_head, s.indexer_head_dim)
    qi = blk.rotate(qi[None], *cs)[0]
    if blk.quant_sim:
        qi = blk.fp4(qi)
    w = wp[0] / math.sqrt(s.indexer_head_dim * s.n_indexer_head)
    k = min(s.indexer_top_k, st.index.cap)
    return kernels["indexer_topk"](qi, w, st.index, p, blk.ratio, k)


def indexer_scores(qi: Tensor, w: Tensor, rows, p: Tensor, ratio: int) -> Tensor:
    """[cap] scores sum_h w_h relu(qi_h . row) of every row; -inf from (p+1)//ratio on."""
    keys = rows.get(rows.cap)
    score = torch.einsum("th,thk->tk", w[None], torch.relu(qi[None] @ keys.T))[0]
    visible = torch.arange(rows.cap, device=qi.device) < (p + 1) // ratio
    return score.masked_fill(~visible, float("-inf"))


def indexer_topk(qi: Tensor, w: Tensor, rows, p: Tensor, ratio: int, k: int) -> Tensor:
    """The k visible rows of highest `indexer_scores` (ties to the lower id; invisible ids
    fill up when fewer are visible)."""
    score = indexer_scores(qi, w, rows, p, ratio)
    # stable: among equal scores the lower row wins, as in the chunked path (and ds4)
    return torch.sort(score, descending=True, stable=True).indices[:k]


def rope_tables(model: Transformer, p: Tensor) -> dict:
    """The step's RoPE angles, once for all layers: per compression ratio, (cos, sin) at the
    token's position and at the position of the compressed row it feeds (None for ratio 0)."""
    out, table = {}, model.ops.fuse(rope_table)
    for blk in model.blk:
        r = blk.ratio
        if r not in out:
            out[r] = (table(p, blk.freqs), table((p // r) * r, blk.freqs) if r else None)
    return out


def decode_step(
    model: Transformer, state: KVState, token: Tensor, p: Tensor, step=block_step, kernels=None
) -> Tensor:
    """Logits [vocab] after token [1] at position p [1]; the state's host counters are not
    touched (the caller advances them: nothing here may read device values)."""
    kernels = kernels or REFERENCE
    ropes = rope_tables(model, p)
    X = model.embed(token)[:, None, :].expand(-1, model.shape.hc_mult, -1)
    for blk, st in zip(model.blk, state.layers, strict=True):
        X = step(blk, X, token, p, st, kernels, ropes)
    return model.ops.linear(model.head(X), model.output)[0]


# The step's three fused regions as plain torch (the definition); `Ops.decode_kernels` may
# swap in kernels with the same signatures.
REFERENCE = {"attend": attend_step, "compress": compress_row, "indexer_topk": indexer_topk}


class Decoder:
    """Runs decode_step for one KV state; on CUDA, replays a captured graph of it."""

    def __init__(self, model: Transformer, state: KVState):
        self.model, self.state = model, state
        dev = state.layers[0].raw.device
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.use_graph = dev.type == "cuda"
        self.steps = 0
        # one compiled block per layer kind (hash/learned x ratio): guards see only those flags
        self.block_step = model.ops.fuse(block_step)
        self.kernels = model.ops.decode_kernels(REFERENCE)

    def step(self, token: int, pos: int) -> Tensor:
        self.token.fill_(token)
        self.pos.fill_(pos)
        if self.graph is not None:
            self.graph.replay()
        elif self.use_graph and self.steps >= 1 and self.capture():
            self.graph.replay()
        else:  # eager: on the CPU, and the first CUDA step (compiles, kernel warm-up)
            self.logits = self._step()
        self.steps += 1
        self._advance(pos + 1)
        return self.logits

    def _step(self) -> Tensor:
        return decode_step(
            self.model, self.state, self.token, self.pos, self.block_step, self.kernels
        )

    def capture(self) -> bool:
        """Record the step once; if some op cannot be captured, stay eager (and say why)."""
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        try:
            # thread_local: the compiler's worker threads may touch CUDA meanwhile
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                self.logits = self._step()
        except RuntimeError as e:
            warnings.warn(
                f"decode step ({self.model.ops.name} ops) not captured in a CUDA graph, running "
                f"eagerly: {e}",
                stacklevel=2,
            )
            self.use_graph = False
            return False
        self.graph = g
        return True

    def _advance(self, n: int) -> None:
        for L in self.state.layers:
            if L.ratio:
                L.n_comp = n // L.ratio
        self.state.pos = n
