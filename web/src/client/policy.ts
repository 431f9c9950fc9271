import { backoffDelay, type BackoffOptions } from './backoff';
import type { LinkEnd } from './transport';
import type { TransportKind } from './types';

/**
 * All of the client's retry policy, in one pure function: given how a link ended and the
 * counters so far, what to do next. Transports never retry; the ProgressClient asks this.
 */
export interface RetryCounters {
  /** Index into the preferred transports: 0 is the first choice (the WebSocket). */
  readonly mode: number;
  /** Connect failures in a row on this transport (a drop of a working link does not count). */
  readonly failures: number;
  /** Backoff attempt: how many waits in a row so far. */
  readonly attempt: number;
  /** The token was asked for again after a refusal, and nothing has worked since. */
  readonly refreshed: boolean;
}

export const FRESH: RetryCounters = Object.freeze({ mode: 0, failures: 0, attempt: 0, refreshed: false });

export interface RetryConfig {
  modes: readonly TransportKind[];
  /** Failed connects in a row before moving to the next transport, per transport. */
  failuresBeforeNext: Partial<Record<TransportKind, number>>;
  streamBackoff: BackoffOptions;
  pollBackoff: BackoffOptions;
  /** The token is a function that can be asked for a fresh one. */
  canRefreshToken: boolean;
  random: () => number;
}

export type Decision =
  /** Retrying cannot help (refused token, missing scope): stop until the app calls setToken. */
  | { readonly action: 'stop'; readonly counters: RetryCounters }
  /** Connect again on `counters.mode` after `delayMs` (0: at once). */
  | { readonly action: 'retry'; readonly delayMs: number; readonly counters: RetryCounters };

/** Counters once the link works again. */
export function heard(counters: RetryCounters): RetryCounters {
  return { mode: counters.mode, failures: 0, attempt: 0, refreshed: false };
}

export function decide(end: LinkEnd, counters: RetryCounters, config: RetryConfig): Decision {
  switch (end.reason) {
    case 'forbidden':
      return { action: 'stop', counters };
    case 'refused':
      // One fresh token before a refusal counts: a token that expired while the tab slept
      // is the common case, and a token function can mint a new one.
      if (config.canRefreshToken && !counters.refreshed) {
        return { action: 'retry', delayMs: 0, counters: { ...counters, refreshed: true } };
      }
      return { action: 'stop', counters };
    case 'expired':
    case 'finished':
      // The server ended a working stream on purpose: reopen at once (fresh token, cursor).
      return { action: 'retry', delayMs: 0, counters: { ...counters, attempt: 0 } };
    case 'failed': {
      const kind = config.modes[counters.mode] ?? config.modes[0]!;
      const failures = end.healthyBefore ? 0 : counters.failures + 1;
      const limit = config.failuresBeforeNext[kind];
      if (limit !== undefined && failures >= limit && counters.mode + 1 < config.modes.length) {
        return { action: 'retry', delayMs: 0, counters: { mode: counters.mode + 1, failures: 0, attempt: 0, refreshed: counters.refreshed } };
      }
      const backoff = kind === 'polling' ? config.pollBackoff : config.streamBackoff;
      const attempt = end.healthyBefore ? 0 : counters.attempt;
      return {
        action: 'retry',
        delayMs: backoffDelay(attempt, backoff, config.random),
        counters: { mode: counters.mode, failures, attempt: attempt + 1, refreshed: counters.refreshed },
      };
    }
  }
}
