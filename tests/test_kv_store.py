"""Disk KV store (ds4py/kv/store.py): format round trip, longest-prefix lookup, faults, budget,
and the ds4 save policy. CPU only, no model: payloads are random bytes."""

import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from ds4py.kv.store import (
    MAGIC,
    SUFFIX,
    KVBudgetError,
    KVStore,
    KVStoreOptions,
    SaveDecision,
    SavePolicy,
)

REPO = Path(__file__).resolve().parents[1]
FP = "ds4py-test-model-v1"
SMALL = KVStoreOptions(min_tokens=1, cold_max_tokens=0)  # no thresholds in the way


def payload_for(text: str, size: int = 4096) -> bytes:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return random.Random(seed).randbytes(size)


def open_store(tmp_path, **kw) -> KVStore:
    kw.setdefault("fingerprint", FP)
    kw.setdefault("options", SMALL)
    return KVStore(tmp_path / "kv", **kw)


def put(store: KVStore, text: str, n_tokens: int = 10, size: int = 4096, **kw) -> Path:
    return store.save(text, n_tokens, payload_for(text, size), kw.pop("reason", "evict"), **kw)


def assert_store_works(store: KVStore) -> None:
    text = f"fresh entry {random.random()}"
    put(store, text)
    hit = store.lookup(text + " and more")
    assert hit is not None and hit.payload == payload_for(text) and hit.suffix == " and more"


def no_temp_files(store: KVStore) -> bool:
    return not [p for p in store.directory.iterdir() if ".tmp." in p.name]


# ---- format and lookup ----------------------------------------------------------------------


def test_round_trip(tmp_path):
    store = open_store(tmp_path)
    text = "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hello"
    path = store.save(text, 17, payload_for(text), "cold", extra=b"tool map")
    assert path.name == hashlib.sha1(text.encode()).hexdigest() + SUFFIX
    assert path.read_bytes()[:8] == MAGIC and path.parent == store.directory
    hit = store.lookup(text + "<｜Assistant｜>")
    assert hit.payload == payload_for(text) and hit.extra == b"tool map"
    assert (hit.n_tokens, hit.text_len, hit.suffix) == (17, len(text.encode()), "<｜Assistant｜>")
    assert (hit.entry.reason, hit.consumed) == ("cold", False)
    assert store.lookup(text).suffix == ""
    # bytes in -> bytes out, and a reopened store sees the same entry
    again = open_store(tmp_path).lookup(text.encode() + b"!")
    assert again.payload == payload_for(text) and again.suffix == b"!"
    assert [e.path for e in store.entries()] == [path]
    assert store.total_bytes() == path.stat().st_size


def test_longest_prefix_wins_and_respects_min_tokens(tmp_path):
    store = open_store(tmp_path)
    texts = {"system": 100, "system+tools": 200, "system+tools+user1": 300, "system+other": 400}
    for text, n in texts.items():
        put(store, text, n)
    prompt = "system+tools+user1+assistant"
    assert store.lookup(prompt).payload == payload_for("system+tools+user1")
    assert store.lookup("system+tools+user2").payload == payload_for("system+tools")
    assert store.lookup("system+oth").payload == payload_for("system")
    assert store.lookup("sys") is None and store.lookup("other") is None
    # entries shorter than min_tokens are never loaded, the next shorter qualifying one is
    strict = open_store(tmp_path, options=KVStoreOptions(min_tokens=150, cold_max_tokens=0))
    assert strict.lookup("system+tools+user1+x").n_tokens == 300
    strict = open_store(tmp_path, options=KVStoreOptions(min_tokens=250, cold_max_tokens=0))
    assert strict.lookup("system+tools+user2") is None


def test_utf8_boundary_and_context_room(tmp_path):
    store = open_store(tmp_path)
    euro = "€".encode()  # 3 bytes: a byte-level BPE frontier may fall inside it
    store.save(b"price: " + euro[:2], 5, payload_for("split"), "evict")
    put(store, "price: ", 4)
    # a str prompt cannot be resumed inside a character: the shorter entry is used
    assert store.lookup("price: €5").n_tokens == 4
    assert store.lookup(b"price: " + euro + b"5").n_tokens == 5
    put(store, "long context entry", 9)
    assert store.lookup("long context entry!", ctx=10).n_tokens == 9
    assert store.lookup("long context entry!", ctx=9) is None  # no room for the next token
    assert store.lookup("long context entry!").n_tokens == 9


