// Checking one crash state, the way a host would meet it after the power comes back:
//  1. open it with vdisk, writable (so a dirty lazy-refcounts image is repaired on open);
//  2. read the whole guest disk and hold it against the guest model (durability);
//  3. close it, then run `qemu-img check` on the result (qcow2): corruption fails, leaks
//     are allowed (QEMU's own promise: a crash may leak clusters, never corrupt);
//  4. let QEMU read the guest disk of the result (qemu-img convert to raw): it must hold
//     exactly what vdisk read, so a state vdisk misreads or damages while repairing is
//     caught by an independent reader.
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
  /** The guest disk as vdisk read it. */
  disk?: Buffer;
}

export interface CheckOptions {
  /** Run qemu-img check (qcow2 only; default true). */
  qemuCheck?: boolean;
  /** Compare with QEMU's read of the guest disk (qcow2 only; default true). */
  qemuRead?: boolean;
  /** Directory for the files qemu-img checks. */
  workDir: string;
}

const READ_CHUNK = 1 << 20;

/** Steps 1 and 2: open, read back, verify, close. `image` is not modified unless `consume`. */
export async function checkWithVdisk(run: RecordedRun, image: Buffer, crashAt: number, o: { consume?: boolean } = {}): Promise<StateVerdict> {
  const unsafe = run.params.mode === 'unsafe';
  const problems: string[] = [];
  const notes: string[] = [];
  const mem = openMemory(0, 'crash-state');
  (mem.driver as MemoryDriver).data = o.consume ? image : Buffer.from(image);
  let node: BlockNode;
  let disk: Buffer | undefined;
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
    const buf = Buffer.alloc(run.size);
    for (let pos = 0; pos < run.size; pos += READ_CHUNK) {
      await node.pread(pos, buf.subarray(pos, Math.min(run.size, pos + READ_CHUNK)));
    }
    disk = buf;
    if (!unsafe) problems.push(...verifyDisk(run, disk, crashAt, ''));
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
  return { ok: problems.length === 0, problems, notes, repaired: (mem.driver as MemoryDriver).data, disk };
}

function verifyDisk(run: RecordedRun, disk: Buffer, crashAt: number, who: string): string[] {
  const show = (t: number) => (t === 0 ? 'zeros' : t < 0 ? 'garbage' : `op#${t}`);
  return run.model.verify(disk, crashAt).map((m) =>
    `${who}guest sector ${m.lba} (byte ${m.lba * 512}) reads ${show(m.found)}, expected one of ${m.allowed.map(show).join('/')}`);
}

/** The guest disk of an image file as QEMU reads it. */
function qemuImgRead(file: string, format: string, size: number): Promise<Buffer> {
  const out = `${file}.raw`;
  return new Promise((resolve, reject) => {
    execFile('qemu-img', ['convert', '-f', format, '-O', 'raw', file, out], (err, _stdout, stderr) => {
      if (err) return reject(new Error(`qemu-img convert: ${stderr.trim() || err.message}`));
      fs.readFile(out).then((b) => {
        const disk = Buffer.alloc(size);
        b.copy(disk, 0, 0, Math.min(size, b.length));
        resolve(disk);
      }, reject).finally(() => fs.rm(out, { force: true }));
    });
  });
}

function firstDifference(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i += 512) {
    if (!a.subarray(i, i + 512).equals(b.subarray(i, i + 512))) return i;
  }
  return a.length === b.length ? -1 : n;
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
export async function finishWithQemuCheck(run: RecordedRun, verdict: StateVerdict, crashAt: number, opts: CheckOptions): Promise<StateVerdict> {
  if (run.params.format !== 'qcow2' || opts.qemuCheck === false || !verdict.repaired) return verdict;
  const file = path.join(opts.workDir, `state-${process.pid}-${fileSeq++}.qcow2`);
  await fs.writeFile(file, verdict.repaired);
  try {
    const r = await qemuImgCheck(file, 'qcow2');
    if (r.status !== 0 && r.status !== 3) {
      if (run.params.mode === 'unsafe') verdict.notes.push(`qemu-img check: ${r.summary}`);
      else verdict.problems.push(`qemu-img check: ${r.summary}`);
    } else if (opts.qemuRead !== false && verdict.disk) {
      const found: string[] = [];
      try {
        const qdisk = await qemuImgRead(file, 'qcow2', run.size);
        const at = firstDifference(verdict.disk, qdisk);
        if (at >= 0) found.push(`vdisk and QEMU read different data at guest byte ${at}`);
        if (run.params.mode !== 'unsafe') found.push(...verifyDisk(run, qdisk, crashAt, 'QEMU: '));
      } catch (err) {
        found.push((err as Error).message);
      }
      if (run.params.mode === 'unsafe') verdict.notes.push(...found);
      else verdict.problems.push(...found);
    }
  } finally {
    await fs.rm(file, { force: true });
  }
  verdict.ok = verdict.problems.length === 0;
  return verdict;
}
