/*
 * vdisk_rbd: librbd for the rbd protocol driver (src/protocols/rbd.ts). A separate addon from
 * vdisk_native so that vdisk builds and runs where librbd-dev is not installed: binding.gyp
 * builds this one only when <rbd/librbd.h> exists.
 *
 * Two kinds of calls, so the event loop never waits for the cluster:
 *
 * 1. Data path (aioRead, aioWrite, aioDiscard, aioWriteZeroes, aioFlush) uses librbd's own
 *    asynchronous API. Each call queues the request and returns 0 or -errno at once. librbd
 *    runs the completion callback on one of its own threads; the callback only records
 *    (id, result) in a ring under a mutex and writes to an eventfd. libuv polls that eventfd
 *    on the loop thread (like the io_uring's in vdisk_native.c), copies every finished pair
 *    into the caller's Float64Array and calls onDone(count) once. Ids are chosen by the JS
 *    side, below CQ_CAP, unique among requests in flight. The poll handle holds the loop open
 *    only while requests are in flight.
 *    librbd keeps the caller's memory until completion (reads land in it); the JS side keeps
 *    the Buffer referenced until its promise settles.
 *
 * 2. Everything librbd only offers synchronously (connect and open, create, stat, resize,
 *    rbd_diff_iterate2, snapshots, locks, config listing, close) runs on libuv's thread pool
 *    as napi async work and returns a promise.
 *
 * Errors reject with an Error carrying .code (errno name), .errno (negative), .stage (which
 * step failed: "connect", "pool", "open", ...) and .arg (the option name for "option"), so
 * the TypeScript side words the one line the user sees, with QEMU's texts.
 *
 * An image handle is a napi external. close() waits for nothing: the JS side drains first,
 * and close refuses (-EBUSY) while requests or async work on the image are outstanding.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include <node_api.h>
#include <uv.h>
#include <rados/librados.h>
#include <rbd/librbd.h>

#define CQ_CAP 4096u          /* most aio requests in flight, process-wide */
#define DIFF_STOP (-9000)     /* returned by the diff callback to end the walk early */
#define MAX_KEYPAIRS 64

static const char *errno_name(int err) {
  const char *name = strerrorname_np(err);
  return name ? name : "EIO";
}

static napi_value make_error(napi_env env, int err, const char *stage, const char *arg) {
  char msg[512];
  napi_value code, message, error, v;
  if (err < 0) err = -err;
  snprintf(msg, sizeof msg, "%s%s%s: %s", stage, arg ? " " : "", arg ? arg : "", strerror(err));
  napi_create_string_utf8(env, errno_name(err), NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message);
  napi_create_error(env, code, message, &error);
  napi_create_int32(env, -err, &v);
  napi_set_named_property(env, error, "errno", v);
  napi_create_string_utf8(env, stage, NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, error, "stage", v);
  if (arg) {
    napi_create_string_utf8(env, arg, NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, error, "arg", v);
  }
  return error;
}

static napi_value throw_type(napi_env env, const char *what) {
  napi_throw_type_error(env, NULL, what);
  return NULL;
}

static napi_value num(napi_env env, double v) {
  napi_value r;
  napi_create_double(env, v, &r);
  return r;
}

static napi_value str(napi_env env, const char *s) {
  napi_value r;
  napi_create_string_utf8(env, s ? s : "", NAPI_AUTO_LENGTH, &r);
  return r;
}

/* ---- image handles ------------------------------------------------------------------- */

struct image {
  rados_t cluster;
  rados_ioctx_t io;
  rbd_image_t img;
  unsigned refs; /* aio in flight + async work queued; loop thread only */
  bool closed;
  bool closing;
};

static void image_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  struct image *im = data;
  /* An image dropped without close() stays open (closing would block this thread on the
   * cluster): the process is ending or the caller leaked it. */
  if (im->closed) free(im);
}

static struct image *get_image(napi_env env, napi_value v) {
  void *data = NULL;
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &data) != napi_ok || !data) {
    napi_throw_type_error(env, NULL, "vdisk_rbd: expected an image handle");
    return NULL;
  }
  struct image *im = data;
  if (im->closed || im->closing) {
    napi_throw(env, make_error(env, ESHUTDOWN, "image", NULL));
    return NULL;
  }
  return im;
}

/* ---- completion queue (data path) ---------------------------------------------------- */

struct cq {
  pthread_mutex_t lock;
  uint32_t ring_id[CQ_CAP];
  int64_t ring_res[CQ_CAP];
  unsigned head, tail; /* under lock; tail - head = finished, not yet delivered */
  struct image *owner[CQ_CAP]; /* loop thread only: the image of each id in flight */
  unsigned in_flight;          /* loop thread only */
  int efd;
  uv_poll_t poll;
  napi_env env;
  napi_ref callback_ref;
  napi_ref results_ref;
  double *results;
  unsigned results_pairs;
  napi_async_context async_context;
};

static struct cq *cq;

/* librbd's callback thread: record and signal, nothing else (it must never block on JS). */
static void aio_done(rbd_completion_t c, void *arg) {
  uint32_t id = (uint32_t)(uintptr_t)arg;
  int64_t r = rbd_aio_get_return_value(c);
  rbd_aio_release(c);
  pthread_mutex_lock(&cq->lock);
  bool was_empty = cq->head == cq->tail;
  unsigned slot = cq->tail % CQ_CAP; /* in_flight <= CQ_CAP, so the ring never overflows */
  cq->ring_id[slot] = id;
  cq->ring_res[slot] = r;
  cq->tail++;
  pthread_mutex_unlock(&cq->lock);
  /* One wakeup per batch: the loop drains the ring until it finds it empty, so only a
   * completion that finds it empty needs to signal. */
  if (was_empty) {
    uint64_t one = 1;
    while (write(cq->efd, &one, sizeof one) < 0 && errno == EINTR) {
    }
  }
}

