"""The Pythonic API: Adapter/Disk/Context/VirtualLun/DirectLun lifetimes,
exact logical sizes, buffers, asynchronous and list I/O, clone after fork,
access modes, statistics, and every error the API raises.

Data integrity under load is in ``test_api_integrity.py``.
"""
import asyncio
import errno
import os
import time

import numpy as np
import pytest

import cxlflash
import cxlflash.adapter as adapter_mod
from cxlflash import uapi
from cxlflash.driver.core import Caller
from cxlflash.errors import (AdapterResetError, AfuError, CxlFlashError,
                             ForkedAdapterError)

from block_pattern import BS, CHUNK, GIB, pattern
from forking import in_child


# -- helpers ----------------------------------------------------------------------


def fd_is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def live_contexts(a):
    drv = a.driver
    return [c for c in drv.ctx_tbl if c is not None] + list(drv.ctx_err_recovery)


def phys_bytes(vlun, lba, nblocks=1):
    """The backing store's bytes under ``nblocks`` vLBAs from ``lba``."""
    rec = vlun.adapter._context_record(vlun.context.context_id)
    fd = rec.rht_lun[vlun.handle].parent.backing.fd
    out = bytearray()
    for p in vlun.translate(np.arange(lba, lba + nblocks)):
        out += os.pread(fd, vlun.block_size, int(p) * vlun.block_size)
    return bytes(out)


class IoctlLog:
    """Records every DK ioctl an adapter issues."""

    def __init__(self, a, monkeypatch):
        self.calls = []
        real = a._disk_ioctl

        def spy(disk, request, arg):
            self.calls.append(request)
            return real(disk, request, arg)

        monkeypatch.setattr(a, "_disk_ioctl", spy)

    def count(self, request):
        return self.calls.count(request)


from api_fixtures import adapter, disk, ctx, vlun  # noqa: F401 (fixtures)


# -- context managers -------------------------------------------------------------


def test_nested_with_releases_everything():
    data = pattern(0, 3)
    with cxlflash.Adapter() as a, a.open_disk(a.create_lun(GIB)) as disk, \
            disk.attach() as ctx, ctx.create_virtual(10) as vlun:
        assert vlun.write(0, data) == 3
        assert vlun.read(0, 3) == data.tobytes()
        fd, backing = ctx.adap_fd, a.driver.gluns[disk.wwid].backing
        assert fd_is_open(fd) and len(live_contexts(a)) == 1
    assert vlun.closed and ctx.closed and disk.closed
    assert not fd_is_open(fd)
    assert backing.fd == -1 and a.driver.closed
    assert live_contexts(a) == []


def test_with_body_raising_still_releases(adapter, disk):
    with pytest.raises(RuntimeError):
        with disk.attach() as ctx, ctx.create_virtual(10) as vlun, \
                ctx.create_virtual(5) as v2:
            fd = ctx.adap_fd
            raise RuntimeError("boom")
    assert vlun.closed and v2.closed and ctx.closed
    assert not fd_is_open(fd)
    assert live_contexts(adapter) == []
    glun = adapter.driver.gluns[disk.wwid]
    assert glun.users == 0 and glun.mode == 0


def test_lun_with_releases_handle_only(adapter, ctx):
    rec = adapter._context_record(ctx.context_id)
    with pytest.raises(KeyError):
        with ctx.create_virtual(10) as v:
            assert rec.table.rht_out == 1
            raise KeyError("x")
    assert v.closed and not ctx.closed and rec.table.rht_out == 0
    with ctx.create_virtual(10) as v2:        # the context is still usable
        v2.write(0, pattern(0, 1))


def test_direct_lun_with(adapter):
    wwid = adapter.create_lun(64 << 20)
    with adapter.open_disk(wwid) as disk, disk.attach() as ctx:
        with pytest.raises(ZeroDivisionError):
            with ctx.open_direct() as d:
                assert d.size == (64 << 20) // BS and not d.virtual
                d.write(7, pattern(7, 2))
                1 / 0
        assert d.closed and adapter.driver.gluns[wwid].mode == 0
        with ctx.open_direct() as d2:
            assert d2.read(7, 2) == pattern(7, 2).tobytes()
            assert list(d2.translate([0, 5, d2.size - 1])) == [0, 5, d2.size - 1]


def test_adapter_with_body_raising_closes_driver_and_backings():
    with pytest.raises(RuntimeError):
        with cxlflash.Adapter() as a:
            wwid = a.create_lun(GIB)
            backing = a.driver.gluns[wwid].backing
            fut = None
            with a.open_disk(wwid) as disk, disk.attach() as ctx, \
                    ctx.create_virtual(1) as v:
                fut = v.awrite(0, pattern(0, 1))
                raise RuntimeError
    assert fut.done() and a.driver.closed and backing.fd == -1
    with pytest.raises(CxlFlashError) as e:
        a.create_lun(GIB)
    assert e.value.errno == errno.ENODEV
    with pytest.raises(CxlFlashError) as e:
        a.open_disk(wwid)
    assert e.value.errno == errno.ENODEV


def test_close_twice_is_harmless(adapter, disk):
    ctx = disk.attach()
    v = ctx.create_virtual(1)
    v.close()
    v.close()
    ctx.close()
    ctx.detach()
    disk.close()
    adapter.close()
    adapter.close()


def test_context_close_after_adapter_close():
    a = cxlflash.Adapter()
    disk = a.open_disk(a.create_lun(GIB))
    ctx = disk.attach()
    v = ctx.create_virtual(1)
    fd = ctx.adap_fd
    a.close()
    # The driver is gone with every context in it: closing what is left
    # only closes the fd, it does not fail.
    ctx.close()
    assert ctx.closed and v.closed and not fd_is_open(fd)



