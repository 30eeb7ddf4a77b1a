// Clients that misbehave, one limit per test, each written as raw bytes on a socket. After
// each, the server must still serve a well-behaved client and the image must be untouched.
//
// Limits (from the server's promise and doc/proto.md): option data > 32 MiB and WRITE
// payloads > 32 MiB end the connection without being buffered; strings > 4096 bytes are
// rejected; unknown options get NBD_REP_ERR_UNSUP; out-of-range WRITE gets ENOSPC; other
// bad requests EINVAL; a TLS-only server answers NBD_REP_ERR_TLS_REQD before STARTTLS; a
// handshake has a deadline; idle connections cannot lock real clients out.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type net from 'node:net';
import { needPeers, removeDir, tempDir } from './helpers.js';
import {
  NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC,
  NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_OPT_EXPORT_NAME, NBD_OPT_GO,
  NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK,
  NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_UNSUP, NBD_REP_FLAG_ERROR, NbdClient, connectRaw, encodeOption,
  encodeRequest, fdCount, freePort, goPayload, makeImage, makePki, nbdUri, procStatus, runPeer,
  startVdisk, stopAll, u16, u32, waitFor, type Daemon, type Endpoint, type OptionReply,
} from './nbd-helpers.js';

const MiB = 1 << 20;
const FILL = 0xc3;
const SIZE = 4 * MiB;
/** Server memory may grow this much while a client pushes 48 MiB it must not buffer. */
const GROWTH_LIMIT_KIB = 24 * 1024;

const dirs: string[] = [];
after(async () => {
  await stopAll();
  for (const d of dirs) removeDir(d);
});

function newDir(): string {
  const d = tempDir('vdisk-nbd-hostile-');
  dirs.push(d);
  return d;
}

function isError(r: OptionReply): boolean {
  return (r.type & NBD_REP_FLAG_ERROR) !== 0;
}

/** The next option reply, or null when the server closes the connection instead. */
async function replyOrClose(c: NbdClient, ms = 10_000): Promise<OptionReply | null> {
  try {
    return await c.readOptionReply(ms);
  } catch (e) {
    if (c.closed) return null;
    throw e;
  }
}

/** A new connection past greeting and client flags. */
async function optionPhase(ep: Endpoint): Promise<NbdClient> {
  const c = await NbdClient.connect(ep);
  await c.greeting();
  c.sendClientFlags();
  return c;
}

/** A well-behaved client still gets in, reads the expected bytes, and leaves. */
async function assertServes(server: Daemon, img: string, expectByte = FILL): Promise<void> {
  assert.equal(server.hasExited(), false, `server died: ${server.output()}`);
  const c = await NbdClient.connect(server.endpoint);
  try {
    const info = await c.handshake();
    assert.equal(info.size, BigInt(fs.statSync(img).size), 'export size');
    const data = await c.pread(0, 4096);
    assert.ok(data.every((b) => b === expectByte), 'a well-behaved client reads the image');
  } finally {
    await c.disconnect();
  }
}

function assertImageUnchanged(img: string, byte = FILL, length?: number): void {
  const fd = fs.openSync(img, 'r');
  try {
    const b = Buffer.alloc(length ?? fs.fstatSync(fd).size);
    fs.readSync(fd, b, 0, b.length, 0);
    const bad = b.findIndex((x) => x !== byte);
    assert.equal(bad, -1, `image changed at byte ${bad}`);
  } finally {
    fs.closeSync(fd);
  }
}

/** Push `total` bytes in 1 MiB chunks without waiting for the peer to read them. */
function flood(sock: net.Socket, total: number, byte: number): void {
  const chunk = Buffer.alloc(MiB, byte);
  for (let sent = 0; sent < total && !sock.destroyed; sent += MiB) sock.write(chunk);
}

async function fdsBackTo(pid: number, baseline: number): Promise<void> {
  const ok = await waitFor(() => fdCount(pid) <= baseline, 10_000);
  assert.ok(ok, `server holds ${fdCount(pid)} fds, baseline ${baseline}`);
}

