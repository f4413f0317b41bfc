"""PNG plots of a results directory: ``python -m bench.load.plot RESULTS_DIR``.

Run by the harness with an interpreter that has matplotlib (the peers' venv),
so matplotlib never enters the gateway's environment.
"""
from __future__ import annotations

import json
import os
import sys

__all__ = ["main"]


def main(argv: list) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = argv[0]
    with open(os.path.join(directory, "results.json")) as f:
        cases = json.load(f)["cases"]
    for c in cases:
        name = c["name"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        samples = c["load"].get("latency_samples_s") or []
        if samples:
            ys = [x * 1e3 for x in samples]
            xs = [100.0 * i / len(ys) for i in range(len(ys))]
            axes[0].plot(xs, ys)
            axes[0].set_yscale("log")
            axes[0].set_xlabel("percentile")
            axes[0].set_ylabel("latency ms")
        axes[0].set_title("latency distribution")
        rss = c.get("rss_samples") or []
        if rss:
            t0 = rss[0][0]
            axes[1].plot([t - t0 for t, _ in rss], [v / 1e6 for _, v in rss])
            for edge in c["window"]:
                axes[1].axvline(edge - t0, color="grey", linestyle=":")
        axes[1].set_title("RSS (MB) over time")
        axes[1].set_xlabel("s")
        pauses = c.get("gc_pauses") or []
        if pauses:
            t0 = c["window"][0]
            axes[2].scatter([p[0] - t0 for p in pauses], [p[4] * 1e3 for p in pauses], s=3)
            axes[2].set_ylabel("longest pause in hook call, ms")
        axes[2].set_title("GC pauses over time")
        axes[2].set_xlabel("s from window start")
        fig.suptitle(name)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, "%s.png" % name), dpi=80)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
