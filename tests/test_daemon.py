"""``cxlflash serve`` as a service and ``cxlflash ctl``, each test with real
processes: readiness (only once the socket accepts), the pid file and its
lock, stop signals, socket activation, socket permissions, the
configuration file, ``--exit-with-parent``, one-line errors for bad
options, and ``ctl``'s tables and JSON.
"""
import fcntl
import grp
import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import daemon_process
from cxlflash.server import ctl

SERVE = daemon_process.SERVE
start = daemon_process.start


def run(tmp_path, *args, **kw):
    """A start that fails: (exit status, log); it never said READY=1."""
    d = daemon_process.spawn(tmp_path, *args, **kw)
    rc = d.wait()
    message = d.notifier.receive(0)
    d.notifier.close()
    assert message is None, (message, d.log())
    return rc, d.log()


def accepts(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(path)
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False


def one_error_line(log, *words):
    lines = [ln for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1, log
    assert errors[0].startswith("cxlflash serve: error: "), log
    for w in words:
        assert w in errors[0], (w, log)
    return errors[0]


# -- readiness and stopping -----------------------------------------------------

def test_ready_is_sent_only_once_the_socket_accepts(tmp_path):
    d = daemon_process.spawn(tmp_path, "--size", "1G")
    try:
        daemon_process.wait_ready(d)
        # READY=1 arrived: the very next connect must be accepted.
        assert accepts(d.socket), d.log()
        assert d.ready.split("\n") == ["READY=1", f"MAINPID={d.pid}"]
        assert "cxlflash serve: ready: pid" in d.log()
    finally:
        d.stop()


def test_ready_on_a_notify_socket_path(tmp_path):
    with start(tmp_path, notify_path=str(tmp_path / "notify")) as d:
        assert d.ready.startswith("READY=1")
        assert accepts(d.socket)


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_exits_0_and_removes_the_socket_and_pid_file(tmp_path, signo):
    pid_file = tmp_path / "serve.pid"
    d = start(tmp_path, "--pid-file", pid_file)
    assert os.path.exists(d.socket) and pid_file.exists()
    d.stop(signo)
    assert not os.path.exists(d.socket)
    assert not pid_file.exists()
    log = d.log()
    assert f"stopping ({signo.name})" in log
    assert log.rstrip().endswith("cxlflash serve: stopped"), log
    assert all(ln.startswith("cxlflash serve: ") for ln in log.splitlines()), log


def test_stopping_is_notified(tmp_path):
    d = start(tmp_path)
    d.send(signal.SIGTERM)
    msg = d.notifier.receive(10)
    assert msg == "STOPPING=1"
    d.stop()


# -- the pid file ---------------------------------------------------------------

def test_pid_file_is_written_when_ready_and_locked(tmp_path):
    pid_file = tmp_path / "serve.pid"
    with start(tmp_path, "--pid-file", pid_file) as d:
        assert pid_file.read_text() == f"{d.pid}\n"
        with open(pid_file) as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other = tmp_path / "other"
        other.mkdir()
        rc, log = run(other, "--pid-file", pid_file)
        assert rc == 1
        one_error_line(log, f"pid file {pid_file} is locked by pid {d.pid}")
        # The second daemon stopped before it made a socket; the first serves on.
        assert not (other / "cxlflash.sock").exists()
        assert pid_file.read_text() == f"{d.pid}\n"
        assert accepts(d.socket)


def test_a_stale_pid_file_is_taken_over(tmp_path):
    pid_file = tmp_path / "serve.pid"
    pid_file.write_text("999999\n")            # left by a daemon killed with -9
    with start(tmp_path, "--pid-file", pid_file) as d:
        assert pid_file.read_text() == f"{d.pid}\n"


# -- the socket -----------------------------------------------------------------

def test_a_live_daemons_socket_is_not_taken(tmp_path):
    with start(tmp_path) as d:
        rc, log = run(tmp_path, socket_path=d.socket)
        assert rc == 1
        one_error_line(log, f"a daemon already serves {d.socket}")
        assert accepts(d.socket)


def test_a_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "cxlflash.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                                   # the path stays, nobody listens
    with start(tmp_path) as d:
        assert accepts(path)
        assert f"removed the stale socket {path}" in d.log()


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path):
    path = tmp_path / "cxlflash.sock"
    path.write_text("precious")
    rc, log = run(tmp_path)
    assert rc == 1
    one_error_line(log, "exists and is not a socket")
    assert path.read_text() == "precious"


def test_a_socket_path_too_long_is_one_line(tmp_path):
    rc, log = run(tmp_path, socket_path=str(tmp_path / ("x" * 120)))
    assert rc == 1
    one_error_line(log, "at most 107")


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_the_socket_is_0660_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        d = start(tmp_path)
    finally:
        os.umask(old)
    with d:
        st = os.stat(d.socket)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert "(mode 0660)" in d.log()


def test_mode_and_group(tmp_path):
    gid = os.getgid()
    name = grp.getgrgid(gid).gr_name
    with start(tmp_path, "--mode", "0600", "--group", name) as d:
        st = os.stat(d.socket)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_gid == gid
        assert f"(mode 0600, group {name})" in d.log()


# -- socket activation ----------------------------------------------------------

# Makes fd N its fd 3, sets LISTEN_PID to its own pid, then execs the daemon
# (which keeps the pid) -- as systemd does.  (dash's "exec 3<&N" takes N <= 9
# only, so not sh.)
ACTIVATE = textwrap.dedent("""
    import os, sys
    fd = int(sys.argv[1])
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
    os.execv(sys.argv[2], sys.argv[2:])
""")


def _activated(tmp_path, listener, *args):
    """The daemon with ``listener`` as fd 3, as socket activation gives it."""
    fd = listener.fileno()
    return daemon_process.spawn(tmp_path, *args, socket_path=False,
                                prefix=[sys.executable, "-c", ACTIVATE, str(fd)],
                                pass_fds=(fd,))


def test_socket_activation_serves_fd_3_and_leaves_the_path(tmp_path):
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    d = _activated(tmp_path, listener, "--mode", "0600")
    listener.close()                            # the daemon holds it now
    daemon_process.wait_ready(d)
    try:
        assert accepts(path)
        log = d.log()
        assert f"listening on {path} (fd 3, socket activation)" in log, log
        assert "--mode ignored: the socket comes from socket activation" in log
    finally:
        d.stop()
    # systemd owns the path: the daemon does not remove it.
    assert os.path.exists(path)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_socket_activation_refuses_an_fd_3_that_does_not_listen(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "bound-only.sock"))     # bound, never listen()ed
    d = _activated(tmp_path, s)
    s.close()
    assert d.wait() == 1
    d.notifier.close()
    one_error_line(d.log(), "fd 3 is not a listening AF_UNIX stream socket")


