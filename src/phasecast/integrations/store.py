"""Where the RunPod side of each panel is kept: which RunPod job draws it, how far it got,
when to poll it next, and who is polling it.

The set of in-flight panels is stored, never only held in memory, so a restarted server (or
another instance) picks up polling where the last one stopped. The records live in the
engine the server runs on, through the engine interface (``Engine.panel_records()``, see
``phasecast.engines.extensions``): on Redis a hash per job carrying the job's hash tag, an
index of in-flight panels and a lease per panel (exactly one instance polls it; a lease
whose holder died expires and another instance takes over); on SQLite a table in the
engine's file, written by the engine's own writer thread.

Records change by compare-and-set on their serialized form: a webhook and a poll that see
the same RunPod job finish race to record it, and only the winner acts (resubmits, fails the
job), so nothing happens twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from phasecast.engines.base import Engine
from phasecast.engines.extensions import PanelRecords

PanelStatus = Literal["submitting", "IN_QUEUE", "IN_PROGRESS", "done", "failed", "cancelled"]
ACTIVE_STATUSES: frozenset[str] = frozenset({"submitting", "IN_QUEUE", "IN_PROGRESS"})


@dataclass(slots=True, frozen=True)
class FailurePolicy:
    """What a failed panel does to its job: ``fail`` it, or ``retry`` the panel up to
    ``max_retries`` more times, by ``/retry`` on the same RunPod job or a new ``/run``."""

    on_failure: Literal["fail", "retry"] = "fail"
    max_retries: int = 0
    retry_with: Literal["run", "retry"] = "run"


@dataclass(slots=True, frozen=True)
class Panel:
    job_id: str
    step: str
    input: Any
    policy: FailurePolicy = field(default_factory=FailurePolicy)
    status: PanelStatus = "submitting"
    runpod_id: str | None = None
    attempt: int = 1
    progress: float = 0.0
    output: Any = None
    error: dict[str, str] | None = None
    next_poll: float = 0.0  # Unix time
    updated_at: float = 0.0
    # The intent to submit, stored before /run: the idempotency key sent in the input and
    # the webhook URL, and when /run was sent (None once its answer is stored, or when no
    # /run is under way). A crash leaves both set; the submission is then adopted when its
    # webhook arrives, and given up only once RunPod has surely dropped it (its ttl).
    submission: str | None = None
    submitted_at: float | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def member(self) -> str:
        # "/" never occurs in job ids or step ids, so this splits back unambiguously.
        return f"{self.job_id}/{self.step}"

    def evolve(self, **changes: Any) -> Panel:
        return replace(self, updated_at=time.time(), **changes)

    def to_json(self) -> str:
        # Sorted keys: the compare-and-set compares serialized records.
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Panel:
        data = json.loads(text)
        data["policy"] = FailurePolicy(**data.get("policy") or {})
        return cls(**data)

    def public(self) -> dict[str, Any]:
        """What the panels endpoint shows (the input can be large and is the caller's own)."""
        return {
            "step": self.step,
            "status": self.status,
            "runpod_id": self.runpod_id,
            "attempt": self.attempt,
            "progress": self.progress,
            "output": self.output,
            "error": self.error,
        }


def split_member(member: str) -> tuple[str, str]:
    job_id, _, step = member.partition("/")
    return job_id, step


class PanelStore:
    """Panels over the engine's ``PanelRecords`` (which only sees serialized records)."""

    def __init__(self, records: PanelRecords) -> None:
        self.records = records

    async def start(self) -> None:
        await self.records.start()

    async def close(self) -> None:
        return None  # the engine owns the connection

    async def get(self, job_id: str, step: str) -> Panel | None:
        raw = await self.records.get(job_id, step)
        return None if raw is None else Panel.from_json(raw)

    async def panels(self, job_id: str) -> list[Panel]:
        return sorted((Panel.from_json(raw) for raw in await self.records.all(job_id)), key=_panel_order)

    async def swap(self, old: Panel | None, new: Panel) -> bool:
        """Store ``new`` if the stored record is still ``old`` (``None``: none stored)."""
        return await self.records.swap(new.job_id, new.step, None if old is None else old.to_json(),
                                       new.to_json(), active=new.active, next_poll=new.next_poll)

    async def schedule(self, panel: Panel, at: float) -> None:
        """Poll an in-flight panel next at ``at``; does nothing once it has finished."""
        await self.records.schedule(panel.job_id, panel.step, at)

    async def unindex(self, job_id: str, step: str) -> None:
        await self.records.unindex(job_id, step)

    async def due(self, now: float, limit: int) -> list[tuple[str, str]]:
        return await self.records.due(now, limit)

    async def lease(self, key: str, owner: str, ttl: float) -> bool:
        """Take or renew the lease ``key`` for ``owner``; False if someone else holds it."""
        return await self.records.lease(key, owner, ttl)

    async def release(self, key: str, owner: str) -> None:
        await self.records.release(key, owner)


def open_store(engine: Engine) -> PanelStore:
    return PanelStore(engine.panel_records())


def _panel_order(panel: Panel) -> tuple[int, str]:
    digits = "".join(ch for ch in panel.step if ch.isdigit())
    return (int(digits) if digits else 0, panel.step)
