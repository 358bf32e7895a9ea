"""Asynchronous I/O through the engine (issue 9), from the object API:
futures (aread/areadinto/awrite/aflush/awrite_zeroes/adiscard), asyncio
(read_async/...), list I/O at a queue depth, cancellation, flush,
write-zeroes and discard, O_DIRECT, and fencing (shrink, release, detach,
adapter close, AFU reset) with requests in flight.

Every test runs on both engines (``CXLFLASH_ENGINE``, read when the
adapter makes its engine).  Errors of an asynchronous call must be the
errors of the synchronous one: same class, errno and AFU rc.
"""
import asyncio
import concurrent.futures
import errno
import gc
import os
import threading
import time
import weakref

import numpy as np
import pytest

import cxlflash
from cxlflash._core.engine import engine_info
from cxlflash import uapi
from cxlflash.errors import AdapterResetError, AfuError, CxlFlashError

from api_fixtures import (adapter, disk, ctx, make_adapter, vlun,  # noqa: F401
                          lun_status)
from block_pattern import BS, CHUNK, GIB, pattern
from ceph import rbd_built

# Both engines; a build without liburing (CI's debug build) has threads only.
KINDS = ("io_uring", "threads") if engine_info()["liburing"] else ("threads",)

#: Each test of the ``disk`` fixture runs on a memory LUN and on an RBD image
#: (``memory_backing``: memory only) -- on RBD with one engine kind only, see
#: pytest_generate_tests below.
LUN_BACKINGS = ("memory", "rbd")


def pytest_generate_tests(metafunc):
    """``kind`` (the adapter engine, CXLFLASH_ENGINE): every kind on a
    memory LUN; on an RBD LUN only the first, since its I/O goes through
    the image's own engine (or the daemon's socket) whatever the kind.
    (tests/conftest.py leaves ``lun_backing`` to a module with this hook.)"""
    names = metafunc.fixturenames
    if "lun_backing" in names and "memory_backing" not in names:
        combos = [(k, "memory") for k in KINDS] + ([(KINDS[0], "rbd")] if rbd_built() else [])
        metafunc.parametrize("kind, lun_backing", combos, ids=[f"{k}-{b}" for k, b in combos])
    else:
        metafunc.parametrize("kind", KINDS)


@pytest.fixture(autouse=True)
def _engine_kind(kind, monkeypatch):
    monkeypatch.setenv("CXLFLASH_ENGINE", kind)


# -- helpers ----------------------------------------------------------------------------


def backing_fd(lun):
    rec = lun.adapter._context_record(lun.context.context_id)
    return rec.rht_lun[lun.handle].parent.backing.fd


def phys_offsets(lun, lbas):
    """Byte offsets on the backing store of the given LBAs of ``lun``."""
    if not lun.virtual:
        return [int(l) * lun.block_size for l in lbas]
    return [int(p) * lun.block_size for p in lun.translate(np.asarray(lbas))]


def store_bytes(fd, offsets, bs=BS):
    return b"".join(os.pread(fd, bs, o) for o in offsets)


def outcome(call, timeout=10):
    """What an asynchronous call ends with: its result, or the exception
    it raised -- at the call or from ``.result()``."""
    try:
        fut = call()
    except Exception as e:          # noqa: BLE001
        return e
    assert isinstance(fut, concurrent.futures.Future)
    try:
        return fut.result(timeout)
    except Exception as e:          # noqa: BLE001
        return e


def sync_outcome(call):
    try:
        return call()
    except Exception as e:          # noqa: BLE001
        return e


def aio_outcome(coro_fn):
    async def main():
        return await coro_fn()
    try:
        return asyncio.run(main())
    except Exception as e:          # noqa: BLE001
        return e


def assert_same_error(got, want, what):
    assert isinstance(want, Exception), f"{what}: the synchronous call succeeded ({want!r})"
    assert type(got) is type(want), f"{what}: {got!r}, the synchronous call raised {want!r}"
    if isinstance(want, OSError):
        assert got.errno == want.errno, f"{what}: errno {got.errno}, sync {want.errno}"
    if isinstance(want, AfuError):
        assert got.afu_rc == want.afu_rc, f"{what}: rc {got.afu_rc:#x}, sync {want.afu_rc:#x}"
    assert str(got), f"{what}: no message"


# (future method, sync method, asyncio method, args factory)
CALLS = {
    "aread": ("read", "read_async"),
    "areadinto": ("readinto", "readinto_async"),
    "awrite": ("write", "write_async"),
    "aflush": ("flush", "flush_async"),
    "awrite_zeroes": ("write_zeroes", "write_zeroes_async"),
    "adiscard": ("discard", "discard_async"),
}


def check_all_ways(lun, name, *args, what=""):
    """The future, the asyncio method and the sync method of ``name`` end
    with the same exception."""
    sname, aname = CALLS[name]
    want = sync_outcome(lambda: getattr(lun, sname)(*args))
    got = outcome(lambda: getattr(lun, name)(*args))
    assert_same_error(got, want, f"{what} {name}{args!r:.60}")
    got = aio_outcome(lambda: getattr(lun, aname)(*args))
    assert_same_error(got, want, f"{what} {aname}{args!r:.60}")


def churn():
    """Allocate and fill memory of the sizes the tests free, so a buffer
    freed too early is overwritten."""
    junk = [bytearray(b"\xee" * n) for n in (BS, 4 * BS, 16 * BS) for _ in range(64)]
    del junk
    gc.collect()


# -- the adapter's engine --------------------------------------------------------------------


def test_adapter_engine_follows_env(adapter, kind):
    e = adapter.engine
    assert e.kind == kind and e is adapter.engine and not e.closed


def test_futures_roundtrip_and_stats(vlun):
    futs = [vlun.awrite(i * 3, pattern(i * 3, 3)) for i in range(30)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futs)
    assert [f.result(10) for f in futs] == [3] * 30
    reads = [vlun.aread(i * 3, 3) for i in range(30)]
    for i, f in enumerate(reads):
        got = f.result(10)
        assert isinstance(got, bytearray) and got == pattern(i * 3, 3).tobytes()
    buf = np.zeros(90 * BS, np.uint8)
    assert vlun.areadinto(0, buf).result(10) == 90
    assert buf.tobytes() == vlun.read(0, 90)
    assert vlun.aflush().result(10) is None
    st = vlun.stats()
    assert st["num_awrites"] == 30 and st["num_areads"] == 31
    assert st["num_writes"] >= 30 and st["num_reads"] >= 31 and st["num_errors"] == 0
    no_python_io_threads(vlun.adapter)


def test_many_more_futures_than_the_engine_depth(vlun, adapter):
    """More requests than the engine holds: submission waits, none lost."""
    vlun.set_size(1000)
    vlun.write(0, pattern(0, 1000))
    n = adapter.engine.depth * 4
    lbas = np.random.default_rng(2).integers(0, 1000, n).tolist()
    futs = [vlun.aread(l, 1) for l in lbas]
    for l, f in zip(lbas, futs):
        assert f.result(20) == pattern(l, 1).tobytes()
    assert adapter.engine.inflight == 0


