// file protocol (QEMU's file-posix): regular files and block devices.
// BASIC VERSION: buffered I/O only. O_DIRECT, the native addon (SEEK_DATA/SEEK_HOLE,
// fallocate), block devices and alignment probing are being added.
import fs from 'node:fs';
import { promisify } from 'node:util';
import type { BlockDriver, BlockLimits, Extent, Preallocation } from '../block/driver.js';
import { BlockNode } from '../block/node.js';
import { fromSystemError } from '../block/errors.js';

function read(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
function write(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
const fdatasync = promisify(fs.fdatasync);
const ftruncate = promisify(fs.ftruncate);
const close = promisify(fs.close);
const fstat = promisify(fs.fstat);
const open = promisify(fs.open);

export interface FileOpenOptions {
  readOnly: boolean;
  direct: boolean;
  noFlush: boolean;
}

export class FileDriver implements BlockDriver {
  readonly driverName = 'file';
  readonly children = {};
  readonly caps = { fua: 'emulate', writeZeroes: 'none', discard: 'none' } as const;
  private length: number;

  constructor(readonly fd: number, readonly filename: string, size: number) {
    this.length = size;
  }

  limits(): BlockLimits {
    return { requestAlignment: 1, maxTransfer: 1 << 30 };
  }

  getLength(): number {
    return this.length;
  }

  async pread(offset: number, buf: Buffer): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      let n: number;
      try {
        n = await read(this.fd, buf, done, buf.length - done, offset + done);
      } catch (err) {
        throw fromSystemError(err, `${this.filename}: read at ${offset + done}`);
      }
      if (n === 0) {
        buf.fill(0, done); // past EOF reads as zeros
        return;
      }
      done += n;
    }
  }

  async pwrite(offset: number, buf: Buffer): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      try {
        done += await write(this.fd, buf, done, buf.length - done, offset + done);
      } catch (err) {
        throw fromSystemError(err, `${this.filename}: write at ${offset + done}`);
      }
    }
    if (offset + buf.length > this.length) this.length = offset + buf.length;
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, data: true, zero: false, allocated: true, hostOffset: offset, hostFile: this.filename }];
  }

  async flushToDisk(): Promise<void> {
    try {
      await fdatasync(this.fd);
    } catch (err) {
      throw fromSystemError(err, `${this.filename}: fdatasync`);
    }
  }

  async truncate(length: number, _prealloc: Preallocation): Promise<void> {
    try {
      await ftruncate(this.fd, length);
    } catch (err) {
      throw fromSystemError(err, `${this.filename}: truncate`);
    }
    this.length = length;
  }

  async close(): Promise<void> {
    await close(this.fd);
  }
}

export async function openFile(filename: string, opts: FileOpenOptions): Promise<BlockNode> {
  let fd: number;
  try {
    fd = await open(filename, opts.readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR);
  } catch (err) {
    throw fromSystemError(err, `Could not open '${filename}'`);
  }
  const st = await fstat(fd);
  return new BlockNode(new FileDriver(fd, filename, st.size), { filename, readOnly: opts.readOnly, noFlush: opts.noFlush });
}

/** Create (or truncate to empty) a file, as qemu-img create does before the format lays out. */
export async function createFile(filename: string): Promise<void> {
  try {
    const fd = await open(filename, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o644);
    await close(fd);
  } catch (err) {
    throw fromSystemError(err, `Could not create '${filename}'`);
  }
}
