"""protocol/signaling.py against PROTOCOL.md §1.1, §1.3 and the §1.7 test vectors."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, SignalingError
from protocol.ice import IceServer
from protocol.signaling import (
    MAX_FRAME_SIZE,
    MAX_REASON_LEN,
    MAX_SDP_LEN,
    MESSAGE_TYPES,
    Answer,
    Auth,
    Candidate,
    DeviceInfo,
    Devices,
    Error,
    ErrorCode,
    IceCandidate,
    IceServers,
    ListDevices,
    Moving,
    Offer,
    PeerLeft,
    Register,
    Registered,
    Revoke,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
    Welcome,
    decode_signaling,
    encode_signaling,
    is_valid_id,
    is_valid_session_id,
    new_session_id,
)

SID = "s-0123456789ab"

# §1.7, verbatim.
TURN_USER, TURN_PASSWORD = "1767229200:dev1", "jBoj99fqlCVTD9RPT7tQFgVFQaM="
VECTORS: list[tuple[str, SignalingMessage]] = [
    (
        '{"v":1,"type":"ice_servers","ice_servers":[{"urls":"stun:127.0.0.1:3478"},'
        '{"urls":"turn:127.0.0.1:3478","username":"1767229200:dev1",'
        '"credential":"jBoj99fqlCVTD9RPT7tQFgVFQaM="}],"ttl":3600}',
        IceServers(
            (
                IceServer("stun:127.0.0.1:3478"),
                IceServer("turn:127.0.0.1:3478", TURN_USER, TURN_PASSWORD),
            ),
            3600,
        ),
    ),
    ('{"v":1,"type":"ice_servers","ice_servers":[],"ttl":null}', IceServers(())),
    ('{"v":1,"type":"register","device":"local-device-1"}', Register("local-device-1")),
    (
        '{"v":1,"type":"register","device":"laptop","services":["web","ssh"]}',
        Register("laptop", ("web", "ssh")),
    ),
    ('{"v":1,"type":"list_devices"}', ListDevices()),
    (
        '{"v":1,"type":"devices","devices":[{"device":"laptop","online":true,'
        '"services":["web","ssh"]},{"device":"nas","online":false,"services":[]}],"more":false}',
        Devices((DeviceInfo("laptop", True, ("web", "ssh")), DeviceInfo("nas", False))),
    ),
    (
        '{"v":1,"type":"session_request","session":"s-0123456789ab","device":"dev1"}',
        SessionRequest(SID, "dev1"),
    ),
    (
        '{"v":1,"type":"candidate","session":"s-0123456789ab","candidate":null}',
        Candidate(SID, None),
    ),
    (
        '{"v":1,"type":"candidate","session":"s-0123456789ab","candidate":{"candidate":'
        '"candidate:1 1 UDP 2130706431 127.0.0.1 50000 typ host","sdpMid":"0","sdpMLineIndex":0}}',
        Candidate(
            SID,
            IceCandidate("candidate:1 1 UDP 2130706431 127.0.0.1 50000 typ host", "0", 0),
        ),
    ),
    (
        '{"v":1,"type":"error","code":"device_offline","message":"device dev1 is offline",'
        '"session":"s-0123456789ab"}',
        Error("device_offline", "device dev1 is offline", SID),
    ),
    (
        '{"v":1,"type":"session_end","session":"s-0123456789ab","reason":"bye","client":"alice"}',
        SessionEnd(SID, "bye", "alice"),
    ),
    (
        '{"v":1,"type":"revoke","client":"alice","reason":"token revoked"}',
        Revoke("alice", "token revoked"),
    ),
    ('{"v":1,"type":"moving","reason":"node draining"}', Moving("node draining")),
]

_SESSION = '"session":"s-0123456789ab"'


def ice(fields: str) -> str:
    """A candidate message whose ``candidate`` object has these JSON fields."""
    return '{"v":1,"type":"candidate",' + _SESSION + ',"candidate":{' + fields + "}}"


# §1.7 rejected vectors, then more of §1.1's rejections.
REJECTED: list[tuple[str | bytes, str]] = [
    ('{"v":2,"type":"register","device":"d"}', "unsupported_version"),
    ('{"v":1,"type":"register"}', "bad_message"),
    ('{"v":1,"type":"hello"}', "unknown_type"),
    ("[1,2]", "bad_message"),
    ('{"v":1,"type":"register","device":"../x"}', "bad_message"),
    ('{"v":1,"type":"register","device":"d","services":["web","web"]}', "bad_message"),
    ('{"v":1,"type":"register","device":"d","services":["a b"]}', "bad_message"),
    ('{"v":1,"type":"register","device":"d","services":"web"}', "bad_message"),
    ('{"v":1,"type":"register","device":"d","services":[1]}', "bad_message"),
    ('{"v":1,"type":"register","device":"d","services":null}', "bad_message"),
    ('{"v":1,"type":"list_devices","device":"d"}', "bad_message"),
    ('{"v":1,"type":"devices","devices":[]}', "bad_message"),
    ('{"v":1,"type":"devices","devices":{},"more":false}', "bad_message"),
    ('{"v":1,"type":"devices","devices":[],"more":0}', "bad_message"),
    ('{"v":1,"type":"devices","devices":[{"device":"d","online":1,"services":[]}],"more":false}',
     "bad_message"),
    ('{"v":1,"type":"devices","devices":[{"device":"d","online":true}],"more":false}',
     "bad_message"),
    ('{"v":1,"type":"devices","devices":[{"device":"d","online":true,"services":[],"ip":"x"}],'
     '"more":false}', "bad_message"),
    # framing
    (b'{"v":1,"type":"register","device":"d"}', "bad_message"),
    (b"\xff\xfe", "bad_message"),
    ("", "bad_message"),
    ("not json", "bad_message"),
    ('"register"', "bad_message"),
    ("null", "bad_message"),
    ('{"v":1,"type":"register","device":"d"} x', "bad_message"),
    ("[" * 50_000, "bad_message"),
    ('{"v":1,"type":"register","device":"d","device":"e"}', "bad_message"),
    # version
    ('{"type":"register","device":"d"}', "bad_message"),
    ('{"v":true,"type":"register","device":"d"}', "bad_message"),
    ('{"v":1.0,"type":"register","device":"d"}', "bad_message"),
    ('{"v":"1","type":"register","device":"d"}', "bad_message"),
    ('{"v":NaN,"type":"register","device":"d"}', "bad_message"),
    ('{"v":0,"type":"register","device":"d"}', "unsupported_version"),
    ('{"v":' + "9" * 5000 + "}", "bad_message"),
    # type
    ('{"v":1}', "bad_message"),
    ('{"v":1,"type":7}', "bad_message"),
    ('{"v":1,"type":"Register","device":"d"}', "unknown_type"),
    # keys and fields
    ('{"v":1,"type":"register","device":"d","extra":1}', "bad_message"),
    ('{"v":1,"type":"register","Device":"d"}', "bad_message"),
    ('{"v":1,"type":"register","device":7}', "bad_message"),
    ('{"v":1,"type":"register","device":null}', "bad_message"),
    ('{"v":1,"type":"register","device":"-d"}', "bad_message"),
    ('{"v":1,"type":"register","device":"d\\n"}', "bad_message"),
    ('{"v":1,"type":"register","device":"' + "d" * 65 + '"}', "bad_message"),
    ('{"v":1,"type":"session_request","session":"short","device":"d"}', "bad_message"),
    ('{"v":1,"type":"session_request","session":"s.0123456789","device":"d"}', "bad_message"),
    ('{"v":1,"type":"session_request","session":"' + "s" * 65 + '","device":"d"}', "bad_message"),
    ('{"v":1,"type":"session_request",' + _SESSION + ',"device":"d","client":null}', "bad_message"),
    ('{"v":1,"type":"answer",' + _SESSION + ',"sdp":"v=0","client":null}', "bad_message"),
    ('{"v":1,"type":"peer_left",' + _SESSION + ',"client":"../x"}', "bad_message"),
    ('{"v":1,"type":"offer",' + _SESSION + ',"sdp":"v=0","client":"alice"}', "bad_message"),
    ('{"v":1,"type":"offer",' + _SESSION + "}", "bad_message"),
    ('{"v":1,"type":"offer",' + _SESSION + ',"sdp":["v=0"]}', "bad_message"),
    ('{"v":1,"type":"offer",' + _SESSION + ',"sdp":"' + "x" * (MAX_SDP_LEN + 1) + '"}',
     "bad_message"),
    ('{"v":1,"type":"answer",' + _SESSION + ',"sdp":"\\ud800"}', "bad_message"),
    ('{"v":1,"type":"session_end",' + _SESSION + ',"reason":"' + "r" * (MAX_REASON_LEN + 1) + '"}',
     "bad_message"),
    ('{"v":1,"type":"candidate",' + _SESSION + "}", "bad_message"),
    ('{"v":1,"type":"candidate",' + _SESSION + ',"candidate":"c"}', "bad_message"),
    (ice(""), "bad_message"),
    (ice('"candidate":"c","sdpMid":"0"'), "bad_message"),
    # RTCIceCandidate.toJSON() adds usernameFragment; §1.3 allows exactly three keys.
    (ice('"candidate":"c","sdpMid":"0","sdpMLineIndex":0,"extra":"u"'), "bad_message"),
    (ice('"candidate":"c","sdpMid":"0","sdpMLineIndex":true'), "bad_message"),
    (ice('"candidate":"c","sdpMid":"0","sdpMLineIndex":1.0'), "bad_message"),
    (ice('"candidate":"c","sdpMid":"0","sdpMLineIndex":-1'), "bad_message"),
    (ice('"candidate":"c","sdpMid":0,"sdpMLineIndex":0'), "bad_message"),
    (ice('"candidate":null,"sdpMid":"0","sdpMLineIndex":0'), "bad_message"),
    ('{"v":1,"type":"welcome","peer":"p","role":"admin"}', "bad_message"),
    ('{"v":1,"type":"ice_servers","ice_servers":[]}', "bad_message"),
    ('{"v":1,"type":"ice_servers","ice_servers":{},"ttl":null}', "bad_message"),
    ('{"v":1,"type":"ice_servers","ice_servers":[],"ttl":0}', "bad_message"),
    ('{"v":1,"type":"ice_servers","ice_servers":[],"ttl":true}', "bad_message"),
    ('{"v":1,"type":"ice_servers","ice_servers":[{"url":"stun:h"}],"ttl":null}', "bad_message"),
    ('{"v":1,"type":"ice_servers","ice_servers":[{"urls":["stun:h"]}],"ttl":null}', "bad_message"),
    ('{"v":1,"type":"ice_servers","ice_servers":[{"urls":"stuns:h"}],"ttl":null}', "bad_message"),
    ('{"v":1,"type":"ice_servers","ice_servers":[{"urls":"turn:h"}],"ttl":null}', "bad_message"),
    ('{"v":1,"type":"ice_servers","ice_servers":[' + ",".join(['{"urls":"stun:h"}'] * 17)
     + '],"ttl":null}', "bad_message"),
    ('{"v":1,"type":"auth","token":""}', "bad_message"),
    ('{"v":1,"type":"auth","token":null}', "bad_message"),
    ('{"v":1,"type":"error","code":"device_offline","message":"m"}', "bad_message"),
    ('{"v":1,"type":"error","code":"Bad Code","message":"m","session":null}', "bad_message"),
]  # fmt: skip


@pytest.mark.parametrize(("wire", "message"), VECTORS)
def test_vector_encodes_byte_exact(wire: str, message: SignalingMessage) -> None:
    assert encode_signaling(message) == wire


@pytest.mark.parametrize(("wire", "message"), VECTORS)
def test_vector_decodes(wire: str, message: SignalingMessage) -> None:
    assert decode_signaling(wire) == message


@pytest.mark.parametrize(("wire", "code"), REJECTED)
def test_rejected(wire: str | bytes, code: str) -> None:
    with pytest.raises(SignalingError) as info:
        decode_signaling(wire)
    assert info.value.code == code


def test_oversized_frame_is_rejected_by_utf8_size_not_characters() -> None:
    # 30 000 three-byte characters: under the limit in characters, over it in bytes.
    sdp = "€" * 30_000
    wire = encode_signaling(Offer(SID, sdp))
    assert len(wire) < MAX_FRAME_SIZE < len(wire.encode())
    with pytest.raises(SignalingError) as info:
        decode_signaling(wire)
    assert info.value.code == "bad_message"


def test_non_ascii_is_sent_as_utf8_not_escaped() -> None:
    # A forwarded frame must not grow past the limit the original frame met.
    assert encode_signaling(SessionEnd(SID, "déjà vu")) == (
        '{"v":1,"type":"session_end","session":"s-0123456789ab","reason":"déjà vu"}'
    )


def test_error_without_session_encodes_null() -> None:
    assert encode_signaling(Error("bad_message", "m")) == (
        '{"v":1,"type":"error","code":"bad_message","message":"m","session":null}'
    )


def test_forwarded_session_request_carries_client_last() -> None:
    assert encode_signaling(SessionRequest(SID, "dev1", client="alice")) == (
        '{"v":1,"type":"session_request","session":"s-0123456789ab","device":"dev1","client":"alice"}'
    )


@pytest.mark.parametrize(
    "message",
    [
        Answer(SID, "v=0", "alice"),
        Candidate(SID, None, "alice"),
        SessionEnd(SID, "bye", "alice"),
        PeerLeft(SID, "alice"),
    ],
)
def test_what_the_server_sends_a_device_carries_the_client_last(message: SignalingMessage) -> None:
    wire = encode_signaling(message)
    assert wire.endswith(',"client":"alice"}')
    assert decode_signaling(wire) == message
    without = encode_signaling(dataclasses.replace(message, client=None))
    assert '"client"' not in without


def test_key_order_and_whitespace_of_input_do_not_matter() -> None:
    wire = '{ "device" : "d1", "type" : "register", "v" : 1 }'
    assert decode_signaling(wire) == Register("d1")


@pytest.mark.parametrize(
    "build",
    [
        lambda: Register("../x"),
        lambda: Registered(""),
        lambda: Welcome("peer", "admin"),  # type: ignore[arg-type]
        lambda: SessionRequest("short", "d"),
        lambda: SessionRequest(SID, "d", client="a b"),
        lambda: Offer(SID, "x" * (MAX_SDP_LEN + 1)),
        lambda: Answer(SID, 5),  # type: ignore[arg-type]
        lambda: SessionEnd(SID, "r" * (MAX_REASON_LEN + 1)),
        lambda: PeerLeft("bad id!"),
        lambda: Candidate(SID, "candidate:1"),  # type: ignore[arg-type]
        lambda: IceCandidate("c", "0", True),
        lambda: IceCandidate("c", "0", 65536),
        lambda: IceCandidate("c", None, -1),
        lambda: Error("Nope", "m"),
        lambda: Error("bad_message", "m", "bad id!"),
        lambda: Auth(""),
    ],
)
def test_invalid_values_cannot_be_built(build: object) -> None:
    assert callable(build)
    with pytest.raises(LocalProtocolError):
        build()


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(LocalProtocolError):
        encode_signaling(IceCandidate("c", None, None))  # type: ignore[arg-type]


def test_messages_are_frozen() -> None:
    msg = Register("d1")
    with pytest.raises(AttributeError):
        msg.device = "d2"  # type: ignore[misc]


def test_every_type_is_registered() -> None:
    assert set(MESSAGE_TYPES) == {
        "auth",
        "welcome",
        "ice_servers",
        "register",
        "registered",
        "list_devices",
        "devices",
        "session_request",
        "offer",
        "answer",
        "candidate",
        "session_end",
        "peer_left",
        "revoke",
        "error",
        "moving",
    }


def test_ids() -> None:
    assert is_valid_id("local-device-1")
    assert is_valid_id("a" * 64)
    assert not is_valid_id("a" * 65)
    assert not is_valid_id(".hidden")
    assert not is_valid_id("d\n")
    assert not is_valid_id(7)
    assert is_valid_session_id(SID)
    assert not is_valid_session_id("s" * 7)
    assert not is_valid_session_id("s.0123456789")


def test_new_session_id_is_valid_and_random() -> None:
    ids = {new_session_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(is_valid_session_id(i) for i in ids)


# --- property tests -------------------------------------------------------------

_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_ID_CHARS),
    st.text(alphabet=_ID_CHARS + "._-", max_size=63),
)
session_ids = st.text(alphabet=_ID_CHARS + "_-", min_size=8, max_size=64)
# Any text that UTF-8 can carry: no lone surrogates.
texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=300)
ice_candidates = st.builds(
    IceCandidate,
    texts,
    st.none() | texts,
    st.none() | st.integers(min_value=0, max_value=65535),
)
ice_server_entries = st.one_of(
    st.builds(IceServer, st.sampled_from(["stun:h", "stun:[::1]:3478", "stun:127.0.0.1:1"])),
    st.builds(
        IceServer,
        st.sampled_from(["turn:h", "turn:h:3478?transport=tcp", "turns:[::1]"]),
        st.text(alphabet="abc:0123", min_size=1, max_size=30),
        st.text(alphabet="abcABC+/=", min_size=1, max_size=40),
    ),
)
messages: st.SearchStrategy[SignalingMessage] = st.one_of(
    st.builds(
        IceServers,
        st.lists(ice_server_entries, max_size=16).map(tuple),
        st.none() | st.integers(min_value=1, max_value=7 * 86400),
    ),
    st.builds(Auth, texts.filter(bool)),
    st.builds(Welcome, ids, st.sampled_from(["device", "client"])),
    st.builds(Register, ids),
    st.builds(Registered, ids),
    st.builds(SessionRequest, session_ids, ids, st.none() | ids),
    st.builds(Offer, session_ids, texts),
    st.builds(Answer, session_ids, texts),
    st.builds(Candidate, session_ids, st.none() | ice_candidates),
    st.builds(SessionEnd, session_ids, texts.map(lambda t: t[:MAX_REASON_LEN])),
    st.builds(PeerLeft, session_ids, st.none() | ids),
    st.builds(Revoke, ids, texts),
    st.builds(Error, st.sampled_from(list(ErrorCode)), texts, st.none() | session_ids),
)


@given(messages)
def test_round_trip(message: SignalingMessage) -> None:
    wire = encode_signaling(message)
    assert decode_signaling(wire) == message
    # Compact, and the key order the spec fixes.
    obj = json.loads(wire)
    assert list(obj)[:2] == ["v", "type"]
    assert wire == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.sampled_from([1, "register", "offer", "candidate", SID, "d1"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["v", "type", "session", "device", "sdp", "candidate", "sdpMid", "x"])
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)


def _assert_only_signaling_error(data: str | bytes) -> None:
    try:
        decode_signaling(data)
    except SignalingError as exc:
        assert exc.code in {"bad_message", "unsupported_version", "unknown_type"}


@settings(max_examples=300)
@given(json_values)
def test_random_json_only_raises_signaling_error(value: object) -> None:
    _assert_only_signaling_error(json.dumps(value))


_required_keys: dict[str, st.SearchStrategy[object]] = {
    "v": st.just(1),
    "type": st.sampled_from(sorted(MESSAGE_TYPES)),
}


@settings(max_examples=200)
@given(
    st.fixed_dictionaries(
        _required_keys,
        optional={
            "session": st.one_of(session_ids, json_values),
            "device": st.one_of(ids, json_values),
            "client": st.one_of(ids, json_values),
            "sdp": st.one_of(texts, json_values),
            "candidate": st.one_of(json_values, ice_candidates.map(IceCandidate.to_wire)),
            "reason": json_values,
            "code": json_values,
            "message": json_values,
            "token": json_values,
            "peer": json_values,
            "role": st.one_of(st.sampled_from(["device", "client"]), json_values),
        },
    )
)
def test_near_valid_objects_only_raise_signaling_error(obj: dict[str, object]) -> None:
    _assert_only_signaling_error(json.dumps(obj))


@given(st.text() | st.binary())
def test_random_text_and_bytes_only_raise_signaling_error(data: str | bytes) -> None:
    _assert_only_signaling_error(data)


def test_browser_candidate_json_with_username_fragment_is_accepted_and_dropped() -> None:
    from protocol.signaling import Candidate, decode_signaling, encode_signaling

    raw = (
        '{"v":1,"type":"candidate","session":"s-0123456789ab","candidate":'
        '{"candidate":"candidate:1 1 UDP 2130706431 127.0.0.1 50000 typ host",'
        '"sdpMid":"0","sdpMLineIndex":0,"usernameFragment":"abcd"}}'
    )
    message = decode_signaling(raw)
    assert isinstance(message, Candidate) and message.candidate is not None
    assert "usernameFragment" not in encode_signaling(message)
    with pytest.raises(SignalingError):
        decode_signaling(raw.replace('"abcd"', "5"))


def test_a_register_announces_at_most_32_services() -> None:
    names = tuple(f"s{i}" for i in range(33))
    with pytest.raises(LocalProtocolError):
        Register("d", names)
    assert Register("d", names[:32]).services == names[:32]
    raw = '{"v":1,"type":"register","device":"d","services":' + json.dumps(list(names)) + "}"
    with pytest.raises(SignalingError) as caught:
        decode_signaling(raw)
    assert caught.value.code == "bad_message"


def test_a_devices_message_holds_at_most_16_entries_and_stays_under_the_frame_limit() -> None:
    longest = tuple(f"{i:02d}" + "s" * 62 for i in range(32))
    entries = tuple(DeviceInfo(f"{i:02d}" + "d" * 62, True, longest) for i in range(16))
    assert len(encode_signaling(Devices(entries, more=True))) < MAX_FRAME_SIZE
    with pytest.raises(LocalProtocolError):
        Devices((*entries, DeviceInfo("one-more", False)))
