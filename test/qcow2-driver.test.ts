// qcow2 driver behaviours, checked against qemu-img / qemu-io: images we create and write are
// clean for `qemu-img check` and read back byte-equal through qemu-img; images qemu wrote read
// back byte-equal through us; snapshots survive our writes; lazy-refcount repair; corrupt bit.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, openImage } from '../src/block/graph.js';
import { REQ_MAY_UNMAP, REQ_WRITE_COMPRESSED } from '../src/block/driver.js';
import { VdiskError } from '../src/block/errors.js';
import type { BlockNode } from '../src/block/node.js';
import { needPeers, prng, removeDir, run, runOk, tempDir } from './helpers.js';

function pattern(len: number, seed: number): Buffer {
  const r = prng(seed);
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i += 4) b.writeUInt32LE((r() * 2 ** 32) >>> 0, i - (i + 4 > len ? i + 4 - len : 0));
  return b;
}

/** qemu-img check must find nothing (exit 0, no leaks, no errors). */
function assertClean(file: string): void {
  const r = run('qemu-img', ['check', '--output=json', file]);
  assert.equal(r.status, 0, `qemu-img check ${file}: ${r.stdout}${r.stderr}`);
  const j = JSON.parse(r.stdout);
  assert.equal(j['check-errors'], 0);
  assert.equal(j['corruptions'] ?? 0, 0);
  assert.equal(j['leaks'] ?? 0, 0, `leaks in ${file}`);
}

/** The guest contents as qemu-img sees them. */
function qemuRead(file: string, dir: string, extra: string[] = []): Buffer {
  const out = path.join(dir, `qread-${Math.random().toString(36).slice(2)}.raw`);
  runOk('qemu-img', ['convert', ...extra, '-O', 'raw', file, out]);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

async function readAll(n: BlockNode): Promise<Buffer> {
  const b = Buffer.alloc(n.getLength());
  await n.pread(0, b);
  return b;
}

/** Apply a seeded mix of writes, zero writes and discards to the image and to a model. */
async function workload(n: BlockNode, model: Buffer, seed: number, ops: number, v3: boolean): Promise<void> {
  const r = prng(seed);
  const size = model.length;
  for (let i = 0; i < ops; i++) {
    const kind = r();
    const off = Math.floor(r() * size);
    const len = Math.max(1, Math.min(size - off, Math.floor(r() * 200_000)));
    if (kind < 0.7) {
      const data = pattern(len, seed * 1000 + i);
      await n.pwrite(off, data);
      data.copy(model, off);
    } else if (kind < 0.85 || !v3) {
      await n.pwriteZeroes(off, len, r() < 0.5 ? REQ_MAY_UNMAP : 0);
      model.fill(0, off, off + len);
    } else {
      // Discard on v3 reads back as zeros for whole clusters; partial clusters are kept.
      // The model accepts only those two answers, byte by byte, before it follows the image.
      await n.pdiscard(off, len);
      const after = Buffer.alloc(len);
      await n.pread(off, after);
      for (let b = 0; b < len; b++) {
        if (after[b] !== 0 && after[b] !== model[off + b]) {
          assert.fail(`discard ${off}+${len}: byte ${off + b} reads ${after[b]}, neither the old ${model[off + b]} nor 0`);
        }
      }
      after.copy(model, off);
    }
  }
}

test('images we create and write are clean and read back equal through qemu-img', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    const variants: Array<{ name: string; size: number; options: Record<string, string> }> = [
      { name: 'default', size: 8 << 20, options: {} },
      { name: 'c512-r1', size: 2 << 20, options: { cluster_size: '512', refcount_bits: '1' } },
      { name: 'c512-r64', size: 4 << 20, options: { cluster_size: '512', refcount_bits: '64' } },
      { name: 'c4k-r8', size: 8 << 20, options: { cluster_size: '4096', refcount_bits: '8' } },
      { name: 'c2m', size: 12 << 20, options: { cluster_size: '2M' } },
      { name: 'v2', size: 8 << 20, options: { compat: '0.10' } },
      { name: 'lazy', size: 8 << 20, options: { lazy_refcounts: 'on' } },
    ];
    for (const [i, v] of variants.entries()) {
      const file = path.join(dir, `${v.name}.qcow2`);
      await createImage(file, { format: 'qcow2', size: v.size, options: v.options });
      assertClean(file);
      const model = Buffer.alloc(v.size);
      const n = await openImage(file);
      await workload(n, model, 11 + i, 40, v.options.compat !== '0.10');
      assert.ok((await readAll(n)).equals(model), `${v.name}: our read-back differs from the model`);
      await n.close();
      assertClean(file);
      assert.ok(qemuRead(file, dir).equals(model), `${v.name}: qemu-img reads different data`);
      // Reopen and read back through us after a clean close.
      const again = await openImage(file, { readOnly: true });
      assert.ok((await readAll(again)).equals(model), `${v.name}: reopened read-back differs`);
      await again.close();
      const info = JSON.parse(runOk('qemu-img', ['info', '--output=json', file]));
      assert.equal(info['dirty-flag'], false);
    }
  } finally {
    removeDir(dir);
  }
});

