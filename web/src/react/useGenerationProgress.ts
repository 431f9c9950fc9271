import { useCallback, useMemo, useSyncExternalStore } from 'react';
import type { ProgressClient } from '../client/ProgressClient';
import {
  isTerminalPhase,
  type ConnectionStatus,
  type JobSnapshot,
  type JobState,
  type Phase,
  type ProgressError,
  type TransportKind,
} from '../client/types';
import { useProgressClient } from './context';

export interface UseGenerationProgressOptions {
  /** Use this client instead of the provider's. */
  client?: ProgressClient;
  /** Set false to stop watching without unmounting. Default true. */
  enabled?: boolean;
  /**
   * A state the app already has for this job (e.g. returned when it created the job), shown
   * until the client delivers one. Ignored once the client has a state, and when it is for
   * another job.
   */
  initialState?: JobState | null;
}

export interface GenerationProgress {
  /** Newest state, `null` until the first one arrives. */
  state: JobState | null;
  phase: Phase | null;
  /** Overall 0–100. */
  progress: number;
  /** 0–100 within the current phase. */
  phaseProgress: number;
  etaSeconds: number | null;
  message: string;
  /** The job reached COMPLETE, FAILED or CANCELLED. */
  done: boolean;
  status: ConnectionStatus;
  transport: TransportKind | null;
  /** Why the job cannot be watched, else the connection's current problem, else null. */
  error: ProgressError | null;
  /** Only the job's own problem (not found, forbidden…), without connection trouble. */
  jobError: ProgressError | null;
}

const NO_JOB: JobSnapshot = Object.freeze({ state: null, error: null });
const noop = () => undefined;

/**
 * Live progress of one job. Subscribes through the page's shared ProgressClient and stops
 * on unmount or when `jobId` changes; pass `null` to watch nothing.
 */
export function useGenerationProgress(
  jobId: string | null | undefined,
  options: UseGenerationProgressOptions = {},
): GenerationProgress {
  const client = useProgressClient(options.client);
  const id = (options.enabled ?? true) && jobId ? jobId : null;

  // A new function per (client, id) makes React drop the old subscription and make a new one.
  const subscribeJob = useCallback((onChange: () => void) => (id ? client.subscribe(id, onChange) : noop), [client, id]);
  const getJob = useCallback(() => (id ? client.getJob(id) : NO_JOB), [client, id]);
  const snapshot = useSyncExternalStore(subscribeJob, getJob, getJob);

  const subscribeConnection = useCallback((onChange: () => void) => client.onConnectionChange(onChange), [client]);
  const getConnection = useCallback(() => client.getConnection(), [client]);
  const connection = useSyncExternalStore(subscribeConnection, getConnection, getConnection);

  const initial = options.initialState && options.initialState.job_id === id ? options.initialState : null;
  return useMemo(() => {
    // Whichever is newer: the client's state usually, the app's until the first update.
    const known = snapshot.state;
    const state = known && (!initial || known.seq >= initial.seq) ? known : snapshot.error ? known : initial;
    return {
      state,
      phase: state?.phase ?? null,
      progress: state?.progress ?? 0,
      phaseProgress: state?.phase_progress ?? 0,
      etaSeconds: state?.eta_seconds ?? null,
      message: state?.message ?? '',
      done: isTerminalPhase(state?.phase),
      status: connection.status,
      transport: connection.transport,
      error: snapshot.error ?? connection.error,
      jobError: snapshot.error,
    };
  }, [snapshot, connection, initial]);
}
