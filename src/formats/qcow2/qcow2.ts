// The qcow2 format driver (spec: docs/interop/qcow2.txt; behaviour after QEMU's block/qcow2*.c).
//
// Locking: one metadata lock (QEMU's s->lock). Reads map guest ranges to host ranges under
// it and do the data I/O outside it. Writes to clusters owned by the active layer alone
// (COPIED) also write data outside it. Writes that allocate reserve host clusters and
// register the guest clusters as in flight under the lock, write data (+COW) outside it,
// then link the L2 entries under it (QEMU's QCowL2Meta): a later write, zero, discard or
// compressed write touching a guest cluster in flight waits for it, so no two requests can
// allocate or COW the same cluster. When the lock is free no change is half done, so the
// common cases (cached tables, nothing to wait for) map, reserve and link synchronously
// without taking it; anything that must wait falls back to the locked path.
//
// Write ordering (crash consistency):
//   data (+COW)        before the L2 entry pointing to it (L2 cache depends on a flush after COW)
//   refcount increase  before the L2 entry (L2 cache depends on the refcount cache)
//   L2 entry removal   before the refcount decrease (refcount cache depends on the L2 cache)
//   new L2 table       (zeros) and its refcount stable before the L1 entry; L1/refcount-table pointers last
//                      (a new, empty table's L1 entry needs no barrier of its own: see newL2)
// Lazy refcounts: the dirty bit is set with a stable write before the first metadata change;
// refcounts are then written only on flush/eviction, and repaired on the next writable open.
import type {
  BlockDriver, BlockLimits, DriverCaps, DriverInfo, Extent, Preallocation,
} from '../../block/driver.js';
import { REQ_MAY_UNMAP, REQ_WRITE_COMPRESSED } from '../../block/driver.js';
import { VdiskError, corrupt, invalidArgument, readOnly as readOnlyError, unsupported } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { ChildEdge } from '../../block/edge.js';
import * as C from './constants.js';
import { type Qcow2Header, serializeHeader, sizeToL1 } from './header.js';
import { MetadataCache, Mutex } from './metadata-cache.js';
import { Refcounts } from './refcount.js';
import { type Qcow2Snapshot, snapshotInfo, snapshotTableSize } from './snapshot.js';
import {
  EntryDecoder, KIND_COMPRESSED, KIND_NORMAL, KIND_UNALLOCATED, KIND_ZERO_ALLOC, KIND_ZERO_PLAIN,
  type ClusterKind, type L2Info, entryHi, entryLo, makeEntry, setEntry,
} from './l2entry.js';
import { decompressCluster } from './compress.js';
import { Qcow2Snapshots } from './snapshot-ops.js';
import { Qcow2Bitmaps } from './bitmaps.js';
import type { DirtyBitmap } from '../../block/dirty-bitmap.js';

/** A mapped piece of a guest range. `host` is the host byte offset matching `offset`. */
interface Segment {
  offset: number;
  length: number;
  kind: ClusterKind;
  host: number;
  csize: number;
}

const MAX_TRANSFER = 8 << 20;

/** An already settled promise: the answer of requests that finish without I/O. */
const RESOLVED: Promise<void> = Promise.resolve();

/** Big-endian 32-bit word at byte `p` as a signed int (a small integer for V8: no heap number). */
function word(b: Buffer, p: number): number {
  return (b[p] << 24) | (b[p + 1] << 16) | (b[p + 2] << 8) | b[p + 3];
}

export class Qcow2Driver extends Qcow2Snapshots implements BlockDriver {
  readonly driverName = 'qcow2';
  readonly children: { file: ChildEdge; backing: ChildEdge | null };
  /** I/O to the image file goes through the edge: a graph edit may move it. */
  protected readonly file: ChildEdge;
  readonly caps: DriverCaps;
  readonly clusterSize: number;
  readonly clusterBits: number;
  /** Guest bytes mapped by one L2 table. */
  protected readonly l2Span: number;
  protected readonly l2Entries: number;
  protected readonly dec: EntryDecoder;
  protected readonly lock = new Mutex();
  protected readonly l2Cache: MetadataCache;
  protected readonly refcounts: Refcounts;
  protected l1: Buffer;
  /** Cluster indices holding metadata: writes of guest data there are refused (QEMU's overlap check). */
  protected readonly metadataClusters = new Set<number>();
  /** We set the dirty bit (lazy refcounts) and must clear it on clean close. */
  protected markedDirty = false;
  private corruptReason: string | null = null;
  private closed = false;
  private fixedLimits: BlockLimits | null = null;
  /** The persistent dirty bitmaps stored in the image (bitmaps.ts). */
  readonly bitmaps: Qcow2Bitmaps;

