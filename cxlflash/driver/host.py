"""The host ioctls on the adapter's character device (spec §18):
HT_CXLFLASH_LUN_PROVISION and HT_CXLFLASH_AFU_DEBUG.

AFU debug commands (``afu_subcmd[0]``; all read-only, read direction)
-------------------------------------------------------------------------
0x01 DUMP_CONTEXTS  one 32-byte little-endian record per live or in-error
                    context: context_id u64, pe u32, pid u32, rht_out u32,
                    luns u16, perms u8, in_error u8, cookie u32, reserved u32
0x02 DUMP_LUNS      one 48-byte record per LUN: wwid[16], max_lba u64,
                    blk_len u32, mode u8, in_table u8, lun_index u8,
                    port_sel u8, users u32, free_chunks u64, reserved u32
0x03 DUMP_RHT       ``afu_subcmd[1..2]`` = PE (big-endian): one 16-byte
                    record per RHT slot of that context: lxt_cnt u32 (or
                    0), nmask u8, fp u8, valid u8, format u8, lun_id u64
0x04 AFU_COUNTERS   the AFU's command counters as u64: lw_syncs, hw_syncs,
                    global_syncs, failed_syncs, resets, afu_cmds
The result is truncated to ``data_len`` (zero-padded past its end).  A
write-direction command, or an unknown one, fails with EIO (the AFU's
error status), as does a context PE with no context.
"""
import ctypes
import errno
import os
import secrets
import struct

from .. import uapi
from ..errors import CxlFlashError
from .afu import NORMAL
from .uaccess import copy_in, copy_out, check_header

DUMP_CONTEXTS = 0x01
DUMP_LUNS = 0x02
DUMP_RHT = 0x03
AFU_COUNTERS = 0x04

_libc = ctypes.CDLL(None, use_errno=True)


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class ProcessMemory:
    """The caller's memory, as copy_from_user/copy_to_user reach it: a
    process's address space through process_vm_readv/writev."""

    def __init__(self, pid):
        self.pid = pid

    def read(self, address, length):
        return _vm_copy(self.pid, address, length)

    def write(self, address, data):
        _vm_copy(self.pid, address, len(data), data)


def _vm_copy(pid, address, length, data=None):
    """Read ``length`` bytes at an address of the calling process ``pid``,
    or write ``data`` there, with process_vm_readv/writev: a bad address is
    EFAULT, never a crash.  ``pid`` is the caller's identity (Caller.pid),
    never this process's own: a forked child's buffer is in the child."""
    buf = ctypes.create_string_buffer(length if data is None else bytes(data), length)
    local = _iovec(ctypes.cast(buf, ctypes.c_void_p), length)
    remote = _iovec(address, length)
    fn = _libc.process_vm_readv if data is None else _libc.process_vm_writev
    fn.restype = ctypes.c_ssize_t
    n = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != length:
        raise CxlFlashError(errno.EFAULT, f"data_ea 0x{address:x}: {length} bytes "
                            f"are not addressable in process {pid}")
    return buf.raw


_WWID_SALT = secrets.randbits(32)


def _new_wwid_salt():
    global _WWID_SALT
    _WWID_SALT = secrets.randbits(32)


os.register_at_fork(after_in_child=_new_wwid_salt)    # a child's adapters differ too


def naa6_wwid(serial):
    """A unique NAA-6 (IEEE registered extended) 16-byte WWID: the serial
    and a random salt (so adapters of different processes sharing a LUN
    directory do not collide)."""
    hi = (0x6 << 60) | (0x005076 << 36) | (serial & 0xFFFFFFFFF)
    return struct.pack(">QQ", hi, (_WWID_SALT << 32 | serial) & (2**64 - 1))


def lun_provision(drv, arg, caller, memory=None):
    """HT_CXLFLASH_LUN_PROVISION (spec §18.3)."""
    afu = drv.afu
    if not afu.has_lun_provision:
        raise CxlFlashError(errno.EOPNOTSUPP, "this AFU cannot provision LUNs")
    if arg.port >= drv.num_ports:
        raise CxlFlashError(errno.EINVAL, f"port {arg.port} does not exist (the adapter "
                            f"has {drv.num_ports})")
    sub = arg.hdr.subcmd
    port = arg.port
    mine = [p for p in drv.provisioned.values() if p["port"] == port]
    if sub == uapi.HT_CXLFLASH_LUN_PROVISION_SUBCMD_QUERY_PORT:
        arg.max_num_luns = drv.port_max_luns
        arg.cur_num_luns = len(mine)
        arg.max_cap_port = drv.port_capacity
        arg.cur_cap_port = sum(p["size"] for p in mine)
        return
    if sub == uapi.HT_CXLFLASH_LUN_PROVISION_SUBCMD_CREATE_LUN:
        if afu.state != NORMAL:
            arg.lun_id = 0               # the command was not sent (spec §18.3)
            arg.wwid[:] = bytes(16)
            return
        err = afu.send_cmd("afu_cmd", "LUN provision")
        if err:
            raise CxlFlashError(err, "the AFU refused the LUN provision command")
        if arg.size == 0:
            raise CxlFlashError(errno.EIO, "the AFU refused a LUN of size 0")
        if len(mine) >= drv.port_max_luns:
            raise CxlFlashError(errno.EIO, f"port {port} already has the maximum of "
                                f"{drv.port_max_luns} LUNs")
        if sum(p["size"] for p in mine) + arg.size > drv.port_capacity:
            raise CxlFlashError(errno.EIO, f"port {port} has not enough space for "
                                f"{arg.size} 4K blocks")
        wwid, lun_id = drv.provision(port, arg.size)
        arg.lun_id = lun_id
        arg.wwid[:] = wwid
        return
    if sub == uapi.HT_CXLFLASH_LUN_PROVISION_SUBCMD_DELETE_LUN:
        if afu.state != NORMAL:
            return

        def send():
            err = afu.send_cmd("afu_cmd", "LUN provision")
            if err:
                raise CxlFlashError(err, "the AFU refused the LUN delete command")

        with drv.global_mutex:           # one delete of a LUN at a time
            wwid = next((w for w, p in list(drv.provisioned.items())
                         if p["port"] == port and p["lun_id"] == arg.lun_id), None)
            if wwid is None:
                send()
                raise CxlFlashError(errno.EIO, f"no provisioned LUN with id "
                                    f"0x{arg.lun_id:016x} on port {port}")
            # Deviation: EBUSY (before the AFU command) while a handle is
            # open on the LUN or a context has it attached; superpipe mode
            # alone does not keep it (Driver.remove_lun).
            drv.remove_lun(wwid, commit=send)
            drv.unprovision(wwid)
        return
    raise CxlFlashError(errno.EINVAL, f"unknown LUN provision subcommand {sub}")


