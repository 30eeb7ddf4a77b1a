// A seeded guest workload, run through a BlockBackend on an image whose protocol node is a
// fault-injection filter over memory. The result is a recorded run: the image as it was
// before the workload (stable: as left by create), the device log the filter recorded, and
// the guest model of what must read back at each point of that log.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BlockBackend } from '../block/backend.js';
import { REQ_MAY_UNMAP } from '../block/driver.js';
import { parseCacheMode, type CacheModeName } from '../block/cache-mode.js';
import { getFormat, openFormatOn } from '../block/graph.js';
import { MemoryDriver, openMemory } from '../protocols/memory.js';
import { openFaultInjection, type FaultRule, type LogEntry } from '../filters/fault-injection.js';
import { GuestModel, SECTOR, fillPattern, type GuestOpKind } from './model.js';

export type CrashFormat = 'qcow2' | 'raw';

export interface WorkloadParams {
  seed: number;
  format: CrashFormat;
  mode: CacheModeName;
  /** qcow2 only. */
  clusterSize: number;
  lazyRefcounts: boolean;
  /** Guest requests to issue (flushes included). */
  ops: number;
  /** Virtual disk size; derived from the cluster size when absent. */
  size?: number;
  /** Who lays out the empty image: qemu-img (default: independent of the driver) or vdisk. */
  createWith?: 'qemu-img' | 'vdisk';
  faults?: FaultRule[];
}

export interface RecordedRun {
  params: WorkloadParams;
  size: number;
  /** The image file before the workload: stable, as create left it. */
  base: Buffer;
  log: LogEntry[];
  model: GuestModel;
  /** Device log length when the workload ended (every issued request completed). */
  endLog: number;
}

/** A few L2 tables' worth of guest disk, so table allocation is exercised too. */
export function defaultSize(p: Pick<WorkloadParams, 'format' | 'clusterSize'>): number {
  if (p.format === 'raw') return 2 << 20;
  const l2Coverage = (p.clusterSize / 8) * p.clusterSize;
  return Math.max(256 << 10, Math.min(8 << 20, 3 * l2Coverage));
}

