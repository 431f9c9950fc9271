import { backoffDelay, DEFAULT_BACKOFF, validateBackoff, type BackoffOptions } from './backoff';
import { PollingTransport } from './pollingTransport';
import { SseTransport } from './sseTransport';
import { TimerSet } from './timers';
import type {
  EventSourceFactory,
  FailureInfo,
  FetchLike,
  Transport,
  TransportContext,
  TransportHandlers,
  WebSocketFactory,
} from './transport';
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
  /** Bearer token with `jobs:read`, or a function returning a fresh one for every connection. */
  token?: TokenSource;
  /** Reconnect backoff (full jitter). Default `{ baseMs: 500, capMs: 30000 }`. */
  backoff?: Partial<BackoffOptions>;
  /** Reconnect when the WebSocket is silent this long. The server pings every 15 s. Default 35000. */
  pingTimeoutMs?: number;
  /** WebSocket connects that fail in a row before switching to SSE. Default 3. */
  wsFailuresBeforeFallback?: number;
  /** SSE streams that fail to open in a row before switching to polling. Default 3. */
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
const CLOSED: ConnectionInfo = Object.freeze({ status: 'closed', transport: null, error: null, lastError: null });
const ALL_TRANSPORTS: TransportKind[] = ['websocket', 'sse', 'polling'];

/**
 * Watches any number of jobs over one link and keeps the newest state of each.
 *
 * Prefers one WebSocket for everything; after repeated connect failures it falls back to
 * SSE, then to polling, and keeps probing the WebSocket to move back. States are accepted
 * only when their `seq` is newer than the last one seen, so a reconnect, an overlap
 * between transports or a late poll can never move a job backwards.
 *
 * `close()` drops every subscription and stops every timer; the client may be used again
 * afterwards (a later `subscribe` reconnects), which keeps React StrictMode remounts simple.
 */
export class ProgressClient {
  private readonly options: Required<Pick<ProgressClientOptions,
    'pingTimeoutMs' | 'wsFailuresBeforeFallback' | 'sseFailuresBeforePolling' | 'wsProbeIntervalMs' | 'pollIntervalMs'>>;
  private readonly ctx: TransportContext;
  private readonly modes: TransportKind[];
  private tokenSource: TokenSource;
  private readonly timers = new TimerSet();
  private readonly entries = new Map<string, Entry>();
  private readonly connectionListeners = new Set<() => void>();
  private readonly stateListeners = new Set<(job: JobState) => void>();
  private connection: ConnectionInfo = CLOSED;

  private modeIndex = 0;
  private primary: Transport | null = null;
  private probe: WebSocketTransport | null = null;
  /** Connect failures in a row on the current transport (drops of a working link do not count). */
  private failures = 0;
  private attempt = 0;
  private everHealthy = false;
  /** Set while the current transport is failing, so its recovery can trigger a WebSocket probe. */
  private failing = false;
  private fatal: ProgressError | null = null;
  private cancelReconnect: (() => void) | null = null;
  private cancelProbe: (() => void) | null = null;
  private onlineListening = false;

