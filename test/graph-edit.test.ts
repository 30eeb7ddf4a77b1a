// Live graph edits through the library API: drained sections, replaceNode (mirror pivot and
// external snapshot shapes), setBacking, insertFilter / dropFilter, with many writers in
// flight through BlockBackends on slow drivers. Each write carries its own tag; the test
// proves every acknowledged write landed exactly once, on the node the graph had when it
// was dispatched, and that the guest sees the last write of every block afterwards.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockBackend } from '../src/block/backend.js';
import { CACHE_MODES } from '../src/block/cache-mode.js';
import type { BlockDriver, BlockLimits, DriverCaps, Extent } from '../src/block/driver.js';
import { ChildEdge } from '../src/block/edge.js';
import { VdiskError } from '../src/block/errors.js';
import { getFormat, openFormatOn } from '../src/block/graph.js';
import { appendNode, drained, dropFilter, insertFilter, replaceChild, replaceNode, setBacking } from '../src/block/graph-edit.js';
import { BlockNode } from '../src/block/node.js';
import { FaultInjectionDriver, openFaultInjection } from '../src/filters/fault-injection.js';
import { FilterDriver } from '../src/filters/filter.js';
import { RawDriver } from '../src/formats/raw.js';
import { openMemory } from '../src/protocols/memory.js';
import { prng } from './helpers.js';

const BLOCK = 4096;
const SIZE = 1 << 20;
const BLOCKS = SIZE / BLOCK;

/** One clock for the whole test: driver events and graph edits are ordered by it. */
let clock = 0;

/** Memory with random latency; logs the tag of every write it receives (start and end time). */
class SlowDriver implements BlockDriver {
  readonly driverName = 'slow';
  readonly children = {};
  caps: DriverCaps = { fua: 'native', writeZeroes: 'native', discard: 'native' };
  readonly data: Buffer;
  readonly writes: Array<{ tag: number; started: number; done: number }> = [];
  constructor(size: number, private readonly rnd: () => number, private readonly align = 1) {
    this.data = Buffer.alloc(size);
  }
  limits(): BlockLimits {
    return { requestAlignment: this.align, maxTransfer: 1 << 20 };
  }
  getLength(): number {
    return this.data.length;
  }
  private async pause(): Promise<void> {
    const n = Math.floor(this.rnd() * 6);
    for (let i = 0; i < n; i++) await new Promise<void>((r) => (this.rnd() < 0.3 ? setTimeout(r, 1) : setImmediate(r)));
  }
  async pread(offset: number, buf: Buffer): Promise<void> {
    await this.pause();
    this.data.copy(buf, 0, offset, offset + buf.length);
  }
  async pwrite(offset: number, buf: Buffer): Promise<void> {
    const started = clock++;
    await this.pause();
    buf.copy(this.data, offset);
    this.writes.push({ tag: buf.readUInt32LE(0), started, done: clock++ });
  }
  async pwriteZeroes(offset: number, length: number): Promise<void> {
    await this.pause();
    this.data.fill(0, offset, offset + length);
  }
  async pdiscard(): Promise<void> {}
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, data: true, zero: false, allocated: true }];
  }
  async close(): Promise<void> {}
}

function slowNode(name: string, seed: number, opts: { readOnly?: boolean; align?: number } = {}): { node: BlockNode; drv: SlowDriver } {
  const drv = new SlowDriver(SIZE, prng(seed), opts.align ?? 1);
  return { node: new BlockNode(drv, { filename: name, readOnly: opts.readOnly ?? false, noFlush: false }), drv };
}

/**
 * `writers` concurrent writers, each owning the blocks b with b % writers === id, writing
 * `perWriter` tagged blocks one after another through `blk`. `during` runs once a third of
 * the writes are acknowledged, while the rest keep coming. Returns, per block, the tag of
 * its last acknowledged write, and every acknowledged tag.
 */
async function writeWhile(blk: BlockBackend, during: () => Promise<void>, writers = 16, perWriter = 60, seed = 1) {
  const rnd = prng(seed);
  const last = new Map<number, number>();
  const acked = new Set<number>();
  const total = writers * perWriter;
  let started: () => void;
  const third = new Promise<void>((r) => (started = r));
  const writer = async (id: number) => {
    for (let i = 0; i < perWriter; i++) {
      const block = id + writers * Math.floor(rnd() * Math.floor(BLOCKS / writers));
      const tag = (id << 16) | (i + 1);
      const buf = Buffer.alloc(BLOCK, id + 1);
      buf.writeUInt32LE(tag, 0);
      await blk.pwrite(block * BLOCK, buf);
      last.set(block, tag);
      acked.add(tag);
      if (acked.size === Math.floor(total / 3)) started();
    }
  };
  const all = Promise.all(Array.from({ length: writers }, (_, id) => writer(id)));
  await Promise.race([third, all]);
  await during();
  await all;
  return { last, acked };
}

