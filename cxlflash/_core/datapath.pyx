"""Block I/O through a resource handle (the AFU data path).

A transfer is validated and translated as the AFU does it (spec §19), split
at chunk boundaries, coalesced into physically contiguous runs, and issued
as one ``pread``/``pwrite`` per run -- all without the GIL.  The table's
read lock is held from translation until the I/O is done, so a shrink
(which takes the write lock) waits for I/O in flight, as the kernel's
heavyweight sync does.

Decisions (DESIGN.md §23): a transfer crossing chunks is split per chunk,
and refused whole (0x13) if any block is beyond the vLUN; a direct transfer
beyond the LUN is refused as the device would refuse it.

Bounds (issue 8): every transfer, zeroing and unmap checks its WHOLE range
-- state, handle, every chunk's translation and permission, and that every
byte offset fits in ``off_t`` -- with overflow-safe arithmetic, under the
read lock it then keeps for the I/O, before any byte moves.  A request that
``max_xfer`` splits into several commands is checked whole before the first
command is issued.  Integer arguments are checked before anything is
allocated: outside their range they are ``OSError(EINVAL)`` naming the
parameter and the range, a non-integer is a ``TypeError``.
"""
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release,
                             PyBUF_SIMPLE, PyBUF_WRITABLE)
from libc.errno cimport errno, EINTR, EINVAL, EIO, ENOMEM, EOPNOTSUPP, EROFS
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.types cimport off_t
from cxlflash._core.includes.system cimport (
    pread, pwrite, fallocate, ioctl, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
    BLKZEROOUT)
from cxlflash._core.args cimport arg_fd, arg_u64, arg_block_size, u64_array
from cxlflash._core.tables cimport (
    ResourceTable, rht_entry, AFU_RC_OK, AFU_RC_LXT_OUT_OF_BOUNDS,
    SCSI_LBA_OUT_OF_RANGE, TABLE_LIVE, TABLE_IN_ERROR, TABLE_GONE, TABLE_FOREIGN,
    RHT_FMT_DIRECT)
from cxlflash._core.geometry cimport MC_CHUNK_SHIFT, MC_CHUNK_SIZE, NO_LIMIT, OFF_MAX
from cxlflash._core.store cimport cxl_store, store_of, store_io_full

import errno as _errno
import os
import stat
from cxlflash._core._lazy import numpy as np   # imported on first use
from cxlflash._core.errors import io_error
from cxlflash._core.args import einval

# The error of an argument outside its range: errno EINVAL.  The package's
cdef extern from "Python.h":
    Py_ssize_t PY_SSIZE_T_MAX

cdef extern from *:
    """
    _Static_assert(sizeof(unsigned long) == 8, "cxlflash needs an LP64 platform");
    /* a * b without wrapping: 1 if it does not fit in 64 bits */
    #define CXLFLASH_MUL_OVERFLOW64(a, b, res) \
        __builtin_mul_overflow((unsigned long long)(a), (unsigned long long)(b), \
                               (unsigned long long *)(res))
    """
    bint mul_overflow64 "CXLFLASH_MUL_OVERFLOW64"(uint64_t a, uint64_t b,
                                                  uint64_t *res) noexcept nogil

DEF ZERO_BUF = 1048576

# List I/O request types (the block library's cblk_io_t request_type).
LIST_READ = 1
LIST_WRITE = 2
LIST_UNMAP = 3

cdef object _U8 = None         # np.dtype(np.uint8), made on first use (numpy is lazy)


cdef object op_array(object ops):
    """List I/O request types as uint8: a uint8 ndarray as it is, anything
    else checked as integers; a type above 255 becomes 0 (refused per
    request, like every unknown type), never wrapped onto a valid one."""
    global _U8
    if _U8 is None:
        _U8 = np.dtype(np.uint8)
    if type(ops) is np.ndarray and (<object> ops).dtype is _U8:
        return np.ascontiguousarray(ops).reshape(-1)
    a = u64_array(ops, "ops")
    return np.where(a > 255, 0, a).astype(np.uint8)


# -- I/O primitives ---------------------------------------------------------------

cdef int io_full(int fd, char *buf, uint64_t length, uint64_t offset,
                 int write, uint64_t *end) noexcept nogil:
    """pread/pwrite all of it: 0, an errno, or XFER_BACKING_ENDED with
    ``*end`` the byte offset where the backing store ended (a transfer
    that makes no progress).  EINTR is retried; a short transfer is
    continued.  A range whose end is beyond off_t is EINVAL, untouched."""
    cdef uint64_t done = 0
    cdef int64_t r
    cdef cxl_store *st
    if offset > OFF_MAX or length > OFF_MAX - offset:
        return EINVAL
    st = store_of(fd)
    if st != NULL:                  # not a file (an RBD image, a daemon's store)
        r = store_io_full(st, buf, length, offset, write, end)
        return XFER_BACKING_ENDED if r < 0 else <int> r
    while done < length:
        if write:
            r = pwrite(fd, buf + done, length - done, <off_t> (offset + done))
        else:
            r = pread(fd, buf + done, length - done, <off_t> (offset + done))
        if r < 0:
            if errno == EINTR:
                continue
            return errno
        if r == 0:
            end[0] = offset + done
            return XFER_BACKING_ENDED
        done += <uint64_t> r
    return 0


