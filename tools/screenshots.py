"""Take the web client's pictures in docs/ from a fresh install.

    python tools/screenshots.py [--out docs] [--chromium /usr/bin/chromium]

It starts `trio-relay serve` on a new, empty data directory (a fresh install: the demo
project and its welcome chat) on a free loopback port, and drives headless Chromium with
Playwright (`pip install -e '.[test]'`; Chromium from the distribution). Nothing is clicked
to open a chat: the page opens the welcome chat by itself on first sign-in, and the script
checks that it did, so the pictures show the first screen a new user gets. It writes:

- web-client.png: a desktop browser (1280x800), after a formatted exchange, with a reply
  caught mid-stream (the relay's frames are held back to take it);
- web-client-phone.png: a phone (390x844) paired as another device, in the same chat;
- web-client-phone-chats.png: the phone with its chat list open.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Page, WebSocketRoute, expect, sync_playwright

PIN = "482913"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT = 15_000  # ms

QUESTION = """Can you show me what a formatted answer looks like?

- **bold**, *slanted* and `inline code`
- a [link](https://github.com/python-trio/trio), which opens in a new tab

```python
async with open_relay_client(url, pin=pin) as client:
    await client.send("welcome", "hello")
```"""
STREAMED = "And a longer one, to watch it stream in word by word as the agent writes it."
FROM_PHONE = "Sent from the phone: the laptop sees it under this device's name."


@contextmanager
def fresh_relay(data_dir: Path) -> Iterator[str]:
    """`trio-relay serve` on a new data directory; yields the page's URL."""
    command = [sys.executable, "-m", "trio_relay", "serve", "--host", "127.0.0.1", "--port", "0",
               "--data-dir", str(data_dir)]
    env = {**os.environ, "TRIO_RELAY_PIN": PIN}
    log = data_dir.parent / "relay.log"
    with log.open("wb") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors,
                                   stdin=subprocess.DEVNULL, env=env)
    try:
        line = _first_line(process, log)
        match = re.match(r"trio-relay serving ws://(127\.0\.0\.1:\d+)/ws", line)
        if not match:
            raise RuntimeError(f"unexpected first line from the relay: {line!r}")
        yield f"http://{match.group(1)}/"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _first_line(process: subprocess.Popen[bytes], log: Path) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + 20
    line = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise RuntimeError(f"the relay printed no URL: {log.read_text(errors='replace')}")
            byte = os.read(process.stdout.fileno(), 1)
            if not byte:
                raise RuntimeError(f"the relay exited: {log.read_text(errors='replace')}")
            line += byte
    return line.decode().strip()


class HeldChunks:
    """Passes the relay's frames to the page, holding back `chunk`s once armed."""

    def __init__(self, page: Page) -> None:
        self.armed = False
        self.held: list[str | bytes] = []
        self.page_side: WebSocketRoute | None = None
        page.route_web_socket(re.compile(r"/ws$"), self._route)

    def _route(self, page_side: WebSocketRoute) -> None:
        self.page_side = page_side
        relay_side = page_side.connect_to_server()
        relay_side.on_message(self._from_relay)

    def _from_relay(self, message: str | bytes) -> None:
        assert self.page_side is not None
        if self.held or (self.armed and '"type":"chunk"' in str(message)):
            self.held.append(message)
        else:
            self.page_side.send(message)

    def hold_after(self, page: Page, words: str) -> None:
        """Arm once the streaming reply shows ``words``."""
        page.locator('[data-testid="message"][data-status="streaming"]').filter(
            has_text=words).wait_for(timeout=WAIT)
        self.armed = True

    def release(self) -> None:
        assert self.page_side is not None
        self.armed = False
        held, self.held = self.held, []
        for message in held:
            self.page_side.send(message)


def sign_in(page: Page, url: str, device_name: str) -> None:
    page.goto(url)
    page.get_by_test_id("pin-input").fill(PIN)
    page.get_by_test_id("device-name-input").fill(device_name)
    page.get_by_test_id("login-button").click()
    expect(page.get_by_test_id("connection-state")).to_have_attribute(
        "data-state", "connected", timeout=WAIT)
    # The first screen: the demo chat, opened by the page itself.
    expect(page.locator('[data-testid="chat-item"][data-chat-id="welcome"]')).to_have_attribute(
        "data-selected", "true", timeout=WAIT)
    expect(page.get_by_test_id("message-list")).to_have_attribute(
        "data-sync", "snapshot", timeout=WAIT)


def send(page: Page, text: str) -> None:
    box = page.get_by_test_id("message-input")
    box.fill(text)
    box.press("Enter")
    expect(box).to_have_value("")


def still(page: Page) -> None:
    """Nothing focused or hovered."""
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.mouse.move(0, 0)


def settled(page: Page) -> None:
    """Every reply stored, nothing focused or hovered."""
    expect(page.locator('[data-testid="message"][data-status="streaming"]')).to_have_count(
        0, timeout=WAIT)
    still(page)


def take(out: Path, chromium: str, browser: Browser | None = None) -> list[Path]:
    """Takes the pictures into ``out`` with a fresh relay; returns their paths. Uses
    ``browser`` if given (a caller that runs Playwright already), else launches Chromium."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trio-relay-screenshots-") as tmp, \
            fresh_relay(Path(tmp) / "data") as url:
        if browser is not None:
            return _take(browser, url, out)
        with sync_playwright() as playwright:
            own = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                return _take(own, url, out)
            finally:
                own.close()


def _take(browser: Browser, url: str, out: Path) -> list[Path]:
    written: list[Path] = []
    context_options: dict[str, Any] = {"locale": "en-US", "timezone_id": "UTC",
                                       "color_scheme": "light", "reduced_motion": "reduce"}
    laptop = browser.new_context(viewport={"width": 1280, "height": 800}, **context_options)
    phone = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
        device_scale_factor=2, **context_options)
    try:
        page = laptop.new_page()
        chunks = HeldChunks(page)
        sign_in(page, url, "Laptop")
        send(page, QUESTION)
        page.locator('[data-testid="message"][data-role="assistant"][data-status="stored"]'
                     ).nth(1).wait_for(timeout=WAIT)
        send(page, STREAMED)
        chunks.hold_after(page, "Echo: And a longer one")
        still(page)
        written.append(out / "web-client.png")
        page.screenshot(path=written[-1])
        chunks.release()
        settled(page)

        small = phone.new_page()
        sign_in(small, url, "Phone")
        send(small, FROM_PHONE)
        small.locator('[data-testid="message"][data-role="assistant"][data-status="stored"]'
                      ).filter(has_text=f"Echo: {FROM_PHONE}").wait_for(timeout=WAIT)
        settled(small)
        small.get_by_test_id("message-scroll").evaluate("(node) => node.scrollTo(0, 1e6)")
        written.append(out / "web-client-phone.png")
        small.screenshot(path=written[-1])
        small.get_by_test_id("chats-toggle").click()
        expect(small.get_by_test_id("sidebar")).to_be_in_viewport()
        small.mouse.move(0, 0)
        written.append(out / "web-client-phone-chats.png")
        small.screenshot(path=written[-1])
    finally:
        laptop.close()
        phone.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs",
                        help="where to write the PNG files (default: the repository's docs/)")
    parser.add_argument("--chromium", default=os.environ.get("TRIO_RELAY_CHROMIUM")
                        or shutil.which("chromium") or "/usr/bin/chromium",
                        help="the Chromium to drive (default: the distribution's)")
    args = parser.parse_args(argv)
    for path in take(args.out, args.chromium):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
