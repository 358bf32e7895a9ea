"""The cxlflash kernel ABI: ``include/uapi/scsi/cxlflash_ioctl.h`` in Python.

This module mirrors the Linux user-space header of the IBM CXL Flash
driver, name for name and byte for byte, so that C code written against the
kernel header can be ported line by line:

* every ``DK_CXLFLASH_*`` / ``HT_CXLFLASH_*`` constant, with the kernel's
  name and value;
* ``ctypes.Structure`` classes named, laid out and sized exactly like the C
  structures (host byte order, natural alignment), e.g.
  ``ctypes.sizeof(dk_cxlflash_attach) == 144``;
* the ioctl request numbers, encoded as Linux encodes
  ``_IOWR(CXL_MAGIC, nr, struct ...)``, e.g.
  ``DK_CXLFLASH_ATTACH == 0xC090CA80``;
* a few driver-internal constants that callers need to interpret results
  (block sizes, chunk geometry, RHT permission bits, SISLite AFU response
  codes).

Units. Two block units appear in the ABI and are easy to confuse:

* a **4K block** is a fixed 4096-byte unit (``CXLFLASH_BLOCK_SIZE``). The
  virtual-LUN ioctls take sizes in 4K blocks (``dk_cxlflash_uvirtual.lun_size``,
  ``dk_cxlflash_resize.req_size``, ``ht_cxlflash_lun_provision.size``) and
  return a vLUN's ``last_lba`` in 4K blocks;
* a **native block** is the LUN's logical block (``block_size`` returned by
  ATTACH, commonly 4096 or 512 bytes). ATTACH, USER_DIRECT and VERIFY return
  the physical LUN's ``last_lba`` in native blocks, and the AFU data path
  addresses LBAs in native blocks. A chunk (allocation unit) is
  ``MC_CHUNK_SIZE`` (65536) native blocks.

Pure standard library: this module imports nothing from the rest of the
package.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

__all__ = [  # extended below with every public upper-case name and struct
    "dk_cxlflash_hdr",
    "dk_cxlflash_attach",
    "dk_cxlflash_detach",
    "dk_cxlflash_udirect",
    "dk_cxlflash_uvirtual",
    "dk_cxlflash_release",
    "dk_cxlflash_resize",
    "dk_cxlflash_clone",
    "dk_cxlflash_verify",
    "dk_cxlflash_recover_afu",
    "dk_cxlflash_manage_lun",
    "cxlflash_ioctls",
    "ht_cxlflash_hdr",
    "ht_cxlflash_lun_provision",
    "ht_cxlflash_afu_debug",
    "cxlflash_ht_ioctls",
    "DK_IOCTLS",
    "HT_IOCTLS",
    "IOCTL_NAMES",
    "max_rht_per_context",
]

# ---------------------------------------------------------------------------
# Linux ioctl request-number encoding (asm-generic/ioctl.h)
# ---------------------------------------------------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRMASK = (1 << _IOC_NRBITS) - 1
_IOC_TYPEMASK = (1 << _IOC_TYPEBITS) - 1
_IOC_SIZEMASK = (1 << _IOC_SIZEBITS) - 1
_IOC_DIRMASK = (1 << _IOC_DIRBITS) - 1

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS  # 8
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS  # 16
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS  # 30

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(dir: int, type: int, nr: int, size: int) -> int:  # noqa: A002
    """Encode an ioctl request number like the kernel's ``_IOC`` macro."""
    if not 0 <= size <= _IOC_SIZEMASK:
        raise ValueError(f"ioctl argument size {size} does not fit in 14 bits")
    return (
        ((dir & _IOC_DIRMASK) << _IOC_DIRSHIFT)
        | ((type & _IOC_TYPEMASK) << _IOC_TYPESHIFT)
        | ((nr & _IOC_NRMASK) << _IOC_NRSHIFT)
        | ((size & _IOC_SIZEMASK) << _IOC_SIZESHIFT)
    )


def _IOC_TYPECHECK(t) -> int:
    """``sizeof`` of a ctypes type (or a plain int size, passed through)."""
    return t if isinstance(t, int) else ctypes.sizeof(t)


