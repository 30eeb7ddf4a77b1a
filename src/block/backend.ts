// BlockBackend: what a client (CLI, NBD export) holds. It adds the one thing the cache mode
// decides above the graph: with cache.writeback=off the client sees no write cache, so
// every write carries FUA and completes only once stable. It also counts requests in
// flight so callers can drain before flush/close, and keeps simple statistics.
import { REQ_FUA, type ChainExtent, type Extent } from './driver.js';
import type { CacheOptions } from './cache-mode.js';
import type { BlockNode } from './node.js';

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
  readonly root: BlockNode;
  readonly cache: CacheOptions;
  readonly stats: BackendStats = {
    readOps: 0, writeOps: 0, zeroOps: 0, discardOps: 0, flushOps: 0, bytesRead: 0, bytesWritten: 0,
  };
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];

  constructor(root: BlockNode, cache: CacheOptions) {
    this.root = root;
    this.cache = cache;
  }

  /** True when the client sees a volatile write cache (NBD: SEND_FLUSH and SEND_FUA). */
  get hasWriteCache(): boolean {
    return this.cache.writeback;
  }

  get readOnly(): boolean {
    return this.root.readOnly;
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

  async close(): Promise<void> {
    await this.drain();
    await this.root.close();
  }

  private writeFlags(flags: number): number {
    return this.cache.writeback ? flags : flags | REQ_FUA;
  }

  private async run<T>(op: () => Promise<T>): Promise<T> {
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
