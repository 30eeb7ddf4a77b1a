// vdisk check / measure / snapshot -l / commit / rebase against qemu-img on the same images:
// same exit codes, same JSON, repairs that qemu-img check then finds clean.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { formats } from '../src/block/graph.js';
import { needPeers, removeDir, run, runOk, tempDir, vdisk } from './helpers.js';

const qimg = (...args: string[]) => runOk('qemu-img', args);
const qio = (file: string, ...cmds: string[]) => runOk('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file]);

/** Skip (or, in CI, fail) tests that need the qcow2 driver until it is registered. */
function needQcow2Driver(t: TestContext): boolean {
  if (formats.has('qcow2')) return true;
  if (process.env.VDISK_REQUIRE_PEERS === '1') throw new Error('qcow2 driver not registered');
  t.skip('qcow2 driver not registered yet');
  return false;
}

function readU64(file: string, off: number): number {
  const fd = fs.openSync(file, 'r');
  const b = Buffer.alloc(8);
  fs.readSync(fd, b, 0, 8, off);
  fs.closeSync(fd);
  return Number(b.readBigUInt64BE());
}

function patch(file: string, off: number, bytes: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, bytes, 0, bytes.length, off);
  fs.closeSync(fd);
}

const u16 = (v: number) => { const b = Buffer.alloc(2); b.writeUInt16BE(v); return b; };

/** Refcount block 0 of a 16-bit-refcount image: where cluster N's refcount lives. */
function refblock0(file: string): number {
  return readU64(file, readU64(file, 48));
}

/** Both tools on the same file: exit code and stdout must be equal. */
function sameCheck(file: string, extra: string[] = []): { status: number; json: Record<string, unknown> } {
  for (const output of ['human', 'json']) {
    const q = run('qemu-img', ['check', `--output=${output}`, ...extra, file]);
    const v = vdisk(['check', `--output=${output}`, ...extra, file]);
    assert.equal(v.status, q.status, `exit code for ${path.basename(file)} (${output}): ${v.stderr}`);
    assert.equal(v.stdout, q.stdout, `check --output=${output} of ${path.basename(file)}`);
  }
  const q = run('qemu-img', ['check', '--output=json', file]);
  return { status: q.status, json: q.stdout ? JSON.parse(q.stdout) : {} };
}

test('check: clean images of many shapes report exactly what qemu-img check reports', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const shapes: Array<[string, string]> = [
      ['c512', 'cluster_size=512'],
      ['c4k-rb1', 'cluster_size=4096,refcount_bits=1'],
      ['c64k-rb64', 'refcount_bits=64'],
      ['c2m', 'cluster_size=2M'],
      ['v2', 'compat=0.10'],
      ['lazy', 'lazy_refcounts=on'],
    ];
    for (const [name, opts] of shapes) {
      const f = path.join(dir, `${name}.qcow2`);
      qimg('create', '-q', '-f', 'qcow2', '-o', opts, f, '8M');
      qio(f, 'write -P 0x11 0 300k', 'write -P 0x22 3M 70k', 'write -z 5M 1M', 'discard 3M 4k');
      assert.equal(sameCheck(f).status, 0, name);
    }
    // Internal snapshot, then more writes: shared clusters have refcount 2, COPIED clear.
    const s = path.join(dir, 'snap.qcow2');
    qimg('create', '-q', '-f', 'qcow2', s, '8M');
    qio(s, 'write -P 1 0 1M');
    qimg('snapshot', '-c', 'S1', s);
    qio(s, 'write -P 2 512k 1M');
    assert.equal(sameCheck(s).status, 0);
    // Compressed clusters (zlib and zstd).
    for (const ct of ['zlib', 'zstd']) {
      const c = path.join(dir, `comp-${ct}.qcow2`);
      qimg('convert', '-c', '-O', 'qcow2', '-o', `compression_type=${ct}`, s, c);
      const r = sameCheck(c);
      assert.equal(r.status, 0);
      assert.ok((r.json['compressed-clusters'] as number) > 0);
    }
  } finally {
    removeDir(dir);
  }
});

