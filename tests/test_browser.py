"""The web client (trio_relay/web) in a real headless Chromium, against `trio-relay serve`.

Playwright's sync API drives the browser from plain test functions; the relay runs as a
subprocess serving the page and the WebSocket on one port, as users run it. Nothing here
sleeps: every wait is one of Playwright's auto-retrying `expect`s, bounded by a timeout.

Without Chromium or Playwright these tests are skipped, unless `CI` is set: then they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from _browser import CHROMIUM, CHROMIUM_ARGS, INSTALL_HINT, RelayProcess, browser_problem

from trio_relay.client import open_relay_client

try:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        ConsoleMessage,
        Locator,
        Page,
        WebSocketRoute,
        expect,
        sync_playwright,
    )
except ImportError:  # reported by the `browser` fixture
    pass

pytestmark = pytest.mark.e2e

PIN = "246810"
WAIT = 10_000  # ms: bound on any one wait; they take a fraction of it
RECONNECT_WAIT = 45_000  # ms: a reconnect first waits out a random backoff (at most 30 s)
REPO = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO / "docs" / "web-client.png"

# Records, for each assistant message that appears after it is installed, every distinct
# (status, text) it shows: how a streamed reply grew, read back after it is complete.
RECORD_REPLIES = """() => {
  const list = document.querySelector('[data-testid="message-list"]');
  const known = new Set([...list.children].map((li) => li.dataset.messageId));
  window.__replies = {};
  const look = () => {
    for (const li of list.querySelectorAll('[data-testid="message"][data-role="assistant"]')) {
      const id = li.dataset.messageId;
      if (known.has(id)) continue;
      const text = li.querySelector('[data-testid="message-content"]').textContent;
      const seen = (window.__replies[id] ??= []);
      const last = seen[seen.length - 1];
      if (!last || last[0] !== li.dataset.status || last[1] !== text) {
        seen.push([li.dataset.status, text]);
      }
    }
  };
  new MutationObserver(look).observe(list, {
    subtree: true, childList: true, characterData: true, attributes: true,
  });
}"""


# ws-link.js on its own, in the page, over a scripted fake WebSocket (see the file).
WS_LINK_SCENARIO = (Path(__file__).parent / "ws_link_scenario.js").read_text(encoding="utf-8")


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    problem = browser_problem()
    if problem is not None:
        message = f"{problem}; to run the browser tests, {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: the browser tests must run there)")
        pytest.skip(message)
    expect.set_options(timeout=WAIT)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, browser: Browser) -> Iterator[RelayProcess]:
    """One relay for the tests that do not stop it (each test uses its own texts)."""
    with RelayProcess(tmp_path_factory.mktemp("relay") / "data", PIN) as relay:
        yield relay


@pytest.fixture
def own_relay(tmp_path: Path, browser: Browser) -> Iterator[RelayProcess]:
    """A relay of the test's own, which it may stop and restart."""
    with RelayProcess(tmp_path / "data", PIN) as relay:
        yield relay


class Session:
    """One browser context with one page of the web client, watching for page errors."""

    def __init__(self, browser: Browser, url: str) -> None:
        self.url = url
        self.context: BrowserContext = browser.new_context(
            viewport={"width": 1200, "height": 720}, locale="en-US", timezone_id="UTC",
        )
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        # A refused WebSocket is logged by the browser itself while the relay is down.
        if message.type == "error" and "WebSocket connection to" not in message.text:
            self.errors.append(f"console error: {message.text}")

    def testid(self, name: str) -> Locator:
        return self.page.get_by_test_id(name)

    @property
    def state(self) -> Locator:
        return self.testid("connection-state")

    def open(self) -> None:
        self.page.goto(self.url)
        expect(self.state).to_have_attribute("data-state", "signed-out")

    def login(self, pin: str = PIN) -> None:
        self.open()
        self.testid("pin-input").fill(pin)
        self.testid("login-button").click()
        expect(self.state).to_have_attribute("data-state", "connected", timeout=WAIT)
        expect(self.testid("workspace")).to_be_visible()

    def chat_item(self, chat_id: str | None = None, title: str | None = None) -> Locator:
        items = self.page.locator('[data-testid="chat-item"]')
        if chat_id is not None:
            items = self.page.locator(f'[data-testid="chat-item"][data-chat-id="{chat_id}"]')
        if title is not None:
            items = items.filter(has_text=title)
        return items

    def open_chat(self, chat_id: str) -> None:
        self.chat_item(chat_id).click()
        expect(self.chat_item(chat_id)).to_have_attribute("data-selected", "true")
        expect(self.testid("message-list")).to_have_attribute("data-sync", "snapshot", timeout=WAIT)

    def messages(self, role: str | None = None, text: str | None = None) -> Locator:
        selector = '[data-testid="message"]'
        if role is not None:
            selector += f'[data-role="{role}"]'
        messages = self.page.locator(selector)
        if text is not None:
            content = self.page.get_by_test_id("message-content").filter(
                has_text=re.compile(f"^{re.escape(text)}$")
            )
            messages = messages.filter(has=content)
        return messages

    def send(self, text: str) -> None:
        box = self.testid("message-input")
        box.fill(text)
        expect(self.testid("send-button")).to_be_enabled()
        box.press("Enter")
        expect(box).to_have_value("")

    def expect_exchange(self, text: str) -> None:
        """The message `text` and the echo agent's whole answer are shown, each once."""
        expect(self.messages("user", text)).to_have_count(1, timeout=WAIT)
        reply = self.messages("assistant", f"Echo: {text}")
        expect(reply).to_have_count(1, timeout=WAIT)
        expect(reply).to_have_attribute("data-status", "stored")

    def close(self) -> None:
        self.context.close()
        assert self.errors == []


