#!/usr/bin/env python3
"""DataChannel benchmark: two aiortc peers in two processes, over 127.0.0.1 only.

    python scripts/dcbench.py --stack stock|project|mixed --test throughput|echo
        [--bytes N] [--seconds S] [--timeout T] [--loop auto|asyncio|uvloop]
        [--repeat N] [--profile DIR] [--json]

Stable interface (``scripts/bench.py`` runs it as a subprocess): with ``--json``
the last line of stdout is one JSON object,

* ``--test throughput``: ``{"stack": ..., "test": "throughput", "mbps": float, ...}``,
  MB/s = 10^6 bytes/s of DataChannel payload, sender's first ``send`` to the
  receiver's report that the last byte arrived with the right checksum;
* ``--test echo``: ``{"stack": ..., "test": "echo", "rate": float, ...}``, round
  trips per second of 64-byte messages with 10 in flight over ``--seconds``.

Extra keys: ``sides`` (for each process: whether ``workers.aiortc_tuning`` is
active, which event loop ran, the CPU seconds it used during the test and its
SCTP retransmission timeouts), ``bytes``/``seconds``/``round_trips``, for
``mixed`` a ``directions`` object (``mbps``/``rate`` is then the lower of the
two), and with ``--repeat N`` the median as ``mbps``/``rate`` and every run's
figure in ``runs``. On a shared machine the CPU seconds compare stacks better
than the wall-clock figure. Exit code 0 when the data arrived intact, 1
otherwise (the JSON then has ``"error"``), 2 for bad arguments.

Stacks:

* ``stock``: aiortc as released, the default asyncio event loop, none of our
  tuning (``TUNNELCTL_STOCK_AIORTC=1`` in both processes);
* ``project``: what tunnelctl ships, ``workers.aiortc_tuning.install()`` and
  uvloop where it installs (``--loop`` overrides the loop);
* ``mixed``: one tuned process and one stock process, run twice so that data
  flows both ways (tuned sender to stock receiver, stock sender to tuned
  receiver): an interoperability check as much as a figure.

The throughput test sends ``--bytes`` (default 64 MiB) as 16 KiB binary messages
from the offering side (the device, as in tunnelctl) to the answering side,
keeping at most 1 MiB in the channel's buffer; the receiver folds every message
into a CRC-32 and answers with it. The echo test has the answering side (the
client) keep 10 numbered 64-byte messages in flight, each echoed back by the
device; replies must come back in order.

The two children (``--role``, internal) exchange the offer and answer through
this process as JSON lines on stdin/stdout; ICE uses host candidates on
127.0.0.1 only (:func:`workers.ice.restrict_host_addresses`) and no ICE
servers. Every wait has a deadline; children are stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
MESSAGE_SIZE = 16 * 1024
ECHO_SIZE = 64
IN_FLIGHT = 10
BUFFER_HIGH = 1024 * 1024
BUFFER_LOW = 256 * 1024
DEFAULT_BYTES = 64 * 1024 * 1024
DEFAULT_SECONDS = 5.0
DEFAULT_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
STOCK_ENV = "TUNNELCTL_STOCK_AIORTC"  # workers.aiortc_tuning.STOCK_ENV, without importing it
BLOCKS = [random.Random(i).randbytes(MESSAGE_SIZE) for i in range(16)]


class BenchFailed(RuntimeError):
    """The run could not produce a figure (a child failed, data differed, a deadline passed)."""


# -- the child processes ----------------------------------------------------------------


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def read_line() -> dict[str, Any]:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise BenchFailed("the parent closed stdin")
    message: dict[str, Any] = json.loads(line)
    return message


async def child(args: argparse.Namespace) -> dict[str, Any]:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from workers.ice import parse_networks, restrict_host_addresses

    count_t3_expirations()
    tuned = False
    if args.tuned:
        from workers import aiortc_tuning

        tuned = aiortc_tuning.install()
    restrict_host_addresses(parse_networks(["127.0.0.1"]))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[Role] = loop.create_future()
    role: type[Role] = DEVICE_ROLES[args.test] if args.role == "device" else CLIENT_ROLES[args.test]
    try:
        # Handlers are attached when the channel appears, before any message can.
        if args.role == "device":
            channel = pc.createDataChannel("bench", ordered=True)
            device = role(channel, args)
            channel.on("open", lambda: resolve(opened, device))
            await pc.setLocalDescription(await pc.createOffer())
            emit({"sdp": pc.localDescription.sdp})
            answer = await read_line()
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        else:
            pc.on("datachannel", lambda ch: resolve(opened, role(ch, args)))
            offer = await read_line()
            await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            emit({"sdp": pc.localDescription.sdp})
        test = await asyncio.wait_for(opened, args.timeout)
        cpu = time.process_time()
        result = await test.run()
        side = {
            "tuned": tuned,
            "loop": type(loop).__module__.split(".")[0],
            "cpu_seconds": round(time.process_time() - cpu, 3),
            "t3_expirations": T3_EXPIRATIONS[0],
        }
        return {"side": side, **result}
    finally:
        await pc.close()


T3_EXPIRATIONS = [0]


def count_t3_expirations() -> None:
    """Count retransmission timeouts (each one is RTO.Min or more of silence)."""
    from aiortc.rtcsctptransport import RTCSctpTransport

    expired = RTCSctpTransport._t3_expired

    def counted(self: Any) -> None:
        T3_EXPIRATIONS[0] += 1
        expired(self)

    RTCSctpTransport._t3_expired = counted  # type: ignore[method-assign]


def resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


class Role:
    """One side of a test: handlers attached on construction, then ``run()`` once open."""

    def __init__(self, channel: Any, args: argparse.Namespace) -> None:
        self.channel = channel
        self.args = args
        self.finished: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def finish(self, result: Any = None, error: str | None = None) -> None:
        if self.finished.done():
            return
        if error is None:
            self.finished.set_result(result)
        else:
            self.finished.set_exception(BenchFailed(error))

    async def run(self) -> dict[str, Any]:
        raise NotImplementedError


class BulkSender(Role):
    def __init__(self, channel: Any, args: argparse.Namespace) -> None:
        super().__init__(channel, args)
        self.low = asyncio.Event()
        channel.bufferedAmountLowThreshold = BUFFER_LOW
        channel.on("bufferedamountlow", self.low.set)
        channel.on("message", lambda m: self.finish(json.loads(m)))

    async def run(self) -> dict[str, Any]:
        channel, total = self.channel, self.args.bytes
        crc = sent = index = 0
        started = time.perf_counter()
        while sent < total:
            block = BLOCKS[index % len(BLOCKS)][: total - sent]
            index += 1
            crc = zlib.crc32(block, crc)
            channel.send(block)
            sent += len(block)
            if channel.bufferedAmount > BUFFER_HIGH:
                self.low.clear()
                await asyncio.wait_for(self.low.wait(), self.args.timeout)
        report = await asyncio.wait_for(self.finished, self.args.timeout)
        seconds = time.perf_counter() - started
        if report != {"bytes": sent, "crc": crc}:
            raise BenchFailed(f"receiver saw {report}, sender sent {sent} bytes, crc {crc}")
        channel.close()
        return {"bytes": sent, "seconds": seconds, "mbps": sent / seconds / 1e6}


class BulkReceiver(Role):
    def __init__(self, channel: Any, args: argparse.Namespace) -> None:
        super().__init__(channel, args)
        self.crc = self.bytes = 0
        self.closed = asyncio.get_running_loop().create_future()
        channel.on("message", self.on_message)
        channel.on("close", lambda: resolve(self.closed, None))

    def on_message(self, message: bytes) -> None:
        self.crc = zlib.crc32(message, self.crc)
        self.bytes += len(message)
        if self.bytes >= self.args.bytes and not self.finished.done():
            self.channel.send(json.dumps({"bytes": self.bytes, "crc": self.crc}))
            self.finish()

    async def run(self) -> dict[str, Any]:
        await asyncio.wait_for(self.finished, self.args.timeout)
        # The sender closes the channel once it has the report: only then may we go.
        await asyncio.wait_for(self.closed, self.args.timeout)
        return {}


class EchoServer(Role):
    def __init__(self, channel: Any, args: argparse.Namespace) -> None:
        super().__init__(channel, args)
        channel.on("message", channel.send)
        channel.on("close", self.finish)

    async def run(self) -> dict[str, Any]:
        # The client closes the channel when it is done.
        await asyncio.wait_for(self.finished, self.args.seconds + self.args.timeout)
        return {}


class EchoClient(Role):
    def __init__(self, channel: Any, args: argparse.Namespace) -> None:
        super().__init__(channel, args)
        self.padding = bytes(ECHO_SIZE - 8)
        self.next_sent = self.next_reply = 0
        self.deadline = 0.0
        channel.on("message", self.on_message)

    def send_one(self) -> None:
        self.channel.send(self.next_sent.to_bytes(8, "big") + self.padding)
        self.next_sent += 1

    def on_message(self, message: bytes) -> None:
        expected = self.next_reply
        if len(message) != ECHO_SIZE or int.from_bytes(message[:8], "big") != expected:
            self.finish(error=f"reply {expected} came back wrong: {message[:16]!r}")
            return
        self.next_reply += 1
        if time.perf_counter() < self.deadline:
            self.send_one()
        elif self.next_reply == self.next_sent:
            self.finish()

    async def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.deadline = started + self.args.seconds
        for _ in range(IN_FLIGHT):
            self.send_one()
        await asyncio.wait_for(self.finished, self.args.seconds + self.args.timeout)
        seconds = time.perf_counter() - started
        self.channel.close()
        return {
            "round_trips": self.next_reply,
            "seconds": seconds,
            "rate": self.next_reply / seconds,
        }


DEVICE_ROLES: dict[str, type[Role]] = {"throughput": BulkSender, "echo": EchoServer}
CLIENT_ROLES: dict[str, type[Role]] = {"throughput": BulkReceiver, "echo": EchoClient}


def run_child(args: argparse.Namespace) -> int:
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        result = asyncio.run(child(args))
    except Exception as exc:  # the parent shows it; a child has no one else to tell
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(Path(args.profile) / f"{args.role}.prof"))
    emit({"result": result})
    return 0


# -- the parent -----------------------------------------------------------------------------


def choose_loop(requested: str, tuned: bool) -> str:
    if requested != "auto":
        return requested
    if not tuned:
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


async def start_child(
    role: str, tuned: bool, args: argparse.Namespace
) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    if tuned:
        env.pop(STOCK_ENV, None)
    else:
        env[STOCK_ENV] = "1"
    command = [
        sys.executable,
        str(SCRIPT),
        "--role",
        role,
        "--test",
        args.test,
        "--bytes",
        str(args.bytes),
        "--seconds",
        str(args.seconds),
        "--timeout",
        str(args.timeout),
        "--loop",
        choose_loop(args.loop, tuned),
    ]
    if tuned:
        command.append("--tuned")
    if args.profile:
        profile_dir = Path(args.profile) / ("tuned" if tuned else "stock")
        profile_dir.mkdir(parents=True, exist_ok=True)
        command += ["--profile", str(profile_dir)]
    return await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )


async def next_message(process: asyncio.subprocess.Process, deadline: float) -> dict[str, Any]:
    assert process.stdout is not None
    remaining = deadline - time.monotonic()
    try:
        line = await asyncio.wait_for(process.stdout.readline(), max(0.0, remaining))
    except TimeoutError:
        raise BenchFailed(f"child {process.pid} said nothing before the deadline") from None
    if not line:
        raise BenchFailed(f"child {process.pid} exited (code {await process.wait()})")
    message: dict[str, Any] = json.loads(line)
    if "error" in message:
        raise BenchFailed(f"child {process.pid}: {message['error']}")
    return message


def send_message(process: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
    assert process.stdin is not None
    process.stdin.write((json.dumps(message) + "\n").encode())


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.stdin is not None:
        process.stdin.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)
    await process.wait()


async def run_pair(
    device_tuned: bool, client_tuned: bool, args: argparse.Namespace
) -> dict[str, Any]:
    """One device process and one client process; the figure and both sides' set-up."""
    deadline = time.monotonic() + args.timeout + args.seconds
    device = await start_child("device", device_tuned, args)
    try:
        client = await start_child("client", client_tuned, args)
        try:
            send_message(client, await next_message(device, deadline))
            send_message(device, await next_message(client, deadline))
            results = await asyncio.gather(
                next_message(device, deadline), next_message(client, deadline)
            )
        finally:
            await stop(client)
    finally:
        await stop(device)
    device_result, client_result = (r["result"] for r in results)
    figure = device_result if args.test == "throughput" else client_result
    figure = {k: v for k, v in figure.items() if k != "side"}
    return {**figure, "sides": {"device": device_result["side"], "client": client_result["side"]}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    key = "mbps" if args.test == "throughput" else "rate"
    if args.stack != "mixed":
        tuned = args.stack == "project"
        return {"stack": args.stack, "test": args.test, **await run_pair(tuned, tuned, args)}
    tuned_sends = await run_pair(True, False, args)
    stock_sends = await run_pair(False, True, args)
    return {
        "stack": "mixed",
        "test": args.test,
        key: min(tuned_sends[key], stock_sends[key]),
        "directions": {
            "tuned device, stock client": tuned_sends,
            "stock device, tuned client": stock_sends,
        },
    }


def describe(report: dict[str, Any]) -> str:
    if "error" in report:
        return f"dcbench {report['stack']} {report['test']}: FAILED: {report['error']}"
    lines = []
    for label, one in report.get("directions", {"": report}).items():
        sides = ", ".join(
            f"{role} {'tuned' if s['tuned'] else 'stock'} on {s['loop']}"
            f" ({s['cpu_seconds']:.2f} s CPU, {s['t3_expirations']} T3)"
            for role, s in one["sides"].items()
        )
        if report["test"] == "throughput":
            figure = f"{one['mbps']:.1f} MB/s ({one['bytes']} bytes in {one['seconds']:.2f} s)"
        else:
            figure = (
                f"{one['rate']:.0f} round trips/s ({one['round_trips']} in {one['seconds']:.2f} s)"
            )
        name = f"{report['stack']} {report['test']}" + (f" ({label})" if label else "")
        lines.append(f"dcbench {name}: {figure}; {sides}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack", choices=("stock", "project", "mixed"), default="project")
    parser.add_argument("--test", choices=("throughput", "echo"), default="throughput")
    parser.add_argument("--bytes", type=positive, default=DEFAULT_BYTES)
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--profile", metavar="DIR", help="cProfile both children into DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeat", type=positive, default=1, help="runs; report the median")
    parser.add_argument("--role", choices=("device", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role:
        return run_child(args)
    reports: list[dict[str, Any]] = []
    status = 0
    for _ in range(args.repeat):
        try:
            reports.append(asyncio.run(run(args)))
        except BenchFailed as exc:
            reports.append({"stack": args.stack, "test": args.test, "error": str(exc)})
            status = 1
        if not args.json or args.repeat > 1:
            print(describe(reports[-1]), file=sys.stderr if args.json else sys.stdout)
    report = reports[-1]
    key = "mbps" if args.test == "throughput" else "rate"
    figures = [r[key] for r in reports if key in r]
    if args.repeat > 1 and figures:
        report = {**report, key: statistics.median(figures), "runs": figures}
        if not args.json:
            print(f"median {statistics.median(figures):.1f} of {figures}")
    if args.json:
        print(json.dumps(report))
    return status


if __name__ == "__main__":
    sys.exit(main())
