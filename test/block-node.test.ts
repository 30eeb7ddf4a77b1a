// The generic I/O path (BlockNode) through the library API, with a recording test driver that
// has a 4 KiB request alignment and a 64 KiB maximum transfer: RMW padding, splitting, FUA
// and zero emulation, serialised overlapping RMW, flush generations, no-flush, sticky flush
// errors and bounds checks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockNode } from '../src/block/node.js';
import { BlockBackend } from '../src/block/backend.js';
import { parseCacheMode } from '../src/block/cache-mode.js';
import {
  REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK,
  type BlockDriver, type BlockLimits, type Capability, type DriverCaps,
} from '../src/block/driver.js';
import { VdiskError } from '../src/block/errors.js';
import { prng } from './helpers.js';

const ALIGN = 4096;
const MAX = 64 << 10;

interface Req {
  op: 'read' | 'write' | 'zero' | 'discard' | 'flushToOs' | 'flushToDisk';
  offset?: number;
  length?: number;
  flags?: number;
}

interface TestDriverOptions {
  size?: number;
  fua?: Capability;
  writeZeroes?: Capability;
  discard?: Capability;
  /** pwriteZeroes throws ENOTSUP (a driver that cannot zero this particular request). */
  zeroNotSupported?: boolean;
  /** Yield to the event loop a random number of times inside each request (interleaving). */
  jitter?: () => number;
}

/** Records every request; checks that what reaches it honours its own limits. */
class RecordingDriver implements BlockDriver {
  readonly driverName = 'recording';
  readonly children = {};
  readonly caps: DriverCaps;
  readonly log: Req[] = [];
  readonly data: Buffer;
  flushToDiskError: VdiskError | null = null;
  violations: string[] = [];

  constructor(private readonly o: TestDriverOptions = {}) {
    this.data = Buffer.alloc(o.size ?? 1 << 20);
    this.caps = { fua: o.fua ?? 'emulate', writeZeroes: o.writeZeroes ?? 'native', discard: o.discard ?? 'native' };
  }

  limits(): BlockLimits {
    return { requestAlignment: ALIGN, maxTransfer: MAX };
  }

  getLength(): number {
    return this.data.length;
  }

  private check(op: string, offset: number, length: number, split = true): void {
    if (offset % ALIGN !== 0 || length % ALIGN !== 0) this.violations.push(`${op} ${offset}+${length} unaligned`);
    if (split && length > MAX) this.violations.push(`${op} ${offset}+${length} larger than max transfer`);
    if (offset + length > this.data.length) this.violations.push(`${op} ${offset}+${length} past the end`);
  }

  private async pause(): Promise<void> {
    const n = this.o.jitter?.() ?? 0;
    for (let i = 0; i < n; i++) await new Promise<void>((r) => setImmediate(r));
  }

  async pread(offset: number, buf: Buffer): Promise<void> {
    this.check('read', offset, buf.length);
    this.log.push({ op: 'read', offset, length: buf.length });
    await this.pause();
    this.data.copy(buf, 0, offset, offset + buf.length);
  }

  async pwrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    this.check('write', offset, buf.length);
    this.log.push({ op: 'write', offset, length: buf.length, flags });
    // Copy the caller's bytes only after yielding: a racing RMW would clobber here.
    const copy = Buffer.from(buf);
    await this.pause();
    copy.copy(this.data, offset);
  }

  async pwriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    this.check('zero', offset, length, false);
    this.log.push({ op: 'zero', offset, length, flags });
    if (this.o.zeroNotSupported) throw new VdiskError('ENOTSUP', 'unsupported-feature', 'cannot zero here');
    await this.pause();
    this.data.fill(0, offset, offset + length);
  }

  async pdiscard(offset: number, length: number): Promise<void> {
    this.check('discard', offset, length, false);
    this.log.push({ op: 'discard', offset, length });
    this.data.fill(0, offset, offset + length);
  }

  async flushToOs(): Promise<void> {
    this.log.push({ op: 'flushToOs' });
  }

  async flushToDisk(): Promise<void> {
    this.log.push({ op: 'flushToDisk' });
    if (this.flushToDiskError) throw this.flushToDiskError;
  }

  async close(): Promise<void> {}

  ops(op: Req['op']): Req[] {
    return this.log.filter((r) => r.op === op);
  }

  clear(): void {
    this.log.length = 0;
  }
}

