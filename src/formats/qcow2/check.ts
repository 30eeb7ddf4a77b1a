// qcow2 consistency check and repair (`vdisk check`), QEMU's qcow2_check_refcounts and friends
// (block/qcow2-refcount.c): walk every structure that references clusters (header, active
// and snapshot L1/L2 tables, the snapshot table, refcount table and blocks, the crypto
// header, persistent bitmaps), count the references per host cluster, compare with the
// stored refcounts, and check the COPIED flags. Repair fixes leaks and refcount errors in
// place, or rebuilds the refcount structure when a referenced cluster has no refcount.
//
// This works on the file node directly, never through the qcow2 driver: a corrupt or dirty
// image must be checkable without the driver's open-time repair or its caches. Every read
// is bounded by the file length (past EOF reads as zeros, like QEMU's block layer), so a
// hostile image cannot make the walk allocate without limit or loop.
import type { BlockNode } from '../../block/node.js';
import { VdiskError, corrupt } from '../../block/errors.js';
import * as C from './constants.js';
import { readHeader, serializeHeader, type Qcow2Header } from './header.js';
import { readSnapshots, snapshotTableSize, type Qcow2Snapshot } from './snapshot.js';
import { type BitmapDirEntry, readBitmapTable, readBitmapsForOpen } from './bitmaps.js';

export interface CheckFix {
  leaks: boolean;
  errors: boolean;
}

/** QEMU's BdrvCheckResult (and the ImageCheck fields qemu-img prints). */
export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

/** Offsets at or past this are certainly past EOF; they stay approximate numbers. */
const TWO_32 = 2 ** 32;

const emptyResult = (): CheckResult => ({
  corruptions: 0, leaks: 0, checkErrors: 0, corruptionsFixed: 0, leaksFixed: 0, imageEndOffset: 0,
  totalClusters: 0, allocatedClusters: 0, fragmentedClusters: 0, compressedClusters: 0,
});

const hex = (n: number | bigint): string => n.toString(16);

/** Read [offset, offset+buf.length): the part past EOF (or past 2^53) reads as zeros. */
async function readAt(file: BlockNode, offset: number, buf: Buffer): Promise<void> {
  const len = file.getLength();
  if (offset >= len || !Number.isSafeInteger(offset)) {
    buf.fill(0);
    return;
  }
  const n = Math.min(buf.length, len - offset);
  await file.pread(offset, buf.subarray(0, n));
  if (n < buf.length) buf.fill(0, n);
}

/** Write, growing the file first when the write ends past EOF (rebuilt refcount structures). */
async function writeAt(file: BlockNode, offset: number, buf: Buffer): Promise<void> {
  if (offset + buf.length > file.getLength()) await file.truncate(offset + buf.length);
  await file.pwrite(offset, buf);
}

/** A growable array of computed reference counts, one per host cluster. */
class RefcountArray {
  counts: Uint32Array;
  constructor(n: number) {
    this.counts = new Uint32Array(Math.max(n, 1));
  }
  get(i: number): number {
    return i < this.counts.length ? this.counts[i] : 0;
  }
  grow(n: number): void {
    if (n <= this.counts.length) return;
    const next = new Uint32Array(Math.max(n, Math.min(this.counts.length * 2, n + (1 << 20))));
    next.set(this.counts);
    this.counts = next;
  }
}

