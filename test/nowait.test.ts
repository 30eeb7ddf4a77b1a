// The two fast paths of the file driver that skip libuv's thread pool:
// - buffered reads/writes first try preadv2/pwritev2 with RWF_NOWAIT (page cache only) and
//   fall back to the pool on EAGAIN, a short count, or a file system without NOWAIT;
// - O_DIRECT I/O goes through the process's io_uring.
// Checked at the system-call level (strace of `vdisk io`) and at the library API (counters,
// data, errors). No timings: the benchmark (bench/foundation) measures the gain.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { openFile, nowaitStats } from '../src/protocols/file-posix.js';
import { alignedPool } from '../src/block/aligned.js';
import { native, nowait, uring } from '../src/native.js';
import { needPeers, removeDir, run, tempDir, vdisk, VDISK_BIN } from './helpers.js';

/**
 * preadv2 calls on the image and the reads that followed them, from `strace -f` output: a
 * pread64 on the thread pool, or an io_uring_enter that submits requests (ret = how many).
 */
function readCalls(log: string): Array<{ call: string; ret: string }> {
  const out: Array<{ call: string; ret: string }> = [];
  for (const line of log.split('\n')) {
    const m = /^\d+\s+(preadv2|pread64)\((\d+),.*\)\s+=\s+(-?\d+(?: \w+)?)/.exec(line);
    if (m && Number(m[2]) > 2) out.push({ call: m[1], ret: m[3] });
    const u = /^\d+\s+io_uring_enter\(\d+, (\d+),.*\)\s+=\s+(\d+)/.exec(line);
    if (u && Number(u[1]) > 0) out.push({ call: 'io_uring_enter', ret: u[2] });
  }
  return out;
}

function straceIo(dir: string, name: string, image: string, commands: string[], env: NodeJS.ProcessEnv = process.env) {
  const log = path.join(dir, `${name}.strace`);
  const args = ['-f', '-e', 'trace=preadv2,pread64,io_uring_enter', '-o', log, process.execPath, VDISK_BIN, 'io', '-f', 'raw', '-t', 'writeback'];
  for (const c of commands) args.push('-c', c);
  const r = run('strace', [...args, image], { env });
  assert.equal(r.status, 0, r.stderr);
  assert.doesNotMatch(r.stdout, /Pattern verification failed/);
  return readCalls(fs.readFileSync(log, 'utf8')).filter((c) => c.ret !== '0' || c.call === 'preadv2');
}

test('strace: a cached read is one preadv2(RWF_NOWAIT); an uncached one goes to the io_uring (or the pool)', { skip: !nowait && 'no NOWAIT in this build' }, async (t) => {
  if (!needPeers(t, 'strace')) return;
  const dir = tempDir();
  try {
    const image = path.join(dir, 'img.raw');
    fs.writeFileSync(image, Buffer.alloc(4 << 20));
    const ringOn = uring() !== null;
    for (const [name, env, slow] of [
      ['on', process.env, ringOn ? 'io_uring_enter' : 'pread64'],
      ['on-no-uring', { ...process.env, VDISK_NO_URING: '1' }, 'pread64'],
    ] as const) {
      // O_DIRECT writes drop the range from the page cache: the first buffered read misses.
      assert.equal(vdisk(['io', '-f', 'raw', '-t', 'none', '-c', 'write -P 0x5a 1M 64k', image]).status, 0);
      const calls = straceIo(dir, name, image, ['read -P 0x5a 1M 64k', 'read -P 0x5a 1M 64k'], env);
      const image64k = calls.filter((c) => c.call === slow || /^(-1 EAGAIN|65536|\d+)$/.test(c.ret));
      assert.deepEqual(image64k.slice(-3).map((c) => c.call), ['preadv2', slow, 'preadv2'], `${name}: ${JSON.stringify(calls)}`);
      const [miss, , hit] = image64k.slice(-3);
      assert.ok(miss.ret === '-1 EAGAIN' || Number(miss.ret) < 65536, `${name}: first read misses the cache: ${miss.ret}`);
      assert.equal(hit.ret, '65536', `${name}: second read is served whole from the page cache`);
    }

    const off = straceIo(dir, 'off', image, ['read -P 0x5a 1M 64k'], { ...process.env, VDISK_NO_NOWAIT: '1' });
    assert.equal(off.filter((c) => c.call === 'preadv2').length, 0, 'VDISK_NO_NOWAIT=1 turns the fast path off');
    const none = straceIo(dir, 'nonative', image, ['read -P 0x5a 1M 64k'], { ...process.env, VDISK_NO_NATIVE: '1' });
    assert.equal(none.filter((c) => c.call === 'preadv2').length, 0, 'without the addon: the pool only');
  } finally {
    removeDir(dir);
  }
});

