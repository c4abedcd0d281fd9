"""End to end: large transfers, a slow reader, and a fast stream beside a slow one.

Real processes on loopback (``tunnelctl signal``, ``start``, ``connect``); the
device exposes a :class:`~tests.e2e.large_support.LabService`. What is checked
is the flow-control design of PROTOCOL.md §2.4 and ``workers/bridge.py``: bytes
arrive intact (SHA-256 of hundreds of MiB, hashed on the fly), memory stays
bounded by the windows rather than by the transfer, a slow reader pushes back
all the way to the service, and a slow stream does not slow its neighbours.

Timings and memory figures are printed (run with ``-s`` to see them); only
generous bounds that catch real breakage are asserted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from harness import Child
from protocol.frames import INITIAL_WINDOW
from tests.e2e.conftest import READY, Tunnel
from tests.e2e.large_support import (
    Backlog,
    KiB,
    LabService,
    MiB,
    PacedReader,
    Result,
    RssSampler,
    backlog,
    download,
    load_average,
    upload,
    wait_for,
    worker_pid,
)
from workers.bridge import CHANNEL_HIGH, RECEIVE_WINDOW, STREAM_SEND_HIGH

pytestmark = pytest.mark.e2e

LARGE = 256 * MiB
#: What one busy stream may hold in a process by design (bridge.py's docstring):
#: its window, its send queue and the channel's buffer.
DESIGN_PER_STREAM = RECEIVE_WINDOW + STREAM_SEND_HIGH + CHANNEL_HIGH
#: Slack over the baseline for aiortc's own buffers, the allocator and the
#: interpreter: far below the 256 MiB a missing bound would cost.
RSS_SLACK = 64 * MiB

SLOW_RATE = 100 * KiB  # bytes per second the slow reader takes
SLOW_SIZE = 32 * MiB  # what the service is willing to send to the slow reader
SLOW_SECONDS = 10  # how long the slow reader reads slowly
BESIDE_SLOW_SIZE = 16 * MiB  # the slow download beside the fast one
DRAIN_TIMEOUT = 180.0  # reading the rest of a slow download at full speed
FAST_SIZE = 32 * MiB


def report(line: str) -> None:
    print(f"\n[large_slow] {line}", end="")


@dataclass
class Lab:
    tunnel: Tunnel
    service: LabService
    client: Child
    address: str
    worker_pid: int


@pytest.fixture
def lab(tunnel: Tunnel) -> Iterator[Lab]:
    """Device ``dev1`` exposing ``lab``, one ``tunnelctl connect`` forwarding to it."""
    service = LabService()
    try:
        tunnel.start_device("dev1", expose=f"lab={service.url}").wait_line("registered ", READY)
        runtime = tunnel.runtime_dirs[-1]
        client, address = tunnel.forward("dev1", "lab")
        yield Lab(tunnel, service, client, address, worker_pid(runtime))
    finally:
        service.close()


def memory_report(what: str, sampler: RssSampler) -> None:
    for name in sampler.pids:
        report(
            f"{what}: {name} RSS baseline {sampler.baseline[name] / MiB:.1f} MiB, "
            f"peak {sampler.peak[name] / MiB:.1f} MiB, "
            f"peak - baseline {sampler.growth(name) / MiB:+.1f} MiB "
            f"({sampler.samples} samples); CPU {sampler.cpu[name]:.1f} s"
        )


def assert_memory_bounded(sampler: RssSampler) -> None:
    for name in sampler.pids:
        bound = sampler.baseline[name] + DESIGN_PER_STREAM + RSS_SLACK
        assert sampler.peak[name] <= bound, (
            f"{name}: RSS peak {sampler.peak[name] / MiB:.1f} MiB above baseline "
            f"{sampler.baseline[name] / MiB:.1f} MiB + {DESIGN_PER_STREAM / MiB:.1f} MiB "
            f"(design) + {RSS_SLACK / MiB:.0f} MiB (slack)"
        )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_256_mib_download_is_intact_and_memory_stays_bounded(lab: Lab) -> None:
    sampler = RssSampler({"device worker": lab.worker_pid, "client": lab.client.pid})
    sampler.start()
    try:
        result = download(lab.address, LARGE, seed=1)
    finally:
        sampler.stop()
    transfer = lab.service.next_transfer(READY)
    assert transfer.done.wait(READY)
    assert transfer.error is None, transfer.error
    report(
        f"download {LARGE / MiB:.0f} MiB in {result.seconds:.1f} s: {result.mib_per_s:.2f} MiB/s"
    )
    memory_report("download", sampler)
    assert transfer.count == result.count == LARGE
    assert result.sha256 == transfer.sha256
    assert_memory_bounded(sampler)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_256_mib_upload_is_intact_and_memory_stays_bounded(lab: Lab) -> None:
    sampler = RssSampler({"device worker": lab.worker_pid, "client": lab.client.pid})
    sampler.start()
    try:
        sent, reply = upload(lab.address, LARGE, seed=2)
    finally:
        sampler.stop()
    transfer = lab.service.next_transfer(READY)
    assert transfer.done.wait(READY)
    assert transfer.error is None, transfer.error
    report(
        f"upload {LARGE / MiB:.0f} MiB in {sent.seconds:.1f} s: "
        f"{sent.mib_per_s:.2f} MiB/s; {load_average()}"
    )
    memory_report("upload", sampler)
    assert sent.count == transfer.count == LARGE
    assert transfer.sha256 == sent.sha256
    assert reply == f"OK {LARGE} {sent.sha256}"  # the answer came back through the tunnel
    assert_memory_bounded(sampler)


def backlog_report(b: Backlog) -> str:
    return (
        f"t={b.seconds:5.1f} s  service wrote {b.written / KiB:7.0f} KiB  "
        f"reader read {b.read / KiB:6.0f} KiB  in flight {b.in_flight / KiB:6.0f} KiB "
        f"= kernel {b.kernel / KiB:5.0f} KiB (service sendq {b.service_sendq / KiB:.0f}, "
        f"worker recvq {b.worker_recvq / KiB:.0f}, client sendq {b.client_sendq / KiB:.0f}, "
        f"reader recvq {b.reader_recvq / KiB:.0f}) + held by tunnelctl {b.held / KiB:4.0f} KiB"
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_slow_reader_pushes_back_to_the_service(lab: Lab) -> None:
    """The service is willing to send SLOW_SIZE at once; the reader takes 100 KiB/s.
    The service must be held back to what the reader took plus a bounded backlog
    (a window and a send queue in the tunnelctl processes, the sockets' kernel
    buffers), and neither process may take the megabytes in."""
    sampler = RssSampler({"device worker": lab.worker_pid, "client": lab.client.pid})
    sampler.start()
    reader = PacedReader(lab.address, SLOW_SIZE, seed=3, rate=SLOW_RATE)
    try:
        transfer = lab.service.next_transfer(READY)
        t0 = time.monotonic()
        reader.start()
        samples: list[Backlog] = []
        for second in range(1, SLOW_SECONDS + 1):
            time.sleep(max(0.0, t0 + second - time.monotonic()))  # the sampling cadence
            samples.append(backlog(transfer, reader, lab.service.port, t0))
        growth_slow = {name: sampler.current_growth(name) for name in sampler.pids}
        reader.go_fast()
        reader.join(DRAIN_TIMEOUT)
    finally:
        reader.close()
        sampler.stop()
    for sample in samples:
        report(backlog_report(sample))
    last, middle = samples[-1], samples[len(samples) // 2]
    report(
        f"slow phase: reader {last.read / last.seconds / KiB:.0f} KiB/s; from "
        f"t={middle.seconds:.0f} to {last.seconds:.0f} s the service wrote "
        f"{(last.written - middle.written) / KiB:.0f} KiB while the reader read "
        f"{(last.read - middle.read) / KiB:.0f} KiB; most held by tunnelctl at once: "
        f"{max(b.held for b in samples) / KiB:.0f} KiB (design: window "
        f"{INITIAL_WINDOW // KiB}-{RECEIVE_WINDOW // KiB} + send queue "
        f"{STREAM_SEND_HIGH // KiB} KiB + read buffers)"
    )
    for name, growth in growth_slow.items():
        report(f"slow phase: {name} RSS at the end - baseline {growth / MiB:+.2f} MiB")
    memory_report("slow reader, whole test", sampler)
    if reader.fast_seconds is not None:
        report(
            f"then the rest, {(SLOW_SIZE - last.read) / MiB:.1f} MiB, at full speed in "
            f"{reader.fast_seconds:.1f} s; {load_average()}"
        )
    # Held back: the service managed only a fraction of what it wanted to send,
    # about what the reader took plus the path's buffers...
    assert last.written < SLOW_SIZE / 2, backlog_report(last)
    # ...pushed back through the device worker, which stopped reading its service
    # (the bytes wait in the worker's socket, not in the worker)...
    assert last.worker_recvq > 0, backlog_report(last)
    # ...and what the tunnelctl processes hold is the design's per-stream figure,
    # not the backlog the service would have sent (that sits in kernel buffers).
    assert max(b.held for b in samples) < 2 * MiB, [backlog_report(b) for b in samples]
    for name, growth in growth_slow.items():
        assert growth < 8 * MiB, f"{name} RSS grew {growth / MiB:.1f} MiB beside a slow reader"
    # And the stalled stream, once read, is intact.
    assert reader.error is None, reader.error
    assert transfer.done.wait(READY)
    assert transfer.error is None, transfer.error
    assert reader.count == transfer.count == SLOW_SIZE
    assert reader.sha256 == transfer.sha256


def timed_download(lab: Lab, size: int, seed: int) -> Result:
    result = download(lab.address, size, seed)
    transfer = lab.service.next_transfer(READY)
    assert transfer.done.wait(READY)
    assert transfer.error is None, transfer.error
    assert result.count == transfer.count == size
    assert result.sha256 == transfer.sha256
    return result


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_fast_stream_beside_a_slow_one_on_the_same_session(lab: Lab) -> None:
    """One ``tunnelctl connect`` (one session), two TCP connections: a FAST_SIZE
    download timed alone (before and after) and beside a backlogged slow reader."""
    timed_download(lab, 4 * MiB, seed=10)  # warm-up: the session's first bytes
    alone = timed_download(lab, FAST_SIZE, seed=11)
    slow = PacedReader(lab.address, BESIDE_SLOW_SIZE, seed=12, rate=SLOW_RATE)
    try:
        slow_transfer = lab.service.next_transfer(READY)
        t0 = time.monotonic()
        slow.start()

        def backlogged() -> bool:
            # Bytes wait on both sides of the tunnel: the device worker has stopped
            # reading the service (no credit) and the client has more than the
            # reader takes. The slow stream is flow-controlled from here on.
            b = backlog(slow_transfer, slow, lab.service.port, t0)
            return b.worker_recvq > INITIAL_WINDOW and b.client_sendq > INITIAL_WINDOW

        filled = wait_for(backlogged, READY, "the slow stream to back up")
        before = backlog(slow_transfer, slow, lab.service.port, t0)
        beside = timed_download(lab, FAST_SIZE, seed=13)
        after = backlog(slow_transfer, slow, lab.service.port, t0)
        slow.go_fast()
        slow.join(DRAIN_TIMEOUT)
    finally:
        slow.close()
    again = timed_download(lab, FAST_SIZE, seed=14)
    mean_alone = (alone.seconds + again.seconds) / 2
    factor = beside.seconds / mean_alone
    report(
        f"fast {FAST_SIZE / MiB:.0f} MiB alone: {alone.seconds:.1f} s "
        f"({alone.mib_per_s:.2f} MiB/s); alone again after: {again.seconds:.1f} s "
        f"({again.mib_per_s:.2f} MiB/s)"
    )
    report(
        f"fast {FAST_SIZE / MiB:.0f} MiB beside the slow reader: {beside.seconds:.1f} s "
        f"({beside.mib_per_s:.2f} MiB/s); beside / mean alone = {factor:.2f}; {load_average()}"
    )
    report(f"slow stream backed up in {filled:.2f} s: {backlog_report(before)}")
    report(f"slow stream after the fast transfer: {backlog_report(after)}")
    assert after.read < BESIDE_SLOW_SIZE  # the slow reader was still slow all along
    assert slow.error is None, slow.error
    assert slow_transfer.done.wait(READY)
    assert slow_transfer.error is None, slow_transfer.error
    assert slow.count == slow_transfer.count == BESIDE_SLOW_SIZE
    assert slow.sha256 == slow_transfer.sha256
    assert factor < 3.0, f"the fast stream was {factor:.1f}x slower beside a slow one"