def test_context_close_after_disk_close(adapter):
    wwid = adapter.create_lun(GIB)
    disk = adapter.open_disk(wwid)
    ctx = disk.attach()
    ctx.create_virtual(1)
    fd = ctx.adap_fd
    disk.close()
    ctx.close()                   # no ioctl possible: closing the fd releases
    assert ctx.closed and not fd_is_open(fd)
    with adapter.open_disk(adapter.create_lun(GIB)) as d2, d2.attach():
        assert len(live_contexts(adapter)) == 1     # the driver reaped it
    glun = adapter.driver.gluns[wwid]
    assert glun.users == 0 and glun.mode == 0

# -- use after close or detach: ValueError ---------------------------------------------


def _lun_calls(v):
    buf = bytearray(BS)
    return {
        "read": lambda: v.read(0, 1),
        "readinto": lambda: v.readinto(0, buf),
        "write": lambda: v.write(0, bytes(BS)),
        "unmap": lambda: v.unmap(0, 1),
        "translate": lambda: v.translate([0]),
        "listio": lambda: v.listio([1], [0], [1], buf),
        "aread": lambda: v.aread(0, 1),
        "areadinto": lambda: v.areadinto(0, buf),
        "awrite": lambda: v.awrite(0, bytes(BS)),
        "read_async": lambda: asyncio.run(v.read_async(0, 1)),
        "readinto_async": lambda: asyncio.run(v.readinto_async(0, buf)),
        "write_async": lambda: asyncio.run(v.write_async(0, bytes(BS))),
    }


@pytest.mark.parametrize("what, how", [("lun", "close"), ("lun", "release"),
                                       ("context", "close"), ("context", "detach")])
def test_use_after_close_is_valueerror(ctx, what, how):
    v = ctx.create_virtual(10)
    getattr(v if what == "lun" else ctx, how)()
    assert v.closed
    for name, call in _lun_calls(v).items():
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):
        v.set_size(5)
    with pytest.raises(ValueError):
        v.chunks
    assert repr(v) == "<VirtualLun closed>"
    assert v.stats()["num_errors"] == 0     # statistics stay readable
    if ctx.closed:
        for call in (lambda: ctx.create_virtual(1), ctx.open_direct, ctx.recover,
                     ctx.clone_after_fork, lambda: ctx.attach_disk(ctx.disks[0])):
            with pytest.raises(ValueError):
                call()


def test_direct_use_after_close(adapter):
    with adapter.open_disk(adapter.create_lun(64 << 20)) as disk, \
            disk.attach() as ctx:
        d = ctx.open_direct()
        d.close()
        for call in _lun_calls(d).values():
            with pytest.raises(ValueError):
                call()
        assert repr(d) == "<DirectLun closed>"


def test_closed_disk_refuses_attach(adapter):
    disk = adapter.open_disk(adapter.create_lun(GIB))
    disk.close()
    with pytest.raises(CxlFlashError) as e:
        disk.attach()
    assert e.value.errno == errno.EBADF


# -- logical size over the chunk allocation ---------------------------------------------


def test_set_size_inside_allocation_issues_no_ioctl(adapter, ctx, monkeypatch):
    v = ctx.create_virtual()
    assert v.size == 0 and v.chunks == 0 and len(v) == 0
    log = IoctlLog(adapter, monkeypatch)
    assert v.set_size(1) == 1                         # 0 -> 1 chunk: one resize
    assert log.count(uapi.DK_CXLFLASH_VLUN_RESIZE) == 1
    for n in (100, CHUNK, 5, CHUNK - 1, 0, CHUNK):    # within 1 chunk: none
        assert v.set_size(n) == n and v.size == n and v.chunks == 1
    assert log.count(uapi.DK_CXLFLASH_VLUN_RESIZE) == 1
    assert v.set_size(CHUNK + 1) == CHUNK + 1         # beyond: exactly one more
    assert log.count(uapi.DK_CXLFLASH_VLUN_RESIZE) == 2
    assert v.chunks == 2 and v.allocated == 2 * CHUNK
    v.set_size(10)                                    # shrink: keeps chunks
    assert v.chunks == 2 and log.count(uapi.DK_CXLFLASH_VLUN_RESIZE) == 2
    v.set_size(10, release=True)                      # ... unless release
    assert v.chunks == 1 and v.size == 10
    assert log.count(uapi.DK_CXLFLASH_VLUN_RESIZE) == 3
    v.set_size(10, release=True)                      # nothing to release
    assert log.count(uapi.DK_CXLFLASH_VLUN_RESIZE) == 3
    assert set(log.calls) == {uapi.DK_CXLFLASH_VLUN_RESIZE}


def test_io_beyond_logical_size_is_einval(vlun):
    assert vlun.size == 100
    vlun.write(99, pattern(99, 1))                    # the last block is fine
    assert vlun.read(99, 1) == pattern(99, 1).tobytes()
    buf = bytearray(2 * BS)
    for call in (lambda: vlun.read(99, 2), lambda: vlun.read(100, 1),
                 lambda: vlun.readinto(99, buf), lambda: vlun.write(99, buf),
                 lambda: vlun.write(1000, bytes(BS)), lambda: vlun.unmap(50, 51),
                 lambda: vlun.translate([0, 100]), lambda: vlun.read(2**64 - 1, 1)):
        with pytest.raises(CxlFlashError) as e:
            call()
        assert e.value.errno == errno.EINVAL
    # The AFU would still accept these blocks (the chunk is allocated):
    # the logical size is the API's own bound.
    assert vlun.allocated == CHUNK
    vlun.set_size(200)
    assert vlun.read(99, 2)[:BS] == pattern(99, 1).tobytes()
    with pytest.raises(OSError) as e:       # checked at the call, as the sync read
        vlun.aread(199, 2)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        asyncio.run(vlun.write_async(200, bytes(BS)))
    assert e.value.errno == errno.EINVAL


