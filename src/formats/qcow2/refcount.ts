// Host cluster management (spec: "Host cluster management"; QEMU's block/qcow2-refcount.c):
// the refcount table (kept whole in memory, at most 8 MiB), refcount blocks (through the
// refcount cache), cluster allocation, refcount block allocation and refcount table growth.
//
// Write ordering: a new refcount block is written and flushed before the refcount table
// entry that points to it; a grown refcount table (with the blocks describing it) is written
// and flushed before the header points to it; the old table is freed last.
import { VdiskError, corrupt } from '../../block/errors.js';
import type { BlockIo } from '../../block/edge.js';
import * as C from './constants.js';
import { MetadataCache } from './metadata-cache.js';

/** Read entry `i` of a refcount block with refcount_order `order` (sub-byte widths are LSB first). */
export function getRefcountEntry(block: Buffer, order: number, i: number): number {
  switch (order) {
    case 0: return (block[i >> 3] >> (i & 7)) & 1;
    case 1: return (block[i >> 2] >> (2 * (i & 3))) & 3;
    case 2: return (block[i >> 1] >> (4 * (i & 1))) & 15;
    case 3: return block[i];
    case 4: return block.readUInt16BE(i * 2);
    case 5: return block.readUInt32BE(i * 4);
    default: {
      const hi = block.readUInt32BE(i * 8);
      // Refcounts beyond 2^53 cannot be exact; treat as "many" (never freed by us).
      return hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 2 ** 32 + block.readUInt32BE(i * 8 + 4);
    }
  }
}

export function setRefcountEntry(block: Buffer, order: number, i: number, v: number): void {
  switch (order) {
    case 0: block[i >> 3] = (block[i >> 3] & ~(1 << (i & 7))) | (v << (i & 7)); break;
    case 1: block[i >> 2] = (block[i >> 2] & ~(3 << (2 * (i & 3)))) | (v << (2 * (i & 3))); break;
    case 2: block[i >> 1] = (block[i >> 1] & ~(15 << (4 * (i & 1)))) | (v << (4 * (i & 1))); break;
    case 3: block[i] = v; break;
    case 4: block.writeUInt16BE(v, i * 2); break;
    case 5: block.writeUInt32BE(v, i * 4); break;
    default:
      block.writeUInt32BE(Math.floor(v / 2 ** 32), i * 8);
      block.writeUInt32BE(v % 2 ** 32, i * 8 + 4);
  }
}

/** Speculative growth of the file ahead of data allocations: an eighth, within these bounds. */
const GROW_STEP_MIN = 1 << 20;
const GROW_STEP_MAX = 32 << 20;

export interface RefcountState {
  tableOffset: number;
  tableClusters: number;
}

export class Refcounts {
  readonly clusterSize: number;
  readonly entriesPerBlock: number;
  readonly maxRefcount: number;
  /** The refcount table, as on disk. */
  table: Buffer;
  /** Where to start looking for free clusters (QEMU's free_cluster_index). */
  freeClusterIndex = 0;
  /** Cluster index that compressed writes are packing into (-1: none); forgotten once freed. */
  packCluster = -1;
  /** Called with the (offset, clusters) of each metadata cluster added or removed. */
  onMetadataChange: (offset: number, added: boolean) => void = () => {};
  /** File length at open. */
  private readonly openLength: number;
  /** End of everything in use: the file at open, and every allocation since (bytes). */
  private usedEnd: number;
  /**
   * Host clusters at or past this offset have never been written since open and lie past
   * the file's end at open: they read as zeros (a fresh allocation there needs no COW of zeros).
   */
  private knownZeroFrom: number;
  /** Grow the file ahead of data allocations (off for files that cannot be truncated cheaply). */
  growAhead = true;
  /**
   * Freed clusters whose space is to be given back to the file system (QEMU's s->discards).
   * They are punched only by processDiscards(), which the driver calls once the metadata
   * that frees them is on disk: punched earlier, a crash could leave an L2 entry on disk
   * pointing at a hole. A queued cluster that is allocated again leaves the queue.
   */
  private readonly discards = new Set<number>();

