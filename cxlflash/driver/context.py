"""User contexts (spec §1.4, §2.7) and the adapter file descriptor (fd2).

A context (``CtxInfo``, the kernel's ctx_info) is what one ATTACH creates
for one process: an RHT (a ``_core.tables.ResourceTable``), the LUNs
attached to it, its permissions, its owner's pid, and the adapter fd
through which the process holds it.
"""
import errno
import os
import select
import socket
import threading

from typing import NamedTuple

from .._core.tables import ResourceTable
from ..errors import CxlFlashError

MAX_CONTEXT = 512

# get_context control flags (spec §4)
CTX_CTRL_CLONE = 1 << 1
CTX_CTRL_ERR = 1 << 2
CTX_CTRL_ERR_FALLBACK = 1 << 3
CTX_CTRL_NOPID = 1 << 4
CTX_CTRL_FILE = 1 << 5


class Caller(NamedTuple):
    """Who is calling: the process id and its parent's."""
    pid: int
    ppid: int


def encode_ctxid(cookie, pe):
    """``context_id``: a nonzero per-context cookie in the high 32 bits and
    the PE in the low 32 bits (spec §2.7)."""
    return ((cookie & 0xFFFFFFFF) << 32) | pe


class AdapterFile:
    """The adapter fd (fd2): a real file descriptor handed to the user.

    It is one end of a socket pair; the driver keeps the other end and
    watches it, so it learns when the user's last copy of the fd is closed
    (in this process or in any forked child) and runs the release path.
    """

    def __init__(self):
        user, driver = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.user_fd = user.detach()
        self.driver_sock = driver
        os.set_inheritable(self.user_fd, True)
        self.fileno = driver.fileno()
        self.pe = None               # the PE its backend context holds until released

    def hung_up(self):
        """True when the user's last copy of the fd is closed: asked of
        this file's own socket, not of an fd number."""
        s = self.driver_sock
        if s is None:
            return True
        p = select.poll()
        p.register(s, select.POLLRDHUP | select.POLLHUP)
        return bool(p.poll(0))

    def close_driver_side(self):
        if self.driver_sock is not None:
            self.driver_sock.close()
            self.driver_sock = None


class LunAccess:
    """One LUN attached to a context (``lun_access``)."""

    __slots__ = ("llun", "sdev", "counted")

    def __init__(self, llun, sdev, counted=True):
        self.llun = llun
        self.sdev = sdev
        self.counted = counted


class CtxInfo:
    """One user context: the kernel's ``struct ctx_info`` (superpipe.h).
    Not the API's ``cxlflash.Context``, which is a process's handle on one."""

    def __init__(self, *, cookie, pe, perms, irqs, pid, rht_size):
        self.cookie = cookie
        self.pe = pe
        self.ctxid = encode_ctxid(cookie, pe)
        self.table = ResourceTable(rht_size)
        self.rht_perms = perms
        self.rht_lun = [None] * rht_size
        self.rht_needs_ws = [False] * rht_size
        self.irqs = irqs
        self.pid = pid
        self.err_recovery_active = False
        self.initialized = False
        self.removed = False
        self.luns = []               # LunAccess, newest first
        self.kref = 1
        self.file = None             # AdapterFile
        self.mutex = threading.Lock()

    @property
    def rht_out(self):
        return self.table.rht_out

    def chunks_held(self):
        """The chunks mapped by the context's virtual handles."""
        return self.table.mapped_chunks()

    def lun_attached(self, llun):
        return any(la.llun is llun for la in self.luns)

    def __repr__(self):
        return (f"<CtxInfo id=0x{self.ctxid:016x} pe={self.pe} pid={self.pid} "
                f"handles={self.table.rht_out} luns={len(self.luns)}"
                f"{' in-error' if self.err_recovery_active else ''}>")


def lookup_failed(why=None):
    """The EINVAL of a context lookup that found nothing the caller may use."""
    return CxlFlashError(errno.EINVAL, why or "no such context for this process on "
                         "this LUN (unknown or stale context id, owned by another "
                         "process, or the LUN is not attached to it)")


class LockedContext:
    """``with drv.locked_context(...) as ctx:`` -- a context found and
    locked by ``Driver.get_context``, its mutex released when the block
    ends."""

    __slots__ = ("ctx",)

    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        return self.ctx

    def __exit__(self, *exc):
        self.ctx.mutex.release()
        return False
