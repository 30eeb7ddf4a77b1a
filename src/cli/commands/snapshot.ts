// vdisk snapshot -l [-f FMT] FILE: list the internal snapshot table as qemu-img does.
// Creating, applying and deleting internal snapshots (-c/-a/-d) is not implemented yet.
import type { Command } from 'commander';
import { invalidArgument, unsupported } from '../../block/errors.js';
import { openFile } from '../../protocols/file-posix.js';
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

function snapshotLine(sn: Qcow2Snapshot): string {
  const d = new Date(sn.dateSec * 1000);
  const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  const secs = Math.floor(sn.vmClockNsec / 1e9);
  const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(Math.floor(sn.vmClockNsec / 1e6) % 1000).padStart(3, '0')}`;
  const icount = sn.icount !== null && sn.icount !== -1 ? String(sn.icount) : '';
  return `${sn.id.padEnd(9)} ${sn.name.padEnd(16)} ${qemuSizeToStr(sn.vmStateSize).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

export function register(program: Command): void {
  program
    .command('snapshot')
    .description('list internal snapshots (-l); -c/-a/-d are not supported yet')
    .option('-l, --list', 'list snapshots')
    .option('-c, --create <name>', 'create a snapshot (not supported yet)')
    .option('-a, --apply <name>', 'apply a snapshot (not supported yet)')
    .option('-d, --delete <name>', 'delete a snapshot (not supported yet)')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .option('-U, --force-share', 'open in shared mode (accepted for compatibility)')
    .option('-q, --quiet', 'quiet mode')
    .argument('<file>')
    .action(action(async (filename: string, o: { list?: boolean; create?: string; apply?: string; delete?: string; format?: string }) => {
      const ops = [o.list && 'list', o.create !== undefined && 'create', o.apply !== undefined && 'apply', o.delete !== undefined && 'delete'].filter(Boolean);
      if (ops.length > 1) throw invalidArgument('Cannot mix snapshot operations (-l, -c, -a, -d)');
      if (o.create !== undefined) throw unsupported('snapshot: creating internal snapshots (-c) is not supported yet');
      if (o.apply !== undefined) throw unsupported('snapshot: applying internal snapshots (-a) is not supported yet');
      if (o.delete !== undefined) throw unsupported('snapshot: deleting internal snapshots (-d) is not supported yet');
      if (o.format !== undefined && o.format !== 'qcow2' && o.format !== 'raw') {
        throw invalidArgument(`Unknown driver '${o.format}' (supported formats: raw, qcow2)`);
      }
      const file = await openFile(filename, { readOnly: true, direct: false, noFlush: false });
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
        let text = 'Snapshot list:\n';
        text += `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}\n`;
        for (const sn of entries) text += `${snapshotLine(sn)}\n`;
        process.stdout.write(text);
      } finally {
        await file.close();
      }
    }));
}
