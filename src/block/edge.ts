// Child edges of the block graph (QEMU's BdrvChild). A parent (a BlockNode or a BlockBackend)
// never holds its child node directly: it holds an edge, and the edge knows both ends. That
// is what lets one graph operation (graph-edit.ts: replaceNode) move every parent of a node
// to another node while the parents keep running: a parent reads `edge.node` on each
// request, and does its I/O through the edge (QEMU's bdrv_co_preadv(BdrvChild *...)).
//
// Edges are created by whoever opens the child (a format driver for `file` and `backing`, a
// filter for `filtered`, a BlockBackend for `root`) and attached to their parent once the
// parent exists: a BlockNode attaches its driver's edges when it is constructed.
import type { BlockBackend } from './backend.js';
import type { Extent, Preallocation } from './driver.js';
import type { BlockNode } from './node.js';

/**
 * What a child is to its parent (QEMU's BdrvChildRole, reduced to the roles vdisk uses):
 * - `file`: the bytes a format driver lays out its image in (qcow2, raw over file-posix).
 * - `backing`: where unallocated ranges read from (QEMU's COW child).
 * - `filtered`: a filter's only child; chain walks pass through it (`skipFilters()`).
 * - `data`: an external data file (reserved: qcow2 data-file is not supported yet).
 * - `root`: a BlockBackend's node.
 */
export type ChildRole = 'file' | 'backing' | 'filtered' | 'data' | 'root';

/** The public I/O verbs of a node, which an edge forwards to the node it points at now. */
export interface BlockIo {
  readonly filename: string;
  getLength(): number;
  pread(offset: number, buf: Buffer): Promise<void>;
  pwrite(offset: number, buf: Buffer, flags?: number): Promise<void>;
  pwriteZeroes(offset: number, length: number, flags?: number): Promise<void>;
  pdiscard(offset: number, length: number): Promise<void>;
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  flush(): Promise<void>;
  truncate(length: number, prealloc?: Preallocation): Promise<void>;
}

export type EdgeParent = BlockNode | BlockBackend;

/** Parent edges of each node: the registry `BlockNode.parents` reads. */
const parentEdges = new WeakMap<BlockNode, Set<ChildEdge>>();

/** Every attached edge that points at `node` (from nodes and from BlockBackends). */
export function parentsOf(node: BlockNode): ChildEdge[] {
  const set = parentEdges.get(node);
  return set ? [...set] : [];
}

/** The same, without a copy (hot paths that only look). */
export function parentEdgeSet(node: BlockNode): ReadonlySet<ChildEdge> | undefined {
  return parentEdges.get(node);
}

function register(edge: ChildEdge, node: BlockNode): void {
  let set = parentEdges.get(node);
  if (!set) parentEdges.set(node, (set = new Set()));
  set.add(edge);
}

function unregister(edge: ChildEdge, node: BlockNode): void {
  parentEdges.get(node)?.delete(edge);
}

export interface ChildEdgeOptions {
  /**
   * Keep pointing at this node when the node is replaced (QEMU's stay_at_node): for a job's
   * own edges, e.g. a mirror job reading its source while the source is being replaced.
   */
  stayAtNode?: boolean;
}

export class ChildEdge implements BlockIo {
  readonly role: ChildRole;
  readonly stayAtNode: boolean;
  private current: BlockNode;
  private owner: EdgeParent | null = null;

  constructor(role: ChildRole, node: BlockNode, opts: ChildEdgeOptions = {}) {
    this.role = role;
    this.current = node;
    this.stayAtNode = opts.stayAtNode ?? false;
  }

  /** The child end: read it on every use, it changes when the graph is edited. */
  get node(): BlockNode {
    return this.current;
  }

  /** The parent end, or null before it is attached (or after it was detached). */
  get parent(): EdgeParent | null {
    return this.owner;
  }

  /** QEMU's child name: the role, which is unique among one parent's children here. */
  get name(): string {
    return this.role;
  }

  /** Called by the parent that adopts the edge (BlockNode's constructor, BlockBackend's). */
  attach(parent: EdgeParent): void {
    if (this.owner) throw new Error(`edge '${this.role}' to ${this.current.filename} is already attached`);
    this.owner = parent;
    register(this, this.current);
  }

  /** Cut the edge from its child (the parent is closing, or the edge is dropped). */
  detach(): void {
    if (!this.owner) return;
    unregister(this, this.current);
    this.owner = null;
  }

  /**
   * Point the edge at another node. Only graph-edit.ts calls this, inside a drained
   * section: everything else must go through replaceNode / replaceChild / setBacking.
   */
  moveTo(node: BlockNode): void {
    if (this.owner) {
      unregister(this, this.current);
      register(this, node);
    }
    this.current = node;
  }

  // ---- I/O through the edge (forwarded to the node it points at now) --------------------

  get filename(): string {
    return this.current.filename;
  }

  getLength(): number {
    return this.current.getLength();
  }

  pread(offset: number, buf: Buffer): Promise<void> {
    return this.current.pread(offset, buf);
  }

  pwrite(offset: number, buf: Buffer, flags = 0): Promise<void> {
    return this.current.pwrite(offset, buf, flags);
  }

  pwriteZeroes(offset: number, length: number, flags = 0): Promise<void> {
    return this.current.pwriteZeroes(offset, length, flags);
  }

  pdiscard(offset: number, length: number): Promise<void> {
    return this.current.pdiscard(offset, length);
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.current.blockStatus(offset, length);
  }

  flush(): Promise<void> {
    return this.current.flush();
  }

  truncate(length: number, prealloc: Preallocation = 'off'): Promise<void> {
    return this.current.truncate(length, prealloc);
  }
}
