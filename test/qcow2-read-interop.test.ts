// Read interop matrix: images made by qemu-img and written by qemu-io read byte-equal through
// vdisk (`vdisk convert -O raw`, and the library API) and `qemu-img convert -O raw`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { formats, openImage } from '../src/block/graph.js';
import { needPeers, prng, removeDir, run, runOk, tempDir, vdisk } from './helpers.js';

const qimg = (...args: string[]) => runOk('qemu-img', args);
const qio = (file: string, fmt: string, cmds: string[]) => runOk('qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), file]);

function needQcow2Driver(t: TestContext): boolean {
  if (formats.has('qcow2')) return true;
  if (process.env.VDISK_REQUIRE_PEERS === '1') throw new Error('qcow2 driver not registered');
  t.skip('qcow2 driver not registered yet');
  return false;
}

/** A seeded mix of writes, zero writes and discards (qemu-io commands) inside `size`. */
function workload(seed: number, size: number, clusterSize: number, n = 24): string[] {
  const rnd = prng(seed);
  const cmds: string[] = [];
  for (let i = 0; i < n; i++) {
    const len = Math.max(512, Math.floor(rnd() * Math.min(4 * clusterSize, 512 * 1024) / 512) * 512);
    const off = Math.floor(rnd() * ((size - len) / 512)) * 512;
    const kind = rnd();
    if (kind < 0.65) cmds.push(`write -P ${1 + Math.floor(rnd() * 254)} ${off} ${len}`);
    else if (kind < 0.85) cmds.push(`write -z ${off} ${len}`);
    else cmds.push(`discard ${off} ${len}`);
  }
  return cmds;
}

/** vdisk's raw view equals qemu-img's, by CLI convert and by the library API. */
async function assertSameView(dir: string, image: string, what: string, fmt = 'qcow2'): Promise<void> {
  const expected = path.join(dir, 'expected.raw');
  const actual = path.join(dir, 'actual.raw');
  qimg('convert', '-f', fmt, '-O', 'raw', image, expected);
  const r = vdisk(['convert', '-f', fmt, '-O', 'raw', image, actual]);
  assert.equal(r.status, 0, `${what}: vdisk convert: ${r.stderr}`);
  const want = fs.readFileSync(expected);
  const got = fs.readFileSync(actual);
  assert.equal(got.length, want.length, `${what}: length`);
  assert.ok(got.equals(want), `${what}: vdisk convert -O raw differs from qemu-img convert -O raw`);
  const node = await openImage(image, { format: fmt, readOnly: true });
  try {
    assert.equal(node.getLength(), want.length, `${what}: virtual size`);
    const buf = Buffer.alloc(want.length);
    await node.pread(0, buf);
    assert.ok(buf.equals(want), `${what}: library pread differs from qemu-img`);
  } finally {
    await node.close();
  }
  fs.rmSync(expected);
  fs.rmSync(actual);
}

test('cluster sizes x refcount widths x compat levels read byte-equal', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io') || !needQcow2Driver(t)) return;
  const dir = tempDir();
  try {
    const size = 6 << 20;
    const shapes: Array<[number, string]> = [
      [512, 'cluster_size=512'],
      [4096, 'cluster_size=4096,refcount_bits=1'],
      [65536, 'refcount_bits=64'],
      [65536, 'compat=0.10'],
      [2 << 20, 'cluster_size=2M,refcount_bits=16'],
      [65536, 'lazy_refcounts=on'],
      [4096, 'compat=1.1,refcount_bits=16'],
    ];
    let seed = 1;
    for (const [cs, opts] of shapes) {
      const f = path.join(dir, `img-${seed}.qcow2`);
      qimg('create', '-q', '-f', 'qcow2', '-o', opts, f, String(size));
      qio(f, 'qcow2', workload(seed++, size, cs));
      await assertSameView(dir, f, opts);
    }
  } finally {
    removeDir(dir);
  }
});

test('zero clusters (write -z), compressed zlib and zstd partly overwritten, lazy refcounts left dirty', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io') || !needQcow2Driver(t)) return;
  const dir = tempDir();
  try {
    const src = path.join(dir, 'src.raw');
    const rnd = prng(42);
    const data = Buffer.alloc(4 << 20);
    // Compressible halves and random halves.
    for (let i = 0; i < data.length; i++) data[i] = i % 131072 < 65536 ? (i >> 9) & 0xff : Math.floor(rnd() * 256);
    fs.writeFileSync(src, data);
    for (const ct of ['zlib', 'zstd']) {
      for (const cs of ['4k', '64k']) {
        const c = path.join(dir, `c-${ct}-${cs}.qcow2`);
        qimg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${ct},cluster_size=${cs}`, src, c);
        await assertSameView(dir, c, `compressed ${ct} ${cs}`);
        qio(c, 'qcow2', ['write -P 0x77 100k 10k', 'write -z 1M 64k', 'discard 2M 128k', 'write -P 0x78 3M 300k']);
        await assertSameView(dir, c, `compressed ${ct} ${cs} then overwritten`);
      }
    }
    const z = path.join(dir, 'zero.qcow2');
    qimg('create', '-q', '-f', 'qcow2', z, '4M');
    qio(z, 'qcow2', ['write -P 1 0 4M', 'write -z 64k 192k', 'write -z -u 1M 1M', 'write -z 3M 1000']);
    await assertSameView(dir, z, 'zero clusters');
    // A dirty lazy-refcount image: reading must not need the refcounts.
    const lazy = path.join(dir, 'lazy.qcow2');
    qimg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', lazy, '4M');
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 9 0 300k', '-c', 'write -P 8 2M 64k', '-c', 'abort', lazy]);
    await assertSameView(dir, lazy, 'dirty lazy refcounts');
  } finally {
    removeDir(dir);
  }
});

test('a 3-deep chain on a raw base, and an internal snapshot followed by more writes', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io') || !needQcow2Driver(t)) return;
  const dir = tempDir();
  try {
    const base = path.join(dir, 'base.raw');
    qimg('create', '-q', '-f', 'raw', base, '6M');
    qio(base, 'raw', ['write -P 0x10 0 6M']);
    const mid = path.join(dir, 'mid.qcow2');
    qimg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw', mid, '8M');
    qio(mid, 'qcow2', ['write -P 0x20 1M 1M', 'write -z 3M 512k', 'write -P 0x21 7M 512k']);
    const top = path.join(dir, 'top.qcow2');
    qimg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top);
    qio(top, 'qcow2', ['write -P 0x30 1536k 64k', 'discard 5M 64k', 'write -z 7M 64k', 'write -P 0x31 100000 5000']);
    await assertSameView(dir, top, '3-deep chain');

    // map through the chain: same extents as qemu-img map.
    const q = JSON.parse(qimg('map', '--output=json', top)) as unknown;
    const v = vdisk(['map', '--output=json', top]);
    assert.equal(v.status, 0, v.stderr);
    assert.deepEqual(JSON.parse(v.stdout), q, 'vdisk map --output=json equals qemu-img map');
    assert.equal(v.stdout, qimg('map', '--output=json', top), 'byte-identical map output');

    const s = path.join(dir, 'snap.qcow2');
    qimg('create', '-q', '-f', 'qcow2', s, '4M');
    qio(s, 'qcow2', ['write -P 1 0 2M']);
    qimg('snapshot', '-c', 'S', s);
    qio(s, 'qcow2', ['write -P 2 512k 1M', 'write -z 3M 64k', 'discard 0 64k']);
    await assertSameView(dir, s, 'after an internal snapshot');
  } finally {
    removeDir(dir);
  }
});
