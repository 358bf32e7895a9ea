/* A physical LUN on a Ceph RBD image, through librbd's C API: the store
 * (store.h) that the synchronous data path calls, and the backend
 * (backend.h) of the image's I/O engine.
 *
 * The backend submits with rbd_aio_read/write/flush/write_zeroes and reaps
 * without the GIL: librbd queues each completion for rbd_poll_io_events
 * and makes the image's eventfd readable (rbd_set_image_notification);
 * the reaping thread (the engine's reap mutex held) is that eventfd's only
 * reader.  The engine's completer thread is woken through a second
 * eventfd, written by the completions' callbacks while futures are in
 * flight (set_notify): librbd calls a callback just before it queues the
 * completion, so a reap that finds fewer completions queued than callbacks
 * called waits for the rest on the image's eventfd.
 *
 * Results: librbd completes a read with its byte count, a write,
 * write-zeroes or flush with 0 -- a write then counts as all of its bytes.
 * A request to an OSD or monitor that does not answer within the image's
 * timeout (rados_osd_op_timeout) fails with -ETIMEDOUT, reported as -EIO
 * (the request may still have been applied: EIO means "unknown", as a SCSI
 * timeout does); from then on the image is taken for down until its
 * prober gets an answer (cxl_rbd_admit).  A discard does not promise zeros (it is advisory below
 * the object's granularity): zeroing is always rbd_write_zeroes.
 */
#ifndef CXLFLASH_RBD_H
#define CXLFLASH_RBD_H

#include <poll.h>
#include <rbd/librbd.h>
#include "backend.h"
#include "store.h"

#define CXL_REAP_MAX 64          /* completions taken per rbd_poll_io_events */

typedef struct cxl_rbd_be cxl_rbd_be;

/* How long a request that arrives during an outage waits for the prober's
 * answer before it fails (cxl_rbd_admit). */
#define CXL_RBD_GRACE_NS 1000000000LL

typedef struct cxl_rbd_parked {
    cxl_io io;              /* len: clipped to the image */
    int64_t deadline;       /* cxl_rbd_now_ns() */
} cxl_rbd_parked;

typedef struct cxl_rbd {
    cxl_store st;           /* st.fd: the image's completion eventfd */
    rados_t cluster;
    rados_ioctx_t ioctx;
    rbd_image_t image;
    cxl_rbd_be *be;         /* the backend of its engine, once made */
    /* An outage (cxl_rbd_admit): the last answer was a timeout. */
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* the outage ended */
    int down;
    int probing;            /* the prober thread runs */
    int closing;
    pthread_t prober;
    cxl_rbd_parked *parked; /* aio requests waiting for the end of the outage */
    int nparked, capparked;
} cxl_rbd;

static void cxl_rbd_init(cxl_rbd *d)
{
    pthread_condattr_t ca;
    pthread_mutex_init(&d->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&d->cv, &ca);
    pthread_condattr_destroy(&ca);
}

static inline int64_t cxl_rbd_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A failure as the data path reports it. */
static inline int64_t cxl_rbd_err(int64_t r)
{
    if (r == -ETIMEDOUT || r == -ESHUTDOWN || r == -ENOTCONN)
        return -EIO;        /* timed out; or this client was blocklisted */
    return r;
}

/* ``*len`` clipped to the image's end: 0, or 1 when ``off`` is at or past it. */
static int cxl_rbd_clip(cxl_rbd *d, uint64_t off, uint64_t *len, int64_t *err)
{
    uint64_t size;
    int r = rbd_get_size(d->image, &size);
    if (r < 0) {
        *err = cxl_rbd_err(r);
        return -1;
    }
    if (off >= size)
        return 1;
    if (*len > size - off)
        *len = size - off;
    return 0;
}

/* Once a request timed out, the image is taken for down, and a prober
 * thread reads its first block, again and again, until an answer that is
 * not a timeout comes -- the outage ends then, within a round trip of the
 * cluster's return.  Meanwhile a new request waits for that answer at
 * most CXL_RBD_GRACE_NS, then fails with EIO: a list of thousands fails
 * in about thousands / depth seconds, not in as many timeouts, and a
 * request sent as the cluster comes back does not fail.  Requests already
 * sent each end in their own timeout.  (An outage of one OSD among many:
 * the probe may reach another, and requests to the one that is down then
 * time out one by one.) */

