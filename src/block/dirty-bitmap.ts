// Dirty bitmaps (QEMU's BdrvDirtyBitmap): which granules of a node were written since the
// bitmap was added or last cleared. One bit per `granularity` bytes; bit i covers guest bytes
// [i * granularity, (i + 1) * granularity). The generic write path (BlockNode) marks every
// enabled bitmap of a node on every write, write-zeroes and discard, whatever front end sent
// it; this module knows nothing about qcow2 or NBD.
//
// Storage is paged: a page of PAGE_BYTES is allocated on the first bit set in it and dropped
// when its last bit is cleared, so memory follows the dirty area, not the disk size (a clean
// bitmap of a 10 TiB disk costs a few KiB). Bits are LSB-first within each byte, which is the
// qcow2 bitmap data layout (docs/interop/qcow2.txt, "Bitmaps"), so serialising a range is a
// plain copy.
import { invalidArgument } from './errors.js';

const PAGE_SHIFT = 15; // 32 KiB pages = 262,144 bits
const PAGE_BYTES = 1 << PAGE_SHIFT;
const PAGE_BITS = PAGE_BYTES * 8;

/** QEMU's limits (BDRV_BITMAP_MAX_NAME_SIZE; granularity 512 B to 2 GiB, a power of two). */
export const BITMAP_MAX_NAME_SIZE = 1023;
export const BITMAP_MIN_GRANULARITY = 512;
export const BITMAP_MAX_GRANULARITY = 2 ** 31;

export interface DirtyBitmapOptions {
  /** Null for an anonymous bitmap (block jobs keep those). */
  name: string | null;
  granularity: number;
  /** Bytes covered: the node's length. */
  size: number;
  /** Recording: an enabled bitmap is marked by writes; a disabled one only by merges. */
  enabled?: boolean;
  persistent?: boolean;
  /** Loaded from an image that was not closed cleanly: its content cannot be trusted. */
  inconsistent?: boolean;
}

/** The default granularity for a node with this cluster size: QEMU clamps it to 4 KiB..64 KiB. */
export function defaultGranularity(clusterSize: number | undefined): number {
  const c = clusterSize ?? 65536;
  return Math.min(65536, Math.max(4096, c));
}

export function checkGranularity(granularity: number): void {
  if (!Number.isSafeInteger(granularity) || granularity < BITMAP_MIN_GRANULARITY || granularity > BITMAP_MAX_GRANULARITY
    || (granularity & (granularity - 1)) !== 0) {
    throw invalidArgument('Granularity must be power of 2, and at least 512');
  }
}

export class DirtyBitmap {
  readonly name: string | null;
  readonly granularity: number;
  /** Bytes covered; changes with the node's length (resize). */
  size: number;
  enabled: boolean;
  persistent: boolean;
  inconsistent: boolean;
  /** Users that forbid changes through the monitor (an export, a job); QEMU's "busy". */
  busyCount = 0;

  private pages: Array<Uint8Array | undefined> = [];
  /** Set bits in each allocated page, so count() and page release need no scan. */
  private pageCounts: number[] = [];
  private setBits = 0;

  constructor(o: DirtyBitmapOptions) {
    checkGranularity(o.granularity);
    // An empty name is refused by the front ends (QMP block-dirty-bitmap-add, vdisk bitmap),
    // not here: an image may hold a bitmap named "" and QEMU loads it.
    if (o.name !== null && Buffer.byteLength(o.name) > BITMAP_MAX_NAME_SIZE) throw invalidArgument('Bitmap name is too long');
    this.name = o.name;
    this.granularity = o.granularity;
    this.size = o.size;
    this.enabled = o.enabled ?? true;
    this.persistent = o.persistent ?? false;
    this.inconsistent = o.inconsistent ?? false;
  }

  get busy(): boolean {
    return this.busyCount > 0;
  }

  /** Number of bits: one per granule, the last one possibly partial. */
  get bitCount(): number {
    return Math.ceil(this.size / this.granularity);
  }

