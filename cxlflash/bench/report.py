"""The run's output: the table, the line of time outside the rows, the
JSON document."""
import json
import time
from dataclasses import asdict

from .machine import machine_info
from .units import si, us


UNITS = {"IO": "req", "LBA": "LBA", "chunk": "chunk", "resize": "resize"}

COLUMNS = """\
The columns of the table:
  rate        the workload's operations per second -- req (requests of the
              row's size), LBA (logical blocks translated), chunk (chunks
              allocated+freed or cloned), resize (vLUN resizes) -- and its
              spread: +-half the range between the 10th and 90th percentile
              of the rate over the measured intervals (each 0.1 s of an I/O
              row, each call of a core row), as a % of the figure
  MB/s        bytes moved per second (translate: 16 bytes per LBA in and out)
  lat per     what one latency sample is: one request (I/O rows) or one call
              of the batch named (core rows: per batch, not per item)
  p50/p99/p99.9 us   latency percentiles of those samples, in microseconds
  baseline    the same work done the plain way in the same run, with its
              spread: the same requests at the same physical offsets on the
              bare backing store, through the same engine at the same queue
              depth ("raw store, qd N"), interleaved batch by batch (I/O);
              the numpy formula (translate); the kernel's allocation loop in
              Python (alloc); np.copyto of the LXT (clone)
  ratio       rate / baseline rate: above 1.00x the workload is faster than
              its baseline, below it slower (I/O rows: 1.00x means the
              translation costs nothing); in brackets the 10th-90th
              percentile of the ratio over the intervals both sides ran
  errors      requests that failed (any makes the exit status 1)
  verified    write rows: every written block re-read and its pattern
              checked after the row ("ok (N blocks)" or FAILED)"""


def _rate(rate, unit, spread):
    text = f"{si(rate).strip()} {UNITS.get(unit, unit)}/s"
    if spread and rate:
        text += f" \u00b1{(spread[1] - spread[0]) / 2 / rate * 100:.0f}%"
    return text


def format_table(rows):
    head = ("workload", "rate \u00b1spread", "MB/s", "lat per", "p50 us", "p99 us",
            "p99.9 us", "baseline \u00b1spread", "ratio (p10-p90)", "errors", "verified")
    lines = []
    for r in rows:
        m = r.main
        mb = f"{m.nbytes / m.seconds / 1e6:.1f}" if m.nbytes and m.seconds else "-"
        ratio = "-"
        if r.ratio is not None:
            rs = r.ratio_spread()
            ratio = f"{r.ratio:.2f}x" + (f" ({rs[0]:.2f}-{rs[1]:.2f})" if rs else "")
        lines.append((r.name, _rate(m.rate, r.unit, m.spread()), mb, r.lat_per,
                      us(m.hist.percentile(50)), us(m.hist.percentile(99)),
                      us(m.hist.percentile(99.9)),
                      (_rate(r.base.rate, r.unit, r.base.spread()) + f" ({r.base_name})")
                      if r.base else "-", ratio, str(m.errors), r.verified or "-"))
    widths = [max(len(head[i]), *(len(l[i]) for l in lines)) if lines else len(head[i])
              for i in range(len(head))]
    left = (0, 3, 7, 10)
    fmt = lambda cols: "  ".join(c.ljust(w) if i in left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cols, widths))).rstrip()
    out = [fmt(head), "  ".join("-" * w for w in widths)]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def format_phases(log, opts):
    """One line: the wall time outside the measured rows."""
    parts = [f"measured {opts.duration:g} s per row"]
    for name in ("prefill", "warm-up", "verify", "fio"):
        if name in log.phases:
            parts.append(f"{name} {log.phases[name]:.2f} s")
    return "time: " + ", ".join(parts) + " (not in the figures)"


def to_json(rows, opts, path, log=None, incomplete=None, extra=None):
    """``extra``: more keys of the document (--clients: each client's own)."""
    doc = {"machine": machine_info(), "options": asdict(opts),
           "rows": [r.as_dict() for r in rows],
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if log is not None:
        doc["notes"] = log.notes
        doc["phases_s"] = log.phases
    if incomplete:
        doc["incomplete"] = incomplete
    if extra:
        doc.update(extra)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)
