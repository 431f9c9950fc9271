import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { backoffCeiling, backoffDelay } from '../src/client/backoff';
import { ProgressClient, type ProgressClientOptions } from '../src/client/ProgressClient';
import type { FetchLike } from '../src/client/transport';
import { fakeFetch, FakeEventSource, FakeWebSocket, job, jsonResponse, ThrowingWebSocket } from './fakes';

const settle = () => vi.advanceTimersByTimeAsync(0);

function makeClient(options: ProgressClientOptions = {}): ProgressClient {
  return new ProgressClient({
    baseUrl: 'http://phasecast.test',
    token: 'tok',
    random: () => 0.5,
    WebSocket: FakeWebSocket,
    EventSource: FakeEventSource,
    fetch: fakeFetch(() => new Error('network down')) as unknown as FetchLike,
    ...options,
  });
}

/** Subscribe and record every snapshot the listener sees. */
function watch(client: ProgressClient, jobId: string) {
  const seen: number[] = [];
  const stop = client.subscribe(jobId, () => {
    const state = client.getJob(jobId).state;
    if (state) seen.push(state.seq);
  });
  return { seen, stop };
}

async function connectedSocket(): Promise<FakeWebSocket> {
  await settle();
  const socket = FakeWebSocket.last;
  socket.open();
  socket.receive({ type: 'subscribed', job_id: 'comic-1' });
  return socket;
}

beforeEach(() => {
  vi.useFakeTimers();
  FakeWebSocket.reset();
  FakeEventSource.reset();
  ThrowingWebSocket.attempts = 0;
});

afterEach(() => {
  vi.useRealTimers();
});

describe('backoff', () => {
  it('doubles the ceiling from base up to the cap', () => {
    const options = { baseMs: 500, capMs: 8_000 };
    expect([0, 1, 2, 3, 4, 5, 6].map((n) => backoffCeiling(n, options))).toEqual([500, 1000, 2000, 4000, 8000, 8000, 8000]);
  });

  it('draws a full-jitter delay anywhere from 0 up to the ceiling', () => {
    const options = { baseMs: 500, capMs: 8_000 };
    expect(backoffDelay(3, options, () => 0)).toBe(0);
    expect(backoffDelay(3, options, () => 0.5)).toBe(2000);
    expect(backoffDelay(3, options, () => 0.999999)).toBe(3999);
    expect(backoffCeiling(10_000, options)).toBe(8000);
  });

  it('waits the jittered delays between WebSocket reconnects', async () => {
    const client = makeClient({ backoff: { baseMs: 1000, capMs: 4000 }, wsFailuresBeforeFallback: 10, random: () => 0.999 });
    watch(client, 'comic-1');
    await settle();
    expect(FakeWebSocket.instances).toHaveLength(1);
    const gaps: number[] = [];
    for (let attempt = 0; attempt < 4; attempt += 1) {
      FakeWebSocket.last.serverClose(1006);
      const before = FakeWebSocket.instances.length;
      let waited = 0;
      while (FakeWebSocket.instances.length === before) {
        await vi.advanceTimersByTimeAsync(1);
        waited += 1;
      }
      gaps.push(waited);
    }
    // random()≈1 picks the top of each window: 1000, 2000, 4000, then the cap.
    expect(gaps).toEqual([999, 1998, 3996, 3996]);
    expect(client.getConnection().status).toBe('reconnecting');
    client.close();
  });
});

