"""TURN REST credentials, ICE server URLs and their delivery (protocol/ice.py, signaling/turn.py).

The credential vectors were computed with coturn's documented formula,
``echo -n USER | openssl dgst -binary -sha1 -hmac SECRET | openssl base64``;
one test runs that very pipeline when openssl is installed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess

import pytest
from websockets.asyncio.client import connect

from protocol.ice import IceConfig, IceServer, parse_ice_url, turn_rest_credential
from protocol.signaling import (
    Error,
    IceServers,
    Welcome,
    decode_signaling,
    encode_signaling,
)
from signaling.auth import issue_token
from signaling.errors import ServerConfigError
from signaling.link import RedactSecrets
from signaling.server import SignalingServer
from signaling.turn import IceIssuer, load_turn_secret

SECRET = "k" * 64
TURN_SECRET = "north-wind-blows-hard"
TIMEOUT = 5.0

# (secret, expiry, id) -> (username, password), computed with openssl as above.
CREDENTIAL_VECTORS = [
    (
        ("north-wind-blows-hard", 1767229200, "dev1"),
        ("1767229200:dev1", "jBoj99fqlCVTD9RPT7tQFgVFQaM="),
    ),
    (
        ("0123456789abcdef0123456789abcdef", 1735689600, "alice"),
        ("1735689600:alice", "oZg28TRZ3UxRocJbyZJOHiEbsUM="),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected"), CREDENTIAL_VECTORS)
def test_turn_rest_credential_vectors(
    args: tuple[str, int, str], expected: tuple[str, str]
) -> None:
    assert turn_rest_credential(*args) == expected


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_turn_rest_credential_is_coturns_documented_openssl_formula() -> None:
    username, password = turn_rest_credential("s3cr3t-shared-with-coturn", 2000000000, "dev-9")
    digest = subprocess.run(
        ["openssl", "dgst", "-binary", "-sha1", "-hmac", "s3cr3t-shared-with-coturn"],
        input=username.encode(),
        capture_output=True,
        check=True,
    ).stdout
    b64 = subprocess.run(
        ["openssl", "base64"], input=digest, capture_output=True, check=True
    ).stdout
    assert password == b64.decode().strip()


def test_turn_user_id_may_not_contain_the_separator() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        turn_rest_credential(TURN_SECRET, 1, "a:b")


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("stun:127.0.0.1", ("stun", "127.0.0.1", 3478, None, None)),
        ("stun:stun.example.org:19302", ("stun", "stun.example.org", 19302, None, None)),
        ("turn:[::1]:3479", ("turn", "::1", 3479, "udp", "udp")),
        ("turn:h?transport=tcp", ("turn", "h", 3478, "tcp", "tcp")),
        ("turns:h", ("turns", "h", 5349, "tcp", "tls")),
        ("turns:h:443?transport=tcp", ("turns", "h", 443, "tcp", "tls")),
    ],
)
def test_ice_urls_parse(url: str, parsed: tuple[object, ...]) -> None:
    p = parse_ice_url(url)
    assert (p.scheme, p.host, p.port, p.transport, p.relay_transport) == parsed


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("stuns:h", "stuns: (STUN over TLS) is not supported"),
        ("stun:h?transport=udp", "takes no ?transport"),
        ("turns:h?transport=udp", "TURN over DTLS is not supported"),
        ("turn:h?transport=sctp", "bad ICE server URL"),
        ("turn:h:0", "port 0 out of range"),
        ("turn:[1::2::3]", "bad IPv6 address"),
        ("turn:user:pw@h", "give the username and credential separately"),
        ("http://h", "bad ICE server URL"),
    ],
)
def test_ice_urls_we_cannot_honour_are_refused(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=r".*") as info:
        parse_ice_url(url)
    assert fragment in str(info.value)
    assert "pw" not in str(info.value)


def test_credentials_never_show_in_reprs_or_errors() -> None:
    server = IceServer("turn:h", "1:dev", "hunter2-password")
    assert "hunter2" not in repr(server)
    assert "hunter2" not in repr(IceServers((server,), 60))
    assert "hunter2" not in repr(IceConfig((server,)))
    with pytest.raises(ValueError) as info:
        IceServer("turn:h", "1:dev", "hunter2\x00")
    assert "hunter2" not in str(info.value)
    issuer = IceIssuer(["turn:h"], TURN_SECRET, 600)
    assert TURN_SECRET not in repr(issuer)


def test_issuer_mints_credentials_per_peer_and_time() -> None:
    issuer = IceIssuer(["stun:127.0.0.1:3478", "turn:127.0.0.1:3478"], TURN_SECRET, 3600)
    message = issuer.issue("dev1", 1767225600.7)
    assert message == IceServers(
        (
            IceServer("stun:127.0.0.1:3478"),
            IceServer("turn:127.0.0.1:3478", "1767229200:dev1", "jBoj99fqlCVTD9RPT7tQFgVFQaM="),
        ),
        3600,
    )
    assert issuer.refresh_interval == 1800
    stun_only = IceIssuer(["stun:127.0.0.1"])
    assert stun_only.issue("x", 0).ttl is None and stun_only.refresh_interval is None


@pytest.mark.parametrize(
    ("urls", "secret", "ttl", "fragment"),
    [
        (["turn:h"], None, 3600, "needs --turn-secret-file"),
        (["stun:h"], TURN_SECRET, 3600, "needs a turn: or turns:"),
        (["turn:h"], TURN_SECRET, 59, "--turn-ttl must be"),
        (["stuns:h"], None, 3600, "stuns:"),
        (["stun:h"] * 17, None, 3600, "at most 16"),
    ],
)
def test_issuer_refuses_what_cannot_work(
    urls: list[str], secret: str | None, ttl: int, fragment: str
) -> None:
    with pytest.raises(ServerConfigError, match=r".*") as info:
        IceIssuer(urls, secret, ttl)
    assert fragment in str(info.value)


def test_turn_secret_file(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    good = tmp_path / "good"
    good.write_text(TURN_SECRET + "\n")
    assert load_turn_secret(str(good)) == TURN_SECRET
    short = tmp_path / "short"
    short.write_text("tiny")
    with pytest.raises(ServerConfigError) as info:
        load_turn_secret(str(short))
    assert "tiny" not in str(info.value) and "fewer than 16" in str(info.value)
    with pytest.raises(ServerConfigError, match="cannot read"):
        load_turn_secret(str(tmp_path / "missing"))


def test_redaction_of_websockets_frame_dumps() -> None:
    record = logging.LogRecord(
        "websockets.client",
        logging.DEBUG,
        __file__,
        1,
        "> TEXT %s [%d bytes]",
        ('\'{"v":1,"type":"auth","token":"eyJhbGciOi...\'', 300),
        None,
    )
    RedactSecrets().filter(record)
    assert "eyJ" not in record.getMessage() and "<redacted>" in record.getMessage()
    record = logging.LogRecord(
        "websockets.client",
        logging.DEBUG,
        __file__,
        1,
        '< TEXT \'{"urls":"turn:h","username":"1:d","credential":"c2VjcmV0"}]\'',
        None,
        None,
    )
    RedactSecrets().filter(record)
    assert "c2VjcmV0" not in record.getMessage()


async def test_server_sends_ice_servers_before_welcome_and_refuses_them_from_peers() -> None:
    issuer = IceIssuer(["stun:127.0.0.1:3478", "turn:127.0.0.1:3478"], TURN_SECRET, 3600)
    async with SignalingServer(SECRET, port=0, ice=issuer) as server:
        jwt = issue_token(SECRET, sub="alice", role="client", devices=["dev1"])
        async with connect(f"{server.url}?token={jwt}", open_timeout=TIMEOUT) as ws:
            first = decode_signaling(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert isinstance(first, IceServers) and first.ttl == 3600
            stun, turn = first.ice_servers
            assert stun == IceServer("stun:127.0.0.1:3478")
            assert turn.username is not None and turn.username.endswith(":alice")
            expiry = int(turn.username.split(":")[0])
            assert turn_rest_credential(TURN_SECRET, expiry, "alice")[1] == turn.credential
            second = decode_signaling(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert second == Welcome("alice", "client")
            await ws.send(encode_signaling(first))  # a peer may not hand out servers
            reply = decode_signaling(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert isinstance(reply, Error) and reply.code == "forbidden"


class _QuickIssuer(IceIssuer):
    """Refreshes every 50 ms instead of every half hour, to watch the refresh happen."""

    @property
    def refresh_interval(self) -> float | None:
        return 0.05


async def test_server_sends_fresh_credentials_while_the_connection_lasts() -> None:
    issuer = _QuickIssuer(["turn:127.0.0.1:3478"], TURN_SECRET, 3600)
    async with SignalingServer(SECRET, port=0, ice=issuer) as server:
        jwt = issue_token(SECRET, sub="dev1", role="device")
        async with connect(f"{server.url}?token={jwt}", open_timeout=TIMEOUT) as ws:
            received = [decode_signaling(await asyncio.wait_for(ws.recv(), TIMEOUT))]
            while len(received) < 4:
                received.append(decode_signaling(await asyncio.wait_for(ws.recv(), TIMEOUT)))
            assert isinstance(received[0], IceServers)
            assert received[1] == Welcome("dev1", "device")
            assert all(isinstance(m, IceServers) and m.ttl == 3600 for m in received[2:])
