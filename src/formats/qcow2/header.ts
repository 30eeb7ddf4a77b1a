// The qcow2 header: parse, validate and serialize (spec: docs/interop/qcow2.txt, "Header",
// "Header extensions", "Feature name table", "Bitmaps extension").
//
// Stable exports (check and measure build on them):
//   Qcow2Header           every header field, plus the parsed extensions
//   readHeader(file, fn)   reads the first cluster of `file` and returns parseHeader(...)
//   parseHeader(buf, fn)   pure: validates every field against QEMU's limits, throws VdiskError
//   serializeHeader(h)     the bytes of the header cluster prefix (header, extensions, backing name)
//   defaultFeatureNames()  the feature name table QEMU writes
//   unknownIncompatibleNames(h)  names of incompatible bits we do not support
//   sizeToL1(size, clusterBits), l2Entries(h), refcountBlockEntries(h), clusterSize(h)
//
// Every numeric field is a JS number except the three feature bitmaps (bigint). Offsets are
// checked to be below 2^63 (QEMU's limit) and, for JS exactness, below 2^53.
import { corrupt, invalidFormat, unsupported } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import * as C from './constants.js';

export interface Qcow2HeaderExtension {
  magic: number;
  data: Buffer;
}

export interface Qcow2FeatureName {
  /** QCOW2_FEAT_TYPE_INCOMPATIBLE / _COMPATIBLE / _AUTOCLEAR */
  type: number;
  bit: number;
  name: string;
}

export interface Qcow2BitmapsExtension {
  nbBitmaps: number;
  bitmapDirectorySize: number;
  bitmapDirectoryOffset: number;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  /** Virtual disk size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  /** refcount_bits = 1 << refcountOrder (version 2: always 4). */
  refcountOrder: number;
  /** 72 for version 2; >= 104 and a multiple of 8 for version 3. */
  headerLength: number;
  compressionType: number;
  /** Header bytes past the ones this version of the spec defines (header_length > 112), kept verbatim. */
  headerTail: Buffer;
  backingFile: string | null;
  /** From the backing format extension. */
  backingFormat: string | null;
  /** From the external data file extension (refused at open, kept for check). */
  dataFile: string | null;
  featureNames: Qcow2FeatureName[];
  /** Bitmaps extension; null when absent or ignored (autoclear bit clear). */
  bitmaps: Qcow2BitmapsExtension | null;
  /** Bitmaps extension present on disk but ignored because the autoclear bit is clear. */
  bitmapsIgnored: boolean;
  /** Full disk encryption header extension body, if any (kept verbatim). */
  cryptoHeader: Buffer | null;
  /** Extensions we do not know, preserved in order on rewrite (spec: must be kept). */
  unknownExtensions: Qcow2HeaderExtension[];
}

export const clusterSize = (h: Pick<Qcow2Header, 'clusterBits'>): number => 2 ** h.clusterBits;
/** L2 entries per table (standard, not extended L2). */
export const l2Entries = (h: Pick<Qcow2Header, 'clusterBits'>): number => 2 ** (h.clusterBits - 3);
export const refcountBits = (h: Pick<Qcow2Header, 'refcountOrder'>): number => 2 ** h.refcountOrder;
/** Refcount entries per refcount block: cluster_size * 8 / refcount_bits. */
export const refcountBlockEntries = (h: Pick<Qcow2Header, 'clusterBits' | 'refcountOrder'>): number =>
  2 ** (h.clusterBits + 3 - h.refcountOrder);

/** L1 entries needed to map `size` bytes. */
export function sizeToL1(size: number, clusterBits: number): number {
  const perL1 = 2 ** (2 * clusterBits - 3);
  return Math.ceil(size / perL1);
}

