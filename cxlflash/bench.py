"""Benchmark runs: the workloads behind ``cxlflash bench``.

Every figure is measured honestly: a warm-up that is not recorded, the
workload and its raw baseline interleaved batch by batch on the same data
and the same physical offsets, per-request latencies taken inside the
GIL-free core (so both sides pay the same clock reads), errors counted and
reported, and the data of every write workload verified at the end: each
written block holds a pattern derived from its LBA and the sequence number
of its last write, re-read and checked block by block.
"""
import fcntl
import json
import math
import os
import platform
import shutil
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass, field, asdict
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import numpy as np
else:
    from ._core._lazy import numpy as np        # `cxlflash info` does not need it

from . import __version__, uapi
from ._core import pattern
from ._core.allocator import ChunkAllocator
from ._core.datapath import LIST_READ, LIST_WRITE
from ._core.tables import MC_CHUNK_OFF_MASK, MC_CHUNK_SHIFT, MC_CHUNK_SIZE, ResourceTable
from .adapter import Adapter, ioctl
from .backing import (BLKGETSIZE64, BLKSSZGET, Backing, BlockDeviceBacking, FileBacking,
                      aligned_buffer)
from .driver import superpipe
from .driver.core import Caller
from .errors import CxlFlashError

BATCH = 256                 # requests per GIL-free call (at most)
BATCH_BYTES = 4 << 20       # ... and at most this much data per call
HIST_STEPS = 32             # latency histogram bins per power of two
BATCH_SECONDS = 0.01        # an I/O worker's batch takes about this long
INTERVAL = 0.1              # the rates over time (and their spread) per this many s
MAX_THREADS = 256           # --threads beyond this is refused


class BenchError(Exception):
    """A bad option or an impossible run: reported in one line."""


@dataclass
class Options:
    workload: str = "matrix"          # matrix | io | arkdb | resize-storm
    target: str = "memory"            # memory, a file path or a block device
    size: int = 1 << 30               # LUN size in bytes (memory / new file)
    lun: str = "virtual"              # virtual | direct
    vlun_blocks: int = 2 * MC_CHUNK_SIZE
    read_pct: int = 100
    blocks: int = 1                   # blocks per request
    threads: int = 1                  # queue depth: one worker thread each
    pattern: str = "random"           # random | seq
    duration: float = 3.0             # seconds per measured row
    warmup: float = 0.3
    compare_raw: bool = True
    seed: int = 1
    quiet: bool = False
    direct_io: bool = False
    force: bool = False               # may overwrite an existing target
    qd: int = 1                       # requests in flight per thread (the engine)
    fio: bool = True                  # io: add fio's figure where fio is on PATH
    size_given: bool = False          # --size was given (not the default)


# -- latency histogram -----------------------------------------------------------


class Histogram:
    """Log-scale latency histogram (about 2 % resolution), mergeable."""

    def __init__(self):
        self.counts = np.zeros(64 * HIST_STEPS, dtype=np.int64)

    def add(self, lat_ns):
        lat = np.maximum(np.asarray(lat_ns, dtype=np.float64), 1.0)
        idx = np.minimum((np.log2(lat) * HIST_STEPS).astype(np.int64), len(self.counts) - 1)
        self.counts += np.bincount(idx, minlength=len(self.counts))

    def merge(self, other):
        self.counts += other.counts

    @property
    def total(self):
        return int(self.counts.sum())

    def percentile(self, p):
        """Latency in ns at percentile ``p`` (bin midpoint)."""
        total = self.total
        if total == 0:
            return float("nan")
        rank = math.ceil(total * p / 100.0)
        i = int(np.searchsorted(np.cumsum(self.counts), rank))
        return 2 ** ((i + 0.5) / HIST_STEPS)

    def nonzero(self):
        idx = np.flatnonzero(self.counts)
        return [(float(2 ** ((i + 0.5) / HIST_STEPS)), int(self.counts[i])) for i in idx]


@dataclass
class Side:
    """One side of a row (the workload or its baseline)."""
    ops: int = 0
    seconds: float = 0.0
    nbytes: int = 0
    errors: int = 0
    hist: Histogram = field(default_factory=Histogram)
    timeline: list = field(default_factory=list)   # (elapsed s, ops/s) per interval
    ratios: list = field(default_factory=list)     # workload / baseline per interval

    @property
    def rate(self):
        return self.ops / self.seconds if self.seconds else 0.0

    def spread(self):
        """(p10, p90) of the rate over the measured intervals (per call for
        the core rows, per INTERVAL for I/O), or None with fewer than 3."""
        return _p10_p90([v for _, v in self.timeline])


def _p10_p90(values):
    if len(values) < 3:
        return None
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]
    return pick(0.1), pick(0.9)


@dataclass
class Row:
    name: str
    unit: str                 # what an op is: "IO", "LBA", "chunk"
    main: Side
    base: Optional[Side] = None
    base_name: str = ""
    verified: str = ""        # "", "ok (N blocks)" or "FAILED: ..."
    failed: bool = False
    lat_per: str = "request"  # what one latency sample is: a request, or a call of N ops
    fio: Optional[dict] = None  # io rows: fio's figure for the same requests

    @property
    def ratio(self):
        if self.base is None or not self.base.rate:
            return None
        return self.main.rate / self.base.rate

    def ratio_spread(self):
        """(p10, p90) of the workload/baseline ratio over the intervals in
        which both sides ran interleaved, or None."""
        return _p10_p90(self.main.ratios) if self.base is not None else None

    def as_dict(self):
        def pct(s, p):
            v = s.hist.percentile(p)
            return None if v != v else v        # no samples: null, not NaN (not JSON)

        def side(s):
            if s is None:
                return None
            sp = s.spread()
            return {"ops": s.ops, "seconds": s.seconds, "ops_per_s": s.rate,
                    "ops_per_s_p10_p90": list(sp) if sp else None,
                    "bytes_per_s": s.nbytes / s.seconds if s.seconds else 0.0,
                    "errors": s.errors,
                    "latency_ns": {"p50": pct(s, 50), "p99": pct(s, 99),
                                   "p99.9": pct(s, 99.9)},
                    "histogram": s.hist.nonzero(), "timeline": s.timeline}
        rs = self.ratio_spread()
        return {"name": self.name, "unit": self.unit, "latency_per": self.lat_per,
                "workload": side(self.main),
                "baseline_name": self.base_name, "baseline": side(self.base),
                "ratio": self.ratio, "ratio_p10_p90": list(rs) if rs else None,
                "fio": self.fio,
                "verified": self.verified, "failed": self.failed}


# -- progress ------------------------------------------------------------------------


