// `vdisk serve` against the real NBD clients: nbdinfo, nbdcopy, qemu-img, qemu-io, fio's nbd
// engine, over TCP loopback and UNIX sockets; and against qemu-nbd's answers for the same file.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, test, type TestContext } from 'node:test';
import { needPeers, removeDir, tempDir } from './helpers.js';
import {
  CACHE_MODES, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EPERM, NBD_FLAG_READ_ONLY,
  NbdClient, freePort, makeImage, nbdUri, nbdinfoJson, patternBytes, peerOk, readRange, runPeer,
  startQemuNbd, startVdisk, stopAll, WRITEBACK_VISIBLE, type Daemon, type Endpoint,
} from './nbd-helpers.js';

const MiB = 1 << 20;
const dirs: string[] = [];
after(async () => {
  await stopAll();
  for (const d of dirs) removeDir(d);
});

function newDir(): string {
  const d = tempDir('vdisk-nbd-interop-');
  dirs.push(d);
  return d;
}

/** A UNIX socket and a TCP endpoint to run the same check over. */
async function transports(dir: string): Promise<[string, Endpoint][]> {
  return [['unix', { socket: path.join(dir, 'nbd.sock') }], ['tcp', { port: await freePort() }]];
}

async function withServer<T>(args: string[], ep: Endpoint, fn: (d: Daemon) => Promise<T>): Promise<T> {
  const d = await startVdisk(args, ep);
  try {
    return await fn(d);
  } finally {
    await d.stop();
  }
}

function assertAll(buf: Buffer, byte: number, what: string): void {
  const bad = buf.findIndex((b) => b !== byte);
  assert.equal(bad, -1, `${what}: byte ${bad} is 0x${buf[bad]?.toString(16)}, expected 0x${byte.toString(16)}`);
}

describe('nbdinfo', () => {
  for (const mode of CACHE_MODES) {
    test(`--json reports size, can_flush and can_fua for cache=${mode}`, async (t: TestContext) => {
      if (!needPeers(t, 'nbdinfo')) return;
      const dir = newDir();
      const img = path.join(dir, 'disk.raw');
      const size = 3 * MiB + 4096; // not a power of two: catches a rounded size
      makeImage(img, size);
      // Both spellings of the option, as qemu-nbd accepts them.
      const cacheArgs = mode === 'writethrough' ? ['-t', mode] : ['--cache', mode];
      for (const [kind, ep] of await transports(dir)) {
        await withServer(['-f', 'raw', ...cacheArgs, img], ep, async () => {
          const info = await nbdinfoJson(nbdUri(ep));
          assert.equal(info['export-size'], size, `${kind}: export-size`);
          assert.equal(info['export-name'], '', `${kind}: one file and no -x gives the empty export name`);
          assert.equal(info.protocol, 'newstyle-fixed', `${kind}: protocol`);
          assert.equal(info.is_read_only, false, `${kind}: is_read_only`);
          assert.equal(info.can_flush, WRITEBACK_VISIBLE[mode], `${kind}: can_flush for cache=${mode}`);
          assert.equal(info.can_fua, WRITEBACK_VISIBLE[mode], `${kind}: can_fua for cache=${mode}`);
        });
      }
    });
  }

  test('--map equals qemu-nbd\'s map of the same sparse file', async (t) => {
    if (!needPeers(t, 'nbdinfo', 'qemu-nbd')) return;
    const dir = newDir();
    const img = path.join(dir, 'sparse.raw');
    const size = 16 * MiB;
    makeImage(img, size);
    // Data at the start, in the middle, at the end; an allocated run of zeros (data to
    // QEMU's block status: allocated, not known to read as zero); holes in between.
    // 64 KiB granularity so file-system block size does not matter.
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, patternBytes(64 * 1024, 1), 0, 64 * 1024, 0);
    fs.writeSync(fd, patternBytes(192 * 1024, 2), 0, 192 * 1024, 3 * MiB);
    fs.writeSync(fd, Buffer.alloc(128 * 1024), 0, 128 * 1024, 7 * MiB);
    fs.writeSync(fd, patternBytes(64 * 1024, 3), 0, 64 * 1024, size - 64 * 1024);
    fs.fsyncSync(fd);
    fs.closeSync(fd);

    const qsock = path.join(dir, 'qemu.sock');
    const q = await startQemuNbd(img, { socket: qsock }, ['-e', '2', '-r']);
    let expected: string;
    try {
      expected = await peerOk('nbdinfo', ['--map', nbdUri({ socket: qsock })]);
    } finally {
      await q.stop();
    }
    assert.match(expected, /hole,zero/, 'qemu-nbd sees the holes (sanity check of the fixture)');
    for (const [kind, ep] of await transports(dir)) {
      await withServer(['-f', 'raw', '-r', img], ep, async () => {
        const got = await peerOk('nbdinfo', ['--map', nbdUri(ep)]);
        assert.equal(got, expected, `${kind}: nbdinfo --map differs from qemu-nbd's`);
      });
    }
  });
});

