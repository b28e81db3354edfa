// app.js: the page. It keeps the state that ws-link's events describe and renders it.
//
// Every piece of text from the relay reaches the page through textContent or a text node,
// never through innerHTML: a chat message is data, not markup.

import {
  AuthFailed,
  ConnectionLost,
  RelayLink,
  RequestRejected,
  State,
  relayUrl,
} from "./ws-link.js";

const link = new RelayLink(relayUrl(window.location));

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
  if (state === State.CLOSED) {
    // The relay ended the session for good (PIN changed, lockout, abuse): log in again.
    showLogin(`The relay ended the session: ${link.error ? link.error.message : "closed"}`);
  }
});

link.on("session", (session) => {
  ui.projects = Array.isArray(session.projects) ? session.projects : [];
  if (!ui.profilesSub) ui.profiles = session.modelProfiles ?? [];
  renderProjects();
  renderProfiles();
  if (ui.loggedIn && ui.projectId && !ui.projects.some((p) => p.id === ui.projectId)) {
    selectProject(ui.projects[0]?.id ?? null);
  }
});

link.on("retry", renderConnection);
link.on("error", (error) => console.warn("[app]", error));

$("retry-button").addEventListener("click", () => link.reconnectNow());
$("logout-button").addEventListener("click", () => {
  link.logout();
  showLogin("");
});

window.addEventListener("online", () => link.setOffline(false));
window.addEventListener("offline", () => link.setOffline(true));
document.addEventListener("visibilitychange", () => {
  // Background tabs run timers late: do not make someone who comes back wait for one.
  if (document.visibilityState === "visible" && link.state === State.RECONNECTING) {
    link.reconnectNow();
  }
});

// --- login -------------------------------------------------------------------------------

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
}

function showLogin(error) {
  resetWorkspace();
  $("workspace").hidden = true;
  $("login-view").hidden = false;
  const box = $("login-error");
  setText(box, error);
  box.hidden = !error;
  $("login-button").disabled = false;
  setText($("login-button"), "Connect");
  document.title = "trio-relay";
  renderConnection();
  $("pin-input").focus();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("pin-input");
  const pin = input.value;
  const errorBox = $("login-error");
  if (!pin) {
    setText(errorBox, "Enter the PIN.");
    errorBox.hidden = false;
    return;
  }
  errorBox.hidden = true;
  const button = $("login-button");
  button.disabled = true;
  setText(button, "Checking…");
  try {
    await link.login(pin);
  } catch (error) {
    button.disabled = false;
    setText(button, "Connect");
    let text;
    if (error instanceof AuthFailed) {
      text = error.message === "Invalid PIN" ? "Wrong PIN. Try again." : error.message;
    } else if (error instanceof ConnectionLost && error.closeCode === 1008) {
      text = `The relay refused the connection: ${error.message}`;
    } else {
      text = `Could not reach the relay at ${link.url}.`;
    }
    setText(errorBox, text);
    errorBox.hidden = false;
    input.select();
    return;
  }
  input.value = "";
  enterWorkspace();
});

function enterWorkspace() {
  ui.loggedIn = true;
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
      button.addEventListener("click", () => selectChat(chat.id));
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
  $("message-input").focus();
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

function messageElement(item) {
  const author = h("span", { class: "msg__author" });
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
  li.className = `msg msg--${item.role === "user" ? "user" : "agent"} msg--${item.status}`;
  const name = item.role === "user" ? "You" : agentName;
  setText(li.querySelector(".msg__avatar"), name.slice(0, 1).toUpperCase());
  setText(li.querySelector(".msg__author"), name);
  const [short, long] = item.createdAt ? formatTime(item.createdAt) : ["", ""];
  const time = li.querySelector(".msg__time");
  setText(time, short);
  if (item.createdAt) time.setAttribute("datetime", item.createdAt);
  time.title = long;
  setText(li.querySelector(".msg__status"), STATUS_TEXT[item.status] ?? "");
  setText(li.querySelector(".msg__content"), item.text);
  const error = li.querySelector(".msg__error");
  error.hidden = !item.error;
  setText(error, item.error ? `The agent's answer failed: ${item.error}` : "");
}

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
    text: typeof m.content === "string" ? m.content : JSON.stringify(m.content),
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
      selectChat(chat.id);
    }
  } catch (error) {
    notice(`Could not create the chat: ${error.message}`);
  } finally {
    create.disabled = false;
  }
});

// --- start -------------------------------------------------------------------------------

if (typeof navigator !== "undefined" && navigator.onLine === false) link.setOffline(true);
showLogin("");
