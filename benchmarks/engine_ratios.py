#!/usr/bin/env python3
"""Issue 9's targets (the asynchronous I/O engine), each as a ratio against a
baseline measured side by side in the same run.

    python3 benchmarks/engine_ratios.py [--quick] [--json out.json]

Two groups of interleaved rounds (round r runs the group's sides rotated by r
places, so every side goes first equally often and a burst of load from
another process hits every side of the same round); every row reports the
median of its per-round ratios and their spread (min..max):

* O_DIRECT, 4 KiB random reads, 64 in flight, on a 1 GiB file of random data
  on the machine's disk (``--file``, default /var/tmp/cxlflash-engine-bench.img,
  created once; refused on tmpfs): fio's io_uring engine (the baseline), then
  ``listio(..., qd=64)``, 64 outstanding ``areadinto`` futures, 64 asyncio
  tasks awaiting ``readinto_async``, and ``listio`` on an adapter forced to
  the thread-pool engine (against the io_uring engine's ``listio``).  Each
  side runs for ``--duration`` seconds per round; figures are IOPS.
* Page cache (a vLUN on a page-cached file), depth 1: ``aread(...).result()``
  and ``await read_async`` against ``vlun.readinto``; ``listio`` of 64 x 4 KiB
  against ``raw_io`` (a GIL-free C pread loop) on the same offsets.

fio is required (``apt-get install -y fio``): without it the script stops
with an error rather than skipping the O_DIRECT targets.  The exit status is
1 when a target is missed or cannot be measured, 2 when the setup is wrong.
See benchmarks/README.md.
"""
import argparse
import asyncio
import collections
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import cxlflash  # noqa: E402
from cxlflash._core.rawio import raw_io  # noqa: E402
from cxlflash.bench.harness import interleaved_round  # noqa: E402

BS = 4096
QD = 64
FILE_SIZE = 1 << 30
DEFAULT_FILE = "/var/tmp/cxlflash-engine-bench.img"
MASK = (1 << 20) - 1     # the pre-generated LBAs, cycled
LIST_BATCH = 4096          # requests per listio call in the O_DIRECT rows (qd=64 in flight)
N_DEPTH1 = 2048            # depth-1 requests per round (page cache)
PC_BLOCKS = 8192           # page-cached blocks the page-cache rows read (32 MiB)
PC_LIST_CALLS = 256        # listio calls of 64 per round (page cache)
QEMU_STEP_BLOCKS = 104729  # qemu-img bench stride (a prime: visits every block)


class SetupError(Exception):
    """The benchmark cannot run as asked (exit status 2)."""


# -- the file ---------------------------------------------------------------------------


def fstype(path):
    """The filesystem type of the mount holding ``path`` (/proc/self/mountinfo)."""
    path = os.path.realpath(path)
    best, kind = "", None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mnt = left.split()[4].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, right.split()[0]
    return kind