describe('hostile clients against one server', () => {
  let dir: string;
  let img: string;
  let server: Daemon;

  before(async () => {
    dir = newDir();
    img = path.join(dir, 'disk.raw');
    makeImage(img, SIZE, FILL);
    server = await startVdisk(['-f', 'raw', '--handshake-limit', '2', img], { port: await freePort() });
    await assertServes(server, img);
  });
  after(async () => server?.stop());

  test('handshake deadline: silent and half-finished handshakes are cut, finished ones are not', async () => {
    const silent = await NbdClient.connect(server.endpoint);
    const half = await NbdClient.connect(server.endpoint);
    await half.greeting();
    half.sendClientFlags();
    half.write(encodeOption(NBD_OPT_GO, goPayload('')).subarray(0, 10));
    const done = await NbdClient.connect(server.endpoint);
    await done.handshake();
    const [a, b] = await Promise.all([silent.waitClosed(15_000), half.waitClosed(15_000)]);
    assert.ok(a, 'a connection that never speaks is closed after --handshake-limit');
    assert.ok(b, 'a connection stuck in the middle of an option is closed after --handshake-limit');
    // The deadline is for the handshake only: a client idle in transmission stays.
    assert.equal(done.closed, false, 'a client in transmission phase must not be cut by the handshake deadline');
    assert.ok((await done.pread(0, 512)).every((x) => x === FILL));
    await done.disconnect();
    await assertServes(server, img);
  });

  test('strings longer than 4096 bytes are rejected', async (t: TestContext) => {
    for (const [opt, len] of [[NBD_OPT_GO, 4097], [NBD_OPT_GO, 1 * MiB], [NBD_OPT_INFO, 5000]] as const) {
      const c = await optionPhase(server.endpoint);
      c.sendOption(opt, goPayload('a'.repeat(len)));
      const r = await replyOrClose(c);
      if (r) {
        assert.ok(isError(r), `option ${opt} with a ${len}-byte name: reply 0x${r.type.toString(16)} is not an error`);
        // The option length was within limits: the server can skip it and keep talking.
        if (!c.closed) await c.go('');
      } else {
        t.diagnostic(`option ${opt} with a ${len}-byte name: server disconnected instead of replying`);
      }
      c.destroy();
    }
    await assertServes(server, img);
  });

  test('a name length that runs past the option data is invalid, and the stream stays in sync', async () => {
    const c = await optionPhase(server.endpoint);
    // Claims a 100-byte name but carries 10 bytes: a server trusting the inner length
    // would swallow the next option.
    c.sendOption(NBD_OPT_GO, Buffer.concat([u32(100), Buffer.from('xxxxxxxxxx'), u16(0)]));
    const r = await c.readOptionReply();
    assert.ok(isError(r), `reply 0x${r.type.toString(16)} is not an error`);
    const info = await c.go('');
    assert.equal(info.size, BigInt(SIZE));
    await c.disconnect();
    await assertServes(server, img);
  });

  test('unknown option gets NBD_REP_ERR_UNSUP and the handshake goes on', async () => {
    const c = await optionPhase(server.endpoint);
    c.sendOption(0x1234, Buffer.from('payload!'));
    const r = await c.readOptionReply();
    assert.equal(r.option, 0x1234, 'reply names the option');
    assert.equal(r.type, NBD_REP_ERR_UNSUP, `reply type 0x${r.type.toString(16)}`);
    await c.go('');
    assert.ok((await c.pread(SIZE - 4096, 4096)).every((x) => x === FILL));
    await c.disconnect();
  });

  test('transmission commands before the handshake is done end the connection', async () => {
    const write = encodeRequest(NBD_CMD_WRITE, { offset: 0, data: Buffer.alloc(4096, 0x3c) });
    // After the client flags, in place of an option.
    const a = await optionPhase(server.endpoint);
    a.write(write);
    assert.ok(await a.waitClosed(10_000), 'request in the option phase: connection not closed');
    // In place of the client flags (which then carry unknown bits: MUST close).
    const b = await NbdClient.connect(server.endpoint);
    await b.greeting();
    b.write(write);
    assert.ok(await b.waitClosed(10_000), 'request in place of the client flags: connection not closed');
    assertImageUnchanged(img);
    await assertServes(server, img);
  });

  test('out-of-range WRITE gets ENOSPC and writes nothing', async () => {
    const c = await NbdClient.connect(server.endpoint);
    await c.handshake();
    const cases: [string, bigint | number, number][] = [
      ['straddling the end', SIZE - 512, 4096],
      ['at the end', SIZE, 512],
      ['far past the end', 1n << 62n, 512],
    ];
    for (const [what, offset, length] of cases) {
      const r = await c.request(NBD_CMD_WRITE, { offset, data: Buffer.alloc(length, 0x3c) });
      assert.equal(r.error, NBD_ENOSPC, `WRITE ${what}: error ${r.error}`);
    }
    // offset + length wraps around 2^64: never a successful write.
    const wrap = await c.request(NBD_CMD_WRITE, { offset: (1n << 64n) - 512n, data: Buffer.alloc(4096, 0x3c) });
    assert.ok(wrap.error === NBD_ENOSPC || wrap.error === NBD_EINVAL, `WRITE wrapping 2^64: error ${wrap.error}`);
    for (const type of [NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM]) {
      const r = await c.request(type, { offset: SIZE - 512, length: 4096 });
      assert.ok(r.error === NBD_ENOSPC || r.error === NBD_EINVAL, `command ${type} straddling the end: error ${r.error}`);
    }
    // Still in sync: the payloads were consumed.
    assert.ok((await c.pread(SIZE - 4096, 4096)).every((x) => x === FILL));
    await c.disconnect();
    assertImageUnchanged(img);
    await assertServes(server, img);
  });

  test('out-of-range and misaligned READ get EINVAL', async () => {
    const c = await NbdClient.connect(server.endpoint);
    const info = await c.handshake();
    const cases: [string, bigint | number, number][] = [
      ['straddling the end', SIZE - 512, 4096],
      ['past the end', SIZE + 4096, 512],
      ['wrapping 2^64', (1n << 64n) - 512n, 4096],
      ['longer than the 32 MiB maximum', 0, 33 * MiB],
    ];
    for (const [what, offset, length] of cases) {
      const r = await c.request(NBD_CMD_READ, { offset, length });
      assert.equal(r.error, NBD_EINVAL, `READ ${what}: error ${r.error}`);
    }
    const min = info.blockSize?.min ?? 1;
    if (min > 1) {
      // NBD_INFO_BLOCK_SIZE promised a minimum: a request off that grid is invalid.
      const r = await c.request(NBD_CMD_READ, { offset: 1, length: min });
      assert.equal(r.error, NBD_EINVAL, `READ misaligned to the advertised minimum ${min}: error ${r.error}`);
    } else {
      // Minimum block size 1: odd offsets and lengths are valid and must read right.
      const d = await c.pread(4095, 3);
      assert.deepEqual([...d], [FILL, FILL, FILL], 'READ of 3 bytes at 4095');
    }
    assert.ok((await c.pread(0, 4096)).every((x) => x === FILL), 'still in sync after the errors');
    await c.disconnect();
  });

  test('unknown commands and unknown flags get EINVAL, and a rejected WRITE payload is skipped', async () => {
    const c = await NbdClient.connect(server.endpoint);
    await c.handshake();
    for (const type of [0x42, 7 /* BLOCK_STATUS, not negotiated */, 8 /* RESIZE, not negotiated */]) {
      const r = await c.request(type, { offset: 0, length: 512 });
      assert.equal(r.error, NBD_EINVAL, `command ${type}: error ${r.error}`);
    }
    const rf = await c.request(NBD_CMD_READ, { flags: 0x8000, offset: 0, length: 512 });
    assert.equal(rf.error, NBD_EINVAL, `READ with flag 0x8000: error ${rf.error}`);
    const wf = await c.request(NBD_CMD_WRITE, { flags: 0x4000, offset: 0, data: Buffer.alloc(4096, 0x3c) });
    assert.equal(wf.error, NBD_EINVAL, `WRITE with flag 0x4000: error ${wf.error}`);
    assert.ok((await c.pread(0, 4096)).every((x) => x === FILL), 'the rejected WRITE changed nothing and its payload was skipped');
    await c.disconnect();
    assertImageUnchanged(img);
    await assertServes(server, img);
  });

  test('cutting the connection at every byte of a handshake and a 4 KiB write leaves no trace', async () => {
    const pid = server.serverPid();
    await assertServes(server, img);
    await sleep(200);
    const baseline = fdCount(pid);
    const stream = Buffer.concat([
      u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES),
      encodeOption(NBD_OPT_GO, goPayload('')),
      encodeRequest(NBD_CMD_WRITE, { offset: 0, data: Buffer.alloc(4096, 0x3c) }),
    ]);
    const payloadStart = stream.length - 4096;
    const cuts: number[] = [];
    for (let k = 0; k < payloadStart + 64; k++) cuts.push(k);
    for (let k = payloadStart + 64; k < stream.length; k += 32) cuts.push(k);
    cuts.push(stream.length - 1);
    let notClosed = 0;
    for (const [i, k] of cuts.entries()) {
      const sock = await connectRaw(server.endpoint);
      sock.on('error', () => {});
      const closed = new Promise<boolean>((resolve) => {
        const t = setTimeout(() => resolve(false), 5000);
        sock.once('close', () => { clearTimeout(t); resolve(true); });
      });
      sock.resume(); // discard whatever the server says
      if (k > 0) sock.write(stream.subarray(0, k));
      if (i % 2 === 0) sock.end(); // FIN: the server sees EOF
      else await new Promise<void>((resolve) => sock.write(Buffer.alloc(0), () => { sock.resetAndDestroy(); resolve(); })); // RST
      if (!(await closed)) {
        notClosed++;
        sock.destroy();
      }
    }
    assert.equal(notClosed, 0, `${notClosed} of ${cuts.length} half-closed connections were never closed by the server`);
    assert.equal(server.hasExited(), false, `server died: ${server.output()}`);
    await fdsBackTo(pid, baseline);
    assertImageUnchanged(img);
    await assertServes(server, img);
  });
});