function setup(o: TestDriverOptions & { noFlush?: boolean; readOnly?: boolean } = {}): { drv: RecordingDriver; node: BlockNode } {
  const drv = new RecordingDriver(o);
  const rnd = prng(7);
  drv.data.forEach((_, i) => (drv.data[i] = Math.floor(rnd() * 256)));
  const node = new BlockNode(drv, { filename: 'rec', readOnly: o.readOnly ?? false, noFlush: o.noFlush ?? false });
  return { drv, node };
}

function pattern(len: number, seed: number): Buffer {
  const r = prng(seed);
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = Math.floor(r() * 256);
  return b;
}

test('unaligned read is padded to whole blocks and returns exactly the bytes asked for', async () => {
  const { drv, node } = setup();
  const buf = Buffer.alloc(5000);
  await node.pread(1000, buf);
  assert.deepEqual(drv.ops('read'), [{ op: 'read', offset: 0, length: 8192 }]);
  assert.ok(buf.equals(drv.data.subarray(1000, 6000)));
  assert.deepEqual(drv.violations, []);
});

test('unaligned write: read-modify-write of the head and tail blocks, neighbours intact', async () => {
  const { drv, node } = setup();
  const before = Buffer.from(drv.data);
  const data = pattern(5000, 1);
  await node.pwrite(1000, data);
  assert.deepEqual(drv.ops('read').map((r) => [r.offset, r.length]), [[0, 4096], [4096, 4096]]);
  assert.deepEqual(drv.ops('write').map((r) => [r.offset, r.length]), [[0, 8192]]);
  const expect = Buffer.from(before);
  data.copy(expect, 1000);
  assert.ok(drv.data.equals(expect), 'bytes around the write must survive the RMW');

  // Within one block, and a write ending exactly on a boundary (only the head is read).
  drv.clear();
  await node.pwrite(4096 * 3 + 10, Buffer.alloc(20, 0xaa));
  assert.deepEqual(drv.ops('read').map((r) => [r.offset, r.length]), [[12288, 4096]]);
  drv.clear();
  await node.pwrite(4096 * 5 + 100, Buffer.alloc(4096 - 100, 0xbb));
  assert.deepEqual(drv.ops('read').map((r) => [r.offset, r.length]), [[20480, 4096]]);
  assert.deepEqual(drv.ops('write').map((r) => [r.offset, r.length]), [[20480, 4096]]);
  drv.clear();
  await node.pwrite(8192, Buffer.alloc(8192, 0xcc));
  assert.equal(drv.ops('read').length, 0, 'an aligned write needs no read');
  assert.deepEqual(drv.violations, []);
});

test('requests larger than the maximum transfer are split into contiguous pieces', async () => {
  const { drv, node } = setup();
  const data = pattern(200 << 10, 2);
  await node.pwrite(4096, data);
  const writes = drv.ops('write');
  assert.ok(writes.length >= 4, `expected a split, got ${writes.length} write(s)`);
  let pos = 4096;
  for (const w of writes) {
    assert.equal(w.offset, pos);
    assert.ok(w.length! <= MAX);
    pos += w.length!;
  }
  assert.equal(pos, 4096 + data.length);

  drv.clear();
  const back = Buffer.alloc(300 << 10);
  await node.pread(0, back);
  assert.ok(drv.ops('read').length >= 5);
  assert.ok(back.subarray(4096, 4096 + data.length).equals(data));
  assert.deepEqual(drv.violations, []);
});

