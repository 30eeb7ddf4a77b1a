// The file protocol on real files in /var/tmp: block status from SEEK_DATA/SEEK_HOLE against
// qemu-img map, hole punching and zero ranges, truncate preallocation modes and their
// rollback, the fallback without the native addon, and open errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { openFile, FileDriver } from '../src/protocols/file-posix.js';
import { native } from '../src/native.js';
import { REQ_MAY_UNMAP, REQ_NO_FALLBACK } from '../src/block/driver.js';
import type { BlockNode } from '../src/block/node.js';
import { VdiskError } from '../src/block/errors.js';
import { needPeers, prng, removeDir, REPO_ROOT, run, runOk, tempDir, vdisk } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * 1024;

interface Run {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

function merge(runs: Run[]): Run[] {
  const out: Run[] = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    if (last && last.data === r.data && last.zero === r.zero && last.start + last.length === r.start) {
      last.length += r.length;
    } else {
      out.push({ ...r });
    }
  }
  return out;
}

async function ourMap(node: BlockNode): Promise<Run[]> {
  const runs: Run[] = [];
  const size = node.getLength();
  for (let pos = 0; pos < size;) {
    const ext = await node.blockStatus(pos, size - pos);
    for (const e of ext) {
      assert.equal(e.allocated, true);
      assert.equal(e.hostOffset, e.offset);
      runs.push({ start: e.offset, length: e.length, data: e.data, zero: e.zero });
    }
    pos = ext[ext.length - 1].offset + ext[ext.length - 1].length;
  }
  return merge(runs);
}

function qemuMap(file: string): Run[] {
  const out = JSON.parse(runOk('qemu-img', ['map', '-f', 'raw', '--output=json', file])) as Run[];
  return merge(out.map((r) => ({ start: r.start, length: r.length, data: r.data, zero: r.zero })));
}

function open(file: string, readOnly = false, direct = false): Promise<BlockNode> {
  return openFile(file, { readOnly, direct, noFlush: false });
}

function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

/** Run a module snippet in a child process (so VDISK_NO_NATIVE or rlimits apply); JSON out. */
function child(code: string, env: Record<string, string> = {}, shellPrefix = ''): unknown {
  const dist = path.join(REPO_ROOT, 'dist', 'src');
  const script = `import { openFile } from ${JSON.stringify(path.join(dist, 'protocols', 'file-posix.js'))};
import * as driver from ${JSON.stringify(path.join(dist, 'block', 'driver.js'))};
const out = {};
try { ${code} } catch (err) { out.error = { code: err.code, message: err.message, vdisk: err.name === 'VdiskError' }; }
process.stdout.write(JSON.stringify(out));`;
  const r = shellPrefix
    ? run('bash', ['-c', `${shellPrefix}; exec "$0" --input-type=module -e "$1"`, process.execPath, script], { env: { ...process.env, ...env } })
    : run(process.execPath, ['--input-type=module', '-e', script], { env: { ...process.env, ...env } });
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout);
}

