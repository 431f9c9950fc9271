import type { BackoffOptions } from './backoff';
import type { TimerSet } from './timers';
import type { JobState, ProgressError, TransportKind } from './types';

/** The subset of the browser WebSocket the client uses (lets tests pass a fake). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: never) => void): void;
}
export type WebSocketFactory = new (url: string) => WebSocketLike;

/** The subset of the browser EventSource the client uses. */
export interface EventSourceLike {
  close(): void;
  addEventListener(type: string, listener: (event: never) => void): void;
}
export type EventSourceFactory = new (url: string) => EventSourceLike;

export type FetchLike = (input: string, init?: RequestInit) => Promise<Response>;

export interface FailureInfo {
  /** The link had delivered something before failing (a drop, not a failed connect). */
  healthyBefore: boolean;
  /** Retrying cannot help (refused token or scope): stop until the app fixes it. */
  fatal: boolean;
}

/** How a transport reports back to the ProgressClient. */
export interface TransportHandlers {
  state(job: JobState): void;
  /** The server refused one job (not found, forbidden…); the others go on. */
  jobError(error: ProgressError & { jobId: string }): void;
  /** Updates are flowing (first message on a new link, or success after a failure). */
  healthy(): void;
  failure(error: ProgressError, info: FailureInfo): void;
}

/** Shared set-up every transport needs, owned by the ProgressClient. */
export interface TransportContext {
  /** Base URL without a trailing slash, e.g. `https://progress.example.com`. */
  baseUrl: string;
  token(): Promise<string | null>;
  /** Last seq the client has for a job, 0 when it has none. */
  since(jobId: string): number;
  timers: TimerSet;
  random: () => number;
  pingTimeoutMs: number;
  streamBackoff: BackoffOptions;
  pollBackoff: BackoffOptions;
  pollIntervalMs: number;
  WebSocket: WebSocketFactory | undefined;
  EventSource: EventSourceFactory | undefined;
  fetch: FetchLike | undefined;
}

export interface Transport {
  readonly kind: TransportKind;
  add(jobId: string): void;
  /** `tellServer` is false when the server already ended the subscription (terminal state). */
  remove(jobId: string, tellServer: boolean): void;
  /** Skip any wait and try again now (the browser came back online). */
  retryNow(): void;
  close(): void;
}

/** A state must at least name its job and carry a seq before the client trusts it. */
export function isJobState(value: unknown): value is JobState {
  if (typeof value !== 'object' || value === null) return false;
  const job = value as Partial<JobState>;
  return typeof job.job_id === 'string' && typeof job.seq === 'number' && typeof job.phase === 'string';
}

export function describeError(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
