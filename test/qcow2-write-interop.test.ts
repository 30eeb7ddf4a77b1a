// Write interop: seeded random write/zero/discard workloads through vdisk's library API
// (openImage in each of the five cache modes + BlockBackend), mirrored into a raw model;
// then qemu-img check finds no errors or leaks, qemu-img compare says the image equals the
// model, and an internal snapshot qemu-img made before still converts to what it held.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { BlockBackend } from '../src/block/backend.js';
import { CACHE_MODES, parseCacheMode } from '../src/block/cache-mode.js';
import { REQ_MAY_UNMAP } from '../src/block/driver.js';
import { formats, openImage } from '../src/block/graph.js';
import { needPeers, prng, removeDir, run, runOk, tempDir } from './helpers.js';

const qimg = (...args: string[]) => runOk('qemu-img', args);

function needQcow2Driver(t: TestContext): boolean {
  if (formats.has('qcow2')) return true;
  if (process.env.VDISK_REQUIRE_PEERS === '1') throw new Error('qcow2 driver not registered');
  t.skip('qcow2 driver not registered yet');
  return false;
}

const SIZE = 8 << 20;

/**
 * Apply `ops` seeded operations to the image through a BlockBackend and to `model` in memory.
 * Requests come in batches of four that run concurrently, each inside its own quarter of
 * the disk, so they never overlap. Discards are cluster aligned and read back as zeros.
 */
async function runWorkload(image: string, cacheMode: string, model: Buffer, seed: number, clusterSize: number, ops = 48): Promise<void> {
  const cache = parseCacheMode(cacheMode);
  const node = await openImage(image, { format: 'qcow2', cache });
  const blk = new BlockBackend(node, cache);
  const rnd = prng(seed);
  const quarter = SIZE / 4;
  try {
    for (let done = 0; done < ops; done += 4) {
      const batch: Promise<void>[] = [];
      for (let q = 0; q < 4; q++) {
        const kind = rnd();
        const base = q * quarter;
        if (kind < 0.6) {
          const len = 1 + Math.floor(rnd() * 3 * clusterSize);
          const off = base + Math.floor(rnd() * (quarter - len));
          const data = Buffer.alloc(len);
          for (let i = 0; i < len; i++) data[i] = Math.floor(rnd() * 256);
          data.copy(model, off);
          batch.push(blk.pwrite(off, data));
        } else if (kind < 0.85) {
          const len = 1 + Math.floor(rnd() * 4 * clusterSize);
          const off = base + Math.floor(rnd() * (quarter - len));
          model.fill(0, off, off + len);
          batch.push(blk.pwriteZeroes(off, len, rnd() < 0.5 ? REQ_MAY_UNMAP : 0));
        } else {
          const clusters = 1 + Math.floor(rnd() * 3);
          const first = Math.floor(rnd() * (quarter / clusterSize - clusters));
          const off = base + first * clusterSize;
          model.fill(0, off, off + clusters * clusterSize);
          batch.push(blk.pdiscard(off, clusters * clusterSize));
        }
      }
      await Promise.all(batch);
      if (rnd() < 0.2) await blk.flush();
    }
    await blk.flush();
  } finally {
    await blk.close();
  }
}

/** qemu-img check: exit 0, no errors, no leaks. */
function assertQemuCheckClean(image: string, what: string): void {
  const r = run('qemu-img', ['check', '--output=json', image]);
  assert.equal(r.status, 0, `${what}: qemu-img check exit ${r.status}: ${r.stdout}${r.stderr}`);
  const j = JSON.parse(r.stdout);
  assert.equal(j.leaks ?? 0, 0, `${what}: leaks`);
  assert.equal(j.corruptions ?? 0, 0, `${what}: corruptions`);
}

function assertSnapshotIntact(dir: string, image: string, expected: string, what: string): void {
  const out = path.join(dir, 'snapshot-view.raw');
  qimg('convert', '-l', 'snapshot.name=S', '-O', 'raw', image, out);
  assert.ok(fs.readFileSync(out).equals(fs.readFileSync(expected)), `${what}: snapshot S no longer holds what it held`);
  fs.rmSync(out);
}

test('random workloads in all five cache modes leave images qemu-img accepts and that match the model', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io') || !needQcow2Driver(t)) return;
  const dir = tempDir();
  try {
    let seed = 100;
    for (const mode of Object.keys(CACHE_MODES)) {
      for (const [cs, opts] of [[65536, 'cluster_size=64k'], [4096, 'cluster_size=4k,lazy_refcounts=on']] as const) {
        const what = `${mode} ${opts}`;
        const image = path.join(dir, `w-${mode}-${cs}.qcow2`);
        qimg('create', '-q', '-f', 'qcow2', '-o', opts, image, String(SIZE));
        runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 0 1M', '-c', 'write -P 0x62 5M 512k', image]);
        qimg('snapshot', '-c', 'S', image);
        const snapView = path.join(dir, 'snap-expected.raw');
        qimg('convert', '-O', 'raw', image, snapView);
        const model = fs.readFileSync(snapView);

        await runWorkload(image, mode, model, seed++, cs);

        const modelFile = path.join(dir, 'model.raw');
        fs.writeFileSync(modelFile, model);
        assertQemuCheckClean(image, what);
        const cmp = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, modelFile]);
        assert.equal(cmp.status, 0, `${what}: qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
        assertSnapshotIntact(dir, image, snapView, what);
        fs.rmSync(image);
      }
    }
  } finally {
    removeDir(dir);
  }
});

test('the same on top of a backing chain (raw base, qcow2 middle, qcow2 top with a snapshot)', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io') || !needQcow2Driver(t)) return;
  const dir = tempDir();
  try {
    const base = path.join(dir, 'base.raw');
    qimg('create', '-q', '-f', 'raw', base, String(SIZE));
    runOk('qemu-io', ['-f', 'raw', '-c', `write -P 0x41 0 ${SIZE}`, base]);
    const mid = path.join(dir, 'mid.qcow2');
    qimg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', mid);
    runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 2M 1M', '-c', 'write -z 6M 256k', mid]);
    let seed = 500;
    for (const mode of ['writeback', 'none', 'writethrough', 'directsync', 'unsafe']) {
      const top = path.join(dir, `top-${mode}.qcow2`);
      qimg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top);
      runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x43 3M 64k', top]);
      qimg('snapshot', '-c', 'S', top);
      const snapView = path.join(dir, 'snap-expected.raw');
      qimg('convert', '-O', 'raw', top, snapView);
      const model = fs.readFileSync(snapView);

      await runWorkload(top, mode, model, seed++, 65536, 32);

      const modelFile = path.join(dir, 'model.raw');
      fs.writeFileSync(modelFile, model);
      assertQemuCheckClean(top, `chain ${mode}`);
      assert.equal(run('qemu-img', ['check', mid]).status, 0, 'the backing file is untouched and clean');
      const cmp = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', top, modelFile]);
      assert.equal(cmp.status, 0, `chain ${mode}: qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
      assertSnapshotIntact(dir, top, snapView, `chain ${mode}`);
    }
  } finally {
    removeDir(dir);
  }
});
