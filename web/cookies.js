// The cookies of one device's app (RFC 6265, the parts an app behind one
// host needs), kept by its shell page.
//
// A Service Worker cannot hand Set-Cookie to the browser, nor read the
// browser's cookies into a request, so the shell keeps them: `store(target,
// headers)` takes the Set-Cookie fields of a response, `header(target)` gives
// the Cookie field for a request. They live in the shell's memory only (the
// tab's lifetime, like session cookies) and, as with HttpOnly, the app's
// scripts never see them. Domain, Secure and SameSite do not apply: every
// request goes to the one service of this app.

export class CookieJar {
  constructor(now = () => Date.now()) {
    this.now = now;
    this.cookies = new Map(); // "path\0name" -> {name, value, path, expires}
  }

  store(target, headers) {
    for (const [name, value] of headers) {
      if (name === "set-cookie") this.set(target, value);
    }
  }

  set(target, line) {
    const [pair, ...attributes] = line.split(";");
    const eq = pair.indexOf("=");
    if (eq < 0) return;
    const name = pair.slice(0, eq).trim();
    const value = pair.slice(eq + 1).trim();
    if (!name) return;
    let path = defaultPath(target);
    let expires = Infinity;
    for (const attribute of attributes) {
      const [key, ...rest] = attribute.split("=");
      const argument = rest.join("=").trim();
      const lower = key.trim().toLowerCase();
      if (lower === "path" && argument.startsWith("/")) path = argument;
      else if (lower === "max-age" && /^-?\d+$/.test(argument)) expires = this.now() + Number(argument) * 1000;
      else if (lower === "expires" && expires === Infinity && !Number.isNaN(Date.parse(argument))) expires = Date.parse(argument);
    }
    const key = `${path}\0${name}`;
    if (expires <= this.now()) this.cookies.delete(key);
    else this.cookies.set(key, { name, value, path, expires });
  }

  header(target) {
    const path = target.split("?")[0];
    const now = this.now();
    const matching = [];
    for (const [key, cookie] of this.cookies) {
      if (cookie.expires <= now) this.cookies.delete(key);
      else if (pathMatches(path, cookie.path)) matching.push(cookie);
    }
    // Longer paths first (RFC 6265 §5.4).
    matching.sort((a, b) => b.path.length - a.path.length);
    return matching.map((c) => `${c.name}=${c.value}`).join("; ");
  }
}

function defaultPath(target) {
  const path = target.split("?")[0];
  const slash = path.lastIndexOf("/");
  return slash <= 0 ? "/" : path.slice(0, slash);
}

function pathMatches(path, cookiePath) {
  if (path === cookiePath) return true;
  if (!path.startsWith(cookiePath)) return false;
  return cookiePath.endsWith("/") || path[cookiePath.length] === "/";
}
