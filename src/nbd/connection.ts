// One client connection: the fixed-newstyle handshake, then the transmission phase with many
// requests in flight and replies sent in whatever order they complete.
//
// Memory is bounded per connection: the receiver is held (so the socket is paused) while too
// many requests or bytes are in flight, or while the socket's output buffer is over its mark
// because the client is slow to read replies. A WRITE is applied only once its whole payload
// has arrived, so a client that vanishes mid-request never leaves a partial write behind.
import type net from 'node:net';
import type tls from 'node:tls';
import { VdiskError } from '../block/errors.js';
import { REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK } from '../block/driver.js';
import type { NbdExport } from './export.js';
import {
  exportNameReply, greeting, infoBlockSize, infoExport, infoString, matchMetaContexts, metaContextReply,
  OptionParseError, optionError, optionReply, parseInfoRequest, parseMetaContextRequest, serverReply,
} from './handshake.js';
import {
  META_BASE_ALLOCATION, NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
  NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM, NBD_ESHUTDOWN, NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FUA, NBD_INFO_DESCRIPTION, NBD_INFO_NAME,
  NBD_MAX_BUFFER_SIZE, NBD_MAX_OPTION_SIZE, NBD_MAX_STRING_SIZE, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO,
  NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REP_ACK, NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY, NBD_REP_ERR_SHUTDOWN, NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_META_CONTEXT, NBD_REP_SERVER, NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC, nbdErrno, optName,
} from './protocol.js';
import { Payload, Receiver, type NbdRequest, type ReceiverHandler } from './receiver.js';
import { upgradeToTls, type TlsCredentials } from './tls.js';
import { bufferPool } from './buffers.js';

/** What every connection of one server shares. */
export interface ServerContext {
  exports: Map<string, NbdExport>;
  tls: TlsCredentials | null;
  /** Milliseconds from accept to the end of the handshake; 0 = no limit. */
  handshakeLimitMs: number;
  shuttingDown: boolean;
  limits: ConnectionLimits;
  log(message: string): void;
}

/** Per-connection limits before the socket stops being read (bounded memory per client). */
export interface ConnectionLimits {
  maxInFlightRequests: number;
  maxInFlightBytes: number;
  /** Reply bytes queued on the socket because the client reads slowly. */
  maxOutputBuffered: number;
}

export const DEFAULT_LIMITS: ConnectionLimits = {
  maxInFlightRequests: 256,
  maxInFlightBytes: 64 * 1024 * 1024,
  maxOutputBuffered: 16 * 1024 * 1024,
};

/** Option data kept in memory at most; INFO/GO with every possible info request fits. */
const MAX_OPTION_IN_MEMORY = 256 * 1024;
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

const enum Phase {
  Handshake,
  Transmission,
  Closing,
  Closed,
}

interface ReadRun {
  offset: number;
  length: number;
  zero: boolean;
}

export class NbdConnection implements ReceiverHandler {
  /** Where replies go: the socket, or the TLS socket wrapping it after STARTTLS. */
  private out: net.Socket | tls.TLSSocket;
  private readonly receiver: Receiver;
  private phase = Phase.Handshake;
  private handshakeTimer: NodeJS.Timeout | null = null;

  private fixedNewstyle = false;
  private noZeroes = false;
  private tlsActive = false;
  private structured = false;
  /** SET_META_CONTEXT result: valid only for the export it named. */
  private metaExport: string | null = null;
  private metaContexts: Array<{ id: number; name: string }> = [];

  private exp: NbdExport | null = null;
  private flags = 0;
  private baseContextId = 0;
  private depthContextId = 0;

  /** Last data extent block status reported, valid while exp.holeGeneration === dataGeneration. */
  private dataStart = 0;
  private dataEnd = 0;
  private dataGeneration = -1;

