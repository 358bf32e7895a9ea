# The bare backing store's request lists (rawio.pyx), shared with the
# engine's raw_listio so that both check them alike.
from libc.stdint cimport uint64_t

# The checked arrays (ops, offsets, buf_offsets) of a request list of
# ``nb`` bytes each; ``lat_ns``, when given, long enough.
cdef tuple raw_requests(object ops, object offsets, uint64_t nb, object buf_offsets,
                        object lat_ns)

# Every request fits in a buffer of ``buflen`` bytes (ValueError otherwise).
cdef int raw_fit(const uint64_t[::1] boff, uint64_t nb, bint packed,
                 uint64_t buflen) except -1
