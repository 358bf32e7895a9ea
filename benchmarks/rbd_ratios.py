#!/usr/bin/env python3
"""Issue 15's targets (physical LUNs on Ceph RBD), measured in one run
against fio's rbd engine on the same cluster and image.

    python3 benchmarks/rbd_ratios.py [--quick] [--seconds N] [--rounds N] [--json OUT]
                                     [--conf DIR/ceph.conf --pool P [--id NAME]]

The cluster: without ``--conf`` the script starts a throw-away one-node
cluster of its own with ``tools/ceph-cluster`` (a temporary directory, a
free monitor port and OSD port range) and stops it at the end -- also on a
failure, Ctrl-C or SIGTERM, and (a watcher process in its own session) if
the script itself is killed.  With ``--conf`` it uses that cluster: it
creates an image of its own in ``--pool`` and removes it at the end.

The image (``--size``, default 1 GiB, a whole number of 256 MiB chunks) is
written whole first (fio, 4 MiB sequential writes): the first write to an
RBD object costs much more than a rewrite, and a read of an object never
written costs nothing.  Both sides read a private copy of the conf with
``rbd cache = false`` in ``[client]``: librbd's default cache acknowledges
writes before the OSD has them, and the backend turns it off (fio reads
the conf through ``CEPH_CONF``; it has no option for the cache).

The sides of every workload:

* ``fio``: ``fio --ioengine=rbd --clientname=ID --pool=P --rbdname=IMG``
  (``--time_based``, ``--norandommap --randrepeat=0`` for the random ones:
  uniform offsets over the image);
* ``ours``: ``Adapter().add_lun("rbd:P/IMG?conf=CONF&id=ID")``, a context,
  ``create_virtual(all the image's blocks, scrub=False)`` -- the vLUN maps
  every chunk of the image -- then ``vlun.listio(ops, lbas, nblocks, buf,
  offsets, qd=QD)`` calls until the time is up, the same offsets
  distribution (uniform random LBAs over the vLUN, or sequential from 0).
  The adapter is opened before and closed after each run, untimed: while
  a vLUN is open the process holds the image's exclusive lock, and fio's
  writes would fail with EROFS.  A listio call drains its queue at the end,
  so calls are sized to ~``CALL_SECONDS`` of work (the drain costs
  (qd-1)/2 requests of ~``rate * CALL_SECONDS``) and the time of every call
  counts;
* ``nbd`` (information, no target): ``python -m cxlflash nbd --unix S
  --export d=direct --target rbd:...`` (started before and stopped after
  each run, untimed) driven by ``fio --ioengine=nbd`` with the same options.
  A direct export: a virtual one is created with ``scrub`` on and would
  zero the whole image when the server stops;
* ``fio2`` (``--sides fio,ours,fio2``; information): fio again, the same
  command as ``fio`` in another slot of the rotation -- an A/A control row:
  its ratio to ``fio`` is the harness's noise on this machine right now.

A round runs every workload on every side, the sides rotated by one place
per workload and round (``cxlflash.bench.harness.interleaved_round``); each
figure is the median over the rounds, the ratio the ratio of the medians,
the brackets the spread of the per-round ratios.  Targets: 4 KiB random
write and read, 32 in flight, >= 0.9x fio's IOPS; 4 MiB sequential write, 4
in flight, >= 0.95x fio's throughput.

The exit status is 1 when a target is missed or cannot be measured, 2 when
the setup is wrong (a tool missing, the cluster does not start, ours
cannot open the image), 130 when interrupted.
"""
import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from ratio_table import cpu_ticks, median_of, print_rows, tool_version  # noqa: E402 (beside this script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

TOOL = os.path.join(ROOT, "tools", "ceph-cluster")
MIB = 1 << 20
CHUNK_BYTES = (1 << 16) * 4096      # one chunk of 65536 blocks of 4 KiB
CALL_SECONDS = 0.5                  # work per listio call (its drain costs qd/2 requests)
LBA_RING = 1 << 20                  # pre-generated random LBAs, cycled
SLOTS = 64                          # buffer slots the requests of a call cycle through
STARTUP_TIMEOUT = 30.0


class SetupError(Exception):
    """The benchmark cannot run as asked (exit status 2)."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: clean up as for Ctrl-C."""


class Workload:
    def __init__(self, name, what, rw, bs, qd, target, figure, unit, first_batch, max_batch):
        self.name, self.what, self.rw, self.bs, self.qd = name, what, rw, bs, qd
        self.target, self.figure, self.unit = target, figure, unit
        self.first_batch, self.max_batch = first_batch, max_batch
        self.write = "write" in rw
        self.random = rw.startswith("rand")

    def fio_opts(self):
        opts = [f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.qd}"]
        if self.random:
            opts += ["--norandommap", "--randrepeat=0"]
        return opts