/** The stored refcounts, read through the refcount table with a small block cache. */
class StoredRefcounts {
  private reftable: Buffer;
  private readonly cache = new Map<number, Buffer>();
  readonly blockBits: number;
  constructor(private readonly file: BlockNode, private readonly h: Qcow2Header, reftable: Buffer) {
    this.reftable = reftable;
    this.blockBits = h.clusterBits + 3 - h.refcountOrder;
  }
  get entries(): number {
    return this.reftable.length / 8;
  }
  reftableEntry(i: number): bigint {
    return this.reftable.readBigUInt64BE(i * 8);
  }
  setReftable(buf: Buffer): void {
    this.reftable = buf;
    this.cache.clear();
  }
  private async block(offset: number): Promise<Buffer> {
    let b = this.cache.get(offset);
    if (!b) {
      b = Buffer.alloc(2 ** this.h.clusterBits);
      await readAt(this.file, offset, b);
      if (this.cache.size > 64) this.cache.delete(this.cache.keys().next().value as number);
      this.cache.set(offset, b);
    }
    return b;
  }
  /** QEMU's qcow2_get_refcount: 0 past the table or for an empty entry; throws on a misaligned block. */
  async get(cluster: number): Promise<number> {
    const index = Math.floor(cluster / 2 ** this.blockBits);
    if (index >= this.entries) return 0;
    const blockOffset = Number(this.reftableEntry(index) & C.REFT_OFFSET_MASK);
    if (blockOffset === 0) return 0;
    if (blockOffset % 2 ** this.h.clusterBits !== 0) {
      throw corrupt(`Refblock offset 0x${hex(blockOffset)} unaligned (reftable index: 0x${hex(index)})`);
    }
    const b = await this.block(blockOffset);
    return readRefcount(b, cluster % 2 ** this.blockBits, this.h.refcountOrder);
  }
  /** Set a refcount in an existing block and write the block back (leak/error repair). */
  async set(cluster: number, value: number): Promise<boolean> {
    const index = Math.floor(cluster / 2 ** this.blockBits);
    if (index >= this.entries) return false;
    const blockOffset = Number(this.reftableEntry(index) & C.REFT_OFFSET_MASK);
    if (blockOffset === 0 || blockOffset % 2 ** this.h.clusterBits !== 0) return false;
    if (value > 2 ** 2 ** this.h.refcountOrder - 1) return false;
    const b = await this.block(blockOffset);
    writeRefcount(b, cluster % 2 ** this.blockBits, this.h.refcountOrder, value);
    await this.file.pwrite(blockOffset, b);
    return true;
  }
}

function readRefcount(b: Buffer, i: number, order: number): number {
  switch (order) {
    case 0: return (b[i >> 3] >> (i & 7)) & 1;
    case 1: return (b[i >> 2] >> (2 * (i & 3))) & 3;
    case 2: return (b[i >> 1] >> (4 * (i & 1))) & 15;
    case 3: return b[i];
    case 4: return b.readUInt16BE(i * 2);
    case 5: return b.readUInt32BE(i * 4);
    default: return Number(b.readBigUInt64BE(i * 8));
  }
}

function writeRefcount(b: Buffer, i: number, order: number, v: number): void {
  switch (order) {
    case 0: b[i >> 3] = (b[i >> 3] & ~(1 << (i & 7))) | ((v & 1) << (i & 7)); break;
    case 1: b[i >> 2] = (b[i >> 2] & ~(3 << (2 * (i & 3)))) | ((v & 3) << (2 * (i & 3))); break;
    case 2: b[i >> 1] = (b[i >> 1] & ~(15 << (4 * (i & 1)))) | ((v & 15) << (4 * (i & 1))); break;
    case 3: b[i] = v; break;
    case 4: b.writeUInt16BE(v, i * 2); break;
    case 5: b.writeUInt32BE(v, i * 4); break;
    default: b.writeBigUInt64BE(BigInt(v), i * 8);
  }
}

/** The walk over one image; one instance per check run. */
class Checker {
  readonly cs: number;
  readonly bits: number;
  readonly l2Size: number;
  readonly l2EntrySize: number;
  readonly extendedL2: boolean;
  readonly hasDataFile: boolean;
  readonly refcountMax: number;
  res: CheckResult = emptyResult();
  refs!: RefcountArray;
  nbClusters = 0;
  rebuild = false;
  snapshots: Qcow2Snapshot[] = [];
  snapshotsSize = 0;
  bitmapEntries: BitmapDirEntry[] = [];

