"""Every Redis key and channel name Phasecast uses, in one place.

A prefix (``?prefix=`` in the engine URL, default ``phasecast``) lets several deployments,
or test runs, share one Redis without seeing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class RedisKeys:
    prefix: str = "phasecast"

    def job(self, job_id: str) -> str:
        """Hash: ``state`` (JSON), ``seq``, ``terminal``."""
        return f"{self.prefix}:job:{job_id}"

    def history(self, job_id: str) -> str:
        """Stream of history entries, trimmed to about the history limit."""
        return f"{self.prefix}:job:{job_id}:history"

    def channel(self, job_id: str) -> str:
        """Pub/sub channel that carries every accepted change of one job."""
        return f"{self.prefix}:changes:{job_id}"

    def owner_index(self, owner: str) -> str:
        """Sorted set of an owner's job ids scored by creation time."""
        return f"{self.prefix}:owner:{owner}"

    def all_jobs(self) -> str:
        """Sorted set of every job id scored by creation time, for admin listings."""
        return f"{self.prefix}:jobs"

    def stats(self, kind: str) -> str:
        """Hash of learned phase durations for one job kind."""
        return f"{self.prefix}:stats:{kind}"

    # --- plugins: each job's keys carry the job's hash tag; cross-job keys stand alone ---

    def runpod_panels(self, job_id: str) -> str:
        """Hash: step id → RunPod panel record (JSON), with the job's hash tag."""
        return f"{self.prefix}:runpod:panels:{{{job_id}}}"

    def runpod_inflight(self) -> str:
        """Sorted set of ``job_id/step`` of every in-flight panel, scored by next poll time."""
        return f"{self.prefix}:runpod:inflight"

    def runpod_lease(self, key: str) -> str:
        """String: the instance id polling one in-flight panel, with a TTL."""
        return f"{self.prefix}:runpod:lease:{key}"

    def archive_states(self) -> str:
        """Hash: job id → ``seq|state JSON`` not yet written to the PostgreSQL archive."""
        return f"{self.prefix}:archive:outbox:states"

    def archive_events(self) -> str:
        """Hash: event key → event JSON not yet written to the PostgreSQL archive."""
        return f"{self.prefix}:archive:outbox:events"

    def pattern(self) -> str:
        """Matches every key of this prefix (used by tests to clean up after themselves)."""
        return f"{self.prefix}:*"