def test_back_pressure_through_the_api(kind, make_adapter):
    """An adapter engine of depth 2 (``Adapter(engine_depth=2)``): 100
    futures, a listio of 100 at qd 64 and 100 asyncio tasks all complete,
    never more than 2 in flight, nothing dropped."""
    a = make_adapter(engine_depth=2)
    with a.open_disk(a.create_lun(GIB)) as d, \
            d.attach() as c, c.create_virtual(1000) as v:
        assert a.engine.depth == 2 and a.engine.kind == kind
        seen = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen.append(a.engine.inflight)

        t = threading.Thread(target=watch)
        t.start()
        try:
            futs = [v.awrite(i * 4, pattern(i * 4, 4, seed=40)) for i in range(100)]
            assert [f.result(10) for f in futs] == [4] * 100
            buf = np.zeros(400 * BS, np.uint8)
            res = v.listio([1] * 100, np.arange(100) * 4, [4] * 100, buf, qd=64)
            assert res.ok and buf.tobytes() == pattern(0, 400, seed=40).tobytes()

            async def main():
                return await asyncio.gather(*(v.read_async(i * 4, 4) for i in range(100)))
            got = asyncio.run(main())
            assert [bytes(g) for g in got] == [pattern(i * 4, 4, seed=40).tobytes()
                                               for i in range(100)]
        finally:
            stop.set()
            t.join()
        assert max(seen) <= 2, f"{max(seen)} requests in flight in an engine of depth 2"
        assert a.engine.inflight == 0


def test_direct_lun_futures(memory_backing, adapter):
    with adapter.open_disk(adapter.create_lun(64 << 20)) as d, d.attach() as c, \
            c.open_direct() as lun:
        futs = [lun.awrite(i * 8, pattern(i * 8, 8, seed=4)) for i in range(64)]
        assert [f.result(10) for f in futs] == [8] * 64
        assert lun.aread(0, 512).result(10) == pattern(0, 512, seed=4).tobytes()
        assert store_bytes(backing_fd(lun), [100 * BS]) == pattern(100, 1, seed=4).tobytes()


# -- errors: the sync call's, raised at the call for bad arguments ------------------------------


def test_bad_arguments_raise_at_the_call(vlun):
    buf = bytearray(BS)
    for call, exc in [
            (lambda: vlun.aread(0.0, 1), TypeError),
            (lambda: vlun.aread(0, 1.5), TypeError),
            (lambda: vlun.aread(None, 1), TypeError),
            (lambda: vlun.areadinto("0", buf), TypeError),
            (lambda: vlun.awrite(1.0, bytes(BS)), TypeError),
            (lambda: vlun.awrite_zeroes(0, 1.0), TypeError),
            (lambda: vlun.adiscard(b"", 1), TypeError),
            (lambda: vlun.aread(-1, 1), CxlFlashError),
            (lambda: vlun.aread(0, -1), CxlFlashError),
            (lambda: vlun.aread(2 ** 64, 1), CxlFlashError),
            (lambda: vlun.awrite_zeroes(0, 2 ** 64), CxlFlashError),
            (lambda: vlun.adiscard(-5, 1), CxlFlashError)]:
        with pytest.raises(exc) as e:
            call()                               # no .result(): at the call
        if exc is CxlFlashError:
            assert e.value.errno == errno.EINVAL
    # The asyncio methods raise them from the await (no request is made).
    with pytest.raises(TypeError):
        asyncio.run(vlun.read_async(0.5, 1))
    with pytest.raises(CxlFlashError):
        asyncio.run(vlun.discard_async(0, 2 ** 64))


@pytest.mark.parametrize("name, args", [
    ("aread", (100, 1)), ("aread", (99, 2)), ("aread", (2 ** 64 - 1, 1)),
    ("aread", (0, 2 ** 64 - 1)), ("areadinto", (99, bytearray(2 * BS))),
    ("areadinto", (0, bytearray(BS + 1))), ("areadinto", (0, bytes(BS))),
    ("awrite", (99, bytes(2 * BS))), ("awrite", (0, bytes(7))),
    ("awrite_zeroes", (99, 2)), ("awrite_zeroes", (100, 0 + 1)),
    ("adiscard", (50, 51)), ("adiscard", (2 ** 63, 1))])
def test_range_and_buffer_errors_match_sync(vlun, name, args):
    check_all_ways(vlun, name, *args)
    assert vlun.read(0, 100) == bytes(100 * BS)         # nothing moved


def test_access_errors_match_sync(adapter, disk):
    with disk.attach(os.O_RDONLY) as ro, ro.create_virtual(10) as v:
        for name, args in [("awrite", (0, bytes(BS))), ("awrite_zeroes", (0, 1)),
                           ("adiscard", (0, 1))]:
            check_all_ways(v, name, *args, what="read-only")
        assert v.aread(0, 1).result(10) == bytes(BS)
    with disk.attach(os.O_WRONLY) as wo, wo.create_virtual(10) as v:
        for name, args in [("aread", (0, 1)), ("areadinto", (0, bytearray(BS)))]:
            check_all_ways(v, name, *args, what="write-only")
        assert v.awrite(0, bytes(BS)).result(10) == 1


def test_released_handle_errors_match_sync(adapter, ctx, disk):
    v = ctx.create_virtual(10)
    arg = uapi.dk_cxlflash_release()
    arg.context_id = ctx.context_id
    arg.rsrc_handle = v.handle
    cxlflash.ioctl(disk, uapi.DK_CXLFLASH_RELEASE, arg)
    for name, args in [("aread", (0, 1)), ("awrite", (0, bytes(BS))),
                       ("awrite_zeroes", (0, 1)), ("adiscard", (0, 1))]:
        check_all_ways(v, name, *args, what="released")
    e = outcome(lambda: v.aread(0, 1))
    assert isinstance(e, AfuError) and e.afu_rc == 0x01
    with pytest.raises(CxlFlashError):          # already released
        v.close()


@pytest.mark.driver(recovery_retry_delay=0)
def test_reset_without_recovery_errors_match_sync(adapter, ctx):
    v = ctx.create_virtual(10)
    adapter.inject_fault("backend_context", 1000)
    adapter.reset()
    for name, args in [("aread", (0, 1)), ("areadinto", (0, bytearray(BS))),
                       ("awrite", (0, bytes(BS))), ("awrite_zeroes", (0, 1)),
                       ("adiscard", (0, 1))]:
        check_all_ways(v, name, *args, what="after a reset")
    assert isinstance(outcome(lambda: v.aread(0, 1)), AdapterResetError)
    adapter.inject_fault("backend_context", 0)
    assert v.aread(0, 1).result(10) == bytes(BS)        # it heals


