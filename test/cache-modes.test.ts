// The five cache modes, QEMU's semantics: (a) at the API, how many disk flushes a counting
// protocol driver sees under BlockNode + BlockBackend; (b) at the system-call level, what
// `vdisk io -t MODE` does to a real file under strace (O_DIRECT in the open flags, which
// writes are followed by fdatasync, what flush and close do).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { BlockBackend } from '../src/block/backend.js';
import { BlockNode } from '../src/block/node.js';
import { CACHE_MODES, parseCacheMode, type CacheModeName } from '../src/block/cache-mode.js';
import type { BlockDriver, BlockLimits, DriverCaps } from '../src/block/driver.js';
import { RawDriver } from '../src/formats/raw.js';
import { uring } from '../src/native.js';
import { needPeers, removeDir, run, tempDir, VDISK_BIN } from './helpers.js';

const MODES = Object.keys(CACHE_MODES) as CacheModeName[];

/** A protocol driver that keeps bytes in memory and counts what reaches the "disk". */
class CountingDriver implements BlockDriver {
  readonly driverName = 'counting';
  readonly children = {};
  readonly caps: DriverCaps = { fua: 'emulate', writeZeroes: 'none', discard: 'none' };
  readonly data = Buffer.alloc(1 << 20);
  writes = 0;
  diskFlushes = 0;
  limits(): BlockLimits {
    return { requestAlignment: 1, maxTransfer: 1 << 20 };
  }
  getLength(): number {
    return this.data.length;
  }
  async pread(offset: number, buf: Buffer): Promise<void> {
    this.data.copy(buf, 0, offset, offset + buf.length);
  }
  async pwrite(offset: number, buf: Buffer): Promise<void> {
    buf.copy(this.data, offset);
    this.writes++;
  }
  async flushToDisk(): Promise<void> {
    this.diskFlushes++;
  }
  async close(): Promise<void> {}
}

const N = 5;
/** Disk flushes after N writes and one flush, per mode: QEMU's semantics. */
const EXPECTED_FLUSHES: Record<CacheModeName, number> = { writeback: 1, none: 1, writethrough: N, directsync: N, unsafe: 0 };

for (const withRaw of [false, true]) {
  test(`API: disk flushes per cache mode${withRaw ? ' (raw over the protocol node)' : ''}`, async () => {
    for (const mode of MODES) {
      const cache = parseCacheMode(mode);
      const counting = new CountingDriver();
      const file = new BlockNode(counting, { filename: 'counting', readOnly: false, noFlush: cache.noFlush });
      const root = withRaw ? new BlockNode(new RawDriver(file, 0, null), { filename: 'raw', readOnly: false, noFlush: cache.noFlush }) : file;
      const backend = new BlockBackend(root, cache);
      for (let i = 0; i < N; i++) await backend.pwrite(i * 4096, Buffer.alloc(4096, i + 1));
      assert.equal(counting.writes, N);
      const beforeFlush = counting.diskFlushes;
      await backend.flush();
      assert.equal(counting.diskFlushes, EXPECTED_FLUSHES[mode], `${mode}: after ${N} writes and a flush`);
      if (!cache.writeback) assert.equal(beforeFlush, N, `${mode}: each write is stable before it completes`);
      await backend.flush();
      assert.equal(counting.diskFlushes, EXPECTED_FLUSHES[mode], `${mode}: a flush with nothing written does not reach the disk`);
      // Close after a write flushes once more, except with no-flush (unsafe).
      await backend.pwrite(0, Buffer.alloc(512, 9));
      const afterWrite = counting.diskFlushes;
      await backend.close();
      const expectClose = mode === 'unsafe' ? 0 : cache.writeback ? 1 : 0;
      assert.equal(counting.diskFlushes - afterWrite, expectClose, `${mode}: flushes at close`);
      assert.equal(counting.data[0], 9);
    }
  });
}

