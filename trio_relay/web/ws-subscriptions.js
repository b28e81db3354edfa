// ws-subscriptions.js: RelayLink's subscriptions (ws-link.js): one entry per resource, pushes
// routed by `resource` AND `resourceId` and checked against `seq` (a duplicate is dropped, a gap
// takes a fresh snapshot), and every subscription made again after a reconnect with `sinceSeq`
// and `epoch`. These are methods of RelayLink, written here and installed on its prototype by
// ws-link.js; they use its connection (`_conn`), its requests (`_send`) and `_subs`.

import {
  ConnectionLost,
  RelayError,
  RequestRejected,
  RequestTimeout,
  SubscriptionFailed,
} from "./ws-errors.js";

function keyOf(resource, resourceId) {
  return resource === "modelProfiles" ? resource : `${resource}\u0000${resourceId}`;
}

const RETRYABLE_CODES = new Set(["rate_limited", "backend_error"]);

export class SubscriptionMethods {
  _onPush(conn, frame) {
    const entry = this._subs.get(keyOf(frame.resource, frame.resourceId));
    // Pushes before the `subscribed` reply that starts them belong to an older subscription.
    if (!entry || entry.conn !== conn || !entry.live) return;
    if (typeof frame.seq === "number" && entry.seq !== null) {
      if (frame.seq <= entry.seq) return; // already delivered
      if (frame.seq !== entry.seq + 1) {
        // The relay promises no gaps; if one shows anyway, start this resource over.
        console.warn(`[ws-link] seq gap on ${frame.resource} ${frame.resourceId ?? ""}`);
        entry.seq = null;
        entry.epoch = null;
        this._subscribeOn(conn, entry);
        return;
      }
    }
    if (typeof frame.seq === "number") entry.seq = frame.seq;
    if (frame.type === "error" && RETRYABLE_CODES.has(frame.code)) {
      // The relay's upstream for this resource failed (its final push): subscribe again after
      // a backoff, from a fresh snapshot, as the protocol says, instead of freezing.
      this._call(entry, "onInterrupted", new SubscriptionFailed(frame.error ?? "upstream failed",
                                                               { code: frame.code }));
      entry.live = false;
      entry.seq = null;
      entry.epoch = null;
      this._resubscribeLater(conn, entry);
    } else if (frame.type === "error") {
      this._subs.delete(entry.key);
      this._endSubscription(
        entry,
        new SubscriptionFailed(frame.error ?? "the subscription failed", { code: frame.code }),
      );
    } else if (frame.data && frame.data.completed === true && frame.data.type === undefined) {
      this._subs.delete(entry.key);
      entry.closed = true;
      this._call(entry, "onComplete");
    } else {
      this._call(entry, "onEvent", frame.data, frame.seq);
    }
  }


  /**
   * Watch a resource: "project" (its chats), "chat" (its messages and streamed replies) or
   * "modelProfiles" (no id). The handlers:
   *   onSnapshot(data, {reset})  the whole state: on subscribing, and whenever the relay could
   *                              not replay what a reconnect missed (reset: true). Replace.
   *   onEvent(data, seq)         one push, in order, each once, across reconnects
   *   onResumed()                a reconnect resumed: the missed pushes follow as onEvent
   *   onComplete()               the resource's stream ended (a deleted chat); no more calls
   *   onInterrupted(error)       the relay's upstream failed; the link subscribes again
   *                              after a backoff, and onSnapshot follows (reset)
   *   onError(error)             the subscription ended with an error; no more calls
   * Returns `{ready, close}`: `ready` resolves with the first snapshot's data and rejects if
   * the subscription fails before it; `close()` unsubscribes. One subscription per resource.
   */
  subscribe(resource, resourceId, handlers = {}) {
    if (!this._auth) throw new ConnectionLost("not logged in");
    const key = keyOf(resource, resourceId);
    if (this._subs.has(key)) throw new RelayError(`already subscribed to ${resource} ${resourceId}`);
    const entry = {
      key,
      resource,
      resourceId: resource === "modelProfiles" ? undefined : resourceId,
      handlers,
      seq: null,
      epoch: null,
      conn: null, // the connection the subscription was (or is being) made on
      live: false, // its `subscribed` reply arrived on `conn`
      closed: false,
      ready: null,
      resolveReady: null,
      rejectReady: null,
      retries: 0,
    };
    entry.ready = new Promise((resolve, reject) => {
      entry.resolveReady = resolve;
      entry.rejectReady = reject;
    });
    entry.ready.catch(() => {}); // the caller may not care; onError reports it too
    this._subs.set(key, entry);
    // Once authenticated, at once; otherwise the next connection subscribes it.
    if (this._conn && this._conn.authed) this._subscribeOn(this._conn, entry);
    return {
      ready: entry.ready,
      close: () => this._unsubscribe(entry),
    };
  }