cdef int zero_range(int fd, int zero_mode, uint64_t offset,
                    uint64_t length) noexcept nogil:
    """Zero ``length`` bytes at ``offset`` of the backing store: 0 or errno."""
    cdef uint64_t rng[2]
    cdef char *zeros
    cdef uint64_t done, n, end = 0
    cdef int rc
    cdef cxl_store *st
    if length == 0:
        return 0
    if offset > OFF_MAX or length > OFF_MAX - offset:
        return EINVAL
    st = store_of(fd)
    if st != NULL:                  # the store's own zeroing, whatever the mode
        return -st.ops.zero(st, offset, length)
    if zero_mode == ZERO_PUNCH:
        while fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        <off_t> offset, <off_t> length) != 0:
            if errno != EINTR:
                if errno == EOPNOTSUPP:
                    break       # fall back to writing zeros
                return errno
        else:
            return 0
    elif zero_mode == ZERO_BLKZEROOUT:
        rng[0] = offset
        rng[1] = length
        while ioctl(fd, BLKZEROOUT, rng) != 0:
            if errno != EINTR:
                if errno == EOPNOTSUPP or errno == EINVAL:
                    break
                return errno
        else:
            return 0
    zeros = <char *> calloc(ZERO_BUF, 1)
    if zeros == NULL:
        return ENOMEM
    done = 0
    while done < length:
        n = length - done if length - done < ZERO_BUF else ZERO_BUF
        rc = io_full(fd, zeros, n, offset + done, 1, &end)
        if rc:
            free(zeros)
            return EIO if rc < 0 else rc
        done += n
    free(zeros)
    return 0


cdef bint table_in_error(ResourceTable table) noexcept nogil:
    # live_state folds a moved reset epoch (a replica's news of its owner's
    # reset) into TABLE_IN_ERROR: the one test for "recover, then re-drive".
    return table.live_state() == TABLE_IN_ERROR


cdef inline int table_state_rc(ResourceTable table) noexcept nogil:
    cdef int state = table.live_state()
    if state == TABLE_LIVE:
        return 0
    if state == TABLE_IN_ERROR:
        return XFER_IN_ERROR        # reset, or the owner reset the AFU since
    if state == TABLE_FOREIGN:
        return XFER_FOREIGN
    return XFER_GONE


cdef int beyond_off_t(uint64_t v, uint64_t p, uint64_t bs,
                      uint64_t *bad_lba) noexcept nogil:
    """XFER_BEYOND_OFF_T for a run of blocks from ``v`` at physical block
    ``p``: ``*bad_lba`` is its first block that does not end within off_t."""
    cdef uint64_t fit = OFF_MAX // bs     # physical blocks below this fit
    bad_lba[0] = v if p >= fit else v + (fit - p)
    return XFER_BEYOND_OFF_T


cdef inline int check_extent(ResourceTable table, uint32_t handle, uint64_t bs,
                             uint64_t lba, uint64_t nblocks, int write,
                             int *afu_rc, uint64_t *bad_lba) noexcept nogil:
    """check_range without the table state: the handle, every block's
    translation and permission, every byte offset within off_t."""
    cdef rht_entry *e
    cdef uint64_t last, ext, v, n, left, end
    cdef int64_t p
    afu_rc[0] = table.lookup(handle, write)
    if afu_rc[0] != AFU_RC_OK:
        bad_lba[0] = lba
        return XFER_AFU_ERROR
    if nblocks == 0:
        return 0
    e = &table.rht[handle]
    if (e.fp >> 4) == RHT_FMT_DIRECT:
        # The device refuses a command with any block beyond the LUN.
        last = e.last_lba
        if lba > last:
            afu_rc[0] = SCSI_LBA_OUT_OF_RANGE
            bad_lba[0] = lba
            return XFER_AFU_ERROR
        if nblocks - 1 > last - lba:
            afu_rc[0] = SCSI_LBA_OUT_OF_RANGE
            bad_lba[0] = last + 1 if last != NO_LIMIT else NO_LIMIT
            return XFER_AFU_ERROR
        # lba + nblocks <= last + 1 <= 2**64: wraps only to 0, at 2**64
        end = lba + nblocks
        if end == 0 or mul_overflow64(end, bs, &end) or end > OFF_MAX:
            return beyond_off_t(lba, lba, bs, bad_lba)
        return 0
    # A vLUN: every block below lxt_cnt chunks, then each chunk's entry
    # (permission, physical offset).  At most lxt_cnt iterations.
    ext = (<uint64_t> e.lxt_cnt) << MC_CHUNK_SHIFT
    if lba >= ext or nblocks > ext - lba:
        afu_rc[0] = AFU_RC_LXT_OUT_OF_BOUNDS
        bad_lba[0] = lba if lba >= ext else ext
        return XFER_AFU_ERROR
    v = lba
    left = nblocks
    while left:
        n = MC_CHUNK_SIZE - (v & (MC_CHUNK_SIZE - 1))
        if n > left:
            n = left
        p = table.translate_one(handle, v, write, afu_rc)
        if p < 0:
            if afu_rc[0] == AFU_RC_OK:
                # not a refusal: a physical LBA >= 2**63 (an aun >= 2**47),
                # which an int64 cannot return
                return beyond_off_t(v, OFF_MAX, bs, bad_lba)
            bad_lba[0] = v
            return XFER_AFU_ERROR
        # 0 <= p < 2**63 and n <= 2**16: p + n does not wrap
        if mul_overflow64(<uint64_t> p + n, bs, &end) or end > OFF_MAX:
            return beyond_off_t(v, <uint64_t> p, bs, bad_lba)
        v += n
        left -= n
    return 0


