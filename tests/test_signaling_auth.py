"""signaling/auth.py: JWT rules of PROTOCOL.md §1.2 (RFC 7519, RFC 8725)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jwt
import pytest

from signaling.auth import Identity, issue_token, load_secret, verify_token
from signaling.errors import AuthError, ServerConfigError, SignalingServerError

SECRET = "s3cret-" * 10  # 70 bytes: long enough even for HS512
NOW = 1_700_000_000.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A JWT assembled by hand, so no library refuses to build it."""
    return ".".join(
        [
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(claims).encode()),
            b64url(signature),
        ]
    )


def signed(claims: dict[str, Any], *, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def reason_of(token: str, *, secret: str = SECRET, now: float = NOW) -> str:
    with pytest.raises(AuthError) as info:
        verify_token(secret, token, now=now)
    return info.value.reason


VALID_DEVICE = {"sub": "dev1", "role": "device", "iat": int(NOW), "exp": int(NOW) + 60}


# --- issue and verify -----------------------------------------------------------


def test_device_token_round_trip() -> None:
    token = issue_token(SECRET, sub="dev1", role="device", now=NOW)
    assert verify_token(SECRET, token, now=NOW) == Identity("dev1", "device", frozenset())


def test_client_token_carries_its_devices() -> None:
    token = issue_token(SECRET, sub="alice", role="client", devices=["dev2", "dev1"], now=NOW)
    identity = verify_token(SECRET, token, now=NOW)
    assert identity == Identity("alice", "client", frozenset({"dev1", "dev2"}))
    assert identity.may_reach("dev1")
    assert not identity.may_reach("dev3")
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {
        "sub": "alice",
        "role": "client",
        "devices": ["dev1", "dev2"],
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
        "jti": identity.jti,
    }
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_client_token_may_grant_nothing() -> None:
    token = issue_token(SECRET, sub="alice", role="client", now=NOW)
    assert verify_token(SECRET, token, now=NOW).devices == frozenset()


def test_device_identity_reaches_no_device() -> None:
    assert not Identity("dev1", "device").may_reach("dev1")


def test_expiry_with_30s_leeway() -> None:
    token = issue_token(SECRET, sub="dev1", role="device", ttl=60, now=NOW)
    verify_token(SECRET, token, now=NOW + 60 + 29)
    assert reason_of(token, now=NOW + 60 + 30) == "expired"
    assert reason_of(token, now=NOW + 10_000) == "expired"


def test_not_before_and_issued_at_in_the_future() -> None:
    nbf = signed({**VALID_DEVICE, "nbf": int(NOW) + 31, "exp": int(NOW) + 600})
    assert reason_of(nbf) == "not yet valid"
    verify_token(SECRET, nbf, now=NOW + 1)
    iat = signed({**VALID_DEVICE, "iat": int(NOW) + 31})
    assert reason_of(iat) == "issued in the future"
    verify_token(SECRET, signed({**VALID_DEVICE, "iat": int(NOW) + 29}), now=NOW)


def test_wrong_secret() -> None:
    token = issue_token("x" * 40, sub="dev1", role="device", now=NOW)
    assert reason_of(token) == "signature verification failed"


def test_tampered_payload() -> None:
    header, _, signature = issue_token(SECRET, sub="dev1", role="device", now=NOW).split(".")
    claims = b64url(json.dumps({**VALID_DEVICE, "sub": "dev2"}).encode())
    assert reason_of(f"{header}.{claims}.{signature}") == "signature verification failed"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_rejected(alg: str) -> None:
    assert reason_of(craft({"alg": alg, "typ": "JWT"}, VALID_DEVICE)) == "algorithm not allowed"


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_are_rejected_even_with_the_right_secret(alg: str) -> None:
    token = signed(VALID_DEVICE, algorithm=alg)
    # Sanity: the token is otherwise valid.
    jwt.decode(token, SECRET, algorithms=[alg], options={"verify_exp": False})
    assert reason_of(token) == "algorithm not allowed"


def test_rs256_header_is_rejected() -> None:
    token = craft({"alg": "RS256", "typ": "JWT"}, VALID_DEVICE, b"\x00" * 256)
    assert reason_of(token) == "algorithm not allowed"


@pytest.mark.parametrize("claim", ["exp", "sub", "role"])
def test_missing_required_claim(claim: str) -> None:
    claims = {k: v for k, v in VALID_DEVICE.items() if k != claim}
    assert reason_of(signed(claims)) == f"missing claim '{claim}'"


def test_client_without_devices_claim() -> None:
    claims = {**VALID_DEVICE, "sub": "alice", "role": "client"}
    assert reason_of(signed(claims)) == "missing claim 'devices'"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({**VALID_DEVICE, "role": "admin"}, "bad role"),
        ({**VALID_DEVICE, "role": ["device"]}, "bad role"),
        ({**VALID_DEVICE, "sub": "../etc"}, "bad claim 'sub'"),
        ({**VALID_DEVICE, "sub": 7}, "bad claim 'sub'"),
        ({**VALID_DEVICE, "exp": "soon"}, "bad claim 'exp'"),
        ({**VALID_DEVICE, "exp": True}, "bad claim 'exp'"),
        ({**VALID_DEVICE, "iat": "now"}, "bad claim 'iat'"),
        ({**VALID_DEVICE, "devices": ["dev2"]}, "unexpected claim 'devices'"),
        ({**VALID_DEVICE, "role": "client", "devices": "dev1"}, "bad claim 'devices'"),
        ({**VALID_DEVICE, "role": "client", "devices": ["*"]}, "bad claim 'devices'"),
        ({**VALID_DEVICE, "aud": "elsewhere"}, "unexpected claim 'aud'"),
    ],
)
def test_bad_claims(claims: dict[str, Any], reason: str) -> None:
    assert reason_of(signed(claims)) == reason


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "a.b", "🙂.🙂.🙂", "e30.e30.e30.e30"])
def test_malformed(token: str) -> None:
    assert reason_of(token) == "malformed"


