"""A Chromium page and a tuned aiortc peer exchange data over a DataChannel.

Run inside a network namespace that has only ``lo`` (see
``test_sctp_browser.py``), so that Chromium, allowed loopback candidates, and
aiortc, restricted to 127.0.0.1, meet on loopback and nowhere else::

    python -m tests.e2e.browser_dc_peer --bytes N [--timeout S]

aiortc (tuned by :mod:`workers.aiortc_tuning`) offers and sends N bytes in 16
KiB messages; the page folds them into an FNV-1a hash and echoes each message
back; aiortc checks that the echo is what it sent, in order, and the page's
hash. The offer and answer go through ``page.evaluate``. One JSON line:
``{"tuned": bool, "bytes": N, "page_fnv": H, "fnv": H, "echo_intact": bool,
"seconds": S}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from playwright.async_api import async_playwright

from workers import aiortc_tuning
from workers.ice import parse_networks, restrict_host_addresses

CHROMIUM = "/usr/bin/chromium"
MESSAGE = 16 * 1024

PAGE_ANSWER = """
async ([offer, total]) => {
  const pc = new RTCPeerConnection({iceServers: []});
  window.pc = pc;
  window.report = null;
  let fnv = 0x811c9dc5, received = 0;
  pc.ondatachannel = (event) => {
    const channel = event.channel;
    channel.binaryType = "arraybuffer";
    channel.onmessage = (message) => {
      const bytes = new Uint8Array(message.data);
      for (let i = 0; i < bytes.length; i++) {
        fnv = Math.imul(fnv ^ bytes[i], 0x01000193) >>> 0;
      }
      received += bytes.length;
      channel.send(message.data);
      if (received >= total) {
        channel.send(JSON.stringify({bytes: received, fnv: fnv}));
      }
    };
  };
  await pc.setRemoteDescription({type: "offer", sdp: offer});
  await pc.setLocalDescription(await pc.createAnswer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") resolve();
    pc.onicegatheringstatechange = () => {
      if (pc.iceGatheringState === "complete") resolve();
    };
  });
  return pc.localDescription.sdp;
}
"""


def fnv1a(data: bytes, value: int = 0x811C9DC5) -> int:
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


async def exchange(total: int, timeout: float) -> dict[str, object]:
    tuned = aiortc_tuning.install()
    restrict_host_addresses(parse_networks(["127.0.0.1"]))
    rng = random.Random(7)
    sent = [rng.randbytes(min(MESSAGE, total - i)) for i in range(0, total, MESSAGE)]
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--allow-loopback-in-peer-connection",
                "--disable-features=WebRtcHideLocalIpsWithMdns",
            ],
        )
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            page = await browser.new_page()
            channel = pc.createDataChannel("browser-test", ordered=True)
            loop = asyncio.get_running_loop()
            opened: asyncio.Future[None] = loop.create_future()
            finished: asyncio.Future[None] = loop.create_future()
            echoed: list[bytes] = []
            report: dict[str, int] = {}

            def on_message(message: bytes | str) -> None:
                if isinstance(message, str):
                    report.update(json.loads(message))
                else:
                    echoed.append(message)
                if report and sum(map(len, echoed)) >= total and not finished.done():
                    finished.set_result(None)

            channel.on("open", lambda: opened.done() or opened.set_result(None))
            channel.on("message", on_message)
            await pc.setLocalDescription(await pc.createOffer())
            answer = await page.evaluate(PAGE_ANSWER, [pc.localDescription.sdp, total])
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            await asyncio.wait_for(opened, timeout)
            started = time.monotonic()
            low = asyncio.Event()
            channel.bufferedAmountLowThreshold = 256 * 1024
            channel.on("bufferedamountlow", low.set)
            for message in sent:
                channel.send(message)
                if channel.bufferedAmount > 1024 * 1024:
                    low.clear()
                    await asyncio.wait_for(low.wait(), timeout)
            await asyncio.wait_for(finished, timeout)
            seconds = time.monotonic() - started
        finally:
            await pc.close()
            await browser.close()
    expected = b"".join(sent)
    return {
        "tuned": tuned,
        "bytes": report.get("bytes"),
        "page_fnv": report.get("fnv"),
        "fnv": fnv1a(expected),
        "echo_intact": b"".join(echoed) == expected,
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    result = asyncio.run(exchange(args.bytes, args.timeout))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
