"""``MetricsLog``: the global mean training loss, throughput and wall-clock time as JSON lines."""

from __future__ import annotations

import json
import time
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from tread_scale.jsonl import last_record_per_step


class MetricsLog(Callback):
    """Every ``interval`` batches, append ``{"step", "loss", "samples", "wall_s", "samples_per_s",
    "tflops_per_device", "mfu"}`` to a file.

    ``loss`` is the mean over the *global* batch and all its micro-batches (Composer all-reduces it every
    step into ``state.total_loss_dict``), so runs with different world sizes, micro-batch splits or
    backends are directly comparable.

    ``tflops_per_device`` counts model FLOPs (routing-aware: tokens that skip blocks are not counted;
    recomputation is not counted) per second per rank; ``mfu`` divides it by the device's peak, given as
    ``peak_flops`` or looked up in Composer's table of GPUs for the run's precision (absent on CPU). The
    FLOPs are summed batch by batch with the routes in use at each batch, so under a routing schedule they
    follow its stages; ``rate_factor`` (routed runs) is the schedule's factor at the record's batch.

    Args:
        path: ``metrics.jsonl`` path (written by rank 0; appended to on resume).
        interval: Batches between records.
        peak_flops: Peak FLOP/s of one device for MFU (``None``: known GPUs only).
    """

    def __init__(self, path: str | Path, interval: int = 1, peak_flops: float | None = None) -> None:
        self.path = Path(path)
        self.interval = max(1, int(interval))
        self.peak_flops = peak_flops
        self._model = None
        self._flops = 0.0  # global training FLOPs since the last record
        self._samples = 0
        self._t0 = time.time()
        self._last: tuple[float, int] | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        model = state.model.module if hasattr(state.model, "module") else state.model
        self._model = model if hasattr(model, "train_flops_per_sample") else None
        if self.peak_flops is None and state.device.name == "gpu":
            from composer.callbacks.speed_monitor import get_gpu_flops_available

            self.peak_flops = float(get_gpu_flops_available(state)) or None
        self._t0 = time.time()
        self._last = (self._t0, int(state.timestamp.sample))
        self._samples, self._flops = int(state.timestamp.sample), 0.0

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        samples = int(state.timestamp.sample)
        if self._model is not None:  # the routes in use for this batch (a schedule changes them)
            self._flops += (samples - self._samples) * float(self._model.train_flops_per_sample())
        self._samples = samples
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
        metrics = {"train/global_loss": record["loss"], "throughput/samples_per_s": rate}
        router = getattr(getattr(self._model, "net", None), "router", None)
        if router is not None:
            record["rate_factor"] = router.rate_factor
        flops, self._flops = self._flops, 0.0
        if flops:
            per_device = flops / max(now - last_t, 1e-9) / dist.get_world_size()
            record["tflops_per_device"] = float(f"{per_device / 1e12:.6g}")
            metrics["throughput/device/flops_per_sec"] = per_device
            if self.peak_flops:
                record["mfu"] = float(f"{per_device / self.peak_flops:.6g}")
                metrics["throughput/device/mfu"] = record["mfu"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        logger.log_metrics(metrics)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` file in step order; a resumed run's re-logged steps replace the earlier.

    Raises:
        FileNotFoundError: If the file does not exist.
    """
    return last_record_per_step(path)


__all__ = ["MetricsLog", "read_metrics"]