static void cq_poll_cb(uv_poll_t *handle, int status, int events) {
  (void)handle;
  (void)events;
  uint64_t count;
  if (read(cq->efd, &count, sizeof count) < 0 && errno != EAGAIN) return;
  if (status < 0) return;
  napi_env env = cq->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  for (;;) {
    unsigned n = 0;
    pthread_mutex_lock(&cq->lock);
    while (cq->head != cq->tail && n < cq->results_pairs) {
      unsigned slot = cq->head % CQ_CAP;
      uint32_t id = cq->ring_id[slot];
      cq->results[2 * n] = id;
      cq->results[2 * n + 1] = (double)cq->ring_res[slot];
      cq->head++;
      n++;
    }
    pthread_mutex_unlock(&cq->lock);
    if (n == 0) break;
    for (unsigned i = 0; i < n; i++) {
      uint32_t id = (uint32_t)cq->results[2 * i];
      struct image *im = cq->owner[id];
      cq->owner[id] = NULL;
      if (im) im->refs--;
    }
    cq->in_flight -= n;
    if (cq->in_flight == 0) uv_unref((uv_handle_t *)&cq->poll);
    napi_value cb, recv, arg, result;
    napi_get_reference_value(env, cq->callback_ref, &cb);
    napi_get_global(env, &recv);
    napi_create_uint32(env, n, &arg);
    napi_status st = napi_make_callback(env, cq->async_context, recv, cb, 1, &arg, &result);
    if (st == napi_pending_exception) {
      napi_value err;
      napi_get_and_clear_last_exception(env, &err);
      napi_fatal_exception(env, err);
      break;
    }
    /* Completions that cannot be delivered would leave their requests hanging forever. */
    if (st != napi_ok) napi_fatal_error("vdisk_rbd", NAPI_AUTO_LENGTH, "completion callback failed", NAPI_AUTO_LENGTH);
  }
  napi_close_handle_scope(env, scope);
}

static void cq_cleanup(void *arg) {
  (void)arg;
  if (!cq) return;
  uv_poll_stop(&cq->poll);
  uv_close((uv_handle_t *)&cq->poll, NULL); /* never freed: librbd threads may still signal */
}

/* setup(results: Float64Array, onDone) -> capacity, or -errno. Once per process. */
static napi_value js_setup(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  size_t argc = 2;
  napi_typedarray_type type;
  size_t length;
  void *data;
  napi_valuetype cbtype;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_typedarray_info(env, argv[0], &type, &length, &data, NULL, NULL) != napi_ok || type != napi_float64_array ||
      length < 2 || napi_typeof(env, argv[1], &cbtype) != napi_ok || cbtype != napi_function) {
    return throw_type(env, "vdisk_rbd: expected (Float64Array, function)");
  }
  if (cq) return num(env, -EEXIST);
  struct cq *q = calloc(1, sizeof *q);
  if (!q) return num(env, -ENOMEM);
  uv_loop_t *loop = NULL;
  q->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (q->efd < 0 || napi_get_uv_event_loop(env, &loop) != napi_ok || uv_poll_init(loop, &q->poll, q->efd) != 0) {
    int err = q->efd < 0 ? errno : EINVAL;
    if (q->efd >= 0) close(q->efd);
    free(q);
    return num(env, -err);
  }
  pthread_mutex_init(&q->lock, NULL);
  q->env = env;
  q->results = data;
  q->results_pairs = (unsigned)(length / 2);
  napi_value name;
  napi_create_string_utf8(env, "vdisk:rbd", NAPI_AUTO_LENGTH, &name);
  napi_create_reference(env, argv[0], 1, &q->results_ref);
  napi_create_reference(env, argv[1], 1, &q->callback_ref);
  napi_async_init(env, NULL, name, &q->async_context);
  cq = q;
  uv_poll_start(&q->poll, UV_READABLE, cq_poll_cb);
  uv_unref((uv_handle_t *)&q->poll);
  napi_add_env_cleanup_hook(env, cq_cleanup, NULL);
  return num(env, CQ_CAP);
}

enum aio_kind { AIO_READ, AIO_WRITE, AIO_DISCARD, AIO_WRITE_ZEROES, AIO_FLUSH };

/* Parses a non-negative safe integer argument. */
static bool get_u64(napi_env env, napi_value v, uint64_t *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || !(d >= 0) || d > 9007199254740991.0 || d != (double)(uint64_t)d) return false;
  *out = (uint64_t)d;
  return true;
}

/*
 * aioRead(img, buf, offset, id), aioWrite(img, buf, offset, id), aioDiscard(img, offset, length, id),
 * aioWriteZeroes(img, offset, length, zeroFlags, id), aioFlush(img, id) -> 0 | -errno
 */
static napi_value submit(napi_env env, napi_callback_info info, enum aio_kind kind) {
  napi_value argv[5];
  size_t argc = 5;
  size_t need = kind == AIO_FLUSH ? 2 : kind == AIO_WRITE_ZEROES ? 5 : 4;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < need) {
    return throw_type(env, "vdisk_rbd: too few arguments");
  }
  struct image *im = get_image(env, argv[0]);
  if (!im) return NULL;
  void *data = NULL;
  size_t len = 0;
  uint64_t offset = 0, length = 0, zero_flags = 0, id;
  bool ok = true;
  if (kind == AIO_READ || kind == AIO_WRITE) {
    bool is_buffer = false;
    ok = napi_is_buffer(env, argv[1], &is_buffer) == napi_ok && is_buffer &&
         napi_get_buffer_info(env, argv[1], &data, &len) == napi_ok && get_u64(env, argv[2], &offset);
  } else if (kind == AIO_DISCARD || kind == AIO_WRITE_ZEROES) {
    ok = get_u64(env, argv[1], &offset) && get_u64(env, argv[2], &length);
    if (kind == AIO_WRITE_ZEROES) ok = ok && get_u64(env, argv[3], &zero_flags);
  }
  ok = ok && get_u64(env, argv[need - 1], &id) && id < CQ_CAP;
  if (!ok) return throw_type(env, "vdisk_rbd: bad I/O arguments");
  if (!cq || cq->env != env) return num(env, -ENXIO);
  if (cq->owner[id]) return num(env, -EBUSY);
  rbd_completion_t c;
  int r = rbd_aio_create_completion((void *)(uintptr_t)id, aio_done, &c);
  if (r < 0) return num(env, r);
  switch (kind) {
    case AIO_READ: r = rbd_aio_read(im->img, offset, len, data, c); break;
    case AIO_WRITE: r = rbd_aio_write(im->img, offset, len, data, c); break;
    case AIO_DISCARD: r = rbd_aio_discard(im->img, offset, length, c); break;
    case AIO_WRITE_ZEROES: r = rbd_aio_write_zeroes(im->img, offset, length, c, (int)zero_flags, 0); break;
    case AIO_FLUSH: r = rbd_aio_flush(im->img, c); break;
  }
  if (r < 0) {
    rbd_aio_release(c);
    return num(env, r);
  }
  cq->owner[id] = im;
  im->refs++;
  if (cq->in_flight++ == 0) uv_ref((uv_handle_t *)&cq->poll);
  return num(env, 0);
}

