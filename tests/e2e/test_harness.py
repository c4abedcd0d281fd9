"""``harness.Child`` on real child processes: readiness lines, failures, stopping by pid."""

from __future__ import annotations

import signal
import sys

import pytest

from harness import Child, ChildFailed

pytestmark = pytest.mark.e2e

READY = 30.0


def python(code: str, name: str = "child") -> Child:
    return Child([sys.executable, "-c", code], name=name)


def test_a_line_is_found_by_its_prefix_or_anywhere_in_it_and_passed_over_once() -> None:
    child = python("print('noise listening 1'); print('listening 2'); print('the end 3')")
    try:
        assert child.wait_line("listening ", READY) == "listening 2"
        assert child.wait_line("end", READY, anywhere=True) == "the end 3"
    finally:
        child.stop()


def test_wait_lines_finds_each_text_in_any_order() -> None:
    child = python("print('b: second'); print('a: first')")
    try:
        assert child.wait_lines(["a:", "b:"], READY) == ["a: first", "b: second"]
    finally:
        child.stop()


def test_an_exit_before_the_line_fails_naming_the_code_and_stderr() -> None:
    child = python("import sys; print('warming up'); sys.exit('no config here')", name="demo")
    try:
        with pytest.raises(ChildFailed, match=r"demo exited with 1 before 'ready'.*no config"):
            child.wait_line("ready", READY)
    finally:
        child.stop()


class OwnError(Exception):
    pass


def test_a_silent_child_fails_after_the_deadline_with_the_callers_error_type() -> None:
    child = Child(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"],
        name="quiet",
        failure=OwnError,
    )
    try:
        child.wait_line("up", READY)
        with pytest.raises(OwnError, match=r"quiet: no 'never' line within 0\.2 s"):
            child.wait_line("never", 0.2)
    finally:
        assert child.stop() == -signal.SIGTERM


def test_stop_kills_a_child_that_ignores_sigterm() -> None:
    child = python(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ignoring', flush=True); time.sleep(600)"
    )
    child.wait_line("ignoring", READY)
    assert child.stop(timeout=0.5) == -signal.SIGKILL


def test_stderr_marks_count_every_line_though_only_the_tail_is_kept() -> None:
    child = python(
        "import sys\n"
        "for i in range(300): print(f'line {i}', file=sys.stderr)\n"
        "print('half', flush=True)"
    )
    try:
        child.wait_line("half", READY)
        child.wait_stderr("line 299", READY)
        mark = child.stderr_count
        assert mark == 300
        assert len(child.stderr_lines) == 200 and child.stderr_lines[0] == "line 100"
        assert child.stderr_since(250) == [f"line {i}" for i in range(250, 300)]
    finally:
        child.stop()


def test_tunnelctl_runs_a_verb_with_this_interpreter_named_after_it() -> None:
    child = Child.tunnelctl(["token", "--help"])
    try:
        assert child.name == "token"
        assert child.wait(READY) == 0
        assert child.proc.args[:3] == [sys.executable, "-m", "tunnelctl"]
    finally:
        child.stop()
