"""What the core does with each message on the worker socket (PROTOCOL.md §3), sans-I/O.

A worker is trusted with its own session and nothing else: a message from an
unknown identity, one that does not decode, or one about a session the worker
does not own is counted (``bad_worker_messages``) and dropped, never obeyed.
Any valid message counts as a heartbeat.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from protocol.errors import SignalingError
from protocol.ipc import (
    Assign,
    Ended,
    Heartbeat,
    Hello,
    IceUpdate,
    IpcError,
    IpcMessage,
    Relay,
    Released,
    StateReport,
    decode_ipc,
)
from protocol.signaling import Candidate, Offer, SessionEnd, decode_signaling
from protocol.supervision import SessionEvent, SessionState
from supervisor.events import SendSignal, SendToWorker
from supervisor.pool import Worker, WorkerEvent, WorkerState
from supervisor.sessions import LIVE, SessionRow

if TYPE_CHECKING:
    from supervisor.core import SupervisorCore

log = logging.getLogger("tunnelctl.supervisor")


def on_worker_frames(core: SupervisorCore, now: float, frames: tuple[bytes, ...]) -> None:
    if len(frames) != 2:
        bad_worker(core, "wrong number of frames")
        return
    identity, payload = frames
    worker = core.pool.get(identity.decode("ascii", "replace"))
    if worker is None:
        bad_worker(core, "message from an unknown worker identity")
        return
    try:
        message = decode_ipc(payload)
    except IpcError as exc:
        bad_worker(core, f"worker {worker.id}: {exc}")
        return
    worker.hb.beat(now)
    _on_message(core, now, worker, message)


def bad_worker(core: SupervisorCore, why: str) -> None:
    core.counters["bad_worker_messages"] += 1
    count = core.counters["bad_worker_messages"]
    if count <= 10 or count % 1000 == 0:  # logged, but a flood cannot fill the disk
        log.warning("bad message on the worker socket (%d so far): %s", count, why)


def assign_message(core: SupervisorCore, row: SessionRow) -> Assign:
    device = next(d for d in core.config.devices if d.id == row.device)
    ice = core.ice()
    return Assign(
        session=row.id,
        device=row.device,
        client=row.client,
        services=tuple((s.name, s.host, s.port) for s in device.services),
        ice_servers=ice.servers,
        ice_hosts=ice.hosts,
        ice_policy=ice.policy,
    )


def _on_message(core: SupervisorCore, now: float, worker: Worker, message: IpcMessage) -> None:
    row = core.sessions.get(worker.session)
    if isinstance(message, Hello):
        if message.worker != worker.id or (worker.pid is not None and message.pid != worker.pid):
            bad_worker(core, f"worker {worker.id}: hello with wrong identity")
            return
        if worker.starting and worker.kill_reason is None:
            worker.move(WorkerEvent.HELLO)
            worker.deadline = None
            if worker.state is WorkerState.BUSY:  # it was forked for one session
                core.bind(now, core.sessions.get(worker.reserved_for), worker)
            else:
                core.pool_worker_ready()
                if core.issued_ice:
                    # Forked before the latest servers arrived? It ignores equal settings.
                    core.emit(SendToWorker(worker.id, IceUpdate.of(core.ice())))
    elif isinstance(message, Heartbeat):
        if row is not None:
            row.bytes_in, row.bytes_out = message.bytes_in, message.bytes_out
            row.streams, row.services = message.streams, message.services
    elif isinstance(message, Relay):
        if row is None or message.session != row.id:
            bad_worker(core, f"worker {worker.id}: relay for a session it does not own")
            return
        try:
            signal_message = decode_signaling(message.message)
        except SignalingError as exc:
            bad_worker(core, f"worker {worker.id}: bad relayed message: {exc}")
            return
        if (
            not isinstance(signal_message, (Offer, Candidate, SessionEnd))
            or getattr(signal_message, "session", None) != row.id
        ):
            bad_worker(core, f"worker {worker.id}: may not send {type(signal_message).__name__}")
            return
        core.emit(SendSignal(row.device, signal_message))
    elif isinstance(message, StateReport):
        if row is None or message.session != row.id:
            bad_worker(core, f"worker {worker.id}: state for a session it does not own")
            return
        if message.state == "connected" and row.state is SessionState.STARTING:
            row.path, row.pair = message.path, message.pair
            row.relay_transport = message.relay_transport
            row.move(now, SessionEvent.CONNECTED)
            log.info(
                "session %s: running (%s path, %s, client %s)",
                row.id,
                row.path,
                row.pair,
                row.client,
            )
    elif isinstance(message, Ended):
        if row is None or message.session != row.id:
            bad_worker(core, f"worker {worker.id}: ended for a session it does not own")
            return
        worker.move(WorkerEvent.ENDED)
        if row.state in LIVE:
            row.move(now, SessionEvent.ENDED, reason=message.reason)
        log.info("session %s ended: %s", row.id, message.reason)
    elif isinstance(message, Released):
        if worker.state is not WorkerState.BUSY or message.session != worker.releasing:
            bad_worker(core, f"worker {worker.id}: released a session it was not asked to")
            return
        core.released(now, worker)
    else:
        bad_worker(core, f"worker {worker.id}: unexpected {type(message).__name__}")
