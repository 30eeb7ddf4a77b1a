// Reading a plain socket straight into the receiver's buffers (Node internals, kept apart).
//
// net.Socket's `onread` option makes libuv read into buffers the caller hands out; net.Server
// offers no such option for accepted sockets, so the same three fields the constructor would
// set are set here, found by their symbol descriptions, before the first read. Used on plain
// (non-TLS) connections: the bulk of a WRITE payload goes from the kernel straight into its
// pool buffer, in reads as large as the socket has queued, with no 64 KiB chunks, no copies
// and no stream machinery. When this Node lacks the fields nothing is changed and the caller
// pipes the socket into the receiver instead.
import type net from 'node:net';
import type { Receiver } from './receiver.js';

/**
 * Returns false (and changes nothing) when this Node does not have the fields. Backpressure
 * keeps the stream contract: a held receiver answers false, which stops reading, and resume()
 * starts it again.
 */
export function readDirectly(socket: net.Socket, receiver: Receiver): boolean {
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
