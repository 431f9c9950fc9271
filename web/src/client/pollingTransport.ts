import { isTerminalPhase } from './types';
import { describeError, isJobState, type LinkEnd, type Transport, type TransportContext, type TransportEvents } from './transport';
import { apiUrl, jobPath } from './urls';

/**
 * Last resort: `GET /v1/jobs/{id}` for every watched job, every `pollIntervalMs`. Single-use:
 * the first round that fails ends it (reported once); the ProgressClient decides when to
 * poll again.
 */
export class PollingTransport implements Transport {
  readonly kind = 'polling' as const;
  private readonly jobs: Set<string>;
  private finished = false;
  private heardOnce = false;
  private cancelTick: (() => void) | null = null;
  private inFlight: AbortController | null = null;

  constructor(
    private readonly ctx: TransportContext,
    private readonly events: TransportEvents,
    jobIds: Iterable<string>,
    private readonly token: string | null,
  ) {
    this.jobs = new Set(jobIds);
  }

  start(): void {
    void this.round();
  }

  add(jobId: string): boolean {
    this.jobs.add(jobId);
    // Fetch the newcomer soon rather than a whole interval later.
    if (this.cancelTick && !this.inFlight) this.schedule(0);
    return true;
  }

  remove(jobId: string): boolean {
    this.jobs.delete(jobId);
    return true;
  }

  reauth(): boolean {
    return false;
  }

  check(): void {
    if (!this.finished && !this.inFlight) this.schedule(0);
  }

  close(): void {
    this.finished = true;
    this.cancelTick?.();
    this.cancelTick = null;
    this.inFlight?.abort();
    this.inFlight = null;
  }

  private schedule(delay: number): void {
    this.cancelTick?.();
    this.cancelTick = this.ctx.timers.after(delay, () => {
      this.cancelTick = null;
      void this.round();
    });
  }

  private async round(): Promise<void> {
    if (this.finished || this.jobs.size === 0) return;
    const controller = new AbortController();
    this.inFlight = controller;
    const ends = await Promise.all([...this.jobs].map((jobId) => this.pollOne(jobId, controller.signal)));
    if (this.finished || this.inFlight !== controller) return;
    this.inFlight = null;
    const end = ends.find((outcome) => outcome !== null);
    if (end) {
      this.close();
      this.events.ended({ ...end, healthyBefore: this.heardOnce });
      return;
    }
    if (!this.heardOnce) {
      this.heardOnce = true;
      this.events.heard();
      if (this.finished) return;
    }
    if (this.jobs.size > 0) this.schedule(this.ctx.pollIntervalMs);
  }

  /** null when the job was read (or refused on its own); how the link ends otherwise. */
  private async pollOne(jobId: string, signal: AbortSignal): Promise<Omit<LinkEnd, 'healthyBefore'> | null> {
    const fetchFn = this.ctx.fetch;
    const url = apiUrl(this.ctx.baseUrl, jobPath(jobId));
    const failed = (message: string, status?: number) => ({
      error: { code: 'poll_failed', message, ...(status === undefined ? {} : { status }) },
      reason: 'failed' as const,
    });
    if (!fetchFn) return failed(`Cannot poll ${url}: this environment has no fetch.`);
    let response: Response;
    try {
      response = await fetchFn(url, {
        headers: this.token ? { Authorization: `Bearer ${this.token}`, Accept: 'application/json' } : { Accept: 'application/json' },
        signal,
        cache: 'no-store',
      });
    } catch (error) {
      return signal.aborted ? null : failed(`Polling ${url} failed: ${describeError(error)}.`);
    }
    if (signal.aborted) return null;
    if (response.ok) {
      let job: unknown;
      try {
        job = await response.json();
      } catch (error) {
        return failed(`Polling ${url} returned invalid JSON: ${describeError(error)}.`, response.status);
      }
      if (signal.aborted || this.finished) return null;
      if (!isJobState(job)) return failed(`Polling ${url} returned something that is not a job state.`, response.status);
      if (isTerminalPhase(job.phase)) this.jobs.delete(jobId);
      this.events.state(job);
      return null;
    }
    const body = await readError(response);
    if (response.status === 401) {
      return {
        error: { code: 'unauthorized', status: 401, message: `The server refused the token when polling (401: ${body}). Give ProgressClient a token function that returns a fresh one, or call setToken() with a valid token.` },
        reason: 'refused',
      };
    }
    if (response.status === 403 || response.status === 404) {
      this.jobs.delete(jobId);
      this.events.jobError({
        code: response.status === 404 ? 'not_found' : 'forbidden',
        status: response.status,
        jobId,
        message: response.status === 404 ? `Job ${jobId} does not exist (or expired): ${body}` : `This token may not read job ${jobId}: ${body}`,
      });
      return null;
    }
    return failed(`Polling ${url} answered ${response.status}: ${body}.`, response.status);
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
