#!/usr/bin/env node
// Entry point. libuv's pool does the file I/O that misses the page cache; its default 4
// threads cap the O_DIRECT queue depth at 4, so widen it before the pool starts. The pool
// reads UV_THREADPOOL_SIZE once, when it starts, and the ES module loader starts it while it
// loads an ES module entry point: so this file is CommonJS (bin/package.json) and loads
// the CLI with import() only after setting the variable.
'use strict';
process.env.UV_THREADPOOL_SIZE ??= '16';
import('../dist/src/cli/main.js').then(({ main }) => main(process.argv.slice(2)));
