import { describe, expect, it } from 'vitest';
import { connectionInfo, IDLE, IllegalTransition, transition, type LinkEvent, type LinkState } from '../src/client/link';
import { decide, FRESH, heard, type RetryConfig } from '../src/client/policy';
import type { ProgressError } from '../src/client/types';

const oops: ProgressError = { code: 'ws_closed', message: 'dropped' };
const STATES: Record<string, LinkState> = {
  idle: IDLE,
  connecting: { name: 'connecting', transport: 'websocket', error: null },
  open: { name: 'open', transport: 'websocket' },
  waiting: { name: 'waiting', transport: 'websocket', error: oops },
  refused: { name: 'refused', error: oops },
};
const EVENTS: Record<string, LinkEvent> = {
  connect: { type: 'connect', transport: 'sse' },
  heard: { type: 'heard' },
  lost: { type: 'lost', error: oops },
  refused: { type: 'refused', error: oops },
  switch: { type: 'switch', transport: 'websocket' },
  idle: { type: 'idle' },
};
// Every allowed transition and where it leads; everything else must throw.
const ALLOWED: Record<string, Record<string, string>> = {
  idle: { connect: 'connecting', idle: 'idle' },
  connecting: { heard: 'open', lost: 'waiting', refused: 'refused', switch: 'open', idle: 'idle' },
  open: { heard: 'open', lost: 'waiting', refused: 'refused', switch: 'open', idle: 'idle' },
  waiting: { connect: 'connecting', switch: 'open', idle: 'idle' },
  refused: { connect: 'connecting', idle: 'idle' },
};

describe('link state machine', () => {
  for (const [from, state] of Object.entries(STATES)) {
    for (const [name, event] of Object.entries(EVENTS)) {
      const to = ALLOWED[from]![name];
      it(`${from} --${name}--> ${to ?? 'throws'}`, () => {
        if (to === undefined) {
          expect(() => transition(state, event)).toThrow(IllegalTransition);
        } else {
          expect(transition(state, event).name).toBe(to);
        }
      });
    }
  }

  it('keeps why it is retrying through waiting -> connecting, and forgets it once heard', () => {
    let state = transition(STATES.open!, { type: 'lost', error: oops });
    state = transition(state, { type: 'connect', transport: 'sse' });
    expect(state).toEqual({ name: 'connecting', transport: 'sse', error: oops });
    expect(transition(state, { type: 'heard' })).toEqual({ name: 'open', transport: 'sse' });
    expect(transition(IDLE, { type: 'connect', transport: 'websocket' })).toEqual({ name: 'connecting', transport: 'websocket', error: null });
  });

  it('derives what the app sees', () => {
    const ws = (state: LinkState) => connectionInfo(state, null).status;
    expect(ws(IDLE)).toBe('closed');
    expect(ws({ name: 'connecting', transport: 'websocket', error: null })).toBe('connecting');
    expect(ws({ name: 'connecting', transport: 'websocket', error: oops })).toBe('reconnecting');
    expect(ws({ name: 'open', transport: 'websocket' })).toBe('open');
    expect(ws({ name: 'waiting', transport: 'websocket', error: oops })).toBe('reconnecting');
    expect(ws({ name: 'open', transport: 'sse' })).toBe('fallback');
    expect(ws({ name: 'waiting', transport: 'polling', error: oops })).toBe('fallback');
    expect(connectionInfo(STATES.refused!, oops)).toEqual({ status: 'closed', transport: null, error: oops, lastError: oops });
  });
});

describe('retry policy', () => {
  const config: RetryConfig = {
    modes: ['websocket', 'sse', 'polling'],
    failuresBeforeNext: { websocket: 3, sse: 2 },
    streamBackoff: { baseMs: 100, capMs: 1_000 },
    pollBackoff: { baseMs: 1_000, capMs: 4_000 },
    canRefreshToken: true,
    random: () => 0.999,
  };
  const failed = { error: oops, healthyBefore: false, reason: 'failed' as const };

  it('backs off with full jitter on failed connects, then moves down the transports', () => {
    let counters = FRESH;
    const delays: number[] = [];
    const modes: number[] = [];
    for (let n = 0; n < 6; n += 1) {
      const decision = decide(failed, counters, config);
      expect(decision.action).toBe('retry');
      counters = decision.counters;
      delays.push(decision.action === 'retry' ? decision.delayMs : -1);
      modes.push(counters.mode);
    }
    // WebSocket: 2 waits (99, 199), the 3rd failure switches at once; SSE: 1 wait, the 2nd switches; polling backs off with its own schedule.
    expect(modes).toEqual([0, 0, 1, 1, 2, 2]);
    expect(delays).toEqual([99, 199, 0, 99, 0, 999]);
  });

  it('a drop of a working link does not count towards falling back, and waits the first step only', () => {
    const counters = { mode: 0, failures: 2, attempt: 5, refreshed: false };
    const decision = decide({ ...failed, healthyBefore: true }, counters, config);
    expect(decision).toEqual({ action: 'retry', delayMs: 99, counters: { mode: 0, failures: 0, attempt: 1, refreshed: false } });
  });

  it('asks for one fresh token before a refusal is fatal, and only with a token function', () => {
    const refused = { error: oops, healthyBefore: false, reason: 'refused' as const };
    const first = decide(refused, FRESH, config);
    expect(first).toEqual({ action: 'retry', delayMs: 0, counters: { ...FRESH, refreshed: true } });
    expect(decide(refused, first.counters, config).action).toBe('stop');
    // Once a link works again, the next refusal gets its own refresh.
    expect(decide(refused, heard(first.counters), config).action).toBe('retry');
    expect(decide(refused, FRESH, { ...config, canRefreshToken: false }).action).toBe('stop');
    expect(decide({ ...refused, reason: 'forbidden' }, FRESH, config).action).toBe('stop');
  });

  it('reopens at once when the server ended a stream on purpose (token expired, stream finished)', () => {
    for (const reason of ['expired', 'finished'] as const) {
      const decision = decide({ error: null, healthyBefore: true, reason }, { mode: 1, failures: 1, attempt: 3, refreshed: false }, config);
      expect(decision).toEqual({ action: 'retry', delayMs: 0, counters: { mode: 1, failures: 1, attempt: 0, refreshed: false } });
    }
  });

  it('never falls further than the last transport', () => {
    const decision = decide(failed, { mode: 2, failures: 50, attempt: 50, refreshed: false }, config);
    expect(decision.action === 'retry' && decision.counters.mode).toBe(2);
    expect(decision.action === 'retry' && decision.delayMs).toBe(3996);
  });
});
