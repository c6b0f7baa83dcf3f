"""GGUF files: open (memory-mapped) and write, through the `gguf` package.

Owns the container: metadata decoding, the tensor directory, zero-copy byte views of tensor data
and a small writer used by the converter, the demo model and synthetic weights. It knows nothing
about which tensors a model needs (`model/load.py`) or how blocks decode (`quant/formats.py`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from .config import ARCH, ModelFileError

GGMLType = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLType
    shape: tuple[int, ...]  # torch order: reverse of GGUF ne
    data: np.ndarray  # uint8 view of the mapped bytes


class GGUFFile:
    """A GGUF file opened through a read-only memory map (no tensor is copied)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such model file")
        try:
            # Read-only shared mapping: a private writable one would be charged against
            # overcommit for the whole file (80+ GB). Tensors are never written.
            self._reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, IndexError, KeyError, OSError, EOFError) as e:
            raise ModelFileError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.metadata = {k: _field_value(f) for k, f in self._reader.fields.items()}
        self.tensors: dict[str, TensorInfo] = {}
        for t in self._reader.tensors:
            ne = [int(d) for d in t.shape]
            raw = np.asarray(t.data).reshape(-1).view(np.uint8)
            self.tensors[t.name] = TensorInfo(
                t.name, GGMLType(t.tensor_type), tuple(reversed(ne)), raw
            )

    def tensor_bytes(self, name: str) -> torch.Tensor:
        """The raw bytes of one tensor as a uint8 torch view of the mapping."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.from_numpy(self.tensors[name].data)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors


def _field_value(f: Any) -> Any:
    try:
        return f.contents()
    except Exception:  # malformed values are reported by the key that needs them
        return None


# ---- writing ----

_SCALAR = {
    "uint32": gguf.GGUFValueType.UINT32,
    "uint64": gguf.GGUFValueType.UINT64,
    "int32": gguf.GGUFValueType.INT32,
    "float32": gguf.GGUFValueType.FLOAT32,
    "bool": gguf.GGUFValueType.BOOL,
    "string": gguf.GGUFValueType.STRING,
}


@dataclass
class PendingTensor:
    name: str
    qtype: GGMLType
    shape: tuple[int, ...]  # torch order
    nbytes: int
    produce: Any  # () -> np.ndarray of raw bytes (uint8) or typed values


def write_gguf(
    path: str | os.PathLike,
    metadata: dict[str, tuple[str, Any]],
    tensors: Iterator[PendingTensor] | list[PendingTensor],
    name: str = "DeepSeek-V4-Flash",
    sparse: bool = False,
) -> None:
    """Write a GGUF v3 file; tensor bytes are produced one at a time so huge files stream.

    sparse=True writes the header and leaves every tensor as a hole of zero bytes (zero blocks
    are valid in every type): a full-size layout for tests, in no time and no disk space.
    """
    tensors = list(tensors)
    w = gguf.GGUFWriter(os.fspath(path), ARCH)
    w.add_name(name)
    for key, (typ, value) in metadata.items():
        if typ.startswith("array_"):
            w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, _SCALAR[typ[6:]])
        else:
            w.add_key_value(key, value, _SCALAR[typ])
    for t in tensors:
        w.add_tensor_info(t.name, _byte_shape(t), np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    if sparse:
        fout = w.fout[0]
        align = w.data_alignment
        end = -(-fout.tell() // align) * align + sum(-(-t.nbytes // align) * align for t in tensors)
        fout.truncate(end)
        w.close()
        return
    for t in tensors:
        data = np.ascontiguousarray(t.produce()).reshape(-1).view(np.uint8)
        if data.nbytes != t.nbytes:
            raise ValueError(f"{t.name}: produced {data.nbytes} bytes, expected {t.nbytes}")
        w.write_tensor_data(data)
    w.close()


def _byte_shape(t: PendingTensor) -> tuple[int, ...]:
    # gguf-py derives ne from the byte shape of a uint8 tensor with a raw_dtype.
    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    return (*t.shape[:-1], t.shape[-1] // block * size)
