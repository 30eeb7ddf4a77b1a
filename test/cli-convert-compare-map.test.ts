// `vdisk convert`, `compare`, `map`, `info` and `resize` on sparse raw files, each checked
// against qemu-img on the same files: content (qemu-img compare and bytes), holes kept
// (st_blocks), exact sizes (qemu-img rounds raw sizes up to 512 bytes; vdisk must not),
// compare's exit codes and "Content mismatch at offset N!", map's data/zero runs.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { needPeers, prng, removeDir, run, runOk, tempDir, vdisk, type RunResult } from './helpers.js';
import { nativeStatus } from '../src/native.js';

interface Run {
  off: number;
  len: number;
  /** 'data': random bytes; 'zeros': zero bytes actually written (allocated, reads as zero). */
  kind: 'data' | 'zeros';
}

interface Sample {
  name: string;
  size: number;
  runs: Run[];
}

const MiB = 1 << 20;

function interleaved(): Run[] {
  const runs: Run[] = [];
  for (let off = 0; off < 8 * MiB; off += 256 << 10) {
    runs.push({ off, len: 64 << 10, kind: 'data' });
    if ((off / (256 << 10)) % 3 === 0) runs.push({ off: off + (128 << 10), len: 64 << 10, kind: 'zeros' });
  }
  runs.push({ off: 8 * MiB + 12345, len: 777, kind: 'data' }); // unaligned, inside a hole
  return runs;
}

const SAMPLES: Sample[] = [
  {
    name: 'odd',
    size: MiB + 1234,
    runs: [
      { off: 40960, len: 20480, kind: 'data' },
      { off: 163840, len: 32768, kind: 'zeros' },
      { off: 300000, len: 5000, kind: 'data' },
      { off: MiB, len: 1234, kind: 'data' }, // data up to the exact, unaligned end
    ],
  },
  { name: 'interleaved', size: 9 * MiB, runs: interleaved() },
  { name: 'empty', size: 3 * MiB + 512, runs: [] },
  { name: 'full', size: 2 * MiB + 1, runs: [{ off: 0, len: 2 * MiB + 1, kind: 'data' }] },
  { name: 'zeros-only', size: 2 * MiB, runs: [{ off: 0, len: 2 * MiB, kind: 'zeros' }] },
];

function makeSparse(file: string, s: Sample, seed = 1): void {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, s.size);
    const rnd = prng(seed);
    for (const r of s.runs) {
      const buf = Buffer.alloc(r.len);
      if (r.kind === 'data') for (let i = 0; i < r.len; i++) buf[i] = 1 + Math.floor(rnd() * 255);
      fs.writeSync(fd, buf, 0, r.len, r.off);
    }
  } finally {
    fs.closeSync(fd);
  }
}

function blocks(file: string): number {
  return fs.statSync(file).blocks;
}

function qemuCompare(a: string, b: string, ...extra: string[]): RunResult {
  return run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ...extra, a, b]);
}

interface MapRun {
  start: number;
  length: number;
  zero: boolean;
  data: boolean;
}

/** Runs clipped to `size` (qemu-img's raw size is rounded up to 512), merged by {zero, data}. */
function normalizeMap(json: string, size: number): MapRun[] {
  const out: MapRun[] = [];
  for (const e of JSON.parse(json) as MapRun[]) {
    const length = Math.min(e.start + e.length, size) - e.start;
    if (length <= 0) continue;
    const last = out[out.length - 1];
    if (last && last.zero === e.zero && last.data === e.data && last.start + last.length === e.start) last.length += length;
    else out.push({ start: e.start, length, zero: e.zero, data: e.data });
  }
  return out;
}

function withDir(t: import('node:test').TestContext): string {
  const dir = tempDir('vdisk-cli-');
  t.after(() => removeDir(dir));
  return dir;
}