  constructor(
    fileNode: BlockNode,
    readonly h: Qcow2Header,
    protected readonly filename: string,
    private readonly readOnly: boolean,
    l1: Buffer,
    refTable: Buffer,
    readonly snapshots: Qcow2Snapshot[],
    backing: BlockNode | null,
    cacheSizes: { l2: number; refcount: number },
  ) {
    super();
    const file = (this.file = new ChildEdge('file', fileNode));
    this.children = { file, backing: backing && new ChildEdge('backing', backing) };
    this.clusterBits = h.clusterBits;
    this.clusterSize = 2 ** h.clusterBits;
    this.l2Entries = this.clusterSize / 8;
    this.l2Span = this.clusterSize * this.l2Entries;
    this.dec = new EntryDecoder(h.clusterBits, filename);
    this.l1 = l1;
    this.caps = {
      fua: 'emulate',
      writeZeroes: h.version >= 3 ? 'native' : 'none',
      discard: 'native',
      compressedWrites: true,
    };
    this.l2Cache = new MetadataCache('l2', file, this.clusterSize, cacheSizes.l2);
    const rcCache = new MetadataCache('refcount', file, this.clusterSize, cacheSizes.refcount);
    this.refcounts = new Refcounts(file, filename, h.clusterBits, h.refcountOrder, rcCache,
      { tableOffset: h.refcountTableOffset, tableClusters: h.refcountTableClusters }, refTable);
    this.refcounts.onMetadataChange = (off, added) => {
      if (added) this.metadataClusters.add(off / this.clusterSize);
      else this.metadataClusters.delete(off / this.clusterSize);
    };
    this.buildMetadataSet();
    this.bitmaps = new Qcow2Bitmaps({
      file, h, filename, readOnly, refcounts: this.refcounts,
      getLength: () => this.h.size,
      writeHeader: () => this.writeHeader(),
      flushCaches: async () => {
        await this.l2Cache.flush();
        await this.refcounts.cache.flush();
      },
      setMetadata: (offset, bytes, isMetadata) => {
        if (isMetadata) this.addRange(offset, bytes);
        else for (let c = Math.floor(offset / this.clusterSize); c * this.clusterSize < offset + bytes; c++) this.metadataClusters.delete(c);
      },
      locked: (fn) => this.lock.run(fn),
    });
  }

  protected get lazy(): boolean {
    return (this.h.compatibleFeatures & C.QCOW2_COMPAT_LAZY_REFCOUNTS) !== 0n;
  }

  private addRange(offset: number, bytes: number): void {
    if (bytes <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + bytes - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) this.metadataClusters.add(c);
  }

  private buildMetadataSet(): void {
    this.addRange(0, this.clusterSize);
    this.addRange(this.h.l1TableOffset, this.h.l1Size * 8);
    this.addRange(this.refcounts.state.tableOffset, this.refcounts.state.tableClusters * this.clusterSize);
    this.addRange(this.h.snapshotsOffset, snapshotTableSize(this.snapshots));
    for (const s of this.snapshots) this.addRange(s.l1TableOffset, s.l1Size * 8);
    for (let i = 0; i < this.h.l1Size; i++) {
      const hi = entryHi(this.l1, i);
      const lo = entryLo(this.l1, i);
      if (hi === 0 && lo === 0) continue;
      const off = this.dec.l1Offset(hi, lo, i);
      if (off) this.metadataClusters.add(off / this.clusterSize);
    }
    for (let ti = 0; ti < this.refcounts.tableEntries; ti++) {
      const off = this.refcounts.blockOffset(ti);
      if (off) this.metadataClusters.add(off / this.clusterSize);
    }
  }

  limits(): BlockLimits {
    // BlockNode asks on every request: one frozen object, no allocation.
    return (this.fixedLimits ??= Object.freeze({ requestAlignment: 1, maxTransfer: MAX_TRANSFER, optimalTransfer: this.clusterSize }));
  }

  getLength(): number {
    return this.h.size;
  }

  // ---- mapping ----------------------------------------------------------------------------

