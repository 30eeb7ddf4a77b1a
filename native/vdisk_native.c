/*
 * vdisk_native: the few system calls Node.js 20 does not expose and file-posix needs.
 *
 *   fallocate(fd, mode, offset, length) -> Promise<void>   punch holes, zero ranges, preallocate
 *   seekData(fd, offset) / seekHole(fd, offset) -> number  lseek SEEK_DATA/SEEK_HOLE; -1 on ENXIO
 *   dioAlignment(fd) -> {memAlign, offsetAlign} | null     statx(STATX_DIOALIGN)
 *   blockDeviceSize(fd) -> number                          ioctl BLKGETSIZE64
 *   blockDeviceSectorSize(fd) -> number                    ioctl BLKSSZGET
 *   blkdiscard(fd, offset, length) -> Promise<void>        ioctl BLKDISCARD
 *   FALLOC_FL_* constants
 *
 * fallocate and BLKDISCARD can take long on big ranges, so they run on the libuv thread
 * pool (napi async work) and return promises. lseek, statx and the size ioctls are quick and
 * synchronous. Errors carry `.code` = the errno name (ENOSPC, EOPNOTSUPP, ...) like Node's
 * own fs errors, so JS maps them with the same table.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <node_api.h>

#ifndef STATX_DIOALIGN
#define STATX_DIOALIGN 0x00002000U
#endif

#define CHECK(call)                                                     \
  do {                                                                  \
    if ((call) != napi_ok) {                                            \
      napi_throw_error(env, NULL, "vdisk_native: N-API call failed");   \
      return NULL;                                                      \
    }                                                                   \
  } while (0)

static const char *errno_name(int err) {
  const char *name = strerrorname_np(err);
  return name ? name : "EIO";
}

static napi_value make_errno_error(napi_env env, int err, const char *syscall_name) {
  char msg[256];
  napi_value code, message, error, sys;
  snprintf(msg, sizeof msg, "%s: %s", syscall_name, strerror(err));
  napi_create_string_utf8(env, errno_name(err), NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message);
  napi_create_error(env, code, message, &error);
  napi_create_string_utf8(env, syscall_name, NAPI_AUTO_LENGTH, &sys);
  napi_set_named_property(env, error, "syscall", sys);
  napi_value errnum;
  napi_create_int32(env, -err, &errnum);
  napi_set_named_property(env, error, "errno", errnum);
  return error;
}

static napi_value throw_errno(napi_env env, int err, const char *syscall_name) {
  napi_throw(env, make_errno_error(env, err, syscall_name));
  return NULL;
}

/* Reads `argc` integer arguments (fd, then 64-bit values); throws TypeError on bad input. */
static int get_int_args(napi_env env, napi_callback_info info, size_t argc, int64_t *out) {
  napi_value argv[4];
  size_t got = 4;
  if (napi_get_cb_info(env, info, &got, argv, NULL, NULL) != napi_ok || got < argc) {
    napi_throw_type_error(env, NULL, "vdisk_native: too few arguments");
    return 0;
  }
  for (size_t i = 0; i < argc; i++) {
    double d;
    if (napi_get_value_double(env, argv[i], &d) != napi_ok || d < 0 || d > 9007199254740991.0 ||
        d != (double)(int64_t)d) {
      napi_throw_type_error(env, NULL, "vdisk_native: arguments must be non-negative integers");
      return 0;
    }
    out[i] = (int64_t)d;
  }
  return 1;
}

static napi_value make_number(napi_env env, int64_t v) {
  napi_value r;
  napi_create_int64(env, v, &r);
  return r;
}

/* ---- async work: fallocate and BLKDISCARD ------------------------------------------- */

enum op_kind { OP_FALLOCATE, OP_BLKDISCARD };

struct op {
  enum op_kind kind;
  int fd;
  int mode;
  int64_t offset;
  int64_t length;
  int err;
  napi_deferred deferred;
  napi_async_work work;
};

static void op_execute(napi_env env, void *data) {
  (void)env;
  struct op *op = data;
  int r;
  if (op->kind == OP_FALLOCATE) {
    do {
      r = fallocate(op->fd, op->mode, (off_t)op->offset, (off_t)op->length);
    } while (r < 0 && errno == EINTR);
  } else {
    uint64_t range[2] = {(uint64_t)op->offset, (uint64_t)op->length};
    r = ioctl(op->fd, BLKDISCARD, range);
  }
  op->err = r < 0 ? errno : 0;
}

static void op_complete(napi_env env, napi_status status, void *data) {
  struct op *op = data;
  if (status != napi_ok) {
    napi_value msg, error;
    napi_create_string_utf8(env, "vdisk_native: async work cancelled", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &error);
    napi_reject_deferred(env, op->deferred, error);
  } else if (op->err) {
    napi_reject_deferred(env, op->deferred,
                         make_errno_error(env, op->err, op->kind == OP_FALLOCATE ? "fallocate" : "ioctl(BLKDISCARD)"));
  } else {
    napi_value undef;
    napi_get_undefined(env, &undef);
    napi_resolve_deferred(env, op->deferred, undef);
  }
  napi_delete_async_work(env, op->work);
  free(op);
}