def test_closed_lun_and_adapter_errors_match_sync(adapter, ctx):
    v = ctx.create_virtual(10)
    v.close()
    for name in CALLS:
        args = {"aread": (0, 1), "areadinto": (0, bytearray(BS)),
                "awrite": (0, bytes(BS)), "aflush": (),
                "awrite_zeroes": (0, 1), "adiscard": (0, 1)}[name]
        with pytest.raises(ValueError):
            getattr(v, name)(*args)                # at the call
        check_all_ways(v, name, *args, what="closed vLUN")
    v2 = ctx.create_virtual(10)
    adapter.close()
    for name, args in [("aread", (0, 1)), ("awrite", (0, bytes(BS))),
                       ("awrite_zeroes", (0, 1)), ("adiscard", (0, 1))]:
        check_all_ways(v2, name, *args, what="closed adapter")
    e = outcome(lambda: v2.aread(0, 1))
    assert isinstance(e, AfuError) and e.afu_rc == 0x21
    # List I/O reports it per request, as before the engine (the context is gone).
    res = v2.listio([1, 1], [0, 1], [1, 1], bytearray(2 * BS), qd=2)
    assert not res.ok and sorted(res.errors()) == [0, 1]
    assert all(isinstance(x, OSError) for x in res.errors().values())


# -- asyncio ----------------------------------------------------------------------------------


class NoExecutor(concurrent.futures.ThreadPoolExecutor):
    def submit(self, *a, **k):
        raise AssertionError("an asyncio I/O method used the loop's executor")


def no_python_io_threads(adapter):
    """No executor hop: no thread pool behind the asynchronous calls."""
    names = [t.name for t in threading.enumerate() if t.name.startswith("cxlflash-io")]
    assert not names, f"asynchronous I/O ran in Python worker threads: {names}"
    assert getattr(adapter, "_executor", None) is None


def test_asyncio_many_tasks(vlun, adapter):
    vlun.set_size(2000)

    async def main():
        asyncio.get_running_loop().set_default_executor(NoExecutor())
        w = await asyncio.gather(*(vlun.write_async(i * 4, pattern(i * 4, 4, seed=6))
                                   for i in range(500)))
        await vlun.flush_async()
        r = await asyncio.gather(*(vlun.read_async(i * 4, 4) for i in range(500)))
        buf = bytearray(64 * BS)
        n = await vlun.readinto_async(64, buf)
        z = await vlun.write_zeroes_async(8, 4)
        d = await vlun.discard_async(16, 8)
        return w, r, n, buf, z, d

    w, r, n, buf, z, d = asyncio.run(main())
    assert w == [4] * 500
    assert all(bytes(g) == pattern(i * 4, 4, seed=6).tobytes() for i, g in enumerate(r))
    assert n == 64 and bytes(buf) == pattern(64, 64, seed=6).tobytes()
    assert z == 4 and d == 8
    assert vlun.read(8, 4) == bytes(4 * BS) and vlun.read(16, 8) == bytes(8 * BS)
    assert vlun.read(12, 4) == pattern(12, 4, seed=6).tobytes()
    assert vlun.read(24, 1) == pattern(24, 1, seed=6).tobytes()
    st = vlun.stats()
    assert st["num_awrites"] >= 500 and st["num_areads"] >= 501
    assert adapter.engine.inflight == 0
    no_python_io_threads(adapter)


def test_asyncio_on_several_loops_in_turn(vlun):
    """An engine outlives the loops that used it (each asyncio.run is a new
    loop with its own eventfd reader)."""
    for i in range(3):
        async def main(i=i):
            await vlun.write_async(i, pattern(i, 1, seed=i))
            return await vlun.read_async(i, 1)
        assert asyncio.run(main()) == pattern(i, 1, seed=i).tobytes()


# -- cancellation --------------------------------------------------------------------------------


def test_future_cancel_is_refused_and_the_request_runs(vlun):
    vlun.set_size(1000)
    futs = []
    for i in range(200):
        f = vlun.awrite(i * 4, bytearray(pattern(i * 4, 4, seed=8).tobytes()))
        assert f.cancel() is False             # submitted: it runs
        futs.append(f)
    churn()                                    # the temporaries are gone
    assert [f.result(10) for f in futs] == [4] * 200
    assert all(not f.cancelled() for f in futs)
    assert vlun.read(0, 800) == pattern(0, 800, seed=8).tobytes()
    # Reads: the buffer is filled although the future was "cancelled".
    bufs = [np.zeros(4 * BS, np.uint8) for _ in range(50)]
    rf = [vlun.areadinto(i * 4, b) for i, b in enumerate(bufs)]
    assert all(f.cancel() is False for f in rf)
    assert [f.result(10) for f in rf] == [4] * 50
    for i, b in enumerate(bufs):
        assert b.tobytes() == pattern(i * 4, 4, seed=8).tobytes()
    f = vlun.aread(0, 4)
    assert f.cancel() is False and f.result(10) == pattern(0, 4, seed=8).tobytes()


def test_a_dropped_buffer_is_kept_until_its_request_completes(vlun):
    """The engine holds the buffer while the request runs and lets it go
    afterwards (no leak)."""
    vlun.set_size(1000)
    refs = []
    futs = []
    for i in range(100):
        buf = np.zeros(4 * BS, np.uint8)
        refs.append(weakref.ref(buf))
        futs.append(vlun.areadinto(i * 4, buf))
        del buf
    for f in futs:
        assert f.result(10) == 4
    del futs, f
    gc.collect()
    assert all(r() is None for r in refs), "buffers are kept after their requests"
    # The buffer export ends with the request: a bytearray can be resized
    # again (BufferError while a request holds it).
    b = bytearray(4 * BS)
    assert vlun.areadinto(0, b).result(10) == 4
    b.extend(b"x")
    w = bytearray(pattern(0, 4, seed=44).tobytes())
    assert vlun.awrite(0, w).result(10) == 4
    w.extend(b"x")
    assert asyncio.run(vlun.readinto_async(0, b := bytearray(4 * BS))) == 4
    b.extend(b"x")
    res = vlun.listio([1], [0], [4], b2 := bytearray(4 * BS), qd=4)
    assert res.ok
    b2.extend(b"x")


