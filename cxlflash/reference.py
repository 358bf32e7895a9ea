"""The executable spec: the kernel's chunk allocator and the AFU's
translation formula in plain Python, line by line.

Read this module to see what the Cython core (``cxlflash._core``) does,
without the C: the core must give the same answers, and is measured
against these (``cxlflash bench`` and ``benchmarks/`` use them as the
baselines of the allocation and translation rows; ``tests/test_allocator.py``
runs random operation sequences against :class:`ChunkAllocator`).  They
are slow on purpose -- one Python step per chunk, as the kernel's C loop
-- and not used by the package's own I/O.

- :class:`ChunkAllocator` is the kernel's block allocator (spec §12:
  ``ba_alloc``, ``ba_free``, ``ba_clone``, ``ba_space``), with the batch
  calls of ``cxlflash._core.allocator.ChunkAllocator`` on top.
- :func:`translate` is format 0 of the AFU (spec §19.4) for a batch of
  virtual LBAs, in numpy: ``(lxt[vlba >> 16] & ~0xFFFF) | (vlba & 0xFFFF)``.

numpy is imported on first use (``import cxlflash`` stays cheap).
"""
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from ._core._lazy import numpy as np

from ._core.tables import MC_CHUNK_OFF_MASK, MC_CHUNK_SHIFT

__all__ = ["ChunkAllocator", "translate"]

ALL_ONES = (1 << 64) - 1
CLONE_MAX = 255                 # extra references a chunk can have (clone_map is a byte)


class ChunkAllocator:
    """The kernel's allocator of one LUN's chunks (spec §12), a 1 bit per
    free chunk in 64-bit words, with the kernel's field names.

    ``ba_alloc`` returns the chunk number (aun), or None where the kernel
    returns -1; ``ba_free`` and ``ba_clone`` return True for the kernel's
    OK and False for FAIL.  No bounds checks, as in the kernel: the batch
    calls of the core check ``in_range`` first (IndexError)."""

    def __init__(self, total_chunks):
        self.total_chunks = total_chunks                  # total_aus
        self.words = (total_chunks + 63) // 64
        self.bitmap = [ALL_ONES] * self.words
        if total_chunks % 64:                             # bits past the end: never free
            self.bitmap[-1] = (1 << (total_chunks % 64)) - 1
        self.free_aun_cnt = total_chunks
        self.free_low_idx = 0
        self.free_curr_idx = 0
        self.free_high_idx = self.words                   # exclusive
        self.clone_map = bytearray(total_chunks)          # extra references per chunk

    # -- the kernel's primitives (spec §12.2-12.5) ------------------------

    def _first_free(self, lo, hi):
        """The lowest free bit of the first word in [lo, hi) that has one,
        taken: (word, bit), or None."""
        bitmap = self.bitmap
        for w in range(lo, hi):
            x = bitmap[w]
            if x:
                bit = (x & -x).bit_length() - 1
                bitmap[w] = x & (x - 1)
                self.free_aun_cnt -= 1
                return w, bit
        return None

    def ba_alloc(self):
        """Word-granular next fit from the cursor word, wrapping to
        ``free_low_idx`` (§12.2)."""
        if self.free_aun_cnt == 0:
            return None
        found = self._first_free(self.free_curr_idx, self.free_high_idx)
        if found is None:
            found = self._first_free(self.free_low_idx, self.free_curr_idx)
            if found is None:
                return None
        w, bit = found
        self.free_curr_idx = w + 1 if bit == 63 else w
        return w * 64 + bit

    def is_free(self, aun):
        return bool(self.bitmap[aun // 64] >> (aun % 64) & 1)

    def ba_free(self, aun):
        """Drop one reference (§12.3): a clone reference first; the last
        one returns the chunk to the pool.  The cursor does not move."""
        if self.is_free(aun):
            return False
        if self.clone_map[aun] > 0:
            self.clone_map[aun] -= 1
            return True
        w = aun // 64
        self.bitmap[w] |= 1 << (aun % 64)
        self.free_aun_cnt += 1
        if w < self.free_low_idx:
            self.free_low_idx = w
        elif w > self.free_high_idx:
            self.free_high_idx = w
        return True

    def ba_clone(self, aun):
        """One more reference to an allocated chunk, at most 255 (§12.4)."""
        if self.is_free(aun) or self.clone_map[aun] == CLONE_MAX:
            return False
        self.clone_map[aun] += 1
        return True

    def ba_space(self):
        return self.free_aun_cnt

    # -- the core's batch calls on top of them ------------------------------

    def in_range(self, aun):
        return 0 <= aun < self.total_chunks

    def alloc_many(self, n, partial=False):
        """``n`` chunks in ba_alloc order; with fewer free: None (ENOSPC,
        nothing taken), or as many as there are with ``partial``."""
        if self.free_aun_cnt < n and not partial:
            return None
        alloc = self.ba_alloc
        return [alloc() for _ in range(min(n, self.free_aun_cnt))]

    def free_many(self, auns):
        """ba_free of each: the number of chunks that were already free."""
        return sum(not self.ba_free(a) for a in auns)

    def clone_many(self, auns):
        """ba_clone of each, all or nothing: a failure drops the references
        taken so far."""
        for i, a in enumerate(auns):
            if not self.ba_clone(a):
                for b in auns[:i]:
                    self.ba_free(b)
                return False
        return True


def translate(lxt, vlbas, out=None):
    """Physical LBAs of ``vlbas`` (int64 or uint64) through ``lxt`` (a
    handle's LXT, uint64 entries ``aun << 16 | lun_index << 8 | perms << 4 |
    port_sel``): the chunk's base OR the offset in the chunk (spec §19.4).
    A vLBA beyond the LXT raises IndexError (the AFU's 0x13).

    Without ``out``, a fresh array: the fastest numpy form (numpy updates
    the temporaries of ``&`` and ``|`` in place).  With ``out``, the
    result goes there (``np.bitwise_or(..., out=out)``: one temporary it
    cannot elide, ~20-30 % slower)."""
    # No temporary is given a name: numpy reuses a temporary in place only
    # when nothing else refers to it.
    v = np.asarray(vlbas).view(np.uint64)
    shift = np.uint64(MC_CHUNK_SHIFT)
    low = np.uint64(MC_CHUNK_OFF_MASK)
    high = ~low
    if out is None:
        return (lxt[v >> shift] & high) | (v & low)
    return np.bitwise_or(np.bitwise_and(lxt[v >> shift], high), v & low, out=out)
