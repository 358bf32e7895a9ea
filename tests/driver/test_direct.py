"""USER_DIRECT: physical LUN access, the exclusion of virtual and direct
modes (§8), the direct data path's bounds (decision 13), and every
failure of §22.2 USER_DIRECT.

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import errno

import pytest

import cxlflash
from cxlflash.driver.lunmgt import MODE_NONE, MODE_PHYSICAL, MODE_VIRTUAL

from .helpers import (
    CHILD, CHUNK, CHUNK_4K, DIRECT, K4, RESIZE, STRANGER, U64, VIRTUAL, add_disk,
    attach, blocks, chunks, cid_of, close_open_fds, ctx, detach, disk_glun, fails,
    find_ctx, glun, llun, phys, release, resize_arg, returns_while_context_busy,
    udirect, udirect_arg, uvirtual, uvirtual_arg)

#: The tests of add_disk()'s LUN run on memory and on an RBD image
#: (tests/conftest.py); ``memory_backing``: memory only (the test reads the
#: memory backing's fd, or makes its own LUNs with add_lun(None, ...)).
LUN_BACKINGS = ("memory", "rbd")


# -- LUN modes (§8) --------------------------------------------------------------


def test_virtual_and_direct_exclude_each_other(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=8 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    ca, cb = attach(d).context_id, attach(d).context_id
    ha = uvirtual(d, ca, 1).rsrc_handle
    assert (g.mode, g.users) == (MODE_VIRTUAL, 1)
    fails(d, DIRECT, udirect_arg(cb), errno.EINVAL)
    fails(d, DIRECT, udirect_arg(ca), errno.EINVAL)
    assert g.users == 1
    hb = uvirtual(d, cb, 1).rsrc_handle
    ha2 = uvirtual(d, ca, 0).rsrc_handle
    assert g.users == 3
    release(d, ca, ha)
    release(d, cb, hb)
    assert (g.mode, g.users) == (MODE_VIRTUAL, 1)
    release(d, ca, ha2)
    assert (g.mode, g.users, g.allocator) == (MODE_NONE, 0, None)
    # Now direct, from both contexts; virtual is refused.
    d1 = udirect(d, ca)
    d2 = udirect(d, cb)
    d3 = udirect(d, cb)
    assert (g.mode, g.users) == (MODE_PHYSICAL, 3)
    assert (d1.rsrc_handle, d2.rsrc_handle, d3.rsrc_handle) == (0, 0, 1)
    fails(d, VIRTUAL, uvirtual_arg(ca, 0), errno.EINVAL)
    fails(d, RESIZE, resize_arg(ca, 0, 1), errno.EINVAL)
    assert g.users == 3
    # Detach releases every handle of the context on the LUN.
    detach(d, cb)
    assert g.users == 1
    release(d, ca, 0)
    assert (g.mode, g.users) == (MODE_NONE, 0)
    assert uvirtual(d, ca, 0).rsrc_handle == 0


def test_allocator_rebuilt_when_users_reach_zero(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=200 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    cid = attach(d).context_id
    keep = uvirtual(d, cid, 0).rsrc_handle
    h = uvirtual(d, cid, 70 * CHUNK_4K).rsrc_handle       # auns 0..69: cursor in word 1
    assert chunks(a, cid, h) == list(range(70))
    release(d, cid, h)
    # Allocator alive (users 1): next-fit continues in word 1.
    h = uvirtual(d, cid, CHUNK_4K).rsrc_handle
    assert chunks(a, cid, h) == [64]
    first_alloc = g.allocator
    release(d, cid, h)
    release(d, cid, keep)
    assert (g.mode, g.users, g.allocator) == (MODE_NONE, 0, None)
    # Rebuilt from scratch: allocation restarts at 0.
    h = uvirtual(d, cid, CHUNK_4K).rsrc_handle
    assert chunks(a, cid, h) == [0]
    assert g.allocator is not first_alloc and g.allocator.space() == 199


def test_user_direct_outputs(memory_backing, embedded, make_embedded):
    a = make_embedded(ports=2)
    try:
        w = a.add_lun(None, size=5000 * K4, ports=(0, 1))
        d0, d1 = a.open_disk(w, 0), a.open_disk(w, 1)
        cid = attach(d1).context_id
        ud = udirect(d1, cid)
        assert ud.rsrc_handle == 0 and ud.last_lba == 4999
        assert ud.hdr.return_flags == 0                  # never ALL_PORTS_ACTIVE
        e = ctx(a, cid).table.entry(0)
        assert e["format"] == 1 and e["port_sel"] == 2 and e["perms"] == 3
        assert e["lun_id"] == llun(a, w).lun_id[1]
        assert not llun(a, w).in_table                   # no LUN-table slot
        assert udirect(d1, cid).rsrc_handle == 1
        cid0 = attach(d0).context_id
        assert ctx(a, cid0).table.entry(udirect(d0, cid0).rsrc_handle)["port_sel"] == 1
        assert glun(a, w).users == 3
    finally:
        close_open_fds()
        a.close()


# -- the direct data path (decision 13) ------------------------------------------


@pytest.mark.parametrize("block_size", [4096, 512])
def test_direct_bounds_decision_13(memory_backing, embedded, block_size):
    a = embedded
    nblk = 1000
    w = a.add_lun(None, size=nblk * block_size, block_size=block_size)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = udirect(d, cid).rsrc_handle
    last = blocks(1, 1, block_size)
    a.write(cid, h, nblk - 1, last)
    assert phys(a, w, nblk - 1) == last
    size = glun(a, w).backing.size
    for lba, n in [(nblk - 1, 2), (nblk, 1), (2**40, 1), (0, nblk + 1),
                   (U64, 2), (U64 - 1, 3)]:
        with pytest.raises(cxlflash.AfuError) as ei:
            a.write(cid, h, lba, bytes(n * block_size))
        assert ei.value.errno == errno.EIO
        if lba < 2**63:
            assert ei.value.afu_rc == 0 and ei.value.scsi_rc == 0x02
        with pytest.raises(cxlflash.AfuError):
            a.read(cid, h, lba, n)
    assert phys(a, w, nblk - 1) == last and phys(a, w, 0) == bytes(block_size)
    assert glun(a, w).backing.size == size
    data = blocks(nblk, 2, block_size)
    assert a.write(cid, h, 0, data) == nblk and a.read(cid, h, 0, nblk) == data


# -- §22.2 USER_DIRECT -----------------------------------------------------------


def test_user_direct_lun_virtual_einval(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    uvirtual(d, cid)
    fails(d, DIRECT, udirect_arg(cid), errno.EINVAL)
    assert disk_glun(d).mode == MODE_VIRTUAL and disk_glun(d).users == 1


def test_user_direct_lun_mode_checked_before_lookup(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    uvirtual(d, cid)
    arg = udirect_arg(cid)
    t = returns_while_context_busy(a, cid, lambda: cxlflash.ioctl(d, DIRECT, arg))
    assert t.errno == errno.EINVAL


def test_user_direct_lookup_fails_einval(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    d2 = add_disk(a)
    arg = lambda c: udirect_arg(c)   # noqa: E731
    fails(d, DIRECT, arg(cid + 1), errno.EINVAL)          # no context at that PE
    fails(d, DIRECT, arg(cid ^ (1 << 33)), errno.EINVAL)  # stale id
    fails(d2, DIRECT, arg(cid), errno.EINVAL)             # LUN not attached
    fails(d, DIRECT, arg(cid), errno.EINVAL, STRANGER)
    fails(d, DIRECT, arg(cid), errno.EINVAL, CHILD)
    a.reset()
    fails(d, DIRECT, arg(cid), errno.EINVAL)              # error contexts not found
    # the lun_attach was undone every time
    assert disk_glun(d).mode == MODE_NONE and disk_glun(d).users == 0
    assert disk_glun(d2).mode == MODE_NONE


def test_user_direct_no_free_rht_slot_emfile(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    for i in range(256):                        # MAX_RHT_PER_CONTEXT, 4 KiB pages
        assert udirect(d, cid).rsrc_handle == i
    fails(d, DIRECT, udirect_arg(cid), errno.EMFILE)
    assert disk_glun(d).users == 256


def test_user_direct_lookup_before_emfile(make_adapter):
    a = make_adapter(rht_per_context=1)
    d = add_disk(a)
    cid = cid_of(d)
    udirect(d, cid)
    fails(d, DIRECT, udirect_arg(cid ^ (1 << 40)), errno.EINVAL)
    fails(d, DIRECT, udirect_arg(cid), errno.EMFILE)


@pytest.mark.parametrize("err", [errno.ENOMEM, errno.ENOBUFS, errno.EIO, errno.EAGAIN,
                                 errno.ETIMEDOUT], ids=errno.errorcode.get)
def test_user_direct_sync_fails_raw_errno_handle_released(embedded, err):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    a.inject_fault("sync", err=err)
    fails(d, DIRECT, udirect_arg(cid), err)
    assert disk_glun(d).mode == MODE_NONE and disk_glun(d).users == 0
    assert find_ctx(a, cid).rht_out == 0
    assert udirect(d, cid).rsrc_handle == 0
