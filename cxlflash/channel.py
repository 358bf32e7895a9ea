"""How an adapter reaches its driver: one interface, three ways in.

``LocalChannel``   the driver lives in this process (an embedded
                   ``Adapter``, or the daemon's own);
``ForkedChannel``  a forked child of an embedded adapter's process, over a
                   socket pair to the parent (``cxlflash.server.client``);
``DaemonChannel``  a client of ``cxlflash serve``, over its Unix socket
                   (``cxlflash.server.client``).

The API layer (``Adapter``, ``Context``, the LUN objects) only calls the
methods below, so it never knows which one it has:

``disk_ioctl(sdev, flags, request, arg)``, ``host_ioctl(request, arg)``
    the ioctls; ``arg`` is updated in place on success.
``open_disk(wwid, port)``  the disk (``Sdev``) of a LUN on a port, or ENODEV.
``luns()``                 the WWIDs of the LUNs.
``context_record(context_id)``
    what the data path needs of one of this process's contexts (its
    table, its handles' LUNs and backing stores, its pid and error
    state), or None.
``retire_context(context_id)``
    before this process closes a context's adapter fd: its data path stops.
``add_lun``, ``delete_lun``, ``create_lun``, ``begin_reset``,
``end_reset``, ``fail``, ``inject_fault``, ``signal_waiters``,
``set_lun_mode``, ``info()``, ``status()``   the administrator's operations.
``closed``                 the driver is closed or gone (ENODEV from now on).

The driver runs every request as ``caller`` (``driver.context.Caller``): in
this process, the process itself; in the daemon, the peer the kernel
names.
"""
import errno
import os

from . import uapi
from .backing import open_backing
from .driver import superpipe, host
from .driver.driver import Driver
from .driver.context import Caller
from .errors import CxlFlashError

__all__ = ["LocalChannel"]


def this_process():
    return Caller(os.getpid(), os.getppid())


class _DiskView:
    """A disk as the driver's dispatch sees it: the flags it was opened with."""

    __slots__ = ("flags",)

    def __init__(self, flags):
        self.flags = flags


class LocalChannel:
    """The driver in this process."""

    forked = False

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    @property
    def closed(self):
        return self.driver.closed

    def _check_open(self):
        if self.driver.closed:
            raise CxlFlashError(errno.ENODEV, "the adapter is closed")

    # -- ioctls ----------------------------------------------------------------------

    def disk_ioctl(self, sdev, flags, request, arg, caller=None):
        superpipe.disk_ioctl(self.driver, sdev, _DiskView(flags), request, arg,
                             caller or this_process())

    def host_ioctl(self, request, arg, caller=None, memory=None):
        host.host_ioctl(self.driver, request, arg, caller or this_process(), memory)

    def open_disk(self, wwid, port):
        self._check_open()
        return self.driver.sdev(bytes(wwid), port)

    def luns(self):
        return [w for w, g in self.driver.gluns.items() if g.backing is not None]

    # -- the data path ------------------------------------------------------------------

    def context_record(self, context_id):
        """The driver's record of a live or in-error context."""
        return self.driver.find_context(context_id)

    def retire_context(self, context_id):
        """Nothing to do: the driver's release path fences the table."""

    # -- the administrator's operations ---------------------------------------------------

    def add_lun(self, backing, ports, wwid, superpipe_on, size, block_size, direct):
        self._check_open()
        if not ports:
            raise CxlFlashError(errno.EINVAL, "a LUN needs at least one port")
        drv = self.driver
        if wwid is None:
            wwid = drv.new_wwid()
        if len(wwid) != uapi.CXLFLASH_WWID_LEN:
            raise CxlFlashError(errno.EINVAL, f"a WWID has 16 bytes, got {len(wwid)}")
        opened = open_backing(backing, size=size, block_size=block_size, direct=direct)
        try:
            drv.add_lun(opened, ports, wwid, owned=opened is not backing)
        except BaseException:
            if opened is not backing:
                opened.close()
            raise
        if superpipe_on:
            for p in ports:
                drv.enable_superpipe(drv.sdev(wwid, p))
        return wwid

    def create_lun(self, size, port, superpipe_on, caller=None):
        """HT_CXLFLASH_LUN_PROVISION create, then superpipe on: the WWID."""
        arg = uapi.ht_cxlflash_lun_provision()
        arg.hdr.subcmd = uapi.HT_CXLFLASH_LUN_PROVISION_SUBCMD_CREATE_LUN
        arg.port = port
        arg.size = size // uapi.CXLFLASH_BLOCK_SIZE
        self.host_ioctl(uapi.HT_CXLFLASH_LUN_PROVISION, arg, caller)
        wwid = bytes(arg.wwid)
        if superpipe_on:
            manage = uapi.dk_cxlflash_manage_lun()
            manage.hdr.flags = uapi.DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE
            manage.wwid[:] = wwid
            self.disk_ioctl(self.open_disk(wwid, port), os.O_RDWR,
                            uapi.DK_CXLFLASH_MANAGE_LUN, manage, caller)
        return wwid

    def delete_lun(self, wwid, caller=None):
        self._check_open()
        info = self.driver.provisioned.get(bytes(wwid))
        if info is None:
            raise CxlFlashError(errno.ENODEV, f"no provisioned LUN {bytes(wwid).hex()}")
        arg = uapi.ht_cxlflash_lun_provision()
        arg.hdr.subcmd = uapi.HT_CXLFLASH_LUN_PROVISION_SUBCMD_DELETE_LUN
        arg.port = info["port"]
        arg.lun_id = info["lun_id"]
        self.host_ioctl(uapi.HT_CXLFLASH_LUN_PROVISION, arg, caller)

    def begin_reset(self):
        self._check_open()
        self.driver.begin_reset()

    def end_reset(self, ok=True):
        self._check_open()
        self.driver.end_reset(ok)

    def fail(self):
        self._check_open()
        self.driver.fail()

    def inject_fault(self, point, count=1, err=None):
        self.driver.afu.faults.inject(point, count, err)

    def signal_waiters(self):
        self.driver.afu.signal_waiters()

    def set_lun_mode(self, value):
        self.driver.lun_mode = int(value)

    def info(self):
        """(ports, state, lun_mode)."""
        d = self.driver
        return d.num_ports, d.afu.state, d.lun_mode

    def status(self):
        return self.driver.status()

    def close(self):
        self.driver.close()
