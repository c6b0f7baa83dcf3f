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
from .model import Block, Transformer, rms_norm

Tensor = torch.Tensor


def block_step(blk: Block, X: Tensor, token: Tensor, p: Tensor, st: LayerState) -> Tensor:
    """One block on one token: X [1, hc, D] at position p [1]."""
    u, post, comb = blk.hc_pre(X, blk.hc_attn_fn, blk.hc_attn_scale, blk.hc_attn_base)
    y = attention_step(blk, rms_norm(u, blk.attn_norm, blk.shape.norm_eps), p, st)
    X = blk.hc_post(X, y, post, comb)
    u, post, comb = blk.hc_pre(X, blk.hc_ffn_fn, blk.hc_ffn_scale, blk.hc_ffn_base)
    y = blk.moe(rms_norm(u, blk.ffn_norm, blk.shape.norm_eps), token)
    return blk.hc_post(X, y, post, comb)


def attention_step(blk: Block, x: Tensor, p: Tensor, st: LayerState) -> Tensor:
    s, ops = blk.shape, blk.ops
    qr = rms_norm(ops.linear(x, blk.attn_q_a), blk.attn_q_a_norm, s.norm_eps)
    q = ops.linear(qr, blk.attn_q_b).view(1, s.n_head, s.head_dim)
    q = blk.rope(rms_norm(q, None, s.norm_eps), p, blk.freqs)
    kv = rms_norm(ops.linear(x, blk.attn_kv), blk.attn_kv_a_norm, s.norm_eps)
    kv = blk.cache_row(blk.rope(kv, p, blk.freqs))
    W = s.window
    st.raw[p % W] = kv
    slot = torch.arange(W, device=x.device)
    parts = [(st.raw, ((p - (p - slot) % W) >= 0)[None])]  # ring slot j: position p-(p-j)%W
    if blk.ratio:
        compress_step(blk, x, p, st)
        cap = st.comp.cap
        visible = torch.arange(cap, device=x.device) < (p + 1) // blk.ratio
        if blk.ratio == 4:
            rows = indexer_step(blk, x, qr, p, st, visible)
            parts.append((st.comp.gather(rows), visible[rows][None]))
        else:
            parts.append((st.comp.get(cap), visible[None]))
    o = blk.attend(q, parts, blk.attn_sinks)
    o = blk.rope(o, p, blk.freqs, inverse=True).view(1, s.o_groups, -1)
    low = ops.linear(o, blk.attn_output_a)
    return ops.linear(low, blk.attn_output_b)


def compress_step(blk: Block, x: Tensor, p: Tensor, st: LayerState) -> None:
    """Feed the token to the compressors; (re)write row p // ratio from the open window."""
    s, r = blk.shape, blk.ratio
    k = p // r
    row = pool_step(
        blk,
        x,
        p,
        st.attn_frontier,
        blk.attn_compressor_kv,
        blk.attn_compressor_gate,
        blk.attn_compressor_ape,
    )
    row = rms_norm(row, blk.attn_compressor_norm, s.norm_eps)
    st.comp.write(k, blk.cache_row(blk.rope(row, k * r, blk.freqs)))
    if r == 4:
        row = pool_step(
            blk,
            x,
            p,
            st.index_frontier,
            blk.indexer_compressor_kv,
            blk.indexer_compressor_gate,
            blk.indexer_compressor_ape,
        )
        row = blk.rope(rms_norm(row, blk.indexer_compressor_norm, s.norm_eps), k * r, blk.freqs)
        st.index.write(k, blk.fp4(row) if blk.quant_sim else row)


def pool_step(blk: Block, x: Tensor, p: Tensor, fr: CompressorState, wkv, wgate, ape) -> Tensor:
    r = blk.ratio
    slot = p % r
    fr.cur_kv[slot] = blk.ops.linear(x, wkv)
    fr.cur_score[slot] = blk.ops.linear(x, wgate) + ape[slot]
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


def indexer_step(blk: Block, x: Tensor, qr: Tensor, p: Tensor, st: LayerState, visible: Tensor):
    """Rows [k]: the top-k compressed rows by indexer score, visible ones first (a query with
    fewer than k visible rows also gets invisible ones, which the caller's mask drops)."""
    s = blk.shape
    qi = blk.ops.linear(qr, blk.indexer_attn_q_b).view(1, s.n_indexer_head, s.indexer_head_dim)
    qi = blk.rope(qi, p, blk.freqs)
    if blk.quant_sim:
        qi = blk.fp4(qi)
    w = blk.ops.linear(x, blk.indexer_proj) / math.sqrt(s.indexer_head_dim * s.n_indexer_head)
    keys = st.index.get(st.index.cap)
    score = torch.einsum("th,thk->tk", w, torch.relu(torch.einsum("thd,kd->thk", qi, keys)))[0]
    score = score.masked_fill(~visible, float("-inf"))
    k = min(s.indexer_top_k, score.shape[0])
    # stable: among equal scores the lower row wins, as in the chunked path (and ds4)
    return torch.sort(score, descending=True, stable=True).indices[:k]


def decode_step(
    model: Transformer, state: KVState, token: Tensor, p: Tensor, step=block_step
) -> Tensor:
    """Logits [vocab] after token [1] at position p [1]; the state's host counters are not
    touched (the caller advances them: nothing here may read device values)."""
    X = model.embed(token)[:, None, :].expand(-1, model.shape.hc_mult, -1)
    for blk, st in zip(model.blk, state.layers, strict=True):
        X = step(blk, X, token, p, st)
    return model.ops.linear(model.head(X), model.output)[0]


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

    def step(self, token: int, pos: int) -> Tensor:
        self.token.fill_(token)
        self.pos.fill_(pos)
        if self.graph is not None:
            self.graph.replay()
        elif self.use_graph and self.steps >= 1 and self.capture():
            self.graph.replay()
        else:  # eager: on the CPU, and the first CUDA step (it warms the kernels up)
            self.logits = self._step()
        self.steps += 1
        self._advance(pos + 1)
        return self.logits

    def _step(self) -> Tensor:
        return decode_step(self.model, self.state, self.token, self.pos, self.block_step)

    def capture(self) -> bool:
        """Record the step once; if some op cannot be captured, stay eager (and say why)."""
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                self.logits = decode_step(
                    self.model, self.state, self.token, self.pos, self.block_step
                )
        except RuntimeError as e:
            warnings.warn(
                f"decode step not captured in a CUDA graph, running eagerly: {e}", stacklevel=2
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
