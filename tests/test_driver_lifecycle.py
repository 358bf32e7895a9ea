"""The driver model end to end, through the ioctl layer and the AFU data path.

Spec references are to /work/shared/spec/kernel-semantics.md; "decision N"
is the decision table of DESIGN.md (which wins where the two disagree).

Impersonation: a forked child that clones its parent's vLUNs cannot use the
embedded adapter (it belongs to the parent process), so the clone tests play
the child with ``Caller(pid=C, ppid=P)`` through ``superpipe.disk_ioctl``.
The embedded data path refuses a context whose owner is not this process
(0x21), so the child's context is driven through ``_core.datapath.afu_command``
on its table -- the AFU command the child would issue through its MMIO window.
"""
import errno
import os
import time
import random
import shutil
import stat
import subprocess
import threading

import numpy as np
import pytest

import cxlflash
from cxlflash import uapi
from cxlflash._core.datapath import afu_command
from cxlflash.backing import ZERO_BLKZEROOUT
from cxlflash.driver import superpipe
from cxlflash.driver.core import Caller
from cxlflash.driver.lun import MODE_NONE, MODE_VIRTUAL, MODE_PHYSICAL
from block_pattern import pattern
from forking import in_child
from scsi_sense import desc_sense, fixed_sense

U64 = (1 << 64) - 1
CHUNK = 1 << 16                      # native blocks per chunk
K4 = 4096
CHUNK_4K = CHUNK                     # 4K blocks per chunk of a 4K LUN

P = os.getpid()
CHILD = Caller(pid=P + 1_000_003, ppid=P)        # a (pretend) forked child of P
STRANGER = Caller(pid=P + 2_000_003, ppid=1)     # an unrelated process

_open_fds = set()


# -- helpers ------------------------------------------------------------------


@pytest.fixture
def adapter():
    a = cxlflash.Adapter()
    yield a
    for fd in list(_open_fds):
        close_fd(fd)
    a.close()


def close_fd(fd):
    _open_fds.discard(fd)
    try:
        os.close(fd)
    except OSError:
        pass


def call(d, request, arg, caller=None):
    if caller is None:
        cxlflash.ioctl(d, request, arg)
    else:
        superpipe.disk_ioctl(d.adapter.driver, d.sdev, d, request, arg, caller)
    return arg


def fails(d, request, arg, caller=None):
    """The errno of a failing ioctl; the argument must be left untouched."""
    before = bytes(arg)
    with pytest.raises(cxlflash.CxlFlashError) as ei:
        call(d, request, arg, caller)
    assert bytes(arg) == before, "a failed ioctl changed its argument"
    return ei.value.errno


def attach(d, flags=os.O_RDWR, reuse=None, caller=None):
    at = uapi.dk_cxlflash_attach()
    at.hdr.flags = flags
    if reuse is not None:
        at.hdr.flags |= uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT
        at.context_id = reuse
    call(d, uapi.DK_CXLFLASH_ATTACH, at, caller)
    if reuse is None:
        _open_fds.add(at.adap_fd)
    return at


def attach_arg(cid=0, flags=os.O_RDWR, reuse=False):
    at = uapi.dk_cxlflash_attach()
    at.hdr.flags = flags | (uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT if reuse else 0)
    at.context_id = cid
    return at


def uv_arg(cid, size=0, flags=0):
    uv = uapi.dk_cxlflash_uvirtual()
    uv.context_id = cid
    uv.lun_size = size
    uv.hdr.flags = flags
    return uv


def uvirtual(d, cid, size=0, flags=0, caller=None):
    return call(d, uapi.DK_CXLFLASH_USER_VIRTUAL, uv_arg(cid, size, flags), caller)


def ud_arg(cid):
    ud = uapi.dk_cxlflash_udirect()
    ud.context_id = cid
    return ud


def udirect(d, cid, caller=None):
    return call(d, uapi.DK_CXLFLASH_USER_DIRECT, ud_arg(cid), caller)


def rs_arg(cid, h, size):
    rs = uapi.dk_cxlflash_resize()
    rs.context_id = cid
    rs.rsrc_handle = h
    rs.req_size = size
    return rs


def resize(d, cid, h, size, caller=None):
    return call(d, uapi.DK_CXLFLASH_VLUN_RESIZE, rs_arg(cid, h, size), caller)


def rel_arg(cid, h):
    rl = uapi.dk_cxlflash_release()
    rl.context_id = cid
    rl.rsrc_handle = h
    return rl


def release(d, cid, h, caller=None):
    return call(d, uapi.DK_CXLFLASH_RELEASE, rel_arg(cid, h), caller)


def det_arg(cid):
    dt = uapi.dk_cxlflash_detach()
    dt.context_id = cid
    return dt


def detach(d, cid, caller=None):
    return call(d, uapi.DK_CXLFLASH_DETACH, det_arg(cid), caller)


def clone_arg(src, dst):
    cl = uapi.dk_cxlflash_clone()
    cl.context_id_src = src
    cl.context_id_dst = dst
    return cl


def clone(d, src, dst, caller=CHILD):
    return call(d, uapi.DK_CXLFLASH_VLUN_CLONE, clone_arg(src, dst), caller)


