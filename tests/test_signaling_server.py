"""signaling/server.py: a real server on 127.0.0.1 with real websockets clients."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from protocol.signaling import (
    Answer,
    Auth,
    Candidate,
    DeviceInfo,
    Devices,
    Error,
    IceCandidate,
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
)
from signaling.auth import issue_token
from signaling.errors import LinkDown, LinkRejected, ServerConfigError
from signaling.link import LinkState, SignalingLink, token_file_source
from signaling.router import Limits
from signaling.server import ConnectionCaps, SignalingServer, run_server

SECRET = "k" * 64
TIMEOUT = 5.0  # generous upper bound for any single wait; tests finish far sooner
S1 = "session-0001"
S2 = "session-0002"
ICE = IceCandidate("candidate:1 1 UDP 2130706431 127.0.0.1 50000 typ host", "0", 0)


@pytest.fixture
async def server() -> AsyncIterator[SignalingServer]:
    async with SignalingServer(SECRET, port=0, auth_timeout=0.2) as srv:
        yield srv


def token(sub: str, role: str, devices: Iterable[str] = (), secret: str = SECRET) -> str:
    return issue_token(secret, sub=sub, role=role, devices=devices)


async def recv(ws: ClientConnection) -> SignalingMessage:
    return decode_signaling(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def send(ws: ClientConnection, message: SignalingMessage) -> None:
    await ws.send(encode_signaling(message))


async def closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
    return ws.close_code, ws.close_reason


async def open_ws(url: str, **kwargs: object) -> ClientConnection:
    return await asyncio.wait_for(connect(url, open_timeout=TIMEOUT, **kwargs), TIMEOUT)  # type: ignore[arg-type]


async def join(
    server: SignalingServer, sub: str, role: str, devices: Iterable[str] = ()
) -> ClientConnection:
    ws = await open_ws(f"{server.url}?token={token(sub, role, devices)}")
    assert await recv(ws) == Welcome(sub, role)  # type: ignore[arg-type]
    return ws


async def device(server: SignalingServer, sub: str = "dev1") -> ClientConnection:
    ws = await join(server, sub, "device")
    await send(ws, Register(sub))
    assert await recv(ws) == Registered(sub)
    return ws


def server_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    # The websockets *client* in this process logs its request line at DEBUG
    # under "websockets.client"; only the server's logging is under test.
    return [r for r in caplog.records if r.name.startswith("tunnelctl.signal")]


# --- authentication ------------------------------------------------------------------


async def test_url_and_real_port(server: SignalingServer) -> None:
    assert server.port != 0
    assert server.url == f"ws://127.0.0.1:{server.port}/signal"


async def test_auth_by_query(server: SignalingServer) -> None:
    ws = await join(server, "alice", "client", ["dev1"])
    await ws.close()


async def test_auth_by_first_message(server: SignalingServer) -> None:
    async with await open_ws(server.url) as ws:
        await send(ws, Auth(token("dev1", "device")))
        assert await recv(ws) == Welcome("dev1", "device")
        await send(ws, Register("dev1"))
        assert await recv(ws) == Registered("dev1")


@pytest.mark.parametrize(
    ("bad_token", "reason"),
    [
        (token("alice", "client", secret="w" * 64), "invalid token: signature verification failed"),
        (issue_token(SECRET, sub="alice", role="client", now=0), "invalid token: expired"),
        ("garbage", "invalid token: malformed"),
        ("", "invalid token: malformed"),
    ],
)
async def test_bad_token_in_url_closes_4401(
    server: SignalingServer, bad_token: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ws = await open_ws(f"{server.url}?token={bad_token}")
    assert await closed(ws) == (4401, reason)
    failures = [r for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.WARNING
    assert failures[0].exc_info is None
    if bad_token:
        assert all(bad_token not in r.getMessage() for r in server_records(caplog))
    assert server.stats()["auth_failures"] == 1


async def test_bad_token_in_auth_message_closes_4401(server: SignalingServer) -> None:
    async with await open_ws(server.url) as ws:
        await send(ws, Auth(token("dev1", "device", secret="w" * 64)))
        assert await closed(ws) == (4401, "invalid token: signature verification failed")


async def test_auth_timeout_closes_4401(server: SignalingServer) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    ws = await open_ws(server.url)
    assert await closed(ws) == (4401, "authentication timed out")
    assert loop.time() - started < 2.0


async def test_first_message_must_be_auth(server: SignalingServer) -> None:
    ws = await open_ws(server.url)
    await send(ws, Register("dev1"))
    error = await recv(ws)
    assert isinstance(error, Error)
    assert error.code == "not_authenticated"
    assert await closed(ws) == (4401, "not authenticated: first message must be auth")


async def test_garbage_first_message_closes_4401(server: SignalingServer) -> None:
    ws = await open_ws(server.url)
    await ws.send("{{{")
    error = await recv(ws)
    assert isinstance(error, Error)
    assert error.code == "bad_message"
    assert await closed(ws) == (4401, "not authenticated: bad_message")


async def test_token_in_query_is_never_logged(
    server: SignalingServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("tunnelctl.signal.websockets").setLevel(logging.DEBUG)
    try:
        secret_token = token("alice", "client", ["dev1"])
        ws = await join(server, "alice", "client", ["dev1"])
        await ws.close()
    finally:
        logging.getLogger("tunnelctl.signal.websockets").setLevel(logging.WARNING)
    # websockets logged the request line, redacted.
    records = server_records(caplog)
    assert any("token=<redacted>" in r.getMessage() for r in records)
    assert all(secret_token.split(".")[2] not in r.getMessage() for r in records)


# --- HTTP level -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/signal/", "/other", "/signalx"])
async def test_wrong_path_is_404(server: SignalingServer, path: str) -> None:
    url = f"ws://127.0.0.1:{server.port}{path}?token={token('alice', 'client')}"
    with pytest.raises(InvalidStatus) as info:
        await open_ws(url)
    assert info.value.response.status_code == 404


# --- robustness ------------------------------------------------------------------------


async def test_huge_frame_closes_1009_and_others_are_unaffected(server: SignalingServer) -> None:
    dev = await device(server)
    alice = await join(server, "alice", "client", ["dev1"])
    bob = await join(server, "bob", "client", ["dev1"])
    await bob.send("x" * 70_000)
    code, _ = await closed(bob)
    assert code == 1009
    # The others still relay.
    await send(alice, SessionRequest(S1, "dev1"))
    assert await recv(dev) == SessionRequest(S1, "dev1", client="alice")
    await dev.close()
    await alice.close()


async def test_garbage_gets_errors_and_the_connection_stays_usable(
    server: SignalingServer,
) -> None:
    dev = await device(server)
    for garbage in ["", "nope", "[1,2]", '{"v":1,"type":"hello"}', '{"v":7}', "\x00" * 10]:
        await dev.send(garbage)
        error = await recv(dev)
        assert isinstance(error, Error), garbage
        assert error.code in {"bad_message", "unknown_type", "unsupported_version"}
    await dev.send(b"\x00binary")
    error = await recv(dev)
    assert isinstance(error, Error)
    assert error.code == "bad_message"
    await send(dev, Register("dev1"))
    assert await recv(dev) == Registered("dev1")
    await dev.close()


async def test_full_relay(server: SignalingServer) -> None:
    dev = await device(server)
    alice = await join(server, "alice", "client", ["dev1"])

    await send(alice, SessionRequest(S1, "dev1"))
    assert await recv(dev) == SessionRequest(S1, "dev1", client="alice")
    await send(dev, Offer(S1, "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"))
    assert await recv(alice) == Offer(S1, "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n")
    await send(dev, Candidate(S1, ICE))
    await send(dev, Candidate(S1, None))
    assert await recv(alice) == Candidate(S1, ICE)
    assert await recv(alice) == Candidate(S1, None)
    await send(alice, Answer(S1, "v=0 answer"))
    assert await recv(dev) == Answer(S1, "v=0 answer", "alice")
    await send(alice, Candidate(S1, ICE))
    assert await recv(dev) == Candidate(S1, ICE, "alice")
    await send(alice, SessionEnd(S1, "bye"))
    assert await recv(dev) == SessionEnd(S1, "bye", "alice")
    stats = server.stats()
    assert stats["messages_routed"] == 7
    assert stats["sessions"] == 0

    # A disconnect mid-session reaches the other side as peer_left.
    await send(alice, SessionRequest(S2, "dev1"))
    assert await recv(dev) == SessionRequest(S2, "dev1", client="alice")
    await alice.close()
    assert await recv(dev) == PeerLeft(S2, "alice")
    await dev.close()


async def test_device_offline_error(server: SignalingServer) -> None:
    async with await join(server, "alice", "client", ["dev1"]) as alice:
        await send(alice, SessionRequest(S1, "dev1"))
        assert await recv(alice) == Error("device_offline", "device dev1 is offline", S1)


async def test_newer_registration_replaces_the_older(server: SignalingServer) -> None:
    old = await device(server)
    alice = await join(server, "alice", "client", ["dev1"])
    await send(alice, SessionRequest(S1, "dev1"))
    await recv(old)
    new = await device(server)
    replaced = await recv(old)
    assert isinstance(replaced, Error)
    assert replaced.code == "replaced"
    assert await closed(old) == (4409, "replaced by a newer connection")
    assert await recv(alice) == PeerLeft(S1)
    await send(alice, SessionRequest(S2, "dev1"))
    assert await recv(new) == SessionRequest(S2, "dev1", client="alice")
    await new.close()
    await alice.close()


async def test_a_client_that_does_not_read_stalls_only_itself() -> None:
    limits = Limits(burst=1000, rate=1000.0)
    async with SignalingServer(SECRET, port=0, limits=limits, max_outbox=200_000) as server:
        dev = await device(server)
        # A tiny receive buffer and no reading: the server's writes back up.
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow = await open_ws(
            f"{server.url}?token={token('slow', 'client', ['dev1'])}", sock=sock, max_queue=1
        )
        alice = await join(server, "alice", "client", ["dev1"])
        assert await recv(slow) == Welcome("slow", "client")
        await send(slow, SessionRequest(S1, "dev1"))
        await recv(dev)
        await send(alice, SessionRequest(S2, "dev1"))
        await recv(dev)

        big = Candidate(S1, IceCandidate("c" * 60_000, None, None))
        for _ in range(300):
            await send(dev, big)
        # The device's link is not stuck behind the slow reader.
        await send(dev, Offer(S2, "sdp"))
        assert await recv(alice) == Offer(S2, "sdp")
        # Once it reads, the slow client finds itself closed for not reading.
        with pytest.raises(ConnectionClosed):
            while True:
                await recv(slow)
        assert slow.close_code == 1008
        assert await recv(dev) == PeerLeft(S1, "slow")
        await dev.close()
        await alice.close()


# --- lifecycle -------------------------------------------------------------------------


async def test_close_sends_1001_to_everyone() -> None:
    server = SignalingServer(SECRET, port=0)
    await server.start()
    dev = await device(server)
    unauthenticated = await open_ws(server.url)
    await asyncio.wait_for(server.close(), TIMEOUT)
    assert (await closed(dev))[0] == 1001
    assert (await closed(unauthenticated))[0] == 1001


async def test_weak_secret_and_busy_port_are_config_errors(server: SignalingServer) -> None:
    with pytest.raises(ServerConfigError, match="at least 32 bytes"):
        SignalingServer("short", port=0)
    with pytest.raises(ServerConfigError, match=r"cannot listen on 127\.0\.0\.1"):
        await SignalingServer(SECRET, port=server.port).start()


async def _run_until_ready(drain_timeout: float = 10.0) -> tuple[asyncio.Task[None], str]:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_server(SECRET, "127.0.0.1", 0, on_ready=ready.set_result, drain_timeout=drain_timeout)
    )
    return task, await asyncio.wait_for(ready, TIMEOUT)


async def test_run_server_until_cancelled() -> None:
    task, url = await _run_until_ready()
    ws = await open_ws(f"{url}?token={token('alice', 'client')}")
    assert await recv(ws) == Welcome("alice", "client")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert (await closed(ws))[0] == 1001


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
async def test_run_server_until_sigterm() -> None:
    task, url = await _run_until_ready()
    # Guard: had the handler not been installed, SIGTERM would kill pytest.
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ws = await open_ws(f"{url}?token={token('alice', 'client')}")
    assert await recv(ws) == Welcome("alice", "client")
    os.kill(os.getpid(), signal.SIGTERM)
    # Drain (PROTOCOL.md §1.8): told to move; the server exits once it has.
    assert await recv(ws) == Moving("node draining")
    with pytest.raises(OSError):
        await open_ws(f"{url}?token={token('bob', 'client')}")  # no longer accepting
    assert not task.done()
    await ws.close()
    await asyncio.wait_for(task, TIMEOUT)  # returns normally
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_a_drain_closes_who_did_not_move_after_its_timeout() -> None:
    task, url = await _run_until_ready(drain_timeout=0.2)
    ws = await open_ws(f"{url}?token={token('alice', 'client')}")
    assert await recv(ws) == Welcome("alice", "client")
    os.kill(os.getpid(), signal.SIGTERM)
    assert await recv(ws) == Moving("node draining")
    await asyncio.wait_for(task, TIMEOUT)
    assert (await closed(ws))[0] == 1001


async def test_a_fail_fast_link_tries_every_url_once_before_giving_up() -> None:
    dead = [socket.socket(), socket.socket()]
    for sock in dead:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    urls = [f"ws://127.0.0.1:{sock.getsockname()[1]}/signal" for sock in dead]
    try:
        link = SignalingLink(urls, token("alice", "client"), lambda m: None, fail_fast=True)
        link.start()
        with pytest.raises(LinkDown, match="cannot reach"):
            await link.wait_up(TIMEOUT)
        await link.close()
        async with SignalingServer(SECRET, port=0) as srv:
            link = SignalingLink(
                [urls[0], srv.url], token("alice", "client"), lambda m: None, fail_fast=True
            )
            link.start()
            try:
                await link.wait_up(TIMEOUT)
                assert link.url == srv.url
            finally:
                await link.close()
    finally:
        for sock in dead:
            sock.close()
    with pytest.raises(ValueError, match="at least one"):
        SignalingLink([], "t", lambda m: None)


async def test_a_link_moves_to_its_next_url_when_told() -> None:
    """Several URLs: the first that answers; ``moving`` goes to the next at once."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    dead_url = f"ws://127.0.0.1:{dead.getsockname()[1]}/signal"
    try:
        async with (
            SignalingServer(SECRET, port=0) as first,
            SignalingServer(SECRET, port=0) as second,
        ):
            states: asyncio.Queue[LinkState] = asyncio.Queue()
            link = SignalingLink(
                [dead_url, first.url, second.url],
                token("dev1", "device"),
                lambda message: None,
                device="dev1",
                on_state=states.put_nowait,
            )
            link.start()
            try:
                await link.wait_up(TIMEOUT)
                assert link.url == first.url and first.stats()["devices_online"] == 1
                while not states.empty():
                    states.get_nowait()
                await first.drain(TIMEOUT)  # returns once the link has left
                async with asyncio.timeout(TIMEOUT):
                    while await states.get() is not LinkState.UP:
                        pass
                assert link.url == second.url and second.stats()["devices_online"] == 1
            finally:
                await link.close()
    finally:
        dead.close()