test('strace: a file system without NOWAIT (tmpfs) is asked once per descriptor', { skip: !nowait && 'no NOWAIT in this build' }, async (t) => {
  if (!needPeers(t, 'strace')) return;
  if (!fs.existsSync('/dev/shm')) return t.skip('no /dev/shm');
  const dir = fs.mkdtempSync('/dev/shm/vdisk-nowait-');
  try {
    const image = path.join(dir, 'img.raw');
    fs.writeFileSync(image, Buffer.alloc(1 << 20, 0x33));
    const calls = straceIo(dir, 'tmpfs', image, ['read -P 0x33 0 4k', 'read -P 0x33 4k 4k', 'read -P 0x33 8k 4k']);
    const nowaitCalls = calls.filter((c) => c.call === 'preadv2');
    assert.equal(nowaitCalls.length, 1, JSON.stringify(calls));
    assert.equal(nowaitCalls[0].ret, '-1 EOPNOTSUPP');
  } finally {
    removeDir(dir);
  }
});

test('API: hits, fallbacks and EOF on the buffered path', { skip: !nowait && 'no NOWAIT in this build' }, async () => {
  const dir = tempDir();
  try {
    const file = path.join(dir, 'img.raw');
    const content = Buffer.alloc(10000);
    for (let i = 0; i < content.length; i++) content[i] = (i * 7) & 0xff;
    fs.writeFileSync(file, content); // in the page cache now
    const node = await openFile(file, { readOnly: false, direct: false, noFlush: true });
    try {
      const before = { ...nowaitStats };
      const buf = Buffer.alloc(4096);
      await node.pread(4096, buf);
      assert.deepEqual(buf, content.subarray(4096, 8192));
      assert.equal(nowaitStats.readHits - before.readHits, 1);
      // The driver reads past EOF as zeros: a short NOWAIT count, then the pool finds EOF.
      const tail = Buffer.alloc(4096, 0xff);
      await node.driver.pread(8192, tail);
      assert.deepEqual(tail.subarray(0, 10000 - 8192), content.subarray(8192));
      assert.ok(tail.subarray(10000 - 8192).every((b) => b === 0));
      const past = Buffer.alloc(512, 0xff);
      await node.driver.pread(20000, past);
      assert.ok(past.every((b) => b === 0));
      // Writes: ext4 and tmpfs refuse buffered NOWAIT writes, so the pool writes; data lands either way.
      await node.pwrite(0, Buffer.alloc(4096, 0xee));
      await node.pwrite(0, Buffer.alloc(100, 0xdd));
      const back = Buffer.alloc(4096);
      await node.pread(0, back);
      assert.ok(back.subarray(0, 100).every((b) => b === 0xdd) && back.subarray(100).every((b) => b === 0xee));
    } finally {
      await node.close();
    }
  } finally {
    removeDir(dir);
  }
});

test('io_uring: O_DIRECT data, unaligned tail, many in flight, and errno errors', { skip: !native && 'no addon' }, async (t) => {
  const ring = uring();
  if (!ring) return t.skip('io_uring unavailable');
  const dir = tempDir();
  try {
    const file = path.join(dir, 'img.raw');
    const size = (8 << 20) + 1000; // the last block is partial: written through the buffered descriptor
    fs.writeFileSync(file, Buffer.alloc(size));
    const node = await openFile(file, { readOnly: false, direct: true, noFlush: true });
    try {
      const pattern = (i: number) => Buffer.alloc(65536, (i * 37) & 0xff);
      await Promise.all(Array.from({ length: 128 }, (_, i) => node.pwrite(i * 65536, pattern(i))));
      await node.pwrite(size - 1500, Buffer.alloc(1500, 0x77));
      const bufs = Array.from({ length: 128 }, () => Buffer.alloc(65536));
      await Promise.all(bufs.map((b, i) => node.pread(i * 65536, b)));
      bufs.slice(0, -1).forEach((b, i) => assert.deepEqual(b, pattern(i), `block ${i}`));
      const end = Buffer.alloc(3000);
      await node.pread(size - 3000, end);
      assert.ok(end.subarray(0, 1500).every((b) => b === ((127 * 37) & 0xff)), 'block 127 before the tail write');
      assert.ok(end.subarray(1500).every((b) => b === 0x77));
      assert.equal(fs.statSync(file).size, size, 'the file keeps its size');
    } finally {
      await node.close();
    }
    const disk = fs.readFileSync(file);
    assert.ok(disk.subarray(5 * 65536, 6 * 65536).every((b) => b === ((5 * 37) & 0xff)));
    assert.ok(disk.subarray(size - 1500).every((b) => b === 0x77));

    const slot = await alignedPool.acquire();
    try {
      await assert.rejects(ring.read(987654, slot.subarray(0, 4096), 0)!, { code: 'EBADF' });
    } finally {
      alignedPool.release(slot);
    }
  } finally {
    removeDir(dir);
  }
});

