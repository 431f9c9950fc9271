"""Every Redis key and channel name Phasecast uses, in one place.

A prefix (``?prefix=`` in the engine URL, default ``phasecast``) lets several deployments,
or test runs, share one Redis without seeing each other.

Every key and channel of one job carries the job id verbatim as its hash tag,
``<prefix>:<kind>:{<job_id>}``. Two things follow:

* On Redis Cluster, all of a job's keys live in one hash slot, so each write of a job is one
  atomic script on one shard (and its channel is a sharded pub/sub channel of that shard).
* One id's keys can never be mistaken for another's: job ids cannot contain braces
  (``model.JOB_ID_PATTERN``), so the id is exactly the text between ``{`` and the closing
  ``}``, and ``X:history`` names a job, never the history of ``X``.

Cross-job keys (the owner and all-jobs indexes, learned phase durations, the RunPod
in-flight index and leases) carry no job's tag; they are updated by commands of their own,
never inside a script that touches a job's keys.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class RedisKeys:
    prefix: str = "phasecast"

    def of_job(self, kind: str, job_id: str) -> str:
        """The key ``kind`` of one job, in that job's hash slot. Integrations that keep
        per-job data of their own (the RunPod panel records) name their keys with this, so a
        script can touch them together with the job's own keys on a cluster."""
        return f"{self.prefix}:{kind}:{{{job_id}}}"

    def job(self, job_id: str) -> str:
        """Hash: ``state`` (JSON), ``seq``, ``terminal``, ``ix`` (0 until indexed)."""
        return self.of_job("job", job_id)

    def history(self, job_id: str) -> str:
        """Stream of history entries, trimmed to about the history limit."""
        return self.of_job("history", job_id)

    def channel(self, job_id: str) -> str:
        """Pub/sub channel that carries every accepted change of one job (a sharded
        channel on a cluster)."""
        return self.of_job("changes", job_id)

    def idle_channel(self, tag: str) -> str:
        """A channel nobody publishes to: it keeps a subscriber connection subscribed (so
        it can wait for messages) while no job is watched. ``tag`` picks its hash slot."""
        return f"{self.prefix}:idle:{{{tag}}}"

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
        return self.of_job("runpod:panels", job_id)

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

