"""Fuzzing the entry points of the asynchronous engine (issue 9) with
extreme values, each batch in a subprocess (a crash fails the test), on
both engines (``CXLFLASH_ENGINE``).

* the object API's futures, asyncio methods, write-zeroes/discard/flush
  and ``listio(..., qd=)``: the rule of ``test_fuzz_api.py`` (TypeError for
  a non-integer, EINVAL for an integer out of range, ValueError /
  BufferError / TypeError for a bad buffer, never OverflowError,
  MemoryError, IndexError ...); a bad argument raises at the call, never
  from the future; and nothing outside the addressed blocks changes (the
  fuzzed LUNs' backing stores are compared with a reference after every
  call, a victim context's vLUN never changes);
* the core: ``Engine(kind, depth, workers)``, ``Engine.inject`` and
  ``Engine.raw_listio`` with extreme values -- a documented error class,
  and a bare store that only ever holds what it held (every write of the
  batches writes the bytes already there, so any byte moved to the wrong
  place shows).
"""
import asyncio
import errno
import os

import numpy as np
import pytest
from hypothesis import example, given, note, strategies as st

import test_fuzz_api as fa
from cxlflash._core.engine import engine_info
from fuzzing import (EXTREME_INTS, NON_INTS, fuzz_settings, run_all, run_batch)

BS = fa.BS
CHUNK = fa.CHUNK
U64 = 2 ** 64
# Both engines; a build without liburing (CI's debug build) has threads only.
KINDS = ("io_uring", "threads") if engine_info()["liburing"] else ("threads",)


def is_int(x):
    return fa.is_int(x) and not fa.is_float(x)


def bad_args(*args):
    """A non-integer or an integer outside 0..2**64-1 among ``args``:
    must be refused at the call."""
    return any(not is_int(x) or not 0 <= int(x) < U64 for x in args)


# -- the object API ---------------------------------------------------------------------------

QD = st.one_of(st.sampled_from([1, 2, 8, 64, 65536]), st.sampled_from(EXTREME_INTS),
               st.sampled_from(NON_INTS), st.sampled_from([65537, np.int64(4), True]))
LBA, COUNT, TARGET, BUF_KINDS = fa.LBA, fa.COUNT, fa.TARGET, fa.BUF_KINDS
RANGE_OPS = ("aread", "awrite_zeroes", "adiscard", "write_zeroes", "discard",
             "read_async", "write_zeroes_async", "discard_async")
BUF_OPS = ("areadinto", "awrite", "readinto_async", "write_async")

API_OPS = st.one_of(
    st.tuples(st.sampled_from(RANGE_OPS), TARGET, LBA, COUNT),
    st.tuples(st.sampled_from(BUF_OPS), TARGET, LBA, st.integers(0, 3),
              st.sampled_from(BUF_KINDS)),
    st.tuples(st.sampled_from(["aflush", "flush", "flush_async"]), TARGET),
    st.tuples(st.just("listio"), TARGET,
              st.lists(st.tuples(st.sampled_from([1, 2, 3, 0, 7]), fa.SCALAR_LBA,
                                 fa.SCALAR_COUNT), max_size=4), QD),
)


def _call(lun, name, args):
    """Issue ``name``; returns ("call", exc) when the call itself raised,
    ("result", exc) when the request failed, or ("ok", value)."""
    is_aio = name.endswith("_async")
    try:
        if is_aio:
            coro = getattr(lun, name)(*args)
        else:
            fut = getattr(lun, name)(*args)
    except Exception as e:       # noqa: BLE001
        return "call", e
    try:
        if is_aio:
            async def main():
                return await coro
            return "ok", asyncio.run(main())
        if name.startswith("a"):
            assert hasattr(fut, "result"), f"{name} returned {fut!r}"
            return "ok", fut.result(30)
        return "ok", fut
    except Exception as e:       # noqa: BLE001
        return "result", e


