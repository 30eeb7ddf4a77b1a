// rbd: images against the real peers on a real single-node Ceph cluster (test/rbd-cluster.ts):
// qemu-img/qemu-io read what vdisk wrote and the other way round, `rbd export` equals
// `vdisk convert`, rbd snapshots are shared both ways, `vdisk map` equals `qemu-img map`,
// names (namespaces, blockdev options) and the cache mapping.
import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { removeDir, run, runOk, tempDir, vdisk } from './helpers.js';
import { needCeph, needQemuRbd, sharedCluster, stopSharedCluster, type Cluster } from './rbd-cluster.js';
import { openImage } from '../src/block/graph.js';
import { CACHE_MODES } from '../src/block/cache-mode.js';
import { openRbd, rbdOptionsFromBlockdev } from '../src/protocols/rbd.js';

const MiB = 1 << 20;
let c: Cluster;
let dir: string;

before(() => {
  dir = tempDir('vdisk-rbd-');
});
after(() => {
  stopSharedCluster();
  removeDir(dir);
});

/** Cluster up and peers present, else skipped (or failed under VDISK_REQUIRE_PEERS=1). */
function ready(t: TestContext, qemu = true): boolean {
  if (!needCeph(t)) return false;
  if (qemu && !needQemuRbd(t)) return false;
  c = sharedCluster();
  return true;
}

