"""Signaling nodes sharing presence and routing through Redis (PROTOCOL.md §1.8).

The I/O shell between a node's :class:`~signaling.router.Router` and Redis
(the ``redis`` package's asyncio client, RESP over TCP). The router decides;
this carries :class:`~signaling.router.Relay` and
:class:`~signaling.router.Presence` actions out (``PUBLISH`` on the
recipient node's channel, ``INCR``/``SET`` of presence keys) and feeds what
other nodes publish back in (:meth:`Router.receive_remote`,
:meth:`Router.remote_registered`, ...).

Contract: ``RedisCluster(url, node)``; the server calls :meth:`attach` with
its router and its action runner, ``await start()`` (raises
:class:`~signaling.errors.ServerConfigError` if Redis does not answer),
:meth:`handle` for each cluster action (never blocks: actions are carried
out in order by one task), ``await close()`` at the end. While Redis is away
the node keeps serving its own connections; relays fail and their senders
are told, and the node reconnects with capped backoff and announces itself
and its devices again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from protocol.backoff import Backoff
from signaling.envelope import (
    DEVICE_KEY_PATTERN,
    GEN_KEY,
    PRESENCE_CHANNEL,
    EnvelopeError,
    GoneEnvelope,
    PresenceDown,
    PresenceUp,
    RelayEnvelope,
    decode_envelope,
    device_key,
    encode_envelope,
    node_channel,
    node_key,
)
from signaling.errors import ServerConfigError
from signaling.router import Action, Presence, Relay, RemoteConn, Router

__all__ = ["REFRESH_INTERVAL", "TTL", "RedisCluster", "new_node_id"]

log = logging.getLogger("tunnelctl.signal.cluster")

#: Presence and liveness keys live this long unless refreshed (PROTOCOL.md §1.8).
TTL: Final = 15.0
REFRESH_INTERVAL: Final = 5.0
#: How long closing waits for what is queued for Redis.
CLOSE_FLUSH: Final = 2.0
#: Relays sent to Redis in one pipeline at most.
MAX_BATCH: Final = 256

# Refresh or delete a key only while it holds what this node wrote: a newer
# registration on another node must not be clobbered.
_REFRESH_IF_MINE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_DELETE_IF_MINE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def new_node_id() -> str:
    """A node id for a node not given one: random, so two never collide."""
    return f"node-{secrets.token_hex(4)}"


@dataclass(slots=True, eq=False)
class _Registration:
    """A device registered here: ``gen`` and the key's ``value`` once written."""

    device: str
    conn: int
    services: tuple[str, ...] = ()
    gen: int | None = None
    value: str | None = None


@dataclass(frozen=True, slots=True)
class _Withdraw:
    """The registration ``reg`` ended here."""

    reg: _Registration


@dataclass(frozen=True, slots=True)
class _Post:
    """Publish ``text`` on ``channel``, nothing more."""

    channel: str
    text: str


