// Internal snapshot table (spec: "Snapshots"). Read for `info` and `snapshot -l`, for
// refcount repair, so that writes copy-on-write clusters a snapshot shares, and by `vdisk
// check`. The table is bounded by QEMU's limits (65536 snapshots, 64 MiB table, 1024 bytes
// of extra data each).
import { VdiskError, corrupt } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import * as C from './constants.js';
import type { Qcow2Header } from './header.js';

export interface Qcow2Snapshot {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  /** From extra data (version 3 always has it; version 2 may not). */
  diskSize: number | null;
  /** Signed on disk; QEMU takes a negative count (-1) to mean none. Null without the field. */
  icount: number | null;
  extraData: Buffer;
  /** Bytes the entry takes in the table, padding included, from the on-disk id and name sizes. */
  tableEntrySize: number;
}

export interface ReadSnapshotsOptions {
  /**
   * Read as QEMU's qcow2_check_read_snapshot_table does, for `vdisk check`: an incomplete
   * entry is reported here and kept; only an oversized table or extra data stops the read
   * (with QEMU's messages); the parts of the table past EOF read as zeros; L1 placement is
   * left to the caller and values past 2^53 stay approximate. Without it, every problem throws.
   */
  onProblem?: (msg: string) => void;
}

/**
 * Read the snapshot table. By default it is validated as the driver needs it (every problem
 * throws `corrupt`); with `onProblem` it is read leniently for the checker.
 */
export async function readSnapshots(file: BlockNode, h: Qcow2Header, filename: string, opts: ReadSnapshotsOptions = {}): Promise<Qcow2Snapshot[]> {
  const { onProblem } = opts;
  const out: Qcow2Snapshot[] = [];
  if (h.nbSnapshots === 0) return out;
  const cs = 2 ** h.clusterBits;
  const fileLen = file.getLength();
  const tableEnd = h.snapshotsOffset + C.QCOW_MAX_SNAPSHOTS_SIZE;
  // Read in bounded chunks: the table's byte size is only known by walking it.
  const readAt = async (off: number, len: number): Promise<Buffer> => {
    const b = Buffer.alloc(len);
    if (onProblem) {
      // Like QEMU's block layer, the part past EOF reads as zeros.
      const n = Math.min(len, fileLen - off);
      if (n > 0) await file.pread(off, b.subarray(0, n));
      return b;
    }
    if (off + len > tableEnd) {
      throw corrupt(`${filename}: snapshot table is larger than ${C.QCOW_MAX_SNAPSHOTS_SIZE} bytes (QCOW_MAX_SNAPSHOTS_SIZE)`);
    }
    if (off + len > fileLen) throw corrupt(`${filename}: snapshot table entry at ${off} runs past the end of the file`);
    await file.pread(off, b);
    return b;
  };
  // The checker takes offsets and sizes as they are (its own checks name the snapshot).
  const u64 = (buf: Buffer, pos: number, what: string): number => {
    const v = buf.readBigUInt64BE(pos);
    if (!onProblem && v > BigInt(C.QCOW2_MAX_SAFE_OFFSET)) throw corrupt(`${filename}: snapshot ${what} ${v} is beyond 2^53`);
    return Number(v);
  };
  let pos = h.snapshotsOffset;
  for (let i = 0; i < h.nbSnapshots; i++) {
    if (onProblem && pos - h.snapshotsOffset > C.QCOW_MAX_SNAPSHOTS_SIZE) throw corrupt('Snapshot table is too big');
    const hd = await readAt(pos, C.QCOW2_SNAPSHOT_HEADER_SIZE);
    const l1TableOffset = u64(hd, 0, 'l1_table_offset');
    const l1Size = hd.readUInt32BE(8);
    const idSize = hd.readUInt16BE(12);
    const nameSize = hd.readUInt16BE(14);
    const extraSize = hd.readUInt32BE(36);
    if (extraSize > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA) {
      // QEMU's check fails with -EFBIG here.
      if (onProblem) throw new VdiskError('EFBIG', 'corrupt-image', `Too much extra metadata in snapshot table entry ${i}`);
      throw corrupt(`${filename}: snapshot ${i} extra_data_size ${extraSize} is larger than ${C.QCOW_MAX_SNAPSHOT_EXTRA_DATA}`);
    }
    if (!onProblem) {
      if (l1Size > C.QCOW_MAX_L1_SIZE / C.L1E_SIZE) {
        throw corrupt(`${filename}: snapshot ${i} l1_size ${l1Size} makes its L1 table larger than ${C.QCOW_MAX_L1_SIZE} bytes`);
      }
      if (l1TableOffset % cs !== 0) throw corrupt(`${filename}: snapshot ${i} L1 table offset ${l1TableOffset} is not cluster aligned`);
    }
    const rest = await readAt(pos + C.QCOW2_SNAPSHOT_HEADER_SIZE, extraSize + idSize + nameSize);
    const extraData = Buffer.from(rest.subarray(0, extraSize));
    if (h.version >= 3 && extraSize < C.QCOW2_SNAPSHOT_EXTRA_MIN_V3) {
      if (onProblem) onProblem(`ERROR Snapshot table entry ${i} is incomplete`);
      else throw corrupt(`${filename}: snapshot ${i} extra_data_size ${extraSize} is smaller than ${C.QCOW2_SNAPSHOT_EXTRA_MIN_V3} (required in version 3)`);
    }
    const vmStateSize = extraSize >= 8 ? u64(extraData, 0, 'vm_state_size_large') : hd.readUInt32BE(32);
    const diskSize = extraSize >= 16 ? u64(extraData, 8, 'disk_size') : null;
    const icount = extraSize >= 24 ? Number(extraData.readBigInt64BE(16)) : null;
    const tableEntrySize = (C.QCOW2_SNAPSHOT_HEADER_SIZE + extraSize + idSize + nameSize + 7) & ~7;
    out.push({
      l1TableOffset, l1Size,
      id: rest.toString('utf8', extraSize, extraSize + idSize),
      name: rest.toString('utf8', extraSize + idSize, extraSize + idSize + nameSize),
      dateSec: hd.readUInt32BE(16),
      dateNsec: hd.readUInt32BE(20),
      vmClockNsec: u64(hd, 24, 'vm_clock_nsec'),
      vmStateSize, diskSize, icount, extraData, tableEntrySize,
    });
    pos += tableEntrySize;
  }
  return out;
}

