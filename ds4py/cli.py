"""Command line: `ds4py run|chat|tokens|logprobs|test-vectors|serve|bench|convert|synth`.

Owns argument parsing, opening the model (or the `--demo` model) with a helpful error, the
terminal generation loop (streamed answer, dimmed thinking, Ctrl-C, tokens/s), the interactive
chat (a token-level transcript over one live session) and the printing of vector results.
Does not own the engine, tokenizer, template, sampler or server: serve/bench/convert/synth only
dispatch to their modules, imported when chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ds4py import vectors
from ds4py.chat import (
    THINK_MAX_MIN_CTX,
    ContentDelta,
    MalformedDsml,
    ReasoningDelta,
    ReasoningEnd,
    StreamParser,
    ToolCallEnd,
    render_ids,
)
from ds4py.engine import common_prefix
from ds4py.tokenizer import BOS

DEFAULT_MODEL = "ds4flash.gguf"
DEFAULT_SYSTEM = "You are a helpful assistant"
DEFAULT_CTX = 32768
HF_REPO = "antirez/deepseek-v4-gguf"
HF_FILES = (  # MODEL.md §5.1
    ("q2, 81 GiB, recommended",
     "DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2-imatrix.gguf"),
    ("q4, 153 GiB",
     "DeepSeek-V4-Flash-Q4KExperts-F16HC-F16Compressor-F16Indexer-Q8Attn-Q8Shared-Q8Out"
     "-chat-v2-imatrix.gguf"),
)  # fmt: skip
HISTORY_FILE = "~/.ds4py_history"
SNAPSHOT_MAGIC = b"DS4PY-CHAT\x00"
DIM, RESET = "\x1b[2m", "\x1b[0m"


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status `code`, no traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ---- Arguments ----------------------------------------------------------------------------------


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=DEFAULT_MODEL, help="GGUF file (default %(default)s)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default %(default)s)")
    g.add_argument("--demo", action="store_true", help="tiny random-weight model, real tokenizer")


def _prompt_flags(p: argparse.ArgumentParser, one_shot: bool) -> None:
    g = p.add_argument_group("prompt")
    if one_shot:
        src = g.add_mutually_exclusive_group()
        src.add_argument(
            "-p",
            "--prompt",
            help="prompt text (a text starting with BOS is used as an already rendered prompt)",
        )
        src.add_argument("--prompt-file", help="read the prompt from a file")
    g.add_argument(
        "-sys",
        "--system",
        default=DEFAULT_SYSTEM,
        help='system prompt (default "%(default)s"; "" for none)',
    )
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--think", dest="think", action="store_const", const="high", help="thinking mode (default)"
    )
    mode.add_argument(
        "--think-max",
        dest="think",
        action="store_const",
        const="max",
        help=f"Think Max (needs --ctx >= {THINK_MAX_MIN_CTX}, else plain thinking)",
    )
    mode.add_argument(
        "--nothink",
        dest="think",
        action="store_const",
        const="none",
        help="answer without thinking",
    )
    g.add_argument(
        "-c",
        "--ctx",
        type=int,
        default=DEFAULT_CTX,
        help="context size in tokens (default %(default)s)",
    )
    p.set_defaults(think="high")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temp", type=float, default=1.0, help="temperature, <= 0 is greedy (1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k best tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.05, help="min prob relative to best (0.05)")
    g.add_argument("--seed", type=int, default=None, help="RNG seed (default: random)")
    g.add_argument(
        "-n",
        "--tokens",
        type=int,
        default=50000,
        help="max generated tokens per answer (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ds4py", description="DeepSeek V4 Flash inference (ds4 GGUF files)."
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="answer one prompt and exit (streams the answer)")
    _model_flags(p), _prompt_flags(p, one_shot=True), _sampling_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive multi-turn chat on one live session")
    _model_flags(p), _prompt_flags(p, one_shot=False), _sampling_flags(p)
    p.add_argument("--history", default=HISTORY_FILE, help="line history file (%(default)s)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("tokens", help="tokenize text as written (specials recognized)")
    p.add_argument("text", nargs="?", help="text to tokenize")
    p.add_argument("--prompt-file", help="tokenize a file instead")
    _model_flags(p)
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("logprobs", help="greedy top-k logprob dump in ds4's --dump-logprobs format")
    _model_flags(p), _prompt_flags(p, one_shot=True)
    p.add_argument("-n", "--tokens", type=int, default=50000, help="max greedy steps")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--top-k", type=int, default=20, help="alternatives per step, max 128 (20)")
    p.set_defaults(func=cmd_logprobs)

    p = sub.add_parser(
        "test-vectors", help="compare a model with the official DeepSeek API vectors"
    )
    _model_flags(p)
    p.add_argument("--case", action="append", help="only this case (repeatable)")
    p.add_argument("--all", action="store_true", help="include cases ds4 skips")
    p.add_argument(
        "--tokenize-only",
        action="store_true",
        help="check only the tokenization (loads no weights with -m)",
    )
    p.add_argument("--dump-dir", help="write our ds4-format dump of each case here")
    p.set_defaults(func=cmd_test_vectors)

    p = sub.add_parser("serve", help="OpenAI/Anthropic compatible HTTP server")
    from ds4py.server.options import add_arguments  # flags only: no server imports yet

    add_arguments(p)
    p.set_defaults(func=_dispatch("ds4py.server.app", "serve"))

    p = sub.add_parser(
        "bench", help="prefill/generation throughput at context frontiers (ds4-bench)"
    )
    _model_flags(p), _bench_flags(p)
    p.set_defaults(func=_dispatch("ds4py.bench", "main"))

    for name, text in (
        ("convert", "convert a checkpoint directory to GGUF"),
        ("synth", "write a synthetic GGUF (random weights, real tokenizer)"),
    ):
        # these parse their own flags: everything after the subcommand goes to ds4py.<name>.main
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(func=_dispatch(f"ds4py.{name}", "main", pass_argv=True), passthrough=True)
    return ap


def _bench_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt-file", help="plain text, tokenized without a template "
                     "(default: a bundled text)")  # fmt: skip
    src.add_argument("--chat-prompt-file", help="rendered as one non-thinking chat turn")
    p.add_argument(
        "-sys",
        "--system",
        default="You are a helpful assistant.",
        help="system prompt of --chat-prompt-file (%(default)s)",
    )
    p.add_argument("--ctx-start", type=int, default=2048, help="first frontier (%(default)s)")
    p.add_argument("--ctx-max", type=int, default=32768, help="last frontier (%(default)s)")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--step-incr", type=int, default=2048, help="frontier step (%(default)s)")
    step.add_argument("--step-mul", type=float, default=None, help="or multiply each frontier")
    p.add_argument("--ctx-alloc", type=int, default=None, help="default ctx-max + gen + 1")
    p.add_argument(
        "-n",
        "--gen-tokens",
        type=int,
        default=128,
        help="greedy tokens timed per frontier (%(default)s)",
    )
    p.add_argument("--csv", help="write the CSV here (default stdout)")
    p.add_argument("--plot", metavar="CSV", help="render a PNG from a bench CSV and exit")


def _dispatch(
    module: str, func: str, pass_argv: bool = False
) -> Callable[[argparse.Namespace], int]:
    """Call `module.func(args)` (or with the remaining argv), importing it only when chosen."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        try:
            target = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as e:
            raise CliError(f"{module}.{func} is not available in this build ({e})") from None
        rc = target(args.argv if pass_argv else args)
        return int(rc or 0)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.argv = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except CliError as e:
        print(f"ds4py: {e}", file=sys.stderr)
        return e.code
    except (ValueError, OSError) as e:  # bad input or files: one line, no traceback
        print(f"ds4py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


# ---- Model --------------------------------------------------------------------------------------


def missing_model_message(path: str) -> str:
    files = "\n".join(f"    {name}   ({what})" for what, name in HF_FILES)
    return (
        f"model file not found: {path}\n"
        f"  Download a GGUF from the Hugging Face repo {HF_REPO}, e.g.:\n{files}\n"
        f"  hf download {HF_REPO} {HF_FILES[0][1]} --local-dir .\n"
        f"  then pass it with -m FILE (default ./{DEFAULT_MODEL}),\n"
        f"  or try the CLI without weights: add --demo (tiny random model, real tokenizer)."
    )


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def open_engine(args: argparse.Namespace) -> Any:
    from ds4py import Engine

    device = _device(args.device)
    if args.demo:
        with _status(f"loading the demo model on {device}"):
            return Engine.demo(device=device, seed=0)
    if not Path(args.model).is_file():
        raise CliError(missing_model_message(args.model), code=2)
    # Engine.open reports no progress yet: a spinner rather than a bar
    with _status(f"loading {args.model} on {device}"):
        return Engine.open(args.model, device=device)


def open_tokenizer(args: argparse.Namespace) -> Any:
    """The vocabulary alone: from the GGUF metadata (no weights), or the bundled one."""
    from ds4py.gguf import GGUFFile
    from ds4py.tokenizer import Tokenizer

    if args.demo:
        return Tokenizer.default()  # the demo model carries the official vocabulary
    if not Path(args.model).is_file():
        raise CliError(missing_model_message(args.model), code=2)
    md = GGUFFile(args.model).metadata
    tokens, merges = md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.merges")
    if not tokens:
        raise CliError(f"{args.model} has no tokenizer (tokenizer.ggml.tokens)")
    types = md.get("tokenizer.ggml.token_type")  # built as Engine.tokenizer builds it
    return Tokenizer.from_vocab(list(tokens), list(merges or []), list(types) if types else None)


class _status:
    """A rich spinner on a terminal stderr; silent otherwise."""

    def __init__(self, text: str) -> None:
        self.text, self.ctx = text, None

    def __enter__(self) -> _status:
        if sys.stderr.isatty():
            from rich.console import Console

            self.ctx = Console(stderr=True).status(self.text)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# ---- Prompts ------------------------------------------------------------------------------------


def effective_mode(mode: str, ctx: int) -> str:
    """Think Max needs a big context; below it ds4 (and we) fall back to plain thinking."""
    return "high" if mode == "max" and ctx < THINK_MAX_MIN_CTX else mode


def warn_think_max(args: argparse.Namespace) -> None:
    if effective_mode(args.think, args.ctx) != args.think:
        print(f"ds4py: --think-max needs --ctx >= {THINK_MAX_MIN_CTX}; using normal thinking",
              file=sys.stderr)  # fmt: skip


def _render(tok: Any, messages: list[dict], mode: str, ctx: int) -> list[int]:
    effort = "max" if mode == "max" else None
    return render_ids(messages, tok, thinking=mode != "none", effort=effort, ctx=ctx)


def header_ids(tok: Any, system: str, mode: str, ctx: int) -> list[int]:
    """BOS, the Think-Max prefix (mode "max" and a big ctx), the system text."""
    return _render(tok, [{"role": "system", "content": system}], mode, ctx)


def user_turn_ids(tok: Any, text: str, mode: str) -> list[int]:
    """USER text ASSISTANT <think> (or </think>): one user turn and the assistant opener, as the
    template renders it after the header. User text is plain BPE: a typed `<think>` stays text."""
    ids = _render(tok, [{"role": "user", "content": text}], "none" if mode == "none" else "high", 0)
    return ids[1:]  # the renderer starts every prompt with BOS; the header already has it


def prompt_ids(tok: Any, args: argparse.Namespace, text: str) -> list[int]:
    """The one-shot prompt: an already rendered text (starts with BOS) is tokenized as is."""
    if text.startswith(BOS):
        return tok.encode(text)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return _render(tok, [*messages, {"role": "user", "content": text}], args.think, args.ctx)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    if not sys.stdin.isatty():
        return sys.stdin.read()
    raise CliError("no prompt: pass -p TEXT, --prompt-file FILE or pipe the text in", code=2)


def sampler_for(args: argparse.Namespace) -> Any:
    from ds4py.sample import Sampler, SamplingParams

    params = SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, seed=args.seed)  # fmt: skip
    return Sampler(params)


