"""Prometheus metrics of one supervisor (exposition format 0.0.4; README "Metrics").

:class:`SupervisorMetrics` is a collector on a registry of its own. At scrape
time it reads what the core already holds for ``tunnelctl status`` and
``tunnelctl sessions`` (the session rows, the worker pool, the links,
``core.counters``). Gauges are those figures as they are;
the per-device counters (sessions, bytes, set-up times) are the sum over the
rows in the table plus a tally of the rows that left it, which
:attr:`Sessions.on_retire <supervisor.sessions.Sessions.on_retire>` hands over
as they go. A row is counted either in the table or in the tally, never both,
and its bytes only grow, so the counters never go back.

Labels are bounded by the operator's config: ``device`` (a configured device
id), ``service`` (one of that device's configured services: figures a worker
reports for any other name are not shown), a session or worker state, an ICE
path (``direct``, ``relay``), a direction. Never a session id, a client id or
an address.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from aio.metrics_http import MetricsEndpoint, MetricsListenError
from protocol.supervision import SessionState
from supervisor.errors import SupervisorError
from supervisor.sessions import ENDED, SessionRow

if TYPE_CHECKING:
    from supervisor.core import SupervisorCore

__all__ = ["SETUP_BUCKETS", "SupervisorMetrics"]

_PREFIX: Final = "tunnelctl_supervisor"
#: Seconds from a session's request to its DataChannel path being up.
SETUP_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LE: Final = (*(str(bound) for bound in SETUP_BUCKETS), "+Inf")
#: The session states shown as a gauge; ended ones are counted instead.
_CURRENT: Final = (
    SessionState.STARTING,
    SessionState.RUNNING,
    SessionState.BACKOFF,
    SessionState.STOPPING,
)
_PATHS: Final = ("direct", "relay")
_WORKER_STATES: Final = ("spawning", "idle", "busy", "exiting")
#: core.counters key -> (metric name, help).
_CORE_COUNTERS: Final = {
    "sessions_total": ("session_requests", "Session requests received, refused ones included."),
    "worker_crashes": (
        "worker_crashes",
        "Workers that crashed with a live session; each ends it, and the client's next "
        "request is its restart, under the restart policy.",
    ),
    "workers_hung": ("workers_hung", "Workers killed for missing heartbeats (heartbeat_timeout)."),
    "heartbeat_misses": (
        "heartbeat_misses",
        "Heartbeat intervals at whose end a worker had been silent for two intervals.",
    ),
    "fork_server_restarts": ("fork_server_restarts", "Times the worker fork server was restarted."),
    "bad_worker_messages": ("bad_worker_messages", "Worker messages dropped as invalid."),
    "bad_control_messages": ("bad_control_messages", "Control requests refused as invalid."),
}


@dataclass
class _Tally:
    """One device's sessions, summed; by service only for the ``exposed`` ones."""

    exposed: frozenset[str]
    started: int = 0
    ended: Counter[str] = field(default_factory=Counter)
    # service -> [bytes_in, bytes_out, streams_opened]
    services: dict[str, list[int]] = field(default_factory=dict)
    setups: list[int] = field(default_factory=lambda: [0] * (len(SETUP_BUCKETS) + 1))
    setup_sum: float = 0.0

    def add(self, row: SessionRow) -> None:
        self.started += 1
        if row.state in ENDED:
            self.ended[row.state.value] += 1
        for name, *figures in row.services:
            if name not in self.exposed:
                continue  # a worker cannot make labels, nor grow this table
            totals = self.services.setdefault(name, [0, 0, 0])
            for index, figure in enumerate(figures):
                totals[index] += figure
        if row.running_at is not None:
            seconds = max(0.0, row.running_at - row.created)
            self.setups[bisect.bisect_left(SETUP_BUCKETS, seconds)] += 1
            self.setup_sum += seconds

    def plus(self, rows: Iterable[SessionRow]) -> _Tally:
        total = _Tally(
            self.exposed,
            self.started,
            Counter(self.ended),
            {name: list(figures) for name, figures in self.services.items()},
            list(self.setups),
            self.setup_sum,
        )
        for row in rows:
            total.add(row)
        return total


