"""The one table from exceptions to gRPC status codes.

Every error the server answers with goes through ``status_for``: a ``CnnctlError`` subclass maps to
its code and keeps its message (which names the bad value and what is allowed); anything else is a
bug, answered INTERNAL with a short message and logged with its traceback.
"""

from __future__ import annotations

import logging

import grpc

from cnnctl.errors import (
    AlreadyExistsError,
    ArtifactError,
    CnnctlError,
    DeadlineExceededError,
    NotEnabledError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
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


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code alone (no logging): for counting failures by code."""
    return next((code for cls, code in STATUS_TABLE if isinstance(exc, cls)),
                grpc.StatusCode.INTERNAL)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message to answer ``exc`` with."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            if code is grpc.StatusCode.INTERNAL:
                log.error("internal error: %s", exc, exc_info=exc)
            return code, str(exc)
    log.error("unexpected %s while serving a request", type(exc).__name__, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
