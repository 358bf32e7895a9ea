"""Fuzzing every public entry point of ``cxlflash._core`` with extreme values.

Each ``batch_*`` function runs a hypothesis search; the pytest tests at the
bottom run every batch in its own interpreter (``fuzzing.run_batch``) so a
crash (SIGSEGV, SIGFPE, abort) fails the test instead of the run.

What every batch asserts:

* only the exceptions documented for the entry point escape (table below);
* a refused call changes nothing: table and allocator state, the backing
  store (compared word for word against a reference copy), the caller's
  buffers (guard bytes around every buffer);
* an accepted call changes exactly what it addresses, as the reference
  model computes it, and the backing store keeps its size.

Exceptions allowed per entry point of ``_core`` (the decision of this suite):

==========================  ====================================================
entry point                  may raise
==========================  ====================================================
every entry point            TypeError (a float, str, None... where an integer
                             is expected: never truncated), OSError(EINVAL) /
                             CxlFlashError for an integer out of range
ChunkAllocator()             ValueError (total outside 1..2**58), MemoryError
                             (a bitmap that cannot be had)
ChunkAllocator methods       IndexError / ValueError (chunk out of range or
                             unallocated), OSError(ENOSPC)
ResourceTable methods        ValueError, IndexError, OSError (EMFILE, EIO,
                             AfuError, AdapterResetError), MemoryError (grow,
                             grow_from, load_slot, clone_*: an LXT that cannot
                             be allocated)
DataPath methods, listio     OSError (AfuError, EINVAL, EBADF, ...), ValueError
                             (buffer size), BufferError (a non-contiguous or
                             read-only buffer where a writable one is needed)
afu_command, raw_io          the same
scrub_chunks                 returns an errno; OSError(EINVAL), ValueError
pattern.fill / verify        OSError(EINVAL), ValueError, BufferError
==========================  ====================================================

OverflowError never escapes (nor ZeroDivisionError): an integer argument is
checked, not handed to a C conversion, and in-range arithmetic inside the
core must neither overflow nor wrap silently.
"""
import errno
import os

import numpy as np
import pytest
from hypothesis import example, given, note, strategies as st

from fuzzing import (EXTREME_INTS, NON_INTS, SETTINGS, _subtract, any_value, describe,
                     fuzz_settings, ints_near, run_all, run_batch)

CHUNK = 1 << 16
BS = 512                        # the fuzzed LUN's native block (32 MiB chunks)
NCHUNKS = 3                     # physical chunks of the fuzzed LUN
LUN_BYTES = NCHUNKS * CHUNK * BS
NO_LIMIT = 2 ** 64 - 1

# -- exceptions -------------------------------------------------------------------

ARG_ERRORS = (ValueError, TypeError, IndexError, BufferError)


def is_int_arg(x):
    return isinstance(x, int) and not isinstance(x, bool)


def has_float(args):
    return any(isinstance(a, float) for a in args)


def call(fn, *args, allowed=(), **kw):
    """Call; return ("ok", result) or ("exc", exception).  An exception not
    in ``ARG_ERRORS + allowed`` fails the property."""
    try:
        res = fn(*args, **kw)
    except Exception as e:         # noqa: BLE001
        if isinstance(e, OverflowError):
            raise AssertionError(f"{fn.__name__}{args!r} {kw!r}: OverflowError escaped: "
                                 f"{e}") from e
        if isinstance(e, OSError) and fn.__name__ in ("fill", "verify", "scrub_chunks"):
            assert e.errno == errno.EINVAL, f"{fn.__name__}: {describe(e)}"
        if isinstance(e, ZeroDivisionError) or not isinstance(e, ARG_ERRORS + allowed):
            raise AssertionError(f"{getattr(fn, '__name__', fn)}{args!r} {kw!r} "
                                 f"raised {describe(e)}") from e
        return "exc", e
    # A float where an integer is expected is a TypeError (issue 8, item 13:
    # write(0.5, ...) must not write LBA 0).
    assert not has_float(list(args) + list(kw.values())), \
        f"{getattr(fn, '__name__', fn)}{args!r} {kw!r} accepted a float (truncated it)"
    return "ok", res


# -- argument strategies ----------------------------------------------------------

def _to_dtype(xs, dtype):
    out = []
    for x in xs:
        if isinstance(x, int) and not isinstance(x, bool):
            if dtype == np.uint64:
                x %= 2 ** 64
            elif dtype == np.int64:
                x = (x + 2 ** 63) % 2 ** 64 - 2 ** 63
            elif dtype == np.int32:
                x = (x + 2 ** 31) % 2 ** 32 - 2 ** 31
            elif dtype == np.uint8:
                x %= 256
        out.append(x)
    return np.array(out, dtype=dtype)


ARRAY_KINDS = ["list", "tuple", "int64", "uint64", "int32", "uint8", "float64",
               "strided", "readonly", "2d"]
if os.environ.get("FUZZ_NO_FLOATS") == "1":
    ARRAY_KINDS.remove("float64")


@st.composite
def int_arrays(draw, elements, max_size=6):
    """A container of integers as a caller might pass it: a list, a tuple,
    or a numpy array of some dtype, possibly non-contiguous, read-only,
    2-D or empty."""
    xs = draw(st.lists(elements, max_size=max_size))
    kind = draw(st.sampled_from(ARRAY_KINDS))
    if kind == "list":
        return xs
    if kind == "tuple":
        return tuple(xs)
    ints = [x for x in xs if isinstance(x, int)]
    if kind == "float64":
        return np.array([float(x) for x in ints], dtype=np.float64)
    dt = {"int32": np.int32, "uint8": np.uint8, "uint64": np.uint64}.get(kind, np.int64)
    a = _to_dtype(ints, dt)
    if kind == "strided":
        a = np.repeat(a, 2)[::2]
    elif kind == "readonly":
        a.flags.writeable = False
    elif kind == "2d" and len(a) % 2 == 0:
        a = a.reshape(2, -1)
    return a


def small_or_extreme(lo, hi):
    return st.one_of(st.integers(lo, hi), st.sampled_from(EXTREME_INTS))


# -- 1. ChunkAllocator ----------------------------------------------------------


def alloc_state(a):
    n = a.total_chunks
    allocated = tuple(bool(a.is_allocated(i)) for i in range(n))
    counts = bytes(a.clone_counts(np.arange(n, dtype=np.int64)))
    return allocated, counts, a.free_count, a.space(), a.cursor, getattr(a, "parked_count", 0)


def check_alloc_invariants(a, st_):
    allocated, counts, free, space, _, parked = st_
    assert free == a.total_chunks - sum(allocated) - parked, \
        "free_count disagrees with the bitmap"
    assert a.allocated_count() == sum(allocated)
    for i, c in enumerate(counts):
        assert c == 0 or allocated[i], f"free chunk {i} has clone count {c}"
    limit = getattr(a, "limit", a.total_chunks)
    assert space == sum(1 for i in range(min(limit, a.total_chunks)) if not allocated[i])


AUN_ARG = st.one_of(st.integers(-2, 140), st.sampled_from(EXTREME_INTS),
                    st.sampled_from(NON_INTS))
