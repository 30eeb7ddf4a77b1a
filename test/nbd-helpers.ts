// Helpers for the NBD tests and benchmark: starting and stopping `vdisk serve` and the peer
// servers (qemu-nbd, nbdkit), NBD URIs, /proc probes, and a tiny raw-socket NBD client that
// speaks exactly what the tests need (fixed newstyle, OPT_GO, simple replies).
//
// The client is deliberately independent of src/nbd: it is written from the spec
// (NetworkBlockDevice/nbd doc/proto.md) so that a misreading in the server is not mirrored.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { VDISK_BIN, prng } from './helpers.js';

// ---------------------------------------------------------------------------------------
// Wire constants (doc/proto.md names)

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const NBD_OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;

export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;

export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;

export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_BLOCK_SIZE = 3;

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_WRITE_ZEROES = 6;

export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;

export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;

export const CACHE_MODES = ['writeback', 'none', 'writethrough', 'directsync', 'unsafe'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];
/** Modes where the client sees a volatile write cache (SEND_FLUSH + SEND_FUA advertised). */
export const WRITEBACK_VISIBLE: Record<CacheMode, boolean> = {
  writeback: true, none: true, unsafe: true, writethrough: false, directsync: false,
};

// ---------------------------------------------------------------------------------------
// Endpoints and URIs

export type Endpoint = { socket: string } | { port: number };

export function isUnix(ep: Endpoint): ep is { socket: string } {
  return 'socket' in ep;
}

/** `-k SOCKET` or `-b 127.0.0.1 -p PORT`: the same spelling for vdisk serve and qemu-nbd. */
export function endpointArgs(ep: Endpoint): string[] {
  return isUnix(ep) ? ['-k', ep.socket] : ['-b', '127.0.0.1', '-p', String(ep.port)];
}

/**
 * A libnbd/qemu URI. `query` is appended as is (already escaped). `user` goes in the
 * authority: libnbd 1.14 takes the TLS PSK username from there (it has no tls-username
 * query parameter and falls back to getlogin_r, which fails without a terminal).
 */
export function nbdUri(ep: Endpoint, exportName = '', opts: { tls?: boolean; query?: string; user?: string } = {}): string {
  const s = opts.tls ? 's' : '';
  const name = encodeURIComponent(exportName);
  const user = opts.user ? `${encodeURIComponent(opts.user)}@` : '';
  if (isUnix(ep)) {
    const q = [`socket=${encodeURIComponent(ep.socket)}`, opts.query].filter(Boolean).join('&');
    return `nbd${s}+unix://${user}/${name}?${q}`;
  }
  return `nbd${s}://${user}127.0.0.1:${ep.port}/${name}${opts.query ? `?${opts.query}` : ''}`;
}

/** A TCP port that was free a moment ago (listen on 0, read it, close). */
export async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', resolve);
  });
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

export function connectRaw(ep: Endpoint): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const sock = isUnix(ep) ? net.connect(ep.socket) : net.connect(ep.port, '127.0.0.1');
    sock.once('connect', () => {
      sock.off('error', reject);
      resolve(sock);
    });
    sock.once('error', reject);
  });
}

