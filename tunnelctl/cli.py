"""The ``tunnelctl`` command line: the composition root of the other packages.

Contract for scripts: errors are one line on stderr (``tunnelctl: error: ...``)
and a non-zero exit: 2 for usage errors, 1 for everything else. Long-running
verbs print one readiness line on stdout (``listening ...``, ``registered ...``,
``forwarding ...``) once they serve; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
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
        logging.Formatter("%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("tunnelctl").setLevel(level)
    if verbose > 1:
        root.setLevel(logging.DEBUG)
    from aio.logs import redact_all_logs

    redact_all_logs()  # at any verbosity, third-party debug output included


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
        "--ice-policy",
        type=click.Choice(["all", "relay"]),
        default=None,
        help="relay: use only TURN-relayed candidates (hides this host's addresses) "
        "[default: all, or the config's ice_policy].",
    )(f)
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
        help="TURN server, turn:HOST:PORT[?transport=udp|tcp] or turns:HOST:PORT "
        "(repeatable; all are used, with the signaling server's).",
    )(f)
    f = click.option(
        "--stun",
        "stun_urls",
        multiple=True,
        metavar="URL",
        help="STUN server, stun:HOST:PORT (repeatable). None by default: "
        "no lookup is made unless you name one or the signaling server hands one out.",
    )(f)
    return f


def keepalive_option(f: Callable[..., Any]) -> Callable[..., Any]:
    from protocol.ice import DEFAULT_KEEPALIVE, MAX_KEEPALIVE, MIN_KEEPALIVE

    return click.option(
        "--keepalive",
        type=click.FloatRange(MIN_KEEPALIVE, MAX_KEEPALIVE),
        default=None,
        metavar="SECONDS",
        help="A session whose path goes unanswered this long is dead: it is reported, "
        f"and the client builds a new one [default: {DEFAULT_KEEPALIVE:g}, or the config's].",
    )(f)


def build_ice(
    stun_urls: Sequence[str],
    turn_urls: Sequence[str],
    turn_user: str | None,
    turn_password: str | None,
    ice_hosts: Sequence[str],
) -> list[Any]:
    from protocol.ice import IceServer
    from workers.ice import parse_networks, restrict_host_addresses

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


def metrics_option(f: Callable[..., Any]) -> Callable[..., Any]:
    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
        from aio.metrics_http import parse_listen_address

        try:
            return None if value is None else parse_listen_address(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return click.option(
        "--metrics",
        metavar="HOST:PORT",
        callback=parse,
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (off by default).",
    )(f)


def load_secret_or_fail(secret_file: str | None) -> str:
    from signaling.auth import load_secret
    from signaling.errors import ServerConfigError

    try:
        return load_secret(secret_file, os.environ)
    except ServerConfigError as exc:
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
@click.option(
    "--ice-server",
    "ice_servers",
    multiple=True,
    metavar="URL",
    help="STUN/TURN server handed to every device and client: stun:HOST[:PORT], "
    "turn:HOST[:PORT][?transport=udp|tcp], turns:HOST[:PORT] (repeatable).",
)
@click.option(
    "--turn-secret-file",
    metavar="FILE",
    help="coturn's static-auth-secret (use-auth-secret): TURN servers get "
    "short-lived credentials minted with it.",
)
@click.option(
    "--turn-ttl",
    default=3600,
    show_default=True,
    type=click.IntRange(60, 7 * 86400),
    help="Lifetime of TURN credentials in seconds; fresh ones are sent at half of it.",
)
@click.option(
    "--max-connections",
    default=1024,
    show_default=True,
    type=click.IntRange(1),
    help="Connections held at once (also kept below the file descriptor limit).",
)
@click.option(
    "--max-unauthenticated",
    default=128,
    show_default=True,
    type=click.IntRange(1),
    help="Connections not yet authenticated; when full, the oldest is dropped.",
)
@click.option(
    "--max-per-identity",
    default=8,
    show_default=True,
    type=click.IntRange(1),
    help="Authenticated connections per token sub.",
)
@click.option(
    "--revoked",
    "revoked_file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Revocation list: lines 'sub ID' or 'jti ID'; re-read on SIGHUP.",
)
@click.option(
    "--auth-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 300),
    help="Seconds from accept to authenticated, handshake included.",
)
@click.option(
    "--redis",
    "redis_url",
    metavar="URL",
    help="Run as one node of a cluster sharing presence through Redis, "
    "redis://HOST:PORT/DB (PROTOCOL.md §1.8). Default: alone, in memory.",
)
@click.option("--node-id", metavar="ID", help="This node's name in the cluster (default: random).")
@click.option(
    "--drain-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, 3600),
    help="On SIGTERM, seconds to wait for connections to move to another node.",
)
@metrics_option
def signal_cmd(
    host: str,
    port: int,
    secret_file: str | None,
    ice_servers: tuple[str, ...],
    turn_secret_file: str | None,
    turn_ttl: int,
    max_connections: int,
    max_unauthenticated: int,
    max_per_identity: int,
    auth_timeout: float,
    revoked_file: str | None,
    redis_url: str | None,
    node_id: str | None,
    drain_timeout: float,
    metrics: tuple[str, int] | None,
) -> None:
    """Run the signaling server (ws://HOST:PORT/signal)."""
    from protocol.signaling import is_valid_id
    from signaling.cluster import RedisCluster, new_node_id
    from signaling.errors import ServerConfigError
    from signaling.server import ConnectionCaps, run_server
    from signaling.turn import IceIssuer, load_turn_secret

    caps = ConnectionCaps(max_connections, max_unauthenticated, max_per_identity)

    secret = load_secret_or_fail(secret_file)
    issuer = None
    if ice_servers or turn_secret_file:
        try:
            turn_secret = load_turn_secret(turn_secret_file) if turn_secret_file else None
            issuer = IceIssuer(ice_servers, turn_secret, turn_ttl)
        except ServerConfigError as exc:
            raise click.UsageError(str(exc)) from None

    if node_id is not None and not is_valid_id(node_id):
        raise click.UsageError(f"--node-id: {node_id!r} is not a valid id ([A-Za-z0-9._-])")
    if node_id is not None and redis_url is None:
        raise click.UsageError("--node-id needs --redis")

    async def serve() -> int:
        cluster = None
        if redis_url is not None:
            cluster = RedisCluster(redis_url, node_id or new_node_id())
        try:
            await run_server(
                secret,
                host,
                port,
                on_ready=lambda url: ready(f"listening {url}"),
                ice=issuer,
                caps=caps,
                auth_timeout=auth_timeout,
                revoked=revoked_file,
                cluster=cluster,
                drain_timeout=drain_timeout,
                metrics=metrics,
                on_metrics=lambda url: ready(f"metrics {url}"),
            )
        except ServerConfigError as exc:
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


def runtime_dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--runtime-dir",
        metavar="DIR",
        envvar="TUNNEL_RUNTIME_DIR",
        show_envvar=True,
        help="The supervisor's private directory (control socket, lock, log); "
        "default $XDG_RUNTIME_DIR/tunnelctl or /tmp/tunnelctl-UID.",
    )(f)