async function readTags(blk: BlockBackend | BlockNode): Promise<Map<number, number>> {
  const out = new Map<number, number>();
  const buf = Buffer.alloc(BLOCK);
  for (let b = 0; b < BLOCKS; b++) {
    await blk.pread(b * BLOCK, buf);
    const tag = buf.readUInt32LE(0);
    if (tag !== 0) out.set(b, tag);
  }
  return out;
}

test('drained(): new requests wait in the backend, requests in flight finish first, sections nest', async () => {
  const { node, drv } = slowNode('a', 1);
  const blk = new BlockBackend(node, CACHE_MODES.writeback);
  const inflight = Array.from({ length: 8 }, (_, i) => {
    const b = Buffer.alloc(BLOCK);
    b.writeUInt32LE(100 + i, 0);
    return blk.pwrite(i * BLOCK, b);
  });
  let held: Promise<void> | null = null;
  let heldDone = false;
  await drained(node, async () => {
    // Everything issued before the section began has reached the driver and completed.
    assert.equal(drv.writes.length, 8);
    assert.equal(blk.requestsInFlight, 0);
    const b = Buffer.alloc(BLOCK);
    b.writeUInt32LE(999, 0);
    held = blk.pwrite(20 * BLOCK, b).then(() => {
      heldDone = true;
    });
    await drained([node], async () => {
      for (let i = 0; i < 20; i++) await new Promise<void>((r) => setImmediate(r));
    });
    // The inner section ended, the outer one still holds the request.
    for (let i = 0; i < 20; i++) await new Promise<void>((r) => setImmediate(r));
    assert.equal(heldDone, false);
    assert.equal(drv.writes.length, 8);
  });
  await Promise.all(inflight);
  await held;
  assert.equal(heldDone, true);
  assert.equal(drv.writes.at(-1)!.tag, 999);
  await blk.close();
});

test('replaceNode, mirror-pivot shape: 16 writers, every write lands once, on the node the graph had', async () => {
  for (const seed of [1, 2, 3]) {
    clock = 0;
    const { node: src, drv: srcDrv } = slowNode('source', seed * 10 + 1);
    const { node: dst, drv: dstDrv } = slowNode('target', seed * 10 + 2);
    const blk = new BlockBackend(src, CACHE_MODES.writeback);
    let movedAt = -1;
    const { last, acked } = await writeWhile(blk, async () => {
      // The mirror's last pass: copy what the source holds, then pivot, in one drained section.
      await drained([src, dst], async () => {
        const buf = Buffer.alloc(SIZE);
        await src.pread(0, buf);
        await dst.pwrite(0, buf);
        movedAt = clock++;
        const moved = await replaceNode(src, dst);
        assert.deepEqual(moved, [blk.rootEdge]);
      });
    }, 16, 60, seed);
    assert.equal(blk.root, dst);
    assert.deepEqual(src.parents, []);
    assert.deepEqual(dst.parents, [blk.rootEdge]);
    // Each acknowledged write reached exactly one driver, exactly once (the copy is untagged by
    // the writer, so count the source's log and the target's guest writes only).
    const srcTags = srcDrv.writes.map((w) => w.tag);
    const dstTags = dstDrv.writes.filter((w) => w.started > movedAt).map((w) => w.tag);
    assert.equal(new Set(srcTags).size, srcTags.length, 'no write reached the source twice');
    assert.equal(new Set(dstTags).size, dstTags.length, 'no write reached the target twice');
    assert.deepEqual([...srcTags, ...dstTags].sort((a, b) => a - b), [...acked].sort((a, b) => a - b), 'none lost');
    assert.ok(srcTags.length > 0 && dstTags.length > 0, 'writes on both sides of the pivot');
    // The source saw nothing after the pivot; the target no guest write before it.
    assert.ok(srcDrv.writes.every((w) => w.done < movedAt), 'source written after the pivot');
    assert.ok(dstDrv.writes.filter((w) => w.tag !== 0 && w.started < movedAt).length <= 1, 'only the copy before the pivot');
    assert.deepEqual(await readTags(blk), last, 'guest sees the last write of every block');
    await blk.close();
    assert.equal(dst.isClosed, true);
    assert.equal(src.isClosed, false, 'the replaced node is the caller\'s to close');
    await src.close();
  }
});

