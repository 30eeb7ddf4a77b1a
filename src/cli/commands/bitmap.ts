// vdisk bitmap (--add | --remove | --clear | --enable | --disable | --merge SOURCE)...
//              [-g GRANULARITY] [-b SOURCE_FILE [-F SOURCE_FMT]] [-f FMT] FILE BITMAP
// qemu-img bitmap's shape, checks, messages and exit codes (qemu-img.c img_bitmap; the
// operations are QEMU's block/monitor/bitmap-qmp-cmds.c on one node): the actions run in
// command-line order; the first that fails stops the rest and the command exits 1, but what
// the earlier ones did is kept (the image is closed, and its bitmaps stored, either way).
import type { Command } from 'commander';
import { DirtyBitmap, defaultGranularity } from '../../block/dirty-bitmap.js';
import { VdiskError, invalidArgument } from '../../block/errors.js';
import { openImage } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { reportError } from '../common.js';

type Act = 'add' | 'remove' | 'clear' | 'enable' | 'disable' | 'merge';

interface Action {
  act: Act;
  /** --merge: the source bitmap's name. */
  source?: string;
}

interface BitmapOptions {
  format?: string;
  granularity?: string;
  sourceFile?: string;
  sourceFormat?: string;
}

const fail = (msg: string) => invalidArgument(msg);

/** qemu-img's cvtnum for -g: a size with k/M/G/T/P/E suffixes, 0 .. INT64_MAX. */
function parseGranularity(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kKMGTPE]?)[bB]?\s*$/.exec(text);
  if (!m) {
    throw fail('Invalid granularity specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.');
  }
  const exp = ' kMGTPE'.indexOf(m[2] === 'K' ? 'k' : m[2] || ' ');
  const value = Math.floor(Number(m[1]) * 1024 ** exp);
  if (!Number.isFinite(value) || value > 2 ** 63 - 1) throw fail('Invalid granularity specified. Must be between 0 and 9223372036854775807.');
  return value;
}

/** QEMU's bdrv_dirty_bitmap_check: busy bitmaps refuse everything; inconsistent ones everything but removal. */
function checkUsable(b: DirtyBitmap, allowInconsistent = false): void {
  if (b.busy) {
    throw new VdiskError('EBUSY', 'invalid-argument', `Bitmap '${b.name}' is currently in use by another operation and cannot be used`);
  }
  if (!allowInconsistent && b.inconsistent) {
    // QEMU prints the hint on a second line ("Try block-dirty-bitmap-remove ..."); one line here.
    throw fail(`Bitmap '${b.name}' is inconsistent and cannot be used; try --remove to delete this bitmap from disk`);
  }
}

function lookup(node: BlockNode, name: string): DirtyBitmap {
  const b = node.findBitmap(name);
  if (!b) throw new VdiskError('ENOENT', 'not-found', `Dirty bitmap '${name}' not found`);
  return b;
}

/** QMP block-dirty-bitmap-add with persistent=true, as qemu-img bitmap --add calls it. */
async function addBitmap(node: BlockNode, name: string, granularity: number | undefined): Promise<void> {
  if (name === '') throw fail('Bitmap name cannot be empty');
  if (granularity !== undefined) {
    if (granularity < 512 || (granularity & (granularity - 1)) !== 0) throw fail('Granularity must be power of 2 and at least 512');
  } else {
    granularity = defaultGranularity((await node.driver.info?.())?.clusterSize);
  }
  if (node.findBitmap(name)) throw new VdiskError('EEXIST', 'invalid-argument', `Bitmap already exists: ${name}`);
  if (!node.driver.checkBitmapStorable) throw fail(`Can't store persistent bitmaps to ${node.filename}: Operation not supported`);
  node.driver.checkBitmapStorable(name, granularity, node.dirtyBitmaps.filter((b) => b.persistent));
  node.addBitmap(new DirtyBitmap({ name, granularity, size: node.getLength(), enabled: true, persistent: true }));
}

async function removeBitmap(node: BlockNode, name: string): Promise<void> {
  const b = lookup(node, name);
  checkUsable(b, true);
  if (b.persistent) await node.driver.removeStoredBitmap?.(name);
  node.removeBitmap(b);
}