def _IO(type: int, nr: int) -> int:  # noqa: A002
    return _IOC(_IOC_NONE, type, nr, 0)


def _IOR(type: int, nr: int, t) -> int:  # noqa: A002
    return _IOC(_IOC_READ, type, nr, _IOC_TYPECHECK(t))


def _IOW(type: int, nr: int, t) -> int:  # noqa: A002
    return _IOC(_IOC_WRITE, type, nr, _IOC_TYPECHECK(t))


def _IOWR(type: int, nr: int, t) -> int:  # noqa: A002
    """``_IOWR(type, nr, struct)``: direction READ|WRITE (3)."""
    return _IOC(_IOC_READ | _IOC_WRITE, type, nr, _IOC_TYPECHECK(t))


def _IOC_DIR(request: int) -> int:
    return (request >> _IOC_DIRSHIFT) & _IOC_DIRMASK


def _IOC_TYPE(request: int) -> int:
    return (request >> _IOC_TYPESHIFT) & _IOC_TYPEMASK


def _IOC_NR(request: int) -> int:
    return (request >> _IOC_NRSHIFT) & _IOC_NRMASK


def _IOC_SIZE(request: int) -> int:
    return (request >> _IOC_SIZESHIFT) & _IOC_SIZEMASK


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

#: Length of a LUN's page-83 NAA-6 WWID, in bytes.
CXLFLASH_WWID_LEN = 16

#: The fixed 4K block: unit of lun_size / req_size / vLUN last_lba /
#: LUN_PROVISION size and capacities.
CXLFLASH_BLOCK_SIZE = 4096

#: Max number of user contexts (CXL process elements); PEs are 0..511.
MAX_CONTEXT = 512
CXLFLASH_MAX_CONTEXT = MAX_CONTEXT

#: Size of one RHT entry (struct sisl_rht_entry), bytes.
SISL_RHT_ENTRY_SIZE = 16


def max_rht_per_context(page_size: int = 4096) -> int:
    """``MAX_RHT_PER_CONTEXT`` = PAGE_SIZE / sizeof(struct sisl_rht_entry).

    256 with 4 KiB pages, 4096 with 64 KiB pages (the usual ppc64 config).
    """
    return page_size // SISL_RHT_ENTRY_SIZE


#: chunk-size exponent stored in ``nmask`` of a virtual RHT entry.
MC_RHT_NMASK = 16
#: log2 of the chunk (allocation unit) size in native blocks.
MC_CHUNK_SHIFT = 16
#: chunk (allocation unit) size, in native blocks.
MC_CHUNK_SIZE = 1 << MC_CHUNK_SHIFT  # 65536 native blocks

#: Max transfer size of the host, in bytes (16 MiB).
CXLFLASH_MAX_XFER_SIZE = 16 * 1024 * 1024
#: Max transfer size of the host, in 512-byte sectors.
CXLFLASH_MAX_SECTORS = 32768
#: The SCSI sector unit (bytes) that CXLFLASH_MAX_SECTORS is counted in.
MAX_SECTOR_UNIT = 512

#: LXT entries are allocated in groups of this many entries.
LXT_GROUP_SIZE = 8
#: Bit position of the LUN-table index in an LXT entry.
LXT_LUNIDX_SHIFT = 8
#: Bit position of the permission bits in an LXT entry.
LXT_PERM_SHIFT = 4


def LXT_NUM_GROUPS(lxt_cnt: int) -> int:
    """Number of LXT groups needed for ``lxt_cnt`` entries (ceil(n/8))."""
    return (lxt_cnt + LXT_GROUP_SIZE - 1) // LXT_GROUP_SIZE


#: Max extra references (clones) per chunk.
MAX_AUN_CLONE_CNT = 0xFF
#: Highest bit of a 64-bit allocator bitmap word.
HIBIT = 63

#: Size of each per-port LUN table in the AFU (only 0..255 used).
CXLFLASH_NUM_VLUNS = 512
#: Max FC ports per adapter (2 banks x 2).
CXLFLASH_MAX_FC_PORTS = 4
#: Max adapters (character-device minors).
CXLFLASH_MAX_ADAPTERS = 32

