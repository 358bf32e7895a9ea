"""Makes the helper modules of ``tests/`` (``forking``, ``block_pattern``,
``scsi_sense``, ...) importable by bare name from every test directory,
whichever directory pytest is started on (``pytest tests``,
``pytest tests/driver``) and whatever its import mode."""
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
