"""The client's side of the shared driver: a forked child's adapter.

Ioctls go to the owner; replies bring the structure back, any new adapter
fd, and a replica of each of the client's contexts, which the data path
uses in this process against the backing stores (inherited at fork, or
received from the owner).
"""
import contextlib
import ctypes
import errno
import os
import threading

from .. import uapi
from .._core.tables import ResourceTable, TABLE_LIVE, TABLE_IN_ERROR, TABLE_GONE
from ..driver.core import copy_out
from ..errors import CxlFlashError
from . import protocol


class _BackingView:
    def __init__(self, fd, zero_mode, block_size):
        self.fd = fd
        self.zero_mode = zero_mode
        self.block_size = block_size


class _GlunView:
    def __init__(self, wwid, backing, blk_len, max_lba):
        self.wwid = wwid
        self.backing = backing
        self.blk_len = blk_len
        self.max_lba = max_lba


class _LunView:
    def __init__(self, parent):
        self.parent = parent


class ReplicaContext:
    """A client's view of one of its contexts: what the data path needs.
    Updated in place, so data paths bound to its table stay valid."""

    def __init__(self, ctxid, record, backing_of, epoch_buffer):
        self.ctxid = ctxid
        self.pid = record["pid"]
        self.table = ResourceTable(record["rht_size"])
        self.rht_lun = [None] * record["rht_size"]
        self._slots = {}
        self.update(record, backing_of, epoch_buffer)

    def update(self, record, backing_of, epoch_buffer):
        self.err_recovery_active = record["in_error"]
        self.table.set_state(TABLE_IN_ERROR if self.err_recovery_active else TABLE_LIVE)
        # Until the next snapshot, an AFU reset in the owner shows here.
        self.table.watch_epoch(epoch_buffer, record["epoch"])
        new = {slot[0]: slot for slot in record["slots"]}
        for h in list(self._slots):
            if h not in new:
                self.table.close(h)
                self.rht_lun[h] = None
                del self._slots[h]
        for h, slot in new.items():
            old = self._slots.get(h)
            if old is not None and _same_slot(old, slot):
                continue
            (_, fmt, perms, nmask, lxt, lun_id, last_lba, valid,
             wwid, blk_len, max_lba) = slot
            backing = backing_of(wwid)
            self.table.load_slot(h, fmt, perms, nmask, lxt, lun_id, last_lba, valid,
                                 replace=old is not None,
                                 fd=backing.fd if backing is not None else -1)
            self.rht_lun[h] = _LunView(_GlunView(wwid, backing, blk_len, max_lba))
            self._slots[h] = slot

    def retire(self):
        """No transfer through this replica runs after this returns."""
        self.table.set_state(TABLE_GONE)


def _same_slot(a, b):
    if a[:4] != b[:4] or a[5:] != b[5:]:
        return False
    if a[4] is None or b[4] is None:
        return a[4] is b[4]
    return len(a[4]) == len(b[4]) and bool((a[4] == b[4]).all())


#: Requests that can unmap chunks of a context: while one is under way (and
#: its reply is applied) the context's replica does no I/O, so no transfer
#: of this process uses a chunk after the owner has freed it (the kernel
#: syncs the AFU before it frees; this is that sync).
UNMAPPING_IOCTLS = {uapi.DK_CXLFLASH_RELEASE, uapi.DK_CXLFLASH_VLUN_RESIZE,
                    uapi.DK_CXLFLASH_DETACH}


