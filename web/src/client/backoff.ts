export interface BackoffOptions {
  /** Delay ceiling of the first retry, in ms. */
  baseMs: number;
  /** No retry waits longer than this, in ms. */
  capMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { baseMs: 500, capMs: 30_000 };

/**
 * Exponential backoff with full jitter: a uniform delay in [0, min(cap, base·2^attempt)).
 * Full jitter spreads the reconnects of many browsers after a server restart, so they do
 * not all hit the new process in the same instant.
 */
export function backoffDelay(attempt: number, options: BackoffOptions, random: () => number = Math.random): number {
  const ceiling = backoffCeiling(attempt, options);
  return Math.floor(random() * ceiling);
}

/** The upper bound of the delay for an attempt (0-based). */
export function backoffCeiling(attempt: number, { baseMs, capMs }: BackoffOptions): number {
  // Clamp the exponent so 2^attempt cannot overflow to Infinity after many failures.
  const exponent = Math.min(Math.max(attempt, 0), 30);
  return Math.min(capMs, baseMs * 2 ** exponent);
}

export function validateBackoff(options: BackoffOptions, name: string): BackoffOptions {
  if (!(options.baseMs > 0) || !(options.capMs >= options.baseMs)) {
    throw new RangeError(
      `${name} needs 0 < baseMs <= capMs, got baseMs=${options.baseMs} capMs=${options.capMs}`,
    );
  }
  return options;
}
