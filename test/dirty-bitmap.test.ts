// Dirty bitmaps: the paged bitmap against a plain boolean-array model under random set,
// reset, merge, resize and serialise operations; and marking through the generic write
// path (BlockNode) for writes, write-zeroes, discards, enabled and disabled; growth leaves the new area clean (as QEMU).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DirtyBitmap, defaultGranularity } from '../src/block/dirty-bitmap.js';
import { openMemory } from '../src/protocols/memory.js';
import { prng } from './helpers.js';

/** The obvious model: one boolean per granule. */
class Model {
  bits: boolean[];
  constructor(public size: number, public gran: number) {
    this.bits = new Array(Math.ceil(size / gran)).fill(false);
  }
  set(off: number, len: number): void {
    if (len <= 0) return;
    for (let b = Math.floor(off / this.gran); b < Math.min(this.bits.length, Math.ceil((off + len) / this.gran)); b++) this.bits[b] = true;
  }
  reset(off: number, len: number): void {
    if (len <= 0) return;
    const end = off + len >= this.size ? this.bits.length : Math.floor((off + len) / this.gran);
    for (let b = Math.ceil(off / this.gran); b < end; b++) this.bits[b] = false;
  }
  ranges(): Array<{ offset: number; length: number }> {
    const out: Array<{ offset: number; length: number }> = [];
    for (let b = 0; b < this.bits.length; b++) {
      if (!this.bits[b]) continue;
      const s = b;
      while (b < this.bits.length && this.bits[b]) b++;
      out.push({ offset: s * this.gran, length: Math.min(this.size, b * this.gran) - s * this.gran });
    }
    return out;
  }
  serialize(): Uint8Array {
    const out = new Uint8Array(Math.ceil(this.bits.length / 8));
    this.bits.forEach((v, i) => { if (v) out[i >> 3] |= 1 << (i & 7); });
    return out;
  }
}

test('paged bitmap equals a boolean model under random operations (pages, partial granules, tail)', () => {
  for (const [gran, size] of [[512, 3 * 2 ** 20 + 300], [65536, 2 ** 34 + 12345], [4096, 1 << 30]] as const) {
    const rnd = prng(gran);
    // Sizes up to 2^34 bytes at 64 KiB: 262,144 bits, a little over one page; 2^30 at 4 KiB: one page exactly.
    const bm = new DirtyBitmap({ name: 'b', granularity: gran, size });
    const model = new Model(size, gran);
    for (let i = 0; i < 400; i++) {
      const off = Math.floor(rnd() * size);
      const len = Math.floor(rnd() * Math.min(size - off, rnd() < 0.2 ? size : gran * 3000)) + 1;
      if (rnd() < 0.65) { bm.set(off, len); model.set(off, len); } else { bm.reset(off, len); model.reset(off, len); }
      if (i % 50 === 0) {
        assert.deepEqual([...bm.dirtyRanges()], model.ranges());
        assert.equal(bm.count(), model.bits.filter(Boolean).length * gran);
      }
    }
    assert.deepEqual([...bm.dirtyRanges()], model.ranges());
    const ser = new Uint8Array(bm.serializedSize);
    bm.serialize(0, ser);
    assert.deepEqual(Buffer.from(ser), Buffer.from(model.serialize()));
    // Round trip through the serialised form, in uneven pieces.
    const back = new DirtyBitmap({ name: 'c', granularity: gran, size });
    for (let p = 0; p < ser.length; p += 777) back.deserialize(p, ser.subarray(p, p + 777));
    assert.deepEqual([...back.dirtyRanges()], model.ranges());
    // nextDirty / nextClean agree with the model at random points.
    for (let k = 0; k < 50; k++) {
      const off = Math.floor(rnd() * size);
      const b = Math.floor(off / gran);
      const d = model.bits.indexOf(true, b);
      const c = model.bits.indexOf(false, b);
      assert.equal(bm.nextDirty(off), d < 0 ? -1 : Math.max(off, d * gran));
      assert.equal(bm.nextClean(off), c < 0 ? -1 : Math.max(off, c * gran));
    }
  }
});

test('merge of equal and different granularities, copy, clear, resize', () => {
  const a = new DirtyBitmap({ name: 'a', granularity: 4096, size: 1 << 24 });
  const b = new DirtyBitmap({ name: 'b', granularity: 65536, size: 1 << 24 });
  a.set(5000, 10);
  b.set(1 << 20, 1);
  a.merge(b);
  assert.deepEqual([...a.dirtyRanges()], [{ offset: 4096, length: 4096 }, { offset: 1 << 20, length: 65536 }]);
  const c = a.copy('c');
  a.clear();
  assert.equal(a.count(), 0);
  assert.equal(c.count(), 4096 + 65536);
  c.resize(1 << 20);
  assert.deepEqual([...c.dirtyRanges()], [{ offset: 4096, length: 4096 }]);
  c.resize(1 << 21);
  assert.equal(c.count(), 4096, 'growing adds clean bits');
  assert.throws(() => new DirtyBitmap({ name: 'x', granularity: 1000, size: 1 }), /power of 2/);
  assert.throws(() => new DirtyBitmap({ name: 'x', granularity: 256, size: 1 }), /at least 512/);
  assert.equal(defaultGranularity(512), 4096);
  assert.equal(defaultGranularity(2 << 20), 65536);
});

test('the generic write path marks enabled bitmaps for writes, zeroes and discards; growth adds clean bits', async () => {
  const node = openMemory(1 << 22);
  const on = new DirtyBitmap({ name: 'on', granularity: 65536, size: node.getLength() });
  const off = new DirtyBitmap({ name: 'off', granularity: 65536, size: node.getLength(), enabled: false });
  node.addBitmap(on);
  node.addBitmap(off);
  assert.throws(() => node.addBitmap(new DirtyBitmap({ name: 'on', granularity: 65536, size: 1 })), /already exists/);
  await node.pwrite(100, Buffer.alloc(10, 1));
  await node.pwriteZeroes(3 << 20, 70000);
  await node.pdiscard(1 << 21, 65536);
  assert.deepEqual([...on.dirtyRanges()], [
    { offset: 0, length: 65536 }, { offset: 1 << 21, length: 65536 }, { offset: 3 << 20, length: 131072 },
  ]);
  assert.equal(off.count(), 0, 'a disabled bitmap records nothing');
  await node.truncate((1 << 22) + 65536);
  assert.ok(!on.get(1 << 22), 'grown space starts clean, as in QEMU');
  assert.equal(on.size, (1 << 22) + 65536);
  assert.equal(node.findBitmap('off'), off);
  node.removeBitmap(off);
  assert.equal(node.findBitmap('off'), undefined);
});