static napi_value js_aio_read(napi_env env, napi_callback_info info) { return submit(env, info, AIO_READ); }
static napi_value js_aio_write(napi_env env, napi_callback_info info) { return submit(env, info, AIO_WRITE); }
static napi_value js_aio_discard(napi_env env, napi_callback_info info) { return submit(env, info, AIO_DISCARD); }
static napi_value js_aio_write_zeroes(napi_env env, napi_callback_info info) { return submit(env, info, AIO_WRITE_ZEROES); }
static napi_value js_aio_flush(napi_env env, napi_callback_info info) { return submit(env, info, AIO_FLUSH); }

/* ---- async work (everything synchronous in librbd) ------------------------------------ */

struct conn_params {
  char *user, *conf, *mon_host, *key, *auth_client_required;
  char *pool, *ns, *image, *snap;
  char *defaults[2 * MAX_KEYPAIRS];
  size_t n_defaults;
  char *keypairs[2 * MAX_KEYPAIRS];
  size_t n_keypairs;
  int cache; /* -1: leave rbd_cache alone (create) */
  bool read_only;
  uint64_t size, order, features, stripe_unit, stripe_count;
};

enum op_kind {
  OP_OPEN, OP_CREATE, OP_CLOSE, OP_STAT, OP_DIFF, OP_RESIZE, OP_SNAP_LIST, OP_SNAP_CREATE,
  OP_SNAP_REMOVE, OP_SNAP_ROLLBACK, OP_LOCK_OWNERS, OP_LOCK_BREAK, OP_NOTIFY, OP_CONFIG, OP_WATCHERS,
};

struct op {
  enum op_kind kind;
  napi_deferred deferred;
  napi_async_work work;
  struct image *im;
  struct conn_params p;
  char *name;
  uint64_t a, b, c;
  int err;
  const char *stage;
  char *stage_arg;
  /* results */
  rbd_image_info_t info;
  uint64_t features, flags, stripe_unit, stripe_count;
  bool has_parent;
  char id[96];
  double *extents;
  size_t n_extents, cap_extents;
  bool truncated;
  rbd_snap_info_t *snaps;
  struct timespec *snap_ts;
  int n_snaps;
  char **owners;
  size_t n_owners;
  rbd_lock_mode_t lock_mode;
  struct notify_ack_t *acks;
  size_t n_acks;
  struct notify_timeout_t *timeouts;
  size_t n_timeouts;
  rbd_config_option_t *cfg;
  int n_cfg;
  rbd_image_watcher_t *watchers;
  size_t n_watchers;
};

static void free_params(struct conn_params *p) {
  free(p->user); free(p->conf); free(p->mon_host); free(p->key); free(p->auth_client_required);
  free(p->pool); free(p->ns); free(p->image); free(p->snap);
  for (size_t i = 0; i < 2 * p->n_defaults; i++) free(p->defaults[i]);
  for (size_t i = 0; i < 2 * p->n_keypairs; i++) free(p->keypairs[i]);
}

static int fail(struct op *op, int r, const char *stage) {
  op->err = r < 0 ? r : -EIO;
  op->stage = stage;
  return op->err;
}

/* QEMU's qemu_rbd_connect order: conf file, key=value pairs, mon_host, key, rbd_cache. */
static int do_connect(struct op *op, rados_t *cluster, rados_ioctx_t *io) {
  struct conn_params *p = &op->p;
  int r = rados_create(cluster, p->user);
  if (r < 0) return fail(op, r, "init");
  /* vdisk's own defaults (quiet stderr, bounded connect): the conf file and the pairs win */
  for (size_t i = 0; i < p->n_defaults; i++) rados_conf_set(*cluster, p->defaults[2 * i], p->defaults[2 * i + 1]);
  r = rados_conf_read_file(*cluster, p->conf);
  if (p->conf && r < 0) {
    fail(op, r, "conf");
    goto shutdown;
  }
  for (size_t i = 0; i < p->n_keypairs; i++) {
    r = rados_conf_set(*cluster, p->keypairs[2 * i], p->keypairs[2 * i + 1]);
    if (r < 0) {
      fail(op, r, "option");
      op->stage_arg = strdup(p->keypairs[2 * i]);
      goto shutdown;
    }
  }
  if (p->mon_host && (r = rados_conf_set(*cluster, "mon_host", p->mon_host)) < 0) {
    fail(op, r, "mon_host");
    goto shutdown;
  }
  if (p->key && (r = rados_conf_set(*cluster, "key", p->key)) < 0) {
    fail(op, r, "key");
    goto shutdown;
  }
  if (p->auth_client_required && (r = rados_conf_set(*cluster, "auth_client_required", p->auth_client_required)) < 0) {
    fail(op, r, "auth_client_required");
    goto shutdown;
  }
  /* Only error: the option does not exist, and then librbd does not cache anyway (QEMU). */
  if (p->cache >= 0) rados_conf_set(*cluster, "rbd_cache", p->cache ? "true" : "false");
  r = rados_connect(*cluster);
  if (r < 0) {
    fail(op, r, "connect");
    goto shutdown;
  }
  r = rados_ioctx_create(*cluster, p->pool, io);
  if (r < 0) {
    fail(op, r, "pool");
    goto shutdown;
  }
  if (p->ns && p->ns[0]) {
    bool exists = false;
    r = rbd_namespace_exists(*io, p->ns, &exists);
    if (r < 0 || !exists) {
      fail(op, r < 0 ? r : -ENOENT, r < 0 ? "namespace-check" : "namespace");
      rados_ioctx_destroy(*io);
      goto shutdown;
    }
  }
  rados_ioctx_set_namespace(*io, p->ns && p->ns[0] ? p->ns : NULL);
  return 0;
shutdown:
  rados_shutdown(*cluster);
  return op->err;
}

