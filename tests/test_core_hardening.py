"""The core's locking contract (tables.pyx), the allocator's release
primitive and limit, and fork safety of the core's locks (issue: a core
that cannot be broken).

Each test here failed (or crashed, or hung) before the contract was
enforced; the crash-prone ones run in a subprocess so a crash fails the
test instead of the run.
"""
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from cxlflash._core import locks
from cxlflash._core.allocator import ChunkAllocator
from cxlflash._core.datapath import DataPath
from cxlflash._core.errors import AdapterResetError, AfuError
from cxlflash._core.tables import (
    ResourceTable, TableState, TABLE_LIVE, TABLE_IN_ERROR, TABLE_GONE,
    TABLE_FOREIGN)

from forking import in_child

BS = 4096
CHUNK = 1 << 16


def memfd(nbytes):
    fd = os.memfd_create("cxlflash-test")
    os.ftruncate(fd, nbytes)
    return fd


def run_script(body, timeout=60):
    """Run ``body`` in a fresh interpreter; return the CompletedProcess."""
    src = textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))


class BigWriter(threading.Thread):
    """Holds a table's read lock for a while: one large transfer."""

    def __init__(self, table, handle, fd, nbytes, rounds=1):
        super().__init__(daemon=True)
        self.dp = DataPath(table, handle, fd, BS)
        self.buf = np.full(nbytes, 0xA5, dtype=np.uint8)
        self.rounds = rounds
        self.started_io = threading.Event()
        self.error = None

    def run(self):
        try:
            for _ in range(self.rounds):
                self.started_io.set()
                self.dp.write(0, self.buf)
        except BaseException as e:       # noqa: BLE001
            self.error = e


# -- the table's state is changed under the write lock: a fence -------------------

def test_state_names_are_exported():
    assert [TABLE_LIVE, TABLE_IN_ERROR, TABLE_GONE, TABLE_FOREIGN] == [0, 1, 2, 3]
    t = ResourceTable(4)
    assert t.state is TableState.TABLE_LIVE
    t.set_state(TABLE_GONE)
    assert t.state == TABLE_GONE and "TABLE_GONE" in repr(t)
    with pytest.raises(ValueError):
        t.set_state(7)


