"""`ds4py bench`: prefill and generation speed at context frontiers, ds4-bench's method.

For each frontier (ctx-start, then +step-incr or x step-mul, up to ctx-max): sync the prompt
prefix (only the new interval is prefilled, and timed), generate gen-tokens greedy tokens with
EOS excluded (timed), then rewind to the frontier (an in-place checkpoint restore) and go on.
CSV columns are ds4's, plus the KV bytes held at the frontier; `--plot` renders a PNG from a CSV.
Owns timing and reporting only: the engine does the work.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

COLUMNS = ["ctx_tokens", "prefill_tokens", "prefill_tps", "gen_tokens", "gen_tps", "kvcache_bytes"]


@dataclass
class Row:
    ctx_tokens: int
    prefill_tokens: int
    prefill_tps: float
    gen_tokens: int
    gen_tps: float
    kvcache_bytes: int


def frontiers(start: int, stop: int, incr: int | None, mul: float | None) -> list[int]:
    if start < 1 or stop < start:
        raise ValueError(f"need 1 <= ctx-start <= ctx-max, got {start} and {stop}")
    out, f = [], start
    while f < stop:
        out.append(f)
        f = max(f + 1, math.ceil(f * mul)) if mul else f + incr
    return out + [stop]


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    engine, ids: list[int], points: list[int], gen_tokens: int, ctx: int, log=None
) -> list[Row]:
    """Measure every frontier on one session; ids must cover the last frontier."""
    if len(ids) < points[-1]:
        raise ValueError(f"the prompt has {len(ids)} tokens, fewer than ctx-max {points[-1]}")
    sess = engine.new_session(ctx)
    eos = engine.tokenizer.eos_id if "tokenizer.ggml.tokens" in engine.metadata else None
    rows, prev = [], 0
    for f in points:
        _sync_device(engine.device)
        t0 = time.perf_counter()
        logits = sess.sync(ids[:f])
        _sync_device(engine.device)
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            if eos is not None:  # ds4-bench: greedy over every id but EOS
                logits = logits.clone()
                logits[eos] = float("-inf")
            logits = sess.eval(int(logits.argmax()))
        _sync_device(engine.device)
        t_gen = time.perf_counter() - t0
        rows.append(
            Row(
                f,
                f - prev,
                round((f - prev) / t_pre, 2),
                gen_tokens,
                round(gen_tokens / t_gen, 2) if gen_tokens else 0.0,
                sess.state.nbytes(),
            )
        )
        if log:
            log(rows[-1])
        sess.rewind(f)
        prev = f
    return rows


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: f"{v:.2f}" if isinstance(v, float) else v for k, v in asdict(r).items()})
    return buf.getvalue()


def plot(csv_path: str | Path, out: str | Path | None = None, title: str = "ds4py bench") -> Path:
    """PNG of prefill and generation speed against the context frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        data = list(csv.DictReader(f))
    ctx = [int(r["ctx_tokens"]) for r in data]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ctx, [float(r["prefill_tps"]) for r in data], "o-")
    a.set(xlabel="context tokens", ylabel="prefill tokens/s", title="prefill")
    b.plot(ctx, [float(r["gen_tps"]) for r in data], "o-", color="tab:orange")
    b.set(xlabel="context tokens", ylabel="generated tokens/s", title="generation")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.set_xscale("log", base=2)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out) if out else Path(csv_path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def default_prompt() -> str:
    return (Path(__file__).parent / "data" / "promessi_sposi.txt").read_text("utf-8")


def prompt_ids(engine, args) -> list[int]:
    if getattr(args, "chat_prompt_file", None):
        from .chat import render_ids

        text = Path(args.chat_prompt_file).read_text("utf-8")
        msgs = [{"role": "system", "content": args.system}, {"role": "user", "content": text}]
        return render_ids(msgs, engine.tokenizer, thinking=False)
    path = getattr(args, "prompt_file", None)
    text = Path(path).read_text("utf-8") if path else default_prompt()
    ids = engine.tokenizer.encode(text, specials=False)
    return [engine.tokenizer.bos_id] + ids


def main(args: argparse.Namespace) -> int:
    """Entry point of `ds4py bench` (flags defined in cli.py)."""
    if getattr(args, "plot", None):
        print(plot(args.plot))
        return 0
    from .cli import open_engine

    engine = open_engine(args)
    ids = prompt_ids(engine, args)
    points = frontiers(args.ctx_start, args.ctx_max, args.step_incr, args.step_mul)
    ctx = args.ctx_alloc or points[-1] + args.gen_tokens + 1
    rows = run(engine, ids, points, args.gen_tokens, ctx, log=lambda r: print(r, file=sys.stderr))
    text = to_csv(rows)
    if args.csv:
        Path(args.csv).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
