import { act, fireEvent, render, screen, within } from '@testing-library/react';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { ProgressClient } from '../src/client/ProgressClient';
import type { FetchLike } from '../src/client/transport';
import type { JobState } from '../src/client/types';
import { formatEta } from '../src/format';
import { ProgressProvider } from '../src/react/context';
import { ProgressTracker } from '../src/react/ProgressTracker';
import { at, fakeFetch, FakeEventSource, FakeWebSocket, job, jsonResponse } from './fakes';

const settle = () => act(() => vi.advanceTimersByTimeAsync(0));

const timeline = {
  QUEUED: { started_at: at(0), finished_at: at(1) },
  ANALYZING: { started_at: at(1), finished_at: at(5.5) },
  GENERATING: { started_at: at(5.5), finished_at: at(20) },
  POST_PROCESSING: { started_at: at(20), finished_at: at(24) },
  COMPLETE: { started_at: at(24), finished_at: null },
};

/** The state of a comic job in each phase, as the server would push it. */
const STATES: Record<string, JobState> = {
  QUEUED: job({ seq: 1, phase: 'QUEUED', progress: 0, message: 'Waiting for a GPU', phases: { QUEUED: { started_at: at(0), finished_at: null } } }),
  ANALYZING: job({
    seq: 3,
    phase: 'ANALYZING',
    progress: 4,
    phase_progress: 40,
    eta_seconds: 27,
    message: 'Reading the story',
    phases: { QUEUED: timeline.QUEUED, ANALYZING: { started_at: at(1), finished_at: null } },
  }),
  GENERATING: job({
    seq: 7,
    phase: 'GENERATING',
    progress: 45,
    phase_progress: 50,
    eta_seconds: 21.4,
    message: 'Drawing panel 3 of 6',
    phases: { QUEUED: timeline.QUEUED, ANALYZING: timeline.ANALYZING, GENERATING: { started_at: at(5.5), finished_at: null } },
    steps: {
      'panel-1': { progress: 100, status: 'done' },
      'panel-2': { progress: 100, status: 'done' },
      'panel-3': { progress: 40, status: 'running' },
      'panel-4': { progress: 60, status: 'running' },
      'panel-5': { progress: 0, status: 'pending' },
    },
    steps_total: 6,
  }),
  POST_PROCESSING: job({
    seq: 20,
    phase: 'POST_PROCESSING',
    progress: 90,
    phase_progress: 50,
    eta_seconds: 3,
    message: 'Lettering',
    phases: { QUEUED: timeline.QUEUED, ANALYZING: timeline.ANALYZING, GENERATING: timeline.GENERATING, POST_PROCESSING: { started_at: at(20), finished_at: null } },
  }),
  COMPLETE: job({ seq: 25, phase: 'COMPLETE', progress: 100, phase_progress: 100, eta_seconds: 0, message: 'Your comic is ready', phases: timeline }),
};

function renderTracker(state: JobState | null, props: Partial<Parameters<typeof ProgressTracker>[0]> = {}, fetch?: FetchLike) {
  const client = new ProgressClient({
    baseUrl: 'http://phasecast.test',
    token: 'tok',
    WebSocket: FakeWebSocket,
    EventSource: FakeEventSource,
    ...(fetch ? { fetch } : {}),
  });
  const view = render(
    <ProgressProvider client={client}>
      <ProgressTracker jobId="comic-1" {...props} />
    </ProgressProvider>,
  );
  return {
    ...view,
    client,
    async push(next: JobState) {
      await settle();
      const socket = FakeWebSocket.last;
      act(() => {
        if (socket.readyState === 0) socket.open();
        socket.state(next);
      });
    },
    async start() {
      if (state) await this.push(state);
    },
  };
}

function phaseStatuses(): Record<string, string> {
  const list = screen.getByRole('list', { name: 'Phases' });
  return Object.fromEntries(within(list).getAllByRole('listitem').map((item) => [item.dataset.phase!, item.dataset.status!]));
}

function overallBar(): HTMLElement {
  return screen.getByRole('progressbar', { name: 'Overall progress' });
}

beforeEach(() => {
  vi.useFakeTimers({ now: Date.parse(at(30)) });
  FakeWebSocket.reset();
});
afterEach(() => {
  vi.useRealTimers();
});

