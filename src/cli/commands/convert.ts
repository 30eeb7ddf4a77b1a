// vdisk convert [-f FMT] [-O FMT] [-o OPTS] [-t CACHE] [-T SRC_CACHE] [-S SPARSE_SIZE] [-c] [-p] [-n] [-m N] SRC DST
//
// Copies guest-visible content. Source block status (through its backing chain) tells which
// ranges are zero without reading them; inside data ranges, runs of SPARSE_SIZE zero bytes
// are detected and left as holes (-S 0: no detection, fully allocated target). Like
// qemu-img convert, the target cache mode defaults to unsafe (no fdatasync at the end) and
// several requests run at once (-m, default 8), written out of order (qemu-img's -W).
import type { Command } from 'commander';
import type cliProgress from 'cli-progress';
import { REQ_MAY_UNMAP, REQ_WRITE_COMPRESSED } from '../../block/driver.js';
import { invalidArgument, unsupported } from '../../block/errors.js';
import { createImage, getFormat, openImage } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { parseSize } from '../../block/size.js';
import { action, cacheOption, collectKeyValues } from '../common.js';

const CHUNK = 2 << 20; // qemu-img's convert buffer size

export interface ConvertOptions {
  /** Bytes of consecutive zeros that become a hole; 0 disables zero detection. */
  sparseSize: number;
  compressed: boolean;
  /** The target is freshly created and reads as zeros: zero ranges need no write. */
  targetZeroInit: boolean;
  parallel: number;
  onProgress?: (done: number, total: number) => void;
}

interface Task {
  offset: number;
  length: number;
  zero: boolean;
}

/** Split the source into tasks: zero ranges (from block status) and data chunks. */
async function* planTasks(src: BlockNode, opts: ConvertOptions, chunk: number): AsyncGenerator<Task> {
  const size = src.getLength();
  let pos = 0;
  while (pos < size) {
    const extents = opts.sparseSize === 0
      ? [{ offset: pos, length: Math.min(1 << 30, size - pos), zero: false }]
      : await src.blockStatusAbove(pos, Math.min(1 << 30, size - pos));
    for (const e of extents) {
      if (e.zero) {
        yield { offset: e.offset, length: e.length, zero: true };
      } else {
        // Chunks aligned to `chunk` so compressed writes cover whole clusters.
        let off = e.offset;
        const end = e.offset + e.length;
        while (off < end) {
          const next = Math.min(end, off - (off % chunk) + chunk);
          yield { offset: off, length: next - off, zero: false };
          off = next;
        }
      }
      pos = e.offset + e.length;
    }
  }
}

export async function convertImage(src: BlockNode, dst: BlockNode, opts: ConvertOptions): Promise<void> {
  const total = src.getLength();
  if (dst.getLength() < total) {
    throw invalidArgument(`${dst.filename}: target is smaller (${dst.getLength()} bytes) than the source (${total} bytes)`);
  }
  const cluster = dst.driver.limits().optimalTransfer ?? 65536;
  if (opts.compressed && !dst.driver.caps.compressedWrites) {
    throw unsupported(`${dst.filename}: format '${dst.driver.driverName}' does not support compressed writes (-c)`);
  }
  const chunk = opts.compressed ? cluster : CHUNK;
  const zeroBlock = Buffer.alloc(Math.max(chunk, opts.sparseSize));
  let done = 0;
  const tasks = planTasks(src, opts, chunk);
  let failed: unknown = null;

  const worker = async (): Promise<void> => {
    const buf = Buffer.allocUnsafe(chunk);
    for (;;) {
      if (failed) return;
      const next = await tasks.next();
      if (next.done) return;
      const t = next.value;
      if (t.zero) {
        if (!opts.targetZeroInit) await dst.pwriteZeroes(t.offset, t.length, REQ_MAY_UNMAP);
      } else {
        const data = buf.subarray(0, t.length);
        await src.pread(t.offset, data);
        await writeData(dst, t.offset, data, opts, zeroBlock);
      }
      done += t.length;
      opts.onProgress?.(done, total);
    }
  };
  // The generator is shared: each `next()` hands one task to one worker.
  const workers = Array.from({ length: Math.max(1, opts.parallel) }, () => worker().catch((err) => {
    failed ??= err;
  }));
  await Promise.all(workers);
  if (failed) throw failed;
}