async function canConnect(ep: Endpoint): Promise<boolean> {
  if (isUnix(ep) && !fs.existsSync(ep.socket)) return false;
  try {
    const s = await connectRaw(ep);
    s.on('error', () => {});
    s.destroy();
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------
// Server processes

export interface Daemon {
  readonly name: string;
  readonly proc: ChildProcess;
  readonly endpoint: Endpoint;
  /** stdout + stderr so far. */
  output(): string;
  /** pid of the server itself (not of a wrapper such as strace). */
  serverPid(): number;
  /** Resolves once the process has exited. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  hasExited(): boolean;
  /** SIGTERM, then SIGKILL after a grace period; resolves once the process is gone. */
  stop(): Promise<void>;
  /** Send a signal to the server process itself (not the wrapper). */
  signal(sig: NodeJS.Signals): void;
}

const live = new Set<Daemon>();

/** Stop every daemon started by this test file that is still running (use in `after`). */
export async function stopAll(): Promise<void> {
  await Promise.all([...live].map((d) => d.stop()));
}

export interface StartOptions {
  endpoint: Endpoint;
  /** Regex on stdout+stderr that marks readiness; otherwise only the socket is polled. */
  ready?: RegExp;
  /** Poll the endpoint by connecting when `ready` has not matched after this long. */
  probeAfterMs?: number;
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  /** The real server is the wrapper's first child (e.g. strace -f ... node ...). */
  wrapped?: boolean;
}

export async function startDaemon(name: string, cmd: string, args: string[], opts: StartOptions): Promise<Daemon> {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
  let out = '';
  proc.stdout!.setEncoding('utf8').on('data', (s: string) => { out += s; });
  proc.stderr!.setEncoding('utf8').on('data', (s: string) => { out += s; });
  let done = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    proc.once('exit', (code, signal) => {
      done = true;
      resolve({ code, signal });
    });
    proc.once('error', (err) => {
      out += `\nspawn error: ${err.message}`;
      done = true;
      resolve({ code: -1, signal: null });
    });
  });
  let innerPid: number | undefined;
  const serverPid = (): number => {
    if (!opts.wrapped) return proc.pid!;
    if (innerPid !== undefined) return innerPid;
    const children = fs.readFileSync(`/proc/${proc.pid}/task/${proc.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
    if (children.length === 0) throw new Error(`${name}: wrapper has no child yet`);
    innerPid = Number(children[0]);
    return innerPid;
  };
  const d: Daemon = {
    name,
    proc,
    endpoint: opts.endpoint,
    output: () => out,
    serverPid,
    exited,
    hasExited: () => done,
    signal(sig) {
      if (done) return;
      try { process.kill(serverPid(), sig); } catch { /* already gone */ }
    },
    async stop() {
      if (!done) {
        try { process.kill(serverPid(), 'SIGTERM'); } catch { /* gone */ }
        const t = setTimeout(() => {
          try { process.kill(serverPid(), 'SIGKILL'); } catch { /* gone */ }
          try { proc.kill('SIGKILL'); } catch { /* gone */ }
        }, 5000);
        await exited;
        clearTimeout(t);
      }
      live.delete(d);
    },
  };
  live.add(d);

  const deadline = Date.now() + (opts.timeoutMs ?? 20_000);
  const probeAt = Date.now() + (opts.ready ? opts.probeAfterMs ?? 1500 : 0);
  for (;;) {
    if (opts.ready?.test(out)) break;
    if (done) {
      live.delete(d);
      throw new Error(`${name} exited before it was ready: ${out.trim()}`);
    }
    if (Date.now() >= probeAt && (await canConnect(opts.endpoint))) break;
    if (Date.now() > deadline) {
      await d.stop();
      throw new Error(`${name} not ready after ${opts.timeoutMs ?? 20_000} ms: ${out.trim()}`);
    }
    await sleep(50);
  }
  if (opts.wrapped) {
    // Resolve the child now, while the wrapper certainly has it.
    for (let i = 0; i < 100; i++) {
      try { serverPid(); break; } catch { await sleep(20); }
    }
  }
  return d;
}

/** `vdisk serve ARGS... -k/-p ENDPOINT` (endpoint args are added here). */
export function startVdisk(args: string[], endpoint: Endpoint, opts: { wrap?: string[]; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<Daemon> {
  const full = [VDISK_BIN, 'serve', ...endpointArgs(endpoint), ...args];
  const [cmd, cmdArgs] = opts.wrap ? [opts.wrap[0], [...opts.wrap.slice(1), process.execPath, ...full]] : [process.execPath, full];
  return startDaemon('vdisk serve', cmd, cmdArgs, {
    endpoint, ready: /listening on/, wrapped: opts.wrap !== undefined, env: opts.env, timeoutMs: opts.timeoutMs,
  });
}

/** qemu-nbd -t -e N (it serves one client and exits by default). */
export function startQemuNbd(file: string, endpoint: Endpoint, extra: string[] = []): Promise<Daemon> {
  return startDaemon('qemu-nbd', 'qemu-nbd', ['-t', '-e', '16', '-f', 'raw', ...endpointArgs(endpoint), ...extra, file], { endpoint });
}

/** nbdkit's file plugin, in the foreground. */
export function startNbdkit(file: string, endpoint: Endpoint, extra: string[] = []): Promise<Daemon> {
  const ep = isUnix(endpoint) ? ['-U', endpoint.socket] : ['-i', '127.0.0.1', '-p', String(endpoint.port)];
  return startDaemon('nbdkit', 'nbdkit', ['-f', '--exit-with-parent', ...ep, ...extra, 'file', file], { endpoint });
}

// ---------------------------------------------------------------------------------------
// /proc probes

export function procStatus(pid: number): { rssKiB: number; hwmKiB: number } {
  const text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name: string): number => Number(/\s(\d+) kB/.exec(text.split('\n').find((l) => l.startsWith(name + ':')) ?? '')?.[1] ?? NaN);
  return { rssKiB: field('VmRSS'), hwmKiB: field('VmHWM') };
}

export function fdCount(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

/** Poll until `fn` returns true or the time is up; returns the last result. */
export async function waitFor(fn: () => boolean, ms: number, stepMs = 50): Promise<boolean> {
  const end = Date.now() + ms;
  for (;;) {
    if (fn()) return true;
    if (Date.now() > end) return false;
    await sleep(stepMs);
  }
}

// ---------------------------------------------------------------------------------------
// Images

/** Deterministic pseudo-random bytes. */
export function patternBytes(len: number, seed: number): Buffer {
  const r = prng(seed);
  const b = Buffer.alloc(len);
  for (let i = 0; i + 4 <= len; i += 4) b.writeUInt32LE((r() * 0x100000000) >>> 0, i);
  for (let i = len & ~3; i < len; i++) b[i] = (r() * 256) | 0;
  return b;
}

/** A file of `size` bytes: sparse, or filled with one byte value. */
export function makeImage(file: string, size: number, fill?: number): void {
  fs.writeFileSync(file, '');
  if (fill === undefined) {
    fs.truncateSync(file, size);
    return;
  }
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(Math.min(size, 1 << 20), fill);
  for (let off = 0; off < size; off += chunk.length) fs.writeSync(fd, chunk, 0, Math.min(chunk.length, size - off), off);
  fs.closeSync(fd);
}

export function readRange(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    const n = fs.readSync(fd, b, 0, length, offset);
    return b.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

// ---------------------------------------------------------------------------------------
// Byte-level encoders (also used to build streams that are cut at every offset)

export function u16(v: number): Buffer { const b = Buffer.alloc(2); b.writeUInt16BE(v); return b; }
export function u32(v: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32BE(v >>> 0); return b; }
export function u64(v: bigint | number): Buffer { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(v)); return b; }

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): Buffer {
  return Buffer.concat([u64(IHAVEOPT), u32(option), u32(declaredLength), data]);
}

/** NBD_OPT_GO / NBD_OPT_INFO payload: name, then the information requests. */
export function goPayload(name: string, infos: number[] = [], nameLength?: number): Buffer {
  const n = Buffer.from(name, 'utf8');
  return Buffer.concat([u32(nameLength ?? n.length), n, u16(infos.length), ...infos.map(u16)]);
}

export function encodeRequest(type: number, o: { flags?: number; handle?: bigint; offset?: bigint | number; length?: number; data?: Buffer } = {}): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  h.writeUInt16BE(o.flags ?? 0, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(o.handle ?? 1n, 8);
  h.writeBigUInt64BE(BigInt(o.offset ?? 0), 16);
  h.writeUInt32BE(o.length ?? o.data?.length ?? 0, 24);
  return o.data ? Buffer.concat([h, o.data]) : h;
}

// ---------------------------------------------------------------------------------------
// The mini client

export interface OptionReply { option: number; type: number; data: Buffer }
export interface SimpleReply { error: number; handle: bigint; data?: Buffer }
export interface ExportInfo { size: bigint; flags: number; blockSize?: { min: number; preferred: number; max: number } }

export class NbdError extends Error {}

export class NbdClient {
  readonly sock: net.Socket;
  private chunks: Buffer[] = [];
  private avail = 0;
  private waiter?: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void };
  private closedFlag = false;
  private closedPromise: Promise<void>;
  private nextHandle = 1n;
  handshakeFlags = 0;

  private constructor(sock: net.Socket) {
    this.sock = sock;
    sock.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.avail += b.length;
      this.pump();
    });
    sock.on('error', () => { /* surfaced as close */ });
    this.closedPromise = new Promise((resolve) => {
      sock.once('close', () => {
        this.closedFlag = true;
        if (this.waiter && this.avail < this.waiter.n) {
          const w = this.waiter;
          this.waiter = undefined;
          w.reject(new NbdError(`connection closed by server (wanted ${w.n} bytes, had ${this.avail})`));
        }
        resolve();
      });
    });
  }

  static async connect(ep: Endpoint): Promise<NbdClient> {
    return new NbdClient(await connectRaw(ep));
  }

  get closed(): boolean { return this.closedFlag; }

  private take(n: number): Buffer {
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.avail = rest.length;
    return Buffer.from(out);
  }

  private pump(): void {
    if (this.waiter && this.avail >= this.waiter.n) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve(this.take(w.n));
    }
  }

  /** Exactly n bytes; rejects if the server closes first or after `timeoutMs`. */
  read(n: number, timeoutMs = 15_000): Promise<Buffer> {
    if (this.avail >= n) return Promise.resolve(this.take(n));
    if (this.closedFlag) return Promise.reject(new NbdError(`connection closed by server (wanted ${n} bytes, had ${this.avail})`));
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.waiter = undefined;
        reject(new NbdError(`timed out waiting for ${n} bytes`));
      }, timeoutMs);
      this.waiter = {
        n,
        resolve: (b) => { clearTimeout(t); resolve(b); },
        reject: (e) => { clearTimeout(t); reject(e); },
      };
    });
  }

  write(b: Buffer): boolean {
    if (this.sock.destroyed) return false;
    return this.sock.write(b);
  }

  /** True when the server closed the connection within `ms`. */
  async waitClosed(ms: number): Promise<boolean> {
    if (this.closedFlag) return true;
    let t: NodeJS.Timeout | undefined;
    const r = await Promise.race([
      this.closedPromise.then(() => true),
      new Promise<boolean>((resolve) => { t = setTimeout(() => resolve(false), ms); }),
    ]);
    clearTimeout(t);
    return r;
  }

  destroy(): void {
    this.sock.destroy();
  }

  // -- handshake --------------------------------------------------------------------

  async greeting(): Promise<number> {
    const b = await this.read(18);
    if (b.readBigUInt64BE(0) !== NBDMAGIC || b.readBigUInt64BE(8) !== IHAVEOPT) {
      throw new NbdError(`not a fixed-newstyle greeting: ${b.toString('hex')}`);
    }
    this.handshakeFlags = b.readUInt16BE(16);
    return this.handshakeFlags;
  }

  sendClientFlags(flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES): void {
    this.write(u32(flags));
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    this.write(encodeOption(option, data));
  }

  async readOptionReply(timeoutMs?: number): Promise<OptionReply> {
    const h = await this.read(20, timeoutMs);
    if (h.readBigUInt64BE(0) !== NBD_OPT_REPLY_MAGIC) throw new NbdError(`bad option reply magic: ${h.toString('hex')}`);
    const len = h.readUInt32BE(16);
    const data = len ? await this.read(len, timeoutMs) : Buffer.alloc(0);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
  }

  /** NBD_OPT_GO; resolves with the export info, or rejects with the error reply type. */
  async go(name = '', infos: number[] = [NBD_INFO_BLOCK_SIZE]): Promise<ExportInfo> {
    this.sendOption(NBD_OPT_GO, goPayload(name, infos));
    const info: Partial<ExportInfo> = {};
    for (;;) {
      const r = await this.readOptionReply();
      if (r.type === NBD_REP_INFO) {
        const t = r.data.readUInt16BE(0);
        if (t === NBD_INFO_EXPORT) {
          info.size = r.data.readBigUInt64BE(2);
          info.flags = r.data.readUInt16BE(10);
        } else if (t === NBD_INFO_BLOCK_SIZE) {
          info.blockSize = { min: r.data.readUInt32BE(2), preferred: r.data.readUInt32BE(6), max: r.data.readUInt32BE(10) };
        }
      } else if (r.type === NBD_REP_ACK) {
        if (info.size === undefined) throw new NbdError('NBD_OPT_GO acknowledged without NBD_INFO_EXPORT');
        return info as ExportInfo;
      } else if (r.type & NBD_REP_FLAG_ERROR) {
        throw new NbdError(`NBD_OPT_GO failed: reply type 0x${r.type.toString(16)} ${r.data.toString('utf8')}`);
      }
    }
  }

  /** Greeting, client flags, NBD_OPT_GO. */
  async handshake(name = ''): Promise<ExportInfo> {
    await this.greeting();
    this.sendClientFlags();
    return this.go(name);
  }

  // -- transmission ---------------------------------------------------------------------

  /** One request, one simple reply (no structured replies are ever negotiated here). */
  async request(type: number, o: { flags?: number; offset?: bigint | number; length?: number; data?: Buffer; timeoutMs?: number } = {}): Promise<SimpleReply> {
    const handle = this.nextHandle++;
    const length = o.length ?? o.data?.length ?? 0;
    this.write(encodeRequest(type, { ...o, handle, length }));
    const h = await this.read(16, o.timeoutMs);
    if (h.readUInt32BE(0) !== NBD_SIMPLE_REPLY_MAGIC) throw new NbdError(`bad simple reply magic: ${h.toString('hex')}`);
    const reply: SimpleReply = { error: h.readUInt32BE(4), handle: h.readBigUInt64BE(8) };
    if (reply.handle !== handle) throw new NbdError(`reply handle ${reply.handle} for request ${handle}`);
    if (type === NBD_CMD_READ && reply.error === 0) reply.data = await this.read(length, o.timeoutMs);
    return reply;
  }

  /**
   * Send every write before reading any reply (the server may answer in any order), then
   * collect the replies; throws unless every write succeeded.
   */
  async pipelineWrites(writes: { offset: number | bigint; data: Buffer; flags?: number }[]): Promise<void> {
    const pending = new Set<bigint>();
    for (const w of writes) {
      const handle = this.nextHandle++;
      pending.add(handle);
      this.write(encodeRequest(NBD_CMD_WRITE, { handle, offset: w.offset, data: w.data, flags: w.flags }));
    }
    while (pending.size) {
      const h = await this.read(16);
      if (h.readUInt32BE(0) !== NBD_SIMPLE_REPLY_MAGIC) throw new NbdError(`bad simple reply magic: ${h.toString('hex')}`);
      const handle = h.readBigUInt64BE(8);
      if (!pending.delete(handle)) throw new NbdError(`reply for unknown handle ${handle}`);
      if (h.readUInt32BE(4)) throw new NbdError(`pipelined WRITE ${handle} failed: error ${h.readUInt32BE(4)}`);
    }
  }

  /** Set the handle of the next request (to find it again in an strace log). */
  setNextHandle(h: bigint): void { this.nextHandle = h; }

  async pread(offset: number | bigint, length: number): Promise<Buffer> {
    const r = await this.request(NBD_CMD_READ, { offset, length });
    if (r.error) throw new NbdError(`READ failed: error ${r.error}`);
    return r.data!;
  }

  async pwrite(offset: number | bigint, data: Buffer, flags = 0): Promise<void> {
    const r = await this.request(NBD_CMD_WRITE, { offset, data, flags });
    if (r.error) throw new NbdError(`WRITE failed: error ${r.error}`);
  }

  async flush(): Promise<void> {
    const r = await this.request(NBD_CMD_FLUSH);
    if (r.error) throw new NbdError(`FLUSH failed: error ${r.error}`);
  }

  /** NBD_CMD_DISC, then close our side. */
  async disconnect(): Promise<void> {
    if (!this.sock.destroyed) this.write(encodeRequest(NBD_CMD_DISC, { handle: 0xd15cn }));
    this.sock.end();
    await this.waitClosed(5000);
    this.sock.destroy();
  }
}

/** Connect, handshake, run `fn`, disconnect. */
export async function withClient<T>(ep: Endpoint, fn: (c: NbdClient, info: ExportInfo) => Promise<T>, name = ''): Promise<T> {
  const c = await NbdClient.connect(ep);
  try {
    const info = await c.handshake(name);
    return await fn(c, info);
  } finally {
    await c.disconnect().catch(() => c.destroy());
  }
}

// ---------------------------------------------------------------------------------------
// Running peers without blocking the event loop (a blocked loop would stop draining the
// servers' stdout pipes and stall the mini client's sockets).

export interface PeerResult { status: number; stdout: string; stderr: string; signal: NodeJS.Signals | null }

export function runPeer(cmd: string, args: string[], opts: { timeoutMs?: number; input?: Buffer | string; env?: NodeJS.ProcessEnv } = {}): Promise<PeerResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env });
    let stdout = '';
    let stderr = '';
    p.stdout.setEncoding('utf8').on('data', (s: string) => { stdout += s; });
    p.stderr.setEncoding('utf8').on('data', (s: string) => { stderr += s; });
    const t = setTimeout(() => p.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    p.once('error', (e) => { clearTimeout(t); reject(e); });
    p.once('close', (code, signal) => {
      clearTimeout(t);
      resolve({ status: code ?? -1, stdout, stderr, signal });
    });
    p.stdin.on('error', () => {});
    p.stdin.end(opts.input);
  });
}

/** Run a peer that must succeed; throws with its output otherwise. */
export async function peerOk(cmd: string, args: string[], opts: { timeoutMs?: number; input?: Buffer | string } = {}): Promise<string> {
  const r = await runPeer(cmd, args, opts);
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}${r.signal ? ` (${r.signal})` : ''}: ${(r.stderr + r.stdout).trim().slice(0, 2000)}`);
  }
  return r.stdout;
}

