"""One mapping from an I/O failure to its exception.

A failed request has one encoding, the status list I/O reports
(``cxlflash._core.errors.IO_*`` or ``-errno``), and one function makes it an
exception (``io_error``), for the synchronous path and ``ListResult`` alike:
the same failure raises the same exception type, errno and AFU code both
ways.
"""
import errno
import os

import pytest

import cxlflash
from cxlflash import uapi
from cxlflash._core import errors as core_errors
from cxlflash.errors import AdapterResetError, AfuError, CxlFlashError

from block_pattern import BS, pattern

from api_fixtures import adapter, ctx, disk  # noqa: F401 (fixtures)


def both_ways(lun, op, lba, nblocks=1):
    """The exception of one request made synchronously, and the status and
    exception of the same request through list I/O."""
    buf = bytearray(nblocks * BS)
    with pytest.raises(OSError) as sync:
        if op == cxlflash.LIST_READ:
            lun.readinto(lba, buf)
        else:
            lun.write(lba, buf)
    res = lun.listio([op], [lba], [nblocks], buf)
    return sync.value, int(res.status[0]), res.error(0)


def same(sync, listed):
    assert type(sync) is type(listed), (sync, listed)
    assert sync.errno == listed.errno
    assert getattr(sync, "afu_rc", None) == getattr(listed, "afu_rc", None)


def test_a_gone_context_is_afu_rc_0x21_both_ways(disk):
    ctx = disk.attach()
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 1))
    arg = uapi.dk_cxlflash_detach()                 # behind the API's back
    arg.context_id = ctx.context_id
    cxlflash.ioctl(disk, uapi.DK_CXLFLASH_DETACH, arg)
    sync, status, listed = both_ways(v, cxlflash.LIST_READ, 0)
    assert status == core_errors.IO_GONE
    assert isinstance(sync, AfuError) and sync.afu_rc == 0x21 and sync.errno == errno.EIO
    same(sync, listed)
    assert "no longer exists" in str(sync) and "no longer exists" in str(listed)
    with pytest.raises(CxlFlashError):
        ctx.close()


def test_beyond_the_logical_size_is_einval_both_ways(ctx):
    v = ctx.create_virtual(10)
    for lba, n in ((10, 1), (9, 2), (2 ** 40, 1)):
        sync, status, listed = both_ways(v, cxlflash.LIST_READ, lba, n)
        assert status == core_errors.IO_BEYOND_SIZE
        assert isinstance(sync, CxlFlashError) and sync.errno == errno.EINVAL
        same(sync, listed)
        assert "logical size of 10" in str(sync) and "logical size of 10" in str(listed)
    empty = ctx.create_virtual(0)
    sync, status, listed = both_ways(empty, cxlflash.LIST_READ, 0)
    assert status == core_errors.IO_BEYOND_SIZE
    same(sync, listed)
    assert "set a size first" in str(sync) and "set a size first" in str(listed)


def test_no_write_permission_is_the_same_afu_error_both_ways(disk):
    with disk.attach(os.O_RDONLY) as ctx:
        v = ctx.create_virtual(10)
        sync, status, listed = both_ways(v, cxlflash.LIST_WRITE, 0)
        assert status == core_errors.IO_AFU_ERROR
        assert isinstance(sync, AfuError) and sync.afu_rc in (0x05, 0x15)
        same(sync, listed)
        assert listed.index == 0 and "(request element 0)" in str(listed)


@pytest.mark.driver(recovery_retry_delay=0)
def test_an_unrecovered_reset_is_adapter_reset_error_both_ways(adapter, ctx):
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 1))
    adapter.inject_fault("backend_context", 100)    # recovery keeps failing
    adapter.reset()
    sync, status, listed = both_ways(v, cxlflash.LIST_READ, 0)
    assert status == core_errors.IO_IN_ERROR
    assert isinstance(sync, AdapterResetError) and sync.errno == errno.EIO
    same(sync, listed)
    adapter.inject_fault("backend_context", 0)


@pytest.mark.parametrize("status, exc, err", [
    (core_errors.IO_AFU_ERROR, AfuError, errno.EIO),
    (core_errors.IO_IN_ERROR, AdapterResetError, errno.EIO),
    (core_errors.IO_GONE, AfuError, errno.EIO),
    (core_errors.IO_BEYOND_SIZE, CxlFlashError, errno.EINVAL),
    (-errno.EIO, CxlFlashError, errno.EIO),
    (-errno.ESHUTDOWN, CxlFlashError, errno.ESHUTDOWN)])
def test_io_error_maps_every_status(status, exc, err):
    e = core_errors.io_error(status, afu_rc=0x13, handle=3, lba=7, nblocks=2, size=5)
    assert type(e) is exc and e.errno == err
    if status == core_errors.IO_GONE:
        assert e.afu_rc == 0x21
    if status == core_errors.IO_AFU_ERROR:
        assert e.afu_rc == 0x13 and "LBA 7" in str(e)
