// vdisk measure [--output=human|json] [-O FMT] [-o OPTIONS] [--size SIZE | [-f FMT] FILE]
// Prints what `qemu-img measure` prints: the size a new image needs (required) and the size
// of the fully allocated image, plus the bitmaps line when both sides support them.
import type { Command } from 'commander';
import { openImage } from '../../block/graph.js';
import { invalidArgument } from '../../block/errors.js';
import { parseSize } from '../../block/size.js';
import { measure } from '../../formats/qcow2/measure.js';
import { action, collectKeyValues, outputFormat, printJson } from '../common.js';

export function register(program: Command): void {
  program
    .command('measure')
    .description('calculate the file size required for a new image')
    .option('--output <fmt>', 'human or json', 'human')
    .option('-O, --target-format <fmt>', 'target image format', 'raw')
    .option('-o, --options <opts>', 'target format creation options', collectKeyValues)
    .option('--size <size>', 'measure a new image of this virtual size')
    .option('-f, --format <fmt>', 'format of FILE (default: probed)')
    .option('-U, --force-share', 'open FILE in shared mode (accepted for compatibility)')
    .option('-l, --snapshot <param>', 'measure an internal snapshot (not supported yet)')
    .argument('[file]')
    .action(action(async (file: string | undefined, o: {
      output: string; targetFormat: string; options?: Record<string, string>; size?: string; format?: string; snapshot?: string;
    }) => {
      const out = outputFormat(o.output);
      if (o.size !== undefined && file !== undefined) throw invalidArgument('--size N cannot be used together with a filename.');
      if (o.size === undefined && file === undefined) throw invalidArgument('Either --size N or one filename must be specified.');
      if (o.snapshot !== undefined) throw invalidArgument('measure: -l (internal snapshots) is not supported yet');
      const size = o.size !== undefined ? parseSize(o.size, 'image size', { allowZero: true }) : null;
      const input = file !== undefined ? await openImage(file, { format: o.format, readOnly: true }) : null;
      try {
        const r = await measure(o.targetFormat, o.options ?? {}, input, size);
        if (out === 'json') {
          const j: Record<string, number> = {};
          if (r.bitmaps !== undefined) j.bitmaps = r.bitmaps;
          j.required = r.required;
          j['fully-allocated'] = r.fullyAllocated;
          printJson(j);
        } else {
          let text = `required size: ${r.required}\nfully allocated size: ${r.fullyAllocated}\n`;
          if (r.bitmaps !== undefined) text += `bitmaps size: ${r.bitmaps}\n`;
          process.stdout.write(text);
        }
      } finally {
        await input?.close();
      }
    }));
}
