// Crash states from a recorded device log. A power cut after the first `crashAt` log
// entries leaves:
//   - the synced prefix: every entry a completed flush covers, persisted in order;
//   - any subset of the entries issued since (written, zeroed, discarded, resized), each
//     persisted whole, not at all, or torn at 512-byte sector granularity, in any order.
// Up to `exhaustiveLimit` pending entries every subset is enumerated (in log order, whole);
// beyond that, and in addition, states are sampled with tearing and random order. A state
// is named by a StateKey, so a failure can be rebuilt exactly from (run params, key).
import { createHash } from 'node:crypto';
import type { LogEntry } from '../filters/fault-injection.js';
import { prng } from './workload.js';

export const DEVICE_SECTOR = 512;

export interface StateKey {
  /** Number of log entries issued before the power cut. */
  crashAt: number;
  /** Exhaustive states: which pending entries persisted, one '0'/'1' per pending entry. */
  subset?: string;
  /** Sampled states: the seed that chose subset, tears and order. */
  sample?: number;
}

export interface Persist {
  /** Log index of the entry. */
  index: number;
  /** Torn: only these device sectors of it persisted (absolute sector numbers). */
  sectors?: number[];
}

export interface CrashStateSpec {
  key: StateKey;
  /** Entries [0, synced) persisted in order. */
  synced: number;
  /** Then these, in this order. */
  persist: Persist[];
}

export interface StateOptions {
  /** Enumerate every subset up to this many pending entries (default 12). */
  exhaustiveLimit?: number;
  /** Sampled states per crash point, on top of any exhaustive ones (default 4). */
  samplesPerPoint?: number;
  /**
   * Deliberately wrong model for negative tests: treat flushes as if they were never
   * issued, so the disk may lose what a flush made stable. A correct checker must fail.
   */
  ignoreFlushes?: boolean;
}

/** How far the synced prefix reaches for a crash after `crashAt` entries. */
export function syncedPrefix(log: readonly LogEntry[], crashAt: number, ignoreFlushes = false): number {
  if (ignoreFlushes) return 0;
  let synced = 0;
  for (let i = 0; i < crashAt; i++) {
    const e = log[i];
    if (e.kind === 'flush' && e.covers > synced) synced = e.covers;
  }
  return synced;
}

/** Entries that may or may not have persisted at a crash after `crashAt` entries. */
export function pendingEntries(log: readonly LogEntry[], crashAt: number, ignoreFlushes = false): number[] {
  const out: number[] = [];
  for (let i = syncedPrefix(log, crashAt, ignoreFlushes); i < crashAt; i++) {
    if (log[i].kind !== 'flush') out.push(i);
  }
  return out;
}

function sectorsOf(e: LogEntry): number[] {
  if (e.kind === 'flush' || e.kind === 'truncate') return [];
  const len = e.kind === 'write' ? e.data.length : e.length;
  if (len === 0) return [];
  const out: number[] = [];
  for (let s = Math.floor(e.offset / DEVICE_SECTOR); s * DEVICE_SECTOR < e.offset + len; s++) out.push(s);
  return out;
}

/** Rebuild the spec a key names. */
export function buildState(log: readonly LogEntry[], key: StateKey, ignoreFlushes = false): CrashStateSpec {
  const synced = syncedPrefix(log, key.crashAt, ignoreFlushes);
  const pending = pendingEntries(log, key.crashAt, ignoreFlushes);
  if (key.subset !== undefined) {
    if (key.subset.length !== pending.length) throw new Error(`state key subset has ${key.subset.length} bits, ${pending.length} entries pending`);
    return { key, synced, persist: pending.filter((_, i) => key.subset![i] === '1').map((index) => ({ index })) };
  }
  const rnd = prng(key.sample ?? 0);
  const persist: Persist[] = [];
  const keepAll = rnd() < 0.15; // bias towards "everything but a few tears" as well as sparse subsets
  for (const index of pending) {
    if (!keepAll && rnd() < 0.5) continue;
    const secs = sectorsOf(log[index]);
    if (secs.length > 1 && rnd() < 0.3) {
      // Torn: a random selection of its sectors (a prefix half the time, as disks often do).
      let part: number[];
      if (rnd() < 0.5) part = secs.slice(0, 1 + Math.floor(rnd() * (secs.length - 1)));
      else part = secs.filter(() => rnd() < 0.5);
      persist.push({ index, sectors: part });
    } else {
      persist.push({ index });
    }
  }
  if (rnd() < 0.5) {
    for (let i = persist.length - 1; i > 0; i--) {
      const j = Math.floor(rnd() * (i + 1));
      [persist[i], persist[j]] = [persist[j], persist[i]];
    }
  }
  return { key, synced, persist };
}

/**
 * Choose up to `budget` states of a run, spread over crash points at random (the end of
 * the run always included), returned in crash-point order so the synced prefix can be
 * advanced incrementally.
 */