WORKLOADS = [
    Workload("randwrite4k", "4 KiB random write, 32 in flight", "randwrite", 4096, 32, 0.9,
             "iops", "IOPS", 1024, 1 << 16),
    Workload("randread4k", "4 KiB random read, 32 in flight", "randread", 4096, 32, 0.9,
             "iops", "IOPS", 1024, 1 << 16),
    Workload("seqwrite4m", "4 MiB sequential write, 4 in flight", "write", 4 * MIB, 4, 0.95,
             "mib_s", "MiB/s", 16, 1024),
]
SIDES = ["fio", "ours", "nbd", "fio2"]
DEFAULT_SIDES = ["fio", "ours", "nbd"]


def parse_size(s):
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for i, suf in enumerate("KMGT"):
        if s.endswith(suf):
            mult = 1 << (10 * (i + 1))
            s = s[:-1]
            break
    return int(s) * mult




def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -- the cluster ------------------------------------------------------------------------------


def port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_ports(rng):
    """A free monitor port and a range of 100 OSD ports, away from Ceph's
    defaults (3300, 6789, 6800-7300), the ephemeral range, and the ranges
    tests/ceph.py picks from (mon 20000-30000, OSD 10000-19999)."""
    for _ in range(200):
        mon = rng.randrange(30000, 32000)
        osd_min = rng.randrange(8000, 9900)
        if port_free(mon) and all(port_free(p) for p in range(osd_min, osd_min + 8)):
            return mon, osd_min, osd_min + 99
    raise SetupError("no free port for the Ceph monitor in 30000-32000")


# The watcher: a process in its own session (Ctrl-C does not reach it) that
# reads cleanup actions from a pipe, one JSON line each, and runs them, last
# first, when the pipe ends without "done": the script died (SIGKILL, a
# crash) before cleaning up itself.  Each action is idempotent.
WATCHER = r"""
import json, shutil, subprocess, sys, time
actions = []
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)
    actions.append(json.loads(line))
for a in reversed(actions):
    try:
        if "run" in a:
            end = time.monotonic() + a.get("retry_s", 0)
            while subprocess.run(a["run"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, timeout=120,
                                 env=a.get("env")).returncode and time.monotonic() < end:
                time.sleep(2)
        if "rmtree" in a:
            shutil.rmtree(a["rmtree"], ignore_errors=True)
    except Exception:
        pass
"""


