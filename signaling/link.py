"""A peer's WebSocket link to the signaling server (PROTOCOL.md §1).

:class:`SignalingLink` keeps one authenticated link up: it connects, sends the
``auth`` message (the token never goes into a URL, where proxies log it), waits
for ``welcome``, registers when it speaks for a device, and hands every decoded
message to ``on_message``. When the link drops it reconnects with capped
exponential backoff and full jitter (:class:`protocol.backoff.Backoff`); a close
with code 4401 (bad token) or 4409 (replaced) is final and surfaces as
:class:`LinkRejected`, because retrying cannot fix it.

Several signaling URLs (nodes of one cluster, PROTOCOL.md §1.8) may be given:
the link uses the first that answers, in the order given. A failed attempt
moves on to the next URL after the backoff delay; a link that drops moves on
to the next URL too (the one that dropped it is the likeliest to be down),
wrapping around. A ``moving`` message (a node draining) closes the link and
connects to the next URL at once, without backoff.

Contract: ``start()`` then ``await wait_up()``; ``send()`` while up (raises
:class:`LinkDown` while down); ``close()`` once. ``run_until_closed()``
returns when the link gives up (rejected) or is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from aio.logs import RedactSecrets
from protocol.backoff import Backoff
from protocol.errors import SignalingError
from protocol.signaling import (
    Auth,
    Error,
    Moving,
    Register,
    Registered,
    SignalingMessage,
    Welcome,
    decode_signaling,
    encode_signaling,
)
from signaling.errors import LinkDown, LinkRejected

log = logging.getLogger("tunnelctl.link")


# websockets' own logger (outside "tunnelctl", so -v leaves it quiet; -vv shows
# its frame dumps, redacted).
_wire_log = logging.getLogger("websockets.client")
_wire_log.addFilter(RedactSecrets())

_M = TypeVar("_M", Welcome, Registered)

#: Close codes after which reconnecting is pointless (PROTOCOL.md §1.6).
FINAL_CLOSE_CODES = {4401: "authentication failed", 4409: "replaced by a newer connection"}
HANDSHAKE_TIMEOUT = 10.0
#: Reconnect delays: full jitter up to 10 s, so a device is back within seconds
#: of a signaling server's return (issue 7) while a restarted server still sees
#: its peers spread over those 10 s rather than all at once.
RECONNECT_BACKOFF_CAP = 10.0


class LinkState(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    CLOSED = "closed"


TokenSource = Callable[[], str]


def token_file_source(path: str | os.PathLike[str], first: str) -> TokenSource:
    """The token in ``path`` (``first`` is its content now), read again when the
    file changes: an operator refreshes a token by replacing the file, and the
    next connection uses it. While the file cannot be read or is empty, the
    last good token stays (and is never logged)."""
    current = first
    seen: tuple[int, int] | None = None

    def read() -> str:
        nonlocal current, seen
        try:
            status = os.stat(path)
            stamp = (status.st_mtime_ns, status.st_size)
            if stamp != seen:
                with open(path, encoding="utf-8") as file:
                    text = file.read(64 << 10).strip()
                seen = stamp
                if text:
                    current = text
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read the token file %s (keeping the last token): %s", path, exc)
        return current

    return read


class _Moved(Exception):
    """The server asked this link to move to another node (``moving``)."""


class SignalingLink:
    """One peer's authenticated, self-healing link to the signaling server.

    ``url`` is one signaling URL or a non-empty sequence of them, tried in
    order (module docstring); :attr:`url` is the one in use or tried next.

    ``token`` is the JWT, or a function returning the current one (for
    example :func:`token_file_source`), called for every connection: a link
    closed because its token expired (4401) reconnects at once when the source
    has a new token, and gives up (:class:`LinkRejected`) otherwise. A link
    with a ``device`` registers it, announcing ``services`` (names only) for
    clients' ``list_devices``.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | TokenSource,
        on_message: Callable[[SignalingMessage], None],
        *,
        device: str | None = None,
        services: Sequence[str] = (),
        backoff: Backoff | None = None,
        on_state: Callable[[LinkState], None] | None = None,
        reconnect: bool = True,
        fail_fast: bool = False,
    ) -> None:
        self.urls: tuple[str, ...] = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls:
            raise ValueError("give at least one signaling URL")
        self._index = 0
        self._token = token
        self._used_token = ""
        self._on_message = on_message
        self._device = device
        self._services = tuple(services)
        self._backoff = backoff or Backoff(cap=RECONNECT_BACKOFF_CAP)
        self._on_state = on_state
        self._reconnect = reconnect
        # A command a person just typed should say "cannot reach" at once rather
        # than retry silently; a long-running device keeps trying instead.
        self._fail_fast = fail_fast
        self._ever_up = False
        self.state = LinkState.DOWN
        self._ws: ClientConnection | None = None
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._closing = False

    @property
    def url(self) -> str:
        """The signaling URL in use (or tried next)."""
        return self.urls[self._index]

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("SignalingLink.start() called twice")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="signaling-link")

    async def wait_up(self, timeout: float | None = None) -> None:
        """Wait until authenticated (and registered); raise if the link gave up first."""
        if self._task is None:
            raise RuntimeError("start() the link first")
        up = asyncio.ensure_future(self._up.wait())
        try:
            done, _ = await asyncio.wait(
                {up, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            up.cancel()
        if self._up.is_set():
            return
        if self._task in done:
            self._raise_failure()
            raise LinkDown("signaling link closed")
        raise LinkDown(f"could not reach the signaling server at {self.url} in {timeout:g} s")

    async def run_until_closed(self) -> None:
        """Wait for the link to end; raise :class:`LinkRejected` if it was refused."""
        if self._task is None:
            raise RuntimeError("start() the link first")
        await asyncio.shield(self._task)
        self._raise_failure()

    async def send(self, message: SignalingMessage) -> None:
        ws = self._ws
        if ws is None or not self._up.is_set():
            raise LinkDown("signaling link is down")
        try:
            await ws.send(encode_signaling(message))
        except ConnectionClosed:
            raise LinkDown("signaling link is down") from None

    async def probe(self, timeout: float) -> bool:
        """Check that the server still answers (a WebSocket ping); reconnect if not.

        A link whose network changed under it (a new address, a dead NAT
        mapping) looks up until TCP gives up, minutes later. Call this when
        there is reason to doubt it, e.g. when a peer path just died: without
        a pong within ``timeout`` the connection is dropped and a new one made
        at once. Returns whether the link answered.
        """
        ws = self._ws
        if ws is None or not self._up.is_set():
            return False
        try:
            pong = await ws.ping()
            await asyncio.wait_for(pong, timeout)
            return True
        except (ConnectionClosed, TimeoutError):
            if self._ws is ws:
                log.info(
                    "signaling link to %s did not answer in %g s; reconnecting", self.url, timeout
                )
                self._backoff.reset()
                ws.transport.abort()
            return False

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._set_state(LinkState.CLOSED)

    # -- internals ---------------------------------------------------------

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _set_state(self, state: LinkState) -> None:
        if state is not self.state:
            self.state = state
            log.debug("signaling link %s", state.value)
            if self._on_state is not None:
                self._on_state(state)

    async def _run(self) -> None:
        tried = 0  # URLs that failed since the link was last up
        while not self._closing:
            self._set_state(LinkState.CONNECTING)
            moved = False
            try:
                await self._session()
            except _Moved:
                log.info("signaling node %s is draining; moving to the next URL", self.url)
                moved = True
            except LinkRejected as exc:
                self._failure = exc
                break
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
                tried = 0 if self._up.is_set() else tried + 1
                if self._fail_fast and not self._ever_up and tried >= len(self.urls):
                    self._failure = LinkDown(
                        f"cannot reach the signaling server at {self.url}: {_describe(exc)}"
                    )
                    break
                if not self._closing:  # our own close() is no loss
                    log.info("signaling link to %s lost: %s", self.url, _describe(exc))
            except InvalidURI as exc:
                self._failure = LinkRejected(f"bad signaling URL {self.url!r}: {exc}")
                break
            finally:
                self._ws = None
                self._up.clear()
            if self._closing or not self._reconnect:
                if not self._closing and self._failure is None:
                    self._failure = LinkDown(f"signaling link to {self.url} closed")
                break
            self._set_state(LinkState.DOWN)
            self._index = (self._index + 1) % len(self.urls)
            if moved:
                self._backoff.reset()
                continue
            if self._fail_fast and not self._ever_up:
                continue  # a person is waiting: every URL once, at once
            delay = self._backoff.next_delay()
            log.info("reconnecting to the signaling server in %.1f s", delay)
            await asyncio.sleep(delay)
        self._set_state(LinkState.CLOSED)

    async def _session(self) -> None:
        async with connect(
            self.url, open_timeout=HANDSHAKE_TIMEOUT, max_size=65536, logger=_wire_log
        ) as ws:
            self._ws = ws
            token = self._token() if callable(self._token) else self._token
            self._used_token = token
            await ws.send(encode_signaling(Auth(token=token)))
            try:
                await asyncio.wait_for(self._handshake(ws), HANDSHAKE_TIMEOUT)
            except ConnectionClosed as exc:
                self._check_final(exc)
                raise
            self._backoff.reset()
            self._ever_up = True
            self._up.set()
            self._set_state(LinkState.UP)
            try:
                async for raw in ws:
                    if self._dispatch(raw):
                        await ws.close(1000, "moving to another node")
                        raise _Moved
            except ConnectionClosed as exc:
                self._check_final(exc)
                raise
            self._check_final_code(ws.close_code, ws.close_reason)
            raise ConnectionError(f"closed by the server ({ws.close_code} {ws.close_reason})")

    async def _handshake(self, ws: ClientConnection) -> None:
        await self._expect(ws, Welcome)
        if self._device is not None:
            register = Register(device=self._device, services=self._services)
            await ws.send(encode_signaling(register))
            await self._expect(ws, Registered)

    async def _expect(self, ws: ClientConnection, kind: type[_M]) -> _M:
        while True:
            message = _decode(await ws.recv())
            if isinstance(message, kind):
                return message
            if isinstance(message, Error):
                raise LinkRejected(f"signaling server refused: {message.message}")
            if isinstance(message, Moving):
                raise _Moved
            if message is not None:
                self._on_message(message)

    def _dispatch(self, raw: str | bytes) -> bool:
        """Hand ``raw`` on; returns whether it is ``moving`` (kept from ``on_message``)."""
        message = _decode(raw)
        if isinstance(message, Moving):
            return True
        if message is not None:
            self._on_message(message)
        return False

    def _check_final(self, exc: ConnectionClosed) -> None:
        if exc.rcvd is not None:
            self._check_final_code(exc.rcvd.code, exc.rcvd.reason)

    def _check_final_code(self, code: int | None, reason: str | None) -> None:
        if code == 4401 and callable(self._token) and self._token() != self._used_token:
            # Re-authenticating is connecting again; established sessions do
            # not depend on this link.
            log.info(
                "signaling server closed the link (%s); reconnecting with the new token", reason
            )
            self._backoff.reset()
            return
        if code in FINAL_CLOSE_CODES:
            raise LinkRejected(
                f"signaling server closed the link: {reason or FINAL_CLOSE_CODES[code]}"
            )


def _decode(raw: str | bytes) -> SignalingMessage | None:
    try:
        return decode_signaling(raw)
    except SignalingError as exc:
        # The server is trusted but not infallible; one bad message is not a reason to drop it.
        log.warning("ignoring malformed message from the signaling server: %s", exc)
        return None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
