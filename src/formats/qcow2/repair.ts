// Refcount repair for images left dirty (lazy refcounts, unclean shutdown): count every
// reference from the header, the active and snapshot L1/L2 tables, the snapshot table and
// the bitmap directory, then write a fresh refcount structure after the end of the file and
// switch the header to it (QEMU's rebuild_refcount_structure). COPIED flags of the active
// tables are set from the new counts. The old refcount table and blocks become free space.
import { VdiskError, corrupt } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import * as C from './constants.js';
import type { Qcow2Header } from './header.js';
import { EntryDecoder, KIND_COMPRESSED, KIND_NORMAL, KIND_ZERO_ALLOC, entryHi, entryLo, makeEntry, setEntry } from './l2entry.js';
import { setRefcountEntry } from './refcount.js';
import { type Qcow2Snapshot, snapshotTableSize } from './snapshot.js';
import { readBitmapDirectory, readBitmapTable } from './bitmaps.js';

/** Beyond this many host clusters we refuse to repair in memory (4 bytes per cluster). */
const MAX_REPAIR_CLUSTERS = 2 ** 28;

export interface RepairResult {
  tableOffset: number;
  tableClusters: number;
  table: Buffer;
  /** The active L1 table, with COPIED flags corrected. */
  l1: Buffer;
}