  constructor(
    private readonly file: BlockIo,
    private readonly filename: string,
    readonly clusterBits: number,
    readonly order: number,
    readonly cache: MetadataCache,
    public state: RefcountState,
    table: Buffer,
  ) {
    this.clusterSize = 2 ** clusterBits;
    this.entriesPerBlock = 2 ** (clusterBits + 3 - order);
    this.maxRefcount = order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** order) - 1;
    this.table = table;
    this.openLength = file.getLength();
    this.usedEnd = this.openLength;
    this.knownZeroFrom = Math.ceil(this.openLength / this.clusterSize) * this.clusterSize;
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  /** Offset of the refcount block for table index `ti`, 0 when none. */
  blockOffset(ti: number): number {
    if (ti >= this.tableEntries) return 0;
    const hi = this.table.readUInt32BE(ti * 8);
    const lo = this.table.readUInt32BE(ti * 8 + 4);
    if (hi >= 0x200000) throw corrupt(`${this.filename}: refcount table entry ${ti} points beyond 2^53`);
    const off = hi * 2 ** 32 + (lo & C.OFFSET_MASK_LO) ;
    if (off === 0) return 0;
    if (off % this.clusterSize !== 0) {
      throw corrupt(`${this.filename}: refcount block offset ${off} (refcount table entry ${ti}) is not cluster aligned`);
    }
    return off;
  }

  async get(cluster: number): Promise<number> {
    const ti = Math.floor(cluster / this.entriesPerBlock);
    const off = this.blockOffset(ti);
    if (off === 0) return 0;
    const block = await this.cache.get(off);
    try {
      return getRefcountEntry(block, this.order, cluster % this.entriesPerBlock);
    } finally {
      this.cache.release(off);
    }
  }

  /**
   * Grow the file so that [0, end) exists (allocations may land past EOF). BlockNode never
   * lets a write pass the end of the file, so allocations grow it first; data allocations
   * (`ahead`) grow it by an extra step (an eighth, within GROW_STEP_MIN..GROW_STEP_MAX) so that a run of
   * small allocations does not cost one truncate each. The speculative tail is unreferenced
   * zeros (no leak for qemu-img check) and is cut off again on a clean close (trimTail).
   */
  async ensureFileSize(end: number, ahead = false): Promise<void> {
    if (end > this.usedEnd) this.usedEnd = end;
    const len = this.file.getLength();
    if (len >= end) return;
    let target = end;
    if (ahead && this.growAhead) {
      const step = Math.min(GROW_STEP_MAX, Math.max(this.clusterSize, GROW_STEP_MIN, Math.floor(end / 8)));
      target = Math.ceil((end + step) / this.clusterSize) * this.clusterSize;
    }
    await this.file.truncate(target, 'off');
  }

  /** Clean close: drop the speculative tail that ensureFileSize added past the last allocation. */
  async trimTail(): Promise<void> {
    if (this.file.getLength() > this.usedEnd && this.usedEnd >= this.openLength) {
      await this.file.truncate(this.usedEnd, 'off');
    }
  }

  /**
   * First run of `n` free clusters at or after the hint (refcount 0). Like QEMU's
   * alloc_clusters_noref, the hint then moves past everything scanned (a free run shorter
   * than `n` that was skipped is found again only after something below the hint is freed).
   * Each refcount block is pinned once per run of lookups in it, not once per cluster.
   */
  private async findFree(n: number): Promise<number> {
    const search = { start: this.freeClusterIndex, run: 0 };
    while (search.run < n) {
      const off = this.blockOffset(Math.floor((search.start + search.run) / this.entriesPerBlock));
      if (off === 0) {
        this.scanForFree(null, search, n);
      } else {
        const block = await this.cache.get(off);
        try {
          this.scanForFree(block, search, n);
        } finally {
          this.cache.release(off);
        }
      }
      if ((search.start + search.run) * this.clusterSize > C.QCOW2_MAX_SAFE_OFFSET) {
        throw new VdiskError('ENOSPC', 'io', `${this.filename}: no free cluster range of ${n} clusters below 2^53`);
      }
    }
    return search.start;
  }

  /**
   * One step of the free-run search: scan the refcount block that holds cluster
   * start + run (null: no block there yet, so all its clusters are free), extending the run
   * or restarting it after a used cluster.
   */
  private scanForFree(block: Buffer | null, search: { start: number; run: number }, n: number): void {
    const c = search.start + search.run;
    const ti = Math.floor(c / this.entriesPerBlock);
    const blockEnd = (ti + 1) * this.entriesPerBlock;
    if (block === null) {
      search.run = Math.min(n, blockEnd - search.start);
      return;
    }
    for (let k = c; k < blockEnd && search.run < n; k++) {
      if (getRefcountEntry(block, this.order, k - ti * this.entriesPerBlock) === 0) {
        search.run++;
      } else {
        search.start = k + 1;
        search.run = 0;
      }
    }
  }

