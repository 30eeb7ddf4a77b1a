// Option haggling for one connection (doc/proto.md "Option haggling"; like nbdkit's
// protocol-handshake-newstyle.c): the client flags, then one option at a time until
// NBD_OPT_EXPORT_NAME or a successful NBD_OPT_GO moves the connection to transmission.
//
// This holds what the options negotiate (fixed newstyle, NO_ZEROES, TLS, structured replies,
// the selected meta contexts) and decides every reply; the connection owns the socket, the
// receiver and the phase, reached through NegotiationHost.
import type { NbdExport } from './export.js';
import {
  exportNameReply, infoBlockSize, infoExport, infoString, matchMetaContexts, metaContextReply,
  OptionParseError, optionError, optionReply, parseInfoRequest, parseMetaContextRequest, serverReply,
} from './handshake.js';
import {
  NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_INFO_DESCRIPTION, NBD_INFO_NAME, NBD_MAX_OPTION_SIZE,
  NBD_MAX_STRING_SIZE, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK,
  NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY, NBD_REP_ERR_SHUTDOWN, NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_META_CONTEXT, NBD_REP_SERVER, optName,
} from './protocol.js';
import { Payload } from './receiver.js';
import type { MetaContext, Negotiated } from './transmission.js';
import type { TlsCredentials } from './tls.js';

/** Option data kept in memory at most; INFO/GO with every possible info request fits. */
const MAX_OPTION_IN_MEMORY = 256 * 1024;

/** What negotiation needs from its connection. */
export interface NegotiationHost {
  readonly exports: ReadonlyMap<string, NbdExport>;
  readonly tls: TlsCredentials | null;
  readonly shuttingDown: boolean;
  /** Bytes the receiver has already taken in but not parsed (smuggled after STARTTLS). */
  readonly unparsedBytes: number;
  send(buf: Buffer): void;
  destroy(reason?: string): void;
  /** NBD_OPT_ABORT: read nothing more, FIN once the replies so far are out. */
  close(): void;
  /** Send the STARTTLS ACK and upgrade the socket; false when the connection ended instead. */
  startTls(ack: Buffer): Promise<boolean>;
  /** Enter the transmission phase on `exp`; returns the transmission flags. */
  startTransmission(exp: NbdExport, negotiated: Negotiated): number;
}

export class Negotiation {
  private fixedNewstyle = false;
  private noZeroes = false;
  private tlsActive = false;
  private structured = false;
  /** SET_META_CONTEXT result: valid only for the export it named. */
  private metaExport: string | null = null;
  private metaContexts: MetaContext[] = [];

  constructor(private readonly host: NegotiationHost) {}

  /** Options other than STARTTLS and ABORT are refused until TLS is up (FORCEDTLS). */
  private get tlsRequired(): boolean {
    return this.host.tls !== null && !this.tlsActive;
  }

  clientFlags(flags: number): void {
    if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
      this.host.destroy(`unknown client flags 0x${flags.toString(16)}`);
      return;
    }
    this.fixedNewstyle = (flags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
  }

  /** Decided from the option header alone: read the data, skip it, or hang up. */
  optionHeader(option: number, length: number): Payload {
    if (length > NBD_MAX_OPTION_SIZE) {
      this.host.destroy(`${optName(option)} of ${length} bytes`);
      return Payload.Disconnect;
    }
    if (option === NBD_OPT_EXPORT_NAME) {
      // No error reply exists for EXPORT_NAME: an impossible name ends the session.
      if (length > NBD_MAX_STRING_SIZE || this.tlsRequired) {
        this.host.destroy(this.tlsRequired ? 'NBD_OPT_EXPORT_NAME before TLS' : 'export name too long');
        return Payload.Disconnect;
      }
      return Payload.Read;
    }
    if (!this.fixedNewstyle) {
      this.host.destroy(`${optName(option)} without fixed newstyle`);
      return Payload.Disconnect;
    }
    if (this.tlsRequired && option !== NBD_OPT_STARTTLS && option !== NBD_OPT_ABORT) return Payload.Skip;
    return length > MAX_OPTION_IN_MEMORY ? Payload.Skip : Payload.Read;
  }

  private reply(option: number, type: number, payload?: Buffer): void {
    this.host.send(optionReply(option, type, payload));
  }

  private replyError(option: number, type: number, message: string): void {
    this.host.send(optionError(option, type, message));
  }

  /**
   * Answer one option; `data` is null when it was skipped. Resolves false when the receiver
   * must stay held (transmission entered, the connection closing or gone).
   */
  async option(option: number, length: number, data: Buffer | null): Promise<boolean> {
    if (this.tlsRequired && option !== NBD_OPT_STARTTLS && option !== NBD_OPT_ABORT) {
      this.replyError(option, NBD_REP_ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
      return true;
    }
    if (this.host.shuttingDown && option !== NBD_OPT_ABORT) {
      if (option === NBD_OPT_EXPORT_NAME) {
        this.host.destroy('server shutting down');
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
        case NBD_OPT_EXPORT_NAME: return this.exportName(data);
        case NBD_OPT_ABORT:
          this.reply(option, NBD_REP_ACK);
          this.host.close();
          return false;
        case NBD_OPT_LIST:
          if (length !== 0) {
            this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST carries no data');
            return true;
          }
          for (const e of this.host.exports.values()) this.reply(option, NBD_REP_SERVER, serverReply(e.name, e.description));
          this.reply(option, NBD_REP_ACK);
          return true;
        case NBD_OPT_STARTTLS: return await this.startTls(length);
        case NBD_OPT_INFO:
        case NBD_OPT_GO: return this.infoGo(option, data);
        case NBD_OPT_STRUCTURED_REPLY:
          if (length !== 0) {
            this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY carries no data');
            return true;
          }
          this.structured = true;
          this.reply(option, NBD_REP_ACK);
          return true;
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT: return this.metaContext(option, data);
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

  private exportName(data: Buffer): boolean {
    const name = data.toString('utf8');
    const exp = this.host.exports.get(name);
    if (!exp) {
      this.host.destroy(`NBD_OPT_EXPORT_NAME: no export '${name}'`);
      return false;
    }
    const flags = this.enter(exp);
    this.host.send(exportNameReply(exp.size, flags, this.noZeroes));
    return true;
  }

  private infoGo(option: number, data: Buffer): boolean {
    const req = parseInfoRequest(data);
    const exp = this.host.exports.get(req.name);
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
    if (option === NBD_OPT_GO) this.enter(exp);
    return true;
  }

  private enter(exp: NbdExport): number {
    const contexts = this.metaExport === exp.name ? this.metaContexts : [];
    return this.host.startTransmission(exp, { structured: this.structured, contexts });
  }

  private metaContext(option: number, data: Buffer): boolean {
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
    if (!this.host.exports.has(req.exportName)) {
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

  private async startTls(length: number): Promise<boolean> {
    const option = NBD_OPT_STARTTLS;
    if (!this.host.tls) {
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
    if (this.host.unparsedBytes > 0) {
      this.host.destroy('data after NBD_OPT_STARTTLS before the ACK');
      return false;
    }
    if (!(await this.host.startTls(optionReply(option, NBD_REP_ACK)))) return false;
    // Negotiated state does not survive STARTTLS (spec).
    this.tlsActive = true;
    this.structured = false;
    this.metaContexts = [];
    this.metaExport = null;
    return true;
  }
}
