"""Make the in-place build importable whatever the working directory, and
provide the ``interleaved`` fixture."""
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


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
    state = {"round": 0}

    def one_round():
        r = state["round"]
        state["round"] += 1
        k = r % len(sides)
        for name, fn in sides[k:] + sides[:k]:
            t0 = time.perf_counter_ns()
            ret = fn()
            if not callable(ret):
                ret = None        # the side's result is dropped (freed) in its own time
            dt = time.perf_counter_ns() - t0
            if ret is not None:
                ret()
            if r >= warmup_rounds:
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
