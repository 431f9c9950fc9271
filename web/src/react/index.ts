// Public API of @phasecast/client/react: the React hook, the provider and <ProgressTracker>.
// React (18.2+ or 19) is an optional peer dependency of the package: only this entry needs it.
// Styles for the tracker: import '@phasecast/client/styles.css'.
export { ProgressProvider, useProgressClient } from './context';
export type { ProgressProviderProps } from './context';
export { useGenerationProgress } from './useGenerationProgress';
export type { GenerationProgress, UseGenerationProgressOptions } from './useGenerationProgress';
export { ProgressTracker } from './ProgressTracker';
export type { ProgressTrackerProps } from './ProgressTracker';