for (const s of SAMPLES) {
  test(`convert ${s.name} (${s.size} bytes): same content as source and as qemu-img's output, holes and exact size kept`, (t) => {
    if (!needPeers(t, 'qemu-img')) return;
    const dir = withDir(t);
    const src = path.join(dir, 'src.raw');
    const out = path.join(dir, 'vdisk.raw');
    const qout = path.join(dir, 'qemu.raw');
    makeSparse(src, s);
    const r = vdisk(['convert', '-f', 'raw', '-O', 'raw', src, out]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stderr, '');
    runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', src, qout]);

    assert.equal(fs.statSync(out).size, s.size, 'vdisk keeps the exact size (no rounding to 512)');
    assert.equal(fs.statSync(qout).size, Math.ceil(s.size / 512) * 512, 'qemu-img rounds up to 512 (NOTES.md)');
    assert.ok(fs.readFileSync(out).equals(fs.readFileSync(src)), 'bytes equal the source');
    const c = qemuCompare(src, out);
    assert.equal(c.status, 0, `qemu-img compare: ${c.stdout}${c.stderr}`);
    const c2 = qemuCompare(qout, out);
    assert.equal(c2.status, 0, `qemu-img compare with qemu-img's own output: ${c2.stdout}`);

    // Holes: as sparse as qemu-img's output, give or take a few 4 KiB blocks (qemu-img
    // allocates the first block of the target; the exact tail is one block either way).
    const dataBytes = s.runs.filter((x) => x.kind === 'data').reduce((n, x) => n + x.len, 0);
    assert.ok(blocks(out) <= blocks(qout) + 16, `vdisk output uses ${blocks(out)} blocks, qemu-img's ${blocks(qout)}`);
    assert.ok(blocks(out) * 512 >= dataBytes, 'every data byte is allocated');
    if (dataBytes < s.size / 2) assert.ok(blocks(out) * 512 < s.size / 2, 'holes stayed holes');
  });
}

test('convert -S 0 allocates everything, like qemu-img convert -S 0', (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = withDir(t);
  const s = SAMPLES[1];
  const src = path.join(dir, 'src.raw');
  makeSparse(src, s);
  const out = path.join(dir, 'full.raw');
  const qout = path.join(dir, 'qfull.raw');
  assert.equal(vdisk(['convert', '-S', '0', '-O', 'raw', src, out]).status, 0);
  runOk('qemu-img', ['convert', '-S', '0', '-f', 'raw', '-O', 'raw', src, qout]);
  assert.ok(blocks(out) * 512 >= s.size - 4096, `only ${blocks(out) * 512} of ${s.size} bytes allocated`);
  assert.ok(Math.abs(blocks(out) - blocks(qout)) <= 16);
  assert.ok(fs.readFileSync(out).equals(fs.readFileSync(src)));
  // And the default (-S 4k) turns runs of written zeros into holes.
  const sparse = path.join(dir, 'sparse.raw');
  const z = path.join(dir, 'zeros.raw');
  makeSparse(z, SAMPLES[4]);
  assert.ok(blocks(z) * 512 >= 2 * MiB);
  assert.equal(vdisk(['convert', z, sparse]).status, 0);
  assert.ok(blocks(sparse) <= 16, `written zeros should become holes, ${blocks(sparse)} blocks allocated`);
});

test('convert -n writes into an existing target (old content and zero ranges overwritten)', (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = withDir(t);
  const s = SAMPLES[1];
  const src = path.join(dir, 'src.raw');
  makeSparse(src, s);
  const tgt = path.join(dir, 'existing.raw');
  makeSparse(tgt, { name: 'junk', size: s.size, runs: [{ off: 0, len: s.size, kind: 'data' }] }, 99);
  const r = vdisk(['convert', '-n', '-O', 'raw', src, tgt]);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(fs.statSync(tgt).size, s.size);
  assert.equal(qemuCompare(src, tgt).status, 0);
  assert.ok(fs.readFileSync(tgt).equals(fs.readFileSync(src)));
  // Without -n an existing target is replaced; -n with a missing target fails in one line.
  const missing = vdisk(['convert', '-n', src, path.join(dir, 'nope.raw')]);
  assert.notEqual(missing.status, 0);
  assert.equal(missing.stderr.trim().split('\n').length, 1, missing.stderr);
  // A smaller existing target is refused.
  const small = path.join(dir, 'small.raw');
  fs.writeFileSync(small, Buffer.alloc(4096));
  const r2 = vdisk(['convert', '-n', src, small]);
  assert.equal(r2.status, 1);
  assert.match(r2.stderr, /smaller/);
});

test('convert -p reports progress up to 100% and still copies correctly', (t) => {
  const dir = withDir(t);
  const s = SAMPLES[1];
  const src = path.join(dir, 'src.raw');
  makeSparse(src, s);
  const out = path.join(dir, 'p.raw');
  const r = vdisk(['convert', '-p', src, out]);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stderr + r.stdout, /100\/100%/, 'progress must reach 100%');
  assert.ok(fs.readFileSync(out).equals(fs.readFileSync(src)));
  // -q silences it.
  const q = vdisk(['convert', '-p', '-q', src, path.join(dir, 'q.raw')]);
  assert.equal(q.status, 0);
  assert.equal(q.stderr + q.stdout, '');
});