def test_set_state_waits_for_the_transfer_in_flight():
    nbytes = 256 << 20
    fd = memfd(nbytes)
    try:
        t = ResourceTable(4)
        h = t.open_direct(3, 1, 1, nbytes // BS - 1)
        w = BigWriter(t, h, fd, nbytes)
        w.start()
        w.started_io.wait()
        time.sleep(0.005)
        t.set_state(TABLE_GONE)
        # Returned only after the write: its last byte has landed.
        assert os.pread(fd, 1, nbytes - 1) == b"\xa5"
        w.join()
        assert w.error is None
        # And nothing starts any more.
        with pytest.raises(AfuError) as e:
            DataPath(t, h, fd, BS).write(0, bytes(BS))
        assert e.value.afu_rc == 0x21
    finally:
        os.close(fd)


@pytest.mark.parametrize("state, exc", [(TABLE_GONE, AfuError), (TABLE_FOREIGN, AfuError),
                                        (TABLE_IN_ERROR, AdapterResetError)])
def test_translate_refuses_a_table_the_data_path_refuses(state, exc):
    t = ResourceTable(4)
    a = ChunkAllocator(4)
    h = t.open_virtual(3)
    t.grow_from(h, a, 1, 0, 1)
    t.set_state(state)
    with pytest.raises(exc) as e:
        t.translate(h, 5)
    if exc is AfuError:
        assert e.value.afu_rc == 0x21
    with pytest.raises(exc):
        t.translate_many(h, np.arange(4, dtype=np.uint64))
    t.set_state(TABLE_LIVE)
    assert t.translate(h, 5) == (int(t.auns(h)[0]) << 16) | 5


def test_translate_sees_a_moved_epoch():
    t = ResourceTable(4)
    h = t.open_direct(3, 1, 1, 100)
    epoch = bytearray(8)
    t.watch_epoch(epoch, 0)
    assert t.translate(h, 7) == 7
    epoch[0] = 1
    with pytest.raises(AdapterResetError):
        t.translate(h, 7)


# -- decisions and changes in one critical section ---------------------------------

def test_concurrent_opens_never_share_a_handle():
    """Two open_virtual() calls that wait for I/O in flight used to pick
    the same free slot, then both fill it (rht_out 3 for 2 handles)."""
    nbytes = 64 << 20
    fd = memfd(nbytes)
    try:
        for _ in range(5):
            t = ResourceTable(8)
            d = t.open_direct(3, 1, 1, nbytes // BS - 1)
            w = BigWriter(t, d, fd, nbytes, rounds=3)
            w.start()
            w.started_io.wait()
            got = []
            opens = [threading.Thread(target=lambda: got.append(t.open_virtual(3)))
                     for _ in range(4)]
            for o in opens:
                o.start()
            for o in opens:
                o.join()
            w.join()
            assert w.error is None
            assert sorted(got) == [1, 2, 3, 4]
            assert t.rht_out == 5 and t.open_handles() == [0, 1, 2, 3, 4]
    finally:
        os.close(fd)


def test_readers_racing_grow_do_not_crash():
    """chunks(), lxt() and translate_many() read the LXT while grow_from()
    reallocates it (this crashed the interpreter)."""
    p = run_script("""
        import threading, numpy as np
        from cxlflash._core.allocator import ChunkAllocator
        from cxlflash._core.tables import ResourceTable
        # LXTs of megabytes: the old ones are unmapped when they are freed.
        a = ChunkAllocator(1 << 22)
        t = ResourceTable(4)
        h = t.open_virtual(3)
        stop = threading.Event()
        def grower():
            for i in range(30):
                t.grow_from(h, a, 700000 + 9000 * i, 0, 1)
                a.free_many(t.shrink(h, 8))
            stop.set()
        def reader():
            lbas = np.arange(0, 8 << 16, 4096, dtype=np.uint64)
            while not stop.is_set():
                c = t.auns(h)
                assert len(t.lxt(h)) >= 8 and len(c) >= 8
                t.translate_many(h, lbas)
        ts = [threading.Thread(target=grower)] + [threading.Thread(target=reader) for _ in range(2)]
        t.grow_from(h, a, 8, 0, 1)
        for x in ts: x.start()
        for x in ts: x.join()
        print("ok", t.lxt_count(h), a.space())
    """)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.split() == ["ok", "8", str((1 << 22) - 8)]


def test_clone_slot_copies_a_consistent_source():
    """A clone raced by a grow of its source copies one state or the other,
    with exactly the clone references of what it copied."""
    a = ChunkAllocator(1 << 16)
    src, dst = ResourceTable(4), ResourceTable(4)
    h = src.open_virtual(3)
    src.grow_from(h, a, 1000, 0, 1)
    stop = threading.Event()

    def grower():
        while not stop.is_set():
            src.grow_from(h, a, 3000, 0, 1)
            a.free_many(src.shrink(h, 1000))

    g = threading.Thread(target=grower)
    g.start()
    try:
        for _ in range(30):
            dst.clone_slot(src, h, 3, a)
            copied = dst.auns(h)
            assert len(copied) in (1000, 4000)
            assert a.free_many(dst.close(h)) == 0   # every copied chunk was held
    finally:
        stop.set()
        g.join()
    # Every reference the clones took was given back, none twice.
    assert a.space() == (1 << 16) - 1000
    assert not np.any(a.clone_counts(src.auns(h)))


def test_clone_into_an_open_slot_changes_nothing():
    a = ChunkAllocator(64)
    src, dst = ResourceTable(4), ResourceTable(4)
    h = src.open_virtual(3)
    src.grow_from(h, a, 5, 0, 1)
    dst.open_virtual(3)
    with pytest.raises(ValueError, match="destination is open"):
        dst.clone_slot(src, h, 3, a)
    assert not np.any(a.clone_counts(src.auns(h)))
    assert dst.rht_out == 1


# -- fence(): the write lock across a block -----------------------------------------

def test_fence_holds_io_back_and_lets_its_holder_work():
    fd = memfd(1 << 20)
    try:
        t = ResourceTable(4)
        h = t.open_direct(3, 1, 1, 255)
        done = threading.Event()

        def io():
            DataPath(t, h, fd, BS).write(0, b"\x01" * BS)
            done.set()

        with t.fence() as ft:
            assert ft is t
            io_thread = threading.Thread(target=io)
            io_thread.start()
            assert not done.wait(0.2)              # the I/O waits for the block
            v = t.open_virtual(3)                  # the holder may change the table
            assert t.is_open(v) and t.lxt_count(v) == 0
            t.close(v)
        io_thread.join(5)
        assert done.is_set()
    finally:
        os.close(fd)


# -- the allocator: release_many, set_limit, construction -------------------------

def test_release_many_returns_last_references_still_allocated():
    a = ChunkAllocator(128)
    auns = a.alloc_many(4)                       # 0..3
    assert a.clone_many(auns[:2])                # 0 and 1 are shared
    last = a.release_many(auns)
    assert list(last) == [2, 3]
    assert all(a.is_allocated(x) for x in auns)  # nobody can have them yet
    assert a.space() == 124 and list(a.clone_counts(auns)) == [0, 0, 0, 0]
    assert a.free_many(last) == 0
    assert list(a.release_many(auns[:2])) == [0, 1]


def test_release_many_refuses_a_double_drop_and_changes_nothing():
    a = ChunkAllocator(128)
    auns = a.alloc_many(3)
    a.clone(auns[0])
    before = (a.space(), list(a.clone_counts(auns)))
    with pytest.raises(ValueError, match="nothing was changed"):
        a.release_many([auns[0], auns[1], auns[1]])
    assert (a.space(), list(a.clone_counts(auns))) == before
    with pytest.raises(ValueError):
        a.release_many([auns[2], 100])            # 100 is free
    assert (a.space(), list(a.clone_counts(auns))) == before
    with pytest.raises(IndexError):
        a.release_many([auns[0], 128])
    assert (a.space(), list(a.clone_counts(auns))) == before


def test_release_then_free_makes_the_scrub_decision_once():
    """Two owners of one chunk drop it at the same time: exactly one of
    them gets it as its last reference (and would scrub it)."""
    for _ in range(50):
        a = ChunkAllocator(64)
        auns = a.alloc_many(32)
        a.clone_many(auns)
        got = [None, None]

        def drop(i):
            got[i] = a.release_many(auns)

        ts = [threading.Thread(target=drop, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(np.concatenate(got)) == sorted(auns)
        a.free_many(np.concatenate(got))
        assert a.space() == 64


def test_set_limit_parks_chunks_beyond_a_shrunk_capacity():
    a = ChunkAllocator(256)
    used = a.alloc_many(200)
    a.free_many(used[100:])                      # 100..199 free again
    a.set_limit(150)
    assert a.limit == 150 and a.space() == 50 and a.parked_count == 106
    got = a.alloc_many(50)
    assert got.max() < 150
    with pytest.raises(OSError):
        a.alloc()
    # A chunk in use beyond the limit is parked when its last reference goes.
    a.set_limit(64)                              # 64..149 are all in use
    assert a.parked_count == 106
    assert a.free(int(used[99])) is True
    assert a.parked_count == 107 and a.space() == 0
    assert not a.is_allocated(int(used[99]))
    assert not a.clone(int(used[99])) and not a.free(int(used[99]))
    a.set_limit(256)
    assert a.parked_count == 0
    assert a.allocated_count() + a.space() == 256


def test_set_limit_keeps_the_kernel_order_below_it():
    a, b = ChunkAllocator(1024), ChunkAllocator(1024)
    b.set_limit(700)
    assert list(a.alloc_many(600)) == list(b.alloc_many(600))


@pytest.mark.parametrize("total", [0, -1, 2 ** 47 + 1, 2 ** 63 - 1])
def test_allocator_refuses_absurd_totals(total):
    gc.collect()
    before = locks.registered_count()
    with pytest.raises(ValueError, match="total_chunks"):
        ChunkAllocator(total)
    assert locks.registered_count() == before


def test_locks_are_unregistered_when_objects_go():
    gc.collect()
    before = locks.registered_count()
    objs = [ResourceTable(4) for _ in range(10)] + [ChunkAllocator(64) for _ in range(10)]
    assert locks.registered_count() == before + 20
    del objs
    assert locks.registered_count() == before


# -- fork: no lock stays held in the child ------------------------------------------

def test_child_of_a_fork_during_io_can_change_its_copy_of_the_table():
    """A thread held the table's read lock (a long transfer) when another
    forked: the child's copy of the lock stayed held forever."""
    nbytes = 256 << 20
    fd = memfd(nbytes)
    try:
        t = ResourceTable(4)
        h = t.open_direct(3, 1, 1, nbytes // BS - 1)
        w = BigWriter(t, h, fd, nbytes, rounds=4)
        w.start()
        w.started_io.wait()
        time.sleep(0.01)

        def child():
            signal.alarm(10)
            v = t.open_virtual(3)
            t.set_state(TABLE_FOREIGN)
            return v

        assert in_child(child) == 1
        w.join()
        assert w.error is None
    finally:
        os.close(fd)


def test_child_of_a_fork_during_an_allocator_loop_gets_a_consistent_allocator():
    a = ChunkAllocator(1 << 22)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            a.free_many(a.alloc_many(1 << 21))

    c = threading.Thread(target=churn)
    c.start()
    try:
        for _ in range(3):
            time.sleep(0.01)

            def child():
                signal.alarm(10)
                return a.space() + a.allocated_count(), int(a.alloc())

            total, _aun = in_child(child)
            assert total == 1 << 22
    finally:
        stop.set()
        c.join()


def test_child_can_use_a_table_whose_fence_another_thread_held():
    t = ResourceTable(4)
    held, release = threading.Event(), threading.Event()

    def holder():
        with t.fence():
            held.set()
            release.wait(10)

    th = threading.Thread(target=holder)
    th.start()
    held.wait()
    try:
        def child():
            signal.alarm(10)
            return t.open_virtual(3)

        assert in_child(child) == 0
    finally:
        release.set()
        th.join()


# -- a handle carries its backing fd ------------------------------------------------

def test_a_handle_reopened_on_another_lun_never_reaches_the_old_store():
    """A DataPath built for a handle kept its fd: after the handle number
    was re-opened on another LUN, its writes went to the old LUN's store
    (with the new LUN's translation)."""
    old, new = memfd(1 << 20), memfd(1 << 20)
    try:
        t = ResourceTable(4)
        h = t.open_direct(3, 1, 1, 255, fd=old)
        stale = DataPath(t, h, old, BS)
        stale.write(0, b"\x01" * BS)
        t.close(h)
        assert t.open_direct(3, 2, 1, 255, fd=new) == h
        stale.write(1, b"\x02" * BS)
        assert os.pread(old, BS, BS) == bytes(BS)
        assert os.pread(new, BS, BS) == b"\x02" * BS
        # Unmap follows the handle too.
        stale.unmap(1, 1)
        assert os.pread(new, BS, BS) == bytes(BS)
    finally:
        os.close(old)
        os.close(new)


def test_a_clone_keeps_its_source_handles_fd():
    fd = memfd(CHUNK * BS)
    try:
        a = ChunkAllocator(1)
        src, dst = ResourceTable(4), ResourceTable(4)
        h = src.open_virtual(3, fd=fd)
        src.grow_from(h, a, 1, 0, 1)
        dst.clone_slot(src, h, 3, a)
        DataPath(dst, h, -1, BS).write(7, b"\x07" * BS)
        assert os.pread(fd, BS, 7 * BS) == b"\x07" * BS
    finally:
        os.close(fd)


# -- arguments: integers only, never truncated --------------------------------------

def _table_with_vlun():
    a = ChunkAllocator(8)
    t = ResourceTable(4)
    h = t.open_virtual(3)
    t.grow_from(h, a, 2, 0, 1)
    return a, t, h


@pytest.mark.parametrize("call", [
    lambda a, t, h: ChunkAllocator(3.5),
    lambda a, t, h: ResourceTable(4.0),
    lambda a, t, h: a.free(0.0),
    lambda a, t, h: a.clone(np.float64(1)),
    lambda a, t, h: a.alloc_many(1.0),
    lambda a, t, h: a.free_many([0.5]),
    lambda a, t, h: a.release_many(np.array([0.0])),
    lambda a, t, h: a.set_limit(4.0),
    lambda a, t, h: t.open_virtual(3.0),
    lambda a, t, h: t.translate(h, 1.5),
    lambda a, t, h: t.translate(float(h), 1),
    lambda a, t, h: t.shrink(h, 1.0),
    lambda a, t, h: t.grow_from(h, a, 1.0, 0, 1),
    lambda a, t, h: t.auns("0"),
    lambda a, t, h: t.close(None),
])
def test_core_refuses_non_integers_and_changes_nothing(call):
    a, t, h = _table_with_vlun()
    before = (a.space(), list(t.auns(h)), t.rht_out)
    with pytest.raises(TypeError, match="must be an integer|array of integers"):
        call(a, t, h)
    assert (a.space(), list(t.auns(h)), t.rht_out) == before


@pytest.mark.parametrize("call, exc", [
    (lambda a, t, h: t.translate(h, -1), OSError),
    (lambda a, t, h: t.translate(h, 2 ** 64), OSError),
    (lambda a, t, h: t.close(2 ** 70), IndexError),
    (lambda a, t, h: a.free(-1), IndexError),
    (lambda a, t, h: a.free_many([2 ** 63]), IndexError),
    (lambda a, t, h: t.open_virtual(4), ValueError),
    (lambda a, t, h: t.grow_from(h, a, -1, 0, 1), ValueError),
    (lambda a, t, h: t.grow_from(h, a, 1, 256, 1), ValueError),
])
def test_core_refuses_out_of_range_integers_with_its_documented_errors(call, exc):
    a, t, h = _table_with_vlun()
    with pytest.raises(exc) as e:
        call(a, t, h)
    assert not isinstance(e.value, OverflowError)
    if exc is OSError:
        assert e.value.errno == 22 and "vlba" in str(e.value)


def test_a_chunk_number_whose_lbas_pass_2_63_is_refused():
    """An LXT entry of chunk 2**47 or more addresses physical LBAs an off_t
    (and translate_one's int64) cannot hold."""
    t = ResourceTable(4)
    h = t.open_virtual(3)
    with pytest.raises(IndexError, match="0..140737488355327"):
        t.grow(h, [2 ** 47], 0, 1)
    t.grow(h, [2 ** 47 - 1], 0, 1)
    assert t.translate(h, 5) == ((2 ** 47 - 1) << 16) | 5
    with pytest.raises(ValueError, match="beyond"):
        t.load_slot(2, 0, 3, 16, [(2 ** 47) << 16 | 0x31])
    assert not t.is_open(2)
