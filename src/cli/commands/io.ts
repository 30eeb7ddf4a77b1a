// vdisk io [-f FMT] [-t CACHE] [-n] [-r] [-c CMD]... FILE — qemu-io's command language:
//   read [-P pattern] [-q] off len        verify with -P; a mismatch fails the command
//   write [-P pattern] [-z [-u]] [-f] [-c] [-q] off len
//   discard [-q] off len | flush | map | length | truncate size
// Without -c, commands are read from standard input, one per line. Exit 1 if any failed.
import readline from 'node:readline';
import type { Command } from 'commander';
import { BlockBackend } from '../../block/backend.js';
import { REQ_FUA, REQ_MAY_UNMAP, REQ_WRITE_COMPRESSED } from '../../block/driver.js';
import { VdiskError, invalidArgument } from '../../block/errors.js';
import { openImage } from '../../block/graph.js';
import { formatSize } from '../../block/size.js';
import { action, cacheOption, collect, collectKeyValues, reportError } from '../common.js';
import { parseCacheMode } from '../../block/cache-mode.js';

/** qemu-io's cvtnum: decimal or 0x hex, optional k/M/G/T/P/E suffix. */
export function ioNumber(text: string, what: string): number {
  const m = /^(0x[0-9a-fA-F]+|\d+)([kKmMgGtTpPeEbB]?)$/.exec(text ?? '');
  if (!m) throw invalidArgument(`invalid ${what} '${text}'`);
  const mult: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };
  const v = Number(m[1]) * mult[m[2].toLowerCase()];
  if (!Number.isSafeInteger(v)) throw invalidArgument(`invalid ${what} '${text}': too large`);
  return v;
}

function ioSize(n: number): string {
  return n < 1024 ? `${n} bytes` : formatSize(n);
}

function stats(bytes: number, ops: number, ns: bigint): string {
  const secs = Number(ns) / 1e9;
  const rate = secs > 0 ? bytes / secs : 0;
  const opsRate = secs > 0 ? ops / secs : 0;
  const s = secs.toFixed(2).padStart(5, '0');
  return `${ioSize(bytes)}, ${ops} ops; ${s} sec (${formatSize(rate).replace(/ (\w+)$/, ' $1/sec').replace(' B/sec', ' bytes/sec')} and ${opsRate.toFixed(4)} ops/sec)`;
}

interface Parsed {
  flags: Record<string, string | true>;
  args: string[];
}

/** getopt-style parsing of one command line: flags with values are listed in `withValue`. */
function parseCommand(words: string[], allowed: string, withValue: string): Parsed {
  const flags: Record<string, string | true> = {};
  const args: string[] = [];
  for (let i = 0; i < words.length; i++) {
    const w = words[i];
    if (w.startsWith('-') && w.length > 1 && !/^-\d/.test(w) && args.length === 0) {
      for (let j = 1; j < w.length; j++) {
        const f = w[j];
        if (!allowed.includes(f)) throw invalidArgument(`invalid option -- '${f}'`);
        if (withValue.includes(f)) {
          const v = j + 1 < w.length ? w.slice(j + 1) : words[++i];
          if (v === undefined) throw invalidArgument(`option -${f} needs a value`);
          flags[f] = v;
          break;
        }
        flags[f] = true;
      }
    } else {
      args.push(w);
    }
  }
  return { flags, args };
}

function pattern(v: string | true | undefined, fallback: number): number {
  if (v === undefined) return fallback;
  const n = ioNumber(String(v), 'pattern');
  if (n > 255) throw invalidArgument(`invalid pattern '${v}': must be 0..255`);
  return n;
}

function offLen(args: string[], name: string): [number, number] {
  if (args.length !== 2) throw invalidArgument(`${name}: expected OFFSET LENGTH`);
  return [ioNumber(args[0], 'offset'), ioNumber(args[1], 'length')];
}

