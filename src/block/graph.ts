// Building graphs: open an image (protocol node, then format node, then its backing chain)
// and create new images. The format registry lives here.
import path from 'node:path';
import fs from 'node:fs/promises';
import type { FormatDriverFactory, FormatOpenContext } from './driver.js';
import { BlockNode } from './node.js';
import { CACHE_MODES, type CacheOptions } from './cache-mode.js';
import { VdiskError, invalidArgument, unsupported } from './errors.js';
import { openFile, createFile } from '../protocols/file-posix.js';
import { openNull, NULL_DEFAULT_SIZE } from '../protocols/null.js';
import { rawFormat } from '../formats/raw.js';

/**
 * A format whose driver module is loaded on first use: start-up time counts in every command,
 * and converting raw to raw need not load qcow2 (and its compression code). `mayMatch` is a
 * cheap look at the probe bytes: when it says yes, probing loads the driver and asks it.
 */
interface LazyFormat extends FormatDriverFactory {
  load(): Promise<FormatDriverFactory>;
  mayMatch(head: Buffer): boolean;
}

function lazyFormat(name: string, createOptions: readonly string[], mayMatch: (head: Buffer) => boolean,
  importer: () => Promise<FormatDriverFactory>): LazyFormat {
  let real: FormatDriverFactory | null = null;
  let loading: Promise<FormatDriverFactory> | null = null;
  const load = (): Promise<FormatDriverFactory> => {
    if (real) return Promise.resolve(real);
    loading ??= importer().then((f) => (real = f), (err) => {
      loading = null;
      throw err;
    });
    return loading;
  };
  return {
    name,
    get createOptions() {
      return real ? real.createOptions : createOptions;
    },
    probe: (head, filename) => (real ? real.probe(head, filename) : mayMatch(head) ? 100 : 0),
    open: async (file, ctx) => (await load()).open(file, ctx),
    create: async (file, ctx) => {
      const f = await load();
      if (!f.create) throw unsupported(`Format '${name}' does not support image creation`);
      return f.create(file, ctx);
    },
    load,
    mayMatch,
  };
}

function isLazy(f: FormatDriverFactory): f is LazyFormat {
  return typeof (f as Partial<LazyFormat>).load === 'function' && typeof (f as Partial<LazyFormat>).mayMatch === 'function';
}

/** The format's real driver factory (loading its module if it is lazy). */
async function realFormat(f: FormatDriverFactory): Promise<FormatDriverFactory> {
  return isLazy(f) ? f.load() : f;
}

const QCOW_MAGIC = 0x514649fb;
const qcow2Lazy = lazyFormat('qcow2', [
  'size', 'compat', 'backing_file', 'backing_fmt', 'cluster_size', 'preallocation',
  'lazy_refcounts', 'refcount_bits', 'compression_type', 'extended_l2',
], (head) => head.length >= 4 && head.readUInt32BE(0) === QCOW_MAGIC,
async () => (await import('../formats/qcow2/open.js')).qcow2Format);

export const formats = new Map<string, FormatDriverFactory>([[rawFormat.name, rawFormat], [qcow2Lazy.name, qcow2Lazy]]);

export function registerFormat(f: FormatDriverFactory): void {
  formats.set(f.name, f);
}

export function getFormat(name: string): FormatDriverFactory {
  const f = formats.get(name);
  if (!f) throw invalidArgument(`Unknown driver '${name}' (supported formats: ${[...formats.keys()].join(', ')})`);
  return f;
}

/** Longest backing chain we follow (QEMU has no fixed limit; 64 deep is far past real use). */
export const MAX_CHAIN_DEPTH = 64;

export interface OpenOptions {
  /** Format name; probed from the first bytes when absent. */
  format?: string;
  cache?: CacheOptions;
  readOnly?: boolean;
  /** Open the backing chain (default true). */
  backing?: boolean;
  /** Format driver options (e.g. l2-cache-size, raw offset/size). */
  options?: Record<string, string>;
}

const PROBE_BYTES = 2048;

export async function openImage(filename: string, opts: OpenOptions = {}): Promise<BlockNode> {
  return openInChain(filename, opts, []);
}

async function openInChain(filename: string, opts: OpenOptions, chain: string[]): Promise<BlockNode> {
  const cache = opts.cache ?? CACHE_MODES.writeback;
  const readOnly = opts.readOnly ?? false;
  const file = await openProtocol(filename, { readOnly, direct: cache.direct, noFlush: cache.noFlush });
  try {
    return await openFormatOn(file, filename, opts, chain);
  } catch (err) {
    await file.close().catch(() => {});
    throw err;
  }
}

/**
 * Open a format node on an already open protocol node (e.g. a fault-injection filter in
 * the crash lab). On failure the caller still owns `file`.
 */
