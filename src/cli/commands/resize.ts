// vdisk resize [-f FMT] [--shrink] [--preallocation=MODE] FILE [+|-]SIZE
import type { Command } from 'commander';
import type { Preallocation } from '../../block/driver.js';
import { invalidArgument } from '../../block/errors.js';
import { openImage } from '../../block/graph.js';
import { parseSize } from '../../block/size.js';
import { action } from '../common.js';

export function register(program: Command): void {
  program
    .command('resize')
    .description('grow or shrink an image')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--shrink', 'allow shrinking (data past the new end is lost)')
    .option('--preallocation <mode>', 'off, metadata, falloc or full for the new area', 'off')
    .option('-q, --quiet', 'do not print "Image resized."')
    .argument('<file>')
    .argument('<size>', 'new size, or +SIZE / -SIZE relative to the current size')
    .allowUnknownOption(false)
    .action(action(async (file: string, sizeText: string, o: { format?: string; shrink?: boolean; preallocation: string; quiet?: boolean }) => {
      if (!['off', 'metadata', 'falloc', 'full'].includes(o.preallocation)) {
        throw invalidArgument(`Invalid preallocation mode '${o.preallocation}' (off, metadata, falloc, full)`);
      }
      const rel = sizeText[0] === '+' || sizeText[0] === '-' ? sizeText[0] : '';
      const amount = parseSize(rel ? sizeText.slice(1) : sizeText, 'size', { allowZero: rel !== '' });
      const node = await openImage(file, { format: o.format, readOnly: false });
      try {
        const cur = node.getLength();
        const next = rel === '+' ? cur + amount : rel === '-' ? cur - amount : amount;
        if (next <= 0) throw invalidArgument(`New image size must be positive (current size ${cur}, asked ${sizeText})`);
        if (next < cur && !o.shrink) {
          throw invalidArgument('Use the --shrink option to perform a shrink operation.');
        }
        await node.truncate(next, o.preallocation as Preallocation);
      } finally {
        await node.close();
      }
      if (!o.quiet) process.stdout.write('Image resized.\n');
    }));
}
