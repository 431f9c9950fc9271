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
  /** 0 connecting, 1 open, 2 closed (for good: the server answered with something else than a stream). */
  readonly readyState?: number;
  close(): void;
  addEventListener(type: string, listener: (event: never) => void): void;
}
export type EventSourceFactory = new (url: string) => EventSourceLike;

export type FetchLike = (input: string, init?: RequestInit) => Promise<Response>;

/**
 * How a link ended. Transports report facts only; what to do about them (retry, back off,
 * fall back, refresh the token, give up) is decided in one place, the ProgressClient.
 */
export interface LinkEnd {
  /** null for a clean end: the server finished the stream (every job ended). */
  error: ProgressError | null;
  /** The link had delivered something before it ended (a drop, not a failed connect). */
  healthyBefore: boolean;
  /**
   * - `refused`: the server refused the token (WebSocket 4401, HTTP 401);
   * - `forbidden`: the token may not watch (4403);
   * - `expired`: the token ran out on a stream (SSE `event: expired`): reopen with a fresh one;
   * - `failed`: anything else (network, server restart, dead link, blocked WebSocket).
   */
  reason: 'refused' | 'forbidden' | 'expired' | 'failed' | 'finished';
  /**
   * The SSE cursor no longer matches what the client has (the server answered 204, nothing
   * left to send, for jobs the client still watches): the next stream starts without it.
   */
  resync?: boolean;
}

/** What a transport reports to the ProgressClient. Nothing after `ended`. */
export interface TransportEvents {
  /** The server spoke on this link (first message, stream opened, a poll round worked). */
  heard(): void;
  /** `cursor`: the multiplexed SSE stream's event id, to resume it later. */
  state(job: JobState, cursor?: string): void;
  /** The server refused one job (not found, forbidden, unavailable…); the others go on. */
  jobError(error: ProgressError & { jobId: string }): void;
  /** The server accepted a token; `expiresAt` in unix seconds, null when it has no expiry. */
  authenticated(expiresAt: number | null): void;
  /** The link is over. Called once. */
  ended(end: LinkEnd): void;
}

/** What every transport needs, owned by the ProgressClient. */
export interface TransportContext {
  /** Base URL without a trailing slash, e.g. `https://progress.example.com`. */
  baseUrl: string;
  /** Last seq the client has for a job, 0 when it has none. */
  since(jobId: string): number;
  /** The epoch of the state `since` belongs to (null before any), sent with it on resume. */
  epoch(jobId: string): string | null;
  timers: TimerSet;
  pingTimeoutMs: number;
  pollIntervalMs: number;
  WebSocket: WebSocketFactory | undefined;
  EventSource: EventSourceFactory | undefined;
  fetch: FetchLike | undefined;
}

/**
 * One connection attempt. Single-use: created with the token and jobs of the moment,
 * `start()`ed once, and done after it reports `ended` or is `close()`d. It never retries.
 */
export interface Transport {
  readonly kind: TransportKind;
  start(): void;
  /** Watch one more job on this link. False when this link cannot (the client opens a new one). */
  add(jobId: string): boolean;
  /**
   * Stop watching a job. `tellServer` is false when the server already ended the
   * subscription (terminal state). False when this link cannot drop it in place.
   */
  remove(jobId: string, tellServer: boolean): boolean;
  /** Send a fresh token on the open link. False when this link cannot (it is reopened instead). */
  reauth(token: string): boolean;
  /** The network came back: check the link is still alive (ends it if not). */
  check(): void;
  /** Stop without reporting anything. */
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
