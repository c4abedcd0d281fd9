"""The exception trees of :mod:`signaling`: the server's, and the client end's.

::

    SignalingServerError      root of what the server side (server, router, auth,
    │                         TURN) raises on purpose
    ├── AuthError             a peer's token or authentication attempt was rejected
    │                         (remote); ``reason`` is one line and never holds the token
    ├── ServerConfigError     the server cannot run as configured (environment): no or
    │                         weak secret, address unusable; the message says how to fix it
    └── UsageError            our own code called the API wrongly (local), e.g.
                              ``Router.receive()`` for a connection it never saw

    LinkError                 root of what the client end (:mod:`signaling.link`) raises,
    │                         the one part of this package the supervisor and the
    │                         workers import: a client never catches "server" errors
    ├── LinkRejected          the server refused this peer for good (bad or expired
    │                         token, replaced, bad URL): retrying cannot help
    └── LinkDown              the link is not up, or could not be brought up

Invalid *messages* are not exceptions here: the router answers them with
``error`` messages (:class:`protocol.errors.SignalingError` carries the code).
``issue_token`` raises :class:`ValueError` for bad arguments, like the standard
library does for bad values.
"""

from __future__ import annotations


class SignalingServerError(Exception):
    """Root of every error raised on purpose by :mod:`signaling`."""


class AuthError(SignalingServerError):
    """A token was rejected (§1.2). ``reason`` is a short phrase such as ``"expired"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ServerConfigError(SignalingServerError):
    """The server's configuration or environment is unusable; the message says why."""


class UsageError(SignalingServerError):
    """The API was called in a way its contract does not allow (a bug on our side)."""


class LinkError(Exception):
    """The client end of a signaling link failed (:mod:`signaling.link`)."""


class LinkRejected(LinkError):
    """The signaling server refused this peer; the reason is one line."""


class LinkDown(LinkError):
    """The link is down (sending is impossible) or could not be established."""