def test_the_client_ends_errors_have_a_root_of_their_own() -> None:
    from signaling.errors import LinkDown, LinkError, LinkRejected, SignalingServerError

    assert issubclass(LinkDown, LinkError) and issubclass(LinkRejected, LinkError)
    assert not issubclass(LinkError, SignalingServerError)
    assert not issubclass(ServerConfigError, LinkError)


# --- connection caps (issue 9) -------------------------------------------------------


async def test_connections_per_identity_are_capped() -> None:
    caps = ConnectionCaps(per_identity=2)
    async with SignalingServer(SECRET, port=0, caps=caps) as srv:
        first = await join(srv, "alice", "client", ["dev1"])
        second = await join(srv, "alice", "client", ["dev1"])
        third = await open_ws(f"{srv.url}?token={token('alice', 'client', ['dev1'])}")
        assert await closed(third) == (4503, "too many connections for this identity")
        other = await join(srv, "bob", "client", ["dev1"])  # another identity is not held up
        assert srv.stats()["refused.per_identity"] == 1
        for ws in (first, second, other):
            await ws.close()


async def test_a_flood_of_idle_sockets_does_not_keep_a_login_out() -> None:
    """Unauthenticated slots are full: the oldest idle socket makes room for a newcomer."""
    caps = ConnectionCaps(unauthenticated=4)
    async with SignalingServer(SECRET, port=0, caps=caps) as srv:
        # Connected and upgraded before the flood, not authenticated yet.
        slow = await open_ws(srv.url)
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(12)]
        try:
            # Accepted after every idle socket (one accept queue, in order).
            ws = await join(srv, "alice", "client", ["dev1"])
            stats = srv.stats()
            assert stats["unauthenticated"] <= 4
            assert stats["refused.evicted_unauthenticated"] >= 12 + 2 - 4
            # Silent sockets went first: the one that spoke HTTP is still there.
            await send(slow, Auth(token("bob", "client", ["dev1"])))
            assert await recv(slow) == Welcome("bob", "client")
            await ws.close()
            await slow.close()
        finally:
            for sock in idle:
                sock.close()


