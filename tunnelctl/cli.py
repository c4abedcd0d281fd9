"""The ``tunnelctl`` command line: the composition root of the other packages.

Contract for scripts: errors are one line on stderr (``tunnelctl: error: ...``)
and a non-zero exit: 2 for usage errors (bad flags or config, every verb), 1 for
everything else, 3 for ``status`` when nothing runs. Long-running
verbs print one readiness line on stdout (``listening ...``, ``registered ...``,
``forwarding ...``) once they serve; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
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


def run_until_signal(
    main_coro: Callable[[], Coroutine[Any, Any, int]], *, data_path: bool = False
) -> int:
    """Run ``main_coro`` until it returns or SIGINT/SIGTERM cancels it (exit 0).

    ``data_path``: the process carries tunnel traffic, so it runs on
    :mod:`aio.loop`'s loop (uvloop where it imports).
    """

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

    if data_path:
        from aio.loop import run

        return run(runner())
    return asyncio.run(runner())


# -- the command group --------------------------------------------------------


class OneLineErrors(click.Group):
    """A group whose usage errors are the one line of every other error (exit 2)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "tunnelctl"
            error_line(f"{exc.format_message().rstrip('.')} (see: {where} --help)")
            sys.exit(2)
        except click.ClickException as exc:
            error_line(exc.format_message())
            sys.exit(exc.exit_code)
        except click.Abort:
            error_line("aborted")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=OneLineErrors, context_settings=CONTEXT_SETTINGS)
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
    envvar="TUNNEL_REDIS",
    show_envvar=True,
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
@click.option(
    "--client",
    "of_clients",
    is_flag=True,
    help="Show the running `connect` clients instead: sessions, forwards, path, bytes.",
)
@runtime_dir_option
def status(as_json: bool, of_clients: bool, runtime_dir: str | None) -> None:
    """Show the supervisor: devices, signaling links, worker pool. Exit 3 if it is not running.

    With --client: every running `tunnelctl connect` of this user (exit 3 if none).
    """
    if of_clients:
        sys.exit(client_status(runtime_dir, as_json))
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


def client_status(runtime_dir: str | None, as_json: bool) -> int:
    from workers.handoff import statuses

    where = clients_dir(runtime_dir)
    results = [reply.result for _, reply in statuses(where) if reply.ok]
    if as_json:
        click.echo(json.dumps(results, indent=2, sort_keys=True))
    for client in [] if as_json else results:
        click.echo(
            f"client pid {client['pid']}, up {client['uptime_s']:.0f} s, "
            f"signal {' '.join(client['signal'])}"
        )
        for d in client["devices"]:
            click.echo(
                f"  device {d['device']}: {d['state']}, {_path_text(d)}, "
                f"session {d['session'] or '-'}, in {d['bytes_in']} B, out {d['bytes_out']} B, "
                f"{d['streams']} stream(s), {d['reconnects']} reconnect(s)"
                + (f", error: {d['error']}" if d["error"] else "")
            )
            for f in d["forwards"]:
                click.echo(f"    forward {f['listen']} -> {d['device']}/{f['service']}")
    if not results:
        if not as_json:
            error_line(f"no tunnelctl connect running (nothing answers in {where})")
        return EXIT_NOT_RUNNING
    return 0


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


#: The client's control sockets live here, under the runtime directory.
CLIENTS_DIR = "clients"


def clients_dir(runtime_dir: str | None) -> Path:
    return resolve_runtime_dir(runtime_dir) / CLIENTS_DIR


def token_role(token: str) -> str | None:
    """The ``role`` claim of a JWT, read without verifying it (only to word errors)."""
    import base64

    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    role = claims.get("role") if isinstance(claims, dict) else None
    return role if isinstance(role, str) else None