  /** Map [offset, offset+length) to segments (caller holds the lock). */
  private async mapRange(offset: number, length: number): Promise<Segment[]> {
    const out: Segment[] = [];
    const end = offset + length;
    let pos = offset;
    const push = (s: Segment) => {
      const last = out[out.length - 1];
      if (last && last.kind === s.kind && s.kind !== KIND_COMPRESSED && last.offset + last.length === s.offset &&
          (s.kind === KIND_ZERO_PLAIN || s.kind === KIND_UNALLOCATED || last.host + last.length === s.host)) {
        last.length += s.length;
      } else {
        out.push(s);
      }
    };
    while (pos < end) {
      const l1i = Math.floor(pos / this.l2Span);
      const tableEnd = Math.min(end, (l1i + 1) * this.l2Span);
      const l2Off = this.dec.l1Offset(entryHi(this.l1, l1i), entryLo(this.l1, l1i), l1i);
      if (l2Off === 0) {
        push({ offset: pos, length: tableEnd - pos, kind: KIND_UNALLOCATED, host: 0, csize: 0 });
        pos = tableEnd;
        continue;
      }
      const l2 = await this.l2Cache.get(l2Off);
      try {
        while (pos < tableEnd) {
          const ci = Math.floor(pos / this.clusterSize);
          const idx = ci % this.l2Entries;
          const inCluster = pos - ci * this.clusterSize;
          const n = Math.min(tableEnd, (ci + 1) * this.clusterSize) - pos;
          const e = this.dec.decode(entryHi(l2, idx), entryLo(l2, idx), ci * this.clusterSize);
          const host = e.kind === KIND_NORMAL || e.kind === KIND_ZERO_ALLOC ? e.host + inCluster : e.host;
          push({ offset: pos, length: n, kind: e.kind, host, csize: e.csize });
          pos += n;
        }
      } finally {
        this.l2Cache.release(l2Off);
      }
    }
    return out;
  }

  // ---- reads ------------------------------------------------------------------------------

  /**
   * Fast path: the range lies in one L2 table that is cached, and maps to one kind of
   * cluster (one host run). Mapping is synchronous, so it needs no lock: every metadata
   * change is made whole between two awaits (as QEMU's qcow2_get_host_offset under s->lock).
   * Not an async function: a hole or zero cluster answers with an already settled promise
   * and a data run hands back the file's own promise (no wrapper per request). Anything
   * unusual (uncached table, compressed or corrupt entries, several runs) takes preadSlow.
   */
  pread(offset: number, buf: Buffer): Promise<void> {
    const l2Span = this.l2Span;
    const l1i = Math.floor(offset / l2Span);
    const end = offset + buf.length;
    if (end > (l1i + 1) * l2Span || l1i >= this.h.l1Size) return this.preadSlow(offset, buf);
    const l1 = this.l1;
    const l1hi = word(l1, l1i * 8) & C.OFFSET_MASK_HI;
    const l1lo = word(l1, l1i * 8 + 4) & C.OFFSET_MASK_LO;
    const cs = this.clusterSize;
    if (l1hi === 0 && l1lo === 0) return this.readHole(offset, buf);
    const l2Off = l1hi * 4294967296 + (l1lo >>> 0);
    if (l1hi >= 0x200000 || l2Off % cs !== 0) return this.preadSlow(offset, buf);
    const l2 = this.l2Cache.peek(l2Off);
    if (l2 === null) return this.preadSlow(offset, buf);
    const ci = Math.floor(offset / cs);
    let p = (ci % this.l2Entries) * 8;
    const hi = word(l2, p);
    const lo = word(l2, p + 4);
    if (hi & C.QCOW_OFLAG_COMPRESSED_HI) return this.preadSlow(offset, buf);
    const hostHi = hi & C.OFFSET_MASK_HI;
    const host = hostHi * 4294967296 + ((lo & C.OFFSET_MASK_LO) >>> 0);
    if (hostHi >= 0x200000 || host % cs !== 0) return this.preadSlow(offset, buf);
    let runEnd = (ci + 1) * cs;
    if (host !== 0 && !(lo & C.QCOW_OFLAG_ZERO_LO)) {
      // Data: extend over following clusters that continue the host run.
      let next = host + cs;
      while (runEnd < end) {
        p += 8;
        const h2 = word(l2, p);
        const l2lo = word(l2, p + 4);
        if (h2 & C.QCOW_OFLAG_COMPRESSED_HI || l2lo & C.QCOW_OFLAG_ZERO_LO) break;
        if ((h2 & C.OFFSET_MASK_HI) * 4294967296 + ((l2lo & C.OFFSET_MASK_LO) >>> 0) !== next) break;
        runEnd += cs;
        next += cs;
      }
      if (runEnd >= end) return this.file.pread(host + (offset - ci * cs), buf);
      return this.preadSlow(offset, buf);
    }
    if (runEnd < end) return this.preadSlow(offset, buf);
    if (host === 0 && !(lo & C.QCOW_OFLAG_ZERO_LO)) return this.readHole(offset, buf);
    buf.fill(0);
    return RESOLVED;
  }

  /** Unallocated here: the backing file's bytes, or zeros (without an async frame). */
  private readHole(offset: number, buf: Buffer): Promise<void> {
    if (this.children.backing) return this.readBacking(offset, buf);
    buf.fill(0);
    return RESOLVED;
  }

  private async preadSlow(offset: number, buf: Buffer): Promise<void> {
    const segs = await this.lock.run(() => this.mapRange(offset, buf.length));
    await Promise.all(segs.map((s) => this.readSegment(s, buf.subarray(s.offset - offset, s.offset - offset + s.length))));
  }

