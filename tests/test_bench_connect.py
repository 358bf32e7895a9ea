"""``cxlflash bench --connect SOCKET`` and ``--clients N`` against a real
``cxlflash serve`` (tests/daemon_process.py): the run is a client of the
daemon (the daemon logs this process's connection and the run uses the
daemon's LUN), writes are verified, the options that make no sense with a
daemon are refused in one line, and N client processes run each row
together (the barrier, ``bench.clients.sync``) and are added up.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from cxlflash import cli
from cxlflash.bench import clients as bench_clients
from cxlflash.bench.progress import Progress
from cxlflash.bench.results import Row, Side

import daemon_process

FAST = ["-d", "0.2", "--warmup", "0", "--vlun-size", "8M", "--no-fio", "--quiet"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with daemon_process.start(tmp_path_factory.mktemp("serve"), "--size", "2G") as d:
        yield d


def run_bench(capsys, tmp_path, *args):
    out_json = tmp_path / "out.json"
    rc = cli.main(["bench", *args, "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    with open(out_json) as f:
        return out, json.load(f)


def lun_of(daemon):
    a = daemon.connect()
    try:
        (lun,) = a.status()["luns"]
        return lun
    finally:
        a.close()


def test_connect_reads_through_the_daemon(capsys, tmp_path, daemon):
    """A read-only io run: this process connects to the daemon (its log
    says so) and reads the daemon's LUN; the table and JSON as usual."""
    wwid = lun_of(daemon)["wwid"]
    out, doc = run_bench(capsys, tmp_path, "io", "--connect", daemon.socket, *FAST)
    assert f"a client of the daemon at {daemon.socket}" in out
    assert f"LUN {wwid}" in out
    daemon.wait_log(f"pid {os.getpid()} (uid {os.getuid()}) connected")
    (row,) = doc["rows"]
    assert row["name"] == "4k random read"
    assert row["workload"]["ops"] > 0 and row["workload"]["errors"] == 0
    assert row["baseline"]["ops"] > 0                # the raw store: the daemon's fd
    assert doc["options"]["connect"] == daemon.socket
    # Everything the run held went back: its context is gone from the daemon.
    a = daemon.connect()
    try:
        assert not [c for c in a.status()["contexts"] if c["pid"] == os.getpid()
                    and c["handles"]]
    finally:
        a.close()


def test_connect_writes_are_verified(capsys, tmp_path, daemon):
    out, doc = run_bench(capsys, tmp_path, "io", "-r", "30", "--connect", daemon.socket,
                         *FAST)
    (row,) = doc["rows"]
    assert row["verified"].startswith("ok (") and not row["failed"], row["verified"]


def test_connect_names_a_lun_by_wwid(capsys, tmp_path, daemon):
    wwid = lun_of(daemon)["wwid"]
    out, doc = run_bench(capsys, tmp_path, "io", "--connect", daemon.socket, "-t", wwid,
                         *FAST)
    assert f"LUN {wwid}" in out


