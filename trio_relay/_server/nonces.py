"""`RecentNonces`: exactly-once sends for a backend that cannot dedupe them itself.

A client may retry a ``send`` whose answer it never got (its connection dropped), with the
same ``clientNonce``. The built-in stores take the nonce and keep each message once, across
relays and restarts. For a backend whose ``send_message`` takes no ``nonce``, the relay keeps
the nonces of recent sends in memory instead: a retry within `NONCE_MEMORY` seconds, to this
process, is answered without being sent again. A send that failed is forgotten, so that its
retry goes through; a retry that arrives while the first is still in flight waits for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final

import trio

__all__ = ["NONCE_MEMORY", "NONCES_KEPT", "RecentNonces"]

#: Seconds a send's nonce is remembered (a retry comes within seconds of the drop).
NONCE_MEMORY: Final = 600.0
#: Nonces remembered at most; the oldest are forgotten first.
NONCES_KEPT: Final = 65536


class RecentNonces:
    """The sends taken lately, by (chat, nonce)."""

    def __init__(self, *, memory: float = NONCE_MEMORY, kept: int = NONCES_KEPT) -> None:
        self._memory = memory
        self._kept = kept
        # (chat, nonce) -> (time taken, done: set once the send succeeded or failed)
        self._taken: OrderedDict[tuple[str, str], tuple[float, trio.Event]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._taken)

    async def once(self, chat_id: str, nonce: str, send: Callable[[], Awaitable[None]]) -> None:
        """Run ``send`` unless a send of this nonce succeeded or is in flight (then wait)."""
        key = (chat_id, nonce)
        while True:
            self._expire(trio.current_time())
            found = self._taken.get(key)
            if found is None:
                break
            _, done = found
            if done.is_set():
                await trio.lowlevel.checkpoint()
                return  # sent already
            await done.wait()  # the first one is in flight: its outcome decides
        done = trio.Event()
        self._taken[key] = (trio.current_time(), done)
        try:
            await send()
        except BaseException:
            if self._taken.get(key, (0.0, None))[1] is done:
                del self._taken[key]  # failed or cancelled: a retry must go through
            raise
        finally:
            done.set()

    def _expire(self, now: float) -> None:
        horizon = now - self._memory
        while self._taken:
            key, (taken, done) = next(iter(self._taken.items()))
            if (taken >= horizon and len(self._taken) <= self._kept) or not done.is_set():
                break
            del self._taken[key]