def vf_arg(cid, h, sense=None):
    vf = uapi.dk_cxlflash_verify()
    vf.context_id = cid
    vf.rsrc_handle = h
    if sense is not None:
        vf.hint = uapi.DK_CXLFLASH_VERIFY_HINT_SENSE
        vf.sense_data[:] = bytes(sense)
    return vf


def verify(d, cid, h, sense=None, caller=None):
    return call(d, uapi.DK_CXLFLASH_VERIFY, vf_arg(cid, h, sense), caller)


def rec_arg(cid):
    ra = uapi.dk_cxlflash_recover_afu()
    ra.context_id = cid
    return ra


def recover(d, cid):
    ra = call(d, uapi.DK_CXLFLASH_RECOVER_AFU, rec_arg(cid))
    if ra.hdr.return_flags & uapi.DK_CXLFLASH_APP_CLOSE_ADAP_FD:
        _open_fds.add(ra.adap_fd)
    return ra


def manage(d, wwid, flags):
    ml = uapi.dk_cxlflash_manage_lun()
    ml.wwid[:] = wwid
    ml.hdr.flags = flags
    return call(d, uapi.DK_CXLFLASH_MANAGE_LUN, ml)


ENABLE = uapi.DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE
DISABLE = uapi.DK_CXLFLASH_MANAGE_LUN_DISABLE_SUPERPIPE


def ctx(a, cid):
    """The driver's context record for a live id (None if there is none)."""
    c = a.driver.ctx_tbl[cid & 0xFFFFFFFF]
    return c if c is not None and c.ctxid == cid else None


def chunks(a, cid, h):
    return [int(x) for x in ctx(a, cid).table.chunks(h)]


def glun(a, w):
    return a.driver.gluns[w]


def llun(a, w):
    return a.driver.lluns[w]


def last_lba_4k(nchunks, blk_len=K4):
    return U64 if nchunks == 0 else nchunks * CHUNK * blk_len // K4 - 1


def blocks(n, seed, bs=K4):
    return np.random.default_rng(seed).bytes(n * bs)


def phys(a, w, plba, n=1):
    """Read ``n`` native blocks of the backing store at a physical LBA."""
    g = glun(a, w)
    bs = g.backing.block_size
    return os.pread(g.backing.fd, n * bs, plba * bs)


def chunk_bytes(a, w, aun, offset=0, n=1):
    return phys(a, w, aun * CHUNK + offset, n)


def child_io(a, cid, h, lba, data=None, nblocks=1):
    """The AFU command an impersonated context's process would issue."""
    c = ctx(a, cid)
    g = c.rht_lun[h].parent
    if data is None:
        buf = bytearray(nblocks * g.blk_len)
        afu_command(c.table, h, g.backing.fd, g.blk_len, lba, buf, False)
        return bytes(buf)
    return afu_command(c.table, h, g.backing.fd, g.blk_len, lba, data, True)


class RecordingAllocator:
    """Wraps a LUN's ChunkAllocator and records the order of frees."""

    def __init__(self, real):
        self._real = real
        self.freed = []

    def free_many(self, auns):
        self.freed.extend(int(x) for x in auns)
        return self._real.free_many(auns)

    def __getattr__(self, name):
        return getattr(self._real, name)


# -- spec Appendix A ------------------------------------------------------------


def test_appendix_a_4k_lun(adapter):
    a = adapter
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


def test_appendix_a_512_byte_lun(adapter):
    a = adapter
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
def test_appendix_a_lun_below_one_chunk_is_enomem(adapter, block_size):
    a = adapter
    w = a.add_lun(None, size=65535 * block_size, block_size=block_size)
    d = a.open_disk(w)
    at = attach(d)
    assert at.last_lba == 65534
    assert fails(d, uapi.DK_CXLFLASH_USER_VIRTUAL, uv_arg(at.context_id, 0)) == errno.ENOMEM
    g = glun(a, w)
    assert (g.mode, g.users, g.allocator) == (MODE_NONE, 0, None)
    # The mode was not left stuck: direct access still works.
    ud = udirect(d, at.context_id)
    assert ud.last_lba == 65534 and g.mode == MODE_PHYSICAL