test('io_uring: buffered writes and cache-missing reads from unaligned Buffers, many in flight, EOF', { skip: !native && 'no addon' }, async (t) => {
  const ring = uring();
  if (!ring) return t.skip('io_uring unavailable');
  const dir = tempDir();
  try {
    const file = path.join(dir, 'img.raw');
    const size = (4 << 20) + 1000;
    fs.writeFileSync(file, Buffer.alloc(size));
    const node = await openFile(file, { readOnly: false, direct: false, noFlush: true });
    try {
      const before = ring.submitted;
      // Odd offsets into one big allocation: buffered I/O needs no alignment.
      const arena = Buffer.alloc(200 * 4099);
      const piece = (i: number) => arena.subarray(i * 4099 + 3, i * 4099 + 3 + 4096).fill((i * 29) & 0xff);
      await Promise.all(Array.from({ length: 200 }, (_, i) => node.pwrite(i * 20000, piece(i))));
      assert.ok(ring.submitted - before >= 200, 'writes went to the ring (ext4 has no NOWAIT writes)');
      // A write at EOF that grows the file, then reads across the new EOF.
      await node.driver.pwrite(size, Buffer.alloc(500, 0x42), 0); // as a format driver may, after truncate
      assert.equal(fs.statSync(file).size, size + 500);
      const backs = Array.from({ length: 200 }, () => Buffer.alloc(4096));
      await Promise.all(backs.map((b, i) => node.pread(i * 20000, b)));
      backs.forEach((b, i) => assert.ok(b.every((x) => x === ((i * 29) & 0xff)), `block ${i}`));
      const end = Buffer.alloc(4096, 0xff);
      await node.driver.pread(size - 100, end);
      assert.ok(end.subarray(0, 100).every((b) => b === 0) && end.subarray(100, 600).every((b) => b === 0x42));
      assert.ok(end.subarray(600).every((b) => b === 0), 'past EOF reads as zeros');
    } finally {
      await node.close();
    }
    const disk = fs.readFileSync(file);
    assert.ok(disk.subarray(7 * 20000, 7 * 20000 + 4096).every((b) => b === ((7 * 29) & 0xff)));
    // An O_DIRECT write drops its range from the page cache: the buffered read misses, and
    // (NOWAIT saying EAGAIN) goes to the ring.
    const direct = await openFile(file, { readOnly: false, direct: true, noFlush: true });
    await direct.pwrite(1 << 20, Buffer.alloc(65536, 0x5a)).finally(() => direct.close());
    const again = await openFile(file, { readOnly: true, direct: false, noFlush: true });
    try {
      const before = ring.submitted;
      const missesBefore = nowaitStats.readFallbacks;
      const back = Buffer.alloc(65536);
      await again.pread(1 << 20, back);
      assert.ok(back.every((b) => b === 0x5a));
      if (nowaitStats.readFallbacks > missesBefore) assert.ok(ring.submitted > before, 'the cache miss was read on the ring');
    } finally {
      await again.close();
    }
    const buf = Buffer.alloc(100);
    await assert.rejects(ring.write(987654, buf, 0)!, { code: 'EBADF' });
  } finally {
    removeDir(dir);
  }
});

test('info says which fast path is on', { skip: !native && 'no addon' }, () => {
  const dir = tempDir();
  try {
    const file = path.join(dir, 'img.raw');
    fs.writeFileSync(file, Buffer.alloc(1 << 20));
    assert.match(vdisk(['info', file]).stdout + vdisk(['info', file]).stderr, /RWF_NOWAIT fast path on/);
    const off = vdisk(['info', file], { env: { ...process.env, VDISK_NO_NOWAIT: '1' } });
    assert.match(off.stdout + off.stderr, /RWF_NOWAIT fast path off \(VDISK_NO_NOWAIT=1\)/);
  } finally {
    removeDir(dir);
  }
});
