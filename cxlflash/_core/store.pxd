# Stores that are not files (includes/store.h): the registry that names
# them by a descriptor, and the remote store of a client process.
from libc.stdint cimport uint64_t, int64_t

cdef extern from "store.h" nogil:
    ctypedef struct cxl_store
    ctypedef struct cxl_store_ops:
        const char *name
        int64_t (*rw)(cxl_store *s, int write, char *buf, uint64_t len, uint64_t off) noexcept nogil
        int (*zero)(cxl_store *s, uint64_t off, uint64_t len) noexcept nogil
        int (*flush)(cxl_store *s) noexcept nogil
        int64_t (*size)(cxl_store *s) noexcept nogil
        void *(*backend_new)(cxl_store *s, long depth) noexcept nogil
    ctypedef struct cxl_store:
        const cxl_store_ops *ops
        int fd
        int pid
    enum:
        CXL_STORE_MAX_FD
        CXL_REMOTE_MAX

# The store a descriptor names, or NULL for a file.  In a forked child, a
# store its parent opened answers every request with EBADFD.
cdef cxl_store *store_of(int fd) noexcept nogil

# Register a store under its descriptor (GIL held): 0, or raises.
cdef int store_register(cxl_store *s) except -1
cdef void store_unregister(cxl_store *s) noexcept

# Move all of ``length`` bytes at ``offset`` through a store, as
# datapath.io_full does with a file: 0, a positive errno, or -1 with
# ``*end`` where the store ended.
cdef int store_io_full(cxl_store *s, char *buf, uint64_t length, uint64_t offset,
                       int write, uint64_t *end) noexcept nogil
