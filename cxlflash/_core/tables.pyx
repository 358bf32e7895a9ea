"""One context's resource handle table (RHT) and its LXTs (spec §2.5, §2.6).

A handle is a slot of the RHT.  A virtual slot (format 0, ``nmask`` 16)
owns an LXT: one 64-bit entry per chunk of the vLUN,
``(aun << 16) | (lun_index << 8) | (perms << 4) | port_sel``.  A direct slot
(format 1) names the whole physical LUN and passes LBAs through.

Translation follows the AFU (spec §19): handle bounds (0x03), slot open
(0x01), RHT permission (0x05), chunk bounds (0x13), LXT permission (0x15),
then ``plba = (entry & ~0xFFFF) | (vlba & 0xFFFF)``.

Locking contract (``tables.pxd`` lists it; every core module obeys it):

1. Every change to a table -- RHT entries, LXT contents, pointer and
   capacity, ``rht_out``, ``state``, the watched epoch -- holds its write
   lock.  A change of state therefore waits for every transfer in flight
   through the table, and no transfer starts under a state that refuses
   it: that is the fence behind close, release, detach, delete and reset.
2. Every read of them holds the read lock (or the write lock), with or
   without the GIL: the GIL protects nothing here, since changes are made
   with it released.  Only ``state`` may also be read alone, atomically,
   for reporting.
3. No thread waits for a table lock while holding the GIL: it tries, and
   if the lock is busy, releases the GIL to wait.  So a holder may take
   the GIL (to raise, to build an array) without deadlock.
4. A decision and the change it justifies are one critical section (the
   free slot is picked and filled under one write lock).
5. Lock order: one table lock, then an allocator mutex, then the LXT cache
   mutex (``lxtmem``).  Never two table locks at once (a clone copies its source under
   the source's read lock, drops it, then installs the copy under the
   destination's write lock); never a table lock while holding an
   allocator mutex.  The write lock is recursive for its holder, so a
   :meth:`ResourceTable.fence` block may call the table's own methods.
6. At fork(), ``cxlflash._core.locks`` leaves every lock usable in the
   child.  The driver's per-context mutex is not needed for any of this.
7. Asynchronous requests (``engine.pyx``) do not hold the read lock while
   they are in flight: each is checked and translated under it, runs there
   what cannot block on a device (a page-cache hit, a memory store), and
   counts itself into ``aio_inflight`` before the lock is dropped if
   anything is left for the backend; the engine counts it out when it
   completes.  The write lock, once taken (first
   hold), waits for that count to reach zero -- reaping completions on the
   engine meanwhile, so it never waits for one that only it could reap --
   which makes every change of rule 1 a fence for asynchronous I/O too.
   Entering TABLE_IN_ERROR moves ``fail_gen`` first: what was in flight
   completes with the reset error.  Both are atomics.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, realloc, free
from libc.string cimport memcpy, memset
from posix.unistd cimport getpid
from cxlflash._core.allocator cimport ChunkAllocator
from cxlflash._core.args cimport arg_fd, arg_int, arg_u64, i64_array, u64_array
from cxlflash._core.lxtmem cimport lxt_alloc, lxt_free, BIG_LXT
from cxlflash._core.locks cimport (
    cxl_lock, lock_init, lock_destroy, cxl_rdlock, cxl_tryrdlock, cxl_wrlock,
    cxl_trywrlock, cxl_unlock, CXL_LOCK_RW)

import errno
from cxlflash._core._lazy import numpy as np   # imported on first use
from cxlflash._core.errors import afu_error, AfuError, AdapterResetError

ctypedef fused lba_t:
    int64_t
    uint64_t

cdef extern from *:
    """
    #define cxl_load_int(p) __atomic_load_n((p), __ATOMIC_RELAXED)
    #define cxl_store_int(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
    #define cxl_load_i64(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define cxl_store_i64(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
    #define cxl_add_u64(p, v) __atomic_add_fetch((p), (v), __ATOMIC_ACQ_REL)
    """
    int cxl_load_int(int *p) nogil
    void cxl_store_int(int *p, int v) nogil
    int64_t cxl_load_i64(int64_t *p) nogil
    void cxl_store_i64(int64_t *p, int64_t v) nogil
    uint64_t cxl_add_u64(uint64_t *p, uint64_t v) nogil

cdef uint64_t NO_LIMIT = 0xFFFFFFFFFFFFFFFF
# The largest chunk number: its physical LBAs stay below 2**63 (an off_t,
# and translate_one's int64).
DEF MAX_AUN = 140737488355327
MAX_RHT_SIZE = 4096


cdef inline uint64_t lxt_groups(uint64_t n) noexcept nogil:
    # n is at most 2**32 - 1 (lxt_cnt is 32 bits): no overflow.
    return (n + LXT_GROUP_SIZE - 1) // LXT_GROUP_SIZE


cdef inline uint64_t lxt_cap_for(uint64_t n) noexcept nogil:
    return lxt_groups(n) * LXT_GROUP_SIZE


# -- arguments (the rule of cxlflash._core.args; a handle or a chunk count
# outside its range keeps this module's own exception) ---------------------------

cdef uint32_t handle_arg(object handle, uint32_t rht_size) except? 0xFFFFFFFF:
    cdef object v = arg_int(handle, b"handle")
    if v < 0 or v >= rht_size:
        raise IndexError(f"resource handle {v} is out of range (0..{rht_size - 1})")
    return <uint32_t> v


cdef int perms_arg(object perms) except -1:
    cdef object v = arg_int(perms, b"perms")
    if v < 0 or v > RHT_PERM_RW:
        raise ValueError(f"perms must be 0..3 (1 read, 2 write), got {v}")
    return <int> v


cdef uint64_t count_arg(object n, const char *name) except? 0xFFFFFFFFFFFFFFFF:
    """A number of chunks: at least 0; beyond 2**64-1 it means "as many as
    can be" for a grow and "more than the vLUN has" for a shrink."""
    cdef object v = arg_int(n, name)
    if v < 0:
        raise ValueError(f"{name.decode()} must not be negative, got {v}")
    return <uint64_t> min(v, NO_LIMIT)


