// ws-link.js's side of pairing (#18), over a scripted fake WebSocket: a PIN sign-in that pairs
// switches the link to the device token for every reconnect; a token sign-in with keepTrying
// waits out a relay that cannot be reached; a refused token ends the session and nothing is
// tried again. Run in the page by tests/test_browser.py and in Node by tests/test_ws_link.py;
// both check the result with tests/_js.py.
async () => {
  const { AuthFailed, RelayLink, State } = await import("/ws-link.js");
  const sockets = [];
  let answer = null; // (auth frame) -> reply fields, or "drop" to close without answering
  class FakeSocket {
    constructor() {
      this.sent = [];
      sockets.push(this);
      queueMicrotask(() => this.onopen());
    }
    send(text) {
      const frame = JSON.parse(text);
      this.sent.push(frame);
      if (frame.type !== "auth") return;
      const reply = answer(frame);
      if (reply === "drop") {
        queueMicrotask(() => this.onclose({ code: 1006, reason: "" }));
      } else {
        queueMicrotask(() => this.onmessage({ data: JSON.stringify({ id: frame.id, ...reply }) }));
      }
    }
    close() {}
  }
  const until = async (predicate) => {
    for (let i = 0; i < 100 && !predicate(); i++) await new Promise((r) => setTimeout(r, 0));
    if (!predicate()) throw new Error(`the link did not get there: ${predicate}`);
  };
  const session = { projects: [], modelProfiles: [] };
  const device = { id: "d_0123456789ab", name: "Phone" };
  const options = { WebSocket: FakeSocket, requestTimeout: 1000, random: () => 0 };
  const result = {};

  // 1. Pairing: the PIN and the name go out once; after that, only the token.
  answer = (frame) => ({ type: "auth_success",
                         data: { ...session, device: frame.pin ? { ...device, token: "T1" } : device } });
  const link = new RelayLink("ws://fake/ws", options);
  const data = await link.login({ pin: "1234", deviceName: "Phone" });
  result.pairedWith = sockets[0].sent[0];
  result.tokenGiven = data.device.token;
  result.device = link.device;
  sockets[0].onclose({ code: 1006, reason: "" });
  await until(() => sockets.length === 2 && link.state === State.CONNECTED);
  result.reconnectedWith = sockets[1].sent[0];

  // 2. The relay forgot the device: the reconnect is refused, the session ends, and the link
  //    does not try again.
  answer = () => ({ type: "auth_failed", error: "Unknown or revoked device token", code: "token_invalid" });
  sockets[1].onclose({ code: 1006, reason: "" });
  await until(() => link.state === State.CLOSED);
  result.endedWith = { code: link.error.code, isAuthFailed: link.error instanceof AuthFailed };
  await new Promise((r) => setTimeout(r, 50));
  result.socketsAfterRefusal = sockets.length;

  // 3. A token sign-in with keepTrying: the first two connections drop before any answer;
  //    the link retries, and resolves once the relay answers.
  let drops = 2;
  answer = () => (drops-- > 0 ? "drop" : { type: "auth_success", data: { ...session, device } });
  const states = [];
  const patient = new RelayLink("ws://fake/ws", options);
  patient.on("state", (state) => states.push(state));
  const before = sockets.length;
  await patient.login({ token: "T1" }, { keepTrying: true });
  result.patientSockets = sockets.length - before;
  result.patientStates = [...states];
  result.patientAuths = sockets.slice(before).map((socket) => socket.sent[0]);

  // 4. Without keepTrying, the same failure rejects the login at once.
  drops = 1;
  const hasty = new RelayLink("ws://fake/ws", options);
  result.hasty = await hasty.login({ token: "T1" }).then(() => "signed in", (error) => error.name);

  // 5. A locked-out answer carries retryAfter, and is not retried either.
  answer = () => ({ type: "auth_failed", code: "locked_out", retryAfter: 42,
                    error: "Too many failed attempts; try again in 42 seconds" });
  const locked = new RelayLink("ws://fake/ws", options);
  const lockedBefore = sockets.length;
  result.locked = await locked.login({ token: "T1" }, { keepTrying: true }).then(
    () => null,
    (error) => ({ name: error.name, code: error.code, retryAfter: error.retryAfter }),
  );
  await new Promise((r) => setTimeout(r, 50));
  result.lockedSockets = sockets.length - lockedBefore;
  link.logout();
  patient.logout();
  return result;
}
