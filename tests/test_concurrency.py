"""Races, in threads and in processes, against the core's locking contract
and the driver's lifetimes (issue 8): close vs I/O, shrink vs I/O, grow vs
readers, open vs open, release vs clone, ioctls from several threads, AFU
resets while I/O runs, and a forked child's release vs its own writes.

After every race the blocks involved are verified against a deterministic
per-LBA pattern (``cxlflash._core.pattern``: any block can be regenerated
from its LBA and a sequence number), and the chunk allocator is checked
against every live LXT (no chunk freed while a table still maps it, no
reference lost).

Everything is bounded: a few rounds and a time cap of a few seconds per
test.  LUNs use 512-byte blocks so a chunk is 32 MiB of memory and whole
vLUNs can be verified quickly.  Tests that crashed the interpreter on main
run in a forked child (``forking.in_child``), so a crash fails the test.
"""
import errno
import os
import threading
import time

import numpy as np
import pytest

import cxlflash
from cxlflash import uapi
from cxlflash._core import pattern
from cxlflash._core.allocator import ChunkAllocator
from cxlflash._core.tables import ResourceTable
from cxlflash.driver import superpipe
from cxlflash.driver.context import Caller
from cxlflash.errors import AdapterResetError, AfuError, CxlFlashError

from forking import in_child
from fuzzing import check_allocators, live_contexts

CHUNK = 1 << 16
BS = 512
TIME_CAP = 2.0          # seconds of racing per test (a few rounds fit in it)


# -- helpers ------------------------------------------------------------------------


def blocks(lba, n, seq):
    """``n`` blocks of pattern ``seq`` from ``lba`` (a uint8 array)."""
    buf = np.empty(n * BS, dtype=np.uint8)
    pattern.fill(buf, np.arange(lba, lba + n, dtype=np.uint64),
                 np.full(n, seq, dtype=np.uint64), BS)
    return buf


def bad_blocks(data, lba, seq):
    """How many blocks of ``data`` (from ``lba``) are not pattern ``seq``."""
    n = len(data) // BS
    return pattern.verify(data, lba, np.full(n, seq, dtype=np.uint64), BS)


def memory_disk(adapter, chunks):
    """A memory LUN of ``chunks`` chunks of 512-byte blocks, opened."""
    wwid = adapter.add_lun(None, size=chunks * CHUNK * BS, block_size=BS)
    return adapter.open_disk(wwid)


class Racer:
    """Threads that loop a body until told to stop or a deadline; the first
    unexpected exception of each is kept."""

    def __init__(self, cap=TIME_CAP):
        self.stop = threading.Event()
        self.deadline = time.monotonic() + cap
        self.errors = []
        self.threads = []

    def running(self):
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def spawn(self, fn, *args):
        def run():
            try:
                fn(*args)
            except BaseException as e:      # noqa: BLE001
                self.errors.append(e)
                self.stop.set()
        t = threading.Thread(target=run, daemon=True)
        self.threads.append(t)
        t.start()
        return t

    def join(self):
        """Let the threads race until the deadline (or the first error),
        then stop and join them; raise the first error."""
        self.stop.wait(max(0.0, self.deadline - time.monotonic()))
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a racing thread hangs"
        if self.errors:
            raise self.errors[0]


# -- close vs I/O ---------------------------------------------------------------------


SPREAD = 6             # chunks of the vLUN written by one transfer


def spread_vlun(ctx):
    """A vLUN of SPREAD chunks that are not adjacent on the LUN (another
    vLUN took every other chunk): a transfer over all of it is SPREAD
    separate pwrites, with the fd looked up again for each."""
    v = ctx.create_virtual(0)
    gap = ctx.create_virtual(0)
    for k in range(1, SPREAD + 1):
        v.set_size(k * CHUNK)
        gap.set_size(k * CHUNK)
    runs = v.translate(np.arange(0, SPREAD * CHUNK, CHUNK)) >> np.uint64(16)
    assert (np.diff(runs.astype(np.int64)) != 1).all(), runs
    return v