def _debug_data(drv, subcmd):
    op = subcmd[0]
    if op == DUMP_CONTEXTS:
        with drv.ctx_tbl_lock:
            ctxs = [c for c in drv.ctx_tbl if c is not None] + list(drv.ctx_err_recovery)
        return b"".join(struct.pack("<QIIIHBBII", c.ctxid, c.pe, c.pid, c.table.rht_out,
                                    len(c.luns), c.rht_perms, int(c.err_recovery_active),
                                    c.cookie, 0) for c in ctxs)
    if op == DUMP_LUNS:
        out = []
        for wwid, glun in drv.gluns.items():
            llun = drv.lluns.get(wwid)
            out.append(struct.pack(
                "<16sQIBBBBIQI", wwid, glun.max_lba, glun.blk_len, glun.mode,
                int(bool(llun and llun.in_table)), llun.lun_index if llun else 0,
                llun.port_sel if llun else 0, glun.users,
                glun.allocator.space() if glun.allocator else 0, 0))
        return b"".join(out)
    if op == DUMP_RHT:
        pe = (subcmd[1] << 8) | subcmd[2]
        ctx = drv.find_context(pe=pe)
        if ctx is None:
            raise CxlFlashError(errno.EIO, f"AFU debug: no context at PE {pe}")
        out = []
        for h in range(ctx.table.rht_size):
            e = ctx.table.entry(h)
            if not e["open"]:
                out.append(bytes(16))
            elif e["format"] == 0:
                out.append(struct.pack("<IBBBBQ", e["lxt_cnt"], e["nmask"],
                                       e["perms"], 0, 0, 0))
            else:
                out.append(struct.pack("<IBBBBQ", 0, e["port_sel"], 0x10 | e["perms"],
                                       e["valid"], 1, e["lun_id"]))
        return b"".join(out)
    if op == AFU_COUNTERS:
        c = drv.afu.counters
        return struct.pack("<6Q", c["lw_syncs"], c["hw_syncs"], c["global_syncs"],
                           c["failed_syncs"], c["resets"], c["afu_cmds"])
    raise CxlFlashError(errno.EIO, f"AFU debug: unknown subcommand 0x{op:02x}")


def afu_debug(drv, arg, caller, memory=None):
    """HT_CXLFLASH_AFU_DEBUG (spec §18.4)."""
    afu = drv.afu
    if not afu.has_debug:
        raise CxlFlashError(errno.EOPNOTSUPP, "this AFU has no debug commands")
    n = arg.data_len
    write = bool(arg.hdr.flags & uapi.HT_CXLFLASH_HOST_WRITE)
    if n > uapi.HT_CXLFLASH_AFU_DEBUG_MAX_DATA_LEN:
        raise CxlFlashError(errno.EINVAL, f"data_len {n} exceeds "
                            f"{uapi.HT_CXLFLASH_AFU_DEBUG_MAX_DATA_LEN}")
    if memory is None:
        memory = ProcessMemory(caller.pid)
    if n:
        afu.faults.check("alloc", "allocating the bounce buffer")
        if write:
            memory.read(arg.data_ea, n)
    err = afu.send_cmd("afu_cmd", "AFU debug")
    if err:
        raise CxlFlashError(err, "the AFU debug command failed")
    if afu.state != NORMAL:
        data = b""
    elif n and write:
        raise CxlFlashError(errno.EIO, "AFU debug commands are read-only")
    else:
        data = _debug_data(drv, bytes(arg.afu_subcmd))
    if n and not write:
        memory.write(arg.data_ea, data[:n].ljust(n, b"\0"))


HT_HANDLERS = {
    uapi.HT_CXLFLASH_LUN_PROVISION: lun_provision,
    uapi.HT_CXLFLASH_AFU_DEBUG: afu_debug,
}


def host_ioctl(drv, request, arg, caller, memory=None):
    """One HT_* ioctl (spec §18.2)."""
    drv.reap(caller)
    drv.afu.rwsem.acquire_shared()
    try:
        if drv.closed:
            raise CxlFlashError(errno.ENODEV, "the adapter is closed")
        handler = HT_HANDLERS.get(request)
        if handler is None:
            raise CxlFlashError(errno.EINVAL, f"0x{request:08X} is not an "
                                "HT_CXLFLASH_* request")
        s = copy_in(arg, uapi.HT_IOCTLS[request])
        check_header(s.hdr, host=True)
        handler(drv, s, caller, memory)
        copy_out(arg, s)
    finally:
        drv.afu.rwsem.release_shared()
