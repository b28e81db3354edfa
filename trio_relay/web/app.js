// app.js: the page. It keeps the state that ws-link's events describe and renders it.
//
// Every piece of text from the relay reaches the page through textContent or a text node,
// never through innerHTML; a message's text is shown as markdown by markdown.js, which
// builds the elements itself from an allow-list (a chat message is data, not markup).

import { defaultDeviceName, deviceNameProblem } from "./device-name.js";
import { copyCode, renderMarkdown } from "./markdown.js";
import {
  AuthFailed,
  ConnectionLost,
  RelayLink,
  RequestRejected,
  State,
  relayUrl,
} from "./ws-link.js";

const link = new RelayLink(relayUrl(window.location));
/** Phone-sized: the chat list is a drawer (style.css has the same width). */
const narrowScreen = window.matchMedia("(max-width: 720px)");

// --- what this browser keeps (localStorage, per relay origin) ----------------------------
//
// The device token the relay gave when this browser was paired (with its id and name):
// with it a reload or a relay restart signs in without the PIN. Nothing else secret is kept.

const DEVICE_KEY = "trio-relay.device";
const DEVICE_NAME_KEY = "trio-relay.deviceName";
const LAST_CHATS_KEY = "trio-relay.lastChats";

function readStorage(key) {
  try {
    const text = window.localStorage.getItem(key);
    return text === null ? null : JSON.parse(text);
  } catch {
    return null; // storage off (private mode, a policy) or a value this page did not write
  }
}

function writeStorage(key, value) {
  try {
    if (value === null) window.localStorage.removeItem(key);
    else window.localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // Storage off: the page still works, it only asks for the PIN after a reload.
  }
}

/** `{token, id, name}` of this browser's pairing, or null. */
function storedDevice() {
  const device = readStorage(DEVICE_KEY);
  if (!device || typeof device.token !== "string" || !device.token) return null;
  return {
    token: device.token,
    id: typeof device.id === "string" ? device.id : null,
    name: typeof device.name === "string" ? device.name : "",
  };
}

function forgetDevice() {
  writeStorage(DEVICE_KEY, null);
}

/** The name typed last, else one from the browser. */
function proposedDeviceName() {
  const saved = readStorage(DEVICE_NAME_KEY);
  return typeof saved === "string" && saved.trim() ? saved : defaultDeviceName();
}


/** The element with this data-testid (every element the page updates has one). */
function $(testid) {
  return document.querySelector(`[data-testid="${testid}"]`);
}

/** A new element: `h("li", {class: "x", "data-id": id}, "text", child)`. Strings become text. */
function h(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// --- state -------------------------------------------------------------------------------

const ui = {
  loggedIn: false,
  projects: [],
  profiles: [],
  projectId: null,
  chats: [], // the selected project's chats, in creation order
  chatsReady: false,
  chatId: null,
  messages: [], // the selected chat's stored messages, oldest first
  streaming: new Map(), // messageId -> {text, status: "streaming" | "error" | "cancelled", error}
  chatReady: false,
  chatGone: false, // the selected chat was deleted
  sync: "", // how the chat's state was last brought up to date: snapshot, reset, resumed
  wanted: null, // {projectId, chatId} from the URL, to select once known
  projectSub: null,
  chatSub: null,
  profilesSub: null,
  sending: 0,
  device: null, // {id, name} of this browser's pairing: its messages are "You"
};

function profileName(id) {
  const profile = ui.profiles.find((p) => p.id === id);
  return profile ? profile.name : id || "Agent";
}

function currentChat() {
  return ui.chats.find((chat) => chat.id === ui.chatId) ?? null;
}

// --- notices -----------------------------------------------------------------------------

let noticeTimer = null;

function notice(text) {
  setText($("notice-text"), text);
  $("notice").hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    $("notice").hidden = true;
  }, 8000);
}

$("notice-close").addEventListener("click", () => {
  $("notice").hidden = true;
});

// --- connection state --------------------------------------------------------------------

const STATE_TEXT = {
  [State.SIGNED_OUT]: "Signed out",
  [State.CONNECTING]: "Connecting…",
  [State.CONNECTED]: "Connected",
  [State.RECONNECTING]: "Reconnecting…",
  [State.OFFLINE]: "Offline",
  [State.CLOSED]: "Disconnected",
};

let countdown = null;

