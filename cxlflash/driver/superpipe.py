"""The disk ioctls (the kernel's superpipe.c): the dispatch pipeline
(spec §3), ATTACH (§5), DETACH (§7), USER_DIRECT (§9), RELEASE (§13),
VERIFY (§15), RECOVER_AFU (§16.3) and MANAGE_LUN (§17).  The virtual-LUN
ioctls are in ``vlun.py``."""
import errno
import os
import time

from .. import uapi
from .._core.tables import TABLE_LIVE
from ..errors import CxlFlashError
from .afu import AFU_LW_SYNC, NORMAL
from .context import CtxInfo, LunAccess, encode_ctxid
from .context import CTX_CTRL_ERR_FALLBACK, lookup_failed
from .uaccess import copy_in, copy_out, check_header
from .lunmgt import MODE_VIRTUAL, MODE_PHYSICAL
from . import vlun
from .vlun import release_handle





# -- ATTACH / DETACH ----------------------------------------------------------


def attach(drv, sdev, disk, arg, caller):
    """DK_CXLFLASH_ATTACH (spec §5)."""
    llun = sdev.llun
    if llun is None:             # disabled or deleted since the dispatch looked
        _still_in_superpipe_mode(sdev, llun)
    glun = llun.parent
    if arg.num_interrupts > uapi.CXLFLASH_MAX_NUM_INTERRUPTS:
        raise CxlFlashError(errno.EINVAL, f"num_interrupts {arg.num_interrupts} "
                            f"exceeds {uapi.CXLFLASH_MAX_NUM_INTERRUPTS}")
    reuse = bool(arg.hdr.flags & uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT)
    if not reuse and (arg.hdr.flags & 3) == 3:
        # Decision 16: access mode 3 would give a context with no access.
        raise CxlFlashError(errno.EINVAL, "access mode 3 in hdr.flags is not "
                            "O_RDONLY, O_WRONLY or O_RDWR")
    if glun.max_lba == 0:
        if (drv.afu.faults.take("read_capacity") or drv.afu.state != NORMAL
                or glun.backing is None):       # the LUN was deleted meanwhile
            raise CxlFlashError(errno.ENODEV, "READ CAPACITY(16) failed")
        glun.read_capacity()
    ctx = None
    if reuse:
        ctx = drv.get_context(arg.context_id, caller)
        if ctx is None:
            raise lookup_failed()
    try:
        if ctx is not None and ctx.lun_attached(llun):
            raise CxlFlashError(errno.EINVAL, "the LUN is already attached to this context")
        err = drv.afu.faults.take("sdev_get")
        if err:
            raise CxlFlashError(err, "cannot take a reference on the SCSI device")
        drv.afu.faults.check("alloc", "allocating the LUN access record")
        if reuse:
            with drv.ctx_tbl_lock:
                _still_in_superpipe_mode(sdev, llun)
                ctx.kref += 1
                ctx.luns.insert(0, LunAccess(llun, sdev))
                sdev.refs += 1
            arg.adap_fd = (1 << 64) - 1
            arg.hdr.return_flags = 0
        else:
            ctx = _new_context(drv, sdev, llun, arg, caller)
            arg.adap_fd = ctx.file.user_fd
            arg.hdr.return_flags = uapi.DK_CXLFLASH_APP_CLOSE_ADAP_FD
        if drv.afu.sq_mode:
            arg.hdr.return_flags |= uapi.DK_CXLFLASH_CONTEXT_SQ_CMD_MODE
        arg.context_id = ctx.ctxid
        arg.block_size = glun.blk_len
        arg.mmio_size = uapi.CXLFLASH_MMIO_SIZE
        arg.last_lba = glun.max_lba
        arg.max_xfer = (uapi.CXLFLASH_MAX_SECTORS * uapi.MAX_SECTOR_UNIT) // glun.blk_len
    finally:
        if ctx is not None and ctx.mutex.locked():
            ctx.mutex.release()


