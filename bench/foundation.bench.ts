// Foundation benchmark: `vdisk bench` vs `qemu-img bench` and `vdisk convert` vs
// `qemu-img convert`, on the same files, in the same run.
//
// - 4 KiB reads at depth 1 and 16. qemu-img bench only steps sequentially, so both sides
//   use a step of 4096*7919 bytes (prime number of blocks) modulo the image: a scattered,
//   identical offset sequence on both sides.
// - 1 MiB sequential writes at depth 4.
// - cache=none (O_DIRECT) and cache=writeback, on a 1 GiB file filled from /dev/urandom.
// - convert of a 1 GiB raw file holding 512 MiB of data and 512 MiB of holes (1 MiB each,
//   alternating) to raw; the time is the whole command, process start included.
//
// The two shared cores make single runs vary by 20-30% (NOTES.md): every row runs peer and
// vdisk back to back, in alternating order, for several rounds, and reports medians. The
// ratio is vdisk throughput / qemu-img throughput: above 1 means vdisk is faster.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { VDISK_BIN, hasProgram, run as runCmd, runOk } from '../test/helpers.js';

const GiB = 1 << 30;
const MiB = 1 << 20;
const STEP = 4096 * 7919;
const ROUNDS = Number(process.env.VDISK_BENCH_ROUNDS ?? 3);
const DIR = process.env.VDISK_BENCH_DIR ?? '/var/tmp/vdisk-bench-foundation';

interface BenchRow {
  name: string;
  /** Arguments shared by `qemu-img bench` and `vdisk bench` (before the file name). */
  args: string[];
  count: number;
  bytesPerOp: number;
}

const BENCH_ROWS: BenchRow[] = [
  { name: 'read 4k depth 1, cache=none', args: ['-t', 'none', '-d', '1', '-s', '4k', '-S', String(STEP)], count: 8000, bytesPerOp: 4096 },
  { name: 'read 4k depth 16, cache=none', args: ['-t', 'none', '-d', '16', '-s', '4k', '-S', String(STEP)], count: 40000, bytesPerOp: 4096 },
  { name: 'read 4k depth 1, cache=writeback', args: ['-t', 'writeback', '-d', '1', '-s', '4k', '-S', String(STEP)], count: 80000, bytesPerOp: 4096 },
  { name: 'read 4k depth 16, cache=writeback', args: ['-t', 'writeback', '-d', '16', '-s', '4k', '-S', String(STEP)], count: 80000, bytesPerOp: 4096 },
  { name: 'write 1M seq depth 4, cache=none', args: ['-w', '-t', 'none', '-d', '4', '-s', '1M'], count: 1024, bytesPerOp: MiB },
  { name: 'write 1M seq depth 4, cache=writeback', args: ['-w', '-t', 'writeback', '-d', '4', '-s', '1M'], count: 1024, bytesPerOp: MiB },
];

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Seconds from the "Run completed in X seconds." line both tools print. */
function benchSeconds(out: string, who: string): number {
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  if (!m) throw new Error(`${who}: no "Run completed" line in: ${out}`);
  return Number(m[1]);
}

function qemuBench(row: BenchRow, file: string): number {
  return benchSeconds(runOk('qemu-img', ['bench', '-f', 'raw', '-c', String(row.count), ...row.args, file]), 'qemu-img bench');
}

function vdiskBench(row: BenchRow, file: string): number {
  return benchSeconds(runOk(process.execPath, [VDISK_BIN, 'bench', '-f', 'raw', '-c', String(row.count), ...row.args, file]), 'vdisk bench');
}

/** Wall time of a command, in seconds. */
function timed(cmd: string, args: string[]): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return secs;
}

function prepare(): { data: string; halfSparse: string } {
  fs.mkdirSync(DIR, { recursive: true });
  const data = path.join(DIR, 'data-1g.raw');
  if (!fs.existsSync(data) || fs.statSync(data).size !== GiB) {
    console.log('preparing a 1 GiB file from /dev/urandom ...');
    runOk('dd', ['if=/dev/urandom', `of=${data}`, 'bs=1M', 'count=1024', 'status=none']);
  }
  const halfSparse = path.join(DIR, 'half-sparse-1g.raw');
  if (!fs.existsSync(halfSparse) || fs.statSync(halfSparse).size !== GiB) {
    console.log('preparing a 1 GiB half-sparse file ...');
    const src = fs.openSync(data, 'r');
    const dst = fs.openSync(halfSparse, 'w');
    fs.ftruncateSync(dst, GiB);
    const buf = Buffer.alloc(MiB);
    for (let off = 0; off < GiB; off += 2 * MiB) {
      fs.readSync(src, buf, 0, MiB, off);
      fs.writeSync(dst, buf, 0, MiB, off);
    }
    fs.closeSync(src);
    fs.closeSync(dst);
  }
  return { data, halfSparse };
}