class SupervisorMetrics(Collector):
    """The ``tunnelctl_supervisor_*`` metrics of ``core``; serve :attr:`registry`."""

    def __init__(self, core: SupervisorCore) -> None:
        self._core = core
        self._retired: dict[str, _Tally] = {}
        core.sessions.on_retire = self._retire
        self.registry = CollectorRegistry()
        self.registry.register(self)
        ProcessCollector(namespace=_PREFIX, registry=self.registry)

    async def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Serve :attr:`registry` at ``http://HOST:PORT/metrics`` on this event loop.

        Raises :class:`SupervisorError` (one line) if it cannot listen there.
        """
        endpoint = MetricsEndpoint(self.registry, host, port)
        try:
            await endpoint.start()
        except MetricsListenError as exc:
            raise SupervisorError(str(exc)) from None
        return endpoint

    def _retire(self, row: SessionRow) -> None:
        tally = self._retired.get(row.device)
        if tally is None:
            tally = self._retired[row.device] = _Tally(self._exposed(row.device))
        tally.add(row)

    def _exposed(self, device: str) -> frozenset[str]:
        config = next((d for d in self._core.config.devices if d.id == device), None)
        return frozenset(s.name for s in config.services) if config is not None else frozenset()

    def collect(self) -> Iterator[Metric]:
        core = self._core
        devices = [d.id for d in core.config.devices]
        services = {d.id: [s.name for s in d.services] for d in core.config.devices}
        rows = list(core.sessions)
        by_device: dict[str, list[SessionRow]] = {d: [] for d in devices}
        for row in rows:
            by_device.setdefault(row.device, []).append(row)
        tallies = {
            d: self._retired.get(d, _Tally(self._exposed(d))).plus(r) for d, r in by_device.items()
        }

        up = _gauge("device_up", "1 while the device's signaling link is registered.", ["device"])
        for device in devices:
            up.add_metric([device], 1 if core.links.get(device) == "up" else 0)
        yield up

        current = _gauge("sessions", "Sessions in the table, by state.", ["device", "state"])
        paths = _gauge(
            "ice_path_sessions", "Running sessions by ICE path in use.", ["device", "path"]
        )
        streams = _gauge("streams", "Streams open in running sessions.", ["device"])
        for device, device_rows in by_device.items():
            states = Counter(r.state for r in device_rows)
            for state in _CURRENT:
                current.add_metric([device, state.value], states[state])
            running = [r for r in device_rows if r.state is SessionState.RUNNING]
            in_use = Counter(r.path for r in running)
            for path in _PATHS:
                paths.add_metric([device, path], in_use[path])
            streams.add_metric([device], sum(r.streams for r in running))
        yield current
        yield paths
        yield streams

        started = _counter("sessions_started", "Sessions admitted to the table.", ["device"])
        ended = _counter("sessions_ended", "Sessions ended, by final state.", ["device", "state"])
        moved = _counter(
            "stream_bytes",
            "Bytes carried by streams: in = from the tunnel to the service, "
            "out = from the service into the tunnel (as of each worker's last heartbeat).",
            ["device", "service", "direction"],
        )
        opened = _counter("streams_opened", "Streams opened to a service.", ["device", "service"])
        setup = HistogramMetricFamily(
            f"{_PREFIX}_session_setup_seconds",
            "Seconds from a session's request to its connection (restart backoff included).",
            labels=["device"],
        )
        for device, tally in tallies.items():
            started.add_metric([device], tally.started)
            for state in ENDED:
                ended.add_metric([device, state.value], tally.ended[state.value])
            for service in services.get(device, ()):
                bytes_in, bytes_out, streams_opened = tally.services.get(service, (0, 0, 0))
                moved.add_metric([device, service, "in"], bytes_in)
                moved.add_metric([device, service, "out"], bytes_out)
                opened.add_metric([device, service], streams_opened)
            cumulative, buckets = 0, []
            for le, count in zip(_LE, tally.setups, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            setup.add_metric([device], buckets, sum_value=tally.setup_sum)
        yield started
        yield ended
        yield moved
        yield opened
        yield setup

        workers = _gauge("workers", "Worker processes, by state.", ["state"])
        for shown in _WORKER_STATES:
            workers.add_metric([shown], core.pool.count(shown))
        yield workers
        yield _gauge(
            "pool_target",
            "Idle workers the pool is kept at (pool_size).",
            value=core.config.pool_size,
        )
        yield _gauge(
            "fork_server_up", "1 while the worker fork server runs.", value=int(core.fork_server_up)
        )
        for key, (name, doc) in _CORE_COUNTERS.items():
            yield _counter(name, doc, value=core.counters.get(key, 0))


def _gauge(
    name: str, doc: str, labels: list[str] | None = None, *, value: float | None = None
) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{_PREFIX}_{name}", doc, value=value, labels=labels)


def _counter(
    name: str, doc: str, labels: list[str] | None = None, *, value: float | None = None
) -> CounterMetricFamily:
    return CounterMetricFamily(f"{_PREFIX}_{name}", doc, value=value, labels=labels)
