"""The shared-driver plumbing: message framing with credentials and file
descriptors, table replicas, and a child's requests served as its own
process."""
import errno
import os

import numpy as np
import pytest

import cxlflash
from cxlflash import uapi
from cxlflash._core.tables import ResourceTable, TABLE_GONE, TABLE_IN_ERROR
from cxlflash.server import wire
from cxlflash.server.client import ReplicaContext
from forking import in_child

CHUNK = 1 << 16


def test_load_slot_builds_and_replaces_entries():
    t = ResourceTable(8)
    lxt = np.array([(5 << 16) | (3 << 4) | 1, (9 << 16) | (3 << 4) | 1], dtype=np.uint64)
    t.load_slot(3, 0, 1, 16, lxt)
    assert t.open_handles() == [3] and t.rht_out == 1
    assert t.entry(3)["perms"] == 1 and t.lxt_count(3) == 2
    assert t.translate(3, CHUNK + 7) == (9 << 16) | 7
    with pytest.raises(cxlflash.AfuError) as e:
        t.translate(3, 0, write=True)                      # read-only entry
    assert e.value.afu_rc == 0x05
    with pytest.raises(ValueError):
        t.load_slot(3, 0, 3, 16, lxt)                      # open: needs replace
    t.load_slot(3, 0, 3, 16, lxt[:1], replace=True)
    assert t.rht_out == 1 and t.lxt_count(3) == 1 and t.perms(3) == 3
    t.load_slot(0, 1, 3, 2, None, lun_id=0x1000, last_lba=99, valid=0x80)
    assert t.entry(0) == {"handle": 0, "open": True, "format": 1, "perms": 3,
                          "lun_id": 0x1000, "valid": 0x80, "port_sel": 2, "last_lba": 99}
    with pytest.raises(ValueError):
        t.load_slot(1, 2, 3, 16)                           # no such format
    with pytest.raises(ValueError):
        t.load_slot(1, 0, 3, 0)                            # nmask 0 is a free slot
    with pytest.raises(IndexError):
        t.load_slot(8, 0, 3, 16)


def test_replica_follows_records_in_place():
    class B:
        fd, zero_mode, block_size = -1, 0, 4096
    lxt = np.array([(4 << 16) | 0x31], dtype=np.uint64)

    def slot(lxt):
        return (0, wire.SLOT_VIRTUAL, 3, 16, 0, 0, 0, 4096, 1 << 20, b"w" * 16, lxt)

    epoch = bytearray(8)
    rep = ReplicaContext(1, 4, epoch)
    rep.update(0, 0, [slot(lxt)], lambda wwid: B())
    table = rep.table
    assert table.translate(0, 5) == (4 << 16) | 5
    grown = np.concatenate([lxt, np.array([(6 << 16) | 0x31], dtype=np.uint64)])
    rep.update(0, 0, [slot(grown)], lambda wwid: B())
    assert rep.table is table and table.lxt_count(0) == 2  # the same table, updated
    closed = (0, wire.SLOT_CLOSED, 0, 0, 0, 0, 0, 0, 0, bytes(16), None)
    rep.update(wire.CTX_IN_ERROR, 0, [closed], lambda wwid: B())
    assert table.open_handles() == [] and table.state == TABLE_IN_ERROR
    rep.retire()
    assert table.state == TABLE_GONE


def test_child_ioctl_errors_keep_the_kernel_order():
    """A child's malformed request is judged by the parent's driver, in the
    dispatch order of spec §3 (EFAULT only after the fence)."""
    a = cxlflash.Adapter()
    try:
        w = a.add_lun(None, size=4 * CHUNK * 4096)
        d = a.open_disk(w)
        ro = bytes(uapi.dk_cxlflash_attach(hdr=uapi.dk_cxlflash_hdr(flags=os.O_RDWR)))
        requests = ((uapi.DK_CXLFLASH_ATTACH, None),
                    (uapi.DK_CXLFLASH_ATTACH, bytearray(8)),
                    (0xC090CA7F, uapi.dk_cxlflash_attach()),
                    (uapi.DK_CXLFLASH_ATTACH, ro))        # took effect, no copy-out

        def child():
            codes = []
            for req, arg in requests:
                try:
                    cxlflash.ioctl(d, req, arg)
                    codes.append(0)
                except cxlflash.CxlFlashError as e:
                    codes.append(e.errno)
            return codes

        assert in_child(child) == [errno.EFAULT, errno.EFAULT, errno.EINVAL, errno.EFAULT]
    finally:
        a.close()


