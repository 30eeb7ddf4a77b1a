// qcow2 hardening (issue 7, defects 4-6):
// - freed clusters are punched only after the metadata that frees them is on disk, and a
//   queued cluster that is allocated again is not punched;
// - preallocation=metadata|falloc|full (create and resize) gives what qemu-img gives: the
//   same blocks in the file, the same qemu-img map and check;
// - a failed write of the corrupt bit is reported as such.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { getFormat, openFormatOn } from '../src/block/graph.js';
import type { BlockNode } from '../src/block/node.js';
import { openFaultInjection, type FaultRule } from '../src/filters/fault-injection.js';
import { MemoryDriver, openMemory } from '../src/protocols/memory.js';
import { needPeers, removeDir, runOk, tempDir, VDISK_BIN } from './helpers.js';

const CLUSTER = 65536;
const SIZE = 4 << 20;

/** A fresh compat=1.1 qcow2 image made by vdisk in memory. */
async function memoryImage(): Promise<Buffer> {
  const mem = openMemory(0, 'hardening');
  await getFormat('qcow2').create!(mem, {
    filename: 'hardening', size: SIZE, options: { compat: '1.1' },
    openBacking: () => Promise.reject(new Error('no backing file')),
  });
  return Buffer.from((mem.driver as MemoryDriver).data);
}

async function openOn(bytes: Buffer, faults: FaultRule[] = []) {
  const mem = openMemory(0, 'hardening');
  (mem.driver as MemoryDriver).data = bytes;
  const { node: filter, driver: log } = openFaultInjection(mem, { faults });
  const node = await openFormatOn(filter, 'hardening', { format: 'qcow2' });
  return { node, log, mem: mem.driver as MemoryDriver };
}

