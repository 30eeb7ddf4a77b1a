// NBD server, byte by byte: a raw-socket client drives the handshake and the commands and
// checks what comes back against doc/proto.md. One smoke test runs nbdinfo against the CLI.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import v8 from 'node:v8';
import vm from 'node:vm';
import { BlockBackend } from '../src/block/backend.js';
import type { BlockDriver } from '../src/block/driver.js';
import { VdiskError } from '../src/block/errors.js';
import { BlockNode } from '../src/block/node.js';
import { CACHE_MODES, type CacheOptions } from '../src/block/cache-mode.js';
import { openImage } from '../src/block/graph.js';
import { native } from '../src/native.js';
import { NbdExport } from '../src/nbd/export.js';
import { startServer, type NbdServer, type ServerOptions } from '../src/nbd/server.js';
import { loadX509Credentials } from '../src/nbd/tls.js';
import * as P from '../src/nbd/protocol.js';
import { VDISK_BIN, needPeers, removeDir, runOk, tempDir } from './helpers.js';

v8.setFlagsFromString('--expose-gc');
const runGc = vm.runInNewContext('gc') as () => void;
/** V8 frees ArrayBuffer memory on a background sweeper: collect, wait, collect again. */
async function gc(): Promise<void> {
  runGc();
  await new Promise((r) => setTimeout(r, 100));
  runGc();
}

// ---- a raw client -------------------------------------------------------------------------

class RawClient {
  private buf: Buffer = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  closed = false;
  readonly done: Promise<void>;

  constructor(readonly sock: net.Socket | tls.TLSSocket) {
    this.done = new Promise((resolve) => {
      sock.on('close', () => {
        this.closed = true;
        this.wake?.();
        resolve();
      });
    });
    sock.on('data', (d: Buffer) => {
      this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
      this.wake?.();
    });
    sock.on('error', () => {});
  }

  static connect(server: NbdServer): Promise<RawClient> {
    const a = server.address as { host: string; port: number };
    return new Promise((resolve, reject) => {
      const s = net.connect(a.port, a.host, () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  get buffered(): number {
    return this.buf.length;
  }

  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`connection closed with ${this.buf.length}/${n} bytes`);
      await new Promise<void>((r) => (this.wake = r));
      this.wake = null;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  write(b: Buffer): void {
    this.sock.write(b);
  }

  /** Resolves true if the server closes the connection (reading and discarding anything). */
  async closedByServer(): Promise<boolean> {
    await this.done;
    return true;
  }

  destroy(): void {
    this.sock.destroy();
  }
}

async function greet(c: RawClient, clientFlags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES): Promise<number> {
  const g = await c.read(18);
  assert.equal(g.readBigUInt64BE(0), P.NBDMAGIC);
  assert.equal(g.readBigUInt64BE(8), P.IHAVEOPT);
  const u = Buffer.alloc(4);
  u.writeUInt32BE(clientFlags);
  c.write(u);
  return g.readUInt16BE(16);
}

function optionBytes(option: number, data: Buffer = Buffer.alloc(0), length = data.length): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(P.IHAVEOPT, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(length, 12);
  return Buffer.concat([h, data]);
}

interface OptReply { option: number; type: number; data: Buffer }

async function readOptReply(c: RawClient): Promise<OptReply> {
  const h = await c.read(20);
  assert.equal(h.readBigUInt64BE(0), P.NBD_REP_MAGIC);
  const len = h.readUInt32BE(16);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: Buffer.from(await c.read(len)) };
}

/** Option replies up to and including the final one (ACK or an error). */
async function optReplies(c: RawClient): Promise<OptReply[]> {
  const out: OptReply[] = [];
  for (;;) {
    const r = await readOptReply(c);
    out.push(r);
    if (r.type === P.NBD_REP_ACK || r.type & 0x80000000) return out;
  }
}

function u32str(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  const l = Buffer.alloc(4);
  l.writeUInt32BE(b.length);
  return Buffer.concat([l, b]);
}

function infoData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.alloc(2 + 2 * infos.length);
  n.writeUInt16BE(infos.length, 0);
  infos.forEach((t, i) => n.writeUInt16BE(t, 2 + 2 * i));
  return Buffer.concat([u32str(name), n]);
}

function metaData(name: string, queries: string[]): Buffer {
  const n = Buffer.alloc(4);
  n.writeUInt32BE(queries.length);
  return Buffer.concat([u32str(name), n, ...queries.map(u32str)]);
}

/** Handshake to transmission with NBD_OPT_GO; returns the transmission flags and size. */
async function go(c: RawClient, name = '', o: { structured?: boolean; meta?: string[] } = {}): Promise<{ flags: number; size: number }> {
  await greet(c);
  if (o.structured) {
    c.write(optionBytes(P.NBD_OPT_STRUCTURED_REPLY));
    assert.equal((await readOptReply(c)).type, P.NBD_REP_ACK);
  }
  if (o.meta) {
    c.write(optionBytes(P.NBD_OPT_SET_META_CONTEXT, metaData(name, o.meta)));
    const r = await optReplies(c);
    assert.equal(r[r.length - 1].type, P.NBD_REP_ACK);
  }
  c.write(optionBytes(P.NBD_OPT_GO, infoData(name)));
  const replies = await optReplies(c);
  assert.equal(replies[replies.length - 1].type, P.NBD_REP_ACK, 'GO succeeds');
  const exp = replies.find((r) => r.type === P.NBD_REP_INFO && r.data.readUInt16BE(0) === P.NBD_INFO_EXPORT)!;
  return { size: Number(exp.data.readBigUInt64BE(2)), flags: exp.data.readUInt16BE(10) };
}

function requestBytes(type: number, flags: number, handle: number, offset: number, length: number, payload?: Buffer): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(BigInt(handle), 8);
  h.writeBigUInt64BE(BigInt(offset), 16);
  h.writeUInt32BE(length, 24);
  return payload ? Buffer.concat([h, payload]) : h;
}

async function simpleReply(c: RawClient, dataLength = 0): Promise<{ error: number; handle: number; data: Buffer }> {
  const h = await c.read(16);
  assert.equal(h.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC);
  const error = h.readUInt32BE(4);
  return { error, handle: Number(h.readBigUInt64BE(8)), data: error ? Buffer.alloc(0) : Buffer.from(await c.read(dataLength)) };
}

