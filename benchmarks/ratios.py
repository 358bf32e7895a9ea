#!/usr/bin/env python3
"""Run the benchmarks and print each measured ratio against its target.

    python3 benchmarks/ratios.py [--stat min|median] [--show] [pytest args...]

Runs ``pytest benchmarks --benchmark-json=<tmp>`` from the repository root
(extra arguments are passed to pytest), then compares each benchmark with
its baseline.  Ratios use the **min** time of each benchmark by default
(the least disturbed round on a shared, noisy machine); ``--stat median``
uses the median.  ``--show`` also prints pytest's own tables.  The exit
status is 1 when a target is missed or a benchmark did not run.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (label, benchmark, baseline, kind, target)
#   kind "speedup":   baseline time / benchmark time >= target
#   kind "fraction":  baseline time / benchmark time >= target
#                     (the benchmark's throughput as a fraction of the baseline's)
#   kind "slowdown":  benchmark time / baseline time <= target
TARGETS = [
    ("translate_many 16M int64 vs numpy formula",
     "test_translate_many_core", "test_translate_many_numpy", "speedup", 6.0),
    ("translate_many 16M int64 vs np.copyto 16M uint64 (throughput)",
     "test_translate_many_core", "test_translate_many_copyto", "fraction", 0.5),
    ("translate() one LBA vs no-op Python call",
     "test_translate_one_core", "test_translate_one_noop", "slowdown", 2.0),
    ("alloc_many(1M) on 4M chunks vs pure-Python kernel loop (full 1M, unscaled)",
     "test_alloc_many_core", "test_alloc_many_python", "speedup", 100.0),
    ("clone_from(src, 3, allocator) 1M chunks vs np.copyto 1M uint64 (throughput)",
     "test_clone_core", "test_clone_copyto", "fraction", 0.25),
]


def main(argv):
    stat, show, extra = "min", False, []
    it = iter(argv)
    for arg in it:
        if arg == "--stat":
            stat = next(it)
        elif arg.startswith("--stat="):
            stat = arg.split("=", 1)[1]
        elif arg == "--show":
            show = True
        else:
            extra.append(arg)
    if stat not in ("min", "median"):
        sys.exit("--stat must be min or median")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", os.path.join(HERE),
               f"--benchmark-json={path}", "-q", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=not show, text=True)
        if proc.returncode != 0:
            if not show:
                sys.stdout.write(proc.stdout)
                sys.stderr.write(proc.stderr)
            sys.exit(f"pytest failed (exit {proc.returncode}): {' '.join(cmd)}")
        with open(path) as f:
            data = json.load(f)

    times = {b["name"]: b["stats"][stat] for b in data["benchmarks"]}
    print(f"ratios from the {stat} time of each benchmark "
          f"({data['machine_info'].get('cpu', {}).get('brand_raw', '?')})")
    failed = False
    for label, bench, base, kind, target in TARGETS:
        if bench not in times or base not in times:
            print(f"  MISSING  {label}: {bench} or {base} did not run")
            failed = True
            continue
        t, tb = times[bench], times[base]
        if kind == "slowdown":
            ratio = t / tb
            ok = ratio <= target
            want = f"<= {target:g}x the baseline's time"
            shown = f"{ratio:.2f}x the time"
        elif kind == "speedup":
            ratio = tb / t
            ok = ratio >= target
            want = f">= {target:g}x faster"
            shown = f"{ratio:.1f}x faster"
        else:
            ratio = tb / t
            ok = ratio >= target
            want = f">= {target:g} of the baseline's throughput"
            shown = f"{ratio:.3f} of the throughput"
        failed |= not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {label}: {shown} "
              f"({_fmt(t)} vs {_fmt(tb)}); target {want}")
    return 1 if failed else 0


def _fmt(seconds):
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
