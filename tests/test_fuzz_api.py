"""Fuzzing the object API (Adapter / Disk / Context / VirtualLun /
DirectLun) with extreme values, each batch in a subprocess.

The rule every entry point must follow (issue 8, item 13; README):

* an argument of the wrong type (a float, str, None, bytes where an
  integer is expected) is a ``TypeError`` -- a float is never truncated;
* an integer outside what the LUN or vLUN can address (negative, 2**64 or
  more, beyond the logical size) is an ``OSError`` with errno EINVAL
  (``CxlFlashError``), checked before any allocation or I/O;
* buffer problems (size not a multiple of the block size, read-only or
  non-contiguous where a writable contiguous one is needed) are
  ``ValueError`` / ``BufferError`` / ``TypeError``;
* the driver's refusals are ``CxlFlashError`` (ENOSPC, ENOMEM, ...);
* never ``OverflowError``, ``MemoryError``, ``IndexError``,
  ``AttributeError``, ``ZeroDivisionError``.

And nothing outside the addressed range changes: the fuzzed vLUN and
direct LUN hold a pattern; after every accepted call exactly the addressed
blocks may differ (compared with a reference of the whole backing store,
which must also keep its size and have no data outside the known ranges),
after a refused call none; a victim context's vLUN on the same LUN never
changes, and the allocators always match the live LXTs.
"""
import errno
import os

import numpy as np
import pytest
from hypothesis import example, given, note, strategies as st

import cxlflash
from cxlflash._core import pattern

from fuzzing import (EXTREME_INTS, NON_INTS, SparseImage, check_allocators,
                     check_tables, close_world, fuzz_settings, ints_near, live_contexts,
                     run_all, run_batch)

CHUNK = 1 << 16
BS = 512
U64 = 2 ** 64
SIZE = CHUNK + 1000            # the fuzzed vLUN: two chunks, a logical size inside
DIRECT_BLOCKS = 128

FORBIDDEN = (OverflowError, MemoryError, IndexError, KeyError, AttributeError,
             ZeroDivisionError, AssertionError)


def blocks(lba, n, seq):
    buf = np.empty(n * BS, dtype=np.uint8)
    pattern.fill(buf, np.arange(lba, lba + n, dtype=np.uint64),
                 np.full(n, seq, dtype=np.uint64), BS)
    return buf


def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, float)


def is_float(x):
    return isinstance(x, (float, np.floating))


class World:
    def __init__(self):
        a = self.a = cxlflash.Adapter()
        self.wa = a.add_lun(None, size=3 * CHUNK * BS, block_size=BS)
        self.wb = a.add_lun(None, size=DIRECT_BLOCKS * BS, block_size=BS)
        self.da, self.db = a.open_disk(self.wa), a.open_disk(self.wb)
        self.img_a = SparseImage(a.driver.gluns[self.wa].backing.fd, 3 * CHUNK * BS)
        self.img_b = SparseImage(a.driver.gluns[self.wb].backing.fd, DIRECT_BLOCKS * BS)
        self.victim = self.da.attach()
        self.vv = self.victim.create_virtual(CHUNK, scrub=False)
        for lba in (0, CHUNK - 16):
            self.vv.write(lba, blocks(lba, 16, 900))
            self.mark(self.vv, lba, 16)
        self.victim_ranges = list(self.img_a.ranges)
        self.victim_chunks = self.table(self.vv).auns(self.vv.handle).tolist()

    def table(self, lun):
        return self.a._context_record(lun.context.context_id).table

    def phys(self, lun, lba, n):
        """Byte ranges (on its backing) of blocks [lba, lba+n) of ``lun``."""
        if not lun.virtual:
            return [(lba * BS, (lba + n) * BS)]
        p = self.table(lun).translate_many(
            lun.handle, np.arange(lba, lba + n, dtype=np.uint64)).astype(np.int64)
        out = []
        start = 0
        for i in range(1, n + 1):
            if i == n or p[i] != p[i - 1] + 1:
                out.append((int(p[start]) * BS, (int(p[i - 1]) + 1) * BS))
                start = i
        return out

    def image(self, lun):
        return self.img_a if lun.virtual else self.img_b

    def mark(self, lun, lba, n, data=None):
        """The test expects blocks [lba, lba+n) of ``lun`` to hold ``data``
        (default: what was just read back through the table)."""
        img = self.image(lun)
        flat = data
        off = 0
        for a, b in self.phys(lun, lba, n):
            img.set(a, b, flat[off:off + b - a] if flat is not None else
                    np.frombuffer(os.pread(img.fd, b - a, a), np.uint8))
            off += b - a

    def expected(self, lun, lba, n):
        img = self.image(lun)
        parts = [img.ref[a:b] for a, b in self.phys(lun, lba, n)]
        return np.concatenate(parts) if parts else np.empty(0, np.uint8)

    def check(self, what):
        a = self.a
        assert self.victim.context_id in {c.ctxid for c in live_contexts(a)}, \
            f"{what}: the victim context is gone"
        assert self.table(self.vv).auns(self.vv.handle).tolist() == self.victim_chunks, \
            f"{what}: the victim's vLUN changed chunks"
        self.img_a.check(what)
        self.img_b.check(what)
        check_tables(a)
        check_allocators(a)


