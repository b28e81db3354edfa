"""Soak: connect/abort cycles against ``trio-relay serve``; memory must level off, nothing stay.

    python bench/soak.py                   # warm-up (2,000 cycles, 40 s), then 50,000 cycles
    python bench/soak.py --cycles 5000     # a shorter run
    python bench/soak.py --quick           # seconds: a smoke test
    python bench/soak.py --kinds drop-mid-send --cycles 10000 --memory-probe /tmp/probe

bench/fanout.py runs it after its fan-out measurements; this command runs it alone. It starts
the relay as bench/fanout.py does (``trio-relay serve``, the default SQLite backend,
``bench/relay-bench.toml``, on loopback) and drives it with the Node load generator
(``bench/loadgen``), ``--concurrency`` cycles at a time, the four kinds in turn:

- ``clean-close``: auth, subscribe, then a closing handshake (1000);
- ``drop-before-auth``: the socket is closed as ``auth_required`` arrives;
- ``drop-after-subscribe``: auth, subscribe, then the socket is closed under the relay;
- ``drop-mid-send``: auth, subscribe, ``send`` a message to that chat and close the socket
  at once, while the relay stores the message, pushes it (to this client too) and answers.

A control connection stays open throughout; the chat that ``drop-mid-send`` writes to is
replaced with a fresh one every 100 of its cycles, so that snapshots stay the same size from
the first cycle to the last.

The warm-up runs ``--warmup`` cycles and goes on for at least ``--warmup-seconds`` (default
the relay's ``resume_grace`` plus 10 s). The relay keeps a chat's recent pushes for
``resume_grace`` (30 s) after its last subscriber leaves, so that a client that drops can
resume; at a thousand cycles a second those kept pushes are megabytes, and CPython keeps the
arenas they occupied once they are freed. A warm-up shorter than that grace period never
reaches the steady state, and the ratio then measures the run's peak of kept pushes rather
than a leak (docs/performance.md, "The soak"). After the warm-up and again after the last
cycle, the soak
waits until every gauge of ``/metrics`` (connections, subscriptions, broadcasters, kept
histories, ...) is back at its idle value (read before the first cycle, with only the
control connection open; kept histories wait out the relay's ``resume_grace``) and the
relay's RSS has stopped moving, then reads RSS. Targets: RSS after the last cycle at most
1.10 times RSS after the warm-up, and every gauge back at its idle value. The cycles stop
after ``--max-seconds`` even if not all ran; that is reported and fails the run.

``--memory-probe DIR`` loads bench/memprobe into the relay's process and prints, every
``--probe-every`` seconds and at the readings after the warm-up and after the last cycle,
the relay's RSS, CPython's object arenas and the bytes allocated in them, SQLite's own
allocations and the objects the collector tracks; ``--probe-frames N`` also traces every
allocation (tracemalloc, N frames: several times slower) and prints what grew between the two
readings, by traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    BENCH,
    BenchError,
    Json,
    Server,
    ensure_loadgen,
    need_tools,
    raise_fd_limit,
    relay_source,
    run_loadgen,
)

#: RSS after the last cycle over RSS after the warm-up: at most this.
RSS_RATIO_TARGET = 1.10
#: How long to wait for the gauges to come back to idle (the relay keeps a chat's history
#: for ``resume_grace``, 30 s by default, after its last subscriber leaves).
IDLE_DEADLINE_SECONDS = 90.0
KINDS = ("clean-close", "drop-before-auth", "drop-after-subscribe", "drop-mid-send")
#: A fresh chat for ``drop-mid-send`` after this many of its cycles.
ROTATE_EVERY = 100
#: The relay's ``resume_grace`` when not set (bench/relay-bench.toml leaves the default).
DEFAULT_RESUME_GRACE = 30.0
#: The warm-up lasts ``resume_grace`` plus this (unless told): time for the histories kept
#: after their last subscriber, and SQLite's page cache (2 MiB), to reach their steady state.
WARMUP_MARGIN_SECONDS = 10.0


@dataclass(frozen=True)
class SoakPlan:
    cycles: int = 50_000
    warmup: int = 2_000
    concurrency: int = 50
    max_seconds: float = 480.0
    settle: Json = field(default_factory=lambda: {"intervalMs": 200, "stableMs": 1000,
                                                  "maxMs": 5000})
    #: The kinds of cycle, run in turn (all four unless told; to find which one costs).
    kinds: tuple[str, ...] = KINDS
    #: Relay settings on top of bench/relay-bench.toml (``--quick`` shortens resume_grace so
    #: that kept histories need not be waited out for 30 s).
    settings: Json = field(default_factory=dict)
    #: The warm-up goes on for at least this long; None: the relay's resume_grace plus
    #: `WARMUP_MARGIN_SECONDS`.
    warmup_seconds: float | None = None

    def warmup_min_seconds(self) -> float:
        if self.warmup_seconds is not None:
            return self.warmup_seconds
        grace = float(self.settings.get("resume_grace", DEFAULT_RESUME_GRACE))
        return grace + WARMUP_MARGIN_SECONDS

    def spec(self) -> Json:
        return {
            "scenario": "soak", "cycles": self.cycles, "warmupCycles": self.warmup,
            "warmupMinSeconds": self.warmup_min_seconds(),
            "concurrency": self.concurrency, "maxSeconds": self.max_seconds,
            "kinds": list(self.kinds), "rotateEvery": ROTATE_EVERY,
            "idleDeadlineSeconds": IDLE_DEADLINE_SECONDS, "settle": self.settle,
            "deadlineSeconds": self.max_seconds + 2 * (IDLE_DEADLINE_SECONDS + 30) + 60,
        }


QUICK = SoakPlan(cycles=200, warmup=40, concurrency=8, max_seconds=30.0,
                 settle={"intervalMs": 50, "stableMs": 150, "maxMs": 600},
                 settings={"resume_grace": "1"}, warmup_seconds=0.0)


@dataclass(frozen=True)
class MemoryProbe:
    """``--memory-probe``: where bench/memprobe writes, how often to sample, tracemalloc's depth."""

    directory: Path
    every: float = 5.0
    frames: int = 0