/** The feature name table QEMU (7.2) writes into version 3 images. */
export function defaultFeatureNames(): Qcow2FeatureName[] {
  return [
    { type: C.QCOW2_FEAT_TYPE_INCOMPATIBLE, bit: C.QCOW2_INCOMPAT_DIRTY_BITNR, name: 'dirty bit' },
    { type: C.QCOW2_FEAT_TYPE_INCOMPATIBLE, bit: C.QCOW2_INCOMPAT_CORRUPT_BITNR, name: 'corrupt bit' },
    { type: C.QCOW2_FEAT_TYPE_INCOMPATIBLE, bit: C.QCOW2_INCOMPAT_DATA_FILE_BITNR, name: 'external data file' },
    { type: C.QCOW2_FEAT_TYPE_INCOMPATIBLE, bit: C.QCOW2_INCOMPAT_COMPRESSION_BITNR, name: 'compression type' },
    { type: C.QCOW2_FEAT_TYPE_INCOMPATIBLE, bit: C.QCOW2_INCOMPAT_EXTL2_BITNR, name: 'extended L2 entries' },
    { type: C.QCOW2_FEAT_TYPE_COMPATIBLE, bit: C.QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR, name: 'lazy refcounts' },
    { type: C.QCOW2_FEAT_TYPE_AUTOCLEAR, bit: C.QCOW2_AUTOCLEAR_BITMAPS_BITNR, name: 'bitmaps' },
    { type: C.QCOW2_FEAT_TYPE_AUTOCLEAR, bit: C.QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR, name: 'raw external data' },
  ];
}

/** Names (from the image's feature table, else "Unknown incompatible feature: N") of unsupported bits. */
export function unknownIncompatibleNames(h: Qcow2Header): string[] {
  const out: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    const mask = 1n << BigInt(bit);
    if (!(h.incompatibleFeatures & mask) || C.QCOW2_INCOMPAT_SUPPORTED & mask) continue;
    const named = h.featureNames.find((f) => f.type === C.QCOW2_FEAT_TYPE_INCOMPATIBLE && f.bit === bit);
    out.push(named ? named.name : `Unknown incompatible feature: ${bit}`);
  }
  return out;
}

/** Read the header cluster of `file` and parse it. */
export async function readHeader(file: BlockNode, filename: string): Promise<Qcow2Header> {
  const fileLen = file.getLength();
  if (fileLen < C.QCOW2_V2_HEADER_LENGTH) {
    throw invalidFormat(`${filename}: file is ${fileLen} bytes, too short for a qcow2 header (${C.QCOW2_V2_HEADER_LENGTH})`);
  }
  const first = Buffer.alloc(C.QCOW2_V3_HEADER_LENGTH);
  await file.pread(0, first.subarray(0, Math.min(first.length, fileLen)));
  const bits = first.readUInt32BE(C.HDR_CLUSTER_BITS);
  if (first.readUInt32BE(C.HDR_MAGIC) !== C.QCOW_MAGIC || bits < C.MIN_CLUSTER_BITS || bits > C.MAX_CLUSTER_BITS) {
    return parseHeader(first, filename); // throws the precise error
  }
  const cluster = Buffer.alloc(2 ** bits);
  await file.pread(0, cluster.subarray(0, Math.min(cluster.length, fileLen)));
  return parseHeader(cluster, filename);
}

/** A u64 field as a safe JS number, or a corrupt-image error naming it. */
function u64(buf: Buffer, pos: number, filename: string, field: string): number {
  const v = buf.readBigUInt64BE(pos);
  if (v >= C.QCOW2_MAX_OFFSET) throw corrupt(`${filename}: ${field} ${v} must be less than 2^63`);
  if (v > BigInt(C.QCOW2_MAX_SAFE_OFFSET)) throw unsupported(`${filename}: ${field} ${v} is beyond 2^53, which vdisk does not support`);
  return Number(v);
}

