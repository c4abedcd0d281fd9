// The tunnel frames of PROTOCOL.md §2 on one RTCDataChannel, client side
// (odd stream ids), and its HTTP streams (§2.8).
//
// new Tunnel(channel) takes an open DataChannel (protocol "tunnelctl/1").
// tunnel.request(service, head, body) opens an HTTP stream and returns an
// HttpStream; set its callbacks at once: `onHead(head)` gets the response
// head, then `onData(bytes)` / `onEnd()` deliver the body, `onError(reason)`
// a reset or a lost tunnel at any point; and
// `consumed(n)` returns n bytes of credit to the device (call it as the body
// is read, so the device never sends faster than the reader reads).
// A session error closes the channel; tunnel.onClose(reason) is called once.

const HEADER = 8;
const MAX_MESSAGE = 65536;
const MAX_DATA = MAX_MESSAGE - HEADER;
const INITIAL_WINDOW = 262144;
// Credit granted on top of the initial window when a stream opens: a bigger
// window lets a download run at the path's speed rather than window/RTT.
const EXTRA_WINDOW = 4 * 1024 * 1024;
const MAX_HEAD = 16384;

export const Type = { OPEN: 1, DATA: 2, FIN: 3, RESET: 4, WINDOW: 5, OPEN_HTTP: 6, HEAD: 7 };
export const Reset = {
  CANCEL: 0, UNKNOWN_SERVICE: 1, CONNECT_FAILED: 2, CONNECTION_RESET: 3, FLOW_CONTROL: 4,
  PROTOCOL: 5, REFUSED: 6, UNKNOWN_STREAM: 7, BAD_HEAD: 8, BAD_GATEWAY: 9,
};
const RESET_NAMES = Object.fromEntries(Object.entries(Reset).map(([k, v]) => [v, k]));

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

export function frame(type, streamId, payload = new Uint8Array(0)) {
  const bytes = new Uint8Array(HEADER + payload.length);
  const view = new DataView(bytes.buffer);
  view.setUint8(0, type);
  view.setUint16(2, payload.length);
  view.setUint32(4, streamId);
  bytes.set(payload, HEADER);
  return bytes;
}

// Every frame of one message, or throws: a malformed message is rejected whole.
export function parseMessage(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length === 0 || bytes.length > MAX_MESSAGE) throw new Error("bad message size");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const frames = [];
  for (let at = 0; at < bytes.length; ) {
    if (bytes.length - at < HEADER) throw new Error("short frame header");
    const type = view.getUint8(at);
    const length = view.getUint16(at + 2);
    const streamId = view.getUint32(at + 4);
    if (view.getUint8(at + 1) !== 0) throw new Error("non-zero flags");
    if (type < 1 || type > 7) throw new Error(`unknown frame type ${type}`);
    if (streamId === 0) throw new Error("stream id 0");
    if (at + HEADER + length > bytes.length) throw new Error("frame runs past the message");
    const payload = bytes.subarray(at + HEADER, at + HEADER + length);
    checkPayload(type, payload);
    frames.push({ type, streamId, payload });
    at += HEADER + length;
  }
  return frames;
}

function checkPayload(type, payload) {
  const n = payload.length;
  if (type === Type.DATA && n === 0) throw new Error("empty DATA");
  if (type === Type.FIN && n !== 0) throw new Error("FIN with a payload");
  if (type === Type.RESET && (n < 2 || n > 258)) throw new Error("bad RESET");
  if (type === Type.WINDOW) {
    const increment = n === 4 ? new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0) : 0;
    if (increment < 1 || increment > 0x7fffffff) throw new Error("bad WINDOW");
  }
  if (type === Type.HEAD && (n < 2 || n > MAX_HEAD)) throw new Error("bad HEAD");
  if (type === Type.OPEN_HTTP) throw new Error("OPEN_HTTP received by the client");
}

function u32(n) {
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, n);
  return bytes;
}

export function resetPayload(code, reason = "") {
  const text = encoder.encode(reason).subarray(0, 256);
  const bytes = new Uint8Array(2 + text.length);
  new DataView(bytes.buffer).setUint16(0, code);
  bytes.set(text, 2);
  return bytes;
}

