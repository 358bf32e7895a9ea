"""cxlflash.reference, the executable spec: its translation formula gives
the core's answers, and importing it (or ``cxlflash.bench``, which uses it)
does not import numpy.  Its allocator is checked against the core by the
property test of tests/test_allocator.py (``Model``)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from cxlflash import reference
from cxlflash._core.tables import ResourceTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 1 << 16


def test_importing_it_does_not_import_numpy():
    code = ("import sys, cxlflash.reference, cxlflash.bench\n"
            "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
            "print('ok')")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


@pytest.fixture
def vlun():
    """A handle of 5 chunks scattered over the LUN, on LUN-table index 7
    through ports 0 and 1 (low bits in every LXT entry)."""
    table = ResourceTable()
    h = table.open_virtual(3)
    table.grow(h, [9, 2, 40000, 3, 17], 7, 0b11)
    return table, h


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_translate_gives_the_cores_answers(vlun, dtype):
    table, h = vlun
    lxt = table.lxt(h)
    vlbas = np.random.default_rng(3).integers(0, 5 * CHUNK, 10_000).astype(dtype)
    vlbas[:4] = [0, CHUNK - 1, CHUNK, 5 * CHUNK - 1]              # chunk edges
    want = table.translate_many(h, vlbas)
    fresh = reference.translate(lxt, vlbas)
    assert fresh.dtype == np.uint64 and np.array_equal(fresh, want)
    out = np.empty(len(vlbas), dtype=np.uint64)
    assert reference.translate(lxt, vlbas, out=out) is out
    assert np.array_equal(out, want)
    # The low bits of the entries (LUN index, perms, ports) never leak in.
    assert reference.translate(lxt, [CHUNK + 5]).tolist() == [(2 << 16) | 5]
    assert reference.translate(lxt, [CHUNK + 5])[0] == table.translate(h, CHUNK + 5)


def test_translate_beyond_the_lxt_raises_index_error(vlun):
    table, h = vlun
    with pytest.raises(IndexError):
        reference.translate(table.lxt(h), [5 * CHUNK])


def test_allocator_is_the_kernels():
    a = reference.ChunkAllocator(130)
    assert a.words == 3 and a.bitmap[-1] == 0b11          # bits past chunk 129 never free
    assert a.alloc_many(131) is None and a.ba_space() == 130   # ENOSPC, nothing taken
    assert a.alloc_many(130) == list(range(130))
    assert a.ba_alloc() is None
    assert a.ba_clone(5) and a.clone_map[5] == 1
    assert a.ba_free(5) and not a.is_free(5)               # a clone reference went
    assert a.ba_free(5) and a.is_free(5) and not a.ba_free(5)
    assert a.ba_alloc() == 5                                # wrapped to the free one
