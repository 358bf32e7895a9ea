"""The Ceph harness itself (``ceph.py``): whatever happens to the test run
-- a test fails, the run is interrupted, the test process is killed --
nothing of its cluster stays running.  Each case runs pytest in a
subprocess on a one-test file that uses the ``ceph`` fixture."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nbd_servers import subprocess_env

_HERE = os.path.dirname(os.path.abspath(__file__))

INNER = textwrap.dedent('''
    import os, time

    def test_uses_the_cluster(ceph):
        name, lun = ceph.image(64 << 20)
        assert ceph.size(name) == 64 << 20
        with open(os.environ["CEPH_TEST_OUT"], "w") as f:
            f.write(ceph.dir + "\\n" + " ".join(map(str, ceph.pids().values())))
        if os.environ["CEPH_TEST_HOW"] == "fail":
            assert False, "failing on purpose"
        if os.environ["CEPH_TEST_HOW"] in ("kill", "interrupt"):
            ceph.stop_osd()              # a stopped OSD must not keep the cluster alive either
            time.sleep(600)
''')


def alive(pids):
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ceph-" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("how", ["fail", "interrupt", "kill"])
def test_nothing_stays_running(tmp_path, how):
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {_HERE!r})\nfrom ceph import ceph, ceph_cluster  # noqa\n")
    (tmp_path / "test_inner.py").write_text(INNER)
    out = tmp_path / "out"
    env = dict(subprocess_env(), CEPH_TEST_OUT=str(out), CEPH_TEST_HOW=how)
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
                         cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if how == "fail":
            text = p.communicate(timeout=120)[0].decode(errors="replace")
            assert p.returncode == 1 and "failing on purpose" in text, text
        else:
            deadline = time.monotonic() + 60
            while not (out.exists() and out.read_text().count("\n") == 1
                       and out.read_text().split("\n")[1]):
                assert p.poll() is None and time.monotonic() < deadline, p.stdout.read()
                time.sleep(0.1)
            time.sleep(0.3)
            p.send_signal(signal.SIGINT if how == "interrupt" else signal.SIGKILL)
            p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    directory, pids = out.read_text().split("\n")
    pids = [int(x) for x in pids.split()]
    assert len(pids) == 2                     # mon and osd
    # Interrupted or killed: stopped by the fixture or its watcher, within the
    # script's stop time (the monitor takes ~2-3 s; SIGKILL after 15 s).
    deadline = time.monotonic() + 40
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(pids), f"still running after the test run ended ({how}): {alive(pids)}"
    deadline = time.monotonic() + 10
    while os.path.exists(directory) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(directory), "the cluster's directory was left behind"
