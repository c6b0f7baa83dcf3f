"""Disk KV store: checksummed files of session snapshots, keyed by the rendered text they cover.

Owns the cache file format (header, naming, checksums), crash-safe writes, longest-text-prefix
lookup, LRU eviction under a disk budget, and `SavePolicy`, ds4's rules for *when* to save
(cold, continued, evict, shutdown) as pure arithmetic on token counts. It does not own the
session payload: those bytes come from `Session.snapshot()` and go back to `Session.restore()`
unread. It never tokenizes or renders; callers pass text and token counts. Format and
integration notes: docs/CACHE.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"DS4PYKVF"  # the file; the session payload inside has its own magic
FORMAT_VERSION = 1
SUFFIX = ".ds4py.kv"  # not ds4's "<sha1>.kv", so both programs can share one directory
SAVE_REASONS = ("unknown", "cold", "continued", "evict", "shutdown")  # index = on-disk code
DEFAULT_BUDGET_BYTES = 4096 * 2**20
MAX_FINGERPRINT_BYTES = 4096

# Fixed header part (108 bytes), then the fingerprint, then a CRC-32 of everything before it.
# magic, version, reserved, header_len, n_tokens, reserved, reason, fingerprint_len, created_ns,
# text_len, extra_len, payload_len, payload_sha256, text_extra_crc32 (+8 reserved bytes).
_HEAD = struct.Struct("<8sHHIIIB3xIQQQQ32sI8x")
_CRC = struct.Struct("<I")
_MAX_HEADER = 1 << 20  # any header longer than this is damage, whatever the version
_NAME_RE = re.compile(r"^([0-9a-f]{40})" + re.escape(SUFFIX) + "$")
_TMP_RE = re.compile(r"^[0-9a-f]{40}" + re.escape(SUFFIX) + r"\.tmp\.(\d+)\.[0-9a-f]+$")
_STALE_TMP_SECONDS = 3600  # a live writer keeps its temp file's mtime fresh


class KVStoreError(Exception):
    """A save the store refused or could not complete (the directory is left consistent)."""


class KVBudgetError(KVStoreError):
    """The file alone would exceed the disk budget, so it was not written."""


class _Corrupt(Exception):
    """A file in our format that fails a check: removed on sight."""


class _Foreign(Exception):
    """A sound file of another format version: skipped, kept, evictable."""


# ---- Options and policy -------------------------------------------------------------------


@dataclass(frozen=True)
class KVStoreOptions:
    """ds4's disk-cache thresholds (RUNTIME.md §4.4), all in tokens; defaults are ds4's."""

    min_tokens: int = 512  # never save or load a shorter checkpoint
    cold_max_tokens: int = 30000  # cold saves only for prompts in [min, this]; 0 disables
    continued_interval_tokens: int = 10000  # continued-save spacing; 0 disables
    boundary_trim_tokens: int = 32  # tail trimmed off a cold save
    boundary_align_tokens: int = 2048  # cold saves and the continued step align to this; 0 off

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"KVStoreOptions.{name} must be an int >= 0, got {value!r}")
        if self.min_tokens < 1:
            raise ValueError("KVStoreOptions.min_tokens must be >= 1")
        if self.cold_max_tokens and self.cold_max_tokens < self.min_tokens:
            raise ValueError(
                f"KVStoreOptions.cold_max_tokens must be 0 or >= min_tokens ({self.min_tokens}),"
                f" got {self.cold_max_tokens}"
            )


@dataclass(frozen=True)
class SaveDecision:
    """Save the first `n_tokens` of the live session now, with this reason."""

    n_tokens: int
    reason: str
    undo_frontier: int = -1  # cold saves: continued frontier to restore if the save fails


class SavePolicy:
    """When to save (RUNTIME.md §4.5). Pure logic plus one counter, the continued frontier.

    The worker asks `cold` / `continued` / `evict` / `shutdown`, saves when told to, then
    reports back with `saved`, `failed` or `loaded` so the continued schedule stays right.
    """

    def __init__(self, options: KVStoreOptions | None = None) -> None:
        self.options = options or KVStoreOptions()
        self.last_stored = 0  # highest frontier saved (or loaded) on this timeline

    @property
    def continued_step(self) -> int:
        """Interval rounded up to the alignment (10000 -> 10240 by default); 0 = disabled."""
        step, align = self.options.continued_interval_tokens, self.options.boundary_align_tokens
        if step and align:
            step = -(-step // align) * align
        return step

    def store_len(self, n_tokens: int) -> int:
        """Cold store length: drop the volatile tail, floor to the alignment, keep >= min."""
        o = self.options
        if n_tokens > o.min_tokens + o.boundary_trim_tokens:
            stable = n_tokens - o.boundary_trim_tokens
            if o.boundary_align_tokens:
                stable -= stable % o.boundary_align_tokens
            if stable >= o.min_tokens:
                return stable
        return n_tokens

    def chat_anchor(self, tokens: Sequence[int], user_id: int, assistant_id: int) -> int:
        """Position of the last USER marker before the first ASSISTANT marker, or -1.

        Everything before it (system prompt, tool schemas, stable user scaffolding) is what
        independent agent sessions share, so a cold save there is reused the most.
        """
        last_user = -1
        for i, token in enumerate(tokens):
            if token == assistant_id:
                break
            if token == user_id:
                last_user = i
        return last_user if last_user >= self.options.min_tokens else -1

    def cold(
        self,
        prompt_tokens: Sequence[int],
        cached: int,
        user_id: int | None = None,
        assistant_id: int | None = None,
    ) -> SaveDecision | None:
        """A request reused `cached` tokens: save a prefix of its prompt during prefill?

        If yes, sync to `n_tokens`, save, then sync the rest. A continued save at the same
        frontier is suppressed now; call `failed(decision)` if the save does not happen.
        """
        o, n = self.options, len(prompt_tokens)
        if cached != 0 or not o.cold_max_tokens or not o.min_tokens <= n <= o.cold_max_tokens:
            return None
        anchor = -1
        if user_id is not None and assistant_id is not None:
            anchor = self.chat_anchor(prompt_tokens, user_id, assistant_id)
        store = anchor if anchor >= 0 else self.store_len(n)
        undo = -1
        if self._continued_target(store):
            undo, self.last_stored = self.last_stored, store
        return SaveDecision(store, "cold", undo)

    def continued(self, live_tokens: int) -> SaveDecision | None:
        """Called at prefill progress and before each sampled token: on an aligned frontier?"""
        if not self._continued_target(live_tokens):
            return None
        return SaveDecision(live_tokens, "continued")

    def evict(self, live_tokens: int) -> SaveDecision | None:
        """A request missed the live session: restart the continued schedule; save it first?"""
        self.last_stored = 0
        return (
            SaveDecision(live_tokens, "evict") if live_tokens >= self.options.min_tokens else None
        )

    def shutdown(self, live_tokens: int) -> SaveDecision | None:
        """The worker drained for shutdown: save the live session?"""
        ok = live_tokens >= self.options.min_tokens
        return SaveDecision(live_tokens, "shutdown") if ok else None

    def saved(self, decision: SaveDecision) -> None:
        if decision.reason == "continued":
            self.last_stored = max(self.last_stored, decision.n_tokens)

    def failed(self, decision: SaveDecision) -> None:
        # Give the frontier back to the continued schedule, unless it moved on meanwhile.
        if decision.undo_frontier >= 0 and self.last_stored == decision.n_tokens:
            self.last_stored = decision.undo_frontier

    def loaded(self, n_tokens: int) -> None:
        """A disk hit restored `n_tokens`: frontiers up to there are already on disk."""
        self.last_stored = n_tokens

    def _continued_target(self, live_tokens: int) -> bool:
        step = self.continued_step
        return (
            step > 0
            and live_tokens >= self.options.min_tokens
            and live_tokens % step == 0
            and live_tokens > self.last_stored
        )


# ---- File format --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One cache file as its header describes it (payload not read)."""

    path: Path
    n_tokens: int
    reason: str
    created: float  # Unix seconds
    last_used: float  # Unix seconds (the file's mtime, bumped on every hit)
    size: int  # file bytes
    fingerprint: bytes
    header_len: int
    text_len: int  # bytes
    extra_len: int
    payload_len: int
    payload_sha256: bytes
    text_extra_crc: int

    @property
    def key(self) -> str:
        return self.path.name[: -len(SUFFIX)]