/** QEMU's validate_table_offset: cluster aligned, no overflow, inside 2^63. */
function checkTable(filename: string, what: string, offset: number, entries: number, entryLen: number, clusterSize: number): void {
  if (offset % clusterSize !== 0) throw corrupt(`${filename}: ${what} offset ${offset} is not aligned to the cluster size ${clusterSize}`);
  if (entries > 0 && offset === 0) throw corrupt(`${filename}: ${what} offset is 0 but it has ${entries} entries`);
  if (offset + entries * entryLen > C.QCOW2_MAX_SAFE_OFFSET) {
    throw corrupt(`${filename}: ${what} at ${offset} with ${entries} entries ends beyond the largest offset`);
  }
}

/**
 * Parse and validate the header from the start of the file (at least the first cluster when
 * the magic and cluster_bits are valid). Throws invalidFormat / corrupt / unsupported.
 */
export function parseHeader(buf: Buffer, filename: string): Qcow2Header {
  if (buf.length < C.QCOW2_V2_HEADER_LENGTH) throw invalidFormat(`${filename}: header is truncated (${buf.length} bytes)`);
  const magic = buf.readUInt32BE(C.HDR_MAGIC);
  if (magic !== C.QCOW_MAGIC) throw invalidFormat(`${filename}: not a qcow2 image (magic 0x${magic.toString(16)})`);
  const version = buf.readUInt32BE(C.HDR_VERSION);
  if (version !== 2 && version !== 3) throw unsupported(`${filename}: unsupported qcow2 version ${version} (2 and 3 are supported)`);
  const clusterBits = buf.readUInt32BE(C.HDR_CLUSTER_BITS);
  if (clusterBits < C.MIN_CLUSTER_BITS || clusterBits > C.MAX_CLUSTER_BITS) {
    throw corrupt(`${filename}: cluster_bits ${clusterBits} is outside ${C.MIN_CLUSTER_BITS}..${C.MAX_CLUSTER_BITS}`);
  }
  const cs = 2 ** clusterBits;
  if (buf.length < Math.min(cs, C.QCOW2_V3_HEADER_LENGTH)) throw invalidFormat(`${filename}: header is truncated (${buf.length} bytes)`);

  let headerLength: number = C.QCOW2_V2_HEADER_LENGTH;
  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder: number = C.DEFAULT_REFCOUNT_ORDER;
  let compressionType: number = C.QCOW2_COMPRESSION_TYPE_ZLIB;
  let headerTail = Buffer.alloc(0);
  if (version === 3) {
    headerLength = buf.readUInt32BE(C.HDR_HEADER_LENGTH);
    if (headerLength < C.QCOW2_V3_MIN_HEADER_LENGTH) {
      throw corrupt(`${filename}: header_length ${headerLength} is smaller than ${C.QCOW2_V3_MIN_HEADER_LENGTH}`);
    }
    // The spec asks for a multiple of 8; QEMU does not enforce it, and neither do we.
    if (headerLength > cs) throw corrupt(`${filename}: header_length ${headerLength} exceeds the cluster size ${cs}`);
    incompatibleFeatures = buf.readBigUInt64BE(C.HDR_INCOMPATIBLE_FEATURES);
    compatibleFeatures = buf.readBigUInt64BE(C.HDR_COMPATIBLE_FEATURES);
    autoclearFeatures = buf.readBigUInt64BE(C.HDR_AUTOCLEAR_FEATURES);
    refcountOrder = buf.readUInt32BE(C.HDR_REFCOUNT_ORDER);
    if (refcountOrder > C.MAX_REFCOUNT_ORDER) {
      throw corrupt(`${filename}: refcount_order ${refcountOrder} is larger than ${C.MAX_REFCOUNT_ORDER} (refcount_bits 64)`);
    }
    if (headerLength > C.HDR_COMPRESSION_TYPE) compressionType = buf.readUInt8(C.HDR_COMPRESSION_TYPE);
    if (headerLength > C.QCOW2_V3_HEADER_LENGTH) headerTail = Buffer.from(buf.subarray(C.QCOW2_V3_HEADER_LENGTH, headerLength));
  }
  // compression_type and its incompatible bit must agree (spec: "compression type").
  const hasCompressionBit = (incompatibleFeatures & C.QCOW2_INCOMPAT_COMPRESSION) !== 0n;
  if (compressionType !== C.QCOW2_COMPRESSION_TYPE_ZLIB && compressionType !== C.QCOW2_COMPRESSION_TYPE_ZSTD) {
    throw unsupported(`${filename}: unknown compression_type ${compressionType} (0 zlib, 1 zstd)`);
  }
  if (hasCompressionBit !== (compressionType !== C.QCOW2_COMPRESSION_TYPE_ZLIB)) {
    throw corrupt(`${filename}: compression_type ${compressionType} does not match the compression type incompatible bit`);
  }

  const backingFileOffset = u64(buf, C.HDR_BACKING_FILE_OFFSET, filename, 'backing_file_offset');
  const backingFileSize = buf.readUInt32BE(C.HDR_BACKING_FILE_SIZE);
  const size = u64(buf, C.HDR_SIZE, filename, 'size');
  const cryptMethod = buf.readUInt32BE(C.HDR_CRYPT_METHOD);
  if (cryptMethod > C.QCOW_CRYPT_LUKS) throw unsupported(`${filename}: crypt_method ${cryptMethod} is unknown`);
  const l1Size = buf.readUInt32BE(C.HDR_L1_SIZE);
  const l1TableOffset = u64(buf, C.HDR_L1_TABLE_OFFSET, filename, 'l1_table_offset');
  const refcountTableOffset = u64(buf, C.HDR_REFCOUNT_TABLE_OFFSET, filename, 'refcount_table_offset');
  const refcountTableClusters = buf.readUInt32BE(C.HDR_REFCOUNT_TABLE_CLUSTERS);
  const nbSnapshots = buf.readUInt32BE(C.HDR_NB_SNAPSHOTS);
  const snapshotsOffset = u64(buf, C.HDR_SNAPSHOTS_OFFSET, filename, 'snapshots_offset');

  // Tables (qcow2_do_open's checks, with QEMU's limits).
  if (refcountTableClusters === 0) throw corrupt(`${filename}: image does not contain a reference count table (refcount_table_clusters 0)`);
  if (refcountTableClusters * cs > C.QCOW_MAX_REFTABLE_SIZE) {
    throw corrupt(`${filename}: refcount_table_clusters ${refcountTableClusters} makes the refcount table larger than ${C.QCOW_MAX_REFTABLE_SIZE} bytes`);
  }
  checkTable(filename, 'refcount table', refcountTableOffset, refcountTableClusters * cs / C.REFTABLE_ENTRY_SIZE, C.REFTABLE_ENTRY_SIZE, cs);
  if (refcountTableOffset === 0) throw corrupt(`${filename}: refcount_table_offset is 0`);
  if (l1Size > C.QCOW_MAX_L1_SIZE / C.L1E_SIZE) {
    throw corrupt(`${filename}: l1_size ${l1Size} makes the active L1 table larger than ${C.QCOW_MAX_L1_SIZE} bytes`);
  }
  checkTable(filename, 'L1 table', l1TableOffset, l1Size, C.L1E_SIZE, cs);
  const neededL1 = sizeToL1(size, clusterBits);
  if (neededL1 > C.QCOW_MAX_L1_SIZE / C.L1E_SIZE) {
    throw corrupt(`${filename}: size ${size} needs ${neededL1} L1 entries, more than ${C.QCOW_MAX_L1_SIZE / C.L1E_SIZE}`);
  }
  if (l1Size < neededL1) throw corrupt(`${filename}: l1_size ${l1Size} is too small for size ${size} (needs ${neededL1})`);
  if (nbSnapshots > C.QCOW_MAX_SNAPSHOTS) throw corrupt(`${filename}: nb_snapshots ${nbSnapshots} is more than ${C.QCOW_MAX_SNAPSHOTS}`);
  checkTable(filename, 'snapshot table', snapshotsOffset, nbSnapshots, C.QCOW2_SNAPSHOT_HEADER_SIZE, cs);

  // Backing file name: inside the first cluster, at most 1023 bytes (QEMU's checks; it may
  // overlap the header fields, which QEMU accepts too).
  let backingFile: string | null = null;
  if (backingFileOffset > cs) throw corrupt(`${filename}: Invalid backing file offset (backing_file_offset ${backingFileOffset} is past the first cluster, ${cs} bytes)`);
  if (backingFileOffset !== 0) {
    if (backingFileSize > Math.min(C.QCOW2_MAX_BACKING_FILE_NAME, cs - backingFileOffset)) {
      throw corrupt(`${filename}: Backing file name too long (backing_file_size ${backingFileSize} at offset ${backingFileOffset}: at most ${C.QCOW2_MAX_BACKING_FILE_NAME} bytes, inside the first cluster)`);
    }
    if (backingFileOffset + backingFileSize > buf.length) throw invalidFormat(`${filename}: header cluster is truncated`);
    backingFile = buf.toString('utf8', backingFileOffset, backingFileOffset + backingFileSize);
  }

  const h: Qcow2Header = {
    // QEMU counts the disk in 512-byte sectors (bs->total_sectors = size / 512): a size that
    // is not a multiple of 512 is cut down to one, for reads, `info`, `convert` and any
    // header rewrite alike (docs/qcow2.md, "Deliberate differences and limits").
    version: version as 2 | 3, backingFileOffset, backingFileSize, clusterBits,
    size: Math.floor(size / C.QCOW2_SECTOR_SIZE) * C.QCOW2_SECTOR_SIZE, cryptMethod, l1Size,
    l1TableOffset, refcountTableOffset, refcountTableClusters, nbSnapshots, snapshotsOffset,
    incompatibleFeatures, compatibleFeatures, autoclearFeatures, refcountOrder, headerLength,
    compressionType, headerTail, backingFile, backingFormat: null, dataFile: null, featureNames: [],
    bitmaps: null, bitmapsIgnored: false, cryptoHeader: null, unknownExtensions: [],
  };
  const extEnd = backingFileOffset !== 0 ? backingFileOffset : cs;
  parseExtensions(h, buf, headerLength, extEnd, filename);
  return h;
}

