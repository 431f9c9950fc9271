import { useId, useRef, useState, type ReactNode } from 'react';
import type { ProgressClient } from '../client/ProgressClient';
import type { JobState } from '../client/types';
import { displayProgress, formatDuration, formatEta, PHASE_LABELS, phaseRows, stepRows } from '../format';
import { useProgressClient } from './context';
import { useGenerationProgress } from './useGenerationProgress';

export interface ProgressTrackerProps {
  jobId: string;
  /** Heading; default: `metadata.title` of the job, else its id. */
  title?: ReactNode;
  /** Show a cancel button while the job runs (POST /v1/jobs/{id}/cancel with the client's token). */
  cancellable?: boolean;
  /** Called after the server accepted the cancel. */
  onCancelled?: () => void;
  /** Show the per-step (panel) bars. Default true. */
  showSteps?: boolean;
  className?: string;
  /** Use this client instead of the provider's. */
  client?: ProgressClient;
  /**
   * A state the app already has (from the request that created the job, or a job list),
   * shown until the client's first update so the tracker never starts blank.
   */
  initialState?: JobState | null;
}

const STATUS_TEXT: Record<string, string> = {
  done: 'done',
  current: 'in progress',
  upcoming: 'not started',
  skipped: 'skipped',
  stopped: 'stopped here',
};

/**
 * A ready-made view of one job: overall bar, the five phases as steps, per-panel bars,
 * message, time left, and the failed/cancelled endings. Class names start with `pc-`; see
 * styles.css for the custom properties an app can override.
 */
