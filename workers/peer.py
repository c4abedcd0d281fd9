"""One WebRTC peer session: an aiortc ``RTCPeerConnection`` and its DataChannel.

:class:`PeerSession` is the thin adapter between aiortc and the signaling
messages of PROTOCOL.md §1: it turns an offer/answer/candidate received from
signaling into aiortc calls, and aiortc's results into messages to send.

The device is the offering peer and creates the DataChannel (PROTOCOL.md §2.1);
the client answers and receives it. aiortc gathers every local candidate before
``setLocalDescription`` returns, so the local candidates travel inside the SDP
and ``end-of-candidates`` follows the offer/answer at once; remote candidates
trickled by the other side (browsers do) are applied as they arrive.

Contract: build with a ``send`` coroutine function for outgoing signaling;
offerer: ``await start_offer()``, then feed ``handle_answer`` / ``handle_candidate``;
answerer: ``await handle_offer(sdp)``, then ``handle_candidate``. Either way
``await wait_open(timeout)`` yields the open channel. ``close()`` is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from protocol.ice import DEFAULT_KEEPALIVE, IcePolicy, IceServer
from protocol.signaling import Answer, Candidate, IceCandidate, Offer, SignalingMessage
from signaling.errors import LinkError
from workers import aiortc_tuning
from workers.aiortc_tuning import failed_servers, lost_relays, relay_transport
from workers.errors import SessionFailed, TunnelUsageError
from workers.ice import rtc_configuration

log = logging.getLogger("tunnelctl.peer")

CHANNEL_PROTOCOL = "tunnelctl/1"
DEFAULT_LABEL = "tunnel"


SendSignal = Callable[[SignalingMessage], Awaitable[None]]

aiortc_tuning.install()


def warm_up_crypto() -> None:
    """Pay OpenSSL's first-use costs now rather than inside a session's handshake.

    A process's first DTLS certificate (~14 ms) and first SSL context (~19 ms)
    are slow because cryptography and pyOpenSSL initialise lazily; later ones
    take under a millisecond. The fork server calls this before forking, and a
    client calls it while its signaling link comes up.
    """
    from aiortc.rtcdtlstransport import SRTP_PROFILES, RTCCertificate

    RTCCertificate.generateCertificate()._create_ssl_context(srtp_profiles=SRTP_PROFILES)


@dataclass(frozen=True, slots=True)
class NominatedPath:
    """The path of the nominated candidate pair, from both of its candidates.

    ``local``/``remote`` are candidate types (``host``, ``srflx``, ``prflx``,
    ``relay``); ``relay_transport`` is how this side reaches its own relay
    (``udp``, ``tcp``, ``tls``), ``None`` when the relay, if any, is the peer's.
    """

    local: str
    remote: str
    relay_transport: str | None = None

    @property
    def path(self) -> str:
        """``relay`` when either candidate is a relay, else ``direct``."""
        return "relay" if "relay" in (self.local, self.remote) else "direct"

    @property
    def pair(self) -> str:
        return f"{self.local}/{self.remote}"

    def __str__(self) -> str:
        via = f" over {self.relay_transport}" if self.relay_transport else ""
        return f"{self.path} path ({self.pair}{via})"


#: Called with the TURN server's URL and why its allocation is gone.
RelayLost = Callable[[str, str], None]


class PeerSession:
    """One peer connection, offering (device) or answering (client)."""

    def __init__(
        self,
        session_id: str,
        send: SendSignal,
        *,
        ice_servers: Sequence[IceServer] = (),
        ice_policy: IcePolicy = "all",
        on_state: Callable[[str], None] | None = None,
        on_relay_lost: RelayLost | None = None,
        channel_protocol: str = CHANNEL_PROTOCOL,
        keepalive: float = DEFAULT_KEEPALIVE,
    ) -> None:
        self.session_id = session_id
        self.keepalive = keepalive
        self.channel_protocol = channel_protocol
        self._send_signal = send
        self._on_state = on_state
        self._on_relay_lost = on_relay_lost
        self.relay_lost: str | None = None
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers, ice_policy))
        self.state = "new"
        self._channel: asyncio.Future[RTCDataChannel] = asyncio.get_running_loop().create_future()
        self._remote_set = False
        self._early_candidates: list[IceCandidate | None] = []
        self._closed = False
        self.pc.on("connectionstatechange", self._connection_state_changed)
        self.pc.on("datachannel", self._remote_channel)

    # -- offering side ---------------------------------------------------

    def create_channel(self, label: str = DEFAULT_LABEL) -> RTCDataChannel:
        """Create the session's DataChannel (offerer only, before ``start_offer``)."""
        channel = self.pc.createDataChannel(label, ordered=True, protocol=self.channel_protocol)
        channel.on("open", lambda: self._resolve_channel(channel))
        aiortc_tuning.set_keepalive(self.pc, self.keepalive)
        self._watch_relays()  # before gathering: an allocation can be lost during it
        return channel

    async def start_offer(self) -> str:
        """Make the offer, send it and end-of-candidates; return the SDP."""
        sdp = await self.prepare_offer()
        await self.send_offer()
        return sdp

    async def prepare_offer(self) -> str:
        """Make the offer and gather candidates, without sending anything yet.

        An idle worker does this ahead of any session, so a session request is
        answered with an offer at once; :meth:`send_offer` sends it later.
        """
        if self.pc.sctp is None:
            self.create_channel()
        if self.pc.localDescription is None:
            await self.pc.setLocalDescription(await self.pc.createOffer())
            self._watch_relays()
        return str(self.pc.localDescription.sdp)

    async def send_offer(self) -> None:
        """Send the prepared offer and end-of-candidates for :attr:`session_id`."""
        if self.pc.localDescription is None:
            raise TunnelUsageError("prepare_offer() first")
        sdp = self.pc.localDescription.sdp
        await self._send(Offer(session=self.session_id, sdp=sdp))
        await self._send(Candidate(session=self.session_id, candidate=None))

    async def handle_answer(self, sdp: str) -> None:
        if self.pc.signalingState != "have-local-offer":
            raise SessionFailed("answer received without an outstanding offer")
        await self._set_remote(RTCSessionDescription(sdp=sdp, type="answer"))

    # -- answering side --------------------------------------------------

    async def handle_offer(self, sdp: str) -> str:
        """Apply the remote offer, send the answer and end-of-candidates; return the SDP."""
        if self.pc.signalingState != "stable" or self._remote_set:
            raise SessionFailed("offer received twice")
        if "\nm=application " not in sdp.replace("\r\n", "\n"):
            # aiortc accepts an offer without media, and the session would then hang.
            raise SessionFailed("invalid offer: it has no DataChannel (m=application) section")
        await self._set_remote(RTCSessionDescription(sdp=sdp, type="offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._watch_relays()
        answer = self.pc.localDescription.sdp
        await self._send(Answer(session=self.session_id, sdp=answer))
        await self._send(Candidate(session=self.session_id, candidate=None))
        return answer

    # -- both --------------------------------------------------------------

    async def handle_candidate(self, candidate: IceCandidate | None) -> None:
        """Apply a trickled remote candidate (``None`` = end-of-candidates)."""
        if not self._remote_set:
            # Candidates may overtake the description on the signaling path.
            if len(self._early_candidates) < 64:
                self._early_candidates.append(candidate)
            return
        await self._add_candidate(candidate)

    async def wait_open(self, timeout: float) -> RTCDataChannel:
        """Wait for the DataChannel to open; raise :class:`SessionFailed` otherwise."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._channel), timeout)
        except TimeoutError:
            raise SessionFailed(
                f"no DataChannel after {timeout:g} s (ICE state {self.pc.iceConnectionState})"
            ) from None

    @property
    def channel(self) -> RTCDataChannel | None:
        if self._channel.done() and not self._channel.cancelled() and not self._channel.exception():
            return self._channel.result()
        return None

    def nominated_path(self) -> NominatedPath | None:
        """The nominated pair's path, or ``None`` before ICE has nominated one."""
        pair = self._nominated_pair()
        if pair is None:
            return None
        local = str(pair.local_candidate.type)
        remote = str(pair.remote_candidate.type)
        if remote == "prflx":
            # A check can overtake the description that announces its source:
            # aioice then keeps a peer-reflexive candidate for what the peer
            # signals later as, say, its relay. The signaled type is the truth.
            address = (pair.remote_candidate.host, pair.remote_candidate.port)
            for candidate in self._ice_connection().remote_candidates:
                if (candidate.host, candidate.port) == address and candidate.type != "prflx":
                    remote = str(candidate.type)
                    break
        return NominatedPath(
            local, remote, relay_transport(pair.protocol) if local == "relay" else None
        )

    def _nominated_pair(self) -> Any:
        connection = self._ice_connection()
        return None if connection is None else connection._nominated.get(1)

    def _ice_connection(self) -> Any:
        sctp = self.pc.sctp
        if sctp is None:
            return None
        return sctp.transport.transport._connection  # aioice keeps no public accessor

    def _watch_relays(self) -> None:
        """Hear of lost relays from now on, and of those lost while gathering."""
        connection = self._ice_connection()
        if connection is not None:
            connection.tunnelctl_on_relay_lost = self._relay_lost
            for url, reason in lost_relays(connection):
                self._relay_lost(url, reason)

    def relay_servers(self) -> list[str]:
        """The TURN server URLs this peer's gathering got a relayed candidate from."""
        connection = self._ice_connection()
        protocols = connection._protocols if connection is not None else []
        return [str(p.tunnelctl_url) for p in protocols if relay_transport(p) is not None]

    def failed_turn_servers(self) -> list[str]:
        """TURN servers this peer's gathering got no relayed candidate from."""
        return [s for s in failed_servers(self._ice_connection()) if s.startswith("TURN")]

    def relay_in_use(self, url: str) -> bool:
        """Whether the nominated pair goes through our relay on TURN server ``url``."""
        pair = self._nominated_pair()
        return pair is not None and getattr(pair.protocol, "tunnelctl_url", None) == url

    def _relay_lost(self, url: str, reason: str) -> None:
        """A TURN allocation of ours is gone (workers.aiortc_tuning noticed)."""
        in_use = self.relay_in_use(url)
        log.warning(
            "session %s: TURN allocation on %s lost%s: %s",
            self.session_id or "(idle)",
            url,
            " (the path in use)" if in_use else "",
            reason,
        )
        if self.relay_lost is None:
            self.relay_lost = f"TURN allocation on {url} lost: {reason}"
        if in_use and not self._channel.done():
            self._channel.set_exception(SessionFailed(self.relay_lost))
            self._channel.exception()
        if self._on_relay_lost is not None:
            self._on_relay_lost(url, reason)

    @property
    def path_lost(self) -> str | None:
        """Why the path died (no answer to consent checks), or ``None`` if it did not."""
        keepalive = aiortc_tuning.consent_expired(self.pc)
        if keepalive is None:
            return None
        return f"path lost: no answer from the peer for {keepalive:g} s"

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._channel.done():
            self._channel.set_exception(SessionFailed("session closed"))
            self._channel.exception()  # mark retrieved: nobody may be waiting
        await self.pc.close()

    # -- internals ---------------------------------------------------------

    async def _send(self, message: SignalingMessage) -> None:
        try:
            await self._send_signal(message)
        except LinkError as exc:
            raise SessionFailed(f"cannot reach the peer through signaling: {exc}") from None

    async def _set_remote(self, description: RTCSessionDescription) -> None:
        try:
            await self.pc.setRemoteDescription(description)
        except (ValueError, AssertionError, IndexError, KeyError) as exc:
            # aiortc's SDP parser signals bad input with whatever it tripped on.
            raise SessionFailed(f"invalid {description.type} from the peer: {exc}") from None
        self._remote_set = True
        aiortc_tuning.set_keepalive(self.pc, self.keepalive)
        self._watch_relays()
        early, self._early_candidates = self._early_candidates, []
        for candidate in early:
            await self._add_candidate(candidate)

    async def _add_candidate(self, candidate: IceCandidate | None) -> None:
        if candidate is None:
            await self.pc.addIceCandidate(None)
            return
        line = candidate.candidate.removeprefix("candidate:")
        if not line.strip():
            return  # an empty candidate string is the browser's end-of-candidates
        try:
            parsed = candidate_from_sdp(line)
        except (ValueError, AssertionError, IndexError) as exc:
            log.warning("session %s: ignoring malformed ICE candidate: %s", self.session_id, exc)
            return
        if parsed.ip.endswith(".local"):
            log.debug("session %s: mDNS candidate %s", self.session_id, parsed.ip)
        parsed.sdpMid = candidate.sdp_mid
        parsed.sdpMLineIndex = candidate.sdp_mline_index
        try:
            await self.pc.addIceCandidate(parsed)
        except (ValueError, AssertionError) as exc:
            log.warning("session %s: ICE candidate rejected: %s", self.session_id, exc)

    def _remote_channel(self, channel: RTCDataChannel) -> None:
        if channel.protocol != self.channel_protocol:
            log.warning(
                "session %s: peer opened a channel with protocol %r, expected %r",
                self.session_id,
                channel.protocol,
                self.channel_protocol,
            )
            channel.close()
            if not self._channel.done():
                self._channel.set_exception(
                    SessionFailed(
                        f"peer speaks {channel.protocol!r}, not {self.channel_protocol!r}"
                    )
                )
                self._channel.exception()
            return
        # A remote channel is announced once DCEP has opened it.
        self._resolve_channel(channel)

    def _resolve_channel(self, channel: RTCDataChannel) -> None:
        if not self._channel.done():
            self._channel.set_result(channel)

    def _connection_state_changed(self) -> None:
        state = str(self.pc.connectionState)
        lost = self.path_lost if state in ("failed", "closed") and not self._closed else None
        if lost is not None:
            # When consent expires, aiortc often closes the DTLS transport, and so the
            # whole connection, before it reports "failed": a lost path is a failure.
            state = "failed"
        if state == self.state:
            return
        self.state = state
        log.debug("session %s: peer connection %s", self.session_id, state)
        if lost is not None:
            log.warning("session %s: %s", self.session_id, lost)
        if state in ("failed", "closed") and not self._channel.done():
            self._channel.set_exception(SessionFailed(f"peer connection {state}"))
            with contextlib.suppress(BaseException):
                self._channel.exception()
        if self._on_state is not None:
            self._on_state(state)