def test_exactly_one_chunk_lun(adapter):
    a = adapter
    w = a.add_lun(None, size=CHUNK * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    uv = uvirtual(d, cid, 10 * CHUNK_4K)        # best effort: the one chunk
    assert uv.last_lba == CHUNK_4K - 1 and chunks(a, cid, uv.rsrc_handle) == [0]


# -- ATTACH -------------------------------------------------------------------------


def test_attach_outputs_4k(adapter):
    a = adapter
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
def test_attach_access_modes(adapter, mode, perms):
    a = adapter
    w = a.add_lun(None, size=CHUNK * K4)
    at = attach(a.open_disk(w), flags=mode)
    assert ctx(a, at.context_id).rht_perms == perms


def test_attach_reuse_context(adapter):
    a = adapter
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
    assert fails(d1, uapi.DK_CXLFLASH_ATTACH, attach_arg(at.context_id, reuse=True)) == errno.EINVAL
    assert fails(d2, uapi.DK_CXLFLASH_ATTACH, attach_arg(at.context_id, reuse=True)) == errno.EINVAL
    # The second LUN is usable through the same context.
    ud = udirect(d2, at.context_id)
    assert ud.last_lba == 999
    # Detaching one LUN keeps the context; the last one destroys it.
    detach(d1, at.context_id)
    assert ctx(a, at.context_id) is c and c.kref == 1
    detach(d2, at.context_id)
    assert ctx(a, at.context_id) is None
    assert glun(a, w2).users == 0 and glun(a, w2).mode == MODE_NONE


def test_reuse_of_another_process_context_fails(adapter):
    a = adapter
    w1, w2 = (a.add_lun(None, size=CHUNK * K4) for _ in range(2))
    at = attach(a.open_disk(w1))
    assert fails(a.open_disk(w2), uapi.DK_CXLFLASH_ATTACH,
                 attach_arg(at.context_id, reuse=True), STRANGER) == errno.EINVAL
    assert fails(a.open_disk(w2), uapi.DK_CXLFLASH_ATTACH,
                 attach_arg(at.context_id, reuse=True), CHILD) == errno.EINVAL


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


def test_pe_exhaustion_is_enodev():
    a = cxlflash.Adapter(max_contexts=3)
    try:
        w = a.add_lun(None, size=CHUNK * K4)
        d = a.open_disk(w)
        ats = [attach(d) for _ in range(3)]
        assert fails(d, uapi.DK_CXLFLASH_ATTACH, attach_arg()) == errno.ENODEV
        detach(d, ats[0].context_id)
        close_fd(ats[0].adap_fd)
        assert attach(d).context_id & 0xFFFFFFFF == 0
    finally:
        for fd in list(_open_fds):
            close_fd(fd)
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
    assert fails(d, uapi.DK_CXLFLASH_DETACH, det_arg(at.context_id)) == errno.EINVAL
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
    for arg, req in [(uv_arg(old), uapi.DK_CXLFLASH_USER_VIRTUAL),
                     (ud_arg(old), uapi.DK_CXLFLASH_USER_DIRECT),
                     (det_arg(old), uapi.DK_CXLFLASH_DETACH),
                     (rec_arg(old), uapi.DK_CXLFLASH_RECOVER_AFU),
                     (attach_arg(old, reuse=True), uapi.DK_CXLFLASH_ATTACH)]:
        assert fails(d, req, arg) == errno.EINVAL
    # Same PE, other high bits -> EINVAL too; the new id works.
    assert fails(d, uapi.DK_CXLFLASH_USER_VIRTUAL,
                 uv_arg(new ^ (1 << 40))) == errno.EINVAL
    assert fails(d, uapi.DK_CXLFLASH_USER_VIRTUAL,
                 uv_arg((new & ~0xFFFFFFFF) | 512)) == errno.EINVAL
    assert uvirtual(d, new, 1).rsrc_handle == 0


def test_lun_not_attached_is_invisible(adapter):
    a = adapter
    w1, w2 = (a.add_lun(None, size=2 * CHUNK * K4) for _ in range(2))
    d1, d2 = a.open_disk(w1), a.open_disk(w2)
    cid = attach(d1).context_id
    attach(d2)                       # another context: w2's capacity is read
    h = uvirtual(d1, cid, 1).rsrc_handle
    for arg, req in [(uv_arg(cid), uapi.DK_CXLFLASH_USER_VIRTUAL),
                     (ud_arg(cid), uapi.DK_CXLFLASH_USER_DIRECT),
                     (det_arg(cid), uapi.DK_CXLFLASH_DETACH),
                     (vf_arg(cid, h), uapi.DK_CXLFLASH_VERIFY)]:
        assert fails(d2, req, arg) == errno.EINVAL


# -- the adapter fd (spec §6.3, decision 4) --------------------------------------------


def test_closing_adapter_fd_releases_context(adapter):
    a = adapter
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
    assert fails(d, uapi.DK_CXLFLASH_VLUN_RESIZE, rs_arg(cid, h0, 0)) == errno.EINVAL
    assert ctx(a, cid) is None
    assert a.driver.ctx_tbl[cid & 0xFFFFFFFF] is None
    assert (g.users, g.mode, g.allocator) == (0, MODE_NONE, None)
    assert fails(d, uapi.DK_CXLFLASH_RELEASE, rel_arg(cid, h1)) == errno.EINVAL
    with pytest.raises(cxlflash.AfuError) as ei:
        a.read(cid, h0, 0, 1)
    assert ei.value.afu_rc == 0x21
    # The PE is free again.
    assert attach(d).context_id & 0xFFFFFFFF == cid & 0xFFFFFFFF


def test_closing_adapter_fd_frees_chunks_other_context_kept(adapter):
    a = adapter
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


def test_closing_adapter_fd_force_releases_despite_sync_failures(adapter):
    # Decision 21: the release path checks every handle in even when the
    # AFU sync of the shrink fails.
    a = adapter
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


def test_dup_of_adapter_fd_keeps_context(adapter):
    a = adapter
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
    assert fails(d, uapi.DK_CXLFLASH_VLUN_RESIZE, rs_arg(cid, h, 0)) == errno.EINVAL
    assert glun(a, w).users == 0


@pytest.mark.parametrize("child_closes", [True, False])
def test_forked_child_closing_fd_keeps_parent_context(adapter, child_closes):
    a = adapter
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


def test_forked_child_cannot_use_parent_context(adapter):
    a = adapter
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
                ("resize", uapi.DK_CXLFLASH_VLUN_RESIZE, rs_arg(cid, h, 0)),
                ("release", uapi.DK_CXLFLASH_RELEASE, rel_arg(cid, h)),
                ("verify", uapi.DK_CXLFLASH_VERIFY, vf_arg(cid, h)),
                ("uvirtual", uapi.DK_CXLFLASH_USER_VIRTUAL, uv_arg(cid)),
                ("detach", uapi.DK_CXLFLASH_DETACH, det_arg(cid)),
                ("recover", uapi.DK_CXLFLASH_RECOVER_AFU, rec_arg(cid)),
                ("reuse", uapi.DK_CXLFLASH_ATTACH, attach_arg(cid, reuse=True))]:
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
        cxlflash.ioctl(child_disk, uapi.DK_CXLFLASH_ATTACH, arg)
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


