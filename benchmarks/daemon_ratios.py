#!/usr/bin/env python3
"""Issue 10's targets (``cxlflash serve``, the shared driver), measured in one
run, each side by side with its baseline where it has one.

    python3 benchmarks/daemon_ratios.py [--quick] [--json out.json] [--socket PATH]

* 4 KiB random reads (``vlun.readinto`` in a Python loop, depth 1) from a
  client connected to a daemon against the same loop on an embedded
  ``cxlflash.Adapter`` in this process: a page-cached file LUN and a memory
  LUN; target >= 0.95x the embedded throughput.  Interleaved rounds (round r
  runs the sides rotated by r places); the median of the per-round ratios.
* 2 client processes against 1, 4 KiB random reads on the page-cached file
  (each client its own vLUN, each running for the same wall-clock window);
  target: the total of 2 >= 1.7x the 1 (the processes share no GIL).
* VERIFY round trips/s from one client: a loop of raw
  ``cxlflash.ioctl(disk, DK_CXLFLASH_VERIFY, arg)``; target >= 20 000/s.
* ATTACH + DETACH pairs/s through the daemon: raw ioctls, the adapter fd
  closed after each DETACH; target >= 5 000/s.
* Reclaim: a client process holding a vLUN of 1 000 chunks is killed with
  SIGKILL; the time until the daemon has every chunk back (``status()``
  polled from this process).  Reported, no target (the issue expects well
  under 100 ms).

The daemon is ``python -m cxlflash serve`` when this tree has it (else the
stand-in of serve-api.md: a ``Server`` on a listening socket), started for
the run with its 4 GiB memory LUN; the file LUN and the 1 000-chunk LUN are
added through the admin interface (this process has the daemon's uid).
``--socket PATH`` uses a running daemon instead (same uid needed).

The exit status is 1 when a target is missed or cannot be measured, 2 when the
setup is wrong.  See benchmarks/README.md.
"""
import argparse
import errno
import json
import os
import platform
import signal
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
from cxlflash import uapi  # noqa: E402

BS = 4096
READ_BLOCKS = 8192             # the vLUN each read side reads (32 MiB, page-cached)
N_READS = 16384               # 4 KiB random reads per round and side (~10-20 ms)
FILE_CHUNKS = 4                # the page-cache file LUNs: 4 chunks of 256 MiB, sparse
RECLAIM_CHUNKS = 1000
RECLAIM_BLOCK = 512            # 512-byte blocks: 32 MiB chunks, a 32 GiB sparse memfd
CHUNK_BLOCKS = 65536           # blocks per chunk (any block size)
STARTUP_TIMEOUT = 20.0


class SetupError(Exception):
    """The benchmark cannot run as asked (exit status 2)."""


# -- the daemon -----------------------------------------------------------------------------

STANDIN = (
    "import socket, sys, cxlflash\n"
    "from cxlflash.server.service import Server\n"
    "a = cxlflash.Adapter()\n"
    "a.add_lun(None, size=4 << 30)\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.bind(sys.argv[1])\n"
    "s.listen(64)\n"
    "Server(a, s).serve_forever()\n")


def has_serve():
    """True when this tree's CLI has ``serve``."""
    import importlib.util
    return importlib.util.find_spec("cxlflash.server.daemon") is not None


class Daemon:
    """A daemon started for the run, its log in a file; stopped by close()."""

    def __init__(self, tmpdir):
        self.socket = os.path.join(tmpdir, "cxlflash.sock")
        self.log_path = os.path.join(tmpdir, "daemon.log")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if has_serve():
            self.kind = "cxlflash serve"
            cmd = [sys.executable, "-m", "cxlflash", "serve", "--socket", self.socket,
                   "--exit-with-parent"]
        else:
            self.kind = "stand-in Server (no cxlflash serve in this tree)"
            cmd = [sys.executable, "-c", STANDIN, self.socket]
        self.command = cmd
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, env=env, cwd=ROOT)
        end = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise SetupError(f"the daemon exited with {self.proc.returncode} at start: "
                                 f"{' '.join(cmd)}\n{self.log()}")
            if os.path.exists(self.socket):
                try:
                    cxlflash.connect(self.socket).close()
                    break
                except OSError:
                    pass
            if time.monotonic() > end:
                self.close()
                raise SetupError(f"the daemon did not answer within {STARTUP_TIMEOUT:g} s: "
                                 f"{' '.join(cmd)}\n{self.log()}")
            time.sleep(0.02)
        self.pid = self.proc.pid

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- the client worker (a separate process) ------------------------------------------------


