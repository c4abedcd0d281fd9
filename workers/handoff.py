"""The lightweight side of the client's control endpoint (PROTOCOL.md §4.2).

``tunnelctl connect --stdio`` and ``tunnelctl status --client`` use this module
to talk to running clients. It imports only the standard library and
:mod:`protocol.client_control`: a ``--stdio`` process started by ssh for each
login must not pay for loading aiortc (~1.3 s) when a running client can carry
its stream, as ssh's ControlMaster does for ssh.

Each running client listens on ``CLIENTS_DIR/PID.sock``, a Unix stream socket
in a directory private to the user (0700), so only the user can ask.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from protocol.client_control import (
    MAX_LINE,
    ControlMessageError,
    ControlReply,
    ControlRequest,
    decode_reply,
    encode_request,
)

SUFFIX = ".sock"
ASK_TIMEOUT = 5.0
CHUNK = 256 * 1024


def endpoint_path(clients_dir: Path, pid: int) -> Path:
    return clients_dir / f"{pid}{SUFFIX}"


def endpoints(clients_dir: Path) -> list[Path]:
    """The control sockets of the clients in ``clients_dir``, oldest pid first."""
    try:
        names = [p for p in clients_dir.iterdir() if p.name.endswith(SUFFIX)]
    except OSError:
        return []
    return sorted(names, key=lambda p: (len(p.name), p.name))


def ask(
    path: Path, request: ControlRequest, timeout: float = ASK_TIMEOUT
) -> tuple[socket.socket, ControlReply]:
    """Send one request; return the connected socket and the reply.

    Raises :class:`OSError` when nobody listens (a client that died leaves its
    socket file) and :class:`ControlMessageError` on a bad reply.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(encode_request(request))
        reply = decode_reply(_read_line(sock))
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock, reply


def statuses(clients_dir: Path) -> Iterator[tuple[Path, ControlReply]]:
    """Each answering client's ``status`` reply."""
    for path in endpoints(clients_dir):
        try:
            sock, reply = ask(path, ControlRequest("status", {}))
        except (OSError, ControlMessageError):
            _forget_if_dead(path)
            continue  # gone, or not one of ours: nothing to report
        sock.close()
        yield path, reply


def hand_off(clients_dir: Path, device: str, service: str) -> socket.socket | None:
    """A stream to ``device``/``service`` from a running client, or None if none serves it."""
    request = ControlRequest("stream", {"device": device, "service": service})
    for path in endpoints(clients_dir):
        try:
            sock, reply = ask(path, request)
        except (OSError, ControlMessageError):
            _forget_if_dead(path)
            continue
        if reply.ok:
            return sock
        sock.close()
    return None


def splice_stdio(sock: socket.socket, stdin: int = 0, stdout: int = 1) -> int:
    """Copy ``stdin`` → ``sock`` and ``sock`` → ``stdout`` until both ends finish.

    An end of input is passed on as a half-close, as TCP does. A socket error
    returns 1 at once. Pipes have no reset: a stream reset mid-way reaches the
    reader of ``stdout`` as its end (ssh and scp notice a cut themselves, their
    records being authenticated), and over a Unix socket the kernel reports a
    reset only when unread data was left, so the status is best effort.
    """
    failed = threading.Event()

    def upstream() -> None:
        try:
            while data := os.read(stdin, CHUNK):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            failed.set()

    sender = threading.Thread(target=upstream, name="stdin->stream", daemon=True)
    sender.start()
    try:
        while data := sock.recv(CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(stdout, view) :]
    except OSError:
        return 1
    finally:
        os.close(stdout)  # EOF for the reader of our stdout
    # The stream's remote half is done; the local half ends when stdin does
    # (ssh closes it as it exits), unless the stream was reset meanwhile.
    sender.join()
    return 1 if failed.is_set() else 0


def _forget_if_dead(path: Path) -> None:
    """Remove the socket of a client that died without removing it (SIGKILL, a crash)."""
    pid = path.name.removesuffix(SUFFIX)
    if not pid.isdigit():
        return
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        with contextlib.suppress(OSError):
            path.unlink()
    except OSError:
        pass  # alive, another user's: not ours to judge


def _read_line(sock: socket.socket) -> bytes:
    """One LF-terminated line, read byte by byte so nothing after it is consumed."""
    line = bytearray()
    while not line.endswith(b"\n"):
        if len(line) >= MAX_LINE:
            raise ControlMessageError("control reply line too long")
        byte = sock.recv(1)
        if not byte:
            raise ControlMessageError("the client closed the control connection")
        line += byte
    return bytes(line)
