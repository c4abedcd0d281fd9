"""A child process whose output lines are the events to synchronise on.

Each ``tunnelctl`` verb prints one line on stdout once it serves (``listening
URL``, ``registered ...``, ``forwarding HOST:PORT ...``), as other servers do
(``Serving HTTP on ...``, coturn's ``... listener opened on ...``); waiting for
that line, with a deadline, replaces any sleep. stdout and stderr are read by
threads into bounded buffers (the tail is what matters). Children run in their
own session and are stopped by pid: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

READY_TIMEOUT = 30.0  # the default wait for a readiness line
STOP_TIMEOUT = 5.0  # the default wait after SIGTERM before SIGKILL
STDOUT_KEPT = 2000  # lines; readiness lines are few, a chatty child's tail is enough
STDERR_KEPT = 200


class ChildFailed(RuntimeError):
    """A child exited or stayed silent before printing the line waited for."""


class Child:
    """One child process with its output collected."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        failure: type[Exception] = ChildFailed,
    ) -> None:
        """Start ``argv`` with ``env`` added to this process's environment.

        ``failure`` is the exception a failed wait raises, so that a caller whose
        errors have a type of their own (the NAT lab's ``LabError``) handles a
        child's failure like any other step's.
        """
        self.name = name or Path(argv[0]).name
        self.failure = failure
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            text=True,
            # Its own session: a Ctrl-C meant for the parent reaches the parent
            # alone, which then stops its children in order.
            start_new_session=True,
        )
        self._changed = threading.Condition()
        self._stdout: deque[str] = deque(maxlen=STDOUT_KEPT)
        self._stdout_seen = 0  # lines read so far, the index of the next one
        self._cursor = 0  # the first line no wait has looked at yet
        self._eof = False
        self.stderr_lines: list[str] = []
        self._stderr_dropped = 0
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @classmethod
    def tunnelctl(
        cls,
        args: Sequence[str],
        *,
        name: str | None = None,
        prefix: Sequence[str] = (),
        **options: Any,
    ) -> Self:
        """``python -m tunnelctl ARGS`` with this interpreter, named after the verb.

        ``prefix`` runs it under another command that execs it, keeping the pid
        (``ip netns exec NS``); ``options`` go to the constructor.
        """
        argv = [*prefix, sys.executable, "-m", "tunnelctl", *args]
        return cls(argv, name=name or args[0], **options)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(
        self, text: str, timeout: float = READY_TIMEOUT, *, anywhere: bool = False
    ) -> str:
        """The next stdout line starting with ``text`` (containing it, if ``anywhere``).

        Lines before it are passed over for good; raises ``failure`` when the
        child exits first or after ``timeout`` seconds.
        """
        return self.wait_lines([text], timeout, anywhere=anywhere)[0]

    def wait_lines(
        self, texts: Sequence[str], timeout: float = READY_TIMEOUT, *, anywhere: bool = False
    ) -> list[str]:
        """The next stdout lines matching each of ``texts``, in any order."""
        deadline = time.monotonic() + timeout
        found: dict[str, str] = {}
        with self._changed:
            while True:
                first = self._stdout_seen - len(self._stdout)  # index of the oldest kept
                while self._cursor < self._stdout_seen:
                    index = self._cursor - first
                    self._cursor += 1
                    if index < 0:  # dropped unread: the buffer is bounded
                        continue
                    line = self._stdout[index]
                    for text in texts:
                        if text not in found and _matches(line, text, anywhere):
                            found[text] = line
                    if len(found) == len(texts):
                        return [found[text] for text in texts]
                missing = next(text for text in texts if text not in found)
                if self._eof:
                    code = self.proc.wait(timeout=5)
                    raise self.failure(
                        f"{self.name} exited with {code} before {missing!r}; "
                        f"stderr: {self.stderr_tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.failure(
                        f"{self.name}: no {missing!r} line within {timeout:g} s; "
                        f"stderr: {self.stderr_tail()}"
                    )
                self._changed.wait(left)

    def wait_stderr(self, text: str, timeout: float, *, after: int = 0) -> str:
        """The first stderr line containing ``text`` among those after the first
        ``after`` ever written; raises ``failure`` after ``timeout`` seconds."""

        def find() -> str | None:
            start = max(0, after - self._stderr_dropped)
            return next((line for line in self.stderr_lines[start:] if text in line), None)

        with self._changed:
            found = self._changed.wait_for(find, timeout)
        if found is None:
            raise self.failure(
                f"{self.name}: no stderr line with {text!r} within {timeout:g} s; "
                f"stderr: {self.stderr_tail()}"
            )
        return found

    @property
    def stderr_count(self) -> int:
        """Lines written to stderr so far: a mark for ``wait_stderr`` and ``stderr_since``."""
        with self._changed:
            return self._stderr_dropped + len(self.stderr_lines)

    def stderr_since(self, mark: int) -> list[str]:
        """The stderr lines written after ``stderr_count`` was ``mark`` (those still kept)."""
        with self._changed:
            return self.stderr_lines[max(0, mark - self._stderr_dropped) :]

    def stderr_tail(self, lines: int = 5) -> str:
        return " | ".join(self.stderr_lines[-lines:]) or "(empty)"

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._join_readers()
        return code

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._join_readers()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def _join_readers(self) -> None:
        for reader in self._readers:
            reader.join(timeout=2)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self._stdout.append(line.rstrip("\n"))
                self._stdout_seen += 1
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.stderr_lines.append(line.rstrip("\n"))
                excess = len(self.stderr_lines) - STDERR_KEPT
                if excess > 0:  # keep the tail only: bounded memory
                    del self.stderr_lines[:excess]
                    self._stderr_dropped += excess
                self._changed.notify_all()


def _matches(line: str, text: str, anywhere: bool) -> bool:
    return text in line if anywhere else line.startswith(text)
