/* The asynchronous I/O engine: requests in flight without the GIL.
 *
 * A request (cxl_req) is a read, write, flush, write-zeroes or discard
 * that the submitter has already checked and translated (engine.pyx,
 * under the table's read lock) into segments: byte ranges of the backing
 * store.  The engine hands the segments to a backend (backend.h),
 * collects their completions, continues short transfers, retries EINTR,
 * and, when the last segment of a request is done, finishes it: the
 * table's in-flight count drops, and the request is posted to its route
 * (a cxl_queue: a listio call's own queue, the engine's queue of Python
 * futures, or an asyncio loop's queue with its eventfd).
 *
 * Reaping: whoever needs a completion reaps -- a thread waiting for its
 * requests (listio, Future.result()), a submitter right after submitting
 * (page-cache reads complete inline), a thread waiting for a table to go
 * idle, and the engine's completer thread, woken by the backend's eventfd
 * for completions nobody waits for.  One at a time (reap_mu).  Nobody
 * holds reap_mu while taking the GIL or a table lock.
 *
 * Lock order: reap_mu, then mu, then a queue's mu; a backend's own locks
 * are innermost.
 */
#ifndef CXLFLASH_ENGINE_H
#define CXLFLASH_ENGINE_H

#include <sched.h>
#include <stddef.h>
#include "backend.h"

#define CXL_SEG_INLINE 4
#define CXL_ROUTE_DONE ((cxl_queue *) 1)   /* finished, no route was set */
#define CXL_MAX_SEG_BYTES (1ULL << 30)  /* one backend operation at most */
#define CXL_REAP_BATCH 64
#define CXL_WAIT_MS 100                 /* a blocked reap looks up this often */

enum {
    CXL_REQ_DRAIN = 1,      /* starts after every request submitted before it */
    CXL_REQ_UNATTENDED = 2, /* a future's: nobody may wait in the engine for it,
                             * the completer thread watches the notify fd */
    CXL_REQ_LOOP = 4        /* an asyncio loop's: the loop watches the notify fd */
};

/* An error of a request besides errno values (datapath.pxd's XFER_*). */
enum {
    CXL_XFER_IN_ERROR = -2,         /* an AFU reset while it was in flight */
    CXL_XFER_BACKING_ENDED = -5     /* *bad = the byte where the store ended */
};

typedef struct cxl_req cxl_req;
typedef struct cxl_queue cxl_queue;

typedef struct cxl_seg {
    cxl_req *req;
    cxl_io io;              /* io.tag == this segment */
    uint64_t done;          /* bytes done so far (short transfers) */
} cxl_seg;

struct cxl_req {
    cxl_req *prev, *next;   /* the engine's in-flight list, oldest first */
    cxl_req *qnext;         /* its route's queue, or the deferred list */
    uint64_t seq;
    int op;
    int flags;
    int status;             /* 0, an errno, or CXL_XFER_* */
    int afu_rc;
    uint64_t bad;           /* the byte where a backing store ended */
    int nseg;
    int seg_left;
    int next_issue;         /* segments before it were given to the backend */
    cxl_seg *segs;          /* seg_inline or malloc'd */
    cxl_seg seg_inline[CXL_SEG_INLINE];
    /* the table it went through: its in-flight count, and what tells of
     * an AFU reset since submission (the table's fail generation, the
     * owner's reset epoch of a replica) */
    int64_t *table_inflight;
    const uint64_t *fail_gen;
    uint64_t fail_gen_seen;
    const uint64_t *epoch;
    uint64_t epoch_seen;
    cxl_queue *route;
    void *owner;            /* the Python object of the request, or NULL */
    uint64_t index;         /* its index in a listio batch */
    int64_t t_submit;
    int done;               /* set last when it finishes (no route) */
};

struct cxl_queue {
    pthread_mutex_t mu;
    cxl_req *head, *tail;
    int efd;                /* written on each post, or -1 */
};