function renderConnection() {
  const state = link.state;
  const box = $("connection-state");
  box.dataset.state = state;
  // The state word is in a live region; the countdown beside it is not, or a screen reader
  // would announce every tick.
  let countdownText = "";
  if (state === State.RECONNECTING && link.nextAttemptAt !== null) {
    const seconds = Math.ceil((link.nextAttemptAt - Date.now()) / 1000);
    if (seconds >= 1) countdownText = `in ${seconds} s`;
  }
  setText($("connection-text"), STATE_TEXT[state] ?? state);
  setText($("connection-countdown"), countdownText);
  const close = link.lastClose;
  box.title = close && state !== State.CONNECTED
    ? `Last connection closed: ${close.code}${close.reason ? ` (${close.reason})` : ""}`
    : "";
  // Offline is the browser's word, and a relay on this machine or the LAN may still be
  // reachable: let the user try at once there too.
  $("retry-button").hidden = state !== State.RECONNECTING && state !== State.OFFLINE;
  $("logout-button").hidden = !ui.loggedIn;
  // Tick the countdown while one is shown.
  if (state === State.RECONNECTING && countdown === null) {
    countdown = setInterval(renderConnection, 500);
  } else if (state !== State.RECONNECTING && countdown !== null) {
    clearInterval(countdown);
    countdown = null;
  }
  renderComposer();
}

link.on("state", (state) => {
  renderConnection();
  // The relay ended the session for good (device revoked, PIN changed, lockout, abuse).
  if (state === State.CLOSED && ui.loggedIn) sessionEnded(link.error);
});

link.on("session", (session) => {
  ui.projects = Array.isArray(session.projects) ? session.projects : [];
  if (!ui.profilesSub) ui.profiles = session.modelProfiles ?? [];
  if (link.device) ui.device = link.device;
  renderProjects();
  renderProfiles();
  if (ui.loggedIn && ui.projectId && !ui.projects.some((p) => p.id === ui.projectId)) {
    selectProject(ui.projects[0]?.id ?? null);
  }
});

link.on("retry", renderConnection);
link.on("error", (error) => console.warn("[app]", error));

$("retry-button").addEventListener("click", () => link.reconnectNow());
$("logout-button").addEventListener("click", () => signOut());

window.addEventListener("online", () => link.setOffline(false));
window.addEventListener("offline", () => link.setOffline(true));
document.addEventListener("visibilitychange", () => {
  // Background tabs run timers late: do not make someone who comes back wait for one.
  if (document.visibilityState === "visible" && link.state === State.RECONNECTING) {
    link.reconnectNow();
  }
});

// --- signing in --------------------------------------------------------------------------
//
// A browser is paired once, with the PIN and a device name; the relay answers with a device
// token, kept in localStorage, and every later sign-in (reloads, relay restarts, reconnects)
// uses the token. A refused sign-in is never retried by itself: the page says why and waits
// for the user (a retry with the same secret would only feed the relay's lockout).

let signInAttempt = 0; // bumped by every sign-in and sign-out: a late answer is ignored
let lockoutTimer = null;
let lockoutUntil = 0;

function resetWorkspace() {
  ui.loggedIn = false;
  ui.projectSub = ui.chatSub = ui.profilesSub = null;
  ui.projectId = ui.chatId = null;
  ui.projects = [];
  ui.chats = [];
  ui.messages = [];
  ui.streaming.clear();
  ui.chatsReady = ui.chatReady = ui.chatGone = false;
  $("message-list").replaceChildren();
  closeDrawer();
}

/** "42 seconds" or "5 minutes" (rounded up), as the relay words a lockout. */
function formatWait(seconds) {
  if (seconds < 120) return seconds === 1 ? "1 second" : `${seconds} seconds`;
  return `${Math.ceil(seconds / 60)} minutes`;
}

function renderLockout() {
  clearTimeout(lockoutTimer);
  lockoutTimer = null;
  const remaining = Math.ceil((lockoutUntil - Date.now()) / 1000);
  const wait = $("login-wait");
  if (remaining > 0) {
    const minutes = Math.floor(remaining / 60);
    const seconds = String(remaining % 60).padStart(2, "0");
    setText(wait, `You can try again in ${minutes}:${seconds}.`);
    wait.hidden = false;
    lockoutTimer = setTimeout(renderLockout, 1000);
  } else {
    wait.hidden = true;
  }
  renderLoginButton();
}

let signingIn = false;

function renderLoginButton() {
  const button = $("login-button");
  const waiting = lockoutUntil > Date.now();
  button.disabled = signingIn || waiting;
  setText(button, signingIn ? ($("login-form").dataset.mode === "token" ? "Signing in…" : "Checking…") : "Connect");
}

/**
 * What to tell the user about a failed sign-in or an ended session: `{text, wait}`, `wait`
 * being the seconds of a lockout (the button stays disabled that long).
 */
