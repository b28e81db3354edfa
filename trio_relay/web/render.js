// render.js: brings the page in line with a state from state.js. It never changes the state
// and calls nothing but the DOM: app.js calls `render(state)` once per animation frame.
//
// Every piece of text from the relay reaches the page through textContent or a text node,
// never through innerHTML; a message's text is shown as markdown by markdown.js, which
// builds the elements itself from an allow-list (a chat message is data, not markup).

import { renderMarkdown } from "./markdown.js";
import {
  canSend,
  canWrite,
  chatPlaceholder,
  chatTitle,
  connected,
  connectionTitle,
  countdownText,
  currentChat,
  lockedOut,
  lockoutText,
  loginButtonText,
  messageItems,
  pageTitle,
  profileName,
  replyRunning,
  retryShown,
} from "./view.js";
import { State } from "./ws-link.js";

const STATE_TEXT = {
  [State.SIGNED_OUT]: "Signed out",
  [State.CONNECTING]: "Connecting…",
  [State.CONNECTED]: "Connected",
  [State.RECONNECTING]: "Reconnecting…",
  [State.OFFLINE]: "Offline",
  [State.CLOSED]: "Disconnected",
};

const STATUS_TEXT = { streaming: "typing…", error: "failed", cancelled: "stopped" };

/** The element with this data-testid (every element the page updates has one). */
export function byTestId(doc, testid) {
  return doc.querySelector(`[data-testid="${testid}"]`);
}

/** A new element: `h(doc, "li", {class: "x", "data-id": id}, "text", child)`. Strings become text. */
function h(doc, tag, attributes = {}, ...children) {
  const node = doc.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "object" ? child : String(child));
  }
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function setHidden(node, hidden) {
  if (node.hidden !== hidden) node.hidden = hidden;
}

function setDisabled(node, disabled) {
  if (node.disabled !== disabled) node.disabled = disabled;
}

function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return ["", ""];
  return [date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }), date.toLocaleString()];
}

/**
 * A renderer for `doc`. What it keeps is only what it last drew (to touch only what
 * changed); the state stays with the caller.
 */