def ensure_file(path, size, log):
    """A ``size``-byte file of random data at ``path`` on a disk filesystem
    (created once: an existing file of the right size is reused)."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise SetupError(f"directory {d!r} of --file does not exist")
    kind = fstype(d)
    if kind in ("tmpfs", "ramfs", "devtmpfs"):
        raise SetupError(f"{d!r} is on {kind}: the O_DIRECT targets need a file on the "
                         f"machine's disk (give --file on a disk filesystem, see `df`)")
    if os.path.exists(path) and os.path.getsize(path) == size:
        return kind
    log(f"creating {path} ({size >> 20} MiB of random data, once)")
    tmp = path + ".part"
    rng = np.random.default_rng()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        step = 16 << 20
        for off in range(0, size, step):
            os.pwrite(fd, rng.bytes(min(step, size - off)), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    return kind


# -- peers: fio and qemu-img ----------------------------------------------------------------


def fio_command(path, depth, duration):
    return ["fio", "--name=randread", f"--filename={path}", "--ioengine=io_uring",
            f"--iodepth={depth}", "--direct=1", "--rw=randread", "--bs=4k",
            "--norandommap", "--randrepeat=0", "--time_based",
            f"--runtime={int(duration * 1000)}ms", "--output-format=json"]


def need_fio(path):
    """fio with its io_uring engine, or a SetupError saying what to install."""
    if shutil.which("fio") is None:
        raise SetupError("fio is not installed: the O_DIRECT targets are ratios against "
                         "`fio --ioengine=io_uring --iodepth=64`; install it "
                         "(`apt-get install -y fio`) and run again")
    run_fio(path, 1, 0.1)          # io_uring usable here, the file readable


def run_fio(path, depth, duration):
    cmd = fio_command(path, depth, duration)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SetupError(f"fio failed (exit {p.returncode}): {' '.join(cmd)}\n"
                         f"{p.stderr.strip() or p.stdout.strip()}")
    out = p.stdout[p.stdout.index("{"):]          # fio may print notes first
    job = json.loads(out)["jobs"][0]
    if job.get("error"):
        raise SetupError(f"fio reported error {job['error']}: {' '.join(cmd)}")
    return job["read"]["iops"]


def qemu_command(path, depth, count):
    return ["qemu-img", "bench", "-f", "raw", "-t", "none", "-i", "io_uring", "-d", str(depth),
            "-c", str(count), "-s", "4096", "-S", str(QEMU_STEP_BLOCKS * BS), path]


def run_qemu(path, depth, count):
    cmd = qemu_command(path, depth, count)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    # "Run completed in 1.034 seconds."
    secs = float(p.stdout.split("Run completed in ")[1].split()[0])
    return count / secs


# -- our side -------------------------------------------------------------------------------


def engine_kind(adapter):
    """Which engine an adapter's asynchronous I/O runs on."""
    eng = getattr(adapter, "engine", None)
    if eng is None:
        return "executor (no engine)"
    return getattr(eng, "kind", str(eng))


def engine_info():
    try:
        from cxlflash._core.engine import engine_info as info
    except ImportError:
        return None
    return info()


def make_adapter(engine=None):
    """An Adapter, forced to ``engine`` when given; None if this build has no
    engine choice."""
    if engine is None:
        return cxlflash.Adapter()
    try:
        return cxlflash.Adapter(engine=engine)
    except TypeError:
        return None


class ListIO:
    """``lun.listio`` with a queue depth, or without one before the engine
    (then it is the serial pread loop: qd 1)."""

    def __init__(self, lun):
        self.lun = lun
        ops = np.full(1, cxlflash.LIST_READ, dtype=np.uint8)
        buf = cxlflash.aligned_buffer(BS)
        try:
            lun.listio(ops, np.zeros(1, np.uint64), np.ones(1, np.uint64), buf, qd=QD).check()
            self.has_qd = True
        except TypeError:
            self.has_qd = False
            lun.listio(ops, np.zeros(1, np.uint64), np.ones(1, np.uint64), buf).check()

    def __call__(self, ops, lbas, nb, buf, offsets=None):
        if self.has_qd:
            return self.lun.listio(ops, lbas, nb, buf, offsets, qd=QD)
        return self.lun.listio(ops, lbas, nb, buf, offsets)

    def describe(self):
        kind = engine_kind(self.lun.adapter)
        return kind if self.has_qd else "serial pread (no qd)"


