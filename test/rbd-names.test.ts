// rbd names without a cluster: QEMU's rbd: filename rules (escapes, namespace, snapshot,
// id/conf/other pairs), blockdev options (flat and nested), and what happens where librbd
// is missing: the build still succeeds and the driver says so in one line.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { hasProgram, removeDir, REPO_ROOT, run, tempDir, vdisk } from './helpers.js';
import { monHostString, parseRbdFilename, rbdDisplayName, rbdOptionsFromBlockdev } from '../src/protocols/rbd-options.js';

describe('rbd: filenames (QEMU qemu_rbd_parse_filename)', () => {
  test('pool, image, namespace, snapshot', () => {
    assert.deepEqual(parseRbdFilename('rbd:rbd/disk'), { pool: 'rbd', namespace: '', image: 'disk', keyvaluePairs: [] });
    assert.deepEqual(parseRbdFilename('rbd:p/ns/disk@snap1'),
      { pool: 'p', namespace: 'ns', image: 'disk', snapshot: 'snap1', keyvaluePairs: [] });
    // Only the first '/' after the namespace splits: the rest is the image name.
    assert.equal(parseRbdFilename('rbd:p/ns/a/b').image, 'a/b');
  });

  test('id and conf are ours; other pairs go to rados_conf_set in order', () => {
    const o = parseRbdFilename('rbd:rbd/disk@s:id=libvirt:conf=/etc/ceph/x.conf:rbd_cache_size=1048576:mon_host=10.0.0.1');
    assert.equal(o.user, 'libvirt');
    assert.equal(o.conf, '/etc/ceph/x.conf');
    assert.equal(o.snapshot, 's');
    assert.deepEqual(o.keyvaluePairs, [['rbd_cache_size', '1048576'], ['mon_host', '10.0.0.1']]);
  });

  test('backslash escapes :, @, / and = inside every part', () => {
    const o = parseRbdFilename('rbd:po\\/ol/na\\:me\\@x@sn\\:ap:mon_host=[\\:\\:1]\\:6789:k\\=ey=v\\:al');
    assert.equal(o.pool, 'po/ol');
    assert.equal(o.image, 'na:me@x');
    assert.equal(o.snapshot, 'sn:ap');
    assert.deepEqual(o.keyvaluePairs, [['mon_host', '[::1]:6789'], ['k=ey', 'v:al']]);
  });

  test("errors in QEMU's words", () => {
    assert.throws(() => parseRbdFilename('file:x'), /File name must start with 'rbd:'/);
    assert.throws(() => parseRbdFilename('rbd:pool'), /rbd:pool: Pool name is required/);
    assert.throws(() => parseRbdFilename('rbd:/img'), /Pool name is required/);
    assert.throws(() => parseRbdFilename('rbd:pool/'), /Image name is required/);
    assert.throws(() => parseRbdFilename('rbd:p/i:conf'), /conf option conf has no value/);
    assert.throws(() => parseRbdFilename('rbd:p/i:a=1:b'), /conf option b has no value/);
  });

  test('display names escape what the parser unescapes', () => {
    for (const name of ['rbd:rbd/disk', 'rbd:p/ns/disk@snap', 'rbd:po\\/ol/na\\:me\\@x@sn\\:ap']) {
      const o = parseRbdFilename(name);
      assert.equal(rbdDisplayName(o), name);
      assert.deepEqual(parseRbdFilename(rbdDisplayName(o)), o);
    }
  });
});

