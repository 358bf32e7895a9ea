"""The owner's side of the shared driver: serves one client connection.

Every request runs the driver as the client's own process (its pid comes
from the kernel-checked credentials of the message, its parent from
/proc), so the ownership rules of the kernel hold across processes: a child
can attach contexts of its own and clone its parent's, and gets EINVAL for
its parent's context ids everywhere else.
"""
import errno
import os
import threading
import time

from .. import uapi
from ..driver import host, superpipe
from ..driver.core import Caller
from ..errors import CxlFlashError
from . import protocol


class _DiskView:
    """The client's open disk, as the driver sees it."""

    def __init__(self, flags):
        self.flags = flags
        self.writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        self.closed = False


def snapshot(drv, pid):
    """Replicas of every context ``pid`` owns: {context_id: record}.  Each
    context is read holding its mutex, so a record is one consistent state
    (not an entry of one moment and an LXT of another)."""
    out = {}
    for c in drv.contexts():
        if c.pid != pid:
            continue
        with c.mutex:
            if c.removed:
                continue
            out.update(_record(drv, c))
    return out


def _record(drv, c):
    """One context's record (its mutex held)."""
    slots = []
    for h in c.table.open_handles():
        e = c.table.entry(h)
        llun = c.rht_lun[h]
        glun = llun.parent
        if e["format"] == 0:
            slots.append((h, 0, e["perms"], e["nmask"], c.table.lxt(h), 0, 0, 0,
                          glun.wwid, glun.blk_len, glun.max_lba))
        else:
            slots.append((h, 1, e["perms"], e["port_sel"], None, e["lun_id"],
                          e["last_lba"], e["valid"], glun.wwid, glun.blk_len,
                          glun.max_lba))
    return {c.ctxid: {"rht_size": c.table.rht_size, "pid": c.pid,
                      "in_error": c.err_recovery_active, "slots": slots,
                      "epoch": drv.epoch}}


class Connection(threading.Thread):
    """Serves the requests of one client until it goes away."""

    def __init__(self, adapter, sock):
        super().__init__(name="cxlflash-driver-service", daemon=True)
        self.adapter = adapter
        self.sock = sock
        self.client_pid = None
        self.seq = 0                    # numbers the snapshots sent, in order

    def run(self):
        drv = self.adapter.driver
        try:
            while not drv.closed:
                msg, fds, pid = protocol.recv(self.sock)
                for fd in fds:
                    os.close(fd)
                self.client_pid = pid
                reply, out_fds, close_after = self.handle(msg, pid)
                try:
                    protocol.send(self.sock, reply, out_fds)
                finally:
                    for fd in close_after:
                        os.close(fd)
        except (EOFError, OSError):
            pass
        finally:
            self.sock.close()
            self._release_client()

    def _release_client(self):
        """The client is gone: its adapter fds close as it exits, and their
        release path runs.  Wait briefly for the kernel to close them all."""
        drv = self.adapter.driver
        if self.client_pid is None:
            return
        # The closer of the client's fds is the client itself (as it exits).
        client = Caller(self.client_pid, protocol.parent_pid(self.client_pid))
        deadline = time.monotonic() + 2.0
        while not drv.closed:
            drv.reap(client)
            if not snapshot(drv, self.client_pid) or time.monotonic() > deadline:
                break
            time.sleep(0.01)

    def handle(self, msg, pid):
        """One request: (reply, fds to send, fds to close after sending)."""
        drv = self.adapter.driver
        caller = Caller(pid, protocol.parent_pid(pid))
        kind = msg[0]
        try:
            if kind == "disk":
                _, wwid, port, flags, request, data = msg
                sdev = drv.sdev(wwid, port)
                buf = bytearray(data) if data is not None else None
                superpipe.disk_ioctl(drv, sdev, _DiskView(flags), request, buf, caller)
                fds = self._adapter_fds(request, buf)
                return ("ok", bytes(buf), snapshot(drv, pid), self._next_seq()), fds, fds
            if kind == "host":
                _, request, data = msg
                buf = bytearray(data) if data is not None else None
                host.host_ioctl(drv, self.adapter, request, buf, caller)
                return ("ok", bytes(buf), None), [], []
            if kind == "sdev":
                _, wwid, port = msg
                drv.sdev(wwid, port)
                return ("ok", None, None), [], []
            if kind == "backing":
                _, wwid = msg
                glun = drv.gluns.get(wwid)
                if glun is None or glun.backing is None:
                    raise CxlFlashError(errno.ENODEV, f"no LUN {wwid.hex()}")
                b = glun.backing
                return ("ok", (b.block_size, b.zero_mode), None), [b.fd], []
            if kind == "snapshot":
                return ("ok", None, snapshot(drv, pid), self._next_seq()), [], []
            raise CxlFlashError(errno.EINVAL, f"unknown request {kind!r}")
        except CxlFlashError as e:
            return ("err", e.errno, e.strerror), [], []
        except OSError as e:
            return ("err", e.errno or errno.EIO, e.strerror or str(e)), [], []
        except Exception as e:           # never leave the client waiting
            return ("err", errno.EIO, f"the driver failed on this request: {e!r}"), [], []

    def _next_seq(self):
        self.seq += 1
        return self.seq

    @staticmethod
    def _adapter_fds(request, buf):
        """An ATTACH or RECOVER_AFU that made a new adapter fd: it goes to
        the client, and our copy is closed once sent, so the client holds
        the only one (its close or exit then releases the context)."""
        st = protocol.ADAPTER_FD_IOCTLS.get(request)
        if st is None:
            return []
        arg = st.from_buffer_copy(buf)
        if not arg.hdr.return_flags & uapi.DK_CXLFLASH_APP_CLOSE_ADAP_FD:
            return []
        return [arg.adap_fd]
