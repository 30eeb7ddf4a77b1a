// file protocol (QEMU's block/file-posix.c): regular files ('file') and block devices
// ('host_device').
//
// Buffered (cache.direct=off): reads and writes go straight from the caller's Buffer to
// the kernel: no copies, no per-request buffers. First as a synchronous preadv2/pwritev2
// with RWF_NOWAIT (native addon), which the kernel serves only from the page cache and
// otherwise refuses with EAGAIN instead of waiting for the disk; the event loop is never
// blocked on I/O, and a cache hit skips any round trip. On EAGAIN, or for the part after a
// short count, the request goes to the process's io_uring (native addon; any memory will
// do, and the ring keeps the Buffer alive until the kernel is done): page-cache writes
// usually complete inside the submitting system call, and ext4 hands the rest to the
// kernel's io-wq threads, either way cheaper than a hop through libuv's thread pool. Without
// a ring (no addon, io_uring refused, VDISK_NO_URING=1, or the ring full) it goes to
// fs.read/fs.write on the pool. A descriptor whose file system answers EOPNOTSUPP to NOWAIT
// (ext4 and tmpfs for writes, tmpfs for reads) stops trying. VDISK_NO_NOWAIT=1 turns the
// NOWAIT fast path off. fdatasync always stays a plain system call on the pool (visible to
// strace, as the cache-mode tests require).
//
// O_DIRECT (cache.direct=on): the alignment is probed once at open (statx DIOALIGN, else
// trial reads like QEMU's raw_probe_alignment) and reported as limits().requestAlignment,
// so BlockNode pads unaligned requests by read-modify-write. Node's Buffers are never
// aligned, so this driver copies every request through slots of the aligned pool
// (block/aligned.ts), one slot-sized piece per syscall. The syscalls go to the process's
// io_uring (native addon), which starts the device I/O from the event loop and signals
// completion through an eventfd: no thread-pool round trip. Without it (no addon, io_uring
// refused, VDISK_NO_URING=1, or the ring full) they go to fs.read/fs.write on the pool.
//
// A file whose size is not a multiple of the alignment: O_DIRECT reads of the last block
// come back short and are zero-filled; a padded write of the last block must not grow the
// file, so the bytes of that block up to EOF go through a second, buffered descriptor. The
// kernel keeps the two coherent (a direct read or write first writes back and drops cached
// pages of its range). BlockNode never passes a write past EOF other than that padding.
//
// Holes and zeroing need the native addon (SEEK_DATA/SEEK_HOLE, fallocate); without it
// block status reports all data, write-zeroes and discard are left to BlockNode (writing
// zeros, or nothing), and info() notes say so.
import fs from 'node:fs';
import { promisify } from 'node:util';
import {
  REQ_MAY_UNMAP, type BlockDriver, type BlockLimits, type DriverCaps, type DriverInfo, type Extent, type Preallocation,
} from '../block/driver.js';
import { BlockNode } from '../block/node.js';
import { VdiskError, fromSystemError, invalidArgument, unsupported } from '../block/errors.js';
import { alignedPool, SLOT_ALIGNMENT } from '../block/aligned.js';
import { native, nativeStatus, nowait, nowaitStatus, uring, uringStatus, type Uring } from '../native.js';

