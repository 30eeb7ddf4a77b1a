// QEMU's cache modes are presets of three independent options (see docs/cache-modes.md):
//   cache.writeback: the client sees a volatile write cache (off: every write gets FUA)
//   cache.direct:    O_DIRECT on the file, bypassing the host page cache
//   cache.no-flush:  flushes never reach the disk
import { invalidArgument } from './errors.js';

export interface CacheOptions {
  writeback: boolean;
  direct: boolean;
  noFlush: boolean;
}

export const CACHE_MODES = {
  writeback: { writeback: true, direct: false, noFlush: false },
  none: { writeback: true, direct: true, noFlush: false },
  writethrough: { writeback: false, direct: false, noFlush: false },
  directsync: { writeback: false, direct: true, noFlush: false },
  unsafe: { writeback: true, direct: false, noFlush: true },
} as const satisfies Record<string, CacheOptions>;

export type CacheModeName = keyof typeof CACHE_MODES;
export const DEFAULT_CACHE_MODE: CacheModeName = 'writeback';

export function parseCacheMode(name: string): CacheOptions {
  if (Object.hasOwn(CACHE_MODES, name)) return { ...CACHE_MODES[name as CacheModeName] };
  throw invalidArgument(`Invalid cache option: ${name} (use one of ${Object.keys(CACHE_MODES).join(', ')})`);
}

/** The preset name for a combination, or a cache.* description when it is not a preset. */
export function cacheModeName(c: CacheOptions): string {
  for (const [name, m] of Object.entries(CACHE_MODES)) {
    if (m.writeback === c.writeback && m.direct === c.direct && m.noFlush === c.noFlush) return name;
  }
  return `cache.writeback=${c.writeback ? 'on' : 'off'},cache.direct=${c.direct ? 'on' : 'off'},cache.no-flush=${c.noFlush ? 'on' : 'off'}`;
}
