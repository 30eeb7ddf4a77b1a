// Malformed qcow2 images: each starts as a qemu-img image with a few bytes patched. vdisk
// must refuse (or read cleanly) with one line on stderr, no stack trace, a non-zero exit,
// within 30 s and 1 GiB; `vdisk check` reports corruption (exit 2) where the header is fine
// but tables point where they must not.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { VDISK_BIN, needPeers, removeDir, run, runOk, tempDir } from './helpers.js';

const CLUSTER = 65536;
const MAX_RSS_KIB = 1024 * 1024;
const qimg = (...args: string[]) => runOk('qemu-img', args);

interface Guarded {
  status: number;
  stdout: string;
  /** stderr without the /usr/bin/time line. */
  stderr: string;
  maxRssKiB: number;
}

/** Run vdisk under /usr/bin/time with a 30 s limit; a timeout throws (spawnSync ETIMEDOUT). */
function guarded(args: string[]): Guarded {
  const r = spawnSync('/usr/bin/time', ['-q', '-f', 'MAXRSS=%M', process.execPath, VDISK_BIN, ...args], {
    encoding: 'utf8', timeout: 30_000, maxBuffer: 64 << 20,
  });
  if (r.error) throw new Error(`vdisk ${args.join(' ')}: ${r.error.message}`);
  const lines = r.stderr.split('\n');
  const rssLine = lines.findIndex((l) => l.startsWith('MAXRSS='));
  const maxRssKiB = rssLine >= 0 ? Number(lines[rssLine].slice(7)) : 0;
  if (rssLine >= 0) lines.splice(rssLine, 1);
  return { status: r.status ?? -1, stdout: r.stdout, stderr: lines.join('\n').trim(), maxRssKiB };
}

function assertCleanFailure(r: Guarded, what: string, pattern?: RegExp): void {
  assert.notEqual(r.status, 0, `${what} must fail`);
  assertTidy(r, what);
  if (pattern) assert.match(r.stderr, pattern, what);
}

/** Exit code aside: at most one error line, no stack trace, bounded memory. */
function assertTidy(r: Guarded, what: string, diagnostics = false): void {
  assert.ok(r.maxRssKiB < MAX_RSS_KIB, `${what}: max RSS ${r.maxRssKiB} KiB`);
  assert.doesNotMatch(r.stderr, /\n\s+at |internal error/, `${what}: ${r.stderr}`);
  // check prints one diagnostic line per problem found (as qemu-img does); errors are one line.
  if (r.status !== 0 && !diagnostics) assert.equal(r.stderr.split('\n').length, 1, `${what}: one line, got: ${r.stderr}`);
}

const u32 = (v: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(v >>> 0); return b; };
const u64 = (v: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(v); return b; };

function readAt(file: string, off: number, len: number): Buffer {
  const fd = fs.openSync(file, 'r');
  const b = Buffer.alloc(len);
  fs.readSync(fd, b, 0, len, off);
  fs.closeSync(fd);
  return b;
}

function patch(file: string, off: number, bytes: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, bytes, 0, bytes.length, off);
  fs.closeSync(fd);
}

const field64 = (file: string, off: number) => Number(readAt(file, off, 8).readBigUInt64BE());
const l2Offset = (file: string) => Number(readAt(file, field64(file, 40), 8).readBigUInt64BE() & 0x00fffffffffffe00n);

/** Offset of a header extension's (magic, length) pair in the first cluster, or -1. */
function findExtension(file: string, magic: number): number {
  const head = readAt(file, 0, CLUSTER);
  let pos = head.readUInt32BE(100);
  while (pos + 8 <= CLUSTER) {
    const m = head.readUInt32BE(pos);
    const len = head.readUInt32BE(pos + 4);
    if (m === magic) return pos;
    if (m === 0) return -1;
    pos += 8 + ((len + 7) & ~7);
  }
  return -1;
}

interface Case {
  name: string;
  /** Patch applied to a copy of the base image. */
  make: (f: string, dir: string) => void;
  /** Header-level: the image must not open at all (info, convert and check all fail). */
  refused: boolean;
  /** What the error line must mention. */
  message?: RegExp;
  /** Extra vdisk args for the base (e.g. an image with a snapshot or bitmap). */
  base?: 'plain' | 'snapshot' | 'bitmap' | 'backing';
}

