# Memory for LXTs (the per-vLUN chunk translation tables of tables.pyx).
from libc.stdint cimport uint64_t

cdef enum:
    # From this many bytes on, an LXT comes from (and returns to) a few
    # kept for reuse; below it, plain malloc/realloc/free.
    BIG_LXT = 262144
    # From this many bytes on, a fresh LXT is 2 MiB-aligned and advised
    # onto huge pages.
    HUGE_LXT = 4194304

# Memory for an LXT of ``entries`` entries (uninitialised), or NULL.
cdef uint64_t *lxt_alloc(uint64_t entries) noexcept nogil
# Free an LXT from lxt_alloc (a large one may be kept for reuse).  NULL is
# a no-op.
cdef void lxt_free(uint64_t *lxt, uint64_t entries) noexcept nogil
