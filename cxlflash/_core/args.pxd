# The core's argument checks, one place for every module of the core.
from libc.stdint cimport uint32_t, uint64_t, int64_t

# Integer arguments of the public functions: a Python int (or anything with
# __index__, e.g. numpy integer scalars) in 0..hi, else CxlFlashError
# (EINVAL) naming the parameter and the range; a non-integer (a float
# included: never truncated) is a TypeError naming the parameter.  Exact
# ints take a fast path.
cdef uint64_t arg_u64(object value, const char *name,
                      uint64_t hi) except? 0xFFFFFFFFFFFFFFFF
# An integer argument whose range the caller checks (and reports with its
# own exception): the exact Python int, or TypeError naming the parameter.
cdef object arg_int(object value, const char *name)
# A backing fd: 0..2**31-1, or -1 for "the fd the handle was opened on"
# (which the data path prefers anyway); EINVAL otherwise.
cdef int arg_fd(object fd) except -2
# A block size: a nonzero multiple of 512 below 2**32, else EINVAL.
cdef uint32_t arg_block_size(object value) except 0
# An array argument as a flat, C-contiguous uint64 ndarray: integers only
# (TypeError naming the parameter otherwise), none negative or >= 2**64
# (EINVAL).
cdef object u64_array(object obj, str name)
# An array of chunk numbers as a flat, C-contiguous int64 ndarray:
# integers only (TypeError otherwise); a value outside int64 is an
# IndexError (no chunk has that number).
cdef object i64_array(object obj, str name)