test('npm install builds the native addon offline from a clean tree', (t) => {
  if (!needPeers(t, 'npm')) return;
  // A copy of just what the build needs, so the shared build/ is never rebuilt under others.
  const dir = tempDir();
  try {
    for (const f of ['binding.gyp', '.npmrc', 'native', 'scripts']) fs.cpSync(path.join(REPO_ROOT, f), path.join(dir, f), { recursive: true });
    const pkg = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8'));
    fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ name: 'vdisk-build-check', version: '0.0.0', private: true, type: 'module', scripts: { install: pkg.scripts.install } }));
    const r = run('npm', ['install', '--offline', '--no-audit', '--no-fund'], { cwd: dir, env: { ...process.env, npm_config_loglevel: 'error' } });
    assert.equal(r.status, 0, r.stderr);
    assert.doesNotMatch(r.stdout + r.stderr, /native addon build failed|warning:/i);
    const addon = path.join(dir, 'build', 'Release', 'vdisk_native.node');
    const probe = run(process.execPath, ['-e', `const n = require(${JSON.stringify(addon)}); const fs = require('fs');
const fd = fs.openSync(${JSON.stringify(addon)}, 'r');
console.log(JSON.stringify({ fns: Object.keys(n).sort(), data: n.seekData(fd, 0), pastEnd: n.seekData(fd, 1e12), punch: n.FALLOC_FL_PUNCH_HOLE }));`]);
    assert.equal(probe.status, 0, probe.stderr);
    assert.deepEqual(JSON.parse(probe.stdout), {
      fns: ['EAGAIN', 'FALLOC_FL_KEEP_SIZE', 'FALLOC_FL_PUNCH_HOLE', 'FALLOC_FL_ZERO_RANGE', 'blkdiscard', 'blockDeviceSectorSize',
        'blockDeviceSize', 'dioAlignment', 'fallocate', 'preadNowait', 'pwriteNowait', 'seekData', 'seekHole', 'uringFlush',
        'uringSetup', 'uringSubmit'],
      data: 0, pastEnd: -1, punch: 2,
    });
  } finally {
    removeDir(dir);
  }
});

test('block status matches qemu-img map on sparse files', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  assert.ok(native, 'native addon must be built for this test');
  const dir = tempDir();
  try {
    const rnd = prng(7);
    const layouts: Array<{ size: number; writes: Array<[number, number]> }> = [
      { size: 4 * MiB, writes: [] }, // all hole
      { size: 1 * MiB, writes: [[0, 1 * MiB]] }, // all data
      { size: 2 * MiB, writes: [[0, 4 * KiB], [2 * MiB - 512, 512]] }, // data at both ends
      { size: 3 * MiB + 512, writes: [[100, 1], [64 * KiB + 7, 70 * KiB], [3 * MiB, 512]] }, // unaligned pieces, odd size
    ];
    for (let i = 0; i < 3; i++) {
      const size = 8 * MiB;
      const writes: Array<[number, number]> = [];
      for (let j = 0; j < 25; j++) {
        const off = Math.floor(rnd() * (size - 300 * KiB));
        writes.push([off, 1 + Math.floor(rnd() * 300 * KiB)]);
      }
      layouts.push({ size, writes });
    }
    let sawMixed = false;
    for (const [i, l] of layouts.entries()) {
      const file = path.join(dir, `sparse${i}.raw`);
      const fd = fs.openSync(file, 'w');
      fs.ftruncateSync(fd, l.size);
      for (const [off, len] of l.writes) fs.writeSync(fd, Buffer.alloc(len, 0x5a), 0, len, off);
      fs.closeSync(fd);
      const node = await open(file, true);
      const ours = await ourMap(node);
      await node.close();
      assert.deepEqual(ours, qemuMap(file), `layout ${i}`);
      assert.equal(ours.reduce((s, r) => s + r.length, 0), l.size);
      if (ours.some((r) => r.data) && ours.some((r) => r.zero)) sawMixed = true;
    }
    assert.ok(sawMixed, 'the layouts must mix data and holes');
  } finally {
    removeDir(dir);
  }
});

