// npm run crashtest -- [--states 100000] [--seed N] [--mode M[,M]] [--format qcow2|raw[,..]]
//                      [--cluster 512,4096,65536] [--lazy on|off|both] [--ops 40]
//                      [--states-per-run 200] [--exhaustive 12] [--no-qemu-check] [--no-qemu-read]
//                      [--create-with qemu-img|vdisk] [--ignore-flushes] [--inject]
// npm run crashtest -- --repro '<json printed with a failure>' [--keep FILE]
//
// A longer crash campaign than CI runs: seeded guest workloads in every cache mode, on
// qcow2 (cluster sizes, lazy refcounts on/off) and raw, crash states checked as in
// src/crashlab/check.ts. --inject makes every third run fail one device request with EIO
// or ENOSPC (the guest sees the error, carries on, and the crash states must still hold). Prints states tested and failures per mode, then a reproducer
// command for each failure kept. Exit status 1 when any state failed.
import fs from 'node:fs';
import { CACHE_MODES, type CacheModeName } from '../src/block/cache-mode.js';
import { formats } from '../src/block/graph.js';
import { runCampaign, rebuildState, describeState, reproCommand, type ModeSummary } from '../src/crashlab/campaign.js';
import { checkWithVdisk, finishWithQemuCheck } from '../src/crashlab/check.js';
import type { StateKey } from '../src/crashlab/states.js';
import type { FaultRule } from '../src/filters/fault-injection.js';
import type { CrashFormat, WorkloadParams } from '../src/crashlab/workload.js';
// Registers 'qcow2' in the format table once the driver exists (graph.ts imports it).

