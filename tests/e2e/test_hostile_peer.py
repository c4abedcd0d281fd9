"""End to end: a hostile client peer against a real device (PROTOCOL.md §2.3-2.6).

Each test negotiates a real session with a real worker process and then writes
raw DataChannel messages (see ``hostile_support``). A stream-level fault must
come back as a RESET with the code §2 names while the session's other streams
keep working; a session-level fault must close the session with the reason
logged, and the device must go on serving new sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from protocol.frames import (
    HEADER_SIZE,
    INITIAL_WINDOW,
    MAX_MESSAGE_SIZE,
    MAX_PAYLOAD,
    MAX_WINDOW,
    Data,
    Fin,
    FrameType,
    Open,
    Reset,
    ResetCode,
    Window,
    encode_frames,
)
from tests.e2e.conftest import PAGE, READY
from tests.e2e.hostile_support import (
    FLOOD_SIZE,
    REPLY,
    HostileClient,
    HostileDevice,
    hostile_client,
    http_body,
    raw_frame,
    running_device,
    tcp_queues,
    vm_rss,
)
from tests.e2e.test_tunnel import http_get
from workers.bridge import READ_SIZE, STREAM_SEND_HIGH

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("loopback_ice")]

#: Messages the non-reading peer sends at most (13 MB of frames).
FLOOD_MESSAGES = 200


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileDevice]:
    """One device for the module: starting one costs seconds, and every test
    opening its session on a device earlier tests attacked is itself a check."""
    with running_device(tmp_path_factory.mktemp("hostile")) as hostile_device:
        yield hostile_device


async def assert_device_serves(device: HostileDevice, client: str) -> None:
    """A new, well-behaved session on ``device`` gets the page (the device is fine)."""
    async with hostile_client(device, client) as fresh:
        assert await fresh.http_get("/") == PAGE
        assert fresh.violations == []


async def assert_session_error(device: HostileDevice, client: HostileClient, reason: str) -> str:
    """The worker closed the session for ``reason`` (a §2.6 session error): the
    device says so through signaling and ``sessions --json``, the DataChannel
    closes, and the worker logged it. Returns the full reason."""
    ended = await client.wait_ended()
    assert ended.startswith("protocol error: ") and reason in ended, ended
    await client.wait_channel_closed()
    row = await device.session_row(client.session_id, lambda r: r["state"] == "exited")
    assert row["reason"] == ended
    return ended


def assert_logged(device: HostileDevice, ended: str) -> None:
    detail = ended.removeprefix("protocol error: ")
    assert device.log_lines(f"tunnel protocol error, closing the session: {detail}"), (
        device.supervisor.stderr_tail(20)
    )


def frame(kind: int, stream_id: int, payload: bytes = b"", **header: Any) -> bytes:
    """A frame with any type byte, flags and length (see ``raw_frame``)."""
    return raw_frame(kind, stream_id, payload, **header)


# -- session errors (§2.6) ---------------------------------------------------------

#: (test id, the message, the reason the worker must give).
SESSION_ERRORS: list[tuple[str, bytes | str, str]] = [
    ("short-header", b"\x03\x00\x00\x00", "short frame header at offset 0: 4 bytes"),
    (
        "length-past-end",
        frame(FrameType.DATA, 1, b"hi", length=5),
        "has length 5, running 3 bytes past the end",
    ),
    (
        # Too short a length leaves the rest of the payload to be read as a header.
        "length-too-short",
        frame(FrameType.DATA, 1, b"hello", length=1),
        "short frame header at offset 9: 4 bytes",
    ),
    ("unknown-type", frame(0x09, 1), "unknown frame type 0x09"),
    ("type-zero", frame(0x00, 1), "unknown frame type 0x00"),
    ("non-zero-flags", frame(FrameType.FIN, 1, flags=0x01), "non-zero flags 0x01"),
    ("stream-id-0", frame(FrameType.WINDOW, 0, (1).to_bytes(4, "big")), "reserved stream id 0"),
    ("open-even-id", frame(FrameType.OPEN, 2, b"web"), "the client must open odd stream ids"),
    # Stream 1 is the one the test's good request used.
    (
        "open-same-id",
        frame(FrameType.OPEN, 1, b"web"),
        "OPEN stream 1: not above the peer's previous id 1",
    ),
    (
        # 99 was never used, but ids only increase: it can never be opened now.
        "open-lower-id",
        frame(FrameType.OPEN, 101, b"web") + frame(FrameType.OPEN, 99, b"web"),
        "OPEN stream 99: not above the peer's previous id 101",
    ),
    ("open-bad-service-name", frame(FrameType.OPEN, 1001, b"../etc"), "invalid service name"),
    ("window-zero", frame(FrameType.WINDOW, 1, bytes(4)), "increment 0 out of range"),
    ("text-message", "hello", "text message on the tunnel channel"),
    ("empty-text-message", "", "text message on the tunnel channel"),
    ("empty-binary-message", b"", "empty message"),
    ("oversized-message", bytes(MAX_MESSAGE_SIZE + 1), "message of 65537 bytes exceeds 65536"),
    (
        # A good frame first: the whole message is decoded before any of it is acted on.
        "good-then-bad",
        frame(FrameType.FIN, 1) + frame(FrameType.DATA, 1, b""),
        "DATA stream 1: empty payload",
    ),
]


@pytest.mark.parametrize(
    ("message", "reason"), [c[1:] for c in SESSION_ERRORS], ids=[c[0] for c in SESSION_ERRORS]
)
async def test_session_error_closes_the_session_and_the_device_serves_on(
    device: HostileDevice, message: bytes | str, reason: str, request: pytest.FixtureRequest
) -> None:
    name = request.node.callspec.id
    async with hostile_client(device, f"bad-{name}") as client:
        # A good stream first: the session worked until the bad message.
        assert await client.http_get("/") == PAGE
        client.send(message)
        ended = await assert_session_error(device, client, reason)
        assert client.violations == []
    await assert_device_serves(device, f"after-{name}")
    assert_logged(device, ended)


async def test_a_real_client_is_served_after_a_session_error(device: HostileDevice) -> None:
    async with hostile_client(device, "bad-before-cli") as client:
        client.send(frame(0x09, 1))
        await assert_session_error(device, client, "unknown frame type 0x09")
    child, address = device.tunnel.forward(device.device_id)  # `tunnelctl connect`
    try:
        body = await asyncio.to_thread(http_get, address, "/big")
        assert hashlib.sha256(body).hexdigest() == device.tunnel.web.big_sha256
    finally:
        child.stop()


# -- stream errors (§2.3-2.5): a RESET back, the session goes on ------------------------


async def test_frames_for_never_opened_streams_get_unknown_stream(device: HostileDevice) -> None:
    async with hostile_client(device, "unknown-streams") as client:
        good = client.begin_http_get("/")
        above = client.next_stream_id() + 2  # odd, above the last OPEN: never opened
        mark = len(client.frames)
        client.send_frames(  # bad frames and a good one in one message
            Data(above, b"data for nobody"),
            Data(good, b"X-Between: bad frames\r\n"),
            Fin(above + 2),
            Window(above + 4, 1000),
            Reset(above + 6, ResetCode.CANCEL),  # a RESET is never answered with a RESET
            Data(2, b"even: the device never opened a stream"),
            Window(4, 1),
        )
        for stream_id in (above, above + 2, above + 4, 2, 4):
            reset = await client.expect_reset(stream_id, ResetCode.UNKNOWN_STREAM)
            assert reset.reason == "stream was never opened"
        assert await client.finish_http_get(good) == PAGE
        await client.probe()  # everything before it was processed: the RESET got no answer
        assert not [f for f in client.frames[mark:] if f.stream_id == above + 6]
        assert client.violations == []


async def test_frames_for_closed_streams_are_ignored(device: HostileDevice) -> None:
    async with hostile_client(device, "closed-streams") as client:
        assert await client.http_get("/") == PAGE  # stream 1: both halves closed
        finished = 1
        cancelled = client.next_stream_id()  # closed by our RESET
        client.send_frames(Open(cancelled, "web"), Reset(cancelled, ResetCode.CANCEL))
        for stream_id in (finished, cancelled):
            client.send_frames(
                Data(stream_id, b"late"),
                Fin(stream_id),
                Window(stream_id, MAX_WINDOW),
                Reset(stream_id, ResetCode.CANCEL),
            )
        # Ordered channel: the worker answered the probe, so it processed all of the
        # above first, and answered none of it.
        assert await client.probe() == []
        assert await client.http_get("/") == PAGE
        assert client.violations == []


async def test_window_overflow_resets_flow_control(device: HostileDevice) -> None:
    async with hostile_client(device, "window-overflow") as client:
        good = client.begin_http_get("/")
        victim = client.next_stream_id()
        client.send_frames(Open(victim, "web"), Window(victim, MAX_WINDOW - INITIAL_WINDOW))
        assert await client.probe() == []  # credit exactly 2**31-1: allowed
        client.grant(victim, 1)
        reset = await client.expect_reset(victim, ResetCode.FLOW_CONTROL)
        assert reset.reason == f"WINDOW lifts credit to {MAX_WINDOW + 1}, above {MAX_WINDOW}"
        assert await client.finish_http_get(good) == PAGE
        # A single increment that overflows at once, on a fresh stream.
        again = client.next_stream_id()
        client.send_frames(Open(again, "web"), Window(again, MAX_WINDOW))
        await client.expect_reset(again, ResetCode.FLOW_CONTROL)
        assert await client.http_get("/") == PAGE
        assert client.violations == []


async def test_data_beyond_credit_resets_flow_control(device: HostileDevice) -> None:
    """The ``stalled`` service never accepts the worker's connect, so the worker
    holds what we send and grants nothing back: our credit is exactly the
    initial window, and one byte more is a violation."""
    async with hostile_client(device, "beyond-credit") as client:
        good = client.begin_http_get("/")
        victim = client.next_stream_id()
        client.send_frames(Open(victim, "stalled"))
        chunk = bytes(MAX_PAYLOAD)
        sent = 0
        while sent < INITIAL_WINDOW:
            size = min(len(chunk), INITIAL_WINDOW - sent)
            client.send_frames(Data(victim, chunk[:size]))
            sent += size
        assert await client.probe() == []  # exactly the credit: fine
        client.send_frames(Data(victim, b"!"))
        reset = await client.expect_reset(victim, ResetCode.FLOW_CONTROL)
        assert reset.reason == "DATA of 1 bytes beyond credit of 0"
        assert await client.finish_http_get(good) == PAGE
        assert client.violations == []


@pytest.mark.parametrize("late", ["data", "fin"])
async def test_data_or_fin_after_fin_resets_protocol(device: HostileDevice, late: str) -> None:
    async with hostile_client(device, f"after-fin-{late}") as client:
        good = client.begin_http_get("/")
        victim = client.next_stream_id()
        client.send_frames(Open(victim, "stalled"), Data(victim, b"x"), Fin(victim))
        client.send_frames(Data(victim, b"late") if late == "data" else Fin(victim))
        reset = await client.expect_reset(victim, ResetCode.PROTOCOL)
        assert reset.reason == ("DATA after FIN" if late == "data" else "FIN after FIN")
        assert await client.finish_http_get(good) == PAGE
        assert client.violations == []


async def test_open_of_an_unexposed_service_is_reset(device: HostileDevice) -> None:
    async with hostile_client(device, "unexposed") as client:
        good = client.begin_http_get("/")
        victim = client.next_stream_id()
        client.send_frames(Open(victim, "ssh"), Data(victim, b"SSH-2.0-x\r\n"))
        reset = await client.expect_reset(victim, ResetCode.UNKNOWN_SERVICE)
        assert reset.reason == "service 'ssh' is not exposed"
        assert await client.finish_http_get(good) == PAGE
        assert client.violations == []


# -- a peer that never grants credit ------------------------------------------------------


async def test_a_peer_that_never_grants_credit_holds_the_worker_to_the_window(
    device: HostileDevice,
) -> None:
    """The ``flood`` service tries to send 64 MiB; the peer never sends WINDOW.

    The worker forwards exactly the initial window, then stops reading the
    service's socket: the service gets no further than the window, the bridge's
    own buffers and the two kernel socket buffers, and the worker's memory stays
    flat. Meanwhile another stream of the same session still carries a 16 MiB
    download; and once the peer grants credit, the flood moves again."""
    async with hostile_client(device, "no-credit") as client:
        pid = client.worker_pid
        baseline = vm_rss(pid)
        rss: list[int] = []
        flood_index = len(device.flood.connections)
        victim = client.next_stream_id()
        client.send_frames(Open(victim, "flood"))
        flood = await asyncio.to_thread(device.flood.wait_connection, flood_index, REPLY)
        flood.on_progress = lambda _: rss.append(vm_rss(pid))
        await client.wait_received(victim, INITIAL_WINDOW)
        assert await asyncio.to_thread(flood.stalled.wait, REPLY)
        # Stalled. Account for every byte the service managed to write.
        service_port = device.flood.port
        unsent, _ = tcp_queues(service_port, flood.peer_port)  # service side
        _, unread = tcp_queues(flood.peer_port, service_port)  # worker side
        in_worker = flood.sent - unsent - unread
        rss.append(vm_rss(pid))
        print(
            f"\nflood: service wrote {flood.sent} of {FLOOD_SIZE} bytes: {unsent} in its "
            f"socket's send queue, {unread} in the worker's receive queue, {in_worker} read "
            f"by the worker ({client.received_bytes(victim)} of them sent to us); worker "
            f"VmRSS {baseline >> 10} KiB before, peak {(max(rss) - baseline) >> 10} KiB above"
        )
        assert client.received_bytes(victim) == INITIAL_WINDOW
        # What the worker read: the window it sent, at most STREAM_SEND_HIGH (+ one
        # read) waiting in the mux, and the asyncio reader's buffer (it pauses above
        # 2 * READ_SIZE, plus one transport read of up to 256 KiB).
        assert (
            INITIAL_WINDOW
            <= in_worker
            <= (INITIAL_WINDOW + STREAM_SEND_HIGH + 3 * READ_SIZE + 256 * 1024)
        )
        assert flood.sent < FLOOD_SIZE // 4
        assert max(rss) - baseline < 16 * 1024 * 1024

        # The stalled stream stops only itself: a big download on the same session.
        body = await client.http_get("/big", timeout=READY * 2)
        assert hashlib.sha256(body).hexdigest() == device.tunnel.web.big_sha256
        assert client.received_bytes(victim) == INITIAL_WINDOW

        # Credit moves it again; a RESET makes the worker drop the service's connection.
        before = flood.sent
        client.grant(victim, 4 * INITIAL_WINDOW)
        await client.wait_received(victim, 5 * INITIAL_WINDOW)
        await asyncio.to_thread(flood.wait_sent_above, before, REPLY)
        client.send_frames(Reset(victim, ResetCode.CANCEL))
        assert await asyncio.to_thread(flood.finished.wait, REPLY)
        assert isinstance(flood.error, ConnectionResetError), flood.error
        assert flood.sent < FLOOD_SIZE
        assert client.violations == []


# -- a peer that provokes replies and does not read them ------------------------------------


async def test_a_peer_that_does_not_read_cannot_make_the_worker_queue_replies(
    device: HostileDevice,
) -> None:
    """Every frame for a never-opened stream asks for a RESET back (§2.3). A peer
    that stops reading (here: its SCTP drops what the device sends, unacknowledged)
    fills the channel's buffer; the worker then stops handing messages to aiortc
    and the RESETs wait in the multiplexer. Without a cap they pile up for as long
    as the peer keeps sending, about 270 KB of frames (and more of Python objects)
    per 64 KiB message; with the cap of §2.6 the session ends."""
    async with hostile_client(device, "no-read") as client:
        pid = client.worker_pid
        baseline = vm_rss(pid)
        client.stop_reading()
        frames_per_message = MAX_MESSAGE_SIZE // HEADER_SIZE
        message = encode_frames(Fin(2 * (i + 1)) for i in range(frames_per_message))
        peak = baseline
        sent = 0
        while sent < FLOOD_MESSAGES and not client.channel_closed:
            client.send(message)
            sent += 1
            await client.wait_sent()  # the worker's SCTP took all but the last message
            with contextlib.suppress(ProcessLookupError):  # the worker may be gone already
                peak = max(peak, vm_rss(pid))
            if client.ended:
                break
        print(
            f"\nno-read: {sent} messages of {frames_per_message} FIN frames sent; worker "
            f"VmRSS {baseline >> 10} KiB before, peak {(peak - baseline) >> 10} KiB above"
        )
        ended = await assert_session_error(device, client, "does not read")
        assert peak - baseline < 8 * 1024 * 1024
    await assert_device_serves(device, "after-no-read")
    assert_logged(device, ended)


# -- the worker's side of the channel opening -------------------------------------------------


async def test_first_message_is_never_lost(device: HostileDevice) -> None:
    """A client may send the moment its DataChannel opens (``tunnelctl connect``
    does when a local connection is already waiting for the tunnel). Each of
    these sessions sends its request at once; every one must be answered.

    The worker used to attach its bridge only after ``await wait_open()``
    resumed, and aiortc hands a message to whoever listens at that moment or to
    nobody: most such requests were lost (fixed in cfd2592; this is the
    end-to-end check, 8 sessions so that a race would show)."""
    for attempt in range(8):
        client = HostileClient(device, f"eager-{attempt}")
        try:
            stream_id = client.next_stream_id()
            await client.open(first=functools.partial(client.start_http_get, stream_id, "/"))
            try:
                body = http_body(await client.read_stream(stream_id, timeout=5))
            except AssertionError:
                row = await device.session_row(client.session_id, lambda r: True)
                raise AssertionError(
                    f"attempt {attempt}: the request sent as the channel opened was never "
                    f"answered; the worker counted {row['bytes_in']} bytes in"
                ) from None
            assert body == PAGE
        finally:
            await client.close()


# -- messages larger than §2.1 allows --------------------------------------------------------


async def test_our_aiortc_refuses_to_send_more_than_the_device_advertises(
    device: HostileDevice,
) -> None:
    """The device's SDP says ``max-message-size:262144`` (aiortc's own limit, not
    §2.1's 65 536), so a 65 537-byte message reaches the worker (the session
    error above) but an aiortc peer cannot even send 262 145 bytes."""
    async with hostile_client(device, "too-big-to-send") as client:
        with pytest.raises(ValueError, match="only supports messages up to 262144 bytes"):
            client.send(bytes(262144 + 1))
        assert await client.http_get("/") == PAGE


async def test_an_oversized_message_is_refused_before_it_is_reassembled(
    device: HostileDevice,
) -> None:
    size = 2 * 1024 * 1024
    async with hostile_client(device, "huge") as client:
        client.lift_message_size_limit()
        client.send(bytes(size))
        await client.wait_ended()
        accepted = size - client.unacknowledged_bytes()
        # workers.peer aborts a peer whose message grows past 1 MiB in reassembly.
        assert accepted <= 1024 * 1024 + 2 * MAX_MESSAGE_SIZE, (
            f"the worker took {accepted} bytes of a {size}-byte message before ending the session"
        )
    await assert_device_serves(device, "after-huge")
