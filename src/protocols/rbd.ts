// rbd protocol (QEMU's block/rbd.c): images on a Ceph cluster, through librbd, by way of the
// vdisk_rbd addon (native/vdisk_rbd.c, built only where librbd-dev is installed).
//
// Data path: librbd's asynchronous calls. The addon queues each request and returns; librbd
// signals completion on its own thread, which only posts (id, result) to an eventfd that the
// event loop polls; RbdCompletions below settles the promise. The loop never waits for the
// cluster. Everything librbd offers only synchronously (connect, open, stat, resize,
// rbd_diff_iterate2, snapshots, locks) runs on the libuv thread pool.
//
// Cache mode (QEMU's qemu_rbd_connect): cache.direct=on (none, directsync) sets
// rbd_cache=false, every other mode rbd_cache=true, after ceph.conf and the key=value
// pairs, so the mode wins over both. Writethrough and directsync stay correct because the
// backend adds FUA to every write, and FUA here is the write followed by rbd_aio_flush
// (caps.fua 'emulate': BlockNode does it once, centrally). Per-pool or per-image overrides
// (`rbd config image set`) still apply inside librbd; `vdisk info` shows what is in effect.
//
// Block status (QEMU's qemu_rbd_co_block_status): rbd_diff_iterate2 from the image's
// creation, whole objects, parent included. With fast-diff it answers from the object map;
// without it librbd lists each object, which is slower but still finds the holes (qemu-img
// reports everything as data there). Unallocated objects read as zeros.
//
// Exclusive lock: a client that died keeps its lock until its watch times out on the OSD
// (osd_client_watch_timeout, 30 s by default), and librbd makes the next writer wait that
// long. On a writable open we ask every watcher of the header to answer (an empty notify:
// librbd's legacy "header changed", harmless). When the lock's owner does not answer within
// LOCK_PROBE_MS it is dead (or hung past recovery): we break its lock, which blocklists it,
// as `rbd lock rm` would. A live owner is left alone; librbd hands the lock over on demand.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import util from 'node:util';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import {
  REQ_MAY_UNMAP, type BlockDriver, type BlockLimits, type DriverCaps, type DriverInfo, type Extent, type Preallocation,
} from '../block/driver.js';
import { BlockNode } from '../block/node.js';
import { VdiskError, fromSystemError, invalidArgument, readOnly as readOnlyError, unsupported } from '../block/errors.js';
import { formatSize, parseSize } from '../block/size.js';
import { monHostString, parseRbdFilename, rbdDisplayName, type RbdOptions } from './rbd-options.js';

export { isRbdFilename, parseRbdFilename, rbdOptionsFromBlockdev, type RbdOptions } from './rbd-options.js';

// ---- the addon ---------------------------------------------------------------------------

type Handle = object;

interface ImageStat {
  size: number;
  objectSize: number;
  order: number;
  features: number;
  flags: number;
  stripeUnit: number;
  stripeCount: number;
  id: string;
  hasParent: boolean;
}

interface ConnectParams {
  pool: string;
  namespace: string;
  image: string;
  snapshot?: string;
  user?: string;
  conf: string;
  monHost?: string;
  key?: string;
  authClientRequired?: string;
  defaults: Array<[string, string]>;
  keypairs: Array<[string, string]>;
  cache?: boolean;
  readOnly?: boolean;
  size?: number;
  order?: number;
}

