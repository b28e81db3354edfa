"""Plain HTTP on the relay's port: the web client, ``/healthz`` and ``/metrics``.

`route` is a request in and a response out, with no I/O, tested synchronously; the server's
edge (`trio_relay._server.edge`) reads each request with h11 and writes the answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Final

import attrs

from .._config import RelayStatistics
from .counters import RelayCounters

__all__ = [
    "COMMON_HEADERS", "HttpResponse", "MetricsView", "WebFiles", "render_metrics", "route",
    "text_response",
]

_CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
COMMON_HEADERS: Final = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
# The page loads only its own files and talks only to its own origin; nothing inline, no
# framing. ``'self'`` covers same-origin ws:// and wss:// in current browsers, not in older
# Safari, so the WebSocket origin is named too (from Host, if it is a plain host[:port]).
_PAGE_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PLAIN_HOST: Final = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _page_policy(host: str | None) -> str:
    sockets = f" ws://{host} wss://{host}" if host and _PLAIN_HOST.fullmatch(host) else ""
    return _PAGE_POLICY.format(sockets=sockets)


@attrs.frozen
class HttpResponse:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class WebFile:
    body: bytes
    content_type: str
    etag: str


@attrs.frozen
class WebFiles:
    """The web client's files (package data in ``trio_relay/web``), read once into memory."""

    files: Mapping[str, WebFile]

    @classmethod
    def load(cls) -> WebFiles:
        folder = resources.files("trio_relay").joinpath("web")
        files: dict[str, WebFile] = {}
        if folder.is_dir():
            for entry in folder.iterdir():
                suffix = "." + entry.name.rpartition(".")[2]
                if entry.is_file() and suffix in _CONTENT_TYPES:
                    body = entry.read_bytes()
                    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
                    files[entry.name] = WebFile(body, _CONTENT_TYPES[suffix], etag)
        return cls(files)


@attrs.frozen
class MetricsView:
    """What ``/healthz`` and ``/metrics`` report, read from the relay at request time."""

    statistics: RelayStatistics
    counters: RelayCounters
    uptime: float
    closing: bool
    #: Why the relay cannot serve fully right now (its broker is unreachable), or None.
    degraded: str | None = None


# name, type, help, and where the value comes from
_METRICS: Final[tuple[tuple[str, str, str, Callable[[MetricsView], float]], ...]] = (
    ("connections", "gauge", "WebSocket connections open.",
     lambda m: m.statistics.connections),
    ("authenticated_connections", "gauge", "WebSocket connections that sent the right PIN.",
     lambda m: m.statistics.authenticated_connections),
    ("subscriptions", "gauge", "Subscriptions of web clients.",
     lambda m: m.statistics.subscriptions),
    ("listeners", "gauge", "In-process listeners (Relay.listen).",
     lambda m: m.statistics.listeners),
    ("broadcasters", "gauge", "Resources watched, one broadcaster each.",
     lambda m: m.statistics.broadcasters),
    ("lingering_broadcasters", "gauge",
     "Broadcasters kept running for a subscriber that dropped, until it resumes.",
     lambda m: m.statistics.lingering),
    ("kept_histories", "gauge", "Replay buffers kept for resuming after their last subscriber.",
     lambda m: m.statistics.kept_histories),
    ("pushes_sent_total", "counter", "Pushes handed to web clients (one per client per push).",
     lambda m: m.counters.pushes_sent),
    ("slow_client_closes_total", "counter", "Clients closed with 1013 for falling behind.",
     lambda m: m.counters.slow_closes),
    ("failed_pins_total", "counter", "Failed sign-ins: wrong PINs and wrong device tokens.",
     lambda m: m.counters.failed_pins),
    ("backend_errors_total", "counter", "Backend calls that failed or timed out.",
     lambda m: m.counters.backend_errors),
    ("connections_accepted_total", "counter", "WebSocket handshakes accepted.",
     lambda m: m.counters.connections_accepted),
    ("connections_closed_total", "counter", "WebSocket connections that have ended.",
     lambda m: m.counters.connections_closed),
    ("handshakes_failed_total", "counter",
     "Streams refused or dropped before a WebSocket was open (bad HTTP, refused upgrades, "
     "handshake timeouts).",
     lambda m: m.counters.handshakes_failed),
    ("uptime_seconds", "gauge", "Seconds since the relay started.",
     lambda m: m.uptime),
)


def render_metrics(view: MetricsView) -> str:
    """The Prometheus text exposition format (version 0.0.4), every name ``trio_relay_*``."""
    lines: list[str] = []
    for name, kind, help_text, value in _METRICS:
        full = f"trio_relay_{name}"
        number = value(view)
        text = repr(round(number, 3)) if isinstance(number, float) else str(number)
        lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {text}"]
    return "\n".join(lines) + "\n"


def _health(view: MetricsView) -> HttpResponse:
    status = "shutting_down" if view.closing else "degraded" if view.degraded else "ok"
    health: dict[str, object] = {
        "status": status,
        "uptimeSeconds": round(view.uptime, 3),
        "connections": view.statistics.connections,
    }
    if view.degraded and not view.closing:
        health["reason"] = view.degraded
    body = json.dumps(health, separators=(",", ":")).encode()
    return HttpResponse(
        200 if status == "ok" else 503, body,
        (("Content-Type", "application/json"), ("Cache-Control", "no-store")),
    )


def text_response(status: int, text: str, *extra: tuple[str, str]) -> HttpResponse:
    return HttpResponse(
        status, text.encode(), (("Content-Type", "text/plain; charset=utf-8"), *extra)
    )


def route(
    method: str,
    target: str,
    headers: Mapping[str, str],
    *,
    web: WebFiles | None,
    metrics: Callable[[], MetricsView],
) -> HttpResponse:
    """The answer to one plain HTTP request (not an upgrade); ``web=None``: no web client.

    ``headers`` has lower-case names. Paths are matched exactly, so no request can name a file
    outside the web client's own.
    """
    path = target.partition("?")[0]
    if method not in ("GET", "HEAD"):
        return text_response(405, "method not allowed\n", ("Allow", "GET, HEAD"))
    if path == "/healthz":
        return _health(metrics())
    if path == "/ws":
        # The WebSocket's path, asked for without the upgrade headers.
        return text_response(426, "upgrade required: this path speaks WebSocket\n",
                             ("Upgrade", "websocket"))
    if path == "/metrics":
        return text_response(200, render_metrics(metrics()), ("Cache-Control", "no-store"))
    name = "index.html" if path == "/" else path[1:]
    file = web.files.get(name) if web is not None and path.startswith("/") else None
    if file is None:
        return text_response(404, "not found\n")
    cache = (("ETag", file.etag), ("Cache-Control", "no-cache"))
    if headers.get("if-none-match") == file.etag:
        return HttpResponse(304, b"", cache)
    extra = ((("Content-Security-Policy", _page_policy(headers.get("host"))),)
             if name.endswith(".html") else ())
    return HttpResponse(200, file.body, (("Content-Type", file.content_type), *cache, *extra))
