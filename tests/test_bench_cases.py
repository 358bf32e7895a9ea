"""cxlflash.bench.cases, the core workloads both front ends time
(``cxlflash bench`` and ``benchmarks/``), and the harness rule they share:
a side's check fails when the workload and its baseline disagree, an undo
runs untimed after its call, interleaved sides take turns going first."""
import os

import numpy as np
import pytest

from cxlflash import reference
from cxlflash.bench import BenchError, cases, harness


def test_translate_sides_do_the_same_work():
    case = cases.Translate(4096, chunks=4, seed=5)
    case.check()
    case.numpy()
    numpy_out = case.out.copy()
    case.core()
    assert np.array_equal(case.out, numpy_out)
    case.copyto()
    assert np.array_equal(case.out, case.vlbas.view(np.uint64))


def test_translate_check_fails_when_the_formula_disagrees(monkeypatch):
    case = cases.Translate(4096, chunks=4)
    real = reference.translate
    monkeypatch.setattr(reference, "translate", lambda lxt, v, out=None: real(lxt, v) + 1)
    with pytest.raises(BenchError, match="translate_many disagrees"):
        case.check()


def test_alloc_sides_and_their_undo():
    case = cases.Alloc(256, 100)
    case.check()
    undo = case.core()
    assert case.alloc.free_count == 156
    undo()
    assert case.alloc.free_count == 256
    assert case.python() is None and case.ref.ba_space() == 156
    fresh = case.python()                      # 56 left: the next call needs a fresh one
    assert callable(fresh) and case.ref.ba_space() == 56
    fresh()
    assert case.ref.ba_space() == 256


def test_alloc_check_fails_when_the_order_differs(monkeypatch):
    real = reference.ChunkAllocator.alloc_many
    monkeypatch.setattr(reference.ChunkAllocator, "alloc_many",
                        lambda self, n, partial=False: real(self, n, partial)[::-1])
    with pytest.raises(BenchError, match="kernel's allocation loop"):
        cases.Alloc(256, 100).check()


def test_alloc_refuses_more_than_the_lun():
    with pytest.raises(BenchError, match="cannot allocate 300 of 256"):
        cases.Alloc(256, 300)


def test_clone_side_undo_and_leak_check():
    case = cases.Clone(chunks=8)
    try:
        case.check()
        assert case.clone_refs() == 0
        undo = case.clone()
        assert case.clone_refs() == 1
        with pytest.raises(BenchError, match="clone references leaked"):
            case.check_released()
        undo()
        case.check_released()
        case.copyto()
        assert np.array_equal(case.copy, case.lxt)
    finally:
        case.close()


def test_clone_closes_its_adapter_fds(tmp_path):
    before = set(os.listdir("/proc/self/fd"))
    case = cases.Clone(chunks=2)
    case.close()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_interleaved_round_rotates_and_runs_undos_untimed():
    calls = []

    def side(name, returns=None):
        def fn():
            calls.append(name)
            return returns
        return fn

    def undo():
        calls.append("undo")

    fns = [side("a", undo), side("b", np.zeros(3)), side("c")]
    assert [len(harness.interleaved_round(fns, r)) for r in range(3)] == [3, 3, 3]
    assert calls == ["a", "undo", "b", "c",
                     "b", "c", "a", "undo",
                     "c", "a", "undo", "b"]


def test_interleaved_round_runs_before_untimed_ahead_of_each_side():
    import time
    seen = []

    def before(i):
        seen.append(i)
        time.sleep(0.05)

    took = harness.interleaved_round([lambda: seen.append("a"), lambda: seen.append("b")], 1,
                                     before=before)
    assert seen == [1, "b", 0, "a"]
    assert max(took) < 0.04e9


def test_timed_call_does_not_time_the_undo():
    import time

    def slow_undo():
        time.sleep(0.05)

    assert harness.timed_call(lambda: slow_undo) < 0.04e9