cdef uint64_t lxt_low_bits(object lun_index, object port_sel) except? 0xFFFFFFFFFFFFFFFF:
    """The low 16 bits of an LXT entry the driver writes (RW permissions)."""
    cdef object li = arg_int(lun_index, b"lun_index"), ps = arg_int(port_sel, b"port_sel")
    if not 0 <= li <= 0xFF:
        raise ValueError(f"lun_index must be 0..255, got {li}")
    if not 0 <= ps <= 0xF:
        raise ValueError(f"port_sel must be a 4-bit port mask, got {ps}")
    return ((<uint64_t> li) << LXT_LUNIDX_SHIFT) | (RHT_PERM_RW << LXT_PERM_SHIFT) | <uint64_t> ps


cdef inline uint64_t entry_extent(const rht_entry *e) noexcept nogil:
    """Blocks addressable through an entry (a direct LUN's last LBA + 1
    wraps to 0 for a LUN of 2**64 blocks, which no backing store has)."""
    if (e.fp >> 4) == RHT_FMT_DIRECT:
        return e.last_lba + 1
    return (<uint64_t> e.lxt_cnt) << MC_CHUNK_SHIFT


cdef object lxt_auns(const uint64_t *lxt, uint64_t cnt):
    """The chunk numbers of the first ``cnt`` entries of an LXT, in order
    (the caller holds its table's lock, or owns the LXT alone)."""
    out = np.empty(cnt, dtype=np.int64)
    cdef int64_t[::1] v = out
    cdef uint64_t i
    with nogil:
        for i in range(cnt):
            v[i] = <int64_t> (lxt[i] >> MC_CHUNK_SHIFT)
    return out


cdef object state_error(int state, uint32_t handle):
    """The exception for a transfer or translation on a table not LIVE."""
    if state == TABLE_IN_ERROR:
        return AdapterResetError()
    if state == TABLE_FOREIGN:
        return AfuError(0x21, "AFU rc 0x21 CAP_VIOLATION: this context belongs to "
                        "another process (a forked child must attach its own "
                        "context and clone)")
    return AfuError(0x21, "AFU rc 0x21 CAP_VIOLATION: the context no longer "
                    "exists (detached or closed)")


