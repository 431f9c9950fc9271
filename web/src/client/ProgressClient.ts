import { backoffDelay, DEFAULT_BACKOFF, validateBackoff, type BackoffOptions } from './backoff';
import { connectionInfo, IDLE, transition, type LinkEvent, type LinkState } from './link';
import { decide, FRESH, heard, type RetryConfig, type RetryCounters } from './policy';
import { PollingTransport } from './pollingTransport';
import { SseTransport } from './sseTransport';
import { TimerSet } from './timers';
import type { EventSourceFactory, FetchLike, LinkEnd, Transport, TransportContext, TransportEvents, WebSocketFactory } from './transport';
import { describeError } from './transport';
import {
  isTerminalPhase,
  type ConnectionInfo,
  type JobSnapshot,
  type JobState,
  type ProgressError,
  type TransportKind,
} from './types';
import { apiUrl, jobPath, JOB_ID_PATTERN } from './urls';
import { WebSocketTransport } from './websocketTransport';

export type TokenSource = string | null | (() => string | null | Promise<string | null>);

export interface ProgressClientOptions {
  /** Server origin (and optional path prefix). Default: the page's origin. */
  baseUrl?: string;
  /**
   * Bearer token with `jobs:read`, or a function returning a fresh one. The function is asked
   * for every new connection, before the token expires (the server says when), and once more
   * when the server refuses a token, before the refusal counts.
   */
  token?: TokenSource;
  /** Reconnect backoff (full jitter). Default `{ baseMs: 500, capMs: 30000 }`. */
  backoff?: Partial<BackoffOptions>;
  /** Reconnect when the WebSocket is silent this long. The server pings every 15 s. Default 35000. */
  pingTimeoutMs?: number;
  /** WebSocket connects that fail in a row before switching to SSE. Default 3. */
  wsFailuresBeforeFallback?: number;
  /** Multiplexed SSE streams that fail to open in a row before switching to polling. Default 3. */
  sseFailuresBeforePolling?: number;
  /** While on a fallback, how often to try the WebSocket again. Default 20000. */
  wsProbeIntervalMs?: number;
  /** Time between polls while polling works. Default 2000. */
  pollIntervalMs?: number;
  /** Backoff between failed polls. Default `{ baseMs: 1000, capMs: 30000 }`. */
  pollBackoff?: Partial<BackoffOptions>;
  /** Transports to use, in order of preference. Default `['websocket', 'sse', 'polling']`. */
  transports?: TransportKind[];
  /** Injection points for tests and non-browser runtimes. Default: the globals. */
  WebSocket?: WebSocketFactory;
  EventSource?: EventSourceFactory;
  fetch?: FetchLike;
  random?: () => number;
}

export type JobListener = () => void;

interface Entry {
  jobId: string;
  listeners: Set<JobListener>;
  snapshot: JobSnapshot;
  lastSeq: number;
}

const EMPTY_SNAPSHOT: JobSnapshot = Object.freeze({ state: null, error: null });
const ALL_TRANSPORTS: TransportKind[] = ['websocket', 'sse', 'polling'];
/** Refresh the token this long before it expires at most, or at 80 % of its lifetime if sooner. */
const REFRESH_LEAD_MS = 30_000;
const REFRESH_LEAD_FRACTION = 0.2;
/** A refresh whose token function failed is tried again this soon, while over 2 s are left. */
const REFRESH_RETRY_MS = 5_000;
const REFRESH_RETRY_MIN_LEFT_MS = 2_000;

/**
 * Watches any number of jobs over one link and keeps the newest state of each.
 *
 * Prefers one WebSocket for everything; after repeated connect failures it falls back to one
 * multiplexed SSE stream, then to polling, and keeps probing the WebSocket to move back.
 * States are accepted only when their `seq` is newer than the last one seen, so a
 * reconnect, an overlap between transports or a late poll can never move a job backwards.
 *
 * Design: the link is one explicit state (`LinkState`, changed only through `transition`,
 * which throws on an illegal change); transports are single-use and only report what
 * happened; every retry decision is made by `decide` (policy.ts), called from one place.
 *
 * `close()` drops every subscription and stops every timer; the client may be used again
 * afterwards (a later `subscribe` reconnects), which keeps React StrictMode remounts simple.
 */
export class ProgressClient {
  private readonly ctx: TransportContext;
  private readonly retry: RetryConfig;
  private readonly wsProbeIntervalMs: number;
  private tokenSource: TokenSource;
  private readonly timers = new TimerSet();
  private readonly entries = new Map<string, Entry>();
  private readonly connectionListeners = new Set<() => void>();
  private readonly stateListeners = new Set<(job: JobState) => void>();

