"""LUN records and their management (spec §1.2, §1.3, §8, §10.3, §12.1):
the kernel's vlun.h records, managed as in its lunmgt.c.

``GlobalLun`` (the kernel's glun_info): one per WWID -- mode, user count, capacity
and, while virtual, the chunk allocator.  ``LocalLun`` (llun_info): the adapter's
view -- LUN ids per port, the ports superpipe is enabled on, and the LUN
table slot.  ``Sdev``: one SCSI device, i.e. one path (port) to a LUN.
"""
import errno
import threading

from .._core.allocator import ChunkAllocator
from .._core.tables import MC_CHUNK_SHIFT, MC_CHUNK_SIZE
from ..errors import CxlFlashError

MODE_NONE = 0
MODE_VIRTUAL = 1
MODE_PHYSICAL = 2
MODE_NAMES = {MODE_NONE: "none", MODE_VIRTUAL: "virtual", MODE_PHYSICAL: "physical"}

NUM_LUN_TABLE_ENTRIES = 512


def sam_lun_id(lun):
    """The 8-byte SAM LUN id of a SCSI LUN number, as a big-endian u64
    (LUN 1 -> 0x0001000000000000)."""
    if lun < 256:
        return lun << 48
    return (0x4000 | (lun & 0x3FFF)) << 48