static void cxl_rbd_release_parked(cxl_rbd *d, cxl_rbd_parked *p, int n, int go);

/* The synchronous path: 1 to go, 0 to fail (the outage outlasted the grace). */
static int cxl_rbd_admit(cxl_rbd *d)
{
    struct timespec ts;
    int64_t deadline;
    int ok;
    if (!__atomic_load_n(&d->down, __ATOMIC_ACQUIRE))
        return 1;
    deadline = cxl_rbd_now_ns() + CXL_RBD_GRACE_NS;
    ts.tv_sec = (time_t) (deadline / 1000000000LL);
    ts.tv_nsec = (long) (deadline % 1000000000LL);
    pthread_mutex_lock(&d->mu);
    while (d->down && !d->closing)
        if (pthread_cond_timedwait(&d->cv, &d->mu, &ts) == ETIMEDOUT)
            break;
    ok = !d->down;
    pthread_mutex_unlock(&d->mu);
    return ok;
}

/* The outage is over (``mu`` held): wake the waiters, hand back the parked. */
static cxl_rbd_parked *cxl_rbd_up_locked(cxl_rbd *d, int *n)
{
    cxl_rbd_parked *p = d->parked;
    __atomic_store_n(&d->down, 0, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&d->cv);
    *n = d->nparked;
    d->parked = NULL;
    d->nparked = d->capparked = 0;
    return p;
}

static void *cxl_rbd_probe_main(void *arg)
{
    cxl_rbd *d = (cxl_rbd *) arg;
    cxl_rbd_parked *p = NULL;
    char buf[512];
    ssize_t r;
    int n = 0;
    for (;;) {
        r = rbd_read2(d->image, 0, sizeof buf, buf, 0);
        pthread_mutex_lock(&d->mu);
        if (r != -ETIMEDOUT || d->closing) {
            if (r != -ETIMEDOUT)
                p = cxl_rbd_up_locked(d, &n);
            d->probing = 0;
            pthread_mutex_unlock(&d->mu);
            cxl_rbd_release_parked(d, p, n, 1);
            return NULL;
        }
        pthread_mutex_unlock(&d->mu);
    }
}

/* Note a request's answer from librbd: a timeout starts an outage (and
 * its prober), any other answer ends one. */
static inline void cxl_rbd_answered(cxl_rbd *d, int64_t r)
{
    pthread_attr_t ta;
    cxl_rbd_parked *p;
    int n = 0;
    if (r != -ETIMEDOUT) {
        if (!__atomic_load_n(&d->down, __ATOMIC_ACQUIRE))
            return;
        pthread_mutex_lock(&d->mu);
        p = cxl_rbd_up_locked(d, &n);
        pthread_mutex_unlock(&d->mu);
        cxl_rbd_release_parked(d, p, n, 1);
        return;
    }
    pthread_mutex_lock(&d->mu);
    __atomic_store_n(&d->down, 1, __ATOMIC_RELEASE);
    if (!d->probing && !d->closing) {
        if (d->prober)
            pthread_join(d->prober, NULL);  /* the last one has ended */
        pthread_attr_init(&ta);
        pthread_attr_setstacksize(&ta, 256 * 1024);
        if (pthread_create(&d->prober, &ta, cxl_rbd_probe_main, d) == 0)
            d->probing = 1;
        else
            d->prober = 0;
        pthread_attr_destroy(&ta);
    }
    pthread_mutex_unlock(&d->mu);
}

/* Before closing the image (its engine closed: nothing parked): no prober
 * runs after this. */
static void cxl_rbd_fini(cxl_rbd *d)
{
    pthread_t t;
    pthread_mutex_lock(&d->mu);
    d->closing = 1;
    pthread_cond_broadcast(&d->cv);
    t = d->prober;
    d->prober = 0;
    pthread_mutex_unlock(&d->mu);
    if (t)
        pthread_join(t, NULL);              /* within one timeout */
    pthread_mutex_destroy(&d->mu);
    pthread_cond_destroy(&d->cv);
    free(d->parked);
}