class Watcher:
    """Cleans up after the script if it is killed: ``add()`` an action
    (``{"run": argv, "env": {...}}`` or ``{"rmtree": path}``) once the
    thing it undoes exists; ``done()`` once the script has cleaned up."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", WATCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, text=True)

    def add(self, action):
        self.proc.stdin.write(json.dumps(action) + "\n")
        self.proc.stdin.flush()

    def done(self):
        try:
            self.proc.stdin.write("done\n")
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


class OwnCluster:
    """A throw-away cluster started with tools/ceph-cluster, stopped by close()."""

    def __init__(self, osd_bytes, progress, watcher):
        self.dir = tempfile.mkdtemp(prefix="rbd-ratios-ceph-")
        self.conf = os.path.join(self.dir, "ceph.conf")
        watcher.add({"rmtree": self.dir})
        self.started = False
        rng = random.Random(os.getpid() ^ time.monotonic_ns())
        last = ""
        for _ in range(3):          # a port taken between the probe and the mon's bind
            self.port, omin, omax = pick_ports(rng)
            self.env = dict(os.environ, CEPH_CLUSTER_PORT=str(self.port),
                            CEPH_CLUSTER_OSD_PORT_MIN=str(omin),
                            CEPH_CLUSTER_OSD_PORT_MAX=str(omax),
                            CEPH_CLUSTER_OSD_BYTES=str(osd_bytes), CEPH_CLUSTER_TIMEOUT="60")
            self.env.pop("CEPH_CONF", None)
            self.env.pop("CEPH_ARGS", None)
            watcher.add({"run": [TOOL, "stop", self.dir], "env": self.env})
            progress(f"starting a Ceph cluster in {self.dir} (mon port {self.port})")
            self.started = True
            p = subprocess.run([TOOL, "start", self.dir], env=self.env, capture_output=True,
                               text=True, timeout=180)
            if p.returncode == 0:
                self.up_msg = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
                return
            last = p.stderr.strip()
            if "is in use" not in p.stderr:
                break
        log = ""
        try:
            with open(os.path.join(self.dir, "log", "setup.log"), errors="replace") as f:
                log = f.read()[-3000:]
        except OSError:
            pass
        self.close()
        raise SetupError(f"tools/ceph-cluster start failed:\n{last}\n-- setup.log --\n{log}")

    def describe(self):
        return f"own cluster in {self.dir}, mon v2:127.0.0.1:{self.port}"

    def close(self):
        if self.started:
            subprocess.run([TOOL, "stop", self.dir], env=self.env, capture_output=True,
                           timeout=120)
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


class GivenCluster:
    """An existing cluster (``--conf``): nothing to start or stop."""

    def __init__(self, conf):
        if not os.path.isfile(conf):
            raise SetupError(f"--conf {conf}: no such file")
        self.conf = os.path.abspath(conf)
        self.dir = None
        self.env = dict(os.environ)
        self.env.pop("CEPH_CONF", None)

    def describe(self):
        return f"the cluster of {self.conf}"

    def close(self):
        pass


def canon_key(key):
    return " ".join(key.replace("_", " ").replace("-", " ").split()).lower()


def private_conf(src, dst, client_id):
    """``src`` copied to ``dst`` with ``rbd cache = false`` in [client] (every
    other ``rbd cache`` line commented out); checked with ceph-conf."""
    with open(src) as f:
        lines = f.read().splitlines()
    out, inserted = [], False
    for line in lines:
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            out.append(line)
            if s[1:-1].strip() == "client" and not inserted:
                out.append("rbd cache = false")
                inserted = True
            continue
        if "=" in s and not s.startswith(("#", ";")) and canon_key(s.split("=", 1)[0]) == "rbd cache":
            out.append(f"# {line}    (rbd_ratios.py: the cache is off on both sides)")
            continue
        out.append(line)
    if not inserted:
        out += ["", "[client]", "rbd cache = false"]
    with open(dst, "w") as f:
        f.write("\n".join(out) + "\n")
    if shutil.which("ceph-conf"):
        p = subprocess.run(["ceph-conf", "-c", dst, "-n", f"client.{client_id}", "--lookup",
                            "rbd_cache"], capture_output=True, text=True, timeout=30)
        if p.stdout.strip() != "false":
            raise SetupError(f"{dst}: ceph-conf reads rbd_cache = {p.stdout.strip()!r} for "
                             f"client.{client_id}, not false: {p.stderr.strip()}")


class Image:
    """An image of the benchmark's own, removed by close()."""

    def __init__(self, conf, pool, client_id, size, env, watcher):
        self.conf, self.pool, self.id, self.size, self.env = conf, pool, client_id, size, env
        self.name = f"cxlflash-bench-{uuid.uuid4().hex[:8]}"
        self.spec = f"{pool}/{self.name}"
        self.created = False
        # a killed process's watch on the image lasts ~30 s: rm is refused
        # ("image still has watchers") until then
        watcher.add({"run": ["rbd", "-c", conf, "--id", client_id, "rm", "--no-progress",
                             self.spec], "env": env, "retry_s": 60})
        self.rbd("create", "--size", f"{size // MIB}M", self.spec)
        self.created = True
        self.info = json.loads(self.rbd("info", "--format", "json", self.spec))

    def rbd(self, *args, timeout=120):
        cmd = ["rbd", "-c", self.conf, "--id", self.id, *args]
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise SetupError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def lun(self):
        return f"rbd:{self.pool}/{self.name}?conf={self.conf}&id={self.id}"

    def object_bytes(self, offset, length):
        """``length`` bytes of the image at ``offset`` (within one object),
        read with ``rados get`` of the object that holds them: a path that
        is neither fio nor ours."""
        osize = self.info["object_size"]
        objno = offset // osize
        if (offset + length - 1) // osize != objno:
            raise ValueError("the range crosses an object")
        obj = f"{self.info['block_name_prefix']}.{objno:016x}"
        with tempfile.NamedTemporaryFile(prefix="rbd-ratios-obj-") as tmp:
            cmd = ["rados", "-c", self.conf, "--id", self.id, "-p", self.pool, "get", obj,
                   tmp.name]
            p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
            if p.returncode != 0:
                raise SetupError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
            data = tmp.read()
        rel = offset - objno * osize
        return data[rel:rel + length].ljust(length, b"\0")

    def close(self):
        if self.created:
            for _ in range(10):     # "image still has watchers" right after a close
                p = subprocess.run(["rbd", "-c", self.conf, "--id", self.id, "rm",
                                    "--no-progress", self.spec], env=self.env,
                                   capture_output=True, text=True, timeout=120)
                if p.returncode == 0 or "No such file" in p.stderr:
                    self.created = False
                    return
                time.sleep(1)
            print(f"# rbd_ratios: could not remove {self.spec}: {p.stderr.strip()}",
                  file=sys.stderr)


# -- fio --------------------------------------------------------------------------------------


def fio_env(conf):
    env = dict(os.environ, CEPH_CONF=conf)
    env.pop("CEPH_ARGS", None)
    return env


def fio_rbd_cmd(img, opts, out_path):
    return ["fio", "--name=rbd", "--ioengine=rbd", f"--clientname={img.id}",
            f"--pool={img.pool}", f"--rbdname={img.name}", *opts, "--output-format=json",
            f"--output={out_path}"]