def test_foreign_fingerprint_and_version_refused(tmp_path):
    ours = open_store(tmp_path)
    path = put(ours, "shared prefix", 12)
    other = open_store(tmp_path, fingerprint="another-model")
    assert other.lookup("shared prefix and more") is None
    assert other.entries() == [] and path.exists()  # valid for its model: kept
    assert other.total_bytes() == path.stat().st_size  # but it counts toward the budget
    assert ours.lookup("shared prefix and more").n_tokens == 12
    # a sound file of a future format version is skipped and kept too
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[12:16], "little")
    raw[8:10] = (2).to_bytes(2, "little")
    raw[header_len - 4 : header_len] = struct.pack("<I", zlib.crc32(raw[: header_len - 4]))
    path.write_bytes(raw)
    assert ours.lookup("shared prefix and more") is None and path.exists()
    assert ours.entries() == [] and ours.total_bytes() == len(raw)


# ---- faults ---------------------------------------------------------------------------------


@pytest.fixture
def damaged(tmp_path):
    """A store with a good short entry and a long entry the test then damages."""
    store = open_store(tmp_path)
    put(store, "prefix", 5)
    path = put(store, "prefix plus a longer conversation", 20, size=8192, extra=b"ids")
    return store, path, path.read_bytes()


def check_damage_handled(store, path):
    hit = store.lookup("prefix plus a longer conversation, continued")
    assert hit is not None and hit.payload == payload_for("prefix")  # fell back, never loaded
    assert not path.exists()  # removed on sight
    assert_store_works(store)


@pytest.mark.parametrize("keep", [0, 5, 8, 60, 130, 140, 200, 4000, -1])
def test_truncated_file_skipped_and_removed(damaged, keep):
    store, path, raw = damaged
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    check_damage_handled(store, path)


def test_appended_garbage_skipped_and_removed(damaged):
    store, path, raw = damaged
    path.write_bytes(raw + b"\0")
    check_damage_handled(store, path)


def byte_offsets(raw: bytes) -> dict[str, int]:
    header_len = int.from_bytes(raw[12:16], "little")
    text_len = int.from_bytes(raw[40:48], "little")
    extra_len = int.from_bytes(raw[48:56], "little")
    body = header_len + text_len + extra_len
    return {
        "magic": 0,
        "version": 8,
        "header_len": 13,
        "n_tokens": 16,
        "reserved": 21,
        "payload_len": 57,
        "payload_sha": 70,
        "text_crc": 97,
        "fingerprint": 110,
        "header_crc": header_len - 1,
        "text": header_len + 3,
        "extra": header_len + text_len + 1,
        "payload_first": body,
        "payload_mid": (body + len(raw)) // 2,
        "payload_last": len(raw) - 1,
    }


FIELDS = ["magic", "version", "header_len", "n_tokens", "reserved", "payload_len", "payload_sha",
          "text_crc", "fingerprint", "header_crc", "text", "extra", "payload_first",
          "payload_mid", "payload_last"]  # fmt: skip


@pytest.mark.parametrize("field", FIELDS)
def test_flipped_byte_skipped_and_removed(damaged, field):
    store, path, raw = damaged
    at = byte_offsets(raw)[field]
    bad = bytearray(raw)
    bad[at] ^= 0x10
    path.write_bytes(bad)
    check_damage_handled(store, path)


def test_restore_rejection_falls_back(damaged):
    store, path, _ = damaged

    def restore(payload: bytes) -> None:
        if payload != payload_for("prefix"):
            raise ValueError("payload layout differs")

    hit = store.lookup("prefix plus a longer conversation!", restore=restore)
    assert hit.payload == payload_for("prefix") and not path.exists()


