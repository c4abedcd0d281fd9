"""JWT authentication of signaling connections (PROTOCOL.md §1.2).

Tokens are JWTs (RFC 7519) checked the way RFC 8725 asks: the algorithm is
pinned to HS256 by the verifier, never taken from the token (so ``alg: none``
and every other algorithm fail, whatever the signature), and the claims are
typed and validated explicitly.

Claims: ``sub`` (an id), ``role`` (``"device"`` or ``"client"``), ``exp``,
``iat``, ``jti`` (a random token id, so one token can be revoked); a client
token also carries ``devices``, the list of device ids it may reach (a device
token must not). ``exp``, ``nbf`` and ``iat`` are checked with a 30 s leeway
(:data:`LEEWAY`, the most we allow) against ``now`` (an argument, so tests
need no clock). A token's lifetime (``exp - iat``, or ``exp - now`` without
``iat``) may not exceed :data:`MAX_LIFETIME` for its role: 30 days for a
device, 7 days for a client (``tunnelctl token`` issues 1 day by default).

Public API:

``issue_token(secret, *, sub, role, devices=(), ttl=3600, now=None) -> str``
    Mint a token; :class:`ValueError` on bad arguments.
``verify_token(secret, token, *, now=None) -> Identity``
    Check a token; :class:`~signaling.errors.AuthError` (one-line ``reason``)
    on any problem with the token.
``load_secret(secret_file, env) -> str``
    The server secret from a file or ``TUNNEL_SECRET``;
    :class:`~signaling.errors.ServerConfigError` if missing or weak.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jwt

from protocol.signaling import PEER_ROLES, PeerRole, is_valid_id
from signaling.errors import AuthError, ServerConfigError

__all__ = [
    "ALGORITHM",
    "DEFAULT_TTL",
    "LEEWAY",
    "MAX_LIFETIME",
    "MIN_SECRET_BYTES",
    "SECRET_ENV",
    "Identity",
    "issue_token",
    "load_secret",
    "verify_token",
]

ALGORITHM: Final = "HS256"
LEEWAY: Final = 30
DEFAULT_TTL: Final = 3600
#: Longest token lifetime accepted, per role (seconds).
#: Most devices one client token may grant: ``list_devices`` answers for all of
#: them (PROTOCOL.md §1.3), so the answer must stay bounded.
MAX_GRANTED_DEVICES: Final = 256
MAX_LIFETIME: Final[Mapping[str, float]] = {"device": 30 * 86400.0, "client": 7 * 86400.0}
#: RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES: Final = 32
SECRET_ENV: Final = "TUNNEL_SECRET"
_MAKE_SECRET_HINT: Final = (
    'make one with: python3 -c "import secrets; print(secrets.token_hex(32))"'
)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for.

    ``devices`` is the set of devices a client may reach; always empty for a
    device, whose only device is its own ``sub``. ``expires`` is the token's
    ``exp`` (Unix time), ``jti`` its id if it has one.
    """

    sub: str
    role: PeerRole
    devices: frozenset[str] = field(default_factory=frozenset)
    # Properties of the token that proved it, not of who it is.
    expires: float = field(default=math.inf, compare=False)
    jti: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not is_valid_id(self.sub):
            raise ValueError(f"bad sub {self.sub!r}: not a valid id")
        if self.role not in PEER_ROLES:
            raise ValueError(f"bad role {self.role!r}: must be 'device' or 'client'")
        if self.role == "device" and self.devices:
            raise ValueError("a device identity grants no devices")
        if not all(is_valid_id(d) for d in self.devices):
            raise ValueError("devices must be valid device ids")

    def may_reach(self, device: str) -> bool:
        """Whether this identity may request a session with ``device``."""
        return self.role == "client" and device in self.devices


def _secret_problem(secret: object) -> str | None:
    if not isinstance(secret, str):
        return "the secret must be a string"
    if len(secret.encode("utf-8")) < MIN_SECRET_BYTES:
        return f"the secret must be at least {MIN_SECRET_BYTES} bytes"
    return None


def check_secret(secret: str) -> None:
    """Raise :class:`ServerConfigError` unless ``secret`` is strong enough for HS256."""
    problem = _secret_problem(secret)
    if problem is not None:
        raise ServerConfigError(f"{problem}; {_MAKE_SECRET_HINT}")


def issue_token(
    secret: str,
    *,
    sub: str,
    role: str,
    devices: Iterable[str] = (),
    ttl: int = DEFAULT_TTL,
    now: float | None = None,
) -> str:
    """Mint an HS256 token for ``sub`` acting as ``role``, valid ``ttl`` seconds.

    ``devices`` (clients only) lists the device ids the client may reach.
    Raises :class:`ValueError` naming the bad argument.
    """
    problem = _secret_problem(secret)
    if problem is not None:
        raise ValueError(problem)
    if not is_valid_id(sub):
        raise ValueError(f"bad sub {sub!r}: an id is 1-64 of A-Z a-z 0-9 . _ - (not first)")
    if role not in PEER_ROLES:
        raise ValueError(f"bad role {role!r}: must be 'device' or 'client'")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise ValueError(f"bad ttl {ttl!r}: must be a positive number of seconds")
    if ttl > MAX_LIFETIME[role]:
        # The server would refuse it (verify_token): say so now.
        raise ValueError(f"bad ttl {ttl}: a {role} token lives at most {MAX_LIFETIME[role]:.0f} s")
    if isinstance(devices, str | bytes):
        # A bare string is an Iterable[str] of characters: never what is meant.
        raise ValueError("devices must be a list of device ids, not a string")
    granted = sorted(set(devices))
    for device in granted:
        if not is_valid_id(device):
            raise ValueError(f"bad device id {device!r} in devices")
    if role == "device" and granted:
        raise ValueError("devices may only be given for a client token")
    if len(granted) > MAX_GRANTED_DEVICES:
        raise ValueError(f"a client token grants at most {MAX_GRANTED_DEVICES} devices")

    issued_at = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "role": role}
    if role == "client":
        claims["devices"] = granted
    claims["iat"] = issued_at
    claims["exp"] = issued_at + ttl
    claims["jti"] = secrets.token_urlsafe(12)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # RFC 7519 NumericDate: a JSON number; true is not one.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(f"bad claim '{name}'")
    if isinstance(value, float) and not math.isfinite(value):
        raise AuthError(f"bad claim '{name}'")
    return value


