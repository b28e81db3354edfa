"""The web client (trio_relay/web) in a real headless Chromium, against `trio-relay serve`.

Playwright's sync API drives the browser from plain test functions; the relay runs as a
subprocess serving the page and the WebSocket on one port, as users run it. Nothing here
sleeps: every wait is one of Playwright's auto-retrying `expect`s, bounded by a timeout.

Without Chromium or Playwright these tests are skipped, unless `CI` is set: then they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from _browser import CHROMIUM, CHROMIUM_ARGS, INSTALL_HINT, RelayProcess, browser_problem
from _js import PAIRING, ROUTING, check_pairing, check_routing

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
DESKTOP = {"width": 1200, "height": 720}
PHONE = {"width": 390, "height": 844}
RECONNECT_WAIT = 45_000  # ms: a reconnect first waits out a random backoff (at most 30 s)
REPO = Path(__file__).resolve().parent.parent

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


# ws-link.js on its own, in the page, over a scripted fake WebSocket (see tests/_js.py; the
# same scenarios run in Node, in tests/test_ws_link.py).
WS_LINK_SCENARIO = ROUTING.read_text(encoding="utf-8")
WS_LINK_PAIRING_SCENARIO = PAIRING.read_text(encoding="utf-8")


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
    """One browser context with one page of the web client, watching for page errors.

    Console errors fail the test at close(): a Content-Security-Policy violation (an inline
    style or script, an eval) is one."""

    def __init__(
        self, browser: Browser, url: str, *, phone: bool = False, user_agent: str | None = None,
    ) -> None:
        self.url = url
        options: dict[str, Any] = {"viewport": PHONE if phone else DESKTOP}
        if phone:
            options.update(is_mobile=True, has_touch=True, device_scale_factor=2)
        if user_agent is not None:
            options["user_agent"] = user_agent
        self.context: BrowserContext = browser.new_context(
            locale="en-US", timezone_id="UTC", **options,
        )
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("console", self._console)
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        # Logged by the browser itself while the relay is down, not by the page: a refused
        # WebSocket, and the icon, which Chromium fetches again after every change of the
        # URL's hash (a fetch that a busy machine may delay until a test has stopped the relay).
        if "WebSocket connection to" in message.text:
            return
        if message.location.get("url", "").endswith("/favicon.svg") and "ERR_" in message.text:
            return
        self.errors.append(f"console error: {message.text}")

    def testid(self, name: str) -> Locator:
        return self.page.get_by_test_id(name)

    @property
    def state(self) -> Locator:
        return self.testid("connection-state")

    def open(self) -> None:
        self.page.goto(self.url)
        expect(self.state).to_have_attribute("data-state", "signed-out")

    def login(self, pin: str = PIN, device_name: str | None = None) -> None:
        """Pair with the PIN (and the proposed device name, unless one is given)."""
        self.open()
        self.testid("pin-input").fill(pin)
        if device_name is not None:
            self.testid("device-name-input").fill(device_name)
        self.testid("login-button").click()
        expect(self.state).to_have_attribute("data-state", "connected", timeout=WAIT)
        expect(self.testid("workspace")).to_be_visible()

    def stored_device(self) -> Any:
        return self.page.evaluate("JSON.parse(localStorage.getItem('trio-relay.device'))")

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
        assert self.dialogs == []  # no alert(), confirm() or prompt() ever ran


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
    # The page signs in again with its device token, and opens the chat in the URL.
    expect(session.state).to_have_attribute("data-state", "connected", timeout=WAIT)
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


def test_a_locked_out_address_is_told_how_long_to_wait_and_nothing_retries(
    browser: Browser, tmp_path: Path
) -> None:
    with RelayProcess(
        tmp_path / "data", PIN, "--pin-lockout-failures", "2", "--pin-backoff-initial", "0.01"
    ) as relay:
        one = Session(browser, relay.http_url)
        auths = _count_auth_frames(one.page)
        one.page.clock.install()  # the page's own time, to jump past the lockout below
        try:
            one.open()
            error = one.testid("login-error")
            one.testid("pin-input").fill("111111")
            one.testid("login-button").click()
            expect(error).to_have_text("Wrong PIN. Try again.", timeout=WAIT)
            expect(one.testid("login-button")).to_be_enabled()
            # The failure that reaches the limit is answered with how long the lockout lasts
            # (the relay's failure window, 600 s by default).
            one.testid("pin-input").fill("222222")
            one.testid("login-button").click()
            expect(error).to_have_text(
                "Too many failed attempts. Try again in 10 minutes.", timeout=WAIT)
            expect(one.testid("login-wait")).to_contain_text("You can try again in")
            expect(one.testid("login-button")).to_be_disabled()
            expect(one.state).to_have_attribute("data-state", "signed-out")
            assert len(auths) == 2
            # Once the wait is over, the page offers to try again, and did not try by itself.
            one.page.clock.fast_forward("10:01")
            expect(one.testid("login-button")).to_be_enabled()
            expect(one.testid("login-wait")).to_be_hidden()
            assert len(auths) == 2
            # The relay's own clock has not moved: the right PIN is still refused, with the
            # time that is really left.
            one.testid("pin-input").fill(PIN)
            one.testid("login-button").click()
            expect(error).to_have_text(
                re.compile(r"^Too many failed attempts\. Try again in (10 minutes|\d+ seconds)\.$"),
                timeout=WAIT)
            assert len(auths) == 3
        finally:
            one.close()


def _count_auth_frames(page: Page) -> list[dict[str, Any]]:
    """Every `auth` frame the page sends from now on, as the test goes."""
    frames: list[dict[str, Any]] = []

    def on_socket(socket: Any) -> None:
        def sent(payload: str | bytes) -> None:
            frame = json.loads(payload)
            if frame.get("type") == "auth":
                frames.append(frame)

        socket.on("framesent", sent)

    page.on("websocket", on_socket)
    return frames


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


def test_screenshot(browser: Browser, tmp_path: Path) -> None:
    """tools/screenshots.py takes the pictures in docs/ from a fresh install (it checks that
    the welcome chat opens by itself); TRIO_RELAY_UPDATE_SCREENSHOT=1 copies them there."""
    spec = importlib.util.spec_from_file_location("screenshots", REPO / "tools" / "screenshots.py")
    assert spec is not None and spec.loader is not None
    screenshots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshots)
    written = screenshots.take(tmp_path, CHROMIUM, browser)
    assert [path.name for path in written] == [
        "web-client.png", "web-client-phone.png", "web-client-phone-chats.png"]
    for path in written:
        assert path.read_bytes().startswith(b"\x89PNG")
        if os.environ.get("TRIO_RELAY_UPDATE_SCREENSHOT"):
            shutil.copyfile(path, REPO / "docs" / path.name)


def test_ws_link_routes_times_out_and_resumes(session: Session) -> None:
    session.open()
    check_routing(session.page.evaluate(WS_LINK_SCENARIO))


# --- formatted messages ------------------------------------------------------------------

MARKDOWN = """Here is **bold**, *slanted* and `inline code`:

