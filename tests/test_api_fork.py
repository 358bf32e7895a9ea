"""The Pythonic API after fork: clone_after_fork in real and faked
children, what a child may and may not touch."""
import asyncio
import errno
import os
import time

import numpy as np
import pytest

import cxlflash
import cxlflash.channel as channel_mod
from cxlflash import uapi
from cxlflash.driver.context import Caller
from cxlflash.errors import (AdapterResetError, AfuError, CxlFlashError,
                             ForkedAdapterError)

from block_pattern import BS, CHUNK, GIB, pattern
from forking import in_child

from api_fixtures import (adapter, ctx, disk, vlun,  # noqa: F401 (fixtures)
                          IoctlLog, embedded, fd_is_open, live_contexts,
                          lun_status, phys_bytes)

# -- clone after fork ------------------------------------------------------------------------

#: Each test of the ``disk`` fixture runs on a memory LUN and on an RBD image
#: (tests/conftest.py; ``memory_backing``: memory only).
LUN_BACKINGS = ("memory", "rbd")


def _wait_released(adapter, n_live, timeout=5.0):
    """Wait for the contexts of exited children to be released (the
    driver's reaper releases them as their adapter fds close)."""
    deadline = time.monotonic() + timeout
    while len(live_contexts(adapter)) > n_live:
        assert time.monotonic() < deadline, "a child's context was not released"
        time.sleep(0.01)


def test_clone_after_fork_in_a_real_child(adapter, ctx):
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 1))
    wwid = v.disk.wwid

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
    # The child's context went with the child: its clone reference too, so
    # the chunk is free once the parent lets it go.
    _wait_released(adapter, 1)
    assert v.read(0, 1) == pattern(0, 1).tobytes()
    v.close()
    lun = lun_status(adapter, wwid)
    assert lun["chunks_free"] == lun["chunks_total"]


def test_child_writes_and_grows_through_the_parents_driver(adapter, ctx):
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 1))
    wwid = v.disk.wwid
    free_before = lun_status(adapter, wwid)["chunks_free"]

    def child():
        ctx.clone_after_fork()                     # keep O_RDWR
        v.write(1, pattern(1, 1, seed=5))          # lands in the shared chunk
        v.set_size(3 * CHUNK)                      # chunks from the shared allocator
        v.write(2 * CHUNK, pattern(2 * CHUNK, 1, seed=5))
        if bytes(v.read(2 * CHUNK, 1)) != pattern(2 * CHUNK, 1, seed=5).tobytes():
            return 3
        if v.chunks != 3:
            return 4
        # The one driver's allocator gave the child its 2 new chunks.
        if lun_status(adapter, wwid)["chunks_free"] != free_before - 2:
            return 5
        return 0

    assert in_child(child) == 0
    assert v.read(1, 1) == pattern(1, 1, seed=5).tobytes()
    _wait_released(adapter, 1)
    assert lun_status(adapter, wwid)["chunks_free"] == free_before  # its growth freed
    assert v.chunks == 1 and v.read(0, 1) == pattern(0, 1).tobytes()


def test_grandchild_clones_its_parents_context(adapter, ctx):
    """A child's child reaches the driver too (the child asked it for a
    connection at fork), and clones what ITS parent holds -- not its
    grandparent's context, which is EINVAL as with the kernel."""
    v = ctx.create_virtual(10)
    v.write(0, pattern(0, 1, seed=7))

    def child():
        def grandchild_too_early():
            try:
                ctx.clone_after_fork()          # the grandparent's context
            except CxlFlashError as e:
                return 0 if e.errno == errno.EINVAL else 3
            return 4

        if in_child(grandchild_too_early) != 0:
            return 5
        ctx.clone_after_fork()                  # now the child's own
        v.write(1, pattern(1, 1, seed=8))

        def grandchild():
            ctx.clone_after_fork()
            ok = (v.read(0, 1) == pattern(0, 1, seed=7).tobytes() and
                  v.read(1, 1) == pattern(1, 1, seed=8).tobytes())
            v.write(2, pattern(2, 1, seed=9))   # shared chunks: the child sees it
            ctx.close()
            return 0 if ok else 6

        if in_child(grandchild) != 0:
            return 7
        ok = v.read(2, 1) == pattern(2, 1, seed=9).tobytes()
        ctx.close()
        return 0 if ok else 8

    assert in_child(child) == 0
    assert v.size == 10
    assert v.read(0, 1) == pattern(0, 1, seed=7).tobytes()
    assert v.read(2, 1) == pattern(2, 1, seed=9).tobytes()


@pytest.fixture
def fake_child(embedded, monkeypatch):
    """Make the embedded driver see the caller as a forked child of this
    process (what the shared driver sees of a real one): returns the
    child's pid.  (A daemon knows its peers from the kernel: these tests
    run embedded only; the real-child tests above run both ways.)"""
    parent = os.getpid()
    child = parent + 1_000_000
    calls = []

    def caller():
        calls.append(1)
        return Caller(pid=child, ppid=parent)

    def start():
        monkeypatch.setattr(channel_mod, "this_process", caller)
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
def test_clone_after_fork_cannot_widen(adapter, disk, monkeypatch, parent, child):
    ctx = disk.attach(parent)
    v = ctx.create_virtual(10)
    parent_id, fd, n = ctx.context_id, ctx.adap_fd, len(live_contexts(adapter))
    log = IoctlLog(adapter, monkeypatch)
    with pytest.raises(CxlFlashError) as e:
        ctx.clone_after_fork(child)
    assert e.value.errno == errno.EINVAL
    # Nothing changed: no ioctl was even issued.
    assert log.calls == []
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
