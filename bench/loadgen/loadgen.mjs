// Load generator of bench/fanout.py: one scenario against one server, then a JSON result.
//
//     node bench/loadgen/loadgen.mjs '<spec as JSON>'
//
// bench/fanout.py starts it once per measurement; it is not meant to be run by hand. It
// opens a control connection (auth, `create` a chat, then every `send`), connects
// `subscribers` clients (auth, subscribe to that chat), and then, as the spec says,
// measures the server's memory, sends pushes and times their delivery. It prints progress on
// stderr and one JSON object on stdout, and exits 0 when it ran to the end (the result's
// `violations` say whether every subscriber got every push exactly once and in order),
// 2 when the scenario could not be run (the result's `error` says why).
//
// One process, one thread, one clock (process.hrtime): a send's time is stamped into the
// message it sends, and each subscriber's receipt is timed against that stamp. CPU figures
// come from /proc/<pid>/stat (the server, with its child processes) and process.cpuUsage()
// (this process), both taken at the edges of each measured window.
//
// Several servers (bench/scaleout.py): `urls` spreads the subscribers over them in turn (the
// control connection uses `url`), `serverPids` names every server process whose CPU counts
// (per process in `serverCpuByPidS` too), and `redisPort` reads that Redis's INFO at the edges
// of each window (its commands, its own CPU time).

import fs from 'node:fs';
import net from 'node:net';
import { WebSocket } from 'ws';

const spec = JSON.parse(process.argv[2] ?? '{}');
const T0 = process.hrtime.bigint();
/** Microseconds since this process started measuring (a float; plenty of precision). */
const now = () => Number(process.hrtime.bigint() - T0) / 1000;

const MAX_VIOLATIONS_KEPT = 20;
const violations = [];
let violationCount = 0;
function violation(text) {
  violationCount += 1;
  if (violations.length < MAX_VIOLATIONS_KEPT) violations.push(text);
}

function log(text) {
  if (!spec.quiet) process.stderr.write(`loadgen: ${text}\n`);
}

class Abort extends Error {}

// --- /proc ------------------------------------------------------------------------------

function readProc(path) {
  try {
    return fs.readFileSync(path, 'utf8');
  } catch {
    return null;
  }
}

/** The pid and its live descendants (through /proc/<pid>/task/<tid>/children). */
function processTree(pid) {
  const seen = [];
  const todo = [pid];
  while (todo.length > 0) {
    const p = todo.pop();
    seen.push(p);
    let tasks = [];
    try {
      tasks = fs.readdirSync(`/proc/${p}/task`);
    } catch {
      continue;
    }
    for (const tid of tasks) {
      const children = readProc(`/proc/${p}/task/${tid}/children`);
      if (children) for (const c of children.trim().split(/\s+/)) if (c) todo.push(Number(c));
    }
  }
  return seen;
}

const SERVER_PIDS = spec.serverPids ?? [spec.serverPid];

/** Seconds of CPU (user + system, all threads) used by one server and its children. */
function treeCpuSeconds(root) {
  let ticks = 0;
  for (const pid of processTree(root)) {
    const stat = readProc(`/proc/${pid}/stat`);
    if (stat === null) continue;
    // Fields after the command name, which is in parentheses and may hold spaces: the
    // first is field 3 (state); utime, stime, cutime, cstime are fields 14 to 17.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    ticks += Number(fields[11]) + Number(fields[12]) + Number(fields[13]) + Number(fields[14]);
  }
  return ticks / spec.clkTck;
}

/** Seconds of CPU of each server process (with its children), by pid. */
function serverCpuByPid() {
  return Object.fromEntries(SERVER_PIDS.map((pid) => [pid, treeCpuSeconds(pid)]));
}

/** Seconds of CPU used by every server process and their children. */
function serverCpuSeconds() {
  return Object.values(serverCpuByPid()).reduce((a, b) => a + b, 0);
}