cdef int check_range(ResourceTable table, uint32_t handle, uint64_t block_size,
                     uint64_t lba, uint64_t nblocks, int write, int *afu_rc,
                     uint64_t *bad_lba) noexcept nogil:
    cdef int rc = table_state_rc(table)
    if rc:
        return rc
    return check_extent(table, handle, block_size, lba, nblocks, write,
                        afu_rc, bad_lba)


cdef int io_pass(ResourceTable table, uint32_t handle, int fd, uint64_t bs,
                 uint64_t lba, uint64_t nblocks, char *buf, int write,
                 int *afu_rc, uint64_t *bad_lba) noexcept nogil:
    """The I/O of one command whose range check_range accepted (the caller
    still holds the read lock): translate per chunk, coalesce physically
    contiguous runs, one pread/pwrite per run.  The backing fd is the one
    the handle was opened on (``fd`` only when it was opened without one):
    read under the lock, it can be neither closed nor re-bound meanwhile."""
    cdef int rc
    cdef int64_t p
    cdef uint64_t v = lba, left = nblocks, n, run_p = 0, run_len = 0, end = 0
    cdef char *run_buf = buf
    cdef char *cur = buf
    cdef bint direct = (table.rht[handle].fp >> 4) == RHT_FMT_DIRECT
    fd = table.backing_fd(handle, fd)
    while left:
        p = chunk_step(table, handle, direct, v, left, write, &n, afu_rc)
        if p < 0:                   # not after check_range; kept for safety
            bad_lba[0] = v
            return XFER_AFU_ERROR
        if run_len and <uint64_t> p == run_p + run_len:
            run_len += n
        else:
            if run_len:
                rc = io_full(fd, run_buf, run_len * bs, run_p * bs, write, &end)
                if rc:
                    bad_lba[0] = end
                    return rc
            run_p = <uint64_t> p
            run_len = n
            run_buf = cur
        cur += n * bs
        v += n
        left -= n
    if run_len:
        rc = io_full(fd, run_buf, run_len * bs, run_p * bs, write, &end)
        if rc:
            bad_lba[0] = end
            return rc
    return 0


cdef int transfer(ResourceTable table, uint32_t handle, int fd,
                  uint32_t block_size, uint64_t lba, uint64_t nblocks,
                  char *buf, int write, int *afu_rc,
                  uint64_t *bad_lba) noexcept nogil:
    cdef int rc
    table.read_lock()
    rc = check_range(table, handle, block_size, lba, nblocks, write, afu_rc, bad_lba)
    if rc == 0:
        rc = io_pass(table, handle, fd, block_size, lba, nblocks, buf, write,
                     afu_rc, bad_lba)
    table.unlock()
    return rc


def scrub_chunks(int fd, zero_mode, auns, block_size):
    """Zero whole physical chunks (``aun`` numbers) of a backing store.

    Used to scrub chunks freed by a shrink of a NEED_WRITE_SAME vLUN.
    Returns 0 or the errno of the first failure (the kernel ignores it).
    Every chunk's byte range is checked (within off_t) before any is zeroed.
    """
    cdef int mode = <int> arg_u64(zero_mode, b"zero_mode", ZERO_WRITE)
    cdef uint64_t chunk_bytes = <uint64_t> MC_CHUNK_SIZE * arg_block_size(block_size)
    cdef const uint64_t[::1] a = u64_array(auns, "auns")
    cdef Py_ssize_t i
    cdef int rc = 0
    cdef uint64_t max_aun = OFF_MAX // chunk_bytes     # chunks below end within off_t
    for i in range(a.shape[0]):
        if a[i] >= max_aun:
            raise einval(f"chunk {a[i]} is beyond what a backing "
                          f"store can address (off_t): chunks must be below {max_aun}")
    with nogil:
        for i in range(a.shape[0]):
            rc = zero_range(fd, mode, a[i] * chunk_bytes, chunk_bytes)
            if rc:
                break
    return rc