static int do_stat(struct op *op, rbd_image_t img) {
  int r = rbd_stat(img, &op->info, sizeof op->info);
  if (r < 0) return fail(op, r, "stat");
  if ((r = rbd_get_features(img, &op->features)) < 0) return fail(op, r, "stat");
  if ((r = rbd_get_flags(img, &op->flags)) < 0) return fail(op, r, "stat");
  if ((r = rbd_get_stripe_unit(img, &op->stripe_unit)) < 0) return fail(op, r, "stat");
  if ((r = rbd_get_stripe_count(img, &op->stripe_count)) < 0) return fail(op, r, "stat");
  if ((r = rbd_get_id(img, op->id, sizeof op->id)) < 0) op->id[0] = '\0'; /* format 1 has none */
  rbd_linked_image_spec_t parent;
  rbd_snap_spec_t parent_snap;
  r = rbd_get_parent(img, &parent, &parent_snap);
  op->has_parent = r == 0;
  if (r == 0) {
    rbd_linked_image_spec_cleanup(&parent);
    rbd_snap_spec_cleanup(&parent_snap);
  }
  return 0;
}

/*
 * librbd's listing calls fill a caller-sized array and answer -ERANGE with the size they
 * need: allocate, call, grow, repeat. Leaves PTR NULL and the op failed on error.
 */
#define LIST_GROWING(op, ptr, max, call, stage)                                    \
  do {                                                                            \
    int r_;                                                                       \
    for (;;) {                                                                    \
      (ptr) = calloc((size_t)(max), sizeof *(ptr));                               \
      if (!(ptr)) {                                                               \
        fail((op), -ENOMEM, (stage));                                             \
        break;                                                                    \
      }                                                                           \
      r_ = (call);                                                                \
      if (r_ >= 0) break;                                                         \
      free(ptr);                                                                  \
      (ptr) = NULL;                                                               \
      if (r_ != -ERANGE) {                                                        \
        fail((op), r_, (stage));                                                  \
        break;                                                                    \
      }                                                                           \
    }                                                                             \
  } while (0)

static int diff_cb(uint64_t offs, size_t len, int exists, void *arg) {
  struct op *op = arg;
  if (!exists) return 0;
  if (op->n_extents > 0) {
    double *last = &op->extents[2 * (op->n_extents - 1)];
    if (last[0] + last[1] == (double)offs) {
      last[1] += (double)len;
      return 0;
    }
  }
  if (op->n_extents == op->cap_extents) {
    if (op->n_extents >= op->c) {
      op->truncated = true;
      return DIFF_STOP;
    }
    size_t cap = op->cap_extents ? 2 * op->cap_extents : 64;
    double *e = realloc(op->extents, 2 * cap * sizeof(double));
    if (!e) return -ENOMEM;
    op->extents = e;
    op->cap_extents = cap;
  }
  op->extents[2 * op->n_extents] = (double)offs;
  op->extents[2 * op->n_extents + 1] = (double)len;
  op->n_extents++;
  return 0;
}