@pytest.fixture
def session(browser: Browser, relay: RelayProcess) -> Iterator[Session]:
    one = Session(browser, relay.http_url)
    yield one
    one.close()


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


# --- tests -------------------------------------------------------------------------------


def test_page_is_served_by_the_relay(session: Session) -> None:
    response = session.page.goto(session.url)
    assert response is not None and response.ok
    assert response.headers["content-type"].startswith("text/html")
    expect(session.page).to_have_title("trio-relay")
    expect(session.state).to_have_attribute("data-state", "signed-out")
    expect(session.testid("login-form")).to_be_visible()
    expect(session.testid("workspace")).to_be_hidden()


def test_login_open_chat_send_and_watch_the_reply_stream(session: Session) -> None:
    session.login()
    page = session.page

    # The demo project is there and selected; its chat list is live.
    project = page.locator('[data-testid="project-item"][data-project-id="demo"]')
    expect(project).to_have_text("Demo project")
    expect(project).to_have_attribute("data-selected", "true")
    expect(session.chat_item("welcome")).to_contain_text("Welcome")

    session.open_chat("welcome")
    expect(page).to_have_url(re.compile(r"#/demo/welcome$"))
    expect(session.testid("chat-title")).to_have_text("Welcome")
    first = session.messages().first
    expect(first).to_have_attribute("data-role", "assistant")
    expect(first).to_contain_text("Welcome to trio-relay!")

    page.evaluate(RECORD_REPLIES)
    text = unique("streaming into the browser, word by word")
    session.send(text)
    session.expect_exchange(text)

    # The reply was shown growing, chunk by chunk, in one message that then became the
    # stored one.
    replies: dict[str, list[list[str]]] = page.evaluate("window.__replies")
    assert len(replies) == 1, replies
    [steps] = replies.values()
    final = f"Echo: {text}"
    assert steps[-1] == ["stored", final]
    shown = [body for status, body in steps[:-1] if status == "streaming" and body]
    assert all(final.startswith(body) for body in shown), steps
    assert [len(body) for body in shown] == sorted({len(body) for body in shown}), steps
    assert len([body for body in shown if body != final]) >= 2, steps  # seen mid-stream


def test_the_url_brings_back_the_chat_after_a_reload(session: Session) -> None:
    session.login()
    session.open_chat("welcome")
    expect(session.page).to_have_url(re.compile(r"#/demo/welcome$"))
    session.page.reload()
    # The PIN lives in the page's memory only: a reload asks for it again.
    expect(session.testid("login-form")).to_be_visible()
    session.testid("pin-input").fill(PIN)
    session.testid("login-button").click()
    expect(session.chat_item("welcome")).to_have_attribute("data-selected", "true", timeout=WAIT)
    expect(session.messages().first).to_contain_text("Welcome to trio-relay!")


def test_text_is_shown_as_text_never_markup(session: Session) -> None:
    session.login()
    session.open_chat("welcome")
    text = unique('<img src=x onerror="window.__xss=1"><b>not bold</b>')
    session.send(text)
    session.expect_exchange(text)
    markup = session.testid("message-list").locator("img, b")
    assert markup.count() == 0
    assert session.page.evaluate("window.__xss") is None


@pytest.fixture
def other(browser: Browser, relay: RelayProcess, session: Session) -> Iterator[Session]:
    """A second browser context; it and ``session`` are logged in, in the welcome chat."""
    second = Session(browser, relay.http_url)
    try:
        for one in (session, second):
            one.login()
            one.open_chat("welcome")
        yield second
    finally:
        second.close()


