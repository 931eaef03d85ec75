"""Render run directories to a PNG: training loss, validation AUC and logloss, throughput.

    deepfm-plot runs/default --out default.png
    deepfm-plot runs/a runs/b runs/c --out compare.png --labels "lr 0.05,lr 0.1,lr 0.2"

Reads ``<run_dir>/metrics.jsonl`` (written by rank 0 during training, appended across resumes);
several runs are overlaid in one figure, each in its own colour, x axis = samples seen.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from deepfm_dist import cli


def read_run(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run; later records win on a repeated step (resume)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (expected a deepfm-train run directory)")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                # an undefined metric is null in the file (a one-class set's AUC); a gap in the plot
                record = {k: float("nan") if v is None else v for k, v in record.items()}
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
            (evals if "val_auc" in record else train)[record["step"]] = record
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def plot_runs(run_dirs: list[str], out: str, labels: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    fig, axes = plt.subplots(3, 2, figsize=(12, 12), constrained_layout=True)
    (ax_loss, ax_auc), (ax_ll, ax_tp), (ax_ne, ax_cal) = axes
    oracle = None
    for run_dir, label in zip(run_dirs, labels):
        train, evals = read_run(run_dir)
        color = ax_loss._get_lines.get_next_color()
        if train:
            samples = [r["samples"] for r in train]
            ax_loss.plot(samples, [r["loss"] for r in train], color=color, label=label)
            ax_tp.plot(samples, [r["samples_per_s"] for r in train], color=color, label=label)
        if evals:
            samples = [r["samples"] for r in evals]
            ax_auc.plot(samples, [r["val_auc"] for r in evals], "o-", color=color, label=label)
            ax_ll.plot(samples, [r["val_logloss"] for r in evals], "o-", color=color, label=label)
            # NE and calibration: runs written before they were recorded have none
            ax_ne.plot(samples, [r.get("val_ne", float("nan")) for r in evals], "o-", color=color, label=label)
            ax_cal.plot(samples, [r.get("val_calibration", float("nan")) for r in evals], "o-", color=color,
                        label=label)
        summary_path = os.path.join(run_dir, "summary.json")
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                oracle = json.load(f).get("oracle_val_auc", oracle) or oracle
    ax_cal.axhline(1.0, color="gray", linestyle=":")
    if oracle is not None:
        ax_auc.axhline(oracle, color="gray", linestyle="--", label=f"oracle {oracle:.4f}")
    for ax, title, ylabel in (
        (ax_loss, "training loss (mean over ranks, log steps)", "BCE loss"),
        (ax_auc, "validation AUC", "AUC"),
        (ax_ll, "validation logloss", "logloss"),
        (ax_tp, "throughput", "samples/s (all ranks)"),
        (ax_ne, "validation normalized entropy (logloss / base-rate entropy)", "NE"),
        (ax_cal, "validation calibration (mean prediction / CTR)", "calibration"),
    ):
        ax.set_title(title)
        ax.set_xlabel("samples seen")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(", ".join(labels) if len(labels) <= 4 else f"{len(labels)} runs")
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


@dataclass
class PlotOptions:
    run_dirs: list[str]
    """Run directories, each with its metrics.jsonl; several are overlaid."""
    out: str
    """The output PNG file."""
    labels: str = ""
    """Comma-separated legend labels, one per run (default: the directory names)."""

    def __post_init__(self) -> None:
        if self.labels and len(self.labels.split(",")) != len(self.run_dirs):
            raise ValueError(f"--labels: {len(self.labels.split(','))} labels for {len(self.run_dirs)} run directories")
        if not self.out.lower().endswith(".png"):
            raise ValueError(f"--out={self.out!r}: expected a .png file name")


def main(argv: list[str] | None = None) -> int:
    args = cli.parse("deepfm-plot", PlotOptions, argv, __doc__.split("\n\n")[0], positional=("run_dirs",))
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    try:
        plot_runs(args.run_dirs, args.out, labels)
    except (FileNotFoundError, ValueError) as e:
        print(f"deepfm-plot: error: {e}", file=sys.stderr)
        return 2
    print(f"deepfm-plot: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
