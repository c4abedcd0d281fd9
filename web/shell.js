// The shell of /d/DEVICE/SERVICE/...: it holds the peer session with the
// device (PROTOCOL.md §1: the device offers, this page answers), carries the
// Service Worker's requests on the tunnel (§2.8), shows the connection state
// (connecting, direct, relayed, reconnecting) and re-establishes a session
// that drops. The device's app runs in the frame below, under the same path.
import { CookieJar } from "./cookies.js";
import { Signal, SignInError, TOKEN_KEY } from "./signal.js";
import { Tunnel } from "./tunnel.js";

const $ = (id) => document.getElementById(id);
const APP = /^\/d\/([A-Za-z0-9][A-Za-z0-9._-]{0,63})\/([A-Za-z0-9][A-Za-z0-9._-]{0,63})(\/.*)?$/;
const ATTEMPT_TIMEOUT = 10000;
const MAX_BACKOFF = 10000;
const SILENCE = 5000;
const FATAL = new Set(["forbidden", "not_authenticated"]);

const match = APP.exec(location.pathname);
const device = match[1];
const service = match[2];
const prefix = `/d/${device}/${service}/`;

let token = null;
let link = null;
let tunnel = null;
let session = null;
let waiters = [];
let failures = 0;
let started = 0;
let workerReady = false;
const jar = new CookieJar();

// The request's fields, with the app's cookies (a Service Worker cannot add them).
function withCookies(target, headers) {
  const cookie = jar.header(target);
  const rest = headers.filter(([name]) => name !== "cookie");
  return cookie ? [...rest, ["cookie", cookie]] : rest;
}

function setState(state, message = "") {
  $("state").textContent = state;
  $("state").dataset.state = state;
  $("shell-message").textContent = message;
  $("shell-message").className = state === "failed" ? "error" : "";
}

function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "b-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// --- the session -------------------------------------------------------------

async function signalLink() {
  if (link && link.open) return link;
  link = await Signal.open(token);
  link.onMessage = (msg) => session && session.receive(msg);
  link.onClose = () => {
    link = null;
    // An open tunnel does not need signaling; a negotiation does.
    if (session && !session.open) session.fail("the signaling link closed");
  };
  return link;
}

class Session {
  constructor(signal) {
    this.id = newSessionId();
    this.signal = signal;
    this.open = false;
    this.ended = false;
    this.steps = Promise.resolve();
    const servers = (signal.iceServers || []).map(({ urls, username, credential }) => ({ urls, username, credential }));
    this.pc = new RTCPeerConnection({ iceServers: servers });
    this.pc.addEventListener("icecandidate", (event) => {
      const c = event.candidate;
      const candidate = c && c.candidate ? { candidate: c.candidate, sdpMid: c.sdpMid, sdpMLineIndex: c.sdpMLineIndex } : null;
      this.send({ type: "candidate", candidate });
    });
    this.pc.addEventListener("connectionstatechange", () => {
      const state = this.pc.connectionState;
      clearTimeout(this.silence);
      if (state === "failed") this.fail("the peer connection failed");
      // Consent checks unanswered for a while (RFC 7675): give the path a
      // few seconds to come back before the session is made again.
      if (state === "disconnected") this.silence = setTimeout(() => this.fail("the path went silent"), SILENCE);
    });
    this.pc.addEventListener("datachannel", (event) => this.channel(event.channel));
    this.timer = setTimeout(() => this.fail("the session did not open in time"), ATTEMPT_TIMEOUT);
    this.send({ type: "session_request", device });
  }

  send(msg) {
    if (!this.ended) this.signal.send({ ...msg, session: this.id });
  }

  receive(msg) {
    if (msg.session !== this.id) return;
    // Apply signaling in order: a candidate must not overtake its offer.
    this.steps = this.steps.then(() => this.apply(msg)).catch((error) => this.fail(String(error)));
  }

