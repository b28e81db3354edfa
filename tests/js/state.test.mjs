// The web client's state (trio_relay/web/state.js): what each push and each user action
// makes of it, and what the page shows of it (view.js), without a page. Run by tests/test_web_state.py, or `node --test tests/js/`.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { initialState, reduce } from "../../trio_relay/web/state.js";
import {
  authorOf,
  canSend,
  chatPlaceholder,
  chatTitle,
  countdownText,
  describeFailure,
  deviceGone,
  formatWait,
  hashOf,
  jsonBlock,
  lockedOut,
  lockoutText,
  loginButtonText,
  messageItems,
  needsTicking,
  pageTitle,
  parseHash,
  replyRunning,
  retryShown,
} from "../../trio_relay/web/view.js";

const PROJECTS = [{ id: "demo", name: "Demo project" }, { id: "work", name: "Work" }];
const PROFILES = [{ id: "echo", name: "Echo" }];
const CHATS = [
  { id: "welcome", title: "Welcome", modelProfileId: "echo" },
  { id: "second", title: "", modelProfileId: "echo" },
];
const ME = { id: "d_me", name: "Laptop" };

/** Applies `events` in order; the state given is never changed (it is frozen, deeply). */
function run(state, ...events) {
  for (const event of events) {
    deepFreeze(state);
    state = reduce(state, event);
  }
  return state;
}

function deepFreeze(value) {
  if (value && typeof value === "object" && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const inner of Object.values(value)) deepFreeze(inner);
  }
  return value;
}

/** Signed in, in the demo project, its chat list in, the welcome chat open and loaded. */
function inChat(messages = []) {
  let state = run(
    initialState({ now: 1000 }),
    { type: "session", projects: PROJECTS, modelProfiles: PROFILES, device: ME },
    { type: "signin-started" },
  );
  state = run(state, { type: "signed-in", attempt: state.login.attempt, device: ME });
  state = run(state, { type: "chats-snapshot", generation: state.project.generation, chats: CHATS });
  return run(state, { type: "chat-snapshot", generation: state.chat.generation, messages });
}

function chatEvent(state, data) {
  return reduce(deepFreeze(state), { type: "chat-event", generation: state.chat.generation, data });
}

const message = (id, content, extra = {}) => ({ id, role: "assistant", content, createdAt: "2026-12-08T01:00:00Z", ...extra });

