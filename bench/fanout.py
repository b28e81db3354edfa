"""The benchmark: the relay against a minimal asyncio relay, as a user sees them, in one run.

    python bench/fanout.py                 # the full run (about 8 minutes on 2 cores)
    python bench/fanout.py --write-docs    # the same, then rewrite docs/performance.md's results
    python bench/fanout.py --quick         # about 15 seconds: tiny scale, a smoke test
    python bench/fanout.py --relay-rev REV # the relay as committed at REV (before a change)
    python bench/fanout.py --from-json bench/results/latest.json --write-docs
                                           # no run: tables and docs from earlier results

Servers, each started afresh for every measurement and stopped after it (bench/harness.py):
``relay`` is ``trio-relay serve`` with its default SQLite backend (``bench/relay-bench.toml``:
every chat uses the ``silent`` model profile, so a ``send`` is stored and pushed, and nothing
answers it); ``asyncio`` is ``bench/baseline_asyncio.py``, the same protocol on asyncio and
``websockets``, storing each message in SQLite too. The load comes from
``bench/loadgen/loadgen.mjs`` (Node, ``ws``). Each client speaks the whole protocol: PIN auth,
subscribe (with the chat's snapshot), and one publisher that sends the next message only when
the server has acknowledged the last (its ``sent`` reply). Scenarios, run on the relay and the
baseline one after the other, for ``--rounds`` rounds (medians shown):

- fan-out to N subscribers (100, 1,000): the publisher sends for 5 s: server CPU per delivered
  frame (the cost of storing and dispatching each send included) and the latency from send to
  receipt, p50 and p99, over every receipt;
- K subscribed connections (5,000): the connect + auth + subscribe rate, and the server's
  memory per idle subscribed connection (RSS with the K open less RSS before, after settling,
  divided by K);

then, on the relay only, a soak (bench/soak.py): 50,000 connect/abort cycles of four kinds,
RSS after the last cycle against RSS after a warm-up (2,000 cycles and at least the relay's
resume_grace + 10 s, for kept histories to reach their steady state), and every gauge of
``/metrics`` back to its idle value. Each figure is printed with its ratio to the baseline and
whether it meets its target (docs/performance.md). Every subscriber must get every push
exactly once and in ``seq`` order; a violation, a server that misbehaves or a loadgen failure
fails the run (exit status 1) after the results are written; 2 means it could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness import (
    LABELS,
    RESULTS,
    ROOT,
    SERVERS,
    BenchError,
    Json,
    Server,
    ensure_loadgen,
    export_revision,
    machine,
    machine_busy_share,
    need_tools,
    raise_fd_limit,
    relay_source,
    run_loadgen,
)
from soak import SoakPlan, run_soak, soak_lines, soak_problems

DOC = ROOT / "docs" / "performance.md"
#: A figure measured while the loadgen used more than this share of a core is capped by it.
CAPPED_SHARE = 0.9
#: A figure measured while other processes used more than this share of a core is contended.
CONTENDED_SHARE = 0.15
BEGIN_MARK = "<!-- fanout-results:begin (written by python bench/fanout.py --write-docs) -->"
END_MARK = "<!-- fanout-results:end -->"


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rounds: int
    fanout: tuple[int, ...]
    connections: tuple[int, ...]
    servers: tuple[str, ...]
    send_seconds: float
    send_count: int  # used instead of seconds when > 0 (--quick)
    warmup_frames: int
    seed_sends: int
    max_undelivered: int
    connect_concurrency: int
    settle: Json = field(default_factory=dict)
    soak: Json = field(default_factory=dict)

    def fanout_spec(self, n: int) -> Json:
        return {
            "scenario": "fanout", "subscribers": n, "seedSends": self.seed_sends,
            "warmupSends": max(5, min(500, self.warmup_frames // n)),
            "sendSeconds": 0 if self.send_count else self.send_seconds,
            "sendCount": self.send_count, "maxUndelivered": self.max_undelivered,
            "connectConcurrency": self.connect_concurrency,
            "deadlineSeconds": 90 + self.send_seconds + n / 50,
        }

    def connections_spec(self, k: int) -> Json:
        return {
            "scenario": "connections", "subscribers": k, "seedSends": self.seed_sends,
            "measureMemory": True, "broadcastSends": 1, "maxUndelivered": self.max_undelivered,
            "connectConcurrency": self.connect_concurrency, "settle": self.settle,
            "deadlineSeconds": 90 + k / 50,
        }


FULL = Plan(
    rounds=3, fanout=(100, 1000), connections=(5000,), servers=SERVERS, send_seconds=5.0,
    send_count=0, warmup_frames=20000, seed_sends=5, max_undelivered=64,
    connect_concurrency=100, settle={"intervalMs": 200, "stableMs": 1000, "maxMs": 5000},
    soak={"cycles": 50000, "warmup": 2000, "concurrency": 50, "max_seconds": 480.0},
)
QUICK = Plan(
    rounds=1, fanout=(3,), connections=(20,), servers=SERVERS, send_seconds=1.0,
    send_count=0, warmup_frames=15, seed_sends=2, max_undelivered=64,
    connect_concurrency=10, settle={"intervalMs": 50, "stableMs": 150, "maxMs": 600},
    soak={"cycles": 200, "warmup": 40, "concurrency": 8, "max_seconds": 30.0,
          "settings": {"resume_grace": "1"}, "warmup_seconds": 0.0},
)


# --- summary ---------------------------------------------------------------------------------


def _get(run: Json, *path: str) -> float | None:
    value: Any = run
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


# (key, label, path in a loadgen result, the measuring window the figure comes from: its
# loadgen and other-process CPU shares say whether the figure is capped or contended)
Metric = tuple[str, str, tuple[str, ...], str | None]
FANOUT_METRICS: list[Metric] = [
    ("cpu_us_per_frame", "server CPU per delivered frame (µs)", ("send", "serverCpuPerFrameUs"),
     "send"),
    ("p50_ms", "latency p50, send to receipt (ms)", ("send", "latency", "p50Ms"), "send"),
    ("p99_ms", "latency p99, send to receipt (ms)", ("send", "latency", "p99Ms"), "send"),
    ("sends_per_s", "acknowledged sends/s", ("send", "sendsPerS"), "send"),
    ("frames_per_s", "delivered frames/s", ("send", "framesPerS"), "send"),
    ("server_cpu_pct", "server CPU (% of a core)", ("send", "serverCpuShare"), "send"),
    ("loadgen_cpu_pct", "loadgen CPU (% of a core)", ("send", "loadgenCpuShare"), None),
    ("held_back", "sends held back by the safety net", ("send", "heldBack"), None),
]
CONNECTION_METRICS: list[Metric] = [
    ("rss_kib_per_conn", "memory per idle subscribed connection, RSS (KiB)",
     ("memoryPerConnection", "rssKiB"), None),
    ("pss_kib_per_conn", "the same, PSS (KiB)", ("memoryPerConnection", "pssKiB"), None),
    ("connect_per_s", "connect + auth + subscribe (/s)", ("connect", "ratePerS"), "connect"),
    ("connect_loadgen_cpu_pct", "loadgen CPU while connecting (% of a core)",
     ("connect", "loadgenCpuShare"), None),
    ("broadcast_all_ms", "one message: until all have it (ms)", ("broadcast", "allMs"),
     "broadcast"),
]
PERCENT = {"server_cpu_pct", "loadgen_cpu_pct", "connect_loadgen_cpu_pct"}
COUNTS = {"held_back"}


def summarize(runs: list[Json], plan: Plan) -> Json:
    """Medians over the rounds, per scenario, server and metric, with the loadgen caps."""
    summary: Json = {"fanout": {}, "connections": {}}
    groups = [("fanout", n, FANOUT_METRICS) for n in plan.fanout] + [
        ("connections", k, CONNECTION_METRICS) for k in plan.connections
    ]
    for scenario, size, metrics in groups:
        table: Json = {}
        for key, label, path, window in metrics:
            row: Json = {"label": label}
            for kind in plan.servers:
                mine = [r["result"] for r in runs if r["scenario"] == scenario
                        and r["size"] == size and r["server"] == kind]
                values = [v for v in (_get(r, *path) for r in mine) if v is not None]
                shares = [s for s in (_get(r, window, "loadgenCpuShare") for r in mine)
                          if s is not None] if window else []
                held = [h for h in (_get(r, window, "heldBack") for r in mine)
                        if h is not None] if window else []
                # /proc/stat counts in 10 ms ticks: a shorter window than 0.5 s is not judged.
                others = [s for s in (_get(r, window, "otherCpuShare") for r in mine
                                      if (_get(r, window, "seconds") or 0) >= 0.5)
                          if s is not None] if window else []
                scale = 100.0 if key in PERCENT else 1.0
                row[kind] = {
                    "median": statistics.median(values) * scale if values else None,
                    "rounds": [v * scale for v in values],
                    "capped": any(s > CAPPED_SHARE for s in shares) or any(h > 0 for h in held),
                    "max_loadgen_share": max(shares) if shares else None,
                    "contended": any(s > CONTENDED_SHARE for s in others),
                    "max_other_share": max(others) if others else None,
                }
            a, b = row.get("relay", {}).get("median"), row.get("asyncio", {}).get("median")
            row["ratio"] = (a / b) if a is not None and b else None
            table[key] = row
        summary[scenario][str(size)] = table
    return summary


@dataclass(frozen=True)
class Target:
    label: str
    scenario: str
    size: int
    key: str
    better: str  # "lower" or "higher": the ratio that meets the target
    bound: float


def targets(plan: Plan) -> list[Target]:
    """The targets of docs/performance.md, at the sizes this plan measures."""
    out: list[Target] = []
    if plan.connections:
        k = max(plan.connections)
        out.append(Target(f"bytes per idle subscribed connection, K = {k:,}", "connections", k,
                          "rss_kib_per_conn", "lower", 1.0))
        out.append(Target(f"connect + auth + subscribe rate, K = {k:,}", "connections", k,
                          "connect_per_s", "higher", 0.8))
    for n in plan.fanout:
        out.append(Target(f"server CPU per delivered frame, N = {n:,}", "fanout", n,
                          "cpu_us_per_frame", "lower", 1.0))
    if plan.fanout:
        n = max(plan.fanout)
        out.append(Target(f"p99 latency, send to receipt, N = {n:,}", "fanout", n, "p99_ms",
                          "lower", 1.0))
    return out


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    if key in PERCENT:
        return f"{value:.0f}%"
    if key in COUNTS:
        return f"{value:.0f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _marks(cell: Json) -> str:
    return (" ‡" if cell["capped"] else "") + (" §" if cell["contended"] else "")


def target_table(summary: Json, plan: Plan, soak: Json | None) -> str:
    """One line per target: both figures, the ratio, met or not."""
    out = ["| target | relay | asyncio websockets | relay / asyncio | verdict |",
           "|---|---|---|---|---|"]
    for t in targets(plan):
        row = summary[t.scenario].get(str(t.size), {}).get(t.key)
        if row is None or "relay" not in row or "asyncio" not in row:
            out.append(f"| {t.label} | - | - | - | not measured |")
            continue
        ratio = row["ratio"]
        sign = "≤" if t.better == "lower" else "≥"
        if ratio is None:
            verdict = "not measured"
        else:
            met = ratio <= t.bound if t.better == "lower" else ratio >= t.bound
            verdict = f"{'met' if met else '**not met**'} ({sign} {t.bound:.2f})"
        ratio_text = "-" if ratio is None else f"{ratio:.2f}"
        out.append(f"| {t.label} | {_fmt(row['relay']['median'], t.key)}{_marks(row['relay'])}"
                   f" | {_fmt(row['asyncio']['median'], t.key)}{_marks(row['asyncio'])}"
                   f" | {ratio_text} | {verdict} |")
    if soak is not None:
        out += soak_lines(soak)
    return "\n".join(out)


def tables(summary: Json, plan: Plan) -> str:
    """Every figure as Markdown tables (printed, and pasted into docs/performance.md)."""
    servers = plan.servers
    head = ["", *(LABELS[s] for s in servers)]
    ratio = "relay" in servers and "asyncio" in servers
    if ratio:
        head.append("relay / asyncio")
    out: list[str] = []
    for scenario, title, metrics in (
        ("fanout", "Fan-out to N subscribers, acknowledged sends", FANOUT_METRICS),
        ("connections", "K subscribed connections", CONNECTION_METRICS),
    ):
        out.append(f"**{title}** (median of {plan.rounds} round{'s' * (plan.rounds != 1)})")
        out.append("")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for size, table in summary[scenario].items():
            letter = "N" if scenario == "fanout" else "K"
            out.append(f"| **{letter} = {int(size):,}** |" + " |" * (len(head) - 1))
            for key, _, _, _ in metrics:
                row = table[key]
                cells = [row["label"]]
                for kind in servers:
                    cells.append(_fmt(row[kind]["median"], key) + _marks(row[kind]))
                if ratio:
                    r = row["ratio"]
                    cells.append("-" if r is None or key in PERCENT | COUNTS else f"{r:.2f}")
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out.append(f"‡ capped by the load generator: it used more than {CAPPED_SHARE:.0%} of a core"
               " during that measurement, or the publisher had to wait for it to catch up (the"
               " safety net), in at least one round, so the server may have had more to give.")
    out.append("")
    out.append(f"§ contended: other processes on the machine used more than"
               f" {CONTENDED_SHARE:.0%} of a core during that measurement in at least one"
               " round (judged for measurements of 0.5 s or more).")
    return "\n".join(out)


def flagged(summary: Json, flag: str) -> list[str]:
    """The figures marked ``capped`` or ``contended``, one line each."""
    found = []
    for scenario, sizes in summary.items():
        for size, table in sizes.items():
            letter = "N" if scenario == "fanout" else "K"
            for row in table.values():
                for kind in SERVERS:
                    if kind in row and row[kind][flag]:
                        found.append(f"{letter} = {int(size):,}, {row['label']}, {LABELS[kind]}")
    return found


def doc_section(summary: Json, plan: Plan, meta: Json, soak: Json | None, command: str) -> str:
    m = meta["machine"]
    capped = flagged(summary, "capped")
    contended = flagged(summary, "contended")
    lines = [
        BEGIN_MARK,
        "",
        f"Run of {meta['started'][:16].replace('T', ' ')} UTC, {meta['seconds'] / 60:.1f}"
        f" minutes, bench at commit `{m['commit']}`, the relay's code from"
        f" `{_short_source(meta['relay_source'])}`; before it started, other processes kept"
        f" {meta['busy_before'] * 100:.0f}% of a core busy:",
        "",
        "```sh",
        command,
        "```",
        "",
        f"**The targets** (medians of {plan.rounds} round{'s' * (plan.rounds != 1)}; ratios"
        " are relay / asyncio websockets, measured in the same run)",
        "",
        target_table(summary, plan, soak),
        "",
        "| machine | |",
        "|---|---|",
        f"| cores (nproc) | {m['nproc']} |",
        f"| CPU | {m['cpu']} |",
        f"| memory | {m['memory']} |",
        f"| kernel | Linux {m['kernel']} |",
        f"| Python | {m['python']} |",
        f"| trio / trio-websocket / wsproto | {m['trio']} / {m['trio-websocket']} /"
        f" {m['wsproto']} |",
        f"| websockets | {m['websockets']} |",
        f"| Node.js / ws | {m['node']} / {m['ws']} |",
        f"| RLIMIT_NOFILE | {m['rlimit_nofile']} |",
        "",
        tables(summary, plan),
        "",
        "Capped by the load generator: " + ("; ".join(capped) + "." if capped else "nothing."),
        "",
        "Contended by other processes: "
        + ("; ".join(contended) + "." if contended else "nothing."),
        "",
        END_MARK,
    ]
    return "\n".join(lines)


def _short_source(source: str) -> str:
    """The relay's source relative to the repository, where it is inside it."""
    return source.replace(str(ROOT) + "/", "", 1) if source.startswith(str(ROOT)) else source