@pytest.mark.parametrize("path", ["lun", "ioctl"])
def test_adapter_close_fences_io_in_flight(tmp_path, path):
    """Adapter.close() while another thread writes 192 MiB over 6
    non-adjacent chunks (6 pwrites): close waits for the transfer in
    flight (or it fails), no byte reaches the files opened right after
    close (they get the backing's fd number), and I/O after close fails
    with a clear error.  On main 352 MiB landed in such a file."""
    data = blocks(0, SPREAD * CHUNK, 1)
    for rnd in range(3):
        a = cxlflash.Adapter()
        disk = memory_disk(a, 2 * SPREAD)
        ctx = disk.attach()
        v = spread_vlun(ctx)
        cid, h = ctx.context_id, v.handle
        writes = []
        failures = []
        going = threading.Event()

        def writer():
            while len(writes) < 1000:
                going.set()
                try:
                    if path == "lun":
                        v.write(0, data)
                    else:
                        a.write(cid, h, 0, data)
                except Exception as e:          # noqa: BLE001
                    failures.append(e)
                    return
                writes.append(1)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        assert going.wait(10)
        time.sleep(0.005 * (rnd + 1))
        a.close()
        victims = [open(tmp_path / f"after-close-{rnd}-{i}", "w+b") for i in range(8)]
        t.join(20)
        assert not t.is_alive(), "the writer never noticed the close"
        try:
            for f in victims:
                size = os.fstat(f.fileno()).st_size
                assert size == 0, f"{size} bytes landed in a file opened after close"
        finally:
            for f in victims:
                f.close()
        assert len(failures) == 1, "I/O went on after close"
        e = failures[0]
        assert isinstance(e, (OSError, ValueError)) and str(e), f"unclear error: {e!r}"
        # I/O issued after close: a clear error, no fd touched.
        with pytest.raises((OSError, ValueError)) as ei:
            if path == "lun":
                v.write(0, data[:BS])
            else:
                a.write(cid, h, 0, data[:BS])
        assert str(ei.value)


def test_context_close_fences_io_in_flight():
    """Context.close() (RELEASE + DETACH) while threads write through its
    vLUN: once close returns, no write lands in the chunks it gave back,
    which another context's vLUN takes and verifies."""
    with cxlflash.Adapter() as a:
        disk = memory_disk(a, 2)
        deadline = time.monotonic() + TIME_CAP
        rounds = 0
        while time.monotonic() < deadline and rounds < 8:
            rounds += 1
            ctx = disk.attach()
            v = ctx.create_virtual(2 * CHUNK)           # every chunk of the LUN
            data = blocks(0, 4096, 7)
            stop = threading.Event()
            bad = []

            def writer(base):
                while not stop.is_set():
                    try:
                        v.write(base, data)
                    except (OSError, ValueError):
                        return
                    except Exception as e:              # noqa: BLE001
                        bad.append(e)
                        return

            ts = [threading.Thread(target=writer, args=(b,), daemon=True)
                  for b in (0, CHUNK + 8)]
            for t in ts:
                t.start()
            time.sleep(0.01)
            ctx.close()
            with disk.attach() as other:
                w = other.create_virtual(2 * CHUNK)
                mine = blocks(0, 2 * CHUNK, 100 + rounds)
                w.write(0, mine)
                stop.set()
                for t in ts:
                    t.join(10)
                assert not bad, bad
                got = w.read(0, 2 * CHUNK)
                assert bad_blocks(got, 0, 100 + rounds) == 0, \
                    "a write through a closed context landed in another context's vLUN"
                w.close()
            check_allocators(a)


