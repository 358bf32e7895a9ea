# The numbers the core's address arithmetic is made of, defined once (a
# .pxd with no module: cimporting it imports nothing at run time).
#
from libc.stdint cimport uint64_t

# Chunk geometry (the kernel's vlun.h).  allocator.pyx, tables.pyx,
# datapath.pyx and engine.pyx cimport these; Python imports them from
# cxlflash._core.tables (as plain ints); uapi.py keeps the kernel ABI's
# copy, which tests/test_uapi.py checks against these.
cdef enum ChunkGeometry:
    MC_CHUNK_SHIFT = 16         # log2 of a chunk's size in blocks
    MC_CHUNK_SIZE = 65536       # blocks per chunk (1 << MC_CHUNK_SHIFT)
    MC_CHUNK_OFF_MASK = 0xFFFF  # a block's offset in its chunk (MC_CHUNK_SIZE - 1)

# NO_LIMIT: the last addressable LBA, 2**64 - 1 (also "no bound" for a
# u64 argument and "no logical size" for a data path).  OFF_MAX: the
# largest byte offset a backing store can address (off_t's maximum,
# 2**63 - 1): every physical block's byte offset, end included, must fit.
cdef extern from *:
    """
    #include <stdint.h>
    #define CXLFLASH_NO_LIMIT UINT64_MAX
    #define CXLFLASH_OFF_MAX ((uint64_t) INT64_MAX)
    """
    const uint64_t NO_LIMIT "CXLFLASH_NO_LIMIT"
    const uint64_t OFF_MAX "CXLFLASH_OFF_MAX"
