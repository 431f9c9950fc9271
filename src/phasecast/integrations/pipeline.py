"""Comic panels drawn on RunPod, reflected in a Phasecast job.

A comic job's GENERATING phase has one step per panel; each panel is one RunPod job at a
time. Two sources tell us how a RunPod job is doing, and both go through ``apply_status``:

* the **poller**, because progress (``progress_update`` outputs) only shows in ``/status``,
  and because a completion webhook may never come;
* the **webhook**, which RunPod sends when a job ends (maybe twice, maybe late).

Whichever sees an ending first records it (compare-and-set on the panel record) and only that
one acts on it; tracker updates are themselves monotonic and idempotent, so a duplicate or
late report changes nothing, and a poll that brings nothing new writes nothing (no seq, no
push, no history entry). The job's message counts panels ("Drawing panels: 3 of 6 done"); it
does not follow whichever panel was polled last. When every panel is done the job enters
POST_PROCESSING.

Submitting is crash-safe: the intent (an idempotency key, also sent in the input and in the
webhook URL) is stored before ``/run``. If the server dies before storing the RunPod id, the
job RunPod started is adopted when its webhook arrives (or cancelled, if the panel no longer
wants it); the panel is submitted again only once RunPod has surely dropped the first job
(the ``ttl`` of the execution policy sent with every ``/run``). A ``/status`` 404 fails a
panel only once confirmed several times over a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from phasecast.backoff import backoff_delay, jittered
from phasecast.config import Settings
from phasecast.errors import ConfigurationError, InvalidUpdate, JobNotFound, JobTerminal
from phasecast.integrations.runpod import (
    CANCELLED,
    COMPLETED,
    IN_PROGRESS,
    IN_QUEUE,
    RunPodClient,
    RunPodError,
    RunPodNotFound,
    RunPodRateLimited,
    RunPodStatus,
    decode_error,
    derive_webhook_secret,
    output_progress,
    webhook_url,
)
from phasecast.integrations.settings import RunPodSettings
from phasecast.integrations.store import FailurePolicy, Panel, PanelStore
from phasecast.model import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_MESSAGE_CHARS,
    STEP_ID_PATTERN,
    JobState,
    Phase,
    ProgressUpdate,
    storable_text,
)
from phasecast.tracker import ProgressTracker

log = logging.getLogger("phasecast.integrations.runpod")

CAS_ATTEMPTS = 20
MAX_PANELS = 200
POLL_BATCH = 64
POLL_CONCURRENCY = 16
NOT_FOUND_CONFIRMATIONS = 3  # /status 404s in a row, over ``not_found_grace``, before a panel fails
IDEMPOTENCY_FIELD = "phasecast_idempotency_key"  # added to every input sent to /run


@dataclass(slots=True, frozen=True)
class RunPodConfig:
    public_url: str | None
    webhook_secret: str
    poll_interval: float = 2.0
    queue_poll_interval: float = 5.0
    max_poll_interval: float = 30.0
    lease_seconds: float = 15.0
    request_timeout: float = 10.0
    max_retries: int = 2
    not_found_grace: float = 6.0
    job_ttl: float = 3600.0

    @classmethod
    def from_settings(cls, core: Settings, runpod: RunPodSettings) -> RunPodConfig:
        secret = runpod.webhook_secret or derive_webhook_secret(core.jwt_secret)
        if not secret:
            raise ConfigurationError(
                "the RunPod integration needs PHASECAST_WEBHOOK_SECRET (or a JWT secret to derive "
                "it from) to sign webhook URLs"
            )
        return cls(
            public_url=runpod.public_url(core),
            webhook_secret=secret,
            poll_interval=runpod.poll_interval,
            queue_poll_interval=runpod.queue_poll_interval,
            max_poll_interval=runpod.max_poll_interval,
            lease_seconds=runpod.lease_seconds,
            request_timeout=runpod.request_timeout,
            max_retries=runpod.max_retries,
            not_found_grace=runpod.not_found_grace,
            job_ttl=runpod.job_ttl,
        )


@dataclass(slots=True, frozen=True)
class PanelSpec:
    step: str
    input: Any


class RunPodPanels:
    """Submits panels, applies what RunPod says about them, and polls the ones in flight."""

    def __init__(
        self,
        tracker: ProgressTracker,
        client: RunPodClient,
        store: PanelStore,
        config: RunPodConfig,
        *,
        instance_id: str | None = None,
    ) -> None:
        self.tracker = tracker
        self.client = client
        self.store = store
        self.config = config
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._polling: set[str] = set()
        self._errors: dict[str, int] = {}  # consecutive poll failures per panel (backoff)
        self._missing: dict[str, tuple[int, float]] = {}  # panel → (404s in a row, time of the first)
        self._wake = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self._gate = asyncio.Semaphore(POLL_CONCURRENCY)
        self.polls = 0

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.start()
        self.tracker.observe(self._on_state)
        self._poller = asyncio.create_task(self._poll_forever(), name="phasecast-runpod-poller")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()
        await self.store.close()

    def spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("RunPod background work failed", exc_info=task.exception())

    # --- submitting ----------------------------------------------------------------------

    async def submit(
        self, job_id: str, panels: Sequence[PanelSpec], policy: FailurePolicy
    ) -> list[Panel]:
        """Enter GENERATING with one step per panel and start a RunPod job for each."""
        if not 1 <= len(panels) <= MAX_PANELS:
            raise InvalidUpdate("panels", f"must hold 1 to {MAX_PANELS} panels")
        steps = [p.step for p in panels]
        if len(set(steps)) != len(steps):
            raise InvalidUpdate("panels", "step ids must be unique")
        for step in steps:
            if not STEP_ID_PATTERN.fullmatch(step) or "/" in step:
                raise InvalidUpdate(
                    "panels.step", f"{step!r} must be 1-64 letters, digits, '.', '_', ':' or '-'"
                )
        state = await self.tracker.get(job_id)
        if state.terminal:
            raise JobTerminal(job_id, state.phase)
        taken = {p.step for p in await self.store.panels(job_id)} & set(steps)
        if taken:
            raise InvalidUpdate("panels", f"already submitted for job {job_id!r}: {sorted(taken)}")
        await self.tracker.update(job_id, _entering(len(panels)))
        records: list[Panel] = []
        for spec in panels:
            # Until /run answers, the panel is "submitting" and due for the poller only after a
            # generous delay: the poller resubmits it only if this process died meanwhile.
            panel = Panel(job_id=job_id, step=spec.step, input=spec.input, policy=policy,
                          next_poll=time.time() + 3 * self.config.request_timeout,
                          updated_at=time.time())
            await self.store.swap(None, panel)
            await self.tracker.step(job_id, Phase.GENERATING, spec.step, 0.0, status="pending",
                                    steps_total=len(panels))
            records.append(panel)
        for panel in records:
            self.spawn(self._submit_panel(panel))
        return records

    async def _submit_panel(self, panel: Panel) -> None:
        if not await self.store.lease(panel.member, self.instance_id, self.config.lease_seconds):
            # Another instance polls this panel: make it due now so that one submits it.
            await self.store.schedule(panel, time.time())
            return
        try:
            await self._run_on_runpod(panel)
        finally:
            self._wake.set()

    async def _run_on_runpod(self, panel: Panel) -> None:
        """Start (or, with the ``retry`` policy, re-run) the RunPod job of a submitting panel.
        The intent is stored first, so a crash during ``/run`` leaves a trace to adopt from."""
        if panel.runpod_id is not None and panel.policy.retry_with == "retry":
            await self._retry_on_runpod(panel)
            return
        if await self._job_over(panel.job_id):
            await self.stop_job_panels(panel.job_id)
            return  # the job ended before its panel went out: nothing to start
        key = uuid.uuid4().hex
        intent = panel.evolve(submission=key, submitted_at=time.time(), runpod_id=None,
                              next_poll=time.time() + 3 * self.config.request_timeout)
        if not await self.store.swap(panel, intent):
            return  # someone else moved the panel on (cancelled, adopted, submitted)
        url = None
        if self.config.public_url:
            url = webhook_url(self.config.public_url, self.config.webhook_secret,
                              panel.job_id, panel.step, key)
        job_input = {**panel.input, IDEMPOTENCY_FIELD: key} if isinstance(panel.input, dict) else panel.input
        try:
            started = await self.client.run(job_input, url, ttl_seconds=self.config.job_ttl)
        except RunPodError as exc:
            await self._submission_failed(intent, exc)
            return
        self._errors.pop(panel.member, None)
        await self._store_started(intent, started)

    async def _retry_on_runpod(self, panel: Panel) -> None:
        # /retry keeps the RunPod id: a crash in between leaves a panel that polls that id.
        assert panel.runpod_id is not None
        try:
            started = await self.client.retry(panel.runpod_id)
        except RunPodError as exc:
            await self._submission_failed(panel, exc)
            return
        self._errors.pop(panel.member, None)
        await self._store_started(panel, started)

    async def _submission_failed(self, intent: Panel, exc: RunPodError) -> None:
        retry_after = exc.retry_after if isinstance(exc, RunPodRateLimited) else None
        if not isinstance(exc, RunPodRateLimited):
            log.warning("RunPod submission of %s failed: %s", intent.member, exc.message)
        at = time.time() + self._backoff(intent, retry_after)
        if exc.maybe_applied and intent.submitted_at is not None:
            # RunPod may have started the job without our hearing of it: wait for it to show
            # up (its webhook names this submission), exactly as after a crash.
            await self.store.schedule(intent, time.time() + self._adoption_check_interval())
            return
        # RunPod answered: it started nothing. Clear the intent; the poller submits again.
        cleared = intent.evolve(submission=None, submitted_at=None, next_poll=at)
        if not await self.store.swap(intent, cleared):
            return
        await self.store.schedule(cleared, at)

    async def _store_started(self, intent: Panel, started: RunPodStatus) -> None:
        if await self._job_over(intent.job_id):
            # Ended while /run was on its way: the panel is stopped first, so the swap below
            # fails and the RunPod job is cancelled rather than recorded.
            await self.stop_job_panels(intent.job_id)
        new = intent.evolve(runpod_id=started.id, status=IN_QUEUE, submitted_at=None,
                            next_poll=time.time() + self._interval(IN_QUEUE))
        if await self.store.swap(intent, new):
            log.info("panel %s runs on RunPod as %s (attempt %d)", intent.member, started.id, intent.attempt)
            return
        current = await self.store.get(intent.job_id, intent.step)
        if current is not None and current.runpod_id == started.id:
            return  # its webhook came first and adopted it
        if current is None or not current.active or current.runpod_id is not None:
            # The panel was cancelled (or otherwise moved on) while /run was on its way.
            with contextlib.suppress(RunPodError):
                await self.client.cancel(started.id)
            log.info("cancelled RunPod job %s: panel %s no longer wants it", started.id, intent.member)

    async def _job_over(self, job_id: str) -> bool:
        """Whether the Phasecast job has ended or is gone. Asked before a RunPod job is taken
        into a panel: the panel alone may still look wanted, because an ended job's panels
        are stopped after the fact (by the instance that stored the end, in the background)."""
        try:
            return (await self.tracker.get(job_id)).terminal
        except JobNotFound:
            return True

    def _adoption_check_interval(self) -> float:
        return min(self.config.max_poll_interval, max(self.config.queue_poll_interval, 1.0))

    async def _awaiting_adoption(self, panel: Panel) -> bool:
        """A submission whose /run answer was lost (a crash, a timeout): RunPod may be running
        it. Its webhook will name it and adopt it; until RunPod has surely dropped it (the ttl
        sent with /run) nothing is submitted again. Returns True while still waiting."""
        assert panel.submitted_at is not None
        given_up_at = panel.submitted_at + self.config.job_ttl + self.config.request_timeout
        if time.time() < given_up_at:
            await self.store.schedule(panel, min(given_up_at, time.time() + self._adoption_check_interval()))
            return True
        log.warning("panel %s: submission %s never showed up within RunPod's ttl; submitting again",
                    panel.member, panel.submission, extra={"job_id": panel.job_id})
        return False

    # --- what RunPod says ----------------------------------------------------------------

    async def apply_webhook(
        self, job_id: str, step: str, status: RunPodStatus, submission: str | None = None
    ) -> str:
        """A webhook is a hint, not the truth: RunPod does not sign it and retries it.
        ``submission`` (from the URL) lets a job whose ``/run`` answer was lost be adopted."""
        if submission is not None:
            adopted = await self._adopt(job_id, step, status, submission)
            if adopted is not None:
                return adopted
        if status.terminal and status.status != COMPLETED:
            panel = await self.store.get(job_id, step)
            if panel is not None and panel.policy.retry_with == "retry" and panel.attempt > 1:
                # /retry keeps the RunPod id, so a late webhook of the failed run looks
                # current; believe /status instead.
                try:
                    status = await self.client.status(status.id)
                except RunPodError as exc:
                    log.info("could not confirm a failure webhook (%s); the poller will", exc.message)
                    return "deferred_to_poller"
        return await self.apply_status(job_id, step, status, "webhook")

    async def _adopt(self, job_id: str, step: str, status: RunPodStatus, submission: str) -> str | None:
        for _ in range(CAS_ATTEMPTS):
            panel = await self.store.get(job_id, step)
            if panel is None or panel.runpod_id == status.id or panel.submission != submission:
                return None
            if panel.active and panel.submitted_at is None:
                return None  # no submission in doubt: the ordinary rules apply
            if not panel.active:
                # The panel was cancelled meanwhile: the job it no longer wants is stopped.
                if not status.terminal:
                    with contextlib.suppress(RunPodError):
                        await self.client.cancel(status.id)
                return "already_finished"
            if panel.runpod_id is not None:
                return None
            if await self._job_over(job_id):
                # Cancelled (or failed) while the submission was in doubt: its panels may not be
                # stopped yet (that runs after the cancel is answered, maybe on another
                # instance, or not at all if a worker ended the job). Stop them, then look again.
                await self.stop_job_panels(job_id)
                continue
            adopted = panel.evolve(runpod_id=status.id, status=IN_QUEUE, submitted_at=None,
                                   next_poll=time.time() + self._interval(IN_QUEUE))
            if await self.store.swap(panel, adopted):
                log.info("panel %s adopted RunPod job %s (submission %s, answer lost)", panel.member,
                         status.id, submission, extra={"job_id": job_id})
                return None  # now apply what the webhook says
        return "gave_up"

    async def apply_status(self, job_id: str, step: str, status: RunPodStatus, source: str) -> str:
        """Reflect one status of a panel's RunPod job; returns what was done (for logs/tests)."""
        for _ in range(CAS_ATTEMPTS):
            panel = await self.store.get(job_id, step)
            if panel is None:
                return "unknown_panel"
            if panel.runpod_id != status.id:
                # An earlier attempt's RunPod job (its late webhook), or one we never started.
                return "stale_runpod_job"
            if not panel.active:
                return "already_finished"
            if panel.status == "submitting":
                # Being (re)submitted: this status is of the run before (a poll answered before
                # the failure was recorded); the next run's statuses will follow.
                return "not_started"
            if status.status in (IN_QUEUE, IN_PROGRESS):
                return await self._apply_running(panel, status)
            if status.status == COMPLETED and status.output is not None:
                result = await self._apply_completed(panel, status)
            else:
                result = await self._apply_failure(panel, status, source)
            if result != "lost_race":
                return result
        return "gave_up"

    async def _apply_running(self, panel: Panel, status: RunPodStatus) -> str:
        percent = output_progress(status.output) if status.status == IN_PROGRESS else None
        progress = max(panel.progress, percent or 0.0)
        if status.status == panel.status and progress == panel.progress:
            return "unchanged"  # nothing new: no write, no seq, no push, no history entry
        new = panel.evolve(status=status.status, progress=progress)
        if not await self.store.swap(panel, new):
            return "lost_race"  # someone recorded something newer; the next poll sees it
        if status.status == IN_PROGRESS:
            # No message: the job's message counts panels, it does not name the last one polled.
            await self._tracked(self.tracker.step(
                panel.job_id, Phase.GENERATING, panel.step, progress, status="running",
            ), panel)
        return "progress"

    async def _apply_completed(self, panel: Panel, status: RunPodStatus) -> str:
        # Tracker first: marking a step done is idempotent, so if we die before recording the
        # panel, the next poll repeats this harmlessly.
        others = [p for p in await self.store.panels(panel.job_id) if p.step != panel.step]
        done = 1 + sum(1 for p in others if p.status == "done")
        outcome = await self._tracked(self.tracker.step(
            panel.job_id, Phase.GENERATING, panel.step, 100.0, status="done",
            message=panels_message(done, len(others) + 1),
        ), panel)
        new = panel.evolve(status="done", progress=100.0, output=status.output, error=None)
        if not await self.store.swap(panel, new):
            return "lost_race"
        await self.store.release(panel.member, self.instance_id)
        if outcome is not None:
            await self._maybe_post_process(outcome)
        return "done"

    async def _maybe_post_process(self, state: JobState) -> None:
        if state.phase is not Phase.GENERATING or not state.steps:
            return
        total = max(len(state.steps), state.steps_total or 0)
        done = sum(1 for s in state.steps.values() if s.get("status") == "done")
        if done == total:
            await self._tracked(self.tracker.report(
                state.job_id, Phase.POST_PROCESSING, 0.0, f"All {total} panels drawn"
            ), None)
        elif state.message != panels_message(done, total) and state.message.startswith("Drawing panels"):
            # Two panels finished at once and each counted the other as still drawing.
            await self._tracked(self.tracker.update(
                state.job_id, ProgressUpdate(Phase.GENERATING, message=panels_message(done, total))
            ), None)

    async def _apply_failure(self, panel: Panel, status: RunPodStatus, source: str) -> str:
        if status.status == COMPLETED:
            code, message = "runpod_no_output", "RunPod reported COMPLETED without any output"
        elif status.status == "TIMED_OUT":
            code, message = "runpod_timed_out", "the RunPod job timed out"
            if status.error:
                message += ": " + decode_error(status.error)[1]
        elif status.status == CANCELLED and not status.error:
            code, message = "runpod_cancelled", "the RunPod job was cancelled outside Phasecast"
        else:
            code, message = decode_error(status.error)
        error = {"code": code, "message": message, "runpod_status": status.status}
        policy = panel.policy
        if policy.on_failure == "retry" and panel.attempt <= policy.max_retries:
            # Keep the RunPod id for /retry (same job again); a new /run gets a new one.
            keep_id = panel.runpod_id if policy.retry_with == "retry" else None
            new = panel.evolve(status="submitting", attempt=panel.attempt + 1, runpod_id=keep_id,
                               error=error, submission=None, submitted_at=None,
                               next_poll=time.time() + 3 * self.config.request_timeout)
            if not await self.store.swap(panel, new):
                return "lost_race"
            log.warning("panel %s failed on RunPod (%s: %s); retrying, attempt %d of %d",
                        panel.member, code, message, new.attempt, policy.max_retries + 1,
                        extra={"job_id": panel.job_id, "source": source})
            await self._tracked(self.tracker.step(
                panel.job_id, Phase.GENERATING, panel.step, status="failed",
                message=_fitted(f"{panel.step} failed (", message,
                                f"); retrying, attempt {new.attempt} of {policy.max_retries + 1}",
                                MAX_MESSAGE_CHARS),
            ), panel)
            await self._submit_panel(new)
            return "retried"
        new = panel.evolve(status="failed", error=error)
        if not await self.store.swap(panel, new):
            return "lost_race"
        await self.store.release(panel.member, self.instance_id)
        log.warning("panel %s failed on RunPod (%s: %s); failing the job", panel.member, code, message,
                    extra={"job_id": panel.job_id, "source": source})
        await self._tracked(self.tracker.step(
            panel.job_id, Phase.GENERATING, panel.step, status="failed",
            message=_fitted(f"{panel.step} failed: ", message, "", MAX_MESSAGE_CHARS),
        ), panel)
        with contextlib.suppress(JobTerminal, JobNotFound):
            await self.tracker.fail(panel.job_id, code,
                                    _fitted(f"{panel.step}: ", message, "", MAX_ERROR_MESSAGE_CHARS))
        return "failed"

    async def _tracked(self, work: Awaitable[Any], panel: Panel | None) -> JobState | None:
        """Run a tracker call; a job that ended or vanished meanwhile stops its panels."""
        try:
            outcome = await work
        except (JobTerminal, JobNotFound):
            if panel is not None:
                await self.stop_job_panels(panel.job_id)
            return None
        state: JobState = outcome.state
        return state

    # --- cancelling ----------------------------------------------------------------------

    def _on_state(self, state: JobState) -> None:
        if state.phase in (Phase.CANCELLED, Phase.FAILED):
            self.spawn(self.stop_job_panels(state.job_id))

    async def stop_job_panels(self, job_id: str) -> int:
        """Cancel every in-flight RunPod job of a Phasecast job that ended; returns how many."""
        cancelled = 0
        for panel in await self.store.panels(job_id):
            current: Panel | None = panel
            for _ in range(CAS_ATTEMPTS):
                if current is None or not current.active:
                    break
                if await self.store.swap(current, current.evolve(status="cancelled")):
                    if current.runpod_id is not None:
                        try:
                            await self.client.cancel(current.runpod_id)
                            cancelled += 1
                        except RunPodNotFound:
                            pass
                        except RunPodError as exc:
                            log.warning("could not cancel RunPod job %s: %s", current.runpod_id, exc.message)
                    await self.store.release(current.member, self.instance_id)
                    break
                current = await self.store.get(job_id, panel.step)
        if cancelled:
            log.info("cancelled %d RunPod jobs of %s", cancelled, job_id, extra={"job_id": job_id})
        return cancelled

    # --- polling -------------------------------------------------------------------------

    def _interval(self, status: str) -> float:
        base = self.config.poll_interval if status == IN_PROGRESS else self.config.queue_poll_interval
        return jittered(base)  # instances and panels drift apart

    def _backoff(self, panel: Panel, retry_after: float | None = None) -> float:
        errors = self._errors.get(panel.member, 0) + 1
        self._errors[panel.member] = errors
        delay = backoff_delay(errors + 1, base=self.config.poll_interval, cap=self.config.max_poll_interval)
        return max(delay, retry_after or 0.0)

    def _not_found_confirmed(self, panel: Panel) -> bool:
        """A 404 may be a passing fault (a RunPod region catching up): believe it only once it
        has been seen ``NOT_FOUND_CONFIRMATIONS`` times in a row over ``not_found_grace``."""
        count, first = self._missing.get(panel.member, (0, time.monotonic()))
        count += 1
        self._missing[panel.member] = (count, first)
        waited = time.monotonic() - first
        confirmed = count >= NOT_FOUND_CONFIRMATIONS and waited >= self.config.not_found_grace
        if confirmed:
            del self._missing[panel.member]
        else:
            log.info("RunPod has no job %s (404 %d of %d); asking again", panel.runpod_id, count,
                     NOT_FOUND_CONFIRMATIONS, extra={"job_id": panel.job_id})
        return confirmed

    async def _poll_forever(self) -> None:
        tick = max(0.02, min(1.0, self.config.poll_interval / 2))
        while True:
            try:
                await self.poll_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The store (Redis) may be away for a moment; keep trying.
                log.warning("RunPod poller could not read in-flight panels: %s", exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)

    async def poll_due(self) -> None:
        wait = self.client.blocked_until - time.monotonic()
        if wait > 0:
            return  # rate limited: nobody calls RunPod until the advertised time
        for job_id, step in await self.store.due(time.time(), POLL_BATCH):
            member = f"{job_id}/{step}"
            if member in self._polling:
                continue
            if not await self.store.lease(member, self.instance_id, self.config.lease_seconds):
                continue  # another instance polls this one
            self._polling.add(member)
            self.spawn(self._poll_one(job_id, step))

    async def _poll_one(self, job_id: str, step: str) -> None:
        member = f"{job_id}/{step}"
        try:
            async with self._gate:
                await self._poll_panel(job_id, step)
        finally:
            self._polling.discard(member)

    async def _poll_panel(self, job_id: str, step: str) -> None:
        panel = await self.store.get(job_id, step)
        if panel is None or not panel.active:
            await self.store.unindex(job_id, step)  # left by a crash between record and index
            return
        try:
            state = await self.tracker.get(job_id)
        except JobNotFound:
            state = None
        if state is None or state.terminal:
            await self.stop_job_panels(job_id)
            return
        if panel.runpod_id is None or panel.status == "submitting":
            if panel.submitted_at is not None and await self._awaiting_adoption(panel):
                return
            # Its submitter died before /run, or the submission was refused: submit it now.
            await self._run_on_runpod(panel)
            return
        self.polls += 1
        try:
            status = await self.client.status(panel.runpod_id)
        except RunPodRateLimited as exc:
            await self.store.schedule(panel, time.time() + self._backoff(panel, exc.retry_after))
            return
        except RunPodNotFound:
            if not self._not_found_confirmed(panel):
                again = self.config.not_found_grace / NOT_FOUND_CONFIRMATIONS
                await self.store.schedule(panel, time.time() + again)
                return
            status = RunPodStatus(
                id=panel.runpod_id, status="FAILED",
                error=f"RunPod no longer knows job {panel.runpod_id} (expired or deleted)",
            )
        except RunPodError as exc:
            log.warning("polling RunPod job %s failed: %s", panel.runpod_id, exc.message)
            await self.store.schedule(panel, time.time() + self._backoff(panel))
            return
        self._errors.pop(panel.member, None)
        self._missing.pop(panel.member, None)
        result = await self.apply_status(job_id, step, status, "poll")
        if not status.terminal:
            await self.store.schedule(panel, time.time() + self._interval(status.status))
        log.debug("polled %s: %s -> %s", panel.member, status.status, result)


def _fitted(before: str, text: str, after: str, limit: int) -> str:
    """``before + text + after`` within ``limit`` characters, cutting ``text`` (RunPod's,
    of any length) rather than failing the write that carries it."""
    return before + storable_text(text, max(1, limit - len(before) - len(after))) + after


def panels_message(done: int, total: int) -> str:
    return f"Drawing panels: {done} of {total} done"


def _entering(steps_total: int) -> ProgressUpdate:
    return ProgressUpdate(Phase.GENERATING, steps_total=steps_total, message=panels_message(0, steps_total))
