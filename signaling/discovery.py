"""A client's discovery query: ``list_devices`` and its ``devices`` answer (PROTOCOL.md §1.3).

:class:`DeviceQuery` gathers one answer, which may come in several ``devices``
messages (``more`` on all but the last); :func:`list_devices` asks over an up
:class:`~signaling.link.SignalingLink` whose ``on_message`` hands messages to
:meth:`DeviceQuery.feed`. Used by ``tunnelctl devices`` (with a link of its own)
and by ``tunnelctl connect`` before it requests a session (on its tunnel's link).
"""

from __future__ import annotations

import asyncio

from protocol.signaling import DeviceInfo, Devices, Error, ListDevices, SignalingMessage
from signaling.errors import LinkDown, LinkRejected
from signaling.link import SignalingLink

QUERY_TIMEOUT = 10.0


class DeviceQuery:
    """One ``list_devices`` answer being gathered; feed it every message of the link."""

    def __init__(self) -> None:
        self._pages: list[DeviceInfo] = []
        self._answer: asyncio.Future[tuple[DeviceInfo, ...]] | None = None

    def start(self) -> None:
        self._pages = []
        self._answer = asyncio.get_running_loop().create_future()

    def feed(self, message: SignalingMessage) -> bool:
        """Take ``message`` if it belongs to the answer; return whether it did."""
        answer = self._answer
        if answer is None or answer.done():
            return False
        if isinstance(message, Devices):
            self._pages.extend(message.devices)
            if not message.more:
                answer.set_result(tuple(self._pages))
            return True
        if isinstance(message, Error) and message.session is None:
            answer.set_exception(LinkRejected(f"signaling server refused: {message.message}"))
            return True
        return False

    def take(self, message: SignalingMessage) -> None:
        """:meth:`feed` as a link's ``on_message`` (a link that only asks this)."""
        self.feed(message)

    async def result(self, timeout: float) -> tuple[DeviceInfo, ...]:
        assert self._answer is not None, "start() first"
        try:
            return await asyncio.wait_for(asyncio.shield(self._answer), timeout)
        except TimeoutError:
            raise LinkDown(f"the signaling server did not list devices in {timeout:g} s") from None


async def list_devices(
    link: SignalingLink, query: DeviceQuery, timeout: float = QUERY_TIMEOUT
) -> tuple[DeviceInfo, ...]:
    """Ask once over ``link`` (up); raise :class:`LinkDown` or :class:`LinkRejected`."""
    query.start()
    await link.send(ListDevices())
    return await query.result(timeout)
