#!/usr/bin/env python3
"""Benchmark: session set-up time and memory per session of the supervisor.

    uv run python scripts/bench.py [--sessions 20] [--memory-sessions 50] [--json FILE] [--quick]

Everything runs on this machine, on 127.0.0.1 only: a signaling server
(``tunnelctl signal``), supervisors (``tunnelctl start --config``) and the
clients, which live in this process (:class:`workers.client.ClientTunnel`, ICE
restricted to 127.0.0.1). One run measures:

1. **Session set-up time**, from the client's session request to its
   DataChannel being open (``ClientTunnel.open_seconds``), over N sequential
   sessions (open, record, close, then wait until the supervisor shows the
   session ended and its worker process gone before the next), for

   * ``warm``: a supervisor with ``pool_size = 2`` (idle pre-forked workers);
   * ``cold``: a supervisor with ``pool_size = 0`` (a worker forked per session);
   * ``bare``: two aiortc ``RTCPeerConnection`` objects in this process, offer
     and answer handed over directly, from ``createDataChannel`` to both ends
     open: the floor that WebRTC itself sets.

   The three kinds take turns (the order rotates each round) so that a change
   in the machine's load hits all of them alike; one untimed session of each
   kind runs first (``--warmup``). Reported: p50, p90 (inclusive
   interpolation), min, max, and warm_p50 / bare_p50 (the goal is <= 1.5) and
   cold_p50 / bare_p50. ``spawn`` is a reference: the wall time of a fresh
   ``python -c "import aiortc, zmq, workers.session_worker"`` (p50 of 5), what
   each session would pay without the fork server.

2. **Memory**: M sessions requested at once on the warm supervisor and kept
   open. The signaling server lets at most 16 sessions negotiate with one
   device (PROTOCOL.md §1.5); a request it refuses with ``too_many_sessions``
   is asked again once another session has finished negotiating, and the
   refusals are reported. Then PSS and RSS (``/proc/PID/smaps_rollup``) of every
   worker serving a session, of the idle pool, of the fork server and of the
   supervisor. PSS shares each copy-on-write page among the processes that map
   it, so the sum of PSS is what the set really costs; RSS counts shared pages
   in full in every process and is shown for contrast. The goal is <= 25 MiB
   PSS per session.

3. The machine: CPU count, Python, load average at the start and the end. The
   machine may be shared: read the numbers with the load average in mind.

The run does not stop at a failed session. At the end it lists **failures**
(a session that did not open, a worker still alive after its session or its
supervisor, a session the supervisor counted as crashed, error lines in a
child's log) and **observations** about the system under test that are not
failures (warning lines the children logged, grouped, with ids masked;
refusals; non-zero supervisor counters). Exit code: 1 if there was any
failure, else 0. Every wait has a deadline; every process started here is
stopped by pid at the end (``--keep-logs DIR`` keeps their full stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.server
import json
import logging
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from aiortc import RTCDataChannel, RTCPeerConnection

from aio.loop import loop_name
from harness import Child, ChildFailed
from signaling.auth import issue_token
from supervisor.control import request as control_request
from supervisor.errors import ControlError
from workers.client import ClientTunnel
from workers.errors import SessionFailed
from workers.ice import parse_networks, restrict_host_addresses, rtc_configuration
from workers.peer import CHANNEL_PROTOCOL, DEFAULT_LABEL

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
MIB = 1024 * 1024

READY_TIMEOUT = 30.0  # a child printing its readiness line
OPEN_TIMEOUT = 30.0  # one session's set-up
CLOSE_TIMEOUT = 10.0  # one session's close (client side)
SETTLE_TIMEOUT = 15.0  # the supervisor showing a closed session as ended
MEMORY_OPEN_TIMEOUT = 120.0  # M sessions opened at once
SPAWN_TIMEOUT = 60.0  # one fresh interpreter importing aiortc
POLL = 0.02  # between two control requests while waiting for a state
WARM_POOL = 2
GOAL_WARM_RATIO = 1.5
GOAL_PSS_MIB = 25.0
SPAWN_RUNS = 5
SPAWN_IMPORTS = "import aiortc, zmq, workers.session_worker"
ENDED_STATES = ("exited", "fatal")
PROBLEM_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|crashed")


class BenchError(RuntimeError):
    """The benchmark cannot go on (a child did not start, a deadline passed)."""


# -- processes ----------------------------------------------------------------------------


class LoggedChild(Child):
    """A :class:`Child` that also keeps every warning or error line it logs (bounded)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None,
        name: str,
        log_file: Path | None = None,
    ) -> None:
        self.log_counts: dict[str, int] = {}  # warning/error lines, ids masked -> count
        self.log_file = log_file
        super().__init__(argv, env=env, name=name)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(self.log_file.open("a")) if self.log_file else None
            for line in self.proc.stderr:
                if log is not None:
                    log.write(line)
                    log.flush()
                self._keep(line.rstrip("\n"))

    def _keep(self, line: str) -> None:
        self.stderr_lines.append(line)
        del self.stderr_lines[:-200]
        if PROBLEM_LINE.search(line):
            key = mask_ids(line)
            if key in self.log_counts or len(self.log_counts) < 200:
                self.log_counts[key] = self.log_counts.get(key, 0) + 1

    def take_log_findings(self) -> tuple[list[str], list[str]]:
        """The warning/error lines logged since the last call, grouped: (errors, warnings)."""
        errors: list[str] = []
        warnings: list[str] = []
        for line, n in sorted(self.log_counts.items(), key=lambda kv: -kv[1]):
            entry = f"{self.name} logged {n} x: {line}"
            (warnings if " WARNING " in f" {line} " else errors).append(entry)
        self.log_counts.clear()
        return errors, warnings


