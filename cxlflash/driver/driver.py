"""The driver: the state one adapter shares between its contexts.

``Driver`` holds the context table and the error-recovery list, the LUN
records, the LUN table, the AFU, and the adapter fds it watches.  The ioctl
handlers live in ``superpipe.py`` (contexts, direct LUNs, release, verify,
recovery, LUN management), ``vlun.py`` (virtual LUNs: open, resize, clone)
and ``host.py`` (the host ioctls); this module is their common ground:
context lookup (spec §4), context teardown (§6.3, §7), the AFU reset (§16.1)
and the dispatch pipeline (§3).

Every entry point takes the caller's identity explicitly (``Caller``); the
driver never asks the OS who is calling.
"""
import contextlib
import errno
import itertools
import mmap
import os
import select
import struct
import threading

from .. import uapi
from .._core.tables import TABLE_IN_ERROR, TABLE_GONE, MC_CHUNK_SHIFT
from ..errors import CxlFlashError
from .afu import Afu, NORMAL, RESET, FAILTERM
from .context import (AdapterFile, MAX_CONTEXT, Caller, CTX_CTRL_CLONE, CTX_CTRL_ERR,
                      CTX_CTRL_ERR_FALLBACK, CTX_CTRL_NOPID, CTX_CTRL_FILE,
                      LockedContext, lookup_failed)
from .host import naa6_wwid
from .vlun import release_handle
from ..backing import MemoryBacking, FileBacking
from .lunmgt import (GlobalLun, LocalLun, LunTable, Sdev, MODE_NONE, MODE_VIRTUAL,
                  MODE_PHYSICAL, sam_lun_id)