AUNS_ARG = st.one_of(int_arrays(st.one_of(st.integers(-1, 135),
                                          st.sampled_from(EXTREME_INTS))),
                     st.sampled_from([v for v in [None, 1.5, "ab", b"\x00" * 8] if v in NON_INTS or not isinstance(v, float)]))

ALLOC_OPS = st.one_of(
    st.tuples(st.just("alloc")),
    st.tuples(st.just("free"), AUN_ARG),
    st.tuples(st.just("clone"), AUN_ARG),
    st.tuples(st.just("alloc_many"), st.one_of(st.integers(0, 140), any_value()),
              st.booleans()),
    st.tuples(st.just("free_many"), AUNS_ARG),
    st.tuples(st.just("clone_many"), AUNS_ARG),
    st.tuples(st.just("clone_count"), AUN_ARG),
    st.tuples(st.just("clone_counts"), AUNS_ARG),
    st.tuples(st.just("is_allocated"), AUN_ARG),
    st.tuples(st.just("release_many"), AUNS_ARG),
    st.tuples(st.just("set_limit"), st.one_of(st.integers(0, 140), any_value())),
)


def _aun_list(arg):
    """The chunk numbers a well-formed 1-D argument names, else None."""
    try:
        a = np.asarray(arg)
    except Exception:              # noqa: BLE001
        return None
    if a.dtype.kind not in "iu" or a.ndim > 1:
        return None if a.size else []
    return [int(x) for x in a.reshape(-1)]


@fuzz_settings(max_examples=150)
@given(total=st.sampled_from([1, 2, 63, 64, 65, 130]),
       ops=st.lists(ALLOC_OPS, min_size=1, max_size=12))
def _allocator_ops(total, ops):
    from cxlflash._core.allocator import ChunkAllocator
    a = ChunkAllocator(total)
    # Some chunks in use, some cloned, so frees and clones have work to do.
    a.alloc_many(min(total, 5))
    a.clone_many(np.arange(min(total, 3), dtype=np.int64))
    for op in ops:
        name, args = op[0], op[1:]
        fn = getattr(a, name, None)
        if fn is None:
            continue           # not in this build (release_many / set_limit)
        kw = {}
        if name == "alloc_many":
            args, kw = args[:1], {"partial": args[1]}
        before = alloc_state(a)
        allowed = (OSError,) if name in ("alloc", "alloc_many") else ()
        status, res = call(fn, *args, allowed=allowed, **kw)
        after = alloc_state(a)
        note(f"{name}{args} -> {status} {res!r}")
        check_alloc_invariants(a, after)
        b_alloc, b_counts = before[0], before[1]
        a_alloc, a_counts = after[0], after[1]
        if status == "exc":
            assert after == before, f"{name}{args} refused ({describe(res)}) but changed the allocator"
            if isinstance(res, OSError):
                assert res.errno == errno.ENOSPC
            continue
        limit = getattr(a, "limit", total)
        if name == "alloc":
            assert 0 <= res < limit and not b_alloc[res] and a_alloc[res]
            assert sum(a_alloc) == sum(b_alloc) + 1
        elif name == "alloc_many":
            got = [int(x) for x in res]
            assert len(set(got)) == len(got)
            assert all(0 <= g < limit and not b_alloc[g] and a_alloc[g] for g in got)
            assert sum(a_alloc) == sum(b_alloc) + len(got)
            n = args[0]
            assert len(got) == n or (kw["partial"] and len(got) == before[3])
        elif name in ("free", "clone", "free_many", "clone_many", "release_many"):
            auns = [args[0]] if name in ("free", "clone") else _aun_list(args[0])
            assert auns is not None, f"{name} accepted {args[0]!r}"
            assert all(0 <= x < total for x in auns), f"{name} accepted {auns}"
            refs = {i: (1 + b_counts[i]) if b_alloc[i] else 0 for i in range(total)}
            exp_alloc, exp_counts = list(b_alloc), list(b_counts)
            if name in ("free", "free_many"):
                failed = 0
                for x in auns:
                    if refs[x] == 0:
                        failed += 1
                    elif exp_counts[x]:
                        exp_counts[x] -= 1
                        refs[x] -= 1
                    else:
                        exp_alloc[x] = False
                        refs[x] = 0
                if name == "free":
                    assert res == (failed == 0)
                else:
                    assert res == failed
            elif name in ("clone", "clone_many"):
                ok = all(b_alloc[x] for x in auns)
                for x in auns:
                    exp_counts[x] += 1
                ok = ok and all(c <= 255 for c in exp_counts)
                if not ok:
                    exp_counts = list(b_counts)
                assert bool(res) == ok
            else:                               # release_many
                assert all(b_alloc[x] for x in auns)
                last = []
                for x in auns:
                    if exp_counts[x]:
                        exp_counts[x] -= 1
                    else:
                        last.append(x)
                if len(set(auns)) == len(auns):
                    assert [int(v) for v in res] == last
                for x in last:                  # still allocated
                    assert a_alloc[x]
            assert list(a_alloc) == exp_alloc, f"{name}{args}: bitmap differs"
            assert list(a_counts) == exp_counts, f"{name}{args}: clone counts differ"
        elif name == "set_limit":
            assert a.limit == args[0]
            assert (after[0], after[1]) == (before[0], before[1]), \
                "set_limit changed what is allocated"
            assert after[2] == sum(1 for i in range(args[0]) if not a_alloc[i])
        else:
            assert (after[0], after[1], after[2]) == (before[0], before[1], before[2]), \
                f"{name} changed the allocator"
            if name == "clone_count":
                assert res == b_counts[args[0]]
            elif name == "clone_counts":
                assert [int(x) for x in res] == [b_counts[i] for i in _aun_list(args[0])]
            elif name == "is_allocated":
                assert res == b_alloc[args[0]]


@SETTINGS
@given(total=any_value(st.integers(0, 200)))
@example(total=2 ** 63 - 1)
@example(total=2 ** 58 + 1)
@example(total=0.5)
def _allocator_totals(total):
    from cxlflash._core.allocator import ChunkAllocator
    status, a = call(ChunkAllocator, total, allowed=(MemoryError,))
    if status == "ok":
        assert not has_float([total]), f"ChunkAllocator({total!r}) accepted a float"
        assert 1 <= total <= 2 ** 58
        assert a.total_chunks == total and a.free_count == total
        assert a.words == (total + 63) // 64
    elif isinstance(a, MemoryError):
        assert 2 ** 30 < total <= 2 ** 58, f"MemoryError for a total of {total}"
    elif isinstance(total, int) and 1 <= total <= 2 ** 20:
        raise AssertionError(f"ChunkAllocator({total}) refused: {describe(a)}")


def batch_allocator():
    run_all(_allocator_totals, _allocator_ops)


# -- 2. ResourceTable -------------------------------------------------------------


def table_state(t):
    rows = []
    for h in range(t.rht_size):
        e = t.entry(h)
        lxt = b""
        if e.get("open") and e.get("format") == 0:
            lxt = t.lxt(h).tobytes()
            e = dict(e, cap=t.lxt_capacity(h))
        rows.append((tuple(sorted(e.items())), lxt))
    return rows, t.rht_out, getattr(t, "state", None)