  private link: LinkState = IDLE;
  private lastError: ProgressError | null = null;
  private connection: ConnectionInfo = connectionInfo(IDLE, null);
  private counters: RetryCounters = FRESH;
  private primary: Transport | null = null;
  private probe: Transport | null = null;
  /** Bumped whenever a pending connect, reopen or probe must be forgotten. */
  private generation = 0;
  /** The multiplexed SSE stream's last event id: where a new stream resumes. Opaque. */
  private sseCursor: string | null = null;
  private reopenQueued = false;
  private cancelRetry: (() => void) | null = null;
  private cancelProbe: (() => void) | null = null;
  /** Which transport the next background probe tries (an index into the preferred ones). */
  private probeMode = 0;
  private cancelRefresh: (() => void) | null = null;
  private readonly jobRetries = new Map<string, { attempt: number; cancel: (() => void) | null }>();
  private onlineListening = false;

  constructor(options: ProgressClientOptions = {}) {
    const baseUrl = options.baseUrl ?? globalThis.location?.origin;
    if (!baseUrl) {
      throw new TypeError('ProgressClient needs a baseUrl outside a browser page, e.g. new ProgressClient({ baseUrl: "https://progress.example.com" }).');
    }
    this.tokenSource = options.token ?? null;
    this.wsProbeIntervalMs = positive(options.wsProbeIntervalMs ?? 20_000, 'wsProbeIntervalMs');
    this.ctx = {
      baseUrl: baseUrl.replace(/\/+$/, ''),
      since: (jobId) => this.entries.get(jobId)?.lastSeq ?? 0,
      epoch: (jobId) => this.entries.get(jobId)?.snapshot.state?.epoch ?? null,
      timers: this.timers,
      pingTimeoutMs: positive(options.pingTimeoutMs ?? 35_000, 'pingTimeoutMs'),
      pollIntervalMs: positive(options.pollIntervalMs ?? 2_000, 'pollIntervalMs'),
      WebSocket: options.WebSocket ?? (globalThis.WebSocket as WebSocketFactory | undefined),
      EventSource: options.EventSource ?? (globalThis.EventSource as EventSourceFactory | undefined),
      fetch: options.fetch ?? (globalThis.fetch ? globalThis.fetch.bind(globalThis) : undefined),
    };
    // Skip transports this runtime lacks, so a failure of one we could never use does not
    // count towards anything.
    const available: Record<TransportKind, boolean> = {
      websocket: this.ctx.WebSocket !== undefined,
      sse: this.ctx.EventSource !== undefined,
      polling: this.ctx.fetch !== undefined,
    };
    const modes = (options.transports ?? ALL_TRANSPORTS).filter(
      (kind, index, all) => ALL_TRANSPORTS.includes(kind) && all.indexOf(kind) === index && available[kind],
    );
    if (modes.length === 0) {
      throw new TypeError(
        `ProgressClient has no usable transport: options.transports must name at least one of ${ALL_TRANSPORTS.join(', ')} that this runtime provides (or pass WebSocket, EventSource or fetch in the options).`,
      );
    }
    this.retry = {
      modes,
      failuresBeforeNext: {
        websocket: positive(options.wsFailuresBeforeFallback ?? 3, 'wsFailuresBeforeFallback'),
        sse: positive(options.sseFailuresBeforePolling ?? 3, 'sseFailuresBeforePolling'),
      },
      streamBackoff: validateBackoff({ ...DEFAULT_BACKOFF, ...options.backoff }, 'backoff'),
      pollBackoff: validateBackoff({ baseMs: 1_000, capMs: 30_000, ...options.pollBackoff }, 'pollBackoff'),
      canRefreshToken: typeof this.tokenSource === 'function',
      random: options.random ?? Math.random,
    };
  }

  // ---- watching jobs -------------------------------------------------------------------

