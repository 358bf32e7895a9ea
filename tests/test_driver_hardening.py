"""Issue 8, driver side: no path hands a backing fd or a chunk away while a
transfer through it runs; reaping, scrubbing, replicas and identities that
cannot be raced.

Each test is a regression test: it failed on the main branch before these
changes.  A forked child that clones its parent's vLUNs is played with
``Caller(pid=C, ppid=P)`` through ``superpipe.disk_ioctl`` where a real
process is not needed; the replica tests fork for real.
"""
import ctypes
import errno
import os
import pathlib
import threading
import time

import numpy as np
import pytest

import cxlflash
from cxlflash import uapi
from cxlflash._core.datapath import afu_command
from cxlflash._core.tables import TABLE_LIVE
from cxlflash.driver import superpipe, vlun
from cxlflash.driver.context import Caller
from forking import in_child
from scsi_sense import fixed_sense

CHUNK = 1 << 16                      # native blocks per chunk
K4 = 4096
P = os.getpid()
CHILD = Caller(pid=P + 1_000_003, ppid=P)        # a (pretend) forked child of P


# -- helpers ------------------------------------------------------------------


def call(d, request, arg, caller=None):
    if caller is None:
        cxlflash.ioctl(d, request, arg)
    else:
        superpipe.disk_ioctl(d.adapter.driver, d.sdev, d, request, arg, caller)
    return arg


def attach(d, caller=None):
    at = uapi.dk_cxlflash_attach()
    at.hdr.flags = os.O_RDWR
    return call(d, uapi.DK_CXLFLASH_ATTACH, at, caller)


def uvirtual(d, cid, size, flags=0, caller=None):
    uv = uapi.dk_cxlflash_uvirtual()
    uv.context_id, uv.lun_size, uv.hdr.flags = cid, size, flags
    return call(d, uapi.DK_CXLFLASH_USER_VIRTUAL, uv, caller).rsrc_handle


def resize(d, cid, h, size, caller=None):
    rs = uapi.dk_cxlflash_resize()
    rs.context_id, rs.rsrc_handle, rs.req_size = cid, h, size
    return call(d, uapi.DK_CXLFLASH_VLUN_RESIZE, rs, caller).last_lba


def release(d, cid, h, caller=None):
    rl = uapi.dk_cxlflash_release()
    rl.context_id, rl.rsrc_handle = cid, h
    call(d, uapi.DK_CXLFLASH_RELEASE, rl, caller)


def detach(d, cid, caller=None):
    dt = uapi.dk_cxlflash_detach()
    dt.context_id = cid
    call(d, uapi.DK_CXLFLASH_DETACH, dt, caller)


def clone(d, src, dst, caller=CHILD):
    cl = uapi.dk_cxlflash_clone()
    cl.context_id_src, cl.context_id_dst = src, dst
    call(d, uapi.DK_CXLFLASH_VLUN_CLONE, cl, caller)


def manage(d, wwid, flags):
    ml = uapi.dk_cxlflash_manage_lun()
    ml.wwid[:] = wwid
    ml.hdr.flags = flags
    call(d, uapi.DK_CXLFLASH_MANAGE_LUN, ml)


def ctx_of(a, cid):
    c = a.driver.ctx_tbl[cid & 0xFFFFFFFF]
    if c is None or c.ctxid != cid:
        c = next(x for x in a.driver.ctx_err_recovery if x.ctxid == cid)
    return c


def close_quietly(fd):
    try:
        os.close(fd)
    except OSError:
        pass


NEED_WS = uapi.DK_CXLFLASH_UVIRTUAL_NEED_WRITE_SAME
ENABLE = uapi.DK_CXLFLASH_MANAGE_LUN_ENABLE_SUPERPIPE


# -- item 1: every teardown fences the data path ---------------------------------


SMALL = 512                          # native block size: a chunk is 32 MiB
NCH = 8                              # chunks of the vLUN under I/O


