/* Stores that are not files: the physical LUNs whose bytes live elsewhere
 * (an RBD image through librbd, or a daemon's store reached over a socket).
 *
 * The data path names every backing store by a file descriptor.  For a
 * store that is not a file, that descriptor is one the store owns (an RBD
 * image's completion eventfd, the socket to a daemon) and is registered in
 * store.pyx with a cxl_store: what to call instead of pread, pwrite,
 * fallocate and fdatasync.  An unregistered descriptor is a file, as
 * before; looking one up costs one load.
 *
 * The remote protocol (a client of ``cxlflash serve``, or a forked child,
 * whose LUN lives in a store only the serving process can open): one
 * request at a time per socket (a client has several), in host byte order (both ends are on this
 * machine): a cxl_remote_req, the data of a WRITE; a cxl_remote_rep, the
 * data of a READ (``res`` bytes).  The server checks every field.
 */
#ifndef CXLFLASH_STORE_H
#define CXLFLASH_STORE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>

#define CXL_STORE_MAX_FD 65536

struct cxl_backend;
typedef struct cxl_store cxl_store;

typedef struct cxl_store_ops {
    const char *name;
    /* Bytes moved (maybe fewer than asked), 0 where the store ends, or
     * -errno. */
    int64_t (*rw)(cxl_store *s, int write, char *buf, uint64_t len, uint64_t off);
    /* Zero a range so that it reads back as zeros: 0 or -errno. */
    int (*zero)(cxl_store *s, uint64_t off, uint64_t len);
    /* Make every completed write durable: 0 or -errno. */
    int (*flush)(cxl_store *s);
    /* The size in bytes, or -errno. */
    int64_t (*size)(cxl_store *s);
    /* The backend of an I/O engine for this store (NULL: the thread pool,
     * whose workers call rw/zero/flush). */
    struct cxl_backend *(*backend_new)(cxl_store *s, long depth);
} cxl_store_ops;

struct cxl_store {
    const cxl_store_ops *ops;
    int fd;                 /* the descriptor that names it */
    int pid;                /* the process that opened it */
};

/* -- the remote protocol ------------------------------------------------------- */

#define CXL_REMOTE_MAGIC 0x43585253u      /* "CXRS" */
#define CXL_REMOTE_MAX (8u << 20)         /* bytes per request */
enum { CXL_REMOTE_READ = 1, CXL_REMOTE_WRITE = 2, CXL_REMOTE_FLUSH = 3,
       CXL_REMOTE_ZERO = 4, CXL_REMOTE_SIZE = 5 };

typedef struct cxl_remote_req {
    uint32_t magic;
    uint32_t op;
    uint64_t offset;
    uint64_t len;
} cxl_remote_req;

typedef struct cxl_remote_rep {
    uint32_t magic;
    int32_t err;            /* 0 or a positive errno */
    int64_t res;            /* bytes read or written, or the size */
} cxl_remote_rep;

/* All of ``n`` bytes, or -1 (errno set; 0 at a clean end of stream). */
static int cxl_sock_full(int fd, char *p, size_t n, int send_)
{
    ssize_t r;
    while (n) {
        r = send_ ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {
            errno = 0;
            return -1;
        }
        p += r;
        n -= (size_t) r;
    }
    return 0;
}

/* The client's end: a cxl_store whose operations are requests to the
 * process that serves it, over up to CXL_REMOTE_LINKS sockets (a request
 * in flight on each; st.fd is the first).  A socket that breaks fails
 * its request and every later one on it with EIO. */
#define CXL_REMOTE_LINKS 8

typedef struct cxl_remote_link {
    int fd;
    int broken;
    pthread_mutex_t mu;
} cxl_remote_link;

typedef struct cxl_remote {
    cxl_store st;
    int nlinks;
    unsigned next;
    cxl_remote_link link[CXL_REMOTE_LINKS];
} cxl_remote;

/* A link for one request, locked: a free one if there is, else wait. */
static cxl_remote_link *cxl_remote_link_get(cxl_remote *rm)
{
    unsigned start = __atomic_fetch_add(&rm->next, 1, __ATOMIC_RELAXED);
    int i;
    cxl_remote_link *l;
    for (i = 0; i < rm->nlinks; i++) {
        l = &rm->link[(start + (unsigned) i) % (unsigned) rm->nlinks];
        if (pthread_mutex_trylock(&l->mu) == 0)
            return l;
    }
    l = &rm->link[start % (unsigned) rm->nlinks];
    pthread_mutex_lock(&l->mu);
    return l;
}

