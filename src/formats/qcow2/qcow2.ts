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
  BlockDriver, BlockLimits, DriverCaps, DriverInfo, Extent, FormatDriverFactory, FormatOpenContext, Preallocation,
} from '../../block/driver.js';
import { REQ_MAY_UNMAP, REQ_WRITE_COMPRESSED } from '../../block/driver.js';
import { VdiskError, corrupt, invalidArgument, readOnly as readOnlyError, unsupported } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { parseSize } from '../../block/size.js';
import * as C from './constants.js';
import { type Qcow2Header, readHeader, serializeHeader, unknownIncompatibleNames, sizeToL1 } from './header.js';
import { MetadataCache, Mutex } from './metadata-cache.js';
import { Refcounts } from './refcount.js';
import { type Qcow2Snapshot, readSnapshots, snapshotInfo, snapshotTableSize } from './snapshot.js';
import {
  EntryDecoder, KIND_COMPRESSED, KIND_NORMAL, KIND_UNALLOCATED, KIND_ZERO_ALLOC, KIND_ZERO_PLAIN,
  type ClusterKind, type L2Info, entryHi, entryLo, makeEntry, setEntry,
} from './l2entry.js';
import { compressCluster, decompressCluster } from './compress.js';
import { repairRefcounts } from './repair.js';

/** A mapped piece of a guest range. `host` is the host byte offset matching `offset`. */
/** Guest clusters [first, end) whose new host clusters are being written (QEMU's QCowL2Meta). */
interface InflightAlloc {
  first: number;
  end: number;
  done: Promise<void>;
  resolve: () => void;
}

/** A reserved allocation: guest clusters first.. (olds.length of them) at host `host`; data up to guest byte `end`. */
interface AllocStep {
  kind: 'alloc';
  l1i: number;
  first: number;
  host: number;
  /** The host clusters read as zeros already. */
  fresh: boolean;
  olds: L2Info[];
  end: number;
  entry: InflightAlloc;
}

type WriteStep = { kind: 'wait'; until: Promise<void> } | { kind: 'inplace'; host: number; end: number } | AllocStep;

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

export class Qcow2Driver implements BlockDriver {
  readonly driverName = 'qcow2';
  readonly children: { file: BlockNode; backing: BlockNode | null };
  readonly caps: DriverCaps;
  readonly clusterSize: number;
  readonly clusterBits: number;
  /** Guest bytes mapped by one L2 table. */
  private readonly l2Span: number;
  private readonly l2Entries: number;
  private readonly dec: EntryDecoder;
  private readonly lock = new Mutex();
  private readonly l2Cache: MetadataCache;
  private readonly refcounts: Refcounts;
  private l1: Buffer;
  /** Cluster indices holding metadata: writes of guest data there are refused (QEMU's overlap check). */
  private readonly metadataClusters = new Set<number>();
  /** We set the dirty bit (lazy refcounts) and must clear it on clean close. */
  private markedDirty = false;
  private corruptReason: string | null = null;
  /** Partially used cluster for packing compressed data (QEMU's free_byte_offset). */
  private compressedFreeByte = 0;
  private closed = false;
  /** Allocations whose data is being written outside the lock (QEMU's s->cluster_allocs). */
  private readonly inflight = new Set<InflightAlloc>();
  private fixedLimits: BlockLimits | null = null;

  constructor(
    private readonly file: BlockNode,
    readonly h: Qcow2Header,
    private readonly filename: string,
    private readonly readOnly: boolean,
    l1: Buffer,
    refTable: Buffer,
    readonly snapshots: Qcow2Snapshot[],
    backing: BlockNode | null,
    cacheSizes: { l2: number; refcount: number },
  ) {
    this.children = { file, backing };
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
  }

