// Persistent dirty bitmaps in qcow2 against QEMU 7.2: bitmaps qemu-img and qemu-io made load
// in vdisk with their bits, and vdisk's read back in QEMU (qemu-nbd -B + nbdinfo --map); a
// writable open marks them in use and a clean close stores them, with no leak for qemu-img
// check; a crash leaves them in use; `vdisk bitmap` and `qemu-img bitmap` agree on twins.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../src/block/graph.js';
import { needPeers, removeDir, run, runOk, tempDir, vdisk } from './helpers.js';
import { startVdisk, stopAll } from './nbd-helpers.js';

after(async () => {
  await stopAll();
});

const qimg = (...args: string[]) => runOk('qemu-img', args);
const qio = (file: string, ...cmds: string[]) => runOk('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file]);

interface Range {
  offset: number;
  length: number;
}

/** The dirty ranges of a bitmap as QEMU reads it: qemu-nbd -B, nbdinfo --map (socket activation). */
function qemuDirty(file: string, bitmap: string): Range[] {
  const out = runOk('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${bitmap}`, '--', '[', 'qemu-nbd', '-r', '-f', 'qcow2', '-B', bitmap, file, ']']);
  return (JSON.parse(out) as Array<{ offset: number; length: number; type: number }>)
    .filter((e) => e.type === 1).map((e) => ({ offset: e.offset, length: e.length }));
}

interface LoadedBitmap {
  name: string;
  granularity: number;
  enabled: boolean;
  inconsistent: boolean;
  dirty: Range[];
}

/** The bitmaps as vdisk loads them (read-only open through the library). */
async function vdiskBitmaps(file: string): Promise<LoadedBitmap[]> {
  const node = await openImage(file, { readOnly: true });
  try {
    return node.dirtyBitmaps.map((b) => ({
      name: b.name!, granularity: b.granularity, enabled: b.enabled, inconsistent: b.inconsistent, dirty: [...b.dirtyRanges()],
    }));
  } finally {
    await node.close();
  }
}

/** qemu-img info's bitmap list (`-U`: the image may be open elsewhere). */
function qemuBitmapList(file: string): Array<{ name: string; granularity: number; flags: string[] }> {
  const j = JSON.parse(qimg('info', '-U', '--output=json', file)) as { 'format-specific': { data: { bitmaps?: Array<{ name: string; granularity: number; flags: string[] }> } } };
  return j['format-specific'].data.bitmaps ?? [];
}

function checkClean(file: string): void {
  const r = run('qemu-img', ['check', file]);
  assert.equal(r.status, 0, `qemu-img check ${path.basename(file)}: ${r.stdout}${r.stderr}`);
}

function sha(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

test('issue 13 item 1: a write through vdisk keeps a QEMU-made bitmap, records the write, leaks nothing', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-nbd', 'nbdinfo')) return;
  const dir = tempDir();
  try {
    const a = path.join(dir, 'a.qcow2');
    qimg('create', '-q', '-f', 'qcow2', a, '16M');
    qimg('bitmap', '--add', a, 'bm0');
    const w = vdisk(['io', '-f', 'qcow2', '-c', 'write -P 1 0 4k', a]);
    assert.equal(w.status, 0, w.stderr);
    assert.deepEqual(qemuBitmapList(a), [{ flags: ['auto'], name: 'bm0', granularity: 65536 }]);
    checkClean(a);
    assert.deepEqual(qemuDirty(a, 'bm0'), [{ offset: 0, length: 65536 }]);
    // Our info prints the list as qemu-img does, human and JSON.
    for (const output of ['human', 'json']) {
      const q = qimg('info', `--output=${output}`, a).replace(/^(disk size|    "actual-size").*\n/m, '');
      const v = vdisk(['info', `--output=${output}`, a]).stdout.replace(/^(disk size|    "actual-size").*\n/m, '').replace(/\nvdisk specific information:[^]*$/, '\n');
      assert.equal(v.trimEnd(), q.trimEnd(), `info --output=${output}`);
    }
  } finally {
    removeDir(dir);
  }
});

test('bitmaps QEMU wrote load with their bits, flags and granularity; vdisk writes them back for QEMU', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo')) return;
  const dir = tempDir();
  try {
    const f = path.join(dir, 'r.qcow2');
    qimg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, '64M');
    qimg('bitmap', '--add', '-g', '512', f, 'fine');
    qimg('bitmap', '--add', f, 'def');
    qimg('bitmap', '--add', '-g', '1M', f, 'coarse');
    qio(f, 'write 1M 8k', 'write 40M 100k', 'write 64000k 1536');
    qimg('bitmap', '--add', f, 'off');
    qimg('bitmap', '--disable', f, 'off');
    // A bitmap with nothing set stores no data clusters: table entries 0.
    qimg('bitmap', '--add', f, 'empty');
    let loaded = await vdiskBitmaps(f);
    assert.deepEqual(loaded.map((b) => [b.name, b.granularity, b.enabled, b.inconsistent]), [
      ['fine', 512, true, false], ['def', 4096, true, false], ['coarse', 1 << 20, true, false], ['off', 4096, false, false], ['empty', 4096, true, false],
    ]);
    for (const b of loaded) assert.deepEqual(b.dirty, b.name === 'off' || b.name === 'empty' ? [] : qemuDirty(f, b.name), b.name);
    assert.deepEqual(loaded[0].dirty, [{ offset: 1 << 20, length: 8192 }, { offset: 40 << 20, length: 102400 }, { offset: 64000 << 10, length: 1536 }]);

    // vdisk records writes, write-zeroes and discards in the enabled ones, then stores all.
    const w = vdisk(['io', '-f', 'qcow2', '-c', 'write 2M 4k', '-c', 'write -z 30M 64k', '-c', 'discard 40M 4k', '-c', 'write 67108352 512', f]);
    assert.equal(w.status, 0, w.stderr);
    checkClean(f);
    loaded = await vdiskBitmaps(f);
    const want: Record<string, Range[]> = {
      fine: [{ offset: 1 << 20, length: 8192 }, { offset: 2 << 20, length: 4096 }, { offset: 30 << 20, length: 65536 },
        { offset: 40 << 20, length: 102400 }, { offset: 64000 << 10, length: 1536 }, { offset: (64 << 20) - 512, length: 512 }],
      coarse: [{ offset: 1 << 20, length: 2 << 20 }, { offset: 30 << 20, length: 1 << 20 }, { offset: 40 << 20, length: 1 << 20 }, { offset: 62 << 20, length: 2 << 20 }],
      off: [],
    };
    for (const b of loaded) {
      const q = b.name === 'off' ? [] : qemuDirty(f, b.name);
      assert.deepEqual(q, b.dirty, `${b.name}: QEMU reads what vdisk stored`);
      if (want[b.name]) assert.deepEqual(b.dirty, want[b.name], b.name);
    }
    assert.deepEqual(qemuBitmapList(f).map((b) => [b.name, b.granularity, b.flags.join()]), [
      ['fine', 512, 'auto'], ['def', 4096, 'auto'], ['coarse', 1 << 20, 'auto'], ['off', 4096, ''], ['empty', 4096, 'auto'],
    ]);

    // And back: QEMU changes what vdisk stored; vdisk reads QEMU's version.
    qio(f, 'write 50M 512');
    qimg('bitmap', '--clear', f, 'def');
    loaded = await vdiskBitmaps(f);
    assert.deepEqual(loaded.find((b) => b.name === 'def')!.dirty, []);
    assert.deepEqual(loaded.find((b) => b.name === 'fine')!.dirty, qemuDirty(f, 'fine'));
    assert.ok(loaded.find((b) => b.name === 'fine')!.dirty.some((r) => r.offset === 50 << 20));
    checkClean(f);
  } finally {
    removeDir(dir);
  }
});

