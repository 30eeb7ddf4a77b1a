// NBD server throughput: `vdisk serve` vs qemu-nbd vs nbdkit's file plugin, same clients,
// same image, same run. fio's nbd engine (4 KiB random read/write at depth 1 and 16, 1 MiB
// sequential read/write) and nbdcopy (256 MiB in and out), over a UNIX socket and TCP
// loopback. Two cores are shared by client and server, so every round runs each server
// back to back (rotating the order) and the table shows medians over the rounds.
//
// VDISK_BENCH_ROUNDS (default 3), VDISK_BENCH_RUNTIME (seconds per fio job, default 2).
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { hasProgram, removeDir, tempDir } from '../test/helpers.js';
import {
  freePort, nbdUri, runPeer, startNbdkit, startQemuNbd, startVdisk, stopAll, type Daemon, type Endpoint,
} from '../test/nbd-helpers.js';

const MiB = 1 << 20;
const IMAGE_SIZE = 256 * MiB;
const ROUNDS = Number(process.env.VDISK_BENCH_ROUNDS ?? 3);
const RUNTIME = Number(process.env.VDISK_BENCH_RUNTIME ?? 2);

type ServerName = 'vdisk' | 'qemu-nbd' | 'nbdkit';
type Transport = 'unix' | 'tcp';

interface Workload {
  name: string;
  unit: 'IOPS' | 'MB/s';
  fio?: { rw: string; bs: string; iodepth: number; dir: 'read' | 'write' };
  copy?: 'in' | 'out';
}

const WORKLOADS: Workload[] = [
  { name: '4k randread qd1', unit: 'IOPS', fio: { rw: 'randread', bs: '4k', iodepth: 1, dir: 'read' } },
  { name: '4k randread qd16', unit: 'IOPS', fio: { rw: 'randread', bs: '4k', iodepth: 16, dir: 'read' } },
  { name: '4k randwrite qd1', unit: 'IOPS', fio: { rw: 'randwrite', bs: '4k', iodepth: 1, dir: 'write' } },
  { name: '4k randwrite qd16', unit: 'IOPS', fio: { rw: 'randwrite', bs: '4k', iodepth: 16, dir: 'write' } },
  { name: '1M seq read qd4', unit: 'MB/s', fio: { rw: 'read', bs: '1m', iodepth: 4, dir: 'read' } },
  { name: '1M seq write qd4', unit: 'MB/s', fio: { rw: 'write', bs: '1m', iodepth: 4, dir: 'write' } },
  { name: 'nbdcopy 256M in', unit: 'MB/s', copy: 'in' },
  { name: 'nbdcopy 256M out', unit: 'MB/s', copy: 'out' },
];

/** Random bytes written in 16 MiB pieces (no holes: reads must move data, see NOTES.md). */
function fillRandom(file: string, size: number): void {
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(16 * MiB);
  for (let off = 0; off < size; off += chunk.length) {
    crypto.randomFillSync(chunk);
    fs.writeSync(fd, chunk, 0, chunk.length, off);
  }
  fs.closeSync(fd);
}

async function startServer(name: ServerName, img: string, ep: Endpoint): Promise<Daemon> {
  switch (name) {
    case 'vdisk': return startVdisk(['-f', 'raw', '--cache', 'writeback', '-e', '16', img], ep);
    case 'qemu-nbd': return startQemuNbd(img, ep, ['--cache=writeback']);
    case 'nbdkit': return startNbdkit(img, ep);
  }
}