function describeFailure(error, mode) {
  if (error instanceof AuthFailed) {
    const locked = error.code === "locked_out" || /^Too many failed attempts/.test(error.message);
    if (locked) {
      if (typeof error.retryAfter === "number" && error.retryAfter > 0) {
        const seconds = Math.ceil(error.retryAfter);
        return { text: `Too many failed attempts. Try again in ${formatWait(seconds)}.`, wait: seconds };
      }
      return { text: error.message, wait: 0 };
    }
    if (error.code === "token_invalid") {
      return {
        text: "This browser is no longer paired with the relay (the device was revoked). " +
          "Enter the PIN to pair it again.",
        wait: 0,
      };
    }
    if (error.code === "auth_failed" && mode === "pin") return { text: "Wrong PIN. Try again.", wait: 0 };
    if (error.code === "auth_failed") {
      return { text: "The relay no longer takes the PIN this page signed in with. Enter the new PIN.", wait: 0 };
    }
    return { text: error.message, wait: 0 };
  }
  if (error instanceof ConnectionLost && error.closeCode === 1008) {
    return { text: `The relay ended the session: ${error.message}`, wait: 0 };
  }
  if (error instanceof ConnectionLost) return { text: `Could not reach the relay at ${link.url}.`, wait: 0 };
  return { text: `The relay ended the session: ${error ? error.message : "closed"}`, wait: 0 };
}

/** Whether the relay no longer knows this browser's token: forget it. */
function deviceGone(error) {
  if (error instanceof AuthFailed) return error.code === "token_invalid";
  return error instanceof ConnectionLost && error.closeCode === 1008 && /revoked/i.test(error.message);
}

function sessionEnded(error) {
  if (deviceGone(error)) forgetDevice();
  const mode = storedDevice() ? "token" : "pin";
  const { text, wait } = describeFailure(error, mode);
  showLogin({ error: text, wait });
}

/** The sign-in screen: the PIN and a device name, or "paired as ..." with a stored token. */
function showLogin({ error = "", wait = 0 } = {}) {
  resetWorkspace();
  const device = storedDevice();
  const mode = device ? "token" : "pin";
  const form = $("login-form");
  form.dataset.mode = mode;
  $("pin-fields").hidden = mode !== "pin";
  $("pin-help").hidden = mode !== "pin";
  $("paired-fields").hidden = mode !== "token";
  $("use-pin-button").hidden = mode !== "token";
  setText($("paired-name"), device ? device.name || "this browser" : "");
  const nameInput = $("device-name-input");
  if (!nameInput.value.trim()) nameInput.value = proposedDeviceName();
  $("workspace").hidden = true;
  $("login-view").hidden = false;
  const box = $("login-error");
  setText(box, error);
  box.hidden = !error;
  signingIn = false;
  lockoutUntil = wait > 0 ? Date.now() + wait * 1000 : 0;
  renderLockout();
  document.title = "trio-relay";
  renderConnection();
  if (mode === "pin") $("pin-input").focus();
}

function showLoginError(text) {
  const box = $("login-error");
  setText(box, text);
  box.hidden = !text;
}

/** Keeps what the relay said about this device: its token (on pairing), id and name. */
function keepDevice(token) {
  const device = link.session && link.session.device;
  if (!device || typeof device.id !== "string") return;
  const secret = typeof device.token === "string" && device.token ? device.token : token;
  if (!secret) return;
  writeStorage(DEVICE_KEY, { token: secret, id: device.id, name: device.name ?? "" });
}

async function signInWithToken() {
  const device = storedDevice();
  if (!device) {
    showLogin();
    return;
  }
  const attempt = ++signInAttempt;
  showLoginError("");
  signingIn = true;
  renderLoginButton();
  try {
    // Nobody is at the keyboard yet: a relay that is down (restarting) is waited for.
    await link.login({ token: device.token }, { keepTrying: true });
  } catch (error) {
    if (attempt !== signInAttempt) return; // signed out meanwhile
    // A token the relay refuses for any reason but a lockout (token_invalid; bad_request
    // from a relay that does not pair) will not work next time either: back to the PIN.
    if (deviceGone(error) || (error instanceof AuthFailed && error.code !== "locked_out")) {
      forgetDevice();
    }
    const { text, wait } = describeFailure(error, "token");
    showLogin({ error: text, wait });
    return;
  }
  if (attempt !== signInAttempt) return;
  keepDevice(device.token);
  enterWorkspace();
}