test('a writable open marks bitmaps in use before anything is written; a clean close clears it; read-only opens change nothing', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const f = path.join(dir, 'u.qcow2');
    qimg('create', '-q', '-f', 'qcow2', f, '16M');
    qimg('bitmap', '--add', f, 'b0');
    qio(f, 'write 0 64k');
    const before = sha(f);
    const ro = await openImage(f, { readOnly: true });
    assert.deepEqual(qemuBitmapList(f)[0].flags, ['auto']);
    await ro.close();
    assert.equal(sha(f), before, 'a read-only open leaves the file as it was');

    const rw = await openImage(f, { readOnly: false });
    // Nothing written through the node yet: the mark is already on disk (stable).
    assert.deepEqual(qemuBitmapList(f), [{ flags: ['in-use', 'auto'], name: 'b0', granularity: 65536 }]);
    await rw.pwrite(1 << 20, Buffer.alloc(4096, 1));
    assert.deepEqual(qemuBitmapList(f)[0].flags, ['in-use', 'auto']);
    await rw.close();
    assert.deepEqual(qemuBitmapList(f), [{ flags: ['auto'], name: 'b0', granularity: 65536 }]);
    checkClean(f);
  } finally {
    removeDir(dir);
  }
});

test('a crash (SIGKILL of vdisk serve during writes) leaves the bitmap in use; it loads inconsistent and can only be removed', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir();
  try {
    const f = path.join(dir, 'c.qcow2');
    qimg('create', '-q', '-f', 'qcow2', f, '16M');
    qimg('bitmap', '--add', f, 'b0');
    qimg('bitmap', '--add', '-g', '4k', f, 'b1');
    const sock = path.join(dir, 'nbd.sock');
    const d = await startVdisk(['-f', 'qcow2', f], { socket: sock });
    const uri = `nbd+unix:///?socket=${encodeURIComponent(sock)}`;
    for (let i = 0; i < 4; i++) runOk('qemu-io', ['-f', 'raw', '-c', `write -P ${i + 1} ${i}M 64k`, uri]);
    d.signal('SIGKILL');
    await d.exited;

    assert.deepEqual(qemuBitmapList(f).map((b) => [b.name, b.flags.join()]), [['b0', 'in-use,auto'], ['b1', 'in-use,auto']]);
    const loaded = await vdiskBitmaps(f);
    assert.deepEqual(loaded.map((b) => [b.name, b.inconsistent, b.dirty.length]), [['b0', true, 0], ['b1', true, 0]]);

    // As in QEMU: an inconsistent bitmap cannot be cleared, enabled or merged; removal works,
    // and a writable open in between keeps it (in use) rather than dropping it.
    for (const args of [['--clear', f, 'b0'], ['--disable', f, 'b0'], ['--add', f, 'n', '--merge', 'b0']]) {
      const v = vdisk(['bitmap', ...args]);
      assert.equal(v.status, 1, `bitmap ${args.join(' ')}`);
      assert.match(v.stderr, /^vdisk: Operation (clear|disable|merge) on bitmap (b0|n) failed: Bitmap 'b0' is inconsistent and cannot be used; try --remove/);
      assert.equal(v.stderr.split('\n').length, 2, 'one line');
    }
    assert.deepEqual(qemuBitmapList(f).map((b) => [b.name, b.flags.join()]), [['b0', 'in-use,auto'], ['b1', 'in-use,auto'], ['n', 'auto']]);
    for (const name of ['b0', 'b1']) assert.equal(vdisk(['bitmap', '--remove', f, name]).status, 0);
    assert.deepEqual(qemuBitmapList(f).map((b) => b.name), ['n']);
    // The crash may have left clusters allocated but unreferenced: leaks at most, no errors.
    const c = run('qemu-img', ['check', f]);
    assert.ok(c.status === 0 || c.status === 3, `qemu-img check after the crash: ${c.stdout}`);
  } finally {
    removeDir(dir);
  }
});

