"""The driver model: LUN records, contexts, the AFU state machine and one
handler per ioctl, in plain Python over ``cxlflash._core``.

``driver``     Driver: context lookup, teardown, reset; the shared state
``superpipe``  ATTACH, DETACH, USER_DIRECT, RELEASE, VERIFY, RECOVER_AFU,
               MANAGE_LUN, and the DK_* dispatch pipeline
``vlun``       USER_VIRTUAL, VLUN_RESIZE, VLUN_CLONE
``host``       HT_CXLFLASH_LUN_PROVISION, HT_CXLFLASH_AFU_DEBUG
``lunmgt``     GlobalLun, LocalLun, Sdev, the AFU LUN table (the kernel's lunmgt.c)
``context``    CtxInfo (the kernel's ctx_info), the adapter fd
``afu``        AFU state, syncs, fault injection, the ioctl rwsem
"""
from .driver import Driver
from .context import Caller

__all__ = ["Driver", "Caller"]