cdef object backing_end(int fd, uint64_t stopped):
    """Where a backing store that made no progress at byte ``stopped``
    ends: its size if it is a regular file that ends before, else
    ``stopped``."""
    try:
        st = os.fstat(fd)
    except OSError:
        return stopped
    if stat.S_ISREG(st.st_mode) and st.st_size < stopped:
        return st.st_size
    return stopped


cdef int raise_xfer_error(ResourceTable table, uint32_t handle, int fd, int rc,
                          int afu_rc, uint64_t bad_lba, int write) except -1:
    """Raise the exception for a failed transfer (``rc`` from transfer;
    ``fd`` the backing store, for XFER_BACKING_ENDED): the one mapping,
    ``io_error`` of the status list I/O reports for it, with the message
    the synchronous path can make more precise."""
    cdef uint64_t extent = 0
    cdef int64_t status = list_status(rc, 0)
    message = None
    if rc == XFER_AFU_ERROR:
        if handle < table.rht_size:
            table._rlock()          # a read of the table: under its read lock
            extent = table._extent(handle)
            table.unlock()
        raise io_error(status, afu_rc=afu_rc, handle=handle, lba=bad_lba, write=write,
                       extent=extent if handle < table.rht_size else None)
    if rc == XFER_FOREIGN:
        message = ("this context belongs to another process (a forked child "
                   "must attach its own context and clone)")
    elif rc == XFER_GONE:
        message = "the context no longer exists (detached or closed)"
    elif rc == XFER_BACKING_ENDED:
        message = (f"the backing store ended at byte {backing_end(fd, bad_lba)}: "
                   "it is shorter than the LUN says (it shrank, e.g. a file "
                   "truncated under it); issue DK_CXLFLASH_VERIFY on the disk to "
                   "refresh the LUN's capacity, then address only blocks within it")
    elif rc == XFER_BEYOND_OFF_T:
        message = (f"block {bad_lba} of the {'write' if write else 'read'} lies "
                   "beyond byte 2**63-1, the most a backing store can address "
                   "(off_t): address lower blocks")
    elif rc == EINVAL:
        message = ("the backing store refused the transfer (with O_DIRECT, "
                   "buffers and offsets must be aligned: use "
                   "cxlflash.aligned_buffer)")
    elif rc == EIO and store_of(fd) != NULL:
        message = ("the RBD image did not answer: its cluster timed out (an OSD or "
                   "monitor down or unreachable for the LUN's timeout= seconds; until "
                   "it answers again, a new request waits 1 s for it, then fails), or "
                   "an OSD failed the request; a write may or may not have been applied")
    elif rc == EROFS and store_of(fd) != NULL:
        message = ("the RBD image refused the write: another client holds its exclusive "
                   "lock (a cxlflash daemon using it in virtual mode)")
    raise io_error(status, handle=handle, lba=bad_lba, write=write, message=message)


