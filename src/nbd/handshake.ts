// Option haggling helpers: parsing the option payloads the handshake understands and
// building option replies. The state (TLS, structured replies, meta contexts) lives in
// negotiation.ts; these functions only turn bytes into values and back.
import {
  IHAVEOPT, META_BASE_ALLOCATION, META_QEMU_ALLOCATION_DEPTH, NBDMAGIC, NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT, NBD_INFO_NAME,
  NBD_MAX_STRING_SIZE, NBD_OPTION_REPLY_HEADER_SIZE, NBD_REP_MAGIC,
} from './protocol.js';
import type { BlockSizeConstraints } from './export.js';

/** The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags. */
export function greeting(): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
  return b;
}

export function optionReply(option: number, type: number, payload?: Buffer): Buffer {
  const len = payload?.length ?? 0;
  const b = Buffer.allocUnsafe(NBD_OPTION_REPLY_HEADER_SIZE + len);
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(len, 16);
  payload?.copy(b, NBD_OPTION_REPLY_HEADER_SIZE);
  return b;
}

/** Error replies carry a human-readable message (spec: "suitable for display to the user"). */
export function optionError(option: number, type: number, message: string): Buffer {
  return optionReply(option, type, Buffer.from(message.slice(0, 1024), 'utf8'));
}

export class OptionParseError extends Error {
  constructor(message: string, readonly tooBig = false) {
    super(message);
  }
}

/** A cursor over one option's data; every read is bounds-checked against the option length. */
class OptionReader {
  pos = 0;
  constructor(private readonly data: Buffer) {}
  get remaining(): number {
    return this.data.length - this.pos;
  }
  u16(): number {
    if (this.remaining < 2) throw new OptionParseError('option data too short');
    const v = this.data.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number {
    if (this.remaining < 4) throw new OptionParseError('option data too short');
    const v = this.data.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  /** A string whose 32-bit length was just read. */
  string(len: number, what: string): string {
    if (len > this.remaining) throw new OptionParseError(`${what} length ${len} exceeds the option length`);
    if (len > NBD_MAX_STRING_SIZE) throw new OptionParseError(`${what} is longer than ${NBD_MAX_STRING_SIZE} bytes`, true);
    const s = this.data.toString('utf8', this.pos, this.pos + len);
    this.pos += len;
    if (s.includes('\0')) throw new OptionParseError(`${what} contains NUL`);
    return s;
  }
  end(): void {
    if (this.remaining !== 0) throw new OptionParseError('trailing bytes after option data');
  }
}

export interface InfoRequest {
  name: string;
  requests: Set<number>;
}

/** NBD_OPT_INFO / NBD_OPT_GO: u32 name length, name, u16 count, count × u16 info types. */
export function parseInfoRequest(data: Buffer): InfoRequest {
  const r = new OptionReader(data);
  const name = r.string(r.u32(), 'export name');
  const n = r.u16();
  const requests = new Set<number>();
  for (let i = 0; i < n; i++) requests.add(r.u16());
  r.end();
  return { name, requests };
}

export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

/** NBD_OPT_{LIST,SET}_META_CONTEXT: u32 name length, name, u32 count, count × (u32 length, query). */
export function parseMetaContextRequest(data: Buffer): MetaContextRequest {
  const r = new OptionReader(data);
  const exportName = r.string(r.u32(), 'export name');
  const n = r.u32();
  if (n > r.remaining / 4) throw new OptionParseError(`${n} queries cannot fit in the option`);
  const queries: string[] = [];
  for (let i = 0; i < n; i++) queries.push(r.string(r.u32(), 'query'));
  r.end();
  return { exportName, queries };
}

/** The contexts a server offers; ids are what SET_META_CONTEXT hands back. */
export const META_CONTEXTS = [
  { id: 1, name: META_BASE_ALLOCATION },
  { id: 2, name: META_QEMU_ALLOCATION_DEPTH },
] as const;

/**
 * LIST: no queries lists everything; `ns:` (empty leaf) is a wildcard for that namespace;
 * otherwise exact names. SET: exact names only (spec: `base:` selects nothing).
 * Unknown namespaces are ignored, as the spec requires.
 */
export function matchMetaContexts(queries: string[], list: boolean): Array<{ id: number; name: string }> {
  if (list && queries.length === 0) return [...META_CONTEXTS];
  const out: Array<{ id: number; name: string }> = [];
  for (const ctx of META_CONTEXTS) {
    const ns = ctx.name.slice(0, ctx.name.indexOf(':') + 1);
    if (queries.some((q) => q === ctx.name || (list && q === ns))) out.push(ctx);
  }
  return out;
}

export function metaContextReply(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

export function infoExport(size: number, flags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NBD_INFO_EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function infoString(type: typeof NBD_INFO_NAME | typeof NBD_INFO_DESCRIPTION, text: string): Buffer {
  const s = Buffer.from(text, 'utf8').subarray(0, NBD_MAX_STRING_SIZE);
  const b = Buffer.allocUnsafe(2 + s.length);
  b.writeUInt16BE(type, 0);
  s.copy(b, 2);
  return b;
}

export function infoBlockSize(c: BlockSizeConstraints): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(c.minimum, 2);
  b.writeUInt32BE(c.preferred, 6);
  b.writeUInt32BE(c.maximum, 10);
  return b;
}

/** NBD_REP_SERVER payload: u32 name length, name, then the description for humans. */
export function serverReply(name: string, description: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8').subarray(0, NBD_MAX_STRING_SIZE);
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

/** The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeros unless NO_ZEROES. */
export function exportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(10 + (noZeroes ? 0 : 124));
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}