const CASES: Case[] = [
  { name: 'bad magic', refused: true, message: /magic|qcow2/i, make: (f) => patch(f, 0, Buffer.from('QFJ\xfb', 'latin1')) },
  { name: 'version 1', refused: true, message: /version/, make: (f) => patch(f, 4, u32(1)) },
  { name: 'version 4', refused: true, message: /version/, make: (f) => patch(f, 4, u32(4)) },
  { name: 'cluster_bits 8', refused: true, message: /cluster/, make: (f) => patch(f, 20, u32(8)) },
  { name: 'cluster_bits 22', refused: true, message: /cluster/, make: (f) => patch(f, 20, u32(22)) },
  { name: 'cluster_bits 0xffffffff', refused: true, message: /cluster/, make: (f) => patch(f, 20, u32(0xffffffff)) },
  { name: 'header_length below 104', refused: true, message: /header_length|header/i, make: (f) => patch(f, 100, u32(96)) },
  { name: 'header_length past the cluster', refused: true, message: /header_length|header/i, make: (f) => patch(f, 100, u32(CLUSTER + 8)) },
  { name: 'refcount_order 7', refused: true, message: /refcount/, make: (f) => patch(f, 96, u32(7)) },
  { name: 'L1 table too large', refused: true, message: /L1|l1/, make: (f) => patch(f, 36, u32(0x2000000)) },
  { name: 'L1 table misaligned', refused: true, message: /L1|l1|align/, make: (f) => patch(f, 40, u64(BigInt(field64(f, 40) + 8))) },
  { name: 'L1 does not cover the size', refused: true, message: /L1|l1|size/, make: (f) => patch(f, 36, u32(0)) },
  { name: 'size needs an impossible L1', refused: true, message: /L1|l1|size/, make: (f) => patch(f, 24, u64(1n << 60n)) },
  { name: 'refcount table too large', refused: true, message: /refcount/, make: (f) => patch(f, 56, u32(0x10000)) },
  { name: 'refcount table misaligned', refused: true, message: /refcount|align/, make: (f) => patch(f, 48, u64(BigInt(field64(f, 48) + 512))) },
  { name: 'refcount table empty', refused: true, message: /refcount/, make: (f) => patch(f, 56, u32(0)) },
  { name: 'L1 offset past 2^63', refused: true, message: /2\^63|offset|L1/, make: (f) => patch(f, 40, u64(1n << 63n)) },
  { name: 'snapshot table offset past 2^63', refused: true, message: /2\^63|snapshot|offset/, make: (f) => { patch(f, 60, u32(1)); patch(f, 64, u64((1n << 63n) + 65536n)); } },
  { name: 'too many snapshots', refused: true, message: /snapshot/, make: (f) => patch(f, 60, u32(65537)) },
  {
    name: 'snapshot entry with oversized extra data', refused: true, base: 'snapshot', message: /snapshot|extra|metadata/i,
    make: (f) => patch(f, field64(f, 64) + 36, u32(0xffff)),
  },
  {
    name: 'backing name outside the first cluster', refused: true, base: 'backing', message: /backing/,
    make: (f) => { patch(f, 8, u64(BigInt(CLUSTER - 4))); patch(f, 16, u32(100)); },
  },
  { name: 'backing name longer than 1023 bytes', refused: true, base: 'backing', message: /backing/, make: (f) => patch(f, 16, u32(1024)) },
  {
    name: 'header extension runs past the cluster', refused: true, message: /extension|header/,
    make: (f) => { const pos = readAt(f, 0, 104).readUInt32BE(100); patch(f, pos + 4, u32(CLUSTER)); },
  },
  {
    name: 'bitmap directory too large', refused: true, base: 'bitmap', message: /bitmap/,
    make: (f) => patch(f, findExtension(f, 0x23852875) + 8 + 8, u64(1n << 32n)),
  },
  // Table entries: the header is fine; reads fail cleanly or read zeros; check finds corruption.
  { name: 'L2 entry into the refcount table', refused: false, make: (f) => patch(f, l2Offset(f), u64((1n << 63n) | BigInt(field64(f, 48)))) },
  { name: 'L2 entry into the L1 table', refused: false, make: (f) => patch(f, l2Offset(f) + 8, u64((1n << 63n) | BigInt(field64(f, 40)))) },
  { name: 'L2 entry past EOF', refused: false, make: (f) => patch(f, l2Offset(f) + 8, u64((1n << 63n) | (1n << 40n))) },
  { name: 'L2 entry misaligned', refused: false, make: (f) => patch(f, l2Offset(f) + 8, u64((1n << 63n) | BigInt(l2Offset(f) + 4 * CLUSTER + 512))) },
  { name: 'L1 entry past EOF', refused: false, make: (f) => patch(f, field64(f, 40), u64((1n << 63n) | (1n << 40n))) },
  { name: 'L1 entry into the header', refused: false, make: (f) => patch(f, field64(f, 40), u64(1n << 63n)) },
  {
    name: 'compressed descriptor past EOF', refused: false,
    // Compressed, host offset 2^40 (cluster_bits 16: csize field at bits 54-61).
    make: (f) => patch(f, l2Offset(f) + 8, u64((1n << 62n) | (3n << 54n) | (1n << 40n))),
  },
  {
    name: 'compressed descriptor longer than the file', refused: false,
    make: (f) => patch(f, l2Offset(f) + 8, u64((1n << 62n) | (255n << 54n) | BigInt(fs.statSync(f).size - 1024))),
  },
  { name: 'refcount block past EOF', refused: false, make: (f) => patch(f, field64(f, 48), u64(1n << 40n)) },
  { name: 'refcount block in the L1 table', refused: false, make: (f) => patch(f, field64(f, 48), u64(BigInt(field64(f, 40)))) },
];

