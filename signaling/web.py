"""The browser client's files, served over plain HTTP/1.1 (RFC 9110/9112) by the signaling server.

The signaling server answers every request that is not the ``/signal``
WebSocket handshake with :func:`respond`, from websockets' ``process_request``
hook: the same port serves the page and the signaling it speaks.

What is served is a fixed table (:data:`FILES`), read once from the ``web/``
folder: no path of a request ever becomes a path on disk, so there is nothing
to traverse. Three kinds of paths are answered:

* the files of the table (``/``, ``/sw.js``, ``/static/...``);
* ``/d/DEVICE/SERVICE/...``: the shell page (``shell.html``) whatever follows
  the prefix, so that opening or reloading any URL of a device's app loads the
  page that holds its tunnel; the app itself never reaches the server (the
  Service Worker carries its requests through the tunnel);
* any other GET whose ``Referer`` is a page of this origin under
  ``/d/DEVICE/SERVICE/``: a navigation that a root-relative link of an app
  made (``<a href="/about">``) escapes the Service Worker's ``/d/`` scope, so
  it is redirected (307) back under the app's prefix. Everything else is 404.

Every response carries a strict Content-Security-Policy (scripts and styles
from this origin only, no inline script, no ``eval``, not framed by another
origin), ``nosniff``, its exact content type and ``Cache-Control: no-cache``.
Nothing of a request is logged: a URL may carry what a user pasted into it.

Contract: ``respond(request, web_root=None)`` returns the websockets
``Response`` for any request (HEAD answered like GET without its body; other
methods 405). :func:`load` reads the files, raising ``ServerConfigError`` when
one is missing.
"""

from __future__ import annotations

import functools
import http
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from signaling.errors import ServerConfigError

__all__ = ["CSP", "FILES", "SHELL_PATH", "load", "respond"]

#: URL path → (file under web/, content type).
FILES: Final[dict[str, tuple[str, str]]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/sw.js": ("sw.js", "text/javascript; charset=utf-8"),
    "/static/cookies.js": ("cookies.js", "text/javascript; charset=utf-8"),
    "/static/index.js": ("index.js", "text/javascript; charset=utf-8"),
    "/static/shell.js": ("shell.js", "text/javascript; charset=utf-8"),
    "/static/signal.js": ("signal.js", "text/javascript; charset=utf-8"),
    "/static/tunnel.js": ("tunnel.js", "text/javascript; charset=utf-8"),
    "/static/ws-shim.js": ("ws-shim.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
SHELL_FILE: Final = ("shell.html", "text/html; charset=utf-8")
#: ``/d/DEVICE/SERVICE/`` then anything: ids as PROTOCOL.md's table has them.
SHELL_PATH: Final = re.compile(
    r"^/d/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/([A-Za-z0-9][A-Za-z0-9._-]{0,63})(/.*)?$"
)
#: Our pages run our scripts only. ``connect-src 'self'`` covers the
#: WebSocket to /signal (CSP Level 3 lets 'self' match ws: on the same host);
#: ``frame-src 'self'`` is the app's frame; ``worker-src 'self'`` the Service Worker.
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; frame-src 'self'; worker-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
_COMMON_HEADERS: Final = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-cache"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
)


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str


def default_root() -> Path:
    """``web/`` of a checkout, or the copy installed inside the package."""
    installed = Path(__file__).resolve().parent / "_web"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "web"


@functools.cache
def load(web_root: Path | None = None) -> dict[str, _File]:
    """Every servable file, keyed by URL path (the shell under ``"/d/"``)."""
    root = web_root or default_root()
    table = {**FILES, "/d/": SHELL_FILE}
    files = {}
    for url_path, (name, content_type) in table.items():
        try:
            files[url_path] = _File((root / name).read_bytes(), content_type)
        except OSError as exc:
            raise ServerConfigError(f"browser client file missing: {root / name}: {exc}") from None
    return files


def respond(request: Request, web_root: Path | None = None) -> Response:
    """The HTTP response to a request that is not the /signal handshake."""
    if request.method not in ("GET", "HEAD"):
        return _text(http.HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed\n", allow="GET, HEAD")
    files = load(web_root)
    path = urlsplit(request.path).path
    if path in FILES:
        found = files[path]
    elif SHELL_PATH.match(path):
        found = files["/d/"]
    else:
        target = _app_prefix(request)
        if target is None:
            return _text(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        # Not a path of ours, asked from a page of a device's app: a
        # root-relative navigation, sent back under the app's prefix.
        location = target + quote(request.path.lstrip("/"), safe="/?&=%:@!$'()*+,;~.-_")
        return _text(http.HTTPStatus.TEMPORARY_REDIRECT, "", location=location)
    body = b"" if request.method == "HEAD" else found.body
    headers = Headers(_COMMON_HEADERS)
    headers["Content-Type"] = found.content_type
    headers["Content-Length"] = str(len(found.body))
    return Response(200, "OK", headers, body)


def _app_prefix(request: Request) -> str | None:
    """``/d/DEVICE/SERVICE/`` of the same-origin page that linked here, if any."""
    referer = request.headers.get("Referer")
    host = request.headers.get("Host")
    if referer is None or host is None:
        return None
    parts = urlsplit(referer)
    if parts.netloc != host or parts.scheme not in ("http", "https"):
        return None
    match = SHELL_PATH.match(parts.path)
    if match is None:
        return None
    return f"/d/{match.group(1)}/{match.group(2)}/"


def _text(status: http.HTTPStatus, text: str, **extra: str) -> Response:
    body = text.encode()
    headers = Headers(_COMMON_HEADERS)
    headers["Content-Type"] = "text/plain; charset=utf-8"
    headers["Content-Length"] = str(len(body))
    for name, value in extra.items():
        headers[name.capitalize()] = value
    return Response(status.value, status.phrase, headers, body)
