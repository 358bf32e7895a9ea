"""``Context``: one process's attachment to the adapter (the block
library's context), in idiomatic Python.

A context is created by :meth:`Disk.attach` (DK_CXLFLASH_ATTACH), holds the
adapter fd, and opens LUNs: :meth:`create_virtual` (a thin vLUN) and
:meth:`open_direct` (the whole physical LUN).  Closing it releases every
LUN, detaches every disk and closes the adapter fd -- also when a ``with``
body raises.  A context dropped without close() is released as a dropped
file object is: its adapter fd is closed (with a ``ResourceWarning``), and
the driver's release of that fd detaches it and frees its PE, handles and
chunks.
"""
from __future__ import annotations

import errno
import os
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, List, Optional, Union

from . import uapi, _args
from .errors import CxlFlashError, ForkedAdapterError

__all__ = ["Context"]

if TYPE_CHECKING:
    from typing_extensions import Self
    from .adapter import Disk
    from .lun import DirectLun, VirtualLun

_ACCESS = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}
_PERMS = {os.O_RDONLY: 1, os.O_WRONLY: 2, os.O_RDWR: 3}


def _check_mode(mode):
    mode = _args.integer(mode, "mode")
    if mode not in _ACCESS:
        raise CxlFlashError(errno.EINVAL, f"access mode must be os.O_RDONLY, "
                            f"os.O_WRONLY or os.O_RDWR, got {mode!r}")
    return mode


