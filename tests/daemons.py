"""A fresh daemon for every test that runs against a connected adapter.

    d = daemons.start()              # a new daemon process, ready
    a = cxlflash.connect(d.socket)
    ...
    a.close()
    d.stop()                         # SIGTERM; asserts it exited 0

Each daemon is its own process serving its own fresh driver (an embedded
``cxlflash.Adapter()`` with no LUN -- what the ``embedded`` side of the
tests starts from) through ``cxlflash.server.service.Server`` on a Unix
socket: the same Server ``cxlflash serve`` runs, stopped the way it stops
one (SIGTERM: ``Server.shutdown()``, then the adapter's ``close()``, exit
0).

Starting a Python interpreter per test costs about 0.3 s of this machine's
two cores; the daemons are therefore forked by a *fork server*: one clean
helper process (``python daemons.py --fork-server FD``, started on first
use, one per test process) that has imported cxlflash and numpy but never
made an adapter or a thread, so a fork of it is a safe, fresh process.  It
forks a daemon per request, waits for it to listen, and is the one that
stops it and reads its exit status.  The fork server dies with the test
process (PR_SET_PDEATHSIG, and EOF on its control socket), and the daemons
die with the fork server.

A daemon's log (one line per connect, disconnect and reclaim) goes to a
file, quoted in the assertion when it does not exit 0.
"""
import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

PR_SET_PDEATHSIG = 1
_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE_ROOT = os.path.dirname(_HERE)


def _die_with_parent(signo):
    """PR_SET_PDEATHSIG: ``signo`` when the parent (thread) exits; then a
    check that the parent did not exit already."""
    ppid = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signo, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != ppid:
        os.kill(os.getpid(), signo)


class DaemonError(AssertionError):
    pass