describe('payloads past the limits are not buffered', () => {
  async function freshServer(size: number): Promise<{ server: Daemon; img: string; hwm: number }> {
    const dir = newDir();
    const img = path.join(dir, 'disk.raw');
    makeImage(img, size, FILL);
    const server = await startVdisk(['-f', 'raw', img], { port: await freePort() });
    await assertServes(server, img);
    return { server, img, hwm: procStatus(server.serverPid()).hwmKiB };
  }

  test('option data longer than 32 MiB: rejected, connection closed, memory flat', async () => {
    const { server, img, hwm } = await freshServer(SIZE);
    try {
      const c = await optionPhase(server.endpoint);
      c.write(encodeOption(NBD_OPT_GO, Buffer.alloc(0), 64 * MiB));
      flood(c.sock, 48 * MiB, 0x41);
      const r = await replyOrClose(c, 15_000);
      if (r) assert.ok(isError(r), `reply 0x${r.type.toString(16)} to a 64 MiB option is not an error`);
      assert.ok(await c.waitClosed(15_000), 'a 64 MiB option must end the connection');
      const grew = procStatus(server.serverPid()).hwmKiB - hwm;
      assert.ok(grew < GROWTH_LIMIT_KIB, `server peak RSS grew by ${grew} KiB while the client pushed 48 MiB of option data`);
      await assertServes(server, img);
    } finally {
      await server.stop();
    }
  });

  test('WRITE payload longer than 32 MiB: connection closed, nothing written, memory flat', async () => {
    const size = 64 * MiB;
    const { server, img, hwm } = await freshServer(size);
    try {
      const c = await NbdClient.connect(server.endpoint);
      await c.handshake();
      c.write(encodeRequest(NBD_CMD_WRITE, { offset: 0, length: 48 * MiB }));
      flood(c.sock, 48 * MiB, 0x3c);
      assert.ok(await c.waitClosed(15_000), 'a 48 MiB WRITE must end the connection');
      const grew = procStatus(server.serverPid()).hwmKiB - hwm;
      assert.ok(grew < GROWTH_LIMIT_KIB, `server peak RSS grew by ${grew} KiB while the client pushed a 48 MiB WRITE`);
      assertImageUnchanged(img, FILL, 48 * MiB);
      await assertServes(server, img);
    } finally {
      await server.stop();
    }
  });
});