for (const s of SAMPLES) {
  test(`map --output=json on ${s.name}: the same data/zero runs as qemu-img map`, (t) => {
    if (!needPeers(t, 'qemu-img')) return;
    if (nativeStatus !== 'loaded') {
      t.skip(`native addon ${nativeStatus}: block status needs SEEK_DATA/SEEK_HOLE`);
      return;
    }
    const dir = withDir(t);
    const src = path.join(dir, 'src.raw');
    makeSparse(src, s);
    const r = vdisk(['map', '--output=json', '-f', 'raw', src]);
    assert.equal(r.status, 0, r.stderr);
    const q = runOk('qemu-img', ['map', '--output=json', '-f', 'raw', src]);
    const mine = normalizeMap(r.stdout, s.size);
    assert.deepEqual(mine, normalizeMap(q, s.size));
    // vdisk's own map ends exactly at the image size.
    const last = mine[mine.length - 1];
    assert.equal(last.start + last.length, s.size);
    // --start-offset / --max-length give the matching window.
    const w = vdisk(['map', '--output=json', '-s', '65536', '-l', '1048576', src]);
    assert.equal(w.status, 0, w.stderr);
    const qw = runOk('qemu-img', ['map', '--output=json', '-f', 'raw', '-s', '65536', '-l', '1048576', src]);
    assert.deepEqual(normalizeMap(w.stdout, s.size), normalizeMap(qw, s.size));
  });
}

test('info --output=json: virtual-size, format, actual-size, dirty-flag as qemu-img says', (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = withDir(t);
  for (const s of SAMPLES) {
    const src = path.join(dir, `${s.name}.raw`);
    makeSparse(src, s);
    const r = vdisk(['info', '--output=json', src]);
    assert.equal(r.status, 0, r.stderr);
    const mine = JSON.parse(r.stdout);
    const theirs = JSON.parse(runOk('qemu-img', ['info', '--output=json', '-f', 'raw', src]));
    for (const k of ['format', 'actual-size', 'dirty-flag', 'filename']) {
      assert.deepEqual(mine[k], theirs[k], `${s.name}: ${k}`);
    }
    // qemu-img reports raw sizes rounded up to 512; vdisk the exact size.
    assert.equal(mine['virtual-size'], s.size, `${s.name}: virtual-size`);
    assert.equal(theirs['virtual-size'], Math.ceil(s.size / 512) * 512);
    // Human output names the same virtual size.
    const h = vdisk(['info', src]);
    assert.match(h.stdout, new RegExp(`virtual size: .*\\(${s.size} bytes\\)`));
    assert.match(h.stdout, /file format: raw/);
  }
});

