"""The ``tunnelctl`` command line: the composition root of the other packages.

Contract for scripts: errors are one line on stderr (``tunnelctl: error: ...``)
and a non-zero exit: 2 for usage errors, 1 for everything else. Long-running
verbs print one readiness line on stdout (``listening ...``, ``registered ...``,
``forwarding ...``) once they serve; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import click

log = logging.getLogger("tunnelctl")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def error_line(message: str) -> int:
    """Print the one-line error scripts see; return the exit code 1."""
    click.echo(f"tunnelctl: error: {message}", err=True)
    return 1


def ready(line: str) -> None:
    """Print a readiness line for people and scripts (stdout, flushed at once)."""
    click.echo(line)
    sys.stdout.flush()


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("tunnelctl").setLevel(level)
    if verbose > 1:
        root.setLevel(logging.DEBUG)


def run_until_signal(main_coro: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main_coro`` until it returns or SIGINT/SIGTERM cancels it (exit 0)."""

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stopping = False

        def stop() -> None:
            nonlocal stopping
            stopping = True
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        try:
            return await main_coro()
        except asyncio.CancelledError:
            if stopping:
                return 0
            raise

    return asyncio.run(runner())


# -- the command group --------------------------------------------------------


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("-v", "--verbose", count=True, help="Debug logs (-vv: also aiortc/aioice).")
@click.version_option(package_name="tunnelctl")
def cli(verbose: int) -> None:
    """Peer-to-peer remote access to local services over WebRTC."""
    setup_logging(verbose)


def main() -> None:
    cli(prog_name="tunnelctl")


# -- shared options -------------------------------------------------------------


def ice_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--ice-host",
        "ice_hosts",
        multiple=True,
        metavar="ADDR[/BITS]",
        envvar="TUNNEL_ICE_HOSTS",
        show_envvar=True,
        help="Offer only host candidates in these networks (repeatable), "
        "e.g. 127.0.0.1 or 192.168.1.0/24; hides VPN/container interfaces.",
    )(f)
    f = click.option(
        "--turn-password",
        metavar="P",
        envvar="TUNNEL_TURN_PASSWORD",
        help="TURN password (also TUNNEL_TURN_PASSWORD).",
    )(f)
    f = click.option("--turn-user", metavar="U", help="TURN username.")(f)
    f = click.option(
        "--turn",
        "turn_urls",
        multiple=True,
        metavar="URL",
        help="TURN server, turn:HOST:PORT[?transport=udp|tcp] (repeatable).",
    )(f)
    f = click.option(
        "--stun",
        "stun_urls",
        multiple=True,
        metavar="URL",
        help="STUN server, stun:HOST:PORT (repeatable). None by default: "
        "no lookup is made unless you name one.",
    )(f)
    return f


def build_ice(
    stun_urls: Sequence[str],
    turn_urls: Sequence[str],
    turn_user: str | None,
    turn_password: str | None,
    ice_hosts: Sequence[str],
) -> list[Any]:
    from workers.ice import IceServer, parse_networks, restrict_host_addresses

    hosts = [h for spec in ice_hosts for h in spec.split(",") if h.strip()]
    try:
        servers = [IceServer(url) for url in stun_urls]
        servers += [IceServer(url, turn_user, turn_password) for url in turn_urls]
        restrict_host_addresses(parse_networks(hosts))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return servers


def resolve_token(token: str | None, token_file: str | None) -> str:
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise click.UsageError(f"cannot read --token-file: {exc.strerror}") from None
    if not token:
        raise click.UsageError("a token is required: --token, --token-file or TUNNEL_TOKEN")
    return token


def token_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--token-file", metavar="FILE", help="Read the JWT from FILE.")(f)
    f = click.option(
        "--token",
        metavar="JWT",
        envvar="TUNNEL_TOKEN",
        show_envvar=True,
        help="JWT from `tunnelctl token` (prefer TUNNEL_TOKEN or --token-file: "
        "a command line is visible to other users).",
    )(f)
    return f


def signal_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--signal",
        "signal_url",
        required=True,
        metavar="URL",
        envvar="TUNNEL_SIGNAL",
        show_envvar=True,
        help="Signaling server, e.g. ws://127.0.0.1:8000/signal.",
    )(f)


def load_secret_or_fail(secret_file: str | None) -> str:
    from signaling.auth import load_secret
    from signaling.errors import ConfigError

    try:
        return load_secret(secret_file, os.environ)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


# -- verbs ------------------------------------------------------------------------