test('FUA: emulated by a flush when the driver has no native FUA, passed through when it has', async () => {
  {
    const { drv, node } = setup({ fua: 'emulate' });
    await node.pwrite(0, Buffer.alloc(4096, 1), REQ_FUA);
    const w = drv.ops('write');
    assert.equal(w.length, 1);
    assert.equal(w[0].flags! & REQ_FUA, 0, 'FUA must not reach a driver that cannot do it');
    const iw = drv.log.findIndex((r) => r.op === 'write');
    const iflush = drv.log.findIndex((r) => r.op === 'flushToDisk');
    assert.ok(iflush > iw, 'the write must be followed by a disk flush');
    // Zeroing with FUA is emulated the same way.
    drv.clear();
    await node.pwriteZeroes(8192, 4096, REQ_FUA);
    assert.equal(drv.ops('flushToDisk').length, 1);
    // Without FUA: no flush at all.
    drv.clear();
    await node.pwrite(0, Buffer.alloc(4096, 2));
    assert.equal(drv.ops('flushToDisk').length, 0);
  }
  {
    const { drv, node } = setup({ fua: 'native' });
    await node.pwrite(0, Buffer.alloc(4096, 1), REQ_FUA);
    assert.equal(drv.ops('write')[0].flags! & REQ_FUA, REQ_FUA);
    assert.equal(drv.ops('flushToDisk').length, 0);
  }
});

test('writethrough backend adds FUA to every write; writeback does not', async () => {
  {
    const { drv, node } = setup({ fua: 'emulate' });
    const blk = new BlockBackend(node, parseCacheMode('writethrough'));
    await blk.pwrite(0, Buffer.alloc(4096, 1));
    await blk.pwrite(4096, Buffer.alloc(4096, 2));
    assert.equal(drv.ops('flushToDisk').length, 2, 'each write must be stable before it completes');
  }
  {
    const { drv, node } = setup({ fua: 'emulate' });
    const blk = new BlockBackend(node, parseCacheMode('writeback'));
    await blk.pwrite(0, Buffer.alloc(4096, 1));
    assert.equal(drv.ops('flushToDisk').length, 0);
    await blk.flush();
    assert.equal(drv.ops('flushToDisk').length, 1);
  }
});

test('write-zeroes: emulated with writes when the driver cannot zero; ENOTSUP with NO_FALLBACK', async () => {
  const { drv, node } = setup({ writeZeroes: 'none' });
  await node.pwriteZeroes(4096, 3 * 4096);
  assert.equal(drv.ops('zero').length, 0, 'a driver without zeroing must never be asked to zero');
  assert.ok(drv.ops('write').length > 0);
  assert.ok(drv.data.subarray(4096, 4 * 4096).equals(Buffer.alloc(3 * 4096)));

  drv.clear();
  const before = Buffer.from(drv.data);
  await assert.rejects(node.pwriteZeroes(0, 4096, REQ_NO_FALLBACK), (e: unknown) => e instanceof VdiskError && e.code === 'ENOTSUP');
  assert.equal(drv.log.filter((r) => r.op === 'write' || r.op === 'zero').length, 0, 'fast zero must not fall back to writes');
  assert.ok(drv.data.equals(before));

  // Unaligned zeroing: partial head/tail blocks by RMW, bytes around them kept.
  drv.clear();
  const before2 = Buffer.from(drv.data);
  await node.pwriteZeroes(100, 9000);
  const expect = Buffer.from(before2);
  expect.fill(0, 100, 9100);
  assert.ok(drv.data.equals(expect));
  assert.deepEqual(drv.violations, []);
});

