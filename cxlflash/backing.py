"""Storage under a physical LUN: anonymous memory, a regular file, a
block device, or a Ceph RBD image.

Every backing is a file descriptor the data path names it by: memory is a
``memfd`` (so it can be passed to other processes and have holes punched
in it), files and block devices are opened as they are, optionally with
``O_DIRECT``, and read and written with ``pread``/``pwrite``.  An RBD image
(``rbd:POOL/IMAGE?conf=...&id=...&timeout=...``) is opened through librbd
and registered under a descriptor of its own (``cxlflash._core.store``):
the data path calls librbd for it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
import threading
import weakref

from typing import TYPE_CHECKING

from .errors import CxlFlashError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["Backing", "MemoryBacking", "FileBacking", "BlockDeviceBacking",
           "StoreBacking", "RbdBacking", "RemoteBacking", "parse_rbd", "open_backing",
           "aligned_buffer"]

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


# Backings that are stores, not files, by the descriptor that names them
# (for the engine of their requests: cxlflash.adapter).
_stores: "weakref.WeakValueDictionary[int, Backing]" = weakref.WeakValueDictionary()


def store_backing(fd):
    """The StoreBacking (RbdBacking, RemoteBacking) whose descriptor is
    ``fd``, or None."""
    return _stores.get(fd)


#: Sockets (requests in flight at once) a process whose RBD LUN another
#: process holds gets for it (RbdBacking.serve).
REMOTE_LINKS = 8
#: The most such sockets one image serves at once (a thread each).
MAX_SERVING = 1024

RBD_PREFIX = "rbd:"
RBD_DEFAULT_TIMEOUT = 30
RBD_MAX_TIMEOUT = 86400
_RBD_FORM = "rbd:POOL/IMAGE[?conf=PATH][&id=NAME][&timeout=SECONDS]"


def is_rbd(target) -> bool:
    """Whether ``target`` names an RBD image (a str starting "rbd:")."""
    return isinstance(target, str) and target.startswith(RBD_PREFIX)


def parse_rbd(spec):
    """``rbd:POOL/IMAGE[?conf=PATH][&id=NAME][&timeout=SECONDS]`` as a dict
    (pool, image, conf, client_id, timeout); EINVAL naming what is wrong."""
    def bad(why):
        return CxlFlashError(errno.EINVAL, f"{why} in the RBD LUN name {spec[:200]!r}: "
                             f"write {_RBD_FORM}")
    if not is_rbd(spec):
        raise bad("no 'rbd:' prefix")
    if "\0" in spec or len(spec) > 8192:
        raise bad("a NUL byte or more than 8192 characters")
    name, _, query = spec[len(RBD_PREFIX):].partition("?")
    pool, slash, image = name.partition("/")
    if not slash or not pool or not image:
        raise bad("no POOL/IMAGE")
    for what, v in (("pool", pool), ("image", image)):
        if "/" in v or "@" in v or "&" in v or "=" in v or not v.isprintable():
            raise bad(f"a {what} name with '/', '@', '&', '=' or an unprintable character")
    out = {"pool": pool, "image": image, "conf": None, "client_id": "admin",
           "timeout": RBD_DEFAULT_TIMEOUT}
    seen = set()
    for item in query.split("&") if query else ():
        key, eq, value = item.partition("=")
        if not eq or not value:
            raise bad(f"option {item!r} without a value")
        if key in seen:
            raise bad(f"option {key!r} given twice")
        seen.add(key)
        if key == "conf":
            out["conf"] = value
        elif key == "id":
            if not value.isprintable() or any(c in value for c in "/@ "):
                raise bad("an unusable client id")
            out["client_id"] = value
        elif key == "timeout":
            if not value.isdigit() or not 1 <= int(value) <= RBD_MAX_TIMEOUT:
                raise bad(f"timeout must be whole seconds, 1..{RBD_MAX_TIMEOUT}")
            out["timeout"] = int(value)
        else:
            raise bad(f"unknown option {key!r} (conf, id and timeout are known)")
    return out


def rbd_module():
    """cxlflash._core.rbd, or ENOSYS saying what to install when this build
    of cxlflash has no librbd."""
    try:
        from ._core import rbd
    except ImportError:
        raise CxlFlashError(
            errno.ENOSYS, "this cxlflash was built without librbd, so it cannot put a "
            "LUN on an RBD image: install librbd-dev (apt-get install librbd-dev) and "
            "reinstall cxlflash") from None
    return rbd


class StoreBacking(Backing):
    """A store that is not a file (an RBD image, or a store another process
    serves): registered under its descriptor, with an engine of its own."""

    zero_mode = ZERO_WRITE
    _engine_workers: "int | None" = None     # the thread pool's, if it is one

    def __init__(self, fd, block_size, path=None):
        self._engine = None
        self._lock = threading.Lock()
        super().__init__(fd, block_size, path=path, owns_fd=False)
        _stores[self.fd] = self

    def engine(self, depth=256):
        """The store's I/O engine (made on first use)."""
        with self._lock:
            if self._engine is None:
                from ._core.engine import Engine
                self._engine = Engine(store=self.fd, depth=depth,
                                      workers=self._engine_workers)
            return self._engine

    def _close_engine(self):
        """Close the engine (nothing in flight after) and unregister."""
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        if _stores.get(self.fd) is self:
            del _stores[self.fd]


