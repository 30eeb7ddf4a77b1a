// qemu-iotests scenarios that vdisk got wrong (issue 14): each runs the test's own steps once
// with qemu-img/qemu-io and once with `vdisk`/`vdisk io` (qemu-io's command language), then
// compares what the guest reads and what `qemu-img map --output=json` and `qemu-img check`
// say about both images. QEMU's result is the expectation; nothing here is derived from vdisk.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { needPeers, removeDir, run, runOk, tempDir, VDISK_BIN } from './helpers.js';

interface Tools {
  name: string;
  img(...args: string[]): void;
  /** One qemu-io process running `cmds`; returns its stdout (failures are in it, as qemu-io prints them). */
  io(file: string, ...cmds: string[]): string;
}

function tools(kind: 'qemu' | 'vdisk', dir: string): Tools {
  const [imgCmd, imgPre] = kind === 'qemu' ? ['qemu-img', []] : [process.execPath, [VDISK_BIN]];
  const [ioCmd, ioPre] = kind === 'qemu' ? ['qemu-io', []] : [process.execPath, [VDISK_BIN, 'io']];
  return {
    name: kind,
    img: (...args) => void runOk(imgCmd, [...imgPre, ...args], { cwd: dir, timeout: 120_000 }),
    io: (file, ...cmds) => {
      const r = run(ioCmd, [...ioPre, '-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file], { cwd: dir, timeout: 120_000 });
      return r.stdout + r.stderr;
    },
  };
}

/** qemu-img map --output=json with host offsets hidden (allocation order may differ). */
function map(file: string): unknown[] {
  return (JSON.parse(runOk('qemu-img', ['map', '--output=json', file])) as Record<string, unknown>[])
    .map(({ offset: _o, ...rest }) => rest);
}

function check(file: string): Record<string, unknown> {
  const r = run('qemu-img', ['check', '--output=json', file]);
  assert.equal(r.status, 0, `qemu-img check ${file}: ${r.stdout}${r.stderr}`);
  const j = JSON.parse(r.stdout);
  return { corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, 'allocated-clusters': j['allocated-clusters'], 'image-end-offset': j['image-end-offset'] };
}

/** Run `steps` with both tool sets in their own directories; returns both results. */
function both<T>(steps: (t: Tools, dir: string) => T): { qemu: T; vdisk: T } {
  const out: Partial<{ qemu: T; vdisk: T }> = {};
  for (const kind of ['qemu', 'vdisk'] as const) {
    const dir = tempDir(`vdisk-iotest-${kind}-`);
    try {
      out[kind] = steps(tools(kind, dir), dir);
    } finally {
      removeDir(dir);
    }
  }
  return out as { qemu: T; vdisk: T };
}

const verified = (out: string) => !/verification failed|failed|error/i.test(out);

test('iotest 292: shrink mid-cluster then grow over a longer backing file reads zeros', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  // The test's own default (compat=1.1); compat=0.10 is the next test.
  for (const compat of ['1.1']) {
    const r = both((x, dir) => {
      x.img('create', '-f', 'qcow2', 'base.qcow2', '1M');
      x.io('base.qcow2', 'write -P 0x11 0 1M');
      x.img('create', '-f', 'qcow2', '-o', `compat=${compat}`, '-F', 'qcow2', '-b', 'base.qcow2', 'top.qcow2');
      x.io('top.qcow2', 'write -P 0x22 0 1M');
      x.img('resize', '--shrink', 'top.qcow2', '520k');
      x.img('resize', 'top.qcow2', '567k');
      const top = path.join(dir, 'top.qcow2');
      return {
        head: verified(x.io('top.qcow2', 'read -P 0x22 0 520k')),
        tail: x.io('top.qcow2', 'read -P 0x00 520k 47k'),
        map: map(top),
        check: check(top),
      };
    });
    assert.ok(r.qemu.head && r.vdisk.head, `compat=${compat}: data before the cut`);
    assert.ok(verified(r.qemu.tail), `compat=${compat}: qemu reads zeros: ${r.qemu.tail}`);
    assert.ok(verified(r.vdisk.tail), `compat=${compat}: vdisk must read zeros past the old end: ${r.vdisk.tail}`);
    assert.deepEqual(r.vdisk.map, r.qemu.map, `compat=${compat}: map`);
    assert.deepEqual(r.vdisk.check, r.qemu.check, `compat=${compat}: check`);
  }
});

test('iotest 292 variant: growing a compat=0.10 image over a longer backing file fails as qemu-img does, without a size change', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const r = both((x, dir) => {
    x.img('create', '-f', 'qcow2', 'base.qcow2', '1M');
    x.img('create', '-f', 'qcow2', '-o', 'compat=0.10', '-F', 'qcow2', '-b', 'base.qcow2', 'top.qcow2', '256k');
    let failed = false;
    try {
      x.img('resize', 'top.qcow2', '768k');
    } catch {
      failed = true;
    }
    return { failed, map: map(path.join(dir, 'top.qcow2')) };
  });
  assert.deepEqual(r.vdisk, r.qemu);
  assert.equal(r.qemu.failed, true);
});