/* -- the store: the synchronous data path ---------------------------------------- */

static int64_t cxl_rbd_rw(cxl_store *s, int write, char *buf, uint64_t len, uint64_t off)
{
    cxl_rbd *d = (cxl_rbd *) s;
    int64_t err = 0;
    ssize_t r;
    int c = cxl_rbd_clip(d, off, &len, &err);
    if (c)
        return c < 0 ? err : 0;
    if (len > (1u << 30))
        len = 1u << 30;
    if (!cxl_rbd_admit(d))
        return -EIO;
    r = write ? rbd_write2(d->image, off, len, buf, 0) : rbd_read2(d->image, off, len, buf, 0);
    cxl_rbd_answered(d, r);
    if (r < 0)
        return cxl_rbd_err(r);
    return write && r == 0 ? (int64_t) len : (int64_t) r;
}

static int cxl_rbd_zero(cxl_store *s, uint64_t off, uint64_t len)
{
    cxl_rbd *d = (cxl_rbd *) s;
    int64_t err = 0;
    ssize_t r;
    uint64_t n;
    while (len) {
        n = len;
        int c = cxl_rbd_clip(d, off, &n, &err);
        if (c)
            return c < 0 ? (int) err : -EIO;    /* zeros past the end: cannot */
        if (n > (1u << 30))
            n = 1u << 30;
        if (!cxl_rbd_admit(d))
            return -EIO;
        r = rbd_write_zeroes(d->image, off, n, 0, 0);
        cxl_rbd_answered(d, r);
        if (r < 0)
            return (int) cxl_rbd_err(r);
        off += n;
        len -= n;
    }
    return 0;
}

static int cxl_rbd_flush(cxl_store *s)
{
    cxl_rbd *d = (cxl_rbd *) s;
    int r;
    if (!cxl_rbd_admit(d))
        return -EIO;
    r = rbd_flush(d->image);
    cxl_rbd_answered(d, r);
    return r < 0 ? (int) cxl_rbd_err(r) : 0;
}

static int64_t cxl_rbd_size(cxl_store *s)
{
    uint64_t size;
    int r = rbd_get_size(((cxl_rbd *) s)->image, &size);
    return r < 0 ? cxl_rbd_err(r) : (int64_t) size;
}

/* -- the backend: librbd's aio calls ------------------------------------------- */

typedef struct cxl_rbd_op {
    cxl_rbd_be *b;
    void *tag;
    uint64_t len;
    int op;
} cxl_rbd_op;

struct cxl_rbd_be {
    cxl_backend be;
    cxl_rbd *d;
    int nfd;                /* the completer's: written by callbacks when armed */
    int wfd;                /* wake() */
    int armed;
    uint64_t called;        /* callbacks called */
    uint64_t reaped;        /* completions taken from rbd_poll_io_events */
    pthread_mutex_t mu;     /* the completions made at submission */
    cxl_cqe *now;
    int nnow, capnow;
};

static void cxl_rbd_callback(rbd_completion_t c, void *arg)
{
    cxl_rbd_be *b = ((cxl_rbd_op *) arg)->b;
    uint64_t one = 1;
    (void) c;
    __atomic_add_fetch(&b->called, 1, __ATOMIC_ACQ_REL);
    if (__atomic_load_n(&b->armed, __ATOMIC_ACQUIRE) &&
            write(b->nfd, &one, sizeof one) < 0) { /* readable anyway */ }
}

