"""The I/O run engine: a block I/O workload on one LUN, interleaved batch
by batch with its raw baseline on the bare backing store at the same
physical offsets, both through the adapter's engine at the same depth;
every written block's last sequence number kept for the verification."""
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from .._core._lazy import numpy as np

from .._core import pattern
from .._core.datapath import LIST_READ, LIST_WRITE
from ..backing import aligned_buffer
from .harness import join_some
from .options import BenchError
from .results import Histogram, Side

BATCH = 256                 # requests per GIL-free call (at most)
BATCH_BYTES = 4 << 20       # ... and at most this much data per call
BATCH_SECONDS = 0.01        # an I/O worker's batch takes about this long
INTERVAL = 0.1              # the rates over time (and their spread) per this many s


def _interval_rate(ops, busy, threads):
    """Requests per second of one side over an interval: its requests over
    its busy time per thread."""
    return ops / (busy / threads) if busy > 0 else 0.0


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
        # Both sides go through the same engine at the same depth (the
        # adapter's, or an RBD image's own): the workload with
        # lun.listio(qd=), the baseline with raw_listio(qd=).
        self.engine = lun.adapter._engine_for(backing_fd)
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
                join_some(threads, 0.05)
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
