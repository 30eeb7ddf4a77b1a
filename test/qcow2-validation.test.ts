// Crafted images (test/fixtures/qcow2-fixtures.ts, each named after what it breaks) against
// qemu-img 7.2: vdisk refuses to open exactly the images QEMU refuses, with QEMU's message in
// one line naming the structure; `vdisk check` gives qemu-img check's exit code, JSON and
// error lines (the reserved-bit rules of qcow2.txt among them); a virtual size that is not a
// multiple of 512 reads as QEMU reads it; and a writable open of an image QEMU accepts leaves
// what QEMU's leaves.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openImage } from '../src/block/graph.js';
import { VdiskError } from '../src/block/errors.js';
import { FIXTURES, type Fixture, unpackFixture } from './fixtures/qcow2-fixtures.js';
import { needPeers, removeDir, run, tempDir, vdisk } from './helpers.js';

const FIXTURE_DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'test', 'fixtures', 'qcow2');

/** qemu-img's open error for the file, without "qemu-img: Could not open 'F': ", or null. */
function qemuOpenError(r: { status: number; stderr: string }): string | null {
  if (r.status === 0) return null;
  return r.stderr.trim().replace(/^qemu-img: Could not open '[^']*': /, '');
}

/** The lines check prints for each problem (qemu-img's warnings about bitmaps aside). */
const problemLines = (stderr: string) => stderr.replace(/to fix\.(?!\n)/, 'to fix.\n').split('\n').filter((l) => /^(ERROR|Leaked|Repairing|Rebuilding)/.test(l));

test('crafted images: vdisk refuses to open exactly what qemu-img refuses, and check agrees (exit code, JSON, error lines)', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    for (const f of FIXTURES) {
      const p = unpackFixture(FIXTURE_DIR, f, dir);
      const qi = run('qemu-img', ['info', '-f', 'qcow2', '--output=json', p]);
      assert.equal(qemuOpenError(qi), f.qemuOpenError, `${f.name}: qemu-img's verdict changed`);

      // Opening through the library is what every command does (info, convert, io, serve).
      let vdiskError: string | null = null;
      try {
        // As qemu-img info: the backing file is not opened.
        const node = await openImage(p, { format: 'qcow2', readOnly: true, backing: false });
        try {
          const qj = JSON.parse(qi.stdout) as Record<string, unknown> & { 'format-specific': { data: Record<string, unknown> } };
          assert.equal(node.getLength(), qj['virtual-size'], `${f.name}: virtual size`);
          const info = await node.driver.info!();
          assert.deepEqual(info.formatSpecific?.data.bitmaps, qj['format-specific'].data.bitmaps, `${f.name}: bitmap list`);
        } finally {
          await node.close();
        }
      } catch (err) {
        if (!(err instanceof VdiskError)) throw err;
        vdiskError = err.message;
      }
      if (f.qemuOpenError === null) {
        assert.equal(vdiskError, null, `${f.name}: QEMU opens it, vdisk refuses: ${vdiskError}`);
      } else {
        assert.ok(vdiskError !== null, `${f.name}: QEMU refuses it (${f.qemuOpenError}), vdisk opens it`);
        assert.ok(vdiskError.startsWith(`${p}: ${f.qemuOpenError}`), `${f.name}: "${vdiskError}" should start with QEMU's "${f.qemuOpenError}"`);
        assert.ok(!vdiskError.includes('\n'), `${f.name}: one line`);
      }

      const qc = run('qemu-img', ['check', '-f', 'qcow2', '--output=json', p]);
      assert.equal(qc.status, f.qemuCheck, `${f.name}: qemu-img check's exit code changed`);
      const vc = vdisk(['check', '-f', 'qcow2', '--output=json', p]);
      assert.equal(vc.status, qc.status, `${f.name}: check exit code (vdisk: ${vc.stderr})`);
      if (qc.status === 1) {
        assert.equal(vc.stderr.trim().split('\n').length, 1, `${f.name}: check fails in one line: ${vc.stderr}`);
        continue;
      }
      assert.deepEqual(JSON.parse(vc.stdout), JSON.parse(qc.stdout), `${f.name}: check JSON`);
      assert.deepEqual(problemLines(vc.stderr), problemLines(qc.stderr), `${f.name}: check's error lines`);
      if (/reserved-bit|copied-bit|offset-bit/.test(f.name)) {
        // The reserved-bit rules (issue 13 item 2): qemu-img's human report too, word for word.
        assert.equal(vdisk(['check', '-f', 'qcow2', p]).stdout, run('qemu-img', ['check', '-f', 'qcow2', p]).stdout, `${f.name}: check's report`);
      }
    }
  } finally {
    removeDir(dir);
  }
});