test('write zeroes: MAY_UNMAP punches a hole, otherwise ZERO_RANGE keeps the blocks', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    const file = path.join(dir, 'z.raw');
    fs.writeFileSync(file, Buffer.alloc(4 * MiB, 0x11));
    const node = await open(file);
    assert.equal(node.driver.caps.writeZeroes, 'native');
    assert.equal(node.driver.caps.discard, 'native');
    const full = allocatedBytes(file);

    await node.pwriteZeroes(1 * MiB, 1 * MiB, REQ_MAY_UNMAP);
    await node.flush();
    assert.equal(allocatedBytes(file), full - 1 * MiB, 'punched range is freed');
    const back = Buffer.alloc(3 * MiB);
    await node.pread(0, back);
    assert.ok(back.subarray(0, MiB).every((b) => b === 0x11));
    assert.ok(back.subarray(MiB, 2 * MiB).every((b) => b === 0));
    assert.ok(back.subarray(2 * MiB).every((b) => b === 0x11));
    const punched = await ourMap(node);
    assert.deepEqual(punched, qemuMap(file));
    assert.deepEqual(punched.find((r) => r.start === MiB), { start: MiB, length: MiB, data: false, zero: true });

    // ZERO_RANGE, even as a "fast zero": reads zero, space stays allocated.
    await node.pwriteZeroes(3 * MiB, 512 * KiB, REQ_NO_FALLBACK);
    await node.flush();
    assert.equal(allocatedBytes(file), full - 1 * MiB);
    await node.pread(1 * MiB, back);
    assert.ok(back.subarray(0, MiB).every((b) => b === 0));
    assert.ok(back.subarray(MiB, 2 * MiB).every((b) => b === 0x11));
    assert.ok(back.subarray(2 * MiB, 2 * MiB + 512 * KiB).every((b) => b === 0));
    assert.ok(back.subarray(2 * MiB + 512 * KiB).every((b) => b === 0x11));
    assert.deepEqual(await ourMap(node), qemuMap(file));

    // Unaligned edges: the generic path writes those bytes, the middle is punched.
    await node.pwriteZeroes(100, 200 * KiB, REQ_MAY_UNMAP);
    const head = Buffer.alloc(300 * KiB);
    await node.pread(0, head);
    assert.ok(head.subarray(0, 100).every((b) => b === 0x11));
    assert.ok(head.subarray(100, 100 + 200 * KiB).every((b) => b === 0));
    assert.ok(head.subarray(100 + 200 * KiB).every((b) => b === 0x11));

    // Discard punches holes too.
    await node.pdiscard(2 * MiB, 1 * MiB);
    await node.flush();
    const m = await ourMap(node);
    assert.deepEqual(m, qemuMap(file));
    assert.ok(m.some((r) => r.start <= 2 * MiB && r.start + r.length >= 3 * MiB && r.zero));
    assert.equal(node.getLength(), 4 * MiB);
    await node.close();
    assert.equal(fs.statSync(file).size, 4 * MiB, 'zeroing inside the file never changes its size');
  } finally {
    removeDir(dir);
  }
});

test('write zeroes on a file system without ZERO_RANGE (tmpfs): emulated, or ENOTSUP when fast', async (t) => {
  // tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE.
  const shm = '/dev/shm';
  if (!fs.existsSync(shm) || !fs.readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === shm && l.split(' ')[2] === 'tmpfs')) {
    t.skip('no tmpfs at /dev/shm');
    return;
  }
  const dir = fs.mkdtempSync(path.join(shm, 'vdisk-test-'));
  try {
    const file = path.join(dir, 'z.raw');
    fs.writeFileSync(file, Buffer.alloc(2 * MiB, 0x77));
    const node = await open(file);
    const full = allocatedBytes(file);
    await assert.rejects(node.pwriteZeroes(0, MiB, REQ_NO_FALLBACK), (e: VdiskError) => e instanceof VdiskError && e.code === 'ENOTSUP');
    assert.ok(fs.readFileSync(file).subarray(0, MiB).every((b) => b === 0x77), 'a refused fast zero changes nothing');
    await node.pwriteZeroes(0, MiB, 0);
    assert.equal(allocatedBytes(file), full, 'emulated by writing zeros: still allocated');
    await node.pwriteZeroes(MiB, MiB, REQ_MAY_UNMAP);
    assert.equal(allocatedBytes(file), full - MiB, 'the hole was punched');
    await node.close();
    const bytes = fs.readFileSync(file);
    assert.equal(bytes.length, 2 * MiB);
    assert.ok(bytes.every((b) => b === 0));
  } finally {
    removeDir(dir);
  }
});