  /**
   * Allocate `n` contiguous clusters with refcount 1; returns the host offset. The file is
   * grown to cover them. The refcount updates are in the cache (dirty).
   */
  async alloc(n: number): Promise<number> {
    return (await this.allocRun(n, false)).offset;
  }

  /**
   * allocRun() without waiting, when everything it needs is at hand (refcount blocks cached,
   * no refcount block to create, the file long enough); else null with nothing changed.
   */
  tryAllocRun(n: number): { offset: number; fresh: boolean } | null {
    const start = this.findFreeSync(n);
    if (start < 0) return null;
    const end = (start + n) * this.clusterSize;
    if (end > this.file.getLength()) return null;
    const first = Math.floor(start / this.entriesPerBlock);
    const last = Math.floor((start + n - 1) / this.entriesPerBlock);
    for (let ti = first; ti <= last; ti++) {
      const off = this.blockOffset(ti);
      if (off === 0 || !this.cache.peek(off)) return null;
    }
    for (let ti = first; ti <= last; ti++) {
      const off = this.blockOffset(ti);
      const block = this.cache.peek(off)!;
      const lo = Math.max(start, ti * this.entriesPerBlock);
      const hi = Math.min(start + n, (ti + 1) * this.entriesPerBlock);
      for (let c = lo; c < hi; c++) setRefcountEntry(block, this.order, c - ti * this.entriesPerBlock, 1);
      this.cache.markDirty(off);
    }
    if (this.freeClusterIndex <= start) this.freeClusterIndex = start + n;
    if (this.discards.size) this.claim(start, n);
    const offset = start * this.clusterSize;
    const fresh = offset >= this.knownZeroFrom;
    if (end > this.knownZeroFrom) this.knownZeroFrom = end;
    if (end > this.usedEnd) this.usedEnd = end;
    return { offset, fresh };
  }

  /** findFree() over cached refcount blocks only: -1 when it would have to read one. */
  private findFreeSync(n: number): number {
    const search = { start: this.freeClusterIndex, run: 0 };
    while (search.run < n) {
      const off = this.blockOffset(Math.floor((search.start + search.run) / this.entriesPerBlock));
      if (off === 0) {
        this.scanForFree(null, search, n);
      } else {
        const block = this.cache.peek(off);
        if (!block) return -1;
        this.scanForFree(block, search, n);
      }
      if ((search.start + search.run) * this.clusterSize > C.QCOW2_MAX_SAFE_OFFSET) return -1;
    }
    return search.start;
  }

  /**
   * alloc() that also says whether the clusters are known to read as zeros (`fresh`: never
   * used since open, past the file's end at open). `data`: grow the file ahead (guest data).
   */
  async allocRun(n: number, data: boolean): Promise<{ offset: number; fresh: boolean }> {
    for (;;) {
      const start = await this.findFree(n);
      // Refcount blocks for the range must exist; creating one takes a cluster, maybe inside
      // our range, so search again after (QEMU's -EAGAIN dance).
      if (await this.ensureBlocks(start, n)) continue;
      await this.update(start, n, 1);
      if (this.freeClusterIndex <= start) this.freeClusterIndex = start + n;
      const offset = start * this.clusterSize;
      const end = offset + n * this.clusterSize;
      const fresh = offset >= this.knownZeroFrom;
      if (end > this.knownZeroFrom) this.knownZeroFrom = end;
      await this.ensureFileSize(end, data);
      return { offset, fresh };
    }
  }

  /** Make sure refcount blocks exist for clusters [start, start+n). True if any was created. */
  private async ensureBlocks(start: number, n: number): Promise<boolean> {
    let created = false;
    const first = Math.floor(start / this.entriesPerBlock);
    const last = Math.floor((start + n - 1) / this.entriesPerBlock);
    for (let ti = first; ti <= last; ti++) {
      if (this.blockOffset(ti) !== 0) continue;
      await this.allocBlock(ti);
      created = true;
    }
    return created;
  }