interface Result {
  name: string;
  unit: string;
  qemu: number;
  vdisk: number;
}

function printTable(results: Result[]): void {
  const w = Math.max(...results.map((r) => r.name.length));
  const head = `${'workload'.padEnd(w)}  ${'qemu-img'.padStart(14)}  ${'vdisk'.padStart(14)}  ${'ratio'.padStart(6)}`;
  console.log(head);
  console.log('-'.repeat(head.length));
  for (const r of results) {
    const fmt = (v: number) => `${v.toFixed(v >= 100 ? 0 : 1)} ${r.unit}`.padStart(14);
    console.log(`${r.name.padEnd(w)}  ${fmt(r.qemu)}  ${fmt(r.vdisk)}  ${(r.vdisk / r.qemu).toFixed(2).padStart(6)}`);
  }
  console.log(`(medians of ${ROUNDS} back-to-back rounds, alternating which tool goes first; ratio = vdisk/qemu-img throughput, >1: vdisk faster)`);
}

export async function run(): Promise<void> {
  for (const p of ['qemu-img', 'dd']) {
    if (!hasProgram(p)) {
      console.log(`skipped: ${p} not installed (apt-get install qemu-utils coreutils)`);
      return;
    }
  }
  const started = Date.now();
  const { data, halfSparse } = prepare();
  const results: Result[] = [];

  for (const row of BENCH_ROWS) {
    const q: number[] = [];
    const v: number[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      if (round % 2 === 0) {
        q.push(qemuBench(row, data));
        v.push(vdiskBench(row, data));
      } else {
        v.push(vdiskBench(row, data));
        q.push(qemuBench(row, data));
      }
    }
    const mbps = row.bytesPerOp >= MiB;
    const rate = (secs: number) => (mbps ? (row.count * row.bytesPerOp) / secs / 1e6 : row.count / secs);
    results.push({ name: row.name, unit: mbps ? 'MB/s' : 'IOPS', qemu: rate(median(q)), vdisk: rate(median(v)) });
  }

  // convert: the target is removed and dirty pages written out before each (untimed).
  const target = path.join(DIR, 'convert-out.raw');
  const q: number[] = [];
  const v: number[] = [];
  const once = (who: 'qemu' | 'vdisk') => {
    fs.rmSync(target, { force: true });
    spawnSync('sync');
    if (who === 'qemu') q.push(timed('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', '-t', 'unsafe', halfSparse, target]));
    else v.push(timed(process.execPath, [VDISK_BIN, 'convert', '-f', 'raw', '-O', 'raw', '-t', 'unsafe', halfSparse, target]));
  };
  for (let round = 0; round < ROUNDS; round++) {
    if (round % 2 === 0) {
      once('qemu');
      once('vdisk');
    } else {
      once('vdisk');
      once('qemu');
    }
  }
  // vdisk's output must be right (untimed check).
  fs.rmSync(target, { force: true });
  runOk(process.execPath, [VDISK_BIN, 'convert', '-f', 'raw', '-O', 'raw', halfSparse, target]);
  const cmp = runCmd('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', halfSparse, target]);
  const sparseOk = fs.statSync(target).blocks * 512 <= GiB / 2 + 16 * MiB;
  fs.rmSync(target, { force: true });
  results.push({ name: 'convert 1 GiB half-sparse raw->raw', unit: 'MB/s', qemu: GiB / median(q) / 1e6, vdisk: GiB / median(v) / 1e6 });

  printTable(results);
  if (cmp.status !== 0 || !sparseOk) console.log(`WARNING: vdisk convert output check failed: ${cmp.stdout}${cmp.stderr} sparse=${sparseOk}`);
  console.log(`total ${((Date.now() - started) / 1000).toFixed(0)} s`);
  // 1.5 GiB of scratch files: removed unless VDISK_BENCH_KEEP=1 (then the next run skips preparing).
  if (process.env.VDISK_BENCH_KEEP !== '1') fs.rmSync(DIR, { recursive: true, force: true });
}
