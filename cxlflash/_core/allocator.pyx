"""The chunk allocator of a LUN in virtual mode (spec §12).

A bitmap of 64-bit words in which a 1 bit means *free*, a word-granular
next-fit cursor with wrap-around, and a one-byte clone count per chunk (the
number of references beyond the first).  The order in which chunks are
handed out is exactly the kernel's, so chunk numbers (``aun``) match it.

Every public method is atomic (it holds the allocator's mutex); the bulk
methods run without the GIL.  The mutex is the innermost lock but one (a
table lock may be held when it is taken, never the other way round; only
the LXT cache's is taken inside it), and its holders never wait for the
GIL -- see the contract at the top of ``tables.pyx``.
"""
from libc.stdint cimport uint8_t, int8_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memset
from cxlflash._core.args cimport arg_int, i64_array
from cxlflash._core.geometry cimport MC_CHUNK_SHIFT, MC_CHUNK_SIZE
from cxlflash._core.includes.system cimport ctz64, popcount64
from cxlflash._core.locks cimport (
    cxl_lock, lock_init, lock_destroy, cxl_mutex_lock, cxl_mutex_unlock,
    CXL_LOCK_MUTEX)

import errno
from cxlflash._core._lazy import numpy as np   # imported on first use

DEF HIBIT = 63
# 2**47 chunks of MC_CHUNK_SIZE (2**16) blocks: 2**63 blocks, every physical LBA an off_t
# (and an int64 translation) can hold.
DEF MAX_TOTAL_CHUNKS = 140737488355328


cdef inline const int64_t[::1] _aun_array(object auns):
    return i64_array(auns, "auns")


