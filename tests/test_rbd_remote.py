"""The remote store (``cxlflash/_core/store.pyx``, ``includes/store.h``): how
a client of the daemon, or a forked child, reaches an RBD image only the
serving process holds -- over sockets whose requests a thread of the
serving process runs on the image.

The serving end must survive any bytes a peer sends: a malformed request
ends that socket only, never the process or another client's socket."""
import errno
import os
import random
import socket
import struct
import threading

import numpy as np
import pytest

from cxlflash.backing import RbdBacking, RemoteBacking
from cxlflash._core.engine import Engine
from cxlflash._core.store import (RemoteStore, serve_remote, store_flush, store_kind,
                                  store_size)

from ceph import MIB

REQ = struct.Struct("=IIQQ")        # magic, op, offset, len
REP = struct.Struct("=IiQ")         # magic, err, res
MAGIC = 0x43585253
READ, WRITE, FLUSH, ZERO, SIZE = 1, 2, 3, 4, 5
MAX = 8 << 20


@pytest.fixture
def image(ceph):
    _, lun = ceph.image(64 * MIB)
    b = RbdBacking(lun)
    try:
        yield b
    finally:
        b.close()


def _recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            return out
        out += chunk
    return out


def _call(s, op, offset=0, length=0, data=b""):
    s.sendall(REQ.pack(MAGIC, op, offset, length) + data)
    magic, err, res = REP.unpack(_recv_exact(s, REP.size))
    assert magic == MAGIC
    payload = _recv_exact(s, res) if op == READ and err == 0 else b""
    return err, res, payload


def test_the_protocol_answers_every_operation(image):
    (fd,) = image.serve(1)
    with socket.socket(fileno=fd) as s:
        data = os.urandom(8192)
        assert _call(s, WRITE, 4096, len(data), data)[:2] == (0, len(data))
        err, res, got = _call(s, READ, 4096, len(data))
        assert (err, res, got) == (0, len(data), data)
        assert _call(s, SIZE)[:2] == (0, 64 * MIB)
        assert _call(s, FLUSH)[0] == 0
        assert _call(s, ZERO, 4096, 4096)[0] == 0
        assert _call(s, READ, 4096, 4096)[2] == bytes(4096)
        # At the image's end a read moves nothing (the store ended there).
        assert _call(s, READ, 64 * MIB, 4096)[:2] == (0, 0)
        # A read crossing the end moves what there is.
        assert _call(s, READ, 64 * MIB - 4096, 8192)[:2] == (0, 4096)


BAD_REQUESTS = [
    ("wrong magic", REQ.pack(0xDEADBEEF, READ, 0, 4096)),
    ("op 0", REQ.pack(MAGIC, 0, 0, 0)),
    ("op past the last", REQ.pack(MAGIC, SIZE + 1, 0, 0)),
    ("op 2**32-1", REQ.pack(MAGIC, 0xFFFFFFFF, 0, 0)),
    ("a read over the maximum", REQ.pack(MAGIC, READ, 0, MAX + 1)),
    ("a write over the maximum", REQ.pack(MAGIC, WRITE, 0, 1 << 63)),
    ("an offset past 2**63", REQ.pack(MAGIC, READ, 1 << 63, 4096)),
    ("a range that wraps", REQ.pack(MAGIC, ZERO, (1 << 63) - 1, 2)),
    ("a short header", REQ.pack(MAGIC, READ, 0, 4096)[:7]),
    ("a write without its data", REQ.pack(MAGIC, WRITE, 0, 4096) + b"x" * 100),
]


