// `vdisk io` (qemu-io's command language) on raw files, every result cross-checked by the
// real qemu-io (and qemu-img map) on the same file.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { needPeers, removeDir, run, runOk, tempDir, vdisk } from './helpers.js';
import { nativeStatus } from '../src/native.js';

const MiB = 1 << 20;

function setup(t: import('node:test').TestContext, size = 4 * MiB): string {
  const dir = tempDir('vdisk-io-');
  t.after(() => removeDir(dir));
  const f = path.join(dir, 'disk.raw');
  fs.writeFileSync(f, '');
  fs.truncateSync(f, size);
  return f;
}

/** vdisk io with -c commands. */
function io(file: string, cmds: string[], extra: string[] = []) {
  return vdisk(['io', '-f', 'raw', ...extra, ...cmds.flatMap((c) => ['-c', c]), file]);
}

/** qemu-io verification: exit 0 and no "verification failed". */
function qemuVerify(file: string, ...cmds: string[]): void {
  const r = run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), file]);
  assert.equal(r.status, 0, `qemu-io ${cmds.join('; ')}: ${r.stdout}${r.stderr}`);
  assert.doesNotMatch(r.stdout, /verification failed|failed/, r.stdout);
}

function qemuMismatch(file: string, cmd: string): void {
  const r = run('qemu-io', ['-f', 'raw', '-c', cmd, file]);
  assert.match(r.stdout, /Pattern verification failed/, `qemu-io ${cmd} should see a mismatch`);
}

test('write -P is seen by qemu-io read -P; read -P verifies what qemu-io wrote', (t) => {
  if (!needPeers(t, 'qemu-io')) return;
  const f = setup(t);
  const r = io(f, ['write -P 0xab 1000 5000', 'write -P 17 1M 64k']);
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /^wrote 5000\/5000 bytes at offset 1000$/m);
  assert.match(r.stdout, /^wrote 65536\/65536 bytes at offset 1048576$/m);
  qemuVerify(f, 'read -P 0xab 1000 5000', 'read -P 0 0 1000', 'read -P 0 6000 1000', 'read -P 17 1M 64k');
  qemuMismatch(f, 'read -P 0xab 999 2');

  runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5c 2M 12345', f]);
  const ok = io(f, ['read -P 0x5c 2M 12345', 'read -P 0 0 1000']);
  assert.equal(ok.status, 0, ok.stdout);
  assert.doesNotMatch(ok.stdout, /failed/);
  assert.match(ok.stdout, /^read 12345\/12345 bytes at offset 2097152$/m);
});

test('read -P mismatch: "Pattern verification failed" like qemu-io, exit 1, later commands still run', (t) => {
  if (!needPeers(t, 'qemu-io')) return;
  const f = setup(t);
  runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 4096 4096', f]);
  const cmd = 'read -P 0x11 4000 200';
  const mine = io(f, [cmd, 'write -P 0x22 0 512']);
  assert.equal(mine.status, 1);
  const theirs = run('qemu-io', ['-f', 'raw', '-c', cmd, f]);
  const first = (s: string) => s.split('\n')[0];
  assert.equal(first(mine.stdout), 'Pattern verification failed at offset 4000, 200 bytes');
  assert.equal(first(mine.stdout), first(theirs.stdout));
  // The write after the failed read ran.
  qemuVerify(f, 'read -P 0x22 0 512');
  // -q: only the verification line, no statistics.
  const q = io(f, ['read -q -P 0x33 4096 10']);
  assert.equal(q.status, 1);
  assert.equal(q.stdout, 'Pattern verification failed at offset 4096, 10 bytes\n');
});

test('write -z zeroes, write -z -u unmaps (hole), write -f (FUA) lands', (t) => {
  if (!needPeers(t, 'qemu-io', 'qemu-img')) return;
  const f = setup(t);
  assert.equal(io(f, ['write -P 0x77 0 1M']).status, 0);
  const allocatedBefore = fs.statSync(f).blocks;
  const r = io(f, ['write -z 4096 8192', 'write -z -u 256k 256k', 'write -z 1000 100', 'write -f -P 0x99 600k 3000']);
  assert.equal(r.status, 0, r.stdout + r.stderr);
  qemuVerify(f, 'read -P 0x77 0 1000', 'read -P 0 1000 100', 'read -P 0x77 1100 2996', 'read -P 0 4096 8192',
    'read -P 0x77 12288 4096', 'read -P 0 256k 256k', 'read -P 0x99 600k 3000', 'read -P 0x77 512k 88k');
  if (nativeStatus === 'loaded') {
    assert.ok(fs.statSync(f).blocks <= allocatedBefore - 400, 'write -z -u of 256 KiB should free its blocks');
    const map = JSON.parse(runOk('qemu-img', ['map', '--output=json', '-f', 'raw', f])) as Array<{ start: number; length: number; data: boolean }>;
    const hole = map.find((e) => e.start <= 256 << 10 && e.start + e.length >= 512 << 10);
    assert.ok(hole && !hole.data, `qemu-img map should show a hole at 256k: ${JSON.stringify(map)}`);
  }
  assert.match(io(f, ['write -u 0 512']).stdout, /-u requires -z/);
  assert.equal(io(f, ['write -u 0 512']).status, 1);
  assert.equal(io(f, ['write -z -P 1 0 512']).status, 1);
});

