"""The running client's control endpoint, server side (PROTOCOL.md §4.2).

``tunnelctl connect`` listens on ``CLIENTS_DIR/PID.sock`` (a Unix stream socket
in the user's private runtime directory) for ``status`` (``tunnelctl status
--client``) and ``stream`` (a ``connect --stdio`` handing its stream over, so
that an ssh login through ``ProxyCommand`` reuses this client's session).

The endpoint knows the client only through :class:`ClientState`, so it can be
tested with any object that answers those questions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from protocol.client_control import (
    MAX_LINE,
    ControlMessageError,
    ControlReply,
    decode_request,
    encode_reply,
)

log = logging.getLogger("tunnelctl.client.control")

READ_TIMEOUT = 5.0


class ClientState(Protocol):
    def status(self) -> dict[str, Any]:
        """The ``status`` result: plain data JSON can print."""

    def refuse_stream(self, device: str, service: str) -> str | None:
        """Why a stream to ``device``/``service`` cannot be carried (one line), or None."""

    async def carry(
        self, device: str, service: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Carry a handed-over connection to ``service``; it owns ``writer`` from now on."""


class ControlEndpoint:
    """Serve the control socket at ``path`` until :meth:`close`."""

    def __init__(self, path: Path, client: ClientState) -> None:
        self.path = path
        self._client = client
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # ours by name (our pid): a predecessor that died left it
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_LINE)
        os.chmod(self.path, 0o600)  # the directory is 0700 already; belt and braces

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        carried = False
        try:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT)
                request = decode_request(line)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            except ControlMessageError as exc:
                writer.write(encode_reply(ControlReply(False, None, f"bad request: {exc}")))
                return
            if request.cmd == "status":
                writer.write(encode_reply(ControlReply(True, self._client.status())))
                return
            device, service = request.args["device"], request.args["service"]
            refusal = self._client.refuse_stream(device, service)
            if refusal is not None:
                writer.write(encode_reply(ControlReply(False, None, refusal)))
                return
            writer.write(encode_reply(ControlReply(True, {"device": device, "service": service})))
            carried = True
            await self._client.carry(device, service, reader, writer)
        except ConnectionError:
            pass
        finally:
            if not carried:
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                writer.close()
