"""``tread-scale plot``: loss and FID curves of one or more runs, against steps and wall-clock time."""

from __future__ import annotations

from pathlib import Path

import yaml

from tread_scale.errors import DatasetError
from tread_scale.jsonl import last_record_per_step


def _records(path: Path, key: str) -> list[dict]:
    """Records of a JSON-lines file that have ``key``, the last of each step winning; none if it is missing."""
    return last_record_per_step(path, key) if path.is_file() else []


def _label(run: Path) -> str:
    cfg_path = run / "config.yaml"
    routes = []
    if cfg_path.is_file():
        routes = (yaml.safe_load(cfg_path.read_text()) or {}).get("routing", {}).get("routes") or []
    kind = "TREAD " + ", ".join(f"{r['start']}->{r['end']}@{r['rate']}" for r in routes) if routes else "dense"
    return f"{run.name} ({kind})"


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """Write a 2x2 PNG: loss and FID (rows) against step and wall-clock hours (columns), one line per run.

    Loss comes from ``<run>/metrics.jsonl`` and FID from ``<run>/eval.jsonl`` (written by the in-training
    evaluation); the wall-clock of an FID point is that of the nearest logged step.

    Raises:
        DatasetError: If no run has a metrics file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    found = False
    for run in map(Path, runs):
        metrics = _records(run / "metrics.jsonl", "loss")
        evals = _records(run / "eval.jsonl", "fid")
        if not metrics:
            continue
        found = True
        label = _label(run)
        steps = [r["step"] for r in metrics]
        hours = [r["wall_s"] / 3600 for r in metrics]
        loss = [r["loss"] for r in metrics]
        axes[0][0].plot(steps, loss, label=label)
        axes[0][1].plot(hours, loss, label=label)
        fid = [(r["step"], r["fid"]) for r in evals]
        if fid:
            wall = {r["step"]: r["wall_s"] / 3600 for r in metrics}
            fid_hours = [wall.get(s, hours[min(range(len(steps)), key=lambda i: abs(steps[i] - s))]) for s, _ in fid]
            axes[1][0].plot([s for s, _ in fid], [f for _, f in fid], marker="o", label=label)
            axes[1][1].plot(fid_hours, [f for _, f in fid], marker="o", label=label)
    if not found:
        raise DatasetError(f"none of {', '.join(map(str, runs))} has a metrics.jsonl")
    for ax, (ylabel, xlabel) in zip(axes.flat, [("loss", "step"), ("loss", "wall-clock (h)"),
                                                ("FID", "step"), ("FID", "wall-clock (h)")]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0][0].set_yscale("log")
    axes[0][1].set_yscale("log")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
