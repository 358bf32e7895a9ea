"""Verifiable data patterns for benchmarks and tests.

Block ``lba`` written with sequence number ``seq`` holds 64-bit words
``splitmix64(lba, seq, word)``: any block can be regenerated from its LBA
and the last sequence number written to it, so a whole LUN can be checked
after a write workload without keeping a copy of the data.
"""
from libc.stdint cimport uint8_t, uint64_t, int64_t
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE

import numpy as np


cdef inline uint64_t mix(uint64_t x) noexcept nogil:
    x += 0x9E3779B97F4A7C15ULL
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    return x ^ (x >> 31)


cdef inline uint64_t word(uint64_t lba, uint64_t seq, uint64_t i) noexcept nogil:
    return mix(lba * 0x100000001B3ULL ^ (seq << 20) ^ i)


def fill(buffer, lbas, seqs, uint64_t block_size, uint64_t nblocks=1,
         buf_offsets=None):
    """Fill ``buffer``: request ``i`` (``nblocks`` blocks from ``lbas[i]``
    with sequence ``seqs[i]``) at ``buf_offsets[i]`` (default packed)."""
    cdef const uint64_t[::1] l = np.ascontiguousarray(lbas, dtype=np.uint64).reshape(-1)
    cdef const uint64_t[::1] s = np.ascontiguousarray(seqs, dtype=np.uint64).reshape(-1)
    cdef Py_ssize_t n = l.shape[0], i
    cdef uint64_t b, w, words = block_size // 8, req = nblocks * block_size
    cdef const uint64_t[::1] off
    if buf_offsets is None:
        buf_offsets = np.arange(n, dtype=np.uint64) * np.uint64(req)
    off = np.ascontiguousarray(buf_offsets, dtype=np.uint64).reshape(-1)
    cdef Py_buffer view
    cdef uint64_t *p
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        for i in range(n):
            if off[i] + req > <uint64_t> view.len:
                raise ValueError(f"request {i} does not fit in the buffer")
        with nogil:
            for i in range(n):
                for b in range(nblocks):
                    p = <uint64_t *> (<char *> view.buf + off[i] + b * block_size)
                    for w in range(words):
                        p[w] = word(l[i] + b, s[i], w)
    finally:
        PyBuffer_Release(&view)


def verify(buffer, uint64_t first_lba, seqs, uint64_t block_size):
    """Check consecutive blocks ``first_lba, first_lba+1, ...`` in
    ``buffer`` against their sequence numbers ``seqs`` (0: never written,
    not checked).  Returns the number of blocks that do not match."""
    cdef const uint64_t[::1] s = np.ascontiguousarray(seqs, dtype=np.uint64).reshape(-1)
    cdef Py_ssize_t n = s.shape[0], i
    cdef uint64_t w, words = block_size // 8, bad = 0
    cdef const uint64_t *p
    cdef Py_buffer view
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        if <uint64_t> view.len < n * block_size:
            raise ValueError("the buffer is shorter than the blocks to verify")
        with nogil:
            for i in range(n):
                if s[i] == 0:
                    continue
                p = <const uint64_t *> (<char *> view.buf + i * block_size)
                for w in range(words):
                    if p[w] != word(first_lba + i, s[i], w):
                        bad += 1
                        break
    finally:
        PyBuffer_Release(&view)
    return bad