  private async readSegment(s: Segment, dest: Buffer): Promise<void> {
    switch (s.kind) {
      case KIND_NORMAL:
        return this.file.pread(s.host, dest);
      case KIND_ZERO_PLAIN:
      case KIND_ZERO_ALLOC:
        dest.fill(0);
        return;
      case KIND_UNALLOCATED:
        return this.readBacking(s.offset, dest);
      default: {
        const cluster = await this.readCompressed(s.host, s.csize);
        const start = s.offset % this.clusterSize;
        cluster.copy(dest, 0, start, start + dest.length);
      }
    }
  }

  private async readBacking(offset: number, dest: Buffer): Promise<void> {
    const backing = this.children.backing;
    if (!backing) {
      dest.fill(0);
      return;
    }
    const n = Math.max(0, Math.min(dest.length, backing.getLength() - offset));
    if (n > 0) await backing.pread(offset, dest.subarray(0, n));
    if (n < dest.length) dest.fill(0, n);
  }

  private async readCompressed(host: number, csize: number): Promise<Buffer> {
    const fileLen = this.file.getLength();
    const n = Math.max(0, Math.min(csize, fileLen - host));
    const input = Buffer.alloc(n);
    if (n > 0) await this.file.pread(host, input);
    return decompressCluster(input, this.clusterSize, this.h.compressionType, this.filename, host);
  }

  /** Old contents of guest range [offset, offset+dest.length) inside one cluster, from its old entry. */
  protected async readOld(e: L2Info, offset: number, dest: Buffer): Promise<void> {
    if (dest.length === 0) return;
    const inCluster = offset % this.clusterSize;
    switch (e.kind) {
      case KIND_NORMAL:
        return this.file.pread(e.host + inCluster, dest);
      case KIND_ZERO_PLAIN:
      case KIND_ZERO_ALLOC:
        dest.fill(0);
        return;
      case KIND_UNALLOCATED:
        return this.readBacking(offset, dest);
      default: {
        const cluster = await this.readCompressed(e.host, e.csize);
        cluster.copy(dest, 0, inCluster, inCluster + dest.length);
      }
    }
  }

  // ---- writes -----------------------------------------------------------------------------

  protected checkWritable(): void {
    if (this.readOnly) throw readOnlyError(`${this.filename}: image is opened read-only`);
    if (this.corruptReason) throw corrupt(`${this.filename}: corruption found (${this.corruptReason}); refusing to write`);
  }

  /**
   * Mark the image corrupt on disk (QEMU's qcow2_signal_corruption) and refuse further writes
   * in this session either way. The message says whether the corrupt bit really reached the
   * disk: when its write or flush fails, a later open would not know.
   */
  private async signalCorruption(reason: string): Promise<never> {
    this.corruptReason = reason;
    if (this.readOnly) throw corrupt(`${this.filename}: ${reason}`);
    this.h.incompatibleFeatures |= C.QCOW2_INCOMPAT_CORRUPT;
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(this.h.incompatibleFeatures);
    try {
      await this.file.pwrite(C.HDR_INCOMPATIBLE_FEATURES, b);
      await this.file.flush();
    } catch (err) {
      const why = err instanceof VdiskError ? `${err.code}: ${err.message}` : String(err);
      throw corrupt(`${this.filename}: ${reason}; writes refused, but marking the image corrupt on disk failed (${why})`);
    }
    throw corrupt(`${this.filename}: ${reason}; image marked corrupt`);
  }

