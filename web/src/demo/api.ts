// The demo-only endpoints `phasecast demo` provides, plus the job listing.
import type { JobState } from '../client/types';

export interface DemoConfig {
  token: string;
  engine: string;
}

async function expectJson<T>(response: Response, what: string): Promise<T> {
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = (await response.json()) as { error?: { message?: string } };
      detail = body.error?.message ?? detail;
    } catch {
      // keep statusText
    }
    throw new Error(`${what} failed with ${response.status}: ${detail}`);
  }
  return (await response.json()) as T;
}

export async function loadDemoConfig(): Promise<DemoConfig> {
  const response = await fetch('/v1/demo/config', { cache: 'no-store' });
  if (response.status === 404) {
    throw new Error('This server has no demo endpoints: start it with `phasecast demo` to use this page.');
  }
  return expectJson<DemoConfig>(response, 'Loading /v1/demo/config');
}

export async function startGeneration(token: string, panels: number): Promise<string> {
  const response = await fetch('/v1/demo/generations', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
    body: JSON.stringify({ panels }),
  });
  const body = await expectJson<{ job_id: string }>(response, 'Starting a generation');
  return body.job_id;
}

export async function getJob(token: string, jobId: string): Promise<JobState> {
  const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}`, {
    headers: { Authorization: `Bearer ${token}` },
    cache: 'no-store',
  });
  return expectJson<JobState>(response, `Reading job ${jobId}`);
}

export async function listActiveJobs(token: string): Promise<JobState[]> {
  const response = await fetch('/v1/jobs?status=active&limit=50', {
    headers: { Authorization: `Bearer ${token}` },
    cache: 'no-store',
  });
  const body = await expectJson<{ jobs: JobState[] }>(response, 'Listing active jobs');
  return body.jobs;
}
