// BlockNode: one node of the block graph (QEMU's BlockDriverState) and the generic I/O path
// (QEMU's block/io.c). Every request to a driver passes through here exactly once per layer,
// so drivers never repeat: bounds checks, alignment padding by read-modify-write, splitting
// at the driver's maximum transfer, FUA emulation, zero emulation, write generations and
// the flush order.

import {
  REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK,
  type BlockDriver, type ChainExtent, type Extent, type Preallocation,
} from './driver.js';
import { VdiskError, outOfBounds, readOnly as readOnlyError } from './errors.js';
import type { DirtyBitmap } from './dirty-bitmap.js';

export interface NodeOptions {
  /** What the node is called in messages: usually the file name. */
  filename: string;
  readOnly: boolean;
  /** cache.no-flush: flushes never reach the disk (cache=unsafe). */
  noFlush: boolean;
}

/** A request in flight over [start, end); serialising ones exclude every overlap. */
interface TrackedRequest {
  start: number;
  end: number;
  serialising: boolean;
  done: Promise<void>;
  finish: () => void;
}

/** Zeros for emulated write-zeroes; never written into. */
const ZERO_CHUNK = Buffer.alloc(1 << 20);
/** Largest range handed to one pwriteZeroes / pdiscard call. */
const MAX_ZERO_RANGE = 1 << 30;

export class BlockNode {
  readonly driver: BlockDriver;
  readonly filename: string;
  readonly readOnly: boolean;
  readonly noFlush: boolean;

  /** Incremented when a write completes; a flush records the generation it made stable. */
  private writeGeneration = 0;
  private flushedGeneration = 0;
  private activeFlush: Promise<void> | null = null;
  /** Once fdatasync has failed, the kernel may have dropped dirty pages: never claim success again. */
  private stickyFlushError: VdiskError | null = null;
  private readonly tracked = new Set<TrackedRequest>();
  private closed = false;
  /** Dirty bitmaps attached to this node; every write, write-zeroes and discard marks the enabled ones. */
  private readonly bitmaps = new Set<DirtyBitmap>();

  constructor(driver: BlockDriver, options: NodeOptions) {
    this.driver = driver;
    this.filename = options.filename;
    this.readOnly = options.readOnly;
    this.noFlush = options.noFlush;
  }

  get file(): BlockNode | undefined {
    return this.driver.children.file;
  }

  get backing(): BlockNode | null | undefined {
    return this.driver.children.backing;
  }

  getLength(): number {
    return this.driver.getLength();
  }

  /** The node that holds the bytes of this one all the way down (for messages and `info`). */
  get bottom(): BlockNode {
    let n: BlockNode = this;
    while (n.file) n = n.file;
    return n;
  }

  // ---- reads --------------------------------------------------------------------------

  async pread(offset: number, buf: Buffer): Promise<void> {
    this.checkRequest(offset, buf.length);
    if (buf.length === 0) return;
    const align = this.driver.limits().requestAlignment;
    if (align <= 1) return this.readAligned(offset, buf);
    const start = offset - (offset % align);
    const end = roundUp(offset + buf.length, align);
    const req = await this.track(start, end, false);
    try {
      if (start === offset && end === offset + buf.length) {
        await this.readAligned(offset, buf);
      } else {
        const bounce = Buffer.allocUnsafe(end - start);
        await this.readAligned(start, bounce);
        bounce.copy(buf, 0, offset - start, offset - start + buf.length);
      }
    } finally {
      this.untrack(req);
    }
  }

  private async readAligned(offset: number, buf: Buffer): Promise<void> {
    const max = this.driver.limits().maxTransfer;
    if (buf.length <= max) return this.driver.pread(offset, buf);
    for (let pos = 0; pos < buf.length; pos += max) {
      await this.driver.pread(offset + pos, buf.subarray(pos, Math.min(buf.length, pos + max)));
    }
  }

  // ---- writes -------------------------------------------------------------------------

  async pwrite(offset: number, buf: Buffer, flags = 0): Promise<void> {
    this.checkWritable();
    this.checkRequest(offset, buf.length);
    if (buf.length > 0) {
      const align = this.driver.limits().requestAlignment;
      try {
        if (align <= 1) {
          await this.writeAligned(offset, buf, flags);
        } else {
          await this.writePadded(offset, buf, flags, align);
        }
      } finally {
        // Marked even when the write failed: it may have changed the medium (QEMU does the same).
        this.markDirty(offset, buf.length);
      }
    }
    await this.finishWrite(flags);
  }