interface Chunk { flags: number; type: number; handle: number; payload: Buffer }

async function readChunk(c: RawClient): Promise<Chunk> {
  const h = await c.read(20);
  assert.equal(h.readUInt32BE(0), P.NBD_STRUCTURED_REPLY_MAGIC);
  return {
    flags: h.readUInt16BE(4), type: h.readUInt16BE(6), handle: Number(h.readBigUInt64BE(8)),
    payload: Buffer.from(await c.read(h.readUInt32BE(16))),
  };
}

async function structuredReply(c: RawClient): Promise<Chunk[]> {
  const out: Chunk[] = [];
  for (;;) {
    const ch = await readChunk(c);
    out.push(ch);
    if (ch.flags & P.NBD_REPLY_FLAG_DONE) return out;
  }
}

// ---- fixtures -----------------------------------------------------------------------------

const MiB = 1024 * 1024;
let dir: string;

before(() => {
  dir = tempDir('vdisk-nbd-');
});
after(() => removeDir(dir));

interface Fixture { server: NbdServer; backends: BlockBackend[]; files: string[]; close(): Promise<void> }

async function serveFiles(specs: Array<{ name: string; size?: number; cache?: CacheOptions; readOnly?: boolean; description?: string; init?: (fd: number) => void }>,
  opts: Partial<ServerOptions> = {}): Promise<Fixture> {
  const backends: BlockBackend[] = [];
  const exports: NbdExport[] = [];
  const files: string[] = [];
  for (const s of specs) {
    const file = path.join(dir, `${s.name || 'default'}-${Math.random().toString(36).slice(2)}.img`);
    const fd = fs.openSync(file, 'w+');
    fs.ftruncateSync(fd, s.size ?? 4 * MiB);
    s.init?.(fd);
    fs.closeSync(fd);
    const cache = s.cache ?? CACHE_MODES.writeback;
    const node = await openImage(file, { format: 'raw', cache, readOnly: s.readOnly });
    const backend = new BlockBackend(node, cache);
    backends.push(backend);
    files.push(file);
    exports.push(new NbdExport({ name: s.name, description: s.description, backend, readOnly: s.readOnly }));
  }
  const server = await startServer({ exports, host: '127.0.0.1', port: 0, ...opts });
  return {
    server, backends, files,
    async close() {
      await server.close();
      for (const b of backends) await b.close();
    },
  };
}

// ---- handshake ------------------------------------------------------------------------------