def check_table_invariants(t):
    opened = t.open_handles()
    assert t.rht_out == len(opened), f"rht_out {t.rht_out} but {len(opened)} open"
    for h in opened:
        if t.is_virtual(h):
            cnt, cap = t.lxt_count(h), t.lxt_capacity(h)
            assert cap % 8 == 0 and cap >= cnt, f"handle {h}: lxt_cnt {cnt} cap {cap}"
            assert len(t.auns(h)) == cnt == len(t.lxt(h))


HANDLE = st.one_of(st.integers(0, 5), st.sampled_from(EXTREME_INTS), st.sampled_from(NON_INTS))
PERMS = st.one_of(st.integers(0, 3), st.sampled_from(EXTREME_INTS))
LBA = st.one_of(st.integers(0, 3 * CHUNK), ints_near(CHUNK, 2 * CHUNK, 2 ** 63, 2 ** 64),
                st.sampled_from(EXTREME_INTS), st.sampled_from(NON_INTS))
LBAS = int_arrays(st.one_of(st.integers(0, 3 * CHUNK), st.sampled_from(EXTREME_INTS)))

TABLE_OPS = st.one_of(
    st.tuples(st.just("open_virtual"), PERMS),
    st.tuples(st.just("open_direct"), PERMS, any_value(), any_value(st.integers(0, 16)),
              any_value(st.integers(0, 3 * CHUNK))),
    st.tuples(st.just("close"), HANDLE),
    st.tuples(st.just("grow"), HANDLE, AUNS_ARG, any_value(), any_value()),
    st.tuples(st.just("grow_from"), HANDLE, any_value(st.integers(0, 70)), any_value(),
              any_value()),
    st.tuples(st.just("shrink"), HANDLE, any_value(st.integers(0, 8))),
    st.tuples(st.just("translate"), HANDLE, LBA, st.booleans()),
    st.tuples(st.just("translate_many"), HANDLE, LBAS, st.booleans(), st.integers(0, 3)),
    st.tuples(st.just("clone_slot"), HANDLE, PERMS, st.booleans()),
    st.tuples(st.just("clone_from"), PERMS, st.booleans()),
    st.tuples(st.just("load_slot"), HANDLE, any_value(st.integers(0, 1)), PERMS,
              any_value(st.integers(0, 16)), st.one_of(st.none(), LBAS), any_value(),
              any_value(), st.booleans()),
    st.tuples(st.just("set_state"), any_value(st.integers(0, 3))),
    st.tuples(st.just("introspect"), HANDLE),
    st.tuples(st.just("watch_epoch"), st.sampled_from(["aligned", "short", "unaligned",
                                                       "bytes", "none", "int"]),
              any_value(st.integers(0, 2))),
    st.tuples(st.just("fence"), PERMS, HANDLE),
)