/** nbdinfo --json URI, parsed; the first export. */
export async function nbdinfoJson(uri: string, extra: string[] = []): Promise<Record<string, unknown>> {
  const out = await peerOk('nbdinfo', ['--json', ...extra, uri], { timeoutMs: 30_000 });
  const j = JSON.parse(out) as { exports: Record<string, unknown>[] };
  return { ...j, ...j.exports[0] };
}

// ---------------------------------------------------------------------------------------
// TLS material, made with openssl the way libnbd's and nbdkit's test suites make theirs:
// a CA, a server certificate for localhost/127.0.0.1, client certificates. The directory
// layout is QEMU's tls-creds-x509 (ca-cert.pem, server-cert.pem, server-key.pem) and
// libnbd's tls-certificates (ca-cert.pem, client-cert.pem, client-key.pem).

export interface Pki {
  /** Server side: ca-cert.pem, server-cert.pem, server-key.pem. */
  serverDir: string;
  /** Client side, signed by the same CA: ca-cert.pem, client-cert.pem, client-key.pem. */
  clientDir: string;
  /** Only the CA: a client that verifies the server but offers no certificate. */
  caOnlyDir: string;
  /** A client certificate signed by another CA (plus the right ca-cert.pem). */
  strangerDir: string;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  const r = await new Promise<PeerResult>((resolve, reject) => {
    const p = spawn('openssl', args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (b) => { out += b; });
    p.stderr.on('data', (b) => { out += b; });
    p.once('error', reject);
    p.once('close', (code, signal) => resolve({ status: code ?? -1, stdout: out, stderr: '', signal }));
  });
  if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stdout}`);
}

async function makeCa(dir: string, name: string): Promise<void> {
  await openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', `${name}-key.pem`, '-out', `${name}-cert.pem`, '-days', '30', '-subj', `/CN=${name}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], dir);
}

