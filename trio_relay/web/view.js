// view.js: what the page shows, derived from a state of state.js: texts, which buttons are
// enabled, who wrote a message. Pure functions, like the reducer: no DOM, no I/O, no clock
// (the state's `now` is the time), no globals.

import { State } from "./ws-link.js";

const { CONNECTED, OFFLINE, RECONNECTING } = State;

export function profileName(state, id) {
  const profile = state.profiles.find((p) => p.id === id);
  return profile ? profile.name : id || "Agent";
}

export function currentChat(state) {
  return state.project.chats.find((chat) => chat.id === state.chat.id) ?? null;
}

/**
 * Who wrote a user message: "You" when it came from this browser's device, else the
 * sender's name; a message stored before senders existed (no `sender`) stays "You".
 */
export function authorOf(state, message) {
  const sender = message.sender;
  if (!sender || typeof sender !== "object") return { name: "You", own: true };
  if (typeof sender.deviceId === "string" && state.device && sender.deviceId === state.device.id) {
    return { name: "You", own: true };
  }
  const name = typeof sender.name === "string" && sender.name.trim() ? sender.name.trim() : "Someone";
  return { name, own: false };
}

/** Markdown for a JSON code block, fenced past any run of backticks inside it. */
export function jsonBlock(value) {
  const json = JSON.stringify(value, null, 2) ?? String(value);
  const longest = Math.max(0, ...(json.match(/`+/g) ?? []).map((run) => run.length));
  const fence = "`".repeat(Math.max(3, longest + 1));
  return `${fence}json\n${json}\n${fence}`;
}

/**
 * The open chat's messages as shown, oldest first, then the replies still streaming:
 * `{id, role, author: {name, own}, text, createdAt, status, error, source}`; `source` is the
 * stored message or streamed entry it comes from (unchanged object: nothing to redraw).
 */
export function messageItems(state) {
  const chat = currentChat(state);
  const agent = chat ? profileName(state, chat.modelProfileId) : "Agent";
  const stored = new Set(state.chat.messages.map((m) => m.id));
  const items = state.chat.messages.map((m) => ({
    id: m.id,
    role: m.role,
    author: m.role === "user" ? authorOf(state, m) : { name: agent, own: false },
    // Content that is not text (another backend's) is shown as the JSON it is.
    text: typeof m.content === "string" ? m.content : jsonBlock(m.content),
    createdAt: m.createdAt ?? null,
    status: "stored",
    error: null,
    source: m,
  }));
  for (const entry of state.chat.streaming) {
    if (stored.has(entry.id)) continue;
    items.push({
      id: entry.id,
      role: "assistant",
      author: { name: agent, own: false },
      text: entry.text,
      createdAt: null,
      status: entry.status,
      error: entry.error,
      source: entry,
    });
  }
  return items;
}

export function chatTitle(state) {
  if (!state.chat.id) return "No chat selected";
  const chat = currentChat(state);
  return chat ? chat.title || "Untitled" : "Chat";
}

export function pageTitle(state) {
  return state.loggedIn && state.chat.id ? `${chatTitle(state)} · trio-relay` : "trio-relay";
}

export function chatPlaceholder(state) {
  if (!state.loggedIn) return "";
  if (!state.project.id) return "There is no project to show.";
  if (!state.chat.id) return "Pick a chat, or start a new one.";
  if (state.chat.gone) return "This chat was deleted.";
  if (!state.chat.ready) return "Loading…";
  if (state.chat.messages.length === 0 && state.chat.streaming.length === 0) return "No messages yet. Say something!";
  return "";
}

export function canWrite(state) {
  return state.loggedIn && state.chat.id !== null && !state.chat.gone;
}

export function connected(state) {
  return state.connection.state === CONNECTED;
}

export function canSend(state) {
  return canWrite(state) && connected(state) && state.draft.trim() !== "";
}

export function replyRunning(state) {
  return state.chat.streaming.some((entry) => entry.status === "streaming");
}

export function lockedOut(state, now = state.now) {
  return state.login.lockoutUntil > now;
}

/** "You can try again in 4:05." while a lockout lasts, else "". */
export function lockoutText(state) {
  const remaining = Math.ceil((state.login.lockoutUntil - state.now) / 1000);
  if (remaining <= 0) return "";
  const minutes = Math.floor(remaining / 60);
  const seconds = String(remaining % 60).padStart(2, "0");
  return `You can try again in ${minutes}:${seconds}.`;
}

export function loginButtonText(state) {
  if (!state.login.signingIn) return "Connect";
  return state.login.mode === "token" ? "Signing in…" : "Checking…";
}

/** "in 4 s" while a reconnect is counted down, else "". */
export function countdownText(state) {
  const { state: connection, nextAttemptAt } = state.connection;
  if (connection !== RECONNECTING || nextAttemptAt === null) return "";
  const seconds = Math.ceil((nextAttemptAt - state.now) / 1000);
  return seconds >= 1 ? `in ${seconds} s` : "";
}

/** Whether the page shows a time that changes by itself (it then needs `tick` events). */
export function needsTicking(state) {
  return state.connection.state === RECONNECTING || lockedOut(state);
}

export function retryShown(state) {
  // Offline is the browser's word, and a relay on this machine or the LAN may still be
  // reachable: the user may try at once there too.
  return state.connection.state === RECONNECTING || state.connection.state === OFFLINE;
}

export function connectionTitle(state) {
  const close = state.connection.lastClose;
  if (!close || connected(state)) return "";
  return `Last connection closed: ${close.code}${close.reason ? ` (${close.reason})` : ""}`;
}

/** "42 seconds" or "5 minutes" (rounded up), as the relay words a lockout. */
export function formatWait(seconds) {
  if (seconds < 120) return seconds === 1 ? "1 second" : `${seconds} seconds`;
  return `${Math.ceil(seconds / 60)} minutes`;
}

/**
 * What to tell the user about a failed sign-in or an ended session: `{text, wait}`, `wait`
 * being the seconds of a lockout (Connect stays disabled that long). `failure` is the error
 * as data: `{kind: "auth" | "lost" | "other", code, message, retryAfter, closeCode}`.
 */
export function describeFailure(failure, mode, url) {
  const message = failure ? failure.message : "closed";
  if (failure && failure.kind === "auth") {
    const locked = failure.code === "locked_out" || /^Too many failed attempts/.test(message);
    if (locked) {
      if (typeof failure.retryAfter === "number" && failure.retryAfter > 0) {
        const seconds = Math.ceil(failure.retryAfter);
        return { text: `Too many failed attempts. Try again in ${formatWait(seconds)}.`, wait: seconds };
      }
      return { text: message, wait: 0 };
    }
    if (failure.code === "token_invalid") {
      return {
        text: "This browser is no longer paired with the relay (the device was revoked). " +
          "Enter the PIN to pair it again.",
        wait: 0,
      };
    }
    if (failure.code === "auth_failed" && mode === "pin") return { text: "Wrong PIN. Try again.", wait: 0 };
    if (failure.code === "auth_failed") {
      return { text: "The relay no longer takes the PIN this page signed in with. Enter the new PIN.", wait: 0 };
    }
    return { text: message, wait: 0 };
  }
  if (failure && failure.kind === "lost" && failure.closeCode === 1008) {
    return { text: `The relay ended the session: ${message}`, wait: 0 };
  }
  if (failure && failure.kind === "lost") return { text: `Could not reach the relay at ${url}.`, wait: 0 };
  return { text: `The relay ended the session: ${message}`, wait: 0 };
}

/** Whether the relay no longer knows this browser's token: it is to be forgotten. */
export function deviceGone(failure) {
  if (!failure) return false;
  if (failure.kind === "auth") return failure.code === "token_invalid";
  return failure.kind === "lost" && failure.closeCode === 1008 && /revoked/i.test(failure.message);
}

/** `{projectId, chatId}` from a `#/<project>/<chat>` hash, or null. */
export function parseHash(hash) {
  const parts = hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  if (parts.length === 0) return null;
  try {
    return { projectId: decodeURIComponent(parts[0]), chatId: parts[1] ? decodeURIComponent(parts[1]) : null };
  } catch {
    return null;
  }
}

/** The hash for what is selected ("" for nothing). */
export function hashOf(state) {
  let hash = "";
  if (state.project.id) hash = `#/${encodeURIComponent(state.project.id)}`;
  if (state.project.id && state.chat.id) hash += `/${encodeURIComponent(state.chat.id)}`;
  return hash;
}
