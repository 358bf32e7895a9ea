"""Issue 8, API side: close fences the data path, dropped contexts are
released, failing releases and resizes keep the objects truthful, every
argument is checked before any allocation or I/O, vLUNs scrub by default,
and the ioctl-level data path caches what it looks up without ever using
a stale context id or handle.
"""
import errno
import gc
import os
import threading
import time
import tracemalloc
import warnings

import numpy as np
import pytest

import cxlflash
from cxlflash import uapi
from cxlflash._core.tables import TABLE_GONE
from cxlflash.errors import AdapterResetError, AfuError, CxlFlashError

from block_pattern import BS, CHUNK, GIB, pattern


from api_fixtures import adapter, disk, ctx, vlun  # noqa: F401 (fixtures)


def _open_until(fd_number, directory, limit=64):
    """Open new files until one gets ``fd_number``; returns (fds, paths)."""
    fds, paths = [], []
    for i in range(limit):
        path = os.path.join(directory, f"victim-{i}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        fds.append(fd)
        paths.append(path)
        if fd == fd_number:
            break
    return fds, paths


# -- item 1: close fences the data path --------------------------------------------------------


def test_close_with_io_in_flight_writes_nothing_into_a_new_file(tmp_path):
    """A thread writes big chunk-crossing buffers through adapter.write while
    the main thread closes the adapter and immediately opens new files
    (which reuse the backing's fd number): nothing lands in them."""
    data = np.full(16 << 20, 0xA5, dtype=np.uint8)          # 16 MiB
    start = CHUNK - (8 << 20) // BS                            # crosses a chunk
    landed, kinds = [], []
    deadline = time.monotonic() + 3.0
    rounds = 0
    while time.monotonic() < deadline and rounds < 12:
        rounds += 1
        d = tmp_path / f"r{rounds}"
        d.mkdir()
        a = cxlflash.Adapter(str(d))
        disk = a.open_disk(a.create_lun(8 * CHUNK * BS))
        ctx = disk.attach()
        v = ctx.create_virtual(1)
        other = ctx.create_virtual(1)
        v.set_size(2 * CHUNK)                  # chunks 0 and 2: not adjacent
        other.set_size(2 * CHUNK)
        fd = a.driver.gluns[disk.wwid].backing.fd
        cid, h = ctx.context_id, v.handle
        errors = []
        started = threading.Event()

        def writer():
            started.set()
            while True:
                try:
                    a.write(cid, h, start, data)
                except OSError as e:
                    errors.append(e)
                    return

        t = threading.Thread(target=writer)
        t.start()
        started.wait()
        time.sleep(0.002 * (rounds % 5))
        a.close()
        fds, paths = _open_until(fd, str(d))
        t.join()
        for f in fds:
            os.close(f)
        landed += [(p, os.path.getsize(p)) for p in paths if os.path.getsize(p)]
        kinds.append(type(errors[0]).__name__ if errors else None)
    assert landed == []
    assert set(kinds) == {"AfuError"}          # 0x21: the adapter is closed


def test_io_after_close_is_a_clear_error_and_touches_no_fd(tmp_path):
    a = cxlflash.Adapter(str(tmp_path))
    disk = a.open_disk(a.create_lun(GIB))
    ctx = disk.attach()
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 1))
    cid, h = ctx.context_id, v.handle
    a.write(cid, h, 0, pattern(0, 1))          # the path is cached now
    fd = a.driver.gluns[disk.wwid].backing.fd
    a.close()
    fds, paths = _open_until(fd, str(tmp_path))
    try:
        assert fds[-1] == fd
        for call in (lambda: a.write(cid, h, 0, pattern(0, 1)),
                     lambda: a.readinto(cid, h, 0, bytearray(BS)),
                     lambda: a.read(cid, h, 0, 1),
                     lambda: a.translate(cid, h, [0]),
                     lambda: a.write(cid + 1, h, 0, pattern(0, 1))):
            with pytest.raises(AfuError) as e:
                call()
            assert e.value.afu_rc == 0x21 and "adapter is closed" in str(e.value)
        for call in (lambda: v.write(0, pattern(0, 1)), lambda: v.read(0, 1),
                     lambda: v.unmap(0, 1)):
            with pytest.raises(AfuError) as e:
                call()
            assert e.value.afu_rc == 0x21
            assert ("adapter is closed" in str(e.value)
                    or "no longer exists (detached or closed)" in str(e.value))
        assert all(os.path.getsize(p) == 0 for p in paths)
    finally:
        for f in fds:
            os.close(f)
    ctx.close()