test('check: leaks give exit 3 like qemu-img, -r leaks repairs them and qemu-img agrees', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const f = path.join(dir, 'leak.qcow2');
    qimg('create', '-q', '-f', 'qcow2', f, '16M');
    qio(f, 'write -P 7 0 1M');
    // Two extra clusters at EOF with refcount 1 that nothing references.
    const size = fs.statSync(f).size;
    const n = size / 65536;
    fs.truncateSync(f, size + 2 * 65536);
    patch(f, refblock0(f) + 2 * n, Buffer.concat([u16(1), u16(1)]));
    const before = sameCheck(f);
    assert.equal(before.status, 3);
    assert.equal(before.json.leaks, 2);
    const copy = path.join(dir, 'leak-copy.qcow2');
    fs.copyFileSync(f, copy);

    const v = vdisk(['check', '-r', 'leaks', f]);
    assert.equal(v.status, 0, v.stderr);
    assert.match(v.stdout, /2 leaked clusters\n {4}0 corruptions/);
    assert.equal(run('qemu-img', ['check', f]).status, 0);
    // The repair is the one qemu-img makes, byte for byte.
    assert.equal(run('qemu-img', ['check', '-r', 'leaks', copy]).status, 0);
    assert.ok(fs.readFileSync(f).equals(fs.readFileSync(copy)), 'same bytes as qemu-img check -r leaks');
  } finally {
    removeDir(dir);
  }
});

test('check: refcount too low and wrong COPIED flags are corruptions (exit 2); -r all rebuilds and qemu-img finds the result clean', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    // Refcount of a data cluster dropped to 0 → rebuild.
    const f = path.join(dir, 'low.qcow2');
    qimg('create', '-q', '-f', 'qcow2', f, '16M');
    qio(f, 'write -P 3 0 512k', 'write -P 4 8M 64k');
    patch(f, refblock0(f) + 2 * 5, u16(0));
    const r = sameCheck(f);
    assert.equal(r.status, 2);
    assert.ok((r.json.corruptions as number) >= 1);
    const v = vdisk(['check', '-r', 'all', f]);
    assert.equal(v.status, 0, v.stderr);
    assert.equal(run('qemu-img', ['check', f]).status, 0);
    // Data intact after the rebuild.
    const raw = path.join(dir, 'low.raw');
    qimg('convert', '-O', 'raw', f, raw);
    const data = fs.readFileSync(raw);
    assert.equal(data[0], 3);
    assert.equal(data[8 << 20], 4);

    // Refcount of a data cluster raised to 2: COPIED (set) no longer matches, and it leaks.
    const g = path.join(dir, 'copied.qcow2');
    qimg('create', '-q', '-f', 'qcow2', g, '16M');
    qio(g, 'write -P 5 0 256k');
    patch(g, refblock0(g) + 2 * 5, u16(2));
    const r2 = sameCheck(g);
    assert.equal(r2.status, 2);
    assert.equal(vdisk(['check', '-r', 'all', g]).status, 0);
    assert.equal(run('qemu-img', ['check', g]).status, 0);
    // The repair kept the data (and the flag matches again, so writes stay in place).
    const r2check = run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 5 0 256k', '-c', 'read -P 0 256k 64k', g]);
    assert.equal(r2check.status, 0, r2check.stderr);
    assert.doesNotMatch(r2check.stdout + r2check.stderr, /failed/i, r2check.stdout);
  } finally {
    removeDir(dir);
  }
});

test('check: a dirty lazy-refcounts image (qemu-io abort) matches qemu-img, and -r all makes it clean', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const f = path.join(dir, 'dirty.qcow2');
    qimg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4096', f, '8M');
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 9 0 200k', '-c', 'write -P 8 1M 64k', '-c', 'abort', f]);
    const r = sameCheck(f);
    assert.equal(r.status, 2, 'refcounts were never written');
    assert.equal(vdisk(['check', '-r', 'all', f]).status, 0);
    assert.equal(run('qemu-img', ['check', f]).status, 0);
    const info = JSON.parse(qimg('info', '--output=json', f));
    assert.equal(info['dirty-flag'], false);
  } finally {
    removeDir(dir);
  }
});

