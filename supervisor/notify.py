"""The systemd notification protocol, client side: ``sd_notify(3)`` without libsystemd.

With ``Type=notify`` (``scripts/tunnelctl.service``) systemd passes the path of a
datagram socket in ``$NOTIFY_SOCKET`` and waits for ``READY=1`` before it counts
the unit as started; ``STOPPING=1`` and ``STATUS=...`` are optional. A message is
newline-separated ``KEY=VALUE`` assignments, sent as one ``AF_UNIX`` datagram to
that socket: a filesystem path, or an abstract-namespace name written with a
leading ``@`` (sent as a leading NUL byte). Outside systemd the variable is unset
and :func:`sd_notify` does nothing.

Contract: ``sd_notify(state)`` returns True when the datagram was sent, False when
there is nowhere to send it (no ``$NOTIFY_SOCKET``, or an address this module does
not speak, such as systemd's ``vsock:``) or the send failed; a failure is logged,
never raised, since a missing notification must not take the service down.
Worker processes should be started without ``NOTIFY_SOCKET`` in their environment.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["sd_notify"]

log = logging.getLogger("tunnelctl.notify")


def sd_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``; return whether it was sent.

    ``env`` defaults to ``os.environ``.
    """
    if not state:
        raise ValueError("sd_notify needs a state, e.g. READY=1")
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        if address:
            log.warning("NOTIFY_SOCKET %r is not a unix socket address; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state.replace("\n", " "), exc)
        return False
    return True