test('write-zeroes: a native zeroing driver is used; ENOTSUP from it falls back unless NO_FALLBACK', async () => {
  {
    const { drv, node } = setup({ writeZeroes: 'native' });
    await node.pwriteZeroes(4096, 8192, REQ_MAY_UNMAP);
    assert.deepEqual(drv.ops('zero').map((r) => [r.offset, r.length]), [[4096, 8192]]);
    assert.equal(drv.ops('write').length, 0);
    await node.pwriteZeroes(0, 4096, REQ_NO_FALLBACK);
  }
  {
    const { drv, node } = setup({ writeZeroes: 'native', zeroNotSupported: true });
    await node.pwriteZeroes(4096, 8192, REQ_MAY_UNMAP);
    assert.ok(drv.ops('write').length > 0, 'ENOTSUP must fall back to writing zeros');
    assert.ok(drv.data.subarray(4096, 12288).equals(Buffer.alloc(8192)));
    drv.clear();
    await assert.rejects(node.pwriteZeroes(4096, 8192, REQ_NO_FALLBACK), (e: unknown) => e instanceof VdiskError && e.code === 'ENOTSUP');
    assert.equal(drv.ops('write').length, 0);
  }
});

test('discard leaves partial blocks at either end alone', async () => {
  const { drv, node } = setup();
  const before = Buffer.from(drv.data);
  await node.pdiscard(1000, 3 * 4096);
  assert.deepEqual(drv.ops('discard').map((r) => [r.offset, r.length]), [[4096, 8192]]);
  assert.ok(drv.data.subarray(0, 4096).equals(before.subarray(0, 4096)));
  assert.ok(drv.data.subarray(12288).equals(before.subarray(12288)));
  drv.clear();
  await node.pdiscard(10, 100);
  assert.equal(drv.ops('discard').length, 0);
});

test('concurrent unaligned writes sharing blocks are serialised: no RMW loses bytes', async () => {
  const { drv, node } = setup({ size: 64 << 10, jitter: (() => { const r = prng(99); return () => Math.floor(r() * 4); })() });
  const before = Buffer.from(drv.data);
  const rnd = prng(1234);
  // 1) Byte-disjoint writes packed into four blocks: every write must survive completely.
  const writes: Array<{ off: number; buf: Buffer }> = [];
  let pos = 4096 + 7;
  while (pos < 5 * 4096) {
    const len = 1 + Math.floor(rnd() * 700);
    const end = Math.min(pos + len, 5 * 4096);
    writes.push({ off: pos, buf: Buffer.alloc(end - pos, 1 + (writes.length % 250)) });
    pos = end + Math.floor(rnd() * 40);
  }
  assert.ok(writes.length > 20);
  await Promise.all(writes.map((w) => node.pwrite(w.off, w.buf)));
  const expect = Buffer.from(before);
  for (const w of writes) w.buf.copy(expect, w.off);
  const firstBad = drv.data.findIndex((b, i) => b !== expect[i]);
  assert.equal(firstBad, -1, `byte ${firstBad} lost: a concurrent read-modify-write overwrote it`);

  // 2) Overlapping ones in any mix: each byte holds the value of one write covering it (in some
  //    order), and bytes no write covered keep their old value.
  const base = Buffer.from(drv.data);
  const ov: Array<{ off: number; len: number; val: number }> = [];
  for (let i = 0; i < 40; i++) {
    const off = Math.floor(rnd() * 6 * 4096);
    const len = 1 + Math.floor(rnd() * (rnd() < 0.3 ? 9000 : 600));
    ov.push({ off, len: Math.min(len, drv.data.length - off), val: 1 + i });
  }
  await Promise.all(ov.map((w, i) => (i % 5 === 4
    ? node.pwriteZeroes(w.off, w.len)
    : node.pwrite(w.off, Buffer.alloc(w.len, w.val)))));
  for (let b = 0; b < drv.data.length; b++) {
    const cands = ov.filter((w) => b >= w.off && b < w.off + w.len).map((w) => (ov.indexOf(w) % 5 === 4 ? 0 : w.val));
    if (cands.length === 0) assert.equal(drv.data[b], base[b], `byte ${b} changed though no write covered it`);
    else assert.ok(cands.includes(drv.data[b]), `byte ${b} = ${drv.data[b]}, not from any write covering it (${cands})`);
  }
  assert.deepEqual(drv.violations, []);
});