function baseImage(dir: string, kind: Case['base']): string {
  const f = path.join(dir, `base-${kind ?? 'plain'}.qcow2`);
  if (fs.existsSync(f)) return f;
  if (kind === 'backing') {
    const b = path.join(dir, 'backing.raw');
    fs.writeFileSync(b, Buffer.alloc(1 << 20, 0x42));
    qimg('create', '-q', '-f', 'qcow2', '-b', 'backing.raw', '-F', 'raw', f, '4M');
  } else {
    qimg('create', '-q', '-f', 'qcow2', f, '4M');
  }
  runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 256k', '-c', 'write -P 0x33 1M 64k', f]);
  if (kind === 'snapshot') qimg('snapshot', '-c', 'S', f);
  if (kind === 'bitmap') qimg('bitmap', '--add', f, 'b0');
  return f;
}

test('malformed qcow2 images fail cleanly (one line, no stack, bounded time and memory)', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io', 'time')) return;
  const dir = tempDir();
  try {
    for (const c of CASES) {
      const f = path.join(dir, `${c.name.replace(/[^a-z0-9]+/gi, '-')}.qcow2`);
      fs.copyFileSync(baseImage(dir, c.base), f);
      c.make(f, dir);
      const out = path.join(dir, 'out.raw');
      const info = guarded(['info', '-f', 'qcow2', f]);
      const conv = guarded(['convert', '-f', 'qcow2', '-O', 'raw', f, out]);
      const check = guarded(['check', '-f', 'qcow2', f]);
      if (c.refused) {
        // The corruption is real: qemu-img refuses it too.
        assert.notEqual(run('qemu-img', ['info', '-f', 'qcow2', f]).status, 0, `${c.name}: qemu-img accepts it`);
        assertCleanFailure(info, `${c.name}: info`, c.message);
        assertCleanFailure(conv, `${c.name}: convert`, c.message);
        assertCleanFailure(check, `${c.name}: check`);
        assert.equal(check.status, 1, `${c.name}: check cannot complete`);
      } else {
        assertTidy(info, `${c.name}: info`);
        assertTidy(conv, `${c.name}: convert`);
        assertTidy(check, `${c.name}: check`, true);
        assert.equal(check.status, 2, `${c.name}: check reports corruption (stdout: ${check.stdout})`);
        assert.match(check.stdout, /errors were found on the image/);
        // qemu-img agrees that it is corrupt.
        assert.equal(run('qemu-img', ['check', '-f', 'qcow2', f]).status, 2, `${c.name}: qemu-img check`);
      }
      fs.rmSync(f);
    }
  } finally {
    removeDir(dir);
  }
});

test('backing chain loops fail with a loop error instead of hanging', (t) => {
  if (!needPeers(t, 'qemu-img', 'time')) return;
  const dir = tempDir();
  try {
    const a = path.join(dir, 'a.qcow2');
    const b = path.join(dir, 'b.qcow2');
    const self = path.join(dir, 'self.qcow2');
    const base = path.join(dir, 'base.raw');
    fs.writeFileSync(base, Buffer.alloc(1 << 20));
    qimg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', a);
    qimg('create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', b);
    qimg('rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', a); // a -> b -> a
    qimg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', self);
    qimg('rebase', '-u', '-b', 'self.qcow2', '-F', 'qcow2', self); // self -> self
    for (const f of [a, b, self]) {
      const out = path.join(dir, 'out.raw');
      assertCleanFailure(guarded(['convert', '-O', 'raw', f, out]), `convert ${path.basename(f)}`, /loop/i);
      assertCleanFailure(guarded(['info', '--backing-chain', f]), `info --backing-chain ${path.basename(f)}`, /loop/i);
      assertTidy(guarded(['info', f]), `info ${path.basename(f)}`);
      assertCleanFailure(guarded(['map', '--output=json', f]), `map ${path.basename(f)}`, /loop/i);
    }
  } finally {
    removeDir(dir);
  }
});
