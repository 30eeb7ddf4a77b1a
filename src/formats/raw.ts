// raw format: the image is the file, optionally a window [offset, offset+size) of it
// (QEMU's raw driver options `offset` and `size`). Size is kept exactly: no 512-byte rounding.
//
// Not a filter (its child is `file`, so chain walks stop at the raw node, as `info` expects),
// but like one it has no capabilities of its own: `caps` is derived from the file node's
// answer each time it changes, never copied at open.
import type {
  BlockDriver, BlockLimits, DriverCaps, Extent, FormatDriverFactory, FormatOpenContext, Preallocation,
} from '../block/driver.js';
import { ChildEdge } from '../block/edge.js';
import { invalidArgument, unsupported } from '../block/errors.js';
import type { BlockNode } from '../block/node.js';
import { parseSize } from '../block/size.js';

export class RawDriver implements BlockDriver {
  readonly driverName = 'raw';
  readonly children: { file: ChildEdge };
  private readonly hasWindow: boolean;
  private derivedCaps: { from: DriverCaps; caps: DriverCaps } | null = null;

  constructor(file: BlockNode, private readonly offset: number, private size: number | null) {
    this.children = { file: new ChildEdge('file', file) };
    this.hasWindow = offset !== 0 || size !== null;
  }

  private get file(): ChildEdge {
    return this.children.file;
  }

  /** Raw passes everything through, so it can do what its file can: FUA natively (the file node emulates it). */
  get caps(): DriverCaps {
    const fc = this.file.node.caps;
    if (this.derivedCaps?.from !== fc) {
      this.derivedCaps = { from: fc, caps: { fua: 'native', writeZeroes: fc.writeZeroes, discard: fc.discard } };
    }
    return this.derivedCaps.caps;
  }

  limits(): BlockLimits {
    // Alignment is the file node's business (it pads itself); raw adds none.
    return { requestAlignment: 1, maxTransfer: 1 << 30 };
  }

  getLength(): number {
    if (this.size !== null) return this.size;
    return Math.max(0, this.file.getLength() - this.offset);
  }

  pread(offset: number, buf: Buffer): Promise<void> {
    return this.file.pread(this.offset + offset, buf);
  }

  pwrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    return this.file.pwrite(this.offset + offset, buf, flags);
  }

  pwriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    return this.file.pwriteZeroes(this.offset + offset, length, flags);
  }

  pdiscard(offset: number, length: number): Promise<void> {
    return this.file.pdiscard(this.offset + offset, length);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const fileLen = this.file.getLength();
    const start = this.offset + offset;
    if (start >= fileLen) {
      return [{ offset, length, data: false, zero: true, allocated: true }];
    }
    const ext = await this.file.blockStatus(start, Math.min(length, fileLen - start));
    return ext.map((e) => ({ ...e, offset: e.offset - this.offset, allocated: true, hostOffset: e.offset, hostFile: this.file.filename }));
  }

  async truncate(length: number, prealloc: Preallocation): Promise<void> {
    if (this.hasWindow) throw unsupported(`${this.file.filename}: cannot resize a raw image with an offset or size window`);
    await this.file.truncate(length, prealloc);
  }

  async close(): Promise<void> {}
}

export const rawFormat: FormatDriverFactory = {
  name: 'raw',
  createOptions: ['preallocation', 'size'],
  probe: () => 1,
  async open(file: BlockNode, ctx: FormatOpenContext) {
    const offset = ctx.options.offset !== undefined ? parseSize(ctx.options.offset, 'offset', { allowZero: true }) : 0;
    const size = ctx.options.size !== undefined ? parseSize(ctx.options.size, 'size', { allowZero: true }) : null;
    const fileLen = file.getLength();
    if (offset > fileLen) throw invalidArgument(`${ctx.filename}: offset ${offset} is past the end of the file (${fileLen} bytes)`);
    if (size !== null && offset + size > fileLen) {
      throw invalidArgument(`${ctx.filename}: offset ${offset} + size ${size} is past the end of the file (${fileLen} bytes)`);
    }
    return new RawDriver(file, offset, size);
  },
  async create(file: BlockNode, ctx) {
    const prealloc = (ctx.options.preallocation ?? 'off') as Preallocation;
    if (!['off', 'falloc', 'full'].includes(prealloc)) {
      throw invalidArgument(`Invalid preallocation mode: '${prealloc}' (raw supports off, falloc, full)`);
    }
    await file.truncate(ctx.size, prealloc);
  },
};
