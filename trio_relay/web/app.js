// app.js: the page's controller. One object owns the state (state.js), the link to the relay
// (ws-link.js) and the subscriptions; every push and every user action becomes an event for
// `reduce`, the page is drawn from the resulting state once per animation frame
// (render.js), and the I/O a change calls for (subscribing, storage, the URL, focus) is
// run here, from the difference between the state before and after. Signing in and out is
// in signin.js.

import { copyCode } from "./markdown.js";
import { byTestId, createRenderer } from "./render.js";
import { SignInMethods } from "./signin.js";
import { initialState, reduce } from "./state.js";
import { lastChats, rememberChat, storedDevice } from "./storage.js";
import { hashOf, lockedOut, needsTicking, parseHash } from "./view.js";
import { RelayLink, RequestRejected, State, relayUrl } from "./ws-link.js";

const NOTICE_MS = 8000;
const TICK_MS = 500; // a countdown on the page (reconnect, lockout) is redrawn this often

// --- the controller ----------------------------------------------------------------------

class App {
  constructor(win) {
    this.window = win;
    this.document = win.document;
    this.link = new RelayLink(relayUrl(win.location));
    /** Phone-sized: the chat list is a drawer (style.css has the same width). */
    this.narrowScreen = win.matchMedia("(max-width: 720px)");
    this.state = initialState({ now: Date.now(), narrow: this.narrowScreen.matches });
    this.renderer = createRenderer(this.document);
    this.subs = { profiles: null, project: null, chat: null };
    this.queue = []; // events that came while one was being applied
    this.applying = false;
    this.frame = null; // the animation frame the next render is scheduled for
    this.afterRender = []; // what needs the page drawn first (focus on a shown element)
    this.noticeTimer = null;
    this.ticker = null;
  }

  $(testid) {
    return byTestId(this.document, testid);
  }

  // --- the loop: event -> state -> (effects, one render per frame) ---

  dispatch(event) {
    this.queue.push(event);
    if (this.applying) return; // applied in order, after the one in progress
    this.applying = true;
    try {
      while (this.queue.length > 0) {
        const before = this.state;
        this.state = reduce(before, { ...this.queue.shift(), now: Date.now() });
        if (this.state !== before) this.effects(before, this.state);
      }
    } finally {
      this.applying = false;
    }
    this.schedule();
  }

  schedule() {
    if (this.frame === null) this.frame = this.window.requestAnimationFrame(() => this.render());
  }

  /** Runs `fn` once the page shows the current state. */
  then(fn) {
    this.afterRender.push(fn);
    this.schedule();
  }

  render() {
    if (this.frame !== null) this.window.cancelAnimationFrame(this.frame);
    this.frame = null;
    this.renderer.render(this.state);
    const after = this.afterRender;
    this.afterRender = [];
    for (const fn of after) fn();
  }

  /** The I/O that a change of state calls for. */
  effects(before, after) {
    this.syncSubscriptions(before, after);
    if (after.loggedIn && hashOf(before) !== hashOf(after)) this.writeHash(hashOf(after));
    this.syncFocus(before, after);
    this.syncTimers(before, after);
  }

  /** One subscription for what is selected: a new selection closes the old one. */
  syncSubscriptions(before, after) {
    // Signed out or the session ended: the link ended every subscription itself.
    if (before.loggedIn && !after.loggedIn) this.subs = { profiles: null, project: null, chat: null };
    const newChat = before.chat.generation !== after.chat.generation;
    if ((newChat || (after.chat.gone && !before.chat.gone)) && this.subs.chat) {
      this.subs.chat.close();
      this.subs.chat = null;
    }
    const newProject = before.project.generation !== after.project.generation;
    if (newProject && this.subs.project) {
      this.subs.project.close();
      this.subs.project = null;
    }
    if (!before.loggedIn && after.loggedIn) this.subscribeProfiles();
    if (newProject && after.loggedIn && after.project.id) this.subscribeProject(after.project);
    if (newChat && after.loggedIn && after.chat.id) {
      if (after.project.id) rememberChat(after.project.id, after.chat.id);
      this.subscribeChat(after.chat);
    }
  }

  syncFocus(before, after) {
    const openedChat = before.chat.generation !== after.chat.generation && after.loggedIn && after.chat.id;
    // Straight to writing on a desktop; on a phone that would pop the keyboard over the chat.
    if (openedChat && !after.narrow) this.then(() => this.$("message-input").focus());
    if (!before.drawerOpen && after.drawerOpen) {
      this.then(() => {
        const target = this.document.querySelector('[data-testid="chat-item"][data-selected="true"] button')
          ?? this.document.querySelector('[data-testid="chat-item"] button')
          ?? this.$("drawer-close");
        target.focus();
      });
    } else if (before.drawerOpen && !after.drawerOpen) {
      // Focus in the closing drawer would be lost: back to the button that opens it.
      if (after.narrow && this.$("sidebar").contains(this.document.activeElement)) this.$("chats-toggle").focus();
    }
  }

