"""Prometheus metrics of one signaling node (exposition format 0.0.4; README "Metrics").

:class:`SignalingMetrics` is a collector on a registry of its own (never
``prometheus_client``'s global one: one process, one registry, nothing
registered behind our back). It reads the server's counters and gauges
(:meth:`SignalingServer.stats <signaling.server.SignalingServer.stats>`, the
router's included) when scraped, so the server counts each thing once, in
plain integers, and pays nothing between scrapes.

Labels are bounded sets, never identities: a role, an outcome or error code of
PROTOCOL.md §1.6, an authentication failure kind, a close code, a cap. Device
ids are not labels here: on a signaling node anyone holding a device token
brings a new one.

Between nodes (``--redis``, PROTOCOL.md §1.8): the router counts every
message it forwards (``messages_routed``) and, of those, the ones addressed to
a party on another node (``messages_to_nodes``, handed to the Redis bus);
``tunnelctl_signal_messages_relayed_total`` splits them ``via="local"`` and
``via="redis"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["SignalingMetrics"]

_PREFIX: Final = "tunnelctl_signal"


class SignalingMetrics(Collector):
    """The ``tunnelctl_signal_*`` metrics of a server whose counters ``stats()`` returns."""

    def __init__(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self._stats = stats
        self.registry = CollectorRegistry()
        self.registry.register(self)
        ProcessCollector(namespace=_PREFIX, registry=self.registry)

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        counters = _Families(stats)

        yield counters.gauge("connections", "Authenticated connections, by role.", "role")
        yield _gauge("tcp_connections", "TCP connections held.", stats["tcp_connections"])
        yield _gauge(
            "unauthenticated_connections",
            "Connections not authenticated yet.",
            stats["unauthenticated"],
        )
        yield _gauge("devices_online", "Devices with a registered link.", stats["devices_online"])
        yield _gauge("sessions", "Sessions being routed (pending to active).", stats["sessions"])
        yield _counter(
            "connections_opened",
            "Connections that authenticated.",
            stats["connections_total"],
        )
        yield _counter("registrations", "Device registrations accepted.", stats["registrations"])
        yield counters.counter(
            "session_requests",
            "Session requests, by outcome: forwarded to the device, or the error code.",
            "outcome",
            "session_requests.",
        )
        yield _counter(
            "sessions_established",
            "Sessions whose answer was forwarded (negotiation done).",
            stats["sessions_established"],
        )
        yield _counter(
            "device_lists", "list_devices requests answered.", stats.get("device_lists", 0)
        )
        yield counters.counter(
            "auth_failures", "Failed authentications, by kind.", "reason", "auth_failures."
        )
        yield _counter(
            "messages_received",
            "Messages received from authenticated peers.",
            stats["messages_received"],
        )
        relayed = CounterMetricFamily(
            f"{_PREFIX}_messages_relayed",
            "Messages forwarded to the other party of a session, by how.",
            labels=["via"],
        )
        to_nodes = stats.get("messages_to_nodes", 0)
        relayed.add_metric(["local"], stats["messages_routed"] - to_nodes)
        relayed.add_metric(["redis"], to_nodes)
        yield relayed
        yield _counter(
            "messages_from_nodes",
            "Messages relayed from other nodes to parties on this one.",
            stats.get("messages_from_nodes", 0),
        )
        yield _counter(
            "cluster_undeliverable",
            "Relays to other nodes that could not be delivered (the sender was told).",
            stats.get("cluster.undeliverable", 0),
        )
        yield _gauge(
            "cluster_remote_devices",
            "Devices registered on other nodes of the cluster.",
            stats.get("cluster.remote_devices", 0),
        )
        yield _counter(
            "rate_limit_drops",
            "Messages dropped by the per-connection rate limit.",
            stats["messages_dropped"],
        )
        yield counters.counter("errors", "Error messages sent, by code.", "code", "errors.")
        yield counters.counter(
            "closes", "Connections the router closed, by WebSocket close code.", "code", "closes."
        )
        yield counters.counter(
            "refused_connections",
            "Connections refused or evicted at a cap, by cap.",
            "cap",
            "refused.",
        )


class _Families:
    """Families built from the ``prefix.<label>`` keys of a stats mapping."""

    def __init__(self, stats: Mapping[str, int]) -> None:
        self._stats = stats

    def _labelled(self, prefix: str) -> list[tuple[str, int]]:
        return sorted((k[len(prefix) :], v) for k, v in self._stats.items() if k.startswith(prefix))

    def gauge(self, name: str, doc: str, label: str) -> Metric:
        family = GaugeMetricFamily(f"{_PREFIX}_{name}", doc, labels=[label])
        for value, count in self._labelled(f"{name}."):
            family.add_metric([value], count)
        return family

    def counter(self, name: str, doc: str, label: str, prefix: str) -> Metric:
        family = CounterMetricFamily(f"{_PREFIX}_{name}", doc, labels=[label])
        for value, count in self._labelled(prefix):
            family.add_metric([value], count)
        return family


def _gauge(name: str, doc: str, value: int) -> Metric:
    return GaugeMetricFamily(f"{_PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: int) -> Metric:
    return CounterMetricFamily(f"{_PREFIX}_{name}", doc, value=value)
