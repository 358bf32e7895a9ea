"""cxlflash: the CXL Flash superpipe block translation engine in user space.

The ioctl-level contract (for code ported from C) is ``cxlflash.uapi``,
``cxlflash.Adapter``, ``Adapter.add_lun``/``open_disk``, ``cxlflash.ioctl``
and the AFU data path ``Adapter.read``/``readinto``/``write``/``translate``.
``cxlflash.connect()`` returns an adapter with the same interface whose
driver runs in a ``cxlflash serve`` daemon, shared by every process.
"""
from . import uapi
from .adapter import Adapter, Disk, ioctl, connect, default_socket
from .backing import aligned_buffer
from .context import Context
from .lun import VirtualLun, DirectLun, ListResult, LIST_READ, LIST_WRITE, LIST_UNMAP
from .errors import (CxlFlashError, AfuError, AdapterResetError,
                     ForkedAdapterError)

__version__ = "0.1.0"

__all__ = ["uapi", "Adapter", "Disk", "ioctl", "connect", "default_socket", "Context", "VirtualLun",
           "DirectLun", "ListResult", "LIST_READ", "LIST_WRITE", "LIST_UNMAP",
           "aligned_buffer", "CxlFlashError", "AfuError", "AdapterResetError",
           "ForkedAdapterError"]
