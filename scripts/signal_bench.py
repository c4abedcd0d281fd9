#!/usr/bin/env python3
"""Benchmark of the signaling server alone and as a Redis cluster (issue 13).

    uv run python scripts/signal_bench.py [--connections 1000,10000] [--setups 2000]
        [--latency-samples 200] [--json FILE]

Everything runs on 127.0.0.1: ``tunnelctl signal`` processes (with ``--redis``
for the cluster rows), a ``redis-server`` on a free port (no persistence), and
the peers, which live in this process (plain WebSocket clients speaking
PROTOCOL.md §1). Measured:

1. **Idle connections held by one node**: N devices connect, authenticate
   (``auth`` message) and register, then stay idle. Reported: the node's RSS
   (``/proc/PID/status``) before and with N connections, and the difference
   per connection, at each N of ``--connections``. ``RLIMIT_NOFILE`` is raised
   (for this process and the node) to what N needs, at most to the hard limit.
2. **Session set-ups per second**: a set-up is ``session_request`` → the device
   answers ``offer`` → the client answers ``answer`` → the device has it, then
   ``session_end``. 100 clients run their set-ups one after the other, in
   parallel, with 20 devices (5 clients each; every count stays within the
   §1.5 rate buckets and session limits, so nothing is refused). Through one
   node without Redis, one node with Redis, and two nodes with Redis (every
   device on node a, every client on node b: each message crosses Redis).
3. **Set-up latency**, one set-up at a time, from ``session_request`` sent to
   the device holding the ``answer`` (two round trips through signaling):
   p50 and p90 on one node, and across two nodes; the difference is what the
   cluster adds.

The clients share this process with the measurement: on a small machine they
take a share of the CPU the nodes could use; read rates as a lower bound and
with the load average (printed) in mind. Every process started here is
stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from harness import Child
from protocol.signaling import (
    Answer,
    Auth,
    Devices,
    ListDevices,
    Offer,
    Register,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
    decode_signaling,
    encode_signaling,
    new_session_id,
)
from signaling.auth import issue_token

READY = 60.0
STEP = 60.0  # bound of any one wait for a message
CONNECT_PARALLEL = 100  # below the node's 128 unauthenticated connections
CLIENTS, DEVICES, PER_CLIENT_MAX = 100, 20, 30  # 3 messages a set-up: 90 < burst 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


@dataclass
class Bench:
    secret: str = field(default_factory=lambda: secrets.token_hex(32))
    children: list[Child] = field(default_factory=list)
    redis_url: str | None = None

    def start_redis(self) -> str:
        port = free_port()
        redis = Child(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            name="redis-server",
        )
        self.children.append(redis)
        redis.wait_line("Ready to accept connections", READY, anywhere=True)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        return self.redis_url

    def start_node(self, node: str | None, max_connections: int = 1024) -> tuple[Child, str]:
        args = ["signal", "--port", "0", "--max-connections", str(max_connections)]
        if node is not None:
            assert self.redis_url is not None
            args += ["--redis", self.redis_url, "--node-id", node]
        child = Child.tunnelctl(args, env={"TUNNEL_SECRET": self.secret}, name=f"node {node}")
        self.children.append(child)
        url = child.wait_line("listening ", READY).split()[1]
        return child, url

    def stop_nodes(self) -> None:
        for child in [c for c in self.children if c.name.startswith("node")]:
            child.stop()
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def token(self, sub: str, role: str, devices: Sequence[str] = ()) -> str:
        return issue_token(self.secret, sub=sub, role=role, devices=devices, ttl=3600)


async def recv(ws: ClientConnection) -> SignalingMessage:
    return decode_signaling(await asyncio.wait_for(ws.recv(), STEP))


async def join(url: str, token: str, device: str | None = None) -> ClientConnection:
    ws = await connect(url, open_timeout=STEP, max_size=65536, ping_interval=None)
    await ws.send(encode_signaling(Auth(token)))
    await recv(ws)  # welcome
    if device is not None:
        await ws.send(encode_signaling(Register(device)))
        await recv(ws)  # registered
    return ws


async def open_devices(bench: Bench, url: str, names: Sequence[str]) -> list[ClientConnection]:
    gate = asyncio.Semaphore(CONNECT_PARALLEL)

    async def one(name: str) -> ClientConnection:
        async with gate:
            return await join(url, bench.token(name, "device"), device=name)

    return list(await asyncio.gather(*(one(n) for n in names)))


async def close_all(conns: Sequence[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


# --- 1. idle connections -----------------------------------------------------------


async def idle_memory(bench: Bench, counts: Sequence[int]) -> list[dict[str, Any]]:
    top = max(counts)
    raise_nofile(top + 1000)
    rows = []
    for count in counts:
        node, url = bench.start_node(None, max_connections=count + 10)
        warm = await open_devices(bench, url, ["warmup"])  # first-connection imports
        await close_all(warm)
        before = rss_kib(node.pid)
        started = time.monotonic()
        conns = await open_devices(bench, url, [f"d{i:05d}" for i in range(count)])
        took = time.monotonic() - started
        after = rss_kib(node.pid)
        rows.append(
            {
                "connections": count,
                "rss_before_mib": round(before / 1024, 1),
                "rss_after_mib": round(after / 1024, 1),
                "kib_per_connection": round((after - before) / count, 1),
                "connect_and_register_per_s": round(count / took),
            }
        )
        print(f"  {count} idle devices: {rows[-1]}", flush=True)
        await close_all(conns)
        bench.stop_nodes()
    return rows


# --- 2 and 3. session set-ups ------------------------------------------------------


class Devices_:
    """Device connections that answer every request with an offer and report answers."""

    def __init__(self, conns: Sequence[ClientConnection]) -> None:
        self.conns = conns
        self.answered: dict[str, asyncio.Future[None]] = {}
        self.tasks = [asyncio.create_task(self._serve(ws)) for ws in conns]

    async def _serve(self, ws: ClientConnection) -> None:
        async for raw in ws:
            message = decode_signaling(raw)
            if isinstance(message, SessionRequest):
                await ws.send(encode_signaling(Offer(message.session, "v=0")))
            elif isinstance(message, Answer):
                future = self.answered.get(message.session)
                if future is not None and not future.done():
                    future.set_result(None)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await close_all(self.conns)


async def setup(ws: ClientConnection, device: str, devices: Devices_) -> float:
    """One set-up; its seconds from request to the device holding the answer."""
    sid = new_session_id()
    answered = devices.answered[sid] = asyncio.get_running_loop().create_future()
    started = time.perf_counter()
    await ws.send(encode_signaling(SessionRequest(sid, device)))
    while True:
        message = await recv(ws)
        if isinstance(message, Offer) and message.session == sid:
            break
        if not isinstance(message, Offer):
            raise RuntimeError(f"set-up refused: {message}")
    await ws.send(encode_signaling(Answer(sid, "v=0")))
    await asyncio.wait_for(answered, STEP)
    took = time.perf_counter() - started
    del devices.answered[sid]
    await ws.send(encode_signaling(SessionEnd(sid, "done")))
    return took


async def wait_visible(bench: Bench, url: str, device: str) -> None:
    """Until the node at ``url`` sees ``device`` online (presence crossed Redis)."""
    ws = await join(url, bench.token("watcher", "client", [device]))
    try:
        deadline = time.monotonic() + READY
        while time.monotonic() < deadline:
            await ws.send(encode_signaling(ListDevices()))
            answer = await recv(ws)
            if isinstance(answer, Devices) and answer.devices[0].online:
                return
            await asyncio.sleep(0.05)  # asking again is how presence is observed
        raise RuntimeError(f"{device} never visible at {url}")
    finally:
        await ws.close()


async def setups(
    bench: Bench, device_url: str, client_url: str, total: int, clients: int, *, parallel: bool
) -> tuple[float, list[float]]:
    """``total`` set-ups by ``clients`` clients, all at once (``parallel``) or
    one client after the other; the rate and each set-up's seconds."""
    names = [f"dev{i:02d}" for i in range(DEVICES)]
    devices = Devices_(await open_devices(bench, device_url, names))
    if device_url != client_url:
        for name in names:
            await wait_visible(bench, client_url, name)
    per_client = -(-total // clients)
    if per_client > PER_CLIENT_MAX:
        raise SystemExit(f"--setups at most {PER_CLIENT_MAX * clients} (the rate buckets)")
    conns = [
        await join(client_url, bench.token(f"c{i:03d}", "client", [names[i % DEVICES]]))
        for i in range(clients)
    ]
    latencies: list[float] = []

    async def run(i: int) -> None:
        for _ in range(per_client):
            latencies.append(await setup(conns[i], names[i % DEVICES], devices))

    started = time.perf_counter()
    if parallel:
        await asyncio.gather(*(run(i) for i in range(clients)))
    else:
        for i in range(clients):
            await run(i)
    elapsed = time.perf_counter() - started
    await close_all(conns)
    await devices.stop()
    return len(latencies) / elapsed, latencies


def pct(values: Sequence[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def setup_rows(bench: Bench, total: int, samples: int) -> dict[str, Any]:
    out: dict[str, Any] = {"rate": [], "latency": []}
    bench.start_redis()
    layouts = [
        ("one node, no Redis", None, None),
        ("one node, with Redis", "a", None),
        ("two nodes, with Redis (device on a, client on b)", "a", "b"),
    ]
    for label, first, second in layouts:
        _, url_a = bench.start_node(first)
        url_b = bench.start_node(second)[1] if second is not None else url_a
        rate, _ = await setups(bench, url_a, url_b, total, CLIENTS, parallel=True)
        # Latency: one set-up at a time, clients taking turns within their buckets.
        turns = -(-samples // PER_CLIENT_MAX)
        _, lat = await setups(bench, url_a, url_b, samples, turns, parallel=False)
        lat = [v * 1000 for v in lat]
        out["rate"].append({"layout": label, "setups_per_s": round(rate)})
        out["latency"].append(
            {
                "layout": label,
                "p50_ms": round(pct(lat, 50), 2),
                "p90_ms": round(pct(lat, 90), 2),
            }
        )
        print(f"  {label}: {out['rate'][-1]} {out['latency'][-1]}", flush=True)
        bench.stop_nodes()
    return out


def markdown(memory: list[dict[str, Any]], sessions: dict[str, Any], machine: str) -> str:
    lines = [
        f"Machine: {machine}",
        "",
        "| idle devices on one node | node RSS before | with them | per connection "
        "| connect+register rate |",
        "|---|---|---|---|---|",
    ]
    for row in memory:
        lines.append(
            f"| {row['connections']:,} | {row['rss_before_mib']} MiB | {row['rss_after_mib']} MiB "
            f"| {row['kib_per_connection']} KiB | {row['connect_and_register_per_s']}/s |"
        )
    lines += ["", "| layout | set-ups/s | set-up latency p50 | p90 |", "|---|---|---|---|"]
    for rate, lat in zip(sessions["rate"], sessions["latency"], strict=True):
        lines.append(
            f"| {rate['layout']} | {rate['setups_per_s']} | {lat['p50_ms']} ms "
            f"| {lat['p90_ms']} ms |"
        )
    single, cross = sessions["latency"][0], sessions["latency"][-1]
    lines += [
        "",
        f"Added set-up latency across two nodes (p50): {cross['p50_ms'] - single['p50_ms']:.2f} ms",
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench()
    load = os.getloadavg()
    machine = (
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load {load[0]:.1f} at the start"
    )
    try:
        print("idle connections:", flush=True)
        memory = await idle_memory(bench, args.connections)
        print("session set-ups:", flush=True)
        sessions = await setup_rows(bench, args.setups, args.latency_samples)
    finally:
        bench.stop_all()
    machine += f", {os.getloadavg()[0]:.1f} at the end"
    print()
    print(markdown(memory, sessions, machine))
    return {"memory": memory, "sessions": sessions, "machine": machine}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--connections",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1000, 10000],
        help="idle device counts, comma-separated (default 1000,10000)",
    )
    parser.add_argument("--setups", type=int, default=2000, help="set-ups per layout")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("signal_bench: error: redis-server is not installed", file=sys.stderr)
        return 1
    figures = asyncio.run(main_async(args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(figures, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
