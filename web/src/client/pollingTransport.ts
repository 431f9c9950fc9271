import { backoffDelay } from './backoff';
import { isTerminalPhase } from './types';
import { describeError, isJobState, type Transport, type TransportContext, type TransportHandlers } from './transport';
import { apiUrl, jobPath } from './urls';

type PollOutcome = 'ok' | 'retry' | 'fatal';

/**
 * Last resort: `GET /v1/jobs/{id}` for every watched job, every `pollIntervalMs` while it
 * works and with exponential backoff while it does not.
 */
export class PollingTransport implements Transport {
  readonly kind = 'polling' as const;
  private readonly jobs = new Set<string>();
  private closed = false;
  private attempt = 0;
  private cancelTick: (() => void) | null = null;
  private inFlight: AbortController | null = null;
  private failing = false;

  constructor(
    private readonly ctx: TransportContext,
    private readonly handlers: TransportHandlers,
    jobIds: Iterable<string>,
  ) {
    for (const jobId of jobIds) this.jobs.add(jobId);
    this.schedule(0);
  }

  add(jobId: string): void {
    this.jobs.add(jobId);
    // Fetch the newcomer soon rather than a whole interval later.
    if (this.cancelTick && !this.inFlight) this.retryNow();
  }

  remove(jobId: string): void {
    this.jobs.delete(jobId);
  }

  retryNow(): void {
    if (this.closed || this.inFlight) return;
    this.schedule(0);
  }

  close(): void {
    this.closed = true;
    this.cancelTick?.();
    this.cancelTick = null;
    this.inFlight?.abort();
    this.inFlight = null;
  }

  private schedule(delay: number): void {
    this.cancelTick?.();
    this.cancelTick = this.ctx.timers.after(delay, () => {
      this.cancelTick = null;
      void this.tick();
    });
  }

  private async tick(): Promise<void> {
    if (this.closed || this.jobs.size === 0) return;
    const controller = new AbortController();
    this.inFlight = controller;
    const outcomes = await Promise.all([...this.jobs].map((jobId) => this.pollOne(jobId, controller.signal)));
    if (this.closed || this.inFlight !== controller) return;
    this.inFlight = null;
    if (outcomes.includes('fatal')) return;
    if (outcomes.includes('retry')) {
      this.schedule(backoffDelay(this.attempt, this.ctx.pollBackoff, this.ctx.random));
      this.attempt += 1;
      return;
    }
    this.attempt = 0;
    if (this.failing || outcomes.length > 0) {
      this.failing = false;
      this.handlers.healthy();
    }
    if (this.jobs.size > 0) this.schedule(this.ctx.pollIntervalMs);
  }

  private async pollOne(jobId: string, signal: AbortSignal): Promise<PollOutcome> {
    const fetchFn = this.ctx.fetch;
    const url = apiUrl(this.ctx.baseUrl, jobPath(jobId));
    if (!fetchFn) return this.reportFailure(`Cannot poll ${url}: this environment has no fetch.`, undefined, true);
    let response: Response;
    try {
      const token = await this.ctx.token();
      response = await fetchFn(url, {
        headers: token ? { Authorization: `Bearer ${token}`, Accept: 'application/json' } : { Accept: 'application/json' },
        signal,
        cache: 'no-store',
      });
    } catch (error) {
      if (signal.aborted) return 'ok';
      return this.reportFailure(`Polling ${url} failed: ${describeError(error)}. Retrying with backoff.`);
    }
    if (signal.aborted) return 'ok';
    if (response.ok) {
      let job: unknown;
      try {
        job = await response.json();
      } catch (error) {
        return this.reportFailure(`Polling ${url} returned invalid JSON: ${describeError(error)}.`, response.status);
      }
      if (signal.aborted) return 'ok';
      if (!isJobState(job)) return this.reportFailure(`Polling ${url} returned something that is not a job state.`, response.status);
      this.handlers.state(job);
      if (isTerminalPhase(job.phase)) this.jobs.delete(jobId);
      return 'ok';
    }
    const body = await readError(response);
    if (response.status === 401) {
      return this.reportFailure(`The server refused the token when polling (401: ${body}). Give ProgressClient a valid token and call setToken().`, 401, true, 'unauthorized');
    }
    if (response.status === 403 || response.status === 404) {
      this.jobs.delete(jobId);
      this.handlers.jobError({
        code: response.status === 404 ? 'not_found' : 'forbidden',
        status: response.status,
        jobId,
        message: response.status === 404 ? `Job ${jobId} does not exist (or expired): ${body}` : `This token may not read job ${jobId}: ${body}`,
      });
      return 'ok';
    }
    return this.reportFailure(`Polling ${url} answered ${response.status}: ${body}. Retrying with backoff.`, response.status);
  }

  private reportFailure(message: string, status?: number, fatal = false, code = 'poll_failed'): PollOutcome {
    this.failing = true;
    this.handlers.failure({ code, message, ...(status === undefined ? {} : { status }) }, { healthyBefore: false, fatal });
    return fatal ? 'fatal' : 'retry';
  }
}

async function readError(response: Response): Promise<string> {
  try {
    const body = (await response.json()) as { error?: { message?: string } };
    return body.error?.message ?? response.statusText;
  } catch {
    return response.statusText || 'no details';
  }
}
