// state.js: what the page shows, as data, and how each push or user action changes it.
//
// `reduce(state, event)` returns the next state and never changes the one it is given: no
// DOM, no I/O, no clock (an event carries `now`, in ms, when time matters), no globals. The
// controller in app.js feeds it the link's pushes and the user's actions, renders the
// result once per animation frame (render.js) and runs the I/O the change asks for
// (subscribing, storage, the URL). What the page shows is derived from a state by the
// selectors in view.js. Both are tested with `node --test` (tests/js/).

import { State } from "./ws-link.js";

export function initialState({ now = 0, narrow = false } = {}) {
  return {
    now,
    narrow, // phone-sized: the chat list is a drawer
    connection: { state: State.SIGNED_OUT, nextAttemptAt: null, lastClose: null },
    // The sign-in screen. `attempt` is bumped by every sign-in and sign-out: a late answer
    // to an earlier attempt is ignored.
    login: { mode: "pin", pairedName: "", error: "", signingIn: false, lockoutUntil: 0, attempt: 0 },
    loggedIn: false,
    device: null, // {id, name} of this browser's pairing: its messages are "You"
    projects: [],
    profiles: [],
    wanted: null, // {projectId, chatId} from the URL, to select once known
    // Each selection bumps `generation`; pushes name the generation they are for, so those
    // of a subscription that was replaced are dropped.
    project: { id: null, generation: 0, chats: [], ready: false },
    chat: emptyChat(null, 0),
    draft: "", // the message box
    drawerOpen: false,
    newChat: { open: false, creating: false },
    notice: null, // {id, text}
  };
}

function emptyChat(id, generation) {
  return {
    id,
    generation,
    messages: [], // stored messages, oldest first
    streaming: [], // replies still coming: {id, text, status: streaming|error|cancelled, error}
    ready: false,
    gone: false, // deleted
    sync: "", // how it was last brought up to date: snapshot, reset, resumed
    snapshots: 0, // snapshots applied: the list scrolls to the end after each
  };
}

// --- the reducer -------------------------------------------------------------------------

export function reduce(state, event) {
  const next = typeof event.now === "number" && event.now !== state.now ? { ...state, now: event.now } : state;
  const handler = HANDLERS[event.type];
  return handler ? handler(next, event) : next;
}

