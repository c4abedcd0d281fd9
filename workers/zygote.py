"""The pre-loaded parent that forks worker processes (a "fork server").

Booting Python and importing aiortc takes about a second and ~65 MiB per
process; forking a parent that has already imported everything takes
milliseconds, and the children share the parent's pages copy-on-write
(``gc.freeze()`` keeps the collector from touching, and so copying, them):
measured here, ~13 MiB PSS per idle forked worker against ~66 MiB spawned.

The supervisor starts this module (it never imports aiortc itself) and speaks
to it over its stdin/stdout, one ASCII line per message: ``config`` and
``spawn`` in, ``ready``, ``spawned``, ``exited`` and ``error`` out
(:mod:`protocol.forkserver`, PROTOCOL.md §5). ``config`` may be sent again
(fresh TURN credentials): workers forked after it use the new settings; with it,
each idle worker prepares its PeerConnection and offer before any session asks
(see ``session_worker``).

The zygote holds no event loop, thread or ZeroMQ context when it forks, so each
child starts clean and makes its own. It dies with the supervisor (parent-death
signal); its children do not: they watch the supervisor themselves, so a zygote
crash never takes a session down.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import selectors
import signal
import sys
from typing import TYPE_CHECKING

from protocol.forkserver import (
    MAX_LINE,
    Configure,
    Exited,
    ForkServerLineError,
    Ready,
    Refused,
    Report,
    Spawned,
    decode_command,
    encode_report,
)
from protocol.ice import DEFAULT_KEEPALIVE

if TYPE_CHECKING:
    from protocol.ice import IceConfig

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _say(report: Report) -> None:
    with contextlib.suppress(BrokenPipeError):
        os.write(1, encode_report(report))


def _fork_worker(worker_id: str, args: argparse.Namespace, ice: IceConfig | None) -> int:
    pid = os.fork()
    if pid:
        return pid
    # The child: forget the zygote's plumbing, then become a worker.
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        from workers.session_worker import worker_main

        code = worker_main(
            worker_id,
            args.endpoint,
            args.supervisor_pid,
            args.heartbeat_interval,
            args.heartbeat_timeout,
            args.log_level,
            ice,
            args.stack_log_level,
            args.keepalive,
        )
    except BaseException as exc:  # a worker must never return into the zygote's loop
        with contextlib.suppress(Exception):
            print(f"worker {worker_id} crashed: {exc!r}", file=sys.stderr)
    finally:
        os._exit(code)


def _warm_up() -> None:
    """Build and close one PeerConnection before forking.

    aiortc's first certificate and first DTLS context initialise cryptography
    and pyOpenSSL lazily; done here once, that is shared by every child instead
    of costing each session ~35 ms. The event loop is closed again: nothing of
    it survives the fork.
    """
    import asyncio

    from aiortc import RTCPeerConnection

    from workers.ice import rtc_configuration
    from workers.peer import warm_up_crypto

    warm_up_crypto()

    async def build() -> None:
        pc = RTCPeerConnection(rtc_configuration([]))
        pc.createDataChannel("warm-up")
        await pc.close()

    asyncio.run(build())


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _say(Exited(pid, os.waitstatus_to_exitcode(status)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.zygote")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--supervisor-pid", type=int, required=True)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--keepalive", type=float, default=DEFAULT_KEEPALIVE)
    parser.add_argument("--log-level", type=int, default=20, help="workers' (logging levels)")
    parser.add_argument("--stack-log-level", type=int, default=30, help="aiortc's and aioice's")
    args = parser.parse_args(argv)

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    # Load everything a worker needs before the first fork.
    import workers.session_worker  # noqa: F401

    _warm_up()
    gc.collect()
    gc.freeze()

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ, "stdin")
    selector.register(wake_r, selectors.EVENT_READ, "wake")
    _say(Ready(os.getpid()))
    pending = b""
    ice: IceConfig | None = None
    while True:
        for key, _ in selector.select():
            if key.data == "wake":
                os.read(wake_r, 4096)
                _reap()
                continue
            chunk = os.read(0, 4096)
            if not chunk:
                return 0  # the supervisor closed our stdin: its workers live on
            pending += chunk
            while b"\n" in pending:
                raw, pending = pending.split(b"\n", 1)
                try:
                    command = decode_command(raw)
                except ForkServerLineError as exc:
                    _say(Refused(str(exc)))
                    continue
                if isinstance(command, Configure):
                    ice = command.ice
                    continue
                try:
                    pid = _fork_worker(command.worker, args, ice)
                except OSError as exc:
                    _say(Refused(f"cannot fork: {exc.strerror}"))
                    continue
                _say(Spawned(command.worker, pid))
            if len(pending) > MAX_LINE:
                pending = b""
                _say(Refused("line too long"))


if __name__ == "__main__":
    sys.exit(main())