def resolve_runtime_dir(runtime_dir: str | None) -> Path:
    from supervisor.runtime import default_runtime_dir

    return Path(runtime_dir) if runtime_dir else default_runtime_dir(os.environ)


#: ``status`` exits with this when no supervisor answers (as LSB's "not running").
EXIT_NOT_RUNNING = 3


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option("--config", "config_path", metavar="FILE", help="TOML config (several devices).")
@click.option(
    "--signal",
    "signal_url",
    metavar="URL",
    multiple=True,
    envvar="TUNNEL_SIGNAL",
    show_envvar=True,
    help="Signaling server, e.g. ws://127.0.0.1:8000/signal (single-device mode); "
    "repeatable: the first that answers is used, in order.",
)
@click.option(
    "--device", metavar="ID", help="This device's id, the token's sub (single-device mode)."
)
@token_options
@click.option(
    "--expose",
    "exposes",
    multiple=True,
    metavar="NAME=URL",
    help="Service to expose, e.g. web=http://127.0.0.1:8080 or ssh=tcp://127.0.0.1:22 "
    "(repeatable). Clients reach these and nothing else.",
)
@ice_options
@keepalive_option
@click.option(
    "--pool-size",
    type=click.IntRange(0, 32),
    default=None,
    help="Idle pre-forked workers kept ready [default: 2, or the config's].",
)
@runtime_dir_option
@click.option(
    "--detach", is_flag=True, help="Run in the background once ready (log in the runtime dir)."
)
@metrics_option
def start(
    config_path: str | None,
    signal_url: tuple[str, ...],
    device: str | None,
    token: str | None,
    token_file: str | None,
    exposes: tuple[str, ...],
    stun_urls: tuple[str, ...],
    turn_urls: tuple[str, ...],
    turn_user: str | None,
    turn_password: str | None,
    ice_hosts: tuple[str, ...],
    keepalive: float | None,
    ice_policy: str | None,
    pool_size: int | None,
    runtime_dir: str | None,
    detach: bool,
    metrics: tuple[str, int] | None,
) -> None:
    """Run the supervisor: host one device (flags) or several (--config), one worker per session.

    Runs in the foreground; SIGTERM or Ctrl-C stops it as `tunnelctl stop` does.
    """
    import dataclasses

    from protocol.ice import IceServer
    from supervisor.config import config_from_flags, load_config
    from supervisor.errors import ConfigError, SupervisorError

    if config_path:
        if signal_url or device or exposes or token or token_file:
            raise click.UsageError(
                "give either --config or --signal/--device/--token/--expose, not both"
            )
        try:
            config = load_config(config_path, os.environ)
        except ConfigError as exc:
            # Key-path errors name no file; file-level errors already do.
            raise click.UsageError(f"{config_path}: {exc}" if exc.path else str(exc)) from None
    else:
        missing = [
            n
            for n, v in (("--signal", signal_url), ("--device", device), ("--expose", exposes))
            if not v
        ]
        if missing:
            raise click.UsageError(f"missing {', '.join(missing)} (or use --config FILE)")
        assert device is not None
        hosts = [h.strip() for spec in ice_hosts for h in spec.split(",") if h.strip()]
        try:
            ice = [IceServer(url) for url in stun_urls]
            ice += [IceServer(url, turn_user, turn_password) for url in turn_urls]
            config = config_from_flags(
                signal_url=signal_url,
                device=device,
                token=resolve_token(token, token_file),
                exposes=exposes,
                token_file=token_file,
                ice_servers=ice,
                ice_hosts=hosts,
            )
        except (ConfigError, ValueError) as exc:
            raise click.UsageError(str(exc)) from None
    if ice_policy is not None:
        config = dataclasses.replace(config, ice_policy=ice_policy)  # type: ignore[arg-type]
    if pool_size is not None:
        config = dataclasses.replace(config, pool_size=pool_size)
    if keepalive is not None:
        config = dataclasses.replace(config, keepalive=keepalive)
    if metrics is not None:
        config = dataclasses.replace(config, metrics=metrics)
    where = resolve_runtime_dir(runtime_dir)
    if detach:
        sys.exit(detach_supervisor(where))

    from supervisor.supervisor import Supervisor

    async def serve() -> int:
        supervisor = Supervisor(config, where, on_ready=ready)
        try:
            await supervisor.run()
        except SupervisorError as exc:
            return error_line(str(exc))
        return 0

    sys.exit(asyncio.run(serve()))


