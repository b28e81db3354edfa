"""Plain HTTP on the relay's port: the web client, ``/healthz`` and ``/metrics``.

Every accepted stream starts here. The relay reads each request head itself and parses it
with h11 (which wsproto already brings): a WebSocket upgrade is handed, bytes untouched, to
trio-websocket, which owns every WebSocket connection; any other request is answered here.
Keep-alive is honoured, so a browser loads the page's files over one connection and may then
upgrade it.

`route` is the pure part (a request in, a response out, no I/O) and is tested synchronously;
`serve_http` is the thin loop that reads heads and writes answers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from http import HTTPStatus
from importlib import resources
from typing import Final

import attrs
import h11
import trio

from ._config import RelayStatistics
from ._transport import OwnedStream

__all__ = [
    "HttpResponse", "MetricsView", "WebFiles", "render_metrics", "route", "serve_http",
]

#: Longest request head read; a longer one is answered 431.
MAX_HEAD: Final = 16 * 1024
#: Requests answered on one kept-alive connection before it is closed.
MAX_REQUESTS_PER_CONNECTION: Final = 100

_CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_COMMON_HEADERS: Final = (
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
    counters: Mapping[str, int]
    uptime: float
    closing: bool


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
    ("kept_histories", "gauge", "Replay buffers kept for resuming after their last subscriber.",
     lambda m: m.statistics.kept_histories),
    ("pushes_sent_total", "counter", "Pushes handed to web clients (one per client per push).",
     lambda m: m.counters.get("pushes_sent", 0)),
    ("slow_client_closes_total", "counter", "Clients closed with 1013 for falling behind.",
     lambda m: m.counters.get("slow_closes", 0)),
    ("failed_pins_total", "counter", "auth requests with a wrong PIN.",
     lambda m: m.counters.get("failed_pins", 0)),
    ("backend_errors_total", "counter", "Backend calls that failed or timed out.",
     lambda m: m.counters.get("backend_errors", 0)),
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
    status = "shutting_down" if view.closing else "ok"
    body = json.dumps({
        "status": status,
        "uptimeSeconds": round(view.uptime, 3),
        "connections": view.statistics.connections,
    }, separators=(",", ":")).encode()
    return HttpResponse(
        503 if view.closing else 200, body,
        (("Content-Type", "application/json"), ("Cache-Control", "no-store")),
    )


def _text(status: int, text: str, *extra: tuple[str, str]) -> HttpResponse:
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
        return _text(405, "method not allowed\n", ("Allow", "GET, HEAD"))
    if path == "/healthz":
        return _health(metrics())
    if path == "/metrics":
        return _text(200, render_metrics(metrics()), ("Cache-Control", "no-store"))
    name = "index.html" if path == "/" else path[1:]
    file = web.files.get(name) if web is not None and path.startswith("/") else None
    if file is None:
        return _text(404, "not found\n")
    cache = (("ETag", file.etag), ("Cache-Control", "no-cache"))
    if headers.get("if-none-match") == file.etag:
        return HttpResponse(304, b"", cache)
    extra = ((("Content-Security-Policy", _page_policy(headers.get("host"))),)
             if name.endswith(".html") else ())
    return HttpResponse(200, file.body, (("Content-Type", file.content_type), *cache, *extra))


def is_websocket_upgrade(headers: Mapping[str, str]) -> bool:
    tokens = (token.strip().lower() for token in headers.get("upgrade", "").split(","))
    return "websocket" in tokens


async def serve_http(
    stream: OwnedStream,
    *,
    web: WebFiles | None,
    metrics: Callable[[], MetricsView],
    deadline: trio.CancelScope,
    request_timeout: float,
    log: Callable[[str, str, int], None],
) -> dict[str, str] | None:
    """Answer plain HTTP requests until the client asks for a WebSocket upgrade, closes, or
    breaks the protocol.

    Returns the upgrade request's headers (lower-case names; the request itself is pushed
    back into ``stream`` for trio-websocket to read), or None when the stream is done with.
    ``deadline`` bounds the wait for each request: it is moved ``request_timeout`` ahead
    after every answer, so an idle kept-alive connection is dropped.
    """
    buffer = bytearray()  # what was read and not yet answered, as h11 also holds it
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    for _ in range(MAX_REQUESTS_PER_CONNECTION):
        try:
            event = conn.next_event()
            while event is h11.NEED_DATA:
                # Fed as it arrives, so h11 refuses garbage (a TLS hello, binary) at once.
                try:
                    data = await stream.receive_some(MAX_HEAD)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                if not data:
                    return None
                buffer += data
                conn.receive_data(bytes(data))
                event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            await _send_error(stream, status, "request head too large\n" if status == 431
                              else "bad request\n")
            return None
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 starts with one
            return None
        headers = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in event.headers}
        # Where the head ends is h11's to say (it accepts bare LF line ends, and blank lines
        # before a request): what it has not consumed is the rest.
        end = len(buffer) - len(conn.trailing_data[0])
        if end > MAX_HEAD:  # h11 bounds only a head still incomplete
            await _send_error(stream, 431, "request head too large\n")
            return None
        if event.http_version not in (b"1.0", b"1.1"):
            await _send_error(stream, 505, "HTTP/1.1 only\n")
            return None
        if is_websocket_upgrade(headers):
            stream.unread(bytes(buffer))
            return headers
        del buffer[:end]
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("latin-1")
        try:
            has_body = not isinstance(conn.next_event(), h11.EndOfMessage)
        except h11.RemoteProtocolError:  # a body that does not even parse
            await _send_error(stream, 400, "bad request\n")
            return None
        response = (
            _text(413, "request bodies are not accepted\n") if has_body
            else route(method, target, headers, web=web, metrics=metrics)
        )
        log(method, target, response.status)
        if not await _send(stream, conn, method, response, close=has_body):
            return None
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return None  # the client asked to close, or sent a body we did not read
        conn.start_next_cycle()
        deadline.deadline = trio.current_time() + request_timeout
    return None


async def _send(
    stream: OwnedStream, conn: h11.Connection, method: str, response: HttpResponse,
    *, close: bool = False,
) -> bool:
    headers = [*_COMMON_HEADERS, *response.headers]
    if response.status != 304:
        headers.append(("Content-Length", str(len(response.body))))
    if close:
        headers.append(("Connection", "close"))
    data = conn.send(h11.Response(
        status_code=response.status, headers=headers,
        reason=HTTPStatus(response.status).phrase.encode(),
    ))
    assert data is not None
    if method != "HEAD" and response.body:
        data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def _send_error(stream: OwnedStream, status: int, text: str) -> None:
    """Answer a request that could not be read, then close; written by hand, since h11 answers
    only requests it has parsed."""
    body = text.encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            *(f"{name}: {value}" for name, value in _COMMON_HEADERS),
            "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}",
            "Connection: close"]
    try:
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