static napi_value queue_op(napi_env env, enum op_kind kind, int fd, int mode, int64_t offset, int64_t length) {
  struct op *op = calloc(1, sizeof *op);
  if (!op) return throw_errno(env, ENOMEM, "vdisk_native");
  op->kind = kind;
  op->fd = fd;
  op->mode = mode;
  op->offset = offset;
  op->length = length;
  napi_value promise, name;
  if (napi_create_promise(env, &op->deferred, &promise) != napi_ok) {
    free(op);
    napi_throw_error(env, NULL, "vdisk_native: cannot create promise");
    return NULL;
  }
  napi_create_string_utf8(env, kind == OP_FALLOCATE ? "vdisk:fallocate" : "vdisk:blkdiscard", NAPI_AUTO_LENGTH, &name);
  CHECK(napi_create_async_work(env, NULL, name, op_execute, op_complete, op, &op->work));
  CHECK(napi_queue_async_work(env, op->work));
  return promise;
}

static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  int64_t a[4];
  if (!get_int_args(env, info, 4, a)) return NULL;
  return queue_op(env, OP_FALLOCATE, (int)a[0], (int)a[1], a[2], a[3]);
}

static napi_value js_blkdiscard(napi_env env, napi_callback_info info) {
  int64_t a[3];
  if (!get_int_args(env, info, 3, a)) return NULL;
  return queue_op(env, OP_BLKDISCARD, (int)a[0], 0, a[1], a[2]);
}

/* ---- synchronous calls ------------------------------------------------------------- */

static napi_value do_seek(napi_env env, napi_callback_info info, int whence) {
  int64_t a[2];
  if (!get_int_args(env, info, 2, a)) return NULL;
  off_t r = lseek((int)a[0], (off_t)a[1], whence);
  if (r < 0) {
    /* ENXIO: offset is at/after EOF (SEEK_DATA: no data after it). */
    if (errno == ENXIO) return make_number(env, -1);
    return throw_errno(env, errno, whence == SEEK_DATA ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)");
  }
  return make_number(env, (int64_t)r);
}

static napi_value js_seek_data(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_DATA);
}

static napi_value js_seek_hole(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_HOLE);
}

static napi_value js_dio_alignment(napi_env env, napi_callback_info info) {
  int64_t a[1];
  if (!get_int_args(env, info, 1, a)) return NULL;
  struct statx stx;
  memset(&stx, 0, sizeof stx);
  if (syscall(SYS_statx, (int)a[0], "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0) {
    if (errno == ENOSYS || errno == EINVAL) {
      napi_value n;
      napi_get_null(env, &n);
      return n;
    }
    return throw_errno(env, errno, "statx");
  }
  /* Older kernels ignore the mask bit; a file system without O_DIRECT reports zeros. */
  if (!(stx.stx_mask & STATX_DIOALIGN) || stx.stx_dio_mem_align == 0 || stx.stx_dio_offset_align == 0) {
    napi_value n;
    napi_get_null(env, &n);
    return n;
  }
  napi_value obj;
  CHECK(napi_create_object(env, &obj));
  napi_set_named_property(env, obj, "memAlign", make_number(env, stx.stx_dio_mem_align));
  napi_set_named_property(env, obj, "offsetAlign", make_number(env, stx.stx_dio_offset_align));
  return obj;
}

static napi_value js_block_device_size(napi_env env, napi_callback_info info) {
  int64_t a[1];
  if (!get_int_args(env, info, 1, a)) return NULL;
  uint64_t size = 0;
  if (ioctl((int)a[0], BLKGETSIZE64, &size) < 0) return throw_errno(env, errno, "ioctl(BLKGETSIZE64)");
  return make_number(env, (int64_t)size);
}

static napi_value js_block_device_sector_size(napi_env env, napi_callback_info info) {
  int64_t a[1];
  if (!get_int_args(env, info, 1, a)) return NULL;
  int size = 0;
  if (ioctl((int)a[0], BLKSSZGET, &size) < 0) return throw_errno(env, errno, "ioctl(BLKSSZGET)");
  return make_number(env, size);
}

/* ---- module ------------------------------------------------------------------------ */

static void export_fn(napi_env env, napi_value exports, const char *name, napi_callback cb) {
  napi_value fn;
  napi_create_function(env, name, NAPI_AUTO_LENGTH, cb, NULL, &fn);
  napi_set_named_property(env, exports, name, fn);
}

static napi_value init(napi_env env, napi_value exports) {
  export_fn(env, exports, "fallocate", js_fallocate);
  export_fn(env, exports, "seekData", js_seek_data);
  export_fn(env, exports, "seekHole", js_seek_hole);
  export_fn(env, exports, "dioAlignment", js_dio_alignment);
  export_fn(env, exports, "blockDeviceSize", js_block_device_size);
  export_fn(env, exports, "blockDeviceSectorSize", js_block_device_sector_size);
  export_fn(env, exports, "blkdiscard", js_blkdiscard);
  napi_set_named_property(env, exports, "FALLOC_FL_KEEP_SIZE", make_number(env, FALLOC_FL_KEEP_SIZE));
  napi_set_named_property(env, exports, "FALLOC_FL_PUNCH_HOLE", make_number(env, FALLOC_FL_PUNCH_HOLE));
  napi_set_named_property(env, exports, "FALLOC_FL_ZERO_RANGE", make_number(env, FALLOC_FL_ZERO_RANGE));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
