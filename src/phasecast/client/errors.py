"""What a watch can end with other than the job's terminal state."""

from __future__ import annotations


class ClientError(Exception):
    """Base of every error the Python client raises; ``str()`` says what to do about it."""


class AuthenticationError(ClientError):
    """The server refused the token (401, close 4401, or it expired with no way to refresh it)."""


class ForbiddenError(ClientError):
    """The token is valid but may not watch this job (403, close 4403, ``forbidden``)."""


class JobNotFoundError(ClientError):
    """No such job (404, ``not_found``): it never existed, or it expired."""


class ConnectionFailedError(ClientError):
    """The server could not be reached, over any transport, for longer than the retry policy
    allows (``RetryPolicy.give_up_after``; at once with ``fail_fast`` before any link opened)."""


class ProtocolError(ClientError):
    """The server answered something this client does not understand, or refused a request
    as malformed (a 4xx other than the ones above)."""
