// npm run bench [-- NAME ...]: runs every bench/*.bench.js module (or those whose file name
// contains one of NAME). Each module exports `run(): Promise<void>` and prints its own
// table of vdisk vs peer, with the ratio measured in the same run.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const dir = path.dirname(fileURLToPath(import.meta.url));
const filters = process.argv.slice(2);
const files = fs.readdirSync(dir)
  .filter((f) => f.endsWith('.bench.js'))
  .filter((f) => filters.length === 0 || filters.some((s) => f.includes(s)))
  .sort();
for (const f of files) {
  console.log(`\n== ${f.replace(/\.bench\.js$/, '')} ==`);
  const mod = await import(pathToFileURL(path.join(dir, f)).href);
  await mod.run();
}
