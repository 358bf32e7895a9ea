#!/usr/bin/env python3
"""Issue 11's targets (the NBD export), measured in one run against the peers
on the same data.

    python3 benchmarks/nbd_ratios.py [--quick] [--seconds N] [--rounds N] [--json OUT]

One file in /dev/shm (``--size``, default 1 GiB) is filled with random data
once; four servers run for the whole benchmark, each on a Unix socket:

* ``ours direct``: ``python -m cxlflash nbd --unix S --export d=direct
  --target FILE`` -- the whole file as a direct (physical) LUN, the
  like-for-like peer of ``nbdkit file``;
* ``ours virtual``: ``python -m cxlflash nbd --unix S --export v=SIZE
  --target FILE2`` -- a vLUN of another /dev/shm file (twice its size,
  sparse), written through the export with fio (1 MiB sequential writes)
  before the runs, so it reads as data, not holes.  Its size
  (``--vsize``) is the data file's by default: random reads over a smaller
  export hit fewer pages (page-cache lookups and TLB): a 512 MiB vLUN
  export read 1.1-1.25x the IOPS of the 1 GiB direct export at QD16 in three
  runs, and 0.84x when it was 1 GiB too -- not a fair row;
* ``nbdkit``: ``nbdkit --foreground --unix S file FILE`` (its default thread
  model, parallel, 16 threads);
* ``qemu-nbd``: ``qemu-nbd -f raw --socket S --persistent --shared 16
  --cache=writeback --aio=threads FILE`` (its defaults spelled out: reads
  from the page cache by a thread pool, as nbdkit's ``file`` does; the
  issue's baseline);
* ``qemu-nbd native``: the same with ``--cache=none --aio=native`` (O_DIRECT
  and Linux AIO: qemu-nbd's fastest mode on this data, measured 2-2.5x its
  default at QD16 on tmpfs); a row for information, no target.

Each run is ``fio --ioengine=nbd --uri=nbd+unix:///NAME?socket=S``
(``--time_based --runtime N``, ``--output-format=json``): 4 KiB random reads
at depth 1 and depth 16 (``--norandommap --randrepeat=1``: the same offsets
for every server), 1 MiB sequential reads at depth 4.  A round runs every
workload on every server, the servers alternated (rotated by one place each
workload and round); each figure is the median over the rounds.  Server CPU
per request: the user+sys clock ticks of the server process (/proc/PID/stat
fields 14 and 15, every thread) over the run, divided by the requests fio
completed.

The targets compare ``ours`` with the peers (both exports of ours are
judged: the direct one is the like-for-like row, the virtual one is what
users export): QD1 and QD16 IOPS >= 1.0x nbdkit, QD16 >= 1.3x qemu-nbd,
1 MiB sequential QD4 >= 1.0x nbdkit, CPU per QD16 request <= 1.2x nbdkit's.
The ratio is the ratio of the medians; the brackets show the per-round
ratios' spread.

The exit status is 1 when a target is missed or cannot be measured, 2 when
the setup is wrong (a tool missing, a server that does not start).
"""
import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from ratio_table import cpu_ticks, median_of, print_rows, tool_version  # noqa: E402 (beside this script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STARTUP_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20

# name, fio options, what
WORKLOADS = [
    ("rand4k_qd1", ["--rw=randread", "--bs=4k", "--iodepth=1", "--norandommap",
                    "--randrepeat=1"], "4 KiB random read, QD1"),
    ("rand4k_qd16", ["--rw=randread", "--bs=4k", "--iodepth=16", "--norandommap",
                     "--randrepeat=1"], "4 KiB random read, QD16"),
    ("seq1m_qd4", ["--rw=read", "--bs=1M", "--iodepth=4"], "1 MiB sequential read, QD4"),
]

SERVERS = ["ours direct", "ours virtual", "nbdkit", "qemu-nbd", "qemu-nbd native"]


class SetupError(Exception):
    """The benchmark cannot run as asked (exit status 2)."""


def parse_size(s):
    s = s.strip().upper()
    mult = 1
    for i, suf in enumerate("KMGT"):
        if s.endswith(suf):
            mult = 1 << (10 * (i + 1))
            s = s[:-1]
            break
    return int(s) * mult




