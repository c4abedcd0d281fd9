"""The browser client through a TURN relay: a real coturn on 127.0.0.1, the
signaling server handing out its REST credentials, a device that may only use
relayed candidates (``--ice-policy relay``), and headless Chromium with stock
settings. The page must say ``relayed`` and the app must load through it.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from harness import Child
from signaling.auth import issue_token
from tests.e2e.browser_support import CHROMIUM, READY, WAIT_MS, AppServer
from tests.e2e.turn_support import Coturn, have_coturn

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium missing"),
    pytest.mark.skipif(not have_coturn(), reason="coturn (turnserver) missing"),
]


@pytest.fixture
def relay_lab() -> Iterator[tuple[str, str]]:
    """(http URL of the signaling server, client token) with dev1 relay-only."""
    workdir = Path(tempfile.mkdtemp(prefix="tunnelctl-browser-turn-"))
    coturn = Coturn(workdir)
    app = AppServer()
    threading.Thread(target=app.serve_forever, daemon=True).start()
    secret = secrets.token_hex(32)
    children: list[Child] = []
    try:
        coturn.wait_ready(READY)
        signal_child = Child.tunnelctl(
            [
                *("signal", "--port", "0", "--turn-secret-file", str(coturn.secret_file)),
                *("--ice-server", f"turn:127.0.0.1:{coturn.port}"),
            ],
            env={"TUNNEL_SECRET": secret},
            name="signal",
        )
        children.append(signal_child)
        signal_url = signal_child.wait_line("listening ", READY).split()[1]
        device = Child.tunnelctl(
            [
                *("start", "--runtime-dir", str(workdir / "runtime"), "--signal", signal_url),
                *("--device", "dev1", "--expose", f"web=http://127.0.0.1:{app.port}"),
                *("--ice-host", "127.0.0.1", "--ice-policy", "relay"),
            ],
            env={"TUNNEL_TOKEN": issue_token(secret, sub="dev1", role="device", ttl=600)},
            name="device dev1",
        )
        children.append(device)
        device.wait_line("registered ", READY)
        token = issue_token(secret, sub="alice", role="client", devices=("dev1",), ttl=600)
        yield signal_url.replace("ws://", "http://").removesuffix("/signal"), token
    finally:
        for child in reversed(children):
            child.stop()
        coturn.stop()
        app.shutdown()
        app.server_close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_relayed_session_says_relayed_and_carries_the_app(relay_lab: tuple[str, str]) -> None:
    http_url, token = relay_lab
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(f"{http_url}/#token={token}")
            page.click('tr[data-device="dev1"] a:text-is("open web")')
            page.wait_for_selector('#state[data-state="relayed"]')
            frame = page.frame_locator("#app")
            frame.locator("body[data-ready=yes]").wait_for()
            assert frame.locator("#items li").all_inner_texts() == ["alpha", "beta", "gamma"]
        finally:
            browser.close()