  private inFlight = 0;
  private inFlightBytes = 0;
  private holdingForInFlight = false;
  private holdingForOutput = false;
  /** Server shutdown: new requests get ESHUTDOWN. */
  private draining = false;
  /** The stream corked for the current batch of replies (uncorked by flushBatch). */
  private batchOut: net.Socket | tls.TLSSocket | null = null;
  private idleWaiters: Array<() => void> = [];
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;

  constructor(private readonly socket: net.Socket, private readonly ctx: ServerContext) {
    this.out = socket;
    this.closed = new Promise((r) => (this.resolveClosed = r));
    this.receiver = new Receiver(this);
    socket.setNoDelay?.(true);
    socket.on('error', (err) => this.destroy(`socket error: ${err.message}`));
    socket.on('close', () => this.onClose());
    this.receiver.on('error', (err) => this.destroy(`receiver: ${err.message}`));
    if (ctx.handshakeLimitMs > 0) {
      this.handshakeTimer = setTimeout(() => {
        if (this.phase === Phase.Handshake) this.destroy('handshake time limit reached');
      }, ctx.handshakeLimitMs);
      this.handshakeTimer.unref();
    }
    socket.write(greeting());
    if (ctx.tls || !readDirectly(socket, this.receiver)) socket.pipe(this.receiver);
  }

  get transmitting(): boolean {
    return this.phase === Phase.Transmission;
  }

  // ---- lifecycle ---------------------------------------------------------------------------

  /** Hard disconnect. */
  destroy(reason?: string): void {
    if (this.phase === Phase.Closed) return;
    if (reason) this.ctx.log(`closing connection: ${reason}`);
    this.receiver.stop();
    this.out.destroy();
    this.socket.destroy();
    this.onClose();
  }

  /** Stop reading requests, let those in flight finish and their replies go out, then close. */
  async shutdown(): Promise<void> {
    if (this.phase === Phase.Closed) return;
    if (this.phase === Phase.Handshake) {
      this.destroy();
      return;
    }
    // Requests still arriving are answered ESHUTDOWN, which tells the client to send
    // NBD_CMD_DISC (spec); those in flight finish normally. Then FIN, and the descriptor
    // goes when the client closes (or after a grace period).
    this.draining = true;
    await this.idle();
    this.endSoftly();
    await this.closed;
  }

  private endSoftly(): void {
    if (this.phase === Phase.Closed) return;
    this.phase = Phase.Closing;
    this.flushBatch();
    this.receiver.stop(); // keep reading (and dropping) so a close cannot turn into a reset
    this.out.end();
    // A client that never closes its side must not keep the descriptor.
    setTimeout(() => this.destroy(), 2000).unref();
  }

  private onClose(): void {
    if (this.phase === Phase.Closed) return;
    this.phase = Phase.Closed;
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.receiver.stop();
    this.socket.unpipe(this.receiver);
    this.resolveClosed();
  }

  private idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  protocolError(message: string): void {
    this.destroy(`protocol error: ${message}`);
  }

  // ---- output --------------------------------------------------------------------------------

  /**
   * Most replies are one buffer (header and payload built together). Replies are batched: the
   * first one of an event-loop turn corks the socket and a setImmediate uncorks it, so every
   * reply completed in the same turn (a burst of reads answered from the page cache, thread
   * pool completions that arrived together, the chunks of one structured reply) leaves in one
   * writev instead of a syscall each. `pooled` is the pool buffer `buf` was cut from: it goes
   * back to the pool once the socket is done with it.
   */
  private send(buf: Buffer, pooled?: Buffer): void {
    if (this.phase === Phase.Closed) return;
    if (this.batchOut === null) {
      this.batchOut = this.out;
      this.out.cork();
      setImmediate(this.flushBatch);
    }
    if (pooled) this.out.write(buf, (err) => { if (!err) bufferPool.release(pooled); });
    else this.out.write(buf);
    // Requests answered synchronously (page-cache reads) can fill the output within one turn:
    // the limit is checked on every reply, not only when the batch is flushed.
    if (this.out.writableLength > this.ctx.limits.maxOutputBuffered) this.checkOutput();
  }

