"""The NAT lab of ``scripts/natlab.py`` for end-to-end tests: the module, skips, fixtures.

A test that needs real NATs uses the ``natlab_lab`` fixture (import it into the
test module: ``from tests.e2e.natlab_support import natlab_lab``): a built
:class:`natlab.Lab` (the public segment with ``tunnelctl signal`` and coturn),
shared by the module's tests, to which each test adds the sites it needs under
names of its own. Everything is removed after the module. The lab's building
blocks (see ``scripts/natlab.py``)::

    site = lab.add_site("dev-x", "symmetric")      # none, cone, symmetric, udp-blocked
    lab.add_site("dev-y", "cone", udp_timeout=5)   # its router forgets idle UDP after 5 s
    site.host.run("ip", "addr")                    # a command inside the site's host
    site.host.spawn(argv, name="...")              # a long-running one (stopped by pid)
    lab.start_web(site); device = lab.start_device(site, "dev-x")
    client = lab.start_client(other, "dev-x")      # then client.wait_line("forwarding ")
    lab.partition(a, b); a.uplink.restore()        # drop all between two sites, and heal
    site.uplink.drop(proto="udp")                  # drop the site's UDP (restore() heals)
    site.uplink.set_loss(5)                        # 5 % random loss (iptables statistic)
    lab.renumber(site)                             # new host and public address
    lab.mapped_address(site)                       # what STUN sees of a UDP socket there
    site.mappings()                                # the router's UDP conntrack entries

Devices and clients get STUN, TURN/UDP and TURN/TCP from the signaling server
(coturn's REST secret; ``natlab.Lab(turn_auth="static")`` passes explicit
``--stun``/``--turn`` options instead). The module's lab keeps the default
30 s UDP timeout; a device idle past it behind a NAT meets expired mappings.

Skips, with the reason, when not root, when ``ip netns`` or iptables cannot
work here, or when coturn is missing; as root in CI a missing program fails,
because ``scripts/install-system-deps.sh`` should have installed it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def _load_natlab() -> ModuleType:
    """``scripts/natlab.py`` as the module ``natlab`` (scripts/ is not a package)."""
    loaded = sys.modules.get("natlab")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location("natlab", ROOT / "scripts" / "natlab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["natlab"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


natlab: Any = _load_natlab()


@functools.cache
def _unavailable_reason() -> str | None:
    reason: str | None = natlab.unavailable_reason()
    return reason


def require_natlab() -> None:
    """Skip (or in CI as root, fail for a missing program) unless the lab can run here."""
    reason = _unavailable_reason()
    if reason is None:
        return
    if "not installed" in reason and os.environ.get("CI") and os.geteuid() == 0:
        pytest.fail(f"{reason}; CI runs as root, so it should have been installed")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def natlab_lab() -> Iterator[Any]:
    """A built lab, shared by the module's tests; sites are the tests' to add."""
    require_natlab()
    with natlab.Lab() as lab:
        yield lab


def tcp_reachable(site: Any, host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection from ``site``'s host to HOST:PORT opens within ``timeout``."""
    code = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), timeout={timeout}).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return bool(site.host.succeeds(sys.executable, "-c", code, timeout=timeout + 10))