class RedisCluster:
    """One node's side of the cluster. See the module docstring."""

    def __init__(
        self,
        url: str,
        node: str,
        *,
        ttl: float = TTL,
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        self.node = node
        self._url = url
        self._ttl_ms = int(ttl * 1000)
        self._refresh_interval = refresh_interval
        self._redis: Redis | None = None
        self._router: Router | None = None
        self._apply: Callable[[list[Action]], None] = lambda actions: None
        # What to do in Redis, in order; a deque (not asyncio.Queue) so that the
        # relays at its head can be taken as one batch.
        self._pending: deque[Relay | _Registration | _Withdraw | _Post] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # nothing pending, nothing in flight
        self._local: dict[str, _Registration] = {}
        self._remote_gens: dict[str, tuple[RemoteConn, int]] = {}
        self._resync = False  # presence to read again from Redis
        self._listening = False  # subscribed to this node's channel
        self._heard = asyncio.Event()  # subscribed once
        self._tasks: list[asyncio.Task[None]] = []
        self._started = time.time()
        self.relays_published = 0
        self.relays_received = 0
        self.undeliverable = 0

    def attach(self, router: Router, apply: Callable[[list[Action]], None]) -> None:
        """Route for ``router``; ``apply`` carries out the actions it returns."""
        self._router = router
        self._apply = apply

    async def start(self) -> None:
        """Connect and start relaying. Raises :class:`ServerConfigError` if Redis
        does not answer (a node must not start alone and believe it is a cluster)."""
        if self._router is None:
            raise RuntimeError("attach() a router first")
        try:
            self._redis = Redis.from_url(
                self._url,
                socket_connect_timeout=5,
                socket_timeout=10,
                # A pooled connection that Redis closed (it restarted) fails
                # once; retrying on a new one must not turn that into a relay
                # lost and a sender told "offline" for nothing.
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            )
            await self._redis.ping()
        except (RedisError, OSError, ValueError) as exc:
            raise ServerConfigError(f"cannot use Redis at {_safe(self._url)}: {exc}") from None
        if not await self._write_node_key():
            log.warning(
                "node %s: that node id is live in Redis already: node ids must be unique "
                "(fine if this node restarted within %g s)",
                self.node,
                self._ttl_ms / 1000,
            )
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="cluster-publish"),
            asyncio.create_task(self._listen_loop(), name="cluster-listen"),
            asyncio.create_task(self._refresh_loop(), name="cluster-refresh"),
        ]
        try:
            # Relays made before the node hears its channel would be refused.
            await asyncio.wait_for(self._heard.wait(), 10.0)
        except TimeoutError:
            await self.close()
            raise ServerConfigError(f"cannot subscribe in Redis at {_safe(self._url)}") from None
        log.info("node %s: cluster through Redis at %s", self.node, _safe(self._url))

    async def close(self) -> None:
        """Stop; remove this node's keys (best effort: they expire anyway)."""
        if self._tasks:
            # The registrations that ended as the connections closed: their
            # "down" tells the other nodes now rather than by TTL. Waiting for
            # the publisher to be idle also keeps the cancel below out of a
            # Redis command in flight.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), CLOSE_FLUSH)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a task the Redis client keeps busy must not hold the exit.
            _, stuck = await asyncio.wait(self._tasks, timeout=CLOSE_FLUSH)
            if stuck:
                log.warning("node %s: %d cluster tasks did not stop", self.node, len(stuck))
        self._tasks = []
        if self._redis is None:
            return
        redis, self._redis = self._redis, None
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_FLUSH):
                for reg in list(self._local.values()):
                    if reg.value is not None:
                        await redis.eval(_DELETE_IF_MINE, 1, device_key(reg.device), reg.value)
                await redis.delete(node_key(self.node))
                await redis.aclose()

    def handle(self, action: Relay | Presence) -> None:
        """Carry out ``action`` (in order with the others, without blocking)."""
        if isinstance(action, Presence):
            assert isinstance(action.conn, int)
            if action.online:
                reg = _Registration(action.device, action.conn, action.services)
                # Known at once, before its gen: a registration elsewhere that
                # arrives meanwhile is the older one (its INCR came first).
                self._local[action.device] = reg
                self._put(reg)
                return
            reg_now = self._local.get(action.device)
            if reg_now is not None and reg_now.conn == action.conn:
                del self._local[action.device]
                self._put(_Withdraw(reg_now))
            return
        self._put(action)

    def _put(self, item: Relay | _Registration | _Withdraw | _Post) -> None:
        self._pending.append(item)
        self._idle.clear()
        self._wakeup.set()

    def stats(self) -> dict[str, int]:
        return {
            "cluster.relays_published": self.relays_published,
            "cluster.relays_received": self.relays_received,
            "cluster.undeliverable": self.undeliverable,
            "cluster.remote_devices": len(self._remote_gens),
        }

    # --- out ---------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        pending = self._pending
        while True:
            if not pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            item = pending.popleft()
            if isinstance(item, Relay):
                # Relays queued meanwhile go in one pipeline, in order: one
                # round trip to Redis for all of them, not one each.
                batch = [item]
                while pending and len(batch) < MAX_BATCH and isinstance(pending[0], Relay):
                    batch.append(pending.popleft())  # type: ignore[arg-type]
                await self._relay_batch(batch)
                continue
            try:
                if isinstance(item, _Registration):
                    await self._announce(item)
                elif isinstance(item, _Withdraw):
                    await self._withdraw(item.reg)
                else:
                    await self._redis_client.publish(item.channel, item.text)
            except (RedisError, OSError) as exc:
                log.warning("node %s: Redis: %s", self.node, exc)

    async def _relay_batch(self, batch: list[Relay]) -> None:
        if not self._listening:
            # The answers could not reach this node: its sender is told now,
            # rather than its session left waiting for them.
            for relay in batch:
                self._undeliverable(relay.to, relay)
            return
        try:
            async with self._redis_client.pipeline(transaction=False) as pipe:
                for relay in batch:
                    assert isinstance(relay.origin, int)
                    env = RelayEnvelope(
                        self.node, relay.origin, relay.role, relay.sub, relay.to.conn, relay.message
                    )
                    pipe.publish(node_channel(relay.to.node), encode_envelope(env))
                receivers = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("node %s: cannot relay through Redis: %s", self.node, exc)
            receivers = [0] * len(batch)
            # Their senders are told, and the router forgets the presence the
            # relays named: read it again once Redis answers.
            self._resync = True
        self.relays_published += len(batch)
        for relay, count in zip(batch, receivers, strict=True):
            if not count:
                self._undeliverable(relay.to, relay)

    def _undeliverable(self, to: RemoteConn, relay: Relay) -> None:
        assert self._router is not None
        self.undeliverable += 1
        log.info("node %s: cannot relay to node %s; telling the sender", self.node, to.node)
        self._apply(self._router.remote_gone(to, relay.message))

    async def _announce(self, reg: _Registration) -> None:
        assert self._redis is not None
        gen = int(await self._redis.incr(GEN_KEY))
        if self._local.get(reg.device) is not reg:
            return  # already gone or replaced here
        reg.gen = gen
        reg.value = json.dumps(
            {
                "v": 1,
                "node": self.node,
                "conn": reg.conn,
                "gen": gen,
                "services": list(reg.services),
            },
            separators=(",", ":"),
        )
        await self._redis.set(device_key(reg.device), reg.value, px=self._ttl_ms)
        up = PresenceUp(reg.device, self.node, reg.conn, gen, reg.services)
        await self._redis.publish(PRESENCE_CHANNEL, encode_envelope(up))

    async def _withdraw(self, reg: _Registration) -> None:
        assert self._redis is not None
        # _announce ran before this, in queue order: value is set if it was written.
        if reg.value is None or reg.gen is None:
            return
        await self._redis.eval(_DELETE_IF_MINE, 1, device_key(reg.device), reg.value)
        down = PresenceDown(reg.device, self.node, reg.conn, reg.gen)
        await self._redis.publish(PRESENCE_CHANNEL, encode_envelope(down))

    # --- in ----------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        assert self._redis is not None
        # Redis is near and cheap to ask: a node deaf to its channel must not
        # stay so for long.
        backoff = Backoff(base=0.1, cap=1.0)
        while True:
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(node_channel(self.node), PRESENCE_CHANNEL)
                    await self._heal()
                    self._listening = True
                    self._heard.set()
                    backoff.reset()
                    while True:
                        message = await pubsub.get_message(timeout=None)
                        if message is not None:
                            self._on_message(message)
                finally:
                    self._listening = False
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            except (RedisError, OSError) as exc:
                log.warning("node %s: lost Redis (%s); reconnecting", self.node, exc)
            await asyncio.sleep(backoff.next_delay())

    def _on_message(self, message: dict[str, Any]) -> None:
        assert self._router is not None
        try:
            env = decode_envelope(message["data"])
        except EnvelopeError as exc:
            log.warning("node %s: ignored a bad envelope: %s", self.node, exc)
            return
        router = self._router
        match env:
            case RelayEnvelope():
                self.relays_received += 1
                sender = RemoteConn(env.node, env.conn)
                if not router.is_connected(env.to):
                    gone = GoneEnvelope(self.node, env.to, env.conn, env.message)
                    self._put(_Post(node_channel(env.node), encode_envelope(gone)))
                    return
                self._apply(router.receive_remote(env.to, sender, env.role, env.sub, env.message))
            case GoneEnvelope():
                at = RemoteConn(env.node, env.conn)
                self.undeliverable += 1
                self._apply(router.remote_gone(at, env.message))
            case PresenceUp() if env.node != self.node:
                self._on_up(env)
            case PresenceDown() if env.node != self.node:
                known = self._remote_gens.get(env.device)
                at = RemoteConn(env.node, env.conn)
                if known == (at, env.gen):
                    del self._remote_gens[env.device]
                    router.remote_unregistered(env.device, at)

    def _on_up(self, env: PresenceUp) -> None:
        assert self._router is not None
        mine = self._local.get(env.device)
        if mine is not None and (mine.gen is None or mine.gen > env.gen):
            return  # ours is the newer registration
        known = self._remote_gens.get(env.device)
        if known is not None and known[1] > env.gen:
            return  # an older announcement arriving late
        at = RemoteConn(env.node, env.conn)
        self._remote_gens[env.device] = (at, env.gen)
        self._apply(self._router.remote_registered(env.device, at, env.services))

    @property
    def _redis_client(self) -> Redis:
        assert self._redis is not None
        return self._redis

    # --- liveness ----------------------------------------------------------------

    async def _write_node_key(self) -> bool:
        """Write this node's key; returns whether it was missing (Redis lost it)."""
        assert self._redis is not None
        # Seeded with the time in ms, so gens keep growing when a Redis without
        # persistence comes back empty: newest-wins stays right across it.
        await self._redis.set(GEN_KEY, int(time.time() * 1000), nx=True)
        value = json.dumps({"v": 1, "started": int(self._started)}, separators=(",", ":"))
        created = await self._redis.set(node_key(self.node), value, px=self._ttl_ms, nx=True)
        if not created:
            await self._redis.pexpire(node_key(self.node), self._ttl_ms)
        elif self._tasks:  # running, so the key was there: Redis lost it
            log.warning("node %s: Redis had lost this node; announcing again", self.node)
        return bool(created)

    async def _heal(self) -> None:
        """After (re)subscribing: announce every local device again, with new
        gens, and read the others' presence (PROTOCOL.md §1.8, "Redis restarted")."""
        assert self._redis is not None and self._router is not None
        await self._write_node_key()
        for reg in list(self._local.values()):
            fresh = _Registration(reg.device, reg.conn, reg.services)
            self._local[reg.device] = fresh
            self._put(fresh)
        await self._reload_presence()

    async def _reload_presence(self) -> None:
        """Take the others' presence from Redis, forgetting what it no longer holds."""
        assert self._redis is not None and self._router is not None
        self._resync = False
        stale = dict(self._remote_gens)
        self._remote_gens.clear()  # what Redis holds now is the truth
        keys = [key async for key in self._redis.scan_iter(match=DEVICE_KEY_PATTERN, count=1000)]
        values = await self._redis.mget(keys) if keys else []
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue
            try:
                entry = json.loads(raw)
                up = PresenceUp(
                    _device_of(key),
                    entry["node"],
                    int(entry["conn"]),
                    int(entry["gen"]),
                    tuple(str(name) for name in entry["services"]),
                )
            except (ValueError, KeyError, TypeError):
                continue
            if up.node != self.node:
                self._on_up(up)
        for device, (at, _) in stale.items():
            if device not in self._remote_gens:
                self._router.remote_unregistered(device, at)

    async def _refresh_loop(self) -> None:
        assert self._redis is not None and self._router is not None
        while True:
            await asyncio.sleep(self._refresh_interval)
            try:
                if await self._write_node_key():
                    await self._heal()
                elif self._resync:
                    await self._reload_presence()
                for reg in list(self._local.values()):
                    if reg.value is not None:
                        await self._redis.eval(
                            _REFRESH_IF_MINE, 1, device_key(reg.device), reg.value, self._ttl_ms
                        )
                for node in sorted(self._router.remote_nodes()):
                    if not await self._redis.exists(node_key(node)):
                        log.info("node %s: node %s is gone (its key expired)", self.node, node)
                        self._forget_node(node)
            except (RedisError, OSError) as exc:
                log.warning("node %s: cannot refresh presence in Redis: %s", self.node, exc)

    def _forget_node(self, node: str) -> None:
        assert self._router is not None
        for device, (at, _) in list(self._remote_gens.items()):
            if at.node == node:
                del self._remote_gens[device]
        self._apply(self._router.node_gone(node))


def _device_of(key: bytes | str) -> str:
    name = key.decode() if isinstance(key, bytes) else key
    return name.rsplit(":", 1)[1]


def _safe(url: str) -> str:
    """``url`` without a password (redis://:PASSWORD@host)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
