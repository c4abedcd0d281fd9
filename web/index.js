// The sign-in page: a client token (typed, or handed over once in the URL
// fragment #token=...) kept in sessionStorage, and the devices it grants.
import { Signal, SignInError, TOKEN_KEY, takeTokenFromFragment } from "./signal.js";

const $ = (id) => document.getElementById(id);

function show(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

function row(device) {
  const tr = document.createElement("tr");
  tr.dataset.device = device.device;
  const name = document.createElement("td");
  name.textContent = device.device;
  const state = document.createElement("td");
  state.textContent = device.online ? "online" : "offline";
  state.className = device.online ? "online" : "offline";
  const services = document.createElement("td");
  for (const service of device.services || []) {
    const link = document.createElement("a");
    link.textContent = `open ${service}`;
    link.href = `/d/${encodeURIComponent(device.device)}/${encodeURIComponent(service)}/`;
    services.append(link);
  }
  if (device.online && !(device.services || []).length) services.textContent = "no services";
  tr.append(name, state, services);
  return tr;
}

async function signIn(token) {
  show("Signing in…");
  let link;
  try {
    link = await Signal.open(token);
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("signin").hidden = false;
    $("devices").hidden = true;
    show(error instanceof SignInError ? `Sign-in failed: ${error.message}.` : String(error), true);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("signin").hidden = true;
  show("");
  let pages = []; // an answer comes in pages of up to 16 devices, `more` on all but the last
  link.onMessage = (msg) => {
    if (msg.type === "devices") {
      pages.push(...msg.devices);
      if (msg.more) return;
      $("device-rows").replaceChildren(...pages.map(row));
      $("devices").hidden = false;
      if (!pages.length) show("This token grants no device.");
      pages = [];
    } else if (msg.type === "error") {
      show(`The server said: ${msg.message}`, true);
    }
  };
  link.onClose = () => show("Disconnected from the signaling server; reload to see the devices again.", true);
  link.send({ type: "list_devices" });
  // Presence changes are not pushed: ask again now and then while the page is open.
  const refresh = setInterval(() => (link.open ? link.send({ type: "list_devices" }) : clearInterval(refresh)), 5000);
}

takeTokenFromFragment();
$("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  $("token").value = "";
  if (token) signIn(token);
});
$("signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
});
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) signIn(saved);
else $("signin").hidden = false;
