"""Training curves of one or more runs on one figure (docs/training.md, "Plots").

Two panels, one line per run (labelled by its directory's name): training loss (nats) and
validation bits per byte, both against training tokens. Drawn with matplotlib's Agg canvas
directly, so no display and no global backend switch are needed.
"""
from pathlib import Path

from .rundir import read_metrics


def plot_runs(run_dirs, out):
    """Write the figure of the runs' metrics.jsonl files to `out` (PNG); returns out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, val_ax = fig.subplots(1, 2)
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        if not rows:
            raise ValueError(f"run {str(run_dir)!r} has no metrics yet")
        label = Path(run_dir).resolve().name
        loss_ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], label=label)
        evals = [r for r in rows if "val_bpb" in r]
        val_ax.plot([r["tokens"] for r in evals], [r["val_bpb"] for r in evals], marker="o", label=label)
    for ax, title, ylabel in ((loss_ax, "training loss", "loss (nats per byte)"),
                              (val_ax, "validation", "bits per byte")):
        ax.set_title(title)
        ax.set_xlabel("tokens (bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    return out