export function ProgressTracker({ jobId, title, cancellable = false, onCancelled, showSteps = true, className, client, initialState }: ProgressTrackerProps) {
  const progress = useGenerationProgress(jobId, { ...(client ? { client } : {}), ...(initialState ? { initialState } : {}) });
  const pageClient = useProgressClient(client);
  const headingId = useId();
  const [cancelState, setCancelState] = useState<{ busy: boolean; error: string | null }>({ busy: false, error: null });
  const { state, phase, done } = progress;
  // Only COMPLETE shows 100: a job still post-processing at 99.6 % is not done.
  const percent = displayProgress(state);
  const phaseLabel = phase ? PHASE_LABELS[phase] : 'Connecting…';
  const message = useCurrentMessage(state);
  const heading = title ?? (typeof state?.metadata?.title === 'string' ? state.metadata.title : jobId);
  const phases = phaseRows(state);
  const steps = showSteps ? stepRows(state) : [];
  const phaseModifier = (phase ?? 'pending').toLowerCase().replace('_', '-');

  async function cancel() {
    setCancelState({ busy: true, error: null });
    try {
      await pageClient.cancel(jobId);
      setCancelState({ busy: false, error: null });
      onCancelled?.();
    } catch (error) {
      setCancelState({ busy: false, error: error instanceof Error ? error.message : String(error) });
    }
  }

  return (
    <section
      className={['pc-tracker', `pc-tracker--${phaseModifier}`, className].filter(Boolean).join(' ')}
      aria-labelledby={headingId}
      data-job-id={jobId}
      data-phase={phase ?? ''}
      data-seq={state?.seq ?? 0}
    >
      <header className="pc-tracker__header">
        <h3 className="pc-tracker__title" id={headingId}>{heading}</h3>
        <span className="pc-tracker__phase">{phaseLabel}</span>
      </header>

      <div
        className="pc-bar"
        role="progressbar"
        aria-label="Overall progress"
        aria-valuemin={0}
        aria-valuemax={100}
        aria-valuenow={percent}
        aria-valuetext={`${percent} percent, ${phaseLabel}`}
      >
        <div className="pc-bar__fill" style={{ width: `${percent}%` }} />
      </div>

      <p className="pc-tracker__summary">
        <span className="pc-tracker__percent">{percent} %</span>
        {!done && state ? <span className="pc-tracker__eta"> · {formatEta(progress.etaSeconds)}</span> : null}
      </p>

      <ol className="pc-phases" aria-label="Phases">
        {phases.map((row) => (
          <li
            key={row.phase}
            className={`pc-phase pc-phase--${row.status}`}
            data-phase={row.phase}
            data-status={row.status}
            aria-current={row.status === 'current' ? 'step' : undefined}
          >
            <span className="pc-phase__marker" aria-hidden="true" />
            <span className="pc-phase__label">{row.label}</span>
            <span className="pc-visually-hidden">: {STATUS_TEXT[row.status]}</span>
            {row.durationMs !== null && row.status !== 'upcoming' ? (
              <span className="pc-phase__duration">{formatDuration(row.durationMs)}</span>
            ) : null}
          </li>
        ))}
      </ol>

      {steps.length > 0 ? (
        <ul className="pc-steps" aria-label={phase === 'GENERATING' ? 'Panels' : 'Steps'}>
          {steps.map((step) => (
            <li key={step.id} className={`pc-step pc-step--${step.status}`} data-step={step.id}>
              <span className="pc-step__label">{step.label}</span>
              <div
                className="pc-step__bar"
                role="progressbar"
                aria-label={step.label}
                aria-valuemin={0}
                aria-valuemax={100}
                aria-valuenow={Math.round(step.progress)}
                aria-valuetext={`${Math.round(step.progress)} percent, ${step.status}`}
              >
                <div className="pc-step__fill" style={{ width: `${step.progress}%` }} />
              </div>
            </li>
          ))}
        </ul>
      ) : null}

      {message && phase !== 'FAILED' && phase !== 'CANCELLED' ? (
        <p className="pc-tracker__message" aria-live="polite">{message}</p>
      ) : null}

      {phase === 'FAILED' ? (
        // One line says why: the error's message, else the job's own message.
        <div className="pc-tracker__error" role="alert">
          <strong>Generation failed.</strong> {failureReason(state)}
          {state?.error?.code ? <code className="pc-tracker__error-code"> ({state.error.code})</code> : null}
        </div>
      ) : null}

      {phase === 'CANCELLED' ? (
        <p className="pc-tracker__cancelled" role="status">{cancelText(state)}</p>
      ) : null}

      {progress.jobError ? (
        <p className="pc-tracker__problem" role="alert">{progress.jobError.message}</p>
      ) : !done && progress.status === 'closed' && progress.error ? (
        // The client gave up (refused token): retrying will not help, so say why.
        <p className="pc-tracker__problem" role="alert">{progress.error.message}</p>
      ) : !done && progress.status === 'reconnecting' && progress.error ? (
        <p className="pc-tracker__problem" role="status">Connection lost, reconnecting…</p>
      ) : null}

      {cancellable && state && !done ? (
        <div className="pc-tracker__actions">
          <button type="button" className="pc-tracker__cancel" onClick={cancel} disabled={cancelState.busy}>
            {cancelState.busy ? 'Cancelling…' : 'Cancel'}
          </button>
          {cancelState.error ? <span className="pc-tracker__cancel-error" role="alert">{cancelState.error}</span> : null}
        </div>
      ) : null}
    </section>
  );
}

/**
 * The job's message, unless it is left over from an earlier phase: a worker that enters a
 * phase without a message of its own would otherwise show the previous phase's text (say
 * "Story analysed" while panels are drawn). Hidden from the phase change until the message
 * changes. (A page opened mid-phase cannot tell and shows what the server has.)
 */
function useCurrentMessage(state: JobState | null): string {
  const seen = useRef<{ jobId: string; phase: string; message: string; stale: boolean } | null>(null);
  if (!state) return '';
  const last = seen.current;
  let stale = false;
  if (last && last.jobId === state.job_id) {
    if (last.phase !== state.phase) stale = state.message === last.message;
    else if (last.message === state.message) stale = last.stale;
  }
  seen.current = { jobId: state.job_id, phase: state.phase, message: state.message, stale };
  return stale ? '' : state.message;
}

const DEFAULT_END_MESSAGES = new Set(['Failed', 'Cancelled', '']);

function failureReason(state: JobState | null): string {
  const reason = state?.error?.message ?? (state && !DEFAULT_END_MESSAGES.has(state.message) ? state.message : '');
  return reason || 'The server gave no reason.';
}

function cancelText(state: JobState | null): string {
  const reason = state && !DEFAULT_END_MESSAGES.has(state.message) ? state.message : '';
  if (!reason) return 'Cancelled: the generation was stopped.';
  return /^cancel/i.test(reason) ? reason : `Cancelled: ${reason}`;
}
