// The guest's side of a crash test: what each 512-byte guest sector may read back after a
// crash. Every sector the workload writes carries a self-describing pattern (the id of the
// guest request that wrote it and the sector number), so a read-back sector names its
// writer: a sector of another request, of another place, or garbage is caught, and no
// byte-by-byte copy of the guest disk has to be kept per flush point.
//
// Durability (QEMU's promise): once a guest flush has completed, every write acknowledged
// before it reads back. Without a visible write cache (writethrough, directsync) each write
// is acknowledged only once it is stable, so each completed write is such a point too.
// Writes acknowledged after the last such point may or may not survive, in any mixture of
// sectors; cache=unsafe promises nothing at all.

export const SECTOR = 512;
/** Tag of a sector that reads as zeros. Request ids start at 1. */
export const ZERO_TAG = 0;
/** No alternative value. */
const NONE = -1;
/** The sector's content is unknown (a failed write): any well-formed value is accepted. */
const ANY = -2;
const MAGIC = 0x4352_5348; // 'CRSH'

/** Fill `buf` (whole sectors) with the pattern of request `id` written at guest sector `firstSector`. */
export function fillPattern(buf: Buffer, id: number, firstSector: number): void {
  for (let s = 0; s * SECTOR < buf.length; s++) {
    const base = s * SECTOR;
    const lba = firstSector + s;
    buf.writeUInt32BE(MAGIC, base);
    buf.writeUInt32BE(id, base + 4);
    buf.writeUInt32BE(lba, base + 8);
    let x = (Math.imul(id, 0x9e3779b1) ^ Math.imul(lba, 0x85ebca6b)) >>> 0;
    for (let i = 12; i < SECTOR; i += 4) {
      x = (Math.imul(x ^ (x >>> 15), 0x2c1b3c6d) + 0x6d2b79f5) >>> 0;
      buf.writeUInt32BE(x, base + i);
    }
  }
}

const scratch = Buffer.alloc(SECTOR);
const zeroSector = Buffer.alloc(SECTOR);

/**
 * The tag a read-back sector carries: ZERO_TAG for zeros, the writer's id for a well-formed
 * pattern of sector `lba`, or -1 for anything else (garbage, or a pattern meant for another
 * sector: a mapping bug).
 */
export function decodeSector(sector: Buffer, lba: number): number {
  const magic = sector.readUInt32BE(0);
  if (magic === 0) return sector.equals(zeroSector) ? ZERO_TAG : -1;
  if (magic !== MAGIC) return -1;
  const id = sector.readUInt32BE(4);
  if (id === 0 || sector.readUInt32BE(8) !== lba) return -1;
  fillPattern(scratch, id, lba);
  return scratch.equals(sector) ? id : -1;
}

export type GuestOpKind = 'write' | 'zero' | 'discard' | 'flush';

/** One guest request as the workload issued it, with where it sits in the device log. */
export interface GuestOp {
  id: number;
  kind: GuestOpKind;
  /** Guest byte offset and length (multiples of SECTOR); 0/0 for flush. */
  offset: number;
  length: number;
  /** Write-zeroes flags as given (MAY_UNMAP). */
  flags: number;
  /** Device log length when the request was issued and when it completed (or failed). */
  logStart: number;
  logEnd: number;
  failed?: string;
}

/** Guest-visible content at a durability point. */
interface DurablePoint {
  /** Device log length when the point was reached: a crash at or after it keeps it. */
  logLen: number;
  /** Number of guest ops issued before the point. */
  opCount: number;
  value: Int32Array;
  alt: Int32Array;
}

export interface SectorMismatch {
  lba: number;
  found: number;
  allowed: number[];
}

export class GuestModel {
  readonly sectors: number;
  readonly ops: GuestOp[] = [];
  /** What the guest reads now: one value, or one of two (a discard may or may not zero). */
  private readonly value: Int32Array;
  private readonly alt: Int32Array;
  private readonly points: DurablePoint[] = [];

  constructor(readonly size: number) {
    this.sectors = Math.ceil(size / SECTOR);
    this.value = new Int32Array(this.sectors);
    this.alt = new Int32Array(this.sectors).fill(NONE);
    this.markDurable(0);
  }