@pytest.fixture
def big_write():
    """An adapter with a vLUN of NCH chunks, none adjacent to the next (a
    second vLUN took every other chunk), so one write over it is NCH
    separate pwrites of 32 MiB -- long enough to be caught in flight."""
    a = cxlflash.Adapter()
    w = a.add_lun(None, size=2 * NCH * CHUNK * SMALL, block_size=SMALL)
    d = a.open_disk(w)
    at = attach(d)
    cid = at.context_id
    per = CHUNK * SMALL // K4                        # 4K blocks per chunk
    ha, hb = uvirtual(d, cid, 0), uvirtual(d, cid, 0)
    for k in range(1, NCH + 1):
        resize(d, cid, ha, k * per)
        resize(d, cid, hb, k * per)
    auns = ctx_of(a, cid).table.auns(ha)
    assert len(auns) == NCH and np.all(np.diff(auns) > 1)
    data = np.full(NCH * CHUNK * SMALL, 0xA5, dtype=np.uint8)
    outcome = []
    started = threading.Event()

    def writer():
        started.set()
        try:
            a.write(cid, ha, 0, data)
            outcome.append("done")
        except OSError as e:
            outcome.append(e)

    t = threading.Thread(target=writer)

    def start():
        t.start()
        started.wait()
        time.sleep(0.02)                             # mid-transfer
        return t

    yield a, d, cid, ha, auns, start, outcome
    t.join(60)
    a.close()
    close_quietly(at.adap_fd)


def _chunk_states(fd, auns):
    """Per chunk: 'new' (all 0xA5), 'old' (all zero) or 'partial'.  Read
    last chunk first: a writer still under way (front to back) is caught
    with its tail unwritten."""
    out = []
    for aun in reversed(auns):
        b = np.frombuffer(os.pread(fd, CHUNK * SMALL, int(aun) * CHUNK * SMALL), np.uint8)
        out.append("new" if (b == 0xA5).all() else "old" if not b.any() else "partial")
    return out[::-1]


def test_close_waits_for_transfers_and_no_reused_fd_is_written(big_write, tmp_path):
    a, d, cid, h, auns, start, outcome = big_write
    t = start()
    a.close()
    # The fds close() freed are reused at once; nothing may land in them.
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(32)]
    try:
        t.join(60)
        assert not t.is_alive()
        assert [os.fstat(fd).st_size for fd in fds] == [0] * 32
    finally:
        for fd in fds:
            os.close(fd)
    assert outcome == ["done"] or isinstance(outcome[0], cxlflash.AfuError)
    with pytest.raises(cxlflash.AfuError) as ei:     # an I/O after close: refused
        a.write(cid, h, 0, bytes(SMALL))
    assert ei.value.afu_rc == 0x21


def test_reset_returns_after_the_transfer_in_flight(big_write):
    a, d, cid, h, auns, start, outcome = big_write
    fd = a.driver.gluns[d.wwid].backing.fd
    t = start()
    a.begin_reset()
    states = _chunk_states(fd, auns)       # what the backing holds as the reset returns
    t.join(60)
    a.end_reset()
    if outcome == ["done"]:
        assert states == ["new"] * NCH
    else:
        assert isinstance(outcome[0], cxlflash.AdapterResetError)
        assert states == ["old"] * NCH


def test_fence_backing_refuses_or_fences_every_table_reaching_the_lun(big_write):
    a, d, cid, h, auns, start, outcome = big_write
    glun = a.driver.gluns[d.wwid]
    fd = glun.backing.fd
    with pytest.raises(cxlflash.CxlFlashError) as ei:
        a.driver.fence_backing(glun)
    assert ei.value.errno == errno.EBUSY
    t = start()
    assert a.driver.fence_backing(glun, force=True) == 1
    states = _chunk_states(fd, auns)
    t.join(60)
    assert states == (["new"] * NCH if outcome == ["done"] else ["old"] * NCH)
    with pytest.raises(cxlflash.AfuError) as ei:
        a.write(cid, h, 0, bytes(SMALL))
    assert ei.value.afu_rc == 0x21


def test_ioctls_after_driver_close_are_enodev():
    a = cxlflash.Adapter()
    w = a.add_lun(None, size=CHUNK * K4)
    d = a.open_disk(w)
    at = attach(d)
    a.close()
    close_quietly(at.adap_fd)
    me = Caller(P, os.getppid())
    for request, arg in ((uapi.DK_CXLFLASH_ATTACH, uapi.dk_cxlflash_attach()),
                         (uapi.DK_CXLFLASH_DETACH, uapi.dk_cxlflash_detach())):
        with pytest.raises(cxlflash.CxlFlashError) as ei:
            superpipe.disk_ioctl(a.driver, d.sdev, d, request, arg, me)
        assert ei.value.errno == errno.ENODEV and "closed" in str(ei.value)