def worker(sock, wwid_hex, mode):
    """A client process, driven by lines on stdin.

    mode "read": a vLUN of READ_BLOCKS on LUN wwid, written with random data;
    prints "ready"; then each "run SECONDS" line runs 4 KiB random
    ``readinto`` for that long and prints "COUNT ELAPSED".
    mode "hold": a vLUN of RECLAIM_CHUNKS chunks (scrub=False, the ioctl's
    default); prints "held CONTEXT_ID" and waits (to be killed).
    """
    if mode == "spin":
        return spin_worker()
    a = cxlflash.connect(sock)
    disk = a.open_disk(bytes.fromhex(wwid_hex))
    ctx = disk.attach()
    out = sys.stdout
    if mode == "hold":
        ctx.create_virtual(RECLAIM_CHUNKS * CHUNK_BLOCKS, scrub=False)
        print(f"held {ctx.context_id:#x}", file=out, flush=True)
        sys.stdin.read()
        return 0
    rng = np.random.default_rng(os.getpid())
    v = ctx.create_virtual(READ_BLOCKS)
    v.write(0, rng.integers(0, 256, READ_BLOCKS * BS, dtype=np.uint8))
    lbas = rng.integers(0, READ_BLOCKS, 1 << 16, dtype=np.uint64).tolist()
    buf = cxlflash.aligned_buffer(BS)
    readinto = v.readinto
    print("ready", file=out, flush=True)
    clock = time.perf_counter
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] != "run":
            break
        secs = float(cmd[1])
        n = 0
        t0 = clock()
        end = t0 + secs
        while True:
            for lba in lbas[(n & 0xFFFF):(n & 0xFFFF) + 256]:
                readinto(lba, buf)
            n += 256
            t = clock()
            if t >= end:
                break
        print(f"{n} {t - t0}", file=out, flush=True)
    v.close()
    ctx.close()
    a.close()
    return 0


def spin_worker():
    """The machine's share for a second process: a CPU-bound Python loop
    (no I/O, no daemon), driven like a read client."""
    print("ready", flush=True)
    clock = time.perf_counter
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] != "run":
            break
        n = 0
        t0 = clock()
        end = t0 + float(cmd[1])
        while True:
            for _ in range(256):
                pass
            n += 256
            t = clock()
            if t >= end:
                break
        print(f"{n} {t - t0}", flush=True)
    return 0


