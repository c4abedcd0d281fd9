"""signaling/router.py: §1.3-§1.6 routing, in memory, with injected time."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable

import pytest

from protocol.signaling import (
    MAX_SDP_LEN,
    Answer,
    Auth,
    Candidate,
    DeviceInfo,
    Devices,
    Error,
    IceCandidate,
    ListDevices,
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
)
from signaling.auth import Identity
from signaling.errors import UsageError
from signaling.router import (
    TRANSITIONS,
    Action,
    Close,
    Limits,
    Presence,
    Relay,
    Router,
    RouteState,
    Send,
)

S1 = "session-0001"
S2 = "session-0002"
ICE = IceCandidate("candidate:1 1 UDP 2130706431 127.0.0.1 50000 typ host", "0", 0)


class Net:
    """A router and fake connections named like their token ``sub``.

    What the router sends goes through encode/decode, as it would on the wire.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.router = Router(limits)
        self.now = 0.0
        self.inbox: dict[str, list[SignalingMessage]] = defaultdict(list)
        self.closed: dict[str, tuple[int, str]] = {}
        self.log: list[Action] = []
        self.presence: list[Presence] = []

    def apply(self, actions: Iterable[Action]) -> None:
        for action in actions:
            assert not isinstance(action, Relay), "one node relays nothing"
            if isinstance(action, Presence):
                self.presence.append(action)
                continue
            self.log.append(action)
            assert isinstance(action.conn, str)
            if isinstance(action, Send):
                self.inbox[action.conn].append(decode_signaling(encode_signaling(action.message)))
            else:
                assert action.conn not in self.closed, "closed twice"
                self.closed[action.conn] = (action.code, action.reason)

    def connect(self, conn: str, role: str, devices: Iterable[str] = (), sub: str = "") -> None:
        identity = Identity(sub or conn, role, frozenset(devices))  # type: ignore[arg-type]
        self.apply(self.router.connect(conn, identity, self.now))
        assert self.take(conn) == [Welcome(identity.sub, identity.role)]

    def send(self, conn: str, message: SignalingMessage | str | bytes) -> None:
        raw = message if isinstance(message, str | bytes) else encode_signaling(message)
        self.apply(self.router.receive(conn, raw, self.now))

    def disconnect(self, conn: str) -> None:
        self.apply(self.router.disconnect(conn))

    def take(self, conn: str) -> list[SignalingMessage]:
        return self.inbox.pop(conn, [])

    def error(self, conn: str) -> Error:
        """The one message ``conn`` got, which must be an error."""
        (message,) = self.take(conn)
        assert isinstance(message, Error)
        return message

    def quiet(self, *conns: str) -> bool:
        return all(not self.inbox.get(c) for c in conns)


def online(limits: Limits | None = None) -> Net:
    """dev1 registered; alice may reach dev1 and dev2; bob may reach dev1."""
    net = Net(limits)
    net.connect("dev1", "device")
    net.send("dev1", Register("dev1"))
    assert net.take("dev1") == [Registered("dev1")]
    net.connect("alice", "client", ["dev1", "dev2"])
    net.connect("bob", "client", ["dev1"])
    return net


def requested(net: Net, session: str = S1, client: str = "alice") -> None:
    net.send(client, SessionRequest(session, "dev1"))
    assert net.take("dev1") == [SessionRequest(session, "dev1", client=client)]
    assert net.quiet(client)


def offered(net: Net, session: str = S1, client: str = "alice") -> None:
    requested(net, session, client)
    net.send("dev1", Offer(session, "v=0 offer"))
    assert net.take(client) == [Offer(session, "v=0 offer")]


def active(net: Net, session: str = S1, client: str = "alice") -> None:
    offered(net, session, client)
    net.send(client, Answer(session, "v=0 answer"))
    assert net.take("dev1") == [Answer(session, "v=0 answer", client)]


# --- the happy path ---------------------------------------------------------------


