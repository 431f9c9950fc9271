import type { ConnectionInfo, ConnectionStatus, ProgressError, TransportKind } from './types';

/**
 * The state of the ProgressClient's link to the server: one value, one place that changes
 * it. Every change goes through `transition`, which throws on a change the design does not
 * allow, so a bug shows up as an exception in a test instead of a client stuck half-way.
 *
 *   idle ──connect──▶ connecting ──heard──▶ open
 *    ▲                  │    ▲               │
 *    │                 lost  └──connect──┐  lost
 *    │                  ▼                │   ▼
 *    └──────idle────── waiting ──────────┘ (waiting)
 *
 * plus `refused` (the server refused the token and retrying cannot help: left only by
 * `connect` after `setToken`, or `idle`) and `switch` (a background WebSocket probe took over
 * from a fallback). Any state goes to `idle` when nothing is left to watch.
 */
export type LinkState =
  /** Nothing to watch, no link, no timer. */
  | { readonly name: 'idle' }
  /** A transport is being opened; nothing heard yet. `error`: why this is a retry, null on a fresh start. */
  | { readonly name: 'connecting'; readonly transport: TransportKind; readonly error: ProgressError | null }
  /** The transport delivers updates. */
  | { readonly name: 'open'; readonly transport: TransportKind }
  /** The last attempt failed or the link dropped; the next attempt on `transport` is scheduled. */
  | { readonly name: 'waiting'; readonly transport: TransportKind; readonly error: ProgressError }
  /** The server refused the token (or its scope) and a fresh token did not help. */
  | { readonly name: 'refused'; readonly error: ProgressError };

export type LinkEvent =
  | { readonly type: 'connect'; readonly transport: TransportKind }
  | { readonly type: 'heard' }
  | { readonly type: 'lost'; readonly error: ProgressError }
  | { readonly type: 'refused'; readonly error: ProgressError }
  | { readonly type: 'switch'; readonly transport: TransportKind }
  | { readonly type: 'idle' };

export class IllegalTransition extends Error {
  constructor(readonly state: LinkState, readonly event: LinkEvent) {
    super(`ProgressClient link: "${event.type}" is not allowed while ${describe(state)} (a bug in the client; please report it)`);
    this.name = 'IllegalTransition';
  }
}

export const IDLE: LinkState = Object.freeze({ name: 'idle' });

/** The one function that moves the link from state to state. Pure; throws IllegalTransition. */
export function transition(state: LinkState, event: LinkEvent): LinkState {
  if (event.type === 'idle') return IDLE;
  switch (state.name) {
    case 'idle':
      if (event.type === 'connect') return { name: 'connecting', transport: event.transport, error: null };
      break;
    case 'connecting':
      if (event.type === 'heard') return { name: 'open', transport: state.transport };
      if (event.type === 'lost') return { name: 'waiting', transport: state.transport, error: event.error };
      if (event.type === 'refused') return { name: 'refused', error: event.error };
      if (event.type === 'switch') return { name: 'open', transport: event.transport };
      break;
    case 'open':
      if (event.type === 'heard') return state;
      if (event.type === 'lost') return { name: 'waiting', transport: state.transport, error: event.error };
      if (event.type === 'refused') return { name: 'refused', error: event.error };
      if (event.type === 'switch') return { name: 'open', transport: event.transport };
      break;
    case 'waiting':
      if (event.type === 'connect') return { name: 'connecting', transport: event.transport, error: state.error };
      if (event.type === 'switch') return { name: 'open', transport: event.transport };
      break;
    case 'refused':
      if (event.type === 'connect') return { name: 'connecting', transport: event.transport, error: null };
      break;
  }
  throw new IllegalTransition(state, event);
}

/** What the app sees (`getConnection()`), derived from the link state. */
export function connectionInfo(state: LinkState, lastError: ProgressError | null): ConnectionInfo {
  switch (state.name) {
    case 'idle':
      return { status: 'closed', transport: null, error: null, lastError };
    case 'refused':
      return { status: 'closed', transport: null, error: state.error, lastError };
    case 'connecting':
      return { status: statusOf(state.transport, state.error ? 'reconnecting' : 'connecting'), transport: state.transport, error: state.error, lastError };
    case 'open':
      return { status: statusOf(state.transport, 'open'), transport: state.transport, error: null, lastError };
    case 'waiting':
      return { status: statusOf(state.transport, 'reconnecting'), transport: state.transport, error: state.error, lastError };
  }
}

/** On SSE or polling the status is `fallback` whatever the link is doing. */
function statusOf(transport: TransportKind, onWebSocket: ConnectionStatus): ConnectionStatus {
  return transport === 'websocket' ? onWebSocket : 'fallback';
}

function describe(state: LinkState): string {
  return 'transport' in state ? `${state.name} (${state.transport})` : state.name;
}
