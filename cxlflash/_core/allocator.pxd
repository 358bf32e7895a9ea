# The kernel's chunk (allocation unit) allocator: spec §12.
from libc.stdint cimport uint8_t, uint64_t, int64_t
from cxlflash._core.includes.system cimport pthread_mutex_t

cdef enum:
    MAX_AUN_CLONE_CNT = 0xFF


cdef class ChunkAllocator:
    cdef uint64_t *bitmap        # 1 bit per chunk, 1 = free
    cdef uint8_t *clone_map      # extra references per chunk
    cdef readonly int64_t total_chunks
    cdef readonly int64_t words
    cdef int64_t free_aun_cnt
    cdef int64_t free_low_idx
    cdef int64_t free_curr_idx
    cdef int64_t free_high_idx
    cdef pthread_mutex_t mutex

    # The bare algorithms; the caller holds ``mutex``.
    cdef int64_t ba_alloc(self) noexcept nogil
    cdef int ba_free(self, int64_t aun) noexcept nogil
    cdef int ba_clone(self, int64_t aun) noexcept nogil
    # Copy an LXT of ``n`` entries to ``copy`` and raise the clone count of
    # every chunk it maps, all or none (0 or -1); the caller holds ``mutex``.
    cdef int clone_lxt(self, const uint64_t *lxt, uint64_t *copy,
                       uint64_t n) noexcept nogil
    cdef void lock(self) noexcept nogil
    cdef void unlock(self) noexcept nogil
    cdef int _check_aun(self, int64_t aun) except -1
    cdef int _check_auns(self, const int64_t[::1] auns) except -1
