#!/usr/bin/env node
// Entry point. libuv's pool does all file I/O; 4 threads cap queue depth, so widen it
// before the pool starts (it reads the variable once, on first use).
process.env.UV_THREADPOOL_SIZE ??= '16';
const { main } = await import('../dist/src/cli/main.js');
await main(process.argv.slice(2));
