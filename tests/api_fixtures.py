"""The object-API fixtures the API tests share: an adapter, a 1 GiB LUN's
disk (4 chunks), a context on it, a 100-block vLUN; and the helpers they
share (open fds, live contexts, backing bytes, an ioctl log).

``adapter`` is embedded (``cxlflash.Adapter()``) or connected
(``cxlflash.connect()`` to a fresh daemon process of its own, see
``daemons.py``): tests/conftest.py runs each test that uses it both ways
(ids ``[embedded]`` and ``[connected]``).  A test that reaches into the
driver (``adapter.driver``, its records, fake callers) takes ``embedded``
too: it then runs once, on an embedded adapter."""
import os

import numpy as np
import pytest

import cxlflash

import daemons
from block_pattern import GIB


@pytest.fixture
def adapter(adapter_kind):
    if adapter_kind == "embedded":
        with cxlflash.Adapter() as a:
            yield a
        return
    assert adapter_kind == "connected", adapter_kind
    d = daemons.start()
    try:
        a = cxlflash.connect(d.socket)
    except BaseException:
        d.kill()
        raise
    try:
        yield a
    finally:
        a.close()
    d.stop()                    # SIGTERM: it must exit 0


@pytest.fixture
def embedded(adapter, adapter_kind):
    """The adapter, embedded (the test runs only that way): for tests that
    read the driver in this process."""
    assert adapter_kind == "embedded"
    return adapter


@pytest.fixture
def disk(adapter):
    with adapter.open_disk(adapter.create_lun(GIB)) as d:     # 4 chunks
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
    drv = a.driver
    return [c for c in drv.ctx_tbl if c is not None] + list(drv.ctx_err_recovery)


def phys_bytes(vlun, lba, nblocks=1):
    """The backing store's bytes under ``nblocks`` vLBAs from ``lba``."""
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
