// vdisk snapshot [-l | -c NAME | -a NAME | -d NAME] [-f FMT] FILE: internal snapshots as
// qemu-img snapshot handles them: the same table, messages and exit codes. -c, -a and -d go
// through the qcow2 driver's snapshot API (createSnapshot, applySnapshot, deleteSnapshot).
// On a raw rbd: image all four are the image's rbd snapshots (QEMU's qemu_rbd_snap_*).
import os from 'node:os';
import type { Command } from 'commander';
import { VdiskError, invalidArgument } from '../../block/errors.js';
import { openImage, openProtocol } from '../../block/graph.js';
import type { Qcow2Driver } from '../../formats/qcow2/qcow2.js';
import { QCOW_MAGIC } from '../../formats/qcow2/constants.js';
import { readHeader } from '../../formats/qcow2/header.js';
import { readSnapshots, type Qcow2Snapshot } from '../../formats/qcow2/snapshot.js';
import { action } from '../common.js';

/** QEMU's size_to_str: three significant digits, binary prefixes ("0 B", "1.5 KiB"). */
export function qemuSizeToStr(val: number): string {
  const suffixes = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  // frexp(val / (1000/1024)) exponent, as QEMU picks the unit so the number stays below 1000.
  const x = val / (1000 / 1024);
  const exp = x === 0 ? 0 : Math.floor(Math.log2(x)) + 1;
  const i = Math.max(0, Math.floor((exp - 1) / 10));
  const v = val / 2 ** (i * 10);
  return `${formatG3(v)} ${suffixes[i]}B`;
}

/** printf("%0.3g"). */
function formatG3(v: number): string {
  if (v === 0) return '0';
  const e = Math.floor(Math.log10(Math.abs(v)));
  if (e < -4 || e >= 3) return v.toExponential(2).replace(/\.?0+e/, 'e').replace(/e([+-])(\d)$/, 'e$10$2');
  return String(Number(v.toPrecision(3)));
}

const pad2 = (n: number) => String(n).padStart(2, '0');

/** The fields a listing line shows (from the table, or from info's JSON objects). */
type SnapshotRow = Pick<Qcow2Snapshot, 'id' | 'name' | 'vmStateSize' | 'dateSec' | 'vmClockNsec' | 'icount'>;