describe("signing in", () => {
  test("the page starts signed out, on the PIN screen", () => {
    const state = initialState();
    assert.equal(state.loggedIn, false);
    assert.equal(state.login.mode, "pin");
    assert.equal(state.connection.state, "signed-out");
    assert.equal(loginButtonText(state), "Connect");
    assert.equal(pageTitle(state), "trio-relay");
  });

  test("a paired browser's screen names the device", () => {
    const state = run(initialState(), { type: "login-shown", mode: "token", pairedName: "Desk" });
    assert.equal(state.login.mode, "token");
    assert.equal(state.login.pairedName, "Desk");
  });

  test("signing in says so on the button, in the words of the mode", () => {
    const pin = run(initialState(), { type: "signin-started" });
    assert.equal(pin.login.signingIn, true);
    assert.equal(loginButtonText(pin), "Checking…");
    const token = run(initialState(), { type: "login-shown", mode: "token" }, { type: "signin-started" });
    assert.equal(loginButtonText(token), "Signing in…");
  });

  test("a failed sign-in shows why and starts the lockout's wait", () => {
    let state = run(initialState({ now: 10_000 }), { type: "signin-started" });
    state = run(state, {
      type: "signin-failed", attempt: state.login.attempt, text: "Too many", wait: 42, now: 10_000,
    });
    assert.equal(state.login.signingIn, false);
    assert.equal(state.login.error, "Too many");
    assert.equal(lockedOut(state), true);
    assert.equal(lockoutText(state), "You can try again in 0:42.");
    assert.equal(needsTicking(state), true);
    const later = run(state, { type: "tick", now: 10_000 + 41_500 });
    assert.equal(lockoutText(later), "You can try again in 0:01.");
    const over = run(state, { type: "tick", now: 10_000 + 43_000 });
    assert.equal(lockedOut(over), false);
    assert.equal(lockoutText(over), "");
    assert.equal(needsTicking(over), false);
  });

  test("minutes and seconds of a long lockout", () => {
    const state = run(initialState({ now: 0 }), { type: "login-shown", mode: "pin", error: "x", wait: 600 });
    assert.equal(lockoutText(state), "You can try again in 10:00.");
    assert.equal(lockoutText(run(state, { type: "tick", now: 355_000 })), "You can try again in 4:05.");
  });

  test("the answer to a sign-in that was given up is ignored", () => {
    let state = run(initialState(), { type: "signin-started" });
    const late = state.login.attempt;
    state = run(state, { type: "sign-out" });
    assert.equal(run(state, { type: "signin-failed", attempt: late, text: "late" }), state);
    const after = run(state, { type: "session", projects: PROJECTS }, { type: "signed-in", attempt: late });
    assert.equal(after.loggedIn, false);
  });

  test("signing in selects the project in the URL when there is one, else the first", () => {
    const base = run(initialState(), { type: "session", projects: PROJECTS, modelProfiles: PROFILES });
    const wanted = run(base, { type: "signed-in", attempt: 0, device: ME, wanted: { projectId: "work", chatId: "c" } });
    assert.equal(wanted.loggedIn, true);
    assert.equal(wanted.project.id, "work");
    assert.deepEqual(wanted.wanted, { projectId: "work", chatId: "c" });
    const unknown = run(base, { type: "signed-in", attempt: 0, wanted: { projectId: "gone", chatId: null } });
    assert.equal(unknown.project.id, "demo");
    const none = run(initialState(), { type: "signed-in", attempt: 0 });
    assert.equal(none.project.id, null);
    assert.equal(chatPlaceholder(none), "There is no project to show.");
  });

  test("an ended session empties the workspace and shows why", () => {
    let state = inChat([message("m1", "hi")]);
    state = run(state, { type: "drawer-toggled" });
    state = run(state, { type: "login-shown", mode: "pin", error: "The relay ended the session: revoked" });
    assert.equal(state.loggedIn, false);
    assert.equal(state.project.id, null);
    assert.equal(state.chat.id, null);
    assert.deepEqual(state.chat.messages, []);
    assert.deepEqual(state.projects, []);
    assert.equal(state.drawerOpen, false);
    assert.equal(state.login.error, "The relay ended the session: revoked");
    assert.equal(state.device.id, "d_me"); // still this browser until told otherwise
  });

  test("validation errors go on the sign-in screen, and a new attempt clears them", () => {
    let state = run(initialState(), { type: "login-error", text: "Enter the PIN." });
    assert.equal(state.login.error, "Enter the PIN.");
    state = run(state, { type: "signin-started" });
    assert.equal(state.login.error, "");
  });
});

describe("what a failed sign-in says", () => {
  const auth = (code, extra = {}) => ({ kind: "auth", code, message: "refused", ...extra });
  const url = "ws://relay.example:8765/ws";

  test("a wrong PIN, a changed PIN, a revoked device", () => {
    assert.deepEqual(describeFailure(auth("auth_failed"), "pin", url), { text: "Wrong PIN. Try again.", wait: 0 });
    assert.match(describeFailure(auth("auth_failed"), "token", url).text, /no longer takes the PIN/);
    assert.match(describeFailure(auth("token_invalid"), "token", url).text, /no longer paired/);
  });

  test("a lockout, with and without its length", () => {
    assert.deepEqual(describeFailure(auth("locked_out", { retryAfter: 42 }), "pin", url), {
      text: "Too many failed attempts. Try again in 42 seconds.", wait: 42,
    });
    assert.deepEqual(describeFailure(auth("locked_out", { retryAfter: 599.2 }), "pin", url), {
      text: "Too many failed attempts. Try again in 10 minutes.", wait: 600,
    });
    const old = { kind: "auth", code: null, message: "Too many failed attempts; wait", retryAfter: null };
    assert.deepEqual(describeFailure(old, "pin", url), { text: old.message, wait: 0 });
  });

  test("a lost connection, a policy close, anything else", () => {
    assert.equal(describeFailure({ kind: "lost", message: "x", closeCode: 1006 }, "pin", url).text,
      `Could not reach the relay at ${url}.`);
    assert.equal(describeFailure({ kind: "lost", message: "device revoked", closeCode: 1008 }, "token", url).text,
      "The relay ended the session: device revoked");
    assert.equal(describeFailure({ kind: "other", message: "boom" }, "pin", url).text, "The relay ended the session: boom");
    assert.equal(describeFailure(null, "pin", url).text, "The relay ended the session: closed");
  });

  test("which failures mean the token is to be forgotten", () => {
    assert.equal(deviceGone(auth("token_invalid")), true);
    assert.equal(deviceGone(auth("locked_out")), false);
    assert.equal(deviceGone({ kind: "lost", closeCode: 1008, message: "device revoked" }), true);
    assert.equal(deviceGone({ kind: "lost", closeCode: 1008, message: "PIN changed" }), false);
    assert.equal(deviceGone({ kind: "lost", closeCode: 1006, message: "revoked" }), false);
    assert.equal(deviceGone(null), false);
  });

  test("waits are worded as the relay words them", () => {
    assert.equal(formatWait(1), "1 second");
    assert.equal(formatWait(119), "119 seconds");
    assert.equal(formatWait(120), "2 minutes");
    assert.equal(formatWait(121), "3 minutes");
  });
});

