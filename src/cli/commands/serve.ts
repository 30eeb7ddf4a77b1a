// vdisk serve [-f FMT] [--cache MODE | -t MODE] [-x NAME]... [-b ADDR] [-p PORT] [-k SOCKET] [-r]
//             [-e MAX_CLIENTS] [--tls-creds DIR [--tls-verify-peer on|off]] [--tls-psk FILE]
//             [-D DESCRIPTION]... [--handshake-limit SECONDS] [--default] FILE...
//
// Shaped like qemu-nbd, except that it stays up until SIGINT/SIGTERM (qemu-nbd needs -t) and
// listens on 127.0.0.1 unless -b says otherwise. Once listening it prints one line to stderr:
//   vdisk serve: listening on nbd://127.0.0.1:10809 (export '', cache=writeback)
// On SIGINT/SIGTERM: stop accepting, finish requests in flight, flush, close images, exit 0.
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { BlockBackend } from '../../block/backend.js';
import { cacheModeName } from '../../block/cache-mode.js';
import type { BlockNode } from '../../block/node.js';
import { invalidArgument } from '../../block/errors.js';
import { createImage, getFormat, openImage } from '../../block/graph.js';
import { formatSize } from '../../block/size.js';
import { NbdExport } from '../../nbd/export.js';
import { NBD_DEFAULT_PORT } from '../../nbd/protocol.js';
import { startServer, type NbdServer } from '../../nbd/server.js';
import { loadPskCredentials, loadX509Credentials, type TlsCredentials } from '../../nbd/tls.js';
import { action, cacheOption, collect } from '../common.js';

interface ServeOptions {
  format?: string;
  cache?: string;
  exportName?: string[];
  description?: string[];
  bind: string;
  port: string;
  socket?: string;
  readOnly?: boolean;
  shared: string;
  tlsCreds?: string;
  tlsPsk?: string;
  tlsVerifyPeer: string;
  handshakeLimit: string;
  default?: boolean;
  verbose?: boolean;
}

const DEFAULT_DIR = 'vdisk-data';
const DEFAULT_SIZE = 10 * 1024 ** 3;

export function register(program: Command): void {
  program
    .command('serve')
    .description('export disk images over NBD (like qemu-nbd); runs until SIGINT/SIGTERM')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('-t, --cache <mode>', 'cache mode: writeback, none, writethrough, directsync, unsafe', 'writeback')
    .option('-x, --export-name <name>', 'export name, once per file in order (default: the file name; one file: "")', collect)
    .option('-D, --description <text>', 'export description, once per file in order', collect)
    .option('-b, --bind <addr>', 'address to listen on', '127.0.0.1')
    .option('-p, --port <port>', 'TCP port', String(NBD_DEFAULT_PORT))
    .option('-k, --socket <path>', 'listen on this UNIX socket instead of TCP')
    .option('-r, --read-only', 'export read-only')
    .option('-e, --shared <n>', 'clients allowed at once', '100')
    .option('--tls-creds <dir>', 'require TLS with X.509 credentials from DIR (ca-cert.pem, server-cert.pem, server-key.pem)')
    .option('--tls-verify-peer <on|off>', 'with --tls-creds: demand a client certificate signed by ca-cert.pem', 'on')
    .option('--tls-psk <file>', 'require TLS with pre-shared keys from FILE (lines username:hexkey)')
    .option('--handshake-limit <seconds>', 'drop clients that have not finished the handshake in time (0: never)', '10')
    .option('--default', 'with no FILE: serve ./vdisk-data/disk.qcow2 (10 GiB, created sparse if missing)')
    .option('-v, --verbose', 'log connection problems to stderr')
    .argument('[files...]')
    .action(action(async (files: string[], o: ServeOptions) => {
      await serve(files, o);
    }));
}