def _still_in_superpipe_mode(sdev, llun):
    """Under ``ctx_tbl_lock``: the disk is still in superpipe mode on
    ``llun`` and its LUN was not deleted since the dispatch looked.  LUN
    delete checks for attached contexts and unhooks the disk under the
    same lock, so an ATTACH either is seen by it (EBUSY) or fails here."""
    if sdev.llun is not llun or not sdev.present:
        raise CxlFlashError(errno.EINVAL, "superpipe mode is not enabled on this "
                            "disk (DK_CXLFLASH_MANAGE_LUN), or its LUN was deleted")


def _new_context(drv, sdev, llun, arg, caller):
    faults = drv.afu.faults
    faults.check("alloc", "allocating the context")
    with drv.ctx_tbl_lock:
        _still_in_superpipe_mode(sdev, llun)
        pe = drv.free_pe()
        if pe < 0 or faults.take("backend_context"):
            raise CxlFlashError(errno.ENODEV, f"no free context: all "
                                f"{drv.max_contexts} are in use")
        err = faults.take("start_work")
        if err:
            raise CxlFlashError(err, "the backend could not start the context")
        if faults.take("pe_range"):
            raise CxlFlashError(errno.EPERM, "the backend returned a PE outside 0..511")
        f = drv.new_adapter_file()
        try:
            faults.check("capability", "capability register readback")
        except CxlFlashError:
            drv.forget_file(f)
            os.close(f.user_fd)
            raise
        f.pe = pe
        ctx = CtxInfo(cookie=drv.new_cookie(), pe=pe, perms=(arg.hdr.flags + 1) & 3,
                      irqs=arg.num_interrupts, pid=caller.pid, rht_size=drv.rht_per_context)
        ctx.file = f
        ctx.luns.insert(0, LunAccess(llun, sdev))
        sdev.refs += 1
        ctx.initialized = True
        ctx.mutex.acquire()
        drv.ctx_tbl[pe] = ctx
        drv.ctx_by_pid.setdefault(ctx.pid, set()).add(ctx)
    return ctx


def detach(drv, sdev, disk, arg, caller):
    """DK_CXLFLASH_DETACH (spec §7)."""
    with drv.locked_context(arg.context_id, caller, sdev.llun,
                            ctrl=CTX_CTRL_ERR_FALLBACK) as ctx:
        drv.detach_lun(ctx, sdev.llun, caller)


# -- direct LUNs and release --------------------------------------------------


def user_direct(drv, sdev, disk, arg, caller):
    """DK_CXLFLASH_USER_DIRECT (spec §9)."""
    llun = sdev.llun
    if llun is None:             # disabled since the dispatch looked
        raise CxlFlashError(errno.EINVAL, "superpipe mode is not enabled on this "
                            "disk (DK_CXLFLASH_MANAGE_LUN)")
    glun = llun.parent
    glun.attach(MODE_PHYSICAL, sdev=sdev)
    with drv.locked_context(arg.context_id, caller, llun, undo=glun.detach) as ctx:
        try:
            h = ctx.table.open_direct(ctx.rht_perms, llun.lun_id[sdev.port],
                                      1 << sdev.port, glun.max_lba,
                                      fd=glun.backing_fd())
        except OSError as e:
            glun.detach()
            raise CxlFlashError(errno.EMFILE, e.strerror) from None
        ctx.rht_lun[h] = llun
        arg.hdr.return_flags = 0
        arg.last_lba = glun.max_lba
        arg.rsrc_handle = h
        err = drv.afu.sync(ctx.pe, h, AFU_LW_SYNC)
        if err:
            release_handle(drv, ctx, llun, h, force=True)
            raise CxlFlashError(err, "the AFU sync failed; the handle was released: retry")


def release(drv, sdev, disk, arg, caller):
    """DK_CXLFLASH_RELEASE (spec §13)."""
    with drv.locked_context(arg.context_id, caller, sdev.llun,
                            ctrl=CTX_CTRL_ERR_FALLBACK) as ctx:
        release_handle(drv, ctx, sdev.llun, vlun.rhndl(arg.rsrc_handle))


# -- VERIFY -------------------------------------------------------------------


