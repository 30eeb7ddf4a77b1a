// `vdisk serve --tls-creds DIR` / `--tls-psk FILE` against libnbd (nbdinfo, nbdcopy) and
// QEMU's NBD client (qemu-img with a tls-creds-x509 object). Certificates are made in the
// test with openssl; DIR is laid out like QEMU's tls-creds-x509.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { hasProgram, needPeers, removeDir, tempDir } from './helpers.js';
import {
  freePort, makeImage, makePki, makePskFile, nbdUri, nbdinfoJson, patternBytes, peerOk, runPeer,
  startVdisk, stopAll, type Daemon, type Endpoint, type Pki,
} from './nbd-helpers.js';

const MiB = 1 << 20;
const SIZE = 6 * MiB;
const dirs: string[] = [];
after(async () => {
  await stopAll();
  for (const d of dirs) removeDir(d);
});

function newDir(): string {
  const d = tempDir('vdisk-nbd-tls-');
  dirs.push(d);
  return d;
}

const certQuery = (dir: string): string => `tls-certificates=${encodeURIComponent(dir)}`;

describe('X.509 certificates', () => {
  let dir: string;
  let pki: Pki;
  let img: string;
  let src: string;
  let data: Buffer;
  const servers: Record<'tcp' | 'unix', Daemon | undefined> = { tcp: undefined, unix: undefined };

  before(async () => {
    if (!hasProgram('openssl')) return;
    dir = newDir();
    pki = await makePki(dir);
    img = path.join(dir, 'disk.raw');
    makeImage(img, SIZE);
    src = path.join(dir, 'src.raw');
    data = patternBytes(SIZE, 5);
    data.fill(0, MiB, 2 * MiB);
    fs.writeFileSync(src, data);
    servers.tcp = await startVdisk(['-f', 'raw', '--tls-creds', pki.serverDir, img], { port: await freePort() });
    servers.unix = await startVdisk(['-f', 'raw', '--tls-creds', pki.serverDir, '-e', '4', img], { socket: path.join(dir, 'nbd.sock') });
  });
  after(async () => {
    await servers.tcp?.stop();
    await servers.unix?.stop();
  });

  function ready(t: TestContext, ...peers: string[]): boolean {
    return needPeers(t, 'openssl', ...peers);
  }

  test('nbdinfo over nbds:// and nbds+unix:// with tls-certificates', async (t) => {
    if (!ready(t, 'nbdinfo')) return;
    for (const kind of ['tcp', 'unix'] as const) {
      const info = await nbdinfoJson(nbdUri(servers[kind]!.endpoint, '', { tls: true, query: certQuery(pki.clientDir) }));
      assert.equal(info.TLS, true, `${kind}: nbdinfo reports TLS`);
      assert.equal(info['export-size'], SIZE, `${kind}: export-size`);
    }
  });

  test('nbdcopy into and out of the export over TLS', async (t) => {
    if (!ready(t, 'nbdcopy')) return;
    for (const kind of ['tcp', 'unix'] as const) {
      const uri = nbdUri(servers[kind]!.endpoint, '', { tls: true, query: certQuery(pki.clientDir) });
      fs.writeFileSync(img, Buffer.alloc(SIZE, 0xee));
      await peerOk('nbdcopy', [src, uri]);
      const out = path.join(dir, `out-${kind}.raw`);
      await peerOk('nbdcopy', [uri, out]);
      assert.ok(fs.readFileSync(out).equals(data), `${kind}: nbdcopy out over TLS returned other data`);
      assert.ok(fs.readFileSync(img).equals(data), `${kind}: image differs from what nbdcopy sent over TLS`);
    }
  });

  test('qemu-img with a tls-creds-x509 object', async (t) => {
    if (!ready(t, 'qemu-img')) return;
    const port = (servers.tcp!.endpoint as { port: number }).port;
    const obj = ['--object', `tls-creds-x509,id=tls0,dir=${pki.clientDir},endpoint=client`];
    const nbdOpts = `driver=nbd,host=127.0.0.1,port=${port},tls-creds=tls0`;
    fs.writeFileSync(img, Buffer.alloc(SIZE, 0xee));
    await peerOk('qemu-img', ['convert', '-n', ...obj, '-f', 'raw', src, '--target-image-opts', nbdOpts]);
    await peerOk('qemu-img', ['compare', ...obj, '--image-opts', `driver=raw,file.driver=file,file.filename=${src}`, `driver=raw,file.${nbdOpts.replaceAll(',', ',file.')}`]);
    const out = path.join(dir, 'out-qemu.raw');
    await peerOk('qemu-img', ['convert', ...obj, '--image-opts', nbdOpts, '-O', 'raw', out]);
    assert.ok(fs.readFileSync(out).equals(data), 'qemu-img convert out over TLS returned other data');
    const info = await runPeer('qemu-img', ['info', '--image-opts', `driver=nbd,host=127.0.0.1,port=${port}`]);
    assert.notEqual(info.status, 0, 'qemu-img without tls-creds must be refused');
  });

  test('a plaintext client is refused', async (t) => {
    if (!ready(t, 'nbdinfo')) return;
    for (const kind of ['tcp', 'unix'] as const) {
      const r = await runPeer('nbdinfo', ['--size', nbdUri(servers[kind]!.endpoint)]);
      assert.notEqual(r.status, 0, `${kind}: nbdinfo without TLS got: ${r.stdout}`);
      assert.doesNotMatch(r.stdout, new RegExp(`^${SIZE}$`, 'm'), `${kind}: export size leaked without TLS`);
    }
    // The refusal leaves the server serving TLS clients.
    const ok = await runPeer('nbdinfo', ['--size', nbdUri(servers.tcp!.endpoint, '', { tls: true, query: certQuery(pki.clientDir) })]);
    assert.equal(ok.status, 0, ok.stderr);
  });

  test('clients without a certificate from the CA are refused (QEMU\'s verify-peer default)', async (t) => {
    if (!ready(t, 'nbdinfo')) return;
    const ep = servers.tcp!.endpoint;
    const none = await runPeer('nbdinfo', ['--size', nbdUri(ep, '', { tls: true, query: certQuery(pki.caOnlyDir) })]);
    assert.notEqual(none.status, 0, 'a client with no certificate got in');
    const stranger = await runPeer('nbdinfo', ['--size', nbdUri(ep, '', { tls: true, query: certQuery(pki.strangerDir) })]);
    assert.notEqual(stranger.status, 0, 'a client certificate from another CA got in');
  });
});

