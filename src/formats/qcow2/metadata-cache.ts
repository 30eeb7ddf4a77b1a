// Dirty-tracking LRU of one-cluster metadata tables (QEMU's block/qcow2-cache.c): one for L2
// tables, one for refcount blocks. Dirty tables are written back on eviction and on flush.
//
// Ordering is declared, not implied (qcow2_cache_set_dependency): before this cache writes
// anything back, the cache it depends on is flushed (its tables written and the file child
// flushed). `dependsOnFlush` asks only for the file flush (data before the L2 entry that
// points to it, after a COW).
import type { BlockIo } from '../../block/edge.js';

interface Entry {
  offset: number;
  buf: Buffer;
  dirty: boolean;
  pins: number;
  /** Last use (QEMU's lru_counter): eviction takes the unpinned entry with the smallest. */
  lru: number;
  /** Set while the table is being read from the file. */
  loading: Promise<void> | null;
}

export class MetadataCache {
  private readonly entries = new Map<number, Entry>();
  private clock = 0;
  private dependsOn: MetadataCache | null = null;
  private dependsOnFlush = false;

  constructor(
    readonly name: string,
    private readonly file: BlockIo,
    readonly tableSize: number,
    readonly capacity: number,
  ) {}

  /** Declare that this cache's tables must not reach the file before `other`'s. */
  async setDependency(other: MetadataCache): Promise<void> {
    if (this.dependsOn === other) return;
    // Keep the dependency graph acyclic (QEMU does the same): settle older ones first.
    if (other.dependsOn || other.dependsOnFlush) await other.flushDependency();
    if (this.dependsOn) await this.flushDependency();
    this.dependsOn = other;
  }

  /** Data written before now must be stable before any table of this cache is written. */
  setDependsOnFlush(): void {
    this.dependsOnFlush = true;
  }

  private async flushDependency(): Promise<void> {
    const dep = this.dependsOn;
    if (dep) {
      await dep.flush();
    } else if (this.dependsOnFlush) {
      await this.file.flush();
    }
    this.dependsOn = null;
    this.dependsOnFlush = false;
  }

  /**
   * The table at `offset` if it is cached and loaded, else null; not pinned, so the caller
   * must be done with it before its next await (the lock-free read mapping).
   */
  peek(offset: number): Buffer | null {
    const hit = this.entries.get(offset);
    if (!hit || hit.loading) return null;
    hit.lru = ++this.clock;
    return hit.buf;
  }

  /** The table at `offset`, pinned, if it is cached and loaded; else null (then use get()). */
  getSync(offset: number): Buffer | null {
    const hit = this.entries.get(offset);
    if (!hit || hit.loading) return null;
    hit.lru = ++this.clock;
    hit.pins++;
    return hit.buf;
  }

  /** True when writing this cache back already waits for `other` (setDependency would do nothing). */
  dependsOnCache(other: MetadataCache): boolean {
    return this.dependsOn === other;
  }

  /** Get the table at `offset`, reading it if needed. Pin it until release(). */
  async get(offset: number): Promise<Buffer> {
    const hit = this.entries.get(offset);
    if (hit) {
      hit.lru = ++this.clock;
      hit.pins++;
      if (hit.loading) {
        try {
          await hit.loading;
        } catch (err) {
          hit.pins--;
          throw err;
        }
      }
      return hit.buf;
    }
    await this.makeRoom();
    const again = this.entries.get(offset); // someone else may have loaded it meanwhile
    if (again) return this.get(offset);
    const buf = Buffer.alloc(this.tableSize);
    const e: Entry = { offset, buf, dirty: false, pins: 1, lru: ++this.clock, loading: null };
    e.loading = this.file.pread(offset, buf);
    this.entries.set(offset, e);
    try {
      await e.loading;
    } catch (err) {
      this.entries.delete(offset);
      throw err;
    } finally {
      e.loading = null;
    }
    return buf;
  }