def test_size_zero_refuses_io(ctx):
    v = ctx.create_virtual()
    for call in (lambda: v.read(0, 1), lambda: v.write(0, bytes(BS))):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EINVAL
    assert v.read(0, 0) == bytearray()        # an empty transfer is fine


def test_negative_size(vlun):
    with pytest.raises(CxlFlashError) as e:
        vlun.set_size(-1)
    assert e.value.errno == errno.EINVAL
    assert vlun.size == 100


def test_size_beyond_physical_lun_is_einval(adapter, ctx, monkeypatch):
    v = ctx.create_virtual(10)
    assert v.lun_blocks == GIB // BS
    log = IoctlLog(adapter, monkeypatch)
    with pytest.raises(CxlFlashError) as e:
        v.set_size(v.lun_blocks + 1)
    assert e.value.errno == errno.EINVAL
    assert log.calls == [] and v.size == 10 and v.chunks == 1
    assert v.set_size(v.lun_blocks) == v.lun_blocks      # exactly the LUN fits
    rec = adapter._context_record(ctx.context_id)
    before = rec.table.rht_out
    with pytest.raises(CxlFlashError) as e:
        ctx.create_virtual(v.lun_blocks + 1)
    assert e.value.errno == errno.EINVAL
    assert rec.table.rht_out == before                   # the new handle was released


def test_enospc_keeps_size_unless_best_effort(adapter, ctx):
    a = ctx.create_virtual(2 * CHUNK)                    # 2 of the 4 chunks
    b = ctx.create_virtual(10)                           # 1 chunk; 1 free
    alloc = adapter.driver.gluns[ctx.disks[0].wwid].allocator
    b.write(0, pattern(0, 10))
    with pytest.raises(CxlFlashError) as e:              # needs 2 more, 1 free
        b.set_size(3 * CHUNK)
    assert e.value.errno == errno.ENOSPC
    assert b.size == 10 and b.chunks == 1 and alloc.space() == 1
    assert b.read(0, 10) == pattern(0, 10).tobytes()
    assert b.set_size(3 * CHUNK, best_effort=True) == 2 * CHUNK
    assert b.size == 2 * CHUNK and b.chunks == 2 and alloc.space() == 0
    assert b.read(0, 10) == pattern(0, 10).tobytes()
    # No chunk left at all.
    with pytest.raises(CxlFlashError) as e:
        a.set_size(3 * CHUNK)
    assert e.value.errno == errno.ENOSPC and a.size == 2 * CHUNK
    # Best effort with nothing left: the allocation there is.
    a.set_size(5)
    assert a.set_size(3 * CHUNK, best_effort=True) == 2 * CHUNK


def test_create_virtual_enospc_and_best_effort(adapter, ctx):
    rec = adapter._context_record(ctx.context_id)
    with ctx.create_virtual(3 * CHUNK):
        with pytest.raises(CxlFlashError) as e:
            ctx.create_virtual(2 * CHUNK)
        assert e.value.errno == errno.ENOSPC and rec.table.rht_out == 1
        with ctx.create_virtual(2 * CHUNK, best_effort=True) as v:
            assert v.size == CHUNK and v.chunks == 1


def test_lun_smaller_than_a_chunk_is_enomem(adapter):
    wwid = adapter.create_lun(CHUNK * BS - BS)
    with adapter.open_disk(wwid) as disk, disk.attach() as ctx:
        with pytest.raises(CxlFlashError) as e:
            ctx.create_virtual(1)
        assert e.value.errno == errno.ENOMEM
        assert ctx.luns == [] and adapter._context_record(ctx.context_id).table.rht_out == 0
        with ctx.open_direct() as d:                     # direct access still works
            d.write(0, pattern(0, 1))



def test_failed_afu_sync_on_resize(adapter, ctx, monkeypatch):
    v = ctx.create_virtual(10)
    log = IoctlLog(adapter, monkeypatch)
    adapter.inject_fault("sync", 1)          # the resize is repaired by a retry
    assert v.set_size(CHUNK + 1) == CHUNK + 1 and v.chunks == 2
    assert log.count(uapi.DK_CXLFLASH_VLUN_RESIZE) == 2
    adapter.inject_fault("sync", 2)          # the repair fails too: EAGAIN
    with pytest.raises(CxlFlashError) as e:
        v.set_size(2 * CHUNK + 1)
    assert e.value.errno == errno.EAGAIN and v.size == CHUNK + 1
    assert v.set_size(2 * CHUNK + 1) == 2 * CHUNK + 1   # a retry works


def test_open_direct_on_a_virtual_lun_is_einval(ctx):
    with ctx.create_virtual(1):
        with pytest.raises(CxlFlashError) as e:
            ctx.open_direct()
        assert e.value.errno == errno.EINVAL
    with ctx.open_direct():
        with pytest.raises(CxlFlashError) as e:
            ctx.create_virtual(1)
        assert e.value.errno == errno.EINVAL

def test_transfers_larger_than_max_xfer_are_split(adapter, ctx):
    assert ctx.max_xfer >= 1
    other = ctx.create_virtual(1)
    v = ctx.create_virtual(1)
    other.set_size(2 * CHUNK)               # interleave: v's chunks not adjacent
    v.set_size(2 * CHUNK)
    assert v.stats()["max_transfer_size"] == ctx.max_xfer
    ctx.max_xfer = 3                        # what ATTACH would say for a tiny AFU
    v._rebind()
    assert v._dp.max_xfer == 3 and v.stats()["max_transfer_size"] == 3
    data = pattern(CHUNK - 8, 17)
    assert v.write(CHUNK - 8, data) == 17   # 6 commands, 2 chunks
    assert v.read(CHUNK - 8, 17) == data.tobytes()
    assert phys_bytes(v, CHUNK - 8, 17) == data.tobytes()
    st = v.stats()
    assert st["num_writes"] == 1 and st["num_reads"] == 1     # one call each


