// vdisk commit [-f FMT] [-d] [-b BASE] [-q] FILE
// Copies what FILE (and, with -b, every layer above BASE) allocates into BASE, which is
// opened writable on its own, then empties FILE unless -d (-b implies -d, as in qemu-img).
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Command } from 'commander';
import { openImage } from '../../block/graph.js';
import { VdiskError, invalidArgument } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { action } from '../common.js';

/** Bytes per copy request (qemu's commit job uses 512 KiB; larger helps JS). */
const COMMIT_CHUNK = 2 * 1024 * 1024;

async function realpathOr(p: string): Promise<string> {
  return fs.realpath(p).catch(() => path.resolve(p));
}

/** Depth of `base` below `top` (1 = immediate backing), like bdrv_find_backing_image. */
async function findInChain(top: BlockNode, base: string): Promise<number> {
  const candidates = new Set([await realpathOr(base), await realpathOr(path.join(path.dirname(top.filename), base))]);
  let depth = 0;
  for (let n = top.backing; n; n = n.backing) {
    depth++;
    if (candidates.has(await realpathOr(n.filename))) return depth;
  }
  return -1;
}

/** The format node at `depth` below `top`, and the format name it was opened with. */
function nodeAt(top: BlockNode, depth: number): BlockNode {
  let n: BlockNode = top;
  for (let i = 0; i < depth; i++) n = n.backing as BlockNode;
  return n;
}

/** Copy every range allocated above depth `baseDepth` from `top` (read through the chain) into `base`. */
async function copyAbove(top: BlockNode, baseDepth: number, base: BlockNode): Promise<void> {
  const size = top.getLength();
  const buf = Buffer.allocUnsafe(COMMIT_CHUNK);
  let offset = 0;
  while (offset < size) {
    const extents = await top.blockStatusAbove(offset, Math.min(COMMIT_CHUNK, size - offset));
    for (const e of extents) {
      // Extents come from the layer that answers for them: above BASE means FILE's view differs.
      if (e.depth < baseDepth) {
        if (e.zero && !e.data) {
          await base.pwriteZeroes(e.offset, e.length);
        } else {
          const b = buf.subarray(0, e.length);
          await top.pread(e.offset, b);
          await base.pwrite(e.offset, b);
        }
      }
      offset = e.offset + e.length;
    }
  }
}

export function register(program: Command): void {
  program
    .command('commit')
    .description('commit the changes recorded in an image into its backing file')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .option('-t, --cache <mode>', 'cache mode (accepted; vdisk uses writeback)')
    .option('-d, --drop', 'do not empty FILE after the commit')
    .option('-b, --base <base>', 'image in the backing chain to commit to (implies -d)')
    .option('-p, --progress', 'show progress (accepted)')
    .option('-q, --quiet', 'quiet mode')
    .argument('<file>')
    .action(action(async (filename: string, o: { format?: string; drop?: boolean; base?: string; quiet?: boolean }) => {
      const drop = o.drop === true || o.base !== undefined;
      const top = await openImage(filename, { format: o.format, readOnly: drop });
      let base: BlockNode | null = null;
      try {
        if (!top.backing) throw invalidArgument('Image does not have a backing file');
        const baseDepth = o.base !== undefined ? await findInChain(top, o.base) : 1;
        if (baseDepth < 0) throw invalidArgument(`Did not find '${o.base}' in the backing chain of '${filename}'`);
        const baseInChain = nodeAt(top, baseDepth);
        base = await openImage(baseInChain.filename, {
          format: baseInChain.driver.driverName, readOnly: false, backing: false,
        });
        if (base.getLength() < top.getLength()) await base.truncate(top.getLength());
        await copyAbove(top, baseDepth, base);
        await base.flush();
        if (!drop) {
          if (!top.driver.makeEmpty) {
            // qemu-img ignores ENOTSUP from make_empty: the data is committed either way.
          } else {
            try {
              await top.driver.makeEmpty();
            } catch (err) {
              if (!(err instanceof VdiskError && err.code === 'ENOTSUP')) throw err;
            }
          }
        }
      } finally {
        const closing: unknown[] = [];
        if (base) await base.close().catch((e) => closing.push(e));
        await top.close().catch((e) => closing.push(e));
        if (closing.length) throw closing[0];
      }
      if (!o.quiet) process.stdout.write('Image committed.\n');
    }));
}
