"""Rate limits and PIN protection: plain state machines, driven here with hand-picked clocks."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_relay._config import RelayConfig
from trio_relay._server.limits import PinCheck, PinGuard, TokenBucket, pin_matches

# --- TokenBucket ------------------------------------------------------------------------------


def takes(bucket: TokenBucket, now: float, n: int) -> list[bool]:
    return [bucket.take(now) for _ in range(n)]


def test_bucket_starts_full_and_allows_a_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=5)
    assert takes(bucket, 0.0, 6) == [True] * 5 + [False]
    assert bucket.take(0.0) is False


def test_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=5)
    assert takes(bucket, 0.0, 5) == [True] * 5
    assert bucket.take(0.25) is False  # half a token
    assert bucket.take(0.5) is True  # the half became one, and is taken
    assert bucket.take(0.5) is False
    assert takes(bucket, 1.5, 3) == [True, True, False]


def test_bucket_slow_rate_needs_whole_tokens() -> None:
    bucket = TokenBucket(rate=0.5, burst=1)
    assert bucket.take(10.0) is True
    assert bucket.take(11.0) is False
    assert bucket.take(11.9) is False
    assert bucket.take(12.0) is True


def test_bucket_never_saves_more_than_its_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=3)
    assert takes(bucket, 0.0, 1) == [True]
    # A long quiet spell refills to the burst, not beyond it.
    assert takes(bucket, 10_000.0, 4) == [True, True, True, False]
    assert bucket.tokens < 1.0
    bucket.take(20_000.0)
    assert bucket.tokens <= bucket.burst


def test_bucket_failed_take_costs_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1)
    assert bucket.take(0.0) is True
    # Refused attempts in between do not push the next token further away.
    assert takes(bucket, 0.5, 10) == [False] * 10
    assert bucket.take(1.0) is True


def test_bucket_with_explicit_tokens() -> None:
    bucket = TokenBucket(rate=1.0, burst=10, tokens=1.0)
    assert takes(bucket, 0.0, 2) == [True, False]


def test_bucket_from_the_default_config() -> None:
    config = RelayConfig()
    bucket = TokenBucket(rate=config.request_rate, burst=config.request_burst)
    assert takes(bucket, 0.0, 51) == [True] * 50 + [False]
    assert takes(bucket, 1.0, 21) == [True] * 20 + [False]


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.1, max_value=100.0),
    burst=st.integers(min_value=1, max_value=50),
    steps=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=60),
)
def test_bucket_grants_at_most_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[float]
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    now = 0.0
    granted = 0
    for step in steps:
        now += step
        granted += bucket.take(now)
        assert 0.0 <= bucket.tokens <= burst
    assert granted <= burst + rate * now + 1e-6


# --- PinGuard ---------------------------------------------------------------------------------


BASE = RelayConfig(
    pin_backoff_initial=0.5,
    pin_backoff_max=30.0,
    pin_lockout_failures=1000,
    pin_failure_window=600.0,
    pin_global_failures=10_000,
)


def config(**overrides: Any) -> RelayConfig:
    """Generous limits, so that each test trips only the one it is about."""
    return attrs.evolve(BASE, **overrides)


OPEN = PinCheck(delay=0.0, locked=False)


def test_a_fresh_address_is_not_held_up() -> None:
    guard = PinGuard(config())
    assert guard.check("10.0.0.1", 0.0) == OPEN
    assert guard.tracked_addresses() == 0


def test_delay_doubles_from_initial_up_to_max() -> None:
    guard = PinGuard(config())
    delays = [guard.failed("10.0.0.1", float(t)).delay for t in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_delay_cap_with_other_settings() -> None:
    guard = PinGuard(config(pin_backoff_initial=1.0, pin_backoff_max=5.0))
    assert [guard.failed("a", 0.0).delay for _ in range(6)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_delay_stays_at_max_after_very_many_failures() -> None:
    guard = PinGuard(config(pin_lockout_failures=10_000, pin_global_failures=10_000))
    checks = [guard.failed("a", 0.0) for _ in range(2000)]
    assert checks[-1] == PinCheck(delay=30.0, locked=False)


def test_default_config_backoff_and_lockout() -> None:
    defaults = RelayConfig()
    guard = PinGuard(defaults)
    checks = [guard.failed("a", float(t)) for t in range(defaults.pin_lockout_failures)]
    assert [c.delay for c in checks] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert [c.locked for c in checks] == [False] * 9 + [True]


def test_lockout_after_too_many_failures_within_the_window() -> None:
    guard = PinGuard(config(pin_lockout_failures=3, pin_failure_window=60.0))
    assert guard.failed("a", 0.0).locked is False
    assert guard.failed("a", 10.0).locked is False
    third = guard.failed("a", 20.0)
    assert third.locked is True
    assert third.delay == 2.0
    check = guard.check("a", 21.0)
    assert check.locked is True
    assert check.delay > 0
    assert guard.check("a", 59.9).locked is True


def test_lockout_lifts_once_the_oldest_failure_leaves_the_window() -> None:
    guard = PinGuard(config(pin_lockout_failures=3, pin_failure_window=60.0))
    for t in (0.0, 10.0, 20.0):
        guard.failed("a", t)
    assert guard.check("a", 59.0).locked is True
    # The failure at 0 has left the window: two remain, under the limit.
    assert guard.check("a", 60.5) == PinCheck(delay=0.0, locked=False)
    # Those two still count: one more failure locks again.
    assert guard.failed("a", 61.0).locked is True
    assert guard.check("a", 62.0).locked is True
    # Once the whole window has passed, the address is free.
    assert guard.check("a", 61.0 + 60.0 + 0.1) == OPEN


def attempt_and_fail(guard: PinGuard, address: str, now: float) -> PinCheck:
    """What the relay does with a wrong PIN: `check` first, then `failed`."""
    assert guard.check(address, now).locked is False
    return guard.failed(address, now)


def test_failures_spread_wider_than_the_window_never_lock() -> None:
    guard = PinGuard(config(pin_lockout_failures=3, pin_failure_window=60.0))
    for t in range(0, 1000, 31):  # at most two failures are ever inside one window
        assert attempt_and_fail(guard, "a", float(t)).locked is False


def test_failed_alone_forgets_failures_outside_the_window() -> None:
    # `failed` is documented to count failures "within pin_failure_window"; it must not rely
    # on a `check` at the same moment to forget the older ones.
    guard = PinGuard(config(pin_lockout_failures=3, pin_failure_window=60.0))
    assert guard.failed("a", 0.0).locked is False
    assert guard.failed("a", 31.0).locked is False
    assert guard.failed("a", 62.0) == PinCheck(delay=1.0, locked=False)


def test_success_clears_the_address() -> None:
    guard = PinGuard(config(pin_lockout_failures=3))
    guard.failed("a", 0.0)
    guard.failed("a", 1.0)
    assert guard.tracked_addresses() == 1
    guard.succeeded("a")
    assert guard.tracked_addresses() == 0
    assert guard.check("a", 2.0) == OPEN
    # The backoff starts over, and two more failures do not lock.
    assert guard.failed("a", 3.0) == PinCheck(delay=0.5, locked=False)
    assert guard.failed("a", 4.0) == PinCheck(delay=1.0, locked=False)


def test_success_of_an_unknown_address_is_harmless() -> None:
    guard = PinGuard(config())
    guard.succeeded("never-seen")
    assert guard.tracked_addresses() == 0


def test_other_addresses_are_unaffected() -> None:
    guard = PinGuard(config(pin_lockout_failures=3))
    for t in range(3):
        guard.failed("attacker", float(t))
    assert guard.check("attacker", 5.0).locked is True
    assert guard.check("neighbour", 5.0) == OPEN
    assert guard.failed("neighbour", 6.0) == PinCheck(delay=0.5, locked=False)
    guard.succeeded("neighbour")
    assert guard.check("attacker", 7.0).locked is True


def test_global_cap_locks_everyone() -> None:
    guard = PinGuard(config(pin_lockout_failures=10, pin_global_failures=5,
                            pin_failure_window=60.0))
    results = [guard.failed(f"10.0.0.{n}", float(n)) for n in range(5)]
    # No address came near its own limit, but together they reached the global one.
    assert [r.locked for r in results] == [False] * 4 + [True]
    assert all(r.delay == 0.5 for r in results)
    assert guard.check("10.0.0.1", 10.0).locked is True
    assert guard.check("192.168.1.1", 10.0).locked is True  # never failed, still refused
    # Once the window has passed, everyone may try again.
    assert guard.check("192.168.1.1", 4.0 + 60.0 + 0.1) == OPEN
    assert guard.check("10.0.0.1", 4.0 + 60.0 + 0.1) == OPEN


def test_global_cap_counts_a_sliding_window() -> None:
    guard = PinGuard(config(pin_global_failures=3, pin_failure_window=60.0))
    attempt_and_fail(guard, "a", 0.0)
    attempt_and_fail(guard, "b", 30.0)
    # The failure at 0 has expired by 61: only two in the window after this one.
    assert attempt_and_fail(guard, "c", 61.0).locked is False
    assert attempt_and_fail(guard, "d", 62.0).locked is True
    assert guard.check("e", 63.0).locked is True


def test_memory_of_addresses_expires() -> None:
    guard = PinGuard(config(pin_failure_window=60.0))
    for n in range(50):
        guard.failed(f"10.0.{n}.1", float(n) / 10)
    assert guard.tracked_addresses() == 50
    guard.failed("late", 30.0)
    assert guard.tracked_addresses() == 51
    # The early ones are forgotten once their window has passed; the late one is kept.
    guard.check("someone", 65.0)
    assert guard.tracked_addresses() == 1
    guard.check("someone", 90.0)
    assert guard.tracked_addresses() == 0
    # A check alone never makes an address tracked.
    for n in range(10):
        guard.check(f"172.16.0.{n}", 100.0)
    assert guard.tracked_addresses() == 0


# --- pin_matches ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "pin", "expected"),
    [
        ("1234", "1234", True),
        ("", "", True),
        ("1234", "1235", False),
        ("0000", "1234", False),
        ("123", "1234", False),
        ("12345", "1234", False),
        ("", "1234", False),
        ("1234", "", False),
        ("1234 ", "1234", False),
        ("пин", "пин", True),
        ("пин", "пип", False),
        ("ключ-😀", "ключ-😀", True),
        ("é", "e\u0301", False),  # precomposed vs combining: different code points
        ("é", "e", False),
        ("1234", "\uff11\uff12\uff13\uff14", False),  # fullwidth digits are not ASCII digits
    ],
)
def test_pin_matches(candidate: str, pin: str, expected: bool) -> None:
    assert pin_matches(candidate, pin) is expected
    assert pin_matches(pin, candidate) is expected