def test_payload_that_is_not_an_object() -> None:
    token = jwt.api_jws.encode(b"[1,2]", SECRET, algorithm="HS256")
    assert reason_of(token) == "malformed"


def test_reason_never_contains_the_token() -> None:
    token = issue_token("x" * 40, sub="dev1", role="device", now=NOW)
    with pytest.raises(AuthError) as info:
        verify_token(SECRET, token, now=NOW)
    assert token not in str(info.value)
    assert isinstance(info.value, SignalingServerError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sub": "bad sub", "role": "device"}, "bad sub"),
        ({"sub": "dev1", "role": "admin"}, "bad role"),
        ({"sub": "dev1", "role": "device", "ttl": 0}, "bad ttl"),
        ({"sub": "dev1", "role": "device", "ttl": -5}, "bad ttl"),
        ({"sub": "dev1", "role": "device", "devices": ["dev2"]}, "only be given for a client"),
        ({"sub": "alice", "role": "client", "devices": "dev1"}, "not a string"),
        ({"sub": "alice", "role": "client", "devices": ["ok", "not ok"]}, "bad device id"),
    ],
)
def test_issue_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        issue_token(SECRET, **kwargs)


def test_short_secret_is_refused_for_issuing_and_verifying() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        issue_token("short", sub="dev1", role="device")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        verify_token("short", "a.b.c")


# --- load_secret ------------------------------------------------------------------


def test_secret_from_env_is_stripped() -> None:
    assert load_secret(None, {"TUNNEL_SECRET": f"  {SECRET}\n"}) == SECRET


def test_secret_file_wins_over_env(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(f"{'f' * 64}\n")
    assert load_secret(str(path), {"TUNNEL_SECRET": SECRET}) == "f" * 64


def test_no_secret_says_how_to_make_one() -> None:
    with pytest.raises(ServerConfigError) as info:
        load_secret(None, {})
    assert "TUNNEL_SECRET" in str(info.value)
    assert 'python3 -c "import secrets; print(secrets.token_hex(32))"' in str(info.value)


@pytest.mark.parametrize("value", ["", "   \n", "x" * 31])
def test_short_or_empty_env_secret(value: str) -> None:
    with pytest.raises(ServerConfigError, match=r"TUNNEL_SECRET .*secrets\.token_hex\(32\)"):
        load_secret(None, {"TUNNEL_SECRET": value})


def test_short_secret_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("tooshort\n")
    with pytest.raises(ServerConfigError, match=r"too short \(8 bytes"):
        load_secret(str(path), {"TUNNEL_SECRET": SECRET})


def test_unreadable_secret_file(tmp_path: Path) -> None:
    with pytest.raises(ServerConfigError, match=r"cannot read secret file .*No such file"):
        load_secret(str(tmp_path / "missing"), {"TUNNEL_SECRET": SECRET})


def test_secret_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ServerConfigError, match="not UTF-8"):
        load_secret(str(path), {})


def test_error_messages_never_contain_the_secret(tmp_path: Path) -> None:
    weak = "weak-but-recognisable"
    with pytest.raises(ServerConfigError) as info:
        load_secret(None, {"TUNNEL_SECRET": weak})
    assert weak not in str(info.value)


# --- lifetime and token ids (issue 9) ------------------------------------------------


def test_a_token_living_longer_than_its_role_allows_is_refused() -> None:
    now = 1_700_000_000
    client = jwt.encode(
        {"sub": "c", "role": "client", "devices": [], "iat": now, "exp": 1e300}, SECRET
    )
    with pytest.raises(AuthError, match="lifetime longer than 7 days"):
        verify_token(SECRET, client, now=now)
    device = jwt.encode({"sub": "d", "role": "device", "exp": now + 31 * 86400}, SECRET)
    with pytest.raises(AuthError, match="lifetime longer than 30 days"):
        verify_token(SECRET, device, now=now)
    ok = issue_token(SECRET, sub="d", role="device", ttl=30 * 86400, now=now)
    assert verify_token(SECRET, ok, now=now).expires == now + 30 * 86400


def test_each_token_has_its_own_id() -> None:
    first, second = (issue_token(SECRET, sub="d", role="device") for _ in range(2))
    ids = {verify_token(SECRET, t).jti for t in (first, second)}
    assert len(ids) == 2 and None not in ids


def test_a_client_token_grants_at_most_256_devices() -> None:
    many = [f"d{i}" for i in range(257)]
    with pytest.raises(ValueError, match="at most 256 devices"):
        issue_token(SECRET, sub="alice", role="client", devices=many)
    claims = {**VALID_DEVICE, "sub": "alice", "role": "client", "devices": many}
    assert reason_of(signed(claims)) == "grants more than 256 devices"
    identity = verify_token(SECRET, signed({**claims, "devices": many[:256]}), now=NOW)
    assert len(identity.devices) == 256
