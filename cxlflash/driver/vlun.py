"""Virtual LUNs (the kernel's vlun.c): USER_VIRTUAL (spec §10),
VLUN_RESIZE (§11) and VLUN_CLONE (§14)."""
import errno

from .. import uapi
from .._core.datapath import scrub_chunks
from ..errors import CxlFlashError
from .afu import AFU_LW_SYNC, AFU_HW_SYNC
from .context import LunAccess
from .context import CTX_CTRL_CLONE, CTX_CTRL_ERR_FALLBACK
from .._core.tables import MC_CHUNK_SHIFT
from .lunmgt import MODE_VIRTUAL, MODE_PHYSICAL

U64 = (1 << 64) - 1


def chunks_for(req_size, blk_len):
    """4K blocks -> chunks (spec §11.1), with the kernel's u64 wrap."""
    nsectors = ((req_size * uapi.CXLFLASH_BLOCK_SIZE) & U64) // blk_len
    return -(-nsectors >> MC_CHUNK_SHIFT)


def last_lba_4k(nchunks, blk_len):
    """The vLUN's last LBA in 4K blocks; 2**64-1 when empty."""
    return (((nchunks << MC_CHUNK_SHIFT) * blk_len) // uapi.CXLFLASH_BLOCK_SIZE - 1) & U64


def _lxt_groups(n):
    return -(-n // 8)


def rhndl(rsrc_handle):
    """The resource handle the kernel sees in a u64 ``rsrc_handle``: the
    low 32 bits (``res_hndl_t`` is u32, sislite.h), so 2**32 + h names
    handle h in RESIZE, RELEASE and VERIFY (and in the AFU's IOARCB)."""
    return rsrc_handle & 0xFFFFFFFF


def get_rhte(drv, ctx, handle, llun):
    """Validate a resource handle of a context (spec §11.2 step 3)."""
    if (handle >= ctx.table.rht_size or ctx.rht_lun[handle] is not llun
            or not ctx.table.is_open(handle)):
        raise CxlFlashError(errno.EINVAL, f"resource handle {handle} is not open "
                            "in this context on this LUN")


def grow(drv, ctx, llun, handle, new):
    glun = llun.parent
    alloc = glun.allocator
    cur = ctx.table.lxt_count(handle)
    avail = alloc.space()
    if avail == 0:
        raise CxlFlashError(errno.ENOSPC, "the LUN has no free chunk")
    # Best effort: fewer chunks than asked when fewer are free.  The LXT
    # group count is that of the clamped size (spec §11.3 steps 2-3): a
    # clamped grow within the current group allocates no LXT.
    delta = min(new - cur, avail)
    if _lxt_groups(cur + delta) != _lxt_groups(cur):
        drv.afu.faults.check("alloc", "allocating the LXT")
    try:
        added = ctx.table.grow_from(handle, alloc, delta, llun.lun_index, llun.port_sel)
    except MemoryError:
        raise CxlFlashError(errno.ENOMEM, "cannot allocate the LXT") from None
    if added == 0:
        raise CxlFlashError(errno.ENOSPC, "the LUN has no free chunk")
    if drv.afu.sync(ctx.pe, handle, AFU_LW_SYNC):
        return errno.EAGAIN
    return 0


def drop_chunks(glun, auns, scrub):
    """Drop one reference of each chunk in ``auns`` (spec §12.3).

    The decision which chunks lost their last reference is made in one
    critical section of the allocator (``release_many``), which returns
    them still allocated: they are scrubbed when ``scrub`` (decision 6:
    the chunk itself), and only then freed.  So no concurrent clone or
    release can make a chunk go unscrubbed, be scrubbed while still
    shared, or be handed out before it is clean.  If the scrub fails the
    chunks stay allocated (never reused with their data) and the error is
    raised."""
    if not len(auns):
        return
    alloc = glun.allocator
    last = alloc.release_many(auns)
    if not len(last):
        return
    if scrub:
        try:
            scrub_chunks(glun.backing.fd, glun.backing.zero_mode, last, glun.blk_len)
        except OSError as e:
            raise CxlFlashError(e.errno or errno.EIO, f"scrubbing {len(last)} freed "
                                f"chunk(s) failed ({e.strerror or e}); they stay "
                                "allocated so their data is never handed out") from None
    alloc.free_many(last)


def shrink(drv, ctx, llun, handle, new):
    glun = llun.parent
    cur = ctx.table.lxt_count(handle)
    if new and _lxt_groups(new) != _lxt_groups(cur):
        drv.afu.faults.check("alloc", "allocating the LXT")
    # The core's shrink takes the table's write lock: the transfers through
    # the handle have ended, and none can reach the dropped chunks again.
    auns = ctx.table.shrink(handle, new)
    rc = 0
    if not ctx.err_recovery_active and drv.afu.sync(ctx.pe, handle, AFU_HW_SYNC):
        rc = errno.EAGAIN
    drop_chunks(glun, auns, ctx.rht_needs_ws[handle])
    return rc


def resize(drv, ctx, llun, handle, req_size):
    """The internal resize (spec §11.2 step 4-5): (rc, last_lba).  rc is 0
    or EAGAIN (the change is kept); ENOSPC/ENOMEM raise, changing nothing."""
    glun = llun.parent
    new = chunks_for(req_size, glun.blk_len)
    cur = ctx.table.lxt_count(handle)
    if new > cur:
        rc = grow(drv, ctx, llun, handle, new)
    elif new < cur:
        rc = shrink(drv, ctx, llun, handle, new)
    else:
        rc = errno.EAGAIN if drv.afu.sync(ctx.pe, handle, AFU_HW_SYNC) else 0
    return rc, last_lba_4k(ctx.table.lxt_count(handle), glun.blk_len)


def user_virtual(drv, sdev, disk, arg, caller):
    """DK_CXLFLASH_USER_VIRTUAL (spec §10.1)."""
    llun = sdev.llun
    if llun is None:             # disabled since the dispatch looked
        raise CxlFlashError(errno.EINVAL, "superpipe mode is not enabled on this "
                            "disk (DK_CXLFLASH_MANAGE_LUN)")
    glun = llun.parent
    with glun.mutex:
        created = False
        claim = getattr(glun.backing, "claim_virtual", None)
        if claim is not None and glun.mode != MODE_PHYSICAL:
            # An RBD image: one allocator per image, whichever host runs
            # it -- EBUSY naming the holder (kept until the LUN goes).
            claim()
        if glun.mode == 0:
            glun.init_allocator()
            created = True
        try:
            glun.attach(MODE_VIRTUAL, locked=True, sdev=sdev)
        except CxlFlashError:
            if created:
                glun.allocator = None
            raise
    try:
        with drv.global_mutex:
            drv.lun_table.assign(llun)
    except CxlFlashError:
        glun.detach()
        raise
    with drv.locked_context(arg.context_id, caller, llun, undo=glun.detach) as ctx:
        try:
            h = ctx.table.open_virtual(ctx.rht_perms, fd=glun.backing_fd())
        except OSError as e:
            glun.detach()
            raise CxlFlashError(errno.EMFILE, e.strerror) from None
        ctx.rht_lun[h] = llun
        # Set before the first chunk is mapped, so a rollback scrubs too.
        ctx.rht_needs_ws[h] = bool(arg.hdr.flags &
                                   uapi.DK_CXLFLASH_UVIRTUAL_NEED_WRITE_SAME)

        def undo_open():
            # Decision 7: a failed open frees what it grew.
            try:
                drop_chunks(glun, ctx.table.shrink(h, 0), ctx.rht_needs_ws[h])
            finally:
                ctx.table.close(h)
                ctx.rht_lun[h] = None
                ctx.rht_needs_ws[h] = False
                glun.detach()

        try:
            rc, last_lba = resize(drv, ctx, llun, h, arg.lun_size)
        except CxlFlashError:
            undo_open()
            raise
        if rc:
            undo_open()
            raise CxlFlashError(rc, "the AFU sync after the initial resize failed; "
                                "the open was rolled back: retry")
        arg.hdr.return_flags = 0
        if bin(llun.port_sel & 0xF).count("1") > 1:
            arg.hdr.return_flags |= uapi.DK_CXLFLASH_ALL_PORTS_ACTIVE
        arg.last_lba = last_lba
        arg.rsrc_handle = h


def vlun_resize(drv, sdev, disk, arg, caller):
    """DK_CXLFLASH_VLUN_RESIZE (spec §11)."""
    llun = sdev.llun
    if llun.parent.mode != MODE_VIRTUAL:
        raise CxlFlashError(errno.EINVAL, "the LUN is not in virtual mode")
    with drv.locked_context(arg.context_id, caller, llun,
                            ctrl=CTX_CTRL_ERR_FALLBACK) as ctx:
        h = rhndl(arg.rsrc_handle)
        get_rhte(drv, ctx, h, llun)
        rc, last_lba = resize(drv, ctx, llun, h, arg.req_size)
        arg.hdr.return_flags = 0
        arg.last_lba = last_lba
        if rc:
            raise CxlFlashError(rc, "the AFU sync failed; the new size is in effect: "
                                "resize again to the same size to repair")


def vlun_clone(drv, sdev, disk, arg, caller):
    """DK_CXLFLASH_VLUN_CLONE (spec §14; decisions 9 and 10)."""
    llun = sdev.llun
    if arg.context_id_src == arg.context_id_dst:
        raise CxlFlashError(errno.EINVAL, "source and destination contexts are the same")
    if llun.parent.mode != MODE_VIRTUAL:
        raise CxlFlashError(errno.EINVAL, "the LUN is not in virtual mode")
    with drv.locked_context(arg.context_id_src, caller, llun, ctrl=CTX_CTRL_CLONE,
                            why="the source context is not owned by this process's "
                                "parent, or does not have this LUN attached") as src, \
            drv.locked_context(arg.context_id_dst, caller, llun,
                               why="the destination context is not this process's, "
                                   "or does not have this LUN attached") as dst:
        _clone(drv, src, dst, caller, release_handle)


def _clone(drv, src, dst, caller, release_handle):
    if dst.table.rht_out:
        raise CxlFlashError(errno.EINVAL, "the destination context has open handles")
    side = []
    for la in src.luns:
        if not any(d.sdev is la.sdev or d.llun is la.llun for d in dst.luns + side):
            drv.afu.faults.check("alloc", "copying the LUN access list")
            side.append(LunAccess(la.llun, la.sdev))
    done = []
    for h in src.table.open_handles():
        slot_llun = src.rht_lun[h]
        glun = slot_llun.parent
        virtual = src.table.is_virtual(h)
        # Decision 10 (issue 8): the clone carries the scrub flag, so the
        # chunks it shares are scrubbed whichever side lets them go last.
        needs_ws = src.rht_needs_ws[h]
        err = None
        if virtual and src.table.lxt_count(h):
            try:
                drv.afu.faults.check("alloc", "allocating the LXT")
            except CxlFlashError:
                err = errno.ENOMEM
        if err is None:
            try:
                # One pass: the LXT copy raises the clone counts as it goes,
                # all or none, under the allocator's mutex (spec §14.4).
                dst.table.clone_slot(src.table, h, dst.rht_perms,
                                     glun.allocator if virtual else None)
            except MemoryError:
                err = errno.ENOMEM
            except OSError as e:         # a chunk not allocated, or at 255 clones
                if e.errno != errno.EIO:
                    raise
                err = errno.EIO
        if err is None:
            dst.rht_lun[h] = slot_llun
            dst.rht_needs_ws[h] = needs_ws
            if virtual and drv.afu.sync(dst.pe, h, AFU_LW_SYNC):
                try:
                    drop_chunks(glun, dst.table.close(h), needs_ws)
                finally:
                    dst.rht_lun[h] = None
                    dst.rht_needs_ws[h] = False
                err = errno.EAGAIN
        if err is not None:
            for j in done:
                release_handle(drv, dst, dst.rht_lun[j], j, force=True)
            raise CxlFlashError(err, {
                errno.ENOMEM: "out of memory while cloning an LXT",
                errno.EIO: f"handle {h}: a chunk is not allocated or already has "
                           "255 clones",
                errno.EAGAIN: "the AFU sync failed; the clone was rolled back: retry",
            }[err])
        glun.attach(MODE_VIRTUAL if virtual else MODE_PHYSICAL)
        done.append(h)
    # Decision 10: the copied LUN attachments are real attachments.
    for la in side:
        dst.luns.insert(0, la)
        dst.kref += 1
        if la.sdev is not None:
            la.sdev.refs += 1


# -- RELEASE (superpipe.c's _cxlflash_disk_release; here because DETACH,
# clone rollbacks and the release path all need it) --------------------------


def release_handle(drv, ctx, llun, handle, force=False):
    """The internal RELEASE (spec §13 steps 2-6) on a locked context.

    ``force`` (DETACH, rollbacks; decision 21) checks the handle in even if
    the resize to 0 reports a failed sync.
    """
    get_rhte(drv, ctx, handle, llun)
    glun = llun.parent
    if glun.mode == MODE_VIRTUAL:
        rc, _ = resize(drv, ctx, llun, handle, 0)
        if rc and not force:
            raise CxlFlashError(rc, "the AFU sync failed; the handle is still open "
                                "with size 0: release it again")
    elif glun.mode == MODE_PHYSICAL:
        if not ctx.err_recovery_active:
            drv.afu.sync(ctx.pe, handle, AFU_HW_SYNC)
    else:
        return
    # The core's close takes the table's write lock: the transfers through
    # the handle have ended before its chunks change hands.
    leftover = ctx.table.close(handle)
    try:
        if len(leftover) and glun.allocator is not None:
            drop_chunks(glun, leftover, ctx.rht_needs_ws[handle])
    finally:
        ctx.rht_lun[handle] = None
        ctx.rht_needs_ws[handle] = False
        glun.detach()
