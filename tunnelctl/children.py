"""Start ``tunnelctl`` verbs as child processes and wait for their readiness line.

Used by ``tunnelctl demo`` and by the end-to-end tests: each verb prints one
line on stdout once it serves (``listening URL``, ``registered ...``,
``forwarding HOST:PORT ...``); waiting for that line, with a deadline, is the
event to synchronise on. Children are stopped by pid (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence


class ChildFailed(RuntimeError):
    """A child exited or stayed silent before printing its readiness line."""


class Child:
    """One ``tunnelctl`` child process with its output collected."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix`` runs the verb under another command that execs it, keeping the
        pid (``ip netns exec NS``)."""
        self.name = name or args[0]
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tunnelctl", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            text=True,
            start_new_session=True,
        )
        self.stdout_lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_lines: list[str] = []
        self._stderr_seen = threading.Condition()
        self._stderr_dropped = 0
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, prefix: str, timeout: float) -> str:
        """Return the first stdout line starting with ``prefix``; raise on exit or timeout."""
        while True:
            try:
                line = self.stdout_lines.get(timeout=timeout)
            except queue.Empty:
                raise ChildFailed(
                    f"{self.name}: no {prefix!r} line within {timeout:g} s; "
                    f"stderr: {self.stderr_tail()}"
                ) from None
            if line is None:
                self.proc.wait(timeout=5)
                raise ChildFailed(
                    f"{self.name} exited with {self.proc.returncode} before "
                    f"{prefix!r}; stderr: {self.stderr_tail()}"
                )
            if line.startswith(prefix):
                return line

    def wait_stderr(self, text: str, timeout: float, *, after: int = 0) -> str:
        """Return the first stderr line containing ``text`` among those after the
        first ``after`` ever written; raise :class:`ChildFailed` on timeout."""

        def find() -> str | None:
            start = max(0, after - self._stderr_dropped)
            return next((line for line in self.stderr_lines[start:] if text in line), None)

        with self._stderr_seen:
            if self._stderr_seen.wait_for(find, timeout) is None:
                raise ChildFailed(
                    f"{self.name}: no stderr line with {text!r} within {timeout:g} s; "
                    f"stderr: {self.stderr_tail()}"
                )
            found = find()
        assert found is not None
        return found

    @property
    def stderr_count(self) -> int:
        """Lines written to stderr so far (for ``wait_stderr(after=...)``)."""
        with self._stderr_seen:
            return self._stderr_dropped + len(self.stderr_lines)

    def stderr_tail(self, lines: int = 5) -> str:
        return " | ".join(self.stderr_lines[-lines:]) or "(empty)"

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=2)
        return code

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=2)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.put(line.rstrip("\n"))
        self.stdout_lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._stderr_seen:
                self.stderr_lines.append(line.rstrip("\n"))
                excess = len(self.stderr_lines) - 200
                if excess > 0:  # keep the tail only: bounded memory
                    del self.stderr_lines[:excess]
                    self._stderr_dropped += excess
                self._stderr_seen.notify_all()