  /** Create the refcount block for table index `ti` (growing the table first if needed). */
  private async allocBlock(ti: number): Promise<void> {
    if (ti >= this.tableEntries) {
      await this.growTable(ti);
      return; // the new table comes with blocks for everything it needed; retry the caller
    }
    // Where does the new block go? The first free cluster. If it falls inside the range this
    // block describes, the block records its own refcount (spec: self-describing block).
    const c = await this.findFree(1);
    const own = Math.floor(c / this.entriesPerBlock) === ti;
    if (!own) {
      if (await this.ensureBlocks(c, 1)) return this.allocBlock(ti);
      await this.update(c, 1, 1);
    }
    const off = c * this.clusterSize;
    if (off + this.clusterSize > this.knownZeroFrom) this.knownZeroFrom = off + this.clusterSize;
    await this.ensureFileSize(off + this.clusterSize);
    const block = await this.cache.getEmpty(off);
    if (own) setRefcountEntry(block, this.order, c % this.entriesPerBlock, 1);
    if (this.discards.size) this.claim(c, 1);
    this.cache.release(off);
    // The block (and the refcount of its cluster) must be on disk before the table points to it.
    await this.cache.flush();
    const entry = Buffer.alloc(8);
    entry.writeBigUInt64BE(BigInt(off));
    await this.file.pwrite(this.state.tableOffset + ti * 8, entry);
    await this.file.flush();
    entry.copy(this.table, ti * 8);
    this.onMetadataChange(off, true);
    if (this.freeClusterIndex <= c) this.freeClusterIndex = c + 1;
  }

  /**
   * A larger refcount table (QEMU's qcow2_refcount_area): placed after the end of the file
   * with new refcount blocks describing itself and them; written and flushed, then the header
   * switched to it with one write, then the old table freed.
   */
  private async growTable(neededIndex: number): Promise<void> {
    const cs = this.clusterSize;
    const perCluster = cs / 8;
    const oldEntries = this.tableEntries;
    let newEntries = Math.max(neededIndex + 1, Math.ceil(oldEntries * 1.5));
    newEntries = Math.ceil(newEntries / perCluster) * perCluster;
    // After everything in use (the file may extend further by a speculative, unused tail).
    const start = Math.ceil(Math.max(this.usedEnd, this.openLength) / cs);
    let blocks = 0;
    let tableClusters = 0;
    let firstBlockIndex = 0;
    let missing: number[] = [];
    for (let iter = 0; iter < 64; iter++) {
      tableClusters = newEntries / perCluster;
      const areaEnd = start + blocks + tableClusters;
      firstBlockIndex = Math.floor(start / this.entriesPerBlock);
      const lastBlockIndex = Math.floor((areaEnd - 1) / this.entriesPerBlock);
      missing = [];
      for (let ti = firstBlockIndex; ti <= lastBlockIndex; ti++) if (this.blockOffset(ti) === 0) missing.push(ti);
      const needEntries = Math.max(neededIndex, lastBlockIndex) + 1;
      const fitEntries = Math.ceil(needEntries / perCluster) * perCluster;
      if (missing.length === blocks && fitEntries <= newEntries) break;
      blocks = missing.length;
      newEntries = Math.max(newEntries, fitEntries);
    }
    if (newEntries * 8 > C.QCOW_MAX_REFTABLE_SIZE) {
      throw new VdiskError('EFBIG', 'io', `${this.filename}: refcount table would exceed ${C.QCOW_MAX_REFTABLE_SIZE} bytes (QCOW_MAX_REFTABLE_SIZE)`);
    }
    const areaEnd = start + blocks + tableClusters;
    const newTable = Buffer.alloc(newEntries * 8);
    this.table.copy(newTable);
    const blockBufs: Buffer[] = [];
    missing.forEach((ti, k) => {
      const blockCluster = start + k;
      newTable.writeBigUInt64BE(BigInt(blockCluster * cs), ti * 8);
      const b = Buffer.alloc(cs);
      const lo = ti * this.entriesPerBlock;
      const hi = lo + this.entriesPerBlock;
      for (let c = Math.max(lo, start); c < Math.min(hi, areaEnd); c++) setRefcountEntry(b, this.order, c - lo, 1);
      blockBufs.push(b);
    });
    // Blocks that already existed but describe part of the new area get their counts bumped
    // through the cache (they were found non-missing above).
    if (areaEnd * cs > this.knownZeroFrom) this.knownZeroFrom = areaEnd * cs;
    await this.ensureFileSize(areaEnd * cs);
    if (blockBufs.length) await this.file.pwrite(start * cs, Buffer.concat(blockBufs));
    await this.file.pwrite((start + blocks) * cs, newTable);
    const oldTable = this.table;
    const oldState = { ...this.state };
    this.table = newTable;
    this.state = { tableOffset: (start + blocks) * cs, tableClusters };
    const existingCover: number[] = [];
    for (let c = start; c < areaEnd; c++) {
      const ti = Math.floor(c / this.entriesPerBlock);
      if (!missing.includes(ti)) existingCover.push(c);
    }
    for (const c of existingCover) await this.update(c, 1, 1);
    await this.cache.flush(); // also flushes the file: blocks and table are stable
    const hdr = Buffer.alloc(12);
    hdr.writeBigUInt64BE(BigInt(this.state.tableOffset), 0);
    hdr.writeUInt32BE(tableClusters, 8);
    try {
      await this.file.pwrite(C.HDR_REFCOUNT_TABLE_OFFSET, hdr);
      await this.file.flush();
    } catch (err) {
      this.table = oldTable;
      this.state = oldState;
      throw err;
    }
    missing.forEach((_, k) => this.onMetadataChange((start + k) * cs, true));
    for (let k = 0; k < tableClusters; k++) this.onMetadataChange((start + blocks + k) * cs, true);
    for (let k = 0; k < oldState.tableClusters; k++) this.onMetadataChange(oldState.tableOffset + k * cs, false);
    await this.update(oldState.tableOffset / cs, oldState.tableClusters, -1);
    if (this.freeClusterIndex > oldState.tableOffset / cs) this.freeClusterIndex = oldState.tableOffset / cs;
  }

