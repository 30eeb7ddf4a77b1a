// vdisk map [-f FMT] [--output=human|json] [--start-offset N] [--max-length N] FILE
// Same JSON as `qemu-img map --output=json`: runs of {start, length, depth, present, zero,
// data, offset?}, adjacent runs merged exactly where qemu-img merges them.
import type { Command } from 'commander';
import type { ChainExtent } from '../../block/driver.js';
import { openImage } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { parseSize } from '../../block/size.js';
import { action, outputFormat } from '../common.js';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  /** Not printed in JSON; names the file for human output. */
  file?: string;
}

const STEP = 1 << 30;

function toEntry(e: ChainExtent): MapEntry {
  const m: MapEntry = { start: e.offset, length: e.length, depth: e.depth, present: e.allocated, zero: e.zero, data: e.data };
  if (e.hostOffset !== undefined) m.offset = e.hostOffset;
  if (e.hostFile !== undefined) m.file = e.hostFile;
  return m;
}

/** qemu-img's entry_mergeable: same flags and depth, host offsets contiguous or both absent. */
function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  if (a.file !== b.file) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

export async function* mapImage(node: BlockNode, start = 0, maxLength = Infinity): AsyncGenerator<MapEntry> {
  const end = Math.min(node.getLength(), start + maxLength);
  let cur: MapEntry | null = null;
  let pos = start;
  while (pos < end) {
    const extents = await node.blockStatusAbove(pos, Math.min(STEP, end - pos));
    for (const e of extents) {
      const m = toEntry(e);
      if (cur && mergeable(cur, m)) {
        cur.length += m.length;
      } else {
        if (cur) yield cur;
        cur = m;
      }
      pos = e.offset + e.length;
    }
  }
  if (cur) yield cur;
}

/** printf's %#x, which qemu-img map uses: no 0x prefix on zero. */
function hex(n: number): string {
  return n === 0 ? '0' : `0x${n.toString(16)}`;
}

function jsonLine(m: MapEntry): string {
  const off = m.offset !== undefined ? `, "offset": ${m.offset}` : '';
  return `{ "start": ${m.start}, "length": ${m.length}, "depth": ${m.depth}, "present": ${m.present}, "zero": ${m.zero}, "data": ${m.data}${off}}`;
}

export function register(program: Command): void {
  program
    .command('map')
    .description('show which ranges of an image hold data, zeros, or come from a backing file')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--output <fmt>', 'human or json', 'human')
    .option('-s, --start-offset <offset>', 'first byte to map')
    .option('-l, --max-length <length>', 'how many bytes to map')
    .option('-U, --force-share', 'accepted for qemu-img compatibility')
    .argument('<file>')
    .action(action(async (file: string, o: { format?: string; output: string; startOffset?: string; maxLength?: string }) => {
      const out = outputFormat(o.output);
      const start = o.startOffset ? parseSize(o.startOffset, 'start offset', { allowZero: true }) : 0;
      const maxLength = o.maxLength ? parseSize(o.maxLength, 'max length') : Infinity;
      const node = await openImage(file, { format: o.format, readOnly: true });
      try {
        const lines: string[] = [];
        if (out === 'json') {
          for await (const m of mapImage(node, start, maxLength)) lines.push(jsonLine(m));
          // Nothing to map (an empty image, or a start past the end): qemu-img prints its
          // initial, empty entry all the same.
          if (lines.length === 0) lines.push(jsonLine({ start, length: 0, depth: 0, present: false, zero: false, data: false }));
          process.stdout.write(`[${lines.join(',\n')}]\n`);
        } else {
          // Human output lists only ranges with data at a known place, merged per file.
          process.stdout.write(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`);
          let cur: MapEntry | null = null;
          const flush = (m: MapEntry) => process.stdout.write(
            `${hex(m.start).padEnd(16)}${hex(m.length).padEnd(16)}${hex(m.offset ?? 0).padEnd(16)}${m.file ?? ''}\n`);
          for await (const m of mapImage(node, start, maxLength)) {
            if (!m.data || m.offset === undefined) continue;
            if (cur && cur.file === m.file && cur.start + cur.length === m.start && cur.offset! + cur.length === m.offset) {
              cur.length += m.length;
            } else {
              if (cur) flush(cur);
              cur = { ...m };
            }
          }
          if (cur) flush(cur);
        }
      } finally {
        await node.close();
      }
    }));
}