  async apply(msg) {
    if (this.ended) return;
    if (msg.type === "offer") {
      await this.pc.setRemoteDescription({ type: "offer", sdp: msg.sdp });
      await this.pc.setLocalDescription();
      this.send({ type: "answer", sdp: this.pc.localDescription.sdp });
    } else if (msg.type === "candidate") {
      await this.pc.addIceCandidate(msg.candidate || undefined);
    } else if (msg.type === "session_end") {
      this.fail(`the device ended the session (${msg.reason})`, "ended");
    } else if (msg.type === "peer_left") {
      if (!this.open) this.fail("the device left");
    } else if (msg.type === "error") {
      this.fail(msg.message, msg.code);
    }
  }

  channel(channel) {
    if (channel.protocol !== "tunnelctl/1") {
      channel.close();
      return this.fail(`the device speaks ${channel.protocol || "no protocol"}, not tunnelctl/1`);
    }
    const opened = async () => {
      clearTimeout(this.timer);
      this.open = true;
      this.tunnel = new Tunnel(channel);
      this.tunnel.onClose = (reason) => this.fail(reason);
      connected(this, await pathOf(this.pc));
    };
    if (channel.readyState === "open") opened();
    else channel.addEventListener("open", opened);
  }

  fail(reason, code = "") {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.timer);
    clearTimeout(this.silence);
    // Our own decision: tell the device, so that it frees the session at once.
    if (code === "") this.signal.send({ type: "session_end", session: this.id, reason: reason.slice(0, 200) });
    this.pc.close();
    if (this.tunnel) this.tunnel.close(reason);
    lost(this, reason, code);
  }
}

// "direct" or "relayed", from the nominated candidate pair.
async function pathOf(pc) {
  const stats = await pc.getStats();
  for (const report of stats.values()) {
    if (report.type !== "transport" || !report.selectedCandidatePairId) continue;
    const pair = stats.get(report.selectedCandidatePairId);
    const local = pair && stats.get(pair.localCandidateId);
    const remote = pair && stats.get(pair.remoteCandidateId);
    if (local && remote) return local.candidateType === "relay" || remote.candidateType === "relay" ? "relayed" : "direct";
  }
  return "direct";
}

function connected(current, path) {
  if (current !== session) return;
  failures = 0;
  tunnel = current.tunnel;
  $("state").dataset.openMs = String(Math.round(performance.now() - started));
  setState(path);
  for (const resolve of waiters.splice(0)) resolve(tunnel);
  showApp();
}

// The app's frame loads once both the tunnel and the Service Worker are up.
function showApp() {
  const frame = $("app");
  if (frame.hidden && tunnel && workerReady) {
    frame.hidden = false;
    frame.src = location.pathname + location.search + location.hash;
  }
}

function lost(current, reason, code) {
  if (current !== session) return;
  session = null;
  tunnel = null;
  if (FATAL.has(code)) {
    setState("failed", `Cannot open ${device}: ${reason}. Sign in again from the device list.`);
    return;
  }
  failures += 1;
  const delay = failures === 1 ? 0 : Math.min(MAX_BACKOFF, 250 * 2 ** failures) * (0.5 + Math.random() / 2);
  setState("reconnecting", `${reason}; reconnecting…`);
  setTimeout(attempt, delay);
}

async function attempt() {
  started = performance.now();
  try {
    session = new Session(await signalLink());
  } catch (error) {
    if (error instanceof SignInError && /refused/.test(error.message)) {
      setState("failed", `Sign-in failed: ${error.message}. Sign in again from the device list.`);
      return;
    }
    session = { failed: true };
    lost(session, error.message || String(error), "");
  }
}

// --- requests of the Service Worker ----------------------------------------------

function tunnelReady(timeout) {
  if (tunnel) return Promise.resolve(tunnel);
  return new Promise((resolve, reject) => {
    waiters.push(resolve);
    setTimeout(() => reject(new Error("the tunnel is not open")), timeout);
  });
}

async function carry(msg, port) {
  let stream;
  try {
    const open = await tunnelReady(15000);
    const head = { method: msg.method, target: msg.target, headers: withCookies(msg.target, msg.headers) };
    stream = open.request(service, head, msg.body ? new Uint8Array(msg.body) : null);
  } catch (error) {
    port.postMessage({ type: "error", reason: error.message });
    return;
  }
  stream.onHead = (head) => {
    jar.store(msg.target, head.headers);
    port.postMessage({ type: "head", status: head.status, reason: head.reason, headers: head.headers });
  };
  stream.onData = (bytes) => port.postMessage({ type: "data", bytes: bytes.buffer }, [bytes.buffer]);
  stream.onEnd = () => port.postMessage({ type: "end" });
  stream.onError = (reason) => port.postMessage({ type: "error", reason });
  port.onmessage = (event) => {
    if (event.data.type === "ack") stream.consumed(event.data.n);
    else if (event.data.type === "cancel") stream.cancel();
  };
}