/** A qcow2 overlay on a memory file, opened without a backing file (setBacking gives it one). */
async function qcow2Overlay(name: string): Promise<BlockNode> {
  const mem = openMemory(0, `${name}-file`);
  const qcow2 = getFormat('qcow2');
  await qcow2.create!(mem, { filename: name, size: SIZE, options: {}, openBacking: () => Promise.reject(new Error('none')) });
  return openFormatOn(mem, name, { format: 'qcow2' });
}

test('external snapshot shape (appendNode): the overlay\'s backing edge stays on the old node; writes go on above', async () => {
  clock = 0;
  const { node: base, drv: baseDrv } = slowNode('base', 7);
  const blk = new BlockBackend(base, CACHE_MODES.writeback);
  const overlay = await qcow2Overlay('overlay');
  let snapAt = -1;
  const { last, acked } = await writeWhile(blk, async () => {
    await drained(base, async () => {
      await appendNode(base, overlay);
      snapAt = clock++;
    });
  }, 16, 50, 7);
  assert.equal(blk.root, overlay);
  assert.equal(overlay.backing, base);
  assert.deepEqual(base.parents.map((e) => [e.role, e.parent]), [['backing', overlay]]);
  // Writes that reached the base all completed before the snapshot; the rest are in the overlay.
  assert.ok(baseDrv.writes.every((w) => w.done < snapAt));
  const inBase = new Set(baseDrv.writes.map((w) => w.tag));
  assert.ok(inBase.size > 0 && inBase.size < acked.size);
  // The guest view through the overlay: the last write of every block, old ones from the base.
  assert.deepEqual(await readTags(blk), last);
  // The base still holds exactly the pre-snapshot data: its last pre-snapshot write per block.
  const baseView = await readTags(base);
  for (const [block, tag] of baseView) assert.ok(inBase.has(tag), `block ${block}: base holds a post-snapshot write`);
  await blk.close();
  assert.equal(base.isClosed, true, 'closing the overlay closed its backing (no other parent)');
});

test('insertFilter / dropFilter under load: the filter sees exactly the writes issued while it was in', async () => {
  clock = 0;
  const { node: disk, drv } = slowNode('disk', 11);
  const blk = new BlockBackend(disk, CACHE_MODES.writeback);
  const { node: filterNode, driver: filter } = openFaultInjection(disk);
  let inAt = -1;
  let outAt = -1;
  const { last, acked } = await writeWhile(blk, async () => {
    // Clock readings inside the sections: held requests start as soon as a section ends.
    await drained(disk, async () => {
      await insertFilter(disk, filterNode);
      inAt = clock++;
    });
    assert.equal(blk.root, filterNode);
    for (let i = 0; i < 200; i++) await new Promise<void>((r) => setImmediate(r));
    await drained(disk, async () => {
      assert.equal(await dropFilter(filterNode), disk);
      outAt = clock++;
    });
  }, 12, 80, 11);
  assert.equal(blk.root, disk);
  assert.equal(filterNode.isClosed, true);
  assert.deepEqual(disk.parents, [blk.rootEdge]);
  const through = filter.log.filter((e) => e.kind === 'write').map((e) => (e as { data: Buffer }).data.readUInt32LE(0));
  const expected = drv.writes.filter((w) => w.started > inAt && w.done < outAt).map((w) => w.tag);
  assert.ok(through.length > 0, 'some writes passed the filter');
  assert.deepEqual(through.sort(), expected.sort(), 'the filter saw the writes issued while it was in, and only those');
  assert.equal(drv.writes.length, acked.size, 'every write reached the disk once');
  assert.deepEqual(await readTags(blk), last);
  await blk.close();
});

test('replaceNode skips edges that would make a loop, job edges (stayAtNode), and refuses what cannot work', async () => {
  const { node: a } = slowNode('a', 1);
  const { node: ro } = slowNode('ro', 2, { readOnly: true });
  const blk = new BlockBackend(a, CACHE_MODES.writeback);
  await assert.rejects(replaceNode(a, ro), (e: unknown) => e instanceof VdiskError && e.code === 'EPERM' && /read-only/.test(e.message));
  assert.equal(blk.root, a);
  await assert.rejects(replaceNode(a, a), /by itself/);

  // A filter whose job edge must stay on `a` while `a` is replaced by `b`.
  class JobEdgeFilter extends FilterDriver {
    readonly driverName = 'job-edge';
    constructor(child: BlockNode) {
      super(child);
      (this.children as { filtered: ChildEdge }).filtered = new ChildEdge('filtered', child, { stayAtNode: true });
    }
  }
  const job = new BlockNode(new JobEdgeFilter(a), { filename: 'job', readOnly: false, noFlush: false });
  const { node: b } = slowNode('b', 3);
  const moved = await replaceNode(a, b);
  assert.deepEqual(moved, [blk.rootEdge]);
  assert.equal(job.filtered, a, 'stayAtNode edge stayed');

  // setBacking refuses a loop; replaceChild refuses one too.
  const top = await qcow2Overlay('top');
  const mid = await qcow2Overlay('mid');
  await setBacking(top, mid);
  await assert.rejects(setBacking(mid, top), /loop/);
  await assert.rejects(replaceChild(mid.driver.children.file!, top), /loop/);
  await assert.rejects(setBacking(a, b), /has no backing file/);
  await setBacking(top, null);
  assert.equal(top.backing, null);
  assert.deepEqual(mid.parents, []);
  await Promise.all([top.close(), mid.close(), job.close(), blk.close(), a.close(), ro.close()]);
});

