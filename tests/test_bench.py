"""`ds4py bench`: frontiers, CSV columns (ds4's plus KV bytes), rows from a real run, the plot."""

from __future__ import annotations

import csv
import io

import pytest

from ds4py import Engine
from ds4py.bench import COLUMNS, frontiers, plot, run, to_csv
from ds4py.config import Shape
from ds4py.synth import write_synthetic


def test_frontiers_follow_ds4_bench():
    assert frontiers(2048, 8192, 2048, None) == [2048, 4096, 6144, 8192]
    assert frontiers(1000, 5000, None, 2.0) == [1000, 2000, 4000, 5000]
    assert frontiers(100, 100, 64, None) == [100]
    with pytest.raises(ValueError):
        frontiers(0, 10, 1, None)


def test_run_reports_every_frontier(tmp_path):
    shape = Shape(
        n_vocab=300,
        n_embd=256,
        n_layer=4,
        n_head=2,
        head_dim=128,
        q_lora_rank=64,
        o_lora_rank=32,
        o_groups=2,
        n_expert=4,
        n_expert_used=2,
        n_ff_exp=256,
        n_hash_layer=3,
        n_indexer_head=2,
        indexer_top_k=8,
    )
    path = tmp_path / "m.gguf"
    write_synthetic(path, shape)
    eng = Engine.open(path)
    ids = list(range(1, 299))
    rows = run(eng, ids, [64, 160, 288], gen_tokens=3, ctx=300)
    assert [r.ctx_tokens for r in rows] == [64, 160, 288]
    assert [r.prefill_tokens for r in rows] == [64, 96, 128]
    assert all(r.prefill_tps > 0 and r.gen_tps > 0 and r.gen_tokens == 3 for r in rows)
    assert rows[0].kvcache_bytes < rows[1].kvcache_bytes < rows[2].kvcache_bytes
    text = to_csv(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert list(parsed[0]) == COLUMNS and parsed[2]["ctx_tokens"] == "288"
    (tmp_path / "b.csv").write_text(text)
    png = plot(tmp_path / "b.csv")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="fewer than ctx-max"):
        run(eng, ids[:50], [64], gen_tokens=1, ctx=100)