describe("the connection", () => {
  test("a reconnect is counted down, and can be retried at once", () => {
    const state = run(initialState({ now: 0 }), {
      type: "link-state", state: "reconnecting", nextAttemptAt: 4_200, lastClose: { code: 1006, reason: "" }, now: 0,
    });
    assert.equal(countdownText(state), "in 5 s");
    assert.equal(retryShown(state), true);
    assert.equal(needsTicking(state), true);
    assert.equal(countdownText(run(state, { type: "tick", now: 4_000 })), "in 1 s");
    assert.equal(countdownText(run(state, { type: "tick", now: 4_200 })), ""); // due: no "in 0 s"
  });

  test("offline offers a retry too; connected enables sending", () => {
    assert.equal(retryShown(run(initialState(), { type: "link-state", state: "offline" })), true);
    let state = inChat();
    state = run(state, { type: "draft", text: "hello" });
    assert.equal(canSend(state), false); // not connected yet
    state = run(state, { type: "link-state", state: "connected" });
    assert.equal(canSend(state), true);
    assert.equal(retryShown(state), false);
    assert.equal(canSend(run(state, { type: "draft", text: "   " })), false);
  });
});

describe("projects and chats", () => {
  test("the chat list arrives; the first chat opens when nothing else was asked for", () => {
    const state = inChat();
    assert.equal(state.project.ready, true);
    assert.equal(state.chat.id, "welcome");
    assert.equal(chatTitle(state), "Welcome");
    assert.equal(pageTitle(state), "Welcome · trio-relay");
    assert.equal(hashOf(state), "#/demo/welcome");
  });

  test("the chat this browser had open last in the project comes back", () => {
    let state = run(
      initialState(),
      { type: "session", projects: PROJECTS },
      { type: "signed-in", attempt: 0 },
    );
    state = run(state, {
      type: "chats-snapshot", generation: state.project.generation, chats: CHATS, lastChats: { demo: "second" },
    });
    assert.equal(state.chat.id, "second");
    assert.equal(chatTitle(state), "Untitled");
  });

  test("the chat in the URL wins, once its project's list is in", () => {
    let state = run(
      initialState(),
      { type: "session", projects: PROJECTS },
      { type: "signed-in", attempt: 0, wanted: { projectId: "demo", chatId: "second" } },
    );
    assert.equal(state.chat.id, null);
    state = run(state, {
      type: "chats-snapshot", generation: state.project.generation, chats: CHATS, lastChats: { demo: "welcome" },
    });
    assert.equal(state.chat.id, "second");
    assert.equal(state.wanted, null);
  });

  test("a snapshot of a project no longer shown is dropped", () => {
    let state = run(initialState(), { type: "session", projects: PROJECTS }, { type: "signed-in", attempt: 0 });
    const old = state.project.generation;
    state = run(state, { type: "project-selected", projectId: "work" });
    assert.equal(run(state, { type: "chats-snapshot", generation: old, chats: CHATS }), state);
  });

  test("chats created, renamed and deleted elsewhere", () => {
    let state = inChat();
    const g = state.project.generation;
    state = run(state, { type: "project-event", generation: g, data: { type: "chat_created", chat: { id: "new", title: "New" } } });
    assert.deepEqual(state.project.chats.map((c) => c.id), ["welcome", "second", "new"]);
    state = run(state, { type: "project-event", generation: g, data: { type: "chat_renamed", chat: { ...CHATS[0], title: "Hi" } } });
    assert.equal(chatTitle(state), "Hi");
    state = run(state, { type: "project-event", generation: g, data: { type: "chat_deleted", chatId: "second" } });
    assert.deepEqual(state.project.chats.map((c) => c.id), ["welcome", "new"]);
    assert.equal(state.chat.gone, false);
    state = run(state, { type: "project-event", generation: g, data: { type: "chat_deleted", chatId: "welcome" } });
    assert.equal(state.chat.gone, true);
    assert.equal(chatPlaceholder(state), "This chat was deleted.");
    assert.equal(canSend(run(state, { type: "draft", text: "x" }, { type: "link-state", state: "connected" })), false);
    for (const data of [null, "x", { type: "chat_created" }, { type: "something_else" }]) {
      assert.equal(run(state, { type: "project-event", generation: g, data }), state);
    }
  });

  test("a chat missing from a new snapshot of the list is gone", () => {
    let state = inChat();
    state = run(state, { type: "chats-snapshot", generation: state.project.generation, chats: [CHATS[1]] });
    assert.equal(state.chat.id, "welcome");
    assert.equal(state.chat.gone, true);
  });

  test("picking the open chat again only closes the drawer; a gone chat is opened again", () => {
    let state = run(inChat(), { type: "drawer-toggled" });
    const same = run(state, { type: "chat-picked", chatId: "welcome" });
    assert.equal(same.drawerOpen, false);
    assert.equal(same.chat, state.chat);
    state = run(state, { type: "chat-gone", generation: state.chat.generation });
    const again = run(state, { type: "chat-picked", chatId: "welcome" });
    assert.equal(again.chat.gone, false);
    assert.equal(again.chat.generation, state.chat.generation + 1);
    assert.equal(chatPlaceholder(again), "Loading…");
  });

  test("the URL's hash selects a project or a chat, once signed in", () => {
    const signedOut = initialState();
    assert.equal(run(signedOut, { type: "hash-changed", wanted: { projectId: "work", chatId: null } }), signedOut);
    const state = inChat();
    const chat = run(state, { type: "hash-changed", wanted: { projectId: "demo", chatId: "second" } });
    assert.equal(chat.chat.id, "second");
    assert.equal(chat.project, state.project);
    const project = run(state, { type: "hash-changed", wanted: { projectId: "work", chatId: "x" } });
    assert.equal(project.project.id, "work");
    assert.equal(project.chat.id, null);
    assert.deepEqual(project.wanted, { projectId: "work", chatId: "x" });
    assert.equal(run(state, { type: "hash-changed", wanted: null }), state);
  });

  test("a session whose projects lack the selected one moves to the first", () => {
    let state = inChat();
    state = run(state, { type: "session", projects: [PROJECTS[1]], modelProfiles: [] });
    assert.equal(state.project.id, "work");
    assert.equal(state.chat.id, null);
    assert.deepEqual(state.profiles, PROFILES); // signed in: the profiles have their own subscription
  });

  test("a new chat is added and opened, the form closed", () => {
    let state = run(inChat(), { type: "new-chat-toggled" }, { type: "new-chat-started" });
    assert.deepEqual(state.newChat, { open: true, creating: true });
    const chat = { id: "fresh", title: "Fresh", modelProfileId: "echo" };
    const created = run(state, { type: "new-chat-created", projectId: "demo", chat });
    assert.deepEqual(created.newChat, { open: false, creating: false });
    assert.equal(created.chat.id, "fresh");
    assert.equal(created.project.chats.at(-1), chat);
    // Its push came first: it is not listed twice.
    const pushed = run(state, { type: "project-event", generation: state.project.generation, data: { type: "chat_created", chat } });
    assert.equal(run(pushed, { type: "new-chat-created", projectId: "demo", chat }).project.chats.length, 3);
    // Another project by now: only the form closes.
    const elsewhere = run(state, { type: "new-chat-created", projectId: "work", chat });
    assert.equal(elsewhere.chat.id, "welcome");
    assert.deepEqual(run(state, { type: "new-chat-failed" }).newChat, { open: true, creating: false });
  });
});