class Remote:
    """The connection of a forked child to its parent's driver.

    One request at a time: ``lock`` (re-entrant) is held across the round
    trip AND the application of the reply's snapshot, so the replicas move
    in the order the owner answered, and a later snapshot is never
    overwritten by an older one (``_seq`` checks it too).  Lock order:
    ``lock``, then a replica table's fence (never the other way)."""

    def __init__(self, sock, adapter, owner_pid):
        self.sock = sock
        self.adapter = adapter
        self.owner_pid = owner_pid
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.replicas = {}              # context_id -> ReplicaContext
        self.backings = {}              # wwid -> _BackingView
        self._seq = 0                   # sequence number of the last snapshot applied
        self._retired = set()           # cookies of contexts whose adapter fd we closed

    def call(self, msg):
        with self.lock:
            try:
                protocol.send(self.sock, msg)
                reply, fds, _ = protocol.recv(self.sock)
            except (EOFError, OSError):
                raise CxlFlashError(
                    errno.ENODEV, f"the process that owns the adapter (pid "
                    f"{self.owner_pid}) is gone") from None
        if reply[0] == "err":
            for fd in fds:
                os.close(fd)
            raise CxlFlashError(reply[1], reply[2])
        return reply, fds

    # -- ioctls ------------------------------------------------------------------

    @staticmethod
    def _bytes_of(arg):
        try:
            return bytes(memoryview(arg).cast("B"))
        except TypeError:
            return None                 # the owner reports EFAULT in order

    def _fence_for(self, request, data):
        """The fence to hold around ``request``: the replica's table fence
        when the request can unmap chunks of a context we replicate."""
        if request not in UNMAPPING_IOCTLS or data is None:
            return contextlib.nullcontext()
        st = uapi.DK_IOCTLS[request]
        try:
            context_id = st.from_buffer_copy(data[:ctypes.sizeof(st)]).context_id
        except ValueError:
            return contextlib.nullcontext()      # too short: the owner says EFAULT
        rep = self.replicas.get(context_id)
        return rep.table.fence() if rep is not None else contextlib.nullcontext()

    def disk_ioctl(self, disk, request, arg):
        data = self._bytes_of(arg)
        with self.lock:
            with self._fence_for(request, data):
                reply, fds = self.call(("disk", disk.wwid, disk.port, disk.flags,
                                        request, data))
                out = reply[1]
                if fds:
                    st = protocol.ADAPTER_FD_IOCTLS[request].from_buffer_copy(out)
                    st.adap_fd = fds[0]
                    out = bytes(st)
                self._apply(reply[2], reply[3] if len(reply) > 3 else None)
        self._copy_back(arg, request, out, uapi.DK_IOCTLS)

    def host_ioctl(self, request, arg):
        reply, _ = self.call(("host", request, self._bytes_of(arg)))
        self._copy_back(arg, request, reply[1], uapi.HT_IOCTLS)

    @staticmethod
    def _copy_back(arg, request, data, table):
        st = table[request].from_buffer_copy(data)
        copy_out(arg, st)

    def check_sdev(self, wwid, port):
        self.call(("sdev", wwid, port))

    def retire_context(self, context_id):
        """Call BEFORE closing a context's adapter fd in this process: the
        replica stops (transfers under way end first, none starts again),
        so none can use the chunks the owner frees when it sees the close;
        later snapshots never bring it back."""
        with self.lock:
            self._retired.add(context_id >> 32)
            rep = self.replicas.pop(context_id, None)
            if rep is not None:
                rep.retire()

    # -- replicas ------------------------------------------------------------------

    def _apply(self, snapshot, seq=None):
        """Bring the replicas to a snapshot of our contexts (under
        ``lock``).  A replica is known by the context's cookie (the high 32
        bits of its id), which a recovery keeps: its table object -- and
        the data paths bound to it -- carry on under the new id.  A
        snapshot older than the last one applied is ignored."""
        if snapshot is None:
            return
        if seq is not None:
            if seq <= self._seq:
                return
            self._seq = seq
        snapshot = {c: r for c, r in snapshot.items() if c >> 32 not in self._retired}
        by_cookie = {ctxid >> 32: ctxid for ctxid in snapshot}
        for ctxid, old in list(self.replicas.items()):
            new_id = by_cookie.get(ctxid >> 32)
            del self.replicas[ctxid]
            if new_id is None:
                old.retire()
            else:
                old.ctxid = new_id
                self.replicas[new_id] = old
        epoch = self.adapter.driver.reset_epoch
        for ctxid, record in snapshot.items():
            rep = self.replicas.get(ctxid)
            if rep is None:
                self.replicas[ctxid] = ReplicaContext(ctxid, record, self._backing, epoch)
            else:
                rep.update(record, self._backing, epoch)

    def _backing(self, wwid):
        """The backing store of a LUN: inherited at fork, or received."""
        b = self.backings.get(wwid)
        if b is not None:
            return b
        glun = self.adapter.driver.gluns.get(wwid)
        if glun is not None and glun.backing is not None and glun.backing.fd >= 0:
            g = glun.backing
            b = _BackingView(g.fd, g.zero_mode, g.block_size)
        else:
            reply, fds = self.call(("backing", wwid))
            block_size, zero_mode = reply[1]
            b = _BackingView(fds[0], zero_mode, block_size)
        self.backings[wwid] = b
        return b

    def snapshot(self):
        """Ask the owner for a fresh snapshot of our contexts and apply it."""
        with self.lock:
            reply, _ = self.call(("snapshot",))
            self._apply(reply[2], reply[3] if len(reply) > 3 else None)

    def context_record(self, context_id):
        return self.replicas.get(context_id)