async def test_total_connections_are_capped() -> None:
    caps = ConnectionCaps(total=3, unauthenticated=3)
    async with SignalingServer(SECRET, port=0, caps=caps) as srv:
        held = [await join(srv, f"user{n}", "client", ["dev1"]) for n in range(3)]
        with pytest.raises(InvalidHandshake):  # the TCP connection is dropped at once
            late = await open_ws(f"{srv.url}?token={token('late', 'client', ['dev1'])}")
            await recv(late)
        assert srv.stats()["refused.total"] == 1
        for ws in held:
            await ws.close()


async def test_refusals_are_logged_a_few_times_then_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tunnelctl.signal")
    async with SignalingServer(SECRET, port=0) as srv:
        for _ in range(20):
            ws = await open_ws(f"{srv.url}?token=forged")
            assert (await closed(ws))[0] == 4401
    failures = [r for r in server_records(caplog) if "authentication failed" in r.getMessage()]
    assert len(failures) == 5  # LogThrottle's burst; the other 15 are counted
    assert srv.stats()["auth_failures"] == 20


# --- expiry and revocation (issue 9) --------------------------------------------------


async def test_a_link_is_closed_when_its_token_expires() -> None:
    async with SignalingServer(SECRET, port=0) as srv:
        dev = await device(srv)
        # Expired about 29 s ago: let in by the 30 s leeway, and out about 1 s later.
        past = issue_token(
            SECRET, sub="alice", role="client", devices=["dev1"], ttl=60, now=time.time() - 88.5
        )
        ws = await open_ws(f"{srv.url}?token={past}")
        assert await recv(ws) == Welcome("alice", "client")
        assert await closed(ws) == (4401, "token expired")
        assert await recv(dev) == Revoke("alice", "token expired")
        await dev.close()


