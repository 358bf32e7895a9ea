"""``cxlflash bench`` end to end on tiny settings (a second or less a run):
the table on stdout, the JSON it writes (machine, versions, options, every
figure), the exit status, one-line errors for bad options, the progress
display, ``--plot``, and data verification that fails when the data is
corrupted behind the workload's back.

Most runs call ``cxlflash.cli.main`` in-process; a few run
``python -m cxlflash.cli`` as a subprocess (PYTHONPATH set to this checkout
only when ``import cxlflash`` would fail otherwise, so the tests also work
against a pip-installed package).
"""
import functools
import importlib.util
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cxlflash
from cxlflash import bench, cli
from cxlflash._core import pattern

BS = 4096
MIB = 1 << 20

# A memory LUN of two chunks (sparse) with a small vLUN: prefill is 8 MiB.
TINY = ["-d", "0.2", "--warmup", "0.05", "--size", "512M", "--vlun-size", "8M", "--no-fio"]
TABLE_HEAD = ("workload", "rate \u00b1spread", "MB/s", "lat per", "p50 us", "p99 us",
              "p99.9 us", "baseline \u00b1spread", "ratio (p10-p90)", "errors", "verified")
MATRIX_ROWS = ["translate", "chunk alloc+free", "VLUN_CLONE 1M chunks", "4k randread",
               "4k randwrite", "4k 70/30 mix", "1m seqread"]


# -- helpers ----------------------------------------------------------------------


class FakeTTY(io.StringIO):
    """A stream that claims to be a terminal."""

    def isatty(self):
        return True


def _strict_json(text):
    def no_constant(c):
        raise AssertionError(f"the JSON holds {c}: not valid JSON")
    return json.loads(text, parse_constant=no_constant)