class Daemon:
    """A running daemon: ``.socket``, ``.pid``, ``.log()``, ``.stop()``,
    ``.kill()``."""

    def __init__(self, server, pid, socket_path, log_path):
        self._server = server
        self.pid = pid
        self.socket = socket_path
        self.log_path = log_path
        self.status = None          # the exit status once stopped

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError as e:
            return f"(no log: {e})"

    def stop(self, signo=signal.SIGTERM, timeout=30):
        """Send ``signo`` (SIGTERM), wait; assert it exited 0."""
        if self.status is None:
            reply = self._server.request({"op": "stop", "pid": self.pid,
                                          "signal": int(signo), "timeout": timeout})
            self.status = reply["status"]
        if self.status != "exit 0":
            raise DaemonError(f"the daemon (pid {self.pid}) ended with {self.status} "
                              f"after {signal.Signals(signo).name}; its log:\n{self.log()}")

    def kill(self):
        """SIGKILL (no cleanup in the daemon)."""
        if self.status is None:
            reply = self._server.request({"op": "stop", "pid": self.pid,
                                          "signal": int(signal.SIGKILL), "timeout": 30})
            self.status = reply["status"]

    @contextlib.contextmanager
    def watchdog(self, timeout):
        """Kill the daemon if the block takes more than ``timeout`` s: a
        client blocked on it then gets ENODEV instead of hanging the run;
        leaving the block raises DaemonError saying so."""
        fired = threading.Event()

        def fire():
            fired.set()
            self.kill()

        t = threading.Timer(timeout, fire)
        t.daemon = True
        t.start()
        try:
            yield
        finally:
            t.cancel()
            t.join()
            if fired.is_set():
                raise DaemonError(f"the test hung: the watchdog killed the daemon (pid "
                                  f"{self.pid}) after {timeout} s; its log:\n{self.log()}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.kill()
        else:
            self.stop()


class ForkServer:
    """The test process's side of the fork server."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="cxlflash-daemons-")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [_PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        for k in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "CXLFLASH_SOCKET"):
            env.pop(k, None)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--fork-server",
             str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
            cwd=self.directory)
        theirs.close()
        self.sock = ours
        self.rfile = ours.makefile("rb")
        self.lock = threading.Lock()
        self.serial = 0
        hello = self._reply()
        if hello.get("op") != "ready":
            raise DaemonError(f"the fork server did not start: {hello}")

    def _reply(self):
        line = self.rfile.readline()
        if not line:
            rc = self.proc.wait(10)
            raise DaemonError(f"the fork server exited ({rc})")
        return json.loads(line)

    def request(self, msg):
        with self.lock:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
            reply = self._reply()
        if "error" in reply:
            raise DaemonError(reply["error"])
        return reply

    def start(self, adapter, driver):
        with self.lock:
            self.serial += 1
            n = self.serial
        path = os.path.join(self.directory, f"d{n}.sock")
        log = os.path.join(self.directory, f"d{n}.log")
        reply = self.request({"op": "spawn", "socket": path, "log": log,
                              "adapter": adapter, "driver": driver})
        return Daemon(self, reply["pid"], path, log)

    def close(self):
        try:
            self.sock.close()           # EOF: it kills its daemons and exits
            self.rfile.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


_server = None
_server_pid = None


def fork_server():
    """This process's fork server (started on first use)."""
    global _server, _server_pid
    if _server is None or _server_pid != os.getpid() or _server.proc.poll() is not None:
        _server = ForkServer()
        _server_pid = os.getpid()
    return _server


@atexit.register
def _close_fork_server():
    if _server is not None and _server_pid == os.getpid():
        _server.close()


#: The driver's tunables a test may set (``start(driver={...})``).
DRIVER_SETTINGS = ("recovery_retry_delay", "mailbox_retry_delay")


def apply_driver_settings(adapter, settings):
    """Set the driver's tunables of an embedded ``adapter``."""
    for name, value in settings.items():
        if name not in DRIVER_SETTINGS:
            raise ValueError(f"{name!r} is not one of the driver's tunables "
                             f"{DRIVER_SETTINGS}")
        setattr(adapter.driver, name, value)


def start(driver=None, **adapter_kw):
    """A new daemon process serving a fresh ``cxlflash.Adapter(**adapter_kw)``
    (no LUN) whose driver has the tunables ``driver`` ({name: value}),
    ready (its socket accepts)."""
    driver = dict(driver or {})
    for name in driver:
        if name not in DRIVER_SETTINGS:
            raise ValueError(f"{name!r} is not one of the driver's tunables "
                             f"{DRIVER_SETTINGS}")
    return fork_server().start(adapter=adapter_kw, driver=driver)


# -- the fork server's side -----------------------------------------------------------


def _daemon(req, ready_w):
    """The forked daemon: never returns."""
    status = 1
    try:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.dup2(fd, 1)
        os.close(fd)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        _die_with_parent(signal.SIGTERM)

        import cxlflash
        from cxlflash.server.service import Server

        adapter = cxlflash.Adapter(**req.get("adapter", {}))
        apply_driver_settings(adapter, req.get("driver", {}))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(req["socket"])
        sock.listen(64)
        server = Server(adapter, sock)
        signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
        signal.signal(signal.SIGINT, lambda *_: server.shutdown())
        os.write(ready_w, b"ready\n")
        os.close(ready_w)
        ready_w = -1
        server.serve_forever()
        adapter.close()
        sock.close()
        os.unlink(req["socket"])
        print("cxlflash serve: stopped", file=sys.stderr, flush=True)
        status = 0
    except BaseException:                       # noqa: BLE001 (the daemon's last word)
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        if ready_w >= 0:
            try:
                os.write(ready_w, b"failed\n")
            except OSError:
                pass
        os._exit(status)


def _wait_status(pid, timeout):
    """The exit status of ``pid`` as text, SIGKILL after ``timeout`` s."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return f"no exit within {timeout} s (killed)"
        time.sleep(0.002)
    if os.WIFEXITED(st):
        return f"exit {os.WEXITSTATUS(st)}"
    return f"signal {signal.Signals(os.WTERMSIG(st)).name}"


def _serve(ctl_fd):
    _die_with_parent(signal.SIGKILL)
    ctl = socket.socket(fileno=ctl_fd)
    # Everything a daemon needs, imported once here (no adapter, no thread).
    import numpy  # noqa: F401
    import cxlflash  # noqa: F401
    import cxlflash.server.service  # noqa: F401
    import cxlflash._core.engine  # noqa: F401
    rfile = ctl.makefile("rb")
    children = set()

    def send(msg):
        ctl.sendall(json.dumps(msg).encode() + b"\n")

    send({"op": "ready"})
    for line in rfile:
        req = json.loads(line)
        try:
            if req["op"] == "spawn":
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    ctl.close()
                    _daemon(req, w)
                os.close(w)
                with os.fdopen(r, "rb") as f:
                    word = f.readline().strip()
                if word != b"ready":
                    status = _wait_status(pid, 10)
                    with open(req["log"], errors="replace") as f:
                        log = f.read()
                    send({"error": f"the daemon did not start ({status}):\n{log}"})
                    continue
                children.add(pid)
                send({"pid": pid})
            elif req["op"] == "stop":
                pid = req["pid"]
                if pid not in children:
                    send({"error": f"pid {pid} is not a daemon of this fork server"})
                    continue
                os.kill(pid, req["signal"])
                status = _wait_status(pid, req["timeout"])
                children.discard(pid)
                send({"status": status})
            else:
                send({"error": f"unknown op {req['op']!r}"})
        except Exception as e:                  # noqa: BLE001
            send({"error": repr(e)})
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--fork-server":
        _serve(int(sys.argv[2]))
    else:
        sys.exit("usage: daemons.py --fork-server FD")
