"""The shared driver's wire protocol: how a client and the driver's owner
talk over a Unix stream socket.

Every message is a 16-byte header and a payload.  A request's header is
``magic "CXLF", version u16, op u16, request u32, length u32`` (little
endian); ``request`` is the ioctl number for the ioctl ops and the action
for ``OP_ADMIN``.  A reply's header is ``magic, version, op u16, errno
i32, length u32``: errno 0 and the op's payload, or the errno and a UTF-8
message.  Requests carry the sender's credentials (``SCM_CREDENTIALS``,
checked by the kernel: the driver knows who is calling from them, never
from the bytes); only replies carry file descriptors (``SCM_RIGHTS``).

The payloads, by op (``<`` struct formats)::

  HELLO      ->  -                          <-  HELLO_REPLY, fd: the reset epoch (memfd)
  DISK_IOCTL ->  DISK + the structure       <-  u32 n + n structure bytes + tables;
                                                fd: a new adapter fd (ATTACH, RECOVER_AFU)
  HOST_IOCTL ->  u32 has_arg + structure    <-  u32 n + n structure bytes
  OPEN_DISK  ->  DISK (no structure)        <-  -
  BACKING    ->  wwid[16]                   <-  BACKING_REPLY, fd: the backing store
                                                 (zero_mode ZERO_REMOTE: a socket to it)
  LUNS       ->  -                          <-  wwid[16] per LUN
  TABLES     ->  -                          <-  tables (every context of the caller)
  INFO       ->  -                          <-  INFO_REPLY
  STATUS     ->  -                          <-  UTF-8 JSON (``cxlflash ctl``)
  ADMIN      ->  per action (ADMIN_*)       <-  per action
  SPAWN      ->  -                          <-  -, fd: a new connection (for a forked child)

Tables (the caller's contexts whose entries changed, in a fixed layout):
``u32 count`` then per context ``CONTEXT`` and its ``SLOT`` records, each
followed by ``lxt_cnt`` u64 LXT entries.  A slot of kind ``SLOT_CLOSED``
says the handle was closed; a context with ``CTX_GONE`` was destroyed.

Nothing here unpickles anything: every length and field is checked before
use, and a message that breaks a rule raises :class:`ProtocolError`
(the connection is then closed).
"""
import array
import errno
import os
import socket
import struct

from ..errors import CxlFlashError

MAGIC = b"CXLF"
VERSION = 1

REQUEST = struct.Struct("<4sHHII")
REPLY = struct.Struct("<4sHHiI")
HEADER_SIZE = 16

OP_HELLO = 1
OP_DISK_IOCTL = 2
OP_HOST_IOCTL = 3
OP_OPEN_DISK = 4
OP_BACKING = 5
OP_LUNS = 6
OP_TABLES = 7
OP_INFO = 8
OP_STATUS = 9
OP_ADMIN = 10
OP_SPAWN = 11
OPS = frozenset(range(OP_HELLO, OP_SPAWN + 1))

ADMIN_ADD_LUN = 1
ADMIN_DELETE_LUN = 2
ADMIN_BEGIN_RESET = 3
ADMIN_END_RESET = 4
ADMIN_FAIL = 5
ADMIN_INJECT_FAULT = 6
ADMIN_SIGNAL_WAITERS = 7
ADMIN_SET_LUN_MODE = 8
ADMIN_CREATE_LUN = 9

#: The largest request payload a driver accepts (structures and paths are
#: far smaller), and the largest reply a client accepts (tables of big LUNs).
MAX_REQUEST = 64 << 10
MAX_REPLY = 1 << 30
#: The most descriptors one reply carries (a BACKING reply for a store the
#: daemon serves carries REMOTE_LINKS sockets).
MAX_FDS = 8

DISK = struct.Struct("<16sIiI")          # wwid, port, open flags, has_arg
HELLO_REPLY = struct.Struct("<IIII")     # server pid, ports, rht_per_context, flags
HELLO_ADMIN = 1                          # flags: the caller is an administrator
BACKING_REPLY = struct.Struct("<II")     # block_size, zero_mode
# zero_mode of a BACKING reply whose fd is a socket to a store the daemon
# serves (an RBD image: cxlflash._core.store's remote protocol).
ZERO_REMOTE = 3
REMOTE_LINKS = 8            # sockets in such a reply (a request in flight on each)
INFO_REPLY = struct.Struct("<IIq")       # ports, state (STATES index), lun_mode
STATES = ("NORMAL", "RESET", "FAILTERM")
ADD_LUN = struct.Struct("<QIII16s")      # size, block_size, ports mask, flags, wwid; path
ADD_SIZE, ADD_WWID, ADD_SUPERPIPE, ADD_DIRECT = 1, 2, 4, 8
CREATE_LUN = struct.Struct("<QII")       # size (bytes), port, superpipe
END_RESET = struct.Struct("<I")          # ok
FAULT = struct.Struct("<Iiq")            # count, has_err, err; point (UTF-8)
LUN_MODE = struct.Struct("<q")