class Progress:
    """A live status line on stderr: off with --quiet or when stderr is not
    a terminal."""

    def __init__(self, enabled=None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = self.stream.isatty()
        self.enabled = enabled
        self._last = 0.0
        self._width = 0

    def update(self, label, elapsed, total, rate, unit="ops", force=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = min(elapsed / total, 1.0) if total else 1.0
        bar = "#" * int(frac * 20)
        line = (f"\r{label:<24} [{bar:<20}] {elapsed:5.1f}/{total:.1f}s "
                f"{_si(rate)}{unit}/s")
        self._width = max(self._width, len(line))
        self.stream.write(line.ljust(self._width))
        self.stream.flush()

    def count(self, label, done, total, rate, force=False):
        """Progress of a fixed amount of work in bytes (the prefill):
        ``done`` of ``total`` bytes at ``rate`` bytes/s."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = min(done / total, 1.0) if total else 1.0
        bar = "#" * int(frac * 20)
        line = (f"\r{label:<24} [{bar:<20}] {_mib(done)}/{_mib(total)} "
                f"{_si(rate)}B/s")
        self._width = max(self._width, len(line))
        self.stream.write(line.ljust(self._width))
        self.stream.flush()

    def clear(self):
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _interval_rate(ops, busy, threads):
    """Requests per second of one side over an interval: its requests over
    its busy time per thread."""
    return ops / (busy / threads) if busy > 0 else 0.0


def _bytes(n):
    """A request size for a row name: 512B, 4k, 1m."""
    for unit, scale in (("m", 1 << 20), ("k", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def _si(x):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:7.2f}{unit} "
    return f"{x:7.1f} "


def _join_some(threads, timeout):
    """Wait at most ``timeout`` seconds in all for ``threads`` to end (a
    timeout per thread would make the monitor loop, and so the end of the
    run, threads x ``timeout`` late)."""
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(timeout=max(0.0, deadline - time.monotonic()))


# -- the I/O workload ------------------------------------------------------------------------


def region_blocks(lun, opts):
    """Blocks an I/O workload covers: a vLUN whole; a direct LUN up to the
    --vlun-size bytes (so a large device is neither prefilled nor tracked
    whole)."""
    if lun.virtual:
        return lun.size
    return min(lun.size, opts.vlun_blocks * 4096 // lun.block_size)


class IoRun:
    """A block I/O workload on one LUN object (virtual or direct), with its
    raw baseline on the bare backing store at the same physical offsets."""

    def __init__(self, lun, backing_fd, opts, name, rng_seed):
        self.lun = lun
        self.fd = backing_fd
        self.o = opts
        self.name = name
        self.bs = lun.block_size
        # The blocks the I/O covers: the whole vLUN, or for a direct LUN
        # (maybe a large device) its first --vlun-size bytes.
        self.region = region_blocks(lun, opts)
        self.space = self.region - (self.region % max(opts.blocks, 1))
        if self.space < opts.blocks * opts.threads:
            raise BenchError(f"the LUN ({lun.size} blocks) is too small for "
                             f"{opts.threads} threads of {opts.blocks}-block requests")
        self.seq_of = np.zeros(self.region, dtype=np.uint64)   # last write's sequence
        # Both sides go through the adapter's engine at the same depth: the
        # workload with lun.listio(qd=), the baseline with raw_listio(qd=).
        self.engine = lun.adapter.engine
        self.seed = rng_seed
        self.writes = opts.read_pct < 100

    def _requests(self, rng, t, cursor, n):
        """Request starting LBAs for thread ``t``.  Writers keep to their own
        LBAs (lba // blocks % threads == t) so the last write is known."""
        o = self.o
        slots = self.space // o.blocks                  # request slots
        if o.pattern == "seq":
            idx = (cursor + np.arange(n, dtype=np.int64) * o.threads + t) % slots
        else:
            idx = rng.integers(0, max(slots // o.threads, 1), n, dtype=np.int64) * o.threads + t
            idx %= slots
        return (idx * o.blocks).astype(np.uint64)

    def run(self, duration, progress, record=True):
        """Run for ``duration`` seconds of wall time: (workload Side,
        baseline Side or None).

        Every worker starts at the same moment (a barrier) and stops at the
        same deadline; a batch is sized so it takes about BATCH_SECONDS,
        whatever the thread count, so the run ends on time.  The monitor
        (this thread) records each side's rate and their ratio per
        INTERVAL seconds: the spread reported next to each figure.  On an
        exception here (Ctrl-C) or in a worker, every worker is stopped and
        joined before it propagates."""
        o = self.o
        main, base = Side(), Side()
        lock = threading.Lock()
        stop = threading.Event()
        errors = []
        # Per thread, published after every batch: [main ops, main busy s,
        # baseline ops, baseline busy s] (the timeline and progress read it).
        live = [[0, 0.0, 0, 0.0] for _ in range(o.threads)]
        gate = threading.Barrier(o.threads + 1)
        clock = {}

        def worker(t):
            try:
                rng = np.random.default_rng(self.seed * 1000 + t)
                nbytes = o.blocks * self.bs
                # Enough requests per batch to keep qd of them in flight.
                most = max(1, min(max(BATCH, 4 * o.qd),
                                  max(BATCH_BYTES, o.qd * nbytes) // nbytes))
                least = min(most, o.qd)
                buf = aligned_buffer(most * nbytes)
                lat_all = np.empty(most, dtype=np.int64)
                hist_m, hist_b = Histogram(), Histogram()
                m_ops = b_ops = m_err = 0
                m_t = b_t = 0.0
                seq = (t + 1) << 40
                cursor = 0
                batch = min(most, max(8, o.qd))
                turn = 0
                gate.wait()
                deadline = clock["deadline"]
                while not stop.is_set() and time.monotonic() < deadline:
                    lat = lat_all[:batch]
                    nb = np.full(batch, o.blocks, dtype=np.uint64)
                    lbas = self._requests(rng, t, cursor, batch)
                    cursor += batch * o.threads
                    if o.read_pct >= 100:
                        ops = np.full(batch, LIST_READ, dtype=np.uint8)
                    elif o.read_pct <= 0:
                        ops = np.full(batch, LIST_WRITE, dtype=np.uint8)
                    else:
                        ops = np.where(rng.integers(0, 100, batch) < o.read_pct,
                                       LIST_READ, LIST_WRITE).astype(np.uint8)
                    wmask = ops == LIST_WRITE
                    seqs = seq + np.arange(batch, dtype=np.uint64)
                    seq += batch
                    view = buf[:batch * nbytes]
                    if wmask.any():
                        pattern.fill(view, lbas, seqs, self.bs, o.blocks)
                    # The two sides take turns going first, so neither gets
                    # the other's CPU-cache warmth more often.
                    turn += 1
                    raw_first = o.compare_raw and turn % 2 == 0
                    t_batch = time.perf_counter()
                    if raw_first:
                        b_t += self._raw(ops, lbas, nbytes, view, lat, hist_b, wmask, seqs)
                        b_ops += batch
                    t0 = time.perf_counter()
                    res = self.lun.listio(ops, lbas, nb, view, lat_ns=lat, qd=o.qd)
                    m_t += time.perf_counter() - t0
                    ok = res.status >= 0
                    m_ops += int(ok.sum())
                    m_err += int((~ok).sum())
                    hist_m.add(lat[ok])
                    if wmask.any():
                        self._record_writes(lbas[wmask & ok], seqs[wmask & ok])
                    if o.compare_raw and not raw_first:
                        b_t += self._raw(ops, lbas, nbytes, view, lat, hist_b, wmask, seqs)
                        b_ops += batch
                    live[t] = [m_ops, m_t, b_ops, b_t]
                    # Batches of about BATCH_SECONDS: many threads sharing
                    # the cores make each request slower, not the run longer.
                    took = time.perf_counter() - t_batch
                    if took > BATCH_SECONDS and batch > least:
                        batch = max(least, batch // 2)
                    elif took < BATCH_SECONDS / 4 and batch < most:
                        batch = min(most, batch * 2)
                with lock:
                    main.ops += m_ops
                    main.errors += m_err
                    main.seconds = max(main.seconds, m_t)
                    main.hist.merge(hist_m)
                    base.ops += b_ops
                    base.seconds = max(base.seconds, b_t)
                    base.hist.merge(hist_b)
            except threading.BrokenBarrierError:
                pass                         # the run was abandoned before it began
            except BaseException as e:       # reported by the caller
                errors.append(e)
                stop.set()

        threads = [threading.Thread(target=worker, args=(t,), daemon=True)
                   for t in range(o.threads)]
        try:
            for th in threads:
                th.start()
            start = time.monotonic()
            clock["deadline"] = start + duration
            gate.wait()
            last, last_t = [0, 0.0, 0, 0.0], start
            while any(th.is_alive() for th in threads):
                _join_some(threads, 0.05)
                now = time.monotonic()
                elapsed = now - start
                if now - last_t >= INTERVAL or not any(th.is_alive() for th in threads):
                    # Each side's rate over the interval, on its own busy time
                    # (the sides share the wall clock), as in the table.
                    cur = [sum(v[i] for v in list(live)) for i in range(4)]
                    rate = _interval_rate(cur[0] - last[0], cur[1] - last[1], o.threads)
                    if record and rate and elapsed <= duration + INTERVAL:
                        main.timeline.append((round(elapsed, 3), rate))
                        if o.compare_raw:
                            b_rate = _interval_rate(cur[2] - last[2], cur[3] - last[3],
                                                    o.threads)
                            if b_rate:
                                base.timeline.append((round(elapsed, 3), b_rate))
                                main.ratios.append(rate / b_rate)
                    last, last_t = cur, now
                    progress.update(self.name if record else self.name + " (warm-up)",
                                    min(elapsed, duration), duration, rate, "req")
        finally:
            stop.set()
            gate.abort()                      # workers still waiting are let go
            for th in threads:
                th.join()
        if errors:
            raise errors[0]
        nbytes = o.blocks * self.bs
        main.nbytes = main.ops * nbytes
        base.nbytes = base.ops * nbytes
        # With several threads the sides ran concurrently: rate = ops / wall
        # time of the busiest thread on that side.
        return main, (base if o.compare_raw else None)

    def _raw(self, ops, lbas, nbytes, buf, lat, hist, wmask, seqs):
        """The same requests on the bare store: the same data at the same
        physical offsets.  Returns the seconds spent."""
        phys = self.lun.translate(lbas) * np.uint64(self.bs)
        t0 = time.perf_counter()
        self.engine.raw_listio(self.fd, ops, phys, nbytes, buf, qd=self.o.qd, lat_ns=lat)
        dt = time.perf_counter() - t0
        hist.add(lat)
        if wmask.any():
            self._record_writes(lbas[wmask], seqs[wmask])
        return dt

    def _record_writes(self, lbas, seqs):
        for b in range(self.o.blocks):
            self.seq_of[lbas + np.uint64(b)] = seqs

    def verify(self, progress=None):
        """Re-read every written block and check its pattern: (blocks
        checked, blocks bad)."""
        written = np.flatnonzero(self.seq_of)
        if len(written) == 0:
            return 0, 0
        step = 256                        # 1 MiB of 4K blocks per read
        bad = 0
        buf = aligned_buffer(step * self.bs)
        first, last = int(written[0]), int(written[-1])
        lba = first - first % step
        while lba <= last:
            n = min(step, self.region - lba)
            seqs = self.seq_of[lba:lba + n]
            if seqs.any():
                view = memoryview(buf)[:n * self.bs]
                self.lun.readinto(lba, view)
                bad += pattern.verify(view, lba, seqs, self.bs)
            lba += n
        return len(written), bad


# -- the core rows ----------------------------------------------------------------------


def _timed_loop(fn, duration, progress, label, per_call, unit):
    """Call ``fn`` until ``duration`` passes: a Side with per-call
    latencies; ``per_call`` ops are done by each call.  A callable that
    ``fn`` returns is run after the timing (untimed clean-up)."""
    side = Side()
    start = time.monotonic()
    lat = []
    while True:
        t0 = time.perf_counter_ns()
        cleanup = fn()
        dt = time.perf_counter_ns() - t0
        if callable(cleanup):
            cleanup()                        # not timed
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


def row_translate(duration, progress):
    n = 1 << 20
    alloc = ChunkAllocator(256)
    table = ResourceTable()
    h = table.open_virtual(3)
    table.grow(h, alloc.alloc_many(64), 0, 1)
    vlbas = np.random.default_rng(7).integers(0, 64 * MC_CHUNK_SIZE, n, dtype=np.int64)
    out = np.empty(n, dtype=np.uint64)
    lxt = table.lxt(h)
    mask = np.uint64(MC_CHUNK_OFF_MASK)

    def numpy_formula():
        v = vlbas.view(np.uint64)
        np.bitwise_or(np.bitwise_and(lxt[v >> np.uint64(MC_CHUNK_SHIFT)], ~mask), v & mask, out=out)

    expect = None
    numpy_formula()
    expect = out.copy()
    table.translate_many(h, vlbas, out=out)
    if not np.array_equal(out, expect):
        raise BenchError("translate_many disagrees with the numpy formula")
    half = duration / 2
    main = _timed_loop(lambda: table.translate_many(h, vlbas, out=out), half, progress,
                       "translate 1M LBAs", n, "LBA")
    base = _timed_loop(numpy_formula, half, progress, "translate (numpy)", n, "LBA")
    main.nbytes, base.nbytes = main.ops * 16, base.ops * 16
    return Row("translate", "LBA", main, base, "numpy formula", lat_per="call (1M LBAs)")


def _python_alloc(bitmap, state, n):
    """The kernel's ba_alloc loop (spec §12.2) in pure Python."""
    out = []
    words = len(bitmap)
    for _ in range(n):
        curr = state[0]
        w = next((i for i in range(curr, words) if bitmap[i]), None)
        if w is None:
            w = next((i for i in range(0, curr) if bitmap[i]), None)
        word = bitmap[w]
        bit = (word & -word).bit_length() - 1
        bitmap[w] = word & ~(1 << bit)
        state[0] = w + 1 if bit == 63 else w
        out.append(w * 64 + bit)
    return out


def row_alloc(duration, progress):
    total = 1 << 22
    per = 1 << 16
    alloc = ChunkAllocator(total)

    def cycle():
        auns = alloc.alloc_many(per)
        alloc.free_many(auns)

    main = _timed_loop(cycle, duration * 0.6, progress, "alloc_many 64k chunks", per, "chunk")
    bitmap = [(1 << 64) - 1] * (total // 64)
    state = [0]
    py_per = 4096

    def py_cycle():
        _python_alloc(bitmap, state, py_per)
        if state[0] >= len(bitmap) - py_per // 64 - 1:
            bitmap[:] = [(1 << 64) - 1] * len(bitmap)
            state[0] = 0

    base = _timed_loop(py_cycle, duration * 0.4, progress, "alloc (pure Python)", py_per, "chunk")
    # The workload side did alloc + free; count both halves of its time as
    # allocation time: a conservative ratio.
    return Row("chunk alloc+free", "chunk", main, base, "Python kernel loop",
               lat_per="call (64k chunks)")


CLONE_CHUNKS = 1 << 20


def _interleaved_loop(sides, duration, progress, label, per_call, unit):
    """Call each side's function in turn until ``duration`` passes, the
    side that goes first alternating: a Side per function, with per-call
    latencies; ``per_call`` ops are done by each call.  A callable that a
    function returns is run untimed right after it (an undo)."""
    out = [Side() for _ in sides]
    lat = [[] for _ in sides]
    start = time.monotonic()
    k = 0
    while True:
        order = list(range(len(sides)))
        order = order[k % len(sides):] + order[:k % len(sides)]
        k += 1
        took = [0] * len(sides)
        for i in order:
            t0 = time.perf_counter_ns()
            undo = sides[i]()
            if not callable(undo):
                undo = None                  # a result is freed in this side's time
            dt = time.perf_counter_ns() - t0
            if undo is not None:
                undo()                       # not timed
            lat[i].append(dt)
            took[i] = max(dt, 1)
            out[i].ops += per_call
            out[i].seconds += dt / 1e9
        elapsed = time.monotonic() - start
        for i in range(len(sides)):
            out[i].timeline.append((round(elapsed, 4), per_call / took[i] * 1e9))
        out[0].ratios.append(took[1] / took[0])     # this round's ratio
        progress.update(label, elapsed, duration, out[0].rate, unit)
        if elapsed >= duration:
            break
    for side, l in zip(out, lat):
        side.hist.add(l)
    return out


def row_clone(duration, progress):
    """DK_CXLFLASH_VLUN_CLONE, the ioctl the product runs, of a vLUN of 1 M
    mapped chunks: from a context owned by this process's parent (set up
    through the driver's entry point as that parent) into a context of this
    process, issued with ``cxlflash.ioctl`` as a program would; undone
    between calls (untimed) by RELEASE of the clone.  Interleaved with
    np.copyto of the LXT."""
    chunks = CLONE_CHUNKS
    a = Adapter()
    fds = []
    try:
        wwid = a.add_lun(None, size=(chunks + 64) * MC_CHUNK_SIZE * 4096)    # sparse
        disk = a.open_disk(wwid)
        parent = Caller(os.getppid(), 1)

        def as_parent(request, arg):
            superpipe.disk_ioctl(a.driver, disk.sdev, disk, request, arg, parent)
            return arg

        at = uapi.dk_cxlflash_attach()
        at.hdr.flags = os.O_RDWR
        as_parent(uapi.DK_CXLFLASH_ATTACH, at)
        fds.append(at.adap_fd)
        src = at.context_id
        uv = uapi.dk_cxlflash_uvirtual()
        uv.context_id = src
        uv.lun_size = chunks * MC_CHUNK_SIZE
        h = as_parent(uapi.DK_CXLFLASH_USER_VIRTUAL, uv).rsrc_handle
        at = uapi.dk_cxlflash_attach()
        at.hdr.flags = os.O_RDWR
        ioctl(disk, uapi.DK_CXLFLASH_ATTACH, at)
        fds.append(at.adap_fd)
        dst = at.context_id
        lxt = a._context_record(src).table.lxt(h)
        if len(lxt) != chunks:
            raise BenchError(f"the clone source has {len(lxt)} chunks, not {chunks}")
        copy = np.empty_like(lxt)

        def release():                       # the clone's release, untimed
            rl = uapi.dk_cxlflash_release()
            rl.context_id = dst
            rl.rsrc_handle = h
            ioctl(disk, uapi.DK_CXLFLASH_RELEASE, rl)

        def clone():
            cl = uapi.dk_cxlflash_clone()
            cl.context_id_src = src
            cl.context_id_dst = dst
            ioctl(disk, uapi.DK_CXLFLASH_VLUN_CLONE, cl)
            return release

        clone()
        if not np.array_equal(a._context_record(dst).table.lxt(h), lxt):
            raise BenchError("the clone does not map the source's chunks")
        release()
        main, base = _interleaved_loop([clone, lambda: np.copyto(copy, lxt)], duration,
                                       progress, "VLUN_CLONE 1M chunks", chunks, "chunk")
        alloc = a.driver.gluns[wwid].allocator
        if alloc.clone_count(int(lxt[0]) >> MC_CHUNK_SHIFT) != 0:
            raise BenchError("clone references leaked")
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
    main.nbytes, base.nbytes = main.ops * 8, base.ops * 8
    return Row("VLUN_CLONE 1M chunks", "chunk", main, base, "np.copyto of the LXT",
               lat_per="ioctl (1M chunks)")


# -- setting up a target -----------------------------------------------------------------


class RunLog:
    """What a run says besides its rows: what it does to the target (said
    as it happens, on ``out``), the time spent outside the measured rows
    (prefill, warm-up), and the rows measured so far -- kept even when a
    later row fails or the run is interrupted."""

    def __init__(self, out=None):
        self.out = out
        self.notes = []
        self.phases = {}            # "prefill", "warm-up" -> seconds of wall time
        self.rows = []

    def say(self, message):
        self.notes.append(message)
        if self.out is not None:
            print(message, file=self.out, flush=True)

    def spent(self, phase, seconds):
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds


def _mib(n):
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"


def probe(path):
    """(kind, size in bytes) of what is at ``path``: kind is None when
    nothing is there, "file", "block device" or "other"."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, 0
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, struct.pack("Q", 0))
        finally:
            os.close(fd)
        return "block device", struct.unpack("Q", buf)[0]
    if stat.S_ISREG(st.st_mode):
        return "file", st.st_size
    return "other", 0


def writes_target(opts):
    """Does this run write to its target?  Every workload but a read-only
    ``io`` run writes (the matrix has write rows; arkdb and the resize storm
    write as they grow)."""
    return not (opts.workload == "io" and opts.read_pct >= 100)


def overwritten(opts, size, block_size=4096):
    """Exactly what a run writing to an existing target of ``size`` bytes
    overwrites, in words."""
    if opts.workload in ("arkdb", "resize-storm"):
        return (f"any of its {_mib(size)} (bytes 0..{size - 1}): {opts.workload} grows and "
                "shrinks many virtual LUNs across the whole LUN")
    region = opts.vlun_blocks * 4096
    if opts.lun == "direct":
        n = min(size, region)
        what = "the direct LUN's first --vlun-size bytes"
    else:
        # A fresh adapter hands a new vLUN the LUN's first chunks, in order
        # (tests/test_cli.py checks it): its blocks are the LUN's first bytes.
        n = min(size, region)
        what = "the virtual LUN's blocks, the LUN's first chunks"
    return (f"bytes 0..{n - 1} (the first {_mib(n)}: {what}, prefilled, then written "
            "by the workload)")


class _ReadOnlyFile(FileBacking):
    """An existing file opened O_RDONLY: a read-only run cannot write it."""

    def __init__(self, path, direct=False):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
        Backing.__init__(self, fd, 4096, path=path, direct=direct)


class _ReadOnlyDevice(BlockDeviceBacking):
    """An existing block device opened O_RDONLY."""

    def __init__(self, path, direct=False):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
        try:
            buf = fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0))
        except BaseException:
            os.close(fd)
            raise
        Backing.__init__(self, fd, max(512, struct.unpack("i", buf)[0]), path=path,
                         direct=direct)


class Target:
    """An adapter with one LUN and an open context on it.

    The rules for a path (issue 13): a missing path is created (the run
    says so); an existing file or device that may hold data is never
    written without ``opts.force`` -- a read-only run opens it O_RDONLY and
    reads what is there without a prefill; an empty file, a device with
    nothing attached and anything else are refused with a message saying
    what is wrong."""

    def __init__(self, opts, log=None):
        self.opts = opts
        self.log = log or RunLog()
        self.read_only = False          # an existing target, read as it is
        self._backing = None
        t = opts.target
        if t != "memory":
            backing, size = self._open_path(t)
        self.adapter = Adapter()
        try:
            if t == "memory":
                self.wwid = self.adapter.add_lun(None, size=opts.size)
            elif backing is not None:
                self._backing = backing
                self.wwid = self.adapter.add_lun(backing)
            else:
                self.wwid = self.adapter.add_lun(t, size=size, direct=opts.direct_io)
        except OSError as e:
            self.close()
            raise BenchError(f"cannot use target {t!r}: {e.strerror or e}") from None
        self.glun = self.adapter.driver.gluns[self.wwid]
        self.disk = self.adapter.open_disk(self.wwid)
        self.ctx = self.disk.attach()

    def _open_path(self, t):
        """(a Backing this run opened read-only, or None; the size to give
        add_lun) for a path target, after the checks."""
        o = self.opts
        try:
            kind, size = probe(t)
        except OSError as e:
            raise BenchError(f"cannot use target {t!r}: {e.strerror or e}") from None
        if kind is None:
            if not o.size_given and o.size is None:
                raise BenchError(f"target {t} does not exist: give --size to create it")
            self.log.say(f"{t} does not exist: creating it, a sparse file of "
                         f"{_mib(o.size)} (left in place after the run)")
            return None, o.size
        if kind == "other":
            raise BenchError(f"cannot use target {t!r}: it is neither a regular file "
                             "nor a block device")
        if size == 0:
            if kind == "block device":
                hint = (f" (attach a file first: losetup {t} FILE)"
                        if os.path.basename(t).startswith("loop") else "")
                raise BenchError(f"target {t} is a block device of 0 bytes: nothing is "
                                 f"attached to it{hint}")
            if not o.size_given:
                raise BenchError(f"target {t} is an empty file (0 bytes): nothing to read "
                                 "and no room to write; give --size to extend it into a "
                                 "LUN of that size, or use another target")
            self.log.say(f"{t} is an empty file: extending it to {_mib(o.size)} (sparse)")
            return None, o.size
        if o.size_given:
            raise BenchError(f"--size is for memory or a new file: {t} exists "
                             f"({_mib(size)}) and is used at its own size")
        if not writes_target(o):
            self.read_only = True
            self.log.say(f"{t} exists ({kind}, {_mib(size)}): reading what it holds, "
                         "opened read-only, without a prefill")
            opener = _ReadOnlyDevice if kind == "block device" else _ReadOnlyFile
            try:
                return opener(t, direct=o.direct_io), None
            except OSError as e:
                raise BenchError(f"cannot use target {t!r}: {e.strerror or e}") from None
        what = overwritten(o, size)
        if not o.force:
            raise BenchError(f"refusing to overwrite {t} ({kind}, {_mib(size)}, may hold "
                             f"data): this run would write {what}; give --force (or "
                             "--allow-overwrite) to overwrite it, use a read-only "
                             "workload (cxlflash bench io -r 100), or a new file or memory")
        self.log.say(f"overwriting {t} ({kind}, {_mib(size)}) as --force allows: {what}")
        return None, None

    @property
    def fd(self):
        return self.glun.backing.fd

    def open_lun(self, blocks=None):
        o = self.opts
        if o.lun == "direct":
            return self.ctx.open_direct()
        blocks = blocks or o.vlun_blocks
        try:
            # No scrub: the vLUN writes its own blocks only (a scrub would
            # zero its chunks whole at release).
            return self.ctx.create_virtual(blocks, scrub=False)
        except CxlFlashError as e:
            raise BenchError(f"cannot create a {blocks}-block virtual LUN on the "
                             f"target: {e.strerror}") from None

    def prefill(self, lun, progress):
        """Write every block the I/O covers once, so neither side pays
        first-write costs (or reads holes).  Not on a target read as it is."""
        if self.read_only:
            return
        t0 = time.monotonic()
        end = region_blocks(lun, self.opts)
        bs = lun.block_size
        step = max(1, (4 << 20) // bs)
        buf = aligned_buffer(step * bs)
        for lba in range(0, end, step):
            lun.write(lba, memoryview(buf)[:min(step, end - lba) * bs])
            done = min(lba + step, end) * bs
            progress.count("prefill", done, end * bs, done / max(time.monotonic() - t0, 1e-9))
        self.log.spent("prefill", time.monotonic() - t0)

    def close(self):
        self.adapter.close()
        if self._backing is not None:
            self._backing.close()
            self._backing = None


def machine_info():
    from ._core.engine import engine_info
    eng = engine_info()
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or _cpu_model(),
            "cores": os.cpu_count(), "python": sys.version.split()[0],
            "numpy": _numpy_version(), "cxlflash": __version__,
            "engine": eng["engine"] + (f" ({eng['reason']})" if eng["reason"] else "")}


def _numpy_version():
    """numpy's version without importing numpy (150 ms) when it is not
    imported yet (``cxlflash info``)."""
    if "numpy" in sys.modules:
        return sys.modules["numpy"].__version__
    from importlib.metadata import version
    return version("numpy")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# -- workloads ----------------------------------------------------------------------------


def io_row(target, lun, opts, name, progress, log=None):
    log = log or target.log
    run = IoRun(lun, target.fd, opts, name, opts.seed)
    if opts.warmup:
        t0 = time.monotonic()
        run.run(opts.warmup, progress, record=False)
        log.spent("warm-up", time.monotonic() - t0)
    main, base = run.run(opts.duration, progress)
    row = Row(name, "IO", main, base, f"raw store, qd {opts.qd}" if base else "")
    if run.writes:
        t0 = time.monotonic()
        checked, bad = run.verify(progress)
        log.spent("verify", time.monotonic() - t0)
        row.verified = f"ok ({checked} blocks)" if not bad else f"FAILED: {bad} of {checked} blocks"
        row.failed = bool(bad)
        row.run = run
    return row


def run_matrix(opts, progress, log=None):
    log = log or RunLog()
    rows = log.rows
    core_t = max(opts.duration * 2 / 3, 0.2)
    target = Target(opts, log)            # refused (or created) before anything runs
    try:
        rows.append(row_translate(core_t, progress))
        rows.append(row_alloc(core_t, progress))
        rows.append(row_clone(core_t, progress))
        lun = target.open_lun()
        target.prefill(lun, progress)
        for name, read_pct, blocks, pat in (
                ("4k randread", 100, 1, "random"), ("4k randwrite", 0, 1, "random"),
                ("4k 70/30 mix", 70, 1, "random"), ("1m seqread", 100, 256, "seq")):
            o = Options(**{**asdict(opts), "read_pct": read_pct,
                           "blocks": max(1, blocks * 4096 // lun.block_size), "pattern": pat})
            rows.append(io_row(target, lun, o, name, progress))
    finally:
        target.close()
    return rows


def run_io(opts, progress, log=None):
    log = log or RunLog()
    target = Target(opts, log)
    try:
        lun = target.open_lun()
        target.prefill(lun, progress)
        kind = ("read" if opts.read_pct == 100 else "write" if opts.read_pct == 0
                else f"{opts.read_pct}/{100 - opts.read_pct} mix")
        name = f"{_bytes(opts.blocks * lun.block_size)} {opts.pattern} {kind}"
        row = io_row(target, lun, opts, name, progress)
        log.rows.append(row)
        if opts.fio and shutil.which("fio"):
            row.fio = run_fio(target, lun, opts, log)
        return log.rows
    finally:
        target.close()


def fio_command(path, opts, region_bytes, block_size):
    """fio doing what an ``io`` row does, on the same store: the same
    request size, read share, pattern, queue depth and threads, over the
    same region (a vLUN's blocks are the LUN's first bytes), io_uring,
    O_DIRECT when the run uses it."""
    seq = opts.pattern == "seq"
    if opts.read_pct >= 100:
        rw = "read" if seq else "randread"
    elif opts.read_pct <= 0:
        rw = "write" if seq else "randwrite"
    else:
        rw = "rw" if seq else "randrw"
    cmd = ["fio", "--name=cxlflash-bench", f"--filename={path}", f"--rw={rw}",
           f"--bs={opts.blocks * block_size}", f"--iodepth={opts.qd}",
           "--ioengine=io_uring", f"--direct={1 if opts.direct_io else 0}",
           f"--numjobs={opts.threads}", "--group_reporting", "--thread",
           f"--size={region_bytes}", "--offset=0", f"--runtime={opts.duration:g}",
           "--time_based", "--norandommap", "--randrepeat=0", "--output-format=json"]
    if 0 < opts.read_pct < 100:
        cmd.append(f"--rwmixread={opts.read_pct}")
    if opts.read_pct >= 100:
        cmd.append("--readonly")
    return cmd


def run_fio(target, lun, opts, log):
    """fio's requests per second for the run's store, depth and request
    size, or None (the reason is a note)."""
    import subprocess
    path = (opts.target if opts.target != "memory"
            else f"/proc/{os.getpid()}/fd/{target.fd}")        # the memfd itself
    region = region_blocks(lun, opts) * lun.block_size
    cmd = fio_command(path, opts, region, lun.block_size)
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=opts.duration * 3 + 30)
        doc = json.loads(p.stdout[p.stdout.index("{"):])
        job = doc["jobs"][0]
        if job.get("error"):
            raise ValueError(f"fio error {job['error']}")
        iops = float(job["read"]["iops"]) + float(job["write"]["iops"])
    except (OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError) as e:
        log.say(f"fio could not run ({e}); {' '.join(cmd)}")
        return None
    finally:
        log.spent("fio", time.monotonic() - t0)
    return {"iops": iops, "command": cmd}


def format_fio(rows):
    """A line per row that has fio's figure next to it."""
    out = []
    for r in rows:
        f = getattr(r, "fio", None)
        if f:
            out.append(f"fio, the same requests on the same store (io_uring, qd "
                       f"{_flag(f['command'], 'iodepth')}, {_flag(f['command'], 'numjobs')} "
                       f"thread(s)): {_si(f['iops']).strip()} req/s; {r.name}: "
                       f"{r.main.rate / f['iops']:.2f}x fio's rate" if f["iops"] else "")
    return "\n".join(l for l in out if l)


def _flag(cmd, name):
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}="))


def run_arkdb(opts, progress, log=None, nluns=20, grow_blocks=1024, initial_blocks=64):
    """The arkdb pattern: 20 vLUNs, one per worker, starting at 64 blocks
    (arkdb's default 5 MiB store over 20 threads) and grown in 4 MiB steps
    as they fill, 4 KiB writes appended and 4 KiB random reads of what was
    written (70 % reads)."""
    log = log or RunLog()
    target = Target(opts, log)
    try:
        chunks = (target.glun.max_lba + 1) // MC_CHUNK_SIZE
        if chunks < nluns:
            need = nluns * MC_CHUNK_SIZE * (target.glun.blk_len or 4096)
            raise BenchError(f"arkdb needs a LUN of at least {nluns} chunks "
                             f"({need / (1 << 30):g} GiB) for its {nluns} vLUNs; "
                             f"the target has {chunks} (try --size 8G)")
        luns = [target.ctx.create_virtual(initial_blocks) for _ in range(nluns)]
        main = Side()
        base = Side()
        resizes = Side()
        lock = threading.Lock()
        stop = threading.Event()
        errors = []
        fill = [0] * nluns
        seqs = [np.zeros(0, dtype=np.uint64) for _ in range(nluns)]

        def raw_once(lun, op, lba, buf, lat, hist):
            phys = lun.translate([lba]) * np.uint64(4096)
            t0 = time.perf_counter()
            target.adapter.engine.raw_listio(target.fd, [op], phys, 4096, buf, qd=1,
                                             lat_ns=lat)
            dt = time.perf_counter() - t0
            hist.add(lat)
            return dt

        def worker(i):
            try:
                lun = luns[i]
                rng = np.random.default_rng(opts.seed + i)
                buf = aligned_buffer(4096)
                hist = Histogram()
                lat = np.empty(1, dtype=np.int64)
                lat_b = np.empty(1, dtype=np.int64)
                hist_b = Histogram()
                ops = errs = b_ops = 0
                busy = b_busy = 0.0
                seq_of = np.zeros(lun.size, dtype=np.uint64)
                s = (i + 1) << 40
                rs = Side()
                while not stop.is_set():
                    for _ in range(64):
                        if fill[i] == 0 or rng.integers(0, 100) >= 70:
                            if fill[i] >= lun.size:
                                t0 = time.perf_counter()
                                lun.set_size(lun.size + grow_blocks)
                                rs.hist.add([(time.perf_counter() - t0) * 1e9])
                                rs.ops += 1
                                seq_of = np.concatenate(
                                    [seq_of, np.zeros(grow_blocks, dtype=np.uint64)])
                            lba = fill[i]
                            fill[i] += 1
                            s += 1
                            pattern.fill(buf, [lba], [s], 4096)
                            op = LIST_WRITE
                            seq_of[lba] = s
                        else:
                            lba = int(rng.integers(0, fill[i]))
                            op = LIST_READ
                        # The raw twin (same data, same physical offset)
                        # goes first every other request.
                        raw_first = opts.compare_raw and (ops + errs) % 2 == 0
                        if raw_first:
                            b_busy += raw_once(lun, op, lba, buf, lat_b, hist_b)
                            b_ops += 1
                        t0 = time.perf_counter()
                        res = lun.listio([op], [lba], [1], buf, lat_ns=lat, qd=1)
                        busy += time.perf_counter() - t0
                        if res.status[0] >= 0:
                            ops += 1
                            hist.add(lat)
                        else:
                            errs += 1
                        if opts.compare_raw and not raw_first:
                            b_busy += raw_once(lun, op, lba, buf, lat_b, hist_b)
                            b_ops += 1
                seqs[i] = seq_of
                with lock:
                    main.ops += ops
                    main.errors += errs
                    main.seconds += busy
                    main.hist.merge(hist)
                    base.ops += b_ops
                    base.seconds += b_busy
                    base.hist.merge(hist_b)
                    resizes.ops += rs.ops
                    resizes.hist.merge(rs.hist)
            except BaseException as e:
                errors.append(e)
                stop.set()

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(nluns)]
        start = time.monotonic()
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            elapsed = time.monotonic() - start
            if elapsed >= opts.duration:
                stop.set()
            _join_some(threads, 0.05)
            done = sum(l.stats()["num_list_calls"] for l in luns)
            progress.update("arkdb 20 vLUNs", min(elapsed, opts.duration), opts.duration,
                            done / max(elapsed, 1e-9))
        if errors:
            raise errors[0]
        wall = time.monotonic() - start
        # Both sides ran interleaved in the same 20 threads: each side's rate
        # is its requests over its busy time spread across the threads.
        main.seconds /= nluns
        base.seconds /= nluns
        main.nbytes = main.ops * 4096
        base.nbytes = base.ops * 4096
        resizes.seconds = wall
        checked = bad = 0
        for lun, seq_of in zip(luns, seqs):
            n = min(len(seq_of), lun.size)
            data = aligned_buffer(n * 4096)
            for lba in range(0, n, 256):
                k = min(256, n - lba)
                lun.readinto(lba, memoryview(data)[lba * 4096:(lba + k) * 4096])
            bad += pattern.verify(data, 0, seq_of[:n], 4096)
            checked += int(np.count_nonzero(seq_of))
        row = Row("arkdb 20 vLUNs 4k 70/30", "IO", main,
                  base if opts.compare_raw else None,
                  "raw store, qd 1" if opts.compare_raw else "")
        row.verified = f"ok ({checked} blocks)" if not bad else f"FAILED: {bad} of {checked} blocks"
        row.failed = bool(bad)
        grow = Row("arkdb grow 4 MiB steps", "resize", resizes, lat_per="resize")
        return [row, grow]
    finally:
        target.close()


def run_resize_storm(opts, progress, log=None, nluns=8):
    """Many vLUNs growing and shrinking (chunks given back) while 4 KiB
    random I/O runs on another vLUN."""
    log = log or RunLog()
    target = Target(opts, log)
    try:
        io_lun = target.open_lun()
        target.prefill(io_lun, progress)
        storm = [target.ctx.create_virtual(0) for _ in range(nluns)]
        stop = threading.Event()
        resizes = Side()
        errors = []

        def stormer(i):
            try:
                rng = np.random.default_rng(opts.seed + 100 + i)
                lun = storm[i]
                hist = Histogram()
                n = 0
                # Up to 3 chunks, never beyond the physical LUN (EINVAL).
                most = min(3, lun.lun_blocks // MC_CHUNK_SIZE)
                while not stop.is_set():
                    want = int(rng.integers(0, most + 1)) * MC_CHUNK_SIZE
                    t0 = time.perf_counter()
                    try:
                        lun.set_size(want, release=True, best_effort=True)
                    except CxlFlashError as e:
                        if e.errno != 28:       # ENOSPC when the LUN is full
                            raise
                    hist.add([(time.perf_counter() - t0) * 1e9])
                    n += 1
                resizes.ops += n
                resizes.hist.merge(hist)
            except BaseException as e:
                errors.append(e)
                stop.set()

        threads = [threading.Thread(target=stormer, args=(i,), daemon=True) for i in range(nluns)]
        start = time.monotonic()
        for th in threads:
            th.start()
        o = Options(**{**asdict(opts), "read_pct": 70, "blocks": 1, "pattern": "random"})
        try:
            row = io_row(target, io_lun, o, "4k 70/30 during storm", progress, log)
        finally:
            stop.set()
            for th in threads:
                th.join()
        if errors:
            raise errors[0]
        resizes.seconds = time.monotonic() - start
        return [row, Row(f"resize storm {nluns} vLUNs", "resize", resizes, lat_per="resize")]
    finally:
        target.close()


WORKLOADS = {"matrix": run_matrix, "io": run_io, "arkdb": run_arkdb,
             "resize-storm": run_resize_storm}


def run(opts, progress=None, log=None):
    """Run the workload of ``opts``: a list of Rows.  ``log`` (a RunLog)
    keeps the rows measured so far when a later row fails or the run is
    interrupted, and what the run did outside the rows."""
    progress = progress or Progress(enabled=False)
    log = log or RunLog()
    try:
        rows = WORKLOADS[opts.workload](opts, progress, log)
        if rows is not log.rows:
            log.rows[:] = rows
        return log.rows
    finally:
        progress.clear()


# -- reporting --------------------------------------------------------------------------------


def _us(ns):
    return "-" if ns != ns else f"{ns / 1000:.1f}"


UNITS = {"IO": "req", "LBA": "LBA", "chunk": "chunk", "resize": "resize"}

COLUMNS = """\
The columns of the table:
  rate        the workload's operations per second -- req (requests of the
              row's size), LBA (logical blocks translated), chunk (chunks
              allocated+freed or cloned), resize (vLUN resizes) -- and its
              spread: +-half the range between the 10th and 90th percentile
              of the rate over the measured intervals (each 0.1 s of an I/O
              row, each call of a core row), as a % of the figure
  MB/s        bytes moved per second (translate: 16 bytes per LBA in and out)
  lat per     what one latency sample is: one request (I/O rows) or one call
              of the batch named (core rows: per batch, not per item)
  p50/p99/p99.9 us   latency percentiles of those samples, in microseconds
  baseline    the same work done the plain way in the same run, with its
              spread: the same requests at the same physical offsets on the
              bare backing store, through the same engine at the same queue
              depth ("raw store, qd N"), interleaved batch by batch (I/O);
              the numpy formula (translate); the kernel's allocation loop in
              Python (alloc); np.copyto of the LXT (clone)
  ratio       rate / baseline rate: above 1.00x the workload is faster than
              its baseline, below it slower (I/O rows: 1.00x means the
              translation costs nothing); in brackets the 10th-90th
              percentile of the ratio over the intervals both sides ran
  errors      requests that failed (any makes the exit status 1)
  verified    write rows: every written block re-read and its pattern
              checked after the row ("ok (N blocks)" or FAILED)"""


def _rate(rate, unit, spread):
    text = f"{_si(rate).strip()} {UNITS.get(unit, unit)}/s"
    if spread and rate:
        text += f" \u00b1{(spread[1] - spread[0]) / 2 / rate * 100:.0f}%"
    return text


def format_table(rows):
    head = ("workload", "rate \u00b1spread", "MB/s", "lat per", "p50 us", "p99 us",
            "p99.9 us", "baseline \u00b1spread", "ratio (p10-p90)", "errors", "verified")
    lines = []
    for r in rows:
        m = r.main
        mb = f"{m.nbytes / m.seconds / 1e6:.1f}" if m.nbytes and m.seconds else "-"
        ratio = "-"
        if r.ratio is not None:
            rs = r.ratio_spread()
            ratio = f"{r.ratio:.2f}x" + (f" ({rs[0]:.2f}-{rs[1]:.2f})" if rs else "")
        lines.append((r.name, _rate(m.rate, r.unit, m.spread()), mb, r.lat_per,
                      _us(m.hist.percentile(50)), _us(m.hist.percentile(99)),
                      _us(m.hist.percentile(99.9)),
                      (_rate(r.base.rate, r.unit, r.base.spread()) + f" ({r.base_name})")
                      if r.base else "-", ratio, str(m.errors), r.verified or "-"))
    widths = [max(len(head[i]), *(len(l[i]) for l in lines)) if lines else len(head[i])
              for i in range(len(head))]
    left = (0, 3, 7, 10)
    fmt = lambda cols: "  ".join(c.ljust(w) if i in left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cols, widths))).rstrip()
    out = [fmt(head), "  ".join("-" * w for w in widths)]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def format_phases(log, opts):
    """One line: the wall time outside the measured rows."""
    parts = [f"measured {opts.duration:g} s per row"]
    for name in ("prefill", "warm-up", "verify", "fio"):
        if name in log.phases:
            parts.append(f"{name} {log.phases[name]:.2f} s")
    return "time: " + ", ".join(parts) + " (not in the figures)"


def to_json(rows, opts, path, log=None, incomplete=None):
    doc = {"machine": machine_info(), "options": asdict(opts),
           "rows": [r.as_dict() for r in rows],
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if log is not None:
        doc["notes"] = log.notes
        doc["phases_s"] = log.phases
    if incomplete:
        doc["incomplete"] = incomplete
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)


FAMILIES = (("IO", "block I/O", "latency per request (us)"),
            ("core", "core operations", "latency per call (us)"),
            ("resize", "resizes", "latency per resize (us)"))


def _family(row):
    if row.unit == "IO":
        return "IO"
    return "resize" if row.unit == "resize" else "core"


def plot(rows, path):
    """One line of two panels per family of rows (block I/O per request,
    core operations per call, resizes): the latency histogram and the rate
    over time, both on log scales (the rows of a family differ by orders
    of magnitude).  A row has one colour in every panel, its baseline
    dashed.  Returns the layout: {panel title: [(label, colour, style)]}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'cxlflash[plot]'") from None
    palette = plt.get_cmap("tab10").colors
    colour = {r.name: palette[i % len(palette)] for i, r in enumerate(rows)}
    families = [(key, title, xlabel) for key, title, xlabel in FAMILIES
                if any(_family(r) == key and r.main.hist.total for r in rows)]
    layout = {}
    fig, axes = plt.subplots(max(1, len(families)), 2, squeeze=False,
                             figsize=(13, 4.2 * max(1, len(families))))
    for (key, title, xlabel), (ax1, ax2) in zip(families, axes):
        members = [r for r in rows if _family(r) == key and r.main.hist.total]
        hist_title, rate_title = f"{title}: latency", f"{title}: rate over time"
        layout[hist_title], layout[rate_title] = [], []
        for r in members:
            sides = [(r.main, r.name, "-")]
            if r.base is not None:
                sides.append((r.base, f"{r.name}: {r.base_name}", "--"))
            unit = UNITS.get(r.unit, r.unit)
            for side, label, style in sides:
                pts = side.hist.nonzero()
                if pts:
                    x, y = zip(*pts)
                    ax1.plot(np.array(x) / 1000, y, label=label, drawstyle="steps-mid",
                             linestyle=style, color=colour[r.name])
                    layout[hist_title].append((label, colour[r.name], style))
                pts = [(t, v) for t, v in side.timeline if v > 0]
                if pts:
                    t, v = zip(*pts)
                    ax2.plot(t, v, label=f"{label} ({unit}/s)", linestyle=style,
                             color=colour[r.name], marker="." if len(pts) < 20 else None)
                    layout[rate_title].append((label, colour[r.name], style))
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        ax1.set_xlabel(xlabel)
        ax1.set_ylabel("samples")
        ax1.set_title(hist_title)
        ax2.set_yscale("log")
        ax2.set_xlabel("elapsed in the row (s)" if key == "core" else "elapsed in the run (s)")
        ax2.set_ylabel("operations/s (each side on its own busy time)")
        ax2.set_title(rate_title)
        for ax in (ax1, ax2):
            if ax.lines:                  # nothing drawn: no empty legend (a warning)
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return layout