def test_delete_lun_fences_the_tables_before_closing_the_backing(adapter, monkeypatch):
    wwid = adapter.create_lun(GIB)
    other = adapter.open_disk(adapter.create_lun(GIB))
    ctx = other.attach()                         # a live table on another LUN
    backing = adapter.driver.backings[wwid]
    order = []

    def spy_close(self=backing, real=backing.close):
        order.append("close")
        real()

    monkeypatch.setattr(backing, "close", spy_close)
    monkeypatch.setattr(type(adapter.driver), "fence_tables", staticmethod(
        lambda tables: order.append(("fence", len(tables)))))
    adapter.delete_lun(wwid)
    assert order == [("fence", 1), "close"]
    ctx.close()


# -- item 12: dropped contexts, failing releases and resizes, gone contexts --------------------


def test_a_dropped_context_is_released_with_a_resource_warning():
    with cxlflash.Adapter() as a:
        disk = a.open_disk(a.create_lun(16 * CHUNK * BS))     # 16 chunks
        for i in range(40):
            ctx = disk.attach()
            v = ctx.create_virtual(CHUNK)
            v.write(0, pattern(0, 1))
            fd = ctx.adap_fd
            with pytest.warns(ResourceWarning, match="unclosed cxlflash Context"):
                del ctx, v
                gc.collect()
            with pytest.raises(OSError):
                os.fstat(fd)                    # the adapter fd was closed
        with disk.attach() as ctx:              # the next ioctl reaped them all
            assert len([c for c in a.driver.ctx_tbl if c is not None]) == 1
            with ctx.create_virtual(16 * CHUNK):
                pass


def test_a_closed_context_has_no_finaliser_warning(disk):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        ctx = disk.attach()
        ctx.create_virtual(1)
        ctx.close()
        del ctx
        gc.collect()


def test_a_forked_childs_copy_of_a_dropped_context_does_nothing(disk):
    from forking import in_child
    ctx = disk.attach()
    fd = ctx.adap_fd

    def child():
        nonlocal ctx
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            ctx = None
            gc.collect()
        os.fstat(fd)                            # the child's copy is untouched
        return True

    assert in_child(child)
    os.fstat(fd)
    ctx.close()


def test_vlun_close_with_a_failing_release_stays_open(adapter, ctx):
    v = ctx.create_virtual(3 * CHUNK)
    table = adapter._context_record(ctx.context_id).table
    adapter.inject_fault("sync", 1)
    with pytest.raises(CxlFlashError) as e:
        v.close()
    assert e.value.errno == errno.EAGAIN
    assert not v.closed and v in ctx.luns and table.is_open(v.handle)
    # The failed RELEASE left the handle open with no chunk: so says size.
    assert v.chunks == 0 and v.size == 0
    with pytest.raises(CxlFlashError):
        v.write(0, pattern(0, 1))
    v.close()                                 # the second close releases it
    assert v.closed and v not in ctx.luns and not table.is_open(v.handle)
    v.close()                                 # and a third does nothing


def test_context_close_after_a_failing_release_closes_the_lun(adapter, disk):
    ctx = disk.attach()
    v = ctx.create_virtual(CHUNK)
    adapter.inject_fault("sync", 1)
    with pytest.raises(CxlFlashError):
        ctx.close()                           # the release failed, DETACH did it
    assert ctx.closed and v.closed and ctx.luns == []


