"""Plot set-up for the examples: matplotlib without a display, figures saved as PNG.

Example:
  >>> import os, tempfile, numpy as np
  >>> plt = pyplot()
  >>> fig, ax = plt.subplots()
  >>> plot_reliability(ax, np.array([[0.9, 0.1], [0.3, 0.7]]), np.array([0, 1]))
  >>> path = save_figure(fig, os.path.join(tempfile.mkdtemp(), "sub", "plot.png"))
  >>> os.path.getsize(path) > 1000
  True
"""

from __future__ import annotations

import os

from bdl_examples.metrics import DEFAULT_BINS, ece, reliability_bins


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed); imported on first use so
    that the programs start without matplotlib when they make no plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Save ``fig`` as ``path`` (folders created), close it and return the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_reliability(ax, probs, labels, label: str | None = None, bins: int = DEFAULT_BINS):
    """Draw a reliability diagram (accuracy against confidence per bin) on a matplotlib axis."""
    centers, bin_accuracy, _, counts = reliability_bins(probs, labels, bins)
    filled = counts > 0
    name = label or "model"
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
    ax.plot(
        centers[filled],
        bin_accuracy[filled],
        marker="o",
        label=f"{name} (ECE {ece(probs, labels, bins):.3f})",
    )
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize="small")
