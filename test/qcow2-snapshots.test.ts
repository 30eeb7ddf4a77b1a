// Internal snapshots (issue 8; qemu-iotests 058, 062, 217): `vdisk snapshot -c/-a/-d/-l`
// against qemu-img snapshot on the same steps, snapshots made by either tool applied and
// deleted by the other, and the driver's API (createSnapshot, applySnapshot, deleteSnapshot,
// listSnapshots) on several layouts. qemu-img check and qemu-io are the judges.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { getFormat, openFormatOn, openImage } from '../src/block/graph.js';
import { SyncedImage, buildState, materialise } from '../src/crashlab/states.js';
import { openFaultInjection } from '../src/filters/fault-injection.js';
import { MemoryDriver, openMemory } from '../src/protocols/memory.js';
import { REQ_MAY_UNMAP, REQ_WRITE_COMPRESSED } from '../src/block/driver.js';
import type { Qcow2Driver } from '../src/formats/qcow2/qcow2.js';
import { needPeers, removeDir, run, runOk, tempDir, vdisk } from './helpers.js';

const qimg = (...args: string[]) => runOk('qemu-img', args);
const qio = (file: string, ...cmds: string[]) => runOk('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file]);

/** qemu-io verifies every pattern (exit 0 and no "verification failed"). */
function reads(file: string, ...cmds: string[]): void {
  const r = run('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file]);
  assert.equal(r.status, 0, r.stderr);
  assert.doesNotMatch(r.stdout + r.stderr, /failed|error/i, `${file}: ${cmds.join('; ')}\n${r.stdout}${r.stderr}`);
}

function assertClean(file: string, what: string): void {
  const r = run('qemu-img', ['check', '--output=json', file]);
  assert.equal(r.status, 0, `${what}: qemu-img check exit ${r.status}: ${r.stdout}${r.stderr}`);
  const j = JSON.parse(r.stdout);
  assert.equal(j.corruptions ?? 0, 0, `${what}: corruptions`);
  assert.equal(j.leaks ?? 0, 0, `${what}: leaks`);
}

/** `snapshot -l` with the date column blanked (the two tools ran at different times). */
const listing = (out: string) => out.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE');

/** Snapshot table entries as stored, dates and L1 offsets left out. */
function rawEntries(file: string): string[] {
  const d = fs.readFileSync(file);
  const nb = d.readUInt32BE(60);
  let p = Number(d.readBigUInt64BE(64));
  const out: string[] = [];
  for (let i = 0; i < nb; i++) {
    const extra = d.readUInt32BE(p + 36);
    const len = (40 + extra + d.readUInt16BE(p + 12) + d.readUInt16BE(p + 14) + 7) & ~7;
    const e = Buffer.from(d.subarray(p, p + len));
    e.fill(0, 0, 8);
    e.fill(0, 16, 24);
    out.push(e.toString('hex'));
    p += len;
  }
  return out;
}

test('snapshot -c/-a/-d/-l: same table, data, messages and exit codes as qemu-img', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir('vdisk-snap-');
  try {
    // The same steps with each tool on its own image.
    const results: Record<string, { list: string; entries: string[] }> = {};
    for (const tool of ['qemu', 'vdisk']) {
      const f = path.join(dir, `${tool}.qcow2`);
      const snap = (...args: string[]) => {
        const r = tool === 'qemu' ? run('qemu-img', ['snapshot', ...args, f]) : vdisk(['snapshot', ...args, f]);
        assert.equal(r.status, 0, `${tool} snapshot ${args.join(' ')}: ${r.stderr}`);
      };
      qimg('create', '-q', '-f', 'qcow2', f, '4M');
      qio(f, 'write -P 1 0 256k');
      snap('-c', 's1');
      qio(f, 'write -P 2 0 128k', 'write -P 3 1M 64k');
      snap('-c', 's2');
      snap('-c', 's2'); // duplicate names are allowed; ids are not
      qio(f, 'write -P 4 64k 64k', 'write -z 2M 64k');
      assertClean(f, `${tool} after -c`);
      snap('-a', 's1');
      reads(f, 'read -P 1 0 256k', 'read -P 0 1M 64k');
      assertClean(f, `${tool} after -a s1`);
      snap('-a', '2'); // by id
      reads(f, 'read -P 2 0 128k', 'read -P 1 128k 128k', 'read -P 3 1M 64k');
      snap('-d', 's1');
      snap('-d', 's2'); // the first of the two
      assertClean(f, `${tool} after -d`);
      results[tool] = { list: listing(runOk('qemu-img', ['snapshot', '-l', f])), entries: rawEntries(f) };
      assert.equal(listing(vdisk(['snapshot', '-l', f]).stdout), results[tool].list);
    }
    assert.equal(results.vdisk.list, results.qemu.list);
    assert.deepEqual(results.vdisk.entries, results.qemu.entries, 'table entries byte for byte (dates and L1 offsets aside)');

    // Errors: one line each, exit 1, qemu-img's words.
    const f = path.join(dir, 'vdisk.qcow2');
    const expectFail = (args: string[], text: string) => {
      const q = run('qemu-img', ['snapshot', ...args]);
      const v = vdisk(['snapshot', ...args]);
      assert.equal(q.status, 1, q.stderr);
      assert.equal(v.status, 1, v.stderr);
      assert.equal(v.stderr, `vdisk: ${text}\n`);
      assert.ok(q.stderr.includes(text), `qemu-img says: ${q.stderr}`);
    };
    expectFail(['-a', 'nope', f], "Could not apply snapshot 'nope': Failed to load snapshot: No such file or directory");
    expectFail(['-d', 'nope', f], "Could not delete snapshot 'nope': snapshot not found");
    expectFail(['-d', '3', f], "Could not delete snapshot '3': snapshot not found"); // -d takes names only
    const raw = path.join(dir, 'r.raw');
    qimg('create', '-q', '-f', 'raw', raw, '1M');
    expectFail(['-c', 'x', raw], "Could not create snapshot 'x': -95 (Operation not supported)");
    expectFail(['-a', 'x', raw], "Could not apply snapshot 'x': Block driver does not support snapshots");
  } finally {
    removeDir(dir);
  }
});

test('snapshots made by qemu-img are applied and deleted by vdisk, and the other way round', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir('vdisk-snap-x-');
  try {
    const f = path.join(dir, 'x.qcow2');
    qimg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', f, '8M');
    qio(f, 'write -P 5 0 3M', 'write -c -P 6 4M 64k');
    qimg('snapshot', '-c', 'byqemu', f);
    assert.equal(vdisk(['snapshot', '-c', 'byvdisk', f]).status, 0);
    qio(f, 'write -P 7 1M 3M', 'write -z 4M 4k', 'discard 0 64k');
    assert.equal(vdisk(['snapshot', '-a', 'byqemu', f]).status, 0);
    reads(f, 'read -P 5 0 3M', 'read -P 0 3M 1M', 'read -P 6 4M 64k');
    assertClean(f, 'vdisk applied a qemu-img snapshot');
    qio(f, 'write -P 8 2M 64k');
    runOk('qemu-img', ['snapshot', '-a', 'byvdisk', f]);
    reads(f, 'read -P 5 0 3M', 'read -P 6 4M 64k');
    assertClean(f, 'qemu-img applied a vdisk snapshot');
    runOk('qemu-img', ['snapshot', '-d', 'byvdisk', f]);
    assert.equal(vdisk(['snapshot', '-d', 'byqemu', f]).status, 0);
    assert.equal(runOk('qemu-img', ['snapshot', '-l', f]), '');
    assertClean(f, 'both deleted');
    reads(f, 'read -P 5 0 3M', 'read -P 6 4M 64k');
  } finally {
    removeDir(dir);
  }
});

