"""A running ``tunnelctl connect``: forwards to one or more devices, and its state.

:class:`ClientApp` runs a :class:`~workers.client_config.ClientPlan`: one
:class:`~workers.client.ClientTunnel` (one peer session) per device, shared by
every forward to that device, and the control endpoint
(:mod:`workers.client_control`) that reports its state and carries streams
handed over by ``connect --stdio``.

Start-up fails fast, before any session is requested: a forward whose address
cannot be listened on, a device the token does not grant, a service the device
does not expose (asked with ``list_devices``, PROTOCOL.md §1.3), an offline
device unless the plan waits for it. Each raises a
:class:`~workers.errors.TunnelError` with one line for the user.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.backoff import Backoff
from signaling.link import TokenSource
from workers.client import ClientTunnel, PortForward, carry
from workers.client_config import ClientPlan, DeviceForwards
from workers.client_control import ControlEndpoint
from workers.errors import (
    DeviceOffline,
    ListenFailed,
    ServiceNotExposed,
    SignalingRejected,
    TunnelError,
)
from workers.handoff import splice_stdio

log = logging.getLogger("tunnelctl.client")

#: While waiting for an offline device, it is looked for at most this often (seconds).
WAIT_POLL_CAP = 5.0


@dataclass(eq=False)
class DeviceSession:
    """One device: its tunnel, its forwards, the services it exposes (when known)."""

    spec: DeviceForwards
    tunnel: ClientTunnel
    forwards: list[PortForward] = field(default_factory=list)
    services: tuple[str, ...] | None = None


class ClientApp:
    """Serve ``plan`` until a device fails for good or the task is cancelled."""

    def __init__(
        self,
        plan: ClientPlan,
        token: str | TokenSource,
        *,
        control_path: Path | None = None,
        on_ready: Callable[[str], None] = print,
    ) -> None:
        self.plan = plan
        self.started = time.time()
        self._on_ready = on_ready
        self.devices = [
            DeviceSession(
                spec,
                ClientTunnel(
                    signal_url=plan.signal_urls,
                    device=spec.device,
                    token=token,
                    ice_servers=plan.ice_servers,
                    ice_policy=plan.ice_policy,
                    keepalive=plan.keepalive,
                ),
            )
            for spec in plan.devices
        ]
        for entry in self.devices:
            entry.tunnel.essential_services = frozenset(entry.spec.services)
        self._control = ControlEndpoint(control_path, self) if control_path else None

    async def run(self) -> TunnelError:
        """Start everything; return the first failure that retrying cannot fix.

        Raises :class:`TunnelError` when start-up fails.
        """
        await self.listen()
        if self._control is not None:
            await self._control.start()
        await asyncio.gather(*(entry.tunnel.start_link() for entry in self.devices))
        await self.check_devices()
        await self.open()
        for entry in self.devices:
            entry.tunnel.keep_alive()
        waits = [asyncio.ensure_future(e.tunnel.wait_fatal()) for e in self.devices]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return next(iter(done)).result()

    async def serve_stdio(self, service: str, stdin: int = 0, stdout: int = 1) -> int:
        """Carry one stream to ``service`` on the only device over ``stdin``/``stdout``.

        Returns 0 when the stream ended cleanly, 1 when it was reset. The pipes
        are copied by :func:`workers.handoff.splice_stdio` in a thread, on one
        end of a socket pair whose other end the tunnel carries like any
        accepted connection.
        """
        (entry,) = self.devices
        entry.tunnel.essential_services = frozenset({service})
        await asyncio.gather(*(e.tunnel.start_link() for e in self.devices))
        await self.check_devices(also=(service,))
        await self.open()
        entry.tunnel.keep_alive()
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=theirs)
        await carry(entry.tunnel, service, reader, writer)
        loop = asyncio.get_running_loop()
        spliced: asyncio.Future[int] = loop.create_future()

        def settle(code: int) -> None:
            if not spliced.done():
                spliced.set_result(code)

        def splice() -> None:
            with ours:
                code = splice_stdio(ours, stdin, stdout)
            loop.call_soon_threadsafe(settle, code)

        # A daemon thread, not the loop's executor: a thread blocked reading
        # stdin must not hold the process when the session fails.
        threading.Thread(target=splice, name="stdio", daemon=True).start()
        fatal = asyncio.ensure_future(entry.tunnel.wait_fatal())
        waiting: set[asyncio.Future[Any]] = {spliced, fatal}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            fatal.cancel()
        if spliced.done() and entry.tunnel.fatal is None:
            return spliced.result()
        raise await entry.tunnel.wait_fatal()

    async def listen(self) -> None:
        """Bind every forward's address; raise :class:`ListenFailed` on the first that fails."""
        for entry in self.devices:
            for spec in entry.spec.forwards:
                forward = PortForward(entry.tunnel, spec.service, spec.host, spec.port)
                try:
                    await forward.start()
                except OSError as exc:
                    raise ListenFailed(
                        f"cannot listen on {spec.listen} for {entry.spec.device}/{spec.service}: "
                        f"{exc.strerror or exc}"
                    ) from None
                entry.forwards.append(forward)

    async def check_devices(self, also: tuple[str, ...] = ()) -> None:
        """Check, before any session is requested, that every device is granted, online
        (or, with ``plan.wait``, wait until it is) and exposes the services forwarded to
        it, and those named in ``also``.
        """
        tunnel = self.devices[0].tunnel
        deadline = None if self.plan.wait is None else time.monotonic() + self.plan.wait
        backoff = Backoff(base=0.5, cap=WAIT_POLL_CAP)
        announced = False
        while True:
            listing = {info.device: info for info in await tunnel.list_devices()}
            offline = []
            for entry in self.devices:
                info = listing.get(entry.spec.device)
                if info is None:
                    granted = ", ".join(listing) or "none"
                    raise SignalingRejected(
                        f"the token does not grant device {entry.spec.device} "
                        f"(it grants: {granted})"
                    )
                if not info.online:
                    offline.append(entry.spec.device)
                    continue
                # An online device that announces nothing runs an older tunnelctl: its
                # services are unknown here and are checked when a stream opens.
                entry.services = info.services or None
                wanted = entry.spec.services + also
                missing = [s for s in wanted if info.services and s not in info.services]
                if missing:
                    raise ServiceNotExposed(
                        f"device {entry.spec.device} does not expose service {missing[0]!r} "
                        f"(it exposes: {', '.join(info.services)})"
                    )
            if not offline:
                return
            names = ", ".join(offline)
            if deadline is None:
                raise DeviceOffline(
                    f"device {names} is offline (not connected to the signaling server); "
                    "--wait waits for it"
                )
            delay = backoff.next_delay()
            if time.monotonic() + delay > deadline:
                raise DeviceOffline(f"device {names} still offline after {self.plan.wait:g} s")
            if not announced:
                log.warning("device %s is offline; waiting for it", names)
                announced = True
            await asyncio.sleep(delay)  # no presence events (PROTOCOL.md §1.3): ask again

    async def open(self) -> None:
        """Open every device's session at once; report each forward as it serves."""

        async def open_one(entry: DeviceSession) -> None:
            await entry.tunnel.open()
            tunnel = entry.tunnel
            opened = f"DataChannel open in {(tunnel.open_seconds or 0) * 1000:.0f} ms"
            path = tunnel.peer.nominated_path() if tunnel.peer else None
            self._on_ready(f"connected {entry.spec.device} ({opened}, {path or 'unknown path'})")
            for forward in entry.forwards:
                self._on_ready(
                    f"forwarding {_address(forward.host, forward.port)} -> "
                    f"{entry.spec.device}/{forward.service} ({opened}, {path or 'unknown path'})"
                )

        await asyncio.gather(*(open_one(entry) for entry in self.devices))

    async def close(self) -> None:
        if self._control is not None:
            await self._control.close()
        for entry in self.devices:
            for forward in entry.forwards:
                await forward.close()
        await asyncio.gather(*(entry.tunnel.close() for entry in self.devices))

    # -- the control endpoint's questions (workers.client_control.ClientState) --

    def refuse_stream(self, device: str, service: str) -> str | None:
        entry = self._device(device)
        if entry is None:
            return f"this client (pid {os.getpid()}) has no session with device {device}"
        if entry.tunnel.fatal is not None:
            return f"this client's session with device {device} failed: {entry.tunnel.fatal}"
        if entry.services is not None and service not in entry.services:
            return f"device {device} does not expose service {service!r}"
        return None

    async def carry(
        self, device: str, service: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        entry = self._device(device)
        assert entry is not None  # refuse_stream said yes
        await carry(entry.tunnel, service, reader, writer)

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "signal": list(self.plan.signal_urls),
            "devices": [_device_status(entry) for entry in self.devices],
        }

    def _device(self, device: str) -> DeviceSession | None:
        return next((e for e in self.devices if e.spec.device == device), None)


