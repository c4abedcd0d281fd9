"""What the core does with each message on a device's signaling link (PROTOCOL.md §1), sans-I/O.

A ``session_request`` is admitted (or refused: stopping, the device's session
limit, a FATAL lineage), started now or after its lineage's backoff; the
session's ``answer``, ``candidate``, ``session_end`` and ``peer_left`` go to its
worker (held until it has one) when they come from the client that owns it
(their ``client``, stamped by the server, PROTOCOL.md §1.4), and are dropped
like messages for no session otherwise; a second request for a session id is
refused, never merged; ``revoke`` ends every session of that client on the
device (its token expired or was revoked); ``ice_servers`` changes the ICE settings of sessions to
come.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aio.logs import LogThrottle
from protocol.ipc import IceUpdate
from protocol.signaling import (
    Answer,
    Candidate,
    Error,
    IceServers,
    PeerLeft,
    Revoke,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
)
from protocol.supervision import Refuse, SessionEvent, SessionState, StartAfter
from supervisor.events import ConfigureForkServer, SendSignal, SendToWorker
from supervisor.pool import WorkerState
from supervisor.sessions import MAX_PENDING_SIGNALS, SessionRow

if TYPE_CHECKING:
    from supervisor.core import SupervisorCore

log = logging.getLogger("tunnelctl.supervisor")
_remote = LogThrottle(log)  # lines a client can cause at will

DUPLICATE = "session id in use: ask with a new one"


def _ice_servers_issued(core: SupervisorCore, device: str, message: IceServers) -> None:
    """Fresh servers from signaling: fork with them, and idle workers prepare again."""
    if message.ice_servers == core.issued_ice:
        return
    core.issued_ice = message.ice_servers
    expiry = f", credentials valid {message.ttl} s" if message.ttl else ""
    count = len(message.ice_servers)
    log.info("device %s: %d ICE server(s) from the signaling server%s", device, count, expiry)
    if core.fork_server_up:
        core.emit(ConfigureForkServer(core.ice()))
    update = IceUpdate.of(core.ice())
    for worker in core.pool:
        if worker.state is WorkerState.IDLE:
            core.emit(SendToWorker(worker.id, update))


def on_signal(core: SupervisorCore, now: float, device: str, message: SignalingMessage) -> None:
    if isinstance(message, IceServers):
        _ice_servers_issued(core, device, message)
        return
    if isinstance(message, SessionRequest):
        _on_session_request(core, now, device, message)
        return
    if isinstance(message, Revoke):
        end_client_sessions(core, now, device, message.client, f"client {message.reason}")
        return
    if isinstance(message, Error):
        # unknown_session: both ends said session_end at once; the server forgot it first.
        level = logging.DEBUG if message.code == "unknown_session" else logging.WARNING
        log.log(level, "device %s: signaling error %s: %s", device, message.code, message.message)
        return
    if not isinstance(message, (Answer, Candidate, SessionEnd, PeerLeft)):
        return
    row = core.sessions.get(message.session)
    # A session is its client's (the server stamps the sender's identity): a
    # message from anyone else is dropped exactly like one for no session.
    if row is None or row.device != device or message.client != row.client:
        return
    if row.state is SessionState.BACKOFF and isinstance(message, (SessionEnd, PeerLeft)):
        row.move(now, SessionEvent.STOP, reason="client left while backing off")
        return
    if row.state not in (SessionState.STARTING, SessionState.RUNNING, SessionState.BACKOFF):
        return
    worker = core.pool.get(row.worker) if row.worker is not None else None
    if worker is None:
        if row.worker is None and len(row.pending) < MAX_PENDING_SIGNALS:
            row.pending.append(message)
        return
    core.relay(worker.id, row.id, message)


def _on_session_request(
    core: SupervisorCore, now: float, device: str, request: SessionRequest
) -> None:
    client = request.client or "?"
    if request.session in core.sessions:
        # Never merged into the running session, whoever asks: the same answer
        # for its owner and for anyone else who learnt the id.
        _remote.info(
            "duplicate",
            "session %s: refused a second request for it (from %s)",
            request.session,
            client,
            now=now,
        )
        core.emit(SendSignal(device, SessionEnd(session=request.session, reason=DUPLICATE)))
        return
    refusal = None
    if core.stopping:
        refusal = "device is shutting down"
    elif core.sessions.active(device) >= core.config.max_sessions:
        refusal = "device is at its session limit"
    elif core.sessions.negotiating(device, client) >= core.config.max_negotiating_per_client:
        # However many connections it uses: one client cannot hold every slot.
        refusal = (
            f"too many sessions of {client} negotiating "
            f"(at most {core.config.max_negotiating_per_client})"
        )
    lineage = core.sessions.lineage(device, client)
    decision = lineage.decide(now)
    row = SessionRow(
        request.session, device, client, SessionState.STARTING, now, lineage.crashes(now)
    )
    core.counters["sessions_total"] += 1
    if refusal is None and isinstance(decision, Refuse):
        row.state = SessionState.FATAL
        refusal = (
            f"too many worker crashes for {client} ({decision.crashes} in "
            f"{core.config.restart_window:g} s); retry in {decision.until - now:.0f} s"
        )
        log.error("session %s: FATAL: %s", row.id, refusal)
    if refusal is not None:
        if row.state is SessionState.FATAL:
            row.reason, row.ended_at = refusal, now
            core.sessions.add(row)
        core.emit(SendSignal(device, SessionEnd(session=request.session, reason=refusal)))
        return
    core.sessions.add(row)
    if isinstance(decision, StartAfter):
        row.state = SessionState.BACKOFF
        row.reason = f"backing off {decision.delay:.1f} s after {row.restarts} crash(es)"
        row.start_at = now + decision.delay
        log.warning("session %s: %s", row.id, row.reason)
        return
    log.info("session %s: client %s asks for %s", row.id, client, device)
    core.assign(now, row)


def end_client_sessions(
    core: SupervisorCore, now: float, device: str, client: str, reason: str
) -> None:
    """End every live session of ``client`` on ``device`` (its token expired or
    was revoked, PROTOCOL.md §1.4): its workers are told to stop."""
    rows = [
        r
        for r in core.sessions
        if (r.device, r.client) == (device, client)
        and r.state in (SessionState.STARTING, SessionState.RUNNING, SessionState.BACKOFF)
    ]
    if rows:
        log.warning("device %s: ending %d session(s) of %s: %s", device, len(rows), client, reason)
    for row in rows:
        if row.state is SessionState.BACKOFF:
            row.start_at = None
        row.move(now, SessionEvent.STOP, reason=reason)
        core.stop_worker(now, row, reason)
