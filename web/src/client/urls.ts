/** Joins the configured base with an API path, keeping any path prefix of the base. */
export function apiUrl(baseUrl: string, path: string, params: Record<string, string | number | null | undefined> = {}): string {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== '') query.set(key, String(value));
  }
  const text = query.toString();
  return `${baseUrl}${path}${text ? `?${text}` : ''}`;
}

/** `http(s)://` → `ws(s)://`, as the WebSocket constructor wants. */
export function toWebSocketUrl(httpUrl: string): string {
  return httpUrl.replace(/^http(s?):\/\//i, (_match, secure: string) => `ws${secure}://`);
}

/** The same URL with the token blanked, for error messages: tokens never go into logs. */
export function redactToken(url: string): string {
  return url.replace(/(access_token=)[^&]*/g, '$1…');
}

export function jobPath(jobId: string, suffix = ''): string {
  return `/v1/jobs/${encodeURIComponent(jobId)}${suffix}`;
}

/** job_id rule from the protocol; checked locally so a typo fails fast with a clear message. */
export const JOB_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;