#: Size of one per-context MMIO window, bytes (the ``mmio_size`` ATTACH and
#: RECOVER_AFU return). Not a kernel macro name.
CXLFLASH_MMIO_SIZE = 65536

#: Max interrupts a context may request at ATTACH (more is EINVAL).
CXLFLASH_MAX_NUM_INTERRUPTS = 4

SISL_WWID_DATA_LEN = 16
SISL_SENSE_DATA_LEN = 20

# RHT entry permission bits (sislite.h)
RHT_PERM_READ = 0x01
RHT_PERM_WRITE = 0x02
RHT_PERM_RW = RHT_PERM_READ | RHT_PERM_WRITE


def SISL_RHT_FP(fmt: int, perm: int) -> int:
    """Format/permission byte of an RHT entry: ``(fmt << 4) | perm``."""
    return ((fmt & 0xF) << 4) | (perm & 0x3)


def SISL_RHT_FP_CLONE(src_fp: int, dst_perm: int) -> int:
    """Clone rule: keep the format nibble, permissions become src & dst."""
    return src_fp & (0xFC | (dst_perm & 0x3))


# SISLite AFU response codes (IOASA afu_rc) relevant to translation
SISL_AFU_RC_RHT_INVALID = 0x01  # user error, e.g. handle not open
SISL_AFU_RC_RHT_UNALIGNED = 0x02  # should never happen
SISL_AFU_RC_RHT_OUT_OF_BOUNDS = 0x03  # user error: handle >= RHT count
SISL_AFU_RC_RHT_DMA_ERR = 0x04
SISL_AFU_RC_RHT_RW_PERM = 0x05  # no RW perms in the RHT, user error
SISL_AFU_RC_LXT_UNALIGNED = 0x12  # should never happen
SISL_AFU_RC_LXT_OUT_OF_BOUNDS = 0x13  # user error: LBA beyond the vLUN
SISL_AFU_RC_LXT_DMA_ERR = 0x14
SISL_AFU_RC_LXT_RW_PERM = 0x15  # no RW perms in the LXT, user error
SISL_AFU_RC_NOT_XLATE_HOST = 0x1A  # possible if master exited
SISL_AFU_RC_NO_CHANNELS = 0x20  # no usable FC port, may retry
SISL_AFU_RC_CAP_VIOLATION = 0x21  # not allowed by context capabilities
SISL_AFU_RC_OUT_OF_DATA_BUFS = 0x30  # always retry
SISL_AFU_RC_DATA_DMA_ERR = 0x31

# --- Disk (DK_*) ioctl constants --------------------------------------------

DK_CXLFLASH_VERSION_0 = 0

# Return flags, lower-order bits of hdr.return_flags
DK_CXLFLASH_ALL_PORTS_ACTIVE = 0x0000000000000001  # USER_VIRTUAL
DK_CXLFLASH_APP_CLOSE_ADAP_FD = 0x0000000000000002  # ATTACH, RECOVER_AFU
DK_CXLFLASH_CONTEXT_SQ_CMD_MODE = 0x0000000000000004  # ATTACH, RECOVER_AFU

# ATTACH input flag (hdr.flags); the low bits of hdr.flags carry the
# open(2) access mode (O_RDONLY/O_WRONLY/O_RDWR).
DK_CXLFLASH_ATTACH_REUSE_CONTEXT = 0x8000000000000000

# USER_VIRTUAL input flag (hdr.flags)
DK_CXLFLASH_UVIRTUAL_NEED_WRITE_SAME = 0x8000000000000000

# VERIFY
DK_CXLFLASH_VERIFY_SENSE_LEN = 18
DK_CXLFLASH_VERIFY_HINT_SENSE = 0x8000000000000000  # in `hint`, not hdr.flags

# RECOVER_AFU return flag (hdr.return_flags)
DK_CXLFLASH_RECOVER_AFU_CONTEXT_RESET = 0x8000000000000000

# MANAGE_LUN
DK_CXLFLASH_MANAGE_LUN_WWID_LEN = CXLFLASH_WWID_LEN
DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE = 0x8000000000000000
DK_CXLFLASH_MANAGE_LUN_DISABLE_SUPERPIPE = 0x4000000000000000
DK_CXLFLASH_MANAGE_LUN_ALL_PORTS_ACCESSIBLE = 0x2000000000000000  # never read