async function serve(files: string[], o: ServeOptions): Promise<void> {
  const cache = cacheOption(o.cache);
  const port = parseCount(o.port, '--port', 0, 65535);
  const maxClients = parseCount(o.shared, '--shared', 1, 100000);
  const handshakeLimit = parseCount(o.handshakeLimit, '--handshake-limit', 0, 86400);
  if (o.tlsCreds && o.tlsPsk) throw invalidArgument('--tls-creds and --tls-psk cannot be used together');
  if (o.tlsVerifyPeer !== 'on' && o.tlsVerifyPeer !== 'off') throw invalidArgument('--tls-verify-peer must be on or off');
  let tls: TlsCredentials | null = null;
  if (o.tlsCreds) tls = loadX509Credentials(o.tlsCreds, { verifyPeer: o.tlsVerifyPeer === 'on' });
  else if (o.tlsPsk) tls = loadPskCredentials(o.tlsPsk);

  let format = o.format;
  let usingDefault = false;
  if (files.length === 0) {
    if (!o.default) throw invalidArgument('serve needs at least one image file (or --default)');
    const d = await defaultImage();
    files = [d.file];
    format = d.format;
    usingDefault = true;
  }
  if (format) getFormat(format);
  const names = exportNames(files, o.exportName ?? []);
  const descriptions = o.description ?? [];
  if (descriptions.length > files.length) throw invalidArgument(`${descriptions.length} descriptions (-D) for ${files.length} files`);

  const nodes: BlockNode[] = [];
  const exports: NbdExport[] = [];
  let server: NbdServer | null = null;
  try {
    for (const [i, file] of files.entries()) {
      const node = await openImage(file, { format, cache, readOnly: o.readOnly ?? false });
      nodes.push(node);
      exports.push(new NbdExport({
        name: names[i], description: descriptions[i], backend: new BlockBackend(node, cache), readOnly: o.readOnly,
      }));
    }
    server = await startServer({
      exports,
      host: o.bind,
      port,
      socketPath: o.socket,
      tls,
      maxClients,
      handshakeLimit,
      log: o.verbose ? (m) => process.stderr.write(`vdisk serve: ${m}\n`) : undefined,
    });
  } catch (err) {
    await Promise.allSettled(nodes.map((n) => n.close()));
    throw err;
  }

  const shown = exports.map((e) => `'${e.name}'`).join(', ');
  process.stderr.write(`vdisk serve: listening on ${server.uri} (export${exports.length > 1 ? 's' : ''} ${shown}, cache=${cacheModeName(cache)}${tls ? `, tls=${tls.kind}` : ''}${o.readOnly ? ', read-only' : ''})\n`);
  if (usingDefault) {
    const uri = server.uri;
    process.stdout.write([
      `image:  ${files[0]} (${format}, ${formatSize(exports[0].size)})`,
      `info:   nbdinfo ${uri}`,
      `guest:  qemu-system-x86_64 -m 2G -drive file=${uri},format=raw,if=virtio,cache=none`,
      'stop:   Ctrl-C (flushes and closes the image)',
      '',
    ].join('\n'));
  }

  await waitForSignal();
  process.stderr.write('vdisk serve: shutting down\n');
  await server.close();
  const results = await Promise.allSettled(exports.map((e) => e.backend.close()));
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}

/** Resolves on the first SIGINT or SIGTERM; a second one exits at once. */
function waitForSignal(): Promise<void> {
  return new Promise((resolve) => {
    const onSignal = (sig: NodeJS.Signals) => {
      process.removeListener('SIGINT', onSignal);
      process.removeListener('SIGTERM', onSignal);
      process.once('SIGINT', () => process.exit(1));
      process.once('SIGTERM', () => process.exit(1));
      void sig;
      resolve();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
}

/** -x names in order; files beyond them get their base name; a single unnamed file is "". */
function exportNames(files: string[], given: string[]): string[] {
  if (given.length > files.length) throw invalidArgument(`${given.length} export names (-x) for ${files.length} files`);
  const names = files.map((f, i) => given[i] ?? (files.length === 1 ? '' : path.basename(f)));
  const seen = new Set<string>();
  for (const n of names) {
    if (seen.has(n)) throw invalidArgument(`export name '${n}' is used twice (give distinct names with -x)`);
    seen.add(n);
  }
  return names;
}

function parseCount(text: string, what: string, min: number, max: number): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || n < min || n > max) throw invalidArgument(`${what} must be a number from ${min} to ${max}, not '${text}'`);
  return n;
}

/** ./vdisk-data/disk.qcow2 (or disk.raw while no qcow2 driver is registered), created if missing. */
async function defaultImage(): Promise<{ file: string; format: string }> {
  for (const format of ['qcow2', 'raw']) {
    const file = path.join(DEFAULT_DIR, `disk.${format}`);
    if (fs.existsSync(file)) return { file, format };
  }
  let format = 'raw';
  try {
    getFormat('qcow2');
    format = 'qcow2';
  } catch { /* not built yet: raw */ }
  const file = path.join(DEFAULT_DIR, `disk.${format}`);
  fs.mkdirSync(DEFAULT_DIR, { recursive: true });
  await createImage(file, { format, size: DEFAULT_SIZE });
  process.stderr.write(`vdisk serve: created ${file} (${format}, ${formatSize(DEFAULT_SIZE)}, sparse)\n`);
  return { file, format };
}