def test_full_session() -> None:
    net = online()
    net.send("alice", SessionRequest(S1, "dev1"))
    assert net.take("dev1") == [SessionRequest(S1, "dev1", client="alice")]
    net.send("dev1", Candidate(S1, ICE))  # candidates may flow while pending (§1.4 "any")
    assert net.take("alice") == [Candidate(S1, ICE)]
    net.send("dev1", Offer(S1, "v=0 offer"))
    assert net.take("alice") == [Offer(S1, "v=0 offer")]
    net.send("alice", Answer(S1, "v=0 answer"))
    assert net.take("dev1") == [Answer(S1, "v=0 answer", "alice")]
    net.send("alice", Candidate(S1, ICE))
    net.send("alice", Candidate(S1, None))
    assert net.take("dev1") == [Candidate(S1, ICE, "alice"), Candidate(S1, None, "alice")]
    net.send("dev1", Candidate(S1, None))
    assert net.take("alice") == [Candidate(S1, None)]
    net.send("alice", SessionEnd(S1, "user closed the tunnel"))
    assert net.take("dev1") == [SessionEnd(S1, "user closed the tunnel", "alice")]
    assert net.quiet("alice", "bob", "dev1")
    assert net.router.stats()["sessions"] == 0
    # The session is gone for both parties.
    net.send("dev1", Candidate(S1, None))
    assert net.error("dev1").code == "unknown_session"
    assert net.quiet("alice")


def test_device_may_end_the_session() -> None:
    net = online()
    active(net)
    net.send("dev1", SessionEnd(S1, "service stopped"))
    assert net.take("alice") == [SessionEnd(S1, "service stopped")]
    net.send("alice", Candidate(S1, None))
    assert net.error("alice").code == "unknown_session"


def test_a_session_id_is_free_again_after_it_ended() -> None:
    net = online()
    active(net)
    net.send("dev1", SessionEnd(S1, "done"))
    net.take("alice")
    requested(net)


def test_two_sessions_are_routed_independently() -> None:
    net = online()
    offered(net, S1, "alice")
    offered(net, S2, "bob")
    net.send("bob", Answer(S2, "bob's answer"))
    assert net.take("dev1") == [Answer(S2, "bob's answer", "bob")]
    assert net.quiet("alice")


# --- presence -----------------------------------------------------------------------


def test_device_offline_matches_the_spec_vector() -> None:
    net = Net()
    net.connect("alice", "client", ["dev1"])
    net.send("alice", SessionRequest("s-0123456789ab", "dev1"))
    (message,) = net.take("alice")
    assert encode_signaling(message) == (
        '{"v":1,"type":"error","code":"device_offline","message":"device dev1 is offline",'
        '"session":"s-0123456789ab"}'
    )


def test_connected_but_unregistered_device_is_offline() -> None:
    net = Net()
    net.connect("dev1", "device")
    net.connect("alice", "client", ["dev1"])
    net.send("alice", SessionRequest(S1, "dev1"))
    assert net.error("alice").code == "device_offline"
    assert net.quiet("dev1")


def test_register_again_on_the_same_connection_is_harmless() -> None:
    net = online()
    requested(net)
    net.send("dev1", Register("dev1"))
    assert net.take("dev1") == [Registered("dev1")]
    net.send("dev1", Offer(S1, "sdp"))
    assert net.take("alice") == [Offer(S1, "sdp")]


def test_newest_registration_wins() -> None:
    net = online()
    active(net)
    net.connect("dev1-new", "device", sub="dev1")
    net.send("dev1-new", Register("dev1"))

    assert net.take("dev1-new") == [Registered("dev1")]
    replaced = net.error("dev1")
    assert replaced.code == "replaced"
    assert net.closed == {"dev1": (4409, "replaced by a newer connection")}
    assert net.take("alice") == [PeerLeft(S1)]
    # The stale link is ignored from now on, and the new one gets the traffic.
    net.send("dev1", Offer(S1, "stale"))
    assert net.quiet("dev1", "alice")
    net.send("alice", SessionRequest(S2, "dev1"))
    assert net.take("dev1-new") == [SessionRequest(S2, "dev1", client="alice")]
    # The stale socket closing later does not unregister the new link.
    net.disconnect("dev1")
    assert net.quiet("alice", "dev1-new")
    assert net.router.is_online("dev1")


def test_peer_left_when_the_client_disconnects() -> None:
    net = online()
    active(net)
    offered(net, S2, "bob")
    net.disconnect("alice")
    assert net.take("dev1") == [PeerLeft(S1, "alice")]
    assert net.quiet("bob")
    net.send("dev1", Candidate(S1, None))
    assert net.error("dev1").code == "unknown_session"


