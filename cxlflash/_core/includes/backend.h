/* The backend interface below the asynchronous I/O engine, and the two
 * backends of file descriptors (files, block devices, memfd): io_uring
 * and a pthread worker pool.
 *
 * A backend takes operations on byte ranges of a store -- read, write,
 * flush, write-zeroes, discard -- each with a tag, and reports their
 * completions (tag, result) when reaped.  It knows nothing of handles,
 * LXTs or requests: the engine (engine.h) translates and checks before
 * anything reaches it, and resubmits the rest of a short transfer.  A
 * store that is not a file descriptor (an RBD image through librbd's
 * aio calls, an NBD export through libnbd) is one more implementation of
 * cxl_backend_ops, addressed through cxl_target.obj.
 *
 * Threads: submit() and kick() may be called from any thread (each
 * backend serialises them itself); reap() is called by one thread at a
 * time (the engine's reap mutex).
 */
#ifndef CXLFLASH_BACKEND_H
#define CXLFLASH_BACKEND_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/falloc.h>
#include <linux/fs.h>

#ifdef CXLFLASH_HAVE_LIBURING
#include <liburing.h>
#endif
#include "store.h"

enum {
    CXL_OP_READ = 1,
    CXL_OP_WRITE = 2,
    CXL_OP_FLUSH = 3,       /* fdatasync */
    CXL_OP_ZERO = 4,        /* write zeroes (reads back as zeros) */
    CXL_OP_DISCARD = 5,     /* discard; here it also reads back as zeros */
    CXL_OP_NOP = 6          /* internal: wakes a reaper */
};

/* How a store zeroes a range (datapath.pxd's ZERO_* values). */
enum { CXL_ZERO_PUNCH = 0, CXL_ZERO_BLKZEROOUT = 1, CXL_ZERO_WRITE = 2 };

/* Where an operation goes: a file descriptor, or an object of a backend
 * that is not one. */
typedef struct cxl_target {
    int fd;
    int zero_mode;
    int nowait;             /* CXL_NOWAIT_*: how try_now may run it */
    void *obj;
} cxl_target;

/* Whether an operation on an fd can complete in the submitter without
 * blocking on a device (cxl_fd_nowait_class tells). */
enum {
    CXL_NOWAIT_NEVER = 0,   /* O_DIRECT, or unknown: always queue it */
    CXL_NOWAIT_CACHED = 1,  /* page cache: try with RWF_NOWAIT */
    CXL_NOWAIT_MEMORY = 2   /* tmpfs, memfd, hugetlbfs: memory, never a device */
};

typedef struct cxl_io {
    int op;
    cxl_target target;
    uint64_t offset;        /* bytes */
    uint64_t len;           /* bytes */
    char *buf;
    void *tag;              /* reported back by reap; never NULL */
} cxl_io;

typedef struct cxl_cqe {
    void *tag;
    int64_t res;            /* bytes transferred (>= 0) or -errno */
} cxl_cqe;

typedef struct cxl_backend cxl_backend;

typedef struct cxl_backend_ops {
    const char *name;
    /* Queue one operation: 0, or -errno (-EAGAIN: no room, reap first). */
    int (*submit)(cxl_backend *be, const cxl_io *io);
    /* Optional (NULL): run a read or write now if it can complete without
     * blocking -- bytes done (maybe fewer than asked), or -errno (-EAGAIN:
     * it would block; submit it). */
    int64_t (*try_now)(cxl_backend *be, const cxl_io *io);
    /* Start what submit queued. */
    int (*kick)(cxl_backend *be);
    /* Up to ``max`` completions; with ``wait``, block until there is one
     * (or ``wait`` ms pass, or wake() is called): the count, or -errno. */
    int (*reap)(cxl_backend *be, cxl_cqe *out, int max, int wait_ms);
    /* An fd that becomes readable when completions may be waiting -- once
     * set_notify(1) has armed it: with nobody but the reaping threads
     * interested, it stays quiet (set_notify(0)) and wakes nobody. */
    int (*notify_fd)(cxl_backend *be);
    void (*set_notify)(cxl_backend *be, int on);
    /* Make a reap blocked in another thread return. */
    void (*wake)(cxl_backend *be);
    /* The store's size in bytes and logical block size; -errno. */
    int64_t (*size)(cxl_backend *be, const cxl_target *t);
    int64_t (*block_size)(cxl_backend *be, const cxl_target *t);
    /* Stop and free.  Nothing may be in flight. */
    void (*destroy)(cxl_backend *be);
} cxl_backend_ops;

