// Internal snapshots: create, apply (revert to) and delete, after QEMU's block/qcow2-snapshot.c
// (spec: "Snapshots"; refcounts as in "Host cluster management"). A snapshot is a copy of the
// active L1 table plus one more reference on every L2 table and data cluster it reaches: a
// data cluster's refcount counts the L1 tables (active and snapshots) that reach it, and
// COPIED is set exactly where that count is 1, so later writes copy what is shared.
//
// Order, so that a crash leaves at worst leaked clusters, never a table pointing at a freed one:
//   create: L1 copy written, refcounts raised (L2 tables and refcounts flushed), then the
//           snapshot table that points to the copy, then the header that points to the table.
//   apply:  refcounts of the snapshot's clusters raised and flushed, then the active L1
//           overwritten (synced), then the old active clusters' refcounts lowered.
//   delete: the snapshot table without the entry (header switched), then its refcounts lowered.
// The caller keeps guest I/O away while one of these runs (QEMU drains the node): the driver
// waits for allocations in flight and holds the metadata lock, but a write already on its
// way to a cluster of our own (the lock-free in-place path) is not covered by the snapshot.
import { VdiskError, invalidArgument } from '../../block/errors.js';
import * as C from './constants.js';
import { Qcow2Allocator } from './allocate.js';
import { KIND_COMPRESSED, KIND_NORMAL, KIND_ZERO_ALLOC, entryHi, entryLo, makeEntry, setEntry } from './l2entry.js';
import { type Qcow2Snapshot, encodeSnapshotTable, snapshotInfo, snapshotTableSize } from './snapshot.js';

/** What listSnapshots() returns per snapshot: qemu-img info --output=json's object. */
export type SnapshotInfo = Record<string, unknown> & { id: string; name: string };

/** Largest id or name QEMU keeps (QEMUSnapshotInfo's 128- and 256-byte strings, NUL included). */
const MAX_ID_BYTES = 127;
const MAX_NAME_BYTES = 255;

export abstract class Qcow2Snapshots extends Qcow2Allocator {
  abstract readonly snapshots: Qcow2Snapshot[];
  protected abstract checkWritable(): void;
  protected abstract growL1(entries: number): Promise<void>;
  protected abstract writeSize(length: number): Promise<void>;

  // ---- public API (stable names: the daemon's blockdev-snapshot-internal-sync calls these) ----

  /** The snapshot table, in order, as qemu-img info --output=json shows it. */
  listSnapshots(): SnapshotInfo[] {
    return this.snapshots.map((s) => snapshotInfo(s) as SnapshotInfo);
  }

  /**
   * Take an internal snapshot of the active layer (QEMU's qcow2_snapshot_create). `id`
   * defaults to one more than the largest numeric id; it must be unique (EEXIST), the name
   * need not be (qemu-img allows duplicates). `dateMs` defaults to now.
   */
  async createSnapshot(name: string, id?: string, dateMs = Date.now()): Promise<SnapshotInfo> {
    this.checkWritable();
    if (Buffer.byteLength(name) > MAX_NAME_BYTES) throw invalidArgument(`${this.filename}: snapshot name is longer than ${MAX_NAME_BYTES} bytes`);
    if (id !== undefined && (id === '' || Buffer.byteLength(id) > MAX_ID_BYTES)) {
      throw invalidArgument(`${this.filename}: snapshot id must be 1 to ${MAX_ID_BYTES} bytes`);
    }
    return this.lockedExclusive(0, this.h.size, async () => {
      if (this.snapshots.length >= C.QCOW_MAX_SNAPSHOTS) {
        throw new VdiskError('EFBIG', 'invalid-argument', `${this.filename}: the image already has ${C.QCOW_MAX_SNAPSHOTS} snapshots`);
      }
      this.noteTableBytes();
      const newId = id ?? this.nextSnapshotId();
      if (this.snapshots.some((s) => s.id === newId)) {
        throw new VdiskError('EEXIST', 'invalid-argument', `${this.filename}: a snapshot with id '${newId}' already exists`);
      }
      await this.markDirty();
      const l1Bytes = this.h.l1Size * 8;
      const l1Clusters = Math.ceil(l1Bytes / this.clusterSize);
      const l1Offset = l1Clusters ? await this.refcounts.alloc(l1Clusters) : 0;
      if (l1Clusters) {
        // The copy keeps the entries as they are now (COPIED included), as QEMU's does.
        await this.file.pwrite(l1Offset, Buffer.from(this.l1.subarray(0, l1Bytes)));
        for (let k = 0; k < l1Clusters; k++) this.metadataClusters.add(l1Offset / this.clusterSize + k);
      }
      await this.updateSnapshotRefcount(this.l1, this.h.l1Size, 1, true);
      await this.writeMetadata();
      const sn: Qcow2Snapshot = {
        l1TableOffset: l1Offset, l1Size: this.h.l1Size, id: newId, name,
        dateSec: Math.floor(dateMs / 1000), dateNsec: (dateMs % 1000) * 1e6,
        // qemu-img writes zeros here (no VM: no state, clock or icount).
        vmClockNsec: 0, vmStateSize: 0, diskSize: this.h.size, icount: 0,
        extraData: Buffer.alloc(0), tableEntrySize: 0,
      };
      this.snapshots.push(sn);
      try {
        await this.writeSnapshotTable();
      } catch (err) {
        this.snapshots.pop(); // its L1 copy and references are leaked, not lost
        throw err;
      }
      return snapshotInfo(sn) as SnapshotInfo;
    });
  }

