// Sizes as qemu-img spells them: a number with an optional K/M/G/T/P/E suffix (powers of
// 1024; "k" and "b"/"B" accepted too). Plain numbers are bytes.
import { invalidArgument } from './errors.js';

const SUFFIX: Record<string, number> = {
  '': 1, b: 1, B: 1, k: 1024, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4, P: 1024 ** 5, E: 1024 ** 6,
};

/** Largest image size we accept: QEMU's BDRV_MAX_LENGTH is about 2^63; JS numbers stay exact to 2^53. */
export const MAX_IMAGE_SIZE = 2 ** 53 - 2 ** 20;

export function parseSize(text: string, what = 'size', opts: { allowZero?: boolean; max?: number } = {}): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]?)\s*$/.exec(text);
  if (!m || !(m[2] in SUFFIX)) {
    throw invalidArgument(`Invalid ${what} '${text}': expected a number with an optional k, M, G, T, P or E suffix`);
  }
  const value = Number(m[1]) * SUFFIX[m[2]];
  const max = opts.max ?? MAX_IMAGE_SIZE;
  if (!Number.isFinite(value) || value > max) {
    throw invalidArgument(`Invalid ${what} '${text}': the largest allowed is ${max} bytes`);
  }
  if (!Number.isInteger(value)) throw invalidArgument(`Invalid ${what} '${text}': not a whole number of bytes`);
  if (value === 0 && !opts.allowZero) throw invalidArgument(`Invalid ${what} '${text}': must be greater than 0`);
  return value;
}

/** Human size as qemu-img prints it: "10 GiB", "1.5 MiB", "512 B". */
export function formatSize(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  if (i === 0) return `${n} B`;
  const s = v.toFixed(3).replace(/\.?0+$/, '');
  return `${s} ${units[i]}`;
}
