"""`ds4py chat` on a pseudo-terminal: prompt_toolkit line input with a history file, dimmed
thinking, Ctrl-C typed during an answer (SIGINT from the terminal) returning to the prompt with
a consistent session, and Ctrl-C at the prompt only clearing the line. Uses the scripted engine."""

from __future__ import annotations

import os
import re
import select
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")

FAKE = Path(__file__).parent / "helpers" / "cli_fake.py"
REPO = Path(__file__).parent.parent


class Term:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the terminal is its controlling tty
            os.execve(sys.executable, [sys.executable, *argv], env)
        self.seen = b""

    def expect(self, pattern: bytes, timeout: float = 90.0) -> bytes:
        """Read until `pattern` (a regex) appears after the previous match; return the text."""
        end = time.monotonic() + timeout
        while not (m := re.search(pattern, self.seen)):
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"timeout waiting for {pattern!r}; got {self.seen[-600:]!r}")
            try:
                self.seen += os.read(self.fd, 4096)
            except OSError:  # child closed the terminal
                raise AssertionError(
                    f"EOF waiting for {pattern!r}; got {self.seen[-600:]!r}"
                ) from None
        out, self.seen = self.seen[: m.end()], self.seen[m.end() :]
        return out

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 30.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:  # keep draining so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 4096)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError("chat did not exit")


def test_chat_on_a_terminal(tmp_path):
    history = tmp_path / "history"
    env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", COLUMNS="200", LINES="50",
               PYTHONPATH=str(REPO))  # fmt: skip
    t = Term([str(FAKE), "chat", "--history", str(history)], env)
    try:
        t.expect(rb"Commands:")
        t.expect(rb"ds4py>")
        t.send(b"hello\r")
        out = t.expect(rb"Answer 1\.")
        assert b"\x1b[2mThinking about turn 1." in out  # dimmed reasoning on a terminal
        t.expect(rb"generation \d+ tokens")
        t.expect(rb"ds4py>")
        t.send(b"half typed line\x03")  # Ctrl-C at the prompt: clears the line, stays
        t.expect(rb"ds4py>")
        time.sleep(0.5)  # let the prompt restart before typing on
        t.send(b"go on forever\r")
        t.expect(rb"(la){20}")
        t.send(b"\x03")  # Ctrl-C during the answer
        t.expect(rb"\(interrupted\)")
        t.expect(rb"ds4py>")
        t.send(b"again\r")
        t.expect(rb"Answer 3\.")  # the interrupted turn stays in the chat: this is turn 3
        t.expect(rb"ds4py>")
        t.send(b"/quit\r")
        assert t.wait() == 0
    finally:
        try:
            os.kill(t.pid, 9)
            os.waitpid(t.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(t.fd)
    assert {"hello", "go on forever", "again"} <= {
        line[1:] for line in history.read_text().splitlines() if line.startswith("+")
    }
