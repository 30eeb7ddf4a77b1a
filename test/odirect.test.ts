// O_DIRECT on ext4 (/var/tmp): the aligned pool really is aligned, unaligned requests are
// served by read-modify-write, files keep their exact size, and concurrent writes sharing
// blocks do not lose each other's bytes. Checked with qemu-io and the file's own bytes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { AlignedPool, alignedPool, SLOT_SIZE } from '../src/block/aligned.js';
import { openFile } from '../src/protocols/file-posix.js';
import type { BlockNode } from '../src/block/node.js';
import { VdiskError } from '../src/block/errors.js';
import { needPeers, prng, removeDir, runOk, tempDir } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * 1024;

function openDirect(file: string, readOnly = false): Promise<BlockNode> {
  return openFile(file, { readOnly, direct: true, noFlush: false });
}

function qemuIoRead(file: string, pattern: number, offset: number, length: number): void {
  const out = runOk('qemu-io', ['-f', 'raw', '-c', `read -P 0x${pattern.toString(16)} ${offset} ${length}`, file]);
  assert.match(out, new RegExp(`^read ${length}/${length} bytes at offset ${offset}`), out);
}

test('pool slots are aligned for O_DIRECT where plain Buffers are not', async () => {
  const dir = tempDir();
  const file = path.join(dir, 'align.raw');
  fs.writeFileSync(file, Buffer.alloc(2 * MiB));
  const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_DIRECT);
  const slot = await alignedPool.acquire();
  try {
    assert.equal(slot.length, SLOT_SIZE);
    assert.ok(alignedPool.isAligned(slot, 4096));
    for (const len of [64 * KiB, SLOT_SIZE]) {
      slot.fill(0x7e, 0, len);
      assert.equal(fs.writeSync(fd, slot, 0, len, 4096), len);
      assert.equal(fs.readSync(fd, slot, 0, len, 4096), len);
      for (const plain of [Buffer.alloc(len, 0x7e), Buffer.allocUnsafeSlow(len + 1).subarray(1)]) {
        assert.throws(() => fs.writeSync(fd, plain, 0, len, 4096), { code: 'EINVAL' });
        assert.throws(() => fs.readSync(fd, plain, 0, len, 4096), { code: 'EINVAL' });
      }
    }
  } finally {
    alignedPool.release(slot);
    fs.closeSync(fd);
    removeDir(dir);
  }
  assert.ok(fs.constants.O_DIRECT > 0);
});

test('pool waits first come first served when exhausted and rejects foreign buffers', async () => {
  const pool = new AlignedPool(64 * KiB, 2);
  const a = await pool.acquire();
  const b = await pool.acquire();
  assert.notEqual(a.byteOffset, b.byteOffset);
  const order: string[] = [];
  const c = pool.acquire().then((buf) => (order.push('c'), buf));
  const d = pool.acquire().then((buf) => (order.push('d'), buf));
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(order, [], 'nothing free: waiters wait');
  assert.equal(pool.busy, 2);
  pool.release(b);
  const cBuf = await c;
  assert.deepEqual(order, ['c']);
  assert.equal(cBuf.byteOffset, b.byteOffset);
  pool.release(a);
  await d;
  assert.deepEqual(order, ['c', 'd']);
  assert.throws(() => pool.release(Buffer.alloc(64 * KiB)), /not a slot/);
  pool.release(cBuf);
  assert.throws(() => pool.release(cBuf), /not a slot/, 'double release');
  assert.equal(pool.busy, 1);
});

test('unaligned O_DIRECT requests read back with qemu-io', async (t) => {
  if (!needPeers(t, 'qemu-io')) return;
  const dir = tempDir();
  try {
    const file = path.join(dir, 'd.raw');
    fs.writeFileSync(file, Buffer.alloc(4 * MiB));
    const node = await openDirect(file);
    const align = node.driver.limits().requestAlignment;
    assert.ok(align >= 512, `O_DIRECT alignment ${align}`);
    assert.match((await node.driver.info!()).notes!.join('\n'), /O_DIRECT, request alignment/);

    await node.pwrite(511, Buffer.alloc(1, 0xa1));
    await node.pwrite(4095, Buffer.alloc(4097, 0xa2));
    const big = Buffer.alloc(MiB + 3);
    const rnd = prng(3);
    for (let i = 0; i < big.length; i++) big[i] = Math.floor(rnd() * 256);
    await node.pwrite(12345 + 2 * MiB, big);
    // Reads of the same unaligned ranges through the driver.
    const one = Buffer.alloc(3);
    await node.pread(510, one);
    assert.deepEqual([...one], [0, 0xa1, 0]);
    const mid = Buffer.alloc(4099);
    await node.pread(4094, mid);
    assert.equal(mid[0], 0);
    assert.ok(mid.subarray(1, 4098).every((b) => b === 0xa2));
    assert.equal(mid[4098], 0);
    const bigBack = Buffer.alloc(big.length);
    await node.pread(12345 + 2 * MiB, bigBack);
    assert.ok(bigBack.equals(big));
    await node.close();

    qemuIoRead(file, 0, 0, 511);
    qemuIoRead(file, 0xa1, 511, 1);
    qemuIoRead(file, 0, 512, 3583);
    qemuIoRead(file, 0xa2, 4095, 4097);
    qemuIoRead(file, 0, 8192, 2 * MiB + 12345 - 8192);
    const bytes = fs.readFileSync(file);
    assert.equal(bytes.length, 4 * MiB);
    assert.ok(bytes.subarray(12345 + 2 * MiB, 12345 + 3 * MiB + 3).equals(big));
    assert.ok(bytes.subarray(12345 + 3 * MiB + 3).every((b) => b === 0));
  } finally {
    removeDir(dir);
  }
});

