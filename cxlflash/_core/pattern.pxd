# Verifiable data patterns: the definition of a pattern word, for any
# GIL-free loop that generates or checks one (pattern.pyx's fill / verify).
from libc.stdint cimport uint64_t

# splitmix64's finaliser.
cdef inline uint64_t mix(uint64_t x) noexcept nogil:
    x += 0x9E3779B97F4A7C15ULL
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    return x ^ (x >> 31)


# 64-bit word ``i`` of block ``lba`` written with sequence number ``seq``.
cdef inline uint64_t word(uint64_t lba, uint64_t seq, uint64_t i) noexcept nogil:
    return mix(lba * 0x100000001B3ULL ^ (seq << 20) ^ i)