def parse_sense(sense):
    """(key, asc, ascq) of 18 bytes of sense data (spec §15.1), or None."""
    code = sense[0] & 0x7F
    if (code & 0x70) != 0x70:
        return None
    if code >= 0x72:
        return sense[1] & 0x0F, sense[2], sense[3]
    eff = min(18, sense[7] + 8)
    return (sense[2] & 0x0F, sense[12] if eff > 12 else 0,
            sense[13] if eff > 13 else 0)


def verify(drv, sdev, disk, arg, caller):
    """DK_CXLFLASH_VERIFY (spec §15)."""
    llun = sdev.llun
    glun = llun.parent
    with drv.locked_context(arg.context_id, caller, llun) as ctx:
        rhndl = vlun.rhndl(arg.rsrc_handle)
        vlun.get_rhte(drv, ctx, rhndl, llun)
        if arg.hint & uapi.DK_CXLFLASH_VERIFY_HINT_SENSE:
            parsed = parse_sense(bytes(arg.sense_data))
            if parsed is None:
                raise CxlFlashError(errno.EINVAL, "sense data: response code is not "
                                    "0x70-0x7F")
            key, asc, _ = parsed
            if key == 0x6:
                if asc in (0x29, 0x2A):
                    if drv.afu.faults.take("read_capacity") or drv.afu.state != NORMAL:
                        raise CxlFlashError(errno.ENODEV, "READ CAPACITY(16) failed")
                    glun.read_capacity()
                    drv.follow_capacity(glun)
                elif asc != 0x3F:
                    raise CxlFlashError(errno.EIO, f"unit attention with ASC "
                                        f"0x{asc:02x} cannot be handled")
            elif key not in (0x0, 0x1, 0x2):
                raise CxlFlashError(errno.EIO, f"sense key 0x{key:x} is an error")
        if glun.mode == MODE_PHYSICAL:
            arg.last_lba = glun.max_lba
        elif glun.mode == MODE_VIRTUAL:
            arg.last_lba = vlun.last_lba_4k(ctx.table.lxt_count(rhndl), glun.blk_len)
        else:
            arg.last_lba = 0


# -- RECOVER_AFU --------------------------------------------------------------


def recover_afu(drv, sdev, disk, arg, caller):
    """DK_CXLFLASH_RECOVER_AFU (spec §16.3)."""
    afu = drv.afu
    llun = sdev.llun
    drv.recovery_threads += 1
    held = False
    try:
        # Only one recovery at a time; wait for it with the rwsem dropped.
        afu.rwsem.release_shared()
        try:
            held = afu.interruptible_acquire(drv.recovery_mutex)
        finally:
            afu.rwsem.acquire_shared()
        if not held:
            raise CxlFlashError(errno.EINTR, "interrupted waiting for another recovery")
        if afu.check_state():
            raise CxlFlashError(errno.ENODEV, "the adapter has failed")
        retries = 0
        while True:
            ctx = drv.get_context(arg.context_id, caller, llun, ctrl=CTX_CTRL_ERR_FALLBACK)
            if ctx is None:
                raise lookup_failed()
            try:
                if ctx.err_recovery_active:
                    try:
                        _recover_context(drv, ctx)
                    except CxlFlashError as e:
                        if e.errno != errno.ENODEV or not (
                                drv.recovery_threads > 1 or retries < 20):
                            raise
                        retries += 1
                    else:
                        arg.hdr.return_flags = (uapi.DK_CXLFLASH_APP_CLOSE_ADAP_FD |
                                                uapi.DK_CXLFLASH_RECOVER_AFU_CONTEXT_RESET)
                        if afu.sq_mode:
                            arg.hdr.return_flags |= uapi.DK_CXLFLASH_CONTEXT_SQ_CMD_MODE
                        arg.context_id = ctx.ctxid
                        arg.adap_fd = ctx.file.user_fd
                        arg.mmio_size = uapi.CXLFLASH_MMIO_SIZE
                        return
                    mailbox = False
                elif afu.faults.take("mailbox"):
                    # The master mailbox reads all-ones: the device is in
                    # error and its EEH handler is about to reset the AFU.
                    mailbox = True
                else:
                    return           # healthy: nothing to do, outputs unchanged
            finally:
                ctx.mutex.release()
            # Wait with the locks dropped, then look the context up again.
            afu.rwsem.release_shared()
            drv.recovery_mutex.release()
            held = False
            try:
                if mailbox:
                    time.sleep(drv.mailbox_retry_delay)
                    # The EEH handler resets the AFU -- unless a reset is
                    # already under way or the adapter has failed, which the
                    # state check below then reports (spec §16.3 step 5).
                    if afu.state == NORMAL:
                        drv.begin_reset()
                        drv.end_reset()
                else:
                    time.sleep(drv.recovery_retry_delay)
                held = afu.interruptible_acquire(drv.recovery_mutex)
            finally:
                afu.rwsem.acquire_shared()
            if not held:
                raise CxlFlashError(errno.EINTR, "interrupted during the recovery")
            if mailbox:
                rc = afu.check_state()
                if rc:
                    raise CxlFlashError(rc, "the adapter failed during the recovery"
                                        if rc == errno.ENODEV else
                                        "interrupted while the adapter was resetting")
    finally:
        if held:
            drv.recovery_mutex.release()
        drv.recovery_threads -= 1