# --- Host (HT_*) ioctl constants --------------------------------------------

HT_CXLFLASH_VERSION_0 = 0

# Input flags available to all host ioctls (lower-order bits of hdr.flags)
HT_CXLFLASH_HOST_READ = 0x0000000000000000
HT_CXLFLASH_HOST_WRITE = 0x0000000000000001

# LUN_PROVISION sub-commands (hdr.subcmd)
HT_CXLFLASH_LUN_PROVISION_SUBCMD_CREATE_LUN = 0x0001
HT_CXLFLASH_LUN_PROVISION_SUBCMD_DELETE_LUN = 0x0002
HT_CXLFLASH_LUN_PROVISION_SUBCMD_QUERY_PORT = 0x0003

HT_CXLFLASH_AFU_DEBUG_MAX_DATA_LEN = 262144  # 256K
HT_CXLFLASH_AFU_DEBUG_SUBCMD_LEN = 12


# ---------------------------------------------------------------------------
# Structures
# ---------------------------------------------------------------------------


class _Struct(ctypes.Structure):
    """Common base: a readable repr. Layout comes only from ``_fields_``."""

    def __repr__(self) -> str:
        parts = []
        for name, ctype in self._fields_:  # type: ignore[attr-defined, misc]
            value = getattr(self, name)
            if isinstance(value, ctypes.Array):
                value = list(value)
            elif isinstance(value, int):
                value = hex(value) if value > 9 else value
            parts.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class dk_cxlflash_hdr(_Struct):
    """Common header of all DK_* ioctls (24 bytes).

    ``version`` must be DK_CXLFLASH_VERSION_0; ``rsvd`` and ``return_flags``
    must be zero on input.
    """

    _fields_ = [
        ("version", c_uint16),  # version data
        ("rsvd", c_uint16 * 3),  # reserved, must be 0
        ("flags", c_uint64),  # input flags
        ("return_flags", c_uint64),  # returned flags, must be 0 on input
    ]


class dk_cxlflash_attach(_Struct):
    """DK_CXLFLASH_ATTACH (144 bytes).

    ``last_lba`` is the physical LUN's last LBA in **native** blocks of
    ``block_size`` bytes; ``max_xfer`` is in native blocks.
    """

    _fields_ = [
        ("hdr", dk_cxlflash_hdr),  # common fields
        ("num_interrupts", c_uint64),  # requested number of interrupts (<= 4)
        ("context_id", c_uint64),  # in (REUSE_CONTEXT) / returned context
        ("mmio_size", c_uint64),  # returned size of MMIO area, bytes
        ("block_size", c_uint64),  # returned native block size, bytes
        ("adap_fd", c_uint64),  # returned adapter file descriptor
        ("last_lba", c_uint64),  # returned last LBA (native blocks)
        ("max_xfer", c_uint64),  # returned max transfer size (native blocks)
        ("reserved", c_uint64 * 8),  # reserved for future use
    ]


class dk_cxlflash_detach(_Struct):
    """DK_CXLFLASH_DETACH (96 bytes)."""

    _fields_ = [
        ("hdr", dk_cxlflash_hdr),
        ("context_id", c_uint64),  # context to detach
        ("reserved", c_uint64 * 8),
    ]


class dk_cxlflash_udirect(_Struct):
    """DK_CXLFLASH_USER_DIRECT (112 bytes).

    ``last_lba`` is the physical LUN's last LBA in **native** blocks.
    """

    _fields_ = [
        ("hdr", dk_cxlflash_hdr),
        ("context_id", c_uint64),  # context to own physical resources
        ("rsrc_handle", c_uint64),  # returned resource handle
        ("last_lba", c_uint64),  # returned last LBA (native blocks)
        ("reserved", c_uint64 * 8),
    ]