def run_main(capsys, *argv):
    """``cli.main(argv)`` in-process: (exit status, stdout, stderr)."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:             # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def bench_json(capsys, tmp_path, *argv, name="out.json"):
    """Run ``cxlflash bench argv --json FILE`` in-process; expect success.
    Returns (stdout, the JSON document)."""
    path = tmp_path / name
    rc, out, err = run_main(capsys, "bench", *argv, "--json", str(path))
    assert rc == 0, (out, err)
    # Progress is off when stderr is not a terminal: nothing on stderr.
    assert err == ""
    assert f"figures written to {path}" in out
    return out, _strict_json(path.read_text())


@functools.lru_cache(maxsize=None)
def _subprocess_env():
    """The environment of a `python -m cxlflash.cli` child: it imports the
    same cxlflash package as this test process (whatever else may be
    installed, e.g. an editable install of another checkout)."""
    env = dict(os.environ)
    where = str(Path(cxlflash.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [where, env.get("PYTHONPATH")]))
    return env


def run_subprocess(cwd, *argv, timeout=60):
    cwd = str(cwd)
    return subprocess.run([sys.executable, "-m", "cxlflash.cli", *argv], cwd=cwd,
                          env=_subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def table_rows(out):
    """The row names of the table on stdout, checking its header."""
    lines = out.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith("workload"))
    head = lines[i]
    pos = [head.index(h) for h in TABLE_HEAD]
    assert pos == sorted(pos), head
    assert set(lines[i + 1]) <= {"-", " "}
    rows = []
    for line in lines[i + 2:]:
        if not line.strip() or line.startswith(("figures written", "plot written",
                                                 "time: ", "fio, ")):
            break
        rows.append(line)
    return rows


def check_latency(lat):
    assert set(lat) == {"p50", "p99", "p99.9"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in lat.values()), lat
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"], lat


def check_side(s):
    assert s["ops"] > 0 and s["seconds"] > 0
    assert s["ops_per_s"] > 0
    assert s["ops_per_s"] == pytest.approx(s["ops"] / s["seconds"])
    assert s["errors"] == 0
    check_latency(s["latency_ns"])
    assert s["histogram"] and sum(c for _, c in s["histogram"]) > 0


def check_row(r, baseline=True, writes=None):
    check_side(r["workload"])
    if baseline:
        check_side(r["baseline"])
        assert r["baseline_name"]
        assert r["ratio"] == pytest.approx(r["workload"]["ops_per_s"]
                                           / r["baseline"]["ops_per_s"])
    else:
        assert r["baseline"] is None and r["ratio"] is None
    if writes:
        assert re.fullmatch(r"ok \(\d+ blocks\)", r["verified"]), r["verified"]
        assert int(r["verified"][4:].split()[0]) > 0
    elif writes is False:
        assert r["verified"] == ""
    assert r["failed"] is False


def check_doc(doc, out, **options):
    m = doc["machine"]
    assert m["platform"] and m["machine"] and m["cores"]
    assert m["python"] == platform.python_version()
    assert m["numpy"] == np.__version__
    assert m["cxlflash"] == cxlflash.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["time"])
    for k, v in options.items():
        assert doc["options"][k] == v, (k, doc["options"])
    names = [r["name"] for r in doc["rows"]]
    shown = table_rows(out)
    assert len(shown) == len(names)
    for line, name in zip(shown, names):
        assert line.startswith(name), (line, name)
    return {r["name"]: r for r in doc["rows"]}


# -- the standard matrix (as a subprocess, with no workload named) ----------------


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    path = d / "matrix.json"
    t0 = time.monotonic()
    p = run_subprocess(d, "bench", "-d", "0.1", "--warmup", "0", "--size", "512M",
                       "--vlun-size", "8M", "--json", str(path))
    return p, _strict_json(path.read_text()) if path.exists() else None, \
        time.monotonic() - t0


def test_matrix_subprocess(matrix):
    p, doc, wall = matrix
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""                # stderr is a pipe: no progress display
    assert "bench: matrix on memory (in-memory adapter)" in p.stdout
    rows = check_doc(doc, p.stdout, workload="matrix", target="memory", size=512 * MIB,
                     lun="virtual", vlun_blocks=2048, duration=0.1, warmup=0.0,
                     compare_raw=True, threads=1)
    assert list(rows) == MATRIX_ROWS
    for name, r in rows.items():
        check_row(r, baseline=True, writes=name in ("4k randwrite", "4k 70/30 mix"))
    assert rows["translate"]["unit"] == "LBA"
    assert rows["4k randread"]["unit"] == "IO"
    # 1 MiB requests: bytes/s is ops/s x 1 MiB.
    seq = rows["1m seqread"]["workload"]
    assert seq["bytes_per_s"] == pytest.approx(seq["ops_per_s"] * MIB)
    assert wall < 30


def test_clone_row_runs_the_vlun_clone_ioctl(monkeypatch):
    """The clone row times the VLUN_CLONE ioctl the product runs (one per
    timed call), with its release untimed, not a core shortcut."""
    from cxlflash import uapi
    from cxlflash.driver import superpipe
    calls = {"clone": 0, "release": 0}

    def counting(name, handler):
        def wrapper(*args):
            calls[name] += 1
            return handler(*args)
        return wrapper

    for name, req in (("clone", uapi.DK_CXLFLASH_VLUN_CLONE),
                      ("release", uapi.DK_CXLFLASH_RELEASE)):
        monkeypatch.setitem(superpipe.HANDLERS, req,
                            counting(name, superpipe.HANDLERS[req]))
    row = bench.row_clone(0.05, bench.Progress(enabled=False))
    assert row.name == "VLUN_CLONE 1M chunks" and row.unit == "chunk"
    calls_timed = row.main.ops // bench.CLONE_CHUNKS
    assert calls_timed >= 1
    # One untimed check clone before the timed ones; every clone released.
    assert calls["clone"] == calls_timed + 1
    assert calls["release"] == calls["clone"]
    assert row.main.hist.total == calls_timed
    assert row.base.ops == calls_timed * bench.CLONE_CHUNKS


# -- io workloads --------------------------------------------------------------------


@pytest.mark.parametrize("read_pct", [0, 70, 100])
def test_io_read_pct(capsys, tmp_path, read_pct):
    out, doc = bench_json(capsys, tmp_path, "io", "--read-pct", str(read_pct), *TINY)
    rows = check_doc(doc, out, workload="io", read_pct=read_pct, blocks=1,
                     pattern="random", lun="virtual", compare_raw=True)
    (name, r), = rows.items()
    kind = {0: "write", 70: "70/30 mix", 100: "read"}[read_pct]
    assert name == f"4k random {kind}"
    check_row(r, writes=read_pct < 100 or False)
    assert r["workload"]["bytes_per_s"] == pytest.approx(r["workload"]["ops_per_s"] * BS)


def test_io_is_chosen_by_io_options(capsys, tmp_path):
    """No workload named, but an I/O option given: an io run."""
    out, doc = bench_json(capsys, tmp_path, "-r", "0", *TINY)
    assert doc["options"]["workload"] == "io"
    assert "bench: io on memory" in out


def test_io_blocks_threads(capsys, tmp_path):
    out, doc = bench_json(capsys, tmp_path, "io", "--blocks", "4", "--threads", "2",
                          "-r", "50", *TINY)
    rows = check_doc(doc, out, blocks=4, threads=2, read_pct=50)
    (name, r), = rows.items()
    assert name == "16k random 50/50 mix"
    check_row(r, writes=True)
    assert r["workload"]["bytes_per_s"] == pytest.approx(r["workload"]["ops_per_s"]
                                                         * 4 * BS)


def test_io_sequential(capsys, tmp_path):
    out, doc = bench_json(capsys, tmp_path, "io", "--pattern", "seq", "-r", "0", *TINY)
    rows = check_doc(doc, out, pattern="seq", read_pct=0)
    (name, r), = rows.items()
    assert name == "4k seq write"
    check_row(r, writes=True)


def test_io_direct_lun(capsys, tmp_path):
    out, doc = bench_json(capsys, tmp_path, "io", "--lun", "direct", "-r", "30",
                          "-d", "0.2", "--warmup", "0.05", "--size", "8M")
    rows = check_doc(doc, out, lun="direct", size=8 * MIB, read_pct=30)
    (r,) = rows.values()
    check_row(r, writes=True)


@pytest.mark.parametrize("kind", ["new file, virtual LUN", "existing file, direct LUN"])
def test_io_file_target(capsys, tmp_path, kind):
    img = tmp_path / "lun.img"
    if kind.startswith("new"):
        args = ["--size", "512M", "--vlun-size", "8M"]
    else:
        with open(img, "wb") as f:
            f.truncate(8 * MIB)
        args = ["--lun", "direct", "--force"]
    out, doc = bench_json(capsys, tmp_path, "io", "-t", str(img), "-r", "50",
                          "-d", "0.2", "--warmup", "0.05", *args)
    assert f"bench: io on {img}," in out
    if kind.startswith("new"):
        assert f"{img} does not exist: creating it, a sparse file of 512 MiB" in out
    else:
        assert f"overwriting {img} (file, 8 MiB) as --force allows: bytes 0..8388607" in out
    rows = check_doc(doc, out, target=str(img), read_pct=50)
    (r,) = rows.values()
    check_row(r, writes=True)
    assert img.stat().st_size == (512 if kind.startswith("new") else 8) * MIB


def test_no_compare_raw(capsys, tmp_path):
    out, doc = bench_json(capsys, tmp_path, "io", "-r", "0", "--no-compare-raw", *TINY)
    rows = check_doc(doc, out, compare_raw=False)
    (r,) = rows.values()
    check_row(r, baseline=False, writes=True)
    assert r["baseline_name"] == ""
    assert "raw store" not in out


def test_io_subprocess_quiet(tmp_path):
    """A second subprocess run: --quiet, exit 0, the table, nothing on stderr."""
    path = tmp_path / "io.json"
    p = run_subprocess(tmp_path, "bench", "io", "-r", "70", "--quiet", *TINY,
                       "--json", str(path))
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    rows = check_doc(_strict_json(path.read_text()), p.stdout, quiet=True, read_pct=70)
    (r,) = rows.values()
    check_row(r, writes=True)


# -- workload models -------------------------------------------------------------------


def test_arkdb(capsys, tmp_path):
    """arkdb with its default size (the memory LUN holds 20 vLUNs)."""
    out, doc = bench_json(capsys, tmp_path, "arkdb", "-d", "0.2")
    rows = check_doc(doc, out, workload="arkdb")
    assert list(rows) == ["arkdb 20 vLUNs 4k 70/30", "arkdb grow 4 MiB steps"]
    r = rows["arkdb 20 vLUNs 4k 70/30"]
    check_side(r["workload"])
    assert re.fullmatch(r"ok \(\d+ blocks\)", r["verified"]) and not r["failed"]
    # Over the wall time of the run, which ends on time with 20 threads.
    assert r["workload"]["seconds"] < 0.2 + 0.5
    grow = rows["arkdb grow 4 MiB steps"]
    assert grow["unit"] == "resize" and grow["workload"]["errors"] == 0


def test_arkdb_grows_in_steps():
    """Through the API with small steps, so the vLUNs do grow in a short run;
    the run also ends on time (the monitor does not wait per thread)."""
    o = bench.Options(workload="arkdb", size=8 << 30, duration=0.2)
    t0 = time.monotonic()
    row, grow = bench.run_arkdb(o, bench.Progress(False), nluns=20, grow_blocks=8,
                                initial_blocks=8)
    assert time.monotonic() - t0 < 2
    assert row.main.seconds < o.duration + 0.5
    assert row.main.ops > 0 and row.main.errors == 0
    assert row.verified.startswith("ok (") and not row.failed
    assert grow.main.ops > 0 and grow.main.hist.total == grow.main.ops


def test_arkdb_too_small_a_lun(capsys):
    rc, out, err = run_main(capsys, "bench", "arkdb", "--size", "1G", "-d", "0.2")
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("cxlflash: error: arkdb needs")


def test_resize_storm(capsys, tmp_path):
    out, doc = bench_json(capsys, tmp_path, "resize-storm", *TINY)
    check_doc(doc, out, workload="resize-storm")
    io_row, storm = doc["rows"]
    assert io_row["name"] == "4k 70/30 during storm"
    check_row(io_row, writes=True)
    assert storm["name"].startswith("resize storm") and storm["unit"] == "resize"
    check_side(storm["workload"])


# -- bad options -------------------------------------------------------------------------


BAD = {
    "unknown workload": ["bench", "bogus"],
    "read-pct 150": ["bench", "io", "--read-pct", "150"],
    "read-pct abc": ["bench", "io", "-r", "abc"],
    "blocks 0": ["bench", "io", "--blocks", "0"],
    "threads -2": ["bench", "io", "--threads", "-2"],
    "size abc": ["bench", "--size", "abc"],
    "size not a block multiple": ["bench", "io", "--size", "5000"],
    "duration -1": ["bench", "--duration", "-1"],
    "warmup -1": ["bench", "io", "--warmup", "-1"],
    "matrix with read-pct": ["bench", "matrix", "--read-pct", "50"],
    "matrix with blocks": ["bench", "matrix", "--blocks", "2"],
    "unknown lun kind": ["bench", "io", "--lun", "sideways"],
    "vlun larger than the lun": ["bench", "io", "--size", "512M", "--vlun-size", "1G"],
    "requests larger than the lun": ["bench", "io", "--lun", "direct", "--size", "8k",
                                     "--blocks", "4"],
    "unknown option": ["bench", "--frobnicate"],
}


def _one_error_line(err):
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("cxlflash"), err


@pytest.mark.parametrize("argv", BAD.values(), ids=BAD.keys())
def test_bad_option(capsys, argv):
    rc, out, err = run_main(capsys, *argv, "-d", "0.2")
    assert rc == 2
    _one_error_line(err)


def test_bad_json_directory(capsys, tmp_path):
    missing = tmp_path / "missing" / "x.json"
    rc, out, err = run_main(capsys, "bench", "io", *TINY, "--json", str(missing))
    assert rc == 2
    _one_error_line(err)
    assert "no such directory" in err
    assert out == ""                        # refused before any run
    # The JSON path is a directory: refused before the run too.
    rc, out, err = run_main(capsys, "bench", "io", *TINY, "--json", str(tmp_path))
    assert rc == 2
    _one_error_line(err)
    assert out == ""


def test_json_under_a_regular_file(capsys, tmp_path):
    # A parent that is a file, not a directory: refused before the run
    # (a read-only directory would not do: the tests may run as root).
    parent = tmp_path / "plain-file"
    parent.write_text("x")
    rc, out, err = run_main(capsys, "bench", "io", *TINY, "--json", str(parent / "x.json"))
    assert rc == 2
    _one_error_line(err)
    assert out == ""


@pytest.mark.parametrize("target", ["directory", "/dev/null"])
def test_bad_target(capsys, tmp_path, target):
    t = str(tmp_path) if target == "directory" else target
    if not os.path.exists(t):
        pytest.skip(f"{t} does not exist here")
    rc, out, err = run_main(capsys, "bench", "io", "-t", t, *TINY)
    assert rc == 2
    _one_error_line(err)
    assert "cannot use target" in err and "neither a regular file nor a block device" in err


def test_bad_option_subprocess(tmp_path):
    for argv in (["bench", "io", "--read-pct", "150"], ["bench", "--size", "abc"]):
        p = run_subprocess(tmp_path, *argv)
        assert p.returncode == 2
        assert p.stdout == ""
        _one_error_line(p.stderr)


def test_no_command(capsys):
    rc, out, err = run_main(capsys)
    assert rc == 2
    assert "bench" in out


# -- --plot -------------------------------------------------------------------------------


def test_plot_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import fails
    png = tmp_path / "x.png"
    rc, out, err = run_main(capsys, "bench", "io", *TINY, "--plot", str(png))
    assert rc == 2
    _one_error_line(err)
    assert err == "cxlflash: error: --plot needs matplotlib: pip install 'cxlflash[plot]'\n"
    assert out == "" and not png.exists()                # refused before the run
    with pytest.raises(bench.BenchError, match=r"cxlflash\[plot\]"):
        bench.plot([], str(png))


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed (the optional extra cxlflash[plot])")
def test_plot_png(capsys, tmp_path):
    png, js = tmp_path / "x.png", tmp_path / "x.json"
    # Long enough for a few points of throughput over time.
    rc, out, err = run_main(capsys, "bench", "io", "-r", "70", "-d", "0.6", "--warmup",
                            "0", "--size", "512M", "--vlun-size", "8M", "--plot", str(png),
                            "--json", str(js))
    assert rc == 0, err
    assert f"plot written to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    (r,) = _strict_json(js.read_text())["rows"]
    assert len(r["workload"]["timeline"]) >= 1


# -- progress ------------------------------------------------------------------------------


def test_progress_off_when_not_a_terminal():
    s = io.StringIO()
    p = bench.Progress(stream=s)
    assert not p.enabled
    p.update("x", 0.5, 1.0, 1000.0, force=True)
    p.clear()
    assert s.getvalue() == ""


def test_progress_line_on_a_terminal():
    s = FakeTTY()
    p = bench.Progress(stream=s)
    assert p.enabled
    p.update("4k random read", 1.5, 3.0, 12345.0, force=True)
    line = s.getvalue()
    assert line.startswith("\r4k random read")
    assert "1.5/3.0s" in line and "12.35k ops/s" in line
    assert "[" + "#" * 10 + " " * 10 + "]" in line
    p.update("4k random read", 1.6, 3.0, 1.0)        # throttled: within 0.1 s
    assert s.getvalue() == line
    p.clear()
    assert s.getvalue().endswith("\r") and not p._width
    # Disabled explicitly (--quiet) even on a terminal.
    q = FakeTTY()
    p = bench.Progress(enabled=False, stream=q)
    p.update("x", 1.0, 2.0, 5.0, force=True)
    assert q.getvalue() == ""


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_during_a_run(capsys, monkeypatch, quiet):
    """A run on a terminal shows a live line with elapsed time and rate,
    cleared at the end; --quiet shows nothing."""
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    argv = ["bench", "io", "-d", "0.6", "--warmup", "0", "--size", "512M",
            "--vlun-size", "8M"] + (["--quiet"] if quiet else [])
    rc = cli.main(argv)
    assert rc == 0
    text = tty.getvalue()
    if quiet:
        assert text == ""
        return
    assert "\r4k random read" in text
    assert re.search(r"\d+\.\d/0\.6s +[\d.]+[kMG]? ?req/s", text), text
    # The prefill's progress is in bytes, not seconds.
    assert re.search(r"\rprefill +\[#+ *\] [\d.]+ MiB/8 MiB +[\d.]+[kMG]? ?B/s", text), text
    assert text.endswith("\r")                       # the line is cleared
    assert table_rows(capsys.readouterr().out)


# -- verification catches corruption ---------------------------------------------------------


def _written_run(opts):
    """A Target, its LUN and an IoRun that has run a short write workload."""
    target = bench.Target(opts)
    lun = target.open_lun()
    run = bench.IoRun(lun, target.fd, opts, "write", opts.seed)
    main, base = run.run(opts.duration, bench.Progress(False))
    assert main.ops > 0 and main.errors == 0
    assert base.ops > 0 and base.errors == 0
    return target, lun, run


@pytest.mark.parametrize("where", ["memory, virtual LUN", "file, direct LUN"])
def test_verify_detects_corruption(tmp_path, where):
    if where.startswith("memory"):
        opts = bench.Options(workload="io", size=512 * MIB, vlun_blocks=2048,
                             read_pct=0, duration=0.2, warmup=0)
    else:
        opts = bench.Options(workload="io", target=str(tmp_path / "lun.img"),
                             size=8 * MIB, lun="direct", read_pct=0, duration=0.2,
                             warmup=0)
    target, lun, run = _written_run(opts)
    try:
        written = np.flatnonzero(run.seq_of)
        checked, bad = run.verify()
        assert (checked, bad) == (len(written), 0)
        assert checked > 100
        bs = lun.block_size

        def phys(lba):
            return int(lun.translate([lba])[0]) * bs

        # Garbage over one written block, behind the LUN's back.
        lba = int(written[len(written) // 2])
        assert run.seq_of[lba] != 0
        os.pwrite(target.fd, b"\xa5" * bs, phys(lba))
        assert run.verify() == (checked, 1)
        # One flipped byte at the end of another block.
        lba2 = int(written[-1])
        last = bytearray(os.pread(target.fd, 1, phys(lba2) + bs - 1))
        last[0] ^= 0x01
        os.pwrite(target.fd, bytes(last), phys(lba2) + bs - 1)
        assert run.verify() == (checked, 2)
        # A lost write: the right block with an older sequence number.
        lba3 = int(written[0])
        old = np.empty(bs, dtype=np.uint8)
        pattern.fill(old, [lba3], [int(run.seq_of[lba3]) - 1], bs)
        os.pwrite(target.fd, old.tobytes(), phys(lba3))
        assert run.verify() == (checked, 3)
        # Putting the right data back heals it.
        good = np.empty(bs, dtype=np.uint8)
        pattern.fill(good, [lba], [int(run.seq_of[lba])], bs)
        os.pwrite(target.fd, good.tobytes(), phys(lba))
        assert run.verify() == (checked, 2)
    finally:
        target.close()


def _corrupt_after_measured_run(monkeypatch):
    """Make every measured IoRun.run corrupt one written block on the
    backing store once it has finished (before the workload verifies)."""
    real_run = bench.IoRun.run
    corrupted = []

    def run_then_corrupt(self, duration, progress, record=True):
        result = real_run(self, duration, progress, record)
        if record and self.writes:
            lba = int(np.flatnonzero(self.seq_of)[0])
            phys = int(self.lun.translate([lba])[0]) * self.bs
            os.pwrite(self.fd, b"\x5a" * self.bs, phys)
            corrupted.append(lba)
        return result

    monkeypatch.setattr(bench.IoRun, "run", run_then_corrupt)
    return corrupted


def test_io_row_fails_on_corruption(monkeypatch):
    corrupted = _corrupt_after_measured_run(monkeypatch)
    opts = bench.Options(workload="io", size=512 * MIB, vlun_blocks=2048, read_pct=50,
                         duration=0.2, warmup=0.05)
    target = bench.Target(opts)
    try:
        lun = target.open_lun()
        target.prefill(lun, bench.Progress(False))
        row = bench.io_row(target, lun, opts, "mix", bench.Progress(False))
    finally:
        target.close()
    assert len(corrupted) == 1
    assert row.failed
    assert re.fullmatch(r"FAILED: 1 of \d+ blocks", row.verified)
    d = row.as_dict()
    assert d["failed"] is True and d["verified"] == row.verified


def test_cli_exit_1_on_corruption(capsys, tmp_path, monkeypatch):
    corrupted = _corrupt_after_measured_run(monkeypatch)
    path = tmp_path / "bad.json"
    rc, out, err = run_main(capsys, "bench", "io", "-r", "0", *TINY, "--json", str(path))
    assert corrupted and rc == 1
    assert re.fullmatch(r"error: 4k random write: data verification FAILED: 1 of \d+ "
                        r"blocks\n", err), err
    (r,) = _strict_json(path.read_text())["rows"]
    assert r["failed"] is True and r["verified"].startswith("FAILED: 1 of ")
    assert "FAILED: 1 of" in out                         # in the table too


def _fake_row(failed=False, errors=0):
    side = bench.Side(ops=10, seconds=1.0, nbytes=10 * BS, errors=errors)
    side.hist.add([1000] * 10)
    row = bench.Row("fake", "IO", side, verified="FAILED: 2 of 9 blocks" if failed
                    else "ok (9 blocks)", failed=failed)
    return [row]


@pytest.mark.parametrize("failed, errors, message", [
    (True, 0, "error: fake: data verification FAILED: 2 of 9 blocks\n"),
    (False, 3, "error: fake: 3 requests failed\n"),
    (False, 0, ""),
])
def test_cli_exit_status_from_rows(capsys, monkeypatch, failed, errors, message):
    monkeypatch.setattr(bench, "run", lambda opts, progress=None, log=None: _fake_row(failed, errors))
    rc, out, err = run_main(capsys, "bench", "io", "-d", "0.2")
    assert rc == (1 if message else 0)
    assert err == message
    assert table_rows(out)[0].startswith("fake")


@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a sparse 1 GiB file (needs root and loop support)."""
    img = tmp_path / "loop.img"
    with open(img, "wb") as f:
        f.truncate(1 << 30)
    try:
        dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                             capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"losetup failed (not root, or no loop device support): {e}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("extra", [[], ["--direct-io", "--blocks", "8"]])