_WORLD = None


def world():
    global _WORLD
    if _WORLD is None:
        _WORLD = World()
    return _WORLD


def drop_world():
    global _WORLD
    w, _WORLD = _WORLD, None
    close_world(w)


class Fuzz:
    """A fresh context with a vLUN (2 chunks, scrubbing) on LUN A and the
    direct LUN B, both holding a pattern."""

    def __init__(self, w):
        self.w = w
        self.ctx = w.da.attach()
        self.ctx.attach_disk(w.db)
        self.v = self.ctx.create_virtual(SIZE, scrub=True)
        self.d = self.ctx.open_direct(disk=w.db)
        for lba, n in ((0, 16), (CHUNK - 16, 32), (SIZE - 16, 16)):
            data = blocks(lba, n, 1)
            self.v.write(lba, data)
            w.mark(self.v, lba, n, data)
        data = blocks(0, DIRECT_BLOCKS, 2)
        self.d.write(0, data)
        w.mark(self.d, 0, DIRECT_BLOCKS, data)
        self.extra = []               # objects to close afterwards

    def cleanup(self):
        w = self.w
        chunks = w.table(self.v).auns(self.v.handle).tolist() if not self.v.closed else []
        for o in self.extra:
            try:
                o.close()
            except Exception:          # noqa: BLE001
                pass
        self.ctx.close()
        # A scrubbing vLUN's chunks are zero once it is released.
        for aun in chunks:
            w.img_a.set(aun * CHUNK * BS, (aun + 1) * CHUNK * BS, 0)
        w.check("after closing the fuzz context")
        w.img_a.ranges = list(w.victim_ranges)   # the rest is holes again


# -- argument strategies ------------------------------------------------------------

LBA = st.one_of(st.integers(0, 20), ints_near(CHUNK, SIZE, DIRECT_BLOCKS, spread=3),
                st.sampled_from(EXTREME_INTS), st.sampled_from(NON_INTS),
                st.sampled_from([np.int64(3), np.uint64(5), np.int32(-1), np.float64(1.0),
                                 True]))
COUNT = st.one_of(st.integers(0, 4), st.sampled_from([16, CHUNK, SIZE]),
                  st.sampled_from(EXTREME_INTS), st.sampled_from(NON_INTS),
                  st.sampled_from([np.int64(2), np.uint64(2 ** 63)]))