  /**
   * Revert the active layer to a snapshot, found by id first, then by name (QEMU's
   * qcow2_snapshot_goto). The guest size becomes the snapshot's. Null when there is none.
   */
  async applySnapshot(idOrName: string): Promise<SnapshotInfo | null> {
    this.checkWritable();
    return this.lockedExclusive(0, this.h.size, async () => {
      const sn = this.snapshots.find((s) => s.id === idOrName) ?? this.snapshots.find((s) => s.name === idOrName);
      if (!sn) return null;
      await this.markDirty();
      if (sn.l1Size > this.h.l1Size) await this.growL1(sn.l1Size);
      const curBytes = this.h.l1Size * 8;
      const next = Buffer.alloc(curBytes);
      if (sn.l1Size) await this.file.pread(sn.l1TableOffset, next.subarray(0, sn.l1Size * 8));
      // The snapshot's clusters gain the active layer's reference before the L1 switches.
      await this.updateSnapshotRefcount(next, sn.l1Size, 1, false);
      await this.writeMetadata();
      await this.file.pwrite(this.h.l1TableOffset, next);
      await this.file.flush();
      const old = Buffer.from(this.l1.subarray(0, curBytes));
      next.copy(this.l1);
      await this.updateSnapshotRefcount(old, this.h.l1Size, -1, false);
      await this.writeMetadata();
      // COPIED where the count is now 1 (the old active layer's clusters may have been the other holder).
      await this.updateSnapshotRefcount(this.l1, this.h.l1Size, 0, true);
      if (sn.diskSize !== null && sn.diskSize !== this.h.size) await this.writeSize(sn.diskSize);
      await this.writeMetadata();
      return snapshotInfo(sn) as SnapshotInfo;
    });
  }

  /**
   * Delete the first snapshot matching `id` and/or `name` (both must match when both are
   * given; QEMU's qcow2_snapshot_delete). Null when there is none.
   */
  async deleteSnapshot(ref: { id?: string; name?: string }): Promise<SnapshotInfo | null> {
    this.checkWritable();
    if (ref.id === undefined && ref.name === undefined) throw invalidArgument('deleteSnapshot: give an id or a name');
    return this.lockedExclusive(0, this.h.size, async () => {
      const i = this.snapshots.findIndex((s) => (ref.id === undefined || s.id === ref.id) && (ref.name === undefined || s.name === ref.name));
      if (i < 0) return null;
      await this.markDirty();
      this.noteTableBytes();
      const [sn] = this.snapshots.splice(i, 1);
      try {
        await this.writeSnapshotTable();
      } catch (err) {
        this.snapshots.splice(i, 0, sn);
        throw err;
      }
      // From here a failure leaks clusters (QEMU: "we won't recover but just leak clusters").
      const l1 = Buffer.alloc(sn.l1Size * 8);
      if (sn.l1Size) await this.file.pread(sn.l1TableOffset, l1);
      await this.updateSnapshotRefcount(l1, sn.l1Size, -1, false);
      const l1Clusters = Math.ceil(sn.l1Size * 8 / this.clusterSize);
      if (l1Clusters) {
        for (let k = 0; k < l1Clusters; k++) this.metadataClusters.delete(sn.l1TableOffset / this.clusterSize + k);
        await this.refcounts.cache.setDependency(this.l2Cache);
        await this.refcounts.update(sn.l1TableOffset / this.clusterSize, l1Clusters, -1);
      }
      // The lowered refcounts reach the disk before any COPIED flag that relies on them.
      await this.writeMetadata();
      await this.updateSnapshotRefcount(this.l1, this.h.l1Size, 0, true);
      await this.writeMetadata();
      return snapshotInfo(sn) as SnapshotInfo;
    });
  }

  // ---- internals --------------------------------------------------------------------------

  /** QEMU's find_new_snapshot_id: one more than the largest numeric id. */
  private nextSnapshotId(): string {
    let max = 0;
    for (const s of this.snapshots) {
      const n = Number.parseInt(s.id, 10);
      if (Number.isFinite(n) && n > max) max = n;
    }
    return String(max + 1);
  }

