#!/usr/bin/env python3
"""Run the benchmarks and print each measured ratio against its target.

    python3 benchmarks/ratios.py [--stat min|median] [--show] [pytest args...]

Runs ``pytest benchmarks --benchmark-json=<tmp>`` from the repository root
(extra arguments are passed to pytest), then compares each benchmark with
its baseline.  Ratios use the **min** time of each benchmark by default
(the least disturbed round on a shared, noisy machine); ``--stat median``
uses the median.  Issue 8's targets (a C pread/pwrite loop, adapter.translate,
the VLUN_CLONE ioctl) come from tests that interleave their sides round by
round: their ratio is always the median of the per-round ratios.
``--show`` also prints pytest's own tables.  The exit status is 1 when a
target is missed or a benchmark did not run.
"""
import json
import os
import statistics
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
    # The data path (bench_datapath.py): a page-cached file, same offsets.
    ("datapath 4K random reads, 2 threads vs 1 thread (same total)",
     "test_datapath_threads_2", "test_datapath_threads_1", "speedup", 1.6),
]

# Sides of one test timed round by round, interleaved
# (conftest.run_interleaved); the ratio is the median of the per-round
# ratios, whatever --stat says.
# (label, test, side, baseline side, kind, target)
INTERLEAVED = [
    ("adapter.readinto 4K random, one thread vs C pread loop (same offsets)",
     "test_datapath_randread", "adapter", "c", "slowdown", 1.15),
    ("adapter.write 4K random vs C pwrite loop",
     "test_datapath_randwrite", "adapter", "c", "slowdown", 1.15),
    ("VirtualLun.readinto 4K random vs C pread loop",
     "test_datapath_randread", "vlun", "c", "slowdown", 1.10),
    ("VirtualLun.write 4K random vs C pwrite loop",
     "test_datapath_randwrite", "vlun", "c", "slowdown", 1.10),
    ("adapter.translate 16M random int64 vLBAs, no out= vs numpy formula (no out=)",
     "test_adapter_translate", "adapter", "numpy", "speedup", 6.0),
    ("VLUN_CLONE ioctl, 1M mapped chunks vs np.copyto of the LXT (throughput)",
     "test_vlun_clone_1m", "clone", "copyto", "fraction", 0.25),
    # Older targets, interleaved the same way.
    ("datapath 1M sequential reads across chunk boundaries: readinto vs os.preadv",
     "test_datapath_seqread", "vlun", "preadv", "fraction", 0.95),
    ("datapath listio 64x4K random reads per call vs raw_io (Cython pread loop)",
     "test_datapath_listio", "vlun", "raw", "fraction", 0.9),
]
# No target: other sides of the same interleaved rounds.
INTERLEAVED_INFO = [
    ("os.preadv loop vs C pread loop",
     "test_datapath_randread", "preadv", "c", "slowdown"),
    ("os.pwrite loop vs C pwrite loop",
     "test_datapath_randwrite", "pwrite", "c", "slowdown"),
    ("VirtualLun.readinto vs os.preadv loop (throughput; was a target, >= 0.85)",
     "test_datapath_randread", "vlun", "preadv", "fraction"),
    ("VirtualLun.write vs os.pwrite loop (throughput; was a target, >= 0.85)",
     "test_datapath_randwrite", "vlun", "pwrite", "fraction"),
    ("adapter.readinto vs VirtualLun.readinto",
     "test_datapath_randread", "adapter", "vlun", "slowdown"),
    ("adapter.write vs VirtualLun.write",
     "test_datapath_randwrite", "adapter", "vlun", "slowdown"),
    ("adapter.translate, no out= vs core translate_many into out=",
     "test_adapter_translate", "adapter", "core_out", "slowdown"),
    ("adapter.translate, no out= vs numpy formula with out= (np.bitwise_or(..., out=))",
     "test_adapter_translate", "adapter", "numpy_out", "speedup"),
    ("numpy formula with out= vs without (the baseline)",
     "test_adapter_translate", "numpy_out", "numpy", "slowdown"),
]