describe('TLS-only server', () => {
  test('options before STARTTLS get NBD_REP_ERR_TLS_REQD; EXPORT_NAME is cut off', async (t) => {
    if (!needPeers(t, 'openssl')) return;
    const dir = newDir();
    const pki = await makePki(dir);
    const img = path.join(dir, 'disk.raw');
    makeImage(img, SIZE, FILL);
    const ep: Endpoint = { port: await freePort() };
    const server = await startVdisk(['-f', 'raw', '--tls-creds', pki.serverDir, img], ep);
    try {
      const c = await optionPhase(ep);
      for (const [opt, data] of [
        [NBD_OPT_LIST, Buffer.alloc(0)],
        [NBD_OPT_GO, goPayload('', [NBD_INFO_BLOCK_SIZE])],
        [NBD_OPT_INFO, goPayload('')],
        [NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)],
      ] as const) {
        c.sendOption(opt, data);
        const r = await c.readOptionReply();
        assert.equal(r.option, opt);
        assert.equal(r.type, NBD_REP_ERR_TLS_REQD, `option ${opt} before STARTTLS: reply 0x${r.type.toString(16)}`);
      }
      c.sendOption(NBD_OPT_STARTTLS);
      const ack = await c.readOptionReply();
      assert.equal(ack.type, NBD_REP_ACK, 'STARTTLS is acknowledged');
      c.destroy();

      // EXPORT_NAME cannot be answered with an error: the server must hang up without
      // sending the export's size and flags.
      const e = await optionPhase(ep);
      let leaked = 0;
      e.sock.on('data', (b: Buffer) => { leaked += b.length; });
      e.sendOption(NBD_OPT_EXPORT_NAME, Buffer.alloc(0));
      assert.ok(await e.waitClosed(10_000), 'EXPORT_NAME before STARTTLS must close the connection');
      assert.equal(leaked, 0, 'server sent export information to a client without TLS');

      if (needPeers(t, 'nbdinfo')) {
        const info = await runPeer('nbdinfo', ['--size', nbdUri(ep, '', { tls: true, query: `tls-certificates=${pki.clientDir}` })]);
        assert.equal(info.status, 0, `a TLS client still gets in: ${info.stderr}`);
        assert.equal(info.stdout.trim(), String(SIZE));
      }
    } finally {
      await server.stop();
    }
  });
});