static void op_execute(napi_env env, void *data) {
  (void)env;
  struct op *op = data;
  struct image *im = op->im;
  int r = 0;
  switch (op->kind) {
    case OP_OPEN: {
      if (do_connect(op, &im->cluster, &im->io) < 0) return;
      r = op->p.read_only ? rbd_open_read_only(im->io, op->p.image, &im->img, op->p.snap)
                          : rbd_open(im->io, op->p.image, &im->img, op->p.snap);
      if (r < 0) {
        fail(op, r, "open");
      } else if (do_stat(op, im->img) < 0) {
        rbd_close(im->img);
      } else {
        return;
      }
      rados_ioctx_destroy(im->io);
      rados_shutdown(im->cluster);
      return;
    }
    case OP_CREATE: {
      rados_t cluster;
      rados_ioctx_t io;
      if (do_connect(op, &cluster, &io) < 0) return;
      rbd_image_options_t opts;
      rbd_image_options_create(&opts);
      if (op->p.order) rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_ORDER, op->p.order);
      if (op->p.features) rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FEATURES, op->p.features);
      if (op->p.stripe_unit) rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_STRIPE_UNIT, op->p.stripe_unit);
      if (op->p.stripe_count) rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_STRIPE_COUNT, op->p.stripe_count);
      r = rbd_create4(io, op->p.image, op->p.size, opts);
      rbd_image_options_destroy(opts);
      if (r < 0) fail(op, r, "create");
      rados_ioctx_destroy(io);
      rados_shutdown(cluster);
      return;
    }
    case OP_CLOSE:
      r = rbd_close(im->img);
      rados_ioctx_destroy(im->io);
      rados_shutdown(im->cluster);
      if (r < 0) fail(op, r, "close");
      return;
    case OP_STAT:
      do_stat(op, im->img);
      return;
    case OP_DIFF:
      /* whole_object: answers from the object map when fast-diff is valid (QEMU does the same) */
      r = rbd_diff_iterate2(im->img, NULL, op->a, op->b, 1, 1, diff_cb, op);
      if (r < 0 && r != DIFF_STOP) fail(op, r, "diff");
      return;
    case OP_RESIZE:
      if ((r = rbd_resize(im->img, op->a)) < 0) fail(op, r, "resize");
      return;
    case OP_SNAP_LIST: {
      int max = 16;
      LIST_GROWING(op, op->snaps, max, (r = rbd_snap_list(im->img, op->snaps, &max)), "snap-list");
      if (!op->snaps) return;
      op->n_snaps = r;
      op->snap_ts = calloc((size_t)(r ? r : 1), sizeof *op->snap_ts);
      for (int i = 0; i < r && op->snap_ts; i++) rbd_snap_get_timestamp(im->img, op->snaps[i].id, &op->snap_ts[i]);
      return;
    }
    case OP_SNAP_CREATE:
      if ((r = rbd_snap_create(im->img, op->name)) < 0) fail(op, r, "snap-create");
      return;
    case OP_SNAP_REMOVE:
      if ((r = rbd_snap_remove(im->img, op->name)) < 0) fail(op, r, "snap-remove");
      return;
    case OP_SNAP_ROLLBACK:
      if ((r = rbd_snap_rollback(im->img, op->name)) < 0) fail(op, r, "snap-rollback");
      return;
    case OP_LOCK_OWNERS: {
      size_t max = 8;
      op->owners = calloc(max, sizeof *op->owners);
      if (!op->owners) {
        fail(op, -ENOMEM, "lock-owners");
        return;
      }
      r = rbd_lock_get_owners(im->img, &op->lock_mode, op->owners, &max);
      if (r == -ENOENT) {
        op->n_owners = 0;
      } else if (r < 0) {
        fail(op, r, "lock-owners");
      } else {
        op->n_owners = max;
      }
      return;
    }
    case OP_LOCK_BREAK:
      if ((r = rbd_lock_break(im->img, RBD_LOCK_MODE_EXCLUSIVE, op->name)) < 0) fail(op, r, "lock-break");
      return;
    case OP_NOTIFY: {
      /* An empty notify on the header object is librbd's legacy "header updated": every
       * live client acks it (and re-reads the header), a dead one times out. */
      char oid[128];
      if (rbd_get_id(im->img, op->id, sizeof op->id) < 0) {
        fail(op, -ENOTSUP, "notify");
        return;
      }
      snprintf(oid, sizeof oid, "rbd_header.%s", op->id);
      char *reply = NULL;
      size_t reply_len = 0;
      r = rados_notify2(im->io, oid, "", 0, op->a, &reply, &reply_len);
      if (r < 0 && r != -ETIMEDOUT) {
        if (reply) rados_buffer_free(reply);
        fail(op, r, "notify");
        return;
      }
      if (reply) {
        if (rados_decode_notify_response(reply, reply_len, &op->acks, &op->n_acks, &op->timeouts, &op->n_timeouts) < 0) {
          fail(op, -EIO, "notify");
        }
        rados_buffer_free(reply);
      }
      return;
    }
    case OP_WATCHERS: {
      size_t max = 16;
      LIST_GROWING(op, op->watchers, max, rbd_watchers_list(im->img, op->watchers, &max), "watchers");
      if (op->watchers) op->n_watchers = max;
      return;
    }
    case OP_CONFIG: {
      int max = 256;
      LIST_GROWING(op, op->cfg, max, rbd_config_image_list(im->img, op->cfg, &max), "config");
      if (op->cfg) op->n_cfg = max;
      return;
    }
  }
}

static napi_value stat_object(napi_env env, struct op *op) {
  napi_value o;
  napi_create_object(env, &o);
  napi_set_named_property(env, o, "size", num(env, (double)op->info.size));
  napi_set_named_property(env, o, "objectSize", num(env, (double)op->info.obj_size));
  napi_set_named_property(env, o, "order", num(env, op->info.order));
  napi_set_named_property(env, o, "features", num(env, (double)op->features));
  napi_set_named_property(env, o, "flags", num(env, (double)op->flags));
  napi_set_named_property(env, o, "stripeUnit", num(env, (double)op->stripe_unit));
  napi_set_named_property(env, o, "stripeCount", num(env, (double)op->stripe_count));
  napi_set_named_property(env, o, "id", str(env, op->id));
  napi_value b;
  napi_get_boolean(env, op->has_parent, &b);
  napi_set_named_property(env, o, "hasParent", b);
  return o;
}

