// vdisk rebase [-f FMT] [-u] -b BACKING [-F FMT] [-q] FILE
// Safe mode (default) copies into FILE every range FILE does not allocate where the old and
// the new backing differ, so the guest-visible contents stay the same; then the header is
// rewritten. -u only rewrites the header. -b "" removes the backing file.
import type { Command } from 'commander';
import { openImage, resolveBackingName } from '../../block/graph.js';
import { invalidArgument, unsupported, VdiskError } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { action } from '../common.js';

/** qemu-img rebase's IO_BUF_SIZE. */
const REBASE_CHUNK = 2 * 1024 * 1024;
const SECTOR = 512;

/** Read [offset, offset+buf.length) of `node`, zeros past its end (or for no node). */
async function readOrZero(node: BlockNode | null, offset: number, buf: Buffer): Promise<void> {
  const len = node ? node.getLength() : 0;
  if (!node || offset >= len) {
    buf.fill(0);
    return;
  }
  const n = Math.min(buf.length, len - offset);
  await node.pread(offset, buf.subarray(0, n));
  if (n < buf.length) buf.fill(0, n);
}

/** Copy into `top` every unallocated range where the old backing and the new one differ. */
async function copyDifferences(top: BlockNode, newBacking: BlockNode | null): Promise<void> {
  const oldBacking = top.backing ?? null;
  const size = top.getLength();
  const oldSize = oldBacking ? oldBacking.getLength() : 0;
  const bufOld = Buffer.allocUnsafe(REBASE_CHUNK);
  const bufNew = Buffer.allocUnsafe(REBASE_CHUNK);
  let offset = 0;
  while (offset < size) {
    const [e] = await top.blockStatus(offset, Math.min(REBASE_CHUNK, size - offset));
    const n = e.length;
    if (!e.allocated) {
      const a = bufOld.subarray(0, n);
      const b = bufNew.subarray(0, n);
      const oldIsZero = offset >= oldSize;
      await readOrZero(oldBacking, offset, a);
      await readOrZero(newBacking, offset, b);
      // Compare sector by sector and write runs that differ (qemu-img's compare_buffers).
      let pos = 0;
      while (pos < n) {
        const differs = !a.subarray(pos, Math.min(n, pos + SECTOR)).equals(b.subarray(pos, Math.min(n, pos + SECTOR)));
        let end = Math.min(n, pos + SECTOR);
        while (end < n) {
          const next = Math.min(n, end + SECTOR);
          if (!a.subarray(end, next).equals(b.subarray(end, next)) !== differs) break;
          end = next;
        }
        if (differs) {
          if (oldIsZero) await top.pwriteZeroes(offset + pos, end - pos);
          else await top.pwrite(offset + pos, a.subarray(pos, end));
        }
        pos = end;
      }
    }
    offset += n;
  }
}

export function register(program: Command): void {
  program
    .command('rebase')
    .description('change the backing file of an image')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .option('-u, --unsafe', 'only rewrite the backing file reference')
    .option('-b, --backing <file>', 'new backing file ("" removes it)')
    .option('-F, --backing-format <fmt>', 'format of the new backing file')
    .option('-t, --cache <mode>', 'cache mode (accepted; vdisk uses writeback)')
    .option('-T, --source-cache <mode>', 'backing files cache mode (accepted)')
    .option('-p, --progress', 'show progress (accepted)')
    .option('-q, --quiet', 'quiet mode')
    .option('-U, --force-share', 'open in shared mode (accepted)')
    .argument('<file>')
    .action(action(async (filename: string, o: { format?: string; unsafe?: boolean; backing?: string; backingFormat?: string }) => {
      if (!o.unsafe && o.backing === undefined) throw invalidArgument('Must specify backing file (-b) or use unsafe mode (-u)');
      const newName = o.backing !== undefined && o.backing !== '' ? o.backing : null;
      const newFormat = newName ? o.backingFormat ?? null : null;
      if (newName && !newFormat) {
        // qemu-img 7.2 refuses to record a backing file without its format.
        throw invalidArgument(`Could not change the backing file to '${newName}': backing format must be specified`);
      }
      const top = await openImage(filename, { format: o.format, readOnly: false, backing: !o.unsafe });
      let newBacking: BlockNode | null = null;
      try {
        if (!top.driver.changeBackingFile) {
          throw unsupported(`Could not change the backing file to '${newName ?? ''}': format '${top.driver.driverName}' has no backing file`);
        }
        if (!o.unsafe) {
          if (newName) {
            try {
              newBacking = await openImage(resolveBackingName(filename, newName), { format: newFormat ?? undefined, readOnly: true });
            } catch (err) {
              const msg = err instanceof Error ? err.message : String(err);
              throw new VdiskError('EINVAL', 'invalid-argument', `Could not open new backing file '${newName}': ${msg}`);
            }
          }
          await copyDifferences(top, newBacking);
          await top.flush();
        }
        await top.driver.changeBackingFile(newName, newFormat);
      } finally {
        await newBacking?.close().catch(() => {});
        await top.close();
      }
    }));
}