describe('handshake', () => {
  let fx: Fixture;
  before(async () => {
    fx = await serveFiles([
      { name: 'wb', cache: CACHE_MODES.writeback, description: 'a writeback disk' },
      { name: 'wt', cache: CACHE_MODES.writethrough },
      { name: 'ro', readOnly: true, size: 1 * MiB },
    ]);
  });
  after(() => fx.close());

  test('greeting is fixed newstyle with NO_ZEROES', async () => {
    const c = await RawClient.connect(fx.server);
    const flags = await greet(c);
    assert.equal(flags, P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
    c.destroy();
  });

  test('unknown client flags end the session', async () => {
    const c = await RawClient.connect(fx.server);
    await greet(c, 0x80 | P.NBD_FLAG_C_FIXED_NEWSTYLE);
    assert.equal(await c.closedByServer(), true);
    assert.equal(c.buffered, 0);
  });

  test('NBD_OPT_LIST names every export; unknown options get ERR_UNSUP and haggling continues', async () => {
    const c = await RawClient.connect(fx.server);
    await greet(c);
    c.write(optionBytes(0x4242));
    const unsup = await readOptReply(c);
    assert.equal(unsup.type, P.NBD_REP_ERR_UNSUP);
    assert.equal(unsup.option, 0x4242);
    c.write(optionBytes(P.NBD_OPT_LIST));
    const replies = await optReplies(c);
    assert.equal(replies.pop()!.type, P.NBD_REP_ACK);
    const names = replies.map((r) => {
      assert.equal(r.type, P.NBD_REP_SERVER);
      const n = r.data.readUInt32BE(0);
      return [r.data.toString('utf8', 4, 4 + n), r.data.toString('utf8', 4 + n)];
    });
    assert.deepEqual(names, [['wb', 'a writeback disk'], ['wt', ''], ['ro', '']]);
    c.write(optionBytes(P.NBD_OPT_LIST, Buffer.from('x')));
    assert.equal((await readOptReply(c)).type, P.NBD_REP_ERR_INVALID);
    c.write(optionBytes(P.NBD_OPT_ABORT));
    assert.equal((await readOptReply(c)).type, P.NBD_REP_ACK);
    assert.equal(await c.closedByServer(), true);
  });

  test('NBD_OPT_INFO: export size and flags, name, description, block size; unknown export', async () => {
    const c = await RawClient.connect(fx.server);
    await greet(c);
    c.write(optionBytes(P.NBD_OPT_INFO, infoData('nope')));
    assert.equal((await readOptReply(c)).type, P.NBD_REP_ERR_UNKNOWN);
    c.write(optionBytes(P.NBD_OPT_INFO, infoData('wb', [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION, P.NBD_INFO_BLOCK_SIZE])));
    const r = await optReplies(c);
    assert.equal(r.pop()!.type, P.NBD_REP_ACK);
    const info = new Map(r.map((x) => [x.data.readUInt16BE(0), x.data.subarray(2)]));
    assert.equal(Number(info.get(P.NBD_INFO_EXPORT)!.readBigUInt64BE(0)), 4 * MiB);
    assert.equal(info.get(P.NBD_INFO_NAME)!.toString(), 'wb');
    assert.equal(info.get(P.NBD_INFO_DESCRIPTION)!.toString(), 'a writeback disk');
    const bs = info.get(P.NBD_INFO_BLOCK_SIZE)!;
    assert.deepEqual([bs.readUInt32BE(0), bs.readUInt32BE(4), bs.readUInt32BE(8)], [1, 4096, 32 * MiB]);
    // A malformed request: name length past the option's end.
    const bad = infoData('wb');
    bad.writeUInt32BE(1000, 0);
    c.write(optionBytes(P.NBD_OPT_INFO, bad));
    assert.equal((await readOptReply(c)).type, P.NBD_REP_ERR_INVALID);
    c.destroy();
  });

  test('cache mode on the wire: SEND_FLUSH and SEND_FUA only with a write cache; READ_ONLY with -r', async () => {
    const flagsOf = async (name: string) => {
      const c = await RawClient.connect(fx.server);
      const { flags } = await go(c, name);
      c.destroy();
      return flags;
    };
    const wb = await flagsOf('wb');
    const wt = await flagsOf('wt');
    const ro = await flagsOf('ro');
    const cacheBits = P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA;
    assert.equal(wb & cacheBits, cacheBits);
    assert.equal(wt & cacheBits, 0);
    for (const f of [wb, wt]) {
      assert.ok(f & P.NBD_FLAG_HAS_FLAGS && f & P.NBD_FLAG_SEND_TRIM && f & P.NBD_FLAG_SEND_WRITE_ZEROES);
      assert.ok(f & P.NBD_FLAG_CAN_MULTI_CONN && !(f & P.NBD_FLAG_READ_ONLY));
      assert.equal(f & P.NBD_FLAG_SEND_DF, 0, 'no DF without structured replies');
    }
    assert.ok(ro & P.NBD_FLAG_READ_ONLY);
    assert.equal(ro & (P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES), 0);
  });

  test('NBD_OPT_EXPORT_NAME: 124 zero bytes unless NO_ZEROES; unknown name disconnects', async () => {
    for (const noZeroes of [true, false]) {
      const c = await RawClient.connect(fx.server);
      await greet(c, P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0));
      c.write(optionBytes(P.NBD_OPT_EXPORT_NAME, Buffer.from('ro')));
      const r = await c.read(10 + (noZeroes ? 0 : 124));
      assert.equal(Number(r.readBigUInt64BE(0)), 1 * MiB);
      assert.ok(r.readUInt16BE(8) & P.NBD_FLAG_READ_ONLY);
      if (!noZeroes) assert.ok(r.subarray(10).every((b) => b === 0));
      c.write(requestBytes(P.NBD_CMD_READ, 0, 7, 0, 512));
      const rep = await simpleReply(c, 512);
      assert.equal(rep.error, 0);
      assert.equal(rep.handle, 7);
      c.destroy();
    }
    const c = await RawClient.connect(fx.server);
    await greet(c);
    c.write(optionBytes(P.NBD_OPT_EXPORT_NAME, Buffer.from('missing')));
    assert.equal(await c.closedByServer(), true);
    assert.equal(c.buffered, 0);
  });

  test('meta contexts: LIST wildcards, SET needs structured replies, BLOCK_STATUS needs a context', async () => {
    const c = await RawClient.connect(fx.server);
    await greet(c);
    c.write(optionBytes(P.NBD_OPT_SET_META_CONTEXT, metaData('wb', ['base:allocation'])));
    assert.equal((await readOptReply(c)).type, P.NBD_REP_ERR_INVALID);
    c.write(optionBytes(P.NBD_OPT_STRUCTURED_REPLY));
    assert.equal((await readOptReply(c)).type, P.NBD_REP_ACK);
    c.write(optionBytes(P.NBD_OPT_LIST_META_CONTEXT, metaData('wb', [])));
    let r = await optReplies(c);
    assert.deepEqual(r.slice(0, -1).map((x) => x.data.toString('utf8', 4)), ['base:allocation', 'qemu:allocation-depth']);
    c.write(optionBytes(P.NBD_OPT_LIST_META_CONTEXT, metaData('wb', ['base:', 'x-other:thing'])));
    r = await optReplies(c);
    assert.deepEqual(r.slice(0, -1).map((x) => x.data.toString('utf8', 4)), ['base:allocation']);
    c.write(optionBytes(P.NBD_OPT_SET_META_CONTEXT, metaData('wb', ['base:', 'nope:x'])));
    r = await optReplies(c);
    assert.equal(r.length, 1, 'base: selects nothing in SET');
    c.write(optionBytes(P.NBD_OPT_GO, infoData('wb')));
    assert.equal((await optReplies(c)).pop()!.type, P.NBD_REP_ACK);
    c.write(requestBytes(P.NBD_CMD_BLOCK_STATUS, 0, 1, 0, 4096));
    const [err] = await structuredReply(c);
    assert.equal(err.type, P.NBD_REPLY_TYPE_ERROR);
    assert.equal(err.payload.readUInt32BE(0), P.NBD_EINVAL);
    c.destroy();
  });
});

// ---- transmission -----------------------------------------------------------------------------

