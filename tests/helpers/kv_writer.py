"""Child process for tests/test_kv_store.py: start a KVStore save and freeze at a chosen point.

Usage: kv_writer.py DIR FINGERPRINT TEXT N_TOKENS PAYLOAD_BYTES SEED {mid-write|before-rename}
Prints "FROZEN" once stopped, then sleeps until the parent kills it with SIGKILL. Stands in for
a slow disk so the kill lands deterministically; it patches only this child's view of I/O.
"""

import importlib.util
import os
import random
import sys
import time
from pathlib import Path

# Load store.py on its own: the ds4py package imports torch (seconds), the store needs none of it.
_spec = importlib.util.spec_from_file_location(
    "kv_store_under_test", Path(__file__).resolve().parents[2] / "ds4py" / "kv" / "store.py"
)
kv = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kv)


def freeze() -> None:
    print("FROZEN", flush=True)
    while True:
        time.sleep(60)


class HalfWriter:
    """Wraps the temp file: the first large write stops halfway, flushed to the file."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data) -> int:
        data = memoryview(data)
        if len(data) > 4096:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            freeze()
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def main() -> None:
    directory, fingerprint, text, n_tokens, size, seed, point = sys.argv[1:]
    store = kv.KVStore(directory, fingerprint=fingerprint, budget_bytes=1 << 30)
    payload = random.Random(int(seed)).randbytes(int(size))
    if point == "mid-write":
        kv.open = lambda path, mode="r", *a, **k: (
            HalfWriter(open(path, mode, *a, **k)) if "x" in mode else open(path, mode, *a, **k)
        )
    elif point == "before-rename":
        os.replace = lambda *a, **k: freeze()
    else:
        raise SystemExit(f"unknown freeze point {point!r}")
    store.save(text, int(n_tokens), payload, "evict")
    raise SystemExit("save finished without freezing")


if __name__ == "__main__":
    main()
