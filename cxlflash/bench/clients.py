"""``cxlflash bench --clients N``: N client processes run the same workload at
once against one daemon, each on its own connection, context and virtual
LUN; each client's rows and their total are reported.

The parent starts a daemon for the run when no ``--connect`` socket is given
(``python -m cxlflash serve`` on a temporary socket, ``--exit-with-parent``,
an in-memory LUN of N x ``--size``), then N processes of ``python -m
cxlflash.bench.clients`` with the options as JSON and two pipes each.  Before
each row (and before the core rows of the matrix) a client writes one byte
to its "ready" pipe and waits for one on its "go" pipe: :func:`sync`.  The
parent answers once every live client is ready, so the rows of all clients
run over the same wall-clock window (each row is a fixed duration) and the
total of their rates is what the daemon's clients got together.  A client
that ends (or dies) closes its ready pipe and drops out of the barrier.

Each client runs with its own seed (``--seed`` + its index), verifies its own
writes, and runs no fio (fio after a row would overlap another client's next
row).
"""
import json
import math
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace

from .options import BenchError, Options
from .results import HIST_STEPS, Row, Side

_go = None                  # (go fd, ready fd) in a client process of a --clients run

STARTUP_TIMEOUT = 30.0
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sync():
    """In a client process of a ``--clients`` run: say this client is ready
    for the next row and wait until every client is.  Elsewhere: nothing."""
    if _go is None:
        return
    go, ready = _go
    os.write(ready, b"r")
    if os.read(go, 1) != b"g":
        raise BenchError("the --clients run that started this client is gone")


# -- the parent ---------------------------------------------------------------------------


def _environment():
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
    env["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class _Daemon:
    """``cxlflash serve`` for the run: an in-memory LUN of ``size`` bytes."""

    def __init__(self, tmp, size, log):
        from ..adapter import connect
        self.socket = os.path.join(tmp, "cxlflash.sock")
        self.log_path = os.path.join(tmp, "daemon.log")
        cmd = [sys.executable, "-m", "cxlflash", "serve", "--socket", self.socket,
               "--size", str(size), "--exit-with-parent"]
        with open(self.log_path, "w") as f:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                         env=_environment())
        end = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the daemon for the run exited with "
                                 f"{self.proc.returncode}: {self.tail()}")
            if os.path.exists(self.socket):
                try:
                    connect(self.socket).close()
                    break
                except OSError:
                    pass
            if time.monotonic() > end:
                self.stop()
                raise BenchError(f"the daemon for the run did not answer within "
                                 f"{STARTUP_TIMEOUT:g} s: {self.tail()}")
            time.sleep(0.02)
        log.say(f"started a daemon for the run: pid {self.proc.pid}, in-memory LUN of "
                f"{size >> 20} MiB, socket {self.socket}")

    def tail(self):
        with open(self.log_path) as f:
            lines = f.read().strip().splitlines()
        return " / ".join(lines[-3:]) or "(no log)"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Client:
    """One client process and its two pipes."""

    def __init__(self, index, opts, tmp):
        self.index = index
        self.out_json = os.path.join(tmp, f"client-{index}.json")
        self.out_text = os.path.join(tmp, f"client-{index}.txt")
        go_r, self.go_w = os.pipe2(os.O_CLOEXEC)
        self.ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        doc = json.dumps(asdict(opts))
        try:
            with open(self.out_text, "w") as f:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "cxlflash.bench.clients", doc, str(go_r),
                     str(ready_w), self.out_json],
                    stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                    pass_fds=(go_r, ready_w), env=_environment())
        finally:
            os.close(go_r)
            os.close(ready_w)
        self.pid = self.proc.pid

    def go(self):
        try:
            os.write(self.go_w, b"g")
        except BrokenPipeError:
            pass                       # it died meanwhile: its result says so

    def output(self):
        with open(self.out_text) as f:
            return f.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.go_w, self.ready_r):
            try:
                os.close(fd)
            except OSError:
                pass


def _barrier(clients, progress, n):
    """Let the clients through their sync points together until every one
    has ended (closed its ready pipe)."""
    live = {c.ready_r: c for c in clients}
    step = 0
    t0 = time.monotonic()
    while live:
        waiting = dict(live)
        ready = []
        while waiting:
            r, _, _ = select.select(list(waiting), [], [], 0.1)
            progress.update(f"{n} clients, step {step}", time.monotonic() - t0, 0, 0,
                            unit="")
            for fd in r:
                c = waiting.pop(fd)
                if os.read(fd, 1):
                    ready.append(c)
                else:
                    del live[fd]                       # ended, or died
        for c in ready:
            c.go()
        step += 1