  _unsubscribe(entry) {
    if (entry.closed) return;
    entry.closed = true;
    if (entry.rejectReady) {
      // Closed before its first snapshot: `ready` must still settle.
      entry.rejectReady(new SubscriptionFailed("unsubscribed before the first snapshot"));
      entry.resolveReady = null;
      entry.rejectReady = null;
    }
    if (this._subs.get(entry.key) === entry) this._subs.delete(entry.key);
    const conn = this._conn;
    if (conn && entry.conn === conn) {
      const fields = { type: "unsubscribe", resource: entry.resource };
      if (entry.resourceId !== undefined) fields.resourceId = entry.resourceId;
      this._request(conn, fields, this.requestTimeout).catch(() => {});
    }
  }

  /** Subscribe again to everything held; `done()` once each has had its answer. */
  _resubscribeAll(conn, done) {
    // Those subscribed already on this connection (by a "session" listener) are not sent twice.
    const entries = [...this._subs.values()].filter((entry) => entry.conn !== conn);
    let waiting = entries.length;
    if (waiting === 0) {
      done();
      return;
    }
    // The relay answers one connection's requests in order, so they can all go at once.
    for (const entry of entries) {
      this._subscribeOn(conn, entry, () => {
        waiting -= 1;
        if (waiting === 0) done();
      });
    }
  }

  _subscribeOn(conn, entry, answered = () => {}) {
    entry.conn = conn;
    entry.live = false;
    const fields = { type: "subscribe", resource: entry.resource };
    if (entry.resourceId !== undefined) fields.resourceId = entry.resourceId;
    if (entry.seq !== null && entry.epoch !== null) {
      fields.sinceSeq = entry.seq;
      fields.epoch = entry.epoch;
    }
    this._send(conn, fields, this.requestTimeout, (reply, error) => {
      try {
        if (entry.closed || this._conn !== conn || entry.conn !== conn) return;
        if (error) this._subscribeFailed(conn, entry, error);
        else this._subscribed(entry, reply);
      } finally {
        // Always counted, even for a subscription closed meanwhile (a chat deleted while
        // the page was away, or left): else the reconnect would never report connected.
        answered();
      }
    });
  }

  _subscribeFailed(conn, entry, error) {
    if (error instanceof RequestRejected && RETRYABLE_CODES.has(error.code)) {
      // Refused for now (the relay is busy, or the backend hiccuped): try again shortly.
      this._resubscribeLater(conn, entry);
    } else if (error instanceof RequestTimeout) {
      // Every request gets a reply; none came, so this connection is not working.
      this._abandon(conn, "subscribe timed out");
    } else if (error instanceof RequestRejected) {
      // not_found (deleted meanwhile), too_many_subscriptions, ...: this one is over.
      this._subs.delete(entry.key);
      this._endSubscription(entry, new SubscriptionFailed(error.message, { code: error.code }));
    }
  }

  /** Subscribe `entry` again on `conn` after a jittered backoff of its own. */
  _resubscribeLater(conn, entry) {
    const { initial, maximum, multiplier } = this.backoff;
    const delay = this._random() * Math.min(maximum, initial * multiplier ** entry.retries);
    entry.retries += 1;
    this._setTimeout(() => {
      if (!entry.closed && this._conn === conn && entry.conn === conn) {
        this._subscribeOn(conn, entry);
      }
    }, delay);
  }

  _subscribed(entry, reply) {
    entry.retries = 0;
    entry.live = true;
    entry.epoch = reply.epoch ?? null;
    if (typeof reply.seq === "number") entry.seq = reply.seq;
    if (reply.resumed) {
      this._call(entry, "onResumed");
      return;
    }
    const first = entry.resolveReady !== null;
    this._call(entry, "onSnapshot", reply.data, { reset: Boolean(reply.reset) || !first });
    if (first) {
      entry.resolveReady(reply.data);
      entry.resolveReady = null;
      entry.rejectReady = null;
    }
  }

  _endSubscription(entry, error) {
    entry.closed = true;
    if (entry.rejectReady) {
      entry.rejectReady(error);
      entry.resolveReady = null;
      entry.rejectReady = null;
    }
    this._call(entry, "onError", error);
  }

  _call(entry, name, ...args) {
    const handler = entry.handlers[name];
    if (!handler) return;
    try {
      handler(...args);
    } catch (error) {
      console.error(`[ws-link] ${name} handler failed`, error);
    }
  }
}
