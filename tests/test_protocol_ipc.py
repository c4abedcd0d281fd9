"""protocol/ipc.py against PROTOCOL.md §3 (supervisor ↔ worker) and §4 (control endpoint)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.ice import IceServer
from protocol.ipc import (
    CONTROL_COMMANDS,
    IPC_VERSION,
    MAX_CONTROL_MESSAGE,
    MAX_IPC_MESSAGE,
    WORKER_ID_RE,
    Assign,
    ControlReply,
    ControlRequest,
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
    decode_control_reply,
    decode_control_request,
    decode_ipc,
    encode_control_reply,
    encode_control_request,
    encode_ipc,
    new_worker_id,
)

SPEC = Path(__file__).resolve().parent.parent / "protocol" / "PROTOCOL.md"

SID = "s-0123456789ab"
WID = "w-0123456789abcdef"
RELAYED = '{"v":1,"type":"candidate","session":"s-0123456789ab","candidate":null}'


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def test_constants() -> None:
    assert IPC_VERSION == 1
    assert MAX_IPC_MESSAGE == 262144
    assert MAX_CONTROL_MESSAGE == 1048576
    assert CONTROL_COMMANDS == ("status", "sessions", "kill", "stop")
    assert issubclass(IpcError, RemoteProtocolError)


# --- §3.1 and §4.1 test vectors, verbatim ---------------------------------------

IPC_VECTORS: list[tuple[str, IpcMessage]] = [
    (
        """83 a1 76 01 a1 74 a5 68656c6c6f a1 62 82 a6 776f726b6572 b2
        772d30313233343536373839616263646566 a3 706964 cd 1092""",
        Hello(WID, 4242),
    ),
    (
        """83 a1 76 01 a1 74 a9 686561727462656174 a1 62 83 a8 62797465735f696e
        cd 0400 a9 62797465735f6f7574 cd 0800 a7 73747265616d73 03""",
        Heartbeat(1024, 2048, 3),
    ),
    (
        """83 a1 76 01 a1 74 a5 647261696e a1 62 81 a7 74696d656f7574
        cb 403e000000000000""",
        Drain(30.0),
    ),
    (
        """83 a1 76 01 a1 74 a5 72656c6179 a1 62 82 a7 73657373696f6e ae
        732d303132333435363738396162 a7 6d657373616765 d9 46
        7b2276223a312c2274797065223a2263616e646964617465222c2273657373696f6e223a
        22732d303132333435363738396162222c2263616e646964617465223a6e756c6c7d""",
        Relay(SID, RELAYED),
    ),
    (
        """83 a1 76 01 a1 74 a6 61737369676e a1 62 87 a7 73657373696f6e ae
        732d303132333435363738396162 a6 646576696365 a4 64657631 a6 636c69656e74
        a5 616c696365 a8 7365727669636573 81 a3 776562 92 a9 3132372e302e302e31
        cd 1f90 ab 6963655f73657276657273 91 83 a3 75726c b3
        7374756e3a3132372e302e302e313a33343738 a8 757365726e616d65 c0 aa
        63726564656e7469616c c0 a9 6963655f686f737473 91 a9 3132372e302e302e31
        aa 6963655f706f6c696379 a3 616c6c""",
        Assign(
            SID,
            "dev1",
            "alice",
            (("web", "127.0.0.1", 8080),),
            (IceServer("stun:127.0.0.1:3478"),),
            ("127.0.0.1",),
        ),
    ),
    (
        """83 a1 76 01 a1 74 a3 696365 a1 62 83 ab 6963655f73657276657273 91 83
        a3 75726c b3 7475726e3a3132372e302e302e313a33343738 a8 757365726e616d65
        af 313736373232393230303a64657631 aa 63726564656e7469616c a8
        6332566a636d5630 a9 6963655f686f737473 90 aa 6963655f706f6c696379 a5
        72656c6179""",
        IceUpdate((IceServer("turn:127.0.0.1:3478", "1767229200:dev1", "c2VjcmV0"),), (), "relay"),
    ),
    (
        """83 a1 76 01 a1 74 a5 7374617465 a1 62 85 a7 73657373696f6e ae
        732d303132333435363738396162 a5 7374617465 a9 636f6e6e6563746564 a4
        70617468 a5 72656c6179 a4 70616972 ab 7372666c782f72656c6179 af
        72656c61795f7472616e73706f7274 c0""",
        StateReport(SID, "connected", "relay", "srflx/relay", None),
    ),
    (
        """83 a1 76 01 a1 74 a7 72656c65617365 a1 62 82 a7 73657373696f6e ae
        732d303132333435363738396162 a6 726561736f6e a8 676976656e207570""",
        Release(SID, "given up"),
    ),
    (
        """83 a1 76 01 a1 74 a8 72656c6561736564 a1 62 81 a7 73657373696f6e ae
        732d303132333435363738396162""",
        Released(SID),
    ),
    (
        """83 a1 76 01 a1 74 a9 686561727462656174 a1 62 84 a8 62797465735f696e
        cd 0400 a9 62797465735f6f7574 cd 0800 a7 73747265616d73 03
        a8 7365727669636573 81 a3 776562 93 cd 03e8 cd 07d0 05""",
        Heartbeat(1024, 2048, 3, (("web", 1000, 2000, 5),)),
    ),
]

REQUEST_VECTORS: list[tuple[str, ControlRequest]] = [
    (
        """83 a1 76 01 a3 636d64 a4 6b696c6c a4 61726773 81 a7 73657373696f6e ae
        732d303132333435363738396162""",
        ControlRequest("kill", {"session": SID}),
    ),
    (
        """83 a1 76 01 a3 636d64 a4 73746f70 a4 61726773 81 ad
        647261696e5f74696d656f7574 cb 4024000000000000""",
        ControlRequest("stop", {"drain_timeout": 10.0}),
    ),
]

REPLY_VECTORS: list[tuple[str, ControlReply]] = [
    (
        """84 a1 76 01 a2 6f6b c3 a6 726573756c74 81 a8 73746f7070696e67 c3 a5
        6572726f72 c0""",
        ControlReply(True, {"stopping": True}),
    ),
    (
        """84 a1 76 01 a2 6f6b c2 a6 726573756c74 c0 a5 6572726f72 af
        756e6b6e6f776e2073657373696f6e""",
        ControlReply(False, error="unknown session"),
    ),
]

# The "Rejected:" examples of §3.1 and §4.1.
STOP_V2 = "83 a1 76 02 a1 74 a4 73746f70 a1 62 81 a6 726561736f6e a0"
RESTART = "83 a1 76 01 a3 636d64 a7 72657374617274 a4 61726773 80"


@pytest.mark.parametrize(("wire", "message"), IPC_VECTORS)
def test_ipc_vector_encodes_byte_exact(wire: str, message: IpcMessage) -> None:
    assert encode_ipc(message) == unhex(wire)


@pytest.mark.parametrize(("wire", "message"), IPC_VECTORS)
def test_ipc_vector_decodes(wire: str, message: IpcMessage) -> None:
    assert decode_ipc(unhex(wire)) == message


@pytest.mark.parametrize(("wire", "req"), REQUEST_VECTORS)
def test_request_vector(wire: str, req: ControlRequest) -> None:
    assert encode_control_request(req) == unhex(wire)
    assert decode_control_request(unhex(wire)) == req


@pytest.mark.parametrize(("wire", "reply"), REPLY_VECTORS)
def test_reply_vector(wire: str, reply: ControlReply) -> None:
    assert encode_control_reply(reply) == unhex(wire)
    assert decode_control_reply(unhex(wire)) == reply


def test_vectors_are_the_ones_in_the_spec() -> None:
    spec = "".join(SPEC.read_text(encoding="utf-8").split())
    wires = [w for w, _ in IPC_VECTORS] + [w for w, _ in REQUEST_VECTORS]
    wires += [w for w, _ in REPLY_VECTORS] + [STOP_V2, RESTART]
    for wire in wires:
        assert "".join(wire.split()) in spec, wire


def test_spec_rejected_examples() -> None:
    with pytest.raises(IpcError, match="must be a msgpack map"):
        decode_ipc(unhex("93 01 02 03"))
    with pytest.raises(IpcError, match="version 2"):
        decode_ipc(unhex(STOP_V2))
    drain = unhex(IPC_VECTORS[2][0])
    assert drain.endswith(unhex("cb 403e000000000000"))
    for timeout in ("c3", "cb 7ff8000000000000"):
        with pytest.raises(IpcError, match=r"drain\.timeout"):
            decode_ipc(drain[:-9] + unhex(timeout))
    for wire, _ in IPC_VECTORS:
        with pytest.raises(IpcError, match="trailing bytes"):
            decode_ipc(unhex(wire) + b"\x00")
    with pytest.raises(IpcError, match="unknown command 'restart'"):
        decode_control_request(unhex(RESTART))
    kill = unhex(REQUEST_VECTORS[0][0])
    with pytest.raises(IpcError, match="missing key 'session'"):
        decode_control_request(kill[: kill.index(b"\x81")] + b"\x80")
    with pytest.raises(IpcError, match=r"reply\.error"):
        decode_control_reply(pack({"v": 1, "ok": False, "result": None, "error": None}))


def test_every_prefix_of_a_vector_is_rejected() -> None:
    for wire, _ in IPC_VECTORS:
        data = unhex(wire)
        for end in range(len(data)):
            with pytest.raises(IpcError):
                decode_ipc(data[:end])


# --- round trips -------------------------------------------------------------------

TURN = IceServer("turns:turn.example.org:5349?transport=tcp", "1700000000:alice", "c2VjcmV0")
EXAMPLES: list[IpcMessage] = [
    Hello(WID, 1),
    Hello(new_worker_id(), 2**31 - 1),
    Assign(SID, "dev1", "alice", ()),
    Assign(
        "S" * 64,
        "d" * 64,
        "c.1_-",
        (("web", "localhost", 1), ("ssh", "::1", 65535), ("db", "h" * 255, 5432)),
        (IceServer("stun:[::1]"), TURN, IceServer("stun:h:1", "u", None)),
        ("10.0.0.0/8", "::1", "fe80::/10"),
    ),
    Relay(SID, "x"),
    Relay(SID, "é" * 32768),  # 65 536 bytes of UTF-8: the largest relay
    StateReport(SID, "new"),
    StateReport(SID, "connected", "relay", "host/relay"),
    StateReport(SID, "connected", "direct", "prflx/srflx"),
    StateReport(SID, "connected", "relay", "relay/relay", "tls"),
    IceUpdate(),
    IceUpdate((TURN,), ("::1",), "relay"),
    StateReport(SID, "failed", None),
    Heartbeat(),
    Heartbeat(2**63 - 1, 0, 7),
    Heartbeat(5, 6, 1, (("web", 1, 2, 3), ("ssh", 4, 4, 0))),
    Ended(SID, "", False),
    Ended(SID, "peer hung up ✓" * 14, True),
    Drain(0.001),
    Drain(1e300),
    Stop("supervisor shutting down"),
    Release(SID, "negotiation not done in 5 s; given up"),
    Released(SID),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_examples(message: IpcMessage) -> None:
    assert decode_ipc(encode_ipc(message)) == message


def test_every_message_type_is_exercised() -> None:
    assert {type(m) for m in EXAMPLES} == {
        Hello,
        Assign,
        IceUpdate,
        Relay,
        StateReport,
        Heartbeat,
        Ended,
        Drain,
        Stop,
        Release,
        Released,
    }
    wire_types = {msgpack.unpackb(encode_ipc(m))["t"] for m in EXAMPLES}
    assert wire_types == {
        "hello",
        "assign",
        "ice",
        "relay",
        "state",
        "heartbeat",
        "ended",
        "drain",
        "stop",
        "release",
        "released",
    }


def test_decoders_accept_bytearray_and_memoryview() -> None:
    wire = encode_ipc(Hello(WID, 1))
    assert decode_ipc(bytearray(wire)) == decode_ipc(memoryview(wire)) == Hello(WID, 1)


def test_int_is_accepted_for_a_float_and_stored_as_float() -> None:
    drain = decode_ipc(pack({"v": 1, "t": "drain", "b": {"timeout": 5}}))
    assert isinstance(drain, Drain)
    assert drain == Drain(5.0) and type(drain.timeout) is float
    assert type(Drain(5).timeout) is float
    request = decode_control_request(pack({"v": 1, "cmd": "stop", "args": {"drain_timeout": 0}}))
    assert request.drain_timeout == 0.0 and type(request.drain_timeout) is float


def test_float32_on_the_wire_is_accepted() -> None:
    data = msgpack.packb({"v": 1, "t": "drain", "b": {"timeout": 2.5}}, use_single_float=True)
    assert decode_ipc(data) == Drain(2.5)


def test_key_order_of_input_does_not_matter() -> None:
    body = {"pid": 7, "worker": WID}
    assert decode_ipc(pack({"b": body, "t": "hello", "v": 1})) == Hello(WID, 7)


def test_assign_services_keep_their_order() -> None:
    services = (("z", "h", 1), ("a", "h", 2), ("m", "h", 3))
    wire = encode_ipc(Assign(SID, "d", "c", services))
    assert list(msgpack.unpackb(wire)["b"]["services"]) == ["z", "a", "m"]
    decoded = decode_ipc(wire)
    assert isinstance(decoded, Assign) and decoded.services == services


# --- rejections ---------------------------------------------------------------------

MISSING = object()

BASE_BODIES: dict[str, dict[str, object]] = {
    "hello": {"worker": WID, "pid": 4242},
    "assign": {
        "session": SID,
        "device": "dev1",
        "client": "alice",
        "services": {"web": ["127.0.0.1", 8080]},
        "ice_servers": [{"url": "stun:127.0.0.1:3478", "username": None, "credential": None}],
        "ice_hosts": ["127.0.0.1"],
        "ice_policy": "all",
    },
    "ice": {
        "ice_servers": [{"url": "stun:127.0.0.1:3478", "username": None, "credential": None}],
        "ice_hosts": [],
        "ice_policy": "relay",
    },
    "relay": {"session": SID, "message": RELAYED},
    "state": {
        "session": SID,
        "state": "connected",
        "path": "direct",
        "pair": "host/host",
        "relay_transport": None,
    },
    "heartbeat": {"bytes_in": 1, "bytes_out": 2, "streams": 3},
    "ended": {"session": SID, "reason": "bye", "clean": True},
    "drain": {"timeout": 30.0},
    "stop": {"reason": "operator"},
}


def ipc(t: str, **changes: object) -> bytes:
    """A ``t`` message: the valid base body with ``changes`` (``MISSING`` deletes a key)."""
    body = BASE_BODIES[t] | changes
    return pack({"v": 1, "t": t, "b": {k: v for k, v in body.items() if v is not MISSING}})


def envelope(**changes: object) -> bytes:
    obj = {"v": 1, "t": "stop", "b": {"reason": "r"}} | changes
    return pack({k: v for k, v in obj.items() if v is not MISSING})


def server(**changes: object) -> dict[str, object]:
    return {"url": "stun:h", "username": None, "credential": None} | changes


def test_base_bodies_are_valid() -> None:
    # Otherwise every rejection below would pass for the wrong reason.
    for t in BASE_BODIES:
        message = decode_ipc(ipc(t))
        assert t == message.TYPE


STOP_BODY = unhex("a1 62 81 a6 726561736f6e a0")  # "b": {"reason": ""}
REJECTED_IPC: list[tuple[object, str]] = [
    # framing
    (b"", "incomplete input"),
    (b"\xc1", "not valid msgpack"),
    (b"\x00" * (MAX_IPC_MESSAGE + 1), "262145 bytes exceeds 262144"),
    (envelope() + b"\xc0", "trailing bytes"),
    ("stop", "must be bytes, not str"),
    (None, "must be bytes, not NoneType"),
    (b"\x91" * 5000 + b"\xc0", "nested too deeply"),
    # wrong msgpack types inside the message
    (ipc("stop", reason=b"r"), "exceeds max_bin_len"),
    (ipc("stop", reason=b""), "stop.reason: must be a str, not bytes"),
    (ipc("stop", reason=msgpack.ExtType(5, b"ab")), "exceeds max_ext_len"),
    (ipc("stop", reason=msgpack.ExtType(5, b"")), "ext type 5 is not allowed"),
    (ipc("stop", reason=msgpack.Timestamp(1, 0)), "exceeds max_ext_len"),
    (unhex("83 a1 76 01 a1 74 a4 73746f70 a1 62 81 a6 726561736f6e a2 fffe"), "not valid UTF-8"),
    (pack({1: 1}), "int is not allowed for map key"),
    (unhex("84 a1 76 01 a1 74 a4 73746f70") + STOP_BODY + unhex("a1 76 01"), "duplicate key"),
    (ipc("relay", message="x" * 65537), "exceeds max_str_len"),
    (ipc("assign", ice_hosts=["::1"] * 4097), "exceeds max_array_len"),
    (ipc("assign", services={f"s{i}": ["h", 1] for i in range(4097)}), "exceeds max_map_len"),
    # envelope
    (pack([1, 2, 3]), "must be a msgpack map, not list"),
    (pack(None), "must be a msgpack map, not NoneType"),
    (envelope(v=MISSING), "missing key 'v'"),
    (envelope(v=2), "version 2 is not supported"),
    (envelope(v=0), "version 0 is not supported"),
    (envelope(v=True), "'v' must be an int, not bool"),
    (envelope(v=1.0), "'v' must be an int, not float"),
    (envelope(v="1"), "'v' must be an int, not str"),
    (envelope(x=1), "unknown key 'x'"),
    (envelope(t=MISSING), "missing key 't'"),
    (envelope(b=MISSING), "missing key 'b'"),
    (envelope(t=7), "'t' must be a str, not int"),
    (envelope(t="Stop"), "unknown type 'Stop'"),
    (envelope(t=""), "unknown type ''"),
    (envelope(b=["r"]), "body 'b' must be a map, not list"),
    (envelope(b=None), "body 'b' must be a map, not NoneType"),
    # body keys
    (ipc("hello", pid=MISSING), "hello: missing key 'pid'"),
    (ipc("hello", x=1), "hello: unknown key 'x'"),
    (pack({"v": 1, "t": "stop", "b": {"reason": "r", b"": 1}}), "stop: unknown key b''"),
    (ipc("state", path=MISSING), "state: missing key 'path'"),
    (ipc("heartbeat", streams=MISSING), "heartbeat: missing key 'streams'"),
    # hello
    (ipc("hello", worker="w-0123456789ABCDEF"), "not a worker id"),
    (ipc("hello", worker="w-0123"), "not a worker id"),
    (ipc("hello", worker=WID + "\n"), "not a worker id"),
    (ipc("hello", worker=7), "not a worker id"),
    (ipc("hello", pid=True), "hello.pid: must be an int, not bool"),
    (ipc("hello", pid=1.0), "hello.pid: must be an int, not float"),
    (ipc("hello", pid=0), "out of range 1..2147483647"),
    (ipc("hello", pid=-1), "out of range"),
    (ipc("hello", pid=2**31), "out of range"),
    # heartbeat
    (ipc("heartbeat", bytes_in=-1), "heartbeat.bytes_in: -1 out of range"),
    (ipc("heartbeat", bytes_out=2**63), "heartbeat.bytes_out: 9223372036854775808 out of range"),
    (ipc("heartbeat", streams=False), "heartbeat.streams: must be an int, not bool"),
    (ipc("heartbeat", streams=1.5), "must be an int, not float"),
    (ipc("heartbeat", streams=None), "must be an int, not NoneType"),
    (ipc("heartbeat", services=[["web", 1, 2, 3]]), "heartbeat.services: must be a map"),
    (ipc("heartbeat", services={"web": [1, 2]}), "heartbeat.services['web']: must be [in"),
    (ipc("heartbeat", services={"we b": [1, 2, 3]}), "'we b' is not a valid service name"),
    (ipc("heartbeat", services={"web": [1, -2, 3]}), "services['web'].bytes_out: -2 out of"),
    (ipc("heartbeat", services={"web": [1, 2, True]}), "streams: must be an int, not bool"),
    # assign
    (ipc("assign", session="short"), "assign.session: 'short' is not a valid session id"),
    (ipc("assign", device="../x"), "assign.device"),
    (ipc("assign", client=""), "assign.client"),
    (ipc("assign", services=[["web", "h", 1]]), "must be a map of name -> [host, port]"),
    (ipc("assign", services={"web": "127.0.0.1:80"}), "assign.services['web']: must be [host"),
    (ipc("assign", services={"web": ["h"]}), "must be [host, port]"),
    (ipc("assign", services={"web": ["h", 1, 2]}), "must be [host, port]"),
    (ipc("assign", services={"-web": ["h", 80]}), "'-web' is not a valid service name"),
    (ipc("assign", services={"w" * 65: ["h", 80]}), "is not a valid service name"),
    (ipc("assign", services={"web": ["h", 0]}), "port: 0 out of range 1..65535"),
    (ipc("assign", services={"web": ["h", 65536]}), "port: 65536 out of range"),
    (ipc("assign", services={"web": ["h", True]}), "port: must be an int, not bool"),
    (ipc("assign", services={"web": ["h", "80"]}), "port: must be an int, not str"),
    (ipc("assign", services={"web": ["", 80]}), "host: must not be empty"),
    (ipc("assign", services={"web": ["h" * 256, 80]}), "host: longer than 255"),
    (ipc("assign", services={"web": [7, 80]}), "host: must be a str, not int"),
    (ipc("assign", ice_servers={}), "assign.ice_servers: must be an array"),
    (ipc("assign", ice_servers=[1]), "each server must be a map"),
    (ipc("assign", ice_servers=[{"url": "stun:h"}]), "missing key 'username'"),
    (ipc("assign", ice_servers=[server(urls=["stun:h"])]), "unknown key 'urls'"),
    (ipc("assign", ice_servers=[server(url="http://h")]), "bad ICE server URL 'http://h'"),
    (ipc("assign", ice_servers=[server(url="stun:h\n")]), "bad ICE server URL"),
    (ipc("assign", ice_servers=[server(url="stun:h:123456")]), "bad ICE server URL"),
    (ipc("assign", ice_servers=[server(url="stuns:h")]), "stuns: (STUN over TLS) is not supported"),
    (ipc("assign", ice_servers=[server(url="stun:h?transport=udp")]), "takes no ?transport"),
    (ipc("assign", ice_servers=[server(url="turns:h?transport=udp")]), "DTLS is not supported"),
    (ipc("assign", ice_servers=[server(url=None)]), "expected a string, not NoneType"),
    (ipc("assign", ice_servers=[server(url="turn:h")]), "TURN server turn:h needs a username"),
    (ipc("assign", ice_servers=[server(url="turn:h", username="u")]), "needs a username"),
    (ipc("assign", ice_servers=[server(username=7)]), "username must be a string, not int"),
    (ipc("assign", ice_servers=[server(username="a\x00b")]), "control character"),
    (ipc("assign", ice_policy="none"), "assign.ice_policy"),
    (ipc("ice", ice_policy=None), "ice.ice_policy"),
    (ipc("ice", ice_servers=[server(url="turn:h")]), "ice.ice_servers: TURN server turn:h"),
    (ipc("state", path="host", pair="host/host"), "state.path"),
    (ipc("state", pair="host/tcp"), "state.pair"),
    (ipc("state", relay_transport="udp"), "only for a path through this side's relay"),
    (ipc("assign", ice_hosts="127.0.0.1"), "assign.ice_hosts: must be an array"),
    (ipc("assign", ice_hosts=["nope"]), "'nope' is not an IP address or network"),
    (ipc("assign", ice_hosts=[" 127.0.0.1"]), "is not an IP address or network"),
    (ipc("assign", ice_hosts=["10.0.0.0/33"]), "is not an IP address or network"),
    (ipc("assign", ice_hosts=[7]), "must hold str, not int"),
    # relay
    (ipc("relay", session="s.0123456789"), "relay.session"),
    (ipc("relay", message=""), "relay.message: must not be empty"),
    (ipc("relay", message=7), "relay.message: must be a str, not int"),
    (ipc("relay", message="€" * 21846), "65538 exceeds max_str_len(65536)"),
    # state
    (ipc("state", state="up"), "state.state: 'up' is not one of new, connecting"),
    (ipc("state", state=None), "state.state"),
    (ipc("state", path="tcp"), "state.path: 'tcp' is not one of direct, relay"),
    (ipc("state", path=""), "state.path"),
    # ended
    (ipc("ended", reason="r" * 201), "ended.reason: longer than 200 characters"),
    (ipc("ended", reason=None), "ended.reason: must be a str"),
    (ipc("ended", clean=1), "ended.clean: must be a bool, not int"),
    (ipc("ended", clean=None), "ended.clean: must be a bool"),
    (ipc("ended", session=SID.upper() + "!"), "ended.session"),
    # drain
    (ipc("drain", timeout=0), "drain.timeout: must be > 0"),
    (ipc("drain", timeout=0.0), "drain.timeout: must be > 0"),
    (ipc("drain", timeout=-1.0), "drain.timeout: must be > 0"),
    (ipc("drain", timeout=math.nan), "drain.timeout: must be finite"),
    (ipc("drain", timeout=math.inf), "drain.timeout: must be finite"),
    (ipc("drain", timeout=True), "drain.timeout: must be a number, not bool"),
    (ipc("drain", timeout="30"), "drain.timeout: must be a number, not str"),
    (ipc("drain", timeout=None), "drain.timeout: must be a number"),
    # stop
    (ipc("stop", reason=None), "stop.reason: must be a str"),
    (ipc("stop", reason="r" * 201), "stop.reason: longer than 200 characters"),
]  # fmt: skip


def check_rejected(decode: Callable[[Any], object], data: object, fragment: str) -> None:
    with pytest.raises(IpcError) as info:
        decode(data)
    text = str(info.value)
    assert fragment in text
    assert text and "\n" not in text, "one line, for a log"


@pytest.mark.parametrize(("data", "fragment"), REJECTED_IPC, ids=[f for _, f in REJECTED_IPC])
def test_ipc_rejected(data: object, fragment: str) -> None:
    check_rejected(decode_ipc, data, fragment)


def request(**changes: object) -> bytes:
    obj = {"v": 1, "cmd": "kill", "args": {"session": SID}} | changes
    return pack({k: v for k, v in obj.items() if v is not MISSING})


def reply(**changes: object) -> bytes:
    obj = {"v": 1, "ok": True, "result": {"session": SID}, "error": None} | changes
    return pack({k: v for k, v in obj.items() if v is not MISSING})


def nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def test_request_and_reply_bases_are_valid() -> None:
    assert decode_control_request(request()) == ControlRequest("kill", {"session": SID})
    assert decode_control_reply(reply()) == ControlReply(True, {"session": SID})


REJECTED_REQUESTS: list[tuple[object, str]] = [
    (b"\x00" * (MAX_CONTROL_MESSAGE + 1), "1048577 bytes exceeds 1048576"),
    (request() + b"\x00", "trailing bytes"),
    (b"\x93\x01", "incomplete input"),
    ("kill", "must be bytes"),
    (pack(["kill"]), "must be a msgpack map, not list"),
    (request(v=MISSING), "missing key 'v'"),
    (request(v=2), "version 2 is not supported"),
    (request(v=True), "'v' must be an int, not bool"),
    (request(x=1), "unknown key 'x'"),
    (request(args=MISSING), "missing key 'args'"),
    (request(cmd=MISSING), "missing key 'cmd'"),
    (request(cmd=7), "'cmd' must be a str, not int"),
    (request(cmd="restart"), "unknown command 'restart'"),
    (request(cmd="Status", args={}), "unknown command 'Status'"),
    (request(args=[SID]), "'args' must be a map, not list"),
    (request(args=None), "'args' must be a map, not NoneType"),
    (request(cmd="status", args={"session": SID}), "status args: unknown key 'session'"),
    (request(cmd="sessions", args={"x": 1}), "sessions args: unknown key 'x'"),
    (request(args={}), "kill args: missing key 'session'"),
    (request(args={"session": SID, "x": 1}), "kill args: unknown key 'x'"),
    (request(args={"session": "bad id"}), "kill args.session: 'bad id' is not a valid session id"),
    (request(args={"session": 7}), "kill args.session"),
    (request(args={"session": b""}), "kill args.session"),
    (request(cmd="stop", args={"drain_timeout": -1}), "stop args.drain_timeout: must be >= 0"),
    (request(cmd="stop", args={"drain_timeout": -0.5}), "must be >= 0"),
    (request(cmd="stop", args={"drain_timeout": math.nan}), "must be finite"),
    (request(cmd="stop", args={"drain_timeout": math.inf}), "must be finite"),
    (request(cmd="stop", args={"drain_timeout": True}), "must be a number, not bool"),
    (request(cmd="stop", args={"drain_timeout": "10"}), "must be a number, not str"),
    (request(cmd="stop", args={"drain_timeout": None}), "must be a number, not NoneType"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "fragment"), REJECTED_REQUESTS, ids=[f for _, f in REJECTED_REQUESTS]
)
def test_control_request_rejected(data: object, fragment: str) -> None:
    check_rejected(decode_control_request, data, fragment)


# A reply around a raw ``result`` (msgpack.packb itself refuses to nest 5000 deep).
REPLY_HEAD = unhex("84 a1 76 01 a2 6f6b c3 a6 726573756c74")
REPLY_TAIL = unhex("a5 6572726f72 c0")
REJECTED_REPLIES: list[tuple[object, str]] = [
    (b"\x00" * (MAX_CONTROL_MESSAGE + 1), "exceeds 1048576"),
    (reply() + b"\xc0", "trailing bytes"),
    (pack(True), "must be a msgpack map, not bool"),
    (reply(v=2), "version 2 is not supported"),
    (reply(result=MISSING), "missing key 'result'"),
    (reply(error=MISSING), "missing key 'error'"),
    (reply(extra=None), "unknown key 'extra'"),
    (reply(ok=1), "reply.ok: must be a bool, not int"),
    (reply(ok=None), "reply.ok: must be a bool"),
    (reply(error="boom"), "reply.error: must be None when ok"),
    (reply(ok=False, result=None), "reply.error: must be a str, not NoneType"),
    (reply(ok=False, result=None, error=""), "reply.error: must not be empty"),
    (reply(ok=False, result=None, error=7), "reply.error: must be a str, not int"),
    (reply(ok=False, error="boom"), "reply.result: must be None when not ok"),
    (reply(result={"x": math.nan}), "reply.result: nan is not a finite float"),
    (reply(result=[math.inf]), "inf is not a finite float"),
    (reply(result={"x": b"abc"}), "exceeds max_bin_len"),
    (reply(result={"x": b""}), "bytes is not plain data"),
    (reply(result={b"": 1}), "map key b'' is not a str"),
    (reply(result=msgpack.Timestamp(0, 0)), "exceeds max_ext_len"),
    (reply(result=nested(33)), "reply.result: nested deeper than 32"),
    (reply(result=[0] * 65537), "exceeds max_array_len"),
    (REPLY_HEAD + b"\x91" * 5000 + b"\xc0" + REPLY_TAIL, "nested too deeply"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "fragment"), REJECTED_REPLIES, ids=[f for _, f in REJECTED_REPLIES]
)
def test_control_reply_rejected(data: object, fragment: str) -> None:
    check_rejected(decode_control_reply, data, fragment)


# --- construction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: Hello("w-1", 1), "not a worker id"),
        (lambda: Hello(WID, True), "hello.pid: must be an int, not bool"),
        (lambda: Assign(SID, "d", "c", [("web", "h", 1)]), "assign.services: must be a tuple"),  # type: ignore[arg-type]
        (lambda: Assign(SID, "d", "c", (["web", "h", 1],)), "(name, host, port) tuple"),  # type: ignore[arg-type]
        (lambda: Assign(SID, "d", "c", (("web", "h"),)), "(name, host, port) tuple"),  # type: ignore[arg-type]
        (lambda: Assign(SID, "d", "c", (("web", "h", 1), ("web", "g", 2))), "'web' appears twice"),
        (lambda: Assign(SID, "d", "c", (("web", "h\ud800", 1),)), "lone UTF-16 surrogate"),
        (lambda: Assign(SID, "d", "c", (), ({"url": "stun:h"},)), "must be an IceServer"),  # type: ignore[arg-type]
        (lambda: Assign(SID, "d", "c", (), (), (), "none"), "assign.ice_policy"),  # type: ignore[arg-type]
        (lambda: IceUpdate((), (), "udp"), "ice.ice_policy"),  # type: ignore[arg-type]
        (lambda: StateReport(SID, "connected", "relay", "host/host"), "does not match pair"),
        (lambda: StateReport(SID, "connected", "direct", "host"), "state.pair"),
        (lambda: StateReport(SID, "connected", "direct"), "must be given with path"),
        (lambda: StateReport(SID, "connected", "relay", "srflx/relay", "udp"), "this side's relay"),
        (lambda: StateReport(SID, "connected", "relay", "relay/host", "sctp"), "relay_transport"),
        (lambda: Assign(SID, "d", "c", (), (), ["::1"]), "assign.ice_hosts: must be a tuple"),  # type: ignore[arg-type]
        (lambda: Assign("x", "d", "c", ()), "assign.session"),
        (lambda: Relay(SID, "\ud800"), "lone UTF-16 surrogate"),
        (lambda: Relay(SID, "€" * 21846), "longer than 65536 bytes"),
        (lambda: StateReport(SID, "CONNECTED"), "state.state"),
        (lambda: StateReport(SID, "connected", "udp"), "state.path"),
        (lambda: Heartbeat(-1), "out of range"),
        (lambda: Heartbeat(0, 2**63), "out of range"),
        (lambda: Heartbeat(0, 0, 1.0), "must be an int, not float"),  # type: ignore[arg-type]
        (lambda: Ended(SID, "r", 1), "ended.clean: must be a bool"),  # type: ignore[arg-type]
        (lambda: Ended(SID, "r" * 201, True), "longer than 200"),
        (lambda: Drain(0), "must be > 0"),
        (lambda: Drain(math.nan), "must be finite"),
        (lambda: Drain(10**400), "too large"),
        (lambda: Drain(True), "must be a number, not bool"),
        (lambda: Stop("r" * 201), "stop.reason: longer than 200"),
        (lambda: ControlRequest("restart", {}), "not one of status, sessions, kill, stop"),
        (lambda: ControlRequest("kill"), "missing key 'session'"),
        (lambda: ControlRequest("kill", {"session": SID, "x": 1}), "unknown key 'x'"),
        (lambda: ControlRequest("stop", {"drain_timeout": -1}), "must be >= 0"),
        (lambda: ControlRequest("status", None), "must be a mapping, not NoneType"),  # type: ignore[arg-type]
        (lambda: ControlReply(1), "reply.ok: must be a bool"),  # type: ignore[arg-type]
        (lambda: ControlReply(False), "reply.error: must be a str"),
        (lambda: ControlReply(False, {}, "e"), "reply.result: must be None when not ok"),
        (lambda: ControlReply(True, error="e"), "must be None when ok"),
        (lambda: ControlReply(True, {1: 2}), "map key 1 is not a str"),
        (lambda: ControlReply(True, b"x"), "bytes is not plain data"),
        (lambda: ControlReply(True, {"a": {1, 2}}), "set is not plain data"),
        (lambda: ControlReply(True, float("inf")), "not a finite float"),
        (lambda: ControlReply(True, 2**64), "out of range"),
        (lambda: ControlReply(True, -(2**63) - 1), "out of range"),
        (lambda: ControlReply(True, nested(33)), "nested deeper than 32"),
        (lambda: ControlReply(True, "\ud800"), "lone UTF-16 surrogate"),
    ],
)  # fmt: skip
def test_invalid_values_cannot_be_built(build: Callable[[], object], fragment: str) -> None:
    with pytest.raises(LocalProtocolError, match=re.escape(fragment)):
        build()


def test_boundaries_that_are_valid() -> None:
    assert ControlReply(True, nested(32)).result == nested(32)
    assert ControlReply(True, [-(2**63), 2**64 - 1]).result == [-(2**63), 2**64 - 1]
    assert ControlRequest("stop", {"drain_timeout": 0}).drain_timeout == 0.0
    assert Relay(SID, "x" * 65536).message == "x" * 65536
    assert decode_control_reply(reply(result=nested(32))).result == nested(32)


def test_encoders_reject_what_they_do_not_encode() -> None:
    with pytest.raises(LocalProtocolError, match="not an IPC message"):
        encode_ipc(IceServer("stun:h"))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="not a ControlRequest"):
        encode_control_request(Stop("r"))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="not a ControlReply"):
        encode_control_reply(ControlRequest("status"))  # type: ignore[arg-type]


def test_encoder_refuses_a_message_the_peer_would_reject_for_size() -> None:
    services = tuple((f"s{i}", "h" * 255, 1) for i in range(1100))
    with pytest.raises(LocalProtocolError, match="exceeds 262144"):
        encode_ipc(Assign(SID, "d", "c", services))
    with pytest.raises(LocalProtocolError, match="exceeds 1048576"):
        encode_control_reply(ControlReply(True, ["x" * 60000] * 18))


def test_a_sessions_reply_for_1024_sessions_fits() -> None:
    # §4: why control messages may be larger than worker messages.
    session = {
        "session": "A" * 22,
        "client": "c" * 64,
        "worker": WID,
        "pid": 4194304,
        "state": "disconnected",
        "path": "relay",
        "bytes_in": 2**62,
        "bytes_out": 2**62,
        "streams": 1000,
        "started": 1_700_000_000.5,
        "last_heartbeat": 1_700_000_000.5,
        "restarts": 3,
    }
    rep = ControlReply(True, [session] * 1024)
    wire = encode_control_reply(rep)
    assert MAX_IPC_MESSAGE < len(wire) <= MAX_CONTROL_MESSAGE
    assert decode_control_reply(wire) == rep


def test_messages_are_frozen_and_slotted() -> None:
    msg = Hello(WID, 1)
    with pytest.raises(AttributeError):
        msg.pid = 2  # type: ignore[misc]
    assert not hasattr(msg, "__dict__")


def test_request_args_are_a_read_only_copy() -> None:
    args: dict[str, object] = {"session": SID}
    req = ControlRequest("kill", args)
    args["session"] = "changed-after"
    assert req.session == SID
    with pytest.raises(TypeError):
        req.args["session"] = "x"  # type: ignore[index]


def test_request_properties() -> None:
    assert ControlRequest("kill", {"session": SID}).session == SID
    assert ControlRequest("kill", {"session": SID}).drain_timeout is None
    assert ControlRequest("stop", {"drain_timeout": 2}).drain_timeout == 2.0
    assert ControlRequest("stop", {"drain_timeout": 2}).session is None
    assert ControlRequest("status") == ControlRequest("status", {})
    assert ControlRequest("sessions").args == {}


def test_reply_result_is_a_plain_copy() -> None:
    result: dict[str, object] = {"items": (1, (2, 3)), "n": None}
    rep = ControlReply(True, result)
    result["n"] = 5
    assert rep.result == {"items": [1, [2, 3]], "n": None}
    assert decode_control_reply(encode_control_reply(rep)) == rep


def test_worker_ids() -> None:
    ids = {new_worker_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(WORKER_ID_RE.fullmatch(i) for i in ids)
    assert WORKER_ID_RE.fullmatch(WID)
    assert not WORKER_ID_RE.fullmatch(WID + "\n")
    assert not WORKER_ID_RE.fullmatch("w-0123456789ABCDEF")


# --- property tests -------------------------------------------------------------------

_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_ID_CHARS),
    st.text(alphabet=_ID_CHARS + "._-", max_size=63),
)
session_ids = st.text(alphabet=_ID_CHARS + "_-", min_size=8, max_size=64)
worker_ids = st.text(alphabet="0123456789abcdef", min_size=16, max_size=16).map("w-".__add__)
# Any text UTF-8 can carry: no lone surrogates.
texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200)
counters = st.integers(min_value=0, max_value=2**63 - 1)
seconds = st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False)

ice_urls = st.builds(
    lambda scheme, host, port, transport: f"{scheme}:{host}{port}{transport}",
    st.sampled_from(["stun", "turn", "turns"]),
    st.sampled_from(["127.0.0.1", "[::1]", "turn.example.org", "h"]),
    st.sampled_from(["", ":3478", ":1"]),
    st.sampled_from(["", "?transport=udp", "?transport=tcp"]),
).filter(lambda url: not url.startswith("stun:") or "?" not in url)
ice_urls = ice_urls.filter(lambda url: not (url.startswith("turns:") and url.endswith("udp")))
credentials = st.text(
    alphabet=st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=200
)
ice_servers = ice_urls.flatmap(
    lambda url: (
        st.builds(IceServer, st.just(url), credentials, credentials)
        if url.startswith("turn")
        else st.builds(IceServer, st.just(url), st.none() | credentials, st.none() | credentials)
    )
)
ice_hosts = st.ip_addresses().map(str) | st.sampled_from(["10.0.0.0/8", "fe80::/10", "::1/128"])
services = st.lists(
    st.tuples(
        ids,
        st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=255),
        st.integers(min_value=1, max_value=65535),
    ),
    max_size=6,
    unique_by=lambda s: s[0],
).map(tuple)

messages: st.SearchStrategy[IpcMessage] = st.one_of(
    st.builds(Hello, worker_ids, st.integers(min_value=1, max_value=2**31 - 1)),
    st.builds(
        Assign,
        session_ids,
        ids,
        ids,
        services,
        st.lists(ice_servers, max_size=3).map(tuple),
        st.lists(ice_hosts, max_size=3).map(tuple),
        st.sampled_from(["all", "relay"]),
    ),
    st.builds(
        IceUpdate,
        st.lists(ice_servers, max_size=3).map(tuple),
        st.lists(ice_hosts, max_size=3).map(tuple),
        st.sampled_from(["all", "relay"]),
    ),
    st.builds(Relay, session_ids, texts.filter(bool)),
    st.builds(
        lambda session, state, types, tls: StateReport(
            session,
            state,
            None if types is None else ("relay" if "relay" in types else "direct"),
            None if types is None else "/".join(types),
            tls if types is not None and types[0] == "relay" else None,
        ),
        session_ids,
        st.sampled_from(["new", "connecting", "connected", "disconnected", "failed", "closed"]),
        st.none() | st.tuples(*[st.sampled_from(["host", "srflx", "prflx", "relay"])] * 2),
        st.sampled_from([None, "udp", "tcp", "tls"]),
    ),
    st.builds(Heartbeat, counters, counters, counters),
    st.builds(Ended, session_ids, texts, st.booleans()),
    st.builds(Drain, seconds | st.integers(min_value=1, max_value=2**64)),
    st.builds(Stop, texts),
)

plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=20,
)
requests = st.one_of(
    st.builds(ControlRequest, st.sampled_from(["status", "sessions"])),
    st.builds(lambda s: ControlRequest("kill", {"session": s}), session_ids),
    st.builds(
        lambda t: ControlRequest("stop", {"drain_timeout": t}),
        st.floats(min_value=0, allow_nan=False, allow_infinity=False)
        | st.integers(min_value=0, max_value=2**64),
    ),
)
replies = st.builds(ControlReply, st.just(True), plain_values) | st.builds(
    lambda e: ControlReply(False, error=e), texts.filter(bool)
)


@settings(max_examples=75, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_round_trip(message: IpcMessage) -> None:
    wire = encode_ipc(message)
    assert decode_ipc(wire) == message
    assert list(msgpack.unpackb(wire)) == ["v", "t", "b"]


@given(requests)
def test_request_round_trip(req: ControlRequest) -> None:
    assert decode_control_request(encode_control_request(req)) == req


@settings(max_examples=50)
@given(replies)
def test_reply_round_trip(rep: ControlReply) -> None:
    assert decode_control_reply(encode_control_reply(rep)) == rep


DECODERS: list[Callable[[bytes], object]] = [
    decode_ipc,
    decode_control_request,
    decode_control_reply,
]


def only_ipc_error(data: bytes) -> None:
    """Every decoder either returns a value that re-encodes, or raises a one-line IpcError."""
    for decode in DECODERS:
        try:
            value = decode(data)
        except IpcError as exc:
            assert str(exc) and "\n" not in str(exc)
            continue
        if isinstance(value, ControlRequest):
            assert decode_control_request(encode_control_request(value)) == value
        elif isinstance(value, ControlReply):
            assert decode_control_reply(encode_control_reply(value)) == value
        else:
            assert decode_ipc(encode_ipc(value)) == value  # type: ignore[arg-type]


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_ipc_error(data: bytes) -> None:
    only_ipc_error(data)


KEYS = sorted(
    {"v", "t", "b", "cmd", "args", "ok", "result", "error", "session", "drain_timeout"}
    | {key for body in BASE_BODIES.values() for key in body}
)
msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | msgpack_ints
    | st.floats()
    | st.text()
    | st.binary(max_size=8)
    | st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=4))
    | st.sampled_from([1, SID, WID, "stop", "kill", "hello", "assign", "relay", "state"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=15,
)


@settings(max_examples=100)
@given(msgpack_values)
def test_random_msgpack_only_raises_ipc_error(value: object) -> None:
    only_ipc_error(pack(value))


def _near(valid: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """Mostly valid values, so the fuzzing reaches the field checks."""
    return st.one_of(valid, valid, msgpack_values)


def wire_server(spec: IceServer) -> dict[str, object]:
    return server(url=spec.url, username=spec.username, credential=spec.credential)


_FIELD_VALUES: dict[str, st.SearchStrategy[object]] = {
    "worker": _near(worker_ids),
    "pid": _near(st.integers(min_value=-2, max_value=2**32)),
    "session": _near(session_ids),
    "device": _near(ids),
    "client": _near(ids),
    "services": _near(
        st.dictionaries(ids, st.lists(_near(st.integers(0, 70000) | texts), max_size=3))
    ),
    "ice_servers": _near(
        st.lists(ice_servers.map(wire_server))
    ),
    "ice_hosts": _near(st.lists(_near(ice_hosts))),
    "message": _near(texts),
    "state": _near(st.sampled_from(["new", "connected", "up"])),
    "path": _near(st.sampled_from(["direct", "relay", "host"])),
    "pair": _near(st.sampled_from(["host/host", "srflx/relay", "relay", "a/b"])),
    "relay_transport": _near(st.sampled_from(["udp", "tcp", "tls", "sctp"])),
    "ice_policy": _near(st.sampled_from(["all", "relay", "none"])),
    "bytes_in": _near(counters),
    "bytes_out": _near(counters),
    "streams": _near(counters),
    "reason": _near(texts),
    "clean": _near(st.booleans()),
    "timeout": _near(st.floats() | msgpack_ints),
}  # fmt: skip


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(BASE_BODIES)).flatmap(
        lambda t: st.fixed_dictionaries(
            {},
            optional={key: _FIELD_VALUES[key] for key in BASE_BODIES[t]},
        ).map(lambda body: {"v": 1, "t": t, "b": BASE_BODIES[t] | body})
    )
)
def test_near_valid_ipc_messages_only_raise_ipc_error(obj: dict[str, object]) -> None:
    only_ipc_error(pack(obj))


@settings(max_examples=75)
@given(
    st.fixed_dictionaries(
        {"v": _near(st.just(1))},
        optional={
            "cmd": _near(st.sampled_from(CONTROL_COMMANDS)),
            "args": _near(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "session": _near(session_ids),
                        "drain_timeout": _near(st.floats() | msgpack_ints),
                    },
                )
            ),
            "ok": _near(st.booleans()),
            "result": _near(plain_values),
            "error": _near(st.none() | texts),
        },
    )
)
def test_near_valid_control_messages_only_raise_ipc_error(obj: dict[str, object]) -> None:
    only_ipc_error(pack(obj))


ALL_VECTORS = [unhex(w) for w, _ in [*IPC_VECTORS, *REQUEST_VECTORS, *REPLY_VECTORS]]


@settings(max_examples=200)
@given(
    st.sampled_from(ALL_VECTORS).flatmap(
        lambda v: st.tuples(st.just(v), st.integers(0, len(v) - 1), st.integers(0, 255))
    )
)
def test_vectors_with_one_byte_changed_only_raise_ipc_error(case: tuple[bytes, int, int]) -> None:
    vector, index, byte = case
    only_ipc_error(vector[:index] + bytes([byte]) + vector[index + 1 :])


def test_stop_may_leave_the_drain_timeout_to_the_supervisor() -> None:
    request = decode_control_request(encode_control_request(ControlRequest("stop", {})))
    assert request.cmd == "stop" and request.drain_timeout is None