  /** Unaligned head or tail: read the partial blocks, merge, write whole blocks (RMW). */
  private async writePadded(offset: number, buf: Buffer, flags: number, align: number): Promise<void> {
    const start = offset - (offset % align);
    const end = roundUp(offset + buf.length, align);
    const aligned = start === offset && end === offset + buf.length;
    const req = await this.track(start, end, !aligned);
    try {
      if (aligned) return await this.writeAligned(offset, buf, flags);
      const bounce = Buffer.allocUnsafe(end - start);
      await this.driver.pread(start, bounce.subarray(0, align));
      if (end - align > start) {
        await this.driver.pread(end - align, bounce.subarray(end - start - align));
      }
      buf.copy(bounce, offset - start);
      await this.writeAligned(start, bounce, flags);
    } finally {
      this.untrack(req);
    }
  }

  private async writeAligned(offset: number, buf: Buffer, flags: number): Promise<void> {
    const driverFlags = this.driver.caps.fua === 'native' ? flags : flags & ~REQ_FUA;
    const max = this.driver.limits().maxTransfer;
    try {
      if (buf.length <= max) {
        await this.driver.pwrite(offset, buf, driverFlags);
      } else {
        for (let pos = 0; pos < buf.length; pos += max) {
          await this.driver.pwrite(offset + pos, buf.subarray(pos, Math.min(buf.length, pos + max)), driverFlags);
        }
      }
    } finally {
      // Even a failed write may have changed the medium: the next flush must reach the disk.
      this.writeGeneration++;
    }
  }

  /** FUA that the driver cannot do natively: flush the node (QEMU's bdrv_driver_pwritev). */
  private async finishWrite(flags: number): Promise<void> {
    if (flags & REQ_FUA && this.driver.caps.fua !== 'native') await this.flush();
  }

  async pwriteZeroes(offset: number, length: number, flags = 0): Promise<void> {
    this.checkWritable();
    this.checkRequest(offset, length);
    const cap = this.driver.caps.writeZeroes;
    if (cap !== 'native' && flags & REQ_NO_FALLBACK) {
      throw new VdiskError('ENOTSUP', 'unsupported-feature', `${this.filename}: fast zeroing not supported`);
    }
    if (length > 0) {
      const align = this.driver.limits().requestAlignment;
      const head = align > 1 ? Math.min(length, (align - (offset % align)) % align) : 0;
      const tail = align > 1 ? (offset + length) % align : 0;
      const midStart = offset + head;
      const midLen = head === length ? 0 : length - head - tail;
      try {
        // Partial blocks at either end become ordinary writes of zeros (through RMW).
        if (head > 0) await this.emulateZeroes(offset, head, flags & ~REQ_FUA);
        if (midLen > 0) await this.zeroAligned(midStart, midLen, flags);
        if (tail > 0 && head !== length) await this.emulateZeroes(offset + length - tail, tail, flags & ~REQ_FUA);
      } finally {
        this.markDirty(offset, length);
      }
    }
    await this.finishWrite(flags);
  }

  private async zeroAligned(offset: number, length: number, flags: number): Promise<void> {
    if (this.driver.caps.writeZeroes === 'none' || !this.driver.pwriteZeroes) {
      return this.emulateZeroes(offset, length, flags & ~REQ_FUA);
    }
    const driverFlags = this.driver.caps.fua === 'native' ? flags : flags & ~REQ_FUA;
    const req = await this.track(offset, offset + length, false);
    try {
      for (let pos = 0; pos < length; pos += MAX_ZERO_RANGE) {
        const n = Math.min(MAX_ZERO_RANGE, length - pos);
        try {
          await this.driver.pwriteZeroes(offset + pos, n, driverFlags);
        } catch (err) {
          if (!(err instanceof VdiskError) || err.code !== 'ENOTSUP' || flags & REQ_NO_FALLBACK) throw err;
          await this.emulateZeroesUntracked(offset + pos, n, driverFlags & ~REQ_MAY_UNMAP);
        } finally {
          this.writeGeneration++;
        }
      }
    } finally {
      this.untrack(req);
    }
  }

  /** Write zeros as data, through the ordinary write path (so alignment is handled). */
  private async emulateZeroes(offset: number, length: number, flags: number): Promise<void> {
    for (let pos = 0; pos < length; pos += ZERO_CHUNK.length) {
      const n = Math.min(ZERO_CHUNK.length, length - pos);
      const align = this.driver.limits().requestAlignment;
      if (align <= 1) await this.writeAligned(offset + pos, ZERO_CHUNK.subarray(0, n), flags);
      else await this.writePadded(offset + pos, ZERO_CHUNK.subarray(0, n), flags, align);
    }
  }

