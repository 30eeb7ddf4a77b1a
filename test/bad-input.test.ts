// Every bad input gets exactly one line on stderr (no stack trace, no "internal error") and
// a non-zero exit (qemu-img's code where it has one: compare errors exit 2): missing files,
// bad sizes, unknown formats and cache modes, read-only files, a full file system, and
// command-line mistakes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { hasProgram, removeDir, run, tempDir, vdisk, type RunResult } from './helpers.js';

/** A temp dir removed after the test, after `first` (unmount, chattr -i) has run. */
function withDir(t: import('node:test').TestContext, first: Array<() => void> = []): string {
  const dir = tempDir('vdisk-bad-');
  t.after(() => {
    for (const f of first) f();
    removeDir(dir);
  });
  return dir;
}

/** Exactly one line on stderr, a plain message, and the expected exit code. */
function oneLine(r: RunResult, what: string, status = 1, pattern?: RegExp): void {
  assert.equal(r.status, status, `${what}: exit code (stderr: ${r.stderr})`);
  const lines = r.stderr.split('\n');
  assert.equal(lines.length, 2, `${what}: exactly one line on stderr, got ${JSON.stringify(r.stderr)}`);
  assert.equal(lines[1], '');
  assert.match(lines[0], /^vdisk: /, what);
  assert.doesNotMatch(r.stderr, /internal error|\n\s+at |Error:|undefined|\[object/, `${what}: ${r.stderr}`);
  if (pattern) assert.match(lines[0], pattern, what);
}

test('missing files: every command names the file in one line', (t) => {
  const dir = withDir(t);
  const missing = path.join(dir, 'missing.raw');
  const ok = path.join(dir, 'ok.raw');
  fs.writeFileSync(ok, Buffer.alloc(65536));
  const cases: Array<[string[], number]> = [
    [['info', missing], 1],
    [['map', missing], 1],
    [['resize', missing, '1M'], 1],
    [['convert', missing, path.join(dir, 'out.raw')], 1],
    [['io', '-c', 'read 0 512', missing], 1],
    [['bench', '-c', '10', missing], 1],
    [['compare', missing, ok], 2],
    [['compare', ok, missing], 2],
    [['create', path.join(dir, 'no', 'such', 'dir.raw'), '1M'], 1],
  ];
  for (const [args, status] of cases) oneLine(vdisk(args), args.join(' '), status, /No such file or directory/);
  assert.equal(fs.existsSync(path.join(dir, 'out.raw')), false, 'a failed convert leaves no target behind');
});

test('bad sizes: 0, negative, not a number, too large, unknown suffix', (t) => {
  const dir = withDir(t);
  const f = path.join(dir, 'x.raw');
  for (const size of ['0', 'abc', '1.5.3', '100E', '9000P', '1Q', '', '12 M B']) {
    oneLine(vdisk(['create', '-q', f, size]), `create ${JSON.stringify(size)}`, 1, /size/i);
    assert.equal(fs.existsSync(f), false, `create ${size} must not leave a file`);
  }
  // Negative sizes: after `--` they are sizes (before it, commander calls them unknown options).
  for (const size of ['-5', '-1M']) {
    oneLine(vdisk(['create', '-q', '--', f, size]), `create -- ${size}`, 1, /size/i);
    oneLine(vdisk(['create', '-q', f, size]), `create ${size}`);
    assert.equal(fs.existsSync(f), false);
  }
  // Fractions that are not whole bytes, and sizes in other commands.
  oneLine(vdisk(['create', f, '0.3k']), 'create 0.3k', 1, /whole number/);
  assert.equal(vdisk(['create', '-q', f, '64k']).status, 0);
  oneLine(vdisk(['resize', f, 'lots']), 'resize lots');
  oneLine(vdisk(['resize', f, '100E']), 'resize 100E');
  oneLine(vdisk(['convert', '-S', '1000', f, path.join(dir, 'y.raw')]), 'convert -S 1000', 1, /multiple of 512/);
  oneLine(vdisk(['bench', '-s', '1Q', f]), 'bench -s 1Q');
  oneLine(vdisk(['map', '-s', 'x', f]), 'map -s x');
  assert.equal(fs.statSync(f).size, 64 << 10, 'failed resizes changed nothing');
});

test('unknown format, cache mode and option values', (t) => {
  const dir = withDir(t);
  const f = path.join(dir, 'x.raw');
  fs.writeFileSync(f, Buffer.alloc(65536));
  const y = path.join(dir, 'y.raw');
  oneLine(vdisk(['create', '-f', 'foo', y, '1M']), 'create -f foo', 1, /foo/);
  oneLine(vdisk(['convert', '-O', 'foo', f, y]), 'convert -O foo', 1, /foo/);
  oneLine(vdisk(['convert', '-f', 'foo', f, y]), 'convert -f foo', 1, /foo/);
  oneLine(vdisk(['info', '-f', 'foo', f]), 'info -f foo', 1, /foo/);
  oneLine(vdisk(['compare', '-f', 'foo', f, f]), 'compare -f foo', 2, /foo/);
  assert.equal(fs.existsSync(y), false);
  for (const args of [['io', '-t', 'bogus', '-c', 'flush', f], ['convert', '-t', 'bogus', f, y], ['convert', '-T', 'bogus', f, y],
    ['bench', '-t', 'bogus', f], ['compare', '-T', 'bogus', f, f]]) {
    oneLine(vdisk(args), args.join(' '), args[0] === 'compare' ? 2 : 1, /bogus/);
  }
  oneLine(vdisk(['info', '--output=xml', f]), 'info --output=xml', 1, /xml/);
  oneLine(vdisk(['create', '-o', 'preallocation=sometimes', y, '1M']), 'create -o preallocation=sometimes', 1, /sometimes/);
  oneLine(vdisk(['create', '-o', 'cluster_size=64k', y, '1M']), 'create -o unsupported option', 1, /cluster_size/);
  oneLine(vdisk(['convert', '-m', '99', f, y]), 'convert -m 99');
  oneLine(vdisk(['bench', '-d', '0', f]), 'bench -d 0');
});

test('command-line mistakes: unknown subcommand or option, missing arguments (commander, exit 1)', () => {
  const cases: string[][] = [
    ['frobnicate'],
    ['info', '--bogus', 'x'],
    ['convert', '-Z', 'a', 'b'],
    ['info'],
    ['create'],
    ['convert', 'only-one'],
    ['compare', 'only-one'],
    ['resize', 'file-without-size'],
    ['io', '-c'],
  ];
  for (const args of cases) oneLine(vdisk(args), args.join(' ') || '(none)');
  // Help and version are not errors.
  assert.equal(vdisk(['--version']).status, 0);
  assert.equal(vdisk(['--help']).status, 0);
});

test('read-only file (immutable, as root bypasses mode bits): writes fail in one line, reads work', (t) => {
  const cleanup: Array<() => void> = [];
  const dir = withDir(t, cleanup);
  const f = path.join(dir, 'ro.raw');
  fs.writeFileSync(f, Buffer.alloc(1 << 20, 7));
  const chattr = hasProgram('chattr') ? run('chattr', ['+i', f]) : null;
  if (!chattr || chattr.status !== 0) {
    // Cannot make the file read-only for root: at least the read-only open mode must refuse writes.
    const r = vdisk(['io', '-r', '-c', 'write 0 512', f]);
    assert.equal(r.status, 1);
    assert.match(r.stdout, /^write failed: .*read-only/m);
    t.skip(`chattr +i not possible here (${chattr?.stderr.trim() ?? 'no chattr'}): only io -r was tested`);
    return;
  }
  cleanup.push(() => run('chattr', ['-i', f]));
  oneLine(vdisk(['io', '-c', 'write 0 512', f]), 'io write on an immutable file', 1, /ro\.raw.*(not permitted|Read-only|Permission)/);
  oneLine(vdisk(['resize', f, '2M']), 'resize an immutable file', 1, /not permitted|Read-only|Permission/);
  const src = path.join(dir, 'src.raw');
  fs.writeFileSync(src, Buffer.alloc(1 << 20, 1));
  oneLine(vdisk(['convert', '-n', src, f]), 'convert -n into an immutable file', 1, /not permitted|Read-only|Permission/);
  assert.ok(fs.readFileSync(f).equals(Buffer.alloc(1 << 20, 7)), 'the file is unchanged');
  // Read-only uses still work.
  assert.equal(vdisk(['io', '-r', '-c', 'read -P 7 0 1M', f]).status, 0);
  assert.equal(vdisk(['info', f]).status, 0);
  assert.equal(vdisk(['compare', f, f]).status, 0);
  // -r refuses writes itself.
  const r = vdisk(['io', '-r', '-c', 'write 0 512', f]);
  assert.equal(r.status, 1);
  assert.match(r.stdout, /^write failed: .*read-only/m);
});

/** A 4 MiB tmpfs (or, failing that, a loop-mounted ext4) under `dir`; null when mounting is refused. */
function smallFs(dir: string): { mnt: string; cleanup: () => void; why?: string } | { mnt: null; why: string } {
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const tmpfs = run('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', mnt]);
  if (tmpfs.status === 0) return { mnt, cleanup: () => run('umount', [mnt]) };
  const img = path.join(dir, 'fs.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 8 << 20);
  const mk = run('mkfs.ext4', ['-q', img]);
  const loop = mk.status === 0 ? run('mount', ['-o', 'loop', img, mnt]) : mk;
  if (loop.status === 0) return { mnt, cleanup: () => run('umount', [mnt]) };
  return { mnt: null, why: `mount refused: ${tmpfs.stderr.trim()} / ${loop.stderr.trim()}` };
}

test('disk full: one "No space left on device" line, non-zero exit, reported writes read back', (t) => {
  const cleanup: Array<() => void> = [];
  const dir = withDir(t, cleanup);
  const m = smallFs(dir);
  if (m.mnt === null) {
    t.skip(m.why);
    return;
  }
  cleanup.push(m.cleanup);
  const src = path.join(dir, 'big.raw');
  const rnd = Buffer.alloc(8 << 20);
  for (let i = 0; i < rnd.length; i += 4) rnd.writeUInt32LE((Math.imul(i, 2654435761) ^ (i >>> 7)) >>> 0, i);
  fs.writeFileSync(src, rnd);

  // convert into the full file system.
  const out = path.join(m.mnt, 'out.raw');
  oneLine(vdisk(['convert', src, out]), 'convert onto a full file system', 1, /No space left on device/);
  fs.rmSync(out, { force: true });

  // 1 MiB writes one by one until the space runs out: each "wrote" must read back, the
  // failed ones must say so, and the final flush must not turn a failure into success.
  const img = path.join(m.mnt, 'img.raw');
  assert.equal(vdisk(['create', '-q', img, '8M']).status, 0);
  const cmds: string[] = [];
  for (let i = 0; i < 8; i++) cmds.push(`write -P ${0x10 + i} ${i}M 1M`);
  cmds.push('flush');
  const r = vdisk(['io', '-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), img]);
  assert.equal(r.status, 1, 'running out of space must fail the run');
  assert.doesNotMatch(r.stderr, /internal error|\n\s+at /);
  const wrote = [...r.stdout.matchAll(/^wrote 1048576\/1048576 bytes at offset (\d+)$/gm)].map((x) => Number(x[1]));
  const failed = [...r.stdout.matchAll(/^write failed: (.*)$/gm)].map((x) => x[1]);
  assert.ok(wrote.length >= 1 && wrote.length < 8, `some writes fit, not all: ${r.stdout}`);
  assert.equal(wrote.length + failed.length, 8);
  for (const msg of failed) assert.match(msg, /No space left on device/);
  // What was reported written is there (read by a fresh process).
  const back = vdisk(['io', '-r', ...wrote.flatMap((off) => ['-c', `read -q -P ${0x10 + off / (1 << 20)} ${off} 1M`]), img]);
  assert.equal(back.status, 0, back.stdout);
  assert.equal(fs.statSync(img).size, 8 << 20, 'the image keeps its size');
  // A later write that fits still works, and a flush after it succeeds.
  fs.rmSync(path.join(m.mnt, 'img.raw'));
  assert.equal(vdisk(['create', '-q', img, '1M']).status, 0);
  assert.equal(vdisk(['io', '-c', 'write -P 1 0 1M', '-c', 'flush', img]).status, 0);
});

test('bad backing files for create: missing, loop back to the new image, json: and protocol names', (t) => {
  const dir = withDir(t);
  const a = path.join(dir, 'a.qcow2');
  const b = path.join(dir, 'b.qcow2');
  assert.equal(vdisk(['create', '-q', '-f', 'qcow2', a, '1M']).status, 0);
  assert.equal(vdisk(['create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', b]).status, 0);
  const c = path.join(dir, 'c.qcow2');
  oneLine(vdisk(['create', '-q', '-f', 'qcow2', '-b', 'missing.qcow2', '-F', 'qcow2', c, '1M']), 'missing backing', 1, /No such file/);
  assert.equal(fs.existsSync(c), false, 'nothing is created when the backing does not open');
  // Re-creating a.qcow2 on top of b (whose backing is a) would make a loop.
  oneLine(vdisk(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', a]), 'loop', 1, /loop/);
  for (const name of ['json:{"driver":"raw"}', 'nbd://127.0.0.1/x', 'http://example.invalid/x']) {
    for (const unsafe of [[], ['-u']]) {
      oneLine(vdisk(['create', '-q', ...unsafe, '-f', 'qcow2', '-b', name, '-F', 'raw', c, '1M']), `backing ${name} ${unsafe}`, 1, /refuses/);
    }
  }
  assert.equal(fs.existsSync(c), false);
  // -u skips opening a missing backing, as qemu-img create -u does.
  assert.equal(vdisk(['create', '-q', '-u', '-f', 'qcow2', '-b', 'missing.qcow2', '-F', 'qcow2', c, '1M']).status, 0);
});