static napi_value op_result(napi_env env, struct op *op) {
  napi_value r, arr, o;
  switch (op->kind) {
    case OP_OPEN: {
      napi_value handle;
      napi_create_external(env, op->im, image_finalize, NULL, &handle);
      op->im = NULL; /* owned by the external now */
      r = stat_object(env, op);
      napi_set_named_property(env, r, "handle", handle);
      return r;
    }
    case OP_STAT:
      return stat_object(env, op);
    case OP_DIFF: {
      napi_create_array_with_length(env, 2 * op->n_extents, &arr);
      for (size_t i = 0; i < 2 * op->n_extents; i++) napi_set_element(env, arr, (uint32_t)i, num(env, op->extents[i]));
      napi_create_object(env, &r);
      napi_set_named_property(env, r, "extents", arr);
      napi_value b;
      napi_get_boolean(env, op->truncated, &b);
      napi_set_named_property(env, r, "truncated", b);
      return r;
    }
    case OP_SNAP_LIST:
      napi_create_array_with_length(env, (size_t)op->n_snaps, &arr);
      for (int i = 0; i < op->n_snaps; i++) {
        napi_create_object(env, &o);
        napi_set_named_property(env, o, "id", num(env, (double)op->snaps[i].id));
        napi_set_named_property(env, o, "name", str(env, op->snaps[i].name));
        napi_set_named_property(env, o, "size", num(env, (double)op->snaps[i].size));
        napi_set_named_property(env, o, "timestamp", num(env, op->snap_ts ? (double)op->snap_ts[i].tv_sec : 0));
        napi_set_element(env, arr, (uint32_t)i, o);
      }
      return arr;
    case OP_LOCK_OWNERS:
      napi_create_array_with_length(env, op->n_owners, &arr);
      for (size_t i = 0; i < op->n_owners; i++) napi_set_element(env, arr, (uint32_t)i, str(env, op->owners[i]));
      return arr;
    case OP_NOTIFY:
      napi_create_object(env, &r);
      napi_create_array_with_length(env, op->n_acks, &arr);
      for (size_t i = 0; i < op->n_acks; i++) napi_set_element(env, arr, (uint32_t)i, num(env, (double)op->acks[i].notifier_id));
      napi_set_named_property(env, r, "acked", arr);
      napi_create_array_with_length(env, op->n_timeouts, &arr);
      for (size_t i = 0; i < op->n_timeouts; i++) napi_set_element(env, arr, (uint32_t)i, num(env, (double)op->timeouts[i].notifier_id));
      napi_set_named_property(env, r, "timedOut", arr);
      return r;
    case OP_WATCHERS:
      napi_create_array_with_length(env, op->n_watchers, &arr);
      for (size_t i = 0; i < op->n_watchers; i++) {
        napi_create_object(env, &o);
        napi_set_named_property(env, o, "addr", str(env, op->watchers[i].addr));
        napi_set_named_property(env, o, "id", num(env, (double)op->watchers[i].id));
        napi_set_element(env, arr, (uint32_t)i, o);
      }
      return arr;
    case OP_CONFIG:
      napi_create_array_with_length(env, (size_t)op->n_cfg, &arr);
      for (int i = 0; i < op->n_cfg; i++) {
        napi_create_object(env, &o);
        napi_set_named_property(env, o, "name", str(env, op->cfg[i].name));
        napi_set_named_property(env, o, "value", str(env, op->cfg[i].value));
        const char *src = op->cfg[i].source == RBD_CONFIG_SOURCE_POOL ? "pool"
                          : op->cfg[i].source == RBD_CONFIG_SOURCE_IMAGE ? "image" : "config";
        napi_set_named_property(env, o, "source", str(env, src));
        napi_set_element(env, arr, (uint32_t)i, o);
      }
      return arr;
    default:
      napi_get_undefined(env, &r);
      return r;
  }
}

static void op_free(struct op *op) {
  free_params(&op->p);
  free(op->name);
  free(op->stage_arg);
  free(op->extents);
  if (op->snaps) {
    if (op->n_snaps > 0) rbd_snap_list_end(op->snaps);
    free(op->snaps);
  }
  free(op->snap_ts);
  if (op->owners) {
    if (op->n_owners) rbd_lock_get_owners_cleanup(op->owners, op->n_owners);
    free(op->owners);
  }
  if (op->acks || op->timeouts) rados_free_notify_response(op->acks, op->n_acks, op->timeouts);
  if (op->watchers) {
    if (op->n_watchers) rbd_watchers_list_cleanup(op->watchers, op->n_watchers);
    free(op->watchers);
  }
  if (op->cfg) {
    if (op->n_cfg > 0) rbd_config_image_list_cleanup(op->cfg, op->n_cfg);
    free(op->cfg);
  }
  free(op);
}

static void op_complete(napi_env env, napi_status status, void *data) {
  struct op *op = data;
  if (op->kind != OP_OPEN && op->kind != OP_CREATE && op->im) {
    op->im->refs--;
    if (op->kind == OP_CLOSE) {
      op->im->closing = false;
      op->im->closed = true; /* even when rbd_close failed: the handles are gone */
    }
  }
  if (status != napi_ok) {
    napi_reject_deferred(env, op->deferred, make_error(env, ECANCELED, "async work", NULL));
  } else if (op->err) {
    napi_reject_deferred(env, op->deferred, make_error(env, op->err, op->stage, op->stage_arg));
  } else {
    napi_resolve_deferred(env, op->deferred, op_result(env, op));
  }
  if (op->kind == OP_OPEN && op->im) free(op->im); /* failed open: nothing handed out */
  napi_delete_async_work(env, op->work);
  op_free(op);
}

static napi_value queue_op(napi_env env, struct op *op) {
  napi_value promise, name;
  if (napi_create_promise(env, &op->deferred, &promise) != napi_ok) {
    op_free(op);
    return throw_type(env, "vdisk_rbd: cannot create a promise");
  }
  napi_create_string_utf8(env, "vdisk:rbd", NAPI_AUTO_LENGTH, &name);
  if (napi_create_async_work(env, NULL, name, op_execute, op_complete, op, &op->work) != napi_ok ||
      napi_queue_async_work(env, op->work) != napi_ok) {
    napi_reject_deferred(env, op->deferred, make_error(env, ENOMEM, "async work", NULL));
    op_free(op);
    return promise;
  }
  if (op->im && op->kind != OP_OPEN && op->kind != OP_CREATE) op->im->refs++;
  return promise;
}

/* ---- argument parsing for connect parameters ------------------------------------------ */

/* obj[key] as a malloc'd string, NULL when absent/undefined/null. false on a non-string. */
static bool get_opt_string(napi_env env, napi_value obj, const char *key, char **out) {
  napi_value v;
  napi_valuetype t;
  *out = NULL;
  if (napi_get_named_property(env, obj, key, &v) != napi_ok || napi_typeof(env, v, &t) != napi_ok) return false;
  if (t == napi_undefined || t == napi_null) return true;
  if (t != napi_string) return false;
  size_t len;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) return false;
  *out = malloc(len + 1);
  if (!*out) return false;
  napi_get_value_string_utf8(env, v, *out, len + 1, &len);
  return true;
}