  /**
   * QEMU's qcow2_update_snapshot_refcount: add `addend` (+1, -1 or 0) to the refcount of every
   * L2 table and data cluster reached from `l1` (`entries` entries), then set COPIED in
   * those L2 entries and in `l1` exactly where the refcount is 1. `active`: `l1` is the
   * active table, whose changed entries are written back to its place on disk.
   */
  private async updateSnapshotRefcount(l1: Buffer, entries: number, addend: number, active: boolean): Promise<void> {
    const cs = this.clusterSize;
    if (addend < 0) await this.refcounts.cache.setDependency(this.l2Cache);
    else if (addend > 0 && !this.lazy) await this.l2Cache.setDependency(this.refcounts.cache);
    let l1Changed = false;
    for (let i = 0; i < entries; i++) {
      const hi = entryHi(l1, i);
      const l2Off = this.dec.l1Offset(hi, entryLo(l1, i), i);
      if (l2Off === 0) continue;
      const l2 = await this.l2Cache.get(l2Off);
      let dirty = false;
      try {
        for (let j = 0; j < this.l2Entries; j++) {
          const ehi = entryHi(l2, j);
          const elo = entryLo(l2, j);
          if (ehi === 0 && elo === 0) continue;
          const e = this.dec.decode(ehi, elo, (i * this.l2Entries + j) * cs);
          if (e.kind === KIND_COMPRESSED) {
            if (addend !== 0) {
              const first = Math.floor(e.host / cs);
              const last = Math.floor((e.host + e.csize - 1) / cs);
              await this.refcounts.update(first, last - first + 1, addend);
            }
            continue;
          }
          if (e.kind !== KIND_NORMAL && e.kind !== KIND_ZERO_ALLOC) continue;
          const c = e.host / cs;
          if (addend !== 0) await this.refcounts.update(c, 1, addend);
          const copied = (await this.refcounts.get(c)) === 1;
          if (copied !== e.copied) {
            const [nhi, nlo] = makeEntry(e.host, copied, e.kind === KIND_ZERO_ALLOC);
            setEntry(l2, j, nhi, nlo);
            dirty = true;
          }
        }
        if (dirty) this.l2Cache.markDirty(l2Off);
      } finally {
        this.l2Cache.release(l2Off);
      }
      if (addend !== 0) {
        const freed = await this.refcounts.update(l2Off / cs, 1, addend);
        if (freed.length) {
          this.l2Cache.discard(l2Off);
          this.metadataClusters.delete(l2Off / cs);
        }
      }
      // An applied snapshot's L2 tables are active ones now: guard them against data writes.
      if (active) this.metadataClusters.add(l2Off / cs);
      const copied = (await this.refcounts.get(l2Off / cs)) === 1;
      if (copied !== ((hi & C.QCOW_OFLAG_COPIED_HI) !== 0)) {
        const [nhi, nlo] = makeEntry(l2Off, copied);
        setEntry(l1, i, nhi, nlo);
        l1Changed = true;
      }
    }
    if (active && l1Changed) {
      await this.writeMetadata(); // the refcounts the new flags describe come first
      await this.file.pwrite(this.h.l1TableOffset, Buffer.from(l1.subarray(0, this.h.l1Size * 8)));
      await this.file.flush();
    }
  }

  /**
   * Write the snapshot table to new clusters, make it and its refcounts stable, switch the
   * header to it (nb_snapshots and snapshots_offset in one write), then free the old one
   * (QEMU's qcow2_write_snapshots).
   */
  private async writeSnapshotTable(): Promise<void> {
    const cs = this.clusterSize;
    const table = encodeSnapshotTable(this.snapshots, this.h.size);
    if (table.length > C.QCOW_MAX_SNAPSHOTS_SIZE) {
      throw new VdiskError('EFBIG', 'invalid-argument', `${this.filename}: snapshot table would exceed ${C.QCOW_MAX_SNAPSHOTS_SIZE} bytes`);
    }
    const clusters = Math.ceil(table.length / cs);
    const offset = clusters ? await this.refcounts.alloc(clusters) : 0;
    if (clusters) await this.file.pwrite(offset, table);
    await this.writeMetadata();
    const hdr = Buffer.alloc(12);
    hdr.writeUInt32BE(this.snapshots.length, 0);
    hdr.writeBigUInt64BE(BigInt(offset), 4);
    await this.file.pwrite(C.HDR_NB_SNAPSHOTS, hdr);
    await this.file.flush();
    const oldOffset = this.h.snapshotsOffset;
    const oldClusters = this.h.nbSnapshots ? Math.ceil((this.tableBytes ?? 0) / cs) : 0;
    this.h.nbSnapshots = this.snapshots.length;
    this.h.snapshotsOffset = offset;
    this.tableBytes = table.length;
    for (let k = 0; k < clusters; k++) this.metadataClusters.add(offset / cs + k);
    if (oldOffset && oldClusters) {
      for (let k = 0; k < oldClusters; k++) this.metadataClusters.delete(oldOffset / cs + k);
      await this.refcounts.update(oldOffset / cs, oldClusters, -1);
    }
  }

  /** Byte size of the snapshot table the header points to (known once an operation began). */
  private tableBytes: number | null = null;

  /** Note the on-disk table's size before an operation changes the list. */
  private noteTableBytes(): void {
    this.tableBytes ??= snapshotTableSize(this.snapshots);
  }
}
