"""The worker process: owns exactly one peer session (ARCHITECTURE.md).

A worker is forked, idle, from the pre-loaded :mod:`workers.zygote`; it
connects a ZeroMQ DEALER (identity = its worker id) to the supervisor's ROUTER,
says ``hello``, and waits for ``assign``. Then it runs one session — the
device side of PROTOCOL.md §2 — relaying its signaling through the supervisor
(PROTOCOL.md §3), reports its state and counters in heartbeats, and exits when
the session ends. Whatever goes wrong in aiortc can only take this process down.
One exception: a session whose negotiation the supervisor gave up (``release``)
was never used, so the worker drops it, prepares a fresh offer and is idle again
(``released``) instead of exiting.

Liveness, both ways: it sends a heartbeat every interval; it exits by itself
when the supervisor's heartbeats stop for the timeout, or at once when the
supervisor process disappears (a pidfd becomes readable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time

import zmq
import zmq.asyncio

import aio.loop
from aio.logs import redact_all_logs
from aio.tasks import TaskSet
from protocol.errors import SignalingError
from protocol.ice import DEFAULT_KEEPALIVE, IceConfig
from protocol.ipc import (
    MAX_REASON_LEN,
    ZMQ_HWM,
    ZMQ_MAX_MSG_SIZE,
    Assign,
    Drain,
    Ended,
    Heartbeat,
    Hello,
    IceUpdate,
    IpcError,
    IpcMessage,
    Relay,
    Release,
    Released,
    StateReport,
    Stop,
    decode_ipc,
    encode_ipc,
)
from protocol.mux import Role
from protocol.signaling import (
    Answer,
    Candidate,
    PeerLeft,
    SessionEnd,
    SignalingMessage,
    decode_signaling,
    encode_signaling,
)
from protocol.supervision import HeartbeatMonitor
from workers.bridge import ServiceAddress, TunnelBridge
from workers.errors import SessionFailed
from workers.ice import parse_networks, restrict_host_addresses
from workers.peer import PeerSession

log = logging.getLogger("tunnelctl.worker")

OPEN_TIMEOUT = 30.0
#: An idle worker makes its prepared offer again when it is this old (seconds):
#: its server-reflexive candidates and TURN allocation ride on NAT mappings,
#: which commonly expire after 30 s without traffic, and a TURN server's
#: credentials may have changed meanwhile.
PREPARED_MAX_AGE = 20.0


class SessionWorker:
    """One worker process's event loop: supervisor channel plus at most one session."""

    def __init__(
        self,
        worker_id: str,
        endpoint: str,
        supervisor_pid: int,
        *,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 5.0,
        ice: IceConfig | None = None,
        keepalive: float = DEFAULT_KEEPALIVE,
        prepared_max_age: float = PREPARED_MAX_AGE,
    ) -> None:
        self.worker_id = worker_id
        self.keepalive = keepalive
        self.prepared_max_age = prepared_max_age
        #: Offers prepared so far (the first one, then one per refresh).
        self.offers_prepared = 0
        self.offer_refreshed = asyncio.Event()
        # With the ICE settings known up front, an idle worker prepares its
        # PeerConnection and offer before any session asks for one.
        self.ice = ice
        self._prepared: asyncio.Task[tuple[PeerSession, TunnelBridge]] | None = None
        self._background = TaskSet(log)
        self._session_waiting = asyncio.Event()  # set once assigned: stop retrying
        self._session: asyncio.Task[None] | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._connected = False  # the session's DataChannel opened: it cannot be released
        self._assigned_ice: IceConfig | None = None  # the last session's (the newest) settings
        self.endpoint = endpoint
        self.supervisor_pid = supervisor_pid
        self.heartbeat_interval = heartbeat_interval
        self.supervisor_hb = HeartbeatMonitor(heartbeat_timeout, time.monotonic())
        self.session_id: str | None = None
        self.peer: PeerSession | None = None
        self.bridge: TunnelBridge | None = None
        self._done = asyncio.get_running_loop().create_future()
        self._ended_sent = False
        self._inbox: asyncio.Queue[SignalingMessage] = asyncio.Queue(maxsize=256)
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, ZMQ_HWM)
        self.sock.setsockopt(zmq.RCVHWM, ZMQ_HWM)
        self.sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_MAX_MSG_SIZE)

    async def run(self) -> str:
        """Serve until the session ends or the supervisor goes away; return why."""
        loop = asyncio.get_running_loop()
        self.sock.connect(self.endpoint)
        self._watch_supervisor(loop)
        await self._send(Hello(worker=self.worker_id, pid=os.getpid()))
        tasks = [
            loop.create_task(self._receive(), name="receive"),
            loop.create_task(self._heartbeats(), name="heartbeats"),
        ]
        if self.ice is not None:
            self._prepared = loop.create_task(self._prepare(self.ice), name="prepare")
            self._refresh = loop.create_task(self._keep_prepared_fresh(), name="refresh")
        try:
            reason: str = await self._done
            return reason
        finally:
            for task in [*tasks, self._refresh, self._session]:
                if task is not None:
                    task.cancel()
            await self._close_session()
            self.sock.close(linger=500)  # let the last message (ended) reach the supervisor
            self.ctx.term()

    # -- the supervisor channel ---------------------------------------------------

    def _watch_supervisor(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            fd = os.pidfd_open(self.supervisor_pid)
        except ProcessLookupError:
            self._finish("supervisor is gone")
            return
        except OSError:
            return  # no pidfd here: the heartbeat timeout still catches it
        loop.add_reader(fd, self._finish, "supervisor process exited")

    async def _send(self, message: IpcMessage) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await self.sock.send(encode_ipc(message))

    async def _receive(self) -> None:
        while True:
            data = await self.sock.recv()
            self.supervisor_hb.beat(time.monotonic())
            try:
                message = decode_ipc(data)
            except IpcError as exc:
                log.warning("worker %s: bad message from the supervisor: %s", self.worker_id, exc)
                continue
            await self._handle(message)

    async def _handle(self, message: IpcMessage) -> None:
        if isinstance(message, Assign):
            if self.session_id is not None:
                log.warning("worker %s: second assign ignored", self.worker_id)
                return
            self.session_id, self._assigned_ice = message.session, message.ice
            self._session = asyncio.get_running_loop().create_task(
                self._run_session(message), name="session"
            )
        elif isinstance(message, Relay):
            if message.session != self.session_id:
                return
            try:
                signal = decode_signaling(message.message)
            except SignalingError as exc:
                log.warning("worker %s: bad relayed message: %s", self.worker_id, exc)
                return
            with contextlib.suppress(asyncio.QueueFull):
                self._inbox.put_nowait(signal)
        elif isinstance(message, IceUpdate):
            self._ice_changed(message.ice)
        elif isinstance(message, Drain):
            asyncio.get_running_loop().create_task(self._drain(message.timeout), name="drain")
        elif isinstance(message, Stop):
            await self._end(message.reason, clean=True, tell_client=False)
        elif isinstance(message, Release):
            await self._release(message)
        # Heartbeat: beat() above is all it takes; others are worker → supervisor only.

    async def _heartbeats(self) -> None:
        while True:
            now = time.monotonic()
            if self.supervisor_hb.expired(now):
                self._finish("no heartbeat from the supervisor")
                return
            await self._send(_heartbeat(self.bridge))
            await asyncio.sleep(self.heartbeat_interval)

    # -- the session ---------------------------------------------------------------

    async def _prepare(self, ice: IceConfig) -> tuple[PeerSession, TunnelBridge]:
        """Build the PeerConnection, its channel and bridge, and the offer, ahead of time.

        The bridge listens before the channel can open: the client may send its
        first OPEN in the same instant, and aiortc hands a message to whoever
        listens at that moment, or to nobody.
        """
        restrict_host_addresses(parse_networks(ice.hosts))
        peer = PeerSession(
            "",
            self._relay_out,
            ice_servers=ice.servers,
            ice_policy=ice.policy,
            on_state=self._state,
            on_relay_lost=self._relay_lost,
            keepalive=self.keepalive,
        )
        bridge = TunnelBridge(peer.create_channel(), Role.DEVICE, services={})
        try:
            await peer.prepare_offer()
        except BaseException:
            # Cancelled (new ICE settings) or failed: release its sockets and relays.
            bridge.close("offer not prepared")
            self._background.spawn(peer.close(), name="close unprepared offer")
            raise
        self.offers_prepared += 1
        return peer, bridge

    async def _keep_prepared_fresh(self) -> None:
        """While idle, replace the prepared offer with a new one every ``prepared_max_age``.

        The new one is made before the old one is dropped, so a session that
        arrives meanwhile takes the old one (still within its age) at once.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.prepared_max_age)
            ice = self.ice
            if self.session_id is not None or ice is None:
                return
            current = self._prepared
            if current is not None and not current.done():
                continue  # new settings or a lost relay are being prepared for already
            fresh = loop.create_task(self._prepare(ice), name="prepare")
            try:
                await fresh
            except Exception as exc:  # the old offer stays; try again next period
                log.warning("worker %s: cannot refresh the prepared offer: %s", self.worker_id, exc)
                continue
            peer = fresh.result()[0]
            if _usable_relays(peer) < _usable_relays(_result(current)):
                # Never trade relays for fewer (a TURN server failing now, or
                # lost while gathering): a lost allocation is noticed and
                # re-gathered on its own (_relay_lost), with backoff.
                failed = [*peer.failed_turn_servers(), peer.relay_lost or ""]
                log.warning(
                    "worker %s: %s; keeping the prepared offer",
                    self.worker_id,
                    "; ".join(f for f in failed if f) or "fewer relays",
                )
                self._close_prepared(fresh, "TURN server failed")
                continue
            if self.session_id is not None or ice != self.ice or self._prepared is not current:
                # Assigned meanwhile (it took the old offer), or new settings or a
                # lost relay came (_ice_changed, _relay_lost prepare for them, and
                # say so when done): this one is not wanted.
                self._close_prepared(fresh, "prepared offer not needed")
                continue
            self._discard_prepared("prepared offer replaced")
            self._prepared = fresh
            log.debug("worker %s: prepared offer refreshed", self.worker_id)
            self.offer_refreshed.set()

    def _ice_changed(self, ice: IceConfig) -> None:
        """New ICE settings (fresh TURN credentials): prepare again, in the background."""
        if self.session_id is not None or ice == self.ice:
            return
        log.debug("worker %s: ICE settings changed; preparing a new offer", self.worker_id)
        self.ice = ice
        self._discard_prepared()
        self._prepared = asyncio.get_running_loop().create_task(self._prepare(ice), name="prepare")

    def _relay_lost(self, url: str, reason: str) -> None:
        prepared = self._prepared
        if self.session_id is None and self.ice is not None and prepared is not None:
            if prepared.done():
                self._recheck_prepared(prepared)
            else:  # lost while that offer is being prepared: judge it once it is
                prepared.add_done_callback(self._recheck_prepared)
            return
        peer = self.peer
        if peer is not None and peer.relay_in_use(url):
            self._background.spawn(
                self._end(f"TURN allocation on {url} lost", clean=False, tell_client=True)
            )

    def _recheck_prepared(self, task: asyncio.Task[tuple[PeerSession, TunnelBridge]]) -> None:
        """An idle offer that names a relay which no longer exists is prepared again."""
        if task is not self._prepared or self.session_id is not None or self.ice is None:
            return
        if task.cancelled() or task.exception() is not None or task.result()[0].relay_lost is None:
            return
        self._discard_prepared()
        self._prepared = asyncio.get_running_loop().create_task(
            self._prepare_until_relayed(self.ice), name="prepare"
        )

    async def _prepare_until_relayed(self, ice: IceConfig) -> tuple[PeerSession, TunnelBridge]:
        """Prepare again after a lost allocation, retrying while a TURN server fails.

        In the background, with capped backoff, so that an idle device gets its
        relay back once the server does; a session that arrives meanwhile
        takes the next attempt's offer at once, relay or not.
        """
        delay = 1.0
        while True:
            peer, bridge = await self._prepare(ice)
            # One relay is enough: behind a network that blocks UDP, TURN over
            # UDP fails every time while TURN over TCP serves.
            if _usable_relays(peer):
                log.info("worker %s: offer prepared again with a fresh relay", self.worker_id)
                return peer, bridge
            failed = peer.failed_turn_servers() + ([peer.relay_lost] if peer.relay_lost else [])
            if self._session_waiting.is_set():
                return peer, bridge
            log.warning(
                "worker %s: %s failed; gathering again in %.0f s",
                self.worker_id,
                ", ".join(failed),
                delay,
            )
            bridge.close("TURN server failed")
            await peer.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._session_waiting.wait(), delay)
            delay = min(delay * 2, 15.0)

    def _discard_prepared(self, why: str = "ICE settings changed") -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            self._close_prepared(prepared, why)

    def _close_prepared(
        self, prepared: asyncio.Task[tuple[PeerSession, TunnelBridge]], why: str
    ) -> None:
        """Close a prepared PeerConnection nobody will use (its TURN allocation is freed)."""
        if not prepared.done():
            prepared.cancel()
        elif not prepared.cancelled() and prepared.exception() is None:
            peer, bridge = prepared.result()
            bridge.close(why)
            self._background.spawn(peer.close(), name="close stale offer")

    async def _take_prepared(self, assign: Assign) -> tuple[PeerSession, TunnelBridge]:
        self._session_waiting.set()
        prepared = self._prepared
        wanted = assign.ice
        if prepared is not None and self.ice == wanted:
            try:
                peer, bridge = await prepared
                if peer.relay_lost is None:
                    return peer, bridge
                log.warning(
                    "worker %s: prepared offer is stale: %s", self.worker_id, peer.relay_lost
                )
                bridge.close("stale")
                await peer.close()
            except SessionFailed as exc:
                log.warning("worker %s: prepared offer failed: %s", self.worker_id, exc)
        else:
            if prepared is not None:
                log.info(
                    "worker %s: offer prepared for other ICE settings; "
                    "preparing on the session path",
                    self.worker_id,
                )
            self._discard_prepared()  # prepared for other ICE settings: start over
        return await self._prepare(wanted)

    async def _run_session(self, assign: Assign) -> None:
        services = {name: ServiceAddress(host, port) for name, host, port in assign.services}
        try:
            peer, bridge = await self._take_prepared(assign)
        except SessionFailed as exc:
            await self._end(str(exc), clean=False, tell_client=True)
            return
        peer.session_id = assign.session
        bridge.expose(services, label=f"session {assign.session}: ")
        self.peer, self.bridge = peer, bridge
        pump = asyncio.get_running_loop().create_task(self._pump_signals(peer), name="signals")
        try:
            await peer.send_offer()
            log.debug("session %s: offer sent", assign.session)
            await peer.wait_open(OPEN_TIMEOUT)
            log.debug("session %s: DataChannel open", assign.session)
        except SessionFailed as exc:
            pump.cancel()
            await self._end(str(exc), clean=False, tell_client=True)
            return
        except asyncio.CancelledError:  # released: the negotiation was given up
            pump.cancel()
            raise
        self._connected = True
        path = peer.nominated_path()
        log.info("session %s: connected, %s", assign.session, path or "unknown path")
        await self._send(
            StateReport(
                session=assign.session,
                state="connected",
                path=path.path if path else None,
                pair=path.pair if path else None,
                relay_transport=path.relay_transport if path else None,
            )
        )
        closed = await self.bridge.wait_closed()
        reason = peer.path_lost or closed
        pump.cancel()
        await self._end(reason, clean=True, tell_client=True)

    async def _pump_signals(self, peer: PeerSession) -> None:
        while True:
            signal = await self._inbox.get()
            try:
                if isinstance(signal, Answer):
                    log.debug("session %s: answer received", peer.session_id)
                    await peer.handle_answer(signal.sdp)
                elif isinstance(signal, Candidate):
                    await peer.handle_candidate(signal.candidate)
                elif isinstance(signal, SessionEnd):
                    await self._end(
                        f"client ended the session: {signal.reason}", clean=True, tell_client=False
                    )
                elif isinstance(signal, PeerLeft) and peer.channel is None:
                    await self._end("client left during negotiation", clean=True, tell_client=False)
            except SessionFailed as exc:
                await self._end(str(exc), clean=False, tell_client=True)

    async def _relay_out(self, message: SignalingMessage) -> None:
        if self.session_id is None:
            raise SessionFailed("no session assigned yet")
        await self._send(Relay(session=self.session_id, message=encode_signaling(message)))

    def _state(self, state: str) -> None:
        if self.session_id is not None and state != "connected":
            # "connected" is reported once the DataChannel is open, with its path.
            asyncio.get_running_loop().create_task(
                self._send(StateReport(session=self.session_id, state=state))
            )

    async def _release(self, release: Release) -> None:
        """The supervisor gave this session's negotiation up and told the client.

        Its PeerConnection cannot serve another session (its offer went to a
        client that did not answer): close it, prepare a fresh offer, and be
        idle again. A session whose channel opened meanwhile is ended instead,
        and the worker exits as after any session.
        """
        if release.session != self.session_id or self._ended_sent:
            return
        if self._connected:
            await self._end(release.reason, clean=True, tell_client=False)
            return
        log.info(
            "worker %s: session %s released: %s", self.worker_id, release.session, release.reason
        )
        session, self._session = self._session, None
        if session is not None:
            session.cancel()
            await asyncio.wait([session])
        peer, bridge = self.peer, self.bridge
        self.session_id, self.peer, self.bridge = None, None, None
        self._inbox = asyncio.Queue(maxsize=256)
        self._session_waiting.clear()
        if bridge is not None:
            bridge.close("negotiation given up")
        if peer is not None:
            # Closed before the next assign: its late callbacks find no session.
            await peer.close()
        loop = asyncio.get_running_loop()
        self.ice = self._assigned_ice or self.ice
        if self.ice is not None:
            self._prepared = loop.create_task(self._prepare(self.ice), name="prepare")
            if self._refresh is None or self._refresh.done():
                self._refresh = loop.create_task(self._keep_prepared_fresh(), name="refresh")
        await self._send(Released(session=release.session))

    async def _drain(self, timeout: float) -> None:
        if self.session_id is None:  # released just before the supervisor began to stop
            self._finish("supervisor stopping")
            return
        if self.bridge is None:
            await self._end("supervisor stopping", clean=True, tell_client=True)
            return
        drained = await self.bridge.drain(timeout)
        await self._end(
            "device stopped" if drained else "device stopped (drain timed out)",
            clean=True,
            tell_client=True,
        )

    async def _end(self, reason: str, *, clean: bool, tell_client: bool) -> None:
        if self._ended_sent or self.session_id is None:
            return
        self._ended_sent = True
        reason = reason[:MAX_REASON_LEN]
        if tell_client:
            with contextlib.suppress(SessionFailed):
                await self._relay_out(SessionEnd(session=self.session_id, reason=reason))
        await self._send(Ended(session=self.session_id, reason=reason, clean=clean))
        self._finish(reason)

    async def _close_session(self) -> None:
        if self.bridge is not None:
            self.bridge.close("worker exiting")
        if self.peer is not None:
            await self.peer.close()

    def _finish(self, reason: str) -> None:
        if not self._done.done():
            self._done.set_result(reason)


def _result(
    task: asyncio.Task[tuple[PeerSession, TunnelBridge]] | None,
) -> PeerSession | None:
    """The prepared peer of a finished, successful preparation, else ``None``."""
    if task is None or not task.done() or task.cancelled() or task.exception() is not None:
        return None
    return task.result()[0]


def _heartbeat(bridge: TunnelBridge | None) -> Heartbeat:
    """The session's figures so far, whole and by service (PROTOCOL.md §3)."""
    if bridge is None:
        return Heartbeat()
    total = bridge.stats
    return Heartbeat(
        bytes_in=total.bytes_in,
        bytes_out=total.bytes_out,
        streams=bridge.stream_count,
        services=tuple(
            (name, s.bytes_in, s.bytes_out, s.streams_opened)
            for name, s in bridge.service_stats.items()
        ),
    )


def _usable_relays(peer: PeerSession | None) -> int:
    """How many relays an offer holds that are not known to be lost."""
    if peer is None:
        return 0
    return len(peer.relay_servers()) - (1 if peer.relay_lost is not None else 0)


def worker_main(
    worker_id: str,
    endpoint: str,
    supervisor_pid: int,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    log_level: int = logging.INFO,
    ice: IceConfig | None = None,
    stack_log_level: int = logging.WARNING,
    keepalive: float = DEFAULT_KEEPALIVE,
) -> int:
    """Entry point of a forked worker; returns the process exit code."""
    logging.basicConfig(
        level=log_level,
        stream=sys.stderr,
        format=f"%(asctime)s.%(msecs)03d worker[{os.getpid()}] %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    redact_all_logs()  # the TURN credentials of Assign, in aioice's debug output
    # aiortc/aioice as verbose as in the supervisor: debug at -vv.
    for name in ("aiortc", "aioice"):
        logging.getLogger(name).setLevel(stack_log_level)

    async def main() -> str:
        worker = SessionWorker(
            worker_id,
            endpoint,
            supervisor_pid,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            ice=ice,
            keepalive=keepalive,
        )
        return await worker.run()

    reason = aio.loop.run(main())
    log.info("worker %s exiting: %s", worker_id, reason)
    return 0