  /** Send the replies batched so far (also before STARTTLS and FIN). */
  private readonly flushBatch = (): void => {
    const o = this.batchOut;
    if (o === null) return;
    this.batchOut = null;
    o.uncork();
    this.checkOutput();
  };

  /** A client slow to read its replies stops us reading its requests. */
  private checkOutput(): void {
    if (!this.holdingForOutput && this.out.writableLength > this.ctx.limits.maxOutputBuffered && this.phase !== Phase.Closed) {
      this.flushBatch(); // what is queued starts moving now; 'drain' comes once it has gone
      this.holdingForOutput = true;
      this.receiver.hold();
      this.out.once('drain', () => {
        this.holdingForOutput = false;
        this.receiver.release();
      });
    }
  }

  // ---- handshake -----------------------------------------------------------------------------

  clientFlags(flags: number): void {
    if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
      this.destroy(`unknown client flags 0x${flags.toString(16)}`);
      return;
    }
    this.fixedNewstyle = (flags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
  }

  optionHeader(option: number, length: number): Payload {
    if (length > NBD_MAX_OPTION_SIZE) {
      this.destroy(`${optName(option)} of ${length} bytes`);
      return Payload.Disconnect;
    }
    if (option === NBD_OPT_EXPORT_NAME) {
      // No error reply exists for EXPORT_NAME: an impossible name ends the session.
      if (length > NBD_MAX_STRING_SIZE || (this.ctx.tls && !this.tlsActive)) {
        this.destroy(this.ctx.tls && !this.tlsActive ? 'NBD_OPT_EXPORT_NAME before TLS' : 'export name too long');
        return Payload.Disconnect;
      }
      return Payload.Read;
    }
    if (!this.fixedNewstyle) {
      this.destroy(`${optName(option)} without fixed newstyle`);
      return Payload.Disconnect;
    }
    if (this.ctx.tls && !this.tlsActive && option !== NBD_OPT_STARTTLS && option !== NBD_OPT_ABORT) {
      return Payload.Skip;
    }
    return length > MAX_OPTION_IN_MEMORY ? Payload.Skip : Payload.Read;
  }

  option(option: number, length: number, data: Buffer | null): void {
    this.receiver.hold();
    this.handleOption(option, length, data).then(
      (keepReading) => {
        if (keepReading) this.receiver.release();
      },
      (err: unknown) => this.destroy(`${optName(option)}: ${(err as Error).message}`),
    );
  }

  private reply(option: number, type: number, payload?: Buffer): void {
    this.send(optionReply(option, type, payload));
  }

  private replyError(option: number, type: number, message: string): void {
    this.send(optionError(option, type, message));
  }