def test_block_device_target(capsys, tmp_path, loop_device, extra):
    out, doc = bench_json(capsys, tmp_path, "io", "--target", loop_device, "--read-pct", "50",
                          "-d", "0.2", "--warmup", "0.05", "--vlun-size", "8M", "--force",
                          *extra)
    (row,) = doc["rows"]
    check_row(row, writes=True)
    assert doc["options"]["target"] == loop_device
    assert doc["options"]["direct_io"] == bool(extra)
    # 512-byte device blocks: a 1-block request is named in bytes.
    assert row["name"] == ("4k random 50/50 mix" if extra else "512B random 50/50 mix")


def test_direct_lun_io_covers_only_its_region():
    """A direct LUN (maybe a large device) is neither prefilled nor tracked
    whole: the I/O covers its first --vlun-size bytes."""
    o = bench.Options(workload="io", size=1 << 30, lun="direct",
                      vlun_blocks=(8 << 20) // 4096, read_pct=0, duration=0.1)
    target = bench.Target(o)
    try:
        lun = target.open_lun()
        run = bench.IoRun(lun, target.fd, o, "direct", 1)
        assert lun.size == (1 << 30) // 4096 and run.region == (8 << 20) // 4096
        assert len(run.seq_of) == run.region
        run.run(0.1, bench.Progress(False))
        written = np.flatnonzero(run.seq_of)
        assert len(written) and written.max() < run.region
        assert run.verify() == (len(written), 0)
    finally:
        target.close()


# -- a benchmark never destroys data (issue 13) ------------------------------------------


def _data_file(path, size, data_bytes=16 * MIB):
    """A sparse file of ``size`` bytes whose first ``data_bytes`` hold random
    data, read-only (0444); returns that data."""
    data = np.random.default_rng(5).integers(0, 256, data_bytes, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    os.chmod(path, 0o444)
    return data


def _digest(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("lun", ["direct", "virtual"])
def test_read_only_run_reads_an_existing_file_as_it_is(capsys, tmp_path, lun):
    """A read workload on a file holding data (read-only, as root too):
    no prefill, nothing written, the run says what it does."""
    img = tmp_path / "data.img"
    _data_file(img, 512 * MIB)
    before = _digest(img)
    out, doc = bench_json(capsys, tmp_path, "io", "--target", str(img), "--lun", lun,
                          "-d", "0.2", "--warmup", "0.05", "--vlun-size", "8M")
    assert f"{img} exists (file, 512 MiB): reading what it holds, opened read-only, " \
           "without a prefill" in out
    (row,) = doc["rows"]
    check_row(row, writes=False)
    assert "prefill" not in doc["phases_s"]
    assert _digest(img) == before
    assert oct(img.stat().st_mode & 0o777) == "0o444"


WRITERS = {
    "io write, direct": (["io", "--lun", "direct", "-r", "0", "--vlun-size", "8M"],
                         "bytes 0..8388607 (the first 8 MiB: the direct LUN's first "
                         "--vlun-size bytes"),
    "io mix, virtual": (["io", "-r", "70", "--vlun-size", "8M"],
                        "bytes 0..8388607 (the first 8 MiB: the virtual LUN's blocks"),
    "matrix": (["matrix", "--vlun-size", "8M"], "bytes 0..8388607"),
    "arkdb": (["arkdb"], "any of its 512 MiB (bytes 0..536870911)"),
    "resize-storm": (["resize-storm"], "any of its 512 MiB (bytes 0..536870911)"),
}


@pytest.mark.parametrize("argv, what", WRITERS.values(), ids=WRITERS.keys())
def test_a_run_that_writes_refuses_an_existing_file(capsys, tmp_path, argv, what):
    img = tmp_path / "data.img"
    _data_file(img, 512 * MIB)
    before = _digest(img)
    t0 = time.monotonic()
    rc, out, err = run_main(capsys, "bench", *argv, "--target", str(img), "-d", "0.2")
    assert rc == 2
    _one_error_line(err)
    assert f"refusing to overwrite {img} (file, 512 MiB, may hold data): this run " \
           f"would write {what}" in err
    assert "--force" in err
    assert "workload" not in out                  # refused before any row ran
    assert time.monotonic() - t0 < 2
    assert _digest(img) == before


@pytest.mark.parametrize("lun", ["direct", "virtual"])
def test_force_overwrites_exactly_what_it_says(capsys, tmp_path, lun):
    img = tmp_path / "data.img"
    data = _data_file(img, 512 * MIB)
    os.chmod(img, 0o644)
    flag = "--allow-overwrite" if lun == "direct" else "--force"
    out, doc = bench_json(capsys, tmp_path, "io", "--target", str(img), "--lun", lun,
                          "-r", "0", "-d", "0.2", "--warmup", "0.05", "--vlun-size", "8M",
                          flag)
    assert f"overwriting {img} (file, 512 MiB) as --force allows: bytes 0..8388607" in out
    (row,) = doc["rows"]
    check_row(row, writes=True)
    with open(img, "rb") as f:
        assert f.read(8 * MIB) != data[:8 * MIB]
        assert f.read(8 * MIB) == data[8 * MIB:]    # nothing past what it said
    assert img.stat().st_size == 512 * MIB


def test_the_vlun_of_a_fresh_target_is_its_first_bytes():
    """What the refusal says for a virtual LUN (its blocks are the LUN's
    first bytes) is what the run does."""
    o = bench.Options(workload="io", size=1 << 30, vlun_blocks=3 * 65536 + 5)
    target = bench.Target(o)
    try:
        lun = target.open_lun()
        lbas = np.arange(lun.size, dtype=np.uint64)
        assert np.array_equal(lun.translate(lbas), lbas)
    finally:
        target.close()


def test_a_missing_target_is_created_and_said(capsys, tmp_path):
    img = tmp_path / "new.img"
    out, doc = bench_json(capsys, tmp_path, "io", "--target", str(img), "--size", "512M",
                          "--vlun-size", "8M", "-r", "0", "-d", "0.2", "--warmup", "0")
    assert f"{img} does not exist: creating it, a sparse file of 512 MiB (left in place " \
           "after the run)" in out
    assert doc["notes"] == [f"{img} does not exist: creating it, a sparse file of 512 MiB "
                            "(left in place after the run)"]
    assert img.stat().st_size == 512 * MIB


def test_an_empty_file(capsys, tmp_path):
    img = tmp_path / "empty.img"
    img.write_bytes(b"")
    for lun in ("direct", "virtual"):
        rc, out, err = run_main(capsys, "bench", "io", "--target", str(img), "--lun", lun,
                                "-d", "0.2")
        assert rc == 2
        _one_error_line(err)
        assert f"target {img} is an empty file (0 bytes): nothing to read and no room to " \
               "write; give --size" in err
        assert img.stat().st_size == 0              # not grown behind the user's back
    out, doc = bench_json(capsys, tmp_path, "io", "--target", str(img), "--lun", "direct",
                          "--size", "8M", "-r", "0", "-d", "0.2", "--warmup", "0")
    assert f"{img} is an empty file: extending it to 8 MiB (sparse)" in out
    assert img.stat().st_size == 8 * MIB


def test_size_with_an_existing_target(capsys, tmp_path):
    img = tmp_path / "data.img"
    _data_file(img, 8 * MIB, MIB)
    rc, out, err = run_main(capsys, "bench", "io", "--target", str(img), "--lun", "direct",
                            "--size", "16M", "-d", "0.2")
    assert rc == 2
    _one_error_line(err)
    assert f"--size is for memory or a new file: {img} exists (8 MiB)" in err
    assert img.stat().st_size == 8 * MIB


def test_an_unattached_loop_device(capsys):
    dev = subprocess.run(["losetup", "--find"], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert bench.probe(dev) == ("block device", 0)
    rc, out, err = run_main(capsys, "bench", "io", "--target", dev, "--lun", "direct",
                            "-d", "0.2")
    assert rc == 2
    _one_error_line(err)
    assert f"target {dev} is a block device of 0 bytes: nothing is attached to it " \
           f"(attach a file first: losetup {dev} FILE)" in err
    assert "No space left" not in err


def test_a_block_device_with_data_is_refused(capsys, loop_device):
    rc, out, err = run_main(capsys, "bench", "io", "--target", loop_device, "-r", "50",
                            "-d", "0.2")
    assert rc == 2
    assert f"refusing to overwrite {loop_device} (block device, 1024 MiB" in err


@pytest.mark.parametrize("threads, ok", [(256, True), (257, False), (1000, False)])
def test_threads_are_bounded(capsys, threads, ok):
    argv = ["bench", "io", "--threads", str(threads), "-d", "0.2", "--warmup", "0", "--no-fio",
            "--size", "512M", "--vlun-size", "64M", "-r", "70"]
    t0 = time.monotonic()
    rc, out, err = run_main(capsys, *argv)
    if ok:
        assert rc == 0, err
        assert time.monotonic() - t0 < 15
        return
    assert rc == 2
    _one_error_line(err)
    assert f"--threads {threads} is more than 256" in err
    assert time.monotonic() - t0 < 1


def test_many_threads_keep_to_the_duration():
    """64 threads, 0.5 s: the measured run ends on time, and no side's
    measured time exceeds the wall time of the run."""
    o = bench.Options(workload="io", size=1 << 30, vlun_blocks=(64 << 20) // 4096,
                      read_pct=70, threads=64, duration=0.5)
    target = bench.Target(o)
    try:
        lun = target.open_lun()
        run = bench.IoRun(lun, target.fd, o, "mix", 1)
        t0 = time.monotonic()
        main, base = run.run(o.duration, bench.Progress(False))
        wall = time.monotonic() - t0
        assert wall < o.duration + 0.5, wall
        assert main.seconds <= wall and base.seconds <= wall
        assert main.ops > 0 and base.ops > 0
    finally:
        target.close()


@pytest.mark.parametrize("stop", ["interrupt", "error"])
def test_rows_measured_are_kept_when_a_later_row_stops(capsys, tmp_path, monkeypatch, stop):
    real = bench.io_row
    calls = []

    def io_row(target, lun, opts, name, progress, log=None):
        calls.append(name)
        if len(calls) == 3:
            if stop == "interrupt":
                raise KeyboardInterrupt
            raise OSError(5, "the disk went away")
        return real(target, lun, opts, name, progress, log)

    monkeypatch.setattr(bench.workloads, "io_row", io_row)   # where run_matrix looks it up
    path = tmp_path / "partial.json"
    rc, out, err = run_main(capsys, "bench", "-d", "0.1", "--warmup", "0", "--size", "512M",
                            "--vlun-size", "8M", "--json", str(path))
    assert rc == (130 if stop == "interrupt" else 2)
    why = "interrupted" if stop == "interrupt" else "error: [Errno 5] the disk went away"
    assert f"the run stopped ({why}); the 5 rows measured before:" in out
    assert table_rows(out) and [l.split("  ")[0] for l in table_rows(out)] == \
        MATRIX_ROWS[:5]
    doc = _strict_json(path.read_text())
    assert doc["incomplete"] == why
    assert [r["name"] for r in doc["rows"]] == MATRIX_ROWS[:5]


def test_spread_next_to_each_figure(capsys, tmp_path):
    out, doc = bench_json(capsys, tmp_path, "io", "-r", "70", "-d", "0.6", "--warmup", "0",
                          "--size", "512M", "--vlun-size", "8M")
    (row,) = doc["rows"]
    for side in (row["workload"], row["baseline"]):
        lo, hi = side["ops_per_s_p10_p90"]
        assert 0 < lo <= hi
        assert len(side["timeline"]) >= 3
    lo, hi = row["ratio_p10_p90"]
    assert 0 < lo <= hi
    assert row["latency_per"] == "request"
    (line,) = table_rows(out)
    assert re.search(r"[\d.]+[kMG]? req/s \u00b1\d+%", line), line
    assert re.search(r"\d\.\d\dx \(\d\.\d\d-\d\.\d\d\)", line), line
    assert re.search(r"time: measured 0.6 s per row, prefill [\d.]+ s", out)


def test_help_explains_the_columns(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    for column in TABLE_HEAD:
        assert column.split(" ")[0].split("/")[0] in text, column
    assert "above 1.00x the workload is faster than its baseline" in " ".join(text.split())
    assert "per batch, not per item" in text
    assert "--force" in text and "--allow-overwrite" in text


def test_plot_one_panel_per_family(tmp_path):
    """The matrix plot: block I/O (per request) and core operations (per
    call) in panels of their own, a row's colour the same everywhere, its
    baseline dashed, every rate drawn (a 1 MiB row too) on log scales."""
    o = bench.Options(workload="matrix", size=512 * MIB, vlun_blocks=2048, duration=0.3,
                      warmup=0.0)
    rows = bench.run(o)
    png = tmp_path / "m.png"
    layout = bench.plot(rows, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(layout) == {"block I/O: latency", "block I/O: rate over time",
                           "core operations: latency", "core operations: rate over time"}
    io_names = {"4k randread", "4k randwrite", "4k 70/30 mix", "1m seqread"}
    colours = {}
    for title, series in layout.items():
        names = {label.split(":")[0] for label, _, _ in series}
        assert names == (io_names if title.startswith("block") else
                         {"translate", "chunk alloc+free", "VLUN_CLONE 1M chunks"}), title
        for label, colour, style in series:
            name = label.split(":")[0]
            assert colours.setdefault(name, colour) == colour, (title, label)
            assert style == ("--" if ":" in label else "-")
    assert len(set(colours.values())) == len(colours)
    import matplotlib.pyplot as plt
    assert not plt.get_fignums()                      # the figure was closed


def test_ctrl_c_prints_the_rows_measured(tmp_path):
    """A real SIGINT in the middle of the matrix: exit 130, the rows
    measured before it on stdout and in the JSON, no traceback."""
    import signal
    path = tmp_path / "partial.json"
    p = subprocess.Popen([sys.executable, "-m", "cxlflash.cli", "bench", "-d", "1",
                          "--warmup", "0", "--size", "512M", "--vlun-size", "8M",
                          "--json", str(path)], cwd=str(tmp_path), env=_subprocess_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4.5)                 # the core rows take about 2.5 s
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (out, err)
    assert "Traceback" not in err and err == "cxlflash: interrupted\n"
    m = re.search(r"the run stopped \(interrupted\); the (\d) rows measured before:", out)
    assert m and int(m.group(1)) >= 3, out
    doc = _strict_json(path.read_text())
    assert doc["incomplete"] == "interrupted"
    assert [r["name"] for r in doc["rows"]] == MATRIX_ROWS[:int(m.group(1))]


# -- the engine: --qd, the raw baseline at the same depth, fio ---------------------------


def test_qd_goes_through_listio_and_raw_listio_at_that_depth(capsys, tmp_path, monkeypatch):
    """`bench io --qd N`: the workload is lun.listio(..., qd=N), its
    baseline the engine's raw_listio on the bare store at the same N."""
    from cxlflash import lun as lun_mod
    from cxlflash._core.engine import Engine
    seen = {"listio": set(), "raw": set()}
    real_listio = lun_mod._Lun.listio

    def listio(self, *args, qd=64, **kw):
        seen["listio"].add(qd)
        return real_listio(self, *args, qd=qd, **kw)

    class Spy:
        def __init__(self, engine):
            self._e = engine

        def __getattr__(self, name):
            return getattr(self._e, name)

        def raw_listio(self, *args, qd=64, **kw):
            seen["raw"].add(qd)
            return self._e.raw_listio(*args, qd=qd, **kw)

    monkeypatch.setattr(lun_mod._Lun, "listio", listio)
    real_init = bench.IoRun.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        assert isinstance(self.engine, Engine)
        self.engine = Spy(self.engine)

    monkeypatch.setattr(bench.IoRun, "__init__", init)
    out, doc = bench_json(capsys, tmp_path, "--qd", "16", "-r", "70", *TINY)
    assert ", qd 16" in out.splitlines()[0]
    (row,) = doc["rows"]
    check_row(row, writes=True)
    assert row["baseline_name"] == "raw store, qd 16"
    assert doc["options"]["qd"] == 16 and doc["options"]["workload"] == "io"
    assert seen == {"listio": {16}, "raw": {16}}


def test_qd_out_of_range(capsys):
    rc, out, err = run_main(capsys, "bench", "io", "--qd", "70000", "-d", "0.2")
    assert rc == 2
    _one_error_line(err)
    assert "--qd 70000 is more than 65536" in err


@pytest.mark.parametrize("target", ["memory", "file"])
def test_fio_figure_next_to_the_row(capsys, tmp_path, target):
    """Where fio is on PATH, `bench io` adds fio's rate for the same store,
    depth and request size (io_uring)."""
    assert shutil.which("fio"), "fio is needed for this test (apt-get install fio)"
    args = ["--size", "512M", "--vlun-size", "8M"]
    if target == "file":
        args = ["--target", str(tmp_path / "new.img"), *args]
    out, doc = bench_json(capsys, tmp_path, "io", "--qd", "4", "-r", "50", "-d", "0.5",
                          "--warmup", "0", *args)
    (row,) = doc["rows"]
    check_row(row, writes=True)
    fio = row["fio"]
    assert fio["iops"] > 0
    cmd = fio["command"]
    for flag in ("--ioengine=io_uring", "--iodepth=4", "--bs=4096", "--rw=randrw",
                 "--rwmixread=50", "--direct=0", f"--size={8 * MIB}", "--numjobs=1"):
        assert flag in cmd, (flag, cmd)
    path = next(a for a in cmd if a.startswith("--filename="))
    assert path == (f"--filename={tmp_path / 'new.img'}" if target == "file"
                    else f"--filename=/proc/{os.getpid()}/fd/{path.rsplit('/', 1)[1]}")
    assert re.search(r"^fio, the same requests on the same store \(io_uring, qd 4, 1 "
                     r"thread\(s\)\): [\d.]+[kMG]? req/s; 4k random 50/50 mix: "
                     r"\d+\.\d\dx fio's rate$", out, re.M), out
    assert "fio" in doc["phases_s"]


def test_fio_reads_only_on_a_read_only_run(tmp_path):
    o = bench.Options(workload="io", read_pct=100, qd=8, threads=2, blocks=2, pattern="seq",
                      direct_io=True, duration=1.0)
    cmd = bench.fio_command("/dev/loop9", o, 8 * MIB, 4096)
    assert "--readonly" in cmd and "--rw=read" in cmd and "--direct=1" in cmd
    assert "--bs=8192" in cmd and "--numjobs=2" in cmd and "--iodepth=8" in cmd


def test_engine_in_the_header_and_info(capsys):
    from cxlflash._core.engine import engine_info
    engine = engine_info()["engine"]
    rc, out, err = run_main(capsys, "info")
    assert rc == 0
    assert re.search(rf"^engine +{engine}\b", out, re.M), out
    rc, out, err = run_main(capsys, "bench", "io", *TINY)
    assert rc == 0
    assert f"engine {engine}, qd 1" in out.splitlines()[0]