def _run_api_op(w, f, op):
    name, tgt = op[0], op[1]
    lun = f.v if tgt == "v" else f.d
    what = f"{type(lun).__name__}.{name}{op[2:]!r} size={lun.size}"
    note(what)
    if name in RANGE_OPS:
        lba, n = op[2], op[3]
        where, res = _call(lun, name, (lba, n))
        if where != "ok":
            fa.check_error(res, what, lba, n)
            assert fa.range_ok(lun, lba, n) is not True, f"{what} refused: {res!r}"
            if bad_args(lba, n) and name[0] == "a" and not name.endswith("_async"):
                assert where == "call", f"{what}: a bad argument raised from the future"
        else:
            assert fa.range_ok(lun, lba, n) is not False, f"{what} accepted"
            if name in ("aread", "read_async"):
                assert len(res) == int(n) * BS
                assert np.array_equal(np.frombuffer(bytes(res), np.uint8),
                                      w.expected(lun, int(lba), int(n))), f"{what}: wrong data"
            else:
                assert res == int(n), f"{what} returned {res!r}"
                w.mark(lun, int(lba), int(n), np.zeros(int(n) * BS, np.uint8))
    elif name in BUF_OPS:
        lba, n, kind = op[2], op[3], op[4]
        write = name in ("awrite", "write_async")
        buf = fa.make_buffer(kind, n, 3 if write else 0)
        before = bytes(memoryview(buf).cast("B")) if kind != "strided" else None
        where, res = _call(lun, name, (lba, buf))
        if where != "ok":
            must = fa.range_ok(lun, lba, n)
            ok = fa.buffer_ok(kind, n, write)
            fa.check_error(res, what, lba if ok else fa._NO)
            assert not (must is True and ok is True), f"{what} refused: {res!r}"
            if (bad_args(lba) or ok is False) and not name.endswith("_async"):
                assert where == "call", f"{what}: a bad argument raised from the future"
            if before is not None and kind not in ("bytes", "readonly"):
                assert bytes(memoryview(buf).cast("B")) == before, \
                    f"{what} refused but changed the buffer"
        else:
            assert fa.range_ok(lun, lba, n) is not False and \
                fa.buffer_ok(kind, n, write) is not False, f"{what} accepted"
            assert res == n
            data = np.frombuffer(bytes(memoryview(buf).cast("B")), np.uint8)
            if write:
                w.mark(lun, int(lba), n, data)
            else:
                assert np.array_equal(data, w.expected(lun, int(lba), n)), \
                    f"{what}: wrong data"
    elif name in ("aflush", "flush", "flush_async"):
        where, res = _call(lun, name, ())
        assert where == "ok" and res is None, f"{what}: {res!r}"
    else:
        _run_listio(w, lun, what, op[2], op[3])
    w.check(what)


def _run_listio(w, lun, what, reqs, qd):
    nbuf = 8 * BS
    buf = np.zeros(nbuf, np.uint8)
    ops = [r[0] for r in reqs]
    lbas = [r[1] for r in reqs]
    counts = [r[2] for r in reqs]
    offs = [0] * len(reqs)
    qd_ok = is_int(qd) and 1 <= int(qd) <= 65536
    try:
        res = lun.listio(ops, lbas, counts, buf, offs, qd=qd)
    except Exception as e:       # noqa: BLE001
        fa.check_error(e, what)
        nonint = any(not is_int(x) for x in lbas + counts + ops)
        wide = any(is_int(x) and not 0 <= int(x) < U64 for x in lbas + counts + ops)
        assert nonint or wide or not qd_ok, f"{what} refused: {e!r}"
        if not nonint and not wide:           # only qd was wrong
            if is_int(qd):
                assert isinstance(e, OSError) and e.errno == errno.EINVAL, \
                    f"{what}: {e!r} (expected EINVAL for qd)"
            else:
                assert isinstance(e, TypeError), f"{what}: {e!r} (expected TypeError)"
        assert not buf.any(), f"{what} refused but changed the buffer"
        return
    assert qd_ok, f"{what}: qd={qd!r} accepted"
    assert all(is_int(x) for x in lbas + counts), f"{what} accepted non-integers"
    for i, (o, lba, n) in enumerate(reqs):
        s = int(res.status[i])
        valid = fa.range_ok(lun, lba, n) if o in (1, 2, 3) else False
        if o in (1, 2) and valid is not False and int(n) * BS > nbuf:
            valid = False
        if s >= 0:
            assert valid is not False, f"{what}: request {i} accepted"
            if o == 2:
                w.mark(lun, int(lba), int(n), buf[:int(n) * BS])
            elif o == 3:
                w.mark(lun, int(lba), int(n), np.zeros(int(n) * BS, np.uint8))
        else:
            assert valid is not True, f"{what}: request {i} refused ({s})"
            err = res.error(i)
            assert isinstance(err, OSError) and str(err)
    # Every read fills the buffer from offset 0, in any order at depth:
    # the data is checked when one read succeeded alone.
    oks = [(o, int(l), int(n)) for (o, l, n), s in zip(reqs, res.status.tolist()) if s >= 0]
    if len(oks) == 1 and oks[0][0] == 1:
        _, l, n = oks[0]
        assert np.array_equal(buf[:n * BS], w.expected(lun, l, n)), f"{what}: wrong data"


