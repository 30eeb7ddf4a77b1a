// Faults on a cluster of this file's own (bluestore, so the OSD keeps its data across a
// restart; watch timeout 600 s, so librbd alone would wait that long for a dead lock owner):
//  - a missing pool, image, snapshot or namespace, a wrong key or user, an unreachable
//    monitor, no ceph.conf: one line on stderr, exit 1, in bounded time;
//  - the OSD killed and restarted under load: every write completes or fails with EIO,
//    none is lost silently, and everything acknowledged is there afterwards;
//  - a writer killed with its exclusive lock held: the next writer breaks the lock at open
//    instead of waiting for the watch to time out; a live owner is left alone.
import { after, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import net from 'node:net';
import { removeDir, run, tempDir, vdisk, VDISK_BIN } from './helpers.js';
import { CEPH_SCRIPT, needCeph, needQemuRbd, startCluster, type Cluster } from './rbd-cluster.js';
import { openImage } from '../src/block/graph.js';
import { BlockBackend } from '../src/block/backend.js';
import { CACHE_MODES } from '../src/block/cache-mode.js';
import { VdiskError } from '../src/block/errors.js';

const execFileAsync = promisify(execFile);
const MiB = 1 << 20;
let c: Cluster | null = null;
const dir = tempDir('vdisk-rbd-faults-');

function cluster(t: TestContext): Cluster | null {
  if (!needCeph(t)) return null;
  c ??= startCluster({ backend: 'bluestore', watchTimeout: 600 });
  return c;
}

after(() => {
  c?.stop();
  removeDir(dir);
});

async function closedPort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

describe('rbd faults', () => {
  test('bad names, keys and monitors: one line, exit 1, bounded time', async (t) => {
    const cl = cluster(t);
    if (!cl) return;
    const img = cl.name();
    cl.rbd('create', '--size', '4M', `rbd/${img}`);
    const key = run('ceph-authtool', ['--gen-print-key']).stdout.trim();
    const port = await closedPort();
    const cases: Array<[string, RegExp, NodeJS.ProcessEnv?]> = [
      ['rbd:nopool/x', /^vdisk: Could not open 'rbd:nopool\/x': error opening pool nopool: No such file or directory$/],
      ['rbd:rbd/nope', /^vdisk: Could not open 'rbd:rbd\/nope': error reading header from nope: No such file or directory$/],
      [`rbd:rbd/${img}@nosnap`, /error reading header from .*: No such file or directory \(no image '.*', or it has no snapshot 'nosnap'\)$/],
      [`rbd:rbd/${img}:key=${key}`, /: error connecting: Permission denied \(cephx refused user 'admin': check its key or keyring\)$/],
      [`rbd:rbd/${img}:id=nobody`, /: error connecting: Permission denied \(cephx refused user 'nobody'/],
      [`rbd:rbd/${img}:no_such_option=1`, /: invalid conf option no_such_option: /],
      [`rbd:rbd/${img}:conf=/nonexistent.conf`, /: error reading conf file \/nonexistent.conf: No such file or directory$/],
      [`rbd:rbd/${img}:mon_host=127.0.0.1\\:${port}`,
        /: error connecting: Connection timed out \(no monitor answered within client_mount_timeout; vdisk's default is 20 s\)$/],
      ['rbd:rbd/x', /: no Ceph configuration found \(set CEPH_CONF, or give conf=FILE or mon_host=ADDR\)/,
        { ...process.env, CEPH_CONF: '', HOME: dir }],
      ['rbd:rbd', /^vdisk: Could not open 'rbd:rbd': Pool name is required$/],
      ['rbd:rbd/x:conf', /^vdisk: Could not open 'rbd:rbd\/x:conf': conf option conf has no value$/],
    ];
    for (const [name, expected, env] of cases) {
      const r = vdisk(['info', name], { env: env ?? cl.env, timeout: 120_000 });
      assert.equal(r.status, 1, `${name}: exit status`);
      assert.equal(r.stdout, '', `${name}: nothing on stdout`);
      assert.equal(r.stderr.split('\n').length, 2, `${name}: exactly one line: ${r.stderr}`);
      assert.match(r.stderr.trim(), expected, name);
    }
  });

  test('OSD killed and restarted under load: writes complete or fail with EIO; acknowledged data survives', async (t) => {
    const cl = cluster(t);
    if (!cl) return;
    for (const mode of ['writeback', 'directsync'] as const) {
      const name = cl.name(mode);
      cl.rbd('create', '--size', '32M', `rbd/${name}`);
      const file = `rbd:rbd/${name}:conf=${cl.conf}`;
      const cache = CACHE_MODES[mode];
      const blk = new BlockBackend(await openImage(file, { format: 'raw', cache }), cache);
      const BLOCK = 64 << 10;
      const COUNT = (32 * MiB) / BLOCK;
      const outcome: Array<'ok' | 'eio' | undefined> = new Array(COUNT);
      const pattern = (i: number) => Buffer.alloc(BLOCK, (i % 251) + 1);
      let next = 0;
      let restartedAt = Infinity;
      let restart: Promise<unknown> | null = null;
      let settledAfterRestart = 0;
      const worker = async () => {
        while (next < COUNT) {
          const i = next++;
          try {
            await blk.pwrite(i * BLOCK, pattern(i));
            outcome[i] = 'ok';
          } catch (err) {
            assert.ok(err instanceof VdiskError && err.code === 'EIO', `write ${i} failed with ${String(err)}`);
            outcome[i] = 'eio';
          }
          if (Date.now() > restartedAt) settledAfterRestart++;
          if (i === 64) {
            await blk.flush(); // the first writes are flushed before the OSD dies
            // The other workers keep writing while the OSD is down.
            await execFileAsync(CEPH_SCRIPT, ['kill-osd', cl.dir], { timeout: 60_000 });
            restart = new Promise((r) => setTimeout(r, 3000)).then(() => {
              restartedAt = Date.now();
              return execFileAsync(CEPH_SCRIPT, ['start-osd', cl.dir], { env: { ...process.env, CEPH_OSD_BACKEND: 'bluestore' }, timeout: 120_000 });
            });
          }
        }
      };
      await Promise.all(Array.from({ length: 8 }, worker));
      assert.ok(restart, 'the OSD was killed during the run');
      await restart;
      assert.ok(settledAfterRestart > 0, 'writes were waiting while the OSD was down');
      await blk.flush();
      await blk.close();
      assert.equal(outcome.filter((o) => o === undefined).length, 0, 'every write settled');
      // Read back through a new connection: the OSD's store, not librbd's cache.
      const check = await openImage(file, { format: 'raw', readOnly: true, cache: CACHE_MODES.none });
      try {
        const buf = Buffer.alloc(BLOCK);
        for (let i = 0; i < COUNT; i++) {
          if (outcome[i] !== 'ok') continue;
          await check.pread(i * BLOCK, buf);
          assert.ok(buf.equals(pattern(i)), `${mode}: acknowledged write ${i} is not on the cluster`);
        }
      } finally {
        await check.close();
      }
      const status = run(CEPH_SCRIPT, ['status', cl.dir], { timeout: 120_000 });
      assert.equal(status.status, 0, `the cluster is up again: ${status.stderr}`);
    }
  });

  test("a dead writer's exclusive lock is broken at open; a live one is left alone", async (t) => {
    if (!needQemuRbd(t)) return;
    const cl = cluster(t);
    if (!cl) return;
    const name = cl.name('lock');
    cl.rbd('create', '--size', '8M', `rbd/${name}`); // default features include exclusive-lock
    const img = `rbd:rbd/${name}`;

    // An interactive `vdisk io` that writes (taking the lock) and then waits for more input.
    const holder = () => {
      const p = spawn(process.execPath, [VDISK_BIN, 'io', img], { env: cl.env, stdio: ['pipe', 'pipe', 'pipe'] });
      let out = '';
      p.stdout.setEncoding('utf8').on('data', (s: string) => { out += s; });
      p.stderr.setEncoding('utf8').on('data', (s: string) => { out += s; });
      const waitFor = async (re: RegExp) => {
        for (let i = 0; i < 1200 && !re.test(out); i++) await new Promise((r) => setTimeout(r, 100));
        assert.match(out, re);
      };
      return { p, waitFor, output: () => out };
    };

    const dead = holder();
    dead.p.stdin.write('write -P 0x01 0 4k\n');
    await dead.waitFor(/wrote 4096\/4096 bytes at offset 0/);
    const watchers = JSON.parse(cl.rbd('status', '--format=json', `rbd/${name}`)) as { watchers: Array<{ address: string }> };
    assert.equal(watchers.watchers.length, 1);
    const deadAddress = watchers.watchers[0].address;
    dead.p.kill('SIGKILL');
    await new Promise((r) => dead.p.once('exit', r));
    // librbd alone would wait out the 600 s watch timeout; the spawn limit is far below it.
    const next = vdisk(['io', '-c', 'write -P 0x02 0 4k', img], { env: cl.env, timeout: 180_000 });
    assert.equal(next.status, 0, `write after the owner died: ${next.stderr}`);
    const blocklist = run('ceph', ['--conf', cl.conf, 'osd', 'blocklist', 'ls'], { timeout: 60_000 });
    assert.ok(blocklist.stdout.includes(deadAddress), `the dead owner ${deadAddress} is blocklisted: ${blocklist.stdout}`);

    const live = holder();
    try {
      live.p.stdin.write('write -P 0x03 0 4k\n');
      await live.waitFor(/wrote 4096\/4096 bytes at offset 0/);
      const other = vdisk(['io', '-c', 'write -P 0x04 8k 4k', img], { env: cl.env, timeout: 180_000 });
      assert.equal(other.status, 0, `a second writer next to a live one: ${other.stderr}`);
      live.p.stdin.write('write -P 0x05 16k 4k\n');
      await live.waitFor(/wrote 4096\/4096 bytes at offset 16384/); // still allowed to write: not blocklisted
      live.p.stdin.end('quit\n');
      await new Promise((r) => live.p.once('exit', r));
      assert.equal(live.p.exitCode, 0, live.output());
    } finally {
      live.p.kill('SIGKILL');
    }
    const r = run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x03 0 4k', '-c', 'read -P 0x04 8k 4k', '-c', 'read -P 0x05 16k 4k', img],
      { env: cl.env, timeout: 120_000 });
    assert.equal(r.status, 0, r.stdout + r.stderr);
  });
});