# No target, for comparison with the 2-thread row above: the same reads as
# list I/O batches (each call ~60 us without the GIL), and plain os.preadv
# (what CPython itself gets from 2 threads for ~1 us reads).
CORE_INFO = [
    ("core clone_from(src, 3, allocator) 1M chunks vs np.copyto (throughput; "
     "not what VLUN_CLONE runs)", "test_clone_core", "test_clone_copyto"),
]

SCALING_INFO = [
    ("listio x64 4K random reads, 2 threads vs 1 thread",
     "test_datapath_threads_listio_2", "test_datapath_threads_listio_1"),
    ("os.preadv 4K random reads, 2 threads vs 1 thread",
     "test_preadv_threads_2", "test_preadv_threads_1"),
]

# The driver (bench_driver.py).  Calls per second of each ioctl on a warm
# adapter (no target; a pair of ioctls counts as one call):
IOCTLS = [
    ("ATTACH + DETACH (+ close of adap_fd)", "test_ioctl_attach_detach"),
    ("USER_DIRECT + RELEASE", "test_ioctl_user_direct_release"),
    ("USER_VIRTUAL (size 0) + RELEASE", "test_ioctl_user_virtual_release"),
    ("VLUN_RESIZE +1 chunk, then -1 chunk", "test_ioctl_resize_grow_shrink"),
    ("VERIFY (no sense)", "test_ioctl_verify"),
    ("RECOVER_AFU (healthy context)", "test_ioctl_recover_afu_healthy"),
    ("MANAGE_LUN (enable superpipe, idempotent)", "test_ioctl_manage_lun"),
    ("VLUN_CLONE (1 handle, 2 chunks) + RELEASE", "test_ioctl_clone_release"),
    ("HT LUN_PROVISION (query port)", "test_ioctl_lun_provision_query"),
    ("HT AFU_DEBUG (counters, 48 bytes)", "test_ioctl_afu_debug"),
]
# VLUN_RESIZE growing a fresh vLUN from 0 to n chunks: the cost per chunk must
# not depend on n (max/min over the sizes <= target: no quadratic path).  The
# cost per chunk is the marginal one, (t(n) - t(1 chunk)) / (n - 1), so the
# fixed cost of one ioctl (~10 us, 10 ns per chunk at 1k) does not count;
# the plain t(n)/n is printed too.
RESIZE_ONE = "test_resize_grow[1]"
RESIZE_SIZES = [("1k", 1_000), ("100k", 100_000), ("1M", 1_000_000)]
RESIZE_TARGET = 2.0