def _device_status(entry: DeviceSession) -> dict[str, Any]:
    tunnel = entry.tunnel
    bridge, peer = tunnel.bridge, tunnel.peer
    path = peer.nominated_path() if peer is not None and bridge is not None else None
    if tunnel.fatal is not None:
        state = "failed"
    elif bridge is not None and not bridge.is_closed:
        state = "open"
    elif tunnel.open_seconds is None:
        state = "connecting"
    else:
        state = "reconnecting"
    live_in = bridge.stats.bytes_in if bridge is not None else 0
    live_out = bridge.stats.bytes_out if bridge is not None else 0
    return {
        "device": entry.spec.device,
        "state": state,
        "session": peer.session_id if peer is not None else None,
        "path": path.path if path is not None else None,
        "pair": path.pair if path is not None else None,
        "relay_transport": path.relay_transport if path is not None else None,
        "bytes_in": tunnel.ended_bytes_in + live_in,
        "bytes_out": tunnel.ended_bytes_out + live_out,
        "streams": bridge.stream_count if bridge is not None else 0,
        "reconnects": tunnel.reconnects,
        "services": list(entry.services) if entry.services is not None else None,
        "forwards": [
            {"service": f.service, "listen": _address(f.host, f.port)} for f in entry.forwards
        ],
        "error": str(tunnel.fatal) if tunnel.fatal is not None else None,
    }


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
