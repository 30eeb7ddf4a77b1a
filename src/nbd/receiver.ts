// The NBD receiver: a Writable that turns the client's byte stream into protocol events.
// It is a state machine over whatever chunks arrive (ws's receiver is the model): the 4-byte
// client flags, option headers and option data during the handshake, request headers and
// WRITE payloads during transmission.
//
// Backpressure falls out of the Writable contract: a chunk's callback is called only once the
// chunk is fully parsed and nobody holds the receiver. While the connection holds it (too many
// requests in flight, socket output full, an option being answered), parsing stops mid-chunk,
// the callback waits, the Writable buffer fills, and pipe() pauses the socket.
//
// Payloads the connection does not want (an oversized option, a WRITE that will be refused)
// are skipped as they stream past: never buffered.
import { Writable } from 'node:stream';
import { bufferPool } from './buffers.js';
import {
  IHAVEOPT, NBD_OPTION_HEADER_SIZE, NBD_REQUEST_MAGIC, NBD_REQUEST_SIZE,
} from './protocol.js';

export interface NbdRequest {
  flags: number;
  type: number;
  /** The 8-byte handle as two 32-bit halves: echoed, never interpreted. */
  handleHi: number;
  handleLo: number;
  /** Exact below 2^53; anything larger is past every export's end anyway. */
  offset: number;
  length: number;
  /** NBD error decided before the payload arrived (the payload is then skipped). */
  error: number;
  errorMessage: string;
}

/** What to do with the bytes that follow a header. */
export const enum Payload {
  None,
  Read,
  Skip,
  Disconnect,
}

export interface ReceiverHandler {
  clientFlags(flags: number): void;
  /** After an option header: read the data into memory, skip it, or hang up. */
  optionHeader(option: number, length: number): Payload;
  /** data is null when the option's data was skipped. */
  option(option: number, length: number, data: Buffer | null): void;
  /** After a request header. Only NBD_CMD_WRITE carries a payload. */
  request(req: NbdRequest): Payload;
  /**
   * A WRITE's payload arrived in full (null when it was skipped). `pooled` is the pool buffer
   * data lies in (give it back once the write succeeded), or null when data is a slice of a
   * received chunk.
   */
  payload(req: NbdRequest, data: Buffer | null, pooled: Buffer | null): void;
  protocolError(message: string): void;
}

const enum State {
  ClientFlags,
  OptionHeader,
  OptionData,
  RequestHeader,
  Payload,
  Stopped,
}

const EMPTY = Buffer.alloc(0);
/** Socket reads land here in direct mode, except the rest of a large WRITE payload. */
const SCRATCH_SIZE = 64 * 1024;
/** A WRITE payload with at least this much still to come is read straight into its buffer. */
const DIRECT_MIN = 16 * 1024;

export class Receiver extends Writable {
  private state = State.ClientFlags;
  private holds = 0;
  private parsing = false;

  /** The chunk being parsed, where we are in it, and the callback that releases it. */
  private chunk: Buffer = EMPTY;
  private pos = 0;
  private chunkCallback: ((err?: Error | null) => void) | null = null;

  /** A header split across chunks is assembled here. */
  private readonly header = Buffer.alloc(NBD_REQUEST_SIZE);
  private headerFill = 0;

  /** Current option or request and its payload. */
  private option = 0;
  private request: NbdRequest | null = null;
  private payloadLength = 0;
  private payloadDone = 0;
  private payloadBuf: Buffer | null = null;
  /** The pool buffer payloadBuf was cut from (WRITE payloads spanning chunks). */
  private payloadPooled: Buffer | null = null;
  private skipping = false;

  /**
   * Direct mode (readInto/nextReadBuffer): the socket reads into buffers we hand it. The
   * scratch buffer is reused for every read, so nothing may keep a view of it past parsing;
   * directTarget is the rest of a payload buffer handed out for the next read.
   */
  private scratch: Buffer | null = null;
  private directTarget: Buffer | null = null;

  constructor(private readonly handler: ReceiverHandler) {
    super({ highWaterMark: 64 * 1024, decodeStrings: false });
  }

  /** Enter the transmission phase (after NBD_OPT_GO / NBD_OPT_EXPORT_NAME). */
  startTransmission(): void {
    this.state = State.RequestHeader;
    this.headerFill = 0;
  }

  /** Expect option headers (after the client flags, which the handler consumed). */
  startOptions(): void {
    this.state = State.OptionHeader;
    this.headerFill = 0;
  }

