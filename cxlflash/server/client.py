"""The client's side of the shared driver: ``ForkedChannel`` (a forked
child of an embedded adapter's process) and ``DaemonChannel`` (a client of
``cxlflash serve``) -- one protocol, one class, two ways to get a socket.

Ioctls go to the driver; replies bring the structure back, any new adapter
fd, and the entries of this process's contexts that changed, which the
data path uses in this process: a replica of each context's table, whose
handles read and write the backing stores (received by ``SCM_RIGHTS``)
directly.  AFU resets reach the replicas through the reset epoch, a page
of shared memory received at connect.

When the driver goes away (the daemon exits or is killed, or the parent
that owns an embedded adapter dies), a watcher thread notices the hang-up
at once: every replica stops (its data path refuses I/O with AFU rc 0x21)
and the backing fds are closed; every later request is ENODEV.
"""
import ctypes
import errno
import json
import mmap
import os
import select
import socket
import struct
import threading

from .. import uapi
from .._core.tables import ResourceTable, TABLE_LIVE, TABLE_IN_ERROR, TABLE_GONE
from ..driver.host import ProcessMemory
from ..driver.uaccess import copy_out
from ..driver.lunmgt import Sdev
from ..backing import RemoteBacking, is_rbd
from ..errors import CxlFlashError, ForkedAdapterError
from . import wire

__all__ = ["DaemonChannel", "ForkedChannel", "connect_socket", "default_socket"]


def default_socket():
    """Where ``cxlflash serve`` listens and ``connect()`` looks by default:
    ``$CXLFLASH_SOCKET``, else ``$XDG_RUNTIME_DIR/cxlflash.sock``, else
    ``/run/cxlflash/cxlflash.sock``."""
    path = os.environ.get("CXLFLASH_SOCKET")
    if path:
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "cxlflash.sock")
    return "/run/cxlflash/cxlflash.sock"