test('images qemu-io wrote read back byte-equal through us (cluster sizes, zero clusters, compressed)', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    for (const cs of ['512', '4k', '64k', '1M']) {
      const file = path.join(dir, `q-${cs}.qcow2`);
      runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, file, '6M']);
      runOk('qemu-io', ['-f', 'qcow2',
        '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 1500k 700k', '-c', 'write -z 512k 256k',
        '-c', 'write -P 0x33 5000k 3000', '-c', 'discard 3M 1M', '-c', 'write -z -u 1M 128k', file]);
      const expected = qemuRead(file, dir);
      const n = await openImage(file, { readOnly: true });
      assert.ok((await readAll(n)).equals(expected), `cluster_size=${cs}: we read different data than qemu-img`);
      await n.close();
    }
    // Compressed (zlib) clusters written by qemu-img convert -c.
    const raw = path.join(dir, 'src.raw');
    const half = Buffer.concat([Buffer.alloc(1 << 20, 'compressible text '), pattern(1 << 20, 5)]);
    fs.writeFileSync(raw, half);
    const comp = path.join(dir, 'comp.qcow2');
    runOk('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, comp]);
    const n = await openImage(comp, { readOnly: true });
    assert.ok((await readAll(n)).equals(half), 'compressed image reads back different data');
    const ext = await n.blockStatus(0, 65536);
    assert.equal(ext[0].data, true);
    assert.equal(ext[0].hostOffset, undefined, 'compressed clusters have no host offset');
    await n.close();
  } finally {
    removeDir(dir);
  }
});

test('compressed writes through us are compressed, clean and readable by qemu-img', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    const file = path.join(dir, 'c.qcow2');
    await createImage(file, { format: 'qcow2', size: 4 << 20, options: {} });
    const n = await openImage(file);
    const data = Buffer.concat([Buffer.alloc(2 << 20, 'abcabcabd'), pattern(1 << 20, 9), Buffer.alloc(1 << 20)]);
    await n.pwrite(0, data, REQ_WRITE_COMPRESSED);
    // Overwrite one compressed cluster partially: COW from the compressed data.
    const patch = pattern(1000, 3);
    await n.pwrite(70000, patch);
    patch.copy(data, 70000);
    await n.close();
    assertClean(file);
    const check = JSON.parse(runOk('qemu-img', ['check', '--output=json', file]));
    assert.ok(check['compressed-clusters'] >= 30, `expected compressed clusters, got ${check['compressed-clusters']}`);
    assert.ok(qemuRead(file, dir).equals(data));
    const size = fs.statSync(file).size;
    assert.ok(size < 2 << 20, `compressed image is ${size} bytes`);
  } finally {
    removeDir(dir);
  }
});

