"""Faults of the shared driver (issue 10, "Faults"), with real processes:
clients killed with SIGKILL at random points (holding contexts, handles
and clones, or in the middle of a request), a daemon killed under its
clients, hostile bytes on the socket, and processes of other users.

The daemons are real ``cxlflash serve`` processes (``daemon_process``).
Every client here is a separate program (``fault_client.py`` run by a
fresh interpreter), never a fork of the test, except where a fork is the
point (a child writing on its parent's socket).
"""
import errno
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import given, strategies as st

import cxlflash
from cxlflash import uapi
from cxlflash.server import wire
import daemon_process
from fuzzing import fuzz_settings

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT = os.path.join(HERE, "fault_client.py")
CHUNK_BLOCKS = 65536                    # 4K blocks per chunk
VIRTUAL_SIZE = 1 << 40                  # the daemon's in-memory LUN (sparse)
DIRECT_SIZE = 1 << 30                   # a second LUN, for direct handles
NOBODY = 65534

# -- daemons ------------------------------------------------------------------------

def _env():
    env = daemon_process.environment()
    env["PYTHONPATH"] = os.pathsep.join([HERE, env["PYTHONPATH"]])
    return env


class Daemon:
    """``cxlflash serve`` (a real process) with one in-memory LUN of
    VIRTUAL_SIZE bytes on ``socket``, mode 0666 in a directory anyone may
    enter (another uid must reach it)."""

    def __init__(self, directory, path=None):
        self.directory = directory
        self.socket = path or os.path.join(directory, "cxlflash.sock")
        self.start()

    def start(self):
        """Start it (again: a killed daemon's stale socket is replaced)."""
        self.proc_ = daemon_process.start(self.directory, "--size", str(VIRTUAL_SIZE),
                                          "--mode", "0666", socket_path=self.socket)
        self.proc = self.proc_.proc
        self.pid = self.proc.pid

    def log(self):
        return self.proc_.log()

    def alive(self):
        return self.proc.poll() is None

    def fds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self):
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def kill(self):
        self.proc_.kill()

    def stop(self):
        """SIGTERM: it must exit 0 (every context released, every LUN
        closed); a daemon a test killed is only waited for."""
        if self.alive():
            self.proc_.stop()
        else:
            self.proc_.kill()


def _tmpdir():
    d = tempfile.mkdtemp(prefix="cxlflash-faults-")
    os.chmod(d, 0o755)                     # another uid must reach the socket
    return d


class World:
    """A daemon and an observer: this process, connected, with a pattern on
    a virtual LUN it keeps for the whole module."""

    def __init__(self):
        self.dir = _tmpdir()
        self.daemon = Daemon(self.dir)
        self.adapter = cxlflash.connect(self.daemon.socket)
        self.vwwid = self.adapter.luns()[0]
        self.dwwid = self.adapter.add_lun(None, size=DIRECT_SIZE)
        self.ctx = self.adapter.open_disk(self.vwwid).attach()
        self.vlun = self.ctx.create_virtual(3 * CHUNK_BLOCKS)
        self.pattern = os.urandom(4096) * 8
        self.vlun.write(CHUNK_BLOCKS + 5, self.pattern)
        self.context_id = self.ctx.context_id

    def intact(self):
        """The observer's context and data are untouched."""
        assert self.ctx.context_id == self.context_id
        assert bytes(self.vlun.read(CHUNK_BLOCKS + 5, 8)) == self.pattern
        t0 = time.monotonic()
        while True:        # raw connections of this process: released as they close
            mine = [c["context_id"] for c in self.adapter.status()["contexts"]
                    if c["pid"] == os.getpid()]
            if mine == [self.context_id] or time.monotonic() - t0 > 10:
                break
            time.sleep(0.005)
        assert mine == [self.context_id]

    def close(self):
        self.adapter.close()
        self.daemon.stop()


@pytest.fixture(scope="module")
def world():
    w = World()
    yield w
    w.close()


def wait_settled(world, timeout=20):
    """Poll the daemon's status (as another client would) until only the
    observer holds anything: no other context, every chunk of the virtual
    LUN free but the observer's, the direct LUN unused.  Returns the
    status and the seconds it took."""
    me = os.getpid()
    t0 = time.monotonic()
    while True:
        s = world.adapter.status()
        others = [c for c in s["contexts"] if c["pid"] != me]
        mine = sum(c["chunks"] for c in s["contexts"] if c["pid"] == me)
        luns = {lun["wwid"]: lun for lun in s["luns"]}
        v, d = luns[world.vwwid.hex()], luns[world.dwwid.hex()]
        if not others and v["chunks_free"] + mine == v["chunks_total"] \
                and v["users"] == 1 and d["users"] == 0:
            return s, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"the daemon did not take everything back within "
                                 f"{timeout} s: {json.dumps(s)}\n{world.daemon.log()}")
        time.sleep(0.002)


