"""The last differences from the kernel (issue 12): the file a porter reads
beside the README's "Where we differ from the kernel".  Each test shows the
behaviour chosen (`-k parity`); a deviation kept is also listed in the
README (test_readme_lists_the_issue_12_deviations checks it).

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import errno
import os
import threading
import time

import pytest

import cxlflash
from cxlflash import AfuError, CxlFlashError, uapi
from cxlflash.driver import superpipe
from cxlflash.driver.context import Caller

from .helpers import (
    ALL_DK, ATTACH, BAD_NUMBERS, BLK, Bg, CH, CHILD, CLONE, DETACH, DIRECT, DISABLE,
    ENABLE, MANAGE, ME, NAMES, NCHUNKS, PROVISION, RECOVER, RELEASE, RESIZE, U64,
    VERIFY, VIRTUAL, _open_fds, add_disk, as_proc, attach, attach_arg, cid_of,
    clone_arg, detach, disk_glun, fails, find_ctx, last_lba, manage_arg, mk,
    provision_arg, release, release_arg, resize, resize_arg, uvirtual, uvirtual_arg,
    valid_args)


# -- the README lists every deviation kept ------------------------------------


def _read_readme_deviations():
    path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "README.md")
    with open(path) as f:
        text = f.read()
    start = text.index("## Where we differ from the kernel")
    end = text.find("\n## ", start + 1)
    return " ".join(text[start:end if end >= 0 else None].split())


@pytest.mark.parametrize("phrase", [
    "superpipe mode at add_lun",            # item 1
    "superpipe=False",
    "LUN delete while in use",              # item 2
    "the rollback of a failed VLUN_CLONE",  # item 6
    "after close(fd2)",                     # item 7
    "the sg node",                          # item 4 (a choice, not a deviation)
])
def test_readme_lists_the_issue_12_deviations(phrase):
    assert phrase.lower() in _read_readme_deviations().lower()


# -- item 1: superpipe mode at add_lun -------------------------------------------


def test_parity_legacy_start_every_dk_but_manage_lun_einval_on_every_port(make_embedded):
    # add_lun(superpipe=False): the kernel's start, on every path.
    a = make_embedded()
    d0 = add_disk(a, ports=(0, 1), superpipe=False)
    d1 = a.open_disk(d0.wwid, port=1)
    for d in (d0, d1):
        assert d.sdev.llun is None
        fails(d, ATTACH, attach_arg(), errno.EINVAL)
        for req, s in [(DIRECT, uapi.dk_cxlflash_udirect), (VIRTUAL, uapi.dk_cxlflash_uvirtual),
                       (RELEASE, uapi.dk_cxlflash_release), (DETACH, uapi.dk_cxlflash_detach),
                       (VERIFY, uapi.dk_cxlflash_verify), (RESIZE, uapi.dk_cxlflash_resize),
                       (RECOVER, uapi.dk_cxlflash_recover_afu), (CLONE, uapi.dk_cxlflash_clone)]:
            fails(d, req, mk(s), errno.EINVAL)
    # MANAGE_LUN without a flag only registers the WWID: still legacy.
    cxlflash.ioctl(d0, MANAGE, manage_arg(d0.wwid))
    assert d0.sdev.llun is None and not a.driver.lluns[d0.wwid].port_sel
    fails(d0, ATTACH, attach_arg(), errno.EINVAL)
    # The Pythonic layer says what to do.
    with pytest.raises(CxlFlashError) as ei:
        d0.attach()
    assert ei.value.errno == errno.EINVAL and "MANAGE_LUN" in str(ei.value)


def test_parity_legacy_start_ports_enabled_one_by_one_as_the_kernel(make_embedded):
    a = make_embedded()
    d0 = add_disk(a, ports=(0, 1), superpipe=False)
    d1 = a.open_disk(d0.wwid, port=1)
    cxlflash.ioctl(d0, MANAGE, manage_arg(d0.wwid, ENABLE))
    fails(d1, ATTACH, attach_arg(), errno.EINVAL)  # port 1 legacy
    cid = cid_of(d0)
    uv = uvirtual(d0, cid, 1)
    llun = d0.sdev.llun
    assert uv.hdr.return_flags == 0                      # one port: no ALL_PORTS_ACTIVE
    assert llun.port_sel == 0b01 and llun.lun_index == 255   # a single-port slot
    cxlflash.ioctl(d1, MANAGE, manage_arg(d0.wwid, ENABLE))
    uv2 = uvirtual(d0, cid, 1)
    assert uv2.hdr.return_flags == uapi.DK_CXLFLASH_ALL_PORTS_ACTIVE
    assert llun.port_sel == 0b11 and llun.lun_index == 255   # the slot it already had
    # DISABLE looks at the LUN's mode only (handles open through any port).
    fails(d1, MANAGE, manage_arg(d0.wwid, DISABLE), errno.EBUSY)
    release(d0, cid, uv.rsrc_handle)
    release(d0, cid, uv2.rsrc_handle)
    cxlflash.ioctl(d1, MANAGE, manage_arg(d0.wwid, DISABLE))
    fails(d1, ATTACH, attach_arg(), errno.EINVAL)
    assert uvirtual(d0, cid, 1).hdr.return_flags == 0    # port 0 alone again


def test_parity_default_add_lun_enables_every_port_deviation(make_embedded):
    # The convenience default (a deviation): superpipe on every port at once.
    a = make_embedded()
    d0 = add_disk(a, ports=(0, 1))
    d1 = a.open_disk(d0.wwid, port=1)
    assert d0.sdev.llun is d1.sdev.llun and d0.sdev.llun.port_sel == 0b11
    cid = cid_of(d1)
    assert uvirtual(d1, cid, 1).hdr.return_flags == uapi.DK_CXLFLASH_ALL_PORTS_ACTIVE
    assert d0.sdev.llun.lun_index == 0                   # a multi-port slot


# -- item 2: LUN_PROVISION DELETE ------------------------------------------------


def _provisioned_disk(a):
    s = provision_arg(1, size=NCHUNKS * CH)
    cxlflash.ioctl(a, PROVISION, s)
    d = a.open_disk(bytes(s.wwid))
    return d, s.lun_id


def test_parity_delete_lun_in_superpipe_mode_nobody_uses_succeeds(embedded):
    a = embedded
    add_disk(a)
    d, lun_id = _provisioned_disk(a)
    cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, ENABLE))
    cid = cid_of(d)                                      # used once, then let go
    release(d, cid, uvirtual(d, cid, CH).rsrc_handle)
    detach(d, cid)
    sent = a.driver.afu.counters["afu_cmds"]
    cxlflash.ioctl(a, PROVISION, provision_arg(2, lun_id=lun_id))
    assert a.driver.afu.counters["afu_cmds"] == sent + 1
    assert d.wwid not in a.provisioned and d.wwid not in a.driver.lluns
    assert d.wwid not in a.driver.gluns and d.sdev.llun is None
    fails(d, ATTACH, attach_arg(), errno.EINVAL)
    with pytest.raises(CxlFlashError) as ei:
        a.open_disk(d.wwid)
    assert ei.value.errno == errno.ENODEV


@pytest.mark.parametrize("use", ["handle", "attached", "attached_superpipe_off"])
def test_parity_delete_lun_in_use_ebusy_deviation(embedded, use):
    a = embedded
    add_disk(a)
    d, lun_id = _provisioned_disk(a)
    cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, ENABLE))
    cid = cid_of(d)
    if use == "handle":
        h = uvirtual(d, cid, CH).rsrc_handle
    elif use == "attached_superpipe_off":
        cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, DISABLE))   # the kernel allows it
    a.inject_fault("afu_cmd")
    e = fails(a, PROVISION, provision_arg(2, lun_id=lun_id), errno.EBUSY)
    assert "release its handles and detach its contexts" in str(e)
    assert a.driver.afu.faults.pending() == {"afu_cmd": 1}      # no AFU command sent
    assert d.wwid in a.provisioned and d.wwid in a.driver.gluns
    with pytest.raises(CxlFlashError) as ei:                     # the Pythonic delete too
        a.delete_lun(d.wwid)
    assert ei.value.errno == errno.EBUSY
    a.inject_fault("afu_cmd", 0)
    if use == "attached_superpipe_off":
        assert d.sdev.llun is None
        cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, ENABLE))
    else:
        assert d.sdev.llun is not None                           # still in superpipe mode
    if use == "handle":
        release(d, cid, h)
        fails(a, PROVISION, provision_arg(2, lun_id=lun_id), errno.EBUSY)  # still attached
    detach(d, cid)
    a.delete_lun(d.wwid)
    assert d.wwid not in a.provisioned


def test_parity_delete_lun_refusal_is_before_the_afu_command_failure(embedded):
    a = embedded
    add_disk(a)
    d, lun_id = _provisioned_disk(a)
    cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, ENABLE))
    cid = cid_of(d)
    a.inject_fault("afu_cmd", err=errno.ETIMEDOUT)
    fails(a, PROVISION, provision_arg(2, lun_id=lun_id), errno.EBUSY)
    detach(d, cid)
    fails(a, PROVISION, provision_arg(2, lun_id=lun_id), errno.ETIMEDOUT)  # nothing deleted
    assert d.sdev.llun is not None and d.wwid in a.provisioned
    cxlflash.ioctl(a, PROVISION, provision_arg(2, lun_id=lun_id))


def test_parity_delete_lun_and_a_racing_attach(embedded):
    # An ATTACH that passed the dispatch's superpipe check before the delete
    # unhooked the disk re-checks under the lock the delete holds: it is
    # either seen (EBUSY) or refused (EINVAL), never attached to a gone LUN.
    a = embedded
    add_disk(a)
    for capacity_read, err in [(True, errno.EINVAL), (False, errno.ENODEV)]:
        d, lun_id = _provisioned_disk(a)
        cxlflash.ioctl(d, MANAGE, manage_arg(d.wwid, ENABLE))
        if capacity_read:
            detach(d, cid_of(d))
        arg = attach_arg()
        llun = d.sdev.llun
        cxlflash.ioctl(a, PROVISION, provision_arg(2, lun_id=lun_id))
        d.sdev.llun = llun            # as the dispatch saw it, before the delete
        with pytest.raises(CxlFlashError) as ei:
            superpipe.attach(a.driver, d.sdev, d, arg, Caller(ME, os.getppid()))
        assert ei.value.errno == err
        assert all(c is None for c in a.driver.ctx_tbl)
        assert not any(s.refs for s in a.driver.sdevs.values())


# -- item 3: resource handles are 32 bits ----------------------------------------


def test_parity_rsrc_handle_low_32_bits_resize_verify_release(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    uvirtual(d, cid)
    h = uvirtual(d, cid, CH).rsrc_handle                 # handle 1
    wide = (1 << 32) + h
    s = resize(d, cid, wide, 3 * CH)
    assert s.last_lba == 3 * CH - 1 and s.rsrc_handle == wide   # handle 1 grew
    assert find_ctx(a, cid).table.lxt_count(h) == 3
    assert last_lba(d, cid, (0xABCD << 32) | h) == 3 * CH - 1
    release(d, cid, (U64 & ~0xFFFFFFFF) | h)
    assert not find_ctx(a, cid).table.is_open(h) and find_ctx(a, cid).table.is_open(0)
    fails(d, RELEASE, release_arg(cid, (1 << 32) + 256), errno.EINVAL)


def test_parity_rsrc_handle_low_32_bits_data_path(adapter):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    wide = (7 << 32) | h
    data = bytes(range(256)) * (BLK // 256)
    assert a.write(cid, wide, 5, data) == 1
    assert a.read(cid, h, 5, 1) == data
    buf = bytearray(BLK)
    assert a.readinto(cid, wide, 5, buf) == 1 and bytes(buf) == data
    assert a.read(cid, wide, 5, 1) == data
    assert (a.translate(cid, wide, [0, 5]) == a.translate(cid, h, [0, 5])).all()
    with pytest.raises(AfuError) as ei:
        a.read(cid, U64, 0, 1)                           # handle 0xFFFFFFFF: beyond the RHT
    assert ei.value.afu_rc == 0x03
    with pytest.raises(AfuError) as ei:
        a.readinto(cid, (1 << 32) + 1, 0, buf)           # handle 1: not open
    assert ei.value.afu_rc == 0x01


# -- item 4: EPERM, the sg node's rule -------------------------------------------


@pytest.mark.parametrize("mode", [os.O_RDONLY, os.O_WRONLY], ids=["O_RDONLY", "O_WRONLY"])
@pytest.mark.parametrize("req", ALL_DK + [BAD_NUMBERS["unknown_nr"]],
                         ids=lambda r: NAMES.get(r, "unknown_nr"))
def test_parity_disk_not_opened_rdwr_eperm_for_every_request(embedded, req, mode):
    a = embedded
    d = add_disk(a)
    _, _, args = valid_args(a, d)
    arg = args.get(req, attach_arg())
    ro = a.open_disk(d.wwid, flags=mode)
    before = find_ctx(a, args[DETACH].context_id).rht_out
    e = fails(ro, req, arg, errno.EPERM)
    assert "O_RDWR" in str(e)
    assert find_ctx(a, args[DETACH].context_id).rht_out == before


def test_parity_eperm_before_every_driver_check(make_adapter):
    a = make_adapter()
    d = add_disk(a, superpipe=False)
    a.lun_mode = 1
    a.fail()
    ro = a.open_disk(d.wwid, flags=os.O_RDONLY)
    fails(ro, VIRTUAL, uvirtual_arg(0, flags=7), errno.EPERM)  # not EINVAL/ENODEV
    fails(ro, MANAGE, bytearray(2), errno.EPERM)                      # not EFAULT


def test_parity_access_mode_is_the_contexts_not_the_disks(embedded):
    a = embedded
    d = add_disk(a)
    for mode in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
        s = attach(d, flags=mode)                        # on a disk opened O_RDWR
        assert find_ctx(a, s.context_id).rht_perms == (mode + 1) & 3
    with pytest.raises(CxlFlashError) as ei:
        a.open_disk(d.wwid, flags=os.O_RDONLY).attach(os.O_RDONLY)
    assert ei.value.errno == errno.EPERM


# -- item 5: the LXT group count of a clamped grow -------------------------------


def test_parity_clamped_grow_within_the_lxt_group_allocates_no_lxt(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    uvirtual(d, cid, 10 * CH)                            # 10 of 16 chunks
    h = uvirtual(d, cid, CH).rsrc_handle                 # 1 chunk: 5 left
    a.inject_fault("alloc")
    s = resize(d, cid, h, 16 * CH)                       # asks 2 groups, gets 6 chunks
    assert s.last_lba == 6 * CH - 1
    assert a.driver.afu.faults.pending() == {"alloc": 1}     # no LXT was allocated
    a.inject_fault("alloc", 0)


def test_parity_clamped_grow_crossing_the_lxt_group_enomem(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h0 = uvirtual(d, cid, 8 * CH).rsrc_handle
    h = uvirtual(d, cid, 4 * CH).rsrc_handle             # 4 left: 4 + 4 = 8, one group
    a.inject_fault("alloc")
    assert resize(d, cid, h, 16 * CH).last_lba == 8 * CH - 1
    resize(d, cid, h, 6 * CH)                            # 2 free: 6 + 2 = 8
    assert resize(d, cid, h, 9 * CH).last_lba == 8 * CH - 1
    assert a.driver.afu.faults.pending() == {"alloc": 1}
    resize(d, cid, h, 6 * CH)
    resize(d, cid, h0, 7 * CH)                           # 3 free: 6 + 3 = 9, two groups
    fails(d, RESIZE, resize_arg(cid, h, 16 * CH), errno.ENOMEM)
    assert last_lba(d, cid, h) == 6 * CH - 1             # no change
    assert disk_glun(d).allocator.space() == 3


# -- item 6: clone rollback when a release sync fails (beside decision 21) -------


def test_parity_clone_rollback_force_releases_when_its_release_sync_fails(embedded, monkeypatch):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h0 = uvirtual(d, cid, CH).rsrc_handle
    h1 = uvirtual(d, cid, CH).rsrc_handle
    dst = as_proc(d, ATTACH, attach_arg(), CHILD).context_id
    users = disk_glun(d).users
    free = disk_glun(d).allocator.space()
    from cxlflash.driver import afu as afu_mod
    real, calls = a.driver.afu.sync, []

    def sync(pe, handle, mode):
        calls.append((handle, mode))
        # Slot 0's clone syncs; slot 1's fails, and so does every release.
        if len(calls) == 1:
            return real(pe, handle, mode)
        return errno.EAGAIN

    monkeypatch.setattr(a.driver.afu, "sync", sync)
    fails(d, CLONE, clone_arg(cid, dst), errno.EAGAIN, CHILD)
    assert calls == [(h0, afu_mod.AFU_LW_SYNC), (h1, afu_mod.AFU_LW_SYNC),
                     (h0, afu_mod.AFU_HW_SYNC)]
    # The kernel left slot 0 open (size 0) in the destination, and a retried
    # clone got EINVAL; the rollback force-releases it instead.
    c = find_ctx(a, dst)
    assert c.rht_out == 0 and disk_glun(d).users == users
    assert disk_glun(d).allocator.space() == free
    monkeypatch.setattr(a.driver.afu, "sync", real)
    as_proc(d, CLONE, clone_arg(cid, dst), CHILD)     # the retry succeeds
    assert c.rht_out == 2 and disk_glun(d).users == users + 2


# -- item 7: after close(fd2) ----------------------------------------------------


def test_parity_close_fd2_released_at_the_next_ioctl_not_the_next_transfer(embedded):
    # Deviation: no data-path request can see close(2) without a system
    # call of its own, so the release runs before the next ioctl of any
    # thread.  Until then the context reaches only its own chunks, which no
    # one else can be given first: every ioctl releases it before it runs.
    a = embedded
    d = add_disk(a)
    s = attach(d)
    cid = s.context_id
    h = uvirtual(d, cid, NCHUNKS * CH).rsrc_handle       # every chunk of the LUN
    data = b"\x5A" * BLK
    a.write(cid, h, 0, data)
    _open_fds.remove(s.adap_fd)
    os.close(s.adap_fd)
    assert a.read(cid, h, 0, 1) == data                  # the data path still works
    other = cid_of(d)                                    # the next ioctl: released first
    assert find_ctx(a, cid) is None
    with pytest.raises(AfuError) as ei:
        a.read(cid, h, 0, 1)
    assert ei.value.afu_rc == 0x21
    assert uvirtual(d, other, NCHUNKS * CH).last_lba == NCHUNKS * CH - 1   # all free again


def test_parity_eperm_in_a_forked_child_too(adapter):
    # A forked child's ioctls run in its parent's driver with the flags of
    # the disk the child opened.
    from forking import in_child
    a = adapter
    d = add_disk(a)

    def child():
        ro = a.open_disk(d.wwid, flags=os.O_RDONLY)
        with pytest.raises(CxlFlashError) as ei:
            cxlflash.ioctl(ro, ATTACH, attach_arg(flags=os.O_RDONLY))
        s = attach_arg(flags=os.O_RDONLY)
        cxlflash.ioctl(a.open_disk(d.wwid), ATTACH, s)
        os.close(s.adap_fd)
        return ei.value.errno

    assert in_child(child) == errno.EPERM


def test_parity_concurrent_deletes_of_one_lun(embedded, monkeypatch):
    a = embedded
    add_disk(a)
    real = a.driver.remove_lun

    def slow_remove_lun(*args, **kw):     # widen the window after the lookup
        time.sleep(0.02)
        return real(*args, **kw)

    monkeypatch.setattr(a.driver, "remove_lun", slow_remove_lun)
    for _ in range(3):
        d, lun_id = _provisioned_disk(a)
        start = threading.Barrier(4)

        def delete():
            start.wait()
            cxlflash.ioctl(a, PROVISION, provision_arg(2, lun_id=lun_id))

        ts = [Bg(delete) for _ in range(4)]
        for t in ts:
            t.join(10)
        errs = sorted(t.errno for t in ts if t.exc is not None)
        assert errs == [errno.EIO] * 3, [t.exc for t in ts]   # one deletes, 3 find none
        assert d.wwid not in a.provisioned and d.wwid not in a.driver.gluns