describe("the open chat", () => {
  test("a snapshot replaces the messages; resumed and reset are told apart", () => {
    let state = inChat([message("m1", "one")]);
    assert.equal(state.chat.sync, "snapshot");
    assert.equal(state.chat.snapshots, 1);
    state = chatEvent(state, { type: "reply_started", messageId: "r1" });
    state = run(state, { type: "chat-resumed", generation: state.chat.generation });
    assert.equal(state.chat.sync, "resumed");
    state = run(state, { type: "chat-snapshot", generation: state.chat.generation, messages: [message("m2", "two")], reset: true });
    assert.equal(state.chat.sync, "reset");
    assert.deepEqual(state.chat.messages.map((m) => m.id), ["m2"]);
    assert.deepEqual(state.chat.streaming, []);
    assert.equal(state.chat.snapshots, 2);
  });

  test("a reply streams in one message that the stored one replaces", () => {
    let state = inChat();
    assert.equal(chatPlaceholder(state), "No messages yet. Say something!");
    state = chatEvent(state, { type: "reply_started", messageId: "r1" });
    assert.equal(replyRunning(state), true);
    assert.equal(chatPlaceholder(state), "");
    state = chatEvent(state, { type: "chunk", messageId: "r1", text: "Echo: " });
    state = chatEvent(state, { type: "chunk", messageId: "r1", text: "hi" });
    let items = messageItems(state);
    assert.deepEqual(items.map((i) => [i.id, i.status, i.text, i.author.name]), [["r1", "streaming", "Echo: hi", "Echo"]]);
    state = chatEvent(state, { type: "message", message: message("r1", "Echo: hi") });
    items = messageItems(state);
    assert.deepEqual(items.map((i) => [i.id, i.status, i.text]), [["r1", "stored", "Echo: hi"]]);
    assert.equal(replyRunning(state), false);
    // The same message twice (a replayed push) is shown once.
    assert.equal(chatEvent(state, { type: "message", message: message("r1", "Echo: hi") }).chat.messages.length, 1);
  });

  test("a reply joined halfway starts from the chunk that came", () => {
    const state = chatEvent(inChat(), { type: "chunk", messageId: "r9", text: "…end" });
    assert.deepEqual(state.chat.streaming, [{ id: "r9", text: "…end", status: "streaming", error: null }]);
  });

  test("a failed and a stopped reply say so", () => {
    let state = chatEvent(inChat(), { type: "reply_started", messageId: "r1" });
    const failed = chatEvent(state, { type: "error", messageId: "r1", error: "exit 1" });
    assert.deepEqual(messageItems(failed).map((i) => [i.status, i.error]), [["error", "exit 1"]]);
    assert.equal(chatEvent(state, { type: "error", messageId: "r1" }).chat.streaming[0].error, "the agent failed");
    state = chatEvent(state, { type: "cancelled", messageId: "r1" });
    assert.equal(state.chat.streaming[0].status, "cancelled");
    assert.equal(replyRunning(state), false);
  });

  test("other pushes, bad pushes and a replaced chat's pushes change nothing", () => {
    const state = inChat();
    for (const data of [null, 3, { type: "typing" }, { type: "message" }, { type: "message", message: "x" }]) {
      assert.equal(chatEvent(state, data), state);
    }
    const old = state.chat.generation;
    const moved = run(state, { type: "chat-selected", chatId: "second" });
    for (const type of ["chat-event", "chat-resumed", "chat-gone"]) {
      assert.equal(run(moved, { type, generation: old, data: { type: "chunk", messageId: "x", text: "y" } }), moved);
    }
    assert.equal(run(moved, { type: "chat-snapshot", generation: old, messages: [message("m", "x")] }), moved);
  });

  test("non-text content is shown as a JSON block, fenced past its backticks", () => {
    const state = inChat([message("m1", { tool: "x```y" })]);
    const [item] = messageItems(state);
    assert.equal(item.text, jsonBlock({ tool: "x```y" }));
    assert.match(item.text, /^````json\n/);
    assert.match(item.text, /\n````$/);
  });
});

