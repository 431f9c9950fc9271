import { createContext, useContext, useEffect, useState, type ReactNode } from 'react';
import { ProgressClient, type ProgressClientOptions } from '../client/ProgressClient';

const ProgressClientContext = createContext<ProgressClient | null>(null);

export interface ProgressProviderProps {
  /** A client you created yourself (you close it). */
  client?: ProgressClient;
  /** Options for a client the provider creates and closes on unmount. Read once. */
  options?: ProgressClientOptions;
  children?: ReactNode;
}

/**
 * Shares one ProgressClient, hence one WebSocket, with every hook and tracker below it.
 * Put it once near the root of the page.
 */
export function ProgressProvider({ client, options, children }: ProgressProviderProps) {
  // Lazy state, not useMemo: React may drop memoised values, which would open a second link.
  const [owned] = useState(() => (client ? null : new ProgressClient(options)));
  useEffect(() => {
    // close() leaves the client reusable, so StrictMode's unmount-and-remount is harmless.
    return () => owned?.close();
  }, [owned]);
  return <ProgressClientContext.Provider value={client ?? owned}>{children}</ProgressClientContext.Provider>;
}

/** The page's ProgressClient. Throws with a fix when no provider is above. */
export function useProgressClient(override?: ProgressClient): ProgressClient {
  const fromContext = useContext(ProgressClientContext);
  const client = override ?? fromContext;
  if (!client) {
    throw new Error(
      'No ProgressClient: wrap the component in <ProgressProvider options={{ token }}> (or pass options.client to useGenerationProgress).',
    );
  }
  return client;
}
