"""What the ratio scripts that drive fio (nbd_ratios.py, rbd_ratios.py)
share: tool versions, a process's CPU ticks, medians of their per-round
results, and the table of rows they print."""
import statistics
import subprocess


def tool_version(cmd):
    """The first line ``cmd`` prints, or None."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def cpu_ticks(pid):
    """user + sys clock ticks of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])        # fields 14 and 15 of the line


def median_of(results, side, workload, key):
    """The median of ``key`` over the runs of ``side`` on ``workload``
    (``results[(side, workload)]``: a list of dicts), or None."""
    xs = [r[key] for r in results.get((side, workload), [])]
    return statistics.median(xs) if xs else None


def fmt(x, unit):
    if unit == "IOPS":
        return f"{x / 1000:.2f} k"
    if unit == "MiB/s":
        return f"{x:.0f} MiB/s"
    if unit == "us":
        return f"{x:.2f} us"
    return f"{x:.3g} {unit}"


def print_rows(rows, out):
    """The table: what, ours, baseline, ratio [min..max], target, status
    (a row: what, value, base, unit, ratio, spread, target, status, and
    optionally lower_is_better and error)."""
    if not rows:
        return
    w = max(len(r["what"]) for r in rows)
    print(f"{'what':<{w}}  {'ours':>11}  {'baseline':>11}  {'ratio [min..max]':>20}  "
          f"{'target':>8}  status", file=out)
    for r in rows:
        if r["target"] is None:
            tgt = "-"
        else:
            tgt = f"{'<=' if r.get('lower_is_better') else '>='} {r['target']:g}x"
        if r["status"] == "MISSING":
            print(f"{r['what']:<{w}}  {'':>11}  {'':>11}  {'':>20}  {tgt:>8}  MISSING: "
                  f"{r['error']}", file=out)
            continue
        lo, hi = r["spread"]
        ratio = f"{r['ratio']:.3f} [{lo:.2f}..{hi:.2f}]"
        print(f"{r['what']:<{w}}  {fmt(r['value'], r['unit']):>11}  "
              f"{fmt(r['base'], r['unit']):>11}  {ratio:>20}  {tgt:>8}  {r['status']}",
              file=out)
