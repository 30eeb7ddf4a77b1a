// The driver contract, data path: the one interface every protocol driver (file, memory,
// null), format driver (raw, qcow2) and filter (src/filters) implements. Drivers only do what
// their layer does; everything generic (bounds, alignment padding, splitting, FUA emulation,
// zero emulation, flush order, write generation, backing-chain walks) lives once in BlockNode
// (node.ts). Image management (backing file reference, make-empty, info) is a separate
// contract (image-management.ts) that filters pass down to their child.
//
// Buffers: a request carries one Buffer. Buffer.subarray() gives zero-copy views, so the
// iovec arrays of QEMU's preadv/pwritev are not needed to split a request.

import type { BlockNode } from './node.js';
import type { DirtyBitmap } from './dirty-bitmap.js';
import type { ChildEdge } from './edge.js';
import type { ImageManagement } from './image-management.js';

export type { DriverInfo, ImageManagement } from './image-management.js';

/** Request flags (bits). Each maps to an NBD command flag. */
export const REQ_FUA = 1 << 0; //         NBD_CMD_FLAG_FUA: stable before the request completes
export const REQ_MAY_UNMAP = 1 << 1; //   !NBD_CMD_FLAG_NO_HOLE: write-zeroes may punch a hole
export const REQ_NO_FALLBACK = 1 << 2; // NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than write zeros slowly
export const REQ_WRITE_COMPRESSED = 1 << 3; // (no NBD flag) convert -c: store compressed; whole clusters only

/** nbdkit-style three-valued capability: emulation, where needed, lives in BlockNode. */
export type Capability = 'none' | 'emulate' | 'native';

export interface BlockLimits {
  /** Offsets and lengths reaching the driver are multiples of this; BlockNode pads by RMW. */
  requestAlignment: number;
  /** Largest single request handed to the driver; BlockNode splits larger ones. */
  maxTransfer: number;
  /** Preferred request size (cluster size for qcow2); informational (NBD BLOCK_SIZE). */
  optimalTransfer?: number;
}

export interface DriverCaps {
  /** FUA on writes: 'native' means the driver honours REQ_FUA itself. Otherwise write+flush. */
  fua: Capability;
  /** pwriteZeroes: 'native' means efficient (and REQ_NO_FALLBACK may succeed). */
  writeZeroes: Capability;
  /** pdiscard does something (frees space); 'none' makes discard a no-op. */
  discard: Capability;
  /** REQ_WRITE_COMPRESSED accepted (cluster-aligned writes of whole clusters). */
  compressedWrites?: boolean;
}

/** One run of block status for one layer (QEMU's BDRV_BLOCK_* bits). */
export interface Extent {
  offset: number;
  length: number;
  /** BDRV_BLOCK_DATA: the range is backed by data in this layer (or below, see `allocated`). */
  data: boolean;
  /** BDRV_BLOCK_ZERO: the range reads as zeros. */
  zero: boolean;
  /** BDRV_BLOCK_ALLOCATED: this layer answers for the range; false means "ask the backing". */
  allocated: boolean;
  /** BDRV_BLOCK_OFFSET_VALID: where the range lives in the node named by `hostNode`. */
  hostOffset?: number;
  /** Filename of the node that holds the bytes at hostOffset (for `map` human output). */
  hostFile?: string;
}

/** Extents from a walk of a backing chain: depth 0 is the top. */
export interface ChainExtent extends Extent {
  depth: number;
}

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

/**
 * A driver's child edges by role. The edges are the driver's way to its children: it does
 * its I/O through them (`this.children.file.pread(...)`), never through a node it kept, so
 * a graph edit that moves the edge (graph-edit.ts) takes effect on the next request.
 * `backing: null` says "this format can have a backing file, and has none open"; the
 * property is writable so that graph-edit's setBacking can attach or drop one.
 */
export interface DriverChildren {
  file?: ChildEdge;
  backing?: ChildEdge | null;
  filtered?: ChildEdge;
}