def children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_fio(cmd, env, error=RuntimeError):
    """Run fio; its job's figures (json), with ``cpu_s``: the CPU time of
    the fio processes, every thread (RUSAGE_CHILDREN over the run: fio's
    own usr_cpu/sys_cpu count the job's thread only, not librbd's)."""
    c0 = children_cpu()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    cpu_s = children_cpu() - c0
    if r.returncode != 0:
        raise error(f"fio exited with {r.returncode}: {' '.join(cmd)}\n"
                    f"{r.stderr.strip()[-2000:]}")
    out = [c for c in cmd if c.startswith("--output=")][0].split("=", 1)[1]
    with open(out) as f:
        text = f.read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        raise error(f"fio reports error {job['error']}: {' '.join(cmd)}\n{r.stderr.strip()}")
    job["cpu_s"] = cpu_s
    return job


def fio_figures(job, wl):
    d = job["write" if wl.write else "read"]
    if d["total_ios"] <= 0:
        raise RuntimeError("fio completed no request")
    runtime = job["job_runtime"] / 1e3
    # all of fio's processes and threads, its start-up too (connecting to the
    # cluster, opening the image: tens of ms, <1 us per request in 5 s)
    cpu_s = job["cpu_s"]
    return {"iops": d["iops"], "mib_s": d["bw_bytes"] / MIB, "lat_us": d["lat_ns"]["mean"] / 1e3,
            "ios": d["total_ios"], "runtime_s": runtime, "cpu_s": cpu_s,
            "cpu_us_per_req": cpu_s * 1e6 / d["total_ios"]}


def need_tools(sides):
    missing = [t for t, pkg in (("fio", "fio"), ("rbd", "ceph-common"), ("rados", "ceph-common"))
               if shutil.which(t) is None]
    if "nbd" in sides and shutil.which("nbdinfo") is None:
        missing.append("nbdinfo (libnbd-bin)")
    if missing:
        raise SetupError(f"missing {', '.join(missing)}: apt-get install -y "
                         f"--no-install-recommends fio ceph-common libnbd-bin")
    p = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True)
    if "rbd" not in p.stdout.split():
        raise SetupError("this fio has no rbd engine (`fio --enghelp` does not list it): the "
                         "baseline is fio --ioengine=rbd; install a fio built with librbd "
                         "(Debian's fio has it)")


class FioSide:
    def __init__(self, img, env, tmp):
        self.img, self.env, self.tmp = img, env, tmp
        self.cmds = {}

    def run(self, wl, seconds):
        cmd = fio_rbd_cmd(self.img, [*wl.fio_opts(), "--time_based",
                                     f"--runtime={int(seconds * 1000)}ms"],
                          os.path.join(self.tmp, "fio.json"))
        self.cmds[wl.name] = cmd
        return fio_figures(run_fio(cmd, self.env), wl)


def fill(img, env, tmp):
    """Write the whole image: fio, 4 MiB sequential writes, 4 in flight (its
    random buffers).  Returns (seconds, MiB/s)."""
    cmd = fio_rbd_cmd(img, ["--rw=write", "--bs=4M", "--iodepth=4", f"--size={img.size}"],
                      os.path.join(tmp, "fill.json"))
    t0 = time.perf_counter()
    job = run_fio(cmd, env, SetupError)
    return time.perf_counter() - t0, job["write"]["bw_bytes"] / MIB, cmd


def warm_up(img, env, tmp, ios):
    """``ios`` 4 KiB random writes, 32 in flight (fio; at most 120 s): each
    write adds an entry to its placement group's log, which the OSD trims
    only once it holds osd_max_pg_log_entries (10000) -- until then writes
    are ~2x faster (on the script's own cluster, 8 PGs: ~11 k IOPS for the
    first ~85 k writes, 5-7 k after).  Returns the job's figures."""
    cmd = fio_rbd_cmd(img, ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--norandommap",
                            "--randrepeat=0", f"--number_ios={ios}", "--runtime=120"],
                      os.path.join(tmp, "warmup.json"))
    job = run_fio(cmd, env, SetupError)
    return {"ios": job["write"]["total_ios"], "iops": job["write"]["iops"],
            "seconds": job["job_runtime"] / 1e3, "cmd": cmd}


# -- ours -------------------------------------------------------------------------------------