interface RbdAddon {
  setup(results: Float64Array, onDone: (count: number) => void): number;
  open(p: ConnectParams): Promise<ImageStat & { handle: Handle }>;
  create(p: ConnectParams): Promise<void>;
  close(h: Handle): Promise<void>;
  stat(h: Handle): Promise<ImageStat>;
  diff(h: Handle, offset: number, length: number, maxExtents: number): Promise<{ extents: number[]; truncated: boolean }>;
  resize(h: Handle, size: number): Promise<void>;
  snapList(h: Handle): Promise<Array<{ id: number; name: string; size: number; timestamp: number }>>;
  snapCreate(h: Handle, name: string): Promise<void>;
  snapRemove(h: Handle, name: string): Promise<void>;
  snapRollback(h: Handle, name: string): Promise<void>;
  lockOwners(h: Handle): Promise<string[]>;
  lockBreak(h: Handle, owner: string): Promise<void>;
  watchers(h: Handle): Promise<Array<{ addr: string; id: number }>>;
  notifyHeader(h: Handle, timeoutMs: number): Promise<{ acked: number[]; timedOut: number[] }>;
  configList(h: Handle): Promise<Array<{ name: string; value: string; source: string }>>;
  aioRead(h: Handle, buf: Buffer, offset: number, id: number): number;
  aioWrite(h: Handle, buf: Buffer, offset: number, id: number): number;
  aioDiscard(h: Handle, offset: number, length: number, id: number): number;
  aioWriteZeroes(h: Handle, offset: number, length: number, zeroFlags: number, id: number): number;
  aioFlush(h: Handle, id: number): number;
  version(): string;
  readonly FEATURE_EXCLUSIVE_LOCK: number;
  readonly FEATURE_FAST_DIFF: number;
  readonly FEATURE_STRIPINGV2: number;
  readonly FLAG_FAST_DIFF_INVALID: number;
  readonly WRITE_ZEROES_FLAG_THICK_PROVISION: number;
}

/** VDISK_RBD_ADDON names another build of the addon (tests point it at nothing to see the fallback). */
const ADDON_PATH = process.env.VDISK_RBD_ADDON
  ?? path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'build', 'Release', 'vdisk_rbd.node');
/** The one line shown when the driver cannot work, naming the package that fixes it. */
const NOT_BUILT = 'vdisk was built without librbd (apt-get install librbd-dev, then npm install)';

function loadAddon(): { api: RbdAddon | null; status: string } {
  if (!fs.existsSync(ADDON_PATH)) return { api: null, status: NOT_BUILT };
  try {
    return { api: createRequire(import.meta.url)(ADDON_PATH) as RbdAddon, status: 'loaded' };
  } catch (err) {
    const first = (err as Error).message.split('\n')[0];
    if (/librbd|librados/.test(first)) return { api: null, status: `librbd cannot be loaded (apt-get install librbd1): ${first}` };
    return { api: null, status: `the rbd addon cannot be loaded: ${first}` };
  }
}

let loaded: { api: RbdAddon | null; status: string } | null = null;

function addon(what: string): RbdAddon {
  loaded ??= loadAddon();
  if (!loaded.api) throw new VdiskError('ENOTSUP', 'unsupported-feature', `${what}: the rbd driver is not available: ${loaded.status}`);
  return loaded.api;
}

/** "loaded", or why the rbd driver is unavailable (for `info` and tests). */
export function rbdStatus(): string {
  loaded ??= loadAddon();
  return loaded.status;
}

const SYSTEM_ERRORS = util.getSystemErrorMap();

/** A librbd -errno as the Error shape fromSystemError understands (code = errno name). */
function errnoError(r: number): NodeJS.ErrnoException {
  const [code, text] = SYSTEM_ERRORS.get(r) ?? ['EIO', `error ${-r}`];
  return Object.assign(new Error(text.charAt(0).toUpperCase() + text.slice(1)), { code, errno: r });
}

// ---- completions -----------------------------------------------------------------------

/** Ids the addon accepts (its CQ_CAP); more requests wait here for a free one. */
const MAX_IN_FLIGHT = 1024;

/**
 * Settles aio requests from the addon's completion callback. One per process: the addon has
 * a single eventfd-driven queue for every open image. A request's promise resolves with
 * librbd's return value (bytes for reads, 0 otherwise) or a negative errno; the driver turns
 * errors into VdiskErrors that say what failed.
 */
class RbdCompletions {
  private readonly results = new Float64Array(2 * 256);
  private readonly waiting: Array<{ resolve: (r: number) => void; keep: Buffer | null } | undefined> = [];
  private readonly freeIds: number[] = [];
  private nextId = 0;
  private readonly queue: Array<() => void> = [];

  constructor(api: RbdAddon) {
    const r = api.setup(this.results, (count) => this.done(count));
    if (r < 0 && r !== -os.constants.errno.EEXIST) throw fromSystemError(errnoError(r), 'rbd: completion queue');
  }

