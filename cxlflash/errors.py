"""The exceptions of the package.

Every error is an ``OSError`` whose ``errno`` is what the kernel driver
(or the AFU) would have given, with a message that says what to do.
"""
import errno as _errno
import os

from ._core.errors import AdapterResetError, AfuError

__all__ = ["CxlFlashError", "AfuError", "AdapterResetError",
           "ForkedAdapterError"]


class CxlFlashError(OSError):
    """An ioctl failed: ``errno`` is the kernel's errno for that failure."""

    def __init__(self, err, message=None):
        super().__init__(err, message or os.strerror(err))

    def __reduce__(self):
        return (CxlFlashError, (self.errno, self.strerror))


class ForkedAdapterError(CxlFlashError):
    """An embedded adapter was used from a forked child process.

    The embedded driver lives in the process that created the adapter; a
    child has only a frozen copy of it.  Use the shared driver
    (``cxlflash serve``) for several processes.
    """

    def __init__(self, owner_pid):
        super().__init__(
            _errno.EPERM,
            f"this adapter belongs to process {owner_pid} (the parent of this "
            f"forked child, pid {os.getpid()}); a child process cannot use its "
            "parent's embedded adapter: run the shared driver ('cxlflash "
            "serve') and connect to it from every process")

    def __reduce__(self):
        return (_rebuild_forked, (self.strerror,))


def _rebuild_forked(message):
    err = CxlFlashError(_errno.EPERM, message)
    err.__class__ = ForkedAdapterError
    return err