// ---- system calls ------------------------------------------------------------------------

interface Syscalls {
  /** Open flags of every open of the image. */
  opens: string[];
  /** 'W' for each write to the image, 'S' for each fdatasync/fsync/sync_file_range, in order. */
  events: string;
  /** For each write: was its descriptor opened with O_DIRECT? */
  writeDirect: boolean[];
  /** Writes among `events` that an io_uring_enter submitted. */
  ringWrites: number;
}

/**
 * Parse `strace -f` output. Calls interrupted by other threads appear as
 * "PID call(args <unfinished ...>" then "PID <... call resumed>rest"; they are joined and
 * placed where they completed (a write completes before the flush that depends on it starts).
 *
 * I/O on the process's io_uring shows only as io_uring_enter(ring fd, to_submit, ...) =
 * number submitted: each submitted request counts as a write, and it went through O_DIRECT
 * when every image descriptor open at that moment is O_DIRECT. (The workloads below only
 * write, to an image the test just wrote, so no read reaches the ring.) A completion is
 * delivered only after the kernel finished the write, so a sync that depends on it comes
 * later in the log. fdatasync is never put on the ring: it stays a visible system call.
 */
function parseStrace(log: string, image: string): Syscalls {
  const pending = new Map<string, string>();
  const fds = new Map<number, string>(); // image fds -> open flags
  const rings = new Set<number>();
  const out: Syscalls = { opens: [], events: '', writeDirect: [], ringWrites: 0 };
  for (const raw of log.split('\n')) {
    const m = /^(\d+)\s+(.*)$/.exec(raw);
    if (!m) continue;
    const [, pid, rest] = m;
    let line = rest;
    if (line.endsWith('<unfinished ...>')) {
      pending.set(pid, line.slice(0, -'<unfinished ...>'.length));
      continue;
    }
    const resumed = /^<\.\.\. \w+ resumed>(.*)$/.exec(line);
    if (resumed) {
      line = (pending.get(pid) ?? '') + resumed[1];
      pending.delete(pid);
    }
    const call = /^(\w+)\((.*)\)\s+=\s+(-?\d+)/.exec(line);
    if (!call) continue;
    const [, name, args, retText] = call;
    const ret = Number(retText);
    if (name === 'openat') {
      const o = /^\w+, "([^"]*)", ([A-Z_|]+)/.exec(args);
      if (!o || ret < 0) continue;
      const proc = /^\/proc\/self\/fd\/(\d+)$/.exec(o[1]);
      if (o[1] === image || (proc && fds.has(Number(proc[1])))) {
        fds.set(ret, o[2]);
        out.opens.push(o[2]);
      } else {
        fds.delete(ret);
      }
      continue;
    }
    const fd = Number(/^(\d+)/.exec(args)?.[1] ?? -1);
    if (name === 'io_uring_setup') {
      if (ret >= 0) rings.add(ret);
      continue;
    }
    if (name === 'io_uring_enter') {
      if (!rings.has(fd) || ret <= 0) continue;
      const direct = fds.size > 0 && [...fds.values()].every((flags) => flags.includes('O_DIRECT'));
      for (let i = 0; i < ret; i++) {
        out.events += 'W';
        out.writeDirect.push(direct);
        out.ringWrites++;
      }
      continue;
    }
    if (name === 'close' && rings.has(fd)) rings.delete(fd);
    if (!fds.has(fd)) continue;
    // A refused call did nothing (pwritev2 with RWF_NOWAIT says EOPNOTSUPP on ext4 and tmpfs).
    if (ret < 0 && name !== 'close') continue;
    if (name === 'close') {
      fds.delete(fd);
    } else if (name === 'pwrite64' || name === 'pwritev' || name === 'write' || name === 'pwritev2') {
      out.events += 'W';
      out.writeDirect.push(fds.get(fd)!.includes('O_DIRECT'));
    } else if (name === 'fdatasync' || name === 'fsync' || name === 'sync_file_range') {
      out.events += 'S';
    }
  }
  return out;
}