def require_client_token(token: str) -> None:
    if token_role(token) == "device":
        raise click.UsageError(
            "this token is a device token (for `tunnelctl start`); connect needs a client "
            "token: tunnelctl token --role client --sub NAME --device ID"
        )


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--config", "config_path", metavar="FILE", help="Client TOML config (several devices)."
)
@click.option(
    "--signal",
    "signal_urls",
    multiple=True,
    metavar="URL",
    envvar="TUNNEL_SIGNAL",
    show_envvar=True,
    help="Signaling server, e.g. wss://signal.example.net/signal (repeatable).",
)
@click.option(
    "--device", metavar="ID", envvar="TUNNEL_DEVICE", show_envvar=True, help="Device to reach."
)
@token_options
@click.option(
    "--forward",
    "forwards",
    multiple=True,
    metavar="NAME=HOST:PORT",
    help="Forward local HOST:PORT to service NAME on the device (repeatable; one session "
    "carries them all), e.g. ssh=127.0.0.1:2222.",
)
@click.option(
    "--service",
    "services",
    multiple=True,
    metavar="NAME",
    help="Service on the device, forwarded from --listen, or carried on stdin/stdout "
    "with --stdio. Once.",
)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Local address for --service [default: 127.0.0.1:0, a free port].",
)
@click.option(
    "--stdio",
    is_flag=True,
    help="Carry one stream to --service on stdin/stdout (ssh ProxyCommand); uses a running "
    "client's session for the device when there is one.",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    is_flag=False,
    flag_value=math.inf,
    default=None,
    metavar="[SECONDS]",
    help="Wait for an offline device (for ever, or SECONDS) instead of exiting 1.",
)
@runtime_dir_option
@ice_options
@keepalive_option
def connect(
    config_path: str | None,
    signal_urls: tuple[str, ...],
    device: str | None,
    token: str | None,
    token_file: str | None,
    forwards: tuple[str, ...],
    services: tuple[str, ...],
    listen: str | None,
    stdio: bool,
    wait: float | None,
    runtime_dir: str | None,
    stun_urls: tuple[str, ...],
    turn_urls: tuple[str, ...],
    turn_user: str | None,
    turn_password: str | None,
    ice_hosts: tuple[str, ...],
    keepalive: float | None,
    ice_policy: str | None,
) -> None:
    """Forward local TCP ports to services on devices (like ssh -L), or one stream on stdio.

    \b
    Exit codes: 0 stopped by SIGINT/SIGTERM (or the --stdio stream ended cleanly);
    1 a failure (signaling server unreachable or refusing, device offline without
    --wait, unknown service, a busy port, the session lost for good); 2 usage error.
    """
    if len(services) > 1:
        raise click.UsageError(
            "--service given more than once; forward several services with "
            "--forward NAME=HOST:PORT (repeatable)"
        )
    service = services[0] if services else None
    if stdio:
        if service is None or forwards or listen or config_path:
            raise click.UsageError(
                "--stdio carries one --service; no --forward, --listen, --config"
            )
        if device is None:
            raise click.UsageError("--stdio needs --device ID (or TUNNEL_DEVICE)")
        from tunnelctl.entry import stdio_handoff

        handed_off = stdio_handoff(runtime_dir, device, service)
        if handed_off is not None:
            sys.exit(handed_off)
    from workers.client_config import ClientPlan, DeviceForwards, Forward, forwards_of, parse_listen

    ice = build_ice(stun_urls, turn_urls, turn_user, turn_password, ice_hosts)
    if config_path:
        given = [
            flag
            for flag, v in (
                ("--signal", signal_urls),
                ("--device", device),
                ("--token/--token-file", token or token_file),
                ("--forward", forwards),
                ("--service", service),
                ("--listen", listen),
            )
            if v
        ]
        if given:
            raise click.UsageError(f"give either --config or {', '.join(given)}, not both")
        plan, jwt_text, file_token = client_plan_from_file(config_path, ice)
    else:
        if device is None:
            raise click.UsageError("missing --device ID (or TUNNEL_DEVICE, or --config FILE)")
        if listen and service is None:
            raise click.UsageError("--listen goes with --service NAME")
        if not (forwards or service):
            raise click.UsageError(
                "nothing to forward: give --forward NAME=HOST:PORT, --service NAME "
                "[--listen HOST:PORT] or --service NAME --stdio"
            )
        jwt_text = resolve_token(token, token_file)
        file_token = Path(token_file) if token_file else None
        try:
            fwds = forwards_of(forwards)
            if service is not None and not stdio:
                fwds += (Forward(service, *parse_listen(listen or "127.0.0.1:0")),)
            plan = ClientPlan(
                signal_urls=signal_urls,
                devices=(DeviceForwards(device, fwds),),
                ice_servers=tuple(ice),
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    require_client_token(jwt_text)
    import dataclasses

    plan = dataclasses.replace(
        plan,
        wait=wait,
        keepalive=plan.keepalive if keepalive is None else keepalive,
        ice_policy="relay" if (ice_policy or plan.ice_policy) == "relay" else "all",
    )
    from signaling.link import TokenSource, token_file_source

    jwt: str | TokenSource = jwt_text
    if file_token is not None:  # re-read when the link reconnects: a refreshed token
        jwt = token_file_source(file_token, jwt_text)
    if stdio:
        assert service is not None
        if not verbose_logging():
            logging.getLogger("tunnelctl").setLevel(logging.WARNING)  # stderr is the user's ssh
        sys.exit(run_until_signal(lambda: stdio_session(plan, jwt, service), data_path=True))
    control = client_control_path(runtime_dir)
    sys.exit(run_until_signal(lambda: serve_client(plan, jwt, control), data_path=True))


def client_plan_from_file(path: str, ice: list[Any]) -> tuple[Any, str, Path | None]:
    from supervisor.errors import ConfigError
    from tunnelctl.client_config import load_client_config
    from workers.ice import parse_networks, restrict_host_addresses

    try:
        loaded = load_client_config(path, os.environ, ice_servers=tuple(ice))
        if loaded.ice_hosts:
            restrict_host_addresses(parse_networks(list(loaded.ice_hosts)))
    except ConfigError as exc:
        raise click.UsageError(f"{path}: {exc}" if exc.path else str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(f"{path}: ice_hosts: {exc}") from None
    return loaded.plan, loaded.token, loaded.token_file


def verbose_logging() -> bool:
    return logging.getLogger("tunnelctl").level <= logging.DEBUG


def client_control_path(runtime_dir: str | None) -> Path | None:
    """Where this client's control endpoint listens (None, with a warning, if it cannot)."""
    from supervisor.errors import SupervisorError
    from supervisor.runtime import prepare_runtime_dir
    from workers.handoff import endpoint_path

    try:
        where = prepare_runtime_dir(clients_dir(runtime_dir))
    except SupervisorError as exc:
        raise click.UsageError(str(exc)) from None
    return endpoint_path(where, os.getpid())


async def serve_client(plan: Any, jwt: Any, control: Path | None) -> int:
    from workers.client_app import ClientApp
    from workers.errors import TunnelError

    app = ClientApp(plan, jwt, control_path=control, on_ready=ready)
    try:
        return error_line(str(await app.run()))
    except TunnelError as exc:
        return error_line(str(exc))
    finally:
        await app.close()


async def stdio_session(plan: Any, jwt: Any, service: str) -> int:
    from workers.client_app import ClientApp
    from workers.errors import TunnelError

    app = ClientApp(plan, jwt, on_ready=lambda line: log.debug("%s", line))
    try:
        return await app.serve_stdio(service)
    except TunnelError as exc:
        return error_line(str(exc))
    finally:
        await app.close()


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--signal",
    "signal_urls",
    multiple=True,
    required=True,
    metavar="URL",
    envvar="TUNNEL_SIGNAL",
    show_envvar=True,
    help="Signaling server, e.g. wss://signal.example.net/signal (repeatable).",
)
@token_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def devices(
    signal_urls: tuple[str, ...], token: str | None, token_file: str | None, as_json: bool
) -> None:
    """List the devices your client token may reach, online or not, and their services."""
    from protocol.signaling import DeviceInfo
    from signaling.discovery import DeviceQuery, list_devices
    from signaling.errors import LinkDown, LinkRejected
    from signaling.link import SignalingLink

    jwt = resolve_token(token, token_file)
    require_client_token(jwt)

    async def query() -> tuple[DeviceInfo, ...] | str:
        answer = DeviceQuery()
        link = SignalingLink(signal_urls, jwt, answer.take, fail_fast=True)
        link.start()
        try:
            await link.wait_up(30.0)
            return await list_devices(link, answer)
        except (LinkDown, LinkRejected) as exc:
            return str(exc)
        finally:
            await link.close()

    found = asyncio.run(query())
    if isinstance(found, str):
        sys.exit(error_line(found))
    if as_json:
        click.echo(json.dumps([info.to_wire() for info in found], indent=2, sort_keys=True))
        return
    click.echo(f"{'DEVICE':<24} {'STATE':<8} SERVICES")
    for info in found:
        state = "online" if info.online else "offline"
        click.echo(f"{info.device:<24} {state:<8} {', '.join(info.services) or '-'}")


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
