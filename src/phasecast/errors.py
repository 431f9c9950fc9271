"""Exceptions that cross module boundaries. Each maps to one HTTP status and one
WebSocket error code in ``server/errors.py``; the message tells the caller how to fix it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from phasecast.model import Phase


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

    def __init__(self, job_id: str, phase: Phase) -> None:
        super().__init__(
            f"job {job_id!r} has already ended ({phase.value}); a finished job cannot change"
        )
        self.job_id = job_id
        self.phase = phase


class EngineUnavailable(PhasecastError):
    code = "unavailable"


class ConfigurationError(PhasecastError):
    code = "configuration"