/** What each mode must do, by workload: W = a write, S = a disk sync. */
const WORKLOADS: Array<{ name: string; commands: string[]; expect: Record<CacheModeName, string> }> = [
  {
    name: 'write, write, flush',
    commands: ['write -P 0xab 0 64k', 'write 64k 64k', 'flush'],
    // writeback/none: sync on flush only (close has nothing new); writethrough/directsync:
    // a sync after every write, and the flush has nothing left; unsafe: never.
    expect: { writeback: 'WWS', none: 'WWS', writethrough: 'WSWS', directsync: 'WSWS', unsafe: 'WW' },
  },
  {
    name: 'write, flush, write, close',
    commands: ['write -P 0xab 0 64k', 'flush', 'write 64k 64k'],
    // writeback/none: one sync at the flush, one at close for the write after it.
    expect: { writeback: 'WSWS', none: 'WSWS', writethrough: 'WSWS', directsync: 'WSWS', unsafe: 'WW' },
  },
];

for (const ring of [true, false]) test(`syscalls: O_DIRECT and fdatasync placement per cache mode (strace${ring ? '' : ', VDISK_NO_URING=1'})`, async (t) => {
  if (!needPeers(t, 'strace')) return;
  // Default configuration: every write goes to the io_uring when the kernel allows one;
  // VDISK_NO_URING=1: to the thread pool as pwrite64.
  const env = ring ? process.env : { ...process.env, VDISK_NO_URING: '1' };
  const expectRing = ring && uring() !== null;
  if (!fs.existsSync(path.join(path.dirname(VDISK_BIN), '..', 'dist', 'src', 'cli', 'commands', 'io.js'))) {
    assert.fail('vdisk io is not built');
  }
  const dir = tempDir();
  try {
    for (const workload of WORKLOADS) {
      for (const mode of MODES) {
        const image = path.join(dir, `${mode}.raw`);
        fs.writeFileSync(image, Buffer.alloc(1 << 20));
        const log = path.join(dir, `${mode}.strace`);
        const args = ['-f', '-e', 'trace=openat,close,pwrite64,pwritev,pwritev2,write,fdatasync,fsync,sync_file_range,io_uring_setup,io_uring_enter', '-o', log,
          process.execPath, VDISK_BIN, 'io', '-f', 'raw', '-t', mode];
        for (const c of workload.commands) args.push('-c', c);
        const r = run('strace', [...args, image], { env });
        assert.equal(r.status, 0, `${mode}: ${r.stderr}`);
        const sc = parseStrace(fs.readFileSync(log, 'utf8'), image);
        const what = `${mode}, ${workload.name}`;
        const direct = parseCacheMode(mode).direct;
        assert.ok(sc.opens.length > 0, `${what}: image never opened`);
        for (const flags of sc.opens) {
          assert.equal(flags.includes('O_DIRECT'), direct, `${what}: open flags ${flags}`);
          assert.ok(!flags.includes('O_DSYNC') && !flags.includes('O_SYNC'), `${what}: writethrough is done by fdatasync, not ${flags}`);
        }
        assert.deepEqual(sc.writeDirect, sc.writeDirect.map(() => direct), `${what}: writes through O_DIRECT`);
        assert.equal(sc.events, workload.expect[mode], `${what}: writes (W) and syncs (S)`);
        const writes = workload.expect[mode].replaceAll('S', '').length;
        assert.equal(sc.ringWrites, expectRing ? writes : 0, `${what}: writes on the io_uring`);
        const bytes = fs.readFileSync(image);
        assert.ok(bytes.subarray(0, 65536).every((b) => b === 0xab) && bytes.subarray(65536, 131072).every((b) => b === 0xcd), `${what}: data`);
      }
    }
  } finally {
    removeDir(dir);
  }
});
