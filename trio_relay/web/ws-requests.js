// ws-requests.js: RelayLink's requests (ws-link.js): each one matched to its reply by `id` and
// bounded by a timeout, requests queued through a reconnect, and the frames that arrive
// sorted into replies and pushes (pushes go to ws-subscriptions.js). These are methods of
// RelayLink, written here and installed on its prototype by ws-link.js; they use its
// connection (`_conn`), its timers and its state.

import { ConnectionLost, RelayError, RequestRejected, RequestTimeout, State } from "./ws-errors.js";

export class RequestMethods {
  _onFrame(conn, text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      this._emit("error", new RelayError("the relay sent a frame that is not JSON"));
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (frame.id === null || frame.id === undefined) {
      if (frame.type === "auth_required") return;
      if ((frame.type === "data" || frame.type === "error") && typeof frame.resource === "string") {
        this._onPush(conn, frame);
        return;
      }
      if (frame.type === "error") {
        // An answer to a frame whose id could not be read: a bug on this side.
        this._emit("error", new RequestRejected(frame.error ?? "error", { code: frame.code }));
      }
      return;
    }
    const request = conn.pending.get(frame.id);
    if (!request) return; // its request timed out: the reply is too late to matter
    conn.pending.delete(frame.id);
    if (frame.type === "error" || frame.type === "auth_failed") {
      const retryAfter = typeof frame.retryAfter === "number" ? frame.retryAfter : null;
      request.settle(
        null,
        new RequestRejected(frame.error ?? "error", { code: frame.code ?? null, retryAfter }),
      );
    } else {
      request.settle(frame, null);
    }
  }

  // --- requests --------------------------------------------------------------------------

  /**
   * Send a request on `conn` now. `onReply(frame, error)` runs once: with the reply, as soon
   * as it arrives (in the frame's own event, not a later microtask, so that the pushes right
   * behind a reply find the state it set), or with RequestTimeout or ConnectionLost.
   */
  _send(conn, fields, timeout, onReply) {
    const id = `w${this._nextId++}`;
    const timer = this._setTimeout(() => {
      conn.pending.delete(id);
      onReply(null, new RequestTimeout(`no reply to ${fields.type} within ${timeout / 1000} s`));
    }, timeout);
    const settle = (frame, error) => {
      this._clearTimeout(timer);
      onReply(frame, error);
    };
    conn.pending.set(id, { settle });
    try {
      conn.ws.send(JSON.stringify({ id, ...fields }));
    } catch (error) {
      conn.pending.delete(id);
      settle(null, new ConnectionLost(`cannot send: ${error.message}`));
    }
  }

  /** `_send` as a promise of the reply frame. */
  _request(conn, fields, timeout) {
    return new Promise((resolve, reject) => {
      this._send(conn, fields, timeout, (frame, error) => (error ? reject(error) : resolve(frame)));
    });
  }

  /**
   * Send one request once the link is CONNECTED (waiting through a reconnect) and resolve
   * with the reply frame. The timeout counts from the call. A request whose connection drops
   * before the reply is not sent again (the relay may have acted on it): ConnectionLost;
   * unless `retry` (the request is idempotent, as a send with its clientNonce is): then it is
   * sent again on the next connection, within the same timeout.
   */
  request(fields, { timeout = this.requestTimeout, retry = false } = {}) {
    if (!this._auth) {
      return Promise.reject(this.error ?? new ConnectionLost("not logged in"));
    }
    return new Promise((resolve, reject) => {
      let done = false;
      const item = { fields, settle: null, timer: null, retry };
      item.settle = (frame, error) => {
        if (done) return;
        done = true;
        this._clearTimeout(item.timer);
        if (error) reject(error);
        else resolve(frame);
      };
      item.timer = this._setTimeout(() => {
        const index = this._queue.indexOf(item);
        if (index >= 0) this._queue.splice(index, 1);
        item.settle(null, new RequestTimeout(`no reply to ${fields.type} within ${timeout / 1000} s`));
      }, timeout);
      if (this._conn && this.state === State.CONNECTED) this._write(this._conn, item);
      else this._queue.push(item);
    });
  }

  _write(conn, item) {
    // The timer of request() bounds the whole request; this one is only a backstop.
    this._send(conn, item.fields, this.requestTimeout * 2, (frame, error) => {
      if (error instanceof ConnectionLost && item.retry && this._auth) {
        this._queue.push(item); // written again once reconnected (or settled on logout)
        return;
      }
      item.settle(frame, error);
    });
  }

  /**
   * Send a message to a chat; resolves once the relay's backend accepted it. It carries a
   * fresh clientNonce, so a connection lost before the answer only means sending it again:
   * the relay stores it once.
   */
  async send(chatId, message) {
    const clientNonce = newNonce();
    await this.request({ type: "send", resourceId: chatId, message, clientNonce }, { retry: true });
  }

  /** Create a chat in a project; resolves with the new chat. */
  async createChat(projectId, { title, modelProfileId } = {}) {
    const message = {};
    if (title) message.title = title;
    if (modelProfileId) message.modelProfileId = modelProfileId;
    const reply = await this.request({
      type: "create", resource: "chat", resourceId: projectId, message,
    });
    return reply.data.chat;
  }

  /** Stop the agent's answer running in a chat; resolves whether one was running. */
  async cancelReply(chatId) {
    const reply = await this.request({ type: "cancel", resourceId: chatId });
    return Boolean(reply.data && reply.data.cancelled);
  }
}

/** 128 random bits as hex (crypto.randomUUID needs a secure context; a LAN page is not). */
function newNonce() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
