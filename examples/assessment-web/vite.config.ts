import { defineConfig } from 'vite';

// The SDK ships web workers and WASM: Vite must not pre-bundle it, and workers are ES modules.
export default defineConfig({
  optimizeDeps: { exclude: ['@powersync/web', '@journeyapps/wa-sqlite'] },
  worker: { format: 'es' },
  build: { target: 'es2022' },
});