  /** Ignore everything from now on (disconnecting, or the stream moved to TLS). */
  stop(): void {
    this.state = State.Stopped;
    this.payloadBuf = null;
    this.payloadPooled = null;
    this.chunk = EMPTY;
    this.pos = 0;
    const cb = this.chunkCallback;
    this.chunkCallback = null;
    cb?.();
  }

  get stopped(): boolean {
    return this.state === State.Stopped;
  }

  /** Bytes received but not yet parsed (for STARTTLS: the client must have sent nothing more). */
  get unparsedBytes(): number {
    const rest = this.chunk.length - this.pos;
    return rest + Math.max(0, this.writableLength - this.chunk.length);
  }

  /** Stop parsing after the current message until release() is called as often. */
  hold(): void {
    this.holds++;
  }

  release(): void {
    if (this.holds === 0) return;
    if (--this.holds === 0 && !this.parsing) this.parse();
  }

  get held(): boolean {
    return this.holds > 0;
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, callback: (err?: Error | null) => void): void {
    if (this.state === State.Stopped) {
      callback();
      return;
    }
    this.chunk = chunk;
    this.pos = 0;
    this.chunkCallback = callback;
    if (this.holds === 0) this.parse();
  }

  /**
   * Direct mode: where the socket's next read should land. The rest of a large WRITE payload
   * (no copy, no per-64-KiB read callbacks), else the scratch buffer (a fresh one when the
   * current one still holds bytes not parsed because the receiver is held).
   */
  nextReadBuffer(): Buffer {
    this.directTarget = null;
    if (this.state === State.Payload && this.payloadPooled && this.pos >= this.chunk.length
      && this.payloadLength - this.payloadDone >= DIRECT_MIN) {
      this.directTarget = this.payloadBuf!.subarray(this.payloadDone, this.payloadLength);
      return this.directTarget;
    }
    if (this.scratch === null || (this.pos < this.chunk.length && this.chunk.buffer === this.scratch.buffer)) {
      this.scratch = Buffer.allocUnsafeSlow(SCRATCH_SIZE);
    }
    return this.scratch;
  }

  /**
   * Direct mode: the socket read n bytes into buf (from nextReadBuffer). Returns false when
   * the receiver is held with the read not fully consumed: stop reading until `resume` is
   * called (the same contract as a Writable's chunk callback).
   */
  readInto(buf: Buffer, n: number, resume: () => void): boolean {
    if (this.state === State.Stopped) return true;
    if (buf === this.directTarget && this.state === State.Payload) {
      this.directTarget = null;
      this.chunk = EMPTY;
      this.pos = 0;
      this.payloadDone += n;
      if (this.payloadDone === this.payloadLength) this.finishPayload();
    } else {
      this.directTarget = null;
      this.chunk = n === buf.length ? buf : buf.subarray(0, n);
      this.pos = 0;
    }
    let inCall = true;
    let released = false;
    this.chunkCallback = () => {
      if (inCall) released = true;
      else resume();
    };
    if (this.holds === 0) this.parse();
    inCall = false;
    return released || (this.state as State) === State.Stopped;
  }

  private parse(): void {
    this.parsing = true;
    try {
      while (this.holds === 0 && this.pos < this.chunk.length && this.state !== State.Stopped) {
        switch (this.state) {
          case State.ClientFlags: this.parseClientFlags(); break;
          case State.OptionHeader: this.parseOptionHeader(); break;
          case State.OptionData: this.parsePayload(); break;
          case State.RequestHeader: this.parseRequestHeader(); break;
          case State.Payload: this.parsePayload(); break;
        }
      }
    } finally {
      this.parsing = false;
    }
    if (this.holds === 0 && this.pos >= this.chunk.length && this.chunkCallback) {
      const cb = this.chunkCallback;
      this.chunkCallback = null;
      this.chunk = EMPTY;
      this.pos = 0;
      cb();
    }
  }

  /**
   * The next `size` header bytes, or null when the chunk ran out (the part is kept). Returns
   * the chunk itself (zero copy) when the whole header lies in it; `start` says where.
   */
  private headerStart = 0;
  private takeHeader(size: number): Buffer | null {
    const avail = this.chunk.length - this.pos;
    if (this.headerFill === 0 && avail >= size) {
      this.headerStart = this.pos;
      this.pos += size;
      return this.chunk;
    }
    const n = Math.min(size - this.headerFill, avail);
    this.chunk.copy(this.header, this.headerFill, this.pos, this.pos + n);
    this.headerFill += n;
    this.pos += n;
    if (this.headerFill < size) return null;
    this.headerFill = 0;
    this.headerStart = 0;
    return this.header;
  }

