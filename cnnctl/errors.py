"""The one exception hierarchy.

Every error a user or client can cause is a ``CnnctlError`` whose message names the bad value and
what is allowed. The CLI maps it to one line and exit code 2 (cnnctl/cli.py); the server maps it to
a gRPC status code through one table (serving/errors.py). This module imports nothing heavy so that
every stage, serving included, can use it without importing torch.
"""

from __future__ import annotations


class CnnctlError(Exception):
    """Base of every error cnnctl raises on purpose."""


class UsageError(CnnctlError):
    """A bad flag or argument value (CLI) or a bad request field (server): INVALID_ARGUMENT."""


class UnknownNameError(UsageError):
    """An unknown model, dataset, format...: the message lists the known ones."""


class ShapeError(UsageError):
    """A tensor or dataset whose shape does not match what the model expects."""


class AlreadyExistsError(UsageError):
    """A name that is already taken (a shared-memory region registered twice): ALREADY_EXISTS."""


class NotEnabledError(CnnctlError):
    """A feature the server was not started with (shared memory): FAILED_PRECONDITION."""


class DataError(CnnctlError):
    """A dataset that cannot be found or read."""


class CheckpointError(CnnctlError):
    """A checkpoint that cannot be loaded (wrong format, pickled payload, missing keys)."""


class ArtifactError(CnnctlError):
    """An artifact directory or manifest that is missing, malformed or tampered with."""


class VerificationError(CnnctlError):
    """An exported artifact whose outputs do not match the eager model."""


class NotFoundError(CnnctlError):
    """A model or version the server does not serve: NOT_FOUND."""


class OverloadedError(CnnctlError):
    """The request queue is full, or a message is over the size limit: RESOURCE_EXHAUSTED."""


class MessageTooLargeError(OverloadedError):
    """A request body over --max-message-mb: RESOURCE_EXHAUSTED (gRPC), 413 (HTTP)."""


class RequestTimeoutError(UsageError):
    """An HTTP request body not in full within --request-read-timeout-s: 408 (REST only)."""


class DeadlineExceededError(CnnctlError):
    """A request whose deadline passed before it was computed: DEADLINE_EXCEEDED."""


class PermissionDeniedError(CnnctlError):
    """A client asking for what the operator did not allow it (shared memory from another host,
    another user's shared-memory object): PERMISSION_DENIED."""


class UnavailableError(CnnctlError):
    """The server is shutting down or a model is not ready: UNAVAILABLE."""


def known(names: object) -> str:
    """Format a list of allowed values for an error message."""
    return ", ".join(str(n) for n in names)