cdef class DataPath:
    """DataPath(table, handle, fd, block_size, *, max_xfer=0, zero_mode=0)

    The I/O channel of one resource handle: LBAs in native blocks of
    ``block_size`` bytes, relative to the handle (virtual LBAs for a vLUN,
    physical for a direct handle).  ``max_xfer`` (blocks, 0 = unlimited)
    splits large transfers into commands of at most that many blocks (the
    whole request is checked before the first is issued); ``limit``
    (blocks) is a logical size below the AFU's bound: transfers past it
    fail with EINVAL before any I/O.  ``on_reset``: called (no arguments)
    when a transfer finds the context in error after an AFU reset; if it
    returns true (it recovered the context) the transfer is re-driven once.

    LBAs and block counts are integers (``TypeError`` otherwise, floats
    included); outside 0..2**64-1, or a range passing LBA 2**64-1, they are
    ``OSError(EINVAL)`` -- raised before any memory is allocated or any
    byte moves.
    """

    def __cinit__(self, ResourceTable table not None, handle, fd, block_size, *,
                  max_xfer=0, zero_mode=0):
        self.block_size = arg_block_size(block_size)
        self.handle = <uint32_t> arg_u64(handle, b"handle", 0xFFFFFFFF)
        self.fd = arg_fd(fd)
        self._max_xfer = arg_u64(max_xfer, b"max_xfer", NO_LIMIT)
        self.zero_mode = <int> arg_u64(zero_mode, b"zero_mode", ZERO_WRITE)
        self.table = table
        self._limit = NO_LIMIT
        self.closed = False
        self.on_reset = None
        memset(&self.stats, 0, sizeof(io_stats))
        self.nowait_fd = -1

    @property
    def max_xfer(self):
        """Blocks per command (0: unlimited)."""
        return self._max_xfer

    @max_xfer.setter
    def max_xfer(self, value):
        self._max_xfer = arg_u64(value, b"max_xfer", NO_LIMIT)

    @property
    def limit(self):
        """The logical size in blocks (2**64-1: none)."""
        return self._limit

    @limit.setter
    def limit(self, value):
        self._limit = arg_u64(value, b"limit", NO_LIMIT)

    cdef int _check(self, uint64_t lba, uint64_t nblocks) except -1:
        if self.closed:
            raise ValueError("I/O on a closed LUN: the resource was released "
                             "or its context detached")
        if nblocks and nblocks - 1 > NO_LIMIT - lba:
            raise einval(f"blocks {lba}..{lba + nblocks - 1} pass "
                          f"the last addressable LBA 2**64-1")
        if self._limit != NO_LIMIT and (lba > self._limit or nblocks > self._limit - lba):
            raise io_error(IO_BEYOND_SIZE, lba=lba, nblocks=nblocks, size=self._limit)
        return 0

    cdef int _raise(self, int rc, int afu_rc, uint64_t bad_lba, int write) except -1:
        self.stats.errors += 1
        return raise_xfer_error(self.table, self.handle, self.fd, rc, afu_rc, bad_lba,
                                write)

    cdef int _run(self, uint64_t lba, uint64_t nblocks, char *buf, int write,
                  int *afu_rc, uint64_t *bad_lba) noexcept nogil:
        """Check the whole request, then issue it in commands of at most
        ``max_xfer`` blocks, all under one hold of the read lock."""
        cdef uint64_t step = self._max_xfer if self._max_xfer else nblocks
        cdef uint64_t n, bs = self.block_size
        cdef int rc
        self.table.read_lock()
        rc = check_range(self.table, self.handle, bs, lba, nblocks, write,
                         afu_rc, bad_lba)
        while rc == 0 and nblocks:
            n = step if nblocks > step else nblocks
            rc = io_pass(self.table, self.handle, self.fd, bs, lba, n, buf, write,
                         afu_rc, bad_lba)
            lba += n
            nblocks -= n
            buf += n * bs
        self.table.unlock()
        return rc

    def readinto(self, lba, buffer):
        """Read ``len(buffer) // block_size`` blocks at ``lba`` into ``buffer``.

        ``buffer``: any writable, C-contiguous object with the buffer
        protocol whose size is a multiple of ``block_size``.  Returns the
        number of blocks read.
        """
        return self._io(lba, buffer, 0)

    cdef object _io(self, object lba, object buffer, int write):
        """readinto (``write`` 0) or write (1): the blocks transferred."""
        cdef uint64_t v = arg_u64(lba, b"lba", NO_LIMIT)
        cdef Py_buffer view
        cdef int rc, afu_rc = 0
        cdef uint64_t bad = 0, nblocks
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE if write else
                           PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if view.len % self.block_size:
                raise ValueError(f"{'data' if write else 'buffer'} size {view.len} "
                                 f"is not a multiple of the block size {self.block_size}")
            nblocks = view.len // self.block_size
            self._check(v, nblocks)
            with nogil:
                rc = self._run(v, nblocks, <char *> view.buf, write, &afu_rc, &bad)
            if rc == XFER_IN_ERROR and self.on_reset is not None and self.on_reset():
                with nogil:
                    rc = self._run(v, nblocks, <char *> view.buf, write, &afu_rc, &bad)
        finally:
            PyBuffer_Release(&view)
        if rc:
            self._raise(rc, afu_rc, bad, write)
        if write:
            self.stats.writes += 1
            self.stats.blocks_written += nblocks
        else:
            self.stats.reads += 1
            self.stats.blocks_read += nblocks
        return nblocks

    def read(self, lba, nblocks):
        """Read ``nblocks`` blocks at ``lba``; returns a bytearray.

        The range is checked -- as a number, against the logical size, and
        against the handle as the AFU checks it -- before the buffer is
        allocated; a valid range too large for memory is MemoryError."""
        cdef uint64_t v = arg_u64(lba, b"lba", NO_LIMIT)
        cdef uint64_t n = arg_u64(nblocks, b"nblocks", NO_LIMIT)
        cdef uint64_t bs = self.block_size, bad = 0
        cdef int rc, afu_rc = 0
        self._check(v, n)
        with nogil:             # check_extent loops over the range's chunks
            self.table.read_lock()
            rc = table_state_rc(self.table)
            if rc == 0 or rc == XFER_IN_ERROR:      # readinto recovers a reset
                rc = check_extent(self.table, self.handle, bs, v, n, 0, &afu_rc, &bad)
            self.table.unlock()
        if rc:
            self._raise(rc, afu_rc, bad, 0)
        if n > <uint64_t> PY_SSIZE_T_MAX // bs:
            raise einval(f"blocks {v}..{v + n - 1} ({n} blocks of "
                          f"{bs} bytes) do not fit in one buffer: read fewer")
        buf = bytearray(n * bs)
        self.readinto(v, buf)
        return buf

    def write(self, lba, data):
        """Write ``data`` (a multiple of ``block_size`` bytes) at ``lba``.

        Returns the number of blocks written.
        """
        return self._io(lba, data, 1)

    cdef int _unmap(self, uint64_t lba, uint64_t nblocks, int *afu_rc,
                    uint64_t *bad_lba) noexcept nogil:
        """Zero blocks through the table (write permission needed), the
        backing store's way (punching holes where it can)."""
        return self._zero(lba, nblocks, self.zero_mode, afu_rc, bad_lba)

    cdef int _zero(self, uint64_t lba, uint64_t nblocks, int zero_mode, int *afu_rc,
                   uint64_t *bad_lba) noexcept nogil:
        """Zero blocks through the table (write permission needed) with
        ``zero_mode`` (a ZERO_*): the whole range is checked first, then
        physically contiguous runs are zeroed."""
        cdef uint64_t v = lba, left = nblocks, n, bs = self.block_size
        cdef uint64_t run_p = 0, run_len = 0
        cdef int64_t p
        cdef int rc
        cdef bint direct
        cdef int fd
        self.table.read_lock()
        rc = check_range(self.table, self.handle, bs, lba, nblocks, 1, afu_rc, bad_lba)
        if rc == 0 and nblocks:
            fd = self.table.backing_fd(self.handle, self.fd)
            direct = (self.table.rht[self.handle].fp >> 4) == RHT_FMT_DIRECT
            while left:
                n = left if direct else MC_CHUNK_SIZE - (v & (MC_CHUNK_SIZE - 1))
                if n > left:
                    n = left
                p = self.table.translate_one(self.handle, v, 1, afu_rc)
                if p < 0:           # not after check_range; kept for safety
                    bad_lba[0] = v
                    rc = XFER_AFU_ERROR
                    break
                if run_len and <uint64_t> p == run_p + run_len:
                    run_len += n
                else:
                    if run_len:
                        rc = zero_range(fd, zero_mode, run_p * bs, run_len * bs)
                        if rc:
                            break
                    run_p = <uint64_t> p
                    run_len = n
                v += n
                left -= n
            if rc == 0 and run_len:
                rc = zero_range(fd, zero_mode, run_p * bs, run_len * bs)
        self.table.unlock()
        return rc

    def unmap(self, lba, nblocks):
        """Zero ``nblocks`` blocks at ``lba`` (punching holes in files).

        Returns the number of blocks zeroed.
        """
        cdef uint64_t v = arg_u64(lba, b"lba", NO_LIMIT)
        cdef uint64_t n = arg_u64(nblocks, b"nblocks", NO_LIMIT)
        cdef int rc, afu_rc = 0
        cdef uint64_t bad = 0
        self._check(v, n)
        with nogil:
            rc = self._unmap(v, n, &afu_rc, &bad)
        if rc == XFER_IN_ERROR and self.on_reset is not None and self.on_reset():
            with nogil:
                rc = self._unmap(v, n, &afu_rc, &bad)
        if rc:
            self._raise(rc, afu_rc, bad, 1)
        self.stats.unmaps += 1
        self.stats.blocks_unmapped += n
        return n

    def translate(self, lbas, bint write=False):
        """Physical LBAs of an array of LBAs (uint64 array)."""
        if self.closed:
            raise ValueError("translate on a closed LUN")
        return self.table.translate_many(self.handle, u64_array(lbas, "lbas"),
                                         write=write)

    cdef int64_t _list_one(self, uint64_t op, uint64_t lba, uint64_t nblocks,
                           uint64_t offset, char *buf, uint64_t buflen,
                           int *afu_rc) noexcept nogil:
        """One request of a list: the blocks done, or a negative code."""
        cdef int rc
        cdef uint64_t bad = 0, limit = self._limit
        afu_rc[0] = 0
        if op < 1 or op > 3:
            return -EINVAL
        if nblocks and nblocks - 1 > NO_LIMIT - lba:
            return -EINVAL                  # passes LBA 2**64-1
        if limit != NO_LIMIT and (lba > limit or nblocks > limit - lba):
            return IO_BEYOND_SIZE
        if op == 3:
            rc = self._unmap(lba, nblocks, afu_rc, &bad)
        elif offset > buflen or nblocks > (buflen - offset) // self.block_size:
            return -EINVAL                  # does not fit in the buffer
        else:
            rc = self._run(lba, nblocks, buf + offset, op == 2, afu_rc, &bad)
        return list_status(rc, nblocks)

    def listio(self, ops, lbas, nblocks, buffer, offsets=None, lat_ns=None):
        """Issue a batch of requests in one GIL-free call.

        ``ops`` (LIST_READ / LIST_WRITE / LIST_UNMAP), ``lbas``, ``nblocks``
        and ``offsets`` (byte offsets into ``buffer``; None: the requests
        packed in order) are equal-length arrays of integers; ``buffer`` is
        one writable buffer holding every request's data.  Returns ``(status, afu_rc)``: per request, the
        blocks transferred (>= 0) or a negative code (-errno: -EINVAL for
        an unknown request type, a range passing LBA 2**64-1 or a request
        not fitting in the buffer, -EIO for a backing store that ended;
        IO_AFU_ERROR (-1000) for an AFU refusal, with its code in
        ``afu_rc``; IO_IN_ERROR (-1001) AFU reset; IO_GONE (-1002) context
        gone or foreign; IO_BEYOND_SIZE (-1003) beyond the logical size;
        ``cxlflash._core.errors.io_error`` makes a status its exception).  Requests are independent: one failing does not stop the
        others, and each is checked whole before any of its bytes move.
        A context found in error after an AFU reset (its state, or a moved
        reset epoch in a replica) is recovered first (``on_reset``); if a
        reset during the batch fails requests with IO_IN_ERROR, the context is
        recovered and those requests are re-driven once, after the rest.
        ``lat_ns``: an optional int64 array that receives each request's
        latency in nanoseconds.
        """
        if self.closed:
            raise ValueError("I/O on a closed LUN: the resource was released "
                             "or its context detached")
        o_arr, l_arr, c_arr, off_arr = list_arrays(ops, lbas, nblocks, offsets,
                                                   self.block_size)
        cdef const uint8_t[::1] o = o_arr
        cdef const uint64_t[::1] l = l_arr
        cdef const uint64_t[::1] c = c_arr
        cdef const uint64_t[::1] off = off_arr
        cdef Py_ssize_t n = o.shape[0], i
        cdef int64_t[::1] lat
        cdef bint timed = lat_ns is not None
        cdef int64_t t0 = 0
        if timed:
            lat = lat_ns
            if lat.shape[0] < n:
                raise ValueError("lat_ns is shorter than the request list")
        cdef bint in_error
        self.table._rlock()
        in_error = table_in_error(self.table)
        self.table.unlock()
        cdef bint may_recover = self.on_reset is not None
        if in_error and may_recover:
            # recover first, as readinto/write re-drive; a failed recovery
            # is not tried again below
            may_recover = bool(self.on_reset())
        status = np.zeros(n, dtype=np.int64)
        codes = np.zeros(n, dtype=np.int32)
        cdef int64_t[::1] st = status
        cdef int[::1] cd = codes
        cdef Py_buffer view
        cdef int afu_rc
        cdef uint64_t nread = 0, nwritten = 0, nerr = 0, breads = 0, bwrites = 0
        cdef uint64_t nunmap = 0, bunmap = 0, buflen
        cdef Py_ssize_t nreset = 0
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            buflen = <uint64_t> view.len
            with nogil:
                for i in range(n):
                    if timed:
                        t0 = now_ns()
                    st[i] = self._list_one(o[i], l[i], c[i], off[i],
                                           <char *> view.buf, buflen, &afu_rc)
                    cd[i] = afu_rc
                    if st[i] == IO_IN_ERROR:
                        nreset += 1
                    if timed:
                        lat[i] = now_ns() - t0
            if nreset and may_recover and self.on_reset():
                with nogil:
                    for i in range(n):
                        if st[i] != IO_IN_ERROR:
                            continue
                        if timed:
                            t0 = now_ns()
                        st[i] = self._list_one(o[i], l[i], c[i], off[i],
                                               <char *> view.buf, buflen, &afu_rc)
                        cd[i] = afu_rc
                        if timed:
                            lat[i] += now_ns() - t0
        finally:
            PyBuffer_Release(&view)
        count_list(&self.stats, o, c, st)
        return status, codes

    def count_error(self):
        """Count an error seen outside the data path (e.g. by async code)."""
        self.stats.errors += 1

    def get_stats(self):
        """The I/O counters as a dict."""
        return dict(self.stats)

    def reset_stats(self):
        memset(&self.stats, 0, sizeof(io_stats))

    def close(self):
        self.closed = True

    def __repr__(self):
        return (f"DataPath(handle={self.handle}, fd={self.fd}, "
                f"block_size={self.block_size}, closed={self.closed})")


