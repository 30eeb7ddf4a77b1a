// One client connection: its phase, its socket, and bounded memory. Option haggling lives in
// negotiation.ts, request handling in transmission.ts; this file feeds them the receiver's
// events and puts their replies on the wire.
//
// Memory is bounded per connection: the receiver is held (so the socket is paused) while too
// many requests or bytes are in flight, or while the socket's output buffer is over its mark
// because the client is slow to read replies. A WRITE is applied only once its whole payload
// has arrived, so a client that vanishes mid-request never leaves a partial write behind.
import type net from 'node:net';
import type tls from 'node:tls';
import { bufferPool } from './buffers.js';
import { readDirectly } from './direct-read.js';
import type { NbdExport } from './export.js';
import { greeting } from './handshake.js';
import { Negotiation, type NegotiationHost } from './negotiation.js';
import { NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_ESHUTDOWN, NBD_MAX_BUFFER_SIZE, optName } from './protocol.js';
import { Payload, Receiver, type NbdRequest, type ReceiverHandler } from './receiver.js';
import { upgradeToTls, type TlsCredentials } from './tls.js';
import { Transmission, type Negotiated } from './transmission.js';

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

/** A client that never closes its side after our FIN loses the descriptor after this. */
const CLOSE_GRACE_MS = 2000;

/**
 * Handshake: options are read and answered. Transmission: requests are. Closing: nothing more
 * is read; replies already made still go out, then FIN. Closed: the sockets are gone.
 */
const enum Phase {
  Handshake,
  Transmission,
  Closing,
  Closed,
}

const PHASE_NAMES = ['Handshake', 'Transmission', 'Closing', 'Closed'];

/** The legal moves; moveTo() is the only writer of `phase` and refuses anything else. */
const NEXT: Record<Phase, readonly Phase[]> = {
  [Phase.Handshake]: [Phase.Transmission, Phase.Closing, Phase.Closed],
  [Phase.Transmission]: [Phase.Closing, Phase.Closed],
  [Phase.Closing]: [Phase.Closed],
  [Phase.Closed]: [],
};