describe('transmission', () => {
  let fx: Fixture;
  const pattern = Buffer.alloc(64 * 1024, 0xa5);
  before(async () => {
    fx = await serveFiles([
      { name: 'sparse', size: 1 * MiB, init: (fd) => fs.writeSync(fd, pattern, 0, pattern.length, 0) },
      { name: 'rw', size: 4 * MiB },
      { name: 'ro', size: 1 * MiB, readOnly: true },
    ]);
  });
  after(() => fx.close());

  test('structured read answers the hole with NBD_REPLY_TYPE_OFFSET_HOLE', async (t) => {
    if (!native) {
      t.skip('native addon not built: the file protocol cannot see holes');
      return;
    }
    const c = await RawClient.connect(fx.server);
    const { flags } = await go(c, 'sparse', { structured: true, meta: ['base:allocation'] });
    assert.ok(flags & P.NBD_FLAG_SEND_DF);
    c.write(requestBytes(P.NBD_CMD_READ, 0, 0x1122334455, 0, 1 * MiB));
    const chunks = await structuredReply(c);
    assert.deepEqual(chunks.map((ch) => ch.type), [P.NBD_REPLY_TYPE_OFFSET_DATA, P.NBD_REPLY_TYPE_OFFSET_HOLE]);
    assert.ok(chunks.every((ch) => ch.handle === 0x1122334455));
    const [data, hole] = chunks;
    assert.equal(Number(data.payload.readBigUInt64BE(0)), 0);
    assert.deepEqual(data.payload.subarray(8), pattern);
    assert.equal(hole.payload.length, 12);
    assert.equal(Number(hole.payload.readBigUInt64BE(0)), 64 * 1024);
    assert.equal(hole.payload.readUInt32BE(8), 1 * MiB - 64 * 1024);
    assert.equal(hole.flags & P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_FLAG_DONE);
    assert.equal(data.flags & P.NBD_REPLY_FLAG_DONE, 0);

    // DF: one data chunk with the zeros present.
    c.write(requestBytes(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 2, 0, 128 * 1024));
    const df = await structuredReply(c);
    assert.equal(df.length, 1);
    assert.equal(df[0].type, P.NBD_REPLY_TYPE_OFFSET_DATA);
    assert.deepEqual(df[0].payload.subarray(8), Buffer.concat([pattern, Buffer.alloc(64 * 1024)]));

    // base:allocation agrees; REQ_ONE gives one extent.
    c.write(requestBytes(P.NBD_CMD_BLOCK_STATUS, 0, 3, 0, 1 * MiB));
    const [bs] = await structuredReply(c);
    assert.equal(bs.type, P.NBD_REPLY_TYPE_BLOCK_STATUS);
    const ext = [];
    for (let i = 4; i < bs.payload.length; i += 8) ext.push([bs.payload.readUInt32BE(i), bs.payload.readUInt32BE(i + 4)]);
    assert.deepEqual(ext, [[64 * 1024, 0], [1 * MiB - 64 * 1024, P.NBD_STATE_HOLE | P.NBD_STATE_ZERO]]);
    c.write(requestBytes(P.NBD_CMD_BLOCK_STATUS, P.NBD_CMD_FLAG_REQ_ONE, 4, 32 * 1024, 1 * MiB - 32 * 1024));
    const [one] = await structuredReply(c);
    assert.equal(one.payload.length, 12);
    assert.deepEqual([one.payload.readUInt32BE(4), one.payload.readUInt32BE(8)], [32 * 1024, 0]);
    c.destroy();
  });

  test('error codes: ENOSPC past the end for writes, EINVAL for reads, unknown commands and flags, EPERM read-only', async () => {
    const c = await RawClient.connect(fx.server);
    const { size } = await go(c, 'rw');
    const cases: Array<[Buffer, number, string]> = [
      [requestBytes(P.NBD_CMD_WRITE, 0, 1, size - 512, 1024, Buffer.alloc(1024, 1)), P.NBD_ENOSPC, 'write past end'],
      [requestBytes(P.NBD_CMD_WRITE_ZEROES, 0, 2, size, 512), P.NBD_ENOSPC, 'write zeroes past end'],
      [requestBytes(P.NBD_CMD_READ, 0, 3, size - 1, 2), P.NBD_EINVAL, 'read past end'],
      [requestBytes(P.NBD_CMD_TRIM, 0, 4, 2 ** 62, 1), P.NBD_EINVAL, 'trim at 2^62'],
      [requestBytes(42, 0, 5, 0, 0), P.NBD_EINVAL, 'unknown command'],
      [requestBytes(P.NBD_CMD_READ, 1 << 9, 6, 0, 512), P.NBD_EINVAL, 'unknown flag'],
      [requestBytes(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 7, 0, 512), P.NBD_EINVAL, 'DF without structured replies'],
      [requestBytes(P.NBD_CMD_READ, 0, 8, 0, 33 * MiB), P.NBD_EINVAL, 'read over 32 MiB'],
      [requestBytes(P.NBD_CMD_FLUSH, 0, 9, 4096, 0), P.NBD_EINVAL, 'flush with an offset'],
    ];
    for (const [bytes, errno, what] of cases) {
      c.write(bytes);
      const r = await simpleReply(c);
      assert.equal(r.error, errno, what);
    }
    // The refused write's payload was consumed: the stream is still in step.
    c.write(requestBytes(P.NBD_CMD_WRITE, 0, 10, 0, 4, Buffer.from('abcd')));
    assert.equal((await simpleReply(c)).error, 0);
    c.write(requestBytes(P.NBD_CMD_READ, 0, 11, 0, 4));
    assert.equal((await simpleReply(c, 4)).data.toString(), 'abcd');
    c.destroy();

    const ro = await RawClient.connect(fx.server);
    await go(ro, 'ro', { structured: true });
    ro.write(requestBytes(P.NBD_CMD_WRITE, 0, 1, 0, 512, Buffer.alloc(512)));
    ro.write(requestBytes(P.NBD_CMD_TRIM, 0, 2, 0, 512));
    for (const h of [1, 2]) {
      const [e] = await structuredReply(ro);
      assert.equal(e.handle, h);
      assert.equal(e.type, P.NBD_REPLY_TYPE_ERROR);
      assert.equal(e.payload.readUInt32BE(0), P.NBD_EPERM);
    }
    // Structured replies on: even an early read error is a structured error chunk.
    ro.write(requestBytes(P.NBD_CMD_READ, 0, 3, 1 * MiB, 512));
    const [re] = await structuredReply(ro);
    assert.equal(re.type, P.NBD_REPLY_TYPE_ERROR);
    assert.equal(re.payload.readUInt32BE(0), P.NBD_EINVAL);
    ro.destroy();
  });

  test('EOVERFLOW answers only a DF read and ENOTSUP only a FAST_ZERO write-zeroes; otherwise EINVAL', async () => {
    // A driver failing reads with EOVERFLOW and writes and zeroing with ENOTSUP, as a driver
    // below (an NBD client passing on a remote error) could. nbdkit's nbd_errno rule.
    const fail = (code: 'EOVERFLOW' | 'ENOTSUP') => async (): Promise<never> => {
      throw new VdiskError(code, 'io', `failing: ${code}`);
    };
    const driver: BlockDriver = {
      driverName: 'failing', children: {}, caps: { fua: 'native', writeZeroes: 'native', discard: 'none' },
      limits: () => ({ requestAlignment: 1, maxTransfer: 1 << 30 }), getLength: () => 1 * MiB,
      pread: fail('EOVERFLOW'), pwrite: fail('ENOTSUP'), pwriteZeroes: fail('ENOTSUP'), close: async () => {},
    };
    const backend = new BlockBackend(new BlockNode(driver, { filename: 'failing', readOnly: false, noFlush: false }), CACHE_MODES.writeback);
    const server = await startServer({ exports: [new NbdExport({ name: '', backend })], host: '127.0.0.1', port: 0 });
    try {
      const c = await RawClient.connect(server);
      const { flags } = await go(c, '', { structured: true });
      assert.ok(flags & P.NBD_FLAG_SEND_FAST_ZERO);
      const cases: Array<[number, number, number]> = [
        [P.NBD_CMD_READ, 0, P.NBD_EINVAL],
        [P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, P.NBD_EOVERFLOW],
        [P.NBD_CMD_WRITE_ZEROES, 0, P.NBD_EINVAL],
        [P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_FAST_ZERO, P.NBD_ENOTSUP],
      ];
      for (const [i, [type, flag, errno]] of cases.entries()) {
        c.write(requestBytes(type, flag, i + 1, 0, 4096));
        const [e] = await structuredReply(c);
        assert.equal(e.type, P.NBD_REPLY_TYPE_ERROR);
        assert.equal(e.payload.readUInt32BE(0), errno, `command ${type} flags ${flag}`);
      }
      c.write(requestBytes(P.NBD_CMD_WRITE, 0, 9, 0, 4, Buffer.from('abcd')));
      const [w] = await structuredReply(c);
      assert.equal(w.payload.readUInt32BE(0), P.NBD_EINVAL, 'ENOTSUP from a write');
      c.destroy();
    } finally {
      await server.close();
    }
  });

  test('pipelined requests are all answered, by handle, with the data written', async () => {
    const c = await RawClient.connect(fx.server);
    await go(c, 'rw');
    const n = 64;
    const blocks: Buffer[] = [];
    const out: Buffer[] = [];
    for (let i = 0; i < n; i++) {
      blocks.push(Buffer.alloc(4096, i + 1));
      out.push(requestBytes(P.NBD_CMD_WRITE, 0, 1000 + i, 8192 * i, 4096, blocks[i]));
    }
    out.push(requestBytes(P.NBD_CMD_FLUSH, 0, 5000, 0, 0));
    c.write(Buffer.concat(out));
    const seen = new Set<number>();
    for (let i = 0; i <= n; i++) {
      const r = await simpleReply(c);
      assert.equal(r.error, 0);
      seen.add(r.handle);
    }
    assert.equal(seen.size, n + 1);
    const reads = [];
    for (let i = 0; i < n; i++) reads.push(requestBytes(P.NBD_CMD_READ, 0, 2000 + i, 8192 * i, 4096));
    c.write(Buffer.concat(reads));
    for (let i = 0; i < n; i++) {
      const r = await simpleReply(c, 4096);
      assert.deepEqual(r.data, blocks[r.handle - 2000]);
    }
    c.write(requestBytes(P.NBD_CMD_DISC, 0, 9999, 0, 0));
    assert.equal(await c.closedByServer(), true);
    assert.equal(c.buffered, 0, 'no reply to NBD_CMD_DISC');
  });

  test('reply and payload buffers are reused without mixing requests (sizes across classes, simple and structured)', async () => {
    // The server recycles read and write buffers; every reply must still carry exactly its own bytes.
    const own = await serveFiles([{ name: 'rw', size: 4 * MiB }]);
    const simple = await RawClient.connect(own.server);
    await go(simple, 'rw');
    const structured = await RawClient.connect(own.server);
    await go(structured, 'rw', { structured: true });
    const sizes = [1, 100, 4095, 4096, 4097, 65536 + 3, 200_000, 262_144, 1 * MiB - 5];
    const offsets: number[] = [];
    let at = 0;
    for (const s of sizes) {
      offsets.push(at);
      at += s + 4096 - (s % 4096) + 512; // gaps between ranges, unaligned starts
    }
    assert.ok(at <= 4 * MiB);
    for (let round = 0; round < 3; round++) {
      const data = sizes.map((s, i) => {
        const b = Buffer.alloc(s);
        for (let k = 0; k < s; k++) b[k] = (k * 31 + (k >> 9) + round * 7 + i * 13 + 1) & 0xff;
        return b;
      });
      simple.write(Buffer.concat(sizes.map((s, i) => requestBytes(P.NBD_CMD_WRITE, 0, 100 + i, offsets[i], s, data[i]))));
      for (let i = 0; i < sizes.length; i++) assert.equal((await simpleReply(simple)).error, 0);
      // Reads pipelined on both connections while neither client reads its replies (so they
      // queue in the server), then more reads that need buffers while those are still unsent.
      const REPS = 4;
      const reads = (base: number) => Buffer.concat(Array.from({ length: REPS }, (_, rep) =>
        sizes.map((s, i) => requestBytes(P.NBD_CMD_READ, 0, base + rep * 100 + i, offsets[i], s))).flat());
      simple.sock.pause();
      structured.sock.pause();
      simple.write(reads(1000));
      structured.write(reads(2000));
      await new Promise((r) => setTimeout(r, 150));
      simple.write(reads(11000));
      structured.write(reads(12000));
      await new Promise((r) => setTimeout(r, 150));
      simple.sock.resume();
      structured.sock.resume();
      for (let n = 0; n < sizes.length * REPS * 2; n++) {
        const h = await simple.read(16);
        assert.equal(h.readUInt32BE(4), 0);
        const i = Number(h.readBigUInt64BE(8)) % 100;
        assert.ok(Buffer.from(await simple.read(sizes[i])).equals(data[i]), `simple read ${i} (${sizes[i]} bytes), round ${round}`);
      }
      const got = new Map<number, Buffer>();
      let done = 0;
      while (done < sizes.length * REPS * 2) {
        const ch = await readChunk(structured);
        const i = ch.handle % 100;
        const key = ch.handle;
        const buf = got.get(key) ?? Buffer.alloc(sizes[i], 0xee);
        got.set(key, buf);
        if (ch.type === P.NBD_REPLY_TYPE_OFFSET_DATA) {
          ch.payload.copy(buf, Number(ch.payload.readBigUInt64BE(0)) - offsets[i], 8);
        } else {
          assert.equal(ch.type, P.NBD_REPLY_TYPE_OFFSET_HOLE, `chunk type ${ch.type}`);
          buf.fill(0, Number(ch.payload.readBigUInt64BE(0)) - offsets[i], Number(ch.payload.readBigUInt64BE(0)) - offsets[i] + ch.payload.readUInt32BE(8));
        }
        if (ch.flags & P.NBD_REPLY_FLAG_DONE) {
          assert.ok(buf.equals(data[i]), `structured read ${i} (${sizes[i]} bytes), round ${round}`);
          done++;
        }
      }
    }
    simple.destroy();
    structured.destroy();
    await own.close();
  });

  test('sparse reads see holes made after an earlier read of the range (WRITE_ZEROES, TRIM, other connection)', async () => {
    const own = await serveFiles([{ name: 'rw', size: 4 * MiB }]);
    try {
      const a = await RawClient.connect(own.server);
      const { flags } = await go(a, 'rw', { structured: true });
      const b = await RawClient.connect(own.server);
      await go(b, 'rw', { structured: true });
      const data = Buffer.alloc(2 * MiB, 0x5a);
      a.write(requestBytes(P.NBD_CMD_WRITE, 0, 1, 0, data.length, data));
      assert.equal((await simpleReply(a)).error, 0);
      const layout = async (c: RawClient, offset: number, length: number) => {
        c.write(requestBytes(P.NBD_CMD_READ, 0, 7, offset, length));
        const bytes = Buffer.alloc(length, 0xee);
        const kinds: string[] = [];
        for (const ch of await structuredReply(c)) {
          const at = Number(ch.payload.readBigUInt64BE(0)) - offset;
          if (ch.type === P.NBD_REPLY_TYPE_OFFSET_DATA) {
            ch.payload.copy(bytes, at, 8);
            kinds.push(`data@${at}+${ch.payload.length - 8}`);
          } else {
            bytes.fill(0, at, at + ch.payload.readUInt32BE(8));
            kinds.push(`hole@${at}+${ch.payload.readUInt32BE(8)}`);
          }
        }
        return { bytes, kinds: kinds.sort().join(' ') };
      };
      assert.deepEqual((await layout(a, 0, 256 * 1024)).kinds, 'data@0+262144');
      // Zero the middle on the same connection, then trim more through the other one.
      a.write(requestBytes(P.NBD_CMD_WRITE_ZEROES, 0, 2, 64 * 1024, 128 * 1024));
      assert.equal((await simpleReply(a)).error, 0);
      assert.ok(flags & P.NBD_FLAG_SEND_TRIM);
      b.write(requestBytes(P.NBD_CMD_TRIM, 0, 3, 1 * MiB, 512 * 1024));
      assert.equal((await simpleReply(b)).error, 0);
      const fresh = await RawClient.connect(own.server);
      await go(fresh, 'rw', { structured: true });
      for (const [off, len] of [[0, 256 * 1024], [1 * MiB - 64 * 1024, 1 * MiB]]) {
        const seen = await layout(a, off, len);
        const truth = await layout(fresh, off, len);
        assert.equal(seen.kinds, truth.kinds, `chunks of ${off}+${len} as a fresh connection sees them`);
        assert.ok(seen.bytes.equals(truth.bytes));
      }
      const zeroed = (await layout(a, 0, 256 * 1024)).bytes;
      assert.ok(zeroed.subarray(64 * 1024, 192 * 1024).every((x) => x === 0));
      assert.ok(zeroed.subarray(0, 64 * 1024).every((x) => x === 0x5a));
      for (const c of [a, b, fresh]) c.destroy();
    } finally {
      await own.close();
    }
  });

  test('a client that vanishes mid-WRITE leaves nothing applied and its connection freed', async () => {
    const c = await RawClient.connect(fx.server);
    await go(c, 'rw');
    c.write(requestBytes(P.NBD_CMD_WRITE, 0, 1, 1 * MiB, 1 * MiB, Buffer.alloc(512 * 1024, 0xee)));
    await new Promise((r) => setTimeout(r, 50));
    c.destroy();
    await c.done;
    for (let i = 0; i < 50 && fx.server.clients > 0; i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(fx.server.clients, 0);
    const back = Buffer.alloc(1 * MiB, 1);
    await fx.backends[1].pread(1 * MiB, back);
    assert.ok(back.every((b) => b === 0), 'no byte of the partial write reached the image');
  });

  test('large WRITE payloads arriving in odd pieces (read straight into their buffers) land intact', async () => {
    // Payloads past the first read go from the socket directly into the payload buffer; the
    // next header may share a read with a payload's tail, and a small payload with a header.
    const c = await RawClient.connect(fx.server);
    await go(c, 'rw');
    const sizes = [2 * MiB + 17, 4096, 1 * MiB - 5000, 100, 256 * 1024 + 3];
    const blocks = sizes.map((n, i) => crypto.randomBytes(n).fill(i + 1, 0, 1));
    const offsets: number[] = [];
    let at = 0;
    for (const b of blocks) {
      offsets.push(at);
      at += b.length + 4096;
    }
    const all = Buffer.concat(blocks.map((b, i) => requestBytes(P.NBD_CMD_WRITE, 0, 100 + i, offsets[i], b.length, b)));
    for (let pos = 0, k = 0; pos < all.length; k++) {
      const n = [7, 65536 + 13, 300001, 24, 1 << 20][k % 5];
      c.write(all.subarray(pos, pos + n));
      pos += n;
      if (k % 3 === 0) await new Promise((r) => setImmediate(r));
    }
    for (let i = 0; i < blocks.length; i++) assert.equal((await simpleReply(c)).error, 0);
    for (let i = 0; i < blocks.length; i++) {
      const back = Buffer.alloc(blocks[i].length);
      await fx.backends[1].pread(offsets[i], back);
      assert.ok(back.equals(blocks[i]), `payload ${i} (${blocks[i].length} bytes) intact`);
    }
    c.write(requestBytes(P.NBD_CMD_DISC, 0, 9999, 0, 0));
    assert.equal(await c.closedByServer(), true);
  });

  test('a WRITE payload over 32 MiB disconnects without being buffered', async () => {
    const c = await RawClient.connect(fx.server);
    await go(c, 'rw');
    c.write(requestBytes(P.NBD_CMD_WRITE, 0, 1, 0, 64 * MiB));
    assert.equal(await c.closedByServer(), true);
    assert.equal(c.buffered, 0);
  });
});

// ---- limits -----------------------------------------------------------------------------------

describe('limits and abuse', () => {
  test('an option over 32 MiB disconnects; a large one is skipped with ERR_TOO_BIG, never buffered', async () => {
    const fx = await serveFiles([{ name: '' }]);
    try {
      const c = await RawClient.connect(fx.server);
      await greet(c);
      c.write(optionBytes(P.NBD_OPT_LIST_META_CONTEXT, Buffer.alloc(0), 64 * MiB));
      assert.equal(await c.closedByServer(), true);

      const d = await RawClient.connect(fx.server);
      await greet(d);
      const total = 24 * MiB;
      d.write(optionBytes(P.NBD_OPT_LIST_META_CONTEXT, Buffer.alloc(0), total));
      const piece = Buffer.alloc(256 * 1024);
      const sendPieces = async (n: number) => {
        for (let i = 0; i < n; i++) {
          if (!d.sock.write(piece)) await new Promise((r) => d.sock.once('drain', r));
        }
      };
      await gc();
      const baseline = process.memoryUsage().arrayBuffers;
      await sendPieces(total / piece.length / 2);
      // Let the server consume what is in flight, then see what it kept.
      await new Promise((r) => setTimeout(r, 200));
      await gc();
      // Buffering it would mean one 24 MiB allocation alive now.
      const grown = process.memoryUsage().arrayBuffers - baseline;
      assert.ok(grown < 16 * MiB, `server held ${grown} bytes of a skipped option`);
      await sendPieces(total / piece.length / 2);
      const r = await readOptReply(d);
      assert.equal(r.type, P.NBD_REP_ERR_TOO_BIG);
      d.write(optionBytes(P.NBD_OPT_GO, infoData('')));
      assert.equal((await optReplies(d)).pop()!.type, P.NBD_REP_ACK, 'haggling continues after the skipped option');
      d.destroy();
    } finally {
      await fx.close();
    }
  });

  test('a client that does not read its replies stops being read (backpressure)', async () => {
    const fx = await serveFiles([{ name: '', size: 8 * MiB }], {
      limits: { maxInFlightRequests: 4, maxInFlightBytes: 4 * MiB, maxOutputBuffered: 1 * MiB },
    });
    try {
      const c = await RawClient.connect(fx.server);
      await go(c);
      c.sock.pause();
      const n = 200;
      const reqs = [];
      for (let i = 0; i < n; i++) reqs.push(requestBytes(P.NBD_CMD_READ, 0, i, (i % 8) * MiB, 1 * MiB));
      c.write(Buffer.concat(reqs));
      // Wait until the server stops making progress.
      let last = -1;
      while (fx.backends[0].stats.readOps !== last) {
        last = fx.backends[0].stats.readOps;
        await new Promise((r) => setTimeout(r, 300));
      }
      assert.ok(last < n / 2, `server read ${last} of ${n} requests while the client read no replies`);
      c.sock.resume();
      for (let i = 0; i < n; i++) assert.equal((await simpleReply(c, 1 * MiB)).error, 0);
      assert.equal(fx.backends[0].stats.readOps, n);
      c.destroy();
    } finally {
      await fx.close();
    }
  });

  test('the handshake has a deadline', async () => {
    const fx = await serveFiles([{ name: '' }], { handshakeLimit: 0.2 });
    try {
      const c = await RawClient.connect(fx.server);
      await c.read(18);
      assert.equal(await c.closedByServer(), true);
    } finally {
      await fx.close();
    }
  });

  test('shutdown answers every request it read (done or ESHUTDOWN), then closes', async () => {
    const fx = await serveFiles([{ name: '', size: 4 * MiB }]);
    const c = await RawClient.connect(fx.server);
    await go(c);
    const n = 32;
    const reqs = [];
    for (let i = 0; i < n; i++) reqs.push(requestBytes(P.NBD_CMD_WRITE, 0, i, i * 65536, 65536, Buffer.alloc(65536, i + 1)));
    c.write(Buffer.concat(reqs));
    await c.read(16); // the first reply: requests are being served
    const closing = fx.close();
    const ok: number[] = [0];
    for (let i = 1; i < n; i++) {
      const r = await simpleReply(c);
      assert.ok(r.error === 0 || r.error === P.NBD_ESHUTDOWN, `error ${r.error}`);
      if (r.error === 0) ok.push(r.handle);
    }
    assert.equal(await c.closedByServer(), true);
    await closing;
    const node = await openImage(fx.files[0], { format: 'raw', readOnly: true });
    for (const h of ok) {
      const b = Buffer.alloc(65536);
      await node.pread(h * 65536, b);
      assert.ok(b.every((x) => x === h + 1), `write ${h} was answered and is on disk`);
    }
    await node.close();
  });

  test('-e: at the limit a newcomer replaces the oldest client still in its handshake', async () => {
    const fx = await serveFiles([{ name: '' }], { maxClients: 1 });
    try {
      const a = await RawClient.connect(fx.server);
      await a.read(18);
      const b = await RawClient.connect(fx.server);
      assert.equal(await a.closedByServer(), true, 'the idle handshaking client was not evicted');
      const { size } = await go(b);
      assert.ok(size > 0);
      b.destroy();
    } finally {
      await fx.close();
    }
  });

  test('-e: clients past the handshake are never evicted; newcomers are refused', async () => {
    const fx = await serveFiles([{ name: '' }], { maxClients: 1 });
    try {
      const a = await RawClient.connect(fx.server);
      await go(a);
      const b = await RawClient.connect(fx.server);
      assert.equal(await b.closedByServer(), true);
      assert.equal(b.buffered, 0);
      a.destroy();
    } finally {
      await fx.close();
    }
  });
});

// ---- TLS ----------------------------------------------------------------------------------------

describe('TLS required (x509)', () => {
  let certDir: string;
  let fx: Fixture | null = null;

  before(() => {
    certDir = path.join(dir, 'pki');
  });
  after(async () => {
    await fx?.close();
  });

  function makePki(): void {
    fs.mkdirSync(path.join(certDir, 'server'), { recursive: true });
    const o = (args: string[]) => runOk('openssl', args, { cwd: certDir });
    o(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', 'ca-key.pem',
      '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=vdisk test CA']);
    for (const who of ['server', 'client']) {
      o(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', `${who}-key.pem`,
        '-out', `${who}.csr`, '-subj', `/CN=${who === 'server' ? 'localhost' : 'client'}`]);
      fs.writeFileSync(path.join(certDir, `${who}.ext`), who === 'server'
        ? 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' : 'extendedKeyUsage=clientAuth\n');
      o(['x509', '-req', '-in', `${who}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial',
        '-out', `${who}-cert.pem`, '-days', '2', '-extfile', `${who}.ext`]);
    }
    for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) {
      fs.copyFileSync(path.join(certDir, f), path.join(certDir, 'server', f));
    }
  }

  async function startTls(c: RawClient, withClientCert: boolean): Promise<RawClient> {
    c.write(optionBytes(P.NBD_OPT_STARTTLS));
    assert.equal((await readOptReply(c)).type, P.NBD_REP_ACK);
    c.sock.removeAllListeners('data');
    const secure = tls.connect({
      socket: c.sock as net.Socket,
      servername: 'localhost',
      ca: fs.readFileSync(path.join(certDir, 'ca-cert.pem')),
      ...(withClientCert ? {
        cert: fs.readFileSync(path.join(certDir, 'client-cert.pem')),
        key: fs.readFileSync(path.join(certDir, 'client-key.pem')),
      } : {}),
    });
    const t = new RawClient(secure);
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', reject);
    });
    return t;
  }

  test('options before STARTTLS get ERR_TLS_REQD, state resets at STARTTLS, client certificate demanded', async (t) => {
    if (!needPeers(t, 'openssl')) return;
    makePki();
    const creds = loadX509Credentials(path.join(certDir, 'server'));
    fx = await serveFiles([{ name: 'secret' }], { tls: creds });

    const c = await RawClient.connect(fx.server);
    await greet(c);
    c.write(optionBytes(P.NBD_OPT_STRUCTURED_REPLY));
    assert.equal((await readOptReply(c)).type, P.NBD_REP_ERR_TLS_REQD);
    c.write(optionBytes(P.NBD_OPT_GO, infoData('secret')));
    const refused = await readOptReply(c);
    assert.equal(refused.type, P.NBD_REP_ERR_TLS_REQD, 'no export details before TLS');
    const s = await startTls(c, true);
    // Structured replies asked for before STARTTLS do not carry over.
    s.write(optionBytes(P.NBD_OPT_SET_META_CONTEXT, metaData('secret', ['base:allocation'])));
    assert.equal((await readOptReply(s)).type, P.NBD_REP_ERR_INVALID);
    s.write(optionBytes(P.NBD_OPT_STARTTLS));
    assert.equal((await readOptReply(s)).type, P.NBD_REP_ERR_INVALID, 'second STARTTLS');
    s.write(optionBytes(P.NBD_OPT_GO, infoData('secret')));
    assert.equal((await optReplies(s)).pop()!.type, P.NBD_REP_ACK);
    s.write(requestBytes(P.NBD_CMD_WRITE, 0, 1, 0, 5, Buffer.from('hello')));
    assert.equal((await simpleReply(s)).error, 0);
    s.write(requestBytes(P.NBD_CMD_READ, 0, 2, 0, 5));
    assert.equal((await simpleReply(s, 5)).data.toString(), 'hello');
    s.destroy();

    // EXPORT_NAME cannot be refused politely: the session ends.
    const e = await RawClient.connect(fx.server);
    await greet(e);
    e.write(optionBytes(P.NBD_OPT_EXPORT_NAME, Buffer.from('secret')));
    assert.equal(await e.closedByServer(), true);
    assert.equal(e.buffered, 0);

    // Without a client certificate the TLS handshake fails.
    const n = await RawClient.connect(fx.server);
    await greet(n);
    await assert.rejects(async () => {
      const x = await startTls(n, false);
      x.write(optionBytes(P.NBD_OPT_LIST));
      await readOptReply(x);
    });
  });
});

// ---- the CLI --------------------------------------------------------------------------------------

describe('vdisk serve', () => {
  function startCli(args: string[]): Promise<{ uri: string; exit: Promise<number | null>; kill(sig: NodeJS.Signals): void; line: string }> {
    const child = spawn(process.execPath, [VDISK_BIN, 'serve', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    const exit = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    return new Promise((resolve, reject) => {
      let err = '';
      child.stderr.on('data', (d: Buffer) => {
        err += d.toString();
        const m = /^vdisk serve: listening on (\S+) .*$/m.exec(err);
        if (m) resolve({ uri: m[1], exit, kill: (s) => child.kill(s), line: m[0] });
      });
      exit.then((code) => reject(new Error(`vdisk serve exited ${code}: ${err}`)));
    });
  }

  test('nbdinfo --json sees the export; SIGTERM flushes and exits 0', async (t) => {
    if (!needPeers(t, 'nbdinfo')) return;
    const img = path.join(dir, 'cli.img');
    fs.writeFileSync(img, Buffer.alloc(0));
    fs.truncateSync(img, 3 * MiB);
    const wb = await startCli(['-f', 'raw', '-p', '0', img]);
    assert.match(wb.line, /\(export '', cache=writeback\)/);
    const info = JSON.parse(runOk('nbdinfo', ['--json', wb.uri]));
    const e = info.exports[0];
    assert.equal(e['export-name'], '');
    assert.equal(e['export-size'], 3 * MiB);
    assert.equal(e.can_flush, true);
    assert.equal(e.can_fua, true);
    assert.equal(e.can_multi_conn, true);
    assert.equal(e.is_read_only, false);
    assert.equal(info.structured, true);
    wb.kill('SIGTERM');
    assert.equal(await wb.exit, 0);

    const wt = await startCli(['-f', 'raw', '-p', '0', '-t', 'writethrough', '-r', '-x', 'disk', img]);
    const e2 = JSON.parse(runOk('nbdinfo', ['--json', `${wt.uri}/disk`])).exports[0];
    assert.equal(e2['export-name'], 'disk');
    assert.equal(e2.can_flush, false);
    assert.equal(e2.can_fua, false);
    assert.equal(e2.is_read_only, true);
    wt.kill('SIGINT');
    assert.equal(await wt.exit, 0);
  });
});
