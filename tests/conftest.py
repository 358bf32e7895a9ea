"""Makes the helper modules of ``tests/`` (``forking``, ``block_pattern``,
``scsi_sense``, ...) importable by bare name from every test directory,
whichever directory pytest is started on (``pytest tests``,
``pytest tests/driver``) and whatever its import mode.

And runs every test of the ``adapter`` fixture (``api_fixtures``) twice:
against an embedded adapter (``[embedded]``) and against one connected to
a daemon in another process (``[connected]``, ``daemons.py``), so the two
cannot drift apart.  A test that needs the embedded adapter's insides
(``adapter.driver``, driver records, fake callers) asks for the fixture
``embedded`` as well: it then runs once, embedded.

And, in the modules that say so (``LUN_BACKINGS = ("memory", "rbd")``),
runs every test whose LUN comes from the ``lun_backing`` fixture (the
object-API ``disk`` fixture, the driver tests' ``add_disk``) on both
backings: memory (``[memory]``) and an RBD image of the session's Ceph
cluster (``[rbd]``, ``ceph.py``).  A test that depends on the memory
backing's specifics (its fd: holes, fstat, punch, backing bytes read with
pread) asks for the fixture ``memory_backing``: it then runs only on
memory."""
import os
import sys

import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# The Ceph cluster of the RBD tests (``ceph.py``): started on first use.
from ceph import ceph, ceph_cluster, rbd_built  # noqa: E402,F401

ADAPTER_KINDS = ("embedded", "connected")
LUN_BACKING_KINDS = ("memory", "rbd")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "driver(**tunables): driver tunables the adapter fixture sets "
        "(embedded: in this process; connected: in the daemon), e.g. "
        "recovery_retry_delay=0")


def _parametrized_by_the_test(metafunc, name):
    for m in metafunc.definition.iter_markers("parametrize"):
        argnames = m.args[0]
        if isinstance(argnames, str):
            argnames = [a.strip() for a in argnames.split(",")]
        if name in argnames:
            return True
    return False


def pytest_generate_tests(metafunc):
    _generate_lun_backing(metafunc)
    _generate_adapter_kind(metafunc)


def _generate_lun_backing(metafunc):
    """``lun_backing``: "memory" (the fixture's default), or both
    LUN_BACKING_KINDS in a module whose ``LUN_BACKINGS`` names them --
    "memory" only for a test that asks for ``memory_backing``."""
    names = metafunc.fixturenames
    if "lun_backing" not in names or _parametrized_by_the_test(metafunc, "lun_backing"):
        return
    if hasattr(metafunc.module, "pytest_generate_tests"):
        return                      # the module crosses it with its own parameters
    kinds = tuple(getattr(metafunc.module, "LUN_BACKINGS", ("memory",)))
    assert set(kinds) <= set(LUN_BACKING_KINDS), kinds
    if "memory_backing" in names or not rbd_built():
        # A build without librbd has no RBD LUNs to run them on (CI's
        # debug build; tests/test_rbd_build.py checks what it says then).
        kinds = ("memory",)
    if len(kinds) > 1:
        metafunc.parametrize("lun_backing", kinds)


@pytest.fixture
def lun_backing():
    """What the test's LUNs are backed by: "memory" or "rbd" (see the
    module's docstring)."""
    return "memory"


@pytest.fixture
def memory_backing(lun_backing):
    """Declares that the test runs on memory only, in a module of
    ``LUN_BACKINGS``: it reads the memory backing's insides (its fd: holes,
    fstat, punch, bytes read with pread), or it makes its own LUNs
    (``add_lun(None, ...)``) rather than the backing's, or hundreds of them
    (one RBD image, connection and lock each: too slow to be worth it)."""
    assert lun_backing == "memory"


def _generate_adapter_kind(metafunc):
    """``adapter_kind`` (what the ``adapter`` fixture makes): both kinds,
    or only "embedded" for a test that uses the ``embedded`` (or
    ``make_embedded``) fixture; a
    test that parametrizes ``adapter_kind`` itself chooses its own."""
    names = metafunc.fixturenames
    if "adapter_kind" not in names or _parametrized_by_the_test(metafunc, "adapter_kind"):
        return
    embedded_only = "embedded" in names or "make_embedded" in names
    kinds = ["embedded"] if embedded_only else list(ADAPTER_KINDS)
    metafunc.parametrize("adapter_kind", kinds)