async def test_revocation_file_reloaded_closes_links_and_refuses_tokens(tmp_path: Path) -> None:
    revoked = tmp_path / "revoked"
    revoked.write_text("# nobody yet\n")
    async with SignalingServer(SECRET, port=0, revoked=revoked) as srv:
        dev = await device(srv)
        alice = await join(srv, "alice", "client", ["dev1"])
        bob = await join(srv, "bob", "client", ["dev1"])
        revoked.write_text("sub alice  # lost her laptop\n")
        srv.reload_revocations()
        assert await closed(alice) == (4401, "token revoked")
        assert await recv(dev) == Revoke("alice", "token revoked")
        again = await open_ws(f"{srv.url}?token={token('alice', 'client', ['dev1'])}")
        assert await closed(again) == (4401, "invalid token: revoked")
        # By token id: only that token.
        bob_token = token("bob", "client", ["dev1"])
        jti = jwt.decode(bob_token, options={"verify_signature": False})["jti"]
        revoked.write_text(f"sub alice\njti {jti}\n")
        srv.reload_revocations()
        refused = await open_ws(f"{srv.url}?token={bob_token}")
        assert await closed(refused) == (4401, "invalid token: revoked")
        assert not bob.close_code  # bob's other token still works
        # A broken file keeps the previous list.
        revoked.write_text("everyone\n")
        srv.reload_revocations()
        refused = await open_ws(f"{srv.url}?token={bob_token}")
        assert (await closed(refused))[0] == 4401
        for ws in (bob, dev):
            await ws.close()