/** Write a data chunk, leaving zero runs of at least sparseSize as holes (or zeroing them). */
async function writeData(dst: BlockNode, offset: number, data: Buffer, opts: ConvertOptions, zeroBlock: Buffer): Promise<void> {
  if (opts.compressed) {
    if (opts.sparseSize > 0 && data.equals(zeroBlock.subarray(0, data.length))) {
      if (!opts.targetZeroInit) await dst.pwriteZeroes(offset, data.length, REQ_MAY_UNMAP);
      return;
    }
    return dst.pwrite(offset, data, REQ_WRITE_COMPRESSED);
  }
  const s = opts.sparseSize;
  if (s === 0) return dst.pwrite(offset, data);
  // Walk the chunk in sparseSize steps aligned to the image offset, grouping runs.
  let runStart = 0;
  let runZero: boolean | null = null;
  const flushRun = async (end: number) => {
    if (end <= runStart || runZero === null) return;
    if (runZero) {
      if (!opts.targetZeroInit) await dst.pwriteZeroes(offset + runStart, end - runStart, REQ_MAY_UNMAP);
    } else {
      await dst.pwrite(offset + runStart, data.subarray(runStart, end));
    }
  };
  let pos = 0;
  while (pos < data.length) {
    const stepEnd = Math.min(data.length, pos + s - ((offset + pos) % s));
    const isZero = isZeroRange(data, pos, stepEnd, zeroBlock);
    if (runZero !== isZero) {
      await flushRun(pos);
      runStart = pos;
      runZero = isZero;
    }
    pos = stepEnd;
  }
  await flushRun(data.length);
}

/**
 * data[start, end) is all zeros. Data steps usually show a non-zero byte at either end, which
 * settles them without a call; the rest are compared in place (no subarray objects).
 */
function isZeroRange(data: Buffer, start: number, end: number, zeroBlock: Buffer): boolean {
  if (data[start] !== 0 || data[end - 1] !== 0) return false;
  return data.compare(zeroBlock, 0, end - start, start, end) === 0;
}

export function register(program: Command): void {
  program
    .command('convert')
    .description('copy an image, possibly to another format, keeping holes')
    .option('-f, --format <fmt>', 'source format (probed when absent)')
    .option('-O, --output-format <fmt>', 'target format', 'raw')
    .option('-o, --options <opts>', 'target format options', collectKeyValues)
    .option('-t, --cache <mode>', 'target cache mode', 'unsafe')
    .option('-T, --source-cache <mode>', 'source cache mode', 'writeback')
    .option('-S, --sparse-size <size>', 'zero run that becomes a hole (0: fully allocate)', '4k')
    .option('-c, --compress', 'write compressed clusters (qcow2)')
    .option('-p, --progress', 'show a progress bar')
    .option('-n, --no-create', 'do not create the target (it must exist)')
    .option('-m, --parallel <n>', 'requests in flight', '8')
    .option('-W, --out-of-order', 'accepted for qemu-img compatibility (vdisk always writes out of order)')
    .option('-q, --quiet', 'quiet')
    .option('-U, --force-share', 'accepted for qemu-img compatibility')
    .argument('<source>')
    .argument('<target>')
    .action(action(async (source: string, target: string, o: {
      format?: string; outputFormat: string; options?: Record<string, string>; cache: string; sourceCache: string;
      sparseSize: string; compress?: boolean; progress?: boolean; create: boolean; parallel: string; quiet?: boolean;
    }) => {
      const targetCache = cacheOption(o.cache);
      const sourceCache = cacheOption(o.sourceCache);
      getFormat(o.outputFormat);
      const sparseSize = parseSize(o.sparseSize, 'sparse size (-S)', { allowZero: true, max: 1 << 30 });
      if (sparseSize % 512 !== 0) throw invalidArgument(`Invalid sparse size (-S) '${o.sparseSize}': must be a multiple of 512`);
      const parallel = Number(o.parallel);
      if (!Number.isInteger(parallel) || parallel < 1 || parallel > 16) throw invalidArgument(`Invalid -m '${o.parallel}': 1 to 16`);
      if (!o.create && o.options) throw invalidArgument('-o has no effect with -n (the target is not created)');

      const src = await openImage(source, { format: o.format, readOnly: true, cache: sourceCache });
      let dst: BlockNode | null = null;
      let bar: cliProgress.SingleBar | null = null;
      try {
        if (o.create) {
          await createImage(target, { format: o.outputFormat, size: src.getLength(), options: o.options });
        }
        dst = await openImage(target, { format: o.outputFormat, cache: targetCache });
        if (o.progress && !o.quiet) {
          // Loaded only for -p: start-up time counts in every convert.
          const { default: progress } = await import('cli-progress');
          bar = new progress.SingleBar({
            format: '    ({percentage}/100%) [{bar}] {value_mib}/{total_mib} MiB',
            stream: process.stderr, hideCursor: true,
            // Like qemu-img -p, report progress when the output is not a terminal too.
            noTTYOutput: true, notTTYSchedule: 1000,
          }, progress.Presets.shades_classic);
          bar.start(src.getLength(), 0, { value_mib: 0, total_mib: (src.getLength() / 2 ** 20).toFixed(0) });
        }
        let lastUpdate = 0;
        await convertImage(src, dst, {
          sparseSize, compressed: !!o.compress, targetZeroInit: o.create, parallel,
          onProgress: bar ? (d, t) => {
            if (d - lastUpdate >= (1 << 24) || d === t) {
              lastUpdate = d;
              bar!.update(d, { value_mib: (d / 2 ** 20).toFixed(0) });
            }
          } : undefined,
        });
        bar?.stop();
        bar = null;
      } catch (err) {
        bar?.stop();
        throw err;
      } finally {
        await src.close().catch(() => {});
        if (dst) await dst.close();
      }
    }));
}
