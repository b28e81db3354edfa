"""Plain HTTP on the relay's port: the web client's files, ``/healthz``, ``/metrics``, 404s,
keep-alive, and a WebSocket upgrade after plain requests on the same connection."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import attrs
import h11
import pytest
import trio
from trio.testing import MockClock

from trio_relay import RelayConfig
from trio_relay._config import RelayStatistics
from trio_relay._server.counters import RelayCounters
from trio_relay._server.http import HttpResponse, MetricsView, WebFiles, render_metrics, route
from trio_relay.testing import MemoryBackend, MemoryRelay, open_memory_relay

IDLE = RelayStatistics(
    connections=0, authenticated_connections=0, subscriptions=0, listeners=0, broadcasters=0,
    kept_histories=0, tasks=1,
)
COUNTERS = RelayCounters(pushes_sent=7, slow_closes=1, failed_pins=2, backend_errors=3,
                         connections_accepted=11, connections_closed=9, handshakes_failed=4)


def view(*, closing: bool = False, **stats: int) -> MetricsView:
    return MetricsView(attrs.evolve(IDLE, **stats), COUNTERS, 12.5, closing)


def get(target: str, method: str = "GET", *, web: WebFiles | None = None,
        headers: dict[str, str] | None = None) -> HttpResponse:
    return route(method, target, headers or {}, web=web or WebFiles.load(), metrics=view)


def header(response: HttpResponse, name: str) -> str | None:
    return next((v for n, v in response.headers if n.lower() == name.lower()), None)


# --- routing, without I/O -----------------------------------------------------------------------


def test_the_page_and_its_files_are_package_data() -> None:
    web = WebFiles.load()
    assert {"index.html", "app.js", "signin.js", "style.css", "ws-link.js", "ws-errors.js",
            "ws-requests.js", "ws-subscriptions.js"} <= set(web.files)
    page = get("/")
    assert page.status == 200
    assert page.body == web.files["index.html"].body
    assert header(page, "Content-Type") == "text/html; charset=utf-8"
    # The page may load only its own files and talk only to its own origin.
    policy = header(page, "Content-Security-Policy") or ""
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert get("/index.html").body == page.body
    script = get("/app.js?v=1")
    assert script.status == 200
    assert header(script, "Content-Type") == "text/javascript; charset=utf-8"
    assert header(get("/style.css"), "Content-Type") == "text/css; charset=utf-8"


def test_a_file_that_has_not_changed_is_not_sent_again() -> None:
    first = get("/app.js")
    etag = header(first, "ETag")
    assert etag and header(first, "Cache-Control") == "no-cache"
    again = get("/app.js", headers={"if-none-match": etag})
    assert (again.status, again.body) == (304, b"")
    assert get("/app.js", headers={"if-none-match": '"other"'}).status == 200


@pytest.mark.parametrize("target", [
    "/nope", "/web/app.js", "/../pyproject.toml", "/..%2f_relay.py", "/_relay.py",
    "/__init__.py", "//index.html", "/index.html/", "*", "http://relay.test/x", "/.",
])
def test_other_paths_are_not_found(target: str) -> None:
    response = get(target)
    assert (response.status, response.body) == (404, b"not found\n")


def test_the_websocket_path_without_an_upgrade_asks_for_one() -> None:
    response = get("/ws")
    assert response.status == 426
    assert header(response, "Upgrade") == "websocket"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"])
def test_only_get_and_head(method: str) -> None:
    response = get("/", method)
    assert response.status == 405
    assert header(response, "Allow") == "GET, HEAD"


def test_without_the_web_client_only_health_and_metrics_are_served() -> None:
    no_page = WebFiles({})
    assert get("/", web=no_page).status == 404
    assert get("/app.js", web=no_page).status == 404
    assert get("/healthz", web=no_page).status == 200
    assert get("/metrics", web=no_page).status == 200


def test_healthz() -> None:
    response = get("/healthz")
    assert response.status == 200
    assert header(response, "Content-Type") == "application/json"
    assert json.loads(response.body) == {"status": "ok", "uptimeSeconds": 12.5, "connections": 0}
    closing = route("GET", "/healthz", {}, web=None, metrics=lambda: view(closing=True))
    assert closing.status == 503
    assert json.loads(closing.body)["status"] == "shutting_down"


def test_metrics_are_prometheus_text() -> None:
    text = render_metrics(view(connections=5, authenticated_connections=4, subscriptions=9,
                               broadcasters=3, listeners=1, kept_histories=2, lingering=1))
    samples = dict(line.split(" ") for line in text.splitlines() if not line.startswith("#"))
    assert samples == {
        "trio_relay_connections": "5",
        "trio_relay_authenticated_connections": "4",
        "trio_relay_subscriptions": "9",
        "trio_relay_listeners": "1",
        "trio_relay_broadcasters": "3",
        "trio_relay_lingering_broadcasters": "1",
        "trio_relay_kept_histories": "2",
        "trio_relay_pushes_sent_total": "7",
        "trio_relay_slow_client_closes_total": "1",
        "trio_relay_failed_pins_total": "2",
        "trio_relay_backend_errors_total": "3",
        "trio_relay_connections_accepted_total": "11",
        "trio_relay_connections_closed_total": "9",
        "trio_relay_handshakes_failed_total": "4",
        "trio_relay_uptime_seconds": "12.5",
    }
    # Every sample has its HELP and TYPE lines, counters end in _total.
    for name in samples:
        assert f"# HELP {name} " in text
        kind = "counter" if name.endswith("_total") else "gauge"
        assert f"# TYPE {name} {kind}\n" in text
    assert text.endswith("\n")
    response = get("/metrics")
    assert header(response, "Content-Type") == "text/plain; charset=utf-8"
    assert header(response, "Cache-Control") == "no-store"


# --- over a stream ------------------------------------------------------------------------------


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def request(target: str, method: str = "GET", *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: relay.test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def answers(stream: trio.abc.Stream, count: int, method: str = "GET") -> list[Answer]:
    """Read ``count`` responses (to requests with ``method``) from ``stream``."""
    conn = h11.Connection(h11.CLIENT)
    result: list[Answer] = []
    for _ in range(count):
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some()))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        assert response is not None
        headers = {n.decode().lower(): v.decode() for n, v in response.headers}
        result.append(Answer(response.status_code, headers, body))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            break
        conn.start_next_cycle()
    return result


async def read_to_end(stream: trio.abc.Stream) -> bytes:
    received = b""
    while chunk := await stream.receive_some():
        received += chunk
    return received


async def test_requests_on_a_kept_alive_connection(
    memory_relay: MemoryRelay, autojump_clock: MockClock
) -> None:
    baseline = await memory_relay.quiet_statistics()
    stream = await memory_relay.listener.connect()
    # Pipelined: the second request is in the same write as the first.
    await stream.send_all(request("/healthz") + request("/"))
    health, page = await answers(stream, 2)
    assert health.status == 200 and json.loads(health.body)["status"] == "ok"
    assert page.status == 200 and page.body.startswith(b"<!doctype html>")
    assert page.headers["x-content-type-options"] == "nosniff"
    await stream.send_all(request("/missing"))
    (missing,) = await answers(stream, 1)
    assert missing.status == 404
    # HEAD: the same headers, no body.
    await stream.send_all(request("/", "HEAD"))
    (head,) = await answers(stream, 1, "HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == page.headers["content-length"]
    await stream.aclose()
    assert await memory_relay.quiet_statistics() == baseline


async def test_an_idle_kept_alive_connection_is_dropped(
    memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    config = RelayConfig(handshake_timeout=7)
    async with open_memory_relay(memory_backend, config=config) as memory:
        stream = await memory.listener.connect()
        await stream.send_all(request("/healthz"))
        await answers(stream, 1)
        start = trio.current_time()
        assert await read_to_end(stream) == b""
        assert trio.current_time() - start == pytest.approx(7)


async def test_connection_close_and_http_1_0_are_honoured(
    memory_relay: MemoryRelay, autojump_clock: MockClock
) -> None:
    for raw in (request("/healthz", "GET", "Connection: close"),
                b"GET /healthz HTTP/1.0\r\n\r\n"):
        stream = await memory_relay.listener.connect()
        await stream.send_all(raw)
        start = trio.current_time()
        received = await read_to_end(stream)
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert trio.current_time() == start  # closed at once


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 413),
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
])
async def test_bad_requests_get_a_status_and_a_close(
    memory_relay: MemoryRelay, autojump_clock: MockClock, raw: bytes, status: int
) -> None:
    baseline = await memory_relay.quiet_statistics()
    stream = await memory_relay.listener.connect()
    await stream.send_all(raw)
    start = trio.current_time()
    received = await read_to_end(stream)
    assert re.match(rb"HTTP/1.1 (\d+) ", received)[1] == str(status).encode()  # type: ignore[index]
    assert b"Connection: close\r\n" in received
    assert trio.current_time() == start
    assert await memory_relay.quiet_statistics() == baseline


async def test_an_upgrade_after_plain_requests_on_the_same_connection(
    memory_relay: MemoryRelay, autojump_clock: MockClock
) -> None:
    stream = await memory_relay.listener.connect()
    await stream.send_all(request("/"))
    await answers(stream, 1)
    key = base64.b64encode(b"0123456789abcdef").decode()
    await stream.send_all(request(
        "/ws", "GET", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
    ))
    received = b""
    while b"auth_required" not in received:
        received += await stream.receive_some()
    head, _, frames = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    # The relay's first frame: an unmasked text frame holding auth_required.
    assert frames[0] == 0x81
    assert json.loads(frames[2:2 + frames[1]])["type"] == "auth_required"
    assert (await memory_relay.quiet_statistics()).connections == 1


async def test_metrics_follow_the_relay(
    memory_relay: MemoryRelay, memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    memory_backend.add_chat("p1", "c1")
    async def metrics() -> dict[str, float]:
        stream = await memory_relay.listener.connect()
        await stream.send_all(request("/metrics", "GET", "Connection: close"))
        (answer,) = await answers(stream, 1)
        await stream.aclose()
        return {name: float(value) for name, value in (
            line.split(" ") for line in answer.body.decode().splitlines()
            if not line.startswith("#"))}

    before = await metrics()
    assert before["trio_relay_connections"] == 0
    watcher = await memory_relay.connect(authenticate=True)
    wrong = await memory_relay.connect()
    assert (await wrong.request("auth", pin="000000"))["type"] == "auth_failed"
    await watcher.subscribe("chat", "c1")
    sender = await memory_relay.connect(authenticate=True)
    await sender.send_message("c1", "hi")
    await watcher.next_push()
    await trio.testing.wait_all_tasks_blocked()
    now = await metrics()
    assert now["trio_relay_connections"] == 3
    assert now["trio_relay_authenticated_connections"] == 2
    assert now["trio_relay_subscriptions"] == 1
    assert now["trio_relay_broadcasters"] == 1
    assert now["trio_relay_lingering_broadcasters"] == 0
    assert now["trio_relay_failed_pins_total"] == before["trio_relay_failed_pins_total"] + 1
    assert now["trio_relay_pushes_sent_total"] >= before["trio_relay_pushes_sent_total"] + 1
    assert now["trio_relay_uptime_seconds"] > before["trio_relay_uptime_seconds"]
    # The lone watcher drops: its broadcaster lingers for resume_grace, then ends.
    await watcher.abort()
    await trio.testing.wait_all_tasks_blocked()
    dropped = await metrics()
    assert dropped["trio_relay_subscriptions"] == 0
    assert dropped["trio_relay_broadcasters"] == dropped["trio_relay_lingering_broadcasters"] == 1
    await trio.sleep(memory_relay.relay.config.resume_grace + 1)
    later = await metrics()
    assert later["trio_relay_broadcasters"] == later["trio_relay_lingering_broadcasters"] == 0


def test_the_operations_doc_lists_every_metric() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    documented = dict(re.findall(r"^\| `(trio_relay_\w+)` \| (\w+) \|", doc, re.M))
    text = render_metrics(view())
    exported = dict(re.findall(r"^# TYPE (\S+) (\w+)$", text, re.M))
    assert documented == exported


async def test_a_malformed_upgrade_is_refused(
    memory_relay: MemoryRelay, autojump_clock: MockClock
) -> None:
    stream = await memory_relay.listener.connect()
    await stream.send_all(request("/ws", "GET", "Upgrade: websocket", "Connection: Upgrade"))
    received = await read_to_end(stream)
    assert received.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(("host", "sockets"), [
    ("127.0.0.1:8765", " ws://127.0.0.1:8765 wss://127.0.0.1:8765"),
    ("relay.example", " ws://relay.example wss://relay.example"),
    ("[::1]:8765", " ws://[::1]:8765 wss://[::1]:8765"),
    ("evil; script-src *", ""),  # never reflected into the policy
    ("", ""),
])
def test_the_page_policy_names_its_own_websocket_origin(host: str, sockets: str) -> None:
    policy = header(get("/", headers={"host": host}), "Content-Security-Policy") or ""
    assert f"connect-src 'self'{sockets};" in policy


async def test_shutting_down_drops_idle_http_connections_at_once(
    memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    async with open_memory_relay(memory_backend) as memory:
        stream = await memory.listener.connect()
        await stream.send_all(request("/healthz"))
        await answers(stream, 1)
        start = trio.current_time()
    # Leaving the relay did not wait for the idle connection (it waits for WebSocket ones).
    assert trio.current_time() == start
    assert await read_to_end(stream) == b""


async def test_a_malformed_chunked_body_is_a_bad_request(
    memory_relay: MemoryRelay, autojump_clock: MockClock
) -> None:
    stream = await memory_relay.listener.connect()
    await stream.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n")
    received = await read_to_end(stream)
    assert received.startswith(b"HTTP/1.1 400 ")


async def test_bare_lf_requests_then_an_upgrade_on_the_same_connection(
    memory_relay: MemoryRelay, autojump_clock: MockClock
) -> None:
    stream = await memory_relay.listener.connect()
    key = base64.b64encode(b"0123456789abcdef").decode()
    # h11 accepts bare LF line ends; the relay must find the end of the head where h11 did.
    await stream.send_all(
        b"GET /healthz HTTP/1.1\nHost: relay.test\n\n"
        + request("/ws", "GET", "Upgrade: websocket", "Connection: Upgrade",
                  f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13")
    )
    received = b""
    while b"auth_required" not in received:
        received += await stream.receive_some()
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"HTTP/1.1 101 " in received
