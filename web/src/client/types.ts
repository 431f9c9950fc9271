// Types mirroring docs/protocol.md. Keep them in step with the server's job state.

export const WORKING_PHASES = ['QUEUED', 'ANALYZING', 'GENERATING', 'POST_PROCESSING'] as const;
export const TERMINAL_PHASES = ['COMPLETE', 'FAILED', 'CANCELLED'] as const;
/** The five phases a successful job goes through, in order. */
export const PIPELINE_PHASES = [...WORKING_PHASES, 'COMPLETE'] as const;

export type WorkingPhase = (typeof WORKING_PHASES)[number];
export type TerminalPhase = (typeof TERMINAL_PHASES)[number];
export type Phase = WorkingPhase | TerminalPhase;

export type StepStatus = 'pending' | 'running' | 'done' | 'failed';

export interface StepState {
  progress: number;
  status: StepStatus;
}

export interface PhaseTiming {
  started_at: string;
  finished_at: string | null;
}

export interface JobFailure {
  code: string;
  message: string;
}

/** The whole state of a job, as every read and push carries it. */
export interface JobState {
  job_id: string;
  owner: string;
  kind: string;
  phase: Phase;
  phase_progress: number;
  progress: number;
  message: string;
  eta_seconds: number | null;
  seq: number;
  epoch: string;
  created_at: string;
  updated_at: string;
  phases: Partial<Record<Phase, PhaseTiming>>;
  steps: Record<string, StepState>;
  steps_total: number | null;
  error: JobFailure | null;
  metadata: Record<string, unknown>;
}

export function isTerminalPhase(phase: Phase | null | undefined): phase is TerminalPhase {
  return phase === 'COMPLETE' || phase === 'FAILED' || phase === 'CANCELLED';
}

/** Which way updates currently reach the browser. */
export type TransportKind = 'websocket' | 'sse' | 'polling';

/**
 * - `connecting`: first attempt, nothing has worked yet
 * - `open`: the WebSocket delivers updates
 * - `reconnecting`: the link dropped; waiting for the next attempt
 * - `fallback`: updates come over SSE or polling because WebSockets failed
 * - `closed`: no link (nothing watched, `close()` called, or the server refused the token)
 */
export type ConnectionStatus = 'connecting' | 'open' | 'reconnecting' | 'fallback' | 'closed';

/** Why something failed, phrased so a developer knows what to do about it. */
export interface ProgressError {
  /** Protocol error code (`unauthorized`, `forbidden`, `not_found`, …) or a client-side one (`network`, `dead_link`, `ws_closed`). */
  code: string;
  message: string;
  /** Job the error is about, when it is about one. */
  jobId?: string;
  /** WebSocket close code or HTTP status, when there was one. */
  status?: number;
}

export interface ConnectionInfo {
  status: ConnectionStatus;
  /** Transport in use, `null` while nothing is connected. */
  transport: TransportKind | null;
  /** Current problem: set while the link is failing, cleared once updates flow again. */
  error: ProgressError | null;
  /** The most recent failure, kept after recovery for diagnostics. */
  lastError: ProgressError | null;
}

/** What the client knows about one watched job. */
export interface JobSnapshot {
  state: JobState | null;
  /** Why the job cannot be watched (not found, forbidden…); the client stops asking for it. */
  error: ProgressError | null;
}

/** Server → client WebSocket frames (docs/protocol.md, "WebSocket"). */
export type ServerMessage =
  | { type: 'state'; job: JobState }
  | { type: 'subscribed'; job_id: string }
  | { type: 'authenticated'; job_id: null; expires_at: number | null }
  | { type: 'unsubscribed'; job_id: string }
  | { type: 'ping' }
  | { type: 'pong' }
  | { type: 'error'; job_id: string | null; code: string; message: string };
