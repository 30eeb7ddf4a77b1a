// Decoding L1 and L2 entries (spec: "Cluster mapping", "Compressed Clusters"). Entries are
// read as two 32-bit words (hi, lo) so the hot path never allocates a BigInt.
import { corrupt } from '../../block/errors.js';
import * as C from './constants.js';

export const KIND_UNALLOCATED = 0;
export const KIND_ZERO_PLAIN = 1;
export const KIND_ZERO_ALLOC = 2;
export const KIND_NORMAL = 3;
export const KIND_COMPRESSED = 4;
export type ClusterKind = 0 | 1 | 2 | 3 | 4;

/** One decoded L2 entry. For compressed clusters `host` is the byte offset of the data. */
export interface L2Info {
  kind: ClusterKind;
  host: number;
  copied: boolean;
  /** Compressed clusters: bytes to read at `host` (QEMU's csize, rounded to the sector). */
  csize: number;
}

export function entryHi(table: Buffer, i: number): number {
  return table.readUInt32BE(i * 8);
}
export function entryLo(table: Buffer, i: number): number {
  return table.readUInt32BE(i * 8 + 4);
}
export function setEntry(table: Buffer, i: number, hi: number, lo: number): void {
  table.writeUInt32BE(hi >>> 0, i * 8);
  table.writeUInt32BE(lo >>> 0, i * 8 + 4);
}

/** Host offset bits 9-55 of a standard entry (L1 or L2). Throws past 2^53. */
export function entryOffset(hi: number, lo: number): number {
  const h = hi & C.OFFSET_MASK_HI;
  if (h >= 0x200000) return -1;
  return h * 2 ** 32 + ((lo & C.OFFSET_MASK_LO) >>> 0);
}

/** hi/lo words of a standard entry pointing at `offset` with COPIED = copied. */
export function makeEntry(offset: number, copied: boolean, zero = false): [number, number] {
  const hi = Math.floor(offset / 2 ** 32) | (copied ? C.QCOW_OFLAG_COPIED_HI : 0);
  const lo = (offset % 2 ** 32) | (zero ? C.QCOW_OFLAG_ZERO_LO : 0);
  return [hi >>> 0, lo >>> 0];
}

export class EntryDecoder {
  readonly clusterSize: number;
  /** Bits of the compressed descriptor that hold the host offset: 62 - (cluster_bits - 8). */
  private readonly csizeShift: number;
  private readonly csizeMask: number;

  constructor(readonly clusterBits: number, private readonly filename: string) {
    this.clusterSize = 2 ** clusterBits;
    this.csizeShift = 62 - (clusterBits - 8);
    this.csizeMask = 2 ** (clusterBits - 8) - 1;
  }

  /** L2 table offset from an L1 entry (0 = none). */
  l1Offset(hi: number, lo: number, index: number): number {
    const off = entryOffset(hi, lo);
    if (off < 0) throw corrupt(`${this.filename}: L1 entry ${index} points beyond 2^53`);
    if (off % this.clusterSize !== 0) {
      throw corrupt(`${this.filename}: L2 table offset ${off} (L1 entry ${index}) is not cluster aligned`);
    }
    return off;
  }

  decode(hi: number, lo: number, guestOffset: number): L2Info {
    if (hi & C.QCOW_OFLAG_COMPRESSED_HI) {
      const shiftHi = this.csizeShift - 32;
      const offHi = hi & (2 ** shiftHi - 1);
      if (offHi >= 0x200000) throw corrupt(`${this.filename}: compressed cluster at guest offset ${guestOffset} points beyond 2^53`);
      const host = offHi * 2 ** 32 + (lo >>> 0);
      const nbSectors = (((hi & 0x3fffffff) >>> shiftHi) & this.csizeMask) + 1;
      const csize = nbSectors * C.QCOW2_COMPRESSED_SECTOR_SIZE - (host % C.QCOW2_COMPRESSED_SECTOR_SIZE);
      return { kind: KIND_COMPRESSED, host, copied: false, csize };
    }
    const host = entryOffset(hi, lo);
    if (host < 0) throw corrupt(`${this.filename}: L2 entry for guest offset ${guestOffset} points beyond 2^53`);
    const copied = (hi & C.QCOW_OFLAG_COPIED_HI) !== 0;
    if (host % this.clusterSize !== 0) {
      throw corrupt(`${this.filename}: cluster allocation offset ${host} (guest offset ${guestOffset}) is not cluster aligned`);
    }
    if (lo & C.QCOW_OFLAG_ZERO_LO) return { kind: host ? KIND_ZERO_ALLOC : KIND_ZERO_PLAIN, host, copied, csize: 0 };
    return { kind: host ? KIND_NORMAL : KIND_UNALLOCATED, host, copied, csize: 0 };
  }

  /** hi/lo words of a compressed descriptor for `len` bytes at host `offset`. */
  compressedEntry(offset: number, len: number): [number, number] {
    const nbAdditional = Math.floor((offset + len - 1) / 512) - Math.floor(offset / 512);
    const shiftHi = this.csizeShift - 32;
    const hi = C.QCOW_OFLAG_COMPRESSED_HI | (nbAdditional << shiftHi) | Math.floor(offset / 2 ** 32);
    return [hi >>> 0, (offset % 2 ** 32) >>> 0];
  }
}
