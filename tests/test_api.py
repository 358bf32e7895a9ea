"""The Pythonic API: Adapter/Disk/Context/VirtualLun/DirectLun lifetimes,
exact logical sizes, buffers, access modes, AFU errors, recovery,
statistics, and every error the API raises.

Asynchronous and list I/O are in ``test_api_listio.py``, clone after fork
in ``test_api_fork.py``, data integrity under load in
``test_api_integrity.py``.
"""
import asyncio
import errno
import os
import signal
import threading
import time

import numpy as np
import pytest

import cxlflash
import cxlflash.adapter as adapter_mod
from cxlflash import uapi
from cxlflash.driver.context import Caller
from cxlflash.errors import (AdapterResetError, AfuError, CxlFlashError,
                             ForkedAdapterError)

from block_pattern import BS, CHUNK, GIB, pattern
from forking import in_child

from api_fixtures import (adapter, ctx, disk, make_adapter, vlun,  # noqa: F401
                          IoctlLog, adapter_closed, fd_is_open, live_contexts,
                          lun_status, phys_bytes)

#: Each test of the ``disk`` fixture runs on a memory LUN and on an RBD image
#: (tests/conftest.py; ``memory_backing``: memory only).
LUN_BACKINGS = ("memory", "rbd")



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
    assert a.driver.contexts() == []


def test_with_body_raising_still_releases(adapter, disk):
    with pytest.raises(RuntimeError):
        with disk.attach() as ctx, ctx.create_virtual(10) as vlun, \
                ctx.create_virtual(5) as v2:
            fd = ctx.adap_fd
            raise RuntimeError("boom")
    assert vlun.closed and v2.closed and ctx.closed
    assert not fd_is_open(fd)
    assert live_contexts(adapter) == []
    lun = lun_status(adapter, disk.wwid)
    assert lun["users"] == 0 and lun["mode"] == "none"


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
        assert d.closed and lun_status(adapter, wwid)["mode"] == "none"
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
    """A second close (or a detach after close) neither raises nor undoes the
    first: each object stays closed, and what the first close released stays
    released."""
    ctx = disk.attach()
    v = ctx.create_virtual(1)
    adap_fd = ctx.adap_fd
    assert fd_is_open(adap_fd) and live_contexts(adapter)
    assert v.close() is None and v.closed and v not in ctx.luns
    assert v.close() is None and v.closed and v not in ctx.luns
    assert ctx.luns == []
    assert ctx.close() is None and ctx.closed and not fd_is_open(adap_fd)
    assert ctx.detach() is None and ctx.closed and not fd_is_open(adap_fd)
    assert live_contexts(adapter) == []
    assert disk.close() is None and disk.closed
    assert adapter.close() is None and adapter_closed(adapter)
    assert adapter.close() is None and adapter_closed(adapter)
    with pytest.raises(CxlFlashError) as e:
        adapter.create_lun(GIB)
    assert e.value.errno == errno.ENODEV


def test_context_close_after_adapter_close(make_adapter):
    a = make_adapter()
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
    lun = lun_status(adapter, wwid)
    assert lun["users"] == 0 and lun["mode"] == "none"

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
    wwid = ctx.disks[0].wwid
    b.write(0, pattern(0, 10))
    with pytest.raises(CxlFlashError) as e:              # needs 2 more, 1 free
        b.set_size(3 * CHUNK)
    assert e.value.errno == errno.ENOSPC
    assert b.size == 10 and b.chunks == 1 and lun_status(adapter, wwid)["chunks_free"] == 1
    assert b.read(0, 10) == pattern(0, 10).tobytes()
    assert b.set_size(3 * CHUNK, best_effort=True) == 2 * CHUNK
    assert b.size == 2 * CHUNK and b.chunks == 2
    assert lun_status(adapter, wwid)["chunks_free"] == 0
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

def test_transfers_larger_than_max_xfer_are_split(adapter, ctx, memory_backing):
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


def test_translate(adapter, ctx, memory_backing):
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


def test_io_after_adapter_close_is_afu_error(make_adapter):
    a = make_adapter()
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


@pytest.mark.driver(recovery_retry_delay=0)
def test_adapter_reset_error_when_recovery_fails(adapter, ctx):
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 1))
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


def test_reset_ends_while_another_thread_waits_in_an_ioctl(adapter, ctx):
    """One thread's ioctl waits in the driver for an AFU reset to end; another
    thread of the same process ends the reset: both return, as with the
    kernel (where each thread's ioctl runs on its own).  A connected
    process must not serialize its requests on one connection: end_reset()
    would queue behind the request that waits for it."""
    adapter.begin_reset()
    errors = []

    def recover():
        try:
            ctx.recover()                             # waits while the AFU resets
        except OSError as e:
            errors.append(e)

    waiter = threading.Thread(target=recover)
    waiter.start()
    time.sleep(0.2)                                   # it is waiting in the driver

    def end_reset():
        try:
            adapter.end_reset()
        except OSError as e:
            errors.append(e)

    ender = threading.Thread(target=end_reset)
    ender.start()
    ender.join(10)
    hung = ender.is_alive()
    if hung:                                          # free both threads
        os.kill(adapter._client().server_pid, signal.SIGKILL)
    ender.join(10)
    waiter.join(10)
    assert not hung, "end_reset() waited behind an ioctl that waited for it"
    assert not waiter.is_alive() and errors == []
    assert adapter.state == "NORMAL"


def test_provisioned_names_the_luns_create_lun_made(adapter):
    """``Adapter.provisioned`` (public: {wwid: {"port", "size", "lun_id",
    "path"}}) answers on a connected adapter as on an embedded one."""
    w = adapter.create_lun(GIB, port=1)
    p = adapter.provisioned
    assert list(p) == [w]
    assert p[w]["port"] == 1 and p[w]["size"] == GIB // BS and p[w]["lun_id"]
    adapter.delete_lun(w)
    assert adapter.provisioned == {}


def test_a_failed_release_leaves_no_way_to_its_chunks(adapter, disk):
    """A RELEASE whose AFU sync fails (EAGAIN) has freed the vLUN's chunks:
    this process's data path must not reach them any more.  (A connected
    client's tables were not updated by the error reply: its write landed in
    a chunk the driver then gave to another context.)"""
    ctx = disk.attach()
    v = ctx.create_virtual(3 * CHUNK)
    adapter.inject_fault("sync", 1)
    with pytest.raises(CxlFlashError) as e:
        v.close()
    assert e.value.errno == errno.EAGAIN
    assert v.chunks == 0
    with pytest.raises(OSError):
        v.write(0, pattern(0, 1, seed=7))
    with disk.attach() as other, other.create_virtual(10) as w:
        assert w.read(0, 1) == bytes(BS)
    ctx.close()


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
