"""Token sampling: top-k -> temperature softmax -> min-p -> top-p, seeded per Sampler.

Owns: `SamplingParams`, `Sampler` (one torch.Generator each, so a seed fixes the whole
sequence), and `DsmlTracker`, which tells the generation loop when the next token sits inside
DSML syntax and must be greedy (RUNTIME.md §2.5). Does not own: which params a request gets
(the server's thinking-mode override, §2.4) or the decode loop itself.
Filter order and semantics follow ds4 (RUNTIME.md §2.2); the RNG is torch's, not ds4's xorshift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ds4py.chat.dsml import PARAM_CLOSE, PARAM_OPEN, TC_CLOSE, TC_OPEN
from ds4py.tokenizer import END_THINK

TOP_K_MAX = 1024  # ds4 clamps top_k here; a larger k is indistinguishable in practice


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.05
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")


class Sampler:
    """Draws token ids from logits; one generator per sampler, one draw per sampled token."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self._gen = torch.Generator(device="cpu")
        if self.params.seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(self.params.seed & 0xFFFF_FFFF_FFFF_FFFF)
        self.seed = self._gen.initial_seed()

    def sample(self, logits: torch.Tensor, greedy: bool = False) -> int:
        """Token id for `logits` [vocab]; greedy (or temperature <= 0) takes the first argmax."""
        x = _as_logits(logits)
        if greedy or self.params.temperature <= 0:
            return int(torch.argmax(x))
        ids, w = self._candidates(x)
        cum = torch.cumsum(w.double(), 0)
        r = torch.rand((), generator=self._gen, dtype=torch.float64) * cum[-1]
        return int(ids[min(int(torch.searchsorted(cum, r, right=True)), len(ids) - 1)])

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution `sample` draws from: float32 [vocab], zero for filtered tokens."""
        x = _as_logits(logits)
        out = torch.zeros(len(x), dtype=torch.float32)
        if self.params.temperature <= 0:
            out[torch.argmax(x)] = 1.0
            return out
        ids, w = self._candidates(x)
        out[ids] = w / w.sum()
        return out

    def _candidates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Surviving token ids and their weights, in the order the draw walks them.

        Without top-p the walk is in id order, otherwise from the most likely token down.
        """
        p = self.params
        top_p = p.top_p if 0 < p.top_p <= 1 else 1.0
        min_p = min(max(p.min_p, 0.0), 1.0)
        top_k = min(max(p.top_k, 0), TOP_K_MAX, len(x))
        if top_k:
            vals, ids = torch.topk(x, top_k)  # descending; -inf never beats a finite logit
            ids, vals = ids[vals > -math.inf], vals[vals > -math.inf]
        else:
            ids, vals = None, x
        w = torch.exp((vals - vals.max()) / p.temperature)  # best token weighs 1; -inf -> 0
        total = w.sum()
        keep = (w >= min_p) & (w > 0)  # min-p: p_i / p_max >= min_p
        kept = keep.nonzero().squeeze(1)
        ids, w = (kept if ids is None else ids[kept]), w[kept]
        if top_p < 1:
            # Mass is measured against the whole (top-k) set, before min-p, like ds4.
            w, order = torch.sort(w, descending=True, stable=True)
            ids = ids[order]
            n = int(((torch.cumsum(w, 0) - w) / total < top_p).sum())
            ids, w = ids[:n], w[:n]
        return ids, w


def _as_logits(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.numel() == 0:
        raise ValueError("logits must be a non-empty tensor")
    x = logits.detach().reshape(-1).to("cpu", torch.float32)
    x = x.masked_fill(torch.isnan(x), -math.inf)
    if not torch.isfinite(x).any():
        raise ValueError("logits contain no finite value")
    return x


# ---- Greedy forcing inside DSML ----


class _Match:
    """Streaming substring matcher (KMP): `step(ch)` is True when `literal` just completed."""

    def __init__(self, literal: str):
        self.literal = literal
        self.partial = 0
        self._fail = [0] * len(literal)
        k = 0
        for i in range(1, len(literal)):
            while k and literal[i] != literal[k]:
                k = self._fail[k - 1]
            k += literal[i] == literal[k]
            self._fail[i] = k

    def step(self, ch: str) -> bool:
        while self.partial and ch != self.literal[self.partial]:
            self.partial = self._fail[self.partial - 1]
        self.partial += ch == self.literal[self.partial]
        if self.partial == len(self.literal):
            self.partial = self._fail[-1]
            return True
        return False


class DsmlTracker:
    """Follows generated text and says whether the next token is DSML syntax (-> greedy).

    Feed every emitted token's text. Inside tags, between parameters and in the JSON structure
    of `string="false"` values the model must reproduce syntax exactly, so `greedy` is True;
    inside string values and JSON string literals it is False (request sampling), except when
    the text ends in two or more characters of a closing parameter tag. With `thinking=True`
    nothing is forced before `</think>` (DSML in reasoning is never executed). After the block
    closes the tracker stays outside for the rest of the turn.
    """

    def __init__(self, thinking: bool = False):
        self.state = "reasoning" if thinking else "outside"
        self._end_think = _Match(END_THINK)
        self._open = _Match(TC_OPEN)
        self._close = _Match(PARAM_CLOSE)
        self._tag = ""  # text of the tag being read in "syntax"
        self._escape = False

    @property
    def greedy(self) -> bool:
        if self.state in ("syntax", "json"):
            return True
        if self.state in ("string", "json_string"):
            return self._close.partial >= 2
        return self.state == "outside" and self._open.partial >= 2

    def feed(self, text: str) -> None:
        for ch in text:
            getattr(self, "_" + self.state)(ch)

    def _reasoning(self, ch: str) -> None:
        if self._end_think.step(ch):
            self.state = "outside"

    def _outside(self, ch: str) -> None:
        if self._open.step(ch):
            self.state, self._tag = "syntax", ""

    def _done(self, ch: str) -> None:
        pass

    def _syntax(self, ch: str) -> None:
        if ch == "<" or self._tag:
            self._tag += ch
        if ch != ">" or not self._tag:
            return
        tag, self._tag = self._tag, ""
        if tag == TC_CLOSE:
            self.state = "done"
        elif tag.startswith(PARAM_OPEN):
            self.state = "json" if 'string="false"' in tag else "string"
            self._close.partial = 0

    def _string(self, ch: str) -> None:
        if self._close.step(ch):
            self.state = "syntax"

    def _json(self, ch: str) -> None:
        if self._close.step(ch):
            self.state = "syntax"
        elif ch == '"':
            self.state, self._escape = "json_string", False

    def _json_string(self, ch: str) -> None:
        if self._close.step(ch):
            self.state = "syntax"
        elif self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            self.state = "json"
