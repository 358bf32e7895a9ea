"""The NBD server inside the driver's world: exports recover from an AFU
reset like any context, share the allocator with other users of the LUN,
and end cleanly when the server stops under connected clients."""
import os
import socket
import struct
import subprocess
import threading

import pytest

import cxlflash
from cxlflash.server.nbd import NbdServer

MIB = 1 << 20


@pytest.fixture
def served(tmp_path):
    a = cxlflash.Adapter()
    a.add_lun(None, size=1 << 30)
    srv = NbdServer(a, threads=4)
    srv.add_export("v", 16 * MIB)
    path = srv.listen_unix(str(tmp_path / "nbd.sock"))
    srv.start()
    yield a, srv, f"nbd+unix:///v?socket={path}"
    srv.close()
    a.close()


def qemu_io(uri, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args + [uri], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "failed" not in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    return p.stdout


def test_an_export_recovers_from_an_afu_reset(served):
    a, srv, uri = served
    qemu_io(uri, "write -P 0x5a 0 1M")
    cid = srv.exports["v"].context.context_id
    a.reset()                                  # every context in error
    # The next requests recover the export's context (a new id) and go on.
    qemu_io(uri, "read -P 0x5a 0 1M", "write -P 0x6b 1M 64k", "read -P 0x6b 1M 64k")
    assert srv.exports["v"].context.context_id != cid


def test_exports_take_their_chunks_from_the_shared_allocator(served):
    a, srv, uri = served
    disk = a.open_disk(a.luns()[0])
    ctx = disk.attach()
    before = ctx.create_virtual(0)
    lun_chunks = (1 << 30) // (65536 * 4096)
    # The export holds one chunk (16 MiB of 4 KiB blocks); the rest is free.
    with pytest.raises(cxlflash.CxlFlashError):
        before.set_size(lun_chunks * 65536)
    assert before.set_size((lun_chunks - 1) * 65536) == (lun_chunks - 1) * 65536
    ctx.close()


def test_a_server_stopped_under_connected_clients(tmp_path):
    a = cxlflash.Adapter()
    a.add_lun(None, size=256 * MIB)
    srv = NbdServer(a, threads=8)
    srv.add_export("v", 16 * MIB)
    path = srv.listen_unix(str(tmp_path / "s"))
    srv.start()
    socks = []
    for _ in range(5):                          # idle in the handshake, and served
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        socks.append(s)
    s = socks[-1]
    assert s.recv(18)[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 1) + b"v")
    assert len(s.recv(10)) == 10                # size and flags: transmission
    threads_before = threading.active_count()
    done = threading.Event()
    t = threading.Thread(target=lambda: (srv.close(), done.set()))
    t.start()
    t.join(15)
    assert done.is_set(), "close() hung on connected clients"
    assert not os.path.exists(path)
    assert a.status()["contexts"] == []         # the export's context is released
    assert s.recv(1) == b""                     # the server closed the connection
    assert threading.active_count() < threads_before
    for c in socks:
        c.close()
    a.close()
