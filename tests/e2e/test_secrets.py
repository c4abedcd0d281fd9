"""End to end: no secret in any log at -vv, nor in the environment of workers (issue 9).

A signaling server handing out coturn credentials, a device and a client, all
at ``-vv`` (websockets' frame dumps, aiortc's and aioice's debug output in the
logs), a session through coturn; then every line every process wrote is
searched for the tokens (whole, or any 16 characters of their signatures, or
the start of any JWT), the TURN passwords and the shared secrets. The fork
server and the workers must not hold the device token in their environment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_supervisor import ctl_json
from tests.e2e.test_tunnel import http_get
from tests.e2e.test_turn import RelayLab, _lab, assert_no_credentials_logged
from tests.e2e.turn_support import TURN_SECRET, have_coturn

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("loopback_ice"),
    pytest.mark.skipif(not have_coturn(), reason="coturn (turnserver) is not installed"),
]


ISSUED: list[str] = []


@pytest.fixture
def lab() -> Iterator[RelayLab]:
    """A RelayLab whose every issued token is kept in ``ISSUED``."""
    ISSUED.clear()
    for relay_lab in _lab(tls=False):
        issue = relay_lab.token

        def recording(
            sub: str, role: str, devices: tuple[str, ...] = (), issue: Any = issue
        ) -> str:
            token = issue(sub, role, devices)
            ISSUED.append(token)
            return token

        relay_lab.token = recording  # type: ignore[method-assign]
        yield relay_lab


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def status(runtime: Path) -> dict[str, object]:
    result = ctl_json(runtime, "status")
    assert isinstance(result, dict)
    return result


def test_no_token_or_credential_in_any_log_at_vv(lab: RelayLab) -> None:
    port = lab.coturn.port
    signal_url = lab.signal(f"turn:127.0.0.1:{port}")
    device, runtime = lab.start_device(signal_url)
    _, line = lab.connect(signal_url, "--ice-policy", "relay")
    assert http_get(line.split()[1], "/")

    device_token = ISSUED[0]
    info = status(runtime)
    pids = [int(info["fork_server_pid"])]  # type: ignore[call-overload]
    pids += [int(w["pid"]) for w in info["workers"]]  # type: ignore[attr-defined]
    for pid in pids:
        env = environment(pid)
        assert "TUNNEL_TOKEN" not in env, pid
        assert not any(device_token in value for value in env.values()), pid

    assert_no_credentials_logged(lab)
    logs = lab.logs() + "\n" + "\n".join(lab.coturn.log)
    assert " DEBUG " in logs and "websockets" in logs  # -vv really was on
    for token in ISSUED:
        signature = token.split(".")[2]
        pieces = {signature[i : i + 16] for i in range(0, len(signature) - 16, 4)}
        assert not any(piece in logs for piece in pieces)
    assert "eyJ" not in logs  # no JWT, whole or cut short
    assert lab.secret not in logs and TURN_SECRET not in logs
    print(f"\n-vv logs checked: {len(logs.splitlines())} lines of {len(lab.children)} processes")
    assert device.proc.poll() is None