async function signInWithPin() {
  const pin = $("pin-input").value;
  const name = $("device-name-input").value.trim();
  if (!pin) {
    showLoginError("Enter the PIN.");
    $("pin-input").focus();
    return;
  }
  const problem = deviceNameProblem(name);
  if (problem) {
    showLoginError(problem);
    $("device-name-input").focus();
    return;
  }
  writeStorage(DEVICE_NAME_KEY, name);
  const attempt = ++signInAttempt;
  showLoginError("");
  signingIn = true;
  renderLoginButton();
  try {
    await link.login({ pin, deviceName: name });
  } catch (error) {
    if (attempt !== signInAttempt) return;
    signingIn = false;
    const { text, wait } = describeFailure(error, "pin");
    showLoginError(text);
    lockoutUntil = wait > 0 ? Date.now() + wait * 1000 : 0;
    renderLockout();
    $("pin-input").select();
    return;
  }
  if (attempt !== signInAttempt) return;
  $("pin-input").value = "";
  keepDevice(null);
  enterWorkspace();
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (signingIn || lockoutUntil > Date.now()) return;
  if ($("login-form").dataset.mode === "token") signInWithToken();
  else signInWithPin();
});

/** Sign out: the connection closes and this browser forgets its token (the relay keeps
 * the device until it is revoked with `trio-relay devices --revoke`). */
function signOut() {
  signInAttempt += 1;
  link.logout();
  forgetDevice();
  showLogin();
}

$("use-pin-button").addEventListener("click", () => signOut());

function enterWorkspace() {
  ui.loggedIn = true;
  ui.device = link.device;
  signingIn = false;
  $("login-view").hidden = true;
  $("workspace").hidden = false;
  renderConnection();
  ui.profilesSub = link.subscribe("modelProfiles", null, {
    onSnapshot(data) {
      ui.profiles = data.modelProfiles ?? [];
      renderProfiles();
    },
    onEvent(data) {
      if (Array.isArray(data.modelProfiles)) ui.profiles = data.modelProfiles;
      renderProfiles();
    },
  });
  ui.wanted = parseHash();
  const wanted = ui.wanted && ui.projects.some((p) => p.id === ui.wanted.projectId);
  selectProject(wanted ? ui.wanted.projectId : ui.projects[0]?.id ?? null);
}

// --- the URL: #/<project>/<chat> -------------------------------------------------------

function parseHash() {
  const parts = window.location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  if (parts.length === 0) return null;
  try {
    return { projectId: decodeURIComponent(parts[0]), chatId: parts[1] ? decodeURIComponent(parts[1]) : null };
  } catch {
    return null;
  }
}

function writeHash() {
  let hash = "";
  if (ui.projectId) hash = `#/${encodeURIComponent(ui.projectId)}`;
  if (ui.projectId && ui.chatId) hash += `/${encodeURIComponent(ui.chatId)}`;
  if (window.location.hash !== hash) {
    window.history.replaceState(null, "", hash || window.location.pathname);
  }
}

window.addEventListener("hashchange", () => {
  if (!ui.loggedIn) return;
  const wanted = parseHash();
  if (!wanted) return;
  if (wanted.projectId !== ui.projectId) {
    ui.wanted = wanted;
    selectProject(wanted.projectId);
  } else if (wanted.chatId && wanted.chatId !== ui.chatId) {
    selectChat(wanted.chatId);
  }
});

// --- projects ----------------------------------------------------------------------------

function renderProjects() {
  const list = $("project-list");
  list.replaceChildren(
    ...ui.projects.map((project) => {
      const selected = project.id === ui.projectId;
      const button = h(
        "button",
        { class: "nav-item", type: "button", "aria-current": selected ? "true" : null },
        h("span", { class: "nav-item__title" }, project.name || project.id),
      );
      button.addEventListener("click", () => selectProject(project.id));
      return h(
        "li",
        { "data-testid": "project-item", "data-project-id": project.id, "data-selected": selected ? "true" : "false" },
        button,
      );
    }),
  );
  $("project-list-empty").hidden = ui.projects.length > 0;
}

function selectProject(projectId) {
  if (ui.projectSub) ui.projectSub.close();
  ui.projectSub = null;
  selectChat(null);
  ui.projectId = projectId;
  ui.chats = [];
  ui.chatsReady = false;
  renderProjects();
  renderChats();
  writeHash();
  if (!projectId) return;
  const sub = link.subscribe("project", projectId, {
    onSnapshot(data) {
      ui.chats = Array.isArray(data.chats) ? [...data.chats] : [];
      ui.chatsReady = true;
      if (ui.chatId && !ui.chats.some((chat) => chat.id === ui.chatId)) markChatGone();
      renderChats();
      renderChatHeader();
      const wanted = ui.wanted;
      if (wanted && wanted.projectId === projectId) {
        ui.wanted = null;
        if (wanted.chatId && ui.chats.some((chat) => chat.id === wanted.chatId)) {
          selectChat(wanted.chatId);
        }
      }
      // Nothing asked for: open the chat this browser had open last in the project, else
      // its first one (on a fresh install, the demo project's welcome chat).
      if (!ui.chatId && ui.chats.length > 0) {
        const last = (readStorage(LAST_CHATS_KEY) ?? {})[projectId];
        const known = ui.chats.some((chat) => chat.id === last);
        selectChat(known ? last : ui.chats[0].id);
      }
    },
    onEvent(data) {
      applyProjectEvent(data);
    },
    onComplete() {
      notice("This project's chat list is no longer being updated.");
    },
    onInterrupted(error) {
      notice(`Lost the chat list's updates (${error.message}); catching up…`);
    },
    onError(error) {
      if (!link.error) notice(`Could not watch the project: ${error.message}`);
    },
  });
  ui.projectSub = sub;
}