  private get lazy(): boolean {
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
  private async readOld(e: L2Info, offset: number, dest: Buffer): Promise<void> {
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

  private checkWritable(): void {
    if (this.readOnly) throw readOnlyError(`${this.filename}: image is opened read-only`);
    if (this.corruptReason) throw corrupt(`${this.filename}: image is marked corrupt (${this.corruptReason}); refusing to write`);
  }

  /** Mark the image corrupt on disk (QEMU's qcow2_signal_corruption) and refuse further writes. */
  private async signalCorruption(reason: string): Promise<never> {
    this.corruptReason = reason;
    if (!this.readOnly) {
      this.h.incompatibleFeatures |= C.QCOW2_INCOMPAT_CORRUPT;
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(this.h.incompatibleFeatures);
      try {
        await this.file.pwrite(C.HDR_INCOMPATIBLE_FEATURES, b);
        await this.file.flush();
      } catch {
        // the error below is what matters
      }
    }
    throw corrupt(`${this.filename}: ${reason}; image marked corrupt`);
  }

  /** Refuse a guest data write that would land on metadata. */
  private async checkOverlap(host: number, length: number): Promise<void> {
    const first = Math.floor(host / this.clusterSize);
    const last = Math.floor((host + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) {
      if (this.metadataClusters.has(c)) {
        await this.signalCorruption(`preventing invalid write on metadata at host offset ${c * this.clusterSize}`);
      }
    }
  }

  /** Lazy refcounts: the dirty bit must be stable before any metadata change reaches the file. */
  private async markDirty(): Promise<void> {
    if (!this.lazy || this.markedDirty || this.h.version < 3) return;
    this.h.incompatibleFeatures |= C.QCOW2_INCOMPAT_DIRTY;
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(this.h.incompatibleFeatures);
    await this.file.pwrite(C.HDR_INCOMPATIBLE_FEATURES, b);
    await this.file.flush();
    this.markedDirty = true;
  }

  /** True when host bytes [host, host+length) touch a metadata cluster. */
  private overlapsMetadata(host: number, length: number): boolean {
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

  /**
   * Writes that allocate (QEMU's qcow2_co_pwritev_task): piece by piece, under the lock decide
   * and reserve (allocate host clusters, register the guest clusters as in flight), write the
   * data (and COW) outside the lock, then link the L2 entries under the lock. Later writers
   * to a guest cluster in flight wait for it (QEMU's handle_dependencies).
   */
  private async writeSlow(offset: number, buf: Buffer): Promise<void> {
    const end = offset + buf.length;
    let pos = offset;
    while (pos < end) {
      // With the lock free, no metadata change is half done: plan synchronously when all
      // it needs is at hand (as if under the lock, which nobody can take meanwhile).
      const step = (!this.lock.held && this.prepareWriteSync(pos, end)) || await this.lock.run(() => this.prepareWrite(pos, end));
      if (step.kind === 'wait') {
        await step.until;
        continue;
      }
      if (step.kind === 'inplace') {
        await this.file.pwrite(step.host, buf.subarray(pos - offset, step.end - offset));
        pos = step.end;
        continue;
      }
      await this.writeAllocated(step, pos, buf.subarray(pos - offset, step.end - offset));
      pos = step.end;
    }
  }

  /** The first in-flight allocation overlapping guest clusters [first, end), if any. */
  private inflightOverlap(first: number, end: number): InflightAlloc | null {
    for (const a of this.inflight) if (a.first < end && first < a.end) return a;
    return null;
  }

  /**
   * Run `fn` under the lock once no allocation in flight overlaps guest bytes [a, b)
   * (for the operations that change L2 entries without going through prepareWrite).
   */
  private async lockedExclusive<T>(a: number, b: number, fn: () => Promise<T>): Promise<T> {
    const first = Math.floor(a / this.clusterSize);
    const end = Math.ceil(b / this.clusterSize);
    for (;;) {
      let wait: Promise<void> | null = null;
      const r = await this.lock.run(async () => {
        const f = this.inflightOverlap(first, end);
        if (f) {
          wait = f.done;
          return null;
        }
        return { value: await fn() };
      });
      if (r) return r.value;
      await wait;
    }
  }

  /** In place: the end of the run of owned clusters from `ci` whose host offsets follow `e`'s. */
  private ownedRunEnd(l2: Buffer, ci: number, e: L2Info, tableEnd: number): number {
    const cs = this.clusterSize;
    let runEnd = Math.min(tableEnd, (ci + 1) * cs);
    let nextHost = e.host + cs;
    while (runEnd < tableEnd) {
      const cj = runEnd / cs;
      const f = this.dec.decode(entryHi(l2, cj % this.l2Entries), entryLo(l2, cj % this.l2Entries), runEnd);
      if (f.kind !== KIND_NORMAL || !f.copied || f.host !== nextHost) break;
      runEnd = Math.min(tableEnd, runEnd + cs);
      nextHost += cs;
    }
    return runEnd;
  }

  /** Allocate: the run of clusters from `ci` that all need new host clusters, up to the next one in flight. */
  private allocationRun(l2: Buffer, ci: number, e: L2Info, tableEnd: number): { olds: L2Info[]; runEnd: number } {
    const cs = this.clusterSize;
    let limit = Infinity;
    for (const a of this.inflight) if (a.first > ci && a.first < limit) limit = a.first;
    const olds: L2Info[] = [e];
    let runEnd = Math.min(tableEnd, (ci + 1) * cs);
    while (runEnd < tableEnd) {
      const cj = runEnd / cs;
      if (cj >= limit) break;
      const f = this.dec.decode(entryHi(l2, cj % this.l2Entries), entryLo(l2, cj % this.l2Entries), runEnd);
      if (f.kind === KIND_NORMAL && f.copied) break;
      olds.push(f);
      runEnd = Math.min(tableEnd, runEnd + cs);
    }
    return { olds, runEnd };
  }

  /**
   * prepareWrite() for the common cases, without waiting (lock free, caller does not take
   * it): the L2 table ours and cached, refcount blocks cached, the file long enough, no
   * dirty bit to set, no write onto metadata. Else null, with nothing changed.
   */
  private prepareWriteSync(pos: number, end: number): WriteStep | null {
    const cs = this.clusterSize;
    const ci = Math.floor(pos / cs);
    if (this.needMarkDirty) return null;
    const blocked = this.inflightOverlap(ci, ci + 1);
    if (blocked) return { kind: 'wait', until: blocked.done };
    const l1i = Math.floor(pos / this.l2Span);
    const tableEnd = Math.min(end, (l1i + 1) * this.l2Span);
    const l2Off = this.ownedL2(l1i);
    if (l2Off === 0) return null;
    const l2 = this.l2Cache.peek(l2Off);
    if (l2 === null) return null;
    const e = this.dec.decode(entryHi(l2, ci % this.l2Entries), entryLo(l2, ci % this.l2Entries), ci * cs);
    if (e.kind === KIND_NORMAL && e.copied) {
      const runEnd = this.ownedRunEnd(l2, ci, e, tableEnd);
      const host = e.host + (pos - ci * cs);
      if (this.overlapsMetadata(host, runEnd - pos)) return null;
      return { kind: 'inplace', host, end: runEnd };
    }
    const { olds, runEnd } = this.allocationRun(l2, ci, e, tableEnd);
    const k = olds.length;
    const got = this.refcounts.tryAllocRun(k);
    if (got === null) return null;
    let resolve!: () => void;
    const done = new Promise<void>((r) => (resolve = r));
    const entry: InflightAlloc = { first: ci, end: ci + k, done, resolve };
    this.inflight.add(entry);
    return { kind: 'alloc', l1i, first: ci, host: got.offset, fresh: got.fresh, olds, end: runEnd, entry };
  }

  /** Plan the next piece of a write starting at `pos` (lock held). */
  private async prepareWrite(pos: number, end: number): Promise<WriteStep> {
    const cs = this.clusterSize;
    const ci = Math.floor(pos / cs);
    const blocked = this.inflightOverlap(ci, ci + 1);
    if (blocked) return { kind: 'wait', until: blocked.done };
    const l1i = Math.floor(pos / this.l2Span);
    const tableEnd = Math.min(end, (l1i + 1) * this.l2Span);
    const l2Off = this.ownedL2(l1i) || await this.getL2ForWrite(l1i);
    const l2 = this.l2Cache.getSync(l2Off) ?? await this.l2Cache.get(l2Off);
    try {
      const e = this.dec.decode(entryHi(l2, ci % this.l2Entries), entryLo(l2, ci % this.l2Entries), ci * cs);
      if (e.kind === KIND_NORMAL && e.copied) {
        const runEnd = this.ownedRunEnd(l2, ci, e, tableEnd);
        const host = e.host + (pos - ci * cs);
        await this.checkOverlap(host, runEnd - pos);
        return { kind: 'inplace', host, end: runEnd };
      }
      const { olds, runEnd } = this.allocationRun(l2, ci, e, tableEnd);
      if (this.needMarkDirty) await this.markDirty();
      const k = olds.length;
      const { offset: host, fresh } = this.refcounts.tryAllocRun(k) ?? await this.refcounts.allocRun(k, true);
      let resolve!: () => void;
      const done = new Promise<void>((r) => (resolve = r));
      const entry: InflightAlloc = { first: ci, end: ci + k, done, resolve };
      this.inflight.add(entry);
      return { kind: 'alloc', l1i, first: ci, host, fresh, olds, end: runEnd, entry };
    } finally {
      this.l2Cache.release(l2Off);
    }
  }

  /** Entries whose old contents read as zeros (no COW read needed). */
  private readsZero(e: L2Info): boolean {
    return e.kind === KIND_ZERO_PLAIN || e.kind === KIND_ZERO_ALLOC || (e.kind === KIND_UNALLOCATED && !this.children.backing);
  }

  /** Data (and COW) of a reserved allocation, outside the lock; then link it (or give it back). */
  private async writeAllocated(step: AllocStep, pos: number, data: Buffer): Promise<void> {
    const cs = this.clusterSize;
    const k = step.olds.length;
    const runStart = step.first * cs;
    const head = pos - runStart;
    const tail = runStart + k * cs - step.end;
    let cow = false;
    try {
      if (head === 0 && tail === 0) {
        await this.file.pwrite(step.host, data);
      } else if (step.fresh && (head === 0 || this.readsZero(step.olds[0])) && (tail === 0 || this.readsZero(step.olds[k - 1]))) {
        // Fresh host clusters already read as zeros: write only the guest's bytes.
        await this.file.pwrite(step.host + head, data);
      } else {
        const whole = Buffer.allocUnsafe(k * cs);
        await this.readOld(step.olds[0], runStart, whole.subarray(0, head));
        data.copy(whole, head);
        await this.readOld(step.olds[k - 1], step.end, whole.subarray(whole.length - tail));
        await this.file.pwrite(step.host, whole);
        cow = true;
      }
    } catch (err) {
      await this.lock.run(async () => {
        try {
          await this.refcounts.update(step.host / cs, k, -1);
        } finally {
          this.inflight.delete(step.entry);
          step.entry.resolve();
        }
      }).catch(() => {});
      throw err;
    }
    if (!this.lock.held) {
      // Lock free: link synchronously when nothing needs waiting for (see linkSync).
      let linked = false;
      try {
        linked = this.linkSync(step, cow);
      } catch (err) {
        this.inflight.delete(step.entry);
        step.entry.resolve();
        throw err;
      }
      if (linked) {
        this.inflight.delete(step.entry);
        step.entry.resolve();
        return;
      }
    }
    await this.lock.run(async () => {
      try {
        await this.linkAllocation(step, cow);
      } finally {
        this.inflight.delete(step.entry);
        step.entry.resolve();
      }
    });
  }

  /**
   * linkAllocation() without waiting, for the common case (caller checked the lock is free):
   * the L2 table ours and cached, its write-back already ordered after the refcounts (or
   * lazy refcounts), and the replaced entries holding no host cluster (nothing to free).
   * False, with nothing changed, when any of that does not hold.
   */
  private linkSync(step: AllocStep, cow: boolean): boolean {
    if (!this.lazy && !this.l2Cache.dependsOnCache(this.refcounts.cache)) return false;
    const l2Off = this.ownedL2(step.l1i);
    if (l2Off === 0) return false;
    const l2 = this.l2Cache.peek(l2Off);
    if (l2 === null) return false;
    const cs = this.clusterSize;
    const k = step.olds.length;
    for (let j = 0; j < k; j++) {
      const idx = (step.first + j) % this.l2Entries;
      const kind = this.dec.decode(entryHi(l2, idx), entryLo(l2, idx), (step.first + j) * cs).kind;
      if (kind !== KIND_UNALLOCATED && kind !== KIND_ZERO_PLAIN) return false;
    }
    // The COW'd bytes were stable before; the L2 entry must not get ahead of them.
    if (cow) this.l2Cache.setDependsOnFlush();
    for (let j = 0; j < k; j++) {
      const [hi, lo] = makeEntry(step.host + j * cs, true);
      setEntry(l2, (step.first + j) % this.l2Entries, hi, lo);
    }
    this.l2Cache.markDirty(l2Off);
    return true;
  }

  /** Point the L2 entries at the newly written clusters, then drop the old references (lock held). */
  private async linkAllocation(step: AllocStep, cow: boolean): Promise<void> {
    const cs = this.clusterSize;
    const k = step.olds.length;
    const l2Off = this.ownedL2(step.l1i) || await this.getL2ForWrite(step.l1i);
    const l2 = this.l2Cache.getSync(l2Off) ?? await this.l2Cache.get(l2Off);
    const olds: L2Info[] = [];
    try {
      // The COW'd bytes were stable before; the L2 entry must not get ahead of them.
      if (cow) this.l2Cache.setDependsOnFlush();
      if (!this.lazy && !this.l2Cache.dependsOnCache(this.refcounts.cache)) await this.linkDependency();
      for (let j = 0; j < k; j++) {
        const idx = (step.first + j) % this.l2Entries;
        // Re-read: the entry as it is now is what this write replaces.
        olds.push(this.dec.decode(entryHi(l2, idx), entryLo(l2, idx), (step.first + j) * cs));
        const [hi, lo] = makeEntry(step.host + j * cs, true);
        setEntry(l2, idx, hi, lo);
      }
      this.l2Cache.markDirty(l2Off);
    } finally {
      this.l2Cache.release(l2Off);
    }
    for (const o of olds) if (o.kind !== KIND_UNALLOCATED && o.kind !== KIND_ZERO_PLAIN) await this.freeOld(o, false);
  }

  /** The L2 table offset for `l1i` when it exists and is ours alone (no allocation or copy needed), else 0. */
  private ownedL2(l1i: number): number {
    const hi = entryHi(this.l1, l1i);
    if (!(hi & C.QCOW_OFLAG_COPIED_HI)) return 0;
    return this.dec.l1Offset(hi, entryLo(this.l1, l1i), l1i);
  }

  /** markDirty() has something to do. */
  private get needMarkDirty(): boolean {
    return this.lazy && !this.markedDirty && this.h.version >= 3;
  }

  /** The L2 table for L1 index `l1i`, allocated or copied (if shared) so that we may modify it. */
  private async getL2ForWrite(l1i: number): Promise<number> {
    const hi = entryHi(this.l1, l1i);
    const lo = entryLo(this.l1, l1i);
    const old = this.dec.l1Offset(hi, lo, l1i);
    if (old !== 0 && hi & C.QCOW_OFLAG_COPIED_HI) return old;
    await this.markDirty();
    if (old === 0) return this.newL2(l1i);
    const fresh = await this.refcounts.alloc(1);
    const table = await this.l2Cache.getEmpty(fresh);
    try {
      if (old !== 0) {
        // Shared with a snapshot: copy it (spec: COPIED clear means copy before modifying).
        const src = await this.l2Cache.get(old);
        src.copy(table);
        this.l2Cache.release(old);
      }
    } finally {
      this.l2Cache.release(fresh);
    }
    this.metadataClusters.add(fresh / this.clusterSize);
    // The refcount of the new table, then the table, must be on disk before the L1 entry.
    await this.refcounts.cache.flush();
    await this.l2Cache.flush();
    const [nhi, nlo] = makeEntry(fresh, true);
    const entry = Buffer.alloc(8);
    entry.writeUInt32BE(nhi, 0);
    entry.writeUInt32BE(nlo, 4);
    await this.file.pwrite(this.h.l1TableOffset + l1i * 8, entry);
    await this.file.flush();
    setEntry(this.l1, l1i, nhi, nlo);
    if (old !== 0) {
      const freed = await this.refcounts.update(old / this.clusterSize, 1, -1);
      if (freed.length) {
        this.l2Cache.discard(old);
        this.metadataClusters.delete(old / this.clusterSize);
      }
    }
    return fresh;
  }

  /**
   * A new, empty L2 table for L1 index `l1i` (nothing to copy). On disk an empty table is a
   * cluster of zeros: a host cluster never used since open already is one, any other gets
   * zeros written. One barrier makes that and the table's refcount stable; then the L1 entry
   * is written without a barrier of its own: until it reaches the disk the table is merely
   * leaked, and every later barrier (before any L2 or refcount write that could depend on
   * it, and every guest flush) carries it. QEMU's l2_allocate flushes three times here.
   */
  private async newL2(l1i: number): Promise<number> {
    const { offset, fresh } = await this.refcounts.allocRun(1, false);
    await this.l2Cache.getEmpty(offset);
    this.l2Cache.release(offset);
    this.metadataClusters.add(offset / this.clusterSize);
    if (!fresh) await this.file.pwrite(offset, Buffer.alloc(this.clusterSize));
    await this.refcounts.cache.flush();
    const [nhi, nlo] = makeEntry(offset, true);
    const entry = Buffer.alloc(8);
    entry.writeUInt32BE(nhi, 0);
    entry.writeUInt32BE(nlo, 4);
    await this.file.pwrite(this.h.l1TableOffset + l1i * 8, entry);
    setEntry(this.l1, l1i, nhi, nlo);
    return offset;
  }

  /** Drop the references an old L2 entry held (after the L2 change is in the cache). */
  private async freeOld(e: L2Info, discardBelow: boolean): Promise<void> {
    let freed: number[] = [];
    if (e.kind === KIND_NORMAL || e.kind === KIND_ZERO_ALLOC) {
      await this.refcounts.cache.setDependency(this.l2Cache);
      freed = await this.refcounts.update(e.host / this.clusterSize, 1, -1);
    } else if (e.kind === KIND_COMPRESSED) {
      await this.refcounts.cache.setDependency(this.l2Cache);
      const first = Math.floor(e.host / this.clusterSize);
      const last = Math.floor((e.host + e.csize - 1) / this.clusterSize);
      freed = await this.refcounts.update(first, last - first + 1, -1);
    }
    if (discardBelow) {
      for (const c of freed) await this.file.pdiscard(c * this.clusterSize, this.clusterSize).catch(() => {});
    }
  }

  private async linkDependency(): Promise<void> {
    if (!this.lazy) await this.l2Cache.setDependency(this.refcounts.cache);
  }

  /** REQ_WRITE_COMPRESSED: whole clusters only; stored compressed when that is smaller. */
  private async writeCompressed(offset: number, buf: Buffer): Promise<void> {
    const cs = this.clusterSize;
    if (offset % cs !== 0 || (buf.length % cs !== 0 && offset + buf.length !== this.h.size)) {
      throw invalidArgument(`${this.filename}: compressed writes must cover whole clusters (${cs} bytes)`);
    }
    for (let pos = 0; pos < buf.length; pos += cs) {
      let cluster = buf.subarray(pos, Math.min(buf.length, pos + cs));
      if (cluster.length < cs) cluster = Buffer.concat([cluster, Buffer.alloc(cs - cluster.length)]);
      const packed = await compressCluster(cluster, this.h.compressionType, this.filename);
      if (!packed) {
        await this.writeSlow(offset + pos, buf.subarray(pos, Math.min(buf.length, pos + cs)));
        continue;
      }
      await this.lockedExclusive(offset + pos, offset + pos + cs, () => this.storeCompressed(offset + pos, packed));
    }
  }

  private async storeCompressed(guest: number, packed: Buffer): Promise<void> {
    const cs = this.clusterSize;
    const l1i = Math.floor(guest / this.l2Span);
    const l2Off = await this.getL2ForWrite(l1i);
    await this.markDirty();
    // Pack into the partly used cluster when it fits (QEMU's qcow2_alloc_bytes).
    // The pack cluster is forgotten by Refcounts as soon as it is freed, so it can never be
    // a cluster that was freed and handed to someone else meanwhile.
    let host: number;
    const free = this.compressedFreeByte;
    const packCluster = Math.floor(free / cs);
    if (free % cs !== 0 && packCluster === this.refcounts.packCluster && (free % cs) + packed.length <= cs) {
      host = free;
      await this.refcounts.update(packCluster, 1, 1);
    } else {
      host = await this.refcounts.alloc(1);
      this.refcounts.packCluster = host / cs;
    }
    this.compressedFreeByte = host + packed.length;
    await this.file.pwrite(host, packed);
    const l2 = await this.l2Cache.get(l2Off);
    try {
      const idx = Math.floor(guest / cs) % this.l2Entries;
      const old = this.dec.decode(entryHi(l2, idx), entryLo(l2, idx), guest);
      await this.linkDependency();
      const [hi, lo] = this.dec.compressedEntry(host, packed.length);
      setEntry(l2, idx, hi, lo);
      this.l2Cache.markDirty(l2Off);
      await this.freeOld(old, false);
    } finally {
      this.l2Cache.release(l2Off);
    }
  }

  // ---- zeroes and discard -----------------------------------------------------------------

  async pwriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    this.checkWritable();
    if (this.h.version < 3) throw unsupported(`${this.filename}: zero clusters need qcow2 version 3`);
    const cs = this.clusterSize;
    const end = offset + length;
    const a = Math.ceil(offset / cs) * cs;
    const b = end === this.h.size ? end : Math.floor(end / cs) * cs;
    if (a >= b) {
      await this.pwrite(offset, Buffer.alloc(length), 0);
      return;
    }
    if (offset < a) await this.pwrite(offset, Buffer.alloc(a - offset), 0);
    await this.lockedExclusive(a, b, () => this.zeroClusters(a, b, (flags & REQ_MAY_UNMAP) !== 0, 'zero'));
    if (b < end) await this.pwrite(b, Buffer.alloc(end - b), 0);
  }

  async pdiscard(offset: number, length: number): Promise<void> {
    this.checkWritable();
    const cs = this.clusterSize;
    const end = offset + length;
    const a = Math.ceil(offset / cs) * cs;
    const b = end === this.h.size ? end : Math.floor(end / cs) * cs;
    if (a >= b) return; // partial clusters are left alone (discard is advisory)
    await this.lockedExclusive(a, b, () => this.zeroClusters(a, b, true, 'discard'));
  }

  /**
   * Set the entries of whole clusters [a, b) (b may be the unaligned end of the image):
   *   zero:    ZERO flag; keep an owned allocation unless unmap (QEMU's zero_in_l2_slice)
   *   discard: ZERO on v3 when it would otherwise expose the backing or was allocated, else 0
   *   full:    0 (reads fall through to the backing: make_empty, shrink)
   */
  private async zeroClusters(a: number, b: number, unmap: boolean, mode: 'zero' | 'discard' | 'full'): Promise<void> {
    const hasBacking = this.h.backingFile !== null;
    const v3 = this.h.version >= 3;
    let pos = a;
    while (pos < b) {
      const l1i = Math.floor(pos / this.l2Span);
      const tableEnd = Math.min(b, (l1i + 1) * this.l2Span);
      const existing = this.dec.l1Offset(entryHi(this.l1, l1i), entryLo(this.l1, l1i), l1i);
      if (existing === 0 && (mode !== 'zero' && (mode === 'full' || !hasBacking || !v3))) {
        pos = tableEnd;
        continue;
      }
      const l2Off = await this.getL2ForWrite(l1i);
      const l2 = await this.l2Cache.get(l2Off);
      const olds: L2Info[] = [];
      try {
        await this.markDirty();
        for (; pos < tableEnd; pos += this.clusterSize) {
          const ci = Math.floor(pos / this.clusterSize);
          const idx = ci % this.l2Entries;
          const old = this.dec.decode(entryHi(l2, idx), entryLo(l2, idx), pos);
          let hi = 0;
          let lo = 0;
          let keep = false;
          if (mode === 'zero') {
            if (!unmap && old.kind === KIND_NORMAL && old.copied) {
              [hi, lo] = makeEntry(old.host, true, true);
              keep = true;
            } else if (!unmap && old.kind === KIND_ZERO_ALLOC && old.copied) {
              [hi, lo] = makeEntry(old.host, true, true);
              keep = true;
            } else {
              lo = C.QCOW_OFLAG_ZERO_LO;
            }
          } else if (mode === 'discard') {
            if (v3 && (hasBacking || old.kind !== KIND_UNALLOCATED)) lo = C.QCOW_OFLAG_ZERO_LO;
          }
          if (entryHi(l2, idx) === hi && entryLo(l2, idx) === lo) continue;
          setEntry(l2, idx, hi, lo);
          if (!keep) olds.push(old);
        }
        this.l2Cache.markDirty(l2Off);
      } finally {
        this.l2Cache.release(l2Off);
      }
      for (const o of olds) await this.freeOld(o, true);
    }
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
    await this.lock.run(async () => {
      // QEMU's qcow2_write_caches: L2 tables (after the refcounts they depend on), then refcounts.
      await this.l2Cache.flush();
      await this.refcounts.cache.flush();
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.readOnly || this.corruptReason) return;
    await this.lock.run(async () => {
      await this.l2Cache.flush();
      await this.refcounts.cache.flush();
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
    if (length % 512 !== 0) throw invalidArgument(`${this.filename}: qcow2 image size must be a multiple of 512 bytes (asked ${length})`);
    const old = this.h.size;
    if (length < old) {
      if (prealloc !== 'off') throw unsupported(`${this.filename}: preallocation is not supported when shrinking`);
      if (this.snapshots.length > 0) throw unsupported(`${this.filename}: cannot shrink an image with internal snapshots`);
      await this.lockedExclusive(0, old, async () => {
        const a = Math.ceil(length / this.clusterSize) * this.clusterSize;
        if (a < old) await this.zeroClusters(a, old, true, 'full');
        await this.l2Cache.flush();
        await this.refcounts.cache.flush();
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
      await this.writeSize(length);
    });
    if (prealloc !== 'off') await this.preallocate(old, length, prealloc);
  }

  private async writeSize(length: number): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(length));
    await this.file.pwrite(C.HDR_SIZE, b);
    await this.file.flush();
    this.h.size = length;
  }

  /** A larger L1 table (QEMU's qcow2_grow_l1_table with exact size): new table, flush, header, free old. */
  private async growL1(entries: number): Promise<void> {
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
          if (mode === 'full') await this.file.pwriteZeroes(host, todo.length * cs);
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

// ---- open ---------------------------------------------------------------------------------

function cacheSizes(h: Qcow2Header, options: Record<string, string>, filename: string): { l2: number; refcount: number } {
  const cs = 2 ** h.clusterBits;
  const get = (k: string) => (options[k] !== undefined ? parseSize(options[k], k, { allowZero: true }) : undefined);
  const combined = get('cache-size');
  const l2Set = get('l2-cache-size');
  const rcSet = get('refcount-cache-size');
  // QEMU's read_cache_sizes: the L2 cache covers the whole disk, up to 32 MiB of tables.
  const maxL2 = Math.ceil(Math.ceil(h.size / cs) * 8 / cs) * cs;
  let l2 = Math.min(maxL2, l2Set ?? C.DEFAULT_L2_CACHE_MAX_SIZE);
  let rc = rcSet ?? C.MIN_REFCOUNT_CACHE_SIZE * cs;
  if (combined !== undefined) {
    if (l2Set !== undefined && rcSet !== undefined) {
      throw invalidArgument(`${filename}: cache-size, l2-cache-size and refcount-cache-size may not be set at the same time`);
    }
    if (l2Set !== undefined) rc = Math.max(0, combined - l2);
    else if (rcSet !== undefined) l2 = Math.max(0, combined - rc);
    else {
      l2 = Math.min(maxL2, combined);
      rc = Math.max(0, combined - l2);
    }
  }
  return {
    l2: Math.max(C.MIN_L2_CACHE_SIZE, Math.floor(l2 / cs)),
    refcount: Math.max(C.MIN_REFCOUNT_CACHE_SIZE, Math.floor(rc / cs)),
  };
}

export async function openQcow2(file: BlockNode, ctx: FormatOpenContext): Promise<Qcow2Driver> {
  const fn = ctx.filename;
  const h = await readHeader(file, fn);
  const unknown = unknownIncompatibleNames(h);
  if (unknown.length) throw unsupported(`${fn}: Unsupported IMAGE feature(s): ${unknown.join(', ')}`);
  if (h.cryptMethod !== C.QCOW_CRYPT_NONE) throw unsupported(`${fn}: encrypted qcow2 images (crypt_method ${h.cryptMethod}) are not supported`);
  if (h.incompatibleFeatures & C.QCOW2_INCOMPAT_CORRUPT && !ctx.readOnly) {
    throw corrupt(`${fn}: qcow2 image is marked corrupt (corrupt bit); it can only be opened read-only (run 'qemu-img check -r all' to repair)`);
  }
  const cs = 2 ** h.clusterBits;
  const cacheSz = cacheSizes(h, ctx.options, fn);

  const readTable = async (off: number, bytes: number, what: string): Promise<Buffer> => {
    const b = Buffer.alloc(bytes);
    if (bytes > 0) {
      if (off + bytes > file.getLength()) throw corrupt(`${fn}: ${what} at ${off} (${bytes} bytes) is past the end of the file`);
      await file.pread(off, b);
    }
    return b;
  };
  let l1 = await readTable(h.l1TableOffset, h.l1Size * 8, 'L1 table');
  let refTable = await readTable(h.refcountTableOffset, h.refcountTableClusters * cs, 'refcount table');
  const snapshots = await readSnapshots(file, h, fn);

  if (!ctx.readOnly) {
    let rewrite = false;
    if (h.incompatibleFeatures & C.QCOW2_INCOMPAT_DIRTY) {
      // Unclean shutdown with lazy refcounts: rebuild the refcounts from the tables.
      const st = await repairRefcounts(file, h, l1, snapshots, fn);
      refTable = st.table;
      l1 = st.l1;
      h.refcountTableOffset = st.tableOffset;
      h.refcountTableClusters = st.tableClusters;
      h.incompatibleFeatures &= ~C.QCOW2_INCOMPAT_DIRTY;
      rewrite = true;
    }
    // We do not maintain persistent bitmaps or anything else behind autoclear bits.
    if (h.autoclearFeatures !== 0n) {
      h.autoclearFeatures = 0n;
      h.bitmaps = null;
      rewrite = true;
    }
    if (rewrite) {
      const bytes = serializeHeader(h);
      await file.pwrite(0, bytes);
      await file.flush();
    }
  }

  let backing: BlockNode | null = null;
  if (h.backingFile !== null && ctx.wantBacking) {
    backing = await ctx.openBacking(h.backingFile, h.backingFormat ?? undefined);
  }
  try {
    return new Qcow2Driver(file, h, fn, ctx.readOnly, l1, refTable, snapshots, backing, cacheSz);
  } catch (err) {
    await backing?.close().catch(() => {});
    throw err;
  }
}

export const qcow2Format: FormatDriverFactory = {
  name: 'qcow2',
  createOptions: [
    'size', 'compat', 'backing_file', 'backing_fmt', 'cluster_size', 'preallocation',
    'lazy_refcounts', 'refcount_bits', 'compression_type', 'extended_l2',
  ],
  probe(head: Buffer): number {
    if (head.length >= 8 && head.readUInt32BE(0) === C.QCOW_MAGIC) {
      const v = head.readUInt32BE(4);
      if (v === 2 || v === 3) return 100;
    }
    return 0;
  },
  open: openQcow2,
  async create(file, ctx) {
    const { createQcow2 } = await import('./create.js');
    await createQcow2(file, ctx);
  },
};