@contextmanager
def _probe_environment(probe: MemoryProbe | None) -> Iterator[None]:
    """The environment the relay is started in (Server copies this process's) with the probe."""
    if probe is None:
        yield
        return
    saved = dict(os.environ)
    probe.directory.mkdir(parents=True, exist_ok=True)
    (probe.directory / "samples.jsonl").unlink(missing_ok=True)
    os.environ["BENCH_MEMORY_PROBE"] = str(probe.directory)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH / "memprobe"), *filter(None, saved.get("PYTHONPATH", "").split(os.pathsep))])
    if probe.frames:
        os.environ["PYTHONTRACEMALLOC"] = str(probe.frames)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_soak(node: str, plan: SoakPlan, server_cpus: set[int] | None,
             loadgen_cpus: set[int] | None, relay_src: Path | None, quiet: bool,
             probe: MemoryProbe | None = None) -> Json:
    """Start a relay, soak it, stop it: the loadgen's result plus the relay's problems."""
    try:
        with _probe_environment(probe):
            server = Server("relay", server_cpus, relay_src, plan.settings)
    except BenchError as exc:
        return {"error": str(exc), "plan": plan.__dict__, "serverProblems": []}
    done = threading.Event()
    sampler = None
    if probe is not None:
        sampler = threading.Thread(target=_sample_every, daemon=True,
                                   args=(server.process.pid, probe.every, done))
        sampler.start()
    try:
        spec = {**plan.spec(), "probeMarks": probe is not None}
        result = run_loadgen(node, server, spec, loadgen_cpus, quiet)
    finally:
        done.set()
        if sampler is not None:
            sampler.join()
        server_problems = server.stop()
    return {**result, "plan": plan.__dict__, "serverProblems": server_problems}


def _sample_every(pid: int, every: float, done: threading.Event) -> None:
    while not done.wait(every):
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            return


def _figure(value: int | None) -> str:
    # The arenas are not counted while tracemalloc traces (it stands in CPython's allocator).
    return "-" if value is None else f"{value:,}"


