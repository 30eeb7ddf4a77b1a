// The transmission phase of one connection (like nbdkit's protocol.c): validate a request,
// execute it on the export's BlockBackend, and build its reply. Reads may be answered sparsely
// (hole chunks for zero ranges) and BLOCK_STATUS answers each negotiated meta context.
//
// What this does not do: read the socket, count requests in flight or hold the receiver
// (connection.ts), or put bytes on the wire itself: every reply goes to `out.send`.
import { VdiskError } from '../block/errors.js';
import { REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK } from '../block/driver.js';
import { bufferPool } from './buffers.js';
import type { NbdExport } from './export.js';
import {
  META_BASE_ALLOCATION, META_QEMU_ALLOCATION_DEPTH, NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH,
  NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_EPERM,
  NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FUA, NBD_MAX_BUFFER_SIZE, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE,
  NBD_SIMPLE_REPLY_SIZE, nbdErrno,
} from './protocol.js';
import type { NbdRequest } from './receiver.js';
import {
  DATA_CHUNK_HEADER, blockStatusChunk, chunk, dataChunk, errorChunk, holeChunk, simpleReply, writeSimpleHeader,
} from './replies.js';

/**
 * Reads at least this large are answered sparsely (hole chunks for zero ranges). Below it a
 * block-status lookup costs more than the zeros it would save sending.
 */
const SPARSE_READ_MIN = 64 * 1024;
/**
 * A sparse read asks block status this far ahead (at least), so sequential reads of a data
 * region skip the lookup until they leave the range it reported.
 */
const STATUS_LOOKAHEAD = 8 * 1024 * 1024;
/** Extents and read runs per reply; a reply may cover less than asked (spec allows it). */
const MAX_EXTENTS = 65536;
const MAX_READ_RUNS = 1024;
/** NBD_CMD_CACHE reads ahead in pieces this big. */
const CACHE_PIECE = 1 << 20;

/** A meta context selected by NBD_OPT_SET_META_CONTEXT: the id the server handed out. */
export interface MetaContext {
  id: number;
  name: string;
}

/** What the handshake settled, as far as transmission cares. */
export interface Negotiated {
  structured: boolean;
  /** Contexts selected for this export (empty when SET_META_CONTEXT named another one). */
  contexts: readonly MetaContext[];
}

/** Where replies go; `pooled` is the pool buffer `buf` was cut from, released once sent. */
export interface ReplySink {
  send(buf: Buffer, pooled?: Buffer): void;
}

interface ReadRun {
  offset: number;
  length: number;
  zero: boolean;
}

export class Transmission {
  /** Transmission flags sent in NBD_INFO_EXPORT or the EXPORT_NAME reply. */
  readonly flags: number;
  private readonly structured: boolean;
  private readonly baseContextId: number;
  private readonly depthContextId: number;

  /** Last data extent block status reported, valid while exp.holeGeneration === dataGeneration. */
  private dataStart = 0;
  private dataEnd = 0;
  private dataGeneration = -1;

  constructor(readonly exp: NbdExport, negotiated: Negotiated, private readonly out: ReplySink) {
    this.structured = negotiated.structured;
    this.flags = exp.transmissionFlags(negotiated.structured);
    this.baseContextId = negotiated.contexts.find((c) => c.name === META_BASE_ALLOCATION)?.id ?? 0;
    this.depthContextId = negotiated.contexts.find((c) => c.name === META_QEMU_ALLOCATION_DEPTH)?.id ?? 0;
  }

  // ---- validation ---------------------------------------------------------------------------

  /**
   * Flags, read-only, bounds and sizes, in that order (as nbdkit and QEMU check them). On
   * failure the request carries the error to answer and false is returned.
   */
  validate(req: NbdRequest): boolean {
    const exp = this.exp;
    const fua = this.flags & NBD_FLAG_SEND_FUA ? NBD_CMD_FLAG_FUA : 0;
    let allowed: number;
    let writes = false;
    let ranged = true;
    switch (req.type) {
      case NBD_CMD_READ: allowed = fua | (this.structured ? NBD_CMD_FLAG_DF : 0); break;
      case NBD_CMD_WRITE: allowed = fua; writes = true; break;
      case NBD_CMD_TRIM: allowed = fua; writes = true; break;
      case NBD_CMD_WRITE_ZEROES:
        allowed = fua | NBD_CMD_FLAG_NO_HOLE | (this.flags & NBD_FLAG_SEND_FAST_ZERO ? NBD_CMD_FLAG_FAST_ZERO : 0);
        writes = true;
        break;
      case NBD_CMD_FLUSH: allowed = fua; ranged = false; break;
      case NBD_CMD_CACHE: allowed = fua; break;
      case NBD_CMD_BLOCK_STATUS: allowed = fua | NBD_CMD_FLAG_REQ_ONE; break;
      default: return reject(req, NBD_EINVAL, `unknown command ${req.type}`);
    }
    if (req.flags & ~allowed) return reject(req, NBD_EINVAL, `invalid flags 0x${req.flags.toString(16)} for command ${req.type}`);
    if (req.type === NBD_CMD_BLOCK_STATUS && this.baseContextId === 0 && this.depthContextId === 0) {
      return reject(req, NBD_EINVAL, 'no metadata context was negotiated');
    }
    if (writes && exp.readOnly) return reject(req, NBD_EPERM, 'export is read-only');
    if (!ranged) {
      if (req.offset !== 0 || req.length !== 0) return reject(req, NBD_EINVAL, 'flush offset and length must be zero');
      return true;
    }
    const size = exp.size;
    if (req.offset > size || req.length > size - req.offset) {
      const past = `request ${req.offset}+${req.length} is past the end of the export (${size} bytes)`;
      return reject(req, req.type === NBD_CMD_WRITE || req.type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL, past);
    }
    if ((req.type === NBD_CMD_READ || req.type === NBD_CMD_CACHE) && req.length > NBD_MAX_BUFFER_SIZE) {
      return reject(req, NBD_EINVAL, `length ${req.length} exceeds the maximum block size ${NBD_MAX_BUFFER_SIZE}`);
    }
    if (req.type === NBD_CMD_BLOCK_STATUS && req.length === 0) return reject(req, NBD_EINVAL, 'block status of zero length');
    return true;
  }

