"""The control endpoint's client side (PROTOCOL.md §4), used by the CLI.

The supervisor serves ``ipc://RUNTIME_DIR/control.sock`` (a ROUTER); a request
is one REQ round trip with a deadline. No supervisor (no socket file, or no
answer in time) is a :class:`NotRunning` whose message says which directory
was tried, so scripts get a clear line and a non-zero exit.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import zmq

from protocol.ipc import (
    ZMQ_CONTROL_CLIENT_MAX_MSG_SIZE,
    ControlReply,
    ControlRequest,
    IpcError,
    decode_control_reply,
    encode_control_request,
)
from supervisor.errors import ControlError, NotRunning
from supervisor.runtime import CONTROL_SOCKET, check_private, ipc_endpoint


def request(
    runtime_dir: Path, cmd: str, args: Mapping[str, object] | None = None, *, timeout: float = 5.0
) -> object:
    """Send one control request; return its result or raise :class:`ControlError`."""
    if not (runtime_dir / CONTROL_SOCKET).exists():
        raise NotRunning(f"no supervisor running (nothing listens in {runtime_dir})")
    try:
        check_private(runtime_dir)
    except Exception as exc:
        raise ControlError(str(exc)) from None
    payload = encode_control_request(ControlRequest(cmd, dict(args or {})))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
        sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_CONTROL_CLIENT_MAX_MSG_SIZE)
        sock.connect(ipc_endpoint(runtime_dir, CONTROL_SOCKET))
        sock.send(payload)
        try:
            data = sock.recv()
        except zmq.Again:
            raise NotRunning(
                f"no answer from the supervisor in {runtime_dir} within {timeout:g} s"
            ) from None
    finally:
        sock.close()
        ctx.term()
    try:
        reply: ControlReply = decode_control_reply(data)
    except IpcError as exc:
        raise ControlError(f"bad reply from the supervisor: {exc}") from None
    if not reply.ok:
        raise ControlError(reply.error or "the supervisor refused the request")
    return reply.result