  /** Dirty bytes as QEMU reports them (`count`): dirty bits times the granularity. */
  count(): number {
    return this.setBits * this.granularity;
  }

  isEmpty(): boolean {
    return this.setBits === 0;
  }

  // ---- byte-range view (what the block layer uses) ---------------------------------------

  /** Mark [offset, offset + length) dirty: every granule it touches. */
  set(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.granularity);
    const end = Math.min(this.bitCount, Math.ceil((offset + length) / this.granularity));
    this.setBitRange(first, end);
  }

  /** Clear the granules wholly inside [offset, offset + length) (the last granule counts as whole at the end of the disk). */
  reset(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.ceil(offset / this.granularity);
    const endByte = offset + length;
    const end = endByte >= this.size ? this.bitCount : Math.floor(endByte / this.granularity);
    if (end > first) this.clearBitRange(first, end);
  }

  /** True when the granule holding `offset` is dirty. */
  get(offset: number): boolean {
    return this.getBit(Math.floor(offset / this.granularity));
  }

  clear(): void {
    this.pages = [];
    this.pageCounts = [];
    this.setBits = 0;
  }

  /**
   * Dirty byte ranges within [offset, end), merged, clamped to the disk size. Ranges start and
   * end on granule boundaries (or at offset/end when those cut a granule).
   */
  *dirtyRanges(offset = 0, end = this.size): Generator<{ offset: number; length: number }> {
    end = Math.min(end, this.size);
    let bit = Math.floor(offset / this.granularity);
    const endBit = Math.ceil(end / this.granularity);
    while (bit < endBit) {
      const d = this.nextSetBit(bit, endBit);
      if (d < 0) return;
      const c = this.nextClearBit(d, endBit);
      const stop = c < 0 ? endBit : c;
      const start = Math.max(offset, d * this.granularity);
      const stopByte = Math.min(end, stop * this.granularity);
      if (stopByte > start) yield { offset: start, length: stopByte - start };
      bit = stop;
    }
  }

  /** Byte offset of the first dirty granule at or after `offset` (and before `end`), or -1. */
  nextDirty(offset: number, end = this.size): number {
    const b = this.nextSetBit(Math.floor(offset / this.granularity), Math.ceil(Math.min(end, this.size) / this.granularity));
    return b < 0 ? -1 : Math.max(offset, b * this.granularity);
  }

  /** Byte offset of the first clean granule at or after `offset` (and before `end`), or -1. */
  nextClean(offset: number, end = this.size): number {
    const b = this.nextClearBit(Math.floor(offset / this.granularity), Math.ceil(Math.min(end, this.size) / this.granularity));
    return b < 0 ? -1 : Math.max(offset, b * this.granularity);
  }

  /** OR another bitmap into this one (QEMU's block-dirty-bitmap-merge). Granularities may differ. */
  merge(other: DirtyBitmap): void {
    if (other.granularity === this.granularity) {
      for (let p = 0; p < other.pages.length; p++) {
        const src = other.pages[p];
        if (!src) continue;
        for (let i = 0; i < PAGE_BYTES; i++) {
          const byte = src[i];
          if (byte === 0) continue;
          const bit = p * PAGE_BITS + i * 8;
          if (bit >= this.bitCount) break;
          this.orByte(bit, byte);
        }
      }
      return;
    }
    for (const r of other.dirtyRanges()) this.set(r.offset, r.length);
  }

  /** A copy with the same bits and flags (for successors and snapshots of a bitmap). */
  copy(name: string | null = this.name): DirtyBitmap {
    const b = new DirtyBitmap({
      name, granularity: this.granularity, size: this.size, enabled: this.enabled,
      persistent: this.persistent, inconsistent: this.inconsistent,
    });
    b.pages = this.pages.map((p) => (p ? new Uint8Array(p) : undefined));
    b.pageCounts = [...this.pageCounts];
    b.setBits = this.setBits;
    return b;
  }

  /** Follow the node's new length: bits past the end are dropped, new ones are clean. */
  resize(size: number): void {
    const oldBits = this.bitCount;
    this.size = size;
    const newBits = this.bitCount;
    if (newBits < oldBits) this.clearBitRange(newBits, oldBits);
  }

  // ---- serialised form (qcow2 bitmap data: LSB-first bits) -------------------------------

  /** Bytes of serialised data: ceil(bitCount / 8). */
  get serializedSize(): number {
    return Math.ceil(this.bitCount / 8);
  }

  /** Copy serialised bytes [byteOffset, byteOffset + dest.length) into dest (zeros where clean). */
  serialize(byteOffset: number, dest: Uint8Array): void {
    dest.fill(0);
    let done = 0;
    while (done < dest.length) {
      const pos = byteOffset + done;
      const p = Math.floor(pos / PAGE_BYTES);
      const inPage = pos % PAGE_BYTES;
      const n = Math.min(PAGE_BYTES - inPage, dest.length - done);
      const page = this.pages[p];
      if (page) dest.set(page.subarray(inPage, inPage + n), done);
      done += n;
    }
    // Bits past bitCount in the last byte are not part of the bitmap.
    this.maskTail(byteOffset, dest);
  }

  /** True when serialised bytes [byteOffset, byteOffset + length) are all zero. */
  isZeroSerialized(byteOffset: number, length: number): boolean {
    const endBit = Math.min(this.bitCount, (byteOffset + length) * 8);
    return this.nextSetBit(byteOffset * 8, endBit) < 0;
  }

  /** OR serialised bytes into the bitmap at byteOffset (loading a stored bitmap). */
  deserialize(byteOffset: number, src: Uint8Array): void {
    for (let i = 0; i < src.length; i++) {
      const byte = src[i];
      if (byte === 0) continue;
      const bit = (byteOffset + i) * 8;
      if (bit >= this.bitCount) break;
      this.orByte(bit, byte);
    }
  }

  /** Set every bit of serialised bytes [byteOffset, byteOffset + length) (a stored all-ones cluster). */
  deserializeOnes(byteOffset: number, length: number): void {
    this.setBitRange(byteOffset * 8, Math.min(this.bitCount, (byteOffset + length) * 8));
  }

  // ---- bits ----------------------------------------------------------------------------

  private getBit(bit: number): boolean {
    const page = this.pages[Math.floor(bit / PAGE_BITS)];
    if (!page) return false;
    const inPage = bit % PAGE_BITS;
    return (page[inPage >> 3] & (1 << (inPage & 7))) !== 0;
  }

  private page(p: number): Uint8Array {
    let page = this.pages[p];
    if (!page) {
      page = new Uint8Array(PAGE_BYTES);
      this.pages[p] = page;
      this.pageCounts[p] = 0;
    }
    return page;
  }

  /** OR one byte of bits starting at `bit` (a multiple of 8). */
  private orByte(bit: number, byte: number): void {
    const limit = this.bitCount - bit;
    if (limit < 8) byte &= (1 << limit) - 1;
    if (byte === 0) return;
    const p = Math.floor(bit / PAGE_BITS);
    const page = this.page(p);
    const i = (bit % PAGE_BITS) >> 3;
    const added = popcount8(byte & ~page[i]);
    page[i] |= byte;
    this.pageCounts[p] += added;
    this.setBits += added;
  }

  private setBitRange(first: number, end: number): void {
    let bit = first;
    while (bit < end) {
      const p = Math.floor(bit / PAGE_BITS);
      const pageEnd = Math.min(end, (p + 1) * PAGE_BITS);
      if (this.pageCounts[p] === PAGE_BITS) {
        bit = pageEnd;
        continue;
      }
      const page = this.page(p);
      let added = 0;
      let b = bit - p * PAGE_BITS;
      const e = pageEnd - p * PAGE_BITS;
      while (b < e && (b & 7) !== 0) {
        const m = 1 << (b & 7);
        if (!(page[b >> 3] & m)) {
          page[b >> 3] |= m;
          added++;
        }
        b++;
      }
      while (b + 8 <= e) {
        const i = b >> 3;
        if (page[i] !== 0xff) {
          added += 8 - popcount8(page[i]);
          page[i] = 0xff;
        }
        b += 8;
      }
      while (b < e) {
        const m = 1 << (b & 7);
        if (!(page[b >> 3] & m)) {
          page[b >> 3] |= m;
          added++;
        }
        b++;
      }
      this.pageCounts[p] += added;
      this.setBits += added;
      bit = pageEnd;
    }
  }

  private clearBitRange(first: number, end: number): void {
    let bit = first;
    while (bit < end) {
      const p = Math.floor(bit / PAGE_BITS);
      const pageStart = p * PAGE_BITS;
      const pageEnd = Math.min(end, pageStart + PAGE_BITS);
      const page = this.pages[p];
      if (page) {
        if (bit === pageStart && pageEnd === pageStart + PAGE_BITS) {
          this.setBits -= this.pageCounts[p];
          this.pages[p] = undefined;
          this.pageCounts[p] = 0;
        } else {
          let removed = 0;
          for (let b = bit - pageStart; b < pageEnd - pageStart;) {
            const i = b >> 3;
            if ((b & 7) === 0 && b + 8 <= pageEnd - pageStart) {
              removed += popcount8(page[i]);
              page[i] = 0;
              b += 8;
            } else {
              const m = 1 << (b & 7);
              if (page[i] & m) {
                page[i] &= ~m;
                removed++;
              }
              b++;
            }
          }
          this.pageCounts[p] -= removed;
          this.setBits -= removed;
          if (this.pageCounts[p] === 0) this.pages[p] = undefined;
        }
      }
      bit = pageEnd;
    }
  }

  /** First set bit in [bit, end), or -1. */
  private nextSetBit(bit: number, end: number): number {
    while (bit < end) {
      const p = Math.floor(bit / PAGE_BITS);
      const pageStart = p * PAGE_BITS;
      const stop = Math.min(end, pageStart + PAGE_BITS);
      const page = this.pages[p];
      if (page) {
        let b = bit - pageStart;
        const e = stop - pageStart;
        while (b < e) {
          const byte = page[b >> 3];
          if (byte === 0) {
            b = (b | 7) + 1;
            continue;
          }
          if (byte & (1 << (b & 7))) return pageStart + b;
          b++;
        }
      }
      bit = stop;
    }
    return -1;
  }

  /** First clear bit in [bit, end), or -1. */
  private nextClearBit(bit: number, end: number): number {
    while (bit < end) {
      const p = Math.floor(bit / PAGE_BITS);
      const pageStart = p * PAGE_BITS;
      const stop = Math.min(end, pageStart + PAGE_BITS);
      const page = this.pages[p];
      if (!page) return bit;
      let b = bit - pageStart;
      const e = stop - pageStart;
      while (b < e) {
        const byte = page[b >> 3];
        if (byte === 0xff) {
          b = (b | 7) + 1;
          continue;
        }
        if (!(byte & (1 << (b & 7)))) return pageStart + b;
        b++;
      }
      bit = stop;
    }
    return -1;
  }

  private maskTail(byteOffset: number, dest: Uint8Array): void {
    const bits = this.bitCount;
    const lastByte = Math.floor(bits / 8);
    if (bits % 8 !== 0 && lastByte >= byteOffset && lastByte < byteOffset + dest.length) {
      dest[lastByte - byteOffset] &= (1 << (bits % 8)) - 1;
    }
    for (let i = Math.max(lastByte + (bits % 8 ? 1 : 0), byteOffset); i < byteOffset + dest.length; i++) dest[i - byteOffset] = 0;
  }
}

function popcount8(b: number): number {
  b = b - ((b >> 1) & 0x55);
  b = (b & 0x33) + ((b >> 2) & 0x33);
  return (b + (b >> 4)) & 0x0f;
}
