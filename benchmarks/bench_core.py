"""The Cython core against its baselines, side by side (one group per pair).

``benchmarks/ratios.py`` runs this file and prints each measured ratio
against its target; see ``benchmarks/README.md``.
"""
import numpy as np
import pytest

from cxlflash._core.allocator import ChunkAllocator
from cxlflash._core.tables import ResourceTable

N_LBAS = 16 << 20           # 16 M virtual LBAs
VLUN_CHUNKS = 64
ALLOC_TOTAL = 4 << 20       # a 4 M-chunk LUN
ALLOC_N = 1_000_000
CLONE_CHUNKS = 1 << 20      # a table with 1 M mapped chunks

HIGH = np.uint64(~0xFFFF & (2 ** 64 - 1))
LOW = np.uint64(0xFFFF)
SHIFT = np.uint64(16)


# -- translate_many: 16 M random vLBAs over a 64-chunk vLUN ------------------

@pytest.fixture(scope="module")
def vlun():
    rng = np.random.default_rng(2024)
    table = ResourceTable()
    h = table.open_virtual(3)
    table.grow(h, rng.permutation(1 << 20)[:VLUN_CHUNKS], 0, 1)
    vlbas = rng.integers(0, VLUN_CHUNKS << 16, size=N_LBAS, dtype=np.int64)
    out = np.empty(N_LBAS, dtype=np.uint64)
    return table, h, vlbas, out


def numpy_translate(lxt, vlbas, out):
    v = vlbas.view(np.uint64)
    return np.bitwise_or(np.bitwise_and(lxt[v >> SHIFT], HIGH), v & LOW, out=out)


@pytest.mark.benchmark(group="translate_many 16M")
def test_translate_many_core(benchmark, vlun):
    table, h, vlbas, out = vlun
    benchmark.pedantic(table.translate_many, (h, vlbas, out),
                       rounds=10, warmup_rounds=1)
    lxt = table.lxt(h)
    assert np.array_equal(out, numpy_translate(lxt, vlbas, np.empty_like(out)))


@pytest.mark.benchmark(group="translate_many 16M")
def test_translate_many_numpy(benchmark, vlun):
    table, h, vlbas, out = vlun
    lxt = table.lxt(h)
    benchmark.pedantic(numpy_translate, (lxt, vlbas, out),
                       rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="translate_many 16M")
def test_translate_many_copyto(benchmark, vlun):
    # The memory-bandwidth bound: 8 B read + 8 B written per LBA.
    _, _, vlbas, out = vlun
    src = vlbas.view(np.uint64)
    benchmark.pedantic(np.copyto, (out, src), rounds=10, warmup_rounds=1)


# -- one translate call from Python -----------------------------------------------

def noop(h, v):
    return v


@pytest.fixture(scope="module")
def small_vlun():
    table = ResourceTable()
    h = table.open_virtual(3)
    table.grow(h, range(100, 164), 0, 1)
    return table, h


# pytest-benchmark calls its target through ``fn(*args, **kwargs)``, a
# generic call path that costs a C method more than a Python function; a
# program calls ``table.translate(h, v)`` directly.  So both sides are timed
# as 10 direct calls per loop iteration, 1000 iterations per round.

def _translate_calls(translate, h, v):
    for _ in range(1000):
        translate(h, v); translate(h, v); translate(h, v); translate(h, v); translate(h, v)
        translate(h, v); translate(h, v); translate(h, v); translate(h, v); translate(h, v)
    return translate(h, v)


@pytest.mark.benchmark(group="translate one LBA")
def test_translate_one_core(benchmark, small_vlun):
    table, h = small_vlun
    assert benchmark(_translate_calls, table.translate, h, 123456) == \
        (101 << 16) | (123456 & 0xFFFF)


@pytest.mark.benchmark(group="translate one LBA")
def test_translate_one_noop(benchmark, small_vlun):
    _, h = small_vlun
    assert benchmark(_translate_calls, noop, h, 123456) == 123456


# -- alloc_many(1 M) on a 4 M-chunk allocator ---------------------------------------

class PyAllocator:
    """A pure-Python port of the kernel allocator (spec §12.1, §12.2)."""

    def __init__(self, total):
        self.words = (total + 63) // 64
        self.bitmap = [(1 << 64) - 1] * self.words
        if total % 64:
            self.bitmap[-1] = (1 << (total % 64)) - 1
        self.free_aun_cnt = total
        self.free_low_idx = 0
        self.free_curr_idx = 0
        self.free_high_idx = self.words

    def _first_free(self, lo, hi):
        bitmap = self.bitmap
        for w in range(lo, hi):
            x = bitmap[w]
            if x:
                bit = (x & -x).bit_length() - 1
                bitmap[w] = x & (x - 1)
                self.free_aun_cnt -= 1
                return w, bit
        return None

    def ba_alloc(self):
        if self.free_aun_cnt == 0:
            return -1
        found = self._first_free(self.free_curr_idx, self.free_high_idx)
        if found is None:
            found = self._first_free(self.free_low_idx, self.free_curr_idx)
            if found is None:
                return -1
        w, bit = found
        self.free_curr_idx = w + 1 if bit == 63 else w
        return w * 64 + bit

    def alloc_many(self, n):
        alloc = self.ba_alloc
        return [alloc() for _ in range(n)]


@pytest.mark.benchmark(group="alloc_many 1M of 4M")
def test_alloc_many_core(benchmark):
    result = benchmark.pedantic(
        lambda a: a.alloc_many(ALLOC_N),
        setup=lambda: ((ChunkAllocator(ALLOC_TOTAL),), {}),
        rounds=15, warmup_rounds=1)
    assert result[-1] == ALLOC_N - 1


@pytest.mark.benchmark(group="alloc_many 1M of 4M")
def test_alloc_many_python(benchmark):
    # The full 1 M allocations (not scaled).
    result = benchmark.pedantic(
        lambda a: a.alloc_many(ALLOC_N),
        setup=lambda: ((PyAllocator(ALLOC_TOTAL),), {}),
        rounds=3)
    assert result[-1] == ALLOC_N - 1


# -- cloning a table with 1 M mapped chunks ------------------------------------------

@pytest.fixture(scope="module")
def mapped_table():
    alloc = ChunkAllocator(CLONE_CHUNKS)
    src = ResourceTable()
    h = src.open_virtual(3)
    src.grow(h, alloc.alloc_many(CLONE_CHUNKS), 0, 1)
    return alloc, src, h


@pytest.mark.benchmark(group="clone 1M chunks")
def test_clone_core(benchmark, mapped_table):
    alloc, src, h = mapped_table

    def clone(dst):
        # One pass: the LXT copy raises the clone counts as it goes.
        for _, auns in dst.clone_from(src, 3, alloc):
            assert len(auns) == 0
        return dst

    def drop_refs(dst):
        # The child's release: one clone reference per chunk goes away.
        assert alloc.free_many(src.chunks(h)) == 0

    benchmark.pedantic(clone, setup=lambda: ((ResourceTable(),), {}),
                       teardown=drop_refs, rounds=15, warmup_rounds=1)
    assert alloc.clone_count(0) == 0 and alloc.free_count == 0


@pytest.mark.benchmark(group="clone 1M chunks")
def test_clone_copyto(benchmark, mapped_table):
    _, src, h = mapped_table
    lxt = src.lxt(h)
    dst = np.empty_like(lxt)
    benchmark.pedantic(np.copyto, (dst, lxt), rounds=50, warmup_rounds=2)