  /** Refuse a guest data write that would land on metadata. */
  protected async checkOverlap(host: number, length: number): Promise<void> {
    const first = Math.floor(host / this.clusterSize);
    const last = Math.floor((host + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) {
      if (this.metadataClusters.has(c)) {
        await this.signalCorruption(`preventing invalid write on metadata at host offset ${c * this.clusterSize}`);
      }
    }
  }

  /** Lazy refcounts: the dirty bit must be stable before any metadata change reaches the file. */
  protected async markDirty(): Promise<void> {
    if (!this.lazy || this.markedDirty || this.h.version < 3) return;
    this.h.incompatibleFeatures |= C.QCOW2_INCOMPAT_DIRTY;
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(this.h.incompatibleFeatures);
    await this.file.pwrite(C.HDR_INCOMPATIBLE_FEATURES, b);
    await this.file.flush();
    this.markedDirty = true;
  }

  /** True when host bytes [host, host+length) touch a metadata cluster. */
  protected overlapsMetadata(host: number, length: number): boolean {
    const first = Math.floor(host / this.clusterSize);
    const last = Math.floor((host + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) if (this.metadataClusters.has(c)) return true;
    return false;
  }

  /**
   * Not an async function: the common cases hand back the file's promise or writeSlow's
   * without a wrapper of their own; the rest (read-only, corrupt, compressed, a write onto
   * metadata) take pwriteChecked, which rejects as before.
   */
  pwrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    if (this.readOnly || this.corruptReason || flags & REQ_WRITE_COMPRESSED) return this.pwriteChecked(offset, buf, flags);
    // Fast path without the lock: one cached L2 table, clusters ours alone (COPIED) and
    // contiguous on the host. The mapping is read synchronously, so it is one consistent
    // state, as under the lock; the data goes to the file outside it either way.
    const host = this.ownedRun(offset, buf.length);
    if (host >= 0) {
      if (this.overlapsMetadata(host, buf.length)) return this.pwriteChecked(offset, buf, flags);
      return this.file.pwrite(host, buf);
    }
    return this.writeSlow(offset, buf);
  }

  private async pwriteChecked(offset: number, buf: Buffer, flags: number): Promise<void> {
    this.checkWritable();
    if (flags & REQ_WRITE_COMPRESSED) return this.writeCompressed(offset, buf);
    const host = this.ownedRun(offset, buf.length);
    if (host >= 0) {
      await this.checkOverlap(host, buf.length);
      return this.file.pwrite(host, buf);
    }
    await this.writeSlow(offset, buf);
  }

  /** Host offset of guest [offset, offset+length) if it is one owned, cached, contiguous run; else -1. */
  private ownedRun(offset: number, length: number): number {
    const l1i = Math.floor(offset / this.l2Span);
    const end = offset + length;
    if (end > (l1i + 1) * this.l2Span) return -1;
    const l1hi = entryHi(this.l1, l1i);
    if (!(l1hi & C.QCOW_OFLAG_COPIED_HI)) return -1;
    const l2Off = this.dec.l1Offset(l1hi, entryLo(this.l1, l1i), l1i);
    if (l2Off === 0) return -1;
    const l2 = this.l2Cache.peek(l2Off);
    if (!l2) return -1;
    const cs = this.clusterSize;
    const ci = Math.floor(offset / cs);
    let host = -1;
    for (let c = ci, idx = ci % this.l2Entries; c * cs < end; c++, idx++) {
      const hi = entryHi(l2, idx);
      const lo = entryLo(l2, idx);
      if (!(hi & C.QCOW_OFLAG_COPIED_HI) || hi & C.QCOW_OFLAG_COMPRESSED_HI || lo & C.QCOW_OFLAG_ZERO_LO) return -1;
      const e = this.dec.decode(hi, lo, c * cs);
      if (e.kind !== KIND_NORMAL) return -1;
      if (c === ci) host = e.host;
      else if (e.host !== host + (c - ci) * cs) return -1;
    }
    return host + (offset - ci * cs);
  }

  // ---- zeroes and discard -----------------------------------------------------------------

  async pwriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    this.checkWritable();
    if (this.h.version < 3) throw unsupported(`${this.filename}: zero clusters need qcow2 version 3`);
    const cs = this.clusterSize;
    const end = offset + length;
    const a = Math.ceil(offset / cs) * cs;
    const b = end === this.h.size ? end : Math.floor(end / cs) * cs;
    const unmap = (flags & REQ_MAY_UNMAP) !== 0;
    const headEnd = Math.min(end, a);
    if (offset < headEnd) await this.zeroPartialCluster(offset, headEnd - offset, unmap);
    if (a < b) await this.lockedExclusive(a, b, () => this.zeroClusters(a, b, unmap, 'zero'));
    const tailStart = Math.max(a, b);
    if (tailStart < end) await this.zeroPartialCluster(tailStart, end - tailStart, unmap);
  }

  /**
   * Zeros over part of one cluster (QEMU's qcow2_co_pwrite_zeroes with a head or tail): when
   * the rest of the cluster already reads as zeros and the cluster holds no data here, the
   * whole cluster becomes a zero cluster (no allocation); otherwise zeros are written as data.
   */
  private async zeroPartialCluster(offset: number, length: number, unmap: boolean): Promise<void> {
    const cs = this.clusterSize;
    const start = Math.floor(offset / cs) * cs;
    const end = offset + length;
    const clusterEnd = Math.min(start + cs, this.h.size);
    if (await this.readsAsZero(start, offset - start) && await this.readsAsZero(end, clusterEnd - end)) {
      const done = await this.lockedExclusive(start, clusterEnd, async () => {
        // A write may have come between: only a cluster without data here may become zero.
        const [seg] = await this.mapRange(start, 1);
        if (seg.kind !== KIND_UNALLOCATED && seg.kind !== KIND_ZERO_PLAIN && seg.kind !== KIND_ZERO_ALLOC) return false;
        await this.zeroClusters(start, clusterEnd, unmap, 'zero');
        return true;
      });
      if (done) return;
    }
    await this.pwrite(offset, Buffer.alloc(length), 0);
  }