cdef class ChunkAllocator:
    """ChunkAllocator(total_chunks)

    The allocator of one LUN with ``total_chunks`` whole chunks
    (``MC_CHUNK_SIZE``, 65536, native blocks each).  Chunk numbers run from 0 to ``total_chunks - 1``.
    """

    def __cinit__(self, total_chunks):
        total_chunks = arg_int(total_chunks, b"total_chunks")
        if total_chunks <= 0 or total_chunks > MAX_TOTAL_CHUNKS:
            raise ValueError(
                f"total_chunks must be 1..{MAX_TOTAL_CHUNKS}, got {total_chunks}: "
                f"a LUN smaller than one chunk ({MC_CHUNK_SIZE} blocks) cannot be virtual")
        self.total_chunks = total_chunks
        self.words = (total_chunks - 1) // 64 + 1
        self.bitmap = <uint64_t *> malloc(self.words * sizeof(uint64_t))
        self.clone_map = <uint8_t *> calloc(total_chunks, sizeof(uint8_t))
        if self.bitmap == NULL or self.clone_map == NULL:
            raise MemoryError(f"cannot allocate the chunk bitmap of {total_chunks} chunks")
        memset(self.bitmap, 0xFF, self.words * sizeof(uint64_t))
        cdef int64_t tail = total_chunks % 64
        if tail:
            # The bits past the last chunk are marked allocated.
            self.bitmap[self.words - 1] = ((<uint64_t> 1) << tail) - 1
        self.free_aun_cnt = total_chunks
        self.free_low_idx = 0
        self.free_curr_idx = 0
        self.free_high_idx = self.words
        self.chunk_limit = total_chunks
        self.parked = 0
        lock_init(&self.mutex, CXL_LOCK_MUTEX)

    def __dealloc__(self):
        # Safe after a failed __cinit__: the memory starts zeroed, and
        # lock_destroy ignores a lock that lock_init never registered.
        free(self.bitmap)
        free(self.clone_map)
        free(self.parked_map)
        lock_destroy(&self.mutex)

    # -- the kernel's algorithms (caller holds the mutex) -------------------

    cdef void lock(self) noexcept nogil:
        cxl_mutex_lock(&self.mutex)

    cdef void unlock(self) noexcept nogil:
        cxl_mutex_unlock(&self.mutex)

    cdef inline bint _parked(self, int64_t aun) noexcept nogil:
        return (self.parked_map != NULL and
                (self.parked_map[aun >> 6] >> (aun & 63)) & 1)

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
        cdef int rc = self.ba_release(aun)
        if rc == 1:
            self._give_back(aun)
            return 0
        return rc

    cdef int ba_release(self, int64_t aun) noexcept nogil:
        cdef int64_t w = aun >> 6
        cdef uint64_t mask = (<uint64_t> 1) << (aun & 63)
        if self.bitmap[w] & mask:
            return -1
        if aun >= self.chunk_limit and self._parked(aun):
            return -1
        if self.clone_map[aun] > 0:
            self.clone_map[aun] -= 1
            return 0
        return 1

    cdef void _give_back(self, int64_t aun) noexcept nogil:
        """Return an allocated chunk with no reference left to the free
        pool -- or park it, when it is at or above the limit."""
        cdef int64_t w = aun >> 6
        cdef uint64_t mask = (<uint64_t> 1) << (aun & 63)
        if aun >= self.chunk_limit:
            self.parked_map[w] |= mask
            self.parked += 1
            return
        self.bitmap[w] |= mask
        self.free_aun_cnt += 1
        if w < self.free_low_idx:
            self.free_low_idx = w
        elif w > self.free_high_idx:
            self.free_high_idx = w

    cdef int ba_clone(self, int64_t aun) noexcept nogil:
        """Add one reference (spec §12.4); -1 if free or at the cap."""
        if self.bitmap[aun >> 6] & ((<uint64_t> 1) << (aun & 63)):
            return -1
        if aun >= self.chunk_limit and self._parked(aun):
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
            aun = lxt[i] >> MC_CHUNK_SHIFT
            # Fast path: 64 consecutive chunks filling one bitmap word (what
            # a fresh grow lays down) are copied and cloned as a block.  The
            # loops have no early exit so the compiler can vectorise them.
            if ((aun & 63) == 0 and i + 64 <= n and aun + 64 <= <uint64_t> self.chunk_limit
                    and self.bitmap[aun >> 6] == 0):
                diff = 0
                for j in range(64):
                    e = lxt[i + j]
                    copy[i + j] = e
                    diff |= (e >> MC_CHUNK_SHIFT) ^ (aun + j)
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
                    self.ba_free(lxt[k] >> MC_CHUNK_SHIFT)
                return -1
            copy[i] = lxt[i]
            i += 1
        return 0

    # -- checks -------------------------------------------------------------

    cdef int64_t _aun(self, object aun) except -1:
        """A chunk number argument: an integer (TypeError otherwise) in
        range (IndexError otherwise)."""
        cdef object v = arg_int(aun, b"aun")
        if v < 0 or v >= self.total_chunks:
            raise IndexError(
                f"chunk {v} is out of range: this allocator has chunks "
                f"0..{self.total_chunks - 1}")
        return <int64_t> v

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

    def free(self, aun_arg):
        """Drop one reference to ``aun``.

        Returns False, changing nothing, when the chunk is already free (the
        kernel's failure result).  A chunk with clone references only loses
        one of them.
        """
        cdef int64_t aun = self._aun(aun_arg)
        cdef int rc
        with nogil:
            self.lock()
            rc = self.ba_free(aun)
            self.unlock()
        return rc == 0

    def clone(self, aun_arg):
        """Add a reference to an allocated chunk.

        Returns False, changing nothing, when the chunk is free or already
        has 255 extra references.
        """
        cdef int64_t aun = self._aun(aun_arg)
        cdef int rc
        with nogil:
            self.lock()
            rc = self.ba_clone(aun)
            self.unlock()
        return rc == 0

    # -- bulk operations (GIL released) ---------------------------------------

    def alloc_many(self, n_arg, *, bint partial=False):
        """Allocate ``n`` chunks; return their numbers as an int64 array.

        The numbers are exactly those ``n`` successive :meth:`alloc` calls
        would return.  When fewer than ``n`` chunks are free, raises
        ``OSError(ENOSPC)`` and changes nothing -- unless ``partial`` is true,
        in which case it allocates what is free (the kernel's grow).
        """
        n_arg = arg_int(n_arg, b"n")
        if n_arg < 0:
            raise ValueError(f"cannot allocate a negative number of chunks ({n_arg})")
        if n_arg > self.total_chunks and not partial:
            raise OSError(errno.ENOSPC, f"cannot allocate {n_arg} chunks: this LUN "
                          f"has {self.total_chunks}")
        cdef Py_ssize_t n = min(n_arg, self.total_chunks)
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

    def release_many(self, auns):
        """Drop one reference to each chunk, in one critical section.

        Returns the chunks whose *last* reference this was, in the order
        given, still allocated: nobody else can be handed them while the
        caller scrubs them (if it must) and then passes them to
        :meth:`free_many`.  A chunk with clone references only loses one.
        Raises ``IndexError`` for an out-of-range number and ``ValueError``
        for a chunk that is free (or dropped more often than it has
        references), changing nothing.
        """
        cdef const int64_t[::1] view = _aun_array(auns)
        self._check_auns(view)
        cdef Py_ssize_t i, n = view.shape[0], last = 0, bad = -1
        out = np.empty(n, dtype=np.int64)
        rcs = np.empty(n, dtype=np.int8)
        cdef int64_t[::1] o = out
        cdef int8_t[::1] r = rcs
        cdef int64_t aun
        cdef uint64_t mask
        with nogil:
            self.lock()
            for i in range(n):
                aun = view[i]
                r[i] = self.ba_release(aun)
                if r[i] < 0:
                    bad = i
                    break
                if r[i] == 1:
                    # Its free bit is set for the rest of this critical
                    # section, so that a repeat in the list is refused
                    # like any double free.
                    self.bitmap[aun >> 6] |= (<uint64_t> 1) << (aun & 63)
                    o[last] = aun
                    last += 1
            if bad >= 0:
                for i in range(bad - 1, -1, -1):
                    if r[i] == 0:
                        self.clone_map[view[i]] += 1
            for i in range(last):
                aun = o[i]
                self.bitmap[aun >> 6] &= ~((<uint64_t> 1) << (aun & 63))
            self.unlock()
        if bad >= 0:
            raise ValueError(
                f"chunk {view[bad]} (at index {bad}) has no reference left to "
                "drop; nothing was changed")
        return out[:last].copy() if last != n else out

    def set_limit(self, limit_arg):
        """Hand out only chunks below ``limit`` (a LUN whose capacity
        shrank, as VERIFY finds).  Free chunks at or above it are parked;
        those in use stay in use and are parked when their last reference
        goes.  Raising the limit again (up to ``total_chunks``) returns the
        parked ones to the free pool.  Chunks below the limit keep the
        kernel's allocation order."""
        limit_arg = arg_int(limit_arg, b"limit")
        if limit_arg < 0 or limit_arg > self.total_chunks:
            raise ValueError(f"limit must be 0..{self.total_chunks}, got {limit_arg}")
        cdef int64_t limit = limit_arg
        cdef int64_t aun, w
        cdef uint64_t mask
        if self.parked_map == NULL and limit < self.total_chunks:
            self.parked_map = <uint64_t *> calloc(self.words, sizeof(uint64_t))
            if self.parked_map == NULL:
                raise MemoryError("cannot allocate the parked-chunk bitmap")
        with nogil:
            self.lock()
            if limit < self.chunk_limit:
                for aun in range(limit, self.chunk_limit):
                    w = aun >> 6
                    mask = (<uint64_t> 1) << (aun & 63)
                    if self.bitmap[w] & mask:
                        self.bitmap[w] &= ~mask
                        self.parked_map[w] |= mask
                        self.free_aun_cnt -= 1
                        self.parked += 1
                self.chunk_limit = limit
            elif limit > self.chunk_limit:
                aun = self.chunk_limit
                self.chunk_limit = limit
                while aun < limit:
                    if self._parked(aun):
                        self.parked_map[aun >> 6] &= ~((<uint64_t> 1) << (aun & 63))
                        self.parked -= 1
                        self._give_back(aun)
                    aun += 1
            self.unlock()

    @property
    def limit(self):
        """Chunks at or above this number are never handed out."""
        return self.chunk_limit

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
        """The number of free chunks (the kernel's ``ba_space``); parked
        chunks (at or above the limit) are not counted."""
        cdef int64_t n
        with nogil:
            self.lock()
            n = self.free_aun_cnt
            self.unlock()
        return n

    @property
    def free_count(self):
        """The number of free chunks."""
        return self.space()

    @property
    def parked_count(self):
        """Chunks held back because they are at or above the limit."""
        cdef int64_t n
        with nogil:
            self.lock()
            n = self.parked
            self.unlock()
        return n

    @property
    def cursor(self):
        """The next-fit cursor, as a word index (``free_curr_idx``)."""
        cdef int64_t n
        with nogil:
            self.lock()
            n = self.free_curr_idx
            self.unlock()
        return n

    def clone_count(self, aun_arg):
        """The number of extra references to ``aun`` (0..255)."""
        cdef int64_t aun = self._aun(aun_arg)
        cdef uint8_t c
        with nogil:
            self.lock()
            c = self.clone_map[aun]
            self.unlock()
        return c

    def clone_counts(self, auns):
        """The clone counts of many chunks (a uint8 array)."""
        cdef const int64_t[::1] view = _aun_array(auns)
        self._check_auns(view)
        out = np.empty(view.shape[0], dtype=np.uint8)
        cdef uint8_t[::1] o = out
        cdef Py_ssize_t i
        with nogil:
            self.lock()
            for i in range(view.shape[0]):
                o[i] = self.clone_map[view[i]]
            self.unlock()
        return out

    def is_allocated(self, aun_arg):
        """Whether ``aun`` is allocated (a parked chunk is not)."""
        cdef int64_t aun = self._aun(aun_arg)
        cdef bint free_bit, parked
        with nogil:
            self.lock()
            free_bit = (self.bitmap[aun >> 6] >> (aun & 63)) & 1
            parked = self._parked(aun)
            self.unlock()
        return not (free_bit or parked)

    def allocated_count(self):
        """Chunks in use, counted from the bitmap (``total_chunks`` less the
        free and the parked ones)."""
        cdef int64_t w, free_bits = 0
        with nogil:
            self.lock()
            for w in range(self.words):
                free_bits += popcount64(self.bitmap[w])
            free_bits += self.parked
            self.unlock()
        return self.total_chunks - free_bits

    def __repr__(self):
        return (f"ChunkAllocator(total_chunks={self.total_chunks}, "
                f"free={self.free_aun_cnt}, cursor={self.free_curr_idx})")
