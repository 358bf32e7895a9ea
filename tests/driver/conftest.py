"""Fixtures of the driver tests.

Two kinds of adapter, the same type (``cxlflash.Adapter``):

- ``adapter`` (and the factory ``make_adapter(**Adapter kwargs)``): for tests
  that use only the public interface -- ``cxlflash.ioctl``, the Adapter and
  Disk methods (``add_lun``, ``open_disk``, ``fail``, ``reset``,
  ``inject_fault``, ``signal_waiters``, ``lun_mode``, ...), ``read``,
  ``write``, ``translate``.  Each such test runs twice (tests/conftest.py):
  ``[embedded]``, and ``[connected]`` to a daemon process of its own.
- ``embedded`` (and ``make_embedded(**kw)``): for tests that reach into the
  driver -- ``adapter.driver``, ``disk.sdev``, ``superpipe.disk_ioctl`` with a
  pretend ``Caller``, the driver's records.  Always an embedded adapter.

Both set the driver's recovery and mailbox retry delays to 1 ms (a test of
a retry loop would otherwise sleep 0.1-1 s per retry).  Every adapter is
closed at teardown, after the adapter fds the test was handed
(``helpers._open_fds``) are closed.

In a module with ``LUN_BACKINGS = ("memory", "rbd")`` every test runs on
both backings (tests/conftest.py): ``add_disk`` then makes an RBD image's
LUN.  A test that reads the memory backing (``phys``, ``chunk_bytes``)
asks for ``memory_backing``.
"""
import contextlib

import pytest

import cxlflash

from api_fixtures import new_adapter
from . import helpers
from .helpers import close_open_fds

FAST_RETRY = 0.001               # seconds, for recovery and mailbox retries
FAST_SETTINGS = {"recovery_retry_delay": FAST_RETRY, "mailbox_retry_delay": FAST_RETRY}


def _embedded_adapter(**kw):
    a = cxlflash.Adapter(**kw)
    a.driver.recovery_retry_delay = FAST_RETRY
    a.driver.mailbox_retry_delay = FAST_RETRY
    return a


def _factory(new):
    made = []

    def make(**kw):
        a = new(**kw)
        made.append(a)
        return a

    return made, make


def _close(made):
    close_open_fds()
    for a in made:
        a.close()


@pytest.fixture(autouse=True)
def _lun_backing(lun_backing, request):
    """``add_disk`` makes its LUN on an RBD image of the session's Ceph
    cluster while the test runs on "rbd" (a module with ``LUN_BACKINGS``,
    see tests/conftest.py); removed after the test."""
    made = []
    if lun_backing == "rbd":
        ceph = request.getfixturevalue("ceph")

        def image(size):
            made.append(size)
            return ceph.image(size)[1]
        helpers.RBD_IMAGE = image
    try:
        yield
    finally:
        helpers.RBD_IMAGE = None
    # An "[rbd]" test that made no RBD LUN ran on memory twice: it must say
    # so (memory_backing).
    assert lun_backing == "memory" or made, (
        f"{request.node.name} ran on 'rbd' but made no LUN with add_disk(): give it the "
        f"fixture memory_backing")


@pytest.fixture(autouse=True)
def _close_adapter_fds():
    """The adapter fds a test without an adapter fixture was handed."""
    yield
    close_open_fds()


@pytest.fixture
def make_adapter(adapter_kind):
    """make_adapter(**Adapter kwargs) -> an adapter for public-interface
    tests, of the test's kind: tests/conftest.py runs each test that uses it
    against an embedded adapter and against one connected to a daemon of
    its own (``api_fixtures.new_adapter``, ``daemons.py``)."""
    with contextlib.ExitStack() as stack:
        def make(**kw):
            return stack.enter_context(new_adapter(adapter_kind, FAST_SETTINGS, **kw))
        try:
            yield make
        finally:
            close_open_fds()            # before the adapters close


@pytest.fixture
def make_embedded():
    """make_embedded(**Adapter kwargs) -> an embedded adapter (driver reachable)."""
    made, make = _factory(_embedded_adapter)
    yield make
    _close(made)


@pytest.fixture
def adapter(make_adapter):
    return make_adapter()


@pytest.fixture
def embedded(make_embedded):
    return make_embedded()
