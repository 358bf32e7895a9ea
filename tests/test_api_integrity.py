"""Data integrity through the Pythonic API: random patterns across chunk
boundaries, growing and shrinking, scrubbing, threads, asynchronous and
list I/O against synchronous I/O, hole punching, O_DIRECT, and short
transfers at the end of the backing store.

Every check compares what the API returns with an independent mirror of
the expected data, and where it matters with the backing store itself
(``pread`` at the physical offset ``vlun.translate([v])[0] * block_size``).
"""
import asyncio
import errno
import fcntl
import os
import threading

import numpy as np
import pytest

import cxlflash

from block_pattern import BS, CHUNK, GIB, pattern


def backing_fd(vlun):
    rec = vlun.adapter._context_record(vlun.context.context_id)
    return rec.rht_lun[vlun.handle].parent.backing.fd


def phys_offsets(vlun, lbas):
    return [int(p) * vlun.block_size for p in vlun.translate(lbas)]


@pytest.fixture(params=["memory", "file"])
def adapter(request, tmp_path):
    with cxlflash.Adapter(None if request.param == "memory" else str(tmp_path)) as a:
        yield a


@pytest.fixture
def ctx(adapter):
    with adapter.open_disk(adapter.create_lun(2 * GIB)) as disk, disk.attach() as c:
        yield c                                       # 8 chunks, sparse


def scattered_vlun(ctx, chunks, scrub=False):
    """A vLUN whose chunks are not physically adjacent (another vLUN's
    chunks are interleaved), plus that other vLUN."""
    v = ctx.create_virtual(1, scrub=scrub)
    other = ctx.create_virtual(1)
    for n in range(2, chunks + 1):
        v.set_size(n * CHUNK)
        if n < chunks:
            other.set_size(n * CHUNK)
    return v, other


# -- random patterns --------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["scattered", "contiguous"])
def test_random_patterns_across_chunk_boundaries(ctx, layout):
    if layout == "scattered":
        v, _ = scattered_vlun(ctx, 2)
        phys = v.translate([CHUNK - 1, CHUNK])
        assert phys[1] != phys[0] + 1
    else:
        v = ctx.create_virtual(2 * CHUNK)
        phys = v.translate([CHUNK - 1, CHUNK])
        assert phys[1] == phys[0] + 1          # coalesced into one pread
    lo, hi = CHUNK - 300, CHUNK + 300          # a window around the boundary
    mirror = np.zeros((hi - lo) * BS, np.uint8)
    rng = np.random.default_rng(42)
    for step in range(250):
        lba = int(rng.integers(lo, hi - 1))
        n = int(rng.integers(1, min(80, hi - lba) + 1))
        a, b = (lba - lo) * BS, (lba - lo + n) * BS
        kind = rng.random()
        if kind < 0.55:
            data = rng.integers(0, 256, n * BS, dtype=np.uint8)
            assert v.write(lba, data) == n
            mirror[a:b] = data
        elif kind < 0.65:
            assert v.unmap(lba, n) == n
            mirror[a:b] = 0
        else:
            assert v.read(lba, n) == mirror[a:b].tobytes(), step
    got = np.zeros_like(mirror)
    v.readinto(lo, got)
    assert np.array_equal(got, mirror)
    # The backing store holds the same bytes at the translated offsets.
    fd = backing_fd(v)
    for i, off in zip(range(0, hi - lo, 37), phys_offsets(v, np.arange(lo, hi, 37))):
        assert os.pread(fd, BS, off) == mirror[i * BS:(i + 1) * BS].tobytes()


def test_large_transfers_across_chunks(ctx):
    v, _ = scattered_vlun(ctx, 2)
    start, n = CHUNK - 2500, 5000                   # 20 MiB over a chunk boundary
    assert n > ctx.max_xfer                          # split into several commands
    data = pattern(start, n, seed=3)
    assert v.write(start, data) == n
    assert v.read(start, n) == data.tobytes()
    fd = backing_fd(v)
    for lba in (start, CHUNK - 1, CHUNK, start + n - 1):
        (off,) = phys_offsets(v, [lba])
        assert os.pread(fd, BS, off) == pattern(lba, 1, seed=3).tobytes()
    st = v.stats()
    assert st["num_writes"] == 1 and st["num_blocks_written"] == n


