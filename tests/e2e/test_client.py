"""End to end, the remote side as users meet it (issue 12): ssh through
``connect --stdio`` (cold, and handed over to a running client), several forwards
from one client config, ``devices``, failing fast before any session, ``--wait``.

OpenSSH is real: sshd runs as the test user on a free loopback port with
throwaway host and user keys in a temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import Child
from tests.e2e.conftest import LOOPBACK, PAGE, READY, Tunnel
from tests.e2e.test_tunnel import http_get

pytestmark = pytest.mark.e2e

SSHD = "/usr/sbin/sshd"
LOGINS = 5  # per way of logging in, for the timings printed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Sshd:
    port: int
    home: Path
    child: Child

    def ssh_options(self) -> list[str]:
        return [
            "-F",
            "/dev/null",
            "-i",
            str(self.home / "user_key"),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.home / 'known_hosts'}",
            "-o",
            "HostKeyAlias=testhost",  # one known_hosts entry, however the host is reached
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]


@pytest.fixture
def sshd() -> Iterator[Sshd]:
    if not (shutil.which(SSHD) and shutil.which("ssh") and shutil.which("scp")):
        pytest.fail("OpenSSH is missing: run scripts/install-system-deps.sh")
    if os.geteuid() == 0:
        # Root's sshd insists on its privilege separation directory, which
        # Debian's ssh.service creates (RuntimeDirectory=sshd); as a user it is not needed.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="tunnelctl-sshd-"))
    for key in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / key)], check=True
        )
    shutil.copy(home / "user_key.pub", home / "authorized_keys")
    host_pub = (home / "host_key.pub").read_text().split()
    (home / "known_hosts").write_text(f"testhost {host_pub[0]} {host_pub[1]}\n")
    port = free_port()
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home / 'host_key'}\n"
        f"PidFile {home / 'sshd.pid'}\nAuthorizedKeysFile {home / 'authorized_keys'}\n"
        "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nPubkeyAuthentication yes\nSubsystem sftp internal-sftp\n"
    )
    child = Child([SSHD, "-D", "-e", "-f", str(home / "sshd_config")], name="sshd")
    try:
        child.wait_stderr("Server listening on 127.0.0.1", READY)
        yield Sshd(port, home, child)
    finally:
        child.stop()
        shutil.rmtree(home, ignore_errors=True)


def start_device(tunnel: Tunnel, device: str, *exposes: str) -> Child:
    runtime = tempfile.mkdtemp(prefix=f"tunnelctl-{device}-")
    tunnel.runtime_dirs.append(runtime)
    args = ["start", "--runtime-dir", runtime, "--signal", tunnel.signal_url, "--device", device]
    for expose in exposes:
        args += ["--expose", expose]
    child = Child.tunnelctl(
        [*args, *LOOPBACK],
        env={"TUNNEL_TOKEN": tunnel.token(device, "device")},
        name=f"device {device}",
    )
    tunnel.children.append(child)
    child.wait_line("registered ", READY)
    return child


def client_token_file(tunnel: Tunnel, *devices: str) -> Path:
    where = Path(tempfile.mkdtemp(prefix="tunnelctl-client-"))
    tunnel.runtime_dirs.append(str(where))
    os.chmod(where, 0o700)
    path = where / "client.jwt"
    path.write_text(tunnel.token("client1", "client", devices) + "\n")
    return path


def start_connect(tunnel: Tunnel, *args: str, runtime: Path | None = None) -> Child:
    runtime = runtime or Path(tempfile.mkdtemp(prefix="tunnelctl-rt-"))
    tunnel.runtime_dirs.append(str(runtime))
    child = Child.tunnelctl(["connect", "--runtime-dir", str(runtime), *args, *LOOPBACK])
    tunnel.children.append(child)
    return child


def tunnelctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnelctl", *args],
        capture_output=True,
        text=True,
        timeout=READY * 2,
        env={**os.environ, **(env or {})},
    )


def ssh_login(sshd: Sshd, *target: str) -> tuple[float, str]:
    """One login running a command; its wall time and output."""
    started = time.perf_counter()
    done = subprocess.run(
        ["ssh", *sshd.ssh_options(), *target, "echo ok-$((6*7))"],
        capture_output=True,
        text=True,
        timeout=READY * 2,
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    return elapsed, done.stdout.strip()


def proxy_command(tunnel: Tunnel, token_file: Path, runtime: Path) -> str:
    return (
        f"{sys.executable} -m tunnelctl connect --signal {tunnel.signal_url} "
        f"--token-file {token_file} --runtime-dir {runtime} --device dev1 --service ssh "
        "--stdio --ice-host 127.0.0.1"
    )


def test_ssh_through_stdio_runs_a_command_and_scp_copies_16_mib(tunnel: Tunnel, sshd: Sshd) -> None:
    start_device(tunnel, "dev1", f"ssh=tcp://127.0.0.1:{sshd.port}")
    token_file = client_token_file(tunnel, "dev1")
    nobody = token_file.parent / "runtime"  # no client runs here: a session of its own
    proxy = ["-o", f"ProxyCommand={proxy_command(tunnel, token_file, nobody)}"]
    _, said = ssh_login(sshd, *proxy, "dev1")
    assert said == "ok-42"
    source = sshd.home / "upload.bin"
    source.write_bytes(os.urandom(16 * 1024 * 1024))
    copied = subprocess.run(
        ["scp", *sshd.ssh_options(), *proxy, str(source), f"dev1:{sshd.home / 'copy.bin'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert copied.returncode == 0, copied.stderr
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert hashlib.sha256((sshd.home / "copy.bin").read_bytes()).hexdigest() == digest


def test_ssh_login_times_direct_forward_handoff_and_cold(tunnel: Tunnel, sshd: Sshd) -> None:
    """Correctness of each way in; the times are printed (README: ssh login times)."""
    start_device(tunnel, "dev1", f"ssh=tcp://127.0.0.1:{sshd.port}")
    token_file = client_token_file(tunnel, "dev1")
    runtime = token_file.parent / "runtime"
    client = start_connect(
        tunnel,
        "--signal",
        tunnel.signal_url,
        "--token-file",
        str(token_file),
        "--device",
        "dev1",
        "--forward",
        "ssh=127.0.0.1:0",
        runtime=runtime,
    )
    port = client.wait_line("forwarding ", READY).split()[1].rsplit(":", 1)[1]
    cold_runtime = token_file.parent / "elsewhere"
    ways = {
        "direct": ["-p", str(sshd.port), "127.0.0.1"],
        "forward": ["-p", port, "127.0.0.1"],
        "stdio handoff": [
            "-o",
            f"ProxyCommand={proxy_command(tunnel, token_file, runtime)}",
            "dev1",
        ],
        "stdio cold": [
            "-o",
            f"ProxyCommand={proxy_command(tunnel, token_file, cold_runtime)}",
            "dev1",
        ],
    }
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(LOGINS):
        for way, target in ways.items():
            elapsed, said = ssh_login(sshd, *target)
            assert said == "ok-42", way
            times[way].append(elapsed)
    # The handed-off logins went through the running client's one session.
    status = json.loads(
        tunnelctl("status", "--client", "--json", "--runtime-dir", str(runtime)).stdout
    )
    (device,) = status[0]["devices"]
    assert device["reconnects"] == 0 and device["state"] == "open"
    print()
    for way, seconds in times.items():
        print(
            f"ssh login {way:>14}: median {statistics.median(seconds) * 1000:6.0f} ms, "
            f"min {min(seconds) * 1000:6.0f} ms over {LOGINS}"
        )
    forward = statistics.median(times["forward"])
    print(f"handoff / forward: {statistics.median(times['stdio handoff']) / forward:.2f}x")


def test_one_config_three_forwards_two_devices_concurrent_traffic(tunnel: Tunnel) -> None:
    web = f"http://127.0.0.1:{tunnel.web.port}"
    start_device(tunnel, "dev1", f"web={web}", f"files={web}")
    start_device(tunnel, "dev2", f"web={web}")
    token_file = client_token_file(tunnel, "dev1", "dev2")
    config = token_file.parent / "client.toml"
    config.write_text(
        f'signal = ["{tunnel.signal_url}"]\n'
        'token_file = "client.jwt"\n'
        "[[devices]]\n"
        'id = "dev1"\n'
        'forwards = { web = "127.0.0.1:0", files = "127.0.0.1:0" }\n'
        "[[devices]]\n"
        'id = "dev2"\n'
        "[devices.forwards]\n"
        'web = "127.0.0.1:0"\n'
    )
    runtime = token_file.parent / "runtime"
    client = start_connect(tunnel, "--config", str(config), runtime=runtime)
    lines = client.wait_lines(
        ["-> dev1/web ", "-> dev1/files ", "-> dev2/web "], READY, anywhere=True
    )
    addresses = {line.split()[3]: line.split()[1] for line in lines}
    assert sorted(addresses) == ["dev1/files", "dev1/web", "dev2/web"]
    jobs = [(a, "/big") for a in addresses.values()] + [
        (a, f"/echo/{i}") for i in range(6) for a in addresses.values()
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        bodies = list(pool.map(lambda job: http_get(*job), jobs))
    for (_, path), body in zip(jobs, bodies, strict=True):
        if path == "/big":
            assert hashlib.sha256(body).hexdigest() == tunnel.web.big_sha256
        else:
            assert body == path.encode()
    status = json.loads(
        tunnelctl("status", "--client", "--json", "--runtime-dir", str(runtime)).stdout
    )
    (state,) = status
    sessions = {d["device"]: d for d in state["devices"]}
    assert {f["service"] for f in sessions["dev1"]["forwards"]} == {"web", "files"}
    assert len({d["session"] for d in sessions.values()}) == 2  # one session per device
    assert sessions["dev1"]["bytes_in"] > 2 * len(tunnel.web.big)
    assert sessions["dev2"]["bytes_in"] > len(tunnel.web.big)
    assert all(d["state"] == "open" and d["path"] == "direct" for d in sessions.values())
    text = tunnelctl("status", "--client", "--runtime-dir", str(runtime))
    assert text.returncode == 0 and "device dev2: open" in text.stdout, text.stdout


def test_devices_lists_online_and_offline_devices(tunnel: Tunnel) -> None:
    start_device(tunnel, "dev1", f"web=http://127.0.0.1:{tunnel.web.port}", "ssh=127.0.0.1:22")
    token = tunnel.token("client1", "client", ("dev1", "dev2"))
    listed = tunnelctl(
        "devices", "--signal", tunnel.signal_url, "--json", env={"TUNNEL_TOKEN": token}
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [
        {"device": "dev1", "online": True, "services": ["web", "ssh"]},
        {"device": "dev2", "online": False, "services": []},
    ]
    device_token = tunnel.token("dev1", "device")
    refused = tunnelctl(
        "devices", "--signal", tunnel.signal_url, env={"TUNNEL_TOKEN": device_token}
    )
    assert refused.returncode == 2
    assert refused.stderr.startswith("tunnelctl: error: this token is a device token")


def test_busy_port_fails_before_any_session_is_requested(tunnel: Tunnel) -> None:
    device = start_device(tunnel, "dev1", f"web=http://127.0.0.1:{tunnel.web.port}")
    token_file = client_token_file(tunnel, "dev1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        failed = tunnelctl(
            "connect",
            "--signal",
            tunnel.signal_url,
            "--token-file",
            str(token_file),
            "--device",
            "dev1",
            "--forward",
            f"web=127.0.0.1:{port}",
            *LOOPBACK,
        )
    assert failed.returncode == 1
    assert failed.stderr.startswith(
        f"tunnelctl: error: cannot listen on 127.0.0.1:{port} for dev1/web"
    )
    assert len(failed.stderr.splitlines()) == 1, failed.stderr
    # The device logs every session request; after a good forward's, that is the only one.
    client = start_connect(
        tunnel,
        "--signal",
        tunnel.signal_url,
        "--token-file",
        str(token_file),
        "--device",
        "dev1",
        "--forward",
        "web=127.0.0.1:0",
    )
    address = client.wait_line("forwarding ", READY).split()[1]
    assert http_get(address, "/") == PAGE
    device.wait_stderr("asks for dev1", READY)
    assert sum("asks for dev1" in line for line in device.stderr_lines) == 1


def test_wait_succeeds_when_the_device_comes_up_later(tunnel: Tunnel) -> None:
    token_file = client_token_file(tunnel, "dev1")
    args = ["--signal", tunnel.signal_url, "--token-file", str(token_file), "--device", "dev1"]
    at_once = tunnelctl("connect", *args, "--forward", "web=127.0.0.1:0")
    assert at_once.returncode == 1
    assert at_once.stderr.startswith("tunnelctl: error: device dev1 is offline"), at_once.stderr
    client = start_connect(tunnel, *args, "--forward", "web=127.0.0.1:0", "--wait", "120")
    client.wait_stderr("device dev1 is offline; waiting for it", READY)
    start_device(tunnel, "dev1", f"web=http://127.0.0.1:{tunnel.web.port}")
    address = client.wait_line("forwarding ", READY).split()[1]
    assert http_get(address, "/") == PAGE


def test_clean_exit_says_nothing_of_a_lost_link(device_tunnel: Tunnel) -> None:
    child, _ = device_tunnel.forward()
    assert child.stop() == 0
    assert not [line for line in child.stderr_lines if "lost" in line], child.stderr_lines


def test_stdio_to_a_service_the_device_lacks_fails_with_one_line(device_tunnel: Tunnel) -> None:
    token_file = client_token_file(device_tunnel, "dev1")
    runtime = token_file.parent / "runtime"
    args = ["--signal", device_tunnel.signal_url, "--token-file", str(token_file)]
    running = start_connect(
        device_tunnel, *args, "--device", "dev1", "--forward", "web=0", runtime=runtime
    )
    running.wait_line("forwarding ", READY)
    # The running client refuses the handoff; the --stdio process then asks for itself.
    failed = tunnelctl(
        "connect",
        *args,
        "--runtime-dir",
        str(runtime),
        "--device",
        "dev1",
        "--service",
        "admin",
        "--stdio",
        *LOOPBACK,
    )
    assert failed.returncode == 1
    assert failed.stderr == (
        "tunnelctl: error: device dev1 does not expose service 'admin' (it exposes: web)\n"
    )
    assert failed.stdout == ""


def test_status_counts_a_reconnect_and_keeps_the_bytes(tunnel: Tunnel) -> None:
    web = f"web=http://127.0.0.1:{tunnel.web.port}"
    device = start_device(tunnel, "dev1", web)
    token_file = client_token_file(tunnel, "dev1")
    runtime = token_file.parent / "runtime"
    args = ["--signal", tunnel.signal_url, "--token-file", str(token_file), "--device", "dev1"]
    client = start_connect(tunnel, *args, "--forward", "web=0", runtime=runtime)
    address = client.wait_line("forwarding ", READY).split()[1]
    assert http_get(address, "/") == PAGE
    before = json.loads(
        tunnelctl("status", "--client", "--json", "--runtime-dir", str(runtime)).stdout
    )
    first = before[0]["devices"][0]
    assert first["reconnects"] == 0 and first["bytes_in"] > len(PAGE)
    device.stop()
    client.wait_stderr("re-establishing", READY)
    start_device(tunnel, "dev1", web)
    client.wait_stderr("re-established", READY * 2)
    assert http_get(address, "/") == PAGE
    after = json.loads(
        tunnelctl("status", "--client", "--json", "--runtime-dir", str(runtime)).stdout
    )
    now = after[0]["devices"][0]
    assert now["reconnects"] == 1 and now["state"] == "open"
    assert now["session"] != first["session"]
    assert now["bytes_in"] > first["bytes_in"]