def test_listen_pid_of_another_process_is_ignored(tmp_path):
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    with start(tmp_path, env=env) as d:
        assert accepts(d.socket)
        assert "socket activation ignored" in d.log()


# -- the configuration file -----------------------------------------------------

def _config(tmp_path, text):
    path = tmp_path / "serve.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_config_says_what_the_options_say(tmp_path):
    conf = _config(tmp_path, """
        socket = "conf.sock"
        size = "512M"
        mode = "0640"
        pid_file = "conf.pid"
        ports = 1
    """)
    with start(tmp_path, "--config", conf, socket_path=False) as d:
        path = tmp_path / "conf.sock"            # relative to the file's directory
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert (tmp_path / "conf.pid").read_text() == f"{d.pid}\n"
        assert "memory, 512 MiB" in d.log()
        assert accepts(str(path))
    assert not path.exists()
    # The same with options.
    with start(tmp_path, "--size", "512M", "--mode", "0640", "--ports", "1",
               "--pid-file", tmp_path / "opt.pid", socket_path=str(tmp_path / "opt.sock")) as d:
        assert stat.S_IMODE(os.stat(tmp_path / "opt.sock").st_mode) == 0o640
        assert "memory, 512 MiB" in d.log()


def test_command_line_options_win_over_the_config(tmp_path):
    conf = _config(tmp_path, """
        socket = "conf.sock"
        mode = 0o600
        size = 1073741824
    """)
    with start(tmp_path, "--config", conf, "--mode", "0660", "--size", "256M") as d:
        assert d.socket == str(tmp_path / "cxlflash.sock")
        assert not (tmp_path / "conf.sock").exists()
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660
        assert "memory, 256 MiB" in d.log()