# -- growing and shrinking ------------------------------------------------------------


def test_grow_keeps_data(ctx):
    v = ctx.create_virtual(10)
    other = ctx.create_virtual(1)
    v.write(0, pattern(0, 10))
    other.set_size(2 * CHUNK)                # the next chunk is taken
    v.set_size(CHUNK + 5)                    # grows into a non-adjacent chunk
    v.write(CHUNK - 1, pattern(CHUNK - 1, 3))
    for size in (CHUNK + 100, 2 * CHUNK, 2 * CHUNK + 1, 3 * CHUNK):
        v.set_size(size)
        assert v.read(0, 10) == pattern(0, 10).tobytes()
        assert v.read(CHUNK - 1, 3) == pattern(CHUNK - 1, 3).tobytes()
    # A shrink that keeps the chunks, then a grow: everything is still there.
    v.set_size(5)
    v.set_size(CHUNK + 2)
    assert v.read(0, 5) == pattern(0, 5).tobytes()
    assert v.read(CHUNK - 1, 3) == pattern(CHUNK - 1, 3).tobytes()
    # best_effort growth keeps it too.
    v.set_size(7 * CHUNK, best_effort=True)    # 3 of the 4 chunks asked for
    assert v.read(0, 10) == pattern(0, 10).tobytes() and v.size == 6 * CHUNK
    # The LUN is full; a failed growth keeps size and data.
    size = v.size
    with pytest.raises(cxlflash.CxlFlashError):
        v.set_size(size + CHUNK)
    assert v.size == size and v.read(0, 10) == pattern(0, 10).tobytes()


@pytest.mark.parametrize("how", ["set_size", "close"])
def test_scrub_leaves_no_old_data(ctx, how):
    v, _ = scattered_vlun(ctx, 3, scrub=True)
    lbas = [0, 17, CHUNK - 1, CHUNK, CHUNK + 4000, 2 * CHUNK, 3 * CHUNK - 1]
    for lba in lbas:
        v.write(lba, pattern(lba, 1, seed=9))
    offs = phys_offsets(v, lbas)
    fd = backing_fd(v)
    assert all(os.pread(fd, BS, o) == pattern(l, 1, seed=9).tobytes()
               for l, o in zip(lbas, offs))
    if how == "set_size":
        v.set_size(10, release=True)
        assert v.chunks == 1 and v.size == 10
        kept = [l for l in lbas if l < CHUNK]
    else:
        v.close()
        kept = []
    for lba, off in zip(lbas, offs):
        got = os.pread(fd, BS, off)
        if lba in kept:
            assert got == pattern(lba, 1, seed=9).tobytes()
        else:
            assert got == bytes(BS), lba
    if how == "set_size":
        v.set_size(3 * CHUNK)                # whatever it gets back is zeroed
        for lba in lbas:
            if lba >= CHUNK:
                assert v.read(lba, 1) == bytes(BS)


def test_without_scrub_old_data_stays(ctx):
    # The contrast that shows the scrub check above can fail.
    v, _ = scattered_vlun(ctx, 2)
    v.write(CHUNK + 1, pattern(CHUNK + 1, 1, seed=4))
    (off,) = phys_offsets(v, [CHUNK + 1])
    v.set_size(10, release=True)
    assert v.chunks == 1
    assert os.pread(backing_fd(v), BS, off) == pattern(CHUNK + 1, 1, seed=4).tobytes()


# -- threads ------------------------------------------------------------------------


