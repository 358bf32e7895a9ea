"""The driver's side of the shared driver: serves client connections.

One ``Server`` per driver.  It serves the connections of a daemon's Unix
socket (``serve_forever``) and socket pairs made for forked children
(``serve_pair``), one thread per connection.  Every request runs the
driver as the process the kernel names in the message's credentials --
never as anything the bytes say -- so the ownership rules of the kernel
hold between processes: a context belongs to the process that attached
it, a child clones its parent's, anyone else gets EINVAL.

A reaper thread watches the driver's adapter fds: when the last copy of
one is closed -- by its process, or by the kernel as that process dies
(``kill -9``) -- it runs the release path at once (spec §6.3), so every
chunk, PE and LUN-table slot comes back without waiting for another
request.

A connection that breaks the protocol (``wire.ProtocolError``: bad magic
or version, an unknown op, an oversize length, descriptors where none
belong, missing credentials) is logged and closed; the others go on.
"""
import errno
import fcntl
import json
import os
import select
import socket
import struct
import sys
import threading

from .. import uapi
from ..channel import this_process
from ..driver.context import Caller
from ..backing import RbdBacking, is_rbd
from ..errors import CxlFlashError
from . import wire

__all__ = ["Server"]


def _stderr_log(line):
    try:
        print(f"cxlflash serve: {line}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class _PeerMemory:
    """A remote caller's memory for HT_CXLFLASH_AFU_DEBUG: the client
    copies in and out of its own address space; the driver records what
    to write, and knows from the client whether the source was readable."""

    def __init__(self, readable):
        self.readable = readable
        self.out = b""

    def read(self, address, length):
        if not self.readable:
            raise CxlFlashError(errno.EFAULT, f"data_ea 0x{address:x}: {length} bytes "
                                "are not addressable in the caller")
        return bytes(length)

    def write(self, address, data):
        self.out = bytes(data)


class Server:
    """Serves one driver (an embedded ``Adapter``'s) to other processes."""

    def __init__(self, adapter, sock=None, *, log=_stderr_log):
        self.adapter = adapter
        self.local = adapter._local
        self.drv = self.local.driver
        self.sock = sock
        self.log = log
        self.uid = os.getuid()
        self.pid = this_process().pid          # the driver's own process
        self._lock = threading.Lock()
        self._conns = set()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.counters = {"connects": 0, "reclaims": 0, "bad_messages": 0}
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True,
                                        name="cxlflash-reaper")
        self._reaper.start()

    # -- connections ----------------------------------------------------------------

    def serve_pair(self, sock):
        """Serve one end of a socket pair (a forked child's connection)."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        conn = Connection(self, sock)
        with self._lock:
            if self._stopping:
                sock.close()
                return
            self._conns.add(conn)
        conn.start()

    def serve_forever(self):
        """Accept connections until :meth:`shutdown`."""
        try:
            while not self._stopping:
                r, _, _ = select.select([self.sock, self._wake_r], [], [])
                if self._stopping:
                    break
                if self.sock not in r:
                    continue
                try:
                    s, _ = self.sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    if self._stopping:
                        break
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self.log(f"cannot accept a connection: {e.strerror}")
                        select.select([], [], [], 0.1)
                        continue
                    raise
                s.setblocking(True)
                self.serve_pair(s)
        finally:
            self.close()

    def shutdown(self):
        """Stop accepting and serving; :meth:`serve_forever` returns, and
        every connection closes (their contexts are released as their
        adapter fds close, or with the adapter)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self):
        """Stop serving now: every connection is closed (their threads
        end), the reaper stops.  The adapter stays open."""
        self.shutdown()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.abort()
        for c in conns:
            if c is not threading.current_thread():
                c.join(5)
        if self._reaper is not threading.current_thread():
            self._reaper.join(5)
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def abandon(self):
        """In a forked child: close this process's copies of the server's
        descriptors (its connections' sockets, its pipe), so the children
        it serves see the driver's process go when it goes.  Its threads
        stayed in the parent."""
        self._stopping = True
        with self._lock:
            conns, self._conns = list(self._conns), set()
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for c in conns:
            try:
                c.sock.close()
            except OSError:
                pass
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _gone(self, conn):
        with self._lock:
            self._conns.discard(conn)

    # -- reclaim ----------------------------------------------------------------------

    def _reap_loop(self):
        drv = self.drv
        p = select.poll()
        try:
            p.register(drv._epoll.fileno(), select.POLLIN)
        except (OSError, ValueError):
            return
        wake = self._wake_r
        p.register(wake, select.POLLIN)
        nobody = Caller(0, 0)
        while not drv.closed:
            try:
                events = p.poll(1000)
            except (OSError, ValueError):
                return
            if drv.closed:
                return
            if self._stopping:
                return
            if not events:
                continue
            try:
                released = drv.reap(nobody)
            except Exception as e:                      # keep reaping
                self.log(f"the release path failed: {e!r}")
                released = []
            for context_id, pid, chunks in released:
                self.counters["reclaims"] += 1
                self.log(f"reclaimed context 0x{context_id:016x} of pid {pid} "
                         f"({chunks} chunks)")
            if not released:
                # Readiness for an fd another thread is releasing: let it.
                select.select([], [], [], 0.005)

    # -- reporting ---------------------------------------------------------------------

    def status(self):
        out = {"pid": self.pid, "uid": self.uid}
        out.update(self.local.status())
        with self._lock:
            conns = len(self._conns)
        out["counters"].update(self.counters, connections=conns)
        return out