async function makeLeaf(dir: string, ca: string, name: string, cn: string, ext: string): Promise<void> {
  fs.writeFileSync(`${dir}/${name}.ext`, ext);
  await openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`], dir);
  await openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}-cert.pem`, '-CAkey', `${ca}-key.pem`,
    '-CAcreateserial', '-out', `${name}-cert.pem`, '-days', '30', '-extfile', `${name}.ext`], dir);
}

export async function makePki(root: string): Promise<Pki> {
  const work = `${root}/pki-work`;
  fs.mkdirSync(work, { recursive: true });
  await makeCa(work, 'ca');
  await makeCa(work, 'otherca');
  const leaf = (usage: string, san = ''): string =>
    `basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=${usage}\n${san}`;
  await makeLeaf(work, 'ca', 'server', 'localhost', leaf('serverAuth', 'subjectAltName=DNS:localhost,IP:127.0.0.1\n'));
  await makeLeaf(work, 'ca', 'client', 'vdisk-test-client', leaf('clientAuth'));
  await makeLeaf(work, 'otherca', 'stranger', 'vdisk-test-stranger', leaf('clientAuth'));
  const dirOf = (name: string, files: Record<string, string>): string => {
    const d = `${root}/${name}`;
    fs.mkdirSync(d, { recursive: true });
    for (const [to, from] of Object.entries(files)) fs.copyFileSync(`${work}/${from}`, `${d}/${to}`);
    return d;
  };
  return {
    serverDir: dirOf('pki-server', { 'ca-cert.pem': 'ca-cert.pem', 'server-cert.pem': 'server-cert.pem', 'server-key.pem': 'server-key.pem' }),
    clientDir: dirOf('pki-client', { 'ca-cert.pem': 'ca-cert.pem', 'client-cert.pem': 'client-cert.pem', 'client-key.pem': 'client-key.pem' }),
    caOnlyDir: dirOf('pki-ca-only', { 'ca-cert.pem': 'ca-cert.pem' }),
    strangerDir: dirOf('pki-stranger', { 'ca-cert.pem': 'ca-cert.pem', 'client-cert.pem': 'stranger-cert.pem', 'client-key.pem': 'stranger-key.pem' }),
  };
}

/** A PSK file in the `username:hexkey` format of nbdkit, qemu and GnuTLS's psktool. */
export function makePskFile(file: string, user: string, key: Buffer): void {
  fs.writeFileSync(file, `${user}:${key.toString('hex')}\n`, { mode: 0o600 });
}
