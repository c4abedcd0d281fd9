"""The exception tree of :mod:`protocol`.

::

    ProtocolError                 root: anything this package raises on purpose
    ├── LocalProtocolError        our own code misused the API or broke the protocol
    └── RemoteProtocolError       the peer sent something invalid (untrusted input)
        ├── SignalingError        a signaling message was rejected; carries the wire
                                  error ``code`` (see PROTOCOL.md §1.6)
        └── HeadError             an HTTP stream's head was refused (§2.8,
                                  :mod:`protocol.http_heads`): that stream only

Decoders of untrusted input raise only :class:`RemoteProtocolError` (or a
subclass); they never let a ``KeyError``/``TypeError``/``ValueError`` escape.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every error raised on purpose by :mod:`protocol`."""


class LocalProtocolError(ProtocolError):
    """Our side misused the API (e.g. sent DATA on a stream it already closed)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that violates the protocol."""


class SignalingError(RemoteProtocolError):
    """A signaling message was rejected.

    ``code`` is the wire error code sent back in an ``error`` message
    (``bad_message``, ``unsupported_version``, ``unknown_type``, ...).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
