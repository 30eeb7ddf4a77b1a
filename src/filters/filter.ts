// FilterDriver: the base of every filter (fault injection, throttle, copy-before-write). A
// filter has one child, its edge marked `filtered`, and shows the same guest content as the
// child; it overrides only the verbs it changes and forwards the rest, like an nbdkit filter
// calling `next` (server/filters.c) or QEMU's is_filter drivers (block/copy-before-write.c).
//
// Caps and limits are getters that ask the child each time, never copies: the child can be
// replaced under a live filter (graph-edit.ts), and a filter must then answer for the new one.
// Image management (changeBackingFile, makeEmpty, info) is not implemented here on purpose:
// BlockNode passes it to the filtered child. Chain walks (`bottom`, `blockStatusAbove`,
// `backingChainNext`) pass through filters via BlockNode.skipFilters().
import type { BlockDriver, BlockLimits, DriverCaps, Extent, Preallocation } from '../block/driver.js';
import { ChildEdge } from '../block/edge.js';
import type { BlockNode } from '../block/node.js';

export abstract class FilterDriver implements BlockDriver {
  abstract readonly driverName: string;
  readonly isFilter = true;
  readonly children: { filtered: ChildEdge };

  constructor(child: BlockNode) {
    this.children = { filtered: new ChildEdge('filtered', child) };
  }

  /** The edge to the filtered node: do I/O through it, it follows graph edits. */
  protected get child(): ChildEdge {
    return this.children.filtered;
  }

  get caps(): DriverCaps {
    return this.child.node.caps;
  }

  limits(): BlockLimits {
    return this.child.node.limits;
  }

  getLength(): number {
    return this.child.getLength();
  }

  pread(offset: number, buf: Buffer): Promise<void> {
    return this.child.pread(offset, buf);
  }

  pwrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    return this.child.pwrite(offset, buf, flags);
  }

  pwriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    return this.child.pwriteZeroes(offset, length, flags);
  }

  pdiscard(offset: number, length: number): Promise<void> {
    return this.child.pdiscard(offset, length);
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.child.blockStatus(offset, length);
  }

  truncate(length: number, prealloc: Preallocation): Promise<void> {
    return this.child.truncate(length, prealloc);
  }

  // No flushToDisk: BlockNode.flush() on the filter node recurses into the child.

  async close(): Promise<void> {}
}
