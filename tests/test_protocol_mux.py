"""The stream multiplexer against PROTOCOL.md §2.3-2.6.

Two :class:`Multiplexer` objects, a CLIENT and a DEVICE, are joined in memory:
what one returns from ``data_to_send()`` is fed to the other's
``receive_message()``, in order, as the ordered reliable DataChannel would.
Misbehaving peers are played by hand-built frames.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    INITIAL_WINDOW,
    MAX_MESSAGE_SIZE,
    MAX_WINDOW,
    Data,
    Fin,
    Frame,
    Open,
    Reset,
    ResetCode,
    Window,
    decode_message,
    encode_frame,
    encode_frames,
)
from protocol.mux import (
    DataReceived,
    Event,
    Multiplexer,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
)

# -- the in-memory link --------------------------------------------------------


def pair(**options: int) -> tuple[Multiplexer, Multiplexer]:
    return Multiplexer(Role.CLIENT, **options), Multiplexer(Role.DEVICE, **options)


def transfer(sender: Multiplexer, receiver: Multiplexer, max_bytes: int | None = None) -> int:
    """Deliver one ``data_to_send()`` of ``sender`` to ``receiver``; return the bytes moved."""
    moved = 0
    for message in sender.data_to_send(max_bytes):
        assert 0 < len(message) <= sender._max_message_size
        receiver.receive_message(message)
        moved += len(message)
    return moved


def pump(a: Multiplexer, b: Multiplexer) -> None:
    """Move messages both ways until neither side has anything to send."""
    for _ in range(1000):
        if not (transfer(a, b) + transfer(b, a)):
            return
    raise AssertionError("the link never went quiet")


def sent_frames(mux: Multiplexer) -> list[Frame]:
    """Drain ``mux``'s output and decode it (for tests that play the peer by hand)."""
    return [frame for message in mux.data_to_send() for frame in decode_message(message)]


