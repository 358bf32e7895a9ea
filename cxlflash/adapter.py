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
from .backing import Backing, open_backing, MemoryBacking, FileBacking
from .driver.core import Driver, Caller
from .driver import superpipe, host
from .driver.lun import Sdev, sam_lun_id
from .errors import (CxlFlashError, AfuError, AdapterResetError,
                     ForkedAdapterError)
from .server import protocol
from .server.client import Remote
from .server.service import Connection

__all__ = ["Adapter", "Disk", "ioctl"]

if TYPE_CHECKING:
    from typing_extensions import Self
    from ._core.engine import Engine
    from .context import Context

_live_adapters: "weakref.WeakSet[Adapter]" = weakref.WeakSet()


# fork(): every adapter this process owns gets a socket pair; the parent
# serves the child's requests on its end (cxlflash.server), and the child's
# adapter sends its ioctls there.  A grandchild has no such connection.

def _before_fork():
    for a in list(_live_adapters):
        if a._owner_pid == os.getpid() and not a._driver.closed:
            a._fork_pair = protocol.socketpair()


def _after_fork_in_parent():
    for a in list(_live_adapters):
        pair = a._fork_pair
        if pair is not None:
            a._fork_pair = None
            pair[1].close()
            Connection(a, pair[0]).start()


def _after_fork_in_child():
    for a in list(_live_adapters):
        # The copy of the driver is frozen: the parent's contexts are not
        # ours, and their data paths refuse I/O (AFU rc 0x21).
        for ctx in list(a._driver.ctx_tbl) + list(a._driver.ctx_err_recovery):
            if ctx is not None:
                ctx.table.set_state(TABLE_FOREIGN)
        a._engine = None                    # its threads stayed in the parent
        a._lock = threading.Lock()          # another thread may have held it
        a._invalidate_paths()               # the parent's contexts are not ours
        a._xlate_pool = []
        pair = a._fork_pair
        if pair is not None:
            a._fork_pair = None
            pair[0].close()
            a._remote = Remote(pair[1], a, a._owner_pid)


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def _ints(context_id, rsrc_handle, lba):
    """The integer arguments of the AFU data path, checked (_args)."""
    return (_args.integer(context_id, "context_id"),
            _args.integer(rsrc_handle, "rsrc_handle"), _args.u64(lba, "lba"))


