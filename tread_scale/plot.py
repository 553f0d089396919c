"""``tread-scale plot``: training loss, validation loss, FID and CLIP score of runs against steps, training
wall-clock and training FLOPs, and the time each run takes to reach a target (dense vs TREAD)."""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tread_scale.errors import ConfigError, DatasetError
from tread_scale.evaluation.curve import CURVE_FILE
from tread_scale.jsonl import last_record_per_step

log = logging.getLogger(__name__)

#: The metrics that can be plotted and targeted, in row order, with their axis labels.
METRICS = {"loss": "training loss", "val_loss": "validation loss", "fid": "FID", "clip_score": "CLIP score"}
#: Metrics where higher is better (all the others: lower is better).
HIGHER_IS_BETTER = frozenset({"clip_score"})
_LOG_SCALE = frozenset({"loss", "val_loss"})


@dataclass(frozen=True)
class Point:
    """One value of a metric at a training step.

    Attributes:
        step: Training batch.
        wall_s: Training wall-clock seconds up to that step (``None``: not known).
        flops: Training FLOPs up to that step (``None``: not known).
        value: The metric.
    """

    step: int
    wall_s: float | None
    flops: float | None
    value: float


@dataclass
class Clock:
    """Training wall-clock seconds and FLOPs of a run at its logged steps (from ``metrics.jsonl``).

    Attributes:
        steps: The logged steps, increasing.
        wall_s: Training seconds at each logged step, or ``None`` if the log has no usable clock.
        flops: Training FLOPs at each logged step, or ``None`` if the log does not record them.
    """

    steps: list[int]
    wall_s: list[float] | None
    flops: list[float] | None

    def at(self, step: int) -> tuple[float | None, float | None]:
        """``(wall_s, flops)`` at ``step``.

        The record of that step if there is one; else linear interpolation between the logged steps around it
        (both counters are 0 at step 0, so a step before the first record is interpolated from there); past
        the last logged step, extrapolation at the last interval's pace for at most one more interval (a final
        evaluation after the last record), and ``None`` beyond.
        """
        return self._at(step, self.wall_s), self._at(step, self.flops)

    def _at(self, step: int, values: list[float] | None) -> float | None:
        if not values:
            return None
        xs, ys = self.steps, values
        if xs[0] > 0:
            xs, ys = [0, *xs], [0.0, *ys]
        i = bisect.bisect_left(xs, step)
        if i < len(xs) and xs[i] == step:
            return ys[i]
        if step < xs[0]:
            return None
        if i == len(xs):  # past the last record
            if len(xs) < 2 or step - xs[-1] > xs[-1] - xs[-2]:
                return None
            i = len(xs) - 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (step - x0) / (x1 - x0)


@dataclass
class Series:
    """What one input (a run folder or a FID curve file) contributes to the plot and to the targets.

    Attributes:
        label: Legend entry: run name and dense or TREAD routes, e.g. ``tread (TREAD 1->2@0.5)``.
        dense: The run has no routes (dense); else it is a TREAD run.
        metrics: Points of ``loss``, ``val_loss``, ``fid``, ``clip_score`` (only those the input has), each in
            step order.
        source: The input, as given.
    """

    label: str
    dense: bool = True
    metrics: dict[str, list[Point]] = field(default_factory=dict)
    source: str = ""


def _records(path: Path, key: str) -> list[dict]:
    """Records of a JSON-lines file that have ``key``, the last of each step winning; none if it is missing.

    Raises:
        DatasetError: If a line is not JSON or has no integer ``step``.
    """
    if not path.is_file():
        return []
    try:
        return last_record_per_step(path, key)
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: not a JSON-lines log with a step in every record ({e})") from e


def _kind(routes: list[dict]) -> str:
    return "TREAD " + ", ".join(f"{r['start']}->{r['end']}@{r['rate']}" for r in routes) if routes else "dense"


