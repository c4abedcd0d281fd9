// The Service Worker of /d/: every request of a device's app (its frame in
// the shell page, and everything that frame loads) goes through the tunnel
// that the app's shell page holds, as an HTTP stream (PROTOCOL.md §2.8).
//
// Requests travel to the shell over a MessageChannel: {type: "fetch", method,
// target, headers, body}; the shell answers "head", then "data" chunks, then
// "end" (or "error"); this worker returns credit ("ack") as the page reads
// the body, so the device never sends faster than the page consumes.
//
// Isolation: a request is routed only within the app (/d/DEVICE/SERVICE/)
// of the frame that made it; a frame navigation must come from a page of the
// same app (its Referer), so one app cannot read another's responses here.
"use strict";

const APP = /^\/d\/([A-Za-z0-9][A-Za-z0-9._-]{0,63})\/([A-Za-z0-9][A-Za-z0-9._-]{0,63})(\/.*)?$/;
const NULL_BODY = new Set([101, 204, 205, 304]);
const REDIRECT = new Set([301, 302, 303, 307, 308]);
const WINDOW = 1 << 20; // bytes read ahead of the page before credit waits
// The WebSocket shim, loaded first by every page of an app (see inject()).
const SHIM = "/.tunnelctl/ws-shim.js";
const SHIM_TAG = new TextEncoder().encode(`<script src="${SHIM}"></script>`);

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("fetch", (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin) return;
  // A top-level page under /d/ is the shell itself, served by the server.
  if (request.mode === "navigate" && request.destination === "document") return;
  event.respondWith(route(event, request, url));
});

function text(status, message) {
  return new Response(message + "\n", { status, headers: { "content-type": "text/plain; charset=utf-8" } });
}

function appOf(pathname) {
  const match = APP.exec(pathname);
  return match && { device: match[1], service: match[2], prefix: `/d/${match[1]}/${match[2]}/`, rest: match[3] || "/" };
}

async function route(event, request, url) {
  if (url.pathname === SHIM) return fetch("/static/ws-shim.js");
  let app;
  let target;
  if (request.mode === "navigate") {
    app = appOf(url.pathname);
    const from = request.referrer ? new URL(request.referrer) : null;
    const source = from && from.origin === self.location.origin ? appOf(from.pathname) : null;
    if (!app || !source || source.prefix !== app.prefix) {
      return text(403, "Refused: this page may only be opened from its own app.");
    }
    target = app.rest + url.search;
  } else {
    const client = event.clientId ? await self.clients.get(event.clientId) : null;
    if (!client || client.frameType === "top-level") return fetch(request); // the shell's own files
    app = appOf(new URL(client.url).pathname);
    if (!app) return text(403, "Refused: not a request of a device's app.");
    if (url.pathname.startsWith(app.prefix) || url.pathname === app.prefix.slice(0, -1)) {
      target = "/" + url.pathname.slice(app.prefix.length) + url.search;
    } else if (url.pathname.startsWith("/d/")) {
      return text(403, "Refused: one device's app cannot read another's.");
    } else {
      target = url.pathname + url.search; // root-relative: the app's own root
    }
  }
  const shell = await shellOf(app);
  if (!shell) return text(503, `No tunnel to ${app.device} is open: open ${app.prefix} again.`);
  const headers = [...request.headers];
  let body = null;
  if (request.method !== "GET" && request.method !== "HEAD") {
    body = await request.arrayBuffer();
    headers.push(["content-length", String(body.byteLength)]);
  }
  const channel = new MessageChannel();
  const message = { type: "fetch", method: request.method, target, headers, body };
  shell.postMessage(message, body ? [channel.port1, body] : [channel.port1]);
  return response(channel.port2, request, app);
}

async function shellOf(app) {
  const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
  return windows.find((client) => {
    const shell = client.frameType === "top-level" && appOf(new URL(client.url).pathname);
    return shell && shell.prefix === app.prefix;
  });
}