test('flush: skipped when nothing was written since the last one; flushToOs runs every time', async () => {
  const { drv, node } = setup();
  await node.flush();
  assert.equal(drv.ops('flushToDisk').length, 0, 'nothing written yet');
  await node.pwrite(0, Buffer.alloc(4096, 1));
  await node.flush();
  assert.equal(drv.ops('flushToDisk').length, 1);
  await node.flush();
  await node.flush();
  assert.equal(drv.ops('flushToDisk').length, 1, 'no new write, no new fdatasync');
  assert.equal(drv.ops('flushToOs').length, 4);
  await node.pwriteZeroes(0, 4096);
  await node.flush();
  assert.equal(drv.ops('flushToDisk').length, 2, 'write-zeroes counts as a write');
  await node.pdiscard(0, 4096);
  await node.flush();
  assert.equal(drv.ops('flushToDisk').length, 3, 'discard counts as a write');
});

test('no-flush (cache=unsafe): flushToOs runs, flushToDisk never', async () => {
  const { drv, node } = setup({ noFlush: true });
  await node.pwrite(0, Buffer.alloc(4096, 1));
  await node.flush();
  await node.pwrite(0, Buffer.alloc(4096, 2), REQ_FUA);
  await node.close();
  assert.equal(drv.ops('flushToDisk').length, 0);
  assert.ok(drv.ops('flushToOs').length >= 2);
});

test('a failed flushToDisk makes every later flush fail (sticky), even after the disk recovers', async () => {
  const { drv, node } = setup();
  await node.pwrite(0, Buffer.alloc(4096, 1));
  drv.flushToDiskError = new VdiskError('EIO', 'io', 'rec: fdatasync: Input/output error');
  await assert.rejects(node.flush(), (e: unknown) => e instanceof VdiskError && e.code === 'EIO');
  drv.flushToDiskError = null;
  await assert.rejects(node.flush(), /Input\/output error/, 'no new writes: must still fail');
  await node.pwrite(4096, Buffer.alloc(4096, 2));
  await assert.rejects(node.flush(), /Input\/output error/, 'after new writes: must still fail');
  await assert.rejects(node.pwrite(0, Buffer.alloc(4096), REQ_FUA), /Input\/output error/, 'FUA write cannot be claimed stable');
  await assert.rejects(node.close());
});

test('out-of-bounds and malformed requests are rejected before reaching the driver', async () => {
  const { drv, node } = setup();
  const size = node.getLength();
  const oob = (e: unknown) => e instanceof VdiskError && e.kind === 'out-of-bounds';
  await assert.rejects(node.pread(size - 10, Buffer.alloc(20)), oob);
  await assert.rejects(node.pread(size, Buffer.alloc(1)), oob);
  await assert.rejects(node.pwrite(size - 4096, Buffer.alloc(8192)), oob);
  await assert.rejects(node.pwriteZeroes(size, 4096), oob);
  await assert.rejects(node.pdiscard(size - 1, 2), oob);
  await assert.rejects(node.pread(-4096, Buffer.alloc(4096)), oob);
  await assert.rejects(node.pread(1.5, Buffer.alloc(10)), oob);
  await assert.rejects(node.blockStatus(size, 1), oob);
  assert.equal(drv.log.length, 0);
  // Exactly up to the end is fine.
  await node.pread(size - 10, Buffer.alloc(10));
  await node.pwrite(size - 10, Buffer.alloc(10, 3));
  assert.ok(drv.data.subarray(size - 10).equals(Buffer.alloc(10, 3)));
});

test('read-only node refuses writes, zeroes, discards and truncation with EROFS', async () => {
  const { drv, node } = setup({ readOnly: true });
  const rofs = (e: unknown) => e instanceof VdiskError && e.code === 'EROFS';
  await assert.rejects(node.pwrite(0, Buffer.alloc(4096)), rofs);
  await assert.rejects(node.pwriteZeroes(0, 4096), rofs);
  await assert.rejects(node.pdiscard(0, 4096), rofs);
  await assert.rejects(node.truncate(8192), rofs);
  assert.equal(drv.log.filter((r) => r.op !== 'read').length, 0);
});