SCALAR_LBA = LBA.filter(lambda x: not isinstance(x, (list, tuple)))
SCALAR_COUNT = COUNT.filter(lambda x: not isinstance(x, (list, tuple)))
BUF_KINDS = ["bytearray", "numpy", "bytes", "memoryview", "readonly", "strided", "uint64",
             "odd_size"]
TARGET = st.sampled_from(["v", "v", "v", "d"])

IO_OPS = st.one_of(
    st.tuples(st.just("read"), TARGET, LBA, COUNT),
    st.tuples(st.just("readinto"), TARGET, LBA, st.integers(0, 3), st.sampled_from(BUF_KINDS)),
    st.tuples(st.just("write"), TARGET, LBA, st.integers(0, 3), st.sampled_from(BUF_KINDS)),
    st.tuples(st.just("unmap"), TARGET, LBA, COUNT),
    st.tuples(st.just("translate"), TARGET,
              st.one_of(st.lists(LBA, max_size=4), LBA)),
    st.tuples(st.just("aread"), TARGET, LBA, COUNT),
    st.tuples(st.just("awrite"), TARGET, LBA, st.integers(0, 2), st.sampled_from(BUF_KINDS)),
    # (nested lists are a shape question, not a type one: left out here)
    st.tuples(st.just("listio"), TARGET,
              st.lists(st.tuples(st.sampled_from([1, 2, 3, 0, 7]), SCALAR_LBA, SCALAR_COUNT),
                       max_size=4)),
    st.tuples(st.just("set_size"), st.just("v"),
              st.one_of(st.sampled_from([0, 1, CHUNK, SIZE, 2 * CHUNK, 2 * CHUNK + 1,
                                         3 * CHUNK, 4 * CHUNK]),
                        st.sampled_from(EXTREME_INTS), st.sampled_from(NON_INTS)),
              st.booleans(), st.booleans()),
    st.tuples(st.just("props"), TARGET),
)


def make_buffer(kind, n, fill):
    data = blocks(0, n, fill)
    if kind == "bytearray":
        return bytearray(data.tobytes())
    if kind == "bytes":
        return data.tobytes()
    if kind == "memoryview":
        return memoryview(data)
    if kind == "readonly":
        data.flags.writeable = False
        return data
    if kind == "strided":
        return np.repeat(data, 2)[::2] if n else data[::2]
    if kind == "uint64":
        return data.view(np.uint64)
    if kind == "odd_size":
        return bytearray(n * BS + 7)
    return data


def buffer_ok(kind, n, write):
    """Must the buffer be accepted (True), refused (False), or either?"""
    if kind == "odd_size":
        return False
    if kind == "strided":
        return None if n == 0 else False
    if not write and kind in ("bytes", "readonly"):
        return False
    return True


def range_ok(lun, lba, n):
    if is_float(lba) or is_float(n) or not is_int(lba) or not is_int(n):
        return False
    lba, n = int(lba), int(n)
    if lba < 0 or n < 0:
        return False
    if n == 0:
        return True if lba < lun.size else None
    return lba + n <= lun.size


_NO = object()         # "argument not given" (None is a value under test)


def check_error(e, what, lba=_NO, n=_NO):
    """The exception is one the rule allows for these arguments."""
    if isinstance(e, FORBIDDEN):
        raise AssertionError(f"{what} raised {type(e).__name__}: {e}") from e
    assert isinstance(e, (OSError, TypeError, ValueError, BufferError)), \
        f"{what} raised {type(e).__name__}: {e}"
    assert str(e), f"{what}: an error without a message: {e!r}"
    if isinstance(e, OSError):
        assert e.errno, f"{what}: an OSError without errno: {e!r}"
    args = [x for x in (lba, n) if x is not _NO]
    out_of_range = any(is_int(x) and not is_float(x) and not 0 <= int(x) < U64
                       for x in args)
    if any(is_float(x) or not is_int(x) for x in args) and not isinstance(e, TypeError) \
            and not out_of_range:
        # A wrong type must be reported as such (not as a range error).
        raise AssertionError(f"{what}: a non-integer argument gave "
                             f"{type(e).__name__}: {e} (expected TypeError)")
    if args and all(is_int(x) and not is_float(x) for x in args) and \
            any(int(x) < 0 or int(x) >= U64 for x in args):
        assert isinstance(e, OSError) and e.errno == errno.EINVAL, \
            f"{what}: an out-of-range integer gave {type(e).__name__}: {e} (expected EINVAL)"