class DirectSides:
    """The O_DIRECT sides: 4 KiB random reads over the whole file, 64 in flight."""

    def __init__(self, path, duration, rng):
        self.path = path
        self.duration = duration
        self.adapters = []
        self.lun = self._open(None)
        self.blocks = self.lun.size
        self.lbas = rng.integers(0, self.blocks, MASK + 1, dtype=np.uint64)
        self.lba_list = self.lbas.tolist()
        self.offs = self.lbas * np.uint64(BS)
        self.fd = self.lun.adapter.driver.gluns[self.lun.disk.wwid].backing.fd
        self.pos = 0
        self.listio = ListIO(self.lun)
        self.ops = np.full(LIST_BATCH, cxlflash.LIST_READ, dtype=np.uint8)
        self.nb = np.ones(LIST_BATCH, dtype=np.uint64)
        self.buf = cxlflash.aligned_buffer(LIST_BATCH * BS)
        self.slots = [memoryview(self.buf)[i * BS:(i + 1) * BS] for i in range(QD)]
        self.check()
        tl = make_adapter("threads")
        if tl is None:
            self.threads_lun = None
            self.threads_missing = "Adapter(engine=...) does not exist in this build"
        else:
            self.adapters.append(tl)
            self.threads_lun = self._open(tl)
            self.threads_listio = ListIO(self.threads_lun)
            self.threads_missing = None
        self.loop = asyncio.new_event_loop()

    def _open(self, adapter):
        a = adapter or cxlflash.Adapter()
        if adapter is None:
            self.adapters.append(a)
        wwid = a.add_lun(self.path, direct=True)
        ctx = a.open_disk(wwid).attach()
        return ctx.open_direct()

    def check(self):
        """listio reads what the file holds (one batch, against os.pread)."""
        lbas = self.lbas[:LIST_BATCH]
        self.listio(self.ops, lbas, self.nb, self.buf).check()
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for i in (0, 1, LIST_BATCH // 2, LIST_BATCH - 1):
                want = os.pread(fd, BS, int(lbas[i]) * BS)
                if bytes(self.buf[i * BS:(i + 1) * BS]) != want:
                    raise SetupError(f"listio read the wrong data for LBA {int(lbas[i])}")
        finally:
            os.close(fd)

    def _next(self, n):
        if self.pos + n > len(self.lbas):
            self.pos = 0
        p = self.pos
        self.pos += n
        return p

    def listio_side(self, listio):
        end = time.perf_counter() + self.duration
        n = 0
        t0 = time.perf_counter()
        while True:
            p = self._next(LIST_BATCH)
            listio(self.ops, self.lbas[p:p + LIST_BATCH], self.nb, self.buf)
            n += LIST_BATCH
            t = time.perf_counter()
            if t >= end:
                return n / (t - t0)

    def raw_listio_side(self):
        """``Engine.raw_listio`` on the bare fd (no translation), 4096 per call."""
        eng = self.lun.adapter.engine
        fd = self.fd
        end = time.perf_counter() + self.duration
        n = 0
        t0 = time.perf_counter()
        while True:
            p = self._next(LIST_BATCH)
            eng.raw_listio(fd, self.ops, self.offs[p:p + LIST_BATCH], BS, self.buf, qd=QD)
            n += LIST_BATCH
            t = time.perf_counter()
            if t >= end:
                return n / (t - t0)

    def listio64_side(self):
        """64 requests per call (each call drains its queue: info)."""
        end = time.perf_counter() + self.duration
        ops, nb = self.ops[:QD], self.nb[:QD]
        n = 0
        t0 = time.perf_counter()
        while True:
            p = self._next(QD)
            self.listio(ops, self.lbas[p:p + QD], nb, self.buf)
            n += QD
            t = time.perf_counter()
            if t >= end:
                return n / (t - t0)

    def futures_side(self):
        """64 outstanding areadinto futures, the oldest waited for first."""
        lun, slots, lbas = self.lun, self.slots, self.lba_list
        p = self._next(1 << 19)
        q = collections.deque()
        t0 = time.perf_counter()
        end = t0 + self.duration
        for i in range(QD):
            q.append((lun.areadinto(lbas[p], slots[i]), i))
            p = (p + 1) & MASK
        n = 0
        while True:
            f, i = q.popleft()
            f.result()
            n += 1
            if not n & 63 and time.perf_counter() >= end:
                break
            q.append((lun.areadinto(lbas[p], slots[i]), i))
            p = (p + 1) & MASK
        for f, i in q:
            f.result()
            n += 1
        return n / (time.perf_counter() - t0)

    def aread_side(self):
        """64 outstanding ``aread`` futures (a fresh bytearray each: not
        aligned for O_DIRECT unless the engine takes care of it)."""
        lun, lbas = self.lun, self.lba_list
        p = self._next(1 << 19)
        q = collections.deque()
        t0 = time.perf_counter()
        end = t0 + self.duration
        for i in range(QD):
            q.append(lun.aread(lbas[p], 1))
            p = (p + 1) & MASK
        n = 0
        while True:
            q.popleft().result()
            n += 1
            if not n & 63 and time.perf_counter() >= end:
                break
            q.append(lun.aread(lbas[p], 1))
            p = (p + 1) & MASK
        for f in q:
            f.result()
            n += 1
        return n / (time.perf_counter() - t0)

    def asyncio_side(self):
        """64 asyncio tasks, each awaiting ``readinto_async`` in turn."""
        lun = self.lun
        lbas = self.lba_list
        count = [0]
        end = [0.0]
        clock = time.perf_counter

        async def task(i):
            slot = self.slots[i]
            k = 0
            j = i
            while True:
                await lun.readinto_async(lbas[j], slot)
                j = (j + QD) & MASK
                k += 1
                if not k & 15 and clock() >= end[0]:
                    break
            count[0] += k

        async def main():
            await asyncio.gather(*(task(i) for i in range(QD)))

        t0 = clock()
        end[0] = t0 + self.duration
        self.loop.run_until_complete(main())
        return count[0] / (clock() - t0)

    def close(self):
        self.loop.close()
        for a in self.adapters:
            a.close()


class PageCacheSides:
    """A vLUN on a page-cached file: depth-1 requests and listio of 64."""

    def __init__(self, tmpdir, rng):
        self.a = cxlflash.Adapter(tmpdir)
        wwid = self.a.create_lun(4 * (1 << 16) * BS)             # sparse, 1 GiB
        self.ctx = self.a.open_disk(wwid).attach()
        self.vlun = self.ctx.create_virtual(PC_BLOCKS)
        self.fd = self.a.driver.gluns[wwid].backing.fd
        self.vlun.write(0, rng.integers(0, 256, PC_BLOCKS * BS, dtype=np.uint8))
        os.fsync(self.fd)
        self.lbas = rng.integers(0, PC_BLOCKS, N_DEPTH1, dtype=np.uint64).tolist()
        self.buf = cxlflash.aligned_buffer(BS)
        self.listio = ListIO(self.vlun)
        lbas = rng.integers(0, PC_BLOCKS, PC_LIST_CALLS * QD, dtype=np.uint64)
        self.list_lbas = lbas.reshape(PC_LIST_CALLS, QD)
        self.list_offs = (self.vlun.translate(lbas) * np.uint64(BS)).reshape(PC_LIST_CALLS, QD)
        self.list_ops = np.full(QD, cxlflash.LIST_READ, dtype=np.uint8)
        self.list_nb = np.ones(QD, dtype=np.uint64)
        self.list_bufoffs = np.arange(QD, dtype=np.uint64) * np.uint64(BS)
        self.list_buf = cxlflash.aligned_buffer(QD * BS)
        self.loop = asyncio.new_event_loop()
        self.check()

    def check(self):
        """Every side reads the same bytes."""
        v = self.vlun
        lba = self.lbas[0]
        v.readinto(lba, self.buf)
        want = bytes(self.buf)
        if bytes(v.aread(lba, 1).result()) != want:
            raise SetupError("aread read other bytes than readinto")
        if bytes(self.loop.run_until_complete(v.read_async(lba, 1))) != want:
            raise SetupError("read_async read other bytes than readinto")
        self.listio_side()
        got = bytes(self.list_buf)
        self.raw_side()
        if bytes(self.list_buf) != got:
            raise SetupError("listio read other bytes than the C pread loop")

    def readinto_side(self):
        readinto, buf = self.vlun.readinto, self.buf
        for lba in self.lbas:
            readinto(lba, buf)

    def aread_side(self):
        aread = self.vlun.aread
        for lba in self.lbas:
            aread(lba, 1).result()

    def read_async_side(self):
        read_async = self.vlun.read_async

        async def go():
            for lba in self.lbas:
                await read_async(lba, 1)
        self.loop.run_until_complete(go())

    def listio_side(self):
        listio, ops, nb, buf, bo = self.listio, self.list_ops, self.list_nb, self.list_buf, \
            self.list_bufoffs
        for lbas in self.list_lbas:
            listio(ops, lbas, nb, buf, bo)

    def raw_side(self):
        fd, ops, buf, bo = self.fd, self.list_ops, self.list_buf, self.list_bufoffs
        for offs in self.list_offs:
            raw_io(fd, ops, offs, BS, buf, bo)

    def close(self):
        self.loop.close()
        self.ctx.close()
        self.a.close()


# -- rounds and rows ------------------------------------------------------------------------


def interleave(sides, rounds, warmup, progress, measure_time):
    """Run ``sides`` ([(name, fn)]) for ``rounds`` rounds, rotated by the
    round number (``cxlflash.bench.harness.interleaved_round``, the rotation
    of ``cxlflash bench`` and conftest.py).  ``measure_time``: record each
    side's wall time (ns); otherwise record what fn returns (IOPS).  Errors
    are recorded per side (the side is then dropped from later rounds)."""
    out = {name: [] for name, _ in sides}
    errors = {}
    values = {}                     # this round's results of the sides that ran

    def guarded(name, fn):
        def call():
            if name in errors:
                return
            try:
                values[name] = fn()
            except (OSError, RuntimeError, ValueError) as e:
                errors[name] = f"{type(e).__name__}: {e}"
        return call

    fns = [guarded(name, fn) for name, fn in sides]
    for r in range(warmup + rounds):
        values.clear()

        def announce(i):
            name = sides[i][0]
            if name not in errors:
                progress(f"round {r + 1 - warmup}/{rounds} {name}")

        took = interleaved_round(fns, r, before=announce)
        if r >= warmup:
            for (name, _), dt in zip(sides, took):
                if name in values:
                    out[name].append(dt if measure_time else values[name])
    return out, errors


def spread(xs):
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def make_row(what, base_name, ours_name, data, errors, target, higher_is_better, engine,
             unit, scale=1.0, info=False, missing=None):
    """A row: per-round ratio ours/base, median and spread, vs the target.
    ``higher_is_better``: the target is a minimum ratio (IOPS), else a maximum
    (time)."""
    row = {"what": what, "baseline": base_name, "ours": ours_name, "unit": unit,
           "target": target, "higher_is_better": higher_is_better, "engine": engine,
           "info": info}
    err = missing or errors.get(ours_name) or errors.get(base_name)
    b, o = data.get(base_name, []), data.get(ours_name, [])
    if err or not b or not o:
        row.update(status="MISSING", error=err or "no rounds")
        return row
    ratios = [y / x for x, y in zip(b, o)]
    row.update(base=statistics.median(b) * scale, ours=statistics.median(o) * scale,
               base_rounds=[x * scale for x in b], ours_rounds=[y * scale for y in o],
               ratios=ratios, ratio=statistics.median(ratios), spread=spread(ratios))
    if target is None:
        row["status"] = "info"
    elif higher_is_better:
        row["status"] = "PASS" if row["ratio"] >= target else "FAIL"
    else:
        row["status"] = "PASS" if row["ratio"] <= target else "FAIL"
    return row


def fmt_fig(x, unit):
    if unit == "IOPS":
        return f"{x / 1000:.1f} k"
    return f"{x:.2f} us"


def print_rows(rows, out):
    w = max(len(r["what"]) for r in rows)
    print(f"{'what':<{w}}  {'baseline':>12}  {'ours':>12}  {'ratio [min..max]':>20}  "
          f"{'target':>8}  {'':6}  engine", file=out)
    for r in rows:
        tgt = "" if r["target"] is None else \
            (">= " if r["higher_is_better"] else "<= ") + f"{r['target']:g}x"
        if r["status"] == "MISSING":
            print(f"{r['what']:<{w}}  {'':>12}  {'':>12}  {'':>20}  {tgt:>8}  "
                  f"{'MISSING':6}  {r['engine']}: {r['error']}", file=out)
            continue
        lo, hi = r["spread"]
        ratio = f"{r['ratio']:.3f} [{lo:.2f}..{hi:.2f}]"
        status = "FAIL" if r["status"] == "FAIL" else r["status"]
        print(f"{r['what']:<{w}}  {fmt_fig(r['base'], r['unit']):>12}  "
              f"{fmt_fig(r['ours'], r['unit']):>12}  {ratio:>20}  {tgt:>8}  {status:6}  "
              f"{r['engine']}", file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer and shorter rounds (a smoke run: ~20 s)")
    ap.add_argument("--json", metavar="OUT", help="write every figure to OUT")
    ap.add_argument("--file", default=DEFAULT_FILE,
                    help=f"the O_DIRECT test file (1 GiB, created once; default {DEFAULT_FILE})")
    ap.add_argument("--rounds", type=int, help="O_DIRECT rounds (default 7, --quick 2)")
    ap.add_argument("--duration", type=float,
                    help="seconds per O_DIRECT side per round (default 0.8, --quick 0.4)")
    ap.add_argument("--pc-rounds", type=int, help="page-cache rounds (default 21, --quick 7)")
    ap.add_argument("--peers", action="store_true",
                    help="also run fio at depth 1, qemu-img bench -d 64 and aread futures "
                         "(info rows)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 7)
    duration = args.duration or (0.4 if args.quick else 0.8)
    pc_rounds = args.pc_rounds or (7 if args.quick else 21)
    tty = sys.stderr.isatty() and not args.quiet

    def progress(msg):
        if tty:
            sys.stderr.write(f"\r\x1b[K{msg}")
            sys.stderr.flush()

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr)

    t_start = time.perf_counter()
    try:
        kind = ensure_file(args.file, FILE_SIZE, log)
        need_fio(args.file)
    except SetupError as e:
        print(f"engine_ratios: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"engine_ratios: cannot create or read {args.file!r}: {e.strerror or e} "
              f"(give --file on a disk filesystem with 1 GiB free)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(9)
    info = engine_info()
    header = {"machine": platform.platform(), "cores": os.cpu_count(),
              "python": sys.version.split()[0], "cxlflash": cxlflash.__version__,
              "engine_info": info, "file": args.file, "fstype": kind,
              "rounds": rounds, "duration": duration, "pc_rounds": pc_rounds,
              "loadavg": " ".join(open("/proc/loadavg").read().split()[:3]),
              "fio": subprocess.run(["fio", "--version"], capture_output=True,
                                    text=True).stdout.strip(),
              "fio_command": " ".join(fio_command(args.file, QD, duration))}
    print(f"# {header['machine']}, {header['cores']} cores, python {header['python']}, "
          f"{header['fio']}")
    print(f"# engine_info: {info if info is not None else 'no engine module in this build'}")
    print(f"# O_DIRECT file {args.file} ({kind}), {rounds} rounds x {duration:g} s per side; "
          f"page cache {pc_rounds} rounds; load average {header['loadavg']}")

    rows = []
    try:
        d = DirectSides(args.file, duration, rng)
    except SetupError as e:
        print(f"engine_ratios: {e}", file=sys.stderr)
        return 2
    try:
        sides = [("fio", lambda: run_fio(args.file, QD, duration)),
                 ("listio", lambda: d.listio_side(d.listio)),
                 ("futures", d.futures_side),
                 ("asyncio", d.asyncio_side)]
        if d.threads_lun is not None:
            sides.append(("listio_threads", lambda: d.listio_side(d.threads_listio)))
        if args.peers:
            sides += [("fio_qd1", lambda: run_fio(args.file, 1, duration)),
                      ("listio64", d.listio64_side),
                     ("raw_listio", d.raw_listio_side),
                      ("aread", d.aread_side)]
            if shutil.which("qemu-img"):
                count = [0]

                def qemu():
                    n = count[0] or 20000
                    iops = run_qemu(args.file, QD, n)
                    count[0] = max(1000, int(iops * duration))
                    return iops
                qemu()                                     # calibrate the count
                sides.append(("qemu", qemu))
        data, errors = interleave(sides, rounds, 1 if not args.quick else 0, progress,
                                  measure_time=False)
        io_engine = engine_kind(d.lun.adapter)
        lk = d.listio.describe()
        rows.append(make_row("4K randread O_DIRECT qd64: listio vs fio", "fio", "listio",
                             data, errors, 0.9, True, lk, "IOPS"))
        rows.append(make_row("  same: 64 areadinto futures vs fio", "fio", "futures",
                             data, errors, 0.8, True, io_engine, "IOPS"))
        rows.append(make_row("  same: 64 asyncio tasks vs fio", "fio", "asyncio",
                             data, errors, 0.7, True, io_engine, "IOPS"))
        if d.threads_lun is not None and engine_kind(d.lun.adapter) != "io_uring":
            why = (info or {}).get("reason") or f"CXLFLASH_ENGINE={os.environ.get('CXLFLASH_ENGINE')}"
            rows.append(make_row("  threads engine listio vs io_uring engine", "listio",
                                 "listio_threads", data, errors, 0.6, True, lk, "IOPS",
                                 missing=f"the default engine is {lk}, not io_uring ({why})"))
        elif d.threads_lun is not None:
            rows.append(make_row("  threads engine listio vs io_uring engine", "listio",
                                 "listio_threads", data, errors, 0.6, True,
                                 f"{d.threads_listio.describe()} vs {lk}", "IOPS"))
        else:
            rows.append(make_row("  threads engine listio vs io_uring engine", "listio",
                                 "listio_threads", data, errors, 0.6, True, "-", "IOPS",
                                 missing=d.threads_missing))
        if args.peers:
            rows.append(make_row("  peer: fio qd1 vs fio qd64", "fio", "fio_qd1", data,
                                 errors, None, True, "fio io_uring", "IOPS", info=True))
            rows.append(make_row("  peer: qemu-img bench -d 64 (strided) vs fio", "fio",
                                 "qemu", data, errors, None, True, "qemu io_uring", "IOPS",
                                 info=True))
            rows.append(make_row("  info: engine.raw_listio (bare fd) vs fio", "fio",
                                 "raw_listio", data, errors, None, True, io_engine, "IOPS",
                                 info=True))
            rows.append(make_row("  info: listio 64 per call vs fio", "fio", "listio64",
                                 data, errors, None, True, lk, "IOPS", info=True))
            rows.append(make_row("  info: 64 aread futures vs fio", "fio", "aread",
                                 data, errors, None, True, io_engine, "IOPS", info=True))
    finally:
        d.close()
        del d
        gc.collect()            # the engines' threads go with them
    progress("")

    with tempfile.TemporaryDirectory(prefix="engine-ratios-", dir="/var/tmp") as tmp:
        p = PageCacheSides(tmp, rng)
        try:
            # One interleaved pair per target: a side that leaves threads or
            # an event loop behind does not slow the next pair's sides.
            pairs = {"aread": [("readinto", p.readinto_side), ("aread", p.aread_side)],
                     "read_async": [("readinto", p.readinto_side),
                                    ("read_async", p.read_async_side)],
                     "listio": [("raw", p.raw_side), ("listio", p.listio_side)]}
            res = {k: interleave(v, pc_rounds, 2, progress, measure_time=True)
                   for k, v in pairs.items()}
            pe = engine_kind(p.a)
            us1 = 1e-3 / N_DEPTH1                         # ns per round -> us per request
            usl = 1e-3 / (PC_LIST_CALLS * QD)
            rows.append(make_row("aread(...).result() depth 1, page cache, vs readinto",
                                 "readinto", "aread", *res["aread"], 3.0, False, pe, "us/op",
                                 scale=us1))
            rows.append(make_row("await read_async depth 1, page cache, vs readinto",
                                 "readinto", "read_async", *res["read_async"], 4.0, False, pe,
                                 "us/op", scale=us1))
            rows.append(make_row("listio 64 x 4K page cache vs C pread loop", "raw", "listio",
                                 *res["listio"], 1.10, False, p.listio.describe(), "us/op",
                                 scale=usl))
        finally:
            p.close()
    progress("")

    # Units are per-request times for the page-cache rows (median of rounds).
    print_rows(rows, sys.stdout)
    elapsed = time.perf_counter() - t_start
    end_load = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"# {elapsed:.0f} s; load average at the end {end_load} (other processes move "
          f"the ratios: see the spread)")
    failed = [r for r in rows if not r["info"] and r["status"] in ("FAIL", "MISSING")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "elapsed_s": elapsed}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