  /**
   * Watch a job. `listener` runs after every accepted change of its snapshot. Returns the
   * function that stops watching; when the last watcher of the last job leaves, the link
   * closes.
   */
  subscribe(jobId: string, listener: JobListener): () => void {
    let entry = this.entries.get(jobId);
    if (!entry) {
      entry = { jobId, listeners: new Set(), snapshot: EMPTY_SNAPSHOT, lastSeq: 0 };
      if (!JOB_ID_PATTERN.test(jobId)) {
        entry.snapshot = {
          state: null,
          error: {
            code: 'invalid',
            jobId,
            message: `"${jobId}" is not a valid job_id: use 1–128 letters, digits, ".", "_", ":" or "-", starting with a letter or digit.`,
          },
        };
      }
      this.entries.set(jobId, entry);
    }
    const wasActive = this.isActive(entry);
    entry.listeners.add(listener);
    if (!wasActive && this.isActive(entry)) this.attach(jobId);

    const current = entry;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      current.listeners.delete(listener);
      if (current.listeners.size > 0) return;
      // Release a microtask later: React StrictMode unsubscribes and resubscribes in the
      // same tick, and that must not close and reopen the socket.
      queueMicrotask(() => this.release(current));
    };
  }

  /** What the client knows about a job; the same object until it changes. */
  getJob(jobId: string): JobSnapshot {
    return this.entries.get(jobId)?.snapshot ?? EMPTY_SNAPSHOT;
  }

  /** Connection status; the same object until it changes. */
  getConnection(): ConnectionInfo {
    return this.connection;
  }

  /** The link's state machine value, for diagnostics and tests. */
  getLinkState(): LinkState {
    return this.link;
  }

  onConnectionChange(listener: () => void): () => void {
    this.connectionListeners.add(listener);
    return () => this.connectionListeners.delete(listener);
  }

  /** Every accepted state of every watched job, in arrival order (for logs and metrics). */
  onState(listener: (job: JobState) => void): () => void {
    this.stateListeners.add(listener);
    return () => this.stateListeners.delete(listener);
  }

  /** Replace the token (e.g. after a refresh); reconnects if the old one had been refused. */
  setToken(token: TokenSource): void {
    this.tokenSource = token;
    this.retry.canRefreshToken = typeof token === 'function';
    if (this.link.name === 'refused') {
      this.move({ type: 'idle' });
      this.reconcile();
    }
  }

  /** Skip the current backoff wait and try now (the client also does this on `online`). */
  reconnectNow(): void {
    if (this.link.name === 'waiting') {
      this.cancelRetry?.();
      this.cancelRetry = null;
      this.counters = { ...this.counters, attempt: 0 };
      this.connect();
      return;
    }
    this.primary?.check();
    if (this.onFallback()) this.probeNow();
  }

  /** Ask the server to cancel a job (`POST /v1/jobs/{id}/cancel`); resolves with the new state. */
  async cancel(jobId: string, reason = 'Cancelled by the user'): Promise<JobState> {
    const fetchFn = this.ctx.fetch;
    if (!fetchFn) throw new Error('ProgressClient.cancel needs fetch; pass options.fetch outside a browser.');
    const token = await this.resolveToken();
    const response = await fetchFn(apiUrl(this.ctx.baseUrl, jobPath(jobId, '/cancel')), {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', ...(token ? { Authorization: `Bearer ${token}` } : {}) },
      body: JSON.stringify({ reason }),
    });
    const body = (await response.json().catch(() => null)) as { state?: JobState; error?: { message?: string } } | null;
    if (!response.ok || !body?.state) {
      const detail = body?.error?.message ?? response.statusText;
      throw new Error(`Cancelling job ${jobId} failed with ${response.status}: ${detail}`);
    }
    this.accept(body.state);
    return body.state;
  }

  /** Stop watching everything, close the link and stop every timer. */
  close(): void {
    this.entries.clear();
    this.lastError = null;
    this.goIdle();
  }

  /** For tests and debugging: how many timers are pending. */
  get pendingTimers(): number {
    return this.timers.size;
  }

  // ---- jobs ----------------------------------------------------------------------------

  private isActive(entry: Entry): boolean {
    return entry.listeners.size > 0 && entry.snapshot.error === null && !isTerminalPhase(entry.snapshot.state?.phase);
  }

  private activeJobIds(): string[] {
    return [...this.entries.values()].filter((entry) => this.isActive(entry)).map((entry) => entry.jobId);
  }

  private attach(jobId: string): void {
    if (this.link.name === 'idle') {
      this.reconcile();
      return;
    }
    // While connecting or waiting, the next transport is created with every active job.
    if (this.primary && !this.primary.add(jobId)) this.queueReopen();
    this.probe?.add(jobId);
  }

  private release(entry: Entry): void {
    if (entry.listeners.size > 0 || this.entries.get(entry.jobId) !== entry) return;
    const wasWatched = entry.snapshot.error === null && !isTerminalPhase(entry.snapshot.state?.phase);
    this.entries.delete(entry.jobId);
    if (wasWatched) this.detach(entry.jobId, true);
    this.reconcile();
  }

  private detach(jobId: string, tellServer: boolean): void {
    this.jobRetries.get(jobId)?.cancel?.();
    this.jobRetries.delete(jobId);
    if (this.primary && !this.primary.remove(jobId, tellServer)) this.queueReopen();
    this.probe?.remove(jobId, tellServer);
  }

  /**
   * Accept a state only if it is newer than what we have: the one rule that keeps the UI
   * monotonic. Newer means a higher `seq` of the same epoch; a state of another `epoch` (the
   * store lost the job's history and it was made again or restored) counts from its own
   * seq and is taken if it was written later than the one we have, so a late answer about
   * the old epoch cannot bring it back.
   */
  private accept(job: JobState): void {
    const entry = this.entries.get(job.job_id);
    if (!entry) return;
    const current = entry.snapshot.state;
    const otherEpoch = current !== null && current.epoch !== job.epoch;
    if (otherEpoch ? Date.parse(job.updated_at) <= Date.parse(current.updated_at) : job.seq <= entry.lastSeq) return;
    entry.lastSeq = job.seq;
    entry.snapshot = { state: job, error: null };
    this.jobRetries.get(job.job_id)?.cancel?.();
    this.jobRetries.delete(job.job_id);
    for (const listener of this.stateListeners) safeCall(() => listener(job));
    for (const listener of [...entry.listeners]) safeCall(listener);
    if (isTerminalPhase(job.phase)) {
      // The server ends the subscription after a terminal state; drop it on our side too.
      this.detach(job.job_id, false);
      this.reconcile();
    }
  }

  private onJobError(error: ProgressError & { jobId: string }): void {
    const entry = this.entries.get(error.jobId);
    if (!entry || !this.isActive(entry)) return;
    if (error.code === 'unavailable') {
      // The store is briefly unreachable for this job: ask again later, with backoff.
      const retry = this.jobRetries.get(error.jobId) ?? { attempt: 0, cancel: null };
      const delay = backoffDelay(retry.attempt, this.retry.streamBackoff, this.retry.random);
      retry.attempt += 1;
      retry.cancel = this.timers.after(delay, () => {
        retry.cancel = null;
        if (this.isActive(entry) && this.primary && !this.primary.add(error.jobId)) this.queueReopen();
      });
      this.jobRetries.set(error.jobId, retry);
      return;
    }
    entry.snapshot = { state: entry.snapshot.state, error };
    this.detach(error.jobId, false);
    for (const listener of [...entry.listeners]) safeCall(listener);
    this.reconcile();
  }

  // ---- the link ------------------------------------------------------------------------

  private move(event: LinkEvent): void {
    this.link = transition(this.link, event);
    if (event.type === 'lost' || event.type === 'refused') this.lastError = event.error;
    this.publishConnection();
  }

  /** Open a link if jobs need one, close it if none do. */
  private reconcile(): void {
    if (this.activeJobIds().length === 0) {
      if (this.link.name !== 'idle' && this.link.name !== 'refused') this.goIdle();
      return;
    }
    if (this.link.name === 'idle') {
      this.counters = FRESH;
      this.listenOnline();
      this.connect();
    }
  }

  private goIdle(): void {
    this.generation += 1;
    this.primary?.close();
    this.primary = null;
    this.probe?.close();
    this.probe = null;
    this.timers.clear();
    this.cancelRetry = this.cancelProbe = this.cancelRefresh = null;
    this.jobRetries.clear();
    this.reopenQueued = false;
    this.sseCursor = null;
    this.counters = FRESH;
    this.probeMode = 0;
    this.unlistenOnline();
    this.move({ type: 'idle' });
  }

  /** Connect on the current transport choice, with a token asked for now. */
  private connect(): void {
    const kind = this.retry.modes[this.counters.mode] ?? this.retry.modes[0]!;
    this.move({ type: 'connect', transport: kind });
    const generation = ++this.generation;
    this.withToken(generation, (token) => this.openPrimary(kind, token), (error) => {
      this.handleEnd({ error: { code: 'token', message: `The token function failed: ${describeError(error)}` }, healthyBefore: false, reason: 'failed' });
    });
  }

  private openPrimary(kind: TransportKind, token: string | null): void {
    const jobs = this.activeJobIds();
    if (jobs.length === 0) {
      this.goIdle();
      return;
    }
    const transport = this.createTransport(kind, jobs, token, {
      heard: () => this.onHeard(),
      ended: (end) => {
        this.primary = null;
        this.handleEnd(end);
      },
    });
    this.primary = transport;
    transport.start();
    if (this.onFallback()) this.scheduleProbe();
  }

  /**
   * The set of jobs changed and the link cannot follow in place (the SSE stream's job list is
   * in its URL): open a new one, resuming from the cursor, then close the old one. Coalesced,
   * so ten trackers mounting at once reopen once. Not a failure: the link state stays.
   */
  private queueReopen(): void {
    if (this.reopenQueued) return;
    this.reopenQueued = true;
    queueMicrotask(() => {
      if (!this.reopenQueued) return;
      this.reopenQueued = false;
      const old = this.primary;
      if (!old || this.activeJobIds().length === 0) return;
      const generation = ++this.generation;
      this.withToken(generation, (token) => {
        if (this.primary !== old) return;
        old.close();
        this.primary = null;
        this.openPrimary(old.kind, token);
      }, () => undefined);
    });
  }

  private createTransport(
    kind: TransportKind,
    jobs: string[],
    token: string | null,
    own: Pick<TransportEvents, 'heard' | 'ended'>,
  ): Transport {
    // Callbacks check identity, so a replaced or closed transport is never heard from.
    let self: Transport | null = null;
    const live = () => self !== null && (self === this.primary || self === this.probe);
    const events: TransportEvents = {
      heard: () => live() && own.heard(),
      ended: (end) => live() && own.ended(end),
      state: (job, cursor) => {
        if (!live()) return;
        if (cursor !== undefined && self?.kind === 'sse') this.sseCursor = cursor;
        this.accept(job);
      },
      jobError: (error) => live() && this.onJobError(error),
      authenticated: (expiresAt) => live() && self === this.primary && this.scheduleRefresh(expiresAt),
    };
    switch (kind) {
      case 'websocket':
        self = new WebSocketTransport(this.ctx, events, jobs, token);
        break;
      case 'sse':
        self = new SseTransport(this.ctx, events, jobs, token, this.sseCursor);
        break;
      case 'polling':
        self = new PollingTransport(this.ctx, events, jobs, token);
        break;
    }
    return self;
  }

  private onHeard(): void {
    const recovered = this.link.name === 'connecting' && this.link.error !== null;
    this.counters = heard(this.counters);
    this.move({ type: 'heard' });
    // A fallback that recovers after failing suggests the whole server was away, not that
    // the better transports are blocked: probe them at once instead of waiting.
    if (recovered && this.onFallback()) this.probeNow();
  }

  /** The one place that decides what happens after a link ends. */
  private handleEnd(end: LinkEnd): void {
    this.cancelRefresh?.();
    this.cancelRefresh = null;
    if (end.resync) this.sseCursor = null;
    if (this.activeJobIds().length === 0) {
      this.goIdle();
      return;
    }
    const decision = decide(end, this.counters, this.retry);
    this.counters = decision.counters;
    const error = end.error ?? { code: 'stream_ended', message: 'The server ended the stream; reopening it.' };
    if (decision.action === 'stop') {
      this.generation += 1;
      this.probe?.close();
      this.probe = null;
      this.timers.clear();
      this.cancelRetry = this.cancelProbe = null;
      this.jobRetries.clear();
      this.move({ type: 'refused', error });
      return;
    }
    this.move({ type: 'lost', error });
    if (decision.delayMs <= 0) {
      this.connect();
      return;
    }
    this.cancelRetry = this.timers.after(decision.delayMs, () => {
      this.cancelRetry = null;
      this.connect();
    });
  }

  // ---- moving back up ---------------------------------------------------------------------

  /** On a transport below the first choice, with a link to improve. */
  private onFallback(): boolean {
    return this.counters.mode > 0 && (this.link.name === 'connecting' || this.link.name === 'open' || this.link.name === 'waiting');
  }

  private scheduleProbe(): void {
    if (!this.onFallback() || this.probe || this.cancelProbe) return;
    this.cancelProbe = this.timers.after(this.wsProbeIntervalMs, () => {
      this.cancelProbe = null;
      this.probeNow();
    });
  }

  /**
   * Try a better transport in the background: the first choice (the WebSocket), and, when
   * that fails while polling, the ones between (SSE), in turn. The first probe that hears
   * from the server takes every job over; a failed probe counts towards nothing.
   */
  private probeNow(): void {
    if (!this.onFallback() || this.probe) return;
    this.cancelProbe?.();
    this.cancelProbe = null;
    const mode = Math.min(this.probeMode, this.counters.mode - 1);
    const kind = this.retry.modes[mode]!;
    this.withToken(this.generation, (token) => {
      if (this.probe || !this.onFallback() || mode >= this.counters.mode) return;
      const probe = this.createTransport(kind, this.activeJobIds(), token, {
        heard: () => {
          // It works: move everything onto it (and forget any connect or reopen of the
          // fallback still waiting for its token).
          this.generation += 1;
          const old = this.primary;
          this.primary = probe;
          this.probe = null;
          old?.close();
          this.cancelRetry?.();
          this.cancelRetry = null;
          this.counters = { ...FRESH, mode };
          this.probeMode = 0;
          this.move({ type: 'switch', transport: kind });
          this.scheduleProbe();
        },
        ended: (end) => {
          this.probe = null;
          this.lastError = end.error ?? this.lastError;
          this.publishConnection();
          this.probeMode = mode + 1 < this.counters.mode ? mode + 1 : 0;
          this.scheduleProbe();
        },
      });
      this.probe = probe;
      probe.start();
    }, () => this.scheduleProbe());
  }

  // ---- tokens --------------------------------------------------------------------------

  /**
   * The server said when the token expires: ask the token function for a new one before
   * then and hand it to the open link, so a long job is watched without interruption.
   */
  private scheduleRefresh(expiresAt: number | null): void {
    this.cancelRefresh?.();
    this.cancelRefresh = null;
    if (expiresAt === null || typeof this.tokenSource !== 'function') return;
    const lifetime = expiresAt * 1000 - Date.now();
    this.refreshAfter(Math.max(0, lifetime - Math.min(REFRESH_LEAD_MS, lifetime * REFRESH_LEAD_FRACTION)), expiresAt);
  }

  private refreshAfter(delay: number, expiresAt: number): void {
    this.cancelRefresh = this.timers.after(delay, () => {
      this.cancelRefresh = null;
      const transport = this.primary;
      if (!transport) return;
      this.withToken(this.generation, (token) => {
        if (token && this.primary === transport) transport.reauth(token);
      }, () => {
        // The token function failed: ask again while the token has time left. If it runs
        // out, the server closes with 4401 and the client asks once more then.
        const left = expiresAt * 1000 - Date.now();
        if (this.primary === transport && left > REFRESH_RETRY_MIN_LEFT_MS) this.refreshAfter(Math.min(REFRESH_RETRY_MS, left / 2), expiresAt);
      });
    });
  }

  private async resolveToken(): Promise<string | null> {
    const source = this.tokenSource;
    return typeof source === 'function' ? await source() : source;
  }

  /** Resolve the token, then run `then` unless the client moved on meanwhile. */
  private withToken(generation: number, then: (token: string | null) => void, failed: (error: unknown) => void): void {
    this.resolveToken().then(
      (token) => {
        if (generation === this.generation) then(token);
      },
      (error: unknown) => {
        if (generation === this.generation) failed(error);
      },
    );
  }

  // ---- plumbing ------------------------------------------------------------------------

  // The browser knows when the network comes back before any backoff timer does.
  private readonly handleOnline = () => this.reconnectNow();

  private listenOnline(): void {
    if (this.onlineListening || typeof globalThis.addEventListener !== 'function') return;
    globalThis.addEventListener('online', this.handleOnline);
    this.onlineListening = true;
  }

  private unlistenOnline(): void {
    if (!this.onlineListening) return;
    globalThis.removeEventListener('online', this.handleOnline);
    this.onlineListening = false;
  }

  private publishConnection(): void {
    const next = connectionInfo(this.link, this.lastError);
    const current = this.connection;
    if (current.status === next.status && current.transport === next.transport && current.error === next.error && current.lastError === next.lastError) return;
    this.connection = Object.freeze(next);
    for (const listener of [...this.connectionListeners]) safeCall(listener);
  }
}

function positive(value: number, name: string): number {
  if (!(value > 0) || !Number.isFinite(value)) throw new RangeError(`ProgressClient option ${name} must be a positive number, got ${value}`);
  return value;
}

function safeCall(fn: () => void): void {
  try {
    fn();
  } catch (error) {
    // One broken listener must not stop the others; surface it without breaking the loop.
    queueMicrotask(() => {
      throw error;
    });
  }
}
