# The kernel's chunk (allocation unit) allocator: spec §12.
from libc.stdint cimport uint8_t, uint64_t, int64_t
from cxlflash._core.locks cimport cxl_lock

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
    # Chunks at or above ``chunk_limit`` are never handed out (a LUN whose
    # capacity shrank); free ones are held back in ``parked``.
    cdef int64_t chunk_limit
    cdef int64_t parked
    cdef uint64_t *parked_map    # 1 bit per chunk, 1 = parked (NULL: none)
    cdef cxl_lock mutex

    # The bare algorithms; the caller holds ``mutex``.
    cdef int64_t ba_alloc(self) noexcept nogil
    cdef int ba_free(self, int64_t aun) noexcept nogil
    cdef int ba_clone(self, int64_t aun) noexcept nogil
    # Drop one reference: 1 when it was the last one (the chunk stays
    # allocated, for the caller to scrub and then free), 0 when a clone
    # reference went, -1 when the chunk is free.
    cdef int ba_release(self, int64_t aun) noexcept nogil
    cdef void _give_back(self, int64_t aun) noexcept nogil
    cdef bint _parked(self, int64_t aun) noexcept nogil
    # Copy an LXT of ``n`` entries to ``copy`` and raise the clone count of
    # every chunk it maps, all or none (0 or -1); the caller holds ``mutex``.
    cdef int clone_lxt(self, const uint64_t *lxt, uint64_t *copy,
                       uint64_t n) noexcept nogil
    cdef void lock(self) noexcept nogil
    cdef void unlock(self) noexcept nogil
    cdef int64_t _aun(self, object aun) except -1
    cdef int _check_auns(self, const int64_t[::1] auns) except -1
