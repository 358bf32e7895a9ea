"""USER_VIRTUAL and RELEASE: the virtual LUN (spec Appendix A), data through
the AFU path, a real block device, and every failure of §22.2
USER_VIRTUAL / RELEASE.

Conventions (spec references, test names, fixtures): see ``__init__.py``.
"""
import errno
import os
import random
import shutil
import subprocess

import numpy as np
import pytest

import cxlflash
from cxlflash import uapi
from cxlflash.backing import ZERO_BLKZEROOUT
from cxlflash.driver.lunmgt import MODE_NONE, MODE_PHYSICAL, MODE_VIRTUAL

from block_pattern import pattern

from .helpers import (
    BLK, CH, CHUNK, CHUNK_4K, DISABLE, K4, MANAGE, NCHUNKS, RELEASE, RecordingAllocator,
    STRANGER, U64, VERIFY, VIRTUAL, add_disk, attach, blocks, chunks, cid_of,
    close_open_fds, ctx, detach, disk_glun, fails, find_ctx, glun, last_lba, manage_arg,
    phys, release, release_arg, resize, udirect, uvirtual, uvirtual_arg, verify,
    verify_arg)

#: The tests of add_disk()'s LUN run on memory and on an RBD image
#: (tests/conftest.py); ``memory_backing``: memory only (the test reads the
#: memory backing's fd, or makes its own LUNs with add_lun(None, ...)).
LUN_BACKINGS = ("memory", "rbd")


# -- spec Appendix A -------------------------------------------------------------


