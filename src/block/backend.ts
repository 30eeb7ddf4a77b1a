// BlockBackend: what a client (CLI, NBD export, job) holds. It adds the one thing the cache
// mode decides above the graph: with cache.writeback=off the client sees no write cache, so
// every write carries FUA and completes only once stable. It also counts requests in
// flight so callers can drain before flush/close, and keeps simple statistics.
//
// The backend is a parent in the graph: its root is a ChildEdge (role `root`), so when a
// graph edit replaces the root node (snapshot, mirror pivot, filter insertion) the client
// follows it. While a node below is drained (graph-edit.ts), new requests wait here and
// resume after the edit, on whatever node the root edge points at then (QEMU's
// blk_wait_while_drained).
import { REQ_FUA, type ChainExtent, type Extent } from './driver.js';
import type { CacheOptions } from './cache-mode.js';
import { ChildEdge } from './edge.js';
import type { BlockNode } from './node.js';

export interface BackendOptions {
  /**
   * Requests do not wait while a node below is drained (QEMU's
   * blk_set_disable_request_queuing): for a job's own backend that must do I/O inside the
   * drained section it opened itself. Requests in flight are still waited for.
   */
  disableRequestQueuing?: boolean;
}

export interface BackendStats {
  readOps: number;
  writeOps: number;
  zeroOps: number;
  discardOps: number;
  flushOps: number;
  bytesRead: number;
  bytesWritten: number;
}

export class BlockBackend {
  readonly rootEdge: ChildEdge;
  readonly cache: CacheOptions;
  /** Writable when created on a writable node; a graph edit may not take that away. */
  readonly writable: boolean;
  readonly stats: BackendStats = {
    readOps: 0, writeOps: 0, zeroOps: 0, discardOps: 0, flushOps: 0, bytesRead: 0, bytesWritten: 0,
  };
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];
  /** drainedBegin() calls not yet ended: while > 0 new requests wait (unless queuing is off). */
  private quiesceCounter = 0;
  private resumeWaiters: Array<() => void> = [];
  private readonly queueRequests: boolean;
  private closed = false;

  constructor(root: BlockNode, cache: CacheOptions, opts: BackendOptions = {}) {
    this.rootEdge = new ChildEdge('root', root);
    this.rootEdge.attach(this);
    this.cache = cache;
    this.writable = !root.readOnly;
    this.queueRequests = !opts.disableRequestQueuing;
  }

  /** The node requests go to now (it changes when a graph edit replaces it). */
  get root(): BlockNode {
    return this.rootEdge.node;
  }

  /** True when the client sees a volatile write cache (NBD: SEND_FLUSH and SEND_FUA). */
  get hasWriteCache(): boolean {
    return this.cache.writeback;
  }

  get readOnly(): boolean {
    return !this.writable || this.root.readOnly;
  }

  /** See BlockNode.zeroGeneration: changes when data under this backend may have become zeros. */
  get zeroGeneration(): number {
    return this.root.zeroGeneration;
  }

  getLength(): number {
    return this.root.getLength();
  }

  pread(offset: number, buf: Buffer): Promise<void> {
    this.stats.readOps++;
    this.stats.bytesRead += buf.length;
    return this.run(() => this.root.pread(offset, buf));
  }

  pwrite(offset: number, buf: Buffer, flags = 0): Promise<void> {
    this.stats.writeOps++;
    this.stats.bytesWritten += buf.length;
    return this.run(() => this.root.pwrite(offset, buf, this.writeFlags(flags)));
  }

  pwriteZeroes(offset: number, length: number, flags = 0): Promise<void> {
    this.stats.zeroOps++;
    return this.run(() => this.root.pwriteZeroes(offset, length, this.writeFlags(flags)));
  }

  pdiscard(offset: number, length: number): Promise<void> {
    this.stats.discardOps++;
    return this.run(() => this.root.pdiscard(offset, length));
  }

  flush(): Promise<void> {
    this.stats.flushOps++;
    return this.run(() => this.root.flush());
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.run(() => this.root.blockStatus(offset, length));
  }

  blockStatusAbove(offset: number, length: number): Promise<ChainExtent[]> {
    return this.run(() => this.root.blockStatusAbove(offset, length));
  }

  /** Resolves once no request is in flight. */
  drain(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Requests running now (not counting those waiting for a drained section to end). */
  get requestsInFlight(): number {
    return this.inFlight;
  }

  /** graph-edit.ts: new requests wait from now on (nests). */
  drainedBegin(): void {
    this.quiesceCounter++;
  }

  /** graph-edit.ts: ends one drainedBegin(); the last one lets waiting requests go. */
  drainedEnd(): void {
    if (this.quiesceCounter === 0) throw new Error('BlockBackend.drainedEnd without drainedBegin');
    if (--this.quiesceCounter > 0) return;
    const waiters = this.resumeWaiters;
    this.resumeWaiters = [];
    for (const w of waiters) w();
  }

  get quiesced(): boolean {
    return this.quiesceCounter > 0;
  }

  /**
   * Drain, detach from the root, and close the root unless another parent still uses it
   * (another backend on the same node, or a node above after a graph edit).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.drain();
    this.closed = true;
    const root = this.root;
    this.rootEdge.detach();
    if (root.parents.length === 0) await root.close();
  }

  private writeFlags(flags: number): number {
    return this.cache.writeback ? flags : flags | REQ_FUA;
  }

  private async run<T>(op: () => Promise<T>): Promise<T> {
    // Checked and counted in the same turn: a drain that begins later sees this request.
    while (this.quiesceCounter > 0 && this.queueRequests) {
      await new Promise<void>((resolve) => this.resumeWaiters.push(resolve));
    }
    this.inFlight++;
    try {
      return await op();
    } finally {
      if (--this.inFlight === 0 && this.idleWaiters.length > 0) {
        const waiters = this.idleWaiters;
        this.idleWaiters = [];
        for (const w of waiters) w();
      }
    }
  }
}