_CANCELLED_TASKS = r"""
import asyncio, faulthandler, gc, sys, time
faulthandler.dump_traceback_later(10, exit=True)     # a hang: the stacks, then exit
import numpy as np
import cxlflash
sys.path.insert(0, TESTS)
from block_pattern import BS, pattern
a = cxlflash.Adapter(); d = a.open_disk(a.create_lun(1 << 30)); c = d.attach()
for rnd in range(12):                   # each round: a new loop, a new vLUN
    v = c.create_virtual(1000)

    async def main():
        tasks = [asyncio.ensure_future(v.write_async(
            i * 4, bytearray(pattern(i * 4, 4, seed=rnd).tobytes()))) for i in range(200)]
        await asyncio.sleep(0)          # every task submitted its request
        for t in tasks:
            t.cancel()
        res = await asyncio.gather(*tasks, return_exceptions=True)
        junk = [bytearray(b"\xee" * 4 * BS) for _ in range(400)]
        del junk
        gc.collect()
        rbuf = np.zeros(4 * BS, np.uint8)
        t = asyncio.ensure_future(v.readinto_async(0, rbuf))
        await asyncio.sleep(0)
        t.cancel()
        try:
            await t
        except asyncio.CancelledError:
            pass
        return res, rbuf

    res, rbuf = asyncio.run(main())    # the loop ends with requests in flight
    assert all(r == 4 or isinstance(r, asyncio.CancelledError) for r in res), res
    if rnd % 2:
        v.close()                      # at once: completes them first, never hangs
        continue
    v.flush()                          # after every write submitted before it
    deadline = time.monotonic() + 10
    while a.engine.inflight and time.monotonic() < deadline:
        time.sleep(0.001)
    assert a.engine.inflight == 0
    assert v.read(0, 800) == pattern(0, 800, seed=rnd).tobytes(), "a write was lost"
    assert rbuf.tobytes() == pattern(0, 4, seed=rnd).tobytes(), "the read did not land"
    v.close()                          # its requests' loop is gone: must not hang
a.close()
print("cancelled-ok")
"""