/** INFO stats, cpu, memory and commandstats of the Redis at spec.redisPort, parsed; null if none. */
function redisInfo() {
  if (!spec.redisPort) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const sock = net.createConnection({ host: '127.0.0.1', port: spec.redisPort });
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Abort('Redis did not answer INFO within 10 s'));
    }, 10000);
    let buf = Buffer.alloc(0);
    sock.on('connect', () => sock.write('INFO stats cpu memory commandstats\r\n'));
    sock.on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      const eol = buf.indexOf('\r\n');
      if (eol < 0) return;
      if (buf[0] !== 36 /* $ */) {
        clearTimeout(timer);
        sock.destroy();
        reject(new Abort(`Redis answered INFO with ${buf.toString().slice(0, 200)}`));
        return;
      }
      const length = Number(buf.subarray(1, eol).toString());
      if (buf.length < eol + 2 + length) return;
      clearTimeout(timer);
      sock.destroy();
      const info = { commands: {} };
      for (const line of buf.subarray(eol + 2, eol + 2 + length).toString().split('\r\n')) {
        const cmd = /^cmdstat_(\S+):calls=(\d+),usec=(\d+)/.exec(line);
        if (cmd) {
          info.commands[cmd[1]] = { calls: Number(cmd[2]), usec: Number(cmd[3]) };
          continue;
        }
        const kv = /^(total_commands_processed|used_cpu_sys|used_cpu_user|used_memory):([\d.]+)$/.exec(line);
        if (kv) info[kv[1]] = Number(kv[2]);
      }
      resolve(info);
    });
    sock.on('error', (err) => {
      clearTimeout(timer);
      reject(new Abort(`Redis INFO: ${err.message}`));
    });
  });
}

/** What Redis did between two INFOs: commands (calls, usec), its CPU seconds. */
function redisDelta(before, after) {
  if (before === null || after === null) return null;
  const commands = {};
  for (const [name, a] of Object.entries(after.commands)) {
    const b = before.commands[name] ?? { calls: 0, usec: 0 };
    if (a.calls > b.calls) commands[name] = { calls: a.calls - b.calls, usec: a.usec - b.usec };
  }
  return {
    commands,
    // Every command, those a script ran included, less the INFO that read this one.
    commandsProcessed: after.total_commands_processed - before.total_commands_processed - 1,
    cpuS: (after.used_cpu_sys + after.used_cpu_user) - (before.used_cpu_sys + before.used_cpu_user),
    usedMemoryBytes: after.used_memory,
    usedMemoryGrowthBytes: after.used_memory - before.used_memory,
  };
}

/** The server's resident and proportional set sizes, in KiB (children included). */
function serverMemory() {
  let rssKiB = 0;
  let pssKiB = 0;
  for (const pid of processTree(spec.serverPid)) {
    const status = readProc(`/proc/${pid}/status`) ?? '';
    const rss = /^VmRSS:\s+(\d+) kB/m.exec(status);
    if (rss) rssKiB += Number(rss[1]);
    const rollup = readProc(`/proc/${pid}/smaps_rollup`) ?? '';
    const pss = /^Pss:\s+(\d+) kB/m.exec(rollup);
    if (pss) pssKiB += Number(pss[1]);
  }
  return { rssKiB, pssKiB };
}

/** Open file descriptors of the server process (not its children). */
function serverFds() {
  try {
    return fs.readdirSync(`/proc/${spec.serverPid}/fd`).length;
  } catch {
    return null;
  }
}

/** Seconds of CPU the whole machine has been busy (every CPU, everything but idle). */
function machineBusySeconds() {
  const line = (readProc('/proc/stat') ?? '').split('\n', 1)[0];
  // cpu  user nice system idle iowait irq softirq steal guest guest_nice
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / spec.clkTck;
}

/** A measuring window: wall time, server CPU and this process's CPU between two points. */
function startWindow() {
  return {
    t: now(), server: serverCpuByPid(), own: process.cpuUsage(), busy: machineBusySeconds(),
  };
}
function endWindow(start) {
  const seconds = (now() - start.t) / 1e6;
  const byPid = serverCpuByPid();
  const serverCpuByPidS = Object.fromEntries(
    Object.entries(byPid).map(([pid, s]) => [pid, s - (start.server[pid] ?? 0)]));
  const serverCpuS = Object.values(serverCpuByPidS).reduce((a, b) => a + b, 0);
  const own = process.cpuUsage(start.own);
  const loadgenCpuS = (own.user + own.system) / 1e6;
  // Whatever else ran on the machine meanwhile (other processes, the kernel's own work).
  const otherCpuS = Math.max(0, machineBusySeconds() - start.busy - serverCpuS - loadgenCpuS);
  return {
    seconds,
    serverCpuS,
    serverCpuByPidS,
    serverCpuShare: seconds > 0 ? serverCpuS / seconds : 0,
    loadgenCpuS,
    loadgenCpuShare: seconds > 0 ? loadgenCpuS / seconds : 0,
    otherCpuShare: seconds > 0 ? otherCpuS / seconds : 0,
  };
}

// --- latency samples ----------------------------------------------------------------------

