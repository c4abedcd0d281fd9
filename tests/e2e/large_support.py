"""Helpers for the large and slow end-to-end transfers (``test_large_slow.py``).

* :class:`Pattern`: a deterministic, non-periodic byte stream generated chunk by
  chunk, so hundreds of MiB can be sent and hashed without being held.
* :class:`LabService`: the TCP service a device exposes in these tests.
  ``GET SIZE SEED\\n`` streams SIZE pattern bytes and closes; ``PUT\\n`` reads to
  EOF, hashes, then answers ``OK COUNT SHA256\\n``. Each connection is a
  :class:`Transfer` whose byte count the test can watch while it runs (the
  service's own socket send buffer is kept small, so its count is what it
  really managed to hand to the tunnel, give or take that buffer).
* :class:`PacedReader`: reads a download at a set rate (the slow reader), or
  as fast as it can once :meth:`PacedReader.go_fast` is called.
* :class:`RssSampler`: samples VmRSS of some processes from ``/proc`` in a
  thread, plus the kernel's own high-water mark (VmHWM, reset first through
  ``/proc/PID/clear_refs``), so a spike between two samples is not missed.
* :func:`tcp_queues`: the kernel's send/receive queue of a loopback TCP socket
  (``/proc/net/tcp``), to tell bytes parked in the kernel from bytes held by a
  process.

Every blocking call here has a timeout; every thread is a daemon and stops on
its own when its socket closes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB
IO_TIMEOUT = 120.0  # any single blocking socket call; a stuck transfer fails, never hangs
CHUNK = 256 * KiB
SERVICE_SNDBUF = 64 * KiB  # the kernel doubles it: ~128 KiB of send buffer per download


class Pattern:
    """SIZE bytes for a SEED: 256 KiB chunks, each an 8-byte counter and a slice of
    a 4 MiB random block at a per-chunk offset. Cheap to make (one copy a chunk),
    no two chunks alike, so a lost, repeated or reordered chunk changes the hash."""

    _BLOCK = 4 * MiB

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self._block = random.Random(seed).randbytes(self._BLOCK)

    def __iter__(self) -> Iterator[bytes]:
        body = CHUNK - 8
        span = self._BLOCK - body
        left = self.size
        index = 0
        while left > 0:
            offset = (index * 40_503 + self.seed) % span
            chunk = struct.pack(">Q", index) + self._block[offset : offset + body]
            if left < CHUNK:
                chunk = chunk[:left]
            left -= len(chunk)
            index += 1
            yield chunk


@dataclass(eq=False)
class Transfer:
    """One connection to the :class:`LabService`, as the service sees it."""

    kind: str  # "GET" or "PUT"
    size: int  # GET: bytes to send; PUT: 0 (unknown until EOF)
    peer_port: int  # the device worker's end of the connection
    local_port: int
    count: int = 0  # GET: bytes the service managed to send; PUT: bytes received
    sha256: str | None = None  # of everything sent / received, once complete
    error: BaseException | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    done: threading.Event = field(default_factory=threading.Event)


class LabService:
    """A threaded TCP service on 127.0.0.1 (see the module docstring)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.5)  # so the accept loop notices close()
        self.port: int = self._listener.getsockname()[1]
        self.transfers: queue.Queue[Transfer] = queue.Queue()
        self._conns: list[socket.socket] = []
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="lab-accept", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def next_transfer(self, timeout: float) -> Transfer:
        """The next connection the service accepted (in order of its request line)."""
        return self.transfers.get(timeout=timeout)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
                conn.close()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVICE_SNDBUF)
        transfer: Transfer | None = None
        try:
            words = _read_line(conn).split()
            kind = words[0] if words else ""
            size = int(words[1]) if kind == "GET" else 0
            transfer = Transfer(kind, size, conn.getpeername()[1], conn.getsockname()[1])
            self.transfers.put(transfer)
            if kind == "GET":
                self._send_pattern(conn, transfer, Pattern(size, int(words[2])))
            elif kind == "PUT":
                self._sink(conn, transfer)
            else:
                raise ValueError(f"bad request line {words!r}")
        except BaseException as exc:  # recorded for the test to assert on
            if transfer is None:
                transfer = Transfer("?", 0, 0, 0)
                self.transfers.put(transfer)
            transfer.error = exc
        finally:
            if transfer is not None:
                transfer.finished = time.monotonic()
                transfer.done.set()
            with contextlib.suppress(OSError):
                conn.close()

    def _send_pattern(self, conn: socket.socket, transfer: Transfer, pattern: Pattern) -> None:
        digest = hashlib.sha256()
        for chunk in pattern:
            view = memoryview(chunk)
            while view:
                sent = conn.send(view)  # counts what the kernel really took, not what we meant
                transfer.count += sent
                view = view[sent:]
            digest.update(chunk)
        transfer.sha256 = digest.hexdigest()
        conn.shutdown(socket.SHUT_WR)
        # Wait for the other end to close, so the data is not cut off by an RST.
        with contextlib.suppress(OSError):
            while conn.recv(CHUNK):
                pass

    def _sink(self, conn: socket.socket, transfer: Transfer) -> None:
        digest = hashlib.sha256()
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        while n := conn.recv_into(buffer):
            digest.update(view[:n])
            transfer.count += n
        transfer.sha256 = digest.hexdigest()
        conn.sendall(f"OK {transfer.count} {transfer.sha256}\n".encode())
        conn.shutdown(socket.SHUT_WR)


