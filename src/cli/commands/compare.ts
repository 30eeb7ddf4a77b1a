// vdisk compare [-f FMT] [-F FMT] [-T CACHE] [-s] [-q] A B
// Exit codes as qemu-img: 0 identical, 1 different (first differing offset printed), 2 error.
import type { Command } from 'commander';
import { openImage } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { action, cacheOption } from '../common.js';

const CHUNK = 2 << 20;
/** qemu-img compares in 512-byte sectors and reports the start of the first differing one. */
const SECTOR = 512;

function mismatchAt(offset: number): { identical: false; offset: number; message: string } {
  const sector = offset - (offset % SECTOR);
  return { identical: false, offset: sector, message: `Content mismatch at offset ${sector}!` };
}

/** True when [off, off+len) reads as zeros according to block status (no I/O needed). */
async function knownZero(node: BlockNode, off: number, len: number): Promise<number> {
  const ext = await node.blockStatusAbove(off, len);
  let n = 0;
  for (const e of ext) {
    if (!e.zero) break;
    n += e.length;
  }
  return n;
}

/** First offset in [off, off+len) where `node` is not zero, or -1. */
async function firstNonZero(node: BlockNode, off: number, len: number, buf: Buffer): Promise<number> {
  let pos = off;
  const end = off + len;
  while (pos < end) {
    const z = await knownZero(node, pos, Math.min(CHUNK, end - pos));
    if (z > 0) {
      pos += z;
      continue;
    }
    const n = Math.min(CHUNK, end - pos);
    const b = buf.subarray(0, n);
    await node.pread(pos, b);
    for (let i = 0; i < n; i++) if (b[i] !== 0) return pos + i;
    pos += n;
  }
  return -1;
}

export async function compareImages(a: BlockNode, b: BlockNode, strict: boolean): Promise<{ identical: boolean; offset?: number; message: string }> {
  const lenA = a.getLength();
  const lenB = b.getLength();
  if (lenA !== lenB && strict) return { identical: false, message: 'Strict mode: Image size mismatch!' };
  const common = Math.min(lenA, lenB);
  const bufA = Buffer.allocUnsafe(CHUNK);
  const bufB = Buffer.allocUnsafe(CHUNK);
  let pos = 0;
  while (pos < common) {
    const n = Math.min(CHUNK, common - pos);
    const za = await knownZero(a, pos, n);
    const zb = await knownZero(b, pos, n);
    const both = Math.min(za, zb);
    if (both > 0) {
      pos += both;
      continue;
    }
    const x = bufA.subarray(0, n);
    const y = bufB.subarray(0, n);
    await Promise.all([a.pread(pos, x), b.pread(pos, y)]);
    if (!x.equals(y)) {
      let i = 0;
      while (x[i] === y[i]) i++;
      return mismatchAt(pos + i);
    }
    pos += n;
  }
  if (lenA !== lenB) {
    const longer = lenA > lenB ? a : b;
    const off = await firstNonZero(longer, common, Math.max(lenA, lenB) - common, bufA);
    if (off >= 0) return mismatchAt(off);
  }
  return { identical: true, message: 'Images are identical.' };
}

export function register(program: Command): void {
  program
    .command('compare')
    .description('compare two images (exit 0 identical, 1 different, 2 error)')
    .option('-f, --format <fmt>', 'format of the first image')
    .option('-F, --second-format <fmt>', 'format of the second image')
    .option('-T, --source-cache <mode>', 'cache mode for reading both images', 'writeback')
    .option('-s, --strict', 'images of different sizes are different')
    .option('-q, --quiet', 'print nothing, only set the exit code')
    .option('-U, --force-share', 'accepted for qemu-img compatibility')
    .argument('<image1>')
    .argument('<image2>')
    .action(action(async (f1: string, f2: string, o: { format?: string; secondFormat?: string; sourceCache: string; strict?: boolean; quiet?: boolean }) => {
      const cache = cacheOption(o.sourceCache);
      const a = await openImage(f1, { format: o.format, readOnly: true, cache });
      let b: BlockNode;
      try {
        b = await openImage(f2, { format: o.secondFormat, readOnly: true, cache });
      } catch (err) {
        await a.close();
        throw err;
      }
      try {
        if (!o.quiet && a.getLength() !== b.getLength() && !o.strict) process.stdout.write('Warning: Image size mismatch!\n');
        const r = await compareImages(a, b, !!o.strict);
        if (!o.quiet) process.stdout.write(r.message + '\n');
        process.exitCode = r.identical ? 0 : 1;
      } finally {
        await a.close();
        await b.close();
      }
    }, 2));
}
