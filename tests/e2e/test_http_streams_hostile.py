"""End to end: a hostile client's HTTP streams (PROTOCOL.md §2.8) against a real device.

The same harness as ``test_hostile_peer.py`` (raw DataChannel messages to a real
worker): a bad request head costs its stream a RESET ``BAD_HEAD`` and nothing
else; a HEAD sent to the device is a stream error; a malformed OPEN_HTTP is a
session error, after which the device serves new sessions.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from protocol.frames import Data, Fin, FrameType, Head, OpenHttp, ResetCode
from protocol.http_heads import (
    RequestHead,
    ResponseHead,
    decode_response_head,
    encode_request_head,
    encode_response_head,
    field_values,
)
from tests.e2e.conftest import PAGE
from tests.e2e.hostile_support import HostileDevice, hostile_client, raw_frame, running_device
from tests.e2e.test_hostile_peer import assert_device_serves, assert_session_error

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("loopback_ice")]


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileDevice]:
    with running_device(tmp_path_factory.mktemp("hostile-http")) as hostile_device:
        yield hostile_device


async def test_an_http_stream_is_answered_head_data_fin(device: HostileDevice) -> None:
    async with hostile_client(device, "http-good") as client:
        stream = client.next_stream_id()
        head = encode_request_head(RequestHead("GET", "/", ((b"accept", b"text/html"),)))
        client.send_frames(OpenHttp(stream, "web", head), Fin(stream))
        first = await client.next_frame(stream)
        assert isinstance(first, Head), first
        response = decode_response_head(first.head)
        assert response.status == 200
        assert not field_values(response.headers, b"connection")
        body = await client.read_stream(stream)
        assert body == PAGE
        assert client.violations == []


async def test_bad_heads_reset_their_stream_only(device: HostileDevice) -> None:
    async with hostile_client(device, "http-bad-heads") as client:
        good = client.begin_http_get("/")
        cases = [
            (b'{"method":"GET","target":"http://x/","headers":[]}', "origin-form"),
            (b'{"method":"GET","target":"/","headers":[["a","1\\r\\n"]]}', "illegal value"),
            (b"not json", "not JSON"),
        ]
        for head, reason in cases:
            stream = client.next_stream_id()
            client.send_frames(OpenHttp(stream, "web", head), Data(stream, b"body"))
            reset = await client.expect_reset(stream, ResetCode.BAD_HEAD)
            assert reset.reason.startswith("bad request head: ") and reason in reset.reason
        # A HEAD from the client is the device's frame: a stream error.
        stream = client.next_stream_id()
        client.send_frames(
            OpenHttp(stream, "web", encode_request_head(RequestHead("GET", "/"))),
            Head(stream, encode_response_head(ResponseHead(200))),
        )
        await client.expect_reset(stream, ResetCode.PROTOCOL)
        stream = client.next_stream_id()
        client.send_frames(OpenHttp(stream, "nope", encode_request_head(RequestHead("GET", "/"))))
        await client.expect_reset(stream, ResetCode.UNKNOWN_SERVICE)
        assert await client.finish_http_get(good) == PAGE
        assert client.violations == []


async def test_a_malformed_open_http_ends_the_session(device: HostileDevice) -> None:
    async with hostile_client(device, "http-malformed") as client:
        assert await client.http_get("/") == PAGE
        client.send(raw_frame(FrameType.OPEN_HTTP, client.next_stream_id(), b"\x03web"))
        await assert_session_error(device, client, "service name length 3 does not fit")
        assert client.violations == []
    await assert_device_serves(device, "http-after-malformed")