def test_block_size_512(adapter):
    wwid = adapter.add_lun(None, size=64 << 20, block_size=512)   # 2 chunks of 32 MiB
    with adapter.open_disk(wwid) as disk, disk.attach() as ctx:
        assert ctx.block_size == 512
        with ctx.create_virtual(CHUNK + 1) as v:
            assert v.block_size == 512 and v.chunks == 2 and v.lun_blocks == CHUNK * 2
            data = pattern(CHUNK - 2, 3, bs=512)
            assert v.write(CHUNK - 2, data) == 3
            assert v.read(CHUNK - 2, 3) == data.tobytes()
            with pytest.raises(ValueError):
                v.write(0, bytes(4096 + 512 + 1))
            with pytest.raises(CxlFlashError) as e:
                v.set_size(2 * CHUNK + 1)
            assert e.value.errno == errno.EINVAL


# -- buffers ----------------------------------------------------------------------------


def test_buffer_protocol_without_copies(vlun):
    data = pattern(0, 4)
    assert vlun.write(0, data.tobytes()) == 4                      # bytes
    assert vlun.write(4, bytearray(pattern(4, 1))) == 1            # bytearray
    assert vlun.write(5, memoryview(pattern(5, 2))) == 2           # memoryview
    assert vlun.write(7, pattern(7, 2).view(np.uint64).reshape(2, -1)) == 2   # 2-D
    out = vlun.read(0, 9)
    assert isinstance(out, bytearray) and out == pattern(0, 9).tobytes()
    arr = np.zeros(BS * 9 // 4, dtype=np.uint32)
    assert vlun.readinto(0, arr) == 9 and arr.tobytes() == out     # filled in place
    big = bytearray(12 * BS)
    mv = memoryview(big)[BS:4 * BS]
    assert vlun.readinto(2, mv) == 3                               # a window of big
    assert big[:BS] == bytes(BS) and big[4 * BS:] == bytes(8 * BS)
    assert big[BS:4 * BS] == pattern(2, 3).tobytes()


def test_bad_buffers(vlun):
    with pytest.raises(ValueError):
        vlun.write(0, bytes(BS + 1))                    # not whole blocks
    with pytest.raises(ValueError):
        vlun.readinto(0, bytearray(100))
    with pytest.raises(BufferError):
        vlun.readinto(0, bytes(BS))                     # read-only
    with pytest.raises(ValueError):
        vlun.readinto(0, np.zeros((2, 2 * BS), np.uint8)[:, ::2])   # not contiguous
    with pytest.raises(TypeError):
        vlun.write(0, "text")
    with pytest.raises(CxlFlashError) as e:
        vlun.read(-1, 1)
    assert e.value.errno == errno.EINVAL
    assert vlun.stats()["num_errors"] == 0


def test_unmap_zeroes(vlun):
    vlun.write(0, pattern(0, 10))
    assert vlun.unmap(2, 3) == 3
    got = vlun.read(0, 10)
    assert got[2 * BS:5 * BS] == bytes(3 * BS)
    assert got[:2 * BS] == pattern(0, 2).tobytes()
    assert got[5 * BS:] == pattern(5, 5).tobytes()
    assert vlun.unmap(0, 0) == 0


def test_translate(adapter, ctx):
    other = ctx.create_virtual(1)
    v = ctx.create_virtual(1)
    other.set_size(2 * CHUNK)
    v.set_size(2 * CHUNK)
    lxt = adapter._context_record(ctx.context_id).table.lxt(v.handle)
    lbas = np.array([0, 1, CHUNK - 1, CHUNK, 2 * CHUNK - 1], dtype=np.int64)
    got = v.translate(lbas)
    assert got.dtype == np.uint64
    want = [((int(lxt[x >> 16]) >> 16) << 16) | (x & 0xFFFF) for x in lbas.tolist()]
    assert got.tolist() == want
    assert got[3] != got[2] + 1                  # the chunks are not adjacent
    assert v.translate([]).tolist() == []
    assert v.translate(np.array([[0, 1]])).tolist() == want[:2]     # any shape
    v.write(CHUNK, pattern(CHUNK, 1))
    assert phys_bytes(v, CHUNK) == pattern(CHUNK, 1).tobytes()


# -- asynchronous I/O -----------------------------------------------------------------


def test_futures(vlun):
    futs = [vlun.awrite(i * 3, pattern(i * 3, 3)) for i in range(20)]
    assert [f.result(5) for f in futs] == [3] * 20
    reads = [vlun.aread(i * 3, 3) for i in range(20)]
    for i, f in enumerate(reads):
        assert f.result(5) == pattern(i * 3, 3).tobytes()
    buf = np.zeros(60 * BS, np.uint8)
    assert vlun.areadinto(0, buf).result(5) == 60
    assert buf.tobytes() == vlun.read(0, 60)
    st = vlun.stats()
    assert st["num_awrites"] == 20 and st["num_areads"] == 21
    assert st["num_writes"] == 20 and st["num_reads"] == 22


def test_asyncio(vlun):
    async def main():
        await asyncio.gather(*(vlun.write_async(i, pattern(i, 1)) for i in range(16)))
        got = await asyncio.gather(*(vlun.read_async(i, 1) for i in range(16)))
        buf = bytearray(16 * BS)
        n = await vlun.readinto_async(0, buf)
        return got, n, buf

    got, n, buf = asyncio.run(main())
    assert [bytes(g) for g in got] == [pattern(i, 1).tobytes() for i in range(16)]
    assert n == 16 and buf == vlun.read(0, 16)


def test_async_errors_are_delivered(adapter, disk):
    with disk.attach(os.O_RDONLY) as ctx, ctx.create_virtual(10) as v:
        with pytest.raises(AfuError):
            v.awrite(0, bytes(BS)).result(5)
        with pytest.raises(AfuError):
            asyncio.run(v.write_async(0, bytes(BS)))
        assert v.stats()["num_errors"] == 2


# -- list I/O -------------------------------------------------------------------------------


def test_listio_matches_synchronous(vlun):
    vlun.set_size(3000)
    rng = np.random.default_rng(1)
    nb = rng.integers(1, 8, size=40)
    # Non-overlapping: 40 ranges of <= 7 blocks each, spaced apart.
    lbas = np.arange(40) * 70 + rng.integers(0, 60, size=40)
    wbuf = np.concatenate([pattern(l, n, seed=7) for l, n in zip(lbas.tolist(), nb.tolist())])
    res = vlun.listio(np.full(40, cxlflash.LIST_WRITE), lbas, nb, wbuf)
    assert res.ok and res.status.tolist() == nb.tolist() and len(res) == 40
    assert res.check() is res and res.errors() == {}
    for l, n in zip(lbas.tolist(), nb.tolist()):
        assert vlun.read(l, n) == pattern(l, n, seed=7).tobytes()
    rbuf = np.zeros_like(wbuf)
    res = vlun.listio(np.full(40, cxlflash.LIST_READ), lbas, nb, rbuf)
    assert res.ok and np.array_equal(rbuf, wbuf)
    # Explicit offsets (reversed layout) and a mixed batch with an unmap.
    sizes = nb * BS
    offs = np.concatenate([[0], np.cumsum(sizes[::-1])[:-1]])[::-1]
    rbuf2 = np.zeros_like(wbuf)
    res = vlun.listio([cxlflash.LIST_READ] * 40, lbas, nb, rbuf2, offsets=offs)
    assert res.ok
    for i in range(40):
        o, s = int(offs[i]), int(sizes[i])
        assert rbuf2[o:o + s].tobytes() == pattern(int(lbas[i]), int(nb[i]), seed=7).tobytes()
    mixed = vlun.listio([cxlflash.LIST_UNMAP, cxlflash.LIST_WRITE, cxlflash.LIST_READ],
                        [lbas[0], 2990, 2990], [nb[0], 2, 2],
                        np.concatenate([pattern(2990, 2), np.zeros(2 * BS, np.uint8)]),
                        offsets=[0, 0, 2 * BS])
    assert mixed.ok
    assert vlun.read(int(lbas[0]), int(nb[0])) == bytes(int(nb[0]) * BS)


def test_listio_errors_per_request(vlun):
    buf = bytearray(6 * BS)
    res = vlun.listio([1, 1, 9, 2, 1, 1], [0, 99, 0, 0, 100, 0], [1, 2, 1, 1, 1, 1],
                      buf, offsets=[0, BS, 2 * BS, 3 * BS, 4 * BS, 6 * BS])
    assert not res.ok
    assert res.status[0] == 1 and res.status[3] == 1
    errs = res.errors()
    assert sorted(errs) == [1, 2, 4, 5]
    for i in (1, 4):                                   # beyond the size
        assert type(errs[i]) is CxlFlashError and errs[i].errno == errno.EINVAL
        assert "logical size" in str(errs[i])
    assert errs[2].errno == errno.EINVAL               # unknown request type
    assert errs[5].errno == errno.EINVAL               # does not fit in the buffer
    assert res.error(0) is None
    with pytest.raises(OSError) as e:
        res.check()
    assert e.value is not None and e.value.errno == errno.EINVAL
    st = vlun.stats()
    assert st["num_list_calls"] == 1 and st["num_errors"] == 4
    assert st["num_reads"] == 1 and st["num_writes"] == 1
    with pytest.raises(ValueError):
        vlun.listio([1, 1], [0], [1], buf)             # lengths differ


def test_listio_afu_and_context_errors(adapter, disk):
    ctx = disk.attach(os.O_RDONLY)
    v = ctx.create_virtual(10)
    if True:
        res = v.listio([1, 2], [0, 0], [1, 1], bytearray(2 * BS))
        assert res.status[0] == 1
        err = res.error(1)
        assert isinstance(err, AfuError) and err.afu_rc in (0x05, 0x15)
        # The context detached behind the API's back: -1002 (EBADF).
        arg = uapi.dk_cxlflash_detach()
        arg.context_id = ctx.context_id
        cxlflash.ioctl(disk, uapi.DK_CXLFLASH_DETACH, arg)
        res = v.listio([1], [0], [1], bytearray(BS))
        assert isinstance(res.error(0), CxlFlashError) and res.error(0).errno == errno.EBADF
        with pytest.raises(AfuError) as e:
            v.read(0, 1)
        assert e.value.afu_rc == 0x21
    with pytest.raises(CxlFlashError) as e:       # its handle went with it
        ctx.close()
    assert e.value.errno == errno.EINVAL and ctx.closed


# -- AFU errors -------------------------------------------------------------------------------


def test_access_modes(adapter, disk):
    with disk.attach(os.O_RDONLY) as ro, ro.create_virtual(10) as v:
        v.read(0, 1)
        with pytest.raises(AfuError) as e:
            v.write(0, bytes(BS))
        assert e.value.errno == errno.EIO and e.value.afu_rc in (0x05, 0x15)
        with pytest.raises(AfuError):
            v.unmap(0, 1)
        assert v.stats()["num_errors"] == 2
    with disk.attach(os.O_WRONLY) as wo, wo.create_virtual(10) as v:
        v.write(0, bytes(BS))
        with pytest.raises(AfuError) as e:
            v.read(0, 1)
        assert e.value.afu_rc in (0x05, 0x15)
    with pytest.raises(CxlFlashError) as e:
        disk.attach(3)
    assert e.value.errno == errno.EINVAL


def test_released_handle_is_afu_error(adapter, ctx, disk):
    v = ctx.create_virtual(10)
    arg = uapi.dk_cxlflash_release()
    arg.context_id = ctx.context_id
    arg.rsrc_handle = v.handle
    cxlflash.ioctl(disk, uapi.DK_CXLFLASH_RELEASE, arg)
    with pytest.raises(AfuError) as e:
        v.read(0, 1)
    assert e.value.afu_rc == 0x01
    assert v.stats()["num_errors"] == 1
    with pytest.raises(CxlFlashError) as e:       # already released
        v.close()
    assert e.value.errno == errno.EINVAL and v.closed


def test_io_after_adapter_close_is_afu_error():
    a = cxlflash.Adapter()
    disk = a.open_disk(a.create_lun(GIB))
    ctx = disk.attach()
    v = ctx.create_virtual(1)
    a.close()
    with pytest.raises(AfuError) as e:
        v.read(0, 1)
    assert e.value.afu_rc == 0x21
    ctx.close()


# -- multiple disks --------------------------------------------------------------------------


def test_attach_disk(adapter, ctx):
    other = adapter.open_disk(adapter.create_lun(GIB))
    stranger = adapter.open_disk(adapter.create_lun(GIB))
    with pytest.raises(CxlFlashError) as e:
        ctx.create_virtual(1, disk=other)
    assert e.value.errno == errno.EINVAL
    assert ctx.attach_disk(other) is other and ctx.disks[1] is other
    v1 = ctx.create_virtual(10)
    v2 = ctx.create_virtual(10, disk=other)
    v1.write(0, pattern(0, 1, seed=1))
    v2.write(0, pattern(0, 1, seed=2))
    assert v1.read(0, 1) == pattern(0, 1, seed=1).tobytes()
    assert v2.read(0, 1) == pattern(0, 1, seed=2).tobytes()
    assert v2.disk is other and v1.disk is ctx.disks[0]
    with pytest.raises(CxlFlashError):
        ctx.attach_disk(other)                     # already attached
    with pytest.raises(CxlFlashError):
        ctx.open_direct(disk=stranger)


# -- recovery after an AFU reset ------------------------------------------------------------


def test_auto_recovery_after_reset(adapter, ctx):
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 10))
    old_fd = ctx.adap_fd
    assert ctx.recover() is False                  # healthy: nothing to do
    adapter.reset()
    assert v.read(0, 10) == pattern(0, 10).tobytes()   # just works
    assert ctx.adap_fd != old_fd and not fd_is_open(old_fd) and ctx.resets == 1
    assert adapter._context_record(ctx.context_id).pid == os.getpid()
    st = v.stats()
    assert st["num_reset_contexts"] == 1
    assert st["num_writes"] == 1 and st["num_reads"] == 1 and st["num_errors"] == 0
    # Every kind of I/O recovers.
    for step in (lambda: v.write(1, pattern(1, 1, seed=9)),
                 lambda: v.unmap(2, 1),
                 lambda: v.readinto(0, bytearray(BS)),
                 lambda: v.aread(0, 1).result(5),
                 lambda: v.listio([1, 1], [0, 1], [1, 1], bytearray(2 * BS)).check()):
        adapter.reset()
        step()
    st = v.stats()
    assert st["num_reset_contexts"] == 6 and st["num_errors"] == 0
    assert st["num_writes"] == 2 and st["num_unmaps"] == 1
    assert st["num_reads"] == 1 + 1 + 1 + 2
    assert v.read(1, 2) == pattern(1, 1, seed=9).tobytes() + bytes(BS)
    # Resizing goes on in error too; the next I/O recovers.
    adapter.reset()
    v.set_size(CHUNK + 1)
    v.write(CHUNK, pattern(CHUNK, 1))
    assert v.read(CHUNK, 1) == pattern(CHUNK, 1).tobytes()


