"""GGUF loading: family validation, clear errors for bad files, and memory mapping."""

from __future__ import annotations

import dataclasses
import os
import resource

import pytest

from ds4py import Engine
from ds4py.config import FLASH, ModelFileError, Shape
from ds4py.gguf import GGMLType, GGUFFile, PendingTensor, write_gguf
from ds4py.model.load import file_tensors
from ds4py.synth import synthetic_tensors, write_synthetic

TINY = Shape(n_vocab=300, n_embd=256, n_layer=4, n_head=2, head_dim=128, q_lora_rank=64,
             o_lora_rank=32, o_groups=2, n_expert=4, n_expert_used=2, n_ff_exp=256,
             n_hash_layer=3, n_indexer_head=2, indexer_top_k=4)  # fmt: skip


def pending(shape: Shape) -> list[PendingTensor]:
    from ds4py.synth import _nbytes

    return [PendingTensor(spec.name, q, spec.shape, _nbytes(q, spec.shape), lambda m=m: m().data.numpy())
            for spec, q, m in synthetic_tensors(shape)]  # fmt: skip


def write(path, shape=TINY, md=None, tensors=None):
    write_gguf(path, md or shape.to_metadata(), tensors or pending(shape))
    return path


def test_tiny_file_opens_and_runs(tmp_path):
    eng = Engine.open(write(tmp_path / "m.gguf"))
    assert eng.shape == TINY and not eng.shape.is_flash
    assert eng.score([1, 2, 3]).shape == (3, 300)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        (
            "deepseek4.attention.compress_ratios",
            ("array_uint32", [0, 0, 4, 4]),
            "compress_ratios[3]",
        ),
        ("deepseek4.attention.sliding_window", ("uint32", 64), "sliding_window"),
        ("deepseek4.rope.dimension_count", ("uint32", 32), "rope.dimension_count"),
        ("deepseek4.attention.key_length", ("uint32", 100), "key_length"),
        ("deepseek4.rope.freq_base", ("float32", 5000.0), "rope.freq_base"),
        ("deepseek4.block_count", None, "deepseek4.block_count"),
    ],
)
def test_bad_metadata_is_named(tmp_path, key, value, needle):
    md = TINY.to_metadata()
    if value is None:
        del md[key]
    else:
        md[key] = value
    with pytest.raises(ModelFileError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        Engine.open(write(tmp_path / "m.gguf", md=md))


def test_wrong_tensor_shape_is_named(tmp_path):
    ts = pending(TINY)
    i = next(i for i, t in enumerate(ts) if t.name == "blk.1.attn_kv.weight")
    old = ts[i]
    ts[i] = dataclasses.replace(old, shape=(64, 256), nbytes=old.nbytes // 2,
                                produce=lambda: old.produce().reshape(-1)[: old.nbytes // 2])  # fmt: skip
    with pytest.raises(
        ModelFileError, match=r"blk\.1\.attn_kv\.weight: expected shape \[128, 256\]"
    ):
        Engine.open(write(tmp_path / "m.gguf", tensors=ts))


def test_unsupported_type_and_missing_tensor(tmp_path):
    ts = pending(TINY)
    i = next(i for i, t in enumerate(ts) if t.name == "blk.2.attn_q_a.weight")
    n = 64 * 256 // 256 * 176  # Q5_K: 176 bytes per 256 values
    ts[i] = PendingTensor(ts[i].name, GGMLType.Q5_K, (64, 256), n, lambda: bytes(n))
    with pytest.raises(
        ModelFileError, match=r"blk\.2\.attn_q_a\.weight: unsupported tensor type Q5_K"
    ):
        Engine.open(write(tmp_path / "a.gguf", tensors=ts))
    ts = [t for t in pending(TINY) if t.name != "output_norm.weight"]
    with pytest.raises(ModelFileError, match="missing tensor output_norm.weight"):
        Engine.open(write(tmp_path / "b.gguf", tensors=ts))


def test_truncated_and_garbage_files(tmp_path):
    good = write(tmp_path / "m.gguf").read_bytes()
    for cut in (10, 200, len(good) // 2, len(good) - 100):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(good[:cut])
        with pytest.raises(ModelFileError):
            Engine.open(p)
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"NOTGGUF" + good[7:4096])
    with pytest.raises(ModelFileError, match="not a readable GGUF"):
        Engine.open(p)
    with pytest.raises(ModelFileError, match="no such model file"):
        Engine.open(tmp_path / "absent.gguf")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("quant,total", [("q2", 86_714_775_900), ("q4", 164_628_167_004)])
def test_full_size_layout_is_mapped_not_copied(tmp_path, quant, total):
    """The published layout (MODEL.md §5.4 byte totals) opens as views of the mapping."""
    flash = Shape(**FLASH)
    assert flash.is_flash
    path = tmp_path / f"flash-{quant}.gguf"
    write_synthetic(path, flash, quant=quant, sparse=True)
    before = _rss_mib()
    f = GGUFFile(path)
    assert Shape.from_metadata(f.metadata) == flash
    views = {name: make() for name, make in file_tensors(f).items()}
    assert len(views) == 1328
    assert sum(v.nbytes for v in views.values()) == total
    # 80+ GB of tensors; what grows is gguf-py parsing the 129k-token vocabulary metadata
    assert _rss_mib() - before < 1500
    assert views["blk.42.ffn_down_exps.weight"].qtype == (
        GGMLType.Q2_K if quant == "q2" else GGMLType.Q4_K
    )
    del views, f
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 2**20  # KiB: < 4 GiB peak