class OursSide:
    """A vLUN over every chunk of the image, opened for each run."""

    def __init__(self, lun, size, seed):
        import cxlflash
        self.cxlflash = cxlflash
        self.lun = lun
        self.size = size
        rng = np.random.default_rng(seed)
        self.block_size = None
        self.ring = None
        self.rng = rng
        self.open_s = []
        self.info = {}

    def open(self):
        """(adapter, vlun); the adapter is closed on a failure."""
        cx = self.cxlflash
        t0 = time.perf_counter()
        a = cx.Adapter()
        try:
            wwid = a.add_lun(self.lun)
            ctx = a.open_disk(wwid).attach()
            v = ctx.create_virtual(0, scrub=False)
            bs = v.block_size
            nblocks = self.size // bs
            v.set_size(nblocks)
            if v.size != nblocks:
                raise SetupError(f"the vLUN has {v.size} blocks, not {nblocks}")
        except BaseException:
            a.close()
            raise
        self.open_s.append(time.perf_counter() - t0)
        if self.block_size is None:
            self.block_size = bs
            self.ring = self.rng.integers(0, nblocks, LBA_RING, dtype=np.uint64)
            self.pos = 0
        return a, v

    def check(self, img):
        """Ours reads what the image holds (against ``rados get`` of the
        objects), at a few vLBAs: the prefill is there and the vLUN maps the
        image."""
        a, v = self.open()
        try:
            bs = v.block_size
            vlbas = np.array([0, v.size // 2 + 7, v.size - 1, int(self.ring[0])], np.uint64)
            plbas = v.translate(vlbas)
            buf = self.cxlflash.aligned_buffer(len(vlbas) * bs)
            ops = np.full(len(vlbas), self.cxlflash.LIST_READ, np.uint8)
            v.listio(ops, vlbas, np.ones(len(vlbas), np.uint64), buf, qd=4).check()
            for i, (vl, pl) in enumerate(zip(vlbas.tolist(), plbas.tolist())):
                want = img.object_bytes(pl * bs, bs)
                got = bytes(buf[i * bs:(i + 1) * bs])
                if got != want:
                    raise SetupError(f"ours read vLBA {vl} (image offset {pl * bs}) wrong: "
                                     f"not what rados get returns for it")
                if want == bytes(bs):
                    raise SetupError(f"image offset {pl * bs} reads as zeros: the prefill "
                                     f"did not write it")
            self.info = {"block_size": bs, "chunks": v.chunks, "vlun_blocks": v.size,
                         "check_vlbas": vlbas.tolist(), "check_plbas": plbas.tolist()}
        finally:
            a.close()

    def run(self, wl, seconds):
        a, v = self.open()
        try:
            return self._loop(v, wl, seconds)
        finally:
            a.close()

    def _loop(self, v, wl, seconds):
        cx = self.cxlflash
        bs = v.block_size
        per = wl.bs // bs
        nblocks = v.size
        mx = wl.max_batch
        ops = np.full(mx, cx.LIST_WRITE if wl.write else cx.LIST_READ, np.uint8)
        nb = np.full(mx, per, np.uint64)
        offs = (np.arange(mx, dtype=np.uint64) % SLOTS) * np.uint64(wl.bs)
        lat = np.zeros(mx, np.int64)
        buf = cx.aligned_buffer(SLOTS * wl.bs)
        if wl.write:
            buf[:] = np.frombuffer(self.rng.bytes(len(buf)), np.uint8)
        steps = np.arange(mx, dtype=np.uint64) * np.uint64(per)
        seq = 0
        batch = wl.first_batch
        n = calls = 0
        lat_sum = 0
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            if wl.random:
                if self.pos + batch > LBA_RING:
                    self.pos = 0
                lbas = self.ring[self.pos:self.pos + batch]
                self.pos += batch
            else:
                lbas = (np.uint64(seq) + steps[:batch]) % np.uint64(nblocks)
                seq = (seq + batch * per) % nblocks
            tc = time.perf_counter()
            r = v.listio(ops[:batch], lbas, nb[:batch], buf, offs[:batch], lat_ns=lat[:batch],
                         qd=wl.qd)
            t = time.perf_counter()
            if not r.ok:
                r.check()
            n += batch
            calls += 1
            lat_sum += int(lat[:batch].sum())
            if t >= end:
                break
            rate = batch / (t - tc)
            want = int(rate * min(CALL_SECONDS, seconds / 4))
            batch = min(mx, max(batch, -(-want // wl.qd) * wl.qd))
        elapsed = t - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        # this process's every thread: ours, the engine's, librbd's
        cpu_s = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
        return {"iops": n / elapsed, "mib_s": n * wl.bs / MIB / elapsed,
                "lat_us": lat_sum / n / 1e3, "ios": n, "runtime_s": elapsed, "calls": calls,
                "last_batch": batch, "cpu_s": cpu_s, "cpu_us_per_req": cpu_s * 1e6 / n}


# -- ours through NBD (information) -----------------------------------------------------------


CLK_TCK = os.sysconf("SC_CLK_TCK")




class NbdSide:
    """``cxlflash nbd --export d=direct --target rbd:...``, one server per
    run, driven by fio's nbd engine."""

    def __init__(self, lun, size, tmp, env):
        self.lun, self.size, self.tmp, self.env = lun, size, tmp, env
        self.sock = os.path.join(tmp, "nbd.sock")
        self.uri = f"nbd+unix:///d?socket={self.sock}"
        self.server_cmd = [sys.executable, "-m", "cxlflash", "nbd", "--unix", self.sock,
                           "--export", "d=direct", "--target", lun, "--exit-with-parent"]
        self.cmds = {}

    def start(self):
        log_path = os.path.join(self.tmp, "nbd.log")
        log = open(log_path, "wb")
        env = dict(self.env, PYTHONPATH=ROOT + os.pathsep + self.env.get("PYTHONPATH", ""))
        proc = subprocess.Popen(self.server_cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, env=env, cwd=self.tmp)
        log.close()
        end = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cxlflash nbd exited with {proc.returncode} at start: "
                                   f"{' '.join(self.server_cmd)}\n{self._log()}")
            if os.path.exists(self.sock):
                r = subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True,
                                   text=True)
                if r.returncode == 0:
                    if int(r.stdout) != self.size:
                        self.stop(proc)
                        raise RuntimeError(f"cxlflash nbd exports {r.stdout.strip()} bytes, "
                                           f"not {self.size}")
                    return proc
            if time.monotonic() > end:
                self.stop(proc)
                raise RuntimeError(f"cxlflash nbd did not answer in {STARTUP_TIMEOUT:g} s\n"
                                   f"{self._log()}")
            time.sleep(0.05)

    def _log(self):
        try:
            with open(os.path.join(self.tmp, "nbd.log"), errors="replace") as f:
                return f.read()[-3000:]
        except OSError as e:
            return f"(no log: {e})"

    def stop(self, proc):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self, wl, seconds):
        proc = self.start()
        try:
            cmd = ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={self.uri}", *wl.fio_opts(),
                   "--time_based", f"--runtime={int(seconds * 1000)}ms", "--output-format=json",
                   f"--output={os.path.join(self.tmp, 'nbd.json')}"]
            self.cmds[wl.name] = cmd
            t0 = cpu_ticks(proc.pid)
            res = fio_figures(run_fio(cmd, self.env), wl)
            server_s = (cpu_ticks(proc.pid) - t0) / CLK_TCK
            # the server's CPU (every thread) and fio's, the client
            res["server_cpu_s"] = server_s
            res["cpu_s"] += server_s
            res["cpu_us_per_req"] = res["cpu_s"] * 1e6 / res["ios"]
            return res
        finally:
            self.stop(proc)


# -- rows -------------------------------------------------------------------------------------




def ratio_row(what, ours, base, wl, results, errors, target):
    row = {"what": what, "ours": ours, "baseline": base, "workload": wl.name,
           "figure": wl.figure, "unit": wl.unit, "target": target}
    key = wl.figure
    o = [r[key] for r in results.get((ours, wl.name), [])]
    b = [r[key] for r in results.get((base, wl.name), [])]
    err = errors.get((ours, wl.name)) or errors.get((base, wl.name))
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
    row.update(ratio=ratio, ratios=per, spread=(min(per), max(per)) if per else (ratio, ratio),
               median_round_ratio=statistics.median(per) if per else ratio)
    if target is None:
        row["status"] = "info"
    else:
        row["status"] = "PASS" if ratio >= target else "FAIL"
    return row


def build_rows(results, errors, workloads, sides):
    rows = []
    for wl in workloads:
        if "ours" in sides:
            rows.append(ratio_row(f"{wl.what}: vLUN listio vs fio rbd ({wl.unit})", "ours",
                                  "fio", wl, results, errors, wl.target))
    for wl in workloads:
        if "nbd" in sides:
            rows.append(ratio_row(f"{wl.what}: cxlflash nbd (direct) + fio nbd vs fio rbd "
                                  f"({wl.unit}, info)", "nbd", "fio", wl, results, errors, None))
    for wl in workloads:
        if "fio2" in sides:
            rows.append(ratio_row(f"{wl.what}: fio rbd again vs fio rbd ({wl.unit}, A/A "
                                  f"control, info)", "fio2", "fio", wl, results, errors, None))
    return rows






def print_sides(results, sides, workloads, out):
    print("# per side (median over rounds): IOPS, MiB/s, mean latency per request "
          "(fio lat_ns; ours: listio's lat_ns), CPU per request, every thread (fio: its "
          "processes, start-up included; ours: this process; nbd: the server + fio)", file=out)
    for wl in workloads:
        print(f"#  {wl.what}", file=out)
        for s in sides:
            if not results.get((s, wl.name)):
                print(f"#    {s:<5} -", file=out)
                continue
            iops = median_of(results, s, wl.name, "iops")
            mib = median_of(results, s, wl.name, "mib_s")
            lat = median_of(results, s, wl.name, "lat_us")
            cpu = median_of(results, s, wl.name, "cpu_us_per_req")
            per = " ".join(f"{r[wl.figure]:.0f}" for r in results[(s, wl.name)])
            print(f"#    {s:<5} {iops:9.0f} IOPS  {mib:7.1f} MiB/s  lat {lat:8.0f} us  "
                  f"cpu {cpu:7.1f} us/req  (rounds: {per})", file=out)


# -- main -------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1 s per run, 1 round, a 256 MiB image")
    ap.add_argument("--seconds", type=float, help="time per run (default 5, --quick 1)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    ap.add_argument("--size", help="the image's size, a multiple of 256M (default 1G, "
                    "--quick 256M)")
    ap.add_argument("--warmup-ios", type=int, help="4 KiB random writes before the rounds, "
                    "so that the OSDs' PG logs are full and trimmed as in a steady state "
                    "(default 120000, --quick 0)")
    ap.add_argument("--conf", help="an existing cluster's ceph.conf (default: start a "
                    "throw-away cluster with tools/ceph-cluster)")
    ap.add_argument("--pool", default="rbd", help="the pool the image is made in (default rbd)")
    ap.add_argument("--id", default="admin", help="the client id, without 'client.' "
                    "(default admin)")
    ap.add_argument("--sides", help="comma-separated subset of: " + ", ".join(SIDES)
                    + " (default: " + ",".join(DEFAULT_SIDES) + "; fio2 is fio again, an A/A "
                    "control row that shows the harness's noise; rows of a side left out are "
                    "not printed)")
    ap.add_argument("--workloads", help="comma-separated subset of: "
                    + ", ".join(w.name for w in WORKLOADS))
    ap.add_argument("--json", metavar="OUT", help="write every figure to OUT")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)
    seconds = args.seconds or (1 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)
    size = parse_size(args.size or ("256M" if args.quick else "1G"))
    warmup_ios = args.warmup_ios if args.warmup_ios is not None else (0 if args.quick else 120000)
    if size <= 0 or size % CHUNK_BYTES:
        ap.error(f"--size must be a positive multiple of 256M (one chunk), not {size}")
    sides = DEFAULT_SIDES if not args.sides else [s.strip() for s in args.sides.split(",")]
    for s in sides:
        if s not in SIDES:
            ap.error(f"unknown side {s!r}: choose from {', '.join(SIDES)}")
    if "fio" not in sides:
        ap.error("--sides must include fio: it is every row's baseline")
    sides = [s for s in SIDES if s in sides]
    workloads = WORKLOADS
    if args.workloads:
        names = [w.strip() for w in args.workloads.split(",")]
        for n in names:
            if n not in [w.name for w in WORKLOADS]:
                ap.error(f"unknown workload {n!r}: choose from "
                         f"{', '.join(w.name for w in WORKLOADS)}")
        workloads = [w for w in WORKLOADS if w.name in names]
    tty = sys.stderr.isatty() and not args.quiet

    def progress(msg):
        if tty:
            sys.stderr.write(f"\r\x1b[K{msg}")
            sys.stderr.flush()

    def on_signal(signum, frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    t_start = time.perf_counter()
    results, errors = {}, {}
    cluster = img = None
    header = {}
    watcher = Watcher()
    tmp = tempfile.mkdtemp(prefix="rbd-ratios-")
    watcher.add({"rmtree": tmp})
    try:
        try:
            need_tools(sides)
            if args.conf:
                cluster = GivenCluster(args.conf)
            else:
                cluster = OwnCluster(max(2 << 30, 2 * size + (512 << 20)), progress, watcher)
            conf = os.path.join(tmp, "ceph.conf")
            private_conf(cluster.conf, conf, args.id)
            env = fio_env(conf)
            progress(f"creating an image of {size >> 20} MiB in pool {args.pool}")
            img = Image(conf, args.pool, args.id, size, cluster.env, watcher)
            progress(f"writing the whole image ({size >> 20} MiB)")
            fill_s, fill_mib_s, fill_cmd = fill(img, env, tmp)
            warm = None
            if warmup_ios:
                progress(f"warming up: {warmup_ios} random 4 KiB writes (the PG logs fill up)")
                warm = warm_up(img, env, tmp, warmup_ios)
            runners = {"fio": FioSide(img, env, tmp)}
            if "ours" in sides:
                try:
                    ours = OursSide(img.lun(), size, 15)
                    progress("checking what ours reads")
                    ours.check(img)
                except (OSError, ImportError) as e:
                    raise SetupError(f"ours cannot use the image ({img.lun()}): "
                                     f"{type(e).__name__}: {e}") from e
                runners["ours"] = ours
            if "nbd" in sides:
                runners["nbd"] = NbdSide(img.lun(), size, tmp, cluster.env)
            if "fio2" in sides:
                runners["fio2"] = FioSide(img, env, tmp)
        except SetupError as e:
            progress("")
            print(f"rbd_ratios: {e}", file=sys.stderr)
            return 2
        header = {
            "machine": platform.platform(), "cores": os.cpu_count(),
            "python": sys.version.split()[0], "seconds": seconds, "rounds": rounds,
            "size": size, "pool": args.pool, "image": img.name, "client_id": args.id,
            "cluster": cluster.describe(), "conf": cluster.conf,
            "fio": tool_version(["fio", "--version"]),
            "ceph": tool_version(["ceph", "--version"]),
            "lun": img.lun(), "fill_s": fill_s, "fill_mib_s": fill_mib_s,
            "fill_cmd": fill_cmd, "warmup": warm, "loadavg": loadavg(),
            "call_seconds": CALL_SECONDS,
        }
        if "ours" in runners:
            header["ours"] = runners["ours"].info
        print(f"# {header['machine']}, {header['cores']} cores, python {header['python']}; "
              f"{header['fio']}; {header['ceph']}")
        print(f"# {cluster.describe()}; image {img.spec}, {size >> 20} MiB, rbd cache off "
              f"(conf {conf}); filled in {fill_s:.1f} s ({fill_mib_s:.0f} MiB/s)")
        if warm:
            print(f"# warm-up: {warm['ios']} random 4 KiB writes in {warm['seconds']:.1f} s "
                  f"({warm['iops']:.0f} IOPS), so that the PG logs are full")
        print(f"# {rounds} rounds x {seconds:g} s per run; load average {header['loadavg']}")
        names = [s for s in SIDES if s in runners]
        for r in range(rounds):
            for wi, wl in enumerate(workloads):
                fns = []
                for name in names:
                    def side(name=name, wl=wl, r=r):
                        if (name, wl.name) in errors:
                            return
                        try:
                            res = runners[name].run(wl, seconds)
                        except (RuntimeError, ValueError, OSError, SetupError) as e:
                            errors[(name, wl.name)] = f"{type(e).__name__}: {e}"
                            return
                        res["round"] = r
                        res["load"] = loadavg()
                        results.setdefault((name, wl.name), []).append(res)
                    fns.append(side)
                from cxlflash.bench.harness import interleaved_round
                interleaved_round(fns, r + wi, before=lambda i, wl=wl, r=r: progress(
                    f"round {r + 1}/{rounds}: {wl.what}, {names[i]}"))
        progress("")
        if "ours" in runners:
            header["ours_open_s"] = runners["ours"].open_s
        header["commands"] = {
            "fio": runners["fio"].cmds,
            "nbd": ({"server": runners["nbd"].server_cmd, "fio": runners["nbd"].cmds}
                    if "nbd" in runners else None)}
    except (KeyboardInterrupt, Interrupted) as e:
        progress("")
        print(f"rbd_ratios: interrupted ({type(e).__name__}); cleaned up", file=sys.stderr)
        return 130
    finally:
        # Clean up whatever stops us; a second Ctrl-C or SIGTERM must not
        # cut the cleanup short (each step below is bounded by a timeout).
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            old.setdefault(s, signal.getsignal(s))
            signal.signal(s, signal.SIG_IGN)
        try:
            if img is not None:
                progress("removing the image")
                img.close()
        finally:
            if cluster is not None:
                progress("stopping the cluster")
                cluster.close()
            shutil.rmtree(tmp, ignore_errors=True)
            watcher.done()
            progress("")
            for s, h in old.items():
                signal.signal(s, h)

    rows = build_rows(results, errors, workloads, sides)
    print_rows(rows, sys.stdout)
    print_sides(results, names, workloads, sys.stdout)
    for (s, w), e in errors.items():
        print(f"# {s} {w} failed: {e}")
    elapsed = time.perf_counter() - t_start
    print(f"# {elapsed:.0f} s; load average at the end {loadavg()} (2 cores shared: other "
          f"processes move the figures, see the spread)")
    if args.json:
        sides_out = {}
        for (s, w), rs in results.items():
            sides_out.setdefault(s, {})[w] = {
                "iops": median_of(results, s, w, "iops"),
                "mib_s": median_of(results, s, w, "mib_s"),
                "lat_us": median_of(results, s, w, "lat_us"),
                "cpu_us_per_req": median_of(results, s, w, "cpu_us_per_req"), "runs": rs}
        with open(args.json, "w") as f:
            json.dump({"header": header,
                       "workloads": {w.name: {"what": w.what, "fio": w.fio_opts(), "qd": w.qd,
                                              "bs": w.bs, "target": w.target}
                                     for w in workloads},
                       "rows": rows, "sides": sides_out,
                       "errors": {f"{s} {w}": e for (s, w), e in errors.items()},
                       "elapsed_s": elapsed}, f, indent=1)
    failed = [r for r in rows if r["status"] in ("FAIL", "MISSING")]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
