// A crash campaign: record runs, choose crash states, materialise and check each one, and
// keep every failure with what it takes to rebuild it (run params + state key).
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { checkWithVdisk, finishWithQemuCheck, type StateVerdict } from './check.js';
import { SyncedImage, buildState, chooseStates, materialise, stateDigest, type StateKey, type StateOptions } from './states.js';
import { describeParams, recordRun, type RecordedRun, type WorkloadParams } from './workload.js';

export interface Failure {
  params: WorkloadParams;
  key: StateKey;
  problems: string[];
  /** Pending entries at the crash point, and how the state persisted them. */
  detail: string;
}

export interface ModeSummary {
  runs: number;
  /** States materialised (before removing duplicates). */
  states: number;
  /** Distinct images checked. */
  checked: number;
  failures: number;
  /** cache=unsafe only: states that did not open, or that qemu-img check found corrupt. */
  unsafeNotes: number;
}

export interface CampaignOptions extends StateOptions {
  /** States per recorded run. */
  statesPerRun: number;
  /** Run qemu-img check (qcow2). */
  qemuCheck?: boolean;
  /** Compare vdisk's read of each state with QEMU's (qcow2). */
  qemuRead?: boolean;
  /** qemu-img checks in flight at once. */
  concurrency?: number;
  /** Negative tests: damage each state before it is checked. */
  mutate?: (image: Buffer, run: RecordedRun) => void;
  /** Keep at most this many failures (all are counted). */
  keepFailures?: number;
  onRun?: (run: RecordedRun, summary: Record<string, ModeSummary>) => void;
}

export interface CampaignResult {
  byMode: Record<string, ModeSummary>;
  failures: Failure[];
}

function workDir(): string {
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  return fs.mkdtempSync(path.join(base, 'vdisk-crashlab-'));
}

/** Check the chosen states of one recorded run. */
export async function checkRun(run: RecordedRun, opts: CampaignOptions, result: CampaignResult, dir: string): Promise<void> {
  const mode = run.params.mode;
  const s = (result.byMode[mode] ??= { runs: 0, states: 0, checked: 0, failures: 0, unsafeNotes: 0 });
  s.runs++;
  const keys = chooseStates(run.log, run.endLog, opts.statesPerRun, run.params.seed, opts);
  const synced = new SyncedImage(run.base, run.log);
  const seen = new Set<string>();
  const inFlight = new Set<Promise<void>>();
  const limit = opts.concurrency ?? 2;
  for (const key of keys) {
    const spec = buildState(run.log, key, opts.ignoreFlushes);
    const image = materialise(synced, run.log, spec);
    opts.mutate?.(image, run);
    s.states++;
    // A mutated image is not described by its spec any more: hash all of it.
    const digest = (opts.mutate ? createHash('sha1').update(image).digest('hex') : stateDigest(image, synced.at(spec.synced), run.log, spec)) +
      `@${runSegment(run, key.crashAt)}`;
    if (seen.has(digest)) continue;
    seen.add(digest);
    s.checked++;
    const verdict = await checkWithVdisk(run, image, key.crashAt, { consume: true });
    const p = finishWithQemuCheck(run, verdict, key.crashAt, { workDir: dir, qemuCheck: opts.qemuCheck, qemuRead: opts.qemuRead })
      .then((v) => record(v, run, key, spec.persist.length, opts, result, s))
      .finally(() => inFlight.delete(p));
    inFlight.add(p);
    while (inFlight.size >= limit) await Promise.race(inFlight);
  }
  await Promise.all(inFlight);
}

/**
 * The same image bytes may be judged differently at different crash points (what must read
 * back depends on which flushes completed), so duplicates are only skipped within one
 * stretch of the log that shares a durability point.
 */
function runSegment(run: RecordedRun, crashAt: number): number {
  return run.model.durablePointIndex(crashAt) * 1e6 + countOpsIssuedBefore(run, crashAt);
}

function countOpsIssuedBefore(run: RecordedRun, crashAt: number): number {
  let n = 0;
  for (const op of run.model.ops) if (op.logStart < crashAt) n++;
  return n;
}

function record(v: StateVerdict, run: RecordedRun, key: StateKey, persisted: number, opts: CampaignOptions, result: CampaignResult, s: ModeSummary): void {
  if (v.notes.length > 0) s.unsafeNotes++;
  if (v.ok) return;
  s.failures++;
  if (result.failures.length >= (opts.keepFailures ?? 20)) return;
  result.failures.push({ params: run.params, key, problems: v.problems, detail: describeState(run, key, persisted, opts) });
}

export function describeState(run: RecordedRun, key: StateKey, persisted: number, opts: StateOptions = {}): string {
  const spec = buildState(run.log, key, opts.ignoreFlushes);
  const pending = run.log.slice(spec.synced, key.crashAt).filter((e) => e.kind !== 'flush').length;
  const show = (i: number) => {
    const e = run.log[i];
    if (e.kind === 'write') return `#${i} write ${e.offset}+${e.data.length}`;
    if (e.kind === 'zero' || e.kind === 'discard') return `#${i} ${e.kind} ${e.offset}+${e.length}`;
    if (e.kind === 'truncate') return `#${i} truncate ${e.length}`;
    return `#${i} flush`;
  };
  const kept = spec.persist.map((p) => show(p.index) + (p.sectors ? ` torn[${p.sectors.length} sectors]` : '')).join(', ');
  return `${describeParams(run.params)}; crash after ${key.crashAt}/${run.endLog} log entries; synced ${spec.synced}; ${pending} pending, ${persisted} persisted: ${kept || 'none'}`;
}

/** Record and check every run; returns per-mode counts and the failures kept. */
export async function runCampaign(runs: Iterable<WorkloadParams>, opts: CampaignOptions): Promise<CampaignResult> {
  const result: CampaignResult = { byMode: {}, failures: [] };
  const dir = workDir();
  try {
    for (const params of runs) {
      const run = await recordRun(params);
      await checkRun(run, opts, result, dir);
      opts.onRun?.(run, result.byMode);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return result;
}

/** Rebuild one state's image bytes (before vdisk opens it), for a reproducer. */
export async function rebuildState(params: WorkloadParams, key: StateKey, opts: StateOptions = {}): Promise<{ run: RecordedRun; image: Buffer }> {
  const run = await recordRun(params);
  const spec = buildState(run.log, key, opts.ignoreFlushes);
  return { run, image: materialise(new SyncedImage(run.base, run.log), run.log, spec) };
}

/** The command line that replays one failure. */
export function reproCommand(f: Pick<Failure, 'params' | 'key'>, opts: StateOptions = {}): string {
  const repro = JSON.stringify({ params: f.params, key: f.key, ignoreFlushes: opts.ignoreFlushes || undefined });
  return `npm run crashtest -- --repro '${repro}'`;
}
