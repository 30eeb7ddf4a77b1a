// Transmission replies as bytes: pure functions from values to what goes on the wire, like
// ws's sender.js. doc/proto.md "Simple reply message" and "Structured reply chunk message".
// The request's 8-byte handle is echoed as two 32-bit halves, never interpreted.
import { NBD_MAX_STRING_SIZE, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_SIMPLE_REPLY_MAGIC, NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC, NBD_STRUCTURED_REPLY_SIZE } from './protocol.js';

/** What a reply needs from its request. */
export interface ReplyHandle {
  handleHi: number;
  handleLo: number;
}

/** Bytes in front of the data of an NBD_REPLY_TYPE_OFFSET_DATA chunk (header + offset). */
export const DATA_CHUNK_HEADER = NBD_STRUCTURED_REPLY_SIZE + 8;

/** Writes a simple reply header into the first 16 bytes of `into` (the data may follow). */
export function writeSimpleHeader(into: Buffer, req: ReplyHandle, error: number): Buffer {
  into.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  into.writeUInt32BE(error, 4);
  into.writeUInt32BE(req.handleHi, 8);
  into.writeUInt32BE(req.handleLo, 12);
  return into;
}

export function simpleReply(req: ReplyHandle, error: number): Buffer {
  return writeSimpleHeader(Buffer.allocUnsafe(NBD_SIMPLE_REPLY_SIZE), req, error);
}

/** A structured chunk header followed by room for `length` payload bytes (in `into` when given). */
export function chunkHeader(req: ReplyHandle, flags: number, type: number, length: number, into?: Buffer): Buffer {
  const total = NBD_STRUCTURED_REPLY_SIZE + length;
  const h = into ? into.subarray(0, total) : Buffer.allocUnsafe(total);
  h.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(req.handleHi, 8);
  h.writeUInt32BE(req.handleLo, 12);
  h.writeUInt32BE(length, 16);
  return h;
}

/** A whole chunk with its payload copied in. */
export function chunk(req: ReplyHandle, flags: number, type: number, payload: Buffer | null): Buffer {
  const c = chunkHeader(req, flags, type, payload?.length ?? 0);
  payload?.copy(c, NBD_STRUCTURED_REPLY_SIZE);
  return c;
}

/** NBD_REPLY_TYPE_OFFSET_DATA with room for the data at DATA_CHUNK_HEADER. */
export function dataChunk(req: ReplyHandle, flags: number, offset: number, length: number, into?: Buffer): Buffer {
  const c = chunkHeader(req, flags, NBD_REPLY_TYPE_OFFSET_DATA, 8 + length, into);
  writeU64(c, NBD_STRUCTURED_REPLY_SIZE, offset);
  return c;
}

export function holeChunk(req: ReplyHandle, flags: number, offset: number, length: number): Buffer {
  const c = chunkHeader(req, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
  writeU64(c, NBD_STRUCTURED_REPLY_SIZE, offset);
  c.writeUInt32BE(length, NBD_STRUCTURED_REPLY_SIZE + 8);
  return c;
}

/** NBD_REPLY_TYPE_ERROR, final, with a message for humans (at most 4096 bytes, spec). */
export function errorChunk(req: ReplyHandle, error: number, message: string): Buffer {
  const msg = Buffer.from(message, 'utf8').subarray(0, NBD_MAX_STRING_SIZE);
  const h = chunkHeader(req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6 + msg.length);
  h.writeUInt32BE(error, NBD_STRUCTURED_REPLY_SIZE);
  h.writeUInt16BE(msg.length, NBD_STRUCTURED_REPLY_SIZE + 4);
  msg.copy(h, NBD_STRUCTURED_REPLY_SIZE + 6);
  return h;
}

/**
 * NBD_REPLY_TYPE_BLOCK_STATUS for one context: `extents` holds (length, flags) pairs; at most
 * `max` of them are sent (a reply may describe less than was asked, spec).
 */
export function blockStatusChunk(req: ReplyHandle, flags: number, contextId: number, extents: readonly number[], max: number): Buffer {
  const n = Math.min(max, extents.length / 2);
  const c = chunkHeader(req, flags, NBD_REPLY_TYPE_BLOCK_STATUS, 4 + n * 8);
  const at = NBD_STRUCTURED_REPLY_SIZE;
  c.writeUInt32BE(contextId, at);
  for (let k = 0; k < n; k++) {
    c.writeUInt32BE(extents[2 * k], at + 4 + 8 * k);
    c.writeUInt32BE(extents[2 * k + 1], at + 8 + 8 * k);
  }
  return c;
}

function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}