  constructor(
    readonly file: BlockNode,
    public h: Qcow2Header,
    readonly stored: StoredRefcounts,
    readonly log: (line: string) => void,
  ) {
    this.cs = 2 ** h.clusterBits;
    this.bits = h.clusterBits;
    this.extendedL2 = (h.incompatibleFeatures & C.QCOW2_INCOMPAT_EXTL2) !== 0n;
    this.hasDataFile = (h.incompatibleFeatures & C.QCOW2_INCOMPAT_DATA_FILE) !== 0n;
    this.l2EntrySize = this.extendedL2 ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL;
    this.l2Size = this.cs / this.l2EntrySize;
    this.refcountMax = Math.min(2 ** 2 ** h.refcountOrder - 1, 0xffffffff);
  }

  /** QEMU's qcow2_inc_refcounts_imrt: count a reference to every cluster of [offset, offset+size). */
  inc(offset: number, size: number): void {
    if (size <= 0) return;
    const fileLen = this.file.getLength();
    // The last cluster may be partly past EOF; a whole cluster or more past it is corruption.
    if (offset + size - fileLen >= this.cs) {
      this.log(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(offset)} size 0x${hex(size)}`);
      this.res.corruptions++;
      return;
    }
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + size - 1) / this.cs);
    for (let k = first; k <= last; k++) {
      if (k >= this.nbClusters) {
        this.refs.grow(k + 1);
        this.nbClusters = k + 1;
      }
      const r = this.refs.counts[k];
      if (r >= this.refcountMax) {
        this.log(`ERROR: overflow cluster offset=0x${hex(k * this.cs)}`);
        this.res.corruptions++;
        continue;
      }
      this.refs.counts[k] = r + 1;
    }
  }

  async calculate(fix: CheckFix): Promise<void> {
    this.inc(0, this.cs);
    await this.checkL1(this.h.l1TableOffset, this.h.l1Size, true, fix);
    if (this.hasDataFile && this.snapshots.length) {
      this.log(`ERROR ${this.snapshots.length} snapshots in image with data file`);
      this.res.corruptions++;
    }
    for (const sn of this.snapshots) {
      if (sn.l1TableOffset % this.cs !== 0) {
        this.log(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${hex(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
        this.res.corruptions++;
        continue;
      }
      if (sn.l1Size > C.QCOW_MAX_L1_SIZE / C.L1E_SIZE) {
        this.log(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${hex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
        this.res.corruptions++;
        continue;
      }
      await this.checkL1(sn.l1TableOffset, sn.l1Size, false, fix);
    }
    this.inc(this.h.snapshotsOffset, this.snapshotsSize);
    this.inc(this.h.refcountTableOffset, this.stored.entries * C.REFTABLE_ENTRY_SIZE);
    if (this.h.cryptoHeader && this.h.cryptoHeader.length >= 16) {
      this.inc(Number(this.h.cryptoHeader.readBigUInt64BE(0)), Number(this.h.cryptoHeader.readBigUInt64BE(8)));
    }
    await this.checkBitmaps(this.bitmapEntries);
    this.checkRefblocks();
  }

  private async checkL1(l1Offset: number, l1Size: number, active: boolean, fix: CheckFix): Promise<void> {
    if (l1Size === 0) return;
    const bytes = l1Size * C.L1E_SIZE;
    this.inc(l1Offset, bytes);
    const l1 = Buffer.alloc(bytes);
    await readAt(this.file, l1Offset, l1);
    for (let i = 0; i < l1Size; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      if (l1.readBigUInt64BE(i * 8) & C.L1E_RESERVED_MASK) {
        this.log(`ERROR found L1 entry with reserved bits set: ${hex(l1.readBigUInt64BE(i * 8))}`);
        this.res.corruptions++;
      }
      const l2Offset = (hi & C.OFFSET_MASK_HI) * TWO_32 + ((lo & C.OFFSET_MASK_LO) >>> 0);
      this.inc(l2Offset, this.cs);
      if (l2Offset % this.cs !== 0) {
        this.log(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
        this.res.corruptions++;
      }
      await this.checkL2(l2Offset, active, fix);
    }
  }

  private async checkL2(l2Offset: number, active: boolean, fix: CheckFix): Promise<void> {
    // A table wholly past EOF reads as zeros: nothing to count, and no need to allocate it.
    if (l2Offset >= this.file.getLength()) return;
    const l2 = Buffer.alloc(this.l2Size * this.l2EntrySize);
    await readAt(this.file, l2Offset, l2);
    const csizeShift = 62 - (this.bits - 8);
    const csizeMask = (1n << BigInt(this.bits - 8)) - 1n;
    const coffsetMask = (1n << BigInt(csizeShift)) - 1n;
    let nextContiguous = 0;
    let dirty = false;
    for (let i = 0; i < this.l2Size; i++) {
      const p = i * this.l2EntrySize;
      const hi = l2.readUInt32BE(p);
      const lo = l2.readUInt32BE(p + 4);
      const bitmapHi = this.extendedL2 ? l2.readUInt32BE(p + 8) : 0;
      const bitmapLo = this.extendedL2 ? l2.readUInt32BE(p + 12) : 0;
      const compressed = (hi & C.QCOW_OFLAG_COMPRESSED_HI) !== 0;
      // Standard descriptors only: a compressed one has no reserved bits QEMU checks (its
      // offset bits above 55, if any, show as a reference past the end of the file).
      if (!compressed && l2.readBigUInt64BE(p) & C.L2E_STD_RESERVED_MASK) {
        this.log(`ERROR found l2 entry with reserved bits set: ${hex(l2.readBigUInt64BE(p))}`);
        this.res.corruptions++;
      }
      if (compressed) {
        const entry = l2.readBigUInt64BE(p);
        if (hi & C.QCOW_OFLAG_COPIED_HI) {
          this.log(`ERROR: coffset=0x${hex(entry & coffsetMask)}: copied flag must never be set for compressed clusters`);
          this.res.corruptions++;
        }
        if (this.hasDataFile) {
          this.log(`ERROR compressed cluster ${i} with data file, entry=0x${hex(entry)}`);
          this.res.corruptions++;
          continue;
        }
        if (bitmapHi || bitmapLo) {
          this.log(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hex(entry)}`);
          this.res.corruptions++;
          continue;
        }
        const coffset = entry & coffsetMask;
        const nbSectors = ((entry >> BigInt(csizeShift)) & csizeMask) + 1n;
        const csize = Number(nbSectors) * C.QCOW2_COMPRESSED_SECTOR_SIZE - Number(coffset & 511n);
        this.inc(Number(coffset), csize);
        if (active) {
          this.res.allocatedClusters++;
          this.res.compressedClusters++;
          // Compressed clusters are fragmented by nature (QEMU counts each one).
          this.res.fragmentedClusters++;
        }
        continue;
      }
      const offset = (hi & C.OFFSET_MASK_HI) * TWO_32 + ((lo & C.OFFSET_MASK_LO) >>> 0);
      const zeroFlag = !this.extendedL2 && (lo & C.QCOW_OFLAG_ZERO_LO) !== 0;
      if (offset === 0) {
        // Unallocated, or a plain zero cluster.
        if (this.extendedL2 && bitmapLo !== 0) {
          this.res.corruptions++;
          this.log('ERROR: Unallocated cluster has non-zero subcluster allocation map');
        }
        continue;
      }
      if (this.extendedL2 && (bitmapHi & bitmapLo) !== 0) {
        this.res.corruptions++;
        this.log(`ERROR offset=${hex(offset)}: Allocated cluster has corrupted subcluster allocation bitmap`);
      }
      if (offset % this.cs !== 0) {
        this.res.corruptions++;
        const containsData = this.extendedL2 ? bitmapLo !== 0 : !zeroFlag;
        if (!containsData) {
          this.log(`${fix.errors ? 'Repairing' : 'ERROR'} offset=${hex(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
          if (fix.errors) {
            // Make it a plain zero cluster (QEMU's fix_l2_entry_by_zero).
            l2.writeUInt32BE(0, p);
            l2.writeUInt32BE(C.QCOW_OFLAG_ZERO_LO, p + 4);
            dirty = true;
            this.res.corruptions--;
            this.res.corruptionsFixed++;
            continue;
          }
        } else {
          this.log(`ERROR offset=${hex(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
        }
      }
      if (active) {
        this.res.allocatedClusters++;
        if (nextContiguous && offset !== nextContiguous) this.res.fragmentedClusters++;
        nextContiguous = offset + this.cs;
      }
      if (!this.hasDataFile) this.inc(offset, this.cs);
    }
    if (dirty) await this.file.pwrite(l2Offset, l2);
  }

  /**
   * QEMU's qcow2_check_bitmaps_refcounts: count the directory, every table and every data
   * cluster. The directory and the tables of bitmaps not in use were validated before the
   * check (as QEMU's open does); a broken table of a bitmap in use stops the check.
   */
  async checkBitmaps(entries: readonly BitmapDirEntry[]): Promise<void> {
    const bm = this.h.bitmaps;
    if (!bm) return;
    this.inc(bm.bitmapDirectoryOffset, bm.bitmapDirectorySize);
    for (const e of entries) {
      this.inc(e.tableOffset, e.tableSize * C.BME_TABLE_ENTRY_SIZE);
      let table: BigUint64Array;
      try {
        table = await readBitmapTable(this.file, e, this.cs, this.file.filename);
      } catch (err) {
        this.res.corruptions++;
        throw err;
      }
      for (const entry of table) {
        const offset = Number(entry & C.BME_TABLE_ENTRY_OFFSET_MASK);
        if (offset !== 0) this.inc(offset, this.cs);
      }
    }
  }

  private checkRefblocks(): void {
    for (let i = 0; i < this.stored.entries; i++) {
      const e = this.stored.reftableEntry(i);
      const offset = Number(e & C.REFT_OFFSET_MASK);
      if (e & C.REFT_RESERVED_MASK) {
        this.log(`ERROR refcount table entry ${i} has reserved bits set`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      if (offset % this.cs !== 0) {
        this.log(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      const cluster = offset / this.cs;
      if (cluster >= this.nbClusters) {
        // QEMU grows the file to cover it when repairing; we rebuild instead.
        this.res.corruptions++;
        this.log(`ERROR refcount block ${i} is outside image`);
        this.rebuild = true;
        continue;
      }
      if (offset !== 0) {
        this.inc(offset, this.cs);
        if (this.refs.get(cluster) !== 1) {
          this.log(`ERROR refcount block ${i} refcount=${this.refs.get(cluster)}`);
          this.res.corruptions++;
          this.rebuild = true;
        }
      }
    }
  }

  /** QEMU's compare_refcounts; returns the highest cluster in use. */
  async compare(fix: CheckFix): Promise<number> {
    let highest = 0;
    for (let i = 0; i < this.nbClusters; i++) {
      let stored: number;
      try {
        stored = await this.stored.get(i);
      } catch (err) {
        this.log(`Can't get refcount for cluster ${i}: ${(err as Error).message}`);
        this.res.checkErrors++;
        continue;
      }
      const computed = this.refs.get(i);
      if (stored > 0 || computed > 0) highest = i;
      if (stored === computed) continue;
      let fixing: 'leaksFixed' | 'corruptionsFixed' | null = null;
      if (stored === 0) this.rebuild = true;
      else if (stored > computed && fix.leaks) fixing = 'leaksFixed';
      else if (stored < computed && fix.errors) fixing = 'corruptionsFixed';
      this.log(`${fixing ? 'Repairing' : stored < computed ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${stored} reference=${computed}`);
      if (fixing && (await this.stored.set(i, computed))) {
        this.res[fixing]++;
        continue;
      }
      if (stored < computed) this.res.corruptions++;
      else this.res.leaks++;
    }
    return highest;
  }

  /** QEMU's check_oflag_copied: COPIED must be set exactly when the stored refcount is 1. */
  async checkCopied(fix: CheckFix): Promise<void> {
    const repair = fix.errors || (fix.leaks && !this.res.checkErrors && !this.res.corruptions && !this.res.leaks);
    const l1 = Buffer.alloc(this.h.l1Size * C.L1E_SIZE);
    await readAt(this.file, this.h.l1TableOffset, l1);
    const l2 = Buffer.alloc(this.l2Size * this.l2EntrySize);
    for (let i = 0; i < this.h.l1Size; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      const l2Offset = (hi & C.OFFSET_MASK_HI) * TWO_32 + ((lo & C.OFFSET_MASK_LO) >>> 0);
      if (l2Offset === 0) continue;
      let refcount: number;
      try {
        refcount = await this.stored.get(Math.floor(l2Offset / this.cs));
      } catch {
        continue;
      }
      const copied = (hi & C.QCOW_OFLAG_COPIED_HI) !== 0;
      if ((refcount === 1) !== copied) {
        this.res.corruptions++;
        this.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex(l1.readBigUInt64BE(i * 8))} refcount=${refcount}`);
        if (repair) {
          l1.writeUInt32BE((refcount === 1 ? hi | C.QCOW_OFLAG_COPIED_HI : hi & ~C.QCOW_OFLAG_COPIED_HI) >>> 0, i * 8);
          await this.file.pwrite(this.h.l1TableOffset + i * 8, l1.subarray(i * 8, i * 8 + 8));
          this.res.corruptions--;
          this.res.corruptionsFixed++;
        }
      }
      if (l2Offset >= this.file.getLength()) continue;
      await readAt(this.file, l2Offset, l2);
      let dirty = 0;
      for (let j = 0; j < this.l2Size; j++) {
        const p = j * this.l2EntrySize;
        const ehi = l2.readUInt32BE(p);
        const elo = l2.readUInt32BE(p + 4);
        if (ehi & C.QCOW_OFLAG_COMPRESSED_HI) continue;
        const dataOffset = (ehi & C.OFFSET_MASK_HI) * TWO_32 + ((elo & C.OFFSET_MASK_LO) >>> 0);
        if (dataOffset === 0) continue;
        let rc: number;
        if (this.hasDataFile) rc = 1;
        else {
          try {
            rc = await this.stored.get(Math.floor(dataOffset / this.cs));
          } catch {
            continue;
          }
        }
        if ((rc === 1) !== ((ehi & C.QCOW_OFLAG_COPIED_HI) !== 0)) {
          this.res.corruptions++;
          this.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex(l2.readBigUInt64BE(p))} refcount=${rc}`);
          if (repair) {
            l2.writeUInt32BE((rc === 1 ? ehi | C.QCOW_OFLAG_COPIED_HI : ehi & ~C.QCOW_OFLAG_COPIED_HI) >>> 0, p);
            dirty++;
          }
        }
      }
      if (dirty > 0) {
        await this.file.pwrite(l2Offset, l2);
        this.res.corruptions -= dirty;
        this.res.corruptionsFixed += dirty;
      }
    }
  }

  /** First-fit allocation in the computed refcounts (QEMU's alloc_clusters_imrt). */
  private allocImrt(count: number, firstFree: { v: number }): number {
    let cluster = firstFree.v;
    let run = 0;
    let firstGap = true;
    for (; cluster < this.nbClusters && run < count; cluster++) {
      if (this.refs.get(cluster) === 0) {
        run++;
        if (firstGap) {
          firstFree.v = cluster;
          firstGap = false;
        }
      } else if (run) {
        run = 0;
      }
    }
    if (run < count) {
      const n = cluster + count - run;
      this.refs.grow(n);
      this.nbClusters = Math.max(this.nbClusters, n);
    }
    cluster -= run;
    for (let i = 0; i < count; i++) this.refs.counts[cluster + i] = 1;
    return cluster;
  }

  /**
   * QEMU's rebuild_refcount_structure: write fresh refcount blocks and a fresh refcount table
   * (into clusters no one references) from the computed refcounts, then point the header at
   * them. The old structures are simply no longer referenced.
   */
  async rebuildRefcounts(): Promise<void> {
    const perBlock = 2 ** (this.bits + 3 - this.h.refcountOrder);
    let reftable: number[] = [];
    const writeBlocks = async (first: number, end: number): Promise<boolean> => {
      let grown = false;
      const firstFree = { v: 0 };
      for (let cluster = first; cluster < end; cluster++) {
        if (this.refs.get(cluster) === 0) continue;
        const index = Math.floor(cluster / perBlock);
        const start = index * perBlock;
        let blockCluster: number;
        if (reftable.length > index && reftable[index]) {
          blockCluster = reftable[index] / this.cs;
        } else {
          if (firstFree.v < start) firstFree.v = start;
          blockCluster = this.allocImrt(1, firstFree);
          if (blockCluster >= end) end = blockCluster + 1;
          if (reftable.length <= index) {
            const entries = Math.ceil(((index + 1) * C.REFTABLE_ENTRY_SIZE) / this.cs) * this.cs / C.REFTABLE_ENTRY_SIZE;
            while (reftable.length < entries) reftable.push(0);
            grown = true;
          }
          reftable[index] = blockCluster * this.cs;
        }
        const block = Buffer.alloc(this.cs);
        for (let k = 0; k < perBlock; k++) {
          const v = this.refs.get(start + k);
          if (v) writeRefcount(block, k, this.h.refcountOrder, v);
        }
        await writeAt(this.file, blockCluster * this.cs, block);
        cluster = start + perBlock - 1;
      }
      return grown;
    };
    await writeBlocks(0, this.nbClusters);
    let reftableOffset = 0;
    let reftableClusters = 0;
    let changed = true;
    while (changed) {
      reftableClusters = Math.ceil((reftable.length * C.REFTABLE_ENTRY_SIZE) / this.cs);
      const start = this.allocImrt(reftableClusters, { v: 0 });
      reftableOffset = start * this.cs;
      changed = await writeBlocks(start, start + reftableClusters);
    }
    const buf = Buffer.alloc(reftableClusters * this.cs);
    reftable.forEach((v, i) => buf.writeBigUInt64BE(BigInt(v), i * 8));
    await writeAt(this.file, reftableOffset, buf);
    const field = Buffer.alloc(12);
    field.writeBigUInt64BE(BigInt(reftableOffset), 0);
    field.writeUInt32BE(reftableClusters, 8);
    await this.file.pwrite(C.HDR_REFCOUNT_TABLE_OFFSET, field);
    await this.file.flush();
    this.h = { ...this.h, refcountTableOffset: reftableOffset, refcountTableClusters: reftableClusters };
    this.stored.setReftable(buf);
  }
}

async function readReftable(file: BlockNode, h: Qcow2Header): Promise<Buffer> {
  const buf = Buffer.alloc(h.refcountTableClusters * 2 ** h.clusterBits);
  await readAt(file, h.refcountTableOffset, buf);
  return buf;
}

/**
 * Check (and with `fix`, repair) the qcow2 image on `file`. Problems found are counted in the
 * result and described through `log` (QEMU prints them on stderr). Throws when the check
 * cannot complete (QEMU's "Check failed"); the image header must parse.
 */
export async function checkQcow2(file: BlockNode, filename: string, fix: CheckFix, log: (line: string) => void): Promise<CheckResult> {
  const h = await readHeader(file, filename);
  // QEMU's check opens the image first, which loads the bitmaps: what refuses that open
  // refuses the check too.
  const bitmaps = await readBitmapsForOpen(file, h, h.size, filename);
  const fileLen = file.getLength();
  const cs = 2 ** h.clusterBits;
  let nbClusters = Math.ceil(fileLen / cs);
  if (nbClusters > 0x7fffffff) throw new VdiskError('EFBIG', 'io', `${filename}: image file is too large to check`);

  // Snapshot table first (QEMU's qcow2_check_read_snapshot_table): a broken table stops the check.
  const snapshotNotes: CheckResult = emptyResult();
  const snapshots = await readSnapshots(file, h, filename, {
    onProblem: (msg) => {
      log(msg);
      snapshotNotes.corruptions++;
    },
  });

  const stored = new StoredRefcounts(file, h, await readReftable(file, h));
  const c = new Checker(file, h, stored, log);
  c.snapshots = snapshots;
  c.snapshotsSize = snapshotTableSize(snapshots);
  c.bitmapEntries = bitmaps.map((b) => b.entry);
  c.refs = new RefcountArray(nbClusters);
  c.nbClusters = nbClusters;
  c.res.totalClusters = Math.ceil(Math.ceil(h.size / 512) * 512 / cs);

  await c.calculate({ leaks: false, errors: fix.errors });
  const preCompare = { ...c.res };
  let highest = await c.compare({ leaks: false, errors: false });

  if (c.rebuild && fix.errors) {
    const old = { ...c.res };
    log('Rebuilding refcount structure');
    await c.rebuildRefcounts();
    c.res.corruptions = 0;
    c.res.leaks = 0;
    c.rebuild = false;
    // Recount with the new structures in place (their clusters are now referenced).
    nbClusters = c.nbClusters;
    c.refs = new RefcountArray(nbClusters);
    const keep = { ...c.res };
    c.res = { ...emptyResult(), totalClusters: keep.totalClusters };
    await c.calculate({ leaks: false, errors: false });
    const recount = { ...c.res, corruptionsFixed: keep.corruptionsFixed, leaksFixed: keep.leaksFixed };
    let freshLeaks = 0;
    if (fix.leaks) {
      c.res = emptyResult();
      highest = await c.compare({ leaks: true, errors: false });
      if (c.rebuild) log('ERROR rebuilt refcount structure is still broken');
      freshLeaks = c.res.leaks;
    }
    c.res = recount;
    if (c.res.corruptions < old.corruptions) c.res.corruptionsFixed += old.corruptions - c.res.corruptions;
    if (c.res.leaks < old.leaks) c.res.leaksFixed += old.leaks - c.res.leaks;
    c.res.leaks += freshLeaks;
  } else if (fix.leaks || fix.errors) {
    if (c.rebuild) {
      log('ERROR need to rebuild refcount structures');
      throw new VdiskError('EIO', 'corrupt-image', 'Input/output error (the refcount structure needs a rebuild: use -r all)');
    }
    if (c.res.leaks || c.res.corruptions) {
      c.res = preCompare;
      highest = await c.compare(fix);
    }
  }

  await c.checkCopied(fix);
  c.res.imageEndOffset = (highest + 1) * cs;
  c.res.corruptions += snapshotNotes.corruptions;

  if ((fix.leaks || fix.errors) && c.res.checkErrors === 0 && c.res.corruptions === 0) {
    await markClean(file, c.h);
  }
  await file.flush();
  return c.res;
}

/** Clear the dirty and corrupt bits once the image is consistent (qcow2_mark_clean/consistent). */
async function markClean(file: BlockNode, h: Qcow2Header): Promise<void> {
  if (h.version < 3) return;
  const mask = C.QCOW2_INCOMPAT_DIRTY | C.QCOW2_INCOMPAT_CORRUPT;
  if ((h.incompatibleFeatures & mask) === 0n) return;
  await file.flush();
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(h.incompatibleFeatures & ~mask);
  await file.pwrite(C.HDR_INCOMPATIBLE_FEATURES, b);
}

// serializeHeader is re-exported for tools that rewrite the header after a repair.
export { serializeHeader };