def test_a_second_browser_sees_the_same_messages_live(session: Session, other: Session) -> None:
    text = unique("from the first browser")
    session.send(text)
    for one in (session, other):
        one.expect_exchange(text)
    answer = unique("and back from the second")
    other.send(answer)
    for one in (session, other):
        one.expect_exchange(answer)


def test_a_wrong_pin_shows_an_error_and_the_right_one_gets_in(session: Session) -> None:
    session.open()
    session.testid("pin-input").fill("000000")
    session.testid("login-button").click()
    # The relay delays a wrong PIN's answer (0.5 s for a first failure), then says so.
    expect(session.testid("login-error")).to_have_text("Wrong PIN. Try again.", timeout=WAIT)
    expect(session.state).to_have_attribute("data-state", "signed-out")
    expect(session.testid("workspace")).to_be_hidden()
    expect(session.testid("login-button")).to_be_enabled()
    # A success clears the address's failures, so the other tests are not slowed down.
    session.testid("pin-input").fill(PIN)
    session.testid("login-button").click()
    expect(session.state).to_have_attribute("data-state", "connected", timeout=WAIT)
    expect(session.testid("login-error")).to_be_hidden()


def test_a_locked_out_address_is_told_so(browser: Browser, tmp_path: Path) -> None:
    with RelayProcess(
        tmp_path / "data", PIN, "--pin-lockout-failures", "2", "--pin-backoff-initial", "0.01"
    ) as relay:
        one = Session(browser, relay.http_url)
        try:
            one.open()
            error = one.testid("login-error")
            one.testid("pin-input").fill("111111")
            one.testid("login-button").click()
            expect(error).to_have_text("Wrong PIN. Try again.", timeout=WAIT)
            one.testid("pin-input").fill("222222")
            one.testid("login-button").click()
            expect(one.testid("login-button")).to_be_enabled(timeout=WAIT)
            # Locked out now: even the right PIN is refused, with the relay's reason.
            one.testid("pin-input").fill(PIN)
            one.testid("login-button").click()
            # The relay's refusal (its locked_out reply says how long to wait, its close
            # frame why; which of them the page shows is the page's business).
            expect(error).to_contain_text(re.compile("too many failed", re.IGNORECASE),
                                          timeout=WAIT)
            expect(one.state).to_have_attribute("data-state", "signed-out")
        finally:
            one.close()


def test_chats_created_elsewhere_appear_live(
    browser: Browser, relay: RelayProcess, session: Session
) -> None:
    session.login()
    expect(session.chat_item("welcome")).to_be_visible()

    # Created by a Python program through trio_relay.client.
    title = unique("From Python")

    async def create() -> None:
        async with open_relay_client(relay.ws_url, pin=PIN) as client:
            await client.create_chat("demo", title=title)

    trio.run(create)
    expect(session.chat_item(title=title)).to_have_count(1, timeout=WAIT)

    # Created in another browser with the "new chat" button, answered by another agent.
    other = Session(browser, relay.http_url)
    try:
        other.login()
        other.testid("new-chat-button").click()
        other_title = unique("From the other browser")
        other.testid("new-chat-title").fill(other_title)
        other.testid("new-chat-profile").select_option("echo-fast")
        other.testid("new-chat-create").click()
        # The creator is taken to the new chat, empty and ready.
        expect(other.testid("chat-title")).to_have_text(other_title, timeout=WAIT)
        expect(other.testid("chat-profile")).to_have_text("Echo (fast)")
        expect(other.testid("chat-placeholder")).to_have_text("No messages yet. Say something!")
        new_chat = other.chat_item(title=other_title)
        expect(new_chat).to_have_attribute("data-selected", "true")
        chat_id = new_chat.get_attribute("data-chat-id")
        assert chat_id

        item = session.chat_item(chat_id)
        expect(item).to_contain_text(other_title, timeout=WAIT)
        session.open_chat(chat_id)
        text = unique("first words in a new chat")
        other.send(text)
        for one in (session, other):
            one.expect_exchange(text)
    finally:
        other.close()


def test_the_page_resumes_what_it_missed_while_offline(session: Session, other: Session) -> None:
    session.context.set_offline(True)
    expect(session.state).to_have_attribute("data-state", "offline", timeout=WAIT)
    text = unique("said while the first browser was offline")
    other.send(text)
    other.expect_exchange(text)
    expect(session.messages("user", text)).to_have_count(0)

    session.context.set_offline(False)
    expect(session.state).to_have_attribute("data-state", "connected", timeout=WAIT)
    # The relay replayed exactly the missed pushes (no fresh snapshot was needed).
    expect(session.testid("message-list")).to_have_attribute("data-sync", "resumed")
    session.expect_exchange(text)


