"""MANAGE_LUN: superpipe mode per port, the LUN table's slots and
ALL_PORTS_ACTIVE, and every failure of §22.2 MANAGE_LUN.

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import errno

import pytest

import cxlflash
from cxlflash import uapi

from .helpers import (
    ATTACH, CHUNK, DIRECT, DISABLE, ENABLE, K4, MANAGE, STRANGER, VERIFY, add_disk,
    as_proc, attach, attach_arg, cid_of, close_fd, close_open_fds, ctx, detach, fails,
    llun, manage, manage_arg, release, udirect, udirect_arg, uvirtual, verify_arg)


# -- the LUN table, superpipe mode per port (§8) ---------------------------------


def test_lun_table_slots_and_all_ports_active(make_embedded):
    a = make_embedded(ports=2)
    try:
        multi = [a.add_lun(None, size=CHUNK * K4, ports=(0, 1)) for _ in range(2)]
        single0 = [a.add_lun(None, size=CHUNK * K4, ports=(0,)) for _ in range(2)]
        single1 = a.add_lun(None, size=CHUNK * K4, ports=(1,))
        lt = a.driver.lun_table
        order = [(multi[0], 0, 0), (single0[0], 0, 255), (multi[1], 1, 1),
                 (single0[1], 0, 254), (single1, 1, 255)]
        cid = None
        for w, port, want in order:
            d = a.open_disk(w, port)
            cid = attach(d).context_id if cid is None else attach(d, reuse=cid).context_id
            uv = uvirtual(d, cid, 1)
            ll = llun(a, w)
            assert ll.in_table and ll.lun_index == want
            nports = bin(ll.port_sel).count("1")
            assert uv.hdr.return_flags == (uapi.DK_CXLFLASH_ALL_PORTS_ACTIVE
                                           if nports > 1 else 0)
            for k in range(2):
                if ll.port_sel & (1 << k):
                    assert lt.entries[k][want] == ll.lun_id[k]
            lxt = ctx(a, cid).table.lxt(uv.rsrc_handle)
            assert int(lxt[0]) & 0xFFFF == (want << 8) | 0x30 | ll.port_sel
        assert lt.promote_lun_index == 2 and lt.last_lun_index == [253, 254]
    finally:
        close_open_fds()
        a.close()


def test_lun_table_slots_reclaimed_decision_20(make_embedded):
    a = make_embedded(ports=2)
    try:
        ws = a.add_lun(None, size=CHUNK * K4, ports=(0,))
        wm = a.add_lun(None, size=CHUNK * K4, ports=(0, 1))
        resident = a.add_lun(None, size=CHUNK * K4, ports=(0,))
        dr = a.open_disk(resident)
        rc = attach(dr).context_id
        uvirtual(dr, rc, 1)                               # holds slot 255 of port 0
        disks = {ws: [a.open_disk(ws, 0)], wm: [a.open_disk(wm, 0), a.open_disk(wm, 1)]}
        seen = {ws: set(), wm: set()}
        for cycle in range(300):
            for w in (ws, wm):
                for dk in disks[w]:
                    manage(dk, w, ENABLE)
                dk = disks[w][cycle % len(disks[w])]
                at = attach(dk)
                uv = uvirtual(dk, at.context_id, 1)       # never ENOSPC
                seen[w].add(llun(a, w).lun_index)
                release(dk, at.context_id, uv.rsrc_handle)
                detach(dk, at.context_id)
                close_fd(at.adap_fd)
                for dk in disks[w]:
                    manage(dk, w, DISABLE)
                assert not llun(a, w).in_table
        assert seen[ws] == {254} and seen[wm] == {0}
        assert llun(a, resident).lun_index == 255
    finally:
        close_open_fds()
        a.close()


def test_manage_lun_disable_busy_while_handles_open(adapter):
    a = adapter
    w = a.add_lun(None, size=CHUNK * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle
    ml = uapi.dk_cxlflash_manage_lun()
    ml.wwid[:] = w
    ml.hdr.flags = DISABLE
    fails(d, MANAGE, ml, errno.EBUSY)
    release(d, cid, h)
    detach(d, cid)
    manage(d, w, DISABLE)
    fails(d, ATTACH, attach_arg(), errno.EINVAL)
    manage(d, w, ENABLE)
    attach(d)


# -- §22.2 MANAGE_LUN ------------------------------------------------------------


def test_manage_lun_llun_allocation_enomem(embedded):
    a = embedded
    add_disk(a)
    d = add_disk(a, superpipe=False)                 # no llun yet
    a.inject_fault("alloc")
    fails(d, MANAGE, manage_arg(d.wwid, ENABLE), errno.ENOMEM)
    assert d.wwid not in a.driver.lluns and d.sdev.llun is None
    cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, ENABLE))
    a.inject_fault("alloc")
    cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, ENABLE))   # known WWID: no allocation
    assert a.driver.afu.faults.pending() == {"alloc": 1}


def test_manage_lun_foreign_wwid_einval_before_allocation(embedded):
    """Deviation (issue 8): a WWID that does not name the disk's own LUN is
    refused, before anything is allocated."""
    a = embedded
    d = add_disk(a)
    other = add_disk(a)
    a.inject_fault("alloc")
    for wwid in (bytes(range(0x80, 0x90)), other.wwid):
        fails(d, MANAGE, manage_arg(wwid, ENABLE), errno.EINVAL)
        assert d.sdev.llun.wwid == d.wwid
    assert bytes(range(0x80, 0x90)) not in a.driver.lluns
    assert a.driver.afu.faults.pending() == {"alloc": 1}


@pytest.mark.parametrize("how", ["virtual", "direct", "other_context"])
def test_manage_lun_disable_while_mode_not_none_ebusy(embedded, how):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    if how == "virtual":
        h = uvirtual(d, cid).rsrc_handle
    elif how == "direct":
        h = udirect(d, cid).rsrc_handle
    else:
        c2 = as_proc(d, ATTACH, attach_arg(), STRANGER).context_id
        as_proc(d, DIRECT, udirect_arg(c2), STRANGER)
    fails(d, MANAGE, manage_arg(d.wwid, DISABLE), errno.EBUSY)
    assert d.sdev.llun is not None
    # ENABLE wins when both bits are set, so that is no disable
    cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, ENABLE | DISABLE))
    if how != "other_context":
        release(d, cid, h)
        cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, DISABLE))
        fails(d, VERIFY, verify_arg(cid, 0), errno.EINVAL)    # no llun now
