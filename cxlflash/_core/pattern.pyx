"""Verifiable data patterns for benchmarks and tests.

Block ``lba`` written with sequence number ``seq`` holds 64-bit words
``splitmix64(lba, seq, word)``: any block can be regenerated from its LBA
and the last sequence number written to it, so a whole LUN can be checked
after a write workload without keeping a copy of the data.

Arguments are checked before any byte is written: integers as the data
path checks them (``OSError(EINVAL)`` out of range, ``TypeError`` for a
non-integer; ``block_size`` a nonzero multiple of 512), arrays of equal
length, every request inside the buffer (``ValueError`` otherwise) with
overflow-safe arithmetic, and no LBA range passing 2**64-1.
"""
from libc.stdint cimport uint8_t, uint64_t, int64_t
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cxlflash._core.args cimport arg_u64, arg_block_size, u64_array

from cxlflash._core._lazy import numpy as np   # imported on first use
from cxlflash._core.args import einval

cdef uint64_t NO_LIMIT = 0xFFFFFFFFFFFFFFFF


def fill(buffer, lbas, seqs, block_size, nblocks=1, buf_offsets=None):
    """Fill ``buffer``: request ``i`` (``nblocks`` blocks from ``lbas[i]``
    with sequence ``seqs[i]``) at ``buf_offsets[i]`` (default packed).
    ``seqs`` and ``buf_offsets`` have one entry per LBA."""
    cdef uint64_t bs = arg_block_size(block_size)
    cdef uint64_t nb = arg_u64(nblocks, b"nblocks", NO_LIMIT)
    cdef const uint64_t[::1] l = u64_array(lbas, "lbas")
    cdef const uint64_t[::1] s = u64_array(seqs, "seqs")
    cdef Py_ssize_t n = l.shape[0], i
    cdef uint64_t b, w, words = bs // 8, req = 0, buflen
    cdef const uint64_t[::1] off
    cdef Py_buffer view
    cdef uint64_t *p
    if s.shape[0] != n:
        raise ValueError(f"seqs has {s.shape[0]} entries for {n} LBAs")
    if buf_offsets is not None:
        off = u64_array(buf_offsets, "buf_offsets")
        if off.shape[0] != n:
            raise ValueError(f"buf_offsets has {off.shape[0]} entries for {n} LBAs")
    for i in range(n):
        if nb and nb - 1 > NO_LIMIT - l[i]:
            raise einval(f"request {i}: blocks {l[i]}..{l[i] + nb - 1} "
                          "pass LBA 2**64-1")
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        buflen = <uint64_t> view.len
        if n and nb > buflen // bs:
            raise ValueError(f"{nb} blocks of {bs} bytes do not fit in the buffer "
                             f"({buflen} bytes)")
        req = nb * bs       # <= buflen: no wrap
        if buf_offsets is None:
            if req and <uint64_t> n > buflen // req:
                raise ValueError(f"{n} requests of {req} bytes do not fit in the "
                                 f"buffer ({buflen} bytes)")
            off = np.arange(n, dtype=np.uint64) * np.uint64(req)
        for i in range(n):
            if off[i] > buflen or req > buflen - off[i]:
                raise ValueError(f"request {i} does not fit in the buffer")
        with nogil:
            for i in range(n):
                for b in range(nb):
                    p = <uint64_t *> (<char *> view.buf + off[i] + b * bs)
                    for w in range(words):
                        p[w] = word(l[i] + b, s[i], w)
    finally:
        PyBuffer_Release(&view)


def verify(buffer, first_lba, seqs, block_size):
    """Check consecutive blocks ``first_lba, first_lba+1, ...`` in
    ``buffer`` against their sequence numbers ``seqs`` (0: never written,
    not checked).  Returns the number of blocks that do not match."""
    cdef uint64_t bs = arg_block_size(block_size)
    cdef uint64_t first = arg_u64(first_lba, b"first_lba", NO_LIMIT)
    cdef const uint64_t[::1] s = u64_array(seqs, "seqs")
    cdef Py_ssize_t n = s.shape[0], i
    cdef uint64_t w, words = bs // 8, bad = 0
    cdef const uint64_t *p
    cdef Py_buffer view
    if n and <uint64_t> (n - 1) > NO_LIMIT - first:
        raise einval(f"blocks {first}..{first + n - 1} pass LBA 2**64-1")
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        if <uint64_t> n > <uint64_t> view.len // bs:
            raise ValueError("the buffer is shorter than the blocks to verify")
        with nogil:
            for i in range(n):
                if s[i] == 0:
                    continue
                p = <const uint64_t *> (<char *> view.buf + <uint64_t> i * bs)
                for w in range(words):
                    if p[w] != word(first + i, s[i], w):
                        bad += 1
                        break
    finally:
        PyBuffer_Release(&view)
    return bad