class Fuzz(fa.Fuzz):
    """``test_fuzz_api``'s fresh context, vLUN and direct LUN; the check
    after its release compares the blocks the example touched (zero once
    scrubbed) rather than the whole two chunks, and asks the store that
    no data is anywhere else."""

    def cleanup(self):
        w = self.w
        touched = [r for r in w.img_a.ranges if r not in w.victim_ranges]
        for o in self.extra:
            try:
                o.close()
            except Exception:          # noqa: BLE001
                pass
        self.ctx.close()
        w.img_a.ranges = list(w.victim_ranges)
        for a, b in touched:
            w.img_a.set(a, b, 0)       # the scrubbed vLUN's blocks
        w.check("after closing the fuzz context")
        w.img_a.ranges = list(w.victim_ranges)


@fuzz_settings(max_examples=100)
@given(ops=st.lists(API_OPS, min_size=1, max_size=5))
@example(ops=[("aread", "v", 0.5, 1)])
@example(ops=[("aread", "v", 2 ** 64 - 1, 1)])
@example(ops=[("awrite_zeroes", "v", 0, 2 ** 64)])
@example(ops=[("adiscard", "d", -1, 1)])
@example(ops=[("areadinto", "v", 0, 1, "readonly")])
@example(ops=[("awrite", "v", 0, 1, "odd_size")])
@example(ops=[("readinto_async", "d", 3, 2, "bytes")])
@example(ops=[("listio", "v", [(1, 0, 1)], 0)])
@example(ops=[("listio", "v", [(1, 0, 1)], 2 ** 64)])
@example(ops=[("listio", "v", [(1, 0, 1)], 1.0)])
@example(ops=[("listio", "v", [(2, 0, 2), (1, 0, 2)], 65536)])
def _api_ops(ops):
    try:
        w = fa.world()
        f = Fuzz(w)
        try:
            for op in ops:
                _run_api_op(w, f, op)
            assert w.a.engine.inflight == 0
        finally:
            f.cleanup()
    except BaseException:
        fa.drop_world()
        raise


def batch_api():
    run_all(_api_ops)


# -- the core engine ---------------------------------------------------------------------------

STORE = 64 * 4096                   # the bare store: a sealed memfd of 64 pages
ANY_SMALL = st.one_of(st.integers(0, 4), st.sampled_from(EXTREME_INTS),
                      st.sampled_from(NON_INTS))
DEPTH = st.one_of(st.sampled_from([None, 1, 2, 64, 256, 4096, 65536, 65537, 2 ** 31]),
                  ANY_SMALL)
KIND = st.sampled_from([None, "io_uring", "threads", "", "uring", "THREADS", 0, 1.5, b"threads"])


def _bare_store():
    fd = os.memfd_create("fuzz-engine", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, STORE)
    ref = np.frombuffer(np.random.default_rng(0).bytes(STORE), np.uint8).copy()
    os.pwrite(fd, ref.tobytes(), 0)
    import fcntl
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK |
                fcntl.F_SEAL_SEAL)
    return fd, ref


_STORE = None


def store():
    global _STORE
    if _STORE is None:
        _STORE = _bare_store()
    return _STORE


def check_store(what):
    fd, ref = store()
    assert os.fstat(fd).st_size == STORE, f"{what}: the store's size changed"
    got = np.frombuffer(os.pread(fd, STORE, 0), np.uint8)
    if not np.array_equal(got, ref):
        bad = np.flatnonzero(got != ref)
        raise AssertionError(f"{what}: {len(bad)} bytes of the store changed, "
                             f"first at {bad[0]}")


def check_core_error(e, what, nonint=False):
    if isinstance(e, fa.FORBIDDEN):
        raise AssertionError(f"{what} raised {type(e).__name__}: {e}") from e
    assert isinstance(e, (OSError, TypeError, ValueError, BufferError)), \
        f"{what} raised {type(e).__name__}: {e}"
    assert str(e), f"{what}: an error without a message: {e!r}"
    if isinstance(e, OSError):
        assert e.errno, f"{what}: an OSError without errno: {e!r}"
    if nonint:
        assert isinstance(e, TypeError), f"{what}: a non-integer gave {e!r}"