def _read_line(conn: socket.socket, limit: int = 200) -> str:
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte or len(line) > limit:
            raise ValueError(f"no request line: {bytes(line)!r}")
        line += byte
    return line.decode().strip()


def connect(address: str, *, rcvbuf: int | None = None) -> socket.socket:
    """A TCP connection to a ``HOST:PORT`` forward; ``rcvbuf`` is set before connecting."""
    host, port = address.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(IO_TIMEOUT)
    sock.connect((host, int(port)))
    return sock


@dataclass
class Result:
    count: int
    sha256: str
    seconds: float
    reply: str = ""

    @property
    def mib_per_s(self) -> float:
        return self.count / MiB / self.seconds if self.seconds > 0 else float("inf")


def download(address: str, size: int, seed: int) -> Result:
    """GET ``size`` pattern bytes through the forward at full speed, hashing on the fly."""
    with connect(address) as sock:
        started = time.perf_counter()
        sock.sendall(f"GET {size} {seed}\n".encode())
        digest = hashlib.sha256()
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        count = 0
        while n := sock.recv_into(buffer):
            digest.update(view[:n])
            count += n
        return Result(count, digest.hexdigest(), time.perf_counter() - started)


def upload(address: str, size: int, seed: int) -> tuple[Result, str]:
    """PUT ``size`` pattern bytes through the forward; return what was sent (count,
    hash, seconds until the service's answer arrived) and the service's answer."""
    with connect(address) as sock:
        started = time.perf_counter()
        sock.sendall(b"PUT\n")
        digest = hashlib.sha256()
        count = 0
        for chunk in Pattern(size, seed):
            sock.sendall(chunk)
            digest.update(chunk)
            count += len(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = bytearray()
        while data := sock.recv(4096):
            reply += data
        seconds = time.perf_counter() - started
    return Result(count, digest.hexdigest(), seconds), reply.decode().strip()


class PacedReader(threading.Thread):
    """Reads a GET through a forward at ``rate`` bytes/s until :meth:`go_fast`,
    then at full speed until EOF, hashing everything."""

    def __init__(
        self, address: str, size: int, seed: int, *, rate: float, rcvbuf: int = 64 * KiB
    ) -> None:
        super().__init__(name="paced-reader", daemon=True)
        self.sock = connect(address, rcvbuf=rcvbuf)
        self.sock.sendall(f"GET {size} {seed}\n".encode())
        self.local_port: int = self.sock.getsockname()[1]
        self.remote_port: int = self.sock.getpeername()[1]
        self.rate = rate
        self.count = 0
        self.sha256: str | None = None
        self.error: BaseException | None = None
        self.fast_seconds: float | None = None
        self._fast = threading.Event()

    def go_fast(self) -> None:
        self._fast.set()

    def close(self) -> None:
        self._fast.set()
        with contextlib.suppress(OSError):
            self.sock.close()

    def run(self) -> None:
        digest = hashlib.sha256()
        started = time.monotonic()
        fast_from: float | None = None
        try:
            while True:
                if not self._fast.is_set():
                    due = started + self.count / self.rate - time.monotonic()
                    if due > 0:
                        self._fast.wait(due)  # the pace of a slow reader (wakes on go_fast)
                if self._fast.is_set() and fast_from is None:
                    fast_from = time.monotonic()
                want = CHUNK if self._fast.is_set() else 8 * KiB
                data = self.sock.recv(want)
                if not data:
                    break
                digest.update(data)
                self.count += len(data)
            self.sha256 = digest.hexdigest()
            if fast_from is not None:
                self.fast_seconds = time.monotonic() - fast_from
        except BaseException as exc:
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * KiB
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> bool:
    """Reset the kernel's VmHWM of ``pid`` to its current RSS (Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class RssSampler(threading.Thread):
    """Samples VmRSS of named processes every ``interval`` until :meth:`stop`.

    ``baseline`` is taken when constructed (so construct it right before the
    transfer); ``peak`` is the larger of the highest sample and the kernel's
    VmHWM (reset at construction), so a spike between samples still counts.
    After :meth:`stop`, ``cpu`` is the CPU seconds each process used meanwhile.
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pids = dict(pids)
        self.interval = interval
        self.hwm_reset = {name: reset_peak(pid) for name, pid in self.pids.items()}
        self.baseline = {name: read_status(pid)["VmRSS"] for name, pid in self.pids.items()}
        self.peak = dict(self.baseline)
        self.cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):  # the sampling cadence
            self._sample()

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError, KeyError):
                rss = read_status(pid)["VmRSS"]
                self.peak[name] = max(self.peak[name], rss)
        self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self._sample()
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                self.cpu[name] = cpu_seconds(pid) - self.cpu[name]
            if self.hwm_reset[name]:
                with contextlib.suppress(OSError, KeyError):
                    self.peak[name] = max(self.peak[name], read_status(pid)["VmHWM"])

    def growth(self, name: str) -> int:
        return self.peak[name] - self.baseline[name]

    def current_growth(self, name: str) -> int:
        return read_status(self.pids[name])["VmRSS"] - self.baseline[name]