const HANDLERS = {
  tick: (state) => state,

  viewport: (state, { narrow }) => ({ ...state, narrow, drawerOpen: false }),

  // --- the link ---
  "link-state": (state, { state: connection, nextAttemptAt = null, lastClose = null }) => ({
    ...state,
    connection: { state: connection, nextAttemptAt, lastClose },
  }),

  session(state, { projects, modelProfiles, device }) {
    let next = { ...state, projects: Array.isArray(projects) ? projects : [] };
    // Once signed in, the profiles come from their own subscription.
    if (!state.loggedIn) next.profiles = Array.isArray(modelProfiles) ? modelProfiles : [];
    if (device) next.device = device;
    if (next.loggedIn && next.project.id && !next.projects.some((p) => p.id === next.project.id)) {
      next = selectProject(next, next.projects[0]?.id ?? null);
    }
    return next;
  },

  // --- signing in ---
  "login-shown": (state, { mode, pairedName = "", error = "", wait = 0 }) => showLogin(state, {
    mode, pairedName, error, wait,
  }),

  // Signing out drops any sign-in still waiting for its answer; the PIN is asked for (this
  // browser forgets its token).
  "sign-out": (state) => showLogin(
    { ...state, login: { ...state.login, attempt: state.login.attempt + 1 } },
    { mode: "pin", pairedName: "", error: "", wait: 0 },
  ),

  "login-error": (state, { text }) => ({ ...state, login: { ...state.login, error: text } }),

  "signin-started": (state) => ({
    ...state,
    login: { ...state.login, error: "", signingIn: true, attempt: state.login.attempt + 1 },
  }),

  "signin-failed"(state, { attempt, text, wait = 0 }) {
    if (attempt !== state.login.attempt) return state;
    const lockoutUntil = wait > 0 ? state.now + wait * 1000 : 0;
    return { ...state, login: { ...state.login, signingIn: false, error: text, lockoutUntil } };
  },

  "signed-in"(state, { attempt, device = null, wanted = null }) {
    if (attempt !== state.login.attempt) return state;
    const next = {
      ...state,
      loggedIn: true,
      device,
      wanted,
      login: { ...state.login, signingIn: false },
    };
    const known = wanted && next.projects.some((p) => p.id === wanted.projectId);
    return selectProject(next, known ? wanted.projectId : next.projects[0]?.id ?? null);
  },

  profiles: (state, { modelProfiles }) => (
    Array.isArray(modelProfiles) ? { ...state, profiles: modelProfiles } : state
  ),

  // --- projects ---
  "project-selected": (state, { projectId }) => selectProject(state, projectId),

  "hash-changed"(state, { wanted }) {
    if (!state.loggedIn || !wanted) return state;
    if (wanted.projectId !== state.project.id) return selectProject({ ...state, wanted }, wanted.projectId);
    if (wanted.chatId && wanted.chatId !== state.chat.id) return selectChat(state, wanted.chatId);
    return state;
  },

  "chats-snapshot"(state, { generation, chats, lastChats = {} }) {
    if (generation !== state.project.generation) return state;
    let next = {
      ...state,
      project: { ...state.project, chats: Array.isArray(chats) ? chats : [], ready: true },
    };
    if (next.chat.id && !hasChat(next, next.chat.id)) next = markChatGone(next);
    const wanted = next.wanted;
    if (wanted && wanted.projectId === next.project.id) {
      next = { ...next, wanted: null };
      if (wanted.chatId && hasChat(next, wanted.chatId)) next = selectChat(next, wanted.chatId);
    }
    // Nothing asked for: the chat this browser had open last in the project, else its first.
    if (!next.chat.id && next.project.chats.length > 0) {
      const last = lastChats && typeof lastChats === "object" ? lastChats[next.project.id] : undefined;
      next = selectChat(next, hasChat(next, last) ? last : next.project.chats[0].id);
    }
    return next;
  },

  "project-event"(state, { generation, data }) {
    if (generation !== state.project.generation || !data || typeof data !== "object") return state;
    if ((data.type === "chat_created" || data.type === "chat_renamed") && data.chat) {
      return upsertChat(state, data.chat);
    }
    if (data.type === "chat_deleted") {
      const next = { ...state, project: { ...state.project, chats: state.project.chats.filter((c) => c.id !== data.chatId) } };
      return data.chatId === state.chat.id ? markChatGone(next) : next;
    }
    return state;
  },

  // --- the open chat ---
  "chat-picked"(state, { chatId }) {
    const next = { ...state, drawerOpen: false };
    if (chatId === state.chat.id && !state.chat.gone) return next; // open already
    return selectChat(next, chatId);
  },

  "chat-selected": (state, { chatId }) => selectChat(state, chatId),

  "chat-snapshot"(state, { generation, messages, reset = false }) {
    if (generation !== state.chat.generation) return state;
    // The whole history: it replaces what was held (after a reset, that was incomplete).
    return {
      ...state,
      chat: {
        ...state.chat,
        messages: Array.isArray(messages) ? messages : [],
        streaming: [],
        ready: true,
        sync: reset ? "reset" : "snapshot",
        snapshots: state.chat.snapshots + 1,
      },
    };
  },

  "chat-resumed"(state, { generation }) {
    if (generation !== state.chat.generation) return state;
    return { ...state, chat: { ...state.chat, sync: "resumed" } }; // the missed pushes follow
  },

  "chat-event"(state, { generation, data }) {
    if (generation !== state.chat.generation) return state;
    const chat = applyChatEvent(state.chat, data);
    return chat === state.chat ? state : { ...state, chat };
  },

  "chat-gone"(state, { generation }) {
    return generation === state.chat.generation ? markChatGone(state) : state;
  },

  // --- composing ---
  draft: (state, { text }) => (text === state.draft ? state : { ...state, draft: text }),

  "draft-sent": (state) => ({ ...state, draft: "" }),

  "send-rejected"(state, { chatId, text }) {
    // Refused by the relay, so not stored: the text goes back in the box, unless the user
    // has written something else or moved on.
    if (state.draft !== "" || state.chat.id !== chatId) return state;
    return { ...state, draft: text };
  },

  // --- new chat ---
  "new-chat-toggled": (state) => ({ ...state, newChat: { ...state.newChat, open: !state.newChat.open } }),
  "new-chat-cancelled": (state) => ({ ...state, newChat: { ...state.newChat, open: false } }),
  "new-chat-started": (state) => ({ ...state, newChat: { ...state.newChat, creating: true } }),
  "new-chat-failed": (state) => ({ ...state, newChat: { ...state.newChat, creating: false } }),

  "new-chat-created"(state, { projectId, chat }) {
    const next = { ...state, newChat: { open: false, creating: false } };
    if (projectId !== state.project.id || !chat || !chat.id) return next;
    // The project's push may come before or after this reply.
    return selectChat({ ...upsertChat(next, chat), drawerOpen: false }, chat.id);
  },

  // --- the drawer and notices ---
  "drawer-toggled": (state) => ({ ...state, drawerOpen: !state.drawerOpen }),
  "drawer-closed": (state) => (state.drawerOpen ? { ...state, drawerOpen: false } : state),

  notice: (state, { text }) => ({ ...state, notice: { id: (state.notice?.id ?? 0) + 1, text } }),

  "notice-closed"(state, { id = null }) {
    if (!state.notice || (id !== null && id !== state.notice.id)) return state; // a newer one
    return { ...state, notice: { ...state.notice, text: null } };
  },
};