typedef struct cxl_inject {
    int op;                 /* 0: any */
    int64_t res;
    long skip;
    long count;
} cxl_inject;

#define CXL_MAX_INJECT 16

typedef struct cxl_engine {
    cxl_backend *be;
    pthread_mutex_t reap_mu;
    pthread_mutex_t mu;             /* the in-flight list, counts, deferred, inject */
    cxl_req head;                   /* in-flight list sentinel */
    cxl_req *deferred_head, *deferred_tail;
    uint64_t seq;
    long depth;                     /* segments in flight at most */
    long seg_inflight;
    long req_inflight;
    long armed;                     /* UNATTENDED or LOOP requests in flight:
                                     * the backend's notify fd is armed */
    long unattended;                /* UNATTENDED ones: the completer watches it */
    int ninject;
    cxl_inject inject[CXL_MAX_INJECT];
    cxl_queue pyq;                  /* requests of Python futures */
    int stop_efd;                   /* wakes the completer (to stop, or to
                                     * watch the notify fd again) */
    int stopping;
    int has_completer;
    pthread_t completer;
    void (*drain_py)(void *ctx);    /* takes the GIL, completes pyq */
    int py_busy;                    /* Python threads that will drain pyq */
    void *py_ctx;
    unsigned long fork_gen;         /* cxl_fork_gen when made */
    int pid;
} cxl_engine;

/* Moves in a forked child: an engine made before is not the child's. */
static unsigned long cxl_fork_gen;
static int cxl_fork_registered;
static void cxl_fork_child(void) { cxl_fork_gen++; }

static inline int64_t cxl_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void cxl_backend_destroy(cxl_backend *be)
{
    be->ops->destroy(be);
}

/* -- queues ------------------------------------------------------------------- */

static int cxl_queue_init(cxl_queue *q, int with_efd)
{
    pthread_mutex_init(&q->mu, NULL);
    q->head = q->tail = NULL;
    q->efd = -1;
    if (with_efd) {
        q->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (q->efd < 0)
            return -errno;
    }
    return 0;
}

static void cxl_queue_destroy(cxl_queue *q)
{
    if (q->efd >= 0)
        close(q->efd);
    q->efd = -1;
    pthread_mutex_destroy(&q->mu);
}

static void cxl_queue_post(cxl_queue *q, cxl_req *r)
{
    uint64_t one = 1;
    r->qnext = NULL;
    int was_empty;
    pthread_mutex_lock(&q->mu);
    was_empty = q->tail == NULL;
    if (q->tail)
        q->tail->qnext = r;
    else
        __atomic_store_n(&q->head, r, __ATOMIC_SEQ_CST);
    q->tail = r;
    pthread_mutex_unlock(&q->mu);
    /* Its reader takes everything there at once: one wake-up per batch. */
    if (was_empty && q->efd >= 0 && write(q->efd, &one, sizeof one) < 0) {
        /* the counter is full: it is readable anyway */
    }
}

/* Everything posted so far, oldest first (a list linked by qnext). */
static cxl_req *cxl_queue_take(cxl_queue *q)
{
    cxl_req *r;
    pthread_mutex_lock(&q->mu);
    r = q->head;
    q->head = q->tail = NULL;
    pthread_mutex_unlock(&q->mu);
    return r;
}

static inline int cxl_queue_empty(cxl_queue *q)
{
    return __atomic_load_n(&q->head, __ATOMIC_SEQ_CST) == NULL;
}

/* -- segments ----------------------------------------------------------------- */

/* Room for ``n`` segments: 0 or -ENOMEM. */
static int cxl_req_reserve(cxl_req *r, int n)
{
    cxl_seg *s;
    if (n <= CXL_SEG_INLINE) {
        if (r->segs == NULL)
            r->segs = r->seg_inline;
        return 0;
    }
    if (r->segs != NULL && r->segs != r->seg_inline)
        s = (cxl_seg *) realloc(r->segs, (size_t) n * sizeof(cxl_seg));
    else {
        s = (cxl_seg *) malloc((size_t) n * sizeof(cxl_seg));
        if (s && r->nseg)
            memcpy(s, r->seg_inline, (size_t) r->nseg * sizeof(cxl_seg));
    }
    if (s == NULL)
        return -ENOMEM;
    r->segs = s;
    return 0;
}

