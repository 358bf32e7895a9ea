"""ResourceTable against spec §2.5, §2.6, §11, §14.4 and §19.

LXT_RW_PERM (0x15) is not tested: the driver always writes LXT perms RW
(§2.6, §11.7), ``grow`` does the same and ``clone_*`` copies entries
verbatim, so no LXT entry without permission can be built through the API.
"""
import errno

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cxlflash._core.allocator import ChunkAllocator
from cxlflash._core.errors import AfuError
from cxlflash._core.tables import ResourceTable

CHUNK = 1 << 16
LOW = np.uint64(0xFFFF)
HIGH = np.uint64(~0xFFFF & (2 ** 64 - 1))


def lxt_entry(aun, lun_index, port_sel):
    return (aun << 16) | (lun_index << 8) | (3 << 4) | port_sel


def reference(lxt, vlbas):
    v = np.asarray(vlbas).view(np.uint64)
    return np.bitwise_or(np.bitwise_and(lxt[v >> np.uint64(16)], HIGH), v & LOW)


def afu_rc(excinfo):
    err = excinfo.value
    assert isinstance(err, AfuError) and isinstance(err, OSError)
    assert err.errno == errno.EIO
    return err.afu_rc


# -- construction, checkout and check-in -------------------------------------

@pytest.mark.parametrize("size", [0, 4097])
def test_rht_size_bounds(size):
    with pytest.raises(ValueError):
        ResourceTable(size)


@pytest.mark.parametrize("size", [1, 256, 4096])
def test_rht_sizes(size):
    t = ResourceTable(size)
    assert t.rht_size == size and t.rht_out == 0
    assert t.open_handles() == []


def test_default_size():
    assert ResourceTable().rht_size == 256


def test_checkout_takes_the_lowest_free_slot():
    t = ResourceTable(8)
    assert [t.open_virtual(3) for _ in range(3)] == [0, 1, 2]
    assert t.open_direct(3, 0x10, 1, 999) == 3
    t.close(1)
    assert t.open_handles() == [0, 2, 3]
    assert t.open_virtual(1) == 1                 # reused
    t.close(0)
    assert t.open_direct(1, 0x11, 2, 10) == 0
    assert t.open_virtual(3) == 4
    assert t.rht_out == 5


def test_emfile_when_every_handle_is_open():
    t = ResourceTable(4)
    for _ in range(4):
        t.open_virtual(3)
    with pytest.raises(OSError) as ei:
        t.open_virtual(3)
    assert ei.value.errno == errno.EMFILE
    with pytest.raises(OSError) as ei:
        t.open_direct(3, 1, 1, 10)
    assert ei.value.errno == errno.EMFILE
    assert t.rht_out == 4
    t.close(2)
    assert t.open_virtual(3) == 2


def test_close_clears_the_entry():
    t = ResourceTable(4)
    h = t.open_virtual(3)
    t.grow(h, [7, 8, 9], 1, 1)
    assert t.close(h).tolist() == [7, 8, 9]       # still mapped: caller frees
    assert not t.is_open(h)
    assert t.entry(h) == {"handle": h, "open": False}
    assert t.rht_out == 0
    with pytest.raises(AfuError) as ei:
        t.translate(h, 0)
    assert afu_rc(ei) == 0x01
    # The slot comes back empty, with no stale LXT.
    assert t.open_virtual(2) == h
    assert t.lxt_count(h) == 0 and t.lxt_capacity(h) == 0
    assert t.lxt(h).tolist() == [] and t.extent(h) == 0
    assert t.perms(h) == 2
    # The other format reuses it cleanly too.
    t.close(h)
    assert t.open_direct(1, 0x22, 2, 5) == h
    assert t.entry(h)["lun_id"] == 0x22
    assert t.close(h).tolist() == []


def test_closing_a_closed_or_bad_handle():
    t = ResourceTable(4)
    with pytest.raises(ValueError):
        t.close(0)
    with pytest.raises(IndexError):
        t.close(4)