def received_bytes(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def pattern(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def device_with_client_stream(**options: int) -> Multiplexer:
    """A DEVICE on which the (hand-played) client opened stream 1 to ``web``."""
    device = Multiplexer(Role.DEVICE, **options)
    device.receive_message(encode_frame(Open(1, "web")))
    assert device.events() == [StreamOpened(1, "web")]
    return device


# -- opening, data, half-close -------------------------------------------------


def test_client_opens_sends_and_both_sides_half_close() -> None:
    client, device = pair()
    stream = client.open_stream("web")
    assert stream == 1
    assert client.stream_state(stream) is StreamState.OPEN
    client.send_data(stream, b"GET / HTTP/1.0\r\n\r\n")
    pump(client, device)
    assert device.events() == [StreamOpened(1, "web"), DataReceived(1, b"GET / HTTP/1.0\r\n\r\n")]

    client.send_fin(stream)
    pump(client, device)
    assert device.events() == [StreamEnded(1)]
    assert client.stream_state(stream) is StreamState.HALF_CLOSED_LOCAL
    assert device.stream_state(stream) is StreamState.HALF_CLOSED_REMOTE

    # The half-closed-remote side may still send; the half-closed-local side still receives.
    device.send_data(stream, b"HTTP/1.0 200 OK\r\n\r\n")
    device.send_fin(stream)
    pump(client, device)
    assert client.events() == [DataReceived(1, b"HTTP/1.0 200 OK\r\n\r\n"), StreamEnded(1)]
    assert client.stream_state(stream) is None
    assert device.stream_state(stream) is None
    assert client.stream_count == device.stream_count == 0


def test_device_opens_even_ids_and_client_odd_ids() -> None:
    client, device = pair()
    assert [client.open_stream("a") for _ in range(3)] == [1, 3, 5]
    assert [device.open_stream("b") for _ in range(3)] == [2, 4, 6]
    pump(client, device)
    assert device.events() == [StreamOpened(i, "a") for i in (1, 3, 5)]
    assert client.events() == [StreamOpened(i, "b") for i in (2, 4, 6)]
    assert client.stream_count == device.stream_count == 6


def test_device_opened_stream_closes_in_the_other_order() -> None:
    client, device = pair()
    stream = device.open_stream("ctl")
    device.send_data(stream, b"ping")
    pump(client, device)
    assert client.events() == [StreamOpened(2, "ctl"), DataReceived(2, b"ping")]
    client.send_data(stream, b"pong")
    client.send_fin(stream)
    pump(client, device)
    assert device.events() == [DataReceived(2, b"pong"), StreamEnded(2)]
    assert device.stream_state(stream) is StreamState.HALF_CLOSED_REMOTE
    device.send_fin(stream)
    pump(client, device)
    assert client.events() == [StreamEnded(2)]
    assert client.stream_count == device.stream_count == 0


def test_fin_follows_all_queued_data() -> None:
    client = Multiplexer(Role.CLIENT)
    stream = client.open_stream("web")
    payload = pattern(200_000)
    client.send_data(stream, payload)
    client.send_fin(stream)
    # The FIN is queued, not sent: the state is the protocol state, still OPEN.
    assert client.stream_state(stream) is StreamState.OPEN
    frames = sent_frames(client)
    assert isinstance(frames[0], Open)
    assert isinstance(frames[-1], Fin)
    assert b"".join(f.data for f in frames if isinstance(f, Data)) == payload
    assert client.stream_state(stream) is StreamState.HALF_CLOSED_LOCAL


def test_fin_waits_for_data_blocked_on_credit() -> None:
    client, device = pair()
    stream = client.open_stream("web")
    client.send_data(stream, pattern(INITIAL_WINDOW + 10))
    client.send_fin(stream)
    pump(client, device)
    events = device.events()
    assert not any(isinstance(e, StreamEnded) for e in events)
    assert client.pending_bytes(stream) == 10
    device.acknowledge(stream, INITIAL_WINDOW)
    pump(client, device)
    events += device.events()
    assert received_bytes(events, stream) == pattern(INITIAL_WINDOW + 10)
    assert events[-1] == StreamEnded(stream)


def test_send_after_fin_is_a_local_error() -> None:
    client, device = pair()
    stream = client.open_stream("web")
    client.send_fin(stream)
    with pytest.raises(LocalProtocolError, match="after send_fin"):
        client.send_data(stream, b"late")
    with pytest.raises(LocalProtocolError, match="twice"):
        client.send_fin(stream)
    pump(client, device)
    with pytest.raises(LocalProtocolError, match="HALF_CLOSED_LOCAL"):
        client.send_data(stream, b"late")


def test_send_on_closed_or_unknown_stream_is_a_local_error() -> None:
    client = Multiplexer(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="never opened"):
        client.send_data(1, b"x")
    with pytest.raises(LocalProtocolError, match="never opened"):
        client.send_fin(2)
    stream = client.open_stream("web")
    client.reset_stream(stream, ResetCode.CANCEL)
    with pytest.raises(LocalProtocolError, match="CLOSED"):
        client.send_data(stream, b"x")
    with pytest.raises(LocalProtocolError, match="CLOSED"):
        client.send_fin(stream)


def test_empty_send_is_accepted_and_sends_nothing() -> None:
    client, _ = pair()
    stream = client.open_stream("web")
    client.data_to_send()
    client.send_data(stream, b"")
    assert not client.wants_to_send()
    assert client.data_to_send() == []


def test_send_data_copies_mutable_buffers() -> None:
    client, device = pair()
    stream = client.open_stream("web")
    buffer = bytearray(b"abc")
    client.send_data(stream, buffer)  # type: ignore[arg-type]
    buffer[:] = b"xyz"
    pump(client, device)
    assert received_bytes(device.events(), stream) == b"abc"


def test_open_stream_rejects_invalid_service() -> None:
    client, _ = pair()
    with pytest.raises(LocalProtocolError, match="service"):
        client.open_stream("../etc")
    assert client.stream_count == 0
    assert client.open_stream("ok") == 1  # the failed call consumed no id


# -- reset ----------------------------------------------------------------------


def test_client_reset_reaches_device_and_drops_queued_data() -> None:
    client, device = pair()
    stream = client.open_stream("web")
    client.send_data(stream, b"first")
    pump(client, device)
    device.events()
    client.send_data(stream, pattern(10_000))
    client.reset_stream(stream, ResetCode.CONNECTION_RESET, "tcp reset")
    assert client.pending_bytes(stream) == 0
    assert client.stream_state(stream) is None
    assert sent_frames(client) == [Reset(stream, ResetCode.CONNECTION_RESET, "tcp reset")]
    assert client.events() == []  # a local reset is not reported back to its author


def test_device_reset_reaches_client() -> None:
    client, device = pair()
    stream = client.open_stream("nosuch")
    pump(client, device)
    assert device.events() == [StreamOpened(1, "nosuch")]
    device.reset_stream(stream, ResetCode.UNKNOWN_SERVICE, "no service nosuch")
    pump(client, device)
    assert client.events() == [
        StreamReset(stream, ResetCode.UNKNOWN_SERVICE, "no service nosuch", remote=True)
    ]
    assert client.stream_count == device.stream_count == 0


def test_reset_code_unknown_to_us_is_passed_on_as_int() -> None:
    client, device = pair()
    stream = client.open_stream("web")
    client.reset_stream(stream, 999, "from the future")
    pump(client, device)
    assert device.events() == [StreamOpened(1, "web"), StreamReset(1, 999, "from the future", True)]


def test_reset_on_closed_stream_is_a_no_op_and_on_unopened_id_an_error() -> None:
    client = Multiplexer(Role.CLIENT)
    stream = client.open_stream("web")
    client.reset_stream(stream, ResetCode.CANCEL)
    client.data_to_send()
    client.reset_stream(stream, ResetCode.CANCEL)
    assert not client.wants_to_send()
    with pytest.raises(LocalProtocolError, match="never opened"):
        client.reset_stream(3, ResetCode.CANCEL)
    with pytest.raises(LocalProtocolError, match="never opened"):
        client.reset_stream(2, ResetCode.CANCEL)
    with pytest.raises(LocalProtocolError):
        client.reset_stream(stream, ResetCode.CANCEL, "r" * 300)


def test_reset_goes_out_before_queued_data_of_other_streams() -> None:
    client, device = pair()
    busy = client.open_stream("bulk")
    doomed = client.open_stream("web")
    pump(client, device)
    client.send_data(busy, pattern(100_000))
    client.reset_stream(doomed, ResetCode.CANCEL)
    frames = sent_frames(client)
    assert frames[0] == Reset(doomed, ResetCode.CANCEL)


def test_data_crossing_our_reset_is_ignored() -> None:
    client, device = pair()
    stream = client.open_stream("web")
    pump(client, device)
    device.events()
    device.reset_stream(stream, ResetCode.CANCEL)
    device.data_to_send()  # the RESET is in flight...
    client.send_data(stream, b"in flight")  # ...while the client still sends
    client.send_fin(stream)
    transfer(client, device)
    assert device.events() == []
    assert not device.wants_to_send()  # no RESET answers frames of a closed stream


def test_reset_both_ways_at_once() -> None:
    client, device = pair()
    stream = client.open_stream("web")
    pump(client, device)
    device.events()
    client.reset_stream(stream, ResetCode.CANCEL, "client")
    device.reset_stream(stream, ResetCode.CANCEL, "device")
    pump(client, device)
    assert client.events() == device.events() == []
    assert client.stream_count == device.stream_count == 0


# -- flow control -------------------------------------------------------------------


def test_sender_stops_at_exactly_the_window_and_resumes_after_acknowledge() -> None:
    client, device = pair()
    stream = client.open_stream("bulk")
    payload = pattern(1_000_000)
    client.send_data(stream, payload)
    pump(client, device)
    events = device.events()
    assert len(received_bytes(events, stream)) == INITIAL_WINDOW
    assert client.pending_bytes(stream) == len(payload) - INITIAL_WINDOW
    assert not client.wants_to_send()

    # Under half the window consumed: no WINDOW yet (grants are batched).
    device.acknowledge(stream, INITIAL_WINDOW // 2 - 1)
    assert not device.wants_to_send()
    device.acknowledge(stream, 1)
    assert sent_frames(device) == [Window(stream, INITIAL_WINDOW // 2)]
    # Play the rest through the real link now.
    client.receive_message(encode_frame(Window(stream, INITIAL_WINDOW // 2)))
    pump(client, device)
    more = device.events()
    assert len(received_bytes(more, stream)) == INITIAL_WINDOW // 2

    # Acknowledging as the application consumes delivers everything, in order.
    events += more
    device.acknowledge(stream, INITIAL_WINDOW)
    for _ in range(100):
        pump(client, device)
        new = device.events()
        if not new:
            break
        events += new
        device.acknowledge(stream, len(received_bytes(new, stream)))
    assert received_bytes(events, stream) == payload
    assert client.pending_bytes(stream) == 0


def test_receive_window_doubles_with_each_grant_up_to_its_maximum() -> None:
    client, device = pair(initial_window=1000, max_receive_window=4000)
    stream = client.open_stream("bulk")
    payload = pattern(20_000)
    client.send_data(stream, payload)
    pump(client, device)
    received = received_bytes(device.events(), stream)
    assert len(received) == 1000  # the spec's initial credit, no more

    # Each grant returns what was consumed and grows the window: 1000, 2000, 4000.
    device.acknowledge(stream, 500)
    assert sent_frames(device) == [Window(stream, 500 + 1000)]
    device.acknowledge(stream, 500)  # under half of the grown window (1000 of 2000)
    assert not device.wants_to_send()
    device.acknowledge(stream, 0)
    assert not device.wants_to_send()
    client.receive_message(encode_frame(Window(stream, 1500)))
    pump(client, device)
    more = received_bytes(device.events(), stream)
    assert len(more) == 1500  # the peer's credit: 2000 minus the 500 still unacknowledged
    received += more
    device.acknowledge(stream, 1500)  # consumed 500 + 1500 >= 2000 / 2
    assert sent_frames(device) == [Window(stream, 2000 + 2000)]
    client.receive_message(encode_frame(Window(stream, 4000)))

    # At the maximum, grants only return what was consumed.
    for _ in range(100):
        pump(client, device)
        new = received_bytes(device.events(), stream)
        if not new:
            break
        assert len(new) <= 4000
        received += new
        device.acknowledge(stream, len(new))
    assert received == payload
    assert device._streams[stream].window == 4000


def test_receive_window_bounds() -> None:
    with pytest.raises(LocalProtocolError, match="max_receive_window"):
        Multiplexer(Role.DEVICE, initial_window=1000, max_receive_window=999)
    with pytest.raises(LocalProtocolError, match="max_receive_window"):
        Multiplexer(Role.DEVICE, max_receive_window=MAX_WINDOW + 1)


def test_acknowledge_errors_and_no_ops() -> None:
    client, device = pair()
    stream = client.open_stream("web")
    client.send_data(stream, b"12345")
    pump(client, device)
    with pytest.raises(LocalProtocolError, match="only 5"):
        device.acknowledge(stream, 6)
    with pytest.raises(LocalProtocolError):
        device.acknowledge(stream, -1)
    with pytest.raises(LocalProtocolError, match="never opened"):
        device.acknowledge(9, 1)
    device.acknowledge(stream, 5)
    device.reset_stream(stream, ResetCode.CANCEL)
    device.acknowledge(stream, 5)  # closed: a no-op, the app may lag behind


def test_no_window_granted_after_peer_fin() -> None:
    client, device = pair(initial_window=1000)
    stream = client.open_stream("web")
    client.send_data(stream, bytes(1000))
    client.send_fin(stream)
    pump(client, device)
    device.acknowledge(stream, 1000)
    assert not device.wants_to_send()


def test_slow_stream_never_blocks_another() -> None:
    client, device = pair()
    slow = client.open_stream("slow")
    fast = client.open_stream("fast")
    client.send_data(slow, pattern(5 * INITIAL_WINDOW, seed=1))
    client.send_data(fast, pattern(3 * INITIAL_WINDOW, seed=2))
    client.send_fin(fast)
    got_fast: list[Event] = []
    for _ in range(100):
        pump(client, device)
        new = [e for e in device.events() if e.stream_id == fast]
        if not new:
            break
        got_fast += new
        device.acknowledge(fast, len(received_bytes(new, fast)))  # never acknowledge slow
    assert received_bytes(got_fast, fast) == pattern(3 * INITIAL_WINDOW, seed=2)
    assert got_fast[-1] == StreamEnded(fast)
    assert client.pending_bytes(slow) == 4 * INITIAL_WINDOW


def test_data_is_served_round_robin() -> None:
    client = Multiplexer(Role.CLIENT)
    streams = [client.open_stream("s") for _ in range(3)]
    client.data_to_send()
    for stream in streams:
        client.send_data(stream, pattern(100_000))
    order = [f.stream_id for f in sent_frames(client) if isinstance(f, Data)]
    assert order[:6] == streams + streams


def test_max_bytes_limits_one_drain_and_keeps_the_rest() -> None:
    client, device = pair()
    a = client.open_stream("a")
    b = client.open_stream("b")
    transfer(client, device)
    client.send_data(a, pattern(50_000, seed=1))
    client.send_data(b, pattern(50_000, seed=2))
    events: list[Event] = []
    for _ in range(1000):
        messages = client.data_to_send(max_bytes=3000)
        if not messages:
            break
        assert sum(map(len, messages)) <= 3000
        for message in messages:
            device.receive_message(message)
        events += device.events()
    assert received_bytes(events, a) == pattern(50_000, seed=1)
    assert received_bytes(events, b) == pattern(50_000, seed=2)


def test_max_bytes_smaller_than_a_frame_still_makes_progress() -> None:
    client = Multiplexer(Role.CLIENT)
    stream = client.open_stream("web")
    assert len(client.data_to_send(max_bytes=0)) == 1  # the OPEN, alone
    client.send_data(stream, b"abc")
    messages = client.data_to_send(max_bytes=1)
    assert [decode_message(m) for m in messages] == [[Data(stream, b"a")]]


@pytest.mark.parametrize("max_message_size", [266, 1000, 4096, MAX_MESSAGE_SIZE])
def test_messages_never_exceed_max_message_size(max_message_size: int) -> None:
    client, device = pair(max_message_size=max_message_size)
    streams = [client.open_stream(f"s{i}") for i in range(20)]
    for i, stream in enumerate(streams):
        client.send_data(stream, pattern(i * 7919 + 1, seed=i))
        if i % 3 == 0:
            client.reset_stream(stream, 1000 + i, "é" * 128)  # a full 266-byte RESET
        else:
            client.send_fin(stream)
    messages = client.data_to_send()
    assert messages
    assert all(len(m) <= max_message_size for m in messages)
    for message in messages:
        device.receive_message(message)  # whole frames only: decodes cleanly
    events = device.events()
    for i, stream in enumerate(streams):
        if i % 3:
            assert received_bytes(events, stream) == pattern(i * 7919 + 1, seed=i)


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(LocalProtocolError):
        Multiplexer(Role.CLIENT, max_message_size=100)
    with pytest.raises(LocalProtocolError):
        Multiplexer(Role.CLIENT, max_message_size=MAX_MESSAGE_SIZE + 1)
    with pytest.raises(LocalProtocolError):
        Multiplexer(Role.CLIENT, initial_window=0)
    with pytest.raises(LocalProtocolError):
        Multiplexer(Role.CLIENT, max_streams=0)
    with pytest.raises(LocalProtocolError):
        Multiplexer(Role.CLIENT).data_to_send(max_bytes=-1)


# -- stream limits and forgetting ----------------------------------------------------


def test_max_streams_refuses_peer_opens_and_local_opens() -> None:
    client, device = Multiplexer(Role.CLIENT), Multiplexer(Role.DEVICE, max_streams=2)
    streams = [client.open_stream("web") for _ in range(3)]
    client.send_data(streams[2], b"to a refused stream")
    pump(client, device)
    assert device.events() == [StreamOpened(1, "web"), StreamOpened(3, "web")]
    assert device.stream_count == 2
    [refused] = client.events()
    assert isinstance(refused, StreamReset)
    assert (refused.stream_id, refused.code, refused.remote) == (5, ResetCode.REFUSED, True)
    with pytest.raises(LocalProtocolError, match="2 streams open"):
        device.open_stream("ctl")

    # A closed stream frees its slot.
    client.reset_stream(streams[0], ResetCode.CANCEL)
    pump(client, device)
    assert client.open_stream("web") == 7
    pump(client, device)
    assert device.events() == [StreamReset(1, ResetCode.CANCEL, "", True), StreamOpened(7, "web")]


def test_streams_are_forgotten_after_many_cycles() -> None:
    client, device = pair(max_streams=4)
    for i in range(10_000):
        stream = client.open_stream("web")
        client.send_data(stream, b"request")
        client.send_fin(stream)
        transfer(client, device)
        events = device.events()
        if i % 2:
            device.send_data(stream, b"response")
            device.send_fin(stream)
        else:
            device.reset_stream(stream, ResetCode.CONNECT_FAILED)
        transfer(device, client)
        client.events()
        device.acknowledge(stream, 7)  # no-op once forgotten
        assert events[0] == StreamOpened(stream, "web")
    assert stream == 19_999
    assert client.stream_count == device.stream_count == 0
    for mux in (client, device):
        assert not mux._streams and not mux._ready and not mux._grants and not mux._control


# -- a misbehaving peer ---------------------------------------------------------------


def test_open_with_wrong_parity_is_a_session_error() -> None:
    device = Multiplexer(Role.DEVICE)
    with pytest.raises(RemoteProtocolError, match="odd"):
        device.receive_message(encode_frame(Open(2, "web")))
    client = Multiplexer(Role.CLIENT)
    with pytest.raises(RemoteProtocolError, match="even"):
        client.receive_message(encode_frame(Open(1, "web")))


@pytest.mark.parametrize("second", [1, 3])
def test_open_with_non_increasing_id_is_a_session_error(second: int) -> None:
    device = Multiplexer(Role.DEVICE)
    device.receive_message(encode_frame(Open(3, "web")))
    with pytest.raises(RemoteProtocolError, match="not above"):
        device.receive_message(encode_frame(Open(second, "web")))


def test_malformed_message_is_a_session_error() -> None:
    device = device_with_client_stream()
    with pytest.raises(RemoteProtocolError, match="flags"):
        device.receive_message(bytes.fromhex("0201000200000001 6869".replace(" ", "")))
    # Nothing of a rejected message is acted on, even its valid first frame.
    with pytest.raises(RemoteProtocolError):
        device.receive_message(encode_frame(Data(1, b"ok")) + b"\x02")
    assert device.events() == []


@pytest.mark.parametrize(
    "frame",
    [Data(5, b"x"), Fin(5), Window(5, 1), Data(4, b"x"), Window(2, 100)],
    ids=["data-peer-id", "fin-peer-id", "window-peer-id", "data-own-id", "window-own-id"],
)
def test_frame_for_never_opened_stream_gets_unknown_stream(frame: Frame) -> None:
    device = device_with_client_stream()
    device.receive_message(encode_frame(frame))
    assert device.events() == []
    [reset] = sent_frames(device)
    assert isinstance(reset, Reset)
    assert (reset.stream_id, reset.code) == (frame.stream_id, ResetCode.UNKNOWN_STREAM)


def test_reset_for_never_opened_stream_is_not_answered() -> None:
    device = device_with_client_stream()
    device.receive_message(encode_frames([Reset(5, ResetCode.CANCEL), Reset(4, 0)]))
    assert device.events() == []
    assert not device.wants_to_send()


@pytest.mark.parametrize(
    "frame",
    [Data(1, b"late"), Fin(1), Window(1, 10), Reset(1, ResetCode.CANCEL)],
    ids=["data", "fin", "window", "reset"],
)
def test_frames_for_closed_stream_are_ignored(frame: Frame) -> None:
    device = device_with_client_stream()
    device.reset_stream(1, ResetCode.CANCEL)
    device.data_to_send()
    device.receive_message(encode_frame(frame))
    assert device.events() == []
    assert not device.wants_to_send()
    assert device.stream_state(1) is None


def test_data_beyond_credit_resets_flow_control_and_is_dropped() -> None:
    device = device_with_client_stream(initial_window=1000)
    device.receive_message(encode_frames([Data(1, bytes(600)), Data(1, bytes(400))]))
    assert received_bytes(device.events(), 1) == bytes(1000)  # exactly the credit: fine
    device.receive_message(encode_frame(Data(1, b"!")))
    [event] = device.events()
    assert isinstance(event, StreamReset)
    assert (event.code, event.remote) == (ResetCode.FLOW_CONTROL, False)
    [reset] = sent_frames(device)
    assert isinstance(reset, Reset) and reset.code is ResetCode.FLOW_CONTROL
    assert device.stream_state(1) is None
    device.receive_message(encode_frame(Data(1, b"more")))  # now a closed stream
    assert device.events() == []
    assert not device.wants_to_send()


def test_data_beyond_credit_counts_credit_not_yet_granted() -> None:
    # A WINDOW that is decided but not yet sent is not credit the peer may use.
    device = device_with_client_stream(initial_window=1000)
    device.receive_message(encode_frame(Data(1, bytes(1000))))
    device.events()
    device.acknowledge(1, 1000)
    assert device.wants_to_send()
    device.receive_message(encode_frame(Data(1, b"!")))
    assert [type(e) for e in device.events()] == [StreamReset]


def test_window_overflow_resets_flow_control() -> None:
    device = device_with_client_stream()
    device.receive_message(encode_frame(Window(1, MAX_WINDOW - INITIAL_WINDOW)))
    assert device.events() == []  # exactly 2**31-1: allowed
    device.receive_message(encode_frame(Window(1, 1)))
    assert device.events() == [StreamReset(1, ResetCode.FLOW_CONTROL, device_reason(device), False)]


def device_reason(device: Multiplexer) -> str:
    [reset] = sent_frames(device)
    assert isinstance(reset, Reset) and reset.code is ResetCode.FLOW_CONTROL
    return reset.reason


def test_window_after_our_fin_is_ignored() -> None:
    device = device_with_client_stream()
    device.send_fin(1)
    device.data_to_send()
    assert device.stream_state(1) is StreamState.HALF_CLOSED_LOCAL
    device.receive_message(encode_frame(Window(1, MAX_WINDOW)))  # would overflow; ignored
    assert device.events() == []
    assert device.stream_state(1) is StreamState.HALF_CLOSED_LOCAL


def test_window_before_our_queued_fin_is_honoured() -> None:
    # Our FIN is only queued behind data waiting for credit: the stream is still
    # OPEN on the wire and the WINDOW must release the data.
    device = device_with_client_stream(initial_window=1000)
    device.send_data(1, bytes(1500))
    device.send_fin(1)
    assert sum(len(f.data) for f in sent_frames(device) if isinstance(f, Data)) == 1000
    device.receive_message(encode_frame(Window(1, 500)))
    assert sent_frames(device) == [Data(1, bytes(500)), Fin(1)]


@pytest.mark.parametrize("frame", [Data(1, b"x"), Fin(1)], ids=["data", "fin"])
def test_data_or_fin_after_peer_fin_resets_protocol(frame: Frame) -> None:
    device = device_with_client_stream()
    device.receive_message(encode_frame(Fin(1)))
    assert device.events() == [StreamEnded(1)]
    device.receive_message(encode_frame(frame))
    [event] = device.events()
    assert isinstance(event, StreamReset)
    assert (event.stream_id, event.code, event.remote) == (1, ResetCode.PROTOCOL, False)
    [reset] = sent_frames(device)
    assert isinstance(reset, Reset) and reset.code is ResetCode.PROTOCOL


def test_per_stream_error_leaves_other_streams_alone() -> None:
    device = Multiplexer(Role.DEVICE, initial_window=100)
    device.receive_message(encode_frames([Open(1, "a"), Open(3, "b")]))
    device.events()
    device.receive_message(encode_frames([Data(1, bytes(101)), Data(3, b"fine")]))
    events = device.events()
    assert [type(e) for e in events] == [StreamReset, DataReceived]
    assert device.stream_state(3) is StreamState.OPEN


# -- properties ----------------------------------------------------------------------


@dataclass
class Side:
    """One endpoint plus what its application has seen, for the model checks."""

    mux: Multiplexer
    inbox: deque[bytes] = field(default_factory=deque)  # messages in flight towards it
    known: list[int] = field(default_factory=list)  # streams the app knows of, in order
    sent: dict[int, bytearray] = field(default_factory=dict)
    received: dict[int, bytearray] = field(default_factory=dict)
    unacked: dict[int, int] = field(default_factory=dict)
    fin_sent: set[int] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)

    def learn(self, stream_id: int) -> None:
        self.known.append(stream_id)
        self.sent[stream_id] = bytearray()
        self.received[stream_id] = bytearray()
        self.unacked[stream_id] = 0

    def handle_events(self, window: int) -> None:
        for event in self.mux.events():
            if isinstance(event, StreamOpened):
                self.learn(event.stream_id)
            elif isinstance(event, DataReceived):
                assert event.stream_id not in self.ended
                self.received[event.stream_id] += event.data
                self.unacked[event.stream_id] += len(event.data)
                # §2.4: the application never holds more than the window.
                assert self.unacked[event.stream_id] <= window
            elif isinstance(event, StreamEnded):
                self.ended.add(event.stream_id)
            else:
                raise AssertionError(f"unexpected {event}")


OPS = st.lists(
    st.tuples(
        st.sampled_from(["open", "send", "send", "fin", "ack", "ack", "flush", "deliver"]),
        st.booleans(),  # which side acts
        st.integers(0, 10_000),  # which stream / how many messages
        st.one_of(st.integers(1, 300), st.integers(1, 20_000)),  # bytes to send / ack / drain
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    opens=st.tuples(st.integers(1, 3), st.integers(0, 2)),
    ops=OPS,
    window=st.sampled_from([300, 4096, INITIAL_WINDOW]),
    max_message_size=st.sampled_from([266, 1500, MAX_MESSAGE_SIZE]),
    seed=st.integers(0, 2**32),
)
def test_every_byte_arrives_exactly_once_in_order(
    opens: tuple[int, int],
    ops: list[tuple[str, bool, int, int]],
    window: int,
    max_message_size: int,
    seed: int,
) -> None:
    """Random interleavings of opens, sends, acknowledgements, FINs, drains and
    deliveries (in random chunks, in order) lose, duplicate or reorder no byte,
    and no application ever holds more than the window unacknowledged."""
    rng = random.Random(seed)
    options = {"initial_window": window, "max_message_size": max_message_size}
    sides = (Side(Multiplexer(Role.CLIENT, **options)), Side(Multiplexer(Role.DEVICE, **options)))
    for side, count in zip(sides, opens, strict=True):
        for _ in range(count):  # streams to work on from the first op
            side.learn(side.mux.open_stream("svc"))

    def flush(side: Side, other: Side, max_bytes: int | None) -> None:
        for message in side.mux.data_to_send(max_bytes):
            assert len(message) <= max_message_size
            other.inbox.append(message)

    def deliver(side: Side, count: int) -> None:
        for _ in range(min(count, len(side.inbox))):
            side.mux.receive_message(side.inbox.popleft())  # in order: the channel is ordered
        side.handle_events(window)

    for kind, which, pick, size in ops:
        side, other = (sides[0], sides[1]) if which else (sides[1], sides[0])
        live = [s for s in side.known if side.mux.stream_state(s) is not None]
        stream = live[pick % len(live)] if live else None
        if kind == "open":
            side.learn(side.mux.open_stream("svc"))
        elif kind == "send" and stream is not None and stream not in side.fin_sent:
            chunk = rng.randbytes(size)
            side.mux.send_data(stream, chunk)
            side.sent[stream] += chunk
        elif kind == "fin" and stream is not None and stream not in side.fin_sent:
            side.mux.send_fin(stream)
            side.fin_sent.add(stream)
        elif kind == "ack" and stream is not None:
            n = min(side.unacked[stream], size)
            side.mux.acknowledge(stream, n)
            side.unacked[stream] -= n
        elif kind == "flush":
            flush(side, other, rng.choice([None, size]))
        elif kind == "deliver":
            deliver(side, pick % 5)

    # Then the applications consume everything and finish every stream.
    for _ in range(10_000):
        for side in sides:
            for stream in side.known:
                if side.mux.stream_state(stream) is not None:
                    if stream not in side.fin_sent:
                        side.mux.send_fin(stream)
                        side.fin_sent.add(stream)
                    side.mux.acknowledge(stream, side.unacked[stream])
                side.unacked[stream] = 0
        flush(sides[0], sides[1], None)
        flush(sides[1], sides[0], None)
        if not (sides[0].inbox or sides[1].inbox):
            break
        deliver(sides[0], len(sides[0].inbox))
        deliver(sides[1], len(sides[1].inbox))
    else:
        raise AssertionError("the link never went quiet")

    client, device = sides
    assert sorted(client.known) == sorted(device.known)
    for stream in client.known:
        assert device.received[stream] == client.sent[stream]
        assert client.received[stream] == device.sent[stream]
        assert stream in client.ended and stream in device.ended
    assert client.mux.stream_count == device.mux.stream_count == 0


HOSTILE_FRAMES: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Open, st.integers(1, 12), st.sampled_from(["web", "ssh"])),
    # DATA mostly on the first streams the peer opens, so credit runs out.
    st.builds(
        Data,
        st.one_of(st.sampled_from([1, 3]), st.integers(1, 16)),
        st.builds(bytes, st.integers(1, 400)),
    ),
    st.builds(Fin, st.integers(1, 16)),
    st.builds(Reset, st.integers(1, 16), st.integers(0, 9)),
    st.builds(Window, st.integers(1, 16), st.sampled_from([1, 100, 1000, MAX_WINDOW])),
)


def renumber_opens(frames: list[Frame], last: int) -> tuple[list[Frame], int]:
    """Give most OPENs the client's next valid id, so a session lives long enough
    to matter; OPEN 11 stays a reused id and OPEN 12 a wrong-parity id."""
    out: list[Frame] = []
    for frame in frames:
        if isinstance(frame, Open) and frame.stream_id <= 10:
            last += 2
            frame = Open(last, frame.service)
        elif isinstance(frame, Open) and frame.stream_id == 11:
            frame = Open(max(last, 1), frame.service)
        out.append(frame)
    return out, last


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(HOSTILE_FRAMES, min_size=1, max_size=5), min_size=1, max_size=15),
    st.lists(st.integers(0, 3), max_size=15),
)
def test_hostile_peer_cannot_break_the_multiplexer(
    messages: list[list[Frame]], acks: list[int]
) -> None:
    """Whatever well-formed frames a peer sends, in whatever order, the mux raises
    only RemoteProtocolError, keeps at most ``max_streams`` streams and at most
    the window of unacknowledged data per stream, and answers with valid messages."""
    window = 500
    device = Multiplexer(Role.DEVICE, initial_window=window, max_streams=3)
    for _ in range(2):
        device.send_data(device.open_stream("ctl"), b"hello")
    unacked: dict[int, int] = {}
    last_open = -1
    for i, raw in enumerate(messages):
        frames, last_open = renumber_opens(raw, last_open)
        try:
            device.receive_message(encode_frames(frames))
        except RemoteProtocolError:
            return  # a session error ends the session: nothing more to check
        for event in device.events():
            if isinstance(event, DataReceived):
                unacked[event.stream_id] = unacked.get(event.stream_id, 0) + len(event.data)
                assert unacked[event.stream_id] <= window
            elif isinstance(event, StreamReset):
                unacked.pop(event.stream_id, None)
            elif isinstance(event, StreamOpened):
                unacked[event.stream_id] = 0
        assert device.stream_count <= 3
        if i < len(acks) and acks[i] and unacked:
            stream = sorted(unacked)[acks[i] % len(unacked)]
            device.acknowledge(stream, unacked[stream])
            unacked[stream] = 0
        for message in device.data_to_send():
            assert len(message) <= MAX_MESSAGE_SIZE
            decode_message(message)
