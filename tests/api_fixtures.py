"""The object-API fixtures the API tests share: an adapter, a 1 GiB LUN's
disk (4 chunks), a context on it, a 100-block vLUN; and the helpers they
share (open fds, live contexts, backing bytes, an ioctl log).

``adapter`` is embedded (``cxlflash.Adapter()``) or connected
(``cxlflash.connect()`` to a fresh daemon process of its own, see
``daemons.py``): tests/conftest.py runs each test that uses it both ways
(ids ``[embedded]`` and ``[connected]``); so does ``make_adapter`` (a
factory, for tests that need Adapter() arguments or several adapters).  A test that reaches into the
driver (``adapter.driver``, its records, fake callers) takes ``embedded``
too: it then runs once, on an embedded adapter."""
import contextlib
import errno
import os

import numpy as np
import pytest

import cxlflash
from cxlflash.errors import CxlFlashError

import daemons
from block_pattern import GIB

#: A connected test that takes longer than this has hung on its daemon
#: (the harness has no other timeout): the watchdog kills the daemon, so the
#: client's request fails (ENODEV) and the test fails instead of hanging.
TEST_TIMEOUT = 30


#: Adapter() arguments that belong to the client (the rest go to the
#: daemon's Adapter: directory, ports).
CLIENT_ARGS = ("engine", "engine_depth", "io_threads")


@contextlib.contextmanager
def new_adapter(kind, settings=None, **kw):
    """An adapter of ``kind`` ("embedded" or "connected": a fresh daemon of
    its own) made with ``cxlflash.Adapter(**kw)``'s arguments, its driver's
    tunables set to ``settings``; closed (and its daemon stopped, exit 0
    asserted) on leaving the block."""
    settings = dict(settings or {})
    if kind == "embedded":
        with cxlflash.Adapter(**kw) as a:
            daemons.apply_driver_settings(a, settings)
            yield a
        return
    assert kind == "connected", kind
    client = {k: kw.pop(k) for k in CLIENT_ARGS if k in kw}
    with daemons.start(driver=settings, **kw) as d, d.watchdog(TEST_TIMEOUT):
        a = cxlflash.connect(d.socket, **client)
        try:
            yield a
        finally:
            a.close()
    # (leaving the block: SIGTERM, and the daemon must exit 0)


def _settings(request):
    mark = request.node.get_closest_marker("driver")
    return dict(mark.kwargs) if mark is not None else {}


@pytest.fixture
def adapter(adapter_kind, request):
    """A fresh adapter with no LUN.  ``@pytest.mark.driver(name=value)``
    sets driver tunables (``daemons.DRIVER_SETTINGS``) before the test, in
    this process or in the daemon."""
    with new_adapter(adapter_kind, _settings(request)) as a:
        yield a


@pytest.fixture
def make_adapter(adapter_kind, request):
    """make_adapter(**Adapter kwargs) -> a new adapter of the test's kind
    (closed at teardown; a connected one has a daemon of its own)."""
    with contextlib.ExitStack() as stack:
        yield lambda **kw: stack.enter_context(
            new_adapter(adapter_kind, _settings(request), **kw))


@pytest.fixture
def embedded(adapter, adapter_kind):
    """The adapter, embedded (the test runs only that way): for tests that
    read the driver in this process."""
    assert adapter_kind == "embedded"
    return adapter


def backed_lun(adapter, lun_backing, request, size, **kw):
    """A new LUN of ``size`` bytes on ``adapter`` (its WWID): in memory
    (``create_lun``), or on a fresh RBD image of the session's cluster
    (``add_lun("rbd:...")``; the image is removed after the test)."""
    if lun_backing == "memory":
        return adapter.create_lun(size, **kw)
    assert lun_backing == "rbd", lun_backing
    ceph = request.getfixturevalue("ceph")
    return adapter.add_lun(ceph.image(size)[1], **kw)


@pytest.fixture
def disk(adapter, lun_backing, request):
    """A 1 GiB LUN's disk (4 chunks), of the test's ``lun_backing``."""
    with adapter.open_disk(backed_lun(adapter, lun_backing, request, GIB)) as d:
        yield d


@pytest.fixture
def ctx(disk):
    with disk.attach() as c:
        yield c


@pytest.fixture
def vlun(ctx):
    with ctx.create_virtual(100) as v:
        yield v


# -- helpers ----------------------------------------------------------------------


def fd_is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def live_contexts(a):
    """The driver's contexts, live or in error, of every process (as
    ``a.status()`` lists them: dicts with context_id, pid, luns, handles,
    chunks, in_error)."""
    return a.status()["contexts"]


def lun_status(a, wwid):
    """What the driver says of LUN ``wwid`` (``a.status()``): mode ("none",
    "virtual", "physical"), users, chunks_total, chunks_free, ..."""
    luns = [lun for lun in a.status()["luns"] if lun["wwid"] == bytes(wwid).hex()]
    assert len(luns) == 1, f"LUN {bytes(wwid).hex()} in {a.status()['luns']}"
    return luns[0]


def adapter_closed(a):
    """The adapter answers ENODEV ("closed" or "gone") to every request."""
    try:
        a.luns()
    except CxlFlashError as e:
        return e.errno == errno.ENODEV
    return False


def phys_bytes(vlun, lba, nblocks=1):
    """The backing store's bytes under ``nblocks`` vLBAs from ``lba`` (read
    through the memory backing's fd: a test using it asks for the fixture
    ``memory_backing``)."""
    rec = vlun.adapter._context_record(vlun.context.context_id)
    fd = rec.rht_lun[vlun.handle].parent.backing.fd
    out = bytearray()
    for p in vlun.translate(np.arange(lba, lba + nblocks)):
        out += os.pread(fd, vlun.block_size, int(p) * vlun.block_size)
    return bytes(out)


class IoctlLog:
    """Records every DK ioctl an adapter issues."""

    def __init__(self, a, monkeypatch):
        self.calls = []
        real = a._disk_ioctl

        def spy(disk, request, arg):
            self.calls.append(request)
            return real(disk, request, arg)

        monkeypatch.setattr(a, "_disk_ioctl", spy)

    def count(self, request):
        return self.calls.count(request)
