"""``cxlflash bench -t rbd:POOL/IMAGE``: the bench's I/O rows on an RBD LUN,
with fio's rbd engine beside a read-only row, the rules for a target that
may hold data, and what it refuses."""
from ceph import MIB
from test_cli import run_subprocess


def test_a_write_run_needs_force_and_verifies(ceph, tmp_path):
    _, lun = ceph.image(512 * MIB)
    p = run_subprocess(tmp_path, "bench", "io", "-t", lun, "-r", "0", "-d", "1",
                       "--qd", "8", "--warmup", "0", "--vlun-size", "256M")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "refusing to overwrite the RBD image" in p.stderr
    p = run_subprocess(tmp_path, "bench", "io", "-t", lun, "-r", "0", "-d", "1",
                       "--qd", "8", "--warmup", "0", "--vlun-size", "256M", "--force",
                       timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4k random write" in p.stdout
    assert "ok (" in p.stdout                       # every block written read back
    # fio cannot write while this run's vLUN holds the image's lock: it says so.
    assert "fio not run" in p.stdout + p.stderr


def test_a_read_only_run_compares_with_fio_rbd(ceph, tmp_path):
    _, lun = ceph.image(512 * MIB)
    p = run_subprocess(tmp_path, "bench", "io", "-t", lun, "-r", "100", "-d", "1",
                       "--qd", "8", "--warmup", "0", "--vlun-size", "256M", timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "without a prefill" in p.stdout + p.stderr
    line = next(l for l in p.stdout.splitlines() if l.startswith("fio, the same requests"))
    assert "(rbd, qd 8" in line and "x fio's rate" in line


def test_an_rbd_target_has_its_own_size(ceph, tmp_path):
    _, lun = ceph.image(64 * MIB)
    p = run_subprocess(tmp_path, "bench", "io", "-t", lun, "--size", "1G")
    assert p.returncode == 2
    assert "used at its own size" in p.stderr
    p = run_subprocess(tmp_path, "bench", "io", "-t", lun, "--direct-io", "-r", "100")
    assert p.returncode == 2
    assert "--direct-io is for files and devices" in p.stderr
