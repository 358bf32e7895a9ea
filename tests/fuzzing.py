"""Running a hypothesis batch in a subprocess, so that a crash fails a test.

A fuzz file defines batches: module-level functions named ``batch_*`` that
run a hypothesis search when called.  Its pytest tests call
:func:`run_batch`, which runs the batch in a fresh interpreter and fails
when the interpreter was killed by a signal (SIGSEGV, SIGFPE, SIGABRT, the
OOM killer) or exited non-zero (a falsified property, with hypothesis's
report on stderr).

Every batch uses :data:`SETTINGS`: a modest number of examples, no
deadline, derandomized (the same examples on every run, so CI failures
reproduce), no example database on disk.
"""
import gc
import os
import signal
import subprocess
import sys

from hypothesis import HealthCheck, settings, strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def fuzz_settings(max_examples=60, **kw):
    if os.environ.get("FUZZ_NO_FLOATS") == "1":
        # Exploring: skip the explicit examples (known failures) as well.
        from hypothesis import Phase
        kw.setdefault("phases", [Phase.generate, Phase.shrink])
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck), **kw)


SETTINGS = fuzz_settings()


def run_batch(module, name, timeout=120):
    """Run ``module.name()`` in a subprocess (cwd: the tree under test);
    fail the calling test on a signal, a non-zero exit or a timeout."""
    code = ("import sys; sys.path.insert(0, %r); import %s as m; m.%s(); "
            "print('batch-ok')" % (HERE, module, name))
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTEST_CURRENT_TEST", None)
    try:
        p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code],
                           cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{module}.{name} did not finish in {timeout} s\n"
                             f"{(e.stderr or b'')[-6000:]}") from None
    tail = (p.stdout[-3000:] + "\n" + p.stderr[-20000:]).strip()
    if p.returncode < 0:
        sig = signal.Signals(-p.returncode).name
        raise AssertionError(f"{module}.{name} was killed by {sig}:\n{tail}")
    assert p.returncode == 0 and "batch-ok" in p.stdout, \
        f"{module}.{name} failed (exit {p.returncode}):\n{tail}"


# -- extreme values ------------------------------------------------------------

U64 = 2 ** 64
EXTREME_INTS = [0, 1, 2, 7, 8, 63, 64, 511, 512, 4095, 4096, 65535, 65536,
                2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 48, 2 ** 52 + 1,
                2 ** 58, 2 ** 62, 2 ** 63 - 1, 2 ** 63, U64 - 4096, U64 - 2, U64 - 1,
                U64, U64 + 1, 2 ** 100, -1, -2, -4096, -(2 ** 31), -(2 ** 63),
                -(2 ** 63) - 1, -(2 ** 64)]
NON_INTS = [None, 0.0, 0.5, 1.5, -0.5, float("nan"), float("inf"), 1e30, "0", b"",
            b"\x01", [], [0], (), 1j, object()]
if os.environ.get("FUZZ_NO_FLOATS") == "1":
    # Exploring: leave floats out (while they are still truncated, they
    # hide every other finding).
    NON_INTS = [v for v in NON_INTS if not isinstance(v, float)]


def extreme_ints():
    return st.sampled_from(EXTREME_INTS)


def ints_near(*centres, spread=2):
    """Integers within ``spread`` of each centre (wrapping sums hide there)."""
    vals = sorted({c + d for c in centres for d in range(-spread, spread + 1)})
    return st.sampled_from(vals)


def any_value(small=st.integers(0, 16)):
    """An argument a caller might pass: small ints, extremes, wrong types."""
    return st.one_of(small, extreme_ints(), st.sampled_from(NON_INTS))


def describe(exc):
    return f"{type(exc).__name__}: {exc}"


def run_all(*searches):
    """Run every search even when one fails; then fail with all of them."""
    import traceback
    failures = []
    for fn in searches:
        try:
            fn()
        except BaseException as e:          # noqa: BLE001
            text = "".join(traceback.format_exception(e))
            sys.stderr.write(f"--- {fn.__name__}:\n{text}\n")
            failures.append(f"{fn.__name__}: {type(e).__name__}: {str(e)[:3000]}")
    if failures:
        raise AssertionError("\n".join(failures))


# -- driver invariants ------------------------------------------------------------