describe("senders", () => {
  const state = inChat();

  test("this browser's device is You; another device, a program and the host by name", () => {
    assert.deepEqual(authorOf(state, { sender: { deviceId: "d_me", name: "Laptop" } }), { name: "You", own: true });
    assert.deepEqual(authorOf(state, { sender: { deviceId: "d_other", name: " Phone " } }), { name: "Phone", own: false });
    assert.deepEqual(authorOf(state, { sender: { name: "Desktop app" } }), { name: "Desktop app", own: false });
    assert.deepEqual(authorOf(state, { sender: { deviceId: "d_x", name: "  " } }), { name: "Someone", own: false });
  });

  test("a message stored before senders existed is You", () => {
    assert.deepEqual(authorOf(state, { role: "user", content: "old" }), { name: "You", own: true });
  });

  test("without a pairing, no device's message is You", () => {
    const unpaired = { ...state, device: null };
    assert.deepEqual(authorOf(unpaired, { sender: { deviceId: "d_me", name: "Laptop" } }), { name: "Laptop", own: false });
  });

  test("agents' replies are named after the chat's profile", () => {
    const items = messageItems(inChat([message("a", "hi"), { ...message("u", "yo"), role: "user", sender: { deviceId: "d_me" } }]));
    assert.deepEqual(items.map((i) => i.author), [{ name: "Echo", own: false }, { name: "You", own: true }]);
  });
});