export interface BlockDriver extends ImageManagement {
  /** Driver name as QEMU spells it: 'file', 'host_device', 'memory', 'null-co', 'raw', 'qcow2'. */
  readonly driverName: string;
  readonly children: DriverChildren;
  /** A filter (QEMU's is_filter): one `filtered` child, same guest content; chain walks pass through. */
  readonly isFilter?: boolean;
  /**
   * Read on every request. A driver whose answer depends on a child computes it from the
   * child each time (a getter), never copies it at open: the child may be replaced.
   */
  readonly caps: DriverCaps;
  limits(): BlockLimits;
  /** A child edge was moved to another node (graph-edit.ts): drop whatever was derived from it. */
  refreshLimits?(): void;
  getLength(): number;

  pread(offset: number, buf: Buffer): Promise<void>;
  pwrite(offset: number, buf: Buffer, flags: number): Promise<void>;
  /** Only called when caps.writeZeroes !== 'none'. May throw ENOTSUP for a given request. */
  pwriteZeroes?(offset: number, length: number, flags: number): Promise<void>;
  /** Only called when caps.discard !== 'none'. */
  pdiscard?(offset: number, length: number): Promise<void>;
  /** This layer only. Must cover at least one byte from `offset`; may return less than asked. */
  blockStatus?(offset: number, length: number): Promise<Extent[]>;
  /** Write the driver's own caches (qcow2 metadata) to its children. Runs even with no-flush. */
  flushToOs?(): Promise<void>;
  /** Make what reached this driver stable (fdatasync). Skipped when nothing was written. */
  flushToDisk?(): Promise<void>;
  truncate?(length: number, prealloc: Preallocation): Promise<void>;
  close(): Promise<void>;

  // Persistent dirty bitmaps (qcow2's bitmaps extension). The in-memory bitmaps live on the
  // BlockNode, which marks them on every write; the driver only loads and stores them.
  /**
   * The persistent bitmaps stored in the image, called once after open. On a writable open
   * the driver marks them in use in the image before returning (so a crash leaves them
   * visibly inconsistent); bitmaps already in use load with `inconsistent` set.
   */
  loadBitmaps?(): Promise<DirtyBitmap[]>;
  /**
   * Store these persistent bitmaps and mark them not in use (clean close). Inconsistent ones
   * are not written: what the image holds for them stays as it is, as do stored bitmaps not
   * in the list (QEMU's qcow2_store_persistent_dirty_bitmaps); removing one from the image
   * is removeStoredBitmap's job. Called by BlockNode.close() before the final flush.
   */
  storeBitmaps?(bitmaps: readonly DirtyBitmap[]): Promise<void>;
  /**
   * Throws a VdiskError (QEMU's message) when a new persistent bitmap of this name and
   * granularity could not be stored next to `persistent`, the node's other persistent
   * bitmaps (QMP block-dirty-bitmap-add persistent=true, `vdisk bitmap --add`); without it
   * the driver counts the bitmaps stored in the image. The caller checks that the name is
   * free on the node first.
   */
  checkBitmapStorable?(name: string, granularity: number, persistent?: readonly DirtyBitmap[]): void;
  /** Remove one persistent bitmap from the image now (QMP block-dirty-bitmap-remove); absent is no error. */
  removeStoredBitmap?(name: string): Promise<void>;
}

/** What a format driver gets when it is opened on top of its file node. */
export interface FormatOpenContext {
  filename: string;
  readOnly: boolean;
  /** Driver-specific options (-o / --image-opts style), e.g. 'l2-cache-size'. */
  options: Record<string, string>;
  /** Open a backing file; relative names are resolved against `filename`'s directory. */
  openBacking(name: string, format: string | undefined): Promise<BlockNode>;
  /** When false, do not open the backing file at all (qemu-img info, rebase -u). */
  wantBacking: boolean;
}

export interface FormatCreateContext {
  filename: string;
  size: number;
  options: Record<string, string>;
  backingFile?: string;
  backingFormat?: string;
  /** Opens the backing file to learn its size when SIZE is not given. */
  openBacking(name: string, format: string | undefined): Promise<BlockNode>;
}

export interface FormatDriverFactory {
  readonly name: string;
  /** Score 0..100 that `head` (first 2 KiB of the file) is this format. */
  probe(head: Buffer, filename: string): number;
  open(file: BlockNode, ctx: FormatOpenContext): Promise<BlockDriver>;
  /** Lay a new empty image onto an already created (empty, writable) file node. */
  create?(file: BlockNode, ctx: FormatCreateContext): Promise<void>;
  /** Options `create -o` accepts, for error messages and help. */
  readonly createOptions: readonly string[];
}