test('refusals through the command line: one line naming the file and the structure, exit 1', (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    for (const name of ['header-ext-end-marker-past-backing-name', 'bitmap-granularity-bits-8', 'bitmap-table-entry-reserved-bits']) {
      const f = FIXTURES.find((x) => x.name === name)!;
      const p = unpackFixture(FIXTURE_DIR, f, dir);
      const commands = [['info', p], ['convert', '-O', 'raw', p, path.join(dir, 'out.raw')], ['io', '-c', 'read 0 512', p]];
      for (const args of name === 'bitmap-granularity-bits-8' ? commands : commands.slice(0, 1)) {
        const r = vdisk(args);
        assert.equal(r.status, 1, `${name}: ${args[0]}`);
        assert.match(r.stderr, new RegExp(`^vdisk: ${p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: ${f.qemuOpenError!.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} \\(.+\\)\\n$`), `${name}: ${args[0]}`);
      }
    }
  } finally {
    removeDir(dir);
  }
});

test('issue 13 item 4: a virtual size that is not a multiple of 512 reads as QEMU reads it (info, map, convert)', (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    for (const name of ['size-128-bytes', 'size-not-sector-multiple']) {
      const p = unpackFixture(FIXTURE_DIR, FIXTURES.find((x) => x.name === name)!, dir);
      const size = (json: string) => (JSON.parse(json) as { 'virtual-size': number })['virtual-size'];
      const vi = vdisk(['info', '--output=json', p]);
      assert.equal(size(vi.stdout), size(run('qemu-img', ['info', '--output=json', p]).stdout), `${name}: virtual size`);
      assert.equal(vdisk(['map', '--output=json', p]).stdout, run('qemu-img', ['map', '--output=json', p]).stdout, `${name}: map`);
      const q = path.join(dir, `${name}-q.raw`);
      const v = path.join(dir, `${name}-v.raw`);
      assert.equal(run('qemu-img', ['convert', '-O', 'raw', p, q]).status, 0);
      assert.equal(vdisk(['convert', '-O', 'raw', p, v]).status, 0);
      assert.ok(fs.readFileSync(v).equals(fs.readFileSync(q)), `${name}: converted bytes (${fs.statSync(v).size} vs ${fs.statSync(q).size})`);
    }
  } finally {
    removeDir(dir);
  }
});

test('a writable open of each image QEMU accepts leaves what a QEMU writable open leaves (bitmaps, check verdict)', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const accepted = FIXTURES.filter((f: Fixture) => f.qemuOpenError === null && !f.name.startsWith('size-'));
    for (const f of accepted) {
      const q = unpackFixture(FIXTURE_DIR, f, dir);
      const v = path.join(dir, `${f.name}-v.qcow2`);
      fs.copyFileSync(q, v);
      const wq = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 9 2M 512', q]);
      const wv = vdisk(['io', '-f', 'qcow2', '-c', 'write -P 9 2M 512', v]);
      if (f.qemuWriteFails) {
        // Where QEMU is wrong, do better: QEMU fails (and marks the image corrupt); vdisk
        // writes, and leaves an image QEMU can write to as well.
        assert.match(wq.stdout + wq.stderr, /Marking image as corrupt/, `${f.name}: QEMU's bug (${f.qemuWriteFails})`);
        assert.equal(wv.status, 0, `${f.name}: vdisk write: ${wv.stderr}`);
        assert.equal(run('qemu-img', ['check', v]).status, f.qemuCheck, `${f.name}: check after our write`);
        const again = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 8 3M 512', v]);
        assert.equal(again.status, 0, `${f.name}: QEMU writes to what vdisk left: ${again.stdout}${again.stderr}`);
        continue;
      }
      assert.equal(wv.status, wq.status, `${f.name}: write (qemu-io: ${wq.stdout}${wq.stderr}; vdisk: ${wv.stderr})`);
      const bitmaps = (file: string) => {
        const r = run('qemu-img', ['info', '--output=json', file]);
        return r.status === 0 ? (JSON.parse(r.stdout) as { 'format-specific': { data: { bitmaps?: unknown } } })['format-specific'].data.bitmaps : r.stderr;
      };
      assert.deepEqual(bitmaps(v), bitmaps(q), `${f.name}: bitmaps after the write`);
      const cq = run('qemu-img', ['check', q]);
      const cv = run('qemu-img', ['check', v]);
      assert.equal(cv.status, cq.status, `${f.name}: qemu-img check after the write (QEMU's: ${cq.stdout}${cq.stderr}; ours: ${cv.stdout}${cv.stderr})`);
    }
  } finally {
    removeDir(dir);
  }
});
