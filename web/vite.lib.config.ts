import { copyFileSync, mkdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import react from '@vitejs/plugin-react';
import { defineConfig, type Plugin } from 'vite';

// The npm package: two ES module entries plus CSS.
// - dist/index.js: `@phasecast/client`, the framework-free ProgressClient (no React import);
// - dist/react.js: `@phasecast/client/react`, the hook, provider and tracker. React stays
//   external (an optional peer dependency) and only this entry imports it.
// Code both entries use lands in one shared chunk, so an app that imports both gets one
// ProgressClient class. Type declarations come from `tsc -p tsconfig.lib.json`.
const here = (path: string) => fileURLToPath(new URL(path, import.meta.url));

function copyStyles(): Plugin {
  return {
    name: 'phasecast-copy-styles',
    apply: 'build',
    closeBundle() {
      mkdirSync(here('dist'), { recursive: true });
      copyFileSync(here('src/styles.css'), here('dist/styles.css'));
    },
  };
}

export default defineConfig({
  plugins: [react(), copyStyles()],
  build: {
    outDir: here('dist'),
    emptyOutDir: true,
    sourcemap: true,
    lib: {
      entry: { index: here('src/index.ts'), react: here('src/react/index.ts') },
      formats: ['es'],
      fileName: (_format, name) => `${name}.js`,
    },
    rolldownOptions: {
      external: ['react', 'react-dom', 'react/jsx-runtime', 'react/jsx-dev-runtime'],
      output: { chunkFileNames: 'shared-[hash].js' },
    },
  },
});
