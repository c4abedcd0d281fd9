"""The NAT lab: real NATs built from network namespaces, coturn, and real tunnelctl processes.

    scripts/natlab [--json] [--case DEV,CLI] [--keep] [--udp-timeout S] [--turn-auth static|secret]

Exit status: 0 when every case delivered its bytes intact, 1 when one did not
or the lab could not be built or run (one line on stderr says why), 130 after
Ctrl-C or SIGTERM; 2 for bad arguments.

Needs root (``ip netns``, ``iptables``) and coturn's ``turnserver``. Everything
lives in namespaces this module creates, named ``nl<pid>-...`` so that labs of
several users of one machine never meet, and removes on exit, on Ctrl-C and when
a build fails. The only links are veth pairs between those namespaces: nothing
is routed to the machine's real interfaces.

Topology::

    public namespace (203.0.113.1/24 on a bridge, a documentation range):
        tunnelctl signal  ws://203.0.113.1:8000/signal
        coturn            stun:/turn:203.0.113.1:3478 over UDP and TCP
    a site per (role, NAT kind), one of:
        none         host on the bridge itself, 203.0.113.(10+i)
        cone         host 10.i.0.2 behind a router 203.0.113.(10+i): MASQUERADE
        symmetric    the same with MASQUERADE --random-fully
        udp-blocked  the same as cone, but the router forwards only TCP out

NAT behaviour in RFC 4787 terms: Linux MASQUERADE keeps the source port, so its
mapping is endpoint-independent ("cone"); ``--random-fully`` picks a new port
per 5-tuple, an address-and-port-dependent ("symmetric") mapping. Filtering is
address-and-port-dependent in every kind (conntrack lets in only replies), and
the routers' UDP conntrack timeouts are short (``udp_timeout``, 30 s) so that
idle mappings expire within a test, as they do in home routers.

coturn (RFC 8656 TURN, RFC 8489 STUN) runs from a config file the lab writes:
listening on the public address over UDP and TCP, no TLS/DTLS, relay ports in a
small range, peers in private and reserved ranges denied as coturn advises for a
public server, except the lab's own public segment. Every peer is offered the
STUN server, TURN over UDP and TURN over TCP, in one of two ways:

* ``turn_auth="secret"`` (the default, the deployment README describes):
  coturn's TURN REST shared secret (``use-auth-secret``), and ``tunnelctl
  signal --ice-server ... --turn-secret-file`` hands every device and client
  the servers with short-lived credentials (username ``EXPIRY:ID``, password
  base64(HMAC-SHA1(secret, username)), draft-uberti-behave-turn-rest);
  ``start`` and ``connect`` get no ICE option at all.
* ``turn_auth="static"``: a long-term user (``lt-cred-mech``) given to
  ``start`` and ``connect`` with ``--stun``, ``--turn`` and ``--turn-user``
  (the password in ``TUNNEL_TURN_PASSWORD``).

A *case* is one (device NAT, client NAT) pair: ``tunnelctl start`` in the
device site exposing an HTTP server of that site, ``tunnelctl connect`` in the
client site, and a 16 MiB fetch through the forward inside the client site,
checked by SHA-256. :class:`CaseResult` is the JSON line ``--json`` prints:
``device_nat``, ``client_nat``, ``connected``; ``path`` (``direct``/``relay``)
and ``pair`` (local/remote candidate types) as the client reports them,
``device_path`` and ``device_pair`` as the device does; ``connect_ms``
(request to DataChannel open, from ``connect``'s readiness line),
``transfer_ok``, ``mbps`` (megabits/s), ``mib_s``; ``relay_transport``
(``udp``/``tcp``: which carried the most TURN traffic by the routers' byte
counters, ``null`` on a direct path), ``relay_via`` (each end's own relay
transport as it reports it, ``null`` when it relays nothing itself),
``turn_bytes`` (the counters) and ``error``.

The building blocks (:class:`Lab`, :class:`Site`, :class:`Namespace`) are for
tests too: ``tests/e2e/natlab_support.py`` wraps them in fixtures (run a command
in a namespace, drop packets between sites, change a site's address, add random
loss with iptables ``statistic``). Long-running processes are ``harness.Child``
(``Namespace.spawn``), whose failed waits raise :class:`LabError`.

This script imports no ``tunnelctl`` code (ARCHITECTURE.md): it starts the
verbs as processes, ``python -m tunnelctl ...`` with this interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from harness import Child
from protocol.ice import turn_rest_credential
from signaling.auth import issue_token

NAT_KINDS = ("none", "cone", "symmetric", "udp-blocked")

PUBLIC_NET = ipaddress.IPv4Network("203.0.113.0/24")
PUBLIC_ADDR = "203.0.113.1"  # the public namespace: signaling and coturn
SIGNAL_PORT = 8000
TURN_PORT = 3478
RELAY_PORTS = (49152, 49407)  # coturn's relay range: small, and inside the lab only
WEB_PORT = 8080  # inside the device's own namespace, so always free
BIG_SIZE = 16 * 1024 * 1024 + 12345  # >= 16 MiB and not a multiple of any frame size
MIB = 1024 * 1024

COMMAND_TIMEOUT = 20.0  # one ip/iptables/sysctl command
READY_TIMEOUT = 30.0  # a process printing its readiness line
OPEN_TIMEOUT = 45.0  # connect's own session set-up gives up after 30 s
TRANSFER_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0

#: coturn's advice for a public server: no relaying into private, loopback,
#: link-local or reserved space (the example turnserver.conf's list).
DENIED_PEERS = (
    "0.0.0.0-0.255.255.255",
    "10.0.0.0-10.255.255.255",
    "100.64.0.0-100.127.255.255",
    "127.0.0.0-127.255.255.255",
    "169.254.0.0-169.254.255.255",
    "172.16.0.0-172.31.255.255",
    "192.0.0.0-192.0.0.255",
    "192.0.2.0-192.0.2.255",
    "192.88.99.0-192.88.99.255",
    "192.168.0.0-192.168.255.255",
    "198.18.0.0-198.19.255.255",
    "198.51.100.0-198.51.100.255",
    "203.0.113.0-203.0.113.255",
    "240.0.0.0-255.255.255.255",
    "::1",
    "64:ff9b::-64:ff9b::ffff:ffff",
    "::ffff:0.0.0.0-::ffff:255.255.255.255",
    "fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "fe80::-febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
)

#: What every peer is offered: STUN, TURN over UDP, TURN over TCP (all gathered).
ICE_URLS = (
    f"stun:{PUBLIC_ADDR}:{TURN_PORT}",
    f"turn:{PUBLIC_ADDR}:{TURN_PORT}",
    f"turn:{PUBLIC_ADDR}:{TURN_PORT}?transport=tcp",
)

#: ``connect``'s readiness line, e.g. ``... (DataChannel open in 61 ms, relay path
#: (host/relay over tcp))``: the path from both candidates of the nominated pair.
FORWARDING_RE = re.compile(
    r"forwarding (?P<addr>\S+) -> \S+ \(DataChannel open in (?P<ms>\d+) ms, "
    r"(?:(?P<path>direct|relay) path \((?P<pair>\w+/\w+)(?: over (?P<via>\w+))?\)|unknown path)\)"
)

#: Run inside the client's namespace: fetch a URL, hash it as it streams.
FETCH_SCRIPT = """
import hashlib, http.client, json, sys, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
started = time.perf_counter()
conn = http.client.HTTPConnection(host, port, timeout=60)
conn.request("GET", path)
resp = conn.getresponse()
digest, size = hashlib.sha256(), 0
while chunk := resp.read(1 << 16):
    digest.update(chunk)
    size += len(chunk)