def test_cancelled_asyncio_task_leaves_the_request_running(kind):
    """Cancelled tasks' requests run to completion (buffers kept alive),
    then the vLUN closes although the loop they were submitted from has
    ended.  In a subprocess: a hang fails the test instead of the run."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env = dict(os.environ, PYTHONPATH=root)
    try:
        p = subprocess.run([sys.executable, "-X", "faulthandler", "-c",
                            f"TESTS = {here!r}\n" + _CANCELLED_TASKS],
                           cwd=root, env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"hung (closing the vLUN?):\n{e.stdout}\n{e.stderr}") from None
    assert p.returncode == 0 and "cancelled-ok" in p.stdout, p.stdout + p.stderr


# -- list I/O at a queue depth -----------------------------------------------------------------


def _listio_batch():
    """A mixed batch over distinct blocks (so order does not matter) with
    failing requests at known places."""
    rng = np.random.default_rng(11)
    n = 300
    lbas = (rng.permutation(700)[:n] * 4).astype(np.int64)
    nb = rng.integers(1, 5, n)
    ops = rng.choice([cxlflash.LIST_READ, cxlflash.LIST_WRITE, cxlflash.LIST_UNMAP], n)
    lbas[7] = 2990                      # crosses the end (size 2992)
    nb[7] = 4
    ops[13] = 9                         # not a request type
    offs = np.arange(n) * 4 * BS
    buf = np.concatenate([pattern(int(l), 4, seed=12) for l in lbas])
    return ops, lbas, nb, buf, offs


@pytest.mark.parametrize("qd", [8, 64, 65536])
def test_listio_queue_depth_equals_serial(vlun, qd):
    vlun.set_size(2992)
    init = pattern(0, 2992, seed=1)

    def run(q):
        vlun.write(0, init)
        ops, lbas, nb, buf, offs = _listio_batch()
        res = vlun.listio(ops, lbas, nb, buf, offsets=offs, qd=q)
        return res, buf, vlun.read(0, 2992)

    ref, ref_buf, ref_img = run(1)
    assert int((ref.status < 0).sum()) == 2 and ref.status[7] < 0 and ref.status[13] < 0
    assert ref.error(7).errno == errno.EINVAL and ref.error(13).errno == errno.EINVAL
    # qd=1 against the model: distinct blocks, so reads see the initial data.
    ops, lbas, nb, buf0, offs = _listio_batch()
    img = init.reshape(2992, BS).copy()
    want_buf = buf0.reshape(-1, BS).copy()
    for i, (o, l, n) in enumerate(zip(ops.tolist(), lbas.tolist(), nb.tolist())):
        if i in (7, 13):
            continue
        assert ref.status[i] == n
        slot = 4 * i
        if o == cxlflash.LIST_READ:
            want_buf[slot:slot + n] = img[l:l + n]
        elif o == cxlflash.LIST_WRITE:
            img[l:l + n] = want_buf[slot:slot + n]
        else:
            img[l:l + n] = 0
    assert np.array_equal(ref_buf.reshape(-1, BS), want_buf)
    assert ref_img == img.tobytes()
    res, buf, img = run(qd)
    assert res.status.tolist() == ref.status.tolist()
    assert np.array_equal(buf, ref_buf)
    assert img == ref_img
    assert sorted(res.errors()) == [7, 13]


def test_listio_default_depth_and_latencies(vlun, adapter):
    vlun.write(0, pattern(0, 100))
    lat = np.zeros(100, np.int64)
    buf = bytearray(100 * BS)
    res = vlun.listio([1] * 100, np.arange(100)[::-1], [1] * 100, buf, lat_ns=lat)
    assert res.ok and (lat > 0).all()
    assert bytes(buf) == np.concatenate([pattern(l, 1) for l in range(99, -1, -1)]).tobytes()
    assert adapter.engine.inflight == 0


@pytest.mark.parametrize("qd, exc", [(0, CxlFlashError), (65537, CxlFlashError),
                                     (-1, CxlFlashError), (2 ** 64, CxlFlashError),
                                     (1.0, TypeError), ("8", TypeError), (None, TypeError)])
def test_listio_queue_depth_bounds(vlun, qd, exc):
    vlun.write(0, pattern(0, 4))
    buf = bytearray(4 * BS)
    with pytest.raises(exc) as e:
        vlun.listio([1, 2], [0, 2], [2, 2], buf, qd=qd)
    if exc is CxlFlashError:
        assert e.value.errno == errno.EINVAL and "qd" in str(e.value)
    else:
        assert "qd" in str(e.value)
    assert bytes(buf) == bytes(4 * BS)                 # nothing moved
    assert vlun.read(0, 4) == pattern(0, 4).tobytes()


# -- flush, write-zeroes, discard ------------------------------------------------------------


def test_flush_covers_the_writes_before_it(memory_backing, vlun):
    vlun.set_size(1000)
    futs = [vlun.awrite(i * 4, pattern(i * 4, 4, seed=13)) for i in range(250)]
    assert vlun.flush() is None
    assert all(f.done() for f in futs), "flush() returned before the writes it covers"
    assert [f.result(0) for f in futs] == [4] * 250
    fd = backing_fd(vlun)
    offs = phys_offsets(vlun, range(1000))
    assert store_bytes(fd, offs) == pattern(0, 1000, seed=13).tobytes()
    futs = [vlun.awrite(i * 4, pattern(i * 4, 4, seed=14)) for i in range(250)]
    fl = vlun.aflush()
    assert fl.result(10) is None
    assert all(f.done() for f in futs), "aflush() completed before the writes it covers"
    assert store_bytes(fd, offs) == pattern(0, 1000, seed=14).tobytes()


@pytest.mark.parametrize("where", ["memory", "file"])
def test_write_zeroes_and_discard_read_back_zeros(memory_backing, where, tmp_path, make_adapter):
    a = make_adapter(directory=None if where == "memory" else str(tmp_path))
    with a.open_disk(a.create_lun(GIB)) as d, d.attach() as c, \
            c.create_virtual(2 * CHUNK) as v:
        lo = CHUNK - 8                                  # crosses a chunk
        v.write(lo, pattern(lo, 32, seed=15))
        assert v.write_zeroes(lo + 1, 3) == 3
        assert v.discard(lo + 5, 2) == 2
        assert v.awrite_zeroes(lo + 7, 4).result(10) == 4          # across the chunk
        assert v.adiscard(lo + 12, 3).result(10) == 3
        assert asyncio.run(v.write_zeroes_async(lo + 16, 2)) == 2
        assert asyncio.run(v.discard_async(lo + 20, 2)) == 2
        got = np.frombuffer(v.read(lo, 32), np.uint8).reshape(32, BS)
        want = pattern(lo, 32, seed=15).reshape(32, BS).copy()
        for a_, n in ((1, 3), (5, 2), (7, 4), (12, 3), (16, 2), (20, 2)):
            want[a_:a_ + n] = 0
        assert np.array_equal(got, want)
        fd = backing_fd(v)
        assert store_bytes(fd, phys_offsets(v, range(lo, lo + 32))) == want.tobytes()
        assert v.write_zeroes(0, 0) == 0 and v.discard(0, 0) == 0


# -- O_DIRECT -------------------------------------------------------------------------------


def test_o_direct_file_with_aligned_buffers(tmp_path, kind):
    path = str(tmp_path / "direct.img")
    with cxlflash.Adapter() as a:
        wwid = a.add_lun(path, size=GIB, direct=True)
        assert a.driver.gluns[wwid].backing.direct
        with a.open_disk(wwid) as d, d.attach() as c, \
                c.create_virtual(CHUNK + 64, scrub=False) as v:
            assert a.engine.kind == kind
            n = 64
            lbas = np.arange(n) * 2 + CHUNK - 64          # crosses the chunk
            wbuf = cxlflash.aligned_buffer(n * BS)
            wbuf[:] = np.concatenate([pattern(int(l), 1, seed=16) for l in lbas])
            res = v.listio([cxlflash.LIST_WRITE] * n, lbas, [1] * n, wbuf, qd=64)
            assert res.ok, res.errors()
            rbuf = cxlflash.aligned_buffer(n * BS)
            res = v.listio([cxlflash.LIST_READ] * n, lbas, [1] * n, rbuf, qd=64)
            assert res.ok and np.array_equal(rbuf, wbuf)
            # Futures, aligned buffers.
            bufs = [cxlflash.aligned_buffer(4 * BS) for _ in range(16)]
            for i, b in enumerate(bufs):
                b[:] = pattern(i * 4, 4, seed=17)
            assert [f.result(10) for f in [v.awrite(i * 4, b)
                                           for i, b in enumerate(bufs)]] == [4] * 16
            assert v.aflush().result(10) is None
            outs = [cxlflash.aligned_buffer(4 * BS) for _ in range(16)]
            assert [f.result(10) for f in [v.areadinto(i * 4, b)
                                           for i, b in enumerate(outs)]] == [4] * 16
            for i, b in enumerate(outs):
                assert np.array_equal(b, bufs[i])
            assert v.awrite_zeroes(0, 2).result(10) == 2
            out = cxlflash.aligned_buffer(4 * BS)
            assert v.areadinto(0, out).result(10) == 4
            assert not out[:2 * BS].any() and np.array_equal(out[2 * BS:], bufs[0][2 * BS:])
            offs = phys_offsets(v, [int(lbas[5]), 6])
            # A misaligned buffer: whatever the sync call does (EINVAL saying
            # to use aligned_buffer, or the data), the async calls do too.
            mis = cxlflash.aligned_buffer(2 * BS)[1:1 + BS]
            want = sync_outcome(lambda: v.readinto(8, mis))
            got = outcome(lambda: v.areadinto(8, mis))
            if isinstance(want, Exception):
                assert_same_error(got, want, "misaligned areadinto")
                assert "aligned_buffer" in str(got)
                res = v.listio([1], [8], [1], mis, qd=4)
                assert res.error(0).errno == want.errno
            else:
                assert got == want == 1 and np.array_equal(mis, bufs[2][:BS])
    with open(path, "rb") as f:                          # the data is in the file
        f.seek(offs[0])
        assert f.read(BS) == pattern(int(lbas[5]), 1, seed=16).tobytes()
        f.seek(offs[1])
        assert f.read(BS) == pattern(6, 1, seed=17).tobytes()


# -- fencing: what takes a resource away waits for the requests in flight -------------------


N_FLIGHT = 256
NB = 16          # 64 KiB writes: many are still in flight when the fence comes


def _flood(v, base, seed):
    """N_FLIGHT writes of NB blocks from ``base``; the caller keeps no
    reference to their buffers (the engine must)."""
    data = [bytearray(pattern(base + NB * i, NB, seed=seed).tobytes())
            for i in range(N_FLIGHT)]
    futs = [v.awrite(base + NB * i, b) for i, b in enumerate(data)]
    del data
    return futs


def _ended(futs):
    """Every future is done; returns (successes, exceptions)."""
    assert all(f.done() for f in futs), \
        f"{sum(not f.done() for f in futs)} requests still in flight after the fence"
    ok = [f for f in futs if f.exception(0) is None]
    bad = [f.exception(0) for f in futs if f.exception(0) is not None]
    for f in ok:
        assert f.result(0) == NB
    return ok, bad


def test_shrink_waits_for_requests_in_flight(memory_backing, ctx, adapter):
    v = ctx.create_virtual(2 * CHUNK)                  # scrubbing
    fd = backing_fd(v)
    offs = phys_offsets(v, range(CHUNK, CHUNK + NB * N_FLIGHT))
    futs = _flood(v, CHUNK, seed=20)
    assert v.set_size(CHUNK, release=True) == CHUNK
    ok, bad = _ended(futs)
    for e in bad:          # refused: beyond the new size, or the chunk has gone
        assert isinstance(e, OSError) and e.errno in (errno.EINVAL, errno.EIO), repr(e)
    # The freed chunk was scrubbed after the last write: zero, and stays so.
    assert store_bytes(fd, offs) == bytes(len(offs) * BS)
    time.sleep(0.05)
    assert store_bytes(fd, offs) == bytes(len(offs) * BS)
    check_all_ways(v, "aread", CHUNK, 1, what="after the shrink")
    check_all_ways(v, "awrite", CHUNK, bytes(BS), what="after the shrink")
    assert adapter.engine.inflight == 0


@pytest.mark.parametrize("how", ["lun close", "context close", "ioctl detach"])
def test_release_and_detach_wait_for_requests_in_flight(memory_backing, adapter, disk, how):
    c = disk.attach()
    v = c.create_virtual(CHUNK)                        # scrubbing
    fd = backing_fd(v)
    offs = phys_offsets(v, range(NB * N_FLIGHT))
    futs = _flood(v, 0, seed=21)
    if how == "lun close":
        v.close()
    elif how == "context close":
        c.close()
    else:                        # DETACH behind the object's back
        arg = uapi.dk_cxlflash_detach()
        arg.context_id = c.context_id
        cxlflash.ioctl(disk, uapi.DK_CXLFLASH_DETACH, arg)
    ok, bad = _ended(futs)
    for e in bad:
        assert isinstance(e, (OSError, ValueError)), repr(e)
    assert store_bytes(fd, offs) == bytes(len(offs) * BS)   # scrubbed after them
    time.sleep(0.05)
    assert store_bytes(fd, offs) == bytes(len(offs) * BS)
    args = {"aread": (0, 1), "areadinto": (0, bytearray(BS)), "awrite": (0, bytes(BS)),
            "aflush": (), "awrite_zeroes": (0, 1), "adiscard": (0, 1)}
    if how == "ioctl detach":
        # The object does not know: requests fail as the sync ones do (0x21).
        for name in ("aread", "awrite", "awrite_zeroes", "adiscard"):
            check_all_ways(v, name, *args[name], what="detached")
        e = outcome(lambda: v.aread(0, 1))
        assert isinstance(e, AfuError) and e.afu_rc == 0x21
        with pytest.raises(CxlFlashError):
            c.close()
    else:
        assert v.closed
        for name in args:
            with pytest.raises(ValueError):
                getattr(v, name)(*args[name])
        with pytest.raises(ValueError):
            asyncio.run(v.read_async(0, 1))
        with pytest.raises(ValueError):
            v.listio([1], [0], [1], bytearray(BS), qd=8)
        c.close()
    assert adapter.engine.inflight == 0


def test_adapter_close_waits_for_requests_in_flight(memory_backing, tmp_path, make_adapter):
    a = make_adapter(directory=str(tmp_path))
    disk = a.open_disk(a.create_lun(GIB))
    path = lun_status(a, disk.wwid)["path"]
    c = disk.attach()
    v = c.create_virtual(CHUNK, scrub=False)
    offs = phys_offsets(v, range(NB * N_FLIGHT))
    futs = _flood(v, 0, seed=22)
    reads = [v.aread(i, 1) for i in range(N_FLIGHT)]
    eng = a.engine
    a.close()
    ok, bad = _ended(futs)
    assert all(f.done() for f in reads)
    for e in bad:
        assert isinstance(e, (AfuError, OSError)), repr(e)
    fd = os.open(path, os.O_RDONLY)
    try:
        first = store_bytes(fd, offs)
        time.sleep(0.05)
        assert store_bytes(fd, offs) == first, "a write landed after Adapter.close()"
        # Each write that succeeded is in the file.
        for i, f in enumerate(futs):
            if f.exception(0) is None:
                assert first[NB * i * BS:NB * (i + 1) * BS] == \
                    pattern(NB * i, NB, seed=22).tobytes()
    finally:
        os.close(fd)
    e = outcome(lambda: v.aread(0, 1))
    assert isinstance(e, AfuError) and e.afu_rc == 0x21
    e = outcome(lambda: v.awrite(0, bytes(BS)))
    assert isinstance(e, AfuError) and e.afu_rc == 0x21
    assert eng.inflight == 0
    c.close()


def test_reset_with_recovery_redrives_requests_in_flight(adapter, ctx):
    v = ctx.create_virtual(CHUNK)
    futs = _flood(v, 0, seed=23)
    adapter.reset()
    for f in futs:
        assert f.result(20) == NB                  # recovered and re-driven
    assert v.read(0, NB * N_FLIGHT) == pattern(0, NB * N_FLIGHT, seed=23).tobytes()
    assert ctx.resets == 1
    # Later asynchronous requests recover as synchronous ones do.
    adapter.reset()
    assert v.aread(0, 4).result(10) == pattern(0, 4, seed=23).tobytes()
    adapter.reset()
    assert asyncio.run(v.read_async(4, 4)) == pattern(4, 4, seed=23).tobytes()
    adapter.reset()
    res = v.listio([1] * 8, np.arange(8) * 4, [4] * 8, bytearray(32 * BS), qd=8)
    assert res.ok
    assert ctx.resets == 4 and v.stats()["num_errors"] == 0


@pytest.mark.driver(recovery_retry_delay=0)
def test_reset_without_recovery_fails_requests_in_flight(adapter, ctx):
    v = ctx.create_virtual(CHUNK)
    adapter.inject_fault("backend_context", 10 ** 6)
    futs = _flood(v, 0, seed=24)
    adapter.reset()
    for f in futs:
        try:
            assert f.result(20) == NB               # it ended before the reset
        except AdapterResetError as e:
            assert e.errno == errno.EIO
    ok = [i for i, f in enumerate(futs) if f.exception(0) is None]
    check_all_ways(v, "aread", 0, 1, what="after the reset")
    adapter.inject_fault("backend_context", 0)
    for i in ok:
        assert v.read(NB * i, NB) == pattern(NB * i, NB, seed=24).tobytes()
    assert adapter.engine.inflight == 0


# -- fork ---------------------------------------------------------------------------------------


def test_forked_child_does_async_io_through_its_own_context(adapter, ctx):
    """The parent's engine (its threads or its ring) does not survive fork:
    a child's asynchronous requests fail like its synchronous ones before
    clone_after_fork, and work after it; the parent's engine goes on."""
    from forking import in_child
    v = ctx.create_virtual(100)
    v.write(0, pattern(0, 100, seed=30))
    assert v.aread(0, 1).result(10) == pattern(0, 1, seed=30).tobytes()   # engine made

    def child():
        want = sync_outcome(lambda: v.read(0, 1))
        got = outcome(lambda: v.aread(0, 1))
        if not isinstance(want, AfuError) or type(got) is not type(want) or \
                got.afu_rc != want.afu_rc:
            return f"before the clone: sync {want!r}, async {got!r}"
        ctx.clone_after_fork()
        if v.aread(3, 2).result(10) != pattern(3, 2, seed=30).tobytes():
            return "aread after the clone: wrong data"
        if v.awrite(50, pattern(50, 2, seed=31)).result(10) != 2:
            return "awrite after the clone"
        buf = bytearray(4 * BS)
        res = v.listio([1, 1], [50, 0], [2, 2], buf, qd=8)
        if not res.ok or bytes(buf) != (pattern(50, 2, seed=31).tobytes() +
                                        pattern(0, 2, seed=30).tobytes()):
            return f"listio after the clone: {res.status.tolist()}"
        if asyncio.run(v.read_async(1, 1)) != pattern(1, 1, seed=30).tobytes():
            return "read_async after the clone"
        v.flush()
        return "ok"

    assert in_child(child) == "ok"
    assert v.read(50, 2) == pattern(50, 2, seed=31).tobytes()    # shared data
    futs = [v.aread(i, 1) for i in range(100)]
    assert [bytes(f.result(10)) for f in futs] == \
        [pattern(i, 1, seed=30).tobytes() if i not in (50, 51) else
         pattern(i, 1, seed=31).tobytes() for i in range(100)]