test('O_DIRECT on a file whose size is not aligned keeps the size exactly', async (t) => {
  if (!needPeers(t, 'qemu-io')) return;
  const dir = tempDir();
  try {
    const file = path.join(dir, 'odd.raw');
    const size = 3 * 4096 + 1000;
    fs.writeFileSync(file, Buffer.alloc(size, 0x10));
    const node = await openDirect(file);
    assert.equal(node.getLength(), size);
    // The last partial block: a write inside it, one ending at EOF, one spanning into it.
    await node.pwrite(size - 500, Buffer.alloc(10, 0xb1));
    await node.pwrite(size - 7, Buffer.alloc(7, 0xb2));
    await node.pwrite(4096 * 2 + 100, Buffer.alloc(4096, 0xb3));
    // Reading the tail (the direct read comes back short and is zero-filled internally).
    const tail = Buffer.alloc(1000);
    await node.pread(size - 1000, tail);
    const expected = Buffer.alloc(size, 0x10);
    expected.fill(0xb1, size - 500, size - 490);
    expected.fill(0xb2, size - 7, size);
    expected.fill(0xb3, 4096 * 2 + 100, 4096 * 3 + 100);
    assert.ok(tail.equals(expected.subarray(size - 1000)));
    // Zeroing up to EOF goes through the same path (head/tail become padded writes).
    await node.pwriteZeroes(size - 300, 300);
    expected.fill(0, size - 300);
    assert.equal(node.getLength(), size);
    await node.close();
    const bytes = fs.readFileSync(file);
    assert.equal(bytes.length, size, 'file size unchanged');
    assert.ok(bytes.equals(expected));
    qemuIoRead(file, 0x10, size - 310, 10);
    qemuIoRead(file, 0, size - 300, 300);
    qemuIoRead(file, 0xb1, size - 500, 10);
  } finally {
    removeDir(dir);
  }
});

test('concurrent unaligned writes sharing blocks equal the same writes done one by one', async () => {
  const dir = tempDir();
  try {
    const size = 2 * MiB + 3000;
    // Byte-disjoint writes whose edges share blocks, so each one's RMW overlaps its neighbours'.
    const rnd = prng(11);
    const writes: Array<{ off: number; buf: Buffer }> = [];
    for (let off = 17; off < size - 9000;) {
      const len = 1 + Math.floor(rnd() * 9000);
      const buf = Buffer.alloc(len);
      for (let i = 0; i < len; i++) buf[i] = Math.floor(rnd() * 256);
      writes.push({ off, buf });
      off += len + Math.floor(rnd() * 3);
    }
    writes.push({ off: size - 5, buf: Buffer.from([1, 2, 3, 4, 5]) });
    const expected = Buffer.alloc(size, 0xee);
    for (const w of writes) w.buf.copy(expected, w.off);

    const results: Buffer[] = [];
    for (const concurrent of [false, true]) {
      const file = path.join(dir, `c${concurrent}.raw`);
      fs.writeFileSync(file, Buffer.alloc(size, 0xee));
      const node = await openDirect(file);
      const order = [...writes].sort(() => rnd() - 0.5);
      if (concurrent) await Promise.all(order.map((w) => node.pwrite(w.off, w.buf)));
      else for (const w of order) await node.pwrite(w.off, w.buf);
      await node.close();
      results.push(fs.readFileSync(file));
    }
    assert.ok(writes.length > 200, `${writes.length} writes`);
    assert.equal(results[1].length, size);
    assert.ok(results[0].equals(expected), 'sequential');
    assert.ok(results[1].equals(results[0]), 'concurrent equals sequential');
    assert.equal(alignedPool.busy, 0, 'every slot came back');
  } finally {
    removeDir(dir);
  }
});

test('a file system without O_DIRECT gets a one-line error naming cache.direct=off', async () => {
  // procfs has no direct I/O: open(O_DIRECT) fails with EINVAL there, as on old tmpfs or FUSE.
  await assert.rejects(openDirect('/proc/self/status', true), (e: VdiskError) =>
    e instanceof VdiskError && e.message === "Could not open '/proc/self/status': file system does not support O_DIRECT; use cache.direct=off (cache mode writeback or writethrough)");
  const dir = tempDir();
  try {
    await assert.rejects(openDirect(dir, true), (e: VdiskError) => e.message === `Could not open '${dir}': Is a directory`);
  } finally {
    removeDir(dir);
  }
});
