"""HTTP streams against PROTOCOL.md §2.8: the head codec, the two new frames and
the multiplexer's rules for them, with the test vectors of §2.8.1."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    INITIAL_WINDOW,
    Data,
    Fin,
    Frame,
    Head,
    Open,
    OpenHttp,
    Reset,
    ResetCode,
    decode_message,
    encode_frame,
    encode_frames,
)
from protocol.http_heads import (
    MAX_FIELDS,
    MAX_HEAD_SIZE,
    HeadError,
    RequestHead,
    ResponseHead,
    decode_request_head,
    decode_response_head,
    encode_request_head,
    encode_response_head,
    end_to_end_fields,
    is_upgrade_request,
)
from protocol.mux import (
    DataReceived,
    Event,
    HeadReceived,
    HttpStreamOpened,
    Multiplexer,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
)
from tests.test_protocol_mux import pair, pattern, pump, received_bytes, sent_frames


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


GET = RequestHead("GET", "/", ((b"accept", b"*/*"),))
OK = ResponseHead(200, b"OK", ((b"content-length", b"2"),))

# -- §2.8.1 vectors ------------------------------------------------------------

GET_WIRE = """
06 00 003e 00000001 03 776562
7b226d6574686f64223a22474554222c22746172676574223a222f222c2268656164657273
223a5b5b22616363657074222c222a2f2a225d5d7d
03 00 0000 00000001
"""
ANSWER_WIRE = """
07 00 003f 00000001
7b22737461747573223a3230302c22726561736f6e223a224f4b222c2268656164657273
223a5b5b22636f6e74656e742d6c656e677468222c2232225d5d7d
02 00 0002 00000001 6869
03 00 0000 00000001
"""


def test_request_vector_byte_for_byte() -> None:
    assert encode_request_head(GET) == b'{"method":"GET","target":"/","headers":[["accept","*/*"]]}'
    frames: list[Frame] = [OpenHttp(1, "web", encode_request_head(GET)), Fin(1)]
    assert encode_frames(frames) == unhex(GET_WIRE)
    assert decode_message(unhex(GET_WIRE)) == frames


def test_answer_vector_byte_for_byte() -> None:
    frames: list[Frame] = [Head(1, encode_response_head(OK)), Data(1, b"hi"), Fin(1)]
    assert encode_frames(frames) == unhex(ANSWER_WIRE)
    assert decode_message(unhex(ANSWER_WIRE)) == frames


def test_bad_head_reset_vector() -> None:
    wire = unhex("04 00 000c 00000003 0008 62616420746172676574")
    assert encode_frame(Reset(3, ResetCode.BAD_HEAD, "bad target")) == wire


def test_the_vectors_carry_a_whole_exchange() -> None:
    device = Multiplexer(Role.DEVICE)
    device.receive_message(unhex(GET_WIRE))
    assert device.events() == [HttpStreamOpened(1, "web", GET), StreamEnded(1)]
    device.send_head(1, OK)
    device.send_data(1, b"hi")
    device.send_fin(1)
    assert b"".join(device.data_to_send()) == unhex(ANSWER_WIRE)
    assert device.stream_state(1) is None  # both halves closed


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        ("06 00 0000 00000001", "service name length 0"),
        ("06 00 0001 00000001 00", "service name length 0"),
        ("06 00 0002 00000001 05 77", "service name length 5"),
        ("06 00 0004 00000001 03 776562", "does not fit"),  # no head at all
        ("06 00 0006 00000001 03 2e7765 7b7d", "invalid service name"),
        ("07 00 0000 00000001", "HEAD stream 1: empty payload"),
    ],
)
def test_session_error_vectors(wire: str, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_message(unhex(wire))


BAD_REQUEST_HEADS = [
    (rb'{"method":"GET","target":"http://x/","headers":[]}', "origin-form"),
    (rb'{"method":"GET","target":"/","target":"/","headers":[]}', "twice"),
    (rb'{"method":"GET","target":"/","headers":[["a","1\r\n"]]}', "illegal value"),
    (rb'{"method":"GET","target":"/","headers":[["a","\u0100"]]}', "above U\\+00FF"),
    (rb'{"method":"GET","target":"/"}', "exactly the keys"),
    (b"[]", "JSON object"),
    (rb'{"method":"CONNECT","target":"/","headers":[]}', "CONNECT"),
    (rb'{"method":"G T","target":"/","headers":[]}', "bad method"),
    (rb'{"method":"GET","target":"/ x","headers":[]}', "bad target"),
    (rb'{"method":"GET","target":"/","headers":[["a b","1"]]}', "bad header name"),
    (rb'{"method":"GET","target":"/","headers":[["a"," 1"]]}', "illegal value"),
    (rb'{"method":"GET","target":"/","headers":[["a","1","2"]]}', "pair"),
    (rb'{"method":"GET","target":"/","headers":[["a",1]]}', "must be a string"),
    (rb'{"method":"GET","target":"/","headers":{}}', "array"),
    (rb'{"method":1,"target":"/","headers":[]}', "method"),
    (b'{"method":"GET","target":"/","headers":[]', "not JSON"),
    (b"\xff", "not UTF-8"),
    (b"[" * 5000 + b"]" * 5000, "JSON"),
    (rb'{"method":"GET","target":"/","headers":[],"x":NaN}', "NaN"),
]


@pytest.mark.parametrize(("head", "match"), BAD_REQUEST_HEADS)
def test_bad_request_heads_are_refused(head: bytes, match: str) -> None:
    with pytest.raises(HeadError, match=match):
        decode_request_head(head)


@pytest.mark.parametrize(("head", "match"), BAD_REQUEST_HEADS[:6])
def test_a_bad_request_head_resets_that_stream_only(head: bytes, match: str) -> None:
    device = Multiplexer(Role.DEVICE)
    device.receive_message(encode_frame(OpenHttp(1, "web", head)))
    assert device.events() == []
    assert device.stream_count == 0
    [reset] = sent_frames(device)
    assert isinstance(reset, Reset) and reset.stream_id == 1
    assert reset.code is ResetCode.BAD_HEAD and reset.reason.startswith("bad request head: ")
    # The id counted: reusing it is a session error, a higher one works.
    with pytest.raises(RemoteProtocolError, match="not above"):
        device.receive_message(encode_frame(Open(1, "web")))
    device.receive_message(encode_frame(OpenHttp(3, "web", encode_request_head(GET))))
    assert device.events() == [HttpStreamOpened(3, "web", GET)]


def test_limits() -> None:
    many = tuple((b"x-%d" % i, b"v") for i in range(MAX_FIELDS))
    assert decode_request_head(encode_request_head(RequestHead("GET", "/", many))).headers == many
    with pytest.raises(LocalProtocolError, match="header fields"):
        RequestHead("GET", "/", (*many, (b"one", b"more")))
    too_many = json.dumps({"method": "GET", "target": "/", "headers": [["a", "b"]] * 129})
    with pytest.raises(HeadError, match="129 header fields"):
        decode_request_head(too_many.encode())
    big = RequestHead("GET", "/", tuple((b"x-%d" % i, b"v" * 8000) for i in range(3)))
    with pytest.raises(LocalProtocolError, match="at most 16384"):
        encode_request_head(big)
    with pytest.raises(HeadError, match="at most 16384"):
        decode_request_head(b" " * (MAX_HEAD_SIZE + 1))
    for status in ("100", "199", "600", "true"):
        with pytest.raises(HeadError, match="status"):
            decode_response_head(b'{"status":%s,"reason":"","headers":[]}' % status.encode())
    with pytest.raises(HeadError, match="status"):
        decode_response_head(b'{"status":200.0,"reason":"","headers":[]}')
    assert decode_response_head(b'{"status":101,"reason":"","headers":[]}').status == 101


def test_field_values_are_bytes_and_either_json_spelling_decodes() -> None:
    head = ResponseHead(200, b"D\xe9j\xe0 vu", ((b"x-latin", b"caf\xe9 \x01"),))
    encoded = encode_response_head(head)
    # As JSON.stringify writes it: the characters themselves, in UTF-8.
    assert "café".encode() in encoded and b"\\u0001" in encoded
    assert decode_response_head(encoded) == head
    escaped = (
        b'{"status":200,"reason":"D\\u00e9j\\u00e0 vu",'
        b'"headers":[["x-latin","caf\\u00e9 \\u0001"]]}'
    )
    assert decode_response_head(escaped) == head


heads = st.builds(
    RequestHead,
    st.sampled_from(["GET", "POST", "HEAD", "PROPFIND"]),
    st.from_regex(r"/[\x21-\x7e]{0,30}", fullmatch=True),
    st.lists(
        st.tuples(
            st.from_regex(rb"[a-z0-9-]{1,12}", fullmatch=True),
            st.from_regex(rb"([^\x00\s]{1,5}( [^\x00\s]{1,5})?)?", fullmatch=True),
        ),
        max_size=6,
    ).map(tuple),
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(heads)
def test_request_heads_round_trip(head: RequestHead) -> None:
    assert decode_request_head(encode_request_head(head)) == head


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=80), heads.map(encode_request_head).map(lambda b: b[:-3])))
def test_garbage_heads_only_raise_head_error(raw: bytes) -> None:
    for decode in (decode_request_head, decode_response_head):
        with contextlib.suppress(HeadError):
            decode(raw)


def test_hop_by_hop_fields_are_dropped() -> None:
    fields = [
        (b"Connection", b"close, X-Private"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"secret"),
        (b"TE", b"trailers"),
        (b"Trailer", b"x"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"x-private", b"1"),
        (b"Accept", b"a"),
        (b"accept", b"b"),
        (b"Host", b"evil"),
    ]
    assert end_to_end_fields(fields, drop=frozenset({b"host"})) == [
        (b"accept", b"a"),
        (b"accept", b"b"),
    ]
    upgrade = RequestHead("GET", "/ws", ((b"connection", b"Upgrade"), (b"upgrade", b"websocket")))
    assert is_upgrade_request(upgrade)
    assert not is_upgrade_request(RequestHead("GET", "/", ((b"upgrade", b"websocket"),)))
    assert end_to_end_fields(upgrade.headers, keep_upgrade=True) == [
        (b"upgrade", b"websocket"),
        (b"connection", b"upgrade"),
    ]


# -- the multiplexer -----------------------------------------------------------


def test_an_exchange_with_bodies_larger_than_the_window() -> None:
    client, device = pair()
    body = pattern(3 * INITIAL_WINDOW + 5, seed=1)
    reply = pattern(5 * INITIAL_WINDOW + 7, seed=2)
    post = RequestHead("POST", "/upload?x=1", ((b"content-length", b"%d" % len(body)),))
    stream = client.open_http_stream("web", post)
    client.send_data(stream, body)
    client.send_fin(stream)
    got: list[Event] = []  # the device's events
    answer: list[Event] = []  # the client's
    answered = False
    for _ in range(1000):
        moved = 0
        for message in client.data_to_send():
            device.receive_message(message)
            moved += 1
        for event in device.events():
            got.append(event)
            if isinstance(event, DataReceived):
                device.acknowledge(event.stream_id, len(event.data))
        if not answered and any(isinstance(e, HttpStreamOpened) for e in got):
            device.send_head(stream, ResponseHead(206, b"Partial Content"))
            device.send_data(stream, reply)
            device.send_fin(stream)
            answered = True
        for message in device.data_to_send():
            client.receive_message(message)
            moved += 1
        for event in client.events():
            answer.append(event)
            if isinstance(event, DataReceived):
                client.acknowledge(event.stream_id, len(event.data))
        if not moved:
            break
    assert got[0] == HttpStreamOpened(stream, "web", post)
    assert received_bytes(got, stream) == body
    assert received_bytes(answer, stream) == reply
    assert answer[0] == HeadReceived(stream, ResponseHead(206, b"Partial Content"))
    assert got[-1] == answer[-1] == StreamEnded(stream)
    assert client.stream_count == device.stream_count == 0


def device_with_http_stream() -> Multiplexer:
    device = Multiplexer(Role.DEVICE)
    device.receive_message(encode_frame(OpenHttp(1, "web", encode_request_head(GET))))
    assert device.events() == [HttpStreamOpened(1, "web", GET)]
    return device


def client_with_http_stream() -> Multiplexer:
    client = Multiplexer(Role.CLIENT)
    assert client.open_http_stream("web", GET) == 1
    client.data_to_send()
    return client


def test_the_device_must_send_its_head_first_and_once() -> None:
    device = device_with_http_stream()
    with pytest.raises(LocalProtocolError, match="before send_head"):
        device.send_data(1, b"x")
    with pytest.raises(LocalProtocolError, match="before send_head"):
        device.send_fin(1)
    device.send_head(1, OK)
    with pytest.raises(LocalProtocolError, match="not an HTTP stream awaiting"):
        device.send_head(1, OK)
    raw = Multiplexer(Role.DEVICE)
    raw.receive_message(encode_frame(Open(1, "web")))
    with pytest.raises(LocalProtocolError, match="not an HTTP stream awaiting"):
        raw.send_head(1, OK)
    with pytest.raises(LocalProtocolError, match="only the client"):
        raw.open_http_stream("web", GET)


@pytest.mark.parametrize(
    ("frames", "code", "reason"),
    [
        ([Data(1, b"x")], ResetCode.PROTOCOL, "DATA before HEAD"),
        ([Fin(1)], ResetCode.PROTOCOL, "FIN before HEAD"),
        ([Head(1, encode_response_head(OK))] * 2, ResetCode.PROTOCOL, "expects none"),
        ([Head(1, b'{"status":99}')], ResetCode.BAD_HEAD, "bad response head"),
    ],
)
def test_client_resets_a_device_that_breaks_the_order(
    frames: list[Frame], code: ResetCode, reason: str
) -> None:
    client = client_with_http_stream()
    client.receive_message(encode_frames(frames))
    events = client.events()
    assert isinstance(events[-1], StreamReset) and not events[-1].remote
    assert events[-1].code is code and reason in events[-1].reason
    assert sent_frames(client) == [Reset(1, code, events[-1].reason)]
    assert client.stream_state(1) is None


def test_head_where_none_belongs_is_a_stream_error() -> None:
    # A HEAD on a raw stream (client side), and any HEAD received by the device.
    client = Multiplexer(Role.CLIENT)
    client.open_stream("web")
    client.receive_message(encode_frame(Head(1, encode_response_head(OK))))
    [reset] = [e for e in client.events() if isinstance(e, StreamReset)]
    assert reset.code is ResetCode.PROTOCOL
    device = device_with_http_stream()
    device.receive_message(encode_frame(Head(1, encode_response_head(OK))))
    [reset] = device.events()  # type: ignore[assignment]
    assert isinstance(reset, StreamReset) and reset.code is ResetCode.PROTOCOL
    # For a stream never opened: UNKNOWN_STREAM, as for every frame.
    device.receive_message(encode_frame(Head(7, b"{}")))
    assert sent_frames(device)[-1].code is ResetCode.UNKNOWN_STREAM  # type: ignore[union-attr]


def test_the_device_opens_no_http_streams() -> None:
    client = Multiplexer(Role.CLIENT)
    for stream_id in (2, 3):
        with pytest.raises(RemoteProtocolError, match="device opens no HTTP streams"):
            client.receive_message(encode_frame(OpenHttp(stream_id, "web", b"{}")))


def test_http_and_raw_streams_share_the_id_sequence_and_coexist() -> None:
    client, device = pair()
    assert client.open_stream("ssh") == 1
    assert client.open_http_stream("web", GET) == 3
    assert client.open_stream("ssh") == 5
    pump(client, device)
    assert [type(e) for e in device.events()] == [StreamOpened, HttpStreamOpened, StreamOpened]
    device.send_data(1, b"raw")  # a raw stream needs no head
    device.send_head(3, OK)
    pump(client, device)
    assert sorted(type(e).__name__ for e in client.events()) == ["DataReceived", "HeadReceived"]
    assert client.stream_state(3) is StreamState.OPEN


def test_a_response_without_body_is_head_then_fin_and_reset_after_fin_is_harmless() -> None:
    client, device = pair()
    stream = client.open_http_stream("web", RequestHead("HEAD", "/"))
    pump(client, device)
    device.events()
    device.send_head(stream, ResponseHead(304, b"Not Modified", ((b"etag", b'"x"'),)))
    device.send_fin(stream)
    pump(client, device)  # a RESET drops what is not framed yet: the FIN must leave first
    assert device.stream_state(stream) is StreamState.HALF_CLOSED_LOCAL
    device.reset_stream(stream, ResetCode.CANCEL, "response complete")
    pump(client, device)
    events = client.events()
    assert [type(e) for e in events] == [HeadReceived, StreamEnded, StreamReset]
    assert client.stream_count == device.stream_count == 0


# -- fuzzing the new frames against both ends ----------------------------------

_heads = st.sampled_from(
    [
        encode_request_head(GET),
        encode_response_head(OK),
        b'{"status":101,"reason":"","headers":[]}',
        b"{}",
        b"[",
        b'{"method":"GET","target":"/","headers":[["a","\\u0100"]]}',
        b"\xff\xfe",
    ]
)
_http_frames = st.one_of(
    st.builds(OpenHttp, st.integers(1, 12), st.sampled_from(["web", "x"]), _heads),
    st.builds(Head, st.integers(1, 12), _heads),
    st.builds(Data, st.integers(1, 12), st.binary(min_size=1, max_size=8)),
    st.builds(Fin, st.integers(1, 12)),
    st.builds(Reset, st.integers(1, 12), st.sampled_from([0, 5, 8, 9, 999])),
    st.builds(Open, st.integers(1, 12), st.just("web")),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([Role.CLIENT, Role.DEVICE]), st.lists(_http_frames, max_size=12))
def test_any_order_of_http_frames_is_answered_without_surprise(
    role: Role, frames: list[Frame]
) -> None:
    """Whatever a peer sends, each end either raises RemoteProtocolError (a
    session error) or stays consistent: events only for its live streams, heads
    only as decoded values, every answer a frame of the spec."""
    mux = Multiplexer(role, max_streams=4)
    if role is Role.CLIENT:
        mux.open_http_stream("web", GET)
        mux.open_stream("web")
    for frame in frames:
        try:
            mux.receive_message(encode_frame(frame))
        except RemoteProtocolError:
            return
        for event in mux.events():
            if isinstance(event, HttpStreamOpened):
                assert role is Role.DEVICE and isinstance(event.request, RequestHead)
                mux.send_head(event.stream_id, OK)
            elif isinstance(event, HeadReceived):
                assert role is Role.CLIENT and event.stream_id == 1
            elif isinstance(event, DataReceived):
                mux.acknowledge(event.stream_id, len(event.data))
        assert mux.stream_count <= 4
        for message in mux.data_to_send():
            for sent in decode_message(message):
                if isinstance(sent, Reset):
                    assert sent.code in set(ResetCode)