  /** A new, zeroed table at `offset` (just allocated: nothing to read). Pinned and dirty. */
  async getEmpty(offset: number): Promise<Buffer> {
    const old = this.entries.get(offset);
    if (old && !old.loading) {
      old.buf.fill(0);
      old.dirty = true;
      old.pins++;
      old.lru = ++this.clock;
      return old.buf;
    }
    if (old) this.entries.delete(offset); // a stale read of a freed table: forget it
    await this.makeRoom();
    const e: Entry = { offset, buf: Buffer.alloc(this.tableSize), dirty: true, pins: 1, lru: ++this.clock, loading: null };
    this.entries.set(offset, e);
    return e.buf;
  }

  release(offset: number): void {
    const e = this.entries.get(offset);
    if (e && e.pins > 0) e.pins--;
  }

  markDirty(offset: number): void {
    const e = this.entries.get(offset);
    if (e) e.dirty = true;
  }

  /** Forget a table whose cluster was freed (its contents no longer matter). */
  discard(offset: number): void {
    const e = this.entries.get(offset);
    if (e && e.pins === 0) this.entries.delete(offset);
    else if (e) e.dirty = false;
  }

  /** Forget everything clean (after the tables were rewritten behind the cache's back). */
  dropClean(): void {
    for (const [off, e] of this.entries) if (!e.dirty && e.pins === 0) this.entries.delete(off);
  }

  get dirtyCount(): number {
    let n = 0;
    for (const e of this.entries.values()) if (e.dirty) n++;
    return n;
  }

  private async makeRoom(): Promise<void> {
    while (this.entries.size >= this.capacity) {
      let victim: Entry | null = null;
      for (const e of this.entries.values()) {
        if (e.pins === 0 && !e.loading && (!victim || e.lru < victim.lru)) victim = e;
      }
      if (!victim) return; // everything pinned: grow past capacity for a moment
      if (victim.dirty) {
        await this.flushDependency();
        if (victim.dirty) await this.writeBack([victim]);
      }
      if (victim.pins === 0 && !victim.dirty) this.entries.delete(victim.offset);
    }
  }

  /** Write dirty tables in offset order, adjacent ones in one request. */
  private async writeBack(list: Entry[]): Promise<void> {
    list.sort((a, b) => a.offset - b.offset);
    let i = 0;
    while (i < list.length) {
      let j = i + 1;
      while (j < list.length && list[j].offset === list[j - 1].offset + this.tableSize) j++;
      // Clear before the write: a change made while it is in flight marks the entry dirty again.
      for (let k = i; k < j; k++) list[k].dirty = false;
      const data = j - i === 1 ? Buffer.from(list[i].buf) : Buffer.concat(list.slice(i, j).map((e) => e.buf));
      try {
        await this.file.pwrite(list[i].offset, data);
      } catch (err) {
        for (let k = i; k < j; k++) list[k].dirty = true;
        throw err;
      }
      i = j;
    }
  }

  /** Write every dirty table (after what this cache depends on), then flush the file. */
  async flush(): Promise<void> {
    await this.flushDependency();
    const dirty = [...this.entries.values()].filter((e) => e.dirty);
    if (dirty.length > 0) await this.writeBack(dirty);
    await this.file.flush();
  }

  /** Write dirty tables without the trailing file flush (used when the caller flushes). */
  async writeDirty(): Promise<void> {
    await this.flushDependency();
    const dirty = [...this.entries.values()].filter((e) => e.dirty);
    if (dirty.length > 0) await this.writeBack(dirty);
  }

  /** Offsets of every table currently cached (for the metadata overlap check). */
  offsets(): IterableIterator<number> {
    return this.entries.keys();
  }
}

/** A FIFO async mutex: the qcow2 metadata lock (QEMU's s->lock). Free: taken at once. */
export class Mutex {
  private locked = false;
  private readonly waiters: Array<() => void> = [];

  /** Someone holds the lock (or is being handed it): a metadata change may be half done. */
  get held(): boolean {
    return this.locked;
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.locked) await new Promise<void>((r) => this.waiters.push(r));
    else this.locked = true;
    try {
      return await fn();
    } finally {
      // Hand the lock to the next waiter directly (it stays locked), FIFO.
      const next = this.waiters.shift();
      if (next) next();
      else this.locked = false;
    }
  }
}