_MASKS = (
    (re.compile(r"^\d\d:\d\d:\d\d "), ""),
    (re.compile(r"\bw-[0-9a-f]{16}\b"), "w-<id>"),
    (re.compile(r"\[\d+\]"), "[<pid>]"),
    (re.compile(r"\bpid \d+"), "pid <pid>"),
    (re.compile(r"\(\d+ so far\)"), "(<n> so far)"),
    (re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{22}(?![A-Za-z0-9_-])"), "<session>"),
)


def mask_ids(line: str) -> str:
    """A log line with its time, pids, worker and session ids masked, to group repeats."""
    for pattern, replacement in _MASKS:
        line = pattern.sub(replacement, line)
    return line


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """The device's one service; sessions are opened, never used, so it only has to exist."""

    def do_GET(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Supervisor:
    name: str
    device: str
    pool_size: int
    runtime: Path
    child: LoggedChild
    pids_seen: set[int] = field(default_factory=set)
    stopped: bool = False

    async def control(self, cmd: str) -> Any:
        return await asyncio.to_thread(control_request, self.runtime, cmd, timeout=5.0)

    async def status(self) -> dict[str, Any]:
        status = await self.control("status")
        assert isinstance(status, dict)
        for worker in status["workers"]:
            self.pids_seen.add(int(worker["pid"]))
        if status.get("fork_server_pid"):
            self.pids_seen.add(int(status["fork_server_pid"]))
        return status

    async def session_row(self, session: str) -> dict[str, Any] | None:
        rows = await self.control("sessions")
        assert isinstance(rows, list)
        return next((r for r in rows if r["id"] == session), None)


@dataclass
class Bench:
    """The shared pieces of one run: the signaling server, the secret, the service."""

    workdir: Path
    secret: str
    signal_url: str
    service_port: int
    children: list[LoggedChild]
    problems: list[str]  # failures: a session that did not open, a leak, a crash ...
    notes: list[str]  # observations about the system under test that are not failures
    log_dir: Path | None = None

    def client_token(self, sub: str, device: str) -> str:
        return issue_token(self.secret, sub=sub, role="client", devices=(device,), ttl=3600)

    def start_supervisor(
        self,
        name: str,
        pool_size: int,
        max_sessions: int,
        services: Mapping[str, str] | None = None,
    ) -> Supervisor:
        device = f"bench-{name}"
        runtime = self.workdir / f"run-{name}"
        config = self.workdir / f"{name}.toml"
        token = issue_token(self.secret, sub=device, role="device", ttl=3600)
        config.write_text(
            "\n".join(
                [
                    f'signal = "{self.signal_url}"',
                    f'ice_hosts = ["{LOOPBACK}"]',
                    "[supervisor]",
                    f"pool_size = {pool_size}",
                    f"max_sessions = {max_sessions}",
                    "[[devices]]",
                    f'id = "{device}"',
                    f'token = "{token}"',
                    "[devices.services]",
                    *(
                        f'{key} = "{url}"'
                        for key, url in (
                            services or {"web": f"http://{LOOPBACK}:{self.service_port}"}
                        ).items()
                    ),
                    "",
                ]
            )
        )
        child = LoggedChild.tunnelctl(
            ["start", "--config", str(config), "--runtime-dir", str(runtime)],
            env=None,
            name=f"supervisor {name}",
            log_file=self.log_dir / f"supervisor-{name}.log" if self.log_dir else None,
        )
        self.children.append(child)
        child.wait_line("ready ", READY_TIMEOUT)
        sup = Supervisor(name, device, pool_size, runtime, child)
        sup.pids_seen.add(child.pid)
        return sup


def fresh_interpreter_seconds(runs: int) -> list[float]:
    """Wall time of a new interpreter importing what a worker needs (no fork server)."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", SPAWN_IMPORTS],
            cwd=ROOT,
            check=True,
            timeout=SPAWN_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        samples.append(time.perf_counter() - started)
    return samples


def read_memory(pid: int) -> dict[str, float] | None:
    """PSS and RSS of ``pid`` in MiB from ``/proc/PID/smaps_rollup`` (None if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss"):
            values[key.lower() + "_mib"] = int(rest.split()[0]) * 1024 / MIB
    return values


def resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def wait_pids_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait (on pidfds) until the processes exit; return those still alive at the deadline."""
    loop = asyncio.get_running_loop()
    waiting: dict[int, asyncio.Future[None]] = {}
    fds: dict[int, int] = {}
    for pid in set(pids):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        fds[pid] = fd
        future: asyncio.Future[None] = loop.create_future()
        waiting[pid] = future
        loop.add_reader(fd, resolve, future)
    try:
        if waiting:
            await asyncio.wait(list(waiting.values()), timeout=timeout)
        return [pid for pid, f in waiting.items() if not f.done()]
    finally:
        for fd in fds.values():
            loop.remove_reader(fd)
            os.close(fd)


async def wait_for_state(
    what: str,
    probe: Callable[[], Awaitable[bool]],
    timeout: float,
) -> None:
    """Ask ``probe`` (a control request) until it says yes; BenchError at the deadline."""
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(POLL)


# -- set-up time --------------------------------------------------------------------------


@dataclass
class Series:
    """Set-up times of one kind of session, in seconds, and what went wrong."""

    kind: str
    samples: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    prefork_hits: int = 0  # warm: sessions served by a worker that was idle before the request
    paths: dict[str, int] = field(default_factory=dict)


async def close_tunnel(tunnel: ClientTunnel, problems: list[str], label: str) -> None:
    try:
        await asyncio.wait_for(tunnel.close(), CLOSE_TIMEOUT)
    except TimeoutError:
        problems.append(f"{label}: ClientTunnel.close() took more than {CLOSE_TIMEOUT:g} s")


async def supervised_session(
    bench: Bench, sup: Supervisor, series: Series | None, index: int
) -> None:
    """One sequential session: open, record, close, wait until the supervisor is idle again.

    ``series`` None: a warm-up, nothing recorded.
    """
    label = f"{sup.name} session {index}"
    before = await sup.status()
    idle_before = {int(w["pid"]) for w in before["workers"] if w["state"] == "idle"}
    tunnel = ClientTunnel(
        signal_url=bench.signal_url,
        device=sup.device,
        token=bench.client_token(f"bench-{sup.name}", sup.device),
    )
    session: str | None = None
    worker_pid: object = None
    try:
        try:
            await asyncio.wait_for(tunnel.open(OPEN_TIMEOUT), OPEN_TIMEOUT + 5)
        except Exception as exc:
            failure = f"{label}: {type(exc).__name__}: {exc}"
            if series is not None:
                series.failures.append(failure)
            else:
                bench.problems.append(f"warm-up {failure}")
            return
        assert tunnel.open_seconds is not None and tunnel.peer is not None
        session = tunnel.peer.session_id
        if series is not None:
            series.samples.append(tunnel.open_seconds)
            nominated = tunnel.peer.nominated_path()
            path = nominated.pair if nominated else "?"
            series.paths[path] = series.paths.get(path, 0) + 1
        row = await sup.session_row(session)
        worker_pid = row["worker_pid"] if row else None
        if series is not None and worker_pid in idle_before:
            series.prefork_hits += 1
    finally:
        await close_tunnel(tunnel, bench.problems, label)
    if session is None:
        return
    if isinstance(worker_pid, int):
        sup.pids_seen.add(worker_pid)
        alive = await wait_pids_gone([worker_pid], SETTLE_TIMEOUT)
        if alive:
            bench.problems.append(
                f"{label}: worker pid {worker_pid} still running {SETTLE_TIMEOUT:g} s "
                "after the client closed the session"
            )

    async def ended() -> bool:
        row = await sup.session_row(session)
        return row is None or row["state"] in ENDED_STATES

    async def pool_full() -> bool:
        pool = (await sup.status())["pool"]
        return bool(pool["idle"] >= sup.pool_size and pool["spawning"] == 0)

    try:
        await wait_for_state(f"{label} to be shown as ended", ended, SETTLE_TIMEOUT)
        await wait_for_state(f"{sup.name}'s idle pool to refill", pool_full, SETTLE_TIMEOUT)
    except BenchError as exc:
        bench.problems.append(f"{label}: {exc}")
    row = await sup.session_row(session)
    reason = str(row.get("reason")) if row else ""
    if row is not None and ("crash" in reason or "hung" in reason):
        bench.problems.append(f"{label}: session ended as {row['state']!r}: {reason}")


async def bare_session(series: Series | None) -> None:
    """Two PeerConnections in this process; time from createDataChannel to both ends open."""
    loop = asyncio.get_running_loop()
    offerer = RTCPeerConnection(rtc_configuration([]))
    answerer = RTCPeerConnection(rtc_configuration([]))
    local_open: asyncio.Future[None] = loop.create_future()
    remote_open: asyncio.Future[None] = loop.create_future()

    def on_remote(channel: RTCDataChannel) -> None:
        # aiortc announces a remote channel once DCEP has opened it.
        if channel.protocol == CHANNEL_PROTOCOL and not remote_open.done():
            remote_open.set_result(None)

    answerer.on("datachannel", on_remote)
    try:
        started = time.perf_counter()
        channel = offerer.createDataChannel(DEFAULT_LABEL, ordered=True, protocol=CHANNEL_PROTOCOL)
        channel.on("open", lambda: resolve(local_open))
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        await offerer.setRemoteDescription(answerer.localDescription)
        await asyncio.wait_for(asyncio.gather(local_open, remote_open), OPEN_TIMEOUT)
        elapsed = time.perf_counter() - started
        if series is not None:
            series.samples.append(elapsed)
            series.paths["host/host"] = series.paths.get("host/host", 0) + 1
    except Exception as exc:
        if series is None:
            raise
        series.failures.append(f"bare session: {type(exc).__name__}: {exc}")
    finally:
        await offerer.close()
        await answerer.close()


async def measure_setup(
    bench: Bench, warm: Supervisor, cold: Supervisor, sessions: int, warmup: int
) -> dict[str, Series]:
    kinds: list[tuple[str, Callable[[Series | None, int], Awaitable[None]]]] = [
        ("bare", lambda s, i: bare_session(s)),
        ("warm", lambda s, i: supervised_session(bench, warm, s, i)),
        ("cold", lambda s, i: supervised_session(bench, cold, s, i)),
    ]
    series = {kind: Series(kind) for kind, _ in kinds}
    for i in range(warmup):
        for _, run in kinds:
            await run(None, -1 - i)
    for i in range(sessions):
        shift = i % len(kinds)
        for kind, run in kinds[shift:] + kinds[:shift]:
            await run(series[kind], i)
    return series


# -- memory -------------------------------------------------------------------------------


class MemoryOpener:
    """Open M sessions at once.

    The signaling server refuses a request beyond 16 sessions negotiating with
    one device (PROTOCOL.md §1.5, ``too_many_sessions``). Such a request is asked
    again (on a new connection) when another session has finished negotiating —
    each success wakes one waiter — or after 2 s. Refusals are counted and
    reported; any other failure is final.
    """

    def __init__(self, bench: Bench, sup: Supervisor, deadline: float) -> None:
        self.bench, self.sup, self.deadline = bench, sup, deadline
        self.tunnels: list[ClientTunnel] = []  # every one made, to close them all
        self.refused = 0
        self.slot_freed = asyncio.Condition()

    async def open(self, index: int) -> ClientTunnel | str:
        while True:
            tunnel = ClientTunnel(
                signal_url=self.bench.signal_url,
                device=self.sup.device,
                token=self.bench.client_token(f"bench-mem-{index}", self.sup.device),
            )
            self.tunnels.append(tunnel)
            wait = min(OPEN_TIMEOUT, max(0.1, self.deadline - time.monotonic()))
            try:
                await asyncio.wait_for(tunnel.open(wait), wait + 5)
            except SessionFailed as exc:
                if not str(exc).startswith("too_many_sessions") or time.monotonic() > self.deadline:
                    await self._wake_one()
                    return f"{type(exc).__name__}: {exc}"
                self.refused += 1
            except Exception as exc:
                await self._wake_one()
                return f"{type(exc).__name__}: {exc}"
            else:
                await self._wake_one()
                return tunnel
            self.tunnels.remove(tunnel)
            await close_tunnel(tunnel, self.bench.problems, f"memory session {index} (refused)")
            async with self.slot_freed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.slot_freed.wait(), 2.0)

    async def _wake_one(self) -> None:
        async with self.slot_freed:
            self.slot_freed.notify(1)


async def measure_memory(bench: Bench, sup: Supervisor, count: int) -> dict[str, Any]:
    result: dict[str, Any] = {"requested": count}
    opener = MemoryOpener(bench, sup, time.monotonic() + MEMORY_OPEN_TIMEOUT)
    try:
        started = time.perf_counter()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(opener.open(i) for i in range(count))), MEMORY_OPEN_TIMEOUT + 10
        )
        result["open_wall_s"] = time.perf_counter() - started
        opened = [o for o in outcomes if isinstance(o, ClientTunnel)]
        failures = [o for o in outcomes if isinstance(o, str)]
        result["opened"] = len(opened)
        result["refused_too_many_sessions"] = opener.refused
        if opener.refused:
            bench.notes.append(
                f"memory: the signaling server refused {opener.refused} session request(s) with "
                "too_many_sessions (at most 16 negotiating per device, PROTOCOL.md §1.5); "
                "each was asked again once another session had finished negotiating"
            )
        result["failures"] = summarize(failures)
        open_times = sorted(t.open_seconds for t in opened if t.open_seconds is not None)
        result["open_ms"] = stats_ms(open_times)
        for failure in result["failures"]:
            bench.problems.append(f"memory: {failure}")

        sessions = {t.peer.session_id for t in opened if t.peer is not None}

        async def all_running() -> bool:
            rows = await sup.control("sessions")
            running = {r["id"] for r in rows if r["state"] == "running"}
            return sessions <= running

        async def pool_settled() -> bool:
            return bool((await sup.status())["pool"]["spawning"] == 0)

        try:
            await wait_for_state("every open session to show as running", all_running, 15.0)
            await wait_for_state("the pool to finish spawning", pool_settled, SETTLE_TIMEOUT)
        except BenchError as exc:
            bench.problems.append(f"memory: {exc}")
        status = await sup.status()
        result["pool"] = status["pool"]
        if status["pool"]["idle"] > status["pool"]["target"]:
            bench.notes.append(
                f"memory: {status['pool']['idle']} idle workers with {count} sessions open, "
                f"more than pool_size = {status['pool']['target']}"
            )
        busy = [w for w in status["workers"] if w["session"] is not None]
        idle = [w for w in status["workers"] if w["session"] is None]
        served = {w["session"] for w in busy}
        if not sessions <= served:
            bench.problems.append(
                f"memory: {len(sessions - served)} open session(s) have no worker in status"
            )
        extra = served - sessions
        if extra:
            bench.problems.append(
                f"memory: {len(extra)} worker(s) hold a session no client has open "
                f"(state of those rows: {await session_states(sup, extra)})"
            )
        workers = []
        for w in busy:
            memory = read_memory(int(w["pid"]))
            if memory is not None:
                workers.append({"pid": w["pid"], "session": w["session"], **memory})
        idle_mem = [m for w in idle if (m := read_memory(int(w["pid"]))) is not None]
        fork_server = read_memory(int(status["fork_server_pid"])) or {}
        supervisor = read_memory(int(status["pid"])) or {}
        pss = [w["pss_mib"] for w in workers]
        rss = [w["rss_mib"] for w in workers]
        result.update(
            {
                "workers_measured": len(workers),
                "pss_per_session_mib": mean_max(pss),
                "rss_per_session_mib": mean_max(rss),
                "idle_workers": {
                    "count": len(idle_mem),
                    "pss_mib": sum(m["pss_mib"] for m in idle_mem),
                    "rss_mib": sum(m["rss_mib"] for m in idle_mem),
                },
                "fork_server": fork_server,
                "supervisor": supervisor,
                "total_pss_mib": sum(pss)
                + sum(m["pss_mib"] for m in idle_mem)
                + fork_server.get("pss_mib", 0.0)
                + supervisor.get("pss_mib", 0.0),
                "total_rss_mib": sum(rss)
                + sum(m["rss_mib"] for m in idle_mem)
                + fork_server.get("rss_mib", 0.0)
                + supervisor.get("rss_mib", 0.0),
                "workers": workers,
            }
        )
        result["total_pss_per_session_mib"] = (
            result["total_pss_mib"] / len(workers) if workers else None
        )
    finally:
        pids: set[int] = set()
        with contextlib.suppress(ControlError):
            pids = {int(w["pid"]) for w in (await sup.status())["workers"] if w["session"]}
        await asyncio.gather(
            *(
                close_tunnel(t, bench.problems, f"memory session {i}")
                for i, t in enumerate(opener.tunnels)
            )
        )
        alive = await wait_pids_gone(pids, SETTLE_TIMEOUT)
        if alive:
            bench.problems.append(
                f"memory: {len(alive)} worker(s) still running {SETTLE_TIMEOUT:g} s after "
                f"their clients closed: pids {sorted(alive)}"
            )
        with contextlib.suppress(ControlError):
            await check_all_ended(bench, sup, "memory")
    return result


async def check_all_ended(bench: Bench, sup: Supervisor, label: str) -> None:
    """Every client has closed: the supervisor should list no live session any more."""

    async def none_active() -> bool:
        return bool((await sup.status())["sessions"] == 0)

    try:
        await wait_for_state("every session to end", none_active, SETTLE_TIMEOUT)
    except BenchError:
        rows = await sup.control("sessions")
        live = [r for r in rows if r["state"] not in ENDED_STATES]
        shown = ", ".join(
            f"{r['id']} {r['state']} worker_pid={r['worker_pid']} age={r['age_s']:.0f}s"
            for r in live[:10]
        )
        bench.problems.append(
            f"{label}: {len(live)} session row(s) still live {SETTLE_TIMEOUT:g} s after every "
            f"client closed: {shown}"
        )


async def session_states(sup: Supervisor, sessions: set[str]) -> dict[str, int]:
    rows = await sup.control("sessions")
    states: dict[str, int] = {}
    for row in rows:
        if row["id"] in sessions:
            states[row["state"]] = states.get(row["state"], 0) + 1
    return states


def summarize(lines: Sequence[str]) -> list[str]:
    """Group identical failure lines: ``N x LINE``."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return [f"{n} x {line}" if n > 1 else line for line, n in counts.items()]


# -- the data path: throughput, request latency, chatty round trips ------------------------

PATTERN = random.Random(10).randbytes(MIB)  # incompressible, the same in every process
SMALL_BODY = b"x" * 100
ECHO_SIZE = 64
ECHO_CONNECTIONS = 10
ECHO_WARMUP = 0.3  # seconds of round trips before counting (streams opened, caches warm)
IO_TIMEOUT = 120.0  # one transfer, one request, one echo connection's first answer
DCBENCH = ROOT / "scripts" / "dcbench.py"
DCBENCH_TIMEOUT = 300.0
AGGREGATE_SESSIONS = (1, 2, 4)
_DIGESTS: dict[int, str] = {}


def pattern_chunks(size: int) -> Iterable[memoryview]:
    """``size`` bytes of :data:`PATTERN`, repeated, as slices of at most 1 MiB."""
    view = memoryview(PATTERN)
    while size > 0:
        chunk = view[: min(size, MIB)]
        size -= len(chunk)
        yield chunk


def pattern_digest(size: int) -> str:
    if size not in _DIGESTS:
        digest = hashlib.sha256()
        for chunk in pattern_chunks(size):
            digest.update(chunk)
        _DIGESTS[size] = digest.hexdigest()
    return _DIGESTS[size]


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# The services behind the device, in a process of their own (``bench.py --serve``) so
# that the load generator here and the servers there do not share one GIL.


async def serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal HTTP/1.1 keep-alive server: ``GET /bytes/N`` (N bytes of the pattern),
    ``GET /small`` (100 bytes), ``POST /sha256`` (the body's SHA-256, hex)."""
    set_nodelay(writer.get_extra_info("socket"))
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request.split(" ", 2)
            length = 0
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if method == "GET" and target.startswith("/bytes/"):
                size = int(target.removeprefix("/bytes/"))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                for chunk in pattern_chunks(size):
                    writer.write(chunk)
                    await writer.drain()
            elif method == "POST" and target == "/sha256":
                digest = hashlib.sha256()
                while length:
                    data = await reader.read(min(length, MIB))
                    if not data:
                        return
                    digest.update(data)
                    length -= len(data)
                body = digest.hexdigest().encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            elif method == "GET" and target == "/small":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + SMALL_BODY)
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


class EchoServer(asyncio.Protocol):
    """Writes back whatever it reads: the fast local service of the chatty case."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        set_nodelay(transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def serve_main() -> int:
    """``bench.py --serve``: run the HTTP and echo services until SIGTERM."""

    async def serve() -> None:
        http_server = await asyncio.start_server(serve_http, LOOPBACK, 0, limit=MIB)
        loop = asyncio.get_running_loop()
        echo_server = await loop.create_server(EchoServer, LOOPBACK, 0)
        print(
            f"serving http {http_server.sockets[0].getsockname()[1]} "
            f"echo {echo_server.sockets[0].getsockname()[1]}",
            flush=True,
        )
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, resolve, stop)
        await stop

    run_fast(serve())
    return 0


def run_fast(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on uvloop when it imports (the services must not be the bottleneck)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


# Clients, blocking (each runs in a thread of its own, sockets release the GIL).


def connect_to(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=IO_TIMEOUT)
    set_nodelay(sock)
    return sock


def read_response(sock: socket.socket, sink: Callable[[memoryview], None] | None = None) -> bytes:
    """Read one HTTP response; return its body, or feed it to ``sink`` and return b""."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(65536)
        if not data:
            raise BenchError("the connection closed before a response header")
        head += data
    head, _, rest = head.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    if status != b"200":
        raise BenchError(f"HTTP status {status.decode(errors='replace')}")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    )
    if sink is None:
        while len(rest) < length:
            data = sock.recv(65536)
            if not data:
                raise BenchError("the connection closed in the middle of a response")
            rest += data
        return rest
    sink(memoryview(rest))
    got = len(rest)
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    while got < length:
        n = sock.recv_into(view, min(MIB, length - got))
        if n == 0:
            raise BenchError(f"the connection closed after {got} of {length} bytes")
        sink(view[:n])
        got += n
    return b""


def http_download(port: int, size: int) -> float:
    """Seconds to GET ``size`` bytes from the web service at ``port``, checksum checked."""
    digest = hashlib.sha256()
    with connect_to(port) as sock:
        started = time.perf_counter()
        sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: bench\r\n\r\n" % size)
        read_response(sock, digest.update)
        elapsed = time.perf_counter() - started
    if digest.hexdigest() != pattern_digest(size):
        raise BenchError(f"download of {size} bytes through port {port}: checksum mismatch")
    return elapsed


def http_upload(port: int, size: int) -> float:
    """Seconds to POST ``size`` bytes and get the server's SHA-256 of them, checked."""
    with connect_to(port) as sock:
        started = time.perf_counter()
        sock.sendall(b"POST /sha256 HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n" % size)
        for chunk in pattern_chunks(size):
            sock.sendall(chunk)
        body = read_response(sock)
        elapsed = time.perf_counter() - started
    if body.decode() != pattern_digest(size):
        raise BenchError(f"upload of {size} bytes through port {port}: checksum mismatch")
    return elapsed


def http_requests(port: int, count: int) -> list[float]:
    """Seconds per small GET, ``count`` of them over one keep-alive connection."""
    samples = []
    request = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"
    with connect_to(port) as sock:
        for i in range(count + 10):
            started = time.perf_counter()
            sock.sendall(request)
            if read_response(sock) != SMALL_BODY:
                raise BenchError("small request: wrong body")
            if i >= 10:  # the first ones open the stream and warm the path
                samples.append(time.perf_counter() - started)
    return samples


class EchoClient(asyncio.Protocol):
    """Keeps one 64-byte request in flight: the next goes out when the answer is back."""

    def __init__(self) -> None:
        self.payload = secrets.token_bytes(ECHO_SIZE)
        self.round_trips = 0
        self.received = 0
        self.running = True
        self.first = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        set_nodelay(transport.get_extra_info("socket"))
        transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        while self.received >= ECHO_SIZE:
            self.received -= ECHO_SIZE
            self.round_trips += 1
            resolve(self.first)
            if self.running:
                self.transport.write(self.payload)

    def connection_lost(self, exc: Exception | None) -> None:
        resolve(self.lost)


async def echo_rate(port: int, seconds: float) -> float:
    """Round trips per second of :data:`ECHO_CONNECTIONS` connections, one 64-byte
    request/response in flight on each."""
    loop = asyncio.get_running_loop()
    clients: list[EchoClient] = []
    try:
        for _ in range(ECHO_CONNECTIONS):
            _, client = await loop.create_connection(EchoClient, LOOPBACK, port)
            clients.append(client)
        await asyncio.wait_for(asyncio.gather(*(c.first for c in clients)), IO_TIMEOUT)
        await asyncio.sleep(ECHO_WARMUP)
        before, started = sum(c.round_trips for c in clients), time.perf_counter()
        # A measurement window, not a synchronisation: the clients run meanwhile.
        await asyncio.sleep(seconds)
        done, elapsed = sum(c.round_trips for c in clients), time.perf_counter() - started
    finally:
        for client in clients:
            client.running = False
            client.transport.close()
    if any(c.lost.done() and c.running for c in clients):
        raise BenchError("an echo connection was lost")
    return (done - before) / elapsed


def dcbench(stack: str, test: str, *, size: int = 0, seconds: float = 0.0) -> float:
    """One figure from ``scripts/dcbench.py``: a bare DataChannel between two processes."""
    argv = [sys.executable, str(DCBENCH), "--stack", stack, "--test", test, "--json"]
    argv += ["--bytes", str(size)] if test == "throughput" else ["--seconds", f"{seconds:g}"]
    done = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DCBENCH_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise BenchError(f"dcbench --stack {stack} --test {test} exited {done.returncode}: {tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["mbps" if test == "throughput" else "rate"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class DataPath:
    """The processes of the data-path phase and the figures measured so far."""

    bench: Bench
    args: argparse.Namespace
    http_port: int
    echo_port: int
    services_pid: int
    sup: Supervisor
    web: list[int] = field(default_factory=list)  # local ports of `tunnelctl connect` to web
    echo: int = 0  # local port of the `tunnelctl connect` to echo
    connect_pids: list[int] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    async def measure(self, key: str, what: Callable[[], Awaitable[float]]) -> None:
        """Record one sample of ``key``; a failure is listed and the run goes on."""
        try:
            self.add(key, await what())
        except (BenchError, OSError, TimeoutError, subprocess.SubprocessError, ValueError) as exc:
            self.bench.problems.append(f"{key}: {type(exc).__name__}: {exc}")


def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


async def start_forward(
    bench: Bench, sup: Supervisor, service: str, token: Path
) -> tuple[int, int]:
    """Start ``tunnelctl connect`` to ``service``; return its pid and local port."""
    argv = ["connect", "--signal", bench.signal_url, "--device", sup.device]
    argv += ["--service", service, "--listen", f"{LOOPBACK}:0", "--ice-host", LOOPBACK]
    child = LoggedChild.tunnelctl(
        [*argv, "--token-file", str(token)],
        env=None,
        name=f"connect {service}",
        log_file=bench.log_dir / f"connect-{service}-{len(bench.children)}.log"
        if bench.log_dir
        else None,
    )
    bench.children.append(child)
    line = await asyncio.to_thread(child.wait_line, "forwarding ", READY_TIMEOUT)
    return child, int(line.split()[1].rpartition(":")[2])


async def measure_data_path(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Phases 3-6 of the report: DataChannels, the tunnel, direct, aggregate."""
    services = LoggedChild(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--serve"],
        env=None,
        name="services",
    )
    bench.children.append(services)
    line = await asyncio.to_thread(services.wait_line, "serving ", READY_TIMEOUT)
    _, _, http_port, _, echo_port = line.split()
    sup = await asyncio.to_thread(
        bench.start_supervisor,
        "data",
        len(AGGREGATE_SESSIONS) + 1,
        16,
        {"web": f"http://{LOOPBACK}:{http_port}", "echo": f"tcp://{LOOPBACK}:{echo_port}"},
    )
    token = bench.workdir / "data-client.jwt"
    token.write_text(bench.client_token("bench-data", sup.device))
    token.chmod(0o600)
    data = DataPath(bench, args, int(http_port), int(echo_port), services.pid, sup)
    forwards: list[LoggedChild] = []
    try:
        for _ in range(max(AGGREGATE_SESSIONS)):
            child, port = await start_forward(bench, sup, "web", token)
            forwards.append(child)
            data.web.append(port)
        child, data.echo = await start_forward(bench, sup, "echo", token)
        forwards.append(child)
        data.connect_pids = [child.pid for child in forwards]
        for rep in range(args.reps):
            await measure_round(data, rep)
        for _ in range(args.reps):
            for sessions in AGGREGATE_SESSIONS:
                await measure_aggregate(data, sessions)
        await sup.status()  # the workers' pids, for the leak check
    finally:
        # Clients first: a session that the device ends is, to its client, a loss.
        for child in forwards:
            await asyncio.to_thread(child.stop)
        await stop_supervisor(bench, sup)
    return data_report(data)


async def measure_round(data: DataPath, rep: int) -> None:
    """One repetition of every single-session figure, the kinds interleaved so that a
    change in the machine's load hits all of them alike."""
    args = data.args
    size = args.transfer_mib * MIB
    web, direct = data.web[0], data.http_port

    steps: list[tuple[str, Callable[[], Awaitable[float]]]] = [
        ("stock_dc_mbps", lambda: asyncio.to_thread(dcbench, "stock", "throughput", size=size)),
        ("project_dc_mbps", lambda: asyncio.to_thread(dcbench, "project", "throughput", size=size)),
        ("tunnel_download_mbps", lambda: transfer(http_download, web, size)),
        ("tunnel_upload_mbps", lambda: transfer(http_upload, web, size)),
        ("direct_download_mbps", lambda: transfer(http_download, direct, size)),
        ("direct_upload_mbps", lambda: transfer(http_upload, direct, size)),
        ("stock_dc_echo_rate", lambda: asyncio.to_thread(dcbench_echo, args.echo_seconds)),
        ("echo_rate", lambda: echo_rate(data.echo, args.echo_seconds)),
        ("direct_echo_rate", lambda: echo_rate(data.echo_port, args.echo_seconds)),
    ]
    for key, what in steps if rep % 2 == 0 else steps[::-1]:
        await data.measure(key, what)
    for prefix, port in (("", web), ("direct_", direct)):
        try:
            samples = await asyncio.to_thread(http_requests, port, args.requests)
        except (BenchError, OSError) as exc:
            data.bench.problems.append(f"{prefix}requests: {type(exc).__name__}: {exc}")
            continue
        ms = sorted(s * 1000 for s in samples)
        data.add(f"{prefix}request_p50_ms", statistics.median(ms))
        data.add(f"{prefix}request_p99_ms", percentile(ms, 0.99))


def dcbench_echo(seconds: float) -> float:
    return dcbench("stock", "echo", seconds=seconds)


async def transfer(fn: Callable[[int, int], float], port: int, size: int) -> float:
    return mbps(size, await asyncio.to_thread(fn, port, size))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of already sorted values."""
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def measure_aggregate(data: DataPath, sessions: int) -> None:
    """``sessions`` downloads at once, one per session; the supervisor's CPU share."""
    size = data.args.aggregate_mib * MIB
    status = await data.sup.status()
    workers = [int(w["pid"]) for w in status["workers"]]
    others = [data.services_pid, os.getpid(), *data.connect_pids, *workers]
    sup_before = cpu_seconds(data.sup.child.pid)
    others_before = sum(cpu_seconds(p) for p in others)
    started = time.perf_counter()
    try:
        await asyncio.gather(
            *(asyncio.to_thread(http_download, port, size) for port in data.web[:sessions])
        )
    except (BenchError, OSError) as exc:
        data.bench.problems.append(f"aggregate {sessions}: {type(exc).__name__}: {exc}")
        return
    elapsed = time.perf_counter() - started
    sup_used = cpu_seconds(data.sup.child.pid) - sup_before
    all_used = sup_used + sum(cpu_seconds(p) for p in others) - others_before
    data.add(f"aggregate_{sessions}_mbps", mbps(size * sessions, elapsed))
    data.cpu.setdefault(str(sessions), []).append(sup_used / all_used if all_used > 0 else 0.0)
    # How busy the processes under test kept the machine's CPUs: near 1, the
    # aggregate is bounded by CPU, not by the sessions' number.
    data.add(f"aggregate_{sessions}_cpu_busy", all_used / elapsed / (os.cpu_count() or 1))


def spread(values: Sequence[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "samples": [round(v, 4) for v in values],
    }


def data_report(data: DataPath) -> dict[str, Any]:
    figures = {key: spread(values) for key, values in data.samples.items() if values}
    cpu = {n: spread(values) for n, values in data.cpu.items() if values}
    return {
        "params": {
            "reps": data.args.reps,
            "transfer_mib": data.args.transfer_mib,
            "aggregate_mib_per_session": data.args.aggregate_mib,
            "requests": data.args.requests,
            "echo_seconds": data.args.echo_seconds,
            "echo_connections": ECHO_CONNECTIONS,
            "echo_size": ECHO_SIZE,
        },
        "figures": figures,
        "supervisor_cpu_share": cpu,
    }


# -- statistics and output ------------------------------------------------------------------


def stats_ms(samples: Sequence[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    ms = sorted(s * 1000 for s in samples)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[8] if len(ms) > 1 else ms[0]
    return {
        "n": len(ms),
        "p50_ms": statistics.median(ms),
        "p90_ms": p90,
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "samples_ms": [round(v, 3) for v in ms],
    }


def mean_max(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "max": max(values)}


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    if a.get("n") and b.get("n") and b["p50_ms"] > 0:
        return float(a["p50_ms"] / b["p50_ms"])
    return None


SUMMARY_FIGURES = (
    "stock_dc_mbps",
    "project_dc_mbps",
    "tunnel_download_mbps",
    "tunnel_upload_mbps",
    "direct_download_mbps",
    "direct_upload_mbps",
    "request_p50_ms",
    "request_p99_ms",
    "direct_request_p50_ms",
    "direct_request_p99_ms",
    "echo_rate",
    "stock_dc_echo_rate",
    "direct_echo_rate",
)
#: (name, figure, over): the ratios of the report, each figure to (1), (2) or (4).
RATIOS = (
    ("project_dc_over_stock_dc", "project_dc_mbps", "stock_dc_mbps"),
    ("tunnel_download_over_stock_dc", "tunnel_download_mbps", "stock_dc_mbps"),
    ("tunnel_upload_over_stock_dc", "tunnel_upload_mbps", "stock_dc_mbps"),
    ("tunnel_download_over_project_dc", "tunnel_download_mbps", "project_dc_mbps"),
    ("tunnel_upload_over_project_dc", "tunnel_upload_mbps", "project_dc_mbps"),
    ("direct_download_over_stock_dc", "direct_download_mbps", "stock_dc_mbps"),
    ("echo_over_stock_dc_echo", "echo_rate", "stock_dc_echo_rate"),
    ("direct_echo_over_stock_dc_echo", "direct_echo_rate", "stock_dc_echo_rate"),
)


def make_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The flat ``summary`` object: one median per figure (None where it is missing)."""
    data = report.get("data_path", {})
    figures = data.get("figures", {})

    def median(key: str) -> float | None:
        return figures[key]["median"] if key in figures else None

    setup = report.get("setup", {})
    pss = report.get("memory", {}).get("pss_per_session_mib") or {}
    cpu = data.get("supervisor_cpu_share", {}).get(str(max(AGGREGATE_SESSIONS)))
    summary: dict[str, Any] = {key: median(key) for key in SUMMARY_FIGURES}
    summary |= {
        "setup_p50_ms": setup.get("warm", {}).get("p50_ms"),
        "bare_setup_p50_ms": setup.get("bare", {}).get("p50_ms"),
        "aggregate_mbps": {str(n): median(f"aggregate_{n}_mbps") for n in AGGREGATE_SESSIONS},
        "supervisor_cpu_share": cpu["median"] if cpu else None,
        "pss_mib_per_session": pss.get("mean"),
        "cpu_count": os.cpu_count(),
    }
    return summary


def make_ratios(summary: dict[str, Any]) -> dict[str, float | None]:
    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ratios = {name: div(summary[a], summary[b]) for name, a, b in RATIOS}
    aggregate = summary["aggregate_mbps"]
    ratios["aggregate_4_over_1"] = div(aggregate["4"], aggregate["1"])
    ratios["aggregate_2_over_1"] = div(aggregate["2"], aggregate["1"])
    ratios["warm_setup_over_bare"] = div(summary["setup_p50_ms"], summary["bare_setup_p50_ms"])
    return ratios


def goals(
    summary: dict[str, Any], ratios: dict[str, float | None]
) -> list[tuple[str, bool | None]]:
    """Issue 10's goals, each with whether this run met it (None: not measured)."""

    def at_least(value: float | None, floor: float) -> bool | None:
        return None if value is None else value >= floor

    def within(value: float | None, limit: float | None, slack: float) -> bool | None:
        return None if value is None or limit is None else value <= limit + slack

    cpu = summary["supervisor_cpu_share"]
    return [
        ("tunnel download >= 3x stock DC", at_least(ratios["tunnel_download_over_stock_dc"], 3)),
        ("tunnel upload >= 3x stock DC", at_least(ratios["tunnel_upload_over_stock_dc"], 3)),
        (
            "tunnel >= 0.9x project DC (both ways)",
            at_least(
                min(
                    ratios["tunnel_download_over_project_dc"] or 0,
                    ratios["tunnel_upload_over_project_dc"] or 0,
                ),
                0.9,
            )
            if ratios["tunnel_download_over_project_dc"] is not None
            else None,
        ),
        (
            "request p50 <= direct + 1.5 ms",
            within(summary["request_p50_ms"], summary["direct_request_p50_ms"], 1.5),
        ),
        (
            "request p99 <= direct + 5 ms",
            within(summary["request_p99_ms"], summary["direct_request_p99_ms"], 5.0),
        ),
        ("chatty >= 3x stock DC echo", at_least(ratios["echo_over_stock_dc_echo"], 3)),
        ("4 sessions >= 0.9x one session", at_least(ratios["aggregate_4_over_1"], 0.9)),
        ("supervisor < 5 % of the CPU", None if cpu is None else cpu < 0.05),
        ("set-up p50 <= 1.5x bare", within(ratios["warm_setup_over_bare"], GOAL_WARM_RATIO, 0)),
        ("<= 25 MiB PSS per session", within(summary["pss_mib_per_session"], GOAL_PSS_MIB, 0)),
    ]


def render_data_path(report: dict[str, Any]) -> list[str]:
    data = report["data_path"]
    figures = data["figures"]
    params = data["params"]
    summary, ratios = report["summary"], report["ratios"]
    out = [
        f"3-6. data path: median of {params['reps']} run(s) (min-max), kinds interleaved; "
        "MB/s = 10^6 bytes/s",
        f"   {'figure':<46}{'median':>12}{'min-max':>20}   ratio",
    ]

    def row(label: str, key: str, unit: str, note: str = "") -> None:
        f = figures.get(key)
        if f is None:
            out.append(f"   {label:<46}{'-':>12}{'':>20}   not measured")
            return
        value = f"{f['median']:.2f} {unit}" if f["median"] < 100 else f"{f['median']:.0f} {unit}"
        low_high = f"{f['min']:.4g}-{f['max']:.4g}"
        out.append(f"   {label:<46}{value:>12}{low_high:>20}   {note}")

    def x(name: str, base: str) -> str:
        value = ratios.get(name)
        return f"{value:.2f}x {base}" if value is not None else ""

    size = f"{params['transfer_mib']} MiB"
    row(f"(1) stock aiortc DataChannel, {size}", "stock_dc_mbps", "MB/s", "1.00x (1)")
    row(
        f"(2) project DataChannel, {size}",
        "project_dc_mbps",
        "MB/s",
        x("project_dc_over_stock_dc", "(1)"),
    )
    for way in ("download", "upload"):
        row(
            f"(3) tunnel {way}, {size}, sha256 checked",
            f"tunnel_{way}_mbps",
            "MB/s",
            x(f"tunnel_{way}_over_stock_dc", "(1)")
            + ", "
            + x(f"tunnel_{way}_over_project_dc", "(2)"),
        )
    row(
        f"(5) direct download, {size}",
        "direct_download_mbps",
        "MB/s",
        x("direct_download_over_stock_dc", "(1)"),
    )
    row(f"(5) direct upload, {size}", "direct_upload_mbps", "MB/s")
    n = params["requests"]
    for q in ("p50", "p99"):
        row(
            f"(3) small request {q}, {n} on one connection",
            f"request_{q}_ms",
            "ms",
            delta(summary, q),
        )
        row(f"(5) direct small request {q}", f"direct_request_{q}_ms", "ms")
    echo = f"{params['echo_connections']} x {params['echo_size']} B in flight"
    row(f"(4) stock aiortc DataChannel echo, {echo}", "stock_dc_echo_rate", "rt/s", "1.00x (4)")
    row(f"(4) tunnel echo, {echo}", "echo_rate", "rt/s", x("echo_over_stock_dc_echo", "(4)"))
    row(
        f"(5) direct echo, {echo}",
        "direct_echo_rate",
        "rt/s",
        x("direct_echo_over_stock_dc_echo", "(4)"),
    )
    shares = data["supervisor_cpu_share"]
    for sessions in AGGREGATE_SESSIONS:
        share = shares.get(str(sessions))
        busy = figures.get(f"aggregate_{sessions}_cpu_busy")
        note = f"supervisor {share['median'] * 100:.1f} % of the CPU used" if share else ""
        if busy:
            note += f"; CPUs {busy['median'] * 100:.0f} % busy with the processes under test"
        row(
            f"(6) aggregate, {sessions} session(s) x {params['aggregate_mib_per_session']} MiB",
            f"aggregate_{sessions}_mbps",
            "MB/s",
            note,
        )
    out.append(f"   4 sessions / 1 session = {fmt_ratio(ratios['aggregate_4_over_1'])}")
    return out


def delta(summary: dict[str, Any], q: str) -> str:
    tunnel, direct = summary[f"request_{q}_ms"], summary[f"direct_request_{q}_ms"]
    return "" if tunnel is None or direct is None else f"direct + {tunnel - direct:.2f} ms"


def render_goals(report: dict[str, Any]) -> list[str]:
    out = ["goals (issue 10):"]
    for text, met in goals(report["summary"], report["ratios"]):
        out.append(f"   [{ {True: 'met', False: 'NOT met', None: 'n/a'}[met]:^7}] {text}")
    return out


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        "tunnelctl benchmark (everything on 127.0.0.1)",
        f"machine: {m['cpus']} CPU(s), Python {m['python']}, {m['platform']}; "
        f"worker and connect on {m.get('event_loop', '?')}",
        f"load average (1/5/15 min): start {fmt_load(m['loadavg_start'])}, "
        f"end {fmt_load(m['loadavg_end'])}",
        "note: this machine may be shared with other jobs; timings move with its load.",
        "",
    ]
    if "setup" in report:
        out += render_setup(report)
    if "data_path" in report:
        out += render_data_path(report)
        out.append("")
    out += render_goals(report)
    out.append("")
    problems = report["problems"]
    out.append(f"failures: {len(problems) if problems else 'none'}")
    out += [f"   - {p}" for p in problems]
    notes = report["notes"]
    out.append(f"observations: {len(notes) if notes else 'none'}")
    out += [f"   - {n}" for n in notes]
    return "\n".join(out)


def render_setup(report: dict[str, Any]) -> list[str]:
    out = [
        f"1. session set-up, request -> DataChannel open "
        f"({report['params']['sessions']} sequential sessions each, "
        f"{report['params']['warmup']} untimed warm-up, kinds interleaved)",
        f"   {'kind':<6}{'n':>4}{'p50 ms':>10}{'p90 ms':>10}{'min ms':>10}{'max ms':>10}"
        f"{'failed':>8}  notes",
    ]
    setup = report["setup"]
    for kind in ("warm", "cold", "bare"):
        s = setup[kind]
        notes = {
            "warm": f"pool_size={WARM_POOL}; {s.get('prefork_hits', 0)}/{s['n']} served by a "
            "pre-forked idle worker",
            "cold": "pool_size=0: a worker forked per session",
            "bare": "2 RTCPeerConnections in one process, no signaling",
        }[kind]
        out.append(
            f"   {kind:<6}{s['n']:>4}{fmt(s.get('p50_ms'))}{fmt(s.get('p90_ms'))}"
            f"{fmt(s.get('min_ms'))}{fmt(s.get('max_ms'))}{s['failed']:>8}  {notes}"
        )
    spawn = report["spawn"]
    out += [
        f'   spawn reference: fresh `python -c "{SPAWN_IMPORTS}"`: '
        f"p50 {spawn['p50_ms']:.0f} ms (min {spawn['min_ms']:.0f}, max {spawn['max_ms']:.0f}, "
        f"n={spawn['n']})",
        f"   warm p50 / bare p50 = {fmt_ratio(setup['warm_over_bare'])}   "
        f"(goal <= {GOAL_WARM_RATIO})",
        f"   cold p50 / bare p50 = {fmt_ratio(setup['cold_over_bare'])}",
        "",
    ]
    mem = report["memory"]
    out.append(
        f"2. memory: {mem['requested']} sessions requested at once on the warm supervisor, "
        f"{mem.get('opened', 0)} opened"
        + (f" in {mem['open_wall_s']:.1f} s" if "open_wall_s" in mem else "")
    )
    if mem.get("refused_too_many_sessions"):
        out.append(
            f"   the signaling server refused {mem['refused_too_many_sessions']} request(s) with "
            "too_many_sessions (16 negotiating per device); each was asked again"
        )
    if mem.get("open_ms", {}).get("n"):
        o = mem["open_ms"]
        out.append(
            f"   set-up under that load: p50 {o['p50_ms']:.0f} ms, p90 {o['p90_ms']:.0f} ms, "
            f"max {o['max_ms']:.0f} ms"
        )
    pss, rss = mem.get("pss_per_session_mib"), mem.get("rss_per_session_mib")
    if pss and rss:
        idle = mem["idle_workers"]
        out += [
            f"   {'':<34}{'PSS MiB':>10}{'RSS MiB':>10}",
            f"   {'per session worker, mean':<34}{pss['mean']:>10.1f}{rss['mean']:>10.1f}",
            f"   {'per session worker, max':<34}{pss['max']:>10.1f}{rss['max']:>10.1f}",
            f"   {'idle pool (' + str(idle['count']) + ' workers), sum':<34}"
            f"{idle['pss_mib']:>10.1f}{idle['rss_mib']:>10.1f}",
            f"   {'fork server':<34}{mem['fork_server'].get('pss_mib', 0):>10.1f}"
            f"{mem['fork_server'].get('rss_mib', 0):>10.1f}",
            f"   {'supervisor':<34}{mem['supervisor'].get('pss_mib', 0):>10.1f}"
            f"{mem['supervisor'].get('rss_mib', 0):>10.1f}",
            f"   {'total (' + str(mem['workers_measured']) + ' sessions)':<34}"
            f"{mem['total_pss_mib']:>10.1f}{mem['total_rss_mib']:>10.1f}",
            f"   goal: <= {GOAL_PSS_MIB:g} MiB PSS per session: worker mean {pss['mean']:.1f} MiB; "
            f"total / sessions {mem['total_pss_per_session_mib']:.1f} MiB",
            "   (sessions idle, no traffic; RSS counts each shared page in every process)",
        ]
    else:
        out.append("   no session worker could be measured")
    out.append("")
    return out


def fmt(value: float | None) -> str:
    return f"{value:>10.1f}" if value is not None else f"{'-':>10}"


def fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "n/a"


def fmt_load(load: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in load)


# -- the run --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench.py",
        description="Measure tunnelctl's session set-up time (warm pool, cold fork, bare "
        "aiortc) and memory per session, all on 127.0.0.1.",
        epilog="Exit code: 0, or 1 if any failure was seen (listed at the end).",
    )
    parser.add_argument(
        "--sessions",
        type=positive_int,
        default=20,
        metavar="N",
        help="sequential sessions timed per kind (default 20)",
    )
    parser.add_argument(
        "--memory-sessions",
        type=positive_int,
        default=50,
        metavar="M",
        help="sessions opened at once for the memory measurement (default 50)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        metavar="K",
        help="untimed sessions of each kind before timing (default 1)",
    )
    parser.add_argument(
        "--reps",
        type=positive_int,
        default=3,
        metavar="R",
        help="repetitions of each data-path figure; the median is reported (default 3)",
    )
    parser.add_argument(
        "--transfer-mib",
        type=positive_int,
        default=64,
        metavar="MIB",
        help="size of each download and upload, and of the DataChannel transfers (default 64)",
    )
    parser.add_argument(
        "--aggregate-mib",
        type=positive_int,
        default=32,
        metavar="MIB",
        help="size of each session's download in the aggregate figure (default 32)",
    )
    parser.add_argument(
        "--requests",
        type=positive_int,
        default=500,
        metavar="N",
        help="small requests timed over one keep-alive connection (default 500)",
    )
    parser.add_argument(
        "--echo-seconds",
        type=float,
        default=3.0,
        metavar="S",
        help="length of each chatty (echo) measurement (default 3)",
    )
    parser.add_argument(
        "--only",
        choices=("setup", "data"),
        help="run only the set-up and memory phases, or only the data path",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test of about a minute: --sessions 5 --memory-sessions 10 --reps 1 "
        "--transfer-mib 16 --aggregate-mib 8 --requests 300 --echo-seconds 1",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="write the full stderr of the signaling server and supervisors (and their workers) "
        "to DIR",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the clients' INFO lines")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.memory_sessions, args.reps = 5, 10, 1
        args.transfer_mib, args.aggregate_mib, args.requests, args.echo_seconds = 16, 8, 300, 1.0
    if args.echo_seconds <= 0:
        parser.error("--echo-seconds must be > 0")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


async def run_phases(bench: Bench, args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.only != "data":
        await run_setup_phases(bench, args, report)
    if args.only != "setup":
        report["data_path"] = await measure_data_path(bench, args)


async def run_setup_phases(bench: Bench, args: argparse.Namespace, report: dict[str, Any]) -> None:
    max_sessions = max(64, args.memory_sessions)
    supervisors: list[Supervisor] = []
    try:
        warm = await asyncio.to_thread(bench.start_supervisor, "warm", WARM_POOL, max_sessions)
        supervisors.append(warm)
        cold = await asyncio.to_thread(bench.start_supervisor, "cold", 0, max_sessions)
        supervisors.append(cold)

        async def warm_pool_ready() -> bool:
            pool = (await warm.status())["pool"]
            return bool(pool["idle"] >= WARM_POOL)

        await wait_for_state("the warm pool to be spawned", warm_pool_ready, READY_TIMEOUT)
        series = await measure_setup(bench, warm, cold, args.sessions, args.warmup)
        setup: dict[str, Any] = {}
        for kind, s in series.items():
            setup[kind] = {
                **stats_ms(s.samples),
                "requested": args.sessions,
                "failed": len(s.failures),
                "paths": s.paths,
            }
            if kind == "warm":
                setup[kind]["prefork_hits"] = s.prefork_hits
            bench.problems.extend(summarize(s.failures))
        for kind in ("warm", "cold"):
            if setup[kind]["paths"] and set(setup[kind]["paths"]) != {"host/host"}:
                bench.problems.append(f"{kind}: candidate pair types {setup[kind]['paths']}")
        setup["warm_over_bare"] = ratio(setup["warm"], setup["bare"])
        setup["cold_over_bare"] = ratio(setup["cold"], setup["bare"])
        report["setup"] = setup
        # Only the warm supervisor runs while memory is measured.
        await stop_supervisor(bench, cold)
        report["memory"] = await measure_memory(bench, warm, args.memory_sessions)
    finally:
        for sup in supervisors:
            await stop_supervisor(bench, sup)


async def stop_supervisor(bench: Bench, sup: Supervisor) -> None:
    """Stop it by pid (SIGTERM drains), then check that none of its processes outlived it."""
    if sup.stopped:
        return
    sup.stopped = True
    if sup.child.proc.poll() is None:
        with contextlib.suppress(ControlError):
            counters = (await sup.status())["counters"]  # and the last look at its pids
            nonzero = {k: v for k, v in counters.items() if v and k != "sessions_total"}
            if nonzero.get("worker_crashes") or nonzero.get("workers_hung"):
                bench.problems.append(f"supervisor {sup.name} counters: {nonzero}")
            elif nonzero:
                bench.notes.append(f"supervisor {sup.name} counters: {nonzero}")
    code = await asyncio.to_thread(sup.child.stop, 10.0)
    if code not in (0, None) and code != -signal.SIGTERM:
        bench.problems.append(f"supervisor {sup.name} exited with {code}")
    leaked = await wait_pids_gone(sup.pids_seen - {sup.child.pid}, 10.0)
    for pid in leaked:
        if is_ours(pid):
            bench.problems.append(
                f"supervisor {sup.name}: pid {pid} ({cmdline(pid)}) outlived it; killed"
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    errors, warnings = sup.child.take_log_findings()
    bench.problems.extend(errors)
    bench.notes.extend(warnings)


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:120]


def is_ours(pid: int) -> bool:
    """A pid we saw as a worker or fork server, not one reused by someone else since."""
    return "workers.zygote" in cmdline(pid)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve_main()
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s bench %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.verbose:
        logging.getLogger("tunnelctl").setLevel(logging.INFO)
    restrict_host_addresses(parse_networks([LOOPBACK]))
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            # What the worker and `tunnelctl connect` run on (aio/loop.py).
            "event_loop": loop_name(),
            "loadavg_start": list(os.getloadavg()),
            "shared": "the machine may be shared with other jobs",
        },
        "params": {
            "sessions": args.sessions,
            "memory_sessions": args.memory_sessions,
            "warmup": args.warmup,
            "quick": args.quick,
            "only": args.only,
        },
        "goals": {"warm_over_bare_max": GOAL_WARM_RATIO, "pss_per_session_mib_max": GOAL_PSS_MIB},
    }
    spawn = fresh_interpreter_seconds(SPAWN_RUNS)
    report["spawn"] = stats_ms(spawn)

    workdir = Path(tempfile.mkdtemp(prefix="tunnelctl-bench-"))
    service = http.server.ThreadingHTTPServer((LOOPBACK, 0), QuietHandler)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    children: list[LoggedChild] = []
    problems: list[str] = []
    notes: list[str] = []
    secret = secrets.token_hex(32)
    aborted: str | None = None
    try:
        signal_child = LoggedChild.tunnelctl(
            ["signal", "--host", LOOPBACK, "--port", "0"],
            env={"TUNNEL_SECRET": secret},
            name="signal",
            log_file=args.keep_logs / "signal.log" if args.keep_logs else None,
        )
        children.append(signal_child)
        url = signal_child.wait_line("listening ", READY_TIMEOUT).split()[1]
        bench = Bench(
            workdir,
            secret,
            url,
            int(service.server_address[1]),
            children,
            problems,
            notes,
            args.keep_logs,
        )
        asyncio.run(run_phases(bench, args, report))
    except (BenchError, ChildFailed, ControlError) as exc:
        aborted = f"benchmark aborted: {type(exc).__name__}: {exc}"
        problems.append(aborted)
    finally:
        for child in reversed(children):
            child.stop()
        service.shutdown()
        service.server_close()
        shutil.rmtree(workdir, ignore_errors=True)
    for child in children:
        errors, warnings = child.take_log_findings()
        problems.extend(errors)
        notes.extend(warnings)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["problems"] = problems
    report["notes"] = notes
    report["summary"] = make_summary(report)
    report["ratios"] = make_ratios(report["summary"])
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if aborted is None:
        print(render(report))
    else:
        print(json.dumps(report, indent=2), file=sys.stderr)
        print(aborted)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