  // ---- execution ----------------------------------------------------------------------------

  /** Runs a validated request and sends its reply; throws when it failed (see fail()). */
  async execute(req: NbdRequest, data: Buffer | null, pooled: Buffer | null): Promise<void> {
    const exp = this.exp;
    const backend = exp.backend;
    const fua = req.flags & NBD_CMD_FLAG_FUA ? REQ_FUA : 0;
    switch (req.type) {
      case NBD_CMD_READ:
        return this.read(req);
      case NBD_CMD_WRITE:
        await backend.pwrite(req.offset, data!, fua);
        // Only after success: a failed write may still have pieces in flight reading it.
        if (pooled) bufferPool.release(pooled);
        return this.sendOk(req);
      case NBD_CMD_WRITE_ZEROES: {
        let flags = fua;
        if (!(req.flags & NBD_CMD_FLAG_NO_HOLE)) flags |= REQ_MAY_UNMAP;
        if (req.flags & NBD_CMD_FLAG_FAST_ZERO) flags |= REQ_NO_FALLBACK;
        // Data may become zeros: forget what block status said, before and after.
        exp.holeGeneration++;
        try {
          await backend.pwriteZeroes(req.offset, req.length, flags);
        } finally {
          exp.holeGeneration++;
        }
        return this.sendOk(req);
      }
      case NBD_CMD_TRIM:
        exp.holeGeneration++;
        try {
          await backend.pdiscard(req.offset, req.length);
        } finally {
          exp.holeGeneration++;
        }
        // Discard takes no FUA; without a visible write cache it must be stable before the reply too.
        if (fua || !backend.hasWriteCache) await backend.flush();
        return this.sendOk(req);
      case NBD_CMD_FLUSH:
        await backend.flush();
        return this.sendOk(req);
      case NBD_CMD_CACHE: {
        const piece = Buffer.allocUnsafe(Math.min(CACHE_PIECE, req.length));
        for (let pos = 0; pos < req.length; pos += piece.length) {
          await backend.pread(req.offset + pos, piece.subarray(0, Math.min(piece.length, req.length - pos)));
        }
        return this.sendOk(req);
      }
      case NBD_CMD_BLOCK_STATUS:
        return this.blockStatus(req);
    }
  }

  private async read(req: NbdRequest): Promise<void> {
    const backend = this.exp.backend;
    const { offset, length } = req;
    // A pool buffer that failed to fill is dropped, not released: see buffers.ts.
    if (!this.structured) {
      // Header and data in one buffer: the payload is read straight into the reply.
      const pooled = bufferPool.acquire(NBD_SIMPLE_REPLY_SIZE + length);
      const reply = pooled.subarray(0, NBD_SIMPLE_REPLY_SIZE + length);
      if (length > 0) await backend.pread(offset, reply.subarray(NBD_SIMPLE_REPLY_SIZE));
      this.out.send(writeSimpleHeader(reply, req, 0), pooled);
      return;
    }
    if (length === 0) {
      this.out.send(chunk(req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, null));
      return;
    }
    const runs = req.flags & NBD_CMD_FLAG_DF || length < SPARSE_READ_MIN || this.knownData(offset, length)
      ? null : await this.readRuns(offset, length);
    if (!runs || (runs.length === 1 && !runs[0].zero)) {
      const pooled = bufferPool.acquire(DATA_CHUNK_HEADER + length);
      const reply = dataChunk(req, NBD_REPLY_FLAG_DONE, offset, length, pooled);
      await backend.pread(offset, reply.subarray(DATA_CHUNK_HEADER));
      this.out.send(reply, pooled);
      return;
    }
    // Read every data run first, so no chunk goes out before we know the read succeeded.
    const chunks = await Promise.all(runs.map(async (r, i): Promise<[Buffer, Buffer | undefined]> => {
      const flags = i === runs.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      if (r.zero) return [holeChunk(req, flags, r.offset, r.length), undefined];
      const pooled = bufferPool.acquire(DATA_CHUNK_HEADER + r.length);
      const c = dataChunk(req, flags, r.offset, r.length, pooled);
      await backend.pread(r.offset, c.subarray(DATA_CHUNK_HEADER));
      return [c, pooled];
    }));
    // One batch: the chunks leave together (send corks until the end of this turn).
    for (const [c, pooled] of chunks) this.out.send(c, pooled);
  }