@pytest.mark.parametrize("faults", [1, 2, 3])
def test_set_size_release_under_sync_faults_reports_the_real_size(adapter, ctx, faults):
    v = ctx.create_virtual(3 * CHUNK)
    v.write(3 * CHUNK - 1, pattern(0, 1))
    adapter.inject_fault("sync", faults)
    try:
        v.set_size(CHUNK + 5, release=True)
    except CxlFlashError as e:
        assert e.errno == errno.EAGAIN
    adapter.inject_fault("sync", 0)
    assert v.size <= v.allocated
    assert v.size in (CHUNK + 5, 2 * CHUNK, 3 * CHUNK)
    v.read(v.size - 1, 1)                     # the last block is addressable
    with pytest.raises(CxlFlashError):
        v.read(v.size, 1)


def test_gone_context_gives_clear_errors(adapter, disk):
    ctx = disk.attach()
    v = ctx.create_virtual(10)
    arg = uapi.dk_cxlflash_detach()
    arg.context_id = ctx.context_id
    cxlflash.ioctl(disk, uapi.DK_CXLFLASH_DETACH, arg)   # behind the API's back
    for call in (lambda: v.set_size(20), lambda: v.chunks, lambda: v.lun_blocks,
                 lambda: v.allocated):
        with pytest.raises(CxlFlashError) as e:
            call()
        assert e.value.errno == errno.EINVAL and "close() it" in str(e.value)
    assert "VirtualLun" in repr(v)
    with pytest.raises(CxlFlashError):
        ctx.close()
    assert repr(v) == "<VirtualLun closed>" and "closed" in repr(ctx)
    with pytest.raises(ValueError):
        v.chunks


def test_repr_after_adapter_close_does_not_raise():
    a = cxlflash.Adapter()
    ctx = a.open_disk(a.create_lun(GIB)).attach()
    v = ctx.create_virtual(10)
    a.close()
    assert "VirtualLun" in repr(v) and "Context" in repr(ctx)
    with pytest.raises(CxlFlashError):
        v.chunks
    ctx.close()


# -- item 13: argument checking ------------------------------------------------------------------


def _einval(call, *words):
    with pytest.raises(CxlFlashError) as e:
        call()
    assert e.value.errno == errno.EINVAL
    for w in words:
        assert w in str(e.value)
    return e.value


def _typeerror(call, name):
    with pytest.raises(TypeError) as e:
        call()
    assert name in str(e.value)


BAD_TYPES = [0.5, 1.0, "1", b"1", None]


@pytest.mark.parametrize("bad", BAD_TYPES)
def test_wrong_types_are_typeerrors_naming_the_parameter(adapter, ctx, vlun, bad):
    before = vlun.read(0, 1)
    cid, h = ctx.context_id, vlun.handle
    buf = bytearray(BS)
    for call, name in [
            (lambda: vlun.write(bad, pattern(0, 1)), "lba"),
            (lambda: vlun.readinto(bad, buf), "lba"),
            (lambda: vlun.read(bad, 1), "lba"),
            (lambda: vlun.read(0, bad), "nblocks"),
            (lambda: vlun.unmap(bad, 1), "lba"),
            (lambda: vlun.unmap(0, bad), "nblocks"),
            (lambda: vlun.aread(bad, 1), "lba"),
            (lambda: vlun.areadinto(bad, buf), "lba"),
            (lambda: vlun.awrite(bad, buf), "lba"),
            (lambda: vlun.set_size(bad), "blocks"),
            (lambda: ctx.create_virtual(bad), "size"),
            (lambda: adapter.write(cid, h, bad, pattern(0, 1)), "lba"),
            (lambda: adapter.readinto(cid, h, bad, buf), "lba"),
            (lambda: adapter.read(cid, h, bad, 1), "lba"),
            (lambda: adapter.read(cid, h, 0, bad), "nblocks"),
            (lambda: adapter.read(bad, h, 0, 1), "context_id"),
            (lambda: adapter.write(cid, bad, 0, buf), "rsrc_handle"),
            (lambda: ctx.disks[0].attach(bad), "mode"),
            (lambda: ctx.disks[0].attach(interrupts=bad), "interrupts")]:
        _typeerror(call, name)
    if bad is not None:
        for call, name in [
                (lambda: vlun.translate([bad]), "lbas"),
                (lambda: vlun.listio([1], [bad], [1], buf), "lbas"),
                (lambda: vlun.listio([1], [0], [bad], buf), "nblocks"),
                (lambda: adapter.translate(cid, h, [bad]), "lbas")]:
            _typeerror(call, name)
    assert vlun.read(0, 1) == before and vlun.size == 100