def _decode(secret: str, token: str) -> dict[str, Any]:
    try:
        return jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            # Time claims are checked below against the injected ``now``;
            # PyJWT only reads the wall clock. Required claims too, for one
            # wording of "missing claim".
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "require": [],
            },
        )
    except jwt.InvalidAlgorithmError:
        raise AuthError("algorithm not allowed") from None
    except jwt.InvalidSignatureError:  # before DecodeError: it is a subclass
        raise AuthError("signature verification failed") from None
    except jwt.InvalidAudienceError:
        raise AuthError("unexpected claim 'aud'") from None
    except jwt.exceptions.InvalidSubjectError:
        raise AuthError("bad claim 'sub'") from None
    except jwt.PyJWTError:
        # DecodeError (not three base64url JSON parts, ...), bad jti, ...
        raise AuthError("malformed") from None


def verify_token(secret: str, token: str, *, now: float | None = None) -> Identity:
    """Verify ``token`` against ``secret`` and return the identity it grants.

    Raises :class:`AuthError` whose ``reason`` is one of: ``malformed``,
    ``algorithm not allowed``, ``signature verification failed``, ``expired``,
    ``not yet valid``, ``issued in the future``, ``lifetime longer than N days``,
    ``missing claim 'NAME'``,
    ``bad claim 'NAME'``, ``bad role``, ``unexpected claim 'NAME'``. Raises
    :class:`ValueError` if ``secret`` itself is unusable (a local mistake).
    """
    problem = _secret_problem(secret)
    if problem is not None:
        raise ValueError(problem)
    if not isinstance(token, str) or not token:
        raise AuthError("malformed")
    claims = _decode(secret, token)
    if now is None:
        now = time.time()

    for name in ("exp", "sub", "role"):
        if claims.get(name) is None:
            raise AuthError(f"missing claim '{name}'")
    exp = _numeric_date(claims, "exp")
    assert exp is not None
    if exp <= now - LEEWAY:
        raise AuthError("expired")
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and nbf > now + LEEWAY:
        raise AuthError("not yet valid")
    iat = _numeric_date(claims, "iat")
    if iat is not None and iat > now + LEEWAY:
        raise AuthError("issued in the future")

    sub = claims["sub"]
    if not is_valid_id(sub):
        raise AuthError("bad claim 'sub'")
    role = claims["role"]
    if role not in PEER_ROLES:
        raise AuthError("bad role")
    if exp - (now if iat is None else iat) > MAX_LIFETIME[role]:
        raise AuthError(f"lifetime longer than {MAX_LIFETIME[role] / 86400:g} days")
    jti = claims.get("jti")
    if jti is not None and (not isinstance(jti, str) or not 0 < len(jti) <= 128):
        raise AuthError("bad claim 'jti'")
    if role == "device":
        if "devices" in claims:
            raise AuthError("unexpected claim 'devices'")
        return Identity(sub, "device", expires=exp, jti=jti)
    devices = claims.get("devices")
    if devices is None:
        raise AuthError("missing claim 'devices'")
    if not isinstance(devices, list) or not all(is_valid_id(d) for d in devices):
        raise AuthError("bad claim 'devices'")
    if len(devices) > MAX_GRANTED_DEVICES:
        raise AuthError(f"grants more than {MAX_GRANTED_DEVICES} devices")
    return Identity(sub, "client", frozenset(devices), expires=exp, jti=jti)


def load_secret(secret_file: str | None, env: Mapping[str, str]) -> str:
    """Return the server secret: the file's content if given, else ``env["TUNNEL_SECRET"]``.

    Surrounding whitespace (the newline of ``echo … > file``) is stripped.
    Raises :class:`ServerConfigError` saying what is wrong and how to make a secret.
    """
    if secret_file is not None:
        source = f"secret file {secret_file}"
        try:
            text = Path(secret_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ServerConfigError(f"cannot read {source}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ServerConfigError(f"{source} is not UTF-8 text") from None
    else:
        source = SECRET_ENV
        env_value = env.get(SECRET_ENV)
        if env_value is None:
            raise ServerConfigError(
                f"no signaling secret: give a secret file or set {SECRET_ENV}; {_MAKE_SECRET_HINT}"
            )
        text = env_value
    secret = text.strip()
    if not secret:
        raise ServerConfigError(f"{source} is empty; {_MAKE_SECRET_HINT}")
    size = len(secret.encode("utf-8"))
    if size < MIN_SECRET_BYTES:
        raise ServerConfigError(
            f"{source} is too short ({size} bytes, need at least {MIN_SECRET_BYTES}); "
            f"{_MAKE_SECRET_HINT}"
        )
    return secret