  /** Returns false when the receiver must stay held (transmission entered elsewhere, TLS, close). */
  private async handleOption(option: number, length: number, data: Buffer | null): Promise<boolean> {
    if (this.phase !== Phase.Handshake) return false;
    if (this.ctx.tls && !this.tlsActive && option !== NBD_OPT_STARTTLS && option !== NBD_OPT_ABORT) {
      this.replyError(option, NBD_REP_ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
      return true;
    }
    if (this.ctx.shuttingDown && option !== NBD_OPT_ABORT) {
      if (option === NBD_OPT_EXPORT_NAME) {
        this.destroy('server shutting down');
        return false;
      }
      this.replyError(option, NBD_REP_ERR_SHUTDOWN, 'server is shutting down');
      return true;
    }
    if (data === null) {
      // Skipped because it was too large to hold.
      const known = option >= NBD_OPT_ABORT && option <= NBD_OPT_SET_META_CONTEXT;
      if (known) this.replyError(option, NBD_REP_ERR_TOO_BIG, `${optName(option)}: ${length} bytes is too large`);
      else this.replyError(option, NBD_REP_ERR_UNSUP, `${optName(option)} is not supported`);
      return true;
    }
    try {
      switch (option) {
        case NBD_OPT_EXPORT_NAME: return this.optExportName(data);
        case NBD_OPT_ABORT:
          this.reply(option, NBD_REP_ACK);
          this.receiver.stop();
          this.endSoftly();
          return false;
        case NBD_OPT_LIST:
          if (length !== 0) {
            this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST carries no data');
            return true;
          }
          for (const e of this.ctx.exports.values()) this.reply(option, NBD_REP_SERVER, serverReply(e.name, e.description));
          this.reply(option, NBD_REP_ACK);
          return true;
        case NBD_OPT_STARTTLS: return await this.optStartTls(length);
        case NBD_OPT_INFO:
        case NBD_OPT_GO: return this.optInfoGo(option, data);
        case NBD_OPT_STRUCTURED_REPLY:
          if (length !== 0) {
            this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY carries no data');
            return true;
          }
          this.structured = true;
          this.reply(option, NBD_REP_ACK);
          return true;
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT: return this.optMetaContext(option, data);
        default:
          this.replyError(option, NBD_REP_ERR_UNSUP, `${optName(option)} is not supported`);
          return true;
      }
    } catch (err) {
      if (!(err instanceof OptionParseError)) throw err;
      this.replyError(option, err.tooBig ? NBD_REP_ERR_TOO_BIG : NBD_REP_ERR_INVALID, `${optName(option)}: ${err.message}`);
      return true;
    }
  }

  private optExportName(data: Buffer): boolean {
    const name = data.toString('utf8');
    const exp = this.ctx.exports.get(name);
    if (!exp) {
      this.destroy(`NBD_OPT_EXPORT_NAME: no export '${name}'`);
      return false;
    }
    this.enterTransmission(exp);
    this.send(exportNameReply(exp.size, this.flags, this.noZeroes));
    return true;
  }

  private optInfoGo(option: number, data: Buffer): boolean {
    const req = parseInfoRequest(data);
    const exp = this.ctx.exports.get(req.name);
    if (!exp) {
      this.replyError(option, NBD_REP_ERR_UNKNOWN, `export '${req.name}' not present`);
      return true;
    }
    this.reply(option, NBD_REP_INFO, infoExport(exp.size, exp.transmissionFlags(this.structured)));
    if (req.requests.has(NBD_INFO_NAME)) this.reply(option, NBD_REP_INFO, infoString(NBD_INFO_NAME, exp.name));
    if (req.requests.has(NBD_INFO_DESCRIPTION) && exp.description) {
      this.reply(option, NBD_REP_INFO, infoString(NBD_INFO_DESCRIPTION, exp.description));
    }
    // Sent unasked too: our maximum (32 MiB) is not the protocol's default "unlimited".
    this.reply(option, NBD_REP_INFO, infoBlockSize(exp.blockSize()));
    this.reply(option, NBD_REP_ACK);
    if (option === NBD_OPT_GO) this.enterTransmission(exp);
    return true;
  }

  private optMetaContext(option: number, data: Buffer): boolean {
    const list = option === NBD_OPT_LIST_META_CONTEXT;
    // SET replaces the selection even when it fails (spec).
    if (!list) {
      this.metaContexts = [];
      this.metaExport = null;
    }
    if (!this.structured) {
      this.replyError(option, NBD_REP_ERR_INVALID, `${optName(option)} needs NBD_OPT_STRUCTURED_REPLY first`);
      return true;
    }
    const req = parseMetaContextRequest(data);
    if (!this.ctx.exports.has(req.exportName)) {
      this.replyError(option, NBD_REP_ERR_UNKNOWN, `export '${req.exportName}' not present`);
      return true;
    }
    const found = matchMetaContexts(req.queries, list);
    for (const c of found) {
      this.reply(option, NBD_REP_META_CONTEXT, metaContextReply(list ? 0 : c.id, c.name));
    }
    if (!list) {
      this.metaContexts = found;
      this.metaExport = req.exportName;
    }
    this.reply(option, NBD_REP_ACK);
    return true;
  }

  private async optStartTls(length: number): Promise<boolean> {
    const option = NBD_OPT_STARTTLS;
    if (!this.ctx.tls) {
      this.replyError(option, NBD_REP_ERR_POLICY, 'TLS is not configured on this server');
      return true;
    }
    if (this.tlsActive) {
      this.replyError(option, NBD_REP_ERR_INVALID, 'TLS is already active');
      return true;
    }
    if (length !== 0) {
      this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS carries no data');
      return true;
    }
    // The client may send nothing but its ClientHello after our ACK; bytes already parsed
    // past the option would be plaintext smuggled into the TLS session.
    if (this.receiver.unparsedBytes > 0) {
      this.destroy('data after NBD_OPT_STARTTLS before the ACK');
      return false;
    }
    const raw = this.socket;
    raw.unpipe(this.receiver);
    raw.pause();
    this.flushBatch();
    await new Promise<void>((resolve, reject) => raw.write(optionReply(option, NBD_REP_ACK), (err) => (err ? reject(err) : resolve())));
    let secure: tls.TLSSocket;
    try {
      secure = await upgradeToTls(raw, this.ctx.tls, this.ctx.handshakeLimitMs);
    } catch (err) {
      this.destroy(`TLS: ${(err as Error).message}`);
      return false;
    }
    if (this.phase !== Phase.Handshake) {
      secure.destroy();
      return false;
    }
    // Negotiated state does not survive STARTTLS (spec).
    this.tlsActive = true;
    this.structured = false;
    this.metaContexts = [];
    this.metaExport = null;
    this.out = secure;
    secure.on('error', (err) => this.destroy(`TLS error: ${err.message}`));
    secure.on('close', () => this.onClose());
    secure.pipe(this.receiver);
    return true;
  }

  private enterTransmission(exp: NbdExport): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    this.exp = exp;
    this.flags = exp.transmissionFlags(this.structured);
    if (this.metaExport !== exp.name) this.metaContexts = [];
    this.baseContextId = this.metaContexts.find((c) => c.name === META_BASE_ALLOCATION)?.id ?? 0;
    this.depthContextId = this.metaContexts.find((c) => c.name !== META_BASE_ALLOCATION)?.id ?? 0;
    this.phase = Phase.Transmission;
    this.receiver.startTransmission();
  }