def test_entry_fields():
    t = ResourceTable(4)
    v = t.open_virtual(1)
    t.grow(v, [1, 2], 0, 1)
    assert t.entry(v) == {"handle": v, "open": True, "format": 0, "perms": 1,
                          "nmask": 16, "lxt_cnt": 2}
    d = t.open_direct(2, 0xABCD, 0b101, 4095)
    assert t.entry(d) == {"handle": d, "open": True, "format": 1, "perms": 2,
                          "lun_id": 0xABCD, "valid": 0x80, "port_sel": 0b101,
                          "last_lba": 4095}
    assert t.is_virtual(v) and not t.is_virtual(d)
    assert t.extent(v) == 2 * CHUNK and t.extent(d) == 4096


@pytest.mark.parametrize("port_sel", [0, 16, -1])
def test_direct_port_sel_must_be_a_nonzero_mask(port_sel):
    t = ResourceTable(4)
    with pytest.raises(ValueError):
        t.open_direct(3, 1, port_sel, 10)
    assert t.rht_out == 0


def test_virtual_only_operations_refuse_direct_handles():
    t = ResourceTable(4)
    d = t.open_direct(3, 1, 1, 100)
    for op in (t.lxt_count, t.lxt_capacity, t.lxt, t.auns):
        with pytest.raises(ValueError):
            op(d)
    with pytest.raises(ValueError):
        t.grow(d, [1], 0, 1)
    with pytest.raises(ValueError):
        t.shrink(d, 0)
    with pytest.raises(ValueError):        # not open
        t.grow(1, [1], 0, 1)


# -- LXT layout, capacity, shrink ------------------------------------------------

def test_lxt_entry_layout():
    t = ResourceTable(4)
    h = t.open_virtual(3)
    t.grow(h, [5, 0, 2 ** 40], 0x2A, 0x3)
    t.grow(h, np.array([9], dtype=np.int64), 0xFF, 0xF)
    want = [lxt_entry(5, 0x2A, 3), lxt_entry(0, 0x2A, 3),
            lxt_entry(2 ** 40, 0x2A, 3), lxt_entry(9, 0xFF, 0xF)]
    assert t.lxt(h).dtype == np.uint64
    assert t.lxt(h).tolist() == want
    assert want[0] == 0x5_2A_33
    assert t.auns(h).tolist() == [5, 0, 2 ** 40, 9]
    assert [e >> 16 for e in want] == [5, 0, 2 ** 40, 9]
    # lxt() is a copy.
    copy = t.lxt(h)
    copy[0] = 0
    assert t.lxt(h)[0] == want[0]
    assert t.grow(h, [], 0, 1) is None and t.lxt_count(h) == 4


