// A WebSocket (RFC 6455 client) for a device's app, carried by the tunnel.
//
// A Service Worker cannot see WebSockets, so the worker loads this classic
// script first in every page of a device's app; it replaces window.WebSocket
// for URLs of this origin. A socket asks the shell (the top window, which
// holds the tunnel) over a MessageChannel to open an Upgrade HTTP stream
// (PROTOCOL.md §2.8); the shell checks the handshake and then carries raw
// bytes ("data" in, "write" out, "end"/"finish" for the stream's FIN). The
// WebSocket framing, masking, fragmentation, ping and close are done here.
// URLs of other hosts get the browser's own WebSocket.
"use strict";
(() => {
  const Native = window.WebSocket;
  const app = /^\/d\/[A-Za-z0-9][A-Za-z0-9._-]{0,63}\/[A-Za-z0-9][A-Za-z0-9._-]{0,63}\//.exec(location.pathname);
  if (!app || !Native) return;
  const prefix = app[0];
  const encoder = new TextEncoder();
  const State = { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 };

  function concat(a, b) {
    const out = new Uint8Array(a.length + b.length);
    out.set(a);
    out.set(b, a.length);
    return out;
  }

  class TunnelWebSocket extends EventTarget {
    constructor(url, protocols = []) {
      super();
      const parsed = new URL(url, location.href);
      if (parsed.protocol === "http:") parsed.protocol = "ws:";
      if (parsed.protocol === "https:") parsed.protocol = "wss:";
      if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
        throw new DOMException(`The URL's scheme must be ws or wss: ${url}`, "SyntaxError");
      }
      if (parsed.hash) throw new DOMException("The URL contains a fragment", "SyntaxError");
      if (parsed.host !== location.host) return new Native(parsed.href, protocols);
      let target;
      if (parsed.pathname.startsWith(prefix)) target = "/" + parsed.pathname.slice(prefix.length) + parsed.search;
      else if (parsed.pathname.startsWith("/d/")) throw new DOMException("Another device's app", "SecurityError");
      else target = parsed.pathname + parsed.search; // root-relative: the app's own root
      this.url = parsed.href;
      this.readyState = State.CONNECTING;
      this.protocol = "";
      this.extensions = "";
      this.bufferedAmount = 0;
      this.binaryType = "blob";
      this.onopen = this.onmessage = this.onerror = this.onclose = null;
      this._buffer = new Uint8Array(0);
      this._fragments = null;
      this._closeSent = false;
      this._sending = Promise.resolve();
      const channel = new MessageChannel();
      this._port = channel.port1;
      this._port.onmessage = (event) => this._receive(event.data);
      const list = typeof protocols === "string" ? [protocols] : [...protocols];
      window.top.postMessage({ type: "tunnelctl-websocket", target, protocols: list }, location.origin, [channel.port2]);
    }

    send(data) {
      if (this.readyState === State.CONNECTING) throw new DOMException("Still connecting", "InvalidStateError");
      if (this.readyState !== State.OPEN) return;
      if (typeof data === "string") return this._frame(1, encoder.encode(data));
      if (data instanceof Blob) {
        this._sending = this._sending.then(async () => this._frame(2, new Uint8Array(await data.arrayBuffer())));
        return;
      }
      if (ArrayBuffer.isView(data)) return this._frame(2, new Uint8Array(data.buffer, data.byteOffset, data.byteLength).slice());
      return this._frame(2, new Uint8Array(data).slice());
    }

    close(code, reason = "") {
      if (this.readyState === State.CLOSING || this.readyState === State.CLOSED) return;
      if (this.readyState === State.CONNECTING) {
        this._port.postMessage({ type: "abort" });
        return this._closed(1006, "", false);
      }
      this.readyState = State.CLOSING;
      this._sendClose(code, reason);
    }

    _sendClose(code, reason) {
      if (this._closeSent) return;
      this._closeSent = true;
      if (code === undefined || code === 1005) return this._frame(8, new Uint8Array(0), true);
      const text = encoder.encode(reason);
      const payload = new Uint8Array(2 + text.length);
      new DataView(payload.buffer).setUint16(0, code);
      payload.set(text, 2);
      this._frame(8, payload, true);
    }

    // One frame, FIN set, masked as a client must (RFC 6455 §5.3).
    _frame(opcode, payload, force = false) {
      if (this._closeSent && !force) return;
      const length = payload.length;
      const extra = length < 126 ? 0 : length < 65536 ? 2 : 8;
      const bytes = new Uint8Array(2 + extra + 4 + length);
      const view = new DataView(bytes.buffer);
      bytes[0] = 0x80 | opcode;
      if (extra === 0) bytes[1] = 0x80 | length;
      else if (extra === 2) (bytes[1] = 0x80 | 126), view.setUint16(2, length);
      else (bytes[1] = 0x80 | 127), view.setBigUint64(2, BigInt(length));
      const mask = crypto.getRandomValues(new Uint8Array(4));
      bytes.set(mask, 2 + extra);
      const start = 2 + extra + 4;
      for (let i = 0; i < length; i++) bytes[start + i] = payload[i] ^ mask[i & 3];
      this._port.postMessage({ type: "write", bytes: bytes.buffer }, [bytes.buffer]);
    }

    _receive(msg) {
      if (this.readyState === State.CLOSED) return;
      if (msg.type === "open") {
        this.readyState = State.OPEN;
        this.protocol = msg.protocol;
        this._emit(new Event("open"));
      } else if (msg.type === "data") {
        this._buffer = concat(this._buffer, new Uint8Array(msg.bytes));
        this._parse();
      } else if (msg.type === "end") {
        this._closed(1006, "", false);
      } else if (msg.type === "fail") {
        this._emit(new Event("error"));
        this._closed(1006, "", false);
      }
    }

    _parse() {
      while (this.readyState !== State.CLOSED && this._buffer.length >= 2) {
        const b = this._buffer;
        const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
        const fin = (b[0] & 0x80) !== 0;
        const opcode = b[0] & 0x0f;
        let length = b[1] & 0x7f;
        let at = 2;
        if ((b[0] & 0x70) || (b[1] & 0x80)) return this._fail(1002, "bad frame from the server");
        if (length === 126) {
          if (b.length < 4) return;
          length = view.getUint16(2);
          at = 4;
        } else if (length === 127) {
          if (b.length < 10) return;
          length = Number(view.getBigUint64(2));
          at = 10;
        }
        if (b.length < at + length) return;
        const payload = b.slice(at, at + length);
        this._buffer = b.subarray(at + length);
        this._handle(fin, opcode, payload);
      }
    }

    _handle(fin, opcode, payload) {
      if (opcode === 0 && this._fragments) {
        this._fragments.data = concat(this._fragments.data, payload);
        if (fin) {
          const { type, data } = this._fragments;
          this._fragments = null;
          this._deliver(type, data);
        }
      } else if (opcode === 1 || opcode === 2) {
        if (fin) this._deliver(opcode, payload);
        else this._fragments = { type: opcode, data: payload };
      } else if (opcode === 8) {
        const code = payload.length >= 2 ? new DataView(payload.buffer).getUint16(0) : 1005;
        const reason = new TextDecoder().decode(payload.subarray(2));
        this._sendClose(code === 1005 ? undefined : code, "");
        this._port.postMessage({ type: "finish" });
        this._closed(code, reason, true);
      } else if (opcode === 9) {
        this._frame(10, payload);
      } else if (opcode !== 10) {
        this._fail(1002, `unknown opcode ${opcode}`);
      }
    }

    _deliver(opcode, payload) {
      let data;
      if (opcode === 1) {
        try {
          data = new TextDecoder("utf-8", { fatal: true }).decode(payload);
        } catch {
          return this._fail(1007, "text that is not UTF-8");
        }
      } else {
        data = this.binaryType === "arraybuffer" ? payload.buffer : new Blob([payload]);
      }
      this._emit(new MessageEvent("message", { data, origin: new URL(this.url).origin }));
    }

    _fail(code, reason) {
      this._sendClose(code, reason);
      this._port.postMessage({ type: "finish" });
      this._emit(new Event("error"));
      this._closed(1006, "", false);
    }

    _closed(code, reason, wasClean) {
      if (this.readyState === State.CLOSED) return;
      this.readyState = State.CLOSED;
      this._port.close();
      this._emit(new CloseEvent("close", { code, reason, wasClean }));
    }

    _emit(event) {
      const handler = this["on" + event.type];
      if (typeof handler === "function") handler.call(this, event);
      this.dispatchEvent(event);
    }
  }

  for (const [name, value] of Object.entries(State)) {
    Object.defineProperty(TunnelWebSocket, name, { value });
    Object.defineProperty(TunnelWebSocket.prototype, name, { value });
  }
  window.WebSocket = TunnelWebSocket;
})();