test('write zeroes past EOF (driver level) extends the file exactly', async () => {
  const dir = tempDir();
  try {
    for (const flags of [0, REQ_MAY_UNMAP]) {
      const file = path.join(dir, `grow${flags}.raw`);
      fs.writeFileSync(file, Buffer.alloc(10000, 0x22));
      const node = await open(file);
      const drv = node.driver as FileDriver;
      await drv.pwriteZeroes(8192, 20000, flags);
      assert.equal(drv.getLength(), 28192);
      await node.close();
      const bytes = fs.readFileSync(file);
      assert.equal(bytes.length, 28192, `flags ${flags}`);
      assert.ok(bytes.subarray(0, 8192).every((b) => b === 0x22));
      assert.ok(bytes.subarray(8192).every((b) => b === 0));
    }
  } finally {
    removeDir(dir);
  }
});

test('truncate: off is sparse, falloc reserves, full writes; shrinking', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    for (const prealloc of ['off', 'falloc', 'full'] as const) {
      const file = path.join(dir, `t-${prealloc}.raw`);
      fs.writeFileSync(file, Buffer.alloc(5000, 0x33));
      const node = await open(file);
      // Not 4 KiB aligned; 512-aligned because qemu-img rounds raw sizes up to 512.
      await node.truncate(8 * MiB + 5120, prealloc);
      assert.equal(node.getLength(), 8 * MiB + 5120);
      assert.equal(fs.statSync(file).size, 8 * MiB + 5120);
      const alloc = allocatedBytes(file);
      if (prealloc === 'off') assert.ok(alloc < 1 * MiB, `off allocates nothing new (${alloc})`);
      else assert.ok(alloc >= 8 * MiB, `${prealloc} allocates the new range (${alloc})`);
      // full writes data; falloc leaves unwritten extents, which map as zeros (until read:
      // ext4 then counts the cached pages as data, so look before reading).
      const map = qemuMap(file);
      assert.deepEqual(await ourMap(node), map);
      const data = map.filter((r) => r.data).reduce((s, r) => s + r.length, 0);
      if (prealloc === 'full') assert.ok(data >= 8 * MiB, `full: ${data} bytes of data`);
      else assert.ok(data < 1 * MiB, `${prealloc}: ${data} bytes of data`);
      const all = Buffer.alloc(8 * MiB + 5120);
      await node.pread(0, all);
      assert.ok(all.subarray(0, 5000).every((b) => b === 0x33));
      assert.ok(all.subarray(5000).every((b) => b === 0));
      await node.close();
    }
    const file = path.join(dir, 'shrink.raw');
    fs.writeFileSync(file, Buffer.alloc(MiB, 1));
    const node = await open(file);
    await assert.rejects(node.truncate(1000, 'falloc'), (e: VdiskError) => e.code === 'EINVAL' && /shrinking/.test(e.message));
    await node.truncate(1000, 'off');
    await node.close();
    assert.equal(fs.statSync(file).size, 1000);
  } finally {
    removeDir(dir);
  }
});