# ---- Generation ---------------------------------------------------------------------------------


class Interrupt:
    """Ctrl-C during generation sets a flag that the loop checks between tokens (and the prefill
    between chunks), so the session is never left half-updated. A second Ctrl-C raises
    KeyboardInterrupt at once (a prefill chunk can take long on a CPU). Main thread only."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> Interrupt:
        self.hit = False
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class _PrefillInterrupted(Exception):
    pass


@dataclass
class Turn:
    """What one generation produced, and how fast."""

    tokens: list[int] = field(default_factory=list)  # generated and evaluated (EOS excluded)
    prefill_tokens: int = 0  # tokens actually evaluated by sync (the new suffix)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    interrupted: bool = False

    def stats(self) -> str:
        pre = self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0
        gen = len(self.tokens) / self.decode_s if self.decode_s > 0 else 0.0
        return (f"prefill {self.prefill_tokens} tokens, {pre:.2f} t/s; "
                f"generation {len(self.tokens)} tokens, {gen:.2f} t/s")  # fmt: skip


class Printer:
    """Prints stream events. On a terminal the reasoning is dimmed and followed by a blank line;
    in a pipe the raw `<think>…</think>` markers are kept so that scripts can split it off."""

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out, self.color = out, color
        self.in_reasoning = False
        self.line_start = True

    def event(self, ev: Any) -> None:
        if isinstance(ev, ReasoningDelta):
            if not self.in_reasoning:
                self.in_reasoning = True
                self._mark(DIM if self.color else "<think>")
            self._text(ev.text)
        elif isinstance(ev, ReasoningEnd):
            self.end_reasoning()
        elif isinstance(ev, (ContentDelta, MalformedDsml)):
            self._text(ev.text)
        elif isinstance(ev, ToolCallEnd):
            self._text(f"\n[tool call {ev.name} {json.dumps(ev.arguments, ensure_ascii=False)}]\n")

    def end_reasoning(self) -> None:
        if self.in_reasoning and self.color:
            self._mark(RESET)
            self._text("\n" if self.line_start else "\n\n")  # one blank line after it
        elif self.in_reasoning:
            self._mark("</think>")
        self.in_reasoning = False

    def finish(self) -> None:
        if self.in_reasoning and self.color:
            self._mark(RESET)
        if not self.line_start:
            self._text("\n")
        self.out.flush()

    def _mark(self, text: str) -> None:
        self.out.write(text)

    def _text(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.line_start = text.endswith("\n")


def generate(
    sess: Any,
    ids: list[int],
    tok: Any,
    sampler: Any,
    max_tokens: int,
    on_event: Callable[[Any], None],
    stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int, int], None] | None = None,
) -> Turn:
    """sync the prompt, then sample/stream/eval until EOS, the token limit or `stop()`.

    EOS is never evaluated. Every token in the returned Turn has been evaluated, so after an
    interruption the session holds exactly prompt + Turn.tokens. `on_event` gets the chat
    stream parser's events (reasoning first when the prompt ends with `<think>`).
    """

    turn = Turn()
    cached = common_prefix(sess.tokens, ids)
    turn.prefill_tokens = len(ids) - cached

    def on_chunk(done: int, total: int) -> None:
        if progress:
            progress(done, total)
        if stop():
            raise _PrefillInterrupted

    t0 = time.perf_counter()
    try:
        logits = sess.sync(ids, on_chunk)
    except _PrefillInterrupted:
        turn.interrupted, turn.prefill_s = True, time.perf_counter() - t0
        return turn
    t1 = time.perf_counter()
    turn.prefill_s = t1 - t0
    limit = max(0, min(max_tokens, sess.ctx - len(ids) - 1))
    parser = StreamParser(thinking=ids[-1] == tok.think_id)
    while len(turn.tokens) < limit:
        if stop():
            turn.interrupted = True
            break
        token = sampler.sample(logits)
        if token == tok.eos_id:
            break
        for ev in parser.feed(tok.token_bytes(token)):  # the parser holds split UTF-8 / tags
            on_event(ev)
        logits = sess.eval(token)
        turn.tokens.append(token)
    for ev in parser.finish():
        on_event(ev)
    turn.decode_s = time.perf_counter() - t1
    return turn


class PrefillBar:
    """A transient rich progress bar on a terminal stderr, from the first chunk report to the
    last (the engine reports only prefills longer than one chunk)."""

    def __init__(self, label: str = "prefill") -> None:
        self.label, self.progress, self.task = label, None, None

    def __call__(self, done: int, total: int) -> None:
        if not sys.stderr.isatty() or total <= 0:
            return
        if self.progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.progress = Progress(
                f"[dim]{self.label}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=total)
        self.progress.update(self.task, completed=done, total=total)
        if done >= total:  # gone before the answer streams
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _print_stats(turn: Turn) -> None:
    color = sys.stderr.isatty()
    line = f"ds4py: {turn.stats()}" + (" (interrupted)" if turn.interrupted else "")
    print(f"{DIM}{line}{RESET}" if color else line, file=sys.stderr)


def _run_turn(sess: Any, ids: list[int], tok: Any, sampler: Any, max_tokens: int) -> Turn:
    printer = Printer(sys.stdout, sys.stdout.isatty())
    bar = PrefillBar()
    with Interrupt() as ctrl_c:
        try:
            turn = generate(sess, ids, tok, sampler, max_tokens, printer.event,
                            stop=lambda: ctrl_c.hit, progress=bar)  # fmt: skip
        finally:
            bar.close()
            printer.finish()
    _print_stats(turn)
    return turn


# ---- run ----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    text = read_prompt(args)
    warn_think_max(args)
    sampler = sampler_for(args)
    eng = open_engine(args)
    tok = eng.tokenizer
    ids = prompt_ids(tok, args, text)
    sess = eng.new_session(ctx=args.ctx)
    turn = _run_turn(sess, ids, tok, sampler, args.tokens)
    return 130 if turn.interrupted else 0


# ---- chat ---------------------------------------------------------------------------------------

HELP = """Commands:
  /help          show this help
  /think         thinking mode (default)
  /think-max     Think Max (only with /ctx >= 393216, else plain thinking)
  /nothink       answer without thinking
  /ctx N         new context size (the transcript is kept; the next turn re-prefills)
  /read FILE     send the contents of FILE as the next message
  /save FILE     save the chat (transcript + session KV) to FILE
  /load FILE     restore a chat saved with /save
  /quit, /exit   leave
  Ctrl+C         stop the answer and return to the prompt"""


class Chat:
    """The REPL state: a token-level transcript and the one live session that mirrors it.

    transcript = header (BOS, Think-Max prefix, system) + turns. Each turn appends
    USER text ASSISTANT opener + the generated tokens (reasoning kept) + EOS, so the next
    turn's sync only prefills the new text. EOS is appended unevaluated; the next sync
    evaluates it with the new user turn.
    """

    def __init__(self, engine: Any, args: argparse.Namespace) -> None:
        self.engine, self.tok, self.args = engine, engine.tokenizer, args
        self.mode, self.system, self.ctx = args.think, args.system, args.ctx
        self.sampler = sampler_for(args)
        self.turns: list[int] = []
        self.sess = engine.new_session(ctx=self.ctx)

    @property
    def transcript(self) -> list[int]:
        return self.header() + self.turns

    def header(self) -> list[int]:
        return header_ids(self.tok, self.system, self.mode, self.ctx)

    def send(self, text: str) -> Turn | None:
        turn_ids = user_turn_ids(self.tok, text, self.mode)
        ids = self.transcript + turn_ids
        try:
            turn = _run_turn(self.sess, ids, self.tok, self.sampler, self.args.tokens)
        except KeyboardInterrupt:
            # a second Ctrl-C may have stopped the engine mid-step: start a clean session
            self.sess = self.engine.new_session(ctx=self.ctx)
            print("\nds4py: aborted; the next turn re-prefills the chat", file=sys.stderr)
            return None
        if turn.interrupted and not turn.tokens:
            # interrupted before the first token: drop the message, also from the session
            self.sess.rewind(common_prefix(self.sess.tokens, self.transcript))
        else:
            self.turns += turn_ids + turn.tokens + [self.tok.eos_id]
        return turn

    def set_ctx(self, ctx: int) -> None:
        if ctx <= len(self.transcript) + 1:
            raise CliError(
                f"/ctx {ctx} is too small for the {len(self.transcript)}-token transcript"
            )
        self.sess = self.engine.new_session(ctx=ctx)
        self.ctx = ctx

    # A snapshot file: magic, u32 header length, JSON header, then the engine's session payload.
    def save(self, path: str) -> int:
        head = json.dumps({
            "version": 1, "mode": self.mode, "system": self.system, "ctx": self.ctx,
            "turns": self.turns, "n_vocab": self.tok.vocab_size,
        }).encode()  # fmt: skip
        payload = self.sess.snapshot()
        data = SNAPSHOT_MAGIC + struct.pack("<I", len(head)) + head + payload
        Path(path).write_bytes(data)
        return len(data)

    def load(self, path: str) -> None:
        """Replace the chat with a saved one; on any error the current chat is unchanged."""
        data = Path(path).read_bytes()
        n = len(SNAPSHOT_MAGIC)
        if data[:n] != SNAPSHOT_MAGIC or len(data) < n + 4:
            raise CliError(f"{path}: not a ds4py chat snapshot")
        (size,) = struct.unpack_from("<I", data, n)
        try:
            head = json.loads(data[n + 4 : n + 4 + size])
            mode, system, ctx = str(head["mode"]), str(head["system"]), int(head["ctx"])
            turns = [int(t) for t in head["turns"]]
            ok = head["version"] == 1 and head["n_vocab"] == self.tok.vocab_size
        except (ValueError, KeyError, TypeError) as e:
            raise CliError(f"{path}: damaged chat snapshot ({e})") from None
        if not ok or mode not in ("high", "max", "none"):
            raise CliError(f"{path}: snapshot of another format or model")
        sess = self.engine.new_session(ctx=ctx)
        sess.restore(data[n + 4 + size :])
        transcript = header_ids(self.tok, system, mode, ctx) + turns
        if common_prefix(sess.tokens, transcript) != len(sess.tokens):
            raise CliError(f"{path}: session tokens do not match the saved transcript")
        self.mode, self.system, self.ctx, self.turns, self.sess = mode, system, ctx, turns, sess


def _command(chat: Chat, line: str) -> bool:
    """Run one /command; False means leave."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/help":
        print(HELP)
    elif cmd in ("/think", "/think-max", "/nothink"):
        chat.mode = {"/think": "high", "/think-max": "max", "/nothink": "none"}[cmd]
        shown = {"high": "thinking", "max": "think max", "none": "no thinking"}
        mode = effective_mode(chat.mode, chat.ctx)
        note = f" (ctx below {THINK_MAX_MIN_CTX}: thinking)" if mode != chat.mode else ""
        print(f"mode: {shown[chat.mode]}{note}")
    elif cmd == "/ctx":
        if not arg.isdigit():
            raise CliError("usage: /ctx N")
        chat.set_ctx(int(arg))
        print(f"context: {chat.ctx} tokens")
    elif cmd == "/read":
        if not arg:
            raise CliError("usage: /read FILE")
        chat.send(Path(arg).expanduser().read_text(encoding="utf-8"))
    elif cmd == "/save":
        if not arg:
            raise CliError("usage: /save FILE")
        print(f"saved {chat.save(arg)} bytes ({len(chat.transcript)} tokens) to {arg}")
    elif cmd == "/load":
        if not arg:
            raise CliError("usage: /load FILE")
        chat.load(arg)
        print(f"loaded {len(chat.transcript)} tokens from {arg}")
    else:
        print(f"unknown command {cmd} (/help lists them)")
    return True