def test_lxt_capacity_grows_and_shrinks_in_groups_of_8():
    t = ResourceTable(4)
    h = t.open_virtual(3)
    assert t.lxt_capacity(h) == 0
    for n in range(1, 42):
        t.grow(h, [n], 0, 1)
        assert t.lxt_count(h) == n
        assert t.lxt_capacity(h) == -(-n // 8) * 8
    t.grow(h, list(range(100, 130)), 0, 1)
    assert t.lxt_capacity(h) == 72                # 71 entries
    for n in (70, 64, 63, 9, 8, 1, 0):
        t.shrink(h, n)
        assert t.lxt_count(h) == n
        assert t.lxt_capacity(h) == -(-n // 8) * 8
    assert t.extent(h) == 0
    t.grow(h, [3], 0, 1)                          # grows again after size 0
    assert t.lxt(h).tolist() == [lxt_entry(3, 0, 1)]


def test_shrink_returns_the_tail_last_first():
    t = ResourceTable(4)
    h = t.open_virtual(3)
    t.grow(h, [10, 11, 12, 13, 14], 1, 1)
    assert t.shrink(h, 2).tolist() == [14, 13, 12]
    assert t.auns(h).tolist() == [10, 11]       # the head keeps its mapping
    assert t.shrink(h, 2).tolist() == []
    with pytest.raises(ValueError):
        t.shrink(h, 3)
    assert t.shrink(h, 0).tolist() == [11, 10]
    assert t.lxt_count(h) == 0 and t.is_open(h)   # size 0 keeps it open


# -- translation ---------------------------------------------------------------

def test_translate_single_lbas():
    t = ResourceTable(4)
    h = t.open_virtual(3)
    t.grow(h, [7, 3], 2, 1)
    assert t.translate(h, 0) == 7 << 16
    assert t.translate(h, 0xFFFF) == (7 << 16) | 0xFFFF
    assert t.translate(h, 0x10000) == 3 << 16
    assert t.translate(h, 0x1ABCD, write=True) == (3 << 16) | 0xABCD
    with pytest.raises(AfuError) as ei:
        t.translate(h, 2 * CHUNK)
    assert afu_rc(ei) == 0x13 and ei.value.index is None


def test_translate_many_basics():
    t = ResourceTable(4)
    h = t.open_virtual(3)
    t.grow(h, [7, 3], 2, 1)
    v = np.array([0, 0xFFFF, 0x10000, 0x1ABCD], dtype=np.int64)
    want = [7 << 16, (7 << 16) | 0xFFFF, 3 << 16, (3 << 16) | 0xABCD]
    got = t.translate_many(h, v)
    assert got.dtype == np.uint64 and got.tolist() == want
    out = np.zeros(4, dtype=np.uint64)
    assert t.translate_many(h, v.astype(np.uint64), out=out, write=True) is out
    assert out.tolist() == want
    assert t.translate_many(h, np.empty(0, np.int64)).tolist() == []
    for bad_out in (np.zeros(4, np.int64), np.zeros(5, np.uint64), [0] * 4):
        with pytest.raises(TypeError):
            t.translate_many(h, v, out=bad_out)


lxt_strategy = st.lists(
    st.tuples(st.integers(0, 2 ** 47 - 1), st.integers(0, 255), st.integers(1, 15)),
    min_size=1, max_size=64)


@settings(max_examples=150, deadline=None)
@given(entries=lxt_strategy, data=st.data(), signed=st.booleans(),
       write=st.booleans())
def test_translate_many_matches_the_formula(entries, data, signed, write):
    t = ResourceTable(8)
    h = t.open_virtual(3)
    for aun, lun_index, port_sel in entries:
        t.grow(h, [aun], lun_index, port_sel)
    lxt = t.lxt(h)
    assert lxt.tolist() == [lxt_entry(*e) for e in entries]
    top = len(entries) * CHUNK - 1
    lbas = data.draw(st.lists(st.one_of(st.integers(0, top),
                                        st.sampled_from([0, top])),
                              min_size=1, max_size=200))
    v = np.array(lbas, dtype=np.int64 if signed else np.uint64)
    want = reference(lxt, v)
    assert t.translate_many(h, v, write=write).tolist() == want.tolist()
    for i in (0, len(lbas) - 1):
        assert t.translate(h, lbas[i], write=write) == int(want[i])
    # A batch with LBAs beyond the vLUN: the first one is reported.
    bad = data.draw(st.lists(st.integers(0, len(lbas) - 1), min_size=1,
                             max_size=3, unique=True))
    beyond = data.draw(st.integers(top + 1, 2 ** 63 - 1))
    for i in bad:
        v[i] = beyond
    with pytest.raises(AfuError) as ei:
        t.translate_many(h, v, write=write)
    assert afu_rc(ei) == 0x13 and ei.value.index == min(bad)
    with pytest.raises(AfuError) as ei:
        t.translate(h, beyond, write=write)
    assert afu_rc(ei) == 0x13


def test_translate_many_large_random_batch():
    rng = np.random.default_rng(1)
    t = ResourceTable(4)
    h = t.open_virtual(3)
    t.grow(h, rng.permutation(1000)[:64], 3, 5)
    v = rng.integers(0, 64 * CHUNK, size=1 << 20, dtype=np.int64)
    out = np.empty(v.size, np.uint64)
    t.translate_many(h, v, out=out)
    assert np.array_equal(out, reference(t.lxt(h), v))
    assert np.array_equal(t.translate_many(h, v.view(np.uint64)), out)


def test_uint64_lbas_with_the_top_bit_set_are_beyond_the_vlun():
    t = ResourceTable(4)
    h = t.open_virtual(3)
    t.grow(h, [1], 0, 1)
    v = np.array([5, 2 ** 63 + 5], dtype=np.uint64)
    with pytest.raises(AfuError) as ei:
        t.translate_many(h, v)
    assert afu_rc(ei) == 0x13 and ei.value.index == 1
    # The same bits as int64 (negative) are the same LBA.
    with pytest.raises(AfuError) as ei:
        t.translate_many(h, v.view(np.int64))
    assert afu_rc(ei) == 0x13 and ei.value.index == 1


# -- AFU response codes -------------------------------------------------------------

def test_rc_0x03_handle_beyond_the_rht():
    t = ResourceTable(16)
    for h in (16, 17, 2 ** 32 - 1):
        with pytest.raises(AfuError) as ei:
            t.translate(h, 0)
        assert afu_rc(ei) == 0x03
        with pytest.raises(AfuError) as ei:
            t.translate_many(h, np.zeros(3, np.int64), write=True)
        assert afu_rc(ei) == 0x03 and ei.value.index == 0


def test_rc_0x01_handle_not_open():
    t = ResourceTable(16)
    for write in (False, True):
        with pytest.raises(AfuError) as ei:
            t.translate(15, 0, write=write)
        assert afu_rc(ei) == 0x01
        with pytest.raises(AfuError) as ei:
            t.translate_many(0, np.zeros(2, np.uint64), write=write)
        assert afu_rc(ei) == 0x01 and ei.value.index == 0
    d = t.open_direct(3, 1, 1, 100)
    t.close(d)
    with pytest.raises(AfuError) as ei:
        t.translate(d, 0)
    assert afu_rc(ei) == 0x01


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("perms", [0, 1, 2, 3])
def test_rc_0x05_rht_permission(perms, direct):
    t = ResourceTable(4)
    if direct:
        h = t.open_direct(perms, 1, 1, 10 * CHUNK)
    else:
        h = t.open_virtual(perms)
        t.grow(h, [4], 0, 1)
    for write, bit in ((False, 1), (True, 2)):
        v = np.array([1, 2], dtype=np.int64)
        if perms & bit:
            assert t.translate(h, 1, write=write) in (1, (4 << 16) | 1)
            t.translate_many(h, v, write=write)
        else:
            with pytest.raises(AfuError) as ei:
                t.translate(h, 1, write=write)
            assert afu_rc(ei) == 0x05
            with pytest.raises(AfuError) as ei:
                t.translate_many(h, v, write=write)
            assert afu_rc(ei) == 0x05 and ei.value.index == 0


def test_rht_permission_is_checked_before_the_chunk_bounds():
    t = ResourceTable(4)
    h = t.open_virtual(1)                         # empty, read-only
    with pytest.raises(AfuError) as ei:
        t.translate(h, 0, write=True)
    assert afu_rc(ei) == 0x05
    with pytest.raises(AfuError) as ei:
        t.translate(h, 0)
    assert afu_rc(ei) == 0x13


def test_rc_0x13_single_and_batch():
    t = ResourceTable(4)
    h = t.open_virtual(3)
    with pytest.raises(AfuError) as ei:           # empty vLUN
        t.translate(h, 0)
    assert afu_rc(ei) == 0x13
    t.grow(h, [1, 2, 3], 0, 1)
    last = 3 * CHUNK - 1
    assert t.translate(h, last) == (3 << 16) | 0xFFFF
    with pytest.raises(AfuError) as ei:
        t.translate(h, last + 1, write=True)
    assert afu_rc(ei) == 0x13
    v = np.array([0, last, last + 1, 5, 2 ** 40], dtype=np.int64)
    out = np.zeros(5, np.uint64)
    with pytest.raises(AfuError) as ei:
        t.translate_many(h, v, out=out)
    assert afu_rc(ei) == 0x13 and ei.value.index == 2
    v[0] = -1                                     # as uint64: far beyond
    with pytest.raises(AfuError) as ei:
        t.translate_many(h, v)
    assert ei.value.index == 0
    # After a shrink the tail is gone.
    t.shrink(h, 1)
    with pytest.raises(AfuError) as ei:
        t.translate(h, CHUNK)
    assert afu_rc(ei) == 0x13


# -- direct handles ------------------------------------------------------------------

def test_direct_handles_pass_lbas_through():
    t = ResourceTable(4)
    h = t.open_direct(3, 0x1000, 2, 999)
    assert t.translate(h, 0) == 0
    assert t.translate(h, 999, write=True) == 999
    v = np.arange(1000, dtype=np.int64)
    assert np.array_equal(t.translate_many(h, v), v.astype(np.uint64))
    with pytest.raises(AfuError) as ei:
        t.translate(h, 1000)
    err = ei.value
    assert (err.afu_rc, err.scsi_rc, err.sense_key, err.errno) == (0, 2, 5, errno.EIO)
    v[[10, 20]] = 5000
    with pytest.raises(AfuError) as ei:
        t.translate_many(h, v, write=True)
    err = ei.value
    assert (err.afu_rc, err.scsi_rc, err.sense_key, err.index) == (0, 2, 5, 10)


def test_direct_lbas_above_2_63():
    t = ResourceTable(4)
    h = t.open_direct(3, 1, 1, 2 ** 64 - 1)
    for lba in (2 ** 63, 2 ** 64 - 1):
        assert t.translate(h, lba) == lba
    v = np.array([2 ** 63, 2 ** 64 - 1], dtype=np.uint64)
    assert t.translate_many(h, v).tolist() == [2 ** 63, 2 ** 64 - 1]


# -- clone ---------------------------------------------------------------------------

def _source():
    """Handles 0 (virtual RW, 3 chunks), 2 (direct R), 3 (virtual W, empty),
    4 (virtual RW, 9 chunks); 1 is closed."""
    src = ResourceTable(8)
    h0 = src.open_virtual(3)
    src.grow(h0, [4, 5, 6], 2, 3)
    src.open_virtual(3)
    src.open_direct(1, 0x77, 0b10, 12345)
    src.open_virtual(2)
    h4 = src.open_virtual(3)
    src.grow(h4, range(20, 29), 7, 1)
    src.close(1)
    return src


def test_clone_from_copies_every_open_entry():
    src = _source()
    dst = ResourceTable(8)
    got = dst.clone_from(src, 3)
    assert [h for h, _ in got] == [0, 2, 3, 4] == dst.open_handles()
    auns = {h: a.tolist() for h, a in got}
    assert auns == {0: [4, 5, 6], 2: [], 3: [], 4: list(range(20, 29))}
    assert dst.rht_out == src.rht_out == 4
    for h in (0, 3, 4):
        assert dst.lxt(h).tolist() == src.lxt(h).tolist()       # verbatim
        assert dst.lxt_count(h) == src.lxt_count(h)
        assert dst.lxt_capacity(h) == -(-dst.lxt_count(h) // 8) * 8
        assert dst.entry(h) == src.entry(h)
    assert dst.entry(2) == src.entry(2)                          # direct
    assert dst.translate(2, 12345) == 12345
    with pytest.raises(AfuError) as ei:
        dst.translate(2, 12346)
    assert ei.value.scsi_rc == 2
    v = np.arange(0, 3 * CHUNK, 997, dtype=np.int64)
    assert np.array_equal(dst.translate_many(0, v), src.translate_many(0, v))
    assert not dst.is_open(1)


@pytest.mark.parametrize("src_perms", [0, 1, 2, 3])
@pytest.mark.parametrize("dst_perms", [0, 1, 2, 3])
def test_clone_perms_are_the_intersection(src_perms, dst_perms):
    src = ResourceTable(4)
    src.open_virtual(src_perms)
    src.open_direct(src_perms, 1, 1, 10)
    dst = ResourceTable(4)
    dst.clone_from(src, dst_perms)
    assert dst.perms(0) == dst.perms(1) == src_perms & dst_perms
    assert dst.is_virtual(0) and not dst.is_virtual(1)           # format kept
    assert src.perms(0) == src_perms


def test_clone_is_independent_afterwards():
    src = _source()
    dst = ResourceTable(8)
    dst.clone_from(src, 3)
    before = src.lxt(0).tolist()
    dst.grow(0, [99, 100], 0, 1)
    assert src.lxt(0).tolist() == before
    assert dst.auns(0).tolist() == [4, 5, 6, 99, 100]
    assert src.shrink(4, 2).tolist() == list(range(28, 21, -1))
    assert dst.auns(4).tolist() == list(range(20, 29))
    src.close(0)
    assert dst.auns(0).tolist() == [4, 5, 6, 99, 100]
    dst.close(2)
    assert src.entry(2)["open"]


def test_clone_refusals():
    src = _source()
    busy = ResourceTable(8)
    busy.open_virtual(3)
    with pytest.raises(ValueError):
        busy.clone_from(src, 3)
    assert busy.open_handles() == [0]
    with pytest.raises(ValueError):
        src.clone_from(src, 3)
    with pytest.raises(ValueError):                # smaller destination
        ResourceTable(4).clone_from(src, 3)
    # clone_slot: into an open slot, or from a closed one.
    dst = ResourceTable(8)
    dst.open_virtual(3)
    with pytest.raises(ValueError):
        dst.clone_slot(src, 0, 3)
    with pytest.raises(ValueError):
        dst.clone_slot(src, 1, 3)
    assert dst.clone_slot(src, 4, 1).tolist() == list(range(20, 29))
    assert dst.perms(4) == 1
    with pytest.raises(ValueError):
        dst.clone_slot(dst, 4, 3)


def test_clone_of_an_empty_table():
    assert ResourceTable(4).clone_from(ResourceTable(4), 3) == []


# -- Appendix A through the tables and the allocator -----------------------

def test_appendix_a_walk():
    alloc = ChunkAllocator(1_000_000)
    parent = ResourceTable()
    lun_index, port_sel = 0, 0b11

    def resize(t, h, chunks):
        cur = t.lxt_count(h)
        if chunks > cur:
            t.grow(h, alloc.alloc_many(chunks - cur, partial=True), lun_index, port_sel)
        elif chunks < cur:
            assert alloc.free_many(t.shrink(h, chunks)) == 0

    h0 = parent.open_virtual(3)
    assert h0 == 0 and parent.extent(h0) == 0
    resize(parent, h0, 1)                          # RESIZE to 100
    assert parent.auns(h0).tolist() == [0] and parent.extent(h0) - 1 == 65535
    resize(parent, h0, 3)                          # RESIZE to 131073
    assert parent.auns(h0).tolist() == [0, 1, 2]
    assert parent.extent(h0) - 1 == 196607
    h1 = parent.open_virtual(3)
    resize(parent, h1, 1)
    assert (h1, parent.auns(h1).tolist()) == (1, [3])
    assert parent.translate(h1, 5) == (3 << 16) | 5
    assert parent.shrink(h0, 1).tolist() == [2, 1]  # frees 2 then 1
    alloc.free_many([2, 1])
    assert parent.translate(h0, 65535) == 65535
    assert alloc.alloc() == 1                       # lowest free bit, word 0
    alloc.free(1)

    # fork + VLUN_CLONE: the child shares the chunks, then both release.
    child = ResourceTable()
    cloned = child.clone_from(parent, 1)
    for _, auns in cloned:
        assert alloc.clone_many(auns)
    assert [alloc.clone_count(a) for a in (0, 3)] == [1, 1]
    assert child.translate(h1, 5) == parent.translate(h1, 5)
    with pytest.raises(AfuError) as ei:
        child.translate(h1, 5, write=True)
    assert afu_rc(ei) == 0x05
    free_before = alloc.free_count
    for h in (h0, h1):                             # the parent releases
        resize(parent, h, 0)
        assert parent.close(h).tolist() == []
    assert alloc.free_count == free_before          # still referenced
    assert alloc.is_allocated(0) and alloc.clone_count(0) == 0
    for h in child.open_handles():                  # the child releases
        resize(child, h, 0)
        child.close(h)
    assert alloc.free_count == 1_000_000