  /** Same, for an aligned range that the caller already tracks. */
  private async emulateZeroesUntracked(offset: number, length: number, flags: number): Promise<void> {
    for (let pos = 0; pos < length; pos += ZERO_CHUNK.length) {
      await this.writeAligned(offset + pos, ZERO_CHUNK.subarray(0, Math.min(ZERO_CHUNK.length, length - pos)), flags);
    }
  }

  /** Discard is advisory: partial blocks at either end are left alone. */
  async pdiscard(offset: number, length: number): Promise<void> {
    this.checkWritable();
    this.checkRequest(offset, length);
    if (this.driver.caps.discard === 'none' || !this.driver.pdiscard) return;
    const align = this.driver.limits().requestAlignment;
    const start = roundUp(offset, align);
    const end = offset + length === this.getLength() ? offset + length : offset + length - ((offset + length) % align);
    if (end <= start) return;
    const req = await this.track(start, end, false);
    try {
      for (let pos = start; pos < end; pos += MAX_ZERO_RANGE) {
        try {
          await this.driver.pdiscard(pos, Math.min(MAX_ZERO_RANGE, end - pos));
        } finally {
          this.writeGeneration++;
        }
      }
    } finally {
      this.markDirty(start, end - start);
      this.untrack(req);
    }
  }

  async truncate(length: number, prealloc: Preallocation = 'off'): Promise<void> {
    this.checkWritable();
    if (!this.driver.truncate) {
      throw new VdiskError('ENOTSUP', 'unsupported-feature', `${this.filename}: driver '${this.driver.driverName}' cannot resize`);
    }
    await this.drainWrites();
    const oldLength = this.getLength();
    try {
      await this.driver.truncate(length, prealloc);
    } finally {
      this.writeGeneration++;
      const newLength = this.getLength();
      for (const b of this.bitmaps) b.resize(newLength);
      // Growing exposes new content (zeros or a backing file's data): it is a change.
      if (newLength > oldLength) this.markDirty(oldLength, newLength - oldLength);
    }
  }

  // ---- dirty bitmaps ------------------------------------------------------------------

  /** Attach a bitmap (its size must be this node's length). */
  addBitmap(bitmap: DirtyBitmap): void {
    if (bitmap.name !== null && this.findBitmap(bitmap.name)) {
      throw new VdiskError('EEXIST', 'invalid-argument', `Bitmap already exists: ${bitmap.name}`);
    }
    bitmap.resize(this.getLength());
    this.bitmaps.add(bitmap);
  }

  removeBitmap(bitmap: DirtyBitmap): void {
    this.bitmaps.delete(bitmap);
  }

  findBitmap(name: string): DirtyBitmap | undefined {
    for (const b of this.bitmaps) if (b.name === name) return b;
    return undefined;
  }

  /** Every attached bitmap, named and anonymous, in the order they were added. */
  get dirtyBitmaps(): readonly DirtyBitmap[] {
    return [...this.bitmaps];
  }

  private markDirty(offset: number, length: number): void {
    if (this.bitmaps.size === 0 || length <= 0) return;
    for (const b of this.bitmaps) if (b.enabled) b.set(offset, length);
  }

  /** Write the persistent bitmaps back into the image (qcow2: and mark them not in use). */
  async storeBitmaps(): Promise<void> {
    if (this.readOnly || !this.driver.storeBitmaps) return;
    await this.driver.storeBitmaps([...this.bitmaps].filter((b) => b.persistent));
  }

  // ---- block status -------------------------------------------------------------------

  /** This layer's status for a prefix of [offset, offset+length): never empty when length > 0. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.checkRequest(offset, length);
    if (length === 0) return [];
    if (!this.driver.blockStatus) {
      return [{ offset, length, data: true, zero: false, allocated: true }];
    }
    const raw = await this.driver.blockStatus(offset, length);
    const out: Extent[] = [];
    let pos = offset;
    for (const e of raw) {
      if (e.offset !== pos || e.length <= 0) break; // a driver bug must not loop the caller
      const len = Math.min(e.length, offset + length - pos);
      out.push({ ...e, length: len });
      pos += len;
      if (pos >= offset + length) break;
    }
    if (out.length === 0) return [{ offset, length, data: true, zero: false, allocated: true }];
    return out;
  }

  /**
   * Status through the backing chain (qemu-img map): ranges this layer does not allocate are
   * asked of the backing node, depth + 1. Ranges past a shorter backing file read as zeros
   * and are reported at this layer's depth, as qemu-img map does.
   */
  async blockStatusAbove(offset: number, length: number, depth = 0): Promise<ChainExtent[]> {
    const top = await this.blockStatus(offset, length);
    const out: ChainExtent[] = [];
    for (const e of top) {
      const backing = this.backing;
      if (e.allocated || !backing) {
        out.push({ ...e, depth });
        continue;
      }
      const backingLen = backing.getLength();
      let pos = e.offset;
      const end = e.offset + e.length;
      while (pos < end) {
        if (pos >= backingLen) {
          // Nothing below answers here: QEMU reports it at this layer's depth, not present.
          out.push({ offset: pos, length: end - pos, data: false, zero: true, allocated: false, depth });
          break;
        }
        const sub = await backing.blockStatusAbove(pos, Math.min(end, backingLen) - pos, depth + 1);
        for (const s of sub) out.push(s);
        pos = sub[sub.length - 1].offset + sub[sub.length - 1].length;
      }
    }
    return out;
  }

