"""The NBD server's Python entry points with extreme and wrong values:
each is refused before anything is made (no context left behind), with
the errno or exception type the README's "Arguments" rule gives."""
import errno

import pytest

import cxlflash
from cxlflash.server.nbd import (NbdServer, parse_export, parse_hostport, parse_listen,
                                 parse_size)

GIB = 1 << 30


@pytest.fixture
def server():
    a = cxlflash.Adapter()
    a.add_lun(None, size=GIB)
    srv = NbdServer(a)
    yield srv
    srv.close()
    a.close()


def _contexts(srv):
    return len(srv.adapter.status()["contexts"])


@pytest.mark.parametrize("size, exc, err", [
    (0, cxlflash.CxlFlashError, errno.EINVAL),
    (-1, cxlflash.CxlFlashError, errno.EINVAL),
    (1 << 63, cxlflash.CxlFlashError, errno.EINVAL),
    (1 << 64, cxlflash.CxlFlashError, errno.EINVAL),
    ((1 << 63) - 1, cxlflash.CxlFlashError, errno.EINVAL),  # beyond the LUN
    (2 * GIB, cxlflash.CxlFlashError, errno.EINVAL),
    (1.5, TypeError, None),
    ("1G", TypeError, None),
    (None, TypeError, None),
])
def test_add_export_sizes(server, size, exc, err):
    with pytest.raises(exc) as e:
        server.add_export("x", size)
    if err is not None:
        assert e.value.errno == err
    assert server.exports == {}
    assert _contexts(server) == 0


@pytest.mark.parametrize("name, exc", [
    (3, TypeError), (b"x", TypeError), (None, TypeError),
    ("a\0b", ValueError), ("x" * 4097, ValueError), ("\udc80", ValueError),
])
def test_add_export_names(server, name, exc):
    with pytest.raises(exc):
        server.add_export(name, 4096)
    assert server.exports == {} and _contexts(server) == 0


def test_add_export_odd_sizes_and_duplicates(server):
    e = server.add_export("one", 1)              # one byte, one block allocated
    assert e.size == 1 and e.lun.size == 1
    assert server.add_export("é" * 2048, 4097).lun.size == 2   # 4096 bytes of UTF-8
    with pytest.raises(cxlflash.CxlFlashError) as err:
        server.add_export("one", 4096)
    assert err.value.errno == errno.EEXIST
    with pytest.raises(ValueError):
        server.add_export("d", 4096, direct=True)   # a direct export has no size
    assert _contexts(server) == 2


def test_resize_export_extremes(server):
    server.add_export("v", 1 << 20)
    for size, err in ((0, errno.EINVAL), (-5, errno.EINVAL), (1 << 64, errno.EINVAL),
                      (2 * GIB, errno.EINVAL)):
        with pytest.raises(cxlflash.CxlFlashError) as e:
            server.resize_export("v", size)
        assert e.value.errno == err, size
        assert server.exports["v"].size == 1 << 20
    with pytest.raises(cxlflash.CxlFlashError) as e:
        server.resize_export("nope", 4096)
    assert e.value.errno == errno.ENOENT
    server.resize_export("v", 3 << 20)
    assert server.exports["v"].size == 3 << 20 and server.exports["v"].lun.size == 768
    server.resize_export("v", 4096)                  # nobody connected: may shrink
    assert server.exports["v"].lun.size == 1


@pytest.mark.parametrize("threads, exc", [(0, cxlflash.CxlFlashError),
                                          (257, cxlflash.CxlFlashError),
                                          (-1, cxlflash.CxlFlashError),
                                          (1 << 70, cxlflash.CxlFlashError),
                                          (2.0, TypeError), ("4", TypeError)])
def test_server_threads(threads, exc):
    a = cxlflash.Adapter()
    try:
        with pytest.raises(exc):
            NbdServer(a, threads=threads)
    finally:
        a.close()


def test_parsers():
    assert parse_size("512") == 512
    assert parse_size("4k") == 4096 and parse_size("1M") == 1 << 20
    assert parse_size("2GiB") == 2 << 30 and parse_size("1T") == 1 << 40
    for bad in ("", "0", "-1", "1.5G", "G", "1X", "1 G G", "١٢", "0x10"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_export("a=1G") == ("a", 1 << 30)
    assert parse_export("whole=direct") == ("whole", None)
    assert parse_export("w=DIRECT") == ("w", None)
    for bad in ("a", "=1G", "a=", "a=0", "a=lots"):
        with pytest.raises(ValueError):
            parse_export(bad)
    assert parse_listen("unix:/tmp/s") == ("unix", "/tmp/s")
    assert parse_listen("tcp:10809") == ("tcp", ("127.0.0.1", 10809))
    assert parse_listen("tcp:0.0.0.0:1") == ("tcp", ("0.0.0.0", 1))
    assert parse_listen("tcp:[::1]:2") == ("tcp", ("::1", 2))
    for bad in ("unix:", "tcp:", "tcp:host:", "tcp:70000", "tcp:-1", "udp:1", "/tmp/s"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    assert parse_hostport("99") == ("127.0.0.1", 99)


def test_an_adapter_without_a_lun():
    a = cxlflash.Adapter()
    srv = NbdServer(a)
    try:
        with pytest.raises(cxlflash.CxlFlashError) as e:
            srv.add_export("x", 4096)
        assert e.value.errno == errno.ENODEV and "add_lun" in str(e.value)
    finally:
        srv.close()
        a.close()


def test_a_connected_adapter_is_refused(tmp_path):
    import daemons
    d = daemons.start()
    a = cxlflash.connect(d.socket)
    try:
        with pytest.raises(cxlflash.CxlFlashError) as e:
            NbdServer(a)
        assert e.value.errno == errno.EINVAL and "cxlflash serve --nbd" in str(e.value)
    finally:
        a.close()
        d.stop()