function vd(args: string[], timeout = 120_000): string {
  const r = vdisk(args, { env: c.env, timeout });
  assert.equal(r.status, 0, `vdisk ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

function peer(cmd: string, args: string[]): string {
  const r = run(cmd, args, { env: c.env, timeout: 120_000 });
  assert.equal(r.status, 0, `${cmd} ${args.join(' ')} failed: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** A local raw file with data runs (some unaligned) and holes, written by qemu-io. */
function sampleRaw(file: string, size: number): void {
  peer('qemu-img', ['create', '-q', '-f', 'raw', file, String(size)]);
  peer('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 64k', '-c', 'write -P 0x22 1000000 12345', '-c', 'write -P 0x33 9M 4M',
    '-c', `write -P 0x44 ${size - 4096} 4096`, file]);
}

describe('rbd interop', () => {
  test('vdisk writes an rbd image, qemu-img and qemu-io read it', async (t) => {
    if (!ready(t)) return;
    const local = path.join(dir, 'a.raw');
    sampleRaw(local, 24 * MiB);
    const img = `rbd:rbd/${c.name()}`;
    vd(['convert', '-O', 'raw', local, img]);
    assert.match(peer('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', local, img]), /Images are identical/);
    vd(['io', '-c', 'write -P 0x5a 3000 70000', '-c', 'write -z 9M 64k', '-c', 'discard 12M 1M', img]);
    peer('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x5a 3000 70000', '-c', 'read -P 0 9M 64k', '-c', 'read -P 0 12M 1M',
      '-c', 'read -P 0x33 10M 2M', img]);
  });

  test('qemu-img writes an rbd image, vdisk reads it; rbd export equals vdisk convert', async (t) => {
    if (!ready(t)) return;
    const local = path.join(dir, 'b.raw');
    sampleRaw(local, 20 * MiB);
    const name = c.name();
    peer('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', local, `rbd:rbd/${name}`]);
    const out = path.join(dir, 'b.out.raw');
    vd(['convert', '-O', 'raw', `rbd:rbd/${name}`, out]);
    assert.ok(fs.readFileSync(out).equals(fs.readFileSync(local)), 'vdisk convert rbd -> raw differs from the source');
    assert.ok(fs.statSync(out).blocks * 512 < 10 * MiB, 'holes of the rbd image stay holes in the copy');
    const exported = path.join(dir, 'b.export.raw');
    c.rbd('export', `rbd/${name}`, exported);
    assert.ok(fs.readFileSync(out).equals(fs.readFileSync(exported)), '`rbd export` differs from `vdisk convert`');
    const cmp = vdisk(['compare', '-f', 'raw', '-F', 'raw', local, `rbd:rbd/${name}`], { env: c.env });
    assert.equal(cmp.status, 0, `vdisk compare: ${cmp.stdout}${cmp.stderr}`);
  });

  test('rbd snapshots: `rbd snap create` is seen by vdisk, `vdisk snapshot -c` by rbd', async (t) => {
    if (!ready(t)) return;
    const name = c.name();
    const img = `rbd:rbd/${name}`;
    vd(['create', '-f', 'raw', img, '8M']);
    vd(['io', '-c', 'write -P 0x01 0 1M', img]);
    c.rbd('snap', 'create', `rbd/${name}@theirs`);
    vd(['io', '-c', 'write -P 0x02 0 1M', img]);
    vd(['snapshot', '-c', 'ours', img]);
    vd(['io', '-c', 'write -P 0x03 0 1M', img]);

    const listed = c.rbd('snap', 'ls', '--format=json', `rbd/${name}`);
    assert.deepEqual((JSON.parse(listed) as Array<{ name: string }>).map((s) => s.name), ['theirs', 'ours']);
    assert.equal(vd(['snapshot', '-l', img]), peer('qemu-img', ['snapshot', '-l', img]), 'snapshot -l as qemu-img prints it');
    const info = JSON.parse(vd(['info', '--output=json', img])) as { snapshots: Array<{ name: string }> };
    assert.deepEqual(info.snapshots.map((s) => s.name), ['theirs', 'ours']);

    // Opened at a snapshot: read-only, and the snapshot's data.
    vd(['io', '-r', '-c', 'read -P 0x01 0 1M', `${img}@theirs`]);
    vd(['io', '-r', '-c', 'read -P 0x02 0 1M', `${img}@ours`]);
    peer('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x02 0 1M', `${img}@ours`]);
    const w = vdisk(['io', '-c', 'write 0 4k', `${img}@ours`], { env: c.env });
    assert.equal(w.status, 1);
    assert.match(w.stderr, /^vdisk: Could not open '.*@ours': rbd snapshots are read-only\n$/);

    vd(['snapshot', '-a', 'theirs', img]);
    peer('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x01 0 1M', img]);
    vd(['snapshot', '-d', 'theirs', img]);
    peer('qemu-img', ['snapshot', '-d', 'ours', img]);
    assert.equal(c.rbd('snap', 'ls', `rbd/${name}`).trim(), '');
  });

  test('vdisk map equals qemu-img map (object map, fast-diff)', async (t) => {
    if (!ready(t)) return;
    const name = c.name();
    const img = `rbd:rbd/${name}`;
    c.rbd('create', '--size', '64M', `rbd/${name}`); // default features: object-map, fast-diff
    peer('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 64k', '-c', 'write -P 2 9M 1M', '-c', 'write -P 3 20M 8M',
      '-c', 'discard 20M 4M', '-c', 'write -z -u 28M 4M', '-c', 'write -P 4 63M 1M', img]);
    const theirs = peer('qemu-img', ['map', '--output=json', '-f', 'raw', img]);
    const ours = vd(['map', '--output=json', '-f', 'raw', img]);
    assert.equal(ours, theirs);
    assert.match(ours, /"zero": true/, 'the map has holes');
    // Human output: the same runs; qemu-img names the file as json:{...}, vdisk as given.
    const strip = (text: string) => text.replace(/(json:\{.*\}|rbd:\S+)$/gm, '');
    assert.equal(strip(vd(['map', '-f', 'raw', img])), strip(peer('qemu-img', ['map', '-f', 'raw', img])));
    // A range inside the image, starting inside an object.
    const part = ['--start-offset', '5000000', '--max-length', '20M'];
    assert.equal(vd(['map', '--output=json', ...part, img]), peer('qemu-img', ['map', '--output=json', '-f', 'raw', ...part, img]));
  });

  test('without fast-diff, and in clones, vdisk still finds holes (qemu-img reports all data there)', async (t) => {
    if (!ready(t)) return;
    const name = c.name();
    c.rbd('create', '--size', '32M', '--image-feature', 'layering', `rbd/${name}`);
    vd(['io', '-c', 'write -P 7 8M 4k', `rbd:rbd/${name}`]);
    const map = JSON.parse(vd(['map', '--output=json', `rbd:rbd/${name}`])) as Array<{ start: number; length: number; data: boolean }>;
    assert.deepEqual(map.map((m) => [m.start, m.length, m.data]), [[0, 8 * MiB, false], [8 * MiB, 4 * MiB, true], [12 * MiB, 20 * MiB, false]]);
    assert.match(vd(['info', `rbd:rbd/${name}`]), /block status from rbd_diff_iterate2, object by object/);

    // A clone: the parent's data counts as data (and reads through), its own writes too.
    const parent = c.name('parent');
    const child = c.name('clone');
    c.rbd('create', '--size', '32M', `rbd/${parent}`);
    vd(['io', '-c', 'write -P 9 4M 64k', `rbd:rbd/${parent}`]);
    c.rbd('snap', 'create', `rbd/${parent}@base`);
    c.rbd('snap', 'protect', `rbd/${parent}@base`);
    c.rbd('clone', `rbd/${parent}@base`, `rbd/${child}`);
    vd(['io', '-c', 'write -P 8 20M 64k', `rbd:rbd/${child}`]);
    const cmap = JSON.parse(vd(['map', '--output=json', `rbd:rbd/${child}`])) as Array<{ start: number; length: number; data: boolean }>;
    assert.deepEqual(cmap.filter((m) => m.data).map((m) => [m.start, m.length]), [[4 * MiB, 4 * MiB], [20 * MiB, 4 * MiB]]);
    vd(['io', '-r', '-c', 'read -P 9 4M 64k', '-c', 'read -P 8 20M 64k', '-c', 'read -P 0 0 4M', `rbd:rbd/${child}`]);
    assert.match(vd(['info', `rbd:rbd/${child}`]), /a clone/);
  });

  test('resize and info agree with rbd and qemu-img', async (t) => {
    if (!ready(t)) return;
    const name = c.name();
    const img = `rbd:rbd/${name}`;
    vd(['create', '-f', 'raw', '-o', 'cluster_size=1M', img, '16M']);
    assert.equal((JSON.parse(c.rbd('info', '--format=json', `rbd/${name}`)) as { object_size: number }).object_size, MiB);
    vd(['resize', img, '+8M']);
    assert.equal((JSON.parse(c.rbd('info', '--format=json', `rbd/${name}`)) as { size: number }).size, 24 * MiB);
    const theirs = JSON.parse(peer('qemu-img', ['info', '--output=json', img])) as Record<string, unknown>;
    const ours = JSON.parse(vd(['info', '--output=json', img])) as Record<string, unknown>;
    for (const k of ['virtual-size', 'cluster-size', 'format', 'dirty-flag']) assert.deepEqual(ours[k], theirs[k], k);
    const shrink = vdisk(['resize', img, '8M'], { env: c.env });
    assert.equal(shrink.status, 1);
    assert.match(shrink.stderr, /--shrink/);
    vd(['resize', '--shrink', img, '8M']);
    assert.equal((JSON.parse(peer('qemu-img', ['info', '--output=json', img])) as { 'virtual-size': number })['virtual-size'], 8 * MiB);
  });

  test('a qcow2 image on rbd passes qemu-img check', async (t) => {
    if (!ready(t)) return;
    const img = `rbd:rbd/${c.name('qcow2')}`;
    vd(['create', '-f', 'qcow2', img, '32M']);
    vd(['io', '-f', 'qcow2', '-c', 'write -P 0x6b 1M 3M', '-c', 'write -P 0x6c 30M 100k', img]);
    assert.match(peer('qemu-img', ['check', '-f', 'qcow2', img]), /No errors were found/);
    assert.match(vd(['check', img]), /No errors were found/);
    peer('qemu-img', ['snapshot', '-c', 'internal', img]); // qcow2's own snapshots, not rbd's
    assert.equal(vd(['snapshot', '-l', img]), peer('qemu-img', ['snapshot', '-l', img]));
    assert.match(vd(['snapshot', '-l', img]), /internal/);
    peer('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x6b 1M 3M', '-c', 'read -P 0x6c 30M 100k', '-c', 'read -P 0 0 1M', img]);
  });

  test('namespaces: rbd:POOL/NAMESPACE/IMAGE', async (t) => {
    if (!ready(t)) return;
    const ns = c.name('ns');
    c.rbd('namespace', 'create', '--pool', 'rbd', '--namespace', ns);
    const img = `rbd:rbd/${ns}/disk`;
    peer('qemu-img', ['create', '-f', 'raw', img, '4M']);
    vd(['io', '-c', 'write -P 0x4e 4k 8k', img]);
    peer('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x4e 4k 8k', img]);
    assert.match(c.rbd('ls', '--pool', 'rbd', '--namespace', ns), /^disk$/m);
    const missing = vdisk(['info', 'rbd:rbd/no-such-namespace/disk'], { env: c.env });
    assert.equal(missing.status, 1);
    assert.equal(missing.stderr, "vdisk: Could not open 'rbd:rbd/no-such-namespace/disk': namespace 'no-such-namespace' does not exist: No such file or directory\n");
  });

  test('blockdev options: monitors from server.N, the key from key-secret, no ceph.conf', async (t) => {
    if (!ready(t, false)) return;
    const name = c.name();
    vd(['create', '-f', 'raw', `rbd:rbd/${name}`, '4M']);
    vd(['io', '-c', 'write -P 0x42 0 64k', `rbd:rbd/${name}`]);
    const conf = fs.readFileSync(c.conf, 'utf8');
    const v1 = /v1:127\.0\.0\.1:(\d+)/.exec(conf)![1];
    const keyring = fs.readFileSync(/keyring = (.*)/.exec(conf.slice(conf.indexOf('[client]')))![1].trim(), 'utf8');
    const key = /\[client\.admin\][^[]*?key = (\S+)/.exec(keyring)![1];
    const opts = rbdOptionsFromBlockdev({
      driver: 'rbd', pool: 'rbd', image: name, conf: '/dev/null', user: 'admin', 'key-secret': 'sec0',
      'server.0.host': '127.0.0.1', 'server.0.port': v1,
    });
    const node = await openRbd(opts, { readOnly: true, direct: false, noFlush: false, resolveSecret: (id) => (id === 'sec0' ? key : '') });
    try {
      const buf = Buffer.alloc(64 << 10);
      await node.pread(0, buf);
      assert.ok(buf.every((b) => b === 0x42));
    } finally {
      await node.close();
    }
  });

  test('cache mapping: cache.direct=on sets rbd_cache=false, otherwise true, over ceph.conf; info shows it', async (t) => {
    if (!ready(t, false)) return;
    const name = c.name();
    const img = `rbd:rbd/${name}`;
    vd(['create', '-f', 'raw', img, '4M']);
    // A ceph.conf that turns the cache off: the cache mode still wins.
    const conf = path.join(dir, 'nocache.conf');
    fs.writeFileSync(conf, `${fs.readFileSync(c.conf, 'utf8')}\nrbd cache = false\n`); // the file ends in [client]
    const notes = async (mode: keyof typeof CACHE_MODES, file: string) => {
      const node = await openImage(file, { cache: CACHE_MODES[mode], readOnly: mode === 'writeback' });
      try {
        return ((await node.file!.driver.info!()).notes ?? []).join('\n');
      } finally {
        await node.close();
      }
    };
    for (const mode of Object.keys(CACHE_MODES) as Array<keyof typeof CACHE_MODES>) {
      const expected = CACHE_MODES[mode].direct ? 'false' : 'true';
      assert.match(await notes(mode, `${img}:conf=${c.conf}`), new RegExp(`librbd cache in effect: rbd_cache=${expected},`), mode);
      assert.match(await notes(mode, `${img}:conf=${conf}`), new RegExp(`rbd_cache=${expected},`), `${mode} with rbd cache = false in ceph.conf`);
    }
    assert.match(vd(['info', img]), /librbd cache in effect: rbd_cache=true, rbd_cache_policy=\w+, rbd_cache_size=\d+/);
    // A per-image override is librbd's to apply; info says where the value came from.
    c.rbd('config', 'image', 'set', `rbd/${name}`, 'rbd_cache_policy', 'writeback');
    assert.match(vd(['info', img]), /rbd_cache_policy=writeback \(image override\)/);
  });

  test('bench, map, compare and a failed open all take rbd names', async (t) => {
    if (!ready(t, false)) return;
    const img = `rbd:rbd/${c.name()}`;
    vd(['create', '-f', 'raw', img, '8M']);
    assert.match(vd(['bench', '-w', '-c', '200', '-d', '8', '-s', '4k', img]), /Sending 200 write requests[^]*ops\/s/);
    assert.match(vd(['bench', '-c', '200', '-d', '8', '-s', '4k', '-t', 'none', img]), /Sending 200 read requests[^]*ops\/s/);
    const missing = vdisk(['info', 'rbd:rbd/does-not-exist'], { env: c.env });
    assert.equal(missing.status, 1);
    assert.equal(missing.stderr, "vdisk: Could not open 'rbd:rbd/does-not-exist': error reading header from does-not-exist: No such file or directory\n");
  });
});