  constructor(options: ProgressClientOptions = {}) {
    const baseUrl = options.baseUrl ?? globalThis.location?.origin;
    if (!baseUrl) {
      throw new TypeError('ProgressClient needs a baseUrl outside a browser page, e.g. new ProgressClient({ baseUrl: "https://progress.example.com" }).');
    }
    this.tokenSource = options.token ?? null;
    this.options = {
      pingTimeoutMs: positive(options.pingTimeoutMs ?? 35_000, 'pingTimeoutMs'),
      wsFailuresBeforeFallback: positive(options.wsFailuresBeforeFallback ?? 3, 'wsFailuresBeforeFallback'),
      sseFailuresBeforePolling: positive(options.sseFailuresBeforePolling ?? 3, 'sseFailuresBeforePolling'),
      wsProbeIntervalMs: positive(options.wsProbeIntervalMs ?? 20_000, 'wsProbeIntervalMs'),
      pollIntervalMs: positive(options.pollIntervalMs ?? 2_000, 'pollIntervalMs'),
    };
    this.ctx = {
      baseUrl: baseUrl.replace(/\/+$/, ''),
      token: () => this.resolveToken(),
      since: (jobId) => this.entries.get(jobId)?.lastSeq ?? 0,
      timers: this.timers,
      random: options.random ?? Math.random,
      pingTimeoutMs: this.options.pingTimeoutMs,
      streamBackoff: validateBackoff({ ...DEFAULT_BACKOFF, ...options.backoff }, 'backoff'),
      pollBackoff: validateBackoff({ baseMs: 1_000, capMs: 30_000, ...options.pollBackoff }, 'pollBackoff'),
      pollIntervalMs: this.options.pollIntervalMs,
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
    this.modes = modes;
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
    if (this.fatal) {
      this.fatal = null;
      this.failures = 0;
      this.attempt = 0;
      this.reconcile();
    }
  }

  /** Skip the current backoff wait and try now (the client also does this on `online`). */
  reconnectNow(): void {
    if (this.fatal) return;
    if (this.cancelReconnect) {
      this.cancelReconnect();
      this.cancelReconnect = null;
      this.attempt = 0;
      this.start();
      return;
    }
    this.primary?.retryNow();
    if (this.isOnFallback()) this.probeNow();
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
    this.teardownLink();
    this.entries.clear();
    this.fatal = null;
    this.everHealthy = false;
    this.setConnection(CLOSED);
  }

  // ---- jobs ----------------------------------------------------------------------------

  private isActive(entry: Entry): boolean {
    return entry.listeners.size > 0 && entry.snapshot.error === null && !isTerminalPhase(entry.snapshot.state?.phase);
  }

  private activeJobIds(): string[] {
    return [...this.entries.values()].filter((entry) => this.isActive(entry)).map((entry) => entry.jobId);
  }

  private attach(jobId: string): void {
    if (this.primary) {
      this.primary.add(jobId);
      this.probe?.add(jobId);
    } else {
      this.reconcile();
    }
  }

  private release(entry: Entry): void {
    if (entry.listeners.size > 0 || this.entries.get(entry.jobId) !== entry) return;
    const wasWatched = entry.snapshot.error === null && !isTerminalPhase(entry.snapshot.state?.phase);
    this.entries.delete(entry.jobId);
    if (wasWatched) this.detach(entry.jobId, true);
    this.reconcile();
  }

  private detach(jobId: string, tellServer: boolean): void {
    this.primary?.remove(jobId, tellServer);
    this.probe?.remove(jobId, tellServer);
  }

  /** Accept a state only if it is newer than what we have: the one rule that keeps the UI monotonic. */
  private accept(job: JobState): void {
    const entry = this.entries.get(job.job_id);
    if (!entry || job.seq <= entry.lastSeq) return;
    entry.lastSeq = job.seq;
    entry.snapshot = { state: job, error: null };
    for (const listener of this.stateListeners) safeCall(() => listener(job));
    for (const listener of [...entry.listeners]) safeCall(listener);
    if (isTerminalPhase(job.phase)) {
      // The server ends the subscription after a terminal state; drop it on our side too.
      this.detach(job.job_id, false);
      this.reconcile();
    }
  }

  private rejectJob(error: ProgressError & { jobId: string }): void {
    const entry = this.entries.get(error.jobId);
    if (!entry) return;
    entry.snapshot = { state: entry.snapshot.state, error };
    this.detach(error.jobId, false);
    for (const listener of [...entry.listeners]) safeCall(listener);
    this.reconcile();
  }

  // ---- link management -----------------------------------------------------------------

  /** Open a link if jobs need one, close it if none do. */
  private reconcile(): void {
    if (this.activeJobIds().length === 0) {
      if (this.primary || this.probe || this.cancelReconnect) {
        this.teardownLink();
        this.failures = 0;
        this.attempt = 0;
        this.modeIndex = 0;
        // Idle is a fresh start: the next job connects, it does not "reconnect".
        this.failing = false;
        this.everHealthy = false;
        this.setConnection({ ...this.connection, status: 'closed', transport: null, error: this.fatal });
      }
      return;
    }
    if (!this.primary && !this.cancelReconnect && !this.fatal) this.start();
  }

  private start(): void {
    const jobs = this.activeJobIds();
    if (jobs.length === 0) return;
    const kind = this.modes[this.modeIndex] ?? this.modes[0]!;
    this.listenOnline();
    const transport = this.createTransport(kind, jobs, false);
    this.primary = transport;
    if (kind === 'websocket') {
      this.setConnection({ ...this.connection, status: this.failing ? 'reconnecting' : 'connecting', transport: kind });
    } else {
      this.setConnection({ ...this.connection, status: 'fallback', transport: kind });
      this.scheduleProbe();
    }
  }

  private createTransport(kind: TransportKind, jobs: string[], isProbe: boolean): Transport {
    // Handlers check identity so callbacks from a replaced transport are ignored.
    let self: Transport | null = null;
    const handlers: TransportHandlers = {
      state: (job) => this.accept(job),
      jobError: (error) => this.rejectJob(error),
      healthy: () => self && this.onHealthy(self),
      failure: (error, info) => self && this.onFailure(self, error, info),
    };
    switch (kind) {
      case 'websocket':
        self = new WebSocketTransport(this.ctx, handlers, jobs);
        break;
      case 'sse':
        self = new SseTransport(this.ctx, handlers, jobs);
        break;
      case 'polling':
        self = new PollingTransport(this.ctx, handlers, jobs);
        break;
    }
    if (isProbe) this.probe = self as WebSocketTransport;
    return self;
  }

  private onHealthy(transport: Transport): void {
    if (transport === this.probe) {
      // The WebSocket works again: move everything back onto it.
      const old = this.primary;
      this.primary = transport;
      this.probe = null;
      this.cancelProbe?.();
      this.cancelProbe = null;
      old?.close();
      this.modeIndex = 0;
    } else if (transport !== this.primary) {
      return;
    }
    const recovered = this.failing;
    this.failing = false;
    this.failures = 0;
    this.attempt = 0;
    this.everHealthy = true;
    const kind = transport.kind;
    this.setConnection({ ...this.connection, status: kind === 'websocket' ? 'open' : 'fallback', transport: kind, error: null });
    // A fallback that recovers after failing suggests the whole server was away, not that
    // WebSockets are blocked: try the WebSocket at once instead of waiting for the probe.
    if (recovered && kind !== 'websocket') this.probeNow();
  }

  private onFailure(transport: Transport, error: ProgressError, info: FailureInfo): void {
    if (transport === this.probe) {
      this.probe = null;
      this.setConnection({ ...this.connection, lastError: error });
      if (info.fatal) this.enterFatal(error);
      else this.scheduleProbe();
      return;
    }
    if (transport !== this.primary) return;
    this.failing = true;
    this.setConnection({ ...this.connection, error, lastError: error });
    if (info.fatal) {
      this.enterFatal(error);
      return;
    }
    if (!info.healthyBefore) this.failures += 1;
    const next = this.modeIndex + 1 < this.modes.length ? this.modeIndex + 1 : null;
    switch (transport.kind) {
      case 'websocket':
        this.primary = null;
        if (next !== null && this.failures >= this.options.wsFailuresBeforeFallback) {
          this.switchMode(next);
        } else {
          this.setConnection({ ...this.connection, status: 'reconnecting' });
          this.scheduleReconnect();
        }
        break;
      case 'sse':
        // The SSE transport restarts its own streams; we only decide when to give up on it.
        if (next !== null && this.failures >= this.options.sseFailuresBeforePolling) this.switchMode(next);
        break;
      case 'polling':
        // Polling retries by itself with backoff; nothing further to fall back to.
        break;
    }
  }

  private scheduleReconnect(): void {
    const delay = backoffDelay(this.attempt, this.ctx.streamBackoff, this.ctx.random);
    this.attempt += 1;
    this.cancelReconnect = this.timers.after(delay, () => {
      this.cancelReconnect = null;
      this.start();
    });
  }

  private switchMode(index: number): void {
    this.primary?.close();
    this.primary = null;
    this.cancelReconnect?.();
    this.cancelReconnect = null;
    this.modeIndex = index;
    this.failures = 0;
    this.attempt = 0;
    this.start();
  }

  private enterFatal(error: ProgressError): void {
    this.fatal = error;
    this.teardownLink();
    this.setConnection({ status: 'closed', transport: null, error, lastError: error });
  }

  private isOnFallback(): boolean {
    return this.modes[0] === 'websocket' && this.modeIndex > 0 && this.primary !== null;
  }

  private scheduleProbe(): void {
    if (!this.isOnFallback() || this.probe || this.cancelProbe) return;
    this.cancelProbe = this.timers.after(this.options.wsProbeIntervalMs, () => {
      this.cancelProbe = null;
      this.probeNow();
    });
  }

  private probeNow(): void {
    if (!this.isOnFallback() || this.probe) return;
    this.cancelProbe?.();
    this.cancelProbe = null;
    this.createTransport('websocket', this.activeJobIds(), true);
  }

  private teardownLink(): void {
    this.primary?.close();
    this.primary = null;
    this.probe?.close();
    this.probe = null;
    this.cancelReconnect = null;
    this.cancelProbe = null;
    this.timers.clear();
    this.unlistenOnline();
  }

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

  private setConnection(next: ConnectionInfo): void {
    const current = this.connection;
    if (current.status === next.status && current.transport === next.transport && current.error === next.error && current.lastError === next.lastError) return;
    this.connection = Object.freeze({ ...next });
    for (const listener of [...this.connectionListeners]) safeCall(listener);
  }

  private async resolveToken(): Promise<string | null> {
    const source = this.tokenSource;
    return typeof source === 'function' ? await source() : source;
  }

  /** For tests and debugging: how many timers are pending. */
  get pendingTimers(): number {
    return this.timers.size;
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
