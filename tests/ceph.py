"""A throw-away one-node Ceph cluster for the RBD tests (issue 15).

    def test_x(ceph):
        name, lun = ceph.image(64 * MIB)     # a fresh image, its LUN string
        wwid = adapter.add_lun(lun)
        ceph.rbd("info", f"rbd/{name}")      # the rbd CLI on this cluster
        ceph.resize(name, 128 * MIB)
        ceph.stop_osd(); ceph.cont_osd()     # SIGSTOP / SIGCONT: an OSD that stops answering
        ceph.restart_osd()                   # SIGTERM + start: data kept

``ceph_cluster`` (session scope) starts ONE cluster with ``tools/ceph-cluster
start DIR`` the first time a test asks for it -- the rest of the suite never
pays for it -- on a monitor port and an OSD port range of its own (so that
two test runs, or another cluster on the machine, do not collide), and
stops it at the end of the session, whether tests passed, failed or the run
was interrupted.  A *watcher* process (its own session, reading a pipe from
this process) stops it as well if the test process dies without tearing
down (SIGKILL, a crash): nothing stays running.

``ceph`` (function scope) is the same cluster seen by one test: the images
it made are removed after it (the OSD keeps every byte written in memory,
memstore: images of 64-256 MiB, 1 GiB only where little is written).  An
image still open by an adapter that outlives the test's ``ceph`` fixture
cannot be removed yet ("image still has watchers"): it is retried before
the next image is made.

If the cluster cannot start the fixture fails, loudly, with the setup log:
the RBD tests are never skipped.  ``CXLFLASH_CEPH_LOGS=DIR`` copies the
cluster's logs (setup, mon, osd, librbd clients) to DIR at the end.
"""
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(os.path.dirname(_HERE), "tools", "ceph-cluster")

def rbd_built():
    """Whether this build of cxlflash has the RBD backend (librbd at build
    time): without it there are no RBD LUNs to run the [rbd] variants on
    (CI's debug build; tests/test_rbd_build.py checks what it says)."""
    try:
        import cxlflash._core.rbd  # noqa: F401
    except ImportError:
        return False
    return True


MIB = 1 << 20
GIB = 1 << 30

#: The ``timeout=`` of the LUN strings ``image()`` makes unless told: a
#: request to an OSD that does not answer fails after this many seconds
#: (the backend's default, 30 s, would let a broken test sit for long).
DEFAULT_TIMEOUT = 10

# The watcher: waits for EOF on stdin (the test process closed the pipe,
# or died), then stops the cluster and removes its directory unless told
# "done" (the fixture did both).
_WATCHER = r"""
import shutil, subprocess, sys
word = sys.stdin.read()
if word.strip() != "done":
    subprocess.run([sys.argv[1], "stop", sys.argv[2]], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120)
    shutil.rmtree(sys.argv[2], ignore_errors=True)
"""


def _port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _pick_ports(rng):
    """A free monitor port and a range of 100 OSD ports, away from Ceph's
    defaults (3300, 6789, 6800-7300) and from the ephemeral range."""
    for _ in range(200):
        mon = rng.randrange(20000, 30000)
        osd_min = rng.randrange(10000, 19900)
        if _port_free(mon) and all(_port_free(p) for p in range(osd_min, osd_min + 8)):
            return mon, osd_min, osd_min + 99
    raise RuntimeError("no free port for the Ceph monitor in 20000-30000")


