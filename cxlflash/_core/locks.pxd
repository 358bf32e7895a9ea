# The core's locks (includes/locks.h) and their registry, which keeps each
# of them usable in a forked child.
cdef extern from "locks.h" nogil:
    enum:
        CXL_LOCK_RW
        CXL_LOCK_MUTEX
        CXL_LOCK_LEAF
    ctypedef struct cxl_lock:
        cxl_lock *prev
        cxl_lock *next
        int kind
        int registered
        unsigned long owner
        int depth
    int cxl_held_by_me(cxl_lock *l)
    void cxl_rdlock(cxl_lock *l)
    int cxl_tryrdlock(cxl_lock *l)
    void cxl_wrlock(cxl_lock *l)
    int cxl_trywrlock(cxl_lock *l)
    void cxl_unlock(cxl_lock *l)
    void cxl_mutex_lock(cxl_lock *l)
    void cxl_mutex_unlock(cxl_lock *l)

# Initialise ``l`` as a lock of ``kind`` and register it; -1 with an
# exception set when the lock cannot be made.
cdef int lock_init(cxl_lock *l, int kind) except -1
# Unregister and destroy a lock that lock_init made (no-op otherwise).
cdef void lock_destroy(cxl_lock *l) noexcept nogil