class Samples {
  constructor() {
    this.values = new Float64Array(1024);
    this.length = 0;
  }
  add(value) {
    if (this.length === this.values.length) {
      const bigger = new Float64Array(this.values.length * 2);
      bigger.set(this.values);
      this.values = bigger;
    }
    this.values[this.length++] = value;
  }
  /** p50, p99 and max in milliseconds (nearest rank), from samples in microseconds. */
  summary() {
    if (this.length === 0) return { samples: 0, p50Ms: null, p99Ms: null, maxMs: null };
    const sorted = this.values.slice(0, this.length).sort();
    const rank = (q) => sorted[Math.min(this.length - 1, Math.ceil(q * this.length) - 1)];
    return {
      samples: this.length,
      p50Ms: rank(0.5) / 1000,
      p99Ms: rank(0.99) / 1000,
      maxMs: sorted[this.length - 1] / 1000,
    };
  }
}

// --- clients ------------------------------------------------------------------------------

const clients = [];
let finished = false; // once true, closes are expected
let chatId = null;
let otherPushes = 0;

// What a send is waiting for: subscribers yet to receive it, and what to do when all have.
const pending = new Map(); // send index -> { remaining, stamp, done }
let samples = new Samples();
let sendsAcked = 0;
let sendsIssued = 0;

function open(url = spec.url) {
  return new WebSocket(url, {
    perMessageDeflate: false,
    skipUTF8Validation: true,
    handshakeTimeout: 30000,
    maxPayload: 16 * 1024 * 1024,
  });
}

/** A subscriber: connect, auth, subscribe; the promise resolves on `subscribed`. */
function connectSubscriber(index) {
  return new Promise((resolve, reject) => {
    const c = {
      // The messages sent before it subscribed are in its snapshot, not pushed.
      index, ws: open(spec.urls ? spec.urls[index % spec.urls.length] : spec.url), expectSeq: -1, expectIndex: sendsIssued, subscribed: false,
      checkedFastPath: false,
    };
    clients.push(c);
    const ws = c.ws;
    ws.on('message', (raw) => {
      if (c.checkedFastPath) {
        const push = readPush(raw);
        if (push !== null) {
          onOurPush(c, push[0], push[1], push[2]);
          return;
        }
      }
      let frame;
      try {
        frame = JSON.parse(raw.toString());
      } catch {
        violation(`subscriber ${index}: a frame that is not JSON`);
        return;
      }
      if (frame.id === null && frame.type === 'data') {
        if (!c.checkedFastPath && c.subscribed) {
          // The first push: the fast reading must agree with the decoded frame.
          const push = readPush(raw);
          const content = frame.data?.message?.content;
          if (push !== null && (push[0] !== frame.seq ||
              `bench:${push[1]}:${push[2].toFixed(1)}` !== content)) {
            violation(`subscriber ${index}: fast reading ${push} of ${raw.toString()}`);
          }
          c.checkedFastPath = true;
        }
        onPush(c, frame);
      } else if (frame.type === 'auth_required') {
        ws.send(JSON.stringify({ id: 'a', type: 'auth', pin: spec.pin }));
      } else if (frame.type === 'auth_success' && frame.id === 'a') {
        ws.send(JSON.stringify({ id: 's', type: 'subscribe', resource: 'chat', resourceId: chatId }));
      } else if (frame.type === 'subscribed' && frame.id === 's') {
        if (!Number.isInteger(frame.seq) || frame.resourceId !== chatId) {
          violation(`subscriber ${index}: bad subscribed frame ${raw.toString().slice(0, 200)}`);
        }
        c.expectSeq = frame.seq + 1;
        c.subscribed = true;
        resolve();
      } else {
        violation(`subscriber ${index}: unexpected frame ${raw.toString().slice(0, 200)}`);
        reject(new Abort(`subscriber ${index} got ${raw.toString().slice(0, 200)}`));
      }
    });
    ws.on('unexpected-response', (req, res) => {
      reject(new Abort(`subscriber ${index}: handshake refused: HTTP ${res.statusCode}`));
    });
    ws.on('error', (err) => {
      if (!finished) reject(new Abort(`subscriber ${index}: ${err.message}`));
    });
    ws.on('close', (code, reason) => {
      if (!finished) {
        violation(`subscriber ${index}: closed early: ${code} ${reason.toString()}`);
        reject(new Abort(`subscriber ${index} closed: ${code} ${reason.toString()}`));
      }
    });
  });
}

function onPush(c, frame) {
  const data = frame.data;
  const message = data && data.type === 'message' ? data.message : null;
  if (!message || message.role !== 'user' || typeof message.content !== 'string') {
    checkSeq(c, frame.seq);
    otherPushes += 1; // e.g. an agent's answer, when the profile is not silent
    return;
  }
  const [tag, indexText, stampText] = message.content.split(':');
  const sendIndex = Number(indexText);
  if (tag !== 'bench' || !Number.isInteger(sendIndex)) {
    checkSeq(c, frame.seq);
    violation(`subscriber ${c.index}: a push that no send of ours made: ${message.content}`);
    return;
  }
  onOurPush(c, frame.seq, sendIndex, Number(stampText));
}