/**
 * Header extensions between the header and `end` (spec: "Header extensions"): the backing
 * file name, or the end of the first cluster. Validated as QEMU's qcow2_read_extensions
 * does, with its messages: an extension (or the 8 bytes of its magic and length) reaching
 * past `end` is "Header extension too large", even the end marker.
 */
function parseExtensions(h: Qcow2Header, buf: Buffer, start: number, end: number, filename: string): void {
  let pos = start;
  const cs = clusterSize(h);
  const limit = end === cs ? `the end of the header cluster (${cs} bytes)` : `the backing file name at ${end}`;
  while (pos < end) {
    if (pos + 8 > end || pos + 8 > buf.length) {
      throw corrupt(`${filename}: Header extension too large (the extension header at ${pos} runs past ${limit})`);
    }
    const magic = buf.readUInt32BE(pos);
    const len = buf.readUInt32BE(pos + 4);
    pos += 8;
    if (len > end - pos || pos + len > buf.length) {
      throw corrupt(`${filename}: Header extension too large (extension 0x${magic.toString(16)} at ${pos - 8}, length ${len}, runs past ${limit})`);
    }
    if (magic === C.QCOW2_EXT_MAGIC_END) return;
    const data = buf.subarray(pos, pos + len);
    switch (magic) {
      case C.QCOW2_EXT_MAGIC_BACKING_FORMAT:
        // QEMU keeps the format name in a 16-byte buffer.
        if (len >= 16) throw corrupt(`${filename}: backing format extension length ${len} is too large (at most 15)`);
        h.backingFormat = data.toString('utf8').replace(/\0+$/, '');
        break;
      case C.QCOW2_EXT_MAGIC_FEATURE_TABLE:
        for (let e = 0; e + C.QCOW2_FEATURE_NAME_ENTRY_SIZE <= len; e += C.QCOW2_FEATURE_NAME_ENTRY_SIZE) {
          const nameBytes = data.subarray(e + 2, e + C.QCOW2_FEATURE_NAME_ENTRY_SIZE);
          const nul = nameBytes.indexOf(0);
          h.featureNames.push({
            type: data[e], bit: data[e + 1],
            name: nameBytes.toString('utf8', 0, nul < 0 ? nameBytes.length : nul),
          });
        }
        break;
      case C.QCOW2_EXT_MAGIC_BITMAPS:
        parseBitmapsExtension(h, data, filename);
        break;
      case C.QCOW2_EXT_MAGIC_DATA_FILE:
        h.dataFile = data.toString('utf8');
        break;
      case C.QCOW2_EXT_MAGIC_CRYPTO_HEADER:
        // Spec: "Full disk encryption header pointer": LUKS only, 16 bytes, cluster aligned.
        if (h.cryptMethod !== C.QCOW_CRYPT_LUKS) throw corrupt(`${filename}: CRYPTO header extension only expected with LUKS encryption method`);
        if (len !== C.QCOW2_CRYPTO_HEADER_EXT_SIZE) {
          throw corrupt(`${filename}: CRYPTO header extension size ${len}, but expected size ${C.QCOW2_CRYPTO_HEADER_EXT_SIZE}`);
        }
        if (data.readBigUInt64BE(0) % BigInt(cs) !== 0n) {
          throw corrupt(`${filename}: Encryption header offset '${data.readBigUInt64BE(0)}' is not a multiple of cluster size '${cs}'`);
        }
        h.cryptoHeader = Buffer.from(data);
        break;
      default:
        h.unknownExtensions.push({ magic, data: Buffer.from(data) });
    }
    pos += (len + 7) & ~7;
  }
}