@pytest.mark.parametrize("text, words", [
    ('sockett = "x.sock"\nlunz = []\n', ["unknown keys lunz, sockett"]),
    ('mode = 660\n', ["mode", "0o660"]),
    ('size = "lots"\n', ["size", "not a size"]),
    ('size = 1000\n', ["multiple of 4096"]),
    ('lun = 3\n', ["lun must be a path"]),
    ('ports = 9\n', ["ports must be 1..4"]),
    ('group = "no-such-group-here"\n', ["no group named"]),
    ('socket = \n', ["not valid TOML"]),
])
def test_config_errors_are_one_line_exit_2(tmp_path, text, words):
    conf = _config(tmp_path, text)
    rc, log = run(tmp_path, "--config", conf)
    assert rc == 2, log
    one_error_line(log, str(conf), *words)


def test_a_missing_config_file(tmp_path):
    rc, log = run(tmp_path, "--config", tmp_path / "nope.toml")
    assert rc == 2
    one_error_line(log, "no such file")


# -- LUNs -----------------------------------------------------------------------

def test_lun_files(tmp_path):
    a, b = tmp_path / "a.lun", tmp_path / "b.lun"
    for p, size in ((a, 1 << 30), (b, (1 << 30) + 100)):
        with open(p, "wb") as f:
            f.truncate(size)
    with start(tmp_path, "--lun", a, "--lun", b) as d:
        log = d.log()
        assert f": {a}\n" in log and f": {b}\n" in log, log
        assert f"LUN {b}: its last 100 bytes are not a whole 4096-byte block" in log
        assert f"LUN {a}: its last" not in log


@pytest.mark.parametrize("case, words", [
    ("missing", ["does not exist", "truncate -s"]),
    ("empty", ["is empty (0 bytes)"]),
    ("small", ["smaller than one 4096-byte block (1000 bytes)"]),
    ("twice", ["is the same file as"]),
    ("directory", ["neither a regular file nor a block device"]),
    ("size", ["--size is the size of the in-memory LUN"]),
])
def test_lun_errors_are_one_line_exit_2(tmp_path, case, words):
    lun = tmp_path / "x.lun"
    args = ["--lun", lun]
    if case == "empty":
        lun.touch()
    elif case == "small":
        lun.write_bytes(b"x" * 1000)
    elif case in ("twice", "size"):
        with open(lun, "wb") as f:
            f.truncate(1 << 28)
        args += ["--lun", tmp_path / "." / "x.lun"] if case == "twice" else ["--size", "1G"]
    elif case == "directory":
        lun.mkdir()
    rc, log = run(tmp_path, *args)
    assert rc == 2, log
    one_error_line(log, *words)
    assert not (tmp_path / "cxlflash.sock").exists()


# -- options --------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--mode", "999"], ["--mode", "not an octal mode"]),
    (["--mode", "01777"], ["--mode", "outside 0000..0777"]),
    (["--size", "12x"], ["--size", "not a size"]),
    (["--size", "1000"], ["--size", "multiple of 4096"]),
    (["--ports", "0"], ["--ports", "1..4"]),
    (["--group", "no-such-group-here"], ["--group", "no group named"]),
    (["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    (["--directory", "/nonexistent/dir"], ["--directory", "no such directory"]),
])
def test_bad_options_exit_2_with_one_line(tmp_path, args, words):
    r = subprocess.run(daemon_process.SERVE + ["--socket", str(tmp_path / "s.sock")] + args,
                       capture_output=True, text=True, env=daemon_process.environment(),
                       timeout=60)
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1, r.stderr
    # (argparse reports an unknown option as the top-level command's error)
    assert r.stderr.startswith(("cxlflash serve: error: ", "cxlflash: error: "))
    for w in words:
        assert w in r.stderr
    assert not (tmp_path / "s.sock").exists()