class dk_cxlflash_uvirtual(_Struct):
    """DK_CXLFLASH_USER_VIRTUAL (120 bytes).

    ``lun_size`` is requested in **4K blocks**; ``last_lba`` is returned in
    **4K blocks**.
    """

    _fields_ = [
        ("hdr", dk_cxlflash_hdr),
        ("context_id", c_uint64),  # context to own virtual resources
        ("lun_size", c_uint64),  # requested size, 4K blocks
        ("rsrc_handle", c_uint64),  # returned resource handle
        ("last_lba", c_uint64),  # returned last LBA of the vLUN, 4K blocks
        ("reserved", c_uint64 * 8),
    ]


class dk_cxlflash_release(_Struct):
    """DK_CXLFLASH_RELEASE (104 bytes)."""

    _fields_ = [
        ("hdr", dk_cxlflash_hdr),
        ("context_id", c_uint64),  # context owning resources
        ("rsrc_handle", c_uint64),  # resource handle to release
        ("reserved", c_uint64 * 8),
    ]


class dk_cxlflash_resize(_Struct):
    """DK_CXLFLASH_VLUN_RESIZE (120 bytes).

    ``req_size`` is in **4K blocks**; ``last_lba`` is returned in **4K
    blocks**.
    """

    _fields_ = [
        ("hdr", dk_cxlflash_hdr),
        ("context_id", c_uint64),  # context owning resources
        ("rsrc_handle", c_uint64),  # resource handle of LUN to resize
        ("req_size", c_uint64),  # new requested size, 4K blocks
        ("last_lba", c_uint64),  # returned last LBA of the vLUN, 4K blocks
        ("reserved", c_uint64 * 8),
    ]


class dk_cxlflash_clone(_Struct):
    """DK_CXLFLASH_VLUN_CLONE (112 bytes). ``adap_fd_src`` is ignored."""

    _fields_ = [
        ("hdr", dk_cxlflash_hdr),
        ("context_id_src", c_uint64),  # context to clone from
        ("context_id_dst", c_uint64),  # context to clone to
        ("adap_fd_src", c_uint64),  # source context adapter fd (ignored)
        ("reserved", c_uint64 * 8),
    ]


class dk_cxlflash_verify(_Struct):
    """DK_CXLFLASH_VERIFY (144 bytes).

    ``hint`` takes DK_CXLFLASH_VERIFY_HINT_SENSE; ``last_lba`` is the
    physical LUN's last LBA in **native** blocks.
    """

    _fields_ = [
        ("hdr", dk_cxlflash_hdr),
        ("context_id", c_uint64),  # context owning resources to verify
        ("rsrc_handle", c_uint64),  # resource handle of LUN
        ("hint", c_uint64),  # reasons for verify
        ("last_lba", c_uint64),  # returned last LBA of device (native blocks)
        ("sense_data", c_uint8 * DK_CXLFLASH_VERIFY_SENSE_LEN),  # SCSI sense
        ("pad", c_uint8 * 6),  # pad to next 8-byte boundary
        ("reserved", c_uint64 * 8),
    ]


class dk_cxlflash_recover_afu(_Struct):
    """DK_CXLFLASH_RECOVER_AFU (120 bytes)."""

    _fields_ = [
        ("hdr", dk_cxlflash_hdr),
        ("reason", c_uint64),  # reason for recovery request (only logged)
        ("context_id", c_uint64),  # context to recover / updated id
        ("mmio_size", c_uint64),  # returned size of MMIO area, bytes
        ("adap_fd", c_uint64),  # returned adapter file descriptor
        ("reserved", c_uint64 * 8),
    ]


class dk_cxlflash_manage_lun(_Struct):
    """DK_CXLFLASH_MANAGE_LUN (104 bytes)."""

    _fields_ = [
        ("hdr", dk_cxlflash_hdr),
        ("wwid", c_uint8 * DK_CXLFLASH_MANAGE_LUN_WWID_LEN),  # page-83 NAA-6
        ("reserved", c_uint64 * 8),
    ]


class cxlflash_ioctls(ctypes.Union):
    """``union cxlflash_ioctls``: any DK_* argument (144 bytes)."""

    _fields_ = [
        ("attach", dk_cxlflash_attach),
        ("detach", dk_cxlflash_detach),
        ("udirect", dk_cxlflash_udirect),
        ("uvirtual", dk_cxlflash_uvirtual),
        ("release", dk_cxlflash_release),
        ("resize", dk_cxlflash_resize),
        ("clone", dk_cxlflash_clone),
        ("verify", dk_cxlflash_verify),
        ("recover_afu", dk_cxlflash_recover_afu),
        ("manage_lun", dk_cxlflash_manage_lun),
    ]


