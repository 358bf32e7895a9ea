"""Messages between a driver's owner and its clients.

A message is an 8-byte length, sent with the sender's credentials
(``SCM_CREDENTIALS``, checked by the kernel) and any file descriptors
(``SCM_RIGHTS``), then a pickled payload.  Both ends are the same program
(a parent and the children it forked), which is what makes pickle
acceptable here.
"""
import array
import os
import pickle
import socket
import struct

from .. import uapi

_HEADER = struct.Struct("<Q")
_CREDS = struct.Struct("iII")
MAX_FDS = 16

#: The ioctls whose reply may carry a new adapter fd, by their structures.
ADAPTER_FD_IOCTLS = {uapi.DK_CXLFLASH_ATTACH: uapi.dk_cxlflash_attach,
                     uapi.DK_CXLFLASH_RECOVER_AFU: uapi.dk_cxlflash_recover_afu}


def socketpair():
    """A connected pair that passes credentials."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return a, b


def send(sock, obj, fds=()):
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    anc = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS,
            _CREDS.pack(os.getpid(), os.getuid(), os.getgid()))]
    if fds:
        anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
    sock.sendmsg([_HEADER.pack(len(payload))], anc)
    sock.sendall(payload)


def recv(sock):
    """(payload, fds, sender pid); raises EOFError when the peer is gone."""
    cmsg_space = socket.CMSG_SPACE(_CREDS.size) + socket.CMSG_SPACE(MAX_FDS * 4)
    head = b""
    fds, pid = [], None
    while len(head) < _HEADER.size:
        data, anc, flags, _ = sock.recvmsg(_HEADER.size - len(head), cmsg_space)
        if not data:
            for fd in fds:
                os.close(fd)
            raise EOFError("the peer closed the connection")
        head += data
        for level, kind, body in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(body[:len(body) - len(body) % 4])
                fds.extend(a)
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDS.unpack(body[:_CREDS.size])[0]
    (n,) = _HEADER.unpack(head)
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            for fd in fds:
                os.close(fd)
            raise EOFError("the peer closed the connection mid-message")
        got += k
    return pickle.loads(buf), fds, pid


def parent_pid(pid):
    """The parent of process ``pid`` (from /proc), or 0."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0