# -- items 5 and 10: scrubbing cannot be bypassed -----------------------------------


@pytest.fixture
def one_chunk():
    """A LUN of exactly one chunk: a freed chunk is the next one handed out."""
    a = cxlflash.Adapter()
    w = a.add_lun(None, size=CHUNK * K4)
    d = a.open_disk(w)
    fds = []
    yield a, d, fds
    for fd in fds:
        close_quietly(fd)
    a.close()


def _shared_scrubbed_vlun(a, d, fds):
    """A parent vLUN with NEED_WRITE_SAME holding secret data, cloned into
    a child's context: (parent cid, child cid, handle)."""
    at = attach(d)
    fds.append(at.adap_fd)
    pc = at.context_id
    h = uvirtual(d, pc, CHUNK, NEED_WS)
    a.write(pc, h, 0, b"\x5a" * K4)
    cc = attach(d, caller=CHILD).context_id
    clone(d, pc, cc)
    assert ctx_of(a, cc).rht_needs_ws[h]              # the flag came along
    return pc, cc, h


def _next_tenant_reads(a, d, fds):
    at = attach(d)
    fds.append(at.adap_fd)
    h = uvirtual(d, at.context_id, CHUNK)
    return a.read(at.context_id, h, 0, 1)


@pytest.mark.parametrize("first", ["parent", "child"])
def test_scrub_flag_travels_with_the_clone(one_chunk, first):
    a, d, fds = one_chunk
    pc, cc, h = _shared_scrubbed_vlun(a, d, fds)
    order = [(pc, None), (cc, CHILD)]
    if first == "child":
        order.reverse()
    for cid, caller in order:
        release(d, cid, h, caller)
    assert _next_tenant_reads(a, d, fds) == bytes(K4)


def test_scrub_decision_is_not_check_then_act(one_chunk, monkeypatch):
    """The child lets its clone go inside the parent's release, between the
    parent's decision (not the last reference: no scrub) and its free --
    the window the old code had.  The chunk must still be scrubbed."""
    a, d, fds = one_chunk
    pc, cc, h = _shared_scrubbed_vlun(a, d, fds)
    real = vlun.scrub_chunks
    racing = [True]

    def scrub_in_the_window(*args):
        if racing[0]:
            racing[0] = False
            release(d, cc, h, CHILD)
        return real(*args)

    monkeypatch.setattr(vlun, "scrub_chunks", scrub_in_the_window)
    release(d, pc, h)
    if racing[0]:                        # no window: the child lets go after
        racing[0] = False
        release(d, cc, h, CHILD)
    assert ctx_of(a, cc).table.rht_out == 0
    assert _next_tenant_reads(a, d, fds) == bytes(K4)


# -- item 8: reaping is keyed on the file and single-flight --------------------------


def test_threads_issuing_ioctls_never_release_each_others_contexts():
    a = cxlflash.Adapter()
    w = a.add_lun(None, size=32 * CHUNK * K4)
    d = a.open_disk(w)
    errors, cycles = [], [0] * 4
    stop = time.monotonic() + 4.0

    def worker(i):
        block = bytes([i + 1]) * K4
        buf = bytearray(K4)
        n = 0
        while time.monotonic() < stop:
            fd = None
            try:
                at = attach(d)
                fd, cid = at.adap_fd, at.context_id
                h = uvirtual(d, cid, 1)
                a.write(cid, h, n % CHUNK, block)
                a.readinto(cid, h, n % CHUNK, buf)
                if buf != block:
                    errors.append(f"thread {i} cycle {n}: read back other data")
                if n % 2:
                    release(d, cid, h)
                    detach(d, cid)
            except Exception as e:           # noqa: BLE001 -- counted, reported
                errors.append(f"thread {i} cycle {n}: {e!r}")
            finally:
                if fd is not None:
                    os.close(fd)             # odd cycles: the release path runs
            n += 1
        cycles[i] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [], f"{len(errors)} of {sum(cycles)} cycles failed: {errors[:3]}"
        assert min(cycles) > 10
    finally:
        a.close()


class _StaleEpoll:
    """An epoll whose poll() answers with events taken earlier."""

    def __init__(self, epoll, events):
        self._epoll = epoll
        self._events = events

    def poll(self, timeout=-1, maxevents=-1):
        return self._events

    def __getattr__(self, name):
        return getattr(self._epoll, name)