test('backing chains: COW from the backing file, map matches qemu-img, partial writes', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const base = path.join(dir, 'base.qcow2');
    runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', base, '3M']);
    runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 2M', '-c', 'write -z 256k 64k', base]);
    const top = path.join(dir, 'top.qcow2');
    await createImage(top, { format: 'qcow2', size: 4 << 20, backingFile: 'base.qcow2', backingFormat: 'qcow2', options: { cluster_size: '64k' } });
    const model = Buffer.alloc(4 << 20);
    model.fill(0x5a, 0, 2 << 20);
    model.fill(0, 256 << 10, 320 << 10);
    const n = await openImage(top);
    assert.ok((await readAll(n)).equals(model), 'overlay does not read through to the backing file');
    for (const [off, len, seed] of [[100, 10, 1], [65536 * 3 + 7, 70000, 2], [2 * 1024 * 1024 - 5, 20, 3], [3 << 20, 4096, 4]]) {
      const d = pattern(len, seed);
      await n.pwrite(off, d);
      d.copy(model, off);
    }
    await n.pwriteZeroes(1 << 20, 128 << 10, 0);
    model.fill(0, 1 << 20, (1 << 20) + (128 << 10));
    await n.pdiscard(1536 << 10, 64 << 10);
    model.fill(0, 1536 << 10, 1600 << 10);
    const ours = await n.blockStatusAbove(0, n.getLength());
    await n.close();
    assertClean(top);
    assert.ok(qemuRead(top, dir).equals(model), 'qemu-img reads the overlay differently');
    const info = JSON.parse(runOk('qemu-img', ['info', '--output=json', top]));
    assert.equal(info['backing-filename'], 'base.qcow2');
    assert.equal(info['backing-filename-format'], 'qcow2');
    // qemu-img map: depth/present/zero/data per range must agree with our chain walk.
    const theirs = JSON.parse(runOk('qemu-img', ['map', '--output=json', top])) as Array<Record<string, unknown>>;
    // (Offsets past the end of the backing file are left out: QEMU reports them at depth 0,
    // which is BlockNode.blockStatusAbove's business.)
    for (const o of [0, 100, 65536 * 3, 256 << 10, 1 << 20, 1536 << 10, 2 << 20, (3 << 20) - 1]) {
      const q = theirs.find((e) => (e.start as number) <= o && o < (e.start as number) + (e.length as number))!;
      const u = ours.find((e) => e.offset <= o && o < e.offset + e.length)!;
      const qs = [q.depth, q.zero, q.data, q.offset !== undefined];
      const us = [u.depth, u.zero, u.data, u.hostOffset !== undefined];
      assert.deepEqual(us, qs, `map differs at ${o}: qemu ${JSON.stringify(q)} ours ${JSON.stringify(u)}`);
    }
  } finally {
    removeDir(dir);
  }
});

test('internal snapshots made by qemu-img survive our writes', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const file = path.join(dir, 's.qcow2');
    runOk('qemu-img', ['create', '-q', '-f', 'qcow2', file, '4M']);
    runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 0 3M', file]);
    const before = qemuRead(file, dir);
    runOk('qemu-img', ['snapshot', '-c', 'snap1', file]);
    const n = await openImage(file);
    const info = await n.driver.info!();
    assert.equal(info.snapshots?.length, 1);
    assert.equal(info.snapshots?.[0].name, 'snap1');
    const model = Buffer.from(before);
    // Partial, whole-cluster and zero writes over clusters the snapshot shares.
    for (const [off, len, seed] of [[10, 100, 1], [65536, 131072, 2], [1 << 20, 300000, 3]]) {
      const d = pattern(len, seed);
      await n.pwrite(off, d);
      d.copy(model, off);
    }
    await n.pwriteZeroes(2 << 20, 65536, REQ_MAY_UNMAP);
    model.fill(0, 2 << 20, (2 << 20) + 65536);
    await n.pdiscard(2621440, 131072);
    model.fill(0, 2621440, 2621440 + 131072);
    await n.close();
    assertClean(file);
    assert.ok(qemuRead(file, dir, ['-l', 'snapshot.name=snap1']).equals(before), 'the snapshot changed');
    assert.ok(qemuRead(file, dir).equals(model), 'the active layer is wrong');
    const qi = JSON.parse(runOk('qemu-img', ['info', '--output=json', file]));
    assert.equal(qi.snapshots[0].name, 'snap1');
    assert.equal(qi.snapshots[0]['date-sec'], info.snapshots?.[0]['date-sec']);
  } finally {
    removeDir(dir);
  }
});

