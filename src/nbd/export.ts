// An NBD export: a name, an optional description and one BlockBackend shared by every
// connection to it. Its transmission flags are where the cache mode shows on the wire
// (ARCHITECTURE.md, "What the cache mode means on the wire").
import type { BlockBackend } from '../block/backend.js';
import {
  NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_MAX_BUFFER_SIZE,
} from './protocol.js';

export interface NbdExportOptions {
  name: string;
  description?: string;
  backend: BlockBackend;
  /** Serve read-only even if the backend is writable (qemu-nbd -r). */
  readOnly?: boolean;
}

export interface BlockSizeConstraints {
  minimum: number;
  preferred: number;
  maximum: number;
}

export class NbdExport {
  readonly name: string;
  readonly description: string;
  readonly backend: BlockBackend;
  readonly readOnly: boolean;
  /**
   * Bumped when a request may have turned data into zeros or holes (WRITE_ZEROES, TRIM, on any
   * connection). Connections remember ranges block status called data and trust them for
   * sparse reads only while this is unchanged. (Even a stale "data" would only send zeros as
   * data: the same bytes to the client.)
   */
  holeGeneration = 0;

  constructor(o: NbdExportOptions) {
    this.name = o.name;
    this.description = o.description ?? '';
    this.backend = o.backend;
    this.readOnly = (o.readOnly ?? false) || o.backend.readOnly;
  }

  get size(): number {
    return this.backend.getLength();
  }

  /** Fast zero is promised only when the driver zeroes natively; otherwise it would be a slow write. */
  get canFastZero(): boolean {
    return this.backend.root.driver.caps.writeZeroes === 'native';
  }

  /**
   * Transmission flags. SEND_FLUSH and SEND_FUA exactly when the client sees a write cache
   * (writeback, none, unsafe); in writethrough and directsync every write is stable before its
   * reply, so there is nothing to flush. CAN_MULTI_CONN always: every connection to an export
   * shares one BlockBackend, so a flush (or FUA, which flushes the node) on any connection
   * covers the completed writes of all of them.
   */
  transmissionFlags(structuredReplies: boolean): number {
    let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
    if (this.backend.hasWriteCache) flags |= NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
    if (this.readOnly) {
      flags |= NBD_FLAG_READ_ONLY;
    } else {
      flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
      if (this.canFastZero) flags |= NBD_FLAG_SEND_FAST_ZERO;
    }
    if (structuredReplies) flags |= NBD_FLAG_SEND_DF;
    return flags;
  }

  /** Minimum 1 (the generic path pads), preferred = the format's optimal transfer, at least 4 KiB. */
  blockSize(): BlockSizeConstraints {
    const optimal = this.backend.root.driver.limits().optimalTransfer ?? 4096;
    let preferred = 4096;
    while (preferred < optimal && preferred < NBD_MAX_BUFFER_SIZE) preferred *= 2;
    return { minimum: 1, preferred, maximum: NBD_MAX_BUFFER_SIZE };
  }
}
