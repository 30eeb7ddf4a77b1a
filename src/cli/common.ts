// Helpers shared by the subcommands: option parsing in qemu-img's shapes, and turning
// errors into one line on stderr with the right exit code.
import { VdiskError } from '../block/errors.js';
import { parseCacheMode, type CacheOptions } from '../block/cache-mode.js';
import { parseSize } from '../block/size.js';

/** Print one line for an error: VdiskErrors are user-facing; anything else is a bug. */
export function reportError(err: unknown): void {
  if (err instanceof VdiskError) {
    process.stderr.write(`vdisk: ${err.message}\n`);
  } else if (err instanceof Error && process.env.VDISK_DEBUG) {
    process.stderr.write(`vdisk: internal error: ${err.stack}\n`);
  } else {
    const msg = err instanceof Error ? err.message : String(err);
    process.stderr.write(`vdisk: internal error: ${msg.split('\n')[0]}\n`);
  }
}

/**
 * Wrap a command action: errors print one line and set the exit code (1, or what the
 * command says, e.g. 2 for compare). The action may set process.exitCode itself.
 */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<void>, errorExitCode = 1): (...args: A) => Promise<void> {
  return async (...args: A) => {
    try {
      await fn(...args);
    } catch (err) {
      reportError(err);
      process.exitCode = errorExitCode;
    }
  };
}

/** qemu's option syntax: key=value pairs split by commas; ",," is a literal comma. */
export function parseKeyValues(text: string, into: Record<string, string> = {}): Record<string, string> {
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < text.length; i++) {
    if (text[i] === ',') {
      if (text[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      parts.push(cur);
      cur = '';
    } else {
      cur += text[i];
    }
  }
  parts.push(cur);
  for (const p of parts) {
    if (p === '') continue;
    const eq = p.indexOf('=');
    if (eq <= 0) throw new VdiskError('EINVAL', 'invalid-argument', `Invalid option '${p}': expected key=value`);
    into[p.slice(0, eq)] = p.slice(eq + 1);
  }
  return into;
}

/** For commander: collect repeated -o options into one map. */
export function collectKeyValues(value: string, previous: Record<string, string> | undefined): Record<string, string> {
  return parseKeyValues(value, { ...(previous ?? {}) });
}

/** For commander: collect repeated options into an array. */
export function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

export function cacheOption(mode: string | undefined, fallback = 'writeback'): CacheOptions {
  return parseCacheMode(mode ?? fallback);
}

export function sizeArg(text: string, what = 'image size'): number {
  return parseSize(text, what);
}

/** Output format option as qemu-img spells it. */
export function outputFormat(value: string | undefined): 'human' | 'json' {
  const v = value ?? 'human';
  if (v !== 'human' && v !== 'json') {
    throw new VdiskError('EINVAL', 'invalid-argument', `--output must be human or json, not '${v}'`);
  }
  return v;
}

/** qemu-img's JSON layout: 4-space indentation. */
export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 4) + '\n');
}