  // ---- transmission: validation ----------------------------------------------------------------

  request(req: NbdRequest): Payload {
    if (this.draining && req.type !== NBD_CMD_DISC) {
      if (req.type === NBD_CMD_WRITE && req.length > NBD_MAX_BUFFER_SIZE) {
        this.destroy();
        return Payload.Disconnect;
      }
      this.reject(req, NBD_ESHUTDOWN, 'server is shutting down');
      if (req.type === NBD_CMD_WRITE) return Payload.Skip;
      this.sendError(req, req.error, req.errorMessage);
      return Payload.None;
    }
    if (req.type === NBD_CMD_WRITE) {
      if (req.length > NBD_MAX_BUFFER_SIZE) {
        // Reading it would mean buffering it; the spec allows a hard disconnect here.
        this.destroy(`NBD_CMD_WRITE payload of ${req.length} bytes`);
        return Payload.Disconnect;
      }
      return this.validate(req) ? Payload.Read : Payload.Skip;
    }
    if (req.type === NBD_CMD_DISC) {
      this.receiver.stop();
      this.phase = Phase.Closing;
      this.idle().then(() => this.endSoftly());
      return Payload.None;
    }
    if (!this.validate(req)) {
      this.sendError(req, req.error, req.errorMessage);
      return Payload.None;
    }
    this.dispatch(req, null);
    return Payload.None;
  }

