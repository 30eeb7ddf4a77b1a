// TLS for NBD_OPT_STARTTLS: credentials laid out like QEMU's, and the in-place upgrade.
//
// X.509 (QEMU's tls-creds-x509, endpoint=server): a directory holding ca-cert.pem,
// server-cert.pem, server-key.pem and optionally ca-crl.pem. QEMU's verify-peer defaults
// to on, so by default the client must present a certificate signed by ca-cert.pem;
// `verifyPeer: false` (serve --tls-verify-peer=off) only authenticates the server.
//
// PSK (QEMU's tls-creds-psk): a keys.psk file of `username:hexkey` lines; the client's
// identity selects the key (libnbd: tls-psk-file= and tls-username=).
import fs from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import type net from 'node:net';
import { VdiskError, invalidArgument } from '../block/errors.js';

export interface TlsCredentials {
  kind: 'x509' | 'psk';
  /** Options for new tls.TLSSocket(socket, options). */
  socketOptions: tls.TLSSocketOptions;
  /** Client certificates are demanded and checked (x509 with verify-peer). */
  verifyPeer: boolean;
}

function readCred(dir: string, name: string, required: boolean): Buffer | undefined {
  const file = path.join(dir, name);
  try {
    return fs.readFileSync(file);
  } catch (err) {
    if (!required && (err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new VdiskError('EINVAL', 'invalid-argument',
      `TLS credentials: cannot read '${file}': ${(err as Error).message}`);
  }
}

export function loadX509Credentials(dir: string, opts: { verifyPeer?: boolean } = {}): TlsCredentials {
  const verifyPeer = opts.verifyPeer ?? true;
  const ca = readCred(dir, 'ca-cert.pem', verifyPeer);
  const cert = readCred(dir, 'server-cert.pem', true);
  const key = readCred(dir, 'server-key.pem', true);
  const crl = readCred(dir, 'ca-crl.pem', false);
  let secureContext: tls.SecureContext;
  try {
    secureContext = tls.createSecureContext({ ca, cert, key, crl, minVersion: 'TLSv1.2' });
  } catch (err) {
    throw new VdiskError('EINVAL', 'invalid-argument', `TLS credentials in '${dir}': ${(err as Error).message}`);
  }
  return {
    kind: 'x509',
    verifyPeer,
    socketOptions: { isServer: true, secureContext, requestCert: verifyPeer, rejectUnauthorized: verifyPeer },
  };
}

/** Parse QEMU's keys.psk: one `username:hexkey` per line. */
export function parsePskFile(text: string, file = 'keys.psk'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const colon = line.indexOf(':');
    const hex = colon > 0 ? line.slice(colon + 1) : '';
    if (colon <= 0 || !/^([0-9a-fA-F]{2})+$/.test(hex)) {
      throw invalidArgument(`${file}:${i + 1}: expected username:hexkey`);
    }
    keys.set(line.slice(0, colon), Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw invalidArgument(`${file}: no keys`);
  return keys;
}

// PSK suites for TLS 1.2; TLS 1.3 uses its standard suites with an external PSK.
const PSK_CIPHERS = [
  'ECDHE-PSK-AES256-CBC-SHA384', 'ECDHE-PSK-AES128-CBC-SHA256', 'ECDHE-PSK-CHACHA20-POLY1305',
  'DHE-PSK-AES256-GCM-SHA384', 'DHE-PSK-AES128-GCM-SHA256', 'DHE-PSK-CHACHA20-POLY1305',
  'PSK-AES256-GCM-SHA384', 'PSK-AES128-GCM-SHA256', 'PSK-CHACHA20-POLY1305',
].join(':');

export function loadPskCredentials(file: string): TlsCredentials {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new VdiskError('EINVAL', 'invalid-argument', `TLS PSK: cannot read '${file}': ${(err as Error).message}`);
  }
  const keys = parsePskFile(text, file);
  const secureContext = tls.createSecureContext({ ciphers: PSK_CIPHERS, minVersion: 'TLSv1.2' });
  return {
    kind: 'psk',
    verifyPeer: false,
    socketOptions: {
      isServer: true,
      secureContext,
      ciphers: PSK_CIPHERS,
      pskCallback: (_socket: tls.TLSSocket, identity: string) => keys.get(identity) ?? null,
    } as tls.TLSSocketOptions,
  };
}

/**
 * Upgrade a plain socket that has just sent the STARTTLS ACK. Bytes the client already sent
 * (its ClientHello) and that the socket buffered are picked up by TLSSocket itself.
 * Resolves once the handshake is done and, with verify-peer, the client is authorised.
 */
export function upgradeToTls(socket: net.Socket, creds: TlsCredentials, timeoutMs: number): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const secure = new tls.TLSSocket(socket, creds.socketOptions);
    let settled = false;
    const timer = timeoutMs > 0 ? setTimeout(() => fail(new Error('TLS handshake timed out')), timeoutMs) : null;
    function fail(err: Error): void {
      if (settled) return;
      settled = true;
      if (timer) clearTimeout(timer);
      secure.destroy();
      socket.destroy();
      reject(err);
    }
    secure.once('error', fail);
    secure.once('close', () => fail(new Error('connection closed during TLS handshake')));
    secure.once('secure', () => {
      if (settled) return;
      const rejected = creds.verifyPeer ? peerVerifyError(secure) : null;
      if (rejected) {
        fail(new Error(`client certificate rejected: ${rejected}`));
        return;
      }
      settled = true;
      if (timer) clearTimeout(timer);
      secure.removeListener('error', fail);
      resolve(secure);
    });
  });
}

/**
 * OpenSSL (as Node sets it up) already refuses a handshake without a client certificate when
 * one is demanded, but leaves checking the chain to JavaScript. tls.Server does that check in
 * a private 'secure' handler that a TLSSocket made for STARTTLS does not get, so ask the
 * handle the same question (`verifyError()`, what tls.Server uses).
 */
function peerVerifyError(secure: tls.TLSSocket): string | null {
  const handle = (secure as unknown as { _handle?: { verifyError?: () => Error | null } })._handle;
  if (typeof handle?.verifyError !== 'function') return 'cannot verify the client certificate on this Node.js';
  const err = handle.verifyError() as (Error & { code?: string }) | null;
  if (err) return err.code ?? err.message;
  if (!secure.getPeerCertificate()?.subject) return 'none presented';
  return null;
}
