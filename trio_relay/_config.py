"""Every limit and timeout of the relay, each with a documented default (docs/operations.md)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import attrs

from ._errors import positive

__all__ = ["CloseCode", "RelayConfig", "RelayStatistics"]


class CloseCode:
    """WebSocket close codes the relay sends, and why (docs/protocol.md has the table)."""

    NORMAL: Final = 1000
    GOING_AWAY: Final = 1001  # the relay is shutting down
    PROTOCOL_ERROR: Final = 1002  # a frame that breaks the WebSocket protocol
    UNSUPPORTED_DATA: Final = 1003  # a binary frame
    INVALID_PAYLOAD: Final = 1007  # a text frame that is not UTF-8
    POLICY_VIOLATION: Final = 1008  # auth timeout, PIN lockout, repeated abuse, revoked device
    MESSAGE_TOO_BIG: Final = 1009  # a message over max_message_size
    INTERNAL_ERROR: Final = 1011  # a bug in the relay; the relay itself stays up
    # 1013 "Try Again Later" is IANA-registered for exactly this: the client may reconnect and
    # resume at once; it is kept apart from 1008 so that clients know it is not terminal.
    SLOW_CONSUMER: Final = 1013
    # 1012 "Service Restart": the broker lost a resource's history or stayed unreachable; the
    # client reconnects (maybe to another relay) and resumes, or gets a fresh snapshot.
    SERVICE_RESTART: Final = 1012


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen(kw_only=True)
class RelayConfig:
    """Limits and timeouts. Durations are in seconds; sizes in bytes or frames as named."""

    #: Largest text frame a client may send; a larger one closes the connection with 1009.
    max_message_size: int = attrs.field(default=64 * 1024, validator=positive)
    #: Frames queued for one client before it counts as slow and is closed with 1013.
    outbound_queue_size: int = attrs.field(default=1024, validator=positive)
    #: Pushes buffered for one in-process listener before it fails with ListenerOverflow.
    listener_buffer: int = attrs.field(default=1024, validator=positive)
    #: Bound on every backend call (snapshot, send, create, opening a feed).
    backend_timeout: float = attrs.field(default=10.0, validator=positive)
    #: WebSocket opening handshake.
    handshake_timeout: float = attrs.field(default=10.0, validator=positive)
    #: Time from connect to a successful ``auth``; then close 1008.
    auth_timeout: float = attrs.field(default=10.0, validator=positive)
    #: Time a closing handshake may take before the TCP connection is dropped.
    close_timeout: float = attrs.field(default=5.0, validator=positive)
    #: Time given to all clients to close on shutdown before they are dropped.
    shutdown_timeout: float = attrs.field(default=5.0, validator=positive)
    #: Live subscriptions per connection (``too_many_subscriptions`` past it).
    max_subscriptions: int = attrs.field(default=128, validator=positive)
    #: Requests per second per connection, sustained (token bucket refill rate).
    request_rate: float = attrs.field(default=20.0, validator=positive)
    #: Requests a connection may make in a burst (token bucket size).
    request_burst: int = attrs.field(default=50, validator=positive)
    #: Bad or rate-limited requests a connection may make before it is closed with 1008.
    max_strikes: int = attrs.field(default=50, validator=positive)
    #: First delay before a failed PIN is answered; it doubles with each failure in a row.
    pin_backoff_initial: float = attrs.field(default=0.5, validator=positive)
    #: Longest delay before a failed PIN is answered.
    pin_backoff_max: float = attrs.field(default=30.0, validator=positive)
    #: Failed PINs from one address, within ``pin_failure_window``, before it is locked out.
    pin_lockout_failures: int = attrs.field(default=10, validator=positive)
    #: How long failures are remembered per address (and how long a lockout lasts).
    pin_failure_window: float = attrs.field(default=600.0, validator=positive)
    #: Failed PINs from all addresses per ``pin_failure_window`` before every attempt is
    #: refused until the window has passed (a distributed guess cannot outrun the cap).
    pin_global_failures: int = attrs.field(default=100, validator=positive)
    #: Changes a joining subscriber may miss while its snapshot loads before it must retry.
    max_pending_changes: int = attrs.field(default=4096, validator=positive)
    #: Seconds between keepalive pings to each client.
    ping_interval: float = attrs.field(default=20.0, validator=positive)
    #: Seconds a client has to answer a ping before it counts as gone (closed with 1011).
    ping_timeout: float = attrs.field(default=20.0, validator=positive)
    #: Open connections from one client address; more are refused with HTTP 429.
    max_connections_per_address: int = attrs.field(default=64, validator=positive)
    #: Browser origins (``scheme://host[:port]``) allowed besides the relay's own; a browser
    #: whose ``Origin`` is neither is refused with HTTP 403. Clients that send no ``Origin``
    #: (not browsers) are always allowed.
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    #: Recent pushes kept per resource so that a client that reconnects can resume.
    replay_buffer_size: int = attrs.field(default=1024, validator=positive)
    #: Seconds a push stays resumable (older ones are dropped from the replay buffer).
    replay_max_age: float = attrs.field(default=120.0, validator=positive)
    #: Seconds a resource stays resumable after its last subscriber left: if it dropped, its
    #: upstream stays open and changes go on being recorded; if it unsubscribed, its numbering
    #: and replay buffer are kept. Then they are freed.
    resume_grace: float = attrs.field(default=30.0, validator=positive)
    #: With a broker: every call to it is bounded by this; a broker that does not answer in
    #: time (frozen, or the network to it lost) counts as unreachable.
    broker_timeout: float = attrs.field(default=5.0, validator=positive)
    #: With a broker: how long live subscriptions wait for an unreachable broker to come back
    #: before their clients are closed with 1012 (to reconnect and resume, maybe elsewhere).
    broker_grace: float = attrs.field(default=30.0, validator=positive)
    #: Serve the web client at ``/`` (``/healthz`` and ``/metrics`` are always served).
    web_client: bool = True
    #: Write each frame into the client's socket at once, without waiting, when nothing is
    #: queued for it (docs/performance.md); off: every frame goes through a writer task.
    direct_writes: bool = True


@attrs.frozen(kw_only=True)
class RelayStatistics:
    """A snapshot of what the relay holds, as `Relay.statistics` returns it."""

    connections: int
    authenticated_connections: int
    subscriptions: int
    listeners: int
    broadcasters: int
    #: Stream histories (replay buffers) kept for resuming after their broadcaster ended.
    kept_histories: int
    tasks: int
    #: Broadcasters whose last subscriber dropped, kept running for ``resume_grace`` so that
    #: it resumes with what changed meanwhile (counted in ``broadcasters`` too).
    lingering: int = 0
