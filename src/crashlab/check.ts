// Checking one crash state, the way a host would meet it after the power comes back:
//  1. open it with vdisk, writable (so a dirty lazy-refcounts image is repaired on open);
//  2. read the whole guest disk and hold it against the guest model (durability);
//  3. close it, then run `qemu-img check` on the result (qcow2): corruption fails, leaks
//     are allowed (QEMU's own promise: a crash may leak clusters, never corrupt).
// cache=unsafe promises nothing: there the state only has to open, or fail to open with a
// clean VdiskError; qemu-img check still runs but its verdict is reported, not failed.
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { VdiskError } from '../block/errors.js';
import { openFormatOn } from '../block/graph.js';
import { MemoryDriver, openMemory } from '../protocols/memory.js';
import type { BlockNode } from '../block/node.js';
import type { RecordedRun } from './workload.js';

export interface QemuCheckResult {
  /** qemu-img check exit status: 0 clean, 1 check failed, 2 corrupt, 3 leaks only. */
  status: number;
  corruptions: number;
  leaks: number;
  summary: string;
}

export interface StateVerdict {
  ok: boolean;
  problems: string[];
  /** For cache=unsafe: what happened, informational. */
  notes: string[];
  /** The image after vdisk opened and closed it (what qemu-img check is given). */
  repaired?: Buffer;
}

export interface CheckOptions {
  /** Run qemu-img check (qcow2 only; default true). */
  qemuCheck?: boolean;
  /** Directory for the files qemu-img checks. */
  workDir: string;
}

const READ_CHUNK = 1 << 20;

/** Steps 1 and 2: open, read back, verify, close. `image` is not modified. */
export async function checkWithVdisk(run: RecordedRun, image: Buffer, crashAt: number): Promise<StateVerdict> {
  const unsafe = run.params.mode === 'unsafe';
  const problems: string[] = [];
  const notes: string[] = [];
  const mem = openMemory(0, 'crash-state');
  (mem.driver as MemoryDriver).data = Buffer.from(image);
  let node: BlockNode;
  try {
    node = await openFormatOn(mem, 'crash-state', { format: run.params.format });
  } catch (err) {
    const clean = err instanceof VdiskError;
    const msg = `open failed${clean ? '' : ' (not a VdiskError)'}: ${(err as Error)?.stack ?? err}`;
    if (unsafe && clean) notes.push(msg);
    else problems.push(msg);
    return { ok: problems.length === 0, problems, notes };
  }
  try {
    if (node.getLength() !== run.size) problems.push(`virtual size ${node.getLength()} != ${run.size}`);
    const disk = Buffer.alloc(run.size);
    for (let pos = 0; pos < run.size; pos += READ_CHUNK) {
      await node.pread(pos, disk.subarray(pos, Math.min(run.size, pos + READ_CHUNK)));
    }
    if (!unsafe) {
      for (const m of run.model.verify(disk, crashAt)) {
        const show = (t: number) => (t === 0 ? 'zeros' : t < 0 ? 'garbage' : `op#${t}`);
        problems.push(`guest sector ${m.lba} (byte ${m.lba * 512}) reads ${show(m.found)}, expected one of ${m.allowed.map(show).join('/')}`);
      }
    }
  } catch (err) {
    const clean = err instanceof VdiskError;
    const msg = `read failed${clean ? '' : ' (not a VdiskError)'}: ${(err as Error)?.stack ?? err}`;
    if (unsafe && clean) notes.push(msg);
    else problems.push(msg);
  }
  try {
    await node.close();
  } catch (err) {
    const msg = `close failed: ${(err as Error)?.message ?? err}`;
    if (unsafe && err instanceof VdiskError) notes.push(msg);
    else problems.push(msg);
  }
  return { ok: problems.length === 0, problems, notes, repaired: (mem.driver as MemoryDriver).data };
}

/** qemu-img check --output=json on a file. */
export function qemuImgCheck(file: string, format: string): Promise<QemuCheckResult> {
  return new Promise((resolve, reject) => {
    execFile('qemu-img', ['check', '--output=json', '-f', format, file], { maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      const status = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      if (status === -1) return reject(err);
      let corruptions = 0;
      let leaks = 0;
      try {
        const j = JSON.parse(stdout) as { corruptions?: number; leaks?: number; 'check-errors'?: number };
        corruptions = j.corruptions ?? 0;
        leaks = j.leaks ?? 0;
      } catch {
        // no JSON: the check could not run at all (status 1)
      }
      const summary = status === 0 ? 'clean' : status === 3 ? `${leaks} leaked clusters`
        : `status ${status}, ${corruptions} corruptions, ${leaks} leaks: ${(stderr || stdout).trim().split('\n').slice(0, 6).join(' | ')}`;
      resolve({ status, corruptions, leaks, summary });
    });
  });
}

let fileSeq = 0;

/** Step 3 for a state vdisk has opened and closed; adds to the verdict. */
export async function finishWithQemuCheck(run: RecordedRun, verdict: StateVerdict, opts: CheckOptions): Promise<StateVerdict> {
  if (run.params.format !== 'qcow2' || opts.qemuCheck === false || !verdict.repaired) return verdict;
  const file = path.join(opts.workDir, `state-${process.pid}-${fileSeq++}.qcow2`);
  await fs.writeFile(file, verdict.repaired);
  try {
    const r = await qemuImgCheck(file, 'qcow2');
    if (r.status !== 0 && r.status !== 3) {
      if (run.params.mode === 'unsafe') verdict.notes.push(`qemu-img check: ${r.summary}`);
      else verdict.problems.push(`qemu-img check: ${r.summary}`);
    }
  } finally {
    await fs.rm(file, { force: true });
  }
  verdict.ok = verdict.problems.length === 0;
  return verdict;
}
