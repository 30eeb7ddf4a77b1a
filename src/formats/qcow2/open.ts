// Opening a qcow2 image (QEMU's qcow2_do_open): header checks, cache sizes, the L1, refcount
// and snapshot tables, dirty-bit repair and autoclear handling on a writable open, the backing
// file; and the format's entry in the registry (probe, create options).
import type { FormatDriverFactory, FormatOpenContext } from '../../block/driver.js';
import { corrupt, invalidArgument, unsupported } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { parseSize } from '../../block/size.js';
import * as C from './constants.js';
import { type Qcow2Header, readHeader, serializeHeader, unknownIncompatibleNames } from './header.js';
import { readSnapshots } from './snapshot.js';
import { repairRefcounts } from './repair.js';
import { readBitmapsForOpen } from './bitmaps.js';
import { Qcow2Driver } from './qcow2.js';

function cacheSizes(h: Qcow2Header, options: Record<string, string>, filename: string): { l2: number; refcount: number } {
  const cs = 2 ** h.clusterBits;
  const get = (k: string) => (options[k] !== undefined ? parseSize(options[k], k, { allowZero: true }) : undefined);
  const combined = get('cache-size');
  const l2Set = get('l2-cache-size');
  const rcSet = get('refcount-cache-size');
  // QEMU's read_cache_sizes: the L2 cache covers the whole disk, up to 32 MiB of tables.
  const maxL2 = Math.ceil(Math.ceil(h.size / cs) * 8 / cs) * cs;
  let l2 = Math.min(maxL2, l2Set ?? C.DEFAULT_L2_CACHE_MAX_SIZE);
  let rc = rcSet ?? C.MIN_REFCOUNT_CACHE_SIZE * cs;
  if (combined !== undefined) {
    if (l2Set !== undefined && rcSet !== undefined) {
      throw invalidArgument(`${filename}: cache-size, l2-cache-size and refcount-cache-size may not be set at the same time`);
    }
    if (l2Set !== undefined) rc = Math.max(0, combined - l2);
    else if (rcSet !== undefined) l2 = Math.max(0, combined - rc);
    else {
      l2 = Math.min(maxL2, combined);
      rc = Math.max(0, combined - l2);
    }
  }
  return {
    l2: Math.max(C.MIN_L2_CACHE_SIZE, Math.floor(l2 / cs)),
    refcount: Math.max(C.MIN_REFCOUNT_CACHE_SIZE, Math.floor(rc / cs)),
  };
}

export async function openQcow2(file: BlockNode, ctx: FormatOpenContext): Promise<Qcow2Driver> {
  const fn = ctx.filename;
  const h = await readHeader(file, fn);
  const unknown = unknownIncompatibleNames(h);
  if (unknown.length) throw unsupported(`${fn}: Unsupported IMAGE feature(s): ${unknown.join(', ')}`);
  if (h.cryptMethod !== C.QCOW_CRYPT_NONE) throw unsupported(`${fn}: encrypted qcow2 images (crypt_method ${h.cryptMethod}) are not supported`);
  if (h.incompatibleFeatures & C.QCOW2_INCOMPAT_CORRUPT && !ctx.readOnly) {
    throw corrupt(`${fn}: qcow2 image is marked corrupt (corrupt bit); it can only be opened read-only (run 'qemu-img check -r all' to repair)`);
  }
  const cs = 2 ** h.clusterBits;
  const cacheSz = cacheSizes(h, ctx.options, fn);

  const readTable = async (off: number, bytes: number, what: string): Promise<Buffer> => {
    const b = Buffer.alloc(bytes);
    if (bytes > 0) {
      if (off + bytes > file.getLength()) throw corrupt(`${fn}: ${what} at ${off} (${bytes} bytes) is past the end of the file`);
      await file.pread(off, b);
    }
    return b;
  };
  let l1 = await readTable(h.l1TableOffset, h.l1Size * 8, 'L1 table');
  let refTable = await readTable(h.refcountTableOffset, h.refcountTableClusters * cs, 'refcount table');
  const snapshots = await readSnapshots(file, h, fn);
  // QEMU validates the persistent bitmaps (qcow2_load_dirty_bitmaps) before it repairs or
  // rewrites anything; the driver loads them (loadBitmaps) once the node exists.
  await readBitmapsForOpen(file, h, h.size, fn);

  if (!ctx.readOnly) {
    let rewrite = false;
    if (h.incompatibleFeatures & C.QCOW2_INCOMPAT_DIRTY) {
      // Unclean shutdown with lazy refcounts: rebuild the refcounts from the tables.
      const st = await repairRefcounts(file, h, l1, snapshots, fn);
      refTable = st.table;
      l1 = st.l1;
      h.refcountTableOffset = st.tableOffset;
      h.refcountTableClusters = st.tableClusters;
      h.incompatibleFeatures &= ~C.QCOW2_INCOMPAT_DIRTY;
      rewrite = true;
    }
    // Autoclear bits we do not know are cleared (spec: "autoclear_features"); the bitmaps
    // bit stays, as we keep the bitmaps (bitmaps.ts). An extension found without its bit is
    // stale: the rewrite drops it (QEMU does the same).
    if (h.autoclearFeatures & ~C.QCOW2_AUTOCLEAR_SUPPORTED || h.bitmapsIgnored) {
      h.autoclearFeatures &= C.QCOW2_AUTOCLEAR_SUPPORTED;
      h.bitmapsIgnored = false;
      rewrite = true;
    }
    // The bitmaps bit without a bitmaps extension vouches for nothing; QEMU 7.2 then takes a
    // zero-sized directory at offset 0 to overlap every write and marks the image corrupt on
    // the first one. Clear it, as QEMU does when it removes the last bitmap.
    if (!h.bitmaps && h.autoclearFeatures & C.QCOW2_AUTOCLEAR_BITMAPS) {
      h.autoclearFeatures &= ~C.QCOW2_AUTOCLEAR_BITMAPS;
      rewrite = true;
    }
    if (rewrite) {
      const bytes = serializeHeader(h);
      await file.pwrite(0, bytes);
      await file.flush();
    }
  }

  let backing: BlockNode | null = null;
  if (h.backingFile !== null && ctx.wantBacking) {
    backing = await ctx.openBacking(h.backingFile, h.backingFormat ?? undefined);
  }
  try {
    return new Qcow2Driver(file, h, fn, ctx.readOnly, l1, refTable, snapshots, backing, cacheSz);
  } catch (err) {
    await backing?.close().catch(() => {});
    throw err;
  }
}

export const qcow2Format: FormatDriverFactory = {
  name: 'qcow2',
  createOptions: [
    'size', 'compat', 'backing_file', 'backing_fmt', 'cluster_size', 'preallocation',
    'lazy_refcounts', 'refcount_bits', 'compression_type', 'extended_l2',
  ],
  probe(head: Buffer): number {
    if (head.length >= 8 && head.readUInt32BE(0) === C.QCOW_MAGIC) {
      const v = head.readUInt32BE(4);
      if (v === 2 || v === 3) return 100;
    }
    return 0;
  },
  open: openQcow2,
  async create(file, ctx) {
    const { createQcow2 } = await import('./create.js');
    await createQcow2(file, ctx);
  },
};

