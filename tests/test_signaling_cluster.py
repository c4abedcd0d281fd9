"""Several signaling nodes in memory (PROTOCOL.md §1.8): the envelopes against
their test vectors, and routers joined by an in-memory bus that does what
signaling/cluster.py does with Redis (relays, presence, undeliverable relays)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import pytest

from protocol.signaling import (
    Answer,
    Candidate,
    DeviceInfo,
    Devices,
    Error,
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
from signaling.envelope import (
    EnvelopeError,
    GoneEnvelope,
    PresenceDown,
    PresenceUp,
    RelayEnvelope,
    decode_envelope,
    encode_envelope,
)
from signaling.errors import UsageError
from signaling.router import Action, Close, Limits, Presence, Relay, RemoteConn, Router, Send

S1 = "s-0123456789ab"
S2 = "s-0123456789ac"

# --- envelopes: PROTOCOL.md §1.8, verbatim --------------------------------------

VECTORS = [
    (
        '{"v":1,"t":"relay","from":{"node":"b","conn":17,"role":"client","sub":"alice"},'
        '"to":5,"msg":{"v":1,"type":"session_request","session":"s-0123456789ab",'
        '"device":"dev1","client":"alice"}}',
        RelayEnvelope("b", 17, "client", "alice", 5, SessionRequest(S1, "dev1", "alice")),
    ),
    (
        '{"v":1,"t":"gone","from":{"node":"a","conn":5},"to":17,'
        '"msg":{"v":1,"type":"offer","session":"s-0123456789ab","sdp":"v=0"}}',
        GoneEnvelope("a", 5, 17, Offer(S1, "v=0")),
    ),
    (
        '{"v":1,"t":"up","device":"dev1","node":"a","conn":5,"gen":42,"services":["web"]}',
        PresenceUp("dev1", "a", 5, 42, ("web",)),
    ),
    (
        '{"v":1,"t":"down","device":"dev1","node":"a","conn":5,"gen":42}',
        PresenceDown("dev1", "a", 5, 42),
    ),
]


@pytest.mark.parametrize(("wire", "envelope"), VECTORS)
def test_envelope_vectors(wire: str, envelope: object) -> None:
    assert encode_envelope(envelope) == wire  # type: ignore[arg-type]
    assert decode_envelope(wire) == envelope
    assert decode_envelope(wire.encode()) == envelope  # Redis hands bytes


def test_the_vectors_are_the_ones_in_protocol_md() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "protocol" / "PROTOCOL.md").read_text()
    for wire, _ in VECTORS:
        assert wire in text


@pytest.mark.parametrize(
    "wire",
    [
        "not json",
        "[]",
        '{"v":2,"t":"down","device":"dev1","node":"a","conn":5,"gen":42}',
        '{"v":1,"t":"sideways"}',
        '{"v":1,"t":"down","device":"dev1","node":"a","conn":5}',
        '{"v":1,"t":"down","device":"../x","node":"a","conn":5,"gen":1}',
        '{"v":1,"t":"down","device":"dev1","node":"a","conn":-1,"gen":1}',
        '{"v":1,"t":"down","device":"dev1","node":"a","conn":true,"gen":1}',
        '{"v":1,"t":"up","device":"dev1","node":"a","conn":5,"gen":1,"services":"web"}',
        '{"v":1,"t":"relay","from":{"node":"b","conn":1,"role":"admin","sub":"x"},"to":5,'
        '"msg":{"v":1,"type":"offer","session":"s-0123456789ab","sdp":"v=0"}}',
        '{"v":1,"t":"relay","from":{"node":"b","conn":1,"role":"client","sub":"x"},"to":5,'
        '"msg":{"v":1,"type":"offer","session":"bad id","sdp":"v=0"}}',
        '{"v":1,"t":"gone","from":{"node":"a","conn":5,"extra":1},"to":17,'
        '"msg":{"v":1,"type":"offer","session":"s-0123456789ab","sdp":"v=0"}}',
    ],
)
def test_malformed_envelopes_are_one_error(wire: str) -> None:
    with pytest.raises(EnvelopeError):
        decode_envelope(wire)


# --- routers joined by an in-memory bus -------------------------------------------


class Cluster:
    """Nodes by name, each a router with connections numbered from 1; what one
    node relays is handed to the other's router at once, through the wire
    encodings, as signaling/cluster.py does through Redis."""

    def __init__(self, *names: str, limits: Limits | None = None) -> None:
        self.routers = {name: Router(limits) for name in names}
        self.inbox: dict[tuple[str, int], list[SignalingMessage]] = defaultdict(list)
        self.closed: dict[tuple[str, int], int] = {}
        self.gen = 0
        self.gens: dict[tuple[str, str], int] = {}  # (node, device) -> gen there
        self.next_conn = 1

    def apply(self, node: str, actions: Iterable[Action]) -> None:
        for action in actions:
            match action:
                case Send():
                    wire = encode_signaling(action.message)
                    self.inbox[(node, action.conn)].append(decode_signaling(wire))  # type: ignore[index]
                case Close():
                    self.closed[(node, action.conn)] = action.code  # type: ignore[index]
                case Relay():
                    self.relay(node, action)
                case Presence():
                    self.presence(node, action)

    def relay(self, node: str, relay: Relay) -> None:
        assert isinstance(relay.origin, int)
        env = RelayEnvelope(node, relay.origin, relay.role, relay.sub, relay.to.conn, relay.message)
        env = decode_envelope(encode_envelope(env))  # type: ignore[assignment]
        target = self.routers.get(relay.to.node)
        # PUBLISH reached no one, or the node answered "gone".
        if target is None or not target.is_connected(env.to):
            self.apply(node, self.routers[node].remote_gone(relay.to, relay.message))
        else:
            sender = RemoteConn(node, env.conn)
            actions = target.receive_remote(env.to, sender, env.role, env.sub, env.message)
            self.apply(relay.to.node, actions)

    def presence(self, node: str, presence: Presence) -> None:
        assert isinstance(presence.conn, int)
        at = RemoteConn(node, presence.conn)
        for other, router in list(self.routers.items()):
            if other == node:
                continue
            if presence.online:
                self.apply(other, router.remote_registered(presence.device, at, presence.services))
            else:
                router.remote_unregistered(presence.device, at)

    def connect(self, node: str, sub: str, role: str, devices: Iterable[str] = ()) -> int:
        conn = self.next_conn
        self.next_conn += 1
        identity = Identity(sub, role, frozenset(devices))  # type: ignore[arg-type]
        self.apply(node, self.routers[node].connect(conn, identity, 0.0))
        assert self.take(node, conn) == [Welcome(sub, role)]  # type: ignore[arg-type]
        return conn

    def send(self, node: str, conn: int, message: SignalingMessage) -> None:
        self.apply(node, self.routers[node].receive(conn, encode_signaling(message), 0.0))

    def disconnect(self, node: str, conn: int) -> None:
        self.apply(node, self.routers[node].disconnect(conn))

    def kill(self, node: str) -> None:
        """The node is gone without a word (SIGKILL): the others learn it by its key."""
        del self.routers[node]
        for other in list(self.routers):
            self.apply(other, self.routers[other].node_gone(node))

    def take(self, node: str, conn: int) -> list[SignalingMessage]:
        return self.inbox.pop((node, conn), [])

    def device(self, node: str, sub: str = "dev1") -> int:
        conn = self.connect(node, sub, "device")
        self.send(node, conn, Register(sub))
        assert self.take(node, conn) == [Registered(sub)]
        return conn


def two_nodes(limits: Limits | None = None) -> tuple[Cluster, int, int]:
    """dev1 on node a, alice (may reach dev1) on node b."""
    cluster = Cluster("a", "b", limits=limits)
    dev = cluster.device("a")
    alice = cluster.connect("b", "alice", "client", ["dev1"])
    return cluster, dev, alice


def test_a_session_across_two_nodes_is_routed_as_on_one() -> None:
    c, dev, alice = two_nodes()
    c.send("b", alice, SessionRequest(S1, "dev1"))
    assert c.take("a", dev) == [SessionRequest(S1, "dev1", client="alice")]
    c.send("a", dev, Offer(S1, "v=0 offer"))
    assert c.take("b", alice) == [Offer(S1, "v=0 offer")]
    c.send("b", alice, Answer(S1, "v=0 answer"))
    assert c.take("a", dev) == [Answer(S1, "v=0 answer", client="alice")]
    c.send("b", alice, Candidate(S1, None))
    assert c.take("a", dev) == [Candidate(S1, None, client="alice")]
    c.send("a", dev, Candidate(S1, None))
    assert c.take("b", alice) == [Candidate(S1, None)]
    c.send("a", dev, SessionEnd(S1, "bye"))
    assert c.take("b", alice) == [SessionEnd(S1, "bye")]
    for router in c.routers.values():
        assert router.stats()["sessions"] == 0
    # Nothing left behind for the remote parties either.
    c.send("b", alice, Candidate(S1, None))
    assert c.take("b", alice) == [
        Error("unknown_session", f"no session {S1} on this connection", S1)
    ]


def test_bad_state_is_found_on_the_senders_node() -> None:
    c, dev, alice = two_nodes()
    c.send("b", alice, SessionRequest(S1, "dev1"))
    c.take("a", dev)
    c.send("b", alice, Answer(S1, "v=0"))  # before any offer
    (error,) = c.take("b", alice)
    assert isinstance(error, Error) and error.code == "bad_state"
    assert c.take("a", dev) == []


def test_a_device_that_leaves_gets_peer_left_to_the_remote_client() -> None:
    c, dev, alice = two_nodes()
    c.send("b", alice, SessionRequest(S1, "dev1"))
    c.take("a", dev)
    c.disconnect("a", dev)
    assert c.take("b", alice) == [PeerLeft(S1)]
    c.send("b", alice, SessionRequest(S2, "dev1"))
    assert c.take("b", alice) == [Error("device_offline", "device dev1 is offline", S2)]


def test_a_client_that_leaves_gets_peer_left_with_its_id_to_the_remote_device() -> None:
    c, dev, alice = two_nodes()
    c.send("b", alice, SessionRequest(S1, "dev1"))
    c.take("a", dev)
    c.disconnect("b", alice)
    assert c.take("a", dev) == [PeerLeft(S1, client="alice")]
    assert c.routers["a"].stats()["sessions"] == 0


def test_a_registration_on_another_node_replaces_the_older_link() -> None:
    c = Cluster("a", "b")
    old = c.device("a")
    new = c.device("b")
    assert c.take("a", old) == [Error("replaced", "device dev1 registered elsewhere", None)]
    assert c.closed[("a", old)] == 4409
    alice = c.connect("a", "alice", "client", ["dev1"])
    c.send("a", alice, SessionRequest(S1, "dev1"))  # routed to the new link on b
    assert c.take("b", new) == [SessionRequest(S1, "dev1", client="alice")]


def test_a_request_for_a_device_whose_node_died_gets_device_offline() -> None:
    c, dev, alice = two_nodes()
    c.send("b", alice, SessionRequest(S1, "dev1"))
    c.take("a", dev)
    del c.routers["a"]  # SIGKILL, not noticed yet: the next relay finds no one
    c.send("b", alice, SessionRequest(S2, "dev1"))
    assert c.take("b", alice) == [
        Error("device_offline", "device dev1 is offline", S2),
        PeerLeft(S1),
    ]


def test_a_dead_node_ends_its_sessions_with_peer_left() -> None:
    c, dev, alice = two_nodes()
    c.send("b", alice, SessionRequest(S1, "dev1"))
    c.take("a", dev)
    c.kill("a")
    assert c.take("b", alice) == [PeerLeft(S1)]
    assert c.routers["b"].remote_nodes() == set()
    c.send("b", alice, SessionRequest(S2, "dev1"))
    assert c.take("b", alice) == [Error("device_offline", "device dev1 is offline", S2)]


def test_a_relay_to_a_connection_that_is_gone_tells_the_sender() -> None:
    c, dev, alice = two_nodes()
    c.send("b", alice, SessionRequest(S1, "dev1"))
    c.take("a", dev)
    # The device's link vanished on a without the presence reaching b.
    c.routers["a"].disconnect(dev)
    c.send("b", alice, Candidate(S1, None))
    assert c.take("b", alice) == [PeerLeft(S1)]


def test_the_devices_node_applies_the_device_limits_to_remote_clients() -> None:
    c, dev, alice = two_nodes(Limits(max_negotiating_per_device=1))
    c.send("b", alice, SessionRequest(S1, "dev1"))
    c.take("a", dev)
    bob = c.connect("a", "bob", "client", ["dev1"])
    c.send("a", bob, SessionRequest(S2, "dev1"))
    (error,) = c.take("a", bob)
    assert isinstance(error, Error) and error.code == "too_many_sessions"
    c.send("a", dev, SessionEnd(S1, "done"))
    c.take("b", alice)
    carol = c.connect("b", "carol", "client", ["dev1"])
    c.send("a", bob, SessionRequest(S2, "dev1"))
    c.take("a", dev)
    c.send("b", carol, SessionRequest("s-0123456789ad", "dev1"))
    (error,) = c.take("b", carol)  # refused by a, relayed back; b's copy ends
    assert isinstance(error, Error) and error.code == "too_many_sessions"
    assert c.routers["b"].stats()["sessions"] == 0


def test_an_expired_clients_devices_on_other_nodes_are_told() -> None:
    c, dev, alice = two_nodes()
    c.apply("b", c.routers["b"].expire(alice, "token expired"))
    assert c.take("a", dev) == [Revoke("alice", "token expired")]
    assert c.closed[("b", alice)] == 4401


def test_list_devices_answers_with_presence_and_services_on_every_node() -> None:
    c = Cluster("a", "b")
    dev = c.connect("a", "dev1", "device")
    c.send("a", dev, Register("dev1", services=("ssh", "web")))
    alice = c.connect("b", "alice", "client", ["dev1", "dev2"])
    c.send("b", alice, ListDevices())
    assert c.take("b", alice) == [
        Devices((DeviceInfo("dev1", True, ("ssh", "web")), DeviceInfo("dev2", False, ())))
    ]
    c.disconnect("a", dev)
    c.send("b", alice, ListDevices())
    assert c.take("b", alice) == [
        Devices((DeviceInfo("dev1", False, ()), DeviceInfo("dev2", False, ())))
    ]


def test_receive_remote_needs_a_connected_recipient() -> None:
    router = Router()
    with pytest.raises(UsageError):
        router.receive_remote(99, RemoteConn("b", 1), "client", "alice", Candidate(S1, None))