def test_peer_left_when_the_device_disconnects() -> None:
    net = online()
    active(net, S1, "alice")
    requested(net, S2, "bob")
    net.disconnect("dev1")
    assert net.take("alice") == [PeerLeft(S1)]
    assert net.take("bob") == [PeerLeft(S2)]
    assert not net.router.is_online("dev1")
    net.send("alice", SessionRequest("session-0003", "dev1"))
    assert net.error("alice").code == "device_offline"
    assert net.router.stats() | {} == net.router.stats()
    assert net.router.stats()["sessions"] == 0


def test_disconnect_is_idempotent() -> None:
    net = online()
    net.disconnect("alice")
    net.disconnect("alice")
    assert net.router.stats()["connections"] == 2


# --- forbidden ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "message"),
    [
        ("alice", Register("alice")),
        ("alice", Offer(S1, "sdp")),
        ("dev1", SessionRequest(S1, "dev1")),
        ("dev1", Answer(S1, "sdp")),
        ("dev1", Register("dev2")),
        ("alice", SessionRequest(S1, "dev3")),  # not granted (and offline: no probing)
        ("bob", SessionRequest(S1, "dev2")),
        ("alice", Welcome("alice", "client")),
        ("dev1", Registered("dev1")),
        ("alice", PeerLeft(S1)),
        ("alice", Error("bad_message", "x")),
    ],
)
def test_forbidden(sender: str, message: SignalingMessage) -> None:
    net = online()
    net.send(sender, message)
    assert net.error(sender).code == "forbidden"
    assert net.quiet("alice", "bob", "dev1")
    assert net.router.stats()["sessions"] == 0


def test_grant_is_checked_before_presence() -> None:
    net = online()
    net.connect("dev2", "device")
    net.send("dev2", Register("dev2"))
    net.take("dev2")
    net.send("bob", SessionRequest(S1, "dev2"))  # online but not granted
    online_answer = net.error("bob")
    net.send("bob", SessionRequest(S1, "dev9"))  # offline and not granted
    offline_answer = net.error("bob")
    assert online_answer.code == offline_answer.code == "forbidden"


@pytest.mark.parametrize(
    ("sender", "message"),
    [
        ("alice", SessionRequest(S1, "dev1", client="bob")),
        ("alice", Answer(S1, "sdp", client="bob")),
        ("alice", Candidate(S1, None, client="bob")),
        ("alice", SessionEnd(S1, "bye", client="bob")),
        ("dev1", Candidate(S1, None, client="alice")),
        ("dev1", SessionEnd(S1, "bye", client="alice")),
    ],
)
def test_only_the_server_stamps_the_client(sender: str, message: SignalingMessage) -> None:
    net = online()
    offered(net)
    net.send(sender, message)
    assert net.error(sender).code == "bad_message"
    assert net.quiet("alice", "dev1")


def test_the_device_learns_who_sent_each_message_of_a_session() -> None:
    """The device checks ownership itself (its table outlives a server restart)."""
    net = online()
    active(net, S1, "alice")
    net.send("alice", Candidate(S1, None))
    net.send("alice", SessionEnd(S1, "bye"))
    assert net.take("dev1") == [Candidate(S1, None, "alice"), SessionEnd(S1, "bye", "alice")]
    requested(net, S2, "bob")
    net.disconnect("bob")
    assert net.take("dev1") == [PeerLeft(S2, "bob")]


def test_a_dropped_client_s_session_id_is_not_handed_to_another() -> None:
    """Issue 9's hijack, server side: B's link drops, X asks for B's session id.

    The server forgot the session with B's link, so it forwards X's request
    stamped with X: the device (which still runs B's session) refuses it.
    """
    net = online()
    active(net, S1, "bob")
    net.disconnect("bob")
    assert net.take("dev1") == [PeerLeft(S1, "bob")]
    net.send("alice", SessionRequest(S1, "dev1"))
    assert net.take("dev1") == [SessionRequest(S1, "dev1", client="alice")]
    net.send("alice", SessionEnd(S1, "hijacked"))
    assert net.take("dev1") == [SessionEnd(S1, "hijacked", "alice")]


