// vdisk command line. Each subcommand lives in src/cli/commands/<name>.ts (file named after
// the command) and exports `register(program)`; they are found by listing that folder, so
// adding a command never touches this file.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Command, CommanderError } from 'commander';
import { reportError } from './common.js';

export async function main(argv: string[]): Promise<void> {
  const program = new Command('vdisk')
    .description("QEMU's virtual-disk stack in TypeScript: images, cache modes, NBD")
    .version(JSON.parse(fs.readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')).version)
    .showHelpAfterError(false)
    .configureOutput({
      outputError: (str, write) => write(`vdisk: ${str.replace(/^error: /, '').trimEnd()}\n`),
    })
    .exitOverride();

  // A command's file is named after it: load only that one when it is named (start-up time
  // counts in every benchmark), every one for help, version and mistakes.
  const dir = path.join(path.dirname(fileURLToPath(import.meta.url)), 'commands');
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.js')).sort();
  const named = argv[0] !== undefined && files.includes(`${argv[0]}.js`) ? [`${argv[0]}.js`] : files;
  for (const f of named) {
    const mod = await import(pathToFileURL(path.join(dir, f)).href);
    if (typeof mod.register === 'function') mod.register(program);
  }

  try {
    await program.parseAsync(argv, { from: 'user' });
  } catch (err) {
    if (err instanceof CommanderError) {
      // Help and version exit 0; usage errors were already printed as one line.
      process.exitCode = err.exitCode === 0 ? 0 : 1;
      return;
    }
    reportError(err);
    process.exitCode = 1;
  }
}