  /** Runs `start(id)` (an aio call returning 0 or -errno) when an id is free. */
  run(start: (id: number) => number, keep: Buffer | null): Promise<number> {
    return new Promise((resolve) => {
      const go = () => {
        const id = this.freeIds.pop() ?? this.nextId++;
        const r = start(id);
        if (r < 0) {
          this.release(id);
          resolve(r);
          return;
        }
        // The Buffer stays referenced here until librbd is done with its memory.
        this.waiting[id] = { resolve, keep };
      };
      if (this.freeIds.length > 0 || this.nextId < MAX_IN_FLIGHT) go();
      else this.queue.push(go);
    });
  }

  private release(id: number): void {
    this.waiting[id] = undefined;
    this.freeIds.push(id);
    const next = this.queue.shift();
    if (next) next();
  }

  private done(count: number): void {
    for (let i = 0; i < count; i++) {
      const id = this.results[2 * i];
      const res = this.results[2 * i + 1];
      const w = this.waiting[id];
      this.release(id);
      w?.resolve(res);
    }
  }
}

let completions: RbdCompletions | null = null;

// ---- connecting --------------------------------------------------------------------------

/** vdisk's defaults, set before ceph.conf is read (the file and the key=value pairs win). */
export const CONNECT_TIMEOUT_SECONDS = 20;
const CLIENT_DEFAULTS: Array<[string, string]> = [
  // librados logs to stderr by default; vdisk prints one line per error itself
  ['log_to_stderr', 'false'],
  ['err_to_stderr', 'false'],
  // an unreachable monitor fails rados_connect after this long instead of 300 s
  ['client_mount_timeout', String(CONNECT_TIMEOUT_SECONDS)],
];
/** How long a lock owner may take to answer before it counts as dead. */
export const LOCK_PROBE_MS = 5000;
const MAX_TRANSFER = 64 << 20;
const MAX_STATUS_EXTENTS = 1024;

export interface RbdOpenOptions {
  readOnly: boolean;
  /** cache.direct: on sets rbd_cache=false (QEMU's BDRV_O_NOCACHE). */
  direct: boolean;
  noFlush: boolean;
  /** Resolves key-secret (a secret object's id) to the base64 cephx key. */
  resolveSecret?: (id: string) => string;
}

/** librados's own search list when no conf= is given (CEPH_CONF, then the usual places). */
function defaultConfPaths(): string[] {
  const list = process.env.CEPH_CONF ? process.env.CEPH_CONF.split(/[,;\s]+/).filter(Boolean) : [];
  return [...list, '/etc/ceph/ceph.conf', path.join(os.homedir(), '.ceph', 'ceph.conf'), 'ceph.conf'];
}

const MON_HOST_KEYS = new Set(['mon_host', 'mon_addr']);

function connectParams(o: RbdOptions, name: string, resolveSecret?: (id: string) => string): ConnectParams {
  let conf = o.conf;
  const monInPairs = o.keyvaluePairs.some(([k]) => MON_HOST_KEYS.has(k.replace(/[ -]/g, '_')));
  if (conf === undefined) {
    conf = defaultConfPaths().find((p) => fs.existsSync(p));
    if (conf === undefined) {
      // librados would print its search to stderr and fail without a monitor to ask.
      if (!o.server && !monInPairs) {
        throw new VdiskError('ENOENT', 'not-found',
          `${name}: no Ceph configuration found (set CEPH_CONF, or give conf=FILE or mon_host=ADDR); looked for ${defaultConfPaths().join(', ')}`);
      }
      conf = '/dev/null';
    }
  }
  let key: string | undefined;
  if (o.keySecret !== undefined) {
    if (!resolveSecret) throw invalidArgument(`${name}: No secret with id '${o.keySecret}'`);
    key = resolveSecret(o.keySecret);
  }
  return {
    pool: o.pool,
    namespace: o.namespace,
    image: o.image,
    snapshot: o.snapshot,
    user: o.user,
    conf,
    monHost: o.server ? monHostString(o.server) : undefined,
    key,
    authClientRequired: o.authClientRequired?.join(';'),
    defaults: CLIENT_DEFAULTS,
    keypairs: o.keyvaluePairs,
  };
}

