"""``cxlflash nbd`` started as a user starts it, for the NBD tests.

    with NbdProcess(tmp_path, exports=["disk=64M"]) as s:
        s.uri("disk")            # nbd+unix:///disk?socket=...
        ...
    # leaving the block: SIGTERM, and an assertion that it exited 0

The process runs ``python -m cxlflash nbd --unix PATH ... --pid-file F
--exit-with-parent``; it is ready when the pid file holds its pid (written
only once the socket accepts).  Its log (stderr) goes to a file, quoted
in every assertion about it.
"""
import os
import signal
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE_ROOT = os.path.dirname(_HERE)


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = _PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class NbdProcess:
    """A running ``cxlflash nbd``: ``.socket``, ``.pid``, ``.uri(name)``,
    ``.log()``, ``.stop()``, ``.kill()``."""

    def __init__(self, directory, exports, target=None, tcp=None, extra=(),
                 timeout=30):
        directory = str(directory)
        self.socket = os.path.join(directory, "nbd.sock")
        self.pid_file = os.path.join(directory, "nbd.pid")
        self.log_path = os.path.join(directory, "nbd.log")
        self.tcp = tcp
        args = [sys.executable, "-m", "cxlflash", "nbd", "--unix", self.socket,
                "--pid-file", self.pid_file, "--exit-with-parent"]
        if tcp is not None:
            args += ["--tcp", tcp]
        for e in exports:
            args += ["--export", e]
        if target is not None:
            args += ["--target", str(target)]
        args += list(extra)
        self.args = args
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log,
                                     env=subprocess_env(), cwd=directory)
        self.pid = self.proc.pid
        self.status = None
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.pid_file) as f:
                    if f.read().strip() == str(self.pid):
                        break
            except OSError:
                pass
            if self.proc.poll() is not None:
                self._log.close()
                raise AssertionError(f"cxlflash nbd exited {self.proc.returncode} before "
                                     f"it was ready:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"cxlflash nbd not ready in {timeout} s:\n{self.log()}")
            time.sleep(0.02)

    def uri(self, name=""):
        return f"nbd+unix:///{name}?socket={self.socket}"

    def tcp_uri(self, name=""):
        return f"nbd://{self.tcp}/{name}"

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError as e:
            return f"(no log: {e})"

    def stop(self, timeout=30):
        """SIGTERM; asserts a clean exit (status 0)."""
        if self.status is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.status = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.status = self.proc.wait()
                raise AssertionError(f"cxlflash nbd did not stop on SIGTERM in "
                                     f"{timeout} s:\n{self.log()}") from None
            finally:
                self._log.close()
        assert self.status == 0, f"cxlflash nbd exited {self.status}:\n{self.log()}"

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.status = self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.stop()
        elif self.status is None:
            self.kill()