def _line_reader(args: argparse.Namespace) -> Callable[[], str | None]:
    """prompt_toolkit (editing, history) on a terminal; plain lines from a pipe. None = EOF."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory

        session = PromptSession(history=FileHistory(os.path.expanduser(args.history)))

        def read() -> str | None:
            while True:
                try:
                    return session.prompt("ds4py> ")
                except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
                    continue
                except EOFError:
                    return None

        return read

    def read_pipe() -> str | None:
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None

    return read_pipe


def cmd_chat(args: argparse.Namespace) -> int:
    warn_think_max(args)
    eng = open_engine(args)
    chat = Chat(eng, args)
    read = _line_reader(args)
    if sys.stdin.isatty():
        print(HELP)
    while (line := read()) is not None:
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _command(chat, line):
                    break
            else:
                chat.send(line)
        except (CliError, ValueError, OSError) as e:  # report and keep the chat going
            print(f"ds4py: {e}", file=sys.stderr)
    return 0


# ---- tokens / logprobs --------------------------------------------------------------------------


def cmd_tokens(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.prompt_file is None):
        raise CliError("give the text or --prompt-file (exactly one)", code=2)
    text = args.text if args.text is not None else Path(args.prompt_file).read_text("utf-8")
    tok = open_tokenizer(args)
    ids = tok.encode(text)
    print("[" + ", ".join(map(str, ids)) + "]")
    for i in ids:
        print(f"{i:6d}  {tok.id_to_token(i)}")
    return 0


def cmd_logprobs(args: argparse.Namespace) -> int:
    if not 1 <= args.top_k <= vectors.MAX_DUMP_TOP_K:
        raise CliError(f"--top-k must be in 1..{vectors.MAX_DUMP_TOP_K}", code=2)
    text = read_prompt(args)
    warn_think_max(args)
    eng = open_engine(args)
    ids = prompt_ids(eng.tokenizer, args, text)
    sess = eng.new_session(ctx=args.ctx)
    bar = PrefillBar()
    try:
        sess.sync(ids, bar)
    finally:
        bar.close()
    n = max(0, min(args.tokens, args.ctx - len(ids) - 1))
    steps = vectors.collect_steps(sess, eng.tokenizer, n, args.top_k)
    Path(args.out).write_text(vectors.dump_text(len(ids), args.ctx, args.top_k, steps), "utf-8")
    print(f"ds4py: wrote {len(steps)} steps to {args.out}", file=sys.stderr)
    return 0


# ---- test-vectors -------------------------------------------------------------------------------


def cmd_test_vectors(args: argparse.Namespace) -> int:
    cases = vectors.load_cases(args.case)
    if not (args.all or args.case):
        skipped = [c for c in cases if c.skipped]
        for c in skipped:
            print(f"ds4py: {c.id}: skipped, {c.skipped} (--all to run it)", file=sys.stderr)
        cases = [c for c in cases if not c.skipped]
    if args.tokenize_only:
        tok, eng = open_tokenizer(args), None
    else:
        eng = open_engine(args)
        tok = eng.tokenizer
    by_bytes = vectors.vocab_by_bytes(tok)
    rows = [_vector_case(c, tok, eng, by_bytes, args) for c in cases]
    _vector_table(rows, args.tokenize_only)
    return 0 if all(r["ok"] for r in rows) else 1


def _vector_case(case: Any, tok: Any, eng: Any, by_bytes: dict, args: argparse.Namespace) -> dict:
    ids = vectors.vector_prompt_ids(tok, case.prompt)
    check = vectors.check_tokenization(case, ids, by_bytes)
    row: dict[str, Any] = {"case": case, "tokens": check, "result": None, "ok": check.ok}
    if eng is None:
        return row
    sess = eng.new_session(ctx=case.ctx)
    bar = PrefillBar(case.id)
    try:
        sess.sync(ids, bar)
    finally:
        bar.close()
    # teacher forcing: later steps are scored in the official context even after a miss
    force = [by_bytes.get(bytes(s["token"]["bytes"])) for s in case.official["steps"]]
    steps = vectors.collect_steps(sess, tok, len(force), vectors.COMPARE_TOP_K, force)
    if args.dump_dir:
        out = Path(args.dump_dir) / f"{case.id}.ds4py.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(vectors.dump_text(len(ids), case.ctx, vectors.COMPARE_TOP_K, steps), "utf-8")
    dump = {"steps": steps}
    row["result"] = vectors.compare(case.official, dump)
    row["ok"] = check.ok and row["result"].ok
    return row


def _vector_table(rows: list[dict], tokenize_only: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="official DeepSeek API vectors", title_justify="left")
    t.add_column("case", no_wrap=True)
    for col in ("prompt tokens", "vocab", "steps", "max |Δ|", "result"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        check, res = r["tokens"], r["result"]
        tokens = f"{check.prompt_tokens}/{check.api_prompt_tokens}"
        vocab = "ok" if not check.unknown else f"{len(check.unknown)} missing"
        steps = "-" if res is None else f"{sum(s.ok for s in res.steps)}/{len(res.steps)}"
        delta = "-" if res is None or res.worst_delta is None else f"{res.worst_delta:.3f}"
        verdict = "[green]PASS[/]" if r["ok"] else "[red]FAIL[/]"
        t.add_row(r["case"].id, tokens, vocab, steps, delta, verdict)
    console = Console()
    console.print(t)
    for r in rows:
        for raw in r["tokens"].unknown:
            line = f"  {r['case'].id}: official token {raw} is not in our vocabulary"
            console.print(line, markup=False)
        for s in r["result"].steps if r["result"] else []:
            for problem in s.problems:
                console.print(f"  {r['case'].id} step {s.step}: {problem}", markup=False)
    notes = (
        "prompt tokens: ours/API; vocab: every official token is one of ours; steps: steps "
        "passing; max |Δ|: largest |ours - official| logprob of a ranked official token."
    )
    if not tokenize_only:
        notes += (
            f" A step passes when our argmax is the official token and every ranked official "
            f"token is in our top {vectors.COMPARE_TOP_K} within {vectors.MAX_DELTA:g}."
        )
    console.print(notes, style="dim")