test('iotest 290: discard keeps the data of a compat=0.10 image with a backing file; v3 zeroes', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const r = both((x, dir) => {
    x.img('create', '-f', 'qcow2', 'base.qcow2', '128k');
    x.io('base.qcow2', 'write -P 0xff 0 128k');
    const res: Record<string, unknown> = {};
    for (const compat of ['0.10', '1.1']) {
      const f = `top-${compat}.qcow2`;
      x.img('create', '-f', 'qcow2', '-o', `compat=${compat}`, '-b', 'base.qcow2', '-F', 'qcow2', f);
      x.io(f, 'write -P 0x01 0 128k');
      x.io(f, 'discard 0 128k');
      res[compat] = {
        reads: verified(x.io(f, `read -P ${compat === '0.10' ? '0x01' : '0x00'} 0 128k`)),
        map: map(path.join(dir, f)),
        check: check(path.join(dir, f)),
      };
    }
    // Without a backing file both versions drop the clusters.
    x.img('create', '-f', 'qcow2', '-o', 'compat=0.10', 'alone.qcow2', '128k');
    x.io('alone.qcow2', 'write -P 0x01 0 128k');
    x.io('alone.qcow2', 'discard 0 128k');
    res.alone = { reads: verified(x.io('alone.qcow2', 'read -P 0x00 0 128k')), map: map(path.join(dir, 'alone.qcow2')) };
    return res;
  });
  assert.deepEqual(r.vdisk, r.qemu);
  assert.deepEqual((r.qemu['0.10'] as { reads: boolean }).reads, true);
});

test('iotest 179: write -z marks zero clusters (aligned and unaligned, with and without -u) as QEMU does', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const r = both((x, dir) => {
    x.img('create', '-f', 'qcow2', 'base.qcow2', '64M');
    x.img('create', '-f', 'qcow2', '-F', 'qcow2', '-b', 'base.qcow2', 'top.qcow2');
    // One process per group of the test's steps (qemu-io runs -c commands in order).
    x.io('base.qcow2', 'write -z -u 2M 2M', 'write -z 6M 2M');
    x.io('base.qcow2', 'write -z -u 10485761 2097150', 'write -z 14680065 2097150');
    x.io('base.qcow2', 'write 18M 14M', 'write -z -u 20M 2M', 'write -z 24M 6M');
    x.io('base.qcow2', 'write -z -u 26M 2M', 'write -z 28M 2M');
    x.io('base.qcow2', 'write -z 32M 8M', 'write -z -u 34M 2M', 'write -z 36M 2M');
    x.io('base.qcow2', 'write -z 40M 8M', 'write 48M 8M');
    x.io('top.qcow2', 'write -z -u 42M 2M', 'write -z 44M 2M', 'write -z -u 50M 2M', 'write -z 52M 2M',
      'write -z -u 58M 2M', 'write -z 60M 2M');
    const base = path.join(dir, 'base.qcow2');
    const top = path.join(dir, 'top.qcow2');
    return { base: map(base), top: map(top), checkBase: check(base), checkTop: check(top) };
  });
  assert.deepEqual(r.vdisk.base, r.qemu.base, 'base map');
  assert.deepEqual(r.vdisk.top, r.qemu.top, 'top map');
  assert.deepEqual(r.vdisk.checkBase, r.qemu.checkBase, 'base check');
  assert.deepEqual(r.vdisk.checkTop, r.qemu.checkTop, 'top check');
});

test('iotest 066: writes reuse preallocated zero clusters in place, and discarded clusters are allocated again', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const r = both((x, dir) => {
    const f = path.join(dir, 't.qcow2');
    x.img('create', '-f', 'qcow2', 't.qcow2', '64M');
    x.io('t.qcow2', 'write -P 42 1M 256k');
    const orig = runOk('qemu-img', ['map', '--output=json', f]);
    x.io('t.qcow2', 'write -z 1M 256k');
    x.io('t.qcow2', `write -P 23 ${(1024 + 32) * 1024} 192k`);
    const reused = runOk('qemu-img', ['map', '--output=json', f]) === orig;
    const reads = verified(x.io('t.qcow2', `read -P 0 ${1024 * 1024} 32k`, `read -P 23 ${(1024 + 32) * 1024} 192k`,
      `read -P 0 ${(1024 + 32 + 192) * 1024} 32k`));
    const afterReuse = check(f);
    // Discarded clusters go back to the free pool and the next allocation takes them.
    x.io('t.qcow2', 'write -P 7 8M 1M', 'discard 8M 1M', 'write -P 9 16M 1M');
    return { reused, reads, afterReuse, afterDiscard: check(f), map: map(f) };
  });
  assert.equal(r.qemu.reused, true);
  assert.deepEqual(r.vdisk, r.qemu);
});