class CephCluster:
    """A running cluster: ``.dir``, ``.conf``, ``.port``; see the module's
    docstring.  Made by the ``ceph_cluster`` fixture."""

    def __init__(self, directory):
        self.dir = directory
        self.conf = os.path.join(directory, "ceph.conf")
        self.port = None
        self.env = None
        self._osd_stopped = False
        self._unremoved = []            # images a test made that were still open
        self._serial = 0
        self._watcher = None
        self.broken = None              # why the cluster is no longer usable

    # -- life cycle --------------------------------------------------------------------

    def start(self):
        rng = random.Random(os.getpid() ^ time.monotonic_ns())
        last = ""
        for _ in range(3):              # a port taken between the probe and the mon's bind
            self.port, osd_min, osd_max = _pick_ports(rng)
            self.env = dict(os.environ, CEPH_CLUSTER_PORT=str(self.port),
                            CEPH_CLUSTER_OSD_PORT_MIN=str(osd_min),
                            CEPH_CLUSTER_OSD_PORT_MAX=str(osd_max),
                            CEPH_CLUSTER_TIMEOUT="60")
            self.env.pop("CEPH_CONF", None)
            self.env.pop("CEPH_ARGS", None)
            self._start_watcher()
            p = subprocess.run([TOOL, "start", self.dir], env=self.env, capture_output=True,
                               text=True, timeout=180)
            if p.returncode == 0:
                assert p.stdout.strip() == self.conf, p.stdout
                return self
            last = p.stderr
            if "is in use" not in p.stderr:
                break
        raise RuntimeError(f"tools/ceph-cluster start {self.dir} failed:\n{last}\n"
                           f"-- {self.dir}/log/setup.log --\n{self._setup_log()}")

    def _setup_log(self):
        out = []
        logdir = os.path.join(self.dir, "log")
        for name in ("setup.log", "mon.a.log", "osd.0.log"):
            try:
                with open(os.path.join(logdir, name), errors="replace") as f:
                    text = f.read()
            except OSError as e:
                text = f"(none: {e})"
            out.append(f"== {name} (last 4000 characters)\n{text[-4000:]}")
        return "\n".join(out)

    def _start_watcher(self):
        if self._watcher is not None:
            return
        self._watcher = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, TOOL, self.dir], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            text=True)

    def stop(self):
        """Stop the daemons (SIGCONT first if the OSD was stopped) and wait."""
        try:
            subprocess.run([TOOL, "stop", self.dir], env=self.env, capture_output=True,
                           timeout=120)
        finally:
            if self._watcher is not None:
                try:
                    self._watcher.stdin.write("done")
                    self._watcher.stdin.close()
                    self._watcher.wait(30)
                except (OSError, subprocess.TimeoutExpired):
                    self._watcher.kill()
                self._watcher = None

    def pids(self):
        """{"mon.a": pid, "osd.0": pid} of the daemons running."""
        out = {}
        for d in ("mon.a", "osd.0"):
            try:
                with open(os.path.join(self.dir, "run", f"{d}.pid")) as f:
                    pid = int(f.read().strip())
                os.kill(pid, 0)
                out[d] = pid
            except (OSError, ValueError):
                pass
        return out

    # -- tools -------------------------------------------------------------------------

    def rbd(self, *args, check=True, timeout=60):
        """``rbd -c CONF ARGS...``: its stdout (raises with stderr unless
        ``check=False``, then the CompletedProcess).  A command that does
        not finish in ``timeout`` s marks the cluster broken: every later
        test that asks for it then fails at once, saying so (rather than
        each waiting out its own timeout)."""
        if self.broken:
            pytest.fail(f"the Ceph cluster stopped answering earlier in this session "
                        f"({self.broken}); see {self.dir}/log (CXLFLASH_CEPH_LOGS=DIR keeps "
                        f"it)", pytrace=False)
        try:
            p = subprocess.run(["rbd", "-c", self.conf, *map(str, args)], env=self.env,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.broken = (f"rbd {' '.join(map(str, args))[:100]} took more than {timeout} s; "
                           f"daemons running: {self.pids()}")
            raise
        if not check:
            return p
        if p.returncode != 0:
            raise AssertionError(f"rbd {' '.join(map(str, args))}: exit {p.returncode}: "
                                 f"{p.stderr.strip()}")
        return p.stdout

    def lun(self, name, timeout=DEFAULT_TIMEOUT, pool="rbd"):
        """The LUN string of image ``name``."""
        return f"rbd:{pool}/{name}?conf={self.conf}&id=admin&timeout={timeout}"

    def create(self, size, name=None):
        """Create an image of ``size`` bytes; its name."""
        self._retry_removes()
        if name is None:
            self._serial += 1
            name = f"t{self._serial}-{uuid.uuid4().hex[:8]}"
        self.rbd("create", "--size", f"{size // MIB}M" if size % MIB == 0 else f"{size}B",
                 f"rbd/{name}")
        return name

    def remove(self, name):
        """Remove image ``name``; False if it is still open somewhere."""
        p = self.rbd("rm", "--no-progress", f"rbd/{name}", check=False, timeout=30)
        return p.returncode == 0 or "No such file" in p.stderr

    def _retry_removes(self):
        self._unremoved = [n for n in self._unremoved if not self.remove(n)]

    def resize(self, name, size):
        """``rbd resize`` (shrinking allowed) behind the driver's back."""
        self.rbd("resize", "--allow-shrink", "--no-progress", "--size",
                 f"{size // MIB}M" if size % MIB == 0 else f"{size}B", f"rbd/{name}")

    def size(self, name):
        import json
        return json.loads(self.rbd("info", "--format", "json", f"rbd/{name}"))["size"]

    # -- faults ------------------------------------------------------------------------

    def _osd_pid(self):
        pid = self.pids().get("osd.0")
        assert pid is not None, f"osd.0 is not running under {self.dir}"
        return pid

    def stop_osd(self):
        """SIGSTOP the OSD: a cluster that stops answering (sockets stay open)."""
        os.kill(self._osd_pid(), signal.SIGSTOP)
        self._osd_stopped = True

    def cont_osd(self):
        """SIGCONT the OSD."""
        os.kill(self._osd_pid(), signal.SIGCONT)
        self._osd_stopped = False

    def restart_osd(self):
        """Stop the OSD as an administrator would (SIGTERM, memstore saves
        its objects) and start it again; waits until it is up."""
        if self._osd_stopped:
            self.cont_osd()
        p = subprocess.run([TOOL, "restart-osd", self.dir], env=self.env, capture_output=True,
                           text=True, timeout=180)
        assert p.returncode == 0, f"restart-osd: {p.stderr}\n{self._setup_log()}"


class CephTest:
    """The cluster as one test sees it: ``image()`` makes images that are
    removed after the test; everything else is the cluster's."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.images = []

    def __getattr__(self, name):
        return getattr(self.cluster, name)

    def image(self, size=64 * MIB, timeout=DEFAULT_TIMEOUT):
        """A fresh image of ``size`` bytes: (name, LUN string)."""
        name = self.cluster.create(size)
        self.images.append(name)
        return name, self.cluster.lun(name, timeout)

    def cleanup(self):
        c = self.cluster
        if c._osd_stopped:
            c.cont_osd()
        if not c.broken:
            for n in self.images:
                if not c.remove(n):
                    c._unremoved.append(n)
        self.images = []


@pytest.fixture(scope="session")
def ceph_cluster():
    directory = tempfile.mkdtemp(prefix="cxlflash-ceph-")
    cluster = CephCluster(directory)
    try:
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            pytest.fail(f"the Ceph cluster for the RBD tests did not start: {e}", pytrace=False)
        yield cluster
    finally:
        cluster.stop()
        left = cluster.pids()
        keep = os.environ.get("CXLFLASH_CEPH_LOGS")
        if keep:                        # the daemons' and clients' logs, to read after the run
            shutil.copytree(os.path.join(directory, "log"), keep, dirs_exist_ok=True)
        shutil.rmtree(directory, ignore_errors=True)
        assert not left, f"Ceph daemons still running after stop: {left}"


@pytest.fixture
def ceph(ceph_cluster):
    t = CephTest(ceph_cluster)
    try:
        yield t
    finally:
        t.cleanup()