describe('nbdcopy', () => {
  test('copies into and out of the export over UNIX and TCP', async (t) => {
    if (!needPeers(t, 'nbdcopy')) return;
    const dir = newDir();
    const size = 8 * MiB;
    const src = path.join(dir, 'src.raw');
    const data = patternBytes(size, 11);
    data.fill(0, 2 * MiB, 3 * MiB); // a zero run: nbdcopy sends it as WRITE_ZEROES
    fs.writeFileSync(src, data);
    for (const [kind, ep] of await transports(dir)) {
      const img = path.join(dir, `disk-${kind}.raw`);
      makeImage(img, size, 0xee);
      await withServer(['-f', 'raw', img], ep, async () => {
        await peerOk('nbdcopy', [src, nbdUri(ep)]);
        const out = path.join(dir, `out-${kind}.raw`);
        await peerOk('nbdcopy', [nbdUri(ep), out]);
        assert.ok(fs.readFileSync(out).equals(data), `${kind}: nbdcopy out of the export returned other data`);
      });
      // After the server is gone, the file itself holds what was copied in.
      assert.ok(fs.readFileSync(img).equals(data), `${kind}: image differs from the copied-in file`);
    }
  });
});

describe('qemu-img', () => {
  test('convert into and out of the export, compare', async (t) => {
    if (!needPeers(t, 'qemu-img')) return;
    const dir = newDir();
    const size = 6 * MiB;
    const src = path.join(dir, 'src.raw');
    const data = patternBytes(size, 21);
    data.fill(0, 1 * MiB, 2 * MiB);
    fs.writeFileSync(src, data);
    const other = path.join(dir, 'other.raw');
    const otherData = Buffer.from(data);
    otherData[5 * MiB + 7] ^= 0xff;
    fs.writeFileSync(other, otherData);
    for (const [kind, ep] of await transports(dir)) {
      const img = path.join(dir, `disk-${kind}.raw`);
      makeImage(img, size);
      await withServer(['-f', 'raw', img], ep, async () => {
        const uri = nbdUri(ep);
        await peerOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri]);
        await peerOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri]);
        const diff = await runPeer('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', other, uri]);
        assert.equal(diff.status, 1, `${kind}: qemu-img compare must see the one changed byte: ${diff.stdout}${diff.stderr}`);
        const out = path.join(dir, `out-${kind}.raw`);
        await peerOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
        assert.ok(fs.readFileSync(out).equals(data), `${kind}: qemu-img convert out of the export returned other data`);
      });
      assert.ok(fs.readFileSync(img).equals(data), `${kind}: image differs from the converted-in file`);
    }
  });
});

describe('qemu-io', () => {
  // writeback over TCP; cache=none over UNIX, where O_DIRECT makes the unaligned write a
  // read-modify-write inside the server.
  for (const [kind, mode] of [['tcp', 'writeback'], ['unix', 'none']] as const) {
    test(`write, read, write -z, discard over ${kind} (cache=${mode}) land in the file`, async (t) => {
      if (!needPeers(t, 'qemu-io')) return;
      const dir = newDir();
      const img = path.join(dir, 'disk.raw');
      const size = 4 * MiB;
      makeImage(img, size, 0xa5);
      const ep: Endpoint = kind === 'unix' ? { socket: path.join(dir, 'nbd.sock') } : { port: await freePort() };
      await withServer(['-f', 'raw', '--cache', mode, img], ep, async () => {
        const r = await runPeer('qemu-io', ['-f', 'raw',
          '-c', 'write -P 0x5a 0 64k',
          '-c', 'read -P 0x5a 0 64k',
          '-c', 'write -z 64k 64k',
          '-c', 'read -P 0 64k 64k',
          '-c', 'discard 128k 64k',
          '-c', 'write -P 0x11 1000 3000',
          '-c', 'read -P 0x11 1000 3000',
          '-c', 'read -P 0xa5 256k 64k',
          '-c', 'flush',
          nbdUri(ep)], { timeoutMs: 60_000 });
        const out = r.stdout + r.stderr;
        assert.equal(r.status, 0, `qemu-io exited ${r.status}: ${out}`);
        assert.doesNotMatch(out, /fail|error|mismatch/i, out);
        assert.equal((out.match(/^read \d+\/\d+ bytes/gm) ?? []).length, 4, `four reads reported: ${out}`);
      });
      const file = fs.readFileSync(img);
      assertAll(file.subarray(0, 1000), 0x5a, 'write -P 0x5a 0 64k (before the unaligned write)');
      assertAll(file.subarray(1000, 4000), 0x11, 'write -P 0x11 1000 3000');
      assertAll(file.subarray(4000, 64 * 1024), 0x5a, 'write -P 0x5a 0 64k (after the unaligned write)');
      assertAll(file.subarray(64 * 1024, 128 * 1024), 0, 'write -z 64k 64k');
      const discarded = file.subarray(128 * 1024, 192 * 1024);
      // Discard is advisory: the range either reads as zeros or is untouched, never garbage.
      assert.ok(discarded.every((b) => b === 0) || discarded.every((b) => b === 0xa5), 'discard 128k 64k left mixed data');
      assertAll(file.subarray(192 * 1024), 0xa5, 'the rest of the image');
    });
  }
});

