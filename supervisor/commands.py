"""The control endpoint's server side (PROTOCOL.md §4), sans-I/O.

A request is ``[identity, b"", payload]`` on the control ROUTER socket; the
reply goes back to ``identity``. A request that does not decode gets an error
reply (and counts as ``bad_control_messages``), never silence; frames that are
not a REQ envelope are counted and dropped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from protocol.errors import LocalProtocolError
from protocol.ipc import (
    ControlReply,
    ControlRequest,
    IpcError,
    decode_control_request,
    encode_control_reply,
)
from protocol.signaling import SessionEnd
from protocol.supervision import SessionEvent, SessionState
from supervisor.errors import SupervisorError
from supervisor.events import ReplyControl, SendSignal
from supervisor.pool import SHOWN_AS

if TYPE_CHECKING:
    from supervisor.core import SupervisorCore

log = logging.getLogger("tunnelctl.supervisor")


def on_control_frames(
    core: SupervisorCore, now: float, frames: tuple[bytes, ...]
) -> list[ReplyControl]:
    if len(frames) != 3 or frames[1] != b"":
        core.counters["bad_control_messages"] += 1
        return []
    identity, _, payload = frames
    request: ControlRequest | None = None
    try:
        request = decode_control_request(payload)
        reply = encode_control_reply(ControlReply(ok=True, result=_run(core, now, request)))
    except IpcError as exc:
        core.counters["bad_control_messages"] += 1
        reply = encode_control_reply(ControlReply(ok=False, error=f"bad request: {exc}"))
    except SupervisorError as exc:
        reply = encode_control_reply(ControlReply(ok=False, error=str(exc) or "failed"))
    except LocalProtocolError as exc:  # our own reply did not fit the protocol
        log.error("control %s: cannot encode the reply: %s", request and request.cmd, exc)
        reply = encode_control_reply(ControlReply(ok=False, error="internal error"))
    return [ReplyControl(identity, reply)]


def _run(core: SupervisorCore, now: float, request: ControlRequest) -> object:
    if request.cmd == "status":
        return build_status(core, now)
    if request.cmd == "sessions":
        rows = sorted(core.sessions, key=lambda r: r.created)
        return [row.to_json(now) for row in rows]
    if request.cmd == "kill":
        assert request.session is not None
        kill_session(core, now, request.session)
        return {"session": request.session}
    if request.cmd == "stop":
        drain = request.drain_timeout
        core.stop(now, drain if drain is not None else core.config.drain_timeout)
        return {"stopping": True}
    raise SupervisorError(f"unknown command {request.cmd!r}")


def build_status(core: SupervisorCore, now: float) -> dict[str, Any]:
    """The ``status`` reply."""
    devices = []
    for device in core.config.devices:
        rows = [r for r in core.sessions if r.device == device.id]
        if device.id in core.rejected:
            state = "fatal"
        elif any(r.state in (SessionState.BACKOFF, SessionState.FATAL) for r in rows):
            state = "backoff"
        else:
            state = "ok"
        link = core.links.get(device.id, "down")
        devices.append(
            {
                "id": device.id,
                "link": link if link in ("up", "connecting") else "down",
                "state": state,
                "sessions": core.sessions.active(device.id),
                "services": [s.name for s in device.services],
            }
        )
    workers = list(core.pool)
    return {
        "pid": core.pid,
        "uptime_s": round(now - core.started, 3),
        "state": "stopping" if core.stopping else "running",
        "runtime_dir": core.runtime_dir,
        "devices": devices,
        "pool": {
            "idle": core.pool.count("idle"),
            "spawning": core.pool.count("spawning"),
            "busy": core.pool.count("busy", "exiting"),
            "target": core.config.pool_size,
        },
        "sessions": sum(core.sessions.active(d.id) for d in core.config.devices),
        "ready": core.ready,
        "fork_server_pid": core.fork_server_pid,
        "workers": [
            {"id": w.id, "pid": w.pid, "state": SHOWN_AS[w.state], "session": w.session}
            for w in workers
            if w.pid is not None
        ],
        "counters": dict(core.counters),
    }


def kill_session(core: SupervisorCore, now: float, session: str) -> None:
    """The operator's ``kill``: the client is told, the worker stopped (SIGKILL after a grace)."""
    row = core.sessions.get(session)
    if row is None:
        raise SupervisorError(f"no session {session}")
    if row.state in (SessionState.STOPPING, SessionState.EXITED, SessionState.FATAL):
        raise SupervisorError(f"session {session} is already {row.state.value}")
    reason = "session killed by the operator"
    row.move(now, SessionEvent.STOP, reason=reason)
    core.emit(SendSignal(row.device, SessionEnd(session=row.id, reason=reason)))
    core.stop_worker(now, row, reason)