test('driver API: create/list/apply/delete on compat 0.10 and 1.1, lazy refcounts, several L2 tables, compressed and zero clusters, a resize', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir('vdisk-snap-api-');
  try {
    for (const opts of ['compat=1.1,cluster_size=4096', 'compat=0.10,cluster_size=4096', 'compat=1.1,lazy_refcounts=on']) {
      const f = path.join(dir, 'api.qcow2');
      fs.rmSync(f, { force: true });
      qimg('create', '-q', '-f', 'qcow2', '-o', opts, f, '6M');
      const v3 = opts.includes('1.1');
      const node = await openImage(f, { format: 'qcow2' });
      const drv = node.driver as Qcow2Driver;
      try {
        await node.pwrite(0, Buffer.alloc(2 << 20, 0x11));
        await node.pwrite(4 << 20, Buffer.alloc(64 << 10, 0x12), REQ_WRITE_COMPRESSED);
        const a = await drv.createSnapshot('a');
        assert.equal(a.id, '1');
        await node.pwrite(1 << 20, Buffer.alloc(2 << 20, 0x21));
        if (v3) await node.pwriteZeroes(0, 64 << 10, REQ_MAY_UNMAP);
        await node.pdiscard(4 << 20, 64 << 10);
        await drv.createSnapshot('b', '10');
        await node.truncate(8 << 20);
        await node.pwrite(7 << 20, Buffer.alloc(4096, 0x31));
        await assert.rejects(drv.createSnapshot('dup', '10'), /already exists/);
        assert.deepEqual(drv.listSnapshots().map((s) => [s.id, s.name]), [['1', 'a'], ['10', 'b']]);
        assert.equal(await drv.applySnapshot('missing'), null);
        assert.equal((await drv.applySnapshot('a'))?.id, '1');
        assert.equal(node.getLength(), 6 << 20, 'the snapshot size comes back');
        await node.flush();
      } finally {
        await node.close();
      }
      assertClean(f, `${opts}: after apply`);
      reads(f, 'read -P 0x11 0 2M', 'read -P 0 2M 2M', 'read -P 0x12 4M 64k');
      const again = await openImage(f, { format: 'qcow2' });
      try {
        const d = again.driver as Qcow2Driver;
        assert.equal((await d.deleteSnapshot({ id: '1' }))?.name, 'a');
        assert.equal(await d.deleteSnapshot({ name: 'a' }), null);
        assert.ok(await d.applySnapshot('b'));
      } finally {
        await again.close();
      }
      assertClean(f, `${opts}: after delete and apply`);
      reads(f, `read -P ${v3 ? 0 : 0x11} 0 64k`, 'read -P 0x11 64k 960k', 'read -P 0x21 1M 2M', 'read -P 0 4M 64k');
      assert.match(runOk('qemu-img', ['snapshot', '-l', f]), /^10 +b /m);
    }
  } finally {
    removeDir(dir);
  }
});

