"""The core's errors: the AFU's refusals of user I/O (SISLite ``afu_rc``
codes), the AFU reset, and ``CxlFlashError`` for everything else (an
ioctl's errno, an argument out of range).

The failure of one I/O request has ONE encoding, the status code list I/O
reports (``DataPath.listio``, the engine's lists): ``-errno`` or one of the
``IO_*`` codes below (the data path's C code defines the same numbers in
datapath.pxd and maps its internal transfer results to them with
``list_status``).  :func:`io_error` turns a status into its exception, for
the synchronous path (datapath's ``raise_xfer_error``) and
``ListResult.error`` alike: the same failure raises the same exception type
with the same errno both ways.
"""
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

# A request's failure (its list I/O status; tests/test_errors_mapping.py
# checks these equal datapath.pxd's).
IO_AFU_ERROR = -1000    # the AFU refused it; ``afu_rc`` says why: AfuError
IO_IN_ERROR = -1001     # AFU reset, the context is in error: AdapterResetError
IO_GONE = -1002         # the context is gone or another process's: AfuError(0x21)
IO_BEYOND_SIZE = -1003  # beyond the LUN's logical size: CxlFlashError(EINVAL)

# The afu_rc the core reports for a direct LBA beyond the LUN: not an AFU
# code (SISLite's fit in a byte) but the device's refusal, CHECK CONDITION /
# ILLEGAL REQUEST (spec §19.3); tables.pxd's SCSI_LBA_OUT_OF_RANGE.
SCSI_LBA_OUT_OF_RANGE = 0x100

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
    if rc == SCSI_LBA_OUT_OF_RANGE:
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


def io_error(status: int, *, afu_rc: int = 0, handle: Optional[int] = None,
             lba: Optional[int] = None, nblocks: Optional[int] = None,
             size: Optional[int] = None, extent: Optional[int] = None,
             write: bool = False, index: Optional[int] = None,
             message: Optional[str] = None) -> OSError:
    """The exception of a failed request, from its status (< 0: an ``IO_*``
    code or ``-errno``).  ``afu_rc``: the AFU's code (IO_AFU_ERROR);
    ``handle``, ``lba``, ``nblocks``, ``size`` (the logical size),
    ``extent`` (a vLUN's mapped blocks), ``write``, ``index`` (the request's
    position in a list): what the message names; ``message``: a more
    specific message (the synchronous path knows more of some failures)."""
    where = "" if index is None else f" (request element {index})"
    if status == IO_AFU_ERROR:
        return afu_error(afu_rc, handle, lba, index=index, extent=extent, write=write)
    if status == IO_IN_ERROR:
        return AdapterResetError()
    if status == IO_GONE:
        return AfuError(0x21, "AFU rc 0x21 CAP_VIOLATION: " + (
            message or "the context no longer exists (detached or closed), or it "
            "belongs to another process (a forked child must attach its own "
            "context and clone)") + where, index=index)
    if status == IO_BEYOND_SIZE:
        first = lba or 0
        what = f"blocks {first}..{first + nblocks - 1}" if nblocks else f"LBA {first}"
        return CxlFlashError(errno.EINVAL, message or (
            f"{what} are beyond the logical size of {size} blocks (LBAs "
            f"0..{size - 1}): grow the LUN first" if size else
            f"{what} are beyond the logical size of 0 blocks: set a size first") + where)
    if status == -errno.ESHUTDOWN and message is None:
        message = ("the request did not run: the adapter's I/O engine was closed "
                   "(the adapter was closed during the list)" + where)
    return CxlFlashError(-status, message or os.strerror(-status) + where)


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