static bool get_opt_u64(napi_env env, napi_value obj, const char *key, uint64_t *out) {
  napi_value v;
  napi_valuetype t;
  *out = 0;
  if (napi_get_named_property(env, obj, key, &v) != napi_ok || napi_typeof(env, v, &t) != napi_ok) return false;
  if (t == napi_undefined || t == napi_null) return true;
  return get_u64(env, v, out);
}

/* obj[key]: array of [name, value] string pairs. */
static bool get_pairs(napi_env env, napi_value obj, const char *key, char **out, size_t *n) {
  napi_value arr;
  napi_valuetype t;
  bool is_array = false;
  uint32_t len = 0;
  *n = 0;
  if (napi_get_named_property(env, obj, key, &arr) != napi_ok || napi_typeof(env, arr, &t) != napi_ok) return false;
  if (t == napi_undefined) return true;
  if (napi_is_array(env, arr, &is_array) != napi_ok || !is_array || napi_get_array_length(env, arr, &len) != napi_ok ||
      len > MAX_KEYPAIRS) {
    return false;
  }
  for (uint32_t i = 0; i < len; i++) {
    napi_value pair, k, v;
    size_t kl, vl;
    if (napi_get_element(env, arr, i, &pair) != napi_ok || napi_get_element(env, pair, 0, &k) != napi_ok ||
        napi_get_element(env, pair, 1, &v) != napi_ok || napi_get_value_string_utf8(env, k, NULL, 0, &kl) != napi_ok ||
        napi_get_value_string_utf8(env, v, NULL, 0, &vl) != napi_ok) {
      return false;
    }
    char *ks = malloc(kl + 1), *vs = malloc(vl + 1);
    if (!ks || !vs) {
      free(ks);
      free(vs);
      return false;
    }
    napi_get_value_string_utf8(env, k, ks, kl + 1, &kl);
    napi_get_value_string_utf8(env, v, vs, vl + 1, &vl);
    out[2 * i] = ks;
    out[2 * i + 1] = vs;
    *n = i + 1;
  }
  return true;
}

static bool get_params(napi_env env, napi_value obj, struct conn_params *p) {
  napi_value v;
  bool b = false;
  p->cache = -1;
  if (!get_opt_string(env, obj, "user", &p->user) || !get_opt_string(env, obj, "conf", &p->conf) ||
      !get_opt_string(env, obj, "monHost", &p->mon_host) || !get_opt_string(env, obj, "key", &p->key) ||
      !get_opt_string(env, obj, "authClientRequired", &p->auth_client_required) ||
      !get_opt_string(env, obj, "pool", &p->pool) || !get_opt_string(env, obj, "namespace", &p->ns) ||
      !get_opt_string(env, obj, "image", &p->image) || !get_opt_string(env, obj, "snapshot", &p->snap) ||
      !get_pairs(env, obj, "defaults", p->defaults, &p->n_defaults) ||
      !get_pairs(env, obj, "keypairs", p->keypairs, &p->n_keypairs) ||
      !get_opt_u64(env, obj, "size", &p->size) || !get_opt_u64(env, obj, "order", &p->order) ||
      !get_opt_u64(env, obj, "features", &p->features) || !get_opt_u64(env, obj, "stripeUnit", &p->stripe_unit) ||
      !get_opt_u64(env, obj, "stripeCount", &p->stripe_count)) {
    return false;
  }
  if (!p->pool || !p->image) return false;
  napi_valuetype t;
  if (napi_get_named_property(env, obj, "cache", &v) == napi_ok && napi_typeof(env, v, &t) == napi_ok && t == napi_boolean) {
    napi_get_value_bool(env, v, &b);
    p->cache = b ? 1 : 0;
  }
  if (napi_get_named_property(env, obj, "readOnly", &v) == napi_ok && napi_typeof(env, v, &t) == napi_ok && t == napi_boolean) {
    napi_get_value_bool(env, v, &p->read_only);
  }
  return true;
}

static struct op *new_op(enum op_kind kind) {
  struct op *op = calloc(1, sizeof *op);
  if (op) op->kind = kind;
  return op;
}

/* open(params) -> Promise<{handle, size, objectSize, order, features, flags, stripeUnit, stripeCount, id, hasParent}> */
static napi_value js_open(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  struct op *op = new_op(OP_OPEN);
  if (!op) return throw_type(env, "vdisk_rbd: out of memory");
  op->im = calloc(1, sizeof *op->im);
  if (!op->im || napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || !get_params(env, argv[0], &op->p)) {
    free(op->im);
    op_free(op);
    return throw_type(env, "vdisk_rbd: bad open parameters");
  }
  return queue_op(env, op);
}

/* create(params with size, order?, features?) -> Promise<void> */
static napi_value js_create(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  struct op *op = new_op(OP_CREATE);
  if (!op) return throw_type(env, "vdisk_rbd: out of memory");
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || !get_params(env, argv[0], &op->p)) {
    op_free(op);
    return throw_type(env, "vdisk_rbd: bad create parameters");
  }
  return queue_op(env, op);
}

/* Image operations: (img[, number][, string]) -> Promise. */
static napi_value image_op(napi_env env, napi_callback_info info, enum op_kind kind, int nums, bool want_name) {
  napi_value argv[4];
  size_t argc = 4;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < (size_t)(1 + nums + (want_name ? 1 : 0))) {
    return throw_type(env, "vdisk_rbd: too few arguments");
  }
  struct image *im = get_image(env, argv[0]);
  if (!im) return NULL;
  struct op *op = new_op(kind);
  if (!op) return throw_type(env, "vdisk_rbd: out of memory");
  op->im = im;
  uint64_t *slots[3] = {&op->a, &op->b, &op->c};
  for (int i = 0; i < nums; i++) {
    if (!get_u64(env, argv[1 + i], slots[i])) {
      op_free(op);
      return throw_type(env, "vdisk_rbd: expected non-negative integers");
    }
  }
  if (want_name) {
    size_t len;
    napi_value v = argv[1 + nums];
    if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok || !(op->name = malloc(len + 1))) {
      op_free(op);
      return throw_type(env, "vdisk_rbd: expected a name");
    }
    napi_get_value_string_utf8(env, v, op->name, len + 1, &len);
  }
  if (kind == OP_CLOSE) {
    if (im->refs > 0) {
      op_free(op);
      napi_throw(env, make_error(env, EBUSY, "close", NULL));
      return NULL;
    }
    im->closing = true;
  }
  return queue_op(env, op);
}