def _caller():
    return Caller(os.getpid(), os.getppid())


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
    """An embedded CXL Flash adapter.

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
        self._driver = Driver(ports=ports, max_contexts=max_contexts,
                              rht_per_context=rht_per_context,
                              port_max_luns=port_max_luns, port_capacity=port_capacity,
                              lun_mode=lun_mode, sq_mode=sq_mode,
                              lun_provision=lun_provision, afu_debug=afu_debug)
        self._owner_pid = os.getpid()
        self._backings: Dict[bytes, Backing] = {}          # wwid -> Backing we opened (and close)
        self.provisioned: Dict[bytes, Dict[str, Any]] = {}        # wwid -> {"port", "size", "lun_id", "path"}
        self._serial = 0
        self._lock = threading.Lock()
        self._engine_kind = engine
        self.engine_depth = engine_depth
        self.io_threads = io_threads
        self._engine: Optional[Engine] = None
        self._fork_pair = None
        self._remote = None          # in a forked child: the parent's driver
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

    # -- identity and fork ------------------------------------------------------

    def _check_owner(self):
        """Operations only the process that created the adapter can do."""
        if os.getpid() != self._owner_pid:
            raise ForkedAdapterError(self._owner_pid, remote=self._client() is not None)
        if self._driver.closed:
            raise CxlFlashError(errno.ENODEV, "the adapter is closed")

    def _client(self):
        """In a forked child: the connection to the parent's driver."""
        r = self._remote
        return r if r is not None and r.pid == os.getpid() else None

    def _check_user(self):
        """Operations the owner and its children can do: None in the owner,
        the connection in a child."""
        if os.getpid() == self._owner_pid:
            if self._driver.closed:
                raise CxlFlashError(errno.ENODEV, "the adapter is closed")
            return None
        r = self._client()
        if r is None:
            raise ForkedAdapterError(self._owner_pid)
        return r

    @property
    def driver(self) -> Driver:
        """The driver model (for tools and tests)."""
        return self._driver

    @property
    def ports(self) -> int:
        return self._driver.num_ports

    @property
    def state(self) -> str:
        """The adapter state: 'NORMAL', 'RESET' or 'FAILTERM'."""
        return self._driver.afu.state

    @property
    def lun_mode(self) -> int:
        """The internal-LUN mode (sysfs ``lun_mode``); nonzero restricts
        the ioctls to physical access."""
        return self._driver.lun_mode

    @lun_mode.setter
    def lun_mode(self, value: int) -> None:
        self._driver.lun_mode = int(value)

    # -- LUNs -------------------------------------------------------------------

    def _new_wwid(self):
        with self._lock:
            self._serial += 1
            serial = self._serial
        return host._naa6_wwid(serial ^ (id(self) & 0xFFFF) << 20)

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
        enables superpipe on that port.  Returns the 16-byte WWID.
        """
        self._check_owner()
        ports = tuple(_args.integer(p, "ports[]") for p in ports)
        if size is not None:
            size = _args.integer(size, "size")
        block_size = _args.integer(block_size, "block_size")
        if not ports:
            raise CxlFlashError(errno.EINVAL, "a LUN needs at least one port")
        if wwid is None:
            wwid = self._new_wwid()
        wwid = bytes(wwid)
        if len(wwid) != uapi.CXLFLASH_WWID_LEN:
            raise CxlFlashError(errno.EINVAL, f"a WWID has 16 bytes, got {len(wwid)}")
        opened = open_backing(backing, size=size, block_size=block_size,
                              direct=direct)
        try:
            self._driver.add_lun(opened, ports, wwid)
        except BaseException:
            if opened is not backing:
                opened.close()
            raise
        if opened is not backing:
            self._backings[wwid] = opened
        if superpipe:
            for p in ports:
                self._driver.enable_superpipe(self._driver.sdev(wwid, p))
        return wwid

    def luns(self) -> List[bytes]:
        """The WWIDs of the LUNs behind the adapter."""
        return [w for w, g in self._driver.gluns.items() if g.backing is not None]

    def open_disk(self, wwid: bytes, port: int = 0, flags: int = os.O_RDWR) -> Disk:
        """Open the SCSI disk of LUN ``wwid`` on ``port`` (the ``/dev/sdX``
        fd the DK_* ioctls are issued on)."""
        port = _args.integer(port, "port")
        flags = _args.integer(flags, "flags")
        remote = self._check_user()
        if remote is not None:
            remote.check_sdev(bytes(wwid), port)
            return Disk(self, Sdev(port, 0, bytes(wwid)), flags)
        return Disk(self, self._driver.sdev(bytes(wwid), port), flags)

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
        self._check_owner()
        info = self.provisioned.get(bytes(wwid))
        if info is None:
            raise CxlFlashError(errno.ENODEV, f"no provisioned LUN {bytes(wwid).hex()}")
        arg = uapi.ht_cxlflash_lun_provision()
        arg.hdr.subcmd = uapi.HT_CXLFLASH_LUN_PROVISION_SUBCMD_DELETE_LUN
        arg.port = info["port"]
        arg.lun_id = info["lun_id"]
        self._host_ioctl(uapi.HT_CXLFLASH_LUN_PROVISION, arg)

    @property
    def engine(self) -> "Engine":
        """The asynchronous I/O engine behind list I/O, futures and asyncio
        (made on first use): ``engine.kind`` is "io_uring" or "threads"
        (``Adapter(engine=...)``, else ``CXLFLASH_ENGINE``, else io_uring
        where the kernel allows it); ``engine_depth`` operations in flight
        at most; ``io_threads`` workers for the thread pool."""
        eng = self._engine
        if eng is None:
            if self._driver.closed and self._client() is None:
                raise self._closed_error()      # what the data path raises
            self._check_user()
            from ._core.engine import Engine
            with self._lock:
                if self._engine is None:
                    self._engine = Engine(self._engine_kind, self.engine_depth,
                                          self.io_threads)
                eng = self._engine
        return eng

    def _context_record(self, context_id):
        """The driver's record of a live or in-error context of ours (in a
        forked child: the replica of it)."""
        remote = self._client()
        if remote is not None:
            return remote.context_record(context_id)
        drv = self._driver
        pe = context_id & 0xFFFFFFFF
        ctx = drv.ctx_tbl[pe] if pe < len(drv.ctx_tbl) else None
        if ctx is None or ctx.ctxid != context_id:
            ctx = next((c for c in drv.ctx_err_recovery if c.ctxid == context_id), None)
        return ctx

    def _provision(self, port, size_4k):
        """Create a LUN for HT_CXLFLASH_LUN_PROVISION: (wwid, lun_id)."""
        wwid = self._new_wwid()
        nbytes = size_4k * uapi.CXLFLASH_BLOCK_SIZE
        if self.directory is None:
            backing, path = MemoryBacking(nbytes), None
        else:
            path = os.path.join(self.directory, f"lun-{wwid.hex()}.img")
            backing = FileBacking(path, nbytes, create=True)
        self._driver.add_lun(backing, (port,), wwid)
        self._backings[wwid] = backing
        sdev = self._driver.sdev(wwid, port)
        lun_id = sam_lun_id(sdev.scsi_lun)
        self.provisioned[wwid] = {"port": port, "size": size_4k, "lun_id": lun_id,
                                  "path": path}
        return wwid, lun_id

    def _unprovision(self, wwid):
        """Close the backing store of a provisioned LUN that the DELETE
        ioctl took off the driver (``Driver.remove_lun``: nothing uses it
        any more) and forget it."""
        p = self.provisioned.pop(wwid)
        self._invalidate_paths()
        backing = self._backings.pop(wwid, None)
        if backing is not None:
            # No handle reaches the LUN any more (Driver.remove_lun refused
            # the delete otherwise, and every RELEASE took its table's write
            # lock).  Also wait for the transfers in flight through ANY
            # table: a data path kept from before a RELEASE whose handle
            # number was re-opened on another LUN still carries this fd
            # (hazard H1 in /work/notes/api.md).
            self._fence(self._driver.contexts())
            backing.close()
            if p["path"]:
                os.unlink(p["path"])

    # -- ioctls -------------------------------------------------------------------

    def _disk_ioctl(self, disk, request, arg):
        if disk.closed:
            raise CxlFlashError(errno.EBADF, "the disk is closed")
        remote = self._check_user()
        try:
            if remote is not None:
                remote.disk_ioctl(disk, request, arg)
            else:
                superpipe.disk_ioctl(self._driver, disk.sdev, disk, request, arg,
                                     _caller())
        finally:
            self._invalidate_paths()

    def _host_ioctl(self, request, arg):
        remote = self._check_user()
        try:
            if remote is not None:
                remote.host_ioctl(request, arg)
            else:
                host.host_ioctl(self._driver, self, request, arg, _caller())
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
        if os.getpid() == self._owner_pid and self._driver.closed:
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
        if (isinstance(e, AfuError) and e.afu_rc == 0x21 and
                os.getpid() == self._owner_pid and self._driver.closed):
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

    def reset(self) -> None:
        """Reset the AFU (spec §16.1): every context goes into error --
        its data path raises AdapterResetError -- until RECOVER_AFU."""
        self._check_owner()
        try:
            self._driver.begin_reset()
            self._driver.end_reset(ok=True)
        finally:
            self._invalidate_paths()

    def begin_reset(self) -> None:
        """First half of :meth:`reset`: the state stays RESET (ioctls wait)
        until :meth:`end_reset`."""
        self._check_owner()
        try:
            self._driver.begin_reset()
        finally:
            self._invalidate_paths()

    def end_reset(self, ok: bool = True) -> None:
        """Second half of a reset: NORMAL, or FAILTERM when ``ok`` is false."""
        self._check_owner()
        try:
            self._driver.end_reset(ok)
        finally:
            self._invalidate_paths()

    def fail(self) -> None:
        """Fail the AFU for good (FAILTERM): most ioctls get ENODEV; RESIZE,
        RELEASE and DETACH still work so users can clean up."""
        self._check_owner()
        try:
            self._driver.fail()
        finally:
            self._invalidate_paths()

    def inject_fault(self, point: str, count: int = 1, err: Optional[int] = None) -> None:
        """Make the next ``count`` operations at ``point`` fail (with
        ``err``, or the point's usual errno).  Points: see
        ``cxlflash.driver.afu.FAULT_POINTS`` ('sync' for the AFU sync)."""
        self._driver.afu.faults.inject(point, count, err)

    def signal_waiters(self) -> None:
        """Interrupt every thread waiting in the driver, as a signal would
        (they fail with EINTR)."""
        self._driver.afu.signal_waiters()

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy every context and close the LUNs the adapter opened.

        The data path is fenced first: every transfer in flight finishes,
        and none starts after (they fail with AfuError 0x21, "the adapter
        is closed"); only then are the backing fds closed, so no transfer
        can reach a file that reuses their numbers."""
        if os.getpid() != self._owner_pid or self._driver.closed:
            return
        # Driver.close() sets every context's table GONE under its write
        # lock: it returns after every transfer in flight has ended --
        # asynchronous requests included -- and none starts afterwards
        # (AfuError 0x21).  Then the engine completes their futures and
        # stops.
        self._driver.close()
        if self._engine is not None:
            self._engine.close()
        self._invalidate_paths()
        self._xlate_pool = []
        for b in self._backings.values():
            b.close()
        self._backings.clear()

    @staticmethod
    def _fence(contexts):
        """Wait until no transfer is in flight through the contexts' tables
        (each table's write lock, taken and dropped)."""
        for c in contexts:
            with c.table.fence():
                pass

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
        return (f"<Adapter ports={self.ports} luns={len(self.luns())} "
                f"state={self.state}>")


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
