// Stand-ins for the browser's WebSocket and EventSource, driven by the tests. They record
// what the client sends and let a test play the server's part frame by frame.
import { vi } from 'vitest';
import type { JobState, Phase } from '../src/client/types';

type Listener = (event: never) => void;

class FakeEmitter {
  private readonly listeners = new Map<string, Set<Listener>>();
  addEventListener(type: string, listener: Listener): void {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type)!.add(listener);
  }
  protected emit(type: string, event: object): void {
    for (const listener of this.listeners.get(type) ?? []) (listener as (e: object) => void)(event);
  }
}

export class FakeWebSocket extends FakeEmitter {
  static instances: FakeWebSocket[] = [];
  static reset(): void {
    FakeWebSocket.instances = [];
  }
  static get last(): FakeWebSocket {
    const socket = FakeWebSocket.instances.at(-1);
    if (!socket) throw new Error('no WebSocket was created');
    return socket;
  }

  readyState = 0;
  readonly sent: Record<string, unknown>[] = [];
  closedByClient: { code?: number; reason?: string } | null = null;

  constructor(readonly url: string) {
    super();
    FakeWebSocket.instances.push(this);
  }

  send(data: string): void {
    if (this.readyState !== 1) throw new Error('send() on a socket that is not open');
    this.sent.push(JSON.parse(data) as Record<string, unknown>);
  }

  close(code?: number, reason?: string): void {
    this.closedByClient = { code, reason };
    this.readyState = 3;
  }

  // ---- the server's side ----
  open(): void {
    this.readyState = 1;
    this.emit('open', {});
  }
  receive(message: object): void {
    this.emit('message', { data: JSON.stringify(message) });
  }
  state(job: JobState): void {
    this.receive({ type: 'state', job });
  }
  serverClose(code = 1006, reason = ''): void {
    this.readyState = 3;
    this.emit('error', {});
    this.emit('close', { code, reason });
  }
  get params(): URLSearchParams {
    return new URL(this.url).searchParams;
  }
  subscriptions(): Record<string, unknown>[] {
    return this.sent.filter((message) => message.op === 'subscribe');
  }
}

export class FakeEventSource extends FakeEmitter {
  static instances: FakeEventSource[] = [];
  static reset(): void {
    FakeEventSource.instances = [];
  }
  static get last(): FakeEventSource {
    const source = FakeEventSource.instances.at(-1);
    if (!source) throw new Error('no EventSource was created');
    return source;
  }
  static live(): FakeEventSource[] {
    return FakeEventSource.instances.filter((source) => !source.closed);
  }

  closed = false;
  /** As a browser's: 0 connecting, 1 open, 2 closed for good. */
  readyState = 0;
  constructor(readonly url: string) {
    super();
    FakeEventSource.instances.push(this);
  }
  close(): void {
    this.closed = true;
    this.readyState = 2;
  }
  open(): void {
    this.readyState = 1;
    this.emit('open', {});
  }
  /**
   * The server answered without a stream (an HTTP error, or 204 No Content): a browser's
   * EventSource closes for good and fires `error`, whatever the status.
   */
  refuse(): void {
    this.readyState = 2;
    this.emit('error', {});
  }
  /** `cursor`: the multiplexed stream's opaque event id. */
  state(job: JobState, cursor = `cursor-${job.job_id}-${job.seq}`): void {
    this.emit('state', { data: JSON.stringify(job), lastEventId: cursor });
  }
  /** The EventSource's own network error (no data); it would reconnect by itself. */
  fail(): void {
    this.readyState = 0;
    this.emit('error', {});
  }
  /** The server's `event: error` about one job (a MessageEvent with data). */
  jobError(jobId: string, code: string, message = `${code}: ${jobId}`): void {
    this.emit('error', { data: JSON.stringify({ job_id: jobId, code, message }) });
  }
  expired(): void {
    this.emit('expired', { data: JSON.stringify({ code: 'token_expired', message: 'the token has expired' }) });
  }
  end(): void {
    this.emit('end', { data: JSON.stringify({ message: 'every job has ended' }) });
  }
  jobs(): string[] {
    return new URL(this.url).searchParams.getAll('job');
  }
  get params(): URLSearchParams {
    return new URL(this.url).searchParams;
  }
}

export class ThrowingWebSocket {
  static attempts = 0;
  constructor() {
    ThrowingWebSocket.attempts += 1;
    throw new Error('WebSocket is disabled by policy');
  }
}

const BASE = Date.parse('2026-11-29T04:10:00.000Z');
const at = (seconds: number) => new Date(BASE + seconds * 1000).toISOString();

/** A protocol-shaped job state; override what the test cares about. */
export function job(overrides: Partial<JobState> & { seq: number }, jobId = 'comic-1'): JobState {
  const phase: Phase = overrides.phase ?? 'GENERATING';
  return {
    job_id: jobId,
    owner: 'alice',
    kind: 'comic',
    phase,
    phase_progress: 0,
    progress: 0,
    message: '',
    eta_seconds: null,
    epoch: 'e1',
    created_at: at(0),
    updated_at: at(overrides.seq),
    phases: {},
    steps: {},
    steps_total: null,
    error: null,
    metadata: {},
    ...overrides,
  };
}

export { at };

/** A fetch mock answering GET /v1/jobs/{id} from a table the test updates. */
export function fakeFetch(answer: (url: string, init?: RequestInit) => Response | Error) {
  return vi.fn(async (url: string, init?: RequestInit) => {
    const result = answer(url, init);
    if (result instanceof Error) throw result;
    return result;
  });
}

export function jsonResponse(body: unknown, status = 200): Response {
  return new Response(JSON.stringify(body), { status, headers: { 'Content-Type': 'application/json' } });
}