function checkSeq(c, seq) {
  if (seq !== c.expectSeq) {
    violation(`subscriber ${c.index}: push seq ${seq}, expected ${c.expectSeq}`);
  }
  c.expectSeq = seq + 1;
}

function onOurPush(c, seq, sendIndex, stamp) {
  const receivedAt = now();
  checkSeq(c, seq);
  if (sendIndex < c.expectIndex) {
    // Already had it (or a later one): counted once, as it first came.
    violation(`subscriber ${c.index}: got send ${sendIndex} again or late, after` +
      ` ${c.expectIndex - 1}`);
    return;
  }
  if (sendIndex > c.expectIndex) {
    violation(`subscriber ${c.index}: got send ${sendIndex}, expected ${c.expectIndex} (gap)`);
    // The sends it skipped will not come: count them as settled so that the run goes on
    // (and ends with the violations) instead of waiting for them until the deadline.
    for (let k = c.expectIndex; k < sendIndex; k++) settle(c, k, receivedAt);
  }
  c.expectIndex = Math.max(c.expectIndex, sendIndex + 1);
  samples.add(receivedAt - stamp);
  settle(c, sendIndex, receivedAt);
}

/** One subscriber is done with one send; the send is done when every subscriber is. */
function settle(c, sendIndex, at) {
  const p = pending.get(sendIndex);
  if (p === undefined) {
    violation(`subscriber ${c.index}: send ${sendIndex} arrived after everyone had it`);
    return;
  }
  p.remaining -= 1;
  if (p.remaining === 0) {
    pending.delete(sendIndex);
    p.done(at);
  }
}

// The fast path for the pushes of our sends, so that the load generator does not become the
// bottleneck: `seq`, the send index and the stamp are read straight from the frame's bytes,
// without decoding it. Every server writes a push as {"id":null,"type":"data",...} with the
// message's "content":"bench:<index>:<stamp>" and a "seq":<n> field; a frame that does not
// look exactly like that goes through JSON.parse, and so does each subscriber's first push,
// whose fast reading is checked against the decoded frame.
const PUSH_PREFIX = Buffer.from('{"id":null,"type":"data",');
const SEQ_KEY = Buffer.from('"seq":');
const CONTENT_KEY = Buffer.from('"content":"bench:');
const DIGIT_0 = 48;

/** The non-negative number (digits, optionally a '.' and more) at buf[i]; -1 if none. */
function numberAt(buf, i) {
  let value = 0;
  let digits = 0;
  for (; i < buf.length; i++) {
    const d = buf[i] - DIGIT_0;
    if (d < 0 || d > 9) break;
    value = value * 10 + d;
    digits += 1;
  }
  if (digits === 0) return -1;
  if (buf[i] === 46 /* . */) {
    let scale = 0.1;
    for (i += 1; i < buf.length; i++) {
      const d = buf[i] - DIGIT_0;
      if (d < 0 || d > 9) break;
      value += d * scale;
      scale /= 10;
    }
  }
  return value;
}

/** Read a push of ours without decoding it: [seq, send index, stamp], or null. */
function readPush(buf) {
  if (buf.length < PUSH_PREFIX.length ||
      buf.compare(PUSH_PREFIX, 0, PUSH_PREFIX.length, 0, PUSH_PREFIX.length) !== 0) return null;
  const s = buf.lastIndexOf(SEQ_KEY);
  const m = buf.indexOf(CONTENT_KEY);
  if (s < 0 || m < 0) return null;
  const seq = numberAt(buf, s + SEQ_KEY.length);
  let i = m + CONTENT_KEY.length;
  const sendIndex = numberAt(buf, i);
  while (i < buf.length && buf[i] !== 58 /* : */) i++;
  const stamp = numberAt(buf, i + 1);
  if (seq < 0 || sendIndex < 0 || stamp < 0) return null;
  return [seq, sendIndex, stamp];
}

// Replies to the control connection's sends, by send index: what to do when one comes.
const ackWaiters = new Map();

/**
 * The control connection: auth, then `create` chats (control.createChat()) and every `send`;
 * it is never subscribed. Resolves once authenticated.
 */