def probe_report(probe: MemoryProbe) -> list[str]:
    """The probe's samples as a table, and with tracemalloc what grew between the marks."""
    path = probe.directory / "samples.jsonl"
    if not path.exists():
        return [f"memory probe: no samples in {path}"]
    samples = [json.loads(line) for line in path.read_text().splitlines() if line]
    marks = {0: "after warm-up", 1: "after the last cycle"}
    lines = ["| s | reading | RSS (KiB) | arenas | allocated in arenas | SQLite | gc objects |"
             " traced |", "|---|---|---|---|---|---|---|---|"]
    for sample in samples:
        reading = marks.get(sample.get("mark"), "") if sample["label"] == "mark" else ""
        traced = sample.get("tracedBytes")
        lines.append(
            f"| {sample['t'] - samples[0]['t']:.0f} | {reading} | {sample['rssKiB']:,}"
            f" | {sample.get('arenas', '-')} | {_figure(sample.get('allocatedBytes'))}"
            f" | {_figure(sample.get('sqliteBytes'))} | {sample['gcObjects']:,}"
            f" | {_figure(traced)} |")
    snapshots = [probe.directory / f"mark-{i}.pickle" for i in (0, 1)]
    if all(p.exists() for p in snapshots):
        import tracemalloc

        before, after = (tracemalloc.Snapshot.load(str(p)) for p in snapshots)
        stats = after.compare_to(before, "traceback")
        lines += ["", f"tracemalloc, after the last cycle less after the warm-up:"
                  f" {sum(s.size_diff for s in stats) / 1024:+,.1f} KiB in"
                  f" {sum(s.count_diff for s in stats):+,} blocks; the largest changes:"]
        for stat in stats[:10]:
            lines.append(f"  {stat.size_diff / 1024:+,.1f} KiB in {stat.count_diff:+,} blocks")
            lines += [f"    {line}" for line in stat.traceback.format(limit=probe.frames)]
    return lines


def soak_problems(soak: Json) -> list[str]:
    """What fails the soak: an error, too few cycles, a client error, a gauge not idle, a
    backend error, an fd left open, a server problem. (The RSS ratio is a target, shown as
    met or not, not a failure.)"""
    if soak.get("error"):
        return [f"{soak['error']}", *soak.get("serverProblems", [])]
    problems = list(soak.get("serverProblems", []))
    plan = soak["plan"]
    warm, run = soak["warmupRun"]["cycles"], soak["run"]["cycles"]
    if soak.get("timedOut"):
        problems.append(f"only {warm:,} warm-up cycles (of {plan['warmup']:,}) and {run:,}"
                        f" cycles (of {plan['cycles']:,}) ran within {plan['max_seconds']:.0f}"
                        " s (--soak-max-seconds)")
    if soak.get("errors"):
        problems.append(f"{soak['errors']} cycles failed: {soak['errorSamples']}")
    for point in ("warmup", "final"):
        if soak[point]["notIdle"]:
            problems.append(f"{point}: not back to idle after {soak[point]['idleAfterS']:.0f} s:"
                            f" {_gauge_diff(soak, point)}")
    errors = soak["final"]["counters"].get("backend_errors_total", 0)
    if errors:
        problems.append(f"{errors:.0f} backend errors")
    idle_fds, fds = soak["idle"].get("fds"), soak["final"].get("fds")
    if idle_fds is not None and fds is not None and fds > idle_fds:
        problems.append(f"{fds - idle_fds} more file descriptors open than when idle")
    return problems


def _gauge_diff(soak: Json, point: str) -> str:
    idle, now = soak["idle"]["gauges"], soak[point]["gauges"]
    return ", ".join(f"{k} {now.get(k)} (idle {v})" for k, v in idle.items()
                     if now.get(k) != v)