def test_a_bad_revocation_file_is_refused_at_start(tmp_path: Path) -> None:
    revoked = tmp_path / "revoked"
    revoked.write_text("sub\n")
    with pytest.raises(ServerConfigError, match="line 1: expected 'sub ID' or 'jti ID'"):
        SignalingServer(SECRET, port=0, revoked=revoked)


async def test_a_link_reconnects_with_a_refreshed_token_file(tmp_path: Path) -> None:
    """The device's token expires; the operator has put a fresh one in its file."""
    file = tmp_path / "dev1.jwt"
    soon = issue_token(SECRET, sub="dev1", role="device", ttl=60, now=time.time() - 88.5)
    file.write_text(soon + "\n")
    states: asyncio.Queue[LinkState] = asyncio.Queue()
    async with SignalingServer(SECRET, port=0) as srv:
        link = SignalingLink(
            srv.url,
            token_file_source(file, soon),
            lambda message: None,
            device="dev1",
            on_state=states.put_nowait,
        )
        link.start()
        try:
            await link.wait_up(TIMEOUT)
            file.write_text(token("dev1", "device"))
            seen = []
            async with asyncio.timeout(TIMEOUT):
                while LinkState.DOWN not in seen or seen[-1] is not LinkState.UP:
                    seen.append(await states.get())
            assert srv.stats()["devices_online"] == 1
        finally:
            await link.close()


