"""The one thread that owns the engine session, the prefix-reuse state and the disk KV store.

Jobs arrive in FIFO order from the HTTP handlers; for each, the worker picks the effective
prompt that reuses the most of the live KV (RUNTIME.md §3.3, adapted to a session that can
rewind), syncs it (with progress and cancellation), runs the generation event generator and
records what the next request will need: tool memory, the live binding, disk saves (§4.5).
It knows nothing about HTTP or any wire protocol.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass

from ..engine import common_prefix
from ..kv.store import KVStore, KVStoreError, SaveDecision, SavePolicy
from .common import APIError, Done, Failed, Job, Progress, Started, Usage, context_error
from .generate import generate
from .prompt import segments_from
from .toolmem import ToolMemory

log = logging.getLogger("ds4py.server")


class Cancelled(Exception):
    """The client went away; raised from the prefill progress callback."""


@dataclass
class Binding:
    """What the first `n_tokens` live tokens stand for, beyond their own token text.

    `visible` is how a client that drops hidden reasoning re-renders the finished turn (ending
    with EOS, which the KV does not hold); `call_ids` are the tool calls of that turn.
    """

    n_tokens: int
    call_ids: frozenset[str]
    visible: str | None


@dataclass
class Plan:
    tokens: list[int]  # effective prompt
    source: str  # which rule produced it (for logs and tests)


def text_prefix(tok, tokens: list[int], prompt: bytes) -> tuple[int, int]:
    """Longest (k, nbytes): bytes of tokens[:k] are a prefix of `prompt`, ending on a char."""
    pos, best = 0, (0, 0)
    for i, t in enumerate(tokens):
        b = tok.token_bytes(t)
        if prompt[pos : pos + len(b)] != b:
            break
        pos += len(b)
        if pos == len(prompt) or prompt[pos] & 0xC0 != 0x80:
            best = (i + 1, pos)
    return best


class Worker:
    """Owns `engine.new_session(ctx)`; `submit` jobs from any thread."""

    def __init__(self, engine, ctx: int, toolmem: ToolMemory, store: KVStore | None = None):
        self.engine = engine
        self.tok = engine.tokenizer
        self.session = engine.new_session(ctx)
        self.toolmem = toolmem
        self.store = store
        self.policy = SavePolicy(store.options) if store else None
        self.binding: Binding | None = None
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.busy = False
        self.stopping = threading.Event()
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="ds4py-worker", daemon=True)
        if store is not None:
            self._load_tool_ids()

    @property
    def ctx(self) -> int:
        return self.session.ctx

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self.stopping.is_set():
            job.sink(Failed(APIError(503, "server shutting down", "overloaded_error")))
        else:
            self.jobs.put(job)

    def pending(self) -> int:
        return self.jobs.qsize() + int(self.busy)

    def stop(self, timeout: float = 60.0) -> None:
        """End the running generation, refuse the queued jobs, save the live session (shutdown)."""
        self.stopping.set()
        current = self._current
        if current is not None:
            current.cancel.set()
        self.jobs.put(None)
        self._thread.join(timeout)

    # ---- loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.busy, self._current = True, job
            try:
                self._serve(job)
            finally:
                self.busy, self._current = False, None
        if self.policy is not None:
            self._save(self.policy.shutdown(self.session.pos))

    def _serve(self, job: Job) -> None:
        if self.stopping.is_set():
            job.sink(Failed(APIError(503, "server shutting down", "overloaded_error")))
            return
        if job.cancel.is_set():
            return
        try:
            for ev in self._execute(job):
                job.sink(ev)
        except Cancelled:
            log.info("client went away during prefill; job dropped")
        except APIError as e:
            job.sink(Failed(e))
        except Exception as e:  # the engine failed: report it, start clean, keep serving
            log.exception("generation failed")
            self._reset()
            job.sink(Failed(APIError(500, f"generation failed: {e}", "server_error")))

    def _reset(self) -> None:
        """Forget the live KV after a failure inside the engine (its state is suspect)."""
        try:
            self.session.rewind(0)
        except Exception:
            log.exception("session reset failed; allocating a new session")
            self.session = self.engine.new_session(self.ctx)

    def _execute(self, job: Job):
        plan = self._plan(job)
        self.binding = None  # whatever happens next, the live tokens change
        if len(plan.tokens) >= self.ctx:
            raise context_error(len(plan.tokens), self.ctx, job.param)
        old = list(self.session.tokens)
        cached = common_prefix(old, plan.tokens)
        if self.store is not None:
            if cached < len(old):  # the live KV is about to be cut back: keep it on disk
                self._save(self.policy.evict(len(old)))
            cached = self._disk_lookup(job, plan, cached)
        start = time.monotonic()
        self._prefill(job, plan.tokens, cached)
        usage = Usage(prompt_tokens=len(plan.tokens), cached_tokens=cached)
        t_gen = time.monotonic()
        log.info("%s: prompt %d tokens, %d reused (%s), prefill %.2fs", job.kind,
                 len(plan.tokens), cached, plan.source, t_gen - start)  # fmt: skip
        yield Started(usage)
        for ev in generate(self.session, self.tok, job, usage, self._continued_save):
            if isinstance(ev, Done):
                self._remember(job, ev)
                secs = time.monotonic() - t_gen
                log.info("%s: %d tokens in %.2fs (%.1f t/s), finish %s%s", job.kind,
                         usage.completion_tokens, secs, usage.completion_tokens / max(secs, 1e-9),
                         ev.finish, f" ({ev.error})" if ev.error else "")  # fmt: skip
            yield ev

    # ---- prefix reuse ------------------------------------------------------------------------

    def _plan(self, job: Job) -> Plan:
        """Effective prompt: live tokens for the longest part the request repeats, then text."""
        live, text, eos = self.session.tokens, job.prompt_text, self.tok.eos_id
        b = self.binding
        if b is not None and b.n_tokens <= len(live):
            tail = job.tool_tail
            if tail and tail.call_ids == b.call_ids and text.startswith(tail.head_text):
                rest = self._suffix(job, len(tail.head_text))
                return Plan(live[: b.n_tokens] + [eos] + rest, "tool-output")
            if b.visible and text.startswith(b.visible) and len(text) > len(b.visible):
                rest = self._suffix(job, len(b.visible))
                return Plan(live[: b.n_tokens] + [eos] + rest, "visible")
        same = common_prefix(live, job.prompt_ids)
        if same == len(live):
            return Plan(job.prompt_ids, "memory-token")
        data = text.encode()
        k, nbytes = text_prefix(self.tok, live, data)
        if k > same:
            rest = self._suffix(job, len(data[:nbytes].decode()))
            return Plan(live[:k] + rest, "memory-text")
        return Plan(job.prompt_ids, "prompt")

    def _suffix(self, job: Job, offset: int) -> list[int]:
        """Tokens of the prompt text from character `offset` on (never a slice of the ids)."""
        return self.tok.encode_segments(segments_from(job.segments, offset))

    def _prefill(self, job: Job, tokens: list[int], cached: int) -> None:
        def progress(done: int, total: int) -> None:
            job.sink(Progress(done, total))
            if job.cancel.is_set():
                raise Cancelled()
            self._continued_save()

        if self.policy is not None:
            decision = self.policy.cold(tokens, cached, self.tok.user_id, self.tok.assistant_id)
            if decision is not None and 0 < decision.n_tokens < len(tokens):
                self.session.sync(tokens[: decision.n_tokens], progress)
            if decision is not None:
                self._save(decision)
        self.session.sync(tokens, progress)

    # ---- after a turn ------------------------------------------------------------------------

    def _remember(self, job: Job, done: Done) -> None:
        """Tool memory and the live binding, before the client can send its next request."""
        ids = frozenset(c.id for c in done.tool_calls)
        if done.raw_dsml:
            self.toolmem.put(ids, done.raw_dsml)
        if done.finish in ("stop", "tool_calls") and done.stop_sequence is None:
            visible = job.render_visible(done) if job.render_visible else None
            self.binding = Binding(self.session.pos, ids, visible)
        else:
            self.binding = None

    # ---- disk KV store -----------------------------------------------------------------------

    def _key(self, n: int) -> bytes:
        return b"".join(self.tok.token_bytes(t) for t in self.session.tokens[:n])

    def _continued_save(self) -> None:
        if self.policy is not None:
            self._save(self.policy.continued(self.session.pos))

    def _save(self, decision: SaveDecision | None) -> None:
        if decision is None or self.store is None:
            return
        if decision.n_tokens != self.session.pos:
            self.policy.failed(decision)
            return
        key = self._key(decision.n_tokens)
        try:
            self.store.save(
                key,
                decision.n_tokens,
                self.session.snapshot,
                decision.reason,
                extra=self._tool_extra(key),
            )
            self.policy.saved(decision)
        except (KVStoreError, ValueError, OSError) as e:
            log.warning("kv cache save (%s) failed: %s", decision.reason, e)
            self.policy.failed(decision)

    def _disk_lookup(self, job: Job, plan: Plan, cached: int) -> int:
        """Replace the plan with a disk checkpoint when it covers more than the live KV."""
        if not any(e.n_tokens > cached for e in self.store.entries()):
            return cached
        start = time.monotonic()
        hit = self.store.lookup(job.prompt_text, ctx=self.ctx)
        if hit is None or hit.n_tokens <= cached:
            return cached
        try:
            self.session.restore(hit.payload)
        except ValueError as e:
            log.warning("kv cache file %s unusable: %s", hit.path.name, e)
            self.store.discard(hit.path)
            return common_prefix(self.session.tokens, plan.tokens)
        self.policy.loaded(hit.n_tokens)
        self._load_tool_extra(hit.extra)
        offset = len(job.prompt_text) - len(hit.suffix)
        plan.tokens = self.session.tokens + self._suffix(job, offset)
        plan.source = "disk"
        log.info(
            "kv cache hit %s: %d tokens in %.2fs",
            hit.path.name,
            hit.n_tokens,
            time.monotonic() - start,
        )
        return hit.n_tokens

    def _tool_extra(self, key: bytes) -> bytes:
        """Tool ids whose sampled DSML block is inside this checkpoint's text."""
        text = key.decode("utf-8", errors="ignore")
        blocks: dict[str, list[str]] = {}
        for call_id, block in self.toolmem.items():
            if block in text:
                blocks.setdefault(block, []).append(call_id)
        if not blocks:
            return b""
        return json.dumps([[ids, block] for block, ids in blocks.items()]).encode()

    def _load_tool_extra(self, extra: bytes) -> None:
        if not extra:
            return
        try:
            for ids, block in json.loads(extra):
                self.toolmem.put(ids, block)
        except (ValueError, TypeError):
            log.warning("ignoring a malformed tool-id map in the kv cache")

    def _load_tool_ids(self) -> None:
        for _, extra in self.store.extras():
            self._load_tool_extra(extra)
