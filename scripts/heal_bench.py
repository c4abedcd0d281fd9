#!/usr/bin/env python3
"""Benchmark: how fast a session notices a dead path, heals, and connects (issue 7).

    sudo .venv/bin/python scripts/heal_bench.py [--rounds 5] [--outage 10] [--json FILE]

Needs root: like ``tests/e2e/test_heal.py`` (whose helpers it uses) it runs
``tunnelctl signal``, ``start`` and ``connect`` and a web service inside a
network namespace it creates (``tc-heal-<pid>-<n>``) and removes, and breaks
the peers' path with iptables rules inside that namespace only (all UDP
dropped; TCP to signaling untouched). Measured:

1. **Dead path**, ``--rounds`` times: UDP is dropped for ``--outage`` seconds.
   ``detect_client`` / ``detect_device``: from the drop to the ``path lost``
   line of each end (the bound is ``--keepalive``, default 5 s).
   ``request_reset``: a request made after detection, until its reset.
   ``recover``: from the path's return to the client's ``re-established``
   line; ``first_request``: from the return until a request made at that
   instant completes (what a user sees).
2. **Set-up with the first check dropped** (a NAT that has not yet seen the
   peer), in process, ``--setups`` times: request-free, offer to both
   DataChannels open, tuned and stock aiortc (``TUNNELCTL_STOCK_AIORTC=1``, in a
   subprocess, since tuning is process-wide).
3. **Offer with an unreachable STUN server**, tuned and stock.
4. **Loss**: 16 MiB through 5 % random UDP loss, MiB/s.

Prints one line per measure (p50 and max) and, with ``--json FILE``, writes
every sample. Numbers move with the machine's load; its load average is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from signaling.auth import issue_token  # noqa: E402
from tests.e2e.conftest import BIG_SIZE, LOOPBACK  # noqa: E402
from tests.e2e.netns_support import Netns, netns_unavailable  # noqa: E402

READY = 30.0
DROP_UDP = ("-p", "udp", "-j", "DROP")
LOSS_5 = ("-p", "udp", "-m", "statistic", "--mode", "random", "--probability", "0.05", "-j", "DROP")


def dead_path_rounds(rounds: int, outage: float, keepalive: float) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {
        k: []
        for k in ("detect_client", "detect_device", "request_reset", "recover", "first_request")
    }
    netns = Netns()
    web = None
    runtime = None
    try:
        netns.create()
        web, web_port = netns.web_service()
        secret = secrets.token_hex(32)
        signal = netns.child(
            ["signal", "--port", "0"], env={"TUNNEL_SECRET": secret}, name="signal"
        )
        url = signal.wait_line("listening ", READY).split()[1]
        runtime = tempfile.mkdtemp(prefix="tc-heal-bench-")
        device = netns.child(
            [
                *("start", "--runtime-dir", runtime, "--signal", url, "--device", "dev1"),
                *("--expose", f"web=http://127.0.0.1:{web_port}", "--keepalive", str(keepalive)),
                *LOOPBACK,
            ],
            env={"TUNNEL_TOKEN": issue_token(secret, sub="dev1", role="device")},
            name="device",
        )
        device.wait_line("registered ", READY)
        client = netns.child(
            [
                *("connect", "--signal", url, "--device", "dev1", "--service", "web"),
                *("--keepalive", str(keepalive), *LOOPBACK),
            ],
            env={"TUNNEL_TOKEN": issue_token(secret, sub="c1", role="client", devices=("dev1",))},
            name="client",
        )
        address = client.wait_line("forwarding ", READY).split()[1]
        for round_ in range(rounds):
            marks = device.stderr_count, client.stderr_count
            netns.iptables("-I", "INPUT", *DROP_UDP)
            broken = time.monotonic()
            client.wait_stderr("path lost", READY, after=marks[1])
            samples["detect_client"].append(time.monotonic() - broken)
            device.wait_stderr("path lost", READY, after=marks[0])
            samples["detect_device"].append(time.monotonic() - broken)
            during = netns.get(address, "/").result()
            if during["outcome"] == "reset":
                samples["request_reset"].append(float(str(during["seconds"])))
            else:
                print(f"round {round_}: request during the outage: {during}", file=sys.stderr)
            left = outage - (time.monotonic() - broken)
            if left > 0:
                time.sleep(left)  # the outage's length is the experiment, not a wait for an event
            mark = client.stderr_count
            netns.iptables("-D", "INPUT", *DROP_UDP)
            back = time.monotonic()
            probe = netns.get(address, "/")
            client.wait_stderr("re-established", READY, after=mark)
            samples["recover"].append(time.monotonic() - back)
            result = probe.result()
            if result["outcome"] == "complete":
                samples["first_request"].append(time.monotonic() - back)
            else:
                print(f"round {round_}: first request after the return: {result}", file=sys.stderr)
        netns.iptables("-I", "INPUT", *LOSS_5)
        big = netns.get(address, "/big", timeout=300).result()
        if big["outcome"] == "complete" and big["bytes"] == BIG_SIZE:
            samples["loss5_mibps"] = [BIG_SIZE / float(str(big["seconds"])) / 2**20]
        else:
            print(f"16 MiB through 5 % loss: {big}", file=sys.stderr)
    finally:
        netns.delete()
        if runtime is not None:
            shutil.rmtree(runtime, ignore_errors=True)
        if web is not None:
            web.kill()
            web.wait(timeout=10)
    return samples


# -- in-process measures (run once tuned, once stock in a subprocess) ------------------


async def _first_check_dropped(setups: int) -> list[float]:
    from protocol.signaling import Answer, SignalingMessage
    from workers.ice import parse_networks, restrict_host_addresses
    from workers.peer import PeerSession

    restrict_host_addresses(parse_networks(["127.0.0.1"]))
    times = []
    for _ in range(setups):
        out: list[SignalingMessage] = []

        async def keep(message: SignalingMessage, box: list[SignalingMessage] = out) -> None:
            box.append(message)

        async def drop(message: SignalingMessage) -> None:
            pass

        device, client = PeerSession("s-bench-000001", drop), PeerSession("s-bench-000001", keep)
        device.create_channel()
        assert device.pc.sctp is not None
        connection = device.pc.sctp.transport.transport._connection
        real = connection.request_received
        dropped: list[bool] = []

        def nat(
            message: Any, addr: Any, protocol: Any, real: Any = real, d: list[bool] = dropped
        ) -> None:
            if not d:
                d.append(True)  # the NAT drops the first check into it
                return
            real(message, addr, protocol)

        connection.request_received = nat  # type: ignore[method-assign]
        started = time.perf_counter()
        await client.handle_offer(await device.start_offer())
        answer = out[0]
        assert isinstance(answer, Answer)
        await device.handle_answer(answer.sdp)
        await asyncio.gather(device.wait_open(20), client.wait_open(20))
        times.append(time.perf_counter() - started)
        await device.close()
        await client.close()
    return times


async def _unreachable_stun(setups: int) -> list[float]:
    from workers.ice import IceServer, parse_networks, restrict_host_addresses
    from workers.peer import PeerSession

    async def drop(message: Any) -> None:
        pass

    restrict_host_addresses(parse_networks(["127.0.0.1"]))
    times = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        server = IceServer(f"stun:127.0.0.1:{hole.getsockname()[1]}")
        for _ in range(setups):
            peer = PeerSession("s-bench-000002", drop, ice_servers=[server])
            started = time.perf_counter()
            await peer.prepare_offer()
            times.append(time.perf_counter() - started)
            await peer.close()
    return times


def in_process(setups: int, stock: bool) -> dict[str, list[float]]:
    env = {**os.environ, "TUNNELCTL_STOCK_AIORTC": "1" if stock else "0"}
    out = subprocess.run(
        [sys.executable, __file__, "--in-process", str(setups)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    samples: dict[str, list[float]] = json.loads(out.splitlines()[-1])
    return samples


def report(name: str, values: list[float], unit: str = "s") -> str:
    if not values:
        return f"{name:32} (no sample)"
    return (
        f"{name:32} p50 {statistics.median(values):7.3f} {unit}   max {max(values):7.3f} {unit}"
        f"   n={len(values)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--outage", type=float, default=10.0)
    parser.add_argument("--keepalive", type=float, default=5.0)
    parser.add_argument("--setups", type=int, default=10)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--in-process", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process is not None:
        samples = {
            "first_check_dropped": asyncio.run(_first_check_dropped(args.in_process)),
            "unreachable_stun_offer": asyncio.run(_unreachable_stun(min(3, args.in_process))),
        }
        print(json.dumps(samples))
        return 0

    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    results: dict[str, Any] = {}
    for stock in (False, True):
        label = "stock" if stock else "tuned"
        for name, values in in_process(args.setups, stock).items():
            results[f"{name}_{label}"] = values
            print(report(f"{name} ({label})", values))
    why = netns_unavailable()
    if why is not None:
        print(f"dead path and loss: skipped ({why})")
    else:
        for name, values in dead_path_rounds(args.rounds, args.outage, args.keepalive).items():
            results[name] = values
            print(report(name, values, "MiB/s" if name.endswith("mibps") else "s"))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