def test_adapter_fd_release_fences_io_in_flight():
    """Closing a context's adapter fd (its last copy) while a thread writes
    through it at the ioctl level: the driver's release of the fd (run by
    the next ioctl) detaches the context and frees its chunks; a vLUN of
    another context takes them all and must keep its data, and the
    writer's later writes fail with a clear error."""
    with cxlflash.Adapter() as a:
        disk = memory_disk(a, 2)
        deadline = time.monotonic() + TIME_CAP
        rounds = 0
        with disk.attach() as other:
            while time.monotonic() < deadline and rounds < 8:
                rounds += 1
                att = uapi.dk_cxlflash_attach()
                att.hdr.flags = os.O_RDWR
                cxlflash.ioctl(disk, uapi.DK_CXLFLASH_ATTACH, att)
                uv = uapi.dk_cxlflash_uvirtual()
                uv.context_id = att.context_id
                uv.lun_size = 2 * CHUNK * BS // 4096          # every chunk of the LUN
                cxlflash.ioctl(disk, uapi.DK_CXLFLASH_USER_VIRTUAL, uv)
                data = blocks(0, 4096, 9)
                stop = threading.Event()
                bad = []
                going = threading.Event()

                def writer():
                    lba = 0
                    while not stop.is_set():
                        try:
                            a.write(att.context_id, uv.rsrc_handle, lba, data)
                        except (OSError, ValueError) as e:
                            if not str(e):
                                bad.append(e)
                            return
                        except Exception as e:          # noqa: BLE001
                            bad.append(e)
                            return
                        going.set()
                        lba = (lba + CHUNK + 4096) % (2 * CHUNK - 4096)

                t = threading.Thread(target=writer, daemon=True)
                t.start()
                assert going.wait(10)
                os.close(att.adap_fd)                 # the last copy of the fd
                w = other.create_virtual(2 * CHUNK)   # this ioctl reaps the fd first
                seq = 300 + rounds
                w.write(0, blocks(0, 2 * CHUNK, seq))
                time.sleep(0.005)
                stop.set()
                t.join(10)
                assert not t.is_alive() and not bad, bad
                n = bad_blocks(w.read(0, 2 * CHUNK), 0, seq)
                assert n == 0, (f"round {rounds}: {n} blocks written through a released "
                                f"context landed in another context's vLUN")
                w.close()
                check_allocators(a)
        assert rounds >= 1


# -- shrink vs I/O --------------------------------------------------------------------


def test_shrink_races_io_and_freed_chunks_stay_clean():
    """Threads read and write all over a vLUN while it is shrunk
    (release=True) and grown back; each freed chunk is taken at once by a
    victim vLUN of another context, filled with its pattern and verified
    after the writers stopped: not one block of it may change.  The blocks
    the vLUN kept hold what its writers wrote."""
    with cxlflash.Adapter() as a:
        disk = memory_disk(a, 4)
        with disk.attach() as ctx, disk.attach() as vctx:
            v = ctx.create_virtual(4 * CHUNK)
            keep = blocks(0, 256, 5)
            v.write(0, keep)
            r = Racer()
            expected = {}

            def writer(idx):
                rng = np.random.default_rng(idx)
                data = blocks(0, 64, 1)
                while r.running():
                    lba = int(rng.integers(CHUNK, 4 * CHUNK - 64))
                    try:
                        v.write(lba, data)
                    except (OSError, ValueError):
                        continue              # beyond the current size: refused

            def reader(idx):
                rng = np.random.default_rng(100 + idx)
                buf = bytearray(64 * BS)
                while r.running():
                    v.readinto(0, buf)
                    assert bad_blocks(buf, 0, 5) == 0, "a kept block changed"
                    try:
                        v.readinto(int(rng.integers(0, 4 * CHUNK - 64)), buf)
                    except (OSError, ValueError):
                        pass

            for i in range(2):
                r.spawn(writer, i)
            r.spawn(reader, 0)
            rounds = 0
            try:
                while r.running() and rounds < 20:
                    rounds += 1
                    v.set_size(CHUNK, release=True)        # frees 3 chunks
                    victim = vctx.create_virtual(3 * CHUNK)
                    seq = 1000 + rounds
                    victim.write(0, blocks(0, 3 * CHUNK, seq))
                    expected[rounds] = (victim, seq)
                    # The victim must keep its data while the writers race
                    # a vLUN that no longer has those chunks.
                    time.sleep(0.02)
                    got = victim.read(0, 3 * CHUNK)
                    assert bad_blocks(got, 0, seq) == 0, \
                        "a write to a shrunk vLUN landed in a chunk another vLUN owns"
                    victim.close()
                    v.set_size(4 * CHUNK)
            finally:
                r.join()
            assert rounds >= 1
            assert bad_blocks(v.read(0, 256), 0, 5) == 0
            check_allocators(a)


# -- grow vs readers (segfaulted on main) ------------------------------------------------


