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
        """Progress of a timed row: ``elapsed`` of ``total`` seconds at
        ``rate`` ``unit``/s."""
        frac = min(elapsed / total, 1.0) if total else 1.0
        self._draw(label, frac, f"{elapsed:5.1f}/{total:.1f}s {si(rate)}{unit}/s", force)

    def count(self, label, done, total, rate, force=False):
        """Progress of a fixed amount of work in bytes (the prefill):
        ``done`` of ``total`` bytes at ``rate`` bytes/s."""
        frac = min(done / total, 1.0) if total else 1.0
        self._draw(label, frac, f"{mib(done)}/{mib(total)} {si(rate)}B/s",
                   force or done >= total)

    def _draw(self, label, frac, tail, force):
        """The line, at most every 0.1 s unless ``force``."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        bar = "#" * int(frac * 20)
        line = f"\r{label:<24} [{bar:<20}] {tail}"
        self._width = max(self._width, len(line))
        self.stream.write(line.ljust(self._width))
        self.stream.flush()

    def clear(self):
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