/**
 * The bitmaps extension (spec: "Bitmaps extension"), QEMU's checks in QEMU's order. Without
 * the autoclear bit it was left by a program that did not keep the bitmaps: it is ignored
 * (its clusters leak) and a writable open drops it. The directory itself is read and
 * checked by bitmaps.ts.
 */
function parseBitmapsExtension(h: Qcow2Header, data: Buffer, filename: string): void {
  const cs = clusterSize(h);
  if (data.length !== C.QCOW2_BITMAPS_EXT_SIZE) {
    throw corrupt(`${filename}: bitmaps_ext: Invalid extension length (${data.length}, must be ${C.QCOW2_BITMAPS_EXT_SIZE})`);
  }
  if (!(h.autoclearFeatures & C.QCOW2_AUTOCLEAR_BITMAPS)) {
    h.bitmapsIgnored = true;
    return;
  }
  const nbBitmaps = data.readUInt32BE(0);
  if (data.readUInt32BE(4) !== 0) throw corrupt(`${filename}: bitmaps_ext: Reserved field is not zero`);
  const dirSize = data.readBigUInt64BE(8);
  const dirOffset = data.readBigUInt64BE(16);
  if (nbBitmaps > C.QCOW2_MAX_BITMAPS) {
    throw corrupt(`${filename}: bitmaps_ext: Image has ${nbBitmaps} bitmaps, exceeding the QEMU supported maximum of ${C.QCOW2_MAX_BITMAPS}`);
  }
  if (nbBitmaps === 0) throw corrupt(`${filename}: found bitmaps extension with zero bitmaps`);
  if (dirOffset % BigInt(cs) !== 0n) throw corrupt(`${filename}: bitmaps_ext: invalid bitmap directory offset (${dirOffset} is not cluster aligned)`);
  if (dirSize > BigInt(C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE)) {
    throw corrupt(`${filename}: bitmaps_ext: bitmap directory size (${dirSize}) exceeds the maximum supported size (${C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE})`);
  }
  // An aligned offset past 2^53 lies past any file; it reads as zeros, as QEMU reads past EOF.
  const offset = dirOffset > BigInt(C.QCOW2_MAX_SAFE_OFFSET) ? 2 ** 53 - cs : Number(dirOffset);
  h.bitmaps = { nbBitmaps, bitmapDirectorySize: Number(dirSize), bitmapDirectoryOffset: offset };
}