struct cxl_backend {
    const cxl_backend_ops *ops;
};

/* -- what every fd backend shares ----------------------------------------- */

static int64_t cxl_fd_size(cxl_backend *be, const cxl_target *t)
{
    struct stat st;
    uint64_t n;
    (void) be;
    if (fstat(t->fd, &st) != 0)
        return -errno;
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(t->fd, BLKGETSIZE64, &n) != 0)
            return -errno;
        return (int64_t) n;
    }
    return st.st_size;
}

static int64_t cxl_fd_block_size(cxl_backend *be, const cxl_target *t)
{
    struct stat st;
    int n;
    (void) be;
    if (fstat(t->fd, &st) != 0)
        return -errno;
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(t->fd, BLKSSZGET, &n) != 0)
            return -errno;
        return n;
    }
    return 512;
}

#include <sys/statfs.h>
#include <sys/uio.h>
#include <sys/syscall.h>
#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif
#define CXL_TMPFS_MAGIC 0x01021994
#define CXL_HUGETLBFS_MAGIC 0x958458f6

/* How an fd's reads and writes may run in the submitter (CXL_NOWAIT_*). */
static int cxl_fd_nowait_class(int fd)
{
    struct stat st;
    struct statfs sf;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_DIRECT) || fstat(fd, &st) != 0)
        return CXL_NOWAIT_NEVER;
    if (S_ISREG(st.st_mode) && fstatfs(fd, &sf) == 0 &&
            ((unsigned long) sf.f_type == CXL_TMPFS_MAGIC ||
             (unsigned long) sf.f_type == CXL_HUGETLBFS_MAGIC))
        return CXL_NOWAIT_MEMORY;
    if (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode))
        return CXL_NOWAIT_CACHED;
    return CXL_NOWAIT_NEVER;
}

/* try_now of the fd backends: page-cache hits and memory stores complete
 * here, at pread's cost; anything that would wait for a device is left
 * to the queue (-EAGAIN). */
static int64_t cxl_fd_try_now(cxl_backend *be, const cxl_io *io)
{
    struct iovec iov;
    ssize_t r;
    (void) be;
    if (io->op != CXL_OP_READ && io->op != CXL_OP_WRITE)
        return -EAGAIN;
    if (io->target.nowait == CXL_NOWAIT_MEMORY) {
        if (io->op == CXL_OP_WRITE)
            r = pwrite(io->target.fd, io->buf, io->len, (off_t) io->offset);
        else
            r = pread(io->target.fd, io->buf, io->len, (off_t) io->offset);
    } else if (io->target.nowait == CXL_NOWAIT_CACHED) {
        /* the system call itself: glibc's wrapper is a cancellation
         * point, which costs more than the page-cache copy saves */
        iov.iov_base = io->buf;
        iov.iov_len = io->len;
        r = syscall(io->op == CXL_OP_WRITE ? SYS_pwritev2 : SYS_preadv2,
                    io->target.fd, &iov, 1, (unsigned long) io->offset,
                    (unsigned long) 0, RWF_NOWAIT);
    } else {
        return -EAGAIN;
    }
    return r < 0 ? -errno : r;
}