@pytest.mark.parametrize("point", ["mid-write", "before-rename"])
def test_sigkill_during_save_leaves_nothing_loadable(tmp_path, point):
    store = open_store(tmp_path)
    text = "a long agent session"
    old = put(store, text, 10)  # an older snapshot under the same key must survive
    child = subprocess.Popen(
        [sys.executable, str(REPO / "tests/helpers/kv_writer.py"), str(store.directory), FP,
         text, "600", str(8 << 20), "7", point],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = child.stdout.readline()
        assert line.strip() == "FROZEN", child.stderr.read()
        temps = [p for p in store.directory.iterdir() if ".tmp." in p.name]
        assert len(temps) == 1
        written = temps[0].stat().st_size
        assert (0 < written < (8 << 20)) if point == "mid-write" else written > (8 << 20)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    hit = store.lookup(text + "...")  # the killed writer is invisible: the old file is intact
    assert hit.n_tokens == 10 and hit.payload == payload_for(text) and old.exists()
    reopened = open_store(tmp_path)  # open cleans the dead writer's temp file
    assert no_temp_files(reopened)
    assert reopened.lookup(text + "...").payload == payload_for(text)
    assert_store_works(reopened)


def test_temp_file_cleanup_rules(tmp_path):
    store = open_store(tmp_path)
    key = "0" * 40 + SUFFIX
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {
            "dead": f"{key}.tmp.{dead.pid}.ab12",
            "live": f"{key}.tmp.{sleeper.pid}.cd34",
            "stale": f"{key}.tmp.{sleeper.pid}.ef56",
        }
        for name in names.values():
            (store.directory / name).write_bytes(b"partial")
        two_hours_ago = time.time() - 7200
        os.utime(store.directory / names["stale"], (two_hours_ago, two_hours_ago))
        open_store(tmp_path)
        left = {p.name for p in store.directory.iterdir()}
        assert left == {names["live"]}  # a live writer's fresh temp file is left alone
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- budget ---------------------------------------------------------------------------------


def test_budget_evicts_least_recently_used(tmp_path):
    size = put(open_store(tmp_path / "probe"), "a", 10, size=10_000).stat().st_size
    store = open_store(tmp_path, budget_bytes=int(size * 4.5))
    paths = {t: put(store, t, 10, size=10_000) for t in "ABCD"}
    assert store.lookup("A...") is not None  # A becomes the most recently used
    paths["E"] = put(store, "E", 10, size=10_000)
    assert not paths["B"].exists() and paths["A"].exists()
    paths["F"] = put(store, "F", 10, size=10_000)
    assert not paths["C"].exists()
    assert [e.path for e in store.entries()] == [paths[t] for t in "FEAD"]
    assert store.total_bytes() == 4 * size


def test_budget_holds_under_many_saves(tmp_path, monkeypatch):
    budget = 200_000
    store = open_store(tmp_path, budget_bytes=budget)
    rename = os.replace

    def checked_rename(src, dst):  # room is made before writing: even the peak fits
        assert sum(p.stat().st_size for p in store.directory.iterdir()) <= budget
        rename(src, dst)

    monkeypatch.setattr(os, "replace", checked_rename)
    rng = random.Random(0)
    for i in range(60):
        put(store, f"session {i}", 10, size=rng.randrange(1_000, 60_000))
        assert store.total_bytes() <= budget
        if i % 3 == 0:
            store.lookup(f"session {rng.randrange(i + 1)} more")
    # the last file written is always kept
    hit = store.lookup("session 59 and on")
    assert hit.payload == payload_for("session 59", len(hit.payload))
    assert_store_works(store)


def test_oversized_file_refused_clearly(tmp_path):
    store = open_store(tmp_path, budget_bytes=50_000)
    keep = put(store, "small", 10, size=1_000)
    with pytest.raises(KVBudgetError, match="disk budget of 50000 bytes"):
        put(store, "huge", 10, size=60_000)
    with pytest.raises(KVBudgetError):  # within the budget, but not with 1 % slack
        put(store, "edge", 10, size=49_800)
    assert keep.exists() and store.lookup("huge!") is None and no_temp_files(store)
    assert_store_works(store)


def test_identical_save_skips_snapshot(tmp_path):
    store = open_store(tmp_path)
    calls = []

    def snapshot() -> bytes:
        calls.append(1)
        return payload_for("same")

    p1 = store.save("same", 10, snapshot, "continued")
    p2 = store.save("same", 10, snapshot, "evict")
    assert p1 == p2 and len(calls) == 1
    store.save("same", 10, snapshot, "continued", extra=b"new tool ids")
    assert len(calls) == 2 and store.lookup("same").extra == b"new tool ids"
    store.save("same", 11, snapshot, "continued")  # different token count: rewritten
    assert len(calls) == 3 and store.lookup("same").n_tokens == 11
    assert [extra for _, extra in store.extras()] == []
    store.save("other", 10, b"x", "evict", extra=b"ids")
    assert [extra for _, extra in store.extras()] == [b"ids"]


def test_consumed_above_cold_max(tmp_path):
    store = open_store(tmp_path, options=KVStoreOptions(min_tokens=1, cold_max_tokens=100))
    big, small = put(store, "big session", 101), put(store, "small", 100)
    hit = store.lookup("big session, next turn")
    assert hit.consumed and not big.exists()
    assert not store.lookup("small!").consumed and small.exists()


def test_concurrent_stores_share_a_directory(tmp_path):
    a = open_store(tmp_path, budget_bytes=60_000)
    b = open_store(tmp_path, budget_bytes=60_000)
    errors, hits = [], []
    stop = time.monotonic() + 1.0

    def guarded(fn):
        def run():
            try:
                fn()
            except Exception as err:  # any failure in a thread fails the test below
                errors.append(err)

        return threading.Thread(target=run)

    def writer(store, seed):
        rng = random.Random(seed)
        while time.monotonic() < stop:
            put(store, f"k{rng.randrange(12)}", 10, size=4 * rng.randrange(500, 5_000))

    def reader(store):
        rng = random.Random(99)
        while time.monotonic() < stop:
            prompt = f"k{rng.randrange(12)} tail"
            hit = store.lookup(prompt)
            if hit is not None:
                hits.append((prompt, hit))

    threads = [
        guarded(lambda: writer(a, 1)),
        guarded(lambda: writer(b, 2)),
        guarded(lambda: reader(b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert hits
    for prompt, hit in hits:  # every hit is exactly what some writer saved under that text
        text = prompt[: hit.text_len]
        assert hit.suffix == prompt[hit.text_len :]
        assert hit.payload == payload_for(text, len(hit.payload))
    assert no_temp_files(a) and a.total_bytes() <= 60_000


# ---- arguments ------------------------------------------------------------------------------


def test_bad_arguments_get_clear_errors(tmp_path):
    store = open_store(tmp_path, options=KVStoreOptions())
    with pytest.raises(ValueError, match="below min_tokens=512"):
        store.save("x", 511, b"p", "evict")
    with pytest.raises(ValueError, match="reason must be one of"):
        store.save("x", 600, b"p", "because")
    with pytest.raises(ValueError, match="text must not be empty"):
        store.save("", 600, b"p", "evict")
    with pytest.raises(ValueError, match="payload must be bytes"):
        store.save("x", 600, lambda: "not bytes", "evict")
    with pytest.raises(ValueError, match="not encodable"):
        store.save("\ud800", 600, b"p", "evict")
    with pytest.raises(ValueError, match="cold_max_tokens must be 0 or >= min_tokens"):
        KVStoreOptions(min_tokens=512, cold_max_tokens=100)
    with pytest.raises(ValueError, match="boundary_trim_tokens must be an int >= 0"):
        KVStoreOptions(boundary_trim_tokens=-1)
    with pytest.raises(ValueError, match="fingerprint"):
        KVStore(tmp_path / "kv", fingerprint="")
    with pytest.raises(ValueError, match="budget_bytes"):
        KVStore(tmp_path / "kv", fingerprint=FP, budget_bytes=0)
    assert store.entries() == []


# ---- save policy (RUNTIME.md §4.5) ----------------------------------------------------------

USER, ASSISTANT = 128803, 128804  # any two ids; the policy only compares them


def test_policy_defaults_and_store_len():
    p = SavePolicy()
    assert p.options == KVStoreOptions(512, 30000, 10000, 32, 2048)
    assert p.continued_step == 10240  # 10000 rounded up to a multiple of 2048
    assert SavePolicy(KVStoreOptions(boundary_align_tokens=0)).continued_step == 10000
    assert SavePolicy(KVStoreOptions(continued_interval_tokens=0)).continued_step == 0
    # n > min + trim: trim 32, floor to 2048, keep if >= min; otherwise store everything
    cases = {544: 544, 545: 545, 2080: 2048, 2079: 2079, 5000: 4096, 30000: 28672, 600: 600}
    for n, want in cases.items():
        assert p.store_len(n) == want, n
    unaligned = SavePolicy(KVStoreOptions(boundary_align_tokens=0))
    assert unaligned.store_len(1000) == 968 and unaligned.store_len(544) == 544


def test_policy_chat_anchor():
    p = SavePolicy()
    system = [1] * 600
    prompt = system + [USER] + [2] * 50 + [USER] + [3] * 40 + [ASSISTANT] + [USER] + [4] * 10
    assert p.chat_anchor(prompt, USER, ASSISTANT) == 651  # last USER before the ASSISTANT
    assert p.chat_anchor([1] * 100 + [USER] + [2] * 900, USER, ASSISTANT) == -1  # below min
    assert p.chat_anchor([1] * 900, USER, ASSISTANT) == -1
    d = p.cold(prompt, cached=0, user_id=USER, assistant_id=ASSISTANT)
    assert d == SaveDecision(651, "cold")
    no_ids = p.cold(prompt, cached=0)  # without marker ids: trim + align
    assert no_ids.n_tokens == p.store_len(len(prompt)) == len(prompt)


def test_policy_cold_conditions():
    p = SavePolicy()
    assert p.cold([0] * 5000, cached=0) == SaveDecision(4096, "cold")
    assert p.cold([0] * 5000, cached=100) is None  # reused something: not cold
    assert p.cold([0] * 511, cached=0) is None
    assert p.cold([0] * 512, cached=0).n_tokens == 512
    assert p.cold([0] * 30000, cached=0).n_tokens == 28672
    assert p.cold([0] * 30001, cached=0) is None  # above cold_max
    assert SavePolicy(KVStoreOptions(cold_max_tokens=0)).cold([0] * 5000, cached=0) is None


def test_policy_cold_suppresses_continued_at_same_frontier():
    p = SavePolicy(KVStoreOptions(cold_max_tokens=40000))
    d = p.cold([0] * 20520, cached=0)
    assert d.n_tokens == 20480 and p.last_stored == 20480  # a continued frontier: suppressed
    assert p.continued(20480) is None
    p.failed(d)  # the cold save failed: the continued save may retry there
    assert p.last_stored == 0 and p.continued(20480) == SaveDecision(20480, "continued")
    d = p.cold([0] * 5000, cached=0)  # 4096 is not a continued frontier: nothing suppressed
    assert d.undo_frontier == -1 and p.last_stored == 0
    p.failed(d)
    assert p.last_stored == 0


def test_policy_continued_schedule():
    p = SavePolicy()
    saves = []
    for live in range(1, 45000):
        d = p.continued(live)
        if d:
            saves.append(d.n_tokens)
            p.saved(d)
    assert saves == [10240, 20480, 30720, 40960]
    assert p.continued(40960) is None  # already stored
    p.loaded(20480)  # a disk hit moves the frontier to the loaded length
    assert p.continued(20480) is None and p.continued(30720) is not None
    small = SavePolicy(KVStoreOptions(min_tokens=4096, continued_interval_tokens=1000))
    assert [n for n in range(1, 9000) if small.continued(n)] == [4096, 6144, 8192]
    off = SavePolicy(KVStoreOptions(continued_interval_tokens=0))
    assert not any(off.continued(n) for n in range(0, 30000, 512))


def test_policy_evict_and_shutdown():
    p = SavePolicy()
    p.saved(p.continued(10240))
    assert p.evict(700) == SaveDecision(700, "evict")  # whole live session, no trim
    assert p.last_stored == 0  # a miss restarts the continued schedule
    assert p.evict(511) is None and p.evict(0) is None
    assert p.shutdown(512) == SaveDecision(512, "shutdown") and p.shutdown(100) is None