def test_reap_skips_a_file_whose_number_was_reused():
    """An event for fd number N taken before N was released and reused by
    a new ATTACH must not release the new, live context."""
    a = cxlflash.Adapter()
    w = a.add_lun(None, size=CHUNK * K4)
    d = a.open_disk(w)
    drv = a.driver
    try:
        old = attach(d)
        os.close(old.adap_fd)
        stale = drv._epoll.poll(0)                       # the event a racing thread took
        assert stale
        drv.reap(Caller(P, os.getppid()))                # this thread releases it
        new = attach(d)                                  # reuses the number
        live = new.context_id
        assert ctx_of(a, live).file.fileno == stale[0][0]
        real = drv._epoll
        drv._epoll = _StaleEpoll(real, stale)            # the racing thread's event
        try:
            drv.reap(Caller(P, os.getppid()))
        finally:
            drv._epoll = real
        assert ctx_of(a, live).table.state == TABLE_LIVE
        h = uvirtual(d, live, 1)
        a.write(live, h, 0, bytes(K4))
        os.close(new.adap_fd)
    finally:
        a.close()


# -- item 7: the caller's identity, never the OS's answer ---------------------------


def test_afu_debug_from_a_child_lands_in_the_childs_memory():
    a = cxlflash.Adapter()
    try:
        buf = ctypes.create_string_buffer(48)          # the same address in both
        addr = ctypes.addressof(buf)

        def child():
            arg = uapi.ht_cxlflash_afu_debug()
            arg.afu_subcmd[0] = 0x04                   # AFU_COUNTERS
            arg.data_ea = addr
            arg.data_len = 48
            cxlflash.ioctl(a, uapi.HT_CXLFLASH_AFU_DEBUG, arg)
            return buf.raw

        got = in_child(child)
        assert got != bytes(48)                        # afu_cmds >= 1
        assert buf.raw == bytes(48)                    # the owner's memory untouched
    finally:
        a.close()


def test_the_driver_never_asks_the_os_who_is_calling():
    root = pathlib.Path(cxlflash.__file__).parent
    for f in sorted((root / "driver").glob("*.py")) + [root / "server" / "service.py"]:
        src = f.read_text()
        assert "getpid" not in src and "getppid" not in src, f"{f.name} asks the OS"


# -- item 11: MANAGE_LUN names the disk's own LUN -----------------------------------


def test_manage_lun_refuses_another_luns_wwid():
    a = cxlflash.Adapter()
    try:
        w1 = a.add_lun(None, size=CHUNK * K4)
        w2 = a.add_lun(None, size=CHUNK * K4)
        d1 = a.open_disk(w1)
        stranger = bytes(range(0x60, 0x70))
        before = dict(a.driver.lluns)
        for wwid in (w2, stranger):
            for flags in (ENABLE, uapi.DK_CXLFLASH_MANAGE_LUN_DISABLE_SUPERPIPE, 0):
                with pytest.raises(cxlflash.CxlFlashError) as ei:
                    manage(d1, wwid, flags)
                assert ei.value.errno == errno.EINVAL
                assert wwid.hex() in str(ei.value) and w1.hex() in str(ei.value)
        assert a.driver.lluns == before and d1.sdev.llun is before[w1]
        manage(d1, w1, ENABLE)                         # its own WWID: fine
    finally:
        a.close()


# -- item 12: LUN records go with the LUN; a shrunk LUN hands out no chunk beyond it --


def test_deleted_luns_leave_no_records():
    a = cxlflash.Adapter()
    drv = a.driver
    try:
        base = (len(drv.gluns), len(drv.lluns), len(drv.sdevs))
        for _ in range(200):
            w = a.create_lun(CHUNK * K4)
            d = a.open_disk(w)
            at = attach(d)
            h = uvirtual(d, at.context_id, 1)
            release(d, at.context_id, h)
            detach(d, at.context_id)
            os.close(at.adap_fd)
            a.delete_lun(w)
        assert (len(drv.gluns), len(drv.lluns), len(drv.sdevs)) == base
        with pytest.raises(cxlflash.CxlFlashError) as ei:
            drv.sdev(w, 0)
        assert ei.value.errno == errno.ENODEV
    finally:
        a.close()