def test_appendix_a_4k_lun(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=1_000_000 * CHUNK * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    c = ctx(a, cid)
    counters = a.driver.afu.counters
    hw, lw = counters["hw_syncs"], counters["lw_syncs"]

    # Fresh virtual open, lun_size 0: handle 0, empty, heavyweight sync.
    uv = uvirtual(d, cid, 0)
    assert uv.rsrc_handle == 0 and uv.last_lba == U64
    assert c.table.lxt_count(0) == 0
    assert (counters["hw_syncs"], counters["lw_syncs"]) == (hw + 1, lw)
    g = glun(a, w)
    assert g.mode == MODE_VIRTUAL and g.users == 1
    assert g.allocator.space() == 1_000_000

    # RESIZE to 100 -> 1 chunk (aun 0).
    assert resize(d, cid, 0, 100).last_lba == 65535
    assert chunks(a, cid, 0) == [0]
    # RESIZE to 65536 -> still 1 chunk: the "equal" path, a heavyweight sync only.
    hw, lw = counters["hw_syncs"], counters["lw_syncs"]
    assert resize(d, cid, 0, 65536).last_lba == 65535
    assert chunks(a, cid, 0) == [0]
    assert (counters["hw_syncs"], counters["lw_syncs"]) == (hw + 1, lw)
    # RESIZE to 131073 -> 3 chunks (auns 1, 2 added).
    assert resize(d, cid, 0, 131073).last_lba == 196607
    assert chunks(a, cid, 0) == [0, 1, 2]
    # Second virtual handle, lun_size 65536 -> handle 1, aun 3.
    uv = uvirtual(d, cid, 65536)
    assert (uv.rsrc_handle, uv.last_lba) == (1, 65535)
    assert chunks(a, cid, 1) == [3]
    # RESIZE handle 0 to 65536 -> frees aun 2 then aun 1; chunk 0 stays.
    rec = g.allocator = RecordingAllocator(g.allocator)
    assert resize(d, cid, 0, 65536).last_lba == 65535
    assert rec.freed == [2, 1]
    g.allocator = rec._real          # the core grows straight from the real one
    assert chunks(a, cid, 0) == [0]
    assert g.allocator.space() == 1_000_000 - 2
    # Next allocation: the cursor is still in word 0 -> the lowest free bit, aun 1.
    assert resize(d, cid, 1, 2 * 65536).last_lba == 2 * 65536 - 1
    assert chunks(a, cid, 1) == [3, 1]


def test_appendix_a_512_byte_lun(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=4 * CHUNK * 512, block_size=512)
    d = a.open_disk(w)
    at = attach(d)
    assert at.block_size == 512 and at.last_lba == 4 * CHUNK - 1
    cid = at.context_id
    h = uvirtual(d, cid, 0).rsrc_handle
    # 1 chunk = 65536 x 512 B = 32 MiB = 8192 4K blocks.
    assert resize(d, cid, h, 8192).last_lba == 8191
    assert chunks(a, cid, h) == [0]
    assert resize(d, cid, h, 8193).last_lba == 16383
    assert chunks(a, cid, h) == [0, 1]
    assert resize(d, cid, h, 1).last_lba == 8191
    # The initial size of an open rounds the same way.
    uv = uvirtual(d, cid, 8193)
    assert uv.last_lba == 16383 and len(chunks(a, cid, uv.rsrc_handle)) == 2
    assert verify(d, cid, uv.rsrc_handle).last_lba == 16383


@pytest.mark.parametrize("block_size", [4096, 512])
def test_appendix_a_lun_below_one_chunk_is_enomem(memory_backing, embedded, block_size):
    a = embedded
    w = a.add_lun(None, size=65535 * block_size, block_size=block_size)
    d = a.open_disk(w)
    at = attach(d)
    assert at.last_lba == 65534
    fails(d, VIRTUAL, uvirtual_arg(at.context_id, 0), errno.ENOMEM)
    g = glun(a, w)
    assert (g.mode, g.users, g.allocator) == (MODE_NONE, 0, None)
    # The mode was not left stuck: direct access still works.
    ud = udirect(d, at.context_id)
    assert ud.last_lba == 65534 and g.mode == MODE_PHYSICAL


def test_exactly_one_chunk_lun(memory_backing, embedded):
    a = embedded
    w = a.add_lun(None, size=CHUNK * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    uv = uvirtual(d, cid, 10 * CHUNK_4K)        # best effort: the one chunk
    assert uv.last_lba == CHUNK_4K - 1 and chunks(a, cid, uv.rsrc_handle) == [0]


# -- data integrity through the AFU path -----------------------------------------


def interleaved_vlun(a, nchunks=16, block_size=K4):
    w = a.add_lun(None, size=nchunks * CHUNK * block_size, block_size=block_size)
    d = a.open_disk(w)
    cid = attach(d).context_id
    per = CHUNK * block_size // K4
    h = uvirtual(d, cid, per).rsrc_handle
    o = uvirtual(d, cid, per).rsrc_handle
    for n in (2, 3):
        resize(d, cid, h, n * per)
        resize(d, cid, o, n * per)
    assert chunks(a, cid, h) == [0, 2, 4]
    return w, d, cid, h


def test_data_lands_at_translated_physical_lba(memory_backing, embedded):
    a = embedded
    w, d, cid, h = interleaved_vlun(a)
    rng = random.Random(5)
    lbas = [0, 1, 12345, CHUNK - 1, CHUNK, CHUNK + 777, 2 * CHUNK + 9, 3 * CHUNK - 1]
    for lba in lbas:
        data = rng.randbytes(K4)
        a.write(cid, h, lba, data)
        p = int(a.translate(cid, h, [lba])[0])
        aun = chunks(a, cid, h)[lba >> 16]
        assert p == (aun << 16) | (lba & 0xFFFF)
        assert phys(a, w, p) == data
        assert a.read(cid, h, lba, 1) == data
    plbas = a.translate(cid, h, np.array(lbas, dtype=np.uint64))
    assert plbas.dtype == np.uint64 and len(plbas) == len(lbas)


@pytest.mark.parametrize("block_size", [4096, 512])
@pytest.mark.parametrize("start, n", [(CHUNK - 3, 8), (2 * CHUNK - 1, 2), (CHUNK - 5, CHUNK + 10)])
def test_write_crossing_chunk_boundaries_splits(memory_backing, embedded, start, n, block_size):
    a = embedded
    bs = block_size
    w, d, cid, h = interleaved_vlun(a, block_size=bs)
    # Blocks that name themselves (every word says its vLBA): a block that
    # lands at the wrong place cannot match; made without a Python loop.
    data = pattern(start, n, seed=bs, bs=bs).tobytes()
    assert len(set(data[i * bs:(i + 1) * bs] for i in (0, n // 2, n - 1))) == min(n, 3)
    assert a.write(cid, h, start, data) == n
    lbas = np.arange(start, start + n, dtype=np.uint64)
    plbas = a.translate(cid, h, lbas)
    auns = np.array(chunks(a, cid, h), dtype=np.uint64)
    offset = lbas & np.uint64(0xFFFF)
    expected = (auns[lbas >> np.uint64(16)] << np.uint64(16)) | offset
    wrong = np.flatnonzero(plbas != expected)
    assert plbas.dtype == np.uint64 and len(plbas) == n
    assert wrong.size == 0, f"block {wrong[0]}: plba {plbas[wrong[0]]} != {expected[wrong[0]]}"
    # Spot-check each block at both ends and around every boundary.
    edges = np.flatnonzero((offset == 0) | (offset == np.uint64(0xFFFF)))
    idx = {0, n - 1} | {int(i) for i in edges}
    for i in sorted(idx):
        assert phys(a, w, int(plbas[i])) == data[i * bs:(i + 1) * bs], i
    assert a.read(cid, h, start, n) == data
    buf = bytearray(n * bs)
    assert a.readinto(cid, h, start, buf) == n and bytes(buf) == data


@pytest.mark.parametrize("start, n", [(3 * CHUNK - 1, 2), (3 * CHUNK, 1),
                                      (2 * CHUNK, CHUNK + 1), (0, 3 * CHUNK + 1)])
def test_transfer_beyond_vlun_refused_whole(memory_backing, embedded, start, n):
    a = embedded
    w, d, cid, h = interleaved_vlun(a)
    auns = chunks(a, cid, h)
    marker = blocks(1, 77)
    # Something readable at the last valid block, to see it is not overwritten.
    a.write(cid, h, 3 * CHUNK - 1, marker)
    with pytest.raises(cxlflash.AfuError) as ei:
        a.write(cid, h, start, bytes(n * K4))
    assert ei.value.afu_rc == 0x13 and ei.value.errno == errno.EIO
    assert a.read(cid, h, 3 * CHUNK - 1, 1) == marker
    assert phys(a, w, (auns[2] << 16) | 0xFFFF) == marker
    if start < 3 * CHUNK:
        assert phys(a, w, (auns[start >> 16] << 16) | (start & 0xFFFF)) == (
            marker if start == 3 * CHUNK - 1 else bytes(K4))
    with pytest.raises(cxlflash.AfuError) as ei:
        a.read(cid, h, start, n)
    assert ei.value.afu_rc == 0x13
    with pytest.raises(cxlflash.AfuError) as ei:
        a.translate(cid, h, [3 * CHUNK])
    assert ei.value.afu_rc == 0x13
    with pytest.raises(cxlflash.AfuError) as ei:
        a.write(cid, h, U64, bytes(2 * K4))               # would wrap to LBA 0
    assert ei.value.afu_rc == 0x13
    assert phys(a, w, auns[0] << 16) == bytes(K4)


def test_afu_handle_errors(memory_backing, embedded):
    a = embedded
    w, d, cid, h = interleaved_vlun(a)
    with pytest.raises(cxlflash.AfuError) as ei:
        a.read(cid, 5, 0, 1)
    assert ei.value.afu_rc == 0x01
    with pytest.raises(cxlflash.AfuError) as ei:
        a.read(cid, 256, 0, 1)
    assert ei.value.afu_rc == 0x03
    ro = attach(d, flags=os.O_RDONLY).context_id
    hr = uvirtual(d, ro, 1).rsrc_handle
    with pytest.raises(cxlflash.AfuError) as ei:
        a.write(ro, hr, 0, bytes(K4))
    assert ei.value.afu_rc == 0x05
    assert a.read(ro, hr, 0, 1) == bytes(K4)
    wo = attach(d, flags=os.O_WRONLY).context_id
    hw = uvirtual(d, wo, 1).rsrc_handle
    a.write(wo, hw, 0, bytes(K4))
    with pytest.raises(cxlflash.AfuError) as ei:
        a.read(wo, hw, 0, 1)
    assert ei.value.afu_rc == 0x05


# -- a real block device ---------------------------------------------------------


def test_loop_block_device(memory_backing, embedded, tmp_path):
    losetup = shutil.which("losetup")
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(4 * CHUNK * 512)                       # 128 MiB sparse: 4 chunks of 512 B
    try:
        dev = subprocess.run([losetup or "losetup", "--find", "--show", str(img)],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"losetup failed (not root, or no loop device support): {e}")
    a = embedded
    try:
        out = subprocess.run(["blockdev", "--getss", dev], capture_output=True,
                             text=True, check=True).stdout.strip()
        bs = int(out)
        w = a.add_lun(dev)
        g = glun(a, w)
        assert g.backing.block_size == bs
        assert g.backing.zero_mode == ZERO_BLKZEROOUT
        d = a.open_disk(w)
        at = attach(d)
        assert at.block_size == bs
        assert at.last_lba == 4 * CHUNK * 512 // bs - 1
        cid = at.context_id
        nchunks = (at.last_lba + 1) // CHUNK
        per_chunk = CHUNK * bs // K4
        h = uvirtual(d, cid, 2 * per_chunk,
                     flags=uapi.DK_CXLFLASH_UVIRTUAL_NEED_WRITE_SAME).rsrc_handle
        o = uvirtual(d, cid, per_chunk).rsrc_handle
        resize(d, cid, h, 3 * per_chunk)                  # chunks 0, 1, 3 (o has 2)
        assert chunks(a, cid, h) == [0, 1, 3] and nchunks == 4
        data = blocks(6, 3, bs)
        start = 2 * CHUNK - 3                              # crosses chunk 1 -> 2 (aun 3)
        a.write(cid, h, start, data)
        dfd = os.open(dev, os.O_RDONLY)
        try:
            plbas = a.translate(cid, h, np.arange(start, start + 6, dtype=np.uint64))
            assert [int(p) for p in plbas] == [CHUNK * 2 - 3 + i for i in range(3)] + \
                [3 * CHUNK + i for i in range(3)]
            for i, p in enumerate(plbas):
                assert os.pread(dfd, bs, int(p) * bs) == data[i * bs:(i + 1) * bs]
            assert a.read(cid, h, start, 6) == data
            # Shrink: chunk aun 3 is scrubbed (BLKZEROOUT on the device).
            resize(d, cid, h, 2 * per_chunk)
            assert os.pread(dfd, 3 * bs, 3 * CHUNK * bs) == bytes(3 * bs)
            assert os.pread(dfd, 3 * bs, (2 * CHUNK - 3) * bs) == data[:3 * bs]
        finally:
            os.close(dfd)
        release(d, cid, h)
        release(d, cid, o)
        detach(d, cid)
    finally:
        close_open_fds()
        a.close()
        subprocess.run([losetup or "losetup", "-d", dev], check=False)


# -- §22.2 USER_VIRTUAL ----------------------------------------------------------


def test_user_virtual_allocator_init_lun_too_small_enomem(embedded):
    a = embedded
    d = add_disk(a)
    small = a.open_disk(a.add_lun(None, size=65535 * BLK, block_size=BLK))
    cid = cid_of(small)
    fails(small, VIRTUAL, uvirtual_arg(cid), errno.ENOMEM)
    assert disk_glun(small).mode == MODE_NONE and disk_glun(small).allocator is None
    udirect(small, cid)                        # physical access is fine


def test_user_virtual_allocator_init_before_lookup(adapter):
    a = adapter
    d = add_disk(a)
    small = a.open_disk(a.add_lun(None, size=65535 * BLK, block_size=BLK))
    attach(small)
    fails(small, VIRTUAL, uvirtual_arg(0xBAD), errno.ENOMEM)


def test_user_virtual_lun_physical_einval(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    udirect(d, cid)
    fails(d, VIRTUAL, uvirtual_arg(cid, CH),
          errno.EINVAL)
    assert disk_glun(d).mode == MODE_PHYSICAL and disk_glun(d).users == 1
    assert disk_glun(d).allocator is None


def _lun_with_empty_port_sel(a, d):
    """Disk ``d`` in superpipe mode under an llun with no port bit left.
    The kernel reached this by re-pointing disks at a foreign WWID with
    MANAGE_LUN; that is refused now (issue 8), so the state is set here."""
    d.sdev.llun.port_sel = 0
    return cid_of(d)


def test_user_virtual_lun_table_no_port_bits_eio(embedded):
    a = embedded
    d = add_disk(a)
    cid = _lun_with_empty_port_sel(a, d)
    fails(d, VIRTUAL, uvirtual_arg(cid, CH), errno.EIO)
    assert disk_glun(d).mode == MODE_NONE and disk_glun(d).users == 0
    udirect(d, cid)                        # USER_DIRECT does not use the LUN table


def test_user_virtual_lun_table_before_lookup(embedded):
    a = embedded
    d = add_disk(a)
    _lun_with_empty_port_sel(a, d)
    fails(d, VIRTUAL, uvirtual_arg(0xBAD), errno.EIO)


def test_user_virtual_lun_table_full_enospc(memory_backing, make_embedded):
    # memory_backing: 256 LUNs; on RBD 256 images, connections and locks (~45 s).
    # Single-port LUNs take slots 255, 254, ... 1 of their port's table.
    a = make_embedded()
    d = add_disk(a, nchunks=1)
    cid = cid_of(d)
    disks = [d] + [add_disk(a, nchunks=1) for _ in range(255)]
    for i, dk in enumerate(disks):
        if i:
            attach(dk, reuse=cid)
        if i < 255:
            assert uvirtual(dk, cid).rsrc_handle == i
            assert dk.sdev.llun.lun_index == 255 - i
    last = disks[255]
    fails(last, VIRTUAL, uvirtual_arg(cid), errno.ENOSPC)
    assert disk_glun(last).mode == MODE_NONE and disk_glun(last).users == 0
    # Decision 20: a LUN leaving the table gives its slot back.
    release(disks[7], cid, 7)
    cxlflash.ioctl(disks[7], MANAGE, manage_arg(disks[7].wwid, DISABLE))
    assert uvirtual(last, cid).rsrc_handle == 7
    assert last.sdev.llun.lun_index == 255 - 7


def test_user_virtual_lookup_fails_einval(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    d2 = add_disk(a)
    cid_of(d2)                        # its capacity is known
    arg = lambda c: uvirtual_arg(c, CH)  # noqa: E731
    fails(d, VIRTUAL, arg(cid ^ (1 << 45)), errno.EINVAL)
    fails(d2, VIRTUAL, arg(cid), errno.EINVAL)            # LUN not attached
    fails(d, VIRTUAL, arg(cid), errno.EINVAL, STRANGER)
    a.reset()
    fails(d, VIRTUAL, arg(cid), errno.EINVAL)             # error contexts not found
    assert disk_glun(d).mode == MODE_NONE and disk_glun(d).users == 0


def test_user_virtual_no_free_rht_slot_emfile(make_embedded):
    a = make_embedded(rht_per_context=2)
    d = add_disk(a)
    cid = cid_of(d)
    uvirtual(d, cid)
    uvirtual(d, cid, CH)
    fails(d, VIRTUAL, uvirtual_arg(cid), errno.EMFILE)
    assert disk_glun(d).users == 2


def test_user_virtual_emfile_before_enospc(make_adapter):
    a = make_adapter(rht_per_context=1)
    d = add_disk(a, nchunks=1)
    cid = cid_of(d)
    uvirtual(d, cid, CH)                       # the only chunk, the only slot
    fails(d, VIRTUAL, uvirtual_arg(cid, CH),
          errno.EMFILE)


def test_user_virtual_initial_size_no_free_chunk_enospc(make_embedded):
    a = make_embedded()
    d = add_disk(a, nchunks=2)
    cid = cid_of(d)
    uvirtual(d, cid, 2 * CH)
    fails(d, VIRTUAL, uvirtual_arg(cid, 1), errno.ENOSPC)
    assert find_ctx(a, cid).rht_out == 1 and disk_glun(d).users == 1
    assert uvirtual(d, cid, 0).rsrc_handle == 1          # size 0 needs no chunk


def test_user_virtual_initial_size_partial_growth_succeeds(make_adapter):
    a = make_adapter()
    d = add_disk(a, nchunks=2)
    cid = cid_of(d)
    uvirtual(d, cid, CH)
    s = uvirtual(d, cid, 5 * CH)
    assert s.last_lba == CH - 1                           # one chunk was left


def test_user_virtual_lxt_allocation_enomem(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    uvirtual(d, cid)                  # keeps the allocator alive
    a.inject_fault("alloc")
    fails(d, VIRTUAL, uvirtual_arg(cid, CH),
          errno.ENOMEM)
    assert disk_glun(d).allocator.space() == NCHUNKS
    assert find_ctx(a, cid).rht_out == 1 and disk_glun(d).users == 1


@pytest.mark.parametrize("size", [3 * CH, 0], ids=["grow_lw_sync", "size0_hw_sync"])
def test_user_virtual_sync_fails_eagain_frees_grown_chunks_decision_7(embedded, size):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    uvirtual(d, cid)                  # keeps the allocator alive
    a.inject_fault("sync")
    fails(d, VIRTUAL, uvirtual_arg(cid, size),
          errno.EAGAIN)
    g = disk_glun(d)
    assert g.allocator.space() == NCHUNKS and g.users == 1
    c = find_ctx(a, cid)
    assert c.rht_out == 1 and not c.table.is_open(1)
    # The slot comes back clean: a new open starts empty (no stale lxt_cnt).
    s = uvirtual(d, cid, 0)
    assert s.rsrc_handle == 1 and s.last_lba == U64


# -- §22.2 RELEASE ---------------------------------------------------------------


def test_release_lookup_fails_einval_error_contexts_found(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, CH).rsrc_handle
    d2 = add_disk(a)
    arg = lambda c: release_arg(c, h)  # noqa: E731
    fails(d, RELEASE, arg(cid ^ (1 << 60)), errno.EINVAL)
    fails(d, RELEASE, arg(cid | 0xFFFF), errno.EINVAL)    # PE >= 512
    fails(d2, RELEASE, arg(cid), errno.EINVAL)            # LUN not attached
    fails(d, RELEASE, arg(cid), errno.EINVAL, STRANGER)
    a.reset()
    release(d, cid, h)                                    # in error: reachable
    assert disk_glun(d).mode == MODE_NONE


def test_release_invalid_handle_einval(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    d2 = add_disk(a)
    attach(d2, reuse=cid)
    uvirtual(d, cid)
    h1 = uvirtual(d2, cid).rsrc_handle
    arg = lambda h: release_arg(cid, h)  # noqa: E731
    fails(d, RELEASE, arg(256), errno.EINVAL)
    fails(d, RELEASE, arg(h1), errno.EINVAL)
    fails(d, RELEASE, arg(9), errno.EINVAL)
    assert find_ctx(a, cid).rht_out == 2


def test_release_virtual_sync_fails_eagain_handle_open_at_size_0_retry_succeeds(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h = uvirtual(d, cid, 2 * CH).rsrc_handle
    a.inject_fault("sync")
    fails(d, RELEASE, release_arg(cid, h),
          errno.EAGAIN)
    assert last_lba(d, cid, h) == U64                     # open, size 0
    g = disk_glun(d)
    assert g.mode == MODE_VIRTUAL and g.users == 1 and g.allocator.space() == NCHUNKS
    release(d, cid, h)                                    # the retry completes
    fails(d, VERIFY, verify_arg(cid, h), errno.EINVAL)
    assert g.mode == MODE_NONE and g.users == 0


def test_release_physical_sync_fails_ignored(embedded):
    a = embedded
    d = add_disk(a)
    cid = cid_of(d)
    h = udirect(d, cid).rsrc_handle
    a.inject_fault("sync")
    release(d, cid, h)
    assert a.driver.afu.faults.pending() == {}            # the sync was sent
    assert disk_glun(d).mode == MODE_NONE and find_ctx(a, cid).rht_out == 0