def driver_report(times):
    """Print the driver's figures; return True when something failed."""
    failed = False
    print("driver ioctls on a warm adapter (calls/s; a pair counts as one call)")
    for label, name in IOCTLS:
        if name not in times:
            print(f"  MISSING  {label}: {name} did not run")
            failed = True
            continue
        t = times[name]
        print(f"  {label:<44} {1 / t:>10,.0f}/s  ({_fmt(t)})")
    print("VLUN_RESIZE growing a fresh vLUN by n chunks (cost per chunk)")
    names = [RESIZE_ONE] + [f"test_resize_grow[{k}]" for k, _ in RESIZE_SIZES]
    missing = [n for n in names if n not in times]
    if missing:
        print(f"  MISSING  {', '.join(missing)} did not run")
        return True
    t1 = times[RESIZE_ONE]
    print(f"  1 chunk: {_fmt(t1)} per ioctl (the fixed cost)")
    raw, marginal = [], []
    for key, n in RESIZE_SIZES:
        t = times[f"test_resize_grow[{key}]"]
        raw.append(t / n)
        marginal.append(max(t - t1, 0.0) / (n - 1))
        print(f"  {key + ' chunks:':<13} {_fmt(t)} per ioctl; {_fmt(t / n)}/chunk (t/n), "
              f"{_fmt(marginal[-1])}/chunk marginal")
    print(f"  info  t/n per chunk, max/min over {'/'.join(k for k, _ in RESIZE_SIZES)}: "
          f"{max(raw) / min(raw):.2f}x")
    ratio = max(marginal) / min(marginal) if min(marginal) > 0 else float("inf")
    ok = ratio <= RESIZE_TARGET
    print(f"  {'PASS' if ok else 'FAIL'}  marginal cost per chunk "
          f"((t(n) - t(1)) / (n - 1)), max/min over "
          f"{'/'.join(k for k, _ in RESIZE_SIZES)}: {ratio:.2f}x; target <= "
          f"{RESIZE_TARGET:g}x (no quadratic path)")
    return failed or not ok


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
    rounds = {b["name"]: b["extra_info"] for b in data["benchmarks"]
              if "rounds_ns" in b.get("extra_info", {})}
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
    for label, bench, base in CORE_INFO:
        if bench in times and base in times:
            print(f"  info  {label}: {times[base] / times[bench]:.3f} "
                  f"({_fmt(times[bench])} vs {_fmt(times[base])})")
    for label, bench, base in SCALING_INFO:
        if bench in times and base in times:
            print(f"  info  {label}: {times[base] / times[bench]:.2f}x "
                  f"({_fmt(times[bench])} vs {_fmt(times[base])})")
    failed |= interleaved_report(rounds)
    failed |= driver_report(times)
    return 1 if failed else 0


def _paired(extra, side, base):
    """Median per-round ratio side/base, median time of each side, and the
    median per-round difference per op (seconds)."""
    a, b = extra["rounds_ns"][side], extra["rounds_ns"][base]
    ops = extra.get("ops_per_round", 1)
    ratio = statistics.median(x / y for x, y in zip(a, b))
    diff = statistics.median(x - y for x, y in zip(a, b)) / ops
    return ratio, statistics.median(a) / 1e9, statistics.median(b) / 1e9, diff / 1e9, ops, len(a)


def interleaved_report(rounds):
    """Print issue 8's targets (interleaved sides, median of the per-round
    ratios); return True when something failed."""
    failed = False
    print("interleaved sides (issue 8's targets first): median of the per-round ratios")
    for label, test, side, base, kind, *target in INTERLEAVED + INTERLEAVED_INFO:
        extra = rounds.get(test)
        got = extra["rounds_ns"] if extra is not None else {}
        if not got.get(side) or not got.get(base):
            if target:
                print(f"  MISSING  {label}: {test} did not run")
                failed = True
            continue
        r, ta, tb, diff, ops, n = _paired(extra, side, base)
        per = f"; {_fmt(ta / ops)} vs {_fmt(tb / ops)} per op" if ops > 1 else ""
        if kind == "slowdown":
            shown = f"{r:.3f}x the time ({'+' if diff >= 0 else '-'}{_fmt(abs(diff))}/op)"
            ok = target and r <= target[0]
            want = target and f"<= {target[0]:g}x the baseline's time"
        elif kind == "speedup":
            r = 1 / r
            shown = f"{r:.2f}x faster"
            ok = target and r >= target[0]
            want = target and f">= {target[0]:g}x faster"
        else:
            r = 1 / r
            shown = f"{r:.3f} of the throughput"
            ok = target and r >= target[0]
            want = target and f">= {target[0]:g} of the baseline's throughput"
        tag = ("PASS" if ok else "FAIL") if target else "info"
        tail = f"; target {want}" if target else ""
        print(f"  {tag}  {label}: {shown} (medians {_fmt(ta)} vs {_fmt(tb)} per round"
              f"{per}; {n} rounds){tail}")
        if target:
            failed |= not ok
    return failed


def _fmt(seconds):
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-12:.3g} ps"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