describe('ProgressClient over WebSocket', () => {
  it('connects once with the token in the query and subscribes every job', async () => {
    const client = makeClient();
    watch(client, 'comic-1');
    watch(client, 'comic-2');
    await settle();
    expect(FakeWebSocket.instances).toHaveLength(1);
    const socket = FakeWebSocket.last;
    expect(socket.url).toBe('ws://phasecast.test/v1/ws?access_token=tok');
    expect(client.getConnection()).toMatchObject({ status: 'connecting', transport: 'websocket' });
    socket.open();
    expect(socket.subscriptions()).toEqual([
      { op: 'subscribe', job_id: 'comic-1' },
      { op: 'subscribe', job_id: 'comic-2' },
    ]);
    socket.receive({ type: 'subscribed', job_id: 'comic-1' });
    expect(client.getConnection()).toMatchObject({ status: 'open', transport: 'websocket', error: null });
    client.close();
  });

  it('accepts only states newer than the last seq: no duplicates, never backwards', async () => {
    const client = makeClient();
    const { seen } = watch(client, 'comic-1');
    const socket = await connectedSocket();
    for (const seq of [3, 2, 3, 5, 4, 5, 6]) socket.state(job({ seq, progress: seq * 10 }));
    expect(seen).toEqual([3, 5, 6]);
    expect(client.getJob('comic-1').state?.progress).toBe(60);
    client.close();
  });

  it('ignores states of jobs nobody watches', async () => {
    const client = makeClient();
    const all: string[] = [];
    client.onState((state) => all.push(state.job_id));
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    socket.state(job({ seq: 1 }, 'someone-else'));
    socket.state(job({ seq: 1 }));
    expect(all).toEqual(['comic-1']);
    client.close();
  });

  it('reconnects after a drop and resubscribes each job with its since', async () => {
    const client = makeClient();
    watch(client, 'comic-1');
    watch(client, 'comic-2');
    const first = await connectedSocket();
    first.state(job({ seq: 4 }));
    first.state(job({ seq: 9 }, 'comic-2'));
    first.serverClose(1012, 'restarting');
    expect(client.getConnection()).toMatchObject({ status: 'reconnecting' });
    expect(client.getConnection().error?.code).toBe('server_restart');
    await vi.advanceTimersByTimeAsync(250); // random 0.5 × base 500
    expect(FakeWebSocket.instances).toHaveLength(2);
    const second = FakeWebSocket.last;
    second.open();
    expect(second.subscriptions()).toEqual([
      { op: 'subscribe', job_id: 'comic-1', since: 4, epoch: 'e1' },
      { op: 'subscribe', job_id: 'comic-2', since: 9, epoch: 'e1' },
    ]);
    second.receive({ type: 'subscribed', job_id: 'comic-1' });
    expect(client.getConnection()).toMatchObject({ status: 'open', error: null });
    expect(client.getConnection().lastError?.code).toBe('server_restart');
    client.close();
  });

  it('treats silence longer than pingTimeoutMs as a dead link', async () => {
    const client = makeClient({ pingTimeoutMs: 20_000 });
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    await vi.advanceTimersByTimeAsync(15_000);
    socket.receive({ type: 'ping' }); // a ping re-arms the timer
    await vi.advanceTimersByTimeAsync(19_000);
    expect(socket.closedByClient).toBeNull();
    await vi.advanceTimersByTimeAsync(1_000);
    expect(socket.closedByClient).not.toBeNull();
    expect(client.getConnection().error?.code).toBe('dead_link');
    await vi.advanceTimersByTimeAsync(250);
    expect(FakeWebSocket.instances).toHaveLength(2);
    client.close();
  });

  it('does not resubscribe finished jobs and closes the link when all have ended', async () => {
    const client = makeClient();
    watch(client, 'comic-1');
    watch(client, 'comic-2');
    const socket = await connectedSocket();
    socket.state(job({ seq: 7, phase: 'COMPLETE', progress: 100 }));
    expect(socket.closedByClient).toBeNull();
    socket.serverClose(1006);
    await vi.advanceTimersByTimeAsync(250);
    const again = FakeWebSocket.last;
    again.open();
    expect(again.subscriptions()).toEqual([{ op: 'subscribe', job_id: 'comic-2' }]);
    again.state(job({ seq: 3, phase: 'CANCELLED' }, 'comic-2'));
    expect(again.closedByClient).not.toBeNull();
    expect(client.getConnection().status).toBe('closed');
    expect(client.pendingTimers).toBe(0);
    client.close();
  });

  it('a job started after an idle gap connects afresh: no "reconnecting" flash', async () => {
    const client = makeClient();
    const statuses: string[] = [];
    client.onConnectionChange(() => statuses.push(client.getConnection().status));
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    socket.state(job({ seq: 2, phase: 'COMPLETE', progress: 100 }));
    expect(client.getConnection().status).toBe('closed');
    statuses.length = 0;
    watch(client, 'comic-2');
    await settle();
    FakeWebSocket.last.open();
    FakeWebSocket.last.receive({ type: 'subscribed', job_id: 'comic-2' });
    expect(statuses).toEqual(['connecting', 'open']);
    client.close();
  });

  it('unsubscribing the last job sends unsubscribe and closes the socket', async () => {
    const client = makeClient();
    const a = watch(client, 'comic-1');
    const b = watch(client, 'comic-2');
    const socket = await connectedSocket();
    a.stop();
    await settle();
    expect(socket.sent.at(-1)).toEqual({ op: 'unsubscribe', job_id: 'comic-1' });
    expect(socket.closedByClient).toBeNull();
    b.stop();
    await settle();
    expect(socket.sent.at(-1)).toEqual({ op: 'unsubscribe', job_id: 'comic-2' });
    expect(socket.closedByClient).not.toBeNull();
    expect(client.getConnection().status).toBe('closed');
    expect(client.pendingTimers).toBe(0);
  });

  it('close() stops every timer, even a pending reconnect', async () => {
    const client = makeClient();
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    socket.serverClose(1006);
    expect(client.pendingTimers).toBeGreaterThan(0);
    client.close();
    expect(client.pendingTimers).toBe(0);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(FakeWebSocket.instances).toHaveLength(1);
    expect(client.getConnection().status).toBe('closed');
  });

  it('stops on a refused token and starts again after setToken', async () => {
    const client = makeClient();
    watch(client, 'comic-1');
    await settle();
    FakeWebSocket.last.serverClose(4401, 'token expired');
    expect(client.getConnection()).toMatchObject({ status: 'closed', transport: null });
    expect(client.getConnection().error?.code).toBe('unauthorized');
    expect(client.getConnection().error?.message).toMatch(/setToken/);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(FakeWebSocket.instances).toHaveLength(1);
    client.setToken('fresh');
    await settle();
    expect(FakeWebSocket.instances).toHaveLength(2);
    expect(FakeWebSocket.last.params.get('access_token')).toBe('fresh');
    client.close();
  });

  it('reports a job the server refuses and keeps watching the others', async () => {
    const client = makeClient();
    watch(client, 'comic-1');
    watch(client, 'missing');
    const socket = await connectedSocket();
    socket.receive({ type: 'error', job_id: 'missing', code: 'not_found', message: 'no such job' });
    expect(client.getJob('missing').error).toMatchObject({ code: 'not_found', jobId: 'missing' });
    socket.state(job({ seq: 2 }));
    expect(client.getJob('comic-1').state?.seq).toBe(2);
    socket.serverClose(1006);
    await vi.advanceTimersByTimeAsync(250);
    FakeWebSocket.last.open();
    expect(FakeWebSocket.last.subscriptions()).toEqual([{ op: 'subscribe', job_id: 'comic-1', since: 2, epoch: 'e1' }]);
    client.close();
  });

  it('rejects a malformed job id locally with a helpful message', () => {
    const client = makeClient();
    watch(client, 'bad id!');
    expect(client.getJob('bad id!').error?.message).toMatch(/not a valid job_id/);
    expect(client.getConnection().status).toBe('closed');
    client.close();
  });

  it('reconnects at once when the browser comes back online', async () => {
    const client = makeClient({ backoff: { baseMs: 10_000, capMs: 60_000 } });
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    socket.serverClose(1006);
    await settle();
    expect(FakeWebSocket.instances).toHaveLength(1);
    window.dispatchEvent(new Event('online'));
    await settle();
    expect(FakeWebSocket.instances).toHaveLength(2);
    client.close();
  });
});