/** Host offset of the L2 table for guest offset 0 (L1[0]). */
function l2Table(image: Buffer): number {
  const l1 = Number(image.readBigUInt64BE(40));
  return Number(image.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
}

async function hostOf(node: BlockNode, guest: number): Promise<number | undefined> {
  return (await node.blockStatus(guest, CLUSTER))[0].hostOffset;
}

test('discard: freed clusters are punched only after the L2 change and the refcounts are on disk', async () => {
  const { node, log, mem } = await openOn(await memoryImage());
  try {
    await node.pwrite(0, Buffer.alloc(4 * CLUSTER, 0xab));
    await node.flush();
    const l2 = l2Table(mem.data);
    const start = log.log.length;
    await node.pdiscard(0, 4 * CLUSTER);
    await node.flush();
    const entries = log.log.slice(start).map((e, i) => ({ ...e, i: i + start }));
    const punch = entries.find((e) => e.kind === 'discard');
    assert.ok(punch, 'the freed clusters are punched by the flush');
    const l2Write = entries.find((e) => e.kind === 'write' && e.offset <= l2 && l2 < e.offset + e.data.length);
    assert.ok(l2Write, 'the L2 table that drops the clusters is written');
    assert.ok(l2Write.i < punch.i, `L2 write (log ${l2Write.i}) before the punch (log ${punch.i})`);
    const writesBefore = entries.filter((e) => e.kind === 'write' && e.i < punch.i).map((e) => e.i);
    const barrier = entries.find((e) => e.kind === 'flush' && e.i < punch.i && e.covers > Math.max(...writesBefore));
    assert.ok(barrier, 'a flush makes every metadata write stable before the punch');
    const buf = Buffer.alloc(4 * CLUSTER, 1);
    await node.pread(0, buf);
    assert.ok(buf.equals(Buffer.alloc(4 * CLUSTER)), 'discarded clusters read as zeros');
  } finally {
    await node.close();
  }
});

test('discard: a freed cluster allocated again before the flush is not punched', async () => {
  const { node } = await openOn(await memoryImage());
  try {
    await node.pwrite(0, Buffer.alloc(CLUSTER, 0x11));
    await node.flush();
    const freed = await hostOf(node, 0);
    await node.pdiscard(0, CLUSTER);
    const data = Buffer.alloc(CLUSTER, 0x5a);
    await node.pwrite(2 << 20, data);
    assert.equal(await hostOf(node, 2 << 20), freed, 'the freed cluster is the next one allocated');
    await node.flush();
    const back = Buffer.alloc(CLUSTER);
    await node.pread(2 << 20, back);
    assert.ok(back.equals(data), 'the reallocated cluster keeps its new data after the flush');
  } finally {
    await node.close();
  }
});

test('corrupt bit: a failed write of it is reported, not claimed', async () => {
  const first = await openOn(await memoryImage());
  await first.node.pwrite(0, Buffer.alloc(CLUSTER, 1));
  await first.node.close();
  const image = first.mem.data;
  // Point guest cluster 0 (COPIED) at the L1 table: a write there would overwrite metadata.
  const l1 = Number(image.readBigUInt64BE(40));
  image.writeBigUInt64BE((1n << 63n) | BigInt(l1), l2Table(image));

  const failing = await openOn(Buffer.from(image), [{ op: 'write', nth: 1, sticky: true, code: 'EIO' }]);
  await assert.rejects(failing.node.pwrite(0, Buffer.alloc(512, 2)), (err: Error) => {
    assert.match(err.message, /preventing invalid write on metadata/);
    assert.match(err.message, /marking the image corrupt on disk failed/);
    assert.doesNotMatch(err.message, /image marked corrupt/);
    return true;
  });
  assert.equal(failing.mem.data.readBigUInt64BE(72) & 2n, 0n, 'the bit is not on disk');
  await assert.rejects(failing.node.pwrite(CLUSTER, Buffer.alloc(512, 2)), /refusing to write/, 'later writes are refused');
  await failing.node.close();

  const ok = await openOn(Buffer.from(image));
  await assert.rejects(ok.node.pwrite(0, Buffer.alloc(512, 2)), /image marked corrupt$/);
  assert.equal(ok.mem.data.readBigUInt64BE(72) & 2n, 2n, 'the corrupt bit is on disk');
  await ok.node.close();
});

test('preallocation metadata|falloc|full on create and resize: same blocks, map and check as qemu-img', (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir('vdisk-prealloc-');
  try {
    const vd = (...args: string[]) => runOk(process.execPath, [VDISK_BIN, ...args], { timeout: 120_000 });
    const facts = (f: string) => {
      const st = fs.statSync(f);
      const check = JSON.parse(runOk('qemu-img', ['check', '--output=json', f]));
      return {
        size: st.size,
        // Allocated KiB, rounded to 64 KiB: the file system may place a block more or less.
        blocksKiB: Math.round(st.blocks / 128) * 64,
        map: JSON.parse(runOk('qemu-img', ['map', '--output=json', f])),
        check: { corruptions: check.corruptions ?? 0, leaks: check.leaks ?? 0, allocated: check['allocated-clusters'] },
      };
    };
    for (const mode of ['metadata', 'falloc', 'full']) {
      const q = path.join(dir, `q-${mode}.qcow2`);
      const v = path.join(dir, `v-${mode}.qcow2`);
      runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `preallocation=${mode}`, q, '32M']);
      vd('create', '-q', '-f', 'qcow2', '-o', `preallocation=${mode}`, v, '32M');
      assert.deepEqual(facts(v), facts(q), `create -o preallocation=${mode}`);
      const qr = path.join(dir, `qr-${mode}.qcow2`);
      const vr = path.join(dir, `vr-${mode}.qcow2`);
      runOk('qemu-img', ['create', '-q', '-f', 'qcow2', qr, '1M']);
      runOk('qemu-img', ['resize', '-q', `--preallocation=${mode}`, qr, '17M']);
      vd('create', '-q', '-f', 'qcow2', vr, '1M');
      vd('resize', '-q', `--preallocation=${mode}`, vr, '17M');
      assert.deepEqual(facts(vr), facts(qr), `resize --preallocation=${mode}`);
    }
    // The figure: a 32 MiB falloc image takes its 32 MiB of data on disk.
    assert.ok(fs.statSync(path.join(dir, 'v-falloc.qcow2')).blocks * 512 >= 32 << 20);
  } finally {
    removeDir(dir);
  }
});