class GlobalLun:
    """One LUN, by WWID: mode, users, capacity and the chunk allocator."""

    def __init__(self, wwid, backing):
        self.wwid = wwid
        self.backing = backing
        self.max_lba = 0            # 0: capacity not yet read
        self.blk_len = 0
        self.mode = MODE_NONE
        self.users = 0
        self.allocator = None
        self.mutex = threading.Lock()

    def backing_fd(self):
        """The backing store's fd, bound into each handle opened on the
        LUN (the data path uses it under the table lock), or -1."""
        return self.backing.fd if self.backing is not None else -1

    def read_capacity(self):
        """READ CAPACITY(16) from the backing store (under the mutex).  A
        virtual LUN's allocator follows the new capacity: chunks beyond it
        are never handed out (those in use stay in use)."""
        size = self.backing.size
        blk_len = self.backing.block_size
        with self.mutex:
            self.blk_len = blk_len
            self.max_lba = max(size // blk_len - 1, 0)
            if self.allocator is not None:
                self.allocator.set_limit(min(size // blk_len >> MC_CHUNK_SHIFT,
                                             self.allocator.total_chunks))

    # spec §8 -- callers hold self.mutex for lun_attach when noted
    def attach(self, mode, *, locked=False, sdev=None):
        """``lun_attach``: take a user in ``mode`` or raise EINVAL.  With
        ``sdev``, the disk must still be in superpipe mode on this LUN --
        checked under the mutex that DISABLE_SUPERPIPE also holds, so a
        disable cannot slip between the dispatch's check and the attach."""
        if not locked:
            self.mutex.acquire()
        try:
            if sdev is not None and (sdev.llun is None or sdev.llun.parent is not self):
                raise CxlFlashError(errno.EINVAL, "superpipe mode is not enabled on "
                                    "this disk (DK_CXLFLASH_MANAGE_LUN)")
            if self.mode == MODE_NONE:
                self.mode = mode
            elif self.mode != mode:
                raise CxlFlashError(
                    errno.EINVAL,
                    f"the LUN is open in {MODE_NAMES[self.mode]} mode; "
                    f"{MODE_NAMES[mode]} access needs every handle on it released")
            self.users += 1
        finally:
            if not locked:
                self.mutex.release()

    def detach(self):
        """``lun_detach``: drop a user; at 0 the mode resets and the
        allocator is destroyed."""
        with self.mutex:
            self.users -= 1
            if self.users <= 0:
                self.users = 0
                self.mode = MODE_NONE
                self.allocator = None

    def init_allocator(self):
        """``init_vlun``: a fresh allocator over the whole chunks (under the
        mutex).  Raises ENOMEM when the LUN is smaller than one chunk."""
        total = (self.max_lba + 1) >> MC_CHUNK_SHIFT
        if total <= 0:
            raise CxlFlashError(
                errno.ENOMEM,
                f"the LUN has {self.max_lba + 1} blocks, fewer than one chunk "
                f"({MC_CHUNK_SIZE} blocks): it cannot hold a virtual LUN")
        self.allocator = ChunkAllocator(total)


class LocalLun:
    """The adapter's record of a LUN (llun)."""

    def __init__(self, glun, num_ports):
        self.parent = glun
        self.wwid = glun.wwid
        self.lun_id = [0] * num_ports
        self.port_sel = 0
        self.lun_index = 0
        self.in_table = False


class Sdev:
    """One SCSI device: a path to a LUN through one port (channel)."""

    def __init__(self, port, scsi_lun, wwid):
        self.port = port
        self.scsi_lun = scsi_lun
        self.wwid = wwid
        self.llun = None            # hostdata: set while in superpipe mode
        self.present = True
        self.refs = 0


class LunTable:
    """The AFU's per-port LUN tables and the driver's slot bookkeeping
    (spec §10.3).  Slots are never reclaimed by the kernel; we reclaim
    them (decision 20) when a LUN leaves the table."""

    def __init__(self, num_ports):
        self.num_ports = num_ports
        self.promote_lun_index = 0
        self.last_lun_index = [255] * num_ports
        self.entries = [[0] * NUM_LUN_TABLE_ENTRIES for _ in range(num_ports)]
        self.owner = [[None] * NUM_LUN_TABLE_ENTRIES for _ in range(num_ports)]
        self.free_multi = set()                          # reclaimed, below promote
        self.free_single = [set() for _ in range(num_ports)]  # above last[k]

    def assign(self, llun):
        """``init_luntable``: give ``llun`` a slot; EIO or ENOSPC."""
        if llun.in_table:
            return
        ports = [k for k in range(4) if llun.port_sel & (1 << k)]
        if not ports or len(ports) > self.num_ports:
            raise CxlFlashError(
                errno.EIO,
                f"invalid port configuration for the LUN table (port mask "
                f"0x{llun.port_sel:x}, adapter has {self.num_ports} ports)")
        if len(ports) > 1 and self.free_multi:
            index = min(self.free_multi)
            self.free_multi.discard(index)
        elif len(ports) == 1 and self.free_single[ports[0]]:
            index = max(self.free_single[ports[0]])
            self.free_single[ports[0]].discard(index)
        elif len(ports) > 1:
            for k in ports:
                if self.promote_lun_index == self.last_lun_index[k]:
                    raise CxlFlashError(errno.ENOSPC, f"the LUN table of port {k} is full")
            index = self.promote_lun_index
            self.promote_lun_index += 1
        else:
            k = ports[0]
            if self.promote_lun_index == self.last_lun_index[k]:
                raise CxlFlashError(errno.ENOSPC, f"the LUN table of port {k} is full")
            index = self.last_lun_index[k]
            self.last_lun_index[k] -= 1
        for k in ports:
            self.entries[k][index] = llun.lun_id[k]
            self.owner[k][index] = llun
        llun.lun_index = index
        llun.in_table = True

    def release(self, llun):
        """Take ``llun`` out of the table.  The kernel never reclaims the
        slot; we do (decision 20), so enable/disable cycles cannot fill it."""
        if not llun.in_table:
            return
        index = llun.lun_index
        ports = [k for k in range(self.num_ports) if self.owner[k][index] is llun]
        for k in ports:
            self.entries[k][index] = 0
            self.owner[k][index] = None
        if len(ports) > 1:
            self.free_multi.add(index)
        elif len(ports) == 1:
            self.free_single[ports[0]].add(index)
        llun.in_table = False

    def restore(self, lluns):
        """Re-program every slot after an AFU reset."""
        for llun in lluns:
            if llun.in_table:
                for k in range(self.num_ports):
                    if llun.port_sel & (1 << k):
                        self.entries[k][llun.lun_index] = llun.lun_id[k]
