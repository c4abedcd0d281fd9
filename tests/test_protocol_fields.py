"""The field checks both message layers share: one wording for one problem."""

from __future__ import annotations

import pytest

from protocol.errors import LocalProtocolError
from protocol.fields import check_id, check_int, check_session, check_str
from protocol.ipc import Ended
from protocol.signaling import SessionEnd


@pytest.mark.parametrize(
    ("check", "fragment"),
    [
        (lambda: check_str("x", b"bytes"), "x: must be a str, not bytes"),
        (lambda: check_str("x", "\ud800"), "x: contains a lone UTF-16 surrogate"),
        (lambda: check_str("x", "abc", max_chars=2), "x: longer than 2 characters"),
        (lambda: check_str("x", "é", max_bytes=1), "x: longer than 1 bytes of UTF-8"),
        (lambda: check_int("x", True, 0, 1), "x: must be an int, not bool"),
        (lambda: check_int("x", 5, 0, 1), "x: 5 out of range 0..1"),
        (lambda: check_id("x", "my laptop"), "x: 'my laptop' is not a valid id (expected "),
        (lambda: check_session("x", "short"), "x: 'short' is not a valid session id (expected "),
    ],
)
def test_each_check_says_what_and_where(check: object, fragment: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        check()  # type: ignore[operator]
    assert fragment in str(info.value)


def test_signaling_and_ipc_word_the_same_problem_the_same_way() -> None:
    with pytest.raises(LocalProtocolError) as signaling:
        SessionEnd("short", "bye")
    with pytest.raises(LocalProtocolError) as ipc:
        Ended("short", "bye", True)
    assert str(signaling.value).partition(": ")[2] == str(ipc.value).partition(": ")[2]