/**
 * qemu-img's and vdisk's error, with the tool prefix and the node's name made equal. qemu-img
 * may split one message over two prefixed lines; its hint lines (no prefix) are left out.
 */
function normalize(stderr: string, file: string): string {
  return stderr.split('\n').filter((l) => /^(qemu-img|vdisk): /.test(l)).map((l) => l.replace(/^(qemu-img|vdisk): /, '')).join(' ')
    .replace(/#block\d+/g, 'NODE')
    .split(file).join('NODE')
    .replace(/; try --remove to delete this bitmap from disk$/, '');
}

test('vdisk bitmap and qemu-img bitmap on twin images: same exit codes, messages, bitmaps and dirty maps', (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo')) return;
  const dir = tempDir();
  try {
    const other = path.join(dir, 'other.qcow2');
    qimg('create', '-q', '-f', 'qcow2', other, '32M');
    qimg('bitmap', '--add', other, 'o');
    qio(other, 'write 5M 64k');
    const small = path.join(dir, 'small.qcow2');
    qimg('create', '-q', '-f', 'qcow2', small, '16M');
    qimg('bitmap', '--add', small, 's');

    type Step = string[] | { io: string[] };
    const make = (name: string, ...create: string[]) => (f: string) => qimg('create', '-q', '-f', create[0] ?? 'qcow2', ...create.slice(1), f, name);
    const scenarios: Array<{ name: string; create: (f: string) => void; steps: Step[]; format?: string }> = [
      {
        name: 'main', create: make('32M'),
        steps: [
          ['--add', 'F', 'a'], ['--add', '-g', '4k', 'F', 'b'], ['--add', 'F', 'a'],
          { io: ['write 0 64k', 'write 10M 4k'] },
          ['--disable', 'F', 'b'], { io: ['write 20M 4k'] },
          ['--add', '--disable', 'F', 'c'], ['--merge', 'a', 'F', 'c'], ['--clear', 'F', 'a'],
          ['--remove', 'F', 'nope'], ['--enable', 'F', 'nope'], ['--clear', 'F', 'nope'], ['--merge', 'nope', 'F', 'c'], ['--merge', 'a', 'F', 'nope'],
          ['--merge', 'o', '-b', other, '-F', 'qcow2', 'F', 'c'], ['--merge', 's', '-b', small, 'F', 'c'],
          ['--add', '-g', '1000', 'F', 'd'], ['--add', '-g', '256', 'F', 'd'], ['--add', '-g', '4G', 'F', 'd'], ['--add', '-g', '4294967808', 'F', 'd'],
          ['--add', '-g', '0', 'F', 'e'], ['--add', '-g', 'abc', 'F', 'x'], ['--remove', '-g', '64k', 'F', 'a'], ['-F', 'qcow2', '--add', 'F', 'x'],
          ['--add', '-b', other, 'F', 'x'], ['--add', 'F'], ['F', 'a'], ['--add', 'F', 'a', 'extra'],
          ['--add', '--add', 'F', 'f'], ['--enable', '--clear', '--remove', 'F', 'b'], ['--add', 'F', 'x'.repeat(1024)], ['--add', 'F', ''],
          { io: ['write 30M 512'] },
        ],
      },
      { name: 'remove-all', create: make('16M'), steps: [['--add', 'F', 'a'], { io: ['write 0 4k'] }, ['--remove', 'F', 'a'], ['--remove', 'F', 'a']] },
      { name: 'huge', create: make('4T'), steps: [['--add', '-g', '512', 'F', 'b'], ['--add', '-g', '64k', 'F', 'b']] },
      { name: 'v2', create: make('16M', 'qcow2', '-o', 'compat=0.10'), steps: [['--add', 'F', 'b']] },
      { name: 'raw', create: make('16M', 'raw'), format: 'raw', steps: [['-f', 'raw', '--add', 'F', 'b']] },
    ];
    for (const sc of scenarios) {
      const q = path.join(dir, `${sc.name}-q.img`);
      const v = path.join(dir, `${sc.name}-v.img`);
      sc.create(q);
      fs.copyFileSync(q, v);
      for (const step of sc.steps) {
        if (!Array.isArray(step)) {
          for (const f of [q, v]) qio(f, ...step.io);
          continue;
        }
        const rq = run('qemu-img', ['bitmap', ...step.map((a) => (a === 'F' ? q : a))]);
        const rv = vdisk(['bitmap', ...step.map((a) => (a === 'F' ? v : a))]);
        const what = `${sc.name}: bitmap ${step.join(' ').slice(0, 80)}`;
        assert.equal(rv.status, rq.status, `${what}: exit code (qemu-img: ${rq.stderr}, vdisk: ${rv.stderr})`);
        assert.equal(normalize(rv.stderr, v), normalize(rq.stderr, q), `${what}: message`);
        assert.ok(rv.stderr.split('\n').length <= 2, `${what}: one line`);
      }
      if (sc.format === 'raw') continue;
      const lq = qemuBitmapList(q);
      assert.deepEqual(qemuBitmapList(v), lq, `${sc.name}: bitmap lists`);
      for (const b of lq) assert.deepEqual(qemuDirty(v, b.name), qemuDirty(q, b.name), `${sc.name}: dirty map of ${b.name}`);
      checkClean(v);
      // The autoclear bit follows the extension (header byte 88-95).
      const autoclear = (f: string) => fs.readFileSync(f).readBigUInt64BE(88);
      if (sc.name !== 'v2') assert.equal(autoclear(v), autoclear(q), `${sc.name}: autoclear bits`);
    }
  } finally {
    removeDir(dir);
  }
});

test('resize keeps the bitmaps (resized); an inconsistent one blocks it, as in qemu-img', async (t) => {
  if (!needPeers(t, 'qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo')) return;
  const dir = tempDir();
  try {
    const f = path.join(dir, 'r.qcow2');
    qimg('create', '-q', '-f', 'qcow2', f, '16M');
    qimg('bitmap', '--add', f, 'b0');
    qio(f, 'write 8M 4k');
    assert.equal(vdisk(['resize', f, '40M']).status, 0);
    checkClean(f);
    const covers = (rs: Range[], off: number) => rs.some((r) => r.offset <= off && off < r.offset + r.length);
    const [b] = await vdiskBitmaps(f);
    assert.equal(covers(b.dirty, 8 << 20), true);
    assert.deepEqual(qemuBitmapList(f).map((x) => x.flags.join()), ['auto']);
    // QEMU loads it at the new size (its table matches): writes past the old end are recorded.
    qio(f, 'write 39M 4k');
    assert.equal(covers((await vdiskBitmaps(f))[0].dirty, 39 << 20), true);
    assert.deepEqual(qemuDirty(f, 'b0'), (await vdiskBitmaps(f))[0].dirty);

    // Left in use (as after a crash): QEMU refuses to resize, and so do we.
    const fd = fs.openSync(f, 'r+');
    const hdr = Buffer.alloc(65536);
    fs.readSync(fd, hdr, 0, hdr.length, 0);
    let pos = hdr.readUInt32BE(100);
    while (hdr.readUInt32BE(pos) !== 0x23852875) pos += 8 + ((hdr.readUInt32BE(pos + 4) + 7) & ~7);
    const dirOff = Number(hdr.readBigUInt64BE(pos + 8 + 16));
    const flags = Buffer.alloc(4);
    fs.readSync(fd, flags, 0, 4, dirOff + 12);
    flags.writeUInt32BE(flags.readUInt32BE() | 1);
    fs.writeSync(fd, flags, 0, 4, dirOff + 12);
    fs.closeSync(fd);
    const g = path.join(dir, 'g.qcow2');
    fs.copyFileSync(f, g);
    const q = run('qemu-img', ['resize', g, '64M']);
    const v = vdisk(['resize', f, '64M']);
    assert.equal(q.status, 1);
    assert.equal(v.status, 1);
    assert.match(v.stderr, /^vdisk: Bitmap 'b0' is inconsistent and cannot be used/);
    assert.equal(sha(f), sha(g), 'neither tool changed the image');
  } finally {
    removeDir(dir);
  }
});
