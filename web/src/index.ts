// Public API of @phasecast/client. Styles: import '@phasecast/client/styles.css'.
export { ProgressClient } from './client/ProgressClient';
export type { ProgressClientOptions, TokenSource, JobListener } from './client/ProgressClient';
export { backoffDelay, backoffCeiling, DEFAULT_BACKOFF } from './client/backoff';
export type { BackoffOptions } from './client/backoff';
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
export { ProgressProvider, useProgressClient } from './react/context';
export type { ProgressProviderProps } from './react/context';
export { useGenerationProgress } from './react/useGenerationProgress';
export type { GenerationProgress, UseGenerationProgressOptions } from './react/useGenerationProgress';
export { ProgressTracker } from './react/ProgressTracker';
export type { ProgressTrackerProps } from './react/ProgressTracker';
export { formatEta, formatDuration, phaseRows, stepRows, PHASE_LABELS } from './react/format';
export type { PhaseRow, PhaseStepStatus, StepRow } from './react/format';
