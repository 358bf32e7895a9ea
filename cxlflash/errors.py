"""The exceptions of the package.

Every error is an ``OSError`` whose ``errno`` is what the kernel driver
(or the AFU) would have given, with a message that says what to do.
"""
import errno as _errno
import os

from ._core.errors import AdapterResetError, AfuError, CxlFlashError

__all__ = ["CxlFlashError", "AfuError", "AdapterResetError",
           "ForkedAdapterError"]


class ForkedAdapterError(CxlFlashError):
    """An adapter was used from a process that cannot reach its driver.

    An embedded adapter's driver lives in the process that created it; the
    children (and their children) it forks reach it over a connection made
    at ``fork()`` for ioctls and I/O, but adapter-wide operations (adding
    LUNs, resets, fault injection) stay with the owner.  A process that got
    the adapter without such a connection cannot reach the driver at all.
    """

    def __init__(self, owner_pid: int, remote: bool = False) -> None:
        if remote:
            why = (f"only the process that created this adapter (pid {owner_pid}) "
                   "can do that; a forked child reaches its driver for ioctls and "
                   "I/O only (for a driver every process administers, run "
                   "'cxlflash serve' and cxlflash.connect())")
        else:
            why = (f"this adapter's driver is in process {owner_pid}; pid "
                   f"{os.getpid()} has no connection to it (none was made when "
                   "this process was forked, or the driver was closed then): "
                   "create an adapter in this process, or share one driver "
                   "between processes with 'cxlflash serve' and cxlflash.connect()")
        super().__init__(_errno.EPERM, why)

    def __reduce__(self):
        return (_rebuild_forked, (self.strerror,))


def _rebuild_forked(message):
    err = CxlFlashError(_errno.EPERM, message)
    err.__class__ = ForkedAdapterError
    return err