def test_a_float_lba_is_never_truncated(vlun):
    vlun.write(0, pattern(0, 1))
    with pytest.raises(TypeError):
        vlun.write(0.5, bytes(BS))
    assert vlun.read(0, 1) == pattern(0, 1).tobytes()


def test_listio_count_of_bytes_is_a_typeerror(vlun):
    _typeerror(lambda: vlun.listio([1], [0], b"", bytearray(BS)), "nblocks")
    _typeerror(lambda: vlun.listio(b"\x01", [0], [1], bytearray(BS)), "ops")


def test_numpy_integers_are_accepted(adapter, ctx, vlun):
    for t in (np.int64, np.uint64, np.int32, np.uint8):
        vlun.write(t(3), pattern(3, 1))
        assert vlun.read(t(3), t(1)) == pattern(3, 1).tobytes()
        assert adapter.read(np.uint64(ctx.context_id), t(vlun.handle), t(3), t(1)) \
            == pattern(3, 1).tobytes()
    assert vlun.set_size(np.int64(200)) == 200
    assert vlun.translate(np.array([1, 2], np.int32)).dtype == np.uint64


@pytest.mark.parametrize("value", [-1, -2**63, 2**64, 2**64 + 5, 2**100])
def test_out_of_range_integers_are_einval(adapter, ctx, vlun, value):
    cid, h = ctx.context_id, vlun.handle
    buf = bytearray(BS)
    for call in (lambda: vlun.write(value, pattern(0, 1)),
                 lambda: vlun.readinto(value, buf),
                 lambda: vlun.read(value, 1),
                 lambda: vlun.read(0, value),
                 lambda: vlun.unmap(value, 1),
                 lambda: vlun.unmap(0, value),
                 lambda: vlun.aread(value, 1),
                 lambda: vlun.set_size(value),
                 lambda: vlun.translate([value]),
                 lambda: vlun.listio([1], [value], [1], buf),
                 lambda: vlun.listio([1], [0], [value], buf),
                 lambda: ctx.create_virtual(value),
                 lambda: adapter.write(cid, h, value, pattern(0, 1)),
                 lambda: adapter.readinto(cid, h, value, buf),
                 lambda: adapter.read(cid, h, value, 1),
                 lambda: adapter.read(cid, h, 0, value) if value < 0 else _raise_einval(),
                 lambda: adapter.translate(cid, h, [value])):
        _einval(call)


def _raise_einval():
    raise CxlFlashError(errno.EINVAL)


def test_a_huge_read_is_refused_before_allocating(adapter, ctx, vlun):
    vlun.set_size(2000)
    tracemalloc.start()
    try:
        e = _einval(lambda: vlun.read(1914, 2**48), "1914", "logical size of 2000")
        with pytest.raises(AfuError) as e2:      # not a context of ours: 0x21
            adapter.read(12345, vlun.handle, 0, 2**18)
        assert e2.value.afu_rc == 0x21
        with pytest.raises(AfuError) as e3:      # beyond the vLUN's chunk: 0x13
            adapter.read(ctx.context_id, vlun.handle, 0, 2**18)
        assert e3.value.afu_rc == 0x13
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and e is not None