describe('ProgressTracker', () => {
  it('shows a connecting state before the first update, without alarming words', async () => {
    const view = renderTracker(null);
    await settle();
    expect(overallBar().getAttribute('aria-valuenow')).toBe('0');
    expect(screen.getByText('Connecting…')).toBeTruthy();
    expect(screen.queryByText(/Connection lost/)).toBeNull();
    view.client.close();
  });

  it('starts from an initialState the app already has: title and phase at once, no raw id', async () => {
    const known = job({ ...STATES.QUEUED!, metadata: { title: 'Space cats' } });
    const view = renderTracker(null, { initialState: known });
    expect(screen.getByRole('heading').textContent).toBe('Space cats');
    expect(screen.getByText('Waiting for a GPU')).toBeTruthy();
    expect(screen.queryByText('comic-1')).toBeNull();
    // The client's newer state takes over; an older one would not.
    await view.push(job({ ...STATES.ANALYZING!, metadata: { title: 'Space cats' } }));
    expect(screen.getByText('Reading the story')).toBeTruthy();
    view.client.close();
  });

  it('never shows 100 % before COMPLETE, even when the server reports 99.6 or 100 while post-processing', async () => {
    const view = renderTracker(null);
    for (const [seq, progress] of [[30, 99.6], [31, 100]] as const) {
      await view.push(job({ ...STATES.POST_PROCESSING!, seq, progress, phase_progress: 100, eta_seconds: 0 }));
      expect(overallBar().getAttribute('aria-valuenow')).toBe('99');
      expect(screen.getByText('99 %')).toBeTruthy();
    }
    await view.push(job({ ...STATES.COMPLETE!, seq: 32 }));
    expect(overallBar().getAttribute('aria-valuenow')).toBe('100');
    view.client.close();
  });

  it("hides a message left over from the previous phase until the new phase says something", async () => {
    const view = renderTracker(null);
    await view.push(job({ ...STATES.ANALYZING!, seq: 4, message: 'Story analysed' }));
    expect(screen.getByText('Story analysed')).toBeTruthy();
    await view.push(job({ ...STATES.GENERATING!, seq: 5, message: 'Story analysed' }));
    expect(screen.queryByText('Story analysed')).toBeNull();
    await view.push(job({ ...STATES.GENERATING!, seq: 6, message: 'Story analysed' }));
    expect(screen.queryByText('Story analysed')).toBeNull();
    await view.push(job({ ...STATES.GENERATING!, seq: 7, message: 'Drawing panels: 1 of 6 done' }));
    expect(screen.getByText('Drawing panels: 1 of 6 done')).toBeTruthy();
    view.client.close();
  });

  it.each([
    ['QUEUED', 0, { QUEUED: 'current', ANALYZING: 'upcoming', GENERATING: 'upcoming', POST_PROCESSING: 'upcoming', COMPLETE: 'upcoming' }],
    ['ANALYZING', 4, { QUEUED: 'done', ANALYZING: 'current', GENERATING: 'upcoming', POST_PROCESSING: 'upcoming', COMPLETE: 'upcoming' }],
    ['GENERATING', 45, { QUEUED: 'done', ANALYZING: 'done', GENERATING: 'current', POST_PROCESSING: 'upcoming', COMPLETE: 'upcoming' }],
    ['POST_PROCESSING', 90, { QUEUED: 'done', ANALYZING: 'done', GENERATING: 'done', POST_PROCESSING: 'current', COMPLETE: 'upcoming' }],
    ['COMPLETE', 100, { QUEUED: 'done', ANALYZING: 'done', GENERATING: 'done', POST_PROCESSING: 'done', COMPLETE: 'done' }],
  ])('renders the %s phase', async (phase, percent, statuses) => {
    const view = renderTracker(STATES[phase]!);
    await view.start();
    expect(overallBar().getAttribute('aria-valuenow')).toBe(String(percent));
    expect(overallBar().getAttribute('aria-valuetext')).toContain(`${percent} percent`);
    expect(phaseStatuses()).toEqual(statuses);
    const current = screen.getByRole('list', { name: 'Phases' }).querySelector('[aria-current="step"]');
    expect(current?.getAttribute('data-phase') ?? null).toBe(phase === 'COMPLETE' ? null : phase);
    expect(screen.getByText(STATES[phase]!.message)).toBeTruthy();
    expect(screen.queryByRole('alert')).toBeNull();
    view.client.close();
  });

  it('shows how long finished phases took and the time left', async () => {
    const view = renderTracker(STATES.GENERATING!);
    await view.start();
    const list = screen.getByRole('list', { name: 'Phases' });
    expect(within(list).getByText('4.5 s')).toBeTruthy(); // ANALYZING 1 s → 5.5 s
    expect(within(list).getByText('1.0 s')).toBeTruthy(); // QUEUED
    expect(screen.getByText(/about 20 s left/)).toBeTruthy();
    view.client.close();
  });

  it('draws a mini bar per panel, padding panels not reported yet', async () => {
    const view = renderTracker(STATES.GENERATING!);
    await view.start();
    const panels = screen.getByRole('list', { name: 'Panels' });
    const bars = within(panels).getAllByRole('progressbar');
    expect(bars.map((bar) => [bar.getAttribute('aria-label'), bar.getAttribute('aria-valuenow')])).toEqual([
      ['Panel 1', '100'],
      ['Panel 2', '100'],
      ['Panel 3', '40'],
      ['Panel 4', '60'],
      ['Panel 5', '0'],
      ['Panel 6', '0'],
    ]);
    view.client.close();
  });

  it('shows the failure and where the job stopped', async () => {
    const failed = job({
      ...STATES.GENERATING!,
      seq: 9,
      phase: 'FAILED',
      message: 'Generation failed',
      error: { code: 'gpu_oom', message: 'CUDA out of memory' },
      phases: { ...STATES.GENERATING!.phases, GENERATING: { started_at: at(5.5), finished_at: at(12) }, FAILED: { started_at: at(12), finished_at: null } },
    });
    const view = renderTracker(failed, { cancellable: true });
    await view.start();
    const alert = screen.getByRole('alert');
    expect(alert.textContent).toContain('CUDA out of memory');
    expect(alert.textContent).toContain('gpu_oom');
    // The failure is said once, in the alert.
    expect(screen.queryByText('Generation failed', { exact: true })).toBeNull();
    expect(phaseStatuses()).toMatchObject({ ANALYZING: 'done', GENERATING: 'stopped', POST_PROCESSING: 'upcoming' });
    // Steps are kept so the viewer sees which panel broke.
    expect(within(screen.getByRole('list', { name: 'Steps' })).getAllByRole('progressbar')).toHaveLength(6);
    expect(screen.queryByRole('button', { name: 'Cancel' })).toBeNull();
    expect(view.container.querySelector('.pc-tracker--failed')).not.toBeNull();
    view.client.close();
  });

  it('shows the cancelled state', async () => {
    const cancelled = job({
      seq: 4,
      phase: 'CANCELLED',
      progress: 4,
      message: 'Cancelled by the user',
      phases: { QUEUED: timeline.QUEUED, ANALYZING: { started_at: at(1), finished_at: at(3) }, CANCELLED: { started_at: at(3), finished_at: null } },
    });
    const view = renderTracker(cancelled);
    await view.start();
    // One cancel line, carrying the reason the server recorded: not the reason and a second notice.
    expect(view.container.textContent?.match(/Cancel/g)).toHaveLength(2); // the line and the phase label in the header
    expect(screen.getByRole('status').textContent).toBe('Cancelled by the user');
    expect(screen.getByText('Cancelled by the user')).toBeTruthy();
    expect(phaseStatuses()).toMatchObject({ QUEUED: 'done', ANALYZING: 'stopped', GENERATING: 'upcoming' });
    expect(screen.queryByText(/left/)).toBeNull();
    view.client.close();
  });

  it('cancels through the API when the cancel button is pressed', async () => {
    const fetch = fakeFetch((url) =>
      url === 'http://phasecast.test/v1/jobs/comic-1/cancel'
        ? jsonResponse({ applied: true, state: job({ ...STATES.ANALYZING!, seq: 4, phase: 'CANCELLED', message: 'Cancelled by the user' }) })
        : new Error(`unexpected ${url}`),
    );
    const view = renderTracker(STATES.ANALYZING!, { cancellable: true }, fetch as unknown as FetchLike);
    await view.start();
    fireEvent.click(screen.getByRole('button', { name: 'Cancel' }));
    await settle();
    expect(fetch).toHaveBeenCalledTimes(1);
    expect(view.container.querySelector('[data-phase="CANCELLED"]')).not.toBeNull();
    expect(screen.queryByRole('button', { name: 'Cancel' })).toBeNull();
    view.client.close();
  });

  it('reports a job the server does not know', async () => {
    const view = renderTracker(null);
    await settle();
    act(() => {
      FakeWebSocket.last.open();
      FakeWebSocket.last.receive({ type: 'error', job_id: 'comic-1', code: 'not_found', message: 'no such job: comic-1' });
    });
    expect(screen.getByRole('alert').textContent).toContain('no such job');
    view.client.close();
  });

  it('says it is reconnecting while the link is down', async () => {
    const view = renderTracker(STATES.ANALYZING!);
    await view.start();
    act(() => FakeWebSocket.last.serverClose(1006));
    expect(screen.getByText('Connection lost, reconnecting…')).toBeTruthy();
    view.client.close();
  });
});

describe('ProgressTracker when the token is refused', () => {
  beforeEach(() => {
    vi.useFakeTimers();
    FakeWebSocket.reset();
  });

  it('says why instead of spinning', async () => {
    const view = renderTracker(STATES.ANALYZING!);
    await view.start();
    act(() => FakeWebSocket.last.serverClose(4401, 'token expired'));
    expect(screen.getByRole('alert').textContent).toMatch(/refused the token/);
    view.client.close();
  });
});

describe('formatEta', () => {
  it('rounds to words a person reads at a glance', () => {
    expect([null, 0, 4, 21.4, 59, 150, 7300].map(formatEta)).toEqual([
      'estimating time left…',
      'almost done',
      'a few seconds left',
      'about 20 s left',
      'about 60 s left',
      'about 3 min left',
      'about 2 h 2 min left',
    ]);
  });
});
