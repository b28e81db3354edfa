// storage.js: what this browser keeps, in localStorage (per relay origin).
//
// The device token the relay gave when this browser was paired (with its id and name):
// with it a reload or a relay restart signs in without the PIN. Nothing else secret is kept.
// Besides it: the device name typed last, and the chat open last in each project.

import { defaultDeviceName } from "./device-name.js";

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
export function storedDevice() {
  const device = readStorage(DEVICE_KEY);
  if (!device || typeof device.token !== "string" || !device.token) return null;
  return {
    token: device.token,
    id: typeof device.id === "string" ? device.id : null,
    name: typeof device.name === "string" ? device.name : "",
  };
}

export function keepDevice({ token, id, name }) {
  writeStorage(DEVICE_KEY, { token, id, name });
}

export function forgetDevice() {
  writeStorage(DEVICE_KEY, null);
}

/** The name typed last, else one from the browser. */
export function proposedDeviceName() {
  const saved = readStorage(DEVICE_NAME_KEY);
  return typeof saved === "string" && saved.trim() ? saved : defaultDeviceName();
}

export function keepDeviceName(name) {
  writeStorage(DEVICE_NAME_KEY, name);
}

/** `{projectId: chatId}`: the chat this browser had open last in each project. */
export function lastChats() {
  const last = readStorage(LAST_CHATS_KEY);
  return last && typeof last === "object" && !Array.isArray(last) ? last : {};
}

export function rememberChat(projectId, chatId) {
  const chats = lastChats();
  if (chats[projectId] === chatId) return;
  chats[projectId] = chatId;
  writeStorage(LAST_CHATS_KEY, chats);
}