def test_a_reset_in_the_owner_reaches_the_childs_data_path():
    """After the parent resets the AFU, the child's I/O finds its context
    in error (the all-ones MMIO read); the Pythonic layer recovers it."""
    a = cxlflash.Adapter()
    try:
        w = a.add_lun(None, size=4 * CHUNK * 4096)
        ctx = a.open_disk(w).attach()
        v = ctx.create_virtual(16)
        v.write(0, b"P" * 4096)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        pid = os.fork()
        if pid == 0:                                       # pragma: no cover (child)
            res = []
            try:
                ctx.clone_after_fork()
                cid, h = ctx.context_id, v.handle
                res.append(a.read(cid, h, 0, 1)[:1] == b"P")
                os.write(from_child_w, b"c")               # cloned: parent, reset now
                os.read(to_child_r, 1)
                try:
                    a.read(cid, h, 0, 1)                   # the AFU level: in error
                    res.append(False)
                except cxlflash.AdapterResetError:
                    res.append(True)
                res.append(bytes(v.read(0, 1))[:1] == b"P")   # recovered, re-driven
                res.append(ctx.context_id != cid and ctx.resets == 1)
            except BaseException:
                res.append(False)
            os.write(from_child_w, bytes(int(x) for x in res))
            os._exit(0)
        assert os.read(from_child_r, 1) == b"c"
        a.reset()
        os.write(to_child_w, b"r")
        got = os.read(from_child_r, 16)
        os.waitpid(pid, 0)
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            os.close(fd)
        assert list(got) == [1, 1, 1, 1]
    finally:
        a.close()


def test_a_child_whose_owner_is_gone_gets_enodev():
    """When the connection to the owner is gone (the owner exited), a
    child's ioctls fail ENODEV with a message that says so."""
    a = cxlflash.Adapter()
    try:
        w = a.add_lun(None, size=4 * CHUNK * 4096)
        d = a.open_disk(w)

        def child():
            a._client().sock.close()                       # as if the owner exited
            try:
                d.attach()
            except cxlflash.CxlFlashError as e:
                return e.errno, str(e)
            return None

        err, message = in_child(child)
        assert err == errno.ENODEV and "is gone" in message
    finally:
        a.close()


# -- the wire, message by message ------------------------------------------------------

import socket
import struct
import threading

from hypothesis import given, strategies as st

from cxlflash.server.client import DaemonChannel
from fuzzing import fuzz_settings

_CREDS = struct.Struct("iII")


def _open_fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair():
    """A connected pair with credentials passing on (as the driver has)."""
    a, b = wire.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def _send_raw(sock, data, fds=(), creds=True):
    anc = []
    if creds:
        anc.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS,
                    _CREDS.pack(os.getpid(), os.getuid(), os.getgid())))
    if fds:
        anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds)))
    sock.sendmsg([data], anc)


def test_a_request_carries_the_kernels_credentials(pair):
    a, b = pair
    me = (os.getpid(), os.getuid(), os.getgid())
    rx = wire.request_receiver(b)
    wire.send_request(a, wire.OP_DISK_IOCTL, uapi.DK_CXLFLASH_DETACH, b"payload")
    assert wire.recv_request(rx) == (wire.OP_DISK_IOCTL, uapi.DK_CXLFLASH_DETACH,
                                     b"payload", me)
    # Without SCM_CREDENTIALS the kernel supplies the sender's (SO_PASSCRED).
    _send_raw(a, wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_LUNS, 0, 0),
              creds=False)
    assert wire.recv_request(rx)[3] == me


def test_a_request_larger_than_the_socket_buffer_arrives_whole(pair):
    a, b = pair
    payload = os.urandom(wire.MAX_REQUEST)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    t = threading.Thread(target=wire.send_request, args=(a, wire.OP_ADMIN, 7, payload))
    t.start()
    op, request, got, _ = wire.recv_request(wire.request_receiver(b))
    t.join()
    assert (op, request, bytes(got)) == (wire.OP_ADMIN, 7, payload)


