"""Tool memory: tool-call id -> the exact DSML block the model sampled for that call.

When a client sends history back, assistant tool calls are re-rendered from this map so the
prompt bytes equal what is already in the KV cache (RUNTIME.md §5.8). Owns only the bounded,
thread-safe map; rendering and the disk trailer live elsewhere.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable


class ToolMemory:
    """LRU by id, bounded by id count and total DSML bytes (blocks shared by ids count once)."""

    def __init__(self, max_ids: int = 100000, max_bytes: int = 512 << 20) -> None:
        self.max_ids = max_ids
        self.max_bytes = max_bytes
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._refs: dict[str, int] = {}  # block -> number of ids pointing at it
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def put(self, ids: Iterable[str], block: str) -> None:
        if self.max_ids <= 0 or not block:
            return
        with self._lock:
            for i in ids:
                self._drop(i)
                self._ids[i] = block
                if self._refs.get(block, 0) == 0:
                    self._bytes += len(block.encode())
                self._refs[block] = self._refs.get(block, 0) + 1
            while self._ids and (len(self._ids) > self.max_ids or self._bytes > self.max_bytes):
                self._drop(next(iter(self._ids)))

    def get(self, call_id: str) -> str | None:
        with self._lock:
            block = self._ids.get(call_id)
            if block is not None:
                self._ids.move_to_end(call_id)
            return block

    def items(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._ids.items())

    def block_for(self, ids: list[str]) -> str | None:
        """The stored block when every id maps to one and the same block, else None."""
        blocks = {self.get(i) for i in ids}
        if len(blocks) != 1:
            return None
        return blocks.pop()

    def _drop(self, call_id: str) -> None:
        block = self._ids.pop(call_id, None)
        if block is None:
            return
        self._refs[block] -= 1
        if self._refs[block] == 0:
            del self._refs[block]
            self._bytes -= len(block.encode())
