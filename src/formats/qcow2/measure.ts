// Size measurement for `vdisk measure` (QEMU's qcow2_measure and raw_measure): how many bytes
// a new image needs for a given virtual size, or for the contents of an existing image.
// The numbers must equal `qemu-img measure`, so the formulas follow block/qcow2.c exactly,
// including its over-estimates (metadata is always counted for the fully allocated image).
import type { BlockNode } from '../../block/node.js';
import { invalidArgument } from '../../block/errors.js';
import { parseSize } from '../../block/size.js';
import * as C from './constants.js';
import { readHeader } from './header.js';
import { bitmapDataBytes } from './bitmaps.js';

export interface MeasureResult {
  required: number;
  fullyAllocated: number;
  /** Only when source and target both support persistent bitmaps (qcow2 v3 on both sides). */
  bitmaps?: number;
}

/** qemu-img sizes everything in 512-byte sectors (bdrv_getlength of a raw file rounds up). */
const BDRV_SECTOR_SIZE = 512;
/** Bitmap directory entry: fixed part before extra data and name (spec: "Bitmap directory"). */

const roundUp = (n: number, a: number): number => Math.ceil(n / a) * a;
const divRoundUp = (n: number, d: number): number => Math.ceil(n / d);

/** Options `measure -O qcow2 -o` accepts: qcow2's creation options. */
export const QCOW2_MEASURE_OPTIONS = [
  'size', 'compat', 'backing_file', 'backing_fmt', 'encryption', 'encrypt.format', 'cluster_size',
  'preallocation', 'lazy_refcounts', 'refcount_bits', 'compression_type', 'extended_l2',
  'data_file', 'data_file_raw',
] as const;
export const RAW_MEASURE_OPTIONS = ['size', 'preallocation'] as const;

interface Qcow2Options {
  clusterSize: number;
  version: 2 | 3;
  refcountOrder: number;
  extendedL2: boolean;
  prealloc: string;
  hasBackingFile: boolean;
}

function parseBool(v: string, key: string): boolean {
  if (v === 'on' || v === 'true' || v === 'yes') return true;
  if (v === 'off' || v === 'false' || v === 'no') return false;
  throw invalidArgument(`Parameter '${key}' expects 'on' or 'off'`);
}

const PREALLOC_MODES = ['off', 'metadata', 'falloc', 'full'];

