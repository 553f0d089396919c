"""``MetricsLog``: the global mean training loss, throughput and wall-clock time as JSON lines."""

from __future__ import annotations

import json
import time
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


class MetricsLog(Callback):
    """Every ``interval`` batches, append ``{"step", "loss", "samples", "wall_s", "samples_per_s"}`` to a file.

    ``loss`` is the mean over the *global* batch and all its micro-batches (Composer all-reduces it every
    step into ``state.total_loss_dict``), so runs with different world sizes, micro-batch splits or
    backends are directly comparable.

    Args:
        path: ``metrics.jsonl`` path (written by rank 0; appended to on resume).
        interval: Batches between records.
    """

    def __init__(self, path: str | Path, interval: int = 1) -> None:
        self.path = Path(path)
        self.interval = max(1, int(interval))
        self._t0 = time.time()
        self._last: tuple[float, int] | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self._t0 = time.time()
        self._last = (self._t0, int(state.timestamp.sample))

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if step % self.interval:
            return
        if dist.get_global_rank() != 0:
            return
        value = (getattr(state, "total_loss_dict", None) or {}).get("loss/train/total")
        if value is None:
            return
        now, samples = time.time(), int(state.timestamp.sample)
        last_t, last_s = self._last or (self._t0, 0)
        rate = (samples - last_s) / max(now - last_t, 1e-9)
        self._last = (now, samples)
        record = {"step": step, "loss": float(value), "samples": samples, "wall_s": round(now - self._t0, 3),
                  "samples_per_s": round(rate, 2)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        logger.log_metrics({"train/global_loss": record["loss"], "throughput/samples_per_s": rate})


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` file; a resumed run's re-logged steps replace the earlier ones."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


__all__ = ["MetricsLog", "read_metrics"]
