"""Memory for LXTs: the per-vLUN chunk translation tables of ``tables``.

Large LXTs (>= 256 KiB, 32 k chunks) come from a few kept for reuse, as a
fresh one would cost a page fault per 4 KiB on every clone, open or
regrowth; from 4 MiB (512 k chunks) on they are also 2 MiB-aligned and
advised onto huge pages.  The cache's mutex is the innermost lock of the
core (``CXL_LOCK_LEAF``: taken under a table lock or an allocator mutex,
never the other way round).
"""
from libc.stdint cimport uint64_t
from libc.stdlib cimport malloc, free
from cxlflash._core.includes.system cimport posix_memalign, madvise, MADV_HUGEPAGE
from cxlflash._core.locks cimport (cxl_lock, lock_init, cxl_mutex_lock,
                                   cxl_mutex_unlock, CXL_LOCK_LEAF)

DEF LXT_CACHE_SLOTS = 4
cdef void *lxt_cache[LXT_CACHE_SLOTS]
cdef uint64_t lxt_cache_cap[LXT_CACHE_SLOTS]
cdef cxl_lock lxt_cache_mutex
lock_init(&lxt_cache_mutex, CXL_LOCK_LEAF)


cdef uint64_t *lxt_alloc(uint64_t entries) noexcept nogil:
    """Memory for an LXT of ``entries`` entries (uninitialised), or NULL."""
    cdef size_t nbytes = entries * sizeof(uint64_t)
    cdef void *p = NULL
    cdef int i
    if nbytes < BIG_LXT:
        return <uint64_t *> malloc(nbytes)
    cxl_mutex_lock(&lxt_cache_mutex)
    for i in range(LXT_CACHE_SLOTS):
        if lxt_cache[i] != NULL and lxt_cache_cap[i] == entries:
            p = lxt_cache[i]
            lxt_cache[i] = NULL
            break
    cxl_mutex_unlock(&lxt_cache_mutex)
    if p != NULL:
        return <uint64_t *> p
    if nbytes < HUGE_LXT:
        return <uint64_t *> malloc(nbytes)
    if posix_memalign(&p, 2097152, nbytes) != 0:
        return NULL
    madvise(p, nbytes, MADV_HUGEPAGE)
    return <uint64_t *> p


cdef void lxt_free(uint64_t *lxt, uint64_t entries) noexcept nogil:
    """Free an LXT from lxt_alloc (a large one may be kept for reuse)."""
    cdef int i
    if lxt == NULL:
        return
    if entries * sizeof(uint64_t) >= BIG_LXT:
        cxl_mutex_lock(&lxt_cache_mutex)
        for i in range(LXT_CACHE_SLOTS):
            if lxt_cache[i] == NULL:
                lxt_cache[i] = lxt
                lxt_cache_cap[i] = entries
                lxt = NULL
                break
        cxl_mutex_unlock(&lxt_cache_mutex)
    free(lxt)