# -- several submitters at once ------------------------------------------------------------------


def test_done_callbacks_wait_and_as_completed(vlun):
    """Engine futures work with the concurrent.futures toolbox without
    anyone calling result(): callbacks fire, wait() and as_completed() end."""
    vlun.write(0, pattern(0, 100, seed=41))
    hits = []
    futs = [vlun.aread(i, 1) for i in range(100)]
    for f in futs:
        f.add_done_callback(lambda f: hits.append(f))
    done, not_done = concurrent.futures.wait(futs, timeout=10)
    assert len(done) == 100 and not not_done
    deadline = time.monotonic() + 5
    while len(hits) < 100 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(hits) == 100
    futs = [vlun.awrite(i, pattern(i, 1, seed=42)) for i in range(100)]
    assert sorted(f.result(0) for f in concurrent.futures.as_completed(futs, timeout=10)) \
        == [1] * 100
    assert vlun.read(0, 100) == pattern(0, 100, seed=42).tobytes()


def test_asyncio_loops_in_several_threads_at_once(vlun):
    """Four threads, each with its own event loop (its own eventfd bridge),
    each awaiting 100 requests on one vLUN; plus futures from a fifth."""
    vlun.set_size(4000)
    errors = []

    def loop_thread(k):
        async def main():
            await asyncio.gather(*(vlun.write_async(k * 1000 + i * 4,
                                                    pattern(k * 1000 + i * 4, 4, seed=k))
                                   for i in range(100)))
            got = await asyncio.gather(*(vlun.read_async(k * 1000 + i * 4, 4)
                                         for i in range(100)))
            return got
        try:
            got = asyncio.run(main())
            for i, g in enumerate(got):
                assert bytes(g) == pattern(k * 1000 + i * 4, 4, seed=k).tobytes(), (k, i)
        except BaseException as e:      # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=loop_thread, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    futs = [vlun.aread(3999, 1) for _ in range(200)]
    for t in ts:
        t.join(30)
    assert not any(t.is_alive() for t in ts), "an event loop never got its completions"
    assert not errors, errors
    assert all(f.result(10) == bytes(BS) for f in futs)