/* A completion made at submission (past the image's end, or a NOP). */
static int cxl_rbd_post_now(cxl_rbd_be *b, void *tag, int64_t res)
{
    cxl_cqe *p;
    uint64_t one = 1;
    pthread_mutex_lock(&b->mu);
    if (b->nnow == b->capnow) {
        p = (cxl_cqe *) realloc(b->now, (size_t) (b->capnow ? b->capnow * 2 : 16) * sizeof *p);
        if (p == NULL) {
            pthread_mutex_unlock(&b->mu);
            return -ENOMEM;
        }
        b->now = p;
        b->capnow = b->capnow ? b->capnow * 2 : 16;
    }
    b->now[b->nnow].tag = tag;
    b->now[b->nnow].res = res;
    b->nnow++;
    pthread_mutex_unlock(&b->mu);
    if (write(b->wfd, &one, sizeof one) < 0) { /* readable anyway */ }
    if (__atomic_load_n(&b->armed, __ATOMIC_ACQUIRE) &&
            write(b->nfd, &one, sizeof one) < 0) { /* readable anyway */ }
    return 0;
}

/* During an outage, keep a request until it ends or the grace passes:
 * 1 kept, 0 go, -errno. */
static int cxl_rbd_park(cxl_rbd *d, const cxl_io *io, uint64_t len)
{
    cxl_rbd_parked *p;
    int rc = 0;
    if (!__atomic_load_n(&d->down, __ATOMIC_ACQUIRE))
        return 0;
    pthread_mutex_lock(&d->mu);
    if (d->down) {
        if (d->nparked == d->capparked) {
            p = (cxl_rbd_parked *) realloc(d->parked, (size_t) (d->capparked ?
                                           d->capparked * 2 : 64) * sizeof *p);
            if (p == NULL) {
                pthread_mutex_unlock(&d->mu);
                return -ENOMEM;
            }
            d->parked = p;
            d->capparked = d->capparked ? d->capparked * 2 : 64;
        }
        d->parked[d->nparked].io = *io;
        d->parked[d->nparked].io.len = len;
        d->parked[d->nparked].deadline = cxl_rbd_now_ns() + CXL_RBD_GRACE_NS;
        d->nparked++;
        rc = 1;
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

static int cxl_rbd_submit_now(cxl_rbd_be *b, const cxl_io *io, uint64_t len);

/* Parked requests: given to librbd (``go``), or failed with EIO. */
static void cxl_rbd_release_parked(cxl_rbd *d, cxl_rbd_parked *p, int n, int go)
{
    int i;
    for (i = 0; i < n; i++)
        if (!go || cxl_rbd_submit_now(d->be, &p[i].io, p[i].io.len) != 0)
            cxl_rbd_post_now(d->be, p[i].io.tag, -EIO);
    free(p);
}

/* Fail the parked requests whose grace has passed; the ms until the next
 * one's (-1: none parked). */
static int cxl_rbd_expire(cxl_rbd *d)
{
    cxl_rbd_parked *late = NULL;
    int64_t now, next = -1;
    int i, j = 0, nlate = 0;
    if (__atomic_load_n(&d->nparked, __ATOMIC_ACQUIRE) == 0)
        return -1;
    now = cxl_rbd_now_ns();
    pthread_mutex_lock(&d->mu);
    for (i = 0; i < d->nparked; i++) {
        if (d->parked[i].deadline <= now) {
            if (late == NULL)
                late = (cxl_rbd_parked *) malloc((size_t) d->nparked * sizeof *late);
            if (late != NULL) {
                late[nlate++] = d->parked[i];
                continue;
            }
        }
        if (next < 0 || d->parked[i].deadline < next)
            next = d->parked[i].deadline;
        d->parked[j++] = d->parked[i];
    }
    d->nparked = j;
    pthread_mutex_unlock(&d->mu);
    if (nlate)
        cxl_rbd_release_parked(d, late, nlate, 0);
    else
        free(late);
    return next < 0 ? -1 : (int) ((next - now) / 1000000 + 1);
}

static int cxl_rbd_submit(cxl_backend *be, const cxl_io *io)
{
    cxl_rbd_be *b = (cxl_rbd_be *) be;
    cxl_rbd *d = b->d;
    uint64_t len = io->len;
    int64_t err = 0;
    int r, clip;
    if (io->op == CXL_OP_NOP)
        return cxl_rbd_post_now(b, io->tag, 0);
    if (io->op != CXL_OP_FLUSH) {
        clip = cxl_rbd_clip(d, io->offset, &len, &err);
        if (clip < 0)
            return (int) err;
        if (clip)           /* at the end: a read or write ends there */
            return cxl_rbd_post_now(b, io->tag, io->op == CXL_OP_READ ||
                                    io->op == CXL_OP_WRITE ? 0 : -EIO);
    }
    r = cxl_rbd_park(d, io, len);           /* an outage: wait for its end */
    if (r != 0)
        return r < 0 ? r : 0;
    return cxl_rbd_submit_now(b, io, len);
}

/* Give one request to librbd: 0 or -errno. */
static int cxl_rbd_submit_now(cxl_rbd_be *b, const cxl_io *io, uint64_t len)
{
    cxl_rbd *d = b->d;
    rbd_completion_t c;
    cxl_rbd_op *op;
    int r;
    op = (cxl_rbd_op *) malloc(sizeof *op);
    if (op == NULL)
        return -ENOMEM;
    op->b = b;
    op->tag = io->tag;
    op->len = len;
    op->op = io->op;
    r = rbd_aio_create_completion(op, cxl_rbd_callback, &c);
    if (r < 0) {
        free(op);
        return r;
    }
    switch (io->op) {
    case CXL_OP_READ:
        r = rbd_aio_read(d->image, io->offset, len, io->buf, c);
        break;
    case CXL_OP_WRITE:
        r = rbd_aio_write(d->image, io->offset, len, io->buf, c);
        break;
    case CXL_OP_FLUSH:
        r = rbd_aio_flush(d->image, c);
        break;
    case CXL_OP_ZERO:
    case CXL_OP_DISCARD:
        r = rbd_aio_write_zeroes(d->image, io->offset, len, c, 0, 0);
        break;
    default:
        r = -EINVAL;
    }
    if (r < 0) {
        rbd_aio_release(c);
        free(op);
        return (int) cxl_rbd_err(r);
    }
    return 0;
}

static int cxl_rbd_kick(cxl_backend *be)
{
    (void) be;              /* librbd starts each request at submission */
    return 0;
}

static int cxl_rbd_reap(cxl_backend *be, cxl_cqe *out, int max, int wait_ms)
{
    cxl_rbd_be *b = (cxl_rbd_be *) be;
    rbd_completion_t comps[CXL_REAP_MAX];
    struct pollfd p[2];
    cxl_rbd_op *op;
    uint64_t v;
    int64_t res;
    int n, k, i, wait, next_ms;
    for (;;) {
        if (read(b->d->st.fd, &v, sizeof v) < 0) { /* nothing new: fine */ }
        next_ms = cxl_rbd_expire(b->d);     /* parked past their grace: now */
        n = 0;
        pthread_mutex_lock(&b->mu);
        while (b->nnow && n < max)
            out[n++] = b->now[--b->nnow];
        pthread_mutex_unlock(&b->mu);
        while (n < max) {
            k = rbd_poll_io_events(b->d->image, comps,
                                   max - n < CXL_REAP_MAX ? max - n : CXL_REAP_MAX);
            if (k <= 0)
                break;
            __atomic_add_fetch(&b->reaped, (uint64_t) k, __ATOMIC_ACQ_REL);
            for (i = 0; i < k; i++) {
                op = (cxl_rbd_op *) rbd_aio_get_arg(comps[i]);
                res = rbd_aio_get_return_value(comps[i]);
                rbd_aio_release(comps[i]);
                cxl_rbd_answered(b->d, res);
                if (res >= 0)
                    res = op->op == CXL_OP_READ ? res :
                          op->op == CXL_OP_FLUSH ? 0 : (int64_t) op->len;
                else
                    res = cxl_rbd_err(res);
                out[n].tag = op->tag;
                out[n].res = res;
                n++;
                free(op);
            }
        }
        if (n)
            return n;
        wait = wait_ms;
        if (wait == 0) {
            /* a callback ran, its completion is about to be queued */
            if (__atomic_load_n(&b->called, __ATOMIC_ACQUIRE) ==
                    __atomic_load_n(&b->reaped, __ATOMIC_ACQUIRE))
                return 0;
            wait = 10;
            wait_ms = -2;               /* once */
        } else if (wait == -2) {
            return 0;
        }
        if (next_ms >= 0 && (wait < 0 || wait > next_ms))
            wait = next_ms;                 /* back when a parked one's grace ends */
        p[0].fd = b->d->st.fd;
        p[1].fd = b->wfd;
        p[0].events = p[1].events = POLLIN;
        p[0].revents = p[1].revents = 0;
        k = poll(p, 2, wait);
        if (k < 0 && errno != EINTR)
            return -errno;
        if (k == 0)
            return 0;
        if (p[1].revents & POLLIN) {
            if (read(b->wfd, &v, sizeof v) < 0) { /* drained meanwhile */ }
            pthread_mutex_lock(&b->mu);
            k = b->nnow;
            pthread_mutex_unlock(&b->mu);
            if (k == 0)
                return 0;               /* woken */
        }
        if (wait_ms > 0)
            wait_ms = 0;                /* one wait: take what came */
    }
}

static int cxl_rbd_notify_fd(cxl_backend *be)
{
    return ((cxl_rbd_be *) be)->nfd;
}

static void cxl_rbd_set_notify(cxl_backend *be, int on)
{
    cxl_rbd_be *b = (cxl_rbd_be *) be;
    uint64_t one = 1;
    __atomic_store_n(&b->armed, on, __ATOMIC_RELEASE);
    if (on && write(b->nfd, &one, sizeof one) < 0) { /* look once: readable anyway */ }
}

static void cxl_rbd_wake(cxl_backend *be)
{
    uint64_t one = 1;
    if (write(((cxl_rbd_be *) be)->wfd, &one, sizeof one) < 0) { /* readable anyway */ }
}

static int64_t cxl_rbd_be_size(cxl_backend *be, const cxl_target *t)
{
    (void) t;
    return cxl_rbd_size(&((cxl_rbd_be *) be)->d->st);
}

static int64_t cxl_rbd_be_block_size(cxl_backend *be, const cxl_target *t)
{
    (void) be;
    (void) t;
    return 512;
}

static void cxl_rbd_be_destroy(cxl_backend *be)
{
    cxl_rbd_be *b = (cxl_rbd_be *) be;
    if (b->d->be == b)
        b->d->be = NULL;
    close(b->nfd);
    close(b->wfd);
    pthread_mutex_destroy(&b->mu);
    free(b->now);
    free(b);
}

static const cxl_backend_ops cxl_rbd_be_ops = {
    "rbd", cxl_rbd_submit, NULL, cxl_rbd_kick, cxl_rbd_reap, cxl_rbd_notify_fd,
    cxl_rbd_set_notify, cxl_rbd_wake, cxl_rbd_be_size, cxl_rbd_be_block_size,
    cxl_rbd_be_destroy
};

/* The backend of the image's engine (one per image: the image's event
 * queue has one reader). */
static struct cxl_backend *cxl_rbd_backend_new(cxl_store *s, long depth)
{
    cxl_rbd *d = (cxl_rbd *) s;
    cxl_rbd_be *b;
    (void) depth;
    if (d->be != NULL) {
        errno = EBUSY;
        return NULL;
    }
    b = (cxl_rbd_be *) calloc(1, sizeof *b);
    if (b == NULL)
        return NULL;
    b->be.ops = &cxl_rbd_be_ops;
    b->d = d;
    pthread_mutex_init(&b->mu, NULL);
    b->nfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    b->wfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (b->nfd < 0 || b->wfd < 0) {
        if (b->nfd >= 0)
            close(b->nfd);
        if (b->wfd >= 0)
            close(b->wfd);
        free(b);
        return NULL;
    }
    d->be = b;
    return &b->be;
}

static const cxl_store_ops cxl_rbd_store_ops = {
    "rbd", cxl_rbd_rw, cxl_rbd_zero, cxl_rbd_flush, cxl_rbd_size, cxl_rbd_backend_new
};

#endif