export async function openFormatOn(file: BlockNode, filename: string, opts: OpenOptions = {}, chain: string[] = []): Promise<BlockNode> {
  const cache = opts.cache ?? CACHE_MODES.writeback;
  const readOnly = opts.readOnly ?? false;
  const format = opts.format ? await realFormat(getFormat(opts.format)) : await probeFormat(file, filename);
  const real = filename.startsWith('null-co:') ? filename : await fs.realpath(filename).catch(() => filename);
  const myChain = [...chain, real];
  const ctx: FormatOpenContext = {
    filename,
    readOnly,
    options: opts.options ?? {},
    wantBacking: opts.backing ?? true,
    openBacking: async (name: string, backingFormat: string | undefined) => {
      const resolved = resolveBackingName(filename, name);
      const realBacking = await fs.realpath(resolved).catch(() => resolved);
      if (myChain.includes(realBacking)) {
        throw new VdiskError('ELOOP', 'invalid-format',
          `Backing file loop: ${[...myChain, realBacking].map((p) => path.basename(p)).join(' -> ')}`);
      }
      if (myChain.length >= MAX_CHAIN_DEPTH) {
        throw new VdiskError('ELOOP', 'invalid-format', `${filename}: backing chain is deeper than ${MAX_CHAIN_DEPTH}`);
      }
      return openInChain(resolved, { format: backingFormat, cache, readOnly: true, backing: true }, myChain);
    },
  };
  const driver = await format.open(file, ctx);
  const node = new BlockNode(driver, { filename, readOnly, noFlush: cache.noFlush });
  if (driver.loadBitmaps) {
    try {
      for (const b of await driver.loadBitmaps()) node.addBitmap(b);
    } catch (err) {
      await driver.close().catch(() => {});
      throw err;
    }
  }
  return node;
}

/** Backing names are file names: protocol prefixes and json: are refused. */
export function resolveBackingName(imageFilename: string, name: string): string {
  if (/^[a-zA-Z][a-zA-Z0-9+.-]*:/.test(name)) {
    throw unsupported(`${imageFilename}: backing file '${name}' uses a protocol prefix or json:, which vdisk refuses`);
  }
  return path.isAbsolute(name) ? name : path.join(path.dirname(imageFilename), name);
}

/** The protocol node for a name: null-co://, rbd:..., else a file or device. */
export async function openProtocol(filename: string, o: { readOnly: boolean; direct: boolean; noFlush: boolean }): Promise<BlockNode> {
  if (filename.startsWith('null-co://')) return openNull(NULL_DEFAULT_SIZE, o.readOnly);
  // Loaded on first use: most commands never touch Ceph.
  if (filename.startsWith('rbd:')) return (await import('../protocols/rbd.js')).openRbd(filename, o);
  return openFile(filename, o);
}

/**
 * Create the empty protocol-level object a format is laid onto (qemu-img create's
 * bdrv_create_file): `protocolOptions` are the -o options the format did not claim.
 */
async function createProtocol(filename: string, protocolOptions: Record<string, string>): Promise<void> {
  const keys = Object.keys(protocolOptions);
  if (filename.startsWith('rbd:')) {
    const rbd = await import('../protocols/rbd.js');
    const bad = keys.find((k) => !(rbd.RBD_CREATE_OPTIONS as readonly string[]).includes(k));
    if (bad !== undefined) throw invalidArgument(`Invalid parameter '${bad}' for protocol 'rbd' (supported: ${rbd.RBD_CREATE_OPTIONS.join(', ')})`);
    return rbd.createRbd(filename, 0, protocolOptions);
  }
  if (keys.length > 0) throw invalidArgument(`Invalid parameter '${keys[0]}'`);
  return createFile(filename);
}

export async function probeFormat(file: BlockNode, filename: string): Promise<FormatDriverFactory> {
  const n = Math.min(PROBE_BYTES, file.getLength());
  const head = Buffer.alloc(PROBE_BYTES);
  if (n > 0) await file.pread(0, head.subarray(0, n));
  let best: FormatDriverFactory = rawFormat;
  let bestScore = 0;
  for (const entry of formats.values()) {
    const f = isLazy(entry) && entry.mayMatch(head) ? await entry.load() : entry;
    const score = f.probe(head, filename);
    if (score > bestScore) {
      best = f;
      bestScore = score;
    }
  }
  return best;
}

export interface CreateOptions {
  format: string;
  size: number;
  options?: Record<string, string>;
  backingFile?: string;
  backingFormat?: string;
  /** qemu-img create -u: do not open the backing file to check it. */
  unsafe?: boolean;
}

export async function createImage(filename: string, c: CreateOptions): Promise<void> {
  const format = await realFormat(getFormat(c.format));
  if (!format.create) throw unsupported(`Format '${c.format}' does not support image creation`);
  const options: Record<string, string> = {};
  const protocolOptions: Record<string, string> = {};
  for (const [key, value] of Object.entries(c.options ?? {})) {
    if (format.createOptions.includes(key)) {
      options[key] = value;
    } else if (filename.startsWith('rbd:')) {
      protocolOptions[key] = value; // e.g. rbd's cluster_size (object size) under a raw image
    } else {
      throw invalidArgument(`Invalid parameter '${key}' for format '${c.format}' (supported: ${format.createOptions.join(', ')})`);
    }
  }
  // Like qemu-img create, check the backing chain opens (and does not loop back to the new
  // image) before anything is written. Protocol prefixes and json: are refused even with -u.
  const backingFile = c.backingFile ?? options.backing_file;
  if (backingFile !== undefined && backingFile !== '') {
    const resolved = resolveBackingName(filename, backingFile);
    if (!c.unsafe) {
      const self = await fs.realpath(filename).catch(() => path.resolve(filename));
      const backing = await openInChain(resolved, { format: c.backingFormat ?? options.backing_fmt, readOnly: true }, [self]);
      await backing.close();
    }
  }
  await createProtocol(filename, protocolOptions);
  const file = await openProtocol(filename, { readOnly: false, direct: false, noFlush: false });
  try {
    await format.create(file, {
      filename,
      size: c.size,
      options,
      backingFile: c.backingFile,
      backingFormat: c.backingFormat,
      openBacking: (name, fmt) => openImage(resolveBackingName(filename, name), { format: fmt, readOnly: true }),
    });
  } finally {
    await file.close();
  }
}