def tcp_queues(local_port: int, remote_port: int) -> tuple[int, int]:
    """(send queue, receive queue) in bytes of the IPv4 loopback TCP socket
    ``127.0.0.1:local_port -> 127.0.0.1:remote_port``; (0, 0) if there is none.

    The send queue counts everything written and not yet acknowledged by the
    peer (sent or not); the receive queue what arrived and was not yet read.
    """
    want_local = f"0100007F:{local_port:04X}"
    want_remote = f"0100007F:{remote_port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[1] == want_local and fields[2] == want_remote:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return 0, 0


def worker_pid(runtime_dir: str, timeout: float = 30.0) -> int:
    """The device-side worker of the (single) running session in ``runtime_dir``."""
    deadline = time.monotonic() + timeout
    rows: object = None
    while time.monotonic() < deadline:
        result = subprocess.run(
            [sys.executable, "-m", "tunnelctl", "sessions", "--json", "--runtime-dir", runtime_dir],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        rows = json.loads(result.stdout)
        assert isinstance(rows, list)
        running = [r for r in rows if r["state"] == "running" and r.get("worker_pid")]
        if running:
            return int(running[-1]["worker_pid"])
        time.sleep(0.1)  # polling the supervisor's view, bounded by the deadline
    raise AssertionError(f"no running session in {runtime_dir} within {timeout} s: {rows}")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; return the seconds it took; fail after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.02)  # polling a condition, bounded by the deadline
    return time.monotonic() - started


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f}/{five:.1f} on {os.cpu_count()} CPUs"


@dataclass(frozen=True)
class Backlog:
    """Where a download's bytes are at one instant: sent by the service, read by
    the reader, or parked in the kernel's queues of the two TCP legs (service →
    device worker, client → reader)."""

    seconds: float
    written: int  # by the service (all the kernel took from it)
    read: int  # by the reader
    service_sendq: int  # kernel: the service's socket, written, not yet acked
    worker_recvq: int  # kernel: the device worker's socket, arrived, not yet read
    client_sendq: int  # kernel: the client's socket to the reader
    reader_recvq: int  # kernel: the reader's socket

    @property
    def kernel(self) -> int:
        return self.service_sendq + self.worker_recvq + self.client_sendq + self.reader_recvq

    @property
    def in_flight(self) -> int:
        return self.written - self.read

    @property
    def held(self) -> int:
        """Held by the two tunnelctl processes and the tunnel itself (in user space)."""
        return self.in_flight - self.kernel


def backlog(transfer: Transfer, reader: PacedReader, service_port: int, t0: float) -> Backlog:
    written, read = transfer.count, reader.count
    return Backlog(
        time.monotonic() - t0,
        written,
        read,
        service_sendq=tcp_queues(service_port, transfer.peer_port)[0],
        worker_recvq=tcp_queues(transfer.peer_port, service_port)[1],
        client_sendq=tcp_queues(reader.remote_port, reader.local_port)[0],
        reader_recvq=tcp_queues(reader.local_port, reader.remote_port)[1],
    )