test('truncate that runs out of room reports it and keeps the old size', (t) => {
  // RLIMIT_FSIZE stands in for a full disk (filling the shared disk is not an option):
  // the kernel refuses the growth with EFBIG exactly where it would say ENOSPC.
  if (!needPeers(t, 'bash')) return;
  const dir = tempDir();
  try {
    for (const prealloc of ['off', 'falloc', 'full']) {
      const file = path.join(dir, `nospace-${prealloc}.raw`);
      fs.writeFileSync(file, Buffer.alloc(300 * KiB, 0x44));
      const out = child(`const n = await openFile(${JSON.stringify(file)}, { readOnly: false, direct: false, noFlush: false });
try { await n.truncate(8 * 1024 * 1024, ${JSON.stringify(prealloc)}); out.ok = true; } finally { out.length = n.getLength(); await n.close(); }`,
      {}, 'ulimit -f 1024') as { error?: { code: string; message: string; vdisk: boolean }; length: number };
      assert.ok(out.error, `${prealloc}: growing past the limit must fail`);
      assert.equal(out.error.code, 'EFBIG');
      assert.equal(out.error.vdisk, true);
      assert.match(out.error.message, new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: resize to 8388608 bytes \\(preallocation=${prealloc}\\): File too large$`));
      assert.equal(out.length, 300 * KiB);
      assert.equal(fs.statSync(file).size, 300 * KiB, `${prealloc}: size rolled back`);
      assert.ok(allocatedBytes(file) <= 300 * KiB + 64 * KiB, `${prealloc}: no space left claimed`);
    }
  } finally {
    removeDir(dir);
  }
});

test('ENOSPC part way through preallocation shrinks the file back', (t) => {
  // A real full file system: a 4 MiB tmpfs mounted for the test (needs root). Without the
  // addon, falloc and full both grow the file first and then write zeros, so the failure
  // comes after the growth and only the rollback restores the old size.
  if (process.getuid?.() !== 0) {
    t.skip('needs root to mount a small tmpfs');
    return;
  }
  const dir = tempDir();
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const m = run('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'vdisk-test', mnt]);
  if (m.status !== 0) {
    removeDir(dir);
    t.skip(`cannot mount tmpfs: ${m.stderr.trim()}`);
    return;
  }
  try {
    for (const [prealloc, env] of [['full', { VDISK_NO_NATIVE: '1' }], ['falloc', { VDISK_NO_NATIVE: '1' }], ['full', {}], ['falloc', {}]] as const) {
      const file = path.join(mnt, 'full.raw');
      fs.writeFileSync(file, Buffer.alloc(100 * KiB, 0x44));
      const out = child(`const n = await openFile(${JSON.stringify(file)}, { readOnly: false, direct: false, noFlush: false });
try { await n.truncate(16 * 1024 * 1024, ${JSON.stringify(prealloc)}); out.ok = true; } finally { out.length = n.getLength(); await n.close(); }`,
      env) as { error?: { code: string; message: string }; length: number };
      const what = `${prealloc}${env.VDISK_NO_NATIVE ? ' without addon' : ''}`;
      assert.equal(out.error?.code, 'ENOSPC', `${what}: ${JSON.stringify(out)}`);
      assert.equal(out.error?.message, `${file}: resize to 16777216 bytes (preallocation=${prealloc}): No space left on device`);
      assert.equal(out.length, 100 * KiB);
      assert.equal(fs.statSync(file).size, 100 * KiB, `${what}: size rolled back`);
      assert.ok(allocatedBytes(file) <= 100 * KiB + 4 * KiB, `${what}: space given back (${allocatedBytes(file)})`);
      fs.rmSync(file);
    }
  } finally {
    run('umount', [mnt]);
    removeDir(dir);
  }
});

test('without the native addon: all data, zeros written, fast zero refused, info says so', async (t) => {
  if (!needPeers(t, 'qemu-img')) return;
  const dir = tempDir();
  try {
    const file = path.join(dir, 'nonative.raw');
    const fd = fs.openSync(file, 'w');
    fs.ftruncateSync(fd, 4 * MiB);
    fs.writeSync(fd, Buffer.alloc(64 * KiB, 0x55), 0, 64 * KiB, MiB);
    fs.closeSync(fd);
    const before = allocatedBytes(file);
    const out = child(`const n = await openFile(${JSON.stringify(file)}, { readOnly: false, direct: true, noFlush: false });
out.caps = n.driver.caps;
out.align = n.driver.limits().requestAlignment;
out.status = await n.blockStatus(0, n.getLength());
out.notes = (await n.driver.info()).notes;
await n.pwriteZeroes(1024 * 1024, 65536, driver.REQ_MAY_UNMAP);
try { await n.pwriteZeroes(0, 65536, driver.REQ_NO_FALLBACK); } catch (e) { out.fast = e.code; }
await n.pdiscard(2 * 1024 * 1024, 1024 * 1024);
await n.truncate(5 * 1024 * 1024, 'falloc');
await n.close();`, { VDISK_NO_NATIVE: '1' }) as Record<string, any>;
    assert.equal(out.error, undefined, JSON.stringify(out.error));
    assert.deepEqual(out.caps, { fua: 'emulate', writeZeroes: 'none', discard: 'none' });
    assert.ok(out.align >= 512, 'alignment probed by trial reads');
    assert.equal(out.status.length, 1);
    assert.deepEqual({ ...out.status[0], hostFile: undefined }, { offset: 0, length: 4 * MiB, data: true, zero: false, allocated: true, hostOffset: 0, hostFile: undefined });
    assert.match(out.notes[0], /^native addon: not loaded \(VDISK_NO_NATIVE=1\): no holes, all data/);
    assert.match(out.notes[1], /O_DIRECT, request alignment \d+, memory alignment \d+ \(from probe\)/);
    assert.equal(out.fast, 'ENOTSUP');
    const bytes = fs.readFileSync(file);
    assert.equal(bytes.length, 5 * MiB);
    assert.ok(bytes.every((b) => b === 0), 'the zeroed range reads as zeros');
    // Zeros were written as data (no punching): falloc wrote the new MiB too.
    assert.ok(allocatedBytes(file) >= before + 1 * MiB, `${allocatedBytes(file)} vs ${before}`);
    assert.ok(qemuMap(file).some((r) => r.data && r.start <= MiB && r.start + r.length >= MiB + 64 * KiB));
    // The CLI prints the note.
    const info = vdisk(['info', file], { env: { ...process.env, VDISK_NO_NATIVE: '1' } });
    assert.equal(info.status, 0, info.stderr);
    assert.match(info.stdout, /native addon: not loaded \(VDISK_NO_NATIVE=1\)/);
    assert.match(vdisk(['info', file]).stdout, /native addon: loaded/);
  } finally {
    removeDir(dir);
  }
});

test('open errors: missing file, read-only file for writing, writes to a read-only open', async (t) => {
  const dir = tempDir();
  try {
    const missing = path.join(dir, 'nope.raw');
    await assert.rejects(open(missing), (e: VdiskError) =>
      e instanceof VdiskError && e.code === 'ENOENT' && e.message === `Could not open '${missing}': No such file or directory`);
    const r = vdisk(['io', '-c', 'read 0 1', missing]);
    assert.equal(r.status, 1);
    assert.equal(r.stderr, `vdisk: Could not open '${missing}': No such file or directory\n`);

    const file = path.join(dir, 'ro.raw');
    fs.writeFileSync(file, Buffer.alloc(64 * KiB, 0x66));
    fs.chmodSync(file, 0o444);
    fs.chmodSync(dir, 0o755);
    const ro = await open(file, true);
    await assert.rejects(ro.pwrite(0, Buffer.alloc(512)), (e: VdiskError) => e.code === 'EROFS' && e.message.includes(file));
    const back = Buffer.alloc(512);
    await ro.pread(0, back);
    assert.equal(back[0], 0x66);
    await ro.close();

    // Root ignores file modes, so run as nobody then.
    let result;
    if (process.getuid?.() === 0) {
      if (!needPeers(t, 'setpriv')) return;
      result = run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath,
        path.join(REPO_ROOT, 'bin', 'vdisk.js'), 'io', '-c', 'write 0 512', file]);
    } else {
      result = vdisk(['io', '-c', 'write 0 512', file]);
    }
    assert.equal(result.status, 1);
    assert.equal(result.stderr, `vdisk: Could not open '${file}': Permission denied\n`);
    assert.ok(fs.readFileSync(file).every((b) => b === 0x66));
  } finally {
    removeDir(dir);
  }
});
