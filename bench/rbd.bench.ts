// rbd benchmark: `vdisk bench` vs `qemu-img bench` on the same rbd image of a single-node
// cluster, in the same run, with fio's rbd engine (librbd with nothing above it) as the
// ceiling.
//
// - 4 KiB reads and writes at depth 1 and 16. qemu-img bench only steps sequentially, so
//   vdisk and qemu-img use a step of 4096*7919 bytes (a prime number of blocks) modulo the
//   image: the same scattered offsets; fio uses its own random offsets (randread/randwrite).
// - 1 MiB sequential reads and writes at depth 4.
// - cache=writeback (rbd_cache=true) and cache=none (rbd_cache=false). fio gets the same
//   librbd setting through a ceph.conf copy that sets `rbd cache`.
//
// Cluster: VDISK_CEPH_CONF (as CI exports), else one started for the run under a temp dir
// (scripts/ceph-cluster.sh, memstore: the OSD holds the data in RAM, so the image is small).
// Rows run the tools back to back, rotating who goes first, for several rounds; medians.
// Ratios: vdisk/qemu-img and vdisk/fio throughput, above 1 means vdisk is faster.
import fs from 'node:fs';
import path from 'node:path';
import { VDISK_BIN, hasProgram, run as runCmd, runOk, tempDir, removeDir } from '../test/helpers.js';
import { startCluster, type Cluster } from '../test/rbd-cluster.js';
import { rbdStatus } from '../src/protocols/rbd.js';

const MiB = 1 << 20;
const IMAGE_SIZE = 256 * MiB;
const STEP = 4096 * 7919;
const ROUNDS = Number(process.env.VDISK_BENCH_ROUNDS ?? 3);

interface Row {
  name: string;
  write: boolean;
  depth: number;
  bs: number;
  random: boolean;
  cache: 'writeback' | 'none';
  count: number;
}

