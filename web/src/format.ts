import { PIPELINE_PHASES, type JobState, type Phase, type StepState } from './client/types';

export const PHASE_LABELS: Record<Phase, string> = {
  QUEUED: 'Queued',
  ANALYZING: 'Analyzing',
  GENERATING: 'Generating',
  POST_PROCESSING: 'Post-processing',
  COMPLETE: 'Complete',
  FAILED: 'Failed',
  CANCELLED: 'Cancelled',
};

/** "about 20 s left", "about 3 min left"; rounded so the text does not flicker every update. */
export function formatEta(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return 'estimating time left…';
  if (seconds <= 0) return 'almost done';
  if (seconds < 10) return 'a few seconds left';
  if (seconds < 60) return `about ${Math.round(seconds / 5) * 5} s left`;
  if (seconds < 3600) return `about ${Math.round(seconds / 60)} min left`;
  const hours = Math.floor(seconds / 3600);
  const minutes = Math.round((seconds % 3600) / 60);
  return `about ${hours} h ${minutes} min left`;
}

export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms) || ms < 0) return '';
  const seconds = ms / 1000;
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${Math.round(seconds % 60)} s`;
}

export type PhaseStepStatus = 'done' | 'current' | 'upcoming' | 'skipped' | 'stopped';

export interface PhaseRow {
  phase: Phase;
  label: string;
  status: PhaseStepStatus;
  /** How long the phase took (done) or has taken so far (current), in ms. */
  durationMs: number | null;
}

/**
 * The five pipeline phases with their status. A FAILED or CANCELLED job marks the phase
 * it was in as `stopped`; phases the job jumped over are `skipped`.
 */
export function phaseRows(state: JobState | null, now: number = Date.now()): PhaseRow[] {
  const timeline = state?.phases ?? {};
  const ended = state?.phase === 'FAILED' || state?.phase === 'CANCELLED';
  // Where the job is (or was when it stopped) in the pipeline.
  let currentIndex = state ? PIPELINE_PHASES.indexOf(state.phase as (typeof PIPELINE_PHASES)[number]) : 0;
  if (ended) {
    currentIndex = -1;
    PIPELINE_PHASES.forEach((phase, index) => {
      if (timeline[phase]) currentIndex = index;
    });
  }
  return PIPELINE_PHASES.map((phase, index) => {
    const timing = timeline[phase];
    let status: PhaseStepStatus;
    if (index < currentIndex) status = timing ? 'done' : 'skipped';
    else if (index === currentIndex) status = ended ? 'stopped' : phase === 'COMPLETE' ? 'done' : 'current';
    else status = 'upcoming';
    let durationMs: number | null = null;
    if (timing && phase !== 'COMPLETE') {
      const start = Date.parse(timing.started_at);
      const end = timing.finished_at ? Date.parse(timing.finished_at) : ended ? Date.parse(state?.updated_at ?? '') : now;
      durationMs = Number.isFinite(start) && Number.isFinite(end) ? Math.max(0, end - start) : null;
    }
    return { phase, label: PHASE_LABELS[phase], status, durationMs };
  });
}

export interface StepRow {
  id: string;
  label: string;
  progress: number;
  status: StepState['status'];
}

/** Steps in natural order ("panel-2" before "panel-10"), padded with pending ones up to steps_total. */
export function stepRows(state: JobState | null): StepRow[] {
  if (!state) return [];
  const collator = new Intl.Collator(undefined, { numeric: true });
  const ids = Object.keys(state.steps ?? {}).sort(collator.compare);
  const rows: StepRow[] = ids.map((id) => {
    const step = state.steps[id]!;
    return { id, label: stepLabel(id), progress: clamp(step.progress), status: step.status };
  });
  const total = state.steps_total ?? 0;
  if (rows.length >= total) return rows;
  // Steps not reported yet. When the worker names steps "panel-N", show the missing panels
  // by number; otherwise add generic placeholders with ids that cannot collide.
  const panelNumbers = ids.map((id) => /^panel-(\d+)$/.exec(id)?.[1]);
  if (panelNumbers.every((n) => n !== undefined)) {
    const known = new Set(panelNumbers.map(Number));
    for (let n = 1; rows.length < total && n <= total * 2; n += 1) {
      if (!known.has(n)) rows.push({ id: `panel-${n}`, label: `Panel ${n}`, progress: 0, status: 'pending' });
    }
    return rows.sort((a, b) => collator.compare(a.id, b.id));
  }
  for (let n = rows.length + 1; rows.length < total; n += 1) {
    rows.push({ id: `pending-step-${n}`, label: `Step ${n}`, progress: 0, status: 'pending' });
  }
  return rows;
}

function stepLabel(id: string): string {
  const match = /^panel[-_ ]?(\d+)$/i.exec(id);
  return match ? `Panel ${match[1]}` : id;
}

export function clamp(value: number | null | undefined): number {
  if (typeof value !== 'number' || !Number.isFinite(value)) return 0;
  return Math.min(100, Math.max(0, value));
}

/**
 * The overall percentage to show, as a whole number. Only a COMPLETE job shows 100: a job
 * still post-processing at 99.6 % would round to 100 and look finished while it is not, so
 * every other phase stops at 99.
 */
export function displayProgress(state: Pick<JobState, 'phase' | 'progress'> | null | undefined): number {
  if (!state) return 0;
  if (state.phase === 'COMPLETE') return 100;
  return Math.min(99, Math.round(clamp(state.progress)));
}