print(json.dumps({"status": resp.status, "bytes": size, "sha256": digest.hexdigest(),
                  "seconds": time.perf_counter() - started}))
"""


#: Run inside a site: one STUN Binding request (RFC 8489 §6), print the XOR-MAPPED-ADDRESS.
STUN_SCRIPT = """
import os, socket, struct, sys
server, port, local = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", local))
sock.settimeout(1)
tid = os.urandom(12)
for _ in range(3):
    sock.sendto(struct.pack("!HHI", 0x0001, 0, 0x2112A442) + tid, (server, port))
    try:
        data = sock.recv(2048)
    except TimeoutError:
        continue
    if data[8:20] == tid:
        break
else:
    sys.exit("no STUN answer")
at = 20
while at < len(data):
    kind, size = struct.unpack_from("!HH", data, at)
    if kind == 0x0020:
        xport = struct.unpack_from("!H", data, at + 6)[0] ^ 0x2112
        xaddr = struct.unpack_from("!I", data, at + 8)[0] ^ 0x2112A442
        print(socket.inet_ntoa(struct.pack("!I", xaddr)), xport)
        break
    at += 4 + (size + 3) // 4 * 4
"""


class LabError(RuntimeError):
    """The lab cannot be built or a step of it failed (a command, a deadline)."""


def unavailable_reason() -> str | None:
    """Why the lab cannot run here (one line), or None when it can."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces and iptables)"
    for program in ("ip", "iptables", "turnserver"):
        if shutil.which(program) is None:
            package = {"ip": "iproute2", "turnserver": "coturn"}.get(program, program)
            return (
                f"{program} is not installed (package {package}; "
                "as root: bash scripts/install-system-deps.sh)"
            )
    probe = f"nl{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns is unavailable here: {made.stderr.strip() or made.returncode}"
    try:
        nat = subprocess.run(
            ["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n"],
            capture_output=True,
            text=True,
        )
        if nat.returncode != 0:
            return f"iptables NAT is unavailable in a namespace: {nat.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def run(argv: Sequence[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a short command; return its stdout; LabError (naming it) if it fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)}: no answer in {timeout:g} s") from None
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


# -- namespaces -------------------------------------------------------------------------

#: Our chains in a namespace's filter table, each hooked first into INPUT, OUTPUT
#: and FORWARD, so a test's drop or loss applies before any NAT rule accepts.
DROP_CHAIN = "NATLAB-DROP"
LOSS_CHAIN = "NATLAB-LOSS"
COUNT_CHAIN = "NATLAB-TURN"