function parseQcow2Options(o: Record<string, string>): Qcow2Options {
  const extendedL2 = o.extended_l2 !== undefined ? parseBool(o.extended_l2, 'extended_l2') : false;
  const clusterSize = o.cluster_size !== undefined ? parseSize(o.cluster_size, 'cluster size') : C.DEFAULT_CLUSTER_SIZE;
  const bits = Math.log2(clusterSize);
  if (!Number.isInteger(bits) || bits < C.MIN_CLUSTER_BITS || bits > C.MAX_CLUSTER_BITS) {
    throw invalidArgument(`Cluster size must be a power of two between ${2 ** C.MIN_CLUSTER_BITS} and ${2 ** (C.MAX_CLUSTER_BITS - 10)}k`);
  }
  if (extendedL2 && clusterSize < 16384) {
    throw invalidArgument('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  let version: 2 | 3 = 3;
  if (o.compat !== undefined) {
    if (o.compat === '0.10' || o.compat === 'v2') version = 2;
    else if (o.compat === '1.1' || o.compat === 'v3') version = 3;
    else throw invalidArgument(`Invalid compatibility level: '${o.compat}'`);
  }
  let refcountOrder = C.DEFAULT_REFCOUNT_ORDER;
  if (o.refcount_bits !== undefined) {
    const rb = Number(o.refcount_bits);
    if (!Number.isInteger(rb) || rb <= 0 || rb > 64 || (rb & (rb - 1)) !== 0) {
      throw invalidArgument('Refcount width must be a power of two and may not exceed 64 bits');
    }
    refcountOrder = Math.log2(rb);
  }
  if (version < 3 && refcountOrder !== C.DEFAULT_REFCOUNT_ORDER) {
    throw invalidArgument('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  const prealloc = o.preallocation ?? 'off';
  if (!PREALLOC_MODES.includes(prealloc)) throw invalidArgument(`invalid parameter value: ${prealloc}`);
  if (o['encrypt.format'] !== undefined || (o.encryption !== undefined && parseBool(o.encryption, 'encryption'))) {
    throw invalidArgument('measure: encrypted qcow2 targets are not supported');
  }
  return { clusterSize, version, refcountOrder, extendedL2, prealloc, hasBackingFile: o.backing_file !== undefined };
}

/**
 * QEMU's qcow2_refcount_metadata_size: refcount blocks and table clusters needed to count
 * `clusters` clusters plus themselves (a fixed point).
 */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountOrder: number, generousIncrease: boolean): number {
  const blocksPerTableCluster = clusterSize / C.REFTABLE_ENTRY_SIZE;
  const refcountsPerBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let last: number;
  let n = 0;
  do {
    last = n;
    blocks = divRoundUp(clusters + table + blocks, refcountsPerBlock);
    table = divRoundUp(blocks, blocksPerTableCluster);
    n = clusters + blocks + table;
    if (n === last && generousIncrease) {
      clusters += divRoundUp(table, 2);
      n = 0;
      generousIncrease = false;
    }
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** QEMU's qcow2_calc_prealloc_size: the fully allocated image, metadata included. */
export function calcPreallocSize(totalSize: number, clusterSize: number, refcountOrder: number, extendedL2: boolean): number {
  const l2eSize = extendedL2 ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL;
  const alignedTotal = roundUp(totalSize, clusterSize);
  let meta = clusterSize; // header
  let nl2e = alignedTotal / clusterSize;
  nl2e = roundUp(nl2e, clusterSize / l2eSize);
  meta += nl2e * l2eSize;
  let nl1e = (nl2e * l2eSize) / clusterSize;
  nl1e = roundUp(nl1e, clusterSize / C.L1E_SIZE);
  meta += nl1e * C.L1E_SIZE;
  meta += refcountMetadataSize((meta + alignedTotal) / clusterSize, clusterSize, refcountOrder, false);
  return meta + alignedTotal;
}

/**
 * Bytes of the input that hold data, counted in whole target clusters (qcow2_measure's loop
 * over bdrv_block_status_above: zero ranges are skipped, allocated data is rounded out to
 * the cluster; unallocated ranges at the bottom of the chain read as zeros).
 */
async function allocatedBytes(input: BlockNode, clusterSize: number): Promise<number> {
  const size = input.getLength();
  let required = 0;
  let offset = 0;
  while (offset < size) {
    const ext = await input.blockStatusAbove(offset, size - offset);
    const e = ext[0];
    let pnum = e.length;
    // Unallocated all the way down reads as zeros, like BDRV_BLOCK_ZERO ranges: not counted.
    if (!e.zero && e.data && e.allocated) {
      pnum = roundUp(offset + pnum, clusterSize) - offset;
      required += (offset % clusterSize) + pnum;
    }
    offset += pnum;
  }
  return required;
}

/**
 * qcow2_get_persistent_dirty_bitmap_size over the input node's persistent bitmaps (the ones
 * its driver loaded): each fully allocated, plus its table, plus the directory, in target
 * clusters.
 */
function persistentBitmapsSize(input: BlockNode, clusterSize: number): number {
  let total = 0;
  let dirSize = 0;
  for (const b of input.dirtyBitmaps) {
    if (!b.persistent) continue;
    const bmclusters = divRoundUp(bitmapDataBytes(b.size, b.granularity), clusterSize);
    total += bmclusters * clusterSize;
    total += roundUp(bmclusters * C.BME_TABLE_ENTRY_SIZE, clusterSize);
    dirSize += roundUp(C.BME_DIR_ENTRY_FIXED_SIZE + Buffer.byteLength(b.name ?? ''), 8);
  }
  return total + roundUp(dirSize, clusterSize);
}

async function isQcow2V3(node: BlockNode): Promise<boolean> {
  if (node.driver.driverName !== 'qcow2' || !node.file) return false;
  try {
    return (await readHeader(node.file, node.filename)).version === 3;
  } catch {
    return false;
  }
}

export async function measureQcow2(options: Record<string, string>, input: BlockNode | null, sizeArg: number | null): Promise<MeasureResult> {
  for (const k of Object.keys(options)) {
    if (!(QCOW2_MEASURE_OPTIONS as readonly string[]).includes(k)) throw invalidArgument(`Invalid parameter '${k}' for format 'qcow2'`);
  }
  const o = parseQcow2Options(options);
  const cs = o.clusterSize;
  const l2eSize = o.extendedL2 ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL;
  const optSize = sizeArg ?? (options.size !== undefined ? parseSize(options.size, 'image size', { allowZero: true }) : 0);
  let virtualSize = roundUp(optSize, cs);
  const l2Tables = divRoundUp(virtualSize / cs, cs / l2eSize);
  if (l2Tables * C.L1E_SIZE > C.QCOW_MAX_L1_SIZE) throw invalidArgument('The image size is too large (try using a larger cluster size)');

  let required = 0;
  if (input) {
    const ssize = roundUp(input.getLength(), BDRV_SECTOR_SIZE);
    virtualSize = roundUp(ssize, cs);
    required = o.hasBackingFile ? virtualSize : await allocatedBytes(input, cs);
  }
  if (o.prealloc === 'full' || o.prealloc === 'falloc') required = virtualSize;
  const fullyAllocated = calcPreallocSize(virtualSize, cs, o.refcountOrder, o.extendedL2);
  const result: MeasureResult = { required: fullyAllocated - virtualSize + required, fullyAllocated };
  if (o.version >= 3 && input && (await isQcow2V3(input))) result.bitmaps = persistentBitmapsSize(input, cs);
  return result;
}

export function measureRaw(options: Record<string, string>, input: BlockNode | null, sizeArg: number | null): MeasureResult {
  for (const k of Object.keys(options)) {
    if (!(RAW_MEASURE_OPTIONS as readonly string[]).includes(k)) throw invalidArgument(`Invalid parameter '${k}' for format 'raw'`);
  }
  if (options.preallocation !== undefined && !PREALLOC_MODES.includes(options.preallocation)) {
    throw invalidArgument(`invalid parameter value: ${options.preallocation}`);
  }
  let required: number;
  if (input) required = roundUp(input.getLength(), BDRV_SECTOR_SIZE);
  else required = roundUp(sizeArg ?? (options.size !== undefined ? parseSize(options.size, 'image size', { allowZero: true }) : 0), BDRV_SECTOR_SIZE);
  // Unallocated sectors count towards the file size in raw images.
  return { required, fullyAllocated: required };
}

export async function measure(targetFormat: string, options: Record<string, string>, input: BlockNode | null, sizeArg: number | null): Promise<MeasureResult> {
  if (targetFormat === 'qcow2') return measureQcow2(options, input, sizeArg);
  if (targetFormat === 'raw') return measureRaw(options, input, sizeArg);
  throw invalidArgument(`Block driver '${targetFormat}' does not support size measurement`);
}