cdef int64_t list_status(int rc, uint64_t nblocks) noexcept nogil:
    if rc == 0:
        return <int64_t> nblocks
    if rc == XFER_AFU_ERROR:
        return IO_AFU_ERROR
    if rc == XFER_IN_ERROR:
        return IO_IN_ERROR
    if rc == XFER_GONE or rc == XFER_FOREIGN:
        return IO_GONE
    if rc == XFER_BACKING_ENDED:
        return -EIO
    if rc == XFER_BEYOND_OFF_T:
        return -EINVAL
    return -rc


cdef void count_list(io_stats *stats, const uint8_t[::1] o, const uint64_t[::1] c,
                     const int64_t[::1] st) noexcept:
    """Count a list's requests into a DataPath's counters by outcome."""
    cdef Py_ssize_t i
    cdef uint64_t nread = 0, nwritten = 0, nerr = 0, breads = 0, bwrites = 0
    cdef uint64_t nunmap = 0, bunmap = 0
    with nogil:
        for i in range(o.shape[0]):
            if st[i] < 0:
                nerr += 1
            elif o[i] == 1:
                nread += 1
                breads += c[i]
            elif o[i] == 2:
                nwritten += 1
                bwrites += c[i]
            else:
                nunmap += 1
                bunmap += c[i]
    stats.list_calls += 1
    stats.reads += nread
    stats.writes += nwritten
    stats.blocks_read += breads
    stats.blocks_written += bwrites
    stats.unmaps += nunmap
    stats.blocks_unmapped += bunmap
    stats.errors += nerr