def test_verify_capacity_shrink_limits_the_allocator():
    a = cxlflash.Adapter()
    try:
        w = a.add_lun(None, size=4 * CHUNK * K4)
        d = a.open_disk(w)
        at = attach(d)
        cid = at.context_id
        h = uvirtual(d, cid, CHUNK)                    # chunk 0
        glun = a.driver.gluns[w]
        os.ftruncate(glun.backing.fd, 2 * CHUNK * K4)  # the LUN shrank to 2 chunks
        vf = uapi.dk_cxlflash_verify()
        vf.context_id, vf.rsrc_handle = cid, h
        vf.hint = uapi.DK_CXLFLASH_VERIFY_HINT_SENSE
        vf.sense_data[:] = bytes(fixed_sense(0x6, 0x2A))   # capacity data has changed
        call(d, uapi.DK_CXLFLASH_VERIFY, vf)
        assert glun.max_lba == 2 * CHUNK - 1
        resize(d, cid, h, 4 * CHUNK)                   # best effort: one more chunk
        auns = ctx_of(a, cid).table.auns(h)
        assert len(auns) == 2 and auns.max() < 2
        with pytest.raises(cxlflash.CxlFlashError) as ei:
            uvirtual(d, cid, CHUNK)
        assert ei.value.errno == errno.ENOSPC
        os.close(at.adap_fd)
    finally:
        a.close()


# -- item 16: VLUN_CLONE takes the one-pass clone ------------------------------------


class _CloneSpy:
    def __init__(self, table):
        self._table = table
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._table, name)

    def clone_slot(self, *args):
        self.calls.append(args)
        return self._table.clone_slot(*args)


def test_vlun_clone_raises_clone_counts_in_the_copy_pass(one_chunk):
    a, d, fds = one_chunk
    at = attach(d)
    fds.append(at.adap_fd)
    pc = at.context_id
    h = uvirtual(d, pc, CHUNK)
    cc = attach(d, caller=CHILD).context_id
    child = ctx_of(a, cc)
    real = child.table
    child.table = spy = _CloneSpy(real)
    try:
        clone(d, pc, cc)
    finally:
        child.table = real
    alloc = a.driver.gluns[d.wwid].allocator
    assert len(spy.calls) == 1 and spy.calls[0][3] is alloc
    assert alloc.clone_count(int(real.auns(h)[0])) == 1
    # The clone's data path reaches the shared chunk.
    a.write(pc, h, 0, b"\x11" * K4)
    out = bytearray(K4)
    afu_command(real, h, a.driver.gluns[d.wwid].backing.fd, K4, 0, out)
    assert out == b"\x11" * K4


# -- items 6 and 9: a forked child's replicas -------------------------------------------


def test_a_child_replica_never_goes_back_to_an_older_snapshot():
    a = cxlflash.Adapter()
    try:
        w = a.add_lun(None, size=4 * CHUNK * K4)
        d = a.open_disk(w)

        def child():
            cid = attach(d).context_id
            h = uvirtual(d, cid, 0)
            remote = a._remote
            orig = remote._apply
            entered = threading.Event()

            def slow(*args):
                if threading.current_thread().name == "first" and not entered.is_set():
                    entered.set()
                    time.sleep(0.3)          # the older reply is applied late
                return orig(*args)

            remote._apply = slow
            t = threading.Thread(target=resize, args=(d, cid, h, CHUNK), name="first")
            t.start()
            assert entered.wait(10)
            resize(d, cid, h, 2 * CHUNK)     # answered after the first
            t.join(10)
            return remote.by_id[cid].table.lxt_count(h)

        assert in_child(child) == 2
    finally:
        a.close()


