// vdisk info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE
// Field names and order follow `qemu-img info` so scripts written for it keep working.
import fs from 'node:fs/promises';
import type { Command } from 'commander';
import { openImage } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { formatSize } from '../../block/size.js';
import { action, collectKeyValues, outputFormat, printJson } from '../common.js';
import { snapshotListing, snapshotRowFromJson } from './snapshot.js';

export interface ImageInfo {
  json: Record<string, unknown>;
  notes: string[];
}

export async function describeNode(node: BlockNode): Promise<ImageInfo> {
  const info = (await node.driver.info?.()) ?? {};
  const fileInfo = node.file ? ((await node.file.driver.info?.()) ?? {}) : {};
  let actualSize: number | undefined;
  try {
    const st = await fs.stat(node.bottom.filename);
    actualSize = st.blocks * 512;
  } catch {
    actualSize = undefined;
  }
  const json: Record<string, unknown> = {};
  if (info.backingFormat) json['backing-filename-format'] = info.backingFormat;
  // A format without its own (raw) shows its protocol's, as QEMU's raw driver passes them down (rbd).
  const snapshots = info.snapshots ?? fileInfo.snapshots;
  if (snapshots && snapshots.length > 0) json.snapshots = snapshots;
  json['virtual-size'] = node.getLength();
  json.filename = node.filename;
  const clusterSize = info.clusterSize ?? (node.driver.driverName === 'raw' ? fileInfo.clusterSize : undefined);
  if (clusterSize) json['cluster-size'] = clusterSize;
  json.format = node.driver.driverName;
  if (actualSize !== undefined) json['actual-size'] = actualSize;
  if (info.formatSpecific) json['format-specific'] = info.formatSpecific;
  if (info.backingFilename) {
    json['full-backing-filename'] = info.fullBackingFilename ?? info.backingFilename;
    json['backing-filename'] = info.backingFilename;
  }
  json['dirty-flag'] = info.dirtyFlag ?? false;
  return { json, notes: [...(info.notes ?? []), ...(fileInfo.notes ?? [])] };
}

function humanKey(k: string): string {
  return k.replace(/-/g, ' ');
}

/**
 * QEMU's dump_qobject (block/qapi.c) for the format-specific data: one `key: value` line per
 * scalar, nested objects and lists on their own lines four spaces deeper, list items as [i].
 */
function dumpValue(value: unknown, indent: number, lines: string[]): void {
  const pad = ' '.repeat(indent * 4);
  const composite = (v: unknown) => v !== null && typeof v === 'object';
  const item = (label: string, v: unknown) => {
    if (composite(v)) {
      lines.push(`${pad}${label}:`);
      dumpValue(v, indent + 1, lines);
    } else {
      lines.push(`${pad}${label}: ${String(v)}`);
    }
  };
  if (Array.isArray(value)) value.forEach((v, i) => item(`[${i}]`, v));
  else for (const [k, v] of Object.entries(value as Record<string, unknown>)) item(humanKey(k), v);
}

export function printHuman(i: ImageInfo): void {
  const j = i.json;
  const lines: string[] = [];
  lines.push(`image: ${j.filename}`);
  lines.push(`file format: ${j.format}`);
  const vs = j['virtual-size'] as number;
  lines.push(`virtual size: ${formatSize(vs)} (${vs} bytes)`);
  if (j['actual-size'] !== undefined) lines.push(`disk size: ${formatSize(j['actual-size'] as number)}`);
  if (j['cluster-size']) lines.push(`cluster_size: ${j['cluster-size']}`);
  if (j['backing-filename']) {
    const full = j['full-backing-filename'];
    lines.push(`backing file: ${j['backing-filename']}${full && full !== j['backing-filename'] ? ` (actual path: ${full})` : ''}`);
  }
  if (j['backing-filename-format']) lines.push(`backing file format: ${j['backing-filename-format']}`);
  const snaps = j.snapshots as Array<Record<string, number | string>> | undefined;
  if (snaps && snaps.length > 0) {
    lines.push('Snapshot list:');
    lines.push(...snapshotListing(snaps.map(snapshotRowFromJson)));
  }
  const fsd = j['format-specific'] as { data: Record<string, unknown> } | undefined;
  if (fsd) {
    lines.push('Format specific information:');
    dumpValue(fsd.data, 1, lines);
  }
  if (i.notes.length > 0) {
    lines.push('vdisk specific information:');
    for (const n of i.notes) lines.push(`    ${n}`);
  }
  process.stdout.write(lines.join('\n') + '\n');
}

export function register(program: Command): void {
  program
    .command('info')
    .description('show information about a disk image')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--output <fmt>', 'human or json', 'human')
    .option('--backing-chain', 'describe every image of the backing chain')
    .option('-U, --force-share', 'accepted for qemu-img compatibility (vdisk takes no locks)')
    .option('-o, --options <opts>', 'driver options', collectKeyValues)
    .argument('<file>')
    .action(action(async (file: string, o: { format?: string; output: string; backingChain?: boolean; options?: Record<string, string> }) => {
      const out = outputFormat(o.output);
      const node = await openImage(file, { format: o.format, readOnly: true, backing: !!o.backingChain, options: o.options });
      try {
        const infos: ImageInfo[] = [];
        for (let n: BlockNode | null | undefined = node; n; n = o.backingChain ? n.backing : null) {
          infos.push(await describeNode(n));
        }
        if (out === 'json') {
          printJson(o.backingChain ? infos.map((i) => i.json) : infos[0].json);
        } else {
          infos.forEach((i, idx) => {
            if (idx > 0) process.stdout.write('\n');
            printHuman(i);
          });
        }
      } finally {
        await node.close();
      }
    }));
}