export function openHttpPayload(service, head) {
  const name = encoder.encode(service);
  const json = encoder.encode(JSON.stringify(head));
  if (json.length > MAX_HEAD) throw new Error("request head too large");
  const bytes = new Uint8Array(1 + name.length + json.length);
  bytes[0] = name.length;
  bytes.set(name, 1);
  bytes.set(json, 1 + name.length);
  return bytes;
}

export class HttpStream {
  constructor(tunnel, id) {
    this.tunnel = tunnel;
    this.id = id;
    this.sendCredit = INITIAL_WINDOW;
    this.receiveCredit = INITIAL_WINDOW + EXTRA_WINDOW;
    this.unacknowledged = 0; // consumed bytes not yet returned as WINDOW
    this.pending = []; // request body waiting for credit
    this.finPending = false;
    this.finSent = false;
    this.gotHead = false;
    this.remoteDone = false; // FIN received
    this.closed = false;
    this.onHead = () => {};
    this.onData = () => {};
    this.onEnd = () => {};
    this.onError = () => {};
  }

  write(bytes) {
    for (let at = 0; at < bytes.length; at += MAX_DATA) {
      this.pending.push(bytes.subarray(at, at + MAX_DATA));
    }
    this.tunnel.flush();
  }

  finish() {
    this.finPending = true;
    this.tunnel.flush();
  }

  consumed(n) {
    if (this.closed) return;
    this.unacknowledged += n;
    // Grant in batches (half the initial window), as the reference implementation does.
    if (this.unacknowledged >= INITIAL_WINDOW / 2) {
      this.receiveCredit += this.unacknowledged;
      this.tunnel.queue(frame(Type.WINDOW, this.id, u32(this.unacknowledged)));
      this.unacknowledged = 0;
      this.tunnel.flush();
    }
  }

  cancel(reason = "cancelled by the page") {
    if (this.closed) return;
    this.tunnel.queue(frame(Type.RESET, this.id, resetPayload(Reset.CANCEL, reason)));
    this.tunnel.flush();
    this.fail(reason);
  }

  fail(reason) {
    if (this.closed) return;
    this.closed = true;
    this.tunnel.streams.delete(this.id);
    this.onError(reason);
  }

  receive(type, payload) {
    if (type === Type.HEAD) {
      if (this.gotHead) return this.violate("second HEAD");
      let head;
      try {
        head = JSON.parse(decoder.decode(payload));
      } catch {
        return this.violate("response head is not JSON", Reset.BAD_HEAD);
      }
      if (!Number.isInteger(head.status) || !Array.isArray(head.headers)) {
        return this.violate("bad response head", Reset.BAD_HEAD);
      }
      this.gotHead = true;
      this.onHead(head);
    } else if (type === Type.DATA) {
      if (!this.gotHead || this.remoteDone) return this.violate("DATA outside the response body");
      if (payload.length > this.receiveCredit) return this.violate("beyond credit", Reset.FLOW_CONTROL);
      this.receiveCredit -= payload.length;
      this.onData(payload.slice());
    } else if (type === Type.FIN) {
      if (!this.gotHead || this.remoteDone) return this.violate("FIN outside the response body");
      this.remoteDone = true;
      if (this.finSent) {
        this.closed = true;
        this.tunnel.streams.delete(this.id);
      }
      this.onEnd();
    } else if (type === Type.WINDOW) {
      this.sendCredit += new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0);
      if (this.sendCredit > 0x7fffffff) return this.violate("credit above 2^31-1", Reset.FLOW_CONTROL);
      this.tunnel.flush();
    } else if (type === Type.RESET) {
      const code = new DataView(payload.buffer, payload.byteOffset, 2).getUint16(0);
      const reason = new TextDecoder().decode(payload.subarray(2));
      if (this.remoteDone) {
        // The response is complete: this only means "stop uploading" (§2.8).
        this.closed = true;
        this.pending = [];
        this.tunnel.streams.delete(this.id);
        return;
      }
      this.fail(`${RESET_NAMES[code] || code}${reason ? ": " + reason : ""}`);
    }
  }

  violate(why, code = Reset.PROTOCOL) {
    this.tunnel.queue(frame(Type.RESET, this.id, resetPayload(code, why)));
    this.tunnel.flush();
    this.fail(why);
  }
}