def test_a_duplicate_request_is_refused() -> None:
    net = online()
    requested(net, S1, "alice")
    for client in ("alice", "bob"):
        net.send(client, SessionRequest(S1, "dev1"))
        assert net.error(client).code == "session_exists"
    assert net.quiet("dev1")


# --- sessions the sender is not a party of ------------------------------------------


@pytest.mark.parametrize(
    ("sender", "message"),
    [
        ("bob", Candidate(S1, ICE)),
        ("bob", Answer(S1, "sdp")),
        ("bob", SessionEnd(S1, "hijack")),
        ("dev2", Offer(S1, "sdp")),
        ("dev2", Candidate(S1, None)),
    ],
)
def test_unknown_session_for_a_non_party(
    sender: str, message: Offer | Answer | Candidate | SessionEnd
) -> None:
    net = online()
    net.connect("dev2", "device")
    offered(net)
    net.send(sender, message)
    existing = net.error(sender)
    assert net.quiet("alice", "dev1")
    # Same answer for a session that does not exist at all: no probing.
    net.send(sender, dataclasses.replace(message, session="session-none"))
    missing = net.error(sender)
    assert (existing.code, existing.message.replace(S1, "X")) == (
        missing.code,
        missing.message.replace("session-none", "X"),
    )
    assert existing.code == "unknown_session"
    assert existing.session == S1


def test_session_exists() -> None:
    net = online()
    requested(net)
    net.send("bob", SessionRequest(S1, "dev1"))
    assert net.error("bob").code == "session_exists"
    net.send("alice", SessionRequest(S1, "dev1"))
    assert net.error("alice").code == "session_exists"
    assert net.quiet("dev1")


# --- the state machine ------------------------------------------------------------------


def test_transition_table_is_the_spec() -> None:
    expected: dict[tuple[RouteState, str, str], RouteState | None] = {
        (RouteState.PENDING, "offer", "device"): RouteState.OFFERED,
        (RouteState.OFFERED, "answer", "client"): RouteState.ACTIVE,
    }
    for state in RouteState:
        for role in ("device", "client"):
            expected[(state, "candidate", role)] = state
            expected[(state, "session_end", role)] = None
    assert dict(TRANSITIONS) == expected


def test_answer_before_offer_is_bad_state() -> None:
    net = online()
    requested(net)
    net.send("alice", Answer(S1, "too early"))
    error = net.error("alice")
    assert (error.code, error.session) == ("bad_state", S1)
    assert net.quiet("dev1")
    # The session is unharmed.
    net.send("dev1", Offer(S1, "sdp"))
    assert net.take("alice") == [Offer(S1, "sdp")]


@pytest.mark.parametrize(
    ("setup", "sender", "message"),
    [
        (offered, "dev1", Offer(S1, "second offer")),
        (active, "dev1", Offer(S1, "offer after answer")),
        (active, "alice", Answer(S1, "second answer")),
    ],
)
def test_out_of_order_is_bad_state(setup: object, sender: str, message: SignalingMessage) -> None:
    net = online()
    assert callable(setup)
    setup(net)
    net.send(sender, message)
    assert net.error(sender).code == "bad_state"
    assert net.quiet("alice", "dev1")


def test_auth_after_authentication_is_bad_state() -> None:
    net = online()
    net.send("alice", Auth("another.token.here"))
    assert net.error("alice").code == "bad_state"


# --- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "bad_message"),
        (b"\x00\x01binary", "bad_message"),
        ('{"v":1,"type":"offer","session":"session-0001","sdp":"x","extra":1}', "bad_message"),
        ('{"v":1,"type":"offer","session":"session-0001","sdp":"' + "x" * (MAX_SDP_LEN + 1) + '"}',
         "bad_message"),
        ('{"v":1,"type":"candidate","session":"session-0001","candidate":{"candidate":"c"}}',
         "bad_message"),
        ('{"v":2,"type":"offer","session":"session-0001","sdp":"x"}', "unsupported_version"),
        ('{"v":1,"type":"offer2","session":"session-0001","sdp":"x"}', "unknown_type"),
    ],
)  # fmt: skip
def test_malformed_messages_are_answered_and_never_forwarded(raw: str | bytes, code: str) -> None:
    net = online()
    offered(net)
    net.send("dev1", raw)
    assert net.error("dev1").code == code
    assert net.quiet("alice")
    # The connection stays usable.
    net.send("dev1", Candidate(S1, None))
    assert net.take("alice") == [Candidate(S1, None)]