  /** A notice hides itself after a while; a countdown on the page is kept ticking. */
  syncTimers(before, after) {
    if (after.notice && after.notice.text && after.notice.id !== before.notice?.id) {
      clearTimeout(this.noticeTimer);
      const { id } = after.notice;
      this.noticeTimer = setTimeout(() => this.dispatch({ type: "notice-closed", id }), NOTICE_MS);
    }
    if (needsTicking(after) && this.ticker === null) {
      this.ticker = setInterval(() => this.syncLink(), TICK_MS);
    } else if (!needsTicking(after) && this.ticker !== null) {
      clearInterval(this.ticker);
      this.ticker = null;
    }
  }

  writeHash(hash) {
    if (this.window.location.hash !== hash) {
      this.window.history.replaceState(null, "", hash || this.window.location.pathname);
    }
  }

  notice(text) {
    this.dispatch({ type: "notice", text });
  }

  syncLink() {
    const { state, nextAttemptAt, lastClose } = this.link;
    this.dispatch({ type: "link-state", state, nextAttemptAt, lastClose });
  }

  // --- subscriptions: their pushes become events, tagged with the selection they are for ---

  subscribeProfiles() {
    this.subs.profiles = this.link.subscribe("modelProfiles", null, {
      onSnapshot: (data) => this.dispatch({ type: "profiles", modelProfiles: data.modelProfiles ?? [] }),
      onEvent: (data) => this.dispatch({ type: "profiles", modelProfiles: data.modelProfiles }),
    });
  }

  subscribeProject({ id, generation }) {
    this.subs.project = this.link.subscribe("project", id, {
      onSnapshot: (data) => this.dispatch({
        type: "chats-snapshot",
        generation,
        chats: Array.isArray(data.chats) ? [...data.chats] : [],
        lastChats: lastChats(),
      }),
      onEvent: (data) => this.dispatch({ type: "project-event", generation, data }),
      onComplete: () => this.notice("This project's chat list is no longer being updated."),
      onInterrupted: (error) => this.notice(`Lost the chat list's updates (${error.message}); catching up…`),
      onError: (error) => {
        if (!this.link.error) this.notice(`Could not watch the project: ${error.message}`);
      },
    });
  }

  subscribeChat({ id, generation }) {
    this.subs.chat = this.link.subscribe("chat", id, {
      onSnapshot: (data, { reset }) => this.dispatch({
        type: "chat-snapshot",
        generation,
        messages: Array.isArray(data.messages) ? [...data.messages] : [],
        reset,
      }),
      onResumed: () => this.dispatch({ type: "chat-resumed", generation }),
      onEvent: (data) => this.dispatch({ type: "chat-event", generation, data }),
      onComplete: () => this.dispatch({ type: "chat-gone", generation }),
      onInterrupted: (error) => this.notice(`Lost the chat's updates (${error.message}); catching up…`),
      onError: (error) => {
        if (this.link.error) return; // the session is over: the PIN prompt says why
        if (error.code === "not_found") this.dispatch({ type: "chat-gone", generation });
        else this.notice(`Could not watch the chat: ${error.message}`);
      },
    });
  }

  // --- composing and creating ---

  async send() {
    const text = this.state.draft.trim();
    const chatId = this.state.chat.id;
    if (!text || !chatId || this.link.state !== State.CONNECTED) return;
    this.dispatch({ type: "draft-sent" });
    this.render(); // the box empties now, not a frame later, so that nothing typed is lost
    try {
      // The message itself comes back through the chat's subscription, like everyone's.
      await this.link.send(chatId, text);
    } catch (error) {
      if (error instanceof RequestRejected) {
        // Refused by the relay: it was not stored, so the text goes back in the box.
        this.dispatch({ type: "send-rejected", chatId, text });
        this.notice(`Message not sent: ${error.message}`);
      } else {
        // The connection dropped or the answer was late: the relay may have stored it (it
        // then shows up in the chat). Not restored, so that sending again is a choice.
        this.notice(`The message may not have been sent (${error.message}): check the chat.`);
      }
    }
  }

  async cancelReply() {
    const chatId = this.state.chat.id;
    if (!chatId) return;
    try {
      await this.link.cancelReply(chatId);
    } catch (error) {
      this.notice(`Could not stop the answer: ${error.message}`);
    }
  }

  async createChat() {
    const projectId = this.state.project.id;
    if (!projectId) return;
    const title = this.$("new-chat-title");
    this.dispatch({ type: "new-chat-started" });
    try {
      const chat = await this.link.createChat(projectId, {
        title: title.value.trim(),
        modelProfileId: this.$("new-chat-profile").value,
      });
      title.value = "";
      this.dispatch({ type: "new-chat-created", projectId, chat });
    } catch (error) {
      this.dispatch({ type: "new-chat-failed" });
      this.notice(`Could not create the chat: ${error.message}`);
    }
  }

  // --- wiring ---

