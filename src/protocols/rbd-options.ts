// Naming an rbd image the two ways QEMU takes it (block/rbd.c, qapi BlockdevOptionsRbd):
//
//   filename   rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE[:KEY=VALUE...]]
//              `\` escapes the next character (so `\:`, `\@`, `\/`, `\=` are literal);
//              id=USER and conf=FILE are ours, every other pair goes to rados_conf_set
//              in the order given.
//   blockdev   driver=rbd,pool=,namespace=,image=,snapshot=,conf=,user=,key-secret=,
//              auth-client-required=,server.N.host=,server.N.port=
//
// Both become one RbdOptions. Pure string work: no librbd needed, so the parser is tested
// (and errors are worded) even where Ceph is not installed.
import { invalidArgument, unsupported } from '../block/errors.js';

export interface RbdServer {
  host: string;
  port: string;
}

/** QEMU's BlockdevOptionsRbd, plus the filename's key=value pairs (QEMU's "=keyvalue-pairs"). */
export interface RbdOptions {
  pool: string;
  /** '' is the default namespace. */
  namespace: string;
  image: string;
  snapshot?: string;
  /** ceph.conf to read; absent: librados's default search (CEPH_CONF, /etc/ceph/ceph.conf, ...). */
  conf?: string;
  /** The cephx user without "client." (QEMU's id= / user=); absent: admin. */
  user?: string;
  /** Id of a secret object holding the base64 cephx key. */
  keySecret?: string;
  /** Each 'cephx' or 'none'. */
  authClientRequired?: string[];
  /** Monitors to use instead of the configuration's mon_host. */
  server?: RbdServer[];
  /** rados_conf_set pairs from the filename, in order. */
  keyvaluePairs: Array<[string, string]>;
}

/** Index of the first unescaped `delim` in s, or -1 (QEMU's qemu_rbd_strchr). */
function findUnescaped(s: string, delim: string): number {
  for (let i = 0; i < s.length; i++) {
    if (s[i] === delim) return i;
    if (s[i] === '\\' && i + 1 < s.length) i++;
  }
  return -1;
}

/** Split at the first unescaped delim: [before, after | null]. */
function nextToken(s: string, delim: string): [string, string | null] {
  const i = findUnescaped(s, delim);
  return i < 0 ? [s, null] : [s.slice(0, i), s.slice(i + 1)];
}

/** Drop one level of `\` escapes (a trailing lone `\` stays). */
function unescape(s: string): string {
  let out = '';
  for (let i = 0; i < s.length; i++) {
    if (s[i] === '\\' && i + 1 < s.length) i++;
    out += s[i];
  }
  return out;
}

export function isRbdFilename(name: string): boolean {
  return name.startsWith('rbd:');
}

/** QEMU's qemu_rbd_parse_filename, with the same split rules and error texts. */
export function parseRbdFilename(filename: string): RbdOptions {
  if (!isRbdFilename(filename)) throw invalidArgument("File name must start with 'rbd:'");
  let [poolPart, rest] = nextToken(filename.slice(4), '/');
  if (rest === null) throw invalidArgument(`${filename}: Pool name is required`);
  const opts: RbdOptions = { pool: unescape(poolPart), namespace: '', image: '', keyvaluePairs: [] };
  let imagePart: string;
  // QEMU looks for '@' anywhere after the pool (an unescaped '@' in an option value counts too).
  if (findUnescaped(rest, '@') >= 0) {
    [imagePart, rest] = nextToken(rest, '@');
    let snap: string;
    [snap, rest] = nextToken(rest!, ':');
    opts.snapshot = unescape(snap);
  } else {
    [imagePart, rest] = nextToken(rest, ':');
  }
  const [first, second] = nextToken(imagePart, '/');
  if (second !== null) {
    opts.namespace = unescape(first);
    imagePart = second;
  }
  opts.image = unescape(imagePart);
  while (rest !== null) {
    const [rawName, afterName] = nextToken(rest, '=');
    const name = unescape(rawName);
    if (afterName === null) throw invalidArgument(`${filename}: conf option ${name} has no value`);
    const [rawValue, afterValue] = nextToken(afterName, ':');
    const value = unescape(rawValue);
    if (name === 'conf') opts.conf = value;
    else if (name === 'id') opts.user = value;
    else opts.keyvaluePairs.push([name, value]);
    rest = afterValue;
  }
  checkNames(opts, filename);
  return opts;
}

function checkNames(o: RbdOptions, what: string): void {
  if (o.pool === '') throw invalidArgument(`${what}: Pool name is required`);
  if (o.image === '') throw invalidArgument(`${what}: Image name is required`);
  if (o.snapshot === '') throw invalidArgument(`${what}: snapshot name is empty`);
}

const BLOCKDEV_KEYS = new Set([
  'driver', 'node-name', 'pool', 'namespace', 'image', 'snapshot', 'conf', 'user', 'key-secret',
  'auth-client-required', 'server', 'encrypt', 'read-only', 'auto-read-only', 'cache', 'discard', 'detect-zeroes',
  'force-share',
]);