export async function repairRefcounts(file: BlockNode, h: Qcow2Header, l1In: Buffer, snapshots: Qcow2Snapshot[], fn: string): Promise<RepairResult> {
  const cs = 2 ** h.clusterBits;
  const dec = new EntryDecoder(h.clusterBits, fn);
  const fileClusters = Math.ceil(file.getLength() / cs);
  if (fileClusters > MAX_REPAIR_CLUSTERS) {
    throw new VdiskError('ENOMEM', 'io', `${fn}: image has ${fileClusters} host clusters, more than ${MAX_REPAIR_CLUSTERS} that refcount repair handles`);
  }
  let counts = new Float64Array(fileClusters);
  // Clusters the repaired structure must cover: the file, plus data clusters past its end.
  // With lazy refcounts an L2 entry can reach the disk while the write that grew the file
  // for its data did not (no barrier between them): such a cluster was allocated after the
  // last flush, so its data was never promised, and it reads as zeros once the file covers it.
  let coveredClusters = fileClusters;
  const inc = (off: number, len: number, what: string) => {
    if (len <= 0) return;
    const first = Math.floor(off / cs);
    const last = Math.floor((off + len - 1) / cs);
    if (last >= fileClusters) {
      const isData = what === 'data cluster' || what === 'compressed cluster';
      if (!isData || last >= MAX_REPAIR_CLUSTERS) {
        throw corrupt(`${fn}: ${what} at ${off} is past the end of the file; cannot repair refcounts`);
      }
      if (last >= counts.length) {
        const grown = new Float64Array(Math.min(MAX_REPAIR_CLUSTERS, Math.max(last + 1, counts.length * 2)));
        grown.set(counts);
        counts = grown;
      }
      coveredClusters = Math.max(coveredClusters, last + 1);
    }
    for (let c = first; c <= last; c++) counts[c]++;
  };
  const readTable = async (off: number, bytes: number): Promise<Buffer> => {
    const b = Buffer.alloc(bytes);
    await file.pread(off, b);
    return b;
  };

  inc(0, cs, 'header');
  const walkL1 = async (l1: Buffer, n: number) => {
    for (let i = 0; i < n; i++) {
      const l2Off = dec.l1Offset(entryHi(l1, i), entryLo(l1, i), i);
      if (!l2Off) continue;
      inc(l2Off, cs, 'L2 table');
      const l2 = await readTable(l2Off, cs);
      for (let j = 0; j < cs / 8; j++) {
        const e = dec.decode(entryHi(l2, j), entryLo(l2, j), 0);
        if (e.kind === KIND_NORMAL || e.kind === KIND_ZERO_ALLOC) inc(e.host, cs, 'data cluster');
        else if (e.kind === KIND_COMPRESSED) inc(e.host, e.csize, 'compressed cluster');
      }
    }
  };
  inc(h.l1TableOffset, h.l1Size * 8, 'L1 table');
  await walkL1(l1In, h.l1Size);
  inc(h.snapshotsOffset, snapshotTableSize(snapshots), 'snapshot table');
  for (const s of snapshots) {
    inc(s.l1TableOffset, s.l1Size * 8, 'snapshot L1 table');
    await walkL1(await readTable(s.l1TableOffset, s.l1Size * 8), s.l1Size);
  }
  if (h.bitmaps) await countBitmaps(file, h, inc, fn);

  // Fix COPIED flags of the active tables (refcount exactly 1 means "may write in place").
  const l1 = Buffer.from(l1In);
  for (let i = 0; i < h.l1Size; i++) {
    const l2Off = dec.l1Offset(entryHi(l1, i), entryLo(l1, i), i);
    if (!l2Off) continue;
    const [hi, lo] = makeEntry(l2Off, counts[l2Off / cs] === 1);
    setEntry(l1, i, hi, lo);
    const l2 = await readTable(l2Off, cs);
    let changed = false;
    for (let j = 0; j < cs / 8; j++) {
      const ohi = entryHi(l2, j);
      const olo = entryLo(l2, j);
      const e = dec.decode(ohi, olo, 0);
      if (e.kind !== KIND_NORMAL && e.kind !== KIND_ZERO_ALLOC) continue;
      const want = counts[e.host / cs] === 1;
      const nhi = want ? (ohi | C.QCOW_OFLAG_COPIED_HI) >>> 0 : (ohi & ~C.QCOW_OFLAG_COPIED_HI) >>> 0;
      if (nhi !== ohi) {
        setEntry(l2, j, nhi, olo);
        changed = true;
      }
    }
    if (changed) await file.pwrite(l2Off, l2);
  }
  if (!l1.equals(l1In)) await file.pwrite(h.l1TableOffset, l1);

  // New refcount structure after the end of the file: `blocks` blocks then the table.
  const perBlock = 2 ** (h.clusterBits + 3 - h.refcountOrder);
  const maxRefcount = h.refcountOrder === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** h.refcountOrder) - 1;
  const start = coveredClusters;
  let blocks = 1;
  let tableClusters = 1;
  for (let iter = 0; iter < 64; iter++) {
    const total = start + blocks + tableClusters;
    const nb = Math.ceil(total / perBlock);
    const nt = Math.ceil((nb * 8) / cs);
    if (nb === blocks && nt === tableClusters) break;
    blocks = nb;
    tableClusters = nt;
  }
  if (tableClusters * cs > C.QCOW_MAX_REFTABLE_SIZE) {
    throw new VdiskError('EFBIG', 'io', `${fn}: rebuilt refcount table would exceed ${C.QCOW_MAX_REFTABLE_SIZE} bytes`);
  }
  const table = Buffer.alloc(tableClusters * cs);
  const area = Buffer.alloc(blocks * cs);
  const countOf = (c: number) => (c < coveredClusters ? counts[c] : 1); // past that: the new structure itself
  for (let c = 0; c < start + blocks + tableClusters; c++) {
    const v = countOf(c);
    if (v === 0) continue;
    if (v > maxRefcount) throw corrupt(`${fn}: cluster ${c} has ${v} references, more than refcount_bits allows (${maxRefcount})`);
    const b = Math.floor(c / perBlock);
    setRefcountEntry(area.subarray(b * cs, (b + 1) * cs), h.refcountOrder, c % perBlock, v);
  }
  for (let b = 0; b < blocks; b++) table.writeBigUInt64BE(BigInt((start + b) * cs), b * 8);
  await file.truncate((start + blocks + tableClusters) * cs, 'off');
  await file.pwrite(start * cs, area);
  await file.pwrite((start + blocks) * cs, table);
  await file.flush();
  const hdr = Buffer.alloc(12);
  hdr.writeBigUInt64BE(BigInt((start + blocks) * cs), 0);
  hdr.writeUInt32BE(tableClusters, 8);
  await file.pwrite(C.HDR_REFCOUNT_TABLE_OFFSET, hdr);
  await file.flush();
  return { tableOffset: (start + blocks) * cs, tableClusters, table, l1 };
}

/**
 * Bitmap directory and bitmap tables (spec: "Bitmaps"): count their clusters too. The open
 * validated the directory and the tables of bitmaps not in use; a broken table of one in use
 * stops the repair, as it stops QEMU's.
 */
async function countBitmaps(file: BlockNode, h: Qcow2Header, inc: (off: number, len: number, what: string) => void, fn: string): Promise<void> {
  const bm = h.bitmaps!;
  const cs = 2 ** h.clusterBits;
  inc(bm.bitmapDirectoryOffset, bm.bitmapDirectorySize, 'bitmap directory');
  for (const e of await readBitmapDirectory(file, h, h.size, fn)) {
    inc(e.tableOffset, e.tableSize * C.BME_TABLE_ENTRY_SIZE, 'bitmap table');
    for (const entry of await readBitmapTable(file, e, cs, fn)) {
      const off = Number(entry & C.BME_TABLE_ENTRY_OFFSET_MASK);
      if (off) inc(off, cs, 'bitmap data');
    }
  }
}
