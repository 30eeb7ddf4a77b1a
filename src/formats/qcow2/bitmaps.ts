// Persistent dirty bitmaps in qcow2 (spec: docs/interop/qcow2.txt, "Bitmaps extension",
// "Bitmap directory", "Bitmap table"; behaviour after QEMU 7.2's block/qcow2-bitmap.c).
//
// The in-memory bitmaps (src/block/dirty-bitmap.ts) know nothing about qcow2; this file
// reads and writes their on-disk form:
//   - the directory and tables are validated at every open, read-only ones too, exactly as
//     QEMU's bitmap_list_load / check_dir_entry / bitmap_table_load do, with QEMU's messages
//     (a refusal here is a refusal of the image);
//   - a writable open marks every loaded bitmap in_use before anything can write to the
//     image, rewriting the directory in place under a cleared autoclear bit (a crash
//     between the steps leaves the extension stale, never torn);
//   - a bitmap already in_use loads empty and `inconsistent`; it is kept in the image as it
//     is until it is removed;
//   - a clean close stores every consistent persistent bitmap into new clusters, writes a new
//     directory, makes all of it stable, switches the header to it, and only then frees the
//     old directory and tables (crash at any point: the old or the new set, plus leaks).
import type { DirtyBitmap } from '../../block/dirty-bitmap.js';
import { DirtyBitmap as Bitmap } from '../../block/dirty-bitmap.js';
import { VdiskError, corrupt, invalidArgument, unsupported } from '../../block/errors.js';
import type { BlockIo } from '../../block/edge.js';
import * as C from './constants.js';
import type { Qcow2Header } from './header.js';
import type { Refcounts } from './refcount.js';

/** One bitmap directory entry as stored. */
export interface BitmapDirEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  /** Bytes of the name as stored (QEMU stops at a NUL); `name` is their UTF-8 reading. */
  nameBytes: Buffer;
  name: string;
}

/** Bytes of serialised bitmap data for a disk of `size` bytes: one bit per granule. */
export function bitmapDataBytes(size: number, granularity: number): number {
  return Math.ceil(Math.ceil(size / granularity) / 8);
}

/** Bitmap table entries (data clusters) a bitmap of a disk this size needs. */
export function bitmapTableSize(size: number, granularity: number, clusterSize: number): number {
  return Math.ceil(bitmapDataBytes(size, granularity) / clusterSize);
}

/** A directory entry's size, padding included; int arithmetic as QEMU's calc_dir_entry_size (it wraps). */
function dirEntrySize(nameSize: number, extraDataSize: number): number {
  const size = (C.BME_DIR_ENTRY_FIXED_SIZE + nameSize + extraDataSize) | 0;
  return (size + 7) & -8;
}

/** Read [offset, offset+len): what lies past EOF reads as zeros, as in QEMU's block layer. */
async function readPadded(file: BlockIo, offset: number, len: number): Promise<Buffer> {
  const buf = Buffer.alloc(len);
  const fileLen = file.getLength();
  if (Number.isSafeInteger(offset) && offset < fileLen) await file.pread(offset, buf.subarray(0, Math.min(len, fileLen - offset)));
  return buf;
}

/**
 * What breaks QEMU's check_dir_entry, or null. `diskSize` matters only for a bitmap not in
 * use: its table must cover the whole disk (an in_use one may be stale after a resize).
 */
