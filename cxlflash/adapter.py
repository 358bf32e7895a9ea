"""The embedded adapter: host + driver + AFU in this process.

``Adapter`` is what the kernel exposed as a SCSI host with its character
device (the ``HT_*`` ioctls), ``Disk`` what it exposed as ``/dev/sdX`` (the
``DK_*`` ioctls), and ``ioctl()`` the system call.  The AFU data path --
what a context does through its MMIO window -- is ``Adapter.read``,
``readinto``, ``write`` and ``translate``.
"""
from __future__ import annotations

import errno
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
else:
    from ._core._lazy import numpy as np        # imported on first use

from . import uapi, _args
from ._core.datapath import AfuPaths, DataPath
from ._core.errors import afu_error
from ._core.tables import TABLE_FOREIGN
from .backing import Backing, store_backing
from .channel import LocalChannel
from .driver.driver import Driver
from .errors import (CxlFlashError, AfuError, AdapterResetError,
                     ForkedAdapterError)
from .server import wire
from .server.client import DaemonChannel, ForkedChannel, connect_socket, default_socket

__all__ = ["Adapter", "Disk", "ioctl", "connect", "default_socket"]

if TYPE_CHECKING:
    from typing_extensions import Self
    from ._core.engine import Engine
    from .context import Context

_live_adapters: "weakref.WeakSet[Adapter]" = weakref.WeakSet()


# fork(): every adapter gets a new connection for the child.  The process
# that owns an embedded adapter serves the child over a socket pair
# (cxlflash.server); a client of a driver elsewhere (a daemon, or a forked
# child's parent) asks that driver for a new connection.  Either way the
# child speaks the same protocol, as its own process.

def _before_fork():
    for a in list(_live_adapters):
        a._fork_sock = None
        try:
            if a._local is not None and a._owner_pid == os.getpid():
                if not a._local.closed:
                    a._fork_sock = wire.socketpair()
            elif a._remote is not None or a._pending is not None:
                r = a._channel()            # (a forked child's, made on first use)
                a._fork_sock = (None, r.spawn())
        except Exception:           # the child will have no connection
            a._fork_sock = None


def _after_fork_in_parent():
    for a in list(_live_adapters):
        pair, a._fork_sock = a._fork_sock, None
        if pair is None:
            continue
        pair[1].close()
        if pair[0] is not None:
            a._fork_server().serve_pair(pair[0])


def _after_fork_in_child():
    for a in list(_live_adapters):
        # The parent's contexts are not ours: their data paths refuse I/O
        # here (AFU rc 0x21), and their ids are EINVAL at the driver.
        if a._local is not None:
            for ctx in a._local.driver.contexts():
                ctx.table.set_state(TABLE_FOREIGN)
        r = a._remote
        if r is not None and r.pid != os.getpid():
            r.foreign()
            r.abandon()
        if a._server is not None:
            a._server.abandon()
        a._engine = None                    # its threads stayed in the parent
        a._server = None
        a._lock = threading.Lock()          # another thread may have held it
        a._invalidate_paths()
        a._xlate_pool = []
        pair, a._fork_sock = a._fork_sock, None
        if pair is not None:
            if pair[0] is not None:
                pair[0].close()
            a._pending = (os.getpid(), pair[1])


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def _ints(context_id, rsrc_handle, lba):
    """The integer arguments of the AFU data path, checked (_args)."""
    return (_args.integer(context_id, "context_id"),
            _args.integer(rsrc_handle, "rsrc_handle"), _args.u64(lba, "lba"))


