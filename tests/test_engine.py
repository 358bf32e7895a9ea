"""The asynchronous I/O engine of the core (issue 9): ``engine_info``, the
choice of engine (``CXLFLASH_ENGINE``, ``Engine(kind=...)``, the fallback
when io_uring is refused at run time), ``Engine.raw_listio`` (the bare-store
baseline at a queue depth), back-pressure (a full engine blocks the
submitter, nothing is dropped), and ``close()`` with requests in flight.

Every test runs on both engines; the API over the engine is in
``test_async_io.py``, injected backend faults in ``test_engine_faults.py``.
"""
import errno
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import cxlflash
from cxlflash._core.engine import Engine, engine_info

from block_pattern import BS, pattern

# Both engines; a build without liburing (CI's debug build) has threads only.
KINDS = ("io_uring", "threads") if engine_info()["liburing"] else ("threads",)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(params=KINDS)
def kind(request, monkeypatch):
    monkeypatch.delenv("CXLFLASH_ENGINE", raising=False)
    return request.param


@pytest.fixture
def engine(kind):
    e = Engine(kind=kind)
    yield e
    e.close()


@pytest.fixture
def memfd():
    fd = os.memfd_create("engine-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)             # 256 blocks of 4 KiB
    yield fd
    os.close(fd)


def blocks_at(offsets, seed):
    """One 4 KiB block per byte offset, each naming its block."""
    return np.concatenate([pattern(o // BS, 1, seed=seed) for o in offsets])


def fd_bytes(fd, offsets):
    return np.concatenate([np.frombuffer(os.pread(fd, BS, int(o)), np.uint8)
                           for o in offsets])


# -- which engine ---------------------------------------------------------------------


def test_engine_info_is_consistent(monkeypatch):
    monkeypatch.delenv("CXLFLASH_ENGINE", raising=False)
    info = engine_info()
    assert set(info) >= {"engine", "liburing", "io_uring", "reason", "forced"}
    assert info["engine"] in KINDS and info["forced"] is None
    assert isinstance(info["liburing"], bool) and isinstance(info["io_uring"], bool)
    assert isinstance(info["reason"], str)
    if info["io_uring"]:
        assert info["liburing"] and info["engine"] == "io_uring" and info["reason"] == ""
    else:
        assert info["engine"] == "threads" and info["reason"], \
            "the reason io_uring is not used must be given"
    # The best engine available is the one an Engine() without kind gets.
    e = Engine()
    try:
        assert e.kind == info["engine"]
    finally:
        e.close()
    if info["liburing"]:
        # This machine's kernel allows io_uring (the tests run both engines).
        assert info["io_uring"], info
    else:
        # Built without liburing (CXLFLASH_LIBURING=0, or no headers): forcing
        # io_uring is ENOSYS saying why.
        assert os.environ.get("CXLFLASH_LIBURING") == "0" or \
            not os.path.exists("/usr/include/liburing.h"), \
            "liburing's headers are here but the build did not use them"
        for force in (lambda: Engine(kind="io_uring"),):
            with pytest.raises(OSError) as e:
                force()
            assert e.value.errno == errno.ENOSYS and "io_uring" in str(e.value)


def test_env_forces_the_engine(kind, monkeypatch):
    monkeypatch.setenv("CXLFLASH_ENGINE", kind)
    info = engine_info()
    assert info["forced"] == kind and info["engine"] == kind
    e = Engine()
    try:
        assert e.kind == kind
    finally:
        e.close()
    with cxlflash.Adapter() as a:
        assert a.engine.kind == kind
        assert a.engine is a.engine             # one engine per adapter


def test_adapter_engine_kind_argument(kind, monkeypatch):
    other = "threads" if kind == "io_uring" else "io_uring"
    with cxlflash.Adapter(engine=kind) as a:
        assert a.engine.kind == kind
    monkeypatch.setenv("CXLFLASH_ENGINE", other)
    e = Engine(kind=kind)                     # an explicit kind wins over the env
    try:
        assert e.kind == kind
    finally:
        e.close()


def test_env_with_a_bad_value_says_so(monkeypatch):
    monkeypatch.setenv("CXLFLASH_ENGINE", "aio")
    with pytest.raises((ValueError, OSError)) as e:
        Engine()
    assert "CXLFLASH_ENGINE" in str(e.value) and "aio" in str(e.value)
    if isinstance(e.value, OSError):
        assert e.value.errno == errno.EINVAL


def test_bad_kind_is_refused():
    for bad in ("uring", "", "THREADS"):
        with pytest.raises((ValueError, OSError)) as e:
            Engine(kind=bad)
        assert "io_uring" in str(e.value) and "threads" in str(e.value)
    for bad in (1, b"threads"):             # not a string: either class, said so
        with pytest.raises((TypeError, ValueError)) as e:
            Engine(kind=bad)
        assert "io_uring" in str(e.value) or "str" in str(e.value)


# io_uring refused at run time (a seccomp filter, as container runtimes
# install): the engine falls back to threads and says why; forcing io_uring
# is ENOSYS saying why.
_SECCOMP_CHILD = textwrap.dedent(r"""
    import ctypes, errno, os, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    ALLOW, ERRNO = 0x7FFF0000, 0x00050000
    def ins(code, jt, jf, k):
        return struct.pack("HBBI", code, jt, jf, k)
    prog = b"".join([
        ins(0x20, 0, 0, 4),                       # ld arch
        ins(0x15, 1, 0, 0xC000003E),              # x86_64?
        ins(0x06, 0, 0, ALLOW),
        ins(0x20, 0, 0, 0),                       # ld nr
        ins(0x15, 2, 0, 425),                     # io_uring_setup
        ins(0x15, 1, 0, 426),                     # io_uring_enter
        ins(0x15, 0, 1, 427),                     # io_uring_register
        ins(0x06, 0, 0, ERRNO | errno.EPERM),
        ins(0x06, 0, 0, ALLOW),
    ])
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog)
    assert libc.prctl(38, 1, 0, 0, 0) == 0                       # NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.c_void_p(ctypes.addressof(fbuf)), 0, 0) == 0, \
        ctypes.get_errno()
    os.environ.pop("CXLFLASH_ENGINE", None)
    sys.path.insert(0, ROOT)
    import numpy as np
    from cxlflash._core.engine import Engine, engine_info
    info = engine_info()
    assert info["io_uring"] is False and info["engine"] == "threads", info
    assert info["reason"], info
    e = Engine()
    assert e.kind == "threads"
    fd = os.memfd_create("x")
    os.ftruncate(fd, 8192)
    buf = bytearray(b"\x5a" * 8192)
    assert e.raw_listio(fd, [2, 2], [0, 4096], 4096, buf, qd=2) == 2
    assert os.pread(fd, 8192, 0) == bytes(buf)
    e.close()
    for how in ("kind", "env"):
        try:
            if how == "kind":
                Engine(kind="io_uring")
            else:
                os.environ["CXLFLASH_ENGINE"] = "io_uring"
                Engine()
        except OSError as ex:
            assert ex.errno == errno.ENOSYS, ex
            assert "io_uring" in str(ex), ex
        else:
            raise AssertionError(f"io_uring forced by {how} where it is refused")
    print("seccomp-ok")
""")


def test_io_uring_refused_at_run_time_falls_back_to_threads():
    code = f"ROOT = {ROOT!r}\n" + _SECCOMP_CHILD
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "seccomp-ok" in p.stdout, p.stdout + p.stderr


# -- the Engine object ---------------------------------------------------------------


def test_attributes_and_close(engine, kind, memfd):
    assert engine.kind == kind and engine.depth == 256
    assert engine.inflight == 0 and engine.closed is False and engine.injected == 0
    e2 = Engine(kind=kind, depth=8, workers=2)
    assert e2.depth == 8
    e2.close()
    assert e2.closed is True and e2.inflight == 0
    e2.close()                                  # twice is harmless
    with pytest.raises(ValueError) as e:
        e2.raw_listio(memfd, [1], [0], BS, bytearray(BS))
    assert "engine is closed" in str(e.value)


# -- raw_listio: the bare-store baseline ---------------------------------------------


@pytest.mark.parametrize("qd", [1, 8, 64])
def test_raw_listio_writes_and_reads(engine, memfd, qd):
    rng = np.random.default_rng(qd)
    offs = rng.permutation(256)[:200].astype(np.uint64) * BS
    data = blocks_at(offs.tolist(), seed=qd)
    lat = np.zeros(200, np.int64)
    n = engine.raw_listio(memfd, np.full(200, 2), offs, BS, data, qd=qd, lat_ns=lat)
    assert n == 200
    assert (lat > 0).all()
    assert np.array_equal(fd_bytes(memfd, offs), data)
    # Reads, into the buffer backwards (buf_offsets).
    out = np.zeros_like(data)
    back = (np.arange(200, dtype=np.uint64)[::-1] * BS).copy()
    assert engine.raw_listio(memfd, [1] * 200, offs, BS, out, buf_offsets=back,
                             qd=qd) == 200
    assert np.array_equal(out.reshape(200, BS)[::-1].ravel(), data)
    assert engine.inflight == 0


def test_raw_listio_mixed_matches_serial(engine, memfd):
    """Reads and writes of distinct blocks in one batch at depth 64 give
    what the serial baseline (rawio.raw_io) gives."""
    from cxlflash._core.rawio import raw_io
    os.pwrite(memfd, blocks_at(range(0, 1 << 20, BS), seed=1).tobytes(), 0)
    rng = np.random.default_rng(5)
    offs = rng.permutation(256)[:128].astype(np.uint64) * BS
    ops = rng.integers(1, 3, 128)
    buf = blocks_at(offs.tolist(), seed=2)
    ref_fd = os.memfd_create("ref")
    try:
        os.ftruncate(ref_fd, 1 << 20)
        os.pwrite(ref_fd, os.pread(memfd, 1 << 20, 0), 0)
        ref_buf = buf.copy()
        assert raw_io(ref_fd, ops, offs, BS, ref_buf) == 128
        assert engine.raw_listio(memfd, ops, offs, BS, buf, qd=64) == 128
        assert np.array_equal(buf, ref_buf)
        assert os.pread(memfd, 1 << 20, 0) == os.pread(ref_fd, 1 << 20, 0)
    finally:
        os.close(ref_fd)


def test_raw_listio_errors(engine, memfd):
    buf = bytearray(2 * BS)
    with pytest.raises(OSError) as e:                     # a bad fd: EBADF
        engine.raw_listio(-1, [1], [0], BS, buf)
    assert e.value.errno == errno.EBADF
    with pytest.raises(OSError) as e:                     # beyond off_t
        engine.raw_listio(memfd, [1], [2 ** 63 - 1], BS, buf)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ValueError):                       # not 1 or 2
        engine.raw_listio(memfd, [3], [0], BS, buf)
    with pytest.raises(ValueError):                       # does not fit the buffer
        engine.raw_listio(memfd, [1, 1, 1], [0, BS, 2 * BS], BS, buf)
    with pytest.raises(ValueError):                       # lengths differ
        engine.raw_listio(memfd, [1, 1], [0], BS, buf)
    with pytest.raises(TypeError):
        engine.raw_listio(memfd, [1], [0.0], BS, buf)
    with pytest.raises(OSError) as e:                     # past the end: EIO
        engine.raw_listio(memfd, [1], [1 << 20], BS, buf)
    assert e.value.errno == errno.EIO
    # None of these moved a byte or left a request behind.
    assert os.pread(memfd, 1 << 20, 0) == bytes(1 << 20)
    assert bytes(buf) == bytes(2 * BS) and engine.inflight == 0
    for qd in (0, 65537, -1, 2 ** 64):
        with pytest.raises(OSError) as e:
            engine.raw_listio(memfd, [1], [0], BS, buf, qd=qd)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(TypeError):
        engine.raw_listio(memfd, [1], [0], BS, buf, qd=1.0)
    # The engine still works.
    assert engine.raw_listio(memfd, [1, 1], [0, BS], BS, buf, qd=2) == 2


# -- back-pressure ------------------------------------------------------------------


def test_back_pressure_depth_2_completes_everything(kind, memfd):
    e = Engine(kind=kind, depth=2)
    try:
        assert e.depth == 2
        seen = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen.append(e.inflight)

        t = threading.Thread(target=watch)
        t.start()
        try:
            offs = (np.arange(100, dtype=np.uint64) % 256) * BS
            data = blocks_at(offs.tolist(), seed=3)
            for _ in range(3):
                assert e.raw_listio(memfd, [2] * 100, offs, BS, data, qd=64) == 100
                out = np.zeros_like(data)
                assert e.raw_listio(memfd, [1] * 100, offs, BS, out, qd=100) == 100
                assert np.array_equal(out, data)
        finally:
            stop.set()
            t.join()
        assert max(seen) <= 2, f"{max(seen)} requests in flight in an engine of depth 2"
        assert e.inflight == 0
    finally:
        e.close()


def test_back_pressure_from_many_threads(kind, memfd):
    """Eight threads submit batches into a depth-4 engine at once: every
    request of every batch completes, none is dropped or done twice."""
    e = Engine(kind=kind, depth=4)
    errors = []
    try:
        def worker(i):
            try:
                offs = (np.arange(32, dtype=np.uint64) + 32 * i) * BS
                data = blocks_at(offs.tolist(), seed=10 + i)
                for _ in range(4):
                    assert e.raw_listio(memfd, [2] * 32, offs, BS, data, qd=16) == 32
                    out = np.zeros_like(data)
                    assert e.raw_listio(memfd, [1] * 32, offs, BS, out, qd=16) == 32
                    assert np.array_equal(out, data), f"thread {i}: wrong data"
            except BaseException as ex:      # noqa: BLE001
                errors.append(ex)

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert not any(t.is_alive() for t in ts), "a submitter never returned"
        assert not errors, errors
        assert e.inflight == 0
    finally:
        e.close()


# -- close with requests in flight --------------------------------------------------


@pytest.mark.parametrize("store", ["memfd", "o_direct"])
def test_close_with_requests_in_flight(kind, memfd, store, tmp_path):
    """close() while another thread's batch runs: close returns only when
    nothing is in flight; the batch either finishes or fails cleanly --
    the requests it had not started when the engine closed fail as later
    submissions do (ValueError: engine is closed), or with an error that
    says the engine was closed -- and never hangs."""
    import cxlflash
    if store == "memfd":
        fd = memfd
        data = np.zeros(4096 * BS, np.uint8)
    else:                     # requests really wait for the device
        fd = os.open(tmp_path / "direct.img", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        os.ftruncate(fd, 256 * BS)
        data = cxlflash.aligned_buffer(4096 * BS)
    e = Engine(kind=kind, depth=64)     # qd <= depth: deeper is another test's
    n = 4096
    offs = (np.arange(n, dtype=np.uint64) % 256) * BS
    out = {}

    def batch():
        try:
            out["n"] = e.raw_listio(fd, [1] * n, offs, BS, data, qd=32)
        except (ValueError, OSError) as ex:
            out["err"] = ex

    try:
        t = threading.Thread(target=batch)
        t.start()
        deadline = time.monotonic() + 5
        while e.inflight == 0 and t.is_alive() and time.monotonic() < deadline:
            pass
        e.close()
        assert e.closed and e.inflight == 0
        t.join(10)
        assert not t.is_alive(), "a batch submitted before close() never returned"
        assert ("n" in out) != ("err" in out)
        if "n" in out:
            assert out["n"] == n
        else:
            assert "closed" in str(out["err"]), \
                f"a batch cut by close() failed with {out['err']!r}: say the engine was closed"
        with pytest.raises(ValueError) as ex:
            e.raw_listio(fd, [1], [0], BS, bytearray(BS))
        assert "engine is closed" in str(ex.value)
    finally:
        if store != "memfd":
            os.close(fd)


def test_engines_are_independent(kind, memfd):
    """Closing one engine leaves another (and the adapter's) working."""
    a, b = Engine(kind=kind), Engine(kind=kind)
    a.close()
    try:
        buf = bytearray(BS)
        assert b.raw_listio(memfd, [1], [0], BS, buf) == 1
    finally:
        b.close()


def test_cxlflash_info_reports_the_engine(kind, monkeypatch):
    """`cxlflash info` prints which engine runs (and follows CXLFLASH_ENGINE)."""
    env = dict(os.environ, PYTHONPATH=ROOT, CXLFLASH_ENGINE=kind)
    p = subprocess.run([sys.executable, "-m", "cxlflash", "info"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [l for l in p.stdout.splitlines() if l.split()[:1] == ["engine"]]
    assert len(lines) == 1, f"no engine line in:\n{p.stdout}"
    assert kind in lines[0], lines[0]


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def _os_threads():
    return len(os.listdir("/proc/self/task"))


def test_close_leaves_no_fd_or_thread_behind(kind, memfd):
    """An engine made, used at depth, and closed 40 times: the process
    ends with the fds (rings, eventfds) and OS threads it started with."""
    kept = []                   # close() must release them, not the destructor

    def cycle():
        e = Engine(kind=kind, depth=32, workers=4)
        buf = np.zeros(64 * BS, np.uint8)
        assert e.raw_listio(memfd, [1] * 64, np.arange(64) * BS, BS, buf, qd=32) == 64
        e.close()
        kept.append(e)

    _assert_cycles_leave_nothing(cycle, 40, "engines")


def _assert_cycles_leave_nothing(cycle, rounds, what):
    """``rounds`` calls of ``cycle`` (after one that makes the lazily made
    process-wide things) leave no fd and, within 2 s, no OS thread open."""
    cycle()
    fds, threads = _open_fds(), _os_threads()
    for _ in range(rounds):
        cycle()
    deadline = time.monotonic() + 2
    while _os_threads() > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    leaked = (_open_fds() - fds, _os_threads() - threads)
    assert leaked[0] == 0 and leaked[1] <= 0, \
        f"{leaked[0]} fds and {leaked[1]} threads left behind by {rounds} {what}"


def test_adapters_with_engines_leave_nothing_behind(kind, monkeypatch):
    """The same through adapters: futures, asyncio and list I/O, then
    close -- without waiting for the garbage collector."""
    import asyncio
    monkeypatch.setenv("CXLFLASH_ENGINE", kind)

    def cycle():
        with cxlflash.Adapter() as a, a.open_disk(a.create_lun(1 << 30)) as d, \
                d.attach() as c, c.create_virtual(64) as v:
            assert v.awrite(0, bytes(4 * BS)).result(10) == 4
            assert asyncio.run(v.read_async(0, 1)) == bytes(BS)
            assert v.listio([1] * 8, list(range(8)), [1] * 8, bytearray(8 * BS), qd=8).ok

    _assert_cycles_leave_nothing(cycle, 15, "adapters")


_DEEPER_THAN_THE_ENGINE = r"""
import faulthandler, os, sys
faulthandler.dump_traceback_later(8, exit=True)      # a hang: the stacks, then exit
import numpy as np
import cxlflash
from cxlflash._core.engine import Engine
kind, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
os.ftruncate(fd, 1 << 22)
e = Engine(kind=kind, depth=4)
data = cxlflash.aligned_buffer(200 * 4096)
data[:] = np.repeat(np.arange(200, dtype=np.uint8), 4096)
offs = np.arange(200) * 4096
assert e.raw_listio(fd, [2] * 200, offs, 4096, data, qd=64) == 200
out = cxlflash.aligned_buffer(200 * 4096)
assert e.raw_listio(fd, [1] * 200, offs, 4096, out, qd=200) == 200
assert np.array_equal(out, data)
assert e.inflight == 0
e.close()
print("deep-ok")
"""


def test_back_pressure_on_a_store_that_completes_later(kind, tmp_path):
    """qd above the engine's depth on an O_DIRECT file (requests really wait
    for the device, none completes at submission): the submitter waits for
    a slot and every request completes.  In a subprocess: a hang fails."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        p = subprocess.run([sys.executable, "-c", _DEEPER_THAN_THE_ENGINE, kind,
                            str(tmp_path / "direct.img")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"hung:\n{e.stderr}") from None
    assert p.returncode == 0 and "deep-ok" in p.stdout, p.stdout + p.stderr
