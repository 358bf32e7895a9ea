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

    The driver lives in the process that created the adapter; the children
    it forks reach it over a socket (ioctls and I/O), but adapter-wide
    operations (adding LUNs, resets, fault injection) stay with the owner,
    and a grandchild has no connection at all.
    """

    def __init__(self, owner_pid: int, remote: bool = False) -> None:
        if remote:
            why = (f"only the process that created this adapter (pid {owner_pid}) "
                   "can do that; a forked child reaches its driver for ioctls and "
                   "I/O only")
        else:
            why = (f"this adapter belongs to process {owner_pid}; pid {os.getpid()} "
                   "has no connection to its driver (only the children the owner "
                   "forks directly get one): create an adapter in this process, or "
                   "fork from the owner -- a shared driver for unrelated processes "
                   "('cxlflash serve') does not exist yet")
        super().__init__(_errno.EPERM, why)

    def __reduce__(self):
        return (_rebuild_forked, (self.strerror,))


def _rebuild_forked(message):
    err = CxlFlashError(_errno.EPERM, message)
    err.__class__ = ForkedAdapterError
    return err