MAX_CXLFLASH_IOCTL_SZ = ctypes.sizeof(cxlflash_ioctls)


class ht_cxlflash_hdr(_Struct):
    """Common header of the HT_* (host/adapter) ioctls (24 bytes)."""

    _fields_ = [
        ("version", c_uint16),  # version data
        ("subcmd", c_uint16),  # sub-command
        ("rsvd", c_uint16 * 2),  # reserved for future use
        ("flags", c_uint64),  # input flags
        ("return_flags", c_uint64),  # returned flags
    ]


class ht_cxlflash_lun_provision(_Struct):
    """HT_CXLFLASH_LUN_PROVISION (160 bytes).

    ``size``, ``max_cap_port`` and ``cur_cap_port`` are in **4K blocks**.
    """

    _fields_ = [
        ("hdr", ht_cxlflash_hdr),
        ("port", c_uint16),  # target port for provision request
        ("reserved16", c_uint16 * 3),
        ("size", c_uint64),  # size of LUN, 4K blocks
        ("lun_id", c_uint64),  # SCSI LUN id
        ("wwid", c_uint8 * CXLFLASH_WWID_LEN),  # page-83 WWID, NAA-6
        ("max_num_luns", c_uint64),  # max number of LUNs provisioned
        ("cur_num_luns", c_uint64),  # current number of LUNs provisioned
        ("max_cap_port", c_uint64),  # total capacity for port, 4K blocks
        ("cur_cap_port", c_uint64),  # current capacity for port, 4K blocks
        ("reserved", c_uint64 * 8),
    ]


class ht_cxlflash_afu_debug(_Struct):
    """HT_CXLFLASH_AFU_DEBUG (120 bytes).

    ``data_ea`` is the user buffer's address, ``data_len`` its length in
    bytes (at most HT_CXLFLASH_AFU_DEBUG_MAX_DATA_LEN).
    """

    _fields_ = [
        ("hdr", ht_cxlflash_hdr),
        ("reserved8", c_uint8 * 4),
        ("afu_subcmd", c_uint8 * HT_CXLFLASH_AFU_DEBUG_SUBCMD_LEN),  # pass-thru
        ("data_ea", c_uint64),  # data buffer effective address
        ("data_len", c_uint32),  # data buffer length, bytes
        ("reserved32", c_uint32),
        ("reserved", c_uint64 * 8),
    ]


class cxlflash_ht_ioctls(ctypes.Union):
    """``union cxlflash_ht_ioctls``: any HT_* argument (160 bytes)."""

    _fields_ = [
        ("lun_provision", ht_cxlflash_lun_provision),
        ("afu_debug", ht_cxlflash_afu_debug),
    ]


MAX_HT_CXLFLASH_IOCTL_SZ = ctypes.sizeof(cxlflash_ht_ioctls)

# ---------------------------------------------------------------------------
# Request numbers
# ---------------------------------------------------------------------------

CXL_MAGIC = 0xCA


def CXL_IOWR(nr: int, struct) -> int:
    """``_IOWR(CXL_MAGIC, nr, struct)``."""
    return _IOWR(CXL_MAGIC, nr, struct)