COUNT = struct.Struct("<I")
CONTEXT = struct.Struct("<QIIIIQ")       # context_id, cookie, rht_size, flags, slots, epoch
CTX_IN_ERROR, CTX_GONE = 1, 2
SLOT = struct.Struct("<IBBBBQQIIQ16s")   # handle, kind, perms, nmask, valid, lun_id,
                                         # last_lba, lxt_cnt, blk_len, max_lba, wwid
SLOT_CLOSED, SLOT_VIRTUAL, SLOT_DIRECT = 0, 1, 2
MAX_RHT = 4096

_CREDS = struct.Struct("iII")


class ProtocolError(Exception):
    """A message broke the protocol: the connection must be closed."""


# -- sending -----------------------------------------------------------------------


def _sendmsg(sock, parts, anc):
    """Send ``parts`` (one message) with ancillary data on its first byte."""
    total = sum(len(p) for p in parts)
    sent = sock.sendmsg(parts, anc)
    if sent < total:
        rest = b"".join(bytes(p) for p in parts)[sent:]
        sock.sendall(rest)


def check_request(payload):
    """EINVAL for a request the driver would refuse for its size (it would
    end the connection), before anything is sent."""
    if len(payload) > MAX_REQUEST:
        raise CxlFlashError(errno.EINVAL, f"a request of {len(payload)} bytes is over the "
                            f"driver's limit of {MAX_REQUEST} bytes (a path or a name "
                            "that long?)")


def send_request(sock, op, request=0, payload=b""):
    """A request, with this process's credentials (check_request first)."""
    check_request(payload)
    creds = [(_SOL_SOCKET, _SCM_CREDENTIALS,
              _CREDS.pack(os.getpid(), os.getuid(), os.getgid()))]
    _sendmsg(sock, [REQUEST.pack(MAGIC, VERSION, op, request, len(payload)), payload],
             creds)


def send_reply(sock, op, err=0, payload=b"", fds=()):
    anc = []
    if fds:
        anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
    _sendmsg(sock, [REPLY.pack(MAGIC, VERSION, op, err, len(payload)), payload], anc)


def send_error(sock, op, err, message):
    send_reply(sock, op, err or errno.EIO, message.encode("utf-8", "replace")[:4096])


# -- receiving ---------------------------------------------------------------------


_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_SCM_CREDENTIALS = int(socket.SCM_CREDENTIALS)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_READ = 65536


class Receiver:
    """Reads whole messages from a stream socket: the header and a small
    payload usually in one ``recvmsg``.  The credentials of a message are
    those of the read that brought its first byte (the kernel never
    merges the data of two senders in one read); every later read of the
    same message must bring the same credentials."""

    def __init__(self, sock, header, want_creds, max_fds, limit):
        self.sock = sock
        self.header = header
        self.want_creds = want_creds
        self.max_fds = max_fds
        self.limit = limit
        self.space = socket.CMSG_SPACE(_CREDS.size) + socket.CMSG_SPACE(
            max(max_fds, 1) * 4)
        self.buf = b""
        self.creds = None

    @staticmethod
    def _ancillary(anc, flags, fds):
        """The credentials of one read; its descriptors go to ``fds``."""
        creds = None
        for level, kind, body in anc:
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(body[:len(body) - len(body) % 4])
                fds.extend(a)
            elif (level == _SOL_SOCKET and kind == _SCM_CREDENTIALS
                  and len(body) >= _CREDS.size):
                creds = _CREDS.unpack_from(body)
        if flags & _MSG_CTRUNC:
            raise ProtocolError("more ancillary data than a message may carry")
        return creds

    def _same_sender(self, creds, first):
        """A message is one process's: bytes of another process (a child
        sharing the connection) in the middle of it break the protocol."""
        if creds != first:
            raise ProtocolError("a message whose bytes come from two processes")

    def _read(self, fds):
        data, anc, flags, _ = self.sock.recvmsg(_READ, self.space)
        creds = self._ancillary(anc, flags, fds)
        if not self.buf:
            self.creds = creds
        elif data:
            self._same_sender(creds, self.creds)
        return data

    def message(self):
        """(header fields, payload, fds, creds); EOFError at a clean end of
        stream, ProtocolError on a broken message (fds already closed)."""
        fds = []
        try:
            buf = self.buf
            while len(buf) < HEADER_SIZE:
                data = self._read(fds)
                if not data:
                    if buf:
                        raise ProtocolError("the peer closed the connection mid-header")
                    raise EOFError("the peer closed the connection")
                buf = self.buf = buf + data
            head = self.header.unpack_from(buf)
            if head[0] != MAGIC:
                raise ProtocolError(f"bad magic {head[0]!r}")
            if head[1] != VERSION:
                raise ProtocolError(f"protocol version {head[1]} (this end speaks "
                                    f"{VERSION})")
            n = head[4]
            if n > self.limit:
                raise ProtocolError(f"a message of {n} bytes (at most {self.limit})")
            end = HEADER_SIZE + n
            creds = self.creds
            if len(buf) >= end:
                payload = buf[HEADER_SIZE:end]
                self.buf = buf[end:]
            else:
                payload = bytearray(n)
                view = memoryview(payload)
                got = len(buf) - HEADER_SIZE
                view[:got] = buf[HEADER_SIZE:]
                self.buf = b""
                while got < n:
                    k, anc, flags, _ = self.sock.recvmsg_into([view[got:]], self.space)
                    if k == 0:
                        raise ProtocolError("the peer closed the connection mid-message")
                    self._same_sender(self._ancillary(anc, flags, fds), creds)
                    got += k
            if not self.buf:
                self.creds = None
            if len(fds) > self.max_fds:
                raise ProtocolError(f"{len(fds)} file descriptors where at most "
                                    f"{self.max_fds} belong")
            if self.want_creds and creds is None:
                raise ProtocolError("a request without the sender's credentials")
            return head, payload, fds, creds
        except BaseException:
            close_fds(fds)
            raise


