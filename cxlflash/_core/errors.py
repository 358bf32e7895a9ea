"""The core's errors: the AFU's refusals of user I/O (SISLite ``afu_rc``
codes), the AFU reset, and ``CxlFlashError`` for everything else (an
ioctl's errno, an argument out of range)."""
import errno
import os
from typing import Optional

AFU_RC_NAMES = {
    0x01: "RHT_INVALID",
    0x02: "RHT_UNALIGNED",
    0x03: "RHT_OUT_OF_BOUNDS",
    0x04: "RHT_DMA_ERR",
    0x05: "RHT_RW_PERM",
    0x12: "LXT_UNALIGNED",
    0x13: "LXT_OUT_OF_BOUNDS",
    0x14: "LXT_DMA_ERR",
    0x15: "LXT_RW_PERM",
    0x1A: "NOT_XLATE_HOST",
    0x20: "NO_CHANNELS",
    0x21: "CAP_VIOLATION",
    0x30: "OUT_OF_DATA_BUFS",
    0x31: "DATA_DMA_ERR",
}

# SCSI status and sense of a direct LBA beyond the LUN (spec §19.3).
SCSI_CHECK_CONDITION = 0x02
SENSE_ILLEGAL_REQUEST = 0x05
ASC_LBA_OUT_OF_RANGE = 0x21


class AfuError(OSError):
    """The AFU refused a command (``errno`` EIO).

    ``afu_rc`` is the SISLite response code (0 when the device, not the AFU,
    refused it: then ``scsi_rc`` and ``sense_key``/``asc`` say why).
    ``index`` is the position of the first refused LBA in a batch, if any.
    """

    def __init__(self, afu_rc: int, message: str, *, index: Optional[int] = None,
                 scsi_rc: int = 0, sense_key: int = 0, asc: int = 0) -> None:
        super().__init__(errno.EIO, message)
        self.afu_rc: int = afu_rc
        self.index: Optional[int] = index
        self.scsi_rc: int = scsi_rc
        self.sense_key: int = sense_key
        self.asc: int = asc

    def __reduce__(self):
        return (_rebuild_afu_error,
                (self.afu_rc, self.strerror, self.index, self.scsi_rc,
                 self.sense_key, self.asc))


def _rebuild_afu_error(afu_rc, message, index, scsi_rc, sense_key, asc):
    return AfuError(afu_rc, message, index=index, scsi_rc=scsi_rc,
                    sense_key=sense_key, asc=asc)


def afu_error(rc, handle, lba=None, *, index=None, extent=None, write=False):
    """Build the AfuError for a refused command (``rc`` from the core)."""
    op = "write" if write else "read"
    where = "" if index is None else f" (request element {index})"
    if rc == 0x100:
        return AfuError(
            0, f"direct {op} at LBA {lba} is beyond the LUN (last LBA "
            f"{extent - 1 if extent is not None else '?'}): CHECK CONDITION, "
            f"ILLEGAL REQUEST, LBA out of range{where}",
            index=index, scsi_rc=SCSI_CHECK_CONDITION,
            sense_key=SENSE_ILLEGAL_REQUEST, asc=ASC_LBA_OUT_OF_RANGE)
    name = AFU_RC_NAMES.get(rc, "UNKNOWN")
    if rc == 0x01:
        why = f"resource handle {handle} is not open"
    elif rc == 0x03:
        why = f"resource handle {handle} is out of bounds for this context"
    elif rc in (0x05, 0x15):
        why = f"resource handle {handle} has no {op} permission"
    elif rc == 0x13:
        why = (f"LBA {lba} is beyond the virtual LUN of handle {handle}"
               + (f" ({extent} blocks)" if extent is not None else ""))
    elif rc == 0x21:
        why = "the context does not belong to this process"
    else:
        why = "the AFU refused the command"
    return AfuError(rc, f"AFU rc 0x{rc:02x} {name}: {why}{where}", index=index)


class AdapterResetError(OSError):
    """The context is in error after an AFU reset (``errno`` EIO).

    The hardware shows this as an MMIO window that reads all-ones.  The
    context's handles and data are intact: recover it with
    ``DK_CXLFLASH_RECOVER_AFU`` (``Context.recover()``), then retry.
    """

    def __init__(self, message: str = "the AFU was reset and this context is in error: "
                 "recover it (DK_CXLFLASH_RECOVER_AFU) and retry") -> None:
        super().__init__(errno.EIO, message)

    def __reduce__(self):
        return (AdapterResetError, (self.strerror,))


class CxlFlashError(OSError):
    """An ioctl failed, or an argument is out of range: ``errno`` is the
    kernel's errno for that failure (EINVAL for an argument)."""

    def __init__(self, err: int, message: Optional[str] = None) -> None:
        super().__init__(err, message or os.strerror(err))

    def __reduce__(self):
        return (CxlFlashError, (self.errno, self.strerror))
