/*
 * vdisk_native: the few system calls Node.js 20 does not expose and file-posix needs.
 *
 *   fallocate(fd, mode, offset, length) -> Promise<void>   punch holes, zero ranges, preallocate
 *   seekData(fd, offset) / seekHole(fd, offset) -> number  lseek SEEK_DATA/SEEK_HOLE; -1 on ENXIO
 *   dioAlignment(fd) -> {memAlign, offsetAlign} | null     statx(STATX_DIOALIGN)
 *   blockDeviceSize(fd) -> number                          ioctl BLKGETSIZE64
 *   blockDeviceSectorSize(fd) -> number                    ioctl BLKSSZGET
 *   blkdiscard(fd, offset, length) -> Promise<void>        ioctl BLKDISCARD
 *   preadNowait(fd, buf, offset) -> number                 preadv2(RWF_NOWAIT); -errno on failure
 *   pwriteNowait(fd, buf, offset) -> number                pwritev2(RWF_NOWAIT); -errno on failure
 *   uringSetup(entries, results: Int32Array, onDone) -> 0 | -errno
 *   uringSubmit(write, fd, buf, offset, id) -> 0 | -errno  queue one read or write on the io_uring
 *   uringFlush() -> count | -errno                         io_uring_enter for everything queued;
 *                                                          completions already there, into results
 *   FALLOC_FL_* constants
 *
 * fallocate and BLKDISCARD can take long on big ranges, so they run on the libuv thread
 * pool (napi async work) and return promises. lseek, statx and the size ioctls are quick and
 * synchronous. preadNowait/pwriteNowait are synchronous too: RWF_NOWAIT makes the kernel
 * fail with EAGAIN rather than wait for the disk, so they only ever copy to or from the page
 * cache, which is cheaper than a trip through the thread pool. They return -errno instead of
 * throwing because EAGAIN (and EOPNOTSUPP where the file system lacks NOWAIT) is the normal
 * "take the slow path" answer, not an error.
 *
 * The io_uring (one per process) serves O_DIRECT reads and writes, buffered writes and
 * buffered reads that missed the page cache, without the thread pool: uringSubmit queues a
 * request; uringFlush enters the kernel once for all queued ones (the JS side calls it once
 * per tick), which starts the I/O and returns, with the completions that are already there
 * (buffered I/O often completes inside the call; ext4 may also hand writes to the kernel's
 * io-wq threads). Later completions signal an eventfd that libuv polls (on Linux 6.1+ the
 * ring defers completions to this thread, DEFER_TASKRUN, so the kernel never interrupts the
 * event loop for them: the callback collects them with one io_uring_enter); the poll
 * callback copies every completion as an (id, result) pair into `results` and calls
 * onDone(count) once, with results being bytes or -errno. At most `entries` requests are in
 * flight (-EBUSY beyond), so the completion queue (twice as big) can never overflow. Only the thread that set the ring up may use it (others get -ENXIO
 * and use the thread pool). The poll handle holds the event loop open only while requests
 * are in flight. Errors carry `.code` = the errno name (ENOSPC, EOPNOTSUPP, ...) like
 * Node's own fs errors, so JS maps them with the same table.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/io_uring.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <node_api.h>
#include <uv.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

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

/* ---- page-cache fast path: preadv2 / pwritev2 with RWF_NOWAIT -------------------- */

/* (fd, buffer, offset): the buffer's memory and length, and the integer arguments. */
static int get_io_args(napi_env env, napi_callback_info info, int *fd, void **data, size_t *len, int64_t *offset) {
  napi_value argv[3];
  size_t got = 3;
  bool is_buffer = false;
  double dfd, doff;
  if (napi_get_cb_info(env, info, &got, argv, NULL, NULL) != napi_ok || got < 3 ||
      napi_is_buffer(env, argv[1], &is_buffer) != napi_ok || !is_buffer ||
      napi_get_buffer_info(env, argv[1], data, len) != napi_ok ||
      napi_get_value_double(env, argv[0], &dfd) != napi_ok || napi_get_value_double(env, argv[2], &doff) != napi_ok ||
      dfd < 0 || dfd > 2147483647.0 || dfd != (double)(int)dfd || doff < 0 || doff > 9007199254740991.0 ||
      doff != (double)(int64_t)doff) {
    napi_throw_type_error(env, NULL, "vdisk_native: expected (fd, Buffer, offset)");
    return 0;
  }
  *fd = (int)dfd;
  *offset = (int64_t)doff;
  return 1;
}