  private knownData(offset: number, length: number): boolean {
    return this.dataGeneration === this.exp.holeGeneration && offset >= this.dataStart && offset + length <= this.dataEnd;
  }

  /** Zero and data runs covering [offset, offset+length), from block status through the chain. */
  private async readRuns(offset: number, length: number): Promise<ReadRun[] | null> {
    const exp = this.exp;
    const backend = exp.backend;
    const end = offset + length;
    const runs: ReadRun[] = [];
    let pos = offset;
    try {
      while (pos < end) {
        const first = pos === offset;
        const generation = exp.holeGeneration;
        const ask = first ? Math.min(exp.size - pos, Math.max(end - pos, STATUS_LOOKAHEAD)) : end - pos;
        const ext = await backend.blockStatusAbove(pos, ask);
        if (ext.length === 0) break;
        if (first && !ext[0].zero && ext[0].offset <= pos && generation === exp.holeGeneration) {
          this.dataStart = ext[0].offset;
          this.dataEnd = ext[0].offset + ext[0].length;
          this.dataGeneration = generation;
        }
        for (const e of ext) {
          const len = Math.min(e.length, end - pos);
          if (len <= 0) break;
          const last = runs[runs.length - 1];
          if (last && last.zero === e.zero) last.length += len;
          else runs.push({ offset: pos, length: len, zero: e.zero });
          pos += len;
        }
        if (runs.length > MAX_READ_RUNS) break;
      }
    } catch {
      return null; // status is advisory: read it all as data
    }
    if (pos < end) {
      const last = runs[runs.length - 1];
      if (last && !last.zero) last.length += end - pos;
      else runs.push({ offset: pos, length: end - pos, zero: false });
    }
    return runs;
  }

  private async blockStatus(req: NbdRequest): Promise<void> {
    const backend = this.exp.backend;
    const reqOne = (req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
    const end = req.offset + req.length;
    const base: number[] = [];
    const depth: number[] = [];
    let pos = req.offset;
    while (pos < end && base.length < MAX_EXTENTS * 2) {
      const ext = await backend.blockStatusAbove(pos, end - pos);
      if (ext.length === 0) break;
      for (const e of ext) {
        const len = Math.min(e.length, end - pos);
        if (len <= 0) break;
        addExtent(base, len, (e.data ? 0 : 1) | (e.zero ? 2 : 0));
        addExtent(depth, len, e.allocated ? e.depth + 1 : 0);
        pos += len;
      }
      if (reqOne) break;
    }
    const chunks: Array<[number, number[]]> = [];
    if (this.baseContextId) chunks.push([this.baseContextId, base]);
    if (this.depthContextId) chunks.push([this.depthContextId, depth]);
    chunks.forEach(([id, ext], i) => {
      const flags = i === chunks.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      this.out.send(blockStatusChunk(req, flags, id, ext, reqOne ? 1 : MAX_EXTENTS));
    });
  }

  // ---- replies ------------------------------------------------------------------------------

  private sendOk(req: NbdRequest): void {
    this.out.send(simpleReply(req, 0));
  }

  /** Errors go in a structured error chunk (with a message) whenever structured replies are on. */
  sendError(req: NbdRequest, error: number, message: string): void {
    this.out.send(this.structured ? errorChunk(req, error, message) : simpleReply(req, error));
  }

  /** The reply to a request whose execution threw. */
  fail(req: NbdRequest, err: unknown): void {
    const code = err instanceof VdiskError ? err.code : (err as NodeJS.ErrnoException | undefined)?.code;
    this.sendError(req, nbdErrno(code, req.flags), messageOf(err));
  }
}

function reject(req: NbdRequest, error: number, message: string): false {
  req.error = error;
  req.errorMessage = message;
  return false;
}

function addExtent(list: number[], length: number, flags: number): void {
  const n = list.length;
  if (n > 0 && list[n - 1] === flags) list[n - 2] += length;
  else list.push(length, flags);
}

/** Messages name the failure, not server paths. */
function messageOf(err: unknown): string {
  if (err instanceof VdiskError) {
    const text = err.message;
    const colon = text.lastIndexOf(': ');
    return colon >= 0 ? text.slice(colon + 2) : text;
  }
  return 'internal error';
}
