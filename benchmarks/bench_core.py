"""The Cython core against its baselines, side by side (one group per pair).

The workloads and their baselines are ``cxlflash.bench.cases``: the same
definitions ``cxlflash bench`` times (this is the other front end; the
baselines are ``cxlflash.reference``).  ``benchmarks/ratios.py`` runs this
file and prints each measured ratio against its target; see
``benchmarks/README.md``.
"""
import numpy as np
import pytest

from cxlflash import reference
from cxlflash._core.allocator import ChunkAllocator
from cxlflash._core.tables import ResourceTable
from cxlflash.bench.cases import Alloc, Translate

N_LBAS = 16 << 20           # 16 M virtual LBAs
VLUN_CHUNKS = 64
ALLOC_TOTAL = 4 << 20       # a 4 M-chunk LUN
ALLOC_N = 1_000_000
CLONE_CHUNKS = 1 << 20      # a table with 1 M mapped chunks


# -- translate_many: 16 M random vLBAs over a 64-chunk vLUN ------------------

@pytest.fixture(scope="module")
def vlun():
    case = Translate(N_LBAS, VLUN_CHUNKS)
    case.check()
    return case


@pytest.mark.benchmark(group="translate_many 16M")
def test_translate_many_core(benchmark, vlun):
    benchmark.pedantic(vlun.core, rounds=10, warmup_rounds=1)
    assert np.array_equal(vlun.out, reference.translate(vlun.lxt, vlun.vlbas))


@pytest.mark.benchmark(group="translate_many 16M")
def test_translate_many_numpy(benchmark, vlun):
    benchmark.pedantic(vlun.numpy, rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="translate_many 16M")
def test_translate_many_copyto(benchmark, vlun):
    # The memory-bandwidth bound: 8 B read + 8 B written per LBA.
    benchmark.pedantic(vlun.copyto, rounds=10, warmup_rounds=1)


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

@pytest.fixture
def alloc():
    case = Alloc(ALLOC_TOTAL, ALLOC_N)
    case.check()              # both hand out the same chunks
    return case


@pytest.mark.benchmark(group="alloc_many 1M of 4M")
def test_alloc_many_core(pedantic, alloc):
    pedantic(alloc.core, rounds=15, warmup_rounds=1)
    assert alloc.alloc.free_count == ALLOC_TOTAL          # every round's chunks given back


@pytest.mark.benchmark(group="alloc_many 1M of 4M")
def test_alloc_many_python(pedantic, alloc):
    # The full 1 M allocations (not scaled).
    pedantic(alloc.python, rounds=3)
    taken = ALLOC_TOTAL - alloc.ref.ba_space()             # whole calls of 1 M each
    assert taken > 0 and taken % ALLOC_N == 0


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
        assert alloc.free_many(src.auns(h)) == 0

    benchmark.pedantic(clone, setup=lambda: ((ResourceTable(),), {}),
                       teardown=drop_refs, rounds=15, warmup_rounds=1)
    assert alloc.clone_count(0) == 0 and alloc.free_count == 0


@pytest.mark.benchmark(group="clone 1M chunks")
def test_clone_copyto(benchmark, mapped_table):
    _, src, h = mapped_table
    lxt = src.lxt(h)
    dst = np.empty_like(lxt)
    benchmark.pedantic(np.copyto, (dst, lxt), rounds=50, warmup_rounds=2)