  // ---- flush --------------------------------------------------------------------------

  /**
   * QEMU's bdrv_co_flush: the driver's own caches go to its children even with no-flush;
   * the disk barrier is skipped with no-flush or when nothing was written since the last
   * flush; then writable children are flushed. Flushes of one node run one at a time.
   */
  async flush(): Promise<void> {
    if (this.readOnly || this.closed) return;
    const generation = this.writeGeneration;
    while (this.activeFlush) await this.activeFlush;
    let release!: () => void;
    this.activeFlush = new Promise<void>((r) => (release = r));
    try {
      if (this.stickyFlushError) throw this.stickyFlushError;
      await this.driver.flushToOs?.();
      if (!this.noFlush && this.flushedGeneration !== generation && this.driver.flushToDisk) {
        try {
          await this.driver.flushToDisk();
        } catch (err) {
          this.stickyFlushError = err instanceof VdiskError ? err
            : new VdiskError('EIO', 'io', `${this.filename}: flush failed: ${(err as Error).message}`);
          throw this.stickyFlushError;
        }
      }
      for (const child of [this.driver.children.file, this.driver.children.backing]) {
        if (child && !child.readOnly) await child.flush();
      }
      this.flushedGeneration = generation;
    } finally {
      this.activeFlush = null;
      release();
    }
  }

  /** Flush (unless read-only), close the driver, then its children. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    let firstError: unknown = null;
    try {
      await this.drainWrites();
      await this.storeBitmaps();
      await this.flush();
    } catch (err) {
      firstError = err;
    }
    this.closed = true;
    try {
      await this.driver.close();
    } catch (err) {
      firstError ??= err;
    }
    for (const child of [this.driver.children.file, this.driver.children.backing]) {
      try {
        await child?.close();
      } catch (err) {
        firstError ??= err;
      }
    }
    if (firstError) throw firstError;
  }

  // ---- helpers ------------------------------------------------------------------------

  private checkRequest(offset: number, length: number): void {
    if (this.closed) throw new VdiskError('ESHUTDOWN', 'io', `${this.filename}: node is closed`);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw outOfBounds(`${this.filename}: invalid request offset ${offset} length ${length}`);
    }
    const size = this.getLength();
    if (offset + length > size) {
      throw outOfBounds(`${this.filename}: request ${offset}+${length} is past the end of the image (${size} bytes)`);
    }
  }

  private checkWritable(): void {
    if (this.readOnly) throw readOnlyError(`${this.filename}: image is opened read-only`);
  }

  /** Wait out overlapping serialising requests (or, when serialising, any overlap). */
  private async track(start: number, end: number, serialising: boolean): Promise<TrackedRequest> {
    for (;;) {
      let conflict: TrackedRequest | null = null;
      for (const t of this.tracked) {
        if (t.start < end && start < t.end && (t.serialising || serialising)) {
          conflict = t;
          break;
        }
      }
      if (!conflict) break;
      await conflict.done;
    }
    let finish!: () => void;
    const done = new Promise<void>((r) => (finish = r));
    const req = { start, end, serialising, done, finish };
    this.tracked.add(req);
    return req;
  }

  private untrack(req: TrackedRequest): void {
    this.tracked.delete(req);
    req.finish();
  }

  /** Wait until no tracked request is in flight (used before truncate and close). */
  private async drainWrites(): Promise<void> {
    while (this.tracked.size > 0) {
      const first = this.tracked.values().next().value as TrackedRequest;
      await first.done;
    }
  }
}

export function roundUp(n: number, align: number): number {
  const r = n % align;
  return r === 0 ? n : n + align - r;
}