  /** Record that a request was issued; returns it so the caller fills in completion. */
  issue(kind: GuestOpKind, offset: number, length: number, flags: number, logStart: number): GuestOp {
    const op: GuestOp = { id: this.ops.length + 1, kind, offset, length, flags, logStart, logEnd: logStart };
    this.ops.push(op);
    return op;
  }

  /** The request completed (successfully unless `error`); update what the guest reads. */
  complete(op: GuestOp, logEnd: number, error?: unknown): void {
    op.logEnd = logEnd;
    const first = op.offset / SECTOR;
    const last = (op.offset + op.length) / SECTOR;
    if (error !== undefined) {
      op.failed = error instanceof Error ? error.message : String(error);
      // A failed write may have changed any part of its range (QEMU: contents undefined).
      if (op.kind !== 'flush') for (let s = first; s < last; s++) this.alt[s] = ANY;
      return;
    }
    for (let s = first; s < last; s++) {
      switch (op.kind) {
        case 'write':
          this.value[s] = op.id;
          this.alt[s] = NONE;
          break;
        case 'zero':
          this.value[s] = ZERO_TAG;
          this.alt[s] = NONE;
          break;
        case 'discard':
          // Advisory: a format may drop the range (reads zeros) or keep it.
          if (this.alt[s] !== ANY && this.value[s] !== ZERO_TAG) this.alt[s] = ZERO_TAG;
          break;
        case 'flush':
          break;
      }
    }
  }

  /** Everything acknowledged so far is stable from device log length `logLen` on. */
  markDurable(logLen: number): void {
    this.points.push({ logLen, opCount: this.ops.length, value: this.value.slice(), alt: this.alt.slice() });
  }

  /** Index of the last durability point a crash at device log length `crashAt` keeps. */
  durablePointIndex(crashAt: number): number {
    let best = 0;
    for (let i = 0; i < this.points.length; i++) if (this.points[i].logLen <= crashAt) best = i;
    return best;
  }

  private pointAt(crashAt: number): DurablePoint {
    return this.points[this.durablePointIndex(crashAt)];
  }

  /**
   * Check a guest disk read back after a crash at device log length `crashAt`. Each sector
   * must hold its value at the last durability point, or the value of a request that was
   * issued after that point and before the crash.
   */
  verify(disk: Buffer, crashAt: number, maxReports = 8): SectorMismatch[] {
    const point = this.pointAt(crashAt);
    const later = this.ops.slice(point.opCount).filter((op) => op.kind !== 'flush' && op.logStart < crashAt);
    const mayZero = new Uint8Array(this.sectors);
    const writers = new Map<number, GuestOp>();
    const anyValue = new Uint8Array(this.sectors);
    for (const op of later) {
      const first = op.offset / SECTOR;
      const last = (op.offset + op.length) / SECTOR;
      if (op.kind === 'write') writers.set(op.id, op);
      if (op.kind !== 'write' || op.failed) mayZero.fill(1, first, last);
      if (op.failed) anyValue.fill(1, first, last);
    }
    const out: SectorMismatch[] = [];
    for (let s = 0; s < this.sectors; s++) {
      const found = decodeSector(disk.subarray(s * SECTOR, (s + 1) * SECTOR), s);
      const v = point.value[s];
      const a = point.alt[s];
      if (found === v || found === a) continue;
      if (found >= 0 && (a === ANY || anyValue[s])) continue;
      if (found === ZERO_TAG && mayZero[s]) continue;
      const w = found > 0 ? writers.get(found) : undefined;
      if (w && s >= w.offset / SECTOR && s < (w.offset + w.length) / SECTOR) continue;
      if (out.length < maxReports) {
        const allowed = new Set<number>([v]);
        if (a !== NONE) allowed.add(a);
        if (mayZero[s]) allowed.add(ZERO_TAG);
        for (const op of later) {
          if (op.kind === 'write' && s >= op.offset / SECTOR && s < (op.offset + op.length) / SECTOR) allowed.add(op.id);
        }
        out.push({ lba: s, found, allowed: [...allowed] });
      } else {
        break;
      }
    }
    return out;
  }
}