function connectControl() {
  return new Promise((resolve, reject) => {
    const ws = open();
    const creating = new Map(); // request id -> [resolve, reject]
    let nextCreate = 0;
    const control = {
      ws,
      /** Create a chat with the benchmark's model profile; resolves to its id. */
      createChat() {
        const id = `c${nextCreate++}`;
        const modelProfileId = spec.modelProfileId;
        ws.send(JSON.stringify({
          id, type: 'create', resource: 'chat', resourceId: spec.projectId,
          message: modelProfileId ? { title: 'bench', modelProfileId } : { title: 'bench' },
        }));
        return new Promise((res, rej) => creating.set(id, [res, rej]));
      },
    };
    ws.on('message', (raw) => {
      const frame = JSON.parse(raw.toString());
      if (frame.type === 'auth_required') {
        ws.send(JSON.stringify({ id: 'a', type: 'auth', pin: spec.pin }));
      } else if (frame.type === 'auth_success') {
        resolve(control);
      } else if (creating.has(frame.id) && frame.type === 'data' && frame.resourceId) {
        const [res] = creating.get(frame.id);
        creating.delete(frame.id);
        res(frame.resourceId);
      } else if (typeof frame.id === 'number' && frame.type === 'data' && frame.data?.sent) {
        sendsAcked += 1;
        const waiter = ackWaiters.get(frame.id);
        if (waiter !== undefined) {
          ackWaiters.delete(frame.id);
          waiter();
        }
      } else {
        violation(`control: unexpected frame ${raw.toString().slice(0, 300)}`);
        const failure = new Abort(`control connection got ${raw.toString().slice(0, 300)}`);
        for (const [, rej] of creating.values()) rej(failure);
        creating.clear();
        reject(failure);
      }
    });
    ws.on('unexpected-response', (req, res) => {
      reject(new Abort(`control: handshake refused: HTTP ${res.statusCode}`));
    });
    ws.on('error', (err) => reject(new Abort(`control: ${err.message}`)));
    ws.on('close', (code, reason) => {
      if (!finished) {
        violation(`control connection closed early: ${code} ${reason.toString()}`);
        reject(new Abort(`control closed: ${code} ${reason.toString()}`));
      }
    });
  });
}

