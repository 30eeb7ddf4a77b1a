// The native addon (native/vdisk_native.c, built by `npm install`): fallocate, SEEK_DATA /
// SEEK_HOLE, statx direct-I/O alignment and block-device ioctls, which Node.js 20 lacks.
//
// It is optional. Without it the file driver reports every range as data, writes zeros
// instead of punching holes, and says so in `info` notes. VDISK_NO_NATIVE=1 forces that
// fallback (tests use it to cover the path).
import { createRequire } from 'node:module';
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
