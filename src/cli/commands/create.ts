// vdisk create [-f FMT] [-b BACKING [-F BACKING_FMT]] [-o OPTIONS] FILE [SIZE]
import type { Command } from 'commander';
import { createImage, getFormat, openImage, resolveBackingName } from '../../block/graph.js';
import { invalidArgument } from '../../block/errors.js';
import { parseSize } from '../../block/size.js';
import { action, collectKeyValues } from '../common.js';

export function register(program: Command): void {
  program
    .command('create')
    .description('create a new disk image')
    .option('-f, --format <fmt>', 'image format (raw, qcow2)', 'raw')
    .option('-o, --options <opts>', 'format options, e.g. preallocation=falloc', collectKeyValues)
    .option('-b, --backing <file>', 'backing file')
    .option('-F, --backing-format <fmt>', 'backing file format')
    .option('-u, --unsafe', 'do not open the backing file to check it')
    .option('-q, --quiet', 'do not print the "Formatting" line')
    .argument('<file>')
    .argument('[size]', 'size with optional k, M, G, T suffix')
    .action(action(async (file: string, sizeText: string | undefined, o: {
      format: string; options?: Record<string, string>; backing?: string; backingFormat?: string; quiet?: boolean; unsafe?: boolean;
    }) => {
      getFormat(o.format);
      const options = { ...(o.options ?? {}) };
      // Like qemu-img, size may come from -o size= or from the backing file.
      if (sizeText === undefined && options.size !== undefined) sizeText = options.size;
      delete options.size;
      if (o.backingFormat && !o.backing) throw invalidArgument('-F needs a backing file (-b)');
      let size: number;
      if (sizeText !== undefined) {
        size = parseSize(sizeText, 'image size');
      } else if (o.backing) {
        const b = await openImage(resolveBackingName(file, o.backing), { format: o.backingFormat, readOnly: true });
        size = b.getLength();
        await b.close();
      } else {
        throw invalidArgument('Image creation needs a size parameter');
      }
      if (!o.quiet) {
        const extra = Object.entries(options).map(([k, v]) => ` ${k}=${v}`).join('');
        const back = o.backing ? ` backing_file=${o.backing}${o.backingFormat ? ` backing_fmt=${o.backingFormat}` : ''}` : '';
        process.stdout.write(`Formatting '${file}', fmt=${o.format}${extra} size=${size}${back}\n`);
      }
      await createImage(file, {
        format: o.format, size, options, backingFile: o.backing, backingFormat: o.backingFormat, unsafe: o.unsafe,
      });
    }));
}