async def test_a_link_whose_token_expired_and_was_not_refreshed_gives_up(tmp_path: Path) -> None:
    file = tmp_path / "dev1.jwt"
    soon = issue_token(SECRET, sub="dev1", role="device", ttl=60, now=time.time() - 88.5)
    file.write_text(soon)
    async with SignalingServer(SECRET, port=0) as srv:
        link = SignalingLink(srv.url, token_file_source(file, soon), lambda m: None, device="dev1")
        link.start()
        try:
            await link.wait_up(TIMEOUT)
            with pytest.raises(LinkRejected, match="token expired"):
                await asyncio.wait_for(link.run_until_closed(), TIMEOUT)
        finally:
            await link.close()


async def test_a_linked_device_announces_its_services_to_a_client_s_list_devices() -> None:
    async with SignalingServer(SECRET, port=0) as srv:
        link = SignalingLink(
            srv.url,
            token("dev1", "device"),
            lambda message: None,
            device="dev1",
            services=["web", "ssh"],
        )
        link.start()
        try:
            await link.wait_up(TIMEOUT)
            alice = await join(srv, "alice", "client", ["dev1", "dev2"])
            await send(alice, ListDevices())
            assert await recv(alice) == Devices(
                (DeviceInfo("dev1", True, ("web", "ssh")), DeviceInfo("dev2", False))
            )
            await alice.close()
        finally:
            await link.close()