def test_beyond_the_logical_size_is_cxlflasherror_naming_the_range(vlun):
    e = _einval(lambda: vlun.write(99, bytes(2 * BS)), "99..100", "logical size of 100")
    assert isinstance(e, OSError)
    _einval(lambda: vlun.translate([100]), "0..99")
    res = vlun.listio([1], [100], [1], bytearray(BS))
    err = res.error(0)
    assert isinstance(err, CxlFlashError) and err.errno == errno.EINVAL
    assert "0..99" in str(err)


def test_direct_lun_beyond_the_lun_is_einval(ctx):
    with ctx.open_direct() as d:
        _einval(lambda: d.read(d.size, 1), "logical size")
        _einval(lambda: d.write(d.size - 1, bytes(2 * BS)))


def test_bad_context_arguments(disk):
    _einval(lambda: disk.attach(3), "access mode")
    _einval(lambda: disk.attach(interrupts=-1), "interrupts")
    _einval(lambda: disk.attach(interrupts=5), "interrupts")


# -- item 14: scrub by default ---------------------------------------------------------------------


@pytest.fixture
def one_chunk_disk(adapter):
    with adapter.open_disk(adapter.create_lun(CHUNK * BS)) as d:
        yield d


def test_a_new_vlun_never_reads_another_contexts_released_data(one_chunk_disk):
    with one_chunk_disk.attach() as first:
        v = first.create_virtual(CHUNK)
        assert v.scrub
        v.write(0, pattern(0, 8))
        v.write(CHUNK - 8, pattern(CHUNK - 8, 8))
        v.close()
    with one_chunk_disk.attach() as second:
        w = second.create_virtual(CHUNK)
        assert w.read(0, 8) == bytes(8 * BS)
        assert w.read(CHUNK - 8, 8) == bytes(8 * BS)


def test_scrub_false_is_the_explicit_opt_out(one_chunk_disk):
    with one_chunk_disk.attach() as first:
        v = first.create_virtual(CHUNK, scrub=False)
        v.write(0, pattern(0, 1))
        v.set_size(0, release=True)
        v.close()
    with one_chunk_disk.attach() as second, second.create_virtual(CHUNK) as w:
        assert w.read(0, 1) == pattern(0, 1).tobytes()      # the kernel's way


# -- item 15: the cached ioctl-level data path and translate ---------------------------------------


def test_cached_path_follows_a_handle_reused_for_another_lun(adapter, disk):
    other = adapter.open_disk(adapter.create_lun(GIB))
    ctx = disk.attach()
    ctx.attach_disk(other)
    v = ctx.create_virtual(10)
    cid, h = ctx.context_id, v.handle
    adapter.write(cid, h, 0, pattern(0, 1, seed=1))
    v.close()
    w = ctx.create_virtual(10, disk=other)
    assert w.handle == h                          # same number, another LUN
    adapter.write(cid, h, 0, pattern(0, 1, seed=2))
    assert w.read(0, 1) == pattern(0, 1, seed=2).tobytes()
    x = ctx.create_virtual(10)
    assert x.read(0, 1) != pattern(0, 1, seed=2).tobytes()   # not on the first LUN
    ctx.close()


def test_stale_context_id_after_recover_fails_as_the_kernel_says(adapter, ctx, vlun):
    old = ctx.context_id
    adapter.write(old, vlun.handle, 0, pattern(0, 1))        # cached
    adapter.reset()
    with pytest.raises(AdapterResetError):
        adapter.read(old, vlun.handle, 0, 1)
    assert ctx.recover()
    assert ctx.context_id != old
    with pytest.raises(AfuError) as e:
        adapter.read(old, vlun.handle, 0, 1)
    assert e.value.afu_rc == 0x21
    assert adapter.read(ctx.context_id, vlun.handle, 0, 1) == pattern(0, 1).tobytes()


def test_cached_path_after_release_and_detach(adapter, disk, ctx, vlun):
    cid, h = ctx.context_id, vlun.handle
    adapter.readinto(cid, h, 0, bytearray(BS))
    vlun.close()
    with pytest.raises(AfuError) as e:
        adapter.readinto(cid, h, 0, bytearray(BS))
    assert e.value.afu_rc == 0x01
    with pytest.raises(AfuError) as e:
        adapter.readinto(cid, 10**6, 0, bytearray(BS))
    assert e.value.afu_rc == 0x03


