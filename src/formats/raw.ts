// raw format: the image is the file, optionally a window [offset, offset+size) of it
// (QEMU's raw driver options `offset` and `size`). Size is kept exactly: no 512-byte rounding.
import type {
  BlockDriver, BlockLimits, Extent, FormatDriverFactory, FormatOpenContext, Preallocation,
} from '../block/driver.js';
import { invalidArgument, unsupported } from '../block/errors.js';
import type { BlockNode } from '../block/node.js';
import { parseSize } from '../block/size.js';

export class RawDriver implements BlockDriver {
  readonly driverName = 'raw';
  readonly children: { file: BlockNode };
  readonly caps;
  private readonly hasWindow: boolean;

  constructor(file: BlockNode, private readonly offset: number, private size: number | null) {
    this.children = { file };
    this.hasWindow = offset !== 0 || size !== null;
    const fc = file.driver.caps;
    // Raw passes everything through, so it can do what its file can: natively.
    this.caps = {
      fua: 'native',
      writeZeroes: fc.writeZeroes === 'none' ? 'none' : fc.writeZeroes,
      discard: fc.discard,
    } as const;
  }

  private get file(): BlockNode {
    return this.children.file;
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
