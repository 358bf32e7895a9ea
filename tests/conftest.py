"""Makes the helper modules of ``tests/`` (``forking``, ``block_pattern``,
``scsi_sense``, ...) importable by bare name from every test directory,
whichever directory pytest is started on (``pytest tests``,
``pytest tests/driver``) and whatever its import mode.

And runs every test of the ``adapter`` fixture (``api_fixtures``) twice:
against an embedded adapter (``[embedded]``) and against one connected to
a daemon in another process (``[connected]``, ``daemons.py``), so the two
cannot drift apart.  A test that needs the embedded adapter's insides
(``adapter.driver``, driver records, fake callers) asks for the fixture
``embedded`` as well: it then runs once, embedded."""
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# The Ceph cluster of the RBD tests (``ceph.py``): started on first use.
from ceph import ceph, ceph_cluster  # noqa: E402,F401

ADAPTER_KINDS = ("embedded", "connected")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "driver(**tunables): driver tunables the adapter fixture sets "
        "(embedded: in this process; connected: in the daemon), e.g. "
        "recovery_retry_delay=0")


def pytest_generate_tests(metafunc):
    """``adapter_kind`` (what the ``adapter`` fixture makes): both kinds,
    or only "embedded" for a test that uses the ``embedded`` (or
    ``make_embedded``) fixture; a
    test that parametrizes ``adapter_kind`` itself chooses its own."""
    names = metafunc.fixturenames
    if "adapter_kind" not in names:
        return
    for m in metafunc.definition.iter_markers("parametrize"):
        argnames = m.args[0]
        if isinstance(argnames, str):
            argnames = [a.strip() for a in argnames.split(",")]
        if "adapter_kind" in argnames:
            return
    embedded_only = "embedded" in names or "make_embedded" in names
    kinds = ["embedded"] if embedded_only else list(ADAPTER_KINDS)
    metafunc.parametrize("adapter_kind", kinds)