describe('connection limits', () => {
  async function idleConnections(ep: Endpoint, n: number): Promise<net.Socket[]> {
    const socks: net.Socket[] = [];
    for (let i = 0; i < n; i++) {
      const s = await connectRaw(ep);
      s.on('error', () => {});
      s.pause();
      socks.push(s);
    }
    return socks;
  }

  test('150 idle connections under -e 200 do not lock out a real client', async (t) => {
    if (!needPeers(t, 'nbdinfo')) return;
    const dir = newDir();
    const img = path.join(dir, 'disk.raw');
    makeImage(img, SIZE, FILL);
    const ep: Endpoint = { port: await freePort() };
    const server = await startVdisk(['-f', 'raw', '-e', '200', img], ep);
    try {
      await assertServes(server, img);
      await sleep(200);
      const baseline = fdCount(server.serverPid());
      const idle = await idleConnections(ep, 150);
      const r = await runPeer('nbdinfo', ['--size', nbdUri(ep)], { timeoutMs: 30_000 });
      assert.equal(r.status, 0, `nbdinfo with 150 idle connections open: ${r.stderr}`);
      assert.equal(r.stdout.trim(), String(SIZE));
      await assertServes(server, img);
      for (const s of idle) s.destroy();
      await fdsBackTo(server.serverPid(), baseline);
    } finally {
      await server.stop();
    }
  });

  test('-e counts every connection; clients past their handshake are never pushed out', async () => {
    const dir = newDir();
    const img = path.join(dir, 'disk.raw');
    makeImage(img, SIZE, FILL);
    const ep: Endpoint = { socket: path.join(dir, 'nbd.sock') };
    const server = await startVdisk(['-f', 'raw', '-e', '3', img], ep);
    const clients: NbdClient[] = [];
    try {
      for (let i = 0; i < 2; i++) {
        const c = await NbdClient.connect(ep);
        await c.handshake();
        clients.push(c);
      }
      const idle = await NbdClient.connect(ep);
      await idle.greeting();
      // The third slot is held by a client still in its handshake: a newcomer gets in.
      const third = await NbdClient.connect(ep);
      await third.handshake();
      clients.push(third);
      assert.ok(await idle.waitClosed(5000), 'the idle handshaking connection was not the one to go');
      // Now all three slots hold clients in transmission: the fourth is refused.
      const fourth = await NbdClient.connect(ep);
      await assert.rejects(fourth.handshake(), 'a fourth client got in with -e 3');
      fourth.destroy();
      for (const [i, c] of clients.entries()) {
        assert.equal(c.closed, false, `client ${i} in transmission was disconnected`);
        assert.ok((await c.pread(0, 512)).every((x) => x === FILL), `client ${i} still reads`);
      }
    } finally {
      for (const c of clients) await c.disconnect().catch(() => c.destroy());
      await server.stop();
    }
  });

  test('300 idle connections against -e 100 do not lock out a real client', async (t) => {
    // The behaviour asked for: connections still in their handshake count toward -e (the
    // server never holds more than the limit), yet a real client arriving behind 300 idle
    // ones gets in. Either mechanism satisfies it: evicting the oldest connection still in
    // its handshake (what vdisk does), or queueing newcomers until the handshake deadline
    // frees slots (qemu-nbd stops accepting at the limit). Accept-and-drop at the limit
    // fails it: every newcomer is refused while idle sockets hold the slots.
    if (!needPeers(t, 'nbdinfo')) return;
    const dir = newDir();
    const img = path.join(dir, 'disk.raw');
    makeImage(img, SIZE, FILL);
    const ep: Endpoint = { port: await freePort() };
    const server = await startVdisk(['-f', 'raw', '-e', '100', img], ep);
    try {
      await assertServes(server, img);
      await sleep(200);
      const baseline = fdCount(server.serverPid());
      const idle = await idleConnections(ep, 300);
      await sleep(300);
      const held = fdCount(server.serverPid()) - baseline;
      assert.ok(held <= 100 + 5, `server holds ${held} connections with -e 100`);
      const started = Date.now();
      const r = await runPeer('nbdinfo', ['--size', nbdUri(ep)], { timeoutMs: 60_000 });
      t.diagnostic(`nbdinfo got in after ${Date.now() - started} ms`);
      assert.equal(r.status, 0, `nbdinfo behind 300 idle connections: ${r.stderr}${r.signal ? ` (killed: ${r.signal})` : ''}`);
      assert.equal(r.stdout.trim(), String(SIZE));
      for (const s of idle) s.destroy();
      await fdsBackTo(server.serverPid(), baseline);
      await assertServes(server, img);
    } finally {
      await server.stop();
    }
  });
});
