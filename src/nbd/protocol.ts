// NBD wire constants, each under the name doc/proto.md (NetworkBlockDevice/nbd) gives it.
// Every number on the wire is big-endian.

// ---- magics -------------------------------------------------------------------------------
export const NBDMAGIC = 0x4e42444d41474943n; // 'NBDMAGIC' (INIT_PASSWD)
export const IHAVEOPT = 0x49484156454f5054n; // 'IHAVEOPT' (newstyle; also the option magic)
export const NBD_REP_MAGIC = 0x3e889045565a9n; // option reply magic
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const NBD_DEFAULT_PORT = 10809;

// ---- handshake flags (server, 16 bits) ------------------------------------------------------
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

// ---- client flags (32 bits) ---------------------------------------------------------------
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// ---- transmission flags (16 bits) ---------------------------------------------------------
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// ---- options --------------------------------------------------------------------------------
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4; // withdrawn
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11; // not implemented: answered NBD_REP_ERR_UNSUP

// ---- option reply types ---------------------------------------------------------------------
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const NBD_REP_FLAG_ERROR = 0x80000000; // bit 31 marks an error reply
export const NBD_REP_ERR_UNSUP = (NBD_REP_FLAG_ERROR | 1) >>> 0;
export const NBD_REP_ERR_POLICY = (NBD_REP_FLAG_ERROR | 2) >>> 0;
export const NBD_REP_ERR_INVALID = (NBD_REP_FLAG_ERROR | 3) >>> 0;
export const NBD_REP_ERR_PLATFORM = (NBD_REP_FLAG_ERROR | 4) >>> 0;
export const NBD_REP_ERR_TLS_REQD = (NBD_REP_FLAG_ERROR | 5) >>> 0;
export const NBD_REP_ERR_UNKNOWN = (NBD_REP_FLAG_ERROR | 6) >>> 0;
export const NBD_REP_ERR_SHUTDOWN = (NBD_REP_FLAG_ERROR | 7) >>> 0;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = (NBD_REP_FLAG_ERROR | 8) >>> 0;
export const NBD_REP_ERR_TOO_BIG = (NBD_REP_FLAG_ERROR | 9) >>> 0;

// ---- NBD_REP_INFO types ---------------------------------------------------------------------
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// ---- commands -------------------------------------------------------------------------------
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_CMD_RESIZE = 8; // experimental; not implemented (EINVAL)

// ---- command flags --------------------------------------------------------------------------
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// ---- structured replies ---------------------------------------------------------------------
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) | 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2;

// ---- base:allocation status flags -----------------------------------------------------------
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

// ---- metadata contexts we serve ---------------------------------------------------------------
export const META_BASE_ALLOCATION = 'base:allocation';
/** QEMU's context (docs/interop/nbd.txt): status = 0 unallocated, 1 this layer, 2+ backing depth. */
export const META_QEMU_ALLOCATION_DEPTH = 'qemu:allocation-depth';

// ---- error values (the only ones the protocol allows) -----------------------------------------
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// ---- sizes and limits ---------------------------------------------------------------------------
/** Request header: magic 4, flags 2, type 2, handle 8, offset 8, length 4. */
export const NBD_REQUEST_SIZE = 28;
export const NBD_SIMPLE_REPLY_SIZE = 16;
export const NBD_STRUCTURED_REPLY_SIZE = 20;
export const NBD_OPTION_HEADER_SIZE = 16;
export const NBD_OPTION_REPLY_HEADER_SIZE = 20;
/** Spec: strings MUST be no longer than 4096 bytes. */
export const NBD_MAX_STRING_SIZE = 4096;
/** Largest READ/WRITE payload (the spec's portable limit 2^25, QEMU's NBD_MAX_BUFFER_SIZE). */
export const NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024;
/** Largest option the server will even skip over before calling it a denial of service. */
export const NBD_MAX_OPTION_SIZE = 32 * 1024 * 1024;

/**
 * The NBD error for a failed request, decided once at the edge (as nbdkit's nbd_errno): the
 * protocol allows only a few values, and two of them only to a request that asked for them
 * with a flag: ENOTSUP to a FAST_ZERO write-zeroes that cannot be fast, EOVERFLOW to a DF
 * read too large for one chunk. Without the flag they become EINVAL.
 */
export function nbdErrno(code: string | undefined, commandFlags = 0): number {
  switch (code) {
    case 'EPERM': case 'EROFS': case 'EACCES': return NBD_EPERM;
    case 'ENOMEM': return NBD_ENOMEM;
    case 'EINVAL': return NBD_EINVAL;
    case 'ENOSPC': case 'EFBIG': case 'EDQUOT': return NBD_ENOSPC;
    case 'EOVERFLOW': return commandFlags & NBD_CMD_FLAG_DF ? NBD_EOVERFLOW : NBD_EINVAL;
    case 'ENOTSUP': case 'EOPNOTSUPP': return commandFlags & NBD_CMD_FLAG_FAST_ZERO ? NBD_ENOTSUP : NBD_EINVAL;
    case 'ESHUTDOWN': return NBD_ESHUTDOWN;
    default: return NBD_EIO;
  }
}

const OPT_NAMES: Record<number, string> = {
  [NBD_OPT_EXPORT_NAME]: 'NBD_OPT_EXPORT_NAME', [NBD_OPT_ABORT]: 'NBD_OPT_ABORT', [NBD_OPT_LIST]: 'NBD_OPT_LIST',
  [NBD_OPT_STARTTLS]: 'NBD_OPT_STARTTLS', [NBD_OPT_INFO]: 'NBD_OPT_INFO', [NBD_OPT_GO]: 'NBD_OPT_GO',
  [NBD_OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY', [NBD_OPT_LIST_META_CONTEXT]: 'NBD_OPT_LIST_META_CONTEXT',
  [NBD_OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT', [NBD_OPT_EXTENDED_HEADERS]: 'NBD_OPT_EXTENDED_HEADERS',
};

export function optName(opt: number): string {
  return OPT_NAMES[opt] ?? `option ${opt}`;
}