class Driver:
    """One adapter's driver state (host + driver + AFU)."""

    def __init__(self, *, ports=2, max_contexts=512, rht_per_context=256,
                 port_max_luns=64, port_capacity=1 << 30, lun_mode=0,
                 sq_mode=False, lun_provision=True, afu_debug=True, directory=None):
        if not 1 <= ports <= 4:
            raise ValueError(f"an adapter has 1 to 4 FC ports, not {ports}")
        if not 1 <= max_contexts <= MAX_CONTEXT:
            raise ValueError(f"max_contexts must be 1..{MAX_CONTEXT}, got {max_contexts}")
        if rht_per_context not in (256, 4096) and not 1 <= rht_per_context <= 4096:
            raise ValueError("rht_per_context must be 1..4096")
        self.num_ports = ports
        self.max_contexts = max_contexts
        self.rht_per_context = rht_per_context
        self.port_max_luns = port_max_luns
        self.port_capacity = port_capacity          # 4K blocks per port
        self.lun_mode = lun_mode                    # internal_lun (sysfs lun_mode)
        self.afu = Afu(num_ports=ports, sq_mode=sq_mode,
                       lun_provision=lun_provision, debug=afu_debug)
        self.ctx_tbl = [None] * MAX_CONTEXT
        self.ctx_err_recovery = []
        self.ctx_tbl_lock = threading.Lock()
        self.recovery_mutex = threading.Lock()
        self.recovery_threads = 0
        self.recovery_retry_delay = 0.1            # seconds (kernel: 100 ms)
        self.mailbox_retry_delay = 1.0             # seconds (kernel: 1 s)
        self.global_mutex = threading.RLock()
        self.gluns = {}                             # wwid -> GlobalLun
        self.lluns = {}                             # wwid -> LocalLun
        self.sdevs = {}                             # (port, wwid) -> Sdev
        self.lun_table = LunTable(ports)
        # Where LUN_PROVISION creates LUNs (files there; None: memory), the
        # LUNs it made ({wwid: {"port", "size", "lun_id", "path"}}) and the
        # backing stores the driver opened and closes ({wwid: Backing}).
        self.directory = directory
        self.provisioned = {}
        self.backings = {}
        self._serial = 0
        # The live and in-error contexts of each process: {pid: set(ctx)}.
        self.ctx_by_pid = {}
        self.next_scsi_lun = 1
        self._cookies = itertools.count(0x1000)
        self._files = {}                            # driver fileno -> AdapterFile
        self._files_lock = threading.Lock()
        # Reaping is single-flight (see reap()).
        self._reap_lock = threading.Lock()
        self._epoll = select.epoll()
        # The reset epoch, in memory every client maps (a forked child by
        # inheritance, others from the memfd passed at connect): their
        # replicas of their contexts see the AFU resets (spec §16.1).
        self.epoch_fd = os.memfd_create("cxlflash-reset-epoch", os.MFD_CLOEXEC)
        os.ftruncate(self.epoch_fd, mmap.PAGESIZE)
        self.reset_epoch = mmap.mmap(self.epoch_fd, mmap.PAGESIZE)
        self.closed = False

    # -- LUNs and paths ----------------------------------------------------

    def new_wwid(self):
        """A WWID for a LUN this driver makes (NAA-6, unique per driver)."""
        with self.global_mutex:
            self._serial += 1
            return naa6_wwid(self._serial ^ (id(self) & 0xFFFF) << 20)

    def add_lun(self, backing, ports, wwid, *, owned=False):
        """Make ``backing`` a physical LUN visible on ``ports``.  ``owned``:
        the driver closes the backing store when the LUN is deleted or the
        driver closed."""
        glun = self._add_lun(backing, ports, wwid)
        if owned:
            self.backings[wwid] = backing
        return glun

    def provision(self, port, size_4k):
        """Create a LUN for HT_CXLFLASH_LUN_PROVISION -- a file in
        ``directory``, or memory -- and return ``(wwid, lun_id)``."""
        wwid = self.new_wwid()
        nbytes = size_4k * uapi.CXLFLASH_BLOCK_SIZE
        if self.directory is None:
            backing, path = MemoryBacking(nbytes), None
        else:
            path = os.path.join(self.directory, f"lun-{wwid.hex()}.img")
            backing = FileBacking(path, nbytes, create=True)
        self.add_lun(backing, (port,), wwid, owned=True)
        lun_id = sam_lun_id(self.sdev(wwid, port).scsi_lun)
        self.provisioned[wwid] = {"port": port, "size": size_4k, "lun_id": lun_id,
                                  "path": path}
        return wwid, lun_id

    def unprovision(self, wwid):
        """After a LUN delete took LUN ``wwid`` off the driver (remove_lun:
        nothing uses it any more): close its backing store, remove its
        file, forget it."""
        p = self.provisioned.pop(wwid)
        backing = self.backings.pop(wwid, None)
        if backing is not None:
            # No handle reaches the LUN any more (remove_lun refused the
            # delete otherwise, and every RELEASE took its table's write
            # lock).  Also wait for the transfers in flight through ANY
            # table: a data path kept from before a RELEASE whose handle
            # number was re-opened on another LUN still carries this fd.
            self.fence_tables(self.contexts())
            backing.close()
            if p["path"]:
                os.unlink(p["path"])

    @staticmethod
    def fence_tables(contexts):
        """Wait until no transfer is in flight through the contexts' tables
        (each table's write lock, taken and dropped)."""
        for c in contexts:
            with c.table.fence():
                pass

    def _add_lun(self, backing, ports, wwid):
        with self.global_mutex:
            if wwid in self.gluns and self.gluns[wwid].backing is not None:
                raise CxlFlashError(errno.EEXIST,
                                    f"a LUN with WWID {wwid.hex()} is already on this adapter")
            for p in ports:
                if not 0 <= p < self.num_ports:
                    raise CxlFlashError(
                        errno.EINVAL, f"port {p} does not exist: this adapter has "
                        f"ports 0..{self.num_ports - 1}")
            glun = self.gluns.get(wwid)
            if glun is None:
                glun = self.gluns[wwid] = GlobalLun(wwid, backing)
            glun.backing = backing
            scsi_lun = self.next_scsi_lun
            self.next_scsi_lun += 1
            for p in ports:
                self.sdevs[(p, wwid)] = Sdev(p, scsi_lun, wwid)
            return glun

    def sdev(self, wwid, port):
        s = self.sdevs.get((port, wwid))
        if s is None or not s.present:
            raise CxlFlashError(
                errno.ENODEV, f"no LUN with WWID {wwid.hex()} on port {port}")
        return s

    def glun_of(self, sdev):
        return self.gluns[sdev.wwid]

    def find_or_create_llun(self, wwid):
        """The adapter's llun for ``wwid`` (created, with its glun, if new)."""
        llun = self.lluns.get(wwid)
        if llun is None:
            self.afu.faults.check("alloc", "allocating the LUN record")
            glun = self.gluns.get(wwid)
            if glun is None:
                glun = self.gluns[wwid] = GlobalLun(wwid, None)
            llun = self.lluns[wwid] = LocalLun(glun, self.num_ports)
        return llun

    def enable_superpipe(self, sdev, wwid=None):
        """MANAGE_LUN ENABLE_SUPERPIPE for ``sdev`` (spec §17), by default
        under the device's own WWID."""
        with self.global_mutex:
            llun = self.find_or_create_llun(wwid or sdev.wwid)
            if llun.parent.backing is None:
                llun.parent.backing = self.gluns[sdev.wwid].backing
            llun.port_sel |= 1 << sdev.port
            llun.lun_id[sdev.port] = sam_lun_id(sdev.scsi_lun)
            sdev.llun = llun
            return llun

    def disable_superpipe(self, sdev, wwid=None):
        """MANAGE_LUN DISABLE_SUPERPIPE for ``sdev``: EBUSY while any handle
        on the LUN is open anywhere."""
        with self.global_mutex:
            llun = self.find_or_create_llun(wwid or sdev.wwid)
            # The mode check and the disable in one critical section with
            # lun_attach (GlobalLun.attach(sdev=...) checks sdev.llun under
            # the same mutex): a USER_VIRTUAL / USER_DIRECT racing us either
            # attached first (EBUSY here) or sees superpipe off (EINVAL).
            with llun.parent.mutex:
                if llun.parent.mode != MODE_NONE:
                    raise CxlFlashError(
                        errno.EBUSY, "the LUN has open resource handles: release "
                        "them before disabling superpipe mode")
                sdev.llun = None
            llun.port_sel &= ~(1 << sdev.port)
            if llun.port_sel == 0:
                self.lun_table.release(llun)

    # -- adapter fds --------------------------------------------------------

    def new_adapter_file(self):
        self.afu.faults.check("adapter_file", "creating the adapter file")
        f = AdapterFile()
        with self._files_lock:
            self._files[f.fileno] = f
            self._epoll.register(f.fileno, select.EPOLLRDHUP | select.EPOLLHUP)
        return f

    def forget_file(self, f):
        with self._files_lock:
            if self._files.get(f.fileno) is f:
                del self._files[f.fileno]
                try:
                    self._epoll.unregister(f.fileno)
                except (OSError, ValueError):
                    pass
        f.close_driver_side()

    def reap(self, caller):
        """Run the release path for every adapter fd whose last copy was
        closed since the last call (spec §6.3).

        Single-flight: one thread reaps at a time.  A second one waits for
        the first, then polls itself, so an fd closed before an ioctl
        started is released before that ioctl runs (as the kernel's
        close releases before it returns).  (Skipping instead left the
        releases to one thread while the others kept allocating: 4 threads
        cycling ATTACH/USER_VIRTUAL/close on a 32-chunk LUN then saw ENOSPC
        in 8549 of 14520 cycles.)

        An epoll event names an fd NUMBER, which a release frees for the
        next ATTACH to reuse, so the release is keyed on the file object:
        under ``_files_lock`` the file registered under that number must
        itself be hung up (its own socket says so), and it is taken out of
        the table there, so exactly one thread releases it and a new live
        file that reused the number is never touched."""
        released = []
        if not self._files or self.closed:
            return released
        self._reap_lock.acquire()
        try:
            try:
                events = self._epoll.poll(0)
            except (OSError, ValueError):          # closed under us
                return released
            for fileno, _ in events:
                with self._files_lock:
                    f = self._files.get(fileno)
                    if f is None or not f.hung_up():
                        continue
                    del self._files[fileno]
                    try:
                        self._epoll.unregister(fileno)
                    except (OSError, ValueError):
                        pass
                gone = self.release_file(f, caller)
                if gone is not None:
                    released.append(gone)
        finally:
            self._reap_lock.release()
        return released

    def release_file(self, f, caller):
        """The adapter fd's release (spec §6.3).  The closer of the last
        copy is taken to be the context's owner (we cannot see who closed
        it); the context is fenced (no transfer through it runs from here
        on), detached from every LUN and destroyed.  Returns
        ``(context_id, pid, chunks it held)``, or None when the fd held no
        context any more."""
        gone = None
        try:
            ctx = self.get_context(0, caller, file=f,
                                   ctrl=CTX_CTRL_ERR_FALLBACK | CTX_CTRL_FILE | CTX_CTRL_NOPID)
            if ctx is not None:
                try:
                    gone = (ctx.ctxid, ctx.pid, ctx.chunks_held())
                    ctx.table.set_state(TABLE_GONE)
                    self.afu.rwsem.acquire_shared()
                    try:
                        for la in list(ctx.luns):
                            self.detach_lun(ctx, la.llun, caller)
                    finally:
                        self.afu.rwsem.release_shared()
                finally:
                    ctx.mutex.release()
        finally:
            self.forget_file(f)
        return gone

    # -- contexts -------------------------------------------------------------

    def free_pe(self):
        """The lowest free PE below max_contexts, or -1.  A PE stays in use
        while an adapter file holds its backend context: after RECOVER_AFU
        the old fd keeps the old PE until it is closed (spec §16.3, §6.3)."""
        with self._files_lock:
            held = {f.pe for f in self._files.values() if f.pe is not None}
        for pe in range(self.max_contexts):
            if pe not in held and self.ctx_tbl[pe] is None and not any(
                    c.pe == pe for c in self.ctx_err_recovery):
                return pe
        return -1

    def new_cookie(self):
        return next(self._cookies) & 0xFFFFFFFF or 1

    def find_context(self, context_id=None, *, pe=None):
        """The live or in-error context with ``context_id`` (or at PE
        ``pe``), or None: a record for reporting and for the data path's
        checks (the ioctls use :meth:`get_context`, which locks it and
        checks its owner)."""
        with self.ctx_tbl_lock:
            if pe is None:
                pe = context_id & 0xFFFFFFFF
            ctx = self.ctx_tbl[pe] if 0 <= pe < len(self.ctx_tbl) else None
            if ctx is not None and (context_id is None or ctx.ctxid == context_id):
                return ctx
            return next((c for c in self.ctx_err_recovery
                         if (c.pe == pe if context_id is None else c.ctxid == context_id)),
                        None)

    def locked_context(self, rctxid, caller, llun=None, *, ctrl=0, why=None,
                       undo=None):
        """``with drv.locked_context(rctxid, caller, llun) as ctx:`` the
        context :meth:`get_context` finds, locked for the block; EINVAL
        (``why``, after ``undo()``) when there is none the caller may use."""
        ctx = self.get_context(rctxid, caller, llun, ctrl=ctrl)
        if ctx is None:
            if undo is not None:
                undo()
            raise lookup_failed(why)
        return LockedContext(ctx)

    def get_context(self, rctxid, caller, llun=None, *, file=None, ctrl=0):
        """Find a context by its id as the user gave it (``rctxid``, the
        kernel's name; compared with each ``CtxInfo.ctxid``) and lock it
        (spec §4); None when not found, not the caller's, or the LUN is
        not attached.  The caller releases ``ctx.mutex``."""
        pe = rctxid & 0xFFFFFFFF
        by_file = bool(ctrl & CTX_CTRL_FILE)
        if not by_file and pe >= MAX_CONTEXT:
            return None
        while True:
            with self.ctx_tbl_lock:
                ctx = None
                if by_file:
                    ctx = next((c for c in self.ctx_tbl if c is not None and c.file is file), None)
                else:
                    c = self.ctx_tbl[pe]
                    if c is not None and c.ctxid == rctxid:
                        ctx = c
                if (ctrl & CTX_CTRL_ERR) or (ctx is None and ctrl & CTX_CTRL_ERR_FALLBACK):
                    ctx = next((c for c in self.ctx_err_recovery
                                if (by_file and c.file is file) or
                                (not by_file and c.ctxid == rctxid)), None)
                if ctx is None:
                    return None
            ctx.mutex.acquire()
            # The context may have changed while we waited for it.
            with self.ctx_tbl_lock:
                still = (not ctx.removed and
                         (ctx in self.ctx_err_recovery or self.ctx_tbl[ctx.pe] is ctx) and
                         (by_file and ctx.file is file or not by_file and ctx.ctxid == rctxid))
            if still:
                break
            ctx.mutex.release()
            if ctx.removed:
                return None
        if not ctrl & CTX_CTRL_NOPID:
            owner = caller.ppid if ctrl & CTX_CTRL_CLONE else caller.pid
            if ctx.pid != owner:
                ctx.mutex.release()
                return None
        if llun is not None and not by_file and not ctx.lun_attached(llun):
            ctx.mutex.release()
            return None
        return ctx

    def destroy_context(self, ctx):
        """Remove a context whose last LUN was detached (spec §7 step 4).
        Its table is fenced: this returns after the last transfer through
        it has ended, and none starts again (AFU rc 0x21)."""
        with self.ctx_tbl_lock:
            ctx.removed = True
            if self.ctx_tbl[ctx.pe] is ctx:
                self.ctx_tbl[ctx.pe] = None
            if ctx in self.ctx_err_recovery:
                self.ctx_err_recovery.remove(ctx)
            mine = self.ctx_by_pid.get(ctx.pid)
            if mine is not None:
                mine.discard(ctx)
                if not mine:
                    del self.ctx_by_pid[ctx.pid]
        ctx.table.set_state(TABLE_GONE)
        # The adapter file -- and the PE of its backend context -- stay
        # until the user closes fd2 (APP_CLOSE_ADAP_FD, spec §7).

    def detach_lun(self, ctx, llun, caller):
        """DETACH of one LUN from a locked context (spec §7 steps 2-5)."""
        for h in list(ctx.table.open_handles()):
            if ctx.rht_lun[h] is llun:
                release_handle(self, ctx, llun, h, force=True)
        for la in ctx.luns:
            if la.llun is llun:
                ctx.luns.remove(la)
                if la.sdev is not None and la.counted:
                    la.sdev.refs -= 1
                break
        ctx.kref -= 1
        if ctx.kref <= 0:
            self.destroy_context(ctx)

    # -- the AFU state machine (spec §16.1) ----------------------------------------

    def mark_all_contexts_in_error(self):
        """Every live context goes into error (spec §16.1).  Each table is
        fenced: this returns after every transfer through them has ended,
        and from then on their data paths raise AdapterResetError."""
        with self.ctx_tbl_lock:
            moved = []
            for pe, ctx in enumerate(self.ctx_tbl):
                if ctx is not None:
                    self.ctx_tbl[pe] = None
                    ctx.err_recovery_active = True
                    self.ctx_err_recovery.append(ctx)
                    moved.append(ctx)
        for ctx in moved:
            ctx.table.set_state(TABLE_IN_ERROR)   # MMIO reads all-ones

    @property
    def epoch(self):
        try:
            return struct.unpack_from("<Q", self.reset_epoch, 0)[0]
        except ValueError:                  # closed with the driver
            return self._epoch_closed

    def _drain_and_mark_in_error(self):
        """Drain the ioctls under way (the rwsem taken exclusively), put
        every context in error and move the reset epoch on, so forked
        children's data paths see it too."""
        self.afu.rwsem.acquire_exclusive()
        try:
            self.mark_all_contexts_in_error()
            struct.pack_into("<Q", self.reset_epoch, 0, self.epoch + 1)
        finally:
            self.afu.rwsem.release_exclusive()

    def begin_reset(self):
        """Start an AFU reset: state RESET, drain ioctls, put every context
        in error.  Ioctls wait until :meth:`end_reset`."""
        self.afu.set_state(RESET)
        self._drain_and_mark_in_error()
        self.afu.counters["resets"] += 1

    def end_reset(self, ok=True):
        """Finish the reset: the AFU is re-initialised (LUN tables
        re-programmed) and the state becomes NORMAL, or FAILTERM."""
        if ok:
            with self.global_mutex:
                self.lun_table.restore(self.lluns.values())
        self.afu.set_state(NORMAL if ok else FAILTERM)

    def fail(self):
        """Permanent failure: FAILTERM, every context in error."""
        self.afu.set_state(FAILTERM)
        self._drain_and_mark_in_error()

    def contexts(self):
        """Every context of the driver, live or in error (a snapshot)."""
        with self.ctx_tbl_lock:
            return [c for c in self.ctx_tbl if c is not None] + list(self.ctx_err_recovery)

    def follow_capacity(self, glun):
        """After VERIFY re-read ``glun``'s capacity: the direct handles on
        its backing store, in every context, end where the LUN now ends
        (as the device refuses LBAs beyond its capacity).  The handles are
        found by the backing fd each was opened on, under each table's
        lock, so no context mutex is needed."""
        fd = glun.backing_fd()
        for ctx in self.contexts():
            ctx.table.follow_capacity(fd, glun.max_lba)

    def fence_backing(self, glun, *, force=False):
        """Make sure no transfer through any table of this driver reaches
        ``glun``'s backing store, now or later: call it before its fd is
        closed (or the LUN deleted), after making the LUN unreachable for
        new opens (superpipe disabled / LUN gone from the host).

        A transfer needs an open handle on the LUN, and closing or
        shrinking a handle already waits for the transfers through it.  So
        only the contexts that still have a handle open on ``glun`` matter:
        without ``force`` they are refused with EBUSY (nothing changes);
        with ``force`` each such context's table is set TABLE_GONE -- this
        returns after every transfer through it has ended, and none starts
        again (AFU rc 0x21).  Returns the number of tables fenced."""
        reaching = [c for c in self.contexts()
                    if any(l is not None and l.parent is glun for l in c.rht_lun)]
        if reaching and not force:
            raise CxlFlashError(errno.EBUSY, f"LUN {glun.wwid.hex()} has resource "
                                f"handles open in {len(reaching)} context(s): release "
                                "them first")
        for ctx in reaching:
            ctx.table.set_state(TABLE_GONE)
        return len(reaching)

    def _lun_in_use(self, wwid, glun, sdevs):
        """Why LUN ``wwid`` cannot be deleted now (a phrase), or None.
        Called with ``ctx_tbl_lock`` (and the glun's mutex) held: ATTACH
        adds its LUN access under the same lock, a handle open takes a
        LUN user under the glun's mutex."""
        ctxs = [c for c in self.ctx_tbl if c is not None] + self.ctx_err_recovery
        if glun is not None and (glun.mode != MODE_NONE or glun.users or any(
                l is not None and l.parent is glun for c in ctxs for l in c.rht_lun)):
            return f"{glun.users} resource handle(s) are open on it"
        attached = [c for c in ctxs if any(la.llun.wwid == wwid for la in c.luns)]
        if attached or any(s.refs for s in sdevs):
            return f"{len(attached)} context(s) have it attached"
        return None

    def remove_lun(self, wwid, commit=None):
        """LUN delete: forget every record of LUN ``wwid`` -- its SCSI
        devices (so superpipe mode goes with them), its llun (and LUN-table
        slot) and its glun.

        Deviation (the kernel sent the AFU command whatever the LUN's
        state): EBUSY while a resource handle is open on it or a context
        has it attached; a LUN merely in superpipe mode is deleted.  The
        check, ``commit()`` (the AFU command; it may raise, changing
        nothing) and the unhooking of the disks are one critical section
        with the handle opens (glun mutex) and ATTACH (``ctx_tbl_lock``)."""
        with self.global_mutex:
            glun = self.gluns.get(wwid)
            llun = self.lluns.get(wwid)
            keys = [k for k in self.sdevs if k[1] == wwid]
            sdevs = [self.sdevs[k] for k in keys]
            with (glun.mutex if glun is not None else contextlib.nullcontext()):
                with self.ctx_tbl_lock:
                    why = self._lun_in_use(wwid, glun, sdevs)
                    if why:
                        raise CxlFlashError(errno.EBUSY, f"LUN {wwid.hex()} is in use "
                                            f"({why}): release its handles and detach "
                                            "its contexts first")
                    if commit is not None:
                        commit()
                    for s in sdevs:
                        s.llun = None
                        s.present = False
                if glun is not None:
                    glun.backing = None
            for k in keys:
                del self.sdevs[k]
            if llun is not None:
                llun.port_sel = 0
                self.lun_table.release(llun)
                del self.lluns[wwid]
            if glun is not None:
                del self.gluns[wwid]

    def close(self):
        """Tear the driver down: every context is fenced and made unusable.

        Returns only after every transfer through any of its tables has
        ended; no transfer starts afterwards (AFU rc 0x21), no ioctl runs
        (ENODEV).  Only then may the caller close the backing stores."""
        if self.closed:
            return
        self.afu.rwsem.acquire_exclusive()      # drain the ioctls under way
        try:
            if self.closed:
                return
            self.closed = True
            for ctx in self.contexts():
                ctx.table.set_state(TABLE_GONE)
        finally:
            self.afu.rwsem.release_exclusive()
        with self._reap_lock:                   # a reaper under way finishes first
            with self._files_lock:
                files = list(self._files.values())
            for f in files:
                self.forget_file(f)
            self._epoll.close()
        # Every table is fenced: no transfer can reach these any more.
        for b in self.backings.values():
            b.close()
        self.backings.clear()
        os.close(self.epoch_fd)
        self.epoch_fd = -1
        self._epoch_closed = self.epoch
        try:
            self.reset_epoch.close()        # (mmap keeps a descriptor of its own)
        except BufferError:                 # a table of this process still watches it
            pass

    # -- reporting ----------------------------------------------------------------

    def status(self):
        """What ``cxlflash ctl`` shows: the LUNs, the contexts, counters
        (plain data, JSON-ready)."""
        modes = {MODE_NONE: "none", MODE_VIRTUAL: "virtual", MODE_PHYSICAL: "physical"}
        luns = []
        with self.global_mutex:
            for wwid, glun in list(self.gluns.items()):
                if glun.backing is None:
                    continue
                alloc = glun.allocator
                # The store's own capacity: READ CAPACITY may not have run
                # yet (it runs at the first ATTACH), and VERIFY follows it.
                block_size = glun.backing.block_size
                blocks = glun.backing.size // block_size
                luns.append({
                    "wwid": wwid.hex(), "block_size": block_size,
                    "max_lba": max(blocks - 1, 0), "size": blocks * block_size,
                    "mode": modes.get(glun.mode, str(glun.mode)),
                    "ports": sorted(p for (p, w) in self.sdevs if w == wwid),
                    "users": glun.users,
                    "chunks_total": (alloc.limit if alloc is not None
                                     else blocks >> MC_CHUNK_SHIFT),
                    "chunks_free": (alloc.space() if alloc is not None
                                    else blocks >> MC_CHUNK_SHIFT),
                    "path": getattr(glun.backing, "path", None)})
        contexts = []
        for c in self.contexts():
            contexts.append({
                "context_id": c.ctxid, "pid": c.pid,
                "luns": [la.llun.wwid.hex() for la in c.luns],
                "handles": c.table.rht_out, "chunks": c.chunks_held(),
                "in_error": bool(c.err_recovery_active)})
        provisioned = {w.hex(): dict(p) for w, p in list(self.provisioned.items())}
        return {"state": self.afu.state, "ports": self.num_ports, "luns": luns,
                "contexts": contexts, "provisioned": provisioned,
                "counters": dict(self.afu.counters)}


__all__ = ["Driver", "Caller"]
