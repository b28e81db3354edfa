"""`RelayCounters`: what the relay has counted since it started, for ``/metrics``.

One object owned by the relay and handed to each connection when it is made; each attribute
is one counter (docs/operations.md lists them with their metric names).
"""

from __future__ import annotations

import attrs

__all__ = ["RelayCounters"]


@attrs.define(slots=True)
class RelayCounters:
    """Totals since the relay started; they only grow."""

    #: Pushes handed to web clients: one per client per push.
    pushes_sent: int = 0
    #: Clients closed with 1013 because their outbound queue overflowed.
    slow_closes: int = 0
    #: ``auth`` requests with a wrong PIN.
    failed_pins: int = 0
    #: Backend calls that failed or timed out.
    backend_errors: int = 0
    #: WebSocket connections accepted (the opening handshake succeeded).
    connections_accepted: int = 0
    #: WebSocket connections that have ended, however they ended.
    connections_closed: int = 0
    #: Streams dropped or refused before a WebSocket was open: bad HTTP, refused upgrades,
    #: handshake timeouts.
    handshakes_failed: int = 0
