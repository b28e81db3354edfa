// ws-link.js: the relay's wire protocol (docs/protocol.md) for a browser page, without a DOM.
//
// The seed's ws-link.ts, done right:
// - replies are matched to their request by `id`, and every request is bounded by a timeout
//   (its promise rejects with RequestTimeout);
// - pushes are routed by `resource` AND `resourceId` (the seed matched the resource type only,
//   so two open chats each saw both chats' pushes), and checked against `seq`: a duplicate is
//   dropped, a gap makes the link take a fresh snapshot rather than pass the gap on;
// - a lost connection is reconnected with exponential backoff and full jitter; each new
//   connection authenticates again (with the device token the relay gave on pairing, else
//   the PIN it was given) and subscribes again to everything the page holds, with `sinceSeq`
//   and `epoch`, so the relay replays exactly what was missed (`resumed`) or sends a fresh
//   snapshot (`reset: true`) that replaces the page's state;
// - a refused sign-in (wrong PIN, unknown token, locked out) is never retried with the same
//   secret: the link stops and the page asks the user.
//
// It renders nothing: app.js owns the page. Everything a browser-specific program would touch
// (WebSocket, timers, randomness) can be passed in, so the module also runs outside a page.
//
// The parts: ws-errors.js (states, errors, relayUrl), ws-requests.js (requests and replies,
// incoming frames), ws-subscriptions.js (subscriptions, pushes, resubscribing); this module
// keeps the session (login, auth, reconnect) and is the one pages import.

import {
  AuthFailed,
  ConnectionLost,
  RelayError,
  RequestRejected,
  RequestTimeout,
  State,
} from "./ws-errors.js";
import { RequestMethods } from "./ws-requests.js";
import { SubscriptionMethods } from "./ws-subscriptions.js";

// Everything pages imported from here before the split still comes from here.
export {
  AuthFailed,
  ConnectionLost,
  RelayError,
  RequestRejected,
  RequestTimeout,
  State,
  SubscriptionFailed,
  relayUrl,
} from "./ws-errors.js";

/**
 * What `login()` takes: a PIN string, `{pin}`, `{pin, deviceName}` (pair this device: the
 * relay answers with a device token, which the link then signs in with on every reconnect),
 * or `{token}` (a device token from an earlier pairing).
 */
function normalizeCredentials(credentials) {
  if (typeof credentials === "string" || typeof credentials === "number") {
    return { pin: String(credentials) };
  }
  if (credentials && typeof credentials.token === "string") return { token: credentials.token };
  if (credentials && credentials.pin !== undefined && credentials.pin !== null) {
    const auth = { pin: String(credentials.pin) };
    if (typeof credentials.deviceName === "string") auth.deviceName = credentials.deviceName;
    return auth;
  }
  throw new RelayError("login() needs a PIN or a device token");
}

/** Close codes after which reconnecting is pointless (docs/protocol.md, "Close codes"). */
const POLICY_VIOLATION = 1008;
/** The code this module closes its own connections with when it gives up on one. */
const CLIENT_GAVE_UP = 4000;

/** ms a connection must last before the reconnect backoff starts over. */
const STABLE_AFTER = 30_000;