export function dirEntryProblem(e: BitmapDirEntry, clusterSize: number, diskSize: number): string | null {
  if (e.tableSize === 0) return 'bitmap_table_size is 0';
  if (e.tableOffset === 0) return 'bitmap_table_offset is 0';
  if (e.tableOffset % clusterSize !== 0) return `bitmap_table_offset ${e.tableOffset} is not cluster aligned`;
  if (e.tableSize > C.BME_MAX_TABLE_SIZE) return `bitmap_table_size ${e.tableSize} is more than ${C.BME_MAX_TABLE_SIZE}`;
  if (e.granularityBits > C.BME_MAX_GRANULARITY_BITS || e.granularityBits < C.BME_MIN_GRANULARITY_BITS) {
    return `granularity_bits ${e.granularityBits} is outside ${C.BME_MIN_GRANULARITY_BITS}..${C.BME_MAX_GRANULARITY_BITS}`;
  }
  if ((e.flags & C.BME_RESERVED_FLAGS) !== 0) return `reserved flags 0x${((e.flags & C.BME_RESERVED_FLAGS) >>> 0).toString(16)} are set`;
  if (e.nameBytes.length > C.BME_MAX_NAME_SIZE) return `name_size ${e.nameBytes.length} is more than ${C.BME_MAX_NAME_SIZE}`;
  if (e.type !== C.BT_DIRTY_TRACKING_BITMAP) return `type ${e.type} is not ${C.BT_DIRTY_TRACKING_BITMAP} (dirty tracking bitmap)`;
  const phys = e.tableSize * clusterSize;
  if (phys > C.BME_MAX_PHYS_SIZE) return `bitmap_table_size ${e.tableSize} means more than ${C.BME_MAX_PHYS_SIZE} bytes of bitmap data`;
  if (!(e.flags & C.BME_FLAG_IN_USE) && diskSize > phys * 8 * 2 ** e.granularityBits) {
    return `bitmap_table_size ${e.tableSize} does not cover the disk size ${diskSize}`;
  }
  return null;
}

/**
 * A table offset as a JS number: exact below 2^53. Past that it lies beyond any file, so it
 * becomes the last cluster-aligned offset below 2^53 (reads as zeros, as QEMU reads past
 * EOF), or 1 when it is not aligned (still refused as misaligned).
 */
