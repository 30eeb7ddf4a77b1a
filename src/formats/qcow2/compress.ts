// Compressed clusters (spec: "Compressed Clusters"): zlib is raw deflate with a 4 KiB window
// (windowBits -12); zstd is a zstd frame. Decompression must produce exactly one cluster;
// output is bounded by the cluster size so a hostile image cannot make us allocate more.
import zlib from 'node:zlib';
import { promisify } from 'node:util';
import { corrupt, unsupported } from '../../block/errors.js';
import * as C from './constants.js';

const deflateRaw = promisify(zlib.deflateRaw);
const inflateRaw = promisify(zlib.inflateRaw);

interface ZstdCodec {
  compress(buf: Uint8Array, level?: number): Uint8Array;
  decompress(buf: Uint8Array): Uint8Array;
}
let zstdCodec: Promise<ZstdCodec | null> | null = null;

/** @bokuweb/zstd-wasm, loaded on first use (optional dependency). */
function loadZstd(): Promise<ZstdCodec | null> {
  zstdCodec ??= (async () => {
    try {
      const name = '@bokuweb/zstd-wasm';
      const mod = (await import(name)) as { init(): Promise<void>; compress: ZstdCodec['compress']; decompress: ZstdCodec['decompress'] };
      await mod.init();
      return { compress: mod.compress, decompress: mod.decompress };
    } catch {
      return null;
    }
  })();
  return zstdCodec;
}

async function needZstd(filename: string): Promise<ZstdCodec> {
  const z = await loadZstd();
  if (!z) throw unsupported(`${filename}: compression_type zstd needs the @bokuweb/zstd-wasm package, which is not installed`);
  return z;
}

/**
 * Compress one cluster. Returns null when the result would not be smaller than a cluster
 * (QEMU then writes the cluster uncompressed).
 */
export async function compressCluster(data: Buffer, type: number, filename: string): Promise<Buffer | null> {
  let out: Buffer;
  if (type === C.QCOW2_COMPRESSION_TYPE_ZSTD) {
    const z = await needZstd(filename);
    out = Buffer.from(z.compress(data, 3));
  } else {
    out = await deflateRaw(data, { windowBits: C.QCOW2_ZLIB_WINDOW_BITS, level: zlib.constants.Z_DEFAULT_COMPRESSION });
  }
  return out.length < data.length ? out : null;
}

/** Decompress `input` into exactly `clusterSize` bytes. */
export async function decompressCluster(input: Buffer, clusterSize: number, type: number, filename: string, hostOffset: number): Promise<Buffer> {
  let out: Buffer;
  try {
    if (type === C.QCOW2_COMPRESSION_TYPE_ZSTD) {
      const z = await needZstd(filename);
      // The stored bytes run to a sector boundary: hand the decoder exactly one frame, and
      // only one that declares a cluster's worth of content (bounded allocation).
      const frame = zstdFrame(input, clusterSize);
      if (!frame) throw new Error('not a zstd frame of one cluster');
      out = Buffer.from(z.decompress(frame));
    } else {
      out = await inflateRaw(input, {
        windowBits: C.QCOW2_ZLIB_WINDOW_BITS,
        finishFlush: zlib.constants.Z_SYNC_FLUSH,
        maxOutputLength: clusterSize,
      });
    }
  } catch (err) {
    if (err instanceof Error && 'kind' in err) throw err;
    throw corrupt(`${filename}: compressed cluster at ${hostOffset} does not decompress: ${(err as Error).message}`);
  }
  if (out.length !== clusterSize) {
    throw corrupt(`${filename}: compressed cluster at ${hostOffset} decompresses to ${out.length} bytes, not the cluster size ${clusterSize}`);
  }
  return out;
}

/**
 * The first zstd frame of `buf` (RFC 8878, 3.1.1), or null when it is malformed or does not
 * declare a content size of `expected` bytes.
 */
function zstdFrame(buf: Buffer, expected: number): Buffer | null {
  if (buf.length < 6 || buf.readUInt32LE(0) !== 0xfd2fb528) return null;
  const fhd = buf[4];
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictBytes = [0, 1, 2, 4][fhd & 3];
  const fcsBytes = [single ? 1 : 0, 2, 4, 8][fcsFlag];
  let pos = 5 + (single ? 0 : 1) + dictBytes;
  if (fcsBytes === 0 || pos + fcsBytes > buf.length) return null;
  let fcs: number;
  if (fcsBytes === 1) fcs = buf[pos];
  else if (fcsBytes === 2) fcs = buf.readUInt16LE(pos) + 256;
  else if (fcsBytes === 4) fcs = buf.readUInt32LE(pos);
  else fcs = Number(buf.readBigUInt64LE(pos));
  if (fcs !== expected) return null;
  pos += fcsBytes;
  for (;;) {
    if (pos + 3 > buf.length) return null;
    const bh = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16);
    const last = bh & 1;
    const btype = (bh >> 1) & 3;
    const bsize = bh >>> 3;
    if (btype === 3) return null;
    pos += 3 + (btype === 1 ? 1 : bsize);
    if (last) break;
  }
  pos += checksum ? 4 : 0;
  return pos <= buf.length ? buf.subarray(0, pos) : null;
}
