"""The tables from exceptions to gRPC status codes and to HTTP statuses.

Every error the server answers with goes through ``status_for`` (gRPC) or ``http_status_for``
(REST): a ``CnnctlError`` subclass maps to its code and keeps its message (which names the bad value
and what is allowed); anything else is a bug, answered INTERNAL (500) with a short message and
logged with its traceback.
"""

from __future__ import annotations

import logging
import time

import grpc

from cnnctl.errors import (
    AlreadyExistsError,
    ArtifactError,
    CnnctlError,
    DeadlineExceededError,
    MessageTooLargeError,
    NotEnabledError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RequestTimeoutError,
    UnavailableError,
    UsageError,
)

log = logging.getLogger(__name__)

# First match wins, so a subclass must come before its base class.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (UsageError, grpc.StatusCode.INVALID_ARGUMENT),  # ShapeError, UnknownNameError included
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (ArtifactError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotEnabledError, grpc.StatusCode.FAILED_PRECONDITION),
    (CnnctlError, grpc.StatusCode.INTERNAL),
)

# HTTP statuses by gRPC code, as grpc-gateway maps them (FAILED_PRECONDITION: 400), except that a
# body over --max-message-mb is 413 (both are RESOURCE_EXHAUSTED over gRPC) and a body too slow to
# arrive is 408 (HTTP's own).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
TOO_LARGE = 413
REQUEST_TIMEOUT = 408

# Refusals (and internal errors) are logged at most once per LOG_EVERY_S, with a count of the rest:
# a client sending bad requests in a loop must not flood the log.
LOG_EVERY_S = 10.0
# A message quotes values the client sent (a model name, say): a status message and a log line
# carry at most this many characters of it.
MESSAGE_MAX = 1000


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code alone (no logging): for counting failures by code."""
    return next((code for cls, code in STATUS_TABLE if isinstance(exc, cls)),
                grpc.StatusCode.INTERNAL)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message to answer ``exc`` with (logged, rate-limited)."""
    code = code_for(exc)
    if code is grpc.StatusCode.INTERNAL and not isinstance(exc, CnnctlError):
        message = f"internal error ({type(exc).__name__}); see the server log"
    else:
        message = _clip(str(exc))
    _log.note(code, message if code is not grpc.StatusCode.INTERNAL else repr(exc), exc)
    return code, message


def http_status_for(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and message to answer ``exc`` with (logged as ``status_for`` logs)."""
    code, message = status_for(exc)
    if isinstance(exc, MessageTooLargeError):
        return TOO_LARGE, message
    if isinstance(exc, RequestTimeoutError):
        return REQUEST_TIMEOUT, message
    return HTTP_STATUS.get(code, 500), message


def _clip(message: str) -> str:
    return message if len(message) <= MESSAGE_MAX else message[:MESSAGE_MAX] + "…"


class _RateLimitedLog:
    """Refusals as one line per LOG_EVERY_S: how many of each code, and the latest message.
    Internal errors (bugs) are logged at ERROR with their traceback, at the same rate."""

    def __init__(self) -> None:
        self._next = {False: 0.0, True: 0.0}  # internal? -> when the next line may be written
        self._counts: dict[bool, dict[str, int]] = {False: {}, True: {}}

    def note(self, code: grpc.StatusCode, message: str, exc: BaseException) -> None:
        internal = code is grpc.StatusCode.INTERNAL
        counts = self._counts[internal]
        counts[code.name] = counts.get(code.name, 0) + 1
        now = time.monotonic()
        if now < self._next[internal]:
            return
        self._next[internal] = now + LOG_EVERY_S
        summary = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        counts.clear()
        # Escaped: a client's value must not start a log line of its own.
        text = _clip(message).encode("unicode_escape").decode("ascii")
        if internal:
            log.error("internal error answering a request (%s since the last such line): %s",
                      summary, text, exc_info=exc)
        else:
            log.warning("refused requests (%s since the last such line); latest: %s",
                        summary, text)


_log = _RateLimitedLog()
