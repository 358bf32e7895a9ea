"""The Pythonic API's asynchronous I/O (futures, asyncio) and list I/O."""
import asyncio
import errno
import os
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

from api_fixtures import (adapter, ctx, disk, vlun,  # noqa: F401 (fixtures)
                          IoctlLog, fd_is_open, live_contexts, phys_bytes)

#: Each test of the ``disk`` fixture runs on a memory LUN and on an RBD image
#: (tests/conftest.py; ``memory_backing``: memory only).
LUN_BACKINGS = ("memory", "rbd")


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
        # The context detached behind the API's back: -1002 (IO_GONE), the
        # AFU's 0x21 as the synchronous read below.
        arg = uapi.dk_cxlflash_detach()
        arg.context_id = ctx.context_id
        cxlflash.ioctl(disk, uapi.DK_CXLFLASH_DETACH, arg)
        res = v.listio([1], [0], [1], bytearray(BS))
        assert res.status[0] == -1002
        assert isinstance(res.error(0), AfuError) and res.error(0).afu_rc == 0x21
        with pytest.raises(AfuError) as e:
            v.read(0, 1)
        assert e.value.afu_rc == 0x21
    with pytest.raises(CxlFlashError) as e:       # its handle went with it
        ctx.close()
    assert e.value.errno == errno.EINVAL and ctx.closed


def test_adapter_close_waits_for_async_io(adapter, vlun):
    futs = [vlun.aread(0, 1) for _ in range(8)]
    adapter.close()
    assert all(f.done() for f in futs)