/* Reset a request for (re)use (its inline segments are filled as they
 * are used: only the header is cleared). */
static void cxl_req_clear(cxl_req *r)
{
    if (r->segs != NULL && r->segs != r->seg_inline)
        free(r->segs);
    memset(r, 0, offsetof(cxl_req, seg_inline));
    memset((char *) r + offsetof(cxl_req, seg_inline) + sizeof r->seg_inline, 0,
           sizeof *r - offsetof(cxl_req, seg_inline) - sizeof r->seg_inline);
}

/* -- a list call's requests ----------------------------------------------------- */

/* The requests a list call reuses (as many as it keeps in flight) and
 * the queue they finish into. */
typedef struct cxl_slots {
    cxl_req *pool;
    cxl_req **free;
    long nfree;
    long n;
    cxl_queue q;
} cxl_slots;

/* 0, or -ENOMEM.  ``n`` may be 0. */
static int cxl_slots_init(cxl_slots *s, long n)
{
    long i;
    s->n = n;
    s->nfree = 0;
    s->pool = (cxl_req *) malloc((size_t) (n ? n : 1) * sizeof(cxl_req));
    s->free = (cxl_req **) malloc((size_t) (n ? n : 1) * sizeof(cxl_req *));
    if (s->pool == NULL || s->free == NULL) {
        free(s->pool);
        free(s->free);
        return -ENOMEM;
    }
    for (i = 0; i < n; i++) {
        s->pool[i].segs = NULL;         /* the rest is cleared as it is used */
        s->free[s->nfree++] = &s->pool[i];
    }
    cxl_queue_init(&s->q, 0);
    return 0;
}

/* A cleared request routed to the queue; NULL when all are in use. */
static cxl_req *cxl_slots_get(cxl_slots *s)
{
    cxl_req *r;
    if (s->nfree == 0)
        return NULL;
    r = s->free[--s->nfree];
    cxl_req_clear(r);
    r->route = &s->q;
    return r;
}

static void cxl_slots_put(cxl_slots *s, cxl_req *r)
{
    s->free[s->nfree++] = r;
}

static void cxl_slots_destroy(cxl_slots *s)
{
    long i;
    for (i = 0; i < s->n; i++)
        cxl_req_clear(&s->pool[i]);
    free(s->pool);
    free(s->free);
    cxl_queue_destroy(&s->q);
}

/* -- the engine --------------------------------------------------------------- */

static void cxl_engine_submit_segs_locked(cxl_engine *e, cxl_req *r);
static void cxl_engine_unlink_locked(cxl_engine *e, cxl_req *r);

static cxl_engine *cxl_engine_new(cxl_backend *be, long depth)
{
    cxl_engine *e = (cxl_engine *) calloc(1, sizeof *e);
    if (e == NULL)
        return NULL;
    if (!cxl_fork_registered) {
        pthread_atfork(NULL, NULL, cxl_fork_child);
        cxl_fork_registered = 1;
    }
    e->be = be;
    e->depth = depth;
    pthread_mutex_init(&e->reap_mu, NULL);
    pthread_mutex_init(&e->mu, NULL);
    e->head.next = e->head.prev = &e->head;
    cxl_queue_init(&e->pyq, 1);     /* its eventfd wakes the completer */
    e->stop_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->fork_gen = cxl_fork_gen;
    e->pid = (int) getpid();
    return e;
}

static inline int cxl_engine_is_ours(cxl_engine *e)
{
    return e->fork_gen == cxl_fork_gen;
}

/* Apply a pending injection to a completion: its replacement result, or
 * ``res`` unchanged.  Caller holds reap_mu. */