class RbdBacking(StoreBacking):
    """A Ceph RBD image, named ``rbd:POOL/IMAGE[?conf=PATH][&id=NAME]
    [&timeout=SECONDS]``; its size is the image's, now.

    ``timeout`` (default 30 s): a request to an OSD or monitor that does
    not answer fails after that long -- data requests with EIO.  The first
    virtual LUN on it takes RBD's exclusive lock on the image
    (``claim_virtual``), so that two hosts never run two allocators on one
    image; it is kept until the LUN is removed."""

    kind = "rbd"

    def __init__(self, spec, block_size=4096):
        if block_size not in (512, 4096):
            raise CxlFlashError(errno.EINVAL,
                                f"block size must be 512 or 4096 bytes, got {block_size}")
        opts = parse_rbd(spec)
        rbd = rbd_module()
        self.image = rbd.RbdImage(opts["pool"], opts["image"], opts["conf"],
                                  opts["client_id"], opts["timeout"])
        self.timeout = opts["timeout"]
        self._serving = []            # (socket, thread) of each client's remote store
        super().__init__(self.image.fd, block_size, path=spec)

    @property
    def size(self):
        return self.image.size()

    def claim_virtual(self):
        """Hold RBD's exclusive lock on the image (EBUSY naming the holder
        when another client has it)."""
        try:
            self.image.lock()
        except OSError as e:
            raise CxlFlashError(e.errno, e.strerror) from None

    def serve(self, links=REMOTE_LINKS):
        """Sockets for another process (a client of the daemon, a forked
        child) whose I/O to this image goes through this process: a
        request in flight on each; a thread here answers each until its
        other end closes."""
        from ._core.store import serve_remote
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                 for _ in range(links)]
        with self._lock:
            if self.fd < 0:
                for mine, theirs in pairs:
                    mine.close()
                    theirs.close()
                raise CxlFlashError(errno.ENODEV, f"{self.path} is closed")
            self._serving = [(s, t) for s, t in self._serving if t.is_alive()]
            if len(self._serving) + links > MAX_SERVING:
                for mine, theirs in pairs:
                    mine.close()
                    theirs.close()
                raise CxlFlashError(errno.EMFILE, f"{self.path} already serves "
                                    f"{len(self._serving)} sockets of other processes "
                                    f"(at most {MAX_SERVING}): end some of them first")
            for mine, _ in pairs:
                thread = threading.Thread(target=self._serve_one, args=(serve_remote, mine),
                                          name="cxlflash-rbd-remote", daemon=True)
                self._serving.append((mine, thread))
                thread.start()
        return [theirs.detach() for _, theirs in pairs]

    def _serve_one(self, serve_remote, sock):
        """A thread's life: answer ``sock`` until it ends, then end it for
        the peer too (a peer that broke the protocol sees its end)."""
        try:
            serve_remote(sock.fileno(), self.fd)
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        with self._lock:
            serving, self._serving = self._serving, []
        for s, _ in serving:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for s, t in serving:
            t.join()
            s.close()
        self._close_engine()
        self.image.close()
        self.fd = -1


class RemoteBacking(StoreBacking):
    """A store another process serves (``RbdBacking.serve`` there), reached
    over the sockets ``sock_fds`` (which it then owns; the first names it)."""

    kind = "remote"
    _engine_workers = REMOTE_LINKS      # a request in flight per socket

    def __init__(self, sock_fds, block_size):
        from ._core.store import RemoteStore
        self.store = RemoteStore(sock_fds)
        super().__init__(self.store.fd, block_size)

    @property
    def size(self):
        from ._core.store import store_size
        return store_size(self.fd)

    def close(self):
        self._close_engine()
        self.store.close()
        self.fd = -1


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
    """A Backing for ``target``: an existing Backing, an RBD image
    ("rbd:POOL/IMAGE?..."), a path (regular file or block device), or None
    for memory (then ``size`` is required)."""
    if isinstance(target, Backing):
        return target
    if is_rbd(target):
        if size is not None or direct:
            raise CxlFlashError(errno.EINVAL, "an RBD LUN's size is its image's (grow it "
                                "with rbd resize) and it has no O_DIRECT: give neither "
                                "size nor direct")
        return RbdBacking(target, block_size)
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
