"""The browser client in a real headless Chromium (Debian's ``chromium``,
driven by Playwright's Python client; no browser download), with stock
settings (mDNS candidates on), against a real signaling server, a real
``tunnelctl start`` device and a real HTTP server behind it.

The session open time and the download throughput are printed (``-s``), not
asserted. A screenshot of the opened app is written to
``$TUNNELCTL_ARTIFACTS`` (default: the test's pytest temporary directory)
and its path printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Frame, Page, sync_playwright

from harness import Child
from signaling.auth import issue_token
from tests.e2e.browser_support import (
    CHROMIUM,
    LOGO,
    READY,
    SSE_EVENTS,
    WAIT_MS,
    AppServer,
    chat_server,
)

TUNNELCTL = (sys.executable, "-m", "tunnelctl")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="chromium missing (scripts/install-system-deps.sh)"
    ),
]


@dataclass
class Lab:
    http_url: str
    secret: str
    app: AppServer
    runtime: Path
    browser: Browser
    children: list[Child]

    def token(self, sub: str = "alice", devices: tuple[str, ...] = ("dev1", "dev2")) -> str:
        return issue_token(self.secret, sub=sub, role="client", devices=devices, ttl=600)

    def sessions(self) -> list[dict[str, object]]:
        out = subprocess.run(
            [*TUNNELCTL, "sessions", "--json", "--runtime-dir", str(self.runtime)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        sessions: list[dict[str, object]] = json.loads(out)
        return sessions


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Signaling, device ``dev1`` exposing the app as ``web`` and a WebSocket
    echo service as ``chat``, Chromium.

    ``dev2`` is granted by the client token but never started: offline.
    """
    secret = secrets.token_hex(32)
    app = AppServer()
    threading.Thread(target=app.serve_forever, daemon=True).start()
    chat = chat_server()
    threading.Thread(target=chat.serve_forever, daemon=True).start()
    chat_port = chat.socket.getsockname()[1]
    runtime = Path(tempfile.mkdtemp(prefix="tunnelctl-browser-"))
    children: list[Child] = []
    try:
        signal_child = Child.tunnelctl(
            ["-vv", "signal", "--port", "0"], env={"TUNNEL_SECRET": secret}, name="signal"
        )
        children.append(signal_child)
        signal_url = signal_child.wait_line("listening ", READY).split()[1]
        device = Child.tunnelctl(
            [
                *("start", "--runtime-dir", str(runtime), "--signal", signal_url),
                *("--device", "dev1", "--expose", f"web=http://127.0.0.1:{app.port}"),
                *("--expose", f"chat=http://127.0.0.1:{chat_port}"),
                *("--ice-host", "127.0.0.1"),
            ],
            env={"TUNNEL_TOKEN": issue_token(secret, sub="dev1", role="device", ttl=600)},
            name="device dev1",
        )
        children.append(device)
        device.wait_line("registered ", READY)
        http_url = signal_url.replace("ws://", "http://").removesuffix("/signal")
        with sync_playwright() as playwright:
            # Stock settings: no flag that turns off Chromium's mDNS candidates.
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            try:
                yield Lab(http_url, secret, app, runtime, browser, children)
            finally:
                browser.close()
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(runtime, ignore_errors=True)
        app.shutdown()
        app.server_close()
        chat.shutdown()


@pytest.fixture
def page(lab: Lab) -> Iterator[Page]:
    context = lab.browser.new_context()
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        yield page
    finally:
        context.close()


def assert_not_logged(lab: Lab, token: str) -> None:
    signature = token.rsplit(".", 1)[1]
    for child in lab.children:
        lines = child.stderr_since(0)
        assert lines, f"{child.name} logged nothing: the check would prove nothing"
        assert not [line for line in lines if signature in line], f"{child.name} logged a token"


def sign_in(lab: Lab, page: Page, token: str | None = None) -> None:
    page.goto(f"{lab.http_url}/#token={token or lab.token()}")


def open_app(lab: Lab, page: Page) -> Any:
    """Sign in, open dev1's web app from the list; return the app's frame."""
    sign_in(lab, page)
    page.click('tr[data-device="dev1"] a:text-is("open web")')
    page.wait_for_selector('#state[data-state="direct"]')
    frame = page.frame_locator("#app")
    frame.locator("body[data-ready=yes]").wait_for()
    return frame