def test_table_readers_race_grow_and_shrink():
    """chunks(), lxt() and translate_many() race grow_from()/shrink() (the
    LXT is reallocated under them).  On main this segfaulted 3 runs of 3;
    it runs in a child so a crash fails the test."""

    def body():
        t = ResourceTable(4)
        alloc = ChunkAllocator(8192)
        h = t.open_virtual(3)
        t.grow_from(h, alloc, 1, 0, 1)                 # chunk 0 always mapped
        first = int(t.auns(h)[0])
        vlbas = np.arange(0, CHUNK, 97, dtype=np.uint64)
        want = (np.uint64(first) << np.uint64(16)) | vlbas
        r = Racer()
        seen = [0]

        def reader():
            while r.running():
                c = t.auns(h)
                assert len(c) >= 1 and c[0] == first
                assert (c >= 0).all() and (c < 8192).all(), "garbage chunk numbers"
                x = t.lxt(h)
                assert len(x) >= 1 and int(x[0]) >> 16 == first
                assert np.array_equal(t.translate_many(h, vlbas), want)
                seen[0] += 1

        for _ in range(3):
            r.spawn(reader)
        n = 0
        while r.running() and n < 3000:
            n += 1
            t.grow_from(h, alloc, 1 + (n * 37) % 4000, 0, 1)
            alloc.free_many(t.shrink(h, 1))
        r.join()
        assert t.lxt_count(h) == 1 and alloc.allocated_count() == 1
        return n, seen[0]

    grows, reads = in_child(body)
    assert grows > 2 and reads > 2


def test_vlun_readers_race_set_size():
    """The same through the object API: VirtualLun.set_size up and down
    while threads call chunks, translate and read (in a child)."""

    def body():
        with cxlflash.Adapter() as a:
            disk = memory_disk(a, 4096)          # sparse: 128 GiB of holes
            with disk.attach() as ctx:
                v = ctx.create_virtual(CHUNK)
                v.write(0, blocks(0, 128, 3))
                r = Racer()

                table = a._context_record(ctx.context_id).table

                def reader():
                    while r.running():
                        assert v.chunks >= 1
                        c = table.auns(v.handle)          # the LXT, copied
                        assert len(c) >= 1 and ((c >= 0) & (c < 4096)).all(), \
                            "garbage chunk numbers"
                        p = v.translate([0, 127])
                        assert int(p[1]) - int(p[0]) == 127
                        assert bad_blocks(v.read(0, 128), 0, 3) == 0

                for _ in range(2):
                    r.spawn(reader)
                n = 0
                while r.running() and n < 400:
                    n += 1
                    v.set_size(CHUNK * (2 + (n * 397) % 4000))   # the LXT moves
                    v.set_size(CHUNK, release=True)
                r.join()
                check_allocators(a)
                return n

    assert in_child(body) > 1


# -- open vs open ---------------------------------------------------------------------


def test_concurrent_table_opens_never_share_a_handle():
    t = ResourceTable(4096)
    n_threads, per = 8, 200
    barrier = threading.Barrier(n_threads)
    got = [[] for _ in range(n_threads)]

    def opener(i):
        barrier.wait()
        for k in range(per):
            if k % 3 == 0:
                got[i].append(t.open_direct(3, 0x10, 1, 1000))
            else:
                got[i].append(t.open_virtual(3))

    ts = [threading.Thread(target=opener, args=(i,)) for i in range(n_threads)]
    for x in ts:
        x.start()
    for x in ts:
        x.join()
    handles = [h for g in got for h in g]
    assert len(set(handles)) == len(handles) == n_threads * per, "two opens got one handle"
    assert t.rht_out == len(handles) == len(t.open_handles())