def connect_socket(path):
    """A connected socket to the daemon at ``path``; ENODEV with what to do
    when none answers there."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        if e.errno in (errno.EACCES, errno.EPERM):
            raise CxlFlashError(e.errno, f"permission denied on {path!r}: the socket's "
                                "mode or group does not let this user in (the "
                                "daemon's --mode/--group)") from None
        raise CxlFlashError(errno.ENODEV, f"no cxlflash daemon at {path!r} "
                            f"({e.strerror}): start one with 'cxlflash serve "
                            f"--socket {path}'") from None
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return s


class _BackingView:
    __slots__ = ("fd", "zero_mode", "block_size", "remote")

    def __init__(self, fds, zero_mode, block_size):
        self.remote = None
        fd = fds[0]
        if zero_mode == wire.ZERO_REMOTE:
            # Sockets to a store the daemon serves (an RBD image): the
            # data path sends them the requests.
            self.remote = RemoteBacking(fds, block_size)
            zero_mode = self.remote.zero_mode
        self.fd = fd
        self.zero_mode = zero_mode
        self.block_size = block_size

    def close(self):
        if self.remote is not None:
            self.remote.close()
        else:
            os.close(self.fd)


class _GlunView:
    __slots__ = ("wwid", "backing", "blk_len", "max_lba")

    def __init__(self, wwid, backing, blk_len, max_lba):
        self.wwid = wwid
        self.backing = backing
        self.blk_len = blk_len
        self.max_lba = max_lba


class _LunView:
    __slots__ = ("parent",)

    def __init__(self, parent):
        self.parent = parent


class ReplicaContext:
    """This process's copy of one of its contexts: what the data path
    needs.  Updated in place, so data paths bound to its table stay valid
    (a recovery keeps the table under a new context id)."""

    def __init__(self, context_id, rht_size, epoch_buffer):
        self.ctxid = context_id
        self.pid = os.getpid()
        self.table = ResourceTable(rht_size)
        self.rht_lun = [None] * rht_size
        self.err_recovery_active = False
        self.epoch_buffer = epoch_buffer

    def update(self, flags, epoch, slots, backing_of):
        self.err_recovery_active = bool(flags & wire.CTX_IN_ERROR)
        self.table.set_state(TABLE_IN_ERROR if self.err_recovery_active else TABLE_LIVE)
        # The epoch the record was made at (read by the driver BEFORE the
        # state): a reset since then shows as the table in error.
        self.table.watch_epoch(self.epoch_buffer, epoch)
        t = self.table
        for (h, kind, perms, nmask, valid, lun_id, last_lba, blk_len, max_lba,
             wwid, lxt) in slots:
            if h >= t.rht_size:
                raise wire.ProtocolError("a handle beyond the context's table")
            if kind == wire.SLOT_CLOSED:
                if t.is_open(h):
                    t.close(h)
                self.rht_lun[h] = None
                continue
            backing = backing_of(wwid)
            t.load_slot(h, 0 if kind == wire.SLOT_VIRTUAL else 1, perms, nmask, lxt,
                        lun_id, last_lba, valid, replace=t.is_open(h), fd=backing.fd)
            self.rht_lun[h] = _LunView(_GlunView(wwid, backing, blk_len, max_lba))

    def retire(self):
        """No transfer through this replica runs after this returns."""
        self.table.set_state(TABLE_GONE)


#: Requests that can unmap chunks of a context: while one is under way (and
#: its reply is applied) the context's replica does no I/O, so no transfer
#: of this process uses a chunk after the driver has freed it (the kernel
#: syncs the AFU before it frees; this is that sync).
UNMAPPING_IOCTLS = {uapi.DK_CXLFLASH_RELEASE, uapi.DK_CXLFLASH_VLUN_RESIZE,
                    uapi.DK_CXLFLASH_DETACH}


class _NoFence:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _Link:
    """One connection to the driver: a socket, its reader, its lock (one
    request at a time on it)."""

    __slots__ = ("sock", "receiver", "lock")

    def __init__(self, sock):
        self.sock = sock
        self.receiver = wire.reply_receiver(sock)
        self.lock = threading.RLock()


#: The requests that change what this process's replicas hold: they go
#: over the main connection, one at a time, and their replies' tables are
#: applied in order.  Everything else goes over side connections, so a
#: thread waiting in the driver (an ioctl waiting for an AFU reset to end)
#: never holds up another thread's end_reset(), signal, status or I/O.
_MAIN_OPS = frozenset((wire.OP_HELLO, wire.OP_DISK_IOCTL, wire.OP_TABLES))


class DaemonChannel:
    """A connection to a driver in another process (see ``cxlflash.channel``).

    Three kinds of connection: the main one carries the requests that
    change this process's tables (``lock``, re-entrant, is held across the
    round trip AND the application of the reply's tables, so the replicas
    move in the order the driver answered); a control connection only
    asks the driver for new connections (for side connections, and for a
    child at fork); side connections, made on demand, carry the rest.
    Lock order: ``lock``, then a replica table's fence (never the other
    way); a side or control connection's lock is never held while waiting
    for another lock."""

    forked = False

    def __init__(self, sock, what=None):
        self.sock = sock
        self.main = _Link(sock)
        self.lock = self.main.lock
        self.control = None
        self._side_free = []            # idle side connections
        self._links = [self.main]       # every connection, for close()
        self._links_lock = threading.Lock()
        self.pid = os.getpid()
        self.what = what or "the cxlflash daemon"
        self.replicas = {}              # cookie -> ReplicaContext
        self.by_id = {}                 # context_id -> ReplicaContext
        self.backings = {}              # wwid -> _BackingView
        self._retired = set()           # cookies of contexts this process let go
        self.dead = False               # the driver went away
        self.closed = False             # closed by us, or the driver went away
        self._released = False          # close() ran: socket and pipes closed
        self.epoch = None
        self.server_pid = 0
        err, payload, fds = self._round_trip(wire.OP_HELLO, 0, b"", want_fds=1)
        try:
            if err:
                # The driver could not take this process (out of descriptors...).
                raise CxlFlashError(err, f"{self.what} refused the connection: "
                                    + bytes(payload).decode("utf-8", "replace"))
            if len(payload) != wire.HELLO_REPLY.size or len(fds) != 1:
                raise CxlFlashError(errno.EPROTO, f"{self.what} sent a malformed "
                                    "HELLO reply: is it a cxlflash daemon of this "
                                    "version?")
            self.server_pid, self.ports, self.rht_per_context, flags = \
                wire.HELLO_REPLY.unpack(payload)
            self.admin = bool(flags & wire.HELLO_ADMIN)
            try:
                self.epoch = mmap.mmap(fds[0], mmap.PAGESIZE, prot=mmap.PROT_READ)
            except (OSError, ValueError) as e:
                raise CxlFlashError(errno.EPROTO, f"{self.what} sent a reset epoch "
                                    f"that cannot be mapped ({e})") from None
        finally:
            wire.close_fds(fds)
        self.control = self._new_link(self.main)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._watcher = threading.Thread(target=self._watch, daemon=True,
                                         name="cxlflash-driver-watch")
        self._watcher.start()

    # -- the connection -------------------------------------------------------------

    def _gone_error(self):
        if self.closed and not self.dead:
            return CxlFlashError(errno.ENODEV, "the adapter is closed")
        return CxlFlashError(errno.ENODEV, f"{self.what} (pid {self.server_pid}) is "
                             "gone: the driver and every context it held are gone "
                             "(restart it and attach again)")

    def _exchange(self, link, op, request, payload, want_fds):
        wire.check_request(payload)             # not a dead driver: EINVAL
        with link.lock:
            if self.closed:
                raise self._gone_error()
            try:
                wire.send_request(link.sock, op, request, payload)
                err, body, fds = wire.recv_reply(link.receiver, op)
            except (EOFError, OSError, wire.ProtocolError):
                self._driver_gone()
                raise self._gone_error() from None
            if len(fds) > want_fds:
                wire.close_fds(fds)
                self._driver_gone()
                raise self._gone_error()
            return err, body, fds

    def _new_link(self, via):
        """A new connection to the driver, asked for over ``via``."""
        err, body, fds = self._exchange(via, wire.OP_SPAWN, 0, b"", 1)
        if err or len(fds) != 1:
            wire.close_fds(fds)
            raise CxlFlashError(err or errno.EPROTO, f"{self.what} gave no new "
                                "connection: " + bytes(body).decode("utf-8", "replace"))
        link = _Link(socket.socket(fileno=fds[0]))
        with self._links_lock:
            self._links.append(link)
        err, body, fds = self._exchange(link, wire.OP_HELLO, 0, b"", 1)
        wire.close_fds(fds)
        if err:
            raise CxlFlashError(err, bytes(body).decode("utf-8", "replace"))
        return link

    def _round_trip(self, op, request, payload, want_fds=0):
        if op in _MAIN_OPS or self.control is None:
            return self._exchange(self.main, op, request, payload, want_fds)
        if op == wire.OP_SPAWN:
            return self._exchange(self.control, op, request, payload, want_fds)
        with self._links_lock:
            link = self._side_free.pop() if self._side_free else None
        if link is None:
            link = self._new_link(self.control)
        try:
            return self._exchange(link, op, request, payload, want_fds)
        finally:
            with self._links_lock:
                self._side_free.append(link)

    def call(self, op, request=0, payload=b"", want_fds=0):
        """(payload, fds) of a successful request; CxlFlashError with the
        driver's errno and message otherwise."""
        err, body, fds = self._round_trip(op, request, payload, want_fds)
        if err:
            wire.close_fds(fds)
            raise CxlFlashError(err, bytes(body).decode("utf-8", "replace"))
        return body, fds

    def _watch(self):
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLRDHUP)
        p.register(self._wake_r, select.POLLIN)
        while True:
            try:
                events = p.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            for fd, ev in events:
                if fd == self._wake_r:
                    return
                if ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                    self._driver_gone()
                    return

    def _driver_gone(self):
        """The driver is gone: stop every replica, close the backing fds."""
        if self.dead:
            return
        self.dead = True
        # A reply being applied (under the lock) finishes first: it may be
        # binding a replica to a backing fd this is about to close.
        while not self.lock.acquire(timeout=0.1):
            if self._released:              # close() does it
                return
        try:
            if not self._released:
                self._shut()
        finally:
            self.lock.release()

    def _shut(self):
        self.closed = True
        for rep in list(self.replicas.values()):
            rep.retire()                 # transfers under way end first
        self.replicas.clear()
        self.by_id.clear()
        for b in self.backings.values():
            try:
                b.close()
            except OSError:
                pass
        self.backings.clear()

    def close(self):
        """Close the connection.  The contexts of this process are released
        by the driver as their adapter fds close."""
        with self.lock:
            if self._released:
                return
            self._released = True
            self._shut()
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            if self._watcher is not threading.current_thread():
                self._watcher.join(5)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._close_links()
            try:
                self.epoch.close()
            except BufferError:             # a retired replica still maps it
                pass

    # -- ioctls ---------------------------------------------------------------------

    @staticmethod
    def _bytes_of(arg, st):
        """The argument's bytes (as much as the structure needs), or None
        when it is not a buffer (the driver then says EFAULT, in order)."""
        try:
            view = memoryview(arg).cast("B")
        except TypeError:
            return None
        n = ctypes.sizeof(st) if st is not None else 4096
        return bytes(view[:n])

    def _fence_for(self, request, data):
        if request not in UNMAPPING_IOCTLS or data is None:
            return _NoFence()
        st = uapi.DK_IOCTLS[request]
        if len(data) < ctypes.sizeof(st):
            return _NoFence()               # the driver says EFAULT
        rep = self.by_id.get(st.from_buffer_copy(data).context_id)
        return rep.table.fence() if rep is not None else _NoFence()

    def disk_ioctl(self, sdev, flags, request, arg):
        st = uapi.DK_IOCTLS.get(request)
        data = self._bytes_of(arg, st)
        payload = wire.DISK.pack(sdev.wwid, sdev.port, flags & os.O_ACCMODE,
                                 data is not None) + (data or b"")
        request = _wire_request(request, st)
        with self.lock:
            with self._fence_for(request, data):
                try:
                    body, fds = self.call(wire.OP_DISK_IOCTL, request, payload,
                                          want_fds=1)
                except CxlFlashError as e:
                    # An error reply carries no table; but a request that failed
                    # after it changed them (EAGAIN: the AFU sync failed after a
                    # RELEASE or RESIZE took effect) left this process's replicas
                    # mapping chunks the driver has freed: fetch them again,
                    # still fenced, before anything can use them.
                    if (request in UNMAPPING_IOCTLS or e.errno == errno.EAGAIN) \
                            and not self.closed:
                        self.refresh()
                    raise
                try:
                    (n,) = wire.COUNT.unpack_from(body)
                    out = bytes(body[4:4 + n])
                    if st is None or n != ctypes.sizeof(st):
                        raise wire.ProtocolError("a reply without its structure")
                    if fds:
                        s = st.from_buffer_copy(out)
                        s.adap_fd = fds[0]
                        out = bytes(s)
                        fds = []
                    self._apply(wire.unpack_tables(body, 4 + n))
                except (struct.error, wire.ProtocolError):
                    wire.close_fds(fds)
                    self._driver_gone()
                    raise self._gone_error() from None
        copy_out(arg, st.from_buffer_copy(out))

    def host_ioctl(self, request, arg):
        st = uapi.HT_IOCTLS.get(request)
        data = self._bytes_of(arg, st)
        readable, s = True, None
        if request == uapi.HT_CXLFLASH_AFU_DEBUG and data is not None \
                and len(data) >= ctypes.sizeof(st):
            s = st.from_buffer_copy(data)
            if s.hdr.flags & uapi.HT_CXLFLASH_HOST_WRITE and s.data_len:
                try:
                    ProcessMemory(os.getpid()).read(s.data_ea, s.data_len)
                except CxlFlashError:
                    readable = False
        payload = struct.pack("<II", data is not None, readable) + (data or b"")
        request = _wire_request(request, st)
        body, _ = self.call(wire.OP_HOST_IOCTL, request, payload)
        try:
            (n,) = wire.COUNT.unpack_from(body)
            out = bytes(body[4:4 + n])
            (m,) = wire.COUNT.unpack_from(body, 4 + n)
            mem = bytes(body[8 + n:8 + n + m])
            if st is None or n != ctypes.sizeof(st) or len(mem) != m:
                raise wire.ProtocolError("a malformed host ioctl reply")
        except (struct.error, wire.ProtocolError):
            self._driver_gone()
            raise self._gone_error() from None
        if m and s is not None:
            ProcessMemory(os.getpid()).write(s.data_ea, mem)
        copy_out(arg, st.from_buffer_copy(out))

    def open_disk(self, wwid, port):
        wwid = bytes(wwid)
        if len(wwid) != 16:
            raise CxlFlashError(errno.ENODEV, f"no LUN with WWID {wwid.hex()}")
        self.call(wire.OP_OPEN_DISK, 0, wire.DISK.pack(wwid, port, 0, 0))
        return Sdev(port, 0, wwid)

    def luns(self):
        body, _ = self.call(wire.OP_LUNS)
        return [bytes(body[i:i + 16]) for i in range(0, len(body) - len(body) % 16, 16)]

    # -- replicas -----------------------------------------------------------------------

    def _apply(self, records):
        """Bring the replicas to the records of a reply (under ``lock``).
        A replica is known by its context's cookie, which a recovery keeps
        while the context id changes."""
        for context_id, cookie, rht_size, flags, epoch, slots in records:
            if cookie in self._retired:
                continue
            rep = self.replicas.get(cookie)
            if flags & wire.CTX_GONE:
                if rep is not None:
                    del self.replicas[cookie]
                    self.by_id.pop(rep.ctxid, None)
                    rep.retire()
                continue
            if rep is None:
                rep = self.replicas[cookie] = ReplicaContext(context_id, rht_size,
                                                             self.epoch)
            elif rep.table.rht_size != rht_size:
                raise wire.ProtocolError("a context's table changed size")
            if rep.ctxid != context_id:
                self.by_id.pop(rep.ctxid, None)
                rep.ctxid = context_id
            self.by_id[context_id] = rep
            rep.update(flags, epoch, slots, self._backing)

    def _backing(self, wwid):
        b = self.backings.get(wwid)
        if b is None:
            body, fds = self.call(wire.OP_BACKING, 0, wwid, want_fds=wire.REMOTE_LINKS)
            if len(body) != wire.BACKING_REPLY.size:
                wire.close_fds(fds)
                raise wire.ProtocolError("a malformed BACKING reply")
            block_size, zero_mode = wire.BACKING_REPLY.unpack(body)
            if len(fds) != (wire.REMOTE_LINKS if zero_mode == wire.ZERO_REMOTE else 1):
                wire.close_fds(fds)
                raise wire.ProtocolError("a BACKING reply with the wrong number of fds")
            try:
                b = _BackingView(fds, zero_mode, block_size)
            except BaseException:
                wire.close_fds(fds)
                raise
            self.backings[wwid] = b
        return b

    def refresh(self):
        """Ask for every context of this process again and apply them."""
        with self.lock:
            body, _ = self.call(wire.OP_TABLES)
            self._apply(wire.unpack_tables(body))

    def context_record(self, context_id):
        return self.by_id.get(context_id)

    def retire_context(self, context_id):
        """Call BEFORE closing a context's adapter fd in this process: the
        replica stops (transfers under way end first, none starts again),
        so none can use the chunks the driver frees when it sees the close;
        later replies never bring it back."""
        with self.lock:
            rep = self.by_id.pop(context_id, None)
            self._retired.add(context_id >> 32)
            if rep is not None:
                self.replicas.pop(context_id >> 32, None)
                rep.retire()

    def foreign(self):
        """In a forked child: the parent's replicas refuse I/O here."""
        from .._core.tables import TABLE_FOREIGN
        for rep in self.replicas.values():
            rep.table.set_state(TABLE_FOREIGN)

    def abandon(self):
        """In a forked child, after :meth:`foreign`: close this process's
        copies of the parent's connection, pipe and backing fds (the
        child has a connection of its own), so the driver sees the
        parent's connection end when the parent ends it."""
        if self._released:                  # closed before the fork
            return
        self.closed = self._released = True
        for fd in [self._wake_r, self._wake_w] + [b.fd for b in self.backings.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.backings.clear()
        self._close_links()

    def _close_links(self):
        with self._links_lock:
            links, self._links, self._side_free = self._links, [], []
        for link in links:
            try:
                link.sock.close()
            except OSError:
                pass

    def spawn(self):
        """A new connection to the same driver, for a child about to be
        forked: a socket (the driver serves its other end)."""
        _, fds = self.call(wire.OP_SPAWN, want_fds=1)
        if len(fds) != 1:
            raise wire.ProtocolError("a SPAWN reply without its socket")
        return socket.socket(fileno=fds[0])

    # -- the administrator's operations ---------------------------------------------------

    def add_lun(self, backing, ports, wwid, superpipe_on, size, block_size, direct):
        if backing is not None and not isinstance(backing, (str, bytes, os.PathLike)):
            raise CxlFlashError(errno.EINVAL, "a connected adapter adds a LUN by path "
                                "(a file or block device the daemon opens) or None "
                                "(memory), not a Backing object")
        path = os.fsdecode(backing) if backing is not None else ""
        if path and not is_rbd(path):
            path = os.path.abspath(path)
        mask = 0
        for p in ports:
            if not 0 <= p < 32:
                raise CxlFlashError(errno.EINVAL, f"port {p} does not exist")
            mask |= 1 << p
        if not mask:
            raise CxlFlashError(errno.EINVAL, "a LUN needs at least one port")
        flags = ((wire.ADD_SIZE if size is not None else 0) |
                 (wire.ADD_WWID if wwid is not None else 0) |
                 (wire.ADD_SUPERPIPE if superpipe_on else 0) |
                 (wire.ADD_DIRECT if direct else 0))
        if size is not None and not 0 <= size < 1 << 64:
            raise CxlFlashError(errno.EINVAL, f"size {size} is out of range")
        if not 0 <= block_size < 1 << 32:
            raise CxlFlashError(errno.EINVAL, f"block_size {block_size} is out of range")
        if wwid is not None and len(wwid) != uapi.CXLFLASH_WWID_LEN:
            raise CxlFlashError(errno.EINVAL, f"a WWID has 16 bytes, got {len(wwid)}")
        payload = wire.ADD_LUN.pack(size or 0, block_size, mask, flags,
                                    wwid or bytes(16)) + path.encode()
        body, _ = self.call(wire.OP_ADMIN, wire.ADMIN_ADD_LUN, payload)
        return bytes(body)

    def delete_lun(self, wwid):
        self.call(wire.OP_ADMIN, wire.ADMIN_DELETE_LUN, bytes(wwid).ljust(16, b"\0")[:16])

    def begin_reset(self):
        self.call(wire.OP_ADMIN, wire.ADMIN_BEGIN_RESET)

    def end_reset(self, ok=True):
        self.call(wire.OP_ADMIN, wire.ADMIN_END_RESET, wire.END_RESET.pack(bool(ok)))

    def fail(self):
        self.call(wire.OP_ADMIN, wire.ADMIN_FAIL)

    def inject_fault(self, point, count=1, err=None):
        self.call(wire.OP_ADMIN, wire.ADMIN_INJECT_FAULT,
                  wire.FAULT.pack(count, err is not None, err or 0) + str(point).encode())

    def signal_waiters(self):
        self.call(wire.OP_ADMIN, wire.ADMIN_SIGNAL_WAITERS)

    def set_lun_mode(self, value):
        self.call(wire.OP_ADMIN, wire.ADMIN_SET_LUN_MODE, wire.LUN_MODE.pack(value))

    def info(self):
        body, _ = self.call(wire.OP_INFO)
        ports, state, lun_mode = wire.INFO_REPLY.unpack(body)
        return ports, wire.STATES[state], lun_mode

    def status(self):
        body, _ = self.call(wire.OP_STATUS)
        return json.loads(bytes(body).decode("utf-8"))


class ForkedChannel(DaemonChannel):
    """A forked child's connection to its parent's embedded driver: the
    same protocol; the adapter-wide operations stay with the process that
    created the adapter."""

    forked = True

    def __init__(self, sock, owner_pid):
        self.owner_pid = owner_pid
        super().__init__(sock, "the process that owns the adapter")

    def _owner_only(self, *args, **kwargs):
        raise ForkedAdapterError(self.owner_pid, remote=True)

    add_lun = delete_lun = begin_reset = end_reset = fail = _owner_only
    inject_fault = signal_waiters = set_lun_mode = _owner_only


def _wire_request(request, st):
    """The request number as the wire carries it (u32): one the driver
    knows as itself; any other as 0xFFFFFFFF, which no ioctl is (so
    2**32 + a real number never aliases it); the driver refuses it in
    order with the other checks."""
    return request if st is not None else 0xFFFFFFFF