def _run_routes(run: Path, curve: list[dict]) -> list[dict]:
    """A run's routes, from its ``config.yaml`` or else from what its FID curve recorded."""
    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        return (yaml.safe_load(cfg_path.read_text()) or {}).get("routing", {}).get("routes") or []
    return ((curve[-1].get("routing") if curve else None) or {}).get("routes") or []


def _clock(metrics: list[dict], where: Path) -> Clock | None:
    """The training clock of a ``metrics.jsonl``'s records.

    Wall-clock: ``train_wall_s`` (training time from batch 0, evaluation left out, continued across resumes)
    when every record has it; else ``wall_s`` of logs written before it was recorded (which includes
    in-training evaluation), unless it restarts at a resume (then there is no usable wall-clock). FLOPs:
    ``train_flops`` (cumulative) when every record has it.
    """
    if not metrics:
        return None
    steps = [r["step"] for r in metrics]
    wall = flops = None
    if all("train_wall_s" in r for r in metrics):
        wall = [float(r["train_wall_s"]) for r in metrics]
    elif all("wall_s" in r for r in metrics):
        wall = [float(r["wall_s"]) for r in metrics]
        back = next((s for s, a, b in zip(steps[1:], wall, wall[1:]) if b < a), None)
        if back is not None:
            log.warning("%s: wall_s restarts at step %d (a resume, logged before train_wall_s was recorded): no "
                        "wall-clock for this run", where, back)
            wall = None
        else:
            log.warning("%s: no train_wall_s (logged before it was recorded); the wall-clock is wall_s, which "
                        "includes in-training evaluation", where)
    if all("train_flops" in r for r in metrics):
        flops = [float(r["train_flops"]) for r in metrics]
    else:
        log.warning("%s: no train_flops (logged before it was recorded, or a model that does not count its "
                    "FLOPs): no training FLOPs for this run", where)
    return Clock(steps, wall, flops)


def _points(records: list[dict], key: str, clock: Clock | None) -> list[Point]:
    """``key`` of each record that has it, timed by ``clock`` (else by the record's own ``wall_s``)."""
    out = []
    for r in records:
        if r.get(key) is None:
            continue
        if clock is not None:
            wall, flops = clock.at(r["step"])
        else:
            wall, flops = r.get("wall_s"), None
        out.append(Point(int(r["step"]), wall, flops, float(r[key])))
    return out


def _curve_clock(records: list[dict]) -> Clock | None:
    """The clock of the run a curve file's weights came from (``<run>/ema/ba<N>.safetensors``), if it is here."""
    weights = records[-1].get("weights")
    if not weights:
        return None
    metrics_path = Path(weights).parent.parent / "metrics.jsonl"
    return _clock(_records(metrics_path, "loss"), metrics_path) if metrics_path.is_file() else None


def _from_curve_file(path: Path) -> Series:
    """A ``tread-scale fid --every`` output: FID, and validation loss and CLIP score if it has them."""
    records = _records(path, "fid")
    if not records:
        raise DatasetError(f"{path}: no FID records (write one with tread-scale fid RUN --every Nba)")
    run = records[-1].get("run") or path.stem
    routes = (records[-1].get("routing") or {}).get("routes") or []
    label = f"{run} ({_kind(routes)})"
    if path.name != CURVE_FILE:
        label += f" [{path.stem}]"
    clock = _curve_clock(records)
    metrics = {k: _points(records, k, clock) for k in ("val_loss", "fid", "clip_score")}
    return Series(label, not routes, {k: v for k, v in metrics.items() if v}, str(path))


def _from_run(run: Path) -> Series:
    """A run folder's metrics (see :func:`load_series`)."""
    curve = _records(run / CURVE_FILE, "fid")
    routes = _run_routes(run, curve)
    metrics_records = _records(run / "metrics.jsonl", "loss")
    clock = _clock(metrics_records, run / "metrics.jsonl")
    evals = _records(run / "eval.jsonl", "fid")
    vals = _records(run / "eval.jsonl", "val_loss")
    fid_records = curve or evals
    metrics = {
        "loss": _points(metrics_records, "loss", clock),
        "val_loss": _points(vals or curve, "val_loss", clock),
        "fid": _points(fid_records, "fid", clock),
        "clip_score": _points(fid_records, "clip_score", clock),
    }
    return Series(f"{run.name} ({_kind(routes)})", not routes, {k: v for k, v in metrics.items() if v}, str(run))


