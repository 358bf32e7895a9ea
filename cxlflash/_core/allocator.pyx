"""The chunk allocator of a LUN in virtual mode (spec §12).

A bitmap of 64-bit words in which a 1 bit means *free*, a word-granular
next-fit cursor with wrap-around, and a one-byte clone count per chunk (the
number of references beyond the first).  The order in which chunks are
handed out is exactly the kernel's, so chunk numbers (``aun``) match it.

Every public method is atomic (it holds the allocator's mutex); the bulk
methods run without the GIL.
"""
from libc.stdint cimport uint8_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memset
from cxlflash._core.includes.system cimport (
    pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock,
    pthread_mutex_unlock, ctz64, popcount64)

import errno
import numpy as np

DEF HIBIT = 63


cdef inline const int64_t[::1] _aun_array(object auns):
    return np.ascontiguousarray(auns, dtype=np.int64).reshape(-1)


cdef class ChunkAllocator:
    """ChunkAllocator(total_chunks)

    The allocator of one LUN with ``total_chunks`` whole chunks (65536
    native blocks each).  Chunk numbers run from 0 to ``total_chunks - 1``.
    """

    def __cinit__(self, int64_t total_chunks):
        if total_chunks <= 0:
            raise ValueError(
                f"total_chunks must be at least 1, got {total_chunks}: a LUN "
                "smaller than one chunk (65536 blocks) cannot be virtual")
        self.total_chunks = total_chunks
        self.words = (total_chunks + 63) // 64
        self.bitmap = <uint64_t *> malloc(self.words * sizeof(uint64_t))
        self.clone_map = <uint8_t *> calloc(total_chunks, sizeof(uint8_t))
        if self.bitmap == NULL or self.clone_map == NULL:
            raise MemoryError("cannot allocate the chunk bitmap")
        memset(self.bitmap, 0xFF, self.words * sizeof(uint64_t))
        cdef int64_t tail = total_chunks % 64
        if tail:
            # The bits past the last chunk are marked allocated.
            self.bitmap[self.words - 1] = ((<uint64_t> 1) << tail) - 1
        self.free_aun_cnt = total_chunks
        self.free_low_idx = 0
        self.free_curr_idx = 0
        self.free_high_idx = self.words
        pthread_mutex_init(&self.mutex, NULL)

    def __dealloc__(self):
        free(self.bitmap)
        free(self.clone_map)
        pthread_mutex_destroy(&self.mutex)

    # -- the kernel's algorithms (caller holds the mutex) -------------------

    cdef void lock(self) noexcept nogil:
        pthread_mutex_lock(&self.mutex)

    cdef void unlock(self) noexcept nogil:
        pthread_mutex_unlock(&self.mutex)

    cdef int64_t ba_alloc(self) noexcept nogil:
        """Next-fit allocation (spec §12.2); -1 when nothing is free."""
        cdef int64_t w, bit
        if self.free_aun_cnt == 0:
            return -1
        w = self.free_curr_idx
        while w < self.free_high_idx and self.bitmap[w] == 0:
            w += 1
        if w >= self.free_high_idx:
            w = self.free_low_idx
            while w < self.free_curr_idx and self.bitmap[w] == 0:
                w += 1
            if w >= self.free_curr_idx:
                return -1
        bit = ctz64(self.bitmap[w])
        self.bitmap[w] &= ~((<uint64_t> 1) << bit)
        self.free_aun_cnt -= 1
        self.free_curr_idx = w + 1 if bit == HIBIT else w
        return w * 64 + bit

    cdef int ba_free(self, int64_t aun) noexcept nogil:
        """Drop one reference (spec §12.3); -1 if the chunk is free."""
        cdef int64_t w = aun >> 6
        cdef uint64_t mask = (<uint64_t> 1) << (aun & 63)
        if self.bitmap[w] & mask:
            return -1
        if self.clone_map[aun] > 0:
            self.clone_map[aun] -= 1
            return 0
        self.bitmap[w] |= mask
        self.free_aun_cnt += 1
        if w < self.free_low_idx:
            self.free_low_idx = w
        elif w > self.free_high_idx:
            self.free_high_idx = w
        return 0

    cdef int ba_clone(self, int64_t aun) noexcept nogil:
        """Add one reference (spec §12.4); -1 if free or at the cap."""
        if self.bitmap[aun >> 6] & ((<uint64_t> 1) << (aun & 63)):
            return -1
        if self.clone_map[aun] == MAX_AUN_CLONE_CNT:
            return -1
        self.clone_map[aun] += 1
        return 0

    cdef int clone_lxt(self, const uint64_t *lxt, uint64_t *copy, uint64_t n) noexcept nogil:
        cdef uint64_t i = 0, j, k, aun, diff, e
        cdef uint8_t full
        cdef uint8_t *counts
        while i < n:
            aun = lxt[i] >> 16
            # Fast path: 64 consecutive chunks filling one bitmap word (what
            # a fresh grow lays down) are copied and cloned as a block.  The
            # loops have no early exit so the compiler can vectorise them.
            if ((aun & 63) == 0 and i + 64 <= n and aun + 64 <= <uint64_t> self.total_chunks
                    and self.bitmap[aun >> 6] == 0):
                diff = 0
                for j in range(64):
                    e = lxt[i + j]
                    copy[i + j] = e
                    diff |= (e >> 16) ^ (aun + j)
                if diff == 0:
                    counts = self.clone_map + aun
                    full = 0
                    for j in range(64):
                        full |= counts[j] == MAX_AUN_CLONE_CNT
                    if not full:
                        for j in range(64):
                            counts[j] += 1
                        i += 64
                        continue
            if aun >= <uint64_t> self.total_chunks or self.ba_clone(aun) != 0:
                for k in range(i):
                    self.ba_free(lxt[k] >> 16)
                return -1
            copy[i] = lxt[i]
            i += 1
        return 0

    # -- checks -------------------------------------------------------------

    cdef int _check_aun(self, int64_t aun) except -1:
        if aun < 0 or aun >= self.total_chunks:
            raise IndexError(
                f"chunk {aun} is out of range: this allocator has chunks "
                f"0..{self.total_chunks - 1}")
        return 0

    cdef int _check_auns(self, const int64_t[::1] auns) except -1:
        cdef Py_ssize_t i, n = auns.shape[0]
        cdef Py_ssize_t bad = -1
        cdef int64_t total = self.total_chunks
        with nogil:
            for i in range(n):
                if auns[i] < 0 or auns[i] >= total:
                    bad = i
                    break
        if bad >= 0:
            raise IndexError(
                f"chunk {auns[bad]} (at index {bad}) is out of range: this "
                f"allocator has chunks 0..{total - 1}; nothing was changed")
        return 0

    # -- single operations ----------------------------------------------------

    def alloc(self):
        """Allocate one chunk and return its number.

        Raises ``OSError(ENOSPC)`` when no chunk is free.
        """
        cdef int64_t aun
        with nogil:
            self.lock()
            aun = self.ba_alloc()
            self.unlock()
        if aun < 0:
            raise OSError(errno.ENOSPC, "no free chunk left on this LUN")
        return aun

    def free(self, int64_t aun):
        """Drop one reference to ``aun``.

        Returns False, changing nothing, when the chunk is already free (the
        kernel's failure result).  A chunk with clone references only loses
        one of them.
        """
        self._check_aun(aun)
        cdef int rc
        with nogil:
            self.lock()
            rc = self.ba_free(aun)
            self.unlock()
        return rc == 0

    def clone(self, int64_t aun):
        """Add a reference to an allocated chunk.

        Returns False, changing nothing, when the chunk is free or already
        has 255 extra references.
        """
        self._check_aun(aun)
        cdef int rc
        with nogil:
            self.lock()
            rc = self.ba_clone(aun)
            self.unlock()
        return rc == 0

    # -- bulk operations (GIL released) ---------------------------------------

    def alloc_many(self, Py_ssize_t n, *, bint partial=False):
        """Allocate ``n`` chunks; return their numbers as an int64 array.

        The numbers are exactly those ``n`` successive :meth:`alloc` calls
        would return.  When fewer than ``n`` chunks are free, raises
        ``OSError(ENOSPC)`` and changes nothing -- unless ``partial`` is true,
        in which case it allocates what is free (the kernel's grow).
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of chunks ({n})")
        # Never more than the allocator holds: a huge ``n`` is refused with
        # ENOSPC below instead of failing to allocate the result array.
        out = np.empty(min(n, self.total_chunks), dtype=np.int64)
        cdef int64_t[::1] view = out
        cdef Py_ssize_t i, got = 0
        cdef int64_t avail
        with nogil:
            self.lock()
            avail = self.free_aun_cnt
            if avail >= n or partial:
                got = n if avail >= n else avail
                for i in range(got):
                    view[i] = self.ba_alloc()
            self.unlock()
        if avail < n and not partial:
            raise OSError(
                errno.ENOSPC,
                f"cannot allocate {n} chunks: only {avail} are free")
        return out if got == out.shape[0] else out[:got].copy()

    def free_many(self, auns):
        """Drop one reference to each chunk, in the order given.

        Returns the number of frees that failed because the chunk was
        already free (0 when all succeeded).  Raises ``IndexError``, changing
        nothing, if any number is out of range.
        """
        cdef const int64_t[::1] view = _aun_array(auns)
        self._check_auns(view)
        cdef Py_ssize_t i, failed = 0, n = view.shape[0]
        with nogil:
            self.lock()
            for i in range(n):
                if self.ba_free(view[i]) != 0:
                    failed += 1
            self.unlock()
        return failed

    def clone_many(self, auns):
        """Add a reference to every chunk, all or none.

        Returns True when every chunk was cloned.  When one cannot be (it is
        free, or at 255 extra references) the clones already made are undone
        and False is returned: the state is as before the call.
        """
        cdef const int64_t[::1] view = _aun_array(auns)
        self._check_auns(view)
        cdef Py_ssize_t i, j, n = view.shape[0]
        cdef bint ok = True
        with nogil:
            self.lock()
            for i in range(n):
                if self.ba_clone(view[i]) != 0:
                    ok = False
                    for j in range(i):
                        self.ba_free(view[j])
                    break
            self.unlock()
        return ok

    # -- introspection ----------------------------------------------------------

    def space(self):
        """The number of free chunks (the kernel's ``ba_space``)."""
        return self.free_aun_cnt

    @property
    def free_count(self):
        """The number of free chunks."""
        return self.free_aun_cnt

    @property
    def cursor(self):
        """The next-fit cursor, as a word index (``free_curr_idx``)."""
        return self.free_curr_idx

    def clone_count(self, int64_t aun):
        """The number of extra references to ``aun`` (0..255)."""
        self._check_aun(aun)
        return self.clone_map[aun]

    def clone_counts(self, auns):
        """The clone counts of many chunks (a uint8 array)."""
        cdef const int64_t[::1] view = _aun_array(auns)
        self._check_auns(view)
        out = np.empty(view.shape[0], dtype=np.uint8)
        cdef uint8_t[::1] o = out
        cdef Py_ssize_t i
        with nogil:
            for i in range(view.shape[0]):
                o[i] = self.clone_map[view[i]]
        return out

    def is_allocated(self, int64_t aun):
        """Whether ``aun`` is allocated."""
        self._check_aun(aun)
        return not (self.bitmap[aun >> 6] & ((<uint64_t> 1) << (aun & 63)))

    def allocated_count(self):
        """Chunks in use (``total_chunks - space()``), counted from the bitmap."""
        cdef int64_t w, free_bits = 0
        with nogil:
            for w in range(self.words):
                free_bits += popcount64(self.bitmap[w])
        return self.total_chunks - free_bits

    def __repr__(self):
        return (f"ChunkAllocator(total_chunks={self.total_chunks}, "
                f"free={self.free_aun_cnt}, cursor={self.free_curr_idx})")
