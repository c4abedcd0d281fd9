"""A real coturn (``turnserver``) on 127.0.0.1 for the TURN end-to-end tests.

coturn runs with ``use-auth-secret`` (the TURN REST scheme tunnelctl's
signaling server mints credentials for), its own pid file and database in a
temporary directory, and is stopped by pid. Readiness is coturn's own
"listener opened" log lines. ``make_test_ca`` builds a CA and a server
certificate for 127.0.0.1 with ``cryptography`` (aiortc's dependency) for
TURN over TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

TURN_SECRET = "e2e-turn-shared-secret-0123456789"
REALM = "tunnelctl.test"


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def have_coturn() -> bool:
    return shutil.which("turnserver") is not None


class Coturn:
    """One ``turnserver`` process on 127.0.0.1; ``stop()`` ends it by pid."""

    def __init__(
        self, workdir: Path, *, tls: tuple[Path, Path] | None = None, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.tls_port = free_port() if tls else None
        secret_file = workdir / "turn-secret"
        secret_file.write_text(TURN_SECRET + "\n")
        self.secret_file = secret_file
        args = [
            "turnserver",
            "-n",  # no configuration file: only these flags
            "-v",  # prints the "listener opened" lines we wait for
            "--listening-ip=127.0.0.1",
            "--relay-ip=127.0.0.1",
            f"--listening-port={self.port}",
            "--use-auth-secret",
            f"--static-auth-secret={TURN_SECRET}",
            f"--realm={REALM}",
            "--no-dtls",
            "--no-cli",
            # The peers of these tests are on loopback; a public server denies them.
            "--allow-loopback-peers",
            "--no-software-attribute",
            "--log-file=stdout",
            "--simple-log",
            f"--pidfile={workdir / 'turnserver.pid'}",
            f"--db={workdir / 'turndb'}",
        ]
        if tls is None:
            args.append("--no-tls")
        else:
            cert, key = tls
            args += [f"--tls-listening-port={self.tls_port}", f"--cert={cert}", f"--pkey={key}"]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def wait_ready(self, timeout: float) -> None:
        wanted = {f"UDP listener opened on: 127.0.0.1:{self.port}"}
        wanted.add(f"TCP listener opened on : 127.0.0.1:{self.port}")
        if self.tls_port is not None:
            wanted.add(f"TLS/TCP listener opened on : 127.0.0.1:{self.tls_port}")
        deadline = time.monotonic() + timeout
        while wanted:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"coturn not ready; waiting for {wanted}") from None
            if line is None:
                raise RuntimeError(f"coturn exited: {self.log[-10:]}")
            wanted = {w for w in wanted if w not in line}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            del self.log[:-500]
            self.lines.put(line)
        self.lines.put(None)


def make_test_ca(workdir: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for IP 127.0.0.1: ``(ca.pem, cert.pem, key.pem)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunnelctl e2e test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = workdir / "ca.pem", workdir / "cert.pem", workdir / "key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path
