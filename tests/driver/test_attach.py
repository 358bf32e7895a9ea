"""ATTACH and DETACH: the context, its outputs, reuse, PEs, the adapter fd
(close, dup, fork; spec §6.3, decision 4), and every failure of §22.2
ATTACH / DETACH / adapter fd.

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import errno
import os
import stat
import time

import pytest

import cxlflash
from cxlflash import AdapterResetError, AfuError, uapi
from cxlflash.driver.context import Caller
from cxlflash.driver.lunmgt import MODE_NONE, MODE_VIRTUAL

from forking import in_child

from .helpers import (
    ATTACH, BLK, CH, CHILD, CHUNK, CHUNK_4K, DETACH, DIRECT, K4, NCHUNKS, RECOVER,
    RELEASE, RESIZE, REUSE, STRANGER, U64, VERIFY, VIRTUAL, _open_fds, add_disk, attach,
    attach_arg, blocks, chunks, cid_of, close_fd, close_open_fds, ctx, detach,
    detach_arg, disk_glun, fails, find_ctx, glun, last_lba, last_lba_4k, llun, recover,
    recover_arg, release_arg, resize, resize_arg, udirect, udirect_arg, uvirtual,
    uvirtual_arg, verify, verify_arg)


# -- ATTACH ----------------------------------------------------------------------


def test_attach_outputs_4k(embedded):
    a = embedded
    size = 3 * CHUNK * K4 + 5 * K4
    w = a.add_lun(None, size=size)
    d = a.open_disk(w)
    at = attach(d)
    assert at.context_id & 0xFFFFFFFF == 0              # the first PE
    assert at.context_id >> 32 != 0                     # nonzero generation
    assert at.block_size == 4096
    assert at.mmio_size == 65536
    assert at.last_lba == size // K4 - 1
    assert at.max_xfer == 4096                           # 16 MiB in 4K blocks
    assert at.hdr.return_flags == uapi.DK_CXLFLASH_APP_CLOSE_ADAP_FD
    st = os.fstat(at.adap_fd)                            # a real open fd
    assert stat.S_ISSOCK(st.st_mode)
    assert ctx(a, at.context_id).pid == os.getpid()
    assert ctx(a, at.context_id).rht_perms == uapi.RHT_PERM_RW


def test_attach_outputs_512(adapter):
    a = adapter
    w = a.add_lun(None, size=1000 * 512, block_size=512)
    at = attach(a.open_disk(w))
    assert at.block_size == 512 and at.last_lba == 999
    assert at.max_xfer == 32768                          # 16 MiB in 512 B blocks


@pytest.mark.parametrize("mode, perms", [(os.O_RDONLY, 1), (os.O_WRONLY, 2),
                                          (os.O_RDWR, 3)])
def test_attach_access_modes(embedded, mode, perms):
    a = embedded
    w = a.add_lun(None, size=CHUNK * K4)
    at = attach(a.open_disk(w), flags=mode)
    assert ctx(a, at.context_id).rht_perms == perms


def test_attach_reuse_context(embedded):
    a = embedded
    w1 = a.add_lun(None, size=2 * CHUNK * K4)
    w2 = a.add_lun(None, size=1000 * 512, block_size=512)
    d1, d2 = a.open_disk(w1), a.open_disk(w2)
    at = attach(d1)
    c = ctx(a, at.context_id)
    r = attach(d2, reuse=at.context_id)
    assert r.context_id == at.context_id
    assert r.adap_fd == U64
    assert r.hdr.return_flags == 0
    assert (r.block_size, r.last_lba, r.max_xfer, r.mmio_size) == (512, 999, 32768, 65536)
    assert c.kref == 2 and c.lun_attached(llun(a, w2))
    assert [la.llun for la in c.luns] == [llun(a, w2), llun(a, w1)]   # newest first
    # Already attached -> EINVAL (both the first LUN and the reused one).
    fails(d1, ATTACH, attach_arg(at.context_id, reuse=True), errno.EINVAL)
    fails(d2, ATTACH, attach_arg(at.context_id, reuse=True), errno.EINVAL)
    # The second LUN is usable through the same context.
    ud = udirect(d2, at.context_id)
    assert ud.last_lba == 999
    # Detaching one LUN keeps the context; the last one destroys it.
    detach(d1, at.context_id)
    assert ctx(a, at.context_id) is c and c.kref == 1
    detach(d2, at.context_id)
    assert ctx(a, at.context_id) is None
    assert glun(a, w2).users == 0 and glun(a, w2).mode == MODE_NONE


def test_reuse_of_another_process_context_fails(embedded):
    a = embedded
    w1, w2 = (a.add_lun(None, size=CHUNK * K4) for _ in range(2))
    at = attach(a.open_disk(w1))
    fails(a.open_disk(w2), ATTACH, attach_arg(at.context_id, reuse=True),
          errno.EINVAL, STRANGER)
    fails(a.open_disk(w2), ATTACH, attach_arg(at.context_id, reuse=True),
          errno.EINVAL, CHILD)


def test_pes_are_lowest_free(adapter):
    a = adapter
    w = a.add_lun(None, size=CHUNK * K4)
    d = a.open_disk(w)
    ats = [attach(d) for _ in range(4)]
    ids = [at.context_id for at in ats]
    assert [i & 0xFFFFFFFF for i in ids] == [0, 1, 2, 3]
    assert len({i >> 32 for i in ids}) == 4              # distinct generations
    for i in (1, 2):                                      # the documented protocol
        detach(d, ids[i])
        close_fd(ats[i].adap_fd)
    assert attach(d).context_id & 0xFFFFFFFF == 1
    assert attach(d).context_id & 0xFFFFFFFF == 2
    assert attach(d).context_id & 0xFFFFFFFF == 4


def test_pe_exhaustion_is_enodev(make_adapter):
    a = make_adapter(max_contexts=3)
    try:
        w = a.add_lun(None, size=CHUNK * K4)
        d = a.open_disk(w)
        ats = [attach(d) for _ in range(3)]
        fails(d, ATTACH, attach_arg(), errno.ENODEV)
        detach(d, ats[0].context_id)
        close_fd(ats[0].adap_fd)
        assert attach(d).context_id & 0xFFFFFFFF == 0
    finally:
        close_open_fds()
        a.close()


def test_pe_held_until_adapter_fd_closed_after_detach(adapter):
    # Spec §7 step 6 / §6.3: DETACH of the last LUN destroys the context, but
    # the backend context -- and its PE -- is released only when the user
    # closes the adapter fd (APP_CLOSE_ADAP_FD).  Decision 5 allocates the
    # lowest *free* PE, so the PE is not reused before that close.
    a = adapter
    w = a.add_lun(None, size=CHUNK * K4)
    d = a.open_disk(w)
    at = attach(d)
    detach(d, at.context_id)
    fails(d, DETACH, detach_arg(at.context_id), errno.EINVAL)
    b = attach(d)
    assert b.context_id & 0xFFFFFFFF == 1, "PE 0 reused while its adapter fd is open"
    close_fd(at.adap_fd)
    assert attach(d).context_id & 0xFFFFFFFF == 0


def test_stale_context_id_full_64_bit_compare(adapter):
    a = adapter
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    at = attach(d)
    old = at.context_id
    detach(d, old)
    close_fd(at.adap_fd)
    new = attach(d).context_id
    assert new & 0xFFFFFFFF == old & 0xFFFFFFFF          # same PE
    assert new != old
    for arg, req in [(uvirtual_arg(old), VIRTUAL),
                     (udirect_arg(old), DIRECT),
                     (detach_arg(old), DETACH),
                     (recover_arg(old), RECOVER),
                     (attach_arg(old, reuse=True), ATTACH)]:
        fails(d, req, arg, errno.EINVAL)
    # Same PE, other high bits -> EINVAL too; the new id works.
    fails(d, VIRTUAL, uvirtual_arg(new ^ (1 << 40)), errno.EINVAL)
    fails(d, VIRTUAL, uvirtual_arg((new & ~0xFFFFFFFF) | 512), errno.EINVAL)
    assert uvirtual(d, new, 1).rsrc_handle == 0


def test_lun_not_attached_is_invisible(adapter):
    a = adapter
    w1, w2 = (a.add_lun(None, size=2 * CHUNK * K4) for _ in range(2))
    d1, d2 = a.open_disk(w1), a.open_disk(w2)
    cid = attach(d1).context_id
    attach(d2)                       # another context: w2's capacity is read
    h = uvirtual(d1, cid, 1).rsrc_handle
    for arg, req in [(uvirtual_arg(cid), VIRTUAL),
                     (udirect_arg(cid), DIRECT),
                     (detach_arg(cid), DETACH),
                     (verify_arg(cid, h), VERIFY)]:
        fails(d2, req, arg, errno.EINVAL)


# -- the adapter fd (spec §6.3, decision 4) --------------------------------------


def test_closing_adapter_fd_releases_context(embedded):
    a = embedded
    w = a.add_lun(None, size=16 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    at = attach(d)
    cid = at.context_id
    h0 = uvirtual(d, cid, 3 * CHUNK_4K).rsrc_handle
    h1 = uvirtual(d, cid, 2 * CHUNK_4K).rsrc_handle
    assert (g.users, g.allocator.space()) == (2, 11)
    close_fd(at.adap_fd)
    # The next ioctl finds the context gone, and its handles released.
    fails(d, RESIZE, resize_arg(cid, h0, 0), errno.EINVAL)
    assert ctx(a, cid) is None
    assert a.driver.ctx_tbl[cid & 0xFFFFFFFF] is None
    assert (g.users, g.mode, g.allocator) == (0, MODE_NONE, None)
    fails(d, RELEASE, release_arg(cid, h1), errno.EINVAL)
    with pytest.raises(cxlflash.AfuError) as ei:
        a.read(cid, h0, 0, 1)
    assert ei.value.afu_rc == 0x21
    # The PE is free again.
    assert attach(d).context_id & 0xFFFFFFFF == cid & 0xFFFFFFFF


def test_closing_adapter_fd_frees_chunks_other_context_kept(embedded):
    a = embedded
    w = a.add_lun(None, size=16 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    at_a, at_b = attach(d), attach(d)
    ha = uvirtual(d, at_a.context_id, 3 * CHUNK_4K).rsrc_handle
    hb = uvirtual(d, at_b.context_id, 1 * CHUNK_4K).rsrc_handle
    assert g.allocator.space() == 12
    close_fd(at_a.adap_fd)
    assert verify(d, at_b.context_id, hb).last_lba == CHUNK_4K - 1   # any ioctl reaps
    assert ctx(a, at_a.context_id) is None
    assert g.users == 1 and g.mode == MODE_VIRTUAL
    assert g.allocator.space() == 15
    assert chunks(a, at_b.context_id, hb) == [3]
    assert ha == 0


def test_closing_adapter_fd_force_releases_despite_sync_failures(embedded):
    # Decision 21: the release path checks every handle in even when the
    # AFU sync of the shrink fails.
    a = embedded
    w = a.add_lun(None, size=8 * CHUNK * K4)
    wd = a.add_lun(None, size=100 * K4)
    d, dd = a.open_disk(w), a.open_disk(wd)
    at = attach(d)
    attach(dd, reuse=at.context_id)
    uvirtual(d, at.context_id, 3 * CHUNK_4K)
    uvirtual(d, at.context_id, 1)
    udirect(dd, at.context_id)
    keep = attach(d)
    hk = uvirtual(d, keep.context_id, 1).rsrc_handle
    a.inject_fault("sync", 10)
    close_fd(at.adap_fd)
    a.inject_fault("sync", 0)
    assert verify(d, keep.context_id, hk).last_lba == last_lba_4k(1)
    assert ctx(a, at.context_id) is None
    assert glun(a, w).users == 1 and glun(a, w).allocator.space() == 7
    assert (glun(a, wd).users, glun(a, wd).mode) == (0, MODE_NONE)


def test_dup_of_adapter_fd_keeps_context(embedded):
    a = embedded
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    at = attach(d)
    cid = at.context_id
    h = uvirtual(d, cid, 1).rsrc_handle
    fd2 = os.dup(at.adap_fd)
    _open_fds.add(fd2)
    close_fd(at.adap_fd)
    assert resize(d, cid, h, 2 * CHUNK_4K).last_lba == 2 * CHUNK_4K - 1
    a.write(cid, h, 0, blocks(1, 1))
    close_fd(fd2)
    fails(d, RESIZE, resize_arg(cid, h, 0), errno.EINVAL)
    assert glun(a, w).users == 0


@pytest.mark.parametrize("child_closes", [True, False])
def test_forked_child_closing_fd_keeps_parent_context(embedded, child_closes):
    a = embedded
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    at = attach(d)
    cid = at.context_id
    h = uvirtual(d, cid, CHUNK_4K).rsrc_handle
    data = blocks(2, 7)
    a.write(cid, h, 10, data)

    def child():
        if child_closes:
            os.close(at.adap_fd)
        return True

    assert in_child(child)
    assert resize(d, cid, h, 2 * CHUNK_4K).last_lba == 2 * CHUNK_4K - 1
    assert a.read(cid, h, 10, 2) == data
    assert ctx(a, cid) is not None and glun(a, w).users == 1


def test_forked_child_cannot_use_parent_context(embedded):
    a = embedded
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    at = attach(d)
    cid = at.context_id
    h = uvirtual(d, cid, CHUNK_4K).rsrc_handle
    data = blocks(1, 3)
    a.write(cid, h, 0, data)

    def child():
        out = {}
        for name, req, arg in [
                ("resize", RESIZE, resize_arg(cid, h, 0)),
                ("release", RELEASE, release_arg(cid, h)),
                ("verify", VERIFY, verify_arg(cid, h)),
                ("uvirtual", VIRTUAL, uvirtual_arg(cid)),
                ("detach", DETACH, detach_arg(cid)),
                ("recover", RECOVER, recover_arg(cid)),
                ("reuse", ATTACH, attach_arg(cid, reuse=True))]:
            try:
                cxlflash.ioctl(d, req, arg)
                out[name] = 0
            except cxlflash.CxlFlashError as e:
                out[name] = e.errno
        for name, fn in [("read", lambda: a.read(cid, h, 0, 1)),
                         ("write", lambda: a.write(cid, h, 0, bytes(4096))),
                         ("translate", lambda: a.translate(cid, h, [0]))]:
            try:
                fn()
                out[name] = None
            except cxlflash.AfuError as e:
                out[name] = e.afu_rc
        # The child reaches its parent's driver: a context of its own works,
        # adapter-wide operations stay with the owner.
        child_disk = a.open_disk(w)
        arg = attach_arg()
        cxlflash.ioctl(child_disk, ATTACH, arg)
        out["own_pe"] = arg.context_id & 0xFFFFFFFF
        out["own_fd_open"] = os.fstat(arg.adap_fd) is not None
        for name, fn in [("add_lun", lambda: a.add_lun(None, size=CHUNK * K4)),
                         ("reset", a.reset)]:
            try:
                fn()
                out[name] = None
            except cxlflash.ForkedAdapterError as e:
                out[name] = str(e)
        return out

    out = in_child(child)
    for name in ("resize", "release", "verify", "uvirtual", "detach", "recover", "reuse"):
        assert out[name] == errno.EINVAL, name
    assert out["read"] == out["write"] == out["translate"] == 0x21
    assert out["own_pe"] != cid & 0xFFFFFFFF and out["own_fd_open"]
    for name in ("add_lun", "reset"):
        assert out[name] is not None and "only the process that created" in out[name], name
    # The parent's context is untouched, and the child's own context went
    # with the child (its adapter fd closed at exit).
    assert a.read(cid, h, 0, 1) == data
    assert chunks(a, cid, h) == [0] and glun(a, w).users == 1
    deadline = time.monotonic() + 5
    while len([c for c in a.driver.ctx_tbl if c is not None]) > 1:
        assert time.monotonic() < deadline, "the child's context was not released"
        a.driver.reap(Caller(os.getpid(), os.getppid()))
        time.sleep(0.01)


# -- §22.2 ATTACH ----------------------------------------------------------------


def test_attach_num_interrupts_over_4_einval(adapter):
    a = adapter
    d = add_disk(a)
    fails(d, ATTACH, attach_arg(num_interrupts=5), errno.EINVAL)
    fails(d, ATTACH, attach_arg(num_interrupts=2**63),
          errno.EINVAL)
    attach(d, num_interrupts=4)


def test_attach_access_mode_3_einval_decision_16(embedded):
    a = embedded
    d = add_disk(a)
    fails(d, ATTACH, attach_arg(flags=3), errno.EINVAL)
    fails(d, ATTACH, attach_arg(flags=U64 & ~REUSE), errno.EINVAL)
    assert a.driver.ctx_tbl[0] is None
    for mode in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
        attach(d, flags=mode)


def test_attach_read_capacity_fails_enodev(embedded):
    a = embedded
    d = add_disk(a)
    assert disk_glun(d).max_lba == 0
    a.inject_fault("read_capacity")
    fails(d, ATTACH, attach_arg(), errno.ENODEV)
    assert disk_glun(d).max_lba == 0 and a.driver.ctx_tbl[0] is None
    s = attach(d)
    assert s.last_lba == NCHUNKS * 65536 - 1 and s.block_size == BLK


def test_attach_num_interrupts_before_read_capacity(embedded):
    a = embedded
    d = add_disk(a)
    a.inject_fault("read_capacity")
    fails(d, ATTACH, attach_arg(num_interrupts=5), errno.EINVAL)
    assert a.driver.afu.faults.pending() == {"read_capacity": 1}


def test_attach_read_capacity_before_reuse_lookup(adapter):
    a = adapter
    d = add_disk(a)
    a.inject_fault("read_capacity")
    fails(d, ATTACH, attach_arg(12345, reuse=True),
          errno.ENODEV)


def test_attach_reuse_lookup_fails_einval(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    d2 = add_disk(a)
    reuse = lambda i: attach_arg(i, reuse=True)  # noqa: E731
    fails(d2, ATTACH, reuse(0), errno.EINVAL)                       # no such id
    fails(d2, ATTACH, reuse(cid ^ (1 << 40)), errno.EINVAL)         # stale high bits
    fails(d2, ATTACH, reuse((cid & ~0xFFFFFFFF) | 600), errno.EINVAL)   # PE >= 512
    fails(d2, ATTACH, reuse(cid), errno.EINVAL, STRANGER)      # not the owner
    fails(d2, ATTACH, reuse(cid), errno.EINVAL, CHILD)         # a child neither
    a.reset()                                                        # error contexts
    fails(d2, ATTACH, reuse(cid), errno.EINVAL)                      # are not found
    assert find_ctx(a, cid).kref == 1


def test_attach_reuse_needs_no_lun_check(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    d2 = add_disk(a)
    s = attach(d2, reuse=cid)
    assert s.context_id == cid and s.adap_fd == U64
    assert find_ctx(a, cid).kref == 2


def test_attach_reuse_lun_already_attached_einval(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    fails(d, ATTACH, attach_arg(cid, reuse=True),
          errno.EINVAL)
    assert find_ctx(a, cid).kref == 1


def test_attach_reuse_already_attached_before_sdev_get(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    a.inject_fault("sdev_get")
    fails(d, ATTACH, attach_arg(cid, reuse=True),
          errno.EINVAL)
    assert a.driver.afu.faults.pending() == {"sdev_get": 1}


ATTACH_FAULTS = [
    ("sdev_get", None, errno.ENXIO),            # scsi_device_get's own error
    ("sdev_get", errno.ENODEV, errno.ENODEV),
    ("alloc", None, errno.ENOMEM),              # lun_access / context / RHT
    ("backend_context", None, errno.ENODEV),
    ("start_work", None, errno.EINVAL),         # backend errno passed through
    ("start_work", errno.EBUSY, errno.EBUSY),
    ("pe_range", None, errno.EPERM),
    ("adapter_file", None, errno.ENODEV),
    ("capability", None, errno.EAGAIN),
]


@pytest.mark.parametrize("point,err,expected", ATTACH_FAULTS,
                         ids=[f"{p}-{errno.errorcode[e]}" for p, _, e in ATTACH_FAULTS])
def test_attach_failures_undo_everything(embedded, point, err, expected):
    a = embedded
    d = add_disk(a)
    a.inject_fault(point, err=err)
    fails(d, ATTACH, attach_arg(), expected)
    drv = a.driver
    assert all(c is None for c in drv.ctx_tbl) and not drv.ctx_err_recovery
    assert d.sdev.refs == 0 and not drv._files
    assert attach(d).context_id & 0xFFFFFFFF == 0      # PE 0 is still free


@pytest.mark.parametrize("point,expected", [("sdev_get", errno.ENXIO),
                                            ("alloc", errno.ENOMEM)])
def test_attach_reuse_failures_keep_context(embedded, point, expected):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    d2 = add_disk(a)
    a.inject_fault(point)
    fails(d2, ATTACH, attach_arg(cid, reuse=True),
          expected)
    c = find_ctx(a, cid)
    assert c.kref == 1 and len(c.luns) == 1 and d2.sdev.refs == 0


def test_attach_pe_ids_exhausted_enodev(make_adapter):
    a = make_adapter(max_contexts=2)
    d = add_disk(a)
    s0 = attach(d)
    cid_of(d)
    fails(d, ATTACH, attach_arg(), errno.ENODEV)
    detach(d, s0.context_id)
    os.close(s0.adap_fd)                        # APP_CLOSE_ADAP_FD
    _open_fds.remove(s0.adap_fd)
    assert cid_of(d) & 0xFFFFFFFF == 0          # lowest free PE (decision 5)


# -- §22.2 DETACH ----------------------------------------------------------------


def test_detach_lookup_fails_or_lun_not_attached_einval(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    d2 = add_disk(a)
    arg = lambda c: detach_arg(c)   # noqa: E731
    fails(d, DETACH, arg(cid ^ (1 << 35)), errno.EINVAL)
    fails(d2, DETACH, arg(cid), errno.EINVAL)             # LUN not attached
    fails(d, DETACH, arg(cid), errno.EINVAL, STRANGER)
    a.reset()
    detach(d, cid)                                        # error contexts found
    assert find_ctx(a, cid) is None
    fails(d, DETACH, arg(cid), errno.EINVAL)              # already gone


def test_detach_inner_release_failures_ignored_force_release_decision_21(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    uvirtual(d, cid, 2 * CH)
    uvirtual(d, cid, CH)
    a.inject_fault("sync", count=10)
    detach(d, cid)
    g = disk_glun(d)
    assert g.mode == MODE_NONE and g.users == 0 and g.allocator is None
    assert find_ctx(a, cid) is None
    a.inject_fault("sync", count=0)
    c2 = cid_of(d)
    udirect(d, c2)                    # the mode is not stuck


def test_detach_one_lun_keeps_the_others(adapter):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    d2 = add_disk(a)
    attach(d2, reuse=cid)
    h2 = uvirtual(d2, cid, CH).rsrc_handle
    uvirtual(d, cid, CH)
    detach(d, cid)
    assert last_lba(d2, cid, h2) == CH - 1
    fails(d, VERIFY, verify_arg(cid, 1), errno.EINVAL)


# -- §22.2 adapter fd: mmap / page fault / close ---------------------------------
# mmap and page faults of the MMIO window have no Python equivalent.  Their
# stand-in is the AFU data path: a context in error reads as the all-0xFF
# error page (AdapterResetError); a context that no longer exists (or is not
# the caller's) is refused with CAP_VIOLATION (AfuError, afu_rc 0x21).


def test_mmap_page_fault_context_in_error_data_path_adapter_reset_error(adapter):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    a.write(cid, h, 0, b"\x5a" * BLK)
    a.reset()
    with pytest.raises(AdapterResetError):
        a.read(cid, h, 0, 1)
    with pytest.raises(AdapterResetError):
        a.write(cid, h, 0, b"\0" * BLK)
    with pytest.raises(AdapterResetError):
        a.translate(cid, h, [0])
    new = recover(d, cid).context_id
    assert a.read(new, h, 0, 1) == b"\x5a" * BLK          # data survived
    with pytest.raises(AfuError) as ei:
        a.read(cid, h, 0, 1)                              # the old id is dead
    assert ei.value.afu_rc == 0x21


def test_mmap_page_fault_context_not_found_afu_error_0x21(adapter):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    detach(d, cid)
    for op in (lambda: a.read(cid, h, 0, 1), lambda: a.write(cid, h, 0, bytes(BLK)),
               lambda: a.translate(cid, h, [0])):
        with pytest.raises(AfuError) as ei:
            op()
        assert ei.value.afu_rc == 0x21 and ei.value.errno == errno.EIO


def test_adapter_fd_close_never_fails_tears_down_context(embedded):
    # §6.4: close before detach tears the context down; the saved id is dead.
    a = embedded
    d = add_disk(a)
    s = attach(d)
    cid = s.context_id
    h = uvirtual(d, cid, CH).rsrc_handle
    os.close(s.adap_fd)
    _open_fds.remove(s.adap_fd)
    fails(d, VERIFY, verify_arg(cid, h), errno.EINVAL)
    assert find_ctx(a, cid) is None and disk_glun(d).mode == MODE_NONE
    with pytest.raises(AfuError) as ei:
        a.read(cid, h, 0, 1)
    assert ei.value.afu_rc == 0x21