def soak_lines(soak: Json) -> list[str]:
    """The soak's rows of the targets table (5 columns: target, relay, -, -, verdict)."""
    if soak.get("error"):
        return [f"| soak | {soak['error']} | - | - | not measured |"]
    plan = soak["plan"]
    warm, final = soak["warmup"], soak["final"]
    warm_run = soak["warmupRun"]
    warmup = f"a {warm_run['cycles']:,}-cycle warm-up"
    if plan.get("warmup_seconds") != 0:
        warmup += f" ({warm_run['seconds']:.0f} s)"
    ratio = soak["rssRatio"]
    cycles = soak["run"]["cycles"]
    verdict = "met" if ratio <= RSS_RATIO_TARGET else "**not met**"
    if soak.get("timedOut"):
        verdict = "**incomplete**"
    idle = "every gauge back at idle" if not (warm["notIdle"] or final["notIdle"]) else (
        _gauge_diff(soak, "final") or _gauge_diff(soak, "warmup"))
    return [
        f"| soak: RSS after {cycles:,} more cycles / after {warmup}"
        f" | {ratio:.3f} ({warm['rssKiB'] / 1024:.1f} → {final['rssKiB'] / 1024:.1f} MiB)"
        f" | - | - | {verdict} (≤ {RSS_RATIO_TARGET:.2f}) |",
        f"| soak: /metrics gauges after the last cycle | {idle}"
        f" (after {final['idleAfterS']:.0f} s); fds {soak['idle'].get('fds')} →"
        f" {final.get('fds')} | - | - |"
        f" {'met' if not (warm['notIdle'] or final['notIdle']) else '**not met**'} |",
        f"| soak: cycles | {cycles:,} in {soak['run']['seconds']:.0f} s"
        f" ({soak['run']['ratePerS']:,.0f}/s, {plan['concurrency']} at a time; loadgen"
        f" {soak['run']['loadgenCpuShare']:.0%}, relay {soak['run']['serverCpuShare']:.0%} of"
        f" a core); kinds {', '.join(f'{k} {v:,}' for k, v in soak['kinds'].items())};"
        f" failed {soak['errors']} | - | - | - |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred cycles")
    parser.add_argument("--cycles", type=int, help="cycles after the warm-up (default 50,000)")
    parser.add_argument("--warmup", type=int, help="warm-up cycles (default 2,000)")
    parser.add_argument("--warmup-seconds", type=float,
                        help="go on with the warm-up for at least this long (default: the"
                        f" relay's resume_grace + {WARMUP_MARGIN_SECONDS:.0f} s, 0 for none)")
    parser.add_argument("--concurrency", type=int, help="cycles at a time (default 50)")
    parser.add_argument("--max-seconds", type=float,
                        help="stop the cycles after this long (default 480)")
    parser.add_argument("--kinds", help="comma-separated kinds of cycle to run in turn"
                        f" (default all: {','.join(KINDS)})")
    parser.add_argument("--relay-src", type=Path,
                        help="soak the trio_relay package of this directory instead")
    parser.add_argument("--json", type=Path, help="also write the result here as JSON")
    parser.add_argument("--memory-probe", type=Path, metavar="DIR",
                        help="sample the relay's memory from inside (bench/memprobe) into DIR")
    parser.add_argument("--probe-every", type=float, default=5.0,
                        help="seconds between the probe's samples (default 5)")
    parser.add_argument("--probe-frames", type=int, default=0,
                        help="with --memory-probe, trace allocations with this many frames")
    parser.add_argument("--verbose", action="store_true", help="show the loadgen's progress")
    args = parser.parse_args()
    plan = QUICK if args.quick else SoakPlan()
    overrides: Json = {k: v for k, v in (("cycles", args.cycles), ("warmup", args.warmup),
                                   ("concurrency", args.concurrency),
                                   ("max_seconds", args.max_seconds),
                                   ("warmup_seconds", args.warmup_seconds)) if v is not None}
    if args.kinds:
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            parser.error(f"--kinds: choose from {', '.join(KINDS)}")
        overrides["kinds"] = kinds
    plan = SoakPlan(**{**plan.__dict__, **overrides})
    try:
        node, npm = need_tools()
        ensure_loadgen(npm)
        raise_fd_limit()
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, loadgen_cpus = ({cpus[0]}, {cpus[-1]}) if len(cpus) >= 2 else (None, None)
    relay_src = args.relay_src.resolve() if args.relay_src else None
    probe = (None if args.memory_probe is None else
             MemoryProbe(args.memory_probe.resolve(), args.probe_every, args.probe_frames))
    soak = run_soak(node, plan, server_cpus, loadgen_cpus, relay_src, not args.verbose, probe)
    if args.json is not None:
        args.json.write_text(json.dumps(soak, indent=1) + "\n")
    print(f"command: {shlex.join(['python', 'bench/soak.py', *sys.argv[1:]])}")
    print(f"relay: {relay_source(relay_src)}")
    print("| target | relay | - | - | verdict |")
    print("|---|---|---|---|---|")
    if not soak.get("error"):
        print("\n".join(soak_lines(soak)))
    if probe is not None:
        print("\n" + "\n".join(probe_report(probe)))
    problems = soak_problems(soak)
    if problems:
        print(f"\nFAILED: {len(problems)} problems:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
