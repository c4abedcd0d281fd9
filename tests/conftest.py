"""Fixtures shared by the in-memory and in-process tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from workers.ice import parse_networks, restrict_host_addresses


@pytest.fixture
def loopback_ice() -> Iterator[None]:
    """Keep ICE on 127.0.0.1 for peers in this process (aioice never offers it by itself)."""
    restrict_host_addresses(parse_networks(["127.0.0.1"]))
    yield
    restrict_host_addresses(())