function applyProjectEvent(data) {
  if (!data || typeof data !== "object") return;
  if ((data.type === "chat_created" || data.type === "chat_renamed") && data.chat) {
    upsertChat(data.chat);
  } else if (data.type === "chat_deleted") {
    ui.chats = ui.chats.filter((chat) => chat.id !== data.chatId);
    if (data.chatId === ui.chatId) markChatGone();
  }
  renderChats();
  renderChatHeader();
}

function upsertChat(chat) {
  const index = ui.chats.findIndex((c) => c.id === chat.id);
  if (index >= 0) ui.chats[index] = chat;
  else ui.chats.push(chat);
}

// --- chats -------------------------------------------------------------------------------

function renderChats() {
  const list = $("chat-list");
  list.replaceChildren(
    ...ui.chats.map((chat) => {
      const selected = chat.id === ui.chatId;
      const button = h(
        "button",
        { class: "nav-item", type: "button", "aria-current": selected ? "true" : null },
        h("span", { class: "nav-item__title" }, chat.title || "Untitled"),
        h("span", { class: "nav-item__meta" }, profileName(chat.modelProfileId)),
      );
      button.addEventListener("click", () => pickChat(chat.id));
      return h(
        "li",
        { "data-testid": "chat-item", "data-chat-id": chat.id, "data-selected": selected ? "true" : "false" },
        button,
      );
    }),
  );
  $("chat-list-empty").hidden = !ui.chatsReady || ui.chats.length > 0;
  $("new-chat-button").disabled = !ui.projectId;
}

/** A chat chosen in the list: open it (the list, a drawer on a phone, closes). */
function pickChat(chatId) {
  closeDrawer();
  if (chatId === ui.chatId && !ui.chatGone) return; // open already
  selectChat(chatId);
}

function rememberChat(projectId, chatId) {
  const last = readStorage(LAST_CHATS_KEY);
  const chats = last && typeof last === "object" && !Array.isArray(last) ? last : {};
  if (chats[projectId] === chatId) return;
  chats[projectId] = chatId;
  writeStorage(LAST_CHATS_KEY, chats);
}

function selectChat(chatId) {
  if (ui.chatSub) ui.chatSub.close();
  ui.chatSub = null;
  ui.chatId = chatId;
  ui.messages = [];
  ui.streaming.clear();
  ui.chatReady = false;
  ui.chatGone = false;
  ui.sync = "";
  $("message-list").replaceChildren();
  renderChats();
  renderChatHeader();
  renderMessages();
  writeHash();
  if (!chatId) return;
  if (ui.projectId) rememberChat(ui.projectId, chatId);
  ui.chatSub = link.subscribe("chat", chatId, {
    onSnapshot(data, { reset }) {
      // The whole history: replace what we held (after a reset, it was incomplete).
      ui.messages = Array.isArray(data.messages) ? [...data.messages] : [];
      ui.streaming.clear();
      ui.chatReady = true;
      ui.sync = reset ? "reset" : "snapshot";
      renderMessages({ scroll: true });
    },
    onResumed() {
      ui.sync = "resumed"; // the missed pushes follow, as events
      renderMessages();
    },
    onEvent(data) {
      applyChatEvent(data);
      renderMessages();
    },
    onComplete() {
      markChatGone();
    },
    onInterrupted(error) {
      notice(`Lost the chat's updates (${error.message}); catching up…`);
    },
    onError(error) {
      if (link.error) return; // the session is over: the PIN prompt says why
      if (error.code === "not_found") markChatGone();
      else notice(`Could not watch the chat: ${error.message}`);
    },
  });
  // Straight to writing on a desktop; on a phone that would pop the keyboard over the chat.
  if (!narrowScreen.matches) $("message-input").focus();
}

function markChatGone() {
  if (!ui.chatId) return;
  ui.chatGone = true;
  if (ui.chatSub) ui.chatSub.close();
  ui.chatSub = null;
  renderChatHeader();
  renderComposer();
}

