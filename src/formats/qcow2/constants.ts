// qcow2 on-disk constants, under the names of QEMU's docs/interop/qcow2.txt and block/qcow2.h.
// Every multi-byte field on disk is big-endian. Limits are QEMU's (block/qcow2.h), so an image
// we accept QEMU accepts, and a hostile image cannot make us allocate or loop without bound.

/** "QFI\xfb" (spec: Header, bytes 0-3). */
export const QCOW_MAGIC = 0x514649fb;

// ---- header field offsets (spec: "Header") ---------------------------------------------
export const HDR_MAGIC = 0;
export const HDR_VERSION = 4;
export const HDR_BACKING_FILE_OFFSET = 8;
export const HDR_BACKING_FILE_SIZE = 16;
export const HDR_CLUSTER_BITS = 20;
export const HDR_SIZE = 24;
export const HDR_CRYPT_METHOD = 32;
export const HDR_L1_SIZE = 36;
export const HDR_L1_TABLE_OFFSET = 40;
export const HDR_REFCOUNT_TABLE_OFFSET = 48;
export const HDR_REFCOUNT_TABLE_CLUSTERS = 56;
export const HDR_NB_SNAPSHOTS = 60;
export const HDR_SNAPSHOTS_OFFSET = 64;
// version 3 only
export const HDR_INCOMPATIBLE_FEATURES = 72;
export const HDR_COMPATIBLE_FEATURES = 80;
export const HDR_AUTOCLEAR_FEATURES = 88;
export const HDR_REFCOUNT_ORDER = 96;
export const HDR_HEADER_LENGTH = 100;
export const HDR_COMPRESSION_TYPE = 104;

/** Length of a version 2 header (fields up to snapshots_offset). */
export const QCOW2_V2_HEADER_LENGTH = 72;
/** Shortest version 3 header (header_length field must be at least this). */
export const QCOW2_V3_MIN_HEADER_LENGTH = 104;
/** The header QEMU writes for version 3: with compression_type and padding to 8 bytes. */
export const QCOW2_V3_HEADER_LENGTH = 112;

// ---- crypt_method ------------------------------------------------------------------------
export const QCOW_CRYPT_NONE = 0;
export const QCOW_CRYPT_AES = 1;
export const QCOW_CRYPT_LUKS = 2;

// ---- feature bits (spec: incompatible / compatible / autoclear features) ---------------
export const QCOW2_INCOMPAT_DIRTY_BITNR = 0;
export const QCOW2_INCOMPAT_CORRUPT_BITNR = 1;
export const QCOW2_INCOMPAT_DATA_FILE_BITNR = 2;
export const QCOW2_INCOMPAT_COMPRESSION_BITNR = 3;
export const QCOW2_INCOMPAT_EXTL2_BITNR = 4;
export const QCOW2_INCOMPAT_DIRTY = 1n << 0n;
export const QCOW2_INCOMPAT_CORRUPT = 1n << 1n;
export const QCOW2_INCOMPAT_DATA_FILE = 1n << 2n;
export const QCOW2_INCOMPAT_COMPRESSION = 1n << 3n;
export const QCOW2_INCOMPAT_EXTL2 = 1n << 4n;
/** Incompatible bits this driver implements (data file and extended L2 are refused). */
export const QCOW2_INCOMPAT_SUPPORTED = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_COMPRESSION;

export const QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR = 0;
export const QCOW2_COMPAT_LAZY_REFCOUNTS = 1n << 0n;

export const QCOW2_AUTOCLEAR_BITMAPS_BITNR = 0;
export const QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR = 1;
export const QCOW2_AUTOCLEAR_BITMAPS = 1n << 0n;
export const QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
/** Autoclear bits we keep on a writable open; every other one is cleared (spec: autoclear). */
export const QCOW2_AUTOCLEAR_SUPPORTED = QCOW2_AUTOCLEAR_BITMAPS;