  listen() {
    const { link, window: win, document: doc } = this;
    const on = (testid, type, fn) => this.$(testid).addEventListener(type, fn);

    link.on("state", (state) => {
      this.syncLink();
      // The relay ended the session for good (device revoked, PIN changed, lockout, abuse).
      if (state === State.CLOSED && this.state.loggedIn) this.sessionEnded(link.error);
    });
    link.on("session", (session) => this.dispatch({
      type: "session",
      projects: session.projects,
      modelProfiles: session.modelProfiles ?? [],
      device: link.device,
    }));
    link.on("retry", () => this.syncLink());
    link.on("error", (error) => console.warn("[app]", error));

    on("notice-close", "click", () => this.dispatch({ type: "notice-closed" }));
    on("retry-button", "click", () => link.reconnectNow());
    on("logout-button", "click", () => this.signOut());
    on("use-pin-button", "click", () => this.signOut());
    win.addEventListener("online", () => link.setOffline(false));
    win.addEventListener("offline", () => link.setOffline(true));
    doc.addEventListener("visibilitychange", () => {
      // Background tabs run timers late: do not make someone who comes back wait for one.
      if (doc.visibilityState === "visible" && link.state === State.RECONNECTING) link.reconnectNow();
    });

    on("login-form", "submit", (event) => {
      event.preventDefault();
      if (this.state.login.signingIn || lockedOut(this.state, Date.now())) return;
      if (this.state.login.mode === "token") this.signInWithToken();
      else this.signInWithPin();
      // Drawn now, not a frame later: the last attempt's error is gone and Connect disabled
      // before anything of this attempt can come back.
      this.render();
    });

    win.addEventListener("hashchange", () => {
      this.dispatch({ type: "hash-changed", wanted: parseHash(win.location.hash) });
    });

    // The lists are redrawn whole: one listener each, on the list.
    on("project-list", "click", (event) => {
      const item = event.target instanceof Element ? event.target.closest("button")?.closest("[data-project-id]") : null;
      if (item) this.dispatch({ type: "project-selected", projectId: item.dataset.projectId });
    });
    on("chat-list", "click", (event) => {
      const item = event.target instanceof Element ? event.target.closest("button")?.closest("[data-chat-id]") : null;
      if (item) this.dispatch({ type: "chat-picked", chatId: item.dataset.chatId });
    });

    on("message-list", "click", async (event) => {
      const button = event.target instanceof Element ? event.target.closest(".code__copy") : null;
      if (!button) return;
      const copied = await copyCode(button);
      button.dataset.copied = copied ? "yes" : "no";
      setTimeout(() => delete button.dataset.copied, 1500);
    });

    on("message-input", "input", (event) => this.dispatch({ type: "draft", text: event.target.value }));
    on("message-input", "keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.$("composer").requestSubmit();
      }
    });
    on("composer", "submit", (event) => {
      event.preventDefault();
      this.send();
    });
    on("cancel-button", "click", () => this.cancelReply());

    on("new-chat-button", "click", () => {
      this.dispatch({ type: "new-chat-toggled" });
      if (this.state.newChat.open) this.then(() => this.$("new-chat-title").focus());
    });
    on("new-chat-cancel", "click", () => {
      this.dispatch({ type: "new-chat-cancelled" });
      this.$("new-chat-title").value = "";
    });
    on("new-chat-form", "submit", (event) => {
      event.preventDefault();
      this.createChat();
    });

    // Below 720 px the chat takes the whole width and the chat list is a drawer, opened by
    // the "Chats" button in the chat's header and closed by a choice, the backdrop, × or
    // Escape; widening the window turns it back into a sidebar.
    on("chats-toggle", "click", () => this.dispatch({ type: "drawer-toggled" }));
    on("drawer-close", "click", () => this.dispatch({ type: "drawer-closed" }));
    on("drawer-backdrop", "click", () => this.dispatch({ type: "drawer-closed" }));
    doc.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && this.state.drawerOpen) this.dispatch({ type: "drawer-closed" });
    });
    this.narrowScreen.addEventListener("change", () => {
      this.dispatch({ type: "viewport", narrow: this.narrowScreen.matches });
    });

    // The page is as tall as what is visible: when an on-screen keyboard covers part of the
    // window (and the browser does not resize the page for it), the composer moves up above
    // it. Layout only, no state.
    const viewport = win.visualViewport;
    if (viewport) {
      const fit = () => {
        if (Math.abs(viewport.scale - 1) > 0.01) return; // pinch-zoomed: leave it
        const root = doc.documentElement.style;
        root.setProperty("--viewport-height", `${Math.round(viewport.height)}px`);
        root.setProperty("--viewport-top", `${Math.round(viewport.offsetTop)}px`);
      };
      viewport.addEventListener("resize", fit);
      viewport.addEventListener("scroll", fit);
      fit();
    }
  }

  start() {
    this.listen();
    if (typeof navigator !== "undefined" && navigator.onLine === false) this.link.setOffline(true);
    this.showLogin();
    // Paired before: sign in with the token, without asking for anything.
    if (storedDevice()) this.signInWithToken();
  }
}

// Signing in (signin.js) is written in a module of its own; its methods are the controller's.
const signIn = Object.getOwnPropertyDescriptors(SignInMethods.prototype);
delete signIn.constructor;
Object.defineProperties(App.prototype, signIn);

new App(window).start();
