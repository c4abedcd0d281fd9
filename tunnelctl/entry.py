"""The ``tunnelctl`` program's entry point, with a fast path for ``connect --stdio``.

ssh starts ``tunnelctl connect --stdio`` once per login (``ProxyCommand``).
When a running ``tunnelctl connect`` already has a session with the device, the
stream is handed to it over its control endpoint (PROTOCOL.md §4.2), as ssh's
ControlMaster does, and this process only copies bytes. That path imports the
standard library, :mod:`workers.handoff` and :mod:`supervisor.runtime`: not
click (~80 ms), not asyncio, and above all not aiortc (~1.3 s). Everything else,
and a ``--stdio`` that no running client can carry, goes to :mod:`tunnelctl.cli`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

#: ``connect`` options that take a value (all but --stdio and --wait, whose
#: value is optional: a command line with --wait takes the full CLI).
_VALUED = frozenset(
    {
        "--config",
        "--signal",
        "--device",
        "--token",
        "--token-file",
        "--forward",
        "--service",
        "--listen",
        "--runtime-dir",
        "--stun",
        "--turn",
        "--turn-user",
        "--turn-password",
        "--ice-host",
        "--ice-policy",
        "--keepalive",
    }
)


def main() -> None:
    code = fast_stdio(sys.argv[1:], os.environ)
    if code is not None:
        sys.exit(code)
    from tunnelctl.cli import main as cli_main

    cli_main()


def fast_stdio(argv: Sequence[str], env: Mapping[str, str]) -> int | None:
    """Hand a ``connect --stdio`` over to a running client; None if this cannot."""
    options = _connect_options(argv)
    if options is None or "--stdio" not in options:
        return None
    device = options.get("--device", [env.get("TUNNEL_DEVICE", "")])[-1]
    services = options.get("--service", [])
    if not device or len(services) != 1:
        return None  # the full CLI says what is wrong
    runtime_dir = options.get("--runtime-dir", [None])[-1]
    return stdio_handoff(runtime_dir, device, services[0], env)


def stdio_handoff(
    runtime_dir: str | None, device: str, service: str, env: Mapping[str, str] = os.environ
) -> int | None:
    """Carry stdin/stdout on a running client's session; None if no client serves ``device``."""
    from supervisor.errors import RuntimeDirError
    from supervisor.runtime import check_private, default_runtime_dir
    from workers.handoff import hand_off, splice_stdio

    clients = (Path(runtime_dir) if runtime_dir else default_runtime_dir(env)) / "clients"
    try:
        check_private(clients)  # only the user's own clients may receive the stream
    except RuntimeDirError:
        return None
    sock = hand_off(clients, device, service)
    if sock is None:
        return None
    with sock:
        return splice_stdio(sock)


def _connect_options(argv: Sequence[str]) -> dict[str, list[str]] | None:
    """``connect``'s options as {name: [values]}, or None for anything unusual."""
    args = list(argv)
    while args and args[0] in ("-v", "-vv", "--verbose"):
        args.pop(0)
    if not args or args[0] != "connect":
        return None
    options: dict[str, list[str]] = {}
    rest = iter(args[1:])
    for arg in rest:
        name, eq, value = arg.partition("=")
        if name in _VALUED:
            if not eq:
                value = next(rest, "")
            options.setdefault(name, []).append(value)
        elif arg == "--stdio":
            options["--stdio"] = []
        else:
            return None  # --help, --wait, a typo: the full CLI handles it
    return options