def list_arrays(ops, lbas, nblocks, offsets, block_size):
    """A request list's arrays, checked: ``(ops, lbas, nblocks, offsets)``
    as uint8, uint64, uint64, uint64, of equal lengths; ``offsets`` None
    packs the requests in order (``block_size`` bytes per block)."""
    o = op_array(ops)
    l = u64_array(lbas, "lbas")
    c = u64_array(nblocks, "nblocks")
    off = (packed_offsets(c, arg_block_size(block_size)) if offsets is None
           else u64_array(offsets, "offsets"))
    if not (len(l) == len(c) == len(off) == len(o)):
        raise ValueError("ops, lbas, nblocks and offsets must have the same length")
    return o, l, c, off


cdef object packed_offsets(const uint64_t[::1] nblocks, uint64_t block_size):
    """The byte offsets of requests packed in order in one buffer."""
    out = np.empty(nblocks.shape[0], dtype=np.uint64)
    cdef uint64_t[::1] o = out
    cdef uint64_t at = 0, size
    cdef Py_ssize_t i, bad = -1
    with nogil:
        for i in range(nblocks.shape[0]):
            o[i] = at
            if mul_overflow64(nblocks[i], block_size, &size) or size > NO_LIMIT - at:
                bad = i
                break
            at += size
    if bad >= 0:
        raise einval(f"nblocks[{bad}] = {nblocks[bad]}: the requests up to it do "
                     f"not fit in any buffer")
    return out


