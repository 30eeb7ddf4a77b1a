// One error type for the whole stack. `code` is errno-like and stable (the NBD server maps
// it to NBD error numbers, the CLI to exit codes); `kind` says what sort of problem it is.

export type ErrorCode =
  | 'EIO' | 'ENOSPC' | 'EINVAL' | 'EROFS' | 'ENOTSUP' | 'ENOENT' | 'EACCES' | 'EPERM'
  | 'EFBIG' | 'EEXIST' | 'ELOOP' | 'ENOMEM' | 'ESHUTDOWN' | 'EBUSY' | 'EOVERFLOW';

export type ErrorKind =
  | 'io' | 'invalid-argument' | 'invalid-format' | 'unsupported-feature' | 'corrupt-image'
  | 'out-of-bounds' | 'read-only' | 'not-found' | 'permission';

export class VdiskError extends Error {
  readonly code: ErrorCode;
  readonly kind: ErrorKind;
  constructor(code: ErrorCode, kind: ErrorKind, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VdiskError';
    this.code = code;
    this.kind = kind;
  }
}

export const invalidArgument = (msg: string) => new VdiskError('EINVAL', 'invalid-argument', msg);
export const invalidFormat = (msg: string) => new VdiskError('EINVAL', 'invalid-format', msg);
export const unsupported = (msg: string) => new VdiskError('ENOTSUP', 'unsupported-feature', msg);
export const corrupt = (msg: string) => new VdiskError('EIO', 'corrupt-image', msg);
export const outOfBounds = (msg: string) => new VdiskError('EINVAL', 'out-of-bounds', msg);
export const readOnly = (msg: string) => new VdiskError('EROFS', 'read-only', msg);

const SYS_CODES: Record<string, [ErrorCode, ErrorKind]> = {
  ENOENT: ['ENOENT', 'not-found'],
  EACCES: ['EACCES', 'permission'],
  EPERM: ['EPERM', 'permission'],
  EROFS: ['EROFS', 'read-only'],
  ENOSPC: ['ENOSPC', 'io'],
  EDQUOT: ['ENOSPC', 'io'],
  EFBIG: ['EFBIG', 'io'],
  EINVAL: ['EINVAL', 'invalid-argument'],
  EISDIR: ['EINVAL', 'invalid-argument'],
  ENOTSUP: ['ENOTSUP', 'unsupported-feature'],
  EOPNOTSUPP: ['ENOTSUP', 'unsupported-feature'],
  EEXIST: ['EEXIST', 'invalid-argument'],
  ENOMEM: ['ENOMEM', 'io'],
};

const SYS_TEXT: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  EROFS: 'Read-only file system',
  ENOSPC: 'No space left on device',
  EDQUOT: 'Disk quota exceeded',
  EFBIG: 'File too large',
  EINVAL: 'Invalid argument',
  EISDIR: 'Is a directory',
  EIO: 'Input/output error',
  ENOTSUP: 'Operation not supported',
  EOPNOTSUPP: 'Operation not supported',
};

/** Wrap a Node system error (or anything thrown) as a VdiskError naming what failed. */
export function fromSystemError(err: unknown, what: string): VdiskError {
  if (err instanceof VdiskError) return err;
  const sysCode = (err as NodeJS.ErrnoException | undefined)?.code;
  if (sysCode && SYS_CODES[sysCode]) {
    const [code, kind] = SYS_CODES[sysCode];
    return new VdiskError(code, kind, `${what}: ${SYS_TEXT[sysCode] ?? sysCode}`, { cause: err });
  }
  const msg = err instanceof Error ? err.message : String(err);
  return new VdiskError('EIO', 'io', `${what}: ${msg}`, { cause: err });
}
