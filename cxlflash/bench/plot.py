"""``--plot``: latency histograms and rates over time, one line of panels
per family of rows."""
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from .._core._lazy import numpy as np

from .options import BenchError
from .report import UNITS


FAMILIES = (("IO", "block I/O", "latency per request (us)"),
            ("core", "core operations", "latency per call (us)"),
            ("resize", "resizes", "latency per resize (us)"))


def _family(row):
    if row.unit == "IO":
        return "IO"
    return "resize" if row.unit == "resize" else "core"


def plot(rows, path):
    """One line of two panels per family of rows (block I/O per request,
    core operations per call, resizes): the latency histogram and the rate
    over time, both on log scales (the rows of a family differ by orders
    of magnitude).  A row has one colour in every panel, its baseline
    dashed.  Returns the layout: {panel title: [(label, colour, style)]}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'cxlflash[plot]'") from None
    palette = plt.get_cmap("tab10").colors
    colour = {r.name: palette[i % len(palette)] for i, r in enumerate(rows)}
    families = [(key, title, xlabel) for key, title, xlabel in FAMILIES
                if any(_family(r) == key and r.main.hist.total for r in rows)]
    layout = {}
    fig, axes = plt.subplots(max(1, len(families)), 2, squeeze=False,
                             figsize=(13, 4.2 * max(1, len(families))))
    for (key, title, xlabel), (ax1, ax2) in zip(families, axes):
        members = [r for r in rows if _family(r) == key and r.main.hist.total]
        hist_title, rate_title = f"{title}: latency", f"{title}: rate over time"
        layout[hist_title], layout[rate_title] = [], []
        for r in members:
            sides = [(r.main, r.name, "-")]
            if r.base is not None:
                sides.append((r.base, f"{r.name}: {r.base_name}", "--"))
            unit = UNITS.get(r.unit, r.unit)
            for side, label, style in sides:
                pts = side.hist.nonzero()
                if pts:
                    x, y = zip(*pts)
                    ax1.plot(np.array(x) / 1000, y, label=label, drawstyle="steps-mid",
                             linestyle=style, color=colour[r.name])
                    layout[hist_title].append((label, colour[r.name], style))
                pts = [(t, v) for t, v in side.timeline if v > 0]
                if pts:
                    t, v = zip(*pts)
                    ax2.plot(t, v, label=f"{label} ({unit}/s)", linestyle=style,
                             color=colour[r.name], marker="." if len(pts) < 20 else None)
                    layout[rate_title].append((label, colour[r.name], style))
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        ax1.set_xlabel(xlabel)
        ax1.set_ylabel("samples")
        ax1.set_title(hist_title)
        ax2.set_yscale("log")
        ax2.set_xlabel("elapsed in the row (s)" if key == "core" else "elapsed in the run (s)")
        ax2.set_ylabel("operations/s (each side on its own busy time)")
        ax2.set_title(rate_title)
        for ax in (ax1, ax2):
            if ax.lines:                  # nothing drawn: no empty legend (a warning)
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return layout