  private parseClientFlags(): void {
    const b = this.takeHeader(4);
    if (!b) return;
    this.state = State.OptionHeader;
    this.handler.clientFlags(b.readUInt32BE(this.headerStart));
  }

  private parseOptionHeader(): void {
    const b = this.takeHeader(NBD_OPTION_HEADER_SIZE);
    if (!b) return;
    const s = this.headerStart;
    if (b.readBigUInt64BE(s) !== IHAVEOPT) {
      this.fail('bad option magic');
      return;
    }
    this.option = b.readUInt32BE(s + 8);
    const length = b.readUInt32BE(s + 12);
    const what = this.handler.optionHeader(this.option, length);
    if (this.state === State.Stopped) return;
    if (what === Payload.Disconnect) {
      this.stop();
      return;
    }
    this.beginPayload(length, what === Payload.Skip, State.OptionData);
    if (length === 0) this.finishPayload();
  }

  private parseRequestHeader(): void {
    const b = this.takeHeader(NBD_REQUEST_SIZE);
    if (!b) return;
    const s = this.headerStart;
    if (b.readUInt32BE(s) !== NBD_REQUEST_MAGIC) {
      this.fail('bad request magic');
      return;
    }
    const req: NbdRequest = {
      flags: b.readUInt16BE(s + 4),
      type: b.readUInt16BE(s + 6),
      handleHi: b.readUInt32BE(s + 8),
      handleLo: b.readUInt32BE(s + 12),
      offset: b.readUInt32BE(s + 16) * 0x100000000 + b.readUInt32BE(s + 20),
      length: b.readUInt32BE(s + 24),
      error: 0,
      errorMessage: '',
    };
    const what = this.handler.request(req);
    if (this.state === State.Stopped) return;
    if (what === Payload.None) return;
    if (what === Payload.Disconnect) {
      this.stop();
      return;
    }
    this.request = req;
    this.beginPayload(req.length, what === Payload.Skip, State.Payload);
    if (req.length === 0) this.finishPayload();
  }

  private beginPayload(length: number, skip: boolean, state: State): void {
    this.state = state;
    this.payloadLength = length;
    this.payloadDone = 0;
    this.skipping = skip;
    this.payloadBuf = null;
    this.payloadPooled = null;
    if (!skip && length > 0) {
      // Zero copy when the whole payload is already in this chunk (not a reused scratch buffer).
      const reused = this.scratch !== null && this.chunk.buffer === this.scratch.buffer;
      if (!reused && this.chunk.length - this.pos >= length) {
        this.payloadBuf = this.chunk.subarray(this.pos, this.pos + length);
        this.pos += length;
        this.payloadDone = length;
        this.finishPayload();
        return;
      }
      // One copy per received chunk into a buffer sized from the header.
      if (state === State.Payload) {
        this.payloadPooled = bufferPool.acquire(length);
        this.payloadBuf = this.payloadPooled.subarray(0, length);
      } else {
        this.payloadBuf = Buffer.allocUnsafe(length);
      }
    }
  }

  private parsePayload(): void {
    const n = Math.min(this.payloadLength - this.payloadDone, this.chunk.length - this.pos);
    if (!this.skipping && this.payloadBuf) this.chunk.copy(this.payloadBuf, this.payloadDone, this.pos, this.pos + n);
    this.pos += n;
    this.payloadDone += n;
    if (this.payloadDone === this.payloadLength) this.finishPayload();
  }

  private finishPayload(): void {
    const data = this.skipping ? null : (this.payloadBuf ?? EMPTY);
    const pooled = this.skipping ? null : this.payloadPooled;
    this.payloadBuf = null;
    this.payloadPooled = null;
    if (this.state === State.OptionData) {
      this.state = State.OptionHeader;
      this.handler.option(this.option, this.payloadLength, data);
    } else if (this.state === State.Payload) {
      this.state = State.RequestHeader;
      const req = this.request!;
      this.request = null;
      this.handler.payload(req, data, pooled);
    }
  }

  private fail(message: string): void {
    this.stop();
    this.handler.protocolError(message);
  }
}