# --- limits ---------------------------------------------------------------------------------


def test_rate_limit_burst_then_recovery() -> None:
    net = online()
    requested(net)
    net.now += 60  # a full bucket
    for _ in range(100):  # the burst
        net.send("alice", Candidate(S1, None))
    assert len(net.take("dev1")) == 100
    net.send("alice", Candidate(S1, None))
    assert net.error("alice").code == "rate_limited"
    assert net.quiet("dev1")

    net.now += 0.0625  # 20/s: 1.25 tokens, one more message
    net.send("alice", Candidate(S1, None))
    net.send("alice", Candidate(S1, None))
    assert net.take("dev1") == [Candidate(S1, None, "alice")]
    assert net.error("alice").code == "rate_limited"

    net.now += 60  # refills up to the burst, not beyond
    for _ in range(101):
        net.send("alice", Candidate(S1, None))
    assert len(net.take("dev1")) == 100
    assert net.error("alice").code == "rate_limited"


def test_a_device_connection_has_the_larger_budget_of_all_its_sessions() -> None:
    net = online()
    requested(net)
    net.now += 60
    for _ in range(1000):  # the device burst
        net.send("dev1", Candidate(S1, None))
    assert len(net.take("alice")) == 1000
    net.send("dev1", Candidate(S1, None))
    assert net.error("dev1").code == "rate_limited"
    net.now += 0.0125  # 200/s: 2.5 tokens, two more messages
    for _ in range(3):
        net.send("dev1", Candidate(S1, None))
    assert len(net.take("alice")) == 2


def test_rate_limit_counts_garbage_too() -> None:
    net = online()
    for _ in range(100):
        net.send("bob", "garbage")
    assert {e.code for e in net.take("bob") if isinstance(e, Error)} == {"bad_message"}
    net.send("bob", "garbage")
    assert net.error("bob").code == "rate_limited"


def test_clock_going_backwards_refills_nothing() -> None:
    net = online()
    net.now = 100.0
    for _ in range(100):
        net.send("bob", "x")
    net.take("bob")
    net.now = 50.0
    net.send("bob", "x")
    assert net.error("bob").code == "rate_limited"


def test_200_drops_in_a_row_close_4429() -> None:
    net = online()
    active(net)
    net.now += 60  # a full bucket
    for _ in range(100):
        net.send("alice", Candidate(S1, None))
    net.take("dev1")
    for _ in range(199):
        net.send("alice", Candidate(S1, None))
    assert len(net.take("alice")) == 199
    assert "alice" not in net.closed
    net.send("alice", Candidate(S1, None))
    assert net.closed == {"alice": (4429, "rate limit exceeded")}
    assert net.take("dev1") == [PeerLeft(S1, "alice")]
    assert net.quiet("alice")
    net.now += 100
    net.send("alice", Candidate(S1, None))  # closing: ignored
    assert net.quiet("alice", "dev1")


def test_an_accepted_message_resets_the_drop_count() -> None:
    net = online()
    for _ in range(100):
        net.send("bob", "x")
    for _ in range(199):
        net.send("bob", "x")
    net.now += 0.0625
    net.send("bob", "x")  # accepted (answered bad_message)
    for _ in range(199):
        net.send("bob", "x")
    assert "bob" not in net.closed


def test_negotiating_sessions_per_device() -> None:
    net = online(Limits(max_negotiating_per_client=16))
    for i in range(16):
        requested(net, f"session-{i:04}")
    net.send("bob", SessionRequest("session-0100", "dev1"))
    error = net.error("bob")
    assert (error.code, error.session) == ("too_many_sessions", "session-0100")
    assert net.quiet("dev1")
    # Offered still counts as negotiating; answered does not.
    net.send("dev1", Offer("session-0000", "sdp"))
    net.take("alice")
    net.send("bob", SessionRequest("session-0100", "dev1"))
    assert net.error("bob").code == "too_many_sessions"
    net.send("alice", Answer("session-0000", "sdp"))
    net.take("dev1")
    requested(net, "session-0100", "bob")