describe('rbd blockdev options (QEMU BlockdevOptionsRbd)', () => {
  test('flat --blockdev keys with server.N and auth-client-required.N', () => {
    const o = rbdOptionsFromBlockdev({
      driver: 'rbd', 'node-name': 'disk0', pool: 'rbd', namespace: 'ns', image: 'img', snapshot: 's', conf: '/dev/null',
      user: 'libvirt', 'key-secret': 'sec0', 'server.0.host': '10.0.0.1', 'server.0.port': '6789', 'server.1.host': 'fd00::2',
      'server.1.port': '3300', 'auth-client-required.0': 'cephx', 'cache.direct': 'on',
    });
    assert.deepEqual(o, {
      pool: 'rbd', namespace: 'ns', image: 'img', snapshot: 's', conf: '/dev/null', user: 'libvirt', keySecret: 'sec0',
      server: [{ host: '10.0.0.1', port: '6789' }, { host: 'fd00::2', port: '3300' }], authClientRequired: ['cephx'],
      keyvaluePairs: [],
    });
    assert.equal(monHostString(o.server!), '10.0.0.1:6789;[fd00::2]:3300');
  });

  test('nested QMP JSON', () => {
    const o = rbdOptionsFromBlockdev({ driver: 'rbd', pool: 'p', image: 'i', server: [{ host: 'h', port: 6789 }], 'auth-client-required': ['none'] });
    assert.deepEqual(o.server, [{ host: 'h', port: '6789' }]);
    assert.deepEqual(o.authClientRequired, ['none']);
  });

  test('missing and unknown parameters', () => {
    assert.throws(() => rbdOptionsFromBlockdev({ driver: 'rbd', image: 'i' }), /Parameter 'pool' is missing/);
    assert.throws(() => rbdOptionsFromBlockdev({ driver: 'rbd', pool: 'p' }), /Parameter 'image' is missing/);
    assert.throws(() => rbdOptionsFromBlockdev({ driver: 'rbd', pool: 'p', image: 'i', bogus: 1 }), /Parameter 'bogus' is unexpected/);
    assert.throws(() => rbdOptionsFromBlockdev({ driver: 'rbd', pool: 'p', image: 'i', 'server.0.host': 'h' }), /server.0.port' is missing/);
    assert.throws(() => rbdOptionsFromBlockdev({ driver: 'rbd', pool: 'p', image: 'i', 'auth-client-required.0': 'krb' }), /not cephx or none/);
    assert.throws(() => rbdOptionsFromBlockdev({ driver: 'rbd', pool: 'p', image: 'i', encrypt: {} }), /encryption/);
  });
});

describe('without librbd', () => {
  test('the rbd driver reports one line naming the package', () => {
    const env = { ...process.env, VDISK_RBD_ADDON: '/nonexistent/vdisk_rbd.node' };
    for (const args of [['info', 'rbd:rbd/disk'], ['create', '-f', 'raw', 'rbd:rbd/disk', '1M']]) {
      const r = vdisk(args, { env });
      assert.equal(r.status, 1, args.join(' '));
      assert.match(r.stderr, /^vdisk: rbd:rbd\/disk: the rbd driver is not available: vdisk was built without librbd \(apt-get install librbd-dev, then npm install\)\n$/);
    }
    // Everything else still works.
    const dir = tempDir();
    try {
      const r = vdisk(['create', '-f', 'raw', path.join(dir, 'x.raw'), '1M'], { env });
      assert.equal(r.status, 0, r.stderr);
    } finally {
      removeDir(dir);
    }
  });

  test('the build succeeds without librbd headers and leaves the rbd addon out', (t) => {
    if (!hasProgram('cc') || !hasProgram('make')) {
      t.skip('no C toolchain');
      return;
    }
    const dir = tempDir();
    try {
      for (const p of ['binding.gyp', 'native', 'scripts']) fs.cpSync(path.join(REPO_ROOT, p), path.join(dir, p), { recursive: true });
      const r = run(process.execPath, ['scripts/build-native.js'], { cwd: dir, env: { ...process.env, VDISK_NO_RBD: '1' }, timeout: 300_000 });
      assert.equal(r.status, 0, r.stderr);
      assert.ok(fs.existsSync(path.join(dir, 'build', 'Release', 'vdisk_native.node')), 'the main addon is built');
      assert.ok(!fs.existsSync(path.join(dir, 'build', 'Release', 'vdisk_rbd.node')), 'no rbd addon');
      assert.match(r.stderr, /rbd addon not built \(VDISK_NO_RBD=1\); the rbd: driver is unavailable/);
    } finally {
      removeDir(dir);
    }
  });
});