def test_reset_recovers_every_lun_once(adapter, ctx):
    v1, v2 = ctx.create_virtual(1), ctx.create_virtual(1)
    adapter.reset()
    v1.read(0, 1)
    v2.read(0, 1)
    assert ctx.resets == 1
    assert v1.stats()["num_reset_contexts"] == 1 == v2.stats()["num_reset_contexts"]


def test_adapter_reset_error_when_recovery_fails(adapter, ctx):
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 1))
    adapter.driver.recovery_retry_delay = 0
    adapter.inject_fault("backend_context", 100)
    adapter.reset()
    with pytest.raises(AdapterResetError) as e:
        v.read(0, 1)
    assert e.value.errno == errno.EIO
    with pytest.raises(AdapterResetError):
        v.aread(0, 1).result(5)
    res = v.listio([1], [0], [1], bytearray(BS))
    assert isinstance(res.error(0), AdapterResetError)
    with pytest.raises(CxlFlashError) as e:
        ctx.recover()
    assert e.value.errno == errno.ENODEV
    assert v.stats()["num_errors"] == 3
    adapter.inject_fault("backend_context", 0)       # the adapter heals
    assert v.read(0, 1) == pattern(0, 1).tobytes()
    assert v.stats()["num_reset_contexts"] == 1


def test_failed_adapter(adapter, ctx):
    v = ctx.create_virtual(10)
    adapter.fail()
    with pytest.raises(AdapterResetError):
        v.read(0, 1)
    with pytest.raises(CxlFlashError) as e:
        ctx.create_virtual(1)
    assert e.value.errno == errno.ENODEV


