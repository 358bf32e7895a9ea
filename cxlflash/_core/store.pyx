"""Stores that are not files: the registry of their descriptors.

The data path names a physical LUN's backing store by a descriptor.  A
store that is not a file -- an RBD image (``cxlflash._core.rbd``), or a
store another process serves (``attach_remote``) -- registers a descriptor
it owns here, with the operations to call instead of pread, pwrite,
fallocate and fdatasync (``includes/store.h``).

A client of ``cxlflash serve`` (or a forked child) cannot open the
serving process's RBD image itself (RBD's exclusive lock would refuse its
writes): it receives a socket instead, which ``attach_remote`` registers,
and whose requests ``serve_remote`` answers in the serving process.
"""
from libc.errno cimport EBADF, EEXIST, EINVAL, EIO, ENOMEM
from libc.stdint cimport uint64_t, int64_t
from libc.stdlib cimport free
from cxlflash._core.args cimport arg_fd

import os
import threading
from cxlflash._core.args import einval

cdef extern from "store.h" nogil:
    ctypedef struct cxl_remote:
        cxl_store st
    enum:
        CXL_REMOTE_LINKS
    cxl_remote *cxl_remote_new(const int *socks, int n)
    int cxl_remote_serve(int sock, cxl_store *st)

cdef extern from *:
    """
    #include <pthread.h>
    static cxl_store *cxl_stores[CXL_STORE_MAX_FD];
    static int cxl_store_pid;
    static int64_t cxl_foreign_rw(cxl_store *s, int w, char *b, uint64_t n, uint64_t o)
    { (void) s; (void) w; (void) b; (void) n; (void) o; return -EBADFD; }
    static int cxl_foreign_zero(cxl_store *s, uint64_t o, uint64_t n)
    { (void) s; (void) o; (void) n; return -EBADFD; }
    static int cxl_foreign_flush(cxl_store *s) { (void) s; return -EBADFD; }
    static int64_t cxl_foreign_size(cxl_store *s) { (void) s; return -EBADFD; }
    static const cxl_store_ops cxl_foreign_ops = {
        "foreign", cxl_foreign_rw, cxl_foreign_zero, cxl_foreign_flush, cxl_foreign_size, NULL
    };
    static cxl_store cxl_foreign_store = { &cxl_foreign_ops, -1, 0 };
    static void cxl_store_fork_child(void) { cxl_store_pid = (int) getpid(); }
    static void cxl_store_init(void)
    {
        cxl_store_pid = (int) getpid();
        pthread_atfork(NULL, NULL, cxl_store_fork_child);
    }
    static inline cxl_store *cxl_store_load(int fd)
    {
        cxl_store *s;
        if (fd < 0 || fd >= CXL_STORE_MAX_FD)
            return NULL;
        s = __atomic_load_n(&cxl_stores[fd], __ATOMIC_ACQUIRE);
        if (s != NULL && s->pid != cxl_store_pid)
            return &cxl_foreign_store;  /* the parent's: its threads stayed there */
        return s;
    }
    static inline int cxl_store_put(int fd, cxl_store *expect, cxl_store *s)
    {
        return __atomic_compare_exchange_n(&cxl_stores[fd], &expect, s, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    /* Name a store by ``fd``: 1, or 0 when a store of this process has it.
     * A forked child's slots may hold its parent's stores, whose
     * descriptors the child may have closed: a new one replaces them. */
    static inline int cxl_store_claim(int fd, cxl_store *s)
    {
        cxl_store *old = __atomic_load_n(&cxl_stores[fd], __ATOMIC_ACQUIRE);
        if (old != NULL && old->pid == cxl_store_pid)
            return 0;
        return cxl_store_put(fd, old, s);
    }
    """
    void cxl_store_init()
    cxl_store *cxl_store_load(int fd) noexcept nogil
    bint cxl_store_put(int fd, cxl_store *expect, cxl_store *s) noexcept nogil
    bint cxl_store_claim(int fd, cxl_store *s) noexcept nogil

cxl_store_init()


cdef cxl_store *store_of(int fd) noexcept nogil:
    return cxl_store_load(fd)