def test_concurrent_create_virtual_never_shares_a_handle():
    with cxlflash.Adapter() as a:
        disk = memory_disk(a, 64)
        with disk.attach() as ctx:
            n_threads, per = 4, 25
            barrier = threading.Barrier(n_threads)
            got = [[] for _ in range(n_threads)]
            errors = []

            def opener(i):
                try:
                    barrier.wait()
                    for k in range(per):
                        v = ctx.create_virtual(k % 2)     # blocks: 0 or 1 chunk
                        got[i].append(v)
                except Exception as e:          # noqa: BLE001
                    errors.append(e)

            ts = [threading.Thread(target=opener, args=(i,)) for i in range(n_threads)]
            for x in ts:
                x.start()
            for x in ts:
                x.join()
            assert not errors, errors
            luns = [v for g in got for v in g]
            handles = [v.handle for v in luns]
            assert len(set(handles)) == len(handles), "two create_virtual got one handle"
            rec = a._context_record(ctx.context_id)
            assert rec.table.rht_out == len(luns) == len(rec.table.open_handles())
            # Each vLUN is its own: write its handle's pattern, read it back.
            for v in luns:
                if v.size:
                    v.write(0, blocks(0, 1, 1 + v.handle))
            for v in luns:
                if v.size:
                    assert bad_blocks(v.read(0, 1), 0, 1 + v.handle) == 0
            check_allocators(a)


# -- release vs clone ---------------------------------------------------------------------