class Context:
    """An attached context.  Do not create directly: use
    :meth:`Disk.attach`.

    Attributes: ``context_id``, ``adap_fd`` (the adapter fd, closed with
    the context), ``mode`` (the access mode), ``block_size`` (bytes of a
    native block), ``max_xfer`` (blocks per transfer), ``disks``.
    """

    def __init__(self, disk: "Disk", mode: int = os.O_RDWR, *, interrupts: int = 0) -> None:
        self.adapter = disk.adapter
        _args.integer(interrupts, "interrupts")     # every type before any range
        self.mode = mode = _check_mode(mode)
        interrupts = _args.nonneg(interrupts, "interrupts", 4,
                                  "a context has at most 4 interrupts")
        arg = uapi.dk_cxlflash_attach()
        arg.hdr.flags = mode
        arg.num_interrupts = interrupts
        self.adapter._disk_ioctl(disk, uapi.DK_CXLFLASH_ATTACH, arg)
        # What a dropped Context gives back (its finaliser must not refer
        # to the Context itself): the adapter fd, whose last close releases
        # the context -- its PE, handles and chunks -- as the kernel does.
        self._held = _Held(arg.adap_fd, arg.context_id, self.adapter)
        self._finalizer = weakref.finalize(self, _release_dropped, self._held)
        self._finalizer.atexit = False
        self.block_size = arg.block_size
        self.max_xfer = arg.max_xfer
        self.last_lba = arg.last_lba
        self.return_flags = arg.hdr.return_flags
        self.disks: List[Disk] = [disk]
        self.luns: List[Union[VirtualLun, DirectLun]] = []                 # open VirtualLun / DirectLun objects
        self.closed = False
        self.resets = 0
        self._lock = threading.RLock()

    # The adapter fd and the context id live in _held (shared with the
    # finaliser): recover() and clone_after_fork() change them.

    @property
    def context_id(self) -> int:
        return self._held.context_id

    @context_id.setter
    def context_id(self, value: int) -> None:
        self._held.context_id = value

    @property
    def adap_fd(self) -> int:
        return self._held.adap_fd

    @adap_fd.setter
    def adap_fd(self, value: int) -> None:
        self._held.set_fd(value)

    # -- helpers ---------------------------------------------------------------

    def _check_open(self):
        if self.closed:
            raise ValueError("the context is closed (detached)")

    def _ioctl(self, disk, request, arg):
        self._check_open()
        self.adapter._disk_ioctl(disk, request, arg)
        return arg

    def _disk_for(self, disk):
        if disk is None:
            return self.disks[0]
        if disk not in self.disks:
            raise CxlFlashError(errno.EINVAL, "that disk is not attached to this "
                                "context: use context.attach_disk(disk) first")
        return disk

    # -- LUNs -----------------------------------------------------------------------

    def attach_disk(self, disk: "Disk") -> "Disk":
        """Attach another LUN's disk to this context (ATTACH with
        REUSE_CONTEXT).  Returns ``disk``."""
        arg = uapi.dk_cxlflash_attach()
        arg.hdr.flags = uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT | self.mode
        arg.context_id = self.context_id
        self._ioctl(disk, uapi.DK_CXLFLASH_ATTACH, arg)
        self.disks.append(disk)
        return disk

    def create_virtual(self, size: int = 0, *, disk: Optional["Disk"] = None,
                       scrub: bool = True, best_effort: bool = False) -> "VirtualLun":
        """Open a thin virtual LUN of ``size`` blocks (of ``block_size``
        bytes) on ``disk`` (the first attached by default).

        ``scrub`` (default True): chunks the vLUN gives back are zeroed
        (NEED_WRITE_SAME) before another vLUN -- of any context or process
        -- can get them.  ``scrub=False`` skips that (the kernel's default
        at the ioctl level): the next owner of a freed chunk may read this
        vLUN's data.
        Raises ENOSPC when the LUN cannot hold ``size`` blocks (unless
        ``best_effort``), ENOMEM when the LUN is smaller than one chunk.
        """
        from .lun import VirtualLun
        return VirtualLun(self, self._disk_for(disk), size, scrub=scrub,
                          best_effort=best_effort)

    def open_direct(self, *, disk: Optional["Disk"] = None) -> "DirectLun":
        """Open the whole physical LUN of ``disk`` for direct access."""
        from .lun import DirectLun
        return DirectLun(self, self._disk_for(disk))

    # -- recovery and fork -------------------------------------------------------------

    def recover(self) -> bool:
        """DK_CXLFLASH_RECOVER_AFU after an AFU reset: the context gets a new
        id and adapter fd (the old fd is closed); handles and data are kept.
        Returns True when a reset was recovered, False when the context was
        healthy."""
        with self._lock:
            arg = uapi.dk_cxlflash_recover_afu()
            arg.context_id = self.context_id
            self._ioctl(self.disks[0], uapi.DK_CXLFLASH_RECOVER_AFU, arg)
            if not arg.hdr.return_flags & uapi.DK_CXLFLASH_RECOVER_AFU_CONTEXT_RESET:
                return False
            old_fd, old_ident = self.adap_fd, self._held.ident
            self.context_id = arg.context_id
            self.adap_fd = arg.adap_fd
            self.resets += 1
            if arg.hdr.return_flags & uapi.DK_CXLFLASH_APP_CLOSE_ADAP_FD:
                _close_quietly(old_fd, old_ident)
            for lun in self.luns:
                lun._rebind()
                lun._stats_extra["num_reset_contexts"] += 1
            return True

    def clone_after_fork(self, mode: Optional[int] = None) -> None:
        """In a forked child: attach a context of the child's own and clone
        the parent's virtual LUNs into it (ATTACH + VLUN_CLONE), keeping
        every handle number.  ``mode`` may keep or narrow the parent's
        access, never widen it (EINVAL).  The data is shared with the
        parent, not copied.  Direct LUNs are re-opened.
        """
        mode = self.mode if mode is None else _check_mode(mode)
        if _PERMS[mode] & ~_PERMS[self.mode]:
            raise CxlFlashError(errno.EINVAL, f"a child may not widen its parent's "
                                f"access ({_ACCESS[self.mode]} -> {_ACCESS[mode]})")
        with self._lock:
            self._check_open()
            parent_id, parent_fd = self.context_id, self.adap_fd
            parent_ident = self._held.ident
            first = self.disks[0]
            arg = uapi.dk_cxlflash_attach()
            arg.hdr.flags = mode
            self.adapter._disk_ioctl(first, uapi.DK_CXLFLASH_ATTACH, arg)
            child_id, child_fd = arg.context_id, arg.adap_fd
            try:
                for disk in self.disks[1:]:
                    reuse = uapi.dk_cxlflash_attach()
                    reuse.hdr.flags = uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT | mode
                    reuse.context_id = child_id
                    self.adapter._disk_ioctl(disk, uapi.DK_CXLFLASH_ATTACH, reuse)
                clone = uapi.dk_cxlflash_clone()
                clone.hdr.flags = mode
                clone.context_id_src = parent_id
                clone.context_id_dst = child_id
                clone.adap_fd_src = parent_fd
                virtual = [l for l in self.luns if l.virtual]
                handles = {}
                if virtual:
                    # Issued on a LUN in virtual mode; it clones every
                    # handle (direct ones too) under the same numbers.
                    self.adapter._disk_ioctl(virtual[0].disk,
                                             uapi.DK_CXLFLASH_VLUN_CLONE, clone)
                else:
                    # No vLUN: the direct LUNs are simply opened again.
                    for lun in self.luns:
                        udirect = uapi.dk_cxlflash_udirect()
                        udirect.context_id = child_id
                        self.adapter._disk_ioctl(lun.disk, uapi.DK_CXLFLASH_USER_DIRECT,
                                                 udirect)
                        handles[lun] = udirect.rsrc_handle
            except BaseException:
                for disk in self.disks:
                    d = uapi.dk_cxlflash_detach()
                    d.context_id = child_id
                    try:
                        self.adapter._disk_ioctl(disk, uapi.DK_CXLFLASH_DETACH, d)
                    except CxlFlashError:
                        pass
                _close_quietly(child_fd)
                raise
            self.context_id, self.adap_fd, self.mode = child_id, child_fd, mode
            self._held.pid = os.getpid()         # the child's context now
            self.return_flags = arg.hdr.return_flags
            _close_quietly(parent_fd, parent_ident)   # the child's copy of it
            for lun in self.luns:
                lun.handle = handles.get(lun, lun.handle)
                lun._after_fork()

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Release every LUN, detach every disk and close the adapter fd.
        Safe to call twice; errors of individual steps do not stop the
        rest (the first one is raised at the end)."""
        with self._lock:
            if self.closed:
                return
            first_error = None
            for lun in list(reversed(self.luns)):
                try:
                    lun.close()
                except Exception as e:            # keep tearing down
                    if not lun.disk.closed:       # else closing the fd releases it
                        first_error = first_error or e
            for disk in reversed(self.disks):
                if disk.closed or self.adapter._gone():
                    continue      # the fd's release (or the adapter's) detaches
                arg = uapi.dk_cxlflash_detach()
                arg.context_id = self.context_id
                try:
                    self.adapter._disk_ioctl(disk, uapi.DK_CXLFLASH_DETACH, arg)
                except ForkedAdapterError:
                    pass
                except CxlFlashError as e:
                    if e.errno != errno.EINVAL:   # EINVAL: already gone
                        first_error = first_error or e
            self._held.retire()
            self._held.close_fd()
            self._held.closed = True
            self._finalizer.detach()
            self.closed = True
            for lun in list(self.luns):     # a failed release: DETACH took it
                lun._mark_closed()
            if first_error is not None:
                raise first_error

    detach = close

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self):
        state = ("closed" if getattr(self, "closed", True)
                 else f"id=0x{self.context_id:016x}")
        return f"<Context {state} mode={_ACCESS.get(self.mode)} luns={len(self.luns)}>"


class _Held:
    """A context's adapter fd and id, shared with its finaliser."""

    __slots__ = ("adap_fd", "ident", "context_id", "pid", "closed", "adapter")

    def __init__(self, adap_fd, context_id, adapter):
        self.set_fd(adap_fd)
        self.context_id = context_id
        self.pid = os.getpid()
        self.closed = False
        self.adapter = adapter

    def retire(self):
        """In a forked child, before the adapter fd is closed: stop the
        replica's data path (transfers under way end first), so none can
        use the chunks the owner frees when it sees the close."""
        self.adapter._retire_context(self.context_id)

    def set_fd(self, fd):
        self.adap_fd = fd
        self.ident = _fd_identity(fd)

    def close_fd(self):
        _close_quietly(self.adap_fd, self.ident)