def detach_supervisor(runtime_dir: Path) -> int:
    """Re-run this `start` in the background; return 0 once *that* child is ready.

    Ready means the control endpoint answers with ``ready`` and the child's own
    pid: a supervisor already running in the directory answers too, and the
    child then exits with its error, which is printed (exit code 1).
    """
    import subprocess
    import time

    from supervisor.control import request
    from supervisor.errors import ControlError, SupervisorError
    from supervisor.runtime import LOG_FILE, prepare_runtime_dir

    try:
        prepare_runtime_dir(runtime_dir)
    except SupervisorError as exc:
        return error_line(str(exc))
    argv = [a for a in sys.argv[1:] if a != "--detach"]
    log_path = runtime_dir / LOG_FILE
    with open(log_path, "ab") as log_file:
        start_of_log = log_file.tell()
        child = subprocess.Popen(
            [sys.executable, "-m", "tunnelctl", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            env={**os.environ, "TUNNEL_RUNTIME_DIR": str(runtime_dir)},
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if child.poll() is not None:
            why = _child_error(log_path, start_of_log) or f"exited with {child.returncode}"
            return error_line(f"the supervisor did not start: {why} (log: {log_path})")
        try:
            status = request(runtime_dir, "status", timeout=1.0)
        except ControlError:
            time.sleep(0.2)  # polling a process we just started: no event to wait on
            continue
        if isinstance(status, dict) and status.get("ready") and status.get("pid") == child.pid:
            click.echo(f"started pid={child.pid} runtime={runtime_dir} log={log_path}")
            return 0
        time.sleep(0.2)
    return error_line(f"the supervisor did not become ready in 60 s; see {log_path}")


def _child_error(log_path: Path, offset: int) -> str | None:
    """The last ``tunnelctl: error:`` line the detached child wrote, without the prefix."""
    prefix = "tunnelctl: error: "
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(offset)
            written = log_file.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return None
    errors = [line for line in written.splitlines() if line.startswith(prefix)]
    return errors[-1].removeprefix(prefix) if errors else None


def control_request(
    runtime_dir: str | None, cmd: str, args: dict[str, object] | None = None, timeout: float = 5.0
) -> object:
    """One control round trip; exit with a clear line if no supervisor answers."""
    from supervisor.control import request
    from supervisor.errors import ControlError, NotRunning

    try:
        return request(resolve_runtime_dir(runtime_dir), cmd, args, timeout=timeout)
    except ControlError as exc:
        code = EXIT_NOT_RUNNING if isinstance(exc, NotRunning) else 1
        error_line(str(exc))
        sys.exit(code)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output (README: Supervisor JSON)."
)
@runtime_dir_option
def status(as_json: bool, runtime_dir: str | None) -> None:
    """Show the supervisor: devices, signaling links, worker pool. Exit 3 if it is not running."""
    result = control_request(runtime_dir, "status")
    assert isinstance(result, dict)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    click.echo(
        f"supervisor pid {result['pid']}, {result['state']}, up {result['uptime_s']:.0f} s, "
        f"runtime {result['runtime_dir']}"
    )
    pool = result["pool"]
    click.echo(
        f"workers: {pool['idle']} idle (target {pool['target']}), {pool['busy']} busy, "
        f"{pool['spawning']} starting; sessions: {result['sessions']}"
    )
    for d in result["devices"]:
        click.echo(
            f"device {d['id']}: link {d['link']}, {d['state']}, {d['sessions']} session(s), "
            f"services {', '.join(d['services'])}"
        )


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output (README: Supervisor JSON)."
)
@runtime_dir_option
def sessions(as_json: bool, runtime_dir: str | None) -> None:
    """List sessions: state, worker pid, bytes, streams, restarts, path."""
    result = control_request(runtime_dir, "sessions")
    assert isinstance(result, list)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    header = (
        f"{'SESSION':<24} {'DEVICE':<12} {'CLIENT':<12} {'STATE':<9} {'PID':>7} {'AGE':>7} "
        f"{'IN':>10} {'OUT':>10} {'STR':>4} {'RST':>3} PATH"
    )
    click.echo(header)
    for r in result:
        click.echo(
            f"{r['id'][:24]:<24} {r['device'][:12]:<12} {r['client'][:12]:<12} "
            f"{r['state']:<9} {r['worker_pid'] or '-':>7} {r['age_s']:>6.0f}s "
            f"{r['bytes_in']:>10} {r['bytes_out']:>10} {r['streams']:>4} {r['restarts']:>3} "
            f"{_path_text(r)}"
        )