cdef class ResourceTable:
    """ResourceTable(rht_size=256)

    The RHT of one context: ``rht_size`` handles, 0..rht_size-1.
    """

    def __cinit__(self, rht_size=256):
        rht_size = arg_int(rht_size, b"rht_size")
        if rht_size < 1 or rht_size > MAX_RHT_SIZE:
            raise ValueError(
                f"rht_size must be 1..{MAX_RHT_SIZE} (the kernel has 256 with "
                f"4 KiB pages and 4096 with 64 KiB pages), got {rht_size}")
        self.rht = <rht_entry *> calloc(rht_size, sizeof(rht_entry))
        if self.rht == NULL:
            raise MemoryError("cannot allocate the resource handle table")
        self.rht_size = rht_size
        self.rht_out = 0
        self.tstate = TABLE_LIVE
        lock_init(&self.lock, CXL_LOCK_RW)

    def __dealloc__(self):
        # Safe after a failed __cinit__: the object starts zeroed and
        # lock_destroy ignores a lock that was never registered.
        cdef uint32_t i
        if self.rht != NULL:
            for i in range(self.rht_size):
                lxt_free(self.rht[i].lxt, self.rht[i].lxt_cap)
            free(self.rht)
        lock_destroy(&self.lock)

    # -- locks ----------------------------------------------------------------

    cdef void read_lock(self) noexcept nogil:
        cxl_rdlock(&self.lock)

    cdef void write_lock(self) noexcept nogil:
        cxl_wrlock(&self.lock)
        if self.lock.depth == 1 and cxl_load_i64(&self.aio_inflight) > 0:
            self._wait_aio()

    cdef void unlock(self) noexcept nogil:
        cxl_unlock(&self.lock)

    cdef int _rlock(self) except -1:
        if cxl_tryrdlock(&self.lock) != 0:
            with nogil:
                cxl_rdlock(&self.lock)
        return 0

    cdef int _wlock(self) except -1:
        if cxl_trywrlock(&self.lock) != 0:
            with nogil:
                cxl_wrlock(&self.lock)
        if self.lock.depth == 1 and cxl_load_i64(&self.aio_inflight) > 0:
            with nogil:
                self._wait_aio()
        return 0

    cdef void _wait_aio(self) noexcept nogil:
        if self.aio_pid != getpid():
            # a forked child's copy: those requests are the parent's
            cxl_store_i64(&self.aio_inflight, 0)
        elif self.aio_wait != NULL:
            self.aio_wait(self.aio_engine, &self.aio_inflight)

    cdef int live_state(self) noexcept nogil:
        if self.tstate == TABLE_LIVE and self.epoch_word != NULL and \
                self.epoch_word[0] != self.epoch_seen:
            return TABLE_IN_ERROR       # the owner reset the AFU since
        return self.tstate

    @property
    def state(self):
        """The table's :class:`TableState` (read alone, for reporting)."""
        return TableState(cxl_load_int(&self.tstate))

    @state.setter
    def state(self, value):
        self.set_state(value)

    def set_state(self, state):
        """Change the state under the write lock: returns once every
        transfer in flight through the table has finished; from then on
        none starts unless the state is ``TABLE_LIVE``.  This is the fence
        to pass before a backing fd is closed or chunks change hands."""
        state = arg_int(state, b"state")
        if state < TABLE_LIVE or state > TABLE_FOREIGN:
            raise ValueError(f"not a table state: {state}")
        if state == TABLE_IN_ERROR and cxl_load_int(&self.tstate) != TABLE_IN_ERROR:
            # Before the write lock waits for them: the asynchronous
            # requests in flight complete with the reset error.
            cxl_add_u64(&self.fail_gen, 1)
        self._wlock()
        cxl_store_int(&self.tstate, state)
        self.unlock()

    def fence(self):
        """A context manager that holds the write lock across a block: I/O
        through the table from other threads waits until the block ends;
        the block itself may call this table's methods (but must not wait
        for I/O through it from another thread)."""
        return _Fence(self)

    # -- the cdef interface ---------------------------------------------------

    cdef int lookup(self, uint32_t handle, int write) noexcept nogil:
        cdef rht_entry *e
        if handle >= self.rht_size:
            return AFU_RC_RHT_OUT_OF_BOUNDS
        e = &self.rht[handle]
        if e.nmask == 0 or ((e.fp >> 4) == RHT_FMT_DIRECT and not e.valid):
            return AFU_RC_RHT_INVALID
        if not (e.fp & (RHT_PERM_WRITE if write else RHT_PERM_READ)):
            return AFU_RC_RHT_RW_PERM
        return AFU_RC_OK

    cdef int64_t translate_one(self, uint32_t handle, uint64_t vlba,
                               int write, int *afu_rc) noexcept nogil:
        cdef rht_entry *e = &self.rht[handle]
        cdef uint64_t chunk, entry
        if (e.fp >> 4) == RHT_FMT_DIRECT:
            if vlba > e.last_lba:
                afu_rc[0] = SCSI_LBA_OUT_OF_RANGE
                return -1
            return <int64_t> vlba
        chunk = vlba >> MC_CHUNK_SHIFT
        if chunk >= e.lxt_cnt:
            afu_rc[0] = AFU_RC_LXT_OUT_OF_BOUNDS
            return -1
        entry = e.lxt[chunk]
        if not ((entry >> LXT_PERM_SHIFT) & (RHT_PERM_WRITE if write else RHT_PERM_READ)):
            afu_rc[0] = AFU_RC_LXT_RW_PERM
            return -1
        return <int64_t> ((entry & ~(<uint64_t> MC_CHUNK_OFF_MASK)) | (vlba & MC_CHUNK_OFF_MASK))

    cdef int backing_fd(self, uint32_t handle, int fallback) noexcept nogil:
        cdef int fd = self.rht[handle].fd
        return fd if fd >= 0 else fallback

    cdef uint64_t _extent(self, uint32_t handle) noexcept nogil:
        return entry_extent(&self.rht[handle])

    # -- helpers (the caller holds the lock) -----------------------------------

    cdef void _touch(self, rht_entry *e) noexcept nogil:
        self.generation += 1
        e.gen = self.generation

    cdef rht_entry *_entry(self, uint32_t handle, bint want_open=True) except NULL:
        if handle >= self.rht_size:
            raise IndexError(
                f"resource handle {handle} is out of range (0..{self.rht_size - 1})")
        if want_open and self.rht[handle].nmask == 0:
            raise ValueError(f"resource handle {handle} is not open")
        return &self.rht[handle]

    cdef rht_entry *_virtual(self, uint32_t handle) except NULL:
        cdef rht_entry *e = self._entry(handle)
        if (e.fp >> 4) != RHT_FMT_VIRTUAL:
            raise ValueError(f"resource handle {handle} is a direct handle, not a virtual LUN")
        return e

    cdef int _free_slot(self) noexcept nogil:
        """The lowest free handle, or -1."""
        cdef uint32_t i
        for i in range(self.rht_size):
            if self.rht[i].nmask == 0:
                return <int> i
        return -1

    cdef int _set_lxt_capacity(self, rht_entry *e, uint64_t n) noexcept nogil:
        """Reallocate ``e.lxt`` when the number of 8-entry groups changes.

        Returns -1, changing nothing, when memory runs out.  Called with the
        write lock held (and maybe an allocator mutex), without the GIL.
        """
        cdef uint64_t cap = lxt_cap_for(n)
        cdef uint64_t *p
        if cap == e.lxt_cap:
            return 0
        if cap == 0:
            lxt_free(e.lxt, e.lxt_cap)
            e.lxt = NULL
            e.lxt_cap = 0
            return 0
        if cap * sizeof(uint64_t) < BIG_LXT and e.lxt_cap * sizeof(uint64_t) < BIG_LXT:
            p = <uint64_t *> realloc(e.lxt, cap * sizeof(uint64_t))
            if p == NULL:
                return -1
        else:
            p = lxt_alloc(cap)
            if p == NULL:
                return -1
            if e.lxt != NULL:
                memcpy(p, e.lxt, (cap if cap < e.lxt_cap else e.lxt_cap) * sizeof(uint64_t))
                lxt_free(e.lxt, e.lxt_cap)
        if cap > e.lxt_cap:
            memset(p + e.lxt_cap, 0, (cap - e.lxt_cap) * sizeof(uint64_t))
        e.lxt = p
        e.lxt_cap = cap
        return 0

    # -- opening and closing handles ------------------------------------------------

    def open_virtual(self, perms, *, fd=-1):
        """Check out the lowest free handle as an empty virtual LUN.

        ``perms``: RHT permission bits (1 read, 2 write, 3 both).  ``fd``:
        the backing store the vLUN's chunks live on; transfers through the
        handle use it (read under the table lock), whatever fd their
        caller names, so a handle number re-opened on another LUN never
        reaches the old LUN's store.  Raises ``OSError(EMFILE)`` when every
        handle is open.
        """
        cdef rht_entry e
        memset(&e, 0, sizeof(rht_entry))
        e.fp = (RHT_FMT_VIRTUAL << 4) | perms_arg(perms)
        e.nmask = MC_RHT_NMASK
        e.fd = arg_fd(fd)
        return self._checkout(&e)

    cdef int _checkout(self, const rht_entry *init) except -1:
        """Fill the lowest free slot with ``init``, in one critical section
        with finding it: the handle, or ``OSError(EMFILE)``."""
        cdef int h
        self._wlock()
        h = self._free_slot()
        if h >= 0:
            memcpy(&self.rht[h], init, sizeof(rht_entry))
            self._touch(&self.rht[h])
            self.rht_out += 1
        self.unlock()
        if h < 0:
            raise OSError(errno.EMFILE,
                          f"all {self.rht_size} resource handles of this context are open")
        return h

    def open_direct(self, perms, lun_id, port_sel, last_lba, *, fd=-1):
        """Check out the lowest free handle as a direct (physical) handle.

        ``last_lba`` is the LUN's last native LBA; LBAs beyond it are
        refused.  ``fd``: the LUN's backing store (see :meth:`open_virtual`).
        Raises ``OSError(EMFILE)`` when every handle is open.
        """
        cdef rht_entry e
        memset(&e, 0, sizeof(rht_entry))
        e.fp = (RHT_FMT_DIRECT << 4) | perms_arg(perms)
        e.lun_id = arg_u64(lun_id, b"lun_id", NO_LIMIT)
        e.last_lba = arg_u64(last_lba, b"last_lba", NO_LIMIT)
        port_sel = arg_int(port_sel, b"port_sel")
        if not 0 < port_sel <= 0xF:
            raise ValueError(f"port_sel must be a nonzero 4-bit port mask, got {port_sel}")
        e.nmask = <uint8_t> port_sel
        e.valid = DIRECT_VALID
        e.fd = arg_fd(fd)
        return self._checkout(&e)

    def close(self, handle):
        """Check the handle in, clearing the whole entry, once the I/O in
        flight through it has finished.

        Returns the chunks the handle still mapped (normally none: callers
        shrink a vLUN to 0 first) so the caller can free them.
        """
        cdef uint32_t h_ = handle_arg(handle, self.rht_size)
        cdef rht_entry *e
        self._wlock()
        try:
            e = self._entry(h_)
            auns = lxt_auns(e.lxt, e.lxt_cnt)
            lxt_free(e.lxt, e.lxt_cap)
            memset(e, 0, sizeof(rht_entry))
            self._touch(e)
            self.rht_out -= 1
        finally:
            self.unlock()
        return auns

    # -- growing and shrinking a vLUN ------------------------------------------------

    def grow(self, handle, auns, lun_index, port_sel):
        """Append chunks ``auns`` (in order) at the tail of a vLUN.

        Each LXT entry is written as the driver does, with RW permissions.
        """
        cdef uint32_t h_ = handle_arg(handle, self.rht_size)
        cdef uint64_t low = lxt_low_bits(lun_index, port_sel)
        cdef const int64_t[::1] a = i64_array(auns, "auns")
        if a.shape[0] and (np.min(a) < 0 or np.max(a) > MAX_AUN):
            raise IndexError(f"auns must be chunk numbers 0..{MAX_AUN} (a physical "
                             "LBA is below 2**63)")
        cdef rht_entry *e
        cdef uint64_t old, n = a.shape[0], i
        cdef int rc = 0
        self._wlock()
        try:
            e = self._virtual(h_)
            old = e.lxt_cnt
            if n > 0xFFFFFFFF - old:
                raise ValueError("a vLUN holds at most 2**32 - 1 chunks")
            if n:
                with nogil:
                    rc = self._set_lxt_capacity(e, old + n)
                    if rc == 0:
                        for i in range(n):
                            e.lxt[old + i] = ((<uint64_t> a[i]) << MC_CHUNK_SHIFT) | low
                        e.lxt_cnt = <uint32_t> (old + n)
                        self._touch(e)
        finally:
            self.unlock()
        if rc != 0:
            raise MemoryError(f"cannot allocate an LXT of {old + n} entries")

    def grow_from(self, handle, ChunkAllocator allocator not None, n,
                  lun_index, port_sel):
        """Grow a vLUN by up to ``n`` chunks taken straight from
        ``allocator`` into the LXT (the kernel's grow loop, spec §11.3):
        fewer when fewer are free.  Returns the number of chunks added; 0
        changes nothing.  Raises MemoryError when the LXT cannot grow."""
        cdef uint32_t h_ = handle_arg(handle, self.rht_size)
        cdef uint64_t low = lxt_low_bits(lun_index, port_sel)
        cdef uint64_t n_ = count_arg(n, b"n")
        cdef rht_entry *e
        cdef uint64_t old = 0, k = 0, i
        cdef int rc = 0
        self._wlock()
        try:
            e = self._virtual(h_)
            old = e.lxt_cnt
            if n_ > 0xFFFFFFFF - old:
                n_ = 0xFFFFFFFF - old
            with nogil:
                allocator.lock()
                k = n_ if <uint64_t> allocator.free_aun_cnt >= n_ else <uint64_t> allocator.free_aun_cnt
                if k:
                    rc = self._set_lxt_capacity(e, old + k)
                    if rc == 0:
                        for i in range(k):
                            e.lxt[old + i] = ((<uint64_t> allocator.ba_alloc()) << MC_CHUNK_SHIFT) | low
                        e.lxt_cnt = <uint32_t> (old + k)
                        self._touch(e)
                allocator.unlock()
        finally:
            self.unlock()
        if rc != 0:
            raise MemoryError(f"cannot allocate an LXT of {old + k} entries")
        return k

    def shrink(self, handle, new_count):
        """Cut a vLUN to ``new_count`` chunks, once the I/O in flight
        through the table has finished.

        Returns the removed chunk numbers in the order the kernel frees them:
        the last chunk first.
        """
        cdef uint32_t h_ = handle_arg(handle, self.rht_size)
        cdef uint64_t new_count_ = count_arg(new_count, b"new_count")
        cdef rht_entry *e
        cdef uint64_t old, i, n
        cdef int64_t[::1] v
        self._wlock()
        try:
            e = self._virtual(h_)
            old = e.lxt_cnt
            if new_count_ > old:
                raise ValueError(f"cannot shrink handle {h_} from {old} to {new_count_} chunks")
            n = old - new_count_
            out = np.empty(n, dtype=np.int64)
            v = out
            with nogil:
                for i in range(n):
                    v[i] = <int64_t> (e.lxt[old - 1 - i] >> MC_CHUNK_SHIFT)
                e.lxt_cnt = <uint32_t> new_count_
                self._touch(e)
                # A smaller LXT that cannot be had keeps the larger one.
                self._set_lxt_capacity(e, new_count_)
        finally:
            self.unlock()
        return out

    # -- translation -----------------------------------------------------------------

    def translate(self, handle, vlba, bint write=False):
        """Translate one LBA as the AFU would; raises :class:`AfuError`
        (or :class:`AdapterResetError` for a table in error)."""
        cdef uint32_t h_ = <uint32_t> arg_u64(handle, b"handle", 0xFFFFFFFF)
        cdef uint64_t vlba_ = arg_u64(vlba, b"vlba", NO_LIMIT)
        cdef int64_t plba = -1
        cdef int rc = AFU_RC_OK, state
        cdef uint64_t extent = 0
        self._rlock()
        state = self.live_state()
        if state == TABLE_LIVE:
            rc = self.lookup(h_, write)
            if rc == AFU_RC_OK:
                plba = self.translate_one(h_, vlba_, write, &rc)
            if rc != AFU_RC_OK and h_ < self.rht_size:
                extent = self._extent(h_)
        self.unlock()
        if state != TABLE_LIVE:
            raise state_error(state, h_)
        # Test the code, not the sign: a direct LBA >= 2**63 is valid.
        if rc != AFU_RC_OK:
            raise afu_error(rc, h_, vlba_, write=write,
                            extent=extent if h_ < self.rht_size else None)
        return <uint64_t> plba

    def translate_many(self, handle, const lba_t[::1] vlbas, out=None,
                       bint write=False):
        """Translate an array of LBAs without the GIL.

        ``vlbas`` is a contiguous int64 or uint64 array; the physical LBAs go
        to ``out`` (a uint64 array of the same length, allocated when None),
        which is returned.  The first refused LBA raises :class:`AfuError`
        with ``index`` set to its position and ``afu_rc`` to the code.
        """
        cdef uint32_t h_ = <uint32_t> arg_u64(handle, b"handle", 0xFFFFFFFF)
        cdef Py_ssize_t n = vlbas.shape[0]
        if out is None:
            out = np.empty(n, dtype=np.uint64)
        elif not (isinstance(out, np.ndarray) and out.dtype == np.uint64
                  and out.shape == (n,)):
            raise TypeError(f"out must be a uint64 array of shape ({n},)")
        cdef uint64_t[::1] o = out
        cdef Py_ssize_t i, bad = -1
        cdef int rc = AFU_RC_OK
        cdef rht_entry *e
        cdef uint64_t v, chunk, entry, cnt, need, last
        cdef uint64_t *lxt
        cdef uint64_t extent = 0
        cdef bint all_ok
        cdef int state
        with nogil:
            self.read_lock()
            state = self.live_state()
            rc = self.lookup(h_, write) if state == TABLE_LIVE else AFU_RC_OK
            if state != TABLE_LIVE:
                pass
            elif rc != AFU_RC_OK:
                bad = 0 if n else -1
            else:
                e = &self.rht[h_]
                need = RHT_PERM_WRITE if write else RHT_PERM_READ
                if (e.fp >> 4) == RHT_FMT_DIRECT:
                    last = e.last_lba
                    for i in range(n):
                        v = <uint64_t> vlbas[i]
                        if v > last:
                            rc = SCSI_LBA_OUT_OF_RANGE
                            bad = i
                            break
                        o[i] = v
                else:
                    cnt = e.lxt_cnt
                    lxt = e.lxt
                    # The LXT permissions are checked once per entry up front
                    # when the LXT is no longer than the batch; then the loop
                    # checks only the bounds.
                    all_ok = cnt <= <uint64_t> n
                    if all_ok:
                        for i in range(<Py_ssize_t> cnt):
                            if not ((lxt[i] >> LXT_PERM_SHIFT) & need):
                                all_ok = False
                                break
                    if all_ok:
                        for i in range(n):
                            v = <uint64_t> vlbas[i]
                            chunk = v >> MC_CHUNK_SHIFT
                            if chunk >= cnt:
                                rc = AFU_RC_LXT_OUT_OF_BOUNDS
                                bad = i
                                break
                            o[i] = (lxt[chunk] & ~(<uint64_t> MC_CHUNK_OFF_MASK)) | (v & MC_CHUNK_OFF_MASK)
                    else:
                        for i in range(n):
                            v = <uint64_t> vlbas[i]
                            chunk = v >> MC_CHUNK_SHIFT
                            if chunk >= cnt:
                                rc = AFU_RC_LXT_OUT_OF_BOUNDS
                                bad = i
                                break
                            entry = lxt[chunk]
                            if not ((entry >> LXT_PERM_SHIFT) & need):
                                rc = AFU_RC_LXT_RW_PERM
                                bad = i
                                break
                            o[i] = (entry & ~(<uint64_t> MC_CHUNK_OFF_MASK)) | (v & MC_CHUNK_OFF_MASK)
            if bad >= 0 and h_ < self.rht_size:
                extent = self._extent(h_)
            self.unlock()
        if state != TABLE_LIVE:
            raise state_error(state, h_)
        if bad >= 0:
            raise afu_error(rc, h_, int(vlbas[bad]), index=bad, write=write,
                            extent=extent if h_ < self.rht_size else None)
        return out

    # -- clone -------------------------------------------------------------------------

    def clone_slot(self, ResourceTable src not None, handle, perms,
                   ChunkAllocator allocator=None):
        """Copy ``src``'s open entry ``handle`` into this (free) slot.

        Permissions become src ∩ ``perms``; the LXT is copied verbatim.
        Returns the chunk numbers whose clone counts the caller must raise
        (empty for a direct entry).  With ``allocator``, their clone counts
        are raised here, in the same pass, all or none, and an empty array
        is returned; when one cannot be (a chunk not allocated, or already
        at 255 clones) ``OSError(EIO)`` is raised and nothing changes.

        The source is copied under its read lock, which is then dropped;
        the copy is installed under this table's write lock (never both).
        """
        cdef uint32_t h_ = handle_arg(handle, self.rht_size)
        cdef int p_ = perms_arg(perms)
        if src is self:
            raise ValueError("cannot clone a table into itself")
        cdef rht_entry *s
        cdef rht_entry *d
        cdef rht_entry snap
        cdef uint64_t cnt = 0, cap = 0
        cdef uint64_t *lxt = NULL
        cdef int rc = 0
        cdef bint busy = False
        src._rlock()
        try:
            s = src._entry(h_)
            memcpy(&snap, s, sizeof(rht_entry))
            cnt = s.lxt_cnt
            cap = lxt_cap_for(cnt)
            if cnt:
                with nogil:
                    lxt = lxt_alloc(cap)
                    if lxt != NULL:
                        memset(lxt + cnt, 0, (cap - cnt) * sizeof(uint64_t))
                        if allocator is None:
                            memcpy(lxt, s.lxt, cnt * sizeof(uint64_t))
                        else:
                            # One pass: the copy raises the clone counts.
                            allocator.lock()
                            rc = allocator.clone_lxt(s.lxt, lxt, cnt)
                            allocator.unlock()
                if lxt == NULL:
                    raise MemoryError(f"cannot allocate an LXT of {cnt} entries")
        finally:
            src.unlock()
        if rc:
            lxt_free(lxt, cap)
            raise OSError(errno.EIO, f"cannot clone handle {h_}: a chunk is "
                          "not allocated or already has 255 clones")
        # Read while the copy is still this thread's alone.
        auns = lxt_auns(lxt, cnt)
        self._wlock()
        d = &self.rht[h_]
        busy = d.nmask != 0
        if not busy:
            memcpy(d, &snap, sizeof(rht_entry))
            d.fp = snap.fp & (0xFC | (p_ & 3))
            d.lxt = lxt
            d.lxt_cap = cap if cnt else 0
            self._touch(d)
            self.rht_out += 1
        self.unlock()
        if busy:
            if allocator is not None:
                allocator.free_many(auns)       # the references it took
            lxt_free(lxt, cap)
            raise ValueError(f"resource handle {h_} of the destination is open")
        return auns if allocator is None else np.empty(0, dtype=np.int64)

    def clone_from(self, ResourceTable src not None, perms,
                   ChunkAllocator allocator=None):
        """Copy every open entry of ``src`` (handle numbers kept).

        Returns ``[(handle, auns), ...]``: for each copied handle, the chunks
        whose clone counts the caller must raise -- or, with ``allocator``,
        raises them here (see :meth:`clone_slot`; a failure undoes the
        handles already copied).  This table must have no open handle.
        """
        perms_arg(perms)
        if self.open_handles():
            raise ValueError("the destination table has open handles")
        if src.rht_size > self.rht_size:
            raise ValueError("the source table is larger than the destination")
        done = []
        try:
            for h in src.open_handles():
                done.append((h, self.clone_slot(src, h, perms, allocator)))
        except BaseException:
            for h, _ in done:
                auns = self.close(h)
                if allocator is not None:
                    allocator.free_many(auns)
            raise
        return done

    def load_slot(self, handle, fmt, perms, nmask, lxt=None, lun_id=0,
                  last_lba=0, valid=0, bint replace=False, fd=-1):
        """Set a slot from a snapshot of another table's entry (what
        :meth:`entry` and :meth:`lxt` report): for a replica of a table
        kept in another process.  The LXT is copied verbatim.  The slot
        must be free, unless ``replace``: then an open slot is swapped in
        one step (I/O in flight finishes first)."""
        cdef uint32_t h_ = handle_arg(handle, self.rht_size)
        cdef int p_ = perms_arg(perms), fd_ = arg_fd(fd)
        cdef uint64_t lun_id_ = arg_u64(lun_id, b"lun_id", NO_LIMIT)
        cdef uint64_t last_lba_ = arg_u64(last_lba, b"last_lba", NO_LIMIT)
        cdef uint8_t valid_ = <uint8_t> arg_u64(valid, b"valid", 0xFF)
        fmt = arg_int(fmt, b"fmt")
        nmask = arg_int(nmask, b"nmask")
        if nmask <= 0 or nmask > 0xFF or fmt not in (RHT_FMT_VIRTUAL, RHT_FMT_DIRECT):
            raise ValueError("not an open entry (format 0 or 1, nmask 1..255)")
        cdef const uint64_t[::1] src
        cdef uint64_t cnt = 0, cap = 0
        cdef uint64_t *p = NULL
        cdef rht_entry *e
        cdef bint was_open
        if fmt == RHT_FMT_VIRTUAL and lxt is not None and len(lxt):
            src = u64_array(lxt, "lxt")
            cnt = src.shape[0]
            if cnt and np.max(src) >> <int> MC_CHUNK_SHIFT > MAX_AUN:
                raise ValueError(f"lxt maps a chunk beyond {MAX_AUN} (a physical LBA "
                                 "is below 2**63)")
            if cnt > 0xFFFFFFFF:
                raise ValueError("a vLUN holds at most 2**32 - 1 chunks")
            cap = lxt_cap_for(cnt)
            p = lxt_alloc(cap)
            if p == NULL:
                raise MemoryError(f"cannot allocate an LXT of {cnt} entries")
            memcpy(p, &src[0], cnt * sizeof(uint64_t))
            memset(p + cnt, 0, (cap - cnt) * sizeof(uint64_t))
        self._wlock()
        e = &self.rht[h_]
        was_open = e.nmask != 0
        if not was_open or replace:
            lxt_free(e.lxt, e.lxt_cap)
            memset(e, 0, sizeof(rht_entry))
            e.fp = <uint8_t> ((fmt << 4) | (p_ & 3))
            e.nmask = <uint8_t> nmask
            e.lxt = p
            e.lxt_cnt = <uint32_t> cnt
            e.lxt_cap = cap
            e.lun_id = lun_id_
            e.last_lba = last_lba_
            e.valid = <uint8_t> valid_
            e.fd = fd_
            self._touch(e)
            if not was_open:
                self.rht_out += 1
            p = NULL
        self.unlock()
        if p != NULL:
            lxt_free(p, cap)
            raise ValueError(f"resource handle {h_} is open")

    def follow_capacity(self, fd, last_lba):
        """A LUN's capacity changed (VERIFY read it again): every open
        direct handle opened on backing ``fd`` now ends at ``last_lba``,
        as the device itself refuses LBAs beyond its capacity.  Waits for
        the transfers in flight; returns the number of handles changed."""
        cdef int fd_ = arg_fd(fd)
        cdef uint64_t last = arg_u64(last_lba, b"last_lba", NO_LIMIT)
        cdef uint32_t i, n = 0
        cdef rht_entry *e
        if fd_ < 0:
            return 0
        self._wlock()
        for i in range(self.rht_size):
            e = &self.rht[i]
            if e.nmask != 0 and (e.fp >> 4) == RHT_FMT_DIRECT and e.fd == fd_ \
                    and e.last_lba != last:
                e.last_lba = last
                self._touch(e)
                n += 1
        self.unlock()
        return n

    def watch_epoch(self, buffer, seen):
        """Follow the reset epoch at the start of ``buffer`` (8 bytes of
        shared memory): while it differs from ``seen`` the data path finds
        the table in error."""
        cdef uint64_t seen_ = arg_u64(seen, b"seen", NO_LIMIT)
        cdef const unsigned char[::1] view = memoryview(buffer).cast("B")
        if view.shape[0] < 8 or (<size_t> &view[0]) % 8:
            raise ValueError("the epoch needs 8 aligned bytes")
        self._wlock()
        self.epoch_buffer = view
        self.epoch_word = <const uint64_t *> &view[0]
        self.epoch_seen = seen_
        self.unlock()

    # -- introspection -------------------------------------------------------------------

    def mapped_chunks(self):
        """The chunks every virtual handle of the table maps, in one read
        (a handle closed by another thread meanwhile is simply not counted)."""
        cdef uint32_t i
        cdef uint64_t n = 0
        self._rlock()
        for i in range(self.rht_size):
            if self.rht[i].nmask != 0 and (self.rht[i].fp >> 4) == RHT_FMT_VIRTUAL:
                n += self.rht[i].lxt_cnt
        self.unlock()
        return n

    def changed_since(self, since):
        """``(generation, handles)``: the table's change count now, and the
        handles -- open or closed since -- whose entries changed after
        change count ``since`` (0: every handle ever used).  What a replica
        of this table in another process must load again."""
        cdef uint64_t since_ = arg_u64(since, b"since", NO_LIMIT)
        cdef uint32_t i
        cdef uint64_t gen
        out = []
        self._rlock()
        try:
            gen = self.generation
            if gen > since_:
                for i in range(self.rht_size):
                    if self.rht[i].gen > since_:
                        out.append(i)
        finally:
            self.unlock()
        return gen, out

    def open_handles(self):
        """The open handles, ascending."""
        cdef uint32_t i
        self._rlock()
        try:
            return [i for i in range(self.rht_size) if self.rht[i].nmask != 0]
        finally:
            self.unlock()

    cdef rht_entry _copy(self, object handle, int want) except *:
        """A copy of an entry, read under the read lock: ``want`` 0 any,
        1 open, 2 an open vLUN (raising as _entry / _virtual)."""
        cdef uint32_t h_ = handle_arg(handle, self.rht_size)
        cdef rht_entry e
        self._rlock()
        try:
            e = (self._virtual(h_) if want == 2 else self._entry(h_, want == 1))[0]
        finally:
            self.unlock()
        e.lxt = NULL        # the copy owns nothing
        return e

    def is_open(self, handle):
        return self._copy(handle, 0).nmask != 0

    def is_virtual(self, handle):
        return (self._copy(handle, 1).fp >> 4) == RHT_FMT_VIRTUAL

    def perms(self, handle):
        """The RHT permission bits of an open handle."""
        return self._copy(handle, 1).fp & 3

    def lxt_count(self, handle):
        """The vLUN size in chunks (``lxt_cnt``)."""
        return self._copy(handle, 2).lxt_cnt

    def lxt_capacity(self, handle):
        """Entries allocated for the LXT (a multiple of 8)."""
        return self._copy(handle, 2).lxt_cap

    def lxt(self, handle):
        """A copy of the LXT as a uint64 array."""
        cdef uint32_t h_ = handle_arg(handle, self.rht_size)
        cdef rht_entry *e
        cdef uint64_t[::1] v
        self._rlock()
        try:
            e = self._virtual(h_)
            out = np.empty(e.lxt_cnt, dtype=np.uint64)
            v = out
            if e.lxt_cnt:
                with nogil:
                    memcpy(&v[0], e.lxt, e.lxt_cnt * sizeof(uint64_t))
        finally:
            self.unlock()
        return out

    def auns(self, handle):
        """The chunk numbers (auns) of a vLUN, in virtual order (int64
        array; ``lxt_count`` is how many)."""
        cdef uint32_t h_ = handle_arg(handle, self.rht_size)
        cdef rht_entry *e
        self._rlock()
        try:
            e = self._virtual(h_)
            return lxt_auns(e.lxt, e.lxt_cnt)
        finally:
            self.unlock()

    def extent(self, handle):
        """Native blocks addressable through the handle: a vLUN's mapped
        chunks x MC_CHUNK_SIZE, a direct LUN's last LBA + 1."""
        cdef rht_entry e = self._copy(handle, 1)
        return entry_extent(&e)

    def entry(self, handle):
        """The RHT entry as a dict (for tools and tests)."""
        cdef rht_entry e = self._copy(handle, 0)
        h = int(handle)
        if e.nmask == 0:
            return {"handle": h, "open": False}
        if (e.fp >> 4) == RHT_FMT_DIRECT:
            return {"handle": h, "open": True, "format": 1,
                    "perms": e.fp & 3, "lun_id": e.lun_id, "valid": e.valid,
                    "port_sel": e.nmask, "last_lba": e.last_lba}
        return {"handle": h, "open": True, "format": 0,
                "perms": e.fp & 3, "nmask": e.nmask, "lxt_cnt": e.lxt_cnt}

    def __repr__(self):
        return (f"ResourceTable(rht_size={self.rht_size}, open={self.rht_out}, "
                f"state={self.state.name})")


