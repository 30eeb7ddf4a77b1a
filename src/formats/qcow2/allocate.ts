// qcow2 cluster allocation and L2 linking (after QEMU's block/qcow2-cluster.c): allocating
// writes (reserve, write data and COW outside the lock, link), in-flight allocations and the
// waits on them, new and copied L2 tables, compressed cluster placement, and the L2 entry
// changes of write-zeroes, discard and make-empty. The locking and write-ordering rules these
// follow are stated at the top of qcow2.ts; the driver's shared state is declared abstract
// below and owned by Qcow2Driver.
import type { ChildEdge } from '../../block/edge.js';
import { invalidArgument } from '../../block/errors.js';
import * as C from './constants.js';
import type { Qcow2Header } from './header.js';
import type { MetadataCache, Mutex } from './metadata-cache.js';
import type { Refcounts } from './refcount.js';
import {
  type EntryDecoder, KIND_COMPRESSED, KIND_NORMAL, KIND_UNALLOCATED, KIND_ZERO_ALLOC, KIND_ZERO_PLAIN,
  type L2Info, entryHi, entryLo, makeEntry, setEntry,
} from './l2entry.js';
import { compressCluster } from './compress.js';

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
  /**
   * The host clusters are the guest clusters' own preallocated zero clusters (ZERO_ALLOC with
   * COPIED), written in place as QEMU's handle_copied does: nothing was allocated, so nothing
   * is given back on failure and the old entries' clusters are not freed when linking.
   */
  reused: boolean;
  olds: L2Info[];
  end: number;
  entry: InflightAlloc;
}

/** Freed clusters queued for punching before zero/discard flushes metadata on its own (64 GiB of 64 KiB clusters). */
const MAX_QUEUED_DISCARDS = 1 << 20;

type WriteStep = { kind: 'wait'; until: Promise<void> } | { kind: 'inplace'; host: number; end: number } | AllocStep;

export abstract class Qcow2Allocator {
  // ---- driver state this file reads and changes (QEMU's BDRVQcow2State) ----
  protected abstract readonly file: ChildEdge;
  abstract readonly h: Qcow2Header;
  protected abstract readonly filename: string;
  abstract readonly children: { file: ChildEdge; backing: ChildEdge | null };
  abstract readonly clusterSize: number;
  /** Guest bytes mapped by one L2 table. */
  protected abstract readonly l2Span: number;
  protected abstract readonly l2Entries: number;
  protected abstract readonly dec: EntryDecoder;
  protected abstract readonly lock: Mutex;
  protected abstract readonly l2Cache: MetadataCache;
  protected abstract readonly refcounts: Refcounts;
  protected abstract l1: Buffer;
  /** Cluster indices holding metadata (QEMU's overlap check). */
  protected abstract readonly metadataClusters: Set<number>;
  protected abstract markedDirty: boolean;
  protected abstract get lazy(): boolean;
  /** Lazy refcounts: make the dirty bit stable before the first metadata change. */
  protected abstract markDirty(): Promise<void>;
  /** Refuse (and mark the image corrupt) a guest data write onto metadata. */
  protected abstract checkOverlap(host: number, length: number): Promise<void>;
  protected abstract overlapsMetadata(host: number, length: number): boolean;
  /** Old contents of a guest range inside one cluster, from its old entry (the COW source). */
  protected abstract readOld(e: L2Info, offset: number, dest: Buffer): Promise<void>;

  // ---- allocation state ----
  /** Partially used cluster for packing compressed data (QEMU's free_byte_offset). */
  private compressedFreeByte = 0;
  /** Allocations whose data is being written outside the lock (QEMU's s->cluster_allocs). */
  private readonly inflight = new Set<InflightAlloc>();