# -- --exit-with-parent ---------------------------------------------------------

def test_exit_with_parent(tmp_path):
    """The daemon's parent (not the test) is killed -9: the daemon gets
    SIGTERM and stops cleanly (its socket is removed)."""
    sock = str(tmp_path / "cxlflash.sock")
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import subprocess, sys, time
            p = subprocess.Popen(sys.argv[2:], stderr=open(sys.argv[1], "wb"))
            print(p.pid, flush=True)
            time.sleep(600)
        """), str(tmp_path / "serve.log")] + SERVE + ["--socket", sock, "--exit-with-parent", "--size", "256M"],
        stdout=subprocess.PIPE, text=True, env=daemon_process.environment())
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while not accepts(sock):
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.02)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{child}") and _state(child) != "Z":
        assert time.monotonic() < deadline, "the daemon outlived its parent"
        time.sleep(0.02)
    assert not os.path.exists(sock)             # it stopped cleanly, not killed


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# -- ctl ------------------------------------------------------------------------

SAMPLE = {
    "pid": 4242, "uid": 1000, "state": "NORMAL", "ports": 2,
    "luns": [{"wwid": "60050767810000011d0085ff81000001", "block_size": 4096,
              "max_lba": 1048575, "size": 4 << 30, "mode": "virtual", "ports": [0, 1],
              "users": 1, "chunks_total": 16, "chunks_free": 12, "path": None}],
    "contexts": [{"context_id": 7, "pid": 5151,
                  "luns": ["60050767810000011d0085ff81000001"], "handles": 2,
                  "chunks": 4, "in_error": False}],
    "counters": {"lw_syncs": 0, "hw_syncs": 0, "global_syncs": 0, "failed_syncs": 0,
                 "resets": 0, "afu_cmds": 3, "connections": 1, "connects": 5,
                 "reclaims": 1, "bad_messages": 0},
}


def test_ctl_tables():
    text = ctl.render(SAMPLE, "status")
    assert text.splitlines()[0] == ("daemon pid 4242, uid 1000, state NORMAL, 2 ports, "
                                    "1 LUNs, 1 contexts")
    luns = ctl.render(SAMPLE, "luns").splitlines()
    assert luns[0].split() == ["WWID", "SIZE", "MODE", "PORTS", "USERS", "FREE", "CHUNKS",
                               "BACKING"]
    assert luns[1].split() == ["60050767810000011d0085ff81000001", "4", "GiB", "virtual",
                               "0,1", "1", "12", "16", "memory"]
    ctxs = ctl.render(SAMPLE, "contexts").splitlines()
    assert ctxs[1].split() == ["0x0000000000000007", "5151", "60050767810000011d0085ff81000001", "2", "4",
                               "no"]
    assert "reclaims      1" in text
    assert ctl.render({**SAMPLE, "contexts": []}, "contexts") == "no contexts"


@pytest.mark.parametrize("what", ["status", "luns", "contexts"])
def test_ctl_json(what):
    got = json.loads(ctl.render(SAMPLE, what, as_json=True))
    assert got == (SAMPLE if what == "status" else SAMPLE[what])


def ctl_run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cxlflash", "ctl", *map(str, args)],
                          capture_output=True, text=True, timeout=60,
                          env=daemon_process.environment(env))


def _lun_file(path, size=1 << 30):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_ctl_status_json_names_the_lun_and_the_contexts(tmp_path):
    lun = _lun_file(tmp_path / "a.lun")
    with start(tmp_path, "--lun", lun) as d:
        wwid = d.log().split("LUN ", 1)[1].split(":", 1)[0]
        r = ctl_run("--socket", d.socket, "status", "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["pid"] == d.pid and st["uid"] == os.getuid()
        assert st["state"] == "NORMAL" and st["ports"] == 2
        [entry] = st["luns"]
        assert entry["wwid"] == wwid and entry["path"] == str(lun)
        assert entry["ports"] == [0, 1]
        assert st["contexts"] == []
        # A client holding a virtual LUN of 3 chunks shows up, then goes.
        import cxlflash
        with cxlflash.connect(d.socket) as a, \
                a.open_disk(bytes.fromhex(wwid)) as disk, \
                disk.attach(os.O_RDWR) as c, \
                c.create_virtual(size=3 * 65536):
            ctxs = json.loads(ctl_run("--socket", d.socket, "contexts", "--json").stdout)
            assert ctxs == [{"context_id": c.context_id, "pid": os.getpid(),
                             "luns": [wwid], "handles": 1, "chunks": 3, "in_error": False}]
            luns = json.loads(ctl_run("--socket", d.socket, "luns", "--json").stdout)
            assert luns[0]["size"] == 1 << 30 and luns[0]["mode"] == "virtual"
            assert luns[0]["chunks_total"] == 4 and luns[0]["chunks_free"] == 1
            text = ctl_run("--socket", d.socket, "contexts").stdout.splitlines()
            assert text[1].split() == [f"0x{c.context_id:016x}", str(os.getpid()), wwid,
                                       "1", "3", "no"]
        # The client closed everything: the daemon took it back.
        d.wait_log(f"pid {os.getpid()} disconnected")
        deadline = time.monotonic() + 10
        while json.loads(ctl_run("--socket", d.socket, "contexts", "--json").stdout):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        text = ctl_run("--socket", d.socket).stdout
        assert text.startswith(f"daemon pid {d.pid}, uid {os.getuid()}, state NORMAL")
        assert f"{wwid}  1 GiB" in text and str(lun) in text
    log = d.log()
    assert f"pid {os.getpid()} (uid {os.getuid()}) connected" in log


def test_serve_and_ctl_default_to_cxlflash_socket(tmp_path):
    path = str(tmp_path / "env.sock")
    env = {"CXLFLASH_SOCKET": path}
    with start(tmp_path, socket_path=False, env=env) as d:
        assert f"listening on {path} (mode 0660)" in d.log()
        r = ctl_run("status", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["pid"] == d.pid
    assert not os.path.exists(path)


def test_ctl_without_a_daemon_is_one_line_exit_1(tmp_path):
    r = ctl_run("--socket", tmp_path / "none.sock", "status")
    assert r.returncode == 1
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"cxlflash ctl: no cxlflash daemon at '{tmp_path}/none.sock'")
    assert "cxlflash serve --socket" in r.stderr


def test_a_stop_releases_every_context_and_a_restart_starts_afresh(tmp_path):
    """SIGTERM with a client holding a context: exit 0, the context released
    (logged), the client's next request is ENODEV; a new daemon on the same
    socket serves new clients and knows nothing of the old contexts --
    like reloading the kernel driver."""
    import errno
    import cxlflash
    d = start(tmp_path, "--size", "1G")
    a = d.connect()
    disk = a.open_disk(a.luns()[0])
    c = disk.attach(os.O_RDWR)
    v = c.create_virtual(size=2 * 65536)
    v.write(0, b"x" * 4096)
    d.stop()
    assert not os.path.exists(d.socket)
    assert f"releasing 1 context of pid {os.getpid()} (2 chunks)" in d.log()
    with pytest.raises(OSError) as e:
        a.luns()
    assert e.value.errno == errno.ENODEV and "is gone" in str(e.value)
    with start(tmp_path, "--size", "1G") as d2:
        with cxlflash.connect(d2.socket) as b:
            st = b.status()
            assert st["pid"] == d2.pid and st["contexts"] == []
            assert st["luns"][0]["chunks_free"] == st["luns"][0]["chunks_total"]
    for obj in (v, c, disk, a):
        obj.close()


def test_ctl_says_permission_denied_not_no_daemon(tmp_path):
    """A user the socket's mode refuses is told so (mode, owner, group),
    not told to start a daemon.  As root, the client runs as nobody
    (setpriv); otherwise as this user against a socket of mode 0000."""
    import shutil
    import tempfile
    if os.geteuid() == 0:
        where = tempfile.mkdtemp(prefix="cxl-perm-", dir="/tmp")   # nobody can search it
        os.chmod(where, 0o755)
        mode, wrap = "0660", ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    else:
        where, mode, wrap = str(tmp_path), "0000", []
    try:
        with start(where, "--mode", mode) as d:
            r = subprocess.run(wrap + [sys.executable, "-m", "cxlflash", "ctl", "--socket",
                                       d.socket],
                               capture_output=True, text=True, timeout=60,
                               env=daemon_process.environment())
            assert r.returncode == 1
            group = grp.getgrgid(os.getgid()).gr_name
            user = pwd.getpwuid(os.getuid()).pw_name
            assert r.stderr == (f"cxlflash ctl: permission denied on {d.socket} (mode {mode}, "
                                f"owner {user}, group {group}): a daemon may be running "
                                f"there; to use it, be in group {group} (or run as "
                                f"{user})\n"), r.stderr
    finally:
        if where != str(tmp_path):
            shutil.rmtree(where, ignore_errors=True)


def test_a_stop_signal_during_the_start_ends_it_before_ready(tmp_path):
    """SIGTERM while the daemon starts (here: held at the socket step by the
    test's lock on the socket's directory): no READY=1, exit 0, nothing left
    behind."""
    pid_file = tmp_path / "serve.pid"
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dirfd, fcntl.LOCK_EX)
        d = daemon_process.spawn(tmp_path, "--pid-file", pid_file)
        deadline = time.monotonic() + 30
        while not pid_file.exists():             # the pid file is locked: past the mask
            assert d.proc.poll() is None, d.log()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        assert not os.path.exists(d.socket)      # waiting for the directory lock
        d.send(signal.SIGTERM)
    finally:
        os.close(dirfd)                          # let it go on
    assert d.wait() == 0, d.log()
    assert d.notifier.receive(0.2) == "STOPPING=1"
    d.notifier.close()
    assert not os.path.exists(d.socket) and not pid_file.exists()
    log = d.log()
    assert "stopping (SIGTERM)" in log and "ready" not in log, log


def test_daemons_started_at_once_on_a_stale_socket_one_wins(tmp_path):
    path = str(tmp_path / "cxlflash.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                                    # stale
    ds = [daemon_process.spawn(tmp_path, "--size", "256M") for _ in range(6)]
    try:
        deadline = time.monotonic() + 60
        while sum(d.proc.poll() is not None for d in ds) < len(ds) - 1:
            assert time.monotonic() < deadline, [d.log() for d in ds]
            time.sleep(0.05)
        [winner] = [d for d in ds if d.proc.poll() is None]
        daemon_process.wait_ready(winner)
        for d in ds:
            if d is not winner:
                assert d.proc.returncode == 1, d.log()
                one_error_line(d.log(), f"a daemon already serves {path}")
        assert accepts(path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        for d in ds:
            if d.proc.poll() is None:
                d.stop()
            else:
                d.notifier.close()
    assert not os.path.exists(path)


def test_closed_standard_fds_are_not_reused(tmp_path):
    """Started with stdout and stderr closed: they are reopened on
    /dev/null, so neither the socket nor a LUN file nor a client connection
    gets fd 2 -- the log never lands in a LUN's data."""
    lun = _lun_file(tmp_path / "a.lun", 1 << 28)
    closing = ("import os, sys\nos.close(1)\nos.close(2)\n"
               "os.execv(sys.argv[1], sys.argv[1:])\n")
    d = daemon_process.spawn(tmp_path, "--lun", lun,
                             prefix=[sys.executable, "-c", closing])
    daemon_process.wait_ready(d)
    try:
        assert os.readlink(f"/proc/{d.pid}/fd/1") == os.devnull
        assert os.readlink(f"/proc/{d.pid}/fd/2") == os.devnull
        with d.connect() as a:
            assert len(a.luns()) == 1             # logged "connected" -- into /dev/null
        with open(lun, "rb") as f:
            assert f.read(1 << 20) == bytes(1 << 20)
    finally:
        d.stop()