def app_frame(page: Page) -> Frame:
    frames = [f for f in page.frames if f.parent_frame is not None]
    assert len(frames) == 1
    return frames[0]


def test_the_page_lists_the_devices_and_opens_the_app(lab: Lab, page: Page, tmp_path: Path) -> None:
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    token = lab.token()
    sign_in(lab, page, token)
    page.wait_for_selector("#devices:not([hidden])")
    assert "#token" not in page.url
    row1 = page.locator('tr[data-device="dev1"]')
    row2 = page.locator('tr[data-device="dev2"]')
    assert row1.locator("td").nth(1).inner_text() == "online"
    assert row1.locator("a").all_inner_texts() == ["open web", "open chat"]
    assert row2.locator("td").nth(1).inner_text() == "offline"

    row1.locator("a").first.click()
    page.wait_for_selector('#state[data-state="direct"]')
    open_ms = page.get_attribute("#state", "data-open-ms")
    since_navigation = page.evaluate("performance.now()")
    frame = page.frame_locator("#app")
    frame.locator("body[data-ready=yes]").wait_for()
    print(
        f"\nbrowser session open (stock Chromium, mDNS candidates): {open_ms} ms "
        f"(signaling link to DataChannel open; page at 'direct' {since_navigation:.0f} ms "
        "after its navigation started)"
    )

    # Every part of the multi-file app came through the tunnel.
    assert frame.locator("#title").inner_text() == "Hello from the device"
    assert frame.locator("#module").inner_text() == "MODULE LOADED!"
    assert frame.locator("#items li").all_inner_texts() == ["alpha", "beta", "gamma"]
    color = frame.locator("#title").evaluate("e => getComputedStyle(e).color")
    assert color == "rgb(1, 2, 3)"
    assert frame.locator("#logo").evaluate("e => [e.naturalWidth, e.naturalHeight]") == [3, 2]
    inner = app_frame(page)
    assert inner.url == f"{lab.http_url}/d/dev1/web/"
    logo = inner.evaluate(
        """async () => {
            const r = await fetch('/img/logo.png');
            const bytes = new Uint8Array(await r.arrayBuffer());
            return [r.status, r.headers.get('content-type'), Array.from(bytes)];
        }"""
    )
    assert logo == [200, "image/png", list(LOGO)]

    artifacts = Path(os.environ.get("TUNNELCTL_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "browser-client.png"
    page.screenshot(path=str(shot))
    print(f"screenshot of the opened app: {shot}")

    # A form POST with a body, answered with a root-relative 303 redirect.
    text = "line one\nünïcode ✓\n" + "x" * 20000
    frame.locator("#text").fill(text)
    frame.locator("#send").click()
    frame.locator("#result").wait_for()
    body = ("text=" + text.replace("\n", "\r\n") + "\r\n").encode()
    assert lab.app.posted[-1] == body
    expected = f"received {len(body)} bytes, sha256 {hashlib.sha256(body).hexdigest()}"
    assert frame.locator("#result").inner_text() == expected
    assert app_frame(page).url.startswith(f"{lab.http_url}/d/dev1/web/done?n={len(body)}&")
    # Our pages run under their strict CSP without a violation; the token
    # reached the server only inside the WebSocket, and no log line holds it.
    assert not [line for line in console if "Content Security Policy" in line], console
    scope = page.evaluate("async () => (await navigator.serviceWorker.getRegistration()).scope")
    assert scope == f"{lab.http_url}/d/"
    assert_not_logged(lab, token)


def test_a_32_mib_download_matches_its_sha256_and_ranges_work(lab: Lab, page: Page) -> None:
    open_app(lab, page)
    got = app_frame(page).evaluate(
        """async () => {
            const started = performance.now();
            const response = await fetch('big');
            const bytes = await response.arrayBuffer();
            const seconds = (performance.now() - started) / 1000;
            const digest = await crypto.subtle.digest('SHA-256', bytes);
            const hex = Array.from(new Uint8Array(digest), b => b.toString(16).padStart(2, '0'))
                .join('');
            return {status: response.status, length: bytes.byteLength, sha256: hex, seconds};
        }"""
    )
    assert got["status"] == 200
    assert got["length"] == len(lab.app.big)
    assert got["sha256"] == lab.app.big_sha256
    ranged = app_frame(page).evaluate(
        """async () => {
            const r = await fetch('big', {headers: {range: 'bytes=1000-1999'}});
            const bytes = new Uint8Array(await r.arrayBuffer());
            return [r.status, r.headers.get('content-range'), Array.from(bytes)];
        }"""
    )
    assert ranged == [206, f"bytes 1000-1999/{len(lab.app.big)}", list(lab.app.big[1000:2000])]
    mib = got["length"] / (1 << 20)
    print(
        f"\nbrowser download: {mib:.0f} MiB in {got['seconds']:.2f} s = "
        f"{mib / got['seconds']:.1f} MiB/s"
    )


def test_server_sent_events_arrive_one_by_one(lab: Lab, page: Page) -> None:
    open_app(lab, page)
    # The server writes each event only after the page acknowledged the one
    # before: if the tunnel held the stream back, nothing would arrive at all.
    events = app_frame(page).evaluate(
        """(count) => new Promise((resolve, reject) => {
            const got = [];
            const source = new EventSource('events');
            source.onmessage = async (event) => {
                got.push(event.data);
                await fetch('ack');
                if (got.length === count) { source.close(); resolve(got); }
            };
            source.onerror = () => {
                if (got.length < count) {
                    source.close();
                    reject(new Error('stream failed after ' + got.length));
                }
            };
        })""",
        SSE_EVENTS,
    )
    assert events == [f"event {n}" for n in range(1, SSE_EVENTS + 1)]


def test_a_wrong_token_shows_a_clear_message(lab: Lab, page: Page) -> None:
    forged = issue_token(secrets.token_hex(32), sub="alice", role="client", devices=("dev1",))
    sign_in(lab, page, forged)
    message = page.locator("#message.error")
    message.wait_for()
    assert message.inner_text() == (
        "Sign-in failed: the token was refused (invalid token: signature verification failed)."
    )
    assert page.locator("#signin").is_visible()
    assert page.evaluate("sessionStorage.length") == 0
    assert_not_logged(lab, forged)
    # The form: a typed token signs in.
    page.fill("#token", lab.token())
    page.click("#signin button")
    page.wait_for_selector('tr[data-device="dev1"]')
    assert page.locator("#message").inner_text() == ""


def test_a_dropped_session_shows_reconnecting_and_recovers(lab: Lab, page: Page) -> None:
    open_app(lab, page)
    running = [s for s in lab.sessions() if s["state"] == "running" and s["client"] == "alice"]
    assert running, "no running session of alice"
    pid = running[-1]["worker_pid"]
    assert isinstance(pid, int)
    # Every state the page shows from now on, however briefly.
    page.evaluate(
        """() => {
            const state = document.getElementById('state');
            window.shown = [];
            new MutationObserver(() => window.shown.push(state.dataset.state))
                .observe(state, {attributes: true, attributeFilter: ['data-state']});
        }"""
    )
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    page.wait_for_function("() => window.shown.includes('reconnecting')")
    page.wait_for_function("() => window.shown.at(-1) === 'direct'")
    print(f"\nworker killed; the page was back at 'direct' {time.monotonic() - killed:.2f} s later")
    shown = page.evaluate("window.shown")
    assert shown[0] == "reconnecting" and shown[-1] == "direct", shown
    # The same frame, still loaded, reaches the device through the new session.
    data = app_frame(page).evaluate("async () => (await fetch('data.json')).json()")
    assert data == {"items": ["alpha", "beta", "gamma"]}


def test_an_app_cannot_read_another_apps_responses_through_the_worker(lab: Lab, page: Page) -> None:
    open_app(lab, page)
    frame = app_frame(page)
    # Another app's URL, asked by this app's page: refused by the Service Worker.
    other = frame.evaluate(
        """async () => {
            const r = await fetch('/d/dev2/web/data.json');
            return [r.status, await r.text()];
        }"""
    )
    assert other == [403, "Refused: one device's app cannot read another's.\n"]
    # A frame of this app navigated to another app: refused too.
    framed = frame.evaluate(
        """() => new Promise((resolve) => {
            const inner = document.createElement('iframe');
            inner.onload = () => resolve(inner.contentDocument.body.innerText);
            inner.src = '/d/dev2/web/';
            document.body.append(inner);
        })"""
    )
    assert framed.strip() == "Refused: this page may only be opened from its own app."
    # Its own URLs, root-relative or under its prefix, still work.
    own = frame.evaluate(
        """async () => [
            (await fetch('/data.json')).status,
            (await fetch('/d/dev1/web/data.json')).status,
        ]"""
    )
    assert own == [200, 200]


def test_the_apps_websockets_go_through_the_tunnel(lab: Lab, page: Page) -> None:
    sign_in(lab, page)
    page.click('tr[data-device="dev1"] a:text-is("open chat")')
    page.wait_for_selector('#state[data-state="direct"]')
    page.frame_locator("#app").locator("#chat").wait_for()
    got = app_frame(page).evaluate(
        """() => new Promise((resolve, reject) => {
            const big = new Uint8Array(3 * 1024 * 1024).map((_, i) => (i * 7) & 255);
            const ws = new WebSocket('echo', ['echo.v1']);
            ws.binaryType = 'arraybuffer';
            const got = {shim: ws.constructor.name, protocol: null, messages: []};
            ws.onopen = () => {
                got.protocol = ws.protocol;
                ws.send('hello ✓');
                ws.send(big);
                ws.send('bye');
            };
            ws.onmessage = (event) => {
                if (typeof event.data === 'string') return got.messages.push(event.data);
                const bytes = new Uint8Array(event.data);
                const same = bytes.length === big.length && bytes.every((b, i) => b === big[i]);
                got.messages.push(same);
            };
            ws.onerror = () => reject(new Error('websocket error'));
            ws.onclose = (event) => resolve({...got, code: event.code, reason: event.reason,
                                             clean: event.wasClean});
        })"""
    )
    assert got == {
        "shim": "TunnelWebSocket",
        "protocol": "echo.v1",
        "messages": ["hello ✓", True],
        "code": 4000,
        "reason": "server says bye",
        "clean": True,
    }


def hexes(*vectors: str) -> list[str]:
    return ["".join(vector.split()) for vector in vectors]


def test_the_pages_tunnel_frames_match_the_protocol_test_vectors(lab: Lab, page: Page) -> None:
    """web/tunnel.js against PROTOCOL.md §2.7 and §2.8.1, in the browser itself."""
    page.goto(f"{lab.http_url}/")
    got = page.evaluate(
        """async (answer) => {
            const t = await import('/static/tunnel.js');
            const hex = (bytes) => Array.from(bytes, b => b.toString(16).padStart(2, '0')).join('');
            const bytes = (h) => new Uint8Array(h.match(/../g).map(x => parseInt(x, 16)));
            const text = new TextEncoder();
            const head = {method: 'GET', target: '/', headers: [['accept', '*/*']]};
            const window = new Uint8Array([0, 2, 0, 0]);
            const encoded = [
                t.frame(t.Type.OPEN_HTTP, 1, t.openHttpPayload('web', head)),
                t.frame(t.Type.FIN, 1),
                t.frame(t.Type.RESET, 3, t.resetPayload(t.Reset.BAD_HEAD, 'bad target')),
                t.frame(t.Type.DATA, 1, text.encode('hi')),
                t.frame(t.Type.RESET, 5, t.resetPayload(t.Reset.CONNECT_FAILED, 'refused')),
                t.frame(t.Type.WINDOW, 1, window),
            ].map(hex);
            const parsed = t.parseMessage(bytes(answer).buffer).map(
                f => [f.type, f.streamId, new TextDecoder().decode(f.payload)]);
            const rejected = [
                '0200000500000001' + '6869', '0201000200000001' + '6869', '0900000000000001',
                '0200000200000000' + '6869', '0200', '0600000000000001', '060000010000000100',
                '06000002000000010577', '0700000000000001', '0300000100000001' + '00',
            ].map((h) => {
                try {
                    t.parseMessage(bytes(h).buffer);
                    return null;
                } catch (error) {
                    return error.message;
                }
            });
            // A whole exchange through a Tunnel on a stand-in channel.
            const channel = new EventTarget();
            channel.sent = [];
            channel.send = (message) => channel.sent.push(hex(message));
            channel.bufferedAmount = 0;
            const tunnel = new t.Tunnel(channel);
            const stream = tunnel.request('web', head, null);
            const events = [];
            stream.onHead = (h) => events.push(['head', h.status, h.reason, h.headers]);
            stream.onData = (d) => events.push(['data', new TextDecoder().decode(d)]);
            stream.onEnd = () => events.push(['end']);
            channel.dispatchEvent(new MessageEvent('message', {data: bytes(answer).buffer}));
            return {encoded, parsed, rejected, sent: channel.sent, events};
        }""",
        "".join(
            hexes(
                "07 00 003f 00000001",
                "7b22737461747573223a3230302c22726561736f6e223a224f4b222c2268656164657273",
                "223a5b5b22636f6e74656e742d6c656e677468222c2232225d5d7d",
                "02 00 0002 00000001 6869",
                "03 00 0000 00000001",
            )
        ),
    )
    open_http = hexes(
        """06 00 003e 00000001 03 776562
        7b226d6574686f64223a22474554222c22746172676574223a222f222c2268656164657273
        223a5b5b22616363657074222c222a2f2a225d5d7d"""
    )[0]
    assert got["encoded"] == [
        open_http,
        "0300000000000001",
        *hexes("04 00 000c 00000003 0008 62616420746172676574"),
        *hexes("02 00 0002 00000001 6869"),
        *hexes("04 00 0009 00000005 0002 72656675736564"),
        *hexes("05 00 0004 00000001 00020000"),
    ]
    response_head = '{"status":200,"reason":"OK","headers":[["content-length","2"]]}'
    assert got["parsed"] == [[7, 1, response_head], [2, 1, "hi"], [3, 1, ""]]
    assert None not in got["rejected"], got["rejected"]
    # OPEN_HTTP, the extra credit the page grants at once, FIN: one message.
    assert got["sent"] == [open_http + "0500000400000001" + "00400000" + "0300000000000001"]
    assert got["events"] == [
        ["head", 200, "OK", [["content-length", "2"]]],
        ["data", "hi"],
        ["end"],
    ]


def test_the_apps_cookies_are_kept_by_the_shell(lab: Lab, page: Page) -> None:
    open_app(lab, page)
    got = app_frame(page).evaluate(
        """async () => {
            const text = async (url, init) => (await fetch(url, init)).text();
            const login = await text('login', {method: 'POST'});  // 303 + Set-Cookie
            const scoped = await text('lib/whoami');  // Path=/lib cookies too, first
            const after = await text('whoami');
            const visible = document.cookie;
            await fetch('logout');
            return {login, scoped, after, visible, out: await text('whoami')};
        }"""
    )
    assert got == {
        "login": "session=s3cr3t",
        "scoped": "theme=dark; session=s3cr3t",
        "after": "session=s3cr3t",
        "visible": "",
        "out": "",
    }


def test_a_root_relative_link_is_redirected_back_into_the_app(lab: Lab, page: Page) -> None:
    frame = open_app(lab, page)
    # <a href="/about?from=index">: the navigation leaves the worker's /d/ scope,
    # the signaling server sends it back under the app's prefix (307, by Referer).
    frame.locator("#about").click()
    assert frame.locator("#about-page").inner_text() == "from=index"
    assert app_frame(page).url == f"{lab.http_url}/d/dev1/web/about?from=index"


def test_compressed_and_unframable_answers_still_work(lab: Lab, page: Page) -> None:
    frame = open_app(lab, page)
    data = app_frame(page).evaluate("async () => (await fetch('gz')).json()")
    assert data == {"items": ["alpha", "beta", "gamma"]}
    # X-Frame-Options: DENY and frame-ancestors 'none' would blank the app's
    # frame; they become "this origin only".
    for kind in ("xfo", "csp"):
        app_frame(page).evaluate(f"location.href = 'no-framing-{kind}'")
        shown = frame.locator(f"#unframed:text('/no-framing-{kind} shown anyway')")
        shown.wait_for()