cdef int store_register(cxl_store *s) except -1:
    if s.fd < 0 or s.fd >= CXL_STORE_MAX_FD:
        raise OSError(EINVAL, f"descriptor {s.fd} cannot name a store: it must be "
                      f"below {CXL_STORE_MAX_FD}")
    if not cxl_store_claim(s.fd, s):
        raise OSError(EEXIST, f"descriptor {s.fd} already names a store")
    return 0


cdef void store_unregister(cxl_store *s) noexcept:
    if 0 <= s.fd < CXL_STORE_MAX_FD:
        cxl_store_put(s.fd, s, NULL)


cdef int store_io_full(cxl_store *s, char *buf, uint64_t length, uint64_t offset,
                       int write, uint64_t *end) noexcept nogil:
    cdef uint64_t done = 0
    cdef int64_t r
    while done < length:
        r = s.ops.rw(s, write, buf + done, length - done, offset + done)
        if r < 0:
            return <int> -r
        if r == 0:
            end[0] = offset + done
            return -1
        done += <uint64_t> r
    return 0


def store_kind(fd):
    """The kind of store descriptor ``fd`` names ("rbd", "remote"), or None
    for a file."""
    cdef cxl_store *s = store_of(arg_fd(fd))
    if s == NULL:
        return None
    return s.ops.name.decode()


cdef cxl_store *_named(fd) except NULL:
    cdef cxl_store *s = store_of(arg_fd(fd))
    if s == NULL:
        raise OSError(EBADF, f"descriptor {fd} names no store")
    return s


def store_size(fd):
    """The size in bytes of the store ``fd`` names (OSError on failure)."""
    cdef cxl_store *s = _named(fd)
    cdef int64_t r
    with nogil:
        r = s.ops.size(s)
    if r < 0:
        raise OSError(<int> -r, f"cannot read the size of the {s.ops.name.decode()} "
                      f"store: {os.strerror(<int> -r)}")
    return r


def store_flush(fd):
    """Flush the store ``fd`` names: 0, or the errno of the failure."""
    cdef cxl_store *s = _named(fd)
    cdef int r
    with nogil:
        r = s.ops.flush(s)
    return -r


# -- the remote store ---------------------------------------------------------------

cdef class RemoteStore:
    """RemoteStore(sock_fds)

    A store served by another process (``serve_remote`` there), reached
    over the connected stream sockets ``sock_fds`` (1..8 of them: as many
    requests in flight), which it then owns; the first names it in the
    data path.  ``close()`` unregisters it and closes the sockets; nothing
    may be in flight then.
    """
    cdef cxl_remote *rm
    cdef readonly int fd
    cdef list socks

    def __cinit__(self, sock_fds):
        cdef int fds[CXL_REMOTE_LINKS]
        cdef int i
        self.socks = [arg_fd(f) for f in sock_fds]
        if not 1 <= len(self.socks) <= CXL_REMOTE_LINKS or min(self.socks) < 0:
            raise einval(f"a remote store needs 1..{CXL_REMOTE_LINKS} sockets")
        for i in range(len(self.socks)):
            fds[i] = self.socks[i]
        self.fd = fds[0]
        self.rm = cxl_remote_new(fds, len(self.socks))
        if self.rm == NULL:
            raise MemoryError()
        try:
            store_register(&self.rm.st)
        except BaseException:
            free(self.rm)
            self.rm = NULL
            raise

    def close(self):
        if self.rm != NULL:
            store_unregister(&self.rm.st)
            free(self.rm)           # (no mutex is held: nothing in flight)
            self.rm = NULL
            for f in self.socks:
                os.close(f)
            self.socks = []
        self.fd = -1

    def __dealloc__(self):
        if self.rm != NULL and self.rm.st.pid == os.getpid():
            store_unregister(&self.rm.st)
            free(self.rm)
            self.rm = NULL


def serve_remote(int sock, int store_fd):
    """Answer the requests of the client at ``sock`` on the store
    ``store_fd`` names, without the GIL, until the client closes its end
    or ``sock`` is shut down: 0, or the errno that ended it (EPROTO: the
    client broke the protocol; its connection is the only one ended)."""
    cdef cxl_store *s = _named(store_fd)
    cdef int rc
    with nogil:
        rc = cxl_remote_serve(sock, s)
    return rc
