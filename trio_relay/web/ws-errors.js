// ws-errors.js: what the web client's link to the relay (ws-link.js) reports: its connection
// states, its errors, and the relay's URL for a page. No state of its own: the other
// ws-*.js modules and the page import these names (ws-link.js re-exports them all).

/** The connection states, as `link.state` and the "state" event report them. */
export const State = Object.freeze({
  SIGNED_OUT: "signed-out", // no session: nobody has logged in, or the page logged out
  CONNECTING: "connecting", // the first connection of a login is being opened
  CONNECTED: "connected", // authenticated, every subscription live
  RECONNECTING: "reconnecting", // lost; a new connection is being tried (with backoff)
  OFFLINE: "offline", // the browser says it has no network: waiting for it to come back
  CLOSED: "closed", // the relay ended the session for good (sign-in refused, 1008): log in again
});

/** Every error this module raises or reports is a RelayError. */
export class RelayError extends Error {
  constructor(message, { code = null, closeCode = null, retryAfter = null } = {}) {
    super(message);
    this.name = new.target.name;
    this.code = code; // the wire's stable `code`, when the relay sent one
    this.closeCode = closeCode; // the WebSocket close code, when a close caused it
    this.retryAfter = retryAfter; // seconds to wait, on `locked_out`
  }
}
/**
 * The relay refused the sign-in; `message` is the relay's own text and `code` says why:
 * `auth_failed` (wrong PIN), `token_invalid` (unknown or revoked device token: forget it),
 * `locked_out` (too many failures; `retryAfter` seconds to wait), or a request error such as
 * `bad_request` (a device name the relay does not take).
 */
export class AuthFailed extends RelayError {}
/** A request got no reply within its timeout. */
export class RequestTimeout extends RelayError {}
/** The relay answered a request with an error reply; `code` says which kind. */
export class RequestRejected extends RelayError {}
/** The connection went away before a reply, or could not be opened. */
export class ConnectionLost extends RelayError {}
/** The relay ended a subscription: its stream failed, or it was refused on resubscribing. */
export class SubscriptionFailed extends RelayError {}

/** The relay's WebSocket URL for a page served by the relay itself (one port for both). */
export function relayUrl(location) {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
}
