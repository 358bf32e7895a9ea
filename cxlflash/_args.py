"""Argument checking for the public API, in one place.

The rule (README "Arguments"):

- A value of the wrong type (a float, str, bytes or None where an integer
  is needed) is a ``TypeError`` naming the parameter.  Integers are ``int``
  and anything with ``__index__`` (numpy integers, ``bool``).
- An integer outside what the device or the LUN can address -- negative,
  2**64 or more, beyond the vLUN's logical size or the direct LUN -- is a
  :class:`CxlFlashError` (an ``OSError``) with errno ``EINVAL`` whose
  message names the valid range.
- Every check happens before any allocation or I/O.

At the ioctl level (``Adapter.read``/``readinto``/``write``/``translate``,
the AFU data path) an address that is a valid 64-bit LBA but beyond the
resource is refused as the AFU refuses it (:class:`AfuError`, rc 0x13, or
the device's CHECK CONDITION for a direct handle): that is the kernel's
contract ported C code relies on.

The hot paths inline the cheapest test (``lba.__class__ is int and lba >=
0``) and call these helpers only when it fails.
"""
import errno

from ._core.args import integer, uint64_array
from .errors import CxlFlashError

U64_MAX = (1 << 64) - 1


def u64(value, name):
    """An integer in 0..2**64-1: TypeError / CxlFlashError(EINVAL)."""
    v = integer(value, name)
    if v < 0 or v > U64_MAX:
        raise CxlFlashError(errno.EINVAL, f"{name} {v} is outside 0..2**64-1")
    return v


def nonneg(value, name, limit=None, what=None):
    """An integer in 0..limit (inclusive; no limit: 0..2**64-1)."""
    v = integer(value, name)
    top = U64_MAX if limit is None else limit
    if v < 0 or v > top:
        raise CxlFlashError(errno.EINVAL, f"{name} {v} is outside 0..{top}"
                            + (f" ({what})" if what else ""))
    return v


def within(lba, nblocks, size, what="the logical size"):
    """Blocks ``lba .. lba+nblocks-1`` within ``size`` blocks, or
    CxlFlashError(EINVAL) naming the range (``lba``/``nblocks`` are ints
    already known to be >= 0)."""
    if lba > size or nblocks > size - lba:
        raise CxlFlashError(
            errno.EINVAL,
            f"blocks {lba}..{lba + nblocks - 1} are beyond {what} of {size} "
            f"blocks (LBAs 0..{size - 1}): grow the LUN first" if size else
            f"blocks {lba}..{lba + nblocks - 1} are beyond {what} of 0 blocks: "
            "set a size first")
    return lba


def qd(value, limit=65536):
    """A queue depth in 1..limit: TypeError / CxlFlashError(EINVAL)."""
    v = integer(value, "qd")
    if v < 1 or v > limit:
        raise CxlFlashError(errno.EINVAL, f"qd must be 1..{limit}, got {v}")
    return v


def size(value, name="size", limit=None):
    """A size in blocks: TypeError / CxlFlashError(EINVAL)."""
    return nonneg(value, name, limit)


# A contiguous uint64 array of LBAs (or counts, offsets) from any
# array-like of integers: the core's check (TypeError for non-integers,
# CxlFlashError(EINVAL) outside 0..2**64-1; uint64 input is not copied).
lba_array = uint64_array


def u64_error(value, name):
    """The CxlFlashError for an integer the core could not take as a
    64-bit unsigned value."""
    return CxlFlashError(errno.EINVAL, f"{name} {value} is outside 0..2**64-1")
