"""AFU reset and recovery (§16) and RECOVER_AFU, with every failure of
§22.2 RECOVER_AFU.

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import errno
import os
import stat
import threading

import pytest

import cxlflash
from cxlflash import uapi

from .helpers import (
    ATTACH, Bg, CH, CHUNK, CHUNK_4K, CLONE, DIRECT, ENABLE, K4, RECOVER, STRANGER,
    VERIFY, VIRTUAL, _open_fds, add_disk, attach, attach_arg, blocks, call, chunks,
    cid_of, clone_arg, close_fd, ctx, detach, fails, find_ctx, glun, last_lba,
    last_lba_4k, llun, manage, recover, recover_arg, release, resize, signal_until_done,
    udirect, udirect_arg, uvirtual, uvirtual_arg, verify, verify_arg, wait_until)


# -- reset and recovery (§16) ----------------------------------------------------


def setup_vlun(a, nchunks=4, size=3):
    w = a.add_lun(None, size=nchunks * CHUNK * K4)
    d = a.open_disk(w)
    at = attach(d)
    h = uvirtual(d, at.context_id, size * CHUNK_4K).rsrc_handle
    return w, d, at, h


def test_reset_puts_data_path_in_error(embedded):
    a = embedded
    w, d, at, h = setup_vlun(a, 8, 2)
    cid = at.context_id
    a.write(cid, h, 0, blocks(1, 1))
    a.reset()
    assert a.state == "NORMAL"
    for fn in (lambda: a.read(cid, h, 0, 1), lambda: a.write(cid, h, 0, bytes(K4)),
               lambda: a.readinto(cid, h, 0, bytearray(K4)),
               lambda: a.translate(cid, h, [0])):
        with pytest.raises(cxlflash.AdapterResetError) as ei:
            fn()
        assert ei.value.errno == errno.EIO
    # Not reachable without the error fallback.
    fails(d, VIRTUAL, uvirtual_arg(cid), errno.EINVAL)
    fails(d, VERIFY, verify_arg(cid, h), errno.EINVAL)
    fails(d, ATTACH, attach_arg(cid, reuse=True), errno.EINVAL)
    # RESIZE (grow and shrink) and RELEASE work on a context in error.
    assert resize(d, cid, h, 3 * CHUNK_4K).last_lba == last_lba_4k(3)
    assert resize(d, cid, h, CHUNK_4K).last_lba == last_lba_4k(1)
    release(d, cid, h)
    assert glun(a, w).users == 0
    # DETACH too.
    detach(d, cid)
    assert not a.driver.ctx_err_recovery


def test_closing_fd_of_context_in_error_tears_it_down(embedded):
    a = embedded
    w, d, at, h = setup_vlun(a, 8, 2)
    keep = attach(d)
    hk = uvirtual(d, keep.context_id, 1).rsrc_handle
    a.reset()
    close_fd(at.adap_fd)
    assert resize(d, keep.context_id, hk, 2).last_lba == last_lba_4k(1)   # in error, reachable
    assert [c.ctxid for c in a.driver.ctx_err_recovery] == [keep.context_id]
    assert glun(a, w).users == 1 and glun(a, w).allocator.space() == 7
    fails(d, RECOVER, recover_arg(at.context_id), errno.EINVAL)


def test_ioctls_wait_out_a_reset(adapter):
    a = adapter
    w, d, at, h = setup_vlun(a, 4, 1)
    cid = at.context_id
    a.begin_reset()
    res = {}

    def waiter(name, fn):
        try:
            res[name] = ("ok", fn())
        except cxlflash.CxlFlashError as e:
            res[name] = ("err", e.errno)

    ts = [threading.Thread(target=waiter, args=("resize", lambda: resize(d, cid, h, 2).last_lba)),
          threading.Thread(target=waiter, args=("verify", lambda: verify(d, cid, h).last_lba))]
    for t in ts:
        t.start()
    ts[0].join(0.2)
    assert ts[0].is_alive() and ts[1].is_alive() and not res     # waiting for RESET to end
    a.end_reset(ok=True)
    for t in ts:
        t.join(10)
    assert res["resize"] == ("ok", last_lba_4k(1))       # error contexts are reachable
    assert res["verify"] == ("err", errno.EINVAL)        # ... but not for VERIFY
    # A signal interrupts the wait: EINTR.
    a.begin_reset()
    t = threading.Thread(target=waiter, args=("intr", lambda: resize(d, cid, h, 2).last_lba))
    t.start()
    t.join(0.1)
    a.signal_waiters()
    t.join(10)
    assert res["intr"] == ("err", errno.EINTR)
    a.end_reset(ok=False)
    assert a.state == "FAILTERM"
    assert resize(d, cid, h, 2).last_lba == last_lba_4k(1)


def test_recover_afu(embedded):
    a = embedded
    w, d, at, h = setup_vlun(a, 8, 2)
    cid, old_fd = at.context_id, at.adap_fd
    other = attach(d)                                      # holds PE 1
    data = blocks(4, 9)
    a.write(cid, h, CHUNK - 2, data)
    before = chunks(a, cid, h)
    lt = a.driver.lun_table
    table_before = [list(e) for e in lt.entries]
    index = llun(a, w).lun_index
    a.reset()
    assert lt.entries == table_before                       # re-programmed (§16.1)
    assert llun(a, w).lun_index == index and lt.entries[0][index] == llun(a, w).lun_id[0]
    ra = recover(d, cid)
    assert ra.hdr.return_flags == (uapi.DK_CXLFLASH_APP_CLOSE_ADAP_FD |
                                   uapi.DK_CXLFLASH_RECOVER_AFU_CONTEXT_RESET)
    new = ra.context_id
    assert new >> 32 == cid >> 32                          # same record
    assert ra.mmio_size == 65536
    assert ra.adap_fd != old_fd and stat.S_ISSOCK(os.fstat(ra.adap_fd).st_mode)
    assert ctx(a, new) is not None and not ctx(a, new).err_recovery_active
    # Handles and data intact.
    assert chunks(a, new, h) == before
    assert a.read(new, h, CHUNK - 2, 4) == data
    assert verify(d, new, h).last_lba == last_lba_4k(2)
    # Closing the old fd does not tear the recovered context down.
    close_fd(old_fd)
    assert resize(d, new, h, 3 * CHUNK_4K).last_lba == last_lba_4k(3)
    assert a.read(new, h, CHUNK - 2, 4) == data
    assert glun(a, w).users == 1
    # The other context is still in error until it recovers.
    ro = recover(d, other.context_id)
    assert ro.hdr.return_flags & uapi.DK_CXLFLASH_RECOVER_AFU_CONTEXT_RESET
    # Closing the new fd is the owner's close: now the context goes away.
    close_fd(ra.adap_fd)
    fails(d, VERIFY, verify_arg(new, h), errno.EINVAL)
    assert glun(a, w).users == 0


def test_recover_afu_gives_a_new_pe_and_id(adapter):
    # Spec §16.3: the recovery creates a *new* backend context while the old
    # one (and its PE) lives on until the user closes the old adapter fd; so
    # the new PE differs from the old one, the context id changes, and the old
    # id is stale (decision 2: full 64-bit compare).
    a = adapter
    w, d, at, h = setup_vlun(a, 8, 1)
    cid, old_fd = at.context_id, at.adap_fd
    a.reset()
    ra = recover(d, cid)
    new = ra.context_id
    assert new & 0xFFFFFFFF != cid & 0xFFFFFFFF, "recovered onto the PE the old fd still holds"
    assert new != cid
    fails(d, VERIFY, verify_arg(cid, h), errno.EINVAL)
    # A new ATTACH cannot take the old PE either while the old fd is open.
    assert attach(d).context_id & 0xFFFFFFFF != cid & 0xFFFFFFFF
    # Once the old fd is closed, its PE is free again.
    close_fd(old_fd)
    assert verify(d, new, h).last_lba == last_lba_4k(1)
    assert attach(d).context_id & 0xFFFFFFFF == cid & 0xFFFFFFFF


def test_recover_afu_on_healthy_context_changes_nothing(embedded):
    a = embedded
    w, d, at, h = setup_vlun(a, 4, 1)
    cid = at.context_id
    ra = recover_arg(cid)
    ra.adap_fd = 1234
    ra.mmio_size = 7
    ra.reason = 99
    before = bytes(ra)
    call(d, RECOVER, ra)
    assert bytes(ra) == before
    assert ctx(a, cid) is not None and ctx(a, cid).file is not None
    a.write(cid, h, 0, bytes(K4))
    assert chunks(a, cid, h) == [0]


def test_failterm(embedded):
    a = embedded
    w, d, at, h = setup_vlun(a, 8, 2)
    cid = at.context_id
    wd = a.add_lun(None, size=100 * K4)
    dd = a.open_disk(wd)
    attach(dd, reuse=cid)
    hd = udirect(dd, cid).rsrc_handle
    a.fail()
    assert a.state == "FAILTERM"
    with pytest.raises(cxlflash.AdapterResetError):
        a.read(cid, h, 0, 1)
    for req, arg, dk in [(ATTACH, attach_arg(), d),
                         (VIRTUAL, uvirtual_arg(cid), d),
                         (DIRECT, udirect_arg(cid), d),
                         (VERIFY, verify_arg(cid, h), d),
                         (RECOVER, recover_arg(cid), d),
                         (CLONE, clone_arg(cid, cid + 1), d)]:
        fails(dk, req, arg, errno.ENODEV)
    # The exceptions: RESIZE, RELEASE, DETACH (and MANAGE_LUN has no state check).
    assert resize(d, cid, h, CHUNK_4K).last_lba == last_lba_4k(1)
    release(d, cid, h)
    release(dd, cid, hd)
    manage(d, w, ENABLE)
    detach(dd, cid)
    detach(d, cid)
    assert glun(a, w).users == glun(a, wd).users == 0
    assert not a.driver.ctx_err_recovery


# -- §22.2 RECOVER_AFU -----------------------------------------------------------


def test_recover_afu_interrupted_waiting_for_recovery_mutex_eintr(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    a.reset()
    arg = recover_arg(cid)
    before = bytes(arg)
    a.driver.recovery_mutex.acquire()         # another recovery is running
    try:
        t = Bg(lambda: cxlflash.ioctl(d, RECOVER, arg))
        t.join(0.1)
        assert t.is_alive()
        signal_until_done(a, t)
    finally:
        a.driver.recovery_mutex.release()
    assert t.errno == errno.EINTR and bytes(arg) == before
    assert find_ctx(a, cid).err_recovery_active
    assert a.driver.recovery_threads == 0


def test_recover_afu_interrupted_between_retries_eintr(embedded):
    a = embedded
    d = add_disk(a)
    drv = a.driver
    cid = cid_of(d)
    a.reset()
    drv.recovery_retry_delay = 0.05
    a.inject_fault("backend_context", count=100)
    t = Bg(lambda: cxlflash.ioctl(d, RECOVER, recover_arg(cid)))
    wait_until(lambda: drv.afu.faults.pending().get("backend_context", 100) < 100)
    drv.recovery_mutex.acquire()              # taken while it sleeps
    try:
        signal_until_done(a, t)
    finally:
        drv.recovery_mutex.release()
    assert t.errno == errno.EINTR
    assert find_ctx(a, cid).err_recovery_active


def test_recover_afu_state_check_failterm_enodev(embedded):
    a = embedded
    d = add_disk(a)
    drv = a.driver
    cid = cid_of(d)
    drv.recovery_mutex.acquire()
    try:
        t = Bg(lambda: cxlflash.ioctl(d, RECOVER, recover_arg(cid)))
        wait_until(lambda: drv.recovery_threads == 1)   # past the dispatch fence
        a.fail()
    finally:
        drv.recovery_mutex.release()
    t.join(5)
    assert t.errno == errno.ENODEV


def test_recover_afu_state_check_interrupted_enodev(embedded):
    a = embedded
    d = add_disk(a)
    drv = a.driver
    cid = cid_of(d)
    drv.recovery_mutex.acquire()
    try:
        t = Bg(lambda: cxlflash.ioctl(d, RECOVER, recover_arg(cid)))
        wait_until(lambda: drv.recovery_threads == 1)
        a.begin_reset()
    finally:
        drv.recovery_mutex.release()
    t.join(0.1)
    assert t.is_alive()                       # waiting for the RESET to end
    signal_until_done(a, t)
    a.end_reset()
    assert t.errno == errno.ENODEV


def test_recover_afu_lookup_fails_einval_error_contexts_found(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    d2 = add_disk(a)
    fails(d, RECOVER, recover_arg(cid ^ (1 << 36)), errno.EINVAL)
    fails(d2, RECOVER, recover_arg(cid), errno.EINVAL)
    fails(d, RECOVER, recover_arg(cid), errno.EINVAL, STRANGER)
    a.reset()
    s = recover(d, cid)                       # in error: found and recovered
    assert s.hdr.return_flags == (uapi.DK_CXLFLASH_APP_CLOSE_ADAP_FD |
                                  uapi.DK_CXLFLASH_RECOVER_AFU_CONTEXT_RESET)
    assert s.context_id >> 32 == cid >> 32 and s.mmio_size == 65536
    fails(d, RECOVER, recover_arg(cid), errno.EINVAL)     # the old id is stale


def test_recover_afu_old_fd_holds_old_pe_until_closed(make_embedded):
    # §16.3: the old backend context (and its PE) lives until the old fd2
    # is closed, so the recovered context gets a new PE and a new id.
    a = make_embedded(max_contexts=2)
    d = add_disk(a)
    s = attach(d)
    a.reset()
    r = recover(d, s.context_id)
    assert r.context_id & 0xFFFFFFFF == 1 and r.context_id != s.context_id
    fails(d, VERIFY, verify_arg(s.context_id, 0), errno.EINVAL)   # old id is stale
    fails(d, ATTACH, attach_arg(), errno.ENODEV)
    os.close(s.adap_fd)
    _open_fds.remove(s.adap_fd)
    assert cid_of(d) & 0xFFFFFFFF == 0
    assert find_ctx(a, r.context_id) is not None          # closing the old fd kept it


def test_recover_afu_healthy_context_returns_inputs(adapter):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    s = recover_arg(cid)
    s.adap_fd, s.mmio_size, s.reason = 77, 5, 0xABC
    before = bytes(s)
    cxlflash.ioctl(d, RECOVER, s)
    assert bytes(s) == before


@pytest.mark.parametrize("point", ["backend_context", "adapter_file"])
def test_recover_afu_new_context_retries_exhausted_enodev(embedded, point):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    a.reset()
    a.inject_fault(point, count=21)           # the first try + 20 retries
    fails(d, RECOVER, recover_arg(cid), errno.ENODEV)
    assert find_ctx(a, cid).err_recovery_active
    a.inject_fault(point, count=20)           # one more try than failures
    new = recover(d, cid).context_id
    assert last_lba(d, new, h) == CH - 1


@pytest.mark.parametrize("point,err,expected", [
    ("pe_range", None, errno.EPERM),
    ("start_work", None, errno.EINVAL),
    ("start_work", errno.EIO, errno.EIO),
    ("capability", None, errno.EAGAIN),
], ids=["pe_range", "start_work", "start_work_passthrough", "capability"])
def test_recover_afu_backend_failures(embedded, point, err, expected):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    a.reset()
    a.inject_fault(point, err=err)
    fails(d, RECOVER, recover_arg(cid), expected)
    assert find_ctx(a, cid).err_recovery_active and not a.driver.ctx_tbl[0]
    assert a.driver.afu.faults.pending() == {}            # no retry on these
    recover(d, cid)


def test_recover_afu_mailbox_all_ones_recovers(adapter):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    a.inject_fault("mailbox")
    s = recover(d, cid)
    assert s.hdr.return_flags & uapi.DK_CXLFLASH_RECOVER_AFU_CONTEXT_RESET
    assert last_lba(d, s.context_id, h) == CH - 1


def test_recover_afu_mailbox_all_ones_then_failterm_enodev(embedded):
    a = embedded
    d = add_disk(a)
    drv = a.driver
    cid = cid_of(d)
    drv.mailbox_retry_delay = 0.3
    a.inject_fault("mailbox")
    t = Bg(lambda: cxlflash.ioctl(d, RECOVER, recover_arg(cid)))
    wait_until(lambda: not drv.afu.faults.pending())
    a.fail()                                  # the EEH recovery failed
    t.join(5)
    assert t.errno == errno.ENODEV


def test_recover_afu_mailbox_all_ones_wait_interrupted_erestartsys(embedded):
    a = embedded
    d = add_disk(a)
    drv = a.driver
    cid = cid_of(d)
    drv.mailbox_retry_delay = 0.3
    a.inject_fault("mailbox")
    t = Bg(lambda: cxlflash.ioctl(d, RECOVER, recover_arg(cid)))
    wait_until(lambda: not drv.afu.faults.pending())
    a.begin_reset()                           # the EEH handler's reset
    t.join(0.5)
    assert t.is_alive()
    signal_until_done(a, t)
    a.end_reset()
    assert t.errno == errno.EINTR             # ERESTARTSYS, as user space sees it