describe('pre-shared keys', () => {
  test('nbdinfo and nbdcopy with tls-psk-file; wrong key and unknown user are refused', async (t) => {
    if (!needPeers(t, 'nbdinfo', 'nbdcopy')) return;
    const dir = newDir();
    const keys = path.join(dir, 'keys.psk');
    const key = crypto.randomBytes(32);
    makePskFile(keys, 'alice', key);
    const wrong = path.join(dir, 'wrong.psk');
    makePskFile(wrong, 'alice', crypto.randomBytes(32));
    const mallory = path.join(dir, 'mallory.psk');
    makePskFile(mallory, 'mallory', key);
    const img = path.join(dir, 'disk.raw');
    makeImage(img, SIZE);
    const src = path.join(dir, 'src.raw');
    const data = patternBytes(SIZE, 9);
    fs.writeFileSync(src, data);
    for (const ep of [{ port: await freePort() }, { socket: path.join(dir, 'nbd.sock') }] as Endpoint[]) {
      const server = await startVdisk(['-f', 'raw', '--tls-psk', keys, img], ep);
      try {
        const psk = (file: string, user: string): string =>
          nbdUri(ep, '', { tls: true, user, query: `tls-psk-file=${encodeURIComponent(file)}` });
        const info = await nbdinfoJson(psk(keys, 'alice'));
        assert.equal(info.TLS, true);
        assert.equal(info['export-size'], SIZE);
        await peerOk('nbdcopy', [src, psk(keys, 'alice')]);
        const out = path.join(dir, 'out.raw');
        await peerOk('nbdcopy', [psk(keys, 'alice'), out]);
        assert.ok(fs.readFileSync(out).equals(data), 'nbdcopy over PSK returned other data');
        const w = await runPeer('nbdinfo', ['--size', psk(wrong, 'alice')]);
        assert.notEqual(w.status, 0, 'a wrong key got in');
        const m = await runPeer('nbdinfo', ['--size', psk(mallory, 'mallory')]);
        assert.notEqual(m.status, 0, 'an unknown user got in');
        const plain = await runPeer('nbdinfo', ['--size', nbdUri(ep)]);
        assert.notEqual(plain.status, 0, 'a plaintext client got in to a PSK server');
      } finally {
        await server.stop();
      }
      assert.ok(fs.readFileSync(img).equals(data), 'image differs from what nbdcopy sent over PSK');
      fs.writeFileSync(img, Buffer.alloc(SIZE));
    }
  });
});
