"""cxlflash: the CXL Flash superpipe block translation engine in user space.

The ioctl-level contract (for code ported from C) is ``cxlflash.uapi``,
``cxlflash.Adapter``, ``Adapter.add_lun``/``open_disk``, ``cxlflash.ioctl``
and the AFU data path ``Adapter.read``/``readinto``/``write``/``translate``.
"""
from . import uapi
from .adapter import Adapter, Disk, ioctl
from .errors import (CxlFlashError, AfuError, AdapterResetError,
                     ForkedAdapterError)

__version__ = "0.1.0"

__all__ = ["uapi", "Adapter", "Disk", "ioctl", "CxlFlashError", "AfuError",
           "AdapterResetError", "ForkedAdapterError"]