  /**
   * Writes that allocate (QEMU's qcow2_co_pwritev_task): piece by piece, under the lock decide
   * and reserve (allocate host clusters, register the guest clusters as in flight), write the
   * data (and COW) outside the lock, then link the L2 entries under the lock. Later writers
   * to a guest cluster in flight wait for it (QEMU's handle_dependencies).
   */
  protected async writeSlow(offset: number, buf: Buffer): Promise<void> {
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
  protected async lockedExclusive<T>(a: number, b: number, fn: () => Promise<T>): Promise<T> {
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

  /**
   * Reuse: the run of preallocated zero clusters ours alone (ZERO_ALLOC, COPIED) from `ci`,
   * contiguous on the host, up to the next cluster in flight.
   */
  private zeroAllocRun(l2: Buffer, ci: number, e: L2Info, tableEnd: number): { olds: L2Info[]; runEnd: number } {
    const cs = this.clusterSize;
    let limit = Infinity;
    for (const a of this.inflight) if (a.first > ci && a.first < limit) limit = a.first;
    const olds: L2Info[] = [e];
    let runEnd = Math.min(tableEnd, (ci + 1) * cs);
    while (runEnd < tableEnd) {
      const cj = runEnd / cs;
      if (cj >= limit) break;
      const f = this.dec.decode(entryHi(l2, cj % this.l2Entries), entryLo(l2, cj % this.l2Entries), runEnd);
      if (f.kind !== KIND_ZERO_ALLOC || !f.copied || f.host !== e.host + olds.length * cs) break;
      olds.push(f);
      runEnd = Math.min(tableEnd, runEnd + cs);
    }
    return { olds, runEnd };
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
    if (e.kind === KIND_ZERO_ALLOC && e.copied) {
      const { olds, runEnd } = this.zeroAllocRun(l2, ci, e, tableEnd);
      if (this.overlapsMetadata(e.host, olds.length * cs)) return null;
      return this.reserve(l1i, ci, e.host, false, true, olds, runEnd);
    }
    const { olds, runEnd } = this.allocationRun(l2, ci, e, tableEnd);
    const k = olds.length;
    const got = this.refcounts.tryAllocRun(k);
    if (got === null) return null;
    return this.reserve(l1i, ci, got.offset, got.fresh, false, olds, runEnd);
  }

  /** Register guest clusters ci.. (olds.length of them) as in flight, to be written at `host`. */
  private reserve(l1i: number, ci: number, host: number, fresh: boolean, reused: boolean, olds: L2Info[], end: number): AllocStep {
    let resolve!: () => void;
    const done = new Promise<void>((r) => (resolve = r));
    const entry: InflightAlloc = { first: ci, end: ci + olds.length, done, resolve };
    this.inflight.add(entry);
    return { kind: 'alloc', l1i, first: ci, host, fresh, reused, olds, end, entry };
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
      if (e.kind === KIND_ZERO_ALLOC && e.copied) {
        const { olds, runEnd } = this.zeroAllocRun(l2, ci, e, tableEnd);
        await this.checkOverlap(e.host, olds.length * cs);
        if (this.needMarkDirty) await this.markDirty();
        return this.reserve(l1i, ci, e.host, false, true, olds, runEnd);
      }
      const { olds, runEnd } = this.allocationRun(l2, ci, e, tableEnd);
      if (this.needMarkDirty) await this.markDirty();
      const k = olds.length;
      const { offset: host, fresh } = this.refcounts.tryAllocRun(k) ?? await this.refcounts.allocRun(k, true);
      return this.reserve(l1i, ci, host, fresh, false, olds, runEnd);
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
          if (!step.reused) await this.refcounts.update(step.host / cs, k, -1);
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
      const e = this.dec.decode(entryHi(l2, idx), entryLo(l2, idx), (step.first + j) * cs);
      if (step.reused ? !this.isOwnHost(step, j, e) : e.kind !== KIND_UNALLOCATED && e.kind !== KIND_ZERO_PLAIN) return false;
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

  /** A reused step's cluster j still holds its own preallocated zero cluster (nothing to free). */
  private isOwnHost(step: AllocStep, j: number, e: L2Info): boolean {
    return step.reused && e.kind === KIND_ZERO_ALLOC && e.host === step.host + j * this.clusterSize;
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
    for (let j = 0; j < k; j++) {
      const o = olds[j];
      if (o.kind !== KIND_UNALLOCATED && o.kind !== KIND_ZERO_PLAIN && !this.isOwnHost(step, j, o)) await this.freeOld(o, false);
    }
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
  protected async getL2ForWrite(l1i: number): Promise<number> {
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

  /**
   * Drop the references an old L2 entry held (after the L2 change is in the cache).
   * `discardBelow`: queue the clusters this frees for punching once the change is on disk.
   */
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
    if (discardBelow && freed.length) this.refcounts.queueDiscards(freed);
  }

  /**
   * Write every dirty L2 table, then every dirty refcount block (QEMU's qcow2_write_caches;
   * each cache flush ends with a file flush), and only then punch the clusters that this
   * metadata frees (QEMU's qcow2_process_discards). Lock held: no allocation can take a
   * queued cluster while it is being punched.
   */
  protected async writeMetadata(): Promise<void> {
    await this.l2Cache.flush();
    await this.refcounts.cache.flush();
    await this.refcounts.processDiscards();
  }

  protected async linkDependency(): Promise<void> {
    if (!this.lazy) await this.l2Cache.setDependency(this.refcounts.cache);
  }

  /** REQ_WRITE_COMPRESSED: whole clusters only; stored compressed when that is smaller. */
  protected async writeCompressed(offset: number, buf: Buffer): Promise<void> {
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

  /**
   * Set the entries of whole clusters [a, b) (b may be the unaligned end of the image):
   *   zero:    ZERO flag; keep an owned allocation unless unmap (QEMU's zero_in_l2_slice)
   *   discard: ZERO on v3 when it would otherwise expose the backing or was allocated, else 0
   *   full:    0 (reads fall through to the backing: make_empty, shrink)
   */
  protected async zeroClusters(a: number, b: number, unmap: boolean, mode: 'zero' | 'discard' | 'full'): Promise<void> {
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
    // Bound the queue's memory: a long discard makes its metadata stable and punches now.
    if (this.refcounts.pendingDiscards > MAX_QUEUED_DISCARDS) await this.writeMetadata();
  }
}