function showLogin(state, { mode, pairedName, error, wait }) {
  return {
    ...state,
    loggedIn: false,
    project: { id: null, generation: state.project.generation + 1, chats: [], ready: false },
    chat: emptyChat(null, state.chat.generation + 1),
    projects: [],
    drawerOpen: false,
    login: {
      ...state.login,
      mode,
      pairedName,
      error,
      signingIn: false,
      lockoutUntil: wait > 0 ? state.now + wait * 1000 : 0,
    },
  };
}

function selectProject(state, projectId) {
  const next = selectChat(state, null);
  return { ...next, project: { id: projectId, generation: state.project.generation + 1, chats: [], ready: false } };
}

function selectChat(state, chatId) {
  return { ...state, chat: emptyChat(chatId, state.chat.generation + 1) };
}

function markChatGone(state) {
  if (!state.chat.id || state.chat.gone) return state;
  return { ...state, chat: { ...state.chat, gone: true } };
}

function hasChat(state, chatId) {
  return state.project.chats.some((chat) => chat.id === chatId);
}

function upsertChat(state, chat) {
  const chats = state.project.chats;
  const index = chats.findIndex((c) => c.id === chat.id);
  const next = index >= 0 ? chats.map((c, i) => (i === index ? chat : c)) : [...chats, chat];
  return { ...state, project: { ...state.project, chats: next } };
}

/** A chat push: a stored message, or a piece of a streamed reply. */
function applyChatEvent(chat, data) {
  if (!data || typeof data !== "object") return chat;
  const id = data.messageId;
  // A reply joined halfway (or after a reset) restarts from the push that came.
  const update = (change) => {
    const index = chat.streaming.findIndex((entry) => entry.id === id);
    const entry = index >= 0 ? chat.streaming[index] : { id, text: "", status: "streaming", error: null };
    const changed = { ...entry, ...change(entry) };
    const streaming = index >= 0
      ? chat.streaming.map((e, i) => (i === index ? changed : e))
      : [...chat.streaming, changed];
    return { ...chat, streaming };
  };
  switch (data.type) {
    case "message": {
      const message = data.message;
      if (!message || typeof message !== "object") return chat;
      const known = chat.messages.some((m) => m.id === message.id);
      return {
        ...chat,
        messages: known ? chat.messages : [...chat.messages, message],
        // The stored message replaces the streamed one.
        streaming: chat.streaming.filter((entry) => entry.id !== message.id),
      };
    }
    case "reply_started":
      return {
        ...chat,
        streaming: [...chat.streaming.filter((e) => e.id !== id), { id, text: "", status: "streaming", error: null }],
      };
    case "chunk":
      return update((entry) => ({ text: entry.text + (typeof data.text === "string" ? data.text : "") }));
    case "error":
      return update(() => ({ status: "error", error: typeof data.error === "string" ? data.error : "the agent failed" }));
    case "cancelled":
      return update(() => ({ status: "cancelled" }));
    default:
      return chat; // another backend's events: nothing to show
  }
}