test('compare: exit codes and "Content mismatch at offset N!" match qemu-img compare', (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = withDir(t);
  const p = (n: string) => path.join(dir, n);
  makeSparse(p('a.raw'), SAMPLES[1]);
  fs.copyFileSync(p('a.raw'), p('same.raw'));
  const poke = (name: string, from: string, off: number, byte = 0x5a, size?: number) => {
    fs.copyFileSync(p(from), p(name));
    if (size !== undefined) fs.truncateSync(p(name), size);
    const fd = fs.openSync(p(name), 'r+');
    fs.writeSync(fd, Buffer.from([byte]), 0, 1, off);
    fs.closeSync(fd);
  };
  poke('in-data.raw', 'a.raw', 70000); // inside the first data run (unaligned)
  poke('in-hole.raw', 'a.raw', 5 * MiB + 100_001); // inside a hole of a.raw
  poke('last.raw', 'a.raw', 9 * MiB - 1); // the very last byte
  fs.copyFileSync(p('a.raw'), p('longer-zero.raw'));
  fs.truncateSync(p('longer-zero.raw'), 10 * MiB); // same content, zeros past a's end
  poke('longer-data.raw', 'a.raw', 9 * MiB + 4321, 1, 10 * MiB); // data past a's end
  makeSparse(p('odd.raw'), SAMPLES[0]);
  poke('odd-tail.raw', 'odd.raw', MiB + 1100); // inside the odd, unaligned last sector

  const cases: Array<[string, string, string[]]> = [
    ['a.raw', 'same.raw', []],
    ['a.raw', 'in-data.raw', []],
    ['in-data.raw', 'a.raw', []],
    ['a.raw', 'in-hole.raw', []],
    ['a.raw', 'last.raw', []],
    ['a.raw', 'longer-zero.raw', []],
    ['longer-zero.raw', 'a.raw', []],
    ['a.raw', 'longer-data.raw', []],
    ['longer-data.raw', 'a.raw', []],
    ['a.raw', 'longer-zero.raw', ['-s']],
    ['odd.raw', 'odd-tail.raw', []],
    ['a.raw', 'missing.raw', []],
    ['missing.raw', 'a.raw', []],
  ];
  const seen = new Set<number>();
  for (const [x, y, extra] of cases) {
    const mine = vdisk(['compare', '-f', 'raw', '-F', 'raw', ...extra, p(x), p(y)]);
    const theirs = qemuCompare(p(x), p(y), ...extra);
    const what = `compare ${extra.join(' ')} ${x} ${y}`;
    assert.equal(mine.status, theirs.status, `${what}: exit code (qemu-img: ${theirs.stdout}${theirs.stderr})`);
    seen.add(mine.status);
    if (mine.status === 2) {
      assert.equal(mine.stdout, '');
      assert.equal(mine.stderr.trim().split('\n').length, 1, `${what}: one line on stderr`);
      continue;
    }
    assert.equal(mine.stdout, theirs.stdout, `${what}: output`);
    assert.equal(mine.stderr, '');
    // -q: same exit code, nothing printed.
    const quiet = vdisk(['compare', '-q', ...extra, p(x), p(y)]);
    assert.equal(quiet.status, mine.status);
    assert.equal(quiet.stdout + quiet.stderr, '');
  }
  assert.deepEqual([...seen].sort(), [0, 1, 2]);
  assert.match(vdisk(['compare', '-s', p('a.raw'), p('longer-zero.raw')]).stdout, /^Strict mode: Image size mismatch!$/m);
});

test('resize: grow, shrink only with --shrink, relative sizes; qemu-img agrees on the result', (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = withDir(t);
  const f = path.join(dir, 'r.raw');
  makeSparse(f, SAMPLES[0]);
  const orig = fs.readFileSync(f);
  const size = () => fs.statSync(f).size;

  let r = vdisk(['resize', f, '3M']);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, 'Image resized.\n');
  assert.equal(size(), 3 * MiB);
  assert.equal(JSON.parse(runOk('qemu-img', ['info', '--output=json', '-f', 'raw', f]))['virtual-size'], 3 * MiB);
  const grown = fs.readFileSync(f);
  assert.ok(grown.subarray(0, orig.length).equals(orig), 'old content kept');
  assert.ok(grown.subarray(orig.length).equals(Buffer.alloc(3 * MiB - orig.length)), 'new area reads as zeros');
  assert.ok(blocks(f) * 512 < 2 * MiB, 'growing with preallocation=off leaves a hole');

  r = vdisk(['resize', f, '1M']);
  assert.equal(r.status, 1);
  assert.equal(r.stderr, 'vdisk: Use the --shrink option to perform a shrink operation.\n');
  assert.equal(size(), 3 * MiB, 'a refused shrink changes nothing');

  r = vdisk(['resize', '--shrink', f, '512K']);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(size(), 512 << 10);
  assert.ok(fs.readFileSync(f).equals(orig.subarray(0, 512 << 10)));

  assert.equal(vdisk(['resize', f, '+1000']).status, 0);
  assert.equal(size(), (512 << 10) + 1000, 'exact sizes, no rounding');
  assert.equal(vdisk(['resize', '--shrink', f, '-1000']).status, 0);
  assert.equal(size(), 512 << 10);
  assert.notEqual(vdisk(['resize', f, '-1000']).status, 0, 'relative shrink also needs --shrink');
  assert.notEqual(vdisk(['resize', '--shrink', f, '-1M']).status, 0, 'cannot shrink below zero');
  assert.equal(size(), 512 << 10);

  const before = blocks(f) * 512;
  r = vdisk(['resize', '--preallocation=full', f, '1M']);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(size(), MiB);
  assert.ok(blocks(f) * 512 - before >= (512 << 10) - 4096, 'preallocation=full allocates the new area');
  assert.ok(fs.readFileSync(f).subarray(512 << 10).equals(Buffer.alloc(512 << 10)), 'and it reads as zeros');
});
