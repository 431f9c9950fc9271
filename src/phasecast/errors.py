"""Exceptions that cross module boundaries. Each maps to one HTTP status and one
WebSocket error code in ``server/errors.py``; the message tells the caller how to fix it."""

from __future__ import annotations


class PhasecastError(Exception):
    """Base class for errors that the service reports to its callers."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidUpdate(PhasecastError):
    """A value that can never be valid: out of range, malformed, too large."""

    code = "invalid"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


class JobNotFound(PhasecastError):
    code = "not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}; it never existed or has expired")
        self.job_id = job_id


class JobExists(PhasecastError):
    code = "conflict"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"a job with id {job_id!r} already exists; pick another id or omit it")
        self.job_id = job_id


class JobTerminal(PhasecastError):
    code = "terminal"

    def __init__(self, job_id: str, phase: str) -> None:
        # ``phase`` is a ``model.Phase`` (a str enum); typed as str so that this module
        # depends on nothing else in the package.
        super().__init__(
            f"job {job_id!r} has already ended ({phase}); a finished job cannot change"
        )
        self.job_id = job_id
        self.phase = phase


class EngineUnavailable(PhasecastError):
    code = "unavailable"


class InvalidJSON(PhasecastError):
    """A request body that is not JSON text (or not UTF-8)."""

    code = "invalid_json"


class UnsupportedMediaType(PhasecastError):
    """A request body in a format the server does not read (it reads JSON only)."""

    code = "unsupported_media_type"


class ConfigurationError(PhasecastError):
    code = "configuration"