test('check: raw exits 63 with qemu-img\'s message; bad arguments exit 1 with one line', (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    const f = path.join(dir, 'r.img');
    fs.writeFileSync(f, Buffer.alloc(65536, 1));
    const q = run('qemu-img', ['check', '-f', 'raw', f]);
    const v = vdisk(['check', f]);
    assert.equal(q.status, 63);
    assert.equal(v.status, 63);
    assert.match(v.stderr, /This image format does not support checks/);
    const bad = vdisk(['check', '-r', 'some', f]);
    assert.equal(bad.status, 1);
    assert.equal(bad.stderr.trim().split('\n').length, 1);
    const missing = vdisk(['check', path.join(dir, 'nope.qcow2')]);
    assert.equal(missing.status, 1);
    assert.equal(missing.stderr.trim().split('\n').length, 1);
  } finally {
    removeDir(dir);
  }
});

test('measure: equals qemu-img measure for sizes, options, sparse raw and qcow2 inputs', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const raw = path.join(dir, 'sparse.raw');
    qimg('create', '-q', '-f', 'raw', raw, '20M');
    runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 7M 100k', '-c', 'write -P 3 19M 4k', raw]);
    const odd = path.join(dir, 'odd.raw');
    fs.writeFileSync(odd, Buffer.alloc(1000, 5));
    const q2 = path.join(dir, 'in.qcow2');
    qimg('convert', '-O', 'qcow2', raw, q2);
    const v2 = path.join(dir, 'in-v2.qcow2');
    qimg('convert', '-O', 'qcow2', '-o', 'compat=0.10', raw, v2);
    const bm = path.join(dir, 'bitmaps.qcow2');
    fs.copyFileSync(q2, bm);
    qimg('bitmap', '--add', '-g', '65536', bm, 'b0');
    qimg('bitmap', '--add', '-g', '512', bm, 'second-bitmap');

    const cases: string[][] = [
      ['--size', '1G', '-O', 'qcow2'],
      ['--size', '1G'],
      ['--size', '1000', '-O', 'raw'],
      ['--size', '0', '-O', 'qcow2'],
      ['--size', '3G', '-O', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64'],
      ['--size', '100T', '-O', 'qcow2', '-o', 'cluster_size=2M,refcount_bits=1'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'cluster_size=1M,preallocation=full'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'preallocation=metadata,compat=0.10'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'extended_l2=on'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'backing_file=x'],
      ['-O', 'qcow2', odd],
      ['-O', 'raw', odd],
      ['-O', 'raw', raw],
      ['-O', 'qcow2', '-f', 'raw', raw],
      ['-O', 'qcow2', '-o', 'cluster_size=4k', raw],
      ['-O', 'qcow2', '-o', 'cluster_size=2M', raw],
      ['-O', 'qcow2', q2],
      ['-O', 'qcow2', v2],
      ['-O', 'qcow2', '-o', 'compat=0.10', q2],
      ['-O', 'raw', q2],
      ['-O', 'qcow2', bm],
      ['-O', 'qcow2', '-o', 'backing_file=whatever', q2],
    ];
    for (const c of cases) {
      const needsDriver = c.some((a) => a.endsWith('.qcow2'));
      if (needsDriver && !formats.has('qcow2')) continue;
      for (const output of ['human', 'json']) {
        const args = ['measure', `--output=${output}`, ...c];
        const q = run('qemu-img', args);
        const v = vdisk(args);
        assert.equal(v.status, q.status, `${c.join(' ')}: ${v.stderr}`);
        assert.equal(v.stdout, q.stdout, `measure ${c.join(' ')} (${output})`);
      }
    }
    // Errors: one line, exit 1, like qemu-img.
    for (const c of [['--size', '1G', raw], [], ['--size', '1G', '-O', 'qcow2', '-o', 'cluster_size=1000'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'compat=0.10,refcount_bits=1'], ['--size', '1G', '-O', 'qcow2', '-o', 'bogus=1'],
      ['--size', '100T', '-O', 'qcow2', '-o', 'cluster_size=512']]) {
      const q = run('qemu-img', ['measure', ...c]);
      const v = vdisk(['measure', ...c]);
      assert.equal(q.status, 1);
      assert.equal(v.status, 1, c.join(' '));
      assert.equal(v.stderr.trim().split('\n').length, 1, v.stderr);
    }
  } finally {
    removeDir(dir);
  }
});