function parseArgs(argv: string[]): Map<string, string> {
  const out = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument '${a}'`);
    const [k, v] = a.slice(2).split('=', 2);
    if (v !== undefined) out.set(k, v);
    else if (i + 1 < argv.length && !argv[i + 1].startsWith('--')) out.set(k, argv[++i]);
    else out.set(k, 'true');
  }
  return out;
}

function list(s: string | undefined, all: string[]): string[] {
  if (!s || s === 'all') return all;
  const out = s.split(',');
  for (const x of out) if (!all.includes(x)) throw new Error(`'${x}' is not one of ${all.join(', ')}`);
  return out;
}

async function repro(json: string, keep: string | undefined): Promise<number> {
  const r = JSON.parse(json) as { params: WorkloadParams; key: StateKey; ignoreFlushes?: boolean };
  const { run, image } = await rebuildState(r.params, r.key, { ignoreFlushes: r.ignoreFlushes });
  console.log(describeState(run, r.key, -1, { ignoreFlushes: r.ignoreFlushes }));
  const file = keep ?? `crash-state.${r.params.format}`;
  fs.writeFileSync(file, image);
  console.log(`crash state (before vdisk opened it) written to ${file}`);
  const dir = fs.mkdtempSync('/tmp/vdisk-repro-');
  try {
    const v = await finishWithQemuCheck(run, await checkWithVdisk(run, image, r.key.crashAt), r.key.crashAt, { workDir: dir });
    if (v.repaired) fs.writeFileSync(`${file}.after-open`, v.repaired);
    for (const n of v.notes) console.log(`note: ${n}`);
    for (const p of v.problems) console.log(`FAIL: ${p}`);
    console.log(v.ok ? 'state passes' : 'state fails');
    return v.ok ? 0 : 1;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<number> {
  const a = parseArgs(process.argv.slice(2));
  if (a.has('repro')) return repro(a.get('repro')!, a.get('keep'));
  const totalStates = Number(a.get('states') ?? 100000);
  const seed0 = Number(a.get('seed') ?? Date.now() % 1e6);
  const modes = list(a.get('mode'), Object.keys(CACHE_MODES)) as CacheModeName[];
  let fmts = list(a.get('format'), ['qcow2', 'raw']) as CrashFormat[];
  if (!formats.has('qcow2') && fmts.includes('qcow2')) {
    console.log('note: the qcow2 driver is not registered yet: raw only');
    fmts = fmts.filter((f) => f !== 'qcow2');
  }
  const clusters = (a.get('cluster') ?? '512,4096,65536').split(',').map(Number);
  const lazy = a.get('lazy') === 'on' ? [true] : a.get('lazy') === 'off' ? [false] : [false, true];
  const ops = Number(a.get('ops') ?? 40);
  const statesPerRun = Number(a.get('states-per-run') ?? 200);
  const ignoreFlushes = a.has('ignore-flushes');
  const createWith = (a.get('create-with') ?? 'qemu-img') as 'qemu-img' | 'vdisk';
  const inject = a.has('inject');

  const geometries: Array<Pick<WorkloadParams, 'format' | 'clusterSize' | 'lazyRefcounts'>> = [];
  for (const format of fmts) {
    if (format === 'raw') geometries.push({ format, clusterSize: 0, lazyRefcounts: false });
    else for (const c of clusters) for (const l of lazy) geometries.push({ format, clusterSize: c, lazyRefcounts: l });
  }
  let tested = 0;
  const started = Date.now();
  function* runs(): Generator<WorkloadParams> {
    for (let i = 0; tested < totalStates; i++) {
      const g = geometries[Math.floor(i / modes.length) % geometries.length];
      const seed = seed0 + i;
      const faults: FaultRule[] | undefined = inject && i % 3 === 2
        ? [{ op: seed % 4 === 0 ? 'flush' : 'write', nth: 1 + (seed % 17), code: seed % 2 ? 'EIO' : 'ENOSPC', sticky: seed % 5 === 0 }]
        : undefined;
      yield { seed, mode: modes[i % modes.length], ops, createWith, faults, ...g };
    }
  }
  console.log(`crash campaign: ${totalStates} states, seed ${seed0}, modes ${modes.join(',')}, ` +
    `${geometries.length} geometries, ${ops} guest ops per run, ${statesPerRun} states per run`);
  let lastPrint = Date.now();
  const result = await runCampaign(runs(), {
    statesPerRun, ignoreFlushes, keepFailures: 50,
    exhaustiveLimit: Number(a.get('exhaustive') ?? 12),
    qemuCheck: !a.has('no-qemu-check'),
    qemuRead: !a.has('no-qemu-read'),
    onRun: (_run, byMode) => {
      tested = Object.values(byMode).reduce((n, s) => n + s.states, 0);
      if (Date.now() - lastPrint > 10_000) {
        lastPrint = Date.now();
        const failures = Object.values(byMode).reduce((n, s) => n + s.failures, 0);
        console.log(`  ${tested} states, ${failures} failures, ${((Date.now() - started) / 1000).toFixed(0)} s`);
      }
    },
  });
  const table = (m: string, s: ModeSummary) =>
    `${m.padEnd(13)}${String(s.runs).padStart(6)}${String(s.states).padStart(10)}${String(s.checked).padStart(10)}${String(s.failures).padStart(10)}${String(s.unsafeNotes).padStart(14)}`;
  console.log(`\n${'mode'.padEnd(13)}${'runs'.padStart(6)}${'states'.padStart(10)}${'distinct'.padStart(10)}${'failures'.padStart(10)}${'unsafe-notes'.padStart(14)}`);
  for (const [m, s] of Object.entries(result.byMode)) console.log(table(m, s));
  for (const f of result.failures) {
    console.log(`\nFAIL ${f.detail}`);
    for (const p of f.problems.slice(0, 5)) console.log(`  ${p}`);
    console.log(`  ${reproCommand(f, { ignoreFlushes })}`);
  }
  const failed = Object.values(result.byMode).reduce((n, s) => n + s.failures, 0);
  console.log(`\n${tested} states, ${failed} failures (${((Date.now() - started) / 1000).toFixed(0)} s)`);
  return failed > 0 ? 1 : 0;
}

process.exitCode = await main();
