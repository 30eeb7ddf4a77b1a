// qcow2 benchmark: `vdisk convert` vs `qemu-img convert` (raw->qcow2, qcow2->raw, -c) on a
// 2 GiB image, and `vdisk bench` vs `qemu-img bench` on qcow2 (4 KiB writes that allocate
// clusters, and 4 KiB reads), on the same files, in the same run.
//
// L2 cache: both sides run with their default, which in both is "cover the whole disk up to
// 32 MiB of L2 tables" (QEMU >= 3.1 on Linux; vdisk's DEFAULT_L2_CACHE_MAX_SIZE): a 2 GiB
// image with 64 KiB clusters needs 256 KiB, so both caches hold every L2 table. (vdisk
// convert/bench take no --image-opts, so an explicit l2-cache-size cannot be passed to both.)
//
// Offsets for bench: qemu-img bench only steps sequentially, so both sides use a step of
// 4096*7919 bytes (a prime number of blocks) wrapping at the end of the image: an identical,
// scattered offset sequence on both sides. Rows alternate which tool goes first; medians.
// Ratio = vdisk throughput / qemu-img throughput (>1: vdisk faster).
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { VDISK_BIN, hasProgram, runOk } from '../test/helpers.js';

const GiB = 1 << 30;
const MiB = 1 << 20;
const STEP = 4096 * 7919;
const ROUNDS = Number(process.env.VDISK_BENCH_ROUNDS ?? 2);
const DIR = process.env.VDISK_BENCH_DIR ?? '/var/tmp/vdisk-bench-qcow2';
/** Data in the 2 GiB source: 1 MiB every 4 MiB (512 MiB), half random, half compressible. */
const DATA_BYTES = 512 * MiB;

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

function timed(cmd: string, args: string[]): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 16 << 20 });
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return secs;
}

const vdiskArgs = (args: string[]) => [VDISK_BIN, ...args];

function benchSeconds(out: string, who: string): number {
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  if (!m) throw new Error(`${who}: no "Run completed" line in: ${out}`);
  return Number(m[1]);
}

function prepare(): string {
  fs.mkdirSync(DIR, { recursive: true });
  const src = path.join(DIR, 'src-2g.raw');
  if (fs.existsSync(src) && fs.statSync(src).size === 2 * GiB) return src;
  console.log('preparing a 2 GiB raw file with 512 MiB of data ...');
  const fd = fs.openSync(src, 'w');
  const chunk = Buffer.alloc(MiB);
  const text = Buffer.from('qcow2 benchmark: compressible text block 0123456789 abcdefghijklmnopqrstuvwxyz\n');
  for (let off = 0; off < 2 * GiB; off += 4 * MiB) {
    crypto.randomFillSync(chunk, 0, MiB / 2);
    for (let i = MiB / 2; i < MiB; i += text.length) text.copy(chunk, i, 0, Math.min(text.length, MiB - i));
    fs.writeSync(fd, chunk, 0, MiB, off);
  }
  fs.ftruncateSync(fd, 2 * GiB);
  fs.closeSync(fd);
  return src;
}

interface Row {
  name: string;
  unit: string;
  qemu: number;
  vdisk: number;
}

/** Alternate order each round; returns [qemu seconds, vdisk seconds] medians. */
function pair(rounds: number, qemu: () => number, vdisk: () => number): [number, number] {
  const q: number[] = [];
  const v: number[] = [];
  for (let i = 0; i < rounds; i++) {
    if (i % 2 === 0) {
      q.push(qemu());
      v.push(vdisk());
    } else {
      v.push(vdisk());
      q.push(qemu());
    }
  }
  return [median(q), median(v)];
}