async function runFio(uri: string, w: NonNullable<Workload['fio']>, unit: Workload['unit']): Promise<number> {
  const r = await runPeer('fio', ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${w.rw}`, `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`, '--size=256m', '--time_based', `--runtime=${RUNTIME}`, '--ramp_time=0.5',
    '--invalidate=0', '--norandommap', '--randrepeat=0', '--output-format=json'], { timeoutMs: (RUNTIME + 30) * 1000 });
  if (r.status !== 0) throw new Error(`fio ${w.rw} ${w.bs}: ${r.stderr || r.stdout}`);
  const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0][w.dir];
  return unit === 'IOPS' ? job.iops : job.bw_bytes / 1e6;
}

async function runCopy(uri: string, dir: 'in' | 'out', src: string): Promise<number> {
  const args = dir === 'in' ? [src, uri] : [uri, 'null:'];
  const t0 = performance.now();
  const r = await runPeer('nbdcopy', args, { timeoutMs: 120_000 });
  const secs = (performance.now() - t0) / 1000;
  if (r.status !== 0) throw new Error(`nbdcopy ${dir}: ${r.stderr}`);
  return IMAGE_SIZE / 1e6 / secs;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function fmt(v: number | undefined): string {
  if (v === undefined || Number.isNaN(v)) return '—';
  return v >= 100 ? Math.round(v).toLocaleString('en-US') : v.toFixed(1);
}

export async function run(): Promise<void> {
  const servers: ServerName[] = ['vdisk'];
  if (hasProgram('qemu-nbd')) servers.push('qemu-nbd');
  else console.log('qemu-nbd not installed (apt-get install qemu-utils): skipped');
  if (hasProgram('nbdkit')) servers.push('nbdkit');
  else console.log('nbdkit not installed (apt-get install nbdkit): skipped');
  const workloads = WORKLOADS.filter((w) => (w.fio ? hasProgram('fio') : hasProgram('nbdcopy')));
  if (workloads.length < WORKLOADS.length) console.log('fio or nbdcopy not installed: some workloads skipped');

  const dir = tempDir('vdisk-nbd-bench-');
  try {
    const img = path.join(dir, 'disk.raw');
    const src = path.join(dir, 'src.raw');
    fillRandom(img, IMAGE_SIZE);
    fillRandom(src, IMAGE_SIZE);
    const transports: Transport[] = ['unix', 'tcp'];
    // results[transport][workload][server] = one number per round
    const results = new Map<string, number[]>();
    const key = (t: Transport, w: string, s: ServerName): string => `${t}|${w}|${s}`;
    const started = performance.now();

    for (let round = 0; round < ROUNDS; round++) {
      // Rotate the server order each round so none always runs first (or last).
      const order = servers.map((_, i) => servers[(i + round) % servers.length]);
      for (const transport of transports) {
        for (const s of order) {
          // One server at a time: qemu-nbd locks the image, and the cores are shared.
          // A fresh socket path each time: nbdkit leaves its socket behind on SIGTERM.
          const ep: Endpoint = transport === 'unix' ? { socket: path.join(dir, `${s}-${round}.sock`) } : { port: await freePort() };
          const d = await startServer(s, img, ep);
          try {
            const uri = nbdUri(ep);
            for (const w of workloads) {
              const v = w.fio ? await runFio(uri, w.fio, w.unit) : await runCopy(uri, w.copy!, src);
              const k = key(transport, w.name, s);
              results.set(k, [...(results.get(k) ?? []), v]);
            }
          } finally {
            await d.stop();
          }
        }
      }
      console.log(`round ${round + 1}/${ROUNDS} done (${((performance.now() - started) / 1000).toFixed(0)} s)`);
    }

    const peers = servers.filter((s) => s !== 'vdisk');
    const header = ['transport', 'workload', 'unit', ...servers, 'vdisk/qemu-nbd', 'vdisk/best peer'];
    const rows: string[][] = [];
    for (const t of transports) {
      for (const w of workloads) {
        const med = Object.fromEntries(servers.map((s) => [s, median(results.get(key(t, w.name, s)) ?? [NaN])])) as Record<ServerName, number>;
        const best = Math.max(...peers.map((p) => med[p]));
        rows.push([t, w.name, w.unit, ...servers.map((s) => fmt(med[s])),
          med['qemu-nbd'] ? (med.vdisk / med['qemu-nbd']).toFixed(2) : '—',
          peers.length ? (med.vdisk / best).toFixed(2) : '—']);
      }
    }
    const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
    const line = (cells: string[]): string => cells.map((c, i) => (i < 3 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
    console.log(`\nmedians of ${ROUNDS} rounds, fio ${RUNTIME} s per job; image ${IMAGE_SIZE / MiB} MiB of random data; servers with cache=writeback`);
    console.log(line(header));
    console.log(widths.map((n) => '-'.repeat(n)).join('  '));
    for (const r of rows) console.log(line(r));
  } finally {
    await stopAll();
    removeDir(dir);
  }
}