describe('fallback to SSE and polling', () => {
  async function failWebSocket(times: number) {
    for (let n = 0; n < times; n += 1) {
      await settle();
      FakeWebSocket.last.serverClose(1006);
      await vi.advanceTimersByTimeAsync(2_000);
    }
  }

  it('switches to SSE after repeated WebSocket connect failures, resuming from the last seq', async () => {
    const client = makeClient();
    const { seen } = watch(client, 'comic-1');
    const socket = await connectedSocket();
    socket.state(job({ seq: 5 }));
    socket.serverClose(1006); // a drop of a working link does not count
    await vi.advanceTimersByTimeAsync(250);
    await failWebSocket(3);
    expect(FakeWebSocket.instances).toHaveLength(4);
    expect(client.getConnection()).toMatchObject({ status: 'fallback', transport: 'sse' });
    const [source] = FakeEventSource.live();
    expect(source?.url).toBe('http://phasecast.test/v1/events?job=comic-1&access_token=tok');
    source!.open();
    source!.state(job({ seq: 5 }));
    source!.state(job({ seq: 6, phase: 'POST_PROCESSING' }));
    expect(seen).toEqual([5, 6]);
    expect(client.getConnection().error).toBeNull();
    client.close();
    expect(FakeEventSource.live()).toHaveLength(0);
  });

  it('counts a socket that opens and closes without a word as a failure (proxy that kills upgrades)', async () => {
    const client = makeClient();
    watch(client, 'comic-1');
    for (let n = 0; n < 3; n += 1) {
      await settle();
      FakeWebSocket.last.open();
      FakeWebSocket.last.serverClose(1005);
      await vi.advanceTimersByTimeAsync(2_000);
    }
    expect(client.getConnection().transport).toBe('sse');
    client.close();
  });

  it('uses SSE straight away when constructing a WebSocket throws', async () => {
    const client = makeClient({ WebSocket: ThrowingWebSocket as never, wsFailuresBeforeFallback: 2 });
    watch(client, 'comic-1');
    await vi.advanceTimersByTimeAsync(1_000);
    expect(ThrowingWebSocket.attempts).toBe(2);
    expect(client.getConnection().transport).toBe('sse');
    expect(client.getConnection().lastError?.code).toBe('ws_blocked');
    client.close();
  });

  it('probes the WebSocket in the background and moves back when it works', async () => {
    const client = makeClient({ wsProbeIntervalMs: 5_000 });
    const { seen } = watch(client, 'comic-1');
    await failWebSocket(3);
    const source = FakeEventSource.live()[0]!;
    source.open();
    source.state(job({ seq: 3 }));
    const socketsBefore = FakeWebSocket.instances.length;
    await vi.advanceTimersByTimeAsync(5_000);
    expect(FakeWebSocket.instances.length).toBe(socketsBefore + 1);
    const probe = FakeWebSocket.last;
    probe.open();
    expect(probe.subscriptions()).toEqual([{ op: 'subscribe', job_id: 'comic-1', since: 3, epoch: 'e1' }]);
    probe.receive({ type: 'subscribed', job_id: 'comic-1' });
    expect(client.getConnection()).toMatchObject({ status: 'open', transport: 'websocket' });
    expect(source.closed).toBe(true);
    probe.state(job({ seq: 4 }));
    expect(seen).toEqual([3, 4]);
    client.close();
  });

  it('falls back to polling when SSE fails too, with auth header and backoff', async () => {
    let answer: () => Response | Error = () => new Error('connection refused');
    const fetch = fakeFetch(() => answer());
    const client = makeClient({ fetch: fetch as unknown as FetchLike, wsProbeIntervalMs: 600_000, pollIntervalMs: 1_000 });
    const { seen } = watch(client, 'comic-1');
    await failWebSocket(3);
    for (let n = 0; n < 3; n += 1) {
      await settle();
      FakeEventSource.live()[0]!.fail();
      if (n < 2) await vi.advanceTimersByTimeAsync(2_000);
    }
    await settle(); // the first poll goes out at once, and fails
    expect(client.getConnection()).toMatchObject({ status: 'fallback', transport: 'polling' });
    expect(FakeEventSource.live()).toHaveLength(0);
    expect(fetch.mock.calls).toHaveLength(1);
    const [url, init] = fetch.mock.calls[0]!;
    expect(url).toBe('http://phasecast.test/v1/jobs/comic-1');
    expect(new Headers(init?.headers).get('Authorization')).toBe('Bearer tok');

    // Failures back off: 500, 1000, 2000… (random 0.5 × pollBackoff base 1000 doubling).
    const before = fetch.mock.calls.length;
    await vi.advanceTimersByTimeAsync(499);
    expect(fetch.mock.calls.length).toBe(before);
    await vi.advanceTimersByTimeAsync(1);
    expect(fetch.mock.calls.length).toBe(before + 1);
    await vi.advanceTimersByTimeAsync(999);
    expect(fetch.mock.calls.length).toBe(before + 1);
    await vi.advanceTimersByTimeAsync(1);
    expect(fetch.mock.calls.length).toBe(before + 2);

    answer = () => jsonResponse(job({ seq: 8, progress: 80 }));
    await vi.advanceTimersByTimeAsync(2_000);
    expect(seen).toEqual([8]);
    expect(client.getConnection().error).toBeNull();
    // Polling recovering after failures means the server was away: try the WebSocket now.
    expect(FakeWebSocket.instances).toHaveLength(4);
    client.close();
    expect(client.pendingTimers).toBe(0);
  });

  it('polling marks a missing job and stops asking for it', async () => {
    const fetch = fakeFetch(() => jsonResponse({ error: { code: 'not_found', message: 'no job gone' } }, 404));
    const client = makeClient({ transports: ['polling'], fetch: fetch as unknown as FetchLike });
    watch(client, 'gone');
    await settle();
    expect(client.getJob('gone').error).toMatchObject({ code: 'not_found', status: 404 });
    const calls = fetch.mock.calls.length;
    await vi.advanceTimersByTimeAsync(30_000);
    expect(fetch.mock.calls.length).toBe(calls);
    expect(client.getConnection().status).toBe('closed');
    client.close();
  });

  it('cancel() posts to the cancel endpoint and applies the returned state', async () => {
    const fetch = fakeFetch((url, init) =>
      url.endsWith('/cancel') && init?.method === 'POST'
        ? jsonResponse({ applied: true, state: job({ seq: 12, phase: 'CANCELLED' }) })
        : new Error('unexpected'),
    );
    const client = makeClient({ fetch: fetch as unknown as FetchLike });
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    socket.state(job({ seq: 11 }));
    const state = await client.cancel('comic-1');
    expect(state.phase).toBe('CANCELLED');
    expect(client.getJob('comic-1').state?.seq).toBe(12);
    const init = fetch.mock.calls[0]![1]!;
    expect(JSON.parse(String(init.body))).toEqual({ reason: 'Cancelled by the user' });
    expect(new Headers(init.headers).get('Authorization')).toBe('Bearer tok');
    client.close();
  });
});

