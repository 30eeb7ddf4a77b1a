// vdisk check [-f FMT] [-r leaks|all] [--output=human|json] [-q] FILE
// Output and exit codes are qemu-img check's: 0 clean, 1 check not completed, 2 corruptions,
// 3 leaks only, 63 format without checks (raw).
import type { Command } from 'commander';
import { VdiskError, invalidArgument } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { openProtocol } from '../../block/graph.js';
import { QCOW_MAGIC } from '../../formats/qcow2/constants.js';
import { checkQcow2, type CheckResult } from '../../formats/qcow2/check.js';
import { outputFormat, printJson, reportError } from '../common.js';

export const EXIT_CHECK_UNSUPPORTED = 63;

/** QEMU's tdb_hash (qobject/qdict.c): QDict iteration order is by hash bucket. */
function tdbHash(name: string): number {
  let v = Math.imul(0x238f13af, name.length) >>> 0;
  for (let i = 0; i < name.length; i++) v = (v + ((name.charCodeAt(i) << ((i * 5) % 24)) >>> 0)) >>> 0;
  return (Math.imul(1103515243, v) + 12345) >>> 0;
}

/**
 * Reorder an object's keys the way qemu-img prints a QDict (bucket = tdb_hash % 512,
 * ascending; newest first within a bucket), so JSON output is byte-identical to qemu-img's.
 */
export function qemuKeyOrder(obj: Record<string, unknown>): Record<string, unknown> {
  const keys = Object.keys(obj).map((k, i) => ({ k, i, b: tdbHash(k) % 512 }));
  keys.sort((a, b) => a.b - b.b || b.i - a.i);
  const out: Record<string, unknown> = {};
  for (const { k } of keys) out[k] = obj[k];
  return out;
}

/** qemu-img's ImageCheck JSON (QAPI field order): optional fields only when non-zero. */
function checkJson(r: CheckResult, filename: string, format: string): Record<string, unknown> {
  const j: Record<string, unknown> = { filename, format, 'check-errors': r.checkErrors };
  if (r.imageEndOffset) j['image-end-offset'] = r.imageEndOffset;
  if (r.corruptions) j.corruptions = r.corruptions;
  if (r.leaks) j.leaks = r.leaks;
  if (r.corruptionsFixed) j['corruptions-fixed'] = r.corruptionsFixed;
  if (r.leaksFixed) j['leaks-fixed'] = r.leaksFixed;
  if (r.totalClusters) j['total-clusters'] = r.totalClusters;
  if (r.allocatedClusters) j['allocated-clusters'] = r.allocatedClusters;
  if (r.fragmentedClusters) j['fragmented-clusters'] = r.fragmentedClusters;
  if (r.compressedClusters) j['compressed-clusters'] = r.compressedClusters;
  return qemuKeyOrder(j);
}

function humanReport(r: CheckResult): string {
  let s = '';
  if (!(r.corruptions || r.leaks || r.checkErrors)) {
    s += 'No errors were found on the image.\n';
  } else {
    if (r.corruptions) {
      s += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (r.leaks) s += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (r.checkErrors) s += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
  }
  if (r.totalClusters !== 0 && r.allocatedClusters !== 0) {
    const pct = (n: number, d: number) => ((n * 100) / d).toFixed(2);
    s += `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, `
      + `${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters\n`;
  }
  if (r.imageEndOffset) s += `Image end offset: ${r.imageEndOffset}\n`;
  return s;
}

async function probeIsQcow2(file: BlockNode): Promise<boolean> {
  if (file.getLength() < 4) return false;
  const head = Buffer.alloc(4);
  await file.pread(0, head);
  return head.readUInt32BE(0) === QCOW_MAGIC;
}

export interface CheckCommandOptions {
  format?: string;
  repair?: string;
  output?: string;
  quiet?: boolean;
}

/** The whole command; returns the exit code. */
export async function runCheck(filename: string, o: CheckCommandOptions): Promise<number> {
  const out = outputFormat(o.output);
  let fix = { leaks: false, errors: false };
  if (o.repair !== undefined) {
    if (o.repair === 'leaks') fix = { leaks: true, errors: false };
    else if (o.repair === 'all') fix = { leaks: true, errors: true };
    else throw invalidArgument(`--repair (-r) expects 'leaks' or 'all', not '${o.repair}'`);
  }
  if (o.format !== undefined && o.format !== 'raw' && o.format !== 'qcow2') {
    throw invalidArgument(`Unknown driver '${o.format}' (supported formats: raw, qcow2)`);
  }
  const writable = fix.leaks || fix.errors;
  const file = await openProtocol(filename, { readOnly: !writable, direct: false, noFlush: false });
  try {
    const isQcow2 = o.format === 'qcow2' || (o.format === undefined && (await probeIsQcow2(file)));
    if (!isQcow2) {
      process.stderr.write('vdisk: This image format does not support checks\n');
      return EXIT_CHECK_UNSUPPORTED;
    }
    const log = (line: string) => {
      if (!o.quiet) process.stderr.write(`${line}\n`);
    };
    let r: CheckResult;
    try {
      r = await checkQcow2(file, filename, fix, log);
      if (r.corruptionsFixed || r.leaksFixed) {
        if (out === 'human' && !o.quiet) {
          process.stdout.write(`The following inconsistencies were found and repaired:\n\n    ${r.leaksFixed} leaked clusters\n    ${r.corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`);
        }
        const again = await checkQcow2(file, filename, { leaks: false, errors: false }, log);
        again.leaksFixed = r.leaksFixed;
        again.corruptionsFixed = r.corruptionsFixed;
        r = again;
      }
    } catch (err) {
      if (err instanceof VdiskError && /^(invalid-format|unsupported-feature)$/.test(err.kind)) throw err;
      const msg = err instanceof Error ? err.message : String(err);
      process.stderr.write(`vdisk: Check failed: ${msg}\n`);
      return 1;
    }
    if (!o.quiet) {
      if (out === 'json') printJson(checkJson(r, filename, 'qcow2'));
      else process.stdout.write(humanReport(r));
    }
    if (r.checkErrors) {
      process.stderr.write('vdisk: Check failed\n');
      return 1;
    }
    if (r.corruptions) return 2;
    if (r.leaks) return 3;
    return 0;
  } finally {
    await file.close().catch(() => {});
  }
}

export function register(program: Command): void {
  program
    .command('check')
    .description('check (and optionally repair) the consistency of an image')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .option('-r, --repair <what>', 'repair leaks, or all errors')
    .option('--output <fmt>', 'human or json', 'human')
    .option('-q, --quiet', 'print only errors')
    .option('-U, --force-share', 'open in shared mode (accepted for compatibility)')
    .argument('<file>')
    .action(async (filename: string, o: CheckCommandOptions) => {
      try {
        process.exitCode = await runCheck(filename, o);
      } catch (err) {
        reportError(err);
        process.exitCode = 1;
      }
    });
}