static napi_value do_nowait(napi_env env, napi_callback_info info, int is_write) {
  int fd;
  void *data;
  size_t len;
  int64_t offset;
  if (!get_io_args(env, info, &fd, &data, &len, &offset)) return NULL;
  struct iovec iov = {data, len};
  ssize_t r;
  do {
    r = is_write ? pwritev2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT) : preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
  } while (r < 0 && errno == EINTR);
  return make_number(env, r < 0 ? -(int64_t)errno : (int64_t)r);
}

static napi_value js_pread_nowait(napi_env env, napi_callback_info info) {
  return do_nowait(env, info, 0);
}

static napi_value js_pwrite_nowait(napi_env env, napi_callback_info info) {
  return do_nowait(env, info, 1);
}

/* ---- io_uring for O_DIRECT ------------------------------------------------------------ */

struct uring {
  int ring_fd;
  int event_fd;
  unsigned entries;
  unsigned in_flight; /* queued or in the kernel: completions still to come */
  unsigned queued;    /* written to the submission queue, not yet entered */
  bool deferred;      /* IORING_SETUP_DEFER_TASKRUN: completions wait for our GETEVENTS */
  unsigned *sq_tail, *sq_mask, *sq_array, *sq_flags;
  unsigned *cq_head, *cq_tail, *cq_mask;
  struct io_uring_sqe *sqes;
  struct io_uring_cqe *cqes;
  int32_t *results; /* 2 * cq entries: (id, result) pairs for onDone */
  unsigned results_pairs;
  napi_env env;
  napi_ref results_ref;
  napi_ref callback_ref;
  napi_async_context async_context;
  uv_poll_t poll;
};

static struct uring *ring; /* one per process: the main thread's event loop */

/* Copies up to results_pairs completions into `results`; returns how many. */
static unsigned uring_reap(struct uring *u) {
  unsigned head = *u->cq_head;
  unsigned tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
  unsigned n = 0;
  while (head != tail && n < u->results_pairs) {
    struct io_uring_cqe *cqe = &u->cqes[head & *u->cq_mask];
    u->results[2 * n] = (int32_t)cqe->user_data;
    u->results[2 * n + 1] = cqe->res;
    n++;
    head++;
  }
  __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
  u->in_flight -= n;
  if (n > 0 && u->in_flight == 0) uv_unref((uv_handle_t *)&u->poll);
  return n;
}

/* With DEFER_TASKRUN, completions are task work queued for this thread; they become CQEs
 * only when it enters the kernel with GETEVENTS. min_complete 0: never waits. */
static void uring_run_task_work(struct uring *u) {
  if (!u->deferred) return;
  while (syscall(__NR_io_uring_enter, u->ring_fd, 0, 0, IORING_ENTER_GETEVENTS, NULL, 0) < 0 && errno == EINTR) {
  }
}

static void uring_poll_cb(uv_poll_t *handle, int status, int events) {
  (void)handle;
  (void)events;
  struct uring *u = ring;
  uint64_t count;
  if (read(u->event_fd, &count, sizeof count) < 0 && errno != EAGAIN) return;
  if (status < 0) return;
  napi_env env = u->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  for (bool first = true;; first = false) {
    /* The eventfd was cleared above, first: task work queued after that signals it again.
     * After the first round (the JS callback's flush collected completions too), enter
     * again only when the kernel flags more task work (IORING_SQ_TASKRUN). */
    if (first || (__atomic_load_n(u->sq_flags, __ATOMIC_ACQUIRE) & IORING_SQ_TASKRUN)) uring_run_task_work(u);
    unsigned n = uring_reap(u);
    if (n == 0) break;
    napi_value cb, recv, arg, result;
    napi_get_reference_value(env, u->callback_ref, &cb);
    napi_get_global(env, &recv); /* napi_make_callback wants an object */
    napi_create_uint32(env, n, &arg);
    napi_status st = napi_make_callback(env, u->async_context, recv, cb, 1, &arg, &result);
    if (st == napi_pending_exception) {
      napi_value err;
      napi_get_and_clear_last_exception(env, &err);
      napi_fatal_exception(env, err);
      break;
    }
    /* Completions that cannot be delivered would leave their requests hanging forever. */
    if (st != napi_ok) napi_fatal_error("vdisk_native", NAPI_AUTO_LENGTH, "io_uring completion callback failed", NAPI_AUTO_LENGTH);
  }
  napi_close_handle_scope(env, scope);
}

