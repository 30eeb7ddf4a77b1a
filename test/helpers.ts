// Shared test helpers: temp dirs on a real file system, running the CLI, and peers.
//
// A test whose peer is missing skips with a message naming the Debian package (as nbdkit's
// tests do). CI sets VDISK_REQUIRE_PEERS=1, which turns such a skip into a failure.
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestContext } from 'node:test';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const VDISK_BIN = path.join(REPO_ROOT, 'bin', 'vdisk.js');

/** Debian package for each peer program. */
export const PEER_PACKAGES: Record<string, string> = {
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  'qemu-nbd': 'qemu-utils',
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdsh: 'libnbd-bin',
  nbdkit: 'nbdkit',
  fio: 'fio',
  strace: 'strace',
  openssl: 'openssl',
  time: 'time',
  setpriv: 'util-linux',
  chattr: 'e2fsprogs',
  'ceph-mon': 'ceph-mon',
  'ceph-osd': 'ceph-osd',
  ceph: 'ceph-common',
  rbd: 'ceph-common',
};

export function hasProgram(name: string): boolean {
  const r = spawnSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' });
  return r.status === 0;
}

/**
 * Returns true when every program is installed. Otherwise skips the test with a message
 * naming the packages, or fails it when VDISK_REQUIRE_PEERS=1 (CI).
 */
export function needPeers(t: TestContext, ...programs: string[]): boolean {
  const missing = programs.filter((p) => !hasProgram(p));
  if (missing.length === 0) return true;
  const pkgs = [...new Set(missing.map((p) => PEER_PACKAGES[p] ?? p))].join(' ');
  const msg = `${missing.join(', ')} not installed (apt-get install ${pkgs})`;
  if (process.env.VDISK_REQUIRE_PEERS === '1') throw new Error(`required peer missing: ${msg}`);
  t.skip(msg);
  return false;
}

/** A fresh directory on a real file system (not tmpfs: O_DIRECT behaves differently there). */
export function tempDir(prefix = 'vdisk-test-'): string {
  const base = process.env.VDISK_TEST_DIR ?? '/var/tmp';
  return fs.mkdtempSync(path.join(fs.existsSync(base) ? base : os.tmpdir(), prefix));
}

export function removeDir(dir: string): void {
  fs.rmSync(dir, { recursive: true, force: true });
}

export interface RunResult {
  status: number;
  stdout: string;
  stderr: string;
}

/** Run `vdisk ARGS...` and capture its output. */
export function vdisk(args: string[], opts: { input?: string | Buffer; env?: NodeJS.ProcessEnv; timeout?: number } = {}): RunResult {
  return run(process.execPath, [VDISK_BIN, ...args], opts);
}

export function run(cmd: string, args: string[], opts: { input?: string | Buffer; env?: NodeJS.ProcessEnv; timeout?: number; cwd?: string } = {}): RunResult {
  const r: SpawnSyncReturns<string> = spawnSync(cmd, args, {
    encoding: 'utf8',
    input: opts.input,
    env: opts.env ?? process.env,
    timeout: opts.timeout ?? 120_000,
    maxBuffer: 64 << 20,
    cwd: opts.cwd,
  });
  if (r.error) throw r.error;
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Run a command that must succeed; throws with its stderr otherwise. */
export function runOk(cmd: string, args: string[], opts: { input?: string | Buffer; timeout?: number; cwd?: string } = {}): string {
  const r = run(cmd, args, opts);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr || r.stdout}`);
  return r.stdout;
}

/** Deterministic PRNG (mulberry32) for seeded workloads: the crash lab's, so seeds agree. */
export { prng } from '../src/crashlab/workload.js';
