// BlockNode: one node of the block graph (QEMU's BlockDriverState) and the generic I/O path
// (QEMU's block/io.c). Every request to a driver passes through here exactly once per layer,
// so drivers never repeat: bounds checks, alignment padding by read-modify-write, splitting
// at the driver's maximum transfer, FUA emulation, zero emulation, write generations and
// the flush order.
//
// A node is also a vertex of the block graph: its driver's child edges (edge.ts) lead down,
// `parents` lists the edges that lead to it (from nodes and BlockBackends). Front ends ask
// the node, never its driver: `caps`, `limits` and the generations below answer for
// whatever the graph is now, through filters (QEMU's bdrv_skip_filters).

import {
  REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK,
  type BlockDriver, type BlockLimits, type ChainExtent, type DriverCaps, type DriverInfo, type Extent, type Preallocation,
} from './driver.js';
import { VdiskError, outOfBounds, readOnly as readOnlyError, unsupported } from './errors.js';
import type { DirtyBitmap } from './dirty-bitmap.js';
import { type ChildEdge, parentEdgeSet, parentsOf } from './edge.js';

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
  /** See `zeroGeneration` and `contentGeneration`. */
  private zeroGen = 0;
  private contentGen = 0;
  /** Public requests running on this node (drained() waits for none). */
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];
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
    for (const edge of this.children) edge.attach(this);
  }

  // ---- the graph around this node -----------------------------------------------------

  /** The driver's child edges that lead from this node (file or filtered first, then backing). */
  get children(): ChildEdge[] {
    const c = this.driver.children;
    const out: ChildEdge[] = [];
    for (const e of [c.filtered, c.file, c.backing]) if (e) out.push(e);
    return out;
  }

  /** Edges that point at this node: from parent nodes and from BlockBackends. */
  get parents(): ChildEdge[] {
    return parentsOf(this);
  }

  get file(): BlockNode | undefined {
    return this.driver.children.file?.node;
  }

  /** This node's own backing child (null: none open; undefined: the format has none). */
  get backing(): BlockNode | null | undefined {
    const b = this.driver.children.backing;
    return b === undefined ? undefined : b === null ? null : b.node;
  }

  /** A filter's child; undefined for anything that is not a filter. */
  get filtered(): BlockNode | undefined {
    return this.driver.isFilter ? this.driver.children.filtered?.node : undefined;
  }

  get isFilter(): boolean {
    return this.driver.isFilter === true;
  }

  /** The first node at or below this one that is not a filter (QEMU's bdrv_skip_filters). */
  skipFilters(): BlockNode {
    let n: BlockNode = this;
    for (let f = n.filtered; f; f = n.filtered) n = f;
    return n;
  }

  /** The next image of the backing chain, filters skipped (QEMU's bdrv_backing_chain_next). */
  backingChainNext(): BlockNode | null {
    return this.skipFilters().backing?.skipFilters() ?? null;
  }

  /** The node that holds the bytes of this one all the way down (for messages and `info`). */
  get bottom(): BlockNode {
    let n: BlockNode = this;
    for (let next = n.filtered ?? n.file; next; next = n.filtered ?? n.file) n = next;
    return n;
  }

  /** Capabilities, asked of the driver now (a filter answers with its child's). */
  get caps(): DriverCaps {
    return this.driver.caps;
  }

  /** Request limits, asked of the driver now (a filter answers with its child's). */
  get limits(): BlockLimits {
    return this.driver.limits();
  }

  /**
   * A child edge moved to another node: let the driver drop what it derived from the old
   * child, then tell the parents, up to the BlockBackends (QEMU's bdrv_refresh_limits).
   */
  refreshLimits(): void {
    this.driver.refreshLimits?.();
    this.contentChanged(true);
    const parents = parentEdgeSet(this);
    if (parents) for (const e of parents) if (e.parent instanceof BlockNode) e.parent.refreshLimits();
  }

  /**
   * Bumped before and after anything that may turn data into zeros or holes, in this node or
   * any node below it: write-zeroes, discard, truncate, make-empty, a graph edit. A cache of
   * "this range is data" (the NBD export's sparse-read cache) is valid while this is
   * unchanged, whichever front end or job wrote (pattern 8 of STYLE-live-layer.md).
   */
  get zeroGeneration(): number {
    return this.zeroGen;
  }

  /** Bumped by every change of what this node reads as (writes too), here or below. */
  get contentGeneration(): number {
    return this.contentGen;
  }

  /** Bump the generations here and in every node above (a DAG: a node may be bumped twice, harmlessly). */
  private contentChanged(zeros: boolean): void {
    this.contentGen++;
    if (zeros) this.zeroGen++;
    const parents = parentEdgeSet(this);
    if (parents) for (const e of parents) if (e.parent instanceof BlockNode) e.parent.contentChanged(zeros);
  }

  // ---- requests in flight (drain) -----------------------------------------------------

  get isClosed(): boolean {
    return this.closed;
  }

  /** Requests running on this node now. */
  get requestsInFlight(): number {
    return this.inFlight;
  }

  /** Resolves once no request is running on this node. */
  waitIdle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private enter(): void {
    this.inFlight++;
  }

  private leave(): void {
    if (--this.inFlight === 0 && this.idleWaiters.length > 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  getLength(): number {
    return this.driver.getLength();
  }

  // ---- reads --------------------------------------------------------------------------

  async pread(offset: number, buf: Buffer): Promise<void> {
    this.checkRequest(offset, buf.length);
    if (buf.length === 0) return;
    this.enter();
    try {
      await this.readPadded(offset, buf);
    } finally {
      this.leave();
    }
  }

  private async readPadded(offset: number, buf: Buffer): Promise<void> {
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
    this.enter();
    try {
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
          this.contentChanged(false);
        }
      }
      await this.finishWrite(flags);
    } finally {
      this.leave();
    }
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
    this.enter();
    // Data may become zeros: forget what block status said, before and after.
    this.contentChanged(true);
    try {
      await this.zeroPadded(offset, length, flags);
    } finally {
      this.contentChanged(true);
      this.leave();
    }
  }

  private async zeroPadded(offset: number, length: number, flags: number): Promise<void> {
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
    this.enter();
    this.contentChanged(true);
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
      this.contentChanged(true);
      this.leave();
    }
  }

  async truncate(length: number, prealloc: Preallocation = 'off'): Promise<void> {
    this.checkWritable();
    if (!this.driver.truncate) {
      throw new VdiskError('ENOTSUP', 'unsupported-feature', `${this.filename}: driver '${this.driver.driverName}' cannot resize`);
    }
    this.enter();
    this.contentChanged(true);
    try {
      await this.drainWrites();
      try {
        await this.driver.truncate(length, prealloc);
      } finally {
        this.writeGeneration++;
        // Bitmaps follow the new length; grown space starts clean, as in QEMU
        // (bdrv_dirty_bitmap_truncate), so both agree on the dirty map after a resize. A
        // backup of a resized disk must notice the size change itself (it does: full read).
        const newLength = this.getLength();
        for (const b of this.bitmaps) b.resize(newLength);
      }
    } finally {
      this.contentChanged(true);
      this.leave();
    }
  }

  // ---- image management (image-management.ts): a filter passes it to its child -------

  /** The node whose driver does image management for this one: filters are skipped. */
  private manager(op: 'changeBackingFile' | 'makeEmpty' | 'info'): BlockNode | null {
    for (let n: BlockNode | undefined = this; n; n = n.filtered) {
      if (n.driver[op]) return n;
      if (!n.isFilter) return null;
    }
    return null;
  }

  get canChangeBackingFile(): boolean {
    return this.manager('changeBackingFile') !== null;
  }

  /** Rewrite the backing file reference in the image header (the open graph is not changed). */
  async changeBackingFile(name: string | null, format: string | null): Promise<void> {
    const n = this.manager('changeBackingFile');
    if (!n) throw unsupported(`${this.filename}: format '${this.skipFilters().driver.driverName}' has no backing file`);
    this.checkWritable();
    await n.driver.changeBackingFile!(name, format);
  }

  /** Drop everything this image allocates, so reads fall through to its backing (commit). */
  async makeEmpty(): Promise<void> {
    const n = this.manager('makeEmpty');
    if (!n) throw unsupported(`${this.filename}: format '${this.skipFilters().driver.driverName}' cannot be emptied`);
    this.checkWritable();
    n.enter();
    n.contentChanged(true);
    try {
      await n.driver.makeEmpty!();
    } finally {
      n.writeGeneration++;
      n.contentChanged(true);
      n.leave();
    }
  }

  /** Format-specific facts (qemu-img info), from the first node below that is not a filter. */
  async info(): Promise<DriverInfo> {
    const n = this.manager('info');
    return n ? n.driver.info!() : {};
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
    let raw: Extent[];
    this.enter();
    try {
      raw = await this.driver.blockStatus(offset, length);
    } finally {
      this.leave();
    }
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
   * and are reported at this layer's depth, as qemu-img map does. Filters are passed
   * through: they neither count as a layer nor hide the chain below them.
   */
  async blockStatusAbove(offset: number, length: number, depth = 0): Promise<ChainExtent[]> {
    const image = this.skipFilters();
    if (image !== this) {
      this.checkRequest(offset, length);
      return image.blockStatusAbove(offset, length, depth);
    }
    const top = await this.blockStatus(offset, length);
    const out: ChainExtent[] = [];
    for (const e of top) {
      const backing = this.backingChainNext();
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
    this.enter();
    try {
      await this.flushLocked();
    } finally {
      this.leave();
    }
  }

  private async flushLocked(): Promise<void> {
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
      for (const edge of this.children) {
        if (!edge.node.readOnly) await edge.node.flush();
      }
      this.flushedGeneration = generation;
    } finally {
      this.activeFlush = null;
      release();
    }
  }

  /** Flush (unless read-only), close the driver, then the children no other parent uses. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    let firstError: unknown = null;
    try {
      await this.waitIdle();
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
    // Children go with their last parent: one still used elsewhere in the graph stays open.
    for (const edge of this.children) {
      if (edge.parent !== this) continue;
      const child = edge.node;
      edge.detach();
      if (child.parents.length > 0) continue;
      try {
        await child.close();
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