def test_release_races_clone():
    """A 'child' (another pid, seen as this process's child by the driver)
    clones the parent's context (VLUN_CLONE) while a parent thread releases
    its vLUNs.  Each handle is cloned whole or not at all, the clone sees
    the parent's data, and the allocator matches every live LXT after each
    round and after the child detaches."""
    with cxlflash.Adapter() as a:
        disk = memory_disk(a, 16)
        drv, sdev = a.driver, disk.sdev
        me = Caller(os.getpid(), os.getppid())
        child = Caller(os.getpid() + 1_000_000, os.getpid())
        backing_fd = drv.gluns[disk.wwid].backing.fd

        def ioctl(caller, request, arg):
            superpipe.disk_ioctl(drv, sdev, disk, request, arg, caller)
            return arg

        deadline = time.monotonic() + TIME_CAP
        rounds = cloned_some = 0
        with disk.attach() as parent:
            while time.monotonic() < deadline and rounds < 30:
                rounds += 1
                luns = [parent.create_virtual(2 * CHUNK - i) for i in range(4)]
                for v in luns:
                    v.write(CHUNK - 1, blocks(CHUNK - 1, 2, 50 + v.handle))
                att = uapi.dk_cxlflash_attach()
                att.hdr.flags = os.O_RDWR
                ioctl(child, uapi.DK_CXLFLASH_ATTACH, att)
                clone = uapi.dk_cxlflash_clone()
                clone.hdr.flags = os.O_RDWR
                clone.context_id_src = parent.context_id
                clone.context_id_dst = att.context_id
                barrier = threading.Barrier(2)
                errs = []

                def release():
                    barrier.wait()
                    for v in luns[rounds % 2:]:
                        v.close()

                def do_clone():
                    barrier.wait()
                    try:
                        ioctl(child, uapi.DK_CXLFLASH_VLUN_CLONE, clone)
                    except CxlFlashError as e:
                        errs.append(e)

                ts = [threading.Thread(target=release), threading.Thread(target=do_clone)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join(30)
                for e in errs:
                    assert isinstance(e, CxlFlashError) and e.errno in (errno.EINVAL,), e
                check_allocators(a)
                ctx = next(c for c in live_contexts(a) if c.ctxid == att.context_id)
                for h in ctx.table.open_handles():
                    cloned_some += 1
                    p = ctx.table.translate_many(
                        h, np.array([CHUNK - 1, CHUNK], dtype=np.uint64))
                    data = b"".join(os.pread(backing_fd, BS, int(x) * BS) for x in p)
                    assert bad_blocks(data, CHUNK - 1, 50 + h) == 0, \
                        f"the clone of handle {h} does not see its data"
                det = uapi.dk_cxlflash_detach()
                det.context_id = att.context_id
                ioctl(child, uapi.DK_CXLFLASH_DETACH, det)
                os.close(att.adap_fd)
                for v in luns:
                    v.close()
                check_allocators(a)
            assert rounds >= 1 and cloned_some > 0


def test_scrubbing_survives_a_clone_released_on_both_sides_at_once():
    """A scrubbing vLUN is cloned into a 'child' context; then the parent
    releases it while the child shrinks its clone to nothing, at the same
    moment.  Whichever drops the last reference must scrub the chunk: it
    is zero once both are done.  On main the scrub decision read the
    clone count unlocked (both sides skipped it), and the clone did not
    carry the scrub flag at all (items 5 and 10)."""
    with cxlflash.Adapter() as a:
        disk = memory_disk(a, 4)
        drv, sdev = a.driver, disk.sdev
        child = Caller(os.getpid() + 1_000_000, os.getpid())
        fd = drv.gluns[disk.wwid].backing.fd

        def ioctl(caller, request, arg):
            superpipe.disk_ioctl(drv, sdev, disk, request, arg, caller)
            return arg

        deadline = time.monotonic() + TIME_CAP
        rounds = 0
        with disk.attach() as parent:
            while time.monotonic() < deadline and rounds < 40:
                rounds += 1
                x = parent.create_virtual(CHUNK, scrub=True)
                for lba in (0, CHUNK - 16):
                    x.write(lba, blocks(lba, 16, 7 + rounds))
                aun = int(x.translate([0])[0]) >> 16
                att = ioctl(child, uapi.DK_CXLFLASH_ATTACH, _attach_arg())
                clone = uapi.dk_cxlflash_clone()
                clone.hdr.flags = os.O_RDWR
                clone.context_id_src = parent.context_id
                clone.context_id_dst = att.context_id
                ioctl(child, uapi.DK_CXLFLASH_VLUN_CLONE, clone)
                resize = uapi.dk_cxlflash_resize()
                resize.context_id = att.context_id
                resize.rsrc_handle = x.handle
                resize.req_size = 0
                barrier = threading.Barrier(2)
                errs = []

                def parent_release():
                    barrier.wait()
                    x.close()

                def child_shrink():
                    barrier.wait()
                    try:
                        ioctl(child, uapi.DK_CXLFLASH_VLUN_RESIZE, resize)
                    except Exception as e:          # noqa: BLE001
                        errs.append(e)

                ts = [threading.Thread(target=parent_release),
                      threading.Thread(target=child_shrink)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join(30)
                assert not errs, errs
                for lba in (0, CHUNK - 16):
                    raw = os.pread(fd, 16 * BS, (aun * CHUNK + lba) * BS)
                    assert not any(raw), (f"round {rounds}: chunk {aun} was freed with "
                                          f"its data (not scrubbed)")
                det = uapi.dk_cxlflash_detach()
                det.context_id = att.context_id
                ioctl(child, uapi.DK_CXLFLASH_DETACH, det)
                os.close(att.adap_fd)
                check_allocators(a)
        assert rounds >= 1


def _attach_arg(mode=os.O_RDWR):
    arg = uapi.dk_cxlflash_attach()
    arg.hdr.flags = mode
    return arg


# -- ioctls from several threads ------------------------------------------------------------


def test_ioctl_cycles_from_threads_never_lose_a_context():
    """4 threads loop attach -> create_virtual -> write -> read -> close
    for a few seconds: no cycle may fail (on main: 'no such context', when
    two threads reaped the same adapter fd and one released another's new
    live context)."""
    with cxlflash.Adapter() as a:
        disk = memory_disk(a, 16)
        r = Racer(cap=3.0)
        cycles = [0] * 4

        def cycle(i):
            data = blocks(0, 8, 10 + i)
            while r.running():
                with disk.attach() as ctx:
                    v = ctx.create_virtual(CHUNK)
                    v.write(0, data)
                    got = v.read(0, 8)
                    assert bad_blocks(got, 0, 10 + i) == 0, "read another cycle's data"
                    v.close()
                cycles[i] += 1

        for i in range(4):
            r.spawn(cycle, i)
        r.join()
        assert min(cycles) > 1, cycles
        a.driver.reap(Caller(os.getpid(), os.getppid()))
        assert live_contexts(a) == []
        check_allocators(a)


# -- AFU resets while I/O runs -----------------------------------------------------------------


def test_resets_while_io_runs_contexts_recover():
    """Threads write and verify through their vLUNs while the owner resets
    the AFU again and again and another thread attaches and closes
    contexts: every transfer completes (the data path
    recovers its context, at worst after an AdapterResetError for a reset
    during the re-drive), no vLUN loses its context, and every block
    written is there afterwards."""
    with cxlflash.Adapter() as a:
        disk = memory_disk(a, 8)
        ctxs = [disk.attach() for _ in range(3)]
        luns = [c.create_virtual(CHUNK) for c in ctxs]
        r = Racer()
        done = [0] * 3

        def io(i):
            v = luns[i]
            k = 0
            while r.running():
                k += 1
                lba = (k * 64) % (CHUNK - 64)
                data = blocks(lba, 64, 1 + i)
                for attempt in range(20):
                    try:
                        v.write(lba, data)
                        assert bad_blocks(v.read(lba, 64), lba, 1 + i) == 0
                        break
                    except AdapterResetError:
                        continue
                else:
                    raise AssertionError("a vLUN never recovered from the resets")
                done[i] += 1

        churn = [0]

        def cycles():
            # Contexts come and go meanwhile (their adapter fds are reaped
            # by every ioctl): an error here is fine (a reset can catch a
            # cycle half way), losing one of the long-lived contexts is not.
            while r.running():
                try:
                    with disk.attach() as c:
                        c.create_virtual(10).close()
                    churn[0] += 1
                except (CxlFlashError, AfuError, AdapterResetError, ValueError):
                    pass

        for i in range(3):
            r.spawn(io, i)
        r.spawn(cycles)
        resets = 0
        while r.running():
            a.reset()
            resets += 1
            time.sleep(0.02)
        r.join()
        assert resets > 2 and min(done) > 2
        for i, (c, v) in enumerate(zip(ctxs, luns)):
            c.recover()
            n = min(done[i] * 64, CHUNK - 64)
            v.write(0, blocks(0, 64, 99))
            assert bad_blocks(v.read(0, 64), 0, 99) == 0
            w = c.create_virtual(10)                 # the context takes ioctls
            w.close()
            assert n > 0
        for c in ctxs:
            c.close()
        check_allocators(a)


# -- a forked child's release vs its own writes ---------------------------------------------------


@pytest.mark.parametrize("how", ["release", "shrink"])
def test_child_release_races_its_own_writes(how):
    """In a forked child, one thread writes 1 MiB at a time through a vLUN
    at the ioctl level (Adapter.write with its context id and handle: the
    child's replica of the table) while another releases the vLUN (or
    shrinks it to nothing).  The vLUN scrubs (NEED_WRITE_SAME): its chunks
    are zeroed, then freed.  After the writer stopped, every chunk of the
    released vLUN is still zero: no write through the stale replica landed
    after the owner scrubbed and freed it (any other vLUN could have had
    it by then).  A vLUN of another context then takes them and keeps its
    data.  The parent's own
    vLUN (the rest of the LUN) is intact.  On main a write through the
    stale replica landed in a chunk the owner had already handed to another
    vLUN (112 of 300 rounds)."""
    with cxlflash.Adapter() as a:
        disk = memory_disk(a, 6)
        backing_fd = a.driver.gluns[disk.wwid].backing.fd
        with disk.attach() as pctx:
            z = pctx.create_virtual(2 * CHUNK)
            z.write(0, blocks(0, 2 * CHUNK, 4242))

            def child():
                ctx = disk.attach()
                other = disk.attach()     # y lives here: x's handle number is not reused
                data = blocks(0, 2048, 77)               # 1 MiB per write
                deadline = time.monotonic() + TIME_CAP
                rounds = 0
                while time.monotonic() < deadline and rounds < 40:
                    rounds += 1
                    x = ctx.create_virtual(2 * CHUNK, scrub=True)
                    x_chunks = (x.translate([0, CHUNK]) >> np.uint64(16)).tolist()
                    cid, h, size = ctx.context_id, x.handle, x.size
                    stop = threading.Event()
                    bad = []
                    started = threading.Event()

                    def writer():
                        lba = 0
                        while not stop.is_set():
                            try:
                                a.write(cid, h, lba, data)
                            except AfuError:
                                return           # the handle is gone (0x01/0x13)
                            except Exception as e:      # noqa: BLE001
                                bad.append(e)
                                return
                            started.set()
                            # alternate between the two chunks
                            lba = (lba + CHUNK + 2048) % (size - 2048)

                    t = threading.Thread(target=writer, daemon=True)
                    t.start()
                    if not started.wait(5):
                        return f"the writer never wrote: {bad!r}"
                    if how == "release":
                        x.close()
                    else:
                        x.set_size(0, release=True)
                    # The owner scrubbed and freed x's chunks before it
                    # answered; nothing may be written into them any more.
                    time.sleep(0.002)
                    stop.set()
                    t.join(10)
                    if bad:
                        return f"writer: {bad[0]!r}"
                    for aun in x_chunks:
                        raw = np.frombuffer(os.pread(backing_fd, CHUNK * BS, aun * CHUNK * BS),
                                            np.uint8)
                        if raw.any():
                            return (f"round {rounds}: chunk {aun} was written through the "
                                    f"stale replica after the owner scrubbed and freed it "
                                    f"({how}, {np.count_nonzero(raw)} bytes)")
                    # Another vLUN takes them and keeps what it writes.
                    y = other.create_virtual(2 * CHUNK, scrub=True)
                    seq = 500 + rounds
                    y.write(0, blocks(0, 2 * CHUNK, seq))
                    n = bad_blocks(y.read(0, 2 * CHUNK), 0, seq)
                    if n:
                        return f"round {rounds}: {n} blocks of a new vLUN changed"
                    y.close()
                    x.close()
                ctx.close()
                other.close()
                return rounds

            res = in_child(child)
            assert isinstance(res, int) and res >= 1, res
            assert bad_blocks(z.read(0, 2 * CHUNK), 0, 4242) == 0, \
                "the child's writes reached the parent's vLUN"
            me = Caller(os.getpid(), os.getppid())
            deadline = time.monotonic() + 5
            while len(live_contexts(a)) > 1 and time.monotonic() < deadline:
                a.driver.reap(me)
                time.sleep(0.01)
            check_allocators(a)


def test_children_write_while_parent_releases_their_source():
    """Processes: two forked children clone the parent's vLUN and write
    their own halves while the parent releases its handle; the children
    hold the chunks (clone references) so their data survives, and the
    parent's next vLUN (which must not get those chunks while a child
    holds them) keeps its own data."""
    with cxlflash.Adapter() as a:
        disk = memory_disk(a, 4)
        with disk.attach() as pctx:
            v = pctx.create_virtual(2 * CHUNK)
            v.write(0, blocks(0, 2 * CHUNK, 1))
            r_go, w_go = os.pipe()
            r_ready, w_ready = os.pipe()
            pids = []
            for i in range(2):
                pid = os.fork()
                if pid == 0:                               # pragma: no cover
                    code = 1
                    try:
                        pctx.clone_after_fork()
                        os.write(w_ready, b"r")
                        os.read(r_go, 1)
                        base = i * CHUNK
                        for k in range(200):
                            lba = base + (k * 64) % (CHUNK - 64)
                            v.write(lba, blocks(lba, 64, 10 + i))
                        got = v.read(base, CHUNK)
                        seqs = np.full(CHUNK, 1, dtype=np.uint64)
                        touched = np.zeros(CHUNK, bool)
                        for k in range(200):
                            off = (k * 64) % (CHUNK - 64)
                            touched[off:off + 64] = True
                        seqs[touched] = 10 + i
                        code = 0 if pattern.verify(got, base, seqs, BS) == 0 else 2
                        pctx.close()
                    finally:
                        os._exit(code)
                pids.append(pid)
            got_ready = b""
            while len(got_ready) < 2:
                got_ready += os.read(r_ready, 2)
            os.write(w_go, b"xx")
            v.close()                                   # the children hold the chunks
            w = pctx.create_virtual(2 * CHUNK, best_effort=True)
            if w.size:
                w.write(0, blocks(0, w.size, 3))
            for pid in pids:
                _, status = os.waitpid(pid, 0)
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, \
                    f"child {pid}: status {status:#x}"
            for fd in (r_go, w_go, r_ready, w_ready):
                os.close(fd)
            if w.size:
                assert bad_blocks(w.read(0, w.size), 0, 3) == 0, \
                    "a child's write reached the parent's new vLUN"
            me = Caller(os.getpid(), os.getppid())
            deadline = time.monotonic() + 5
            while len(live_contexts(a)) > 1 and time.monotonic() < deadline:
                a.driver.reap(me)
                time.sleep(0.01)
            check_allocators(a)
