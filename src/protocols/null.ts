// null-co protocol (QEMU's null-co://): reads return zeros, writes are dropped. Used by
// benchmarks to measure the stack without the medium.
import type { BlockDriver, BlockLimits, Extent } from '../block/driver.js';
import { BlockNode } from '../block/node.js';

export const NULL_DEFAULT_SIZE = 1 << 30; // QEMU's null-co default

export class NullDriver implements BlockDriver {
  readonly driverName = 'null-co';
  readonly children = {};
  readonly caps = { fua: 'native', writeZeroes: 'native', discard: 'native' } as const;
  private length: number;

  constructor(size: number, private readonly readZeroes = true) {
    this.length = size;
  }

  limits(): BlockLimits {
    return { requestAlignment: 1, maxTransfer: 1 << 30 };
  }

  getLength(): number {
    return this.length;
  }

  async pread(_offset: number, buf: Buffer): Promise<void> {
    if (this.readZeroes) buf.fill(0);
  }

  async pwrite(): Promise<void> {}
  async pwriteZeroes(): Promise<void> {}
  async pdiscard(): Promise<void> {}

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, data: false, zero: this.readZeroes, allocated: true }];
  }

  async truncate(length: number): Promise<void> {
    this.length = length;
  }

  async close(): Promise<void> {}
}

export function openNull(size = NULL_DEFAULT_SIZE, readOnly = false): BlockNode {
  return new BlockNode(new NullDriver(size), { filename: 'null-co://', readOnly, noFlush: false });
}
