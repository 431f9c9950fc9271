import { copyFileSync, mkdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import react from '@vitejs/plugin-react';
import { defineConfig, type Plugin } from 'vite';

// The npm package: ES module + CSS; React stays external (peer dependency).
// Type declarations come from `tsc -p tsconfig.lib.json` (see the build:lib script).
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
      entry: here('src/index.ts'),
      formats: ['es'],
      fileName: () => 'index.js',
    },
    rolldownOptions: {
      external: ['react', 'react-dom', 'react/jsx-runtime', 'react/jsx-dev-runtime'],
    },
  },
});