function extension(magic: number, data: Buffer): Buffer {
  const out = Buffer.alloc(8 + ((data.length + 7) & ~7));
  out.writeUInt32BE(magic, 0);
  out.writeUInt32BE(data.length, 4);
  data.copy(out, 8);
  return out;
}

/** Feature table to write: QEMU's, plus entries the image had for bits QEMU does not name. */
function featureTableFor(h: Qcow2Header): Qcow2FeatureName[] {
  const table = defaultFeatureNames();
  for (const f of h.featureNames) {
    if (!table.some((t) => t.type === f.type && t.bit === f.bit)) table.push(f);
  }
  return table;
}

/**
 * The header, its extensions (in QEMU's order: backing format, data file, crypto, feature
 * table, bitmaps, unknown ones, end) and the backing file name, as QEMU's
 * qcow2_update_header lays them out. Updates h.backingFileOffset/backingFileSize/headerLength.
 * Throws when it does not fit in one cluster.
 */
export function serializeHeader(h: Qcow2Header): Buffer {
  const cs = clusterSize(h);
  const headerLength = h.version === 2 ? C.QCOW2_V2_HEADER_LENGTH : Math.max(C.QCOW2_V3_HEADER_LENGTH, h.headerLength);
  const fixed = Buffer.alloc(headerLength);
  fixed.writeUInt32BE(C.QCOW_MAGIC, C.HDR_MAGIC);
  fixed.writeUInt32BE(h.version, C.HDR_VERSION);
  fixed.writeUInt32BE(h.clusterBits, C.HDR_CLUSTER_BITS);
  fixed.writeBigUInt64BE(BigInt(h.size), C.HDR_SIZE);
  fixed.writeUInt32BE(h.cryptMethod, C.HDR_CRYPT_METHOD);
  fixed.writeUInt32BE(h.l1Size, C.HDR_L1_SIZE);
  fixed.writeBigUInt64BE(BigInt(h.l1TableOffset), C.HDR_L1_TABLE_OFFSET);
  fixed.writeBigUInt64BE(BigInt(h.refcountTableOffset), C.HDR_REFCOUNT_TABLE_OFFSET);
  fixed.writeUInt32BE(h.refcountTableClusters, C.HDR_REFCOUNT_TABLE_CLUSTERS);
  fixed.writeUInt32BE(h.nbSnapshots, C.HDR_NB_SNAPSHOTS);
  fixed.writeBigUInt64BE(BigInt(h.snapshotsOffset), C.HDR_SNAPSHOTS_OFFSET);
  if (h.version === 3) {
    fixed.writeBigUInt64BE(h.incompatibleFeatures, C.HDR_INCOMPATIBLE_FEATURES);
    fixed.writeBigUInt64BE(h.compatibleFeatures, C.HDR_COMPATIBLE_FEATURES);
    fixed.writeBigUInt64BE(h.autoclearFeatures, C.HDR_AUTOCLEAR_FEATURES);
    fixed.writeUInt32BE(h.refcountOrder, C.HDR_REFCOUNT_ORDER);
    fixed.writeUInt32BE(headerLength, C.HDR_HEADER_LENGTH);
    fixed.writeUInt8(h.compressionType, C.HDR_COMPRESSION_TYPE);
    h.headerTail.copy(fixed, C.QCOW2_V3_HEADER_LENGTH, 0, Math.max(0, headerLength - C.QCOW2_V3_HEADER_LENGTH));
  }
  const parts: Buffer[] = [fixed];
  if (h.backingFormat) parts.push(extension(C.QCOW2_EXT_MAGIC_BACKING_FORMAT, Buffer.from(h.backingFormat)));
  if (h.dataFile !== null) parts.push(extension(C.QCOW2_EXT_MAGIC_DATA_FILE, Buffer.from(h.dataFile)));
  if (h.cryptoHeader) parts.push(extension(C.QCOW2_EXT_MAGIC_CRYPTO_HEADER, h.cryptoHeader));
  // QEMU leaves the (optional) feature name table out when the header cluster has no room.
  const roomForTable = (bytes: number) => {
    const rest = 8 + (h.bitmaps ? 8 + C.QCOW2_BITMAPS_EXT_SIZE : 0) +
      h.unknownExtensions.reduce((n, u) => n + 8 + ((u.data.length + 7) & ~7), 0) +
      (h.backingFile !== null ? Buffer.byteLength(h.backingFile) : 0);
    return parts.reduce((n, p) => n + p.length, 0) + 8 + bytes + rest <= cs;
  };
  if (h.version === 3 && roomForTable(featureTableFor(h).length * C.QCOW2_FEATURE_NAME_ENTRY_SIZE)) {
    const table = featureTableFor(h);
    const body = Buffer.alloc(table.length * C.QCOW2_FEATURE_NAME_ENTRY_SIZE);
    table.forEach((f, i) => {
      body[i * C.QCOW2_FEATURE_NAME_ENTRY_SIZE] = f.type;
      body[i * C.QCOW2_FEATURE_NAME_ENTRY_SIZE + 1] = f.bit;
      body.write(f.name.slice(0, C.QCOW2_FEATURE_NAME_LENGTH), i * C.QCOW2_FEATURE_NAME_ENTRY_SIZE + 2, 'utf8');
    });
    parts.push(extension(C.QCOW2_EXT_MAGIC_FEATURE_TABLE, body));
  }
  if (h.bitmaps) {
    const b = Buffer.alloc(C.QCOW2_BITMAPS_EXT_SIZE);
    b.writeUInt32BE(h.bitmaps.nbBitmaps, 0);
    b.writeBigUInt64BE(BigInt(h.bitmaps.bitmapDirectorySize), 8);
    b.writeBigUInt64BE(BigInt(h.bitmaps.bitmapDirectoryOffset), 16);
    parts.push(extension(C.QCOW2_EXT_MAGIC_BITMAPS, b));
  }
  for (const u of h.unknownExtensions) parts.push(extension(u.magic, u.data));
  parts.push(Buffer.alloc(8)); // end of header extensions
  let out = Buffer.concat(parts);
  if (h.backingFile !== null) {
    const name = Buffer.from(h.backingFile);
    if (name.length > C.QCOW2_MAX_BACKING_FILE_NAME) {
      throw corrupt(`backing file name is ${name.length} bytes, longer than ${C.QCOW2_MAX_BACKING_FILE_NAME}`);
    }
    h.backingFileOffset = out.length;
    h.backingFileSize = name.length;
    out = Buffer.concat([out, name]);
  } else {
    h.backingFileOffset = 0;
    h.backingFileSize = 0;
  }
  out.writeBigUInt64BE(BigInt(h.backingFileOffset), C.HDR_BACKING_FILE_OFFSET);
  out.writeUInt32BE(h.backingFileSize, C.HDR_BACKING_FILE_SIZE);
  if (out.length > cs) throw unsupported(`qcow2 header with extensions and backing file name is ${out.length} bytes, more than one cluster (${cs})`);
  h.headerLength = headerLength;
  return out;
}