/**
 * qemu-img check's findings that can hurt data. Leaks are harmless, and so is a COPIED flag
 * that disagrees with a refcount but not with the real number of references (clear where
 * one table references the cluster: only an extra copy on the next write; set where the
 * refcount is raised but the only reference is the active table's). QEMU's own snapshot
 * operations leave the same windows. COPIED set on a cluster two tables reference, or a
 * refcount below the references, would let a write change what a snapshot holds.
 */
function harmful(stderr: string, clusterSize: number): string[] {
  const references = new Map<number, number>();
  for (const m of stderr.matchAll(/^Leaked cluster (\d+) refcount=\d+ reference=(\d+)/gm)) references.set(Number(m[1]), Number(m[2]));
  return stderr.split('\n').filter((l) => {
    if (!/^ERROR/.test(l)) return false;
    const m = /OFLAG_COPIED .*_entry=([0-9a-f]+) refcount=(\d+)/.exec(l);
    if (!m) return true;
    const entry = BigInt(`0x${m[1]}`);
    if ((entry >> 63n) === 0n) return false; // clear where the refcount is 1: harmless
    const cluster = Number(entry & 0x00fffffffffffe00n) / clusterSize;
    return references.get(cluster) !== 1;
  });
}

test('power cuts during snapshot create, apply and delete: qemu-img check finds at most harmless leftovers, the guest sees old or new data', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const SIZE = 1 << 20;
  const mem = openMemory(0, 'snap-crash');
  await getFormat('qcow2').create!(mem, {
    filename: 'snap-crash', size: SIZE, options: { compat: '1.1', cluster_size: '4096' },
    openBacking: () => Promise.reject(new Error('no backing file')),
  });
  const base = Buffer.from((mem.driver as MemoryDriver).data);
  const { node: filter, driver: rec } = openFaultInjection(mem);
  const node = await openFormatOn(filter, 'snap-crash', { format: 'qcow2' });
  const drv = node.driver as Qcow2Driver;
  const A = Buffer.alloc(SIZE, 0x11);
  const AB = Buffer.from(A);
  AB.fill(0x22, 128 << 10, 384 << 10);
  const windows: Array<{ op: string; from: number; to: number; ok: Buffer[] }> = [];
  const during = async (op: string, ok: Buffer[], fn: () => Promise<unknown>) => {
    const from = rec.log.length;
    await fn();
    windows.push({ op, from, to: rec.log.length, ok });
  };
  try {
    await node.pwrite(0, A);
    await node.flush();
    await during('create', [A], () => drv.createSnapshot('s'));
    await node.pwrite(128 << 10, AB.subarray(128 << 10, 384 << 10));
    await node.flush();
    await during('apply', [AB, A], () => drv.applySnapshot('s'));
    await during('delete', [A], () => drv.deleteSnapshot({ name: 's' }));
  } finally {
    await node.close();
  }
  const dir = tempDir('vdisk-snap-crash-');
  try {
    const synced = new SyncedImage(base, rec.log);
    const file = path.join(dir, 'state.qcow2');
    let states = 0;
    for (const w of windows) {
      // Six crash points spread over the operation (its end included), two states each:
      // nothing pending persisted, and a sampled subset (torn and reordered at times).
      const points = [...new Set(Array.from({ length: 6 }, (_, i) => w.from + Math.round(((i + 1) * (w.to - w.from)) / 6)))];
      for (const crashAt of points) {
        for (const key of [{ crashAt, sample: 0 }, { crashAt, sample: crashAt * 7919 + 1 }]) {
          const spec = buildState(rec.log, key);
          const img = materialise(synced, rec.log, { ...spec, persist: key.sample === 0 ? [] : spec.persist });
          fs.writeFileSync(file, img);
          const what = `${w.op}, crash after log entry ${crashAt} (sample ${key.sample})`;
          const r = run('qemu-img', ['check', file]);
          assert.ok(r.status === 0 || r.status === 2 || r.status === 3, `${what}: qemu-img check exit ${r.status}: ${r.stderr}`);
          assert.deepEqual(harmful(r.stderr, 4096), [], `${what}: ${r.stderr}`);
          const m = openMemory(0, 'state');
          (m.driver as MemoryDriver).data = Buffer.from(img);
          const st = await openFormatOn(m, 'state', { format: 'qcow2', readOnly: true });
          const seen = Buffer.alloc(SIZE);
          try {
            await st.pread(0, seen);
          } finally {
            await st.close();
          }
          assert.ok(w.ok.some((b) => b.equals(seen)), `${what}: the guest reads neither the old nor the new data`);
          states++;
        }
      }
    }
    assert.ok(states >= 24, `${states} states checked`);
  } finally {
    removeDir(dir);
  }
});
