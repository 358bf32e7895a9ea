"""The bare backing store's I/O: ``raw_io``, the baseline of the benchmarks.

A GIL-free loop of single ``pread``/``pwrite`` calls at byte offsets of a
backing store, with no table, no translation and no engine: the syscall
limit that the data path (``datapath``) and the engine are compared with.
Each call is the data path's own I/O primitive (``datapath.io_full``), so
both sides move bytes the same way.
"""
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release,
                             PyBUF_SIMPLE, PyBUF_WRITABLE)
from libc.stdint cimport uint64_t, int64_t
from cxlflash._core.args cimport arg_fd, arg_u64, u64_array
from cxlflash._core.geometry cimport OFF_MAX
from cxlflash._core.datapath cimport (io_full, now_ns, backing_end,
                                      XFER_BACKING_ENDED)

import errno as _errno
import os
from cxlflash._core._lazy import numpy as np   # imported on first use
from cxlflash._core.args import einval



cdef tuple raw_requests(object ops, object offsets, uint64_t nb, object buf_offsets,
                        object lat_ns):
    """The checked arrays of a bare-store request list: ``(ops, offsets,
    buf_offsets)`` as uint64 arrays of one length, every op 1 (read) or 2
    (write) and every byte range within ``off_t`` (OSError EINVAL);
    ``buf_offsets`` None packs the requests.  ``lat_ns``, when given, must
    hold a latency per request."""
    o_arr = u64_array(ops, "ops")
    off_arr = u64_array(offsets, "offsets")
    cdef const uint64_t[::1] o = o_arr
    cdef const uint64_t[::1] off = off_arr
    cdef Py_ssize_t n = o.shape[0], i
    cdef int64_t[::1] lat
    if buf_offsets is None:         # packed: raw_fit checks that it does not wrap
        boff = np.arange(n, dtype=np.uint64) * np.uint64(nb)
    else:
        boff = u64_array(buf_offsets, "buf_offsets")
    if off.shape[0] != n or len(boff) != n:
        raise ValueError("ops, offsets and buf_offsets must have the same length")
    if lat_ns is not None:
        lat = lat_ns
        if lat.shape[0] < n:
            raise ValueError("lat_ns is shorter than the request list")
    for i in range(n):
        if o[i] != 1 and o[i] != 2:
            raise ValueError(f"request {i}: op {o[i]} is neither 1 (read) nor 2 (write)")
        if off[i] > OFF_MAX - nb:
            raise einval(f"request {i}: bytes {off[i]}..{off[i] + nb} "
                          "pass byte 2**63-1, the most a backing store can address")
    return o_arr, off_arr, boff


cdef int raw_fit(const uint64_t[::1] boff, uint64_t nb, bint packed,
                 uint64_t buflen) except -1:
    """Every request's ``nb`` bytes fit in a buffer of ``buflen`` bytes
    (ValueError otherwise); ``packed``: the offsets were made here, and
    must not have wrapped."""
    cdef Py_ssize_t n = boff.shape[0], i
    if packed and nb and <uint64_t> n > buflen // nb:
        raise ValueError(f"{n} requests of {nb} bytes do not fit in the buffer "
                         f"({buflen} bytes)")
    for i in range(n):
        if boff[i] > buflen or nb > buflen - boff[i]:
            raise ValueError(f"request {i} does not fit in the buffer")
    return 0


def raw_io(fd, ops, offsets, nbytes, buffer, buf_offsets=None, lat_ns=None):
    """pread/pwrite ``nbytes`` at each byte offset of the bare backing
    store, in one GIL-free loop: no translation -- the syscall limit that
    benchmarks compare the data path against.

    ``ops``: per request 1 (read) or 2 (write); ``buffer``: request ``i``
    uses ``nbytes`` at ``buf_offsets[i]`` (default ``i * nbytes``).  Every
    request is checked before the first is issued: it must fit in the
    buffer (ValueError) and its byte range in ``off_t`` (OSError EINVAL).
    Returns the number of requests done; raises OSError on the first
    failure (EIO naming the byte where a backing store that ended did).
    ``lat_ns``: optional int64 array of per-request latencies.
    """
    cdef int f = arg_fd(fd)
    cdef uint64_t nb = arg_u64(nbytes, b"nbytes", OFF_MAX)
    o_arr, off_arr, boff_arr = raw_requests(ops, offsets, nb, buf_offsets, lat_ns)
    cdef const uint64_t[::1] o = o_arr
    cdef const uint64_t[::1] off = off_arr
    cdef const uint64_t[::1] boff = boff_arr
    cdef Py_ssize_t n = o.shape[0], i
    cdef Py_buffer view
    cdef int rc = 0
    cdef int64_t t0 = 0
    cdef uint64_t end = 0
    cdef bint timed = lat_ns is not None
    cdef int64_t[::1] lat
    if timed:
        lat = lat_ns
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        raw_fit(boff, nb, buf_offsets is None, <uint64_t> view.len)
        with nogil:
            for i in range(n):
                if timed:
                    t0 = now_ns()
                rc = io_full(f, <char *> view.buf + boff[i], nb, off[i], o[i] == 2, &end)
                if timed:
                    lat[i] = now_ns() - t0
                if rc:
                    break
    finally:
        PyBuffer_Release(&view)
    if rc == XFER_BACKING_ENDED:
        raise OSError(_errno.EIO, f"the backing store ended at byte "
                      f"{backing_end(f, end)}: it is "
                      "shorter than the offsets addressed (it shrank?)")
    if rc:
        raise OSError(rc, os.strerror(rc))
    return n