def load_series(source: str | Path) -> Series:
    """The metrics of a run folder, or of a FID curve ``.jsonl`` file, each point with its training clock.

    A run folder gives its training ``loss`` (``metrics.jsonl``); ``fid`` and ``clip_score`` from its
    ``fid_curve.jsonl`` if it has one, else from the in-training ``eval.jsonl``; ``val_loss`` from
    ``eval.jsonl`` if it has any, else from the curve's records that carry it. Every point of a run folder is
    timed by the run's ``metrics.jsonl`` (:class:`Clock`: the record at that step, else interpolated), so all
    metrics share one clock. A curve file gives ``fid``, ``val_loss`` and ``clip_score``, timed by the
    ``metrics.jsonl`` of the run its weights came from when that is here, else by the curve's recorded
    ``wall_s`` (and no FLOPs). A run without ``routing.routes`` is dense, any other a TREAD run.

    Raises:
        DatasetError: If ``source`` is neither, a curve file has no FID records, or a log is not JSON lines.
    """
    p = Path(source)
    if p.is_dir():
        series = _from_run(p)
        if not series.metrics:
            log.warning("%s: nothing to plot (no metrics.jsonl, eval.jsonl or %s)", p, CURVE_FILE)
        return series
    if p.is_file() and p.suffix == ".jsonl":
        return _from_curve_file(p)
    raise DatasetError(f"{p}: not a run folder or a FID curve .jsonl (tread-scale fid RUN --every Nba writes one)")


# ---- targets ----


@dataclass(frozen=True)
class Target:
    """A value of a metric to reach: at most ``value`` (at least, for a higher-is-better metric).

    Attributes:
        metric: One of :data:`METRICS`.
        value: The target.
    """

    metric: str
    value: float

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER

    def reached_by(self, value: float) -> bool:
        return value >= self.value if self.higher_is_better else value <= self.value

    def describe(self) -> str:
        short = f"{self.value:g}"
        value = short if float(short) == self.value else repr(self.value)
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {value}"

    @classmethod
    def parse(cls, text: str) -> Target:
        """A ``METRIC=VALUE`` option, e.g. ``val_loss=0.35``.

        Raises:
            ConfigError: Naming the option, if it is not ``METRIC=VALUE``, the metric is unknown or the value is
                not a finite number.
        """
        metric, sep, value = text.partition("=")
        metric = metric.strip()
        if not sep or not metric or not value.strip():
            raise ConfigError(f"--target {text!r}: give METRIC=VALUE, e.g. val_loss=0.35")
        if metric not in METRICS:
            raise ConfigError(f"--target {text!r}: unknown metric {metric!r} (one of {', '.join(METRICS)})")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--target {text!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"--target {text!r}: the value must be finite")
        return cls(metric, number)


