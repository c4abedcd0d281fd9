"""The exception tree of :mod:`workers`.

::

    TunnelError                 root of everything this package raises on purpose
    ├── TunnelUsageError        the caller misused the API (wrong order, bad argument)
    ├── SignalingRejected       the signaling server refused a request for good
    │                           (forbidden device): retrying won't help
    ├── SessionFailed           one peer session could not be set up or broke
    │   ├── DeviceOffline       the device is not registered with the signaling server
    │   └── DeviceBusy          the server refused the request for now (too_many_sessions)
    ├── ServiceNotExposed       the device does not expose the service a forward names
    ├── ListenFailed            a forward's local address cannot be listened on
    └── HttpStreamReset         an HTTP stream (PROTOCOL.md §2.8) was reset; carries the code

The signaling link's own failures are :class:`signaling.errors.LinkRejected`
(refused for good) and :class:`signaling.errors.LinkDown`.
"""

from __future__ import annotations


class TunnelError(Exception):
    """Root of every error raised on purpose by :mod:`workers`."""


class TunnelUsageError(TunnelError):
    """The API was called in the wrong state or with a bad argument."""


class SignalingRejected(TunnelError):
    """The signaling server refused this peer; the reason is one line."""


class SessionFailed(TunnelError):
    """A peer session could not be established or ended abnormally."""


class DeviceOffline(SessionFailed):
    """The requested device is not connected to the signaling server."""


class DeviceBusy(SessionFailed):
    """The signaling server refused the request for now (``too_many_sessions``)."""


class ServiceNotExposed(TunnelError):
    """The device does not expose the service this forward names."""


class ListenFailed(TunnelError):
    """A forward cannot listen on its local address (in use, not ours, bad host)."""


class HttpStreamReset(TunnelError):
    """An HTTP stream ended with RESET ``code`` (PROTOCOL.md §2.2/§2.8) before its end.

    ``remote`` is true when the device sent it, false when this side reset the
    stream (its own cancel, or the device broke the protocol on it).
    """

    def __init__(self, code: int, reason: str, *, remote: bool) -> None:
        super().__init__(f"HTTP stream reset ({code}): {reason}")
        self.code = code
        self.reason = reason
        self.remote = remote
