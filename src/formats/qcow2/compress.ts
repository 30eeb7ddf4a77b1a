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
      out = Buffer.from(z.decompress(input));
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