/** Feature name table entry types (spec: "Feature name table"). */
export const QCOW2_FEAT_TYPE_INCOMPATIBLE = 0;
export const QCOW2_FEAT_TYPE_COMPATIBLE = 1;
export const QCOW2_FEAT_TYPE_AUTOCLEAR = 2;
/** Each entry: type (1), bit number (1), name (46, NUL padded). */
export const QCOW2_FEATURE_NAME_ENTRY_SIZE = 48;
export const QCOW2_FEATURE_NAME_LENGTH = 46;

// ---- compression_type (spec: header byte 104) -------------------------------------------
export const QCOW2_COMPRESSION_TYPE_ZLIB = 0;
export const QCOW2_COMPRESSION_TYPE_ZSTD = 1;
/** Raw deflate window used for zlib-compressed clusters (spec: "Compressed Clusters"). */
export const QCOW2_ZLIB_WINDOW_BITS = 12;

// ---- header extensions (spec: "Header extensions") --------------------------------------
export const QCOW2_EXT_MAGIC_END = 0x00000000;
export const QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xe2792aca;
export const QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803f857;
export const QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537be77;
export const QCOW2_EXT_MAGIC_BITMAPS = 0x23852875;
export const QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441;
/** Size of the full disk encryption header pointer extension body (offset, length). */
export const QCOW2_CRYPTO_HEADER_EXT_SIZE = 16;
/** Size of the bitmaps extension body (spec: "Bitmaps extension"). */
export const QCOW2_BITMAPS_EXT_SIZE = 24;
/** QEMU's QCOW2_MAX_BITMAPS and QCOW2_MAX_BITMAP_DIRECTORY_SIZE. */
export const QCOW2_MAX_BITMAPS = 65535;
export const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;

// ---- bitmaps (spec: "Bitmap directory", "Bitmap table"; QEMU's block/qcow2-bitmap.c) ----
/** Fixed part of a bitmap directory entry, before extra data and name. */
export const BME_DIR_ENTRY_FIXED_SIZE = 24;
/** Bitmap directory entry flags: in_use (bit 0), auto (bit 1); QEMU treats every other bit as reserved. */
export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
export const BME_RESERVED_FLAGS = 0xfffffffc;
/** The one bitmap type: dirty tracking. */
export const BT_DIRTY_TRACKING_BITMAP = 1;
/** QEMU's limits: table entries, bytes of bitmap data, granularity bits, name bytes. */
export const BME_MAX_TABLE_SIZE = 0x8000000;
export const BME_MAX_PHYS_SIZE = 0x20000000;
export const BME_MAX_GRANULARITY_BITS = 31;
export const BME_MIN_GRANULARITY_BITS = 9;
export const BME_MAX_NAME_SIZE = 1023;
export const BME_TABLE_ENTRY_SIZE = 8;
/** Bitmap table entry: bits 1-8 and 56-63 reserved, 9-55 the data cluster offset, bit 0 "all ones" when the offset is 0. */
export const BME_TABLE_ENTRY_RESERVED_MASK = 0xff000000000001fen;
export const BME_TABLE_ENTRY_OFFSET_MASK = 0x00fffffffffffe00n;
export const BME_TABLE_ENTRY_FLAG_ALL_ONES = 1n;

// ---- table entries (spec: "Cluster mapping", "Host cluster management") ----------------
/** L1/L2 entry bit 63: refcount is exactly one, the cluster may be written in place. */
export const QCOW_OFLAG_COPIED = 1n << 63n;
/** L2 entry bit 62: compressed cluster descriptor follows. */
export const QCOW_OFLAG_COMPRESSED = 1n << 62n;
/** L2 entry bit 0 (version 3): the cluster reads as zeros. */
export const QCOW_OFLAG_ZERO = 1n << 0n;
/** L1 entry bits 9-55: offset of the L2 table. */
export const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
/** Standard L2 entry bits 9-55: host cluster offset. */
export const L2E_OFFSET_MASK = 0x00fffffffffffe00n;
/** Refcount table entry bits 9-63: offset of the refcount block. */
export const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
/** Bits of an L1 entry that must be zero (0-8, 56-62). */
export const L1E_RESERVED_MASK = 0x7f000000000001ffn;
/** Bits of a standard L2 entry that must be zero (1-8, 56-61). */
export const L2E_STD_RESERVED_MASK = 0x3f000000000001fen;
/** Bits of a refcount table entry that must be zero (0-8). */
export const REFT_RESERVED_MASK = 0x1ffn;

