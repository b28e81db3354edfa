// signin.js: how the page signs in (app.js's controller): pairing with the PIN and a device
// name, signing in again with the stored device token, a refused or ended session shown on
// the sign-in screen, and signing out. These are methods of the controller, written here and
// installed on its prototype by app.js; they use its state, its link and `dispatch`.

import { deviceNameProblem } from "./device-name.js";
import { forgetDevice, keepDevice, keepDeviceName, proposedDeviceName, storedDevice } from "./storage.js";
import { describeFailure, deviceGone, parseHash } from "./view.js";
import { AuthFailed, ConnectionLost } from "./ws-link.js";

/** A sign-in's or a session's error as the data view.js describes. */
function failureOf(error) {
  if (!error) return null;
  const kind = error instanceof AuthFailed ? "auth" : error instanceof ConnectionLost ? "lost" : "other";
  return {
    kind,
    code: error.code ?? null,
    message: String(error.message ?? error),
    retryAfter: error.retryAfter ?? null,
    closeCode: error.closeCode ?? null,
  };
}

export class SignInMethods {
  // --- signing in ---
  //
  // A browser is paired once, with the PIN and a device name; the relay answers with a
  // device token, kept in localStorage, and every later sign-in (reloads, relay restarts,
  // reconnects) uses the token. A refused sign-in is never retried by itself: the page says
  // why and waits for the user (a retry with the same secret would only feed the lockout).

  /** The sign-in screen: the PIN and a device name, or "paired as ..." with a stored token. */
  showLogin({ error = "", wait = 0 } = {}) {
    const device = storedDevice();
    const mode = device ? "token" : "pin";
    const nameInput = this.$("device-name-input");
    if (!nameInput.value.trim()) nameInput.value = proposedDeviceName();
    this.dispatch({ type: "login-shown", mode, pairedName: device ? device.name : "", error, wait });
    if (mode === "pin") this.then(() => this.$("pin-input").focus());
  }

  sessionEnded(error) {
    const failure = failureOf(error);
    if (deviceGone(failure)) forgetDevice();
    const { text, wait } = describeFailure(failure, storedDevice() ? "token" : "pin", this.link.url);
    this.showLogin({ error: text, wait });
  }

  /** Keeps what the relay said about this device: its token (on pairing), id and name. */
  keepPairing(token) {
    const device = this.link.session && this.link.session.device;
    if (!device || typeof device.id !== "string") return;
    const secret = typeof device.token === "string" && device.token ? device.token : token;
    if (!secret) return;
    keepDevice({ token: secret, id: device.id, name: device.name ?? "" });
  }

  async signInWithToken() {
    const device = storedDevice();
    if (!device) {
      this.showLogin();
      return;
    }
    this.dispatch({ type: "signin-started" });
    const { attempt } = this.state.login;
    try {
      // Nobody is at the keyboard yet: a relay that is down (restarting) is waited for.
      await this.link.login({ token: device.token }, { keepTrying: true });
    } catch (error) {
      if (attempt !== this.state.login.attempt) return; // signed out meanwhile
      const failure = failureOf(error);
      // A token the relay refuses for any reason but a lockout (token_invalid; bad_request
      // from a relay that does not pair) will not work next time either: back to the PIN.
      if (deviceGone(failure) || (failure.kind === "auth" && failure.code !== "locked_out")) forgetDevice();
      const { text, wait } = describeFailure(failure, "token", this.link.url);
      this.showLogin({ error: text, wait });
      return;
    }
    if (attempt !== this.state.login.attempt) return;
    this.keepPairing(device.token);
    this.enterWorkspace(attempt);
  }

  async signInWithPin() {
    const pinInput = this.$("pin-input");
    const nameInput = this.$("device-name-input");
    const pin = pinInput.value;
    const name = nameInput.value.trim();
    if (!pin) {
      this.dispatch({ type: "login-error", text: "Enter the PIN." });
      pinInput.focus();
      return;
    }
    const problem = deviceNameProblem(name);
    if (problem) {
      this.dispatch({ type: "login-error", text: problem });
      nameInput.focus();
      return;
    }
    keepDeviceName(name);
    this.dispatch({ type: "signin-started" });
    const { attempt } = this.state.login;
    try {
      await this.link.login({ pin, deviceName: name });
    } catch (error) {
      if (attempt !== this.state.login.attempt) return;
      const { text, wait } = describeFailure(failureOf(error), "pin", this.link.url);
      this.dispatch({ type: "signin-failed", attempt, text, wait });
      pinInput.select();
      return;
    }
    if (attempt !== this.state.login.attempt) return;
    pinInput.value = "";
    this.keepPairing(null);
    this.enterWorkspace(attempt);
  }

  enterWorkspace(attempt) {
    this.dispatch({
      type: "signed-in",
      attempt,
      device: this.link.device,
      wanted: parseHash(this.window.location.hash),
    });
  }

  /** Sign out: the connection closes and this browser forgets its token (the relay keeps
   * the device until it is revoked with `trio-relay devices --revoke`). */
  signOut() {
    this.link.logout();
    forgetDevice();
    this.dispatch({ type: "sign-out" });
    this.then(() => this.$("pin-input").focus());
  }
}
