"""Fixtures of the driver tests.

Two kinds of adapter, the same type (``cxlflash.Adapter``) today:

- ``adapter`` (and the factory ``make_adapter(**Adapter kwargs)``): for tests
  that use only the public interface -- ``cxlflash.ioctl``, the Adapter and
  Disk methods (``add_lun``, ``open_disk``, ``fail``, ``reset``,
  ``inject_fault``, ``signal_waiters``, ``lun_mode``, ...), ``read``,
  ``write``, ``translate``.  This is the seam where a daemon-connected
  adapter (``cxlflash.connect``) can be put in place of the embedded one.
- ``embedded`` (and ``make_embedded(**kw)``): for tests that reach into the
  driver -- ``adapter.driver``, ``disk.sdev``, ``superpipe.disk_ioctl`` with a
  pretend ``Caller``, the driver's records.  Always an embedded adapter.

Both set the driver's recovery and mailbox retry delays to 1 ms (a test of
a retry loop would otherwise sleep 0.1-1 s per retry).  Every adapter is
closed at teardown, after the adapter fds the test was handed
(``helpers._open_fds``) are closed.
"""
import pytest

import cxlflash

from .helpers import close_open_fds

FAST_RETRY = 0.001               # seconds, for recovery and mailbox retries


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
def _close_adapter_fds():
    """The adapter fds a test without an adapter fixture was handed."""
    yield
    close_open_fds()


@pytest.fixture
def make_adapter():
    """make_adapter(**Adapter kwargs) -> an adapter for public-interface tests."""
    made, make = _factory(_embedded_adapter)
    yield make
    _close(made)


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