@pytest.mark.parametrize("extra, message", [
    (["-t", "00" * 16], "has no LUN 00000000000000000000000000000000"),
    (["-t", "/tmp/some-file"], "names one of the daemon's LUNs by its WWID"),
    (["--size", "1G"], "with --connect the run uses the daemon's LUNs"),
    (["--vlun-size", "64G"], "has room for a"),
    (["--lun", "direct", "-r", "0"], "refusing to write the daemon's LUN"),
])
def test_connect_refusals(capsys, daemon, extra, message):
    args = ["bench", "io", "--connect", daemon.socket, "-d", "0.1", "--no-fio", "--quiet"]
    if "--vlun-size" not in extra:
        args += ["--vlun-size", "8M"]
    rc = cli.main(args + extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1, err


def test_connect_without_a_daemon(capsys, tmp_path):
    rc = cli.main(["bench", "io", "--connect", str(tmp_path / "none.sock"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no cxlflash daemon at" in err and "cxlflash serve --socket" in err


def test_clients_against_a_daemon(capsys, tmp_path, daemon):
    """Two client processes (not this one) connect; the total adds their
    rates, requests and verified blocks; each client's document is kept."""
    log_before = daemon.log()
    out, doc = run_bench(capsys, tmp_path, "io", "-r", "50", "--clients", "2",
                         "--connect", daemon.socket, *FAST)
    assert len(doc["clients"]) == 2
    pids = [int(p) for p in re.search(r"pids (\d+) (\d+)", out).groups()]
    assert os.getpid() not in pids and len(set(pids)) == 2
    log = daemon.log()[len(log_before):]
    for pid in pids:
        assert f"pid {pid} (uid {os.getuid()}) connected" in log, log
    rows = [c["rows"][0] for c in doc["clients"]]
    (total,) = doc["rows"]
    assert total["workload"]["ops"] == sum(r["workload"]["ops"] for r in rows)
    assert total["workload"]["ops_per_s"] == pytest.approx(
        sum(r["workload"]["ops_per_s"] for r in rows))
    assert total["workload"]["errors"] == 0
    blocks = sum(int(r["verified"].split("(")[1].split()[0]) for r in rows)
    assert total["verified"] == f"ok ({blocks} blocks)"
    assert "client 1 (pid" in out and "client 2 (pid" in out and "total of the 2 clients" in out
    assert [c["options"]["seed"] for c in doc["clients"]] == [1, 2]


def test_clients_start_their_own_daemon(capsys, tmp_path):
    """No --connect: a daemon is started for the run and gone after it."""
    out, doc = run_bench(capsys, tmp_path, "io", "--clients", "2", "--size", "512M", *FAST)
    pid = int(re.search(r"started a daemon for the run: pid (\d+)", out).group(1))
    assert len(doc["clients"]) == 2
    assert doc["rows"][0]["workload"]["ops"] > 0
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the run's daemon outlived the run"
    assert not os.path.exists(re.search(r"socket (\S+)", out).group(1))


def test_clients_refuse_a_path_target_without_connect(capsys, tmp_path):
    rc = cli.main(["bench", "io", "--clients", "2", "-t", str(tmp_path / "f"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "give --connect PATH" in err


def test_clients_refuse_direct_writes(capsys):
    rc = cli.main(["bench", "io", "--clients", "2", "--lun", "direct", "-r", "0", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "every client write the same blocks" in err


# -- the barrier ----------------------------------------------------------------------------

SYNC_CHILD = """
import sys, time
from cxlflash.bench import clients
clients._go = (int(sys.argv[1]), int(sys.argv[2]))
time.sleep(float(sys.argv[3]))
clients.sync()
print(time.monotonic(), flush=True)
"""


class _Child:
    """A process that sleeps, then passes one sync point."""

    def __init__(self, delay):
        go_r, self.go_w = os.pipe()
        self.ready_r, ready_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SYNC_CHILD, str(go_r), str(ready_w), str(delay)],
            stdout=subprocess.PIPE, text=True, pass_fds=(go_r, ready_w),
            env=daemon_process.environment())
        os.close(go_r)
        os.close(ready_w)

    def go(self):
        os.write(self.go_w, b"g")

    def passed_at(self):
        out = self.proc.communicate(timeout=30)[0]
        os.close(self.go_w)
        os.close(self.ready_r)
        return float(out)


def test_barrier_holds_the_early_client():
    """The client ready at once passes its sync point only when the one
    ready 1 s later does (time.monotonic is system-wide)."""
    early, late = _Child(0), _Child(1.0)
    t0 = time.monotonic()
    bench_clients._barrier([early, late], Progress(enabled=False), 2)
    a, b = early.passed_at(), late.passed_at()
    assert a - t0 >= 0.9, "the early client did not wait for the late one"
    assert abs(a - b) < 0.3


def test_barrier_goes_on_without_a_client_that_died():
    """A client that dies before its sync point does not hold the others."""
    alive = _Child(0.2)
    dead = _Child(0)
    dead.proc.kill()
    bench_clients._barrier([alive, dead], Progress(enabled=False), 2)
    alive.passed_at()
    dead.proc.wait()


# -- adding up --------------------------------------------------------------------------------


def _row(ops, seconds, verified="", lat=1000.0):
    s = Side(ops=ops, seconds=seconds, nbytes=ops * 4096)
    s.hist.add([lat] * ops)
    return Row("4k random read", "IO", s, verified=verified)


def test_total_rows_add_rates_not_requests_over_time():
    """Two clients over the same window: 1000 req in 1 s and 3000 req in
    2 s is 1000 + 1500 req/s, not 4000 req / 3 s; latencies merged."""
    (t,) = bench_clients.total_rows([[_row(1000, 1.0, "ok (10 blocks)")],
                                     [_row(3000, 2.0, "ok (5 blocks)", lat=9000.0)]])
    assert t.main.rate == pytest.approx(2500.0)
    assert t.main.ops == 4000
    assert t.main.nbytes / t.main.seconds == pytest.approx(2500.0 * 4096)
    assert t.main.hist.total == 4000
    assert t.verified == "ok (15 blocks)"


def test_total_rows_report_a_client_that_failed_verification():
    (t,) = bench_clients.total_rows([[_row(10, 1.0, "ok (10 blocks)")],
                                     [_row(10, 1.0, "FAILED: 1 of 10 blocks")]])
    assert t.failed and t.verified == "FAILED in 1 of 2 clients"


def test_row_from_dict_round_trip():
    r = _row(500, 0.5, "ok (3 blocks)", lat=12345.0)
    back = bench_clients.row_from_dict(r.as_dict())
    assert back.main.ops == 500 and back.main.rate == pytest.approx(1000.0)
    assert (back.main.hist.counts == r.main.hist.counts).all()
    assert back.verified == "ok (3 blocks)"