@dataclass
class TargetResult:
    """When one run first reached a target.

    Attributes:
        target: The target.
        run: The run's label.
        source: The input it came from.
        dense: Whether the run is dense.
        status: ``reached``, ``not reached`` or ``missing`` (the run has no such metric).
        step: First step whose value reaches the target (``reached``).
        wall_s: Training wall-clock seconds at that step (``None``: not known).
        flops: Training FLOPs at that step (``None``: not known).
        best: Best value of the run (``not reached``).
        best_step: Step of the best value, the first if several.
        wall_vs_dense: This TREAD run's wall-clock to the target over the dense run's (exactly one dense run
            among the inputs, both reached, both known); ``None`` otherwise.
        flops_vs_dense: The same for training FLOPs.
    """

    target: Target
    run: str
    source: str
    dense: bool
    status: str
    step: int | None = None
    wall_s: float | None = None
    flops: float | None = None
    best: float | None = None
    best_step: int | None = None
    wall_vs_dense: float | None = None
    flops_vs_dense: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON line of ``plot --target --json``."""
        return {"metric": self.target.metric, "target": self.target.value,
                "higher_is_better": self.target.higher_is_better, "run": self.run, "input": self.source,
                "dense": self.dense, "status": self.status, "step": self.step, "wall_s": self.wall_s,
                "flops": self.flops, "best": self.best, "best_step": self.best_step,
                "wall_vs_dense": self.wall_vs_dense, "flops_vs_dense": self.flops_vs_dense}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def time_to_target(series: Sequence[Series], targets: Sequence[Target]) -> list[TargetResult]:
    """For every target and run, the first step whose value reaches the target, with its clock.

    When the inputs hold exactly one dense run and at least one TREAD run, each TREAD run that reached a
    target the dense run reached also gets the ratios of its wall-clock and FLOPs to the dense run's.

    Returns:
        One result per target and run, target by target, runs in input order.
    """
    dense = [s for s in series if s.dense]
    compare = len(dense) == 1 and len(dense) < len(series)
    results = []
    for target in targets:
        block = []
        for s in series:
            points = s.metrics.get(target.metric, [])
            if not points:
                block.append(TargetResult(target, s.label, s.source, s.dense, "missing"))
                continue
            hit = next((p for p in points if target.reached_by(p.value)), None)
            if hit is not None:
                block.append(TargetResult(target, s.label, s.source, s.dense, "reached", hit.step, hit.wall_s,
                                          hit.flops))
            else:
                pick = max if target.higher_is_better else min
                best = pick(points, key=lambda p: p.value)
                block.append(TargetResult(target, s.label, s.source, s.dense, "not reached", best=best.value,
                                          best_step=best.step))
        if compare:
            base = next(r for r in block if r.dense)
            if base.status == "reached":
                for r in block:
                    if not r.dense and r.status == "reached":
                        r.wall_vs_dense, r.flops_vs_dense = _ratio(r.wall_s, base.wall_s), _ratio(r.flops, base.flops)
        results.extend(block)
    return results


def format_targets(results: Sequence[TargetResult]) -> str:
    """The results of :func:`time_to_target` as aligned tables, one per target (what ``plot --target`` prints).

    Columns: run, step, training wall-clock (s), training FLOPs and, when there is a dense run to compare to,
    TREAD/dense ratios of the wall-clock and FLOPs (blank for the dense run). A run that did not reach the target
    says ``not reached (best X at step N)``; one without the metric says so. Unknown numbers print as ``-``.
    """
    blocks, order = {}, []
    for r in results:
        if r.target not in blocks:
            blocks[r.target] = []
            order.append(r.target)
        blocks[r.target].append(r)
    out = []
    for target in order:
        rows = blocks[target]
        ratios = any(r.wall_vs_dense is not None or r.flops_vs_dense is not None for r in rows)
        head = ["run", "step", "wall-clock (s)", "training FLOPs"] + (["wall vs dense", "FLOPs vs dense"]
                                                                    if ratios else [])
        table = []
        for r in rows:
            if r.status == "reached":
                cells = [str(r.step), "-" if r.wall_s is None else f"{r.wall_s:.2f}",
                         "-" if r.flops is None else f"{r.flops:.3e}"]
                if ratios:  # blank for the dense run (the reference), "-" where a clock is not known
                    cells += ["" if r.dense else "-" if x is None else f"{x:.3f}"
                              for x in (r.wall_vs_dense, r.flops_vs_dense)]
                table.append((r.run, cells))
            elif r.status == "not reached":
                table.append((r.run, f"not reached (best {r.best:.4g} at step {r.best_step})"))
            else:
                table.append((r.run, f"no {target.metric} in {r.source}"))
        width0 = max(len(head[0]), *(len(name) for name, _ in table))
        widths = [len(h) for h in head[1:]]
        for _, cells in table:
            if isinstance(cells, list):
                widths = [max(w, len(c)) for w, c in zip(widths, cells)]
        lines = [f"target {target.describe()} ({'higher' if target.higher_is_better else 'lower'} is better)",
                 "  ".join([head[0].ljust(width0), *(h.rjust(w) for h, w in zip(head[1:], widths))]).rstrip()]
        for name, cells in table:
            rest = [c.rjust(w) for c, w in zip(cells, widths)] if isinstance(cells, list) else [cells]
            lines.append("  ".join([name.ljust(width0), *rest]).rstrip())
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


# ---- the figure ----


def _wall_unit(series: Sequence[Series]) -> tuple[str, float]:
    most = max((p.wall_s for s in series for pts in s.metrics.values() for p in pts if p.wall_s is not None),
               default=0.0)
    return ("h", 3600.0) if most > 7200 else ("min", 60.0) if most > 120 else ("s", 1.0)


def plot_series(series: Sequence[Series], out: str | Path, targets: Sequence[Target] = ()) -> Path:
    """Write a PNG of the series' metrics, one row per metric, against steps, wall-clock and training FLOPs.

    A row (training loss, validation loss, FID, CLIP score) is drawn when some input has that metric, a column
    (step, training wall-clock, training FLOPs) when some point has that clock, and a panel is left out when
    no input has a point in it. Each input keeps one colour on every panel. A target is a dashed horizontal
    line on its metric's panels. Both losses are on a log scale.

    Raises:
        DatasetError: If no input has any metric.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in METRICS if any(s.metrics.get(m) for s in series)]
    if not rows:
        raise DatasetError(f"none of {', '.join(s.source for s in series)} has a metrics.jsonl, eval.jsonl with "
                           "validation loss or FID, or FID curve")
    unit, scale = _wall_unit(series)
    columns = [("step", lambda p: p.step)]
    if any(p.wall_s is not None for s in series for pts in s.metrics.values() for p in pts):
        columns.append((f"training wall-clock ({unit})", lambda p: None if p.wall_s is None else p.wall_s / scale))
    if any(p.flops is not None for s in series for pts in s.metrics.values() for p in pts):
        columns.append(("training FLOPs", lambda p: p.flops))
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(5.5 * len(columns), 3.5 * len(rows)),
                             squeeze=False)
    for i, s in enumerate(series):
        for ax_row, name in zip(axes, rows):
            points = s.metrics.get(name, [])
            for ax, (xlabel, x_of) in zip(ax_row, columns):
                xy = [(x_of(p), p.value) for p in points if x_of(p) is not None]
                if xy:
                    ax.plot([x for x, _ in xy], [y for _, y in xy], label=s.label, color=f"C{i % 10}",
                            **({} if name == "loss" else {"marker": "o", "markersize": 3}))
                elif points:
                    log.info("%s: its %s points have no %s; left out of that panel", s.label, name, xlabel)
    for ax_row, name in zip(axes, rows):
        for ax, (xlabel, _) in zip(ax_row, columns):
            if not ax.lines:
                fig.delaxes(ax)
                continue
            for t in targets:
                if t.metric == name and (t.value > 0 or name not in _LOG_SCALE):
                    ax.axhline(t.value, color="0.3", linestyle="--", linewidth=1, label=f"target {t.value:g}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(METRICS[name])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            if name in _LOG_SCALE:
                ax.set_yscale("log")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_runs(runs: Sequence[str | Path], out: str | Path, targets: Sequence[Target] = ()) -> Path:
    """Write a PNG of the metrics of run folders and FID curve files (:func:`load_series`, :func:`plot_series`).

    Raises:
        DatasetError: If an input is neither a run folder nor a curve file, or no input has any metric.
    """
    return plot_series([load_series(r) for r in runs], out, targets)


__all__ = ["Clock", "HIGHER_IS_BETTER", "METRICS", "Point", "Series", "Target", "TargetResult", "format_targets",
           "load_series", "plot_runs", "plot_series", "time_to_target"]