test('concurrent overlapping writes are serialised correctly', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    const file = path.join(dir, 'p.qcow2');
    await createImage(file, { format: 'qcow2', size: 4 << 20, options: { cluster_size: '4k' } });
    const n = await openImage(file);
    // Non-overlapping sub-cluster writes to the same clusters, all in flight at once: every
    // one must survive (a lost COW or double allocation would drop some). (Write i covers
    // [i*1000 + i%3, +997): never past (i+1)*1000. Overlapping writes in flight together
    // have no defined order, in QEMU as here.)
    const model = Buffer.alloc(4 << 20);
    const jobs: Promise<void>[] = [];
    for (let i = 0; i < 400; i++) {
      const off = i * 1000 + (i % 3);
      const d = pattern(997, 100 + i);
      d.copy(model, off);
      jobs.push(n.pwrite(off, d));
    }
    await Promise.all(jobs);
    assert.ok((await readAll(n)).equals(model));
    await n.close();
    assertClean(file);
    assert.ok(qemuRead(file, dir).equals(model));
  } finally {
    removeDir(dir);
  }
});

test('lazy refcounts: a dirty image left by a killed qemu-io is repaired on writable open', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const file = path.join(dir, 'd.qcow2');
    runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4k', file, '8M']);
    // qemu-io killed with SIGKILL after writing: the dirty bit stays set, refcounts are stale.
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 1M', '-c', 'write -P 0x43 4M 512k', '-c', 'sigraise 9', file]);
    let info = JSON.parse(runOk('qemu-img', ['info', '--output=json', '-U', file]));
    assert.equal(info['dirty-flag'], true, 'qemu-io did not leave the image dirty');
    assert.notEqual(run('qemu-img', ['check', file]).status, 0, 'qemu-img check should see stale refcounts');
    // Read-only open leaves it dirty.
    const ro = await openImage(file, { readOnly: true });
    const b = Buffer.alloc(16);
    await ro.pread(4 << 20, b);
    assert.ok(b.equals(Buffer.alloc(16, 0x43)));
    await ro.close();
    info = JSON.parse(runOk('qemu-img', ['info', '--output=json', file]));
    assert.equal(info['dirty-flag'], true);
    // Writable open repairs, clears the bit; then our writes keep it clean.
    const n = await openImage(file);
    const d = pattern(70000, 4);
    await n.pwrite(6 << 20, d);
    await n.close();
    info = JSON.parse(runOk('qemu-img', ['info', '--output=json', file]));
    assert.equal(info['dirty-flag'], false);
    assertClean(file);
    const all = qemuRead(file, dir);
    assert.ok(all.subarray(0, 1 << 20).equals(Buffer.alloc(1 << 20, 0x42)));
    assert.ok(all.subarray(4 << 20, (4 << 20) + (512 << 10)).equals(Buffer.alloc(512 << 10, 0x43)));
    assert.ok(all.subarray(6 << 20, (6 << 20) + 70000).equals(d));
  } finally {
    removeDir(dir);
  }
});