# -- LUN modes (§8) ------------------------------------------------------------------------


def test_virtual_and_direct_exclude_each_other(adapter):
    a = adapter
    w = a.add_lun(None, size=8 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    ca, cb = attach(d).context_id, attach(d).context_id
    ha = uvirtual(d, ca, 1).rsrc_handle
    assert (g.mode, g.users) == (MODE_VIRTUAL, 1)
    assert fails(d, uapi.DK_CXLFLASH_USER_DIRECT, ud_arg(cb)) == errno.EINVAL
    assert fails(d, uapi.DK_CXLFLASH_USER_DIRECT, ud_arg(ca)) == errno.EINVAL
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
    assert fails(d, uapi.DK_CXLFLASH_USER_VIRTUAL, uv_arg(ca, 0)) == errno.EINVAL
    assert fails(d, uapi.DK_CXLFLASH_VLUN_RESIZE, rs_arg(ca, 0, 1)) == errno.EINVAL
    assert g.users == 3
    # Detach releases every handle of the context on the LUN.
    detach(d, cb)
    assert g.users == 1
    release(d, ca, 0)
    assert (g.mode, g.users) == (MODE_NONE, 0)
    assert uvirtual(d, ca, 0).rsrc_handle == 0


def test_allocator_rebuilt_when_users_reach_zero(adapter):
    a = adapter
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


def test_user_direct_outputs(adapter):
    a = cxlflash.Adapter(ports=2)
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
        for fd in list(_open_fds):
            close_fd(fd)
        a.close()


def test_lun_table_slots_and_all_ports_active():
    a = cxlflash.Adapter(ports=2)
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
        for fd in list(_open_fds):
            close_fd(fd)
        a.close()


def test_lun_table_slots_reclaimed_decision_20():
    a = cxlflash.Adapter(ports=2)
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
        for fd in list(_open_fds):
            close_fd(fd)
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
    assert fails(d, uapi.DK_CXLFLASH_MANAGE_LUN, ml) == errno.EBUSY
    release(d, cid, h)
    detach(d, cid)
    manage(d, w, DISABLE)
    assert fails(d, uapi.DK_CXLFLASH_ATTACH, attach_arg()) == errno.EINVAL
    manage(d, w, ENABLE)
    attach(d)


# -- VLUN_RESIZE (§11) --------------------------------------------------------------------


@pytest.mark.parametrize("req, want", [(0, 0), (1, 1), (65535, 1), (65536, 1),
                                       (65537, 2), (3 * 65536, 3), (3 * 65536 + 1, 4)])
def test_resize_rounding_4k(adapter, req, want):
    a = adapter
    w = a.add_lun(None, size=8 * CHUNK * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle
    assert resize(d, cid, h, req).last_lba == last_lba_4k(want)
    assert ctx(a, cid).table.lxt_count(h) == want
    assert verify(d, cid, h).last_lba == last_lba_4k(want)


@pytest.mark.parametrize("req, want", [(1, 1), (8191, 1), (8192, 1), (8193, 2),
                                       (3 * 8192, 3), (3 * 8192 + 1, 4)])
def test_resize_rounding_512(adapter, req, want):
    a = adapter
    w = a.add_lun(None, size=8 * CHUNK * 512, block_size=512)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle
    assert resize(d, cid, h, req).last_lba == want * 8192 - 1
    assert ctx(a, cid).table.lxt_count(h) == want


def test_resize_best_effort_growth(adapter):
    a = adapter
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle
    # Asking for 10 chunks of 4: success, last_lba shows 4.
    assert resize(d, cid, h, 10 * CHUNK_4K).last_lba == last_lba_4k(4)
    assert chunks(a, cid, h) == [0, 1, 2, 3] and g.allocator.space() == 0
    # No free chunk at all: ENOSPC, nothing changes.
    assert fails(d, uapi.DK_CXLFLASH_VLUN_RESIZE, rs_arg(cid, h, 5 * CHUNK_4K)) == errno.ENOSPC
    users = g.users
    assert fails(d, uapi.DK_CXLFLASH_USER_VIRTUAL, uv_arg(cid, 1)) == errno.ENOSPC
    assert g.users == users
    # A size-0 open needs no chunk.
    h0 = uvirtual(d, cid, 0).rsrc_handle
    # Partial growth at open.
    resize(d, cid, h, 2 * CHUNK_4K)
    uv = uvirtual(d, cid, 5 * CHUNK_4K)
    assert uv.last_lba == last_lba_4k(2) and chunks(a, cid, uv.rsrc_handle) == [2, 3]
    assert g.users == users + 2
    del h0


def test_shrink_frees_tail_first_and_keeps_head(adapter):
    a = adapter
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
def test_need_write_same_scrubs_freed_chunks(adapter, block_size):
    a = adapter
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


def test_need_write_same_does_not_scrub_chunk_still_cloned(adapter):
    a = adapter
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


# -- VLUN_CLONE (§14) -----------------------------------------------------------------------


def test_clone_shares_chunks_and_counts(adapter):
    a = adapter
    w = a.add_lun(None, size=32 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    src = attach(d).context_id                             # owned by P (this process)
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
def test_clone_perms_intersection(adapter, src_mode, dst_mode, want):
    a = adapter
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    src = attach(d, flags=src_mode).context_id
    h = uvirtual(d, src, 1).rsrc_handle
    dst = attach(d, flags=dst_mode, caller=CHILD).context_id
    clone(d, src, dst)
    assert ctx(a, dst).table.perms(h) == want


def test_clone_preconditions(adapter):
    a = adapter
    w = a.add_lun(None, size=4 * CHUNK * K4)
    w2 = a.add_lun(None, size=4 * CHUNK * K4)
    d, d2 = a.open_disk(w), a.open_disk(w2)
    src = attach(d).context_id
    dst = attach(d, caller=CHILD).context_id
    E = uapi.DK_CXLFLASH_VLUN_CLONE
    # LUN not virtual.
    assert fails(d, E, clone_arg(src, dst), CHILD) == errno.EINVAL
    h = uvirtual(d, src, 1).rsrc_handle
    # Same ids.
    assert fails(d, E, clone_arg(src, src), CHILD) == errno.EINVAL
    # The caller's parent does not own the source.
    other_child = Caller(CHILD.pid, STRANGER.pid)
    assert fails(d, E, clone_arg(src, dst), other_child) == errno.EINVAL
    # The caller does not own the destination.
    assert fails(d, E, clone_arg(src, dst), Caller(CHILD.pid + 1, P)) == errno.EINVAL
    # The destination does not have this LUN attached.
    dst_other = attach(d2, caller=CHILD).context_id
    assert fails(d, E, clone_arg(src, dst_other), CHILD) == errno.EINVAL
    # The destination has an open handle (on any LUN).
    attach(d, reuse=dst_other, caller=CHILD)
    uvirtual(d2, dst_other, 0, caller=CHILD)
    assert fails(d, E, clone_arg(src, dst_other), CHILD) == errno.EINVAL
    # A source with nothing open clones nothing (success).
    src2 = attach(d2).context_id
    dst2 = attach(d2, caller=CHILD).context_id
    clone(d2, src2, dst2)
    assert ctx(a, dst2).table.rht_out == 0
    clone(d, src, dst)
    assert ctx(a, dst).table.open_handles() == [h]


def test_closing_clone_destination_fd_releases_cloned_luns(adapter):
    # Decision 10: the LUNs a clone added to the destination are real
    # attachments, released (with their handles) when the child's fd closes.
    a = adapter
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


def test_clone_count_saturates_at_255(adapter):
    a = adapter
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    src = attach(d).context_id
    h = uvirtual(d, src, 1).rsrc_handle
    x = chunks(a, src, h)[0]
    kids = []
    for i in range(255):
        kid = Caller(CHILD.pid + 10 + i, P)
        dst = attach(d, caller=kid).context_id
        clone(d, src, dst, caller=kid)
        kids.append((kid, dst))
    assert g.allocator.clone_count(x) == 255 and g.users == 256
    kid = Caller(CHILD.pid + 5000, P)
    dst = attach(d, caller=kid).context_id
    assert fails(d, uapi.DK_CXLFLASH_VLUN_CLONE, clone_arg(src, dst), kid) == errno.EIO
    assert ctx(a, dst).table.rht_out == 0
    assert g.allocator.clone_count(x) == 255 and g.users == 256
    release(d, kids[0][1], h, caller=kids[0][0])
    assert g.allocator.clone_count(x) == 254
    clone(d, src, dst, caller=kid)
    assert g.allocator.clone_count(x) == 255


def test_clone_rollback_releases_earlier_slots(adapter):
    # §14.5: slot 1 fails (its chunk already has 255 clones) -> slot 0, cloned
    # already, is released again; nothing of the clone remains.
    a = adapter
    w = a.add_lun(None, size=8 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    s1 = attach(d).context_id
    uvirtual(d, s1, 0)                                     # h0: empty
    h1 = uvirtual(d, s1, 1).rsrc_handle                    # h1: chunk B
    b = chunks(a, s1, h1)[0]
    same = Caller(P, P)                                    # P "cloning" from itself
    xs = attach(d).context_id
    clone(d, s1, xs, caller=same)                          # X: h0 empty, h1 = B
    resize(d, xs, 0, 1)                                    # X: h0 = A
    a_chunk = chunks(a, xs, 0)[0]
    for i in range(254):
        kid = Caller(CHILD.pid + 10 + i, P)
        clone(d, s1, attach(d, caller=kid).context_id, caller=kid)
    assert g.allocator.clone_count(b) == 255 and g.allocator.clone_count(a_chunk) == 0
    users = g.users
    dst = attach(d, caller=CHILD).context_id
    assert fails(d, uapi.DK_CXLFLASH_VLUN_CLONE, clone_arg(xs, dst), CHILD) == errno.EIO
    assert ctx(a, dst).table.rht_out == 0
    assert g.allocator.clone_count(a_chunk) == 0 and g.allocator.clone_count(b) == 255
    assert g.users == users


def test_clone_sync_failure_rolls_back(adapter):
    a = adapter
    w = a.add_lun(None, size=8 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    src = attach(d).context_id
    h = uvirtual(d, src, 2 * CHUNK_4K).rsrc_handle
    dst = attach(d, caller=CHILD).context_id
    users = g.users
    a.inject_fault("sync", 1)
    assert fails(d, uapi.DK_CXLFLASH_VLUN_CLONE, clone_arg(src, dst), CHILD) == errno.EAGAIN
    assert ctx(a, dst).table.rht_out == 0 and g.users == users
    assert [g.allocator.clone_count(x) for x in chunks(a, src, h)] == [0, 0]
    clone(d, src, dst)
    assert chunks(a, dst, h) == chunks(a, src, h)


def test_clone_source_in_error_not_reachable(adapter):
    a = adapter
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    src = attach(d).context_id
    uvirtual(d, src, 1)
    dst = attach(d, caller=CHILD).context_id
    a.reset()
    assert fails(d, uapi.DK_CXLFLASH_VLUN_CLONE, clone_arg(src, dst), CHILD) == errno.EINVAL


def test_clone_across_luns_decision_9(adapter):
    a = adapter
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


# -- VERIFY (§15) -----------------------------------------------------------------------------


def test_verify_capacity_refresh_fixed_and_descriptor(adapter, tmp_path):
    a = adapter
    path = tmp_path / "lun.img"
    w = a.add_lun(str(path), size=256 * K4)
    d = a.open_disk(w)
    at = attach(d)
    cid = at.context_id
    assert at.last_lba == 255
    h = udirect(d, cid).rsrc_handle
    assert verify(d, cid, h).last_lba == 255
    os.truncate(path, 512 * K4)
    assert verify(d, cid, h).last_lba == 255              # no sense: no re-read
    assert verify(d, cid, h, fixed_sense(0x6, 0x2A, 0x09)).last_lba == 511
    assert attach(d).last_lba == 511
    os.truncate(path, 1024 * K4)
    assert verify(d, cid, h, desc_sense(0x6, 0x29)).last_lba == 1023
    os.truncate(path, 2048 * K4)
    # Deferred error codes 0x71 / 0x73 are parsed the same way.
    assert verify(d, cid, h, fixed_sense(0x6, 0x2A, code=0x71)).last_lba == 2047
    os.truncate(path, 4096 * K4)
    assert verify(d, cid, h, desc_sense(0x6, 0x2A, code=0x73)).last_lba == 4095


def test_verify_sense_parsing(adapter, tmp_path):
    a = adapter
    path = tmp_path / "lun.img"
    w = a.add_lun(str(path), size=256 * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = udirect(d, cid).rsrc_handle
    os.truncate(path, 512 * K4)
    V = uapi.DK_CXLFLASH_VERIFY
    # Fixed format with additional length < 5: ASC is not seen -> UA with ASC 0 -> EIO.
    assert fails(d, V, vf_arg(cid, h, fixed_sense(0x6, 0x2A, addl=4))) == errno.EIO
    # Fixed-format bytes under a descriptor code: the key is byte 1 (0) -> OK, no refresh.
    s = fixed_sense(0x6, 0x2A)
    s[0] = 0x72
    assert verify(d, cid, h, s).last_lba == 255
    # Descriptor bytes under a fixed code: key = byte 2 & 0xF = 0xA -> EIO.
    s = desc_sense(0x6, 0x2A)
    s[0] = 0x70
    assert fails(d, V, vf_arg(cid, h, s)) == errno.EIO
    # Response code not 0x70-0x7F -> EINVAL.
    for code in (0x00, 0x60, 0x6F):
        s = fixed_sense(0x6, 0x2A, code=code)
        assert fails(d, V, vf_arg(cid, h, s)) == errno.EINVAL
    # Keys NO SENSE / RECOVERED / NOT READY: nothing, OK.
    for key in (0x0, 0x1, 0x2):
        assert verify(d, cid, h, fixed_sense(key, 0x2A)).last_lba == 255
    # UNIT ATTENTION: 0x3F is OK (rescan), any other ASC -> EIO.
    assert verify(d, cid, h, fixed_sense(0x6, 0x3F)).last_lba == 255
    assert fails(d, V, vf_arg(cid, h, fixed_sense(0x6, 0x28))) == errno.EIO
    # Other keys -> EIO.
    for key in (0x3, 0x4, 0x5, 0xB):
        assert fails(d, V, vf_arg(cid, h, fixed_sense(key, 0x2A))) == errno.EIO
    # Other hint bits are ignored; without HINT_SENSE no parsing at all.
    vf = vf_arg(cid, h)
    vf.hint = 0x7FFFFFFFFFFFFFFF
    vf.sense_data[:] = bytes(18)
    assert call(d, V, vf).last_lba == 255
    # The context is usable afterwards (not left unavail).
    assert verify(d, cid, h, fixed_sense(0x6, 0x29)).last_lba == 511


def test_verify_virtual_and_live_allocator_not_resized(adapter, tmp_path):
    a = adapter
    path = tmp_path / "lun.img"
    w = a.add_lun(str(path), size=2 * CHUNK * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, CHUNK_4K).rsrc_handle
    assert verify(d, cid, h).last_lba == CHUNK_4K - 1
    os.truncate(path, 4 * CHUNK * K4)
    assert verify(d, cid, h, fixed_sense(0x6, 0x2A)).last_lba == CHUNK_4K - 1
    assert glun(a, w).max_lba == 4 * CHUNK - 1
    # The live allocator still has 2 chunks in all.
    assert resize(d, cid, h, 4 * CHUNK_4K).last_lba == last_lba_4k(2)
    release(d, cid, h)
    # Rebuilt on the next virtual open: 4 chunks.
    assert uvirtual(d, cid, 4 * CHUNK_4K).last_lba == last_lba_4k(4)


def test_verify_empty_vlun_and_invalid_handles(adapter):
    a = adapter
    w = a.add_lun(None, size=2 * CHUNK * K4)
    d = a.open_disk(w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle
    assert verify(d, cid, h).last_lba == U64
    V = uapi.DK_CXLFLASH_VERIFY
    assert fails(d, V, vf_arg(cid, 7)) == errno.EINVAL
    assert fails(d, V, vf_arg(cid, 256)) == errno.EINVAL


# -- reset and recovery (§16) ----------------------------------------------------------------


def setup_vlun(a, nchunks=4, size=3):
    w = a.add_lun(None, size=nchunks * CHUNK * K4)
    d = a.open_disk(w)
    at = attach(d)
    h = uvirtual(d, at.context_id, size * CHUNK_4K).rsrc_handle
    return w, d, at, h


def test_reset_puts_data_path_in_error(adapter):
    a = adapter
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
    assert fails(d, uapi.DK_CXLFLASH_USER_VIRTUAL, uv_arg(cid)) == errno.EINVAL
    assert fails(d, uapi.DK_CXLFLASH_VERIFY, vf_arg(cid, h)) == errno.EINVAL
    assert fails(d, uapi.DK_CXLFLASH_ATTACH, attach_arg(cid, reuse=True)) == errno.EINVAL
    # RESIZE (grow and shrink) and RELEASE work on a context in error.
    assert resize(d, cid, h, 3 * CHUNK_4K).last_lba == last_lba_4k(3)
    assert resize(d, cid, h, CHUNK_4K).last_lba == last_lba_4k(1)
    release(d, cid, h)
    assert glun(a, w).users == 0
    # DETACH too.
    detach(d, cid)
    assert not a.driver.ctx_err_recovery


def test_closing_fd_of_context_in_error_tears_it_down(adapter):
    a = adapter
    w, d, at, h = setup_vlun(a, 8, 2)
    keep = attach(d)
    hk = uvirtual(d, keep.context_id, 1).rsrc_handle
    a.reset()
    close_fd(at.adap_fd)
    assert resize(d, keep.context_id, hk, 2).last_lba == last_lba_4k(1)   # in error, reachable
    assert [c.ctxid for c in a.driver.ctx_err_recovery] == [keep.context_id]
    assert glun(a, w).users == 1 and glun(a, w).allocator.space() == 7
    assert fails(d, uapi.DK_CXLFLASH_RECOVER_AFU, rec_arg(at.context_id)) == errno.EINVAL


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


def test_recover_afu(adapter):
    a = adapter
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
    assert fails(d, uapi.DK_CXLFLASH_VERIFY, vf_arg(new, h)) == errno.EINVAL
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
    assert fails(d, uapi.DK_CXLFLASH_VERIFY, vf_arg(cid, h)) == errno.EINVAL
    # A new ATTACH cannot take the old PE either while the old fd is open.
    assert attach(d).context_id & 0xFFFFFFFF != cid & 0xFFFFFFFF
    # Once the old fd is closed, its PE is free again.
    close_fd(old_fd)
    assert verify(d, new, h).last_lba == last_lba_4k(1)
    assert attach(d).context_id & 0xFFFFFFFF == cid & 0xFFFFFFFF


def test_recover_afu_on_healthy_context_changes_nothing(adapter):
    a = adapter
    w, d, at, h = setup_vlun(a, 4, 1)
    cid = at.context_id
    ra = rec_arg(cid)
    ra.adap_fd = 1234
    ra.mmio_size = 7
    ra.reason = 99
    before = bytes(ra)
    call(d, uapi.DK_CXLFLASH_RECOVER_AFU, ra)
    assert bytes(ra) == before
    assert ctx(a, cid) is not None and ctx(a, cid).file is not None
    a.write(cid, h, 0, bytes(K4))
    assert chunks(a, cid, h) == [0]


def test_failterm(adapter):
    a = adapter
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
    for req, arg, dk in [(uapi.DK_CXLFLASH_ATTACH, attach_arg(), d),
                         (uapi.DK_CXLFLASH_USER_VIRTUAL, uv_arg(cid), d),
                         (uapi.DK_CXLFLASH_USER_DIRECT, ud_arg(cid), d),
                         (uapi.DK_CXLFLASH_VERIFY, vf_arg(cid, h), d),
                         (uapi.DK_CXLFLASH_RECOVER_AFU, rec_arg(cid), d),
                         (uapi.DK_CXLFLASH_VLUN_CLONE, clone_arg(cid, cid + 1), d)]:
        assert fails(dk, req, arg) == errno.ENODEV
    # The exceptions: RESIZE, RELEASE, DETACH (and MANAGE_LUN has no state check).
    assert resize(d, cid, h, CHUNK_4K).last_lba == last_lba_4k(1)
    release(d, cid, h)
    release(dd, cid, hd)
    manage(d, w, ENABLE)
    detach(dd, cid)
    detach(d, cid)
    assert glun(a, w).users == glun(a, wd).users == 0
    assert not a.driver.ctx_err_recovery


# -- data integrity through the AFU path -----------------------------------------------------


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


def test_data_lands_at_translated_physical_lba(adapter):
    a = adapter
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
def test_write_crossing_chunk_boundaries_splits(adapter, start, n, block_size):
    a = adapter
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
def test_transfer_beyond_vlun_refused_whole(adapter, start, n):
    a = adapter
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


def test_afu_handle_errors(adapter):
    a = adapter
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


@pytest.mark.parametrize("block_size", [4096, 512])
def test_direct_bounds_decision_13(adapter, block_size):
    a = adapter
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


# -- concurrency (§21) ------------------------------------------------------------------------


def run_threads(*fns):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:              # noqa: BLE001
                errors.append(e)
        return run

    ts = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
        assert not t.is_alive()
    if errors:
        raise errors[0]


def test_resizes_on_one_context_serialise(adapter):
    a = adapter
    w = a.add_lun(None, size=64 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    cid = attach(d).context_id
    h = uvirtual(d, cid, 0).rsrc_handle

    def hammer(seed):
        rng = random.Random(seed)
        for _ in range(400):
            n = rng.randrange(0, 20)
            rs = resize(d, cid, h, n * CHUNK_4K)
            assert rs.last_lba == last_lba_4k(n)

    run_threads(lambda: hammer(1), lambda: hammer(2))
    mine = chunks(a, cid, h)
    assert len(set(mine)) == len(mine)
    assert g.allocator.allocated_count() == len(mine)
    assert g.allocator.space() == 64 - len(mine)
    assert verify(d, cid, h).last_lba == last_lba_4k(len(mine))
    assert all(g.allocator.clone_count(x) == 0 for x in mine)


def test_racing_first_opens_in_different_modes(adapter):
    a = adapter
    w = a.add_lun(None, size=4 * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    ca, cb = attach(d).context_id, attach(d).context_id
    wins = {"direct": 0, "virtual": 0}
    for i in range(50):
        barrier = threading.Barrier(2)
        res = {}

        def go(name, fn):
            barrier.wait()
            try:
                res[name] = ("ok", fn())
            except cxlflash.CxlFlashError as e:
                res[name] = ("err", e.errno)

        first = [lambda: go("direct", lambda: udirect(d, ca).rsrc_handle),
                 lambda: go("virtual", lambda: uvirtual(d, cb, CHUNK_4K).rsrc_handle)]
        if i % 2:
            first.reverse()
        run_threads(*first)
        oks = [k for k, v in res.items() if v[0] == "ok"]
        assert len(oks) == 1, res
        loser = "virtual" if oks[0] == "direct" else "direct"
        assert res[loser] == ("err", errno.EINVAL)
        wins[oks[0]] += 1
        assert g.users == 1
        assert g.mode == (MODE_PHYSICAL if oks[0] == "direct" else MODE_VIRTUAL)
        if oks[0] == "direct":
            release(d, ca, res["direct"][1])
        else:
            release(d, cb, res["virtual"][1])
        assert (g.mode, g.users, g.allocator) == (MODE_NONE, 0, None)
    assert ctx(a, ca).table.rht_out == ctx(a, cb).table.rht_out == 0


def test_concurrent_grows_never_overcommit(adapter):
    a = adapter
    total = 300
    w = a.add_lun(None, size=total * CHUNK * K4)
    d = a.open_disk(w)
    g = glun(a, w)
    cids = [attach(d).context_id for _ in range(6)]
    hs = [uvirtual(d, c, 0).rsrc_handle for c in cids]

    def grower(i):
        rng = random.Random(i)
        n = 0
        while True:
            want = n + rng.randrange(1, 8)
            try:
                rs = resize(d, cids[i], hs[i], want * CHUNK_4K)
            except cxlflash.CxlFlashError as e:
                assert e.errno == errno.ENOSPC
                return
            got = (rs.last_lba + 1) // CHUNK_4K
            assert n < got <= want
            n = got

    run_threads(*[(lambda i=i: grower(i)) for i in range(6)])
    every = [x for c, h in zip(cids, hs) for x in chunks(a, c, h)]
    assert len(every) == total and len(set(every)) == total
    assert g.allocator.space() == 0 and g.allocator.allocated_count() == total


# -- a real block device ------------------------------------------------------------------------


def test_loop_block_device(adapter, tmp_path):
    losetup = shutil.which("losetup")
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(4 * CHUNK * 512)                       # 128 MiB sparse: 4 chunks of 512 B
    try:
        dev = subprocess.run([losetup or "losetup", "--find", "--show", str(img)],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"losetup failed (not root, or no loop device support): {e}")
    a = adapter
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
        for fd in list(_open_fds):
            close_fd(fd)
        a.close()
        subprocess.run([losetup or "losetup", "-d", dev], check=False)