def live_contexts(adapter):
    """The driver's live and in-error contexts."""
    drv = adapter.driver
    return [c for c in drv.ctx_tbl if c is not None] + list(drv.ctx_err_recovery)


def check_tables(adapter):
    """Every live context's table: rht_out matches its open handles."""
    for ctx in live_contexts(adapter):
        t = ctx.table
        opened = t.open_handles()
        assert t.rht_out == len(opened), \
            f"context 0x{ctx.ctxid:x}: rht_out {t.rht_out}, {len(opened)} open handles"


def check_allocators(adapter):
    """Every chunk a live LXT maps is allocated, with exactly one reference
    per mapping; no chunk is allocated that no LXT maps."""
    refs = {}
    for ctx in live_contexts(adapter):
        t = ctx.table
        for h in t.open_handles():
            if not t.is_virtual(h):
                continue
            glun = ctx.rht_lun[h].parent
            counts = refs.setdefault(id(glun), (glun, {}))[1]
            for aun in t.auns(h).tolist():
                counts[aun] = counts.get(aun, 0) + 1
    for glun in adapter.driver.gluns.values():
        alloc = glun.allocator
        if alloc is None:
            continue
        counts = refs.get(id(glun), (glun, {}))[1]
        for aun, n in counts.items():
            assert alloc.is_allocated(aun), f"chunk {aun} is mapped by {n} LXTs but free"
            assert alloc.clone_count(aun) == n - 1, \
                f"chunk {aun}: {n} mappings, clone count {alloc.clone_count(aun)}"
        assert alloc.allocated_count() == len(counts), \
            f"{alloc.allocated_count()} chunks allocated, {len(counts)} mapped"


# -- a sparse image of a backing store --------------------------------------------


class SparseImage:
    """What a sparse backing store (memfd) must hold: ``ref`` (a lazily
    zero array of its size) over ``windows`` and the ranges the test
    declared changed (``set``); everywhere else a hole.  ``check`` compares
    those ranges with the file and asks the file system (SEEK_DATA) that
    no data exists anywhere else, so a stray write anywhere is found
    without reading the whole store."""

    PAGE = 4096

    def __init__(self, fd, size):
        import numpy as np
        self.fd = fd
        self.size = size
        self.ref = np.zeros(size, dtype=np.uint8)
        self.ranges = []

    def set(self, a, b, data):
        self.ref[a:b] = data
        self.ranges.append((a, b))

    def check(self, what, extra=()):
        import numpy as np
        assert os.fstat(self.fd).st_size == self.size, f"{what}: the backing size changed"
        for a, b in _subtract(self.ranges, extra):
            got = np.frombuffer(os.pread(self.fd, b - a, a), np.uint8)
            if not np.array_equal(got, self.ref[a:b]):
                bad = np.flatnonzero(got != self.ref[a:b]) + a
                raise AssertionError(f"{what}: {len(bad)} bytes differ in [{a}, {b}), "
                                     f"first at byte {bad[0]}")
        P = self.PAGE
        allowed = sorted((a // P * P, -(-b // P) * P) for a, b in self.ranges + list(extra))
        pos = 0
        while pos < self.size:
            try:
                d = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == 6:            # ENXIO: no data beyond
                    break
                raise
            h = os.lseek(self.fd, d, os.SEEK_HOLE)
            p = d
            for a, b in allowed:
                if a <= p < b:
                    p = b
                if p >= h:
                    break
            if p < h:
                raise AssertionError(f"{what}: data was written at byte {p}, outside "
                                     "every addressed range")
            pos = h


def close_world(w):
    """Close a fuzz batch's world (its adapter, its backing images) after a
    failed example, so the next one starts clean; ``w`` may be None."""
    if w is None:
        return
    try:
        w.a.close()
    except Exception:          # noqa: BLE001
        pass
    for img in ("img_a", "img_b"):
        if hasattr(w, img):
            getattr(w, img).ref = None
    del w
    gc.collect()


def _subtract(ranges, holes):
    """``ranges`` minus every range of ``holes`` (half-open byte ranges)."""
    out = list(ranges)
    for x, y in holes:
        nxt = []
        for a, b in out:
            if y <= a or b <= x:
                nxt.append((a, b))
                continue
            if a < x:
                nxt.append((a, x))
            if y < b:
                nxt.append((y, b))
        out = nxt
    return out