function response(port, request, app) {
  return new Promise((resolve) => {
    let controller;
    let unacknowledged = 0;
    let answered = false;
    const body = new ReadableStream(
      {
        start(c) {
          controller = c;
        },
        pull() {
          if (unacknowledged) port.postMessage({ type: "ack", n: unacknowledged });
          unacknowledged = 0;
        },
        cancel() {
          port.postMessage({ type: "cancel" });
          port.close();
        },
      },
      new ByteLengthQueuingStrategy({ highWaterMark: WINDOW }),
    );
    port.onmessage = (event) => {
      const msg = event.data;
      if (msg.type === "head") {
        answered = true;
        resolve(build(msg, body, request, app));
      } else if (msg.type === "data") {
        const bytes = new Uint8Array(msg.bytes);
        unacknowledged += bytes.length;
        controller.enqueue(bytes);
      } else if (msg.type === "end") {
        controller.close();
        port.close();
      } else if (msg.type === "error") {
        port.close();
        if (answered) controller.error(new Error(msg.reason));
        else resolve(text(502, `The tunnel could not carry this request: ${msg.reason}`));
      }
    };
  });
}

function build(head, body, request, app) {
  const headers = new Headers();
  let location = null;
  let encoding = null;
  for (const [name, rawValue] of head.headers) {
    let value = rawValue;
    // A worker's response reaches the page as it is: no decoding after us.
    if (name === "content-encoding") {
      encoding = value.trim().toLowerCase();
      continue;
    }
    if (name === "set-cookie") continue; // kept by the shell (web/cookies.js)
    if (name === "location") location = value;
    // The app runs framed by its shell, on our origin: "no framing at all"
    // becomes "only by this origin", which still keeps other sites out.
    if (request.mode === "navigate" && name === "x-frame-options" && /deny/i.test(value)) value = "SAMEORIGIN";
    if (request.mode === "navigate" && name === "content-security-policy") {
      value = value.replace(/frame-ancestors\s+'none'/gi, "frame-ancestors 'self'");
    }
    try {
      headers.append(name, value);
    } catch {
      // a value the Fetch API refuses: left out
    }
  }
  if (encoding === "gzip" || encoding === "deflate") {
    body = body.pipeThrough(new DecompressionStream(encoding));
    headers.delete("content-length");
  } else if (encoding && encoding !== "identity") {
    body.cancel();
    return text(502, `The device's service answered in ${encoding}, which this client cannot decode.`);
  }
  if (REDIRECT.has(head.status) && location !== null) {
    body.cancel();
    return Response.redirect(rewrite(location, request.url, app), head.status);
  }
  const init = { status: head.status, headers };
  if (/^[\t\x20-\x7e\x80-\xff]*$/.test(head.reason)) init.statusText = head.reason;
  if (NULL_BODY.has(head.status) || request.method === "HEAD") {
    body.cancel();
    return new Response(null, init);
  }
  if (request.mode === "navigate" && /^text\/html\b/i.test(headers.get("content-type") || "")) {
    headers.delete("content-length");
    return new Response(body.pipeThrough(inject()), init);
  }
  return new Response(body, init);
}

// The shim's script tag, after the doctype if the page starts with one (a
// tag before it would put the page in quirks mode), else first.
function inject() {
  let done = false;
  return new TransformStream({
    transform(chunk, controller) {
      if (!done) {
        done = true;
        const start = String.fromCharCode(...chunk.subarray(0, 1024));
        const doctype = /^(?:\xef\xbb\xbf)?\s*<!doctype[^>]*>/i.exec(start);
        const at = doctype ? doctype[0].length : 0;
        controller.enqueue(chunk.subarray(0, at));
        controller.enqueue(SHIM_TAG);
        chunk = chunk.subarray(at);
      }
      if (chunk.length) controller.enqueue(chunk);
    },
  });
}

// A redirect to a root-relative place of the app goes under the app's prefix.
function rewrite(location, base, app) {
  const url = new URL(location, base);
  if (url.origin === self.location.origin && !url.pathname.startsWith(app.prefix)) {
    url.pathname = app.prefix + url.pathname.slice(1);
  }
  return url.href;
}