export class NbdConnection implements ReceiverHandler, NegotiationHost {
  /** Where replies go: the socket, or the TLS socket wrapping it after STARTTLS. */
  private out: net.Socket | tls.TLSSocket;
  private readonly receiver: Receiver;
  private phase = Phase.Handshake;
  private handshakeTimer: NodeJS.Timeout | null = null;
  private readonly negotiation: Negotiation;
  private tx: Transmission | null = null;

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
    this.negotiation = new Negotiation(this);
    socket.setNoDelay?.(true);
    socket.on('error', (err) => this.destroy(`socket error: ${err.message}`));
    socket.on('close', () => this.moveTo(Phase.Closed));
    this.receiver.on('error', (err) => this.destroy(`receiver: ${err.message}`));
    if (ctx.handshakeLimitMs > 0) {
      this.handshakeTimer = setTimeout(() => this.destroy('handshake time limit reached'), ctx.handshakeLimitMs);
      this.handshakeTimer.unref();
    }
    socket.write(greeting());
    if (ctx.tls || !readDirectly(socket, this.receiver)) socket.pipe(this.receiver);
  }

  get transmitting(): boolean {
    return this.phase === Phase.Transmission;
  }

  // ---- phase ---------------------------------------------------------------------------------

  /**
   * The one place the phase changes, with what leaving and entering a phase implies. Returns
   * false when there is nothing to do: the connection is already there, or already closed
   * (events can trail the close). Any other move not in NEXT is a bug and throws.
   */
  private moveTo(next: Phase): boolean {
    const from = this.phase;
    if (from === next || from === Phase.Closed) return false;
    if (!NEXT[from].includes(next)) throw new Error(`NBD connection: no move from ${PHASE_NAMES[from]} to ${PHASE_NAMES[next]}`);
    this.phase = next;
    if (from === Phase.Handshake && this.handshakeTimer) {
      clearTimeout(this.handshakeTimer);
      this.handshakeTimer = null;
    }
    switch (next) {
      case Phase.Transmission:
        this.receiver.startTransmission();
        break;
      case Phase.Closing:
        this.flushBatch();
        this.receiver.stop(); // keep reading (and dropping) so a close cannot turn into a reset
        this.out.end();
        setTimeout(() => this.destroy(), CLOSE_GRACE_MS).unref();
        break;
      case Phase.Closed:
        this.receiver.stop();
        this.out.destroy();
        this.socket.destroy();
        this.socket.unpipe(this.receiver);
        this.resolveClosed();
        break;
    }
    return true;
  }

  // ---- lifecycle ---------------------------------------------------------------------------

  /** Hard disconnect. */
  destroy(reason?: string): void {
    if (reason && this.phase !== Phase.Closed) this.ctx.log(`closing connection: ${reason}`);
    this.moveTo(Phase.Closed);
  }

  /** Stop reading requests, let those in flight finish and their replies go out, then close. */
  async shutdown(): Promise<void> {
    if (this.phase === Phase.Handshake) {
      this.destroy();
      return;
    }
    // Requests still arriving are answered ESHUTDOWN, which tells the client to send
    // NBD_CMD_DISC (spec); those in flight finish normally. Then FIN, and the descriptor
    // goes when the client closes (or after a grace period).
    this.draining = true;
    await this.idle();
    this.moveTo(Phase.Closing);
    await this.closed;
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
  send(buf: Buffer, pooled?: Buffer): void {
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

  // ---- handshake (negotiation.ts decides; these are its hooks) -------------------------------

  get exports(): ReadonlyMap<string, NbdExport> {
    return this.ctx.exports;
  }

  get tls(): TlsCredentials | null {
    return this.ctx.tls;
  }

  get shuttingDown(): boolean {
    return this.ctx.shuttingDown;
  }

  get unparsedBytes(): number {
    return this.receiver.unparsedBytes;
  }

  clientFlags(flags: number): void {
    this.negotiation.clientFlags(flags);
  }

  optionHeader(option: number, length: number): Payload {
    return this.negotiation.optionHeader(option, length);
  }

  option(option: number, length: number, data: Buffer | null): void {
    if (this.phase !== Phase.Handshake) return;
    this.receiver.hold();
    this.negotiation.option(option, length, data).then(
      (keepReading) => {
        if (keepReading) this.receiver.release();
      },
      (err: unknown) => this.destroy(`${optName(option)}: ${(err as Error).message}`),
    );
  }

  close(): void {
    this.receiver.stop();
    this.moveTo(Phase.Closing);
  }

  async startTls(ack: Buffer): Promise<boolean> {
    const raw = this.socket;
    raw.unpipe(this.receiver);
    raw.pause();
    this.flushBatch();
    await new Promise<void>((resolve, reject) => raw.write(ack, (err) => (err ? reject(err) : resolve())));
    let secure: tls.TLSSocket;
    try {
      secure = await upgradeToTls(raw, this.ctx.tls!, this.ctx.handshakeLimitMs);
    } catch (err) {
      this.destroy(`TLS: ${(err as Error).message}`);
      return false;
    }
    if (this.phase !== Phase.Handshake) {
      secure.destroy();
      return false;
    }
    this.out = secure;
    secure.on('error', (err) => this.destroy(`TLS error: ${err.message}`));
    secure.on('close', () => this.moveTo(Phase.Closed));
    secure.pipe(this.receiver);
    return true;
  }

  startTransmission(exp: NbdExport, negotiated: Negotiated): number {
    this.tx = new Transmission(exp, negotiated, this);
    this.moveTo(Phase.Transmission);
    return this.tx.flags;
  }

  // ---- transmission (transmission.ts validates and executes) ---------------------------------

  request(req: NbdRequest): Payload {
    const tx = this.tx!;
    if (this.draining && req.type !== NBD_CMD_DISC) {
      if (req.type === NBD_CMD_WRITE && req.length > NBD_MAX_BUFFER_SIZE) {
        this.destroy();
        return Payload.Disconnect;
      }
      req.error = NBD_ESHUTDOWN;
      req.errorMessage = 'server is shutting down';
      if (req.type === NBD_CMD_WRITE) return Payload.Skip;
      tx.sendError(req, req.error, req.errorMessage);
      return Payload.None;
    }
    if (req.type === NBD_CMD_WRITE) {
      if (req.length > NBD_MAX_BUFFER_SIZE) {
        // Reading it would mean buffering it; the spec allows a hard disconnect here.
        this.destroy(`NBD_CMD_WRITE payload of ${req.length} bytes`);
        return Payload.Disconnect;
      }
      return tx.validate(req) ? Payload.Read : Payload.Skip;
    }
    if (req.type === NBD_CMD_DISC) {
      // Read nothing more; FIN once every request in flight has been answered.
      this.receiver.stop();
      this.idle().then(() => this.moveTo(Phase.Closing));
      return Payload.None;
    }
    if (!tx.validate(req)) {
      tx.sendError(req, req.error, req.errorMessage);
      return Payload.None;
    }
    this.dispatch(req, null);
    return Payload.None;
  }

  payload(req: NbdRequest, data: Buffer | null, pooled: Buffer | null): void {
    if (data === null) this.tx!.sendError(req, req.error, req.errorMessage);
    else this.dispatch(req, data, pooled);
  }

  private dispatch(req: NbdRequest, data: Buffer | null, pooled: Buffer | null = null): void {
    const tx = this.tx!;
    const bytes = req.type === NBD_CMD_READ ? req.length : (data?.length ?? 0);
    this.inFlight++;
    this.inFlightBytes += bytes;
    if (!this.holdingForInFlight && (this.inFlight >= this.ctx.limits.maxInFlightRequests || this.inFlightBytes >= this.ctx.limits.maxInFlightBytes)) {
      this.holdingForInFlight = true;
      this.receiver.hold();
    }
    tx.execute(req, data, pooled).catch((err: unknown) => tx.fail(req, err))
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
}
