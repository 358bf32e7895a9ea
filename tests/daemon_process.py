"""Start ``cxlflash serve`` as a real process, for tests.

    with daemon_process.start(tmp_path, "--size", "1G") as d:
        adapter = cxlflash.connect(d.socket)
        ...
    # leaving the block: SIGTERM, wait, assert exit status 0

``start`` runs ``python -m cxlflash serve --socket DIR/cxlflash.sock
--exit-with-parent ARGS...`` with ``NOTIFY_SOCKET`` set to a datagram socket
of its own (in the abstract namespace) and returns once ``READY=1`` arrives
-- the daemon sends it only when its socket accepts -- or raises with the
daemon's log if it exits or does not get ready in time.  The daemon's
stderr goes to a file (``.log()`` reads it): a pipe nobody reads would stop
a daemon that logs a line per connection once the pipe is full.

``--exit-with-parent`` ties the daemon to the thread that started it (Linux
sends the signal when the parent *thread* exits): start daemons from the
test's own thread, not from a short-lived helper thread.
"""
import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import time

import cxlflash

# The checkout (or install) the tests import: the daemon runs the same code.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cxlflash.__file__)))
SERVE = [sys.executable, "-m", "cxlflash", "serve"]
_serial = itertools.count(1)


def environment(extra=None):
    """The environment of a daemon: this one, without systemd's variables
    (pytest itself may run under a unit), with PYTHONPATH naming the package
    the tests import."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
                        "CXLFLASH_SOCKET")}
    env["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra or {})
    return env


class NotifyListener:
    """A systemd-style notification socket: ``.address`` for NOTIFY_SOCKET
    (``@name``, abstract, unless ``path`` is given), ``.wait(pred)``."""

    def __init__(self, path=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"cxlflash-test-{os.getpid()}-{next(_serial)}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(path)
            self.address = path
        self.messages = []

    def receive(self, timeout):
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return None
        msg = self.sock.recv(4096).decode()
        self.messages.append(msg)
        return msg

    def close(self):
        self.sock.close()


class DaemonProcess:
    """A running ``cxlflash serve``: ``.socket`` (its path), ``.pid``,
    ``.proc`` (the Popen), ``.ready`` (the READY datagram), ``.log()``,
    ``.wait_log(text)``, ``.connect()`` (a client adapter), ``.stop()``,
    ``.kill()``."""

    def __init__(self, proc, socket_path, log_path, notifier):
        self.proc = proc
        self.pid = proc.pid
        self.socket = socket_path
        self.log_path = log_path
        self.notifier = notifier
        self.ready = None

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def connect(self, **kw):
        """A client adapter of this daemon (``cxlflash.connect``)."""
        return cxlflash.connect(self.socket, **kw)

    def wait_log(self, text, timeout=30):
        """Wait until the log holds ``text``; the log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the log of cxlflash serve "
                                     f"(pid {self.pid}, exit status {self.proc.poll()}):\n{log}")
            time.sleep(0.01)

    def send(self, signo):
        self.proc.send_signal(signo)

    def wait(self, timeout=30):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"cxlflash serve (pid {self.pid}) did not exit within "
                                 f"{timeout} s; its log:\n{self.log()}") from None

    def stop(self, signo=signal.SIGTERM, timeout=30):
        """Stop it with ``signo`` (SIGTERM) and assert it exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signo)
        rc = self.wait(timeout)
        self.notifier.close()
        assert rc == 0, f"cxlflash serve exited {rc} after {signo!r}; its log:\n{self.log()}"
        return rc

    def kill(self):
        """SIGKILL: no cleanup in the daemon (its socket file stays)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.notifier.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.kill()
        elif self.proc.poll() is None:
            self.stop()
        else:
            self.notifier.close()


def spawn(directory, *args, socket_path=None, env=None, exit_with_parent=True,
          command=None, notify_path=None, pass_fds=(), prefix=()):
    """Start the daemon without waiting: a DaemonProcess whose ``.ready``
    is None (see ``wait_ready``).  ``socket_path``: default
    DIR/cxlflash.sock, False for no --socket option; ``command``: the
    argv before the serve options (default ``python -m cxlflash serve``);
    ``prefix``: argv put before the command (e.g. a shell wrapper)."""
    directory = os.fspath(directory)
    if socket_path is None:
        socket_path = os.path.join(directory, "cxlflash.sock")
    n = next(_serial)
    log_path = os.path.join(directory, f"serve-{n}.log")
    notifier = NotifyListener(notify_path)
    argv = list(prefix) + list(command or SERVE)
    if socket_path:
        argv += ["--socket", os.fspath(socket_path)]
    if exit_with_parent:
        argv.append("--exit-with-parent")
    argv += [os.fspath(a) for a in args]
    e = environment(env)
    e["NOTIFY_SOCKET"] = notifier.address
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=e, pass_fds=pass_fds, close_fds=True)
    return DaemonProcess(proc, os.fspath(socket_path) if socket_path else None,
                         log_path, notifier)


def wait_ready(d, timeout=30):
    """Wait for READY=1 from ``d``; on success ``d.ready`` is the datagram."""
    deadline = time.monotonic() + timeout
    while True:
        msg = d.notifier.receive(min(0.05, deadline - time.monotonic()))
        if msg is not None and "READY=1" in msg.split("\n"):
            d.ready = msg
            return d
        if msg is None and d.proc.poll() is not None:
            # One last look: READY may have been sent just before it exited.
            msg = d.notifier.receive(0)
            if msg is not None:
                continue
            d.notifier.close()
            raise AssertionError(f"cxlflash serve exited {d.proc.returncode} before it "
                                 f"was ready; its log:\n{d.log()}")
        if time.monotonic() > deadline:
            d.kill()
            raise AssertionError(f"cxlflash serve was not ready within {timeout} s; its "
                                 f"log:\n{d.log()}")


def start(directory, *args, timeout=30, **kw):
    """Start ``cxlflash serve`` and wait until it is ready (see ``spawn``
    for the keywords).  Use as a context manager, or call ``.stop()``."""
    return wait_ready(spawn(directory, *args, **kw), timeout)


def run(directory, *args, timeout=30, **kw):
    """Run a daemon that is expected to exit by itself (a start that fails):
    (exit status, its log)."""
    d = spawn(directory, *args, **kw)
    rc = d.wait(timeout)
    d.notifier.close()
    return rc, d.log()