static void uring_cleanup(void *arg) {
  (void)arg;
  if (!ring) return;
  uv_poll_stop(&ring->poll);
  uv_close((uv_handle_t *)&ring->poll, NULL); /* the struct is never freed: the process ends */
  close(ring->event_fd);
  close(ring->ring_fd);
}

static napi_value js_uring_setup(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  size_t argc = 3;
  uint32_t entries;
  napi_typedarray_type type;
  size_t length;
  void *data;
  napi_valuetype cbtype;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 ||
      napi_get_value_uint32(env, argv[0], &entries) != napi_ok ||
      napi_get_typedarray_info(env, argv[1], &type, &length, &data, NULL, NULL) != napi_ok || type != napi_int32_array ||
      napi_typeof(env, argv[2], &cbtype) != napi_ok || cbtype != napi_function || entries == 0 || entries > 4096) {
    napi_throw_type_error(env, NULL, "vdisk_native: expected (entries, Int32Array, function)");
    return NULL;
  }
  if (ring) return make_number(env, -EEXIST);
  /* Completions as task work deferred to this thread (Linux 6.1+): the kernel does not
   * interrupt the event loop (a signal-like wakeup, EINTR from epoll) for each one; the
   * eventfd says there is work and the poll callback collects it with one io_uring_enter.
   * Older kernels refuse the flags: then completions are posted as they come. */
  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
  p.cq_entries = 2 * entries;
  bool deferred = true;
  int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
  if (fd < 0 && errno == EINVAL) {
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = 2 * entries;
    deferred = false;
    fd = (int)syscall(__NR_io_uring_setup, entries, &p);
  }
  if (fd < 0) return make_number(env, -errno);
  size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
  if (single && cq_size > sq_size) sq_size = cq_size;
  char *sq = mmap(NULL, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
  char *cq = single ? sq : mmap(NULL, cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
  void *sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                    IORING_OFF_SQES);
  int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  int err = 0;
  if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED || efd < 0) err = errno;
  else if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_EVENTFD, &efd, 1) < 0) err = errno;
  struct uring *u = err ? NULL : calloc(1, sizeof *u);
  if (!err && !u) err = ENOMEM;
  uv_loop_t *loop = NULL;
  if (!err && (napi_get_uv_event_loop(env, &loop) != napi_ok || uv_poll_init(loop, &u->poll, efd) != 0)) err = EINVAL;
  if (err) {
    /* Nothing was handed out yet: undo and report; the caller uses the thread pool. */
    free(u);
    if (efd >= 0) close(efd);
    close(fd); /* also drops the mappings' hold on the ring */
    return make_number(env, -err);
  }
  u->ring_fd = fd;
  u->event_fd = efd;
  u->deferred = deferred;
  u->entries = p.sq_entries;
  u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
  u->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
  u->sq_array = (unsigned *)(sq + p.sq_off.array);
  u->sq_flags = (unsigned *)(sq + p.sq_off.flags);
  u->cq_head = (unsigned *)(cq + p.cq_off.head);
  u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
  u->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
  u->sqes = sqes;
  u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
  u->results = data;
  u->results_pairs = (unsigned)(length / 2);
  u->env = env;
  napi_value name;
  napi_create_string_utf8(env, "vdisk:uring", NAPI_AUTO_LENGTH, &name);
  CHECK(napi_create_reference(env, argv[1], 1, &u->results_ref));
  CHECK(napi_create_reference(env, argv[2], 1, &u->callback_ref));
  CHECK(napi_async_init(env, NULL, name, &u->async_context));
  ring = u;
  uv_poll_start(&u->poll, UV_READABLE, uring_poll_cb);
  uv_unref((uv_handle_t *)&u->poll);
  napi_add_env_cleanup_hook(env, uring_cleanup, NULL);
  return make_number(env, u->entries);
}