@dataclass
class Namespace:
    """One network namespace of the lab (``ip netns``)."""

    name: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a short command inside this namespace; its stdout."""
        return run(self.argv(argv), check=check, timeout=timeout)

    def succeeds(self, *argv: str, timeout: float = COMMAND_TIMEOUT) -> bool:
        """Whether a command inside this namespace exits 0 within ``timeout``."""
        try:
            done = subprocess.run(self.argv(argv), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *args])

    def iptables(self, *args: str) -> str:
        # -w: wait for the xtables lock rather than fail when commands overlap.
        return self.run("iptables", "-w", "5", *args)

    def sysctl(self, **values: str | int) -> None:
        settings = [f"{key.replace('__', '.')}={value}" for key, value in values.items()]
        self.run("sysctl", "-q", "-w", *settings)

    def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, name: str
    ) -> Child:
        """Start a long-running process inside this namespace."""
        return Child(self.argv(argv), env=env, name=name, failure=LabError)

    def pids(self) -> list[int]:
        out = run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in out.split()]

    # The test hooks: drop, loss (each undone by its restore/clear).

    def drop(self, *, addresses: Sequence[str] = (), proto: str | None = None) -> None:
        """Drop packets to and from ``addresses`` (all when empty), of ``proto`` if given.

        Drops add up until :meth:`restore`; in a router they apply to what it forwards.
        """
        match = ["-p", proto] if proto else []
        if not addresses:
            self.iptables("-A", DROP_CHAIN, *match, "-j", "DROP")
        for address in addresses:
            for direction in ("-d", "-s"):
                self.iptables("-A", DROP_CHAIN, *match, direction, address, "-j", "DROP")

    def restore(self) -> None:
        """Undo every :meth:`drop` of this namespace."""
        self.iptables("-F", DROP_CHAIN)

    def set_loss(self, percent: float) -> None:
        """Drop ``percent`` % of the packets crossing this namespace at random (0 clears)."""
        self.iptables("-F", LOSS_CHAIN)
        if percent > 0:
            self.iptables(
                "-A", LOSS_CHAIN, "-m", "statistic", "--mode", "random",
                "--probability", f"{percent / 100:.4f}", "-j", "DROP",
            )  # fmt: skip

    def install_hooks(self) -> None:
        for chain in (DROP_CHAIN, LOSS_CHAIN):
            self.iptables("-N", chain)
            for builtin in ("INPUT", "OUTPUT", "FORWARD"):
                self.iptables("-I", builtin, "1", "-j", chain)


@dataclass
class Site:
    """A place a peer lives: a host namespace, behind a NAT router namespace unless ``none``.

    ``address`` is the host's own address, ``public_address`` the one the public
    segment sees (the router's, or the host's for ``none``).
    """

    name: str
    nat: str
    index: int
    host: Namespace
    router: Namespace | None
    address: str
    public_address: str

    @property
    def uplink(self) -> Namespace:
        """Where the site meets the public segment: the router, or the host itself."""
        return self.router or self.host

    @property
    def namespaces(self) -> list[Namespace]:
        return [self.host] if self.router is None else [self.host, self.router]

    def turn_bytes(self) -> dict[str, int]:
        """Bytes this site exchanged with coturn's port since the last reset, per transport.

        That is the traffic of the site's own TURN allocations (and STUN); what
        a peer sends to this site's relay address reaches coturn elsewhere.
        """
        rows = self.uplink.iptables("-n", "-v", "-x", "-L", COUNT_CHAIN).splitlines()[2:]
        counts = {"udp": 0, "tcp": 0}
        for row in rows:
            fields = row.split()
            # pkts bytes prot ... (no target); iptables-nft names protocols by number
            proto = {"17": "udp", "6": "tcp"}.get(fields[2], fields[2])
            counts[proto] += int(fields[1])
        return counts

    def reset_turn_bytes(self) -> None:
        self.uplink.iptables("-Z", COUNT_CHAIN)

    def mappings(self, proto: str = "udp") -> list[str]:
        """The router's conntrack entries (its NAT mappings) for ``proto``; none without one.

        Entries leave when idle past the UDP timeout: polling this tells a test
        that a site's mappings expired.
        """
        if self.router is None:
            return []
        table = self.router.run("cat", "/proc/net/nf_conntrack")
        return [line for line in table.splitlines() if f" {proto} " in line]


# -- the lab ----------------------------------------------------------------------------


@dataclass
class TurnAuth:
    """coturn's authentication: a static long-term user, or the REST shared secret."""

    mode: str  # "static" or "secret"
    user: str = "natlab"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def config_lines(self) -> list[str]:
        if self.mode == "static":
            return ["lt-cred-mech", f"user={self.user}:{self.password}"]
        return ["use-auth-secret", f"static-auth-secret={self.secret}"]

    def credentials(self, ttl: int = 3600) -> tuple[str, str]:
        """A username and password for one TURN client."""
        if self.mode == "static":
            return self.user, self.password
        return turn_rest_credential(self.secret, int(time.time()) + ttl, self.user)


