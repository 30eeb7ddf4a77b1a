// `vdisk serve rbd:POOL/IMAGE` as a guest sees it: fio's nbd engine writes with crc32c verify
// and reads everything back, in each of QEMU's five cache modes; then what qemu-io wrote over
// NBD is on the cluster once the server has shut down (qemu-io reads it through librbd).
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { needPeers, removeDir, run, tempDir } from './helpers.js';
import { nbdUri, runPeer, startVdisk, stopAll, type Endpoint } from './nbd-helpers.js';
import { needCeph, needQemuRbd, sharedCluster, stopSharedCluster } from './rbd-cluster.js';

const MiB = 1 << 20;
const dir = tempDir('vdisk-rbd-nbd-');

after(async () => {
  await stopAll();
  stopSharedCluster();
  removeDir(dir);
});

describe('vdisk serve rbd:', () => {
  for (const mode of ['writeback', 'none', 'writethrough', 'directsync', 'unsafe']) {
    test(`fio verify over NBD, cache=${mode}`, async (t) => {
      if (!needCeph(t) || !needQemuRbd(t) || !needPeers(t, 'fio')) return;
      const c = sharedCluster();
      const name = c.name(mode);
      c.rbd('create', '--size', '16M', `rbd/${name}`);
      const ep: Endpoint = { socket: path.join(dir, `${mode}.sock`) };
      const server = await startVdisk(['-f', 'raw', '-t', mode, `rbd:rbd/${name}`], ep, { env: c.env, timeoutMs: 60_000 });
      try {
        // Modes without a visible write cache advertise no flush, and libnbd refuses to send one.
        const fsync = mode === 'writethrough' || mode === 'directsync' ? [] : ['--fsync=32'];
        const r = await runPeer('fio', ['--name=verify', '--ioengine=nbd', `--uri=${nbdUri(ep)}`, '--rw=randwrite', '--bs=4k',
          '--size=16m', '--verify=crc32c', '--verify_state_save=0', '--iodepth=16', '--randseed=7', '--output-format=json',
          ...fsync], { timeoutMs: 300_000 });
        assert.equal(r.status, 0, `fio failed: ${r.stderr}${r.stdout.slice(0, 3000)}`);
        const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
        assert.equal(job.error, 0, 'fio job error');
        assert.equal(job.write.io_bytes, 16 * MiB, 'fio wrote the whole image');
        assert.equal(job.read.io_bytes, 16 * MiB, 'fio read the whole image back to verify');
        const w = await runPeer('qemu-io', ['-f', 'raw', '-c', 'write -P 0x7e 5M 300k', nbdUri(ep)], { timeoutMs: 60_000 });
        assert.equal(w.status, 0, w.stderr);
      } finally {
        await server.stop();
      }
      assert.equal(await server.exited.then((e) => e.code), 0, `vdisk serve: ${server.output()}`);
      const check = run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x7e 5M 300k', `rbd:rbd/${name}`], { env: c.env });
      assert.equal(check.status, 0, `after shutdown the data is on the cluster: ${check.stdout}${check.stderr}`);
    });
  }
});