  /** Guest bytes [offset, offset+length) read as zeros through the whole chain (QEMU's is_zero). */
  private async readsAsZero(offset: number, length: number): Promise<boolean> {
    if (length <= 0) return true;
    const segs = await this.lock.run(() => this.mapRange(offset, length));
    for (const s of segs) {
      if (s.kind === KIND_ZERO_PLAIN || s.kind === KIND_ZERO_ALLOC) continue;
      if (s.kind !== KIND_UNALLOCATED) return false;
      const backing = this.children.backing;
      if (!backing) {
        if (this.h.backingFile !== null) return false; // not opened: unknown
        continue;
      }
      const stop = Math.min(s.offset + s.length, backing.getLength());
      if (stop <= s.offset) continue;
      const below = await backing.node.blockStatusAbove(s.offset, stop - s.offset);
      if (!below.every((e) => e.zero)) return false;
    }
    return true;
  }

  async pdiscard(offset: number, length: number): Promise<void> {
    this.checkWritable();
    // Version 2 has no zero clusters: dropping a cluster would show the backing file's
    // data instead of the guest's, so the discard does nothing (QEMU's qcow2_co_pdiscard).
    if (this.h.version < 3 && (this.children.backing || this.h.backingFile !== null)) return;
    const cs = this.clusterSize;
    const end = offset + length;
    const a = Math.ceil(offset / cs) * cs;
    const b = end === this.h.size ? end : Math.floor(end / cs) * cs;
    if (a >= b) return; // partial clusters are left alone (discard is advisory)
    await this.lockedExclusive(a, b, () => this.zeroClusters(a, b, true, 'discard'));
  }