function applyChatEvent(data) {
  if (!data || typeof data !== "object") return;
  const streamed = (id) => {
    let entry = ui.streaming.get(id);
    if (!entry) {
      // A reply we joined halfway (or after a reset): it restarts from this chunk.
      entry = { text: "", status: "streaming", error: null };
      ui.streaming.set(id, entry);
    }
    return entry;
  };
  switch (data.type) {
    case "message": {
      const message = data.message;
      if (!message || typeof message !== "object") return;
      if (!ui.messages.some((m) => m.id === message.id)) ui.messages.push(message);
      ui.streaming.delete(message.id);
      break;
    }
    case "reply_started":
      ui.streaming.set(data.messageId, { text: "", status: "streaming", error: null });
      break;
    case "chunk":
      streamed(data.messageId).text += typeof data.text === "string" ? data.text : "";
      break;
    case "error": {
      const entry = streamed(data.messageId);
      entry.status = "error";
      entry.error = typeof data.error === "string" ? data.error : "the agent failed";
      break;
    }
    case "cancelled":
      streamed(data.messageId).status = "cancelled";
      break;
    default:
      break; // another backend's events: nothing to show
  }
}

function renderChatHeader() {
  const chat = currentChat();
  let title = "No chat selected";
  if (ui.chatId) title = chat ? chat.title || "Untitled" : "Chat";
  setText($("chat-title"), title);
  setText($("chat-profile"), chat ? profileName(chat.modelProfileId) : "");
  document.title = ui.chatId ? `${title} · trio-relay` : "trio-relay";
  let placeholder = "";
  if (!ui.loggedIn) placeholder = "";
  else if (!ui.projectId) placeholder = "There is no project to show.";
  else if (!ui.chatId) placeholder = "Pick a chat, or start a new one.";
  else if (ui.chatGone) placeholder = "This chat was deleted.";
  else if (!ui.chatReady) placeholder = "Loading…";
  else if (ui.messages.length === 0 && ui.streaming.size === 0) placeholder = "No messages yet. Say something!";
  setText($("chat-placeholder"), placeholder);
  $("chat-placeholder").hidden = !placeholder;
}

// --- messages ----------------------------------------------------------------------------

function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return ["", ""];
  return [date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }), date.toLocaleString()];
}

const STATUS_TEXT = { streaming: "typing…", error: "failed", cancelled: "stopped" };

/**
 * Who wrote a user message: "You" when it came from this browser's device, else the
 * sender's name; a message stored before senders existed (no `sender`) stays "You".
 */
function authorOf(message) {
  const sender = message.sender;
  if (!sender || typeof sender !== "object") return { name: "You", own: true };
  if (typeof sender.deviceId === "string" && ui.device && sender.deviceId === ui.device.id) {
    return { name: "You", own: true };
  }
  const name = typeof sender.name === "string" && sender.name.trim() ? sender.name.trim() : "Someone";
  return { name, own: false };
}

// A message's text is rendered as markdown when it changes; a streamed reply changes with
// every chunk, so its renders are batched: at most one per animation frame.
const renderedText = new WeakMap(); // content element -> the text it shows
const pendingRenders = new Map(); // content element -> the text it is to show
let renderFrame = null;

function showText(content, text, { now }) {
  if (now) {
    pendingRenders.delete(content);
    if (renderedText.get(content) !== text) {
      renderMarkdown(content, text);
      renderedText.set(content, text);
    }
    return;
  }
  if (renderedText.get(content) === text) {
    pendingRenders.delete(content);
    return;
  }
  pendingRenders.set(content, text);
  if (renderFrame === null) renderFrame = requestAnimationFrame(flushRenders);
}

function flushRenders() {
  renderFrame = null;
  const scroller = $("message-scroll");
  const nearBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
  for (const [content, text] of pendingRenders) {
    if (!content.isConnected) continue;
    renderMarkdown(content, text);
    renderedText.set(content, text);
  }
  pendingRenders.clear();
  if (nearBottom) scroller.scrollTop = scroller.scrollHeight;
}

function messageElement(item) {
  const author = h("span", { class: "msg__author", "data-testid": "message-author" });
  const time = h("time", { class: "msg__time" });
  const status = h("span", { class: "msg__status", "data-testid": "message-status" });
  const content = h("div", { class: "msg__content", "data-testid": "message-content" });
  const error = h("div", { class: "msg__error", "data-testid": "message-error", hidden: true });
  return h(
    "li",
    { class: "msg", "data-testid": "message", "data-message-id": item.id },
    h("div", { class: "msg__avatar", "aria-hidden": "true" }),
    h("div", { class: "msg__body" }, h("div", { class: "msg__meta" }, author, time, status), content, error),
  );
}

