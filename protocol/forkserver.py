"""The fork server's line protocol (PROTOCOL.md §5), parsed in one place.

The supervisor speaks to its fork server (:mod:`workers.zygote`) over the fork
server's stdin and stdout: one ASCII line per message, ending in LF, at most
:data:`MAX_LINE` bytes. Supervisor → fork server (*commands*)::

    config JSON            ICE settings of the workers forked from now on:
                           {"ice_servers": [{"url", "username", "credential"}],
                            "ice_hosts": [...], "ice_policy": "all"|"relay"}
    spawn WORKER_ID        fork a worker with this id (w- and 16 hex digits)

Fork server → supervisor (*reports*)::

    ready PID              it has loaded everything and takes commands
    spawned WORKER_ID PID  it forked that worker
    exited PID CODE        it reaped a child; CODE < 0: killed by signal -CODE
    error TEXT             a command was refused (TEXT is one line)

``config`` travels on a pipe, not the command line, because TURN credentials
must not show in ``ps``; an error about it names the exception type only,
never a value that could be a credential.

Decoders raise only :class:`ForkServerLineError`; encoders check their input
when the message is built (the dataclasses validate on construction).
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass
from typing import Final

from protocol.errors import RemoteProtocolError
from protocol.ice import IceConfig, IceServer
from protocol.ipc import WORKER_ID_RE as _WORKER_ID

__all__ = [
    "MAX_LINE",
    "Command",
    "Configure",
    "Exited",
    "ForkServerLineError",
    "Ready",
    "Refused",
    "Report",
    "Spawn",
    "Spawned",
    "decode_command",
    "decode_report",
    "describe_exit",
    "encode_command",
    "encode_report",
]

#: The longest line either side accepts, LF included.
MAX_LINE: Final = 65536
_NUMBER: Final = re.compile(r"-?[0-9]{1,10}")
_MAX_PID: Final = 2**31 - 1


class ForkServerLineError(RemoteProtocolError):
    """A line of the fork server protocol does not parse; the message is one line."""


@dataclass(frozen=True, slots=True)
class Configure:
    ice: IceConfig


@dataclass(frozen=True, slots=True)
class Spawn:
    worker: str

    def __post_init__(self) -> None:
        if not _WORKER_ID.fullmatch(self.worker):
            raise ValueError(f"bad worker id {self.worker!r}")


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int

    def __post_init__(self) -> None:
        _check_pid(self.pid)


@dataclass(frozen=True, slots=True)
class Spawned:
    worker: str
    pid: int

    def __post_init__(self) -> None:
        if not _WORKER_ID.fullmatch(self.worker):
            raise ValueError(f"bad worker id {self.worker!r}")
        _check_pid(self.pid)


@dataclass(frozen=True, slots=True)
class Exited:
    pid: int
    code: int  # as Popen.returncode: < 0 is -signal

    def __post_init__(self) -> None:
        _check_pid(self.pid)
        if not -255 <= self.code <= 255:
            raise ValueError(f"bad exit code {self.code}")


@dataclass(frozen=True, slots=True)
class Refused:
    text: str

    def __post_init__(self) -> None:
        if "\n" in self.text or not self.text.isascii():
            raise ValueError("an error text is one line of ASCII")


Command = Configure | Spawn
Report = Ready | Spawned | Exited | Refused


def _check_pid(pid: int) -> None:
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= _MAX_PID:
        raise ValueError(f"bad pid {pid!r}")


def encode_command(command: Command) -> bytes:
    if isinstance(command, Spawn):
        return f"spawn {command.worker}\n".encode()
    ice = command.ice
    config = {
        "ice_servers": [
            {"url": s.url, "username": s.username, "credential": s.credential} for s in ice.servers
        ],
        "ice_hosts": list(ice.hosts),
        "ice_policy": ice.policy,
    }
    return b"config " + json.dumps(config).encode() + b"\n"


def decode_command(line: bytes) -> Command:
    """One line from the supervisor (with or without its LF)."""
    text = _text(line)
    verb, _, rest = text.partition(" ")
    if verb == "config":
        return Configure(_parse_config(rest))
    if verb == "spawn" and _WORKER_ID.fullmatch(rest):
        return Spawn(rest)
    raise ForkServerLineError(f"bad command {text[:80]!r}")


def encode_report(report: Report) -> bytes:
    if isinstance(report, Ready):
        text = f"ready {report.pid}"
    elif isinstance(report, Spawned):
        text = f"spawned {report.worker} {report.pid}"
    elif isinstance(report, Exited):
        text = f"exited {report.pid} {report.code}"
    else:
        text = f"error {report.text}"
    return text.encode("ascii") + b"\n"


def decode_report(line: bytes) -> Report:
    """One line from the fork server (with or without its LF)."""
    text = _text(line)
    verb, _, rest = text.partition(" ")
    args = rest.split(" ")
    try:
        if verb == "ready" and len(args) == 1:
            return Ready(_number(args[0]))
        if verb == "spawned" and len(args) == 2:
            return Spawned(args[0], _number(args[1]))
        if verb == "exited" and len(args) == 2:
            return Exited(_number(args[0]), _number(args[1]))
        if verb == "error" and rest:
            return Refused(rest)
    except ValueError as exc:
        raise ForkServerLineError(f"bad report {text[:80]!r}: {exc}") from None
    raise ForkServerLineError(f"bad report {text[:80]!r}")


def describe_exit(code: int) -> str:
    """``exit code N``, or ``killed by SIGNAME`` for a negative code (``exited``)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _text(line: bytes) -> str:
    if len(line) > MAX_LINE:
        raise ForkServerLineError("line too long")
    try:
        return line.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ForkServerLineError("line is not ASCII") from None


def _number(text: str) -> int:
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"{text[:20]!r} is not a number")
    return int(text)


def _parse_config(text: str) -> IceConfig:
    try:
        data = json.loads(text)
        servers = tuple(
            IceServer(s["url"], s.get("username"), s.get("credential")) for s in data["ice_servers"]
        )
        hosts = tuple(str(h) for h in data["ice_hosts"])
        return IceConfig(servers, hosts, data.get("ice_policy", "all"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # Not the message: it could quote a credential.
        raise ForkServerLineError(f"bad config: {type(exc).__name__}") from None
