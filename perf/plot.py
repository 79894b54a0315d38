#!/usr/bin/env python
"""Plot the speed ratio of a bench_cells.py run: torch time / our time over the (B, H) sweep.

    python perf/plot.py [RESULT.json] [-o OUT.png]

Without a JSON path, the newest perf/results/bench_cells-*.json is used. One panel per cell,
ratio against H (log scale), one line per batch size; the dashed line at 1 is parity (above:
bptt is faster). Writes a PNG beside the JSON (or to -o). Needs matplotlib (the ``plot`` extra:
``pip install -e '.[plot]'``); without it, says so and exits with status 1.
"""

import argparse
import glob
import json
import os
import sys

import _harness as hx


def latest_result(prefix="bench_cells"):
    paths = sorted(glob.glob(os.path.join(hx.RESULTS_DIR, f"{prefix}-*.json")))
    return paths[-1] if paths else None


def plot_cells(json_path, png_path=None):
    """Write the ratio plot of ``json_path``; return the PNG path, or None (message printed)
    when matplotlib is missing or the run has no ratios."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib, or the project's "
              "'plot' extra); no PNG written", file=sys.stderr)
        return None
    with open(json_path) as f:
        run = json.load(f)
    rows = [r for r in run["results"] if r.get("ratio")]
    if not rows:
        print(f"plot: {json_path} has no ratios (one side did not run); no PNG written",
              file=sys.stderr)
        return None
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8), sharey=True,
                             squeeze=False)
    for ax, cell in zip(axes[0], cells):
        for B in sorted({r["B"] for r in rows if r["cell"] == cell}):
            pts = sorted((r["H"], r["ratio"]) for r in rows if r["cell"] == cell and r["B"] == B)
            ax.plot([h for h, _ in pts], [v for _, v in pts], marker="o", label=f"B={B}")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        hs = sorted({r["H"] for r in rows if r["cell"] == cell})
        ax.set_xticks(hs, [str(h) for h in hs])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(cell)
        ax.set_xlabel("hidden size H")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("torch time / bptt time  (>1: bptt faster)")
    axes[0][-1].legend(fontsize="small")
    m = run.get("machine", {})
    fig.suptitle(f"training step fwd+bwd, T={run.get('T')}, float32, {m.get('threads')} threads, "
                 f"{m.get('cpu', '')} ({m.get('date_utc', '')})", fontsize="small")
    fig.tight_layout()
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="?", help="a bench_cells JSON (default: the newest)")
    p.add_argument("-o", "--output", help="PNG path (default: beside the JSON)")
    a = p.parse_args(argv)
    path = a.json or latest_result()
    if not path:
        print(f"plot: no bench_cells-*.json in {hx.RESULTS_DIR}; run perf/bench_cells.py first",
              file=sys.stderr)
        return 1
    png = plot_cells(path, a.output)
    if not png:
        return 1
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
