// The driver contract, image management: what a driver does to the image as a whole rather
// than to guest bytes (QEMU's bdrv_change_backing_file, bdrv_make_empty,
// bdrv_get_specific_info). Kept apart from the data path (driver.ts) because a filter has
// nothing of its own to say here: BlockNode passes these to a filter's child, so `info` or
// `rebase` on a node with a throttle or copy-before-write filter on top reach the format node.
//
// Every method is optional: a driver that lacks one does not support it (BlockNode answers
// ENOTSUP, or an empty info).

export interface ImageManagement {
  /** Rewrite the backing file reference in the image header (rebase, commit). null removes it. */
  changeBackingFile?(name: string | null, format: string | null): Promise<void>;
  /** Drop everything this layer allocates so reads fall through to the backing (commit). */
  makeEmpty?(): Promise<void>;
  /** Format-specific facts for `info` (qemu-img's "format-specific" data), and allocation size. */
  info?(): Promise<DriverInfo>;
}

export interface DriverInfo {
  /** qemu-img's `format-specific` object, e.g. {type:'qcow2', data:{compat:'1.1', ...}}. */
  formatSpecific?: { type: string; data: Record<string, unknown> };
  /** For `info`: the backing file name as stored, and its format. */
  backingFilename?: string;
  backingFormat?: string;
  fullBackingFilename?: string;
  clusterSize?: number;
  dirtyFlag?: boolean;
  corrupt?: boolean;
  /** Snapshots as qemu-img's JSON lists them. */
  snapshots?: Array<Record<string, unknown>>;
  /** Free-form lines for human output (e.g. "native addon: not loaded"). */
  notes?: string[];
}