def _expected_plba(t, h, v, write, epoch_moved=False):
    """What translate must answer, or None when it must refuse."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 2 ** 64:
        return None
    if not isinstance(h, int) or not 0 <= h < t.rht_size or not t.is_open(h):
        return None
    if getattr(t, "state", 0) != 0 or epoch_moved:
        return None
    if not t.perms(h) & (2 if write else 1):
        return None
    if t.is_virtual(h):
        lxt = t.lxt(h)
        if v >> 16 >= len(lxt):
            return None
        e = int(lxt[v >> 16])
        if not (e >> 4) & (2 if write else 1):
            return None
        return (e & ~0xFFFF) | (v & 0xFFFF)
    last = t.entry(h)["last_lba"]
    return v if v <= last else None


@fuzz_settings(max_examples=150)
@given(size=st.sampled_from([1, 4, 8]), ops=st.lists(TABLE_OPS, min_size=1, max_size=10))
def _table_ops(size, ops):
    from cxlflash._core.allocator import ChunkAllocator
    from cxlflash._core.tables import ResourceTable
    t = ResourceTable(size)
    src = ResourceTable(8)
    alloc = ChunkAllocator(64)
    # A source to clone from: a vLUN of 3 chunks, an empty one, a direct one.
    src.open_virtual(3)
    src.grow_from(0, alloc, 3, 0, 1)
    src.open_virtual(1)
    src.open_direct(3, 0x10, 1, 1000)
    t.open_virtual(3)
    t.grow(0, alloc.alloc_many(2), 1, 1)
    keep = []
    epoch_moved = [False]
    for op in ops:
        name, args = op[0], list(op[1:])
        allowed = (OSError, MemoryError)
        kw = {}
        if name == "grow_from":
            args = [args[0], alloc] + args[1:]
        elif name == "translate_many":
            out_kind = args.pop()
            lbas = args[1]
            n = len(lbas) if hasattr(lbas, "__len__") else 0
            kw["out"] = [None, np.empty(n, np.uint64), np.empty(n + 1, np.uint64),
                         np.empty(n, np.int64)][out_kind]
            kw["write"] = args.pop()
        elif name == "translate":
            kw["write"] = args.pop()
        elif name == "clone_slot":
            use = args.pop()
            args = [src] + args + ([alloc] if use else [])
        elif name == "clone_from":
            use = args.pop()
            args = [src] + args + ([alloc] if use else [])
        elif name == "load_slot":
            kw = dict(lxt=args[4], lun_id=args[5], last_lba=args[6], replace=args[7])
            args = args[:4]
        if name == "watch_epoch":
            kind, seen = args
            mem = np.zeros(4, np.uint64)
            mem[0] = 7
            buf = {"aligned": mem, "short": mem.view(np.uint8)[:4],
                   "unaligned": mem.view(np.uint8)[1:17], "bytes": mem.tobytes(),
                   "none": None, "int": 5}[kind]
            before = table_state(t)
            status, res = call(t.watch_epoch, buf, seen, allowed=(OSError,))
            assert table_state(t)[:2] == before[:2], "watch_epoch changed the table"
            if status == "ok":
                assert kind in ("aligned", "bytes")
                keep.append(buf)                   # the table reads it from now on
                epoch_moved[0] = seen != 7
            continue
        if name == "fence":
            perms, h = args
            before = table_state(t)
            try:
                with t.fence():
                    st1, r1 = call(t.open_virtual, perms, allowed=(OSError,))
                    if st1 == "ok":
                        t.close(r1)
                    call(t.is_open, h)
            except Exception as e:                 # noqa: BLE001
                raise AssertionError(f"fence(): {describe(e)}") from e
            assert table_state(t) == before, "a fenced open + close changed the table"
            continue
        if name == "introspect":
            h = args[0]
            for m in ("is_open", "is_virtual", "perms", "lxt_count", "lxt_capacity",
                      "lxt", "auns", "extent", "entry"):
                before = table_state(t)
                call(getattr(t, m), h)
                assert table_state(t) == before, f"{m}({h!r}) changed the table"
            continue
        fn = getattr(t, name, None)
        if fn is None:
            continue
        before = table_state(t)
        alloc_before = alloc_state(alloc)
        if name in ("translate", "translate_many"):
            h, lbas = args[0], args[1]
            if name == "translate":
                expect = [_expected_plba(t, h, lbas, kw["write"], epoch_moved[0])]
            else:
                flat = _aun_list(lbas)
                expect = None if flat is None else [
                    _expected_plba(t, h, v, kw["write"], epoch_moved[0]) for v in flat]
                if expect == [] and not (isinstance(h, int) and 0 <= h < t.rht_size
                                         and t.is_open(h)):
                    expect = None          # no LBA, a bad handle: either answer
        status, res = call(fn, *args, allowed=allowed, **kw)
        note(f"{name}{tuple(args)} {kw} -> {status} {res!r}")
        after = table_state(t)
        check_table_invariants(t)
        check_table_invariants(src)
        if status == "exc":
            assert after == before, f"{name} refused ({describe(res)}) but changed the table"
            assert alloc_state(alloc)[:3] == alloc_before[:3], \
                f"{name} refused ({describe(res)}) but changed the allocator"
            if name == "translate" and expect[0] is not None:
                raise AssertionError(f"translate({args}) refused a valid LBA: {describe(res)}")
            lb = args[1] if name == "translate_many" else None
            if name == "translate_many" and expect is not None and None not in expect \
                    and kw["out"] is None and isinstance(lb, np.ndarray) and \
                    lb.dtype in (np.int64, np.uint64) and lb.ndim == 1 and \
                    lb.flags.c_contiguous:
                raise AssertionError(f"translate_many refused valid LBAs: {describe(res)}")
            continue
        if name == "translate":
            assert expect[0] is not None, f"translate({args}) answered {res} for an invalid LBA"
            assert res == expect[0]
        elif name == "translate_many" and len(res):
            assert expect is not None and None not in expect, \
                f"translate_many({args}) accepted {expect}"
            assert [int(x) for x in res] == expect
        elif name in ("open_virtual", "open_direct"):
            assert t.is_open(res) and after[1] == before[1] + 1
        elif name == "close":
            assert not t.is_open(args[0]) and after[1] == before[1] - 1
        elif name == "shrink":
            assert t.lxt_count(args[0]) == args[1]
        elif name == "set_state":
            assert t.state == args[0]


@SETTINGS
@given(size=any_value(st.integers(0, 5000)))
def _table_sizes(size):
    from cxlflash._core.tables import ResourceTable
    status, t = call(ResourceTable, size)
    if status == "ok":
        assert isinstance(size, int) and 1 <= size <= 4096 and t.rht_size == size


def batch_tables():
    run_all(_table_sizes, _table_ops)


# -- 3. The data path over a pattern-filled LUN -----------------------------------

class Lun:
    """A memory LUN of NCHUNKS chunks of 512-byte blocks (96 MiB, sparse):
    a vLUN of two chunks (virtual chunk 0 -> physical 1, 1 -> 0; physical
    chunk 2 belongs to nobody) and a direct handle over all of it.

    Windows of 16 KiB around every chunk boundary hold a pattern (every
    8-byte word its own index); the rest is a hole.  ``check`` compares
    the windows and every range the test expects to have changed with the
    reference, and asks the file system (SEEK_DATA) that no data exists
    anywhere else: a stray write anywhere in the 96 MiB is found without
    reading them."""

    PAGE = 4096
    HALF = 16384

    def __init__(self):
        from cxlflash._core.tables import ResourceTable
        self.fd = os.memfd_create("fuzz-lun", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, LUN_BYTES)
        self.ref = np.zeros(LUN_BYTES, dtype=np.uint8)       # lazily zero
        self.windows = []
        for b in range(NCHUNKS + 1):
            a = max(b * CHUNK * BS - self.HALF, 0)
            self.windows.append((a, min(b * CHUNK * BS + self.HALF, LUN_BYTES)))
        self.dirty = []
        self.table = ResourceTable(4)
        self.vh = self.table.open_virtual(3)
        self.table.grow(self.vh, np.array([1, 0]), 0, 1)
        self.dh = self.table.open_direct(3, 0, 1, NCHUNKS * CHUNK - 1)
        self.phys_of = {self.vh: lambda v: ((1 - (v >> 16)) << 16) | (v & 0xFFFF),
                        self.dh: lambda v: v}
        self.extent = {self.vh: 2 * CHUNK, self.dh: NCHUNKS * CHUNK}
        self.fresh = False
        self.reset()

    def reset(self):
        """Back to the pattern windows over a hole (between examples)."""
        if self.fresh:
            return
        os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, LUN_BYTES)
        for a, b in self.dirty:
            self.ref[a:b] = 0
        self.dirty = []
        for a, b in self.windows:
            self.ref[a:b] = np.arange(a // 8, b // 8, dtype=np.uint64).view(np.uint8)
            os.pwrite(self.fd, self.ref[a:b].tobytes(), a)
        self.fresh = True

    def set(self, a, b, data):
        """The test expects bytes [a, b) to hold ``data`` now."""
        self.ref[a:b] = data
        self.dirty.append((a, b))
        self.fresh = False

    def _allowed(self, extra=()):
        P = self.PAGE
        return sorted((a // P * P, -(-b // P) * P)
                      for a, b in self.windows + self.dirty + list(extra))

    def check(self, what, extra=()):
        """``extra``: byte ranges that may hold data the test does not model
        (compared separately by the caller)."""
        self.fresh = False
        assert os.fstat(self.fd).st_size == LUN_BYTES, f"{what}: the backing size changed"
        for a, b in _subtract(self.windows + self.dirty, extra):
            got = np.frombuffer(os.pread(self.fd, b - a, a), np.uint8)
            if not np.array_equal(got, self.ref[a:b]):
                bad = np.flatnonzero(got != self.ref[a:b]) + a
                raise AssertionError(
                    f"{what}: {len(bad)} bytes differ from the expected LUN in "
                    f"[{a}, {b}), physical blocks {sorted(set((bad // BS).tolist()))[:8]}")
        allowed = self._allowed(extra)
        pos = 0
        while pos < LUN_BYTES:
            try:
                d = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            h = os.lseek(self.fd, d, os.SEEK_HOLE)
            # every page of [d, h) must be inside an allowed range
            p = d
            for a, b in allowed:
                if a <= p < b:
                    p = b
                if p >= h:
                    break
            if p < h:
                raise AssertionError(f"{what}: data was written at byte {p} (physical "
                                     f"block {p // BS}), outside every addressed range")
            pos = h

    def blocks(self, h, lba, n):
        """Byte ranges of the physical blocks under [lba, lba+n) (one range
        per chunk piece)."""
        out = []
        v = lba
        while v < lba + n:
            k = min(lba + n - v, CHUNK - (v & 0xFFFF)) if h == self.vh else lba + n - v
            p = self.phys_of[h](v)
            out.append((p * BS, (p + k) * BS))
            v += k
        return out


def guarded(nbytes, kind, fill=0xA5):
    """A buffer of ``nbytes`` in the middle of a larger array whose guard
    bytes must never change; returns (buffer, whole, start)."""
    whole = np.full(nbytes + 2 * 4096, fill, dtype=np.uint8)
    start = 4096
    view = whole[start:start + nbytes]
    if kind == "bytearray":
        # A bytearray cannot share memory: the caller copies it back.
        return bytearray(view.tobytes()), whole, start
    if kind == "bytes":
        return view.tobytes(), whole, start
    if kind == "memoryview":
        return memoryview(view), whole, start
    if kind == "readonly":
        v = view.view()
        v.flags.writeable = False
        return v, whole, start
    if kind == "strided":                 # non-contiguous
        return whole[start:start + 2 * nbytes:2] if nbytes else view[::2], whole, start
    if kind == "memoryview-step":
        return memoryview(whole)[start:start + 2 * nbytes:2], whole, start
    if kind == "uint64":
        return view.view(np.uint64) if nbytes % 8 == 0 else view, whole, start
    return view, whole, start


BUF_KINDS = ["numpy", "bytearray", "bytes", "memoryview", "readonly", "strided",
             "memoryview-step", "uint64"]
NBLK = st.one_of(st.integers(0, 4), st.sampled_from([CHUNK - 1, CHUNK, CHUNK + 1]),
                 st.sampled_from(EXTREME_INTS), st.sampled_from(NON_INTS))
IO_LBA = st.one_of(st.integers(0, 8), ints_near(CHUNK, 2 * CHUNK, 3 * CHUNK, spread=3),
                   ints_near(2 ** 63, 2 ** 64, spread=3), st.sampled_from(EXTREME_INTS),
                   st.sampled_from(NON_INTS))
IO_OPS = st.one_of(
    st.tuples(st.just("readinto"), IO_LBA, st.integers(0, 4), st.sampled_from(BUF_KINDS)),
    st.tuples(st.just("write"), IO_LBA, st.integers(0, 4), st.sampled_from(BUF_KINDS)),
    st.tuples(st.just("read"), IO_LBA, NBLK),
    st.tuples(st.just("unmap"), IO_LBA, NBLK),
    st.tuples(st.just("translate"), LBAS),
)

_LUN = None


def lun():
    global _LUN
    if _LUN is None:
        _LUN = Lun()
    _LUN.reset()
    return _LUN


def _valid_range(L, h, lba, n, limit):
    """Whether [lba, lba+n) is a transfer the data path must accept (True),
    must refuse (False), or may do either (None: zero blocks at an LBA
    beyond the end address nothing)."""
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lba, n)):
        return False
    if lba < 0 or n < 0 or lba >= 2 ** 64 or n >= 2 ** 64:
        return False
    if n == 0:
        return True if lba < min(L.extent[h], limit) else None
    return lba + n <= L.extent[h] and lba + n <= limit


def _buf_ok_for(kind, nbytes, write):
    """Whether the buffer must be accepted (True), refused (False), or
    either (None: an empty non-contiguous view)."""
    if not write and kind in ("bytes", "readonly"):
        return False
    if kind in ("strided", "memoryview-step"):
        return False if nbytes > 1 else None
    return True


@fuzz_settings(max_examples=120)
@given(which=st.sampled_from(["virtual", "direct"]),
       max_xfer=st.sampled_from([0, 1, 3, CHUNK, 2 ** 64 - 1]),
       limit=st.sampled_from([NO_LIMIT, NO_LIMIT, 0, 5, CHUNK + 1, 2 ** 63]),
       ops=st.lists(IO_OPS, min_size=1, max_size=4))
# The cases: a read whose byte count wraps, a huge read that must be
# refused before its buffer is allocated, unmaps whose last block wraps.
@example(which="virtual", max_xfer=0, limit=NO_LIMIT, ops=[("read", 0, 2 ** 52 + 1)])
@example(which="virtual", max_xfer=0, limit=NO_LIMIT, ops=[("read", 1914, 2 ** 48)])
@example(which="direct", max_xfer=0, limit=NO_LIMIT, ops=[("unmap", 5, 2 ** 64 - 4)])
@example(which="virtual", max_xfer=0, limit=NO_LIMIT, ops=[("unmap", CHUNK, 2 ** 64 - CHUNK + 1)])
@example(which="virtual", max_xfer=1, limit=NO_LIMIT, ops=[("write", 2 * CHUNK - 1, 2, "numpy")])
@example(which="virtual", max_xfer=0, limit=NO_LIMIT, ops=[("write", 0.5, 1, "numpy")])
def _datapath_io(which, max_xfer, limit, ops):
    from cxlflash._core.datapath import DataPath
    L = lun()
    h = L.vh if which == "virtual" else L.dh
    dp = DataPath(L.table, h, L.fd, BS, max_xfer=max_xfer)
    dp.limit = limit
    for op in ops:
        name, lba = op[0], op[1]
        what = f"{which} {name}{op[1:]} max_xfer={max_xfer} limit={limit}"
        if name in ("readinto", "write"):
            n, kind = op[2], op[3]
            buf, whole, start = guarded(n * BS, kind, fill=0x5A)
            if name == "write":
                pat = np.arange(n * BS, dtype=np.uint8) ^ 0x3C
                whole[start:start + n * BS] = pat
                if kind in ("bytearray", "bytes"):
                    buf = type(buf)(pat.tobytes())
            guard = whole.copy()
            status, res = call(getattr(dp, name), lba, buf, allowed=(OSError,))
            if kind == "bytearray":
                whole[start:start + n * BS] = np.frombuffer(bytes(buf), np.uint8)
            must = _valid_range(L, h, lba, n, limit)
            ok = _buf_ok_for(kind, n * BS, name == "write")
            if ok is not True and must is not False:
                must = ok
            if status == "ok":
                assert must is not False, f"{what} accepted"
                assert res == n
                if name == "write":
                    for a, b in L.blocks(h, lba, n):
                        L.set(a, b, pat[:b - a])
                        pat = pat[b - a:]
                    assert np.array_equal(whole, guard), f"{what} changed its source"
                else:
                    got = whole[start:start + n * BS]
                    exp = np.concatenate([L.ref[a:b] for a, b in L.blocks(h, lba, n)]
                                         or [np.empty(0, np.uint8)])
                    assert np.array_equal(got, exp), f"{what} read wrong data"
                    assert np.array_equal(whole[:start], guard[:start])
                    assert np.array_equal(whole[start + n * BS:], guard[start + n * BS:])
            else:
                assert must is not True, f"{what} refused: {describe(res)}"
                assert np.array_equal(whole, guard), f"{what} refused but changed the buffer"
        elif name == "read":
            n = op[2]
            status, res = call(dp.read, lba, n, allowed=(OSError,))
            must = _valid_range(L, h, lba, n, limit)
            if status == "ok":
                assert must is not False, f"{what} accepted"
                exp = np.concatenate([L.ref[a:b] for a, b in L.blocks(h, lba, n)]
                                     or [np.empty(0, np.uint8)])
                assert len(res) == n * BS, f"{what} returned {len(res)} bytes"
                assert np.array_equal(np.frombuffer(bytes(res), np.uint8), exp)
            else:
                assert must is not True, f"{what} refused: {describe(res)}"
        elif name == "unmap":
            n = op[2]
            status, res = call(dp.unmap, lba, n, allowed=(OSError,))
            must = _valid_range(L, h, lba, n, limit)
            if status == "ok":
                assert must is not False, f"{what} accepted"
                for a, b in L.blocks(h, lba, n):
                    L.set(a, b, 0)
            else:
                assert must is not True, f"{what} refused: {describe(res)}"
        else:
            lbas = op[1]
            call(dp.translate, lbas, allowed=(OSError,))
        L.check(what)


LIST_OP = st.one_of(st.sampled_from([1, 2, 3]), st.sampled_from([0, 4, 255, -1, 2 ** 64]))
LIST_REQ = st.tuples(LIST_OP, st.one_of(st.integers(0, 4), ints_near(CHUNK, 2 * CHUNK),
                                        st.sampled_from(EXTREME_INTS)),
                     st.one_of(st.integers(0, 3), st.sampled_from(EXTREME_INTS)),
                     st.one_of(st.integers(0, 8).map(lambda k: k * BS), st.integers(0, 4096),
                               st.sampled_from(EXTREME_INTS)))


def _u64(x):
    return x % 2 ** 64 if isinstance(x, int) else x


@fuzz_settings(max_examples=120)
@given(which=st.sampled_from(["virtual", "direct"]),
       limit=st.sampled_from([NO_LIMIT, NO_LIMIT, 3, CHUNK + 1]),
       reqs=st.lists(LIST_REQ, max_size=5),
       shape=st.sampled_from(["ok", "short-lbas", "short-offsets", "short-nblocks",
                              "2d", "float-lbas", "lists", "strided"]),
       buf_kind=st.sampled_from(["numpy", "numpy", "bytes", "readonly", "strided",
                                 "empty"]),
       lat=st.sampled_from([None, "ok", "short", "int32", "readonly"]))
@example(which="direct", limit=NO_LIMIT, reqs=[(3, 5, 2 ** 64 - 4, 0)], shape="ok",
         buf_kind="numpy", lat=None)
@example(which="virtual", limit=NO_LIMIT, reqs=[(1, 0, 1, 2 ** 64 - 4096)], shape="ok",
         buf_kind="numpy", lat=None)
@example(which="virtual", limit=NO_LIMIT, reqs=[(2, 0, 2 ** 55, 4096)], shape="ok",
         buf_kind="numpy", lat=None)
def _datapath_listio(which, limit, reqs, shape, buf_kind, lat):
    from cxlflash._core.datapath import DataPath
    L = lun()
    h = L.vh if which == "virtual" else L.dh
    dp = DataPath(L.table, h, L.fd, BS)
    dp.limit = limit
    nbuf = 0 if buf_kind == "empty" else 10 * BS
    buf, whole, start = guarded(nbuf, buf_kind if buf_kind != "empty" else "numpy")
    whole[start:start + nbuf] = np.arange(nbuf, dtype=np.uint8) ^ 0x77
    guard = whole.copy()
    n = len(reqs)
    ops = _to_dtype([r[0] for r in reqs], np.uint8) if reqs else np.zeros(0, np.uint8)
    lbas = _to_dtype([r[1] for r in reqs], np.uint64)
    nbl = _to_dtype([r[2] for r in reqs], np.uint64)
    offs = _to_dtype([r[3] for r in reqs], np.uint64)
    if shape == "short-lbas" and n:
        lbas = lbas[:-1]
    elif shape == "short-offsets" and n:
        offs = offs[:-1]
    elif shape == "short-nblocks" and n:
        nbl = nbl[:-1]
    elif shape == "2d" and n == 4:
        lbas = lbas.reshape(2, 2)
    elif shape == "float-lbas":
        lbas = lbas.astype(np.float64) + 0.5
    elif shape == "lists":
        ops, lbas, nbl, offs = ([r[0] for r in reqs], [r[1] for r in reqs],
                                [r[2] for r in reqs], [r[3] for r in reqs])
    elif shape == "strided":
        lbas = np.repeat(lbas, 2)[::2]
    lat_ns = {None: None, "ok": np.zeros(n, np.int64), "short": np.zeros(max(n - 1, 0), np.int64),
              "int32": np.zeros(n, np.int32), "readonly": np.zeros(n, np.int64)}[lat]
    if lat == "readonly":
        lat_ns.flags.writeable = False
    what = f"{which} listio {reqs} shape={shape} buf={buf_kind} lat={lat} limit={limit}"
    status, res = call(dp.listio, ops, lbas, nbl, buf, offs, lat_ns, allowed=(OSError,))
    if status == "exc":
        assert np.array_equal(whole, guard), f"{what} refused but changed the buffer"
        L.check(what)
        return
    st_, codes = res
    assert len(st_) == n and len(codes) == n
    sim = guard.copy()
    for i, (o, lba, k, off) in enumerate(reqs):
        s = int(st_[i])
        o, lba, k, off = _u64(o) % 256, _u64(lba), _u64(k), _u64(off)
        if shape == "float-lbas":
            lba = int(float(lba) + 0.5)
        valid = _valid_range(L, h, lba, k, limit)
        if not (o in (1, 2, 3) and (o == 3 or off + k * BS <= nbuf)
                and (o != 1 or buf_kind not in ("bytes", "readonly"))):
            valid = False
        if s >= 0:
            assert valid is not False, f"{what}: request {i} accepted"
            assert s == k
            if o == 1:
                data = np.concatenate([L.ref[a:b] for a, b in L.blocks(h, lba, k)]
                                      or [np.empty(0, np.uint8)])
                sim[start + off:start + off + k * BS] = data
            elif o == 2:
                data = sim[start + off:start + off + k * BS]
                for a, b in L.blocks(h, lba, k):
                    L.set(a, b, data[:b - a])
                    data = data[b - a:]
            else:
                for a, b in L.blocks(h, lba, k):
                    L.set(a, b, 0)
        else:
            assert valid is not True or buf_kind in ("bytes", "readonly"), \
                f"{what}: request {i} refused with {s}"
    assert np.array_equal(whole, sim), f"{what}: the buffer is not what the requests made it"
    L.check(what)


@fuzz_settings(max_examples=80)
@given(handle=st.one_of(st.integers(0, 4), st.sampled_from(EXTREME_INTS)),
       fd=st.sampled_from(["lun", -1, 2 ** 31 - 1, 2 ** 31, -(2 ** 31) - 1]),
       block_size=st.one_of(st.sampled_from([512, 512, 0, 1, 7, 511, 513, 4096, 2 ** 32 - 1,
                                             2 ** 32, -1, -512]), st.sampled_from(NON_INTS)),
       lba=IO_LBA, n=st.integers(0, 3), kind=st.sampled_from(BUF_KINDS),
       write=st.booleans(), max_xfer=st.sampled_from([0, 1, 2 ** 64 - 1, -1, 2 ** 64]))
@example(handle=0, fd="lun", block_size=0, lba=0, n=1, kind="numpy", write=False, max_xfer=0)
@example(handle=1, fd="lun", block_size=512, lba=2 ** 64 - 1, n=2, kind="numpy", write=True,
         max_xfer=0)
def _afu_command_and_ctor(handle, fd, block_size, lba, n, kind, write, max_xfer):
    from cxlflash._core.datapath import DataPath, afu_command
    L = lun()
    real_fd = L.fd if fd == "lun" else fd
    if write and block_size != 512:
        write = False            # a write with another block size addresses
                                 # other bytes (and may grow the file): reads only
    bsz = block_size if isinstance(block_size, int) and 0 < block_size < 2 ** 20 else BS
    buf, whole, start = guarded(n * bsz, kind)
    guard = whole.copy()
    what = f"afu_command(h={handle}, fd={fd}, bs={block_size}, lba={lba}, n={n}, {kind}, write={write})"
    status, res = call(afu_command, L.table, handle, real_fd, block_size, lba, buf,
                       write, allowed=(OSError,))
    if kind == "bytearray":
        whole[start:start + n * bsz] = np.frombuffer(bytes(buf), np.uint8)
    if status == "ok":
        # fd -1: the fd the handle was opened on (none here: only a
        # zero-block command can succeed with it).
        assert block_size == bsz and handle in (L.vh, L.dh) and (fd == "lun" or n == 0), \
            f"{what} accepted"
        assert _valid_range(L, handle, lba, n, NO_LIMIT) is not False, f"{what} accepted"
        assert res == n
        if not write and block_size == BS:
            exp = np.concatenate([L.ref[a:b] for a, b in L.blocks(handle, lba, n)]
                                 or [np.empty(0, np.uint8)])
            assert np.array_equal(whole[start:start + n * bsz], exp)
    else:
        assert np.array_equal(whole, guard), f"{what} refused but changed the buffer"
        if block_size == BS and fd == "lun" and handle in (L.vh, L.dh) and \
                _valid_range(L, handle, lba, n, NO_LIMIT) and \
                _buf_ok_for(kind, n * BS, write) is True:
            raise AssertionError(f"{what} refused: {describe(res)}")
    if write and status == "ok":
        pat = whole[start:start + n * bsz]
        for a, b in L.blocks(handle, lba, n):
            L.set(a, b, pat[:b - a])
            pat = pat[b - a:]
    L.check(what)
    # The constructor with the same extremes.
    status, dp = call(DataPath, L.table, handle, real_fd, block_size,
                      max_xfer=max_xfer, allowed=(OSError,))
    if status == "ok":
        assert is_int_arg(block_size) and 0 < block_size < 2 ** 32 and block_size % 512 == 0, \
            f"DataPath(block_size={block_size!r}) accepted"
        assert is_int_arg(max_xfer) and 0 <= max_xfer < 2 ** 64, \
            f"DataPath(max_xfer={max_xfer!r}) accepted"


def batch_datapath():
    _datapath_io()


def batch_listio():
    _datapath_listio()


def batch_afu_command():
    _afu_command_and_ctor()


# -- 4. raw_io, pattern.fill / verify, scrub_chunks ------------------------------


SCRATCH = 65536


@fuzz_settings(max_examples=120)
@given(reqs=st.lists(st.tuples(st.sampled_from([1, 1, 2, 0, 3, 255]),
                               st.one_of(st.integers(0, 8).map(lambda k: k * 4096),
                                         st.integers(0, SCRATCH), st.sampled_from(EXTREME_INTS)),
                               st.one_of(st.integers(0, 4).map(lambda k: k * 1024),
                                         st.sampled_from(EXTREME_INTS))),
                     max_size=4),
       nbytes=st.one_of(st.sampled_from([0, 1, 512, 1024, 4096]), st.sampled_from(EXTREME_INTS)),
       kind=st.sampled_from(["numpy", "bytes", "readonly", "strided", "memoryview"]),
       default_offsets=st.booleans(), short=st.booleans())
@example(reqs=[(1, 0, 2 ** 64 - 4096)], nbytes=4096, kind="numpy", default_offsets=False,
         short=False)
@example(reqs=[(1, 0, 0), (1, 0, 0)], nbytes=2 ** 63, kind="numpy", default_offsets=True,
         short=False)
def _raw_io(reqs, nbytes, kind, default_offsets, short):
    from cxlflash._core.rawio import raw_io
    fd = os.memfd_create("fuzz-raw", os.MFD_CLOEXEC)
    try:
        content = (np.arange(SCRATCH, dtype=np.uint32) * 2654435761 >> 7).astype(np.uint8)
        os.pwrite(fd, content.tobytes(), 0)
        buf, whole, start = guarded(8192, kind)
        guard = whole.copy()
        n = len(reqs)
        ops = np.array([r[0] for r in reqs], dtype=np.uint8)
        # Writes stay inside the scratch file (raw_io does not check the
        # backing store: that is its point); reads may go anywhere.
        offs = _to_dtype([r[1] if r[0] != 2 else min(max(r[1], 0), SCRATCH - 4096)
                          for r in reqs], np.uint64)
        boffs = None if default_offsets else _to_dtype([r[2] for r in reqs], np.uint64)
        if short and boffs is not None and n:
            boffs = boffs[:-1]
        nb = nbytes if not any(r[0] == 2 for r in reqs) else min(max(nbytes, 0), 4096) \
            if isinstance(nbytes, int) else nbytes
        what = f"raw_io({reqs}, nbytes={nb}, {kind}, default_offsets={default_offsets})"
        status, res = call(raw_io, fd, ops, offs, nb, buf, boffs, allowed=(OSError,))
        after_file = np.frombuffer(os.pread(fd, SCRATCH, 0), np.uint8)
        if status == "exc":
            # A request may have run before a later one failed in the
            # kernel: only each request's own bytes may have changed.
            pass
        allowed_mask = np.zeros(len(whole), bool)
        for i, (o, off, bo) in enumerate(reqs):
            b = i * nb if default_offsets else bo
            if isinstance(nb, int) and 0 <= b and 0 <= nb and b + nb <= 8192:
                allowed_mask[start + b:start + b + nb] = True
        changed = whole != guard
        assert not (changed & ~allowed_mask).any(), \
            f"{what}: bytes outside every request's buffer range changed " \
            f"(offsets {np.flatnonzero(changed & ~allowed_mask)[:5] - start})"
        if status == "ok":
            assert res == n
            for i, (o, off, bo) in enumerate(reqs):
                b = i * nb if default_offsets else bo
                assert 0 <= b and b + nb <= 8192, f"{what}: request {i} accepted"
        if os.fstat(fd).st_size != SCRATCH:
            raise AssertionError(f"{what}: the scratch file changed size")
        del after_file
    finally:
        os.close(fd)


def _mix(x):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ref_block(lba, seq, block_size):
    """pattern.word for one block, computed with numpy."""
    with np.errstate(over="ignore"):
        i = np.arange(block_size // 8, dtype=np.uint64)
        x = (np.array([lba % 2 ** 64], np.uint64) * np.uint64(0x100000001B3)) \
            ^ (np.array([seq % 2 ** 64], np.uint64) << np.uint64(20)) ^ i
        return _mix(x).view(np.uint8)


@fuzz_settings(max_examples=150)
@given(lbas=st.lists(st.one_of(st.integers(0, 100), st.sampled_from(EXTREME_INTS)), max_size=4),
       nseqs=st.integers(-1, 1), noffs=st.integers(-1, 1),
       block_size=st.one_of(st.sampled_from([8, 16, 512, 4096, 0, 1, 7, 9]),
                            st.sampled_from(EXTREME_INTS)),
       nblocks=st.one_of(st.integers(0, 3), st.sampled_from(EXTREME_INTS)),
       offs=st.lists(st.one_of(st.integers(0, 16).map(lambda k: k * 512),
                               st.sampled_from(EXTREME_INTS)), min_size=5, max_size=5),
       default_offsets=st.booleans(),
       kind=st.sampled_from(["numpy", "bytes", "readonly", "strided", "memoryview", "uint64"]))
@example(lbas=[1, 2], nseqs=-1, noffs=0, block_size=512, nblocks=1, offs=[0, 512, 0, 0, 0],
         default_offsets=False, kind="numpy")
@example(lbas=[1], nseqs=0, noffs=0, block_size=512, nblocks=1,
         offs=[2 ** 64 - 4096, 0, 0, 0, 0], default_offsets=False, kind="numpy")
@example(lbas=[1], nseqs=0, noffs=0, block_size=2 ** 63, nblocks=2, offs=[0, 0, 0, 0, 0],
         default_offsets=True, kind="numpy")
def _pattern(lbas, nseqs, noffs, block_size, nblocks, offs, default_offsets, kind):
    from cxlflash._core import pattern
    buf, whole, start = guarded(8192, kind)
    guard = whole.copy()
    n = len(lbas)
    seqs = [(7 * i + 1) for i in range(max(n + nseqs, 0))]
    boffs = None if default_offsets else offs[:max(n + noffs, 0)]
    what = (f"fill(lbas={lbas}, seqs={len(seqs)}, bs={block_size}, nblocks={nblocks}, "
            f"offs={boffs}, {kind})")
    status, res = call(pattern.fill, buf, _to_dtype(lbas, np.uint64), seqs, block_size,
                       nblocks, None if boffs is None else _to_dtype(boffs, np.uint64),
                       allowed=(OSError,))
    allowed_mask = np.zeros(len(whole), bool)
    ok_shape = len(seqs) == n and (boffs is None or len(boffs) == n)
    req = nblocks * block_size if isinstance(block_size, int) and isinstance(nblocks, int) \
        else None
    fits = req is not None and block_size >= 0 and nblocks >= 0
    for i in range(n):
        b = i * req if boffs is None and fits else (
            boffs[i] if boffs is not None and i < len(boffs) else None)
        if fits and b is not None and 0 <= b and b + req <= 8192:
            allowed_mask[start + b:start + b + req] = True
        else:
            fits = False
    changed = whole != guard
    assert not (changed & ~allowed_mask).any(), \
        f"{what}: bytes outside the requests changed " \
        f"({np.flatnonzero(changed & ~allowed_mask)[:5] - start})"
    if status == "ok":
        assert ok_shape, f"{what}: accepted mismatched lengths"
        assert kind not in ("bytes", "readonly", "strided") or (fits and req == 0) or n == 0, \
            f"{what}: accepted a read-only or non-contiguous buffer"
        assert fits or n == 0, f"{what}: accepted requests that do not fit"
        if block_size % 8 == 0 and 0 < block_size <= 4096:
            for i in range(n):
                b = i * req if boffs is None else boffs[i]
                for k in range(nblocks):
                    got = whole[start + b + k * block_size:start + b + (k + 1) * block_size]
                    assert np.array_equal(got, ref_block(lbas[i] + k, seqs[i], block_size)), \
                        f"{what}: request {i} block {k} holds the wrong pattern"
            if boffs is None and n and nblocks == 1 and kind in ("numpy", "memoryview", "uint64"):
                bad = call(pattern.verify, buf, lbas[0], seqs[:1], block_size)
                assert bad == ("ok", 0), f"{what}: verify of what fill wrote: {bad}"
    elif ok_shape and fits and kind in ("numpy", "memoryview", "uint64") and \
            all(0 <= x < 2 ** 64 - nblocks for x in lbas) and \
            0 < block_size < 2 ** 32 and block_size % 512 == 0 and 0 <= nblocks < 2 ** 64:
        raise AssertionError(f"{what} refused: {describe(res)}")
    # verify with the same extremes: reads only.
    before = whole.copy()
    st2, r2 = call(pattern.verify, buf, lbas[0] if lbas else 0, seqs, block_size,
                   allowed=(OSError,))
    assert np.array_equal(whole, before), "verify changed its buffer"
    if st2 == "ok":
        assert isinstance(r2, int) and 0 <= r2 <= len(seqs)
        assert len(seqs) * block_size <= 8192 or block_size == 0, \
            f"verify(seqs={len(seqs)}, bs={block_size}) read beyond an 8 KiB buffer"


@fuzz_settings(max_examples=100)
@given(auns=st.lists(st.one_of(st.integers(-1, 4), st.sampled_from(EXTREME_INTS)), max_size=3),
       zero_mode=st.sampled_from([0, 0, 1, 2, 7, -1]),
       block_size=st.one_of(st.sampled_from([512, 512, 1, 4096, 2 ** 20, 2 ** 31 - 1,
                                             2 ** 32 - 1, 0]), st.sampled_from(EXTREME_INTS)))
@example(auns=[2 ** 48], zero_mode=0, block_size=512)
@example(auns=[-1], zero_mode=0, block_size=4096)
def _scrub(auns, zero_mode, block_size):
    from cxlflash._core.datapath import scrub_chunks
    L = lun()
    if zero_mode not in (0, 1):
        # Writing zeros is bounded only by the chunk size: keep it small
        # and inside the LUN.
        block_size = 512
        auns = [a for a in auns if isinstance(a, int) and 0 <= a < NCHUNKS]
    what = f"scrub_chunks(auns={auns}, zero_mode={zero_mode}, block_size={block_size})"
    arr = _to_dtype(auns, np.int64)
    auns = [int(x) for x in arr]          # what the call is given (wrapped to int64)
    status, rc = call(scrub_chunks, L.fd, zero_mode, arr, block_size, allowed=(OSError,))
    named = []
    addressable = isinstance(block_size, int) and 0 < block_size < 2 ** 32
    cb = CHUNK * block_size if addressable else 0
    for a in auns:
        if addressable and isinstance(a, int) and 0 <= a and (a + 1) * cb <= 2 ** 63:
            lo, hi = min(a * cb, LUN_BYTES), min((a + 1) * cb, LUN_BYTES)
            if lo < hi:
                named.append((lo, hi))
    # Inside the named chunks: zeros, or (after a failure) unchanged.
    for lo, hi in named:
        for a, b in L.windows:
            a, b = max(a, lo), min(b, hi)
            if a < b:
                got = np.frombuffer(os.pread(L.fd, b - a, a), np.uint8)
                assert ((got == 0) | (got == L.ref[a:b])).all(), \
                    f"{what}: wrote something other than zeros"
                if status == "ok" and rc == 0:
                    assert not got.any(), f"{what}: returned 0 but did not zero [{a}, {b})"
    # Outside them: nothing changed, no data written.
    L.check(f"{what} -> {status} {rc!r}", extra=named)
    if status == "ok":
        assert isinstance(rc, int)


def batch_raw_io():
    _raw_io()


def batch_pattern():
    _pattern()


def batch_scrub():
    _scrub()


# -- the tests: each batch in its own interpreter ------------------------------------

BATCHES = ["batch_allocator", "batch_tables", "batch_datapath", "batch_listio",
           "batch_afu_command", "batch_raw_io", "batch_pattern", "batch_scrub"]


@pytest.mark.parametrize("batch", BATCHES)
def test_fuzz_core(batch):
    run_batch("test_fuzz_core", batch)
