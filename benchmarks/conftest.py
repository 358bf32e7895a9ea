"""Make the in-place build importable whatever the working directory, and
provide the ``interleaved`` and ``pedantic`` fixtures: this front end's
harness around the workloads of ``cxlflash.bench.cases`` (a side returns
its undo, run untimed; the rotation of interleaved sides is the one
``cxlflash bench`` uses, ``cxlflash.bench.harness.interleaved_round``)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cxlflash.bench.harness import interleaved_round   # noqa: E402  (after the path)


def run_interleaved(benchmark, sides, rounds, warmup_rounds=2, ops=1):
    """Time several sides of one comparison round by round, interleaved.

    ``sides``: a list of ``(name, fn)``; ``fn()`` does one round of that
    side's work and may return a callable, run untimed right after (an
    undo, e.g. releasing a clone); any other result is dropped inside the
    side's own timing (a fresh array is freed at that side's cost, not at
    the next side's).  Round ``r`` runs the sides rotated by
    ``r`` places, so each side goes first equally often and a burst of load
    from elsewhere hits every side of the same round.  ``ops``: requests
    (or items) per round, for the costs per request.  The per-round times
    (ns) go to ``benchmark.extra_info["rounds_ns"][name]``, where
    ``benchmarks/ratios.py`` takes the median of the per-round ratios;
    pytest-benchmark's own figure for the test is one whole round (every
    side)."""
    times = {name: [] for name, _ in sides}
    fns = [fn for _, fn in sides]
    state = {"round": 0}

    def one_round():
        r = state["round"]
        state["round"] += 1
        took = interleaved_round(fns, r)
        if r >= warmup_rounds:
            for (name, _), dt in zip(sides, took):
                times[name].append(dt)

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds)
    benchmark.extra_info["rounds_ns"] = times
    benchmark.extra_info["ops_per_round"] = ops
    return times


@pytest.fixture
def interleaved(benchmark):
    """``interleaved(sides, rounds, warmup_rounds=2, ops=1)``: see
    :func:`run_interleaved`."""
    return lambda sides, rounds, warmup_rounds=2, ops=1: run_interleaved(
        benchmark, sides, rounds, warmup_rounds, ops)


def run_pedantic(benchmark, side, rounds, warmup_rounds=0):
    """``benchmark.pedantic`` of one side of a workload: the undo a call
    returns (a callable) runs untimed after it, as pedantic's teardown."""
    undo = []

    def call():
        u = side()
        if callable(u):
            undo.append(u)

    def teardown():
        while undo:
            undo.pop()()

    result = benchmark.pedantic(call, teardown=teardown, rounds=rounds,
                                warmup_rounds=warmup_rounds)
    teardown()                  # --benchmark-disable: one call, and no teardown
    return result


@pytest.fixture
def pedantic(benchmark):
    """``pedantic(side, rounds, warmup_rounds=0)``: see :func:`run_pedantic`."""
    return lambda side, rounds, warmup_rounds=0: run_pedantic(
        benchmark, side, rounds, warmup_rounds)