static napi_value js_uring_submit(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  size_t argc = 5;
  bool is_write, is_buffer = false;
  double dfd, doff, did;
  void *data;
  size_t len;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5 ||
      napi_get_value_bool(env, argv[0], &is_write) != napi_ok || napi_get_value_double(env, argv[1], &dfd) != napi_ok ||
      napi_is_buffer(env, argv[2], &is_buffer) != napi_ok || !is_buffer ||
      napi_get_buffer_info(env, argv[2], &data, &len) != napi_ok || napi_get_value_double(env, argv[3], &doff) != napi_ok ||
      napi_get_value_double(env, argv[4], &did) != napi_ok || dfd < 0 || dfd > 2147483647.0 || doff < 0 ||
      doff > 9007199254740991.0 || did < 0 || did > 2147483647.0 || len > 0x7ffff000) {
    napi_throw_type_error(env, NULL, "vdisk_native: expected (write, fd, Buffer, offset, id)");
    return NULL;
  }
  struct uring *u = ring;
  /* Only the thread that set the ring up may use it (its callback runs there; and with
   * SINGLE_ISSUER the kernel refuses other submitters): others use the thread pool. */
  if (!u || u->env != env) return make_number(env, -ENXIO);
  if (u->in_flight >= u->entries) return make_number(env, -EBUSY);
  unsigned tail = *u->sq_tail;
  unsigned idx = tail & *u->sq_mask;
  struct io_uring_sqe *sqe = &u->sqes[idx];
  memset(sqe, 0, sizeof *sqe);
  sqe->opcode = is_write ? IORING_OP_WRITE : IORING_OP_READ;
  sqe->fd = (int)dfd;
  sqe->addr = (uint64_t)(uintptr_t)data;
  sqe->len = (uint32_t)len;
  sqe->off = (uint64_t)doff;
  sqe->user_data = (uint64_t)did;
  u->sq_array[idx] = idx;
  __atomic_store_n(u->sq_tail, tail + 1, __ATOMIC_RELEASE);
  u->queued++;
  if (u->in_flight++ == 0) uv_ref((uv_handle_t *)&u->poll);
  return make_number(env, 0);
}

/* Hands every queued request to the kernel with one io_uring_enter. Requests the kernel
 * finished during that call (page-cache reads and writes often complete inline) are copied
 * into `results` at once, so the caller delivers them without waiting for the eventfd.
 * Returns how many pairs it copied, or -errno (the requests stay queued and the next
 * uringFlush tries again). */
static napi_value js_uring_flush(napi_env env, napi_callback_info info) {
  (void)info;
  struct uring *u = ring;
  if (u && u->env != env) u = NULL;
  /* GETEVENTS with min_complete 0 also collects deferred completions; it never waits. */
  unsigned enter_flags = u && u->deferred ? IORING_ENTER_GETEVENTS : 0;
  while (u && u->queued > 0) {
    long r = syscall(__NR_io_uring_enter, u->ring_fd, u->queued, 0, enter_flags, NULL, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return make_number(env, r < 0 ? -errno : -EAGAIN);
    u->queued -= (unsigned)r;
  }
  return make_number(env, u ? (int64_t)uring_reap(u) : 0);
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
  export_fn(env, exports, "preadNowait", js_pread_nowait);
  export_fn(env, exports, "pwriteNowait", js_pwrite_nowait);
  export_fn(env, exports, "uringSetup", js_uring_setup);
  export_fn(env, exports, "uringSubmit", js_uring_submit);
  export_fn(env, exports, "uringFlush", js_uring_flush);
  napi_set_named_property(env, exports, "EAGAIN", make_number(env, EAGAIN));
  napi_set_named_property(env, exports, "FALLOC_FL_KEEP_SIZE", make_number(env, FALLOC_FL_KEEP_SIZE));
  napi_set_named_property(env, exports, "FALLOC_FL_PUNCH_HOLE", make_number(env, FALLOC_FL_PUNCH_HOLE));
  napi_set_named_property(env, exports, "FALLOC_FL_ZERO_RANGE", make_number(env, FALLOC_FL_ZERO_RANGE));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
