# One context's resource handle table (RHT) and its per-handle LXTs:
# spec §2.5, §2.6, §19.
#
# The locking contract (the whole core obeys it; tables.pyx says why):
# 1. Every change to a table -- RHT entries, LXT contents, pointer and
#    capacity, rht_out, state, the watched epoch -- holds its write lock.
# 2. Every read of them holds its read lock (or the write lock), with or
#    without the GIL.  Only ``state`` may also be read alone, atomically,
#    for reporting; a decision on it is made under the lock.
# 3. No thread waits for a table lock while holding the GIL: it tries,
#    and if the lock is busy, releases the GIL to wait.  So the holder of
#    a table lock may take the GIL.
# 4. A decision and the change it justifies are one critical section.
# 5. Lock order: one table lock, then an allocator mutex, then the LXT
#    cache mutex.  Never two table locks at once; never a table lock while
#    holding an allocator mutex.  The write lock is recursive for its
#    holder (so a fence() block may call the table's methods).
# 6. Fork: cxlflash._core.locks re-initialises every lock in the child.
# 7. Asynchronous requests count themselves into aio_inflight under the
#    read lock; the write lock, once taken, waits for that count to reach 0.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from cxlflash._core.locks cimport cxl_lock

cdef enum:
    MC_RHT_NMASK = 16
    LXT_GROUP_SIZE = 8
    LXT_LUNIDX_SHIFT = 8
    LXT_PERM_SHIFT = 4
    RHT_PERM_READ = 1
    RHT_PERM_WRITE = 2
    RHT_PERM_RW = 3
    RHT_FMT_VIRTUAL = 0
    RHT_FMT_DIRECT = 1
    DIRECT_VALID = 0x80

# Chunk geometry: cxlflash/_core/geometry.pxd (the allocator below the
# tables needs it too).
from cxlflash._core.geometry cimport MC_CHUNK_SHIFT, MC_CHUNK_SIZE, MC_CHUNK_OFF_MASK

# AFU response codes (sislite.h), as the translation reports them.
cdef enum:
    AFU_RC_OK = 0
    AFU_RC_RHT_INVALID = 0x01
    AFU_RC_RHT_OUT_OF_BOUNDS = 0x03
    AFU_RC_RHT_RW_PERM = 0x05
    AFU_RC_LXT_OUT_OF_BOUNDS = 0x13
    AFU_RC_LXT_RW_PERM = 0x15
    AFU_RC_CAP_VIOLATION = 0x21
    # Not an AFU code: a direct LBA beyond the LUN, which the device itself
    # refuses with CHECK CONDITION / ILLEGAL REQUEST (spec §19.3).
    SCSI_LBA_OUT_OF_RANGE = 0x100

# Table states, checked by the data path.
cpdef enum TableState:
    TABLE_LIVE = 0
    TABLE_IN_ERROR = 1      # AFU reset: the MMIO window reads all-ones
    TABLE_GONE = 2          # the context was destroyed
    TABLE_FOREIGN = 3       # used from a process that does not own it

cdef struct rht_entry:
    # format 0 (virtual)
    uint64_t *lxt           # lxt_start: NULL when empty
    uint32_t lxt_cnt        # chunks mapped
    uint64_t lxt_cap        # entries allocated (a multiple of LXT_GROUP_SIZE)
    # format 1 (direct)
    uint64_t lun_id
    uint64_t last_lba       # the LUN's last native LBA (bounds, decision 13)
    uint8_t valid
    # both
    int fd                  # the backing store's fd in this process, or -1
    uint8_t fp              # format << 4 | permissions
    uint8_t nmask           # byte 15: 16 for virtual, port_sel for direct, 0 = free
    # The table's change count when this entry last changed (opened,
    # resized, cloned into, closed, capacity followed): what a replica in
    # another process needs again (``changed_since``).  Kept when closed.
    uint64_t gen


cdef class ResourceTable:
    cdef rht_entry *rht
    cdef readonly uint32_t rht_size
    cdef readonly uint32_t rht_out
    cdef int tstate             # a TableState: the `state` property, set_state()
    # A reset epoch kept in memory shared with another process (the owner
    # of the driver): when it moves past ``epoch_seen`` the table is in
    # error, as a replica learns of an AFU reset its owner went through.
    cdef const uint64_t *epoch_word
    cdef readonly uint64_t epoch_seen
    cdef object epoch_buffer
    cdef cxl_lock lock
    # Changes to entries so far (see rht_entry.gen); write lock held.
    cdef readonly uint64_t generation
    # Asynchronous requests in flight through the table (engine.pyx).  The
    # submitter counts one in under the read lock; the engine counts it
    # out, atomically, when it completes -- so a write lock, once taken,
    # waits for the count to reach 0 (reaping with ``aio_wait`` on the
    # engine that submitted), and every table change is a fence for
    # asynchronous I/O as for synchronous I/O.  ``fail_gen`` moves when
    # the table enters TABLE_IN_ERROR (an AFU reset): requests that were
    # in flight then complete with the reset error.  Both are atomics.
    cdef int64_t aio_inflight
    cdef uint64_t fail_gen
    cdef void *aio_engine
    cdef int aio_pid
    cdef void (*aio_wait)(void *engine, int64_t *count) noexcept nogil

    # The data path holds the read lock across translation and I/O;
    # table changes take the write lock, so they wait for I/O in flight
    # (what the kernel's heavyweight sync guarantees).  These block: call
    # them without the GIL.
    cdef void read_lock(self) noexcept nogil
    cdef void write_lock(self) noexcept nogil
    cdef void unlock(self) noexcept nogil
    # The same, for a caller holding the GIL (rule 3).
    cdef int _rlock(self) except -1
    cdef int _wlock(self) except -1
    # Wait for the asynchronous requests in flight (the write lock held).
    cdef void _wait_aio(self) noexcept nogil
    # The state the data path must act on (the epoch folded in); caller
    # holds the lock.
    cdef int live_state(self) noexcept nogil

    # Validate a handle for a read (write=0) or a write (write=1); returns
    # an AFU_RC_* code.  Caller holds the lock.
    cdef int lookup(self, uint32_t handle, int write) noexcept nogil
    # Translate one LBA of a handle that ``lookup`` accepted: the physical
    # LBA, or -1 with ``*afu_rc`` set.  Caller holds the lock.
    cdef int64_t translate_one(self, uint32_t handle, uint64_t vlba,
                               int write, int *afu_rc) noexcept nogil
    # The number of blocks addressable through the handle (vLUN size in
    # native blocks, or the LUN size for a direct handle).
    cdef uint64_t _extent(self, uint32_t handle) noexcept nogil
    # The backing fd the handle was opened on, or ``fallback`` when it was
    # opened without one.  Caller holds the lock: the fd then cannot be
    # closed or its handle re-opened elsewhere until the lock is dropped.
    cdef int backing_fd(self, uint32_t handle, int fallback) noexcept nogil

    # Internal helpers.
    # Record a change of entry ``e`` (write lock held).
    cdef void _touch(self, rht_entry *e) noexcept nogil
    cdef rht_entry *_entry(self, uint32_t handle, bint want_open=*) except NULL
    cdef rht_entry *_virtual(self, uint32_t handle) except NULL
    cdef int _free_slot(self) noexcept nogil
    cdef int _checkout(self, const rht_entry *init) except -1
    cdef rht_entry _copy(self, object handle, int want) except *
    cdef int _set_lxt_capacity(self, rht_entry *e, uint64_t n) noexcept nogil
