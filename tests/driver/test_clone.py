"""VLUN_CLONE (§14): sharing, counts, permissions, rollback, and every
failure of §22.2 VLUN_CLONE.

Impersonation: a forked child that clones its parent's vLUNs cannot use
the embedded adapter (it belongs to the parent process), so the clone
tests play the child with ``Caller(pid=C, ppid=ME)`` through
``superpipe.disk_ioctl``.  The embedded data path refuses a context whose
owner is not this process (0x21), so the child's context is driven
through ``_core.datapath.afu_command`` on its table (``child_io``) -- the
AFU command the child would issue through its MMIO window.

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import errno
import os

import pytest

import cxlflash
from cxlflash.driver import superpipe
from cxlflash.driver.context import Caller
from cxlflash.driver.lunmgt import MODE_NONE, MODE_PHYSICAL

from .helpers import (
    ATTACH, CH, CHILD, CHUNK, CHUNK_4K, CLONE, DETACH, DIRECT, K4, ME, RECOVER, RELEASE,
    RESIZE, STRANGER, VERIFY, VIRTUAL, add_disk, as_proc, attach, attach_arg, blocks,
    child_io, chunks, cid_of, clone, clone_arg, close_fd, ctx, detach, detach_arg,
    disk_glun, fails, find_ctx, glun, last_lba, llun, recover_arg, release, release_arg,
    resize, resize_arg, returns_while_context_busy, udirect, udirect_arg, uvirtual,
    uvirtual_arg, verify, verify_arg)

#: The tests of add_disk()'s LUN run on memory and on an RBD image
#: (tests/conftest.py); ``memory_backing``: memory only (the test reads the
#: memory backing's fd, or makes its own LUNs with add_lun(None, ...)).
LUN_BACKINGS = ("memory", "rbd")


# -- VLUN_CLONE (§14) ------------------------------------------------------------


def test_clone_shares_chunks_and_counts(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=32 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    src = attach(d).context_id                             # owned by ME (this process)
    h0 = uvirtual(d, src, 2 * CHUNK_4K).rsrc_handle
    h1 = uvirtual(d, src, CHUNK_4K).rsrc_handle
    h2 = uvirtual(d, src, CHUNK_4K).rsrc_handle
    h3 = uvirtual(d, src, 0).rsrc_handle
    release(d, src, h1)                                    # a hole at handle 1
    assert g.users == 3
    dst_at = attach(d, flags=os.O_RDONLY, caller=CHILD)
    dst = dst_at.context_id
    assert ctx(a, dst).pid == CHILD.pid
    before = {h: chunks(a, src, h) for h in (h0, h2, h3)}
    clone(d, src, dst)
    cs, cd = ctx(a, src), ctx(a, dst)
    assert cd.table.open_handles() == cs.table.open_handles() == [h0, h2, h3]
    for h in (h0, h2, h3):
        assert chunks(a, dst, h) == before[h] == chunks(a, src, h)
        assert cd.table.perms(h) == 3 & 1                 # src ∩ dst
        assert cd.rht_lun[h] is llun(a, w)
        for x in before[h]:
            assert g.allocator.clone_count(x) == 1
    assert g.users == 6
    # Data is shared: written by the parent, read by the child, and back.
    data = blocks(3, 21)
    a.write(src, h0, CHUNK - 1, data)
    assert child_io(a, dst, h0, CHUNK - 1, nblocks=3) == data
    # The child's context is read-only: its writes are refused (0x05).
    with pytest.raises(cxlflash.AfuError) as ei:
        child_io(a, dst, h0, 0, bytes(K4))
    assert ei.value.afu_rc == 0x05
    # Independent resizes.
    resize(d, dst, h0, 3 * CHUNK_4K, caller=CHILD)
    grown = chunks(a, dst, h0)
    assert grown[:2] == before[h0] and grown[2] not in before[h0]
    assert g.allocator.clone_count(grown[2]) == 0
    assert chunks(a, src, h0) == before[h0]
    resize(d, src, h0, CHUNK_4K)
    x = before[h0][1]
    assert g.allocator.clone_count(x) == 0 and g.allocator.is_allocated(x)
    assert child_io(a, dst, h0, CHUNK, nblocks=2) == data[K4:]
    # The last owner frees the chunk.
    release(d, dst, h0, caller=CHILD)
    assert not g.allocator.is_allocated(x)
    assert not g.allocator.is_allocated(grown[2])
    y = before[h0][0]
    assert g.allocator.is_allocated(y) and g.allocator.clone_count(y) == 0
    release(d, src, h0)
    assert not g.allocator.is_allocated(y)
    assert g.users == 4
    # Both sides release the rest: the LUN returns to NONE.
    for h in (h2, h3):
        release(d, src, h)
        release(d, dst, h, caller=CHILD)
    assert (g.users, g.mode) == (0, MODE_NONE)


@pytest.mark.parametrize("src_mode, dst_mode, want", [
    (os.O_RDWR, os.O_RDWR, 3), (os.O_WRONLY, os.O_RDWR, 2),
    (os.O_RDWR, os.O_WRONLY, 2), (os.O_RDONLY, os.O_WRONLY, 0)])
def test_clone_perms_intersection(memory_backing, embedded, src_mode, dst_mode, want):
    a = embedded
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    src = attach(d, flags=src_mode).context_id
    h = uvirtual(d, src, 1).rsrc_handle
    dst = attach(d, flags=dst_mode, caller=CHILD).context_id
    clone(d, src, dst)
    assert ctx(a, dst).table.perms(h) == want


def test_clone_preconditions(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=4 * CHUNK * K4)
    w2 = a.add_lun(None, size=4 * CHUNK * K4)
    d, d2 = a.open_disk(w), a.open_disk(w2)
    src = attach(d).context_id
    dst = attach(d, caller=CHILD).context_id
    # LUN not virtual.
    fails(d, CLONE, clone_arg(src, dst), errno.EINVAL, CHILD)
    h = uvirtual(d, src, 1).rsrc_handle
    # Same ids.
    fails(d, CLONE, clone_arg(src, src), errno.EINVAL, CHILD)
    # The caller's parent does not own the source.
    other_child = Caller(CHILD.pid, STRANGER.pid)
    fails(d, CLONE, clone_arg(src, dst), errno.EINVAL, other_child)
    # The caller does not own the destination.
    fails(d, CLONE, clone_arg(src, dst), errno.EINVAL, Caller(CHILD.pid + 1, ME))
    # The destination does not have this LUN attached.
    dst_other = attach(d2, caller=CHILD).context_id
    fails(d, CLONE, clone_arg(src, dst_other), errno.EINVAL, CHILD)
    # The destination has an open handle (on any LUN).
    attach(d, reuse=dst_other, caller=CHILD)
    uvirtual(d2, dst_other, 0, caller=CHILD)
    fails(d, CLONE, clone_arg(src, dst_other), errno.EINVAL, CHILD)
    # A source with nothing open clones nothing (success).
    src2 = attach(d2).context_id
    dst2 = attach(d2, caller=CHILD).context_id
    clone(d2, src2, dst2)
    assert ctx(a, dst2).table.rht_out == 0
    clone(d, src, dst)
    assert ctx(a, dst).table.open_handles() == [h]


def test_closing_clone_destination_fd_releases_cloned_luns(memory_backing, embedded):
    # Decision 10: the LUNs a clone added to the destination are real
    # attachments, released (with their handles) when the child's fd closes.
    a = embedded
    w1 = a.add_lun(None, size=8 * CHUNK * K4)
    w2 = a.add_lun(None, size=8 * CHUNK * K4)
    w3 = a.add_lun(None, size=1000 * K4)
    d1, d2, d3 = a.open_disk(w1), a.open_disk(w2), a.open_disk(w3)
    src = attach(d1).context_id
    attach(d2, reuse=src)
    attach(d3, reuse=src)
    uvirtual(d1, src, CHUNK_4K)
    uvirtual(d2, src, 2 * CHUNK_4K)
    udirect(d3, src)
    refs = [dk.sdev.refs for dk in (d1, d2, d3)]
    users = [glun(a, w).users for w in (w1, w2, w3)]
    dst_at = attach(d1, caller=CHILD)
    clone(d1, src, dst_at.context_id)
    assert [glun(a, w).users for w in (w1, w2, w3)] == [u + 1 for u in users]
    close_fd(dst_at.adap_fd)
    assert verify(d1, src, 0).last_lba == CHUNK_4K - 1             # reaps
    assert ctx(a, dst_at.context_id) is None
    assert [glun(a, w).users for w in (w1, w2, w3)] == users
    assert [dk.sdev.refs for dk in (d1, d2, d3)] == refs
    assert [glun(a, w2).allocator.clone_count(x) for x in chunks(a, src, 1)] == [0, 0]


def test_clone_count_saturates_at_255(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    src = attach(d).context_id
    h = uvirtual(d, src, 1).rsrc_handle
    x = chunks(a, src, h)[0]
    kids = []
    for i in range(255):
        kid = Caller(CHILD.pid + 10 + i, ME)
        dst = attach(d, caller=kid).context_id
        clone(d, src, dst, caller=kid)
        kids.append((kid, dst))
    assert g.allocator.clone_count(x) == 255 and g.users == 256
    kid = Caller(CHILD.pid + 5000, ME)
    dst = attach(d, caller=kid).context_id
    fails(d, CLONE, clone_arg(src, dst), errno.EIO, kid)
    assert ctx(a, dst).table.rht_out == 0
    assert g.allocator.clone_count(x) == 255 and g.users == 256
    release(d, kids[0][1], h, caller=kids[0][0])
    assert g.allocator.clone_count(x) == 254
    clone(d, src, dst, caller=kid)
    assert g.allocator.clone_count(x) == 255


def test_clone_rollback_releases_earlier_slots(memory_backing, embedded):
    # §14.5: slot 1 fails (its chunk already has 255 clones) -> slot 0, cloned
    # already, is released again; nothing of the clone remains.
    a = embedded
    w = a.add_lun(None, size=8 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    s1 = attach(d).context_id
    uvirtual(d, s1, 0)                                     # h0: empty
    h1 = uvirtual(d, s1, 1).rsrc_handle                    # h1: chunk B
    b = chunks(a, s1, h1)[0]
    same = Caller(ME, ME)                                    # ME "cloning" from itself
    xs = attach(d).context_id
    clone(d, s1, xs, caller=same)                          # X: h0 empty, h1 = B
    resize(d, xs, 0, 1)                                    # X: h0 = A
    a_chunk = chunks(a, xs, 0)[0]
    for i in range(254):
        kid = Caller(CHILD.pid + 10 + i, ME)
        clone(d, s1, attach(d, caller=kid).context_id, caller=kid)
    assert g.allocator.clone_count(b) == 255 and g.allocator.clone_count(a_chunk) == 0
    users = g.users
    dst = attach(d, caller=CHILD).context_id
    fails(d, CLONE, clone_arg(xs, dst), errno.EIO, CHILD)
    assert ctx(a, dst).table.rht_out == 0
    assert g.allocator.clone_count(a_chunk) == 0 and g.allocator.clone_count(b) == 255
    assert g.users == users


def test_clone_sync_failure_rolls_back(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=8 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    src = attach(d).context_id
    h = uvirtual(d, src, 2 * CHUNK_4K).rsrc_handle
    dst = attach(d, caller=CHILD).context_id
    users = g.users
    a.inject_fault("sync", 1)
    fails(d, CLONE, clone_arg(src, dst), errno.EAGAIN, CHILD)
    assert ctx(a, dst).table.rht_out == 0 and g.users == users
    assert [g.allocator.clone_count(x) for x in chunks(a, src, h)] == [0, 0]
    clone(d, src, dst)
    assert chunks(a, dst, h) == chunks(a, src, h)


def test_clone_source_in_error_not_reachable(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    src = attach(d).context_id
    uvirtual(d, src, 1)
    dst = attach(d, caller=CHILD).context_id
    a.reset()
    fails(d, CLONE, clone_arg(src, dst), errno.EINVAL, CHILD)


def test_clone_across_luns_decision_9(memory_backing, embedded):
    a = embedded
    w1 = a.add_lun(None, size=16 * CHUNK * K4)
    w2 = a.add_lun(None, size=16 * CHUNK * K4)
    w3 = a.add_lun(None, size=1000 * K4)
    d1, d2, d3 = a.open_disk(w1), a.open_disk(w2), a.open_disk(w3)
    g1, g2, g3 = glun(a, w1), glun(a, w2), glun(a, w3)
    src = attach(d1).context_id
    attach(d2, reuse=src)
    attach(d3, reuse=src)
    # Make w2's chunk numbers differ from w1's.
    filler = attach(d2).context_id
    uvirtual(d2, filler, 5 * CHUNK_4K)
    h0 = uvirtual(d1, src, 2 * CHUNK_4K).rsrc_handle        # w1: auns 0, 1
    h1 = uvirtual(d2, src, 2 * CHUNK_4K).rsrc_handle        # w2: auns 5, 6
    h2 = udirect(d3, src).rsrc_handle                       # w3: direct
    assert (h0, h1, h2) == (0, 1, 2)
    assert chunks(a, src, h1) == [5, 6]
    a.write(src, h1, 0, blocks(1, 5))
    a.write(src, h2, 999, blocks(1, 6))
    dst = attach(d1, caller=CHILD).context_id               # only w1 attached
    clone(d1, src, dst)
    cd = ctx(a, dst)
    assert cd.table.open_handles() == [0, 1, 2]
    assert [cd.rht_lun[h] for h in (0, 1, 2)] == [llun(a, w1), llun(a, w2), llun(a, w3)]
    # Each virtual slot against its own LUN's allocator.
    assert [g1.allocator.clone_count(x) for x in (0, 1)] == [1, 1]
    assert [g2.allocator.clone_count(x) for x in (5, 6)] == [1, 1]
    assert [g2.allocator.clone_count(x) for x in (0, 1)] == [0, 0]
    assert chunks(a, dst, 1) == [5, 6]
    assert child_io(a, dst, 1, 0) == blocks(1, 5)
    # The direct slot is copied as a direct handle.
    e = cd.table.entry(2)
    assert e["format"] == 1 and e["lun_id"] == llun(a, w3).lun_id[0] and e["port_sel"] == 1
    assert child_io(a, dst, 2, 999) == blocks(1, 6)
    assert (g1.users, g2.users, g3.users) == (2, 3, 2)
    assert g3.mode == MODE_PHYSICAL
    # Decision 10: the copied LUN attachments are real attachments.
    assert cd.lun_attached(llun(a, w2)) and cd.lun_attached(llun(a, w3))
    assert cd.kref == 3
    release(d2, dst, 1, caller=CHILD)
    assert [g2.allocator.clone_count(x) for x in (5, 6)] == [0, 0]
    assert g2.users == 2
    detach(d3, dst, caller=CHILD)
    assert g3.users == 1 and ctx(a, dst) is cd
    detach(d2, dst, caller=CHILD)
    detach(d1, dst, caller=CHILD)
    assert ctx(a, dst) is None
    assert (g1.users, g2.users, g3.users) == (1, 2, 1)
    assert [g1.allocator.clone_count(x) for x in (0, 1)] == [0, 0]
    assert chunks(a, src, 0) == [0, 1] and chunks(a, src, 1) == [5, 6]


# -- §22.2 VLUN_CLONE ------------------------------------------------------------


def _clone_setup(a, d, sizes=(CH,)):
    """A parent context (this process) with virtual handles of ``sizes``,
    and an empty destination context of a child on the same LUN."""
    src = cid_of(d)
    for s in sizes:
        uvirtual(d, src, s)
    dst = as_proc(d, ATTACH, attach_arg(), CHILD).context_id
    return src, dst


def _auns(a, cid, h):
    return find_ctx(a, cid).table.lxt(h) >> 16


def test_vlun_clone_same_src_and_dst_einval(embedded):
    a = embedded
    d = add_disk(a)
    src, _ = _clone_setup(a, d)
    fails(d, CLONE, clone_arg(src, src), errno.EINVAL, Caller(ME, os.getppid()))
    fails(d, CLONE, clone_arg(src, src), errno.EINVAL)


def test_vlun_clone_lun_not_virtual_einval(embedded):
    a = embedded
    d = add_disk(a)
    src = cid_of(d)
    dst = as_proc(d, ATTACH, attach_arg(), CHILD).context_id
    fails(d, CLONE, clone_arg(src, dst), errno.EINVAL, CHILD)
    udirect(d, src)
    fails(d, CLONE, clone_arg(src, dst), errno.EINVAL, CHILD)


def test_vlun_clone_mode_checked_before_lookup(embedded):
    a = embedded
    d = add_disk(a)
    src = cid_of(d)
    dst = as_proc(d, ATTACH, attach_arg(), CHILD).context_id
    arg = clone_arg(src, dst)
    t = returns_while_context_busy(
        a, src, lambda: superpipe.disk_ioctl(a.driver, d.sdev, d, CLONE, arg,
                                             CHILD))
    assert t.errno == errno.EINVAL


def test_vlun_clone_src_lookup_fails_einval(embedded):
    a = embedded
    d = add_disk(a)
    src, dst = _clone_setup(a, d)
    arg = clone_arg(src, dst)
    fails(d, CLONE, arg, errno.EINVAL, Caller(CHILD.pid, STRANGER.pid))   # parent is not the owner
    fails(d, CLONE, arg, errno.EINVAL, Caller(CHILD.pid, 1))          # reparented to init
    fails(d, CLONE, clone_arg(src ^ (1 << 40), dst), errno.EINVAL, CHILD)
    # the source does not have the ioctl's LUN attached
    d2 = add_disk(a)
    other = cid_of(d2)
    uvirtual(d2, other)
    as_proc(d2, ATTACH, attach_arg(dst, reuse=True), CHILD)
    fails(d2, CLONE, arg, errno.EINVAL, CHILD)
    assert find_ctx(a, dst).rht_out == 0


def test_vlun_clone_src_in_error_einval(embedded):
    a = embedded
    d = add_disk(a)
    src, _ = _clone_setup(a, d)
    a.reset()
    dst = as_proc(d, ATTACH, attach_arg(), CHILD).context_id
    fails(d, CLONE, clone_arg(src, dst), errno.EINVAL, CHILD)


def test_vlun_clone_dst_lookup_fails_einval(embedded):
    a = embedded
    d = add_disk(a)
    src, dst = _clone_setup(a, d)
    # the caller does not own the destination
    fails(d, CLONE, clone_arg(src, dst), errno.EINVAL, Caller(CHILD.pid + 1, ME))
    # the destination does not have the LUN attached
    d2 = add_disk(a)
    dst2 = as_proc(d2, ATTACH, attach_arg(), CHILD).context_id
    fails(d, CLONE, clone_arg(src, dst2), errno.EINVAL, CHILD)
    # the destination is in error
    a.reset()
    src2 = cid_of(d)                      # a fresh, healthy source
    uvirtual(d, src2)
    fails(d, CLONE, clone_arg(src2, dst), errno.EINVAL, CHILD)


def test_vlun_clone_dst_has_open_slot_einval(embedded):
    a = embedded
    d = add_disk(a)
    src, dst = _clone_setup(a, d)
    as_proc(d, VIRTUAL, uvirtual_arg(dst), CHILD)
    users = disk_glun(d).users
    fails(d, CLONE, clone_arg(src, dst), errno.EINVAL, CHILD)
    assert disk_glun(d).users == users and find_ctx(a, dst).rht_out == 1


def test_vlun_clone_lun_access_copy_enomem(embedded):
    a = embedded
    d = add_disk(a)
    src, dst = _clone_setup(a, d)
    d2 = add_disk(a)
    attach(d2, reuse=src)                 # the source has a second LUN
    a.inject_fault("alloc")
    fails(d, CLONE, clone_arg(src, dst), errno.ENOMEM, CHILD)
    c = find_ctx(a, dst)
    assert c.rht_out == 0 and len(c.luns) == 1 and c.kref == 1 and d2.sdev.refs == 1


def test_vlun_clone_lxt_allocation_enomem_rolled_back(embedded):
    a = embedded
    d = add_disk(a)
    src, dst = _clone_setup(a, d, sizes=(0, 2 * CH))     # slot 0 empty, slot 1 has an LXT
    users = disk_glun(d).users
    a.inject_fault("alloc")
    fails(d, CLONE, clone_arg(src, dst), errno.ENOMEM, CHILD)
    assert find_ctx(a, dst).rht_out == 0                   # slot 0 was released again
    assert disk_glun(d).users == users
    assert not disk_glun(d).allocator.clone_counts(_auns(a, src, 1)).any()


def test_vlun_clone_chunk_clone_count_255_eio_rolled_back(embedded):
    a = embedded
    d = add_disk(a)
    src, _ = _clone_setup(a, d, sizes=(0, CH))
    aun = _auns(a, src, 1)
    for i in range(255):
        child = CHILD.pid + 10 + i
        dst = as_proc(d, ATTACH, attach_arg(),
                      Caller(child, ME)).context_id
        as_proc(d, CLONE, clone_arg(src, dst), Caller(child, ME))
    assert disk_glun(d).allocator.clone_counts(aun).tolist() == [255]
    users = disk_glun(d).users
    child = CHILD.pid + 9
    dst = as_proc(d, ATTACH, attach_arg(), Caller(child, ME)).context_id
    fails(d, CLONE, clone_arg(src, dst), errno.EIO, Caller(child, ME))
    assert find_ctx(a, dst).rht_out == 0 and disk_glun(d).users == users
    assert disk_glun(d).allocator.clone_counts(aun).tolist() == [255]


def test_vlun_clone_sync_fails_eagain_rolled_back_retry_succeeds(embedded):
    a = embedded
    d = add_disk(a)
    src, dst = _clone_setup(a, d, sizes=(2 * CH,))
    users = disk_glun(d).users
    a.inject_fault("sync")
    fails(d, CLONE, clone_arg(src, dst), errno.EAGAIN, CHILD)
    assert find_ctx(a, dst).rht_out == 0 and disk_glun(d).users == users
    assert not disk_glun(d).allocator.clone_counts(_auns(a, src, 0)).any()
    as_proc(d, CLONE, clone_arg(src, dst), CHILD)
    assert disk_glun(d).allocator.clone_counts(_auns(a, src, 0)).tolist() == [1, 1]
    assert disk_glun(d).users == users + 1


def test_vlun_clone_real_fork_child_cannot_use_parent_context(adapter):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                              # the child
        code = 0
        try:
            os.close(r)
            out = []
            for req, arg in [
                (DIRECT, udirect_arg(cid)),
                (VIRTUAL, uvirtual_arg(cid)),
                (RESIZE, resize_arg(cid, h, 2 * CH)),
                (RELEASE, release_arg(cid, h)),
                (VERIFY, verify_arg(cid, h)),
                (DETACH, detach_arg(cid)),
                (RECOVER, recover_arg(cid)),
            ]:
                try:
                    cxlflash.ioctl(d, req, arg)
                    out.append(0)
                except OSError as e:
                    out.append(e.errno)
            os.write(w, bytes(out))
        except BaseException:                 # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert list(data) == [errno.EINVAL] * 7
    assert last_lba(d, cid, h) == CH - 1      # the parent's context is intact
