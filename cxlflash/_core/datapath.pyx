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
"""
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release,
                             PyBUF_SIMPLE, PyBUF_WRITABLE)
from libc.errno cimport errno, EINTR, EINVAL, EIO, ENOMEM, EOPNOTSUPP
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.types cimport off_t
from cxlflash._core.includes.system cimport (
    pread, pwrite, fallocate, ioctl, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
    BLKZEROOUT)
from cxlflash._core.tables cimport (
    ResourceTable, AFU_RC_OK, AFU_RC_LXT_OUT_OF_BOUNDS, SCSI_LBA_OUT_OF_RANGE,
    TABLE_LIVE, TABLE_IN_ERROR, TABLE_GONE, TABLE_FOREIGN, MC_CHUNK_SHIFT,
    RHT_FMT_DIRECT)

import errno as _errno
import os
import numpy as np
from cxlflash._core.errors import afu_error, AfuError, AdapterResetError

DEF CHUNK_BLOCKS = 65536
DEF ZERO_BUF = 1048576
cdef uint64_t NO_LIMIT = 0xFFFFFFFFFFFFFFFF

# List I/O request types (the block library's cblk_io_t request_type).
LIST_READ = 1
LIST_WRITE = 2
LIST_UNMAP = 3

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *tp)
    int CLOCK_MONOTONIC


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t> ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int64_t io_full(int fd, char *buf, uint64_t length, uint64_t offset,
                     int write) noexcept nogil:
    """pread/pwrite all of it: bytes done, or -errno.  EINTR is retried;
    a short transfer is continued, and one that makes no progress (end of
    the backing store) is EIO."""
    cdef uint64_t done = 0
    cdef int64_t r
    while done < length:
        if write:
            r = pwrite(fd, buf + done, length - done, <off_t> (offset + done))
        else:
            r = pread(fd, buf + done, length - done, <off_t> (offset + done))
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        if r == 0:
            return -EIO
        done += <uint64_t> r
    return <int64_t> done


cdef int zero_range(int fd, int zero_mode, uint64_t offset,
                    uint64_t length) noexcept nogil:
    """Zero ``length`` bytes at ``offset`` of the backing store: 0 or errno."""
    cdef uint64_t rng[2]
    cdef char *zeros
    cdef uint64_t done, n
    cdef int64_t r
    if length == 0:
        return 0
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
        r = io_full(fd, zeros, n, offset + done, 1)
        if r < 0:
            free(zeros)
            return <int> -r
        done += n
    free(zeros)
    return 0


cdef inline int table_state_rc(ResourceTable table) noexcept nogil:
    cdef int state = table.live_state()
    if state == TABLE_LIVE:
        return 0
    if state == TABLE_IN_ERROR:
        return XFER_IN_ERROR
    if state == TABLE_FOREIGN:
        return XFER_FOREIGN
    return XFER_GONE


cdef int transfer(ResourceTable table, uint32_t handle, int fd,
                  uint32_t block_size, uint64_t lba, uint64_t nblocks,
                  char *buf, int write, int *afu_rc,
                  uint64_t *bad_lba) noexcept nogil:
    cdef int rc
    cdef int64_t p, r
    cdef uint64_t v, left, n, run_p = 0, run_len = 0, bs = block_size
    cdef char *run_buf = buf
    cdef char *cur = buf
    cdef bint direct
    table.read_lock()
    rc = table_state_rc(table)
    if rc != 0:
        table.unlock()
        return rc
    afu_rc[0] = table.lookup(handle, write)
    if afu_rc[0] != AFU_RC_OK:
        bad_lba[0] = lba
        table.unlock()
        return XFER_AFU_ERROR
    if nblocks == 0:
        table.unlock()
        return 0
    # The whole transfer must be addressable: check its last block first.
    if nblocks - 1 > NO_LIMIT - lba:
        afu_rc[0] = AFU_RC_LXT_OUT_OF_BOUNDS
        bad_lba[0] = NO_LIMIT
        table.unlock()
        return XFER_AFU_ERROR
    direct = (table.rht[handle].fp >> 4) == RHT_FMT_DIRECT
    # Within one chunk, translating the first block (below) checks it all.
    if direct or ((lba + nblocks - 1) >> MC_CHUNK_SHIFT) != (lba >> MC_CHUNK_SHIFT):
        if table.translate_one(handle, lba + nblocks - 1, write, afu_rc) < 0:
            bad_lba[0] = lba + nblocks - 1
            table.unlock()
            return XFER_AFU_ERROR
    v = lba
    left = nblocks
    while left:
        if direct:
            n = left
        else:
            n = CHUNK_BLOCKS - (v & (CHUNK_BLOCKS - 1))
            if n > left:
                n = left
        p = table.translate_one(handle, v, write, afu_rc)
        if p < 0:
            bad_lba[0] = v
            table.unlock()
            return XFER_AFU_ERROR
        if run_len and <uint64_t> p == run_p + run_len:
            run_len += n
        else:
            if run_len:
                r = io_full(fd, run_buf, run_len * bs, run_p * bs, write)
                if r < 0:
                    table.unlock()
                    return <int> -r
            run_p = <uint64_t> p
            run_len = n
            run_buf = cur
        cur += n * bs
        v += n
        left -= n
    r = io_full(fd, run_buf, run_len * bs, run_p * bs, write)
    table.unlock()
    if r < 0:
        return <int> -r
    return 0


def scrub_chunks(int fd, int zero_mode, auns, uint32_t block_size):
    """Zero whole physical chunks (``aun`` numbers) of a backing store.

    Used to scrub chunks freed by a shrink of a NEED_WRITE_SAME vLUN.
    Returns 0 or the errno of the first failure (the kernel ignores it).
    """
    cdef const int64_t[::1] a = np.ascontiguousarray(auns, dtype=np.int64).reshape(-1)
    cdef Py_ssize_t i
    cdef int rc = 0
    cdef uint64_t chunk_bytes = <uint64_t> CHUNK_BLOCKS * block_size
    with nogil:
        for i in range(a.shape[0]):
            rc = zero_range(fd, zero_mode, <uint64_t> a[i] * chunk_bytes, chunk_bytes)
            if rc:
                break
    return rc


cdef int raise_xfer_error(ResourceTable table, uint32_t handle, int rc,
                          int afu_rc, uint64_t bad_lba, int write) except -1:
    """Raise the exception for a failed transfer (``rc`` from transfer)."""
    if rc == XFER_AFU_ERROR:
        raise afu_error(afu_rc, handle, bad_lba, write=write,
                        extent=table.extent(handle) if handle < table.rht_size else None)
    if rc == XFER_IN_ERROR:
        raise AdapterResetError()
    if rc == XFER_FOREIGN:
        raise AfuError(0x21, "AFU rc 0x21 CAP_VIOLATION: this context belongs to "
                       "another process (a forked child must attach its own "
                       "context and clone)")
    if rc == XFER_GONE:
        raise AfuError(0x21, "AFU rc 0x21 CAP_VIOLATION: the context no longer "
                       "exists (detached or closed)")
    if rc == EINVAL:
        raise OSError(rc, "the backing store refused the transfer (with O_DIRECT, "
                      "buffers and offsets must be aligned: use "
                      "cxlflash.aligned_buffer)")
    raise OSError(rc, os.strerror(rc))


cdef class DataPath:
    """DataPath(table, handle, fd, block_size, *, max_xfer=0, zero_mode=0)

    The I/O channel of one resource handle: LBAs in native blocks of
    ``block_size`` bytes, relative to the handle (virtual LBAs for a vLUN,
    physical for a direct handle).  ``max_xfer`` (blocks, 0 = unlimited)
    splits large transfers into commands of at most that many blocks;
    ``limit`` (blocks) is a logical size below the AFU's bound: transfers
    past it fail with EINVAL before any I/O.  ``on_reset``: called (no
    arguments) when a transfer finds the context in error after an AFU
    reset; if it returns true (it recovered the context) the transfer is
    re-driven once.
    """

    def __cinit__(self, ResourceTable table not None, uint32_t handle, int fd,
                  uint32_t block_size, *, uint64_t max_xfer=0, int zero_mode=0):
        if block_size == 0 or block_size % 512:
            raise ValueError(f"block_size must be a multiple of 512, got {block_size}")
        self.table = table
        self.handle = handle
        self.fd = fd
        self.block_size = block_size
        self.max_xfer = max_xfer
        self.limit = NO_LIMIT
        self.zero_mode = zero_mode
        self.closed = False
        self.on_reset = None
        memset(&self.stats, 0, sizeof(io_stats))

    cdef int _check(self, uint64_t lba, uint64_t nblocks) except -1:
        if self.closed:
            raise ValueError("I/O on a closed LUN: the resource was released "
                             "or its context detached")
        if self.limit != NO_LIMIT and (lba > self.limit or nblocks > self.limit - lba):
            raise OSError(
                _errno.EINVAL,
                f"blocks {lba}..{lba + nblocks - 1} are beyond the logical size "
                f"of {self.limit} blocks: grow the LUN first")
        return 0

    cdef int _raise(self, int rc, int afu_rc, uint64_t bad_lba, int write) except -1:
        self.stats.errors += 1
        return raise_xfer_error(self.table, self.handle, rc, afu_rc, bad_lba, write)

    cdef int _run(self, uint64_t lba, uint64_t nblocks, char *buf, int write,
                  int *afu_rc, uint64_t *bad_lba) noexcept nogil:
        cdef uint64_t step = self.max_xfer if self.max_xfer else nblocks
        cdef uint64_t n
        cdef int rc = 0
        if nblocks == 0:
            return transfer(self.table, self.handle, self.fd, self.block_size,
                            lba, 0, buf, write, afu_rc, bad_lba)
        while nblocks:
            n = step if nblocks > step else nblocks
            rc = transfer(self.table, self.handle, self.fd, self.block_size,
                          lba, n, buf, write, afu_rc, bad_lba)
            if rc:
                return rc
            lba += n
            nblocks -= n
            buf += n * self.block_size
        return 0

    def readinto(self, uint64_t lba, buffer):
        """Read ``len(buffer) // block_size`` blocks at ``lba`` into ``buffer``.

        ``buffer``: any writable, C-contiguous object with the buffer
        protocol whose size is a multiple of ``block_size``.  Returns the
        number of blocks read.
        """
        cdef Py_buffer view
        cdef int rc, afu_rc = 0
        cdef uint64_t bad = 0, nblocks
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if view.len % self.block_size:
                raise ValueError(f"buffer size {view.len} is not a multiple of "
                                 f"the block size {self.block_size}")
            nblocks = view.len // self.block_size
            self._check(lba, nblocks)
            with nogil:
                rc = self._run(lba, nblocks, <char *> view.buf, 0, &afu_rc, &bad)
            if rc == XFER_IN_ERROR and self.on_reset is not None and self.on_reset():
                with nogil:
                    rc = self._run(lba, nblocks, <char *> view.buf, 0, &afu_rc, &bad)
        finally:
            PyBuffer_Release(&view)
        if rc:
            self._raise(rc, afu_rc, bad, 0)
        self.stats.reads += 1
        self.stats.blocks_read += nblocks
        return nblocks

    def read(self, uint64_t lba, uint64_t nblocks):
        """Read ``nblocks`` blocks at ``lba``; returns a bytearray."""
        buf = bytearray(nblocks * self.block_size)
        self.readinto(lba, buf)
        return buf

    def write(self, uint64_t lba, data):
        """Write ``data`` (a multiple of ``block_size`` bytes) at ``lba``.

        Returns the number of blocks written.
        """
        cdef Py_buffer view
        cdef int rc, afu_rc = 0
        cdef uint64_t bad = 0, nblocks
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len % self.block_size:
                raise ValueError(f"data size {view.len} is not a multiple of "
                                 f"the block size {self.block_size}")
            nblocks = view.len // self.block_size
            self._check(lba, nblocks)
            with nogil:
                rc = self._run(lba, nblocks, <char *> view.buf, 1, &afu_rc, &bad)
            if rc == XFER_IN_ERROR and self.on_reset is not None and self.on_reset():
                with nogil:
                    rc = self._run(lba, nblocks, <char *> view.buf, 1, &afu_rc, &bad)
        finally:
            PyBuffer_Release(&view)
        if rc:
            self._raise(rc, afu_rc, bad, 1)
        self.stats.writes += 1
        self.stats.blocks_written += nblocks
        return nblocks

    cdef int _unmap(self, uint64_t lba, uint64_t nblocks, int *afu_rc,
                    uint64_t *bad_lba) noexcept nogil:
        """Zero blocks through the table (write permission needed)."""
        cdef uint64_t v = lba, left = nblocks, n, bs = self.block_size
        cdef int64_t p
        cdef int rc
        cdef bint direct
        self.table.read_lock()
        rc = table_state_rc(self.table)
        if rc == 0:
            afu_rc[0] = self.table.lookup(self.handle, 1)
            if afu_rc[0] != AFU_RC_OK:
                bad_lba[0] = lba
                rc = XFER_AFU_ERROR
            elif nblocks and self.table.translate_one(self.handle, lba + nblocks - 1, 1, afu_rc) < 0:
                bad_lba[0] = lba + nblocks - 1
                rc = XFER_AFU_ERROR
        if rc == 0 and nblocks:
            direct = (self.table.rht[self.handle].fp >> 4) == RHT_FMT_DIRECT
            while left:
                n = left if direct else CHUNK_BLOCKS - (v & (CHUNK_BLOCKS - 1))
                if n > left:
                    n = left
                p = self.table.translate_one(self.handle, v, 1, afu_rc)
                if p < 0:
                    bad_lba[0] = v
                    rc = XFER_AFU_ERROR
                    break
                rc = zero_range(self.fd, self.zero_mode, <uint64_t> p * bs, n * bs)
                if rc:
                    break
                v += n
                left -= n
        self.table.unlock()
        return rc

    def unmap(self, uint64_t lba, uint64_t nblocks):
        """Zero ``nblocks`` blocks at ``lba`` (punching holes in files).

        Returns the number of blocks zeroed.
        """
        cdef int rc, afu_rc = 0
        cdef uint64_t bad = 0
        self._check(lba, nblocks)
        with nogil:
            rc = self._unmap(lba, nblocks, &afu_rc, &bad)
        if rc == XFER_IN_ERROR and self.on_reset is not None and self.on_reset():
            with nogil:
                rc = self._unmap(lba, nblocks, &afu_rc, &bad)
        if rc:
            self._raise(rc, afu_rc, bad, 1)
        self.stats.unmaps += 1
        self.stats.blocks_unmapped += nblocks
        return nblocks

    def translate(self, lbas, bint write=False):
        """Physical LBAs of an array of LBAs (uint64 array)."""
        if self.closed:
            raise ValueError("translate on a closed LUN")
        return self.table.translate_many(
            self.handle, np.ascontiguousarray(lbas, dtype=np.uint64).reshape(-1),
            write=write)

    def listio(self, ops, lbas, nblocks, buffer, offsets, lat_ns=None):
        """Issue a batch of requests in one GIL-free call.

        ``ops`` (LIST_READ / LIST_WRITE / LIST_UNMAP), ``lbas``, ``nblocks``
        and ``offsets`` (byte offsets into ``buffer``) are equal-length
        arrays; ``buffer`` is one writable buffer holding every request's
        data.  Returns ``(status, afu_rc)``: per request, the blocks
        transferred (>= 0) or a negative code (-errno; -1000 for an AFU
        refusal, with its code in ``afu_rc``; -1001 AFU reset; -1002
        context gone or foreign; -1003 beyond the logical size).
        Requests are independent: one failing does not stop the others.
        A context found in error after an AFU reset is recovered first
        (``on_reset``); a reset during the batch fails the rest with -1001.
        ``lat_ns``: an optional int64 array that receives each request's
        latency in nanoseconds.
        """
        if self.closed:
            raise ValueError("I/O on a closed LUN: the resource was released "
                             "or its context detached")
        cdef const uint8_t[::1] o = np.ascontiguousarray(ops, dtype=np.uint8).reshape(-1)
        cdef const uint64_t[::1] l = np.ascontiguousarray(lbas, dtype=np.uint64).reshape(-1)
        cdef const uint64_t[::1] c = np.ascontiguousarray(nblocks, dtype=np.uint64).reshape(-1)
        cdef const uint64_t[::1] off = np.ascontiguousarray(offsets, dtype=np.uint64).reshape(-1)
        cdef Py_ssize_t n = o.shape[0], i
        if not (l.shape[0] == c.shape[0] == off.shape[0] == n):
            raise ValueError("ops, lbas, nblocks and offsets must have the same length")
        if self.table.state == TABLE_IN_ERROR and self.on_reset is not None:
            self.on_reset()     # recover first, as readinto/write re-drive
        status = np.zeros(n, dtype=np.int64)
        codes = np.zeros(n, dtype=np.int32)
        cdef int64_t[::1] lat
        cdef bint timed = lat_ns is not None
        cdef int64_t t0 = 0
        if timed:
            lat = lat_ns
            if lat.shape[0] < n:
                raise ValueError("lat_ns is shorter than the request list")
        cdef int64_t[::1] st = status
        cdef int[::1] cd = codes
        cdef Py_buffer view
        cdef int rc, afu_rc
        cdef uint64_t bad, bs = self.block_size, limit = self.limit
        cdef uint64_t nread = 0, nwritten = 0, nerr = 0, breads = 0, bwrites = 0
        cdef uint64_t nunmap = 0, bunmap = 0
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            with nogil:
                for i in range(n):
                    afu_rc = 0
                    if timed:
                        t0 = now_ns()
                    if o[i] < 1 or o[i] > 3:
                        st[i] = -EINVAL
                    elif limit != NO_LIMIT and (l[i] > limit or c[i] > limit - l[i]):
                        st[i] = -1003
                    elif o[i] != 3 and (off[i] > <uint64_t> view.len or
                                        c[i] > (<uint64_t> view.len - off[i]) // bs):
                        st[i] = -EINVAL
                    else:
                        if o[i] == 3:
                            rc = self._unmap(l[i], c[i], &afu_rc, &bad)
                        else:
                            rc = self._run(l[i], c[i], <char *> view.buf + off[i],
                                           o[i] == 2, &afu_rc, &bad)
                        if rc == 0:
                            st[i] = <int64_t> c[i]
                        elif rc == XFER_AFU_ERROR:
                            st[i] = -1000
                            cd[i] = afu_rc
                        elif rc == XFER_IN_ERROR:
                            st[i] = -1001
                        elif rc < 0:
                            st[i] = -1002
                        else:
                            st[i] = -rc
                    if timed:
                        lat[i] = now_ns() - t0
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
        finally:
            PyBuffer_Release(&view)
        self.stats.list_calls += 1
        self.stats.reads += nread
        self.stats.writes += nwritten
        self.stats.blocks_read += breads
        self.stats.blocks_written += bwrites
        self.stats.unmaps += nunmap
        self.stats.blocks_unmapped += bunmap
        self.stats.errors += nerr
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


def afu_command(ResourceTable table not None, uint32_t handle, int fd,
                uint32_t block_size, uint64_t lba, buffer, bint write=False):
    """One AFU command: read into (or, with ``write``, write from) ``buffer``
    at ``lba`` through ``handle``, with no logical size and no splitting.
    Returns the number of blocks transferred."""
    cdef Py_buffer view
    cdef int rc, afu_rc = 0
    cdef uint64_t bad = 0, nblocks
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | (0 if write else PyBUF_WRITABLE))
    try:
        if view.len % block_size:
            raise ValueError(f"buffer size {view.len} is not a multiple of the "
                             f"block size {block_size}")
        nblocks = view.len // block_size
        with nogil:
            rc = transfer(table, handle, fd, block_size, lba, nblocks,
                          <char *> view.buf, write, &afu_rc, &bad)
    finally:
        PyBuffer_Release(&view)
    if rc:
        raise_xfer_error(table, handle, rc, afu_rc, bad, write)
    return nblocks


def raw_io(int fd, ops, offsets, uint64_t nbytes, buffer, buf_offsets=None,
           lat_ns=None):
    """pread/pwrite ``nbytes`` at each byte offset of the bare backing
    store, in one GIL-free loop: no translation, no checks -- the syscall
    limit that benchmarks compare the data path against.

    ``ops``: per request 1 (read) or 2 (write); ``buffer``: request ``i``
    uses ``nbytes`` at ``buf_offsets[i]`` (default ``i * nbytes``).
    Returns the number of requests done; raises OSError on the first
    failure.  ``lat_ns``: optional int64 array of per-request latencies.
    """
    cdef const uint8_t[::1] o = np.ascontiguousarray(ops, dtype=np.uint8).reshape(-1)
    cdef const uint64_t[::1] off = np.ascontiguousarray(offsets, dtype=np.uint64).reshape(-1)
    cdef Py_ssize_t n = o.shape[0], i
    cdef const uint64_t[::1] boff
    if buf_offsets is None:
        buf_offsets = np.arange(n, dtype=np.uint64) * np.uint64(nbytes)
    boff = np.ascontiguousarray(buf_offsets, dtype=np.uint64).reshape(-1)
    if off.shape[0] != n or boff.shape[0] != n:
        raise ValueError("ops, offsets and buf_offsets must have the same length")
    cdef Py_buffer view
    cdef int64_t r = 0, t0 = 0
    cdef int64_t[::1] lat
    cdef bint timed = lat_ns is not None
    if timed:
        lat = lat_ns
        if lat.shape[0] < n:
            raise ValueError("lat_ns is shorter than the request list")
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        for i in range(n):
            if boff[i] + nbytes > <uint64_t> view.len:
                raise ValueError(f"request {i} does not fit in the buffer")
        with nogil:
            for i in range(n):
                if timed:
                    t0 = now_ns()
                r = io_full(fd, <char *> view.buf + boff[i], nbytes, off[i], o[i] == 2)
                if timed:
                    lat[i] = now_ns() - t0
                if r < 0:
                    break
    finally:
        PyBuffer_Release(&view)
    if r < 0:
        raise OSError(<int> -r, os.strerror(<int> -r))
    return n
