// ws-link.js on its own, over a scripted fake WebSocket: what the seed's ws-link.ts got wrong
// (routing pushes by resource type only, no timeouts, no resuming), done right. Run in the
// page by tests/test_browser.py (page.evaluate) and in Node by tests/test_ws_link.py; both
// check the result it returns with tests/_js.py.
async () => {
  const { RelayLink, RequestTimeout, State } = await import("/ws-link.js");
  const sockets = [];
  class FakeSocket {
    constructor() {
      this.sent = [];
      sockets.push(this);
      queueMicrotask(() => this.onopen());
    }
    send(text) {
      const frame = JSON.parse(text);
      this.sent.push(frame);
      if (frame.type === "auth") {
        const data = { projects: [], modelProfiles: [] };
        this.reply({ id: frame.id, type: "auth_success", data });
      }
    }
    reply(frame) {
      queueMicrotask(() => this.onmessage({ data: JSON.stringify(frame) }));
    }
    subscribed(request, seq, epoch, extra) {
      const { resource, resourceId } = request;
      this.reply({ id: request.id, type: "subscribed", resource, resourceId, seq, epoch, ...extra });
    }
    chunk(chat, seq, text) {
      const data = { type: "chunk", text };
      this.reply({ id: null, type: "data", resource: "chat", resourceId: chat, seq, data });
    }
    subscribes() {
      return this.sent.filter((frame) => frame.type === "subscribe");
    }
    close() {}
  }
  // Lets queued microtasks and zero-delay timers run: the fake answers through those only.
  const until = async (predicate) => {
    for (let i = 0; i < 100 && !predicate(); i++) await new Promise((r) => setTimeout(r, 0));
    if (!predicate()) throw new Error(`the link did not get there: ${predicate}`);
  };
  const options = { WebSocket: FakeSocket, requestTimeout: 100, random: () => 0 };
  const link = new RelayLink("ws://fake/ws", options);
  await link.login("1234");
  const result = { states: [link.state] };
  link.on("state", (state) => result.states.push(state));

  // A request without a reply is rejected after the timeout.
  result.timeout = await link.send("c1", "hi").then(
    () => "sent",
    (error) => error instanceof RequestTimeout,
  );

  // Pushes go to the subscription of their resource AND resourceId, each once, in order.
  const events = { c1: [], c2: [] };
  const handlers = (chat) => ({
    onSnapshot: (data, { reset }) => events[chat].push(["snapshot", data.messages.length, reset]),
    onEvent: (data, seq) => events[chat].push(["event", data.text, seq]),
    onResumed: () => events[chat].push(["resumed"]),
  });
  const c1 = link.subscribe("chat", "c1", handlers("c1"));
  const c2 = link.subscribe("chat", "c2", handlers("c2"));
  const first = sockets[0];
  await until(() => first.subscribes().length === 2);
  const [s1, s2] = first.subscribes();
  first.subscribed(s1, 5, "E1", { data: { messages: [{}] } });
  first.subscribed(s2, 0, "E2", { data: { messages: [] } });
  await Promise.all([c1.ready, c2.ready]);
  first.chunk("c1", 6, "a");
  first.chunk("c2", 1, "b");
  first.chunk("c1", 6, "a again");
  first.chunk("c1", 7, "c");
  // A gap: the link does not pass it on, it takes a fresh snapshot.
  first.chunk("c1", 9, "after a gap");
  await until(() => first.subscribes().length === 3);
  result.resync = first.subscribes()[2];
  first.subscribed(result.resync, 12, "E1", { data: { messages: [{}, {}] } });
  await until(() => events.c1.length === 4);

  // A lost connection: reconnect, authenticate, resume each subscription where it was.
  first.onclose({ code: 1006, reason: "" });
  await until(() => sockets.length === 2 && sockets[1].subscribes().length === 2);
  const second = sockets[1];
  result.auth = second.sent[0];
  result.resubscribes = second.subscribes();
  const [r1, r2] = result.resubscribes;
  second.subscribed(r1, 12, "E1", { resumed: true });
  second.subscribed(r2, 3, "E3", { reset: true, data: { messages: [{}, {}, {}] } });
  second.chunk("c1", 13, "missed"); // right behind the reply
  await until(() => link.state === State.CONNECTED && events.c1.length === 6);
  result.events = structuredClone(events);

  // A subscription closed while a reconnect resubscribes (its chat deleted meanwhile, or
  // left): once the others have answered, the link is connected all the same.
  second.onclose({ code: 1006, reason: "" });
  await until(() => sockets.length === 3 && sockets[2].subscribes().length === 2);
  const third = sockets[2];
  const [t1, t2] = third.subscribes();
  c2.close();
  third.subscribed(t1, 13, "E1", { resumed: true });
  third.subscribed(t2, 3, "E3", { resumed: true });
  await until(() => link.state === State.CONNECTED);
  result.connectedAfterClosing = link.state === State.CONNECTED;
  link.logout();
  return result;
}