@cli.command("signal", context_settings=CONTEXT_SETTINGS)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port (0 picks a free one).",
)
@click.option(
    "--secret-file", metavar="FILE", help="File holding the JWT secret (else TUNNEL_SECRET)."
)
def signal_cmd(host: str, port: int, secret_file: str | None) -> None:
    """Run the signaling server (ws://HOST:PORT/signal)."""
    from signaling.errors import ConfigError
    from signaling.server import run_server

    secret = load_secret_or_fail(secret_file)

    async def serve() -> int:
        try:
            await run_server(secret, host, port, on_ready=lambda url: ready(f"listening {url}"))
        except ConfigError as exc:
            return error_line(str(exc))
        return 0

    sys.exit(run_until_signal(serve))


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option("--sub", required=True, metavar="ID", help="Device or client id the token names.")
@click.option("--role", required=True, type=click.Choice(["device", "client"]))
@click.option(
    "--device",
    "devices",
    multiple=True,
    metavar="ID",
    help="Device a client token may reach (repeatable; clients only).",
)
@click.option(
    "--ttl",
    default=86400,
    show_default=True,
    type=click.IntRange(min=1),
    help="Lifetime in seconds.",
)
@click.option(
    "--secret-file", metavar="FILE", help="File holding the JWT secret (else TUNNEL_SECRET)."
)
def token(sub: str, role: str, devices: tuple[str, ...], ttl: int, secret_file: str | None) -> None:
    """Print a signed JWT for a device or a client."""
    from signaling.auth import issue_token

    secret = load_secret_or_fail(secret_file)
    if role == "client" and not devices:
        raise click.UsageError("a client token needs at least one --device it may reach")
    try:
        click.echo(issue_token(secret, sub=sub, role=role, devices=devices, ttl=ttl))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@cli.command(context_settings=CONTEXT_SETTINGS)
@signal_option
@click.option("--device", required=True, metavar="ID", help="This device's id (the token's sub).")
@token_options
@click.option(
    "--expose",
    "exposes",
    multiple=True,
    required=True,
    metavar="NAME=URL",
    help="Service to expose, e.g. web=http://127.0.0.1:8080 or ssh=tcp://127.0.0.1:22 "
    "(repeatable). Clients reach these and nothing else.",
)
@ice_options
def start(
    signal_url: str,
    device: str,
    token: str | None,
    token_file: str | None,
    exposes: tuple[str, ...],
    stun_urls: tuple[str, ...],
    turn_urls: tuple[str, ...],
    turn_user: str | None,
    turn_password: str | None,
    ice_hosts: tuple[str, ...],
) -> None:
    """Make this machine's services reachable as DEVICE (runs in the foreground)."""
    from workers.device import DeviceHost, parse_expose
    from workers.errors import TunnelError

    jwt = resolve_token(token, token_file)
    services = {}
    for spec in exposes:
        try:
            name, address = parse_expose(spec)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        if name in services:
            raise click.UsageError(f"service {name!r} is exposed twice")
        services[name] = address
    ice = build_ice(stun_urls, turn_urls, turn_user, turn_password, ice_hosts)

    async def serve() -> int:
        host = DeviceHost(
            signal_url=signal_url, device=device, token=jwt, services=services, ice_servers=ice
        )
        try:
            await host.start()
            ready(
                f"registered {device} "
                + " ".join(f"{n}={a.host}:{a.port}" for n, a in services.items())
            )
            await host.run()
        except TunnelError as exc:
            return error_line(str(exc))
        finally:
            await host.stop()
        return 0

    sys.exit(run_until_signal(serve))


@cli.command(context_settings=CONTEXT_SETTINGS)
@signal_option
@click.option("--device", required=True, metavar="ID", help="Device to reach.")
@token_options
@click.option("--service", required=True, metavar="NAME", help="Service on the device.")
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    metavar="HOST:PORT",
    help="Local address to forward from (port 0 picks a free one).",
)
@ice_options
def connect(
    signal_url: str,
    device: str,
    token: str | None,
    token_file: str | None,
    service: str,
    listen: str,
    stun_urls: tuple[str, ...],
    turn_urls: tuple[str, ...],
    turn_user: str | None,
    turn_password: str | None,
    ice_hosts: tuple[str, ...],
) -> None:
    """Forward a local TCP port to SERVICE on DEVICE (like ssh -L)."""
    from protocol.frames import is_valid_service_name
    from workers.client import ClientTunnel, PortForward
    from workers.errors import TunnelError

    jwt = resolve_token(token, token_file)
    if not is_valid_service_name(service):
        raise click.UsageError(f"bad service name {service!r}")
    listen_host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise click.UsageError(f"bad --listen {listen!r}: expected HOST:PORT")
    listen_host = listen_host.strip("[]") or "127.0.0.1"
    ice = build_ice(stun_urls, turn_urls, turn_user, turn_password, ice_hosts)

    async def serve() -> int:
        tunnel = ClientTunnel(signal_url=signal_url, device=device, token=jwt, ice_servers=ice)
        forward = PortForward(tunnel, service, listen_host, int(port_text))
        try:
            await tunnel.open()
            host, port = await forward.start()
            opened = (tunnel.open_seconds or 0) * 1000
            pair = tunnel.peer.candidate_pair_type() if tunnel.peer else None
            ready(
                f"forwarding {host}:{port} -> {device}/{service} "
                f"(DataChannel open in {opened:.0f} ms, {pair or 'unknown'} path)"
            )
            tunnel.keep_alive()
            return error_line(str(await tunnel.wait_fatal()))
        except TunnelError as exc:
            return error_line(str(exc))
        except OSError as exc:
            return error_line(f"cannot listen on {listen}: {exc.strerror or exc}")
        finally:
            await forward.close()
            await tunnel.close()

    sys.exit(run_until_signal(serve))


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option("--once", is_flag=True, help="Exit after the check instead of running until Ctrl-C.")
@click.option(
    "--size",
    default=8,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="MiB to fetch through the tunnel for the throughput check.",
)
def demo(once: bool, size: int) -> None:
    """Run everything on loopback: signaling, a sample web service, a device, a forward."""
    from tunnelctl.demo import run_demo

    sys.exit(run_demo(once=once, size_mib=size))
