"""VLUN_RESIZE (§11): rounding, best-effort growth, shrink order, scrubbing,
and every failure of §22.2 VLUN_RESIZE.

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import errno
import threading

import pytest

import cxlflash
from cxlflash.driver import vlun as vlun_mod
from cxlflash import uapi

from .helpers import (
    Bg, CH, CHILD, CHUNK, CHUNK_4K, K4, NCHUNKS, RESIZE, RecordingAllocator, STRANGER,
    U64, VIRTUAL, add_disk, attach, blocks, child_io, chunk_bytes, chunks, cid_of,
    clone, ctx, disk_glun, fails, glun, last_lba, last_lba_4k, release, resize,
    resize_arg, returns_while_context_busy, udirect, uvirtual, uvirtual_arg, verify)

#: The tests of add_disk()'s LUN run on memory and on an RBD image
#: (tests/conftest.py); ``memory_backing``: memory only (the test reads the
#: memory backing's fd, or makes its own LUNs with add_lun(None, ...)).
LUN_BACKINGS = ("memory", "rbd")


# -- VLUN_RESIZE (§11) -----------------------------------------------------------


@pytest.mark.parametrize("req, want", [(0, 0), (1, 1), (65535, 1), (65536, 1),
                                       (65537, 2), (3 * 65536, 3), (3 * 65536 + 1, 4)])
def test_resize_rounding_4k(memory_backing, embedded, req, want):
    a = embedded
    w = a.add_lun(None, size=8 * CHUNK * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle
    assert resize(d, cid, h, req).last_lba == last_lba_4k(want)
    assert ctx(a, cid).table.lxt_count(h) == want
    assert verify(d, cid, h).last_lba == last_lba_4k(want)


@pytest.mark.parametrize("req, want", [(1, 1), (8191, 1), (8192, 1), (8193, 2),
                                       (3 * 8192, 3), (3 * 8192 + 1, 4)])
def test_resize_rounding_512(memory_backing, embedded, req, want):
    a = embedded
    w = a.add_lun(None, size=8 * CHUNK * 512, block_size=512)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle
    assert resize(d, cid, h, req).last_lba == want * 8192 - 1
    assert ctx(a, cid).table.lxt_count(h) == want


def test_resize_best_effort_growth(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle
    # Asking for 10 chunks of 4: success, last_lba shows 4.
    assert resize(d, cid, h, 10 * CHUNK_4K).last_lba == last_lba_4k(4)
    assert chunks(a, cid, h) == [0, 1, 2, 3] and g.allocator.space() == 0
    # No free chunk at all: ENOSPC, nothing changes.
    fails(d, RESIZE, resize_arg(cid, h, 5 * CHUNK_4K), errno.ENOSPC)
    users = g.users
    fails(d, VIRTUAL, uvirtual_arg(cid, 1), errno.ENOSPC)
    assert g.users == users
    # A size-0 open needs no chunk.
    h0 = uvirtual(d, cid, 0).rsrc_handle
    # Partial growth at open.
    resize(d, cid, h, 2 * CHUNK_4K)
    uv = uvirtual(d, cid, 5 * CHUNK_4K)
    assert uv.last_lba == last_lba_4k(2) and chunks(a, cid, uv.rsrc_handle) == [2, 3]
    assert g.users == users + 2
    del h0


def test_shrink_frees_tail_first_and_keeps_head(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=16 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle
    other = uvirtual(d, cid, 0).rsrc_handle
    for n in range(1, 7):                                  # interleave: auns not in order
        resize(d, cid, h, n * CHUNK_4K)
        resize(d, cid, other, n * CHUNK_4K)
    mine = chunks(a, cid, h)
    assert mine == [0, 2, 4, 6, 8, 10]
    data = [blocks(1, i) for i in range(6)]
    for i in range(6):
        a.write(cid, h, i * CHUNK + 7, data[i])
    rec = g.allocator = RecordingAllocator(g.allocator)
    assert resize(d, cid, h, 2 * CHUNK_4K + 1).last_lba == last_lba_4k(3)
    assert rec.freed == [10, 8, 6]
    g.allocator = rec._real          # the core grows straight from the real one
    assert chunks(a, cid, h) == [0, 2, 4]
    for i in range(3):
        assert a.read(cid, h, i * CHUNK + 7, 1) == data[i]
    # Growth appends at the tail: the old head keeps its mapping.
    resize(d, cid, h, 4 * CHUNK_4K)
    assert chunks(a, cid, h)[:3] == [0, 2, 4]
    full = chunks(a, cid, h)
    rec.freed.clear()
    g.allocator = rec                # record the frees of the shrink to 0
    assert resize(d, cid, h, 0).last_lba == U64
    assert rec.freed == full[::-1]
    g.allocator = rec._real
    assert ctx(a, cid).table.lxt_count(h) == 0
    # The handle stays open at size 0 and can grow again.
    assert resize(d, cid, h, 1).last_lba == last_lba_4k(1)


@pytest.mark.parametrize("block_size", [4096, 512])
def test_need_write_same_scrubs_freed_chunks(memory_backing, embedded, block_size):
    a = embedded
    w = a.add_lun(None, size=8 * CHUNK * block_size, block_size=block_size)
    d = a.open_disk(w)
    cid = attach(d).context_id
    per_chunk = CHUNK * block_size // K4
    uv = uvirtual(d, cid, 3 * per_chunk, flags=uapi.DK_CXLFLASH_UVIRTUAL_NEED_WRITE_SAME)
    h = uv.rsrc_handle
    plain = uvirtual(d, cid, 2 * per_chunk).rsrc_handle
    auns = chunks(a, cid, h)
    plain_auns = chunks(a, cid, plain)
    pat = {}
    for i in range(3):
        for off in (0, 12345, CHUNK - 1):
            pat[i, off] = blocks(1, i * 100000 + off, block_size)
            a.write(cid, h, i * CHUNK + off, pat[i, off])
    for i in range(2):
        a.write(cid, plain, i * CHUNK + 5, blocks(1, 99 + i, block_size))
    for i in range(3):
        for off in (0, 12345, CHUNK - 1):
            assert chunk_bytes(a, w, auns[i], off) == pat[i, off]
    resize(d, cid, h, per_chunk)
    zero = bytes(block_size)
    for i in (1, 2):                                       # freed: scrubbed
        for off in (0, 12345, CHUNK - 1):
            assert chunk_bytes(a, w, auns[i], off) == zero
    for off in (0, 12345, CHUNK - 1):                      # kept: intact
        assert chunk_bytes(a, w, auns[0], off) == pat[0, off]
    # Without NEED_WRITE_SAME the kernel does not scrub.
    resize(d, cid, plain, 0)
    for i in range(2):
        assert chunk_bytes(a, w, plain_auns[i], 5) == blocks(1, 99 + i, block_size)
    # RELEASE is a resize to 0: the last chunk is scrubbed too.
    release(d, cid, h)
    for off in (0, 12345, CHUNK - 1):
        assert chunk_bytes(a, w, auns[0], off) == zero


def test_need_write_same_does_not_scrub_chunk_still_cloned(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=8 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    src = attach(d).context_id
    h = uvirtual(d, src, 2 * CHUNK_4K, flags=uapi.DK_CXLFLASH_UVIRTUAL_NEED_WRITE_SAME).rsrc_handle
    auns = chunks(a, src, h)
    data = [blocks(1, 11), blocks(1, 12)]
    a.write(src, h, 3, data[0])
    a.write(src, h, CHUNK + 3, data[1])
    dst = attach(d, caller=CHILD).context_id
    clone(d, src, dst)
    # The parent shrinks to 0: both chunks are still the child's -> not scrubbed.
    resize(d, src, h, 0)
    assert chunk_bytes(a, w, auns[0], 3) == data[0]
    assert chunk_bytes(a, w, auns[1], 3) == data[1]
    assert child_io(a, dst, h, CHUNK + 3) == data[1]
    assert all(g.allocator.is_allocated(x) for x in auns)
    # The parent grows again (new chunks), the child drops its references
    # (issue 8: the clone carries NEED_WRITE_SAME): the chunks whose last
    # reference was the child's are scrubbed; then the parent is the last
    # owner of what it shrinks: scrubbed.
    resize(d, src, h, 2 * CHUNK_4K)
    new = chunks(a, src, h)
    a.write(src, h, 3, data[0])
    dst2 = ctx(a, dst)
    assert dst2.rht_needs_ws[h] is True
    release(d, dst, h, caller=CHILD)
    assert chunk_bytes(a, w, auns[0], 3) == bytes(K4)
    assert chunk_bytes(a, w, auns[1], 3) == bytes(K4)
    assert not any(g.allocator.is_allocated(x) for x in auns)
    assert dst2.rht_needs_ws[h] is False
    resize(d, src, h, 0)
    assert chunk_bytes(a, w, new[0], 3) == bytes(K4)


# -- §22.2 VLUN_RESIZE -----------------------------------------------------------


def test_vlun_resize_lun_not_virtual_einval(adapter):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    fails(d, RESIZE, resize_arg(cid, 0, CH), errno.EINVAL)
    h = udirect(d, cid).rsrc_handle
    fails(d, RESIZE, resize_arg(cid, h, CH), errno.EINVAL)


def test_vlun_resize_mode_checked_before_lookup(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    arg = resize_arg(cid, 0, CH)
    t = returns_while_context_busy(a, cid, lambda: cxlflash.ioctl(d, RESIZE, arg))
    assert t.errno == errno.EINVAL


def test_vlun_resize_lookup_fails_einval_error_contexts_found(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    d2 = add_disk(a)
    c2 = cid_of(d2)
    uvirtual(d2, c2)                  # LUN 2 virtual too
    arg = lambda c, dd=None: resize_arg(c, h, 2 * CH)  # noqa: E731
    fails(d, RESIZE, arg(cid ^ (1 << 50)), errno.EINVAL)
    fails(d2, RESIZE, arg(cid), errno.EINVAL)             # LUN not attached
    fails(d, RESIZE, arg(cid), errno.EINVAL, STRANGER)
    fails(d, RESIZE, arg(cid), errno.EINVAL, CHILD)
    a.reset()
    assert resize(d, cid, h, 2 * CH).last_lba == 2 * CH - 1   # in error: reachable


def test_vlun_resize_invalid_handle_einval(adapter):
    a = adapter
    d = add_disk(a)
    cid = cid_of(d)
    d2 = add_disk(a)
    attach(d2, reuse=cid)
    uvirtual(d, cid)                  # handle 0 on LUN 1
    h1 = uvirtual(d2, cid).rsrc_handle    # handle 1 on LUN 2
    arg = lambda h: resize_arg(cid, h, CH)  # noqa: E731
    fails(d, RESIZE, arg(256), errno.EINVAL)              # >= MAX_RHT_PER_CONTEXT
    fails(d, RESIZE, arg(2**63 + 256), errno.EINVAL)      # its low 32 bits: 256
    fails(d, RESIZE, arg(h1), errno.EINVAL)               # opened through LUN 2
    fails(d, RESIZE, arg(5), errno.EINVAL)                # not open
    resize(d2, cid, h1, CH)


def test_vlun_resize_grow_no_free_chunk_enospc(make_adapter):
    a = make_adapter()
    d = add_disk(a, nchunks=2)
    cid = cid_of(d)
    uvirtual(d, cid, 2 * CH)
    h = uvirtual(d, cid).rsrc_handle
    fails(d, RESIZE, resize_arg(cid, h, 1), errno.ENOSPC)
    assert last_lba(d, cid, h) == U64


def test_vlun_resize_grow_partial_succeeds(make_embedded):
    a = make_embedded()
    d = add_disk(a, nchunks=4)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    s = resize(d, cid, h, 10 * CH)
    assert s.last_lba == 4 * CH - 1 and s.hdr.return_flags == 0
    assert disk_glun(d).allocator.space() == 0


@pytest.mark.parametrize("cur,new", [(8, 9), (9, 8)], ids=["grow", "shrink"])
def test_vlun_resize_lxt_reallocation_enomem_no_change(embedded, cur, new):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, cur * CH).rsrc_handle
    a.inject_fault("alloc")
    fails(d, RESIZE, resize_arg(cid, h, new * CH), errno.ENOMEM)
    assert last_lba(d, cid, h) == cur * CH - 1
    assert disk_glun(d).allocator.space() == NCHUNKS - cur


@pytest.mark.parametrize("cur,new", [(1, 3), (3, 1), (2, 2), (0, 0), (2, 0)],
                         ids=["grow", "shrink", "equal", "equal_0", "shrink_to_0"])
def test_vlun_resize_sync_fails_eagain_size_kept(embedded, cur, new):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, cur * CH).rsrc_handle
    a.inject_fault("sync")
    fails(d, RESIZE, resize_arg(cid, h, new * CH), errno.EAGAIN)
    assert last_lba(d, cid, h) == (new * CH - 1) & U64
    assert disk_glun(d).allocator.space() == NCHUNKS - new
    # The documented repair: the same size again (the "equal" path).
    assert resize(d, cid, h, new * CH).last_lba == (new * CH - 1) & U64


def test_vlun_resize_shrink_of_error_context_skips_sync(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, 3 * CH).rsrc_handle
    a.reset()
    a.inject_fault("sync")
    assert resize(d, cid, h, CH).last_lba == CH - 1     # no HW sync (§16.2)
    assert a.driver.afu.faults.pending() == {"sync": 1}
    fails(d, RESIZE, resize_arg(cid, h, 2 * CH), errno.EAGAIN)  # grow still syncs


# -- §22.2 VLUN_RESIZE: the unavail window of a scrubbing shrink (decision 26) ---


def test_vlun_resize_write_same_shrink_serialises_decision_26(embedded, monkeypatch):
    # The other `unavail` window: a shrink that scrubs (NEED_WRITE_SAME).
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, 3 * CH, flags=uapi.DK_CXLFLASH_UVIRTUAL_NEED_WRITE_SAME).rsrc_handle
    inside, go = threading.Event(), threading.Event()
    real = vlun_mod.scrub_chunks

    def slow_scrub(*args):
        inside.set()
        assert go.wait(5)
        return real(*args)

    monkeypatch.setattr(vlun_mod, "scrub_chunks", slow_scrub)
    t1 = Bg(lambda: resize(d, cid, h, CH))
    assert inside.wait(5)
    t2 = Bg(lambda: last_lba(d, cid, h))
    t2.join(0.2)
    assert t2.is_alive()
    go.set()
    t1.join(5)
    t2.join(5)
    assert t1.exc is None and t2.exc is None and t2.result == CH - 1