test('generations: a job writing zeros below a live backend invalidates the caches above it', async () => {
  const base = openMemory(SIZE, 'base');
  const top = await qcow2Overlay('top');
  await setBacking(top, base);
  const blk = new BlockBackend(top, CACHE_MODES.writeback);
  const z0 = blk.zeroGeneration;
  const c0 = top.contentGeneration;
  await base.pwrite(0, Buffer.alloc(BLOCK, 1)); // a job's write into the backing: content, not zeros
  assert.equal(blk.zeroGeneration, z0);
  assert.ok(top.contentGeneration > c0);
  await base.pwriteZeroes(0, BLOCK); // data below the export may now read as zeros
  const z1 = blk.zeroGeneration;
  assert.ok(z1 > z0);
  await blk.pdiscard(0, 65536);
  assert.ok(blk.zeroGeneration > z1);
  const z2 = blk.zeroGeneration;
  const other = openMemory(SIZE, 'other');
  await replaceChild(top.driver.children.backing!, other); // a graph edit changes what reads as zero
  assert.ok(blk.zeroGeneration > z2);
  await blk.close();
  await base.close();
});

test('filters ask their child for caps and limits every time, also after the child was replaced; raw too', async () => {
  const { node: a, drv: da } = slowNode('a', 1, { align: 512 });
  da.caps = { fua: 'emulate', writeZeroes: 'none', discard: 'none' };
  const { node: b } = slowNode('b', 2, { align: 4096 });
  const f = new BlockNode(new (class extends FilterDriver { readonly driverName = 'pass'; })(a), { filename: 'f', readOnly: false, noFlush: false });
  const raw = new BlockNode(new RawDriver(a, 0, null), { filename: 'raw', readOnly: false, noFlush: false });
  assert.equal(f.caps.writeZeroes, 'none');
  assert.equal(f.limits.requestAlignment, 512);
  assert.equal(raw.caps.writeZeroes, 'none');
  await replaceNode(a, b);
  assert.equal(f.caps.writeZeroes, 'native');
  assert.equal(f.caps.fua, 'native');
  assert.equal(f.limits.requestAlignment, 4096);
  assert.equal(raw.caps.writeZeroes, 'native');
  assert.equal(raw.file, b);
  await Promise.all([f.close(), raw.close(), a.close()]);
  assert.equal(b.isClosed, true, 'b closed with its last parent');
});

test('chain walks pass through filters: block status above, bottom, backingChainNext, info', async () => {
  const base = openMemory(SIZE, 'base');
  await base.pwrite(65536, Buffer.alloc(65536, 7));
  const top = await qcow2Overlay('top');
  await setBacking(top, base);
  await top.pwrite(0, Buffer.alloc(65536, 1));
  const plain = await top.blockStatusAbove(0, SIZE);
  const { node: filterNode } = openFaultInjection(top);
  const blk = new BlockBackend(top, CACHE_MODES.writeback);
  await insertFilter(top, filterNode);
  assert.equal(blk.root, filterNode);
  assert.deepEqual(await blk.blockStatusAbove(0, SIZE), plain);
  assert.ok(plain.some((e) => e.depth === 1), 'the backing answers for part of the range');
  assert.equal(filterNode.skipFilters(), top);
  assert.equal(filterNode.backingChainNext(), base);
  assert.equal(filterNode.bottom.filename, 'top-file');
  assert.equal((await filterNode.info()).formatSpecific?.type, 'qcow2');
  assert.ok(filterNode.canChangeBackingFile);
  const back = Buffer.alloc(65536);
  await blk.pread(65536, back);
  assert.ok(back.every((x) => x === 7));
  await blk.close();
  assert.equal(base.isClosed, true);
  // FaultInjectionDriver is a FilterDriver, its edge role `filtered`.
  assert.ok(filterNode.driver instanceof FaultInjectionDriver);
  assert.equal(filterNode.children[0].role, 'filtered');
});