# -- statistics ------------------------------------------------------------------------------


def test_stats(vlun):
    st = vlun.stats()
    for key in ("block_size", "num_paths", "max_transfer_size", "num_reads",
                "num_writes", "num_areads", "num_awrites", "num_blocks_read",
                "num_blocks_written", "num_errors", "num_reset_contexts"):
        assert isinstance(st[key], int), key
    assert st["block_size"] == BS and st["num_paths"] == 1
    assert all(v == 0 for k, v in st.items()
               if k.startswith("num_") and k != "num_paths")
    vlun.write(0, pattern(0, 5))
    vlun.read(0, 2)
    vlun.readinto(2, bytearray(3 * BS))
    vlun.unmap(0, 4)
    vlun.listio([1, 2], [0, 1], [2, 3], bytearray(5 * BS))
    vlun.aread(0, 1).result(5)
    vlun.awrite(0, bytes(2 * BS)).result(5)
    with pytest.raises(OSError):
        vlun.read(200, 1)
    st = vlun.stats()
    assert st["num_reads"] == 4 and st["num_blocks_read"] == 2 + 3 + 2 + 1
    assert st["num_writes"] == 3 and st["num_blocks_written"] == 5 + 3 + 2
    assert st["num_unmaps"] == 1 and st["num_blocks_unmapped"] == 4
    assert st["num_areads"] == 1 and st["num_awrites"] == 1
    assert st["num_list_calls"] == 1 and st["num_reset_contexts"] == 0