function updateMessage(li, item, agentName) {
  li.dataset.role = item.role;
  li.dataset.status = item.status;
  const author = item.role === "user" ? authorOf(item) : { name: agentName, own: false };
  li.dataset.own = author.own ? "true" : "false";
  // Your own messages on the right; everyone else's, people's and agents', on the left.
  const side = item.role !== "user" ? "agent" : author.own ? "user" : "other";
  li.className = `msg msg--${side} msg--${item.status}`;
  const name = author.name;
  setText(li.querySelector(".msg__avatar"), name.slice(0, 1).toUpperCase());
  setText(li.querySelector(".msg__author"), name);
  const [short, long] = item.createdAt ? formatTime(item.createdAt) : ["", ""];
  const time = li.querySelector(".msg__time");
  setText(time, short);
  if (item.createdAt) time.setAttribute("datetime", item.createdAt);
  time.title = long;
  setText(li.querySelector(".msg__status"), STATUS_TEXT[item.status] ?? "");
  showText(li.querySelector(".msg__content"), item.text, { now: item.status !== "streaming" });
  const error = li.querySelector(".msg__error");
  error.hidden = !item.error;
  setText(error, item.error ? `The agent's answer failed: ${item.error}` : "");
}

/** Markdown for a JSON code block, fenced past any run of backticks inside it. */
function jsonBlock(value) {
  const json = JSON.stringify(value, null, 2) ?? String(value);
  const longest = Math.max(0, ...(json.match(/`+/g) ?? []).map((run) => run.length));
  const fence = "`".repeat(Math.max(3, longest + 1));
  return `${fence}json\n${json}\n${fence}`;
}

$("message-list").addEventListener("click", async (event) => {
  const button = event.target instanceof Element ? event.target.closest(".code__copy") : null;
  if (!button) return;
  const copied = await copyCode(button);
  button.dataset.copied = copied ? "yes" : "no";
  setTimeout(() => delete button.dataset.copied, 1500);
});

/** Brings the list in line with the state, touching only what changed (keyed by id). */
function renderMessages({ scroll = false } = {}) {
  const list = $("message-list");
  list.dataset.sync = ui.sync;
  const scroller = $("message-scroll");
  const nearBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
  const stored = new Set(ui.messages.map((m) => m.id));
  const items = ui.messages.map((m) => ({
    id: m.id,
    role: m.role,
    sender: m.sender,
    // Content that is not text (another backend's) is shown as the JSON it is.
    text: typeof m.content === "string" ? m.content : jsonBlock(m.content),
    createdAt: m.createdAt,
    status: "stored",
    error: null,
  }));
  for (const [id, entry] of ui.streaming) {
    if (stored.has(id)) continue;
    items.push({ id, role: "assistant", text: entry.text, createdAt: null, status: entry.status, error: entry.error });
  }
  const chat = currentChat();
  const agentName = chat ? profileName(chat.modelProfileId) : "Agent";
  const existing = new Map([...list.children].map((li) => [li.dataset.messageId, li]));
  let cursor = list.firstElementChild;
  for (const item of items) {
    let li = existing.get(item.id);
    if (li) existing.delete(item.id);
    else li = messageElement(item);
    updateMessage(li, item, agentName);
    if (li === cursor) cursor = cursor.nextElementSibling;
    else list.insertBefore(li, cursor);
  }
  for (const li of existing.values()) li.remove();
  if (scroll || nearBottom) scroller.scrollTop = scroller.scrollHeight;
  renderChatHeader();
  renderComposer();
}

// --- composing ---------------------------------------------------------------------------

function renderComposer() {
  const canWrite = ui.loggedIn && ui.chatId !== null && !ui.chatGone;
  const connected = link.state === State.CONNECTED;
  const input = $("message-input");
  input.disabled = !canWrite;
  $("send-button").disabled = !canWrite || !connected || input.value.trim() === "";
  const running = [...ui.streaming.values()].some((entry) => entry.status === "streaming");
  $("cancel-button").hidden = !(canWrite && running);
  $("cancel-button").disabled = !connected;
}

$("message-input").addEventListener("input", renderComposer);
$("message-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("message-input");
  const text = input.value.trim();
  const chatId = ui.chatId;
  if (!text || !chatId || link.state !== State.CONNECTED) return;
  input.value = "";
  renderComposer();
  try {
    // The message itself comes back through the chat's subscription, like everyone's.
    await link.send(chatId, text);
  } catch (error) {
    if (error instanceof RequestRejected) {
      // Refused by the relay: it was not stored, so the text goes back in the box.
      if (input.value === "" && ui.chatId === chatId) input.value = text;
      renderComposer();
      notice(`Message not sent: ${error.message}`);
    } else {
      // The connection dropped or the answer was late: the relay may have stored it (it
      // then shows up in the chat). Not restored, so that sending again is a choice.
      renderComposer();
      notice(`The message may not have been sent (${error.message}): check the chat.`);
    }
  }
});

$("cancel-button").addEventListener("click", async () => {
  if (!ui.chatId) return;
  try {
    await link.cancelReply(ui.chatId);
  } catch (error) {
    notice(`Could not stop the answer: ${error.message}`);
  }
});

// --- new chat ----------------------------------------------------------------------------

function renderProfiles() {
  const select = $("new-chat-profile");
  const chosen = select.value;
  select.replaceChildren(...ui.profiles.map((p) => h("option", { value: p.id }, p.name || p.id)));
  if (ui.profiles.some((p) => p.id === chosen)) select.value = chosen;
  renderChats();
  renderChatHeader();
}

$("new-chat-button").addEventListener("click", () => {
  const form = $("new-chat-form");
  form.hidden = !form.hidden;
  if (!form.hidden) $("new-chat-title").focus();
});

$("new-chat-cancel").addEventListener("click", () => {
  $("new-chat-form").hidden = true;
  $("new-chat-title").value = "";
});

$("new-chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const projectId = ui.projectId;
  if (!projectId) return;
  const create = $("new-chat-create");
  create.disabled = true;
  try {
    const chat = await link.createChat(projectId, {
      title: $("new-chat-title").value.trim(),
      modelProfileId: $("new-chat-profile").value,
    });
    $("new-chat-form").hidden = true;
    $("new-chat-title").value = "";
    if (ui.projectId === projectId && chat && chat.id) {
      upsertChat(chat); // the project's push may come before or after this reply
      closeDrawer();
      selectChat(chat.id);
    }
  } catch (error) {
    notice(`Could not create the chat: ${error.message}`);
  } finally {
    create.disabled = false;
  }
});

// --- phone-sized screens ---------------------------------------------------------------
//
// Below 720 px the chat takes the whole width and the chat list is a drawer, opened by the
// "Chats" button in the chat's header and closed by a choice, the backdrop, × or Escape.

function openDrawer() {
  $("workspace").dataset.drawer = "open";
  $("chats-toggle").setAttribute("aria-expanded", "true");
  $("drawer-backdrop").hidden = false;
  const target = document.querySelector('[data-testid="chat-item"][data-selected="true"] button')
    ?? document.querySelector('[data-testid="chat-item"] button')
    ?? $("drawer-close");
  target.focus();
}

function closeDrawer() {
  const wasOpen = $("workspace").dataset.drawer === "open";
  $("workspace").dataset.drawer = "closed";
  $("chats-toggle").setAttribute("aria-expanded", "false");
  $("drawer-backdrop").hidden = true;
  if (wasOpen && narrowScreen.matches && $("sidebar").contains(document.activeElement)) {
    $("chats-toggle").focus();
  }
}

$("chats-toggle").addEventListener("click", () => {
  if ($("workspace").dataset.drawer === "open") closeDrawer();
  else openDrawer();
});
$("drawer-close").addEventListener("click", () => closeDrawer());
$("drawer-backdrop").addEventListener("click", () => closeDrawer());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && $("workspace").dataset.drawer === "open") closeDrawer();
});
// The keyboard hint would not fit a phone's two-line box (nor help on a touch keyboard).
function fitPlaceholder() {
  $("message-input").placeholder = narrowScreen.matches
    ? "Write a message"
    : "Write a message. Enter sends, Shift+Enter adds a line.";
}

// Widening the window turns the drawer back into a sidebar.
narrowScreen.addEventListener("change", () => {
  closeDrawer();
  fitPlaceholder();
});
fitPlaceholder();

// The page is as tall as what is visible: when an on-screen keyboard covers part of the
// window (and the browser does not resize the page for it), the composer moves up above it.
function fitVisualViewport() {
  const viewport = window.visualViewport;
  if (!viewport || Math.abs(viewport.scale - 1) > 0.01) return; // pinch-zoomed: leave it
  const root = document.documentElement.style;
  root.setProperty("--viewport-height", `${Math.round(viewport.height)}px`);
  root.setProperty("--viewport-top", `${Math.round(viewport.offsetTop)}px`);
}

if (window.visualViewport) {
  window.visualViewport.addEventListener("resize", fitVisualViewport);
  window.visualViewport.addEventListener("scroll", fitVisualViewport);
  fitVisualViewport();
}

// --- start -------------------------------------------------------------------------------

if (typeof navigator !== "undefined" && navigator.onLine === false) link.setOffline(true);
showLogin();
// Paired before: sign in with the token, without asking for anything.
if (storedDevice()) signInWithToken();
