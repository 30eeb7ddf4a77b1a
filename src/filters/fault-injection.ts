// fault-injection filter (tests only): sits between a format node and its protocol node,
// records every request that can change the medium, in order, and passes it to the child,
// like an nbdkit filter calling `next`. The crash lab replays the recording to build the
// states a power loss could leave behind. Optionally fails the Nth request with EIO/ENOSPC.
//
// What is recorded, and why that is enough to model a crash:
// - write / write-zeroes / discard / truncate: each with its range (and a copy of the data).
//   Discard is recorded like write-zeroes because the memory and file protocols read a
//   discarded range back as zeros once it is persisted; until then it reads the old data.
// - flushToDisk: a barrier. It makes stable the requests that had *completed* when it began
//   (`covers`), and it is appended to the log when it completes: a crash before that point
//   promises nothing about the flush.
// FUA is reported as 'emulate', so the generic path turns a FUA write into write + flush and
// the barrier shows up in the log, exactly as it does for the file protocol.
//
// Everything it does not record (reads, block status, caps, limits, length) is FilterDriver's
// forwarding to the filtered child.
import type { DriverCaps, Preallocation } from '../block/driver.js';
import { VdiskError, type ErrorCode } from '../block/errors.js';
import { BlockNode } from '../block/node.js';
import { FilterDriver } from './filter.js';

export type LogEntry =
  | { kind: 'write'; offset: number; data: Buffer }
  | { kind: 'zero'; offset: number; length: number }
  | { kind: 'discard'; offset: number; length: number }
  | { kind: 'truncate'; length: number }
  /** Stable from here on: every entry with index < covers. */
  | { kind: 'flush'; covers: number };

export type FaultOp = 'write' | 'zero' | 'discard' | 'flush';

export interface FaultRule {
  /** Which request kind to fail. */
  op: FaultOp;
  /** Fail the Nth request of that kind (1-based) ... */
  nth: number;
  /** ... and, when set, every later one too (a disk that stays full or dead). */
  sticky?: boolean;
  code: Extract<ErrorCode, 'EIO' | 'ENOSPC'>;
}

export interface FaultInjectionOptions {
  /** Request failures to inject; none by default. */
  faults?: FaultRule[];
  /** Keep recording (default true). Off, the filter is a plain pass-through. */
  record?: boolean;
}

export class FaultInjectionDriver extends FilterDriver {
  readonly driverName = 'fault-injection';
  readonly log: LogEntry[] = [];
  recording: boolean;
  private readonly faults: FaultRule[];
  private readonly counts: Record<FaultOp, number> = { write: 0, zero: 0, discard: 0, flush: 0 };
  /** Log indices of requests issued but not yet completed (a flush does not cover them). */
  private readonly inFlight = new Set<number>();

  /** The child's caps with FUA emulated; rebuilt only when the child's answer changes. */
  private derivedCaps: { from: DriverCaps; caps: DriverCaps } | null = null;

  constructor(file: BlockNode, opts: FaultInjectionOptions = {}) {
    super(file);
    this.faults = opts.faults ?? [];
    this.recording = opts.record ?? true;
  }

  override get caps(): DriverCaps {
    const fc = this.child.node.caps;
    if (this.derivedCaps?.from !== fc) {
      this.derivedCaps = { from: fc, caps: { fua: 'emulate', writeZeroes: fc.writeZeroes, discard: fc.discard } };
    }
    return this.derivedCaps.caps;
  }

  override pwrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    return this.tracked('write', { kind: 'write', offset, data: Buffer.from(buf) }, () => super.pwrite(offset, buf, flags));
  }

  override pwriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    return this.tracked('zero', { kind: 'zero', offset, length }, () => super.pwriteZeroes(offset, length, flags));
  }

  override pdiscard(offset: number, length: number): Promise<void> {
    return this.tracked('discard', { kind: 'discard', offset, length }, () => super.pdiscard(offset, length));
  }

  override async truncate(length: number, prealloc: Preallocation): Promise<void> {
    await super.truncate(length, prealloc);
    if (this.recording) this.log.push({ kind: 'truncate', length });
  }

  async flushToDisk(): Promise<void> {
    this.inject('flush');
    let covers = this.log.length;
    for (const i of this.inFlight) covers = Math.min(covers, i);
    await this.child.flush();
    if (this.recording) this.log.push({ kind: 'flush', covers });
  }

  /** Forget what was recorded so far (e.g. after laying out the image). */
  clearLog(): void {
    this.log.length = 0;
  }

  private async tracked(op: FaultOp, entry: LogEntry, pass: () => Promise<void>): Promise<void> {
    this.inject(op);
    if (!this.recording) return pass();
    // Logged when issued: a request in flight at the crash may have reached the disk in part.
    const index = this.log.push(entry) - 1;
    this.inFlight.add(index);
    try {
      await pass();
    } finally {
      this.inFlight.delete(index);
    }
  }

  private inject(op: FaultOp): void {
    const n = ++this.counts[op];
    for (const f of this.faults) {
      if (f.op === op && (n === f.nth || (f.sticky && n > f.nth))) {
        const what = op === 'flush' ? 'flush' : `${op} #${n}`;
        throw new VdiskError(f.code, 'io', `fault-injection: injected ${f.code} on ${what}`);
      }
    }
  }
}

/** Put a fault-injection filter node on top of `file`; `noFlush` as the cache mode says. */
export function openFaultInjection(file: BlockNode, opts: FaultInjectionOptions & { noFlush?: boolean } = {}): {
  node: BlockNode;
  driver: FaultInjectionDriver;
} {
  const driver = new FaultInjectionDriver(file, opts);
  const node = new BlockNode(driver, { filename: `fault-injection:${file.filename}`, readOnly: file.readOnly, noFlush: opts.noFlush ?? false });
  return { node, driver };
}