async function connectAll(count, concurrency) {
  let next = 0;
  let failure = null;
  const worker = async () => {
    while (next < count && failure === null) {
      const i = next++;
      try {
        await connectSubscriber(i);
      } catch (err) {
        failure = failure ?? err;
      }
      if (i > 0 && i % 1000 === 0) log(`${i} subscribers connected`);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  if (failure !== null) throw failure;
}

// --- sending ------------------------------------------------------------------------------

/**
 * Send messages to the chat until `more()` says stop; resolves when every subscriber has the
 * last one and every send is acknowledged. Paced one of two ways:
 * - `ackPaced`: the next message goes out when the server has answered the last `send`
 *   (its `sent` reply), as a user's client does; `maxUndelivered` is a safety net only: the
 *   sender also waits while that many messages have not reached every subscriber yet (a
 *   load generator falling behind would otherwise make the server close subscribers as slow
 *   consumers); `heldBack` counts the times it did, which marks the figure as capped;
 * - otherwise at most `window` messages not yet received by every subscriber.
 * With no subscriber, a message counts as delivered as soon as it is acknowledged.
 */
function sendPhase(control, subscriberCount, mode, more) {
  return new Promise((resolve) => {
    let unacked = 0;
    let undelivered = 0;
    let stopped = false;
    let heldBack = 0;
    let holding = false;
    const free = () => {
      if (mode.ackPaced) {
        if (unacked > 0) return false;
        if (undelivered >= mode.maxUndelivered) {
          if (!holding) heldBack += 1;
          holding = true;
          return false;
        }
        holding = false;
        return true;
      }
      return undelivered < mode.window;
    };
    const pump = () => {
      while (!stopped && free()) {
        if (!more()) {
          stopped = true;
          break;
        }
        const index = sendsIssued++;
        const stamp = now();
        unacked += 1;
        if (subscriberCount > 0) {
          undelivered += 1;
          pending.set(index, {
            remaining: subscriberCount,
            stamp,
            done: () => {
              undelivered -= 1;
              pump();
            },
          });
        }
        ackWaiters.set(index, () => {
          unacked -= 1;
          pump();
        });
        control.ws.send(JSON.stringify({
          id: index, type: 'send', resourceId: chatId, message: `bench:${index}:${stamp.toFixed(1)}`,
        }));
      }
      if (stopped && undelivered === 0 && unacked === 0) resolve(heldBack);
    };
    pump();
  });
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Wait until the server's RSS stops moving, then return its memory. */
async function settledMemory() {
  const s = spec.settle ?? {};
  const interval = s.intervalMs ?? 200;
  const stableFor = s.stableMs ?? 1000;
  const maxMs = s.maxMs ?? 5000;
  const start = now();
  let last = serverMemory();
  let stableSince = now();
  while ((now() - start) / 1000 < maxMs) {
    await sleep(interval);
    const m = serverMemory();
    if (Math.abs(m.rssKiB - last.rssKiB) > Math.max(64, last.rssKiB * 0.002)) stableSince = now();
    last = m;
    if ((now() - stableSince) / 1000 >= stableFor) break;
  }
  return { ...last, settleMs: (now() - start) / 1000 };
}

// --- fan-out and connections -----------------------------------------------------------------

async function run() {
  if (spec.scenario === 'soak') return runSoak();
  const result = { scenario: spec.scenario, subscribers: spec.subscribers };
  log(`${spec.scenario}: ${spec.subscribers} subscribers on ${spec.url}`);
  const control = await connectControl();
  chatId = await control.createChat();
  result.chatId = chatId;

  const n = spec.subscribers;
  const phase = async (name, mode, count, more) => {
    samples = new Samples();
    const issuedBefore = sendsIssued;
    const redisBefore = await redisInfo();
    const w = startWindow();
    const heldBack = await sendPhase(control, count, mode, more);
    const measured = endWindow(w);
    const redis = redisDelta(redisBefore, await redisInfo());
    const sends = sendsIssued - issuedBefore;
    const frames = sends * count;
    return {
      ...measured,
      ...mode,
      heldBack,
      sends,
      sendsPerS: sends / measured.seconds,
      frames,
      framesPerS: frames / measured.seconds,
      // /proc counts CPU in ticks (10 ms): a window with only a few is too short to say.
      serverCpuPerFrameUs: frames > 0 && measured.serverCpuS * spec.clkTck >= 5
        ? (measured.serverCpuS / frames) * 1e6 : null,
      latency: samples.summary(),
      ...(redis === null ? {} : { redis }),
    };
  };
  const ackPaced = { ackPaced: true, maxUndelivered: spec.maxUndelivered ?? 64 };

  // A few messages first, so that every `subscribed` carries a snapshot to read and encode.
  if (spec.seedSends > 0) {
    let left = spec.seedSends;
    await phase('seed', ackPaced, 0, () => left-- > 0);
  }

  if (spec.measureMemory) result.memoryBefore = await settledMemory();

  const connectWindow = startWindow();
  await connectAll(n, spec.connectConcurrency ?? 100);
  const connected = endWindow(connectWindow);
  result.connect = { ...connected, ratePerS: n / connected.seconds };
  log(`connected ${n} in ${connected.seconds.toFixed(2)} s`);

  if (spec.measureMemory) {
    const after = await settledMemory();
    result.memoryAfter = after;
    result.memoryPerConnection = {
      rssKiB: (after.rssKiB - result.memoryBefore.rssKiB) / n,
      pssKiB: (after.pssKiB - result.memoryBefore.pssKiB) / n,
    };
  }

  if (spec.warmupSends > 0) {
    let left = spec.warmupSends;
    await phase('warmup', ackPaced, n, () => left-- > 0);
  }
  // The publisher sends the next message when the last one is acknowledged, for a while.
  if (spec.sendSeconds > 0 || spec.sendCount > 0) {
    const until = now() + (spec.sendSeconds ?? 0) * 1e6;
    let left = spec.sendCount;
    result.send = await phase('send', ackPaced, n, () =>
      (spec.sendCount ? left-- > 0 : now() < until));
    log(`acknowledged sends: ${result.send.sendsPerS.toFixed(0)}/s,` +
      ` ${result.send.serverCpuPerFrameUs?.toFixed(2)} µs/frame,` +
      ` p99 ${result.send.latency.p99Ms} ms, held back ${result.send.heldBack}`);
  }
  if (spec.broadcastSends > 0) {
    let left = spec.broadcastSends;
    const b = await phase('broadcast', ackPaced, n, () => left-- > 0);
    // One message: the slowest receipt is when all had it.
    result.broadcast = { ...b, allMs: b.latency.maxMs };
    log(`broadcast to ${n}: all had it after ${b.latency.maxMs} ms`);
  }

  // Every subscriber must have had every push, once and in order (checked as they came).
  // Replies to the sends may trail the pushes: give them a moment.
  const ackDeadline = now() + 10e6;
  while (sendsAcked < sendsIssued && now() < ackDeadline) await sleep(10);
  if (sendsAcked !== sendsIssued) {
    violation(`control: ${sendsAcked} sends answered 'sent' of ${sendsIssued}`);
  }
  let short = 0;
  for (const c of clients) {
    if (c.expectIndex !== sendsIssued) {
      short += 1;
      if (short <= 5) {
        violation(`subscriber ${c.index}: had ${c.expectIndex} of ${sendsIssued} pushes`);
      }
    }
  }
  if (short > 5) violation(`... and ${short - 5} more subscribers short of pushes`);
  result.sends = sendsIssued;
  result.otherPushes = otherPushes;
  return result;
}

// --- soak --------------------------------------------------------------------------------------

const SOAK_KINDS = ['clean-close', 'drop-before-auth', 'drop-after-subscribe', 'drop-mid-send'];

/** The relay's /metrics as {name: value} (Prometheus text; names without `trio_relay_`). */
async function readMetrics() {
  const response = await fetch(spec.metricsUrl, { signal: AbortSignal.timeout(10000) });
  if (!response.ok) throw new Abort(`GET ${spec.metricsUrl}: HTTP ${response.status}`);
  const values = {};
  const types = {};
  for (const line of (await response.text()).split('\n')) {
    const type = /^# TYPE trio_relay_(\S+) (\S+)/.exec(line);
    if (type) types[type[1]] = type[2];
    const m = /^trio_relay_(\S+) (\S+)$/.exec(line);
    if (m) values[m[1]] = Number(m[2]);
  }
  return { values, types };
}

/** The gauges that say what is open (everything but uptime), as {name: value}. */
function gauges(metrics) {
  const out = {};
  for (const [name, value] of Object.entries(metrics.values)) {
    if (metrics.types[name] === 'gauge' && name !== 'uptime_seconds') out[name] = value;
  }
  return out;
}

/**
 * Wait until every gauge is back at its idle value (or the deadline passes), then until the
 * server's RSS stops moving; returns what it found.
 */
async function settleToIdle(idle) {
  const start = now();
  let metrics = await readMetrics();
  while ((now() - start) / 1e6 < spec.idleDeadlineSeconds) {
    const g = gauges(metrics);
    if (Object.keys(idle).every((k) => g[k] === idle[k])) break;
    await sleep(250);
    metrics = await readMetrics();
  }
  const idleAfterS = (now() - start) / 1e6;
  const g = gauges(metrics);
  const notIdle = Object.keys(idle).filter((k) => g[k] !== idle[k]);
  const memory = await settledMemory();
  // bench/soak.py --memory-probe: the relay records a mark (bench/memprobe) at this reading.
  if (spec.probeMarks) process.kill(spec.serverPid, 'SIGUSR2');
  return { idleAfterS, notIdle, gauges: g, counters: metrics.values, fds: serverFds(), ...memory };
}

/** One connection that ends as `kind` says; resolves when its socket is gone. */
function soakCycle(kind, ctx) {
  return new Promise((resolve) => {
    const ws = open();
    let done = false;
    const finish = (error) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (error) {
        ctx.errors += 1;
        if (ctx.errorSamples.length < 10) ctx.errorSamples.push(`${kind}: ${error}`);
      }
      resolve();
    };
    const timer = setTimeout(() => {
      ws.terminate();
      finish('no progress within 30 s');
    }, 30000);
    const chat = kind === 'drop-mid-send' ? ctx.sendChat : ctx.subscribeChat;
    ws.on('message', (raw) => {
      const frame = JSON.parse(raw.toString());
      if (frame.type === 'auth_required') {
        if (kind === 'drop-before-auth') {
          ws.terminate();
          return;
        }
        ws.send(JSON.stringify({ id: 'a', type: 'auth', pin: spec.pin }));
      } else if (frame.type === 'auth_success') {
        ws.send(JSON.stringify({ id: 's', type: 'subscribe', resource: 'chat', resourceId: chat }));
      } else if (frame.type === 'subscribed') {
        if (kind === 'clean-close') {
          ws.close(1000, 'bye');
        } else if (kind === 'drop-mid-send') {
          // The message and the subscriber's own push of it are under way as it vanishes.
          ws.send(JSON.stringify({ id: 'm', type: 'send', resourceId: chat, message: 'soak' }),
            () => ws.terminate());
        } else {
          ws.terminate();
        }
      } else if (frame.type === 'data' && frame.id === null) {
        // a push to the chat (another cycle's message): nothing to do
      } else if (frame.type !== 'data') {
        ws.terminate();
        finish(`unexpected frame ${raw.toString().slice(0, 200)}`);
      }
    });
    ws.on('unexpected-response', (req, res) => {
      ws.terminate();
      finish(`handshake refused: HTTP ${res.statusCode}`);
    });
    ws.on('error', (err) => {
      // A drop can race the server's own writes; only a failure to connect is an error.
      if (ws.readyState === WebSocket.CONNECTING) finish(err.message);
    });
    ws.on('close', (code) => {
      if (kind === 'clean-close' && code !== 1000) finish(`closed with ${code}, not 1000`);
      finish(null);
    });
  });
}

/**
 * Run `count` cycles, `concurrency` at a time, the four kinds in turn, and go on until at
 * least `minSeconds` have passed (but never past `seconds`).
 */
async function soakCycles(count, ctx, control, seconds, minSeconds = 0) {
  const until = now() + seconds * 1e6;
  const notBefore = now() + minSeconds * 1e6;
  let next = 0;
  const worker = async () => {
    while ((next < count || now() < notBefore) && now() < until) {
      const i = next++;
      const kind = ctx.order[(ctx.cycles + i) % ctx.order.length];
      await soakCycle(kind, ctx);
      ctx.kinds[kind] += 1;
      if (kind === 'drop-mid-send') {
        // The chat's history is every subscriber's snapshot: move on to a fresh chat now and
        // then, so that the cost of a cycle stays the same from the first to the last.
        ctx.sinceRotation += 1;
        if (ctx.sinceRotation >= spec.rotateEvery) {
          ctx.sinceRotation = 0;
          ctx.sendChat = await control.createChat();
          ctx.chats += 1;
        }
      }
    }
  };
  const started = now();
  await Promise.all(Array.from({ length: Math.min(spec.concurrency, count) }, worker));
  const done = next; // every cycle started has ended
  ctx.cycles += done;
  return { cycles: done, seconds: (now() - started) / 1e6 };
}

async function runSoak() {
  const result = { scenario: 'soak' };
  const control = await connectControl();
  const idleMetrics = await readMetrics();
  const idle = gauges(idleMetrics);
  result.idle = { gauges: idle, counters: idleMetrics.values, fds: serverFds(), ...serverMemory() };
  const ctx = {
    subscribeChat: await control.createChat(), sendChat: await control.createChat(), chats: 2,
    sinceRotation: 0, cycles: 0, errors: 0, errorSamples: [],
    kinds: Object.fromEntries(SOAK_KINDS.map((k) => [k, 0])),
    order: spec.kinds ?? SOAK_KINDS,
  };
  for (const kind of ctx.order) {
    if (!SOAK_KINDS.includes(kind)) throw new Abort(`unknown soak cycle kind ${kind}`);
  }
  log(`soak: ${spec.warmupCycles} warm-up cycles (at least ${spec.warmupMinSeconds ?? 0} s), then ${spec.cycles}, ${spec.concurrency} at a time`);
  // The time bound is for the cycles; waiting for idle after them does not count.
  // At least warmupMinSeconds of cycles: what the relay keeps for a while by design (the
  // histories it keeps for resume_grace after a chat's last subscriber leaves) must reach its
  // steady state before the RSS that the last one is compared with is read.
  result.warmupRun = await soakCycles(spec.warmupCycles, ctx, control, spec.maxSeconds,
    spec.warmupMinSeconds ?? 0);
  result.warmup = await settleToIdle(idle);
  log(`after warm-up: RSS ${result.warmup.rssKiB} KiB, idle after ${result.warmup.idleAfterS.toFixed(1)} s`);
  const startCpu = startWindow();
  result.run = await soakCycles(spec.cycles, ctx, control,
    spec.maxSeconds - result.warmupRun.seconds);
  result.run = { ...result.run, ...endWindow(startCpu) };
  result.run.ratePerS = result.run.cycles / result.run.seconds;
  result.timedOut = result.warmupRun.cycles < spec.warmupCycles || result.run.cycles < spec.cycles;
  log(`${result.run.cycles} cycles in ${result.run.seconds.toFixed(1)} s`);
  result.final = await settleToIdle(idle);
  log(`after the last cycle: RSS ${result.final.rssKiB} KiB, idle after ${result.final.idleAfterS.toFixed(1)} s`);
  result.rssRatio = result.final.rssKiB / result.warmup.rssKiB;
  result.kinds = ctx.kinds;
  result.chats = ctx.chats;
  result.errors = ctx.errors;
  result.errorSamples = ctx.errorSamples;
  return result;
}

function emit(result, exitCode) {
  finished = true;
  result.violationCount = violationCount;
  result.violations = violations;
  fs.writeSync(1, JSON.stringify(result) + '\n');
  for (const c of clients) c.ws.terminate();
  process.exit(exitCode);
}

const deadline = setTimeout(() => {
  emit({ scenario: spec.scenario, error: `deadline of ${spec.deadlineSeconds} s passed` }, 2);
}, (spec.deadlineSeconds ?? 300) * 1000);

run().then(
  (result) => {
    clearTimeout(deadline);
    emit(result, 0);
  },
  (err) => {
    clearTimeout(deadline);
    emit({ scenario: spec.scenario, error: String(err.message ?? err) }, 2);
  },
);