describe('coming back online', () => {
  beforeEach(() => {
    vi.useFakeTimers();
    FakeWebSocket.reset();
  });

  it('checks an open socket with a ping and replaces it if no answer comes', async () => {
    const client = makeClient({ pingTimeoutMs: 35_000 });
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    window.dispatchEvent(new Event('online'));
    expect(socket.sent.at(-1)).toEqual({ op: 'ping' });
    await vi.advanceTimersByTimeAsync(5_000);
    expect(socket.closedByClient).not.toBeNull();
    expect(client.getConnection().error?.code).toBe('dead_link');
    await vi.advanceTimersByTimeAsync(250);
    expect(FakeWebSocket.instances).toHaveLength(2);
    client.close();
  });

  it('keeps the socket when the server answers the ping', async () => {
    const client = makeClient({ pingTimeoutMs: 35_000 });
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    window.dispatchEvent(new Event('online'));
    socket.receive({ type: 'pong' });
    await vi.advanceTimersByTimeAsync(30_000);
    expect(socket.closedByClient).toBeNull();
    expect(FakeWebSocket.instances).toHaveLength(1);
    client.close();
  });
});

describe('multiplexed SSE on fallback', () => {
  async function onSse(client: ProgressClient): Promise<void> {
    for (let n = 0; n < 3; n += 1) {
      await settle();
      FakeWebSocket.last.serverClose(1006);
      await vi.advanceTimersByTimeAsync(2_000);
    }
    await settle();
    expect(client.getConnection().transport).toBe('sse');
  }

  it('watches every job on ONE EventSource and reopens it once, with the cursor, when jobs are added', async () => {
    const client = makeClient({ wsProbeIntervalMs: 600_000 });
    const seen = [watch(client, 'comic-1').seen, watch(client, 'comic-2').seen];
    await onSse(client);
    expect(FakeEventSource.instances).toHaveLength(1);
    const first = FakeEventSource.last;
    expect(first.jobs()).toEqual(['comic-1', 'comic-2']);
    expect(first.params.get('last_event_id')).toBeNull();
    first.open();
    first.state(job({ seq: 4 }, 'comic-1'), 'C1');
    first.state(job({ seq: 2 }, 'comic-2'), 'C2');

    // Eight more trackers mount in one go: one new stream for all ten, resuming from C2.
    const more = Array.from({ length: 8 }, (_, n) => `comic-${n + 3}`);
    for (const id of more) watch(client, id);
    await settle();
    expect(FakeEventSource.instances).toHaveLength(2);
    expect(FakeEventSource.live()).toEqual([FakeEventSource.last]);
    const second = FakeEventSource.last;
    expect(second.jobs()).toHaveLength(10);
    expect(second.params.get('last_event_id')).toBe('C2');
    expect(second.params.get('access_token')).toBe('tok');
    expect(client.getConnection()).toMatchObject({ status: 'fallback', transport: 'sse' });

    // Nothing repeated even if the server resent: seq decides.
    second.open();
    second.state(job({ seq: 4 }, 'comic-1'), 'C3');
    second.state(job({ seq: 5, phase: 'COMPLETE', progress: 100 }, 'comic-1'), 'C4');
    expect(seen[0]).toEqual([4, 5]);
    // A job that ended leaves the stream by itself: no reopen.
    await settle();
    expect(FakeEventSource.instances).toHaveLength(2);
    client.close();
    expect(FakeEventSource.live()).toHaveLength(0);
  });

  it('reopens without the job when a running job is unsubscribed; a refused job just stops', async () => {
    const client = makeClient({ wsProbeIntervalMs: 600_000 });
    const a = watch(client, 'comic-1');
    watch(client, 'comic-2');
    watch(client, 'comic-3');
    await onSse(client);
    const source = FakeEventSource.last;
    source.open();
    source.jobError('comic-3', 'forbidden', 'job comic-3 belongs to another user');
    expect(client.getJob('comic-3').error).toMatchObject({ code: 'forbidden' });
    await settle();
    expect(FakeEventSource.instances).toHaveLength(1);
    expect(source.closed).toBe(false);
    a.stop();
    await settle();
    expect(FakeEventSource.instances).toHaveLength(2);
    expect(FakeEventSource.last.jobs()).toEqual(['comic-2']);
    client.close();
  });

  it('on `expired`, reopens at once with a fresh token from the function and the cursor', async () => {
    let issued = 0;
    const client = makeClient({ token: () => `tok-${++issued}`, wsProbeIntervalMs: 600_000 });
    const { seen } = watch(client, 'comic-1');
    await onSse(client);
    const source = FakeEventSource.last;
    source.open();
    source.state(job({ seq: 7 }), 'C7');
    const before = issued;
    source.expired();
    await settle();
    expect(source.closed).toBe(true);
    expect(FakeEventSource.instances).toHaveLength(2);
    expect(FakeEventSource.last.params.get('access_token')).toBe(`tok-${before + 1}`);
    expect(FakeEventSource.last.params.get('last_event_id')).toBe('C7');
    FakeEventSource.last.open();
    FakeEventSource.last.state(job({ seq: 8 }), 'C8');
    expect(seen).toEqual([7, 8]);
    client.close();
  });

  it('a 204 (nothing left to send) after a store loss is no failure: the final state is read and shown', async () => {
    // The client shows comic-1 at seq 5 (epoch e1). The store lost the job; it was made
    // again (epoch e2) and has ended at seq 3, which the last stream delivered with its cursor
    // C-end before the connection dropped. Resuming from C-end the server has nothing left to
    // send: 204, which an EventSource reports as a plain error.
    const finalState = job({ seq: 3, phase: 'COMPLETE', progress: 100, epoch: 'e2', updated_at: '2026-11-29T05:00:00.000Z' });
    const requests: string[] = [];
    const fetch = fakeFetch((url) => {
      requests.push(url);
      if (url.includes('/v1/events?')) return new Response(null, { status: 204 });
      if (url.endsWith('/v1/jobs/comic-1')) return jsonResponse(finalState);
      return new Error(`unexpected ${url}`);
    });
    const client = makeClient({ fetch: fetch as unknown as FetchLike, wsProbeIntervalMs: 600_000, sseFailuresBeforePolling: 1 });
    const { seen } = watch(client, 'comic-1');
    await onSse(client);
    const first = FakeEventSource.last;
    first.open();
    first.state(job({ seq: 5 }), 'C5');
    first.fail(); // the connection drops
    await vi.advanceTimersByTimeAsync(2_000);
    const second = FakeEventSource.last;
    expect(second).not.toBe(first);
    expect(second.params.get('last_event_id')).toBe('C5');
    second.refuse();
    await settle();
    // Asked once which refusal it was (204), then read the job: no polling, no backoff.
    expect(requests[0]).toBe(second.url);
    expect(requests.slice(1)).toEqual(['http://phasecast.test/v1/jobs/comic-1']);
    expect(seen).toEqual([5, 3]); // the new epoch's final state, though its seq is lower
    expect(client.getJob('comic-1').state).toMatchObject({ phase: 'COMPLETE', epoch: 'e2' });
    expect(client.getConnection().status).toBe('closed');
    expect(client.getConnection().transport).not.toBe('polling');
    expect(client.pendingTimers).toBe(0);
    client.close();
  });

  it('a 204 for a job still running reopens at once without the cursor (full resync)', async () => {
    const running = job({ seq: 2, epoch: 'e2', updated_at: '2026-11-29T05:00:00.000Z' });
    const fetch = fakeFetch((url) => (url.includes('/v1/events?') ? new Response(null, { status: 204 }) : jsonResponse(running)));
    const client = makeClient({ fetch: fetch as unknown as FetchLike, wsProbeIntervalMs: 600_000, sseFailuresBeforePolling: 1 });
    const { seen } = watch(client, 'comic-1');
    await onSse(client);
    FakeEventSource.last.open();
    FakeEventSource.last.state(job({ seq: 5 }), 'C5');
    FakeEventSource.last.fail();
    await vi.advanceTimersByTimeAsync(2_000);
    const before = FakeEventSource.instances.length;
    FakeEventSource.last.refuse();
    await settle();
    expect(seen).toEqual([5, 2]);
    expect(FakeEventSource.instances).toHaveLength(before + 1);
    expect(FakeEventSource.last.params.get('last_event_id')).toBeNull();
    expect(client.getConnection()).toMatchObject({ status: 'fallback', transport: 'sse' });
    client.close();
  });

  it('any other refusal before the stream opens still counts as a failed attempt', async () => {
    const fetch = fakeFetch((url) => (url.includes('/v1/events?') ? jsonResponse({ error: { code: 'unauthorized', message: 'no' } }, 401) : new Error('down')));
    const client = makeClient({ fetch: fetch as unknown as FetchLike, wsProbeIntervalMs: 600_000, sseFailuresBeforePolling: 1 });
    watch(client, 'comic-1');
    await onSse(client);
    const errors: unknown[] = [];
    client.onConnectionChange(() => errors.push(client.getConnection().lastError));
    FakeEventSource.last.refuse();
    await settle();
    expect(errors[0]).toMatchObject({ code: 'sse_failed', status: 401 });
    expect(client.getConnection()).toMatchObject({ transport: 'polling' }); // one failure was the limit here
    client.close();
  });

  it('closes the stream on `end` instead of letting the EventSource reconnect', async () => {
    const client = makeClient({ wsProbeIntervalMs: 600_000 });
    watch(client, 'comic-1');
    await onSse(client);
    const source = FakeEventSource.last;
    source.open();
    source.state(job({ seq: 9, phase: 'FAILED' }));
    source.end();
    expect(source.closed).toBe(true);
    expect(client.getConnection().status).toBe('closed');
    expect(client.pendingTimers).toBe(0);
    client.close();
  });
});