def test_the_page_survives_a_relay_restart(browser: Browser, own_relay: RelayProcess) -> None:
    one = Session(browser, own_relay.http_url)
    try:
        one.login()
        one.open_chat("welcome")
        before = unique("before the restart")
        one.send(before)
        one.expect_exchange(before)

        port = own_relay.port
        assert own_relay.stop(signal.SIGTERM) == 0
        expect(one.state).to_have_attribute("data-state", "reconnecting", timeout=WAIT)
        expect(one.testid("send-button")).to_be_disabled()

        own_relay.start(port)  # same data directory, same port
        expect(one.state).to_have_attribute("data-state", "connected", timeout=RECONNECT_WAIT)
        # A new relay has new epochs: the page replaced its state with fresh snapshots.
        expect(one.testid("message-list")).to_have_attribute("data-sync", "reset")
        expect(one.chat_item("welcome")).to_have_attribute("data-selected", "true")
        one.expect_exchange(before)  # the history is intact, and nothing is doubled

        after = unique("after the restart")
        one.send(after)
        one.expect_exchange(after)
    finally:
        one.close()


def test_screenshot(browser: Browser, own_relay: RelayProcess, tmp_path: Path) -> None:
    """The picture in docs/web-client.png (TRIO_RELAY_UPDATE_SCREENSHOT=1 rewrites it): a
    finished exchange, and a reply caught mid-stream by holding back the relay's frames."""

    async def add_chat() -> None:
        async with open_relay_client(own_relay.ws_url, pin=PIN) as client:
            await client.create_chat("demo", title="Release notes", model_profile_id="echo-slow")

    trio.run(add_chat)
    one = Session(browser, own_relay.http_url)
    held: list[str | bytes] = []
    hold_after: list[int] = []  # chunks to let through before holding, once armed
    pages: list[WebSocketRoute] = []

    def route(page_side: WebSocketRoute) -> None:
        pages.append(page_side)
        relay_side = page_side.connect_to_server()

        def from_relay(message: str | bytes) -> None:
            if held or (hold_after and '"type":"chunk"' in str(message) and _armed(hold_after)):
                held.append(message)
            else:
                page_side.send(message)

        relay_side.on_message(from_relay)

    try:
        one.page.route_web_socket(re.compile(r"/ws$"), route)
        one.login()
        one.open_chat("welcome")
        one.send("What does trio-relay do?")
        one.expect_exchange("What does trio-relay do?")
        hold_after.append(2)
        one.send("Show me a reply as it streams in, word by word.")
        streaming = one.messages("assistant").last
        expect(streaming).to_have_attribute("data-status", "streaming", timeout=WAIT)
        expect(streaming).to_contain_text("Echo: Show me a reply ")
        expect(one.testid("cancel-button")).to_be_visible()
        one.page.evaluate("document.activeElement && document.activeElement.blur()")
        one.page.mouse.move(0, 0)
        path = tmp_path / "web-client.png"
        one.page.screenshot(path=path)
        assert path.read_bytes().startswith(b"\x89PNG")
        if os.environ.get("TRIO_RELAY_UPDATE_SCREENSHOT"):
            shutil.copyfile(path, SCREENSHOT)
        # Let the rest through: the reply completes.
        hold_after.clear()
        for message in held:
            pages[-1].send(message)
        held.clear()
        one.expect_exchange("Show me a reply as it streams in, word by word.")
    finally:
        one.close()


def _armed(hold_after: list[int]) -> bool:
    """Counts a chunk down; True once the chunks to let through are used up."""
    if hold_after[0] > 0:
        hold_after[0] -= 1
        return False
    return True


def test_ws_link_routes_times_out_and_resumes(session: Session) -> None:
    session.open()
    result = session.page.evaluate(WS_LINK_SCENARIO)
    assert result["timeout"] is True
    assert result["events"]["c1"] == [
        ["snapshot", 1, False],
        ["event", "a", 6],
        ["event", "c", 7],
        ["snapshot", 2, True],  # after the gap
        ["resumed"],
        ["event", "missed", 13],
    ]
    assert result["events"]["c2"] == [
        ["snapshot", 0, False], ["event", "b", 1], ["snapshot", 3, True],
    ]
    resync = result["resync"]
    assert "sinceSeq" not in resync and "epoch" not in resync
    assert result["auth"]["type"] == "auth" and result["auth"]["pin"] == "1234"
    assert [(r["resourceId"], r["sinceSeq"], r["epoch"]) for r in result["resubscribes"]] == [
        ("c1", 12, "E1"), ("c2", 1, "E2"),
    ]
    assert result["states"] == [
        "connected", "reconnecting", "connected", "reconnecting", "connected", "signed-out"]
    assert result["connectedAfterClosing"] is True