/** Deterministic PRNG (mulberry32), the same as the tests use. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const baseCache = new Map<string, Buffer>();

/** The empty image's bytes, laid out by qemu-img (cached per geometry). */
function qemuImgBase(p: WorkloadParams, size: number): Buffer {
  const key = `${p.format}:${p.clusterSize}:${p.lazyRefcounts}:${size}`;
  const hit = baseCache.get(key);
  if (hit) return hit;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdisk-crashbase-'));
  try {
    const file = path.join(dir, 'base.img');
    const args = ['create', '-q', '-f', p.format];
    if (p.format === 'qcow2') {
      args.push('-o', `compat=1.1,cluster_size=${p.clusterSize},lazy_refcounts=${p.lazyRefcounts ? 'on' : 'off'}`);
    }
    execFileSync('qemu-img', [...args, file, String(size)], { stdio: ['ignore', 'ignore', 'pipe'] });
    const bytes = fs.readFileSync(file);
    baseCache.set(key, bytes);
    return bytes;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function vdiskBase(p: WorkloadParams, size: number): Promise<Buffer> {
  const mem = openMemory(0, 'crash-base');
  const options: Record<string, string> = p.format === 'qcow2'
    ? { compat: '1.1', cluster_size: String(p.clusterSize), lazy_refcounts: p.lazyRefcounts ? 'on' : 'off' }
    : {};
  const factory = getFormat(p.format);
  if (!factory.create) throw new Error(`format ${p.format} cannot create images`);
  await factory.create(mem, {
    filename: 'crash-base', size, options,
    openBacking: () => Promise.reject(new Error('no backing files in the crash lab')),
  });
  await mem.flush();
  return Buffer.from((mem.driver as MemoryDriver).data);
}

/** Run the seeded workload and return what the filter recorded. */
export async function recordRun(params: WorkloadParams): Promise<RecordedRun> {
  const size = params.size ?? defaultSize(params);
  const base = params.createWith === 'vdisk' ? await vdiskBase(params, size) : qemuImgBase(params, size);
  const cache = parseCacheMode(params.mode);
  const mem = openMemory(0, 'crash-image');
  (mem.driver as MemoryDriver).data = Buffer.from(base);
  const { node: filterNode, driver: filter } = openFaultInjection(mem, { faults: params.faults, noFlush: cache.noFlush });
  const root = await openFormatOn(filterNode, 'crash-image', { format: params.format, cache });
  // Whatever opening wrote (a qcow2 dirty bit, say) belongs to the run: keep the log.
  const backend = new BlockBackend(root, cache);
  const model = new GuestModel(size);
  const rnd = prng(params.seed);
  const sectors = size / SECTOR;
  const unit = params.format === 'qcow2' ? params.clusterSize : 4096;
  // Requests cluster around a few hot spots so later ones overwrite, COW and reuse earlier ones.
  const hot = Array.from({ length: 4 }, () => Math.floor(rnd() * sectors));
  const pickRange = (maxLen: number): [number, number] => {
    const lenSectors = 1 + Math.floor(rnd() ** 2 * (maxLen / SECTOR));
    let start: number;
    if (rnd() < 0.6) {
      const h = hot[Math.floor(rnd() * hot.length)];
      start = h + Math.floor((rnd() - 0.5) * 2 * (unit / SECTOR) * 2);
    } else {
      start = Math.floor(rnd() * sectors);
    }
    if (rnd() < 0.3) start -= start % (unit / SECTOR); // cluster-aligned: whole-cluster paths
    start = Math.max(0, Math.min(sectors - 1, start));
    const len = Math.min(lenSectors, sectors - start);
    return [start * SECTOR, len * SECTOR];
  };
  for (let i = 0; i < params.ops; i++) {
    const r = rnd();
    let kind: GuestOpKind;
    if (r < 0.6) kind = 'write';
    else if (r < 0.7) kind = 'zero';
    else if (r < 0.8) kind = 'discard';
    else kind = 'flush';
    const [offset, length] = kind === 'flush' ? [0, 0] : pickRange(kind === 'write' ? 2 * unit + 2048 : 3 * unit);
    const flags = kind === 'zero' && rnd() < 0.5 ? REQ_MAY_UNMAP : 0;
    const op = model.issue(kind, offset, length, flags, filter.log.length);
    let error: unknown;
    try {
      switch (kind) {
        case 'write': {
          const buf = Buffer.alloc(length);
          fillPattern(buf, op.id, offset / SECTOR);
          await backend.pwrite(offset, buf);
          break;
        }
        case 'zero':
          await backend.pwriteZeroes(offset, length, flags);
          break;
        case 'discard':
          await backend.pdiscard(offset, length);
          break;
        case 'flush':
          await backend.flush();
          break;
      }
    } catch (err) {
      error = err;
    }
    model.complete(op, filter.log.length, error);
    if (error === undefined && !cache.noFlush) {
      // A completed flush, or a write the backend sent with FUA, is stable (see model.ts).
      const stable = kind === 'flush' || (!cache.writeback && (kind === 'write' || kind === 'zero'));
      if (stable) model.markDurable(filter.log.length);
    }
  }
  const endLog = filter.log.length;
  // The run ends with the power cut: the image is never closed, nothing more reaches the log.
  filter.recording = false;
  return { params, size, base, log: filter.log, model, endLog };
}

export function describeParams(p: WorkloadParams): string {
  const geo = p.format === 'qcow2' ? ` cluster=${p.clusterSize} lazy=${p.lazyRefcounts ? 'on' : 'off'}` : '';
  return `${p.format} mode=${p.mode}${geo} seed=${p.seed} ops=${p.ops}`;
}