/* One pread/pwrite: bytes or -errno (EINTR included: the engine retries). */
static int64_t cxl_fd_rw(const cxl_io *io)
{
    ssize_t r;
    if (io->op == CXL_OP_WRITE)
        r = pwrite(io->target.fd, io->buf, io->len, (off_t) io->offset);
    else
        r = pread(io->target.fd, io->buf, io->len, (off_t) io->offset);
    return r < 0 ? -errno : r;
}

/* Zero a byte range as the store zeroes it (punched holes in files,
 * BLKZEROOUT / BLKDISCARD on block devices), falling back to writing
 * zeros: the length, or -errno. */
static int64_t cxl_fd_zero(const cxl_io *io)
{
    static const char zeros[65536];
    uint64_t rng[2], done = 0, n;
    ssize_t r;
    int fd = io->target.fd;
    if (io->len == 0)
        return 0;
    if (io->target.zero_mode == CXL_ZERO_PUNCH) {
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t) io->offset, (off_t) io->len) == 0)
            return (int64_t) io->len;
        if (errno != EOPNOTSUPP)
            return -errno;
    } else if (io->target.zero_mode == CXL_ZERO_BLKZEROOUT) {
        rng[0] = io->offset;
        rng[1] = io->len;
        if (ioctl(fd, BLKZEROOUT, rng) == 0)
            return (int64_t) io->len;
        if (errno != EOPNOTSUPP && errno != EINVAL)
            return -errno;
    }
    while (done < io->len) {
        n = io->len - done < sizeof zeros ? io->len - done : sizeof zeros;
        r = pwrite(fd, zeros, n, (off_t) (io->offset + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        done += (uint64_t) r;
    }
    return (int64_t) io->len;
}

/* One operation on a store that is not a file (target.obj, store.h). */
static int64_t cxl_store_run(const cxl_io *io)
{
    cxl_store *st = (cxl_store *) io->target.obj;
    int r;
    switch (io->op) {
    case CXL_OP_READ:
    case CXL_OP_WRITE:
        return st->ops->rw(st, io->op == CXL_OP_WRITE, io->buf, io->len, io->offset);
    case CXL_OP_FLUSH:
        return st->ops->flush(st);
    case CXL_OP_ZERO:
    case CXL_OP_DISCARD:
        r = st->ops->zero(st, io->offset, io->len);
        return r < 0 ? r : (int64_t) io->len;
    case CXL_OP_NOP:
        return 0;
    }
    return -EINVAL;
}

/* Run one operation in the calling thread: bytes or -errno. */
static int64_t cxl_fd_run(const cxl_io *io)
{
    if (io->target.obj != NULL)
        return cxl_store_run(io);
    switch (io->op) {
    case CXL_OP_READ:
    case CXL_OP_WRITE:
        return cxl_fd_rw(io);
    case CXL_OP_FLUSH:
        return fdatasync(io->target.fd) == 0 ? 0 : -errno;
    case CXL_OP_ZERO:
    case CXL_OP_DISCARD:
        return cxl_fd_zero(io);
    case CXL_OP_NOP:
        return 0;
    }
    return -EINVAL;
}

static void cxl_timeout_at(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long) (ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* -- the pthread worker pool ------------------------------------------------ */

typedef struct cxl_pool_item {
    cxl_io io;
    int64_t res;
    struct cxl_pool_item *next;
} cxl_pool_item;

typedef struct cxl_pool {
    cxl_backend be;
    pthread_mutex_t mu;
    pthread_cond_t work_cv;         /* workers wait for work */
    pthread_cond_t done_cv;         /* a reaper waits for completions */
    cxl_pool_item *todo_head, *todo_tail;
    cxl_pool_item *done_head, *done_tail;
    cxl_pool_item *free_list;
    int woken;
    int stopping;
    int nworkers;           /* started so far */
    int maxworkers;
    int idle;               /* waiting for work */
    int notify;             /* write efd on completions (set_notify) */
    int reapers;            /* waiting in reap for done_cv */
    int efd;
    pthread_attr_t attr;
    pthread_t *workers;
} cxl_pool;

static void *cxl_pool_main(void *arg)
{
    cxl_pool *p = (cxl_pool *) arg;
    cxl_pool_item *it;
    int was_empty;
    uint64_t one = 1;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->todo_head == NULL && !p->stopping) {
            p->idle++;
            pthread_cond_wait(&p->work_cv, &p->mu);
            p->idle--;
        }
        if (p->todo_head == NULL)
            break;
        it = p->todo_head;
        p->todo_head = it->next;
        if (p->todo_head == NULL)
            p->todo_tail = NULL;
        pthread_mutex_unlock(&p->mu);
        it->res = cxl_fd_run(&it->io);
        it->next = NULL;
        pthread_mutex_lock(&p->mu);
        was_empty = p->done_head == NULL;
        if (p->done_tail)
            p->done_tail->next = it;
        else
            p->done_head = it;
        p->done_tail = it;
        if (was_empty) {
            if (p->reapers)
                pthread_cond_signal(&p->done_cv);
            if (__atomic_load_n(&p->notify, __ATOMIC_ACQUIRE) &&
                    write(p->efd, &one, sizeof one) < 0) { /* counter full: readable */ }
        }
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static int cxl_pool_submit(cxl_backend *be, const cxl_io *io)
{
    cxl_pool *p = (cxl_pool *) be;
    cxl_pool_item *it;
    pthread_mutex_lock(&p->mu);
    it = p->free_list;
    if (it)
        p->free_list = it->next;
    pthread_mutex_unlock(&p->mu);
    if (it == NULL && (it = (cxl_pool_item *) malloc(sizeof *it)) == NULL)
        return -ENOMEM;
    it->io = *io;
    it->next = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->todo_tail)
        p->todo_tail->next = it;
    else
        p->todo_head = it;
    p->todo_tail = it;
    /* Workers are started as the queue deepens, up to maxworkers: as
     * many operations block in the kernel at once as are waiting. */
    if (p->idle == 0 && p->nworkers < p->maxworkers &&
            pthread_create(&p->workers[p->nworkers], &p->attr, cxl_pool_main, p) == 0)
        p->nworkers++;
    pthread_cond_signal(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    return 0;
}

static int cxl_pool_kick(cxl_backend *be)
{
    (void) be;
    return 0;
}

static int cxl_pool_reap(cxl_backend *be, cxl_cqe *out, int max, int wait_ms)
{
    cxl_pool *p = (cxl_pool *) be;
    cxl_pool_item *it, *done = NULL, *last = NULL;
    struct timespec ts;
    int n = 0;
    pthread_mutex_lock(&p->mu);
    if (p->done_head == NULL && wait_ms > 0 && !p->woken) {
        cxl_timeout_at(&ts, wait_ms);
        p->reapers++;
        while (p->done_head == NULL && !p->woken)
            if (pthread_cond_timedwait(&p->done_cv, &p->mu, &ts) != 0)
                break;
        p->reapers--;
    }
    p->woken = 0;
    while (n < max && (it = p->done_head) != NULL) {
        p->done_head = it->next;
        if (p->done_head == NULL)
            p->done_tail = NULL;
        out[n].tag = it->io.tag;
        out[n].res = it->res;
        n++;
        it->next = NULL;
        if (last)
            last->next = it;
        else
            done = it;
        last = it;
    }
    if (last) {
        last->next = p->free_list;
        p->free_list = done;
    }
    pthread_mutex_unlock(&p->mu);
    return n;
}

static int cxl_pool_notify_fd(cxl_backend *be)
{
    return ((cxl_pool *) be)->efd;
}

static void cxl_pool_set_notify(cxl_backend *be, int on)
{
    cxl_pool *p = (cxl_pool *) be;
    uint64_t one = 1;
    int had;
    pthread_mutex_lock(&p->mu);
    __atomic_store_n(&p->notify, on, __ATOMIC_RELEASE);
    had = p->done_head != NULL;
    pthread_mutex_unlock(&p->mu);
    if (on && had && write(p->efd, &one, sizeof one) < 0) { /* readable anyway */ }
}

static void cxl_pool_wake(cxl_backend *be)
{
    cxl_pool *p = (cxl_pool *) be;
    pthread_mutex_lock(&p->mu);
    p->woken = 1;
    pthread_cond_broadcast(&p->done_cv);
    pthread_mutex_unlock(&p->mu);
}

static void cxl_pool_free_list(cxl_pool_item *it)
{
    cxl_pool_item *next;
    for (; it; it = next) {
        next = it->next;
        free(it);
    }
}

static void cxl_pool_destroy(cxl_backend *be)
{
    cxl_pool *p = (cxl_pool *) be;
    int i;
    pthread_mutex_lock(&p->mu);
    p->stopping = 1;
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    for (i = 0; i < p->nworkers; i++)
        pthread_join(p->workers[i], NULL);
    cxl_pool_free_list(p->todo_head);
    cxl_pool_free_list(p->done_head);
    cxl_pool_free_list(p->free_list);
    free(p->workers);
    close(p->efd);
    pthread_attr_destroy(&p->attr);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work_cv);
    pthread_cond_destroy(&p->done_cv);
    free(p);
}

static const cxl_backend_ops cxl_pool_ops = {
    "threads", cxl_pool_submit, cxl_fd_try_now, cxl_pool_kick, cxl_pool_reap, cxl_pool_notify_fd,
    cxl_pool_set_notify, cxl_pool_wake, cxl_fd_size, cxl_fd_block_size, cxl_pool_destroy,
};

/* A pool of up to ``nworkers`` threads (started on demand; one now, so
 * that a machine that cannot start threads says so here); NULL with
 * errno set. */
static cxl_backend *cxl_pool_new(int nworkers)
{
    cxl_pool *p = (cxl_pool *) calloc(1, sizeof *p);
    pthread_condattr_t ca;
    int rc;
    if (p == NULL)
        return NULL;
    p->be.ops = &cxl_pool_ops;
    p->maxworkers = nworkers;
    p->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->workers = (pthread_t *) calloc((size_t) nworkers, sizeof(pthread_t));
    if (p->efd < 0 || p->workers == NULL) {
        rc = p->efd < 0 ? errno : ENOMEM;
        if (p->efd >= 0)
            close(p->efd);
        free(p->workers);
        free(p);
        errno = rc;
        return NULL;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work_cv, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p->done_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_attr_init(&p->attr);
    pthread_attr_setstacksize(&p->attr, 256 * 1024);
    rc = pthread_create(&p->workers[0], &p->attr, cxl_pool_main, p);
    if (rc != 0) {
        cxl_pool_destroy(&p->be);
        errno = rc;
        return NULL;
    }
    p->nworkers = 1;
    return &p->be;
}

/* -- io_uring --------------------------------------------------------------- */

#ifdef CXLFLASH_HAVE_LIBURING

typedef struct cxl_uring {
    cxl_backend be;
    struct io_uring ring;
    pthread_mutex_t sq_mu;          /* submit and kick */
    int efd;
    unsigned pending;               /* SQEs prepared, not yet submitted */
} cxl_uring;

/* The result of an operation run at submission (zeroing), carried to its
 * completion by a NOP whose user_data points here. */
typedef struct cxl_uring_sync {
    void *tag;
    int64_t res;
} cxl_uring_sync;

#define CXL_URING_SYNC_BIT 1UL      /* user_data low bit: a cxl_uring_sync */

static int cxl_uring_flush_locked(cxl_uring *u)
{
    int r;
    if (u->pending == 0)
        return 0;
    do {
        r = io_uring_submit(&u->ring);
    } while (r == -EINTR);
    if (r < 0)
        return r;
    __atomic_store_n(&u->pending, (unsigned) r < u->pending ? u->pending - (unsigned) r : 0, __ATOMIC_RELEASE);
    return 0;
}

static struct io_uring_sqe *cxl_uring_sqe_locked(cxl_uring *u, int *err)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
    *err = 0;
    if (sqe == NULL) {
        *err = cxl_uring_flush_locked(u);
        if (*err == 0)
            sqe = io_uring_get_sqe(&u->ring);
        if (sqe == NULL && *err == 0)
            *err = -EAGAIN;
    }
    return sqe;
}

static int cxl_uring_submit(cxl_backend *be, const cxl_io *io)
{
    cxl_uring *u = (cxl_uring *) be;
    struct io_uring_sqe *sqe;
    cxl_uring_sync *sync = NULL;
    int err;
    if (io->op == CXL_OP_ZERO || io->op == CXL_OP_DISCARD) {
        /* Zeroing has no io_uring form for every kind of store (BLKZEROOUT
         * is an ioctl): run it here and post its result as a NOP. */
        sync = (cxl_uring_sync *) malloc(sizeof *sync);
        if (sync == NULL)
            return -ENOMEM;
        sync->tag = io->tag;
        sync->res = cxl_fd_zero(io);
    }
    pthread_mutex_lock(&u->sq_mu);
    sqe = cxl_uring_sqe_locked(u, &err);
    if (sqe == NULL) {
        pthread_mutex_unlock(&u->sq_mu);
        free(sync);
        return err;
    }
    switch (io->op) {
    case CXL_OP_READ:
        io_uring_prep_read(sqe, io->target.fd, io->buf, (unsigned) io->len, io->offset);
        break;
    case CXL_OP_WRITE:
        io_uring_prep_write(sqe, io->target.fd, io->buf, (unsigned) io->len, io->offset);
        break;
    case CXL_OP_FLUSH:
        io_uring_prep_fsync(sqe, io->target.fd, IORING_FSYNC_DATASYNC);
        break;
    default:
        io_uring_prep_nop(sqe);
        break;
    }
    if (sync)
        io_uring_sqe_set_data64(sqe, (uint64_t) (uintptr_t) sync | CXL_URING_SYNC_BIT);
    else
        io_uring_sqe_set_data(sqe, io->tag);
    __atomic_add_fetch(&u->pending, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&u->sq_mu);
    return 0;
}

static int cxl_uring_kick(cxl_backend *be)
{
    cxl_uring *u = (cxl_uring *) be;
    int r;
    /* Nothing queued: no lock (whoever queues next kicks, or its caller). */
    if (__atomic_load_n(&u->pending, __ATOMIC_ACQUIRE) == 0)
        return 0;
    pthread_mutex_lock(&u->sq_mu);
    r = cxl_uring_flush_locked(u);
    pthread_mutex_unlock(&u->sq_mu);
    return r;
}

static int cxl_uring_reap(cxl_backend *be, cxl_cqe *out, int max, int wait_ms)
{
    cxl_uring *u = (cxl_uring *) be;
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts;
    cxl_uring_sync *sync;
    uint64_t data;
    unsigned head;
    int n = 0, seen = 0, r;
    if (wait_ms > 0 && io_uring_cq_ready(&u->ring) == 0) {
        ts.tv_sec = wait_ms / 1000;
        ts.tv_nsec = (long long) (wait_ms % 1000) * 1000000LL;
        r = io_uring_wait_cqe_timeout(&u->ring, &cqe, &ts);
        if (r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN)
            return r;
    }
    io_uring_for_each_cqe(&u->ring, head, cqe) {
        if (n == max)
            break;
        seen++;
        data = io_uring_cqe_get_data64(cqe);
        if (data == 0)
            continue;                       /* a wake-up NOP */
        if (data & CXL_URING_SYNC_BIT) {
            sync = (cxl_uring_sync *) (uintptr_t) (data & ~CXL_URING_SYNC_BIT);
            out[n].tag = sync->tag;
            out[n].res = sync->res;
            free(sync);
        } else {
            out[n].tag = (void *) (uintptr_t) data;
            out[n].res = cqe->res;
        }
        n++;
    }
    io_uring_cq_advance(&u->ring, (unsigned) seen);
    return n;
}

static int cxl_uring_notify_fd(cxl_backend *be)
{
    return ((cxl_uring *) be)->efd;
}

static void cxl_uring_set_notify(cxl_backend *be, int on)
{
    cxl_uring *u = (cxl_uring *) be;
    uint64_t one = 1;
    io_uring_cq_eventfd_toggle(&u->ring, on ? true : false);
    /* completions posted while it was off did not signal */
    if (on && io_uring_cq_ready(&u->ring) && write(u->efd, &one, sizeof one) < 0) {
        /* readable anyway */
    }
}

static void cxl_uring_wake(cxl_backend *be)
{
    cxl_uring *u = (cxl_uring *) be;
    struct io_uring_sqe *sqe;
    int err;
    pthread_mutex_lock(&u->sq_mu);
    sqe = cxl_uring_sqe_locked(u, &err);
    if (sqe) {
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, 0);
        __atomic_add_fetch(&u->pending, 1, __ATOMIC_RELEASE);
        cxl_uring_flush_locked(u);
    }
    pthread_mutex_unlock(&u->sq_mu);
}