class Lab:
    """The public segment (signaling, coturn) and the sites added to it.

    Use as a context manager, or call :meth:`build` then :meth:`close` (which
    also undoes a half-built lab). Every process and namespace it made is gone
    after :meth:`close`.
    """

    def __init__(
        self,
        *,
        udp_timeout: int = 30,
        turn_auth: str = "secret",
        tag: str | None = None,
    ) -> None:
        if turn_auth not in ("static", "secret"):
            raise ValueError(f"turn_auth must be static or secret, not {turn_auth!r}")
        self.prefix = f"nl{tag or os.getpid()}"
        self.udp_timeout = udp_timeout
        self.turn = TurnAuth(turn_auth)
        self.jwt_secret = secrets.token_hex(32)
        self.public = Namespace(f"{self.prefix}-pub")
        self.sites: dict[str, Site] = {}
        self.namespaces: list[Namespace] = []
        self.processes: list[Child] = []
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.big_sha256 = ""
        self.signal_url = f"ws://{PUBLIC_ADDR}:{SIGNAL_PORT}/signal"
        self.coturn: Child | None = None
        self.signal: Child | None = None
        self._renumbered = 0

    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ----------------------------------------------------------------------

    def build(self) -> None:
        """The public namespace with its bridge, coturn and the signaling server."""
        try:
            pub = self._add_namespace(self.public)
            pub.ip("link", "add", "br0", "type", "bridge")
            pub.ip("addr", "add", f"{PUBLIC_ADDR}/24", "dev", "br0")
            pub.ip("link", "set", "br0", "up")
            self.coturn = self._start_coturn()
            handout: list[str] = []
            if self.turn.mode == "secret":
                secret_file = self.workdir / "turn-secret"
                secret_file.write_text(self.turn.secret)
                secret_file.chmod(0o600)
                for url in ICE_URLS:
                    handout += ["--ice-server", url]
                handout += ["--turn-secret-file", str(secret_file)]
            self.signal = signal_server = pub.spawn(
                [sys.executable, "-m", "tunnelctl", "signal", "--host", PUBLIC_ADDR,
                 "--port", str(SIGNAL_PORT), *handout],
                env={"TUNNEL_SECRET": self.jwt_secret},
                name="signal",
            )  # fmt: skip
            self.processes.append(signal_server)
            self._write_big_file()
            signal_server.wait_line("listening ", READY_TIMEOUT)
            # Its verbose log names each listener once it is open.
            self.coturn.wait_lines(
                ["TCP listener opened on", "UDP listener opened on"], READY_TIMEOUT, anywhere=True
            )
        except BaseException:
            self.close()
            raise

    def add_site(self, name: str, nat: str, *, udp_timeout: int | None = None) -> Site:
        """A site on the public segment, behind a router of kind ``nat``.

        ``udp_timeout``: its router's UDP conntrack timeout, the lab's by default.
        """
        if nat not in NAT_KINDS:
            raise ValueError(f"NAT kind must be one of {', '.join(NAT_KINDS)}, not {nat!r}")
        if name in self.sites:
            raise ValueError(f"site {name!r} exists")
        index = len(self.sites) + 1
        public_address = f"203.0.113.{10 + index}"
        host = self._add_namespace(Namespace(f"{self.prefix}-{name}"))
        # The bridge port of this site lives in the public namespace.
        port = f"s{index}"
        if nat == "none":
            self._link(self.public, port, host, "eth0")
            host.ip("addr", "add", f"{public_address}/24", "dev", "eth0")
            host.ip("link", "set", "eth0", "up")
            site = Site(name, nat, index, host, None, public_address, public_address)
        else:
            router = self._add_namespace(Namespace(f"{self.prefix}-{name}-r"))
            self._link(self.public, port, router, "wan")
            self._link(router, "lan", host, "eth0")
            router.ip("addr", "add", f"{public_address}/24", "dev", "wan")
            router.ip("addr", "add", f"10.{index}.0.1/24", "dev", "lan")
            host.ip("addr", "add", f"10.{index}.0.2/24", "dev", "eth0")
            for ns, dev in ((router, "wan"), (router, "lan"), (host, "eth0")):
                ns.ip("link", "set", dev, "up")
            host.ip("route", "add", "default", "via", f"10.{index}.0.1")
            site = Site(name, nat, index, host, router, f"10.{index}.0.2", public_address)
            self._configure_router(site, udp_timeout or self.udp_timeout)
        self.public.ip("link", "set", port, "master", "br0")
        self.public.ip("link", "set", port, "up")
        self._count_turn(site)
        self.sites[name] = site
        return site

    def _add_namespace(self, ns: Namespace) -> Namespace:
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        # IPv4 only: no link-local IPv6 candidates, no duplicate address detection.
        ns.sysctl(net__ipv6__conf__all__disable_ipv6=1, net__ipv6__conf__default__disable_ipv6=1)
        ns.ip("link", "set", "lo", "up")
        ns.install_hooks()
        return ns

    @staticmethod
    def _link(a: Namespace, a_dev: str, b: Namespace, b_dev: str) -> None:
        # Both ends are created inside their namespaces: no interface ever
        # appears in the machine's own namespace.
        run(["ip", "-n", a.name, "link", "add", a_dev, "type", "veth",
             "peer", "name", b_dev, "netns", b.name])  # fmt: skip

    def _configure_router(self, site: Site, udp_timeout: int) -> None:
        router = site.router
        assert router is not None
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
        if site.nat == "symmetric":
            masquerade.append("--random-fully")
        router.iptables(*masquerade)
        router.iptables("-P", "FORWARD", "DROP")
        router.iptables("-A", "FORWARD", "-m", "conntrack", "--ctstate",
                        "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
        out = ["-A", "FORWARD", "-i", "lan", "-o", "wan"]
        if site.nat == "udp-blocked":
            router.iptables(*out, "-p", "tcp", "-j", "ACCEPT")
            router.iptables(*out, "-p", "icmp", "-j", "ACCEPT")
        else:
            router.iptables(*out, "-j", "ACCEPT")
        # Unsolicited packets to the router itself vanish, as at a home router
        # (no ICMP port unreachable that would tell the sender anything).
        router.iptables("-P", "INPUT", "DROP")
        router.iptables("-A", "INPUT", "-m", "conntrack", "--ctstate",
                        "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
        router.sysctl(
            net__ipv4__ip_forward=1,
            # The conntrack module is loaded by the NAT rule above, so its
            # per-namespace timeouts exist now.
            net__netfilter__nf_conntrack_udp_timeout=udp_timeout,
            net__netfilter__nf_conntrack_udp_timeout_stream=udp_timeout,
        )

    def _count_turn(self, site: Site) -> None:
        ns = site.uplink
        ns.iptables("-N", COUNT_CHAIN)
        for proto in ("udp", "tcp"):
            ns.iptables(
                "-A", COUNT_CHAIN, "-p", proto, "-d", PUBLIC_ADDR, "--dport", str(TURN_PORT)
            )
            ns.iptables(
                "-A", COUNT_CHAIN, "-p", proto, "-s", PUBLIC_ADDR, "--sport", str(TURN_PORT)
            )
        hooks = ("FORWARD",) if site.router else ("INPUT", "OUTPUT")
        for builtin in hooks:
            ns.iptables("-I", builtin, "1", "-j", COUNT_CHAIN)

    def _start_coturn(self) -> Child:
        lines = [
            f"listening-ip={PUBLIC_ADDR}",
            f"relay-ip={PUBLIC_ADDR}",
            f"listening-port={TURN_PORT}",
            f"min-port={RELAY_PORTS[0]}",
            f"max-port={RELAY_PORTS[1]}",
            "realm=natlab",
            "fingerprint",
            *self.turn.config_lines(),
            "no-tls",
            "no-dtls",
            "no-cli",
            "no-multicast-peers",
            *(f"denied-peer-ip={r}" for r in DENIED_PEERS),
            # The lab's public segment is all the "internet" there is.
            f"allowed-peer-ip={PUBLIC_NET[0]}-{PUBLIC_NET[-1]}",
            "log-file=stdout",
            "simple-log",
            f"pidfile={self.workdir / 'turnserver.pid'}",
            f"userdb={self.workdir / 'turndb'}",
        ]
        config = self.workdir / "turnserver.conf"
        config.write_text("\n".join(lines) + "\n")
        config.chmod(0o600)  # it holds the TURN password or secret
        process = self.public.spawn(["turnserver", "-c", str(config), "-v"], name="coturn")
        self.processes.append(process)
        return process

    def _write_big_file(self) -> None:
        web = self.workdir / "web"
        web.mkdir()
        body = secrets.token_bytes(BIG_SIZE)
        (web / "big").write_bytes(body)
        self.big_sha256 = hashlib.sha256(body).hexdigest()

    # -- running tunnelctl --------------------------------------------------------------

    def token(self, sub: str, role: str, devices: Sequence[str] = ()) -> str:
        return issue_token(self.jwt_secret, sub=sub, role=role, devices=tuple(devices), ttl=3600)

    def ice_args(self) -> tuple[list[str], dict[str, str]]:
        """ICE options for ``start``/``connect`` and the environment with the TURN password.

        None with ``turn_auth="secret"``: the signaling server hands them out.
        """
        if self.turn.mode == "secret":
            return [], {}
        user, password = self.turn.credentials()
        args = []
        for url in ICE_URLS:
            args += ["--stun" if url.startswith("stun:") else "--turn", url]
        return [*args, "--turn-user", user], {"TUNNEL_TURN_PASSWORD": password}

    def tunnelctl(
        self, site: Site, args: Sequence[str], *, env: Mapping[str, str] | None = None, name: str
    ) -> Child:
        process = site.host.spawn([sys.executable, "-m", "tunnelctl", *args], env=env, name=name)
        self.processes.append(process)
        return process

    def start_web(self, site: Site) -> Child:
        """An HTTP server on 127.0.0.1:WEB_PORT inside ``site`` serving ``/big``."""
        web = site.host.spawn(
            [sys.executable, "-m", "http.server", str(WEB_PORT), "--bind", "127.0.0.1",
             "--directory", str(self.workdir / "web")],
            name=f"web {site.name}",
        )  # fmt: skip
        self.processes.append(web)
        web.wait_line("Serving HTTP", READY_TIMEOUT)
        return web

    def start_device(self, site: Site, device: str, *, extra: Sequence[str] = ()) -> Device:
        """``tunnelctl start`` in ``site`` exposing its web server as ``web``; once registered."""
        runtime = Path(tempfile.mkdtemp(prefix=f"runtime-{device}-", dir=self.workdir))
        ice, env = self.ice_args()
        process = self.tunnelctl(
            site,
            ["start", "--runtime-dir", str(runtime), "--signal", self.signal_url,
             "--device", device, "--expose", f"web=http://127.0.0.1:{WEB_PORT}", *ice, *extra],
            env={**env, "TUNNEL_TOKEN": self.token(device, "device")},
            name=f"device {device}",
        )  # fmt: skip
        process.wait_line("registered ", READY_TIMEOUT)
        return Device(self, site, device, runtime, process)

    def start_client(
        self, site: Site, device: str, *, service: str = "web", extra: Sequence[str] = ()
    ) -> Child:
        """``tunnelctl connect`` in ``site`` forwarding a local port to ``device``/``service``."""
        ice, env = self.ice_args()
        return self.tunnelctl(
            site,
            ["connect", "--signal", self.signal_url, "--device", device, "--service", service,
             "--listen", "127.0.0.1:0", *ice, *extra],
            env={**env, "TUNNEL_TOKEN": self.token(f"client-{site.name}", "client", [device])},
            name=f"client {site.name} -> {device}",
        )  # fmt: skip

    def fetch(self, site: Site, address: str, path: str = "/big") -> dict[str, Any]:
        """GET ``http://ADDRESS/PATH`` inside ``site``: status, bytes, sha256, seconds."""
        host, _, port = address.rpartition(":")
        out = site.host.run(
            sys.executable, "-c", FETCH_SCRIPT, host, port, path, timeout=TRANSFER_TIMEOUT
        )
        result: dict[str, Any] = json.loads(out)
        return result

    # -- tearing down ------------------------------------------------------------------

    def partition(self, a: Site, b: Site) -> None:
        """Drop every packet between the public addresses of ``a`` and ``b`` (in ``a``'s uplink).

        Their direct path dies; what each exchanges with the public namespace
        (signaling, STUN, a relay) does not. ``a.uplink.restore()`` heals it.
        """
        a.uplink.drop(addresses=[b.public_address])

    def renumber(self, site: Site) -> tuple[str, str]:
        """Move ``site``'s host to a new address, as a Wi-Fi change does; (address, public).

        Behind a router the host gets a new LAN address and the router a new
        public one (MASQUERADE forgets the mappings of the old); a ``none`` host
        gets a new public address. Sockets bound to the old address stop working.
        """
        self._renumbered += 1
        public = str(PUBLIC_NET[100 + self._renumbered])
        if site.router is None:
            self._move_address(site.host, "eth0", site.address, public)
            site.address = site.public_address = public
            return public, public
        address = f"10.{site.index}.0.{2 + self._renumbered}"
        self._move_address(site.host, "eth0", site.address, address)
        site.host.ip("route", "replace", "default", "via", f"10.{site.index}.0.1")
        self._move_address(site.router, "wan", site.public_address, public)
        site.address, site.public_address = address, public
        return address, public

    @staticmethod
    def _move_address(ns: Namespace, dev: str, old: str, new: str) -> None:
        # Old first: deleting a primary address takes its subnet's secondaries along.
        ns.ip("addr", "del", f"{old}/24", "dev", dev)
        ns.ip("addr", "add", f"{new}/24", "dev", dev)

    def mapped_address(self, site: Site, local_port: int = 0) -> tuple[str, int]:
        """What the STUN server sees of a UDP socket in ``site`` (RFC 8489 Binding)."""
        out = site.host.run(sys.executable, "-c", STUN_SCRIPT, PUBLIC_ADDR, str(TURN_PORT),
                            str(local_port))  # fmt: skip
        host, port = out.split()
        return host, int(port)

    def stop(self, process: Child) -> None:
        process.stop(STOP_TIMEOUT)
        with contextlib.suppress(ValueError):
            self.processes.remove(process)

    def close(self) -> None:
        """Stop every process (ours by pid, then any left in our namespaces), remove all."""
        with _signals_held():
            self._close()

    def _close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.proc.send_signal(signal.SIGTERM)  # all at once: they drain in parallel
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop(STOP_TIMEOUT)
        self.processes.clear()
        for ns in reversed(self.namespaces):
            # Workers forked by a supervisor, anything a test ran: all in a
            # namespace we created, so ours.
            for pid in ns.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, so a second one cannot cut a clean-up short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class Device:
    """A running ``tunnelctl start`` in a site."""

    lab: Lab
    site: Site
    id: str
    runtime: Path
    process: Child

    def sessions(self) -> list[dict[str, Any]]:
        out = self.site.host.run(
            sys.executable, "-m", "tunnelctl", "sessions", "--json",
            "--runtime-dir", str(self.runtime),
        )  # fmt: skip
        rows: list[dict[str, Any]] = json.loads(out)
        return rows

    def stop(self) -> None:
        self.lab.stop(self.process)


# -- the matrix -------------------------------------------------------------------------


@dataclass
class CaseResult:
    """One (device NAT, client NAT) case: the JSON line of ``--json``."""

    device_nat: str
    client_nat: str
    connected: bool = False
    path: str | None = None
    pair: str | None = None
    device_path: str | None = None
    device_pair: str | None = None
    connect_ms: int | None = None
    transfer_ok: bool = False
    mbps: float | None = None
    mib_s: float | None = None
    relay_transport: str | None = None
    relay_via: dict[str, str | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    turn_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    error: str | None = None


def run_case(lab: Lab, device: Device, client_site: Site) -> CaseResult:
    """Connect from ``client_site`` to ``device``, fetch 16 MiB, and measure."""
    result = CaseResult(device.site.nat, client_site.nat)
    for site in (device.site, client_site):
        site.reset_turn_bytes()
    device_mark = device.process.stderr_count
    client = lab.start_client(client_site, device.id)
    try:
        line = client.wait_line("forwarding ", OPEN_TIMEOUT)
        match = FORWARDING_RE.search(line)
        if match is None:
            raise LabError(f"unexpected forwarding line: {line!r}")
        result.connected = True
        result.connect_ms = int(match["ms"])
        result.path, result.pair = match["path"], match["pair"]
        result.relay_via["client"] = match["via"]
        fetched = lab.fetch(client_site, match["addr"])
        result.transfer_ok = (
            fetched["status"] == 200
            and fetched["bytes"] == BIG_SIZE
            and fetched["sha256"] == lab.big_sha256
        )
        if not result.transfer_ok:
            result.error = f"transfer: {fetched}"
        megabits = fetched["bytes"] * 8 / 1e6
        result.mbps = round(megabits / fetched["seconds"], 1)
        result.mib_s = round(fetched["bytes"] / MIB / fetched["seconds"], 2)
        # The case's session is the device's only running one: earlier cases'
        # clients have gone (their sessions stay listed, ended, for a while).
        rows = [r for r in device.sessions() if r["state"] == "running"]
        if rows:
            result.device_path, result.device_pair = rows[-1]["path"], rows[-1]["pair"]
            result.relay_via["device"] = rows[-1]["relay_transport"]
        # Both ends judge the path from the whole nominated pair; they must agree.
        if result.device_path != result.path:
            result.error = (
                f"the device reports a {result.device_path} path, the client {result.path}"
            )
    except LabError as exc:
        result.error = str(exc)
    finally:
        lab.stop(client)
        result.warnings = problem_lines(
            [("client", line) for line in client.stderr_since(0)]
            + [("device", line) for line in device.process.stderr_since(device_mark)]
        )
    result.turn_bytes = {
        "device": device.site.turn_bytes(),
        "client": client_site.turn_bytes(),
    }
    if result.path == "relay":
        totals = {
            proto: sum(side[proto] for side in result.turn_bytes.values())
            for proto in ("udp", "tcp")
        }
        result.relay_transport = max(totals, key=lambda proto: totals[proto])
    return result


PROBLEM_RE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")
SESSION_ID_RE = re.compile(r"\b[A-Za-z0-9_-]{22}\b")
WORKER_PID_RE = re.compile(r"worker\[\d+\]")


def problem_lines(lines: Sequence[tuple[str, str]], limit: int = 5) -> list[str]:
    """Distinct warning and error lines, ``END: message`` without time or session id."""
    found: dict[str, None] = {}
    for end, line in lines:
        if PROBLEM_RE.search(line):
            message = SESSION_ID_RE.sub("<id>", line.split(" ", 1)[-1])
            message = WORKER_PID_RE.sub("worker[<pid>]", message)
            found.setdefault(f"{end}: {message}", None)
    return list(found)[:limit]


def warm_up(lab: Lab, device: Device) -> None:
    """One untimed session, so the cases meet a device whose idle workers are prepared.

    A supervisor's idle workers prepare their offer (gathering included) when
    they start; a case begun right after ``registered`` would wait for that (5 s
    behind a router that drops the STUN request), which a device idle for a
    while never shows.
    """
    client_site = lab.sites.get(f"cli-{device.site.nat}") or device.site
    client = lab.start_client(client_site, device.id)
    try:
        client.wait_line("forwarding ", OPEN_TIMEOUT)
    finally:
        lab.stop(client)


def build_matrix_lab(lab: Lab, kinds: Sequence[str] = NAT_KINDS) -> None:
    """A device site and a client site for every NAT kind: ``dev-KIND``, ``cli-KIND``."""
    for kind in kinds:
        lab.add_site(f"dev-{kind}", kind)
        lab.add_site(f"cli-{kind}", kind)


def device_id(kind: str) -> str:
    return f"dev-{kind}"


class Matrix:
    """Runs cases on a lab from :func:`build_matrix_lab`, one device NAT at a time.

    The device (its supervisor and web server) starts afresh when the device
    NAT changes, so that cases grouped by device NAT never meet an idle worker
    prepared more than a few cases ago: behind a NAT its mappings expire after
    ``udp_timeout`` (issue 7, an idle device behind a relay), which the matrix
    does not test.
    """

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.device: Device | None = None
        self.web: Child | None = None

    def run(self, device_nat: str, client_nat: str) -> CaseResult:
        if self.device is None or self.device.site.nat != device_nat:
            self.close()
            site = self.lab.sites[f"dev-{device_nat}"]
            self.web = self.lab.start_web(site)
            self.device = self.lab.start_device(site, device_id(device_nat))
            warm_up(self.lab, self.device)
        return run_case(self.lab, self.device, self.lab.sites[f"cli-{client_nat}"])

    def close(self) -> None:
        if self.device is not None:
            self.device.stop()
            self.device = None
        if self.web is not None:
            self.lab.stop(self.web)
            self.web = None


def run_matrix(
    lab: Lab,
    cases: Sequence[tuple[str, str]],
    *,
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run ``cases``, grouped by device NAT (see :class:`Matrix`)."""
    order = {kind: i for i, kind in enumerate(dict.fromkeys(d for d, _ in cases))}
    matrix = Matrix(lab)
    results: list[CaseResult] = []
    try:
        for case in sorted(cases, key=lambda case: order[case[0]]):
            result = matrix.run(*case)
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        matrix.close()
    return results


# -- the command line -------------------------------------------------------------------

TABLE_HEADER = (
    f"{'device':<12} {'client':<12} {'path':<7} {'pair':<12} {'device pair':<12} "
    f"{'connect ms':>10} {'MiB/s':>7} {'Mbit/s':>7} {'TURN':<5} {'16 MiB':<7}"
)


def table_row(r: CaseResult) -> str:
    def show(value: object) -> str:
        return "-" if value is None else str(value)

    line = (
        f"{r.device_nat:<12} {r.client_nat:<12} {show(r.path):<7} {show(r.pair):<12} "
        f"{show(r.device_pair):<12} {show(r.connect_ms):>10} {show(r.mib_s):>7} "
        f"{show(r.mbps):>7} {show(r.relay_transport):<5} "
        f"{'intact' if r.transfer_ok else 'FAILED':<7}"
    )
    return line + (f"  {r.error}" if r.error else "")


def parse_case(text: str) -> tuple[str, str]:
    dev, sep, cli = text.partition(",")
    if not sep or dev not in NAT_KINDS or cli not in NAT_KINDS:
        raise argparse.ArgumentTypeError(
            f"expected DEV,CLI with each one of {', '.join(NAT_KINDS)}, not {text!r}"
        )
    return dev, cli


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/natlab",
        description="Run tunnelctl across NATs built from network namespaces (needs root).",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line per case")
    parser.add_argument(
        "--case", action="append", type=parse_case, metavar="DEV,CLI",
        help=f"run one case (repeatable); NAT kinds: {', '.join(NAT_KINDS)}",
    )  # fmt: skip
    parser.add_argument(
        "--keep", action="store_true", help="leave the lab up after the cases, until Ctrl-C"
    )
    parser.add_argument(
        "--udp-timeout", type=int, default=30, metavar="S", help="routers' UDP conntrack timeout"
    )
    parser.add_argument(
        "--turn-auth", choices=("secret", "static"), default="secret",
        help="secret: coturn's TURN REST shared secret, servers and credentials handed out by "
        "tunnelctl signal (default); static: a long-term user given to start/connect",
    )  # fmt: skip
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"natlab: error: {reason}", file=sys.stderr)
        return 1
    cases = args.case or [(d, c) for d in NAT_KINDS for c in NAT_KINDS]
    kinds = [k for k in NAT_KINDS if any(k in case for case in cases)]
    # `uv run` starts us with SIGINT ignored, which Python then keeps: Ctrl-C
    # must reach this process, which stops its children (in their own sessions).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)

    def report(result: CaseResult) -> None:
        if args.json:
            print(json.dumps(asdict(result)), flush=True)
            return
        print(table_row(result), flush=True)
        for warning in result.warnings:
            print(f"    ! {warning}", flush=True)

    try:
        with Lab(udp_timeout=args.udp_timeout, turn_auth=args.turn_auth) as lab:
            build_matrix_lab(lab, kinds)
            if not args.json:
                print(TABLE_HEADER, flush=True)
            results = run_matrix(lab, cases, on_result=report)
            if args.keep:
                keep_up(lab, kinds)
    except KeyboardInterrupt:
        print("natlab: interrupted; the lab is removed", file=sys.stderr)
        return 130
    except LabError as exc:
        print(f"natlab: error: {exc}", file=sys.stderr)
        return 1
    return 0 if all(r.transfer_ok for r in results) else 1


def keep_up(lab: Lab, kinds: Sequence[str]) -> None:
    """Serve devices of every kind and wait for Ctrl-C, printing how to poke at the lab."""
    for kind in kinds:
        site = lab.sites[f"dev-{kind}"]
        lab.start_web(site)
        lab.start_device(site, device_id(kind))
    print(
        f"\nlab up: signaling {lab.signal_url}, STUN/TURN {PUBLIC_ADDR}:{TURN_PORT}",
        file=sys.stderr,
    )
    for site in lab.sites.values():
        names = ", ".join(ns.name for ns in site.namespaces)
        print(
            f"  {site.name:<16} {site.address:<14} {site.public_address:<14} {names}",
            file=sys.stderr,
        )
    env = lab.workdir / "client.env"
    token = lab.token("poke", "client", [device_id(k) for k in kinds])
    password = lab.ice_args()[1].get("TUNNEL_TURN_PASSWORD")
    env.write_text(
        f"TUNNEL_TOKEN={token}\n" + (f"TUNNEL_TURN_PASSWORD={password}\n" if password else "")
    )
    env.chmod(0o600)
    site = lab.sites[f"cli-{kinds[0]}"]
    ice = " ".join(lab.ice_args()[0])
    print(
        f"a client, e.g.: ip netns exec {site.host.name} env $(cat {env}) "
        f"{sys.executable} -m tunnelctl connect --signal {lab.signal_url} "
        f"--device {device_id(kinds[0])} --service web {ice}\n"
        "devices: dev-KIND; Ctrl-C removes the lab",
        file=sys.stderr,
    )
    threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