@fuzz_settings(max_examples=60)
@given(kind=KIND, depth=DEPTH, workers=st.one_of(st.none(), DEPTH))
@example(kind="threads", depth=1, workers=2 ** 31)
@example(kind="io_uring", depth=2 ** 31, workers=None)
@example(kind="threads", depth=0, workers=None)
@example(kind="threads", depth=1.0, workers=None)
def _engine_new(kind, depth, workers):
    from cxlflash._core.engine import Engine, engine_info
    kw = {"kind": kind}
    if depth is not None:
        kw["depth"] = depth
    if workers is not None:
        kw["workers"] = workers
    what = f"Engine({kw!r})"
    note(what)
    try:
        e = Engine(**kw)
    except Exception as ex:       # noqa: BLE001
        check_core_error(ex, what)
        ints = [x for x in (depth, workers) if x is not None]
        kind_ok = kind in (None, "io_uring", "threads")
        ints_fine = ((depth is None or not is_int(depth) or 1 <= int(depth) <= 65536)
                     and (workers is None or not is_int(workers) or 1 <= int(workers) <= 1024))
        if kind_ok and ints_fine and any(not is_int(x) for x in ints):   # only a type
            assert isinstance(ex, TypeError), f"{what}: {ex!r} (expected TypeError)"
        assert not (kind_ok and all(is_int(x) and 1 <= int(x) <= 256 for x in ints)), \
            f"{what} refused: {ex!r}"
        if kind_ok and all(is_int(x) for x in ints) and any(int(x) < 1 for x in ints):
            assert isinstance(ex, (ValueError, OSError)), f"{what}: {ex!r}"
            if isinstance(ex, OSError):
                assert ex.errno == errno.EINVAL, f"{what}: {ex!r}"
        return
    try:
        assert kind in (None, "io_uring", "threads"), f"{what} accepted"
        assert all(is_int(x) and int(x) >= 1 for x in (depth, workers) if x is not None), \
            f"{what} accepted"
        assert kind is None or e.kind == kind
        assert e.depth >= 1 and e.inflight == 0
        fd, ref = store()
        buf = np.zeros(2 * 4096, np.uint8)
        buf[4096:] = ref[4096:8192]             # the write puts back what is there
        assert e.raw_listio(fd, [1, 2], [0, 4096], 4096, buf, qd=2) == 2
        assert np.array_equal(buf[:4096], ref[:4096])
    finally:
        e.close()
    check_store(what)


