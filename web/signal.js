// The signaling link of PROTOCOL.md §1: JSON over the WebSocket /signal of
// the server that served this page. The token goes in the first message
// (`auth`), never in the URL, so it appears in no server log.
//
// const link = await Signal.open(token) resolves once `welcome` arrived (or
// rejects with a SignInError saying why); link.onMessage(msg) gets every
// later message, link.onClose(code, reason) the end; link.send(msg) sends.

export const TOKEN_KEY = "tunnelctl.token";

export class SignInError extends Error {}

export function signalUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/signal`;
}

// The token handed over in the URL fragment (#token=...), moved to
// sessionStorage and removed from the address bar and history.
export function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

export class Signal {
  static open(token, timeout = 10000) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(signalUrl());
      const link = new Signal(ws);
      let welcomed = false;
      const timer = setTimeout(() => {
        ws.close();
        reject(new SignInError("the signaling server did not answer"));
      }, timeout);
      ws.addEventListener("open", () => ws.send(JSON.stringify({ v: 1, type: "auth", token })));
      ws.addEventListener("message", (event) => {
        let msg;
        try {
          msg = JSON.parse(event.data);
        } catch {
          return;
        }
        if (welcomed) {
          link.onMessage(msg);
        } else if (msg.type === "welcome") {
          welcomed = true;
          clearTimeout(timer);
          resolve(link);
        } else if (msg.type === "ice_servers") {
          link.iceServers = msg.ice_servers;
        } else if (msg.type === "error") {
          link.lastError = msg.message;
        }
      });
      ws.addEventListener("close", (event) => {
        clearTimeout(timer);
        if (!welcomed) {
          const why = event.code === 4401 ? `the token was refused (${event.reason || "invalid token"})`
            : `the signaling server closed the connection (${event.code}${event.reason ? " " + event.reason : ""})`;
          reject(new SignInError(why));
        }
        link.onClose(event.code, event.reason);
      });
    });
  }

  constructor(ws) {
    this.ws = ws;
    this.iceServers = [];
    this.onMessage = () => {};
    this.onClose = () => {};
  }

  get open() {
    return this.ws.readyState === WebSocket.OPEN;
  }

  send(msg) {
    if (this.open) this.ws.send(JSON.stringify({ v: 1, ...msg }));
  }

  close() {
    this.ws.close(1000);
  }
}