export function chooseStates(log: readonly LogEntry[], endLog: number, budget: number, seed: number, opts: StateOptions = {}): StateKey[] {
  const limit = opts.exhaustiveLimit ?? 12;
  const samples = opts.samplesPerPoint ?? 4;
  const rnd = prng(seed ^ 0x5eed);
  const points = Array.from({ length: endLog + 1 }, (_, i) => i);
  for (let i = points.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [points[i], points[j]] = [points[j], points[i]];
  }
  points.unshift(endLog);
  const seen = new Set<number>();
  const keys: StateKey[] = [];
  let left = budget;
  for (const crashAt of points) {
    if (left <= 0) break;
    if (seen.has(crashAt)) continue;
    seen.add(crashAt);
    const k = pendingEntries(log, crashAt, opts.ignoreFlushes).length;
    if (k <= limit && 2 ** k <= left) {
      for (let m = 0; m < 2 ** k; m++) {
        keys.push({ crashAt, subset: k === 0 ? '' : m.toString(2).padStart(k, '0').split('').reverse().join('') });
      }
      left -= 2 ** k;
    }
    if (k === 0) continue;
    const n = Math.min(left, samples);
    for (let i = 0; i < n; i++) keys.push({ crashAt, sample: Math.floor(rnd() * 2 ** 31) });
    left -= n;
  }
  keys.sort((a, b) => a.crashAt - b.crashAt);
  return keys;
}

/** Apply one log entry (whole, or only some of its sectors) to an image buffer; returns it (it may grow). */
export function applyEntry(img: Buffer, e: LogEntry, sectors?: number[]): Buffer {
  if (e.kind === 'flush') return img;
  if (e.kind === 'truncate') {
    if (e.length === img.length) return img;
    const next = Buffer.alloc(e.length);
    img.copy(next, 0, 0, Math.min(img.length, e.length));
    return next;
  }
  const len = e.kind === 'write' ? e.data.length : e.length;
  const ranges: Array<[number, number]> = sectors
    ? sectors.map((s) => [Math.max(e.offset, s * DEVICE_SECTOR), Math.min(e.offset + len, (s + 1) * DEVICE_SECTOR)])
    : [[e.offset, e.offset + len]];
  for (const [start, end] of ranges) {
    if (end <= start) continue;
    if (end > img.length) {
      // A write past the end of a file extends it (the file system persists the new size with it).
      const next = Buffer.alloc(end);
      img.copy(next);
      img = next;
    }
    if (e.kind === 'write') e.data.copy(img, start, start - e.offset, end - e.offset);
    else img.fill(0, start, end);
  }
  return img;
}

/** Keeps the synced image of the current crash point, advancing as crash points increase. */
export class SyncedImage {
  private img: Buffer<ArrayBufferLike>;
  private upTo = 0;

  constructor(base: Buffer, private readonly log: readonly LogEntry[]) {
    this.img = Buffer.from(base);
  }

  /** The image with entries [0, synced) applied; `synced` must not decrease. Do not modify it. */
  at(synced: number): Buffer {
    if (synced < this.upTo) throw new Error(`synced prefix went backwards (${synced} < ${this.upTo})`);
    for (; this.upTo < synced; this.upTo++) this.img = applyEntry(this.img, this.log[this.upTo]);
    return this.img;
  }
}

/**
 * A digest that is equal for two states of the same synced prefix exactly when their
 * images are equal: only sectors the persisted entries touched can differ from the synced
 * image, so those that do (number and content) are hashed. Cheap for large images.
 */
export function stateDigest(img: Buffer, syncedImg: Buffer, log: readonly LogEntry[], spec: CrashStateSpec): string {
  const touched = new Set<number>();
  for (const p of spec.persist) {
    const e = log[p.index];
    if (e.kind === 'flush' || e.kind === 'truncate') continue;
    if (p.sectors) for (const s of p.sectors) touched.add(s);
    else for (const s of sectorsOf(e)) touched.add(s);
  }
  const h = createHash('sha1');
  const zero = Buffer.alloc(DEVICE_SECTOR);
  for (const s of [...touched].sort((a, b) => a - b)) {
    const start = s * DEVICE_SECTOR;
    if (start >= img.length) continue;
    const mine = img.subarray(start, Math.min(img.length, start + DEVICE_SECTOR));
    const before = start < syncedImg.length ? syncedImg.subarray(start, Math.min(syncedImg.length, start + DEVICE_SECTOR)) : zero.subarray(0, 0);
    if (mine.equals(before)) continue;
    if (before.length < mine.length && mine.equals(Buffer.concat([before, zero.subarray(0, mine.length - before.length)]))) continue;
    h.update(`${s};`).update(mine);
  }
  return `${spec.synced}:${img.length}:${h.digest('hex')}`;
}

/** The bytes of one crash state (a fresh buffer). */
export function materialise(synced: SyncedImage, log: readonly LogEntry[], spec: CrashStateSpec): Buffer {
  let img: Buffer = Buffer.from(synced.at(spec.synced));
  for (const p of spec.persist) img = applyEntry(img, log[p.index], p.sectors);
  return img;
}
