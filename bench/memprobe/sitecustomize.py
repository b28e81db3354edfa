"""The soak's memory probe, loaded into the relay's process: ``python bench/soak.py
--memory-probe DIR`` puts this directory first on the relay's PYTHONPATH. Not part of the relay.

With ``BENCH_MEMORY_PROBE=DIR`` set, each SIGUSR1 (a periodic sample) and SIGUSR2 (a mark: the
soak's idle, after-warm-up and final readings) appends one JSON line to DIR/samples.jsonl:
RSS, CPython's object arenas and the bytes allocated in them (``sys._debugmallocstats``), the
memory SQLite has allocated (``sqlite3_memory_used``), the number of objects the cyclic
collector tracks, and, when tracemalloc traces (PYTHONTRACEMALLOC), the traced bytes. A mark
also dumps a tracemalloc snapshot to DIR/mark-N.pickle when tracing. The handlers run on the
main thread between bytecodes, so a sample holds the relay up for as long as it takes.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("BENCH_MEMORY_PROBE")

if _DIR:
    import ctypes
    import gc
    import json
    import re
    import signal
    import sys
    import tempfile
    import time
    import tracemalloc
    from types import FrameType

    _directory: str = _DIR
    _marks = [0]

    def _pymalloc() -> dict[str, int]:
        """Arenas and allocated bytes, from what sys._debugmallocstats writes to fd 2."""
        with tempfile.TemporaryFile("w+") as out:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(out.fileno(), 2)
            try:
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            out.seek(0)
            text = out.read()
        figures = {}
        for key, pattern in (("arenas", r"arenas allocated current\s+=\s+([\d,]+)"),
                             ("allocatedBytes", r"bytes in allocated blocks\s+=\s+([\d,]+)")):
            found = re.search(pattern, text)
            if found:
                figures[key] = int(found.group(1).replace(",", ""))
        return figures

    def _sqlite_memory_used() -> int | None:
        try:
            import _sqlite3

            lib = ctypes.CDLL(_sqlite3.__file__)  # its symbols and its libsqlite3's
            lib.sqlite3_memory_used.restype = ctypes.c_int64
            return int(lib.sqlite3_memory_used())
        except (ImportError, OSError, AttributeError):
            return None

    def _rss_kib() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def _sample(signum: int, frame: FrameType | None) -> None:
        line: dict[str, object] = {
            "t": time.time(), "label": "tick" if signum == signal.SIGUSR1 else "mark",
            "rssKiB": _rss_kib(), **_pymalloc(), "sqliteBytes": _sqlite_memory_used(),
            "gcObjects": len(gc.get_objects()),
        }
        if tracemalloc.is_tracing():
            line["tracedBytes"] = tracemalloc.get_traced_memory()[0]
            if signum == signal.SIGUSR2:
                path = os.path.join(_directory, f"mark-{_marks[0]}.pickle")
                tracemalloc.take_snapshot().dump(path)
                line["snapshot"] = path
        if signum == signal.SIGUSR2:
            line["mark"] = _marks[0]
            _marks[0] += 1
        with open(os.path.join(_directory, "samples.jsonl"), "a") as samples:
            samples.write(json.dumps(line) + "\n")

    signal.signal(signal.SIGUSR1, _sample)
    signal.signal(signal.SIGUSR2, _sample)
