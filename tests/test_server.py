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