// --- WebSockets of the app (web/ws-shim.js asks for them) ----------------------

const WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

function base64(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes)));
}

function fromApp(event) {
  if (event.origin !== location.origin || !event.source || event.source === window) return false;
  try {
    return event.source.location.pathname.startsWith(prefix); // a page of this app only
  } catch {
    return false;
  }
}

async function openWebSocket(msg, port) {
  const key = base64(crypto.getRandomValues(new Uint8Array(16)));
  // RFC 6455 §4.2.2: the server proves it read our key.
  const accept = base64(await crypto.subtle.digest("SHA-1", new TextEncoder().encode(key + WEBSOCKET_GUID)));
  const headers = [
    ["connection", "upgrade"],
    ["upgrade", "websocket"],
    ["sec-websocket-version", "13"],
    ["sec-websocket-key", key],
    ["origin", location.origin],
  ];
  if (msg.protocols.length) headers.push(["sec-websocket-protocol", msg.protocols.join(", ")]);
  let stream;
  try {
    const open = await tunnelReady(15000);
    const head = { method: "GET", target: msg.target, headers: withCookies(msg.target, headers) };
    stream = open.request(service, head, null, { upgrade: true });
  } catch (error) {
    port.postMessage({ type: "fail", reason: error.message });
    return;
  }
  const field = (head, name) => (head.headers.find(([n]) => n === name) || [null, null])[1];
  stream.onHead = (head) => {
    if (head.status !== 101 || field(head, "sec-websocket-accept") !== accept) {
      stream.cancel("not a WebSocket handshake");
      port.postMessage({ type: "fail", reason: `handshake refused (HTTP ${head.status})` });
      return;
    }
    port.postMessage({ type: "open", protocol: field(head, "sec-websocket-protocol") || "" });
  };
  stream.onData = (bytes) => {
    port.postMessage({ type: "data", bytes: bytes.buffer }, [bytes.buffer]);
    stream.consumed(bytes.length);
  };
  stream.onEnd = () => port.postMessage({ type: "end" });
  stream.onError = (reason) => port.postMessage({ type: "fail", reason });
  port.onmessage = (event) => {
    const { type, bytes } = event.data;
    if (type === "write") stream.write(new Uint8Array(bytes));
    else if (type === "finish") stream.finish();
    else if (type === "abort") stream.cancel();
  };
}

// --- start -----------------------------------------------------------------------

async function main() {
  $("where").textContent = `${device} / ${service}`;
  document.title = `${device}/${service} · tunnelctl`;
  if (window.top !== window || window.opener) {
    // Framed or opened by another page (an app, perhaps): do not use the token for it.
    setState("failed", "Open this app from the device list.");
    return;
  }
  token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    setState("failed", "Not signed in: sign in from the device list first.");
    return;
  }
  // The app's frame shares this origin: keep the token out of its reach while
  // the shell runs, and put it back for the next page of this tab.
  sessionStorage.removeItem(TOKEN_KEY);
  addEventListener("pagehide", () => sessionStorage.setItem(TOKEN_KEY, token));
  addEventListener("pageshow", () => sessionStorage.removeItem(TOKEN_KEY));

  navigator.serviceWorker.addEventListener("message", (event) => {
    if (event.data && event.data.type === "fetch" && event.ports[0]) carry(event.data, event.ports[0]);
  });
  navigator.serviceWorker.startMessages();
  addEventListener("message", (event) => {
    if (event.data && event.data.type === "tunnelctl-websocket" && event.ports[0] && fromApp(event)) {
      openWebSocket(event.data, event.ports[0]);
    }
  });
  setState("connecting");
  attempt();
  await navigator.serviceWorker.register("/sw.js", { scope: "/d/" });
  await navigator.serviceWorker.ready;
  workerReady = true;
  showApp();
}

main();