  payload(req: NbdRequest, data: Buffer | null, pooled: Buffer | null): void {
    if (data === null) this.sendError(req, req.error, req.errorMessage);
    else this.dispatch(req, data, pooled);
  }

  private reject(req: NbdRequest, error: number, message: string): false {
    req.error = error;
    req.errorMessage = message;
    return false;
  }

  /** Flags, read-only, bounds and sizes, in that order (as nbdkit and QEMU check them). */
  private validate(req: NbdRequest): boolean {
    const exp = this.exp!;
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
      default: return this.reject(req, NBD_EINVAL, `unknown command ${req.type}`);
    }
    if (req.flags & ~allowed) return this.reject(req, NBD_EINVAL, `invalid flags 0x${req.flags.toString(16)} for command ${req.type}`);
    if (req.type === NBD_CMD_BLOCK_STATUS && this.baseContextId === 0 && this.depthContextId === 0) {
      return this.reject(req, NBD_EINVAL, 'no metadata context was negotiated');
    }
    if (writes && exp.readOnly) return this.reject(req, NBD_EPERM, 'export is read-only');
    if (!ranged) {
      if (req.offset !== 0 || req.length !== 0) return this.reject(req, NBD_EINVAL, 'flush offset and length must be zero');
      return true;
    }
    const size = exp.size;
    if (req.offset > size || req.length > size - req.offset) {
      const past = `request ${req.offset}+${req.length} is past the end of the export (${size} bytes)`;
      return this.reject(req, req.type === NBD_CMD_WRITE || req.type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL, past);
    }
    if ((req.type === NBD_CMD_READ || req.type === NBD_CMD_CACHE) && req.length > NBD_MAX_BUFFER_SIZE) {
      return this.reject(req, NBD_EINVAL, `length ${req.length} exceeds the maximum block size ${NBD_MAX_BUFFER_SIZE}`);
    }
    if (req.type === NBD_CMD_BLOCK_STATUS && req.length === 0) return this.reject(req, NBD_EINVAL, 'block status of zero length');
    return true;
  }

  // ---- transmission: execution -----------------------------------------------------------------

  private dispatch(req: NbdRequest, data: Buffer | null, pooled: Buffer | null = null): void {
    const bytes = req.type === NBD_CMD_READ ? req.length : (data?.length ?? 0);
    this.inFlight++;
    this.inFlightBytes += bytes;
    if (!this.holdingForInFlight && (this.inFlight >= this.ctx.limits.maxInFlightRequests || this.inFlightBytes >= this.ctx.limits.maxInFlightBytes)) {
      this.holdingForInFlight = true;
      this.receiver.hold();
    }
    this.execute(req, data, pooled).catch((err: unknown) => this.sendError(req, errnoOf(err, req), messageOf(err)))
      .finally(() => this.complete(bytes));
  }

  private complete(bytes: number): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    if (this.holdingForInFlight && this.inFlight < this.ctx.limits.maxInFlightRequests / 2 && this.inFlightBytes < this.ctx.limits.maxInFlightBytes / 2) {
      this.holdingForInFlight = false;
      this.receiver.release();
    }
    if (this.inFlight === 0 && this.idleWaiters.length > 0) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
  }

  private async execute(req: NbdRequest, data: Buffer | null, pooled: Buffer | null): Promise<void> {
    const backend = this.exp!.backend;
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
        this.exp!.holeGeneration++;
        try {
          await backend.pwriteZeroes(req.offset, req.length, flags);
        } finally {
          this.exp!.holeGeneration++;
        }
        return this.sendOk(req);
      }
      case NBD_CMD_TRIM:
        this.exp!.holeGeneration++;
        try {
          await backend.pdiscard(req.offset, req.length);
        } finally {
          this.exp!.holeGeneration++;
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
    const backend = this.exp!.backend;
    const { offset, length } = req;
    // A pool buffer that failed to fill is dropped, not released: see buffers.ts.
    if (!this.structured) {
      // Header and data in one buffer: the payload is read straight into the reply.
      const pooled = bufferPool.acquire(16 + length);
      const reply = pooled.subarray(0, 16 + length);
      if (length > 0) await backend.pread(offset, reply.subarray(16));
      this.simpleHeader(reply, req, 0);
      this.send(reply, pooled);
      return;
    }
    if (length === 0) {
      this.sendChunk(req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, null);
      return;
    }
    const runs = req.flags & NBD_CMD_FLAG_DF || length < SPARSE_READ_MIN || this.knownData(offset, length)
      ? null : await this.readRuns(offset, length);
    if (!runs || (runs.length === 1 && !runs[0].zero)) {
      const pooled = bufferPool.acquire(28 + length);
      const reply = this.dataChunk(req, NBD_REPLY_FLAG_DONE, offset, length, pooled);
      await backend.pread(offset, reply.subarray(28));
      this.send(reply, pooled);
      return;
    }
    // Read every data run first, so no chunk goes out before we know the read succeeded.
    const chunks = await Promise.all(runs.map(async (r, i): Promise<[Buffer, Buffer | undefined]> => {
      const flags = i === runs.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      if (r.zero) return [this.holeChunk(req, flags, r.offset, r.length), undefined];
      const pooled = bufferPool.acquire(28 + r.length);
      const chunk = this.dataChunk(req, flags, r.offset, r.length, pooled);
      await backend.pread(r.offset, chunk.subarray(28));
      return [chunk, pooled];
    }));
    // One batch: the chunks leave together (send corks until the end of this turn).
    for (const [c, pooled] of chunks) this.send(c, pooled);
  }

  private knownData(offset: number, length: number): boolean {
    return this.dataGeneration === this.exp!.holeGeneration && offset >= this.dataStart && offset + length <= this.dataEnd;
  }

  /** Zero and data runs covering [offset, offset+length), from block status through the chain. */
  private async readRuns(offset: number, length: number): Promise<ReadRun[] | null> {
    const exp = this.exp!;
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
    const backend = this.exp!.backend;
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
      const n = Math.min(reqOne ? 1 : MAX_EXTENTS, ext.length / 2);
      const payload = Buffer.allocUnsafe(4 + n * 8);
      payload.writeUInt32BE(id, 0);
      for (let k = 0; k < n; k++) {
        payload.writeUInt32BE(ext[2 * k], 4 + 8 * k);
        payload.writeUInt32BE(ext[2 * k + 1], 8 + 8 * k);
      }
      this.sendChunk(req, i === chunks.length - 1 ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS, payload);
    });
  }

  // ---- transmission: replies ---------------------------------------------------------------------

  private simpleHeader(h: Buffer, req: NbdRequest, error: number): void {
    h.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
    h.writeUInt32BE(error, 4);
    h.writeUInt32BE(req.handleHi, 8);
    h.writeUInt32BE(req.handleLo, 12);
  }

  private sendSimple(req: NbdRequest, error: number): void {
    const h = Buffer.allocUnsafe(16);
    this.simpleHeader(h, req, error);
    this.send(h);
  }

  private sendOk(req: NbdRequest): void {
    this.sendSimple(req, 0);
  }

  /** A structured chunk header followed by room for `length` payload bytes. */
  private chunk(req: NbdRequest, flags: number, type: number, length: number, into?: Buffer): Buffer {
    const h = into ? into.subarray(0, 20 + length) : Buffer.allocUnsafe(20 + length);
    h.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeUInt32BE(req.handleHi, 8);
    h.writeUInt32BE(req.handleLo, 12);
    h.writeUInt32BE(length, 16);
    return h;
  }

  private sendChunk(req: NbdRequest, flags: number, type: number, payload: Buffer | null): void {
    const c = this.chunk(req, flags, type, payload?.length ?? 0);
    payload?.copy(c, 20);
    this.send(c);
  }

  /** NBD_REPLY_TYPE_OFFSET_DATA with room for the data at byte 28. */
  private dataChunk(req: NbdRequest, flags: number, offset: number, length: number, into?: Buffer): Buffer {
    const c = this.chunk(req, flags, NBD_REPLY_TYPE_OFFSET_DATA, 8 + length, into);
    writeU64(c, 20, offset);
    return c;
  }

  private holeChunk(req: NbdRequest, flags: number, offset: number, length: number): Buffer {
    const c = this.chunk(req, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
    writeU64(c, 20, offset);
    c.writeUInt32BE(length, 28);
    return c;
  }

  /** Errors go in a structured error chunk (with a message) whenever structured replies are on. */
  private sendError(req: NbdRequest, error: number, message: string): void {
    if (!this.structured) {
      this.sendSimple(req, error);
      return;
    }
    const msg = Buffer.from(message, 'utf8').subarray(0, NBD_MAX_STRING_SIZE);
    const h = this.chunk(req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6 + msg.length);
    h.writeUInt32BE(error, 20);
    h.writeUInt16BE(msg.length, 24);
    msg.copy(h, 26);
    this.send(h);
  }
}