function safeOffset(offset: bigint, clusterSize: number): number {
  if (offset <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(offset);
  if (offset % BigInt(clusterSize) !== 0n) return 1;
  return 2 ** 53 - clusterSize;
}

/**
 * Parse and validate a bitmap directory (QEMU's bitmap_list_load); throws with QEMU's
 * message and, in parentheses, what exactly is wrong.
 */
export function parseBitmapDirectory(dir: Buffer, nbBitmaps: number, clusterSize: number, diskSize: number, fn: string): BitmapDirEntry[] {
  const broken = (why: string) => corrupt(`${fn}: Broken bitmap directory (${why})`);
  const out: BitmapDirEntry[] = [];
  let pos = 0;
  while (pos < dir.length) {
    if (pos + C.BME_DIR_ENTRY_FIXED_SIZE > dir.length) throw broken(`entry ${out.length} at byte ${pos} is cut off by the directory end`);
    if (out.length + 1 > nbBitmaps) throw corrupt(`${fn}: More bitmaps found than specified in header extension (nb_bitmaps ${nbBitmaps})`);
    const nameSize = dir.readUInt16BE(pos + 18);
    const extraDataSize = dir.readUInt32BE(pos + 20);
    const next = pos + dirEntrySize(nameSize, extraDataSize);
    if (next > dir.length) throw broken(`entry ${out.length} at byte ${pos} runs past the directory end (${dir.length} bytes)`);
    if (extraDataSize !== 0) throw corrupt(`${fn}: Bitmap extra data is not supported (entry ${out.length}: extra_data_size ${extraDataSize})`);
    const raw = dir.subarray(pos + C.BME_DIR_ENTRY_FIXED_SIZE, pos + C.BME_DIR_ENTRY_FIXED_SIZE + nameSize);
    const nul = raw.indexOf(0);
    const nameBytes = Buffer.from(nul < 0 ? raw : raw.subarray(0, nul));
    const e: BitmapDirEntry = {
      tableOffset: safeOffset(dir.readBigUInt64BE(pos), clusterSize),
      tableSize: dir.readUInt32BE(pos + 8),
      flags: dir.readUInt32BE(pos + 12),
      type: dir.readUInt8(pos + 16),
      granularityBits: dir.readUInt8(pos + 17),
      nameBytes,
      name: nameBytes.toString('utf8'),
    };
    const problem = dirEntryProblem(e, clusterSize, diskSize);
    if (problem) throw corrupt(`${fn}: Bitmap '${e.name}' doesn't satisfy the constraints (${problem})`);
    out.push(e);
    pos = next;
  }
  if (out.length !== nbBitmaps) throw corrupt(`${fn}: Less bitmaps found than specified in header extension (${out.length} of ${nbBitmaps})`);
  return out;
}

/** The bitmap directory of an image (empty without the extension). */
export async function readBitmapDirectory(file: BlockIo, h: Qcow2Header, diskSize: number, fn: string): Promise<BitmapDirEntry[]> {
  const ext = h.bitmaps;
  if (!ext) return [];
  if (ext.bitmapDirectorySize === 0) throw corrupt(`${fn}: Requested bitmap directory size is zero`);
  const dir = await readPadded(file, ext.bitmapDirectoryOffset, ext.bitmapDirectorySize);
  return parseBitmapDirectory(dir, ext.nbBitmaps, 2 ** h.clusterBits, diskSize, fn);
}

/** QEMU's check_table_entry: what is wrong with a bitmap table entry, or null. */
export function tableEntryProblem(entry: bigint, clusterSize: number): string | null {
  if (entry & C.BME_TABLE_ENTRY_RESERVED_MASK) return 'reserved bits set';
  const off = entry & C.BME_TABLE_ENTRY_OFFSET_MASK;
  if (off !== 0n) {
    if (entry & C.BME_TABLE_ENTRY_FLAG_ALL_ONES) return 'the all-ones flag is set with a data offset';
    if (off % BigInt(clusterSize) !== 0n) return 'the data offset is not cluster aligned';
  }
  return null;
}

/** The raw bitmap table of an entry (past EOF reads as zeros), unchecked. */
export async function readBitmapTableRaw(file: BlockIo, e: BitmapDirEntry): Promise<BigUint64Array> {
  const buf = await readPadded(file, e.tableOffset, e.tableSize * C.BME_TABLE_ENTRY_SIZE);
  const table = new BigUint64Array(e.tableSize);
  for (let i = 0; i < e.tableSize; i++) table[i] = buf.readBigUInt64BE(i * 8);
  return table;
}

/** QEMU's bitmap_table_load: the table, every entry checked; throws QEMU's open error. */
export async function readBitmapTable(file: BlockIo, e: BitmapDirEntry, clusterSize: number, fn: string): Promise<BigUint64Array> {
  const table = await readBitmapTableRaw(file, e);
  for (let i = 0; i < table.length; i++) {
    const problem = tableEntryProblem(table[i], clusterSize);
    if (problem) {
      throw corrupt(`${fn}: Could not read bitmap_table table from image for bitmap '${e.name}': Invalid argument (entry ${i} is 0x${table[i].toString(16)}: ${problem})`);
    }
  }
  return table;
}

/** One directory entry and what opening needs of it. */
export interface OpenedBitmap {
  entry: BitmapDirEntry;
  /** The checked table of a bitmap to load; null for one in use (its data is not read). */
  table: BigUint64Array | null;
  /** An in-use entry repeating a name already loaded: QEMU leaves it alone. */
  skipped: boolean;
}

/**
 * Everything QEMU's qcow2_load_dirty_bitmaps checks before it changes anything, for every
 * directory entry in order: the directory, each table of a bitmap not in use, that table's
 * size, and the names. `vdisk check` calls this too: an image that does not open is not
 * checked (qemu-img cannot open it either).
 */
export async function readBitmapsForOpen(file: BlockIo, h: Qcow2Header, diskSize: number, fn: string): Promise<OpenedBitmap[]> {
  const cs = 2 ** h.clusterBits;
  const out: OpenedBitmap[] = [];
  const names = new Set<string>();
  for (const entry of await readBitmapDirectory(file, h, diskSize, fn)) {
    const inUse = (entry.flags & C.BME_FLAG_IN_USE) !== 0;
    if (names.has(entry.name)) {
      if (!inUse) throw corrupt(`${fn}: Bitmap already exists: ${entry.name}`);
      out.push({ entry, table: null, skipped: true });
      continue;
    }
    names.add(entry.name);
    if (inUse) {
      out.push({ entry, table: null, skipped: false });
      continue;
    }
    const table = await readBitmapTable(file, entry, cs, fn);
    const need = bitmapTableSize(diskSize, 2 ** entry.granularityBits, cs);
    if (need !== entry.tableSize) {
      throw corrupt(`${fn}: Could not read bitmap '${entry.name}' from image: Invalid argument (bitmap_table_size ${entry.tableSize}, the disk needs ${need})`);
    }
    out.push({ entry, table, skipped: false });
  }
  return out;
}

/** Fill an empty in-memory bitmap from its checked table (QEMU's load_bitmap_data). */
async function loadBitmapData(file: BlockIo, table: BigUint64Array, bitmap: DirtyBitmap, clusterSize: number): Promise<void> {
  const total = bitmap.serializedSize;
  const buf = Buffer.alloc(clusterSize);
  for (let i = 0; i < table.length; i++) {
    const start = i * clusterSize;
    const count = Math.min(clusterSize, total - start);
    if (count <= 0) break;
    const off = table[i] & C.BME_TABLE_ENTRY_OFFSET_MASK;
    if (off === 0n) {
      if (table[i] & C.BME_TABLE_ENTRY_FLAG_ALL_ONES) bitmap.deserializeOnes(start, count);
      continue;
    }
    const data = await readPadded(file, Number(off), count);
    data.copy(buf);
    bitmap.deserialize(start, buf.subarray(0, count));
  }
}

/**
 * QEMU's check_constraints_on_bitmap: why a bitmap with this name and granularity cannot
 * be stored in an image with this cluster size and disk size, or null.
 */
export function bitmapConstraintProblem(name: string, granularity: number, diskSize: number, clusterSize: number): string | null {
  const bits = Math.log2(granularity);
  if (bits > C.BME_MAX_GRANULARITY_BITS) return `Granularity exceeds maximum (${2 ** C.BME_MAX_GRANULARITY_BITS} bytes)`;
  if (bits < C.BME_MIN_GRANULARITY_BITS) return `Granularity is under minimum (${2 ** C.BME_MIN_GRANULARITY_BITS} bytes)`;
  const bytes = bitmapDataBytes(diskSize, granularity);
  if (bytes > C.BME_MAX_PHYS_SIZE || bytes > C.BME_MAX_TABLE_SIZE * clusterSize) {
    return 'Too much space will be occupied by the bitmap. Use larger granularity';
  }
  if (Buffer.byteLength(name) > C.BME_MAX_NAME_SIZE) return `Name length exceeds maximum (${C.BME_MAX_NAME_SIZE} characters)`;
  return null;
}

/** The directory bytes for these entries (all fields big-endian, padding zero). */
export function serializeBitmapDirectory(entries: readonly BitmapDirEntry[]): Buffer {
  const size = entries.reduce((n, e) => n + dirEntrySize(e.nameBytes.length, 0), 0);
  const dir = Buffer.alloc(size);
  let pos = 0;
  for (const e of entries) {
    dir.writeBigUInt64BE(BigInt(e.tableOffset), pos);
    dir.writeUInt32BE(e.tableSize, pos + 8);
    dir.writeUInt32BE(e.flags >>> 0, pos + 12);
    dir.writeUInt8(e.type, pos + 16);
    dir.writeUInt8(e.granularityBits, pos + 17);
    dir.writeUInt16BE(e.nameBytes.length, pos + 18);
    dir.writeUInt32BE(0, pos + 20);
    e.nameBytes.copy(dir, pos + C.BME_DIR_ENTRY_FIXED_SIZE);
    pos += dirEntrySize(e.nameBytes.length, 0);
  }
  return dir;
}

/** qemu-img info's `bitmaps` list entry (QAPI Qcow2BitmapInfo, in the key order qemu-img prints). */
export interface BitmapInfo {
  flags: Array<'in-use' | 'auto'>;
  name: string;
  granularity: number;
}

export function bitmapInfo(e: BitmapDirEntry): BitmapInfo {
  const flags: BitmapInfo['flags'] = [];
  if (e.flags & C.BME_FLAG_IN_USE) flags.push('in-use');
  if (e.flags & C.BME_FLAG_AUTO) flags.push('auto');
  return { flags, name: e.name, granularity: 2 ** e.granularityBits };
}

// ---- the driver side -------------------------------------------------------------------

/** What the bitmap store needs of the qcow2 driver. Every method is called under its lock. */
export interface BitmapHost {
  /** The image file (the driver's `file` edge). */
  readonly file: BlockIo;
  readonly h: Qcow2Header;
  readonly filename: string;
  readonly readOnly: boolean;
  readonly refcounts: Refcounts;
  /** The guest disk length. */
  getLength(): number;
  /** Rewrite the header cluster from `h`, then flush (QEMU's update_header_sync). */
  writeHeader(): Promise<void>;
  /** Metadata caches to the file, then a flush (QEMU's qcow2_flush_caches). */
  flushCaches(): Promise<void>;
  /** Guest writes must never land on the bitmap directory (QEMU's QCOW2_OL_BITMAP_DIRECTORY). */
  setMetadata(offset: number, bytes: number, isMetadata: boolean): void;
  /** Run under the driver's metadata lock (QEMU's s->lock). */
  locked<T>(fn: () => Promise<T>): Promise<T>;
}

/** One entry of the directory as this driver knows it, with the in-memory bitmap it stands for. */
interface Slot {
  entry: BitmapDirEntry;
  /** The bitmap loaded from or stored into this entry (null: an in-use duplicate left alone). */
  bitmap: DirtyBitmap | null;
}

/** A table whose clusters are freed once the header no longer points at it. */
interface OldTable {
  offset: number;
  size: number;
}

/**
 * The persistent bitmaps of one open qcow2 image. `slots` mirrors the directory on disk;
 * the driver's loadBitmaps / storeBitmaps / removeStoredBitmap / checkBitmapStorable and the
 * `bitmaps` list of `info` go through here.
 */
export class Qcow2Bitmaps {
  private slots: Slot[] = [];
  private readonly cs: number;

  constructor(private readonly host: BitmapHost) {
    this.cs = 2 ** host.h.clusterBits;
  }

  /** The directory as `info` lists it (on-disk flags: in-use while a writer has it open). */
  info(): BitmapInfo[] {
    return this.slots.map((s) => bitmapInfo(s.entry));
  }

  /**
   * QEMU's qcow2_load_dirty_bitmaps: validate, build the in-memory bitmaps, and on a
   * writable open mark the consistent ones in_use in the image before returning.
   */
  async load(): Promise<DirtyBitmap[]> {
    const { file, h, filename } = this.host;
    const size = this.host.getLength();
    const opened = await readBitmapsForOpen(file, h, size, filename);
    if (opened.length === 0) return [];
    const out: DirtyBitmap[] = [];
    let markInUse = false;
    for (const o of opened) {
      if (o.skipped) {
        this.slots.push({ entry: o.entry, bitmap: null });
        continue;
      }
      const inUse = (o.entry.flags & C.BME_FLAG_IN_USE) !== 0;
      const bitmap = new Bitmap({
        name: o.entry.name, granularity: 2 ** o.entry.granularityBits, size,
        enabled: (o.entry.flags & C.BME_FLAG_AUTO) !== 0, persistent: true, inconsistent: inUse,
      });
      if (o.table) await loadBitmapData(file, o.table, bitmap, this.cs);
      if (!inUse) markInUse = true;
      this.slots.push({ entry: o.entry, bitmap });
      out.push(bitmap);
    }
    this.host.setMetadata(h.bitmaps!.bitmapDirectoryOffset, h.bitmaps!.bitmapDirectorySize, true);
    if (markInUse && !this.host.readOnly) await this.host.locked(() => this.markInUse());
    return out;
  }

  /**
   * QEMU's update_ext_header_and_dir_in_place: clear the autoclear bit (stable), rewrite the
   * directory in place with in_use set (stable), set the bit again (stable). A crash in
   * between leaves an extension every reader ignores (its clusters leak), never a torn one.
   */
  private async markInUse(): Promise<void> {
    const { h, file } = this.host;
    for (const s of this.slots) if (s.bitmap) s.entry.flags |= C.BME_FLAG_IN_USE;
    h.autoclearFeatures &= ~C.QCOW2_AUTOCLEAR_BITMAPS;
    await this.host.writeHeader();
    await file.pwrite(h.bitmaps!.bitmapDirectoryOffset, serializeBitmapDirectory(this.slots.map((s) => s.entry)));
    await file.flush();
    h.autoclearFeatures |= C.QCOW2_AUTOCLEAR_BITMAPS;
    await this.host.writeHeader();
  }

  /**
   * QEMU's qcow2_co_can_store_new_dirty_bitmap (after the node's own "already exists"
   * check): a new persistent bitmap `name` next to `persistent`, the node's others.
   */
  checkStorable(name: string, granularity: number, persistent?: readonly DirtyBitmap[]): void {
    const fail = (why: string) => invalidArgument(`Can't make bitmap '${name}' persistent in '${this.host.filename}': ${why}`);
    if (this.host.h.version < 3) throw fail('Cannot store dirty bitmaps in qcow2 v2 files');
    const problem = bitmapConstraintProblem(name, granularity, this.host.getLength(), this.cs);
    if (problem) throw fail(problem);
    // Without the node's list, the directory as stored stands in for it.
    const names = persistent ? persistent.map((b) => b.name ?? '') : this.slots.map((s) => s.entry.name);
    let count = 1;
    let dirSize = dirEntrySize(Buffer.byteLength(name), 0);
    for (const other of names) {
      count++;
      dirSize += dirEntrySize(Buffer.byteLength(other), 0);
    }
    if (count > C.QCOW2_MAX_BITMAPS) throw fail('Maximum number of persistent bitmaps is already reached');
    if (dirSize > C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE) throw fail('Not enough space in the bitmap directory');
  }

  /**
   * QEMU's qcow2_store_persistent_dirty_bitmaps: write every consistent persistent bitmap
   * into new clusters with a new directory; entries of bitmaps not given (inconsistent ones,
   * in-use duplicates) stay as they are. Nothing to write leaves the image untouched.
   */
  async store(bitmaps: readonly DirtyBitmap[]): Promise<void> {
    await this.host.locked(() => this.storeLocked(bitmaps));
  }

  private async storeLocked(bitmaps: readonly DirtyBitmap[]): Promise<void> {
    const fn = this.host.filename;
    const size = this.host.getLength();
    const slots = this.slots.map((s) => ({ ...s, entry: { ...s.entry } }));
    const drop: OldTable[] = [];
    const toWrite = new Set<Slot>();
    let dirSize = slots.reduce((n, s) => n + dirEntrySize(s.entry.nameBytes.length, 0), 0);
    // QEMU walks the node's bitmaps newest first; new entries are appended in that order.
    for (const b of [...bitmaps].reverse()) {
      if (!b.persistent || b.inconsistent || b.name === null) continue;
      const problem = bitmapConstraintProblem(b.name, b.granularity, size, this.cs);
      if (problem) throw invalidArgument(`${fn}: Bitmap '${b.name}' doesn't satisfy the constraints: ${problem}`);
      let slot = slots.find((s) => s.entry.name === b.name);
      if (!slot) {
        if (slots.length + 1 > C.QCOW2_MAX_BITMAPS) throw invalidArgument(`${fn}: Too many persistent bitmaps`);
        const nameBytes = Buffer.from(b.name);
        dirSize += dirEntrySize(nameBytes.length, 0);
        if (dirSize > C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE) throw invalidArgument(`${fn}: Bitmap directory is too large`);
        slot = {
          entry: { tableOffset: 0, tableSize: 0, flags: 0, type: C.BT_DIRTY_TRACKING_BITMAP, granularityBits: 0, nameBytes, name: b.name },
          bitmap: b,
        };
        slots.push(slot);
      } else {
        if (!(slot.entry.flags & C.BME_FLAG_IN_USE)) throw invalidArgument(`${fn}: Bitmap '${b.name}' already exists in the image`);
        drop.push({ offset: slot.entry.tableOffset, size: slot.entry.tableSize });
      }
      slot.entry.flags = b.enabled ? C.BME_FLAG_AUTO : 0;
      slot.entry.granularityBits = Math.log2(b.granularity);
      slot.bitmap = b;
      toWrite.add(slot);
    }
    if (toWrite.size === 0) return;
    if (this.host.readOnly) throw new VdiskError('EROFS', 'read-only', `${fn}: No write access`);
    // Version 2 has no autoclear bits: whatever we stored, any other writer would make stale.
    if (this.host.h.version < 3) throw unsupported(`${fn}: Cannot store dirty bitmaps in qcow2 v2 files`);
    const written: OldTable[] = [];
    try {
      for (const s of slots) {
        if (!toWrite.has(s)) continue;
        const t = await this.storeBitmap(s.bitmap!);
        written.push(t);
        s.entry.tableOffset = t.offset;
        s.entry.tableSize = t.size;
      }
      await this.switchDirectory(slots);
    } catch (err) {
      for (const t of written) await this.freeTable(t);
      throw err;
    }
    for (const t of drop) await this.freeTable(t);
  }

  /**
   * QEMU's qcow2_co_remove_persistent_dirty_bitmap: a new directory without `name` (or no
   * extension at all), then its table and data clusters freed. Absent is not an error.
   */
  async remove(name: string): Promise<void> {
    if (this.host.readOnly) throw new VdiskError('EROFS', 'read-only', `${this.host.filename}: image is opened read-only`);
    await this.host.locked(async () => {
      const idx = this.slots.findIndex((s) => s.entry.name === name);
      if (idx < 0) return;
      const gone = this.slots[idx].entry;
      await this.switchDirectory(this.slots.filter((_, i) => i !== idx).map((s) => ({ ...s })));
      await this.freeTable({ offset: gone.tableOffset, size: gone.tableSize });
    });
  }

  /**
   * A resize needs every stored bitmap in memory and usable (QEMU's
   * qcow2_truncate_bitmaps_check); throws otherwise.
   */
  checkResizable(): void {
    for (const s of this.slots) {
      if (!s.bitmap) throw unsupported(`${this.host.filename}: Cannot resize qcow2 with persistent bitmaps that were not loaded into memory`);
      if (s.bitmap.busy) throw new VdiskError('EBUSY', 'invalid-argument', `Bitmap '${s.entry.name}' is currently in use by another operation and cannot be used`);
      if (s.bitmap.inconsistent) throw invalidArgument(`Bitmap '${s.entry.name}' is inconsistent and cannot be used (remove it to resize the image)`);
    }
  }

  /** Data clusters, then the table (QEMU's store_bitmap_data + store_bitmap); nothing flushed yet. */
  private async storeBitmap(b: DirtyBitmap): Promise<OldTable> {
    const { file, refcounts } = this.host;
    const cs = this.cs;
    const tableSize = bitmapTableSize(b.size, b.granularity, cs);
    if (tableSize > C.BME_MAX_TABLE_SIZE || tableSize * cs > C.BME_MAX_PHYS_SIZE) {
      throw invalidArgument(`${this.host.filename}: Bitmap '${b.name}' is too big`);
    }
    const table = Buffer.alloc(tableSize * C.BME_TABLE_ENTRY_SIZE);
    const data = Buffer.alloc(cs);
    const allocated: number[] = [];
    try {
      for (let i = 0; i < tableSize; i++) {
        // Clusters of all-zero bits stay unallocated (entry 0), as QEMU stores them.
        if (b.isZeroSerialized(i * cs, cs)) continue;
        const off = await refcounts.alloc(1);
        allocated.push(off);
        b.serialize(i * cs, data);
        await file.pwrite(off, data);
        table.writeBigUInt64BE(BigInt(off), i * C.BME_TABLE_ENTRY_SIZE);
      }
      const tableOffset = await refcounts.alloc(Math.ceil(table.length / cs));
      allocated.push(-1 - tableOffset);
      await file.pwrite(tableOffset, table);
      return { offset: tableOffset, size: tableSize };
    } catch (err) {
      for (const a of allocated) {
        if (a >= 0) await refcounts.update(a / cs, 1, -1).catch(() => {});
        else await refcounts.update((-1 - a) / cs, Math.ceil(table.length / cs), -1).catch(() => {});
      }
      throw err;
    }
  }

  /**
   * QEMU's update_ext_header_and_dir: the new directory in new clusters, everything new
   * (and its refcounts) stable, then one header write points at it; the old directory is
   * freed last. An empty list drops the extension and its autoclear bit.
   */
  private async switchDirectory(slots: Slot[]): Promise<void> {
    const { h, file, refcounts } = this.host;
    const cs = this.cs;
    const old = h.bitmaps;
    const oldAutoclear = h.autoclearFeatures;
    let dirOffset = 0;
    let dir: Buffer = Buffer.alloc(0);
    if (slots.length > 0) {
      dir = serializeBitmapDirectory(slots.map((s) => s.entry));
      if (dir.length > C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE) throw invalidArgument(`${this.host.filename}: Bitmap directory is too large`);
      dirOffset = await refcounts.alloc(Math.ceil(dir.length / cs));
    }
    try {
      if (slots.length > 0) {
        await file.pwrite(dirOffset, dir);
        await this.host.flushCaches();
        h.bitmaps = { nbBitmaps: slots.length, bitmapDirectorySize: dir.length, bitmapDirectoryOffset: dirOffset };
        h.autoclearFeatures |= C.QCOW2_AUTOCLEAR_BITMAPS;
      } else {
        h.bitmaps = null;
        h.autoclearFeatures &= ~C.QCOW2_AUTOCLEAR_BITMAPS;
      }
      await this.host.writeHeader();
    } catch (err) {
      h.bitmaps = old;
      h.autoclearFeatures = oldAutoclear;
      if (dirOffset) await refcounts.update(dirOffset / cs, Math.ceil(dir.length / cs), -1).catch(() => {});
      throw err;
    }
    this.slots = slots;
    if (dirOffset) this.host.setMetadata(dirOffset, dir.length, true);
    if (old && old.bitmapDirectorySize > 0) {
      this.host.setMetadata(old.bitmapDirectoryOffset, old.bitmapDirectorySize, false);
      await refcounts.update(old.bitmapDirectoryOffset / cs, Math.ceil(old.bitmapDirectorySize / cs), -1);
    }
  }

  /**
   * Free a table's data clusters (queued for discard: nothing points at them any more) and the
   * table. A table with a broken entry frees nothing (QEMU's free_bitmap_clusters): its
   * clusters leak rather than risk freeing someone else's. Failures only leak.
   */
  private async freeTable(t: OldTable): Promise<void> {
    if (t.offset === 0 || t.size === 0) return;
    const { file, refcounts } = this.host;
    const cs = this.cs;
    const release = async (off: number, n: number, discard: boolean) => {
      try {
        // Punched with the driver's next flush, once the refcount change is on disk too.
        const freed = await refcounts.update(off / cs, n, -1);
        if (discard) refcounts.queueDiscards(freed);
      } catch {
        // a refcount already 0 or no refcount block: the image was inconsistent; leave it
      }
    };
    const e: BitmapDirEntry = { tableOffset: t.offset, tableSize: t.size, flags: 0, type: 1, granularityBits: 9, nameBytes: Buffer.alloc(0), name: '' };
    const table = await readBitmapTableRaw(file, e);
    if (table.some((entry) => tableEntryProblem(entry, cs) !== null)) return;
    for (const entry of table) {
      const off = Number(entry & C.BME_TABLE_ENTRY_OFFSET_MASK);
      if (off !== 0) await release(off, 1, true);
    }
    await release(t.offset, Math.ceil((t.size * C.BME_TABLE_ENTRY_SIZE) / cs), false);
  }
}