def test_translate_out_and_recycling(adapter, ctx, vlun):
    vlun.set_size(4 * CHUNK)
    cid, h = ctx.context_id, vlun.handle
    lbas = np.random.default_rng(3).integers(0, 4 * CHUNK, 1 << 17).astype(np.uint64)
    ref = vlun.translate(lbas)
    out = np.zeros(len(lbas), np.uint64)
    assert adapter.translate(cid, h, lbas, out=out) is out
    assert (out == ref).all()
    r1 = adapter.translate(cid, h, lbas)
    r2 = adapter.translate(cid, h, lbas[::-1].copy())
    assert r1 is not r2 and (r1 == ref).all() and (r2 == ref[::-1]).all()
    view = r1[:10]
    del r1
    r3 = adapter.translate(cid, h, np.zeros(len(lbas), np.uint64))
    assert (view == ref[:10]).all()               # a view keeps its base
    assert (r2 == ref[::-1]).all()
    addr = r3.ctypes.data
    del r3
    r4 = adapter.translate(cid, h, lbas)
    assert r4.ctypes.data == addr and (r4 == ref).all()    # recycled
    with pytest.raises(TypeError):
        adapter.translate(cid, h, lbas, out=np.zeros(3, np.uint64))


def test_close_never_closes_a_reused_adapter_fd_number(disk, tmp_path):
    """C-style code closed the adapter fd itself; its number was reused by
    another file: Context.close() (and the finaliser) leave that file open."""
    ctx = disk.attach()
    fd = ctx.adap_fd
    os.close(fd)
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert other == fd
        ctx.close()
        os.fstat(other)                          # still open
        ctx2 = disk.attach()
        os.close(ctx2.adap_fd)
        fd2 = os.open(tmp_path / "other2", os.O_RDWR | os.O_CREAT, 0o600)
        assert fd2 == ctx2.adap_fd
        with pytest.warns(ResourceWarning):
            del ctx2
            gc.collect()
        os.fstat(fd2)
        os.close(fd2)
    finally:
        os.close(other)


def test_a_forked_childs_dropped_context_retires_its_replica_first(adapter, disk):
    """In a forked child, the finaliser of the child's own dropped Context
    stops the replica's data path before it closes the adapter fd, so no
    child thread can use chunks the owner frees when it sees the close."""
    from forking import in_child

    def child():
        ctx = disk.attach()
        v = ctx.create_virtual(1)
        v.write(0, pattern(0, 1))
        table = adapter._context_record(ctx.context_id).table
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del ctx, v
            gc.collect()
        return table.state

    assert in_child(child) == TABLE_GONE


def test_a_failing_open_raises_its_own_error_and_leaks_nothing(adapter, disk,
                                                               monkeypatch):
    ctx = disk.attach()
    table = adapter._context_record(ctx.context_id).table
    real = cxlflash.VirtualLun.set_size

    def faulty(self, *args, **kw):         # after USER_VIRTUAL succeeded:
        adapter.inject_fault("sync", 3)    # resize, its retry, and the RELEASE
        return real(self, *args, **kw)

    monkeypatch.setattr(cxlflash.VirtualLun, "set_size", faulty)
    with pytest.raises(CxlFlashError) as e:
        ctx.create_virtual(2 * CHUNK)
    assert e.value.errno == errno.EAGAIN and "resize again" in str(e.value)
    adapter.inject_fault("sync", 0)
    assert table.rht_out == 1 and len(ctx.luns) == 1   # still held, not lost
    ctx.close()
    assert table.rht_out == 0 and ctx.luns == []


def test_listio_request_type_above_255_is_not_a_read(vlun):
    vlun.write(0, pattern(0, 1))
    buf = bytearray(BS)
    res = vlun.listio([257], [0], [1], buf)
    assert res.error(0).errno == errno.EINVAL and buf == bytearray(BS)