describe('tokens', () => {
  /** Let time pass while the server pings every 10 s, as a live server does. */
  async function alive(socket: FakeWebSocket, ms: number): Promise<void> {
    for (let left = ms; left > 0; left -= 10_000) {
      await vi.advanceTimersByTimeAsync(Math.min(10_000, left));
      socket.receive({ type: 'ping' });
    }
  }

  it('refreshes before expiry on the open socket, using the authenticated frame', async () => {
    let issued = 0;
    const client = makeClient({ token: () => `tok-${++issued}` });
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    expect(socket.params.get('access_token')).toBe('tok-1');
    // A 100 s token: refreshed 20 s before expiry (80 % of its lifetime).
    socket.receive({ type: 'authenticated', job_id: null, expires_at: Date.now() / 1000 + 100 });
    await alive(socket, 79_000);
    expect(socket.sent.filter((m) => m.op === 'auth')).toEqual([]);
    await alive(socket, 1_000);
    expect(socket.sent.filter((m) => m.op === 'auth')).toEqual([{ op: 'auth', token: 'tok-2' }]);
    // The server confirms with a new expiry (1 h): next refresh 30 s before it.
    socket.receive({ type: 'authenticated', job_id: null, expires_at: Date.now() / 1000 + 3_600 });
    await alive(socket, 3_569_000);
    expect(socket.sent.filter((m) => m.op === 'auth')).toHaveLength(1);
    await alive(socket, 1_000);
    expect(socket.sent.filter((m) => m.op === 'auth')).toEqual([{ op: 'auth', token: 'tok-2' }, { op: 'auth', token: 'tok-3' }]);
    expect(FakeWebSocket.instances).toHaveLength(1);
    expect(client.getConnection().status).toBe('open');
    client.close();
  });

  it('asks again soon when the token function fails while refreshing, without dropping the socket', async () => {
    let calls = 0;
    const client = makeClient({
      token: () => {
        calls += 1;
        if (calls === 2) throw new Error('auth server busy');
        return `tok-${calls}`;
      },
    });
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    socket.receive({ type: 'authenticated', job_id: null, expires_at: Date.now() / 1000 + 100 });
    await alive(socket, 80_000);
    expect(calls).toBe(2);
    expect(socket.sent.filter((m) => m.op === 'auth')).toEqual([]);
    await alive(socket, 5_000);
    expect(socket.sent.filter((m) => m.op === 'auth')).toEqual([{ op: 'auth', token: 'tok-3' }]);
    expect(FakeWebSocket.instances).toHaveLength(1);
    client.close();
  });

  it('works with a server that sends no authenticated frame (no refresh timer, nothing breaks)', async () => {
    const token = vi.fn(() => 'tok');
    const client = makeClient({ token });
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    socket.state(job({ seq: 1 }));
    await alive(socket, 600_000);
    expect(token).toHaveBeenCalledTimes(1);
    expect(client.pendingTimers).toBe(1); // the liveness check only
    expect(socket.sent.filter((m) => m.op === 'auth')).toEqual([]);
    client.close();
  });

  it('asks the token function once more before a 4401 is fatal', async () => {
    let issued = 0;
    const client = makeClient({ token: () => `tok-${++issued}` });
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    socket.serverClose(4401, 'token expired');
    await settle();
    // At once, with a fresh token: no backoff, not "closed".
    expect(FakeWebSocket.instances).toHaveLength(2);
    expect(FakeWebSocket.last.params.get('access_token')).toBe('tok-2');
    expect(client.getConnection().status).toBe('reconnecting');
    // Refused again before anything worked: now it is fatal.
    FakeWebSocket.last.serverClose(4401, 'invalid token');
    await vi.advanceTimersByTimeAsync(60_000);
    expect(FakeWebSocket.instances).toHaveLength(2);
    expect(client.getConnection()).toMatchObject({ status: 'closed', error: { code: 'unauthorized' } });
    expect(client.getLinkState().name).toBe('refused');
    client.close();
  });

  it('a refresh that works resets the allowance: each expiry gets its own fresh token', async () => {
    let issued = 0;
    const client = makeClient({ token: () => `tok-${++issued}` });
    watch(client, 'comic-1');
    for (let round = 0; round < 3; round += 1) {
      const socket = await connectedSocket();
      socket.serverClose(4401, 'token expired');
      await settle();
    }
    expect(FakeWebSocket.instances).toHaveLength(4);
    expect(client.getConnection().status).not.toBe('closed');
    client.close();
  });

  it('polling: a 401 asks the token function again, and stops on the second', async () => {
    let issued = 0;
    const fetch = fakeFetch(() => jsonResponse({ error: { code: 'unauthorized', message: 'token expired' } }, 401));
    const client = makeClient({ transports: ['polling'], token: () => `tok-${++issued}`, fetch: fetch as unknown as FetchLike });
    watch(client, 'comic-1');
    await vi.advanceTimersByTimeAsync(10);
    const auth = fetch.mock.calls.map(([, init]) => new Headers(init?.headers).get('Authorization'));
    expect(auth).toEqual(['Bearer tok-1', 'Bearer tok-2']);
    expect(client.getConnection()).toMatchObject({ status: 'closed', error: { code: 'unauthorized', status: 401 } });
    client.close();
  });
});

