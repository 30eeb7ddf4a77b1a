// What a reply promises (ARCHITECTURE.md, "What the cache mode means on the wire"):
// a FLUSH reply means every write answered before it is stable; a FUA write is answered
// only once stable; without a visible write cache (writethrough, directsync) every write is.
//
// Two angles. SIGKILL right after the reply, then read the file: catches a server that
// answers while data still sits in its own memory. But in page-cache modes the file read
// sees the data through the page cache anyway, so strace shows the rest: the fdatasync on
// the image completes before the reply is written to the socket.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { needPeers, removeDir, tempDir } from './helpers.js';
import {
  CACHE_MODES, NBD_CMD_FLAG_FUA, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NbdClient, makeImage,
  patternBytes, startVdisk, stopAll, WRITEBACK_VISIBLE, type CacheMode, type Endpoint,
} from './nbd-helpers.js';
import { prng } from './helpers.js';

const MiB = 1 << 20;
const dirs: string[] = [];
after(async () => {
  await stopAll();
  for (const d of dirs) removeDir(d);
});

function newDir(): string {
  const d = tempDir('vdisk-nbd-durability-');
  dirs.push(d);
  return d;
}

describe('data survives SIGKILL once the reply promised it', () => {
  for (const mode of CACHE_MODES) {
    test(`cache=${mode}`, async () => {
      const dir = newDir();
      const img = path.join(dir, 'disk.raw');
      const size = 8 * MiB;
      makeImage(img, size);
      const ep: Endpoint = { socket: path.join(dir, 'nbd.sock') };
      const server = await startVdisk(['-f', 'raw', '--cache', mode, img], ep);
      const c = await NbdClient.connect(ep);
      const info = await c.handshake();
      const visible = WRITEBACK_VISIBLE[mode];
      assert.equal(Boolean(info.flags & NBD_FLAG_SEND_FLUSH), visible, 'NBD_FLAG_SEND_FLUSH');
      assert.equal(Boolean(info.flags & NBD_FLAG_SEND_FUA), visible, 'NBD_FLAG_SEND_FUA');

      // 48 pipelined 4 KiB writes at scattered offsets (some unaligned), then, with a
      // visible cache, a FLUSH; then one FUA write (or a plain one without a visible cache).
      const rnd = prng(7);
      const expected: { offset: number; data: Buffer }[] = [];
      for (let i = 0; i < 48; i++) {
        const offset = Math.floor(rnd() * (size / 512 - 16)) * 512 + (i % 5 === 0 ? 100 : 0);
        expected.push({ offset, data: patternBytes(4096, 100 + i) });
      }
      await c.pipelineWrites(expected);
      if (visible) await c.flush();
      const last = { offset: size - 8192, data: patternBytes(8192, 99) };
      await c.pwrite(last.offset, last.data, visible ? NBD_CMD_FLAG_FUA : 0);
      expected.push(last);

      server.signal('SIGKILL');
      const exit = await server.exited;
      c.destroy();
      assert.equal(exit.signal, 'SIGKILL', 'server was killed, not exited on its own');

      // Later writes overlap earlier ones: replay them over a model of the image.
      const model = Buffer.alloc(size);
      for (const w of expected) w.data.copy(model, w.offset);
      const file = fs.readFileSync(img);
      assert.equal(file.length, size, 'image size');
      for (const w of expected) {
        const got = file.subarray(w.offset, w.offset + w.data.length);
        assert.ok(got.equals(model.subarray(w.offset, w.offset + w.data.length)), `write at ${w.offset} missing after SIGKILL`);
      }
      await server.stop();
    });
  }
});

// ---------------------------------------------------------------------------------------
// strace: order of fdatasync and socket replies

interface Sys { idx: number; pid: string; name: string; text: string; result: string }

/**
 * Parse `strace -f -y` output into completed syscalls, in the order they completed, and
 * syscall entries (where a reply write starts). `<unfinished ...>`/`resumed` pairs are
 * joined per pid.
 */