#: Runs its arguments as a child and exits with its status: a client
#: started through it is not a child of this process (VLUN_CLONE takes a
#: context of the caller's parent, exec or not, as the kernel does).
GRANDCHILD = [sys.executable, "-c",
              "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]


def client(sock, *args, uid=None, env=None, unrelated=False):
    """Start fault_client.py (a fresh interpreter) in its own process group;
    ``unrelated``: as a grandchild, not a child, of this process."""
    e = _env()
    if uid is not None:
        e["FAULT_CLIENT_UID"] = str(uid)
    e.update(env or {})
    return subprocess.Popen((GRANDCHILD if unrelated else []) +
                            [sys.executable, CLIENT, sock] + [str(a) for a in args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=e, text=True,
                            start_new_session=True)


def read_line(p, timeout=30):
    r, _, _ = select.select([p.stdout], [], [], timeout)
    assert r, f"the client said nothing within {timeout} s"
    line = p.stdout.readline()
    if not line:
        p.wait()
        raise AssertionError(f"the client exited {p.returncode}:\n{p.stderr.read()}")
    return line.split()


def kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()
    p.stdout.close()
    p.stderr.close()


# -- kill -9 of clients -------------------------------------------------------------------


def test_kill9_of_a_holder_and_its_orphaned_clone(world):
    """A client holding a context with a virtual LUN, a direct LUN and a
    forked child's clone is killed: the child's clone goes on reading the
    parent's data; when the child is killed too, everything comes back."""
    p = client(world.daemon.socket, "hold", 7, "child")
    try:
        word, cid, child = read_line(p)
        assert word == "ready"
        s = world.adapter.status()
        held = {c["pid"]: c for c in s["contexts"]}
        assert held[p.pid]["context_id"] == int(cid) and held[p.pid]["chunks"] == 7
        assert held[p.pid]["handles"] == 2
        assert held[int(child)]["chunks"] == 7             # the clone
        os.kill(p.pid, signal.SIGKILL)
        assert read_line(p) == ["orphan", "ok"]             # the child's stdout
        # The reaper reclaims the holder's context once it sees the last copy
        # of its adapter fd close (asynchronously): the clone stays meanwhile.
        deadline = time.monotonic() + 10
        while True:
            s = world.adapter.status()
            others = [c["pid"] for c in s["contexts"] if c["pid"] != os.getpid()]
            if others == [int(child)] or time.monotonic() > deadline:
                break
            assert int(child) in others
            time.sleep(0.02)
        assert others == [int(child)]
    finally:
        kill_group(p)
    wait_settled(world)
    world.intact()
    log = world.daemon.log()                   # one line per reclaim, per disconnect
    assert f"of pid {p.pid} (7 chunks)" in log and f"of pid {child} (7 chunks)" in log
    assert f"pid {p.pid} disconnected" in log


def test_kill9_in_the_middle_of_requests(world):
    """Clients that loop over ioctls, I/O and cloning children are killed
    (the whole group) after a random delay, four at a time, many times:
    each time every chunk, context and LUN user comes back, and the
    observer's context and data are untouched."""
    rnd = random.Random(10)
    rounds, batch = 10, 4
    kills = 0
    wait_settled(world)
    fds, threads = quiet_fds(world), world.daemon.threads()
    for r in range(rounds):
        procs = [client(world.daemon.socket, "churn", rnd.randrange(1 << 30))
                 for _ in range(batch)]
        try:
            for p in procs:
                assert read_line(p) == ["go"]
            order = list(procs)
            rnd.shuffle(order)
            for p in order:
                time.sleep(rnd.random() * 0.15)
                assert p.poll() is None, p.stderr.read()
                os.killpg(p.pid, signal.SIGKILL)
                kills += 1
        finally:
            for p in procs:
                kill_group(p)
        wait_settled(world)
        world.intact()
        assert world.daemon.alive()
    assert kills == rounds * batch
    s = world.adapter.status()
    assert s["counters"]["reclaims"] >= kills
    # No descriptor or thread of the dead stays behind in the daemon.
    wait_fds(world.daemon, fds)
    t0 = time.monotonic()
    while world.daemon.threads() != threads and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert world.daemon.threads() == threads


RAW_AND_GONE = """
import os, sys
sys.path.insert(0, %r)
import test_daemon_faults as T
from cxlflash import uapi
from cxlflash.server import wire
r = T.Raw(sys.argv[1])
wwid = bytes.fromhex(sys.argv[2])
cid = r.attach(wwid)
hdr = uapi.dk_cxlflash_hdr(flags=os.O_RDWR)
for _ in range(int(sys.argv[3])):
    r.send(T.frame(wire.OP_DISK_IOCTL, uapi.DK_CXLFLASH_USER_VIRTUAL, T._disk(wwid) + bytes(
        uapi.dk_cxlflash_uvirtual(hdr=hdr, context_id=cid, lun_size=3 * T.CHUNK_BLOCKS))))
a = uapi.dk_cxlflash_attach(hdr=hdr)
r.send(T.frame(wire.OP_DISK_IOCTL, uapi.DK_CXLFLASH_ATTACH, T._disk(wwid) + bytes(a)))
r.send(T.frame(wire.OP_TABLES))
os._exit(0)        # before any reply: an adapter fd and tables are in flight
""" % HERE


def test_a_client_gone_before_its_replies(world):
    """A client that sends requests (chunks to allocate, an ATTACH whose
    adapter fd the reply carries, its tables) and exits without reading a
    reply: the daemon's replies meet a closed socket, and everything the
    requests created comes back."""
    for n in (0, 1, 5, 50):
        p = subprocess.run([sys.executable, "-c", RAW_AND_GONE, world.daemon.socket,
                            world.vwwid.hex(), str(n)], capture_output=True, text=True,
                           env=_env(), timeout=60)
        assert p.returncode == 0, p.stderr
        wait_settled(world)
    assert world.daemon.alive()
    world.intact()


def test_no_pe_leaks_after_kills(world):
    """After the kills, every PE is free again: this process can attach
    as many contexts as the driver has PEs, less the one it holds."""
    wait_settled(world)
    disk = world.adapter.open_disk(world.vwwid)
    got = []
    try:
        with pytest.raises(OSError) as e:
            for _ in range(600):
                got.append(disk.attach())
        assert len(got) == 512 - 1, (len(got), e.value)
    finally:
        for c in got:
            c.close()
    wait_settled(world)


def test_reclaim_time_of_1000_chunks(world, capsys):
    """kill -9 of a client holding 1000 chunks: the time until status()
    shows them free, from the kill and from the client's death (waitpid),
    printed for the lead's note."""
    total, after = [], []
    for _ in range(5):
        p = client(world.daemon.socket, "hold", 1000)
        try:
            assert read_line(p)[0] == "ready"
            s = world.adapter.status()
            assert [c["chunks"] for c in s["contexts"] if c["pid"] == p.pid] == [1000]
            t0 = time.monotonic()
            os.kill(p.pid, signal.SIGKILL)
            _, status = os.waitpid(p.pid, 0)
            p.returncode = -signal.SIGKILL
            t1 = time.monotonic()
            while True:
                s = world.adapter.status()
                if not any(c["pid"] == p.pid for c in s["contexts"]):
                    v = [lun for lun in s["luns"] if lun["wwid"] == world.vwwid.hex()][0]
                    mine = sum(c["chunks"] for c in s["contexts"])
                    if v["chunks_free"] + mine == v["chunks_total"]:
                        break
                assert time.monotonic() - t0 < 10, world.daemon.log()
            t2 = time.monotonic()
            total.append(t2 - t0)
            after.append(t2 - t1)
        finally:
            kill_group(p)
    with capsys.disabled():
        print("\nreclaim of 1000 chunks after kill -9: from the kill "
              + ", ".join(f"{t * 1000:.1f}" for t in total) + " ms; from the "
              "client's death " + ", ".join(f"{t * 1000:.1f}" for t in after) + " ms")
    assert sorted(after)[len(after) // 2] < 0.1        # the median: well under 100 ms
    world.intact()


# -- the daemon dies -----------------------------------------------------------------------


def _backing_fds():
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "cxlflash-lun" in os.readlink(f"/proc/self/fd/{fd}"):
                out.append(int(fd))
        except OSError:
            pass
    return out


def test_a_client_whose_daemon_dies():
    d = Daemon(_tmpdir())
    before = set(_backing_fds())
    a = cxlflash.connect(d.socket)
    try:
        ctx = a.open_disk(a.luns()[0]).attach()
        v = ctx.create_virtual(CHUNK_BLOCKS)
        v.write(0, b"D" * 4096)
        cid, h = ctx.context_id, v.handle
        assert set(_backing_fds()) - before                # the backing arrived
        ch = a._client()
        d.kill()
        t0 = time.monotonic()
        while not ch.dead and time.monotonic() - t0 < 5:
            time.sleep(0.001)
        assert ch.dead                    # the watcher saw the hang-up at once
        with pytest.raises(cxlflash.CxlFlashError) as e:
            a.luns()
        assert e.value.errno == errno.ENODEV and "is gone" in str(e.value)
        with pytest.raises(cxlflash.CxlFlashError) as e:
            ctx.create_virtual(10)
        assert e.value.errno == errno.ENODEV and "is gone" in str(e.value)
        for fn in (lambda: a.read(cid, h, 0, 1), lambda: a.write(cid, h, 0, b"x" * 4096),
                   lambda: v.read(0, 1)):
            with pytest.raises(cxlflash.AfuError) as e:
                fn()
            assert e.value.afu_rc == 0x21
        assert set(_backing_fds()) - before == set()       # closed in the client
        # A new daemon on the same path: like reloading the kernel driver.
        d.start()
        b = cxlflash.connect(d.socket)
        try:
            assert b.status()["contexts"] == []
            c2 = b.open_disk(b.luns()[0]).attach()
            assert bytes(c2.create_virtual(1).read(0, 1)) == bytes(4096)
            with pytest.raises(cxlflash.CxlFlashError) as e:
                a.luns()                                   # the old one stays gone
            assert e.value.errno == errno.ENODEV
            c2.close()
        finally:
            b.close()
    finally:
        a.close()
        d.stop()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_busy_client_whose_daemon_dies(how):
    """Threads of a client in the middle of ioctls, synchronous and
    asynchronous I/O when the daemon is killed, or stopped (SIGTERM: it
    must still exit 0): each ends with ENODEV or AFU rc 0x21 (none hangs,
    none succeeds afterwards)."""
    import threading
    d = Daemon(_tmpdir())
    a = cxlflash.connect(d.socket)
    try:
        disk = a.open_disk(a.luns()[0])
        ctx = disk.attach()
        v = ctx.create_virtual(4 * CHUNK_BLOCKS)
        v.write(0, b"B" * 4096 * 64)
        stop = threading.Event()
        ends = {}

        def loop(name, fn):
            n = 0
            try:
                while not stop.is_set():
                    fn()
                    n += 1
                ends[name] = ("stopped", n)
            except cxlflash.AfuError as e:
                ends[name] = ("afu", e.afu_rc, n)
            except OSError as e:
                ends[name] = ("errno", e.errno, n, str(e))
            except Exception as e:              # noqa: BLE001 -- reported below
                ends[name] = ("other", repr(e), n)

        def ioctls():
            c = disk.attach()
            w = c.create_virtual(CHUNK_BLOCKS)
            w.set_size(2 * CHUNK_BLOCKS)
            c.close()

        work = {"ioctls": ioctls,
                "read": lambda: v.read(7, 8),
                "write": lambda: v.write(9, b"w" * 4096 * 4),
                "async": lambda: v.aread(3, 16).result(10),
                "verify": lambda: a.status()}
        threads = [threading.Thread(target=loop, args=kv, daemon=True)
                   for kv in work.items()]
        for t in threads:
            t.start()
        time.sleep(0.3)
        if how == "SIGKILL":
            d.kill()
        else:
            d.stop()                              # asserts exit status 0
        for t in threads:
            t.join(20)
        stop.set()
        assert not any(t.is_alive() for t in threads), ends
        assert set(ends) == set(work), ends       # no thread died of anything else
        for name, end in ends.items():
            assert end[0] in ("afu", "errno"), (name, end)
            assert end[1] == (0x21 if end[0] == "afu" else errno.ENODEV), (name, end)
            assert end[2] > 0, (name, end)             # it was working before
    finally:
        a.close()
        d.stop()


# -- hostile messages ---------------------------------------------------------------------

HELLO = wire.REQUEST.pack(wire.MAGIC, wire.VERSION, wire.OP_HELLO, 0, 0)
_CREDS = struct.Struct("iII")


def frame(op, request=0, payload=b"", *, magic=wire.MAGIC, version=wire.VERSION,
          length=None):
    return wire.REQUEST.pack(magic, version, op, request,
                             len(payload) if length is None else length) + payload


class Raw:
    """A connection that speaks bytes, not the client library."""

    def __init__(self, path, hello=True):
        self.fds = []                  # descriptors received (adapter fds ...)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(10)
        if hello:
            self.send(HELLO)
            err, body = self.reply()
            assert err == 0 and len(body) == wire.HELLO_REPLY.size

    def send(self, data, fds=(), creds=None):
        anc = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS,
                _CREDS.pack(*(creds or (os.getpid(), os.getuid(), os.getgid()))))]
        if fds:
            anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        struct.pack(f"{len(fds)}i", *fds)))
        try:
            self.sock.sendmsg([data], anc)
        except (BrokenPipeError, ConnectionResetError):
            pass                                   # the daemon closed it already

    def _recv(self, n):
        """n bytes, closing any descriptors that come along; b'' at EOF."""
        buf = b""
        while len(buf) < n:
            try:
                data, anc, _, _ = self.sock.recvmsg(n - len(buf), socket.CMSG_SPACE(64))
            except ConnectionResetError:
                return b""
            for level, kind, body in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.fds.extend(struct.unpack(f"{len(body) // 4}i",
                                                  body[:len(body) // 4 * 4]))
            if not data:
                return b""
            buf += data
        return buf

    def reply(self):
        """(errno, payload) of the next reply, or None when the daemon
        closed the connection."""
        head = self._recv(wire.HEADER_SIZE)
        if not head:
            return None
        magic, version, op, err, n = wire.REPLY.unpack(head)
        assert magic == wire.MAGIC and version == wire.VERSION
        body = self._recv(n) if n else b""
        return err, body

    def drain(self):
        """Every reply until the daemon closes the connection."""
        out = []
        while True:
            r = self.reply()
            if r is None:
                return out
            out.append(r)

    def attach(self, wwid):
        """A context of this connection's process (its adapter fd kept)."""
        a = uapi.dk_cxlflash_attach(hdr=uapi.dk_cxlflash_hdr(flags=os.O_RDWR))
        self.send(frame(wire.OP_DISK_IOCTL, uapi.DK_CXLFLASH_ATTACH,
                        _disk(wwid) + bytes(a)))
        err, body = self.reply()
        assert err == 0, body
        (n,) = wire.COUNT.unpack_from(body)
        return uapi.dk_cxlflash_attach.from_buffer_copy(body[4:4 + n]).context_id

    def close(self):
        self.sock.close()
        wire.close_fds(self.fds)
        self.fds.clear()


def quiet_fds(w, timeout=10):
    """The daemon's descriptor count once only the observer holds a context
    and its connections and descriptors stay put (nothing being closed or
    reclaimed): the baseline of a leak check."""
    t0 = time.monotonic()
    last = None
    while True:
        s = w.adapter.status()
        now = (s["counters"]["connections"], w.daemon.fds())
        if len(s["contexts"]) == 1 and now == last:
            return now[1]
        last = now
        assert time.monotonic() - t0 < timeout, json.dumps(s)
        time.sleep(0.03)


def wait_fds(daemon, baseline, timeout=10):
    t0 = time.monotonic()
    while daemon.fds() != baseline:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"the daemon holds {daemon.fds()} fds, "
                                 f"{baseline} before: "
                                 f"{sorted(os.listdir(f'/proc/{daemon.pid}/fd'))}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def hostile():
    """A daemon for hostile peers (its own: some messages reach the
    administrator's operations) and an observer."""
    w = World()
    yield w
    w.close()


def _closed(r):
    """The daemon closed the connection (with no reply or after refusals)."""
    return r.drain() is not None


def _check_survived(w, baseline):
    assert w.daemon.alive(), w.daemon.log()
    w.intact()
    wait_fds(w.daemon, baseline)


def _disk(wwid, has_arg=1, port=0, flags=os.O_RDWR):
    return wire.DISK.pack(wwid, port, flags, has_arg)


# Hand-written messages that break the framing: the daemon must close the
# connection (after a HELLO or before one).
BROKEN = {
    "random bytes": os.urandom(64),
    "bad magic": frame(wire.OP_LUNS, magic=b"XXXX"),
    "bad version": frame(wire.OP_LUNS, version=wire.VERSION + 1),
    "version 0": frame(wire.OP_LUNS, version=0),
    "unknown op 0": frame(0),
    "unknown op 12": frame(wire.OP_SPAWN + 1),
    "unknown op 0xffff": frame(0xFFFF),
    "oversize length": frame(wire.OP_LUNS, length=wire.MAX_REQUEST + 1),
    "length 2**32-1": frame(wire.OP_LUNS, length=0xFFFFFFFF),
    "truncated header": HELLO[:7],
    "truncated payload": frame(wire.OP_OPEN_DISK, length=wire.DISK.size) + b"\0" * 5,
    "payload on LUNS": frame(wire.OP_LUNS, payload=b"x"),
    "payload on TABLES": frame(wire.OP_TABLES, payload=b"x"),
    "payload on SPAWN": frame(wire.OP_SPAWN, payload=b"\0" * 4),
    "short OPEN_DISK": frame(wire.OP_OPEN_DISK, payload=b"\0" * (wire.DISK.size - 1)),
    "long OPEN_DISK": frame(wire.OP_OPEN_DISK, payload=b"\0" * (wire.DISK.size + 1)),
    "short BACKING": frame(wire.OP_BACKING, payload=b"\0" * 15),
    "long BACKING": frame(wire.OP_BACKING, payload=b"\0" * 17),
    "disk ioctl without its disk": frame(wire.OP_DISK_IOCTL, uapi.DK_CXLFLASH_ATTACH,
                                         b"\0" * (wire.DISK.size - 1)),
    "disk ioctl has_arg 2": frame(wire.OP_DISK_IOCTL, uapi.DK_CXLFLASH_ATTACH,
                                  wire.DISK.pack(bytes(16), 0, 2, 2) + bytes(144)),
    "disk ioctl has_arg 2**32-1": frame(wire.OP_DISK_IOCTL, uapi.DK_CXLFLASH_DETACH,
                                        wire.DISK.pack(bytes(16), 0, 2, 0xFFFFFFFF)),
    "structure bytes after has_arg 0": frame(wire.OP_DISK_IOCTL, uapi.DK_CXLFLASH_DETACH,
                                             wire.DISK.pack(bytes(16), 0, 2, 0) + b"x"),
    "host ioctl without flags": frame(wire.OP_HOST_IOCTL,
                                      uapi.HT_CXLFLASH_LUN_PROVISION, b"\0" * 7),
    "host ioctl has_arg 2": frame(wire.OP_HOST_IOCTL, uapi.HT_CXLFLASH_LUN_PROVISION,
                                  struct.pack("<II", 2, 0)),
    "host ioctl readable 7": frame(wire.OP_HOST_IOCTL, uapi.HT_CXLFLASH_LUN_PROVISION,
                                   struct.pack("<II", 1, 7)),
    "short ADD_LUN": frame(wire.OP_ADMIN, wire.ADMIN_ADD_LUN, bytes(wire.ADD_LUN.size - 1)),
    "short CREATE_LUN": frame(wire.OP_ADMIN, wire.ADMIN_CREATE_LUN,
                              bytes(wire.CREATE_LUN.size - 1)),
    "long CREATE_LUN": frame(wire.OP_ADMIN, wire.ADMIN_CREATE_LUN,
                             bytes(wire.CREATE_LUN.size + 1)),
    "short DELETE_LUN": frame(wire.OP_ADMIN, wire.ADMIN_DELETE_LUN, bytes(15)),
    "BEGIN_RESET with bytes": frame(wire.OP_ADMIN, wire.ADMIN_BEGIN_RESET, b"x"),
    "END_RESET short": frame(wire.OP_ADMIN, wire.ADMIN_END_RESET, b"\1\0\0"),
    "FAIL with bytes": frame(wire.OP_ADMIN, wire.ADMIN_FAIL, b"\0"),
    "short INJECT_FAULT": frame(wire.OP_ADMIN, wire.ADMIN_INJECT_FAULT,
                                bytes(wire.FAULT.size - 1)),
    "SIGNAL_WAITERS with bytes": frame(wire.OP_ADMIN, wire.ADMIN_SIGNAL_WAITERS, b"\0"),
    "short LUN_MODE": frame(wire.OP_ADMIN, wire.ADMIN_SET_LUN_MODE, bytes(7)),
    "long LUN_MODE": frame(wire.OP_ADMIN, wire.ADMIN_SET_LUN_MODE, bytes(9)),
}


@pytest.mark.parametrize("hello", [True, False], ids=["after-hello", "before-hello"])
def test_broken_messages_close_the_connection(hostile, hello):
    w = hostile
    baseline = quiet_fds(w)
    bad0 = w.adapter.status()["counters"]["bad_messages"]
    for name, data in BROKEN.items():
        r = Raw(w.daemon.socket, hello=hello)
        r.send(data)
        if name.startswith("truncated"):
            r.sock.shutdown(socket.SHUT_WR)        # the rest never comes
        replies = r.drain()
        assert replies == [], (name, replies)      # closed, nothing answered
        r.close()
        assert w.daemon.alive(), (name, w.daemon.log())
    _check_survived(w, baseline)
    assert w.adapter.status()["counters"]["bad_messages"] - bad0 == len(BROKEN)


def test_requests_before_hello_close_the_connection(hostile):
    w = hostile
    baseline = quiet_fds(w)
    for op in sorted(wire.OPS - {wire.OP_HELLO}):
        r = Raw(w.daemon.socket, hello=False)
        r.send(frame(op))
        assert r.drain() == [], op
        r.close()
    _check_survived(w, baseline)


def _every_structure_size():
    """For every ioctl the driver knows, structures of the wrong size:
    the driver refuses each with an errno (EFAULT where the kernel's
    copy_from_user would fault, EINVAL ...), in-protocol."""
    import ctypes
    for request, struct_type in sorted(uapi.DK_IOCTLS.items()):
        n = ctypes.sizeof(struct_type)
        for size in (0, 1, 8, n - 1):
            yield "disk", request, size
    for request, struct_type in sorted(uapi.HT_IOCTLS.items()):
        n = ctypes.sizeof(struct_type)
        for size in (0, 1, n - 1):
            yield "host", request, size


def test_wrong_structure_sizes_are_refused_in_protocol(hostile):
    """A structure shorter than its ioctl's, for every ioctl: an errno
    reply (the connection goes on), and the observer is untouched."""
    w = hostile
    baseline = quiet_fds(w)
    r = Raw(w.daemon.socket)
    for kind, request, size in _every_structure_size():
        if kind == "disk":
            data = frame(wire.OP_DISK_IOCTL, request, _disk(w.vwwid) + bytes(size))
        else:
            data = frame(wire.OP_HOST_IOCTL, request, struct.pack("<II", 1, 1) + bytes(size))
        r.send(data)
        got = r.reply()
        assert got is not None and got[0] in (errno.EFAULT, errno.EINVAL), \
            (kind, hex(request), size, got)
    # Longer than the structure: the driver reads what it needs, and the
    # reply carries the structure back.
    r.send(frame(wire.OP_DISK_IOCTL, uapi.DK_CXLFLASH_VERIFY,
                 _disk(w.vwwid) + bytes(4096)))
    got = r.reply()
    assert got is not None and got[0] == errno.EINVAL      # context 0 is not ours
    r.send(frame(wire.OP_LUNS))
    assert r.reply()[0] == 0                                # still served
    r.close()
    _check_survived(w, baseline)


def test_unknown_requests_are_refused_in_protocol(hostile):
    w = hostile
    baseline = quiet_fds(w)
    r = Raw(w.daemon.socket)
    for request in (0, 1, 0xC090CA7F, 0xFFFFFFFF, uapi.DK_CXLFLASH_ATTACH ^ 0x10000):
        r.send(frame(wire.OP_DISK_IOCTL, request, _disk(w.vwwid) + bytes(256)))
        assert r.reply()[0] in (errno.EINVAL, errno.ENOTTY), hex(request)
        r.send(frame(wire.OP_HOST_IOCTL, request, struct.pack("<II", 1, 1) + bytes(64)))
        assert r.reply()[0] in (errno.EINVAL, errno.ENOTTY), hex(request)
    for action in (0, 10, 0xFFFFFFFF):
        r.send(frame(wire.OP_ADMIN, action))
        assert r.reply()[0] == errno.EINVAL
    for wwid in (bytes(16), b"\xff" * 16):
        r.send(frame(wire.OP_OPEN_DISK, 0, _disk(wwid, 0)))
        assert r.reply()[0] == errno.ENODEV
        r.send(frame(wire.OP_BACKING, 0, wwid))
        assert r.reply()[0] == errno.ENODEV
    r.send(frame(wire.OP_OPEN_DISK, 0, _disk(w.vwwid, 0, port=31)))
    assert r.reply()[0] == errno.ENODEV
    r.send(frame(wire.OP_OPEN_DISK, 0, _disk(w.vwwid, 0, port=0xFFFFFFFF)))
    assert r.reply()[0] == errno.ENODEV
    # Open flags out of range: the disk is not open O_RDWR -> EPERM, as the
    # kernel refuses DK_CXLFLASH_* on a disk not opened read-write.
    attach = uapi.dk_cxlflash_attach(hdr=uapi.dk_cxlflash_hdr(flags=os.O_RDWR))
    for flags in (-1, 0x7FFFFFFF, -0x80000000, os.O_ACCMODE, os.O_RDONLY):
        r.send(frame(wire.OP_DISK_IOCTL, uapi.DK_CXLFLASH_ATTACH,
                     _disk(w.vwwid, flags=flags) + bytes(attach)))
        assert r.reply()[0] == errno.EPERM, flags
    bad_path = wire.ADD_LUN.pack(0, 0, 1, 0, bytes(16))
    for path in (b"relative", b"/no/such/file", b"/", b"\xff\xfe", b"/a\0b"):
        r.send(frame(wire.OP_ADMIN, wire.ADMIN_ADD_LUN, bad_path + path))
        assert r.reply()[0] != 0, path
    r.send(frame(wire.OP_LUNS))
    assert r.reply() == (0, w.vwwid + w.dwwid)
    r.close()
    _check_survived(w, baseline)


def test_pipelined_requests_are_answered_in_order(hostile):
    """Requests sent back to back in one write (read together by the
    daemon) are each answered, in order, as the sender's."""
    w = hostile
    r = Raw(w.daemon.socket)
    ops = [wire.OP_LUNS, wire.OP_INFO, wire.OP_TABLES] * 40
    r.send(b"".join(frame(op) for op in ops) + frame(wire.OP_OPEN_DISK, 0,
                                                     _disk(bytes(16), 0)))
    replies = [r.reply() for _ in ops]
    assert [e for e, _ in replies] == [0] * len(ops)
    assert all(body == w.vwwid + w.dwwid for _, body in replies[::3])
    assert all(len(body) == wire.INFO_REPLY.size for _, body in replies[1::3])
    assert r.reply()[0] == errno.ENODEV
    r.close()


def test_descriptors_attached_to_a_request(hostile):
    """SCM_RIGHTS on a request: the connection is closed and every
    descriptor the daemon received is closed again."""
    w = hostile
    baseline = quiet_fds(w)
    with open(os.devnull) as f:
        for n in (1, 2, 3, 16):
            for hello in (True, False):
                r = Raw(w.daemon.socket, hello=hello)
                r.send(frame(wire.OP_LUNS) if hello else HELLO, fds=[f.fileno()] * n)
                assert r.drain() == [], n
                r.close()
                assert w.daemon.alive()
    _check_survived(w, baseline)


def test_a_forked_child_writing_on_its_parents_socket(hostile):
    """The kernel's credentials name the child, not the connection's
    process: EPERM, in-protocol; the parent's connection goes on."""
    w = hostile
    r = Raw(w.daemon.socket)
    pid = os.fork()
    if pid == 0:                                          # pragma: no cover (child)
        try:
            r.send(frame(wire.OP_LUNS))
            got = r.reply()
            os._exit(0 if got and got[0] == errno.EPERM else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    r.send(frame(wire.OP_LUNS))
    assert r.reply() == (0, w.vwwid + w.dwwid)
    # Credentials with another pid (root may send them; the kernel checks
    # them for anyone else): refused the same way.
    r.send(frame(wire.OP_LUNS), creds=(os.getppid(), os.getuid(), os.getgid()))
    assert r.reply()[0] == errno.EPERM
    r.close()


# Requests that must not run in the fuzz (they would stop the observer's
# I/O, which is checked after every batch): they are checked by size above.
DESTRUCTIVE = {wire.ADMIN_FAIL, wire.ADMIN_BEGIN_RESET, wire.ADMIN_END_RESET,
               wire.ADMIN_SET_LUN_MODE,
               wire.ADMIN_DELETE_LUN}


def _structure(draw, st_type, context_id):
    """Random bytes of an ioctl's structure, mostly with a valid header
    and this process's context id, so that they reach the driver's checks."""
    import ctypes
    n = ctypes.sizeof(st_type)
    data = bytearray(draw(st.binary(min_size=n, max_size=n)))
    s = st_type.from_buffer(data)
    if draw(st.integers(0, 3)):
        s.hdr.version = 0
        for i in range(len(s.hdr.rsvd)):
            s.hdr.rsvd[i] = 0
        if hasattr(s.hdr, "return_flags"):
            s.hdr.return_flags = 0
        if hasattr(s.hdr, "flags") and draw(st.booleans()):
            s.hdr.flags = os.O_RDWR | draw(st.sampled_from(
                [0, uapi.DK_CXLFLASH_ATTACH_REUSE_CONTEXT, 1 << 62, 2]))
        for name in ("context_id", "context_id_src", "context_id_dst"):
            if hasattr(s, name) and draw(st.integers(0, 3)):
                setattr(s, name, context_id)
        for name in ("rsrc_handle", "lun_size", "req_size", "num_interrupts"):
            if hasattr(s, name) and draw(st.booleans()):
                setattr(s, name, draw(st.integers(0, 70000)))
    del s
    cut = draw(st.sampled_from([None, None, None, -1, 1]))
    return bytes(data if cut is None else data[:cut] if cut < 0 else data + b"\0")


@st.composite
def frames(draw, wwids, context_id):
    """Frames that reach the driver (well-formed, random fields), and
    broken ones."""
    op = draw(st.sampled_from(sorted(wire.OPS)))
    if draw(st.integers(0, 15)) == 0:
        op = draw(st.integers(0, 0xFFFF))
    request = draw(st.integers(0, 2**32 - 1))
    payload = draw(st.binary(max_size=300))
    if op == wire.OP_DISK_IOCTL and draw(st.integers(0, 7)):
        request = draw(st.sampled_from(sorted(uapi.DK_IOCTLS)))
        payload = wire.DISK.pack(draw(st.sampled_from(wwids + [b"\xff" * 16])),
                                 draw(st.sampled_from([0, 0, 1, 2, 31])),
                                 draw(st.sampled_from([os.O_RDWR, os.O_RDONLY, -1, 3])),
                                 1) + _structure(draw, uapi.DK_IOCTLS[request], context_id)
    elif op == wire.OP_HOST_IOCTL and draw(st.integers(0, 3)):
        request = draw(st.sampled_from(sorted(uapi.HT_IOCTLS)))
        payload = struct.pack("<II", 1, draw(st.integers(0, 1))) + _structure(
            draw, uapi.HT_IOCTLS[request], context_id)
    elif op == wire.OP_ADMIN:
        request = draw(st.integers(0, 12).filter(lambda a: a not in DESTRUCTIVE))
    elif op in (wire.OP_OPEN_DISK, wire.OP_BACKING) and draw(st.booleans()):
        wwid = draw(st.sampled_from(wwids))
        payload = _disk(wwid, 0) if op == wire.OP_OPEN_DISK else wwid
    elif op in (wire.OP_LUNS, wire.OP_TABLES, wire.OP_INFO, wire.OP_STATUS,
                wire.OP_SPAWN) and draw(st.booleans()):
        payload = b""
    length = len(payload)
    if draw(st.integers(0, 19)) == 0:
        length = draw(st.integers(0, 2**32 - 1))
    return frame(op, request, payload, length=length)


def test_fuzz_messages(hostile):
    """Random bytes and random frames (after a HELLO or not, then the end
    of the stream): the daemon answers or closes, and always closes once
    the stream ends; it stays alive, the observer keeps working, and no
    descriptor leaks."""
    w = hostile
    baseline = quiet_fds(w)
    path = w.daemon.socket

    wwids = [w.vwwid, w.dwwid]

    @fuzz_settings(max_examples=400)
    @given(hello=st.booleans(), data=st.data())
    def one(hello, data):
        r = Raw(path, hello=hello)
        try:
            cid = r.attach(w.vwwid) if hello else 0
            parts = data.draw(st.lists(frames(wwids, cid), min_size=1, max_size=6))
            parts += data.draw(st.lists(st.binary(min_size=1, max_size=64), max_size=1))
            for p in parts:
                r.send(p)
            r.sock.shutdown(socket.SHUT_WR)
            r.drain()                       # must end: the daemon closes
        finally:
            r.close()
        assert w.daemon.alive(), w.daemon.log()[-3000:]

    one()
    _check_survived(w, baseline)


def test_a_flood_of_connections_at_the_descriptor_limit(hostile):
    """Connections that never say HELLO until the daemon runs out of
    descriptors: it refuses what needs one (EMFILE), keeps serving the
    connected, and recovers when they go."""
    import resource
    w = hostile
    baseline, threads = quiet_fds(w), w.daemon.threads()
    limit = resource.prlimit(w.daemon.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(w.daemon.pid, resource.RLIMIT_NOFILE, (baseline + 40, limit[1]))
    socks = []
    try:
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(w.daemon.socket)            # queued once accept() fails
            socks.append(s)
        t0 = time.monotonic()
        while "cannot accept a connection" not in w.daemon.log():
            assert time.monotonic() - t0 < 10, w.daemon.log()
            time.sleep(0.01)
        w.intact()                                # served, and I/O in the client
        with pytest.raises(OSError) as e:
            w.adapter.open_disk(w.vwwid).attach()
        assert e.value.errno == errno.EMFILE
        assert w.daemon.alive()
    finally:
        for s in socks:
            s.close()
        resource.prlimit(w.daemon.pid, resource.RLIMIT_NOFILE, limit)
    wait_fds(w.daemon, baseline)
    t0 = time.monotonic()
    while w.daemon.threads() != threads and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert w.daemon.threads() == threads
    b = cxlflash.connect(w.daemon.socket)
    b.open_disk(w.vwwid).attach().close()
    b.close()
    _check_survived(w, baseline)


def test_connect_when_the_daemon_is_one_descriptor_short(hostile):
    """The daemon can accept the connection but not dup the reset epoch
    for the HELLO: connect() fails with an OSError that says why (not a
    protocol exception), and the next connect works."""
    import resource
    w = hostile
    baseline = quiet_fds(w)
    limit = resource.prlimit(w.daemon.pid, resource.RLIMIT_NOFILE)
    used = {int(fd) for fd in os.listdir(f"/proc/{w.daemon.pid}/fd")}
    free = [n for n in range(max(used) + 3) if n not in used]
    # One free number below the limit: accept() takes it, dup() fails.
    resource.prlimit(w.daemon.pid, resource.RLIMIT_NOFILE, (free[1], limit[1]))
    try:
        with pytest.raises(OSError) as e:
            cxlflash.connect(w.daemon.socket)
        assert e.value.errno == errno.EMFILE, e.value
        assert "daemon" in str(e.value)
    finally:
        resource.prlimit(w.daemon.pid, resource.RLIMIT_NOFILE, limit)
    b = cxlflash.connect(w.daemon.socket)
    b.close()
    _check_survived(w, baseline)


def test_a_peer_that_never_reads_its_replies(hostile):
    """A peer that sends requests and never reads: only its own connection
    waits; the others are served, and its end frees everything."""
    w = hostile
    baseline = quiet_fds(w)
    r = Raw(w.daemon.socket)
    r.sock.setblocking(False)
    sent = 0
    try:
        for _ in range(20000):
            r.sock.send(frame(wire.OP_STATUS))
            sent += 1
    except BlockingIOError:
        pass                                      # both buffers are full
    assert sent < 20000
    w.intact()
    c = w.adapter.open_disk(w.vwwid).attach()
    c.create_virtual(CHUNK_BLOCKS).write(0, b"n" * 4096)
    c.close()
    r.close()
    _check_survived(w, baseline)


def test_backing_stores_go_only_to_their_users(hostile):
    """The backing store's descriptor gives the whole LUN: it goes only to
    a process with a context on that LUN (the client asks for it when a
    handle of its own first names the LUN), not to any peer that asks."""
    w = hostile
    code = (
        "import sys, json\n"
        "sys.path.insert(0, %r)\n"
        "import test_daemon_faults as T\n"
        "from cxlflash.server import wire\n"
        "r = T.Raw(sys.argv[1])\n"
        "out = []\n"
        "wwid = bytes.fromhex(sys.argv[2])\n"
        "r.send(T.frame(wire.OP_BACKING, 0, wwid))\n"
        "out.append([r.reply()[0], len(r.fds)])\n"
        "r.attach(wwid)\n"
        "r.send(T.frame(wire.OP_BACKING, 0, wwid))\n"
        "out.append([r.reply()[0], len(r.fds)])\n"
        "print(json.dumps(out))\n") % HERE
    p = subprocess.run(GRANDCHILD + [sys.executable, "-c", code, w.daemon.socket,
                                     w.vwwid.hex()],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert p.returncode == 0, p.stderr
    # [errno, descriptors held]: refused before an attach (only the HELLO's
    # epoch); after it, the adapter fd and the backing store.
    assert json.loads(p.stdout) == [[errno.EPERM, 1], [0, 3]]


# -- two users ------------------------------------------------------------------------------


def test_an_unrelated_process_cannot_reach_another_processs_context(world):
    """A second program (not a fork) names the observer's context in every
    ioctl, and does I/O through its handles: EINVAL, and AFU rc 0x21 on
    the data path (it has no replica of a context that is not its own)."""
    ctx = world.adapter.open_disk(world.vwwid).attach()
    try:
        v = ctx.create_virtual(CHUNK_BLOCKS)
        v.write(0, b"V" * 4096)
        ddisk = world.adapter.open_disk(world.dwwid)
        ctx.attach_disk(ddisk)
        dl = ctx.open_direct(disk=ddisk)
        dl.write(0, b"R" * 4096)
        spec = {"context_id": ctx.context_id, "virtual": v.handle, "direct": dl.handle,
                "wwid": world.vwwid.hex(), "direct_wwid": world.dwwid.hex()}
        before = world.adapter.status()
        p = client(world.daemon.socket, "stranger", json.dumps(spec), unrelated=True)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        res = json.loads(out)
        afu = ["afu", 0x21]
        assert res == {
            "attach_reuse": errno.EINVAL, "user_virtual": errno.EINVAL,
            "user_direct": errno.EINVAL, "resize": errno.EINVAL,
            "verify": errno.EINVAL, "recover": errno.EINVAL, "release": errno.EINVAL,
            "release_direct": errno.EINVAL, "detach": errno.EINVAL,
            "clone": errno.EINVAL, "clone_into": errno.EINVAL,
            "read": afu, "write": afu, "read_direct": afu, "write_direct": afu,
            "translate": afu}, res
        # Nothing of ours moved.
        after = world.adapter.status()
        mine = [c for c in after["contexts"] if c["context_id"] == ctx.context_id]
        was = [c for c in before["contexts"] if c["context_id"] == ctx.context_id]
        assert mine == was and mine[0]["handles"] == 2
        assert bytes(v.read(0, 1)) == b"V" * 4096
        assert bytes(dl.read(0, 1)) == b"R" * 4096
        # A program this process started (fork and exec) is its child: as
        # with the kernel, it may clone this process's context -- and only
        # that.
        p = client(world.daemon.socket, "stranger", json.dumps(spec))
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert json.loads(out) == dict(res, clone="ok")
    finally:
        ctx.close()
    wait_settled(world)
    world.intact()


STRANGER_RAW = """
import json, os, sys
sys.path.insert(0, %r)
import test_daemon_faults as T
from cxlflash import uapi
from cxlflash.server import wire
r = T.Raw(sys.argv[1])
cid, h, wwid = int(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4])
hdr = uapi.dk_cxlflash_hdr(flags=os.O_RDWR)
out = {}
for name, req, s in (
        ("detach", uapi.DK_CXLFLASH_DETACH,
         uapi.dk_cxlflash_detach(hdr=hdr, context_id=cid)),
        ("release", uapi.DK_CXLFLASH_RELEASE,
         uapi.dk_cxlflash_release(hdr=hdr, context_id=cid, rsrc_handle=h)),
        ("resize", uapi.DK_CXLFLASH_VLUN_RESIZE,
         uapi.dk_cxlflash_resize(hdr=hdr, context_id=cid, rsrc_handle=h, req_size=0)),
        ("verify", uapi.DK_CXLFLASH_VERIFY,
         uapi.dk_cxlflash_verify(hdr=hdr, context_id=cid, rsrc_handle=h))):
    r.send(T.frame(wire.OP_DISK_IOCTL, req, T._disk(wwid) + bytes(s)))
    out[name] = r.reply()[0]
r.send(T.frame(wire.OP_TABLES))
err, body = r.reply()
out["tables"] = [err, len(wire.unpack_tables(body))]
print(json.dumps(out))
""" % HERE


def test_raw_requests_of_a_stranger_name_nothing_of_ours(world):
    """The same through the raw protocol, from another process: whatever
    the bytes say, the driver acts for the sender the kernel names."""
    ctx = world.adapter.open_disk(world.vwwid).attach()
    try:
        v = ctx.create_virtual(CHUNK_BLOCKS)
        cid, h = ctx.context_id, v.handle
        code = STRANGER_RAW
        p = subprocess.run([sys.executable, "-c", code, world.daemon.socket, str(cid),
                            str(h), world.vwwid.hex()], capture_output=True, text=True,
                           env=_env(), timeout=60)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == {"detach": errno.EINVAL, "release": errno.EINVAL,
                                        "resize": errno.EINVAL, "verify": errno.EINVAL,
                                        "tables": [0, 0]}
        assert v.chunks == 1 and [c["handles"] for c in world.adapter.status()["contexts"]
                                  if c["context_id"] == cid] == [1]
    finally:
        ctx.close()
    wait_settled(world)


def test_a_user_who_is_not_the_administrator(world):
    """A client running as another uid: attach and I/O work; host ioctls,
    LUNs, resets, fault injection and the LUN mode are EPERM; it cannot
    send another process's credentials (the kernel refuses them)."""
    p = client(world.daemon.socket, "user", uid=NOBODY,
               env={"FAULT_FORGE_PID": str(os.getpid())})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    res = json.loads(out)
    eperm = errno.EPERM
    assert res == {"uid": NOBODY, "io": "ok", "host_ioctl": eperm, "add_lun": eperm,
                   "create_lun": eperm, "delete_lun": eperm, "reset": eperm,
                   "begin_reset": eperm, "end_reset": eperm, "fail": eperm,
                   "inject_fault": eperm, "signal_waiters": eperm, "lun_mode": eperm,
                   "status": "ok", "io_after": "ok", "forge": eperm}, res
    assert world.adapter.state == "NORMAL"
    assert world.adapter.luns() == [world.vwwid, world.dwwid]
    wait_settled(world)
    world.intact()