describe('retry policy lives in the client', () => {
  it('re-asks for a job the store could not read, with backoff, on the same socket', async () => {
    const client = makeClient({ backoff: { baseMs: 1_000, capMs: 8_000 } });
    watch(client, 'comic-1');
    const socket = await connectedSocket();
    socket.receive({ type: 'error', job_id: 'comic-1', code: 'unavailable', message: 'store unreachable' });
    expect(client.getJob('comic-1').error).toBeNull();
    const subscribes = () => socket.subscriptions().length;
    expect(subscribes()).toBe(1);
    await vi.advanceTimersByTimeAsync(499);
    expect(subscribes()).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(subscribes()).toBe(2);
    expect(FakeWebSocket.instances).toHaveLength(1);
    client.close();
  });

  it('every connect attempt is a new transport: a closed socket is never reused', async () => {
    const client = makeClient({ wsFailuresBeforeFallback: 10 });
    watch(client, 'comic-1');
    await settle();
    const sockets = new Set<FakeWebSocket>();
    for (let n = 0; n < 4; n += 1) {
      sockets.add(FakeWebSocket.last);
      FakeWebSocket.last.serverClose(1006);
      await vi.advanceTimersByTimeAsync(5_000);
    }
    expect(sockets.size).toBe(4);
    expect(FakeWebSocket.instances.filter((s) => s.readyState !== 3)).toHaveLength(1);
    client.close();
  });
});

