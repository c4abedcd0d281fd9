"""The client's control endpoint (PROTOCOL.md §4.2): vectors, the endpoint with a
stand-in client, and a real ``connect --stdio`` process handing its stream over
without importing aiortc or click."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from protocol.client_control import (
    ControlMessageError,
    ControlReply,
    ControlRequest,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from workers.client_control import ControlEndpoint
from workers.handoff import endpoint_path, hand_off, statuses

ROOT = Path(__file__).resolve().parent.parent

STATUS = b'{"v":1,"cmd":"status","args":{}}\n'
STREAM = b'{"v":1,"cmd":"stream","args":{"device":"dev1","service":"ssh"}}\n'
OK = b'{"v":1,"ok":true,"result":{"device":"dev1","service":"ssh"},"error":null}\n'
REFUSED = b'{"v":1,"ok":false,"result":null,"error":"device dev1 does not expose service \'sh\'"}\n'


def test_vectors_encode_exactly_and_decode_back() -> None:
    stream = ControlRequest("stream", {"device": "dev1", "service": "ssh"})
    assert encode_request(ControlRequest("status", {})) == STATUS
    assert encode_request(stream) == STREAM
    assert decode_request(STREAM) == stream
    ok = ControlReply(True, {"device": "dev1", "service": "ssh"})
    assert encode_reply(ok) == OK
    assert decode_reply(OK) == ok
    refused = ControlReply(False, None, "device dev1 does not expose service 'sh'")
    assert encode_reply(refused) == REFUSED
    assert decode_reply(REFUSED) == refused


@pytest.mark.parametrize(
    "line",
    [
        b'{"v":1,"cmd":"stream","args":{"device":"dev1"}}\n',
        b'{"v":2,"cmd":"status","args":{}}\n',
        b'{"v":1,"cmd":"status","args":{}}',
        b'{"v":1,"cmd":"restart","args":{}}\n',
        b'{"v":1,"cmd":"stream","args":{"device":"","service":"ssh"}}\n',
        b'{"v":1,"cmd":"stream","args":{"device":7,"service":"ssh"}}\n',
        b'{"v":true,"cmd":"status","args":{}}\n',
        b"[1]\n",
        b"not json\n",
    ],
)
def test_bad_requests_are_rejected(line: bytes) -> None:
    with pytest.raises(ControlMessageError):
        decode_request(line)


@pytest.mark.parametrize(
    "line",
    [
        b'{"v":1,"ok":false,"result":null,"error":null}\n',
        b'{"v":1,"ok":true,"result":null,"error":"x"}\n',
        b'{"v":1,"ok":1,"result":null,"error":null}\n',
        b'{"v":1,"ok":true,"result":NaN,"error":null}\n',
    ],
)
def test_bad_replies_are_rejected(line: bytes) -> None:
    with pytest.raises(ControlMessageError):
        decode_reply(line)


class EchoClient:
    """A stand-in client: device dev1 exposes ``echo``, which answers in upper case."""

    def status(self) -> dict[str, Any]:
        return {"pid": 1, "devices": [{"device": "dev1"}]}

    def refuse_stream(self, device: str, service: str) -> str | None:
        if device != "dev1":
            return f"no session with device {device}"
        return None if service == "echo" else f"device dev1 does not expose service {service!r}"

    async def carry(
        self, device: str, service: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        writer.close()


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    (tmp_path / "clients").mkdir(mode=0o700)
    return tmp_path


async def test_status_and_streams_through_the_endpoint(runtime: Path) -> None:
    clients = runtime / "clients"
    endpoint = ControlEndpoint(endpoint_path(clients, 4242), EchoClient())
    await endpoint.start()
    try:
        assert oct(os.stat(endpoint.path).st_mode & 0o777) == "0o600"
        found = await asyncio.to_thread(lambda: list(statuses(clients)))
        assert [reply.result for _, reply in found] == [{"pid": 1, "devices": [{"device": "dev1"}]}]
        assert await asyncio.to_thread(hand_off, clients, "dev2", "echo") is None
        assert await asyncio.to_thread(hand_off, clients, "dev1", "nope") is None
        sock = await asyncio.to_thread(hand_off, clients, "dev1", "echo")
        assert sock is not None

        def talk() -> bytes:
            with sock:
                sock.sendall(b"hello")
                sock.shutdown(socket.SHUT_WR)  # reaches the service as EOF
                received = b""
                while chunk := sock.recv(100):
                    received += chunk
                return received

        assert await asyncio.to_thread(talk) == b"HELLO"
    finally:
        await endpoint.close()
    assert not endpoint.path.exists()


async def test_stdio_hands_its_stream_over_without_loading_aiortc_or_click(runtime: Path) -> None:
    endpoint = ControlEndpoint(endpoint_path(runtime / "clients", 4242), EchoClient())
    await endpoint.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "tunnelctl",
            "connect",
            "--signal",
            "ws://127.0.0.1:9/signal",  # never used: the running client carries the stream
            "--runtime-dir",
            str(runtime),
            "--device",
            "dev1",
            "--service",
            "echo",
            "--stdio",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        payload = os.urandom(1 << 20).hex().encode()  # 2 MiB, more than any pipe buffer
        out, err = await asyncio.wait_for(proc.communicate(payload), 60)
    finally:
        await endpoint.close()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out == payload.upper()
    imported = {line.split("|")[-1].strip() for line in err.decode().splitlines() if "|" in line}
    assert "workers.handoff" in imported
    for heavy in ("aiortc", "click", "asyncio", "websockets", "zmq"):
        assert heavy not in imported, f"the handoff path imported {heavy}"


def test_a_dead_clients_socket_is_removed_and_a_live_ones_kept(runtime: Path) -> None:
    import subprocess

    clients = runtime / "clients"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    paths = [endpoint_path(clients, dead.pid), endpoint_path(clients, os.getpid())]
    for path in paths:  # bound, never listening: a connect is refused, as for a dead client
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    assert hand_off(clients, "dev1", "echo") is None
    assert not paths[0].exists()
    assert paths[1].exists()  # our own pid is alive: its owner may just be starting