def _side(d):
    if d is None:
        return None
    s = Side(ops=d["ops"], seconds=d["seconds"],
             nbytes=int(round(d["bytes_per_s"] * d["seconds"])), errors=d["errors"])
    for value, count in d["histogram"]:          # bin midpoints: back to their bins
        i = min(int(math.log2(max(value, 1.0)) * HIST_STEPS), len(s.hist.counts) - 1)
        s.hist.counts[i] += count
    s.timeline = [tuple(x) for x in d["timeline"]]
    return s


def row_from_dict(d):
    """A Row back from :meth:`Row.as_dict` (a client's JSON): the sides'
    counts, bytes, errors, latency histogram and timeline."""
    r = Row(d["name"], d["unit"], _side(d["workload"]), _side(d["baseline"]),
            d["baseline_name"], d["verified"], d["failed"], d["latency_per"], d["fio"])
    return r


def _sum_sides(sides):
    sides = [s for s in sides if s is not None]
    if not sides:
        return None
    rate = sum(s.rate for s in sides)
    ops = sum(s.ops for s in sides)
    total = Side(ops=ops, seconds=ops / rate if rate else 0.0,
                 errors=sum(s.errors for s in sides))
    # bytes over the same seconds: the sum of the clients' bytes per second
    total.nbytes = int(round(sum(s.nbytes / s.seconds for s in sides if s.seconds)
                             * total.seconds))
    for s in sides:
        total.hist.merge(s.hist)
    return total


def total_rows(per_client):
    """The rows of all clients added up, row by row (by position and name):
    rates and bytes per second summed (the clients ran each row over the
    same window), latency histograms merged, errors summed; verified when
    every client verified its own writes."""
    out = []
    for rows in zip(*per_client):
        names = {r.name for r in rows}
        if len(names) != 1:
            raise BenchError(f"the clients measured different rows: {sorted(names)}")
        first = rows[0]
        t = Row(first.name, first.unit, _sum_sides([r.main for r in rows]),
                _sum_sides([r.base for r in rows]), first.base_name,
                lat_per=first.lat_per)
        if any(r.verified for r in rows):
            bad = [r.verified for r in rows if r.failed or not r.verified.startswith("ok")]
            if bad:
                t.verified = f"FAILED in {len(bad)} of {len(rows)} clients"
                t.failed = True
            else:
                blocks = sum(int(r.verified.split("(")[1].split()[0]) for r in rows)
                t.verified = f"ok ({blocks} blocks)"
        out.append(t)
    return out


def run_clients(opts, progress, log):
    """Run ``opts.clients`` client processes; the total rows.  Each client's
    rows and JSON document are in ``log.clients``: [(pid, rows, doc)]."""
    n = opts.clients
    tmp = tempfile.mkdtemp(prefix="cxlflash-bench-clients-")
    daemon = None
    clients = []
    try:
        sock = opts.connect
        if sock is None:
            daemon = _Daemon(tmp, n * opts.size, log)
            sock = daemon.socket
        for k in range(n):
            copts = replace(opts, connect=sock, clients=0, quiet=True, fio=False,
                            seed=opts.seed + k)
            clients.append(_Client(k + 1, copts, tmp))
        log.say(f"{n} client processes at once against the daemon at {sock}: pids "
                + " ".join(str(c.pid) for c in clients))
        _barrier(clients, progress, n)
        results = []
        failed = []
        for c in clients:
            rc = c.proc.wait()
            if rc != 0 or not os.path.exists(c.out_json):
                failed.append(f"client {c.index} (pid {c.pid}) exited with {rc}: "
                              + (c.output().strip().splitlines() or ["no output"])[-1])
                continue
            with open(c.out_json) as f:
                doc = json.load(f)
            results.append((c.pid, [row_from_dict(d) for d in doc["rows"]], doc))
        if failed:
            raise BenchError("; ".join(failed))
        log.clients = results
        for _, _, doc in results:          # the slowest client's time outside the rows
            for phase, secs in doc.get("phases_s", {}).items():
                log.phases[phase] = max(log.phases.get(phase, 0.0), secs)
        total = total_rows([rows for _, rows, _ in results])
        log.rows[:] = total
        return log.rows
    finally:
        for c in clients:
            c.close()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        progress.clear()


# -- a client process ----------------------------------------------------------------------


def _client_main(argv):
    """``python -m cxlflash.bench.clients OPTIONS_JSON GO_FD READY_FD OUT_JSON``"""
    global _go
    doc, go, ready, out = argv
    _go = (int(go), int(ready))
    from .progress import Progress
    from .report import to_json
    from .results import RunLog
    from .workloads import run
    opts = Options(**json.loads(doc))
    log = RunLog(out=sys.stdout)
    try:
        rows = run(opts, Progress(enabled=False), log)
    except (BenchError, OSError) as e:
        print(f"error: {e}", flush=True)
        return 1
    to_json(rows, opts, out, log)
    return 0


if __name__ == "__main__":
    sys.exit(_client_main(sys.argv[1:]))