describe('fio nbd engine', () => {
  for (const kind of ['unix', 'tcp'] as const) {
    test(`randwrite with crc32c verify at iodepth 16 over ${kind}`, async (t) => {
      if (!needPeers(t, 'fio')) return;
      const dir = newDir();
      const img = path.join(dir, 'disk.raw');
      makeImage(img, 16 * MiB);
      const ep: Endpoint = kind === 'unix' ? { socket: path.join(dir, 'nbd.sock') } : { port: await freePort() };
      await withServer(['-f', 'raw', img], ep, async () => {
        const r = await runPeer('fio', ['--name=verify', '--ioengine=nbd', `--uri=${nbdUri(ep)}`,
          '--rw=randwrite', '--bs=4k', '--size=16m', '--verify=crc32c', '--verify_state_save=0', '--iodepth=16',
          '--randseed=42', '--output-format=json'], { timeoutMs: 90_000 });
        assert.equal(r.status, 0, `fio failed: ${r.stderr}${r.stdout.slice(0, 3000)}`);
        const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{')));
        const job = json.jobs[0];
        assert.equal(job.error, 0, 'fio job error');
        assert.equal(job.write.io_bytes, 16 * MiB, 'fio wrote the whole 16 MiB');
        assert.equal(job.read.io_bytes, 16 * MiB, 'fio read the whole 16 MiB back to verify');
      });
    });
  }
});

describe('exports', () => {
  test('-x a -x b serves two files under their names', async (t) => {
    if (!needPeers(t, 'nbdinfo', 'qemu-io')) return;
    const dir = newDir();
    const a = path.join(dir, 'a.raw');
    const b = path.join(dir, 'b.raw');
    makeImage(a, 2 * MiB);
    makeImage(b, 5 * MiB);
    const ep: Endpoint = { socket: path.join(dir, 'nbd.sock') };
    await withServer(['-f', 'raw', '-x', 'a', '-x', 'b', a, b], ep, async () => {
      const list = JSON.parse(await peerOk('nbdinfo', ['--list', '--json', nbdUri(ep)])) as { exports: Record<string, unknown>[] };
      const sizes = Object.fromEntries(list.exports.map((e) => [e['export-name'], e['export-size']]));
      assert.deepEqual(sizes, { a: 2 * MiB, b: 5 * MiB }, 'nbdinfo --list');
      await peerOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 4k', nbdUri(ep, 'a')]);
      await peerOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x62 0 4k', nbdUri(ep, 'b')]);
      const missing = await runPeer('nbdinfo', [nbdUri(ep, 'c')]);
      assert.notEqual(missing.status, 0, 'an unknown export name must be refused');
    });
    assertAll(readRange(a, 0, 4096), 0x61, 'export a');
    assertAll(readRange(b, 0, 4096), 0x62, 'export b');
  });

  test('-r: read-only export refuses WRITE, WRITE_ZEROES and TRIM with EPERM', async (t) => {
    if (!needPeers(t, 'nbdinfo', 'qemu-io')) return;
    const dir = newDir();
    const img = path.join(dir, 'ro.raw');
    makeImage(img, 2 * MiB, 0x33);
    const ep: Endpoint = { port: await freePort() };
    await withServer(['-f', 'raw', '-r', img], ep, async () => {
      const info = await nbdinfoJson(nbdUri(ep));
      assert.equal(info.is_read_only, true, 'nbdinfo is_read_only');
      await peerOk('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x33 0 64k', nbdUri(ep)]);
      const c = await NbdClient.connect(ep);
      try {
        const x = await c.handshake();
        assert.ok(x.flags & NBD_FLAG_READ_ONLY, 'NBD_FLAG_READ_ONLY');
        const w = await c.request(NBD_CMD_WRITE, { offset: 0, data: Buffer.alloc(4096, 0x44) });
        assert.equal(w.error, NBD_EPERM, 'WRITE on a read-only export');
        const z = await c.request(NBD_CMD_WRITE_ZEROES, { offset: 0, length: 4096 });
        assert.equal(z.error, NBD_EPERM, 'WRITE_ZEROES on a read-only export');
        const tr = await c.request(NBD_CMD_TRIM, { offset: 0, length: 4096 });
        assert.equal(tr.error, NBD_EPERM, 'TRIM on a read-only export');
        assertAll(await c.pread(0, 4096), 0x33, 'still readable on the same connection');
      } finally {
        await c.disconnect();
      }
    });
    assertAll(fs.readFileSync(img), 0x33, 'read-only image');
  });
});