  // ---- block status -----------------------------------------------------------------------

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const len = Math.min(length, 64 * this.l2Span);
    const segs = await this.lock.run(() => this.mapRange(offset, len));
    const hasBacking = this.children.backing != null || this.h.backingFile !== null;
    return segs.map((s): Extent => {
      switch (s.kind) {
        case KIND_NORMAL:
          return { offset: s.offset, length: s.length, data: true, zero: false, allocated: true, hostOffset: s.host, hostFile: this.file.filename };
        case KIND_ZERO_ALLOC:
          return { offset: s.offset, length: s.length, data: false, zero: true, allocated: true, hostOffset: s.host, hostFile: this.file.filename };
        case KIND_ZERO_PLAIN:
          return { offset: s.offset, length: s.length, data: false, zero: true, allocated: true };
        case KIND_COMPRESSED:
          return { offset: s.offset, length: s.length, data: true, zero: false, allocated: true };
        default:
          return { offset: s.offset, length: s.length, data: false, zero: !hasBacking, allocated: false };
      }
    });
  }

  // ---- flush and close --------------------------------------------------------------------

  async flushToOs(): Promise<void> {
    if (this.readOnly) return;
    // L2 tables (after the refcounts they depend on), refcounts, then queued discards.
    await this.lock.run(() => this.writeMetadata());
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.readOnly || this.corruptReason) return;
    await this.lock.run(async () => {
      await this.writeMetadata();
      if (this.markedDirty) {
        // Clean shutdown of a lazy-refcounts image: everything is on disk, clear the dirty bit.
        this.h.incompatibleFeatures &= ~C.QCOW2_INCOMPAT_DIRTY;
        const b = Buffer.alloc(8);
        b.writeBigUInt64BE(this.h.incompatibleFeatures);
        await this.file.pwrite(C.HDR_INCOMPATIBLE_FEATURES, b);
        await this.file.flush();
        this.markedDirty = false;
      }
      // The file grew ahead of allocations; cut the unused tail (no ordering needed: unreferenced).
      await this.refcounts.trimTail();
    });
  }

  // ---- persistent dirty bitmaps (bitmaps.ts) ----------------------------------------------

  loadBitmaps(): Promise<DirtyBitmap[]> {
    return this.bitmaps.load();
  }

  async storeBitmaps(bitmaps: readonly DirtyBitmap[]): Promise<void> {
    // A corrupt image is not written: its bitmaps stay in use (inconsistent on the next open).
    if (this.corruptReason) return;
    await this.bitmaps.store(bitmaps);
  }

  checkBitmapStorable(name: string, granularity: number, persistent?: readonly DirtyBitmap[]): void {
    this.bitmaps.checkStorable(name, granularity, persistent);
  }

  async removeStoredBitmap(name: string): Promise<void> {
    this.checkWritable();
    await this.bitmaps.remove(name);
  }

  // ---- header rewrite, resize, backing ----------------------------------------------------

  /** Rewrite the whole header cluster (QEMU's qcow2_update_header): one write, then flush. */
  private async writeHeader(): Promise<void> {
    this.h.refcountTableOffset = this.refcounts.state.tableOffset;
    this.h.refcountTableClusters = this.refcounts.state.tableClusters;
    const bytes = serializeHeader(this.h);
    const cluster = Buffer.alloc(Math.min(this.clusterSize, Math.max(bytes.length, 512)));
    bytes.copy(cluster);
    await this.file.pwrite(0, cluster);
    await this.file.flush();
  }

  async changeBackingFile(name: string | null, format: string | null): Promise<void> {
    this.checkWritable();
    if (name !== null && Buffer.byteLength(name) > C.QCOW2_MAX_BACKING_FILE_NAME) {
      throw invalidArgument(`${this.filename}: backing file name is longer than ${C.QCOW2_MAX_BACKING_FILE_NAME} bytes`);
    }
    if (format !== null && Buffer.byteLength(format) >= 16) throw invalidArgument(`${this.filename}: backing format name '${format}' is too long`);
    await this.lock.run(async () => {
      const saved = { file: this.h.backingFile, fmt: this.h.backingFormat };
      this.h.backingFile = name;
      this.h.backingFormat = name === null ? null : format;
      try {
        await this.writeHeader();
      } catch (err) {
        this.h.backingFile = saved.file;
        this.h.backingFormat = saved.fmt;
        throw err;
      }
    });
  }

  async makeEmpty(): Promise<void> {
    this.checkWritable();
    await this.lockedExclusive(0, this.h.size, () => this.zeroClusters(0, this.h.size, true, 'full'));
    await this.flushToOs();
  }

  async truncate(length: number, prealloc: Preallocation): Promise<void> {
    this.checkWritable();
    this.bitmaps.checkResizable();
    if (length % 512 !== 0) throw invalidArgument(`${this.filename}: qcow2 image size must be a multiple of 512 bytes (asked ${length})`);
    const old = this.h.size;
    if (length < old) {
      if (prealloc !== 'off') throw unsupported(`${this.filename}: preallocation is not supported when shrinking`);
      if (this.snapshots.length > 0) throw unsupported(`${this.filename}: cannot shrink an image with internal snapshots`);
      await this.lockedExclusive(0, old, async () => {
        const a = Math.ceil(length / this.clusterSize) * this.clusterSize;
        if (a < old) await this.zeroClusters(a, old, true, 'full');
        await this.writeMetadata();
        await this.writeSize(length);
      });
      return;
    }
    if (length === old) return;
    const needL1 = sizeToL1(length, this.clusterBits);
    if (needL1 > C.QCOW_MAX_L1_SIZE / 8) {
      throw new VdiskError('EFBIG', 'invalid-argument', `${this.filename}: size ${length} needs an L1 table larger than ${C.QCOW_MAX_L1_SIZE} bytes`);
    }
    await this.lock.run(async () => {
      if (needL1 > this.h.l1Size) await this.growL1(needL1);
    });
    if (prealloc !== 'off') await this.preallocate(old, length, prealloc);
    if (this.growExposesBacking(old)) await this.zeroGrownArea(old, length);
    await this.lock.run(() => this.writeSize(length));
  }

  /**
   * Growing past a backing file that is longer than the old size would show the backing
   * file's bytes (or, after a shrink, a cut cluster's old bytes) in the new area. QEMU's
   * bdrv_co_truncate then asks the driver for zeros (BDRV_REQ_ZERO_WRITE); without a longer
   * backing file it does not, and neither do we (the tail of a cut cluster reads as before).
   * As in QEMU, only an opened backing file counts (create grows the image without it).
   */
  private growExposesBacking(old: number): boolean {
    const backing = this.children.backing;
    return backing != null && backing.getLength() > old;
  }

  /**
   * Make guest bytes [old, length) read as zeros before the header shows them (QEMU's
   * qcow2_co_truncate with BDRV_REQ_ZERO_WRITE): zero clusters from the next cluster
   * boundary (version 3 only: version 2 fails, as QEMU's "Failed to zero out new clusters"),
   * explicit zeros for the rest of the old last cluster.
   */
  private async zeroGrownArea(old: number, length: number): Promise<void> {
    const zeroStart = Math.ceil(old / this.clusterSize) * this.clusterSize;
    if (length > zeroStart) {
      if (this.h.version < 3) {
        throw unsupported(`${this.filename}: Failed to zero out new clusters: Operation not supported (compat=0.10 has no zero clusters to hide the longer backing file)`);
      }
      await this.lockedExclusive(zeroStart, length, () => this.zeroClusters(zeroStart, length, false, 'zero'));
    }
    if (zeroStart > old) await this.pwrite(old, Buffer.alloc(Math.min(zeroStart, length) - old), 0);
    // The zeros must be stable before the header's new size makes the area visible.
    await this.flushToOs();
  }

  protected async writeSize(length: number): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(length));
    await this.file.pwrite(C.HDR_SIZE, b);
    await this.file.flush();
    this.h.size = length;
  }

  /** A larger L1 table (QEMU's qcow2_grow_l1_table with exact size): new table, flush, header, free old. */
  protected async growL1(entries: number): Promise<void> {
    const bytes = entries * 8;
    const clusters = Math.ceil(bytes / this.clusterSize);
    const off = await this.refcounts.alloc(clusters);
    const table = Buffer.alloc(bytes);
    this.l1.copy(table);
    await this.refcounts.cache.flush();
    await this.file.pwrite(off, table);
    await this.file.flush();
    const hdr = Buffer.alloc(12);
    hdr.writeUInt32BE(entries, 0);
    hdr.writeBigUInt64BE(BigInt(off), 4);
    await this.file.pwrite(C.HDR_L1_SIZE, hdr);
    await this.file.flush();
    const oldOff = this.h.l1TableOffset;
    const oldClusters = Math.ceil(this.h.l1Size * 8 / this.clusterSize);
    this.l1 = table;
    this.h.l1Size = entries;
    this.h.l1TableOffset = off;
    this.addRange(off, bytes);
    if (oldOff !== 0 && oldClusters > 0) {
      for (let k = 0; k < oldClusters; k++) this.metadataClusters.delete(oldOff / this.clusterSize + k);
      await this.refcounts.update(oldOff / this.clusterSize, oldClusters, -1);
    }
  }

  /** Allocate every unallocated cluster in [start, end) (metadata, falloc, full). */
  async preallocate(start: number, end: number, mode: Preallocation): Promise<void> {
    if (mode === 'off') return;
    const cs = this.clusterSize;
    let pos = Math.floor(start / cs) * cs;
    while (pos < end) {
      const l1i = Math.floor(pos / this.l2Span);
      const tableEnd = Math.min(Math.ceil(end / cs) * cs, (l1i + 1) * this.l2Span);
      await this.lockedExclusive(pos, tableEnd, async () => {
        const l2Off = await this.getL2ForWrite(l1i);
        const l2 = await this.l2Cache.get(l2Off);
        try {
          const todo: number[] = [];
          for (let p = pos; p < tableEnd; p += cs) {
            const idx = Math.floor(p / cs) % this.l2Entries;
            const e = this.dec.decode(entryHi(l2, idx), entryLo(l2, idx), p);
            if (e.kind === KIND_UNALLOCATED || e.kind === KIND_ZERO_PLAIN) todo.push(idx);
          }
          if (todo.length === 0) return;
          const host = await this.refcounts.alloc(todo.length);
          // falloc and full give the data clusters blocks in the file (QEMU grows the file with
          // that preallocation mode); the allocation above only made the file long enough.
          if (mode === 'full' || mode === 'falloc') await this.file.pwriteZeroes(host, todo.length * cs);
          await this.linkDependency();
          todo.forEach((idx, j) => {
            const [hi, lo] = makeEntry(host + j * cs, true);
            setEntry(l2, idx, hi, lo);
          });
          this.l2Cache.markDirty(l2Off);
        } finally {
          this.l2Cache.release(l2Off);
        }
      });
      pos = tableEnd;
    }
    await this.flushToOs();
  }

  // ---- info -------------------------------------------------------------------------------

  async info(): Promise<DriverInfo> {
    const v3 = this.h.version >= 3;
    const data: Record<string, unknown> = {
      compat: v3 ? '1.1' : '0.10',
      'compression-type': this.h.compressionType === C.QCOW2_COMPRESSION_TYPE_ZSTD ? 'zstd' : 'zlib',
    };
    if (v3) data['lazy-refcounts'] = this.lazy;
    const bitmaps = this.bitmaps.info();
    if (bitmaps.length) data.bitmaps = bitmaps;
    data['refcount-bits'] = 2 ** this.h.refcountOrder;
    if (v3) {
      data.corrupt = (this.h.incompatibleFeatures & C.QCOW2_INCOMPAT_CORRUPT) !== 0n;
      data['extended-l2'] = false;
    }
    const out: DriverInfo = {
      formatSpecific: { type: 'qcow2', data },
      clusterSize: this.clusterSize,
      dirtyFlag: (this.h.incompatibleFeatures & C.QCOW2_INCOMPAT_DIRTY) !== 0n,
      corrupt: (this.h.incompatibleFeatures & C.QCOW2_INCOMPAT_CORRUPT) !== 0n,
    };
    if (this.h.backingFile !== null) out.backingFilename = this.h.backingFile;
    if (this.h.backingFormat) out.backingFormat = this.h.backingFormat;
    if (this.snapshots.length) out.snapshots = this.snapshots.map(snapshotInfo);
    return out;
  }
}