static napi_value js_close(napi_env env, napi_callback_info info) { return image_op(env, info, OP_CLOSE, 0, false); }
static napi_value js_stat(napi_env env, napi_callback_info info) { return image_op(env, info, OP_STAT, 0, false); }
/* diff(img, offset, length, maxExtents) -> {extents: [off, len, ...] allocated runs, truncated} */
static napi_value js_diff(napi_env env, napi_callback_info info) { return image_op(env, info, OP_DIFF, 3, false); }
static napi_value js_resize(napi_env env, napi_callback_info info) { return image_op(env, info, OP_RESIZE, 1, false); }
static napi_value js_snap_list(napi_env env, napi_callback_info info) { return image_op(env, info, OP_SNAP_LIST, 0, false); }
static napi_value js_snap_create(napi_env env, napi_callback_info info) { return image_op(env, info, OP_SNAP_CREATE, 0, true); }
static napi_value js_snap_remove(napi_env env, napi_callback_info info) { return image_op(env, info, OP_SNAP_REMOVE, 0, true); }
static napi_value js_snap_rollback(napi_env env, napi_callback_info info) { return image_op(env, info, OP_SNAP_ROLLBACK, 0, true); }
static napi_value js_lock_owners(napi_env env, napi_callback_info info) { return image_op(env, info, OP_LOCK_OWNERS, 0, false); }
static napi_value js_lock_break(napi_env env, napi_callback_info info) { return image_op(env, info, OP_LOCK_BREAK, 0, true); }
/* notifyHeader(img, timeoutMs) -> {acked: gid[], timedOut: gid[]} */
static napi_value js_notify(napi_env env, napi_callback_info info) { return image_op(env, info, OP_NOTIFY, 1, false); }
static napi_value js_config(napi_env env, napi_callback_info info) { return image_op(env, info, OP_CONFIG, 0, false); }
/* watchers(img) -> [{addr, id}]: clients watching the header (id: global id, as in client.ID) */
static napi_value js_watchers(napi_env env, napi_callback_info info) { return image_op(env, info, OP_WATCHERS, 0, false); }

static napi_value js_version(napi_env env, napi_callback_info info) {
  (void)info;
  int major, minor, extra;
  char buf[64];
  rbd_version(&major, &minor, &extra);
  snprintf(buf, sizeof buf, "%d.%d.%d", major, minor, extra);
  return str(env, buf);
}

/* ---- module ------------------------------------------------------------------------ */

static void export_fn(napi_env env, napi_value exports, const char *name, napi_callback cb) {
  napi_value fn;
  napi_create_function(env, name, NAPI_AUTO_LENGTH, cb, NULL, &fn);
  napi_set_named_property(env, exports, name, fn);
}

static napi_value init(napi_env env, napi_value exports) {
  export_fn(env, exports, "setup", js_setup);
  export_fn(env, exports, "open", js_open);
  export_fn(env, exports, "create", js_create);
  export_fn(env, exports, "close", js_close);
  export_fn(env, exports, "stat", js_stat);
  export_fn(env, exports, "diff", js_diff);
  export_fn(env, exports, "resize", js_resize);
  export_fn(env, exports, "snapList", js_snap_list);
  export_fn(env, exports, "snapCreate", js_snap_create);
  export_fn(env, exports, "snapRemove", js_snap_remove);
  export_fn(env, exports, "snapRollback", js_snap_rollback);
  export_fn(env, exports, "lockOwners", js_lock_owners);
  export_fn(env, exports, "lockBreak", js_lock_break);
  export_fn(env, exports, "notifyHeader", js_notify);
  export_fn(env, exports, "configList", js_config);
  export_fn(env, exports, "watchers", js_watchers);
  export_fn(env, exports, "aioRead", js_aio_read);
  export_fn(env, exports, "aioWrite", js_aio_write);
  export_fn(env, exports, "aioDiscard", js_aio_discard);
  export_fn(env, exports, "aioWriteZeroes", js_aio_write_zeroes);
  export_fn(env, exports, "aioFlush", js_aio_flush);
  export_fn(env, exports, "version", js_version);
  napi_value v;
  napi_create_uint32(env, RBD_FEATURE_EXCLUSIVE_LOCK, &v);
  napi_set_named_property(env, exports, "FEATURE_EXCLUSIVE_LOCK", v);
  napi_create_uint32(env, RBD_FEATURE_OBJECT_MAP, &v);
  napi_set_named_property(env, exports, "FEATURE_OBJECT_MAP", v);
  napi_create_uint32(env, RBD_FEATURE_FAST_DIFF, &v);
  napi_set_named_property(env, exports, "FEATURE_FAST_DIFF", v);
  napi_create_uint32(env, RBD_FEATURE_STRIPINGV2, &v);
  napi_set_named_property(env, exports, "FEATURE_STRIPINGV2", v);
  napi_create_uint32(env, RBD_FLAG_FAST_DIFF_INVALID, &v);
  napi_set_named_property(env, exports, "FLAG_FAST_DIFF_INVALID", v);
  napi_create_uint32(env, RBD_FLAG_OBJECT_MAP_INVALID, &v);
  napi_set_named_property(env, exports, "FLAG_OBJECT_MAP_INVALID", v);
  napi_create_uint32(env, RBD_WRITE_ZEROES_FLAG_THICK_PROVISION, &v);
  napi_set_named_property(env, exports, "WRITE_ZEROES_FLAG_THICK_PROVISION", v);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
