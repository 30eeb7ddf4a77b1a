// Internal snapshot table (spec: "Snapshots"). Read for `info`, for refcount repair and so
// that writes copy-on-write clusters a snapshot shares. The table is bounded by QEMU's
// limits (65536 snapshots, 64 MiB table, 1024 bytes of extra data each).
import { corrupt } from '../../block/errors.js';
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
  icount: number | null;
  extraData: Buffer;
}

function u64(buf: Buffer, pos: number, filename: string, what: string): number {
  const v = buf.readBigUInt64BE(pos);
  if (v > BigInt(C.QCOW2_MAX_SAFE_OFFSET)) throw corrupt(`${filename}: snapshot ${what} ${v} is beyond 2^53`);
  return Number(v);
}

/** Read and validate the snapshot table. */
export async function readSnapshots(file: BlockNode, h: Qcow2Header, filename: string): Promise<Qcow2Snapshot[]> {
  const out: Qcow2Snapshot[] = [];
  if (h.nbSnapshots === 0) return out;
  const cs = 2 ** h.clusterBits;
  const fileLen = file.getLength();
  // Read in bounded chunks: the table's byte size is only known by walking it.
  let pos = h.snapshotsOffset;
  const tableEnd = h.snapshotsOffset + C.QCOW_MAX_SNAPSHOTS_SIZE;
  const readAt = async (off: number, len: number): Promise<Buffer> => {
    if (off + len > tableEnd) {
      throw corrupt(`${filename}: snapshot table is larger than ${C.QCOW_MAX_SNAPSHOTS_SIZE} bytes (QCOW_MAX_SNAPSHOTS_SIZE)`);
    }
    if (off + len > fileLen) throw corrupt(`${filename}: snapshot table entry at ${off} runs past the end of the file`);
    const b = Buffer.alloc(len);
    await file.pread(off, b);
    return b;
  };
  for (let i = 0; i < h.nbSnapshots; i++) {
    const hd = await readAt(pos, C.QCOW2_SNAPSHOT_HEADER_SIZE);
    const l1TableOffset = u64(hd, 0, filename, 'l1_table_offset');
    const l1Size = hd.readUInt32BE(8);
    const idSize = hd.readUInt16BE(12);
    const nameSize = hd.readUInt16BE(14);
    const extraSize = hd.readUInt32BE(36);
    if (extraSize > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA) {
      throw corrupt(`${filename}: snapshot ${i} extra_data_size ${extraSize} is larger than ${C.QCOW_MAX_SNAPSHOT_EXTRA_DATA}`);
    }
    if (l1Size > C.QCOW_MAX_L1_SIZE / C.L1E_SIZE) {
      throw corrupt(`${filename}: snapshot ${i} l1_size ${l1Size} makes its L1 table larger than ${C.QCOW_MAX_L1_SIZE} bytes`);
    }
    if (l1TableOffset % cs !== 0) throw corrupt(`${filename}: snapshot ${i} L1 table offset ${l1TableOffset} is not cluster aligned`);
    const rest = await readAt(pos + C.QCOW2_SNAPSHOT_HEADER_SIZE, extraSize + idSize + nameSize);
    const extraData = Buffer.from(rest.subarray(0, extraSize));
    if (h.version >= 3 && extraSize < C.QCOW2_SNAPSHOT_EXTRA_MIN_V3) {
      throw corrupt(`${filename}: snapshot ${i} extra_data_size ${extraSize} is smaller than ${C.QCOW2_SNAPSHOT_EXTRA_MIN_V3} (required in version 3)`);
    }
    let vmStateSize = hd.readUInt32BE(32);
    let diskSize: number | null = null;
    let icount: number | null = null;
    if (extraSize >= 8) vmStateSize = u64(extraData, 0, filename, 'vm_state_size_large');
    if (extraSize >= 16) diskSize = u64(extraData, 8, filename, 'disk_size');
    if (extraSize >= 24) {
      const ic = extraData.readBigInt64BE(16);
      icount = ic < 0n ? null : Number(ic);
    }
    out.push({
      l1TableOffset, l1Size,
      id: rest.toString('utf8', extraSize, extraSize + idSize),
      name: rest.toString('utf8', extraSize + idSize, extraSize + idSize + nameSize),
      dateSec: hd.readUInt32BE(16),
      dateNsec: hd.readUInt32BE(20),
      vmClockNsec: u64(hd, 24, filename, 'vm_clock_nsec'),
      vmStateSize, diskSize, icount, extraData,
    });
    const entryLen = C.QCOW2_SNAPSHOT_HEADER_SIZE + extraSize + idSize + nameSize;
    pos += (entryLen + 7) & ~7;
  }
  return out;
}

/** Byte size of the snapshot table as laid out on disk (for refcounting its clusters). */
export function snapshotTableSize(list: Qcow2Snapshot[]): number {
  let n = 0;
  for (const s of list) {
    n += (C.QCOW2_SNAPSHOT_HEADER_SIZE + s.extraData.length + Buffer.byteLength(s.id) + Buffer.byteLength(s.name) + 7) & ~7;
  }
  return n;
}

/** qemu-img info --output=json's snapshot object. */
export function snapshotInfo(s: Qcow2Snapshot): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  if (s.icount !== null) o.icount = s.icount;
  o['vm-clock-nsec'] = s.vmClockNsec % 1e9;
  o.name = s.name;
  o['date-sec'] = s.dateSec;
  o['date-nsec'] = s.dateNsec;
  o['vm-clock-sec'] = Math.floor(s.vmClockNsec / 1e9);
  o.id = s.id;
  o['vm-state-size'] = s.vmStateSize;
  return o;
}
