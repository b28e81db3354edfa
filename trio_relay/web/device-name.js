// device-name.js: the name this browser proposes when it is paired with the relay, such as
// "Firefox on Android" or "Chrome on Linux", and the relay's rule for device names. No DOM:
// it reads only what it is given (navigator by default).

const BROWSERS = [
  // [pattern in the user agent, name]; the first that matches wins, so the ones whose user
  // agents also say "Chrome" or "Safari" come first.
  [/\bEdg(e|A|iOS)?\//, "Edge"],
  [/\bOPR\/|\bOpera\b/, "Opera"],
  [/\bSamsungBrowser\//, "Samsung Internet"],
  [/\bVivaldi\//, "Vivaldi"],
  [/\bFirefox\/|\bFxiOS\//, "Firefox"],
  [/\bHeadlessChrome\//, "Headless Chrome"],
  [/\bChromium\//, "Chromium"],
  [/\bChrome\/|\bCriOS\//, "Chrome"],
  [/\bSafari\//, "Safari"],
];
const SYSTEMS = [
  [/\bAndroid\b/, "Android"],
  [/\biPhone\b/, "iPhone"],
  [/\biPad\b/, "iPad"],
  [/\bCrOS\b/, "ChromeOS"],
  [/\bWindows\b/, "Windows"],
  [/\bMac OS X\b|\bMacintosh\b/, "macOS"],
  [/\bLinux\b|\bX11\b/, "Linux"],
];
const UA_DATA_BRANDS = new Map([
  ["Microsoft Edge", "Edge"], ["Opera", "Opera"], ["Google Chrome", "Chrome"],
  ["Samsung Internet", "Samsung Internet"], ["Vivaldi", "Vivaldi"], ["Brave", "Brave"],
  ["HeadlessChrome", "Headless Chrome"], ["Chromium", "Chromium"],
]);
const UA_DATA_SYSTEMS = new Map([
  ["Android", "Android"], ["Chrome OS", "ChromeOS"], ["Chromium OS", "ChromeOS"],
  ["iOS", "iPhone"], ["Linux", "Linux"], ["macOS", "macOS"], ["Windows", "Windows"],
]);

/** A name for this browser such as "Firefox on Android", from what the browser tells. */
export function defaultDeviceName(nav = navigator) {
  const userAgent = String(nav.userAgent ?? "");
  let browser = BROWSERS.find(([pattern]) => pattern.test(userAgent))?.[1] ?? null;
  let system = SYSTEMS.find(([pattern]) => pattern.test(userAgent))?.[1] ?? null;
  // Client hints are exact where they exist (Chromium's): prefer a known brand, the most
  // specific first (every Chromium browser also lists "Chromium").
  // (Only Chromium browsers have them: a user agent that says Firefox or Safari is taken at
  // its word, even in a Chromium pretending to be one.)
  const data = nav.userAgentData;
  const chromiumFamily = browser === null || !["Firefox", "Safari"].includes(browser);
  if (chromiumFamily && data && Array.isArray(data.brands)) {
    const brands = data.brands.map((entry) => entry.brand);
    const known = [...UA_DATA_BRANDS.keys()].find((brand) => brands.includes(brand));
    if (known) browser = UA_DATA_BRANDS.get(known);
    if (UA_DATA_SYSTEMS.has(data.platform)) system = UA_DATA_SYSTEMS.get(data.platform);
  }
  if (browser && system) return `${browser} on ${system}`;
  return browser ?? (system ? `Browser on ${system}` : "Web browser");
}

/** Why a device name would be refused (the relay's rule: 1..64 characters, no control
 * characters), or "" if it is fine. */
export function deviceNameProblem(name) {
  if (!name) return "Enter a name for this device.";
  if ([...name].length > 64) return "The device name is too long (64 characters at most).";
  if (/[\u0000-\u001f\u007f-\u009f]/.test(name)) return "The device name has control characters.";
  return "";
}
