"""What an engine keeps for the optional parts of Phasecast, beside its job states.

Plugins (the RunPod integration, the PostgreSQL archive) store their own records in the
engine the server runs on, so they share its durability and its reach across instances, but
they never touch the engine's driver: each engine returns implementations of these
interfaces (``Engine.panel_records()``, ``Engine.archive_outbox()``), written beside the
engine and imported only when asked for, so no engine's path imports another's driver.

Records are opaque strings to the engine: their meaning belongs to the plugin.
"""

from __future__ import annotations

from typing import Protocol


class PanelRecords(Protocol):
    """One record per (job, step), an index of the active ones by next poll time, and leases.

    On Redis, a job's records share its hash tag; the index and the leases are cross-job keys
    written by separate commands, so everything works on Redis Cluster. A crash between the
    record and the index leaves at most an index entry for a record that is no longer active
    (the reader drops it with ``unindex``), never an active record missing from the index:
    ``swap`` indexes before it stores an active record and unindexes after it stores an
    inactive one.
    """

    async def start(self) -> None: ...

    async def get(self, job_id: str, step: str) -> str | None: ...

    async def all(self, job_id: str) -> list[str]: ...

    async def swap(
        self, job_id: str, step: str, old: str | None, new: str, *, active: bool, next_poll: float
    ) -> bool:
        """Store ``new`` if the stored record is still ``old`` (``None``: none stored)."""
        ...

    async def schedule(self, job_id: str, step: str, at: float) -> None:
        """Poll an indexed record next at ``at`` (nothing if it is not indexed)."""
        ...

    async def unindex(self, job_id: str, step: str) -> None: ...

    async def due(self, now: float, limit: int) -> list[tuple[str, str]]: ...

    async def lease(self, key: str, owner: str, ttl: float) -> bool:
        """Take or renew the lease ``key`` for ``owner``; False if someone else holds it."""
        ...

    async def release(self, key: str, owner: str) -> None: ...


class ArchiveOutbox(Protocol):
    """Archive records not yet written to PostgreSQL, durable across a server crash.

    Per job only the newest state is kept (``put_state`` keeps the higher ``seq``); events are
    kept by a key of the caller's choosing (one per job, epoch and phase), the first one filed
    under a key wins. ``ack_*`` removes exactly what was written: a state filed meanwhile with
    a higher seq stays.
    """

    async def start(self) -> None: ...

    async def put(self, states: list[tuple[str, int, str]], events: list[tuple[str, str]]) -> None:
        """File ``(job_id, seq, state_json)`` states and ``(key, event_json)`` events."""
        ...

    async def states(self, limit: int) -> list[tuple[str, int, str]]: ...

    async def events(self, limit: int) -> list[tuple[str, str]]: ...

    async def state(self, job_id: str) -> str | None: ...

    async def ack(self, states: list[tuple[str, int]], events: list[str]) -> None: ...

    async def size(self) -> int: ...