class Disk:
    """An open SCSI disk of a LUN on one port (the ``/dev/sdX`` fd)."""

    def __init__(self, adapter, sdev, flags):
        self.adapter = adapter
        self.sdev = sdev
        self.flags = flags
        self.closed = False

    @property
    def wwid(self) -> bytes:
        return self.sdev.wwid

    @property
    def port(self) -> int:
        return self.sdev.port

    @property
    def writable(self) -> bool:
        return (self.flags & os.O_ACCMODE) != os.O_RDONLY

    def attach(self, mode: int = os.O_RDWR, *, interrupts: int = 0) -> "Context":
        """Attach a new context to this disk's LUN (DK_CXLFLASH_ATTACH).

        ``mode``: the context's access (os.O_RDONLY, O_WRONLY or O_RDWR).
        Returns a :class:`cxlflash.Context`; use it as a context manager.
        """
        from .context import Context
        if self.closed:
            raise CxlFlashError(errno.EBADF, "the disk is closed")
        return Context(self, mode, interrupts=interrupts)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self):
        return (f"<Disk wwid={self.wwid.hex()} port={self.port}"
                f"{' closed' if self.closed else ''}>")


class Adapter:
    """An embedded CXL Flash adapter -- or, from :func:`connect`, a
    connection to the one a ``cxlflash serve`` daemon runs: the same
    interface either way.

    ``directory``: where LUNs created by ``HT_CXLFLASH_LUN_PROVISION`` (and
    :meth:`create_lun`) live as files; ``None`` keeps them in memory.
    ``ports``: FC ports (1-4).  ``max_contexts``: contexts (PEs) the AFU
    supports.  ``rht_per_context``: resource handles per context (256, as
    with 4 KiB pages, or up to 4096).  ``port_max_luns`` and
    ``port_capacity`` (4K blocks) bound what can be provisioned per port.
    ``engine``: the asynchronous I/O engine, "io_uring" or "threads" (None:
    ``CXLFLASH_ENGINE``, else io_uring where it works); ``engine_depth``:
    its operations in flight at most; ``io_threads``: the thread pool's
    workers (default min(engine_depth, 64)).
    """

    def __init__(self, directory: Optional[str] = None, *, ports: int = 2,
                 max_contexts: int = 512, rht_per_context: int = 256,
                 port_max_luns: int = 64, port_capacity: int = 1 << 30,
                 lun_mode: int = 0, sq_mode: bool = False, lun_provision: bool = True,
                 afu_debug: bool = True, engine: Optional[str] = None,
                 engine_depth: int = 256, io_threads: Optional[int] = None) -> None:
        if directory is not None and not os.path.isdir(directory):
            raise CxlFlashError(errno.ENOENT, f"directory {directory!r} does not exist")
        self.directory = directory
        self._setup(engine, engine_depth, io_threads)
        self._local = LocalChannel(Driver(
            ports=ports, max_contexts=max_contexts, rht_per_context=rht_per_context,
            port_max_luns=port_max_luns, port_capacity=port_capacity,
            lun_mode=lun_mode, sq_mode=sq_mode, lun_provision=lun_provision,
            afu_debug=afu_debug, directory=directory))
        self._owner_pid = os.getpid()

    def _setup(self, engine, engine_depth, io_threads):
        """What an embedded and a connected adapter share."""
        self._local: Optional[LocalChannel] = None   # the driver, when it is ours
        self._owner_pid: Optional[int] = None        # the process it belongs to
        self._remote: Optional[DaemonChannel] = None  # this process's connection
        self._pending = None          # (pid, socket): a forked child's connection
        self._fork_sock = None
        self._server = None           # serves this process's forked children
        self._lock = threading.Lock()
        self._engine_kind = engine
        self.engine_depth = engine_depth
        self.io_threads = io_threads
        self._engine: Optional[Engine] = None
        # The AFU data path's DataPaths, _paths[context_id][handle] =
        # (dp.readinto, dp.write, dp): built on
        # first use, dropped whenever an ioctl, a reset, a fork or close
        # may have changed what a context id or handle means (see _io_path).
        self._paths: Dict[int, Dict[int, Any]] = {}
        self._paths_gen = 0
        # readinto/write dispatched in the core (no Python frame per call);
        # the methods of the class below say what they do.
        self._afu = AfuPaths(self._paths, self._io_path, self._afu_io_error)
        self.readinto = self._afu.readinto      # type: ignore[method-assign]
        self.write = self._afu.write            # type: ignore[method-assign]
        self._xlate_pool: List[Any] = []        # translate() outputs to recycle
        _live_adapters.add(self)

    @classmethod
    def _over(cls, channel: DaemonChannel, *, engine: Optional[str] = None,
              engine_depth: int = 256, io_threads: Optional[int] = None) -> "Adapter":
        """An adapter whose driver is reached through ``channel``."""
        self = cls.__new__(cls)
        self.directory = None
        self._setup(engine, engine_depth, io_threads)
        self._remote = channel
        return self

    # -- which driver, from this process ------------------------------------------------

    @property
    def connected(self) -> bool:
        """True when the driver runs in another process (a daemon)."""
        return self._local is None

    def _channel(self):
        """How this process reaches the driver (``cxlflash.channel``):
        ENODEV when it is closed or gone, ForkedAdapterError when this
        process has no way to it."""
        pid = os.getpid()
        if self._local is not None and pid == self._owner_pid:
            if self._local.closed:
                raise CxlFlashError(errno.ENODEV, "the adapter is closed")
            return self._local
        r = self._remote
        if r is None or r.pid != pid:
            pending = self._pending
            if pending is None or pending[0] != pid:
                raise ForkedAdapterError(self._owner_pid or 0)
            with self._lock:
                if self._pending is pending:
                    self._pending = None
                    if self._local is not None:
                        r = ForkedChannel(pending[1], self._owner_pid)
                    else:
                        r = DaemonChannel(pending[1])
                    self._remote = r
                r = self._remote
        if r.closed:
            raise r._gone_error()
        return r

    def _client(self):
        """This process's connection to a driver in another process, or
        None (the driver is here, or out of reach)."""
        try:
            ch = self._channel()
        except CxlFlashError:
            return None
        return None if ch is self._local else ch

    def _gone(self) -> bool:
        """The driver is closed or out of reach from this process."""
        try:
            self._channel()
        except CxlFlashError:
            return True
        return False

    def _fork_server(self):
        if self._server is None:
            from .server.service import Server
            self._server = Server(self, log=lambda line: None)
        return self._server

    @property
    def driver(self) -> Driver:
        """The driver model (for tools and tests) of an embedded adapter."""
        if self._local is None:
            raise AttributeError("a connected adapter has no driver in this process: "
                                 "it runs in the daemon (see status())")
        return self._local.driver

    @property
    def provisioned(self) -> Dict[bytes, Dict[str, Any]]:
        """The LUNs LUN_PROVISION made: {wwid: {"port", "size", "lun_id", "path"}}
        (a connected adapter's: a copy of the daemon's, as of now)."""
        if self._local is not None:
            return self._local.driver.provisioned
        return {bytes.fromhex(w): p for w, p in self.status()["provisioned"].items()}

    def _info(self):
        ch = self._channel()
        return ch.info()

    @property
    def ports(self) -> int:
        return self._info()[0]

    @property
    def state(self) -> str:
        """The adapter state: 'NORMAL', 'RESET' or 'FAILTERM'."""
        if self._local is not None and os.getpid() == self._owner_pid:
            return self._local.driver.afu.state
        return self._info()[1]

    @property
    def lun_mode(self) -> int:
        """The internal-LUN mode (sysfs ``lun_mode``); nonzero restricts
        the ioctls to physical access."""
        return self._info()[2]

    @lun_mode.setter
    def lun_mode(self, value: int) -> None:
        self._channel().set_lun_mode(_args.integer(value, "lun_mode"))

    def status(self) -> Dict[str, Any]:
        """The driver's LUNs, contexts and counters (what ``cxlflash ctl``
        shows), as plain data."""
        ch = self._channel()
        if ch is self._local:
            out = {"pid": os.getpid(), "uid": os.getuid()}
            out.update(ch.status())
            return out
        return ch.status()

    # -- LUNs -------------------------------------------------------------------

    def add_lun(self, backing: Union[str, os.PathLike, Backing, None], *,
                ports: Sequence[int] = (0,), wwid: Optional[bytes] = None,
                superpipe: bool = True, size: Optional[int] = None,
                block_size: int = 4096, direct: bool = False) -> bytes:
        """Put a physical LUN behind the adapter, visible on ``ports``.

        ``backing``: a path (regular file or block device), a
        :class:`cxlflash.backing.Backing`, or ``None`` for memory (then
        ``size`` in bytes is required; a missing file is created with
        ``size``).  With ``superpipe`` (the default) superpipe mode is
        enabled on every path, as ``cxlfsetlunmode`` would (a documented
        deviation); ``superpipe=False`` is the kernel's legacy start: every
        DK ioctl but DK_CXLFLASH_MANAGE_LUN is EINVAL until MANAGE_LUN
        enables superpipe on that port.  Returns the 16-byte WWID.  On a
        connected adapter the daemon opens the path (an administrator's
        operation).
        """
        ch = self._channel()
        ports = tuple(_args.integer(p, "ports[]") for p in ports)
        if size is not None:
            size = _args.integer(size, "size")
        block_size = _args.integer(block_size, "block_size")
        if wwid is not None:
            wwid = bytes(wwid)
        try:
            return ch.add_lun(backing, ports, wwid, superpipe, size, block_size, direct)
        finally:
            self._invalidate_paths()

    def luns(self) -> List[bytes]:
        """The WWIDs of the LUNs behind the adapter."""
        return self._channel().luns()

    def open_disk(self, wwid: bytes, port: int = 0, flags: int = os.O_RDWR) -> Disk:
        """Open the SCSI disk of LUN ``wwid`` on ``port`` (the ``/dev/sdX``
        fd the DK_* ioctls are issued on)."""
        port = _args.integer(port, "port")
        flags = _args.integer(flags, "flags")
        return Disk(self, self._channel().open_disk(bytes(wwid), port), flags)

    def create_lun(self, size: int, *, port: int = 0, superpipe: bool = True) -> bytes:
        """Provision a new LUN of ``size`` bytes (a multiple of 4096) on
        ``port`` with HT_CXLFLASH_LUN_PROVISION -- in memory, or as a file
        in the adapter's directory -- and enable superpipe mode on it.
        Returns its WWID."""
        size = _args.integer(size, "size")
        port = _args.integer(port, "port")
        if size <= 0 or size % uapi.CXLFLASH_BLOCK_SIZE:
            raise CxlFlashError(errno.EINVAL, f"a LUN size must be a positive multiple "
                                f"of 4096 bytes, got {size}")
        arg = uapi.ht_cxlflash_lun_provision()
        arg.hdr.subcmd = uapi.HT_CXLFLASH_LUN_PROVISION_SUBCMD_CREATE_LUN
        arg.port = port
        arg.size = size // uapi.CXLFLASH_BLOCK_SIZE
        self._host_ioctl(uapi.HT_CXLFLASH_LUN_PROVISION, arg)
        wwid = bytes(arg.wwid)
        if superpipe:
            manage = uapi.dk_cxlflash_manage_lun()
            manage.hdr.flags = uapi.DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE
            manage.wwid[:] = wwid
            self._disk_ioctl(self.open_disk(wwid, port), uapi.DK_CXLFLASH_MANAGE_LUN, manage)
        return wwid

    def delete_lun(self, wwid: bytes) -> None:
        """Delete a LUN made by :meth:`create_lun` (its file too), in
        superpipe mode or not: EBUSY while a resource handle is open on it
        or a context has it attached."""
        ch = self._channel()
        try:
            ch.delete_lun(bytes(wwid))
        finally:
            self._invalidate_paths()

    @property
    def engine(self) -> "Engine":
        """The asynchronous I/O engine behind list I/O, futures and asyncio
        (made on first use): ``engine.kind`` is "io_uring" or "threads"
        (``Adapter(engine=...)``, else ``CXLFLASH_ENGINE``, else io_uring
        where the kernel allows it); ``engine_depth`` operations in flight
        at most; ``io_threads`` workers for the thread pool."""
        eng = self._engine
        if eng is None:
            try:
                self._channel()
            except CxlFlashError as e:
                if e.errno == errno.ENODEV:
                    raise self._closed_error() from None   # what the data path raises
                raise
            from ._core.engine import Engine
            with self._lock:
                if self._engine is None:
                    self._engine = Engine(self._engine_kind, self.engine_depth,
                                          self.io_threads)
                eng = self._engine
        return eng

    def _engine_for(self, fd: int) -> "Engine":
        """The engine of requests on backing store ``fd``: the adapter's,
        or the store's own (an RBD image, or a store the daemon serves:
        their requests cannot go through io_uring)."""
        b = store_backing(fd)
        if b is None:
            return self.engine
        return b.engine(self.engine_depth)

    def _engine_of(self, fd: int) -> "Optional[Engine]":
        """_engine_for, without making one."""
        b = store_backing(fd)
        return self._engine if b is None else b._engine

    def _context_record(self, context_id):
        """This process's record of a live or in-error context of its own
        (the driver's, or the replica of a connection), or None."""
        try:
            ch = self._channel()
        except CxlFlashError:
            return None
        return ch.context_record(context_id)

    def _retire_context(self, context_id):
        """Before this process closes a context's adapter fd."""
        try:
            ch = self._channel()
        except CxlFlashError:
            return
        ch.retire_context(context_id)

    # -- ioctls -------------------------------------------------------------------

    def _disk_ioctl(self, disk, request, arg):
        if disk.closed:
            raise CxlFlashError(errno.EBADF, "the disk is closed")
        ch = self._channel()
        try:
            ch.disk_ioctl(disk.sdev, disk.flags, request, arg)
        finally:
            self._invalidate_paths()

    def _host_ioctl(self, request, arg):
        ch = self._channel()
        try:
            ch.host_ioctl(request, arg)
        finally:
            self._invalidate_paths()

    # -- the AFU data path ------------------------------------------------------------

    def _mmio_context(self, context_id):
        """The context behind an MMIO window: AfuError 0x21 when it is not a
        live context of this process, AdapterResetError (the all-ones MMIO
        read) when it is in error after an AFU reset."""
        ctx = self._context_record(context_id)
        if ctx is None or ctx.pid != os.getpid():
            raise AfuError(0x21, "AFU rc 0x21 CAP_VIOLATION: context "
                           f"0x{context_id:016x} is not a live context of this process")
        if ctx.err_recovery_active:
            raise AdapterResetError()
        return ctx

    def _invalidate_paths(self):
        """Forget every cached data path: called after anything that can
        change what a (context_id, handle) pair addresses -- every ioctl
        (ATTACH, USER_*, RELEASE, DETACH, RECOVER, CLONE, and the adapter-fd
        releases an ioctl reaps), resets, add/delete of LUNs, fork, close."""
        with self._lock:
            self._paths_gen += 1
            self._paths.clear()
        # A fence among them (RELEASE, DETACH, a shrink, a reset) waited for
        # the asynchronous requests it fenced: their futures are done too.
        eng = self._engine
        if eng is not None:
            eng.settle_completed()

    def _closed_error(self):
        r = self._remote
        if r is not None and r.pid == os.getpid() and r.dead:
            return AfuError(0x21, "AFU rc 0x21 CAP_VIOLATION: " + r._gone_error().strerror)
        return AfuError(0x21, "AFU rc 0x21 CAP_VIOLATION: the adapter is closed: "
                        "no context exists any more (create a new Adapter)")

    def _io_path(self, context_id, rsrc_handle):
        """The DataPath of (context_id, rsrc_handle), validated as the AFU
        validates an MMIO command: a context id that is not a live context
        of this process is AfuError 0x21, one in error after a reset
        AdapterResetError, a handle beyond the RHT 0x03, a closed one 0x01.
        Cached until the next invalidation; a transfer through a cached
        path still checks the table's state and the handle under the
        table's read lock, so a context destroyed or put in error since is
        refused exactly as here."""
        context_id = _args.integer(context_id, "context_id")
        rsrc_handle = key = _args.integer(rsrc_handle, "rsrc_handle")
        if 0 <= rsrc_handle <= _args.U64_MAX:
            # The IOARCB's res_hndl is u32 (sislite.h): 2**32 + h is h.
            rsrc_handle &= 0xFFFFFFFF
        gen = self._paths_gen
        if self._gone():
            raise self._closed_error()
        if not 0 <= context_id <= _args.U64_MAX:
            raise AfuError(0x21, f"AFU rc 0x21 CAP_VIOLATION: {context_id} is not "
                           "a context id (0..2**64-1)")
        ctx = self._mmio_context(context_id)
        table = ctx.table
        if not 0 <= rsrc_handle < table.rht_size:
            raise afu_error(0x03, rsrc_handle)
        llun = ctx.rht_lun[rsrc_handle]
        if llun is None:
            raise afu_error(0x01, rsrc_handle)
        glun = llun.parent
        backing = glun.backing
        dp = DataPath(table, rsrc_handle, backing.fd, glun.blk_len,
                      zero_mode=backing.zero_mode)
        with self._lock:
            if self._paths_gen == gen:
                self._paths.setdefault(context_id, {})[key] = (
                    dp.readinto, dp.write, dp)
        return dp

    def _io_error(self, e, lba=0, handle=None, nbytes=None, block_size=None):
        """Map an error of a cached path's call to the documented one."""
        if isinstance(e, OverflowError) or lba > _args.U64_MAX:
            return _args.u64_error(lba, "lba")
        if (nbytes and e.errno == errno.EINVAL and not isinstance(e, AfuError)
                and lba + nbytes // block_size - 1 > _args.U64_MAX):
            # A range passing LBA 2**64-1 is refused as the AFU refuses it
            # (rc 0x13): the ioctl-level contract, whatever the data path's
            # own argument check called it.
            return afu_error(0x13, handle, _args.U64_MAX)
        if isinstance(e, AfuError) and e.afu_rc == 0x21 and self._gone():
            return self._closed_error()
        return e

    def read(self, context_id: int, rsrc_handle: int, lba: int, nblocks: int) -> bytes:
        """Read ``nblocks`` native blocks at ``lba`` through a resource
        handle of a context; returns bytes.  Raises :class:`AfuError` or
        :class:`AdapterResetError` as the AFU would refuse the command --
        before any buffer is allocated."""
        context_id, rsrc_handle, lba = _ints(context_id, rsrc_handle, lba)
        try:
            dp = self._paths[context_id][rsrc_handle][2]
        except KeyError:
            dp = self._io_path(context_id, rsrc_handle)
        rsrc_handle = dp.handle
        nblocks = _args.u64(nblocks, "nblocks")
        if nblocks:
            # The AFU's checks (context state, permission, the extent) on
            # the first and last block, before the buffer exists.
            last = lba + nblocks - 1
            if last > _args.U64_MAX:         # the AFU refuses a wrapping range
                raise afu_error(0x13, rsrc_handle, _args.U64_MAX)
            try:
                dp.table.translate_many(rsrc_handle,
                                        np.array([lba, last], dtype=np.uint64))
            except OSError as e:
                raise self._io_error(e) from None
        buf = bytearray(nblocks * dp.block_size)
        try:
            dp.readinto(lba, buf)
        except (OSError, OverflowError) as e:
            raise self._io_error(e) from None
        return bytes(buf)

    # The hot paths (what ported C code calls per request) are dispatched
    # in the core: ``__init__`` binds ``self.readinto``/``self.write`` to
    # an AfuPaths over the cache of _io_path.  These methods say what they
    # do (and serve a call through the class).

    def readinto(self, context_id: int, rsrc_handle: int, lba: int, buffer: Any) -> int:
        """Read into ``buffer`` (a multiple of the block size) at ``lba``
        through a resource handle of a context; returns the number of
        blocks read.  Refused as the AFU refuses a command (see
        :meth:`_io_path`)."""
        return self._afu.readinto(context_id, rsrc_handle, lba, buffer)

    def write(self, context_id: int, rsrc_handle: int, lba: int, data: Any) -> int:
        """Write ``data`` (a multiple of the block size) at ``lba``; returns
        the number of blocks written."""
        return self._afu.write(context_id, rsrc_handle, lba, data)

    def _afu_io_error(self, e, lba, rsrc_handle, buffer, dp):
        """The documented exception for an error of readinto/write."""
        try:
            nbytes = memoryview(buffer).nbytes
        except Exception:
            nbytes = None
        return self._io_error(e, lba, dp.handle, nbytes, dp.block_size)

    def translate(self, context_id: int, rsrc_handle: int, lbas: Any, *,
                  out: Optional[npt.NDArray[np.uint64]] = None) -> npt.NDArray[np.uint64]:
        """The physical LBAs the AFU would address for ``lbas`` (uint64).

        ``out``: a uint64 array of ``len(lbas)`` to fill (returned).
        Without it, the result is a fresh array -- or an earlier result of
        this call that nothing references any more (it is recycled, which
        saves page-faulting a large array on every call).
        """
        context_id = _args.integer(context_id, "context_id")
        rsrc_handle = _args.integer(rsrc_handle, "rsrc_handle")
        try:
            dp = self._paths[context_id][rsrc_handle][2]
        except KeyError:
            dp = self._io_path(context_id, rsrc_handle)
        rsrc_handle = dp.handle
        if not (lbas.__class__ is np.ndarray and lbas.dtype.kind in "iu"
                and lbas.dtype.itemsize == 8 and lbas.ndim == 1
                and lbas.flags.c_contiguous):
            lbas = _args.lba_array(lbas, "lbas")
        n = lbas.shape[0]
        if out is None:
            out = self._recycled(n)
        try:
            return dp.table.translate_many(rsrc_handle, lbas, out=out)
        except AfuError as e:
            i = e.index
            if i is not None and lbas.dtype.kind == "i" and lbas[i] < 0:
                raise CxlFlashError(errno.EINVAL, f"lbas[{i}] = {int(lbas[i])} is "
                                    "negative: LBAs are 0..2**64-1") from None
            raise self._io_error(e) from None

    def _recycled(self, n):
        """A uint64 array of ``n`` for translate(): one of the last results
        if nothing but the pool references it, else a new one (kept)."""
        if n < 65536:
            return np.empty(n, dtype=np.uint64)
        with self._lock:
            pool = self._xlate_pool
            for i in range(len(pool)):
                # References: the pool's list, and getrefcount's argument.
                if pool[i].shape[0] == n and sys.getrefcount(pool[i]) == 2:
                    return pool[i]
            arr = np.empty(n, dtype=np.uint64)
            if len(pool) >= 2:
                pool.pop(0)
            pool.append(arr)
            return arr

    # -- the AFU state machine and fault injection -------------------------------------

    def _admin(self, name, *args):
        """An adapter-wide operation: the owner of an embedded adapter, or
        an administrator of the daemon (others: EPERM)."""
        try:
            return getattr(self._channel(), name)(*args)
        finally:
            self._invalidate_paths()

    def reset(self) -> None:
        """Reset the AFU (spec §16.1): every context goes into error --
        its data path raises AdapterResetError -- until RECOVER_AFU."""
        self._admin("begin_reset")
        self._admin("end_reset", True)

    def begin_reset(self) -> None:
        """First half of :meth:`reset`: the state stays RESET (ioctls wait)
        until :meth:`end_reset`."""
        self._admin("begin_reset")

    def end_reset(self, ok: bool = True) -> None:
        """Second half of a reset: NORMAL, or FAILTERM when ``ok`` is false."""
        self._admin("end_reset", bool(ok))

    def fail(self) -> None:
        """Fail the AFU for good (FAILTERM): most ioctls get ENODEV; RESIZE,
        RELEASE and DETACH still work so users can clean up."""
        self._admin("fail")

    def inject_fault(self, point: str, count: int = 1, err: Optional[int] = None) -> None:
        """Make the next ``count`` operations at ``point`` fail (with
        ``err``, or the point's usual errno).  Points: see
        ``cxlflash.driver.afu.FAULT_POINTS`` ('sync' for the AFU sync)."""
        count = _args.integer(count, "count")
        if err is not None:
            err = _args.integer(err, "err")
        self._channel().inject_fault(point, count, err)

    def signal_waiters(self) -> None:
        """Interrupt every thread waiting in the driver, as a signal would
        (they fail with EINTR)."""
        self._channel().signal_waiters()

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Embedded: destroy every context and close the LUNs the adapter
        opened.  Connected: close this process's connection (the daemon
        releases its contexts as their adapter fds close).

        The data path is fenced first: every transfer in flight finishes,
        and none starts after (they fail with AfuError 0x21, "the adapter
        is closed"); only then are the backing fds closed, so no transfer
        can reach a file that reuses their numbers."""
        pid = os.getpid()
        if self._local is not None and pid == self._owner_pid:
            if self._local.closed:
                return
            # Driver.close() sets every context's table GONE under its
            # write lock: it returns after every transfer in flight has
            # ended -- asynchronous requests included -- and none starts
            # afterwards (AfuError 0x21); then it closes the backings.
            # Then the engine completes their futures and stops.
            if self._server is not None:
                self._server.close()
            self._local.close()
        else:
            r = self._remote
            if r is None or r.pid != pid or r._released:
                return
            r.close()
        if self._engine is not None:
            self._engine.close()
        self._invalidate_paths()
        self._xlate_pool = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        try:
            return (f"<Adapter{' connected' if self.connected else ''} ports={self.ports} "
                    f"luns={len(self.luns())} state={self.state}>")
        except (CxlFlashError, ValueError):
            return f"<Adapter{' connected' if self.connected else ''} closed>"


def ioctl(target: Union["Disk", "Adapter"], request: int, arg: Any) -> int:
    """Issue an ioctl: ``DK_CXLFLASH_*`` on a :class:`Disk`,
    ``HT_CXLFLASH_*`` on an :class:`Adapter`.  ``arg`` (a uapi structure)
    is updated in place on success; on failure it is untouched and
    :class:`CxlFlashError` carries the kernel's errno."""
    if isinstance(target, Disk):
        target.adapter._disk_ioctl(target, request, arg)
    elif isinstance(target, Adapter):
        target._host_ioctl(request, arg)
    else:
        raise CxlFlashError(errno.ENOTTY, f"{type(target).__name__} is not a "
                            "cxlflash Disk or Adapter")
    return 0


def connect(path: Union[str, os.PathLike, None] = None, *, engine: Optional[str] = None,
            engine_depth: int = 256, io_threads: Optional[int] = None) -> Adapter:
    """Connect to the driver a ``cxlflash serve`` daemon runs, at the Unix
    socket ``path`` (default: :func:`default_socket`: ``$CXLFLASH_SOCKET``,
    else ``$XDG_RUNTIME_DIR/cxlflash.sock``, else
    ``/run/cxlflash/cxlflash.sock``).  Returns an :class:`Adapter` with
    the same interface as an embedded one; its data path reads and writes
    the backing stores directly from this process.  ENODEV when no daemon
    answers there."""
    path = os.fspath(path) if path is not None else default_socket()
    sock = connect_socket(path)
    try:
        channel = DaemonChannel(sock, f"the cxlflash daemon at {path!r}")
    except BaseException:
        sock.close()
        raise
    return Adapter._over(channel, engine=engine, engine_depth=engine_depth,
                         io_threads=io_threads)
