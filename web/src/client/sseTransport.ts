import { backoffDelay } from './backoff';
import { isTerminalPhase } from './types';
import {
  describeError,
  isJobState,
  type EventSourceLike,
  type Transport,
  type TransportContext,
  type TransportHandlers,
} from './transport';
import { apiUrl, jobPath, redactToken } from './urls';

interface Stream {
  source: EventSourceLike | null;
  opened: boolean;
  attempt: number;
  cancelRetry: (() => void) | null;
  /** Bumped on every (re)start so callbacks of an abandoned EventSource are ignored. */
  generation: number;
}

/**
 * Server-sent events, one stream per job (the protocol has no multiplexed SSE endpoint).
 * Each stream restarts itself with backoff and a fresh `since`; failures are reported so the
 * ProgressClient can give up on SSE and poll instead.
 */
export class SseTransport implements Transport {
  readonly kind = 'sse' as const;
  private readonly streams = new Map<string, Stream>();
  private closed = false;

  constructor(
    private readonly ctx: TransportContext,
    private readonly handlers: TransportHandlers,
    jobIds: Iterable<string>,
  ) {
    for (const jobId of jobIds) this.add(jobId);
  }

  add(jobId: string): void {
    if (this.closed || this.streams.has(jobId)) return;
    const stream: Stream = { source: null, opened: false, attempt: 0, cancelRetry: null, generation: 0 };
    this.streams.set(jobId, stream);
    void this.open(jobId, stream);
  }

  remove(jobId: string): void {
    const stream = this.streams.get(jobId);
    if (!stream) return;
    this.streams.delete(jobId);
    this.stop(stream);
  }

  retryNow(): void {
    for (const [jobId, stream] of this.streams) {
      if (stream.cancelRetry) {
        stream.cancelRetry();
        stream.cancelRetry = null;
        void this.open(jobId, stream);
      }
    }
  }

  close(): void {
    this.closed = true;
    for (const stream of this.streams.values()) this.stop(stream);
    this.streams.clear();
  }

  private stop(stream: Stream): void {
    stream.generation += 1;
    stream.cancelRetry?.();
    stream.cancelRetry = null;
    stream.source?.close();
    stream.source = null;
  }

  private async open(jobId: string, stream: Stream): Promise<void> {
    const generation = ++stream.generation;
    const live = () => !this.closed && this.streams.get(jobId) === stream && stream.generation === generation;
    // Always await first, so no callback runs inside the constructor.
    let token: string | null;
    try {
      token = await this.ctx.token();
    } catch (error) {
      if (live()) this.retryLater(jobId, stream, `The token function failed: ${describeError(error)}`);
      return;
    }
    if (!live()) return;
    const Ctor = this.ctx.EventSource;
    if (!Ctor) {
      this.handlers.failure({ code: 'sse_unavailable', message: 'This environment has no EventSource; polling instead.' }, { healthyBefore: false, fatal: false });
      return;
    }
    const since = this.ctx.since(jobId);
    const url = apiUrl(this.ctx.baseUrl, jobPath(jobId, '/events'), { since: since > 0 ? since : null, access_token: token });
    let source: EventSourceLike;
    try {
      source = new Ctor(url);
    } catch (error) {
      this.retryLater(jobId, stream, `Could not create an EventSource for ${redactToken(url)}: ${describeError(error)}`);
      return;
    }
    stream.source = source;
    stream.opened = false;
    source.addEventListener('open', () => {
      if (!live()) return;
      stream.opened = true;
      stream.attempt = 0;
      this.handlers.healthy();
    });
    source.addEventListener('state', (event: MessageEvent) => {
      if (!live()) return;
      let job: unknown;
      try {
        job = JSON.parse(String(event.data));
      } catch {
        return;
      }
      if (!isJobState(job)) return;
      this.handlers.state(job);
      if (isTerminalPhase(job.phase)) {
        // The server ends the stream after the terminal state; close first so the
        // EventSource does not reconnect to a finished job.
        this.remove(jobId);
      }
    });
    source.addEventListener('error', () => {
      if (!live()) return;
      // We restart the stream ourselves instead of letting EventSource do it: our restart
      // carries the newest `since` and honours the client's backoff and failure counting.
      source.close();
      stream.source = null;
      this.retryLater(jobId, stream, `The event stream ${redactToken(url)} failed${stream.opened ? ' after it had opened' : ' to open'} (network error, or an HTTP error such as 401/404 before the stream started).`);
    });
  }

  private retryLater(jobId: string, stream: Stream, message: string): void {
    const healthyBefore = stream.opened;
    stream.opened = false;
    const delay = backoffDelay(stream.attempt, this.ctx.streamBackoff, this.ctx.random);
    stream.attempt += 1;
    stream.cancelRetry = this.ctx.timers.after(delay, () => {
      stream.cancelRetry = null;
      void this.open(jobId, stream);
    });
    // Report after scheduling: the handler may close this transport, which cancels the retry.
    this.handlers.failure({ code: 'sse_failed', message, jobId }, { healthyBefore, fatal: false });
  }
}