def test_submitters_race_resets_and_resizes(adapter, ctx):
    """Threads keep futures and list I/O in flight while the owner resets
    the AFU and grows and shrinks the vLUN: every request ends (data, or
    a clean error), nothing hangs, and the data written last is there."""
    v = ctx.create_virtual(2 * CHUNK)
    stop = time.monotonic() + 0.8
    errors = []
    bad = []

    def submitter(k):
        try:
            n = 0
            while time.monotonic() < stop:
                lba = k * 64 + (n % 16) * 4
                futs = [v.awrite(lba, pattern(lba, 4, seed=k)), v.aread(lba, 4)]
                res = v.listio([2, 1], [lba, lba], [4, 4],
                               np.concatenate([pattern(lba, 4, seed=k),
                                               np.zeros(4 * BS, np.uint8)]), qd=2)
                for f in futs:
                    try:
                        f.result(20)
                    except (AdapterResetError, CxlFlashError, AfuError) as e:
                        bad.append(e)
                for e in res.errors().values():
                    bad.append(e)
                n += 1
        except BaseException as e:      # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=submitter, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    resets = 0
    while time.monotonic() < stop:
        adapter.reset()
        resets += 1
        v.set_size(CHUNK + 10, release=True)
        v.set_size(2 * CHUNK)
        time.sleep(0.01)
    for t in ts:
        t.join(30)
    assert not any(t.is_alive() for t in ts), "a submitter hung"
    assert not errors, errors
    assert resets > 3
    for e in bad:     # a request caught by a reset may fail with the reset's error
        assert isinstance(e, OSError) and str(e), repr(e)
    # Every block a submitter wrote last holds its pattern.
    for k in range(3):
        for f in [v.awrite(k * 64 + j * 4, pattern(k * 64 + j * 4, 4, seed=k))
                  for j in range(16)]:
            assert f.result(10) == 4
        assert v.read(k * 64, 64) == pattern(k * 64, 64, seed=k).tobytes()
    assert adapter.engine.inflight == 0


