# Block I/O through a resource handle to a backing file descriptor.
from libc.stdint cimport uint32_t, uint64_t, int64_t
from cxlflash._core.tables cimport ResourceTable

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

# One transfer (validate, translate, coalesce, pread/pwrite); returns 0, an
# errno, or an XFER_* code with afu_rc and bad_lba set.
cdef int transfer(ResourceTable table, uint32_t handle, int fd,
                  uint32_t block_size, uint64_t lba, uint64_t nblocks,
                  char *buf, int write, int *afu_rc,
                  uint64_t *bad_lba) noexcept nogil

cdef int raise_xfer_error(ResourceTable table, uint32_t handle, int rc,
                          int afu_rc, uint64_t bad_lba, int write) except -1

cdef int zero_range(int fd, int zero_mode, uint64_t offset,
                    uint64_t length) noexcept nogil


cdef class DataPath:
    cdef readonly ResourceTable table
    cdef readonly uint32_t handle
    cdef readonly int fd
    cdef readonly uint32_t block_size
    cdef public uint64_t max_xfer
    cdef public uint64_t limit
    cdef readonly int zero_mode
    cdef public bint closed
    cdef public object on_reset
    cdef io_stats stats

    cdef int _check(self, uint64_t lba, uint64_t nblocks) except -1
    cdef int _raise(self, int rc, int afu_rc, uint64_t bad_lba, int write) except -1
    cdef int _run(self, uint64_t lba, uint64_t nblocks, char *buf, int write,
                  int *afu_rc, uint64_t *bad_lba) noexcept nogil
    cdef int _unmap(self, uint64_t lba, uint64_t nblocks, int *afu_rc,
                    uint64_t *bad_lba) noexcept nogil