# Superpipe (disk) ioctls start at the base of the reserved CXL_MAGIC region
# (0x80) and grow upwards.
DK_CXLFLASH_ATTACH = CXL_IOWR(0x80, dk_cxlflash_attach)  # 0xC090CA80
DK_CXLFLASH_USER_DIRECT = CXL_IOWR(0x81, dk_cxlflash_udirect)  # 0xC070CA81
DK_CXLFLASH_RELEASE = CXL_IOWR(0x82, dk_cxlflash_release)  # 0xC068CA82
DK_CXLFLASH_DETACH = CXL_IOWR(0x83, dk_cxlflash_detach)  # 0xC060CA83
DK_CXLFLASH_VERIFY = CXL_IOWR(0x84, dk_cxlflash_verify)  # 0xC090CA84
DK_CXLFLASH_RECOVER_AFU = CXL_IOWR(0x85, dk_cxlflash_recover_afu)  # 0xC078CA85
DK_CXLFLASH_MANAGE_LUN = CXL_IOWR(0x86, dk_cxlflash_manage_lun)  # 0xC068CA86
DK_CXLFLASH_USER_VIRTUAL = CXL_IOWR(0x87, dk_cxlflash_uvirtual)  # 0xC078CA87
DK_CXLFLASH_VLUN_RESIZE = CXL_IOWR(0x88, dk_cxlflash_resize)  # 0xC078CA88
DK_CXLFLASH_VLUN_CLONE = CXL_IOWR(0x89, dk_cxlflash_clone)  # 0xC070CA89

# Host (adapter character device) ioctls start at the top of the reserved
# CXL_MAGIC region (0xBF) and grow downwards.
HT_CXLFLASH_LUN_PROVISION = CXL_IOWR(0xBF, ht_cxlflash_lun_provision)  # 0xC0A0CABF
HT_CXLFLASH_AFU_DEBUG = CXL_IOWR(0xBE, ht_cxlflash_afu_debug)  # 0xC078CABE

#: DK_* request number -> argument structure class (issued on a disk).
DK_IOCTLS: dict[int, type[ctypes.Structure]] = {
    DK_CXLFLASH_ATTACH: dk_cxlflash_attach,
    DK_CXLFLASH_USER_DIRECT: dk_cxlflash_udirect,
    DK_CXLFLASH_RELEASE: dk_cxlflash_release,
    DK_CXLFLASH_DETACH: dk_cxlflash_detach,
    DK_CXLFLASH_VERIFY: dk_cxlflash_verify,
    DK_CXLFLASH_RECOVER_AFU: dk_cxlflash_recover_afu,
    DK_CXLFLASH_MANAGE_LUN: dk_cxlflash_manage_lun,
    DK_CXLFLASH_USER_VIRTUAL: dk_cxlflash_uvirtual,
    DK_CXLFLASH_VLUN_RESIZE: dk_cxlflash_resize,
    DK_CXLFLASH_VLUN_CLONE: dk_cxlflash_clone,
}

#: HT_* request number -> argument structure class (issued on an adapter).
HT_IOCTLS: dict[int, type[ctypes.Structure]] = {
    HT_CXLFLASH_LUN_PROVISION: ht_cxlflash_lun_provision,
    HT_CXLFLASH_AFU_DEBUG: ht_cxlflash_afu_debug,
}

#: request number -> kernel macro name, for all twelve ioctls.
IOCTL_NAMES: dict[int, str] = {
    DK_CXLFLASH_ATTACH: "DK_CXLFLASH_ATTACH",
    DK_CXLFLASH_USER_DIRECT: "DK_CXLFLASH_USER_DIRECT",
    DK_CXLFLASH_RELEASE: "DK_CXLFLASH_RELEASE",
    DK_CXLFLASH_DETACH: "DK_CXLFLASH_DETACH",
    DK_CXLFLASH_VERIFY: "DK_CXLFLASH_VERIFY",
    DK_CXLFLASH_RECOVER_AFU: "DK_CXLFLASH_RECOVER_AFU",
    DK_CXLFLASH_MANAGE_LUN: "DK_CXLFLASH_MANAGE_LUN",
    DK_CXLFLASH_USER_VIRTUAL: "DK_CXLFLASH_USER_VIRTUAL",
    DK_CXLFLASH_VLUN_RESIZE: "DK_CXLFLASH_VLUN_RESIZE",
    DK_CXLFLASH_VLUN_CLONE: "DK_CXLFLASH_VLUN_CLONE",
    HT_CXLFLASH_LUN_PROVISION: "HT_CXLFLASH_LUN_PROVISION",
    HT_CXLFLASH_AFU_DEBUG: "HT_CXLFLASH_AFU_DEBUG",
}

__all__ += sorted(
    name
    for name in list(globals())
    if name[:1].isupper() and not name.startswith("_") and name not in __all__
)