  /**
   * Add `delta` to the refcount of clusters [start, start+n). Blocks must exist for increases.
   * A refcount reaching 0 makes the cluster a candidate for the next allocation.
   * Returns the clusters whose refcount dropped to zero.
   */
  async update(start: number, n: number, delta: number): Promise<number[]> {
    const freed: number[] = [];
    let c = start;
    while (c < start + n) {
      const ti = Math.floor(c / this.entriesPerBlock);
      const off = this.blockOffset(ti);
      const blockEnd = Math.min(start + n, (ti + 1) * this.entriesPerBlock);
      if (off === 0) {
        if (delta > 0) throw new Error(`internal: refcount block for cluster ${c} missing`);
        throw corrupt(`${this.filename}: freeing cluster ${c} which has no refcount block`);
      }
      const block = await this.cache.get(off);
      try {
        for (; c < blockEnd; c++) {
          const i = c % this.entriesPerBlock;
          const v = getRefcountEntry(block, this.order, i) + delta;
          if (v < 0) throw corrupt(`${this.filename}: refcount of cluster ${c} would drop below 0`);
          if (v > this.maxRefcount) {
            throw new VdiskError('EINVAL', 'invalid-argument',
              `${this.filename}: refcount of cluster ${c} would exceed ${this.maxRefcount} (refcount_bits ${2 ** this.order})`);
          }
          setRefcountEntry(block, this.order, i, v);
          if (v === 0) {
            freed.push(c);
            if (c === this.packCluster) this.packCluster = -1;
            if (c < this.freeClusterIndex) this.freeClusterIndex = c;
          }
        }
        this.cache.markDirty(off);
      } finally {
        this.cache.release(off);
      }
    }
    if (delta > 0 && this.discards.size) this.claim(start, n);
    return freed;
  }

  /** Queue freed clusters for processDiscards(). */
  queueDiscards(clusters: readonly number[]): void {
    for (const c of clusters) this.discards.add(c);
  }

  get pendingDiscards(): number {
    return this.discards.size;
  }

  /** Clusters [start, start+n) are in use again: punching them now would lose their data. */
  private claim(start: number, n: number): void {
    if (n > this.discards.size) {
      for (const c of this.discards) if (c >= start && c < start + n) this.discards.delete(c);
    } else {
      for (let c = start; c < start + n; c++) this.discards.delete(c);
    }
  }

  /**
   * Punch the queued clusters, merged into runs (QEMU's qcow2_process_discards). The caller
   * has made the metadata that freed them stable. Discard is advisory: errors are ignored.
   */
  async processDiscards(): Promise<void> {
    if (this.discards.size === 0) return;
    const list = [...this.discards].sort((a, b) => a - b);
    this.discards.clear();
    let i = 0;
    while (i < list.length) {
      let j = i + 1;
      while (j < list.length && list[j] === list[j - 1] + 1) j++;
      await this.file.pdiscard(list[i] * this.clusterSize, (j - i) * this.clusterSize).catch(() => {});
      i = j;
    }
  }
}