@pytest.mark.parametrize("data, message", [
    (wire.REQUEST.pack(b"CXLG", wire.VERSION, wire.OP_LUNS, 0, 0), "bad magic"),
    (wire.REQUEST.pack(wire.MAGIC, 2, wire.OP_LUNS, 0, 0), "protocol version 2"),
    (wire.REQUEST.pack(wire.MAGIC, 0, wire.OP_LUNS, 0, 0), "protocol version 0"),
    (wire.REQUEST.pack(wire.MAGIC, wire.VERSION, 0, 0, 0), "unknown op 0"),
    (wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_SPAWN + 1, 0, 0), "unknown op"),
    (wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_LUNS, 0, wire.MAX_REQUEST + 1),
     "a message of"),
    (wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_LUNS, 0, 0xFFFFFFFF),
     "a message of"),
])
def test_a_request_that_breaks_a_rule(pair, data, message):
    a, b = pair
    _send_raw(a, data)
    with pytest.raises(wire.ProtocolError, match=message):
        wire.recv_request(wire.request_receiver(b))


def test_the_end_of_the_stream_at_every_point(pair):
    a, b = pair
    a.close()
    with pytest.raises(EOFError):                      # before a byte: clean
        wire.recv_request(wire.request_receiver(b))
    for cut in (1, 8, 15):                             # in the header
        x, y = wire.socketpair()
        _send_raw(x, wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_LUNS, 0, 4)[:cut])
        x.close()
        with pytest.raises(wire.ProtocolError, match="mid-header"):
            wire.recv_request(wire.request_receiver(y))
        y.close()
    x, y = wire.socketpair()                           # in the payload
    _send_raw(x, wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_LUNS, 0, 4) + b"ab")
    x.close()
    with pytest.raises(wire.ProtocolError, match="mid-message"):
        wire.recv_request(wire.request_receiver(y))
    y.close()


@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_descriptors_on_a_request_are_refused_and_closed(pair, n):
    a, b = pair
    r, w = os.pipe()
    try:
        before = _open_fds()
        _send_raw(a, wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_LUNS, 0, 0),
                  fds=[r] * n)
        with pytest.raises(wire.ProtocolError):
            wire.recv_request(wire.request_receiver(b))
        assert _open_fds() == before                   # none received stays open
    finally:
        os.close(r)
        os.close(w)