/** The addon's failure (err.stage says which step) as one line in QEMU's words. */
function connectError(err: unknown, name: string, p: ConnectParams): VdiskError {
  const e = err as NodeJS.ErrnoException & { stage?: string; arg?: string };
  if (!e || typeof e.stage !== 'string') return fromSystemError(err, name);
  const what: Record<string, string> = {
    init: 'error initializing',
    conf: `error reading conf file ${p.conf}`,
    option: `invalid conf option ${e.arg ?? ''}`,
    mon_host: `invalid monitor address ${p.monHost ?? ''}`,
    key: "Could not set 'key'",
    auth_client_required: "Could not set 'auth_client_required'",
    connect: 'error connecting',
    pool: `error opening pool ${p.pool}`,
    'namespace-check': 'error checking namespace',
    namespace: `namespace '${p.namespace}' does not exist`,
    open: `error reading header from ${p.image}`,
    stat: `error getting image info from ${p.image}`,
    create: 'error rbd create',
  };
  let hint = '';
  if (e.stage === 'connect' && e.code === 'ETIMEDOUT') {
    hint = ` (no monitor answered within client_mount_timeout; vdisk's default is ${CONNECT_TIMEOUT_SECONDS} s)`;
  } else if (e.stage === 'connect' && (e.code === 'EACCES' || e.code === 'EPERM')) {
    hint = ` (cephx refused user '${p.user ?? 'admin'}': check its key or keyring)`;
  } else if (e.stage === 'open' && e.code === 'ENOENT' && p.snapshot !== undefined) {
    hint = ` (no image '${p.image}', or it has no snapshot '${p.snapshot}')`;
  }
  const text = SYSTEM_ERRORS.get(e.errno ?? -5)?.[1] ?? e.message;
  const msg = `${name}: ${what[e.stage] ?? e.stage}: ${text.charAt(0).toUpperCase()}${text.slice(1)}${hint}`;
  const code = e.stage === 'namespace' ? 'ENOENT' : e.code;
  const mapped = fromSystemError({ code }, name);
  return new VdiskError(mapped.code, mapped.kind, msg, { cause: err });
}

// ---- the driver --------------------------------------------------------------------------

const FEATURE_NAMES = ['layering', 'striping', 'exclusive-lock', 'object-map', 'fast-diff', 'deep-flatten', 'journaling',
  'data-pool', 'operations', 'migrating', 'non-primary', 'dirty-cache'];

export interface RbdSnapshot {
  id: number;
  name: string;
  /** Image size when the snapshot was taken. */
  size: number;
  /** Seconds since the epoch. */
  timestamp: number;
}

export class RbdDriver implements BlockDriver {
  readonly driverName = 'rbd';
  readonly children = {};
  readonly caps: DriverCaps = { fua: 'emulate', writeZeroes: 'native', discard: 'native' };
  private length: number;
  private readonly fixedLimits: BlockLimits;
  private inFlight = 0;
  private idle: Array<() => void> = [];
  /** What happened at open that `info` should mention (a broken lock). */
  readonly openNotes: string[] = [];

  constructor(
    private readonly api: RbdAddon,
    private readonly io: RbdCompletions,
    private readonly handle: Handle,
    private stat: ImageStat,
    readonly name: string,
    readonly location: RbdOptions,
    /** rbd_cache as vdisk set it from the cache mode. */
    readonly cacheOn: boolean,
  ) {
    this.length = stat.size;
    this.fixedLimits = Object.freeze({ requestAlignment: 1, maxTransfer: MAX_TRANSFER, optimalTransfer: stat.objectSize });
  }

  limits(): BlockLimits {
    return this.fixedLimits;
  }

  getLength(): number {
    return this.length;
  }

  get objectSize(): number {
    return this.stat.objectSize;
  }

  /** One aio request; resolves with librbd's result, throws a VdiskError naming `what`. */
  private async aio(start: (id: number) => number, keep: Buffer | null, what: () => string): Promise<number> {
    this.inFlight++;
    try {
      const r = await this.io.run(start, keep);
      if (r < 0) throw fromSystemError(errnoError(r), `${this.name}: ${what()}`);
      return r;
    } finally {
      if (--this.inFlight === 0 && this.idle.length > 0) {
        const waiters = this.idle;
        this.idle = [];
        for (const w of waiters) w();
      }
    }
  }

  /** Work on the thread pool counts as in flight too: close waits for it. */
  private async sync<T>(op: () => Promise<T>, what: string): Promise<T> {
    this.inFlight++;
    try {
      return await op();
    } catch (err) {
      const e = err as { errno?: number };
      throw fromSystemError(typeof e?.errno === 'number' ? errnoError(e.errno) : err, `${this.name}: ${what}`);
    } finally {
      if (--this.inFlight === 0 && this.idle.length > 0) {
        const waiters = this.idle;
        this.idle = [];
        for (const w of waiters) w();
      }
    }
  }

  async pread(offset: number, buf: Buffer): Promise<void> {
    const n = await this.aio((id) => this.api.aioRead(this.handle, buf, offset, id), buf, () => `read at ${offset}`);
    if (n < buf.length) buf.fill(0, n); // QEMU zero-pads short reads
  }

  async pwrite(offset: number, buf: Buffer): Promise<void> {
    await this.aio((id) => this.api.aioWrite(this.handle, buf, offset, id), buf, () => `write at ${offset}`);
  }

  /** rbd_aio_write_zeroes; without MAY_UNMAP the zeros are allocated (QEMU's THICK_PROVISION). */
  async pwriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    const zeroFlags = flags & REQ_MAY_UNMAP ? 0 : this.api.WRITE_ZEROES_FLAG_THICK_PROVISION;
    await this.aio((id) => this.api.aioWriteZeroes(this.handle, offset, length, zeroFlags, id), null,
      () => `write zeroes at ${offset}+${length}`);
  }

  async pdiscard(offset: number, length: number): Promise<void> {
    await this.aio((id) => this.api.aioDiscard(this.handle, offset, length, id), null, () => `discard at ${offset}+${length}`);
  }

  /** rbd_aio_flush: every write completed before it is on the OSDs (and out of librbd's cache). */
  async flushToDisk(): Promise<void> {
    await this.aio((id) => this.api.aioFlush(this.handle, id), null, () => 'flush');
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const end = offset + length;
    const allData = (): Extent[] => [this.extent(offset, length, true)];
    const s = this.stat;
    // Fancy striping spreads an object over the image: object runs are not image runs.
    if (s.features & this.api.FEATURE_STRIPINGV2 && (s.stripeUnit !== s.objectSize || s.stripeCount !== 1)) return allData();
    // Start on an object boundary: librbd before 1.17 misplaced unaligned diff offsets
    // (Ceph tracker 53784, which QEMU works around the same way).
    const start = offset - (offset % s.objectSize);
    let r: { extents: number[]; truncated: boolean };
    try {
      r = await this.sync(() => this.api.diff(this.handle, start, end - start, MAX_STATUS_EXTENTS), 'block status');
    } catch {
      return allData(); // as QEMU: no answer means "data", which is never wrong
    }
    const out: Extent[] = [];
    let pos = offset;
    for (let i = 0; i < r.extents.length; i += 2) {
      const a = Math.max(pos, r.extents[i]);
      const b = Math.min(end, r.extents[i] + r.extents[i + 1]);
      if (b <= a) continue;
      if (a > pos) out.push(this.extent(pos, a - pos, false));
      out.push(this.extent(a, b - a, true));
      pos = b;
    }
    // A truncated walk says nothing past its last extent: stop there, the caller asks again.
    if (pos < end && !(r.truncated && out.length > 0)) out.push(this.extent(pos, end - pos, false));
    return out;
  }

  private extent(offset: number, length: number, data: boolean): Extent {
    return { offset, length, data, zero: !data, allocated: true, hostOffset: offset, hostFile: this.name };
  }

  async truncate(length: number, prealloc: Preallocation): Promise<void> {
    if (prealloc !== 'off') throw unsupported(`${this.name}: Unsupported preallocation mode '${prealloc}'`);
    await this.sync(() => this.api.resize(this.handle, length), `resize to ${length} bytes`);
    this.length = length;
  }

  // ---- snapshots (QEMU's qemu_rbd_snap_*: the name is also the id) -----------------------

  snapshots(): Promise<RbdSnapshot[]> {
    return this.sync(() => this.api.snapList(this.handle), 'list snapshots');
  }

  createSnapshot(name: string): Promise<void> {
    return this.sync(() => this.api.snapCreate(this.handle, name), `create snapshot '${name}'`);
  }

  removeSnapshot(name: string): Promise<void> {
    return this.sync(() => this.api.snapRemove(this.handle, name), `remove snapshot '${name}'`);
  }

  async rollbackSnapshot(name: string): Promise<void> {
    await this.sync(() => this.api.snapRollback(this.handle, name), `roll back to snapshot '${name}'`);
    this.stat = await this.sync(() => this.api.stat(this.handle), 'stat');
    this.length = this.stat.size;
  }

  // ---- exclusive lock ---------------------------------------------------------------------

  /** Break the exclusive lock when its owner does not answer (see the header comment). */
  async breakDeadLockOwner(): Promise<void> {
    if (!(this.stat.features & this.api.FEATURE_EXCLUSIVE_LOCK)) return;
    const owners = await this.sync(() => this.api.lockOwners(this.handle), 'exclusive lock owners');
    if (owners.length === 0) return;
    const watchers = await this.sync(() => this.api.watchers(this.handle), 'watchers');
    const answer = await this.sync(() => this.api.notifyHeader(this.handle, LOCK_PROBE_MS), 'probe lock owner');
    for (const owner of owners) {
      const w = watchers.find((x) => x.addr === owner);
      const dead = !w || (answer.timedOut.includes(w.id) && !answer.acked.includes(w.id));
      if (!dead) continue;
      try {
        await this.api.lockBreak(this.handle, owner);
      } catch (err) {
        const text = SYSTEM_ERRORS.get((err as { errno?: number }).errno ?? -5)?.[1] ?? String(err);
        throw new VdiskError('EBUSY', 'io', `${this.name}: the exclusive lock is held by ${owner}, which does not answer ` +
          `(a client that died?); librbd waits until its watch times out (osd_client_watch_timeout, 30 s by default) ` +
          `and breaking the lock failed: ${text}`, { cause: err });
      }
      this.openNotes.push(`exclusive lock: broke the lock of ${owner}, which did not answer within ${LOCK_PROBE_MS / 1000} s (blocklisted)`);
    }
  }

  // ---- info and close ---------------------------------------------------------------------

  async info(): Promise<DriverInfo> {
    const s = this.stat;
    const features = FEATURE_NAMES.filter((_, i) => s.features & (1 << i)).join(', ') || 'none';
    const loc = this.location;
    const notes = [
      `rbd: pool '${loc.pool}'${loc.namespace ? `, namespace '${loc.namespace}'` : ''}, image '${loc.image}'` +
        `${loc.snapshot !== undefined ? `, snapshot '${loc.snapshot}' (read-only)` : ''}; librbd ${this.api.version()}`,
      `rbd: object size ${formatSize(s.objectSize)}; features ${features}${s.hasParent ? '; a clone (reads fall through to its parent)' : ''}`,
      `rbd: block status ${this.statusSource()}`,
      ...this.openNotes,
    ];
    try {
      const cfg = await this.sync(() => this.api.configList(this.handle), 'config');
      const shown = ['rbd_cache', 'rbd_cache_policy', 'rbd_cache_size', 'rbd_cache_max_dirty', 'rbd_cache_target_dirty',
        'rbd_cache_max_dirty_age', 'rbd_cache_writethrough_until_flush'];
      const parts = shown.map((n) => cfg.find((c) => c.name === n)).filter((c) => c !== undefined)
        .map((c) => `${c.name}=${c.value}${c.source !== 'config' ? ` (${c.source} override)` : ''}`);
      notes.push(`librbd cache in effect: ${parts.join(', ')}; vdisk set rbd_cache=${this.cacheOn} (cache.direct=${this.cacheOn ? 'off' : 'on'})`);
    } catch (err) {
      notes.push(`librbd cache: unknown (${(err as Error).message})`);
    }
    const snaps = loc.snapshot === undefined ? await this.snapshots() : [];
    return {
      clusterSize: s.objectSize,
      // QEMU's qemu_rbd_snap_list: the name is the id, the image size stands in as VM state size
      snapshots: snaps.map((sn) => ({
        icount: 0, 'vm-clock-nsec': 0, name: sn.name, 'date-sec': 0, 'date-nsec': 0, 'vm-clock-sec': 0, id: sn.name,
        'vm-state-size': sn.size,
      })),
      notes,
    };
  }

  private statusSource(): string {
    const s = this.stat;
    if (s.features & this.api.FEATURE_STRIPINGV2 && (s.stripeUnit !== s.objectSize || s.stripeCount !== 1)) {
      return 'all data (fancy striping)';
    }
    if (s.features & this.api.FEATURE_FAST_DIFF && !(s.flags & this.api.FLAG_FAST_DIFF_INVALID)) return 'from the object map (fast-diff)';
    return 'from rbd_diff_iterate2, object by object (no valid fast-diff map)';
  }

  async close(): Promise<void> {
    while (this.inFlight > 0) await new Promise<void>((r) => this.idle.push(r));
    try {
      await this.api.close(this.handle);
    } catch (err) {
      const e = err as { errno?: number };
      throw fromSystemError(typeof e?.errno === 'number' ? errnoError(e.errno) : err, `${this.name}: close`);
    }
  }
}

// ---- open and create ---------------------------------------------------------------------

/** Open an image named by a filename (rbd:...) or by blockdev options (the daemon's --blockdev). */
export async function openRbd(where: string | RbdOptions, o: RbdOpenOptions): Promise<BlockNode> {
  const loc = typeof where === 'string' ? couldNot('open', where, () => parseRbdFilename(where)) : where;
  const name = typeof where === 'string' ? where : rbdDisplayName(loc);
  const api = addon(name);
  if (loc.snapshot !== undefined && !o.readOnly) throw readOnlyError(`Could not open '${name}': rbd snapshots are read-only`);
  const p = couldNot('open', name, () => connectParams(loc, name, o.resolveSecret));
  p.cache = !o.direct;
  p.readOnly = o.readOnly;
  completions ??= new RbdCompletions(api);
  let opened: ImageStat & { handle: Handle };
  try {
    opened = await api.open(p);
  } catch (err) {
    throw couldNot('open', name, () => {
      throw connectError(err, name, p);
    });
  }
  const { handle, ...stat } = opened;
  const driver = new RbdDriver(api, completions, handle, stat, name, loc, p.cache);
  try {
    if (!o.readOnly) await driver.breakDeadLockOwner();
  } catch (err) {
    await driver.close().catch(() => {});
    throw err;
  }
  return new BlockNode(driver, { filename: name, readOnly: o.readOnly, noFlush: o.noFlush });
}

/** `create -o` options the rbd protocol takes (QEMU's qemu_rbd_create_opts). */
export const RBD_CREATE_OPTIONS = ['cluster_size'] as const;

/** Create an image (QEMU's qemu_rbd_do_create): `size` bytes, objects of cluster_size. */
export async function createRbd(where: string | RbdOptions, size: number, options: Record<string, string> = {},
  resolveSecret?: (id: string) => string): Promise<void> {
  const loc = typeof where === 'string' ? couldNot('create', where, () => parseRbdFilename(where)) : where;
  const name = typeof where === 'string' ? where : rbdDisplayName(loc);
  if (loc.snapshot !== undefined) throw invalidArgument(`${name}: Can't use snapshot name for image creation`);
  const api = addon(name);
  const p = couldNot('create', name, () => connectParams(loc, name, resolveSecret));
  p.size = size;
  if (options.cluster_size !== undefined) {
    const objsize = parseSize(options.cluster_size, 'cluster_size');
    if (objsize > 2 ** 30 || (objsize & (objsize - 1)) !== 0) {
      throw invalidArgument(`${name}: obj size needs to be power of 2`);
    }
    if (objsize < 4096) throw invalidArgument(`${name}: obj size too small`);
    p.order = Math.log2(objsize);
  }
  try {
    await api.create(p);
  } catch (err) {
    couldNot('create', name, () => {
      throw connectError(err, name, p);
    });
  }
}

/** Runs `fn`; a VdiskError "NAME: text" it throws becomes "Could not VERB 'NAME': text" (qemu-img's words). */
function couldNot<T>(verb: string, name: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    if (!(err instanceof VdiskError)) throw err;
    const text = err.message.startsWith(`${name}: `) ? err.message.slice(name.length + 2) : err.message;
    throw new VdiskError(err.code, err.kind, `Could not ${verb} '${name}': ${text}`, { cause: err.cause ?? err });
  }
}