static int64_t cxl_engine_injected(cxl_engine *e, int op, int64_t res)
{
    int i;
    cxl_inject *in;
    if (__atomic_load_n(&e->ninject, __ATOMIC_ACQUIRE) == 0)
        return res;
    pthread_mutex_lock(&e->mu);
    for (i = 0; i < e->ninject; i++) {
        in = &e->inject[i];
        if (in->op && in->op != op)
            continue;
        if (in->skip > 0) {
            in->skip--;
            continue;
        }
        res = in->res;
        if (--in->count == 0) {
            memmove(in, in + 1, (size_t) (e->ninject - i - 1) * sizeof *in);
            __atomic_store_n(&e->ninject, e->ninject - 1, __ATOMIC_RELEASE);
        }
        break;
    }
    pthread_mutex_unlock(&e->mu);
    return res;
}

/* Queue a fault (tests): 0, or -ENOSPC when the table of them is full. */
static int cxl_engine_add_inject(cxl_engine *e, int op, int64_t res, long skip, long count)
{
    int rc = 0;
    pthread_mutex_lock(&e->mu);
    if (e->ninject == CXL_MAX_INJECT) {
        rc = -ENOSPC;
    } else {
        e->inject[e->ninject].op = op;
        e->inject[e->ninject].res = res;
        e->inject[e->ninject].skip = skip;
        e->inject[e->ninject].count = count;
        __atomic_store_n(&e->ninject, e->ninject + 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

static int cxl_engine_ninject(cxl_engine *e)
{
    return __atomic_load_n(&e->ninject, __ATOMIC_ACQUIRE);
}

/* Take a finished request out of the in-flight list, and start the
 * deferred requests it held back.  Caller holds mu. */
static void cxl_engine_unlink_locked(cxl_engine *e, cxl_req *r)
{
    cxl_req *d;
    r->prev->next = r->next;
    r->next->prev = r->prev;
    r->next = r->prev = NULL;
    e->req_inflight--;
    if (r->flags & CXL_REQ_UNATTENDED)
        e->unattended--;
    if ((r->flags & (CXL_REQ_UNATTENDED | CXL_REQ_LOOP)) && --e->armed == 0)
        e->be->ops->set_notify(e->be, 0);
    /* A deferred request starts once it is the oldest in flight. */
    while ((d = e->deferred_head) != NULL && e->head.next == d) {
        e->deferred_head = d->qnext;
        if (e->deferred_head == NULL)
            e->deferred_tail = NULL;
        cxl_engine_submit_segs_locked(e, d);
    }
}

/* The request is done: count it out of its table and the engine, and post
 * it to its route (or leave it to its submitter, cxl_req_handoff). */
static void cxl_engine_finish(cxl_engine *e, cxl_req *r)
{
    cxl_queue *q;
    if (r->status == 0 && ((r->fail_gen && __atomic_load_n(r->fail_gen, __ATOMIC_ACQUIRE)
                                           != r->fail_gen_seen) ||
                           (r->epoch && __atomic_load_n(r->epoch, __ATOMIC_ACQUIRE)
                                        != r->epoch_seen)))
        r->status = CXL_XFER_IN_ERROR;      /* the AFU was reset under it */
    if (r->next) {                          /* it was in flight */
        pthread_mutex_lock(&e->mu);
        cxl_engine_unlink_locked(e, r);
        pthread_mutex_unlock(&e->mu);
    }
    if (r->table_inflight)
        __atomic_sub_fetch(r->table_inflight, 1, __ATOMIC_ACQ_REL);
    /* Whoever takes it from here may free it: touch nothing after.  A
     * request whose route is not set yet is its submitter's to complete
     * (cxl_req_handoff). */
    __atomic_store_n(&r->done, 1, __ATOMIC_RELEASE);
    q = __atomic_exchange_n(&r->route, CXL_ROUTE_DONE, __ATOMIC_ACQ_REL);
    if (q != NULL && q != CXL_ROUTE_DONE)
        cxl_queue_post(q, r);
}

/* After submitting a request without a route: give it ``q`` for when it
 * finishes.  0 if it will be posted there; 1 if it already finished (the
 * submitter completes it, no queue involved). */
static int cxl_req_handoff(cxl_req *r, cxl_queue *q)
{
    cxl_queue *expected = NULL;
    return !__atomic_compare_exchange_n(&r->route, &expected, q, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Give a segment (what is left of it) to the backend.  On refusal the
 * request fails with that error.  Caller holds mu (for seg_inflight). */
static int cxl_engine_issue(cxl_engine *e, cxl_seg *s)
{
    cxl_io io = s->io;
    int rc, tries;
    io.offset += s->done;
    io.len -= s->done;
    if (io.buf)
        io.buf += s->done;
    for (tries = 0;; tries++) {
        rc = e->be->ops->submit(e->be, &io);
        if (rc != -EAGAIN || tries == 64)
            break;                      /* (a backend that stays full fails it) */
        if (e->be->ops->kick(e->be) < 0)
            sched_yield();
    }
    if (rc == 0)
        e->seg_inflight++;
    return rc;
}

/* Give the backend up to ``budget`` more of a request's segments (those
 * not completed at submission); one the backend refuses counts as done,
 * failed.  Caller holds mu. */
static void cxl_engine_issue_more_locked(cxl_engine *e, cxl_req *r, long budget)
{
    int rc;
    cxl_seg *s;
    while (budget > 0 && r->next_issue < r->nseg) {
        s = &r->segs[r->next_issue++];
        if (s->done == s->io.len && s->io.len)
            continue;                       /* completed at submission */
        rc = cxl_engine_issue(e, s);
        if (rc) {
            if (r->status == 0)
                r->status = -rc;
            r->seg_left--;
        }
        budget--;
    }
}

/* Issue a request: at most what the engine's depth has room for now (at
 * least one segment), the rest as its segments complete -- so that no
 * request, however many segments it has, puts more operations in flight
 * than the backend can report.  Caller holds mu. */
static void cxl_engine_submit_segs_locked(cxl_engine *e, cxl_req *r)
{
    long room = e->depth - e->seg_inflight;
    cxl_engine_issue_more_locked(e, r, room > 0 ? room : 1);
    if (r->seg_left == 0) {
        /* nothing of it reached the backend: finish it outside mu */
        pthread_mutex_unlock(&e->mu);
        cxl_engine_finish(e, r);
        pthread_mutex_lock(&e->mu);
    }
}

/* One completion.  Caller holds reap_mu. */
static void cxl_engine_complete_seg(cxl_engine *e, cxl_seg *s, int64_t res)
{
    cxl_req *r = s->req;
    uint64_t left;
    int rc;
    res = cxl_engine_injected(e, s->io.op, res);
    pthread_mutex_lock(&e->mu);
    e->seg_inflight--;
    if (res == -EINTR || res == -EAGAIN) {
        rc = cxl_engine_issue(e, s);        /* again, whole */
        pthread_mutex_unlock(&e->mu);
        if (rc == 0)
            return;
        res = rc;
        pthread_mutex_lock(&e->mu);
    }
    if (res >= 0 && (s->io.op == CXL_OP_READ || s->io.op == CXL_OP_WRITE)) {
        left = s->io.len - s->done;
        if ((uint64_t) res > left)
            res = (int64_t) left;
        if (res == 0 && left) {
            if (r->status == 0) {
                r->status = CXL_XFER_BACKING_ENDED;
                r->bad = s->io.offset + s->done;
            }
        } else if ((uint64_t) res < left) {
            s->done += (uint64_t) res;      /* a short transfer: the rest */
            rc = cxl_engine_issue(e, s);
            pthread_mutex_unlock(&e->mu);
            if (rc == 0)
                return;
            pthread_mutex_lock(&e->mu);
            if (r->status == 0)
                r->status = -rc;
        } else {
            s->done = s->io.len;
        }
    } else if (res < 0 && r->status == 0) {
        r->status = (int) -res;
    }
    r->seg_left--;
    if (r->next_issue < r->nseg)            /* its next segment, in its place */
        cxl_engine_issue_more_locked(e, r, 1);
    left = (uint64_t) r->seg_left;
    if (left == 0 && r->next)
        cxl_engine_unlink_locked(e, r);     /* while mu is held anyway */
    pthread_mutex_unlock(&e->mu);
    if (left == 0)
        cxl_engine_finish(e, r);
}

/* Reap once (blocking up to ``wait_ms`` for a first completion) and
 * process what came: the number of completions.  Takes reap_mu. */
static int cxl_engine_poll_locked(cxl_engine *e, int wait_ms)
{
    cxl_cqe cqe[CXL_REAP_BATCH];
    int n, i, total = 0;
    e->be->ops->kick(e->be);                /* what a batch left queued */
    for (;;) {
        n = e->be->ops->reap(e->be, cqe, CXL_REAP_BATCH, wait_ms);
        if (n <= 0)
            break;
        for (i = 0; i < n; i++)
            cxl_engine_complete_seg(e, (cxl_seg *) cqe[i].tag, cqe[i].res);
        total += n;
        e->be->ops->kick(e->be);            /* the continued transfers */
        if (n < CXL_REAP_BATCH)
            break;
        wait_ms = 0;
    }
    return total;
}

static int cxl_engine_poll(cxl_engine *e, int wait_ms)
{
    int n;
    pthread_mutex_lock(&e->reap_mu);
    n = cxl_engine_poll_locked(e, wait_ms);
    pthread_mutex_unlock(&e->reap_mu);
    return n;
}

/* Reap, without blocking, if nobody else is reaping. */
/* Reap what is there unless another thread is reaping: the count, or -1
 * when busy (that thread may already have passed the completions that
 * woke this one: a caller that consumed the notify fd re-arms it). */
static int cxl_engine_try_poll(cxl_engine *e)
{
    int n;
    if (pthread_mutex_trylock(&e->reap_mu) != 0)
        return -1;
    n = cxl_engine_poll_locked(e, 0);
    pthread_mutex_unlock(&e->reap_mu);
    return n;
}

/* Wait until ``q`` has something: reap meanwhile.  The check is repeated
 * under reap_mu, so a completion another reaper posted is never waited
 * for in the backend. */
static void cxl_engine_wait_queue(cxl_engine *e, cxl_queue *q)
{
    while (cxl_queue_empty(q)) {
        pthread_mutex_lock(&e->reap_mu);
        if (cxl_queue_empty(q))
            cxl_engine_poll_locked(e, CXL_WAIT_MS);
        pthread_mutex_unlock(&e->reap_mu);
    }
}

/* Reap for up to ``ms`` unless the request is done (its ``done`` flag is
 * set before it is posted, by a reaper holding reap_mu: checked under
 * reap_mu, it is never missed).  Whether it is done. */
static int cxl_engine_wait_req_ms(cxl_engine *e, cxl_req *r, int ms)
{
    if (__atomic_load_n(&r->done, __ATOMIC_ACQUIRE))
        return 1;
    pthread_mutex_lock(&e->reap_mu);
    if (!__atomic_load_n(&r->done, __ATOMIC_ACQUIRE))
        cxl_engine_poll_locked(e, ms);
    pthread_mutex_unlock(&e->reap_mu);
    return __atomic_load_n(&r->done, __ATOMIC_ACQUIRE);
}

/* Wait until a request is done: reap meanwhile. */
static void cxl_engine_wait_req(cxl_engine *e, cxl_req *r)
{
    while (!cxl_engine_wait_req_ms(e, r, CXL_WAIT_MS))
        ;
}

/* Wait until ``*count`` is 0 (a table's in-flight requests): reap
 * meanwhile, so that a thread holding the table's write lock does not
 * wait for a completion only it could reap. */
static void cxl_engine_wait_idle(void *engine, int64_t *count)
{
    cxl_engine *e = (cxl_engine *) engine;
    while (__atomic_load_n(count, __ATOMIC_ACQUIRE) > 0)
        cxl_engine_poll(e, 1);
}

/* Submit a request whose segments are set; one with none (or one the
 * engine, stopping, refuses with ESHUTDOWN) finishes at once.  Waits,
 * reaping, while the engine is full: back-pressure, nothing dropped. */
enum {
    CXL_SUBMIT_BATCH = 1    /* more follow: the caller kicks after the last */
};

static void cxl_engine_kick(cxl_engine *e)
{
    e->be->ops->kick(e->be);
}

/* Run a request's segments now where that cannot block on a device (a
 * page-cache hit, a memory store) -- unless faults are queued, which only
 * completions get.  Returns how many segments are left for the backend
 * (a partial transfer leaves the rest of its segment). */
static int cxl_engine_try_segs(cxl_engine *e, cxl_req *r)
{
    int i, left = r->nseg;
    int64_t res;
    cxl_seg *s;
    if (e->be->ops->try_now == NULL || r->status != 0 ||
            __atomic_load_n(&e->ninject, __ATOMIC_ACQUIRE) != 0)
        return left;
    for (i = 0; i < r->nseg; i++) {
        s = &r->segs[i];
        res = e->be->ops->try_now(e->be, &s->io);
        if (res > 0 && (uint64_t) res >= s->io.len) {
            s->done = s->io.len;
            left--;
        } else if (res > 0) {
            s->done = (uint64_t) res;      /* the rest goes to the backend */
        }
    }
    return left;
}

/* Submit a request whose segments are set and tried (``seg_left`` says
 * what is left).  1: it is already complete -- refused before it was
 * counted in, or done at submission -- and the caller records it; 0: the
 * engine took it, and it finishes through its route.  Waits, reaping,
 * while the engine is full: back-pressure, nothing dropped. */
static int cxl_engine_submit_flags(cxl_engine *e, cxl_req *r, int flags)
{
    uint64_t one = 1;
    long need = r->seg_left;
    if (r->status != 0 || r->seg_left == 0)
        return 1;
    pthread_mutex_lock(&e->mu);
    while (e->seg_inflight > 0 && e->seg_inflight + need > e->depth) {
        pthread_mutex_unlock(&e->mu);
        cxl_engine_poll(e, CXL_WAIT_MS);    /* back-pressure */
        pthread_mutex_lock(&e->mu);
    }
    if (e->stopping) {
        pthread_mutex_unlock(&e->mu);
        if (r->status == 0)
            r->status = ESHUTDOWN;
        cxl_engine_finish(e, r);
        return 0;
    }
    r->seq = ++e->seq;
    /* Before any of it is issued: the notify fd armed, and the completer
     * told to watch it for a future's request. */
    if ((r->flags & (CXL_REQ_UNATTENDED | CXL_REQ_LOOP)) && e->armed++ == 0)
        e->be->ops->set_notify(e->be, 1);
    if ((r->flags & CXL_REQ_UNATTENDED) && e->unattended++ == 0 &&
            write(e->stop_efd, &one, sizeof one) < 0) { /* readable anyway */ }
    r->prev = e->head.prev;
    r->next = &e->head;
    e->head.prev->next = r;
    e->head.prev = r;
    e->req_inflight++;
    if ((r->flags & CXL_REQ_DRAIN) && e->head.next != r) {
        r->qnext = NULL;                    /* after the older ones */
        if (e->deferred_tail)
            e->deferred_tail->qnext = r;
        else
            e->deferred_head = r;
        e->deferred_tail = r;
    } else {
        cxl_engine_submit_segs_locked(e, r);
    }
    pthread_mutex_unlock(&e->mu);
    if (!(flags & CXL_SUBMIT_BATCH))
        e->be->ops->kick(e->be);
    return 0;
}

/* The completer thread: reaps the completions of futures nobody waits
 * for, and completes the futures a reaper left in pyq (drain_py takes the
 * GIL).  It watches the backend's notify fd only while futures' requests
 * are in flight: asyncio loops reap their own, and list I/O and waiting
 * threads theirs, without waking it. */
static void *cxl_engine_completer(void *arg)
{
    cxl_engine *e = (cxl_engine *) arg;
    struct pollfd p[3];
    uint64_t v;
    int n, i;
    p[0].fd = e->stop_efd;
    p[1].fd = e->pyq.efd;
    p[2].fd = e->be->ops->notify_fd(e->be);
    for (i = 0; i < 3; i++)
        p[i].events = POLLIN;
    for (;;) {
        n = __atomic_load_n(&e->unattended, __ATOMIC_ACQUIRE) > 0 ? 3 : 2;
        for (i = 0; i < 3; i++)
            p[i].revents = 0;
        if (poll(p, (nfds_t) n, 1000) < 0 && errno != EINTR)
            break;
        if (__atomic_load_n(&e->stopping, __ATOMIC_ACQUIRE) == 2)
            break;
        for (i = 0; i < n; i++)
            if ((p[i].revents & POLLIN) && read(p[i].fd, &v, sizeof v) < 0) {
                /* drained meanwhile */
            }
        if (n == 3)
            cxl_engine_poll(e, 0);
        /* A Python thread about to drain pyq does it (taking the GIL from
         * it would cost it more): it re-checks pyq after it stops being
         * busy, so nothing posted meanwhile is left behind. */
        if (!cxl_queue_empty(&e->pyq) && e->drain_py &&
                __atomic_load_n(&e->py_busy, __ATOMIC_SEQ_CST) == 0)
            e->drain_py(e->py_ctx);
    }
    return NULL;
}

static int cxl_engine_start(cxl_engine *e)
{
    pthread_attr_t ta;
    int rc;
    pthread_attr_init(&ta);
    pthread_attr_setstacksize(&ta, 1024 * 1024);
    rc = pthread_create(&e->completer, &ta, cxl_engine_completer, e);
    pthread_attr_destroy(&ta);
    if (rc == 0)
        e->has_completer = 1;
    return -rc;
}

/* Stop taking requests, wait for every one in flight, stop the completer.
 * Call without the GIL; drain_py is not called after this returns. */
static void cxl_engine_stop(cxl_engine *e)
{
    uint64_t one = 1;
    pthread_mutex_lock(&e->mu);
    e->stopping = 1;
    pthread_mutex_unlock(&e->mu);
    for (;;) {
        pthread_mutex_lock(&e->mu);
        if (e->req_inflight == 0) {
            pthread_mutex_unlock(&e->mu);
            break;
        }
        pthread_mutex_unlock(&e->mu);
        cxl_engine_poll(e, 10);
    }
    __atomic_store_n(&e->stopping, 2, __ATOMIC_RELEASE);
    if (e->has_completer) {
        if (write(e->stop_efd, &one, sizeof one) < 0) { /* readable anyway */ }
        pthread_join(e->completer, NULL);
        e->has_completer = 0;
    }
}

/* A Python thread will drain pyq (1) / no longer (-1). */
static inline void cxl_engine_py_busy(cxl_engine *e, int delta)
{
    __atomic_add_fetch(&e->py_busy, delta, __ATOMIC_SEQ_CST);
}

/* The backend's notify fd (readable when completions may wait). */
static int cxl_engine_notify_fd(cxl_engine *e)
{
    return e->be->ops->notify_fd(e->be);
}

static void cxl_engine_free(cxl_engine *e)
{
    e->be->ops->destroy(e->be);
    cxl_queue_destroy(&e->pyq);     /* closes its eventfd */
    close(e->stop_efd);
    pthread_mutex_destroy(&e->reap_mu);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

#endif