test('snapshot -l lists the table exactly like qemu-img (-c/-a/-d: qcow2-snapshots.test.ts)', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const f = path.join(dir, 's.qcow2');
    qimg('create', '-q', '-f', 'qcow2', f, '4M');
    assert.equal(vdisk(['snapshot', '-l', f]).stdout, run('qemu-img', ['snapshot', '-l', f]).stdout);
    qio(f, 'write -P 1 0 64k');
    qimg('snapshot', '-c', 'first', f);
    qio(f, 'write -P 2 0 64k');
    qimg('snapshot', '-c', 'a longer snapshot name', f);
    const q = run('qemu-img', ['snapshot', '-l', f]);
    const v = vdisk(['snapshot', '-l', f]);
    assert.equal(v.status, 0);
    assert.equal(v.stdout, q.stdout);
  } finally {
    removeDir(dir);
  }
});

/** A base with data and a top with its own writes, twice (one copy per tool). */
function makeChain(dir: string, tag: string): { base: string; top: string } {
  const base = path.join(dir, `${tag}-base.qcow2`);
  const top = path.join(dir, `${tag}-top.qcow2`);
  qimg('create', '-q', '-f', 'qcow2', base, '8M');
  qio(base, 'write -P 0xa1 0 2M', 'write -P 0xa2 6M 1M');
  qimg('create', '-q', '-f', 'qcow2', '-b', path.basename(base), '-F', 'qcow2', top);
  qio(top, 'write -P 0xb1 1M 1536k', 'write -z 6M 64k', 'write -P 0xb2 7680k 512k');
  return { base, top };
}

test('commit: the base ends up as qemu-img commit leaves it; the top is emptied (kept with -d)', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  if (!needQcow2Driver(t)) return;
  const dir = tempDir();
  try {
    for (const drop of [false, true]) {
      const a = makeChain(dir, `q${drop}`);
      const b = makeChain(dir, `v${drop}`);
      const expectTop = path.join(dir, 'expect-top.raw');
      qimg('convert', '-O', 'raw', a.top, expectTop);
      qimg('commit', '-q', ...(drop ? ['-d'] : []), a.top);
      const r = vdisk(['commit', ...(drop ? ['-d'] : []), b.top]);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout, 'Image committed.\n');
      assert.equal(run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', a.base, b.base]).status, 0, 'bases identical');
      assert.equal(run('qemu-img', ['compare', '-F', 'raw', b.base, expectTop]).status, 0, 'base holds the top view');
      assert.equal(run('qemu-img', ['check', b.base]).status, 0);
      assert.equal(run('qemu-img', ['check', b.top]).status, 0);
      const topMap = JSON.parse(qimg('map', '--output=json', b.top)) as Array<{ depth: number; data: boolean }>;
      const topAllocates = topMap.some((e) => e.depth === 0 && e.data);
      assert.equal(topAllocates, drop, drop ? '-d keeps the top' : 'the top is emptied');
    }
    // Errors: no backing file; -b not in the chain.
    const lone = path.join(dir, 'lone.qcow2');
    qimg('create', '-q', '-f', 'qcow2', lone, '1M');
    const e1 = vdisk(['commit', lone]);
    assert.equal(e1.status, 1);
    assert.match(e1.stderr, /Image does not have a backing file/);
    const c = makeChain(dir, 'err');
    const e2 = vdisk(['commit', '-b', 'nothere', c.top]);
    assert.equal(e2.status, 1);
    assert.match(e2.stderr, /Did not find 'nothere' in the backing chain/);
  } finally {
    removeDir(dir);
  }
});

