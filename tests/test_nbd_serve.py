"""`cxlflash serve --nbd`: the daemon's driver serves its clients and NBD
clients at once, from one allocator; the NBD options in --config."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import cxlflash
from nbd_servers import subprocess_env

MIB = 1 << 20


def start(tmp_path, *args):
    pid_file = tmp_path / "pid"
    log = open(tmp_path / "log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "cxlflash", "serve", "--pid-file",
                          str(pid_file), "--exit-with-parent", *args],
                         stdout=log, stderr=log, env=subprocess_env(), cwd=str(tmp_path))
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text().strip() == str(p.pid)):
        assert p.poll() is None, (tmp_path / "log").read_text()
        assert time.monotonic() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.02)
    return p


def stop(p, tmp_path):
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0, (tmp_path / "log").read_text()
    return (tmp_path / "log").read_text()


def qemu_io(uri, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "fail" not in r.stdout.lower(), r.stdout + r.stderr
    return r.stdout


def test_daemon_clients_and_nbd_clients_share_the_lun(tmp_path):
    sock, nsock = tmp_path / "ctl.sock", tmp_path / "nbd.sock"
    p = start(tmp_path, "--socket", str(sock), "--size", "1G", "--nbd", f"unix:{nsock}",
              "--export", "x=300M")
    try:
        uri = f"nbd+unix:///x?socket={nsock}"
        qemu_io(uri, "write -P 0x3c 299M 1M", "read -P 0x3c 299M 1M")
        a = cxlflash.connect(str(sock))
        try:
            ctxs = a.status()["contexts"]
            assert [c["pid"] for c in ctxs] == [p.pid]         # the export's context
            ctx = a.open_disk(a.luns()[0]).attach()
            v = ctx.create_virtual(0)
            # 1 GiB is 4 chunks; the export holds 2 (300 MiB): 2 are left.
            with pytest.raises(cxlflash.CxlFlashError):
                v.set_size(3 * 65536)
            v.set_size(2 * 65536)
            v.write(0, b"z" * 4096)
            ctx.close()
        finally:
            a.close()
        qemu_io(uri, "read -P 0x3c 299M 1M")                   # untouched
    finally:
        log = stop(p, tmp_path)
    assert "export 'x'" in log and f"NBD on unix:{nsock}" in log
    assert not nsock.exists() and not sock.exists()


def test_nbd_options_in_the_config_file(tmp_path):
    (tmp_path / "c.toml").write_text('socket = "ctl.sock"\nsize = "512M"\n'
                                     'nbd = "unix:n.sock"\nexport = ["a=1M", "b=2M"]\n'
                                     'threads = 2\n')
    p = start(tmp_path, "--config", str(tmp_path / "c.toml"))
    try:
        r = subprocess.run(["nbdinfo", "--json", "--list",
                            f"nbd+unix:///?socket={tmp_path / 'n.sock'}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        sizes = {e["export-name"]: e["export-size"] for e in json.loads(r.stdout)["exports"]}
        assert sizes == {"a": MIB, "b": 2 * MIB}
    finally:
        stop(p, tmp_path)


@pytest.mark.parametrize("args, says", [
    (["--export", "a=1M"], "--export needs --nbd"),
    (["--nbd", "unix:x.sock"], "give at least one"),
    (["--nbd", "tcp:99999", "--export", "a=1M"], "PORT 0..65535"),
    (["--nbd", "unix:x.sock", "--export", "a=1M", "--export", "a=2M"], "given twice"),
    (["--nbd", "unix:x.sock", "--export", "a=0"], "a size of 0"),
    (["--nbd", "unix:x.sock", "--export", "d=direct", "--export", "a=1M"], "whole LUN"),
])
def test_serve_nbd_mistakes(tmp_path, args, says):
    r = subprocess.run([sys.executable, "-m", "cxlflash", "serve", "--socket",
                        str(tmp_path / "s"), *args], capture_output=True, text=True,
                       env=subprocess_env(), cwd=str(tmp_path), timeout=60)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "s")