function rows(): Row[] {
  const out: Row[] = [];
  for (const cache of ['writeback', 'none'] as const) {
    for (const write of [false, true]) {
      out.push({ name: `${write ? 'write' : 'read'} 4k random depth 1`, write, depth: 1, bs: 4096, random: true, cache, count: write ? 1500 : 3000 });
      out.push({ name: `${write ? 'write' : 'read'} 4k random depth 16`, write, depth: 16, bs: 4096, random: true, cache, count: write ? 6000 : 12000 });
      out.push({ name: `${write ? 'write' : 'read'} 1M seq depth 4`, write, depth: 4, bs: MiB, random: false, cache, count: 256 });
    }
  }
  return out;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function benchArgs(r: Row): string[] {
  return ['-f', 'raw', '-t', r.cache, '-c', String(r.count), '-d', String(r.depth), '-s', String(r.bs),
    ...(r.random ? ['-S', String(STEP)] : []), ...(r.write ? ['-w'] : [])];
}

/** Throughput (ops/s) from the "Run completed in X seconds." line qemu-img and vdisk print. */
function benchRate(cmd: string, args: string[], r: Row, env: NodeJS.ProcessEnv): number {
  const res = runCmd(cmd, args, { env, timeout: 600_000 });
  if (res.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${res.status}: ${res.stderr}`);
  const out = res.stdout;
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  if (!m) throw new Error(`${cmd}: no "Run completed" line in: ${out}`);
  return r.count / Number(m[1]);
}

function fioRate(r: Row, image: string, conf: string): number {
  const rw = r.random ? (r.write ? 'randwrite' : 'randread') : r.write ? 'write' : 'read';
  const res = runCmd('fio', ['--name=bench', '--ioengine=rbd', '--clientname=admin', '--pool=rbd', `--rbdname=${image}`,
    `--rw=${rw}`, `--bs=${r.bs}`, `--iodepth=${r.depth}`, `--number_ios=${r.count}`, `--size=${IMAGE_SIZE}`,
    '--randrepeat=1', '--norandommap', '--output-format=json'], { env: { ...process.env, CEPH_CONF: conf }, timeout: 600_000 });
  if (res.status !== 0) throw new Error(`fio: ${res.stderr}${res.stdout.slice(0, 2000)}`);
  const job = JSON.parse(res.stdout.slice(res.stdout.indexOf('{'))).jobs[0];
  return r.write ? job.write.iops : job.read.iops;
}

export async function run(): Promise<void> {
  for (const [p, pkg] of [['qemu-img', 'qemu-utils'], ['fio', 'fio'], ['ceph-mon', 'ceph-mon ceph-osd ceph-common']] as const) {
    if (!hasProgram(p)) {
      console.log(`skipped: ${p} not installed (apt-get install ${pkg})`);
      return;
    }
  }
  if (rbdStatus() !== 'loaded') {
    console.log(`skipped: ${rbdStatus()}`);
    return;
  }
  const started = Date.now();
  let own: Cluster | null = null;
  const conf = process.env.VDISK_CEPH_CONF ?? (own = startCluster()).conf;
  const dir = tempDir('vdisk-bench-rbd-');
  try {
    const base = fs.readFileSync(conf, 'utf8');
    // The file ends in its [client] section: the last setting wins there (fio reads CEPH_CONF).
    const confs = { writeback: path.join(dir, 'cache-on.conf'), none: path.join(dir, 'cache-off.conf') };
    fs.writeFileSync(confs.writeback, `${base}\nrbd cache = true\n`);
    fs.writeFileSync(confs.none, `${base}\nrbd cache = false\n`);
    const env = { ...process.env, CEPH_CONF: conf };
    const image = `bench-${process.pid}`;
    runOk('rbd', ['--conf', conf, 'create', '--size', String(IMAGE_SIZE / MiB), `rbd/${image}`]);
    // Every object allocated, so reads fetch data rather than answer from the object map.
    runOk('rbd', ['--conf', conf, 'bench', '--io-type', 'write', '--io-size', '4M', '--io-pattern', 'seq',
      '--io-total', String(IMAGE_SIZE), `rbd/${image}`]);
    const name = `rbd:rbd/${image}`;
    const head = `${'workload'.padEnd(34)}  ${'qemu-img'.padStart(12)}  ${'vdisk'.padStart(12)}  ${'fio rbd'.padStart(12)}  ${'v/qemu'.padStart(6)}  ${'v/fio'.padStart(6)}`;
    console.log(head);
    console.log('-'.repeat(head.length));
    for (const r of rows()) {
      const q: number[] = [];
      const v: number[] = [];
      const f: number[] = [];
      const tools = [
        () => q.push(benchRate('qemu-img', ['bench', ...benchArgs(r), name], r, env)),
        () => v.push(benchRate(process.execPath, [VDISK_BIN, 'bench', ...benchArgs(r), name], r, env)),
        () => f.push(fioRate(r, image, confs[r.cache])),
      ];
      for (let round = 0; round < ROUNDS; round++) {
        for (let i = 0; i < tools.length; i++) tools[(i + round) % tools.length]();
      }
      const mb = r.bs >= MiB;
      const show = (ops: number) => (mb ? `${((ops * r.bs) / 1e6).toFixed(0)} MB/s` : `${ops.toFixed(0)} IOPS`).padStart(12);
      const [mq, mv, mf] = [median(q), median(v), median(f)];
      console.log(`${`${r.name}, ${r.cache}`.padEnd(34)}  ${show(mq)}  ${show(mv)}  ${show(mf)}  ${(mv / mq).toFixed(2).padStart(6)}  ${(mv / mf).toFixed(2).padStart(6)}`);
    }
    console.log(`(medians of ${ROUNDS} rounds, rotating which tool goes first; ratio = vdisk throughput / peer's, >1: vdisk faster)`);
    runCmd('rbd', ['--conf', conf, 'rm', '--no-progress', `rbd/${image}`], { timeout: 120_000 });
  } finally {
    removeDir(dir);
    own?.stop();
  }
  console.log(`total ${((Date.now() - started) / 1000).toFixed(0)} s`);
}