function mergeBitmap(node: BlockNode, target: string, srcNode: BlockNode, source: string): void {
  const dst = lookup(node, target);
  const src = lookup(srcNode, source);
  checkUsable(dst);
  checkUsable(src);
  if (src.size !== dst.size) {
    throw fail(`Bitmaps are of different sizes (destination size is ${dst.size}, source size is ${src.size}) and can't be merged`);
  }
  dst.merge(src);
}

async function runAction(a: Action, node: BlockNode, name: string, granularity: number | undefined, srcNode: BlockNode): Promise<void> {
  switch (a.act) {
    case 'add':
      return addBitmap(node, name, granularity);
    case 'remove':
      return removeBitmap(node, name);
    case 'clear': {
      const b = lookup(node, name);
      checkUsable(b);
      b.clear();
      return;
    }
    case 'enable':
    case 'disable': {
      const b = lookup(node, name);
      checkUsable(b);
      b.enabled = a.act === 'enable';
      return;
    }
    case 'merge':
      return mergeBitmap(node, name, srcNode, a.source!);
  }
}

/** The whole command; returns the exit code. */
export async function runBitmap(args: string[], actions: Action[], o: BitmapOptions): Promise<number> {
  if (actions.length === 0) throw fail('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  const granularity = o.granularity !== undefined ? parseGranularity(o.granularity) : 0;
  const add = actions.some((a) => a.act === 'add');
  if (granularity !== 0 && !add) throw fail('granularity only supported with --add');
  if (o.sourceFormat !== undefined && o.sourceFile === undefined) throw fail('-F only supported with -b');
  if (o.sourceFile !== undefined && !actions.some((a) => a.act === 'merge')) throw fail('Merge bitmap source file only supported with --merge');
  if (args.length !== 2) throw fail('Expecting filename and bitmap name');
  const [filename, name] = args;

  // The bitmaps live in this image alone: no backing chain is opened.
  const node = await openImage(filename, { format: o.format, readOnly: false, backing: false });
  let src: BlockNode | null = null;
  let code = 0;
  try {
    if (o.sourceFile !== undefined) src = await openImage(o.sourceFile, { format: o.sourceFormat, readOnly: true, backing: false });
    for (const a of actions) {
      try {
        // -g 0 means the default; QEMU passes any other int64 to a uint32 parameter, so only
        // its low 32 bits count (-g 4G is 0, which is refused).
        await runAction(a, node, name, granularity === 0 ? undefined : granularity % 2 ** 32, src ?? node);
      } catch (err) {
        if (!(err instanceof VdiskError)) throw err;
        process.stderr.write(`vdisk: Operation ${a.act} on bitmap ${name} failed: ${err.message}\n`);
        code = 1;
        break;
      }
    }
  } finally {
    let closeError: unknown = null;
    await src?.close().catch((err) => (closeError = err));
    await node.close().catch((err) => (closeError ??= err));
    if (closeError) throw closeError;
  }
  return code;
}

export function register(program: Command): void {
  const actions: Action[] = [];
  const cmd = program
    .command('bitmap')
    .description('add, remove, clear, enable, disable or merge persistent dirty bitmaps in an image')
    .option('--add', 'add BITMAP (persistent, recording)')
    .option('--remove', 'remove BITMAP')
    .option('--clear', 'clear every bit of BITMAP')
    .option('--enable', 'let BITMAP record writes')
    .option('--disable', 'stop BITMAP recording writes')
    .option('--merge <source>', 'merge bitmap SOURCE (of this image, or of -b SOURCE_FILE) into BITMAP')
    .option('-g, --granularity <size>', 'granularity of a bitmap added with --add')
    .option('-b, --source-file <file>', 'image that holds the --merge source bitmap')
    .option('-F, --source-format <fmt>', 'format of the -b image')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .argument('[file]')
    .argument('[bitmap]')
    .action(async (file: string | undefined, bitmap: string | undefined, o: BitmapOptions) => {
      try {
        const args = [file, bitmap, ...cmd.args.slice(2)].filter((a): a is string => a !== undefined);
        process.exitCode = await runBitmap(args, actions, o);
      } catch (err) {
        reportError(err);
        process.exitCode = 1;
      }
    });
  cmd.allowExcessArguments(true);
  // The actions run in the order given, as qemu-img keeps them (commander would only keep flags).
  for (const act of ['add', 'remove', 'clear', 'enable', 'disable'] as const) cmd.on(`option:${act}`, () => actions.push({ act }));
  cmd.on('option:merge', (source: string) => actions.push({ act: 'merge', source }));
}
