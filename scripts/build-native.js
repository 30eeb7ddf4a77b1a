// Builds the small addon in native/ (fallocate, SEEK_DATA/SEEK_HOLE, statx alignment) and,
// where librbd-dev is installed, the rbd addon (binding.gyp decides). vdisk works without
// either (everything reported as data, zeros written instead of holes; no rbd: driver), so a
// failed build warns instead of failing the install; `vdisk info` says which it is. When the
// rbd addon is what breaks the build, build again without it, so the other one still lands.
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
const build = (env) => spawnSync(process.execPath, [gyp, 'rebuild', '--nodedir=/usr'], { stdio: 'inherit', env });
let r = build(process.env);
if (r.status !== 0 && process.env.VDISK_NO_RBD !== '1') {
  console.warn('vdisk: build failed; building again without the rbd addon (librbd)');
  r = build({ ...process.env, VDISK_NO_RBD: '1' });
}
if (r.status !== 0) {
  console.warn('vdisk: native addon build failed; vdisk falls back to writing zeros and reporting all data');
} else if (!existsSync(path.join('build', 'Release', 'vdisk_rbd.node'))) {
  const why = process.env.VDISK_NO_RBD === '1' ? 'VDISK_NO_RBD=1' : 'librbd headers not found: apt-get install librbd-dev';
  console.warn(`vdisk: rbd addon not built (${why}); the rbd: driver is unavailable`);
}