def test_negotiating_sessions_per_client_identity_on_any_number_of_connections() -> None:
    """Issue 9's slot hog: one client cannot fill a device's negotiation slots."""
    net = online()
    net.connect("hog-2", "client", ["dev1"], sub="hog")
    net.connect("hog-1", "client", ["dev1"], sub="hog")
    for i in range(4):
        conn = f"hog-{i % 2 + 1}"
        net.send(conn, SessionRequest(f"session-{i:04}", "dev1"))
        assert net.take("dev1") == [SessionRequest(f"session-{i:04}", "dev1", client="hog")]
    net.send("hog-2", SessionRequest("session-0100", "dev1"))
    error = net.error("hog-2")
    assert (error.code, error.session) == ("too_many_sessions", "session-0100")
    assert "of one client" in error.message
    requested(net, "session-0200", "alice")  # another client is not held up
    # Answered no longer counts; ended frees the slot.
    net.send("dev1", Offer("session-0000", "sdp"))
    net.send("hog-1", Answer("session-0000", "sdp"))
    net.send("dev1", SessionEnd("session-0001", "negotiation given up"))
    net.take("hog-1"), net.take("hog-2"), net.take("dev1")
    for sid in ("session-0101", "session-0102"):
        net.send("hog-1", SessionRequest(sid, "dev1"))
        assert net.take("dev1") == [SessionRequest(sid, "dev1", client="hog")]
    net.send("hog-1", SessionRequest("session-0103", "dev1"))
    assert net.error("hog-1").code == "too_many_sessions"


def test_sessions_per_client_connection() -> None:
    net = online(Limits(max_sessions_per_client=2))
    net.connect("dev2", "device")
    net.send("dev2", Register("dev2"))
    net.take("dev2")
    requested(net, S1)
    net.send("alice", SessionRequest(S2, "dev2"))
    net.take("dev2")
    net.send("alice", SessionRequest("session-0003", "dev2"))
    assert net.error("alice").code == "too_many_sessions"
    requested(net, "session-0003", "bob")  # another client is not affected


def test_sessions_per_device() -> None:
    net = online(Limits(max_sessions_per_device=2))
    active(net, S1, "alice")
    active(net, S2, "bob")
    net.send("alice", SessionRequest("session-0003", "dev1"))
    assert net.error("alice").code == "too_many_sessions"
    net.send("dev1", SessionEnd(S2, "done"))
    net.take("bob")
    requested(net, "session-0003")


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        Limits(rate=0)
    with pytest.raises(ValueError):
        Limits(burst=0)


# --- observability and misuse --------------------------------------------------------------


def test_stats() -> None:
    net = online()
    active(net)
    net.send("bob", "garbage")
    net.send("bob", Candidate(S1, None))
    stats = net.router.stats()
    assert stats["connections"] == 3
    assert stats["devices_online"] == 1
    assert stats["sessions"] == 1
    assert stats["messages_routed"] == 3  # request, offer, answer
    assert stats["errors.bad_message"] == 1
    assert stats["errors.unknown_session"] == 1
    assert stats["messages_received"] == 6  # register, request, offer, answer, 2 from bob


def test_usage_errors() -> None:
    router = Router()
    with pytest.raises(UsageError):
        router.receive("ghost", "{}", 0.0)
    router.connect("a", Identity("a", "client"), 0.0)
    with pytest.raises(UsageError):
        router.connect("a", Identity("a", "client"), 0.0)


def test_router_only_emits_send_and_close() -> None:
    net = online()
    active(net)
    net.connect("dev1-new", "device", sub="dev1")
    net.send("dev1-new", Register("dev1"))
    assert {type(a) for a in net.log} == {Send, Close}


# --- expiry and revocation (issue 9) --------------------------------------------------