export function createRenderer(doc) {
  const $ = (testid) => byTestId(doc, testid);
  let drawn = {}; // the parts of the last state drawn, compared by identity
  const shownText = new WeakMap(); // message content element -> the text it shows
  const shownItem = new WeakMap(); // message element -> the key of the item it shows

  /** Whether any of `parts` differs from what `name` was drawn from (and remember them). */
  function changed(name, ...parts) {
    const before = drawn[name];
    if (before && before.length === parts.length && before.every((part, i) => part === parts[i])) return false;
    drawn[name] = parts;
    return true;
  }

  function renderConnection(state) {
    const box = $("connection-state");
    box.dataset.state = state.connection.state;
    // The state word is in a live region; the countdown beside it is not, or a screen
    // reader would announce every tick.
    setText($("connection-text"), STATE_TEXT[state.connection.state] ?? state.connection.state);
    setText($("connection-countdown"), countdownText(state));
    box.title = connectionTitle(state);
    setHidden($("retry-button"), !retryShown(state));
    setHidden($("logout-button"), !state.loggedIn);
  }

  function renderLogin(state) {
    const { login } = state;
    setHidden($("login-view"), state.loggedIn);
    setHidden($("workspace"), !state.loggedIn);
    $("login-form").dataset.mode = login.mode;
    setHidden($("pin-fields"), login.mode !== "pin");
    setHidden($("pin-help"), login.mode !== "pin");
    setHidden($("paired-fields"), login.mode !== "token");
    setHidden($("use-pin-button"), login.mode !== "token");
    setText($("paired-name"), login.mode === "token" ? login.pairedName || "this browser" : "");
    setText($("login-error"), login.error);
    setHidden($("login-error"), !login.error);
    const wait = lockoutText(state);
    if (wait) setText($("login-wait"), wait);
    setHidden($("login-wait"), !wait);
    const button = $("login-button");
    setDisabled(button, login.signingIn || lockedOut(state));
    setText(button, loginButtonText(state));
  }

  function renderProjects(state) {
    if (!changed("projects", state.projects, state.project.id)) return;
    $("project-list").replaceChildren(
      ...state.projects.map((project) => {
        const selected = project.id === state.project.id;
        return h(
          doc,
          "li",
          { "data-testid": "project-item", "data-project-id": project.id, "data-selected": selected ? "true" : "false" },
          h(
            doc,
            "button",
            { class: "nav-item", type: "button", "aria-current": selected ? "true" : null },
            h(doc, "span", { class: "nav-item__title" }, project.name || project.id),
          ),
        );
      }),
    );
    setHidden($("project-list-empty"), state.projects.length > 0);
  }

  function renderChats(state) {
    setHidden($("chat-list-empty"), !state.project.ready || state.project.chats.length > 0);
    setDisabled($("new-chat-button"), !state.project.id);
    if (!changed("chats", state.project.chats, state.chat.id, state.profiles)) return;
    $("chat-list").replaceChildren(
      ...state.project.chats.map((chat) => {
        const selected = chat.id === state.chat.id;
        return h(
          doc,
          "li",
          { "data-testid": "chat-item", "data-chat-id": chat.id, "data-selected": selected ? "true" : "false" },
          h(
            doc,
            "button",
            { class: "nav-item", type: "button", "aria-current": selected ? "true" : null },
            h(doc, "span", { class: "nav-item__title" }, chat.title || "Untitled"),
            h(doc, "span", { class: "nav-item__meta" }, profileName(state, chat.modelProfileId)),
          ),
        );
      }),
    );
  }

  function renderNewChat(state) {
    setHidden($("new-chat-form"), !state.newChat.open);
    setDisabled($("new-chat-create"), state.newChat.creating);
    if (!changed("profiles", state.profiles)) return;
    const select = $("new-chat-profile");
    const chosen = select.value;
    select.replaceChildren(...state.profiles.map((p) => h(doc, "option", { value: p.id }, p.name || p.id)));
    if (state.profiles.some((p) => p.id === chosen)) select.value = chosen;
  }

  function renderChatHeader(state) {
    const chat = currentChat(state);
    setText($("chat-title"), chatTitle(state));
    setText($("chat-profile"), chat ? profileName(state, chat.modelProfileId) : "");
    const title = pageTitle(state);
    if (doc.title !== title) doc.title = title;
    const placeholder = chatPlaceholder(state);
    setText($("chat-placeholder"), placeholder);
    setHidden($("chat-placeholder"), !placeholder);
  }

  function messageElement(item) {
    const author = h(doc, "span", { class: "msg__author", "data-testid": "message-author" });
    const time = h(doc, "time", { class: "msg__time" });
    const status = h(doc, "span", { class: "msg__status", "data-testid": "message-status" });
    const content = h(doc, "div", { class: "msg__content", "data-testid": "message-content" });
    const error = h(doc, "div", { class: "msg__error", "data-testid": "message-error", hidden: true });
    return h(
      doc,
      "li",
      { class: "msg", "data-testid": "message", "data-message-id": item.id },
      h(doc, "div", { class: "msg__avatar", "aria-hidden": "true" }),
      h(doc, "div", { class: "msg__body" }, h(doc, "div", { class: "msg__meta" }, author, time, status), content, error),
    );
  }

  function updateMessage(li, item) {
    const key = [item.source, item.author.name, item.author.own];
    const before = shownItem.get(li);
    if (before && before.every((part, i) => part === key[i])) return; // unchanged
    shownItem.set(li, key);
    li.dataset.role = item.role;
    li.dataset.status = item.status;
    li.dataset.own = item.author.own ? "true" : "false";
    // Your own messages on the right; everyone else's, people's and agents', on the left.
    const side = item.role !== "user" ? "agent" : item.author.own ? "user" : "other";
    li.className = `msg msg--${side} msg--${item.status}`;
    const name = item.author.name;
    setText(li.querySelector(".msg__avatar"), name.slice(0, 1).toUpperCase());
    setText(li.querySelector(".msg__author"), name);
    const [short, long] = item.createdAt ? formatTime(item.createdAt) : ["", ""];
    const time = li.querySelector(".msg__time");
    setText(time, short);
    if (item.createdAt) time.setAttribute("datetime", item.createdAt);
    time.title = long;
    setText(li.querySelector(".msg__status"), STATUS_TEXT[item.status] ?? "");
    // Rendered as markdown when it changes: a streamed reply at most once per frame, as
    // the whole page is.
    const content = li.querySelector(".msg__content");
    if (shownText.get(content) !== item.text) {
      renderMarkdown(content, item.text);
      shownText.set(content, item.text);
    }
    const error = li.querySelector(".msg__error");
    error.hidden = !item.error;
    setText(error, item.error ? `The agent's answer failed: ${item.error}` : "");
  }

  /** Brings the list in line with the state, touching only what changed (keyed by id). */
  function renderMessages(state) {
    const list = $("message-list");
    if (changed("chat-generation", state.chat.generation)) list.replaceChildren();
    list.dataset.sync = state.chat.sync;
    const snapshot = changed("snapshots", state.chat.generation, state.chat.snapshots);
    if (!changed("messages", state.chat.messages, state.chat.streaming, state.project.chats, state.profiles, state.device) && !snapshot) {
      return;
    }
    const scroller = $("message-scroll");
    const nearBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
    const existing = new Map([...list.children].map((li) => [li.dataset.messageId, li]));
    let cursor = list.firstElementChild;
    for (const item of messageItems(state)) {
      let li = existing.get(item.id);
      if (li) existing.delete(item.id);
      else li = messageElement(item);
      updateMessage(li, item);
      if (li === cursor) cursor = cursor.nextElementSibling;
      else list.insertBefore(li, cursor);
    }
    for (const li of existing.values()) li.remove();
    // A new snapshot is read from its end; otherwise the end is followed if it was in view.
    if ((snapshot && state.chat.snapshots > 0) || nearBottom) scroller.scrollTop = scroller.scrollHeight;
  }

  function renderComposer(state) {
    const input = $("message-input");
    setDisabled(input, !canWrite(state));
    if (input.value !== state.draft) input.value = state.draft;
    // The keyboard hint would not fit a phone's two-line box (nor help on a touch keyboard).
    const placeholder = state.narrow ? "Write a message" : "Write a message. Enter sends, Shift+Enter adds a line.";
    if (input.placeholder !== placeholder) input.placeholder = placeholder;
    setDisabled($("send-button"), !canSend(state));
    setHidden($("cancel-button"), !(canWrite(state) && replyRunning(state)));
    setDisabled($("cancel-button"), !connected(state));
  }

  function renderDrawer(state) {
    const open = state.loggedIn && state.drawerOpen;
    $("workspace").dataset.drawer = open ? "open" : "closed";
    $("chats-toggle").setAttribute("aria-expanded", open ? "true" : "false");
    setHidden($("drawer-backdrop"), !open);
  }

  function renderNotice(state) {
    const text = state.notice?.text ?? null;
    if (text) setText($("notice-text"), text);
    setHidden($("notice"), !text);
  }

  return {
    render(state) {
      renderConnection(state);
      renderLogin(state);
      renderProjects(state);
      renderChats(state);
      renderNewChat(state);
      renderChatHeader(state);
      renderMessages(state);
      renderComposer(state);
      renderDrawer(state);
      renderNotice(state);
    },
    /** Forget what was drawn: the next render draws everything. */
    reset() {
      drawn = {};
    },
  };
}
