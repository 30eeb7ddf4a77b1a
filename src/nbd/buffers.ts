// Reusable buffers for READ replies and WRITE payloads.
//
// Allocating a fresh Buffer per request (4 KiB to 32 MiB) costs more than the request at high
// rates: large ArrayBuffers are mmap'd, page-faulted on first touch and unmapped by the GC, and
// V8's GC runs more often the more external memory churns. Buffers here come in power-of-two
// size classes (4 KiB .. 4 MiB of data) plus HEADROOM bytes for a reply header in front, so a
// 4 KiB read and its 16- or 28-byte header share one 4160-byte buffer and leave in one write.
//
// A buffer goes back to the pool only when nobody can touch it any more: a reply's once the
// socket has finished writing it (the write callback), a WRITE payload's once the backend has
// completed the write successfully. After an error the buffer is dropped instead: a layer that
// failed fast (Promise.all over pieces) may still have I/O in flight into or out of it.
//
// One pool per process, shared by every connection: memory kept idle is capped (RETAIN_BYTES)
// whatever the number of clients, and what is in use is bounded by the connections'
// in-flight limits as before.

/** Spare bytes in front of the data for a reply header (structured OFFSET_DATA needs 28). */
export const HEADROOM = 64;
const MIN_CLASS_BYTES = 4096;
const CLASSES = 11; // 4 KiB << 10 = 4 MiB
const MAX_POOLED_DATA = MIN_CLASS_BYTES << (CLASSES - 1);
/** Free buffers kept at most, over all classes (bytes). */
const RETAIN_BYTES = 32 * 1024 * 1024;

export class BufferPool {
  private readonly free: Buffer[][] = Array.from({ length: CLASSES }, () => []);
  private retained = 0;

  constructor(private readonly retainLimit = RETAIN_BYTES) {}

  /**
   * A buffer of at least `size` bytes (its length may be larger: slice what you need).
   * Sizes past the largest class are plain allocations that release() ignores.
   */
  acquire(size: number): Buffer {
    const k = classOf(size);
    if (k < 0) return Buffer.allocUnsafeSlow(size);
    const list = this.free[k];
    const b = list.pop();
    if (b) {
      this.retained -= b.length;
      return b;
    }
    return Buffer.allocUnsafeSlow((MIN_CLASS_BYTES << k) + HEADROOM);
  }

  /** Give back a buffer from acquire() (the whole buffer, not a slice of it). */
  release(b: Buffer): void {
    const k = classOf(b.length);
    if (k < 0 || b.length !== (MIN_CLASS_BYTES << k) + HEADROOM) return;
    if (this.retained + b.length > this.retainLimit) return;
    this.retained += b.length;
    this.free[k].push(b);
  }

  /** Drop every idle buffer (the last client went away). */
  trim(): void {
    for (const list of this.free) list.length = 0;
    this.retained = 0;
  }

  /** Idle bytes held (for tests). */
  get idleBytes(): number {
    return this.retained;
  }
}

/** Smallest class whose capacity holds `size` bytes, or -1 when none does. */
function classOf(size: number): number {
  if (size > MAX_POOLED_DATA + HEADROOM) return -1;
  let k = 0;
  while ((MIN_CLASS_BYTES << k) + HEADROOM < size) k++;
  return k;
}

export const bufferPool = new BufferPool();
