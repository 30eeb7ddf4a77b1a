// Creating qcow2 images the way QEMU's qcow2_co_create does: a header cluster, a one-cluster
// refcount table and one refcount block (describing clusters 0-2), no L1 table; then the
// image is opened and grown to its size, which allocates the L1 table (and preallocates).
import type { FormatCreateContext, Preallocation } from '../../block/driver.js';
import { invalidArgument, unsupported } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { parseSize } from '../../block/size.js';
import * as C from './constants.js';
import { type Qcow2Header, serializeHeader, sizeToL1 } from './header.js';
import { setRefcountEntry } from './refcount.js';
import { openQcow2 } from './open.js';

function parseBool(v: string | undefined, name: string): boolean {
  if (v === undefined) return false;
  if (['on', 'true', 'yes'].includes(v)) return true;
  if (['off', 'false', 'no'].includes(v)) return false;
  throw invalidArgument(`Parameter '${name}' expects 'on' or 'off', not '${v}'`);
}

export async function createQcow2(file: BlockNode, ctx: FormatCreateContext): Promise<void> {
  const o = ctx.options;
  const size = ctx.size;
  if (size % 512 !== 0) throw invalidArgument(`Image size must be a multiple of 512 bytes (asked ${size})`);
  const clusterSize = o.cluster_size !== undefined ? parseSize(o.cluster_size, 'cluster_size') : C.DEFAULT_CLUSTER_SIZE;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < C.MIN_CLUSTER_BITS || clusterBits > C.MAX_CLUSTER_BITS) {
    throw invalidArgument(`Cluster size must be a power of two between ${2 ** C.MIN_CLUSTER_BITS} and ${2 ** C.MAX_CLUSTER_BITS / 1024}k (asked ${clusterSize})`);
  }
  const compat = o.compat ?? '1.1';
  let version: 2 | 3;
  if (compat === '0.10' || compat === 'v2') version = 2;
  else if (compat === '1.1' || compat === 'v3') version = 3;
  else throw invalidArgument(`Invalid compatibility level: '${compat}' (use 0.10 or 1.1)`);
  const refcountBits = o.refcount_bits !== undefined ? Number(o.refcount_bits) : 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > C.MAX_REFCOUNT_ORDER) {
    throw invalidArgument(`Refcount width must be a power of two and may not exceed 64 bits (asked ${o.refcount_bits})`);
  }
  if (version === 2 && refcountBits !== 16) {
    throw invalidArgument('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  const lazy = parseBool(o.lazy_refcounts, 'lazy_refcounts');
  if (lazy && version === 2) {
    throw invalidArgument('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  if (parseBool(o.extended_l2, 'extended_l2')) throw unsupported('extended_l2=on is not supported by vdisk');
  const ctype = o.compression_type ?? 'zlib';
  if (ctype !== 'zlib' && ctype !== 'zstd') throw invalidArgument(`Invalid compression_type '${ctype}' (zlib or zstd)`);
  if (ctype === 'zstd' && version === 2) {
    throw invalidArgument('Compression type zstd is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  const prealloc = (o.preallocation ?? 'off') as Preallocation;
  if (!['off', 'metadata', 'falloc', 'full'].includes(prealloc)) {
    throw invalidArgument(`Invalid preallocation mode: '${prealloc}' (off, metadata, falloc, full)`);
  }
  const backingFile = ctx.backingFile ?? o.backing_file ?? null;
  const backingFormat = ctx.backingFormat ?? o.backing_fmt ?? null;
  if (backingFormat !== null && backingFile === null) throw invalidArgument('Backing format specified without a backing file');
  if (backingFile !== null && prealloc !== 'off') {
    throw invalidArgument('Backing file and preallocation cannot be used at the same time');
  }
  if (backingFile !== null && Buffer.byteLength(backingFile) > C.QCOW2_MAX_BACKING_FILE_NAME) {
    throw invalidArgument(`Backing file name is longer than ${C.QCOW2_MAX_BACKING_FILE_NAME} bytes`);
  }
  if (sizeToL1(size, clusterBits) > C.QCOW_MAX_L1_SIZE / 8) {
    throw invalidArgument(`Image size ${size} is too large for cluster size ${clusterSize} (the L1 table would exceed ${C.QCOW_MAX_L1_SIZE} bytes)`);
  }

  const zstd = ctype === 'zstd';
  const h: Qcow2Header = {
    version, backingFileOffset: 0, backingFileSize: 0, clusterBits, size: 0, cryptMethod: 0,
    l1Size: 0, l1TableOffset: 0, refcountTableOffset: clusterSize, refcountTableClusters: 1,
    nbSnapshots: 0, snapshotsOffset: 0,
    incompatibleFeatures: zstd ? C.QCOW2_INCOMPAT_COMPRESSION : 0n,
    compatibleFeatures: lazy ? C.QCOW2_COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: 0n, refcountOrder, headerLength: version === 3 ? C.QCOW2_V3_HEADER_LENGTH : C.QCOW2_V2_HEADER_LENGTH,
    compressionType: zstd ? C.QCOW2_COMPRESSION_TYPE_ZSTD : C.QCOW2_COMPRESSION_TYPE_ZLIB,
    headerTail: Buffer.alloc(0), backingFile, backingFormat, dataFile: null, featureNames: [],
    bitmaps: null, bitmapsIgnored: false, cryptoHeader: null, unknownExtensions: [],
  };
  const header = serializeHeader(h);
  const image = Buffer.alloc(3 * clusterSize);
  header.copy(image);
  image.writeBigUInt64BE(BigInt(2 * clusterSize), clusterSize); // refcount table[0] -> block at cluster 2
  const block = image.subarray(2 * clusterSize);
  for (let c = 0; c < 3; c++) setRefcountEntry(block, refcountOrder, c, 1);
  await file.truncate(image.length, 'off');
  await file.pwrite(0, image);
  await file.flush();

  const driver = await openQcow2(file, {
    filename: ctx.filename, readOnly: false, options: {}, wantBacking: false,
    openBacking: async () => { throw new Error('internal: backing not opened during create'); },
  });
  try {
    await driver.truncate(size, prealloc);
    await driver.flushToOs();
  } finally {
    await driver.close();
  }
  await file.flush();
}