def _path_text(row: dict[str, Any]) -> str:
    """``relay (srflx/relay, udp)``, ``direct (host/host)`` or ``-``."""
    if not row.get("path"):
        return "-"
    details = ", ".join(str(v) for v in (row.get("pair"), row.get("relay_transport")) if v)
    return f"{row['path']} ({details})" if details else str(row["path"])


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("session")
@runtime_dir_option
def kill(session: str, runtime_dir: str | None) -> None:
    """End one session (its client is told; other sessions are untouched)."""
    control_request(runtime_dir, "kill", {"session": session})
    click.echo(f"killed {session}")


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="S",
    help="Seconds to let open streams finish [default: the supervisor's, 10].",
)
@runtime_dir_option
def stop(drain_timeout: float | None, runtime_dir: str | None) -> None:
    """Stop the supervisor gracefully: refuse new sessions, drain streams, end workers."""
    import time

    from supervisor.runtime import CONTROL_SOCKET

    args: dict[str, object] = {} if drain_timeout is None else {"drain_timeout": drain_timeout}
    where = resolve_runtime_dir(runtime_dir)
    control_request(runtime_dir, "stop", args)
    # Wait for it to finish: its control socket disappears as it exits.
    deadline = time.monotonic() + (drain_timeout if drain_timeout is not None else 10.0) + 30
    while (where / CONTROL_SOCKET).exists():
        if time.monotonic() > deadline:
            sys.exit(error_line("the supervisor is still stopping"))
        time.sleep(0.1)  # the socket file is the event; no notification exists for it
    click.echo("stopped")


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
@keepalive_option
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
    keepalive: float | None,
    ice_policy: str | None,
) -> None:
    """Forward a local TCP port to SERVICE on DEVICE (like ssh -L)."""
    from protocol.frames import is_valid_service_name
    from protocol.ice import DEFAULT_KEEPALIVE
    from signaling.link import TokenSource, token_file_source
    from workers.client import ClientTunnel, PortForward
    from workers.errors import TunnelError

    jwt: str | TokenSource = resolve_token(token, token_file)
    if token_file:  # re-read when the link reconnects: a refreshed token
        jwt = token_file_source(token_file, resolve_token(token, token_file))
    if not is_valid_service_name(service):
        raise click.UsageError(f"bad service name {service!r}")
    listen_host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise click.UsageError(f"bad --listen {listen!r}: expected HOST:PORT")
    listen_host = listen_host.strip("[]") or "127.0.0.1"
    ice = build_ice(stun_urls, turn_urls, turn_user, turn_password, ice_hosts)

    async def serve() -> int:
        tunnel = ClientTunnel(
            signal_url=signal_url,
            device=device,
            token=jwt,
            ice_servers=ice,
            keepalive=DEFAULT_KEEPALIVE if keepalive is None else keepalive,
            ice_policy="relay" if ice_policy == "relay" else "all",
        )
        forward = PortForward(tunnel, service, listen_host, int(port_text))
        try:
            await tunnel.open()
            host, port = await forward.start()
            opened = (tunnel.open_seconds or 0) * 1000
            path = tunnel.peer.nominated_path() if tunnel.peer else None
            ready(
                f"forwarding {host}:{port} -> {device}/{service} "
                f"(DataChannel open in {opened:.0f} ms, {path or 'unknown path'})"
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