test('commit -b BASE through a 3-deep chain matches qemu-img commit -b', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  if (!needQcow2Driver(t)) return;
  const dir = tempDir();
  try {
    const build = (tag: string) => {
      const { base, top: mid } = makeChain(dir, tag);
      const top = path.join(dir, `${tag}-top2.qcow2`);
      qimg('create', '-q', '-f', 'qcow2', '-b', path.basename(mid), '-F', 'qcow2', top);
      qio(top, 'write -P 0xc1 3M 256k');
      return { base, top };
    };
    const a = build('qa');
    const b = build('va');
    const view = path.join(dir, 'view.raw');
    qimg('convert', '-O', 'raw', a.top, view);
    qimg('commit', '-q', '-b', a.base, a.top);
    const r = vdisk(['commit', '-b', b.base, b.top]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(run('qemu-img', ['compare', '-F', 'raw', b.base, view]).status, 0);
    assert.equal(run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', a.base, b.base]).status, 0);
  } finally {
    removeDir(dir);
  }
});

test('rebase: safe mode keeps the guest view, -u only rewrites the header, -b "" removes the backing', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  if (!needQcow2Driver(t)) return;
  const dir = tempDir();
  try {
    const { top } = makeChain(dir, 'rb');
    const other = path.join(dir, 'other.qcow2');
    qimg('create', '-q', '-f', 'qcow2', other, '4M'); // shorter than the top: past its end reads zeros
    qio(other, 'write -P 0xd1 0 4M');
    const before = path.join(dir, 'before.raw');
    qimg('convert', '-O', 'raw', top, before);

    const r = vdisk(['rebase', '-b', 'other.qcow2', '-F', 'qcow2', top]);
    assert.equal(r.status, 0, r.stderr);
    let info = JSON.parse(qimg('info', '--output=json', top));
    assert.equal(info['backing-filename'], 'other.qcow2');
    assert.equal(info['backing-filename-format'], 'qcow2');
    assert.equal(run('qemu-img', ['compare', '-F', 'raw', top, before]).status, 0, 'safe rebase keeps the contents');
    assert.equal(run('qemu-img', ['check', top]).status, 0);

    const r2 = vdisk(['rebase', '-b', '', top]);
    assert.equal(r2.status, 0, r2.stderr);
    info = JSON.parse(qimg('info', '--output=json', top));
    assert.equal(info['backing-filename'], undefined);
    assert.equal(run('qemu-img', ['compare', '-F', 'raw', top, before]).status, 0, 'removing the backing keeps the contents');

    const r3 = vdisk(['rebase', '-u', '-b', 'rb-base.qcow2', '-F', 'qcow2', top]);
    assert.equal(r3.status, 0, r3.stderr);
    info = JSON.parse(qimg('info', '--output=json', top));
    assert.equal(info['backing-filename'], 'rb-base.qcow2');

    // qemu-img's refusals, one line each.
    const e1 = vdisk(['rebase', top]);
    assert.equal(e1.status, 1);
    assert.match(e1.stderr, /Must specify backing file \(-b\) or use unsafe mode \(-u\)/);
    const e2 = vdisk(['rebase', '-b', 'other.qcow2', top]);
    assert.equal(e2.status, 1);
    assert.match(e2.stderr, /backing format must be specified/);
    const e3 = vdisk(['rebase', '-b', 'missing.qcow2', '-F', 'qcow2', top]);
    assert.equal(e3.status, 1);
    assert.match(e3.stderr, /Could not open new backing file 'missing.qcow2'/);
    for (const e of [e1, e2, e3]) assert.equal(e.stderr.trim().split('\n').length, 1);
  } finally {
    removeDir(dir);
  }
});