def test_revoking_an_identity_closes_its_links_and_tells_every_device() -> None:
    net = online()
    net.connect("dev2", "device")
    net.send("dev2", Register("dev2"))
    net.take("dev2")
    active(net, S1, "alice")
    net.apply(net.router.revoke(sub="alice", reason="token revoked"))
    assert net.closed["alice"] == (4401, "token revoked")
    assert net.take("dev1") == [PeerLeft(S1, "alice"), Revoke("alice", "token revoked")]
    assert net.take("dev2") == [Revoke("alice", "token revoked")]
    assert "bob" not in net.closed
    # A revoked identity with no link at all is still told to the devices.
    net.apply(net.router.revoke(sub="carol", reason="token revoked"))
    assert net.take("dev1") == [Revoke("carol", "token revoked")]


def test_revoking_a_token_id_closes_only_the_links_that_used_it() -> None:
    net = Net()
    net.connect("dev1", "device")
    net.send("dev1", Register("dev1"))
    net.take("dev1")
    for conn, jti in (("alice-1", "t1"), ("alice-2", "t2")):
        identity = Identity("alice", "client", frozenset({"dev1"}), jti=jti)
        net.apply(net.router.connect(conn, identity, net.now))
        net.take(conn)
    net.apply(net.router.revoke(jti="t1", reason="token revoked"))
    assert net.closed == {"alice-1": (4401, "token revoked")}
    assert net.take("dev1") == [Revoke("alice", "token revoked")]


def test_an_expired_client_link_is_closed_and_its_devices_told() -> None:
    net = online()
    active(net, S1, "alice")
    net.apply(net.router.expire("alice", "token expired"))
    assert net.closed["alice"] == (4401, "token expired")
    assert net.take("dev1") == [PeerLeft(S1, "alice"), Revoke("alice", "token expired")]
    assert net.router.expire("alice", "token expired") == []  # once


# --- discovery (§1.3 list_devices) -----------------------------------------------


def test_a_client_lists_the_devices_its_token_grants_with_presence_and_services() -> None:
    net = Net()
    net.connect("dev1", "device")
    net.send("dev1", Register("dev1", ("web", "ssh")))
    net.connect("secret-dev", "device")
    net.send("secret-dev", Register("secret-dev", ("db",)))
    net.connect("alice", "client", ["dev2", "dev1"])
    net.send("alice", ListDevices())
    # Sorted by id; dev2 offline with no services; secret-dev never mentioned.
    assert net.take("alice") == [
        Devices((DeviceInfo("dev1", True, ("web", "ssh")), DeviceInfo("dev2", False)))
    ]


def test_presence_follows_the_registered_link() -> None:
    net = Net()
    net.connect("alice", "client", ["dev1"])
    net.connect("dev1", "device")
    net.send("alice", ListDevices())
    assert net.take("alice") == [Devices((DeviceInfo("dev1", False),))]  # connected, unregistered
    net.send("dev1", Register("dev1", ("web",)))
    net.connect("dev1-new", "device", sub="dev1")
    net.send("dev1-new", Register("dev1", ("web", "api")))  # the newer link wins, and its services
    net.send("alice", ListDevices())
    assert net.take("alice") == [Devices((DeviceInfo("dev1", True, ("web", "api")),))]
    net.disconnect("dev1-new")
    net.send("alice", ListDevices())
    assert net.take("alice") == [Devices((DeviceInfo("dev1", False),))]


def test_a_long_answer_comes_in_pages_of_16() -> None:
    net = Net()
    granted = [f"d{i:02d}" for i in range(35)]
    net.connect("alice", "client", granted)
    net.send("alice", ListDevices())
    pages = net.take("alice")
    assert [len(p.devices) for p in pages if isinstance(p, Devices)] == [16, 16, 3]
    assert [p.more for p in pages if isinstance(p, Devices)] == [True, True, False]
    listed = [d.device for p in pages if isinstance(p, Devices) for d in p.devices]
    assert listed == granted


def test_a_token_granting_nothing_gets_one_empty_page() -> None:
    net = Net()
    net.connect("alice", "client", [])
    net.send("alice", ListDevices())
    assert net.take("alice") == [Devices(())]


def test_only_clients_list_devices_and_only_the_server_sends_devices() -> None:
    net = online()
    net.send("dev1", ListDevices())
    assert net.error("dev1").code == "forbidden"
    net.send("alice", Devices(()))
    assert net.error("alice").code == "forbidden"
    assert net.router.stats()["device_lists"] == 0