export async function run(): Promise<void> {
  for (const p of ['qemu-img']) {
    if (!hasProgram(p)) {
      console.log(`skipped: ${p} not installed (apt-get install qemu-utils)`);
      return;
    }
  }
  const started = Date.now();
  const src = prepare();
  spawnSync('sync');
  const rows: Row[] = [];
  const qOut = path.join(DIR, 'q-out');
  const vOut = path.join(DIR, 'v-out');
  const rm = (f: string) => fs.rmSync(f, { force: true });
  const mbps = (secs: number) => DATA_BYTES / secs / 1e6;

  // raw -> qcow2
  let [q, v] = pair(ROUNDS,
    () => { rm(qOut); return timed('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', src, qOut]); },
    () => { rm(vOut); return timed(process.execPath, vdiskArgs(['convert', '-f', 'raw', '-O', 'qcow2', src, vOut])); });
  rows.push({ name: 'convert raw->qcow2 (2 GiB, 512 MiB data)', unit: 'MB/s', qemu: mbps(q), vdisk: mbps(v) });
  const cmp = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', src, vOut], { encoding: 'utf8' });
  if (cmp.status !== 0) console.log(`WARNING: vdisk raw->qcow2 output differs: ${cmp.stdout}${cmp.stderr}`);
  const chk = spawnSync('qemu-img', ['check', vOut], { encoding: 'utf8' });
  if (chk.status !== 0) console.log(`WARNING: qemu-img check of vdisk's qcow2 exited ${chk.status}`);

  // qcow2 -> raw, from the image qemu-img made
  const qcowSrc = path.join(DIR, 'src.qcow2');
  fs.renameSync(qOut, qcowSrc);
  [q, v] = pair(ROUNDS,
    () => { rm(qOut); return timed('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcowSrc, qOut]); },
    () => { rm(vOut); return timed(process.execPath, vdiskArgs(['convert', '-f', 'qcow2', '-O', 'raw', qcowSrc, vOut])); });
  rows.push({ name: 'convert qcow2->raw', unit: 'MB/s', qemu: mbps(q), vdisk: mbps(v) });

  // -c (zlib), one round: the slowest row
  [q, v] = pair(1,
    () => { rm(qOut); return timed('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', src, qOut]); },
    () => { rm(vOut); return timed(process.execPath, vdiskArgs(['convert', '-c', '-f', 'raw', '-O', 'qcow2', src, vOut])); });
  rows.push({ name: 'convert -c raw->qcow2 (zlib)', unit: 'MB/s', qemu: mbps(q), vdisk: mbps(v) });
  const cmpC = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', src, vOut], { encoding: 'utf8' });
  if (cmpC.status !== 0) console.log(`WARNING: vdisk convert -c output differs: ${cmpC.stdout}${cmpC.stderr}`);
  const sizes = `qemu ${(fs.statSync(qOut).size / MiB).toFixed(0)} MiB, vdisk ${(fs.statSync(vOut).size / MiB).toFixed(0)} MiB`;
  rm(qOut);
  rm(vOut);

  // bench: 4 KiB writes that allocate, into a fresh 2 GiB qcow2 each run
  const writes = Number(process.env.VDISK_BENCH_QCOW2_WRITES ?? 20000);
  const fresh = (f: string) => { rm(f); runOk('qemu-img', ['create', '-q', '-f', 'qcow2', f, '2G']); };
  const wargs = ['-w', '-t', 'writeback', '-d', '16', '-s', '4k', '-S', String(STEP), '-c', String(writes)];
  [q, v] = pair(ROUNDS,
    () => { fresh(qOut); return benchSeconds(runOk('qemu-img', ['bench', '-f', 'qcow2', ...wargs, qOut]), 'qemu-img bench'); },
    () => { fresh(vOut); return benchSeconds(runOk(process.execPath, vdiskArgs(['bench', '-f', 'qcow2', ...wargs, vOut])), 'vdisk bench'); });
  rows.push({ name: `bench 4k allocating writes, depth 16 (${writes})`, unit: 'IOPS', qemu: writes / q, vdisk: writes / v });
  const wchk = spawnSync('qemu-img', ['check', vOut], { encoding: 'utf8' });
  if (wchk.status !== 0) console.log(`WARNING: qemu-img check after vdisk bench -w exited ${wchk.status}`);
  rm(qOut);
  rm(vOut);

  // bench: 4 KiB reads over the 512 MiB-data qcow2 (data and holes)
  const reads = Number(process.env.VDISK_BENCH_QCOW2_READS ?? 50000);
  const rargs = ['-t', 'writeback', '-d', '16', '-s', '4k', '-S', String(STEP), '-c', String(reads)];
  [q, v] = pair(ROUNDS + 1,
    () => benchSeconds(runOk('qemu-img', ['bench', '-f', 'qcow2', ...rargs, qcowSrc]), 'qemu-img bench'),
    () => benchSeconds(runOk(process.execPath, vdiskArgs(['bench', '-f', 'qcow2', ...rargs, qcowSrc])), 'vdisk bench'));
  rows.push({ name: `bench 4k reads, depth 16 (${reads})`, unit: 'IOPS', qemu: reads / q, vdisk: reads / v });

  const w = Math.max(...rows.map((r) => r.name.length));
  const head = `${'qcow2'.padEnd(w)}  ${'qemu-img'.padStart(14)}  ${'vdisk'.padStart(14)}  ${'ratio'.padStart(6)}`;
  console.log(head);
  console.log('-'.repeat(head.length));
  const fmt = (x: number, unit: string) => `${x.toFixed(x < 100 ? 1 : 0)} ${unit}`.padStart(14);
  for (const r of rows) console.log(`${r.name.padEnd(w)}  ${fmt(r.qemu, r.unit)}  ${fmt(r.vdisk, r.unit)}  ${(r.vdisk / r.qemu).toFixed(2).padStart(6)}`);
  console.log(`(medians of ${ROUNDS} rounds, -c one round, reads ${ROUNDS + 1}; convert MB/s counts the 512 MiB of data; compressed sizes: ${sizes})`);
  console.log(`total ${((Date.now() - started) / 1000).toFixed(0)} s`);
}