def _recover_context(drv, ctx):
    """Give a context in error a new backend context, PE and adapter fd
    (spec §16.3 step 4); handles, LXTs and chunks are kept."""
    faults = drv.afu.faults
    with drv.ctx_tbl_lock:
        if faults.take("backend_context"):
            raise CxlFlashError(errno.ENODEV, "cannot create a new backend context")
        err = faults.take("start_work")
        if err:
            raise CxlFlashError(err, "the backend could not start the context")
        if faults.take("pe_range"):
            raise CxlFlashError(errno.EPERM, "the backend returned a PE outside 0..511")
        # The old PE is not free: the old backend context keeps it until
        # the user closes the old adapter fd (spec §16.3), so the context
        # gets a new PE and a new id.
        pe = drv.free_pe()
        if pe < 0:
            raise CxlFlashError(errno.ENODEV, "no free context for the recovery")
        f = drv.new_adapter_file()
        if faults.take("capability"):
            drv.forget_file(f)
            os.close(f.user_fd)
            raise CxlFlashError(errno.EAGAIN, "capability register readback mismatch")
        f.pe = pe
        ctx.pe = pe
        ctx.ctxid = encode_ctxid(ctx.cookie, pe)
        ctx.file = f                     # the old fd now finds no context
        drv.ctx_err_recovery.remove(ctx)
        drv.ctx_tbl[pe] = ctx
        ctx.err_recovery_active = False
        ctx.table.set_state(TABLE_LIVE)


# -- MANAGE_LUN ---------------------------------------------------------------


def manage_lun(drv, sdev, disk, arg, caller):
    """DK_CXLFLASH_MANAGE_LUN (spec §17).

    Deviation (issue 8): the kernel took the WWID on the caller's word; we
    know every LUN's identity, and a WWID that does not name the disk's own
    LUN is refused (EINVAL) -- re-pointing a disk at another WWID made a
    second allocator over the same backing store."""
    wwid = bytes(arg.wwid)
    if wwid != sdev.wwid:
        raise CxlFlashError(errno.EINVAL, f"WWID {wwid.hex()} does not name this "
                            f"disk's LUN: pass the disk's own WWID ({sdev.wwid.hex()})")
    flags = arg.hdr.flags
    if flags & uapi.DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE:
        drv.enable_superpipe(sdev, wwid)
    elif flags & uapi.DK_CXLFLASH_MANAGE_LUN_DISABLE_SUPERPIPE:
        drv.disable_superpipe(sdev, wwid)
    else:
        with drv.global_mutex:
            drv.find_or_create_llun(wwid)


# -- dispatch (spec §3) --------------------------------------------------------

