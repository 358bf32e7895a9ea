"""The data path of the Pythonic API against the bare system calls, side by
side (one group per pair).

Everything reads and writes one regular file under a temporary directory:
the backing store of a LUN made by ``Adapter(directory=...)``.  The vLUN
spans 16 chunks that are not physically adjacent (another vLUN's chunks
are interleaved), so a transfer crossing a chunk boundary is split.  Every
block the benchmarks touch is written and fsynced first, so all of it is
page-cached and clean.  Each baseline uses the same file, the same buffer
and the same physical offsets (from ``vlun.translate``).

``benchmarks/ratios.py`` prints the ratios against their targets; see
``benchmarks/README.md``.
"""
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest

import cxlflash
from cxlflash._core.rawio import raw_io
from cxlflash.reference import translate

CHUNK = 1 << 16
BS = 4096
CHUNKS = 16
N_RANDOM = 8192             # 4 KiB random operations per round
LIST_LEN = 64               # requests per listio call
SEQ_BLOCKS = 256            # 1 MiB
SEQ_PER_BOUNDARY = 8        # 8 MiB read sequentially around each boundary
N_THREADED = 16384          # 4 KiB random reads per round, over 1 or 2 threads
ROUNDS = 50                 # many rounds (min or paired median): the machine is shared


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datapath")
    a = cxlflash.Adapter(str(tmp))
    wwid = a.create_lun(2 * CHUNKS * CHUNK * BS)         # sparse: 8 GiB
    disk = a.open_disk(wwid)
    ctx = disk.attach()
    vlun = ctx.create_virtual(1)
    other = ctx.create_virtual(1)
    for n in range(2, CHUNKS + 1):                       # interleave the chunks
        vlun.set_size(n * CHUNK)
        other.set_size(n * CHUNK)
    assert vlun.size == CHUNKS * CHUNK
    fd = a.driver.gluns[wwid].backing.fd
    rng = np.random.default_rng(7)

    d = SimpleNamespace(a=a, ctx=ctx, vlun=vlun, fd=fd, cid=ctx.context_id, h=vlun.handle)
    # 4 KiB random operations: vLBAs over the whole vLUN, and their offsets.
    d.lbas = rng.choice(vlun.size, N_RANDOM, replace=False).astype(np.uint64)
    d.offs = vlun.translate(d.lbas) * np.uint64(BS)
    d.lba_list, d.off_list = d.lbas.tolist(), d.offs.tolist()
    d.buf = cxlflash.aligned_buffer(BS)
    # The C loop: every request at buffer offset 0 (the same 4 KiB buffer).
    d.read_ops = np.full(N_RANDOM, cxlflash.LIST_READ, dtype=np.uint8)
    d.write_ops = np.full(N_RANDOM, cxlflash.LIST_WRITE, dtype=np.uint8)
    d.zero_bufoffs = np.zeros(N_RANDOM, dtype=np.uint64)
    # List I/O: N_RANDOM / LIST_LEN calls of LIST_LEN reads each.
    ncalls = N_RANDOM // LIST_LEN
    d.list_lbas = d.lbas.reshape(ncalls, LIST_LEN)
    d.list_offs = d.offs.reshape(ncalls, LIST_LEN)
    d.list_ops = np.full(LIST_LEN, cxlflash.LIST_READ, dtype=np.uint8)
    d.list_nb = np.ones(LIST_LEN, dtype=np.uint64)
    d.list_bufoffs = np.arange(LIST_LEN, dtype=np.uint64) * np.uint64(BS)
    d.list_buf = cxlflash.aligned_buffer(LIST_LEN * BS)
    # 1 MiB sequential reads, half a MiB off alignment, around each chunk
    # boundary: one read in 8 crosses it (two preads for both sides).
    starts = []
    for b in range(1, CHUNKS):
        first = b * CHUNK - (SEQ_PER_BOUNDARY // 2) * SEQ_BLOCKS - SEQ_BLOCKS // 2
        starts += [first + k * SEQ_BLOCKS for k in range(SEQ_PER_BOUNDARY)]
    d.seq_starts = starts
    d.seq_buf = cxlflash.aligned_buffer(SEQ_BLOCKS * BS)
    mv = memoryview(d.seq_buf)
    d.seq_segments = []                 # per read: [(offset, [buffer slice])]
    for s in starts:
        segs, lba, pos = [], s, 0
        while pos < SEQ_BLOCKS:
            n = min(CHUNK - lba % CHUNK, SEQ_BLOCKS - pos)
            (p,) = vlun.translate([lba])
            segs.append((int(p) * BS, [mv[pos * BS:(pos + n) * BS]]))
            lba += n
            pos += n
        d.seq_segments.append(segs)
    assert sum(len(s) > 1 for s in d.seq_segments) == CHUNKS - 1
    # Data in every block touched, then fsync: page-cached and clean.
    for lba in d.lba_list:
        vlun.write(lba, rng.integers(0, 256, BS, dtype=np.uint8))
    for s in starts:
        vlun.write(s, rng.integers(0, 256, SEQ_BLOCKS * BS, dtype=np.uint8))
    os.fsync(fd)
    yield d
    ctx.close()
    a.close()


def check_same(d, fn_vlun, fn_raw):
    """The benchmark and its baseline read the same bytes."""
    fn_vlun()
    got = bytes(d.buf), bytes(d.list_buf), bytes(d.seq_buf)
    fn_raw()
    assert (bytes(d.buf), bytes(d.list_buf), bytes(d.seq_buf)) == got


# -- 4 KiB random reads and writes: the ioctl-level and object paths vs a C loop --------
#
# One round of each side does the same 8192 requests at the same offsets
# with the same buffer.  The baseline is ``raw_io``: one GIL-free Cython
# loop of single pread/pwrite calls (a C loop).  The measured sides are
# what a program issues: a Python loop of single-request calls, through the
# ioctl-level contract (``adapter.readinto(context_id, handle, lba, buf)``,
# what ported C code calls) and through the object (``vlun.readinto``).
# ``os.preadv``/``os.pwrite`` loops run alongside for information.  The
# sides are interleaved round by round (conftest.run_interleaved).


def c_randio(d, ops):
    raw_io(d.fd, ops, d.offs, BS, d.buf, d.zero_bufoffs)


def adapter_randread(d):
    readinto, cid, h, buf = d.a.readinto, d.cid, d.h, d.buf
    for lba in d.lba_list:
        readinto(cid, h, lba, buf)


def vlun_randread(d):
    readinto, buf = d.vlun.readinto, d.buf
    for lba in d.lba_list:
        readinto(lba, buf)


def preadv_randread(d):
    preadv, fd, bufs = os.preadv, d.fd, [d.buf]
    for off in d.off_list:
        preadv(fd, bufs, off)


@pytest.mark.benchmark(group="datapath 4K random read vs C")
def test_datapath_randread(interleaved, dp):
    check_same(dp, lambda: adapter_randread(dp), lambda: c_randio(dp, dp.read_ops))
    check_same(dp, lambda: vlun_randread(dp), lambda: preadv_randread(dp))
    interleaved([("c", lambda: c_randio(dp, dp.read_ops)),
                 ("adapter", lambda: adapter_randread(dp)),
                 ("vlun", lambda: vlun_randread(dp)),
                 ("preadv", lambda: preadv_randread(dp))], rounds=ROUNDS, ops=N_RANDOM)


def adapter_randwrite(d):
    write, cid, h, buf = d.a.write, d.cid, d.h, d.buf
    for lba in d.lba_list:
        write(cid, h, lba, buf)


def vlun_randwrite(d):
    write, buf = d.vlun.write, d.buf
    for lba in d.lba_list:
        write(lba, buf)


def pwrite_randwrite(d):
    pwrite, fd, buf = os.pwrite, d.fd, d.buf
    for off in d.off_list:
        pwrite(fd, buf, off)


@pytest.mark.benchmark(group="datapath 4K random write vs C")
def test_datapath_randwrite(interleaved, dp):
    interleaved([("c", lambda: c_randio(dp, dp.write_ops)),
                 ("adapter", lambda: adapter_randwrite(dp)),
                 ("vlun", lambda: vlun_randwrite(dp)),
                 ("pwrite", lambda: pwrite_randwrite(dp))], rounds=ROUNDS, ops=N_RANDOM)


# -- 1 MiB sequential reads crossing chunk boundaries -------------------------------------


def vlun_seqread(d):
    readinto, buf = d.vlun.readinto, d.seq_buf
    for lba in d.seq_starts:
        readinto(lba, buf)


def preadv_seqread(d):
    preadv, fd = os.preadv, d.fd
    for segs in d.seq_segments:
        for off, bufs in segs:
            preadv(fd, bufs, off)


@pytest.mark.benchmark(group="datapath 1M sequential read")
def test_datapath_seqread(interleaved, dp):
    check_same(dp, lambda: vlun_seqread(dp), lambda: preadv_seqread(dp))
    interleaved([("vlun", lambda: vlun_seqread(dp)), ("preadv", lambda: preadv_seqread(dp))],
                rounds=ROUNDS, ops=len(dp.seq_starts))


# -- list I/O: 64 x 4 KiB random reads per call --------------------------------------------


def vlun_listio(d):
    listio, ops, nb, buf, bo = d.vlun.listio, d.list_ops, d.list_nb, d.list_buf, d.list_bufoffs
    for lbas in d.list_lbas:
        listio(ops, lbas, nb, buf, bo)


def raw_listio(d):
    fd, ops, buf, bo = d.fd, d.list_ops, d.list_buf, d.list_bufoffs
    for offs in d.list_offs:
        raw_io(fd, ops, offs, BS, buf, bo)


@pytest.mark.benchmark(group="datapath listio 64x4K")
def test_datapath_listio(interleaved, dp):
    check_same(dp, lambda: vlun_listio(dp), lambda: raw_listio(dp))
    assert dp.vlun.listio(dp.list_ops, dp.list_lbas[0], dp.list_nb, dp.list_buf,
                          dp.list_bufoffs).ok
    interleaved([("vlun", lambda: vlun_listio(dp)), ("raw", lambda: raw_listio(dp))],
                rounds=ROUNDS, ops=len(dp.list_lbas))


# -- thread scaling: the same reads over 2 threads vs 1 -------------------------------------


@pytest.fixture(scope="module")
def threaded(dp):
    rng = np.random.default_rng(11)
    lbas = rng.choice(dp.lbas, N_THREADED).tolist()         # page-cached blocks
    return SimpleNamespace(lbas=lbas, bufs=[cxlflash.aligned_buffer(BS) for _ in range(2)])


def read_in_threads(d, t, nthreads):
    per = len(t.lbas) // nthreads
    readinto = d.vlun.readinto

    def work(i):
        buf = t.bufs[i]
        for lba in t.lbas[i * per:(i + 1) * per]:
            readinto(lba, buf)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


@pytest.mark.benchmark(group="datapath 4K random read threads")
def test_datapath_threads_2(benchmark, dp, threaded):
    benchmark.pedantic(read_in_threads, (dp, threaded, 2), rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.benchmark(group="datapath 4K random read threads")
def test_datapath_threads_1(benchmark, dp, threaded):
    benchmark.pedantic(read_in_threads, (dp, threaded, 1), rounds=ROUNDS, warmup_rounds=2)


# Not a target, for comparison: the same reads as listio batches of 64, so
# each call runs ~60 us without the GIL.  Per-call 4 KiB reads (above)
# scale unreliably on CPython's GIL: a thread that drops it for a ~1 us
# pread often takes it back before the waiting thread has woken up
# (os.preadv from 2 threads behaves the same).


def listio_in_threads(d, t, nthreads):
    per = len(t.groups) // nthreads
    listio, ops, nb, bo = d.vlun.listio, d.list_ops, d.list_nb, d.list_bufoffs

    def work(i):
        buf = t.list_bufs[i]
        for g in t.groups[i * per:(i + 1) * per]:
            listio(ops, g, nb, buf, bo)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


@pytest.fixture(scope="module")
def threaded_lists(threaded):
    lbas = np.array(threaded.lbas, dtype=np.uint64)
    return SimpleNamespace(groups=list(lbas.reshape(-1, LIST_LEN)),
                           list_bufs=[cxlflash.aligned_buffer(LIST_LEN * BS) for _ in range(2)])


@pytest.mark.benchmark(group="datapath 4K random read threads, listio x64")
def test_datapath_threads_listio_2(benchmark, dp, threaded_lists):
    benchmark.pedantic(listio_in_threads, (dp, threaded_lists, 2), rounds=ROUNDS,
                       warmup_rounds=2)


@pytest.mark.benchmark(group="datapath 4K random read threads, listio x64")
def test_datapath_threads_listio_1(benchmark, dp, threaded_lists):
    benchmark.pedantic(listio_in_threads, (dp, threaded_lists, 1), rounds=ROUNDS,
                       warmup_rounds=2)


# Not a target either: plain os.preadv at the same physical offsets, from 2
# threads vs 1 -- how far CPython's GIL lets ~1 us reads scale at all.


@pytest.fixture(scope="module")
def threaded_offsets(dp, threaded):
    lbas = np.array(threaded.lbas, dtype=np.uint64)
    return SimpleNamespace(offsets=(dp.vlun.translate(lbas) * np.uint64(BS)).tolist(),
                           bufs=threaded.bufs)


def preadv_in_threads(d, t, nthreads):
    per = len(t.offsets) // nthreads
    fd = d.fd

    def work(i):
        bufs = [t.bufs[i]]
        for off in t.offsets[i * per:(i + 1) * per]:
            os.preadv(fd, bufs, off)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


@pytest.mark.benchmark(group="os.preadv 4K random read threads")
def test_preadv_threads_2(benchmark, dp, threaded_offsets):
    benchmark.pedantic(preadv_in_threads, (dp, threaded_offsets, 2), rounds=ROUNDS,
                       warmup_rounds=2)


@pytest.mark.benchmark(group="os.preadv 4K random read threads")
def test_preadv_threads_1(benchmark, dp, threaded_offsets):
    benchmark.pedantic(preadv_in_threads, (dp, threaded_offsets, 1), rounds=ROUNDS,
                       warmup_rounds=2)


# -- adapter.translate: 16 M random vLBAs, no out= ------------------------------------------
#
# What a program gets from the ioctl-level contract: ``adapter.translate``
# returns a fresh array (no ``out=``), so whatever it allocates is inside
# the timing.  The baseline is the numpy formula (shift, gather, and, or)
# written as a program would, also returning a fresh array:
# ``(lxt[v >> 16] & ~0xFFFF) | (v & 0xFFFF)`` (``cxlflash.reference.translate``,
# the formula ``cxlflash bench`` and bench_core.py use too).  It is the
# fastest numpy form measured here: numpy elides the temporaries of ``&`` and ``|``
# (updates them in place), while the form with ``out=`` (below, for
# information) calls ``np.bitwise_and`` on a temporary it cannot elide and
# is ~20-30 % slower.  Also for information: the core's ``translate_many``
# into a preallocated ``out``.

TRANSLATE_N = 16 << 20
TRANSLATE_CHUNKS = 64


@pytest.fixture(scope="module")
def tr():
    a = cxlflash.Adapter()
    wwid = a.add_lun(None, size=2 * TRANSLATE_CHUNKS * CHUNK * BS)     # sparse memory
    disk = a.open_disk(wwid)
    ctx = disk.attach()
    other = ctx.create_virtual(0)
    vlun = ctx.create_virtual(0)
    for n in range(1, TRANSLATE_CHUNKS + 1):                # interleave the chunks
        vlun.set_size(n * CHUNK)
        other.set_size(n * CHUNK)
    rng = np.random.default_rng(2024)
    t = SimpleNamespace(a=a, ctx=ctx, cid=ctx.context_id, h=vlun.handle,
                        table=a._context_record(ctx.context_id).table)
    # int64, numpy's default integer (what rng.integers returns).
    t.vlbas = rng.integers(0, TRANSLATE_CHUNKS * CHUNK, size=TRANSLATE_N, dtype=np.int64)
    t.lxt = t.table.lxt(vlun.handle)
    t.out = np.empty(TRANSLATE_N, dtype=np.uint64)
    yield t
    ctx.close()
    a.close()


@pytest.mark.benchmark(group="adapter translate 16M")
def test_adapter_translate(interleaved, tr):
    got = tr.a.translate(tr.cid, tr.h, tr.vlbas)
    assert np.array_equal(got, translate(tr.lxt, tr.vlbas))
    del got
    a, cid, h, vlbas, lxt, out = tr.a, tr.cid, tr.h, tr.vlbas, tr.lxt, tr.out
    table = tr.table
    interleaved([("adapter", lambda: a.translate(cid, h, vlbas)),
                 ("numpy", lambda: translate(lxt, vlbas)),
                 ("numpy_out", lambda: translate(lxt, vlbas, out)),
                 ("core_out", lambda: table.translate_many(h, vlbas, out))],
                rounds=9, warmup_rounds=1, ops=TRANSLATE_N)