def test_a_child_thread_cannot_write_through_a_released_handle():
    """The owner frees the chunk of a RELEASE before the child's replica
    learns of it; the parent hands the chunk to a new vLUN in that window,
    and another child thread writes through the released handle.  The
    write must not land."""
    a = cxlflash.Adapter()
    w = a.add_lun(None, size=CHUNK * K4)          # one chunk
    d = a.open_disk(w)
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # pragma: no cover (child)
        rc = 3
        try:
            cid = attach(d).context_id
            h = uvirtual(d, cid, CHUNK)
            a.write(cid, h, 0, b"\xee" * K4)
            remote = a._remote
            orig = remote._apply
            results, threads = [], []

            def writer():
                try:
                    a.write(cid, h, 0, b"\xee" * K4)
                    results.append("written")
                except OSError as e:
                    results.append(getattr(e, "afu_rc", e.errno))

            def window(*args):
                remote._apply = orig
                os.write(up_w, b"r")               # the owner freed the chunk
                os.read(down_r, 1)                 # ... and gave it to the parent
                t = threading.Thread(target=writer)
                threads.append(t)
                t.start()
                t.join(1.0)
                orig(*args)

            remote._apply = window
            release(d, cid, h)
            threads[0].join(10)
            rc = 0 if results and results[0] != "written" else 2
        finally:
            os._exit(rc)
    try:
        assert os.read(up_r, 1) == b"r"
        at = attach(d)
        ph = uvirtual(d, at.context_id, CHUNK)        # the freed chunk
        a.write(at.context_id, ph, 0, b"\x5a" * K4)
        os.write(down_w, b"g")
        _, status = os.waitpid(pid, 0)
        assert a.read(at.context_id, ph, 0, 1) == b"\x5a" * K4
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        os.close(at.adap_fd)
    finally:
        for fd in (up_r, up_w, down_r, down_w):
            os.close(fd)
        a.close()


def test_a_child_retires_its_replica_before_closing_the_adapter_fd():
    """Closing the adapter fd lets the owner free the context's chunks at
    its next reap: the replica must stop first, and stay stopped."""
    a = cxlflash.Adapter()
    try:
        w = a.add_lun(None, size=2 * CHUNK * K4)
        d = a.open_disk(w)

        def child():
            at = attach(d)
            cid = at.context_id
            h = uvirtual(d, cid, CHUNK)
            a.write(cid, h, 0, b"\x01" * K4)
            table = a._remote.by_id[cid].table
            a._remote.retire_context(cid)
            os.close(at.adap_fd)
            attach(d)                          # another ioctl: a fresh snapshot
            try:
                afu_command(table, h, a.driver.gluns[w].backing.fd, K4, 0, bytearray(K4))
            except cxlflash.AfuError as e:
                stale = e.afu_rc
            return stale, cid in a._remote.by_id

        assert in_child(child) == (0x21, False)
    finally:
        a.close()


def test_verify_capacity_change_moves_the_end_of_direct_handles():
    """After VERIFY saw the LUN shrink, a direct handle (of any context)
    still let writes through to its old end: the file grew back."""
    a = cxlflash.Adapter()
    try:
        w = a.add_lun(None, size=4 * CHUNK * K4)
        d = a.open_disk(w)
        at1, at2 = attach(d), attach(d)
        ud = uapi.dk_cxlflash_udirect()
        ud.context_id = at2.context_id
        call(d, uapi.DK_CXLFLASH_USER_DIRECT, ud)
        hd = ud.rsrc_handle
        ud1 = uapi.dk_cxlflash_udirect()
        ud1.context_id = at1.context_id
        call(d, uapi.DK_CXLFLASH_USER_DIRECT, ud1)
        glun = a.driver.gluns[w]
        os.ftruncate(glun.backing.fd, 2 * CHUNK * K4)  # the LUN shrank by half
        vf = uapi.dk_cxlflash_verify()
        vf.context_id, vf.rsrc_handle = at1.context_id, ud1.rsrc_handle
        vf.hint = uapi.DK_CXLFLASH_VERIFY_HINT_SENSE
        vf.sense_data[:] = bytes(fixed_sense(0x6, 0x2A))   # capacity data has changed
        call(d, uapi.DK_CXLFLASH_VERIFY, vf)
        assert vf.last_lba == 2 * CHUNK - 1
        with pytest.raises(cxlflash.AfuError):          # the other context's handle too
            a.write(at2.context_id, hd, 3 * CHUNK, bytes(K4))
        assert os.fstat(glun.backing.fd).st_size == 2 * CHUNK * K4
        a.write(at2.context_id, hd, 2 * CHUNK - 1, b"\x01" * K4)   # the new last block
        os.ftruncate(glun.backing.fd, 4 * CHUNK * K4)  # and it grew back
        call(d, uapi.DK_CXLFLASH_VERIFY, vf)
        a.write(at2.context_id, hd, 3 * CHUNK, b"\x02" * K4)
        os.close(at1.adap_fd)
        os.close(at2.adap_fd)
    finally:
        a.close()