function snapshotLine(sn: SnapshotRow): string {
  const d = new Date(sn.dateSec * 1000);
  const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  const secs = Math.floor(sn.vmClockNsec / 1e9);
  const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(Math.floor(sn.vmClockNsec / 1e6) % 1000).padStart(3, '0')}`;
  const icount = sn.icount !== null && sn.icount !== -1 ? String(sn.icount) : '';
  return `${sn.id.padEnd(9)} ${sn.name.padEnd(16)} ${qemuSizeToStr(sn.vmStateSize).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

/** strerror() texts for the errors snapshot operations can meet (qemu-img prints "-N (text)"). */
const STRERROR: Partial<Record<string, string>> = {
  EEXIST: 'File exists', EFBIG: 'File too large', ENOTSUP: 'Operation not supported', EINVAL: 'Invalid argument',
  EIO: 'Input/output error', ENOSPC: 'No space left on device', EROFS: 'Read-only file system', EPERM: 'Operation not permitted',
};

/** qemu-img's "-N (strerror)" for an errno; our own argument checks keep their sentence. */
function qemuReason(err: unknown): string {
  if (!(err instanceof VdiskError)) throw err;
  const text = STRERROR[err.code];
  const n = (os.constants.errno as Record<string, number>)[err.code];
  if (!text || !n || err.code === 'EINVAL') return err.message;
  return `-${n} (${text})`;
}

/** qemu-img's snapshot table (bdrv_snapshot_dump): the header line, then one line per snapshot. */
export function snapshotListing(rows: SnapshotRow[]): string[] {
  const head = `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`;
  return [head, ...rows.map(snapshotLine)];
}

/** A snapshot object of qemu-img info --output=json as a listing row. */
export function snapshotRowFromJson(s: Record<string, number | string>): SnapshotRow {
  return {
    id: String(s.id), name: String(s.name), vmStateSize: Number(s['vm-state-size']), dateSec: Number(s['date-sec']),
    vmClockNsec: Number(s['vm-clock-sec']) * 1e9 + Number(s['vm-clock-nsec']),
    icount: s.icount === undefined ? null : Number(s.icount),
  };
}

/** Create, apply or delete on a writable qcow2 node; raw and other formats have no snapshots. */
async function modify(filename: string, format: string | undefined, op: 'create' | 'apply' | 'delete', name: string): Promise<void> {
  const verb = { create: 'create', apply: 'apply', delete: 'delete' }[op];
  const fail = (why: string) => new VdiskError('EINVAL', 'invalid-argument', `Could not ${verb} snapshot '${name}': ${why}`);
  const node = await openImage(filename, { format, readOnly: false, backing: false });
  try {
    const drv = node.driver as Partial<Qcow2Driver>;
    if (typeof drv.createSnapshot !== 'function' || !drv.applySnapshot || !drv.deleteSnapshot) {
      // qemu-img's words per operation for a driver without snapshots.
      if (op === 'create') throw fail(`-${os.constants.errno.ENOTSUP} (Operation not supported)`);
      if (op === 'apply') throw fail('Block driver does not support snapshots');
      throw fail('snapshot not found');
    }
    try {
      if (op === 'create') {
        await drv.createSnapshot(name);
      } else if (op === 'apply') {
        if (!(await drv.applySnapshot(name))) throw fail('Failed to load snapshot: No such file or directory');
      } else if (!(await drv.deleteSnapshot({ name }))) {
        throw fail('snapshot not found'); // qemu-img -d looks the name up, not the id
      }
    } catch (err) {
      if (err instanceof VdiskError && err.message.startsWith(`Could not ${verb} snapshot`)) throw err;
      throw fail(qemuReason(err));
    }
  } finally {
    await node.close();
  }
}

/**
 * qemu-img snapshot on a raw rbd image: rbd snapshots, the name also being the id (QEMU's
 * rbd driver). False when the image holds qcow2, whose internal snapshots it has instead.
 */
async function rbdSnapshot(filename: string, o: { create?: string; apply?: string; delete?: string; format?: string }): Promise<boolean> {
  if (o.format === 'qcow2') return false;
  const { openRbd, RbdDriver } = await import('../../protocols/rbd.js');
  const listing = o.create === undefined && o.apply === undefined && o.delete === undefined;
  const node = await openRbd(filename, { readOnly: listing, direct: false, noFlush: false });
  try {
    if (o.format === undefined && node.getLength() >= 4) {
      const head = Buffer.alloc(4);
      await node.pread(0, head);
      if (head.readUInt32BE(0) === QCOW_MAGIC) return false;
    }
    const rbd = node.driver as InstanceType<typeof RbdDriver>;
    if (o.create !== undefined) {
      await rbd.createSnapshot(o.create);
    } else if (o.apply !== undefined) {
      await rbd.rollbackSnapshot(o.apply);
    } else if (o.delete !== undefined) {
      await rbd.removeSnapshot(o.delete);
    } else {
      // QEMU shows no date or clock for rbd snapshots, and the image size as the VM state size.
      const rows = (await rbd.snapshots()).map((sn) => ({ id: sn.name, name: sn.name, vmStateSize: sn.size, dateSec: 0, vmClockNsec: 0, icount: 0 }));
      if (rows.length > 0) process.stdout.write(`Snapshot list:\n${snapshotListing(rows).join('\n')}\n`);
    }
    return true;
  } finally {
    await node.close();
  }
}

export function register(program: Command): void {
  program
    .command('snapshot')
    .description('list, create, apply (revert to) or delete internal snapshots')
    .option('-l, --list', 'list snapshots')
    .option('-c, --create <name>', 'create a snapshot of the current contents')
    .option('-a, --apply <name>', 'revert to a snapshot (found by id, then by name)')
    .option('-d, --delete <name>', 'delete a snapshot (found by name)')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .option('-U, --force-share', 'open in shared mode (accepted for compatibility)')
    .option('-q, --quiet', 'quiet mode')
    .argument('<file>')
    .action(action(async (filename: string, o: { list?: boolean; create?: string; apply?: string; delete?: string; format?: string }) => {
      const ops = [o.list && 'list', o.create !== undefined && 'create', o.apply !== undefined && 'apply', o.delete !== undefined && 'delete'].filter(Boolean);
      if (ops.length > 1) throw invalidArgument('Cannot mix snapshot operations (-l, -c, -a, -d)');
      if (o.format !== undefined && o.format !== 'qcow2' && o.format !== 'raw') {
        throw invalidArgument(`Unknown driver '${o.format}' (supported formats: raw, qcow2)`);
      }
      if (filename.startsWith('rbd:') && (await rbdSnapshot(filename, o))) return;
      if (o.create !== undefined) return modify(filename, o.format, 'create', o.create);
      if (o.apply !== undefined) return modify(filename, o.format, 'apply', o.apply);
      if (o.delete !== undefined) return modify(filename, o.format, 'delete', o.delete);
      const file = await openProtocol(filename, { readOnly: true, direct: false, noFlush: false });
      try {
        let isQcow2 = o.format === 'qcow2';
        if (o.format === undefined && file.getLength() >= 4) {
          const head = Buffer.alloc(4);
          await file.pread(0, head);
          isQcow2 = head.readUInt32BE(0) === QCOW_MAGIC;
        }
        if (!isQcow2) return; // raw has no snapshots: qemu-img prints nothing
        const h = await readHeader(file, filename);
        // The checker's lenient read, as this command has always used: problems are not reported.
        const entries = await readSnapshots(file, h, filename, { onProblem: () => {} });
        if (entries.length === 0) return;
        process.stdout.write(`Snapshot list:\n${snapshotListing(entries).join('\n')}\n`);
      } finally {
        await file.close();
      }
    }));
}
