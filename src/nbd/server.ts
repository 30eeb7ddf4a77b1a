// The NBD server: listens on TCP or a UNIX socket, hands each client to an NbdConnection,
// caps the number of clients, and shuts down gracefully (stop accepting, let requests in
// flight finish, close connections). Exports and their backends belong to the caller.
import net from 'node:net';
import fs from 'node:fs';
import { invalidArgument } from '../block/errors.js';
import { DEFAULT_LIMITS, NbdConnection, type ConnectionLimits, type ServerContext } from './connection.js';
import type { NbdExport } from './export.js';
import { bufferPool } from './buffers.js';
import { NBD_DEFAULT_PORT } from './protocol.js';
import type { TlsCredentials } from './tls.js';

export interface ServerOptions {
  exports: NbdExport[];
  /** TCP address; default 127.0.0.1 (only local clients unless asked otherwise). */
  host?: string;
  /** TCP port; default 10809; 0 picks a free one. */
  port?: number;
  /** Listen on this UNIX socket instead of TCP. */
  socketPath?: string;
  /** With credentials the server runs in FORCEDTLS mode. */
  tls?: TlsCredentials | null;
  /** Clients at once (qemu-nbd -e). At the limit a newcomer replaces the oldest connection
   * still in its handshake; when all are past it, the newcomer is refused. Default 100. */
  maxClients?: number;
  /** Seconds a client has to finish the handshake (qemu-nbd --handshake-limit); 0 = none. Default 10. */
  handshakeLimit?: number;
  /** Per-connection backpressure limits (defaults: 256 requests, 64 MiB in flight, 16 MiB output). */
  limits?: Partial<ConnectionLimits>;
  log?: (message: string) => void;
}

export interface NbdServer {
  /** 'nbd://127.0.0.1:10809' or 'nbd+unix:///?socket=/path'. */
  readonly uri: string;
  readonly address: { host: string; port: number } | { path: string };
  /** Connections open now. */
  readonly clients: number;
  /** Stop accepting, finish requests in flight, close every connection. */
  close(): Promise<void>;
}

export async function startServer(opts: ServerOptions): Promise<NbdServer> {
  const names = new Set<string>();
  for (const e of opts.exports) {
    if (names.has(e.name)) throw invalidArgument(`export name '${e.name}' is used twice`);
    names.add(e.name);
  }
  const ctx: ServerContext = {
    exports: new Map(opts.exports.map((e) => [e.name, e])),
    tls: opts.tls ?? null,
    handshakeLimitMs: (opts.handshakeLimit ?? 10) * 1000,
    shuttingDown: false,
    limits: { ...DEFAULT_LIMITS, ...opts.limits },
    log: opts.log ?? (() => {}),
  };
  // Insertion order of the Set is accept order, so the first handshaking one is the oldest.
  const connections = new Set<NbdConnection>();
  const maxClients = opts.maxClients ?? 100;
  const server = net.createServer({ noDelay: true });
  server.on('connection', (socket) => {
    if (ctx.shuttingDown) {
      socket.destroy();
      return;
    }
    if (connections.size >= maxClients && !evictOldestHandshaking()) {
      ctx.log(`refused a client: ${maxClients} clients already connected`);
      socket.destroy();
      return;
    }
    const conn = new NbdConnection(socket, ctx);
    connections.add(conn);
    conn.closed.then(() => {
      connections.delete(conn);
      // Idle read/write buffers are kept for the next request, not for an idle server.
      if (connections.size === 0) bufferPool.trim();
    });
  });

  /**
   * At the -e limit a new client takes the place of the oldest connection that has not
   * finished its handshake. Node cannot stop accepting while keeping the socket listening
   * (qemu-nbd's answer), and refusing newcomers would let idle connections lock real
   * clients out until the handshake deadline. A real client's handshake takes
   * milliseconds; connections in the transmission phase are never evicted.
   */
  function evictOldestHandshaking(): boolean {
    for (const c of connections) {
      if (!c.transmitting) {
        c.destroy('evicted: connection limit reached and a new client arrived');
        connections.delete(c);
        return true;
      }
    }
    return false;
  }

  if (opts.socketPath) {
    // A stale socket from a crashed run would make listen fail with EADDRINUSE.
    try {
      if (fs.statSync(opts.socketPath).isSocket()) fs.unlinkSync(opts.socketPath);
    } catch { /* absent */ }
  }
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    const done = () => {
      server.removeListener('error', reject);
      resolve();
    };
    if (opts.socketPath) server.listen(opts.socketPath, done);
    else server.listen(opts.port ?? NBD_DEFAULT_PORT, opts.host ?? '127.0.0.1', done);
  });
  server.on('error', (err) => ctx.log(`server error: ${err.message}`));

  let address: NbdServer['address'];
  let uri: string;
  if (opts.socketPath) {
    address = { path: opts.socketPath };
    uri = `${opts.tls ? 'nbds' : 'nbd'}+unix:///?socket=${opts.socketPath}`;
  } else {
    const a = server.address() as net.AddressInfo;
    address = { host: a.address, port: a.port };
    const host = a.family === 'IPv6' ? `[${a.address}]` : a.address;
    uri = `${ctx.tls ? 'nbds' : 'nbd'}://${host}:${a.port}`;
  }

  let closing: Promise<void> | null = null;
  return {
    uri,
    address,
    get clients() {
      return connections.size;
    },
    close() {
      closing ??= (async () => {
        ctx.shuttingDown = true;
        const stopped = new Promise<void>((r) => server.close(() => r()));
        await Promise.all([...connections].map((c) => c.shutdown()));
        await stopped;
      })();
      return closing;
    },
  };
}
