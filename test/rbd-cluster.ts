// A real Ceph cluster for the rbd tests (scripts/ceph-cluster.sh).
//
// CI starts one cluster before the suite and exports VDISK_CEPH_CONF; the rbd test files use
// it. Run alone, a file starts its own cluster in a temp dir (free monitor ports) and stops
// it when the file is done. The fault tests always start their own: they kill its OSD.
// Missing Ceph packages, or an rbd addon that was not built, skip naming the Debian package;
// with VDISK_REQUIRE_PEERS=1 they fail.
import fs from 'node:fs';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { needPeers, removeDir, REPO_ROOT, run, runOk, tempDir, type RunResult } from './helpers.js';
import { rbdStatus } from '../src/protocols/rbd.js';

export const CEPH_SCRIPT = path.join(REPO_ROOT, 'scripts', 'ceph-cluster.sh');
const MiB = 1 << 20;

export interface Cluster {
  dir: string;
  conf: string;
  pool: string;
  /** process.env plus CEPH_CONF, for vdisk, qemu-img, rbd and fio. */
  env: NodeJS.ProcessEnv;
  /** Run scripts/ceph-cluster.sh CMD on this cluster (kill-osd, start-osd, ...). */
  script(cmd: string): RunResult;
  /** `rbd --conf ... ARGS` that must succeed; returns stdout. */
  rbd(...args: string[]): string;
  /** A fresh image name in the pool (not created). */
  name(prefix?: string): string;
  stop(): void;
}

/** Ceph daemons and clients installed, and vdisk's rbd addon built. */
export function needCeph(t: TestContext): boolean {
  if (!needPeers(t, 'ceph-mon', 'ceph-osd', 'ceph', 'rbd')) return false;
  if (rbdStatus() !== 'loaded') {
    const msg = `rbd driver unavailable: ${rbdStatus()}`;
    if (process.env.VDISK_REQUIRE_PEERS === '1') throw new Error(`required peer missing: ${msg}`);
    t.skip(msg);
    return false;
  }
  return true;
}

/** qemu-img and qemu-io with their rbd block module (Debian qemu-block-extra). */
export function needQemuRbd(t: TestContext): boolean {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return false;
  const found = ['/usr/lib/x86_64-linux-gnu/qemu', '/usr/lib/aarch64-linux-gnu/qemu', '/usr/lib/qemu']
    .some((d) => fs.existsSync(path.join(d, 'block-rbd.so')));
  if (found) return true;
  const msg = "qemu-img's rbd module not installed (apt-get install qemu-block-extra)";
  if (process.env.VDISK_REQUIRE_PEERS === '1') throw new Error(`required peer missing: ${msg}`);
  t.skip(msg);
  return false;
}

let counter = 0;

function makeCluster(dir: string, conf: string, scriptEnv: NodeJS.ProcessEnv, owned: boolean): Cluster {
  const env = { ...process.env, CEPH_CONF: conf };
  let stopped = false;
  return {
    dir,
    conf,
    pool: 'rbd',
    env,
    script: (cmd) => run(CEPH_SCRIPT, [cmd, dir], { env: scriptEnv, timeout: 180_000 }),
    rbd: (...args) => runOk('rbd', ['--conf', conf, ...args], { timeout: 120_000 }),
    name: (prefix = 'img') => `${prefix}-${process.pid}-${++counter}`,
    stop() {
      if (!owned || stopped) return;
      stopped = true;
      run(CEPH_SCRIPT, ['stop', dir], { env: scriptEnv, timeout: 60_000 });
      removeDir(dir);
    },
  };
}

/**
 * A cluster of our own under a temp dir, on free monitor ports. `backend: 'bluestore'`
 * keeps data across an OSD restart (memstore does not).
 */
export function startCluster(opts: { backend?: 'memstore' | 'bluestore'; watchTimeout?: number } = {}): Cluster {
  const dir = tempDir('vdisk-ceph-');
  const scriptEnv: NodeJS.ProcessEnv = {
    ...process.env,
    CEPH_OSD_BACKEND: opts.backend ?? 'memstore',
    CEPH_MON_V2_PORT: 'auto',
    CEPH_MON_V1_PORT: 'auto',
    CEPH_MEMSTORE_BYTES: String(1024 * MiB),
    CEPH_BLUESTORE_BYTES: String(2048 * MiB),
    ...(opts.watchTimeout ? { CEPH_OSD_WATCH_TIMEOUT: String(opts.watchTimeout) } : {}),
  };
  const r = run(CEPH_SCRIPT, ['start', dir], { env: scriptEnv, timeout: 180_000 });
  if (r.status !== 0) {
    run(CEPH_SCRIPT, ['stop', dir], { env: scriptEnv, timeout: 60_000 });
    throw new Error(`ceph-cluster.sh start failed (${r.status}): ${r.stderr}`);
  }
  return makeCluster(dir, path.join(dir, 'ceph.conf'), scriptEnv, true);
}

let shared: Cluster | null = null;

/** The suite's cluster (VDISK_CEPH_CONF, started by CI), else one for this test file. */
export function sharedCluster(): Cluster {
  if (shared) return shared;
  const conf = process.env.VDISK_CEPH_CONF;
  shared = conf ? makeCluster(path.dirname(conf), conf, process.env, false) : startCluster();
  return shared;
}

/** Stop this file's own cluster, if it started one (use in `after`). */
export function stopSharedCluster(): void {
  shared?.stop();
  shared = null;
}