cdef class _Fence:
    """``with table.fence():`` -- the table's write lock across a block."""
    cdef ResourceTable table
    cdef bint held

    def __cinit__(self, ResourceTable table not None):
        self.table = table

    def __enter__(self):
        if self.held:
            raise RuntimeError("this fence is already held")
        self.table._wlock()
        self.held = True
        return self.table

    def __exit__(self, *exc):
        if self.held:
            self.held = False
            self.table.unlock()
        return False



# The states by name, for Python code (TABLE_LIVE, TABLE_IN_ERROR, ...).
globals().update(TableState.__members__)
# The chunk geometry by name, for Python code: geometry.pxd's values, as
# plain ints (numpy does not take an IntEnum member as a Python int:
# ``np.uint64(x) >> member`` is refused).
globals().update(MC_CHUNK_SHIFT=<int> MC_CHUNK_SHIFT, MC_CHUNK_SIZE=<int> MC_CHUNK_SIZE,
                 MC_CHUNK_OFF_MASK=<int> MC_CHUNK_OFF_MASK)
# The kernel ABI values the core defines in tables.pxd (RHT/LXT layout,
# permissions, the AFU codes it reports), for the test that uapi.py's copy
# equals them (tests/test_uapi.py): {name: int}.
ABI = {"MC_RHT_NMASK": MC_RHT_NMASK, "LXT_GROUP_SIZE": LXT_GROUP_SIZE,
       "LXT_LUNIDX_SHIFT": LXT_LUNIDX_SHIFT, "LXT_PERM_SHIFT": LXT_PERM_SHIFT,
       "RHT_PERM_READ": RHT_PERM_READ, "RHT_PERM_WRITE": RHT_PERM_WRITE,
       "RHT_PERM_RW": RHT_PERM_RW,
       "SISL_AFU_RC_RHT_INVALID": AFU_RC_RHT_INVALID,
       "SISL_AFU_RC_RHT_OUT_OF_BOUNDS": AFU_RC_RHT_OUT_OF_BOUNDS,
       "SISL_AFU_RC_RHT_RW_PERM": AFU_RC_RHT_RW_PERM,
       "SISL_AFU_RC_LXT_OUT_OF_BOUNDS": AFU_RC_LXT_OUT_OF_BOUNDS,
       "SISL_AFU_RC_LXT_RW_PERM": AFU_RC_LXT_RW_PERM,
       "SISL_AFU_RC_CAP_VIOLATION": AFU_RC_CAP_VIOLATION,
       "SCSI_LBA_OUT_OF_RANGE": SCSI_LBA_OUT_OF_RANGE}