@dataclass(frozen=True)
class Hit:
    """A verified lookup result. `suffix` is the prompt after the cached text (same type)."""

    entry: Entry
    payload: bytes
    extra: bytes
    suffix: str | bytes
    consumed: bool  # the file was deleted after loading (n_tokens > cold_max_tokens)

    @property
    def n_tokens(self) -> int:
        return self.entry.n_tokens

    @property
    def text_len(self) -> int:
        return self.entry.text_len

    @property
    def path(self) -> Path:
        return self.entry.path


def _pack_header(
    fingerprint: bytes, n_tokens: int, reason: int, text: bytes, extra: bytes, payload
) -> bytes:
    fixed = _HEAD.pack(
        MAGIC,
        FORMAT_VERSION,
        0,
        _HEAD.size + len(fingerprint) + _CRC.size,
        n_tokens,
        0,
        reason,
        len(fingerprint),
        time.time_ns(),
        len(text),
        len(extra),
        len(payload),
        hashlib.sha256(payload).digest(),
        zlib.crc32(extra, zlib.crc32(text)),
    )
    body = fixed + fingerprint
    return body + _CRC.pack(zlib.crc32(body))


def _read_entry(f, path: Path, st: os.stat_result) -> Entry:
    """Parse and check the header of an open cache file; raises _Corrupt / _Foreign."""
    head = f.read(_HEAD.size)
    if len(head) < 16 or head[:8] != MAGIC:
        raise _Corrupt("bad magic or truncated header")
    header_len = int.from_bytes(head[12:16], "little")
    if not _HEAD.size + _CRC.size <= header_len <= _MAX_HEADER:
        raise _Corrupt(f"implausible header length {header_len}")
    blob = head + f.read(header_len - len(head))
    if len(blob) != header_len:
        raise _Corrupt("truncated header")
    if zlib.crc32(blob[:-4]) != _CRC.unpack_from(blob, header_len - 4)[0]:
        raise _Corrupt("header checksum mismatch")
    (_, version, _, _, n_tok, _, reason, fp_len, created, t_len, e_len, p_len, sha, crc) = (
        _HEAD.unpack_from(blob)
    )
    if version != FORMAT_VERSION:
        raise _Foreign(f"format version {version}")
    if header_len != _HEAD.size + fp_len + _CRC.size or n_tok == 0 or t_len == 0:
        raise _Corrupt("inconsistent header fields")
    if header_len + t_len + e_len + p_len != st.st_size:
        raise _Corrupt(f"size {st.st_size} != {header_len + t_len + e_len + p_len} (truncated?)")
    return Entry(
        path=path,
        n_tokens=n_tok,
        reason=SAVE_REASONS[reason] if reason < len(SAVE_REASONS) else "unknown",
        created=created / 1e9,
        last_used=st.st_mtime_ns / 1e9,
        size=st.st_size,
        fingerprint=blob[_HEAD.size : _HEAD.size + fp_len],
        header_len=header_len,
        text_len=t_len,
        extra_len=e_len,
        payload_len=p_len,
        payload_sha256=sha,
        text_extra_crc=crc,
    )