test('lazy refcounts: our own unclean shutdown leaves the dirty bit, which we repair', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    const file = path.join(dir, 'l.qcow2');
    await createImage(file, { format: 'qcow2', size: 8 << 20, options: { lazy_refcounts: 'on', cluster_size: '4k' } });
    const n = await openImage(file);
    const d = pattern(300000, 8);
    await n.pwrite(12345, d);
    // Write the L2 tables but not the refcount blocks: what a crash with lazy refcounts leaves.
    const drv = n.driver as unknown as { l2Cache: { flush(): Promise<void> } };
    await drv.l2Cache.flush();
    const info = JSON.parse(runOk('qemu-img', ['info', '--output=json', '-U', file]));
    assert.equal(info['dirty-flag'], true);
    assert.notEqual(run('qemu-img', ['check', '-U', file]).status, 0, 'refcounts should be stale before repair');
    // Abandon n (no close), reopen: repair.
    const m = await openImage(file);
    const r = Buffer.alloc(d.length);
    await m.pread(12345, r);
    assert.ok(r.equals(d));
    await m.close();
    assertClean(file);
  } finally {
    removeDir(dir);
  }
});

test('corrupt bit: read-only open works, writable open is refused saying why', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const file = path.join(dir, 'x.qcow2');
    runOk('qemu-img', ['create', '-q', '-f', 'qcow2', file, '1M']);
    runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x7 0 64k', file]);
    const fd = fs.openSync(file, 'r+');
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, 79);
    fs.writeSync(fd, Buffer.from([b[0] | 2]), 0, 1, 79); // incompatible_features bit 1
    fs.closeSync(fd);
    await assert.rejects(openImage(file), (e: unknown) => e instanceof VdiskError && e.kind === 'corrupt-image' && /corrupt/.test(e.message) && /read-only/.test(e.message));
    const n = await openImage(file, { readOnly: true });
    const r = Buffer.alloc(10);
    await n.pread(0, r);
    assert.ok(r.equals(Buffer.alloc(10, 7)));
    assert.equal((await n.driver.info!()).formatSpecific?.data.corrupt, true);
    await n.close();
    // Unknown incompatible bit: refused, naming it.
    const fd2 = fs.openSync(file, 'r+');
    fs.writeSync(fd2, Buffer.from([0x04, 0, 0]), 0, 3, 77); // bit 18, clear corrupt
    fs.closeSync(fd2);
    await assert.rejects(openImage(file, { readOnly: true }), /Unsupported IMAGE feature\(s\): Unknown incompatible feature: 18/);
  } finally {
    removeDir(dir);
  }
});

test('a guest write that would land on metadata marks the image corrupt', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    const file = path.join(dir, 'm.qcow2');
    await createImage(file, { format: 'qcow2', size: 1 << 20, options: {} });
    let n = await openImage(file);
    await n.pwrite(0, Buffer.alloc(65536, 1));
    await n.close();
    // Point guest cluster 0 at the refcount table (cluster 1), keeping COPIED.
    const l2 = 4 * 65536; // L1 at cluster 3, first L2 table allocated at cluster 4
    const fd = fs.openSync(file, 'r+');
    const e = Buffer.alloc(8);
    e.writeBigUInt64BE((1n << 63n) | 65536n);
    fs.writeSync(fd, e, 0, 8, l2);
    fs.closeSync(fd);
    n = await openImage(file);
    await assert.rejects(n.pwrite(0, Buffer.alloc(512, 9)), /metadata/);
    await n.close().catch(() => {});
    const info = JSON.parse(runOk('qemu-img', ['info', '--output=json', file]));
    assert.equal(info['format-specific'].data.corrupt, true);
  } finally {
    removeDir(dir);
  }
});

