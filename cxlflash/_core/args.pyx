"""The core's argument checks (``args.pxd`` says what each accepts).

One rule for the whole core, and so for the package (the object API binds
the core's methods directly): an integer parameter takes an int or
anything with ``__index__``, never a float; out of its range it is a
``CxlFlashError`` with errno EINVAL naming the parameter and the range,
raised before any memory is allocated or any byte moves.
"""
from cpython.exc cimport PyErr_Occurred, PyErr_Clear
from libc.stdint cimport uint32_t, uint64_t, int64_t, INT64_MAX
from cxlflash._core.geometry cimport NO_LIMIT

import errno as _errno
import operator
from cxlflash._core._lazy import numpy as np   # imported on first use
from cxlflash._core.errors import CxlFlashError


# An argument out of range: a CxlFlashError (an OSError), errno EINVAL.
ArgumentError = CxlFlashError


def einval(message):
    """The exception for an argument outside its range (errno EINVAL)."""
    return ArgumentError(_errno.EINVAL, message)

cdef extern from "Python.h":
    # Declared here without an exception clause: the caller checks.  (On
    # LP64 an unsigned long is 64 bits, asserted below; PyLong_AsUnsignedLong
    # converts multi-digit ints without the byte-array detour that
    # PyLong_AsUnsignedLongLong takes.)
    unsigned long pylong_as_u64 "PyLong_AsUnsignedLong"(object o)
    bint pylong_check_exact "PyLong_CheckExact"(object o)
    Py_ssize_t PY_SSIZE_T_MAX

cdef str _range_text(uint64_t hi):
    return "0..2**64-1" if hi == NO_LIMIT else f"0..{hi}"


cdef uint64_t _arg_u64_slow(object value, const char *name,
                            uint64_t hi) except? 0xFFFFFFFFFFFFFFFF:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name.decode()} must be an integer, not "
                        f"{type(value).__name__}") from None
    if v < 0 or v > hi:
        raise einval(f"{name.decode()} {v} is out of range: it "
                      f"must be in {_range_text(hi)}")
    return <uint64_t> v


cdef uint64_t arg_u64(object value, const char *name,
                      uint64_t hi) except? 0xFFFFFFFFFFFFFFFF:
    cdef unsigned long v
    if pylong_check_exact(value):
        v = pylong_as_u64(value)
        if v <= hi and (v != NO_LIMIT or PyErr_Occurred() == NULL):
            return v
        PyErr_Clear()       # negative or >= 2**64: the slow path says so
    return _arg_u64_slow(value, name, hi)


cdef uint32_t arg_block_size(object value) except 0:
    cdef uint64_t bs = arg_u64(value, b"block_size", 0xFFFFFFFF)
    if bs == 0 or bs % 512:
        raise einval(f"block_size {bs} is not a nonzero "
                      f"multiple of 512")
    return <uint32_t> bs


cdef object _U64 = None        # np.dtype(np.uint64), made on first use (numpy is lazy)
cdef object _I64 = None


cdef object _int_array(object obj, str name, object dtype, bint unsigned):
    """A flat, C-contiguous array of ``dtype`` (uint64 or int64) from any
    array-like of integers: TypeError for anything else; a value that
    ``dtype`` cannot hold is refused (EINVAL for uint64, IndexError -- no
    chunk has that number -- for int64)."""
    cdef object a = None, bad = None
    if type(obj) is np.ndarray and (<object> obj).dtype is dtype:
        return np.ascontiguousarray(obj).reshape(-1)
    if isinstance(obj, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be an array of integers, not {type(obj).__name__}")
    try:
        a = np.asarray(obj)
    except (TypeError, ValueError, OverflowError):
        pass
    if a is not None:
        if a.size == 0:
            return np.zeros(0, dtype=dtype)
        kind = a.dtype.kind
        if kind == "i" or kind == "u" or kind == "b":
            if unsigned and kind == "i" and a.min() < 0:
                bad = a.min()
            elif not unsigned and kind == "u" and a.max() > INT64_MAX:
                bad = a.max()
            else:
                return np.ascontiguousarray(a, dtype=dtype).reshape(-1)
        elif type(obj) is np.ndarray and kind != "O":
            raise TypeError(f"{name} must be an array of integers, not {a.dtype}")
    if bad is None:
        # Not an integer ndarray: a sequence numpy could not type as
        # integers (mixing negatives with values >= 2**63 makes float64;
        # ints beyond 2**64 make objects), or not integers at all.  Element
        # by element -- only ever on this error-prone path.
        try:
            vals = [operator.index(x) for x in np.asarray(obj, dtype=object).reshape(-1)]
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be an array of integers") from None
        if not vals:
            return np.zeros(0, dtype=dtype)
        lo, hi = ((0, 2 ** 64 - 1) if unsigned else (-2 ** 63, 2 ** 63 - 1))
        if min(vals) < lo:
            bad = min(vals)
        elif max(vals) > hi:
            bad = max(vals)
        else:
            return np.array(vals, dtype=dtype)
    if unsigned:
        raise einval(f"{name} holds {bad}: its values must be in 0..2**64-1")
    raise IndexError(f"{name} holds {bad}: no chunk has that number")


cdef object u64_array(object obj, str name):
    global _U64
    if _U64 is None:
        _U64 = np.dtype(np.uint64)
    return _int_array(obj, name, _U64, True)


cdef object i64_array(object obj, str name):
    global _I64
    if _I64 is None:
        _I64 = np.dtype(np.int64)
    return _int_array(obj, name, _I64, False)


def integer(value, name):
    """``value`` as an int: TypeError naming ``name`` when it is not an
    integer (floats are refused, never truncated)."""
    if type(value) is int:
        return value
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not "
                        f"{type(value).__name__} ({value!r:.40})") from None


cdef int arg_fd(object fd) except -2:
    cdef object v = arg_int(fd, b"fd")
    if v == -1:
        return -1
    if v < 0 or v > 0x7FFFFFFF:
        raise einval(f"fd {v} is out of range: it must be a file descriptor "
                     "(0..2**31-1) or -1")
    return <int> v


cdef object arg_int(object value, const char *name):
    if type(value) is int:
        return value
    return integer(value, name.decode())


def uint64_array(values, name="lbas"):
    """``values`` (any array-like of integers) as a flat, C-contiguous
    uint64 array: TypeError for non-integers, CxlFlashError(EINVAL) for a
    value outside 0..2**64-1.  A uint64 array is not copied."""
    return u64_array(values, name)