cdef class AfuPaths:
    """AfuPaths(paths, miss, error)

    The AFU data path of an adapter as ported C code drives it --
    ``readinto(context_id, rsrc_handle, lba, buffer)`` and ``write(...)``
    -- with no Python frame between the call and the core.  ``paths`` is
    the adapter's cache, ``paths[context_id][rsrc_handle]`` a tuple whose
    item 2 is the :class:`DataPath`; the adapter fills and clears it.
    ``miss(context_id, rsrc_handle)`` returns the DataPath of a pair not in
    the cache (validating them as the AFU does, and raising its errors);
    ``error(exc, lba, rsrc_handle, buffer, datapath)`` returns the
    exception to raise for an error of the transfer.  Only exact ``int``
    ids are looked up in the cache (1.0 is not a context id): anything
    else goes to ``miss``, which checks it.
    """
    cdef dict paths
    cdef object miss
    cdef object error

    def __cinit__(self, dict paths not None, miss, error):
        self.paths = paths
        self.miss = miss
        self.error = error

    cdef DataPath _path(self, object context_id, object rsrc_handle):
        cdef object per_ctx, entry
        if type(context_id) is int and type(rsrc_handle) is int:
            per_ctx = self.paths.get(context_id)
            if per_ctx is not None:
                entry = (<dict> per_ctx).get(rsrc_handle)
                if entry is not None:
                    return <DataPath> (<tuple> entry)[2]
        return <DataPath?> self.miss(context_id, rsrc_handle)

    cdef object _io(self, object context_id, object rsrc_handle, object lba,
                    object buffer, int write):
        cdef DataPath dp = self._path(context_id, rsrc_handle)
        try:
            return dp._io(lba, buffer, write)
        except (OSError, OverflowError) as e:
            raise self.error(e, lba, rsrc_handle, buffer, dp) from None

    def readinto(self, context_id, rsrc_handle, lba, buffer):
        """Read into ``buffer`` through a handle of a context."""
        return self._io(context_id, rsrc_handle, lba, buffer, 0)

    def write(self, context_id, rsrc_handle, lba, data):
        """Write ``data`` through a handle of a context."""
        return self._io(context_id, rsrc_handle, lba, data, 1)


def afu_command(ResourceTable table not None, handle, fd, block_size, lba,
                buffer, bint write=False):
    """One AFU command: read into (or, with ``write``, write from) ``buffer``
    at ``lba`` through ``handle``, with no logical size and no splitting.
    Returns the number of blocks transferred.  ``block_size``: a nonzero
    multiple of 512; integer arguments outside their range are
    ``OSError(EINVAL)``, non-integers ``TypeError``."""
    cdef uint32_t bs = arg_block_size(block_size)
    cdef uint32_t h = <uint32_t> arg_u64(handle, b"handle", 0xFFFFFFFF)
    cdef int f = arg_fd(fd)
    cdef uint64_t v = arg_u64(lba, b"lba", NO_LIMIT)
    cdef Py_buffer view
    cdef int rc, afu_rc = 0
    cdef uint64_t bad = 0, nblocks
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | (0 if write else PyBUF_WRITABLE))
    try:
        if view.len % bs:
            raise ValueError(f"buffer size {view.len} is not a multiple of the "
                             f"block size {bs}")
        nblocks = view.len // bs
        with nogil:
            rc = transfer(table, h, f, bs, v, nblocks, <char *> view.buf, write,
                          &afu_rc, &bad)
    finally:
        PyBuffer_Release(&view)
    if rc:
        raise_xfer_error(table, h, f, rc, afu_rc, bad, write)
    return nblocks