# -- clone after fork ------------------------------------------------------------------------


def _glun(adapter, vlun):
    return adapter._context_record(vlun.context.context_id).rht_lun[vlun.handle].parent


def _wait_released(adapter, n_live, timeout=5.0):
    """Wait for the contexts of exited children to be released."""
    me = Caller(os.getpid(), os.getppid())
    deadline = time.monotonic() + timeout
    while len(live_contexts(adapter)) > n_live:
        assert time.monotonic() < deadline, "a child's context was not released"
        adapter.driver.reap(me)
        time.sleep(0.01)


def test_clone_after_fork_in_a_real_child(adapter, ctx):
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 1))
    g = _glun(adapter, v)
    aun = int(v.translate([0])[0]) >> 16

    def child():
        try:
            v.read(0, 1)                 # the parent's context is not ours
        except AfuError as e:
            if e.afu_rc != 0x21:
                return 3
        else:
            return 4
        parent_id = ctx.context_id
        ctx.clone_after_fork(os.O_RDONLY)          # narrowing is allowed
        if ctx.context_id == parent_id or ctx.mode != os.O_RDONLY or v.handle != 0:
            return 5
        if bytes(v.read(0, 1)) != pattern(0, 1).tobytes():
            return 6                     # the data is shared, not copied
        try:
            v.write(0, pattern(0, 1, seed=9))
        except AfuError as e:
            if e.afu_rc != 0x05:         # a read-only context
                return 7
        else:
            return 8
        return 0

    assert in_child(child) == 0
    # The child's context went with the child: its clone reference too.
    _wait_released(adapter, 1)
    assert g.allocator.clone_count(aun) == 0
    assert v.read(0, 1) == pattern(0, 1).tobytes()


def test_child_writes_and_grows_through_the_parents_driver(adapter, ctx):
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 1))
    g = _glun(adapter, v)
    free_before = g.allocator.space()

    def child():
        ctx.clone_after_fork()                     # keep O_RDWR
        v.write(1, pattern(1, 1, seed=5))          # lands in the shared chunk
        v.set_size(3 * CHUNK)                      # chunks from the shared allocator
        v.write(2 * CHUNK, pattern(2 * CHUNK, 1, seed=5))
        if bytes(v.read(2 * CHUNK, 1)) != pattern(2 * CHUNK, 1, seed=5).tobytes():
            return 3
        if v.chunks != 3:
            return 4
        if g.allocator.space() != free_before:     # our copy of it did not move
            return 5
        return 0

    assert in_child(child) == 0
    assert v.read(1, 1) == pattern(1, 1, seed=5).tobytes()
    _wait_released(adapter, 1)
    assert g.allocator.space() == free_before      # the child's growth was freed
    assert v.chunks == 1 and v.read(0, 1) == pattern(0, 1).tobytes()


def test_grandchild_cannot_reach_the_driver(adapter, ctx):
    v = ctx.create_virtual(10)

    def child():
        def grandchild():
            try:
                ctx.clone_after_fork()
            except ForkedAdapterError as e:
                return 0 if "no connection" in str(e) else 3
            return 4
        return in_child(grandchild)

    assert in_child(child) == 0
    assert v.size == 10


@pytest.fixture
def fake_child(monkeypatch):
    """Make the adapter see the caller as a forked child of this process
    (what the shared driver will see): returns the child's pid."""
    parent = os.getpid()
    child = parent + 1_000_000
    calls = []

    def caller():
        calls.append(1)
        return Caller(pid=child, ppid=parent)

    def start():
        monkeypatch.setattr(adapter_mod, "_caller", caller)
        return child

    start.calls = calls
    return start


def test_clone_after_fork_simulated(adapter, disk, fake_child):
    other = adapter.open_disk(adapter.create_lun(GIB))
    ctx = disk.attach()
    ctx.attach_disk(other)
    v1 = ctx.create_virtual(CHUNK + 10)
    v2 = ctx.create_virtual(5, disk=other)
    v1.write(CHUNK - 1, pattern(CHUNK - 1, 2))
    v2.write(0, pattern(0, 5, seed=2))
    parent_id, h1, h2 = ctx.context_id, v1.handle, v2.handle
    phys = v1.translate([0, CHUNK])
    parent_fd = os.dup(ctx.adap_fd)      # the parent process's copy of its fd
    try:
        child_pid = fake_child()
        ctx.clone_after_fork()
        rec = adapter._context_record(ctx.context_id)
        assert ctx.context_id != parent_id and rec.pid == child_pid
        assert ctx.mode == os.O_RDWR and ctx.adap_fd != parent_fd
        assert (v1.handle, v2.handle) == (h1, h2)                     # same handles
        assert rec.rht_lun[h1] is not None and rec.rht_lun[h2] is not None
        assert v1.size == CHUNK + 10 and v1.chunks == 2 and v2.size == 5
        assert v1.translate([0, CHUNK]).tolist() == phys.tolist()     # same chunks
        # Shared, not copied: each side sees the other's writes.
        assert v1.read(CHUNK - 1, 2) == pattern(CHUNK - 1, 2).tobytes()
        assert v2.read(0, 5) == pattern(0, 5, seed=2).tobytes()
        v1.write(3, pattern(3, 1, seed=5))
        assert adapter.read(parent_id, h1, 3, 1) == pattern(3, 1, seed=5).tobytes()
        adapter.write(parent_id, h2, 4, pattern(4, 1, seed=6))
        assert v2.read(4, 1) == pattern(4, 1, seed=6).tobytes()
        # Independent sizes afterwards.
        v1.set_size(3 * CHUNK)
        assert v1.chunks == 3
        parent_rec = adapter._context_record(parent_id)
        assert parent_rec.table.lxt_count(h1) == 2
        ctx.close()
        assert adapter.read(parent_id, h1, CHUNK - 1, 1) == pattern(CHUNK - 1, 1).tobytes()
    finally:
        os.close(parent_fd)