static void cxl_uring_destroy(cxl_backend *be)
{
    cxl_uring *u = (cxl_uring *) be;
    io_uring_queue_exit(&u->ring);
    close(u->efd);
    pthread_mutex_destroy(&u->sq_mu);
    free(u);
}

static const cxl_backend_ops cxl_uring_ops = {
    "io_uring", cxl_uring_submit, cxl_fd_try_now, cxl_uring_kick, cxl_uring_reap, cxl_uring_notify_fd,
    cxl_uring_set_notify, cxl_uring_wake, cxl_fd_size, cxl_fd_block_size, cxl_uring_destroy,
};

/* A ring of ``entries`` submission slots (twice as many completion
 * slots); NULL with errno set when the kernel refuses io_uring. */
static cxl_backend *cxl_uring_new(unsigned entries)
{
    cxl_uring *u = (cxl_uring *) calloc(1, sizeof *u);
    struct io_uring_params params;
    int r;
    if (u == NULL)
        return NULL;
    memset(&params, 0, sizeof params);
    params.flags = IORING_SETUP_CQSIZE;
    params.cq_entries = entries * 2;
    r = io_uring_queue_init_params(entries, &u->ring, &params);
    if (r < 0) {
        free(u);
        errno = -r;
        return NULL;
    }
    if (!(params.features & IORING_FEAT_NODROP)) {
        io_uring_queue_exit(&u->ring);
        free(u);
        errno = ENOSYS;             /* a kernel that can drop completions */
        return NULL;
    }
    u->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (u->efd < 0 || ((r = io_uring_register_eventfd(&u->ring, u->efd)) < 0)) {
        r = u->efd < 0 ? errno : -r;
        if (u->efd >= 0)
            close(u->efd);
        io_uring_queue_exit(&u->ring);
        free(u);
        errno = r;
        return NULL;
    }
    pthread_mutex_init(&u->sq_mu, NULL);
    u->be.ops = &cxl_uring_ops;
    io_uring_cq_eventfd_toggle(&u->ring, false);   /* until set_notify(1) */
    return &u->be;
}

#define CXL_HAVE_URING 1
#else
#define CXL_HAVE_URING 0
static cxl_backend *cxl_uring_new(unsigned entries)
{
    (void) entries;
    errno = ENOSYS;
    return NULL;
}
#endif

#endif
