// Aligned bounce buffers for O_DIRECT.
//
// O_DIRECT needs the memory address aligned (statx dio_mem_align: 512 on this disk, up to
// 4096 on 4K-sector devices), and Node never hands out aligned Buffers. A WebAssembly.Memory
// is 64 KiB aligned, so one arena per process, carved into fixed-size slots, gives aligned
// memory without native code.
//
// Choices:
// - One arena per process, created on first use (buffered-only processes never pay for it).
//   Every Memory reserves ~10 GiB of address space, so there is exactly one, and it is never
//   grown: grow() would detach every Buffer already handed out.
// - 64 MiB arena of 1 MiB slots. 1 MiB is the largest piece one O_DIRECT syscall moves (the
//   file driver splits bigger requests), large enough that syscall overhead is small; 64
//   slots serve 64 requests in flight (an NBD client at queue depth 64) without waiting.
//   Slot starts are multiples of 1 MiB from a 64 KiB-aligned base, so every slot is 64 KiB
//   aligned, more than any device asks for. Pages are touched only when first used.
// - acquire() waits, first come first served, when every slot is in use, so memory stays
//   bounded under any load. A caller must hold at most one slot at a time and always release
//   it (try/finally), or waiting callers could deadlock.

export const SLOT_SIZE = 1 << 20;
export const SLOT_COUNT = 64;
const WASM_PAGE = 64 << 10;
/** Every slot is at least this aligned (the arena base is WebAssembly-page aligned). */
export const SLOT_ALIGNMENT = WASM_PAGE;

export class AlignedPool {
  readonly slotSize: number;
  readonly slotCount: number;
  private arena: ArrayBuffer | null = null;
  /** One Buffer view per slot, made once: acquire() allocates nothing. */
  private views: Buffer[] = [];
  private readonly free: number[] = [];
  private readonly inUse = new Set<number>();
  private readonly waiters: Array<(slot: number) => void> = [];

  constructor(slotSize = SLOT_SIZE, slotCount = SLOT_COUNT) {
    if (slotSize <= 0 || slotSize % WASM_PAGE !== 0) throw new RangeError(`slot size ${slotSize} must be a multiple of 64 KiB`);
    this.slotSize = slotSize;
    this.slotCount = slotCount;
  }

  /** Slots currently handed out (for tests and stats). */
  get busy(): number {
    return this.inUse.size;
  }

  /** A slot-sized Buffer whose address is SLOT_ALIGNMENT-aligned. Waits (FIFO) when all are busy. */
  acquire(): Promise<Buffer> {
    this.ensureArena();
    // release() hands slots straight to waiters, so a free slot means nobody is waiting.
    const slot = this.free.pop();
    if (slot !== undefined) {
      this.inUse.add(slot);
      return Promise.resolve(this.views[slot]);
    }
    return new Promise((resolve) => {
      this.waiters.push((s) => resolve(this.views[s]));
    });
  }

  /** A free slot now, or null when every slot is busy (then use acquire()). Saves a promise. */
  tryAcquire(): Buffer | null {
    this.ensureArena();
    const slot = this.free.pop();
    if (slot === undefined) return null;
    this.inUse.add(slot);
    return this.views[slot];
  }

  /** Give a slot back; it goes straight to the longest waiter, if any. */
  release(buf: Buffer): void {
    const slot = this.slotOf(buf);
    if (slot < 0 || !this.inUse.has(slot)) throw new Error('AlignedPool.release: buffer is not a slot in use from this pool');
    const next = this.waiters.shift();
    if (next) {
      next(slot); // stays in use, now by the waiter
    } else {
      this.inUse.delete(slot);
      this.free.push(slot);
    }
  }

  /** True when `buf` lies in this pool's arena at an address aligned to `align`. */
  isAligned(buf: Buffer, align: number): boolean {
    return this.arena !== null && buf.buffer === this.arena && buf.byteOffset % align === 0 && align <= SLOT_ALIGNMENT;
  }

  private slotOf(buf: Buffer): number {
    if (this.arena === null || buf.buffer !== this.arena || buf.byteOffset % this.slotSize !== 0) return -1;
    return buf.byteOffset / this.slotSize;
  }

  private ensureArena(): ArrayBuffer {
    if (this.arena) return this.arena;
    const pages = (this.slotSize * this.slotCount) / WASM_PAGE;
    const arena = new WebAssembly.Memory({ initial: pages, maximum: pages }).buffer;
    this.arena = arena;
    this.views = Array.from({ length: this.slotCount }, (_, i) => Buffer.from(arena, i * this.slotSize, this.slotSize));
    // Hand out low slots first (pop from the end), which keeps the touched memory small.
    for (let i = this.slotCount - 1; i >= 0; i--) this.free.push(i);
    return this.arena;
  }
}

/** The process-wide pool used by the file driver. */
export const alignedPool = new AlignedPool();