static int64_t cxl_remote_call(cxl_remote *rm, uint32_t op, uint64_t off, uint64_t len,
                               const char *wbuf, char *rbuf)
{
    cxl_remote_req q;
    cxl_remote_rep a;
    cxl_remote_link *l = cxl_remote_link_get(rm);
    int64_t res;
    memset(&q, 0, sizeof q);
    q.magic = CXL_REMOTE_MAGIC;
    q.op = op;
    q.offset = off;
    q.len = len;
    if (l->broken)
        goto broken;
    if (cxl_sock_full(l->fd, (char *) &q, sizeof q, 1) != 0 ||
            (op == CXL_REMOTE_WRITE && cxl_sock_full(l->fd, (char *) wbuf, len, 1) != 0) ||
            cxl_sock_full(l->fd, (char *) &a, sizeof a, 0) != 0 ||
            a.magic != CXL_REMOTE_MAGIC || a.err < 0 ||
            (a.err == 0 && (a.res < 0 || (op == CXL_REMOTE_READ && (uint64_t) a.res > len))))
        goto broken;
    if (a.err) {
        pthread_mutex_unlock(&l->mu);
        return -a.err;
    }
    res = a.res;
    if (op == CXL_REMOTE_READ && res > 0 &&
            cxl_sock_full(l->fd, rbuf, (size_t) res, 0) != 0)
        goto broken;
    pthread_mutex_unlock(&l->mu);
    return res;
broken:
    l->broken = 1;          /* out of step with the server: stop here */
    pthread_mutex_unlock(&l->mu);
    return -EIO;
}

static int64_t cxl_remote_rw(cxl_store *s, int write, char *buf, uint64_t len, uint64_t off)
{
    if (len > CXL_REMOTE_MAX)
        len = CXL_REMOTE_MAX;           /* a short transfer: the caller goes on */
    return cxl_remote_call((cxl_remote *) s, write ? CXL_REMOTE_WRITE : CXL_REMOTE_READ,
                           off, len, buf, buf);
}

static int cxl_remote_zero(cxl_store *s, uint64_t off, uint64_t len)
{
    int64_t r = cxl_remote_call((cxl_remote *) s, CXL_REMOTE_ZERO, off, len, NULL, NULL);
    return r < 0 ? (int) r : 0;
}

static int cxl_remote_flush(cxl_store *s)
{
    int64_t r = cxl_remote_call((cxl_remote *) s, CXL_REMOTE_FLUSH, 0, 0, NULL, NULL);
    return r < 0 ? (int) r : 0;
}

static int64_t cxl_remote_size(cxl_store *s)
{
    return cxl_remote_call((cxl_remote *) s, CXL_REMOTE_SIZE, 0, 0, NULL, NULL);
}

static const cxl_store_ops cxl_remote_ops = {
    "remote", cxl_remote_rw, cxl_remote_zero, cxl_remote_flush, cxl_remote_size, NULL
};

static inline cxl_remote *cxl_remote_new(const int *socks, int n)
{
    cxl_remote *rm;
    int i;
    if (n < 1 || n > CXL_REMOTE_LINKS)
        return NULL;
    rm = (cxl_remote *) calloc(1, sizeof *rm);
    if (rm == NULL)
        return NULL;
    rm->st.ops = &cxl_remote_ops;
    rm->st.fd = socks[0];
    rm->st.pid = (int) getpid();
    rm->nlinks = n;
    for (i = 0; i < n; i++) {
        rm->link[i].fd = socks[i];
        pthread_mutex_init(&rm->link[i].mu, NULL);
    }
    return rm;
}

/* The serving end: answer the requests of ``sock`` on ``st`` until the peer
 * closes it, breaks the protocol, or the socket is shut down.  Returns 0
 * at a clean end, else an errno (EPROTO: the peer broke the protocol). */
static inline int cxl_remote_serve(int sock, cxl_store *st)
{
    cxl_remote_req q;
    cxl_remote_rep a;
    char *buf = NULL;
    int64_t r;
    int rc = 0;
    for (;;) {
        if (cxl_sock_full(sock, (char *) &q, sizeof q, 0) != 0) {
            rc = errno;
            break;
        }
        if (q.magic != CXL_REMOTE_MAGIC || q.op < CXL_REMOTE_READ || q.op > CXL_REMOTE_SIZE ||
                q.offset > (uint64_t) INT64_MAX || q.len > (uint64_t) INT64_MAX - q.offset ||
                ((q.op == CXL_REMOTE_READ || q.op == CXL_REMOTE_WRITE) && q.len > CXL_REMOTE_MAX)) {
            rc = EPROTO;
            break;
        }
        if ((q.op == CXL_REMOTE_READ || q.op == CXL_REMOTE_WRITE) && buf == NULL &&
                (buf = (char *) malloc(CXL_REMOTE_MAX)) == NULL) {
            rc = ENOMEM;
            break;
        }
        if (q.op == CXL_REMOTE_WRITE && cxl_sock_full(sock, buf, q.len, 0) != 0) {
            rc = errno;
            break;
        }
        switch (q.op) {
        case CXL_REMOTE_READ:
        case CXL_REMOTE_WRITE:
            r = q.len ? st->ops->rw(st, q.op == CXL_REMOTE_WRITE, buf, q.len, q.offset) : 0;
            break;
        case CXL_REMOTE_ZERO:
            r = st->ops->zero(st, q.offset, q.len);
            break;
        case CXL_REMOTE_FLUSH:
            r = st->ops->flush(st);
            break;
        default:
            r = st->ops->size(st);
        }
        a.magic = CXL_REMOTE_MAGIC;
        a.err = r < 0 ? (int32_t) -r : 0;
        a.res = r < 0 ? 0 : r;
        if (cxl_sock_full(sock, (char *) &a, sizeof a, 1) != 0 ||
                (q.op == CXL_REMOTE_READ && a.res > 0 &&
                 cxl_sock_full(sock, buf, (size_t) a.res, 1) != 0)) {
            rc = errno;
            break;
        }
    }
    free(buf);
    return rc;
}

#endif