def run_op(w, f, op):
    name, tgt = op[0], op[1]
    lun = f.v if tgt == "v" else f.d
    what = f"{type(lun).__name__}.{name}{op[2:]!r} size={lun.size}"
    note(what)
    if name in ("read", "aread"):
        lba, n = op[2], op[3]
        try:
            res = lun.read(lba, n) if name == "read" else lun.aread(lba, n).result(30)
        except Exception as e:       # noqa: BLE001
            check_error(e, what, lba, n)
            assert range_ok(lun, lba, n) is not True, f"{what} refused: {e!r}"
            return
        assert range_ok(lun, lba, n) is not False, f"{what} accepted"
        assert len(res) == int(n) * BS
        assert np.array_equal(np.frombuffer(bytes(res), np.uint8),
                              w.expected(lun, int(lba), int(n))), f"{what}: wrong data"
    elif name in ("readinto", "write", "awrite"):
        lba, n, kind = op[2], op[3], op[4]
        write = name != "readinto"
        buf = make_buffer(kind, n, 3 if write else 0)
        before = bytes(memoryview(buf).cast("B")) if kind != "strided" else None
        try:
            if name == "readinto":
                res = lun.readinto(lba, buf)
            elif name == "write":
                res = lun.write(lba, buf)
            else:
                res = lun.awrite(lba, buf).result(30)
        except Exception as e:       # noqa: BLE001
            must = range_ok(lun, lba, n)
            ok = buffer_ok(kind, n, write)
            check_error(e, what, lba if ok else _NO)
            assert not (must is True and ok is True), f"{what} refused: {e!r}"
            if before is not None and kind not in ("bytes", "readonly"):
                assert bytes(memoryview(buf).cast("B")) == before, \
                    f"{what} refused but changed the buffer"
            return
        assert range_ok(lun, lba, n) is not False and buffer_ok(kind, n, write) is not False, \
            f"{what} accepted"
        assert res == n
        if write:
            w.mark(lun, int(lba), n, np.frombuffer(bytes(memoryview(buf).cast("B")), np.uint8))
        else:
            assert np.array_equal(np.frombuffer(bytes(memoryview(buf).cast("B")), np.uint8),
                                  w.expected(lun, int(lba), n)), f"{what}: wrong data"
    elif name == "unmap":
        lba, n = op[2], op[3]
        try:
            res = lun.unmap(lba, n)
        except Exception as e:       # noqa: BLE001
            check_error(e, what, lba, n)
            assert range_ok(lun, lba, n) is not True, f"{what} refused: {e!r}"
            return
        assert range_ok(lun, lba, n) is not False, f"{what} accepted"
        w.mark(lun, int(lba), int(n), np.zeros(int(n) * BS, np.uint8))
    elif name == "translate":
        lbas = op[2]
        try:
            res = lun.translate(lbas)
        except Exception as e:       # noqa: BLE001
            check_error(e, what)
            flat = list(lbas) if isinstance(lbas, (list, tuple)) else [lbas]
            assert not all(is_int(x) and not is_float(x) and 0 <= int(x) < lun.size
                           for x in flat), f"{what} refused: {e!r}"
            if any(is_float(x) or not is_int(x) for x in flat) and all(
                    0 <= int(x) < lun.size for x in flat if is_int(x) and not is_float(x)):
                assert isinstance(e, TypeError), f"{what}: {e!r} (expected TypeError)"
            return
        flat = list(lbas) if isinstance(lbas, (list, tuple)) else [lbas]
        assert all(is_int(x) and not is_float(x) and 0 <= int(x) < lun.size for x in flat), \
            f"{what} accepted"
        want = [w.phys(lun, int(x), 1)[0][0] // BS for x in flat]
        assert [int(x) for x in res] == want
    elif name == "listio":
        reqs = op[2]
        nbuf = 8 * BS
        buf = np.zeros(nbuf, np.uint8)
        ops = [r[0] for r in reqs]
        lbas = [r[1] for r in reqs]
        counts = [r[2] for r in reqs]
        offs = [0] * len(reqs)
        try:
            res = lun.listio(ops, lbas, counts, buf, offs)
        except Exception as e:       # noqa: BLE001
            check_error(e, what)
            # The whole call is refused only for an element that is not an
            # integer (TypeError) or not a 64-bit unsigned one (EINVAL); any
            # other bad request fails alone.
            nonint = any(is_float(x) or not is_int(x) for x in lbas + counts + ops)
            wide = any(is_int(x) and not is_float(x) and not 0 <= int(x) < U64
                       for x in lbas + counts + ops)
            assert nonint or wide, f"{what} refused: {e!r} (a bad request fails alone)"
            if nonint and not wide:
                assert isinstance(e, TypeError), f"{what}: {e!r} (expected TypeError)"
            if wide and not nonint:
                assert isinstance(e, OSError) and e.errno == errno.EINVAL, \
                    f"{what}: {e!r} (expected EINVAL)"
            return
        assert all(is_int(x) and not is_float(x) for x in lbas + counts), \
            f"{what} accepted non-integers"
        for i, (o, lba, n) in enumerate(reqs):
            s = int(res.status[i])
            valid = range_ok(lun, lba, n) if o in (1, 2, 3) else False
            if o in (1, 2) and valid is not False and int(n) * BS > nbuf:
                valid = False
            if s >= 0:
                assert valid is not False, f"{what}: request {i} accepted"
                if o == 2:
                    w.mark(lun, int(lba), int(n), buf[:int(n) * BS])
                elif o == 3:
                    w.mark(lun, int(lba), int(n), np.zeros(int(n) * BS, np.uint8))
                else:
                    assert np.array_equal(buf[:int(n) * BS],
                                          w.expected(lun, int(lba), int(n)))
            else:
                assert valid is not True, f"{what}: request {i} refused ({s})"
                err = res.error(i)
                assert isinstance(err, OSError) and str(err)
    elif name == "set_size":
        blocks_, best, release = op[2], op[3], op[4]
        old_chunks = w.table(lun).auns(lun.handle).tolist()
        old_size = lun.size
        try:
            res = lun.set_size(blocks_, best_effort=best, release=release)
        except Exception as e:       # noqa: BLE001
            check_error(e, what, blocks_)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                pass
            else:
                ok = is_int(blocks_) and not is_float(blocks_) and \
                    0 <= int(blocks_) <= lun.lun_blocks
                assert not ok or int(blocks_) > 2 * CHUNK, f"{what} refused: {e!r}"
            assert lun.size == old_size, f"{what} refused but changed the size"
            new_chunks = w.table(lun).auns(lun.handle).tolist()
        else:
            assert is_int(blocks_) and not is_float(blocks_) and 0 <= int(blocks_), \
                f"{what} accepted"
            assert res == lun.size and res <= int(blocks_)
            new_chunks = w.table(lun).auns(lun.handle).tolist()
            assert len(new_chunks) * CHUNK >= lun.size
        assert new_chunks[:min(len(old_chunks), len(new_chunks))] == \
            old_chunks[:min(len(old_chunks), len(new_chunks))], f"{what}: kept chunks moved"
        for aun in set(old_chunks) - set(new_chunks):      # scrubbed and freed
            w.img_a.set(aun * CHUNK * BS, (aun + 1) * CHUNK * BS, 0)
        assert not set(new_chunks) & set(w.victim_chunks), f"{what}: took the victim's chunk"
    else:                                                # props
        try:
            repr(lun)
            lun.stats()
            if lun.virtual:
                assert lun.chunks * CHUNK == lun.allocated
                assert lun.lun_blocks == 3 * CHUNK
        except Exception as e:       # noqa: BLE001
            check_error(e, what)
            raise AssertionError(f"{what}: {e!r}")
    w.check(what)


@fuzz_settings(max_examples=120)
@given(ops=st.lists(IO_OPS, min_size=1, max_size=5))
@example(ops=[("read", "v", 1914, 2 ** 48)])
@example(ops=[("read", "v", -1, 1)])
@example(ops=[("write", "v", 0.5, 1, "bytearray")])
@example(ops=[("listio", "v", [(1, 0, b"")])])
@example(ops=[("listio", "v", [(1, 0, 2), (7, 2, 2 ** 63)])])   # a list numpy makes float64
@example(ops=[("translate", "v", [0, np.uint64(5)])])           # the same with a numpy scalar
@example(ops=[("set_size", "v", 2 ** 64, False, False)])
def _lun_ops(ops):
    try:
        w = world()
        f = Fuzz(w)
        try:
            w.check("the fuzz context set up")
            for op in ops:
                run_op(w, f, op)
        finally:
            f.cleanup()
    except BaseException:
        drop_world()
        raise


def batch_luns():
    run_all(_lun_ops)


# -- adapter, disk and context entry points ----------------------------------------------

ANY = st.one_of(st.integers(0, 4), st.sampled_from(EXTREME_INTS), st.sampled_from(NON_INTS))
CTX_OPS = st.one_of(
    st.tuples(st.just("create_virtual"), st.one_of(st.sampled_from([0, 1, CHUNK, 2 * CHUNK,
                                                                    3 * CHUNK]), ANY),
              st.booleans(), st.booleans()),
    st.tuples(st.just("attach"), st.one_of(st.sampled_from([os.O_RDONLY, os.O_WRONLY,
                                                           os.O_RDWR]), ANY), ANY),
    st.tuples(st.just("open_disk"), st.sampled_from(["a", "b", "junk", "short", None, 7]),
              ANY),
    st.tuples(st.just("create_lun"), st.one_of(st.sampled_from([4096, CHUNK * 4096]), ANY)),
    st.tuples(st.just("add_lun"), st.one_of(st.sampled_from([4096, CHUNK * BS]), ANY),
              st.sampled_from([512, 4096, 0, 513, -1, 2 ** 32, 1.5, None])),
    st.tuples(st.just("adapter_io"), st.sampled_from(["read", "write", "translate"]),
              ANY, ANY, ANY),
)


def _check_ctx_error(e, what, ints=(), others_ok=True):
    """``ints``: the integer arguments the call was given; when one is a
    float and nothing else was wrong (``others_ok``), the error must be
    the TypeError (with several bad arguments, any of their errors)."""
    check_error(e, what)
    if others_ok and any(is_float(x) for x in ints):
        assert isinstance(e, TypeError), f"{what}: a float gave {e!r} (expected TypeError)"


def _adapter_io_args(f, kind, h, lba, n):
    """The integer arguments adapter.<kind> receives, and whether all but
    the floats among them are valid."""
    passed = {"read": [h, lba, n], "write": [h, lba], "translate": [h, lba]}[kind]
    luns = {f.v.handle: f.v.size, f.d.handle: DIRECT_BLOCKS}
    ok_h = is_int(h) and not is_float(h) and int(h) in luns
    size = luns.get(int(h), 0) if ok_h else 0
    ok_lba = is_float(lba) or (is_int(lba) and 0 <= int(lba) < size)
    ok_n = kind != "read" or is_float(n) or (is_int(n) and 0 <= int(n) <= 2)
    return passed, (ok_h or is_float(h)) and ok_lba and ok_n


@fuzz_settings(max_examples=120)
@given(ops=st.lists(CTX_OPS, min_size=1, max_size=4))
@example(ops=[("adapter_io", "read", 0, 0, 2 ** 18)])
@example(ops=[("create_virtual", -1, False, False)])
@example(ops=[("create_virtual", 1.5, False, False)])
@example(ops=[("attach", 2.0, 0)])
@example(ops=[("create_virtual", None, False, False)])
@example(ops=[("add_lun", 4096, 1.5)])
@example(ops=[("open_disk", "a", 0.5)])
def _context_ops(ops):
    try:
        w = world()
        f = Fuzz(w)
        try:
            for op in ops:
                name = op[0]
                what = f"{name}{op[1:]!r}"
                note(what)
                try:
                    if name == "create_virtual":
                        size, scrub, best = op[1:]
                        v = f.ctx.create_virtual(size, scrub=scrub, best_effort=best)
                        f.extra.append(v)
                        assert is_int(size) and not is_float(size) and 0 <= int(size), \
                            f"{what} accepted"
                        assert v.size <= int(size) and (best or v.size == int(size))
                        v.close()
                    elif name == "attach":
                        mode, irqs = op[1:]
                        c = w.da.attach(mode, interrupts=irqs)
                        f.extra.append(c)
                        assert mode in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR) and \
                            not is_float(mode), f"{what} accepted"
                        c.close()
                    elif name == "open_disk":
                        which, port = op[1:]
                        wwid = {"a": w.wa, "b": w.wb, "junk": bytes(16),
                                "short": b"\x01" * 3}.get(which, which)
                        d = w.a.open_disk(wwid, port)
                        assert which in ("a", "b") and port == 0, f"{what} accepted"
                        d.close()
                    elif name == "create_lun":
                        size = op[1]
                        wwid = w.a.create_lun(size)
                        assert is_int(size) and not is_float(size) and size > 0, \
                            f"{what} accepted"
                        w.a.delete_lun(wwid)
                    elif name == "add_lun":
                        size, bs = op[1:]
                        wwid = w.a.add_lun(None, size=size, block_size=bs)
                        assert is_int(size) and not is_float(size) and size > 0, \
                            f"{what} accepted"
                        assert bs in (512, 4096), f"{what} accepted"
                        d = w.a.open_disk(wwid)
                        d.close()
                    else:
                        kind, h, lba, n = op[1:]
                        cid = f.ctx.context_id
                        if kind == "read":
                            w.a.read(cid, h, lba, n)
                        elif kind == "write":
                            w.a.write(cid, h, lba, bytes(BS * (n if is_int(n) and
                                                               0 <= n <= 2 else 1)))
                            # The write went somewhere legitimate: re-read
                            # what the fuzz LUNs hold now.
                            for lun, size in ((f.v, f.v.size), (f.d, DIRECT_BLOCKS)):
                                if lun.handle == h:
                                    w.mark(lun, int(lba), max(int(n), 1) if is_int(n)
                                           and 0 <= n <= 2 else 1)
                        else:
                            w.a.translate(cid, h, [lba])
                except AssertionError:
                    raise
                except Exception as e:       # noqa: BLE001
                    note(f"  -> {e!r}")
                    if name == "adapter_io":
                        passed, others_ok = _adapter_io_args(f, *op[1:])
                        _check_ctx_error(e, what, passed, others_ok)
                    else:
                        _check_ctx_error(e, what, [x for x in op[1:] if not isinstance(x, str)])
                w.check(what)
        finally:
            f.cleanup()
    except BaseException:
        drop_world()
        raise


def batch_contexts():
    run_all(_context_ops)


@pytest.mark.parametrize("batch", ["batch_luns", "batch_contexts"])
def test_fuzz_api(batch):
    run_batch("test_fuzz_api", batch)
