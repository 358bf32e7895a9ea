# Block I/O through a resource handle to a backing file descriptor.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from cxlflash._core.tables cimport ResourceTable
from cxlflash._core.geometry cimport MC_CHUNK_SIZE

cdef enum:
    ZERO_PUNCH = 0        # fallocate(PUNCH_HOLE): regular files, memfd
    ZERO_BLKZEROOUT = 1   # ioctl(BLKZEROOUT): block devices
    ZERO_WRITE = 2        # write zeros

# Transfer results (besides 0 = done and > 0 = errno).
cdef enum:
    XFER_AFU_ERROR = -1
    XFER_IN_ERROR = -2
    XFER_GONE = -3
    XFER_FOREIGN = -4
    # pread/pwrite made no progress: the backing store ended (it is shorter
    # than the LUN says, e.g. a file truncated under it); *bad_lba is the
    # BYTE offset where it ended.  Raised as EIO.
    XFER_BACKING_ENDED = -5
    # A block whose byte offset (lba * block_size, end included) is beyond
    # what off_t holds (2**63 - 1); *bad_lba is that block.  Raised as EINVAL.
    XFER_BEYOND_OFF_T = -6

# Counters of a DataPath; only ever updated with the GIL held.
cdef struct io_stats:
    uint64_t reads
    uint64_t writes
    uint64_t blocks_read
    uint64_t blocks_written
    uint64_t unmaps
    uint64_t blocks_unmapped
    uint64_t errors
    uint64_t list_calls
    uint64_t areads         # submitted through the engine (engine.pyx)
    uint64_t awrites

# Whether an AFU reset put the table in error: its state says so, or (in a
# replica) the owner's reset epoch moved past the one the table has seen.
# Caller holds the table's read lock.
cdef bint table_in_error(ResourceTable table) noexcept nogil

# Check a whole range before any byte moves: the table's state, the handle,
# every block's translation and permission, and that every byte offset fits
# in off_t.  0 or an XFER_* code with afu_rc / bad_lba set.  Caller holds
# the table's read lock.
cdef int check_range(ResourceTable table, uint32_t handle, uint64_t block_size,
                     uint64_t lba, uint64_t nblocks, int write, int *afu_rc,
                     uint64_t *bad_lba) noexcept nogil

# One transfer (check the whole range, translate, coalesce, pread/pwrite);
# returns 0, an errno, or an XFER_* code with afu_rc and bad_lba set.
cdef int transfer(ResourceTable table, uint32_t handle, int fd,
                  uint32_t block_size, uint64_t lba, uint64_t nblocks,
                  char *buf, int write, int *afu_rc,
                  uint64_t *bad_lba) noexcept nogil

# Raise the error of a failed transfer; ``fd``: its backing store.
cdef int raise_xfer_error(ResourceTable table, uint32_t handle, int fd, int rc,
                          int afu_rc, uint64_t bad_lba, int write) except -1

cdef int zero_range(int fd, int zero_mode, uint64_t offset,
                    uint64_t length) noexcept nogil

# A request's failure as list I/O reports it (and as every failure is
# raised: cxlflash._core.errors.io_error, whose IO_* are these numbers).
cdef enum:
    IO_AFU_ERROR = -1000    # the AFU refused it (its afu_rc beside it)
    IO_IN_ERROR = -1001     # AFU reset: the context is in error
    IO_GONE = -1002         # the context is gone or another process's
    IO_BEYOND_SIZE = -1003  # beyond the LUN's logical size (DataPath.limit)

# A request's outcome (0, an errno or an XFER_* code) as list I/O reports
# it: the blocks done, -errno, or an IO_* code.
cdef int64_t list_status(int rc, uint64_t nblocks) noexcept nogil

# The next piece of a range that one translation covers -- to the end of
# its chunk, or all of what is left of a direct range: its length in
# ``*n``, its physical LBA returned (< 0: refused, ``*afu_rc`` says why).
# Caller holds the table's read lock.
cdef inline int64_t chunk_step(ResourceTable table, uint32_t handle, bint direct,
                               uint64_t v, uint64_t left, int write, uint64_t *n,
                               int *afu_rc) noexcept nogil:
    if direct:
        n[0] = left
    else:
        n[0] = MC_CHUNK_SIZE - (v & (MC_CHUNK_SIZE - 1))
        if n[0] > left:
            n[0] = left
    return table.translate_one(handle, v, write, afu_rc)

# Count a list's requests (types ``o``, blocks ``c``, outcomes ``st``) into
# a DataPath's counters.  GIL held.
cdef void count_list(io_stats *stats, const uint8_t[::1] o, const uint64_t[::1] c,
                     const int64_t[::1] st) noexcept

# pread/pwrite all of ``length`` bytes at byte ``offset``: 0, an errno, or
# XFER_BACKING_ENDED with ``*end`` the byte where the backing store ended.
# EINTR is retried, a short transfer continued; a range passing off_t is
# EINVAL, untouched.  The one I/O primitive of the data path and of
# ``rawio.raw_io``.
cdef int io_full(int fd, char *buf, uint64_t length, uint64_t offset,
                 int write, uint64_t *end) noexcept nogil

# Where a backing store that made no progress at byte ``stopped`` ends (for
# the message of XFER_BACKING_ENDED).
cdef object backing_end(int fd, uint64_t stopped)

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *tp)
    int CLOCK_MONOTONIC

# CLOCK_MONOTONIC in nanoseconds (request latencies).
cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t> ts.tv_sec * 1000000000 + ts.tv_nsec


cdef class DataPath:
    cdef readonly ResourceTable table
    cdef readonly uint32_t handle
    cdef readonly int fd
    cdef readonly uint32_t block_size
    cdef uint64_t _max_xfer        # property max_xfer (checked setter)
    cdef uint64_t _limit           # property limit (checked setter)
    cdef readonly int zero_mode
    cdef public bint closed
    cdef public object on_reset
    cdef io_stats stats
    # Requests submitted through the engine (engine.pyx) whose futures are
    # not yet completed; changed with the GIL held.
    cdef readonly int64_t aio_pending
    # How the engine may run requests on the backing fd in the submitter
    # (backend.h's CXL_NOWAIT_*), found for ``nowait_fd`` (-1: not yet).
    cdef int nowait_fd
    cdef int nowait_class

    cdef object _io(self, object lba, object buffer, int write)
    cdef int _check(self, uint64_t lba, uint64_t nblocks) except -1
    cdef int _raise(self, int rc, int afu_rc, uint64_t bad_lba, int write) except -1
    cdef int _run(self, uint64_t lba, uint64_t nblocks, char *buf, int write,
                  int *afu_rc, uint64_t *bad_lba) noexcept nogil
    cdef int _zero(self, uint64_t lba, uint64_t nblocks, int zero_mode, int *afu_rc,
                   uint64_t *bad_lba) noexcept nogil
    cdef int _unmap(self, uint64_t lba, uint64_t nblocks, int *afu_rc,
                    uint64_t *bad_lba) noexcept nogil
    cdef int64_t _list_one(self, uint64_t op, uint64_t lba, uint64_t nblocks,
                           uint64_t offset, char *buf, uint64_t buflen,
                           int *afu_rc) noexcept nogil