def write_docs(section: str) -> None:
    text = DOC.read_text()
    start, end = text.find(BEGIN_MARK), text.find(END_MARK)
    if start < 0 or end < start:
        raise BenchError(f"{DOC} has no {BEGIN_MARK!r} ... {END_MARK!r} section to rewrite")
    DOC.write_text(text[:start] + section + text[end + len(END_MARK):])


# --- the run ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The relay against a minimal asyncio websockets relay, as a user sees"
        " them (docs/performance.md).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny scale, one round, a short soak: a smoke test")
    parser.add_argument("--rounds", type=int, help="rounds of every scenario (default 3)")
    parser.add_argument("--servers", help="comma-separated subset of relay,asyncio")
    parser.add_argument("--fanout", help="subscriber counts for fan-out, e.g. 100,1000")
    parser.add_argument("--connections", help="connection counts, e.g. 5000")
    parser.add_argument("--soak-cycles", type=int,
                        help="cycles of the soak after its warm-up (default 50,000; 0: no soak)")
    parser.add_argument("--soak-warmup", type=int, help="warm-up cycles (default 2,000)")
    parser.add_argument("--soak-warmup-seconds", type=float,
                        help="go on with the soak's warm-up for at least this long (default:"
                        " the relay's resume_grace + 10 s)")
    parser.add_argument("--soak-max-seconds", type=float,
                        help="stop the soak's cycles after this long (default 480)")
    parser.add_argument("--json", type=Path, help="where to write the results as JSON"
                        " (default bench/results/latest.json; quick.json with --quick)")
    parser.add_argument("--write-docs", action="store_true",
                        help="also rewrite the results section of docs/performance.md")
    parser.add_argument("--no-pin-cpus", action="store_true",
                        help="do not pin the server to the first CPU and the loadgen to the last")
    parser.add_argument("--relay-src", type=Path,
                        help="benchmark the trio_relay package of this directory (another"
                        " checkout) instead of the one this Python imports")
    parser.add_argument("--relay-rev", metavar="REV",
                        help="benchmark the relay as committed at this git revision (exported"
                        " with git archive into a temporary directory)")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="run nothing: summarize the results of an earlier run again")
    parser.add_argument("--verbose", action="store_true", help="show the loadgen's progress")
    args = parser.parse_args(argv)
    if args.write_docs and args.quick:
        parser.error("--write-docs takes the full run's figures, not --quick's")
    if args.relay_src is not None and args.relay_rev is not None:
        parser.error("--relay-src and --relay-rev: one or the other")

    if args.from_json is not None:
        earlier = json.loads(args.from_json.read_text())
        if args.write_docs and "--quick" in earlier["meta"]["argv"]:
            parser.error("--write-docs takes the full run's figures, not --quick's")
        fields: Json = {k: tuple(v) if isinstance(v, list) else v
                        for k, v in earlier["meta"]["plan"].items()}
        return write_outputs(earlier["runs"], earlier.get("soak"), earlier["meta"],
                             Plan(**fields), earlier["problems"], args, args.json)

    export = None
    if args.relay_rev is not None:
        try:
            export, args.relay_src = export_revision(args.relay_rev)
        except BenchError as exc:
            parser.error(str(exc))
    if args.relay_src is not None:
        args.relay_src = args.relay_src.resolve()
        if not (args.relay_src / "trio_relay" / "__init__.py").exists():
            parser.error(f"--relay-src {args.relay_src}: no trio_relay package there")

    plan = QUICK if args.quick else FULL
    overrides: Json = {}
    if args.rounds is not None:
        overrides["rounds"] = max(1, args.rounds)
    if args.servers:
        kinds = tuple(s.strip() for s in args.servers.split(",") if s.strip())
        unknown = set(kinds) - set(SERVERS)
        if unknown:
            parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
        overrides["servers"] = tuple(s for s in SERVERS if s in kinds)
    for name in ("fanout", "connections"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = tuple(int(x) for x in value.split(",") if x.strip())
    soak_settings = dict(plan.soak)
    for name, key in (("soak_cycles", "cycles"), ("soak_warmup", "warmup"),
                      ("soak_warmup_seconds", "warmup_seconds"),
                      ("soak_max_seconds", "max_seconds")):
        if getattr(args, name) is not None:
            soak_settings[key] = getattr(args, name)
    overrides["soak"] = soak_settings
    plan = Plan(**{**plan.__dict__, **overrides})
    json_path = args.json or RESULTS / f"{'quick' if args.quick else 'latest'}.json"

    try:
        node, npm = need_tools()
        ensure_loadgen(npm)
        nofile = raise_fd_limit()
        needed = max((*plan.fanout, *plan.connections), default=0) + 100
        if nofile < needed:
            raise BenchError(f"RLIMIT_NOFILE's hard limit is {nofile}; this run needs {needed}")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    cpus = sorted(os.sched_getaffinity(0))
    pin_server = pin_loadgen = None
    if not args.no_pin_cpus and len(cpus) >= 2:
        pin_server, pin_loadgen = {cpus[0]}, {cpus[-1]}
    busy_before = machine_busy_share(0.2 if args.quick else 2.0)
    if busy_before > CONTENDED_SHARE:
        print(f"bench: warning: other processes keep {busy_before:.0%} of a core busy; the"
              " figures they contend with are marked §", file=sys.stderr, flush=True)
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    meta: Json = {"started": started.isoformat(), "machine": machine(node),
                  "argv": sys.argv[1:] if argv is None else list(argv), "plan": plan.__dict__,
                  "relay_source": relay_source(args.relay_src), "busy_before": busy_before,
                  "cpu_pinning": {"server": sorted(pin_server or []),
                                  "loadgen": sorted(pin_loadgen or [])}}
    runs: list[Json] = []
    problems: list[str] = []
    scenarios: list[tuple[str, int, Callable[[int], Json]]] = [
        ("fanout", n, plan.fanout_spec) for n in plan.fanout
    ] + [("connections", k, plan.connections_spec) for k in plan.connections]

    for round_no in range(1, plan.rounds + 1):
        for scenario, size, make_spec in scenarios:
            for kind in plan.servers:  # alternating: relay, asyncio, relay, asyncio, ...
                label = f"round {round_no}/{plan.rounds} {scenario} {size:,} {kind}"
                try:
                    server = Server(kind, pin_server, args.relay_src)
                except BenchError as exc:
                    problems.append(f"{label}: {exc}")
                    print(f"bench: {label}: {exc}", file=sys.stderr, flush=True)
                    continue
                try:
                    result = run_loadgen(node, server, make_spec(size), pin_loadgen,
                                         not args.verbose)
                finally:
                    server_problems = server.stop()
                problems += [f"{label}: server: {p}" for p in server_problems]
                if result.get("error"):
                    problems.append(f"{label}: loadgen: {result['error']}")
                if result.get("violationCount"):
                    problems.append(f"{label}: {result['violationCount']} violations of"
                                    f" exactly-once, in-order delivery: {result['violations']}")
                runs.append({"round": round_no, "scenario": scenario, "size": size,
                             "server": kind, "result": result})
                print(f"bench: {label}: {_one_line(scenario, result)}", file=sys.stderr,
                      flush=True)

    soak: Json | None = None
    if plan.soak.get("cycles", 0) > 0 and "relay" in plan.servers:
        soak_plan = SoakPlan(**plan.soak, settle=plan.settle)
        print(f"bench: soak: {soak_plan.warmup:,} warm-up cycles, then {soak_plan.cycles:,}",
              file=sys.stderr, flush=True)
        soak = run_soak(node, soak_plan, pin_server, pin_loadgen, args.relay_src,
                        not args.verbose)
        problems += [f"soak: {p}" for p in soak_problems(soak)]

    meta["seconds"] = time.monotonic() - t0
    if export is not None:
        export.cleanup()
    return write_outputs(runs, soak, meta, plan, problems, args, json_path)


def write_outputs(runs: list[Json], soak: Json | None, meta: Json, plan: Plan,
                  problems: list[str], args: argparse.Namespace, json_path: Path | None) -> int:
    """Summarize, print the tables, write the JSON and the docs; the exit status."""
    summary = summarize(runs, plan)
    violations = sum(int(r["result"].get("violationCount") or 0) for r in runs)
    command = shlex.join(["python", "bench/fanout.py", *meta["argv"]])
    out: Json = {"ok": not problems, "meta": meta, "summary": summary,
                 "capped": flagged(summary, "capped"),
                 "contended": flagged(summary, "contended"), "violations": violations,
                 "problems": problems, "runs": runs, "soak": soak}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=1) + "\n")
    if args.write_docs:
        write_docs(doc_section(summary, plan, meta, soak, command))

    print(f"command: {command}")
    print(f"relay: {meta['relay_source']}")
    print()
    print(f"**The targets** (medians of {plan.rounds} round{'s' * (plan.rounds != 1)};"
          " relay / asyncio websockets)" + (" -- QUICK: tiny scale, not the targets' sizes"
                                            if "--quick" in meta["argv"] else ""))
    print()
    print(target_table(summary, plan, soak))
    print()
    print(tables(summary, plan))
    print()
    print(f"delivery: {violations} violations of exactly-once, in-order delivery"
          f" in {len(runs)} measurements")
    written = [str(p) for p in (json_path,) if p]
    if args.write_docs:
        written.append(str(DOC))
    print(f"written: {', '.join(written) or 'nothing'}")
    print(f"run time: {meta['seconds']:.0f} s")
    if problems:
        print(f"\nFAILED: {len(problems)} problems:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    return 0


def _one_line(scenario: str, r: Json) -> str:
    if r.get("error"):
        return f"ERROR {r['error']}"
    bits = []
    if scenario == "fanout":
        s, lat = r.get("send", {}), r.get("send", {}).get("latency", {})
        bits.append(f"{s.get('sendsPerS', 0):,.0f} sends/s")
        bits.append(f"{s.get('serverCpuPerFrameUs') or 0:.2f} µs CPU/frame")
        bits.append(f"p50 {lat.get('p50Ms') or 0:.2f} ms p99 {lat.get('p99Ms') or 0:.2f} ms")
        bits.append(f"loadgen {s.get('loadgenCpuShare', 0):.0%}")
        bits.append(f"held back {s.get('heldBack', 0)}")
        bits.append(f"other {s.get('otherCpuShare', 0):.0%}")
    else:
        c, m = r.get("connect", {}), r.get("memoryPerConnection", {})
        bits.append(f"{c.get('ratePerS', 0):,.0f} conn/s")
        bits.append(f"{m.get('rssKiB', 0):.1f} KiB RSS/conn")
        bits.append(f"broadcast {r.get('broadcast', {}).get('allMs') or 0:.1f} ms")
        bits.append(f"loadgen {c.get('loadgenCpuShare', 0):.0%}")
        bits.append(f"other {c.get('otherCpuShare', 0):.0%}")
    if r.get("violationCount"):
        bits.append(f"{r['violationCount']} VIOLATIONS")
    return ", ".join(bits)


if __name__ == "__main__":
    sys.exit(main())
