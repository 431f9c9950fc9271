import { fileURLToPath } from 'node:url';
import react from '@vitejs/plugin-react';
import { defineConfig, type Plugin } from 'vite';

// The demo page. Built into the Python package, which serves this folder at /static and
// its index.html at /.
const outDir = fileURLToPath(new URL('../src/phasecast/server/static/', import.meta.url));

// The build output is generated: a self-ignoring .gitignore keeps it out of git even
// though emptyOutDir wipes the folder on every build.
function ignoreBuildOutput(): Plugin {
  return {
    name: 'phasecast-ignore-build-output',
    apply: 'build',
    generateBundle() {
      this.emitFile({ type: 'asset', fileName: '.gitignore', source: '# Built by `npm run build` in web/; not committed.\n*\n' });
    },
  };
}

export default defineConfig({
  base: '/static/',
  plugins: [react(), ignoreBuildOutput()],
  build: {
    outDir,
    emptyOutDir: true,
    // No source maps: they would triple the size of the Python wheel.
    sourcemap: false,
  },
  server: {
    // `npm run dev` against a local `phasecast demo` on port 8000.
    proxy: {
      '/v1': { target: 'http://127.0.0.1:8000', ws: true },
      '/healthz': 'http://127.0.0.1:8000',
    },
  },
});