describe("composing", () => {
  test("sending empties the box; a refused message comes back unless something else was typed", () => {
    let state = run(inChat(), { type: "draft", text: "hello" }, { type: "draft-sent" });
    assert.equal(state.draft, "");
    assert.equal(run(state, { type: "send-rejected", chatId: "welcome", text: "hello" }).draft, "hello");
    const typed = run(state, { type: "draft", text: "other" });
    assert.equal(run(typed, { type: "send-rejected", chatId: "welcome", text: "hello" }).draft, "other");
    const moved = run(state, { type: "chat-selected", chatId: "second" });
    assert.equal(run(moved, { type: "send-rejected", chatId: "welcome", text: "hello" }).draft, "");
  });
});

describe("the drawer and notices", () => {
  test("the drawer opens and closes; a change of width closes it", () => {
    let state = run(inChat(), { type: "drawer-toggled" });
    assert.equal(state.drawerOpen, true);
    assert.equal(run(state, { type: "drawer-toggled" }).drawerOpen, false);
    assert.equal(run(state, { type: "drawer-closed" }).drawerOpen, false);
    const wide = run(state, { type: "viewport", narrow: false });
    assert.equal(wide.drawerOpen, false);
    assert.equal(wide.narrow, false);
    const closed = run(state, { type: "drawer-closed" });
    assert.equal(run(closed, { type: "drawer-closed" }), closed);
  });

  test("a notice is closed by its own timer, not an older one's", () => {
    let state = run(initialState(), { type: "notice", text: "first" });
    const first = state.notice.id;
    state = run(state, { type: "notice", text: "second" });
    assert.equal(run(state, { type: "notice-closed", id: first }), state);
    assert.equal(run(state, { type: "notice-closed", id: state.notice.id }).notice.text, null);
    assert.equal(run(state, { type: "notice-closed" }).notice.text, null); // the × button
  });
});

describe("the URL", () => {
  test("a hash is read back as it was written", () => {
    const state = inChat();
    assert.deepEqual(parseHash(hashOf(state)), { projectId: "demo", chatId: "welcome" });
    assert.deepEqual(parseHash("#/a%2Fb"), { projectId: "a/b", chatId: null });
    assert.deepEqual(parseHash("#demo/x"), { projectId: "demo", chatId: "x" });
  });

  test("an empty or broken hash is nothing", () => {
    assert.equal(parseHash(""), null);
    assert.equal(parseHash("#/"), null);
    assert.equal(parseHash("#/%E0%A4%A"), null);
    assert.equal(hashOf(initialState()), "");
  });
});

describe("the reducer", () => {
  test("an unknown event changes nothing but the time", () => {
    const state = initialState({ now: 5 });
    assert.equal(reduce(state, { type: "no-such-event" }), state);
    assert.equal(reduce(state, { type: "no-such-event", now: 6 }).now, 6);
  });
});