// The same masks as two 32-bit halves, for the hot path (entries are read as hi/lo words).
export const QCOW_OFLAG_COPIED_HI = 0x80000000;
export const QCOW_OFLAG_COMPRESSED_HI = 0x40000000;
export const QCOW_OFLAG_ZERO_LO = 0x1;
/** Offset bits 32-55 in the high word. */
export const OFFSET_MASK_HI = 0x00ffffff;
/** Offset bits 9-31 in the low word. */
export const OFFSET_MASK_LO = 0xfffffe00;

/** QEMU counts disk sizes in 512-byte sectors (BDRV_SECTOR_SIZE). */
export const QCOW2_SECTOR_SIZE = 512;
/** Compressed cluster descriptor sectors are 512 bytes (spec: "Compressed Clusters"). */
export const QCOW2_COMPRESSED_SECTOR_SIZE = 512;

export const L1E_SIZE = 8;
export const L2E_SIZE_NORMAL = 8;
export const L2E_SIZE_EXTENDED = 16;
export const REFTABLE_ENTRY_SIZE = 8;

// ---- limits (block/qcow2.h) -------------------------------------------------------------
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const DEFAULT_CLUSTER_SIZE = 65536;
/** refcount_order 0..6 = refcount_bits 1..64. */
export const MAX_REFCOUNT_ORDER = 6;
export const DEFAULT_REFCOUNT_ORDER = 4;
/** QCOW_MAX_L1_SIZE: 32 MiB of L1 table (4 Mi entries). */
export const QCOW_MAX_L1_SIZE = 32 * 1024 * 1024;
/** QCOW_MAX_REFTABLE_SIZE: 8 MiB of refcount table. */
export const QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024;
export const QCOW_MAX_SNAPSHOTS = 65536;
/** QCOW_MAX_SNAPSHOTS_SIZE: the whole snapshot table. */
export const QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS;
/** QCOW_MAX_SNAPSHOT_EXTRA_DATA: per-snapshot extra data QEMU accepts. */
export const QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024;
/** Backing file names longer than this are refused (QEMU's bs->backing_file is 1024 bytes). */
export const QCOW2_MAX_BACKING_FILE_NAME = 1023;
/** Largest header extension body we read (it must fit in the first cluster anyway). */
export const QCOW2_MAX_EXTENSION_SIZE = 1 << MAX_CLUSTER_BITS;
/** Offsets in the header must be below 2^63 (QEMU: "offset must be less than INT64_MAX"). */
export const QCOW2_MAX_OFFSET = 2n ** 63n;
/** JS numbers are exact to 2^53; we refuse host offsets at or beyond (no real file is that big). */
export const QCOW2_MAX_SAFE_OFFSET = Number.MAX_SAFE_INTEGER;

// ---- snapshot table (spec: "Snapshots") -------------------------------------------------
/** Fixed part of a snapshot table entry, before extra data, id and name. */
export const QCOW2_SNAPSHOT_HEADER_SIZE = 40;
/** Extra data: vm_state_size_large (8), disk_size (8); version 3 requires both. */
export const QCOW2_SNAPSHOT_EXTRA_MIN_V3 = 16;
/** Extra data with icount (8 more). */
export const QCOW2_SNAPSHOT_EXTRA_WITH_ICOUNT = 24;

// ---- metadata cache defaults (block/qcow2.h) -------------------------------------------
/** Default ceiling of the L2 cache: covers the whole disk up to this many bytes of L2 tables. */
export const DEFAULT_L2_CACHE_MAX_SIZE = 32 * 1024 * 1024;
/** At least two L2 tables (COW may touch two). */
export const MIN_L2_CACHE_SIZE = 2;
/** At least four refcount blocks (refcount table growth may touch that many). */
export const MIN_REFCOUNT_CACHE_SIZE = 4;
