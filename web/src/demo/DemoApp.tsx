import { useEffect, useState, type FormEvent } from 'react';
import { ProgressClient, type ProgressClientOptions } from '../client/ProgressClient';
import type { JobState, TransportKind } from '../client/types';
import { ProgressProvider } from '../react/context';
import { ProgressTracker } from '../react/ProgressTracker';
import { useGenerationProgress } from '../react/useGenerationProgress';
import { getJob, listActiveJobs, loadDemoConfig, startGeneration, type DemoConfig } from './api';
import { installTelemetry, now, type DemoTelemetry } from './telemetry';

const MAX_SHOWN = 12;
const DISCOVERY_INTERVAL_MS = 2_000;

/**
 * Client tuning from the query string, so tests and curious people can shorten waits:
 * ?backoffBase=200&backoffCap=2000&probe=3000&pingTimeout=20000&poll=1000&transports=sse,polling
 */
function optionsFromQuery(search: string): ProgressClientOptions {
  const query = new URLSearchParams(search);
  const num = (name: string) => {
    const value = Number(query.get(name));
    return query.has(name) && value > 0 ? value : undefined;
  };
  const options: ProgressClientOptions = {};
  const baseMs = num('backoffBase');
  const capMs = num('backoffCap');
  if (baseMs || capMs) options.backoff = { ...(baseMs ? { baseMs } : {}), ...(capMs ? { capMs } : {}) };
  if (capMs) options.pollBackoff = { baseMs: Math.min(1000, capMs), capMs };
  const probe = num('probe');
  if (probe) options.wsProbeIntervalMs = probe;
  const pingTimeout = num('pingTimeout');
  if (pingTimeout) options.pingTimeoutMs = pingTimeout;
  const poll = num('poll');
  if (poll) options.pollIntervalMs = poll;
  const transports = query.get('transports');
  if (transports) options.transports = transports.split(',') as TransportKind[];
  return options;
}

// One client and one telemetry object per page, created outside React so StrictMode's
// double rendering cannot make a second, orphaned pair.
let demo: { client: ProgressClient; telemetry: DemoTelemetry } | null = null;
function demoClient(config: DemoConfig) {
  if (!demo) {
    const client = new ProgressClient({ token: config.token, ...optionsFromQuery(window.location.search) });
    demo = { client, telemetry: installTelemetry(client, config.engine) };
  }
  return demo;
}

export function DemoApp() {
  const [config, setConfig] = useState<DemoConfig | null>(null);
  const [problem, setProblem] = useState<string | null>(null);
  useEffect(() => {
    let live = true;
    loadDemoConfig().then(
      (loaded) => live && setConfig(loaded),
      (error: unknown) => live && setProblem(error instanceof Error ? error.message : String(error)),
    );
    return () => {
      live = false;
    };
  }, []);

  return (
    <main className="demo">
      <header className="demo__header">
        <h1>Phasecast demo</h1>
        <p>Comic generations, live: every phase and panel as the server reports it.</p>
      </header>
      {problem ? <p className="demo__problem" role="alert">{problem}</p> : null}
      {config ? <Demo config={config} /> : problem ? null : <p>Loading the demo configuration…</p>}
    </main>
  );
}