test('discard frees space and reads back as zeros; flush succeeds silently', (t) => {
  if (!needPeers(t, 'qemu-io')) return;
  const f = setup(t);
  assert.equal(io(f, ['write -P 0x42 0 2M']).status, 0);
  const before = fs.statSync(f).blocks;
  const r = io(f, ['discard 512k 1M', 'flush']);
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.equal(r.stdout.split('\n')[0], 'discard 1048576/1048576 bytes at offset 524288');
  assert.doesNotMatch(r.stdout, /flush/);
  if (nativeStatus === 'loaded') {
    assert.ok(fs.statSync(f).blocks <= before - 2000, 'discard should punch a hole on a raw file');
    qemuVerify(f, 'read -P 0 512k 1M');
  }
  qemuVerify(f, 'read -P 0x42 0 512k', 'read -P 0x42 1536k 512k');
  const flush = io(f, ['flush']);
  assert.equal(flush.status, 0);
  assert.equal(flush.stdout, '');
});

test('map and length print what qemu-io prints', (t) => {
  if (!needPeers(t, 'qemu-io')) return;
  const f = setup(t, 3 * MiB + 512);
  runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 1 64k 64k', f]);
  for (const cmd of ['map', 'length']) {
    const mine = io(f, [cmd]);
    assert.equal(mine.status, 0, mine.stderr);
    const theirs = runOk('qemu-io', ['-f', 'raw', '-c', cmd, f]);
    assert.equal(mine.stdout, theirs, cmd);
  }
});

test('commands from standard input, and every cache mode (O_DIRECT included) writes what qemu-io reads', (t) => {
  if (!needPeers(t, 'qemu-io')) return;
  const f = setup(t, 2 * MiB + 1234);
  const script = 'write -P 0x31 100 5000\nread -P 0x31 100 5000\nflush\nquit\nwrite -P 0x32 0 1\n';
  const r = vdisk(['io', '-f', 'raw', f], { input: script });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  qemuVerify(f, 'read -P 0x31 100 5000', 'read -P 0 0 100');
  for (const [i, mode] of ['writeback', 'none', 'writethrough', 'directsync', 'unsafe'].entries()) {
    const pat = 0x40 + i;
    // Unaligned, and touching the odd last block of the file.
    const off = 2 * MiB + 1234 - 700 - i * 100;
    const w = io(f, [`write -P ${pat} 3333 7777`, `write -P ${pat} ${off} 700`, `read -P ${pat} 3333 7777`], ['-t', mode]);
    assert.equal(w.status, 0, `cache=${mode}: ${w.stdout}${w.stderr}`);
    qemuVerify(f, `read -P ${pat} 3333 7777`, `read -P ${pat} ${off} 700`, 'read -P 0x31 100 3233');
    assert.equal(fs.statSync(f).size, 2 * MiB + 1234, `cache=${mode} must not change the file size`);
  }
  // -n is cache=none.
  assert.equal(io(f, ['write -P 0x50 0 4096'], ['-n']).status, 0);
  qemuVerify(f, 'read -P 0x50 0 4096');
});

test('failures: out of range, read-only, unknown command each fail the run with a message', (t) => {
  const f = setup(t, MiB);
  let r = io(f, ['read 1M 1']);
  assert.equal(r.status, 1);
  assert.match(r.stdout, /^read failed: .*past the end/m);
  r = io(f, ['write -P 1 0 512'], ['-r']);
  assert.equal(r.status, 1);
  assert.match(r.stdout, /^write failed: .*read-only/m);
  assert.ok(fs.readFileSync(f).subarray(0, 512).equals(Buffer.alloc(512)), 'nothing written');
  r = io(f, ['frobnicate 1 2', 'read -P 0 0 512']);
  assert.equal(r.status, 1);
  assert.match(r.stdout + r.stderr, /command "frobnicate" not found/);
  r = io(f, ['read -P 300 0 1']);
  assert.equal(r.status, 1);
  r = io(f, ['read 0']);
  assert.equal(r.status, 1);
  assert.equal(r.stderr, '');
});