@pytest.mark.parametrize("what,payload", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_a_malformed_request_ends_that_socket_only(image, what, payload):
    good_fd, bad_fd = image.serve(2)
    with socket.socket(fileno=good_fd) as good, socket.socket(fileno=bad_fd) as bad:
        bad.sendall(payload)
        bad.shutdown(socket.SHUT_WR)            # a short one ends at EOF
        bad.settimeout(10)
        assert bad.recv(64) == b"", f"{what}: the server answered or kept the socket"
        # The other socket of the same client, and the image, still work.
        data = os.urandom(4096)
        assert _call(good, WRITE, 0, 4096, data)[:2] == (0, 4096)
        assert _call(good, READ, 0, 4096)[2] == data


def test_random_bytes_never_hurt_the_serving_process(image):
    rng = random.Random(15)
    for i in range(40):
        (fd,) = image.serve(1)
        with socket.socket(fileno=fd) as s:
            n = rng.choice([1, 23, 24, 25, 4096, 70000])
            blob = bytes(rng.getrandbits(8) for _ in range(min(n, 4096)))
            if rng.random() < 0.5:      # a valid header, then anything
                blob = REQ.pack(MAGIC, rng.randint(0, 7), rng.getrandbits(64),
                                rng.getrandbits(rng.choice([4, 16, 64]))) + blob
            try:
                s.sendall(blob)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(10)
                while s.recv(65536):
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass
    (fd,) = image.serve(1)
    with socket.socket(fileno=fd) as s:
        assert _call(s, SIZE)[:2] == (0, 64 * MIB)


def test_a_remote_store_is_the_image_seen_through_the_server(image):
    remote = RemoteBacking(image.serve(4), 4096)
    try:
        assert store_kind(remote.fd) == "remote"
        assert store_kind(image.fd) == "rbd"
        assert store_size(remote.fd) == 64 * MIB == remote.size
        assert store_flush(remote.fd) == 0
        eng = remote.engine()
        assert eng.kind == "remote"
        n = 256
        offs = np.arange(n, dtype=np.uint64) * 4096 * 3
        data = bytearray(os.urandom(4096 * n))
        eng.raw_listio(remote.fd, np.full(n, 2, dtype=np.uint64), offs, 4096, data, qd=8)
        back = bytearray(4096 * n)
        image.engine().raw_listio(image.fd, np.full(n, 1, dtype=np.uint64), offs, 4096,
                                  back, qd=32)
        assert back == data
        # The adapter's own engine refuses a store's descriptor.
        other = Engine("threads")
        try:
            with pytest.raises(OSError) as e:
                other.raw_listio(remote.fd, [1], [0], 4096, bytearray(4096))
            assert e.value.errno == errno.EINVAL
        finally:
            other.close()
    finally:
        remote.close()


def test_a_server_that_goes_away_fails_requests_with_eio(ceph):
    _, lun = ceph.image(64 * MIB)
    image = RbdBacking(lun)
    remote = RemoteBacking(image.serve(2), 4096)
    try:
        image.close()                   # the serving process's end goes away
        with pytest.raises(OSError) as e:
            store_size(remote.fd)
        assert e.value.errno == errno.EIO
        # And stays failed (not out of step with a server that is gone).
        assert store_flush(remote.fd) == errno.EIO
    finally:
        remote.close()
        image.close()


def test_remote_store_arguments(image):
    with pytest.raises(OSError) as e:
        RemoteStore([])
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        RemoteStore(list(range(100, 109)))          # more than 8 links
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        RemoteStore([-5])
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        serve_remote(0, 12345)                      # names no store
    assert e.value.errno == errno.EBADF
    with pytest.raises(OSError) as e:
        store_size(2 ** 31 - 1)
    assert e.value.errno == errno.EBADF
    # A descriptor cannot name two stores.
    a, b = socket.socketpair()
    try:
        with pytest.raises(OSError) as e:
            RemoteStore([image.fd])
        assert e.value.errno == errno.EEXIST
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("fd", [-2, -1, 2 ** 31, 2 ** 63, 0])
def test_an_engine_of_a_store_needs_a_store(fd):
    # -1 and 0 are descriptors that name no store (0 is stdin); the rest
    # are no descriptors at all.
    with pytest.raises(OSError) as e:
        Engine(store=fd)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(TypeError):
        Engine(store=1.5)


def test_an_image_serves_a_bounded_number_of_sockets(image, monkeypatch):
    import time
    import cxlflash.backing as backing
    monkeypatch.setattr(backing, "MAX_SERVING", 4)
    first = image.serve(4)
    with pytest.raises(OSError) as e:
        image.serve(1)
    assert e.value.errno == errno.EMFILE
    for fd in first:                    # those clients go: their threads end
        os.close(fd)
    deadline = time.monotonic() + 10
    while True:
        try:
            (fd,) = image.serve(1)
            break
        except OSError:
            assert time.monotonic() < deadline, "the ended sockets were not freed"
            time.sleep(0.05)
    with socket.socket(fileno=fd) as s:
        assert _call(s, SIZE)[:2] == (0, 64 * MIB)