def test_a_reply_is_checked_and_its_descriptors_closed_on_error(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        wire.send_reply(a, wire.OP_LUNS, 0, b"x" * 16, [r])
        err, body, fds = wire.recv_reply(wire.reply_receiver(b), wire.OP_LUNS)
        assert (err, bytes(body), len(fds)) == (0, b"x" * 16, 1)
        wire.close_fds(fds)
        before = _open_fds()
        for send, message in (
                (lambda: wire.send_reply(a, wire.OP_INFO, 0, b"", [r]), "does not answer"),
                (lambda: wire.send_reply(a, wire.OP_LUNS, 0, b"", [r] * (wire.MAX_FDS + 1)),
                 "ancillary data"),
                (lambda: _send_raw(a, wire.REPLY.pack(wire.MAGIC, wire.VERSION, wire.OP_LUNS,
                                                      0, wire.MAX_REPLY + 1), fds=[r]),
                 "a message of"),
                (lambda: _send_raw(a, wire.REPLY.pack(b"XXXX", wire.VERSION, wire.OP_LUNS,
                                                      0, 0), fds=[r]), "bad magic")):
            send()
            with pytest.raises(wire.ProtocolError, match=message):
                wire.recv_reply(wire.reply_receiver(b), wire.OP_LUNS)
            assert _open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_an_error_reply_is_bounded_utf8(pair):
    a, b = pair
    wire.send_error(a, wire.OP_LUNS, 0, "é" * 10000)
    err, body, fds = wire.recv_reply(wire.reply_receiver(b), wire.OP_LUNS)
    assert err == errno.EIO and fds == [] and len(body) <= 4096   # errno 0 is no success
    bytes(body).decode("utf-8", "replace")


# -- tables ------------------------------------------------------------------------------

LXT = np.array([(5 << 16) | 0x31, (9 << 16) | 0x31], dtype=np.uint64)
RECORDS = [
    (0x1000_0000_0001, 0x1000, 16, wire.CTX_IN_ERROR, 7, [
        (3, wire.SLOT_VIRTUAL, 3, 16, 0, 0, 0, 4096, 1 << 20, b"w" * 16, LXT),
        (0, wire.SLOT_DIRECT, 1, 2, 0x80, 0x1000, 99, 512, 99, b"d" * 16, None),
        (5, wire.SLOT_CLOSED, 0, 0, 0, 0, 0, 0, 0, bytes(16), None)]),
    (0x1001_0000_0002, 0x1001, 1, wire.CTX_GONE, 0, []),
]


def _same(records):
    out = []
    for cid, cookie, size, flags, epoch, slots in records:
        out.append((cid, cookie, size, flags, epoch,
                    [s[:-1] + (None if s[-1] is None else list(s[-1]),) for s in slots]))
    return out


def test_tables_round_trip():
    got = wire.unpack_tables(wire.pack_tables(RECORDS))
    assert _same(got) == _same(RECORDS)
    assert got[0][5][0][-1].dtype == np.uint64
    assert wire.unpack_tables(wire.pack_tables([])) == []
    packed = wire.pack_tables(RECORDS)
    assert _same(wire.unpack_tables(b"pre" + packed, 3)) == _same(RECORDS)


def _context(rht_size=16, flags=0, nslots=1, cid=1):
    return wire.CONTEXT.pack(cid, 1, rht_size, flags, nslots, 0)


def _slot(h=0, kind=wire.SLOT_VIRTUAL, perms=3, nmask=16, n=0):
    return wire.SLOT.pack(h, kind, perms, nmask, 0, 0, 0, n, 4096, 1 << 20, b"w" * 16)


@pytest.mark.parametrize("data, message", [
    (b"", "truncated"),
    (b"\1\0\0", "truncated"),
    (wire.COUNT.pack(65537), "contexts in one reply"),
    (wire.COUNT.pack(2) + _context(nslots=0), "truncated"),
    (wire.COUNT.pack(1) + _context(rht_size=0, nslots=0), "malformed context"),
    (wire.COUNT.pack(1) + _context(rht_size=wire.MAX_RHT + 1, nslots=0), "malformed context"),
    (wire.COUNT.pack(1) + _context(rht_size=2, nslots=3), "malformed context"),
    (wire.COUNT.pack(1) + _context(flags=4, nslots=0), "malformed context"),
    (wire.COUNT.pack(1) + _context(), "truncated"),
    (wire.COUNT.pack(1) + _context() + _slot(h=16), "malformed slot"),
    (wire.COUNT.pack(1) + _context() + _slot(kind=3), "malformed slot"),
    (wire.COUNT.pack(1) + _context() + _slot(perms=4), "malformed slot"),
    (wire.COUNT.pack(1) + _context() + _slot(nmask=0), "without a port mask"),
    (wire.COUNT.pack(1) + _context() + _slot(kind=wire.SLOT_DIRECT, n=1) + bytes(8),
     "not virtual"),
    (wire.COUNT.pack(1) + _context() + _slot(n=2) + bytes(8), "truncated LXT"),
    (wire.COUNT.pack(1) + _context() + _slot(n=0x20000000), "truncated LXT"),
    (wire.COUNT.pack(0) + b"x", "after the tables"),
    (wire.pack_tables(RECORDS) + bytes(1), "after the tables"),
])
def test_malformed_tables(data, message):
    with pytest.raises(wire.ProtocolError, match=message):
        wire.unpack_tables(data)


def test_a_record_with_a_handle_beyond_the_replica_is_refused():
    epoch = bytearray(8)
    rep = ReplicaContext(1, 4, epoch)
    slot = (4, wire.SLOT_CLOSED, 0, 0, 0, 0, 0, 0, 0, bytes(16), None)
    with pytest.raises(wire.ProtocolError):
        rep.update(0, 0, [slot], lambda wwid: None)


@fuzz_settings(max_examples=300)
@given(st.binary(max_size=400) | st.builds(
    lambda packed, at, junk: packed[:at] + junk + packed[at + len(junk):],
    st.sampled_from([wire.pack_tables(RECORDS), wire.pack_tables(RECORDS[:1])]),
    st.integers(0, 300), st.binary(min_size=1, max_size=8)))
def test_fuzz_tables_only_ever_raise_protocol_errors(data):
    """Whatever the bytes, the decoder returns checked records or raises
    ProtocolError (no struct.error, IndexError, numpy errors ...)."""
    try:
        records = wire.unpack_tables(data)
    except wire.ProtocolError:
        return
    for cid, cookie, size, flags, epoch, slots in records:
        assert 1 <= size <= wire.MAX_RHT and len(slots) <= size and not flags & ~3
        for s in slots:
            assert s[0] < size and s[1] <= wire.SLOT_DIRECT
            assert (s[-1] is not None) == (s[1] == wire.SLOT_VIRTUAL)


# -- a client facing a broken driver ----------------------------------------------------


def _fake_driver(answer):
    """One end of a pair served by a thread that reads one request and
    answers with ``answer(sock)``; the client's end."""
    mine, theirs = wire.socketpair()

    def serve():
        try:
            wire.recv_request(wire.request_receiver(theirs))
            answer(theirs)
        finally:
            theirs.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return mine, t


def _memfd(size=4096):
    fd = os.memfd_create("test-epoch")
    os.ftruncate(fd, size)
    return fd


def _reply_with(payload, nfds, size=4096):
    def answer(sock):
        fds = [_memfd(size) for _ in range(nfds)]
        try:
            wire.send_reply(sock, wire.OP_HELLO, 0, payload, fds)
        finally:
            wire.close_fds(fds)
    return answer


HELLO_OK = wire.HELLO_REPLY.pack(1, 2, 256, 0)


@pytest.mark.parametrize("answer, err", [
    (lambda s: wire.send_error(s, wire.OP_HELLO, errno.EMFILE, "Too many open files"),
     errno.EMFILE),
    (_reply_with(HELLO_OK[:-1], 1), errno.EPROTO),
    (_reply_with(HELLO_OK, 0), errno.EPROTO),
    (_reply_with(HELLO_OK, 2), errno.ENODEV),        # more than a HELLO carries
    (_reply_with(HELLO_OK, 1, size=0), errno.EPROTO),  # an epoch that cannot be mapped
    (lambda s: s.sendall(b"\0" * 16), errno.ENODEV),
    (lambda s: None, errno.ENODEV),                     # hangs up
], ids=["refused", "short", "no-epoch", "two-fds", "empty-epoch", "garbage", "hang-up"])
def test_a_client_facing_a_broken_driver(answer, err):
    """A HELLO the client cannot use: an OSError with an errno that says
    why, and no descriptor left behind in the client."""
    before = _open_fds()
    sock, t = _fake_driver(answer)
    with pytest.raises(cxlflash.CxlFlashError) as e:
        DaemonChannel(sock, "the test's driver")
    t.join(10)
    sock.close()
    assert e.value.errno == err, e.value
    assert "the test's driver" in str(e.value)
    assert _open_fds() == before


def _in_child_send(sock, data):
    """Send ``data`` on ``sock`` from a forked child (its own credentials)."""
    pid = os.fork()
    if pid == 0:                                           # pragma: no cover (child)
        try:
            _send_raw(sock, data)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("cut", [8, wire.HEADER_SIZE + 4])
def test_a_message_whose_bytes_come_from_two_processes(pair, cut):
    """A child that shares its parent's connection completes a message the
    parent began: the message is neither the parent's nor the child's (the
    kernel names each sender; a request is one process's) -- refused."""
    a, b = pair
    msg = wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_DISK_IOCTL, 0, 16) + bytes(16)
    _send_raw(a, msg[:cut])
    _in_child_send(a, msg[cut:])
    with pytest.raises(wire.ProtocolError, match="two processes"):
        wire.recv_request(wire.request_receiver(b))


