"""The registry of the core's locks, and what happens to them at fork().

Every lock of a table, an allocator and the LXT cache is registered here.
Fork handlers, registered once in C (no GIL needed), make each of them
usable in the child, whatever other threads of the parent held:

- prepare: take the registry, then every allocator mutex, then the leaf
  (LXT cache) mutexes -- the order in which the core nests them.  Their
  holders never wait for the GIL or for another lock, so this only waits
  for loops already under way, and the child inherits allocators and the
  LXT cache in a consistent state.
- parent: release them.
- child: re-initialise every mutex, and every table rwlock that a thread
  other than the forking one held (that thread does not exist in the
  child).  Table locks are not taken in prepare: their holders may need the
  GIL, which the forking thread holds.  A forked child uses replicas of its
  own tables, never its parent's (those are TABLE_FOREIGN there).
"""
from libc.string cimport memset
from cxlflash._core.includes.system cimport (
    pthread_mutex_t, pthread_rwlock_t, pthread_mutex_init, pthread_mutex_destroy,
    pthread_mutex_lock, pthread_mutex_unlock, pthread_rwlock_init,
    pthread_rwlock_destroy, pthread_rwlockattr_t, pthread_rwlockattr_init,
    pthread_rwlockattr_setkind_np, pthread_rwlockattr_destroy,
    PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP, pthread_atfork)

cdef extern from *:
    """
    #include "locks.h"
    static pthread_mutex_t cxl_registry_mu = PTHREAD_MUTEX_INITIALIZER;
    static cxl_lock *cxl_registry = NULL;
    #define CXL_RW(l) (&((cxl_lock *)(l))->rw)
    #define CXL_MU(l) (&((cxl_lock *)(l))->mu)
    """
    pthread_mutex_t cxl_registry_mu
    cxl_lock *cxl_registry
    void *CXL_RW(void *l) nogil
    void *CXL_MU(void *l) nogil


cdef int rwlock_init(void *rw) noexcept nogil:
    cdef pthread_rwlockattr_t attr
    cdef int rc
    pthread_rwlockattr_init(&attr)
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
    rc = pthread_rwlock_init(<pthread_rwlock_t *> rw, &attr)
    pthread_rwlockattr_destroy(&attr)
    return rc


cdef int lock_init(cxl_lock *l, int kind) except -1:
    global cxl_registry
    cdef cxl_lock *f = l
    cdef int rc
    memset(f, 0, sizeof(cxl_lock))
    f.kind = kind
    if kind == CXL_LOCK_RW:
        rc = rwlock_init(CXL_RW(f))
    else:
        rc = pthread_mutex_init(<pthread_mutex_t *> CXL_MU(f), NULL)
    if rc != 0:
        raise OSError(rc, "cannot initialise a lock")
    with nogil:
        pthread_mutex_lock(&cxl_registry_mu)
        f.next = cxl_registry
        if cxl_registry != NULL:
            cxl_registry.prev = f
        cxl_registry = f
        f.registered = 1
        pthread_mutex_unlock(&cxl_registry_mu)
    return 0


cdef void lock_destroy(cxl_lock *l) noexcept nogil:
    global cxl_registry
    cdef cxl_lock *f = l
    if not f.registered:
        return
    pthread_mutex_lock(&cxl_registry_mu)
    if f.prev != NULL:
        f.prev.next = f.next
    else:
        cxl_registry = f.next
    if f.next != NULL:
        f.next.prev = f.prev
    f.registered = 0
    pthread_mutex_unlock(&cxl_registry_mu)
    if f.kind == CXL_LOCK_RW:
        pthread_rwlock_destroy(<pthread_rwlock_t *> CXL_RW(f))
    else:
        pthread_mutex_destroy(<pthread_mutex_t *> CXL_MU(f))


cdef void lock_kind(int kind) noexcept nogil:
    cdef cxl_lock *f = cxl_registry
    while f != NULL:
        if f.kind == kind:
            pthread_mutex_lock(<pthread_mutex_t *> CXL_MU(f))
        f = f.next


cdef void unlock_mutexes() noexcept nogil:
    cdef cxl_lock *f = cxl_registry
    while f != NULL:
        if f.kind != CXL_LOCK_RW:
            pthread_mutex_unlock(<pthread_mutex_t *> CXL_MU(f))
        f = f.next


cdef void before_fork() noexcept nogil:
    pthread_mutex_lock(&cxl_registry_mu)
    lock_kind(CXL_LOCK_MUTEX)
    lock_kind(CXL_LOCK_LEAF)


cdef void after_fork_parent() noexcept nogil:
    unlock_mutexes()
    pthread_mutex_unlock(&cxl_registry_mu)


cdef void after_fork_child() noexcept nogil:
    cdef cxl_lock *f = cxl_registry
    cdef cxl_lock *l
    while f != NULL:
        l = <cxl_lock *> f
        if f.kind != CXL_LOCK_RW:
            pthread_mutex_init(<pthread_mutex_t *> CXL_MU(f), NULL)
        elif not cxl_held_by_me(l):
            # Held (or not) by a thread that the child does not have.
            rwlock_init(CXL_RW(f))
            f.owner = 0
            f.depth = 0
        f = f.next
    pthread_mutex_init(&cxl_registry_mu, NULL)


def registered_count():
    """The number of live registered locks (for tests)."""
    cdef cxl_lock *f
    cdef int n = 0
    with nogil:
        pthread_mutex_lock(&cxl_registry_mu)
        f = cxl_registry
        while f != NULL:
            n += 1
            f = f.next
        pthread_mutex_unlock(&cxl_registry_mu)
    return n


cdef int _rc = pthread_atfork(before_fork, after_fork_parent, after_fork_child)
if _rc != 0:
    raise OSError(_rc, "pthread_atfork failed")
