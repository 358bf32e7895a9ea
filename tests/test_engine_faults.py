"""Backend faults injected into the engine (``Engine.inject``, issue 9):
a short transfer is continued (the rest resubmitted) and the data is
right; EINTR is retried; EIO and ENOSPC fail exactly the request whose
backend operation got them, and every other request of the batch (or every
other future, or task) is unaffected.  On both engines, through the bare
engine (``raw_listio``) and through list I/O, futures and asyncio.
"""
import asyncio
import errno
import os

import numpy as np
import pytest

import cxlflash
from cxlflash._core.engine import Engine, engine_info

from api_fixtures import adapter, disk, ctx, vlun  # noqa: F401 (fixtures)
from block_pattern import BS, CHUNK, pattern

# Both engines; a build without liburing (CI's debug build) has threads only.
KINDS = ("io_uring", "threads") if engine_info()["liburing"] else ("threads",)


@pytest.fixture(params=KINDS, autouse=True)
def kind(request, monkeypatch):
    monkeypatch.setenv("CXLFLASH_ENGINE", request.param)
    return request.param


@pytest.fixture
def engine(kind):
    e = Engine(kind=kind)
    assert e.kind == kind
    yield e
    e.close()


@pytest.fixture
def memfd():
    fd = os.memfd_create("faults", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    yield fd
    os.close(fd)


def eng(lun):
    e = lun.adapter.engine
    assert e.injected == 0
    return e


# -- the bare engine ------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["write", "read"])
def test_short_transfer_is_continued(engine, memfd, op):
    data = pattern(0, 4, seed=1)
    if op == "read":
        os.pwrite(memfd, data.tobytes(), 8 * BS)
    engine.inject(BS, count=2, op=op)     # 4 KiB of 16 KiB, then 4 KiB of 12 KiB
    assert engine.injected == 1           # one queued fault (of two completions)
    buf = data.copy() if op == "write" else np.zeros(4 * BS, np.uint8)
    assert engine.raw_listio(memfd, [1 if op == "read" else 2], [8 * BS], 4 * BS, buf,
                             qd=1) == 1
    # Both injections were consumed: the rest of the transfer was resubmitted twice.
    assert engine.injected == 0
    assert os.pread(memfd, 4 * BS, 8 * BS) == data.tobytes()
    assert np.array_equal(buf, data)


def test_short_transfers_in_a_deep_batch(engine, memfd):
    offs = np.arange(64, dtype=np.uint64) * 4 * BS
    data = np.concatenate([pattern(4 * i, 4, seed=2) for i in range(64)])
    engine.inject(512, count=10, op="write")    # each smaller than any remainder
    assert engine.raw_listio(memfd, [2] * 64, offs, 4 * BS, data, qd=64) == 64
    assert engine.injected == 0
    assert os.pread(memfd, 256 * BS, 0) == data.tobytes()
    engine.inject(1000, count=10, op="read")        # not a whole sector either
    out = np.zeros_like(data)
    assert engine.raw_listio(memfd, [1] * 64, offs, 4 * BS, out, qd=64) == 64
    assert engine.injected == 0 and np.array_equal(out, data)


def test_eintr_is_retried(engine, memfd):
    data = pattern(0, 1, seed=3)
    engine.inject(-errno.EINTR, count=3)
    assert engine.raw_listio(memfd, [2], [0], BS, data.copy(), qd=1) == 1
    assert engine.injected == 0
    assert os.pread(memfd, BS, 0) == data.tobytes()
    engine.inject(-errno.EINTR, count=40)
    offs = np.arange(100, dtype=np.uint64) * BS
    out = np.zeros(100 * BS, np.uint8)
    assert engine.raw_listio(memfd, [1] * 100, offs, BS, out, qd=64) == 100
    assert engine.injected == 0 and out[:BS].tobytes() == data.tobytes()


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_raw_listio_raises_the_injected_error(engine, memfd, err):
    engine.inject(-err, op="write", skip=2)
    with pytest.raises(OSError) as e:
        engine.raw_listio(memfd, [2] * 5, np.arange(5) * BS, BS,
                          np.zeros(5 * BS, np.uint8), qd=1)
    assert e.value.errno == err
    assert engine.injected == 0 and engine.inflight == 0
    assert engine.raw_listio(memfd, [2], [0], BS, bytearray(BS)) == 1   # still works


def test_injection_filters_by_op(engine, memfd):
    engine.inject(-errno.EIO, op="write")
    out = np.zeros(8 * BS, np.uint8)
    assert engine.raw_listio(memfd, [1] * 8, np.arange(8) * BS, BS, out, qd=8) == 8
    assert engine.injected == 1                     # reads did not take it
    with pytest.raises(OSError) as e:
        engine.raw_listio(memfd, [2], [0], BS, out)
    assert e.value.errno == errno.EIO and engine.injected == 0


# -- list I/O: the error on exactly that request ------------------------------------------


@pytest.mark.parametrize("err, op", [(errno.EIO, "read"), (errno.EIO, "write"),
                                     (errno.ENOSPC, "write")])
def test_listio_error_on_exactly_one_request_at_qd1(vlun, err, op):
    vlun.write(0, pattern(0, 40))
    e = eng(vlun)
    e.inject(-err, op=op, skip=3)
    code = cxlflash.LIST_READ if op == "read" else cxlflash.LIST_WRITE
    buf = np.zeros(40 * BS, np.uint8) if op == "read" else pattern(0, 40, seed=5)
    lbas = np.arange(8) * 5
    res = vlun.listio([code] * 8, lbas, [5] * 8, buf, qd=1)
    assert e.injected == 0
    assert res.status.tolist() == [5, 5, 5, res.status[3], 5, 5, 5, 5]
    assert res.status[3] < 0
    assert sorted(res.errors()) == [3]
    err3 = res.error(3)
    assert isinstance(err3, OSError) and err3.errno == err
    with pytest.raises(OSError) as ex:
        res.check()
    assert ex.value.errno == err
    seed = 0 if op == "read" else 5
    for i in range(8):
        if i == 3:
            continue
        got = buf[i * 5 * BS:(i + 1) * 5 * BS] if op == "read" else \
            np.frombuffer(vlun.read(5 * i, 5), np.uint8)
        assert got.tobytes() == pattern(5 * i, 5, seed=seed).tobytes(), f"request {i}"


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_listio_error_on_exactly_one_request_at_depth(vlun, err):
    vlun.set_size(4000)
    e = eng(vlun)
    e.inject(-err, op="write", skip=17)
    n = 200
    data = pattern(0, 4 * n, seed=6)
    res = vlun.listio([cxlflash.LIST_WRITE] * n, np.arange(n) * 4, [4] * n, data, qd=64)
    assert e.injected == 0
    bad = np.flatnonzero(res.status < 0).tolist()
    assert len(bad) == 1, f"requests {bad} failed for one injected error"
    assert res.error(bad[0]).errno == err
    assert (res.status[res.status >= 0] == 4).all()
    got = np.frombuffer(vlun.read(0, 4 * n), np.uint8).reshape(n, 4 * BS)
    want = data.reshape(n, 4 * BS)
    for i in range(n):
        if i != bad[0]:
            assert np.array_equal(got[i], want[i]), f"request {i} was lost"


def test_error_on_the_second_half_of_a_request_fails_it_whole(ctx):
    """A request crossing a chunk is two backend operations: an EIO on
    the second fails the request, not just half of it."""
    v = ctx.create_virtual(CHUNK)
    ctx.create_virtual(CHUNK)             # takes the next chunk: v's two are apart
    v.set_size(2 * CHUNK)
    p = v.translate([CHUNK - 1, CHUNK])
    assert int(p[1]) != int(p[0]) + 1
    v.write(CHUNK - 2, pattern(CHUNK - 2, 4))
    e = eng(v)
    e.inject(-errno.EIO, op="read", skip=1)
    buf = np.zeros(5 * BS, np.uint8)
    res = v.listio([1, 1], [CHUNK - 2, 10], [4, 1], buf, qd=1)
    assert e.injected == 0
    assert res.status[0] < 0 and res.error(0).errno == errno.EIO
    assert res.status[1] == 1


def test_short_and_eintr_through_listio_and_futures(vlun):
    vlun.set_size(1000)
    e = eng(vlun)
    data = pattern(0, 800, seed=7)
    for result in (512, -errno.EINTR):
        e.inject(result, count=5, op="write")
        res = vlun.listio([2] * 100, np.arange(100) * 8, [8] * 100, data, qd=16)
        assert res.ok and (res.status == 8).all()
        assert e.injected == 0
    for result in (BS, -errno.EINTR):
        e.inject(result, count=4, op="read")
        futs = [vlun.aread(i * 8, 8) for i in range(100)]
        for i, f in enumerate(futs):
            assert f.result(10) == pattern(i * 8, 8, seed=7).tobytes()
        assert e.injected == 0


# -- futures and asyncio ---------------------------------------------------------------------


@pytest.mark.parametrize("err, op", [(errno.EIO, "read"), (errno.ENOSPC, "write")])
def test_future_gets_the_error_others_unaffected(vlun, err, op):
    vlun.write(0, pattern(0, 100, seed=8))
    e = eng(vlun)
    e.inject(-err, op=op, skip=5)
    if op == "read":
        futs = [vlun.aread(i * 4, 4) for i in range(25)]
    else:
        futs = [vlun.awrite(i * 4, pattern(i * 4, 4, seed=9)) for i in range(25)]
    failed = []
    for i, f in enumerate(futs):
        try:
            r = f.result(10)
        except OSError as ex:
            assert ex.errno == err, repr(ex)
            failed.append(i)
            continue
        if op == "read":
            assert r == pattern(i * 4, 4, seed=8).tobytes()
        else:
            assert r == 4
            assert vlun.read(i * 4, 4) == pattern(i * 4, 4, seed=9).tobytes()
    assert len(failed) == 1, f"futures {failed} failed for one injected error"
    assert e.injected == 0
    assert vlun.stats()["num_errors"] >= 1


def test_asyncio_task_gets_the_error_others_unaffected(vlun):
    vlun.write(0, pattern(0, 100, seed=10))
    e = eng(vlun)
    e.inject(-errno.EIO, op="read", skip=7)

    async def main():
        return await asyncio.gather(*(vlun.read_async(i, 1) for i in range(50)),
                                    return_exceptions=True)

    res = asyncio.run(main())
    errs = [i for i, r in enumerate(res) if isinstance(r, BaseException)]
    assert len(errs) == 1, res
    assert isinstance(res[errs[0]], OSError) and res[errs[0]].errno == errno.EIO
    for i, r in enumerate(res):
        if i not in errs:
            assert bytes(r) == pattern(i, 1, seed=10).tobytes()
    assert e.injected == 0


def test_flush_and_zero_errors(vlun):
    vlun.write(0, pattern(0, 10))
    e = eng(vlun)
    e.inject(-errno.EIO, op="flush")
    with pytest.raises(OSError) as ex:
        vlun.aflush().result(10)
    assert ex.value.errno == errno.EIO
    assert vlun.aflush().result(10) is None         # the next one is fine
    e.inject(-errno.EIO, op="zero")
    with pytest.raises(OSError) as ex:
        vlun.awrite_zeroes(0, 2).result(10)
    assert ex.value.errno == errno.EIO
    assert e.injected == 0
    assert vlun.awrite_zeroes(0, 2).result(10) == 2
    assert vlun.read(0, 3) == bytes(2 * BS) + pattern(2, 1).tobytes()


def test_inject_arguments(engine):
    for bad in ("trim", "READ", ""):
        with pytest.raises(ValueError):
            engine.inject(-errno.EIO, op=bad)
    with pytest.raises(TypeError):
        engine.inject(-5.0)
    with pytest.raises(TypeError):
        engine.inject(-errno.EIO, count=1.0)
    assert engine.injected == 0
    engine.inject(-errno.EIO, count=3)
    assert engine.injected == 1
    engine.inject(-errno.EIO, op="read", skip=2)
    assert engine.injected == 2