/**
 * Plain (non-TLS) connections read the socket the way net.Socket's `onread` option does: into
 * buffers the receiver hands out, so the bulk of a WRITE payload goes from the kernel straight
 * into its pool buffer in reads as large as the socket has queued, with no 64 KiB chunks, no
 * copies and no stream machinery. net.Server offers no `onread` for accepted sockets, so the
 * same three fields the constructor would set are set here, before the first read. Returns
 * false (and changes nothing) when this Node does not have them; the caller pipes instead.
 * Backpressure is the same contract: a held receiver answers false, which stops reading, and
 * resume() starts it again.
 */
function readDirectly(socket: net.Socket, receiver: Receiver): boolean {
  const handle = (socket as unknown as { _handle?: { useUserBuffer?: (b: Buffer) => void; reading?: boolean } })._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function') return false;
  const sym = new Map<string | undefined, symbol>();
  for (const s of Object.getOwnPropertySymbols(socket)) sym.set(s.description, s);
  const kBuffer = sym.get('kBuffer');
  const kBufferGen = sym.get('kBufferGen');
  const kBufferCb = sym.get('kBufferCb');
  if (!kBuffer || !kBufferGen || !kBufferCb) return false;
  const fields = socket as unknown as Record<symbol, unknown>;
  if (fields[kBuffer] !== null && fields[kBuffer] !== undefined) return false;
  const resume = (): void => {
    if (!socket.destroyed) socket.resume();
  };
  const first = receiver.nextReadBuffer();
  fields[kBuffer] = first;
  fields[kBufferGen] = () => receiver.nextReadBuffer();
  fields[kBufferCb] = (n: number, buf: Buffer) => receiver.readInto(buf, n, resume);
  handle.useUserBuffer(first);
  // Flowing, so EOF still ends the socket ('end', then 'close') as it did through pipe().
  socket.resume();
  return true;
}

function addExtent(list: number[], length: number, flags: number): void {
  const n = list.length;
  if (n > 0 && list[n - 1] === flags) list[n - 2] += length;
  else list.push(length, flags);
}

function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

/** The NBD error for a failed request; ENOTSUP only where the spec allows it (fast zero). */
function errnoOf(err: unknown, req: NbdRequest): number {
  const code = err instanceof VdiskError ? err.code : (err as NodeJS.ErrnoException | undefined)?.code;
  const e = nbdErrno(code);
  if (e === NBD_ENOTSUP && !(req.type === NBD_CMD_WRITE_ZEROES && req.flags & NBD_CMD_FLAG_FAST_ZERO)) return NBD_EINVAL;
  return e;
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