def _read_body(f, path: Path) -> tuple[Entry, bytes, bytes]:
    """Header, text and extra of an open cache file, all checked (not the payload)."""
    e = _read_entry(f, path, os.fstat(f.fileno()))
    text, extra = f.read(e.text_len), f.read(e.extra_len)
    if zlib.crc32(extra, zlib.crc32(text)) != e.text_extra_crc:
        raise _Corrupt("text checksum mismatch")
    return e, text, extra


def _as_bytes(value: str | bytes, what: str) -> bytes:
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{what} is not encodable as UTF-8: {err}") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ValueError(f"{what} must be str or bytes, got {type(value).__name__}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


# ---- Store --------------------------------------------------------------------------------


@dataclass
class _File:
    path: Path
    size: int
    mtime_ns: int
    entry: Entry | None  # None for a sound file of another format version


class KVStore:
    """A directory of cache files for one model (identified by `fingerprint`).

    Files of other fingerprints or format versions are never loaded but count toward the
    budget and are evicted like any other. Files that fail a check are deleted on sight.
    Safe to share a directory between processes: writes are atomic renames and files may
    vanish at any time.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        fingerprint: str | bytes,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        options: KVStoreOptions | None = None,
    ) -> None:
        self.fingerprint = _as_bytes(fingerprint, "fingerprint")
        if not 0 < len(self.fingerprint) <= MAX_FINGERPRINT_BYTES:
            raise ValueError(f"fingerprint must be 1..{MAX_FINGERPRINT_BYTES} bytes")
        if not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be a positive int, got {budget_bytes!r}")
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes
        self.options = options or KVStoreOptions()
        self._last_ns = 0
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise KVStoreError(f"cannot create KV cache directory {self.directory}: {err}") from err
        self._clean_temp_files()
        self._evict(incoming=0)

    # -- public --

    def save(
        self,
        text: str | bytes,
        n_tokens: int,
        payload: bytes | Callable[[], bytes],
        reason: str,
        *,
        extra: bytes = b"",
    ) -> Path:
        """Store `payload` (a snapshot of exactly `n_tokens` tokens rendering to `text`).

        `payload` may be a callable so no snapshot is taken when an identical file exists.
        `extra` is an opaque, checksummed blob kept beside it (e.g. a tool-id map).
        Raises KVBudgetError if the file alone exceeds the budget, KVStoreError on I/O errors.
        """
        key = _as_bytes(text, "text")
        if not key:
            raise ValueError("text must not be empty")
        if not isinstance(n_tokens, int) or not 0 < n_tokens < 2**32:
            raise ValueError(f"n_tokens must be an int in [1, 2**32), got {n_tokens!r}")
        if n_tokens < self.options.min_tokens:
            raise ValueError(f"n_tokens={n_tokens} is below min_tokens={self.options.min_tokens}")
        if reason not in SAVE_REASONS[1:]:
            raise ValueError(f"reason must be one of {SAVE_REASONS[1:]}, got {reason!r}")
        extra = _as_bytes(extra, "extra")
        path = self.directory / (hashlib.sha1(key).hexdigest() + SUFFIX)
        if self._identical_exists(path, key, n_tokens, extra):
            self._touch(path)
            return path
        data = payload() if callable(payload) else payload
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"payload must be bytes, got {type(data).__name__}")
        code = SAVE_REASONS.index(reason)
        head = _pack_header(self.fingerprint, n_tokens, code, key, extra, data)
        size = len(head) + len(key) + len(extra) + memoryview(data).nbytes
        required = size + -(-size // 100)  # 1% slack, as ds4, for filesystem accounting
        if required > self.budget_bytes:
            raise KVBudgetError(
                f"KV cache file for {n_tokens} tokens needs {required} bytes (file {size} + 1%"
                f" slack), more than the whole disk budget of {self.budget_bytes} bytes"
            )
        self._evict(incoming=size, replacing=path)
        self._write_atomic(path, (head, key, extra, data))
        self._evict(incoming=0, protect=path)
        log.info("kv cache saved %s tokens=%d reason=%s size=%d", path.name, n_tokens, reason, size)
        return path

    def lookup(
        self,
        prompt_text: str | bytes,
        *,
        ctx: int | None = None,
        restore: Callable[[bytes], object] | None = None,
    ) -> Hit | None:
        """Longest stored text that is a byte prefix of `prompt_text`, verified, or None.

        Skips entries below min_tokens and, given the session's `ctx`, entries that would not
        leave room for one more token. If `restore` is given it is called with the payload; a
        ValueError from it marks the file unusable (deleted) and the search goes on with the
        next-best entry.
        """
        prompt = _as_bytes(prompt_text, "prompt_text")
        candidates = [
            f.entry
            for f in self._scan()
            if f.entry is not None
            and f.entry.fingerprint == self.fingerprint
            and f.entry.text_len <= len(prompt)
            and f.entry.n_tokens >= self.options.min_tokens
            and (ctx is None or f.entry.n_tokens < ctx)
            and not (isinstance(prompt_text, str) and _splits_char(prompt, f.entry.text_len))
        ]
        candidates.sort(key=lambda e: (e.text_len, e.n_tokens, e.last_used), reverse=True)
        digests: dict[int, str] = {}
        for e in candidates:
            if e.text_len not in digests:
                digests[e.text_len] = hashlib.sha1(prompt[: e.text_len]).hexdigest()
            if digests[e.text_len] != e.key:
                continue
            hit = self._try_load(e, prompt, prompt_text, restore)
            if hit is not None:
                return hit
        return None

    def entries(self) -> list[Entry]:
        """Loadable entries of this model, most recently used first."""
        own = [f.entry for f in self._scan() if f.entry and f.entry.fingerprint == self.fingerprint]
        return sorted(own, key=lambda e: e.last_used, reverse=True)

    def extras(self) -> list[tuple[Entry, bytes]]:
        """Every entry's `extra` blob (checksum-verified), e.g. to rebuild a tool-id map."""
        out = []
        for e in self.entries():
            if e.extra_len:
                try:
                    with open(e.path, "rb") as f:
                        cur, _, extra = _read_body(f, e.path)
                except _Corrupt as err:
                    self._drop(e.path, str(err))
                    continue
                except (OSError, _Foreign):
                    continue  # vanished or replaced meanwhile
                if cur.fingerprint == self.fingerprint:
                    out.append((cur, extra))
        return out

    def total_bytes(self) -> int:
        """Bytes in all cache files of the directory (every model and version)."""
        return sum(f.size for f in self._scan())

    def discard(self, path: str | os.PathLike) -> None:
        """Delete one cache file (e.g. its payload failed to restore). Missing is fine."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    # -- reading --

    def _scan(self) -> list[_File]:
        out = []
        try:
            listing = list(os.scandir(self.directory))
        except FileNotFoundError:
            return out
        for de in listing:
            if not _NAME_RE.match(de.name):
                continue
            path = Path(de.path)
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    entry = _read_entry(f, path, st)
            except FileNotFoundError:
                continue  # another process evicted it meanwhile
            except _Corrupt as err:
                self._drop(path, str(err))
                continue
            except _Foreign:
                entry = None
            except OSError as err:
                log.warning("kv cache cannot read %s: %s", path.name, err)
                continue
            out.append(_File(path, st.st_size, st.st_mtime_ns, entry))
        return out

    def _try_load(self, e: Entry, prompt: bytes, prompt_text: str | bytes, restore) -> Hit | None:
        try:
            with open(e.path, "rb") as f:
                # Re-read the header: another process may have replaced the file since the scan.
                cur, text, extra = _read_body(f, e.path)
                if cur.fingerprint != self.fingerprint:
                    return None
                if hashlib.sha1(text).hexdigest() != cur.key or not prompt.startswith(text):
                    raise _Corrupt("text does not match the file name")
                payload = f.read(cur.payload_len)
            if len(payload) != cur.payload_len:
                raise _Corrupt("truncated payload")
            if hashlib.sha256(payload).digest() != cur.payload_sha256:
                raise _Corrupt("payload checksum mismatch")
        except (FileNotFoundError, _Foreign):
            return None
        except _Corrupt as err:
            self._drop(e.path, str(err))
            return None
        except OSError as err:
            log.warning("kv cache cannot read %s: %s", e.path.name, err)
            return None
        if restore is not None:
            try:
                restore(payload)
            except ValueError as err:
                self._drop(e.path, f"restore refused the payload: {err}")
                return None
        consumed = (
            bool(self.options.cold_max_tokens) and cur.n_tokens > self.options.cold_max_tokens
        )
        if consumed:
            # A session this long gets saved again by evict/continued; keeping it wastes budget.
            self.discard(cur.path)
        else:
            self._touch(cur.path)
        suffix = prompt[cur.text_len :]
        log.info("kv cache hit %s tokens=%d consumed=%s", cur.path.name, cur.n_tokens, consumed)
        return Hit(
            cur,
            payload,
            extra,
            suffix.decode() if isinstance(prompt_text, str) else suffix,
            consumed,
        )

    def _identical_exists(self, path: Path, text: bytes, n_tokens: int, extra: bytes) -> bool:
        try:
            with open(path, "rb") as f:
                e, old_text, old_extra = _read_body(f, path)
            same = e.fingerprint == self.fingerprint and e.n_tokens == n_tokens
            return same and (old_text, old_extra) == (text, extra)
        except (OSError, _Corrupt, _Foreign):
            return False  # whatever is there gets replaced atomically

    # -- writing and eviction --

    def _write_atomic(self, path: Path, parts: Sequence) -> None:
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            with open(tmp, "xb") as f:
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(err, OSError):
                raise KVStoreError(f"cannot write KV cache file {path}: {err}") from err
            raise
        self._fsync_dir()
        self._touch(path)

    def _fsync_dir(self) -> None:
        # The rename is durable only once the directory entry is on disk.
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _touch(self, path: Path) -> None:
        # The mtime is the LRU clock; keep it strictly increasing within this process.
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, ns=(self._last_ns, self._last_ns))

    def _evict(self, incoming: int, replacing: Path | None = None, protect: Path | None = None):
        """Delete least recently used files until the directory plus `incoming` fits."""
        files = [f for f in self._scan() if f.path != replacing]
        total = incoming + sum(f.size for f in files)
        for f in sorted(files, key=lambda f: (f.mtime_ns, f.path.name)):
            if total <= self.budget_bytes:
                break
            if f.path == protect:
                continue
            self.discard(f.path)
            total -= f.size
            log.info("kv cache evicted %s (%d bytes)", f.path.name, f.size)

    def _drop(self, path: Path, why: str) -> None:
        log.warning("kv cache removed %s: %s", path.name, why)
        self.discard(path)

    def _clean_temp_files(self) -> None:
        now = time.time()
        for de in os.scandir(self.directory):
            m = _TMP_RE.match(de.name)
            if not m:
                continue
            pid = int(m.group(1))
            try:
                age = now - de.stat().st_mtime
            except FileNotFoundError:
                continue
            if pid != os.getpid() and (not _pid_alive(pid) or age > _STALE_TMP_SECONDS):
                log.info("kv cache removed stale temp file %s", de.name)
                self.discard(de.path)


def _splits_char(data: bytes, n: int) -> bool:
    """True if data[:n] ends inside a UTF-8 character (its suffix would not decode)."""
    return n < len(data) and (data[n] & 0xC0) == 0x80