def test_adapter_close_while_a_loop_and_waiters_wait(kind, make_adapter):
    """Adapter.close() from the main thread while another thread's event
    loop awaits 200 reads and two threads block in result(): all of them
    end (data or a clean error), none hangs."""
    a = make_adapter()
    d = a.open_disk(a.create_lun(GIB))
    c = d.attach()
    v = c.create_virtual(CHUNK)
    v.write(0, pattern(0, 16 * 200, seed=43))
    out = {}
    started = threading.Event()

    def loop_thread():
        async def main():
            tasks = [asyncio.ensure_future(v.read_async(16 * i, 16)) for i in range(200)]
            await asyncio.sleep(0)
            started.set()
            return await asyncio.gather(*tasks, return_exceptions=True)
        out["loop"] = asyncio.run(main())

    futs = [v.aread(16 * i, 16) for i in range(200)]

    def waiter(k):
        res = []
        for f in futs[k::2]:
            try:
                res.append(f.result(20))
            except (OSError, ValueError) as e:
                res.append(e)
        out[k] = res

    ts = [threading.Thread(target=loop_thread)] + \
        [threading.Thread(target=waiter, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    started.wait(10)
    a.close()
    for t in ts:
        t.join(30)
    assert not any(t.is_alive() for t in ts), "a waiter hung across Adapter.close()"
    results = out["loop"] + out[0] + out[1]
    assert len(results) == 400
    for i, r in enumerate(out["loop"]):
        if isinstance(r, BaseException):
            assert isinstance(r, (OSError, ValueError)), repr(r)
        else:
            assert bytes(r) == pattern(16 * i, 16, seed=43).tobytes()
    for k in range(2):
        for j, r in enumerate(out[k]):
            i = k + 2 * j
            if isinstance(r, BaseException):
                assert isinstance(r, (OSError, ValueError)), repr(r)
            else:
                assert bytes(r) == pattern(16 * i, 16, seed=43).tobytes()
    c.close()


def test_async_requests_split_by_max_xfer_and_chunks(memory_backing, ctx):
    """A request split into many backend operations (max_xfer 3, two
    non-adjacent chunks) through futures, asyncio and listio at depth:
    the data lands in the right places."""
    other = ctx.create_virtual(1)
    v = ctx.create_virtual(1)
    other.set_size(2 * CHUNK)               # interleave: v's chunks not adjacent
    v.set_size(2 * CHUNK)
    p = v.translate([CHUNK - 1, CHUNK])
    assert int(p[1]) != int(p[0]) + 1
    ctx.max_xfer = 3
    v._rebind()
    data = pattern(CHUNK - 40, 80, seed=45)
    assert v.awrite(CHUNK - 40, data).result(10) == 80
    assert v.aread(CHUNK - 40, 80).result(10) == data.tobytes()
    assert asyncio.run(v.read_async(CHUNK - 40, 80)) == data.tobytes()
    fd = backing_fd(v)
    assert store_bytes(fd, phys_offsets(v, range(CHUNK - 40, CHUNK + 40))) == data.tobytes()
    out = np.zeros(8 * 20 * BS, np.uint8)
    res = v.listio([1] * 8, CHUNK - 40 + np.arange(8) * 10, [10] * 8, out, qd=8)
    assert res.ok and (res.status == 10).all()
    assert np.array_equal(out[:80 * BS], data)
    z = v.awrite_zeroes(CHUNK - 5, 10).result(10)
    assert z == 10 and v.read(CHUNK - 5, 10) == bytes(10 * BS)
    assert v.read(CHUNK - 6, 1) == pattern(CHUNK - 6, 1, seed=45).tobytes()


_LISTIO_DEEPER_THAN_THE_ENGINE = r"""
import faulthandler, os, sys
faulthandler.dump_traceback_later(8, exit=True)      # a hang: the stacks, then exit
import numpy as np
import cxlflash
path = sys.argv[1]
with cxlflash.Adapter() as a:
    w = a.add_lun(path, size=1 << 30, direct=True)
    with a.open_disk(w) as d, d.attach() as c, c.create_virtual(1000, scrub=False) as v:
        depth = a.engine.depth
        n = depth + 300
        v.set_size(n)
        data = cxlflash.aligned_buffer(n * 4096)
        data[:] = np.repeat((np.arange(n) % 251).astype(np.uint8), 4096)
        res = v.listio([2] * n, np.arange(n), [1] * n, data, qd=n)
        assert res.ok, res.errors()
        out = cxlflash.aligned_buffer(n * 4096)
        res = v.listio([1] * n, np.arange(n), [1] * n, out, qd=65536)
        assert res.ok and np.array_equal(out, data)
        futs = [v.areadinto(i, out[i * 4096:(i + 1) * 4096]) for i in range(n)]
        assert [f.result(10) for f in futs] == [1] * n
print("deep-ok")
"""


def test_listio_deeper_than_the_engine_on_o_direct(kind, tmp_path):
    """listio with qd above the adapter engine's depth (default 256) on an
    O_DIRECT file: back-pressure, not a hang.  In a subprocess."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    try:
        p = subprocess.run([sys.executable, "-c", _LISTIO_DEEPER_THAN_THE_ENGINE,
                            str(tmp_path / "direct.img")], cwd=root, env=env,
                           capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"hung:\n{e.stderr}") from None
    assert p.returncode == 0 and "deep-ok" in p.stdout, p.stdout + p.stderr


def test_end_of_backing_store_is_the_sync_error(tmp_path, make_adapter):
    """A file that shrank behind the LUN: the async calls fail as the sync
    ones do (EIO naming the byte where the store ended), the rest works."""
    a = make_adapter(directory=str(tmp_path))
    with a.open_disk(a.create_lun(GIB)) as disk, \
            disk.attach() as c, c.create_virtual(2 * CHUNK) as v:
        path = lun_status(a, disk.wwid)["path"]
        v.write(CHUNK + 3, pattern(CHUNK + 3, 2))
        (off,) = phys_offsets(v, [CHUNK + 4])
        os.truncate(path, off)
        check_all_ways(v, "aread", CHUNK + 3, 2, what="past the store's end")
        check_all_ways(v, "areadinto", CHUNK + 3, bytearray(2 * BS), what="past the end")
        e = outcome(lambda: v.aread(CHUNK + 3, 2))
        assert e.errno == errno.EIO
        res = v.listio([1, 1], [CHUNK + 3, CHUNK + 3], [2, 1], bytearray(3 * BS), qd=2)
        assert res.error(0).errno == errno.EIO and res.status[1] == 1
        assert v.aread(CHUNK + 3, 1).result(10) == pattern(CHUNK + 3, 1).tobytes()


@pytest.mark.parametrize("direct", [False, True])
def test_block_device_through_the_engine(tmp_path, direct, kind):
    """A loop device (BLKZEROOUT / BLKDISCARD, 512-byte blocks), buffered
    and O_DIRECT: listio at depth, futures, write-zeroes, discard, flush."""
    import shutil
    import subprocess
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    dev = subprocess.run([shutil.which("losetup") or "losetup", "--find", "--show", str(img)],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        with cxlflash.Adapter() as a:
            w = a.add_lun(dev, direct=direct)
            with a.open_disk(w) as d, d.attach() as c, c.open_direct() as v:
                bs = v.block_size
                n = 64
                data = cxlflash.aligned_buffer(n * bs)
                data[:] = np.repeat((np.arange(n) + 1).astype(np.uint8), bs)
                res = v.listio([2] * n, np.arange(n) * 2, [1] * n, data, qd=64)
                assert res.ok, res.errors()
                out = cxlflash.aligned_buffer(n * bs)
                res = v.listio([1] * n, np.arange(n) * 2, [1] * n, out, qd=64)
                assert res.ok and np.array_equal(out, data)
                b = cxlflash.aligned_buffer(4 * bs)
                b[:] = 7
                assert v.awrite(1000, b).result(10) == 4
                assert v.awrite_zeroes(1001, 1).result(10) == 1
                assert v.adiscard(1002, 1).result(10) == 1
                assert v.aflush().result(10) is None
                o = cxlflash.aligned_buffer(4 * bs)
                assert v.areadinto(1000, o).result(10) == 4
                assert not o[bs:3 * bs].any()
                assert (o[:bs] == 7).all() and (o[3 * bs:] == 7).all()
                assert asyncio.run(v.write_zeroes_async(0, 8)) == 8
                if not direct:            # aread's own buffer need not be aligned
                    assert v.aread(0, 8).result(10) == bytes(8 * bs)
                v.areadinto(0, o).result(10)
                assert not o.any()
    finally:
        subprocess.run([shutil.which("losetup") or "losetup", "-d", dev], check=False)