export class Tunnel {
  constructor(channel) {
    this.channel = channel;
    this.channel.binaryType = "arraybuffer";
    this.streams = new Map();
    this.nextId = 1;
    this.control = []; // frames sent ahead of stream data
    this.onClose = () => {};
    this.closed = false;
    this.bytesIn = 0;
    channel.bufferedAmountLowThreshold = 1 << 20;
    channel.addEventListener("bufferedamountlow", () => this.flush());
    channel.addEventListener("message", (event) => this.receive(event.data));
    channel.addEventListener("close", () => this.close("the DataChannel closed"));
  }

  // With `upgrade`, the request is an Upgrade (WebSocket) one: no body, no
  // FIN; after a 101 HEAD the stream carries raw bytes both ways (§2.8).
  request(service, head, body, { upgrade = false } = {}) {
    if (this.closed) throw new Error("tunnel closed");
    const stream = new HttpStream(this, this.nextId);
    this.nextId += 2;
    this.streams.set(stream.id, stream);
    this.queue(frame(Type.OPEN_HTTP, stream.id, openHttpPayload(service, head)));
    this.queue(frame(Type.WINDOW, stream.id, u32(EXTRA_WINDOW)));
    if (body && body.length) stream.write(body);
    if (!upgrade) stream.finish();
    this.flush();
    return stream;
  }

  queue(bytes) {
    this.control.push(bytes);
  }

  // Pack control frames, then stream data within credit, into messages of at
  // most 64 KiB; stop while the channel holds more than 4 MiB unsent.
  flush() {
    if (this.closed) return;
    let message = [];
    let size = 0;
    const emit = () => {
      if (!size) return;
      const out = new Uint8Array(size);
      let at = 0;
      for (const part of message) {
        out.set(part, at);
        at += part.length;
      }
      this.channel.send(out);
      message = [];
      size = 0;
    };
    const add = (bytes) => {
      if (size + bytes.length > MAX_MESSAGE) emit();
      message.push(bytes);
      size += bytes.length;
    };
    for (const bytes of this.control.splice(0)) add(bytes);
    for (const stream of this.streams.values()) {
      while (stream.pending.length && stream.sendCredit > 0 && this.channel.bufferedAmount < 4 << 20) {
        let chunk = stream.pending[0];
        if (chunk.length > stream.sendCredit) {
          stream.pending[0] = chunk.subarray(stream.sendCredit);
          chunk = chunk.subarray(0, stream.sendCredit);
        } else {
          stream.pending.shift();
        }
        stream.sendCredit -= chunk.length;
        add(frame(Type.DATA, stream.id, chunk));
      }
      if (stream.finPending && !stream.finSent && !stream.pending.length) {
        stream.finSent = true;
        add(frame(Type.FIN, stream.id));
        if (stream.remoteDone) {
          stream.closed = true;
          this.streams.delete(stream.id);
        }
      }
    }
    emit();
  }

  receive(data) {
    if (this.closed) return;
    if (typeof data === "string") return this.fail("a text message on the tunnel");
    let frames;
    try {
      frames = parseMessage(data);
    } catch (error) {
      return this.fail(error.message);
    }
    this.bytesIn += data.byteLength;
    for (const { type, streamId, payload } of frames) {
      const stream = this.streams.get(streamId);
      if (stream) {
        stream.receive(type, payload);
      } else if (type === Type.OPEN) {
        // The device may open streams (§2.3), but a browser has nothing to serve.
        this.queue(frame(Type.RESET, streamId, resetPayload(Reset.REFUSED, "nothing served here")));
      } else if (streamId % 2 === 0 || streamId >= this.nextId) {
        if (type !== Type.RESET) {
          this.queue(frame(Type.RESET, streamId, resetPayload(Reset.UNKNOWN_STREAM)));
        }
      } // else: a stream we closed; frames in flight are ignored (§2.3)
    }
    this.flush();
  }

  fail(reason) {
    console.warn("tunnel session error:", reason);
    this.channel.close();
    this.close(reason);
  }

  close(reason) {
    if (this.closed) return;
    this.closed = true;
    for (const stream of [...this.streams.values()]) stream.fail(`tunnel closed: ${reason}`);
    this.streams.clear();
    this.onClose(reason);
  }
}