function parseStrace(log: string): { exits: Sys[]; entries: Sys[] } {
  const exits: Sys[] = [];
  const entries: Sys[] = [];
  const pending = new Map<string, { name: string; text: string }>();
  const lines = log.split('\n');
  lines.forEach((line, idx) => {
    const m = /^(\d+)\s+(.*)$/.exec(line);
    if (!m) return;
    const [, pid, rest] = m;
    const resumed = /^<\.\.\. (\w+) resumed>(.*)$/.exec(rest);
    if (resumed) {
      const p = pending.get(pid);
      pending.delete(pid);
      const result = /\)\s+=\s+(.*)$/.exec(resumed[2])?.[1] ?? '?';
      exits.push({ idx, pid, name: resumed[1], text: (p?.text ?? '') + resumed[2], result });
      return;
    }
    const call = /^(\w+)\((.*)$/.exec(rest);
    if (!call) return;
    const [, name, args] = call;
    if (args.endsWith('<unfinished ...>')) {
      pending.set(pid, { name, text: args });
      entries.push({ idx, pid, name, text: args, result: '' });
      return;
    }
    const result = /\)\s+=\s+(.*)$/.exec(args)?.[1] ?? '?';
    entries.push({ idx, pid, name, text: args, result });
    exits.push({ idx, pid, name, text: args, result });
  });
  return { exits, entries };
}

const SOCKET_WRITES = /^(write|writev|sendmsg|sendto)$/;
const FILE_WRITES = /^(pwrite64|pwritev|pwritev2|write|writev)$/;
const SYNCS = /^(fdatasync|fsync)$/;
/** io_uring_enter(FD<anon_inode:[io_uring]>, TO_SUBMIT>0, ...) */
const RING_SUBMIT = /^\d+<anon_inode:\[io_uring\]>, [1-9]\d*,/;

/** A handle that reads as ASCII in strace's output. */
function asciiHandle(tag: string): bigint {
  return Buffer.from(tag.padEnd(8, '_').slice(0, 8), 'ascii').readBigUInt64BE(0);
}

class Trace {
  readonly exits: Sys[];
  readonly entries: Sys[];
  readonly dsyncOpen: boolean;
  constructor(log: string, private readonly img: string) {
    ({ exits: this.exits, entries: this.entries } = parseStrace(log));
    // An image opened with O_DSYNC/O_SYNC makes each data write synchronous by itself.
    this.dsyncOpen = this.exits.some((s) => s.name === 'openat' && s.text.includes(img) && /O_DSYNC|O_SYNC/.test(s.text) && !s.result.startsWith('-1'));
  }

  /** Line where the reply carrying `tag` starts being written to the socket. */
  replyAt(tag: string): number {
    // strace -x prints a string with any non-ASCII byte all in \xHH form.
    const hex = [...Buffer.from(tag, 'ascii')].map((b) => `\\x${b.toString(16).padStart(2, '0')}`).join('');
    const e = this.entries.find((s) => SOCKET_WRITES.test(s.name) && (s.text.includes(tag) || s.text.includes(hex)) && !s.text.includes(this.img));
    assert.ok(e, `no socket write carrying the reply handle ${tag} in the strace log`);
    return e.idx;
  }

  /**
   * Writes to the image: plain write syscalls on its descriptor, or io_uring_enter calls that
   * submit requests (the file driver sends buffered and O_DIRECT I/O through one ring; these
   * workloads only write, so every submission is a write).
   */
  dataWrites(from: number, to: number): Sys[] {
    return this.exits.filter((s) => s.idx > from && s.idx < to && !s.result.startsWith('-1') && (
      (FILE_WRITES.test(s.name) && s.text.includes(this.img)) ||
      (s.name === 'io_uring_enter' && RING_SUBMIT.test(s.text) && Number(s.result) > 0)));
  }