def test_messages_of_one_process_in_one_read(pair):
    """Requests sent back to back (read together) each keep their sender."""
    a, b = pair
    one = wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_LUNS, 0, 0)
    two = wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_OPEN_DISK, 5, 3) + b"abc"
    _send_raw(a, one + two)
    _in_child_send(a, one)
    rx = wire.request_receiver(b)
    me = (os.getpid(), os.getuid(), os.getgid())
    assert wire.recv_request(rx) == (wire.OP_LUNS, 0, b"", me)
    assert wire.recv_request(rx) == (wire.OP_OPEN_DISK, 5, b"abc", me)
    op, _, _, creds = wire.recv_request(rx)
    assert op == wire.OP_LUNS and creds[0] != os.getpid()      # the child's


def test_status_while_handles_close_in_another_thread():
    """What ``cxlflash ctl status`` and every fault test's polling read:
    the driver's status while another thread (a release, a reclaim)
    closes handles.  It was a ValueError ("resource handle N is not
    open": a handle listed open, closed before its chunks were counted),
    which the daemon answers as EINVAL "a malformed request"."""
    import time
    a = cxlflash.Adapter()
    try:
        w = a.add_lun(None, size=64 * CHUNK * 4096)
        ctx = a.open_disk(w).attach()
        stop = threading.Event()
        errors = []

        def churn():
            while not stop.is_set():
                vs = [ctx.create_virtual(CHUNK) for _ in range(16)]
                for v in vs:
                    v.close()

        t = threading.Thread(target=churn)
        t.start()
        calls = 0
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 1.5 and not errors:
                try:
                    a.status()
                    calls += 1
                except Exception as e:                     # noqa: BLE001
                    errors.append(repr(e))
        finally:
            stop.set()
            t.join()
        assert errors == [] and calls > 100, (calls, errors)
    finally:
        a.close()