def _message(e):
    return e.strerror or str(e)


class Connection(threading.Thread):
    """Serves the requests of one client process until it goes away."""

    def __init__(self, server, sock):
        super().__init__(name="cxlflash-connection", daemon=True)
        self.server = server
        self.sock = sock
        self.pid = None
        self.uid = None
        self.known = {}            # ctx -> (generation, context_id, in_error) last sent
        self.gens = {}             # ctx -> generation of the entries last sent

    def abort(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self):
        srv = self.server
        why = "disconnected"
        receiver = wire.request_receiver(self.sock)
        try:
            while not srv._stopping:
                try:
                    op, request, payload, creds = wire.recv_request(receiver)
                except EOFError:
                    break
                pid, uid, _ = creds
                if self.pid is None:
                    if op != wire.OP_HELLO:
                        raise wire.ProtocolError("the first request must be HELLO")
                    self.pid, self.uid = pid, uid
                    srv.counters["connects"] += 1
                    srv.log(f"pid {pid} (uid {uid}) connected")
                if pid != self.pid:
                    wire.send_error(self.sock, op, errno.EPERM,
                                    f"this connection belongs to pid {self.pid}: each "
                                    "process needs its own (cxlflash.connect())")
                    continue
                self.handle(op, request, payload)
        except wire.ProtocolError as e:
            srv.counters["bad_messages"] += 1
            why = f"closed: {e}"
        except (OSError, struct.error) as e:
            why = f"closed: {e}"
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            srv._gone(self)
            if self.pid is not None:
                srv.log(f"pid {self.pid} {why}")
            elif why != "disconnected":
                srv.log(f"a connection was {why}")

    # -- requests ------------------------------------------------------------------------

    def caller(self, request=None):
        """The calling process; its parent (from /proc) only where a
        request needs it -- a clone's source belongs to the parent."""
        if request == uapi.DK_CXLFLASH_VLUN_CLONE:
            return Caller(self.pid, wire.parent_pid(self.pid))
        return Caller(self.pid, -1)

    def _check_admin(self, what):
        if self.uid not in (self.server.uid, 0):
            raise CxlFlashError(errno.EPERM, f"{what} needs an administrator: the "
                                f"daemon's user (uid {self.server.uid}) or root")

    def handle(self, op, request, payload):
        fds = []
        try:
            try:
                body, fds = self._dispatch(op, request, payload)
            except wire.ProtocolError:
                raise
            except CxlFlashError as e:
                wire.send_error(self.sock, op, e.errno, _message(e))
                return
            except OSError as e:
                wire.send_error(self.sock, op, e.errno or errno.EIO, _message(e))
                return
            except (ValueError, TypeError, OverflowError, UnicodeDecodeError,
                    struct.error) as e:
                wire.send_error(self.sock, op, errno.EINVAL, f"a malformed request: {e}")
                return
            except Exception as e:        # never leave the client waiting
                wire.send_error(self.sock, op, errno.EIO,
                                f"the driver failed on this request: {e!r}")
                return
            wire.send_reply(self.sock, op, 0, body, fds)
        finally:
            wire.close_fds(fds)

    def _dispatch(self, op, request, payload):
        """(reply payload, fds to send and then close)."""
        local = self.server.local
        drv = self.server.drv
        if op == wire.OP_HELLO:
            flags = wire.HELLO_ADMIN if self.uid in (self.server.uid, 0) else 0
            return (wire.HELLO_REPLY.pack(self.server.pid, drv.num_ports,
                                          drv.rht_per_context, flags),
                    [os.dup(drv.epoch_fd)])
        if op == wire.OP_DISK_IOCTL:
            return self._disk_ioctl(request, payload)
        if op == wire.OP_HOST_IOCTL:
            return self._host_ioctl(request, payload)
        if op == wire.OP_OPEN_DISK:
            wwid, port, _, _ = wire.DISK.unpack(_exact(payload, wire.DISK.size))
            local.open_disk(wwid, port)
            return b"", []
        if op == wire.OP_BACKING:
            wwid = bytes(_exact(payload, 16))
            glun = drv.gluns.get(wwid)
            if glun is None or glun.backing is None:
                raise CxlFlashError(errno.ENODEV, f"no LUN {wwid.hex()}")
            # The descriptor reaches every block of the LUN: only for a
            # process with a context on it (the client asks when a handle
            # of its own first names the LUN), never for any peer that asks.
            mine = list(drv.ctx_by_pid.get(self.pid, ()))
            if not any(la.llun.wwid == wwid for ctx in mine for la in list(ctx.luns)):
                raise CxlFlashError(errno.EPERM, f"the backing store of LUN {wwid.hex()} "
                                    "goes only to a process with a context on it: "
                                    "attach to the LUN first")
            b = glun.backing
            if isinstance(b, RbdBacking):
                # Only this process can use the image (its exclusive lock
                # refuses other clients' writes): the client gets a socket
                # whose requests a thread here runs on the image.
                return (wire.BACKING_REPLY.pack(b.block_size, wire.ZERO_REMOTE),
                        b.serve(wire.REMOTE_LINKS))
            return wire.BACKING_REPLY.pack(b.block_size, b.zero_mode), [_reopen(b.fd)]
        if op == wire.OP_LUNS:
            _exact(payload, 0)
            return b"".join(local.luns()), []
        if op == wire.OP_TABLES:
            _exact(payload, 0)
            self.known.clear()
            self.gens.clear()
            return self._tables(full=True), []
        if op == wire.OP_INFO:
            ports, state, lun_mode = local.info()
            return wire.INFO_REPLY.pack(ports, wire.STATES.index(state), lun_mode), []
        if op == wire.OP_STATUS:
            return json.dumps(self.server.status()).encode(), []
        if op == wire.OP_ADMIN:
            return self._admin(request, payload)
        if op == wire.OP_SPAWN:
            _exact(payload, 0)
            mine, theirs = wire.socketpair()
            self.server.serve_pair(mine)
            fd = theirs.detach()
            return b"", [fd]
        raise wire.ProtocolError(f"unknown op {op}")

    def _disk_ioctl(self, request, payload):
        if len(payload) < wire.DISK.size:
            raise wire.ProtocolError("a disk ioctl without its disk")
        wwid, port, flags, has_arg = wire.DISK.unpack_from(payload)
        if has_arg > 1:
            raise wire.ProtocolError("has_arg is 0 or 1")
        arg = bytearray(payload[wire.DISK.size:]) if has_arg else None
        if not has_arg and len(payload) != wire.DISK.size:
            raise wire.ProtocolError("structure bytes after has_arg = 0")
        local = self.server.local
        sdev = local.open_disk(wwid, port)
        local.disk_ioctl(sdev, flags, request, arg, self.caller(request))
        fds = []
        st = uapi.DK_IOCTLS.get(request)
        if request in (uapi.DK_CXLFLASH_ATTACH, uapi.DK_CXLFLASH_RECOVER_AFU):
            s = st.from_buffer_copy(arg)
            if s.hdr.return_flags & uapi.DK_CXLFLASH_APP_CLOSE_ADAP_FD:
                # The new adapter fd goes to the client, and ours is closed
                # once sent: the client holds the only copy (its close, or
                # its death, releases the context).
                fds = [s.adap_fd]
        out = bytes(arg[:_size(st)])
        return wire.COUNT.pack(len(out)) + out + self._tables(), fds

    def _host_ioctl(self, request, payload):
        self._check_admin("a host ioctl (HT_CXLFLASH_*)")
        if len(payload) < 8:
            raise wire.ProtocolError("a host ioctl without its flags")
        has_arg, readable = struct.unpack_from("<II", payload)
        if has_arg > 1 or readable > 1:
            raise wire.ProtocolError("has_arg and readable are 0 or 1")
        arg = bytearray(payload[8:]) if has_arg else None
        memory = _PeerMemory(bool(readable))
        self.server.local.host_ioctl(request, arg, self.caller(), memory)
        out = bytes(arg[:_size(uapi.HT_IOCTLS.get(request))])
        return (wire.COUNT.pack(len(out)) + out + wire.COUNT.pack(len(memory.out))
                + memory.out), []

    def _admin(self, action, payload):
        self._check_admin("this operation")
        local = self.server.local
        if action == wire.ADMIN_ADD_LUN:
            if len(payload) < wire.ADD_LUN.size:
                raise wire.ProtocolError("a short ADD_LUN")
            size, block_size, port_mask, flags, wwid = wire.ADD_LUN.unpack_from(payload)
            path = bytes(payload[wire.ADD_LUN.size:]).decode("utf-8")
            if "\0" in path or (path and not os.path.isabs(path) and not is_rbd(path)):
                raise CxlFlashError(errno.EINVAL, "a LUN's path must be absolute")
            ports = tuple(p for p in range(32) if port_mask >> p & 1)
            got = local.add_lun(path or None, ports,
                                wwid if flags & wire.ADD_WWID else None,
                                bool(flags & wire.ADD_SUPERPIPE),
                                size if flags & wire.ADD_SIZE else None,
                                block_size, bool(flags & wire.ADD_DIRECT))
            self.server.log(f"pid {self.pid} added LUN {got.hex()} "
                            f"({path or 'memory'})")
            return got, []
        if action == wire.ADMIN_CREATE_LUN:
            size, port, superpipe_on = wire.CREATE_LUN.unpack(
                _exact(payload, wire.CREATE_LUN.size))
            return local.create_lun(size, port, bool(superpipe_on), self.caller()), []
        if action == wire.ADMIN_DELETE_LUN:
            local.delete_lun(bytes(_exact(payload, 16)), self.caller())
            return b"", []
        if action == wire.ADMIN_BEGIN_RESET:
            _exact(payload, 0)
            local.begin_reset()
            return b"", []
        if action == wire.ADMIN_END_RESET:
            (ok,) = wire.END_RESET.unpack(_exact(payload, wire.END_RESET.size))
            local.end_reset(bool(ok))
            return b"", []
        if action == wire.ADMIN_FAIL:
            _exact(payload, 0)
            local.fail()
            return b"", []
        if action == wire.ADMIN_INJECT_FAULT:
            if len(payload) < wire.FAULT.size:
                raise wire.ProtocolError("a short INJECT_FAULT")
            count, has_err, err = wire.FAULT.unpack_from(payload)
            point = bytes(payload[wire.FAULT.size:]).decode("utf-8")
            local.inject_fault(point, count, err if has_err else None)
            return b"", []
        if action == wire.ADMIN_SIGNAL_WAITERS:
            _exact(payload, 0)
            local.signal_waiters()
            return b"", []
        if action == wire.ADMIN_SET_LUN_MODE:
            (mode,) = wire.LUN_MODE.unpack(_exact(payload, wire.LUN_MODE.size))
            local.set_lun_mode(mode)
            return b"", []
        raise CxlFlashError(errno.EINVAL, f"unknown administrator action {action}")

    # -- table replicas ---------------------------------------------------------------------

    def _tables(self, full=False):
        """The records of this process's contexts that changed since the
        last reply (every one when ``full``), packed."""
        drv = self.server.drv
        mine = drv.ctx_by_pid.get(self.pid, ())
        known = self.known
        if len(mine) == len(known) and all(c in known for c in mine):
            contexts = list(known)         # the usual case: no context came or went
        else:
            contexts = set(mine).union(known)
        records = []
        for ctx in contexts:
            rec = self._record(ctx, drv)
            if rec is not None:
                records.append(rec)
        return wire.pack_tables(records) if records else _NO_TABLES

    def _record(self, ctx, drv):
        epoch = drv.epoch               # before the state: see ReplicaContext
        in_error = bool(ctx.err_recovery_active)
        if ctx.removed:
            if ctx not in self.known:
                return None
            del self.known[ctx]
            self.gens.pop(ctx, None)
            return (ctx.ctxid, ctx.cookie, ctx.table.rht_size, wire.CTX_GONE, epoch, [])
        since = self.gens.get(ctx, 0)
        gen, handles = ctx.table.changed_since(since)
        if self.known.get(ctx) == (gen, ctx.ctxid, in_error):
            return None
        if handles:
            # The entries and their LUN records in one consistent state.
            with ctx.mutex:
                gen, handles = ctx.table.changed_since(since)
                slots = [self._slot(ctx, h) for h in handles]
        else:
            slots = []
        self.known[ctx] = (gen, ctx.ctxid, in_error)
        self.gens[ctx] = gen
        flags = wire.CTX_IN_ERROR if in_error else 0
        return (ctx.ctxid, ctx.cookie, ctx.table.rht_size, flags, epoch, slots)

    @staticmethod
    def _slot(ctx, h):
        t = ctx.table
        e = t.entry(h)
        llun = ctx.rht_lun[h]
        if not e["open"] or llun is None:
            return (h, wire.SLOT_CLOSED, 0, 0, 0, 0, 0, 0, 0, bytes(16), None)
        glun = llun.parent
        if e["format"] == 0:
            return (h, wire.SLOT_VIRTUAL, e["perms"], e["nmask"], 0, 0, 0,
                    glun.blk_len, glun.max_lba, glun.wwid, t.lxt(h))
        return (h, wire.SLOT_DIRECT, e["perms"], e["port_sel"], e["valid"],
                e["lun_id"], e["last_lba"], glun.blk_len, glun.max_lba, glun.wwid, None)


_NO_TABLES = wire.COUNT.pack(0)


def _reopen(fd):
    """A new open file description of the store behind ``fd``, for one
    client: clients sharing the daemon's (a dup) contend on one struct
    file -- its reference count, its readahead state -- and two clients
    read 1.58x of one instead of 1.89x (notes of issue 10).  A store that
    refuses a second open (a device opened O_EXCL) is shared as a dup."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_DIRECT)
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
    except OSError:
        return os.dup(fd)


def _exact(payload, n):
    if len(payload) != n:
        raise wire.ProtocolError(f"a payload of {len(payload)} bytes where {n} belong")
    return payload


def _size(st):
    import ctypes
    return ctypes.sizeof(st) if st is not None else 0
