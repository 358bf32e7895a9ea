"""What a run measures: a latency histogram, the two sides of a row (the
workload and its baseline), the row, and the run's log (notes, the time
spent outside the rows, the rows measured so far)."""
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import numpy as np
else:
    from .._core._lazy import numpy as np        # `cxlflash info` does not need it

HIST_STEPS = 32             # latency histogram bins per power of two


class Histogram:
    """Log-scale latency histogram (about 2 % resolution), mergeable."""

    def __init__(self):
        self.counts = np.zeros(64 * HIST_STEPS, dtype=np.int64)

    def add(self, lat_ns):
        lat = np.maximum(np.asarray(lat_ns, dtype=np.float64), 1.0)
        idx = np.minimum((np.log2(lat) * HIST_STEPS).astype(np.int64), len(self.counts) - 1)
        self.counts += np.bincount(idx, minlength=len(self.counts))

    def merge(self, other):
        self.counts += other.counts

    @property
    def total(self):
        return int(self.counts.sum())

    def percentile(self, p):
        """Latency in ns at percentile ``p`` (bin midpoint)."""
        total = self.total
        if total == 0:
            return float("nan")
        rank = math.ceil(total * p / 100.0)
        i = int(np.searchsorted(np.cumsum(self.counts), rank))
        return 2 ** ((i + 0.5) / HIST_STEPS)

    def nonzero(self):
        idx = np.flatnonzero(self.counts)
        return [(float(2 ** ((i + 0.5) / HIST_STEPS)), int(self.counts[i])) for i in idx]


@dataclass
class Side:
    """One side of a row (the workload or its baseline)."""
    ops: int = 0
    seconds: float = 0.0
    nbytes: int = 0
    errors: int = 0
    hist: Histogram = field(default_factory=Histogram)
    timeline: list = field(default_factory=list)   # (elapsed s, ops/s) per interval
    ratios: list = field(default_factory=list)     # workload / baseline per interval

    @property
    def rate(self):
        return self.ops / self.seconds if self.seconds else 0.0

    def spread(self):
        """(p10, p90) of the rate over the measured intervals (per call for
        the core rows, per INTERVAL for I/O), or None with fewer than 3."""
        return p10_p90([v for _, v in self.timeline])


def p10_p90(values):
    if len(values) < 3:
        return None
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]
    return pick(0.1), pick(0.9)


@dataclass
class Row:
    name: str
    unit: str                 # what an op is: "IO", "LBA", "chunk"
    main: Side
    base: Optional[Side] = None
    base_name: str = ""
    verified: str = ""        # "", "ok (N blocks)" or "FAILED: ..."
    failed: bool = False
    lat_per: str = "request"  # what one latency sample is: a request, or a call of N ops
    fio: Optional[dict] = None  # io rows: fio's figure for the same requests

    @property
    def ratio(self):
        if self.base is None or not self.base.rate:
            return None
        return self.main.rate / self.base.rate

    def ratio_spread(self):
        """(p10, p90) of the workload/baseline ratio over the intervals in
        which both sides ran interleaved, or None."""
        return p10_p90(self.main.ratios) if self.base is not None else None

    def as_dict(self):
        def pct(s, p):
            v = s.hist.percentile(p)
            return None if v != v else v        # no samples: null, not NaN (not JSON)

        def side(s):
            if s is None:
                return None
            sp = s.spread()
            return {"ops": s.ops, "seconds": s.seconds, "ops_per_s": s.rate,
                    "ops_per_s_p10_p90": list(sp) if sp else None,
                    "bytes_per_s": s.nbytes / s.seconds if s.seconds else 0.0,
                    "errors": s.errors,
                    "latency_ns": {"p50": pct(s, 50), "p99": pct(s, 99),
                                   "p99.9": pct(s, 99.9)},
                    "histogram": s.hist.nonzero(), "timeline": s.timeline}
        rs = self.ratio_spread()
        return {"name": self.name, "unit": self.unit, "latency_per": self.lat_per,
                "workload": side(self.main),
                "baseline_name": self.base_name, "baseline": side(self.base),
                "ratio": self.ratio, "ratio_p10_p90": list(rs) if rs else None,
                "fio": self.fio,
                "verified": self.verified, "failed": self.failed}


class RunLog:
    """What a run says besides its rows: what it does to the target (said
    as it happens, on ``out``), the time spent outside the measured rows
    (prefill, warm-up), and the rows measured so far -- kept even when a
    later row fails or the run is interrupted."""

    def __init__(self, out=None):
        self.out = out
        self.notes = []
        self.phases = {}            # "prefill", "warm-up" -> seconds of wall time
        self.rows = []

    def say(self, message):
        self.notes.append(message)
        if self.out is not None:
            print(message, file=self.out, flush=True)

    def spent(self, phase, seconds):
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds
