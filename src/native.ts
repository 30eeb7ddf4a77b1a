// The native addon (native/vdisk_native.c, built by `npm install`): fallocate, SEEK_DATA /
// SEEK_HOLE, statx direct-I/O alignment and block-device ioctls, which Node.js 20 lacks.
//
// It is optional. Without it the file driver reports every range as data, writes zeros
// instead of punching holes, reads and writes only through libuv's thread pool, and says so
// in `info` notes. VDISK_NO_NATIVE=1 forces that fallback (tests use it to cover the path);
// VDISK_NO_NOWAIT=1 turns off only the RWF_NOWAIT page-cache fast path, VDISK_NO_URING=1
// only the io_uring that carries O_DIRECT I/O and buffered I/O that missed the fast path.
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export interface DioAlignment {
  /** Required alignment of the memory buffer address. */
  memAlign: number;
  /** Required alignment of file offsets and lengths. */
  offsetAlign: number;
}

export interface NativeApi {
  /** fallocate(2) on the thread pool. Rejects with an Error whose .code is the errno name. */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<void>;
  /** lseek(SEEK_DATA): next data at or after offset; -1 when there is none (ENXIO). */
  seekData(fd: number, offset: number): number;
  /** lseek(SEEK_HOLE): next hole at or after offset (EOF counts as a hole); -1 past EOF. */
  seekHole(fd: number, offset: number): number;
  /** statx(STATX_DIOALIGN); null when the kernel or file system does not say. */
  dioAlignment(fd: number): DioAlignment | null;
  /** ioctl(BLKGETSIZE64): size of a block device in bytes. */
  blockDeviceSize(fd: number): number;
  /** ioctl(BLKSSZGET): logical sector size of a block device. */
  blockDeviceSectorSize(fd: number): number;
  /** ioctl(BLKDISCARD) on the thread pool. */
  blkdiscard(fd: number, offset: number, length: number): Promise<void>;
  /**
   * preadv2(RWF_NOWAIT), synchronous: bytes read (0 at EOF), or -errno: -EAGAIN when the data
   * is not all in the page cache (a short count when part is), -EOPNOTSUPP when the file
   * system cannot do NOWAIT. Never waits for the disk. Absent from addons built before it.
   */
  preadNowait?(fd: number, buf: Buffer, offset: number): number;
  /** pwritev2(RWF_NOWAIT), synchronous, same answers (ext4 and tmpfs say -EOPNOTSUPP). */
  pwriteNowait?(fd: number, buf: Buffer, offset: number): number;
  readonly EAGAIN?: number;
  /** Sets up the process's io_uring: its size, or -errno. Completions go to onDone. */
  uringSetup?(entries: number, results: Int32Array, onDone: (count: number) => void): number;
  /** Queues one read or write of any Buffer (kept alive by the caller): 0, or -errno (-EBUSY when full). */
  uringSubmit?(write: boolean, fd: number, buf: Buffer, offset: number, id: number): number;
  /**
   * One io_uring_enter for everything queued: how many completions it found already done
   * and copied into the results array (older addons: always 0), or -errno (they stay queued).
   */
  uringFlush?(): number;
  readonly FALLOC_FL_KEEP_SIZE: number;
  readonly FALLOC_FL_PUNCH_HOLE: number;
  readonly FALLOC_FL_ZERO_RANGE: number;
}

const ADDON_PATH = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'build', 'Release', 'vdisk_native.node');

function load(): { api: NativeApi | null; status: string } {
  if (process.env.VDISK_NO_NATIVE === '1') return { api: null, status: 'not loaded (VDISK_NO_NATIVE=1)' };
  try {
    const api = createRequire(import.meta.url)(ADDON_PATH) as NativeApi;
    if (typeof api.fallocate !== 'function' || typeof api.seekData !== 'function') {
      return { api: null, status: `not loaded (${ADDON_PATH} is not the vdisk addon)` };
    }
    return { api, status: 'loaded' };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const reason = code === 'MODULE_NOT_FOUND' ? 'not built; run npm install' : (err as Error).message.split('\n')[0];
    return { api: null, status: `not loaded (${reason})` };
  }
}

const loaded = load();

/** The addon, or null when it is not built or disabled. */
export const native: NativeApi | null = loaded.api;
/** "loaded", or "not loaded (<reason>)" for messages and `info`. */
export const nativeStatus: string = loaded.status;

/** The page-cache fast path (preadv2/pwritev2 with RWF_NOWAIT), when loaded and not disabled. */
export interface NowaitApi {
  preadNowait(fd: number, buf: Buffer, offset: number): number;
  pwriteNowait(fd: number, buf: Buffer, offset: number): number;
  readonly EAGAIN: number;
}

function loadNowait(): { api: NowaitApi | null; status: string } {
  const n = loaded.api;
  if (!n) return { api: null, status: `off (addon ${loaded.status})` };
  if (process.env.VDISK_NO_NOWAIT === '1') return { api: null, status: 'off (VDISK_NO_NOWAIT=1)' };
  if (typeof n.preadNowait !== 'function' || typeof n.pwriteNowait !== 'function' || typeof n.EAGAIN !== 'number') {
    return { api: null, status: 'off (addon predates it; run npm install)' };
  }
  return { api: n as NativeApi & NowaitApi, status: 'on' };
}

const loadedNowait = loadNowait();

/** RWF_NOWAIT reads and writes, or null (no addon, an old addon, or VDISK_NO_NOWAIT=1). */
export const nowait: NowaitApi | null = loadedNowait.api;
/** "on", or "off (<reason>)" for `info`. */
export const nowaitStatus: string = loadedNowait.status;


/** Most requests on the ring at once; more wait in the thread pool's queue instead. */
const URING_ENTRIES = 256;

const ERRNO_NAMES = new Map(Object.entries(os.constants.errno).map(([name, n]) => [n, name]));

/**
 * Reads and writes (O_DIRECT, and buffered ones the RWF_NOWAIT fast path did not finish) on
 * one io_uring per process: no thread-pool round trip. Requests
 * are queued, and one system call per tick (process.nextTick, so after every continuation
 * that the last completions woke) starts all of them; a promise settles from the ring's
 * eventfd, polled by the event loop. The caller keeps `buf` alive until then (the promise
 * does). Results are bytes moved; failures reject with an Error whose .code is the errno
 * name, like fs errors.
 */
export class Uring {
  /** (id, result) pairs the addon fills before calling onDone. */
  private readonly results = new Int32Array(4 * URING_ENTRIES);
  private readonly waiting: Array<{ resolve: (n: number) => void; reject: (e: Error) => void; buf: Buffer } | undefined> = [];
  private readonly freeIds: number[] = [];
  private flushScheduled = false;
  /** Requests started on the ring so far (tests). */
  submitted = 0;
  private readonly flush = (): void => {
    this.flushScheduled = false;
    const r = this.api.uringFlush();
    // Fails only when the kernel is short of memory: the requests stay queued, try again soon.
    if (r < 0) setTimeout(() => this.scheduleFlush(), 1);
    else if (r > 0) this.done(r); // finished inside the system call (page-cache I/O often is)
  };

  constructor(private readonly api: Required<Pick<NativeApi, 'uringSubmit' | 'uringFlush'>>) {}

  static open(api: NativeApi): Uring | null {
    if (typeof api.uringSetup !== 'function' || typeof api.uringSubmit !== 'function' || typeof api.uringFlush !== 'function') {
      return null;
    }
    const ring = new Uring(api as Required<Pick<NativeApi, 'uringSubmit' | 'uringFlush'>>);
    return api.uringSetup(URING_ENTRIES, ring.results, (count) => ring.done(count)) > 0 ? ring : null;
  }

  /** Starts the I/O, or returns null when the ring is full (use the thread pool). */
  read(fd: number, buf: Buffer, offset: number): Promise<number> | null {
    return this.submit(false, fd, buf, offset);
  }

  write(fd: number, buf: Buffer, offset: number): Promise<number> | null {
    return this.submit(true, fd, buf, offset);
  }

  private submit(write: boolean, fd: number, buf: Buffer, offset: number): Promise<number> | null {
    const id = this.freeIds.pop() ?? this.waiting.length;
    const r = this.api.uringSubmit(write, fd, buf, offset, id);
    if (r < 0) {
      if (id === this.waiting.length) this.waiting.push(undefined);
      this.freeIds.push(id);
      return null;
    }
    this.submitted++;
    this.scheduleFlush();
    return new Promise((resolve, reject) => {
      this.waiting[id] = { resolve, reject, buf };
    });
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    process.nextTick(this.flush);
  }

  private done(count: number): void {
    for (let i = 0; i < count; i++) {
      const id = this.results[2 * i];
      const res = this.results[2 * i + 1];
      const w = this.waiting[id]!;
      this.waiting[id] = undefined;
      this.freeIds.push(id);
      if (res >= 0) {
        w.resolve(res);
      } else {
        const code = ERRNO_NAMES.get(-res) ?? 'EIO';
        w.reject(Object.assign(new Error(`${code} (io_uring)`), { code, errno: res }));
      }
    }
  }
}

function loadUring(): { ring: Uring | null; status: string } {
  const n = loaded.api;
  if (!n) return { ring: null, status: `off (addon ${loaded.status})` };
  if (process.env.VDISK_NO_URING === '1') return { ring: null, status: 'off (VDISK_NO_URING=1)' };
  try {
    const ring = Uring.open(n);
    return ring ? { ring, status: 'on' } : { ring: null, status: 'off (io_uring unavailable)' };
  } catch (err) {
    return { ring: null, status: `off (${(err as Error).message})` };
  }
}

let uringLoaded: { ring: Uring | null; status: string } | null = null;

/** The process's io_uring, set up on first use (the first file opened). */
export function uring(): Uring | null {
  uringLoaded ??= loadUring();
  return uringLoaded.ring;
}

/** "on", or "off (<reason>)" for `info`. */
export function uringStatus(): string {
  uringLoaded ??= loadUring();
  return uringLoaded.status;
}