function Demo({ config }: { config: DemoConfig }) {
  const { client, telemetry } = demoClient(config);
  const [jobIds, setJobIds] = useState<string[]>([]);
  const [panels, setPanels] = useState(6);
  const [startProblem, setStartProblem] = useState<string | null>(null);

  // The newest state the page fetched itself for each job: a tracker starts from it, so a new
  // job appears with its title and phase at once instead of its raw id and a blank bar.
  const [known, setKnown] = useState<Record<string, JobState>>({});

  const addJobs = (states: JobState[]) => {
    setKnown((current) => {
      const next = { ...current };
      for (const state of states) if ((next[state.job_id]?.seq ?? 0) < state.seq) next[state.job_id] = state;
      return next;
    });
    setJobIds((current) => {
      const fresh = states.map((state) => state.job_id).filter((id) => !current.includes(id));
      if (fresh.length === 0) return current;
      for (const id of fresh) if (!telemetry.jobs.includes(id)) telemetry.jobs.push(id);
      return [...fresh, ...current];
    });
  };

  // Generations started elsewhere (the demo's own loop, other tabs) show up here too.
  useEffect(() => {
    let live = true;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const discover = async () => {
      try {
        const jobs = await listActiveJobs(config.token);
        // Oldest first, so that prepending keeps the newest on top.
        if (live) addJobs([...jobs].reverse());
      } catch {
        // Discovery is best-effort: the trackers themselves report connection trouble.
      }
      if (live) timer = setTimeout(discover, DISCOVERY_INTERVAL_MS);
    };
    void discover();
    return () => {
      live = false;
      clearTimeout(timer);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [config.token]);

  async function onStart(event: FormEvent) {
    event.preventDefault();
    setStartProblem(null);
    try {
      const jobId = await startGeneration(config.token, panels);
      addJobs([await getJob(config.token, jobId)]);
    } catch (error) {
      setStartProblem(error instanceof Error ? error.message : String(error));
    }
  }

  return (
    <ProgressProvider client={client}>
      <section className="demo__controls" aria-label="Start a generation">
        <form onSubmit={onStart}>
          <label>
            Panels{' '}
            <input type="number" min={1} max={12} value={panels} onChange={(event) => setPanels(Number(event.target.value) || 1)} />
          </label>{' '}
          <button type="submit" className="demo__start">Start a comic</button>
        </form>
        {startProblem ? <p className="demo__problem" role="alert">{startProblem}</p> : null}
      </section>
      <ConnectionPanel client={client} engine={config.engine} />
      {jobIds.length === 0 ? <p className="demo__empty">No generation yet: start one above.</p> : null}
      <div className="demo__jobs">
        {jobIds.slice(0, MAX_SHOWN).map((jobId) => (
          <ProgressTracker key={jobId} jobId={jobId} initialState={known[jobId] ?? null} cancellable />
        ))}
      </div>
    </ProgressProvider>
  );
}

function ConnectionPanel({ client, engine }: { client: ProgressClient; engine: string }) {
  // Any watched job gives us the connection fields; null watches nothing.
  const { status, transport, error } = useGenerationProgress(null);
  const [last, setLast] = useState<{ latencyMs: number; jobId: string } | null>(null);
  const [count, setCount] = useState(0);
  useEffect(() => {
    // The first state of a job is a snapshot of how it stood when the page subscribed, maybe
    // seconds old: only the changes after it measure delivery latency.
    const snapshotSeen = new Set<string>();
    return client.onState((job) => {
      setCount((n) => n + 1);
      if (!snapshotSeen.has(job.job_id)) {
        snapshotSeen.add(job.job_id);
        return;
      }
      setLast({ latencyMs: now() - Date.parse(job.updated_at), jobId: job.job_id });
    });
  }, [client]);
  return (
    <aside className="demo__connection" aria-label="Connection">
      <dl>
        <div>
          <dt>Transport</dt>
          <dd data-testid="transport">{transport ?? 'none'}</dd>
        </div>
        <div>
          <dt>Status</dt>
          <dd data-testid="status">{status === 'closed' && !error ? 'idle (nothing running)' : status}</dd>
        </div>
        <div>
          <dt>Last update latency</dt>
          <dd data-testid="latency">{last ? `${Math.max(0, last.latencyMs).toFixed(1)} ms` : '–'}</dd>
        </div>
        <div>
          <dt>Updates received</dt>
          <dd data-testid="updates">{count}</dd>
        </div>
        <div>
          <dt>Engine</dt>
          <dd data-testid="engine">{engine}</dd>
        </div>
        {error ? (
          <div className="demo__connection-problem">
            <dt>Problem</dt>
            <dd className="demo__problem">{error.message}</dd>
          </div>
        ) : null}
      </dl>
    </aside>
  );
}
