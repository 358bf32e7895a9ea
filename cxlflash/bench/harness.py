"""Timing loops of the core rows (a side called until a duration passes;
sides interleaved round by round; an undo a side returns runs untimed),
and the start and join of worker threads.

:func:`interleaved_round` is the one rotation both front ends use: the
core rows of ``cxlflash bench`` (:func:`interleaved_loop`), the
``interleaved`` fixture of ``benchmarks/conftest.py`` and the rounds of
``benchmarks/engine_ratios.py``."""
import threading
import time

from .results import Side


def join_some(threads, timeout):
    """Wait at most ``timeout`` seconds in all for ``threads`` to end (a
    timeout per thread would make the monitor loop, and so the end of the
    run, threads x ``timeout`` late)."""
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(timeout=max(0.0, deadline - time.monotonic()))


def start_workers(fn, n, stop, errors):
    """``n`` daemon threads running ``fn(i)``, started.  An exception in
    one is appended to ``errors`` and sets ``stop`` (the others see it and
    end); the caller joins them and raises the first error."""
    def run(i):
        try:
            fn(i)
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    return threads


def timed_call(fn):
    """Nanoseconds one call of ``fn`` takes.  What it returns is dropped
    inside the timing (a fresh array is freed at the call's cost), except
    a callable: that is its undo, run untimed right after."""
    t0 = time.perf_counter_ns()
    undo = fn()
    if not callable(undo):
        undo = None
    dt = time.perf_counter_ns() - t0
    if undo is not None:
        undo()
    return dt


def interleaved_round(fns, r, before=None):
    """Round ``r`` of sides interleaved round by round: each of ``fns``
    called once (:func:`timed_call`), the order rotated by ``r`` places so
    each side goes first equally often and a burst of load from elsewhere
    hits every side of the same round; ``before(i)``, if given, runs
    untimed before side ``i`` (a progress line).  The nanoseconds of each,
    in the order of ``fns``."""
    k = r % len(fns)
    took = [0] * len(fns)
    for i in list(range(k, len(fns))) + list(range(k)):
        if before is not None:
            before(i)
        took[i] = timed_call(fns[i])
    return took


def timed_loop(fn, duration, progress, label, per_call, unit):
    """Call ``fn`` until ``duration`` passes: a Side with per-call
    latencies; ``per_call`` ops are done by each call (:func:`timed_call`:
    an undo ``fn`` returns runs untimed)."""
    side = Side()
    start = time.monotonic()
    lat = []
    while True:
        dt = timed_call(fn)
        lat.append(dt)
        side.ops += per_call
        side.seconds += dt / 1e9
        elapsed = time.monotonic() - start
        side.timeline.append((round(elapsed, 4), per_call / max(dt, 1) * 1e9))
        progress.update(label, elapsed, duration, side.rate, unit)
        if elapsed >= duration:
            break
    side.hist.add(lat)
    return side


def interleaved_loop(sides, duration, progress, label, per_call, unit):
    """Rounds of :func:`interleaved_round` until ``duration`` passes: a
    Side per function, with per-call latencies; ``per_call`` ops are done
    by each call.  The first side's ratios are the per-round ratio of the
    second side's time to its own."""
    out = [Side() for _ in sides]
    lat = [[] for _ in sides]
    start = time.monotonic()
    r = 0
    while True:
        took = interleaved_round(sides, r)
        r += 1
        elapsed = time.monotonic() - start
        for i, dt in enumerate(took):
            lat[i].append(dt)
            out[i].ops += per_call
            out[i].seconds += dt / 1e9
            out[i].timeline.append((round(elapsed, 4), per_call / max(dt, 1) * 1e9))
        out[0].ratios.append(max(took[1], 1) / max(took[0], 1))     # this round's ratio
        progress.update(label, elapsed, duration, out[0].rate, unit)
        if elapsed >= duration:
            break
    for side, l in zip(out, lat):
        side.hist.add(l)
    return out