/** Runs one qemu-io command; returns false when it failed. Output goes to `out`. */
export async function runIoCommand(blk: BlockBackend, line: string, out: (s: string) => void,
  err: (s: string) => void = out): Promise<boolean> {
  const words = line.trim().split(/\s+/).filter(Boolean);
  if (words.length === 0) return true;
  const [cmd, ...rest] = words;
  try {
    switch (cmd) {
      case 'read': {
        const p = parseCommand(rest, 'Pqv', 'P');
        const [off, len] = offLen(p.args, 'read');
        const buf = Buffer.alloc(len);
        const t0 = process.hrtime.bigint();
        await blk.pread(off, buf);
        const t1 = process.hrtime.bigint();
        let ok = true;
        if (p.flags.P !== undefined) {
          const pat = pattern(p.flags.P, 0);
          const bad = buf.findIndex((b) => b !== pat);
          if (bad >= 0) {
            out(`Pattern verification failed at offset ${off + bad}, ${len - bad} bytes\n`);
            ok = false;
          }
        }
        if (!p.flags.q) out(`read ${len}/${len} bytes at offset ${off}\n${stats(len, 1, t1 - t0)}\n`);
        return ok;
      }
      case 'write': {
        const p = parseCommand(rest, 'PzufcqC', 'P');
        const [off, len] = offLen(p.args, 'write');
        if (p.flags.u && !p.flags.z) throw invalidArgument('write: -u requires -z');
        if (p.flags.z && p.flags.P !== undefined) throw invalidArgument('write: -z and -P cannot be specified at the same time');
        const flags = (p.flags.f ? REQ_FUA : 0) | (p.flags.u ? REQ_MAY_UNMAP : 0) | (p.flags.c ? REQ_WRITE_COMPRESSED : 0);
        const t0 = process.hrtime.bigint();
        if (p.flags.z) {
          await blk.pwriteZeroes(off, len, flags);
        } else {
          await blk.pwrite(off, Buffer.alloc(len, pattern(p.flags.P, 0xcd)), flags);
        }
        const t1 = process.hrtime.bigint();
        if (!p.flags.q) out(`wrote ${len}/${len} bytes at offset ${off}\n${stats(len, 1, t1 - t0)}\n`);
        return true;
      }
      case 'discard': {
        const p = parseCommand(rest, 'q', '');
        const [off, len] = offLen(p.args, 'discard');
        const t0 = process.hrtime.bigint();
        await blk.pdiscard(off, len);
        const t1 = process.hrtime.bigint();
        if (!p.flags.q) out(`discard ${len}/${len} bytes at offset ${off}\n${stats(len, 1, t1 - t0)}\n`);
        return true;
      }
      case 'flush':
        await blk.flush();
        return true;
      case 'length':
        out(`${ioSize(blk.getLength())}\n`);
        return true;
      case 'truncate': {
        if (rest.length !== 1) throw invalidArgument('truncate: expected SIZE');
        await blk.root.truncate(ioNumber(rest[0], 'size'));
        return true;
      }
      case 'map': {
        const size = blk.getLength();
        let pos = 0;
        let run: { start: number; len: number; alloc: boolean } | null = null;
        const emit = (r: { start: number; len: number; alloc: boolean }) =>
          out(`${ioSize(r.len)} (0x${r.len.toString(16)}) bytes ${r.alloc ? '    allocated' : 'not allocated'} at offset ${ioSize(r.start)} (0x${r.start.toString(16)})\n`);
        while (pos < size) {
          for (const e of await blk.blockStatusAbove(pos, Math.min(1 << 30, size - pos))) {
            if (run && run.alloc === e.allocated) run.len += e.length;
            else {
              if (run) emit(run);
              run = { start: e.offset, len: e.length, alloc: e.allocated };
            }
            pos = e.offset + e.length;
          }
        }
        if (run) emit(run);
        return true;
      }
      default:
        err(`command "${cmd}" not found\n`); // qemu-io prints this one on stderr
        return false;
    }
  } catch (e) {
    if (e instanceof VdiskError) {
      out(`${cmd} failed: ${e.message}\n`);
      return false;
    }
    throw e;
  }
}

export function register(program: Command): void {
  program
    .command('io')
    .description("run qemu-io style commands (read, write, discard, flush, map) on an image")
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('-t, --cache <mode>', 'cache mode: writeback, none, writethrough, directsync, unsafe')
    .option('-n, --nocache', 'cache=none (O_DIRECT)')
    .option('-r, --read-only', 'open read-only')
    .option('-c, --cmd <command>', 'command to run (repeatable)', collect)
    .option('-o, --options <opts>', 'driver options, e.g. offset=1M,size=4M for raw or l2-cache-size=8M', collectKeyValues)
    .argument('<file>')
    .action(action(async (file: string, o: {
      format?: string; cache?: string; nocache?: boolean; readOnly?: boolean; cmd?: string[]; options?: Record<string, string>;
    }) => {
      const cache = o.nocache ? parseCacheMode('none') : cacheOption(o.cache);
      const node = await openImage(file, { format: o.format, readOnly: !!o.readOnly, cache, options: o.options });
      const blk = new BlockBackend(node, cache);
      let failed = false;
      const out = (s: string) => process.stdout.write(s);
      const err = (s: string) => process.stderr.write(s);
      try {
        if (o.cmd) {
          for (const c of o.cmd) if (!(await runIoCommand(blk, c, out, err))) failed = true;
        } else {
          const rl = readline.createInterface({ input: process.stdin, terminal: false });
          for await (const line of rl) {
            if (line.trim() === 'quit' || line.trim() === 'q') break;
            if (!(await runIoCommand(blk, line, out, err))) failed = true;
          }
        }
      } finally {
        try {
          await blk.close();
        } catch (err) {
          reportError(err);
          failed = true;
        }
      }
      if (failed) process.exitCode = 1;
    }));
}