- first item
- second item

1. one
2. two

```python
print("a line of code long enough to need its own scrollbar on a phone, and then some more")
```

| Name | Count |
|------|------:|
| apples | 3 |

A [link](https://example.com/docs) and a bare https://example.org/page address."""


def test_messages_render_as_markdown(session: Session) -> None:
    session.context.grant_permissions(["clipboard-read", "clipboard-write"])
    session.login()
    session.open_chat("welcome")
    marker = unique("markdown")
    session.send(f"{marker}\n\n{MARKDOWN}")
    reply = session.messages("assistant").filter(has_text=f"Echo: {marker}").last
    expect(reply).to_have_attribute("data-status", "stored", timeout=WAIT)
    mine = session.messages("user").filter(has_text=marker)
    for message in (mine, reply):
        content = message.get_by_test_id("message-content")
        expect(content.locator("strong")).to_have_text("bold")
        expect(content.locator("em")).to_have_text("slanted")
        expect(content.locator("p > code")).to_have_text("inline code")
        expect(content.locator("ul > li")).to_have_text(["first item", "second item"])
        expect(content.locator("ol > li")).to_have_text(["one", "two"])
        expect(content.locator("th")).to_have_text(["Name", "Count"])
        expect(content.locator("td")).to_have_text(["apples", "3"])
        expect(content.locator("td").last).to_have_css("text-align", "right")
        code = content.locator("pre > code")
        expect(code).to_have_text(re.compile(r'^print\("a line of code'))
        font = code.evaluate("(node) => getComputedStyle(node).fontFamily")
        assert "mono" in font.lower(), font
        links = content.locator("a")
        expect(links).to_have_count(2)
        for index, href in enumerate(["https://example.com/docs", "https://example.org/page"]):
            expect(links.nth(index)).to_have_attribute("href", href)
            expect(links.nth(index)).to_have_attribute("target", "_blank")
            expect(links.nth(index)).to_have_attribute("rel", "noopener noreferrer")

    # The copy button puts the code, and only the code, on the clipboard.
    reply.get_by_test_id("copy-code").click()
    expect(reply.get_by_test_id("copy-code")).to_have_attribute("data-copied", "yes")
    copied = session.page.evaluate("navigator.clipboard.readText()")
    assert copied == (
        'print("a line of code long enough to need its own scrollbar on a phone, and then'
        ' some more")\n'
    )


HOSTILE = [
    '<img src="/x-image-probe" onerror="window.__ran = (window.__ran || 0) + 1">',
    "<script>window.__ran = (window.__ran || 0) + 1</script>",
    '<iframe src="javascript:parent.__ran = 1"></iframe>',
    '<a href="javascript:window.__ran = 1">raw html link</a>',
    "[markdown link](javascript:window.__ran=1)",
    "<javascript:window.__ran=1>",
    "[data link](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "![image](javascript:window.__ran=1)",
    '<svg onload="alert(1)"></svg> <div style="position:fixed;inset:0">cover</div>',
]


def test_raw_html_and_javascript_links_stay_inert(session: Session) -> None:
    probes: list[str] = []
    session.page.on("request", lambda request: probes.append(request.url)
                    if "x-image-probe" in request.url else None)
    session.page.add_init_script(
        "window.__violations = [];"
        "document.addEventListener('securitypolicyviolation',"
        " (event) => window.__violations.push(event.violatedDirective));"
    )
    session.login()
    session.open_chat("welcome")
    marker = unique("hostile")
    text = marker + "\n\n" + "\n\n".join(HOSTILE)
    session.send(text)
    reply = session.messages("assistant").filter(has_text=f"Echo: {marker}").last
    expect(reply).to_have_attribute("data-status", "stored", timeout=WAIT)
    mine = session.messages("user").filter(has_text=marker)
    for message in (mine, reply):
        content = message.get_by_test_id("message-content")
        # Shown as the text it is ...
        expect(content).to_contain_text("<script>window.__ran")
        expect(content).to_contain_text('<img src="/x-image-probe"')
        expect(content).to_contain_text("markdown link")
        # ... and nothing in it became an element that could run or load anything.
        hostile = content.locator("img, script, iframe, svg, object, embed, [style], [onerror]")
        expect(hostile).to_have_count(0)
        for link in content.locator("a").all():
            href = link.get_attribute("href") or ""
            assert href.startswith(("http:", "https:", "mailto:")), href
        # Clicking what looks like a link runs nothing either.
        content.get_by_text("markdown link").click()
    assert session.page.evaluate("window.__ran") is None
    assert session.page.evaluate("window.__violations") == []
    assert probes == []


class HeldChunks:
    """Holds back the relay's `chunk` pushes to the page after the first ``let_through``,
    once armed: a streamed reply can then be looked at halfway."""

    def __init__(self, page: Page) -> None:
        self.held: list[str | bytes] = []
        self.let_through: int | None = None
        self.pages: list[WebSocketRoute] = []
        page.route_web_socket(re.compile(r"/ws$"), self._route)

    def _route(self, page_side: WebSocketRoute) -> None:
        self.pages.append(page_side)
        relay_side = page_side.connect_to_server()
        relay_side.on_message(lambda message: self._from_relay(page_side, message))

    def _from_relay(self, page_side: WebSocketRoute, message: str | bytes) -> None:
        if self.held:
            self.held.append(message)
        elif self.let_through is not None and '"type":"chunk"' in str(message):
            if self.let_through > 0:
                self.let_through -= 1
                page_side.send(message)
            else:
                self.held.append(message)
        else:
            page_side.send(message)

    def arm(self, let_through: int) -> None:
        self.let_through = let_through

    def release(self) -> None:
        self.let_through = None
        held, self.held = self.held, []
        for message in held:
            self.pages[-1].send(message)


def test_a_streamed_reply_is_formatted_as_it_grows(browser: Browser, relay: RelayProcess) -> None:
    one = Session(browser, relay.http_url)
    try:
        chunks = HeldChunks(one.page)
        one.login()
        one.open_chat("welcome")
        text = unique("**growing** reply") + "\n\n- one\n- two\n- three\n\nand the end of it"
        chunks.arm(2)
        one.send(text)
        streaming = one.messages("assistant").last
        expect(streaming).to_have_attribute("data-status", "streaming", timeout=WAIT)
        content = streaming.get_by_test_id("message-content")
        # Two chunks in, the part that has come is already formatted.
        expect(content.locator("strong")).to_have_text("growing", timeout=WAIT)
        expect(content).not_to_contain_text("and the end of it")
        chunks.release()
        expect(streaming).to_have_attribute("data-status", "stored", timeout=WAIT)
        expect(content.locator("li")).to_have_text(["one", "two", "three"])
        expect(content).to_contain_text("and the end of it")
    finally:
        one.close()


# --- phone-sized screens -----------------------------------------------------------------

# Visible elements whose right edge is past the window's, outside a box that scrolls on its
# own (code blocks, tables); and how far the page itself scrolls sideways.
OVERFLOW = """() => {
  const width = document.documentElement.clientWidth;
  const out = [];
  for (const node of document.querySelectorAll("body *")) {
    if (node.closest("pre, .table-scroll, [hidden]")) continue;
    const box = node.getBoundingClientRect();
    if (box.width === 0 || box.height === 0) continue;
    if (getComputedStyle(node).visibility === "hidden") continue;
    if (box.right > width + 0.5 || box.left < -0.5) {
      const where = `${Math.round(box.left)}..${Math.round(box.right)}`;
      out.push(`${node.tagName}.${node.className} ${where}`);
    }
  }
  return {width, scrollWidth: document.documentElement.scrollWidth,
          bodyScroll: document.body.scrollWidth, out};
}"""


DRAWER_SETTLED = (
    "() => document.querySelector('[data-testid=sidebar]').getBoundingClientRect().left === 0"
)


def assert_nothing_cut_off(one: Session) -> None:
    result = one.page.evaluate(OVERFLOW)
    assert result["scrollWidth"] <= result["width"], result
    assert result["bodyScroll"] <= result["width"], result
    assert result["out"] == [], result


def test_phone_the_chat_takes_the_width_and_the_list_is_a_drawer(
    browser: Browser, relay: RelayProcess
) -> None:
    one = Session(browser, relay.http_url, phone=True)
    try:
        one.open()
        assert_nothing_cut_off(one)
        one.login()
        # Signed in, the chat is open, across the whole width; the list is out of the way.
        expect(one.testid("chat-title")).to_have_text("Welcome", timeout=WAIT)
        expect(one.testid("message-list")).to_have_attribute("data-sync", "snapshot", timeout=WAIT)
        chat = one.page.locator("section.chat")
        box = chat.bounding_box()
        assert box is not None and box["x"] == 0 and box["width"] == PHONE["width"], box
        expect(one.testid("sidebar")).not_to_be_in_viewport()
        expect(one.testid("sidebar")).to_be_hidden()
        toggle = one.testid("chats-toggle")
        expect(toggle).to_be_visible()
        expect(toggle).to_have_attribute("aria-expanded", "false")

        # Long words, a wide code block and a wide table do not widen the page.
        long = unique("https://example.com/" + "a-very-long-path-segment" * 6)
        table = "| " + " | ".join(f"column {n}" for n in range(12)) + " |\n|" + "---|" * 12
        one.send(f"{long}\n\n```\n{'x' * 300}\n```\n\n{table}")
        reply = one.messages("assistant").last
        expect(reply).to_contain_text(f"Echo: {long}", timeout=WAIT)
        expect(reply).to_have_attribute("data-status", "stored", timeout=WAIT)
        assert_nothing_cut_off(one)

        # The list opens from the button, over the chat ...
        toggle.click()
        expect(toggle).to_have_attribute("aria-expanded", "true")
        expect(one.testid("sidebar")).to_be_in_viewport()
        expect(one.chat_item("welcome")).to_be_visible()
        one.page.wait_for_function(DRAWER_SETTLED)  # it slides in
        assert_nothing_cut_off(one)
        # ... closes without a choice (the backdrop) ...
        one.testid("drawer-backdrop").click(position={"x": PHONE["width"] - 20, "y": 400})
        expect(one.testid("sidebar")).to_be_hidden()
        # ... and after one: a new chat, then back to the welcome chat.
        toggle.click()
        one.testid("new-chat-button").click()
        title = unique("On the phone")
        one.testid("new-chat-title").fill(title)
        one.testid("new-chat-create").click()
        expect(one.testid("chat-title")).to_have_text(title, timeout=WAIT)
        toggle.click()
        expect(one.chat_item(title=title)).to_have_attribute("data-selected", "true")
        one.chat_item("welcome").click()
        expect(one.testid("sidebar")).to_be_hidden()
        expect(one.testid("chat-title")).to_have_text("Welcome")
        expect(toggle).to_have_attribute("aria-expanded", "false")
        # Escape closes it too.
        toggle.click()
        expect(one.testid("sidebar")).to_be_visible()
        one.page.keyboard.press("Escape")
        expect(one.testid("sidebar")).to_be_hidden()
    finally:
        one.close()


def test_phone_the_composer_stays_above_the_keyboard(browser: Browser, relay: RelayProcess) -> None:
    one = Session(browser, relay.http_url, phone=True)
    try:
        one.login()
        expect(one.testid("message-list")).to_have_attribute("data-sync", "snapshot", timeout=WAIT)
        box = one.testid("message-input")
        box.focus()
        # An on-screen keyboard takes the lower 40 % of the screen: the browser shrinks the
        # viewport (the page asks for that: interactive-widget=resizes-content), and where it
        # only shrinks the visual viewport the page follows visualViewport.
        visible = int(PHONE["height"] * 0.6)
        one.page.set_viewport_size({"width": PHONE["width"], "height": visible})
        for testid in ("message-input", "send-button"):
            expect(one.testid(testid)).to_be_in_viewport(ratio=1)
        composer = one.testid("composer").bounding_box()
        assert composer is not None
        assert composer["y"] + composer["height"] <= visible + 0.5, composer
        expect(one.testid("chat-title")).to_be_in_viewport(ratio=1)  # the top is still there
        assert_nothing_cut_off(one)
        box.fill(unique("typed above the keyboard"))
        expect(one.testid("send-button")).to_be_enabled()
    finally:
        one.close()


def test_desktop_shows_the_list_beside_the_chat(session: Session) -> None:
    session.login()
    expect(session.testid("sidebar")).to_be_visible()
    expect(session.testid("chats-toggle")).to_be_hidden()
    expect(session.testid("drawer-backdrop")).to_be_hidden()
    expect(session.testid("chat-title")).to_have_text("Welcome", timeout=WAIT)
    sidebar = session.testid("sidebar").bounding_box()
    chat = session.page.locator("section.chat").bounding_box()
    assert sidebar is not None and chat is not None
    assert sidebar["x"] == 0 and chat["x"] >= sidebar["width"], (sidebar, chat)
    assert_nothing_cut_off(session)


# --- pairing and senders, against the real relay ----------------------------------------


def test_a_fresh_install_opens_the_demo_chat(browser: Browser, own_relay: RelayProcess) -> None:
    one = Session(browser, own_relay.http_url)
    try:
        one.login()
        # Nothing clicked: the demo project's welcome chat is open, as in the docs' picture.
        expect(one.chat_item("welcome")).to_have_attribute("data-selected", "true", timeout=WAIT)
        expect(one.testid("chat-title")).to_have_text("Welcome")
        expect(one.page).to_have_url(re.compile(r"#/demo/welcome$"))
        expect(one.messages().first).to_contain_text("Welcome to trio-relay!", timeout=WAIT)
        expect(one.testid("message-input")).to_be_enabled()
    finally:
        one.close()


def test_a_paired_browser_stays_signed_in_across_reloads_and_restarts(
    browser: Browser, own_relay: RelayProcess
) -> None:
    one = Session(browser, own_relay.http_url)
    auths = _count_auth_frames(one.page)
    try:
        one.login(device_name="  Kitchen laptop  ")
        device = one.stored_device()
        assert device["name"] == "Kitchen laptop"
        assert re.fullmatch(r"d_[0-9a-f]{12}", device["id"]), device
        assert len(device["token"]) >= 40  # 32 random bytes, base64
        assert auths[0] == {"id": auths[0]["id"], "type": "auth", "pin": PIN,
                            "deviceName": "Kitchen laptop"}

        # A reload signs in with the token: no PIN asked.
        one.page.reload()
        expect(one.state).to_have_attribute("data-state", "connected", timeout=WAIT)
        expect(one.testid("workspace")).to_be_visible()
        assert auths[-1] == {"id": auths[-1]["id"], "type": "auth", "token": device["token"]}
        assert all("pin" not in frame for frame in auths[1:])

        # A restart with another PIN: the page reconnects with its token, and so does a reload.
        port = own_relay.port
        assert own_relay.stop(signal.SIGTERM) == 0
        expect(one.state).to_have_attribute("data-state", "reconnecting", timeout=WAIT)
        own_relay.pin = "135790"
        own_relay.start(port)
        expect(one.state).to_have_attribute("data-state", "connected", timeout=RECONNECT_WAIT)
        one.page.reload()
        expect(one.state).to_have_attribute("data-state", "connected", timeout=WAIT)
        expect(one.testid("login-view")).to_be_hidden()
        text = unique("after a restart with another PIN")
        one.open_chat("welcome")
        one.send(text)
        one.expect_exchange(text)
        assert all("pin" not in frame for frame in auths[1:])

        # Signing out forgets the token: the PIN is asked for again.
        one.testid("logout-button").click()
        expect(one.testid("pin-input")).to_be_visible()
        assert one.stored_device() is None
        one.page.reload()
        expect(one.testid("pin-input")).to_be_visible()
        expect(one.state).to_have_attribute("data-state", "signed-out")
    finally:
        one.close()


def test_a_revoked_browser_is_signed_out_and_asked_for_the_pin(
    browser: Browser, own_relay: RelayProcess
) -> None:
    one = Session(browser, own_relay.http_url)
    try:
        one.login(device_name="Borrowed tablet")
        assert one.stored_device() is not None
        result = subprocess.run(
            [sys.executable, "-m", "trio_relay", "devices", "--data-dir", str(own_relay.data_dir),
             "--revoke", "Borrowed tablet"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert result.returncode == 0, result.stderr
        # The relay closes the device's connection at once; the page forgets the token.
        expect(one.testid("pin-input")).to_be_visible(timeout=WAIT)
        expect(one.testid("login-error")).to_contain_text("device revoked")
        assert one.stored_device() is None
        # A reload asks for the PIN too (the page does not try the revoked token).
        one.page.reload()
        expect(one.testid("pin-input")).to_be_visible()
        expect(one.state).to_have_attribute("data-state", "signed-out")
        one.login(device_name="Borrowed tablet, again")
        assert one.stored_device()["name"] == "Borrowed tablet, again"
    finally:
        one.close()


def test_messages_say_who_wrote_them(
    browser: Browser, relay: RelayProcess, session: Session
) -> None:
    session.login(device_name="Firefox on Android")
    other = Session(browser, relay.http_url)
    try:
        other.login(device_name="Chrome on Linux")
        for one in (session, other):
            one.open_chat("welcome")
        mine = unique("from the phone")
        session.send(mine)
        theirs = unique("from the laptop")
        other.send(theirs)
        for one in (session, other):
            one.expect_exchange(mine)
            one.expect_exchange(theirs)

        def author(one: Session, text: str) -> Locator:
            return one.messages("user", text).get_by_test_id("message-author")

        expect(author(session, mine)).to_have_text("You")
        expect(author(session, theirs)).to_have_text("Chrome on Linux")
        expect(author(other, mine)).to_have_text("Firefox on Android")
        expect(author(other, theirs)).to_have_text("You")
        expect(session.messages("user", theirs)).to_have_attribute("data-own", "false")
        expect(session.messages("user", mine)).to_have_attribute("data-own", "true")

        # Sent by a program with the PIN alone (no device), and by the host in process (the
        # relay's own name for it): their senders' names.
        python_text = unique("from a Python program")

        async def send() -> None:
            async with open_relay_client(relay.ws_url, pin=PIN) as client:
                await client.send("welcome", python_text)

        trio.run(send)
        for one in (session, other):
            expect(author(one, python_text)).to_have_text("Unnamed device", timeout=WAIT)
        # Agents keep their name.
        expect(session.messages("assistant", f"Echo: {mine}").get_by_test_id("message-author")
               ).to_have_text("Echo")
    finally:
        other.close()


# --- the page's side of pairing, against a relay scripted in the test --------------------


class FakeRelay:
    """Answers the page's WebSocket in the test (nothing reaches a real relay): sign-in as
    ``on_auth`` says, one project with the welcome chat holding ``messages``."""

    def __init__(self, page: Page, on_auth: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.on_auth = on_auth
        self.messages: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        page.route_web_socket(re.compile(r"/ws$"), self._connect)

    def auths(self) -> list[dict[str, Any]]:
        return [frame for frame in self.frames if frame["type"] == "auth"]

    def _connect(self, socket: WebSocketRoute) -> None:
        socket.on_message(lambda message: self._frame(socket, message))

    def _frame(self, socket: WebSocketRoute, message: str | bytes) -> None:
        frame = json.loads(message)
        self.frames.append(frame)
        reply: dict[str, Any] = {"id": frame["id"]}
        if frame["type"] == "auth":
            answer = self.on_auth(frame)
            close = answer.pop("close", None)
            socket.send(json.dumps({**reply, **answer}))
            if close:
                socket.close(code=1008, reason=close)
            return
        resource = frame.get("resource", "chat")
        if frame["type"] == "subscribe":
            data: dict[str, Any] = {
                "modelProfiles": {"modelProfiles": [{"id": "echo", "name": "Echo"}]},
                "project": {"chats": [{"id": "welcome", "title": "Welcome",
                                       "modelProfileId": "echo"}]},
                "chat": {"messages": self.messages},
            }[resource]
            reply.update(type="subscribed", resource=resource, seq=0, epoch="E", data=data)
            if "resourceId" in frame:
                reply["resourceId"] = frame["resourceId"]
        else:
            reply.update(type="data", resource=resource, data={"unsubscribed": True})
        socket.send(json.dumps(reply))


SESSION_DATA = {"projects": [{"id": "demo", "name": "Demo project"}],
                "modelProfiles": [{"id": "echo", "name": "Echo"}]}
FIREFOX_ON_ANDROID = "Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0"


def test_the_pin_screen_proposes_a_name_and_the_page_keeps_the_token(browser: Browser) -> None:
    def on_auth(frame: dict[str, Any]) -> dict[str, Any]:
        if frame.get("token") == "secret-token":
            return {"type": "auth_success",
                    "data": {**SESSION_DATA, "device": {"id": "d_0123456789ab", "name": name}}}
        if frame.get("pin") == PIN:
            device = {"id": "d_0123456789ab", "name": name, "token": "secret-token"}
            return {"type": "auth_success", "data": {**SESSION_DATA, "device": device}}
        return {"type": "auth_failed", "error": "Invalid PIN", "code": "auth_failed"}

    name = "Firefox on Android"
    one = Session(browser, "http://127.0.0.1:9/", phone=True, user_agent=FIREFOX_ON_ANDROID)
    one.page.route("http://127.0.0.1:9/**", _serve_web_files)
    relay = FakeRelay(one.page, on_auth)
    try:
        one.open()
        # The proposed name comes from the browser and system; the user may change it.
        expect(one.testid("device-name-input")).to_have_value(name)
        one.testid("pin-input").fill(PIN)
        one.testid("login-button").click()
        expect(one.state).to_have_attribute("data-state", "connected", timeout=WAIT)
        [auth] = relay.auths()
        assert auth == {"id": auth["id"], "type": "auth", "pin": PIN, "deviceName": name}
        assert one.stored_device() == {"token": "secret-token", "id": "d_0123456789ab",
                                       "name": name}
        # Messages: this device's are "You", others' carry their name, and old ones
        # without a sender are "You" as they always were.
        relay.messages[:] = [
            _message("m1", "from before senders"),
            _message("m2", "from here", {"deviceId": "d_0123456789ab", "name": name}),
            _message("m3", "from the laptop", {"deviceId": "d_ffffffffffff", "name": "Laptop"}),
            _message("m4", "from the host", {"name": "Desktop app"}),
        ]
        one.page.reload()
        expect(one.state).to_have_attribute("data-state", "connected", timeout=WAIT)
        assert relay.auths()[-1] == {"id": relay.auths()[-1]["id"], "type": "auth",
                                     "token": "secret-token"}
        authors = one.page.get_by_test_id("message-author")
        expect(authors).to_have_text(["You", "You", "Laptop", "Desktop app"], timeout=WAIT)
    finally:
        one.close()


@pytest.mark.parametrize(("reply", "shown"), [
    ({"type": "auth_failed", "error": "Unknown or revoked device token", "code": "token_invalid"},
     "no longer paired"),
    # A relay without pairing does not take a token at all.
    ({"type": "error", "error": "unknown field 'token'", "code": "bad_request"},
     "unknown field 'token'"),
])
def test_a_refused_token_is_forgotten_and_the_pin_asked_for(
    browser: Browser, reply: dict[str, str], shown: str
) -> None:
    def on_auth(frame: dict[str, Any]) -> dict[str, Any]:
        return dict(reply)

    one = Session(browser, "http://127.0.0.1:9/")
    one.page.route("http://127.0.0.1:9/**", _serve_web_files)
    one.page.add_init_script(
        "if (!sessionStorage.getItem('seeded')) { sessionStorage.setItem('seeded', '1');"
        " localStorage.setItem('trio-relay.device',"
        " JSON.stringify({token: 'stale', id: 'd_000000000000', name: 'Old name'})); }"
    )
    relay = FakeRelay(one.page, on_auth)
    one.page.clock.install()
    try:
        one.page.goto(one.url)
        expect(one.testid("pin-input")).to_be_visible(timeout=WAIT)
        expect(one.testid("login-error")).to_contain_text(shown)
        assert one.stored_device() is None
        # Tried once, never again by itself.
        one.page.clock.fast_forward("05:00")
        expect(one.state).to_have_attribute("data-state", "signed-out")
        assert [frame.get("token") for frame in relay.auths()] == ["stale"]
    finally:
        one.close()


def test_a_locked_out_token_sign_in_waits_for_the_user(browser: Browser) -> None:
    def on_auth(frame: dict[str, Any]) -> dict[str, Any]:
        return {"type": "auth_failed", "code": "locked_out", "retryAfter": 42,
                "error": "Too many failed attempts; try again in 42 seconds",
                "close": "too many failed PIN attempts"}

    one = Session(browser, "http://127.0.0.1:9/")
    one.page.route("http://127.0.0.1:9/**", _serve_web_files)
    one.page.add_init_script(
        "localStorage.setItem('trio-relay.device',"
        " JSON.stringify({token: 'kept', id: 'd_000000000001', name: 'Desk'}))"
    )
    relay = FakeRelay(one.page, on_auth)
    one.page.clock.install()
    try:
        one.page.goto(one.url)
        error = one.testid("login-error")
        expect(error).to_have_text("Too many failed attempts. Try again in 42 seconds.",
                                   timeout=WAIT)
        # The token is kept (the address is locked out, not the device), and the page waits.
        expect(one.testid("paired-name")).to_have_text("Desk")
        expect(one.testid("login-button")).to_be_disabled()
        expect(one.testid("login-wait")).to_have_text("You can try again in 0:42.")
        assert one.stored_device()["token"] == "kept"
        one.page.clock.fast_forward("00:43")
        expect(one.testid("login-button")).to_be_enabled()
        one.page.clock.fast_forward("05:00")
        assert len(relay.auths()) == 1
        # The user's own try goes out.
        one.testid("login-button").click()
        expect(error).to_have_text("Too many failed attempts. Try again in 42 seconds.")
        expect(one.testid("login-button")).to_be_disabled()
        assert len(relay.auths()) == 2
    finally:
        one.close()


def test_a_token_sign_in_waits_for_a_relay_that_is_not_there_yet(
    browser: Browser, relay: RelayProcess
) -> None:
    one = Session(browser, relay.http_url)
    auths = _count_auth_frames(one.page)
    try:
        one.login(device_name="Patient browser")
        # A reload while the relay cannot be reached (each connection is dropped at once, as
        # a relay that is restarting would): the page keeps trying with its token, with the
        # reconnect backoff, and says so, rather than giving up on the first failure.
        down = [True]

        def route(page_side: WebSocketRoute) -> None:
            if down[0]:
                page_side.close(code=1001, reason="going away")
            else:
                page_side.connect_to_server()

        one.page.route_web_socket(re.compile(r"/ws$"), route)
        one.page.reload()
        expect(one.testid("paired-name")).to_have_text("Patient browser")
        expect(one.state).to_have_attribute("data-state", "reconnecting", timeout=WAIT)
        expect(one.testid("login-button")).to_be_disabled()
        expect(one.testid("retry-button")).to_be_visible()
        down[0] = False
        # No need to wait out the backoff. Clicked through the DOM: between two attempts the
        # button shows, during one it hides, and which of the two this instant is depends on
        # the machine's speed; a retry during an attempt just starts the next one at once.
        one.page.evaluate("document.querySelector('[data-testid=retry-button]').click()")
        expect(one.state).to_have_attribute("data-state", "connected", timeout=WAIT)
        expect(one.chat_item("welcome")).to_have_attribute("data-selected", "true")
        assert len(auths) >= 2
        assert [sorted(frame) for frame in auths[1:]] == [["id", "token", "type"]] * len(auths[1:])
    finally:
        one.close()


def _message(message_id: str, text: str, sender: dict[str, str] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"id": message_id, "role": "user", "content": text,
                               "createdAt": "2026-12-08T01:00:00Z"}
    if sender is not None:
        message["sender"] = sender
    return message


WEB = REPO / "trio_relay" / "web"
CONTENT_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript",
                 ".mjs": "text/javascript", ".svg": "image/svg+xml"}


def _serve_web_files(route: Any) -> None:
    """The page's files from the package, with the relay's CSP, for a page whose relay is
    scripted (or down)."""
    path = route.request.url.split("://", 1)[1].split("/", 1)[1].split("?")[0].split("#")[0]
    file = WEB / (path or "index.html")
    if not file.is_file() or file.suffix not in CONTENT_TYPES:
        route.fulfill(status=404, body="not found")
        return
    route.fulfill(
        status=200, body=file.read_bytes(), content_type=CONTENT_TYPES[file.suffix],
        headers={"Content-Security-Policy": "default-src 'self'; script-src 'self'; "
                 "style-src 'self'; connect-src 'self' ws://127.0.0.1:9 ws://127.0.0.1:*"},
    )


def test_ws_link_signs_in_with_its_token_and_never_retries_a_refusal(session: Session) -> None:
    session.open()
    check_pairing(session.page.evaluate(WS_LINK_PAIRING_SCENARIO))


DEVICE_NAMES = """async (cases) => {
  const { defaultDeviceName, deviceNameProblem } = await import("/device-name.js");
  return {
    names: cases.map(([userAgent, data]) => defaultDeviceName({ userAgent, userAgentData: data })),
    problems: ["", "x".repeat(65), "tab\\there", "Kitchen laptop", "é".repeat(64)].map(
      deviceNameProblem),
  };
}"""


def test_the_proposed_device_name_says_which_browser_on_which_system(session: Session) -> None:
    chrome_brands = {"brands": [{"brand": "Chromium"}, {"brand": "Google Chrome"},
                                {"brand": "Not_A Brand"}], "platform": "Android"}
    edge_brands = {"brands": [{"brand": "Microsoft Edge"}, {"brand": "Chromium"}],
                   "platform": "Windows"}
    cases = [
        [FIREFOX_ON_ANDROID, None],
        ["Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0", None],
        ["Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
         "Chrome/131.0.0.0 Mobile Safari/537.36", chrome_brands],
        ["Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
         "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0", edge_brands],
        ["Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
         "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1", None],
        ["Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like "
         "Gecko) Version/17.5 Safari/605.1.15", None],
        ["Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
         "Chrome/131.0.0.0 Safari/537.36", None],
        ["something else entirely", None],
    ]
    session.open()
    result = session.page.evaluate(DEVICE_NAMES, cases)
    assert result["names"] == [
        "Firefox on Android", "Firefox on Linux", "Chrome on Android", "Edge on Windows",
        "Safari on iPhone", "Safari on macOS", "Chrome on ChromeOS", "Web browser",
    ]
    assert result["problems"] == [
        "Enter a name for this device.",
        "The device name is too long (64 characters at most).",
        "The device name has control characters.",
        "",
        "",
    ]


def test_a_device_name_is_needed_and_nothing_is_sent_without_one(session: Session) -> None:
    auths = _count_auth_frames(session.page)
    session.open()
    session.testid("pin-input").fill(PIN)
    session.testid("device-name-input").fill("   ")
    session.testid("login-button").click()
    expect(session.testid("login-error")).to_have_text("Enter a name for this device.")
    expect(session.testid("device-name-input")).to_be_focused()
    assert auths == []
    session.testid("device-name-input").fill("Spare laptop")
    session.testid("login-button").click()
    expect(session.state).to_have_attribute("data-state", "connected", timeout=WAIT)
    assert [frame["deviceName"] for frame in auths] == ["Spare laptop"]
    assert session.stored_device()["name"] == "Spare laptop"


def test_signing_in_again_opens_the_chat_this_browser_had_open(
    browser: Browser, relay: RelayProcess
) -> None:
    one = Session(browser, relay.http_url)
    try:
        one.login()
        one.testid("new-chat-button").click()
        title = unique("Left open")
        one.testid("new-chat-title").fill(title)
        one.testid("new-chat-create").click()
        expect(one.testid("chat-title")).to_have_text(title, timeout=WAIT)
        # The page's address without the chat in it: the last chat opens, not the first.
        one.page.goto(one.url)
        expect(one.state).to_have_attribute("data-state", "connected", timeout=WAIT)
        expect(one.testid("chat-title")).to_have_text(title, timeout=WAIT)
        expect(one.chat_item(title=title)).to_have_attribute("data-selected", "true")
    finally:
        one.close()
