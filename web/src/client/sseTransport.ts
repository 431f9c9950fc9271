import { isTerminalPhase, type JobState } from './types';
import { describeError, isJobState, type EventSourceLike, type LinkEnd, type Transport, type TransportContext, type TransportEvents } from './transport';
import { apiUrl, jobPath, redactToken } from './urls';

/** `EventSource.CLOSED`: the server answered, but not with a stream (an HTTP error or 204). */
const CLOSED = 2;

/**
 * Every watched job on ONE EventSource: `GET /v1/events?job=a&job=b…` (a browser has only
 * about six HTTP/1.1 connections per origin, so one stream per job stops working beyond
 * five jobs). Single-use: the job list is fixed by the URL, so the ProgressClient opens a
 * new one when the set of jobs changes, passing the last event id (an opaque cursor) as
 * `last_event_id` so the new stream resumes every job with nothing missed or repeated.
 *
 * The EventSource's own reconnect is not used: on a network error the stream is closed
 * and reported, and the client reopens it with its backoff, a fresh token and the cursor.
 */
export class SseTransport implements Transport {
  readonly kind = 'sse' as const;
  private source: EventSourceLike | null = null;
  private readonly jobs: Set<string>;
  private opened = false;
  private finished = false;

  constructor(
    private readonly ctx: TransportContext,
    private readonly events: TransportEvents,
    jobIds: Iterable<string>,
    private readonly token: string | null,
    private readonly cursor: string | null,
  ) {
    this.jobs = new Set(jobIds);
  }

  /** The URL this stream opens (job list, cursor, token). */
  url(): string {
    const query = new URLSearchParams();
    for (const jobId of [...this.jobs].sort()) query.append('job', jobId);
    if (this.cursor) query.set('last_event_id', this.cursor);
    if (this.token) query.set('access_token', this.token);
    return `${this.ctx.baseUrl}/v1/events?${query.toString()}`;
  }

  start(): void {
    const Ctor = this.ctx.EventSource;
    if (!Ctor) {
      this.end({ error: { code: 'sse_unavailable', message: 'This environment has no EventSource; polling instead.' }, healthyBefore: false, reason: 'failed' });
      return;
    }
    const url = this.url();
    let source: EventSourceLike;
    try {
      source = new Ctor(url);
    } catch (error) {
      this.end({
        error: { code: 'sse_failed', message: `Could not create an EventSource for ${redactToken(url)}: ${error instanceof Error ? error.message : String(error)}` },
        healthyBefore: false,
        reason: 'failed',
      });
      return;
    }
    this.source = source;
    source.addEventListener('open', () => {
      if (this.finished || this.opened) return;
      this.opened = true;
      this.events.heard();
    });
    source.addEventListener('state', (event: MessageEvent) => {
      if (this.finished) return;
      const job = parse(event.data);
      if (!isJobState(job) || !this.jobs.has(job.job_id)) return;
      if (isTerminalPhase(job.phase)) this.jobs.delete(job.job_id);
      this.events.state(job, event.lastEventId || undefined);
    });
    source.addEventListener('error', (event: Event) => {
      if (this.finished) return;
      // Two kinds share the name: the server's `event: error` about one job (it has data),
      // and the EventSource's own network error (no data).
      const data = (event as MessageEvent).data;
      if (typeof data === 'string') {
        const body = parse(data) as { job_id?: unknown; code?: unknown; message?: unknown } | null;
        if (body && typeof body.job_id === 'string' && this.jobs.delete(body.job_id)) {
          this.events.jobError({ jobId: body.job_id, code: String(body.code ?? 'error'), message: String(body.message ?? 'The server refused this job.') });
        }
        return;
      }
      if (!this.opened && source.readyState === CLOSED) {
        // Answered without a stream: an HTTP error (401, 422, 503…) or 204 No Content, which
        // the EventSource reports alike. Ask once which it was.
        source.close();
        void this.refusedOrDone(url);
        return;
      }
      this.failed(url);
    });
    source.addEventListener('expired', (event: MessageEvent) => {
      if (this.finished) return;
      const body = parse(event.data) as { message?: unknown } | null;
      this.end({
        error: { code: 'token_expired', message: `The stream's token expired (${String(body?.message ?? 'no details')}); reopening with a fresh token.` },
        healthyBefore: this.opened,
        reason: 'expired',
      });
    });
    source.addEventListener('end', () => {
      // Every job of the list reached its terminal state; the server closes the stream.
      if (!this.finished) this.end({ error: null, healthyBefore: this.opened, reason: 'finished' });
    });
  }