HANDLERS = {
    uapi.DK_CXLFLASH_ATTACH: attach,
    uapi.DK_CXLFLASH_USER_DIRECT: user_direct,
    uapi.DK_CXLFLASH_RELEASE: release,
    uapi.DK_CXLFLASH_DETACH: detach,
    uapi.DK_CXLFLASH_VERIFY: verify,
    uapi.DK_CXLFLASH_RECOVER_AFU: recover_afu,
    uapi.DK_CXLFLASH_MANAGE_LUN: manage_lun,
    uapi.DK_CXLFLASH_USER_VIRTUAL: vlun.user_virtual,
    uapi.DK_CXLFLASH_VLUN_RESIZE: vlun.vlun_resize,
    uapi.DK_CXLFLASH_VLUN_CLONE: vlun.vlun_clone,
}
INTERNAL_LUN_REFUSED = {uapi.DK_CXLFLASH_RELEASE, uapi.DK_CXLFLASH_USER_VIRTUAL,
                        uapi.DK_CXLFLASH_VLUN_RESIZE, uapi.DK_CXLFLASH_VLUN_CLONE}
FAILTERM_ALLOWED = {uapi.DK_CXLFLASH_VLUN_RESIZE, uapi.DK_CXLFLASH_RELEASE,
                    uapi.DK_CXLFLASH_DETACH}


def disk_ioctl(drv, sdev, disk, request, arg, caller, reap=True):
    """One DK_* ioctl on ``sdev``: the pipeline of spec §3.  ``arg`` is the
    caller's buffer, updated only on success.  ``reap`` first runs the
    release path of adapter fds closed since the last call.

    ``disk`` (its ``flags``) is the node the ioctl is issued on.  We follow
    the sg node (what the block library opens): unless it was opened
    O_RDWR, every request is EPERM before it reaches the driver -- the sd
    node would never refuse."""
    afu = drv.afu
    if reap:
        drv.reap(caller)
    if disk is not None and (disk.flags & os.O_ACCMODE) != os.O_RDWR:
        # The sg node's rule (sg_ioctl: "read_only" unless O_RDWR), before
        # the request reaches the driver: every DK request, whatever the
        # access mode it asks for in hdr.flags.
        mode = "O_RDONLY" if (disk.flags & os.O_ACCMODE) == os.O_RDONLY else "O_WRONLY"
        raise CxlFlashError(errno.EPERM, f"the disk was opened {mode}: DK_CXLFLASH_* "
                            "ioctls need it opened O_RDWR, as on the sg node "
                            "(open_disk(..., flags=os.O_RDWR); a read-only context "
                            "is asked for in hdr.flags)")
    afu.rwsem.acquire_shared()
    try:
        if drv.closed:
            raise CxlFlashError(errno.ENODEV, "the adapter is closed")
        if drv.lun_mode and request in INTERNAL_LUN_REFUSED:
            raise CxlFlashError(errno.EINVAL, "the adapter is in internal-LUN mode: "
                                "only physical access is supported")
        handler = HANDLERS.get(request)
        if handler is None:
            raise CxlFlashError(errno.EINVAL, f"0x{request:08X} is not a "
                                "DK_CXLFLASH_* request")
        if request != uapi.DK_CXLFLASH_MANAGE_LUN:
            if sdev.llun is None:
                raise CxlFlashError(errno.EINVAL, "superpipe mode is not enabled on "
                                    "this disk (DK_CXLFLASH_MANAGE_LUN)")
            rc = afu.check_state()
            if rc == errno.ENODEV and request in FAILTERM_ALLOWED:
                rc = 0
            if rc:
                raise CxlFlashError(rc, "the adapter has failed" if rc == errno.ENODEV
                                    else "interrupted while the adapter was resetting")
            if sdev.llun is None:
                raise CxlFlashError(errno.EINVAL, "superpipe mode is not enabled on "
                                    "this disk (DK_CXLFLASH_MANAGE_LUN)")
        struct = copy_in(arg, uapi.DK_IOCTLS[request])
        check_header(struct.hdr)
        handler(drv, sdev, disk, struct, caller)
        copy_out(arg, struct)
    finally:
        afu.rwsem.release_shared()
