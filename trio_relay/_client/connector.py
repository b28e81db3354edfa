"""One connection's life: open the stream, shake hands, sign in, resume every subscription.

`Connector.run` is one attempt, from opening the stream to the connection's end; the
client's supervisor (`client.py`) decides what to do after it (reconnect, with backoff, or
give up).
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import attrs
import trio

from .errors import ConnectionLost, RelayClientError, RequestTimeout
from .session import ClientSession, Frame, Purpose, Resubscribe, Wire
from .state import Backoff
from .transport import CLOSE_TIMEOUT, CloseInfo, Link, link_error

__all__ = ["Connect", "Connector", "LinkEnd"]

#: Opens a connected stream to the relay (TCP, TLS, or in-memory in tests).
Connect: TypeAlias = Callable[[], Awaitable[trio.abc.Stream]]


@attrs.frozen
class LinkEnd:
    """How one attempt ended; ``ready``: it got as far as signing in and resubscribing."""

    error: RelayClientError
    ready: bool


class Connector:
    """Makes the links of one client, one at a time, for its `ClientSession`."""

    def __init__(
        self,
        session: ClientSession,
        *,
        connect: Connect,
        host: str,
        path: str,
        timeout: float,
        backoff: Backoff,
    ) -> None:
        self._session = session
        self._connect = connect
        self._host = host
        self._path = path
        self._timeout = timeout
        self._backoff = backoff
        #: The link of the attempt under way (live or not yet torn down), else None.
        self.link: Link | None = None
        #: How the last ready connection ended (None while the first one lives).
        self.last_close: CloseInfo | None = None
        #: Attempts made, and how many of them got ready.
        self.attempts = 0
        self.connections = 0

    async def run(self, ready: Callable[[], None], closing: Callable[[], bool]) -> LinkEnd:
        """One connection, from opening the stream to its end; never raises but Cancelled.

        ``ready`` is called once it is signed in with every subscription resumed; once
        ``closing()`` is true when it ends, it waits to be cancelled instead of returning.
        """
        self.attempts += 1
        try:
            with trio.fail_after(self._timeout):
                stream = await self._connect()
        except trio.TooSlowError:
            return LinkEnd(ConnectionLost("timed out connecting to the relay"), False)
        except Exception as exc:  # whatever `connect` raises: the attempt failed
            return LinkEnd(
                ConnectionLost(f"could not connect to the relay: {exc or type(exc).__name__}"),
                False,
            )
        link: Link | None = None
        is_ready = False
        try:
            try:
                async with trio.open_nursery() as nursery:
                    with trio.fail_after(self._timeout):
                        link = await Link.open(
                            nursery, stream, self._host, self._path, self._session
                        )
                    self.link = link
                    await self._authenticate(link)
                    await self._resubscribe_all(link, nursery)
                    self.connections += 1
                    is_ready = True
                    ready()
                    await link.lost.wait()
                    if closing():
                        # You are leaving: `open_relay_client` is finishing the closing
                        # handshake, which needs trio-websocket's reader; it cancels us after.
                        await trio.sleep_forever()
                    nursery.cancel_scope.cancel()
            except BaseException as exc:
                error = link_error(exc, link)
                if error is None:
                    raise
            else:
                assert link is not None and link.close is not None
                error = ConnectionLost("connection to the relay lost: " + link.close.reason,
                                       link.close.code)
        finally:
            if link is not None:
                link.mark_lost(CloseInfo(None, "connection closed"))
                if self.link is link:
                    self.link = None
                if is_ready:
                    self.last_close = link.close
            with trio.CancelScope(shield=True):
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await stream.aclose()
        return LinkEnd(error, is_ready)

    async def _link_request(
        self, link: Link, fields: Frame, purpose: Purpose = None
    ) -> Frame:
        with trio.move_on_after(self._timeout):
            return await link.request(fields, purpose)
        raise RequestTimeout(f"no reply to {fields['type']!r} within {self._timeout:g} s")

    async def _authenticate(self, link: Link) -> None:
        reply = await self._link_request(link, self._session.auth_fields())
        self._session.authenticated(reply)

    async def _resubscribe_all(self, link: Link, nursery: trio.Nursery) -> None:
        """Subscribe every live resource again, resuming where each left off.

        One at a time: the relay answers a connection's requests in order anyway, and this
        keeps a client with many subscriptions inside the relay's request burst.
        """
        for wire in self._session.to_resubscribe():
            if not self._session.wants(wire):
                continue
            if not await self._resubscribe(link, wire):
                nursery.start_soon(self._retry_resubscribe, link, wire)

    async def _resubscribe(self, link: Link, wire: Wire) -> bool:
        """One resubscription; False if refused for a reason worth retrying."""
        purpose = Resubscribe(wire)
        await self._link_request(link, ClientSession.resubscribe_fields(wire), purpose)
        return not purpose.retry

    async def _retry_resubscribe(self, link: Link, wire: Wire) -> None:
        for attempt in itertools.count():
            await trio.sleep(self._backoff.delay(attempt))
            if not self._session.needs_retry(wire, link.number):
                return  # gone, or made live by a newer subscribe meanwhile
            try:
                if await self._resubscribe(link, wire):
                    return
            except RequestTimeout:
                link.abort("no reply to a resubscription")
                return
