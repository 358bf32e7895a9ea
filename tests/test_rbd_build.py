"""What the build this runs in does about RBD (issue 15).

The RBD backend is built when librbd's headers are there at build time
(/usr/include/rbd/librbd.h, Debian's librbd-dev) unless CXLFLASH_LIBRBD=0
was set for the build.  .ci/run builds the release package with librbd and
the debug copy with CXLFLASH_LIBRBD=0 (still exported when its tests run):
this file runs on both.  Needs no Ceph cluster."""
import errno
import os
import re
import subprocess
import sys

import pytest

import cxlflash

from nbd_servers import subprocess_env

HEADER = "/usr/include/rbd/librbd.h"


def built_with_librbd():
    """What the build should have done, from what it saw: the header, and
    CXLFLASH_LIBRBD (the same variable, still set, when the tests run)."""
    return os.path.exists(HEADER) and os.environ.get("CXLFLASH_LIBRBD", "") != "0"


def header_version():
    text = open(HEADER).read()
    v = [re.search(rf"#define LIBRBD_VER_{k} (\d+)", text).group(1)
         for k in ("MAJOR", "MINOR", "EXTRA")]
    return ".".join(v)


def info_librbd_line():
    p = subprocess.run([sys.executable, "-m", "cxlflash", "info"], capture_output=True,
                       text=True, env=subprocess_env(), timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.strip().lower().startswith("librbd")]
    assert len(lines) == 1, p.stdout
    return lines[0]


def test_info_reports_librbd_as_built():
    line = info_librbd_line()
    if built_with_librbd():
        assert header_version() in line, line
    else:
        assert "not built" in line and "librbd-dev" in line, line


def _open(where, name):
    if where == "add_lun":
        with cxlflash.Adapter() as a:
            a.add_lun(name)
    else:
        from cxlflash.backing import open_backing
        open_backing(name).close()


@pytest.mark.parametrize("where", ["add_lun", "backing"])
def test_rbd_lun_is_enosys_without_librbd(where, tmp_path):
    """Built without librbd: a well-formed RBD name is ENOSYS saying to
    install librbd-dev.  Built with it: the name is parsed as RBD (an
    unknown option is EINVAL, not a file that does not exist)."""
    good = f"rbd:rbd/img?conf={tmp_path}/none.conf&timeout=2"
    bad = good + "&colour=blue"
    with pytest.raises(OSError) as e:
        _open(where, good if not built_with_librbd() else bad)
    if built_with_librbd():
        assert e.value.errno == errno.EINVAL and "colour" in str(e.value), e.value
    else:
        assert e.value.errno == errno.ENOSYS, e.value
        assert "librbd-dev" in str(e.value), e.value