def test_threads_writing_disjoint_ranges(ctx):
    v, _ = scattered_vlun(ctx, 2)
    nthreads, per = 4, 1024
    base = CHUNK - 2 * per                    # the ranges straddle the boundary
    expected_seed = np.zeros(nthreads * per, np.int64)
    errors = []
    barrier = threading.Barrier(nthreads)

    def work(t):
        try:
            rng = np.random.default_rng(t)
            start = base + t * per
            barrier.wait()
            for seed in (1, 2):
                pos = 0
                pieces = []
                while pos < per:
                    n = int(min(rng.integers(1, 40), per - pos))
                    pieces.append((start + pos, n))
                    pos += n
                if seed == 2:                 # overwrite a random half
                    pieces = [p for p in pieces if rng.random() < 0.5]
                rng.shuffle(pieces)
                for lba, n in pieces:
                    v.write(lba, pattern(lba, n, seed=seed + 10 * t))
                    expected_seed[lba - base:lba - base + n] = seed + 10 * t
                    if rng.random() < 0.2:
                        assert v.read(lba, n) == pattern(lba, n, seed=seed + 10 * t).tobytes()
        except BaseException as e:            # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    got = np.zeros(nthreads * per * BS, np.uint8)
    v.readinto(base, got)
    words = got.view(np.uint64).reshape(nthreads * per, BS // 8)
    lbas = np.arange(base, base + nthreads * per, dtype=np.uint64)
    want = lbas * np.uint64(1000) + expected_seed.astype(np.uint64)
    assert (expected_seed > 0).all()
    assert np.array_equal(words, np.repeat(want, BS // 8).reshape(words.shape))
    st = v.stats()
    assert st["num_errors"] == 0 and st["num_blocks_written"] >= nthreads * per


# -- asynchronous and list I/O against synchronous I/O ---------------------------------------


def test_async_and_listio_match_sync(ctx):
    v, _ = scattered_vlun(ctx, 2)
    rng = np.random.default_rng(5)
    lo = CHUNK - 240                 # 48 requests 10 blocks apart, across the boundary
    reqs = [(lo + 10 * i + int(rng.integers(0, 2)), int(rng.integers(1, 9)))
            for i in range(48)]
    datas = [rng.integers(0, 256, n * BS, dtype=np.uint8) for _, n in reqs]
    for (lba, n), d in zip(reqs, datas):
        v.write(lba, d)
    sync = [bytes(v.read(lba, n)) for lba, n in reqs]
    futs = [v.aread(lba, n) for lba, n in reqs]
    assert [bytes(f.result(5)) for f in futs] == sync

    async def gather():
        return await asyncio.gather(*(v.read_async(lba, n) for lba, n in reqs))

    assert [bytes(x) for x in asyncio.run(gather())] == sync
    nb = np.array([n for _, n in reqs])
    buf = np.zeros(int(nb.sum()) * BS, np.uint8)
    res = v.listio(np.full(len(reqs), cxlflash.LIST_READ), [l for l, _ in reqs], nb, buf)
    assert res.ok and buf.tobytes() == b"".join(sync)
    # Writes through futures and list I/O land exactly like synchronous ones.
    v2 = ctx.create_virtual(CHUNK + 600)
    for fut in [v2.awrite(lba, pattern(lba, n, seed=1)) for lba, n in reqs[::2]]:
        fut.result(5)
    wbuf = np.concatenate([pattern(lba, n, seed=2) for lba, n in reqs[1::2]])
    res = v2.listio([cxlflash.LIST_WRITE] * len(reqs[1::2]), [l for l, _ in reqs[1::2]],
                    [n for _, n in reqs[1::2]], wbuf)
    res.check()
    for i, (lba, n) in enumerate(reqs):
        assert v2.read(lba, n) == pattern(lba, n, seed=1 + i % 2).tobytes()

# -- files: holes, O_DIRECT, short transfers ----------------------------------------------------


def test_unmap_punches_holes_in_files(tmp_path):
    with cxlflash.Adapter(str(tmp_path)) as a, a.open_disk(a.create_lun(GIB)) as disk, \
            disk.attach() as ctx, ctx.create_virtual(CHUNK) as v:
        path = a.provisioned[disk.wwid]["path"]
        before = os.stat(path).st_blocks
        v.write(1000, pattern(1000, 64))
        written = os.stat(path).st_blocks
        assert written >= before + 64 * BS // 512
        (off,) = phys_offsets(v, [1000])
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.lseek(fd, off, os.SEEK_DATA) == off
            v.unmap(1000, 64)
            assert os.lseek(fd, off, os.SEEK_HOLE) == off     # a hole now
        finally:
            os.close(fd)
        assert os.stat(path).st_blocks <= before
        assert v.read(1000, 64) == bytes(64 * BS)


@pytest.mark.parametrize("nbytes, alignment", [(4096, 4096), (12288, 4096),
                                               (512, 512), (1 << 20, 65536)])
def test_aligned_buffer(nbytes, alignment):
    buf = cxlflash.aligned_buffer(nbytes, alignment)
    assert buf.ctypes.data % alignment == 0 and buf.nbytes == nbytes
    assert buf.dtype == np.uint8 and not buf.any() and buf.flags.c_contiguous
    assert buf.flags.writeable


def test_o_direct_file_lun(tmp_path):
    path = str(tmp_path / "direct.img")
    with cxlflash.Adapter() as a:
        try:
            wwid = a.add_lun(path, size=GIB, direct=True)
        except OSError as e:
            pytest.skip(f"no O_DIRECT on {tmp_path}: {e}")
        backing = a.driver.gluns[wwid].backing
        assert backing.direct and fcntl.fcntl(backing.fd, fcntl.F_GETFL) & os.O_DIRECT
        # scrub=False: the data must still be in the file after close.
        with a.open_disk(wwid) as disk, disk.attach() as ctx, \
                ctx.create_virtual(CHUNK + 8, scrub=False) as v:
            data = cxlflash.aligned_buffer(16 * BS)
            data[:] = pattern(CHUNK - 8, 16)
            assert v.write(CHUNK - 8, data) == 16
            out = cxlflash.aligned_buffer(16 * BS)
            assert v.readinto(CHUNK - 8, out) == 16
            assert np.array_equal(out, data)
            (off,) = phys_offsets(v, [CHUNK - 6])
            assert v.unmap(CHUNK - 8, 2) == 2
            v.readinto(CHUNK - 8, out)
            assert not out[:2 * BS].any() and np.array_equal(out[2 * BS:], data[2 * BS:])
            # Whether a misaligned buffer is refused depends on the kernel and
            # file system; when it is, the error says what to do.
            misaligned = cxlflash.aligned_buffer(2 * BS)[1:1 + BS]
            try:
                v.readinto(0, misaligned)
            except OSError as e:
                assert e.errno == errno.EINVAL and "aligned_buffer" in str(e)
                res = v.listio([1], [0], [1], misaligned)
                assert res.error(0).errno == errno.EINVAL
                assert v.stats()["num_errors"] == 2
            else:
                assert bytes(misaligned) == bytes(BS)
    with open(path, "rb") as f:                    # the data is in the file
        f.seek(off)
        assert f.read(BS) == pattern(CHUNK - 6, 1).tobytes()


def test_end_of_backing_store_is_eio(tmp_path):
    with cxlflash.Adapter(str(tmp_path)) as a, a.open_disk(a.create_lun(GIB)) as disk, \
            disk.attach() as ctx, ctx.create_virtual(2 * CHUNK) as v:
        path = a.provisioned[disk.wwid]["path"]
        v.write(CHUNK + 3, pattern(CHUNK + 3, 2))
        (off,) = phys_offsets(v, [CHUNK + 4])
        os.truncate(path, off)               # the store shrank behind the LUN
        with pytest.raises(OSError) as e:    # the pread came up short: reported
            v.read(CHUNK + 3, 2)
        assert e.value.errno == errno.EIO
        res = v.listio([1], [CHUNK + 3], [2], bytearray(2 * BS))
        assert res.error(0).errno == errno.EIO
        assert v.stats()["num_errors"] == 2
        assert v.read(CHUNK + 3, 1) == pattern(CHUNK + 3, 1).tobytes()   # the rest is fine