export class RelayLink {
  /**
   * @param {string} url ws:// or wss:// URL of the relay
   * @param {object} [options]
   * @param {number} [options.requestTimeout] ms a request may take, from the call (30 s:
   *   longer than the relay's own `backend_timeout`, 10 s by default, so that a slow backend
   *   is answered by the relay with an error rather than given up on by the page)
   * @param {number} [options.authTimeout] ms an `auth` may take: the relay delays a wrong
   *   PIN's answer by up to `pin_backoff_max` (30 s by default), so this is longer
   * @param {{initial: number, maximum: number, multiplier: number}} [options.backoff] ms
   * @param {() => number} [options.random] uniform in [0, 1), for the jitter
   * @param {typeof WebSocket} [options.WebSocket]
   */
  constructor(url, options = {}) {
    this.url = url;
    this.requestTimeout = options.requestTimeout ?? 30_000;
    this.authTimeout = options.authTimeout ?? Math.max(45_000, this.requestTimeout);
    this.backoff = { initial: 500, maximum: 30_000, multiplier: 2, ...options.backoff };
    this._random = options.random ?? Math.random;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._setTimeout = options.setTimeout ?? globalThis.setTimeout.bind(globalThis);
    this._clearTimeout = options.clearTimeout ?? globalThis.clearTimeout.bind(globalThis);

    this.state = State.SIGNED_OUT;
    /** `{projects, modelProfiles}` from the latest `auth_success`, refreshed on reconnect. */
    this.session = null;
    /** `{code, reason}` of the last connection that ended. */
    this.lastClose = null;
    /** When the next connection attempt starts (ms since the epoch), while reconnecting. */
    this.nextAttemptAt = null;
    /** Connection attempts since the last successful one. */
    this.attempt = 0;
    /** The error that ended the session, in state CLOSED. */
    this.error = null;
    /** `{id, name}` of this device when the relay tied the session to one (pairing). */
    this.device = null;

    this._auth = null; // what each connection authenticates with: {pin[, deviceName]} or {token}
    this._conn = null; // the current connection: {ws, pending: Map, authed}
    this._nextId = 1;
    this._subs = new Map(); // key -> subscription entry
    this._queue = []; // requests waiting for a connection: {frame, settle}
    this._listeners = new Map(); // event name -> Set of functions
    this._retryTimer = null;
    this._offline = false;
    this._login = null; // {resolve, reject} of a login() in progress
  }

  // --- events ----------------------------------------------------------------------------