function read(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
function write(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
const fdatasync = promisify(fs.fdatasync);
const ftruncate = promisify(fs.ftruncate);
const close = promisify(fs.close);
const fstat = promisify(fs.fstat);
const open = promisify(fs.open);

export interface FileOpenOptions {
  readOnly: boolean;
  direct: boolean;
  noFlush: boolean;
}

/** How the O_DIRECT alignment was found (for info notes). */
export interface DirectAlignment {
  /** Offsets and lengths must be multiples of this. */
  request: number;
  /** Buffer addresses must be multiples of this (pool slots always are). */
  memory: number;
  source: 'statx' | 'probe' | 'sector size';
}

/** Largest request BlockNode hands over; the direct path splits it into pool slots itself. */
const MAX_TRANSFER = 1 << 30;
/** Pool slots one direct request keeps in flight at once (each piece is one syscall). */
const DIRECT_PARALLEL = 4;
/** Zeros for preallocation=full (never written into). */
const ZERO_CHUNK = Buffer.alloc(1 << 20);
/** Most extents one blockStatus call returns; the caller asks again for the rest. */
const MAX_STATUS_EXTENTS = 1024;
/**
 * Largest request tried with RWF_NOWAIT. The copy runs on the event loop (about 0.1 ms per
 * MiB); bigger requests go to the pool so one of them cannot stall every other client.
 */
const NOWAIT_MAX = 4 << 20;

/**
 * How often the RWF_NOWAIT fast path was taken, process-wide (tests and `bench` notes):
 * `hits` were served whole from the page cache, `fallbacks` went on to the thread pool.
 */
export const nowaitStats = { readHits: 0, readFallbacks: 0, writeHits: 0, writeFallbacks: 0 };

export class FileDriver implements BlockDriver {
  readonly driverName: 'file' | 'host_device';
  readonly children = {};
  readonly caps: DriverCaps;
  private length: number;
  private readonly fixedLimits: BlockLimits;
  /**
   * Under O_DIRECT, a second, buffered descriptor for the bytes of the last partial block
   * (and preallocation writes). Opened on first need, so most direct opens never have one.
   */
  private bufferedFd: Promise<number> | null = null;
  /** Still trying RWF_NOWAIT on this descriptor (off after EOPNOTSUPP and the like). */
  private nowaitReads: boolean;
  private nowaitWrites: boolean;
  /** Carries the O_DIRECT syscalls when available. */
  private readonly ring: Uring | null;

  /**
   * @param fd the image descriptor (O_DIRECT when `direct` is set)
   */
  constructor(
    readonly fd: number,
    readonly filename: string,
    size: number,
    readonly blockDevice: boolean,
    readonly direct: DirectAlignment | null,
  ) {
    this.driverName = blockDevice ? 'host_device' : 'file';
    this.length = size;
    const zeroing = native ? 'native' : 'none';
    this.caps = { fua: 'emulate', writeZeroes: zeroing, discard: zeroing };
    this.fixedLimits = Object.freeze({ requestAlignment: direct?.request ?? 1, maxTransfer: MAX_TRANSFER });
    this.nowaitReads = this.nowaitWrites = nowait !== null && direct === null;
    this.ring = uring();
  }

  limits(): BlockLimits {
    return this.fixedLimits; // BlockNode asks on every request: no allocation
  }

  getLength(): number {
    return this.length;
  }

  // ---- read / write -----------------------------------------------------------------

  pread(offset: number, buf: Buffer): Promise<void> {
    // Not async itself: a direct read of one piece returns the piece's promise (no extra hop).
    if (this.direct) return this.directPieces(offset, buf, this.directReadPiece);
    return this.bufferedRead(offset, buf);
  }

  private async bufferedRead(offset: number, buf: Buffer): Promise<void> {
    let done = 0;
    if (this.nowaitReads && buf.length <= NOWAIT_MAX) {
      const n = nowait!.preadNowait(this.fd, buf, offset);
      if (n === buf.length) {
        nowaitStats.readHits++;
        return;
      }
      if (n === 0) {
        buf.fill(0); // at or past EOF
        nowaitStats.readHits++;
        return;
      }
      nowaitStats.readFallbacks++;
      if (n > 0) done = n; // the rest is not cached, or is past EOF: the pool finds out which
      else if (n !== -nowait!.EAGAIN) this.nowaitReads = false; // no NOWAIT here; the pool reports real errors
    }
    while (done < buf.length) {
      let n: number;
      try {
        n = await this.bufferedSyscall(false, this.fd, buf, done, offset + done);
      } catch (err) {
        throw fromSystemError(err, `${this.filename}: read at ${offset + done}`);
      }
      if (n === 0) {
        buf.fill(0, done); // past EOF reads as zeros
        return;
      }
      done += n;
    }
  }

  async pwrite(offset: number, buf: Buffer): Promise<void> {
    if (this.direct) return this.directWrite(offset, buf);
    let done = 0;
    if (this.nowaitWrites && buf.length <= NOWAIT_MAX) {
      const n = nowait!.pwriteNowait(this.fd, buf, offset);
      if (n === buf.length) {
        nowaitStats.writeHits++;
      } else {
        nowaitStats.writeFallbacks++;
        if (n > 0) done = n;
        else if (n !== -nowait!.EAGAIN) this.nowaitWrites = false;
      }
    }
    if (done < buf.length) await this.writeAll(this.fd, offset, buf, done);
    if (offset + buf.length > this.length) this.length = offset + buf.length;
  }

  private async writeAll(fd: number, offset: number, buf: Buffer, done = 0): Promise<void> {
    while (done < buf.length) {
      try {
        done += await this.bufferedSyscall(true, fd, buf, done, offset + done);
      } catch (err) {
        throw fromSystemError(err, `${this.filename}: write at ${offset + done}`);
      }
    }
  }

  /**
   * An aligned write under O_DIRECT. Blocks wholly before EOF go direct; the last block, when
   * the file ends inside it, is written only up to EOF through the buffered descriptor (the
   * rest of it is BlockNode's padding), so the file keeps its exact size. A write starting
   * at or past an aligned EOF is whole blocks and grows the file by them.
   */
  private async directWrite(offset: number, buf: Buffer): Promise<void> {
    const end = offset + buf.length;
    const align = this.direct!.request;
    const tailStart = this.length - (this.length % align);
    if (end <= this.length || tailStart === this.length || offset >= this.length) {
      await this.directPieces(offset, buf, this.directWritePiece);
      if (end > this.length) this.length = end;
      return;
    }
    if (tailStart > offset) {
      const head = buf.subarray(0, tailStart - offset);
      await this.directPieces(offset, head, this.directWritePiece);
    }
    const from = Math.max(offset, tailStart);
    await this.writeAll(await this.buffered(), from, buf.subarray(from - offset, this.length - offset));
  }

  /** The image's descriptor without O_DIRECT: the main one, or the second one opened on demand. */
  private buffered(): Promise<number> {
    if (!this.direct) return Promise.resolve(this.fd);
    // Through /proc the new descriptor is surely the same inode, even if the name moved.
    this.bufferedFd ??= open(`/proc/self/fd/${this.fd}`, fs.constants.O_RDWR)
      .catch(() => open(this.filename, fs.constants.O_RDWR))
      .catch((err) => {
        this.bufferedFd = null;
        throw fromSystemError(err, `${this.filename}: open without O_DIRECT`);
      });
    return this.bufferedFd;
  }

  /** Run `op` on slot-sized pieces of [offset, offset+buf.length), a few at a time. */
  private directPieces(offset: number, buf: Buffer, op: (pos: number, piece: Buffer) => Promise<void>): Promise<void> {
    if (buf.length <= alignedPool.slotSize) return op(offset, buf);
    return this.directPiecesParallel(offset, buf, op);
  }

  private async directPiecesParallel(offset: number, buf: Buffer, op: (pos: number, piece: Buffer) => Promise<void>): Promise<void> {
    const slot = alignedPool.slotSize;
    let next = 0;
    const worker = async () => {
      while (next < buf.length) {
        const start = next;
        next = Math.min(buf.length, next + slot);
        await op(offset + start, buf.subarray(start, next));
      }
    };
    const workers: Promise<void>[] = [];
    for (let i = 0; i < DIRECT_PARALLEL && i * slot < buf.length; i++) workers.push(worker());
    const results = await Promise.allSettled(workers);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /** A free slot at once (the usual case) saves a promise and a tick over acquire(). */
  private readonly directReadPiece = (offset: number, piece: Buffer): Promise<void> => {
    const slot = alignedPool.tryAcquire();
    if (slot) return this.directReadInto(slot, offset, piece);
    return alignedPool.acquire().then((s) => this.directReadInto(s, offset, piece));
  };

  /** Reads into `slot` (acquired by the caller, released here) and copies out to `piece`. */
  private async directReadInto(slot: Buffer, offset: number, piece: Buffer): Promise<void> {
    try {
      let done = 0;
      while (done < piece.length) {
        let n: number;
        try {
          n = await this.directSyscall(false, slot, done, piece.length - done, offset + done);
        } catch (err) {
          throw fromSystemError(err, `${this.filename}: O_DIRECT read at ${offset + done}`);
        }
        if (n === 0) break;
        done += n;
        if (n % this.direct!.request !== 0) break; // a short, unaligned read ends at EOF
      }
      slot.copy(piece, 0, 0, done);
      if (done < piece.length) piece.fill(0, done);
    } finally {
      alignedPool.release(slot);
    }
  }

  /**
   * One buffered read or write of buf[done..) at pos: on the ring (any memory will do; the
   * ring's promise keeps the Buffer alive until the kernel is done with it), else on the pool.
   */
  private bufferedSyscall(isWrite: boolean, fd: number, buf: Buffer, done: number, pos: number): Promise<number> {
    if (this.ring) {
      const rest = done === 0 ? buf : buf.subarray(done);
      const started = isWrite ? this.ring.write(fd, rest, pos) : this.ring.read(fd, rest, pos);
      if (started) return started;
    }
    return isWrite ? write(fd, buf, done, buf.length - done, pos) : read(fd, buf, done, buf.length - done, pos);
  }

  /** One O_DIRECT read or write of slot[off, off+len) at pos: on the ring, else on the pool. */
  private directSyscall(isWrite: boolean, slot: Buffer, off: number, len: number, pos: number): Promise<number> {
    const started = this.ring && (isWrite ? this.ring.write(this.fd, slot.subarray(off, off + len), pos)
      : this.ring.read(this.fd, slot.subarray(off, off + len), pos));
    if (started) return started;
    return isWrite ? write(this.fd, slot, off, len, pos) : read(this.fd, slot, off, len, pos);
  }

  private readonly directWritePiece = (offset: number, piece: Buffer): Promise<void> => {
    const slot = alignedPool.tryAcquire();
    if (slot) return this.directWriteFrom(slot, offset, piece);
    return alignedPool.acquire().then((s) => this.directWriteFrom(s, offset, piece));
  };

  /** Copies `piece` into `slot` (acquired by the caller, released here) and writes it. */
  private async directWriteFrom(slot: Buffer, offset: number, piece: Buffer): Promise<void> {
    try {
      piece.copy(slot);
      let done = 0;
      while (done < piece.length) {
        try {
          done += await this.directSyscall(true, slot, done, piece.length - done, offset + done);
        } catch (err) {
          throw fromSystemError(err, `${this.filename}: O_DIRECT write at ${offset + done}`);
        }
      }
    } finally {
      alignedPool.release(slot);
    }
  }

  // ---- zeroing and discard (native addon) -----------------------------------------------

  /**
   * MAY_UNMAP punches a hole, otherwise FALLOC_FL_ZERO_RANGE (QEMU's handle_aiocb_write_zeroes
   * and _unmap). What the file system cannot do becomes ENOTSUP, which BlockNode emulates by
   * writing zeros, or reports when the client asked for a fast zero (REQ_NO_FALLBACK).
   */
  async pwriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    const n = this.requireNative('write zeroes');
    const end = offset + length;
    if (flags & REQ_MAY_UNMAP) {
      try {
        await this.punchHole(offset, length);
        return;
      } catch (err) {
        if (!isNotSupported(err)) throw fromSystemError(err, `${this.filename}: punch hole at ${offset}+${length}`);
      }
    }
    try {
      // Without KEEP_SIZE a range past EOF extends the file, as a write of zeros would.
      await n.fallocate(this.fd, n.FALLOC_FL_ZERO_RANGE, offset, length);
    } catch (err) {
      if (isNotSupported(err)) {
        throw unsupported(`${this.filename}: file system cannot zero a range in place`);
      }
      throw fromSystemError(err, `${this.filename}: zero range at ${offset}+${length}`);
    }
    if (end > this.length) this.length = end;
  }

  /** Discard is advisory: a file system that cannot punch holes makes it a no-op. */
  async pdiscard(offset: number, length: number): Promise<void> {
    const n = this.requireNative('discard');
    try {
      if (this.blockDevice) await n.blkdiscard(this.fd, offset, length);
      else await this.punchHole(offset, length);
    } catch (err) {
      if (isNotSupported(err) || (err as NodeJS.ErrnoException).code === 'ENOTTY') return;
      throw fromSystemError(err, `${this.filename}: discard at ${offset}+${length}`);
    }
  }

  /** PUNCH_HOLE needs KEEP_SIZE; a range past EOF first grows the file (the new part is a hole). */
  private async punchHole(offset: number, length: number): Promise<void> {
    const n = native!;
    const end = offset + length;
    if (end > this.length && !this.blockDevice) {
      await ftruncate(this.fd, end);
      const oldLength = this.length;
      this.length = end;
      if (offset >= oldLength) return;
      length = oldLength - offset;
    }
    await n.fallocate(this.fd, n.FALLOC_FL_PUNCH_HOLE | n.FALLOC_FL_KEEP_SIZE, offset, length);
  }

  private requireNative(what: string) {
    if (!native) throw unsupported(`${this.filename}: ${what} needs the native addon (${nativeStatus})`);
    return native;
  }

  // ---- block status -----------------------------------------------------------------

  /**
   * QEMU's raw_co_block_status: SEEK_DATA/SEEK_HOLE split the range into data and holes;
   * holes read as zeros. Without the addon (or on a block device) everything is data.
   */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const all = (): Extent[] => [this.extent(offset, length, true)];
    if (!native || this.blockDevice) return all();
    const end = offset + length;
    const out: Extent[] = [];
    let pos = offset;
    try {
      while (pos < end && out.length < MAX_STATUS_EXTENTS) {
        const data = native.seekData(this.fd, pos);
        if (data < 0) {
          out.push(this.extent(pos, end - pos, false)); // trailing hole
          break;
        }
        if (data > pos) {
          const holeEnd = Math.min(end, data);
          out.push(this.extent(pos, holeEnd - pos, false));
          pos = holeEnd;
          continue;
        }
        const hole = native.seekHole(this.fd, pos);
        // -1 means pos is past EOF (file shrank underneath us): zeros, as a read would give.
        const dataEnd = hole < 0 ? pos : Math.min(end, hole);
        if (dataEnd <= pos) {
          out.push(this.extent(pos, end - pos, false));
          break;
        }
        out.push(this.extent(pos, dataEnd - pos, true));
        pos = dataEnd;
      }
    } catch {
      // No information (e.g. a file system without SEEK_DATA): pretend there are no holes.
      if (out.length === 0) return all();
    }
    return out;
  }

  private extent(offset: number, length: number, data: boolean): Extent {
    return { offset, length, data, zero: !data, allocated: true, hostOffset: offset, hostFile: this.filename };
  }

  // ---- flush, resize, close ---------------------------------------------------------

  async flushToDisk(): Promise<void> {
    try {
      await fdatasync(this.fd);
    } catch (err) {
      throw fromSystemError(err, `${this.filename}: fdatasync`);
    }
  }

  /**
   * QEMU's raw_co_truncate / handle_aiocb_truncate. Preallocation applies to the new range
   * only; if it fails (ENOSPC, EFBIG) the file is shrunk back so no half-claimed space stays.
   */
  async truncate(length: number, prealloc: Preallocation): Promise<void> {
    if (this.blockDevice) {
      if (length > this.length) throw unsupported(`${this.filename}: cannot grow device files`);
      if (prealloc !== 'off') throw unsupported(`${this.filename}: preallocation=${prealloc} is not supported for devices`);
      return; // QEMU accepts a "shrink" of a device and leaves it alone
    }
    if (prealloc === 'metadata') {
      throw invalidArgument(`${this.filename}: preallocation mode 'metadata' is not supported by the file protocol`);
    }
    const oldLength = this.length;
    if (prealloc !== 'off' && length < oldLength) {
      throw invalidArgument(`${this.filename}: cannot use preallocation=${prealloc} when shrinking (from ${oldLength} to ${length} bytes)`);
    }
    try {
      if (prealloc === 'off' || length === oldLength) {
        await ftruncate(this.fd, length);
      } else if (prealloc === 'falloc' && native) {
        // Mode 0 both reserves the blocks and sets the new size.
        await native.fallocate(this.fd, 0, oldLength, length - oldLength);
      } else {
        // 'full', or 'falloc' without the addon (glibc's posix_fallocate emulation writes too).
        await this.preallocateFull(oldLength, length);
      }
    } catch (err) {
      if (length > oldLength) await ftruncate(this.fd, oldLength).catch(() => {});
      throw fromSystemError(err, `${this.filename}: resize to ${length} bytes (preallocation=${prealloc})`);
    }
    this.length = length;
  }

  private async preallocateFull(from: number, to: number): Promise<void> {
    if (native) {
      // Reserve first so a full disk fails fast, before we write anything (as QEMU does).
      try {
        await native.fallocate(this.fd, 0, from, to - from);
      } catch (err) {
        if (!isNotSupported(err)) throw err;
      }
    }
    await ftruncate(this.fd, to);
    // Zeros through a buffered descriptor: the range is not aligned in general.
    const fd = await this.buffered();
    for (let pos = from; pos < to; pos += ZERO_CHUNK.length) {
      const n = Math.min(ZERO_CHUNK.length, to - pos);
      let done = 0;
      while (done < n) done += await write(fd, ZERO_CHUNK, done, n - done, pos + done);
    }
  }

  async info(): Promise<DriverInfo> {
    const notes = [
      native ? 'native addon: loaded' : `native addon: ${nativeStatus}: no holes, all data; zeros are written, never punched`,
    ];
    if (this.direct) {
      const d = this.direct;
      notes.push(`cache: O_DIRECT, request alignment ${d.request}, memory alignment ${d.memory} (from ${d.source}); io_uring ${uringStatus()}`);
    } else {
      notes.push(`cache: host page cache (no O_DIRECT); RWF_NOWAIT fast path ${nowaitStatus}; io_uring ${uringStatus()}`);
    }
    return { notes };
  }

  async close(): Promise<void> {
    let first: unknown = null;
    const second = this.bufferedFd ? await this.bufferedFd.catch(() => null) : null;
    for (const fd of second === null ? [this.fd] : [this.fd, second]) {
      try {
        await close(fd);
      } catch (err) {
        first ??= err;
      }
    }
    if (first) throw fromSystemError(first, `${this.filename}: close`);
  }
}

function isNotSupported(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS';
}

// ---- open and create --------------------------------------------------------------------

export async function openFile(filename: string, opts: FileOpenOptions): Promise<BlockNode> {
  const flags = (opts.readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR) | (opts.direct ? fs.constants.O_DIRECT : 0);
  let fd: number;
  try {
    fd = await open(filename, flags);
  } catch (err) {
    if (opts.direct && (err as NodeJS.ErrnoException).code === 'EINVAL') await explainDirectRefusal(filename, flags & ~fs.constants.O_DIRECT);
    throw fromSystemError(err, `Could not open '${filename}'`);
  }
  try {
    const st = await fstat(fd);
    if (st.isDirectory()) throw invalidArgument(`Could not open '${filename}': Is a directory`);
    const blockDevice = st.isBlockDevice();
    const size = blockDevice ? await blockDeviceSize(fd, st, filename) : st.size;
    let direct: DirectAlignment | null = null;
    if (opts.direct) {
      direct = await probeAlignment(fd, filename, blockDevice);
    }
    const driver = new FileDriver(fd, filename, size, blockDevice, direct);
    return new BlockNode(driver, { filename, readOnly: opts.readOnly, noFlush: opts.noFlush });
  } catch (err) {
    await close(fd).catch(() => {});
    throw fromSystemError(err, `Could not open '${filename}'`);
  }
}

/**
 * open(O_DIRECT) said EINVAL: the file system has no direct I/O, unless the name is something
 * that cannot be opened at all (a directory says EINVAL too). Throws the right message.
 */
async function explainDirectRefusal(filename: string, bufferedFlags: number): Promise<never> {
  let fd: number;
  try {
    fd = await open(filename, bufferedFlags);
  } catch (err) {
    throw fromSystemError(err, `Could not open '${filename}'`);
  }
  const st = await fstat(fd).finally(() => close(fd).catch(() => {}));
  if (st.isDirectory()) throw invalidArgument(`Could not open '${filename}': Is a directory`);
  throw new VdiskError('EINVAL', 'unsupported-feature',
    `Could not open '${filename}': file system does not support O_DIRECT; use cache.direct=off (cache mode writeback or writethrough)`);
}

/** BLKGETSIZE64 through the addon, else the sector count the kernel shows in sysfs. */
async function blockDeviceSize(fd: number, st: fs.Stats, filename: string): Promise<number> {
  if (native) {
    try {
      return native.blockDeviceSize(fd);
    } catch (err) {
      throw fromSystemError(err, `Could not open '${filename}': cannot get device size`);
    }
  }
  const major = Math.floor(st.rdev / 256) & 0xfff; // glibc's gnu_dev_major/minor for 32-bit dev_t
  const minor = (st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00);
  try {
    const sectors = await fs.promises.readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
    return Number(sectors.trim()) * 512;
  } catch (err) {
    throw fromSystemError(err, `Could not open '${filename}': cannot get device size (${nativeStatus})`);
  }
}

/**
 * The O_DIRECT alignment, found once at open. statx(STATX_DIOALIGN) says it exactly (Linux
 * 6.1+). Otherwise: a device's logical sector size, then QEMU's raw_probe_alignment: the
 * smallest read size from {1, 512, 1024, 2048, 4096} the kernel accepts from an aligned
 * buffer at offset 0, where "1 works" (an empty file, or a file system that does not check)
 * falls back to 4096.
 */
async function probeAlignment(fd: number, filename: string, blockDevice: boolean): Promise<DirectAlignment> {
  if (native) {
    try {
      const a = native.dioAlignment(fd);
      if (a && a.memAlign <= SLOT_ALIGNMENT) return { request: a.offsetAlign, memory: a.memAlign, source: 'statx' };
    } catch {
      // fall through to probing
    }
    if (blockDevice) {
      try {
        const sector = native.blockDeviceSectorSize(fd);
        if (sector > 0) return { request: sector, memory: sector, source: 'sector size' };
      } catch {
        // fall through to probing
      }
    }
  }
  const slot = await alignedPool.acquire();
  try {
    for (const size of [1, 512, 1024, 2048, 4096]) {
      try {
        await read(fd, slot, 0, size, 0);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EINVAL') continue;
        throw err;
      }
      const request = size === 1 ? 4096 : size;
      return { request, memory: request, source: 'probe' };
    }
  } finally {
    alignedPool.release(slot);
  }
  throw new VdiskError('EINVAL', 'unsupported-feature',
    `Could not open '${filename}': could not find a working O_DIRECT alignment; use cache.direct=off`);
}

/** Create (or truncate to empty) a file, as qemu-img create does before the format lays out. */
export async function createFile(filename: string): Promise<void> {
  try {
    const fd = await open(filename, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o644);
    await close(fd);
  } catch (err) {
    throw fromSystemError(err, `Could not create '${filename}'`);
  }
}
