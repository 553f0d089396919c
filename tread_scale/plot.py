"""``tread-scale plot``: loss and FID curves of one or more runs, against steps and wall-clock time."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tread_scale.errors import DatasetError
from tread_scale.evaluation.curve import CURVE_FILE
from tread_scale.jsonl import last_record_per_step

log = logging.getLogger(__name__)


@dataclass
class Series:
    """What one input (a run folder or a FID curve file) contributes to the plot.

    Attributes:
        label: Legend entry: run name and dense or TREAD routes.
        loss: ``(step, wall-clock hours, loss)`` from ``metrics.jsonl``.
        fid: ``(step, wall-clock hours or None, fid)`` from a FID curve, or from ``eval.jsonl``.
    """

    label: str
    loss: list[tuple[int, float, float]] = field(default_factory=list)
    fid: list[tuple[int, float | None, float]] = field(default_factory=list)


def _records(path: Path, key: str) -> list[dict]:
    """Records of a JSON-lines file that have ``key``, the last of each step winning; none if it is missing."""
    return last_record_per_step(path, key) if path.is_file() else []


def _kind(routes: list[dict]) -> str:
    return "TREAD " + ", ".join(f"{r['start']}->{r['end']}@{r['rate']}" for r in routes) if routes else "dense"


def _label(run: Path, curve: list[dict]) -> str:
    """Run name and routes, from its ``config.yaml`` or else from what its FID curve recorded."""
    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        routes = (yaml.safe_load(cfg_path.read_text()) or {}).get("routing", {}).get("routes") or []
    else:
        routes = ((curve[-1].get("routing") if curve else None) or {}).get("routes") or []
    return f"{run.name} ({_kind(routes)})"


def _curve_points(records: list[dict]) -> list[tuple[int, float | None, float]]:
    return [(r["step"], r["wall_s"] / 3600 if r.get("wall_s") is not None else None, r["fid"]) for r in records]


def _from_curve_file(path: Path) -> Series:
    """A ``tread-scale fid --every`` output: FID against steps and training wall-clock."""
    records = _records(path, "fid")
    if not records:
        raise DatasetError(f"{path}: no FID records (write one with tread-scale fid RUN --every Nba)")
    run = records[-1].get("run") or path.stem
    label = f"{run} ({_kind((records[-1].get('routing') or {}).get('routes') or [])})"
    if path.name != CURVE_FILE:
        label += f" [{path.stem}]"
    return Series(label, fid=_curve_points(records))


def _from_run(run: Path) -> Series:
    """Loss from ``metrics.jsonl``; FID from ``fid_curve.jsonl`` if present, else from ``eval.jsonl``."""
    curve = _records(run / CURVE_FILE, "fid")
    series = Series(_label(run, curve))
    metrics = _records(run / "metrics.jsonl", "loss")
    series.loss = [(r["step"], r["wall_s"] / 3600, r["loss"]) for r in metrics]
    if curve:
        series.fid = _curve_points(curve)
    else:
        series.fid = [(r["step"], None, r["fid"]) for r in _records(run / "eval.jsonl", "fid")]
    if metrics:  # a point without recorded wall-clock takes that of the nearest logged step
        series.fid = [(s, h if h is not None else min(series.loss, key=lambda m: abs(m[0] - s))[1], f)
                      for s, h, f in series.fid]
    return series


def load_series(source: str | Path) -> Series:
    """The curves of a run folder, or of a FID curve ``.jsonl`` file.

    Raises:
        DatasetError: If ``source`` is neither, or a curve file has no FID records.
    """
    p = Path(source)
    if p.is_dir():
        series = _from_run(p)
        if not series.loss and not series.fid:
            log.warning("%s: nothing to plot (no metrics.jsonl, eval.jsonl with FID or %s)", p, CURVE_FILE)
        return series
    if p.is_file() and p.suffix == ".jsonl":
        return _from_curve_file(p)
    raise DatasetError(f"{p}: not a run folder or a FID curve .jsonl (tread-scale fid RUN --every Nba writes one)")


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """Write a PNG of loss (from ``metrics.jsonl``) and FID against steps and wall-clock hours, one line per input.

    Each input is a run folder or a FID curve ``.jsonl`` (``tread-scale fid RUN --every Nba``), so dense and
    TREAD runs can be compared on one figure. A run folder's FID comes from its ``fid_curve.jsonl`` (the
    training wall-clock recorded with each export) if it has one, else from the in-training ``eval.jsonl``
    (the wall-clock of the nearest logged step). A row (loss, FID) is drawn only when some input has it.

    Raises:
        DatasetError: If an input is neither a run folder nor a curve file, or no input has loss or FID.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [load_series(r) for r in runs]
    rows = [name for name, has in (("loss", any(s.loss for s in series)), ("FID", any(s.fid for s in series))) if has]
    if not rows:
        raise DatasetError(f"none of {', '.join(map(str, runs))} has a metrics.jsonl, eval.jsonl with FID, or FID "
                           "curve")
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.5 * len(rows)), squeeze=False)
    for s in series:
        for ax_row, name in zip(axes, rows):
            points = s.loss if name == "loss" else s.fid
            if not points:
                continue
            style = {} if name == "loss" else {"marker": "o"}
            ax_row[0].plot([p[0] for p in points], [p[2] for p in points], label=s.label, **style)
            timed = [p for p in points if p[1] is not None]
            if timed:
                ax_row[1].plot([p[1] for p in timed], [p[2] for p in timed], label=s.label, **style)
            elif name == "FID":
                log.warning("%s: no wall-clock recorded with its FID points; left out of FID vs wall-clock", s.label)
    for ax_row, name in zip(axes, rows):
        for ax, xlabel in zip(ax_row, ("step", "wall-clock (h)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            if name == "loss":
                ax.set_yscale("log")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
