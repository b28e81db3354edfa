"""`ConnectionTimers` (trio_relay/_server/timers.py): auth deadlines, pings and pong deadlines
for every connection from one task, under the autojump clock."""

from __future__ import annotations

import trio
import trio.testing

from trio_relay import CloseCode, RelayConfig
from trio_relay._server.timers import ConnectionTimers


class FakeConnection:
    def __init__(self, *, answers: bool = True) -> None:
        self.authenticated = False
        self.pinged_at: float | None = None
        self.pings = 0
        self.closed: tuple[int, str] | None = None
        self.answers = answers

    def ping(self, now: float) -> bool:
        if self.closed is not None:
            return False
        self.pings += 1
        if self.pinged_at is None:
            self.pinged_at = now
        if self.answers:
            self.pinged_at = None  # the pong comes at once
        return True

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def test_auth_deadline_pings_and_a_missing_pong(autojump_clock: trio.abc.Clock) -> None:
    config = RelayConfig(auth_timeout=5, ping_interval=10, ping_timeout=3)
    timers = ConnectionTimers(config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        late, good, silent = FakeConnection(), FakeConnection(), FakeConnection(answers=False)
        good.authenticated = silent.authenticated = True
        for connection in (late, good, silent):
            timers.schedule(connection)
        await trio.sleep(5.5)  # the auth deadline passes
        assert late.closed == (CloseCode.POLICY_VIOLATION, "authentication timed out")
        assert good.closed is None and silent.closed is None
        await trio.sleep(5)  # first ping at 10 s, answered by one only
        assert (good.pings, silent.pings) == (1, 1)
        await trio.sleep(3)  # its pong is due at 13 s
        assert silent.closed == (CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        assert good.closed is None
        await trio.sleep(10)
        assert good.pings == 2
        nursery.cancel_scope.cancel()


async def test_connections_that_ended_do_not_pile_up(autojump_clock: trio.abc.Clock) -> None:
    # With an hour between pings, every connection that came and went would otherwise stay
    # in the schedule for an hour.
    timers = ConnectionTimers(RelayConfig(auth_timeout=3600, ping_interval=3600))
    kept = [FakeConnection() for _ in range(10)]
    for connection in kept:
        connection.authenticated = True
        timers.schedule(connection)
    for _ in range(20_000):
        timers.schedule(FakeConnection())  # gone at once
    sizes = len(timers._auth) + len(timers._pings) + len(timers._pongs)
    assert sizes <= 2_100
    # The connections still there keep their place and are pinged in time.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        await trio.sleep(3601)
        assert all(connection.pings == 1 for connection in kept)
        nursery.cancel_scope.cancel()
