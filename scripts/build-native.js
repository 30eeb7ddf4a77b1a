// Builds the small addon in native/ (fallocate, SEEK_DATA/SEEK_HOLE, statx alignment).
// vdisk works without it (everything reported as data, zeros written instead of holes),
// so a failed build warns instead of failing the install; `vdisk info` says which it is.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

function findNodeGyp() {
  if (process.env.npm_config_node_gyp && existsSync(process.env.npm_config_node_gyp)) {
    return process.env.npm_config_node_gyp;
  }
  const npmDir = path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm');
  try {
    return createRequire(path.join(npmDir, 'package.json')).resolve('node-gyp/bin/node-gyp.js');
  } catch {
    return null;
  }
}

const gyp = findNodeGyp();
if (!gyp) {
  console.warn('vdisk: node-gyp not found; the native addon is not built (no hole punching or SEEK_DATA)');
  process.exit(0);
}
const r = spawnSync(process.execPath, [gyp, 'rebuild', '--nodedir=/usr'], { stdio: 'inherit' });
if (r.status !== 0) {
  console.warn('vdisk: native addon build failed; vdisk falls back to writing zeros and reporting all data');
}