test('resize, backing change, makeEmpty, preallocation and info', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    // Grow past the L1 table of a 512-byte-cluster image (L1 entry maps 32 KiB).
    const file = path.join(dir, 'r.qcow2');
    await createImage(file, { format: 'qcow2', size: 64 << 10, options: { cluster_size: '512' } });
    let n = await openImage(file);
    const d = pattern(5000, 1);
    await n.pwrite(1000, d);
    await n.truncate(3 << 20);
    assert.equal(n.getLength(), 3 << 20);
    const d2 = pattern(9000, 2);
    await n.pwrite((3 << 20) - 9000, d2);
    await n.close();
    assertClean(file);
    let all = qemuRead(file, dir);
    assert.equal(all.length, 3 << 20);
    assert.ok(all.subarray(1000, 6000).equals(d));
    assert.ok(all.subarray((3 << 20) - 9000).equals(d2));

    // Backing file change and makeEmpty (commit's last step).
    const base = path.join(dir, 'base.raw');
    fs.writeFileSync(base, Buffer.alloc(3 << 20, 0x44));
    n = await openImage(file, { backing: false });
    await n.driver.changeBackingFile!('base.raw', 'raw');
    await n.driver.makeEmpty!();
    await n.close();
    assertClean(file);
    const info = JSON.parse(runOk('qemu-img', ['info', '--output=json', file]));
    assert.equal(info['backing-filename'], 'base.raw');
    assert.equal(info['backing-filename-format'], 'raw');
    all = qemuRead(file, dir);
    assert.ok(all.equals(Buffer.alloc(3 << 20, 0x44)), 'after makeEmpty the image should read its backing file');
    n = await openImage(file);
    assert.ok((await readAll(n)).equals(all));
    await n.close();

    for (const mode of ['metadata', 'falloc', 'full']) {
      const p = path.join(dir, `pre-${mode}.qcow2`);
      await createImage(p, { format: 'qcow2', size: 3 << 20, options: { preallocation: mode, cluster_size: '64k' } });
      assertClean(p);
      const check = JSON.parse(runOk('qemu-img', ['check', '--output=json', p]));
      assert.equal(check['allocated-clusters'], 48, `${mode}: every cluster should be allocated`);
      assert.ok(qemuRead(p, dir).equals(Buffer.alloc(3 << 20)));
    }

    const v2 = path.join(dir, 'v2.qcow2');
    await createImage(v2, { format: 'qcow2', size: 1 << 20, options: { compat: '0.10' } });
    n = await openImage(v2);
    const i2 = await n.driver.info!();
    assert.deepEqual(i2.formatSpecific, { type: 'qcow2', data: { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 } });
    await n.close();
    const q2 = JSON.parse(runOk('qemu-img', ['info', '--output=json', v2]));
    assert.deepEqual(q2['format-specific'], i2.formatSpecific);
  } finally {
    removeDir(dir);
  }
});

test('zstd compressed clusters: qemu-img wrote them, we read; we write them, qemu-img reads', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    const raw = path.join(dir, 'z.raw');
    const data = Buffer.concat([pattern(512 << 10, 7), Buffer.alloc(1 << 20, 'zstd text '), Buffer.alloc(512 << 10)]);
    fs.writeFileSync(raw, data);
    const theirs = path.join(dir, 'theirs.qcow2');
    runOk('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', raw, theirs]);
    let n = await openImage(theirs, { readOnly: true });
    assert.equal((await n.driver.info!()).formatSpecific?.data['compression-type'], 'zstd');
    assert.ok((await readAll(n)).equals(data), 'zstd image from qemu-img reads back different data');
    await n.close();
    const ours = path.join(dir, 'ours.qcow2');
    await createImage(ours, { format: 'qcow2', size: data.length, options: { compression_type: 'zstd' } });
    n = await openImage(ours);
    await n.pwrite(0, data, REQ_WRITE_COMPRESSED);
    await n.close();
    assertClean(ours);
    const check = JSON.parse(runOk('qemu-img', ['check', '--output=json', ours]));
    assert.ok(check['compressed-clusters'] >= 16);
    assert.ok(qemuRead(ours, dir).equals(data));
  } finally {
    removeDir(dir);
  }
});