OPS_VALUES = st.sampled_from([1, 2, 2, 1, 0, 3, -1, 2 ** 64, 1.0, None])
OFFSETS = st.one_of(st.sampled_from([0, 4096, 512, 1, STORE - 4096, STORE - 1, STORE,
                                     2 ** 63 - 4096, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1,
                                     2 ** 64, -1, -4096]),
                    st.integers(0, STORE // 4096 - 1).map(lambda b: b * 4096),
                    st.sampled_from(NON_INTS))
NBYTES = st.one_of(st.sampled_from([4096, 4096, 8192, 512, 0, 1, 4095, STORE, STORE + 1,
                                    2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -1]),
                   st.sampled_from(NON_INTS))
RAW_BUFS = st.sampled_from(["fit", "fit", "short", "readonly", "bytes", "odd", "uint64",
                            "empty", "strided"])
FDS = st.sampled_from(["store", "store", "store", -1, -2, 2 ** 31, 2 ** 64, 1.0, None,
                       "closed"])


def _raw_buffer(kind, size):
    if kind == "fit":
        return np.zeros(size, np.uint8)
    if kind == "short":
        return np.zeros(max(size - 1, 0), np.uint8)
    if kind == "readonly":
        b = np.zeros(size, np.uint8)
        b.flags.writeable = False
        return b
    if kind == "bytes":
        return bytes(size)
    if kind == "odd":
        return bytearray(size + 3)
    if kind == "uint64":
        return np.zeros(-(-size // 8), np.uint64)
    if kind == "empty":
        return bytearray()
    return np.zeros(2 * size, np.uint8)[::2]


@fuzz_settings(max_examples=120)
@given(fd=FDS, reqs=st.lists(st.tuples(OPS_VALUES, OFFSETS), min_size=0, max_size=6),
       nbytes=NBYTES, bufkind=RAW_BUFS, packed=st.booleans(), qd=QD)
@example(fd="store", reqs=[(2, 2 ** 63 - 1)], nbytes=4096, bufkind="fit", packed=True, qd=1)
@example(fd="store", reqs=[(1, 0)], nbytes=2 ** 64, bufkind="fit", packed=True, qd=1)
@example(fd="store", reqs=[(2, STORE - 4096)], nbytes=8192, bufkind="fit", packed=True,
         qd=64)
@example(fd="store", reqs=[(1, 0)], nbytes=4096, bufkind="readonly", packed=True, qd=1)
@example(fd="store", reqs=[(1, 0)], nbytes=4096, bufkind="fit", packed=True, qd=0)
@example(fd=-1, reqs=[(1, 0)], nbytes=4096, bufkind="fit", packed=False, qd=8)
def _raw_listio(fd, reqs, nbytes, bufkind, packed, qd):
    from cxlflash._core.engine import Engine
    sfd, ref = store()
    e = _engine()
    closed = None
    if fd == "store":
        fd = sfd
    elif fd == "closed":
        closed = os.memfd_create("closed")
        os.close(closed)
        fd = closed
    ops = [r[0] for r in reqs]
    offs = [r[1] for r in reqs]
    n = len(reqs)
    nb = int(nbytes) if is_int(nbytes) and 0 <= int(nbytes) <= STORE + 1 else 4096
    size = n * nb
    buf = _raw_buffer(bufkind, size)
    # Every write carries the bytes already at its offset; requests use
    # buf_offsets (one slot each) or the packed default.
    bofs = None if packed else [i * nb for i in range(n)]
    if bufkind in ("fit", "short", "odd", "uint64"):
        mv = np.frombuffer(memoryview(buf).cast("B"), np.uint8)
        for i, (o, off) in enumerate(reqs):
            if is_int(off) and 0 <= int(off) < STORE:
                end = min((i + 1) * nb, len(mv), i * nb + STORE - int(off))
                if end > i * nb:
                    mv[i * nb:end] = ref[int(off):int(off) + end - i * nb]
    what = f"raw_listio(fd={fd!r}, reqs={reqs!r}, nbytes={nbytes!r}, {bufkind}, " \
           f"packed={packed}, qd={qd!r})"
    note(what)
    before = bytes(memoryview(buf).cast("B")) if bufkind != "strided" else None
    try:
        got = e.raw_listio(fd, ops, offs, nbytes, buf, buf_offsets=bofs, qd=qd)
    except Exception as ex:       # noqa: BLE001
        nonint = any(not is_int(x) for x in ops + offs + [nbytes, qd]) or \
            not is_int(fd)
        check_core_error(ex, what)
        ints_fine = ((not is_int(fd) or fd == sfd)
                     and all(o in (1, 2) for o in ops if is_int(o))
                     and all(0 <= int(x) <= STORE for x in offs if is_int(x))
                     and (not is_int(nbytes) or 0 <= int(nbytes) <= STORE)
                     and (not is_int(qd) or 1 <= int(qd) <= 65536))
        if nonint and ints_fine:       # only a type is wrong: TypeError
            assert isinstance(ex, (TypeError, BufferError, ValueError)), \
                f"{what}: {ex!r} (a non-integer)"
        if is_int(qd) and not 1 <= int(qd) <= 65536 and isinstance(ex, OSError):
            assert ex.errno == errno.EINVAL
        valid = (fd == sfd and is_int(nbytes) and 0 <= int(nbytes) <= STORE
                 and 1 <= qd_int(qd) <= 65536
                 and bufkind == "fit" and all(is_int(o) and o in (1, 2) for o in ops)
                 and all(is_int(x) and 0 <= int(x) and int(x) + nb <= STORE for x in offs))
        assert not valid, f"{what} refused: {ex!r}"
        if before is not None and not isinstance(ex, OSError) and bufkind not in \
                ("readonly", "bytes"):
            assert bytes(memoryview(buf).cast("B")) == before, \
                f"{what} refused but changed the buffer"
    else:
        assert got == n, f"{what} returned {got!r}"
        assert is_int(nbytes) and 0 <= int(nbytes) <= STORE + 1, f"{what}: nbytes accepted"
        assert is_int(qd) and 1 <= int(qd) <= 65536, f"{what}: qd accepted"
        assert all(is_int(o) and o in (1, 2) for o in ops), f"{what}: an op accepted"
        assert all(is_int(x) and 0 <= int(x) and int(x) + nb <= STORE for x in offs) \
            or nb == 0, f"{what}: an offset accepted"
        if nb and isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and \
                buf.flags.c_contiguous:
            for i, (o, off) in enumerate(reqs):
                if o == 1:
                    assert np.array_equal(buf[i * nb:(i + 1) * nb],
                                          ref[int(off):int(off) + nb]), \
                        f"{what}: request {i} read wrong data"
    assert e.inflight == 0, f"{what}: requests left in flight"
    check_store(what)


def qd_int(qd):
    return int(qd) if is_int(qd) else 0


_ENGINE = None


def _engine():
    global _ENGINE
    if _ENGINE is None or _ENGINE.closed:
        from cxlflash._core.engine import Engine
        _ENGINE = Engine(depth=16)
    return _ENGINE


INJECT_RESULTS = st.one_of(st.sampled_from([-errno.EIO, -errno.EINTR, -errno.ENOSPC, 512,
                                            4095, 1, 0, -1, -4096, 2 ** 31, 2 ** 63,
                                            -(2 ** 63), 2 ** 64]),
                           st.sampled_from(NON_INTS))
INJECT_OPS = st.sampled_from([None, "read", "write", "flush", "zero", "discard", "",
                              "READ", "trim", 1, 1.5, b"read"])
OP_NAMES = (None, "read", "write", "flush", "zero", "discard")


@fuzz_settings(max_examples=80)
@given(result=INJECT_RESULTS, count=st.one_of(st.integers(0, 3), ANY_SMALL),
       op=INJECT_OPS, skip=st.one_of(st.integers(0, 3), ANY_SMALL))
@example(result=-errno.EIO, count=2 ** 64, op=None, skip=0)
@example(result=2 ** 64, count=1, op=None, skip=0)
@example(result=-(2 ** 63) - 1, count=1, op="read", skip=0)
@example(result=-errno.EIO, count=1, op=None, skip=2 ** 63)
@example(result=-errno.EIO, count=2 ** 31, op="read", skip=0)
def _inject(result, count, op, skip):
    from cxlflash._core.engine import Engine
    e = _engine()
    if e.injected:                  # left by an example that failed
        e.close()
        e = _engine()
    sfd, ref = store()
    what = f"inject({result!r}, count={count!r}, op={op!r}, skip={skip!r})"
    note(what)
    try:
        e.inject(result, count=count, op=op, skip=skip)
    except Exception as ex:       # noqa: BLE001
        nonint = any(not is_int(x) for x in (result, count, skip))
        check_core_error(ex, what)
        ints_fine = ((not is_int(count) or 1 <= int(count) <= 2 ** 30)
                     and (not is_int(skip) or 0 <= int(skip) <= 2 ** 30)
                     and (not is_int(result) or -4095 <= int(result) < 2 ** 31))
        if nonint and op in OP_NAMES and ints_fine:     # only a type is wrong
            assert isinstance(ex, TypeError), f"{what}: {ex!r}"
        assert not (is_int(result) and -4095 <= int(result) < 0 and is_int(count)
                    and 1 <= int(count) <= 3 and is_int(skip) and 0 <= int(skip) <= 3
                    and op in OP_NAMES), f"{what} refused: {ex!r}"
        assert e.injected == 0, f"{what} refused but left {e.injected} injections"
        return
    assert op in OP_NAMES, f"{what} accepted"
    assert is_int(result) and is_int(count) and is_int(skip), f"{what} accepted"
    # Drain the injections with requests that write what is there and read
    # it back: whatever the backend is said to report, no byte moves
    # elsewhere, nothing hangs, and every request ends.
    try:
        for _ in range(8):
            if e.injected == 0:
                break
            buf = np.concatenate([ref[:4 * 4096], np.zeros(4 * 4096, np.uint8)])
            try:
                e.raw_listio(sfd, [2, 1], [0, 0], 4 * 4096, buf, qd=2)
            except OSError as ex:
                check_core_error(ex, what)
            else:
                assert np.array_equal(buf[4 * 4096:], ref[:4 * 4096]), \
                    f"{what}: a read got wrong data"
            assert e.inflight == 0
    finally:
        if e.injected:
            # A huge count or skip never drains: start a fresh engine.
            e.close()
    check_store(what)


def batch_engine():
    run_all(_engine_new, _raw_listio, _inject)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", ["batch_api", "batch_engine"])
def test_fuzz_engine(batch, kind, monkeypatch):
    monkeypatch.setenv("CXLFLASH_ENGINE", kind)
    run_batch("test_fuzz_engine", batch)
