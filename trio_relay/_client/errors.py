"""What the client raises: one `RelayClientError` subclass per kind of failure.

The (code, error) ones are `CodedError` s, like the relay's own refusals. Each keeps the
``args`` its constructor takes, so that `copy.copy` (which the client uses to raise one
terminal error from many places) rebuilds it whole.
"""

from __future__ import annotations

from typing import Any

from .._errors import CodedError

__all__ = [
    "AuthFailed",
    "ConnectionLost",
    "LockedOut",
    "RelayClientError",
    "RequestRejected",
    "RequestTimeout",
    "SubscriptionFailed",
    "TokenInvalid",
    "auth_error",
    "rejection",
]


class RelayClientError(Exception):
    """Base of every error the client raises (besides `trio.ClosedResourceError` after you
    closed it yourself)."""


class AuthFailed(RelayClientError, CodedError):
    """The relay refused the PIN or token. Terminal: the client does not retry (with the same
    secret it would only feed the lockout); ask the user.

    ``code`` is the wire's: ``auth_failed`` (a wrong PIN; this class), ``token_invalid``
    (`TokenInvalid`) or ``locked_out`` (`LockedOut`). ``close_code`` is the WebSocket close
    code when the relay also closed the connection, else None.
    """

    def __init__(
        self, error: str, close_code: int | None = None, *, code: str = "auth_failed"
    ) -> None:
        CodedError.__init__(self, code, error)
        self.args = (error, close_code)
        self.close_code = close_code

    def __str__(self) -> str:
        suffix = f" (close code {self.close_code})" if self.close_code is not None else ""
        return f"authentication failed: {self.error}{suffix}"


class TokenInvalid(AuthFailed):
    """The device token is unknown or revoked: forget it and sign in with the PIN."""


class LockedOut(AuthFailed):
    """Too many failed attempts from this address: nothing is compared for ``retry_after``
    seconds (the relay's count, rounded up), not even the right PIN."""

    def __init__(
        self, error: str, close_code: int | None = None, *, retry_after: int | None = None
    ) -> None:
        super().__init__(error, close_code, code="locked_out")
        self.retry_after = retry_after


class RequestTimeout(RelayClientError):
    """A request was sent but not answered within ``request_timeout``."""


class RequestRejected(RelayClientError, CodedError):
    """The relay answered a request with an error; ``code`` is the wire's stable error code
    (``not_found``, ``backend_error``, ``rate_limited``, ...), ``error`` its text."""

    def __str__(self) -> str:
        return f"{self.error} ({self.code})"


class SubscriptionFailed(RelayClientError, CodedError):
    """A subscription ended with an error: the relay's last push of a failed upstream
    (``backend_error``), or a resubscription after a reconnect that was refused (for
    example ``not_found``: the chat was deleted meanwhile)."""

    def __str__(self) -> str:
        return f"{self.error} ({self.code})"


class ConnectionLost(RelayClientError):
    """The connection is gone and this operation cannot go on.

    Raised by a request that was in flight when the connection dropped (a ``send`` is never
    repeated, since it may have been delivered), by a request that found no connection within
    its timeout, when connecting fails at first, and by everything once the relay closed the
    connection for good (``close_code`` 1008). ``close_code`` is None when no close frame was
    received.
    """

    def __init__(self, reason: str, close_code: int | None = None) -> None:
        super().__init__(reason, close_code)
        self.reason = reason
        self.close_code = close_code

    def __str__(self) -> str:
        if self.close_code is None:
            return self.reason
        return f"{self.reason} (close code {self.close_code})"


def auth_error(reply: dict[str, Any]) -> AuthFailed:
    """The error an ``auth_failed`` reply stands for."""
    code = str(reply.get("code") or "auth_failed")
    error = str(reply.get("error") or "Invalid PIN")
    if code == "token_invalid":
        return TokenInvalid(error, code=code)
    if code == "locked_out":
        retry_after = reply.get("retryAfter")
        return LockedOut(error, retry_after=retry_after if isinstance(retry_after, int)
                         and not isinstance(retry_after, bool) else None)
    return AuthFailed(error, code=code)


def rejection(reply: dict[str, Any]) -> RequestRejected:
    """The error an ``error`` reply stands for."""
    return RequestRejected(str(reply.get("code") or "error"), str(reply.get("error") or "error"))
