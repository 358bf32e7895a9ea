"""The workloads of ``cxlflash bench``: the matrix (the core rows and four
I/O rows), ``io`` (one I/O row, with fio's figure), ``arkdb`` (20 vLUNs
growing as they fill) and ``resize-storm`` (vLUNs growing and shrinking
under I/O); :func:`run` runs the one the options name."""
import shutil
import threading
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from .._core._lazy import numpy as np

from .._core import pattern
from .._core.datapath import LIST_READ, LIST_WRITE
from .._core.tables import MC_CHUNK_SIZE
from ..backing import aligned_buffer
from ..errors import CxlFlashError
from . import clients
from .fio import run_fio
from .harness import join_some, start_workers
from .iorun import IoRun
from .options import BenchError, Options
from .progress import Progress
from .results import Histogram, Row, RunLog, Side
from .rows import row_alloc, row_clone, row_translate
from .target import Target
from .units import size_name


def io_row(target, lun, opts, name, progress, log=None):
    log = log or target.log
    run = IoRun(lun, target.fd, opts, name, opts.seed)
    clients.sync()              # --clients: every client starts the row together
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
        for row in (row_translate, row_alloc, row_clone):
            clients.sync()
            rows.append(row(core_t, progress))
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
        name = f"{size_name(opts.blocks * lun.block_size)} {opts.pattern} {kind}"
        row = io_row(target, lun, opts, name, progress)
        log.rows.append(row)
        if opts.fio and shutil.which("fio"):
            row.fio = run_fio(target, lun, opts, log)
        return log.rows
    finally:
        target.close()


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
                             f"the target has {chunks} "
                             + ("(start the daemon with --size 8G, or give -t WWID of a "
                                "larger LUN)" if opts.connect else "(try --size 8G)"))
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
            target.adapter._engine_for(target.fd).raw_listio(target.fd, [op], phys, 4096, buf, qd=1,
                                             lat_ns=lat)
            dt = time.perf_counter() - t0
            hist.add(lat)
            return dt

        def worker(i):
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

        clients.sync()
        start = time.monotonic()
        threads = start_workers(worker, nluns, stop, errors)
        while any(th.is_alive() for th in threads):
            elapsed = time.monotonic() - start
            if elapsed >= opts.duration:
                stop.set()
            join_some(threads, 0.05)
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
        clients.sync()          # the storms start together; io_row syncs again
        stop = threading.Event()
        lock = threading.Lock()
        resizes = Side()
        errors = []

        def stormer(i):
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
            with lock:                      # 8 stormers add to one Side
                resizes.ops += n
                resizes.hist.merge(hist)

        start = time.monotonic()
        threads = start_workers(stormer, nluns, stop, errors)
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
    if opts.clients:
        return clients.run_clients(opts, progress, log)
    try:
        rows = WORKLOADS[opts.workload](opts, progress, log)
        if rows is not log.rows:
            log.rows[:] = rows
        return log.rows
    finally:
        progress.clear()
