// memory protocol: an image held in a Buffer. For tests and scratch space; everything is
// "stable" the moment it is written, so it has nothing to flush.
import type { BlockDriver, BlockLimits, Extent } from '../block/driver.js';
import { BlockNode } from '../block/node.js';

export class MemoryDriver implements BlockDriver {
  readonly driverName = 'memory';
  readonly children = {};
  readonly caps = { fua: 'native', writeZeroes: 'native', discard: 'native' } as const;
  data: Buffer;

  constructor(size: number) {
    this.data = Buffer.alloc(size);
  }

  limits(): BlockLimits {
    return { requestAlignment: 1, maxTransfer: 1 << 30 };
  }

  getLength(): number {
    return this.data.length;
  }

  async pread(offset: number, buf: Buffer): Promise<void> {
    this.data.copy(buf, 0, offset, offset + buf.length);
  }

  async pwrite(offset: number, buf: Buffer): Promise<void> {
    buf.copy(this.data, offset);
  }

  async pwriteZeroes(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
  }

  async pdiscard(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, data: true, zero: false, allocated: true, hostOffset: offset }];
  }

  async truncate(length: number): Promise<void> {
    const next = Buffer.alloc(length);
    this.data.copy(next, 0, 0, Math.min(length, this.data.length));
    this.data = next;
  }

  async close(): Promise<void> {}
}

export function openMemory(size: number, name = 'memory', readOnly = false): BlockNode {
  return new BlockNode(new MemoryDriver(size), { filename: name, readOnly, noFlush: false });
}
