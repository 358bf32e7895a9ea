#!/usr/bin/env python3
"""Start-up cost of the package, measured side by side with a bare interpreter.

    python3 benchmarks/startup.py [--rounds N] [--target X]

Each round starts, in a rotating order, a fresh interpreter for each of:

  bare      python -c pass
  import    python -c 'import cxlflash'
  first io  import, Adapter(), a memory LUN, a context, a vLUN, one 4 KiB write
  numpy     python -c 'import numpy'      (for reference)

and prints the median wall time of each and the median of the per-round
ratios to the bare interpreter.  The target (issue 13): ``import cxlflash``
takes at most 2x a bare ``python -c pass``; the exit status is 1 when the
median ratio is above ``--target`` (default 2.0).  Not a pytest test: a
timing on a shared machine is a figure to read, not a pass/fail test.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIRST_IO = """
import os, cxlflash
with cxlflash.Adapter() as a, a.open_disk(a.create_lun(size=1 << 30)) as disk, \\
        disk.attach(os.O_RDWR) as ctx, ctx.create_virtual(size=16) as vlun:
    vlun.write(0, bytes(4096))
"""

CASES = [("bare", "pass"), ("import", "import cxlflash"), ("first io", FIRST_IO),
         ("numpy", "import numpy")]


def once(code, env):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--target", type=float, default=2.0,
                   help="largest accepted median ratio import / bare (default 2.0)")
    args = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for _, code in CASES:                       # warm the page cache and .pyc files
        once(code, env)
    times = {name: [] for name, _ in CASES}
    for r in range(args.rounds):
        order = CASES[r % len(CASES):] + CASES[:r % len(CASES)]
        for name, code in order:
            times[name].append(once(code, env))
    bare = times["bare"]
    print(f"{sys.executable} ({sys.version.split()[0]}), {args.rounds} rounds, "
          "sides rotated each round")
    print(f"{'':10} {'median ms':>10} {'min ms':>8} {'x bare (median of rounds)':>26}")
    for name, _ in CASES:
        t = times[name]
        ratio = statistics.median(a / b for a, b in zip(t, bare))
        print(f"{name:10} {statistics.median(t) * 1e3:10.1f} {min(t) * 1e3:8.1f} {ratio:26.2f}")
    ratio = statistics.median(a / b for a, b in zip(times["import"], bare))
    ok = ratio <= args.target
    print(f"import cxlflash / bare python: {ratio:.2f}x (target <= {args.target:g}x): "
          f"{'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
