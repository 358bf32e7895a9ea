"""Storage under a physical LUN: anonymous memory, a regular file, or a
block device.

Every backing is a file descriptor the data path reads and writes with
``pread``/``pwrite``: memory is a ``memfd`` (so it can be passed to other
processes and have holes punched in it), files and block devices are opened
as they are, optionally with ``O_DIRECT``.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from typing import TYPE_CHECKING

from .errors import CxlFlashError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["Backing", "MemoryBacking", "FileBacking", "BlockDeviceBacking",
           "open_backing", "aligned_buffer"]

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268

# Zeroing modes of the core data path (cxlflash/_core/datapath.pxd).
ZERO_PUNCH = 0
ZERO_BLKZEROOUT = 1
ZERO_WRITE = 2


class Backing:
    """Base class: ``fd``, ``size`` (bytes), ``block_size``, ``zero_mode``."""

    kind = "backing"
    zero_mode = ZERO_PUNCH

    def __init__(self, fd, block_size, path=None, owns_fd=True, direct=False):
        self.fd = fd
        self.block_size = block_size
        self.path = path
        self.direct = direct
        self._owns_fd = owns_fd

    @property
    def size(self):
        """The current size in bytes (re-read each time: it may change)."""
        return os.fstat(self.fd).st_size

    @property
    def blocks(self):
        return self.size // self.block_size

    def close(self):
        if self.fd >= 0 and self._owns_fd:
            os.close(self.fd)
        self.fd = -1

    def __repr__(self):
        where = f" {self.path!r}" if self.path else ""
        return (f"<{type(self).__name__}{where} size={self.size if self.fd >= 0 else '?'} "
                f"block_size={self.block_size}>")


class MemoryBacking(Backing):
    """Anonymous memory (a sparse ``memfd``) of ``size`` bytes."""

    kind = "memory"

    def __init__(self, size, block_size=4096, name="cxlflash-lun"):
        _check_size(size, block_size)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        super().__init__(fd, block_size)

    def grow(self, size):
        """Grow the memory to ``size`` bytes (a capacity change)."""
        if size > self.size:
            os.ftruncate(self.fd, size)


class FileBacking(Backing):
    """A regular file.  With ``size``, it is created (sparse) or extended."""

    kind = "file"

    def __init__(self, path, size=None, block_size=4096, direct=False,
                 create=False):
        flags = os.O_RDWR | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise type(e)(e.errno, f"cannot open backing file {path!r}: {e.strerror}") from None
        try:
            if size is not None:
                _check_size(size, block_size)
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd, block_size, path=path, direct=direct)


class BlockDeviceBacking(Backing):
    """A block device; its size and logical block size come from the device."""

    kind = "block device"
    zero_mode = ZERO_BLKZEROOUT

    def __init__(self, path, block_size=None, direct=False):
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise type(e)(e.errno, f"cannot open block device {path!r}: {e.strerror}") from None
        try:
            if block_size is None:
                buf = fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0))
                block_size = max(512, struct.unpack("i", buf)[0])
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd, block_size, path=path, direct=direct)

    @property
    def size(self):
        buf = fcntl.ioctl(self.fd, BLKGETSIZE64, struct.pack("Q", 0))
        return struct.unpack("Q", buf)[0]


def aligned_buffer(nbytes: int, alignment: int = 4096) -> npt.NDArray[np.uint8]:
    """A zeroed numpy uint8 array of ``nbytes`` whose address is a multiple
    of ``alignment`` (what O_DIRECT needs)."""
    import numpy as np
    raw = np.zeros(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + nbytes]


def _check_size(size, block_size):
    if block_size not in (512, 4096):
        raise CxlFlashError(errno.EINVAL,
                            f"block size must be 512 or 4096 bytes, got {block_size}")
    if size > (1 << 63) - 1:
        raise CxlFlashError(
            errno.EINVAL, f"LUN size {size} is beyond what a file or memory can "
            "hold (2**63-1 bytes)")
    if size <= 0 or size % block_size:
        raise CxlFlashError(
            errno.EINVAL,
            f"LUN size must be a positive multiple of the block size "
            f"({block_size} bytes), got {size}")


def open_backing(target, *, size=None, block_size=4096, direct=False):
    """A Backing for ``target``: an existing Backing, a path (regular file or
    block device), or None for memory (then ``size`` is required)."""
    if isinstance(target, Backing):
        return target
    if target is None:
        if size is None:
            raise CxlFlashError(errno.EINVAL, "a memory LUN needs a size in bytes")
        return MemoryBacking(size, block_size)
    path = os.fspath(target)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if size is None:
            raise CxlFlashError(
                errno.ENOENT,
                f"backing file {path!r} does not exist: give a size to create it") from None
        return FileBacking(path, size, block_size, direct=direct, create=True)
    if stat.S_ISBLK(st.st_mode):
        return BlockDeviceBacking(path, None if block_size == 4096 else block_size,
                                  direct=direct)
    if stat.S_ISREG(st.st_mode):
        return FileBacking(path, size, block_size, direct=direct)
    raise CxlFlashError(errno.EINVAL,
                        f"{path!r} is neither a regular file nor a block device")