def _release_dropped(held):
    """The finaliser of a Context dropped without close(): close its
    adapter fd, as a dropped file object closes its fd.  The driver's
    release of that fd detaches the context and frees its PE, handles and
    chunks (at the adapter's next ioctl).  Only in the process the context
    belongs to: a forked child's copy of a parent's Context does nothing."""
    if held.closed or os.getpid() != held.pid:
        return
    held.closed = True
    try:
        held.retire()
    except Exception:          # interpreter shutdown: the fd still goes
        pass
    held.close_fd()
    try:
        warnings.warn(f"unclosed cxlflash Context 0x{held.context_id:016x}: its "
                      "adapter fd was closed, releasing the context (use close() "
                      "or a with block)", ResourceWarning, stacklevel=2)
    except Exception:          # interpreter shutdown
        pass


def _fd_identity(fd):
    """(st_dev, st_ino) of an open fd, or None."""
    try:
        st = os.fstat(fd)
    except (OSError, TypeError, ValueError, OverflowError):
        return None
    return st.st_dev, st.st_ino


def _close_quietly(fd, ident=None):
    """Close the adapter fd -- only if the number still names the file it
    named when we got it: if the user closed it already and the number was
    reused (by a backing store, say), closing it would break that file."""
    if fd is None or not 0 <= fd < (1 << 31):
        return
    if ident is not None and _fd_identity(fd) != ident:
        return
    try:
        os.close(fd)
    except OSError:
        pass