/** Byte size of the snapshot table as laid out on disk (for refcounting its clusters). */
export function snapshotTableSize(list: Qcow2Snapshot[]): number {
  // The sizes as read from disk: re-encoding a decoded id or name that was not valid UTF-8
  // would give other byte counts, and refcount repair would count the wrong range.
  return list.reduce((n, s) => n + s.tableEntrySize, 0);
}

/** qemu-img info --output=json's snapshot object. */
export function snapshotInfo(s: Qcow2Snapshot): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  if (s.icount !== null && s.icount >= 0) o.icount = s.icount;
  o['vm-clock-nsec'] = s.vmClockNsec % 1e9;
  o.name = s.name;
  o['date-sec'] = s.dateSec;
  o['date-nsec'] = s.dateNsec;
  o['vm-clock-sec'] = Math.floor(s.vmClockNsec / 1e9);
  o.id = s.id;
  o['vm-state-size'] = s.vmStateSize;
  return o;
}

/**
 * One table entry as QEMU's qcow2_write_snapshots lays it out (spec: "Snapshots"): the fixed
 * header, extra data (vm_state_size_large, disk_size, icount, then whatever unknown extra
 * data the entry already had, preserved), the id and name without terminators, padding to 8.
 * `currentSize` stands in for a disk size the entry never recorded (a version 2 entry).
 */
export function encodeSnapshot(s: Qcow2Snapshot, currentSize: number): Buffer {
  const id = Buffer.from(s.id, 'utf8');
  const name = Buffer.from(s.name, 'utf8');
  const unknownExtra = s.extraData.length > C.QCOW2_SNAPSHOT_EXTRA_WITH_ICOUNT ? s.extraData.subarray(C.QCOW2_SNAPSHOT_EXTRA_WITH_ICOUNT) : Buffer.alloc(0);
  const extraSize = C.QCOW2_SNAPSHOT_EXTRA_WITH_ICOUNT + unknownExtra.length;
  const size = (C.QCOW2_SNAPSHOT_HEADER_SIZE + extraSize + id.length + name.length + 7) & ~7;
  const b = Buffer.alloc(size);
  b.writeBigUInt64BE(BigInt(s.l1TableOffset), 0);
  b.writeUInt32BE(s.l1Size, 8);
  b.writeUInt16BE(id.length, 12);
  b.writeUInt16BE(name.length, 14);
  b.writeUInt32BE(s.dateSec >>> 0, 16);
  b.writeUInt32BE(s.dateNsec >>> 0, 20);
  b.writeBigUInt64BE(BigInt(s.vmClockNsec), 24);
  // The 32-bit field keeps the low bits; the large one holds the whole size.
  b.writeUInt32BE(s.vmStateSize % 2 ** 32, 32);
  b.writeUInt32BE(extraSize, 36);
  const x = C.QCOW2_SNAPSHOT_HEADER_SIZE;
  b.writeBigUInt64BE(BigInt(s.vmStateSize), x);
  b.writeBigUInt64BE(BigInt(s.diskSize ?? currentSize), x + 8);
  b.writeBigInt64BE(BigInt(s.icount ?? -1), x + 16);
  unknownExtra.copy(b, x + C.QCOW2_SNAPSHOT_EXTRA_WITH_ICOUNT);
  id.copy(b, x + extraSize);
  name.copy(b, x + extraSize + id.length);
  return b;
}

/** The whole table, entries back to back; each entry's tableEntrySize is updated to match. */
export function encodeSnapshotTable(list: Qcow2Snapshot[], currentSize: number): Buffer {
  const parts = list.map((s) => {
    const b = encodeSnapshot(s, currentSize);
    s.tableEntrySize = b.length;
    s.extraData = b.subarray(C.QCOW2_SNAPSHOT_HEADER_SIZE, C.QCOW2_SNAPSHOT_HEADER_SIZE + b.readUInt32BE(36));
    if (s.diskSize === null) s.diskSize = currentSize;
    if (s.icount === null) s.icount = -1;
    return b;
  });
  return Buffer.concat(parts);
}