def request_receiver(sock):
    """The driver's reader of a connection's requests (they carry no
    file descriptors)."""
    return Receiver(sock, REQUEST, True, 0, MAX_REQUEST)


def reply_receiver(sock):
    return Receiver(sock, REPLY, False, MAX_FDS, MAX_REPLY)


def recv_request(receiver):
    """(op, request, payload, (pid, uid, gid)); EOFError when the peer is
    gone, ProtocolError when it broke the protocol."""
    (_, _, op, request, _), payload, _, creds = receiver.message()
    if op not in OPS:
        raise ProtocolError(f"unknown op {op}")
    return op, request, payload, creds


def recv_reply(receiver, op):
    """(errno, payload, fds) of the reply to ``op``; EOFError when the
    driver is gone, ProtocolError on a malformed reply."""
    (_, _, rop, err, _), payload, fds, _ = receiver.message()
    if rop != op:
        close_fds(fds)
        raise ProtocolError(f"a reply that does not answer op {op}")
    return err, payload, fds


def close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- tables -------------------------------------------------------------------------


def pack_tables(records):
    """``records``: [(context_id, cookie, rht_size, flags, epoch, slots)],
    slots: [(handle, kind, perms, nmask, valid, lun_id, last_lba, blk_len,
    max_lba, wwid, lxt)] with ``lxt`` a uint64 array or None."""
    out = [COUNT.pack(len(records))]
    for context_id, cookie, rht_size, flags, epoch, slots in records:
        out.append(CONTEXT.pack(context_id, cookie, rht_size, flags, len(slots), epoch))
        for (h, kind, perms, nmask, valid, lun_id, last_lba, blk_len, max_lba,
             wwid, lxt) in slots:
            n = 0 if lxt is None else len(lxt)
            out.append(SLOT.pack(h, kind, perms, nmask, valid, lun_id, last_lba, n,
                                 blk_len, max_lba, wwid))
            if n:
                out.append(lxt.astype("<u8", copy=False).tobytes())
    return b"".join(out)


def unpack_tables(buf, offset=0):
    """The records of :func:`pack_tables`, every field checked; the LXTs
    as uint64 arrays.  ProtocolError on anything malformed."""
    import numpy as np
    view = memoryview(buf)
    end = len(view)

    def take(st):
        nonlocal offset
        if end - offset < st.size:
            raise ProtocolError("truncated tables")
        v = st.unpack_from(view, offset)
        offset += st.size
        return v

    (count,) = take(COUNT)
    if count > 65536:
        raise ProtocolError(f"{count} contexts in one reply")
    records = []
    for _ in range(count):
        context_id, cookie, rht_size, flags, nslots, epoch = take(CONTEXT)
        if not 1 <= rht_size <= MAX_RHT or nslots > rht_size or flags & ~3:
            raise ProtocolError("a malformed context record")
        slots = []
        for _ in range(nslots):
            (h, kind, perms, nmask, valid, lun_id, last_lba, n, blk_len, max_lba,
             wwid) = take(SLOT)
            if h >= rht_size or kind > SLOT_DIRECT or perms > 3:
                raise ProtocolError("a malformed slot record")
            if kind != SLOT_CLOSED and nmask == 0:
                raise ProtocolError("an open slot without a port mask")
            if n and kind != SLOT_VIRTUAL:
                raise ProtocolError("an LXT on a slot that is not virtual")
            if n * 8 > end - offset:
                raise ProtocolError("truncated LXT")
            lxt = None
            if kind == SLOT_VIRTUAL:
                lxt = np.frombuffer(view[offset:offset + n * 8], dtype="<u8").astype(
                    np.uint64)
                offset += n * 8
            slots.append((h, kind, perms, nmask, valid, lun_id, last_lba, blk_len,
                          max_lba, bytes(wwid), lxt))
        records.append((context_id, cookie, rht_size, flags, epoch, slots))
    if offset != end:
        raise ProtocolError(f"{end - offset} bytes after the tables")
    return records


def parent_pid(pid):
    """The parent of process ``pid`` (from /proc), or 0."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def socketpair():
    """A connected pair for a forked child's connection."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return a, b