  syncs(from: number, to: number): Sys[] {
    return this.exits.filter((s) => s.idx > from && s.idx < to && SYNCS.test(s.name) && s.text.includes(this.img) && s.result === '0');
  }

  /** Data written after `from` was stable before the reply at `reply`. */
  assertStableBefore(from: number, reply: number, what: string): void {
    const writes = this.dataWrites(from, reply);
    assert.ok(writes.length > 0, `${what}: no write to the image before its reply (data held in memory?)`);
    const lastWrite = writes[writes.length - 1];
    if (this.dsyncOpen || /RWF_DSYNC|RWF_SYNC/.test(lastWrite.text)) return;
    const after = this.syncs(lastWrite.idx, reply);
    assert.ok(after.length > 0, `${what}: the reply was written to the socket with no fdatasync/fsync of the image after the data write (line ${lastWrite.idx}: ${lastWrite.name}) — reply at line ${reply}`);
  }
}

// Both I/O paths of the file driver: io_uring (default) and libuv's thread pool.
for (const ring of [true, false]) describe(`strace: the reply is written after the fdatasync (${ring ? 'io_uring' : 'VDISK_NO_URING=1'})`, () => {
  for (const mode of CACHE_MODES) {
    test(`cache=${mode}`, async (t) => {
      if (!needPeers(t, 'strace')) return;
      const dir = newDir();
      const img = path.join(dir, 'disk.raw');
      makeImage(img, 4 * MiB);
      const log = path.join(dir, 'strace.log');
      const ep: Endpoint = { socket: path.join(dir, 'nbd.sock') };
      const server = await startVdisk(['-f', 'raw', '--cache', mode, img], ep, {
        wrap: ['strace', '-f', '-qq', '-x', '-s', '256', '-y', '-o', log,
          '-e', 'trace=openat,fdatasync,fsync,pwrite64,pwritev,pwritev2,write,writev,sendmsg,sendto,io_uring_enter'],
        env: ring ? process.env : { ...process.env, VDISK_NO_URING: '1' },
        timeoutMs: 60_000,
      });
      const visible = WRITEBACK_VISIBLE[mode];
      const c = await NbdClient.connect(ep);
      try {
        await c.handshake();
        c.setNextHandle(asciiHandle('WRITE001'));
        await c.pwrite(0, patternBytes(64 * 1024, 1));
        if (visible) {
          c.setNextHandle(asciiHandle('FLUSH001'));
          await c.flush();
          c.setNextHandle(asciiHandle('FUAWRT01'));
          await c.pwrite(1 * MiB, patternBytes(4096, 2), NBD_CMD_FLAG_FUA);
        }
      } finally {
        c.destroy();
      }
      await server.stop();
      const trace = new Trace(fs.readFileSync(log, 'utf8'), img);
      const write1 = trace.replyAt('WRITE001');
      if (!visible) {
        // No visible write cache: the plain write is answered only once stable.
        trace.assertStableBefore(0, write1, `cache=${mode}: plain WRITE`);
        return;
      }
      const flush = trace.replyAt('FLUSH001');
      const fua = trace.replyAt('FUAWRT01');
      assert.ok(trace.dataWrites(0, flush).length > 0, 'the written data reached the image file before the FLUSH reply');
      if (mode === 'unsafe') {
        // cache.no-flush: FLUSH is answered without a disk barrier.
        assert.deepEqual(trace.syncs(write1, flush).map((s) => s.name), [], 'cache=unsafe must not fdatasync on FLUSH');
        return;
      }
      // Every data write before the FLUSH reply (answered or written back lazily) is
      // followed by a sync before that reply goes out.
      trace.assertStableBefore(0, flush, `cache=${mode}: FLUSH`);
      assert.ok(trace.syncs(write1, flush).length > 0, `cache=${mode}: FLUSH reply at line ${flush} not preceded by an fdatasync/fsync of the image after the WRITE reply at line ${write1}`);
      trace.assertStableBefore(flush, fua, `cache=${mode}: FUA WRITE`);
    });
  }
});