def fill_random(path, size, seed):
    """``size`` bytes of random data in ``path`` (numpy's generator: ~1 GB/s)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    step = 64 * MIB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(step, left)
            f.write(rng.bytes(n))
            left -= n




class Server:
    """One NBD server process on a Unix socket, its log in a file."""

    def __init__(self, name, cmd, socket, export, tmp, size):
        self.name = name
        self.cmd = cmd
        self.socket = socket
        self.export = export
        self.uri = f"nbd+unix:///{export}?socket={socket}"
        self.log_path = os.path.join(tmp, name.replace(" ", "-") + ".log")
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, env=env, cwd=tmp)
        self.pid = self.proc.pid
        end = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                raise SetupError(f"{name} exited with {self.proc.returncode} at start: "
                                 f"{' '.join(cmd)}\n{self.log()}")
            if os.path.exists(socket):
                r = subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True,
                                   text=True)
                if r.returncode == 0:
                    self.size = int(r.stdout)
                    break
            if time.monotonic() > end:
                self.close()
                raise SetupError(f"{name} did not answer within {STARTUP_TIMEOUT:g} s: "
                                 f"{' '.join(cmd)}\n{self.log()}")
            time.sleep(0.05)
        if self.size != size:
            self.close()
            raise SetupError(f"{name} exports {self.size} bytes, not {size}: {' '.join(cmd)}")

    def alive(self):
        return self.proc.poll() is None

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError as e:
            return f"(no log: {e})"

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


def start_servers(tmp, data, vdata, size, vsize, wanted, progress):
    """The servers in ``wanted`` (names of SERVERS); returns ({name: Server},
    {name: error})."""
    servers, errors = {}, {}
    py = sys.executable
    cmds = {
        "ours direct": ([py, "-m", "cxlflash", "nbd", "--unix", "SOCK", "--export", "d=direct",
                         "--target", data, "--exit-with-parent"], "d", size),
        "ours virtual": ([py, "-m", "cxlflash", "nbd", "--unix", "SOCK", "--export",
                          f"v={vsize}", "--target", vdata, "--exit-with-parent"], "v", vsize),
        "nbdkit": (["nbdkit", "--foreground", "--exit-with-parent", "--unix", "SOCK", "file",
                    data], "", size),
        "qemu-nbd": (["qemu-nbd", "-f", "raw", "--socket", "SOCK", "--persistent",
                      "--shared", "16", "--cache=writeback", "--aio=threads", data], "", size),
        "qemu-nbd native": (["qemu-nbd", "-f", "raw", "--socket", "SOCK", "--persistent",
                             "--shared", "16", "--cache=none", "--aio=native", data], "", size),
    }
    for name in SERVERS:
        if name not in wanted:
            continue
        progress(f"starting {name}")
        cmd, export, sz = cmds[name]
        sock = os.path.join(tmp, name.replace(" ", "-") + ".sock")
        cmd = [sock if c == "SOCK" else c for c in cmd]
        try:
            servers[name] = Server(name, cmd, sock, export, tmp, sz)
        except SetupError as e:
            errors[name] = str(e)
    return servers, errors


def run_fio(uri, opts, seconds, out_path, extra=()):
    cmd = ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--time_based",
           f"--runtime={seconds}", "--output-format=json", f"--output={out_path}",
           *opts, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio exited with {r.returncode}: {' '.join(cmd)}\n"
                           f"{r.stderr.strip()[-2000:]}")
    with open(out_path) as f:
        text = f.read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio reports error {job['error']}: {' '.join(cmd)}")
    return job, cmd


def fill_export(srv, tmp):
    """Write the whole export (1 MiB sequential writes, fio's random buffers)."""
    cmd = ["fio", "--name=fill", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=write",
           "--bs=1M", "--iodepth=4", f"--size={srv.size}", "--output-format=json",
           f"--output={os.path.join(tmp, 'fill.json')}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SetupError(f"filling {srv.name} failed ({r.returncode}): {' '.join(cmd)}\n"
                         f"{r.stderr.strip()[-2000:]}\n{srv.log()}")


def measure(srv, workload, seconds, tmp):
    """One fio run against ``srv``: a dict of figures."""
    name, opts, _ = workload
    t0 = cpu_ticks(srv.pid)
    job, _ = run_fio(srv.uri, opts, seconds, os.path.join(tmp, "run.json"))
    t1 = cpu_ticks(srv.pid)
    rd = job["read"]
    ios = rd["total_ios"]
    if ios <= 0:
        raise RuntimeError(f"fio completed no request against {srv.name}")
    ticks = t1 - t0
    return {"iops": rd["iops"], "mib_s": rd["bw_bytes"] / MIB, "lat_us": rd["lat_ns"]["mean"] / 1e3,
            "ios": ios, "runtime_ms": job.get("job_runtime"), "cpu_ticks": ticks,
            "cpu_us_per_req": ticks / CLK_TCK * 1e6 / ios}


# -- rows -----------------------------------------------------------------------------------




def ratio_row(what, ours, base, workload, key, target, results, errors, unit,
              lower_is_better=False):
    row = {"what": what, "ours": ours, "baseline": base, "workload": workload, "figure": key,
           "unit": unit, "target": target, "lower_is_better": lower_is_better}
    o = [r[key] for r in results.get((ours, workload), [])]
    b = [r[key] for r in results.get((base, workload), [])]
    err = errors.get(ours) or errors.get(base)
    if err or not o or not b:
        row.update(status="MISSING", error=(err or "no runs").splitlines()[0])
        return row
    value, basev = statistics.median(o), statistics.median(b)
    row.update(value=value, base=basev, rounds=o, base_rounds=b)
    if basev <= 0:
        row.update(status="MISSING", error=f"{base}: {key} is {basev}")
        return row
    ratio = value / basev
    per = [y / x for x, y in zip(b, o) if x > 0]
    row.update(ratio=ratio, ratios=per, spread=(min(per), max(per)) if per else (ratio, ratio))
    if target is None:
        row["status"] = "info"
    elif lower_is_better:
        row["status"] = "PASS" if ratio <= target else "FAIL"
    else:
        row["status"] = "PASS" if ratio >= target else "FAIL"
    return row






def print_servers(results, servers, workloads, out):
    print("# per server (median over rounds): IOPS, mean latency (fio lat_ns), "
          "server CPU per request", file=out)
    w = max(len(s) for s in servers)
    for wl, _, what in workloads:
        print(f"#  {what}", file=out)
        for s in servers:
            rs = results.get((s, wl))
            if not rs:
                print(f"#    {s:<{w}}  -", file=out)
                continue
            iops = median_of(results, s, wl, "iops")
            mib = median_of(results, s, wl, "mib_s")
            lat = median_of(results, s, wl, "lat_us")
            cpu = median_of(results, s, wl, "cpu_us_per_req")
            print(f"#    {s:<{w}}  {iops / 1000:8.1f} k IOPS  {mib:7.0f} MiB/s  "
                  f"lat {lat:8.1f} us  cpu {cpu:6.2f} us/req", file=out)


def build_rows(results, errors):
    rows = []
    for ours in ("ours direct", "ours virtual"):
        short = ours.split()[1]
        rows += [
            ratio_row(f"{short}: 4K randread QD1 IOPS vs nbdkit", ours, "nbdkit", "rand4k_qd1",
                      "iops", 1.0, results, errors, "IOPS"),
            ratio_row(f"{short}: 4K randread QD16 IOPS vs nbdkit", ours, "nbdkit",
                      "rand4k_qd16", "iops", 1.0, results, errors, "IOPS"),
            ratio_row(f"{short}: 4K randread QD16 IOPS vs qemu-nbd", ours, "qemu-nbd",
                      "rand4k_qd16", "iops", 1.3, results, errors, "IOPS"),
            ratio_row(f"{short}: 4K randread QD16 IOPS vs qemu-nbd native (info)", ours,
                      "qemu-nbd native", "rand4k_qd16", "iops", None, results, errors, "IOPS"),
            ratio_row(f"{short}: 1M seqread QD4 MiB/s vs nbdkit", ours, "nbdkit", "seq1m_qd4",
                      "mib_s", 1.0, results, errors, "MiB/s"),
            ratio_row(f"{short}: server CPU per 4K request (QD16) vs nbdkit", ours, "nbdkit",
                      "rand4k_qd16", "cpu_us_per_req", 1.2, results, errors, "us",
                      lower_is_better=True),
        ]
    return rows


# -- main -----------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1 s per fio run, 1 round, a 256 MiB file")
    ap.add_argument("--seconds", type=float, help="fio runtime per run (default 5, --quick 1)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    ap.add_argument("--size", help="the data file's size (default 1G, --quick 256M)")
    ap.add_argument("--vsize", help="the virtual export's size (default: --size, so that every "
                    "server reads the same amount of data)")
    ap.add_argument("--dir", default="/dev/shm", help="where the data files go (default /dev/shm)")
    ap.add_argument("--servers", help="comma-separated subset of: " + ", ".join(SERVERS))
    ap.add_argument("--workloads", help="comma-separated subset of: "
                    + ", ".join(w[0] for w in WORKLOADS) + " (rows of the others: MISSING)")
    ap.add_argument("--json", metavar="OUT", help="write every figure to OUT")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)
    seconds = args.seconds or (1 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)
    size = parse_size(args.size or ("256M" if args.quick else "1G"))
    vsize = parse_size(args.vsize) if args.vsize else size
    wanted = SERVERS if not args.servers else [s.strip() for s in args.servers.split(",")]
    for s in wanted:
        if s not in SERVERS:
            ap.error(f"unknown server {s!r}: choose from {', '.join(SERVERS)}")
    workloads = WORKLOADS
    if args.workloads:
        names = [w.strip() for w in args.workloads.split(",")]
        for n in names:
            if n not in [w[0] for w in WORKLOADS]:
                ap.error(f"unknown workload {n!r}: choose from "
                         f"{', '.join(w[0] for w in WORKLOADS)}")
        workloads = [w for w in WORKLOADS if w[0] in names]
    tty = sys.stderr.isatty() and not args.quiet

    def progress(msg):
        if tty:
            sys.stderr.write(f"\r\x1b[K{msg}")
            sys.stderr.flush()

    for tool in ("fio", "nbdinfo", "nbdkit", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"nbd_ratios: {tool} is not installed (Debian: fio, libnbd-bin, nbdkit, "
                  f"qemu-utils)", file=sys.stderr)
            return 2
    t_start = time.perf_counter()
    servers = {}
    results = {}
    with tempfile.TemporaryDirectory(prefix="nbd-ratios-", dir=args.dir) as tmp:
        try:
            data = os.path.join(tmp, "data.img")
            vdata = os.path.join(tmp, "vdata.img")
            progress(f"writing {size >> 20} MiB of random data")
            fill_random(data, size, 11)
            # the virtual export's LUN: sparse, twice the export (whole chunks
            # and room for the allocator); written through the export below
            with open(vdata, "wb") as f:
                f.truncate(2 * vsize)
            servers, errors = start_servers(tmp, data, vdata, size, vsize, wanted, progress)
            if not servers:
                raise SetupError("no server started:\n" + "\n".join(errors.values()))
            if "ours virtual" in servers:
                progress("writing the virtual export")
                try:
                    fill_export(servers["ours virtual"], tmp)
                except SetupError as e:
                    errors["ours virtual"] = str(e)
                    servers.pop("ours virtual").close()
            names = [s for s in SERVERS if s in servers]
            header = {
                "machine": platform.platform(), "cores": os.cpu_count(),
                "python": sys.version.split()[0], "seconds": seconds, "rounds": rounds,
                "size": size, "vsize": vsize, "data_dir": args.dir, "clk_tck": CLK_TCK,
                "fio": tool_version(["fio", "--version"]),
                "nbdkit": tool_version(["nbdkit", "--version"]),
                "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
                "commands": {n: s.cmd for n, s in servers.items()},
                "uris": {n: s.uri for n, s in servers.items()},
                "loadavg": " ".join(open("/proc/loadavg").read().split()[:3]),
            }
            print(f"# {header['machine']}, {header['cores']} cores, python {header['python']}; "
                  f"{header['fio']}, {header['nbdkit']}, {header['qemu-nbd']}")
            print(f"# {rounds} rounds x {seconds:g} s per fio run; data {size >> 20} MiB, "
                  f"virtual export {vsize >> 20} MiB, in {args.dir}; "
                  f"load average {header['loadavg']}")
            for n, s in servers.items():
                print(f"# {n}: {' '.join(s.cmd)}")
            fio_cmds = {}
            step = 0
            for r in range(rounds):
                for wi, wl in enumerate(workloads):
                    k = (r + wi) % len(names)
                    for name in names[k:] + names[:k]:
                        if name in errors:
                            continue
                        step += 1
                        progress(f"round {r + 1}/{rounds}: {wl[2]}, {name}")
                        srv = servers[name]
                        try:
                            res = measure(srv, wl, seconds, tmp)
                        except (RuntimeError, ValueError, OSError) as e:
                            msg = f"{type(e).__name__}: {e}"
                            if not srv.alive():
                                msg += f"\n{name} exited {srv.proc.returncode}:\n{srv.log()}"
                            errors[name] = msg
                            continue
                        res["round"] = r
                        results.setdefault((name, wl[0]), []).append(res)
                        fio_cmds[wl[0]] = wl[1]
        except SetupError as e:
            progress("")
            print(f"nbd_ratios: {e}", file=sys.stderr)
            return 2
        finally:
            for s in servers.values():
                s.close()
        progress("")

    rows = build_rows(results, errors)
    print_rows(rows, sys.stdout)
    print_servers(results, [s for s in SERVERS if s in wanted], workloads, sys.stdout)
    for n, e in errors.items():
        print(f"# {n} failed: {e}")
    elapsed = time.perf_counter() - t_start
    end_load = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"# {elapsed:.0f} s; load average at the end {end_load} (2 cores shared: other "
          f"processes move the figures, see the spread)")
    if args.json:
        servers_out = {}
        for (s, wl), rs in results.items():
            servers_out.setdefault(s, {})[wl] = {
                "iops": median_of(results, s, wl, "iops"),
                "mib_s": median_of(results, s, wl, "mib_s"),
                "lat_us": median_of(results, s, wl, "lat_us"),
                "cpu_us_per_req": median_of(results, s, wl, "cpu_us_per_req"),
                "runs": rs}
        with open(args.json, "w") as f:
            json.dump({"header": header, "workloads": {w[0]: {"what": w[2], "fio": w[1]}
                                                       for w in WORKLOADS},
                       "rows": rows, "servers": servers_out, "errors": errors,
                       "elapsed_s": elapsed}, f, indent=1)
    failed = [r for r in rows if r["status"] in ("FAIL", "MISSING")]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
