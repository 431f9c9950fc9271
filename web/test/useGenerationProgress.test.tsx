import { act, render, renderHook, screen } from '@testing-library/react';
import { StrictMode, type ReactNode } from 'react';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { ProgressClient, type ProgressClientOptions } from '../src/client/ProgressClient';
import { ProgressProvider } from '../src/react/context';
import { useGenerationProgress } from '../src/react/useGenerationProgress';
import { FakeEventSource, FakeWebSocket, job } from './fakes';

const settle = () => act(() => vi.advanceTimersByTimeAsync(0));

const clientOptions: ProgressClientOptions = {
  baseUrl: 'http://phasecast.test',
  token: 'tok',
  random: () => 0.5,
  WebSocket: FakeWebSocket,
  EventSource: FakeEventSource,
};

function withClient(client: ProgressClient, strict = false) {
  return ({ children }: { children: ReactNode }) => {
    const tree = <ProgressProvider client={client}>{children}</ProgressProvider>;
    return strict ? <StrictMode>{tree}</StrictMode> : tree;
  };
}

beforeEach(() => {
  vi.useFakeTimers();
  FakeWebSocket.reset();
});
afterEach(() => {
  vi.useRealTimers();
});

describe('useGenerationProgress', () => {
  it('returns the newest state and the connection fields', async () => {
    const client = new ProgressClient(clientOptions);
    const { result } = renderHook(() => useGenerationProgress('comic-1'), { wrapper: withClient(client) });
    expect(result.current).toMatchObject({ state: null, phase: null, progress: 0, status: 'connecting', transport: 'websocket' });
    await settle();
    const socket = FakeWebSocket.last;
    act(() => {
      socket.open();
      socket.receive({ type: 'subscribed', job_id: 'comic-1' });
      socket.state(job({ seq: 4, phase: 'GENERATING', progress: 45, phase_progress: 50, eta_seconds: 21.4, message: 'Drawing panel 3 of 6' }));
    });
    expect(result.current).toMatchObject({
      phase: 'GENERATING',
      progress: 45,
      phaseProgress: 50,
      etaSeconds: 21.4,
      message: 'Drawing panel 3 of 6',
      done: false,
      status: 'open',
      transport: 'websocket',
      error: null,
    });
    client.close();
  });

  it('unsubscribes on unmount, closing the link it no longer needs', async () => {
    const client = new ProgressClient(clientOptions);
    const { unmount } = renderHook(() => useGenerationProgress('comic-1'), { wrapper: withClient(client) });
    await settle();
    const socket = FakeWebSocket.last;
    act(() => socket.open());
    unmount();
    await settle();
    expect(socket.sent.at(-1)).toEqual({ op: 'unsubscribe', job_id: 'comic-1' });
    expect(socket.closedByClient).not.toBeNull();
    expect(client.pendingTimers).toBe(0);
  });

  it('moves to the new job when jobId changes, on the same socket', async () => {
    const client = new ProgressClient(clientOptions);
    const { result, rerender } = renderHook(({ id }) => useGenerationProgress(id), {
      wrapper: withClient(client),
      initialProps: { id: 'comic-1' },
    });
    await settle();
    const socket = FakeWebSocket.last;
    act(() => {
      socket.open();
      socket.state(job({ seq: 3, progress: 30 }));
    });
    expect(result.current.progress).toBe(30);
    rerender({ id: 'comic-2' });
    expect(result.current.state).toBeNull();
    await settle();
    expect(socket.sent.slice(-2)).toEqual([
      { op: 'subscribe', job_id: 'comic-2' },
      { op: 'unsubscribe', job_id: 'comic-1' },
    ]);
    act(() => socket.state(job({ seq: 9, progress: 5 }, 'comic-2')));
    expect(result.current.progress).toBe(5);
    expect(FakeWebSocket.instances).toHaveLength(1);
    expect(socket.closedByClient).toBeNull();
    client.close();
  });

  it('opens exactly one socket under StrictMode double mounting', async () => {
    const client = new ProgressClient(clientOptions);
    const { result } = renderHook(() => useGenerationProgress('comic-1'), { wrapper: withClient(client, true) });
    await settle();
    expect(FakeWebSocket.instances).toHaveLength(1);
    const socket = FakeWebSocket.last;
    act(() => {
      socket.open();
      socket.state(job({ seq: 2, progress: 12 }));
    });
    expect(socket.subscriptions()).toEqual([{ op: 'subscribe', job_id: 'comic-1' }]);
    expect(result.current.progress).toBe(12);
    client.close();
  });

  it('works under StrictMode with a provider-owned client, and closes it on unmount', async () => {
    function Probe() {
      const { progress, status } = useGenerationProgress('comic-1');
      return <p>{`${status} ${progress}`}</p>;
    }
    const { unmount } = render(
      <StrictMode>
        <ProgressProvider options={clientOptions}>
          <Probe />
        </ProgressProvider>
      </StrictMode>,
    );
    await settle();
    const live = FakeWebSocket.instances.filter((socket) => socket.closedByClient === null);
    expect(live).toHaveLength(1);
    act(() => {
      live[0]!.open();
      live[0]!.state(job({ seq: 5, progress: 50 }));
    });
    expect(screen.getByText('open 50')).toBeTruthy();
    unmount();
    await settle();
    expect(live[0]!.closedByClient).not.toBeNull();
  });

  it('watches nothing for a null jobId or enabled: false', async () => {
    const client = new ProgressClient(clientOptions);
    const { result } = renderHook(() => [useGenerationProgress(null), useGenerationProgress('comic-1', { enabled: false })], {
      wrapper: withClient(client),
    });
    await settle();
    expect(FakeWebSocket.instances).toHaveLength(0);
    expect(result.current[0]).toMatchObject({ state: null, status: 'closed', transport: null });
    client.close();
  });

  it('explains the fix when no provider is above', () => {
    vi.spyOn(console, 'error').mockImplementation(() => undefined);
    expect(() => renderHook(() => useGenerationProgress('comic-1'))).toThrow(/ProgressProvider/);
  });
});
