"""The live status line of a run."""
import sys
import time

from .units import mib, si


class Progress:
    """A live status line on stderr: off with --quiet or when stderr is not
    a terminal."""

    def __init__(self, enabled=None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = self.stream.isatty()
        self.enabled = enabled
        self._last = 0.0
        self._width = 0

    def update(self, label, elapsed, total, rate, unit="ops", force=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = min(elapsed / total, 1.0) if total else 1.0
        bar = "#" * int(frac * 20)
        line = (f"\r{label:<24} [{bar:<20}] {elapsed:5.1f}/{total:.1f}s "
                f"{si(rate)}{unit}/s")
        self._width = max(self._width, len(line))
        self.stream.write(line.ljust(self._width))
        self.stream.flush()

    def count(self, label, done, total, rate, force=False):
        """Progress of a fixed amount of work in bytes (the prefill):
        ``done`` of ``total`` bytes at ``rate`` bytes/s."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = min(done / total, 1.0) if total else 1.0
        bar = "#" * int(frac * 20)
        line = (f"\r{label:<24} [{bar:<20}] {mib(done)}/{mib(total)} "
                f"{si(rate)}B/s")
        self._width = max(self._width, len(line))
        self.stream.write(line.ljust(self._width))
        self.stream.flush()

    def clear(self):
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
