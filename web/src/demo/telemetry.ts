// What the demo exposes on window.__phasecast for the browser tests (and curious people
// with a console): every accepted update with its latency, and the connection history.
import type { ProgressClient } from '../client/ProgressClient';
import type { ConnectionStatus, JobState, Phase, TransportKind } from '../client/types';

export interface UpdateRecord {
  job_id: string;
  seq: number;
  phase: Phase;
  progress: number;
  /** Steps the state announces (panels while GENERATING). */
  stepsTotal: number | null;
  /** Browser receipt time, ms since the epoch (sub-millisecond precision). */
  receivedAt: number;
  /** The state's updated_at, ms since the epoch. */
  updatedAt: number;
  latencyMs: number;
  transport: TransportKind | null;
}

export interface ConnectionRecord {
  at: number;
  status: ConnectionStatus;
  transport: TransportKind | null;
  error: string | null;
}

export interface DemoTelemetry {
  updates: UpdateRecord[];
  connections: ConnectionRecord[];
  transport: TransportKind | null;
  status: ConnectionStatus;
  jobs: string[];
  engine: string | null;
}

declare global {
  interface Window {
    __phasecast?: DemoTelemetry;
  }
}

const MAX_UPDATES = 20_000;

export function now(): number {
  return performance.timeOrigin + performance.now();
}

export function installTelemetry(client: ProgressClient, engine: string): DemoTelemetry {
  const telemetry: DemoTelemetry = { updates: [], connections: [], transport: null, status: 'closed', jobs: [], engine };
  window.__phasecast = telemetry;
  client.onState((job: JobState) => {
    const receivedAt = now();
    const updatedAt = Date.parse(job.updated_at);
    telemetry.updates.push({
      job_id: job.job_id,
      seq: job.seq,
      phase: job.phase,
      progress: job.progress,
      stepsTotal: job.steps_total ?? null,
      receivedAt,
      updatedAt,
      latencyMs: receivedAt - updatedAt,
      transport: client.getConnection().transport,
    });
    if (telemetry.updates.length > MAX_UPDATES) telemetry.updates.splice(0, telemetry.updates.length - MAX_UPDATES);
  });
  client.onConnectionChange(() => {
    const info = client.getConnection();
    telemetry.transport = info.transport;
    telemetry.status = info.status;
    telemetry.connections.push({ at: now(), status: info.status, transport: info.transport, error: info.error?.message ?? null });
  });
  return telemetry;
}