describe('moving back up', () => {
  it('on polling, probes the WebSocket, then SSE, and moves up to the first that works', async () => {
    const fetch = fakeFetch(() => jsonResponse(job({ seq: 3 })));
    const client = makeClient({ fetch: fetch as unknown as FetchLike, wsProbeIntervalMs: 5_000, sseFailuresBeforePolling: 1, wsFailuresBeforeFallback: 1 });
    const { seen } = watch(client, 'comic-1');
    await settle();
    FakeWebSocket.last.serverClose(1006);
    await settle();
    FakeEventSource.last.fail();
    await settle();
    expect(client.getConnection().transport).toBe('polling');
    expect(seen).toEqual([3]);
    // Polling worked after failures (the server may have been away): the WebSocket is probed
    // at once. Still blocked.
    const sockets = FakeWebSocket.instances.length;
    const sources = FakeEventSource.instances.length;
    expect(sockets).toBe(2);
    FakeWebSocket.last.serverClose(1006);
    // Next probe: SSE, which works now.
    await vi.advanceTimersByTimeAsync(5_000);
    expect(FakeEventSource.instances.length).toBe(sources + 1);
    const source = FakeEventSource.last;
    source.open();
    expect(client.getConnection()).toMatchObject({ status: 'fallback', transport: 'sse' });
    source.state(job({ seq: 4 }), 'C4');
    expect(seen).toEqual([3, 4]);
    // Polling stopped; the WebSocket is still probed from SSE.
    const polls = fetch.mock.calls.length;
    await vi.advanceTimersByTimeAsync(5_000);
    expect(fetch.mock.calls.length).toBe(polls);
    expect(FakeWebSocket.instances.length).toBe(sockets + 1);
    FakeWebSocket.last.open();
    FakeWebSocket.last.receive({ type: 'subscribed', job_id: 'comic-1' });
    expect(client.getConnection()).toMatchObject({ status: 'open', transport: 'websocket' });
    expect(source.closed).toBe(true);
    client.close();
  });
});