def test_clone_after_fork_failure_changes_nothing(adapter, ctx, fake_child):
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 1))
    parent_id, fd = ctx.context_id, ctx.adap_fd
    n = len(live_contexts(adapter))
    fake_child()
    adapter.inject_fault("sync", 1)              # the AFU sync of VLUN_CLONE fails
    with pytest.raises(CxlFlashError) as e:
        ctx.clone_after_fork()
    assert e.value.errno == errno.EAGAIN
    assert (ctx.context_id, ctx.adap_fd, ctx.mode) == (parent_id, fd, os.O_RDWR)
    assert fd_is_open(fd) and len(live_contexts(adapter)) == n   # child detached
    assert v.read(0, 1) == pattern(0, 1).tobytes()               # still the parent's

@pytest.mark.parametrize("parent, child", [
    (os.O_RDONLY, os.O_RDWR), (os.O_RDONLY, os.O_WRONLY),
    (os.O_WRONLY, os.O_RDWR), (os.O_WRONLY, os.O_RDONLY),
])
def test_clone_after_fork_cannot_widen(adapter, disk, fake_child, parent, child):
    ctx = disk.attach(parent)
    v = ctx.create_virtual(10)
    parent_id, fd, n = ctx.context_id, ctx.adap_fd, len(live_contexts(adapter))
    fake_child()
    with pytest.raises(CxlFlashError) as e:
        ctx.clone_after_fork(child)
    assert e.value.errno == errno.EINVAL
    # Nothing changed: no ioctl was even issued.
    assert fake_child.calls == []
    assert (ctx.context_id, ctx.adap_fd, ctx.mode) == (parent_id, fd, parent)
    assert fd_is_open(fd) and len(live_contexts(adapter)) == n
    assert v.size == 10 and not v.closed
    with pytest.raises(CxlFlashError) as e:
        ctx.clone_after_fork(7)                        # not an access mode
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("parent, child", [
    (os.O_RDWR, None), (os.O_RDWR, os.O_RDWR), (os.O_RDWR, os.O_RDONLY),
    (os.O_RDWR, os.O_WRONLY), (os.O_RDONLY, os.O_RDONLY),
])
def test_clone_after_fork_keeps_or_narrows(adapter, disk, fake_child, parent, child):
    ctx = disk.attach(parent)
    v = ctx.create_virtual(10)
    if parent == os.O_RDWR:
        v.write(0, pattern(0, 1))
    keep = os.dup(ctx.adap_fd)
    try:
        fake_child()
        ctx.clone_after_fork(child)
        mode = parent if child is None else child
        assert ctx.mode == mode
        if mode != os.O_WRONLY:
            want = pattern(0, 1).tobytes() if parent == os.O_RDWR else bytes(BS)
            assert v.read(0, 1) == want
        else:
            with pytest.raises(AfuError):
                v.read(0, 1)
        if mode == os.O_RDONLY:
            with pytest.raises(AfuError):
                v.write(0, bytes(BS))
        else:
            v.write(0, bytes(BS))
        ctx.close()
    finally:
        os.close(keep)


def test_clone_after_fork_direct_luns(adapter, fake_child):
    wwid = adapter.create_lun(64 << 20)
    disk = adapter.open_disk(wwid)
    ctx = disk.attach()
    d = ctx.open_direct()
    d.write(5, pattern(5, 1))
    keep = os.dup(ctx.adap_fd)
    try:
        parent_id = ctx.context_id
        fake_child()
        ctx.clone_after_fork()
        assert ctx.context_id != parent_id
        assert d.read(5, 1) == pattern(5, 1).tobytes()
        d.write(6, pattern(6, 1))
        assert adapter.read(parent_id, 0, 6, 1) == pattern(6, 1).tobytes()
        ctx.close()
    finally:
        os.close(keep)


def test_clone_after_fork_vlun_on_second_disk(adapter, fake_child):
    # The first disk holds only a direct LUN; the vLUN is on the second.
    d1 = adapter.open_disk(adapter.create_lun(64 << 20))
    d2 = adapter.open_disk(adapter.create_lun(GIB))
    ctx = d1.attach()
    ctx.attach_disk(d2)
    direct = ctx.open_direct()
    v = ctx.create_virtual(10, disk=d2)
    direct.write(0, pattern(0, 1, seed=1))
    v.write(0, pattern(0, 1, seed=2))
    keep = os.dup(ctx.adap_fd)
    try:
        fake_child()
        ctx.clone_after_fork()
        assert direct.read(0, 1) == pattern(0, 1, seed=1).tobytes()
        assert v.read(0, 1) == pattern(0, 1, seed=2).tobytes()
        ctx.close()
    finally:
        os.close(keep)



def test_adapter_close_waits_for_async_io(adapter, vlun):
    futs = [vlun.aread(0, 1) for _ in range(8)]
    adapter.close()
    assert all(f.done() for f in futs)
