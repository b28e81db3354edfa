// Runs a ws-link.js scenario (tests/ws_link_*scenario.js) in Node and prints its result as
// JSON: `node tests/js/run_scenario.mjs FILE`. A scenario is one async function written for
// a page, which imports "/ws-link.js"; here that is the package's file. tests/test_ws_link.py
// checks the result.

import { readFileSync } from "node:fs";

const web = new URL("../../trio_relay/web/", import.meta.url);
let imports = 0;
const source = readFileSync(process.argv[2], "utf8").replace(/import\("\/([\w.-]+\.js)"\)/g, (_, name) => {
  imports += 1;
  return `import(${JSON.stringify(new URL(name, web).href)})`;
});
if (imports === 0) throw new Error(`${process.argv[2]} imports no module of the page`);
const scenario = (0, eval)(source); // a test's own file, run in Node (no page, no CSP)
// The link may leave timers behind (a request timeout, a backoff): they do not matter now.
process.stdout.write(JSON.stringify(await scenario()), () => process.exit(0));