  /**
   * Listen to "state" (the new state), "session" (`{projects, modelProfiles}` after each
   * successful auth), "retry" (when the next connection attempt starts, ms since the epoch)
   * and "error" (errors that belong to no request). Returns a function that unlistens.
   */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this._listeners.get(event).delete(fn);
  }

  _emit(event, value) {
    for (const fn of [...(this._listeners.get(event) ?? [])]) {
      try {
        fn(value);
      } catch (error) {
        console.error(`[ws-link] ${event} listener failed`, error);
      }
    }
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this._emit("state", state);
  }

  // --- session ---------------------------------------------------------------------------

  /**
   * Connect and authenticate with `credentials` (see normalizeCredentials). Resolves with
   * the `auth_success` data (`{projects, modelProfiles}`, and `device` when the relay paired
   * this device or knew its token); rejects with AuthFailed (never retried: the relay said
   * no) or ConnectionLost. With `keepTrying`, a relay that cannot be reached is tried again
   * with the reconnect backoff until it answers (a stored token needs no one at the
   * keyboard); otherwise the first failure rejects. Once it has resolved, the link keeps the
   * session up by itself until logout().
   */
  login(credentials, { keepTrying = false } = {}) {
    if (this._login) return Promise.reject(new RelayError("a login is already in progress"));
    let auth;
    try {
      auth = normalizeCredentials(credentials);
    } catch (error) {
      return Promise.reject(error);
    }
    this._teardown();
    this._auth = auth;
    this.error = null;
    this.device = null;
    this.attempt = 0;
    return new Promise((resolve, reject) => {
      this._login = { resolve, reject, keepTrying };
      this._setState(State.CONNECTING);
      if (this._offline && keepTrying) this._setState(State.OFFLINE);
      else this._open();
    });
  }

  /** Close the connection, forget the credentials, end every subscription and request. */
  logout() {
    const login = this._login;
    this._login = null;
    this._teardown();
    this._auth = null;
    this.session = null;
    this.device = null;
    if (login) login.reject(new ConnectionLost("logged out"));
    this._setState(State.SIGNED_OUT);
  }

  /** Tell the link whether the browser has a network (the page's online/offline events). */
  setOffline(offline) {
    if (offline === this._offline) return;
    this._offline = offline;
    // Signed out, or a login attempt that reports its own failure.
    if (!this._auth || (this._login && !this._login.keepTrying)) return;
    if (offline) {
      this._cancelRetry();
      this._dropConnection("the browser is offline");
      this._setState(State.OFFLINE);
    } else if (this.state === State.OFFLINE) {
      this.reconnectNow();
    }
  }

  /** Try to connect at once instead of waiting out the backoff (a "retry now" button). */
  reconnectNow() {
    if (!this._auth || this.state === State.CLOSED) return;
    if (this._login && !this._login.keepTrying) return;
    this._cancelRetry();
    this.attempt = 0;
    this._dropConnection("reconnecting on request");
    this._setState(State.RECONNECTING);
    this._open();
  }

  _teardown() {
    this._cancelRetry();
    this._dropConnection("logged out");
    for (const entry of this._subs.values()) entry.closed = true;
    this._subs.clear();
    const queue = this._queue.splice(0);
    for (const item of queue) item.settle(null, new ConnectionLost("logged out"));
  }

  // --- connections -----------------------------------------------------------------------

  _open() {
    this.nextAttemptAt = null;
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (error) {
      // A malformed URL: no retry can fix it.
      this._fail(new ConnectionLost(`cannot connect to ${this.url}: ${error.message}`));
      return;
    }
    const conn = { ws, pending: new Map(), authed: false, openTimer: null };
    this._conn = conn;
    // An attempt that neither connects nor fails (a black-holed address) is given up on;
    // once open, the auth request has its own timeout.
    conn.openTimer = this._setTimeout(() => {
      if (this._conn === conn) this._abandon(conn, "connecting timed out");
    }, this.requestTimeout);
    ws.onopen = () => {
      if (this._conn !== conn) return;
      this._clearTimeout(conn.openTimer);
      this._authenticate(conn);
    };
    ws.onmessage = (event) => {
      if (this._conn !== conn) return;
      this._onFrame(conn, event.data);
    };
    ws.onerror = () => {}; // a close event always follows, with the code
    ws.onclose = (event) => {
      if (this._conn !== conn) return;
      this._onClose(conn, event.code, event.reason);
    };
  }

  _authenticate(conn) {
    this._send(conn, { type: "auth", ...this._auth }, this.authTimeout, (reply, error) => {
      if (this._conn !== conn) return;
      if (error instanceof RequestRejected) {
        // auth_failed, token_invalid, locked_out, or an `error` (a bad device name): the
        // same secret would only be refused again, and feed the relay's lockout.
        const { code, retryAfter } = error;
        this._authRefused(conn, new AuthFailed(error.message, { code, retryAfter }));
      } else if (error instanceof RequestTimeout) {
        this._abandon(conn, "authentication timed out");
      } else if (!error) {
        this._authenticated(conn, reply);
      }
      // A connection that closed is handled by _onClose.
    });
  }

  _authenticated(conn, reply) {
    conn.authed = true;
    this.session = reply.data ?? { projects: [], modelProfiles: [] };
    this.lastClose = null;
    const device = this.session.device;
    if (device && typeof device === "object" && typeof device.id === "string") {
      this.device = { id: device.id, name: typeof device.name === "string" ? device.name : "" };
      // Paired just now: the token, not the PIN, signs in from here on (a relay restarted
      // with another PIN still knows the device).
      if (typeof device.token === "string" && device.token) this._auth = { token: device.token };
    }
    // The backoff starts over only once this connection has lasted: a relay that closes
    // right after auth (a subscribe that kills it) must not be retried twice a second.
    this._setTimeout(() => {
      if (this._conn === conn) this.attempt = 0;
    }, STABLE_AFTER);
    this._emit("session", this.session);
    this._resubscribeAll(conn, () => {
      if (this._conn !== conn) return;
      const login = this._login;
      this._login = null;
      this._setState(State.CONNECTED);
      if (login) login.resolve(this.session);
      const queue = this._queue.splice(0);
      for (const item of queue) this._write(conn, item);
    });
  }

  _authRefused(conn, error) {
    this._dropConnection("sign-in refused");
    if (this._login) {
      // A login attempt: the page asks the user.
      const login = this._login;
      this._login = null;
      this._auth = null;
      this._setState(State.SIGNED_OUT);
      login.reject(error);
    } else {
      // The relay no longer takes what it took before (the host changed the PIN, or
      // revoked the device): the session is over.
      this._fail(error);
    }
  }

  /** Close a connection this side gave up on; it counts as lost. */
  _abandon(conn, reason) {
    try {
      conn.ws.close(CLIENT_GAVE_UP, reason);
    } catch {
      // already closing
    }
    this._onClose(conn, 1006, reason);
  }

  /** Forget the current connection without treating its end as a loss. */
  _dropConnection(reason) {
    const conn = this._conn;
    if (!conn) return;
    this._conn = null;
    this._clearTimeout(conn.openTimer);
    try {
      conn.ws.close(1000, reason);
    } catch {
      // already closing
    }
    this._failPending(conn, reason, null);
  }

  _failPending(conn, reason, closeCode) {
    for (const [, request] of conn.pending) {
      request.settle(null, new ConnectionLost(`connection lost: ${reason}`, { closeCode }));
    }
    conn.pending.clear();
  }

  _onClose(conn, code, reason) {
    if (this._conn !== conn) return;
    this._conn = null;
    this._clearTimeout(conn.openTimer);
    this.lastClose = { code, reason: reason || "" };
    this._failPending(conn, reason || `close code ${code}`, code);
    for (const entry of this._subs.values()) {
      if (entry.conn === conn) entry.conn = null;
    }
    const login = this._login;
    if (login && (!login.keepTrying || code === POLICY_VIOLATION)) {
      // The first connection of a login failed: report it, do not retry behind the page.
      this._login = null;
      this._auth = null;
      this._setState(State.SIGNED_OUT);
      login.reject(
        new ConnectionLost(
          code === POLICY_VIOLATION && reason ? reason : "could not reach the relay",
          { closeCode: code },
        ),
      );
      return;
    }
    if (!this._auth) return;
    if (code === POLICY_VIOLATION) {
      // A verdict (lockout, abuse, auth timeout): retrying would only repeat it.
      this._fail(new ConnectionLost(reason || "closed by the relay", { closeCode: code }));
      return;
    }
    if (this._offline) {
      this._setState(State.OFFLINE);
      return;
    }
    this._setState(State.RECONNECTING);
    this._scheduleRetry();
  }

  _scheduleRetry() {
    this._cancelRetry();
    const { initial, maximum, multiplier } = this.backoff;
    // Full jitter: uniform in [0, min(maximum, initial * multiplier ** attempt)).
    const cap = Math.min(maximum, initial * multiplier ** Math.min(this.attempt, 32));
    const delay = this._random() * cap;
    this.attempt += 1;
    this.nextAttemptAt = Date.now() + delay;
    this._emit("retry", this.nextAttemptAt); // for a countdown
    this._retryTimer = this._setTimeout(() => {
      this._retryTimer = null;
      if (this._auth && !this._conn && this.state === State.RECONNECTING) this._open();
    }, delay);
  }

  _cancelRetry() {
    if (this._retryTimer !== null) this._clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this.nextAttemptAt = null;
  }

  /** End the session for good: state CLOSED, every request and subscription fails. */
  _fail(error) {
    const login = this._login;
    this._login = null;
    if (login) login.reject(error);
    this._cancelRetry();
    this._dropConnection(error.message);
    this._auth = null;
    this.error = error;
    const subs = [...this._subs.values()];
    this._subs.clear();
    const queue = this._queue.splice(0);
    for (const item of queue) item.settle(null, error);
    for (const entry of subs) this._endSubscription(entry, error);
    this._setState(State.CLOSED);
  }
}

// The requests' and subscriptions' methods, written in modules of their own, are the link's.
for (const part of [RequestMethods, SubscriptionMethods]) {
  const methods = Object.getOwnPropertyDescriptors(part.prototype);
  delete methods.constructor;
  Object.defineProperties(RelayLink.prototype, methods);
}