  /** The job list is part of the URL: a new job needs a new stream. */
  add(jobId: string): boolean {
    return this.jobs.has(jobId);
  }

  remove(jobId: string, tellServer: boolean): boolean {
    this.jobs.delete(jobId);
    // A finished job leaves the stream by itself; dropping a running one needs a new stream
    // (else the server keeps sending it). The client reopens unless nothing is left.
    return !tellServer;
  }

  reauth(): boolean {
    return false;
  }

  check(): void {
    // An EventSource notices a dead connection itself and fires `error`.
  }

  close(): void {
    this.finished = true;
    this.source?.close();
    this.source = null;
  }

  private failed(url: string, status?: number): void {
    this.end({
      error: {
        code: 'sse_failed',
        message: `The event stream ${redactToken(url)} failed${this.opened ? ' after it had opened' : ' to open'} (${
          status === undefined ? 'network error, or an HTTP error such as 401/404 before the stream started' : `HTTP ${status} before the stream started`
        }).`,
        ...(status === undefined ? {} : { status }),
      },
      healthyBefore: this.opened,
      reason: 'failed',
    });
  }

  /**
   * The stream was answered without events. `204 No Content` means the server has nothing
   * left to send: the cursor says the client already has the terminal state of every job
   * of the stream, which happens when the client's view and the cursor disagree (after the
   * store lost jobs and made them again, say). That is no failure: read each job's current
   * state once over REST, then end so the client reopens without the cursor (a full resync)
   * for whatever is still running. Anything else is a failed attempt, as before.
   */
  private async refusedOrDone(url: string): Promise<void> {
    const fetchFn = this.ctx.fetch;
    let status: number | undefined;
    if (fetchFn) {
      const controller = new AbortController();
      try {
        const response = await fetchFn(url, { headers: { Accept: 'text/event-stream' }, signal: controller.signal, cache: 'no-store' });
        status = response.status;
      } catch {
        status = undefined;
      }
      controller.abort(); // a stream that opened after all is not read
    }
    if (this.finished) return;
    if (status !== 204 || !fetchFn) {
      this.failed(url, status);
      return;
    }
    const read = await Promise.all([...this.jobs].map((jobId) => this.readJob(jobId)));
    if (this.finished) return;
    const problem = read.find((result): result is string => typeof result === 'string');
    if (problem !== undefined) {
      this.end({ error: { code: 'sse_failed', message: problem }, healthyBefore: false, reason: 'failed', resync: true });
      return;
    }
    for (const job of read as JobState[]) {
      if (isTerminalPhase(job.phase)) this.jobs.delete(job.job_id);
      this.events.state(job);
      if (this.finished) return;
    }
    this.end({ error: null, healthyBefore: false, reason: 'finished', resync: true });
  }

  /** `GET /v1/jobs/{id}`: the job's state, or what went wrong. */
  private async readJob(jobId: string): Promise<JobState | string> {
    const url = apiUrl(this.ctx.baseUrl, jobPath(jobId));
    try {
      const response = await this.ctx.fetch!(url, {
        headers: this.token ? { Authorization: `Bearer ${this.token}`, Accept: 'application/json' } : { Accept: 'application/json' },
        cache: 'no-store',
      });
      if (!response.ok) return `Reading ${url} after the stream had nothing left to send answered ${response.status}.`;
      const job: unknown = await response.json();
      return isJobState(job) ? job : `Reading ${url} returned something that is not a job state.`;
    } catch (error) {
      return `Reading ${url} failed: ${describeError(error)}.`;
    }
  }

  private end(end: LinkEnd): void {
    if (this.finished) return;
    // Close first, so the EventSource does not reconnect on its own.
    this.close();
    this.events.ended(end);
  }
}

function parse(data: unknown): unknown {
  try {
    return JSON.parse(String(data));
  } catch {
    return null;
  }
}
