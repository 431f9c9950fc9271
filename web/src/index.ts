// Public API of @phasecast/client: the framework-free client. It imports nothing from React,
// so a plain-JS, Vue or Svelte app bundles it without React. The React hook, provider and
// <ProgressTracker> live in the subpath export `@phasecast/client/react` (src/react/index.ts).
export { ProgressClient } from './client/ProgressClient';
export type { ProgressClientOptions, TokenSource, JobListener } from './client/ProgressClient';
export { backoffDelay, backoffCeiling, DEFAULT_BACKOFF } from './client/backoff';
export type { BackoffOptions } from './client/backoff';
export type { LinkState } from './client/link';
export type { WebSocketFactory, WebSocketLike, EventSourceFactory, EventSourceLike, FetchLike } from './client/transport';
export {
  PIPELINE_PHASES,
  WORKING_PHASES,
  TERMINAL_PHASES,
  isTerminalPhase,
} from './client/types';
export type {
  ConnectionInfo,
  ConnectionStatus,
  JobFailure,
  JobSnapshot,
  JobState,
  Phase,
  PhaseTiming,
  ProgressError,
  StepState,
  StepStatus,
  TerminalPhase,
  TransportKind,
  WorkingPhase,
} from './client/types';
// Display helpers (pure functions, no React): useful to any UI that renders a job.
export { formatEta, formatDuration, displayProgress, phaseRows, stepRows, PHASE_LABELS } from './format';
export type { PhaseRow, PhaseStepStatus, StepRow } from './format';