/**
 * Blockdev options for driver=rbd: nested ({server: [{host, port}]}) as from QMP JSON, or
 * flat dotted keys (server.0.host=...) as from --blockdev key=value lists. Generic node
 * options (node-name, read-only, cache.*, ...) are the caller's and are ignored here.
 */
export function rbdOptionsFromBlockdev(input: Record<string, unknown>): RbdOptions {
  const flat: Record<string, unknown> = {};
  const servers: RbdServer[] = [];
  const auth: string[] = [];
  for (const [key, value] of Object.entries(input)) {
    const server = /^server\.(\d+)\.(host|port)$/.exec(key);
    const authItem = /^auth-client-required\.(\d+)$/.exec(key);
    if (server) {
      const i = Number(server[1]);
      servers[i] ??= { host: '', port: '' };
      servers[i][server[2] as 'host' | 'port'] = stringValue(value, key);
    } else if (authItem) {
      auth[Number(authItem[1])] = stringValue(value, key);
    } else if (key.startsWith('cache.')) {
      continue;
    } else if (!BLOCKDEV_KEYS.has(key)) {
      throw invalidArgument(`Parameter '${key}' is unexpected`);
    } else {
      flat[key] = value;
    }
  }
  if (flat.driver !== undefined && flat.driver !== 'rbd') throw invalidArgument(`driver must be 'rbd', not '${String(flat.driver)}'`);
  if (flat.encrypt !== undefined) throw unsupported('rbd: encryption (encrypt.*) is not supported by vdisk');
  for (const k of ['pool', 'image']) {
    if (flat[k] === undefined) throw invalidArgument(`Parameter '${k}' is missing`);
  }
  if (Array.isArray(flat.server)) {
    for (const [i, s] of (flat.server as unknown[]).entries()) {
      const o = (s ?? {}) as Record<string, unknown>;
      servers[i] = { host: stringValue(o.host, `server.${i}.host`), port: stringValue(o.port, `server.${i}.port`) };
    }
  } else if (flat.server !== undefined) {
    throw invalidArgument("Parameter 'server' expects an array");
  }
  if (Array.isArray(flat['auth-client-required'])) {
    for (const [i, a] of (flat['auth-client-required'] as unknown[]).entries()) auth[i] = stringValue(a, `auth-client-required.${i}`);
  } else if (flat['auth-client-required'] !== undefined) {
    throw invalidArgument("Parameter 'auth-client-required' expects an array");
  }
  const opts: RbdOptions = {
    pool: stringValue(flat.pool, 'pool'),
    namespace: flat.namespace === undefined ? '' : stringValue(flat.namespace, 'namespace'),
    image: stringValue(flat.image, 'image'),
    keyvaluePairs: [],
  };
  if (flat.snapshot !== undefined) opts.snapshot = stringValue(flat.snapshot, 'snapshot');
  if (flat.conf !== undefined) opts.conf = stringValue(flat.conf, 'conf');
  if (flat.user !== undefined) opts.user = stringValue(flat.user, 'user');
  if (flat['key-secret'] !== undefined) opts.keySecret = stringValue(flat['key-secret'], 'key-secret');
  const serverList = servers.filter((s) => s !== undefined);
  if (serverList.length !== servers.length) throw invalidArgument("Parameter 'server' has a gap in its indexes");
  for (const [i, s] of serverList.entries()) {
    if (!s.host) throw invalidArgument(`Parameter 'server.${i}.host' is missing`);
    if (!s.port) throw invalidArgument(`Parameter 'server.${i}.port' is missing`);
  }
  if (serverList.length > 0) opts.server = serverList;
  const authList = auth.filter((a) => a !== undefined);
  for (const a of authList) {
    if (a !== 'cephx' && a !== 'none') throw invalidArgument(`auth-client-required: '${a}' is not cephx or none`);
  }
  if (authList.length > 0) opts.authClientRequired = authList;
  checkNames(opts, 'rbd');
  return opts;
}

function stringValue(v: unknown, key: string): string {
  if (typeof v === 'string') return v;
  if (typeof v === 'number' && key.endsWith('port')) return String(v);
  throw invalidArgument(`Invalid parameter type for '${key}', expected: string`);
}

/** QEMU's qemu_rbd_mon_host: "host:port;[v6]:port". */
export function monHostString(servers: readonly RbdServer[]): string {
  return servers.map((s) => (s.host.includes(':') ? `[${s.host}]:${s.port}` : `${s.host}:${s.port}`)).join(';');
}

/** How a name is shown in messages: the filename form, without the key=value pairs. */
export function rbdDisplayName(o: RbdOptions): string {
  const esc = (s: string) => s.replace(/[\\:@/=]/g, (c) => `\\${c}`);
  const ns = o.namespace ? `${esc(o.namespace)}/` : '';
  return `rbd:${esc(o.pool)}/${ns}${esc(o.image)}${o.snapshot !== undefined ? `@${esc(o.snapshot)}` : ''}`;
}