class Worker:
    def __init__(self, sock, wwid, mode):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", sock, wwid.hex(), mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        self.first = self.proc.stdout.readline()
        if not self.first:
            self.proc.wait()
            raise SetupError(f"a {mode} client exited with {self.proc.returncode} at start")

    def start(self, secs):
        self.proc.stdin.write(f"run {secs}\n")
        self.proc.stdin.flush()

    def result(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a client exited with {self.proc.wait()}")
        n, dt = line.split()
        return int(n) / float(dt)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the sides ------------------------------------------------------------------------------


class ReadSide:
    """4 KiB random ``vlun.readinto`` on LUN ``wwid`` of ``adapter``, a
    vLUN of READ_BLOCKS written with random data first."""

    def __init__(self, adapter, wwid, rng):
        self.ctx = adapter.open_disk(wwid).attach()
        self.vlun = self.ctx.create_virtual(READ_BLOCKS)
        self.data = rng.integers(0, 256, READ_BLOCKS * BS, dtype=np.uint8)
        self.vlun.write(0, self.data)
        self.lbas = rng.integers(0, READ_BLOCKS, N_READS, dtype=np.uint64).tolist()
        self.buf = cxlflash.aligned_buffer(BS)
        for lba in self.lbas[:8]:
            self.vlun.readinto(lba, self.buf)
            if bytes(self.buf) != self.data[lba * BS:(lba + 1) * BS].tobytes():
                raise SetupError(f"readinto of LBA {lba} read other bytes than were written")

    def __call__(self):
        readinto, buf = self.vlun.readinto, self.buf
        t0 = time.perf_counter()
        for lba in self.lbas:
            readinto(lba, buf)
        return len(self.lbas) / (time.perf_counter() - t0)

    def close(self):
        self.vlun.close()
        self.ctx.close()


def interleave(sides, rounds, warmup, progress):
    """``sides`` [(name, fn)], each fn returning a rate; rotated by the round."""
    out = {name: [] for name, _ in sides}
    errors = {}
    for r in range(warmup + rounds):
        k = r % len(sides)
        for name, fn in sides[k:] + sides[:k]:
            if name in errors:
                continue
            progress(f"round {r + 1 - warmup}/{rounds} {name}")
            try:
                v = fn()
            except (OSError, RuntimeError, ValueError) as e:
                errors[name] = f"{type(e).__name__}: {e}"
                continue
            if r >= warmup:
                out[name].append(v)
    return out, errors


def rate_loop(fn, duration, rounds, progress, name):
    """Run ``fn(n)`` (n operations) for ``duration`` s per round; ops/s per round."""
    fn(64)                                          # warm up
    per = 256
    out = []
    for r in range(rounds):
        progress(f"round {r + 1}/{rounds} {name}")
        n = 0
        t0 = time.perf_counter()
        end = t0 + duration
        while True:
            fn(per)
            n += per
            t = time.perf_counter()
            if t >= end:
                break
        out.append(n / (t - t0))
    return out


def verify_loop(disk, context_id, handle):
    verify, arg, req = cxlflash.ioctl, uapi.dk_cxlflash_verify(), uapi.DK_CXLFLASH_VERIFY
    arg.context_id = context_id
    arg.rsrc_handle = handle

    def run(n):
        for _ in range(n):
            verify(disk, req, arg)
    return run


def attach_detach_loop(disk):
    ioctl, close = cxlflash.ioctl, os.close
    att_req, det_req = uapi.DK_CXLFLASH_ATTACH, uapi.DK_CXLFLASH_DETACH
    attach, detach = uapi.dk_cxlflash_attach, uapi.dk_cxlflash_detach
    rdwr = os.O_RDWR

    def run(n):
        for _ in range(n):
            att, det = attach(), detach()      # what a C program memsets
            att.hdr.flags = rdwr
            ioctl(disk, att_req, att)
            det.context_id = att.context_id
            ioctl(disk, det_req, det)
            close(att.adap_fd)
    return run


class one_cpu:
    """Pin this process and every thread of process ``pid`` to one CPU (the
    first this process may use) for the block; the affinities are restored
    after it."""

    def __init__(self, pid):
        self.pid = pid
        self.saved = {}

    def __enter__(self):
        cpu = min(os.sched_getaffinity(0))
        tids = [0] + [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]
        for tid in tids:
            self.saved[tid] = os.sched_getaffinity(tid)
        for tid in tids:
            os.sched_setaffinity(tid, {cpu})
        return self

    def __exit__(self, *exc):
        for tid, cpus in self.saved.items():
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:             # a thread that ended meanwhile
                pass


def lun_info(adapter, wwid):
    for lun in adapter.status()["luns"]:
        if lun["wwid"] == wwid.hex():
            return lun
    raise RuntimeError(f"LUN {wwid.hex()} is not in the daemon's status")


def chunks_free(adapter, wwid):
    lun = lun_info(adapter, wwid)
    return lun["chunks_free"], lun["chunks_total"]


def reclaim_once(sock, adapter, wwid, timeout=10.0):
    """ms from SIGKILL of a client holding RECLAIM_CHUNKS chunks until the
    daemon's status shows them free again; the polls it took; how many of
    them failed (EINVAL: status() raced the release path -- a driver bug
    this benchmark found, see its row's "status_errors")."""
    free0, _ = chunks_free(adapter, wwid)
    w = Worker(sock, wwid, "hold")
    try:
        if not w.first.startswith("held"):
            raise RuntimeError(f"the holding client said {w.first!r}")
        held = free0 - chunks_free(adapter, wwid)[0]
        if held < RECLAIM_CHUNKS:
            raise RuntimeError(f"the client holds {held} chunks, not {RECLAIM_CHUNKS}")
        t0 = time.perf_counter()
        os.kill(w.proc.pid, signal.SIGKILL)
        polls = failed = 0
        while True:
            polls += 1
            try:
                free, _ = chunks_free(adapter, wwid)
            except cxlflash.CxlFlashError as e:
                if e.errno != errno.EINVAL:
                    raise
                failed += 1
                free = None
            t = time.perf_counter()
            if free == free0:
                break
            if t - t0 > timeout:
                raise RuntimeError(f"{free0 - free} chunks still held {timeout:g} s "
                                   f"after the kill")
        return (t - t0) * 1e3, polls, failed
    finally:
        w.proc.kill()
        w.proc.wait()


# -- rows -----------------------------------------------------------------------------------


def spread(xs):
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def ratio_row(what, base, ours, data, errors, target, unit="IOPS"):
    row = {"what": what, "kind": "ratio", "baseline": base, "ours": ours, "unit": unit,
           "target": target}
    err = errors.get(ours) or errors.get(base)
    b, o = data.get(base, []), data.get(ours, [])
    if err or not b or not o:
        row.update(status="MISSING", error=err or "no rounds")
        return row
    ratios = [y / x for x, y in zip(b, o)]
    row.update(base=statistics.median(b), value=statistics.median(o), base_rounds=b,
               rounds=o, ratios=ratios, ratio=statistics.median(ratios),
               spread=spread(ratios))
    if target is None:
        row["status"] = "info"
    else:
        row["status"] = "PASS" if row["ratio"] >= target else "FAIL"
    return row


def rate_row(what, values, target, unit, error=None, lower_is_better=False):
    row = {"what": what, "kind": "absolute", "unit": unit, "target": target}
    if error or not values:
        row.update(status="MISSING", error=error or "no rounds")
        return row
    row.update(value=statistics.median(values), rounds=values, spread=spread(values))
    if target is None:
        row["status"] = "info"
    elif lower_is_better:
        row["status"] = "PASS" if row["value"] <= target else "FAIL"
    else:
        row["status"] = "PASS" if row["value"] >= target else "FAIL"
    return row


def fmt(x, unit):
    if unit == "/s":
        return f"{x / 1000:.1f} k/s"
    if unit == "IOPS":
        return f"{x / 1000:.1f} k"
    if unit == "loops/s":
        return f"{x / 1e6:.1f} M"
    return f"{x:.1f} {unit}"


def print_rows(rows, out):
    w = max(len(r["what"]) for r in rows)
    print(f"{'what':<{w}}  {'baseline':>10}  {'measured':>10}  {'ratio [min..max]':>20}  "
          f"{'target':>10}  status", file=out)
    for r in rows:
        if r["kind"] == "ratio" and r["target"] is not None:
            tgt = f">= {r['target']:g}x"
        elif r["target"] is None:
            tgt = "-"
        else:
            tgt = f">= {fmt(r['target'], r['unit'])}"
        if r["status"] == "MISSING":
            print(f"{r['what']:<{w}}  {'':>10}  {'':>10}  {'':>20}  {tgt:>10}  MISSING: "
                  f"{r['error']}", file=out)
            continue
        lo, hi = r["spread"]
        if r["kind"] == "ratio":
            base = fmt(r["base"], r["unit"])
            ratio = f"{r['ratio']:.3f} [{lo:.2f}..{hi:.2f}]"
        else:
            base = "-"
            ratio = f"[{fmt(lo, r['unit'])}..{fmt(hi, r['unit'])}]"
        print(f"{r['what']:<{w}}  {base:>10}  {fmt(r['value'], r['unit']):>10}  "
              f"{ratio:>20}  {tgt:>10}  {r['status']}", file=out)


# -- main -----------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run: ~15 s)")
    ap.add_argument("--json", metavar="OUT", help="write every figure to OUT")
    ap.add_argument("--socket", metavar="PATH",
                    help="use the daemon at PATH (same uid: LUNs are added) instead of "
                         "starting one")
    ap.add_argument("--rounds", type=int, help="rounds per comparison (default 15, --quick 3)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    ap.add_argument("--worker", nargs=3, metavar=("SOCKET", "WWID", "MODE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    rounds = args.rounds or (3 if args.quick else 15)
    duration = 0.15 if args.quick else 0.3          # per client-process round / rate round
    reclaims = 2 if args.quick else 5
    tty = sys.stderr.isatty() and not args.quiet

    def progress(msg):
        if tty:
            sys.stderr.write(f"\r\x1b[K{msg}")
            sys.stderr.flush()

    t_start = time.perf_counter()
    rng = np.random.default_rng(10)
    rows = []
    daemon = None
    workers = []
    closers = []
    with tempfile.TemporaryDirectory(prefix="daemon-ratios-", dir="/var/tmp") as tmp:
        try:
            if args.socket:
                sock, kind = args.socket, "running daemon"
            else:
                daemon = Daemon(tmp)
                sock, kind = daemon.socket, daemon.kind
            client = cxlflash.connect(sock)
            closers.append(client.close)
            luns = client.luns()
            if not luns:
                raise SetupError("the daemon has no LUN")
            d_mem = luns[0]                 # the memory LUN of a daemon started without --lun
            files = {}
            for side in ("embedded", "daemon"):
                path = os.path.join(tmp, f"{side}.lun")
                with open(path, "wb") as f:
                    f.truncate(FILE_CHUNKS * CHUNK_BLOCKS * BS)
                files[side] = path
            try:
                d_file = client.add_lun(files["daemon"])
                d_big = client.add_lun(None, size=(RECLAIM_CHUNKS + 1) * CHUNK_BLOCKS
                                       * RECLAIM_BLOCK, block_size=RECLAIM_BLOCK)
            except OSError as e:
                raise SetupError(f"cannot add LUNs to the daemon (an administrator's "
                                 f"operation: run as the daemon's user): {e}") from None
            # A vLUN held for the whole run keeps the LUN in virtual mode, so
            # its allocator (and status()'s chunks_free) lives between kills.
            c = client.open_disk(d_big).attach()
            closers.append(c.close)
            closers.append(c.create_virtual(1).close)
            emb = cxlflash.Adapter()
            closers.append(emb.close)
            e_file = emb.add_lun(files["embedded"])
            e_mem = emb.add_lun(None, size=4 << 30)     # as big as the daemon's (sparse)
            header = {"machine": platform.platform(), "cores": os.cpu_count(),
                      "python": sys.version.split()[0], "daemon": kind,
                      "daemon_command": daemon.command if daemon else None,
                      "rounds": rounds, "duration": duration,
                      "loadavg": " ".join(open("/proc/loadavg").read().split()[:3])}
            print(f"# {header['machine']}, {header['cores']} cores, python "
                  f"{header['python']}; daemon: {kind}")
            print(f"# {rounds} rounds per comparison; load average {header['loadavg']}")

            # 1. connected vs embedded, 4 KiB random readinto
            sides = []
            for name, ad, w in (("embedded file", emb, e_file), ("connected file", client, d_file),
                                ("embedded memory", emb, e_mem),
                                ("connected memory", client, d_mem)):
                s = ReadSide(ad, w, rng)
                closers.append(s.close)
                sides.append((name, s))
            data, errors = interleave(sides, rounds, 1, progress)
            rows.append(ratio_row("4K randread, page-cached file: connected vs embedded",
                                  "embedded file", "connected file", data, errors, 0.95))
            rows.append(ratio_row("4K randread, memory LUN: connected vs embedded",
                                  "embedded memory", "connected memory", data, errors, 0.95))

            # 2. two client processes vs one
            # (and, in the same rounds, 2 CPU-bound processes vs 1: what the
            # machine gives a second process now -- other load takes a core)
            for mode in ("read", "read", "spin", "spin"):
                w = Worker(sock, d_file, mode)
                workers.append(w)
                if w.first.strip() != "ready":
                    raise SetupError(f"a {mode} client said {w.first!r}")

            def together(ws):
                for w in ws:
                    w.start(duration)
                return sum(w.result() for w in ws)
            data, errors = interleave([("1 client", lambda: together(workers[:1])),
                                       ("2 clients", lambda: together(workers[:2])),
                                       ("1 spinner", lambda: together(workers[2:3])),
                                       ("2 spinners", lambda: together(workers[2:4]))],
                                      rounds, 1, progress)
            rows.append(ratio_row("4K randread, page cache: 2 client processes vs 1 (total)",
                                  "1 client", "2 clients", data, errors, 1.7))
            rows.append(ratio_row("  machine now: 2 CPU-bound processes vs 1 (info)",
                                  "1 spinner", "2 spinners", data, errors, None,
                                  unit="loops/s"))
            for w in workers:
                w.close()
            workers.clear()

            # 3. VERIFY and ATTACH + DETACH through the daemon
            disk = client.open_disk(d_mem)
            ctx = disk.attach()
            closers.append(ctx.close)
            v = ctx.create_virtual(16)
            closers.append(v.close)
            n_rate = max(3, rounds // 2)
            try:
                r = rate_loop(verify_loop(disk, ctx.context_id, v.handle), duration,
                              n_rate, progress, "VERIFY")
                rows.append(rate_row("VERIFY round trips, one client", r, 20000, "/s"))
            except OSError as e:
                rows.append(rate_row("VERIFY round trips, one client", [], 20000, "/s",
                                     error=str(e)))
            try:
                r = rate_loop(attach_detach_loop(disk), duration, n_rate, progress,
                              "ATTACH+DETACH")
                rows.append(rate_row("ATTACH + DETACH pairs, one client", r, 5000, "/s"))
            except OSError as e:
                rows.append(rate_row("ATTACH + DETACH pairs, one client", [], 5000, "/s",
                                     error=str(e)))
            # The same two with this process and every daemon thread on one
            # CPU: no cross-CPU wakeup per message (info: how much of a
            # round trip is the wakeups; see benchmarks/README.md).
            try:
                with one_cpu(client.status()["pid"]):
                    r1 = rate_loop(verify_loop(disk, ctx.context_id, v.handle), duration,
                                   n_rate, progress, "VERIFY, one CPU")
                    r2 = rate_loop(attach_detach_loop(disk), duration, n_rate, progress,
                                   "ATTACH+DETACH, one CPU")
                rows.append(rate_row("  info: VERIFY, client and daemon on one CPU", r1,
                                     None, "/s"))
                rows.append(rate_row("  info: ATTACH + DETACH, client and daemon on one CPU",
                                     r2, None, "/s"))
            except OSError as e:
                rows.append(rate_row("  info: VERIFY, client and daemon on one CPU", [],
                                     None, "/s", error=str(e)))

            # 4. reclaim after kill -9
            ms = []
            polls = []
            status_errors = 0
            err = None
            for i in range(reclaims):
                progress(f"reclaim {i + 1}/{reclaims}")
                try:
                    t, p, f = reclaim_once(sock, client, d_big)
                except (OSError, RuntimeError, SetupError) as e:
                    err = f"{type(e).__name__}: {e}"
                    break
                ms.append(t)
                polls.append(p)
                status_errors += f
            row = rate_row(f"reclaim after kill -9, client holding {RECLAIM_CHUNKS} chunks",
                           ms, None, "ms", error=err)
            row["polls"] = polls
            row["status_errors"] = status_errors
            rows.append(row)
        except SetupError as e:
            progress("")
            print(f"daemon_ratios: {e}", file=sys.stderr)
            return 2
        finally:
            for w in workers:
                w.close()
            for c in reversed(closers):
                try:
                    c()
                except OSError:
                    pass
            if daemon is not None:
                daemon.close()
        progress("")

    print_rows(rows, sys.stdout)
    for r in rows:
        if r.get("status_errors"):
            print(f"# status() failed with EINVAL {r['status_errors']} times while the daemon "
                  f"released the killed client's context (it reads the context's table "
                  f"without its lock): a driver bug")
    elapsed = time.perf_counter() - t_start
    end_load = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"# {elapsed:.0f} s; load average at the end {end_load} (other processes move "
          f"the figures: see the spread)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "elapsed_s": elapsed}, f, indent=1)
    failed = [r for r in rows if r["status"] in ("FAIL", "MISSING")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
