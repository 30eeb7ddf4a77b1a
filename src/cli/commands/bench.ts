// vdisk bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N] [--no-drain] [-o OFFSET]
//             [--pattern=N] [-q] [-s SIZE] [-S STEP] [-t CACHE] [-w] FILE
// qemu-img bench's options and request pattern (offset advances by STEP, wrapping), plus a
// final line with ops/s and MB/s.
import type { Command } from 'commander';
import { BlockBackend } from '../../block/backend.js';
import { invalidArgument } from '../../block/errors.js';
import { openImage } from '../../block/graph.js';
import { parseSize } from '../../block/size.js';
import { action, cacheOption } from '../common.js';

export interface BenchOptions {
  count: number;
  depth: number;
  bufSize: number;
  step: number;
  offset: number;
  write: boolean;
  pattern: number;
  flushInterval: number;
  drain: boolean;
}

export async function runBench(blk: BlockBackend, o: BenchOptions): Promise<{ seconds: number }> {
  const size = blk.getLength();
  if (o.bufSize > size) throw invalidArgument(`buffer size ${o.bufSize} is larger than the image (${size} bytes)`);
  let next = o.offset % Math.max(1, size - o.bufSize + 1);
  let issued = 0;
  let writesSinceFlush = 0;
  let flushing: Promise<void> | null = null;
  let inFlight = 0;
  let idle: (() => void) | null = null;

  const takeOffset = (): number => {
    const off = next;
    // qemu-img 7.2 wraps modulo the image size, so the same options give the same offsets.
    // Where that would run a request past the end (7.2 then fails with EIO), start over at 0.
    next = (next + o.step) % size;
    if (next + o.bufSize > size) next = 0;
    return off;
  };

  const worker = async (): Promise<void> => {
    const buf = Buffer.alloc(o.bufSize, o.write ? o.pattern : 0);
    while (issued < o.count) {
      if (flushing) await flushing;
      if (issued >= o.count) break;
      issued++;
      const off = takeOffset();
      inFlight++;
      try {
        if (o.write) await blk.pwrite(off, buf);
        else await blk.pread(off, buf);
      } finally {
        inFlight--;
        if (inFlight === 0 && idle) idle();
      }
      if (o.write && o.flushInterval > 0 && ++writesSinceFlush >= o.flushInterval && !flushing) {
        writesSinceFlush = 0;
        flushing = (async () => {
          if (o.drain && inFlight > 0) await new Promise<void>((r) => (idle = r));
          idle = null;
          await blk.flush();
          flushing = null;
        })();
        await flushing;
      }
    }
  };
  const t0 = process.hrtime.bigint();
  await Promise.all(Array.from({ length: o.depth }, worker));
  if (o.write && o.flushInterval > 0) await blk.flush();
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  return { seconds };
}

function int(text: string, what: string, min: number): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < min) throw invalidArgument(`Invalid ${what} '${text}'`);
  return n;
}

export function register(program: Command): void {
  program
    .command('bench')
    .description('run a simple I/O benchmark on an image (qemu-img bench)')
    .option('-c, --count <n>', 'number of requests', '75000')
    .option('-d, --depth <n>', 'requests in flight', '64')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--flush-interval <n>', 'flush after every N writes', '0')
    .option('--no-drain', 'flush without waiting for requests in flight')
    .option('-n, --native', 'accepted for qemu-img compatibility (vdisk picks io_uring or the thread pool itself)')
    .option('-i, --aio <mode>', 'accepted for qemu-img compatibility')
    .option('-o, --offset <offset>', 'starting offset', '0')
    .option('--pattern <n>', 'byte written by write requests', '0')
    .option('-q, --quiet', 'print only the result line')
    .option('-s, --buffer-size <size>', 'request size', '4k')
    .option('-S, --step-size <size>', 'offset step between requests (default: buffer size)')
    .option('-t, --cache <mode>', 'cache mode', 'writeback')
    .option('-w, --write', 'write instead of read')
    .option('-U, --force-share', 'accepted for qemu-img compatibility')
    .argument('<file>')
    .action(action(async (file: string, o: {
      count: string; depth: string; format?: string; flushInterval: string; drain: boolean; offset: string;
      pattern: string; quiet?: boolean; bufferSize: string; stepSize?: string; cache: string; write?: boolean;
    }) => {
      const cache = cacheOption(o.cache);
      const bufSize = parseSize(o.bufferSize, 'buffer size', { max: 1 << 30 });
      const opts: BenchOptions = {
        count: int(o.count, 'request count', 1),
        depth: int(o.depth, 'queue depth', 1),
        bufSize,
        step: o.stepSize !== undefined ? parseSize(o.stepSize, 'step size', { allowZero: true }) : bufSize,
        offset: parseSize(o.offset, 'offset', { allowZero: true }),
        write: !!o.write,
        pattern: int(o.pattern, 'pattern', 0),
        flushInterval: int(o.flushInterval, 'flush interval', 0),
        drain: o.drain,
      };
      if (opts.pattern > 255) throw invalidArgument(`Invalid pattern '${o.pattern}': 0..255`);
      if (opts.flushInterval > 0 && !opts.write) throw invalidArgument('--flush-interval is only available in write tests');
      const node = await openImage(file, { format: o.format, readOnly: !opts.write, cache });
      const blk = new BlockBackend(node, cache);
      try {
        if (!o.quiet) {
          process.stdout.write(`Sending ${opts.count} ${opts.write ? 'write' : 'read'} requests, ${bufSize} bytes each, ` +
            `${opts.depth} in parallel (starting at offset ${opts.offset}, step size ${opts.step})\n`);
          if (opts.flushInterval > 0) process.stdout.write(`Sending flush every ${opts.flushInterval} requests\n`);
        }
        const { seconds } = await runBench(blk, opts);
        const ops = opts.count / seconds;
        process.stdout.write(`Run completed in ${seconds.toFixed(3)} seconds.\n`);
        process.stdout.write(`${ops.toFixed(0)} ops/s, ${((ops * bufSize) / 1e6).toFixed(1)} MB/s\n`);
      } finally {
        await blk.close();
      }
    }));
}
